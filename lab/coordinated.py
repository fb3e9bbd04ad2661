"""The lab under ptmig's coordinator: pools on both hosts, teams in the guest's metadata.

Everything goes through the ``ptmig`` command, as an operator would type it, with the
lab's own journal.

Pools: one emulated pool ``lab`` per host, e1000e NICs on ``br-g`` whose MACs differ per
host, as the burned-in MACs of two hosts' non-SR-IOV cards do.  Team lan (MAC policy
preserve) and team wan (follow) draw from it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lab import PRIMARY_MAC, STANDBY_MAC, WAN_PRIMARY_MAC, WAN_STANDBY_MAC
from lab.guest import DOMAIN_NAME, PRIMARY_NIC, WAN_PRIMARY_NIC, ExtraGuest
from lab.migration import Hop, PtmigMigration, ptmig_migrate
from lab.paths import run_dir
from lab.ptmig import CHECKOUT_PYTHONPATH, ptmig_at
from lab.vmlab import LabError, VmLab

POOL = "lab"
#: Per-host slots (tap, MAC).  hosta's first two are the NICs the guest boots with.
POOL_SLOTS = {
    "hosta": [
        (PRIMARY_NIC.tap, PRIMARY_MAC),
        (WAN_PRIMARY_NIC.tap, WAN_PRIMARY_MAC),
        ("ptv-a3", "52:54:00:ba:00:03"),
        ("ptv-a4", "52:54:00:ba:00:04"),
    ],
    "hostb": [
        ("ptv-b1", "52:54:00:cb:00:01"),
        ("ptv-b2", "52:54:00:cb:00:02"),
        ("ptv-b3", "52:54:00:cb:00:03"),
        ("ptv-b4", "52:54:00:cb:00:04"),
    ],
}


#: Spare slots per host beyond every team's, with extra guests (none are added without).
EXTRA_SPARES = 1


def pool_slots(extras: list[ExtraGuest]) -> dict[str, list[tuple[str, str]]]:
    """Each host's slots with *extras* beside the main guest: POOL_SLOTS unchanged without
    extra guests; with them, hosta also has each extra guest's boot primary, and each host
    has a slot for every team of every guest plus EXTRA_SPARES, so an evacuation to either
    host finds a device for each team and the fault cases still have spares."""
    if not extras:
        return POOL_SLOTS
    teams = 2 + len(extras)  # the main guest's lan and wan, each extra guest's lan
    a = [*POOL_SLOTS["hosta"], *((g.primary.tap, g.primary.mac) for g in extras)]
    b = list(POOL_SLOTS["hostb"])
    for slots, host in ((a, "a"), (b, "b")):
        n = len(slots)
        want = teams + EXTRA_SPARES
        base = 0xCB if host == "b" else 0xBA
        slots += [
            (f"ptv-{host}{i}", f"52:54:00:{base:02x}:00:{i:02x}") for i in range(n + 1, want + 1)
        ]
    return {"hosta": a, "hostb": b}


def journal_path() -> str:
    return str(run_dir() / "journal.sqlite")


def ptmig(
    lab: VmLab, host: str, *args: str, timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``ptmig -c <host's URI> ARGS`` with the lab's journal."""
    return ptmig_at(lab.hosts[host].uri, journal_path(), *args, timeout=timeout, check=check)


def hop(lab: VmLab, dest: str, name: str = DOMAIN_NAME) -> Hop:
    """Guest *name*'s move from where it runs to *dest*, p2p over the hosts' TCP URIs."""
    return Hop(lab.hosts[lab.where(name)].uri, lab.hosts[dest].uri, lab.hosts[dest].tcp_uri)


def migrate(
    lab: VmLab, dest: str, *extra: str, name: str = DOMAIN_NAME, verbose: bool = False
) -> PtmigMigration:
    """``ptmig migrate --json`` of guest *name* to *dest* (*extra*: more options), read
    back as its typed report (lab.migration); *verbose*: with ``ptmig -v``'s log."""
    return ptmig_migrate(hop(lab, dest, name), journal_path(), *extra, domain=name, verbose=verbose)


def ptmig_json(lab: VmLab, host: str, *args: str, ok: tuple[int, ...] = (0,)) -> Any:
    proc = ptmig(lab, host, *args, "--json", check=False)
    if proc.returncode not in ok:
        raise LabError(f"ptmig {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
    return json.loads(proc.stdout)


def define_pools(lab: VmLab, slots: dict[str, list[tuple[str, str]]] | None = None) -> None:
    for host, host_slots in (slots or POOL_SLOTS).items():
        spec = [f"--slot={tap}={mac}" for tap, mac in host_slots]
        ptmig(
            lab,
            host,
            "pool-define",
            POOL,
            "--kind",
            "emulated",
            "--bridge",
            "br-g",
            "--model",
            "e1000e",
            *spec,
        )


def set_teams(lab: VmLab) -> None:
    host = lab.where()
    ptmig(
        lab,
        host,
        "team-set",
        DOMAIN_NAME,
        "--team",
        "lan",
        "--standby-mac",
        STANDBY_MAC,
        "--pool",
        POOL,
        "--mac-policy",
        "preserve",
        "--primary-alias",
        PRIMARY_NIC.alias,
    )
    ptmig(
        lab,
        host,
        "team-set",
        DOMAIN_NAME,
        "--team",
        "wan",
        "--standby-mac",
        WAN_STANDBY_MAC,
        "--pool",
        POOL,
        "--mac-policy",
        "follow",
        "--primary-alias",
        WAN_PRIMARY_NIC.alias,
    )


def wait_for_teams_on_primary(
    lab: VmLab, timeout: float = 90, name: str = DOMAIN_NAME
) -> dict[str, Any]:
    """The agent is up and every team of guest *name* runs on its primary (``ptmig
    failover --to primary``)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = ptmig_json(lab, lab.where(name), "failover", name, "--to", "primary")
            if all(v == "primary" for v in last["teams"].values()):
                return dict(last["teams"])
        except (LabError, json.JSONDecodeError) as exc:
            last = str(exc)
        time.sleep(2)
    raise LabError(f"{name}'s teams did not reach their primaries in {timeout:.0f} s: {last}")


def primary_aliases(lab: VmLab, name: str = DOMAIN_NAME) -> list[str]:
    """The aliases of guest *name*'s recorded primaries (``ptmig status``)."""
    status = ptmig_json(lab, lab.where(name), "status", name)
    return [t["primary"]["alias"] for t in status["teams"] if t["primary"]]


def unplug_primaries(lab: VmLab) -> None:
    """Every team of the main guest on its standby (``ptmig failover --to standby``),
    then each recorded primary detached: the guest a plain libvirt migration can move."""
    ptmig(lab, lab.where(), "failover", DOMAIN_NAME, "--to", "standby")
    for alias in primary_aliases(lab):
        lab.detach_nic(alias)


def configure(lab: VmLab) -> None:
    """Pools on both hosts, teams in the metadata, every team on its primary."""
    define_pools(lab)
    teams = ptmig_json(lab, lab.where(), "team-show", DOMAIN_NAME)["teams"]
    if {t["name"] for t in teams} != {"lan", "wan"}:  # a reused lab keeps its teams
        set_teams(lab)
    wait_for_teams_on_primary(lab)


def set_extra_team(lab: VmLab, guest: ExtraGuest) -> None:
    """An extra guest's one team: lan, MAC policy preserve, its boot e1000e as primary."""
    ptmig(
        lab,
        lab.where(guest.name),
        "team-set",
        guest.name,
        "--team",
        "lan",
        "--standby-mac",
        guest.standby.mac,
        "--pool",
        POOL,
        "--mac-policy",
        "preserve",
        "--primary-alias",
        guest.primary.alias,
    )


def configure_all(lab: VmLab) -> None:
    """:func:`configure` for every guest: pools sized for all of them (:func:`pool_slots`),
    each extra guest's team lan, every team of every guest on its primary."""
    extras = lab.extra_guests()
    define_pools(lab, pool_slots(extras))
    teams = ptmig_json(lab, lab.where(), "team-show", DOMAIN_NAME)["teams"]
    if {t["name"] for t in teams} != {"lan", "wan"}:
        set_teams(lab)
    for guest in extras:
        shown = ptmig_json(lab, lab.where(guest.name), "team-show", guest.name)["teams"]
        if {t["name"] for t in shown} != {"lan"}:
            set_extra_team(lab, guest)
    for name in lab.guest_names():
        wait_for_teams_on_primary(lab, name=name)


@contextlib.contextmanager
def ptmigd(
    log_path: Path, journal: str, *args: str
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """ptmigd on a private socket with *journal*, stopped with SIGTERM after."""
    sock_dir = Path(tempfile.mkdtemp(prefix="ptmigd-", dir="/run"))
    os.chmod(sock_dir, 0o700)
    sock = sock_dir / "ptmigd.sock"
    with log_path.open("w") as log:
        daemon = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "host.daemon",
                "--socket",
                str(sock),
                "--journal",
                journal,
                *args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
            # this checkout's contract too, as lab.ptmig runs ptmig
            env={**os.environ, "PYTHONPATH": CHECKOUT_PYTHONPATH},
        )
    try:
        yield daemon, sock
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
        sock.unlink(missing_ok=True)
        sock_dir.rmdir()
