"""The lab as a pytest fixture: one lab per test module, torn down and checked at the end.

Set PTMIG_LAB_REUSE=1 to run against a lab already started with ``ptmig-lab up`` (it is
then left up).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from ptmig.serial_session import AGENT_CHANNEL

from host.agent_client import AgentClient, AgentEndpoint
from host.hypervisor import Hypervisor
from lab import fabric
from lab.guest import DOMAIN_NAME
from lab.hosts import is_alive
from lab.image import DEFAULT_SUITE, lab_recipe
from lab.vmlab import LabState, VmLab

if TYPE_CHECKING:  # the nested lab's modules are imported by its tests only
    from lab.nested.vlab import VfioLab

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest) -> Iterator[VmLab]:
    """A fresh lab per test module: each module changes the guest's devices its own way.

    The guest is Debian 12 unless the module parametrizes ``lab`` (indirectly) with
    another suite of lab.image.GUEST_SUITES.
    """
    suite = getattr(request, "param", DEFAULT_SUITE)
    reuse = os.environ.get("PTMIG_LAB_REUSE") == "1"
    lab = VmLab()
    if reuse and LabState.load() is not None:
        yield lab
        return
    try:
        lab.up(lab_recipe(suite))
    except BaseException:
        lab.down()
        raise
    pids = dict(lab.state.pids)
    try:
        yield lab
    finally:
        lab.down()
    # down must leave nothing of the lab behind.
    left = fabric.existing_netns() & set(fabric.all_netns())
    assert not left, f"namespaces left after down: {left}"
    alive = {name: pid for name, pid in pids.items() if is_alive(pid)}
    assert not alive, f"daemons left after down: {alive}"


@pytest.fixture(scope="session")
def host_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The host package (ptmig_*.deb) of this checkout, built once per run."""
    out = tmp_path_factory.mktemp("packages")
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "build-packages.sh"), "host", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "PTMIG_PACKAGERS": "deb"},
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    return Path(result.stdout.split()[0])


@pytest.fixture
def guest_on_hosta(lab: VmLab) -> VmLab:
    """Tests that start from hosta get the guest there."""
    if lab.where() != "hosta":
        lab.migrate("hosta")
    return lab


#: Seconds a failed nested test's evidence may take (a stall report with its KVM trace
#: takes about a minute), and its restart check: a libvirtd in L1 that neither answers nor
#: closes its connection must not hold the run until pytest's timeout (a CI run's did).
EVIDENCE_S = 300.0
RESTART_CHECK_S = 120.0
#: The console lines of each lab guest a failed test's report keeps.
CONSOLE_TAIL_LINES = 80
#: What a failed lab test asks the main guest itself: how long it has been up (a reboot
#: shows here; a new login on the console only looks like one: its getty logs in again and
#: prints "Last login"), its journal's warnings since boot, and the agent's and the
#: console's units (the console takes only emergency kernel messages: an OOM kill, an
#: agent that died, are in the journal alone).
GUEST_ACCOUNT = (
    "cat /proc/uptime; "
    "journalctl -b --no-pager -o short-monotonic -p warning -n 40; "
    "journalctl -b --no-pager -o short-monotonic -n 40 -u ptmig-agent -u serial-getty@ttyS0"
)
GUEST_ACCOUNT_S = 30.0


def guest_account(lab: VmLab) -> str:
    """The main guest's answer to GUEST_ACCOUNT, or why there is none."""
    try:
        return lab.exec(GUEST_ACCOUNT, timeout=GUEST_ACCOUNT_S).output
    except Exception as exc:  # the failure it reports stands
        return f"not read: {type(exc).__name__}: {exc}"


def bounded_evidence(vlab: VfioLab) -> list[tuple[str, str]]:
    """``VfioLab.evidence_or_why``, or why it was not had within EVIDENCE_S."""
    from lab.nested.vlab import within

    try:
        return within(EVIDENCE_S, "the nested lab's evidence", vlab.evidence_or_why)
    except Exception as exc:  # the failure it reports stands
        return [("nested lab report", f"failed: {type(exc).__name__}: {exc}")]


def l1_restart_after(vlab: VfioLab, tries: int = 4) -> str | None:
    """``VfioLab.l1_restart_report``, asked again while L1 may still be booting (after a
    panic it boots again in about 15 s; each unanswered ask waits out its console's 20 s);
    None if L1 did not restart."""
    from lab.nested.vlab import within

    for _ in range(tries):
        try:
            now = within(RESTART_CHECK_S, "L1's boot id", vlab.l1_boot_id)
        except Exception:  # no answer this time
            continue
        if now is not None:  # L1 answers: a new boot is told, the same one is no restart
            return vlab.l1_restart_report(now)
    return None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failing lab test names the logs to read; one of the nested lab says what L1 saw
    of L2 if L2 stopped answering (``VfioLab.stall_report``).  A nested test that failed
    because the L2 hang took L2 (``is_l2_hang``: spinning in its kernel with interrupts
    off, an interrupt delivered below it; docs/lab.md), or because L1 itself restarted
    after failing in L2's vCPU thread (``is_l1_failure_under_l2``), is reported as an
    expected failure with that report, not a pass: the lab's QEMU/KVM, not ptmig (the
    next test boots L2, or the whole lab, again)."""
    hang = ""
    if call.excinfo is not None:
        funcargs = getattr(item, "funcargs", {})
        if "lab" in funcargs:
            lab: VmLab = funcargs["lab"]
            logs = lab.logs()
            item.add_report_section(call.when, "lab logs", "\n".join(map(str, logs)))
            # The next lab overwrites these files: keep the guests' last console lines (a
            # guest that panicked and rebooted said why only there).
            for path in logs:
                if path.name.endswith("console.log") and path.is_file():
                    tail = path.read_text(errors="replace").splitlines()[-CONSOLE_TAIL_LINES:]
                    item.add_report_section(call.when, f"end of {path}", "\n".join(tail))
            item.add_report_section(call.when, "the guest's own account", guest_account(lab))
        from lab.nested.hangwatch import HangWatch
        from lab.nested.vlab import VfioLab, is_l1_failure_under_l2, is_l2_hang, within

        nested = [value for value in funcargs.values() if isinstance(value, VfioLab)]
        watched = [v.report for v in funcargs.values() if isinstance(v, HangWatch) and v.report]
        if nested and call.when == "call" and watched and is_l2_hang(watched[0]):
            # the watch found the hang and destroyed L2: its report is the evidence
            item.add_report_section(call.when, "L2 hang watch", watched[0])
            hang = watched[0]
        elif nested and call.when == "call":
            vlab = nested[0]
            for title, text in bounded_evidence(vlab):
                item.add_report_section(call.when, title, text)
                if title == "L2 stall report" and is_l2_hang(text):
                    hang = text
                if title in ("L1 restart report", "L1 console report") and (
                    is_l1_failure_under_l2(text)
                ):
                    hang = text
            if not hang:  # the same fault's other face: L2 reset (a triple fault)
                try:
                    hang = within(RESTART_CHECK_S, "L2's boot id", vlab.restart_report) or ""
                except Exception as exc:  # the failure stands as it is
                    item.add_report_section(call.when, "L2 restart check", f"failed: {exc}")
                    # L2's console silent: L1 may have gone down meanwhile (a run of
                    # 2026-12-06 saw L1 panic during this very check)
                    restarted = l1_restart_after(vlab)
                    if restarted is not None:
                        item.add_report_section(call.when, "L1 restart report", restarted)
                        if is_l1_failure_under_l2(restarted):
                            hang = restarted
    report = yield
    if hang and report.failed:
        reporter = item.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:  # an expected failure's sections are not printed: this is
            reporter.write_line(f"\n{item.nodeid}: the L2 hang; its stall report:\n{hang}")
        report.outcome = "skipped"
        report.wasxfail = (
            "the nested lab's L2 hang or reset, or L1 failing in L2's vCPU thread (an "
            "interrupt delivered twice by L0's TCG, below both kernels: docs/lab.md), not "
            "ptmig; the evidence is in this report"
        )
    return report


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> bool | None:
    """A nested lab test that runs out of time (a libvirt call into L1 that never
    returns: hostb's libvirtd deadlock in docs/lab.md) first prints what the lab sees,
    every stuck libvirtd's thread stacks or L2's stall report, then pytest-timeout's
    thread method dumps the stacks and ends the run as it would."""
    if item.get_closest_marker("vfio") is None or settings.method != "thread":
        return None
    if not settings.timeout or settings.timeout <= 0:
        return None
    import pytest_timeout

    from lab.nested import run_dir
    from lab.nested.vlab import VfioLab

    def expire() -> None:
        evidence = bounded_evidence(VfioLab())  # the timeout must still end the run
        text = "".join(f"=== {title}\n{body}\n" for title, body in evidence)
        saved = run_dir() / f"timeout-{item.name}-{int(time.time())}.txt"
        with contextlib.suppress(OSError):
            saved.write_text(text)
        # captured: pytest-timeout prints the captured output before its own dump
        print(f"nested lab at the timeout (also in {saved}):\n{text}", flush=True)
        pytest_timeout.timeout_timer(item, settings)

    timer = threading.Timer(settings.timeout, expire)
    timer.name = f"nested timeout {item.nodeid}"

    def cancel() -> None:
        timer.cancel()
        timer.join()

    item.cancel_timeout = cancel  # type: ignore[attr-defined]  # pytest-timeout's cancel hook
    timer.start()
    return True


@pytest.fixture
def agent_of(lab: VmLab) -> Iterator[Callable[[], AgentClient]]:
    """Opens an AgentClient to the guest on whichever host runs it, over its real channel."""
    opened: list[tuple[Hypervisor, AgentClient]] = []

    def open_client() -> AgentClient:
        hv = Hypervisor(lab.hosts[lab.where()].uri)
        dom = hv.domain(DOMAIN_NAME)
        client = AgentClient(AgentEndpoint(serial=lambda: dom.open_channel(AGENT_CHANNEL)))
        opened.append((hv, client))
        return client

    yield open_client
    for hv, client in opened:
        client.close()
        hv.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The fault matrix (tests/e2e/test_fault_matrix.py), when its cases ran."""
    import fault_matrix

    if fault_matrix.ROWS:
        terminalreporter.write_sep("=", "fault matrix")
        for line in fault_matrix.table():
            terminalreporter.write_line(line)
