"""docs/operator-guide.md, block by block, so that the guide cannot drift from the code.

What is checked, honestly (the guide's own table says the same):

- ``run`` blocks: every ``$ ptmig ...`` line runs through the real CLI code (``host.cli.main``,
  in this process) against libvirt's test driver, ``test:///default`` standing in for
  ``qemu:///system``.  One connection is held open for the whole guide so the driver keeps
  its state from one command to the next (it drops it when its last connection closes).
  ``$ virsh ... define FILE`` defines that ``file`` block on the same connection (virsh is
  another process, which would get a fresh driver).  Exit status 0 and the printed lines
  are compared.  The test driver has no guest and no agent: nothing here plugs a device.
- ``parse`` blocks: the real argument parsers accept each line; nothing runs.  The VM lab
  runs these verbs (tests/e2e/test_coordinator.py, test_fault_matrix.py, test_debian13.py).
- ``file`` blocks: XML against libvirt's schema (virt-xml-validate, when installed);
  agent.toml and ptmigd.toml through the agent's and ptmigd's own parsers.
- ``networkd`` blocks: parsed as INI with the sections and keys systemd.netdev(5) and
  systemd.network(5) document for them, and equal to the lab guest's own files (which
  the lab boots) minus the lab's KernelCommandLine switch.  ``ifupdown`` and ``nm`` blocks
  are parsed only (stanzas, options, keyfile sections and keys): no ifupdown or
  NetworkManager runs here or in the lab.
- ``report``: the CLI's formatter renders the same figures the same way.
- ``errors`` blocks: each ``$ ptmig ...  # exit N`` line runs through ``host.cli.main``
  against the test driver; its exit code and its one stderr line are compared.
- The exit codes table against ``ptmig --help``, the errors' table (category, gRPC
  status, exit code) against ``host.errors.Category``, ``ptmigd``'s ``STATUS`` and
  ``ptmig``'s ``EXIT_FOR``; every shell block in the guide is marked.
"""

from __future__ import annotations

import configparser
import contextlib
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest

from guest_agent import config as agent_config
from guest_agent.__main__ import build_parser as agent_parser
from host import cli
from host.commandline import render
from host.daemon import config as daemon_config
from host.daemon.main import build_parser as ptmigd_parser
from host.workflow.model import MigrationReport, Outcome, PhaseTiming
from lab.image import _guest_files
from lab.orchestrated import GUEST_MANAGED_CONFIG

GUIDE = Path(__file__).resolve().parents[3] / "docs" / "operator-guide.md"
MARK = re.compile(r"^<!-- guide-test: (\S+)(?: (\S+))? -->$")
URI = "test:///default"


@dataclass(frozen=True)
class Block:
    mark: str
    arg: str | None
    lang: str
    text: str
    line: int

    def commands(self) -> Iterator[tuple[list[str], list[str]]]:
        """Each ``$ `` line as argv, with the lines under it (its expected output)."""
        command: list[str] | None = None
        output: list[str] = []
        for line in self.text.splitlines():
            if line.startswith("$ "):
                if command is not None:
                    yield command, output
                command, output = shlex.split(line[2:]), []
            elif command is not None:
                output.append(line.rstrip())
        if command is not None:
            yield command, output


def blocks() -> list[Block]:
    lines = GUIDE.read_text().splitlines()
    found: list[Block] = []
    mark: re.Match[str] | None = None
    i = 0
    while i < len(lines):
        if m := MARK.match(lines[i]):
            mark = m
        elif lines[i].startswith("```") and len(lines[i]) > 3:
            end = lines.index("```", i + 1)
            if mark is not None:
                text = "\n".join(lines[i + 1 : end]) + "\n"
                found.append(Block(mark.group(1), mark.group(2), lines[i][3:], text, i + 1))
            elif lines[i][3:] == "sh":
                pytest.fail(f"operator-guide.md:{i + 1}: a shell block without a guide-test mark")
            mark = None
            i = end
        i += 1
    return found


def of(mark: str) -> list[Block]:
    return [b for b in blocks() if b.mark == mark]


def test_every_command_block_is_marked_and_every_mark_is_known() -> None:
    marks = {b.mark for b in blocks()}
    known = {"run", "parse", "file", "networkd", "ifupdown", "nm", "report", "errors"}
    assert marks == known, marks


def pools(conn: libvirt.virConnect) -> list[libvirt.virNetwork]:
    return [n for n in conn.listAllNetworks() if n.name().startswith("ptmig-pool-")]


def test_run_blocks_against_the_test_driver(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = {b.arg: b.text for b in of("file")}
    journal = tmp_path / "journal.sqlite"
    held = libvirt.open(URI)  # keeps the driver's state between the commands
    try:
        assert not pools(held), "another test left ptmig pools on test:///default"
        ran = 0
        for block in of("run"):
            for argv, expected in block.commands():
                where = f"operator-guide.md:{block.line}: {shlex.join(argv)}"
                argv = [URI if a == "qemu:///system" else a for a in argv]
                if argv[0] == "virsh":
                    assert argv[1:3] == ["-c", URI] and argv[3] == "define", where
                    held.defineXML(files[argv[4]])
                    continue
                assert argv[0] == "ptmig", where
                capsys.readouterr()
                status = cli.main(["--journal", str(journal), *argv[1:]])
                out = capsys.readouterr().out
                assert status == 0, f"{where}: exit {status}"
                assert [line.rstrip() for line in out.splitlines()] == expected, where
                ran += 1
        assert ran >= 7
    finally:
        for name in ("web1", "db1"):
            with contextlib.suppress(libvirt.libvirtError):
                held.lookupByName(name).undefine()
        for network in pools(held):
            if network.isActive():
                network.destroy()
            network.undefine()
        held.close()


def test_parse_blocks_are_accepted_by_the_parsers() -> None:
    parsed = 0
    for block in of("parse"):
        for argv, _ in block.commands():
            parsers = {
                "ptmig": cli.build_parser,
                "ptmigd": ptmigd_parser,
                "ptmig-agent": agent_parser,
            }
            parser = parsers[argv[0]]()
            try:
                parser.parse_args(argv[1:])
            except SystemExit as exc:
                pytest.fail(f"operator-guide.md:{block.line}: {shlex.join(argv)}: exit {exc}")
            parsed += 1
    assert parsed >= 8


def test_file_blocks_pass_their_own_checkers(tmp_path: Path) -> None:
    files = {b.arg: b for b in of("file")}
    assert set(files) == {
        "web1.xml",
        "db1.xml",
        "agent.toml",
        "agent-guest-managed.toml",
        "ptmigd.toml",
    }
    agent = agent_config.parse(tomllib.loads(files["agent.toml"].text), "agent.toml")
    assert [(t.name, t.ownership.value) for t in agent.teams] == [
        ("lan", "admin"),
        ("wan", "agent"),
    ]
    guest = agent_config.parse(
        tomllib.loads(files["agent-guest-managed.toml"].text), "agent-guest-managed.toml"
    )
    lab_guest = agent_config.parse(tomllib.loads(GUEST_MANAGED_CONFIG), "lab")
    assert guest.teams[0] == lab_guest.teams[0], "the guide's team is the one the lab proves"
    assert guest.teams[0].managed_by.value == "guest"
    daemon_config.parse(tomllib.loads(files["ptmigd.toml"].text), where="ptmigd.toml")
    if shutil.which("virt-xml-validate"):
        for name in ("web1.xml", "db1.xml"):
            xml = tmp_path / name
            xml.write_text(files[name].text)
            checked = subprocess.run(
                ["virt-xml-validate", str(xml), "domain"], capture_output=True, text=True
            )
            assert checked.returncode == 0, f"{name}: {checked.stderr}"


def _ini(text: str) -> dict[str, dict[str, str]]:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text)
    return {section: dict(parser[section]) for section in parser.sections()}


#: The sections and keys the examples may use, as systemd.netdev(5) / systemd.network(5)
#: and nm-settings-keyfile(5) name them: a misspelt key fails here.
NETWORKD_KEYS = {
    "NetDev": {"Name", "Kind", "MACAddress"},
    "Bond": {"Mode", "MIIMonitorSec", "FailOverMACPolicy"},
    "Match": {"Name", "PermanentMACAddress"},
    "Network": {"Bond", "Address", "ConfigureWithoutCarrier", "LinkLocalAddressing"},
}
NM_KEYS = {
    "connection": {"id", "type", "interface-name", "master", "slave-type"},
    "ethernet": {"cloned-mac-address"},
    "bond": {"mode", "miimon", "fail_over_mac"},
    "ipv4": {"method", "address1"},
    "ipv6": {"method"},
}


def _without_lab_switch(config: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """The lab's files carry KernelCommandLine=, which skips the bond in its net_failover
    comparison boot; a guide reader has no such boot."""
    out = {}
    for section, keys in config.items():
        kept = {k: v for k, v in keys.items() if k != "KernelCommandLine"}
        if kept:
            out[section] = kept
    return out


def test_networkd_blocks_are_the_lab_guests_own_files() -> None:
    lab = _guest_files()
    seen = []
    for block in of("networkd"):
        config = _ini(block.text)
        for section, keys in config.items():
            assert set(keys) <= NETWORKD_KEYS[section], (block.arg, section, keys)
        assert config == _without_lab_switch(_ini(lab[f"/etc/systemd/network/{block.arg}"]))
        seen.append(block.arg)
    assert seen == [
        "10-bond0.netdev",
        "20-standby.network",
        "30-bond0.network",
        "30-bond1.network",
    ]


IFUPDOWN_OPTIONS = {
    "address",
    "hwaddress",
    "bond-slaves",
    "bond-mode",
    "bond-miimon",
    "bond-fail-over-mac",
    "bond-master",
}


def test_ifupdown_blocks_parse_as_interfaces_stanzas() -> None:
    """interfaces(5): ``auto``/``allow-hotplug`` lines, ``iface NAME FAMILY METHOD``
    stanzas, indented options; every brought-up name has a stanza.  Not ifup."""
    for block in of("ifupdown"):
        declared: set[str] = set()
        brought_up: set[str] = set()
        current = None
        for line in block.text.splitlines():
            if not line.strip():
                continue
            words = line.split()
            if line.startswith((" ", "\t")):
                assert current is not None, line
                assert words[0] in IFUPDOWN_OPTIONS and len(words) > 1, line
                if words[0] == "bond-mode":
                    assert words[1] == "active-backup", line
            elif words[0] in ("auto", "allow-hotplug"):
                brought_up.update(words[1:])
            else:
                assert words[0] == "iface" and len(words) == 4, line
                assert words[2] in ("inet", "inet6") and words[3] in ("static", "manual"), line
                current = words[1]
                declared.add(current)
        assert brought_up <= declared, block.text


def test_networkmanager_blocks_parse_as_keyfiles() -> None:
    connections = {}
    for block in of("nm"):
        config = _ini(block.text)
        for section, keys in config.items():
            assert set(keys) <= NM_KEYS[section], (block.arg, section, keys)
        connections[config["connection"]["interface-name"]] = config
    bond = connections["bond0"]
    assert bond["connection"]["type"] == "bond" and bond["bond"]["mode"] == "active-backup"
    port = connections["enp1s0"]
    assert (port["connection"]["master"], port["connection"]["slave-type"]) == ("bond0", "bond")


PHASE = re.compile(r"^  (\S+)\s+(\d+\.\d\d) s(?:  (.*))?$")
TEAM = re.compile(r"^  team (\S+): on (\S+)$")


def test_report_block_is_what_the_cli_prints() -> None:
    (block,) = of("report")
    first, *rest = block.text.splitlines()
    domain, outcome = first.split(": ")
    report = MigrationReport("id", domain, "src", "dst", Outcome(outcome))
    for line in rest:
        if m := TEAM.match(line):
            report.teams[m.group(1)] = m.group(2)
        else:
            m = PHASE.match(line)
            assert m, line
            report.phases.append(PhaseTiming(m.group(1), float(m.group(2)), m.group(3) or ""))
    assert [p.name for p in report.phases] == ["preflight", "switch", "unplug", "migrate", "bind"]
    rendered = [line.rstrip() for line in render.report_text(report).splitlines()]
    assert rendered == block.text.splitlines()


def test_exit_codes_table_matches_the_cli() -> None:
    epilog = cli.__doc__ or ""
    codes = dict(re.findall(r"^  (\d)  (.+)$", epilog, re.M))
    text = GUIDE.read_text()
    rows = re.findall(r"^\|\s*(\d)\s*\|([^|]*)\|", text, re.M)
    assert [code for code, _ in rows] == sorted(codes), rows
    for code, outcome in rows:
        for word in filter(None, (w.strip() for w in outcome.split("/"))):
            assert word.replace("-", " ") in codes[code].replace("-", " "), (code, word)


EXIT_COMMENT = re.compile(r"^(?P<command>.+?)\s+# exit (?P<code>\d+)$")


def test_error_blocks_print_their_line_and_exit_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ran = 0
    for block in of("errors"):
        lines = block.text.splitlines()
        for i, line in enumerate(lines):
            if not line.startswith("$ "):
                continue
            m = EXIT_COMMENT.match(line[2:])
            assert m, f"operator-guide.md:{block.line + i + 1}: no '# exit N'"
            argv = [URI if a == "qemu:///system" else a for a in shlex.split(m["command"])]
            assert argv[0] == "ptmig"
            capsys.readouterr()
            code = cli.main(["--journal", str(tmp_path / "journal.sqlite"), *argv[1:]])
            captured = capsys.readouterr()
            where = f"operator-guide.md:{block.line + i + 1}"
            assert code == int(m["code"]), f"{where}: exit {code}: {captured.err}"
            assert captured.out == "", where
            assert captured.err.replace(URI, "qemu:///system") == lines[i + 1] + "\n", where
            ran += 1
    assert ran >= 4


def test_the_errors_table_is_the_codes_table() -> None:
    from host.commandline.exits import EXIT_FOR
    from host.daemon.errors import STATUS
    from host.errors import Category

    text = GUIDE.read_text()
    section = text[text.index("| category | gRPC status | exit |") :]
    rows = re.findall(r"^\| ([a-z-]+) \| ([A-Z_]+) \| (\d) \|", section, re.M)
    table = {category: (status, int(code)) for category, status, code in rows}
    assert table == {str(c): (STATUS[c].name, EXIT_FOR[c]) for c in Category}
    assert len(rows) == len(Category)
