"""Property tests of the ``ptmig`` command line over the in-memory two-host world.

Whatever the argument list: ``ptmig`` exits with one of its documented codes and
never shows a traceback; an error is a one-line message, and bad input (2) or a name
that names nothing (7) changes nothing, on either host, in any guest or in the
journal.  Argument lists are the valid commands (team-set, pool-define, migrate,
...) mutated: tokens dropped, duplicated, swapped or replaced by hostile values,
options added where they do not belong.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

from hypothesis import example, given, settings
from hypothesis import strategies as st
from workflow_fakes import A, B, World

from host import cli
from host.workflow.journal import Journal

#: The exit codes that say how a workflow ended (an error's are cli.EXIT_FOR's).
OUTCOME_CODES = {cli.EXIT_OK, cli.EXIT_DEGRADED, cli.EXIT_ROLLED_BACK, cli.EXIT_FAILED}

COMMANDS = [
    ["team-set", "vm1", "--team", "lan", "--standby-mac", "52:54:00:00:01:01", "--pool", "lab"],
    [
        "team-set",
        "vm1",
        "--team",
        "new",
        "--standby-mac",
        "52:54:00:99:00:01",
        "--pool",
        "lab",
        "--mac-policy",
        "none",
        "--team-mac",
        "52:54:00:99:00:02",
    ],
    [
        "team-set",
        "vm1",
        "--team",
        "lan",
        "--standby-mac",
        "52:54:00:00:01:01",
        "--pool",
        "lab",
        "--primary-alias",
        "ua-ptmig-lan-1",
    ],
    ["team-remove", "vm1", "wan"],
    ["team-show", "vm1", "--json"],
    [
        "pool-define",
        "p2",
        "--kind",
        "emulated",
        "--bridge",
        "br0",
        "--model",
        "virtio",
        "--slot",
        "t9=52:54:00:99:00:09",
        "--slot",
        "t8=52:54:00:99:00:08",
    ],
    ["pool-define", "p3", "--kind", "pci", "--address", "0000:07:00.0", "--address", "07:00.1"],
    ["pool-define", "p4", "--kind", "vf", "--pf", "enp6s0"],
    ["pool-define", "p5", "--kind", "vf", "--vf", "0000:05:10.1"],
    ["pool-undefine", "lab"],
    ["status", "vm1", "--json"],
    ["pools", "--json"],
    ["workflows", "--limit", "3"],
    ["failover", "vm1", "--to", "standby"],
    ["migrate", "vm1", B, "--max-downtime", "300", "--json"],
    ["recover"],
]
OPTIONS = sorted({t for c in COMMANDS for t in c if t.startswith("-")} | {"-h", "-v", "--"})
HOSTILE = st.one_of(
    st.sampled_from(
        [
            "",
            " ",
            "-",
            "--",
            "-1",
            "0",
            "99999999999999999999999",
            "1e9",
            "0x10",
            "vm1",
            "vm2",
            "lan",
            "wan",
            "lab",
            A,
            B,
            "test:///default",
            "52:54:00:00:01:01",
            "ff:ff:ff:ff:ff:ff",
            "t9=",
            "=52:54:00:99:00:09",
            "0000:07:00.0",
            "ua-",
            "ua-ptmig-lan-1",
            "net0",
            "lan\nwan",
            "\x1b[31m",
            "x" * 5000,
            "é",
            "--team=lan",
            "--limit=-5",
            "--max-downtime=-1",
        ]
    ),
    st.text(st.characters(exclude_characters="\x00"), max_size=12),
)


@st.composite
def argv(draw: st.DrawFn) -> list[str]:
    args = list(draw(st.sampled_from(COMMANDS)))
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["replace", "drop", "duplicate", "swap", "option", "insert"]))
        at = draw(st.integers(0, max(0, len(args) - 1)))
        if op == "replace" and args:
            args[at] = draw(HOSTILE)
        elif op == "drop" and args:
            del args[at]
        elif op == "duplicate" and args:
            args.insert(at, args[at])
        elif op == "swap" and len(args) > 1:
            other = draw(st.integers(0, len(args) - 1))
            args[at], args[other] = args[other], args[at]
        elif op == "option":
            args[at:at] = [draw(st.sampled_from(OPTIONS)), draw(HOSTILE)]
        elif op == "insert":
            args.insert(at, draw(HOSTILE))
    return args


def run(world: World, journal: Journal, args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with (
        mock.patch.object(cli, "_coordinator", lambda _args: world.coordinator(journal)),
        mock.patch("host.hypervisor.Hypervisor", world.connect),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        try:
            code: Any = cli.main(["-c", A, *args])
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def state(world: World, journal: Journal) -> tuple[Any, ...]:
    return world.snapshot(), [w.to_dict() for w in journal.recent(1000)]


@settings(max_examples=250)
@given(argv())
@example(["workflows", "--limit", "99999999999999999999999"])  # was OverflowError from sqlite
@example(["migrate", "vm1", B, "--max-downtime", "-1"])
@example(
    [
        "team-set",
        "vm1",
        "--team",
        "lan",
        "--standby-mac",
        "52:54:00:00:01:01",
        "--pool",
        "lab",
        "--primary-alias",
        "lan\nwan",
    ]
)
@example(["team-show", "vm1", "lan\nwan"])  # argparse's "unrecognized arguments: ..."
@example(["pool-define", "p2", "--kind", "emulated", "--bridge", "br0", "--slot", "t9=\x1b[2J"])
def test_any_argv_exits_with_a_documented_code_and_no_traceback(args: list[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="ptmig-cli-") as tmp:
        world = World()
        with Journal(Path(tmp) / "journal.sqlite") as journal:
            before = state(world, journal)
            code, _out, err = run(world, journal, args)
            assert code in set(cli.EXIT_FOR.values()) | OUTCOME_CODES, f"exit code {code!r}"
            assert "Traceback" not in err
            if code not in OUTCOME_CODES:  # an error: its one line is the last
                last = err.rstrip("\n").split("\n")[-1]
                assert last.startswith("ptmig"), err
                assert last.isprintable(), err  # one line, no terminal escapes
            if code in (cli.EXIT_USAGE, cli.EXIT_NOT_FOUND):
                assert state(world, journal) == before
                assert world.mutations() == []
