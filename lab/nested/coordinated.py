"""The nested lab under ptmig's coordinator: real vfio pools on both hosts.

Pools (the same names on both hosts name each host's own devices):

* ``lanvf``, kind vf: a ``<forward mode='hostdev'>`` network on the host's igb PF; hosta's
  is defined by its PF (``--pf``), hostb's by an explicit VF list (``--vf``), so both forms
  run;
* ``wannic``, kind pci: the host's whole e1000e, a managed PCI hostdev whose burned-in MAC
  differs per host (``state_copy``: marked ``--state-copy``, which QEMU refuses for it:
  e1000e has no VFIO migration driver, the hybrid's negative control);
* ``serial``, kind mdev (L1 on 6.12 only): the host's own ``mtty-2`` mediated devices
  (lab.nested.mdev), marked ``--state-copy``: a domain's mdev is carried by QEMU's copy.

Team lan (bond0) draws a VF from ``lanvf``, team wan (bond1) the whole NIC from ``wannic``.
"""

from __future__ import annotations

import json
import time
from typing import Any

from lab import STANDBY_MAC, WAN_STANDBY_MAC
from lab.guest import DOMAIN_NAME
from lab.migration import Hop, PtmigMigration, ptmig_migrate
from lab.nested import run_dir
from lab.nested.vlab import VfioLab, VfioLabError, peer_uri, uri
from lab.ptmig import ptmig_at

VF_POOL = "lanvf"
PCI_POOL = "wannic"
MDEV_POOL = "serial"


def journal() -> str:
    return str(run_dir() / "journal.sqlite")


def ptmig(host: str, *args: str, timeout: float = 600, check: bool = True) -> Any:
    return ptmig_at(uri(host), journal(), *args, timeout=timeout, check=check)


def ptmig_json(host: str, *args: str, ok: tuple[int, ...] = (0,)) -> Any:
    proc = ptmig(host, *args, "--json", check=False)
    if proc.returncode not in ok:
        raise VfioLabError(
            f"ptmig {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}"
        )
    return json.loads(proc.stdout)


def migrate(lab: VfioLab, dest: str, peer: str | None = None) -> PtmigMigration:
    """``ptmig migrate --json`` of the guest from where it runs to *dest*, p2p over the hosts'
    L1-internal addresses (*peer*: another peer URI), read back (lab.migration)."""
    return ptmig_migrate(Hop(uri(lab.where()), uri(dest), peer or peer_uri(dest)), journal())


def define_pools(lab: VfioLab, vfs: dict[str, list[str]] | None = None) -> None:
    """hosta's VF pool by PF, hostb's by VF list (*vfs* overrides a host's list)."""
    for host, dev in lab.state.hosts.items():
        if vfs is not None and host in vfs:
            spec = [f"--vf={vf}" for vf in vfs[host]]
        elif host == "hosta":
            spec = [f"--pf={dev.pf}"]
        else:
            spec = [f"--vf={vf}" for vf in dev.vfs]
        ptmig(host, "pool-define", VF_POOL, "--kind", "vf", *spec)
    define_whole_nic_pool(lab)


def define_whole_nic_pool(lab: VfioLab, *, state_copy: bool = False) -> None:
    """Each host's ``wannic`` (re)defined on its whole e1000e, marked state-copy or not."""
    for host, dev in lab.state.hosts.items():
        marked = ["--state-copy"] if state_copy else []
        ptmig(host, "pool-define", PCI_POOL, "--kind", "pci", f"--address={dev.whole_pci}", *marked)


def define_mdev_pools(lab: VfioLab, uuids: dict[str, tuple[str, ...]], mdev_type: str) -> None:
    """Each host's ``serial`` pool of its own mdevs (*uuids* by host), marked state-copy."""
    for host in lab.state.hosts:
        spec = [f"--uuid={u}" for u in uuids[host]]
        ptmig(
            host, "pool-define", MDEV_POOL, "--kind", "mdev", "--mdev-type", mdev_type,
            "--state-copy", *spec,
        )  # fmt: skip


#: Each team's standby MAC and pool in L2.
TEAMS = {"lan": (STANDBY_MAC, VF_POOL), "wan": (WAN_STANDBY_MAC, PCI_POOL)}


def team_set(lab: VfioLab, team: str, policy: str, primary_alias: str | None = None) -> None:
    """``ptmig team-set`` of *team* on the guest's host; *primary_alias* names the device
    plugged now, so the record keeps it."""
    standby_mac, pool = TEAMS[team]
    args = ["--team", team, "--standby-mac", standby_mac, "--pool", pool, "--mac-policy", policy]
    if primary_alias:
        args += ["--primary-alias", primary_alias]
    ptmig(lab.where(), "team-set", DOMAIN_NAME, *args)


def to_primary(lab: VfioLab, timeout: float = 600) -> dict[str, Any]:
    """``ptmig failover --to primary`` until every team runs on a passthrough device."""
    deadline = time.monotonic() + timeout
    tried: list[str] = []  # each attempt's start, length and answer, for the error
    while time.monotonic() < deadline:
        started = time.monotonic()
        try:
            last = ptmig_json(lab.where(), "failover", DOMAIN_NAME, "--to", "primary")
            if all(v == "primary" for v in last["teams"].values()):
                return dict(last["teams"])
            said = f"teams {last['teams']}, why {last.get('why', {})}"
        except (VfioLabError, json.JSONDecodeError) as exc:
            said = str(exc)
        took = time.monotonic() - started
        tried.append(f"{time.strftime('%H:%M:%S')}, {took:.0f} s: {said}")
        time.sleep(5)
    attempts = "\n  ".join(tried)
    raise VfioLabError(f"teams did not reach their primaries in {timeout:.0f} s:\n  {attempts}")
