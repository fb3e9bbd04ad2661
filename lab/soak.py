"""``ptmig-lab soak``: N migrations back and forth under ping, then proof that nothing grew.

The guest moves hosta <-> hostb N times while the client pings both of its teams.  Odd
migrations are ``ptmig migrate`` CLI processes (an operator), even ones go through one
long-lived ``ptmigd`` over gRPC (a management layer), so the coordinator's figure is a
process that ran half the migrations, and each CLI process's peak RSS is measured too.
Every ``--failover-every`` migrations the teams go ``failover --to standby`` and back to
primary; every ``--cancel-every`` a ``ptmig migrate`` is cancelled by ``ptmig cancel``
from another process once the journal shows it at a phase (rotating through the phases
before the point of no return), and must roll back.

Before the first migration, every ``--sample-every`` migrations (always with the guest
back on hosta, so per-host figures compare like with like) and after the last, the soak
samples: the guest agent's RSS and fds (over the console), ptmigd's RSS and fds, each
libvirtd's RSS and fds, the domain XML's size and ptmig's metadata in it, leases left in
the metadata, pool devices held (by two domains, or by none: an orphaned tap), the
journal (open workflows, steps per migration, workflows beyond those the soak ran), and
files under each host's private /run/libvirt and /var/lib/libvirt and the machine's
/run/ptmig.  Each figure gets a verdict (:func:`judge`): its growth from the first sample
after warm-up to the last must stay within a stated tolerance.

A failure is any migration whose outcome is not ``done`` with every team on its primary,
a failover that does not reach its mode, or a cancel that does not roll back to primaries.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from host.daemon.encode import report_from_message
from host.domain.domain_xml import parse_domain
from host.workflow.model import MigrationReport, Outcome, TeamMode
from lab import coordinated as co
from lab.fabric import HOSTS
from lab.guest import DOMAIN_NAME
from lab.load import LoadSampler, MachineLoad
from lab.measure import TEAMS, pingers, wait_reachable
from lab.migration import migrate_argv, read_migration
from lab.paths import run_dir
from lab.ptmig import cli_argv, cli_env
from lab.run import CommandError, run
from lab.traffic import Phase, analyze
from lab.vmlab import LabError, VmLab

log = logging.getLogger(__name__)

OTHER = {"hosta": "hostb", "hostb": "hosta"}
PTMIG_NS_PREFIX = "https://ptmig.dev/xmlns/"
LEASE_NS = "https://ptmig.dev/xmlns/lease/1"
#: The phases a cancel can still stop (bind is past the point of no return).
CANCEL_PHASES = ("preflight", "switch", "unplug", "migrate")
#: The machine's own ptmig state (the coordinator runs in the root namespace).
MACHINE_RUN_DIR = Path("/run/ptmig")
AGENT_PROBE = (
    "pid=$(systemctl show -p MainPID --value ptmig-agent); echo pid=$pid; "
    "grep -E '^VmRSS:' /proc/$pid/status; echo fds=$(ls /proc/$pid/fd | wc -l); "
    "echo runfiles=$(find /run/ptmig -xdev 2>/dev/null | wc -l)"
)


# -- the pure parts: parsing and verdicts ----------------------------------------------


@dataclass(frozen=True)
class Tolerance:
    """How much a figure may grow from the first sample after warm-up to the last, and why
    that much is not a leak.  ``zero``: every sample must be 0 (a count of things that
    must not exist at rest)."""

    allowed: float
    why: str
    zero: bool = False
    #: Migrations after which a bounded structure behind the figure is full (its growth
    #: until then is the structure filling, not a leak): growth is judged from the first
    #: sample taken at or after that many, and a soak that ends before has not proved it.
    settles_after: int = 0


@dataclass(frozen=True)
class Verdict:
    name: str
    unit: str
    first: float
    baseline: float  # the first sample after warm-up (the first if there is only one)
    last: float
    growth: float  # last - first
    judged_growth: float  # last - baseline
    allowed: float
    ok: bool
    why: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def judge(
    name: str,
    unit: str,
    values: Sequence[float],
    tol: Tolerance,
    after: Sequence[int] | None = None,
) -> Verdict:
    """The verdict on one figure's samples (the first taken before any migration), *after*
    being the migrations done at each sample.

    Growth is judged from the second sample on: the first migrations warm caches, open
    connections and import modules once, which is not a leak; a leak grows with every
    migration and shows between the second sample and the last.  A figure with
    ``settles_after`` is judged from the first sample at or after that many migrations,
    and fails when no later sample follows it: a soak too short to show it level.
    """
    if not values:
        raise ValueError(f"{name}: no samples")
    first, last = values[0], values[-1]
    baseline = values[1] if len(values) > 2 else first
    why = tol.why
    settled = True
    if tol.settles_after:
        if after is None or len(after) != len(values):
            raise ValueError(f"{name}: settles after {tol.settles_after} migrations, no counts")
        index = next((i for i, n in enumerate(after) if n >= tol.settles_after), len(after))
        settled = index < len(values) - 1
        if settled:
            baseline = values[index]
        else:
            short = f"NOT JUDGED: the soak ended before {tol.settles_after} migrations + 1 sample"
            why = f"{short}; {why}"
    judged = last - baseline
    ok = all(v == 0 for v in values) if tol.zero else settled and judged <= tol.allowed
    return Verdict(name, unit, first, baseline, last, last - first, judged, tol.allowed, ok, why)


@dataclass(frozen=True)
class ProcSample:
    pid: int
    rss_kb: int
    fds: int


def parse_vmrss_kb(status_text: str) -> int:
    """VmRSS in kB from a /proc/PID/status text."""
    m = re.search(r"^VmRSS:\s+(\d+)\s+kB", status_text, re.MULTILINE)
    if not m:
        raise ValueError("no VmRSS line in /proc/PID/status")
    return int(m.group(1))


def parse_clients_info(text: str) -> int:
    """Connected clients from ``virt-admin srv-clients-info libvirtd``."""
    m = re.search(r"^nclients\s*:\s*(\d+)\s*$", text, re.MULTILINE)
    if not m:
        raise ValueError(f"no nclients in virt-admin's answer: {text!r}")
    return int(m.group(1))


def fd_kind(target: str) -> str:
    """What an fd is, from its /proc/PID/fd link: a path, or its kind without the inode
    ("socket", "pipe"; anon inodes keep their name: "anon_inode:[eventfd]")."""
    if target.startswith("/") or target.startswith("anon_inode:"):
        return target
    return target.split(":[", 1)[0]


def parse_agent_probe(output: str) -> tuple[ProcSample, int]:
    """The agent's (pid, RSS, fds) and the guest's /run/ptmig entry count, from the
    output of :data:`AGENT_PROBE` (console noise around it is ignored)."""
    pid = re.search(r"^pid=(\d+)\s*$", output, re.MULTILINE)
    fds = re.search(r"^fds=(\d+)\s*$", output, re.MULTILINE)
    files = re.search(r"^runfiles=(\d+)\s*$", output, re.MULTILINE)
    if not pid or not fds or not files or int(pid.group(1)) == 0:
        raise ValueError(f"unreadable agent probe: {output!r}")
    return ProcSample(int(pid.group(1)), parse_vmrss_kb(output), int(fds.group(1))), int(
        files.group(1)
    )


def ptmig_metadata(domain_xml: str) -> tuple[int, int]:
    """(bytes of ptmig's elements in the domain's <metadata>, leases among them)."""
    root = ET.fromstring(domain_xml)
    metadata = root.find("metadata")
    size = leases = 0
    for child in metadata if metadata is not None else ():
        if child.tag.startswith("{" + PTMIG_NS_PREFIX):
            size += len(ET.tostring(child, encoding="unicode"))
            leases += child.tag.startswith("{" + LEASE_NS + "}")
    return size, leases


def held_taps(live_xmls: Sequence[str], pool_taps: set[str]) -> tuple[dict[str, int], int]:
    """Pool taps held by the running domains: (tap -> number of domains holding it,
    taps held by more than one)."""
    held: dict[str, int] = {}
    for xml in live_xmls:
        devs = {n.target_dev for n in parse_domain(xml).interfaces if n.target_dev}
        for tap in devs & pool_taps:
            held[tap] = held.get(tap, 0) + 1
    return held, sum(1 for n in held.values() if n > 1)


def count_files(root: Path) -> int:
    """Files, links and directories under *root* (0 when it is absent)."""
    total = 0
    for _dir, dirs, files in os.walk(root):
        total += len(dirs) + len(files)
    return total


@dataclass(frozen=True)
class NoReport:
    """A migration that gave no report: the CLI's exit without one, an RPC error."""

    outcome: str  # "exit 4", "rpc-error"
    error: str


def failed_migration(report: MigrationReport | NoReport) -> str:
    """Why a migration is a failure ("" when done with every team on primary)."""
    if isinstance(report, NoReport) or report.outcome is not Outcome.DONE:
        return f"outcome {report.outcome}: {report.error}".strip()
    off = {t: str(m) for t, m in report.teams.items() if m is not TeamMode.PRIMARY}
    if not report.teams or off:
        return f"teams not on primary: {off or 'none reported'}"
    return ""


# -- the figures and their tolerances ------------------------------------------------

MIB = 1024
FIGURES: dict[str, tuple[str, Tolerance]] = {
    "agent_rss_kb": (
        "kB",
        Tolerance(
            1 * MIB,
            "arena noise, judged once the operation log (256 ids, about 4 a migration) is "
            "full; a leak of 15 kB a migration shows over 70 migrations",
            settles_after=80,
        ),
    ),
    "agent_fds": ("fds", Tolerance(2, "a call's connection open while sampled; 1/migration shows")),
    "agent_pid_changes": ("", Tolerance(0, "the agent never restarted", zero=True)),
    "guest_run_ptmig_files": ("files", Tolerance(0, "the agent's socket only")),
    "ptmigd_rss_kb": (
        "kB",
        Tolerance(4 * MIB, "gRPC and libvirt buffers; a leak of 80 kB a migration shows"),
    ),
    "ptmigd_fds": ("fds", Tolerance(2, "cached libvirt connections are per URI, not per call")),
    "cli_peak_rss_kb": (
        "kB",
        Tolerance(2 * MIB, "each CLI is a fresh process: only growing inputs could raise it"),
    ),
    "libvirtd_a_rss_kb": ("kB", Tolerance(8 * MIB, "libvirtd's own caches (not ptmig's)")),
    "libvirtd_b_rss_kb": ("kB", Tolerance(8 * MIB, "libvirtd's own caches (not ptmig's)")),
    "libvirtd_a_fds": ("fds", Tolerance(2, "a client connection ptmig leaks shows here")),
    "libvirtd_b_fds": ("fds", Tolerance(2, "a client connection ptmig leaks shows here")),
    "libvirtd_a_clients": ("", Tolerance(0, "at rest: the soak's and ptmigd's, if it keeps one")),
    "libvirtd_b_clients": ("", Tolerance(0, "as hosta")),
    "domain_xml_bytes": ("B", Tolerance(64, "numbers in it (lease expiry, ids) change width")),
    "domain_xml_inactive_bytes": ("B", Tolerance(64, "as the live XML")),
    "ptmig_metadata_bytes": ("B", Tolerance(32, "the teams' record only; no history kept")),
    "leases_left": ("", Tolerance(0, "a lease lives only while a workflow runs", zero=True)),
    "pool_taps_held_hosta": ("taps", Tolerance(0, "one per team on the guest's host")),
    "pool_taps_held_hostb": ("taps", Tolerance(0, "none on the host the guest left")),
    "pool_taps_orphaned": ("taps", Tolerance(0, "a tap no domain holds", zero=True)),
    "pool_taps_double_held": ("taps", Tolerance(0, "one device, two domains", zero=True)),
    "journal_open_workflows": ("", Tolerance(0, "every workflow closes", zero=True)),
    "journal_steps_per_migration": ("rows", Tolerance(0, "same steps every migration")),
    "journal_unaccounted_workflows": (
        "rows",
        Tolerance(0, "workflow rows = the soak's workflows + those before it"),
    ),
    "journal_bytes_per_workflow": (
        "B",
        Tolerance(1024, "added per workflow since the last sample; ±4 KiB pages over 13"),
    ),
    "hosta_run_files": ("files", Tolerance(0, "libvirt's per-domain state, as before")),
    "hostb_run_files": ("files", Tolerance(0, "as hosta")),
    "hosta_varlib_files": ("files", Tolerance(0, "as hosta")),
    "hostb_varlib_files": ("files", Tolerance(0, "as hosta")),
    "machine_run_ptmig_files": ("files", Tolerance(0, "one channel-turn file per domain")),
}


# -- the run -----------------------------------------------------------------------


@dataclass
class Attempt:
    """One migration, failover or cancelled migration, and how it ended."""

    index: int
    kind: str  # "migrate-cli", "migrate-ptmigd", "failover", "cancel@PHASE"
    route: str
    outcome: str
    seconds: float
    lost: dict[str, int] = field(default_factory=dict)
    failure: str = ""


@dataclass
class SoakReport:
    migrations: int
    rate_pps: float
    started: str = ""
    wall_s: float = 0.0
    samples: list[dict[str, Any]] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)
    load: MachineLoad | None = None

    @property
    def failures(self) -> list[Attempt]:
        return [a for a in self.attempts if a.failure]

    @property
    def ok(self) -> bool:
        return not self.failures and all(v.ok for v in self.verdicts)

    def to_dict(self) -> dict[str, Any]:
        lost = [sum(a.lost.values()) for a in self.attempts if a.kind.startswith("migrate")]
        return {
            "migrations": self.migrations,
            "rate_pps": self.rate_pps,
            "started": self.started,
            "wall_s": round(self.wall_s, 1),
            "counts": _counts(self.attempts),
            "failures": [asdict(a) for a in self.failures],
            "lost_per_migration": {
                "median": statistics.median(lost) if lost else None,
                "max": max(lost) if lost else None,
            },
            "verdicts": [v.to_dict() for v in self.verdicts],
            "ok": self.ok,
            "machine_load": self.load.to_dict() if self.load is not None else None,
            "samples": self.samples,
            "attempts": [asdict(a) for a in self.attempts],
        }

    def format(self) -> str:
        out = [
            f"soak: {self.migrations} migrations in {self.wall_s / 60:.1f} min, "
            f"{_counts(self.attempts)}; {len(self.failures)} failures",
            f"{'figure':32}{'first':>12}{'after w-up':>12}{'last':>12}{'growth':>10}"
            f"{'judged':>10}{'allowed':>9}  verdict",
        ]
        for v in self.verdicts:
            out.append(
                f"{v.name:32}{v.first:>12g}{v.baseline:>12g}{v.last:>12g}{v.growth:>10g}"
                f"{v.judged_growth:>10g}{v.allowed:>9g}  {'ok' if v.ok else 'GREW'}"
            )
        for a in self.failures:
            out.append(f"FAILED #{a.index} {a.kind} {a.route}: {a.failure}")
        if self.load is not None:
            out.append(self.load.summary())
        return "\n".join(out)


def _counts(attempts: list[Attempt]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for a in attempts:
        kind = "cancel" if a.kind.startswith("cancel") else a.kind
        counts[kind] = counts.get(kind, 0) + 1
    return counts


class Soak:
    def __init__(self, lab: VmLab, daemon: tuple[subprocess.Popen[bytes], Path], rate: float):
        self.lab = lab
        self.daemon, self.socket = daemon
        self.rate = rate
        self.workflows_run = 0
        self.journal_before = _journal_workflows()
        self.cli_peaks: list[int] = []
        self.agent_pids: list[int] = []
        self.last_sampled_at = 0.0
        self._journal_last: tuple[int, int] | None = None  # (bytes, workflows) at the last sample
        self.pool_taps = {tap for slots in co.POOL_SLOTS.values() for tap, _ in slots}

    # -- the actions ------------------------------------------------------------

    def migrate_cli(self, dest: str) -> MigrationReport | NoReport:
        proc, peak = _measured(migrate_argv(DOMAIN_NAME, co.hop(self.lab, dest)))
        self.cli_peaks.append(peak)
        self.workflows_run += 1
        return _read(proc)

    def migrate_ptmigd(self, dest: str) -> MigrationReport | NoReport:
        import grpc
        from ptmig.v1 import coordinator_pb2 as pb
        from ptmig.v1 import coordinator_pb2_grpc as pb_grpc

        src = self.lab.where()
        self.workflows_run += 1
        with grpc.insecure_channel(f"unix:{self.socket}") as channel:
            try:
                events = list(
                    pb_grpc.CoordinatorStub(channel).Migrate(
                        pb.MigrateRequest(
                            domain=DOMAIN_NAME,
                            source_uri=self.lab.hosts[src].uri,
                            destination_uri=self.lab.hosts[dest].uri,
                            unsafe=True,
                            peer_uri=self.lab.hosts[dest].tcp_uri,
                        ),
                        timeout=600,
                    )
                )
            except grpc.RpcError as exc:
                return NoReport("rpc-error", f"{exc.code()}: {exc.details()}")
        try:
            return report_from_message(events[-1].report)
        except ValueError as exc:
            return NoReport("bad-report", str(exc))

    def failover(self, to: str) -> str:
        self.workflows_run += 1
        host = self.lab.where()
        proc = co.ptmig(self.lab, host, "failover", DOMAIN_NAME, "--to", to, "--json", check=False)
        try:
            teams = json.loads(proc.stdout)["teams"]
        except (json.JSONDecodeError, KeyError):
            return f"failover --to {to} exited {proc.returncode}: {proc.stderr.strip()[-300:]}"
        off = {t: m for t, m in teams.items() if m != to}
        return f"failover --to {to}: teams {off} not on {to}" if off or not teams else ""

    def cancelled_migration(self, phase: str) -> tuple[MigrationReport | NoReport, str]:
        """``ptmig migrate`` cancelled by ``ptmig cancel`` once the journal shows it at
        *phase*; returns (the migration's report, what the cancel said)."""
        src = self.lab.where()
        self.workflows_run += 1
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            proc = subprocess.Popen(
                migrate_argv(DOMAIN_NAME, co.hop(self.lab, OTHER[src])),
                stdout=out,
                stderr=err,
                env=cli_env(co.journal_path()),
            )
            at = _wait_for_step(phase, proc, timeout=180)
            answer = co.ptmig(self.lab, src, "cancel", DOMAIN_NAME, "--json", check=False)
            proc.wait(timeout=600)
            out.seek(0)
            err.seek(0)
            done = subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())
        said = f"cancel at {at or 'the end'}: exit {answer.returncode} {answer.stdout.strip()}"
        return _read(done), said

    # -- the sample -------------------------------------------------------------

    def sample(self, after: int) -> dict[str, Any]:
        lab = self.lab
        if lab.where() != "hosta":
            raise LabError("samples are taken with the guest on hosta")
        s: dict[str, Any] = {"after_migrations": after, "at": time.time()}
        agent, run_files = parse_agent_probe(lab.exec(AGENT_PROBE, timeout=60).check())
        self.agent_pids.append(agent.pid)
        s["agent_pid"] = agent.pid
        s["agent_rss_kb"] = agent.rss_kb
        s["agent_fds"] = agent.fds
        s["agent_pid_changes"] = len(set(self.agent_pids)) - 1
        s["guest_run_ptmig_files"] = run_files
        ptmigd = _proc_sample(self.daemon.pid)
        s["ptmigd_rss_kb"], s["ptmigd_fds"] = ptmigd.rss_kb, ptmigd.fds
        s["ptmigd_fd_kinds"] = _fd_kinds(self.daemon.pid)
        # a CLI's peak since the last sample (the first: a status, before any migration)
        if not self.cli_peaks:
            _status, peak = _measured(cli_argv(lab.hosts["hosta"].uri, "workflows"))
            self.cli_peaks.append(peak)
        s["cli_peak_rss_kb"] = max(self.cli_peaks)
        self.cli_peaks.clear()
        for host, key in (("hosta", "a"), ("hostb", "b")):
            d = _proc_sample(lab.state.pids[host])
            s[f"libvirtd_{key}_rss_kb"], s[f"libvirtd_{key}_fds"] = d.rss_kb, d.fds
            s[f"libvirtd_{key}_clients"] = _libvirtd_clients(lab, host)
        import libvirt

        dom = lab.domain("hosta")
        live = dom.XMLDesc(0)
        s["domain_xml_bytes"] = len(live)
        s["domain_xml_inactive_bytes"] = len(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        s["ptmig_metadata_bytes"], s["leases_left"] = ptmig_metadata(live)
        lives = {h: _live_xmls(lab, h) for h in lab.hosts}
        held, double = held_taps([x for xs in lives.values() for x in xs], self.pool_taps)
        for host in lab.hosts:
            mine = {tap for tap, _ in co.POOL_SLOTS[host]}
            s[f"pool_taps_held_{host}"] = sum(1 for tap in held if tap in mine)
        s["pool_taps_double_held"] = double
        s["pool_taps_orphaned"] = len(_present_taps() & self.pool_taps - set(held))
        s.update(self._journal_figures())
        for host in lab.hosts:
            s[f"{host}_run_files"] = count_files(lab.hosts[host].state_dir / "run")
            s[f"{host}_varlib_files"] = count_files(lab.hosts[host].state_dir / "lib")
        s["machine_run_ptmig_files"] = count_files(MACHINE_RUN_DIR)
        s["teams"] = co.ptmig_json(lab, "hosta", "status", DOMAIN_NAME)["teams"]
        self.last_sampled_at = s["at"]
        return s

    def _journal_figures(self) -> dict[str, Any]:
        path = co.journal_path()
        with contextlib_closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            workflows = db.execute("SELECT COUNT(*) FROM workflows").fetchone()[0]
            open_ = db.execute("SELECT COUNT(*) FROM workflows WHERE state='open'").fetchone()[0]
            steps = db.execute(
                "SELECT COUNT(s.seq) FROM workflows w JOIN steps s ON s.workflow_id = w.id "
                "WHERE w.kind='migrate' AND w.outcome='done' AND w.created >= ? "
                "GROUP BY w.id",
                (self.last_sampled_at,),
            ).fetchall()
            # the database's own size, its WAL's committed pages included (the WAL file
            # itself is reused, not shrunk, so its size says nothing)
            pages = db.execute("PRAGMA page_count").fetchone()[0]
            size = pages * db.execute("PRAGMA page_size").fetchone()[0]
        added = self._journal_last
        self._journal_last = (size, workflows)
        per_workflow = (size - added[0]) / max(workflows - added[1], 1) if added else 0
        return {
            "journal_workflows": workflows,
            "journal_open_workflows": open_,
            "journal_steps_per_migration": max((n for (n,) in steps), default=0),
            "journal_unaccounted_workflows": workflows - self.journal_before - self.workflows_run,
            "journal_bytes": size,
            "journal_bytes_per_workflow": round(per_workflow),
        }


@contextmanager
def contextlib_closing(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    try:
        yield db
    finally:
        db.close()


def _journal_workflows() -> int:
    path = co.journal_path()
    if not Path(path).exists():
        return 0
    with contextlib_closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return int(db.execute("SELECT COUNT(*) FROM workflows").fetchone()[0])


def _wait_for_step(phase: str, proc: subprocess.Popen[bytes], timeout: float) -> str:
    """Until the open workflow's journal shows step *phase* started (returns it), or the
    migration ended first (returns "")."""
    from host.workflow.journal import Journal

    deadline = time.monotonic() + timeout
    with Journal(co.journal_path()) as journal:
        while time.monotonic() < deadline and proc.poll() is None:
            for w in journal.open_workflows():
                if any(s.name == phase for s in journal.steps(w.id)):
                    return phase
            time.sleep(0.02)
    return ""


#: Run by :func:`measured` as a small process between the soak and the measured one: it
#: spawns ``argv[2:]``, writes that child's peak RSS (kB) to the fd ``argv[1]`` names and
#: exits as the child did.  Linux carries the peak RSS of the memory a process was spawned
#: from into its ``ru_maxrss`` (exec keeps the old mm's high-water mark), so a CLI spawned
#: straight from the soak reported the soak's own peak, which grows with its records.
_PEAK_LAUNCHER = """\
import os, signal, sys
fd = int(sys.argv[1])
os.set_inheritable(fd, False)
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
os.write(fd, str(usage.ru_maxrss).encode())
if os.WIFSIGNALED(status):
    signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
    os.kill(os.getpid(), os.WTERMSIG(status))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def measured(
    argv: list[str], env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run *argv* (its output captured) and return it with its own peak RSS in kB, through
    :data:`_PEAK_LAUNCHER`, so the figure is the process's and not its spawner's."""
    read_end, write_end = os.pipe()
    try:
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            proc = subprocess.run(
                [sys.executable, "-c", _PEAK_LAUNCHER, str(write_end), *argv],
                stdout=out,
                stderr=err,
                env=env,
                pass_fds=(write_end,),
                check=False,
            )
            os.close(write_end)
            write_end = -1
            peak = os.read(read_end, 64).decode()
            out.seek(0)
            err.seek(0)
            done = subprocess.CompletedProcess(argv, proc.returncode, out.read(), err.read())
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    if not peak:
        raise LabError(f"no peak RSS from the launcher of {argv[0]}: {done.stderr[-500:]}")
    return done, int(peak)


def _measured(argv: list[str]) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run *argv* as ``lab.ptmig.ptmig_at`` does; also its own peak RSS in kB."""
    return measured(argv, cli_env(co.journal_path()))


def _read(proc: subprocess.CompletedProcess[str]) -> MigrationReport | NoReport:
    """The report a ``ptmig migrate --json`` printed, or why there is none."""
    try:
        return read_migration(proc).report
    except CommandError:
        return NoReport(f"exit {proc.returncode}", proc.stderr.strip()[-500:])


def _proc_sample(pid: int) -> ProcSample:
    rss = parse_vmrss_kb(Path(f"/proc/{pid}/status").read_text())
    return ProcSample(pid, rss, len(os.listdir(f"/proc/{pid}/fd")))


def _fd_kinds(pid: int) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            kind = fd_kind(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            continue
        kinds[kind] = kinds.get(kind, 0) + 1
    return dict(sorted(kinds.items()))


def _libvirtd_clients(lab: VmLab, host: str) -> int:
    admin = lab.hosts[host].socket.parent / "libvirt-admin-sock"
    uri = f"libvirtd:///system?socket={admin}"
    try:
        return parse_clients_info(
            run(["virt-admin", "-c", uri, "srv-clients-info", "libvirtd"], capture=True)
        )
    except (CommandError, ValueError) as exc:  # the figure lost, not the soak
        log.warning("%s: no client count: %s", host, exc)
        return -1


def _live_xmls(lab: VmLab, host: str) -> list[str]:
    import libvirt

    return [
        d.XMLDesc(0) for d in lab.conn(host).listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
    ]


def _present_taps() -> set[str]:
    present = set()
    for net in HOSTS:
        out = run(["ip", "-n", net.netns, "-o", "link", "show"], capture=True)
        present |= {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}
    return present


@contextmanager
def _pinging(rate: float, block: int) -> Iterator[Callable[[list[Phase]], dict[str, list[int]]]]:
    """Ping both teams for the block; the callable gives each team's loss per phase."""
    senders = pingers(f"soak-{block}", rate)
    for p in senders.values():
        p.start()
    records: dict[str, Any] = {}

    def lost(phases: list[Phase]) -> dict[str, list[int]]:
        out = {}
        for team, record in records.items():
            by_name = {ph.name: ph.lost for ph in analyze(record, phases).phases}
            out[team] = [by_name[ph.name] for ph in phases]
        return out

    try:
        yield lost
    finally:
        time.sleep(1.5)
        for team, p in senders.items():
            records[team] = p.stop()
            Path(p.outfile).unlink(missing_ok=True)


def run_soak(
    lab: VmLab,
    daemon: tuple[subprocess.Popen[bytes], Path],
    *,
    migrations: int,
    sample_every: int,
    failover_every: int,
    cancel_every: int,
    rate: float,
) -> SoakReport:
    soak = Soak(lab, daemon, rate)
    report = SoakReport(
        migrations, rate, started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    )
    t0 = time.monotonic()
    report.samples.append(soak.sample(0))
    cancels = 0
    done = 0
    while done < migrations:
        block = list(range(done + 1, min(done + sample_every, migrations) + 1))
        attempts: list[tuple[Attempt, Phase]] = []
        with _pinging(rate, block[0]) as lost:
            for i in block:
                if cancel_every and i % cancel_every == cancel_every // 2:
                    phase = CANCEL_PHASES[cancels % len(CANCEL_PHASES)]
                    cancels += 1
                    src = lab.where()
                    attempts.append(
                        _timed(i, f"cancel@{phase}", lab, partial(_cancel, soak, phase))
                    )
                    if lab.where() != src:  # too late, and done: back, so the count holds
                        attempts.append(
                            _timed(i, "migrate-cli", lab, partial(_migrate, soak, "cli", src))
                        )
                via = "cli" if i % 2 else "ptmigd"
                dest = OTHER[lab.where()]
                attempts.append(
                    _timed(i, f"migrate-{via}", lab, partial(_migrate, soak, via, dest))
                )
                if failover_every and i % failover_every == 0:
                    attempts.append(_timed(i, "failover", lab, partial(_failover, soak)))
            phases = [ph for _a, ph in attempts]
            time.sleep(1.0)
        per_team = lost(phases)
        for n, (attempt, _ph) in enumerate(attempts):
            attempt.lost = {team: values[n] for team, values in per_team.items()}
            report.attempts.append(attempt)
            if attempt.failure:
                log.error(
                    "#%d %s %s: %s", attempt.index, attempt.kind, attempt.route, attempt.failure
                )
        done = block[-1]
        log.info(
            "%d/%d migrations, %d failures, %.1f min",
            done,
            migrations,
            len(report.failures),
            (time.monotonic() - t0) / 60,
        )
        report.samples.append(soak.sample(done))  # an even count: the guest is on hosta
    report.wall_s = time.monotonic() - t0
    after = [int(s["after_migrations"]) for s in report.samples]
    report.verdicts = [
        judge(name, unit, [float(s[name]) for s in report.samples], tol, after)
        for name, (unit, tol) in FIGURES.items()
    ]
    return report


def _timed(
    index: int, kind: str, lab: VmLab, action: Callable[[], tuple[str, str]]
) -> tuple[Attempt, Phase]:
    src = lab.where()
    start = time.time()
    outcome, failure = action()
    end = time.time()
    try:
        route = f"{src} -> {lab.where()}"
    except LabError as exc:
        route, failure = f"{src} -> ?", failure or str(exc)
    return Attempt(index, kind, route, outcome, round(end - start, 2), failure=failure), Phase(
        f"{kind}#{index}", start, end
    )


def _migrate(soak: Soak, via: str, dest: str) -> tuple[str, str]:
    report = soak.migrate_cli(dest) if via == "cli" else soak.migrate_ptmigd(dest)
    failure = failed_migration(report)
    if not failure and soak.lab.where() != dest:
        failure = f"done, but the guest is not on {dest}"
    return str(report.outcome), failure


def _failover(soak: Soak) -> tuple[str, str]:
    failure = soak.failover("standby") or soak.failover("primary")
    return ("failed" if failure else "standby->primary"), failure


def _cancel(soak: Soak, phase: str) -> tuple[str, str]:
    src = soak.lab.where()
    report, said = soak.cancelled_migration(phase)
    outcome = str(report.outcome)
    if outcome == Outcome.DONE and soak.lab.where() != src:
        # the cancel came after the point of no return: a migration like the others
        return "done (cancel too late)", failed_migration(report)
    if isinstance(report, NoReport) or outcome != Outcome.ROLLED_BACK or not report.cancelled:
        return outcome, f"not rolled back by the cancel ({said}): {report.error}"
    if soak.lab.where() != src:
        return outcome, f"rolled back, but the guest left {src}"
    off = {t: str(m) for t, m in report.teams.items() if m is not TeamMode.PRIMARY}
    return outcome, f"rolled back with teams off primary: {off}" if off else ""


def main(
    *,
    migrations: int,
    out: Path | None,
    as_json: bool,
    sample_every: int = 10,
    failover_every: int = 10,
    cancel_every: int = 10,
    rate: float = 100.0,
    keep: bool = False,
) -> int:
    if migrations < 2 or migrations % 2 or sample_every % 2:
        print("ptmig-lab soak: --migrations and --sample-every must be even", file=sys.stderr)
        return 2
    lab = VmLab()
    started_here = not lab.state.netns
    if started_here:
        log.info("starting the lab")
        lab.up()
    try:
        if lab.where() != "hosta":
            raise LabError("the soak starts with the guest on hosta ('ptmig migrate' it there)")
        for ip in TEAMS.values():
            wait_reachable(ip)
        co.configure(lab)
        with (
            co.ptmigd(run_dir() / "soak-ptmigd.log", co.journal_path()) as daemon,
            LoadSampler(lab.state.pids.values()) as sampler,
        ):
            _wait_for_socket(*daemon)
            report = run_soak(
                lab,
                daemon,
                migrations=migrations,
                sample_every=sample_every,
                failover_every=failover_every,
                cancel_every=cancel_every,
                rate=rate,
            )
        report.load = sampler.stop()
        lab.check_health()
    finally:
        if started_here and not keep:
            lab.down()
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    print(json.dumps(report.to_dict(), indent=1) if as_json else report.format())
    return 0 if report.ok else 1


def _wait_for_socket(daemon: subprocess.Popen[bytes], sock: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not sock.exists():
        if daemon.poll() is not None or time.monotonic() > deadline:
            raise LabError(f"ptmigd did not come up; see {run_dir() / 'soak-ptmigd.log'}")
        time.sleep(0.1)
