"""``Coordinator.evacuate`` and ``ptmig evacuate`` over the in-memory world: placement by
free pool devices and spread, failures that stay one domain's, the parallel bound,
Ctrl-C, domains without teams, the JSON form and the exit codes."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from workflow_fakes import VM1, VM2, A, B, C, GuestSpec, World, numbered_guest

from host import cli
from host.commandline import commands, live
from host.workflow import inventory
from host.workflow.coordinator import Coordinator
from host.workflow.evacuation import Candidate, NoTarget, place
from host.workflow.journal import Journal
from host.workflow.model import (
    MAX_PARALLEL_MIGRATIONS,
    DomainEvacuation,
    EvacuationEvent,
    EvacuationOutcome,
    EvacuationReport,
    EvacuationRequest,
    EvacuationTarget,
    InvalidEvacuation,
)

TO_B_C = (EvacuationTarget(B), EvacuationTarget(C))
UNTIED = GuestSpec("plain1", "6f1c4f0e-2d2b-4a8e-9d0c-1b2a3c4d5e99", ())


@pytest.fixture
def world() -> World:
    return World((VM1, VM2), hosts=(A, B, C))


@pytest.fixture
def coordinator(world: World, journal: Journal) -> Coordinator:
    return world.coordinator(journal)


def evacuate(coordinator: Coordinator, **kw: object) -> EvacuationReport:
    return coordinator.evacuate(EvacuationRequest(A, kw.pop("targets", TO_B_C), **kw))  # type: ignore[arg-type]


def by_name(report: EvacuationReport) -> dict[str, DomainEvacuation]:
    return {d.domain: d for d in report.domains}


# -- placement ------------------------------------------------------------------------


def test_domains_spread_over_targets_with_free_devices(
    world: World, coordinator: Coordinator
) -> None:
    report = evacuate(coordinator)
    got = by_name(report)
    assert {n: (d.destination_uri, d.outcome) for n, d in got.items()} == {
        "vm1": (B, EvacuationOutcome.DONE),
        "vm2": (C, EvacuationOutcome.DONE),
    }
    assert world.running_on("vm1") == [B] and world.running_on("vm2") == [C]
    assert world.modes("vm1") == {"lan": "primary", "wan": "primary"}
    assert got["vm1"].report is not None and got["vm1"].report.outcome == "done"


def test_a_target_short_of_devices_is_passed_over(world: World, coordinator: Coordinator) -> None:
    world.set_slots(B, 1)  # vm1 has two teams: only C takes it whole
    got = by_name(evacuate(coordinator))
    assert got["vm1"].destination_uri == C and got["vm1"].outcome == EvacuationOutcome.DONE
    assert got["vm2"].destination_uri == B and got["vm2"].outcome == EvacuationOutcome.DONE


def test_devices_placed_by_this_evacuation_count_as_taken(
    world: World, coordinator: Coordinator
) -> None:
    world.set_slots(B, 2)
    world.set_slots(C, None)  # no pool on C at all
    got = by_name(evacuate(coordinator))
    # vm1 takes both of B's devices; vm2 finds none free, and goes where its pool is.
    assert got["vm1"].destination_uri == B and got["vm1"].outcome == EvacuationOutcome.DONE
    assert got["vm2"].destination_uri == B
    assert got["vm2"].outcome == EvacuationOutcome.DONE_DEGRADED
    assert world.modes("vm2") == {"lan": "standby"}


def test_a_pool_no_target_defines_is_refused_by_preflight(
    world: World, coordinator: Coordinator
) -> None:
    world.set_slots(B, None)
    world.set_slots(C, None)
    got = by_name(evacuate(coordinator))
    assert {d.outcome for d in got.values()} == {EvacuationOutcome.REFUSED}
    assert "no pool lab" in got["vm1"].error
    assert world.running_on("vm1") == [A] and world.running_on("vm2") == [A]


def test_a_domain_no_target_takes_whole_goes_where_most_teams_fit() -> None:
    vm = Candidate("vm", "u", ("lan", "wan", "lan"))
    targets = (EvacuationTarget(B), EvacuationTarget(C))
    (p,) = place([vm], targets, {B: {"lan": 1, "wan": 1}, C: {"lan": 2}}, False)
    assert p.target == EvacuationTarget(B) and p.fits == 2


def test_placement_is_by_name_and_ties_go_to_the_fewest_placed() -> None:
    many = [Candidate(f"vm{n}", str(n), ("lan",)) for n in (3, 1, 2, 0)]
    placed = place(many, TO_B_C, {B: {"lan": 9}, C: {"lan": 9}}, False)
    assert [(p.candidate.name, p.target.uri if p.target else "") for p in placed] == [
        ("vm0", B),
        ("vm1", C),
        ("vm2", B),
        ("vm3", C),
    ]


def test_unreachable_targets_are_left_out_and_none_reachable_is_refused(
    world: World, coordinator: Coordinator
) -> None:
    hosts = dict(world.hosts)
    del world.hosts[C]
    with pytest.raises(NoTarget):
        evacuate(coordinator, targets=(EvacuationTarget(C),))
    assert world.running_on("vm1") == [A] and world.running_on("vm2") == [A]
    got = by_name(evacuate(coordinator))
    assert {d.destination_uri for d in got.values()} == {B}
    assert hosts.keys() - world.hosts.keys() == {C}


def test_requests_that_cannot_run_are_refused_when_built() -> None:
    with pytest.raises(InvalidEvacuation):
        EvacuationRequest(A, ())
    with pytest.raises(InvalidEvacuation):
        EvacuationRequest(A, (EvacuationTarget(A),))
    with pytest.raises(InvalidEvacuation):
        EvacuationRequest(A, (EvacuationTarget(B), EvacuationTarget(B)))
    with pytest.raises(InvalidEvacuation):
        EvacuationRequest(A, TO_B_C, parallel=0)


# -- running ------------------------------------------------------------------------


def test_one_domain_failing_does_not_stop_the_others(
    world: World, coordinator: Coordinator
) -> None:
    world.fail(A, "migrate", subject="vm1")
    got = by_name(evacuate(coordinator, parallel=2))
    assert got["vm1"].outcome == EvacuationOutcome.ROLLED_BACK
    assert "injected" in got["vm1"].error
    assert got["vm2"].outcome == EvacuationOutcome.DONE
    assert world.running_on("vm1") == [A] and world.running_on("vm2") == [C]


def test_a_refused_domain_is_refused_and_the_others_move(
    world: World, coordinator: Coordinator
) -> None:
    world.guest("vm2").agent_up = False
    got = by_name(evacuate(coordinator))
    assert got["vm2"].outcome == EvacuationOutcome.REFUSED and got["vm2"].report is None
    assert got["vm1"].outcome == EvacuationOutcome.DONE


def concurrency(events: list[EvacuationEvent]) -> int:
    """The most domains inside their migrate step at once, from the (serialised) events."""
    inside: set[str] = set()
    most = 0
    for e in events:
        if e.phase == "migrate" and e.state == "started":
            inside.add(e.domain)
            most = max(most, len(inside))
        elif e.phase == "migrate" and e.state in ("done", "failed"):
            inside.discard(e.domain)
    return most


@pytest.mark.parametrize("parallel", [1, 3])
def test_at_most_parallel_migrations_run_at_once(journal: Journal, parallel: int) -> None:
    world = World(tuple(numbered_guest(n) for n in range(7)), slots={A: 7, B: 8})
    world.migration_job_s = 0.15  # long enough for every worker to be inside at once
    events: list[EvacuationEvent] = []
    report = world.coordinator(journal).evacuate(
        EvacuationRequest(A, (EvacuationTarget(B),), parallel=parallel), events.append
    )
    assert report.parallel == parallel
    assert {d.outcome for d in report.domains} == {EvacuationOutcome.DONE}
    assert concurrency(events) == parallel
    # The shared journal kept every workflow whole: one closed row each, its steps in order.
    rows = journal.recent(100)
    assert sorted((w.domain_name, w.state, w.outcome) for w in rows) == [
        (f"g{n:05d}", "closed", "done") for n in range(7)
    ]
    for w in rows:
        steps = [(s.name, s.status) for s in journal.steps(w.id)]
        assert [s.seq for s in journal.steps(w.id)] == list(range(1, len(steps) + 1))
        assert steps[-1] == ("bind", "done")


def test_parallel_is_capped_at_libvirts_bound(world: World, coordinator: Coordinator) -> None:
    report = evacuate(coordinator, parallel=MAX_PARALLEL_MIGRATIONS + 30)
    assert report.parallel == MAX_PARALLEL_MIGRATIONS


def test_interrupt_cancels_running_migrations_and_starts_no_more(journal: Journal) -> None:
    world = World(tuple(numbered_guest(n) for n in range(6)), slots={A: 6, B: 6})
    world.migration_job_s = 5.0  # until aborted
    asked = threading.Event()
    started: set[str] = set()

    def on_event(event: EvacuationEvent) -> None:
        if event.phase == "migrate" and event.state == "started":
            started.add(event.domain)
            if len(started) == 2:
                asked.set()

    report = world.coordinator(journal).evacuate(
        EvacuationRequest(A, (EvacuationTarget(B),), parallel=2),
        on_event,
        lambda: "SIGINT" if asked.is_set() else "",
    )
    got = by_name(report)
    running = {n for n, d in got.items() if d.outcome == EvacuationOutcome.ROLLED_BACK}
    assert running == started
    for name in running:
        r = got[name].report
        assert r is not None and r.cancelled
    rest = {n for n, d in got.items() if d.outcome == EvacuationOutcome.NOT_STARTED}
    assert rest == set(got) - started and len(rest) == 4
    assert all("SIGINT" in got[n].error for n in rest)
    assert all(world.running_on(n) == [A] for n in got)
    assert report.wall_s < 4.0  # the jobs were aborted, not waited for


def test_domains_without_teams_are_skipped_or_moved_plainly_with_all(
    world: World, journal: Journal
) -> None:
    world.add_guest(UNTIED)
    got = by_name(evacuate(world.coordinator(journal)))
    assert got["plain1"].outcome == EvacuationOutcome.SKIPPED
    assert got["plain1"].destination_uri == "" and world.running_on("plain1") == [A]
    got = by_name(evacuate(world.coordinator(journal), include_untied=True))
    assert got["plain1"].outcome == EvacuationOutcome.MIGRATED_PLAIN
    assert world.running_on("plain1") == [got["plain1"].destination_uri]
    assert got["plain1"].report is None


def test_a_failed_plain_migration_leaves_the_domain_where_it_ran(
    world: World, coordinator: Coordinator
) -> None:
    world.add_guest(UNTIED)
    world.fail(A, "migrate", subject="plain1")
    got = by_name(evacuate(coordinator, include_untied=True))
    assert got["plain1"].outcome == EvacuationOutcome.ROLLED_BACK
    assert world.running_on("plain1") == [A]


def test_events_name_domain_destination_phase_and_outcome(coordinator: Coordinator) -> None:
    events: list[EvacuationEvent] = []
    coordinator.evacuate(EvacuationRequest(A, TO_B_C), events.append)
    vm1 = [(e.destination_uri, e.phase, e.state, e.outcome) for e in events if e.domain == "vm1"]
    assert vm1[0] == (B, "queued", "info", "")
    assert (B, "migrate", "started", "") in vm1
    assert vm1[-1] == (B, "result", "done", "done")
    assert all(e.workflow_id for e in events if e.phase not in ("queued", "result"))


# -- the CLI --------------------------------------------------------------------------

Ptmig = Callable[..., tuple[int, str, str]]


@pytest.fixture
def ptmig(
    world: World,
    journal: Journal,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> Ptmig:
    monkeypatch.setattr(cli, "_coordinator", lambda args: world.coordinator(journal))

    def run(*args: str) -> tuple[int, str, str]:
        code = cli.main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


DOMAIN_KEYS = [
    "domain",
    "uuid",
    "destination_uri",
    "outcome",
    "error",
    "started_at",
    "seconds",
    "report",
]


def test_cli_json_has_the_documented_shape(ptmig: Ptmig, world: World) -> None:
    world.add_guest(UNTIED)
    code, out, _ = ptmig("evacuate", A, "--to", B, "--to", C, "--parallel", "2", "--json")
    doc = json.loads(out)
    assert code == cli.EXIT_OK
    assert list(doc) == ["source_uri", "parallel", "wall_s", "domains"]
    assert doc["source_uri"] == A and doc["parallel"] == 2 and isinstance(doc["wall_s"], float)
    assert [d["domain"] for d in doc["domains"]] == ["plain1", "vm1", "vm2"]
    for d in doc["domains"]:
        assert list(d) == DOMAIN_KEYS
        assert isinstance(d["started_at"], float) and isinstance(d["seconds"], float)
    skipped, vm1, _ = doc["domains"]
    assert (skipped["outcome"], skipped["destination_uri"], skipped["report"]) == (
        "skipped",
        "",
        None,
    )
    # The report is what ``ptmig migrate --json`` prints.
    code, migrate_out, _ = ptmig("-c", B, "migrate", "vm1", C, "--json")
    assert list(json.loads(migrate_out)) == list(vm1["report"])
    assert vm1["report"]["outcome"] == "done" and vm1["report"]["destination_uri"] == B


def test_cli_peer_uris_pair_with_targets_in_order(
    ptmig: Ptmig, world: World, journal: Journal
) -> None:
    world.peers["peer://b"] = B
    code, _, err = ptmig("evacuate", A, "--to", B, "--to", C, "--peer-uri", "peer://b")
    assert code == 0, err
    assert world.running_on("vm1") == [B] and world.running_on("vm2") == [C]
    asked = {w.domain_name: w.request for w in journal.recent()}
    assert (asked["vm1"]["destination_uri"], asked["vm1"]["peer_uri"]) == (B, "peer://b")
    assert (asked["vm2"]["destination_uri"], asked["vm2"]["peer_uri"]) == (C, None)
    code, _, err = ptmig("evacuate", B, "--to", A, "--peer-uri", "x", "--peer-uri", "y")
    assert code == cli.EXIT_USAGE and "more --peer-uri than --to" in err


def test_cli_says_when_parallel_is_capped(ptmig: Ptmig) -> None:
    code, out, err = ptmig("evacuate", A, "--to", B, "--parallel", "40", "--json")
    assert code == 0 and json.loads(out)["parallel"] == MAX_PARALLEL_MIGRATIONS == 16
    assert err == (
        "ptmig: parallel 40 capped at 16: libvirtd runs each migration call in one of its "
        "worker threads (max_workers = 20 by default)\n"
    )


def test_cli_plain_lines_and_summary(ptmig: Ptmig) -> None:
    code, out, err = ptmig("evacuate", A, "--to", B, "--to", C)
    assert code == 0
    assert "vm1 -> fake://b: migrate: started" in err
    assert out.splitlines()[-1].startswith("fake://a: 2 done in ")


def test_cli_exit_codes(ptmig: Ptmig, world: World) -> None:
    world.set_slots(B, 1)
    world.set_slots(C, None)
    code, out, _ = ptmig("evacuate", A, "--to", B, "--to", C, "--json")
    assert code == cli.EXIT_DEGRADED == 3
    assert {d["outcome"] for d in json.loads(out)["domains"]} == {"done-degraded"}
    world.fail(B, "migrate", subject="vm1")
    code, _, _ = ptmig("evacuate", B, "--to", A)
    assert code == cli.EXIT_ROLLED_BACK == 4


@pytest.mark.parametrize(
    ("outcomes", "code"),
    [
        ((), 0),
        (("done", "skipped", "migrated-plain"), 0),
        (("done", "done-degraded"), 3),
        (("done-degraded", "rolled-back"), 4),
        (("done", "refused"), 4),
        (("done", "not-started"), 4),
        (("rolled-back", "failed", "done-degraded"), 5),
    ],
)
def test_exit_code_is_the_worst_outcome(outcomes: tuple[str, ...], code: int) -> None:
    report = EvacuationReport(
        A, 1, 0.0, [DomainEvacuation(o, o, B, EvacuationOutcome(o)) for o in outcomes]
    )
    assert commands.evacuation_exit_code(report) == code


def test_cli_sigint_cancels_the_running_and_starts_no_more(
    journal: Journal, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    world = World(tuple(numbered_guest(n) for n in range(4)), slots={A: 4, B: 4})
    world.migration_job_s = 20.0  # until aborted
    monkeypatch.setattr(cli, "_coordinator", lambda args: world.coordinator(journal))

    def interrupt_once_a_job_runs() -> None:
        if world.job_started.wait(10):
            os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_once_a_job_runs, daemon=True).start()
    code = cli.main(["evacuate", A, "--to", B, "--parallel", "2", "--json"])
    out, err = capsys.readouterr()
    outcomes = sorted(d["outcome"] for d in json.loads(out)["domains"])
    assert code == cli.EXIT_ROLLED_BACK
    assert "SIGINT: stopping the evacuation of fake://a" in err
    assert outcomes.count("not-started") >= 2 and "done" not in outcomes
    assert set(outcomes) <= {"rolled-back", "not-started"}
    assert all(world.running_on(f"g{n:05d}") == [A] for n in range(4))


def test_the_live_table_shows_each_domain_destination_and_outcome(
    coordinator: Coordinator, capsys: pytest.CaptureFixture[str]
) -> None:
    request = EvacuationRequest(A, TO_B_C)
    report = live.evacuate_with_table(coordinator, request, live.EvacuationInterrupt(request))
    assert {d.domain: str(d.outcome) for d in report.domains} == {"vm1": "done", "vm2": "done"}
    table = capsys.readouterr().err
    rows = [line for line in table.splitlines() if "vm1" in line or "vm2" in line]
    assert any("vm1" in r and B in r and "done" in r for r in rows), table
    assert any("vm2" in r and C in r and "done" in r for r in rows), table


# -- cost as a host fills ---------------------------------------------------------------


def domains_parsed_per_migration(n: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> float:
    """Evacuate *n* one-team domains from A to B alone (B ends with all of them); how many
    domain XMLs the device views parsed, per migration."""
    world = World(tuple(numbered_guest(i) for i in range(n)), slots={A: n, B: n}, hosts=(A, B))
    inventory.HELD.forget()  # nothing kept from other tests
    parsed = 0
    real = inventory.parse_domain

    def counting(xml: str) -> Any:
        nonlocal parsed
        parsed += 1
        return real(xml)

    monkeypatch.setattr(inventory, "parse_domain", counting)
    with Journal(tmp_path / f"journal-{n}.sqlite") as journal:
        report = world.coordinator(journal).evacuate(EvacuationRequest(A, (EvacuationTarget(B),)))
    assert [d.outcome for d in report.domains] == [EvacuationOutcome.DONE] * n
    return parsed / n


def test_a_migration_parses_no_more_domains_as_its_destination_fills(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every step reads B's domains again, but one unchanged since the last read is looked
    # up by its XML, not parsed: what a migration parses is its own domain's new XML.
    few = domains_parsed_per_migration(6, tmp_path, monkeypatch)
    many = domains_parsed_per_migration(30, tmp_path, monkeypatch)
    assert few > 0
    assert many <= few * 1.2  # parsing every domain per step: 30 vs 6 would be ~4.5x
