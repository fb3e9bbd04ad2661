"""The lab's two ways to move a guest, each written once.

* :func:`ptmig_migrate`: ``ptmig migrate --json`` as an operator types it (lab.ptmig), its
  output read back as the product's own :class:`~host.workflow.model.MigrationReport`
  (``from_plain``, the inverse of the CLI's encoder): the demo, the benchmarks, the soak,
  the nested lab and the e2e checks move the guest through it and read the same typed
  report.
* :func:`libvirt_migrate`: libvirt's own live migration with the flags ptmig's call uses
  (``host.hypervisor.MIGRATE_FLAGS``) and nothing of ptmig's around it: the baselines (the
  floor, naive, upstream, plain cases) and the orchestrated lab.
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from dataclasses import dataclass

import libvirt

from host.hypervisor import MIGRATE_FLAGS
from host.workflow.model import MigrationReport, from_plain
from lab.guest import DOMAIN_NAME
from lab.ptmig import cli_argv, ptmig_at
from lab.run import CommandError
from lab.traffic import Phase

log = logging.getLogger(__name__)

#: The lab's guests share one qcow2 opened with cache='unsafe', so both kinds of
#: migration vouch for it (``--unsafe``, VIR_MIGRATE_UNSAFE).
PLAIN_FLAGS = MIGRATE_FLAGS | libvirt.VIR_MIGRATE_UNSAFE


@dataclass(frozen=True)
class Hop:
    """One move as the lab's ``ptmig`` addresses it: the source and destination libvirtds
    as the coordinator reaches them, and the destination as the source's libvirtd does
    (peer to peer)."""

    source_uri: str
    destination_uri: str
    peer_uri: str


def migrate_args(domain: str, hop: Hop, *extra: str, as_json: bool = True) -> list[str]:
    """``ptmig migrate``'s arguments after ``-c SOURCE``: p2p over the peer URI, the shared
    disk vouched for, the report as JSON (unless not *as_json*), then *extra* options."""
    out = ["migrate", domain, hop.destination_uri, "--peer-uri", hop.peer_uri, "--unsafe"]
    return [*out, "--json", *extra] if as_json else [*out, *extra]


def migrate_argv(domain: str, hop: Hop, *extra: str, as_json: bool = True) -> list[str]:
    """The whole ``ptmig -c SOURCE migrate ...`` command line, for callers that run it
    themselves (a signal sent to it, its peak RSS measured)."""
    return cli_argv(hop.source_uri, *migrate_args(domain, hop, *extra, as_json=as_json))


def report_phases(report: MigrationReport | None) -> list[Phase]:
    """The report's phases on the epoch clock, for lab.traffic's loss per phase."""
    if report is None:
        return []
    return [Phase(p.name, p.started_at, p.started_at + p.seconds) for p in report.phases]


@dataclass(frozen=True)
class PtmigMigration:
    """One ``ptmig migrate --json``: its exit code and its report, typed."""

    exit_code: int
    report: MigrationReport
    stderr: str = ""

    @property
    def phases(self) -> list[Phase]:
        return report_phases(self.report)

    @property
    def wall_s(self) -> float:
        """The phases' seconds summed: the workflow's own time, without the CLI's start."""
        return sum(p.seconds for p in self.report.phases)

    @property
    def downtime_ms(self) -> int | None:
        return self.report.migration.downtime_ms if self.report.migration else None

    def log(self) -> list[tuple[float, str]]:
        """``ptmig -v``'s log records in its stderr, (epoch s, "logger: message"); none
        without -v."""
        return log_lines(self.stderr)


def log_lines(text: str) -> list[tuple[float, str]]:
    """The records ``ptmig -v`` writes (``%(asctime)s %(name)s: %(message)s``, local
    time to the millisecond) as (epoch s, rest); other lines are left out."""
    out = []
    for line in text.splitlines():
        stamp, _, rest = line[:23], line[23:24], line[24:]
        try:
            parsed = time.strptime(stamp[:19], "%Y-%m-%d %H:%M:%S")
            at = time.mktime(parsed) + int(stamp[20:23]) / 1000
        except ValueError:
            continue
        out.append((round(at, 3), rest))
    return out


def read_migration(proc: subprocess.CompletedProcess[str]) -> PtmigMigration:
    """The migration a finished ``ptmig migrate --json`` printed; CommandError when it
    printed no report (a refusal, a usage error) or not one."""
    argv = [str(a) for a in proc.args]
    if not proc.stdout.strip():
        raise CommandError(argv, proc.returncode, f"no report: {proc.stderr}")
    try:
        report = from_plain(MigrationReport, json.loads(proc.stdout))
    except ValueError as exc:  # json.JSONDecodeError too
        raise CommandError(argv, proc.returncode, f"not a report: {exc}\n{proc.stdout}") from exc
    return PtmigMigration(proc.returncode, report, proc.stderr)


def ptmig_migrate(
    hop: Hop,
    journal: str,
    *extra: str,
    domain: str = DOMAIN_NAME,
    timeout: float = 600,
    verbose: bool = False,
) -> PtmigMigration:
    """``ptmig -c SOURCE migrate DOMAIN DESTINATION --json`` with *journal*, read back;
    an outcome other than done is the caller's to judge (the exit code says it too).
    *verbose*: ``ptmig -v``, whose log records (:meth:`PtmigMigration.log`) time the
    steps inside a phase."""
    args = ["-v"] if verbose else []
    proc = ptmig_at(
        hop.source_uri,
        journal,
        *args,
        *migrate_args(domain, hop, *extra),
        timeout=timeout,
        check=False,
    )
    return read_migration(proc)


@dataclass(frozen=True)
class LibvirtMigration:
    """One plain libvirt migration: when it started (epoch s), its wall time, and the
    destination's record of the completed job (None where libvirt has none)."""

    started_at: float
    wall_s: float
    downtime_ms: int | None = None
    elapsed_ms: int | None = None
    data_total: int | None = None  # memory bytes

    @property
    def phases(self) -> list[Phase]:
        return [Phase("migrate", self.started_at, self.started_at + self.wall_s)]


def libvirt_migrate(
    dom: libvirt.virDomain, destination: libvirt.virConnect, peer_uri: str
) -> LibvirtMigration:
    """Live-migrate *dom* peer to peer to *destination* (its libvirtd reached by the
    source's at *peer_uri*), persistent there and undefined on the source; libvirtError
    as libvirt raised it."""
    started, t0 = time.time(), time.monotonic()
    dom.migrateToURI3(peer_uri, {}, PLAIN_FLAGS)
    wall = time.monotonic() - t0
    stats: dict[str, int] = {}
    try:
        completed = destination.lookupByUUID(dom.UUID())
        stats = completed.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    except libvirt.libvirtError as exc:
        log.warning("no job statistics from %s: %s", destination.getURI(), exc)
    return LibvirtMigration(
        started, wall, stats.get("downtime"), stats.get("time_elapsed"), stats.get("data_total")
    )
