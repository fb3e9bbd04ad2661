"""The results read back: :func:`from_plain` is the inverse of :func:`plain` (``--json``)
for the Coordinator's results and refuses what is not the type's shape;
``report_from_message`` reads the Migrate stream's report back."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

from host.daemon.encode import report_from_message, report_message
from host.domain.kinds import PoolKind
from host.domain.teams import PrimaryDevice
from host.migration_options import CopyStorage, MigrationStats
from host.workflow.model import (
    BindTiming,
    DomainEvacuation,
    DomainStatus,
    EvacuationOutcome,
    EvacuationReport,
    MigrationReport,
    Outcome,
    PhaseTiming,
    TeamMode,
    TeamStatus,
    from_plain,
    to_json,
)

REPORT = MigrationReport(
    workflow_id="w1",
    domain="vm1",
    source_uri="test:///a",
    destination_uri="test:///b",
    outcome=Outcome.DONE_DEGRADED,
    phases=[PhaseTiming("preflight", 0.25, "ok", 1700000000.5), PhaseTiming("bind", 2.0)],
    teams={"lan": TeamMode.PRIMARY, "wan": TeamMode.STANDBY},
    why={"wan": "no free device"},
    migration=MigrationStats(
        wall_s=3.5,
        downtime_ms=40,
        copy_storage=CopyStorage.ALL,
        migrate_disks=("vdb",),
        qemu_capabilities=("auto-converge", "multifd"),
        postcopy_started_after_s=1.25,
    ),
    drift={"lan": "plugged"},
    cancelled=True,
    ways={"lan": "switch: no state copy asked", "wan": "copy-state: both hosts allow it"},
    binds={
        "lan": BindTiming(1700000010.0, 1700000010.25, 1700000010.3, 1700000010.5, 1700000013.0),
        "wan": BindTiming(1700000010.25, 1700000010.5, None, 1700000010.5, 1700000011.0),
    },
)


T = TypeVar("T")


def read_back(cls: type[T], value: T) -> T:
    """*value* through the CLI's JSON text and back."""
    return from_plain(cls, json.loads(to_json(value)))


def test_a_migration_report_comes_back_equal_and_typed() -> None:
    back = read_back(MigrationReport, REPORT)
    assert back == REPORT
    assert type(back.outcome) is Outcome and type(back.teams["wan"]) is TeamMode
    assert back.migration is not None and back.migration.migrate_disks == ("vdb",)
    assert type(back.migration.copy_storage) is CopyStorage


def test_a_report_without_migration_stats_and_an_evacuation_nesting_reports() -> None:
    bare = MigrationReport("w2", "vm2", "a", "b", Outcome.REFUSED)
    evacuation = EvacuationReport(
        "test:///a",
        2,
        7.5,
        [
            DomainEvacuation("vm1", "u1", "test:///b", EvacuationOutcome.DONE, report=REPORT),
            DomainEvacuation("plain1", "u2", "", EvacuationOutcome.SKIPPED),
            DomainEvacuation("vm2", "u3", "test:///b", EvacuationOutcome.REFUSED, report=bare),
        ],
    )
    assert read_back(EvacuationReport, evacuation) == evacuation


def test_a_status_with_a_recorded_primary_comes_back_equal() -> None:
    primary = PrimaryDevice(kind=PoolKind.EMULATED, alias="ua-p", mac="52:54:00:00:00:01", tap="t")
    status = DomainStatus(
        "vm1",
        "u1",
        "test:///a",
        (TeamStatus("lan", TeamMode.PRIMARY, "lab", "preserve", primary, members=("a", "b")),),
    )
    assert read_back(DomainStatus, status) == status


@pytest.mark.parametrize(
    "change,said",
    [
        (lambda d: d.update(extra=1), "MigrationReport: unknown field(s) extra"),
        (
            lambda d: d.pop("outcome"),
            "missing 1 required positional argument: 'outcome'",
        ),
        (lambda d: d.update(outcome="moved"), "MigrationReport.outcome: 'moved' is not a Outcome"),
        (lambda d: d["phases"][0].update(seconds="1"), "MigrationReport.phases[0].seconds: '1'"),
        (lambda d: d["teams"].update(lan=None), "MigrationReport.teams['lan']: None"),
        (lambda d: d["migration"].update(downtime_ms=True), "migration.downtime_ms: True"),
        (lambda d: d.update(phases={}), "MigrationReport.phases: {} is not"),
    ],
)
def test_a_shape_that_is_not_the_types_is_refused_with_where(
    change: Callable[[dict[str, Any]], object], said: str
) -> None:
    data = json.loads(to_json(REPORT))
    change(data)
    with pytest.raises(ValueError) as err:
        from_plain(MigrationReport, data)
    assert said in str(err.value)


def test_the_migrate_streams_report_comes_back_but_for_what_the_contract_lacks() -> None:
    back = report_from_message(report_message(REPORT))
    phases = [dataclasses.replace(p, started_at=0.0) for p in REPORT.phases]
    assert back == dataclasses.replace(REPORT, phases=phases, why={}, binds={})
    bare = MigrationReport("w2", "vm2", "a", "b", Outcome.ROLLED_BACK, error="aborted")
    assert report_from_message(report_message(bare)) == bare
    message = report_message(bare)
    message.outcome_text = "moved"
    with pytest.raises(ValueError, match="moved"):
        report_from_message(message)
