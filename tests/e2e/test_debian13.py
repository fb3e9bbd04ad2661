"""A second guest distribution: Debian 13 (trixie), moved there and back by ptmig.

The agent's .deb is installed into the trixie image with dpkg, exactly as into Debian 12's;
its own python3-grpcio, python3-protobuf and python3-pyroute2 and systemd run it.  The
agent's e2e tests run against this guest too (test_agent.py is parametrized by suite).

The coordinator here runs on Debian 12's own /usr/bin/python3 with its python3-libvirt,
python3-grpcio and python3-protobuf, not the virtualenv's: the host side must work on the
distribution's packages as well as on PyPI's.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest
from migration_checks import there_and_back

from lab import coordinated as co
from lab.ptmig import HOST_PYTHON_ENV
from lab.vmlab import VmLab

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.parametrize("lab", ["trixie"], indirect=True, scope="module"),
]

SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.fixture(scope="module")
def on_debian_python() -> Iterator[str]:
    probe = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import libvirt, grpc, google.protobuf"],
        capture_output=True,
        text=True,
    )
    assert probe.returncode == 0, (
        "the bootstrap installs python3-libvirt, -grpcio and -protobuf: " + probe.stderr
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(HOST_PYTHON_ENV, SYSTEM_PYTHON)
        yield SYSTEM_PYTHON


@pytest.fixture(scope="module")
def coordinated(lab: VmLab, on_debian_python: str) -> VmLab:
    co.configure(lab)
    return lab


def test_the_guest_is_debian_13_with_its_own_agent_stack(coordinated: VmLab) -> None:
    lab = coordinated
    assert lab.exec("cut -d. -f1 /etc/debian_version").check().strip() == "13"
    versions = lab.exec(
        "dpkg-query -W -f='${Package} ${Version}\\n' ptmig-agent python3 python3-grpcio "
        "python3-protobuf python3-pyroute2 systemd"
    ).check()
    print(versions)
    assert "ptmig-agent 0." in versions
    assert lab.exec("systemctl is-active ptmig-agent").check().strip() == "active"


def test_migrate_there_and_back_with_the_coordinator_on_debian_python(
    coordinated: VmLab, record_property: pytest.RecordProperty
) -> None:
    assert os.environ[HOST_PYTHON_ENV] == SYSTEM_PYTHON
    there_and_back(coordinated, record_property)
