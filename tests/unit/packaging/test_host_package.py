"""The host side's .deb and .rpm (ptmig, ptmigd, the contract), their man pages and completion.

Built by scripts/build-packages.sh host; nothing is installed on this machine (the
installation into a clean Debian 12 root is tests/e2e/test_host_package.py).
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from package_tools import (
    PACKAGING,
    REPO,
    SYSTEM_PYTHON,
    Packages,
    build,
    deb_field,
    deb_listing,
    project_version,
    run,
    unit_settings,
    unpack,
)

PRIVATE = "/usr/lib/ptmig"
DEB_UNIT = "/lib/systemd/system/ptmigd.service"
MAN_PAGES = {
    "/usr/share/man/man1/ptmig.1.gz",
    "/usr/share/man/man8/ptmigd.8.gz",
    "/usr/share/man/man5/ptmigd.toml.5.gz",
}
COMPLETION = "/usr/share/bash-completion/completions/ptmig"
#: Installed path -> the repository's file (not conffiles: the operator copies them).
MONITORING = {
    "/usr/share/ptmig/monitoring/ptmig-alerts.yml": PACKAGING / "host/monitoring/ptmig-alerts.yml",
    "/usr/share/ptmig/monitoring/ptmig-dashboard.json": PACKAGING
    / "host/monitoring/ptmig-dashboard.json",
}
FILES = {
    "/usr/bin/ptmig",
    "/usr/sbin/ptmigd",
    "/etc/ptmig/ptmigd.toml",
    COMPLETION,
    *MAN_PAGES,
    *MONITORING,
    f"{PRIVATE}/host/cli.py",
    f"{PRIVATE}/host/daemon/main.py",
    f"{PRIVATE}/host/hypervisor/__init__.py",
    f"{PRIVATE}/host/hypervisor/domain.py",
    f"{PRIVATE}/ptmig/v1/coordinator_pb2.py",
    f"{PRIVATE}/ptmig/v1/coordinator_pb2_grpc.py",
    f"{PRIVATE}/ptmig/v1/guest_agent_pb2.py",
}


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> Packages:
    return build("host", "ptmig", tmp_path_factory.mktemp("packages"))


@pytest.fixture(scope="module")
def deb_root(packages: Packages, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return unpack(packages.deb, tmp_path_factory.mktemp("debroot"))


def test_deb_depends_on_the_distribution_libraries_and_only_recommends_rich(
    packages: Packages,
) -> None:
    assert deb_field(packages.deb, "Package") == "ptmig"
    assert deb_field(packages.deb, "Version") == f"{project_version()}-1"
    assert deb_field(packages.deb, "Depends") == (
        "python3 (>= 3.11), python3-libvirt, python3-grpcio (>= 1.51), python3-protobuf (>= 3.21)"
    )
    assert deb_field(packages.deb, "Recommends") == "python3-rich, python3-prometheus-client"
    assert "pyroute2" not in deb_field(packages.deb, "Depends")


def test_deb_files(packages: Packages) -> None:
    listing = deb_listing(packages.deb)
    files = {p for p, mode in listing.items() if not mode.startswith("d")}
    assert FILES | {DEB_UNIT} <= files
    tree = {p for p in files if p.startswith(PRIVATE + "/")}
    assert all(p.endswith(".py") for p in tree), sorted(tree)
    assert not any(part in p for p in files for part in ("/guest_agent/", "/lab/", "__pycache__"))
    assert listing["/usr/bin/ptmig"] == listing["/usr/sbin/ptmigd"] == "-rwxr-xr-x"
    result = run("dpkg-deb", "-I", packages.deb, "conffiles")
    assert result.stdout.split() == ["/etc/ptmig/ptmigd.toml"]


def test_the_monitoring_files_are_the_repositorys(packages: Packages, deb_root: Path) -> None:
    listing = deb_listing(packages.deb)
    for installed, source in MONITORING.items():
        assert listing[installed] == "-rw-r--r--"
        assert (deb_root / installed.lstrip("/")).read_bytes() == source.read_bytes()


def test_rpm_requires_and_files(packages: Packages) -> None:
    if shutil.which("rpm") is None:
        pytest.skip("rpm not installed (apt-get install rpm) to inspect the .rpm")
    result = run("rpm", "-qp", "--requires", packages.rpm)
    requires = {r.strip() for r in result.stdout.splitlines() if not r.startswith("rpmlib(")}
    assert requires == {"python3 >= 3.11", "python3-libvirt", "python3-grpcio", "python3-protobuf"}
    assert run("rpm", "-qp", "--recommends", packages.rpm).stdout.split() == [
        "python3-rich",
        "python3-prometheus-client",
    ]
    paths = set(run("rpm", "-qlp", packages.rpm).stdout.split())
    assert FILES | {"/usr/lib/systemd/system/ptmigd.service"} <= paths
    assert DEB_UNIT not in paths


def test_maintainer_scripts_are_the_agents_made_for_ptmigd(
    packages: Packages, tmp_path: Path
) -> None:
    """One set of scripts, staged per package: ptmigd's unit and tree, no udev reload."""
    result = run("dpkg-deb", "-e", packages.deb, tmp_path / "control")
    assert result.returncode == 0, result.stderr
    for control in ("postinst", "prerm", "postrm"):
        text = (tmp_path / "control" / control).read_text()
        assert "unit=ptmigd.service\n" in text
        assert "\nunit=ptmig-agent" not in text and "/usr/lib/ptmig-agent" not in text
        if control != "prerm":
            assert "\nudev=no\n" in text
        if control == "postinst":
            assert "\nsysuser=\n" in text  # ptmigd runs as root: no user is made


def test_launchers_run_the_private_tree_on_the_distribution_python(
    deb_root: Path, tmp_path: Path
) -> None:
    probe = run(SYSTEM_PYTHON, "-I", "-c", "import libvirt, grpc, google.protobuf")
    if probe.returncode != 0:
        pytest.skip("python3-libvirt/-grpcio/-protobuf not installed for /usr/bin/python3")
    # A decoy on PYTHONPATH and in the working directory must not be imported (-I).
    decoy = tmp_path / "host"
    decoy.mkdir()
    (decoy / "__init__.py").write_text("raise SystemExit('decoy imported')\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)}
    for launcher, usage in (
        ("usr/bin/ptmig", "usage: ptmig"),
        ("usr/sbin/ptmigd", "usage: ptmigd"),
    ):
        text = (deb_root / launcher).read_text()
        assert text.count(f'"{PRIVATE}"') == 1
        relocated = tmp_path / Path(launcher).name
        relocated.write_text(text.replace(f'"{PRIVATE}"', f'"{deb_root}{PRIVATE}"'))
        relocated.chmod(0o755)
        result = run(relocated, "--help", cwd=tmp_path, env=env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(usage), result.stdout[:200]
    result = run(
        tmp_path / "ptmigd",
        "--config",
        deb_root / "etc/ptmig/ptmigd.toml",
        "--check-config",
        env=env,
    )
    assert result.returncode == 0, result.stderr


# --- ptmigd's unit -----------------------------------------------------------------


def test_unit_settings() -> None:
    unit = unit_settings((PACKAGING / "host" / "ptmigd.service").read_text())
    assert unit["ExecStart"] == ["/usr/sbin/ptmigd --config /etc/ptmig/ptmigd.toml"]
    assert unit["CapabilityBoundingSet"] == [""]
    assert unit["RuntimeDirectory"] == ["ptmig"] and unit["StateDirectory"] == ["ptmig"]
    assert unit["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    assert unit["RestartPreventExitStatus"] == ["2"]  # a configuration error


def test_unit_offline_exposure(tmp_path: Path) -> None:
    """Guards against a hardening regression; the lab guest's systemd gives the real number."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed")
    unit = PACKAGING / "host" / "ptmigd.service"
    result = run(tool, "security", "--offline=true", "--threshold=20", unit)
    if "Unknown command" in result.stderr or "unrecognized option" in result.stderr:
        pytest.skip("this systemd-analyze has no offline security review")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    exposure = re.search(r"Overall exposure level for ptmigd.service: ([\d.]+)", result.stdout)
    assert exposure and float(exposure[1]) <= 2.0, result.stdout[-400:]


# --- Man pages and completion ------------------------------------------------------


def man_text(deb_root: Path, page: str) -> str:
    """The page as man renders it, hyphenation and justification off."""
    raw = gzip.decompress((deb_root / page.lstrip("/")).read_bytes()).decode()
    if shutil.which("man") is None:
        pytest.skip("man not installed")
    result = subprocess.run(
        ["man", "-l", "-"],
        input=raw,
        capture_output=True,
        text=True,
        env={
            "PATH": "/usr/bin:/bin",
            "MANWIDTH": "250",
            "MAN_KEEP_FORMATTING": "",
            "MANROFFOPT": "-rHY=0",
        },
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return re.sub(r".\x08", "", result.stdout)


def parser_words(factory: str) -> tuple[list[str], list[str]]:
    """(sub-commands, options) of the parser `factory` builds, from the repository's code."""
    sys_path = [str(REPO), str(REPO / "protos")]
    code = (
        "import sys, argparse, importlib, json\n"
        f"sys.path[:0] = {sys_path!r}\n"
        f"module, fn = {factory!r}.split(':')\n"
        "p = getattr(importlib.import_module(module), fn)()\n"
        "subs, opts = [], []\n"
        "def walk(p):\n"
        "    for a in p._actions:\n"
        "        opts.extend(a.option_strings)\n"
        "        if isinstance(a, argparse._SubParsersAction):\n"
        "            for name, sub in a.choices.items():\n"
        "                subs.append(name); walk(sub)\n"
        "walk(p)\n"
        "print(json.dumps([subs, sorted(set(opts))]))\n"
    )
    result = run(sys.executable, "-c", code)
    assert result.returncode == 0, result.stderr
    subs, opts = json.loads(result.stdout)
    return subs, opts


@pytest.mark.parametrize(
    ("page", "factory"),
    [
        ("/usr/share/man/man1/ptmig.1.gz", "host.cli:build_parser"),
        ("/usr/share/man/man8/ptmigd.8.gz", "host.daemon.main:build_parser"),
    ],
)
def test_every_sub_command_and_option_is_in_the_man_page(
    deb_root: Path, page: str, factory: str
) -> None:
    text = man_text(deb_root, page)
    subs, opts = parser_words(factory)
    for sub in subs:
        assert re.search(rf"^\s+{re.escape(sub)}$", text, re.MULTILINE), sub
    for opt in opts:
        assert re.search(rf"(^|[\s,\[]){re.escape(opt)}\b", text), opt
    assert len(opts) > 3


def test_the_config_page_names_every_key(deb_root: Path) -> None:
    text = man_text(deb_root, "/usr/share/man/man5/ptmigd.toml.5.gz")
    from host.daemon.config import DaemonSettings

    for key in DaemonSettings.__dataclass_fields__:
        assert re.search(rf"\b{key} = ", text), key


def test_completion_offers_verbs_options_choices_and_libvirt_domains(
    deb_root: Path, tmp_path: Path
) -> None:
    bash = shutil.which("bash")
    assert bash is not None
    completion = deb_root / COMPLETION.lstrip("/")
    # virsh is asked for the domain names, on the URI given with -c.
    virsh = tmp_path / "virsh"
    virsh.write_text('#!/bin/sh\n[ "$1 $2" = "-c test:///x" ] || exit 1\necho web1\necho db2\n')
    virsh.chmod(0o755)
    script = (
        f"source {completion}\n"
        't() { COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]}-1)); COMPREPLY=();'
        ' _ptmig; echo "${COMPREPLY[*]}"; }\n'
        "t ptmig mi\n"
        "t ptmig -c test:///x migrate ''\n"
        "t ptmig -c test:///x team-set --pool lan ''\n"
        "t ptmig team-set web1 --mac-policy ''\n"
        "t ptmig migrate --max\n"
        "t ptmig pools ''\n"
    )
    result = subprocess.run(
        [bash, "-c", script],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": f"{tmp_path}:/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "migrate",
        "web1 db2",
        "web1 db2",  # --pool's value is not the domain
        "preserve follow none",
        "--max-downtime",
        "",  # pools takes no domain
    ]


def test_metrics_serve_on_the_distribution_prometheus_client(deb_root: Path) -> None:
    """Debian 12's python3-prometheus-client (0.16) serves ptmigd's registry."""
    probe = run(SYSTEM_PYTHON, "-I", "-c", "import prometheus_client")
    if probe.returncode != 0:
        pytest.skip("python3-prometheus-client not installed for /usr/bin/python3")
    tree = deb_root / PRIVATE.lstrip("/")
    code = (
        f"import sys, urllib.request; sys.path.insert(0, {str(tree)!r})\n"
        "from host.metrics import PrometheusObserver, serve\n"
        "from host.workflow.observer import HostPass, PoolUse\n"
        "observer = PrometheusObserver()\n"
        "observer.repair_finished('web1', 'repaired')\n"
        "observer.host_passed('qemu:///a', HostPass({'web1': False}, (PoolUse('lan', 4, 0, 2),)))\n"
        "server = serve(observer, '127.0.0.1:0')\n"
        "url = 'http://%s:%d/metrics' % server.address\n"
        "print(urllib.request.urlopen(url, timeout=10).read().decode())\n"
        "server.stop()\n"
    )
    result = run(SYSTEM_PYTHON, "-I", "-c", code)
    assert result.returncode == 0, result.stderr
    assert 'ptmig_repairs_total{outcome="repaired"} 1.0' in result.stdout
    assert 'ptmig_agent_up{domain="web1",host="qemu:///a"} 0.0' in result.stdout
    assert 'ptmig_pool_teams{host="qemu:///a",pool="lan"} 2.0' in result.stdout
