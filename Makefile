# vdpa-qtest: QEMU-integrated functional tests for vDPA / vhost-user virtio-net.
#   make check    set up (QEMU >= 10.0, .venv) then lint + unit tests + qtests (junit: test-logs/junit.xml)
#   QEMU: QTEST_QEMU_BINARY=~/qemu/build/qemu-system-x86_64 make check (every target follows it)
#   make avocado  build the guest image (cached) and boot real guests
#   make shell    interactive QMP debugging session (QEMU + backend + both monitors)
#   make check-vdpa  only the vhost-vdpa lane (in the lab VM L1 where the host lacks vduse)
#   make bench    benchmarks (JSON + plots under bench/results/)
#   make soak     the scenario suites 10 runs in a row (SOAK_RUNS, SOAK_ARGS), stop at a failure
#   make fuzz     hostile front-end + hostile descriptor tables against the real backend
#                 + a misbehaving VDUSE kernel in-process (FUZZ_MESSAGES, FUZZ_TABLES,
#                 FUZZ_VDUSE, FUZZ_DURATION; figures printed at the end)
#   make lint     ruff check + format check + mypy (strict on backends/ and qtests/qos/)
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# make check runs its tests on this many pytest-xdist workers (1: in-process, no xdist);
# loadgroup: tests marked xdist_group(name) share one worker (module-scoped fixtures)
PYTEST_JOBS ?= auto
AVOCADO_ARGS ?=

.PHONY: check setup lint unit qtests avocado avocado-ci images shell bench fuzz clean format \
	compiled bytecode check-vdpa lab-image soak

setup:
	@bash scripts/setup-host.sh

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy --strict backends qtests/qos --exclude backends/tests
	$(VENV)/bin/mypy backends/tests

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

unit: setup
	$(PY) -m pytest backends/tests $(PYTEST_ARGS)

qtests: setup
	$(PY) -m pytest qtests $(PYTEST_ARGS)

# One pytest session for unit tests and qtests; exit 5 ("no tests collected") is a failure.
# The junit report records each test's log directory (conftest.py).
JUNIT_XML ?= test-logs/junit.xml
check: setup lint compiled bytecode
	$(PY) -m pytest $(if $(filter 1,$(PYTEST_JOBS)),,-n $(PYTEST_JOBS) --dist loadgroup) --junitxml=$(JUNIT_XML) $(PYTEST_ARGS)

# mypyc build of the hot-path modules (backends/compiled.py): cached; falls back to the source
compiled: setup
	$(PY) -m backends.compiled

# Byte-compile the checkout once. Every backend, QEMU helper and pytest worker is a new Python
# process; where PYTHONDONTWRITEBYTECODE is set (this project's machines set it; the lab's L1
# does, its view of the checkout being read-only) each would otherwise compile every module it
# imports again: ~70 ms of CPU per backend start on the host, far more under L1's TCG. Stale
# files are recompiled in memory as usual (mtime check).
BYTECODE_DIRS := backends qtests bench avocado_tests guest_images conftest.py
bytecode: setup
	$(PY) -m compileall -q $(BYTECODE_DIRS)

images: setup
	$(PY) -m guest_images build

# The vhost-vdpa lab's L1 image (kernel with vduse/vhost_vdpa/virtio_vdpa + busybox), cached.
lab-image: setup
	$(PY) -m guest_images build --image lab

# The vhost-vdpa lane alone (make check runs it too).
check-vdpa: setup bytecode lab-image
	$(PY) -m pytest -m vdpa_lane $(PYTEST_ARGS)

avocado: setup bytecode images lab-image
	$(PY) -m avocado_tests.run $(AVOCADO_ARGS)

avocado-ci: setup bytecode images lab-image
	$(PY) -m avocado_tests.run --ci $(AVOCADO_ARGS)

shell: setup
	$(PY) -m qtests.shell $(SHELL_ARGS)

bench: setup compiled bytecode
	$(PY) -m bench $(BENCH_ARGS)

# The scenario suites (both transports) N runs in a row: flakiness is a defect (issue #15).
SOAK_RUNS ?= 10
SOAK_ARGS ?=
soak: setup compiled bytecode lab-image
	$(PY) -m qtests.soak --runs $(SOAK_RUNS) $(SOAK_ARGS)

# The full fuzz run (issue #12); a bounded slice of it runs in `make check` (qtests/test_fuzz.py).
FUZZ_MESSAGES ?= 1000000
FUZZ_TABLES ?= 100000
FUZZ_VDUSE ?= 100000
FUZZ_DURATION ?= 3600
fuzz: setup
	$(PY) -m qtests.fuzz --messages $(FUZZ_MESSAGES) --tables $(FUZZ_TABLES) \
		--vduse-cases $(FUZZ_VDUSE) --duration $(FUZZ_DURATION) --log-dir test-logs/fuzz $(FUZZ_ARGS)

clean:
	rm -rf build *.egg-info .pytest_cache .ruff_cache test-logs
