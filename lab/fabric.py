"""The lab's network: namespaces, bridges and veths, made with iproute2.

::

   ptmig-hosta                     ptmig-sw                      ptmig-hostb
   br-g <- guest taps              br-sw                         br-g <- guest taps
   up0 (port of br-g) ==veth== swa (br-sw)  swb (br-sw) ==veth== up0 (port of br-g)
                                   swc (br-sw) ==veth== ptmig-client: cl0 192.168.77.2/24
                                                                         192.168.78.2/24
   mig0 192.0.2.1/24 ============================================ mig0 192.0.2.2/24

Both hosts name their guest bridge ``br-g`` so one domain XML works on either side, and
the switch keeps the guest's LAN one L2 segment wherever the guest runs.  ``mig0`` carries
libvirt's TCP connections and the migration stream.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from lab import CLIENT_IP, GUEST_PREFIX, WAN_CLIENT_IP
from lab.run import CommandError, run

log = logging.getLogger(__name__)

NETNS_PREFIX = "ptmig-"
SWITCH_NS = "ptmig-sw"
CLIENT_NS = "ptmig-client"
GUEST_BRIDGE = "br-g"
MIGRATION_PREFIX = 24


@dataclass(frozen=True)
class HostNet:
    """One lab host's place in the fabric."""

    name: str  # "hosta"
    netns: str  # "ptmig-hosta"
    migration_ip: str  # on mig0
    switch_port: str  # its uplink's peer on br-sw


HOSTS = (
    HostNet("hosta", "ptmig-hosta", "192.0.2.1", "swa"),
    HostNet("hostb", "ptmig-hostb", "192.0.2.2", "swb"),
)


def all_netns() -> list[str]:
    return [h.netns for h in HOSTS] + [SWITCH_NS, CLIENT_NS]


def existing_netns() -> set[str]:
    out = run(["ip", "netns", "list"], capture=True)
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _ip(netns: str, *args: str) -> None:
    run(["ip", "-n", netns, *args])


def _bridge(netns: str, name: str) -> None:
    _ip(netns, "link", "add", name, "type", "bridge", "stp_state", "0", "forward_delay", "0")
    _ip(netns, "link", "set", name, "up")


def create() -> list[str]:
    """Build the fabric; returns the namespaces it made (``down`` deletes exactly those)."""
    clash = existing_netns() & set(all_netns())
    if clash:
        raise RuntimeError(
            f"network namespaces {sorted(clash)} exist already: run 'ptmig-lab down' first"
        )
    made: list[str] = []
    try:
        for ns in all_netns():
            run(["ip", "netns", "add", ns])
            made.append(ns)
            _ip(ns, "link", "set", "lo", "up")
        _bridge(SWITCH_NS, "br-sw")
        for host in HOSTS:
            _bridge(host.netns, GUEST_BRIDGE)
            run(
                [
                    "ip",
                    "link",
                    "add",
                    "up0",
                    "netns",
                    host.netns,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    host.switch_port,
                    "netns",
                    SWITCH_NS,
                ]
            )
            _ip(host.netns, "link", "set", "up0", "master", GUEST_BRIDGE, "up")
            _ip(SWITCH_NS, "link", "set", host.switch_port, "master", "br-sw", "up")
        a, b = HOSTS
        run(
            [
                "ip",
                "link",
                "add",
                "mig0",
                "netns",
                a.netns,
                "type",
                "veth",
                "peer",
                "name",
                "mig0",
                "netns",
                b.netns,
            ]
        )
        for host in HOSTS:
            _ip(host.netns, "addr", "add", f"{host.migration_ip}/{MIGRATION_PREFIX}", "dev", "mig0")
            _ip(host.netns, "link", "set", "mig0", "up")
        run(
            [
                "ip",
                "link",
                "add",
                "cl0",
                "netns",
                CLIENT_NS,
                "type",
                "veth",
                "peer",
                "name",
                "swc",
                "netns",
                SWITCH_NS,
            ]
        )
        _ip(SWITCH_NS, "link", "set", "swc", "master", "br-sw", "up")
        for ip in (CLIENT_IP, WAN_CLIENT_IP):
            _ip(CLIENT_NS, "addr", "add", f"{ip}/{GUEST_PREFIX}", "dev", "cl0")
        _ip(CLIENT_NS, "link", "set", "cl0", "up")
    except Exception:
        delete(made)
        raise
    log.info("fabric up: %s", ", ".join(made))
    return made


def delete(namespaces: list[str]) -> None:
    """Delete *namespaces*; their bridges, veths and taps go with them."""
    present = existing_netns()
    for ns in namespaces:
        if ns not in present:
            continue
        try:
            run(["ip", "netns", "del", ns])
        except CommandError as exc:
            log.warning("could not delete netns %s: %s", ns, exc)


def drop_counters(ip_s_json: str, where: str) -> dict[str, int]:
    """Every nonzero rx/tx drop counter in ``ip -s -j link``'s output, keyed
    ``where:link:rx|tx``: where frames died, when pings were lost with nothing to explain it."""
    out = {}
    for link in json.loads(ip_s_json):
        stats = link.get("stats64") or link.get("stats") or {}
        for way in ("rx", "tx"):
            dropped = int(stats.get(way, {}).get("dropped", 0))
            if dropped:
                out[f"{where}:{link['ifname']}:{way}"] = dropped
    return out


def fabric_drops() -> dict[str, int]:
    """:func:`drop_counters` of every lab namespace's links."""
    out: dict[str, int] = {}
    for netns in sorted(existing_netns() & set(all_netns())):
        out |= drop_counters(run(["ip", "-n", netns, "-s", "-j", "link"], capture=True), netns)
    return out


def pids_in(netns: str) -> list[int]:
    """Processes still running in *netns* (``ip netns pids``)."""
    try:
        out = run(["ip", "netns", "pids", netns], capture=True)
    except CommandError:
        return []
    return [int(p) for p in out.split()]
