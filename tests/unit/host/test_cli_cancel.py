"""``ptmig cancel`` as a process: the clear error when there is nothing to cancel."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from host.workflow.journal import Journal

REPO = Path(__file__).resolve().parents[3]


def ptmig(journal: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "host.cli", "--journal", str(journal), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def test_cancel_with_nothing_running_fails_clearly_and_records_nothing(tmp_path: Path) -> None:
    journal = tmp_path / "journal.sqlite"
    proc = ptmig(journal, "cancel", "web1")
    assert proc.returncode == 7, proc  # not found
    assert proc.stderr.startswith("ptmig: cancel web1: web1 has no running workflow in journal ")
    assert "nothing to cancel, nothing changed" in proc.stderr
    with Journal(journal) as j:
        assert j.recent() == []


def test_cancel_refuses_a_workflow_that_is_not_a_migration(tmp_path: Path) -> None:
    journal = tmp_path / "journal.sqlite"
    with Journal(journal) as j:
        wf = j.begin("failover", "u-1", "web1", "a", "a", {})
    proc = ptmig(journal, "cancel", "web1", "--wait", "0")
    assert proc.returncode == 7, proc
    assert "is a failover; only a migration can be cancelled" in proc.stderr
    with Journal(journal) as j:
        assert j.cancel_request(wf) is None
