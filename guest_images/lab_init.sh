#!/bin/busybox sh
# /init of the vhost-vdpa lab (L1): load the vDPA modules, mount the host's root (read-only,
# 9p tag "host") with proc/sys/devtmpfs/tmpfs in it, mount the writable share (9p tag "out")
# over its own host path inside it, chroot there and run ONE command, then power off.
#
# Kernel command line:
#   lab.share=PATH   (required) the host path of the writable share; it is mounted at the same
#                    path inside the chroot, so a path means the same file on both sides
#   lab.keep=P1,P2   host paths under /tmp, /run or /var/tmp (a checkout, a venv, a QEMU build)
#                    that stay visible (read-only) through L1's own tmpfs on those directories
# The command is PATH/command.sh, run by /bin/sh inside the chroot with stdin /dev/null,
# stdout to PATH/stdout, stderr to PATH/stderr; its exit code goes to PATH/rc and the kernel
# log to PATH/dmesg.txt. Environment: PATH, HOME=/tmp/home, LANG=C.UTF-8, TMPDIR=/tmp,
# VDPA_LAB_INSIDE=1, VDPA_LAB_SHARE=PATH.
#
# Console protocol (one line each): "VDPA-LAB-INIT uptime=S" when /init starts;
# "VDPA-LAB-ERROR: ..." then "VDPA-LAB-FAILED" if set-up fails (then power off);
# "VDPA-LAB-READY uptime=S" just before the command runs; "VDPA-LAB-DONE rc=N uptime=S".

/bin/busybox mkdir -p /proc /sys /dev /tmp /run /bin /sbin /usr/bin /usr/sbin /newroot
/bin/busybox --install -s
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

echo "VDPA-LAB-INIT uptime=$(cut -d' ' -f1 /proc/uptime)"

off() {
    sync
    # init must never exit (that panics the kernel): keep asking for the power-off
    while :; do poweroff -f; done
}

fail() {
    echo "VDPA-LAB-ERROR: $*"
    echo "VDPA-LAB-FAILED"
    off
}

share=""
keep=""
for arg in $(cat /proc/cmdline); do
    case "$arg" in
    lab.share=*) share=${arg#*=} ;;
    lab.keep=*) keep=${arg#*=} ;;
    esac
done
[ -n "$share" ] || fail "no lab.share= on the kernel command line"

while read -r mod; do
    [ -n "$mod" ] && { insmod "/lib/modules/$mod.ko" || fail "insmod $mod failed"; }
done < /lib/modules/load.order

R=/newroot
p9="trans=virtio,version=9p2000.L,msize=262144"
mount -t 9p -o "$p9,ro,cache=loose" host "$R" || fail "mount of the host root (9p tag host) failed"
mount -t proc proc "$R/proc" || fail "mount proc in the host root failed"
mount -t sysfs sysfs "$R/sys" || fail "mount sysfs in the host root failed"
mount -t devtmpfs devtmpfs "$R/dev" || fail "mount devtmpfs in the host root failed"
mkdir -p "$R/dev/pts" "$R/dev/shm"
mount -t devpts devpts "$R/dev/pts"
mount -t tmpfs -o mode=1777 tmpfs "$R/dev/shm"
# the host's /tmp, /run and /var/tmp, before L1's own tmpfs hides them: lab.keep binds from here
for d in tmp run var/tmp; do
    [ -d "$R/$d" ] || continue
    mkdir -p "/hostdirs/$d"
    mount -o bind "$R/$d" "/hostdirs/$d" || fail "bind of the host's /$d failed"
done
mount -t tmpfs -o mode=1777 tmpfs "$R/tmp" || fail "mount tmpfs on /tmp failed"
mount -t tmpfs -o mode=755 tmpfs "$R/run" || fail "mount tmpfs on /run failed"
[ -d "$R/var/tmp" ] && mount -t tmpfs -o mode=1777 tmpfs "$R/var/tmp"
for p in $(echo "$keep" | tr ',' ' '); do
    case "$p" in
    /tmp/*|/run/*|/var/tmp/*) ;;
    *) fail "lab.keep=$p is not under /tmp, /run or /var/tmp" ;;
    esac
    [ -d "/hostdirs$p" ] || fail "lab.keep=$p: no such directory on the host"
    mkdir -p "$R$p"
    mount -o bind "/hostdirs$p" "$R$p" || fail "bind of the host's $p failed"
done
# mkdir: a share under /tmp, /run or /var/tmp needs its mount point in the tmpfs just mounted
[ -d "$R$share" ] || mkdir -p "$R$share"
mount -t 9p -o "$p9,rw" out "$R$share" || fail "mount of the writable share (9p tag out) on $share failed"
[ -r "$R$share/command.sh" ] || fail "no command.sh on the writable share $share"
mkdir -p "$R/tmp/home"
# The lab's own tools (udpseq: the numbered-UDP stream tool) on the chroot's PATH.
mkdir -p "$R/run/lab/bin"
[ -x /usr/bin/udpseq ] && cp /usr/bin/udpseq "$R/run/lab/bin/"
ip link set lo up || fail "ip link set lo up failed"
# Socket wires (udp:, unix:) between a device and its peer, both Python under TCG: let sockets
# ask for big buffers, so a burst waits in a queue instead of being dropped.
echo 8388608 >/proc/sys/net/core/rmem_max
echo 8388608 >/proc/sys/net/core/wmem_max

echo "VDPA-LAB-READY uptime=$(cut -d' ' -f1 /proc/uptime)"
chroot "$R" /usr/bin/env -i \
    PATH=/run/lab/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/tmp/home LANG=C.UTF-8 TMPDIR=/tmp VDPA_LAB_INSIDE=1 VDPA_LAB_SHARE="$share" \
    /bin/sh "$share/command.sh" </dev/null >"$R$share/stdout" 2>"$R$share/stderr"
rc=$?
dmesg >"$R$share/dmesg.txt"
echo "$rc" >"$R$share/rc"
sync
umount "$R$share"
echo "VDPA-LAB-DONE rc=$rc uptime=$(cut -d' ' -f1 /proc/uptime)"
off
