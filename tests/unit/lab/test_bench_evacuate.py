"""bench-evacuate's verdict on ptmig's wall against the plain-libvirt drain's, and the
plain drain's per-team figures from the lab's own phase marks."""

from __future__ import annotations

from host.workflow.model import EvacuationReport
from lab.bench_evacuate import DRAIN_GOAL, EvacuationRun, PlainDrainRun, judge_drain
from lab.migration import log_lines
from lab.traffic import Phase
from lab.traffic.evacuation import team_traffic
from lab.traffic.record import PingRecord

T0 = 1_700_000_000 * 10**9
MS = 10**6


def ptmig_run(wall: float, parallel: int = 3) -> EvacuationRun:
    return EvacuationRun(
        "hosta", "hostb", parallel, 0, EvacuationReport("a", parallel, wall, []), [], ""
    )


def drain_run(wall: float, parallel: int = 3) -> PlainDrainRun:
    return PlainDrainRun("hostb", "hosta", parallel, wall, [], [])


def test_goal_met_within_the_factor() -> None:
    verdict = judge_drain([ptmig_run(11.0), drain_run(10.0), ptmig_run(13.0), drain_run(10.0)], 3)
    assert verdict["met"] is True
    assert verdict["ratio"] == 1.2  # medians 12.0 / 10.0
    assert verdict["goal"] == f"<= {DRAIN_GOAL}x"


def test_goal_not_met_beyond_it() -> None:
    verdict = judge_drain([ptmig_run(22.0), drain_run(9.5)], 3)
    assert verdict["met"] is False
    assert verdict["measured"] == "22.00 / 9.50 s = 2.32x"


def test_other_parallelism_and_missing_runs_are_not_judged() -> None:
    assert judge_drain([ptmig_run(60.0, parallel=1), drain_run(9.0)], 3)["met"] is None
    assert judge_drain([ptmig_run(20.0)], 3)["met"] is None


def test_plain_drain_team_traffic_has_no_standby_end_and_a_gap() -> None:
    send = [T0 + i * MS for i in range(5000)]
    lost = set(range(1950, 2460))  # 510 ms from 1.95 s, inside the migrate mark
    recv = [None if i in lost else s + 200_000 for i, s in enumerate(send)]
    stop = send[-1] + MS
    record = PingRecord("10.0.0.1", 1000.0, 56, 1, 1, T0, send, recv, {}, 0, stop, stop + 10**9)

    def at(ms: int) -> float:
        return (T0 + ms * MS) / 1e9

    phases = [
        Phase("unplug", at(1000), at(1500)),
        Phase("migrate", at(1500), at(3000)),
        Phase("plug", at(3000), at(3200)),
    ]
    t = team_traffic("g", "lan", "done", phases, record)
    assert (t.lost, t.lost_by_phase, t.standby_s) == (510, {"migrate": 510}, None)
    assert t.outage_on_standby is True  # from the unplug on, the team is off its primary
    assert t.lost_outside_migration == 0
    # the user's pings 2000..2400 lost: from the reply to 1900 to the reply to 2500
    assert (t.gaps, t.lost_at_100ms, t.gap_ms) == (1, 5, 600.0)


def test_ptmig_verbose_log_lines() -> None:
    text = (
        "2026-12-05 22:28:43,123 host.workflow.preflight: preflight: agent answered\n"
        "not a record\n"
        "2026-12-05 22:28:44,009 host.workflow.lease: lease write took over 0.25 s\n"
    )
    lines = log_lines(text)
    assert [m for _t, m in lines] == [
        "host.workflow.preflight: preflight: agent answered",
        "host.workflow.lease: lease write took over 0.25 s",
    ]
    assert round(lines[1][0] - lines[0][0], 3) == 0.886
