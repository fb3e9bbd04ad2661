"""VmLab's warm-up of the hosts' QEMU capabilities, against libvirt's test driver."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pytest

from lab.vmlab import VmLab


@dataclass
class _Host:
    name: str
    uri: str


def test_warm_capabilities_asks_every_host_and_an_unreachable_one_only_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("PTMIG_LAB_DIR", str(tmp_path))  # no shared lab state is read
    lab = VmLab()
    lab.hosts = {  # type: ignore[dict-item]
        "hosta": _Host("hosta", "test:///default"),
        "hostb": _Host("hostb", f"qemu+unix:///system?socket={tmp_path}/no-such-socket"),
    }
    with caplog.at_level(logging.INFO, logger="lab.vmlab"):
        lab.warm_capabilities()
    assert "hostb: no connection to warm its capabilities" in caplog.text
    assert "hosta:" not in caplog.text  # answered
    assert "QEMU capabilities of both hosts ready" in caplog.text
