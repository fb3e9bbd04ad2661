"""An in-memory world for the migration workflow's unit tests: two hosts, their guests.

This module is the world (:class:`World`, faults, events, crashes) and the index the
tests import from; each part it fakes is a module of its own: ``fake_specs`` (hosts,
pools, guests and teams as data), ``fake_libvirt_xml`` (domain XML as libvirt keeps it),
``fake_guest`` (the guest's kernel), ``fake_libvirt`` (Hypervisor and Domain),
``fake_agent`` (the agent behind the real AgentClient).

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
import traceback
import uuid as uuidlib
import weakref
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from fake_agent import FakeAgent
from fake_guest import FakeGuest, GuestTeam
from fake_libvirt import DomainRecord, FakeDomain, FakeHost, FakeHypervisor, MigrationCall
from fake_libvirt_xml import (
    devices_of,
    domain_tree,
    insert_device,
    pci_address_element,
    remove_device,
    render,
    standby_xml,
    tap_of,
    used_buses,
)
from fake_specs import (
    BRIDGE,
    HOST_UUIDS,
    LAN,
    MUTATING,
    POOL,
    POOL_NETWORK,
    POOL_SLOTS,
    ROOT_PORTS,
    VM1,
    VM2,
    A,
    B,
    C,
    GuestSpec,
    SimulatedCrash,
    TeamSpec,
    pool_slot,
)
from ptmig.v1 import guest_agent_pb2 as pb

from host.agent_client import AgentError
from host.domain.devices import attachment_for_slot
from host.domain.pools import (
    EmulatedPool,
    EmulatedSlot,
    TapSlot,
    format_pool_network,
)
from host.domain.teams import Team, TeamSet
from host.hypervisor import HypervisorError
from host.workflow.coordinator import Coordinator
from host.workflow.journal import Journal, StepRecord
from host.workflow.model import Event

#: What the tests import from here: the world, and its parts' names for convenience.
__all__ = [
    "LAN",
    "MUTATING",
    "POOL_SLOTS",
    "VM1",
    "VM2",
    "A",
    "B",
    "C",
    "Events",
    "FakeAgent",
    "FakeDomain",
    "FakeHypervisor",
    "GuestSpec",
    "SimulatedCrash",
    "World",
    "crash",
    "crash_in_child",
    "latest_steps",
    "numbered_guest",
]


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
        #: Host PCI addresses whose devices implement VFIO migration (QEMU names no
        #: blocker for them), and blockers QEMU names per domain whatever is plugged.
        self.state_copyable: set[str] = set()
        self.blockers: dict[str, list[str]] = {}
        #: Every connection opened (FakeHypervisor), for drop_connections.
        self.connections: weakref.WeakSet[Any] = weakref.WeakSet()
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

    def drop_connections(self, uri: str) -> None:
        """Host *uri*'s libvirtd ends every connection open to it (restarted, or its
        clients closed): their calls fail from now on; new ones work."""
        with self.lock:
            for hv in self.connections:
                if hv.uri == uri:
                    hv.alive = False

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
        devices = [standby_xml(t, bus) for bus, t in enumerate(spec.teams, start=1)]
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
                device.append(pci_address_element(bus))
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
        live = domain_tree(spec.name, spec.uuid, team_set, devices, domid=domid)
        host.domains[spec.uuid] = DomainRecord(
            spec.uuid,
            spec.name,
            live,
            domain_tree(spec.name, spec.uuid, team_set, devices, domid=None),
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
            for device in devices_of(record.live):
                mac = device.find("mac")
                if mac is not None and mac.get("address") == team.active:
                    taps[team.name] = tap_of(device) or ""
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
        assert remove_device(record.live, alias), f"{name} has no device {alias}"
        if config and record.config is not None:
            remove_device(record.config, alias)

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
        free = [n for n in range(1, ROOT_PORTS + 1) if n not in used_buses(record.live)]
        device.append(pci_address_element(free[0]))
        insert_device(record.live, device)

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
