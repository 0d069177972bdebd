#!/usr/bin/env bash
# One-time (and idempotent) host set-up for the suite: QEMU >= 10.0, the system tools the
# suite uses, and the project's virtualenv. Called by `make check`, `make avocado`, `make shell`.
#
# On Debian 12 as root it installs what is missing (QEMU from bookworm-backports). Anywhere
# else it stops with a message that says exactly what to install. A second run with nothing
# missing does no network access at all.
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

qemu_version() {
    command -v qemu-system-x86_64 >/dev/null 2>&1 || return 1
    qemu-system-x86_64 --version | sed -n 's/^QEMU emulator version \([0-9]*\)\.\([0-9]*\).*/\1 \2/p' | head -1
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
    if is_debian12 && is_root; then
        say "QEMU >= $QEMU_MIN_MAJOR.$QEMU_MIN_MINOR needed ($have): installing from bookworm-backports"
        ensure_backports_source
        apt_update_once
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q -t bookworm-backports qemu-system-x86 >/dev/null \
            || die "apt-get install -t bookworm-backports qemu-system-x86 failed"
        qemu_ok || die "QEMU still too old after install: $(qemu-system-x86_64 --version | head -1)"
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

ensure_venv() {
    # The stamp records what was installed; a matching stamp means nothing to do.
    local want stamp="$VENV/.installed"
    want=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
    if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating $VENV"
        "$PYTHON" -m venv "$VENV" || die "could not create $VENV (on Debian: apt-get install python3-venv)"
    fi
    say "installing the project and its dependencies into $VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
    "$VENV/bin/python" -m pip install -q -e '.[dev]' || die "pip install -e .[dev] failed"
    echo "$want" >"$stamp"
}

ensure_system_pkgs   # first: on a minimal Debian 12 it also brings python3 and its venv
ensure_python
ensure_qemu
ensure_venv
say "ok: $(qemu-system-x86_64 --version | head -1), $("$VENV/bin/python" --version)"
