"""docs/example_client.py against a real ptmigd (unix socket) over the in-memory world."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from workflow_fakes import A, B, World

from host.daemon import ListenConfig, serve
from host.workflow.journal import Journal

EXAMPLE = Path(__file__).resolve().parents[3] / "docs" / "example_client.py"
SLOTS = ["ptv-b7=52:54:00:cb:00:07", "ptv-b8=52:54:00:cb:00:08"]


def test_the_example_client_defines_a_pool_and_a_team_and_migrates(
    world: World, journal_path: Path, short_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = importlib.util.spec_from_file_location("example_client", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    with Journal(journal_path) as journal:
        daemon = serve(world.coordinator(journal), ListenConfig(socket=short_tmp / "r" / "s.sock"))
        try:
            code = example.main(
                ["--socket", str(daemon.socket), "vm1", A, B, *(f"--pool-slot={s}" for s in SLOTS)]
            )
        finally:
            daemon.stop(grace=1)
            assert daemon.wait_for_workflows(timeout=30)
        kinds = [w.kind for w in journal.recent()]

    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0] == f"pool lab on {B}: 2 of 2 free"
    assert "preflight: started" in out and "bind: done" in out
    assert "vm1: done {'lan': 'primary', 'wan': 'primary'}" in out
    assert out[-2:] == [
        "team lan: on primary, primary ua-ptmig-lan-1",
        "team wan: on primary, primary ua-ptmig-wan-1",
    ]
    assert world.running_on("vm1") == [B]
    assert set(world.active_taps("vm1").values()) == {"ptv-b7", "ptv-b8"}
    assert kinds == ["migrate", "team-set", "pool-define"]
