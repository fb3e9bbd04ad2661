"""Per-domain loss and time on standby of one host evacuation (``ptmig evacuate --json``,
read back as the product's EvacuationReport).

Each domain's own migration report gives its phases (epoch seconds, on the coordinator's
clock); each team's ping record gives its losses.  A team is on its virtio standby from
the end of its ``switch`` to the end of its ``bind`` (the report's phases), and its longest
outage (the VM's stop-and-copy) must begin while it is off its primary, between the start
of its switch and the end of its bind: that is the cross-check of the report against the
traffic (a loss the report cannot place is counted apart, as lost
outside the domain's own migration: a neighbour's migration starving this one, say).

Beside the packets lost, each team's connectivity gap as users measure it: the longest
time from the last echo reply before a loss to the first after it, at 100 ms pings
(lab.traffic.analysis.connectivity_gaps, on every 100th request of the 1000/s record).

The same per-team figures serve the plain-libvirt drain (lab.bench_evacuate), whose
phases come from the lab's own marks instead of a ptmig report (:func:`team_traffic`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from host.workflow.model import DomainEvacuation, EvacuationReport
from lab.migration import report_phases
from lab.traffic.analysis import Phase, analyze, connectivity_gaps
from lab.traffic.record import PingRecord

#: Slack (s) around a domain's own window before a loss counts as outside it: the phases
#: are on the coordinator's clock and the records on the sender's (the same machine here),
#: and a reply lost to the last request of a phase is judged by its send time.
WINDOW_SLACK_S = 0.25


@dataclass(frozen=True)
class StandbyWindow:
    """When a domain's teams ran on their standbys, per its report (epoch seconds)."""

    start: float  # end of switch (or start of unplug when no switch was needed)
    end: float | None  # end of bind; None when the domain never got to bind (rolled back...)
    #: Start of switch: from here the team is leaving its primary (a switch's own glitch).
    leaving: float = 0.0

    @property
    def seconds(self) -> float | None:
        return None if self.end is None else round(self.end - self.start, 3)


@dataclass(frozen=True)
class DomainTraffic:
    """One team's traffic through its domain's migration in an evacuation."""

    domain: str
    team: str
    target: str
    outcome: str
    sent: int
    lost: int
    lost_by_phase: dict[str, int]
    longest_outage_ms: float
    #: The window of the domain's own migration: first phase start to last phase end.
    migration_start: float | None
    migration_end: float | None
    standby_s: float | None
    #: Lost packets sent outside [migration_start, migration_end] (+- WINDOW_SLACK_S).
    lost_outside_migration: int
    #: The cross-check: the longest outage began while the team was off its primary, from
    #: the start of its switch to the end of its bind (None when there was no outage or
    #: no such window to check against).
    outage_on_standby: bool | None
    #: At 100 ms pings: the longest gap (last reply before a loss to the first after), ms,
    #: the number of gaps and the pings lost (0.0, 0, 0 without a loss).
    gap_ms: float = 0.0
    gaps: int = 0
    lost_at_100ms: int = 0
    phases: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def standby_window(phases: Sequence[Phase]) -> StandbyWindow | None:
    """From the end of switch to the end of bind; None if the teams never left their
    primaries (no switch or unplug among the phases)."""
    by_name = {p.name: p for p in phases}
    if "switch" in by_name:
        start, leaving = by_name["switch"].end, by_name["switch"].start
    elif "unplug" in by_name:
        start = leaving = by_name["unplug"].start
    else:
        return None
    bind = by_name.get("bind")
    return StandbyWindow(start, bind.end if bind is not None else None, leaving)


def domain_traffic(entry: DomainEvacuation, team: str, record: PingRecord) -> DomainTraffic:
    """*team*'s loss through the migration of *entry* (one domain of the evacuation)."""
    return team_traffic(entry.domain, team, str(entry.outcome), report_phases(entry.report), record)


def team_traffic(
    domain: str, team: str, outcome: str, phases: Sequence[Phase], record: PingRecord
) -> DomainTraffic:
    """*team*'s loss through its domain's move, whose *phases* are on the epoch clock."""
    traffic = analyze(record, phases)
    window = standby_window(phases)
    start = min((p.start for p in phases), default=None)
    end = max((p.end for p in phases), default=None)
    outside = 0
    for o in traffic.outages:
        t = o.start_ns / 1e9
        if (
            start is None
            or end is None
            or not (start - WINDOW_SLACK_S <= t <= end + WINDOW_SLACK_S)
        ):
            outside += o.lost
    on_standby: bool | None = None
    longest = traffic.longest_outage
    if longest is not None and window is not None:
        t = longest.start_ns / 1e9
        stop = window.end if window.end is not None else float("inf")
        on_standby = window.leaving - WINDOW_SLACK_S <= t <= stop + WINDOW_SLACK_S
    gaps = connectivity_gaps(record)
    return DomainTraffic(
        domain=domain,
        team=team,
        target=record.target,
        outcome=outcome,
        sent=traffic.sent,
        lost=traffic.lost,
        lost_by_phase={p.name: p.lost for p in traffic.phases if p.lost},
        longest_outage_ms=0.0 if longest is None else round(longest.duration_ns / 1e6, 1),
        migration_start=start,
        migration_end=end,
        standby_s=None if window is None else window.seconds,
        lost_outside_migration=outside,
        outage_on_standby=on_standby,
        gap_ms=round(max((g.duration_ns for g in gaps), default=0) / 1e6, 1),
        gaps=len(gaps),
        lost_at_100ms=sum(g.lost for g in gaps),
        phases=[{"name": p.name, "start": p.start, "end": p.end} for p in phases],
    )


def evacuation_traffic(
    result: EvacuationReport, records: Mapping[tuple[str, str], PingRecord]
) -> list[DomainTraffic]:
    """Every pinged team of every domain in *result* (``evacuate --json`` read back);
    *records* by (domain, team).  A domain with no record is left out; a record with no
    domain in the result is an error (it was pinged, so it was expected to be evacuated)."""
    entries = {d.domain: d for d in result.domains}
    missing = sorted({dom for dom, _ in records} - set(entries))
    if missing:
        raise ValueError(f"pinged but not in the evacuation's result: {missing}")
    return [
        domain_traffic(entries[dom], team, record)
        for (dom, team), record in sorted(records.items())
    ]


def format_table(rows: Sequence[DomainTraffic]) -> list[str]:
    """One line per team: outcome, loss, longest outage, time on standby, the users' gap."""
    lines = [
        f"{'domain':20} {'team':5} {'outcome':14} {'lost':>6} {'outage_ms':>10} "
        f"{'standby_s':>9} {'outside':>7} {'gap_ms':>7} on-standby"
    ]
    for r in rows:
        standby = "-" if r.standby_s is None else f"{r.standby_s:.1f}"
        lines.append(
            f"{r.domain:20} {r.team:5} {r.outcome:14} {r.lost:>6} {r.longest_outage_ms:>10.1f} "
            f"{standby:>9} {r.lost_outside_migration:>7} {r.gap_ms:>7.0f} {r.outage_on_standby}"
        )
    return lines
