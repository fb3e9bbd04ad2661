"""The nested lab driven the way OpenStack Nova drives libvirt for an SR-IOV port, with
nothing of ptmig on the host: the VF case of lab/orchestrated.py.

Nova plugs a `vnic_type=direct` port as ``<interface type='hostdev' managed='yes'>``
naming one VF, with the port's MAC, which libvirt programs through the PF
(`host.domain.devices.vf_hostdev_interface_xml`).  For a live migration
(docs/operator-guide.md section 7 has the calls and where they are in Nova's code) it
detaches that interface from the persistent and the live definition and waits for the
device to go (`VfioLab.detach(config=True)`), migrates with plain virDomainMigrateToURI3
(`migrate`), and on the destination attaches a VF of the destination's own, persistent and
live (`plug_vf`).  Nobody calls the guest's agent: team lan, declared
``managed_by = "guest"`` with a rule that matches the VF's driver (`guest_managed_config`),
must bind the new VF by itself.
"""

from __future__ import annotations

import base64

import libvirt

from host.domain.devices import vf_hostdev_interface_xml
from host.domain.domain_xml import device_aliases
from lab import TEAM_MAC
from lab.migration import libvirt_migrate
from lab.nested.vlab import AGENT_CONFIG, VfioLab, VfioLabError, peer_uri
from lab.orchestrated import attach_at, free_bus

#: Nova's attach_interface / detach_interface of an SR-IOV port: persistent and live.
NOVA_FLAGS = libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG
#: Aliases the lab gives the VFs it plugs as Nova would (Nova names none; the lab's make
#: the detach and the checks simple).
ALIAS_PREFIX = "ua-nova-lan-"
#: What the agent logs once it runs again: with a guest-managed team, its watcher's line.
_READY = {True: "autonomy: watching", False: "listening on"}


def guest_managed_config(mac_policy: str = "preserve") -> str:
    """L2's agent.toml (`vlab.AGENT_CONFIG`) with team lan guest-managed: any free igbvf
    NIC (a VF, whatever its PCI address or MAC) becomes its primary, under *mac_policy*.
    Team wan stays the coordinator's."""
    lan = 'mac_policy = "preserve"\nownership = "admin"\n'
    if lan not in AGENT_CONFIG:
        raise VfioLabError("the nested lab's agent.toml no longer has team lan as expected")
    return AGENT_CONFIG.replace(
        lan,
        f'mac_policy = "{mac_policy}"\nownership = "admin"\nmanaged_by = "guest"\n'
        'primary_rule = {driver = "igbvf"}\n',
    )


def configure_agent(lab: VfioLab, config: str, timeout: float = 180) -> None:
    """Write L2's /etc/ptmig/agent.toml (checked first) and stop the agent; L2's init
    starts it again (lab/nested/guest.py).  Returns once the new agent has said it runs."""
    encoded = base64.b64encode(config.encode()).decode()
    ready = _READY['managed_by = "guest"' in config]
    # in a subshell: the console's shell must survive set -e and exit
    lab.exec(
        "(set -e; off=$(stat -c %s /run/ptmig-agent.log 2>/dev/null || echo 0); "
        f"echo {encoded} | base64 -d > /etc/ptmig/agent.toml.new; "
        "/usr/sbin/ptmig-agent --check-config --config /etc/ptmig/agent.toml.new; "
        "mv /etc/ptmig/agent.toml.new /etc/ptmig/agent.toml; "
        "kill $(pgrep -f 'python3 -I /usr/sbin/ptmig-agent --config'); "
        f"for i in $(seq {int(timeout * 4)}); do "
        f"tail -c +$((off + 1)) /run/ptmig-agent.log | grep -q '{ready}' && exit 0; "
        "sleep 0.25; done; exit 1)",
        timeout=timeout + 30,
    ).check()


def lan_vifs(lab: VfioLab, host: str) -> list[str]:
    """Aliases of the live VF interfaces of team lan on *host*: the lab's Nova-style ones
    and any ptmig plugged from its VF pool."""
    return passthrough_aliases(lab, host, ALIAS_PREFIX, "ua-ptmig-lan-")


def passthrough_aliases(lab: VfioLab, host: str, *prefixes: str) -> list[str]:
    """Aliases of the guest's live devices on *host* that start with one of *prefixes*."""
    aliases = device_aliases(lab.domain(host).XMLDesc(0))
    return sorted(a for a in aliases if a.startswith(prefixes))


def plug_vf(lab: VfioLab, host: str, vf: str, number: int, avoid_bus: int | None = None) -> str:
    """Nova's attach_interface of an SR-IOV port on *host*: VF *vf* (host PCI address) with
    the port's MAC (the team's), persistent and live, at a guest PCI bus other than
    *avoid_bus*.  Returns its alias; returns when libvirt's call does."""
    alias = f"{ALIAS_PREFIX}{number}"
    dom = lab.domain(host)
    xml = vf_hostdev_interface_xml(alias=alias, pci_address=vf, mac=TEAM_MAC)
    avoid = frozenset() if avoid_bus is None else frozenset({avoid_bus})
    attach_at(dom, xml, free_bus(dom, avoid), NOVA_FLAGS)
    return alias


def migrate(lab: VfioLab, dest: str) -> float:
    """Plain libvirt live migration to *dest* (peer to peer inside L1,
    `lab.migration.libvirt_migrate`), as Nova's `_live_migration_operation` does it;
    returns the seconds the call took."""
    try:
        return libvirt_migrate(lab.domain(lab.where()), lab.conn(dest), peer_uri(dest)).wall_s
    except libvirt.libvirtError as exc:
        raise VfioLabError(f"plain migration to {dest} failed: {exc}") from exc
