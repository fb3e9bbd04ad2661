"""The migration options virsh users know (--tls, --copy-storage-*, --bandwidth,
--auto-converge, --postcopy, --parallel-connections): validated before anything starts,
passed to libvirt as flags and typed parameters, shown in the report, the same through
the CLI, the contract and the Coordinator."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import libvirt
import pytest
from ptmig.v1 import coordinator_pb2 as pb
from test_daemon_rpcs import CALL_TIMEOUT, ptmigd
from workflow_fakes import A, B, Events, World

from host import cli
from host.commandline import commands, render
from host.daemon.encode import migration_options, migration_request, options_message
from host.daemon.errors import status_for
from host.hypervisor import MIGRATE_FLAGS, migration_call
from host.migration_job import PostcopyTrigger
from host.migration_options import CopyStorage, InvalidMigrationOptions, MigrationOptions
from host.workflow.journal import Journal
from host.workflow.model import MigrationRequest, Outcome, plain

EVERYTHING = MigrationOptions(
    tls=True,
    copy_storage=CopyStorage.ALL,
    migrate_disks=("vdb",),
    bandwidth_mib_s=64,
    auto_converge=True,
    parallel_connections=4,
)
POSTCOPY = MigrationOptions(tls=True, postcopy=True, postcopy_after_s=2.5, bandwidth_mib_s=8)


# -- validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bandwidth_mib_s": 0}, "bandwidth 0 MiB/s"),
        ({"bandwidth_mib_s": (1 << 20) + 1}, "bandwidth"),
        ({"parallel_connections": 1}, "parallel connections 1"),
        ({"parallel_connections": 256}, "parallel connections 256"),
        ({"postcopy_after_s": 3.0}, "needs post-copy on"),
        ({"postcopy": True, "postcopy_after_s": -1.0}, "post-copy after -1.0 s"),
        ({"postcopy": True, "parallel_connections": 2}, "refuses post-copy with multifd"),
        ({"migrate_disks": ("vdb",)}, "needs copy storage"),
        ({"copy_storage": CopyStorage.ALL, "migrate_disks": ("vdb,vdc",)}, "not a disk"),
        ({"copy_storage": "both"}, "copy storage 'both'"),
    ],
)
def test_a_bad_value_or_combination_is_refused_when_built(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidMigrationOptions, match=message):
        MigrationOptions(**kwargs)


def test_copy_storage_is_taken_as_its_spelling() -> None:
    assert MigrationOptions(copy_storage="inc").copy_storage is CopyStorage.INCREMENTAL  # type: ignore[arg-type]


# -- what libvirt is given ---------------------------------------------------------------


def test_no_option_is_the_plain_live_migration() -> None:
    flags, params = migration_call(MigrationOptions(), persistent_xml="<domain/>")
    assert flags == MIGRATE_FLAGS
    assert params == {libvirt.VIR_MIGRATE_PARAM_PERSIST_XML: "<domain/>"}


def test_each_option_is_its_libvirt_flag_or_typed_parameter() -> None:
    flags, params = migration_call(EVERYTHING, persistent_xml="<domain/>", unsafe=True)
    assert flags == (
        MIGRATE_FLAGS
        | libvirt.VIR_MIGRATE_UNSAFE
        | libvirt.VIR_MIGRATE_TLS
        | libvirt.VIR_MIGRATE_NON_SHARED_DISK
        | libvirt.VIR_MIGRATE_AUTO_CONVERGE
        | libvirt.VIR_MIGRATE_PARALLEL
    )
    assert params == {
        libvirt.VIR_MIGRATE_PARAM_PERSIST_XML: "<domain/>",
        libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS: ["vdb"],
        libvirt.VIR_MIGRATE_PARAM_BANDWIDTH: 64,
        libvirt.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS: 4,
    }


def test_postcopy_and_incremental_copy_are_their_flags() -> None:
    options = MigrationOptions(copy_storage=CopyStorage.INCREMENTAL, postcopy=True)
    flags, params = migration_call(options, persistent_xml="<domain/>")
    assert (
        flags == MIGRATE_FLAGS | libvirt.VIR_MIGRATE_NON_SHARED_INC | libvirt.VIR_MIGRATE_POSTCOPY
    )
    assert set(params) == {libvirt.VIR_MIGRATE_PARAM_PERSIST_XML}


# -- when the watcher switches to post-copy ---------------------------------------------------


def test_postcopy_without_a_time_switches_once_the_first_pass_ended() -> None:
    trigger = PostcopyTrigger(None)
    assert trigger.reason(30.0, 1, 400 << 20) == ""
    assert trigger.reason(31.0, 2, 50 << 20) == "first pass ended"


def test_postcopy_after_a_time_switches_then() -> None:
    trigger = PostcopyTrigger(5.0)
    assert trigger.reason(1.0, 1, 400 << 20) == ""
    assert trigger.reason(3.0, 2, 50 << 20) == ""  # the first pass ended: pre-copy goes on
    assert trigger.reason(5.0, 2, 40 << 20) == "after 5 s"


def test_postcopy_after_a_time_switches_earlier_when_a_pass_does_not_shrink_what_is_left() -> None:
    trigger = PostcopyTrigger(60.0)
    assert trigger.reason(1.0, 1, 400 << 20) == ""
    assert trigger.reason(2.0, 2, 30 << 20) == ""
    assert trigger.reason(2.5, 3, 20 << 20) == ""  # shrinking: converging
    assert trigger.reason(3.0, 4, 25 << 20) == "stalled"


# -- the CLI -----------------------------------------------------------------------------


def parse(*extra: str) -> MigrationOptions:
    args = cli.build_parser().parse_args(["migrate", "vm1", B, *extra])
    return commands.migration_options(args)


def test_the_cli_flags_are_the_options() -> None:
    assert parse() == MigrationOptions()
    assert (
        parse(
            "--tls",
            "--copy-storage-all",
            "--migrate-disks",
            "vdb",
            "--bandwidth",
            "64",
            "--auto-converge",
            "--parallel-connections",
            "4",
        )
        == EVERYTHING
    )
    assert parse("--copy-storage-inc").copy_storage is CopyStorage.INCREMENTAL
    assert parse("--postcopy") == MigrationOptions(postcopy=True)
    assert parse("--postcopy-after", "2.5") == MigrationOptions(postcopy=True, postcopy_after_s=2.5)


def test_the_cli_refuses_both_copy_storage_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse("--copy-storage-all", "--copy-storage-inc")
    assert exit_.value.code == cli.EXIT_USAGE
    assert "not allowed with argument --copy-storage-all" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--bandwidth", "0"], "bandwidth 0 MiB/s"),
        (["--postcopy", "--parallel-connections", "2"], "refuses post-copy with multifd"),
        (["--parallel-connections", "300"], "parallel connections 300"),
        (["--migrate-disks", "vdb"], "needs copy storage"),
    ],
)
def test_a_bad_option_exits_2_before_the_journal_is_opened(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    journal = tmp_path / "journal.sqlite"
    code = cli.main(["--journal", str(journal), "migrate", "vm1", B, *extra])
    assert code == cli.EXIT_USAGE
    assert message in capsys.readouterr().err
    assert not journal.exists()


def test_a_non_number_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    for extra in (["--bandwidth", "fast"], ["--postcopy-after", "nan"]):
        with pytest.raises(SystemExit) as exit_:
            parse(*extra)
        assert exit_.value.code == cli.EXIT_USAGE


# -- the contract ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        MigrationOptions(),
        EVERYTHING,
        POSTCOPY,
        MigrationOptions(postcopy=True, postcopy_after_s=0),
        MigrationOptions(libvirt_defaults=True),
    ],
)
def test_options_survive_the_message_both_ways(options: MigrationOptions) -> None:
    message = options_message(options)
    wire = pb.MigrationOptions.FromString(message.SerializeToString())
    assert migration_options(wire) == options


def test_a_bad_options_message_is_invalid_argument() -> None:
    request = pb.MigrateRequest(
        domain="vm1",
        source_uri=A,
        destination_uri=B,
        options=pb.MigrationOptions(postcopy=True, parallel_connections=2),
    )
    with pytest.raises(InvalidMigrationOptions) as refused:
        migration_request(request)
    assert status_for(refused.value)[0] is grpc.StatusCode.INVALID_ARGUMENT


# -- through the Coordinator (fakes) and ptmigd --------------------------------------------------


def test_the_options_reach_the_hypervisor_and_the_report(world: World, journal: Journal) -> None:
    request = MigrationRequest("vm1", A, B, unsafe=True, options=EVERYTHING)
    report = world.coordinator(journal).migrate(request, Events())

    assert report.outcome is Outcome.DONE, report.error
    (call,) = world.migrations
    assert call.options == EVERYTHING
    assert call.flags & libvirt.VIR_MIGRATE_TLS and call.flags & libvirt.VIR_MIGRATE_PARALLEL
    stats = report.migration
    assert stats is not None
    assert (stats.tls, stats.copy_storage, stats.migrate_disks) == (True, CopyStorage.ALL, ("vdb",))
    assert (stats.bandwidth_mib_s, stats.auto_converge, stats.parallel_connections) == (64, True, 4)
    assert stats.disk_total == 1 << 30
    # the JSON form (--json, the journal) and the per-phase report name each of them
    assert plain(report)["migration"]["tls"] is True
    migrate_phase = next(p for p in report.phases if p.name == "migrate")
    for shown in ("tls", "copy-storage-all", "bandwidth 64 MiB/s", "auto-converge", "4 conn"):
        assert shown in migrate_phase.detail
    assert "copy-storage-all 1024 MiB" in render.report_text(report)


def test_postcopy_shows_when_it_started(world: World, journal: Journal) -> None:
    request = MigrationRequest("vm1", A, B, options=POSTCOPY)
    report = world.coordinator(journal).migrate(request, Events())

    assert report.migration is not None
    assert report.migration.postcopy_started
    assert report.migration.postcopy_reason == "after 2.5 s"
    migrate_phase = next(p for p in report.phases if p.name == "migrate")
    assert "post-copy at 2.5 s (after 2.5 s)" in migrate_phase.detail


def test_ptmigd_passes_the_options_and_refuses_bad_ones_before_any_workflow(
    world: World, journal_path: Path, short_tmp: Path
) -> None:
    with ptmigd(world, journal_path, short_tmp) as stub:
        good = pb.MigrateRequest(
            domain="vm1", source_uri=A, destination_uri=B, options=options_message(POSTCOPY)
        )
        *_, last = stub.Migrate(good, timeout=CALL_TIMEOUT)
        bad = pb.MigrateRequest(
            domain="vm1",
            source_uri=B,
            destination_uri=A,
            options=pb.MigrationOptions(bandwidth_mib_s=1 << 21),
        )
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Migrate(bad, timeout=CALL_TIMEOUT))

    assert [c.options for c in world.migrations] == [POSTCOPY]
    migration = json.loads(last.report.migration_json)
    assert (migration["postcopy"], migration["postcopy_started"]) == (True, True)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "bandwidth 2097152 MiB/s" in str(refused.value.details())
    with Journal(journal_path) as journal:
        assert len(journal.recent(10)) == 1  # the refused one never reached the journal
    assert world.running_on("vm1") == [B]


# -- what the watcher saw, as statistics ---------------------------------------------------


def test_the_statistics_take_the_destinations_record_and_what_the_watcher_saw() -> None:
    from host.migration_job import DowntimeBudget, JobWatch

    watch = JobWatch(EVERYTHING, DowntimeBudget(None, EVERYTHING))
    watch.sample({"auto_converge_throttle": 20, "disk_total": 64 << 20, "disk_processed": 1})
    watch.sample({"auto_converge_throttle": 50, "disk_processed": 64 << 20})
    watch.sample({"auto_converge_throttle": 30})
    watch.capabilities, watch.multifd_channels = ("auto-converge", "multifd"), 4
    stats = watch.stats(2.5, {"downtime": 80, "memory_bps": 33 << 20, "data_total": 1 << 29})

    assert (stats.wall_s, stats.downtime_ms, stats.data_total) == (2.5, 80, 1 << 29)
    assert stats.auto_converge_throttle_pct == 50  # the highest seen
    assert (stats.disk_total, stats.disk_processed) == (64 << 20, 64 << 20)
    assert (stats.memory_bps, stats.multifd_channels) == (33 << 20, 4)
    assert stats.qemu_capabilities == ("auto-converge", "multifd")
    assert not stats.postcopy and not stats.postcopy_started


def test_postcopy_counts_as_started_only_once_the_source_said_so() -> None:
    from host.migration_job import DowntimeBudget, JobWatch

    asked_only = JobWatch(POSTCOPY, DowntimeBudget(None, POSTCOPY))
    asked_only.postcopy_asked_s, asked_only.postcopy_reason = 2.6, "after 2.5 s"
    stats = asked_only.stats(4.0, {})
    assert stats.postcopy and not stats.postcopy_started
    assert stats.postcopy_started_after_s is None
    assert "post-copy not needed" in stats.detail

    entered = JobWatch(POSTCOPY, DowntimeBudget(None, POSTCOPY))
    entered.postcopy_asked_s, entered.postcopy_reason = 2.6, "after 2.5 s"
    entered.postcopy_entered_s = 2.7  # VIR_DOMAIN_EVENT_SUSPENDED_POSTCOPY on the source
    stats = entered.stats(4.0, {})
    assert stats.postcopy_started and stats.postcopy_started_after_s == 2.6
    assert "post-copy at 2.6 s (after 2.5 s)" in stats.detail


# -- the downtime budget ----------------------------------------------------------------


def test_ptmigs_budget_starts_low_and_goes_back_to_qemus_limit_after_its_passes() -> None:
    from host.migration_job import DowntimeBudget
    from host.migration_options import DOWNTIME_BUDGET_PASSES, QEMU_DOWNTIME_MS, TUNED_DOWNTIME_MS

    budget = DowntimeBudget(None, MigrationOptions())
    assert budget.start_ms == TUNED_DOWNTIME_MS
    assert [budget.relax(i) for i in range(DOWNTIME_BUDGET_PASSES + 1)] == [None] * (
        DOWNTIME_BUDGET_PASSES + 1
    )
    assert budget.relax(DOWNTIME_BUDGET_PASSES + 1) == QEMU_DOWNTIME_MS
    assert budget.relax(DOWNTIME_BUDGET_PASSES + 2) is None  # once
    assert budget.relaxed_at_pass == DOWNTIME_BUDGET_PASSES + 1


@pytest.mark.parametrize(
    ("operator_ms", "options", "start"),
    [
        (None, MigrationOptions(libvirt_defaults=True), None),  # libvirt's: untouched
        (120, MigrationOptions(), 120),  # the operator's, for the whole job
        (120, MigrationOptions(libvirt_defaults=True), 120),
    ],
)
def test_libvirts_defaults_and_the_operators_limit_have_no_budget(
    operator_ms: int | None, options: MigrationOptions, start: int | None
) -> None:
    from host.migration_job import DowntimeBudget

    budget = DowntimeBudget(operator_ms, options)
    assert budget.start_ms == start
    assert all(budget.relax(i) is None for i in range(50))


def test_the_cli_flag_restores_libvirts_defaults() -> None:
    assert parse("--libvirt-defaults") == MigrationOptions(libvirt_defaults=True)
    assert options_message(MigrationOptions(libvirt_defaults=True)).libvirt_defaults


class _FakeJobDomain:
    """A virDomain whose migration job runs until the watcher relaxed the limit (or 10 s),
    one pre-copy pass per jobStats sample."""

    def __init__(self) -> None:
        import threading

        self.limits: list[int] = []
        self.passes = 0
        self.relaxed = threading.Event()

    def UUIDString(self) -> str:
        return "0" * 8 + "-0000-0000-0000-" + "0" * 12

    def name(self) -> str:
        return "vm1"

    def migrateSetMaxDowntime(self, ms: int, _flags: int) -> int:
        self.limits.append(ms)
        if len(self.limits) > 1:
            self.relaxed.set()
        return 0

    def jobStats(self, _flags: int) -> dict[str, Any]:
        self.passes += 1
        return {"type": 2, "memory_iteration": self.passes, "time_elapsed": 10 * self.passes}

    def migrateToURI3(self, _uri: str, _params: dict[str, Any], _flags: int) -> int:
        self.relaxed.wait(10)
        return 0


class _FakeDestination:
    uri = "qemu+tcp://b/system"

    def domain(self, _ident: str) -> Any:
        class Done:
            def completed_job(self) -> dict[str, Any]:
                return {"downtime": 90, "memory_iteration": 7}

        return Done()


def test_the_watcher_applies_the_budget_to_the_running_job(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import host.hypervisor as hypervisor
    from host import migration_job
    from host.migration_options import DOWNTIME_BUDGET_PASSES, QEMU_DOWNTIME_MS, TUNED_DOWNTIME_MS

    monkeypatch.setattr(migration_job, "JOB_POLL_S", 0.01)
    hv = hypervisor.Hypervisor.__new__(hypervisor.Hypervisor)
    hv.uri = "qemu:///system"
    fake = _FakeJobDomain()
    dom = hypervisor.Domain(hv, fake)  # type: ignore[arg-type]

    stats = dom.migrate(
        _FakeDestination(),  # type: ignore[arg-type]
        persistent_xml="<domain/>",
        options=MigrationOptions(),
    )

    assert fake.limits == [TUNED_DOWNTIME_MS, QEMU_DOWNTIME_MS]
    assert stats.max_downtime_ms == TUNED_DOWNTIME_MS
    assert stats.downtime_relaxed_at_pass == DOWNTIME_BUDGET_PASSES + 1
    assert "downtime 90 ms (limit 50 ms, 300 from pass 6)" in stats.detail


def test_the_detail_says_the_limit_a_job_kept() -> None:
    from host.migration_options import MigrationStats

    assert MigrationStats(1.0, downtime_ms=76, max_downtime_ms=50).detail == (
        "downtime 76 ms (limit 50 ms)"
    )
    assert MigrationStats(1.0, downtime_ms=200).detail == "downtime 200 ms"


def test_a_driver_that_refuses_the_limit_migrates_with_libvirts_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import host.hypervisor as hypervisor

    class Refusing(_FakeJobDomain):
        def migrateSetMaxDowntime(self, ms: int, _flags: int) -> int:
            raise libvirt.libvirtError("this function is not supported by the connection driver")

        def migrateToURI3(self, _uri: str, _params: dict[str, Any], _flags: int) -> int:
            return 0

    hv = hypervisor.Hypervisor.__new__(hypervisor.Hypervisor)
    hv.uri = "qemu:///system"
    dom = hypervisor.Domain(hv, Refusing())  # type: ignore[arg-type]
    stats = dom.migrate(_FakeDestination(), persistent_xml="<domain/>")  # type: ignore[arg-type]
    assert stats.max_downtime_ms is None and stats.downtime_relaxed_at_pass is None
    with pytest.raises(hypervisor.HypervisorError, match="set max downtime"):
        dom.migrate(
            _FakeDestination(),  # type: ignore[arg-type]
            persistent_xml="<domain/>",
            max_downtime_ms=120,
        )


@pytest.mark.parametrize(
    ("postcopy", "state", "raised"),
    [
        (True, (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_POSTCOPY_FAILED), "post"),
        (True, (libvirt.VIR_DOMAIN_RUNNING, 1), "plain"),  # failed in its pre-copy
        (False, (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_POSTCOPY_FAILED), "plain"),
    ],
)
def test_a_job_that_failed_in_postcopy_says_so(
    postcopy: bool, state: tuple[int, int], raised: str
) -> None:
    import host.hypervisor as hypervisor

    class DiesInPostcopy(_FakeJobDomain):
        def migrateToURI3(self, _uri: str, _params: dict[str, Any], _flags: int) -> int:
            raise libvirt.libvirtError("internal error: qemu unexpectedly closed the monitor")

        def state(self) -> list[int]:
            return list(state)

        def connect(self) -> Any:
            class NoEvents:  # the lifecycle event never comes: the state must tell
                def domainEventRegisterAny(self, *_args: Any) -> int:
                    return 1

                def domainEventDeregisterAny(self, _id: int) -> int:
                    return 0

            return NoEvents()

    hv = hypervisor.Hypervisor.__new__(hypervisor.Hypervisor)
    hv.uri = "qemu:///system"
    dom = hypervisor.Domain(hv, DiesInPostcopy())  # type: ignore[arg-type]
    with pytest.raises(hypervisor.HypervisorError, match="migrate vm1 qemu:") as caught:
        dom.migrate(
            _FakeDestination(),  # type: ignore[arg-type]
            persistent_xml="<domain/>",
            options=MigrationOptions(postcopy=postcopy, libvirt_defaults=True),
        )
    assert isinstance(caught.value, hypervisor.PostcopyFailed) == (raised == "post")


def test_a_destination_xml_is_libvirts_dest_xml_parameter_and_absent_otherwise() -> None:
    _, without = migration_call(MigrationOptions(), persistent_xml="<domain/>")
    assert libvirt.VIR_MIGRATE_PARAM_DEST_XML not in without
    _, params = migration_call(
        MigrationOptions(), persistent_xml="<domain/>", destination_xml="<domain><x/></domain>"
    )
    assert params[libvirt.VIR_MIGRATE_PARAM_DEST_XML] == "<domain><x/></domain>"
    assert params[libvirt.VIR_MIGRATE_PARAM_PERSIST_XML] == "<domain/>"
