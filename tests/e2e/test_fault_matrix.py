"""The fault matrix: ``ptmig migrate`` with a fault injected at each phase, in the real lab.

Every case ends with the same checks (:func:`assert_converged`): the VM runs on exactly
one host, the client reaches both teams' addresses, no MAC is on two hosts, every team is
on its primary or is degraded and then repaired by the reconciler's pass, every pool
device the domain holds is one its metadata names (live and persistent alike) and no
pool device (tap) exists that no running domain holds, and the journal has no open
workflow.  The table of cases, results and lost packets is printed at
the end of the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import fault_matrix
import libvirt
import pytest
from fault_matrix import (
    assert_converged,
    assert_devices_accounted_for,
    open_workflows,
    teams_on,
)
from ptmig.serial_session import AGENT_CHANNEL

from host.domain.domain_xml import device_aliases
from host.migration_options import MigrationOptions
from host.workflow.coordinator import Coordinator
from host.workflow.errors import PreflightError
from host.workflow.journal import Journal, StepStatus
from host.workflow.model import Event, MigrationReport, MigrationRequest, Outcome
from lab import GUEST_IP, WAN_GUEST_IP
from lab import coordinated as co
from lab.fabric import CLIENT_NS, HOSTS
from lab.guest import DOMAIN_NAME
from lab.image import GuestImage
from lab.measure import wait_reachable
from lab.migration import migrate_args, migrate_argv, read_migration
from lab.paths import run_dir
from lab.ptmig import cli_env
from lab.run import run
from lab.traffic import FixedRatePinger, analyze
from lab.vmlab import VmLab

pytestmark = pytest.mark.e2e

OTHER = {"hosta": "hostb", "hostb": "hosta"}
AGENT_UNIT = "ptmig-agent"
#: The ACPI GPE that QEMU's q35 ACPI PCI hotplug raises (``\\_GPE._E01``): a guest that
#: disables it never answers an unplug request, as a guest that refuses to let go.
HOTPLUG_GPE = "/sys/firmware/acpi/interrupts/gpe01"


@pytest.fixture(scope="module")
def faulty(lab: VmLab) -> VmLab:
    co.configure(lab)
    return lab


# -- driving a migration and injecting faults --------------------------------------------


def request(lab: VmLab, dest: str) -> MigrationRequest:
    return MigrationRequest(
        DOMAIN_NAME,
        lab.hosts[lab.where()].uri,
        lab.hosts[dest].uri,
        unsafe=True,
        peer_uri=lab.hosts[dest].tcp_uri,
    )


@contextlib.contextmanager
def pinging(name: str) -> Iterator[dict[str, int]]:
    """Ping both teams at 1000/s for the block; the dict gets each team's lost count."""
    ps = {
        team: FixedRatePinger(
            ip,
            run_dir() / f"fault-{name}-{team}.ping",
            rate=1000,
            prefix=["ip", "netns", "exec", CLIENT_NS],
        )
        for team, ip in (("lan", GUEST_IP), ("wan", WAN_GUEST_IP))
    }
    lost: dict[str, int] = {}
    for p in ps.values():
        p.start()
    try:
        yield lost
    finally:
        time.sleep(1.5)
        for team, p in ps.items():
            lost[team] = analyze(p.stop()).lost


def migrate(
    lab: VmLab,
    dest: str,
    hooks: dict[tuple[str, str], Callable[[], None]],
    options: MigrationOptions | None = None,
) -> MigrationReport:
    """Coordinator.migrate in this process; each hook runs once, at its (phase, state)."""
    pending = dict(hooks)
    asked = request(lab, dest)
    if options is not None:
        asked = dataclasses.replace(asked, options=options)

    failed: list[BaseException] = []

    def on_event(event: Event) -> None:
        hook = pending.pop((event.phase, event.state), None)
        if hook is not None:
            try:
                hook()
            except BaseException as exc:  # the workflow only logs a listener's failure
                failed.append(exc)
                raise

    with Journal(co.journal_path()) as journal:
        report = Coordinator(journal).migrate(asked, on_event)
    assert not pending, f"the fault was never injected: no event {list(pending)}"
    if failed:
        raise AssertionError(f"injecting the fault failed: {failed[0]!r}") from failed[0]
    return report


def agent(lab: VmLab, action: str) -> None:
    if action in ("STOP", "CONT"):
        lab.exec(f"kill -{action} $(systemctl show -p MainPID --value {AGENT_UNIT})").check()
    else:
        lab.exec(f"systemctl {action} {AGENT_UNIT}").check()


def job_running(dom: libvirt.virDomain) -> bool:
    return bool(dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE)


def in_postcopy(dom: libvirt.virDomain) -> bool:
    """The source's own word: paused because the VM now runs on the destination."""
    return bool(dom.state() == [libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_POSTCOPY])


class OnceTheJobRuns:
    """A hook that runs *action* on *host*'s domain, in a thread, as soon as its migration
    job is running (the ``migrate started`` event comes just before libvirt starts it),
    or once *ready* says so."""

    def __init__(
        self,
        lab: VmLab,
        host: str,
        action: Callable[[libvirt.virDomain], None],
        ready: Callable[[libvirt.virDomain], bool] = job_running,
        within: float = 30,
    ) -> None:
        self.lab, self.host, self.action, self.ready, self.within = lab, host, action, ready, within
        self.thread: threading.Thread | None = None
        self.acted = False

    def __call__(self) -> None:
        dom = self.lab.domain(self.host)

        def wait_and_act() -> None:
            deadline = time.monotonic() + self.within
            while time.monotonic() < deadline:
                if self.ready(dom):
                    self.action(dom)
                    self.acted = True
                    return
                time.sleep(0.02)

        self.thread = threading.Thread(target=wait_and_act)
        self.thread.start()

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join()


def abort_job(dom: libvirt.virDomain) -> None:
    dom.abortJob()


def record(case: str, result: str, lost: dict[str, int]) -> None:
    fault_matrix.ROWS.append(fault_matrix.Row(case, result, lost))


def expect(report: MigrationReport, *outcomes: Outcome) -> str:
    assert report.outcome in outcomes, (report.outcome, report.error)
    return str(report.outcome)


# -- the cases ---------------------------------------------------------------------------


def test_agent_stopped_at_preflight_refuses_and_changes_nothing(faulty: VmLab) -> None:
    lab = faulty
    src = lab.where()
    before = lab.domain().XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    agent(lab, "stop")
    try:
        with pinging("agent-stopped") as lost:
            hop = co.hop(lab, OTHER[src])
            proc = co.ptmig(lab, src, *migrate_args(DOMAIN_NAME, hop, as_json=False), check=False)
    finally:
        agent(lab, "start")
    assert proc.returncode == 4, proc.stderr
    assert lab.where() == src
    assert lab.domain().XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) == before
    record("agent stopped @preflight", f"refused (exit 4) + {assert_converged(lab)}", lost)


def test_agent_hung_at_preflight_is_refused_within_the_call_deadline(faulty: VmLab) -> None:
    lab = faulty
    src = lab.where()
    agent(lab, "STOP")
    t0 = time.monotonic()
    try:
        with pinging("agent-hung") as lost, pytest.raises(PreflightError):
            migrate(lab, OTHER[src], {})
    finally:
        agent(lab, "CONT")
    took = time.monotonic() - t0
    assert took < 40, took
    assert lab.where() == src
    record(
        "agent hung (SIGSTOP) @preflight",
        f"refused in {took:.0f} s + {assert_converged(lab)}",
        lost,
    )


def test_agent_flooding_garbage_is_refused(faulty: VmLab) -> None:
    lab = faulty
    src = lab.where()
    agent(lab, "stop")
    flood = lab.exec(f"cat /dev/urandom > /dev/virtio-ports/{AGENT_CHANNEL} & echo $!")
    flooder = flood.check().strip().splitlines()[-1]
    t0 = time.monotonic()
    try:
        with pinging("agent-garbage") as lost, pytest.raises(PreflightError):
            migrate(lab, OTHER[src], {})
    finally:
        lab.exec(f"kill {flooder}; sleep 0.5")
        agent(lab, "start")
    took = time.monotonic() - t0
    assert took < 40, took
    assert lab.where() == src
    record(
        "agent channel floods garbage @preflight",
        f"refused in {took:.0f} s + {assert_converged(lab)}",
        lost,
    )


def test_agent_hung_during_switch_rolls_back(faulty: VmLab) -> None:
    lab = faulty
    src = lab.where()
    resume = threading.Timer(20, agent, (lab, "CONT"))

    def hang() -> None:
        agent(lab, "STOP")
        resume.start()

    hooks = {("switch", "started"): hang}
    try:
        with pinging("agent-hung-switch") as lost:
            report = migrate(lab, OTHER[src], hooks)
    finally:
        resume.join()
    result = expect(report, Outcome.ROLLED_BACK, Outcome.FAILED)
    assert lab.where() == src
    record("agent hung 20 s @switch", f"{result} + {assert_converged(lab)}", lost)


def test_agent_stopped_before_bind_gives_degraded_then_repaired(faulty: VmLab) -> None:
    lab = faulty
    src = lab.where()
    with pinging("agent-stopped-bind") as lost:
        report = migrate(lab, OTHER[src], {("migrate", "done"): lambda: agent(lab, "stop")})
    assert lab.where() == OTHER[src]
    result = expect(report, Outcome.DONE_DEGRADED)
    agent(lab, "start")
    record("agent stopped @bind", f"{result} + {assert_converged(lab)}", lost)


def test_guest_that_never_releases_the_device_rolls_back(faulty: VmLab) -> None:
    lab = faulty
    src = lab.where()
    lab.exec(f"echo disable > {HOTPLUG_GPE}").check()
    try:
        with pinging("unplug-refused") as lost:
            report = migrate(lab, OTHER[src], {})
        result = expect(report, Outcome.ROLLED_BACK)
        assert lab.where() == src
        assert teams_on(lab) == {"lan": "primary", "wan": "primary"}
        assert_devices_accounted_for(lab, src)
    finally:
        lab.exec(f"echo enable > {HOTPLUG_GPE}").check()
    # The guest lets go late: the device leaves, and the reconciler plugs another.
    time.sleep(3)
    record("guest never releases the device @unplug", f"{result} + {assert_converged(lab)}", lost)


def test_destination_libvirtd_killed_during_migrate_rolls_back(faulty: VmLab) -> None:
    lab = faulty
    src = lab.where()
    dest = OTHER[src]
    try:
        with pinging("dest-killed") as lost:
            report = migrate(lab, dest, {("migrate", "started"): lambda: lab.kill_host(dest)})
    finally:
        lab.start_host(dest)
    result = expect(report, Outcome.ROLLED_BACK)
    assert lab.where() == src
    record("destination libvirtd killed @migrate", f"{result} + {assert_converged(lab)}", lost)


def test_link_between_hosts_cut_during_migrate_rolls_back(faulty: VmLab) -> None:
    lab = faulty
    src = lab.where()
    dest = OTHER[src]
    netns = next(h.netns for h in HOSTS if h.name == dest)
    cut = OnceTheJobRuns(
        lab, src, lambda _dom: run(["ip", "-n", netns, "link", "set", "mig0", "down"])
    )
    try:
        with pinging("link-cut") as lost:
            report = migrate(lab, dest, {("migrate", "started"): cut})
    finally:
        cut.join()
        run(["ip", "-n", netns, "link", "set", "mig0", "up"])
    result = expect(report, Outcome.ROLLED_BACK)
    assert lab.where() == src
    record("link between hosts cut @migrate", f"{result} + {assert_converged(lab)}", lost)


def test_migration_job_aborted_rolls_back(faulty: VmLab) -> None:
    lab = faulty
    src = lab.where()
    abort = OnceTheJobRuns(lab, src, abort_job)
    with pinging("jobabort") as lost:
        report = migrate(lab, OTHER[src], {("migrate", "started"): abort})
    abort.join()
    result = expect(report, Outcome.ROLLED_BACK)
    assert lab.where() == src
    record("migration job aborted (domjobabort)", f"{result} + {assert_converged(lab)}", lost)


def test_source_replug_failing_in_rollback_leaves_degraded_then_repaired(faulty: VmLab) -> None:
    lab = faulty
    src = lab.where()
    abort = OnceTheJobRuns(lab, src, abort_job)
    hooks = {
        ("unplug", "done"): lambda: co.define_pools(lab, {src: []}),
        ("migrate", "started"): abort,
    }
    try:
        with pinging("replug-fails") as lost:
            report = migrate(lab, OTHER[src], hooks)
        abort.join()
    finally:
        co.define_pools(lab, {src: co.POOL_SLOTS[src]})
    result = expect(report, Outcome.FAILED)
    assert "rollback" in (report.error or ""), report.error
    assert lab.where() == src
    record("source re-plug fails in rollback", f"{result} + {assert_converged(lab)}", lost)


def test_empty_destination_pool_gives_degraded_then_repaired(faulty: VmLab) -> None:
    lab = faulty
    src = lab.where()
    dest = OTHER[src]
    co.define_pools(lab, {dest: []})
    try:
        with pinging("pool-empty") as lost:
            report = migrate(lab, dest, {})
    finally:
        co.define_pools(lab, {dest: co.POOL_SLOTS[dest]})
    result = expect(report, Outcome.DONE_DEGRADED)
    assert report.teams == {"lan": "standby", "wan": "standby"}
    assert lab.where() == dest
    record("destination pool empty", f"{result} + {assert_converged(lab)}", lost)


def test_two_teams_racing_for_the_last_free_device(faulty: VmLab) -> None:
    lab = faulty
    src = lab.where()
    dest = OTHER[src]
    co.define_pools(lab, {dest: co.POOL_SLOTS[dest][:1]})
    try:
        with pinging("last-device") as lost:
            report = migrate(lab, dest, {})
    finally:
        co.define_pools(lab, {dest: co.POOL_SLOTS[dest]})
    result = expect(report, Outcome.DONE_DEGRADED)
    assert sorted(report.teams.values()) == ["primary", "standby"], report.teams
    assert lab.where() == dest
    assert_devices_accounted_for(lab, dest)
    record("two teams race for the last device", f"{result} + {assert_converged(lab)}", lost)


def test_primary_detached_outside_ptmig_before_migrate(faulty: VmLab) -> None:
    """An operator's ``virsh detach-device-alias`` (live only): the metadata still names
    lan's primary.  No switch and no unplug for lan; it gets a destination device."""
    lab = faulty
    src = lab.where()
    dest = OTHER[src]
    teams = {t["name"]: t for t in co.ptmig_json(lab, src, "team-show", DOMAIN_NAME)["teams"]}
    lab.detach_nic(teams["lan"]["primary"]["alias"], config=False)
    with pinging("detached-outside") as lost:
        report = migrate(lab, dest, {})
    result = expect(report, Outcome.DONE)
    assert report.drift == {"lan": "primary-absent", "wan": "plugged"}
    assert report.teams == {"lan": "primary", "wan": "primary"}
    assert lab.where() == dest
    record(
        "primary detached outside ptmig before migrate", f"{result} + {assert_converged(lab)}", lost
    )


KILL_SCRIPT = """
import os, signal, sys
from host.workflow.coordinator import Coordinator
from host.workflow.errors import PreflightError
from host.workflow.journal import Journal
from host.workflow.model import MigrationRequest

journal, phase, state, domain, src, dest, peer = sys.argv[1:]

def on_event(event):
    if (event.phase, event.state) == (phase, state):
        os.kill(os.getpid(), signal.SIGKILL)

Coordinator(Journal(journal)).migrate(
    MigrationRequest(domain, src, dest, unsafe=True, peer_uri=peer), on_event)
"""


@pytest.mark.parametrize(
    "phase,state",
    [
        ("switch", "started"),
        ("unplug", "started"),
        ("migrate", "progress"),
        ("bind", "started"),
    ],
)
def test_coordinator_killed_then_recover(faulty: VmLab, phase: str, state: str) -> None:
    lab = faulty
    src = lab.where()
    dest = OTHER[src]
    with pinging(f"sigkill-{phase}") as lost:
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                KILL_SCRIPT,
                co.journal_path(),
                phase,
                state,
                DOMAIN_NAME,
                lab.hosts[src].uri,
                lab.hosts[dest].uri,
                lab.hosts[dest].tcp_uri,
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        assert len(open_workflows()) == 1
        recovered = co.ptmig_json(lab, src, "recover")
    results = [r["action"] for r in recovered]
    assert len(results) == 1 and results[0] != "still running", recovered
    record(
        f"coordinator SIGKILL @{phase} {state}, recover",
        f"{results[0]} + {assert_converged(lab)}",
        lost,
    )


def test_same_migration_started_twice_runs_once(faulty: VmLab) -> None:
    lab = faulty
    src = lab.where()
    dest = OTHER[src]
    argv = migrate_argv(DOMAIN_NAME, co.hop(lab, dest))
    with pinging("twice") as lost:
        procs = [
            subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=cli_env(co.journal_path()),
            )
            for _ in range(2)
        ]
        outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 6], (codes, outs)
    (done,) = (
        read_migration(subprocess.CompletedProcess(argv, p.returncode, out, err))
        for (out, err), p in zip(outs, procs, strict=True)
        if p.returncode == 0
    )
    assert done.report.outcome is Outcome.DONE, done
    assert lab.where() == dest
    record(
        "same migration started twice",
        f"one done, one refused (exit 6) + {assert_converged(lab)}",
        lost,
    )


# -- cancel and signals: "cancel at each phase", "SIGINT at each phase" ------------------


def wait_for_cancel_request(timeout: float = 60) -> None:
    """Until the open workflow has the cancel request another process is recording."""
    deadline = time.monotonic() + timeout
    with Journal(co.journal_path()) as journal:
        while time.monotonic() < deadline:
            if any(journal.cancel_request(w.id) for w in journal.open_workflows()):
                return
            time.sleep(0.05)
    raise AssertionError("ptmig cancel never recorded its request")


def wait_for_job(lab: VmLab, host: str, timeout: float = 30) -> None:
    dom = lab.domain(host)
    deadline = time.monotonic() + timeout
    while dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE:
        assert time.monotonic() < deadline, "the migration job never started"
        time.sleep(0.05)


@pytest.mark.parametrize("phase", ["preflight", "switch", "unplug", "migrate", "bind"])
def test_ptmig_cancel_from_another_process_at(faulty: VmLab, phase: str) -> None:
    """``ptmig cancel`` (its own process) while ``migrate`` is at *phase*: before the point
    of no return the job is aborted and everything rolls back; at bind it is too late."""
    lab = faulty
    src = lab.where()
    dest = OTHER[src]
    answers: list[subprocess.CompletedProcess[str]] = []
    threads: list[threading.Thread] = []

    def ask() -> None:
        def cancel() -> None:
            answers.append(co.ptmig(lab, src, "cancel", DOMAIN_NAME, "--json", check=False))

        threads.append(threading.Thread(target=cancel))
        threads[-1].start()
        if phase != "bind":
            wait_for_cancel_request()  # the workflow goes on only once it is asked

    job = OnceTheJobRuns(lab, src, lambda _dom: ask())
    hook: Callable[[], None] = job if phase == "migrate" else ask
    t0 = time.monotonic()
    with pinging(f"cancel-{phase}") as lost:
        report = migrate(lab, dest, {(phase, "started"): hook})
        job.join()
        for t in threads:
            t.join()
    took = time.monotonic() - t0
    (proc,) = answers
    answer = json.loads(proc.stdout)
    if phase == "bind":
        assert proc.returncode == 1, proc.stderr
        assert answer["accepted"] is False and "the bind will finish" in answer["message"]
        result = expect(report, Outcome.DONE)
        assert lab.where() == dest and not report.cancelled
    else:
        assert proc.returncode == 0, (proc.stdout, proc.stderr)
        assert (answer["accepted"], answer["cancelled"], answer["outcome"]) == (
            True,
            True,
            "rolled-back",
        ), answer
        assert answer["phase"] == phase, answer
        result = expect(report, Outcome.ROLLED_BACK) + " (cancelled)"
        assert report.cancelled and lab.where() == src
    record(f"ptmig cancel @{phase}", f"{result} in {took:.0f} s + {assert_converged(lab)}", lost)


@pytest.mark.parametrize(
    "signame,phase,times",
    [
        ("SIGINT", "preflight", 1),
        ("SIGINT", "switch", 1),
        ("SIGINT", "unplug", 1),
        ("SIGINT", "migrate", 1),
        ("SIGINT", "bind", 1),
        ("SIGTERM", "migrate", 1),
        ("SIGINT", "migrate", 2),
    ],
)
def test_signal_on_ptmig_migrate_at(faulty: VmLab, signame: str, phase: str, times: int) -> None:
    """Ctrl-C (or SIGTERM) on ``ptmig migrate`` does what cancel does and says so on one
    line; a second Ctrl-C does not leave the workflow open."""
    sig = signal.Signals[signame]
    lab = faulty
    src = lab.where()
    dest = OTHER[src]
    t0 = time.monotonic()
    with pinging(f"{sig.name}-{phase}-{times}") as lost:
        proc = subprocess.Popen(
            migrate_argv(DOMAIN_NAME, co.hop(lab, dest), as_json=False),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(co.journal_path()),
        )
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:  # "phase: state message" (stderr is not a terminal)
            seen.append(line)
            if line.startswith(f"{phase}: started"):
                if phase == "migrate":
                    wait_for_job(lab, src)
                for _ in range(times):
                    proc.send_signal(sig)
                    time.sleep(0.5)
                break
        out, rest = proc.communicate(timeout=300)
    took = time.monotonic() - t0
    stderr = "".join(seen) + rest
    print(stderr)  # shown with the failure (or -rP): the workflow's events, the signal lines
    said = [line for line in stderr.splitlines() if line.startswith(f"ptmig: {sig.name}")]
    assert len(said) == times, stderr
    if phase == "bind":
        assert proc.returncode == 0, stderr
        assert "too late to cancel" in said[0] and "finishing the bind" in said[0]
        assert lab.where() == dest
        result = "done"
    else:
        assert proc.returncode == 4, stderr
        assert said[0].startswith(f"ptmig: {sig.name}: cancelling the migration of"), said
        assert "rolled-back (cancelled)" in out, out
        if times > 1:
            assert "already cancelling" in said[1], said
        assert lab.where() == src
        result = "rolled-back (cancelled)"
    name = f"{sig.name}{' x2' if times > 1 else ''} on ptmig migrate @{phase}"
    record(name, f"{result} in {took:.0f} s + {assert_converged(lab)}", lost)


def test_same_migration_from_both_hosts_coordinators_runs_once(faulty: VmLab) -> None:
    """Two coordinators with journals of their own, one in hosta's network namespace and
    one in hostb's, start the same migration at once: the lease in the domain's metadata
    lets exactly one run; the other is refused (exit 6) and changes nothing."""
    lab = faulty
    src = lab.where()
    dest = OTHER[src]
    other_journal = str(run_dir() / "journal-other-coordinator.sqlite")
    argv = migrate_argv(DOMAIN_NAME, co.hop(lab, dest))
    procs = []
    with pinging("two-coordinators") as lost:
        for net, journal in zip(HOSTS, (co.journal_path(), other_journal), strict=True):
            procs.append(
                subprocess.Popen(
                    ["ip", "netns", "exec", net.netns, *argv],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=cli_env(journal),
                )
            )
        outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 6], (codes, outs)
    refused = next(err for (_, err), p in zip(outs, procs, strict=True) if p.returncode == 6)
    assert "is held by migrate workflow" in refused and "nothing was changed" in refused, refused
    assert lab.where() == dest
    with Journal(other_journal) as journal:
        assert journal.open_workflows() == []
    record(
        "same migration from two coordinators",
        f"one done, one refused by the lease (exit 6) + {assert_converged(lab)}",
        lost,
    )


def ptmig_aliases(dom: libvirt.virDomain) -> set[str]:
    """The aliases of the devices ptmig plugged (``ua-ptmig-...``) in *dom*'s live XML."""
    return {a for a in device_aliases(dom.XMLDesc(0)) if a.startswith("ua-ptmig-")}


# -- faults a datacenter really has (issue 24) ---------------------------------------------
#
# Each row's docstring says what the operator sees and does; the operator's guide has the
# same table ("When a fault hits a migration").


def record_converged(lab: VmLab, case: str, result: str, took: float, lost: dict[str, int]) -> None:
    """The row of a case that ran a migration for *took* seconds, once it converged."""
    record(case, f"{result} in {took:.0f} s + {assert_converged(lab)}", lost)


def ptmig_device_plugged(dom: libvirt.virDomain) -> bool:
    """The bind's first attach has happened on *dom* (it arrived with no primary)."""
    return bool(ptmig_aliases(dom))


def test_destination_libvirtd_restarted_during_bind(faulty: VmLab) -> None:
    """``systemctl restart libvirtd`` on the destination (SIGTERM to its PID, started
    again) once the bind's first device is plugged: the coordinator's connection to it
    is gone.  The VM has moved and keeps running; the operator sees done-degraded (the
    report names the lost connection) and the reconciler plugs and binds what is left."""
    lab = faulty
    src = lab.where()
    dest = OTHER[src]
    restart = OnceTheJobRuns(
        lab, dest, lambda _dom: lab.restart_host(dest), ready=ptmig_device_plugged
    )
    t0 = time.monotonic()
    with pinging("dest-restarted-bind") as lost:
        report = migrate(lab, dest, {("bind", "started"): restart})
        restart.join()
    took = time.monotonic() - t0
    assert restart.acted, "no device was ever plugged at the destination"
    result = expect(report, Outcome.DONE, Outcome.DONE_DEGRADED)
    assert lab.where() == dest
    record_converged(lab, "destination libvirtd restarted @bind", result, took, lost)


def test_coordinator_loses_the_destination_after_the_point_of_no_return(faulty: VmLab) -> None:
    """The destination's libvirtd closes the coordinator's connection (``virt-admin
    client-disconnect``: a network partition or a libvirtd that dropped its client) as
    soon as the VM has moved.  The coordinator cannot bind there: done-degraded, the
    workflow closed, the lease not left behind; ``ptmig recover`` finds nothing open and
    the reconciler binds the teams."""
    lab = faulty
    src = lab.where()
    dest = OTHER[src]
    closed: list[str] = []

    def cut() -> None:
        closed.extend(lab.disconnect_clients(dest, os.getpid()))

    t0 = time.monotonic()
    with pinging("dest-connection-lost") as lost:
        report = migrate(lab, dest, {("migrate", "done"): cut})
    took = time.monotonic() - t0
    assert closed, "the coordinator had no connection to the destination to close"
    result = expect(report, Outcome.DONE_DEGRADED)
    assert "after the migration" in (report.error or ""), report.error
    assert lab.where() == dest
    assert co.ptmig_json(lab, dest, "recover") == []
    case = "coordinator loses the destination after the move"
    record_converged(lab, case, f"{result} (recover: nothing open)", took, lost)


#: What systemd prints on the guest's console once the agent has stopped at shutdown
#: (the unit's name in colour and cut to the console's width: "ptmig-agent.servic…").
AGENT_STOPPED = re.compile(r"Stopped \S*ptmig-agent\.servi")


def test_guest_rebooted_during_switch(faulty: VmLab) -> None:
    """``systemctl reboot`` in the guest as the switch starts, the switch going on once
    the agent has stopped: the VM stays on the source (rolled-back, or failed when the
    rollback could not reach the rebooting guest, exit 5).  The guest boots with its
    primaries still plugged; the operator waits for it, and the reconciler puts any team
    left on its standby back on its primary."""
    lab = faulty
    src = lab.where()
    console = lab.console(src)
    since = console.log_size()

    def reboot() -> None:
        with console.typing("systemctl reboot"):  # the shell does not live to say it is done
            console.wait_for(AGENT_STOPPED, since, 60, "the agent stopped")

    t0 = time.monotonic()
    with pinging("guest-rebooted-switch") as lost:
        report = migrate(lab, OTHER[src], {("switch", "started"): reboot})
        took = time.monotonic() - t0
        assert lab.where() == src
        lab.await_reboot(src, since)
    result = expect(report, Outcome.ROLLED_BACK, Outcome.FAILED)
    agent(lab, "start")  # waits for the start job the boot queued, if it is still running
    record_converged(lab, "guest rebooted @switch", f"{result} (rebooted)", took, lost)


#: What a package upgrade runs in the guest: the installed package's own postinst, as
#: dpkg calls it after unpacking a new version (byte-compiles, then restarts the unit).
AGENT_UPGRADE = (
    "/var/lib/dpkg/info/ptmig-agent.postinst configure "
    "\"$(dpkg-query -W -f='${Version}' ptmig-agent)\""
)


def agent_pid(lab: VmLab) -> str:
    return lab.exec(f"systemctl show -p MainPID --value {AGENT_UNIT}").check().strip()


@pytest.mark.parametrize("phase,state", [("switch", "done"), ("bind", "started")])
def test_agent_upgraded_during_migration(faulty: VmLab, phase: str, state: str) -> None:
    """The agent's package upgraded in the guest (its postinst: byte-compile, restart the
    unit) at *phase*: after the switch (the teams on their standby, the source's client
    session broken) or as the bind starts (its calls meet an agent still starting).  The
    operator sees done; the agent runs with a new PID."""
    lab = faulty
    src = lab.where()
    before = agent_pid(lab)
    t0 = time.monotonic()
    with pinging(f"agent-upgraded-{phase}") as lost:
        report = migrate(lab, OTHER[src], {(phase, state): lambda: lab.exec(AGENT_UPGRADE).check()})
    took = time.monotonic() - t0
    result = expect(report, Outcome.DONE)
    assert lab.where() == OTHER[src]
    after = agent_pid(lab)
    assert after not in (before, "0"), (before, after)
    record_converged(lab, f"agent upgraded (postinst) @{phase} {state}", result, took, lost)


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_journal_full_or_read_only_is_refused_before_anything_changes(
    faulty: VmLab, fault: str
) -> None:
    """``ptmig migrate`` with its journal on a filesystem that is full (a small tmpfs
    filled by dd) or read-only (remounted so): one line saying which and what to do,
    exit 1, and the domain exactly as it was, on its host, with no lease."""
    lab = faulty
    src = lab.where()
    dest = OTHER[src]
    mnt = run_dir() / f"journal-{fault}"
    mnt.mkdir(exist_ok=True)
    run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "ptmig-journal", str(mnt)])
    try:
        journal = mnt / "journal.sqlite"
        with Journal(journal) as j:  # a journal that was in use: a workflow in it
            j.finish(j.begin("migrate", "0" * 32, "earlier", "a", "b", {}), "done", {})
        if fault == "full":
            subprocess.run(["dd", "if=/dev/zero", f"of={mnt / 'filler'}", "bs=64k"], check=False)
        else:
            run(["mount", "-o", "remount,ro", str(mnt)])
        dom = lab.domain(src)
        before = (dom.XMLDesc(0), dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        with pinging(f"journal-{fault}") as lost:
            proc = subprocess.run(
                migrate_argv(DOMAIN_NAME, co.hop(lab, dest), as_json=False),
                capture_output=True,
                text=True,
                env=cli_env(str(journal)),
                timeout=300,
            )
    finally:
        run(["umount", str(mnt)])
        mnt.rmdir()
    said = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr
    assert len(said) == 1 and said[0].startswith("ptmig: ") and " journal " in said[0], said
    assert f"its filesystem is {fault}" in said[0] and "nothing was changed" in said[0], said
    assert lab.where() == src
    dom = lab.domain(src)
    assert (dom.XMLDesc(0), dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)) == before
    record(
        f"journal's filesystem {fault}",
        f"refused (exit 1), nothing changed + {assert_converged(lab)}",
        lost,
    )


def test_destination_qemu_killed_during_postcopy_fails_and_undoes_nothing(faulty: VmLab) -> None:
    """Post-copy's own risk: the destination dies while it runs the VM.  Nothing can be
    rolled back (the source's memory is stale), so ptmig must not try: failed, with what
    to do, at once, no device plugged on the paused source.  Then the operator's way out
    (destroy, start again) and the lab's guest is a fresh one.  Last in the module."""
    lab = faulty
    src = lab.where()
    dest = OTHER[src]
    before = ptmig_aliases(lab.domain(src))
    pidfile = lab.hosts[dest].path_inside(f"/run/libvirt/qemu/{DOMAIN_NAME}.pid")

    def kill_destination_qemu(_dom: libvirt.virDomain) -> None:
        os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)  # by the PID libvirt wrote

    kill = OnceTheJobRuns(lab, src, kill_destination_qemu, ready=in_postcopy, within=60)
    # Post-copy at the first sample (after 0 s) and a slow pre-copy, so the job is in
    # post-copy for seconds, not milliseconds.
    options = MigrationOptions(postcopy=True, postcopy_after_s=0, bandwidth_mib_s=8)
    t0 = time.monotonic()
    with pinging("postcopy-dest-killed") as lost:
        report = migrate(lab, dest, {("migrate", "started"): kill}, options)
    took = time.monotonic() - t0
    kill.join()
    assert kill.acted, "post-copy never started"
    result = expect(report, Outcome.FAILED)
    assert "failed in post-copy" in report.error and "virsh destroy" in report.error
    assert took < 120, took  # no bind through a frozen agent, no 30 s waits per team
    state, reason = lab.domain(src).state()
    assert state == libvirt.VIR_DOMAIN_PAUSED, (state, reason)
    after = ptmig_aliases(lab.domain(src))
    assert after <= before, f"plugged on the paused source: {after - before}"
    with Journal(co.journal_path()) as journal:
        assert journal.open_workflows() == []
        steps = [(s.name, s.status) for s in journal.steps(report.workflow_id)]
    assert ("postcopy", StepStatus.FAILED) in steps
    undoing = {StepStatus.COMPENSATING, StepStatus.COMPENSATED}
    assert not [step for step in steps if step[1] in undoing], steps
    # The operator's way out, as the report says; then the lab's guest again.
    lab.remove_guest()
    lab.boot_guest(GuestImage(Path(lab.state.image)))
    wait_reachable(GUEST_IP)
    co.configure(lab)
    record(
        "destination QEMU killed in post-copy",
        f"{result} in {took:.0f} s, nothing undone, source paused + "
        f"(destroyed, started again) {assert_converged(lab)}",
        lost,
    )
