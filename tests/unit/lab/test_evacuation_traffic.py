"""Per-domain loss and standby time of an evacuation, from its JSON and ping records."""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from host.workflow.model import (
    DomainEvacuation,
    EvacuationOutcome,
    EvacuationReport,
    MigrationReport,
    Outcome,
    PhaseTiming,
    TeamMode,
)
from lab.traffic import Phase
from lab.traffic.evacuation import evacuation_traffic, format_table, standby_window
from lab.traffic.record import PingRecord

T0 = 1_700_000_000 * 10**9
MS = 10**6


def record(n: int, lost: Iterable[int] = ()) -> PingRecord:
    """n requests at 1000/s from T0; those in ``lost`` unanswered."""
    send = [T0 + i * MS for i in range(n)]
    gone = set(lost)
    recv: list[int | None] = [None if i in gone else s + 100_000 for i, s in enumerate(send)]
    stop = send[-1] + MS
    return PingRecord("192.168.77.11", 1000.0, 56, 1, 1, T0, send, recv, {}, 0, stop, stop + 10**9)


def at(ms: float) -> float:
    return (T0 + ms * MS) / 1e9


def entry(domain: str, outcome: str, phases: list[tuple[str, float, float]]) -> DomainEvacuation:
    """One domain of an evacuation: phases as (name, start ms, seconds)."""
    report = MigrationReport(
        "w",
        domain,
        "a",
        "b",
        Outcome(outcome),
        phases=[PhaseTiming(n, secs, started_at=at(s)) for n, s, secs in phases],
        teams={"lan": TeamMode.PRIMARY},
    )
    return DomainEvacuation(
        domain, "u", "b", EvacuationOutcome(outcome), report=report if phases else None
    )


def evacuated(*entries: DomainEvacuation) -> EvacuationReport:
    return EvacuationReport("a", 1, 10.0, list(entries))


PHASES = [
    ("preflight", 1000, 0.5),
    ("switch", 1500, 0.5),  # standby from 2000 ms
    ("unplug", 2000, 1.0),
    ("migrate", 3000, 2.0),
    ("bind", 5000, 1.5),  # back on primary at 6500 ms
]


def test_standby_window_runs_from_switch_end_to_bind_end() -> None:
    window = standby_window([Phase(n, at(s), at(s) + secs) for n, s, secs in PHASES])
    assert window is not None
    assert window.start == pytest.approx(at(2000))
    assert window.seconds == pytest.approx(4.5)


def test_loss_during_own_migrate_is_on_standby_and_inside() -> None:
    result = evacuated(entry("g2", "done", PHASES))
    (t,) = evacuation_traffic(result, {("g2", "lan"): record(8000, range(4000, 4150))})
    assert (t.domain, t.team, t.outcome) == ("g2", "lan", "done")
    assert t.lost == 150 and t.lost_by_phase == {"migrate": 150}
    assert t.standby_s == pytest.approx(4.5)
    assert t.outage_on_standby is True
    assert t.lost_outside_migration == 0
    assert t.longest_outage_ms == pytest.approx(151.0)


def test_loss_outside_the_domains_migration_is_counted_apart() -> None:
    """A team that loses packets before its own domain's migration began (a neighbour's
    migration starving it) is flagged, and its longest outage is not on standby."""
    result = evacuated(entry("g2", "done", PHASES))
    (t,) = evacuation_traffic(result, {("g2", "lan"): record(8000, range(200, 700))})
    assert t.lost == 500 and t.lost_outside_migration == 500
    assert t.outage_on_standby is False
    assert t.lost_by_phase == {"other": 500}


def test_refused_domain_has_no_window_and_all_its_loss_is_outside() -> None:
    result = evacuated(entry("g3", "refused", []))
    (t,) = evacuation_traffic(result, {("g3", "lan"): record(3000, [10])})
    assert t.standby_s is None and t.outage_on_standby is None
    assert t.lost_outside_migration == 1 and t.migration_start is None


def test_rolled_back_domain_has_an_open_window() -> None:
    phases = [("preflight", 1000, 0.5), ("switch", 1500, 0.5), ("unplug", 2000, 1.0)]
    result = evacuated(entry("g2", "rolled-back", phases))
    (t,) = evacuation_traffic(result, {("g2", "lan"): record(5000, range(2500, 2510))})
    assert t.standby_s is None
    assert t.outage_on_standby is True  # after switch, never bound again


def test_a_pinged_domain_missing_from_the_result_is_an_error() -> None:
    with pytest.raises(ValueError, match="g9"):
        evacuation_traffic(evacuated(), {("g9", "lan"): record(10)})


def test_table_has_a_line_per_team() -> None:
    result = evacuated(entry("a", "done", PHASES), entry("b", "refused", []))
    rows = evacuation_traffic(result, {("a", "lan"): record(8000), ("b", "lan"): record(8000)})
    lines = format_table(rows)
    assert len(lines) == 3 and lines[1].split()[:3] == ["a", "lan", "done"]
    assert lines[2].split()[5] == "-"  # no standby time for a refused domain
