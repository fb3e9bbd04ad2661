"""The lab as a pytest fixture: one lab per test module, torn down and checked at the end.

Set PTMIG_LAB_REUSE=1 to run against a lab already started with ``ptmig-lab up`` (it is
then left up).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from ptmig.serial_session import AGENT_CHANNEL

from host.agent_client import AgentClient, AgentEndpoint
from host.hypervisor import Hypervisor
from lab import fabric
from lab.guest import DOMAIN_NAME
from lab.hosts import is_alive
from lab.image import DEFAULT_SUITE, lab_recipe
from lab.vmlab import LabState, VmLab

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


def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> None:
    """A failing lab test names the logs to read; one of the nested lab says what L1 saw
    of L2 if L2 stopped answering (``VfioLab.stall_report``)."""
    if call.excinfo is None:
        return
    funcargs = getattr(item, "funcargs", {})
    if "lab" in funcargs:
        lab: VmLab = funcargs["lab"]
        item.add_report_section(call.when, "lab logs", "\n".join(map(str, lab.logs())))
    from lab.nested.vlab import VfioLab

    nested = [value for value in funcargs.values() if isinstance(value, VfioLab)]
    if nested and call.when == "call":
        try:
            stall = nested[0].stall_report()
        except Exception as exc:  # a report must not hide the failure it reports
            stall = f"the stall report failed: {type(exc).__name__}: {exc}"
        if stall:
            item.add_report_section(call.when, "L2 stall report", stall)


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
