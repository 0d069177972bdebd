#!/usr/bin/env bash
# One-time (and idempotent) host set-up for the suite: QEMU >= 10.0, the system tools the
# suite uses, and the project's virtualenv. Called by `make check`, `make avocado`, `make shell`.
#
# On Debian 12 as root it installs what is missing (QEMU from bookworm-backports). Anywhere
# else it stops with a message that says exactly what to install. A second run with nothing
# missing does no network access at all.
#
# QEMU: $QTEST_QEMU_BINARY (or $QEMU_TEST_QEMU_BINARY), when set, is the QEMU the suites use
# (qtests/qos/machine.py find_qemu): then that binary is checked (>= 10.0) and no QEMU is
# installed; otherwise qemu-system-x86_64 from PATH, installed from bookworm-backports on
# Debian 12 as root when missing or too old.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

QEMU_MIN_MAJOR=10
QEMU_MIN_MINOR=0
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
# System packages the suite needs besides QEMU (tmux drives the interactive-session test,
# gcc + libc6-dev build the guest's static traffic tool, xz-utils/cpio are handy for images;
# iproute2's `vdpa` runs in the vhost-vdpa lab's L1, which reuses the host's root).
SYSTEM_PKGS=(gcc libc6-dev tmux)

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: ERROR: %s\n' "$*" >&2; exit 1; }

is_debian12() { [ -r /etc/os-release ] && . /etc/os-release && [ "${ID:-}" = debian ] && [ "${VERSION_ID:-}" = 12 ]; }
is_root() { [ "$(id -u)" = 0 ]; }

# The QEMU the suites will use (the same rule as find_qemu in qtests/qos/machine.py).
QEMU_CHOSEN=${QTEST_QEMU_BINARY:-${QEMU_TEST_QEMU_BINARY:-${QOS_QEMU_BINARY:-}}}
QEMU_CHOSEN=${QEMU_CHOSEN/#\~/$HOME}
QEMU_BIN=${QEMU_CHOSEN:-qemu-system-x86_64}

qemu_version() {
    command -v "$QEMU_BIN" >/dev/null 2>&1 || return 1
    "$QEMU_BIN" --version | sed -n 's/^QEMU emulator version \([0-9]*\)\.\([0-9]*\).*/\1 \2/p' | head -1
}

qemu_ok() {
    local v
    v=$(qemu_version) || return 1
    [ -n "$v" ] || return 1
    set -- $v
    [ "$1" -gt "$QEMU_MIN_MAJOR" ] || { [ "$1" -eq "$QEMU_MIN_MAJOR" ] && [ "$2" -ge "$QEMU_MIN_MINOR" ]; }
}

apt_updated=0
apt_update_once() {
    if [ "$apt_updated" = 0 ]; then
        say "apt-get update"
        apt-get update -q >/dev/null || die "apt-get update failed"
        apt_updated=1
    fi
}

ensure_backports_source() {
    # only files apt reads, and only lines that are not comments
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -r "$f" ] && grep -qsE '^[^#]*bookworm-backports' "$f" && return
    done
    say "adding bookworm-backports to /etc/apt/sources.list.d/bookworm-backports.sources"
    cat >/etc/apt/sources.list.d/bookworm-backports.sources <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    apt_updated=0
}

ensure_qemu() {
    if qemu_ok; then
        return
    fi
    local have="not installed"
    if v=$(qemu_version) && [ -n "$v" ]; then have="version ${v/ /.}"; fi
    if [ -n "$QEMU_CHOSEN" ]; then
        die "QEMU >= $QEMU_MIN_MAJOR.$QEMU_MIN_MINOR is required: \$QTEST_QEMU_BINARY names $QEMU_CHOSEN ($have).
  Point it at a qemu-system-x86_64 10.0 or newer (e.g. ~/qemu/build/qemu-system-x86_64), or unset it
  to use the one on PATH."
    fi
    if is_debian12 && is_root; then
        say "QEMU >= $QEMU_MIN_MAJOR.$QEMU_MIN_MINOR needed ($have): installing from bookworm-backports"
        ensure_backports_source
        apt_update_once
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q -t bookworm-backports qemu-system-x86 >/dev/null \
            || die "apt-get install -t bookworm-backports qemu-system-x86 failed"
        qemu_ok || die "QEMU still too old after install: $("$QEMU_BIN" --version | head -1)"
        return
    fi
    die "QEMU >= $QEMU_MIN_MAJOR.$QEMU_MIN_MINOR is required (qemu-system-x86_64 is $have).
  On Debian 12, as root:
    echo 'deb http://deb.debian.org/debian bookworm-backports main' > /etc/apt/sources.list.d/backports.list
    apt-get update && apt-get install -t bookworm-backports qemu-system-x86
  Elsewhere: install qemu-system-x86_64 10.0 or newer from your distribution and re-run."
}

ensure_system_pkgs() {
    local missing=()
    command -v python3 >/dev/null 2>&1 || missing+=(python3)
    command -v gcc >/dev/null 2>&1 || missing+=(gcc)
    [ -e /usr/include/stdio.h ] || missing+=(libc6-dev)
    command -v tmux >/dev/null 2>&1 || missing+=(tmux)
    [ -x /usr/sbin/vdpa ] || [ -x /sbin/vdpa ] || command -v vdpa >/dev/null 2>&1 || missing+=(iproute2)
    if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then missing+=(python3-venv); fi
    # Debian's python3 splits venv out; with another python on PATH this is already fine
    [ ${#missing[@]} -eq 0 ] && return
    if is_debian12 && is_root; then
        say "installing ${missing[*]}"
        apt_update_once
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null \
            || die "apt-get install ${missing[*]} failed"
        return
    fi
    die "missing system packages: ${missing[*]} (on Debian: apt-get install ${missing[*]})"
}

ensure_python() {
    command -v "$PYTHON" >/dev/null 2>&1 || die "python3 (>= 3.11) not found; on Debian: apt-get install python3 python3-venv"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "Python >= 3.11 needed, $PYTHON is $("$PYTHON" --version 2>&1)"
}

# What make check, make avocado, make shell and make bench need: the base install (the backend,
# standard library only) plus the extras of the test suites, the shell and the linters.
EXTRAS=${EXTRAS:-test,shell,dev}

ensure_venv() {
    # The stamp records what was installed; a matching stamp means nothing to do.
    local want stamp="$VENV/.installed"
    want=$( (cat pyproject.toml; echo "$EXTRAS $here") | sha256sum | cut -d' ' -f1)
    if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating $VENV"
        "$PYTHON" -m venv "$VENV" || die "could not create $VENV (on Debian: apt-get install python3-venv)"
    fi
    say "installing the project and its dependencies into $VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
    "$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]" || die "pip install -e .[$EXTRAS] failed"
    # The checkout itself on the venv's sys.path: avocado finds tests by reading them, not
    # importing them, and follows `from avocado_tests.base import ...` with importlib's
    # PathFinder, which does not see the editable install's import hook. With this, plain
    # `.venv/bin/avocado run avocado_tests/` works with nothing set.
    local site
    site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    printf '%s\n' "# scripts/setup-host.sh: the checkout, for avocado's test resolver" "$here" \
        >"$site/vdpa_qtest_checkout.pth"
    echo "$want" >"$stamp"
}

ensure_system_pkgs   # first: on a minimal Debian 12 it also brings python3 and its venv
ensure_python
ensure_qemu
ensure_venv
say "ok: $(command -v "$QEMU_BIN"): $("$QEMU_BIN" --version | head -1), $("$VENV/bin/python" --version)"
