"""L2, the guest the nested lab migrates: the lab guest image with an init of our own.

systemd is what made a nested boot take 8-16 minutes (udev's coldplug alone about four,
and its 90 s start timeouts fire under nested TCG), so L2's PID 1 is this script.  It does
what the image's own systemd-networkd configuration does (:mod:`lab.image`): bond0
(active-backup, miimon 100 ms, the team's fixed MAC) with the virtio standby found by its
permanent MAC and the LAN address, the WAN address on bond1 once the agent has made it,
then the agent and a root shell on the console.  Without udev nothing loads drivers for
hot-plugged devices, so the passthrough drivers (igbvf, e1000e) are loaded up front, and the
agent's /dev/virtio-ports link is made here.
"""

from __future__ import annotations

from lab import GUEST_IP, GUEST_PREFIX, STANDBY_MAC, TEAM_MAC, WAN_GUEST_IP
from lab.image import SHELL_READY_MARKER

#: Loaded at boot: with no udev nothing would load them for a hot-plugged device.
L2_MODULES = ("virtio_net", "virtio_console", "bonding", "e1000e", "igbvf", "vsock_loopback")


def l2_init(agent_config: str) -> str:
    """PID 1 of L2; *agent_config* is written to /etc/ptmig/agent.toml before the agent starts."""
    return f"""#!/bin/bash
# ptmig nested lab: L2 init (lab/nested/guest.py)
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm /run/ptmig
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mkdir -p /run/ptmig
hostname ptmig-guest
ip link set lo up
echo "ptmig-l2-init: modules at $(cut -d' ' -f1 /proc/uptime)" >/dev/ttyS0
modprobe -a {" ".join(L2_MODULES)}
for _ in $(seq 100); do
  ls /sys/class/virtio-ports/ 2>/dev/null | grep -q vport && break; sleep 0.1
done
mkdir -p /dev/virtio-ports
for p in /sys/class/virtio-ports/vport*; do
  [ -e "$p/name" ] && ln -sf "../${{p##*/}}" "/dev/virtio-ports/$(cat "$p/name")"
done
standby=
for _ in $(seq 100); do
  for n in /sys/class/net/*; do
    [ "$(cat "$n/address" 2>/dev/null)" = "{STANDBY_MAC}" ] && standby=${{n##*/}}
  done
  [ -n "$standby" ] && break; sleep 0.1
done
ip link add bond0 type bond mode active-backup miimon 100 fail_over_mac none
ip link set bond0 address {TEAM_MAC}
ip link set "$standby" down
ip link set "$standby" master bond0
ip link set bond0 up
ip addr add {GUEST_IP}/{GUEST_PREFIX} dev bond0
mkdir -p /etc/ptmig
cat > /etc/ptmig/agent.toml <<'PTMIG_AGENT_EOF'
{agent_config}PTMIG_AGENT_EOF
echo "ptmig-l2-init: agent at $(cut -d' ' -f1 /proc/uptime)" >/dev/ttyS0
( while true; do
    /usr/sbin/ptmig-agent --config /etc/ptmig/agent.toml >>/run/ptmig-agent.log 2>&1; sleep 2
  done ) &
# networkd's 30-bond1.network: the address goes on bond1 whenever the agent (re)makes it.
( while true; do
    if [ -e /sys/class/net/bond1 ] && ! ip -4 addr show dev bond1 | grep -q inet; then
      ip link set bond1 up; ip addr add {WAN_GUEST_IP}/{GUEST_PREFIX} dev bond1
    fi
    sleep 1
  done ) &
echo "set enable-bracketed-paste off" > /run/ptmig-inputrc
while true; do
  INPUTRC=/run/ptmig-inputrc setsid -c /bin/bash --norc --noprofile -c \\
    'stty -echo -onlcr cols 4000; export PS1=; dmesg -n 1; \\
     echo "{SHELL_READY_MARKER} $(cut -d" " -f1 /proc/uptime)"; \\
     exec /bin/bash --norc --noprofile -i' \\
    <>/dev/ttyS0 >&0 2>&1
done
"""
