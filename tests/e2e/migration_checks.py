"""What every ``ptmig migrate`` end-to-end test checks, whatever the guest it moves.

Used by test_coordinator.py (the Debian 12 guest) and test_debian13.py; `traffic` also by
test_agent.py and test_orchestrated.py.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from host.workflow.model import Outcome
from lab import GUEST_IP, TEAM_MAC, WAN_GUEST_IP
from lab import coordinated as co
from lab.fabric import CLIENT_NS
from lab.guest import DOMAIN_NAME
from lab.paths import run_dir
from lab.traffic import FixedRatePinger, Phase, analyze
from lab.vmlab import VmLab

OTHER = {"hosta": "hostb", "hostb": "hosta"}
#: Packets at 1000/s (= ms) a team may lose while it moves between members outside the
#: stop-and-copy.  Typically 0-15 here.  Outliers seen on this 2-core machine, where QEMU's
#: TCG vCPUs, the pinger and the coordinator share the cores: 54 ms, and 315 and 411 ms in
#: one switch each (1 run in about 10; cause not found, the bond's peer notification or a
#: descheduled vCPU are suspects).  The bound still fails on what it guards against:
#: net_failover's ~2.5 s outage at bind, or a switch that waits for a link timeout.
MAX_MOVE_LOSS = 500


@contextlib.contextmanager
def traffic(target: str, name: str) -> Iterator[dict[str, float]]:
    """Fixed-rate pings (1000/s) to *target* around the block; yields a dict filled with
    the loss and the longest outage (gap_ms)."""
    result: dict[str, float] = {}
    with FixedRatePinger(
        target, run_dir() / f"{name}.ping", rate=1000, prefix=["ip", "netns", "exec", CLIENT_NS]
    ) as pinger:
        time.sleep(0.5)
        yield result
        time.sleep(1.0)
        record = pinger.stop()
    report = analyze(record)
    gap = report.longest_outage.duration_ns / 1e6 if report.longest_outage else 0.0
    result.update(sent=report.sent, lost=report.lost, gap_ms=round(gap, 1))
    print(f"{name}: {report.format_table()}")


def migrate_cli(lab: VmLab, dest: str, *extra: str) -> tuple[int, dict[str, Any]]:
    src = lab.where()
    proc = co.ptmig(
        lab,
        src,
        "migrate",
        DOMAIN_NAME,
        lab.hosts[dest].uri,
        "--json",
        "--peer-uri",
        lab.hosts[dest].tcp_uri,
        "--unsafe",
        *extra,
        check=False,
    )
    assert proc.stdout, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def pingers(name: str) -> list[FixedRatePinger]:
    return [
        FixedRatePinger(
            ip,
            run_dir() / f"{name}-{team}.ping",
            rate=1000,
            prefix=["ip", "netns", "exec", CLIENT_NS],
        )
        for team, ip in (("lan", GUEST_IP), ("wan", WAN_GUEST_IP))
    ]


def phase_loss(pinger: FixedRatePinger, report: dict[str, Any]) -> dict[str, int]:
    record = pinger.stop()
    phases = [
        Phase(p["name"], p["started_at"], p["started_at"] + p["seconds"]) for p in report["phases"]
    ]
    traffic = analyze(record, phases)
    return {p.name: p.lost for p in traffic.phases} | {"total": traffic.lost}


def guest_mac(lab: VmLab, ifname: str) -> str:
    return lab.exec(f"cat /sys/class/net/{ifname}/address").check().strip()


def active_slave(lab: VmLab, bond: str) -> str:
    return lab.exec(f"cat /sys/class/net/{bond}/bonding/active_slave").check().strip()


def there_and_back(lab: VmLab, record_property: pytest.RecordProperty) -> None:
    """``ptmig migrate`` hosta -> hostb -> hosta under 1000 pings/s per team: each move ends
    done with both teams on the destination's own devices and MACs as their policies say."""
    for dest in ("hostb", "hosta"):
        src = lab.where()
        source_taps = {tap for tap, _ in co.POOL_SLOTS[src]}
        ps = pingers(f"migrate-{dest}")
        for p in ps:
            p.start()
        time.sleep(1)
        code, report = migrate_cli(lab, dest)
        time.sleep(1.5)
        losses = {team: phase_loss(p, report) for team, p in zip(("lan", "wan"), ps, strict=True)}
        print(f"{src} -> {dest}: {report['phases']}\nlost per phase: {losses}")
        record_property(f"report_{src}_{dest}", report)
        record_property(f"lost_{src}_{dest}", losses)
        assert code == 0 and report["outcome"] == str(Outcome.DONE), report
        assert report["teams"] == {"lan": "primary", "wan": "primary"}
        assert lab.where() == dest
        lab.check_health()
        # the destination's definitions name its own devices, never the source's
        for flags in (0, 1):  # live, inactive (VIR_DOMAIN_XML_INACTIVE)
            xml = lab.domain(dest).XMLDesc(flags)
            assert not any(
                f"dev='{tap}'" in xml
                for tap in source_taps - {tap for tap, _ in co.POOL_SLOTS[dest]}
            ), "source device named on destination"
        # preserve: lan's new primary carries the team MAC; follow: wan's bond took the
        # new primary's own (per-host) MAC
        lan_active, wan_active = active_slave(lab, "bond0"), active_slave(lab, "bond1")
        assert guest_mac(lab, lan_active) == TEAM_MAC
        dest_macs = {mac for _, mac in co.POOL_SLOTS[dest]}
        assert guest_mac(lab, "bond1") == guest_mac(lab, wan_active)
        assert guest_mac(lab, wan_active) in dest_macs
        for team in ("lan", "wan"):
            for phase in ("preflight", "switch", "unplug", "bind", "other"):
                assert losses[team].get(phase, 0) <= MAX_MOVE_LOSS, (team, phase, losses)
