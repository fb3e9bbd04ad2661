"""The soak's pure parts: growth verdicts, the probes' parsing, what a domain XML holds."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from host.workflow.model import MigrationReport, Outcome, TeamMode
from lab.soak import (
    FIGURES,
    NoReport,
    Tolerance,
    count_files,
    failed_migration,
    fd_kind,
    held_taps,
    judge,
    measured,
    parse_agent_probe,
    parse_clients_info,
    parse_vmrss_kb,
    ptmig_metadata,
)

RSS = Tolerance(2048, "noise")


def test_growth_is_judged_after_warm_up_and_reported_from_the_first_sample() -> None:
    v = judge("agent_rss_kb", "kB", [30000, 36000, 36500, 37000], RSS)
    assert (v.first, v.baseline, v.last) == (30000, 36000, 37000)
    assert v.growth == 7000 and v.judged_growth == 1000
    assert v.ok


def test_steady_growth_beyond_the_tolerance_is_a_leak() -> None:
    samples = [30000 + 300 * i for i in range(11)]  # 300 kB per sample, 3000 after warm-up
    v = judge("agent_rss_kb", "kB", samples, RSS)
    assert v.judged_growth == 2700 and not v.ok


def test_growth_exactly_at_the_tolerance_passes_and_one_more_fails() -> None:
    fds = Tolerance(2, "a connection open while sampled")
    assert judge("fds", "fds", [10, 10, 12], fds).ok
    assert not judge("fds", "fds", [10, 10, 13], fds).ok


def test_shrinking_is_not_growth() -> None:
    v = judge("x", "B", [900, 800, 700], Tolerance(0, "exact"))
    assert v.judged_growth == -100 and v.ok


def test_two_samples_judge_from_the_first() -> None:
    v = judge("x", "B", [100, 101], Tolerance(0, "exact"))
    assert v.baseline == 100 and not v.ok


def test_a_zero_figure_fails_on_any_nonzero_sample_even_if_it_went_back() -> None:
    leases = Tolerance(0, "none at rest", zero=True)
    assert judge("leases_left", "", [0, 0, 0], leases).ok
    v = judge("leases_left", "", [0, 1, 0], leases)
    assert v.growth == 0 and not v.ok


def test_no_samples_is_an_error() -> None:
    with pytest.raises(ValueError, match="no samples"):
        judge("x", "", [], RSS)


def test_every_figure_states_why_its_tolerance_is_enough() -> None:
    for name, (_unit, tol) in FIGURES.items():
        assert tol.why, name
        assert tol.allowed >= 0, name


def test_vmrss_from_proc_status() -> None:
    text = "Name:\tpython3\nVmPeak:\t  50000 kB\nVmRSS:\t   31234 kB\nThreads:\t4\n"
    assert parse_vmrss_kb(text) == 31234
    with pytest.raises(ValueError, match="VmRSS"):
        parse_vmrss_kb("Name:\tkthreadd\n")


def test_agent_probe_among_console_noise() -> None:
    out = (
        "root@guest:~# pid=$(systemctl show -p MainPID --value ptmig-agent); echo pid=$pid\n"
        "pid=412\nVmRSS:\t   28760 kB\nfds=17\nrunfiles=2\n"
    )
    agent, files = parse_agent_probe(out)
    assert (agent.pid, agent.rss_kb, agent.fds, files) == (412, 28760, 17, 2)


@pytest.mark.parametrize(
    "out",
    [
        "pid=0\nVmRSS:\t 1 kB\nfds=3\nrunfiles=1\n",  # the unit is not running
        "pid=412\nfds=17\nrunfiles=2\n",  # no VmRSS: the process went away
        "pid=412\nVmRSS:\t 1 kB\nfds=\nrunfiles=2\n",
    ],
)
def test_agent_probe_that_cannot_be_read_is_an_error(out: str) -> None:
    with pytest.raises(ValueError):
        parse_agent_probe(out)


def domain(metadata: str = "", taps: tuple[str, ...] = ()) -> str:
    nics = "".join(
        f"<interface type='ethernet'><mac address='52:54:00:00:00:0{i}'/>"
        f"<target dev='{tap}'/><model type='e1000e'/></interface>"
        for i, tap in enumerate(taps)
    )
    return (
        f"<domain type='kvm'><name>g</name><metadata>{metadata}</metadata>"
        f"<devices>{nics}</devices></domain>"
    )


TEAMS_EL = "<t:teams xmlns:t='https://ptmig.dev/xmlns/teams/1'><t:team name='lan'/></t:teams>"
LEASE_EL = "<l:lease xmlns:l='https://ptmig.dev/xmlns/lease/1' workflow='w' expires='1.5'/>"
OTHER_EL = "<o:os xmlns:o='http://libosinfo.org/xmlns/libvirt/domain/1.0' id='debian'/>"


def test_metadata_counts_ptmig_elements_only_and_finds_a_lease() -> None:
    size, leases = ptmig_metadata(domain(OTHER_EL + TEAMS_EL))
    assert size > 0 and leases == 0
    bigger, leases = ptmig_metadata(domain(OTHER_EL + TEAMS_EL + LEASE_EL))
    assert bigger > size and leases == 1
    assert ptmig_metadata(domain(OTHER_EL)) == (0, 0)
    assert ptmig_metadata("<domain><name>g</name></domain>") == (0, 0)


def test_taps_held_by_two_domains_are_counted_and_others_ignored() -> None:
    pool = {"ptv-a1", "ptv-a2", "ptv-b1"}
    held, double = held_taps(
        [domain(taps=("vnet0", "ptv-a1")), domain(taps=("ptv-a1", "ptv-a2"))], pool
    )
    assert held == {"ptv-a1": 2, "ptv-a2": 1} and double == 1
    held, double = held_taps([domain(taps=("vnet0", "ptv-a1", "ptv-a2"))], pool)
    assert held == {"ptv-a1": 1, "ptv-a2": 1} and double == 0


def test_count_files_counts_directories_and_files_and_an_absent_root_is_zero(
    tmp_path: Path,
) -> None:
    (tmp_path / "qemu" / "channel").mkdir(parents=True)
    (tmp_path / "qemu" / "guest.xml").write_text("x")
    (tmp_path / "qemu" / "channel" / "sock").write_text("")
    assert count_files(tmp_path) == 4
    assert count_files(tmp_path / "absent") == 0


def report(outcome: Outcome, teams: dict[str, TeamMode], error: str = "") -> MigrationReport:
    return MigrationReport("w", "vm", "a", "b", outcome, teams=teams, error=error)


P, S = TeamMode.PRIMARY, TeamMode.STANDBY


@pytest.mark.parametrize(
    "ended,why",
    [
        (report(Outcome.DONE, {"lan": P, "wan": P}), ""),
        (report(Outcome.DONE, {"lan": P, "wan": S}), "wan"),
        (report(Outcome.DONE, {}), "none reported"),
        (report(Outcome.DONE_DEGRADED, {"lan": S}, "pool"), "degraded"),
        (NoReport("exit 4", "ptmig: agent unreachable"), "agent unreachable"),
    ],
)
def test_a_migration_fails_unless_done_with_every_team_on_primary(
    ended: MigrationReport | NoReport, why: str
) -> None:
    said = failed_migration(ended)
    assert (said == "") == (why == "")
    assert why in said


def test_libvirtd_clients_from_virt_admin() -> None:
    text = "nclients_max        : 5000\nnclients            : 3\nnclients_unauth_max : 20\n"
    assert parse_clients_info(text) == 3
    with pytest.raises(ValueError, match="nclients"):
        parse_clients_info("nclients_max : 5000\n")


@pytest.mark.parametrize(
    "target,kind",
    [
        ("socket:[123456]", "socket"),
        ("pipe:[98765]", "pipe"),
        ("anon_inode:[eventfd]", "anon_inode:[eventfd]"),
        ("anon_inode:[eventpoll]", "anon_inode:[eventpoll]"),
        ("/var/tmp/ptmig-lab/journal.sqlite", "/var/tmp/ptmig-lab/journal.sqlite"),
    ],
)
def test_fd_kind_drops_inodes_and_keeps_paths(target: str, kind: str) -> None:
    assert fd_kind(target) == kind


# -- a spawned process's own peak RSS ---------------------------------------------------

_ALLOCATE_MIB = 'b = bytearray({n} << 20); b[::4096] = b"x" * len(b[::4096]); print("held")'


def test_a_spawned_processs_peak_is_its_own_not_the_spawners() -> None:
    """The soak's CLI figure grew with the soak's own RSS (stop 31): a process spawned from
    a large one reports the large one's peak through wait4 unless spawned through a small
    process.  The spawner here holds 300 MiB; the child allocates 64 MiB."""
    spawner = bytearray(300 << 20)
    spawner[::4096] = b"x" * len(spawner[::4096])
    proc, peak_kb = measured([sys.executable, "-c", _ALLOCATE_MIB.format(n=64)])
    assert (proc.returncode, proc.stdout) == (0, "held\n")
    assert 64 * 1024 < peak_kb < 200 * 1024, peak_kb  # the child's 64 MiB, not 300
    _small, small_kb = measured([sys.executable, "-c", "pass"])
    assert small_kb < 64 * 1024 < peak_kb, (small_kb, peak_kb)
    del spawner


def test_a_spawned_processs_exit_and_output_are_kept() -> None:
    proc, _ = measured(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "out\n", "err\n")
    killed, _ = measured(["sh", "-c", "kill -TERM $$"])
    assert killed.returncode == -signal.SIGTERM


# -- a figure behind a bounded structure: judged once it is full ---------------------------

SETTLING = Tolerance(1024, "a log that fills", settles_after=80)
AFTER = [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120, 130, 140, 150]


def test_a_figure_that_fills_then_stays_level_is_judged_from_its_settling() -> None:
    """The agent's RSS rises while its operation log fills, then stays level: judged from
    the sample at 80 migrations, the fill is not a leak."""
    values = [37900, 40500, 41700, 42300, 42500, 42800, 43100] + [43900] * 9
    v = judge("agent_rss_kb", "kB", values, SETTLING, AFTER)
    assert (v.baseline, v.judged_growth, v.growth) == (43900, 0, 6000)
    assert v.ok


def test_a_leak_after_the_settling_still_fails() -> None:
    """20 kB a migration past the settling: 1.4 MB over 70 migrations."""
    values = [37900 + 20 * n for n in AFTER]
    v = judge("agent_rss_kb", "kB", values, SETTLING, AFTER)
    assert v.baseline == 37900 + 20 * 80 and v.judged_growth == 1400
    assert not v.ok


def test_a_soak_that_ends_before_the_settling_proves_nothing() -> None:
    v = judge("agent_rss_kb", "kB", [100, 100, 100, 100], SETTLING, [0, 10, 20, 80])
    assert not v.ok and v.why.startswith("NOT JUDGED")
    assert judge("agent_rss_kb", "kB", [100] * 5, SETTLING, [0, 10, 20, 80, 90]).ok


def test_a_settling_figure_needs_the_migration_counts() -> None:
    with pytest.raises(ValueError, match="no counts"):
        judge("agent_rss_kb", "kB", [1, 2, 3], SETTLING)
