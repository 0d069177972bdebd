#!/bin/busybox sh
# /init of the vDPA test guest: busybox, virtio-net modules, udpseq, a root shell on the console.
#
# Kernel command line (all optional):
#   vdpa.ip=ADDR/PREFIX[,ADDR/PREFIX...]  IPv4 addresses for eth0, eth1, ... in that order
#   vdpa.peer=ADDR       the peer reached through eth0 (exported as PEER in the shell)
#   vdpa.mtu=N           MTU of every ethN
#   vdpa.nics=N          how many ethN interfaces to wait for (default 1, 0 = none)
#   vdpa.loglevel=N      console log level once booted (default 1, so kernel messages do not
#                        interleave with command output; dmesg still has everything)
# Console protocol: "VDPA-GUEST-ERROR: ..." for anything that went wrong, "VDPA-GUEST-IF ..."
# per interface, then "VDPA-GUEST-READY", then a root shell (prompt "vdpa# ").

/bin/busybox mkdir -p /proc /sys /dev /tmp /run /bin /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts

error() { echo "VDPA-GUEST-ERROR: $*"; }

while read -r mod; do
    [ -n "$mod" ] && { insmod "/lib/modules/$mod.ko" || error "insmod $mod failed"; }
done < /lib/modules/load.order

ips="" peer="" mtu="" nics=1 loglevel=1
for arg in $(cat /proc/cmdline); do
    case "$arg" in
    vdpa.ip=*) ips=${arg#*=} ;;
    vdpa.peer=*) peer=${arg#*=} ;;
    vdpa.mtu=*) mtu=${arg#*=} ;;
    vdpa.nics=*) nics=${arg#*=} ;;
    vdpa.loglevel=*) loglevel=${arg#*=} ;;
    esac
done

# Interfaces appear while virtio_net probes; poll (bounded) until the expected number exists.
tries=0
while [ "$(ls -d /sys/class/net/eth* 2>/dev/null | wc -l)" -lt "$nics" ]; do
    tries=$((tries + 1))
    if [ "$tries" -gt 100 ]; then
        error "expected $nics eth interfaces, have: $(ls /sys/class/net | tr '\n' ' ')"
        break
    fi
    sleep 0.1
done

ip link set lo up
set -- $(echo "$ips" | tr ',' ' ')
for path in /sys/class/net/eth*; do
    [ -e "$path" ] || continue
    dev=${path##*/}
    [ -n "$mtu" ] && { ip link set "$dev" mtu "$mtu" || error "mtu $mtu on $dev"; }
    ip link set "$dev" up || error "link up $dev failed"
    if [ $# -gt 0 ]; then
        ip addr add "$1" dev "$dev" || error "address $1 on $dev failed"
        shift
    fi
done

# Carrier comes from the device's VIRTIO_NET_S_LINK_UP; wait for it (bounded), report, go on.
for path in /sys/class/net/eth*; do
    [ -e "$path" ] || continue
    tries=0
    while [ "$(cat "$path/carrier" 2>/dev/null)" != 1 ] && [ "$tries" -lt 50 ]; do
        tries=$((tries + 1))
        sleep 0.1
    done
    echo "VDPA-GUEST-IF ${path##*/} mac=$(cat "$path/address") carrier=$(cat "$path/carrier" 2>/dev/null)" \
        "txq=$(ls "$path/queues" | grep -c '^tx-') rxq=$(ls "$path/queues" | grep -c '^rx-')" \
        "addr=$(ip -4 -o addr show dev "${path##*/}" | awk '{printf "%s%s", s, $4; s=","}')"
done

cat > /etc/profile <<EOF
export PATH=$PATH
export PEER=$peer
export PS1='vdpa# '
stty cols 4096 2>/dev/null
EOF

dmesg -n "$loglevel"
echo "VDPA-GUEST-CPUS $(nproc) uptime=$(cut -d' ' -f1 /proc/uptime)"
echo "VDPA-GUEST-READY"

# init must never exit (that panics the kernel): respawn the console shell.
while :; do
    setsid cttyhack sh -l
done
