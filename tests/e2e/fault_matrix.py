"""The fault matrix's rows, filled by test_fault_matrix.py (and test_evacuation.py) and
printed by conftest.py, and the checks every case ends with (:func:`assert_converged`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import libvirt

from host.domain.domain_xml import parse_domain
from host.workflow.coordinator import Coordinator
from host.workflow.journal import Journal
from lab import GUEST_IP, WAN_GUEST_IP
from lab import coordinated as co
from lab.fabric import CLIENT_NS, HOSTS
from lab.guest import DOMAIN_NAME
from lab.run import run
from lab.vmlab import VmLab


@dataclass
class Row:
    case: str
    result: str
    lost: dict[str, int]


ROWS: list[Row] = []


def table() -> list[str]:
    """One line per case; lost packets of the main guest's lan/wan, then of any other
    guest's teams the case pinged (an evacuation's)."""
    lines = [f"{'case':44} {'result':42} lost lan/wan (packets at 1000/s)"]
    for r in ROWS:
        others = ", ".join(f"{k} {v}" for k, v in r.lost.items() if k not in ("lan", "wan"))
        line = f"{r.case:44} {r.result:42} {r.lost.get('lan', '?')}/{r.lost.get('wan', '?')}"
        lines.append(f"{line}; {others}" if others else line)
    return lines


# -- the checks every case ends with ---------------------------------------------------


def _pool_taps(lab: VmLab) -> set[str]:
    """Every pool slot's tap on either host (the extra guests' slots with them)."""
    return {tap for slots in co.pool_slots(lab.extra_guests()).values() for tap, _ in slots}


def open_workflows() -> list[Any]:
    with Journal(co.journal_path()) as journal:
        return journal.open_workflows()


def domain_xmls(lab: VmLab, host: str) -> list[tuple[str, str | None]]:
    """(live XML, persistent XML or None) of every running domain on *host*."""
    out = []
    for dom in lab.conn(host).listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
        inactive = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) if dom.isPersistent() else None
        out.append((dom.XMLDesc(0), inactive))
    return out


def assert_no_mac_on_two_hosts(lab: VmLab) -> None:
    seen: dict[str, str] = {}
    for host in lab.hosts:
        for live, _ in domain_xmls(lab, host):
            for nic in parse_domain(live).interfaces:
                assert nic.mac is not None
                other = seen.setdefault(nic.mac, host)
                assert other == host, f"{nic.mac} on {other} and {host}"


def assert_devices_accounted_for(lab: VmLab, host: str) -> None:
    """Each pool device a domain holds is a team's recorded primary, live and persistent."""
    pool_taps = _pool_taps(lab)
    for live, persistent in domain_xmls(lab, host):
        info = parse_domain(live)
        assert info.teams is not None
        recorded = {t.primary.tap for t in info.teams.teams if t.primary is not None}
        held = {n.target_dev for n in info.interfaces if n.target_dev in pool_taps}
        assert held == recorded, f"live {info.name} holds {held}, its teams name {recorded}"
        if persistent is not None:
            defined = {
                n.target_dev
                for n in parse_domain(persistent).interfaces
                if n.target_dev in pool_taps
            }
            assert defined == recorded, f"{info.name}'s definition: {defined}, teams {recorded}"


def assert_no_orphan_taps(lab: VmLab) -> None:
    """A pool's tap exists on a host only while a running domain there holds it."""
    pool_taps = _pool_taps(lab)
    for net in HOSTS:
        out = run(["ip", "-n", net.netns, "-o", "link", "show"], capture=True)
        present = {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}
        held = {
            n.target_dev
            for live, _ in domain_xmls(lab, net.name)
            for n in parse_domain(live).interfaces
        }
        assert (present & pool_taps) <= held, (
            f"{net.name}: taps held by no one: {(present & pool_taps) - held}"
        )


def assert_reachable(lab: VmLab, name: str = DOMAIN_NAME) -> None:
    """The client reaches every team's address of guest *name*."""
    ips = (
        (GUEST_IP, WAN_GUEST_IP)
        if name == DOMAIN_NAME
        else tuple(g.ip for g in lab.extra_guests() if g.name == name)
    )
    assert ips, f"no addresses known for {name}"
    for ip in ips:
        run(["ip", "netns", "exec", CLIENT_NS, "ping", "-c", "3", "-i", "0.2", "-W", "2", ip])


def teams_on(lab: VmLab, name: str = DOMAIN_NAME) -> dict[str, str]:
    status = co.ptmig_json(lab, lab.where(name), "status", name)
    return {t["name"]: t["mode"] for t in status["teams"]}


def assert_converged(lab: VmLab, name: str = DOMAIN_NAME) -> str:
    """The checks every case ends with, for guest *name* (default the main one); returns
    how the teams ended ("primary", or "degraded->repaired" when the reconciler's pass had
    to plug devices)."""
    where = lab.where(name)  # exactly one host runs it
    assert open_workflows() == []
    assert_no_mac_on_two_hosts(lab)
    on = teams_on(lab, name)
    ended = "primary"
    if set(on.values()) != {"primary"}:
        ended = "/".join(sorted(set(on.values()))) + "->repaired"
        with Journal(co.journal_path()) as journal:
            repaired = Coordinator(journal).reconcile(lab.hosts[where].uri)
        assert repaired and all(not r.error for r in repaired), repaired
        on = teams_on(lab, name)
    assert set(on.values()) == {"primary"}, on
    assert open_workflows() == []
    assert_devices_accounted_for(lab, where)
    assert_no_orphan_taps(lab)
    assert_reachable(lab, name)
    lab.check_health(name)
    return ended
