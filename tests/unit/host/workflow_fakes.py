"""An in-memory world for the migration workflow's unit tests: two hosts, their guests.

What is modelled, and how faithfully:

* :class:`FakeHypervisor` and :class:`FakeDomain` have the public methods and
  properties of :class:`host.hypervisor.Hypervisor` and :class:`host.hypervisor.Domain`
  (test_workflow_fakes.py checks it from the real classes), with the same signatures,
  return values and exceptions (``HypervisorError``, ``DeviceRemovalError``).  A fault
  names a host's URI and the method, whichever class has it.  Domain XML is kept as
  element trees and rendered the way libvirt prints it (single quotes;
  ``<ptmig:teams xmlns:ptmig="...">`` in ``<metadata>``; ``id=`` and runtime aliases
  only in the live XML).  ``attach`` adds
  the device to the live and persistent XML with a guest PCI address on a free root port
  and refuses, as libvirt does, a tap or host PCI device another running domain on that
  host holds, a duplicate alias, or a MAC the persistent definition already has.
  ``detach_and_wait`` follows production's order: the live XML when the guest releases
  the device, then the persistent XML (a guest may hold a device: timeout or refusal,
  ``DeviceRemovalError``, the device stays in both); an alias no live device has is
  unplugged already (0 s), as in production.  ``migrate`` moves the domain to the
  other host (its live XML as it is, the ``persistent_xml`` argument as its
  definition), refusing PCI hostdevs, a UUID/name mismatch, a destination that runs the
  domain or a tap busy there, and returns the destination's job statistics.
* :class:`FakeGuest` is the guest's kernel as the agent sees it: one link per NIC in the
  domain's live XML (named by its PCI slot, ``enp3s0``), one active-backup bond per team
  with its members and active member, carrier, MACs changed by the agent (policy
  preserve), and the agent's operation-id replay.  It travels with the domain.
* :class:`FakeAgent` is the real :class:`host.agent_client.AgentClient` with its gRPC
  stubs replaced: replies go through the client's own validation and gRPC errors through
  its own mapping to ``AgentError``.
* Faults: :meth:`World.fail` makes any hypervisor method (``where`` = a host's URI, or
  ``migrate:after`` for "raise after the domain moved") or any agent RPC (``where`` =
  ``"agent"``) raise at its n-th call; :attr:`World.tamper` rewrites agent replies;
  :attr:`World.before` runs a hook before a method takes the world's lock (for races);
  :attr:`World.agent_before` runs one before one domain's agent RPC, with the call's
  timeout (a guest that answers late or never);
  :class:`Events` runs hooks on workflow events, e.g. raising :class:`SimulatedCrash`.
* :func:`crash_in_child` runs a workflow in a forked child that dies at a chosen point
  (leaving its journal record open, its owner gone) and brings the world's state back.
"""

from __future__ import annotations

import copy
import os
import pickle
import select
import signal
import threading
import time
import traceback
import uuid as uuidlib
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import escape

import grpc
from ptmig.v1 import guest_agent_pb2 as pb

from host.agent_client import AgentClient, AgentEndpoint, AgentError
from host.domain.devices import attachment_for_slot
from host.domain.lease import LEASE_NS
from host.domain.pools import (
    EmulatedPool,
    EmulatedSlot,
    TapSlot,
    format_pool_network,
)
from host.domain.teams import TEAMS_NS, TEAMS_PREFIX, Team, TeamSet, format_teams
from host.hypervisor import DeviceRemovalError, HypervisorError, migration_call
from host.migration_job import MigrationProgress
from host.migration_options import CopyStorage, MigrationOptions, MigrationStats
from host.workflow.coordinator import Coordinator
from host.workflow.journal import Journal, StepRecord
from host.workflow.model import Event

A = "fake://a"
B = "fake://b"
C = "fake://c"  # a third host, for evacuations (not in a World unless asked for)
HOST_UUIDS = {
    A: "a0a0a0a0-0000-4000-8000-00000000000a",
    B: "b0b0b0b0-0000-4000-8000-00000000000b",
    C: "c0c0c0c0-0000-4000-8000-00000000000c",
}
POOL = "lab"
POOL_NETWORK = "ptmig-pool-lab"
BRIDGE = "br-g"
#: Each host's emulated NICs (tap, per-host MAC), like the lab's.
POOL_SLOTS = {
    A: [
        ("ptv-a1", "52:54:00:ba:00:01"),
        ("ptv-a2", "52:54:00:ba:00:02"),
        ("ptv-a3", "52:54:00:ba:00:03"),
        ("ptv-a4", "52:54:00:ba:00:04"),
    ],
    B: [
        ("ptv-b1", "52:54:00:cb:00:01"),
        ("ptv-b2", "52:54:00:cb:00:02"),
        ("ptv-b3", "52:54:00:cb:00:03"),
        ("ptv-b4", "52:54:00:cb:00:04"),
    ],
    C: [
        ("ptv-c1", "52:54:00:dc:00:01"),
        ("ptv-c2", "52:54:00:dc:00:02"),
        ("ptv-c3", "52:54:00:dc:00:03"),
        ("ptv-c4", "52:54:00:dc:00:04"),
    ],
}


def pool_slot(uri: str, index: int) -> tuple[str, str]:
    """Host *uri*'s *index*-th pool NIC (tap, MAC): POOL_SLOTS', then made up (for a host
    or a pool larger than the lab's, as the coordinator-scale benchmark needs)."""
    fixed = POOL_SLOTS.get(uri, [])
    if index < len(fixed):
        return fixed[index]
    h = zlib.crc32(uri.encode()) & 0xFF
    mac = f"52:54:{h:02x}:{index >> 16 & 0xFF:02x}:{index >> 8 & 0xFF:02x}:{index & 0xFF:02x}"
    return f"pt{h:02x}-{index:06d}", mac


ROOT_PORTS = 10  # pcie-root-ports 1..10: bus N is port N (the disk sits on the last)
LIBVIRT_NO_DOMAIN = 42
MUTATING = frozenset(
    {
        "attach",
        "detach_and_wait",
        "migrate",
        "set_metadata",
        "define_network",
        "undefine_network",
        "UseStandby",
        "BindPrimary",
    }
)


class SimulatedCrash(BaseException):
    """The coordinator dies here (not an Exception: nothing in the workflow catches it)."""


# -- what the world is made of -------------------------------------------------------


@dataclass(frozen=True)
class TeamSpec:
    name: str
    bond: str
    mac_policy: str
    standby_mac: str
    standby_tap: str
    #: Index of the source pool's slot the team's primary uses at the start (its NIC is
    #: ``pool_slot(uri, slot)``); None: none.
    slot: int | None
    pool: str = POOL

    @property
    def team_mac(self) -> str | None:
        return self.standby_mac if self.mac_policy == "preserve" else None


@dataclass(frozen=True)
class GuestSpec:
    name: str
    uuid: str
    teams: tuple[TeamSpec, ...]


LAN = TeamSpec("lan", "bond0", "preserve", "52:54:00:aa:00:01", "ptv-standby", 0)
WAN = TeamSpec("wan", "bond1", "follow", "52:54:00:aa:00:02", "ptv-wstandby", 1)
VM1 = GuestSpec("vm1", "6f1c4f0e-2d2b-4a8e-9d0c-1b2a3c4d5e01", (LAN, WAN))
VM2 = GuestSpec(
    "vm2",
    "6f1c4f0e-2d2b-4a8e-9d0c-1b2a3c4d5e02",
    (TeamSpec("lan", "bond0", "preserve", "52:54:00:aa:01:01", "ptv2-standby", 2),),
)


@dataclass(frozen=True)
class Call:
    where: str  # a host's URI, or "agent"
    method: str
    subject: str = ""  # the domain, alias or team the call is about


@dataclass
class Fault:
    where: str
    method: str
    error: BaseException
    nth: int = 1  # raise at the nth matching call after the fault was added...
    every: bool = False  # ...and at every later one
    subject: str | None = None  # only calls about this (alias, team, domain name)
    seen: int = 0
    fired: int = 0


@dataclass
class GuestTeam:
    name: str
    bond: str
    mac_policy: str
    standby_mac: str
    team_mac: str | None
    ownership: int
    enslaved: list[str] = field(default_factory=list)  # burned-in MACs of non-standby members
    active: str = ""  # burned-in MAC of the active member
    bond_present: bool = True


@dataclass
class Link:
    name: str
    index: int
    mac: str
    permanent_mac: str
    pci_address: str


_POLICY = {
    "preserve": pb.MAC_POLICY_PRESERVE,
    "follow": pb.MAC_POLICY_FOLLOW,
    "none": pb.MAC_POLICY_NONE,
}
_POLICY_NAME = {v: k for k, v in _POLICY.items()}


@dataclass
class FakeGuest:
    """The guest's side: NICs as links, a bond per team, and how it answers requests."""

    teams: dict[str, GuestTeam]
    mac_overrides: dict[str, str] = field(default_factory=dict)  # burned-in -> current MAC
    no_carrier: set[str] = field(default_factory=set)  # burned-in MACs without carrier
    #: alias -> "timeout" | "refuse": the guest does not release that device on unplug.
    hold: dict[str, str] = field(default_factory=dict)
    agent_up: bool = True
    serving: bool = True
    operations: dict[str, tuple[Any, bytes]] = field(default_factory=dict)

    # -- links, from the devices the domain has now --------------------------------

    def links(self, live: ET.Element) -> dict[str, Link]:
        out = {}
        for device in _devices(live):
            if device.tag not in ("interface", "hostdev"):
                continue
            mac_el, address = device.find("mac"), device.find("address")
            if mac_el is None or address is None or address.get("type") != "pci":
                continue
            bus = int(address.get("bus", "0"), 0)
            perm = mac_el.get("address", "").lower()
            out[perm] = Link(
                f"enp{bus}s0",
                10 + bus,
                self.mac_overrides.get(perm, perm),
                perm,
                f"0000:{bus:02x}:00.0",
            )
        return out

    def _sync(self, links: dict[str, Link]) -> None:
        """A link that went away left its bond; an active one made the standby active."""
        for team in self.teams.values():
            team.enslaved = [m for m in team.enslaved if m in links]
            if team.active not in links or (
                team.active != team.standby_mac and team.active not in team.enslaved
            ):
                standby_up = team.standby_mac in links and team.standby_mac not in self.no_carrier
                team.active = team.standby_mac if standby_up else ""
        for perm in list(self.mac_overrides):
            if perm not in links:
                del self.mac_overrides[perm]

    def mode(self, team: str) -> str:
        """Where the team's traffic runs: "primary", "standby" or "down"."""
        t = self.teams[team]
        if not t.active:
            return "down"
        return "standby" if t.active == t.standby_mac else "primary"

    # -- what the agent reports ----------------------------------------------------

    def _team_state(self, team: GuestTeam, links: dict[str, Link]) -> pb.TeamState:
        standby = links.get(team.standby_mac)
        members = ([standby.name] if standby and team.bond_present else []) + [
            links[m].name for m in team.enslaved if team.bond_present
        ]
        if team.mac_policy == "preserve":
            mac = team.team_mac or team.standby_mac
        elif team.active in links:
            mac = links[team.active].mac
        else:
            mac = team.standby_mac
        active = links[team.active].name if team.active in links and team.bond_present else ""
        return pb.TeamState(
            name=team.name,
            bond=team.bond,
            bond_present=team.bond_present,
            mac_policy=_POLICY[team.mac_policy],
            ownership=team.ownership,
            mac=mac if team.bond_present else "",
            fail_over_mac="active" if team.mac_policy == "follow" else "none",
            active_member=active,
            standby=standby.name if standby else "",
            members=members,
            primary=next((links[m].name for m in team.enslaved), "") if team.bond_present else "",
        )

    def state(self, live: ET.Element) -> pb.GetStateResponse:
        links = self.links(live)
        self._sync(links)
        masters = {}
        for team in self.teams.values():
            if team.bond_present:
                for member in [team.standby_mac, *team.enslaved]:
                    masters[member] = team.bond
        reply = pb.GetStateResponse()
        for link in sorted(links.values(), key=lambda ln: ln.index):
            reply.links.add(
                name=link.name,
                index=link.index,
                mac=link.mac,
                permanent_mac=link.permanent_mac,
                carrier=link.permanent_mac not in self.no_carrier,
                operstate="UP",
                admin_up=True,
                master=masters.get(link.permanent_mac, ""),
                pci_address=link.pci_address,
            )
        for number, team in enumerate(self.teams.values()):
            if team.bond_present:
                reply.links.add(
                    name=team.bond,
                    index=100 + number,
                    kind="bond",
                    mac=self._team_state(team, links).mac,
                    carrier=bool(team.active),
                    operstate="UP" if team.active else "DOWN",
                    admin_up=True,
                )
        reply.teams.extend(self._team_state(t, links) for t in self.teams.values())
        return reply

    # -- what the agent does -------------------------------------------------------

    def _team(self, name: str) -> GuestTeam:
        team = self.teams.get(name)
        if team is None:
            raise AgentError("NOT_FOUND", f"unknown team {name!r} (known: {', '.join(self.teams)})")
        if not team.bond_present:
            raise AgentError("FAILED_PRECONDITION", f"team {name}: bond {team.bond} does not exist")
        return team

    def _replay(
        self, operation_id: str, fingerprint: Any, reply_type: Any, act: Callable[[], Any]
    ) -> Any:
        if not operation_id:
            raise AgentError("INVALID_ARGUMENT", "operation_id is required")
        recorded = self.operations.get(operation_id)
        if recorded is not None:
            if recorded[0] != fingerprint:
                raise AgentError(
                    "INVALID_ARGUMENT",
                    f"operation_id {operation_id!r} was already used for a different request",
                )
            reply = reply_type.FromString(recorded[1])
            reply.replayed = True
            return reply
        reply = act()
        self.operations[operation_id] = (fingerprint, reply.SerializeToString())
        return reply

    def use_standby(self, live: ET.Element, request: pb.UseStandbyRequest) -> pb.UseStandbyResponse:
        def act() -> pb.UseStandbyResponse:
            links = self.links(live)
            self._sync(links)
            team = self._team(request.team)
            if team.standby_mac not in links:
                raise AgentError(
                    "FAILED_PRECONDITION",
                    f"team {team.name}: standby ({team.standby_mac}) not found",
                )
            if team.standby_mac in self.no_carrier:
                raise AgentError(
                    "DEADLINE_EXCEEDED",
                    f"team {team.name}: standby {links[team.standby_mac].name} has no carrier",
                )
            team.active = team.standby_mac
            released = []
            if request.release_primary:
                released = [links[m].name for m in team.enslaved]
                team.enslaved = []
            return pb.UseStandbyResponse(team=self._team_state(team, links), released=released)

        key = ("UseStandby", request.team, request.release_primary)
        return self._replay(request.operation_id, key, pb.UseStandbyResponse, act)

    def bind_primary(
        self, live: ET.Element, request: pb.BindPrimaryRequest
    ) -> pb.BindPrimaryResponse:
        def act() -> pb.BindPrimaryResponse:
            links = self.links(live)
            self._sync(links)
            team = self._team(request.team)
            if not request.pci_address and not request.mac:
                raise AgentError("INVALID_ARGUMENT", "give the new device's pci_address, mac")
            mac = request.mac.lower()
            found = [
                ln
                for ln in links.values()
                if (not request.pci_address or ln.pci_address == request.pci_address)
                and (not mac or mac in (ln.mac, ln.permanent_mac))
            ]
            burned_in = [ln for ln in found if mac and ln.permanent_mac == mac]
            found = burned_in or found
            if not found:
                raise AgentError(
                    "NOT_FOUND",
                    f"team {team.name}: no device with pci "
                    f"{request.pci_address or '-'} mac {mac or '-'} appeared in time",
                )
            if len(found) > 1:
                raise AgentError("FAILED_PRECONDITION", f"team {team.name}: ambiguous device")
            device = found[0]
            perm = device.permanent_mac
            for other in self.teams.values():
                if perm == other.standby_mac or (other is not team and perm in other.enslaved):
                    raise AgentError(
                        "FAILED_PRECONDITION", f"{device.name} is a member of team {other.name}"
                    )
            policy = _POLICY_NAME.get(request.mac_policy, team.mac_policy)
            if policy == "preserve":
                self.mac_overrides[perm] = team.team_mac or team.standby_mac
            if perm not in team.enslaved:
                team.enslaved.append(perm)
            if perm in self.no_carrier:
                raise AgentError(
                    "DEADLINE_EXCEEDED",
                    f"team {team.name}: {device.name} is a "
                    f"member of {team.bond} but has no carrier",
                )
            team.active = perm
            return pb.BindPrimaryResponse(
                team=self._team_state(team, self.links(live)), device=device.name
            )

        key = ("BindPrimary", request.team, request.pci_address, request.mac, request.mac_policy)
        return self._replay(request.operation_id, key, pb.BindPrimaryResponse, act)


@dataclass
class DomainRecord:
    uuid: str
    name: str
    live: ET.Element
    config: ET.Element | None  # None: a transient domain
    guest: FakeGuest
    active: bool = True
    domid: int = 1
    prefixes: dict[str, str] = field(default_factory=lambda: {TEAMS_NS: TEAMS_PREFIX})
    job: dict[str, Any] | None = None
    job_running: bool = False  # a job (say, a migration a killed client started) in progress
    aborted: bool = False  # abort_job was called on the running job


@dataclass
class FakeHost:
    uri: str
    host_uuid: str
    domains: dict[str, DomainRecord] = field(default_factory=dict)  # by UUID
    networks: dict[str, str] = field(default_factory=dict)  # by name: XML
    next_domid: int = 1


# -- libvirt-style XML ------------------------------------------------------------------


def _devices(root: ET.Element) -> list[ET.Element]:
    devices = root.find("devices")
    return list(devices) if devices is not None else []


def _alias(device: ET.Element) -> str | None:
    alias = device.find("alias")
    return alias.get("name") if alias is not None else None


def render(root: ET.Element, prefixes: dict[str, str]) -> str:
    """`root` as libvirt prints it: attributes in single quotes, namespaced metadata
    (libxml2's dump: double quotes) with its prefix declared on its root element."""
    lines: list[str] = []
    _emit(root, 0, lines, prefixes, frozenset(), "'")
    return "\n".join(lines) + "\n"


def _emit(
    el: ET.Element,
    depth: int,
    lines: list[str],
    prefixes: dict[str, str],
    in_scope: frozenset[str],
    quote: str,
) -> None:
    tag, attrs = el.tag, list(el.attrib.items())
    if tag.startswith("{"):
        namespace, _, local = tag[1:].partition("}")
        prefix = prefixes.get(namespace, "ns0")
        tag = f"{prefix}:{local}"
        quote = '"'
        if namespace not in in_scope:
            attrs.insert(0, (f"xmlns:{prefix}", namespace))
            in_scope = in_scope | {namespace}
    entities = {"'": "&apos;", '"': "&quot;"}
    attr_text = "".join(f" {k}={quote}{escape(v, entities)}{quote}" for k, v in attrs)
    pad = "  " * depth
    children = list(el)
    text = (el.text or "").strip()
    if not children and not text:
        lines.append(f"{pad}<{tag}{attr_text}/>")
    elif not children:
        lines.append(f"{pad}<{tag}{attr_text}>{escape(text)}</{tag}>")
    else:
        lines.append(f"{pad}<{tag}{attr_text}>")
        for child in children:
            _emit(child, depth + 1, lines, prefixes, in_scope, quote)
        lines.append(f"{pad}</{tag}>")


def _pci_address(bus: int) -> ET.Element:
    return ET.Element(
        "address",
        {
            "type": "pci",
            "domain": "0x0000",
            "bus": f"0x{bus:02x}",
            "slot": "0x00",
            "function": "0x0",
        },
    )


def _standby_xml(spec: TeamSpec, bus: int) -> ET.Element:
    return ET.fromstring(
        f"<interface type='bridge'><mac address='{spec.standby_mac}'/>"
        f"<source bridge='{BRIDGE}'/><target dev='{spec.standby_tap}'/>"
        "<model type='virtio'/><driver name='qemu'/><rom enabled='no'/>"
        f"<alias name='ua-{spec.name}-standby'/>"
        f"<address type='pci' domain='0x0000' bus='0x{bus:02x}' slot='0x00' function='0x0'/>"
        "</interface>"
    )


def _domain_tree(
    name: str, uuid: str, teams: TeamSet, devices: list[ET.Element], *, domid: int | None
) -> ET.Element:
    """The lab guest's domain (lab/guest.py) in libvirt's words, live when *domid* is set."""
    live = domid is not None
    ports = "".join(
        f"<controller type='pci' index='{n}' model='pcie-root-port'><target chassis='{n}' "
        f"port='0x{0x10 + n - 1:x}'/>"
        + (f"<alias name='pci.{n}'/>" if live else "")
        + "</controller>"
        for n in range(1, ROOT_PORTS + 1)
    )
    channel_state = " state='connected'" if live else ""
    root = ET.fromstring(f"""<domain type='kvm'{f" id='{domid}'" if live else ""}>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <metadata>{format_teams(teams, namespaced=True)}</metadata>
  <memory unit='KiB'>524288</memory>
  <currentMemory unit='KiB'>524288</currentMemory>
  <vcpu placement='static'>2</vcpu>
  <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type></os>
  <features><acpi/><apic/></features>
  <cpu mode='custom' match='exact' check='full'><model fallback='forbid'>qemu64</model></cpu>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='/srv/ptmig/{name}.qcow2'/>
      <target dev='vda' bus='virtio'/>
      <address type='pci' domain='0x0000' bus='0x{ROOT_PORTS:02x}' slot='0x00' function='0x0'/>
    </disk>
    <controller type='pci' index='0' model='pcie-root'/>
    {ports}
    <channel type='unix'>
      <source mode='bind' path='/var/lib/libvirt/ptmig/{name}-agent.sock'/>
      <target type='virtio' name='org.ptmig.agent.0'{channel_state}/>
      <address type='virtio-serial' controller='0' bus='0' port='1'/>
    </channel>
    <memballoon model='none'/>
  </devices>
</domain>""")
    for device in devices:
        _insert_device(root, copy.deepcopy(device))
    return root


def _insert_device(root: ET.Element, device: ET.Element) -> None:
    """Where libvirt lists a NIC: after the disks and controllers, before channels."""
    devices = root.find("devices")
    assert devices is not None
    children = list(devices)
    for index, child in enumerate(children):
        if child.tag in ("channel", "serial", "console", "input", "memballoon"):
            devices.insert(index, device)
            return
    devices.append(device)


def _remove_device(root: ET.Element, alias: str) -> bool:
    devices = root.find("devices")
    for device in list(devices) if devices is not None else []:
        if _alias(device) == alias:
            devices.remove(device)  # type: ignore[union-attr]
            return True
    return False


def _used_buses(root: ET.Element) -> set[int]:
    used = set()
    for device in _devices(root):
        address = device.find("address")
        if address is not None and address.get("type") == "pci":
            used.add(int(address.get("bus", "0"), 0))
    return used


def _tap(device: ET.Element) -> str | None:
    target = device.find("target")
    return target.get("dev") if device.tag == "interface" and target is not None else None


def _host_pci(device: ET.Element) -> str | None:
    address = device.find("source/address")
    if device.tag != "hostdev" or address is None:
        return None
    return "{}:{}:{}.{}".format(
        *(int(address.get(k, "0"), 0) for k in ("domain", "bus", "slot", "function"))
    )


def _taps(root: ET.Element) -> set[str]:
    return {tap for d in _devices(root) if (tap := _tap(d))}


def _host_pcis(root: ET.Element) -> set[str]:
    return {pci for d in _devices(root) if (pci := _host_pci(d))}


def _set_metadata(root: ET.Element, namespace: str, element: ET.Element | None) -> None:
    metadata = root.find("metadata")
    if metadata is None:
        metadata = ET.Element("metadata")
        root.insert(2, metadata)
    for child in list(metadata):
        if child.tag.startswith(f"{{{namespace}}}"):
            metadata.remove(child)
    if element is not None:
        metadata.append(copy.deepcopy(element))


# -- the hypervisor ---------------------------------------------------------------------


class FakeHypervisor:
    """One host of the world, by URI, with :class:`host.hypervisor.Hypervisor`'s face."""

    def __init__(self, world: World, uri: str) -> None:
        self.world = world
        self.uri = uri
        with world.op(uri, "connect"):
            if world.hosts.get(uri) is None:
                raise HypervisorError(f"cannot connect to {uri}: unable to connect to server", 38)
        self.closed = False

    @property
    def _host(self) -> FakeHost:
        return self.world.hosts[self.uri]

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> FakeHypervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- host ------------------------------------------------------------------------

    def host_uuid(self) -> str:
        with self.world.op(self.uri, "host_uuid"):
            return self._host.host_uuid

    # -- domains ---------------------------------------------------------------------

    def domain(self, ident: str) -> FakeDomain:
        with self.world.op(self.uri, "domain", ident):
            for record in self._host.domains.values():
                if ident in (record.uuid, record.name):
                    return FakeDomain(self, record.uuid, record.name)
            raise HypervisorError(
                f"{self.uri}: domain {ident!r}: Domain not found: no domain "
                f"with matching name '{ident}'",
                LIBVIRT_NO_DOMAIN,
            )

    def has_domain(self, ident: str) -> bool:
        try:
            self.domain(ident)
            return True
        except HypervisorError:
            return False

    def all_domain_xml(self) -> list[str]:
        with self.world.op(self.uri, "all_domain_xml"):
            return [self.world.xml(r) for r in self._host.domains.values()]

    # -- networks --------------------------------------------------------------------

    def network_xml(self, name: str) -> str | None:
        with self.world.op(self.uri, "network_xml", name):
            return self._host.networks.get(name)

    def network_names(self) -> list[str]:
        with self.world.op(self.uri, "network_names"):
            return list(self._host.networks)

    def define_network(self, xml: str, *, start: bool = False) -> None:
        with self.world.op(self.uri, "define_network"):
            name = ET.fromstring(xml).findtext("name") or ""
            self._host.networks[name] = xml

    def undefine_network(self, name: str) -> None:
        with self.world.op(self.uri, "undefine_network", name):
            if self._host.networks.pop(name, None) is None:
                raise HypervisorError(f"{self.uri}: undefine network {name}: Network not found", 43)


class FakeDomain:
    """A domain handle bound to its host, with :class:`host.hypervisor.Domain`'s face: it
    names a domain, which may since have gone from the host."""

    def __init__(self, hv: FakeHypervisor, uuid: str, domain_name: str) -> None:
        self.hv = hv
        self._uuid = uuid
        self.domain_name = domain_name

    @property
    def uri(self) -> str:
        return self.hv.uri

    @property
    def uuid(self) -> str:
        return self._uuid

    @property
    def name(self) -> str:
        return self.domain_name

    @property
    def world(self) -> World:
        return self.hv.world

    @property
    def _host(self) -> FakeHost:
        return self.hv.world.hosts[self.hv.uri]

    def _record(self) -> DomainRecord:
        record = self._host.domains.get(self.uuid)
        if record is None:
            raise HypervisorError(
                f"{self.uri}: Domain not found: no domain with matching uuid "
                f"'{self.uuid}' ({self.domain_name})",
                LIBVIRT_NO_DOMAIN,
            )
        return record

    def is_active(self) -> bool:
        with self.world.op(self.uri, "is_active", self.domain_name):
            return self._record().active

    def xml(self, *, inactive: bool = False) -> str:
        with self.world.op(self.uri, "domain_xml", self.domain_name):
            record = self._record()
            return self.world.xml(record, inactive=inactive)

    def set_metadata(self, namespace: str, prefix: str, xml: str | None) -> None:
        # The workflow lease is bookkeeping, taken and given back: "set_lease" is not
        # among MUTATING, so "nothing changed" still means the domain and guest are as
        # they were (the snapshot compares the XML too, lease included).
        method = "set_lease" if namespace == LEASE_NS else "set_metadata"
        with self.world.op(self.uri, method, self.domain_name):
            record = self._record()
            element = None
            if xml is not None:
                try:
                    element = ET.fromstring(xml)
                except ET.ParseError as exc:
                    raise HypervisorError(
                        f"{self.uri}: set metadata of {self.domain_name}: XML error: {exc}", 27
                    ) from None
                if element.tag.startswith("{") or f"xmlns:{prefix}" in xml:
                    raise HypervisorError(
                        f"{self.uri}: set metadata of {self.domain_name}: "
                        "failed to create a new XML namespace",
                        1,
                    )
                element.tag = f"{{{namespace}}}{element.tag}"
            record.prefixes[namespace] = prefix
            if record.config is not None:
                _set_metadata(record.config, namespace, element)
            if record.active:
                _set_metadata(record.live, namespace, element)

    # -- devices ---------------------------------------------------------------------

    def attach(self, device_xml: str) -> None:
        try:
            device = ET.fromstring(device_xml)
        except ET.ParseError as exc:
            raise HypervisorError(
                f"{self.uri}: attach to {self.domain_name}: XML error: {exc}", 27
            ) from None
        with self.world.op(self.uri, "attach", _alias(device) or ""):
            record = self._record()
            what = f"{self.uri}: attach to {self.domain_name}"
            if not record.active:
                raise HypervisorError(
                    f"{what}: Requested operation is not valid: domain is not running", 55
                )
            alias = _alias(device)
            if alias is not None and any(_alias(d) == alias for d in _devices(record.live)):
                raise HypervisorError(
                    f"{what}: operation failed: non unique alias detected: {alias}", 9
                )
            for other in self._host.domains.values():
                if not other.active:
                    continue
                tap, pci = _tap(device), _host_pci(device)
                if tap is not None and tap in _taps(other.live):
                    raise HypervisorError(
                        f"{what}: Unable to create tap device {tap}: Device or resource busy", 38
                    )
                if pci is not None and pci in _host_pcis(other.live):
                    raise HypervisorError(
                        f"{what}: Requested operation is not valid: PCI device "
                        f"{pci} is in use by driver QEMU, domain {other.name}",
                        55,
                    )
            mac = device.find("mac")
            if record.config is not None and mac is not None:
                macs = {
                    m.get("address", "").lower()
                    for m in record.config.findall("devices/interface/mac")
                }
                if mac.get("address", "").lower() in macs:
                    raise HypervisorError(
                        f"{what}: operation failed: network device with mac "
                        f"{mac.get('address')} already exists",
                        9,
                    )
            free = [n for n in range(1, ROOT_PORTS + 1) if n not in _used_buses(record.live)]
            if not free:
                raise HypervisorError(f"{what}: internal error: No more available PCI slots", 1)
            if device.find("address") is None:
                device.append(_pci_address(free[0]))
            _insert_device(record.live, copy.deepcopy(device))
            if record.config is not None:
                _insert_device(record.config, copy.deepcopy(device))

    def has_device(self, alias: str, *, inactive: bool = False) -> bool:
        with self.world.op(self.uri, "has_device", alias):
            record = self._record()
            root = record.config if inactive and record.config is not None else record.live
            return any(_alias(d) == alias for d in _devices(root))

    def detach_and_wait(self, alias: str, timeout: float) -> float:
        """As production: live first, the definition only once the guest let go; a device
        already gone from the live domain is unplugged (and leaves the definition)."""
        with self.world.op(self.uri, "detach_and_wait", alias):
            record = self._record()
            in_config = record.config is not None and any(
                _alias(d) == alias for d in _devices(record.config)
            )
            if not any(_alias(d) == alias for d in _devices(record.live)):
                if in_config:
                    _remove_device(record.config, alias)  # type: ignore[arg-type]
                return 0.0
            held = record.guest.hold.get(alias)
            if held == "timeout":
                raise DeviceRemovalError(
                    f"{self.uri}: the guest did not release {alias} within {timeout:.0f} s"
                )
            if held == "refuse":
                raise DeviceRemovalError(f"{self.uri}: the guest refused to release {alias}")
            _remove_device(record.live, alias)
            if in_config:
                _remove_device(record.config, alias)  # type: ignore[arg-type]
            return 0.05

    # -- migration -------------------------------------------------------------------

    def migrate(
        self,
        destination: FakeHypervisor,
        *,
        persistent_xml: str,
        peer_uri: str | None = None,
        unsafe: bool = False,
        on_progress: Callable[[MigrationProgress], None] | None = None,
        max_downtime_ms: int | None = None,
        options: MigrationOptions | None = None,
    ) -> MigrationStats:
        destination_uri = peer_uri or destination.uri
        options = options or MigrationOptions()
        # What libvirt would be asked: the production flags and typed parameters.
        flags, params = migration_call(options, persistent_xml=persistent_xml, unsafe=unsafe)
        self.world.migrations.append(MigrationCall(self.domain_name, options, flags, params))
        what = f"migrate {self.domain_name} {self.uri} -> {destination_uri}"
        self._job_window(what)
        with self.world.op(self.uri, "migrate", self.domain_name):
            record = self._record()
            if not record.active:
                raise HypervisorError(
                    f"{what}: Requested operation is not valid: domain is not running", 55
                )
            target = self.world.hosts.get(self.world.peers.get(destination_uri, destination_uri))
            if target is None or target is self._host:
                raise HypervisorError(f"{what}: unable to connect to server", 38)
            if any(d.tag == "hostdev" for d in _devices(record.live)):
                raise HypervisorError(
                    f"{what}: Requested operation is not valid: domain has "
                    "assigned non-USB host devices",
                    55,
                )
            try:
                persistent = ET.fromstring(persistent_xml)
            except ET.ParseError as exc:
                raise HypervisorError(f"{what}: XML error: {exc}", 27) from None
            if (persistent.findtext("uuid"), persistent.findtext("name")) != (
                record.uuid,
                record.name,
            ):
                raise HypervisorError(
                    f"{what}: unsupported configuration: target domain uuid "
                    "or name does not match source",
                    67,
                )
            there = target.domains.get(record.uuid)
            if there is not None and there.active:
                raise HypervisorError(
                    f"{what}: Requested operation is not valid: domain is already active", 55
                )
            for other in target.domains.values():
                if other.uuid != record.uuid and other.active:
                    for tap in _taps(record.live) & _taps(other.live):
                        raise HypervisorError(
                            f"{what}: Unable to create tap device {tap}: Device or resource busy",
                            38,
                        )
            if on_progress is not None:
                on_progress(MigrationProgress(120, 64 << 20, 512 << 20, 448 << 20, 1))
            live = copy.deepcopy(record.live)
            live.set("id", str(target.next_domid))
            target.domains[record.uuid] = DomainRecord(
                record.uuid,
                record.name,
                live,
                persistent,
                record.guest,
                True,
                target.next_domid,
                dict(record.prefixes),
                {"type": 3, "downtime": 42, "time_elapsed": 1800, "data_total": 512 << 20},
            )
            target.next_domid += 1
            del self._host.domains[record.uuid]  # VIR_MIGRATE_UNDEFINE_SOURCE
            self.world.check_faults(self.uri, "migrate:after", self.domain_name)
        # As production: the statistics are the destination's record of the job.
        try:
            job = destination.domain(self.uuid).completed_job()
        except HypervisorError:
            job = {}
        copying = options.copy_storage is not CopyStorage.NONE
        return MigrationStats(
            0.2,
            job.get("downtime"),
            job.get("time_elapsed"),
            job.get("data_total"),
            None,
            tls=options.tls,
            tls_creds="objlibvirt_migrate_tls0" if options.tls else "",
            copy_storage=options.copy_storage,
            disk_total=(1 << 30) if copying else None,
            disk_processed=(1 << 30) if copying else None,
            migrate_disks=options.migrate_disks,
            bandwidth_mib_s=options.bandwidth_mib_s,
            auto_converge=options.auto_converge,
            auto_converge_throttle_pct=20 if options.auto_converge else None,
            postcopy=options.postcopy,
            postcopy_started=options.postcopy,
            postcopy_started_after_s=(
                (options.postcopy_after_s or 0.9) if options.postcopy else None
            ),
            postcopy_reason=(
                ""
                if not options.postcopy
                else "first pass ended"
                if options.postcopy_after_s is None
                else f"after {options.postcopy_after_s:g} s"
            ),
            parallel_connections=options.parallel_connections,
            qemu_capabilities=tuple(
                cap
                for cap, on in (
                    ("auto-converge", options.auto_converge),
                    ("postcopy-ram", options.postcopy),
                    ("multifd", options.parallel_connections is not None),
                )
                if on
            ),
            multifd_channels=options.parallel_connections,
        )

    def completed_job(self) -> dict[str, Any]:
        with self.world.op(self.uri, "completed_job", self.domain_name):
            job = self._record().job
            if job is None:
                raise HypervisorError(
                    f"{self.uri}: job statistics of {self.domain_name}: no completed job", 1
                )
            return dict(job)

    def job_running(self) -> bool:
        with self.world.op(self.uri, "job_running", self.domain_name):
            return self._record().job_running

    # What host/migration_job.py's watcher asks of a real Domain; the fake migrate above
    # runs no watcher, so these only answer as a domain without a job would.

    def job_stats(self) -> dict[str, Any]:
        return {}

    def set_max_downtime(self, limit_ms: int) -> None:
        raise HypervisorError(f"{self.uri}: set max downtime: no job on {self.domain_name}")

    def start_postcopy(self) -> None:
        raise HypervisorError(f"{self.uri}: start post-copy: no job on {self.domain_name}")

    def qmp(self, command: str) -> Any:
        raise HypervisorError(f"{self.uri}: QMP {command}: the fakes have no QEMU")

    def abort_job(self) -> None:
        with self.world.op(self.uri, "abort_job", self.domain_name):
            record = self._record()
            if not record.job_running:
                raise HypervisorError(
                    f"{self.uri}: abort the job of {self.domain_name}: Requested operation "
                    "is not valid: no job is active on the domain",
                    55,
                )
            record.aborted = True

    def _job_window(self, what: str) -> None:
        """With ``world.migration_job_s``, the job runs that long before the VM moves (outside
        the world's lock, so that abort_job can come from another thread) and an abort in
        that window fails the call as libvirt's does, the VM still here."""
        seconds = self.world.migration_job_s
        record = self._host.domains.get(self.uuid)
        if not seconds or record is None:
            return
        record.job_running, record.aborted = True, False
        self.world.job_started.set()
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline and not record.aborted:
                time.sleep(0.005)
        finally:
            record.job_running = False
        if record.aborted:
            raise HypervisorError(
                f"{what}: operation aborted: migration out job: canceled by client", 1
            )

    def open_channel(self, name: str) -> Any:
        raise HypervisorError(f"{self.uri}: open channel {name}: the fakes have no channels")

    def announce(
        self,
        *,
        interfaces: list[str] | None = None,
        rounds: int = 3,
        initial_ms: int = 50,
        max_ms: int = 550,
        step_ms: int = 100,
    ) -> None:
        with self.world.op(self.uri, "announce", self.domain_name):
            if not self._record().active:
                raise HypervisorError(
                    f"{self.uri}: announce-self for {self.domain_name}: domain is not running", 55
                )


# -- the agent ----------------------------------------------------------------------------


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: str, details: str) -> None:
        super().__init__(details)
        self._code = getattr(grpc.StatusCode, code, grpc.StatusCode.UNKNOWN)
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class _Stubs:
    """GuestAgentStub and HealthStub of one guest, reached through one host."""

    def __init__(self, world: World, uri: str, uuid: str) -> None:
        self.world, self.uri, self.uuid = world, uri, uuid

    def _rpc(
        self,
        rpc: str,
        subject: str,
        handle: Callable[[DomainRecord], Any],
        timeout: float | None = None,
    ) -> Any:
        try:
            host = self.world.hosts.get(self.uri)
            domain = host.domains.get(self.uuid) if host is not None else None
            hook = self.world.agent_before.get((domain.name if domain else "", rpc))
            if hook is not None:
                hook(subject, timeout)
            with self.world.op("agent", rpc, subject):
                host = self.world.hosts.get(self.uri)
                record = host.domains.get(self.uuid) if host is not None else None
                if record is None or not record.active:
                    raise AgentError("UNAVAILABLE", "the guest's channel closed")
                if not record.guest.agent_up:
                    raise AgentError(
                        "UNAVAILABLE",
                        "cannot reach the guest agent: no handshake answer from the guest in 3.0 s",
                    )
                reply = handle(record)
                tamper = self.world.tamper.get(rpc)
                if tamper is not None:
                    tamper(reply)
                return reply
        except AgentError as exc:
            raise FakeRpcError(exc.code, exc.message) from None

    def GetVersion(
        self, request: pb.GetVersionRequest, timeout: float | None = None, **_: Any
    ) -> pb.GetVersionResponse:
        return self._rpc(
            "GetVersion",
            "",
            lambda r: pb.GetVersionResponse(
                agent_version="0.1.0",
                api_version=1,
                capabilities=["use-standby", "bind-primary", "mac-policy:preserve"],
            ),
            timeout,
        )

    def Check(
        self, request: pb.HealthCheckRequest, timeout: float | None = None, **_: Any
    ) -> pb.HealthCheckResponse:
        return self._rpc(
            "Check",
            "",
            lambda r: pb.HealthCheckResponse(
                status=pb.HealthCheckResponse.SERVING
                if r.guest.serving
                else pb.HealthCheckResponse.NOT_SERVING
            ),
            timeout,
        )

    def GetState(
        self, request: pb.GetStateRequest, timeout: float | None = None, **_: Any
    ) -> pb.GetStateResponse:
        return self._rpc("GetState", "", lambda r: r.guest.state(r.live), timeout)

    def UseStandby(
        self, request: pb.UseStandbyRequest, timeout: float | None = None, **_: Any
    ) -> pb.UseStandbyResponse:
        return self._rpc(
            "UseStandby", request.team, lambda r: r.guest.use_standby(r.live, request), timeout
        )

    def BindPrimary(
        self, request: pb.BindPrimaryRequest, timeout: float | None = None, **_: Any
    ) -> pb.BindPrimaryResponse:
        return self._rpc(
            "BindPrimary", request.team, lambda r: r.guest.bind_primary(r.live, request), timeout
        )


class _Channel:
    def __init__(self, world: World) -> None:
        self.world = world
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.world.agents_open -= 1


class FakeAgent(AgentClient):
    """The real AgentClient (its validation, its error mapping) over in-memory stubs."""

    def __init__(self, world: World, uri: str, uuid: str, timeout: float) -> None:
        # Not AgentClient.__init__: it would open a gRPC channel.  These are what its
        # methods use.
        self.endpoint = AgentEndpoint(vsock_cid=3)
        self.call_timeout = timeout
        self.on_call = None
        self._relay = None
        self._turn = None
        self._channel = _Channel(world)  # type: ignore[assignment]
        self._stub = self._health = _Stubs(world, uri, uuid)  # type: ignore[assignment]
        world.agents_open += 1


# -- the world ----------------------------------------------------------------------------


@dataclass(frozen=True)
class MigrationCall:
    """One FakeDomain.migrate: the options and what libvirt would have been given."""

    domain: str
    options: MigrationOptions
    flags: int
    params: dict[str, Any]


class World:
    """Two hosts, A and B, with the lab's pool; the guests start on A, every team on a
    primary from A's pool (unless its spec says otherwise)."""

    def __init__(
        self,
        guests: tuple[GuestSpec, ...] = (VM1,),
        *,
        slots: dict[str, int | None] | None = None,
        hosts: tuple[str, ...] = (A, B),
    ) -> None:
        self.lock = threading.RLock()
        self.hosts = {uri: FakeHost(uri, _host_uuid(uri)) for uri in hosts}
        #: Keep every call in :attr:`calls` (the benchmark turns it off: it would grow).
        self.record_calls = True
        self.peers: dict[str, str] = {}  # peer-to-peer URI -> host URI
        self.calls: list[Call] = []
        self.migrations: list[MigrationCall] = []
        self.faults: list[Fault] = []
        self.tamper: dict[str, Callable[[Any], None]] = {}
        self.before: dict[tuple[str, str], Callable[[str], None]] = {}
        #: (domain name, RPC) -> hook(subject, the call's timeout), run before that
        #: domain's agent answers, outside the world's lock; an AgentError it raises is
        #: the call's outcome.
        self.agent_before: dict[tuple[str, str], Callable[[str, float | None], None]] = {}
        self.agents_open = 0
        #: How long a migration job runs before the VM moves (0: at once).
        self.migration_job_s = 0.0
        #: Set when such a job starts running: where a test cancels or interrupts it.
        self.job_started = threading.Event()
        for host in self.hosts.values():
            host.networks["default"] = (
                "<network><name>default</name><forward mode='nat'/>"
                "<bridge name='virbr0'/></network>"
            )
        for uri, count in {**dict.fromkeys(hosts, 4), **(slots or {})}.items():
            self.set_slots(uri, count)
        for spec in guests:
            self.add_guest(spec)

    # -- construction ----------------------------------------------------------------

    def set_slots(self, uri: str, count: int | None) -> None:
        """Define host *uri*'s pool with its first *count* slots (None: no pool at all)."""
        networks = self.hosts[uri].networks
        if count is None:
            networks.pop(POOL_NETWORK, None)
            return
        slots = tuple(TapSlot(*pool_slot(uri, n)) for n in range(count))
        networks[POOL_NETWORK] = format_pool_network(EmulatedPool(POOL, BRIDGE, "e1000e", slots))

    def define_pool(self, uri: str, name: str, indices: range) -> None:
        """Define pool *name* on host *uri* with the NICs ``pool_slot(uri, n)``, n in *indices*
        (a host's pools must not share a NIC: give each its own range)."""
        slots = tuple(TapSlot(*pool_slot(uri, n)) for n in indices)
        self.hosts[uri].networks[f"ptmig-pool-{name}"] = format_pool_network(
            EmulatedPool(name, BRIDGE, "e1000e", slots)  # type: ignore[arg-type]
        )

    def add_guest(self, spec: GuestSpec, uri: str = A) -> None:
        host = self.hosts[uri]
        devices = [_standby_xml(t, bus) for bus, t in enumerate(spec.teams, start=1)]
        teams = []
        bus = len(spec.teams) + 1
        for t in spec.teams:
            primary = None
            if t.slot is not None:
                tap, mac = pool_slot(uri, t.slot)
                attachment = attachment_for_slot(
                    EmulatedSlot(t.pool, BRIDGE, "e1000e", tap, mac), alias=f"ua-ptmig-{t.name}-1"
                )
                device = ET.fromstring(attachment.device_xml)
                device.append(_pci_address(bus))
                bus += 1
                devices.append(device)
                primary = attachment.primary
            teams.append(
                Team(
                    t.name,
                    t.standby_mac,
                    t.mac_policy,
                    t.pool,  # type: ignore[arg-type]
                    team_mac=t.team_mac,
                    primary=primary,
                )
            )
        team_set = TeamSet(tuple(teams))
        domid = host.next_domid
        host.next_domid += 1
        guest = FakeGuest(
            {
                t.name: GuestTeam(
                    t.name,
                    t.bond,
                    t.mac_policy,
                    t.standby_mac,
                    t.team_mac,
                    pb.OWNERSHIP_ADMIN if t.mac_policy == "preserve" else pb.OWNERSHIP_AGENT,
                )
                for t in spec.teams
            }
        )
        live = _domain_tree(spec.name, spec.uuid, team_set, devices, domid=domid)
        host.domains[spec.uuid] = DomainRecord(
            spec.uuid,
            spec.name,
            live,
            _domain_tree(spec.name, spec.uuid, team_set, devices, domid=None),
            guest,
            True,
            domid,
        )
        links = guest.links(live)
        for t, team in zip(spec.teams, teams, strict=True):
            gt = guest.teams[t.name]
            if team.primary is not None and team.primary.mac is not None:
                gt.enslaved.append(team.primary.mac)
                gt.active = team.primary.mac
                if t.mac_policy == "preserve":
                    guest.mac_overrides[team.primary.mac] = t.team_mac or t.standby_mac
            else:
                gt.active = t.standby_mac
        guest._sync(links)

    # -- injection points ------------------------------------------------------------

    def connect(self, uri: str) -> FakeHypervisor:
        return FakeHypervisor(self, uri)

    def agent_for(self, dom: Any, timeout: float) -> FakeAgent:
        return FakeAgent(self, dom.uri, dom.uuid, timeout)

    def coordinator(self, journal: Journal) -> Coordinator:
        coordinator = Coordinator(
            journal,
            connect=self.connect,  # type: ignore[arg-type]
            agent_for=self.agent_for,  # type: ignore[arg-type]
        )
        coordinator.lease_settle = 0.0  # one process's fake hosts: no write is slow
        return coordinator

    # -- calls and faults ------------------------------------------------------------

    @contextmanager
    def op(self, where: str, method: str, subject: str = "") -> Iterator[None]:
        hook = self.before.get((where, method))
        if hook is not None:
            hook(subject)
        with self.lock:
            if self.record_calls:
                self.calls.append(Call(where, method, subject))
            self.check_faults(where, method, subject)
            yield

    def check_faults(self, where: str, method: str, subject: str) -> None:
        for fault in self.faults:
            if (fault.where, fault.method) != (where, method):
                continue
            if fault.subject is not None and fault.subject != subject:
                continue
            fault.seen += 1
            if fault.seen == fault.nth or (fault.every and fault.seen > fault.nth):
                fault.fired += 1
                raise fault.error

    def fail(
        self,
        where: str,
        method: str,
        error: BaseException | None = None,
        *,
        nth: int = 1,
        every: bool = False,
        subject: str | None = None,
    ) -> Fault:
        """Make *method* on *where* (a host URI or "agent") raise at its *nth* call from now
        (about *subject* only, when given).  Agent faults take an ``AgentError``, which the
        fake stub turns into the gRPC error the real client maps back."""
        if error is None:
            error = (
                AgentError("UNAVAILABLE", f"{method} failed (injected)")
                if where == "agent"
                else HypervisorError(f"{where}: {method} failed (injected)", 1)
            )
        fault = Fault(where, method, error, nth, every, subject)
        self.faults.append(fault)
        return fault

    def mutations(self) -> list[Call]:
        """Every call that changes a host or a guest, in order."""
        return [c for c in self.calls if c.method in MUTATING]

    # -- looking at the world --------------------------------------------------------

    def xml(self, record: DomainRecord, *, inactive: bool = False) -> str:
        if inactive or not record.active:
            root = record.config if record.config is not None else record.live
        else:
            root = record.live
        return render(root, record.prefixes)

    def find(self, name: str, uri: str) -> DomainRecord | None:
        for record in self.hosts[uri].domains.values():
            if record.name == name:
                return record
        return None

    def running_on(self, name: str) -> list[str]:
        return [uri for uri in self.hosts if (r := self.find(name, uri)) is not None and r.active]

    def guest(self, name: str) -> FakeGuest:
        for host in self.hosts.values():
            for record in host.domains.values():
                if record.name == name:
                    return record.guest
        raise KeyError(name)

    def live_xml(self, name: str, uri: str) -> str:
        record = self.find(name, uri)
        assert record is not None, f"{name} is not on {uri}"
        return self.xml(record)

    def config_xml(self, name: str, uri: str) -> str:
        record = self.find(name, uri)
        assert record is not None, f"{name} is not on {uri}"
        return self.xml(record, inactive=True)

    def modes(self, name: str) -> dict[str, str]:
        """Each team's traffic as the guest's kernel has it: primary, standby or down."""
        guest = self.guest(name)
        uri = self.running_on(name)[0]
        record = self.find(name, uri)
        assert record is not None
        guest._sync(guest.links(record.live))
        return {team: guest.mode(team) for team in guest.teams}

    def active_taps(self, name: str) -> dict[str, str]:
        """The host tap under each team's active member (the standby's for a standby)."""
        (uri,) = self.running_on(name)
        record = self.find(name, uri)
        assert record is not None
        guest = record.guest
        guest._sync(guest.links(record.live))
        taps = {}
        for team in guest.teams.values():
            for device in _devices(record.live):
                mac = device.find("mac")
                if mac is not None and mac.get("address") == team.active:
                    taps[team.name] = _tap(device) or ""
        return taps

    def snapshot(self) -> dict[str, Any]:
        """Everything a workflow could change, to compare before and after."""
        out: dict[str, Any] = {}
        for uri, host in self.hosts.items():
            for record in host.domains.values():
                out[f"{uri} {record.name}"] = (
                    record.active,
                    self.xml(record),
                    self.xml(record, inactive=True),
                    repr(sorted(record.guest.teams.items())),
                    repr(record.guest.mac_overrides),
                )
            out[f"{uri} networks"] = dict(host.networks)
        return out

    # -- things that happen outside the workflow -------------------------------------

    def detach_outside(self, name: str, alias: str, uri: str = A, *, config: bool = False) -> None:
        """``virsh detach-device-alias`` by an operator: from the live domain (and with
        *config* the definition), the team record untouched."""
        record = self.find(name, uri)
        assert record is not None
        assert _remove_device(record.live, alias), f"{name} has no device {alias}"
        if config and record.config is not None:
            _remove_device(record.config, alias)

    def attach_outside(self, name: str, slot: int, alias: str, uri: str = A) -> None:
        """``virsh attach-device --live`` of the pool's *slot*-th NIC by an operator."""
        record = self.find(name, uri)
        assert record is not None
        tap, mac = pool_slot(uri, slot)
        device = ET.fromstring(
            attachment_for_slot(
                EmulatedSlot(POOL, BRIDGE, "e1000e", tap, mac), alias=alias
            ).device_xml
        )
        free = [n for n in range(1, ROOT_PORTS + 1) if n not in _used_buses(record.live)]
        device.append(_pci_address(free[0]))
        _insert_device(record.live, device)

    def destroy(self, name: str, uri: str) -> None:
        """``virsh destroy``: the domain stops; its persistent definition stays."""
        record = self.find(name, uri)
        assert record is not None
        record.active = False

    def duplicate(self, name: str, src: str, dst: str) -> None:
        """Make the domain run on *dst* as well (what recovery must never guess about)."""
        record = self.find(name, src)
        assert record is not None
        self.hosts[dst].domains[record.uuid] = copy.deepcopy(record)


def _host_uuid(uri: str) -> str:
    return HOST_UUIDS.get(uri) or str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, uri))


def numbered_guest(number: int, teams: int = 1, slot_base: int = 0, pool: str = POOL) -> GuestSpec:
    """Guest *number* of many (``g00042``): its own UUID, MACs and standby taps; team *k*'s
    primary from *pool* on the source's NIC ``pool_slot(uri, slot_base + number * teams + k)``."""
    specs = []
    for k in range(teams):
        specs.append(
            TeamSpec(
                f"t{k}",
                f"bond{k}",
                "preserve",
                f"52:54:01:{number >> 8 & 0xFF:02x}:{number & 0xFF:02x}:{k:02x}",
                f"sb{number:05d}-{k}",
                slot_base + number * teams + k,
                pool,
            )
        )
    return GuestSpec(
        f"g{number:05d}", str(uuidlib.uuid5(uuidlib.NAMESPACE_OID, f"g{number}")), tuple(specs)
    )


# -- workflow events and crashes -----------------------------------------------------------


def latest_steps(journal: Journal, workflow_id: str) -> dict[str, StepRecord]:
    """Each step's latest row, keyed by step name, in the order steps first appeared."""
    latest: dict[str, StepRecord] = {}
    for step in journal.steps(workflow_id):
        latest[step.name] = step  # re-assigning keeps the key's first position
    return latest


class Events:
    """An on_event listener that keeps the events and runs one-shot hooks at
    (phase, state), e.g. ``Events({("migrate", "started"): crash})``."""

    def __init__(self, hooks: dict[tuple[str, str], Callable[[], None]] | None = None) -> None:
        self.events: list[Event] = []
        self.hooks = dict(hooks or {})

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        hook = self.hooks.pop((event.phase, event.state), None)
        if hook is not None:
            hook()

    def of(self, state: str) -> list[str]:
        return [e.phase for e in self.events if e.state == state]


def crash() -> None:
    raise SimulatedCrash


def crash_in_child(
    world: World,
    journal_path: str | os.PathLike[str],
    run: Callable[[Coordinator], object],
    timeout: float = 30.0,
) -> None:
    """Run *run* in a forked coordinator process that dies (:class:`SimulatedCrash`) and
    leaves its journal open and its owner gone; then take over the world it left.

    The child opens its own Journal and exits with ``os._exit``, like a killed process:
    no clean-up runs.  The parent reaps it, so its pid is dead when recovery looks.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        status = 0
        try:
            os.close(read_fd)
            journal = Journal(journal_path)
            try:
                run(world.coordinator(journal))
                status = 3  # it was meant to crash
            except SimulatedCrash:
                pass
            with os.fdopen(write_fd, "wb") as out:
                out.write(pickle.dumps(world.hosts))
        except BaseException:
            traceback.print_exc()
            status = 1
        finally:
            os._exit(status)
    os.close(write_fd)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([read_fd], [], [], timeout)
            if not ready:
                os.kill(pid, signal.SIGKILL)
                raise AssertionError("the crashing coordinator hung")
            chunk = os.read(read_fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_fd)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child did not crash as planned"
    world.hosts = pickle.loads(b"".join(chunks))
    world.faults.clear()  # the child used them up
