"""What every ``ptmig migrate`` end-to-end test checks, whatever the guest it moves.

Used by test_coordinator.py (the Debian 12 guest) and test_debian13.py; `traffic` also by
test_agent.py and test_orchestrated.py.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import pytest

from host.workflow.model import Outcome, TeamMode, plain
from lab import TEAM_MAC
from lab import coordinated as co
from lab.fabric import CLIENT_NS
from lab.measure import Recorder
from lab.migration import PtmigMigration
from lab.paths import run_dir
from lab.traffic import FixedRatePinger, analyze
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


def measured_move(
    lab: VmLab, dest: str, name: str, *extra: str
) -> tuple[PtmigMigration, dict[str, dict[str, int]]]:
    """``ptmig migrate`` to *dest* (lab.coordinated.migrate) under 1000 pings/s per team;
    the migration and each team's loss per phase of its report, with the total."""
    src = lab.where()
    with Recorder(name, tcp=False) as rec:
        moved = co.migrate(lab, dest, *extra)
        rec.phases += moved.phases
        sample = rec.finish("ptmig", f"{src} -> {dest}", moved.wall_s)
    losses = sample.lost_with_totals()
    print(f"{name}: {moved.report.outcome} {moved.report.phases}\nlost per phase: {losses}")
    return moved, losses


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
        moved, losses = measured_move(lab, dest, f"migrate-{dest}")
        report = moved.report
        record_property(f"report_{src}_{dest}", plain(report))
        record_property(f"lost_{src}_{dest}", losses)
        assert moved.exit_code == 0 and report.outcome is Outcome.DONE, report
        assert report.teams == {"lan": TeamMode.PRIMARY, "wan": TeamMode.PRIMARY}
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
