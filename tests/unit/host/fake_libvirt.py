"""The fake libvirt: :class:`FakeHypervisor` and :class:`FakeDomain`, with the public methods
of host.hypervisor's classes (test_workflow_fakes.py checks it; see workflow_fakes)."""

from __future__ import annotations

import copy
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fake_guest import FakeGuest
from fake_libvirt_xml import (
    alias_of,
    devices_of,
    host_pci_of,
    host_pcis_in,
    insert_device,
    mdev_of,
    mdevs_in,
    pci_address_element,
    remove_device,
    set_metadata_element,
    tap_of,
    taps_in,
    used_buses,
)
from fake_specs import LIBVIRT_NO_DOMAIN, ROOT_PORTS

from host.domain.lease import LEASE_NS
from host.domain.teams import TEAMS_NS, TEAMS_PREFIX
from host.hypervisor import (
    DeviceRemovalError,
    DomainNotFound,
    HypervisorError,
    libvirt_error,
    migration_call,
)
from host.migration_job import MigrationProgress
from host.migration_options import CopyStorage, MigrationOptions, MigrationStats

if TYPE_CHECKING:
    from workflow_fakes import World


#: What libvirt's URI parser (libxml2's) takes: a scheme, then no whitespace.
URI_SYNTAX = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:\S*")


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


class FakeHypervisor:
    """One host of the world, by URI, with :class:`host.hypervisor.Hypervisor`'s face."""

    def __init__(self, world: World, uri: str) -> None:
        self.world = world
        self.uri = uri
        with world.op(uri, "connect"):
            if not URI_SYNTAX.fullmatch(uri):  # as virURIParse refuses it (VIR_FROM_URI)
                raise libvirt_error(
                    f"cannot connect to {uri}: internal error: Unable to parse URI {uri}",
                    1,
                    45,
                    connecting=True,
                )
            if world.hosts.get(uri) is None:
                raise libvirt_error(
                    f"cannot connect to {uri}: unable to connect to server", 38, connecting=True
                )
        self.closed = False
        self.alive = True  # False once World.drop_connections ended it from the host's side
        world.connections.add(self)

    @property
    def _host(self) -> FakeHost:
        return self.world.hosts[self.uri]

    def close(self) -> None:
        self.closed = True

    def is_alive(self) -> bool:
        return self.alive and not self.closed

    @contextmanager
    def op(self, method: str, subject: str = "") -> Iterator[None]:
        """A call on this connection: refused once the host dropped it, else the world's."""
        if not self.alive:
            raise HypervisorError(f"{self.uri}: internal error: client socket is closed", 1)
        with self.world.op(self.uri, method, subject):
            yield

    def __enter__(self) -> FakeHypervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- host ------------------------------------------------------------------------

    def host_uuid(self) -> str:
        with self.op("host_uuid"):
            return self._host.host_uuid

    # -- domains ---------------------------------------------------------------------

    def domain(self, ident: str) -> FakeDomain:
        with self.op("domain", ident):
            for record in self._host.domains.values():
                if ident in (record.uuid, record.name):
                    return FakeDomain(self, record.uuid, record.name)
            raise libvirt_error(
                f"{self.uri}: domain {ident!r}: Domain not found: no domain "
                f"with matching name '{ident}'",
                LIBVIRT_NO_DOMAIN,
            )

    def has_domain(self, ident: str) -> bool:
        """Whether this host defines the domain; a host that cannot answer raises
        (HostUnreachable...): "no" would send a caller after a VM that may well be there."""
        try:
            self.domain(ident)
            return True
        except DomainNotFound:
            return False

    def all_domain_xml(self) -> list[str]:
        with self.op("all_domain_xml"):
            return [self.world.xml(r) for r in self._host.domains.values()]

    # -- networks --------------------------------------------------------------------

    def network_xml(self, name: str) -> str | None:
        with self.op("network_xml", name):
            return self._host.networks.get(name)

    def network_names(self) -> list[str]:
        with self.op("network_names"):
            return list(self._host.networks)

    def define_network(self, xml: str, *, start: bool = False) -> None:
        with self.op("define_network"):
            name = ET.fromstring(xml).findtext("name") or ""
            self._host.networks[name] = xml

    def undefine_network(self, name: str) -> None:
        with self.op("undefine_network", name):
            if self._host.networks.pop(name, None) is None:
                raise libvirt_error(f"{self.uri}: undefine network {name}: Network not found", 43)


class FakeDomain:
    """A domain handle bound to its host, with :class:`host.hypervisor.Domain`'s face: it
    names a domain, which may since have gone from the host."""

    def __init__(self, hv: FakeHypervisor, uuid: str, domain_name: str) -> None:
        self.hv = hv
        self._uuid = uuid
        self.domain_name = domain_name
        self._added: list[dict[str, float]] = []  # devices_added blocks open on this handle

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
            raise libvirt_error(
                f"{self.uri}: Domain not found: no domain with matching uuid "
                f"'{self.uuid}' ({self.domain_name})",
                LIBVIRT_NO_DOMAIN,
            )
        return record

    def is_active(self) -> bool:
        with self.hv.op("is_active", self.domain_name):
            return self._record().active

    def xml(self, *, inactive: bool = False) -> str:
        with self.hv.op("domain_xml", self.domain_name):
            record = self._record()
            return self.world.xml(record, inactive=inactive)

    def set_metadata(self, namespace: str, prefix: str, xml: str | None) -> None:
        # The workflow lease is bookkeeping, taken and given back: "set_lease" is not
        # among MUTATING, so "nothing changed" still means the domain and guest are as
        # they were (the snapshot compares the XML too, lease included).
        method = "set_lease" if namespace == LEASE_NS else "set_metadata"
        with self.hv.op(method, self.domain_name):
            record = self._record()
            element = None
            if xml is not None:
                try:
                    element = ET.fromstring(xml)
                except ET.ParseError as exc:
                    raise libvirt_error(
                        f"{self.uri}: set metadata of {self.domain_name}: XML error: {exc}", 27
                    ) from None
                if element.tag.startswith("{") or f"xmlns:{prefix}" in xml:
                    raise libvirt_error(
                        f"{self.uri}: set metadata of {self.domain_name}: "
                        "failed to create a new XML namespace",
                        1,
                    )
                element.tag = f"{{{namespace}}}{element.tag}"
            record.prefixes[namespace] = prefix
            if record.config is not None:
                set_metadata_element(record.config, namespace, element)
            if record.active:
                set_metadata_element(record.live, namespace, element)

    # -- devices ---------------------------------------------------------------------

    def attach(self, device_xml: str) -> None:
        try:
            device = ET.fromstring(device_xml)
        except ET.ParseError as exc:
            raise libvirt_error(
                f"{self.uri}: attach to {self.domain_name}: XML error: {exc}", 27
            ) from None
        with self.hv.op("attach", alias_of(device) or ""):
            record = self._record()
            what = f"{self.uri}: attach to {self.domain_name}"
            if not record.active:
                raise libvirt_error(
                    f"{what}: Requested operation is not valid: domain is not running", 55
                )
            alias = alias_of(device)
            if alias is not None and any(alias_of(d) == alias for d in devices_of(record.live)):
                raise libvirt_error(
                    f"{what}: operation failed: non unique alias detected: {alias}", 9
                )
            for other in self._host.domains.values():
                if not other.active:
                    continue
                tap, pci, mdev = tap_of(device), host_pci_of(device), mdev_of(device)
                if mdev is not None and mdev in mdevs_in(other.live):
                    raise libvirt_error(
                        f"{what}: Requested operation is not valid: mediated device "
                        f"{mdev} is in use by driver QEMU, domain {other.name}",
                        55,
                    )
                if tap is not None and tap in taps_in(other.live):
                    raise libvirt_error(
                        f"{what}: Unable to create tap device {tap}: Device or resource busy", 38
                    )
                if pci is not None and pci in host_pcis_in(other.live):
                    raise libvirt_error(
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
                    raise libvirt_error(
                        f"{what}: operation failed: network device with mac "
                        f"{mac.get('address')} already exists",
                        9,
                    )
            free = [n for n in range(1, ROOT_PORTS + 1) if n not in used_buses(record.live)]
            if not free:
                raise libvirt_error(f"{what}: internal error: No more available PCI slots", 1)
            if device.find("address") is None:
                device.append(pci_address_element(free[0]))
            insert_device(record.live, copy.deepcopy(device))
            if record.config is not None:
                insert_device(record.config, copy.deepcopy(device))
            for seen in self._added:
                seen.setdefault(alias or "", time.time())

    @contextmanager
    def devices_added(self) -> Iterator[dict[str, float]]:
        """As production: alias -> when its attach took effect, for the block's attaches."""
        seen: dict[str, float] = {}
        self._added.append(seen)
        try:
            yield seen
        finally:
            self._added.remove(seen)

    def has_device(self, alias: str, *, inactive: bool = False) -> bool:
        with self.hv.op("has_device", alias):
            record = self._record()
            root = record.config if inactive and record.config is not None else record.live
            return any(alias_of(d) == alias for d in devices_of(root))

    def detach_and_wait(self, alias: str, timeout: float) -> float:
        """As production: live first, the definition only once the guest let go; a device
        already gone from the live domain is unplugged (and leaves the definition)."""
        with self.hv.op("detach_and_wait", alias):
            record = self._record()
            in_config = record.config is not None and any(
                alias_of(d) == alias for d in devices_of(record.config)
            )
            if not any(alias_of(d) == alias for d in devices_of(record.live)):
                if in_config:
                    remove_device(record.config, alias)  # type: ignore[arg-type]
                return 0.0
            held = record.guest.hold.get(alias)
            if held == "timeout":
                raise DeviceRemovalError(
                    f"{self.uri}: the guest did not release {alias} within {timeout:.0f} s"
                )
            if held == "refuse":
                raise DeviceRemovalError(f"{self.uri}: the guest refused to release {alias}")
            remove_device(record.live, alias)
            if in_config:
                remove_device(record.config, alias)  # type: ignore[arg-type]
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
        destination_xml: str | None = None,
    ) -> MigrationStats:
        destination_uri = peer_uri or destination.uri
        options = options or MigrationOptions()
        # What libvirt would be asked: the production flags and typed parameters.
        flags, params = migration_call(
            options, persistent_xml=persistent_xml, unsafe=unsafe, destination_xml=destination_xml
        )
        self.world.migrations.append(MigrationCall(self.domain_name, options, flags, params))
        what = f"migrate {self.domain_name} {self.uri} -> {destination_uri}"
        self._job_window(what)
        with self.hv.op("migrate", self.domain_name):
            record = self._record()
            if not record.active:
                raise libvirt_error(
                    f"{what}: Requested operation is not valid: domain is not running", 55
                )
            target = self.world.hosts.get(self.world.peers.get(destination_uri, destination_uri))
            if target is None or target is self._host:
                raise libvirt_error(f"{what}: unable to connect to server", 38, 7)
            blockers = self._blockers(record)
            if blockers:
                raise libvirt_error(f"{what}: cannot migrate domain: {'; '.join(blockers)}", 55)
            if any(d.tag == "hostdev" for d in devices_of(record.live)) and not destination_xml:
                raise libvirt_error(
                    f"{what}: Requested operation is not valid: domain has "
                    "assigned non-USB host devices",
                    55,
                )
            try:
                persistent = ET.fromstring(persistent_xml)
            except ET.ParseError as exc:
                raise libvirt_error(f"{what}: XML error: {exc}", 27) from None
            if (persistent.findtext("uuid"), persistent.findtext("name")) != (
                record.uuid,
                record.name,
            ):
                raise libvirt_error(
                    f"{what}: unsupported configuration: target domain uuid "
                    "or name does not match source",
                    67,
                )
            there = target.domains.get(record.uuid)
            if there is not None and there.active:
                raise libvirt_error(
                    f"{what}: Requested operation is not valid: domain is already active", 55
                )
            for other in target.domains.values():
                if other.uuid != record.uuid and other.active:
                    for tap in taps_in(record.live) & taps_in(other.live):
                        raise libvirt_error(
                            f"{what}: Unable to create tap device {tap}: Device or resource busy",
                            38,
                        )
            if on_progress is not None:
                on_progress(MigrationProgress(120, 64 << 20, 512 << 20, 448 << 20, 1))
            live = copy.deepcopy(record.live)
            if destination_xml:  # libvirt starts the destination from it (the devices' part)
                asked = ET.fromstring(destination_xml)
                for device, wanted in zip(devices_of(live), devices_of(asked), strict=True):
                    if device.tag == "hostdev":
                        device[:] = list(copy.deepcopy(wanted))
                busy = host_pcis_in(live) & {
                    p for o in target.domains.values() if o.active for p in host_pcis_in(o.live)
                }
                if busy:
                    raise libvirt_error(
                        f"{what}: PCI device {sorted(busy)[0]} is in use by driver QEMU", 1
                    )
                held = mdevs_in(live) & {
                    m for o in target.domains.values() if o.active for m in mdevs_in(o.live)
                }
                if held:
                    raise libvirt_error(
                        f"{what}: mediated device {sorted(held)[0]} is in use by driver QEMU", 1
                    )
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
        with self.hv.op("completed_job", self.domain_name):
            job = self._record().job
            if job is None:
                raise libvirt_error(
                    f"{self.uri}: job statistics of {self.domain_name}: no completed job", 1
                )
            return dict(job)

    def job_running(self) -> bool:
        with self.hv.op("job_running", self.domain_name):
            return self._record().job_running

    # What host/migration_job.py's watcher asks of a real Domain; the fake migrate above
    # runs no watcher, so these only answer as a domain without a job would.

    def job_stats(self) -> dict[str, Any]:
        return {}

    def set_max_downtime(self, limit_ms: int) -> None:
        raise libvirt_error(f"{self.uri}: set max downtime: no job on {self.domain_name}")

    def start_postcopy(self) -> None:
        raise libvirt_error(f"{self.uri}: start post-copy: no job on {self.domain_name}")

    def migratable_xml(self) -> str:
        with self.hv.op("migratable_xml", self.domain_name):
            return self.world.xml(self._record())

    def migration_blockers(self) -> list[str]:
        with self.hv.op("migration_blockers", self.domain_name):
            return self._blockers(self._record())

    def _blockers(self, record: DomainRecord) -> list[str]:
        """As QEMU's query-migrate: the world's own, and each hostdev whose device the
        world does not call state-copyable (QEMU names it by its host address, an mdev by
        its UUID)."""
        reasons = list(self.world.blockers.get(record.name, []))
        held = host_pcis_in(record.live) | mdevs_in(record.live)
        for device in sorted(held - self.world.state_copyable):
            reasons.append(f"{device}: VFIO migration is not supported in kernel")
        return reasons

    def qmp(self, command: str) -> Any:
        raise libvirt_error(f"{self.uri}: QMP {command}: the fakes have no QEMU")

    def abort_job(self) -> None:
        with self.hv.op("abort_job", self.domain_name):
            record = self._record()
            if not record.job_running:
                raise libvirt_error(
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
            raise libvirt_error(
                f"{what}: operation aborted: migration out job: canceled by client", 1
            )

    def open_channel(self, name: str) -> Any:
        raise libvirt_error(f"{self.uri}: open channel {name}: the fakes have no channels")

    def announce(
        self,
        *,
        interfaces: list[str] | None = None,
        rounds: int = 3,
        initial_ms: int = 50,
        max_ms: int = 550,
        step_ms: int = 100,
    ) -> None:
        with self.hv.op("announce", self.domain_name):
            if not self._record().active:
                raise libvirt_error(
                    f"{self.uri}: announce-self for {self.domain_name}: domain is not running", 55
                )


@dataclass(frozen=True)
class MigrationCall:
    """One FakeDomain.migrate: the options and what libvirt would have been given."""

    domain: str
    options: MigrationOptions
    flags: int
    params: dict[str, Any]
