"""``ptmig``'s errors as a person reads them: ``ptmig`` run as a process against real libvirt
(its test driver, in-process in ``ptmig``, with a node file when a domain needs ptmig's
metadata; a TCP URI nobody listens on for an unreachable host).  Each error class prints
one line on stderr, ``ptmig: <what failed>: <why>[; <what to do>]``, with no timestamp,
module path or traceback, and exits with its category's code; ``-v`` adds the log
records."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from host import cli
from host.commandline import parser as cli_parser
from host.commandline.exits import INTERNAL_HINT
from host.workflow.journal import Journal

REPO = Path(__file__).resolve().parents[3]
WEB1_UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"
#: libvirt's test driver loads this node: web1 with one ptmig team in its metadata.
NODE_XML = f"""<node>
  <domain type='test'>
    <name>web1</name>
    <uuid>{WEB1_UUID}</uuid>
    <memory>1048576</memory>
    <os><type arch='x86_64'>hvm</type></os>
    <metadata>
      <ptmig:teams xmlns:ptmig='https://ptmig.dev/xmlns/teams/1'>
        <ptmig:team name='lan' standby-mac='52:54:00:aa:00:01' pool='lan-nics'
                    mac-policy='preserve'/>
      </ptmig:teams>
    </metadata>
    <devices>
      <interface type='bridge'>
        <mac address='52:54:00:aa:00:01'/><source bridge='br0'/><model type='virtio'/>
      </interface>
    </devices>
  </domain>
</node>
"""
LINE = re.compile(r"ptmig: (?P<what>[a-z-]+(?: \S+)?): (?P<why>.+)")
#: logging's asctime, as the log records had it at the start of ptmig's error lines.
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}")
UNREACHABLE = "qemu+tcp://127.0.0.1:1/system"  # port 1: nobody listens, refused at once
HOST_HINT = "; check the URI and that libvirtd runs there ('virsh -c URI version')"


def ptmig(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "host.cli", "--journal", str(tmp / "journal.sqlite"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


@pytest.fixture
def node(tmp_path: Path) -> str:
    path = tmp_path / "node.xml"
    path.write_text(NODE_XML)
    return f"test://{path}"


def test_every_error_class_is_one_line_with_its_exit_code(tmp_path: Path, node: str) -> None:
    with Journal(tmp_path / "journal.sqlite") as journal:  # open, and this process is alive
        journal.begin("migrate", WEB1_UUID, "web1", node, "qemu+ssh://b/system", {})
    cases = [  # argv, exit code, what failed, why (the line's rest)
        (
            ["-c", "test:///default", "status", "nosuch"],
            cli.EXIT_NOT_FOUND,
            "status nosuch",
            "test:///default: domain 'nosuch': Domain not found; "
            "'virsh -c URI list --all' lists the domains there",
        ),
        (
            ["-c", node, "team-remove", "web1", "dmz"],
            cli.EXIT_NOT_FOUND,
            "team-remove web1",
            "web1 has no team 'dmz'",
        ),
        (
            ["cancel", "web2"],
            cli.EXIT_NOT_FOUND,
            "cancel web2",
            f"web2 has no running workflow in journal {tmp_path / 'journal.sqlite'}; "
            "nothing to cancel, nothing changed",
        ),
        (
            ["-c", UNREACHABLE, "status", "web1"],
            cli.EXIT_UNREACHABLE,
            "status web1",
            f"cannot connect to {UNREACHABLE}: unable to connect to server at "
            f"'127.0.0.1:1': Connection refused{HOST_HINT}",
        ),
        (
            ["-c", "qemu:///sys tem", "pools"],
            cli.EXIT_USAGE,
            "pools",
            "cannot connect to qemu:///sys tem: malformed URI: Unable to parse URI qemu:///sys tem",
        ),
        (
            [
                *("-c", node, "team-set", "web1", "--team", "wan", "--pool", "lan-nics"),
                *("--standby-mac", "52:54:zz"),
            ],
            cli.EXIT_USAGE,
            "team-set web1",
            "team wan: standby-mac: malformed MAC address '52:54:zz' (want aa:bb:cc:dd:ee:ff)",
        ),
        (
            ["migrate", "web1"],
            cli.EXIT_USAGE,
            "migrate",
            "the following arguments are required: DEST_URI; see 'ptmig migrate --help'",
        ),
        (
            ["-c", "test:///default", "status", "test"],
            cli.EXIT_ROLLED_BACK,
            "status test",
            "refused, nothing changed: test has no ptmig teams: set one with 'ptmig team-set'",
        ),
        (
            ["-c", node, "failover", "web1", "--to", "standby"],
            cli.EXIT_BUSY,
            "failover web1",
            None,  # the journal's conflict, checked below
        ),
    ]
    for argv, code, what, why in cases:
        proc = ptmig(tmp_path, *argv)
        assert proc.returncode == code, (argv, proc.stderr)
        assert proc.stdout == ""
        (line,) = proc.stderr.splitlines()
        m = LINE.fullmatch(line)
        assert m, line
        assert m["what"] == what
        if why is not None:
            assert m["why"] == why
        assert not TIMESTAMP.search(line) and "host." not in line and "Traceback" not in line
    assert "already has an open migrate workflow" in line


def test_log_records_and_the_traceback_only_with_v(tmp_path: Path) -> None:
    quiet = ptmig(tmp_path, "-c", "test:///default", "status", "nosuch")
    loud = ptmig(tmp_path, "-v", "-c", "test:///default", "status", "nosuch")
    assert quiet.returncode == loud.returncode == cli.EXIT_NOT_FOUND
    (line,) = quiet.stderr.splitlines()
    *records, last = loud.stderr.splitlines()
    assert last == line
    assert TIMESTAMP.match(records[0]) and " ptmig: status nosuch failed" in records[0]
    assert "Traceback (most recent call last):" in records
    assert records[-1].startswith("host.hypervisor.errors.DomainNotFound: test:///default: domain")


def test_a_defect_says_internal_error_and_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(args: object, coordinator: object) -> int:
        return {}["teams"]  # type: ignore[no-any-return]

    monkeypatch.setattr(cli_parser, "status", broken)
    code = cli.main(["--journal", str(tmp_path / "journal.sqlite"), "status", "vm1"])
    captured = capsys.readouterr()
    assert code == cli.EXIT_ERROR
    why = f"internal error: KeyError: 'teams'; {INTERNAL_HINT}"
    assert captured.err == f"ptmig: status vm1: {why}\n"
