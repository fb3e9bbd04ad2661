"""The only module that talks to libvirt (and libvirt-qemu).

Everything the coordinator asks of a host goes through :class:`Hypervisor` (a connection:
domains by name, every domain's XML, the pool networks) and of a domain through its
:class:`Domain` (a virDomain bound to its Hypervisor, as nova's ``Guest``): XML and
metadata, device attach and detach with a real wait, live migration with progress and its
statistics, the agent's channel and QMP ``announce-self``.  Errors leave as
:class:`HypervisorError` with libvirt's message.

Why the waits are event-driven: ``virDomainDetachDeviceAlias`` returns as soon as QEMU has
*asked* the guest to release the device; only libvirt's DEVICE_REMOVED event means it is
gone, and DEVICE_REMOVAL_FAILED that the guest refused.  A guest that never answers gets
neither, so every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import libvirt
import libvirt_qemu

from host.domain.domain_xml import device_aliases
from host.domain.errors import DomainModelError
from host.domain.networks import keep_network_uuid
from host.domain.xmltree import parse_xml
from host.errors import PtmigError
from host.migration_job import MigrationJob, MigrationProgress
from host.migration_options import CopyStorage, MigrationOptions, MigrationStats

log = logging.getLogger(__name__)


def _silence(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; ours are raised with context."""


libvirt.registerErrorHandler(_silence, None)

_loop_lock = threading.Lock()
_loop_started = False


def _ensure_event_loop() -> None:
    """libvirt delivers events only to a process that runs its event loop; start it once.

    Must happen before the first connection is opened, or that connection gets no events.
    """
    global _loop_started
    with _loop_lock:
        if _loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _loop_started = True


class HypervisorError(PtmigError, RuntimeError):
    """A libvirt operation failed; ``code`` is libvirt's error code when there is one."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class PostcopyFailed(HypervisorError):
    """The migration failed after it had switched to post-copy: the destination ran the
    VM and holds pages the source no longer has, so the source cannot simply resume it.
    libvirt keeps the source paused (post-copy failed); nothing of it may be undone."""


class DeviceRemovalError(HypervisorError):
    """The guest refused to release a device, or did not within the deadline."""


def _wrap(what: str, exc: libvirt.libvirtError) -> HypervisorError:
    return HypervisorError(f"{what}: {exc.get_error_message()}", exc.get_error_code())


MIGRATE_FLAGS = (
    libvirt.VIR_MIGRATE_LIVE
    | libvirt.VIR_MIGRATE_PEER2PEER
    | libvirt.VIR_MIGRATE_PERSIST_DEST
    | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
)
#: A source paused in or after post-copy (libvirt 1.3.3 and 8.5 added them).
_POSTCOPY_PAUSED = (
    libvirt.VIR_DOMAIN_PAUSED_POSTCOPY,
    getattr(libvirt, "VIR_DOMAIN_PAUSED_POSTCOPY_FAILED", 13),
)
_COPY_STORAGE_FLAGS = {
    CopyStorage.NONE: 0,
    CopyStorage.ALL: libvirt.VIR_MIGRATE_NON_SHARED_DISK,
    CopyStorage.INCREMENTAL: libvirt.VIR_MIGRATE_NON_SHARED_INC,
}


def migration_call(
    options: MigrationOptions, *, persistent_xml: str, unsafe: bool = False
) -> tuple[int, dict[str, Any]]:
    """The flags and typed parameters virDomainMigrateToURI3 gets for *options*: every
    option is a flag or a parameter here, nowhere else."""
    flags = MIGRATE_FLAGS
    params: dict[str, Any] = {libvirt.VIR_MIGRATE_PARAM_PERSIST_XML: persistent_xml}
    if unsafe:  # the caller vouches that the disk's cache mode is safe (a shared image)
        flags |= libvirt.VIR_MIGRATE_UNSAFE
    if options.tls:
        flags |= libvirt.VIR_MIGRATE_TLS
    flags |= _COPY_STORAGE_FLAGS[options.copy_storage]
    if options.migrate_disks:
        params[libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS] = list(options.migrate_disks)
    if options.bandwidth_mib_s is not None:
        params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = options.bandwidth_mib_s
    if options.auto_converge:
        flags |= libvirt.VIR_MIGRATE_AUTO_CONVERGE
    if options.postcopy:
        flags |= libvirt.VIR_MIGRATE_POSTCOPY
    if options.parallel_connections is not None:
        flags |= libvirt.VIR_MIGRATE_PARALLEL
        params[libvirt.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS] = options.parallel_connections
    return int(flags), params


class ChannelStream:
    """A libvirt stream with the socket-like calls the agent relay uses."""

    def __init__(self, stream: libvirt.virStream) -> None:
        self._stream = stream
        self._closed = False

    def recv(self, size: int) -> bytes:
        """Up to *size* bytes; b"" at the end of the stream or after close."""
        if self._closed:
            return b""
        try:
            data = self._stream.recv(size)
        except libvirt.libvirtError:
            return b""
        return data if isinstance(data, bytes) else b""

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                sent = self._stream.send(bytes(view))
            except libvirt.libvirtError as exc:
                raise OSError(f"channel stream: {exc.get_error_message()}") from exc
            if sent < 0:
                raise OSError("channel stream would block")
            view = view[sent:]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(libvirt.libvirtError):
            self._stream.abort()


class Hypervisor:
    """One libvirt host, by URI."""

    def __init__(self, uri: str) -> None:
        _ensure_event_loop()
        self.uri = uri
        try:
            self._conn = libvirt.open(uri)
        except libvirt.libvirtError as exc:
            raise _wrap(f"cannot connect to {uri}", exc) from exc
        # Notice a dead peer in about 15 s instead of waiting on TCP; a daemon that does
        # not support keepalives is still usable.
        with contextlib.suppress(libvirt.libvirtError):
            self._conn.setKeepAlive(5, 3)

    def close(self) -> None:
        with suppress(libvirt.libvirtError):
            self._conn.close()

    def __enter__(self) -> Hypervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- host ------------------------------------------------------------------------

    def host_uuid(self) -> str:
        try:
            caps = parse_xml(self._conn.getCapabilities(), f"{self.uri}: capabilities")
        except libvirt.libvirtError as exc:
            raise _wrap(f"{self.uri}: capabilities", exc) from exc
        except DomainModelError as exc:
            raise HypervisorError(str(exc)) from exc
        return caps.findtext("host/uuid") or ""

    # -- domains ---------------------------------------------------------------------

    def domain(self, ident: str) -> Domain:
        """A domain by name or UUID, as virsh takes it."""
        try:
            if len(ident) == 36 and ident.count("-") == 4:
                return Domain(self, self._conn.lookupByUUIDString(ident))
            return Domain(self, self._conn.lookupByName(ident))
        except libvirt.libvirtError as exc:
            raise _wrap(f"{self.uri}: domain {ident!r}", exc) from exc

    def has_domain(self, ident: str) -> bool:
        try:
            self.domain(ident)
            return True
        except HypervisorError:
            return False

    def all_domain_xml(self) -> list[str]:
        """The live XML of every active domain and the persistent XML of inactive ones."""
        try:
            domains = self._conn.listAllDomains()
        except libvirt.libvirtError as exc:
            raise _wrap(f"{self.uri}: list domains", exc) from exc
        out = []
        for dom in domains:
            try:
                out.append(str(dom.XMLDesc(0)))
            except libvirt.libvirtError:
                continue  # vanished while we listed
        return out

    # -- networks (pool definitions) -------------------------------------------------

    def network_xml(self, name: str) -> str | None:
        try:
            return str(self._conn.networkLookupByName(name).XMLDesc(0))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_NETWORK:
                return None
            raise _wrap(f"{self.uri}: network {name}", exc) from exc

    def network_names(self) -> list[str]:
        try:
            return [str(n.name()) for n in self._conn.listAllNetworks()]
        except libvirt.libvirtError as exc:
            raise _wrap(f"{self.uri}: list networks", exc) from exc

    def define_network(self, xml: str, *, start: bool = False) -> None:
        """Define (or redefine) a network; *start* it and mark it autostart (VF pools).

        Inert pool definitions (PCI, emulated) are only defined: libvirt is their
        store, and starting them would make a bridge nobody uses.
        """
        try:
            xml = keep_network_uuid(xml, self._network_uuid)
        except DomainModelError as exc:
            raise HypervisorError(f"{self.uri}: define network: {exc}") from exc
        try:
            net = self._conn.networkDefineXML(xml)
            if start:
                if not net.isActive():
                    net.create()
                net.setAutostart(1)
        except libvirt.libvirtError as exc:
            raise _wrap(f"{self.uri}: define network", exc) from exc

    def _network_uuid(self, name: str) -> str | None:
        try:
            return str(self._conn.networkLookupByName(name).UUIDString())
        except libvirt.libvirtError:
            return None

    def undefine_network(self, name: str) -> None:
        try:
            net = self._conn.networkLookupByName(name)
            if net.isActive():
                net.destroy()
            net.undefine()
        except libvirt.libvirtError as exc:
            raise _wrap(f"{self.uri}: undefine network {name}", exc) from exc


class Domain:
    """One domain as one host's libvirt has it: the virDomain handle with its Hypervisor.

    What the coordinator does to a domain is a method here, so a workflow holds one object
    per domain and host; after a migration the source's handle names a domain that has
    gone, and the destination's Hypervisor gives the new one.
    """

    def __init__(self, hv: Hypervisor, dom: libvirt.virDomain) -> None:
        self.hv = hv
        self._dom = dom

    @property
    def uri(self) -> str:
        return self.hv.uri

    @contextmanager
    def _events(self, event_ids: list[int], handler: Callable[..., None]) -> Iterator[None]:
        """*handler* gets this domain's events *event_ids* while the block runs (on the
        connection's event loop thread)."""
        if not event_ids:
            yield
            return
        conn = self._dom.connect()
        ids = []
        try:
            for event_id in event_ids:
                ids.append(conn.domainEventRegisterAny(self._dom, event_id, handler, event_id))
            yield
        finally:
            for cb_id in ids:
                with suppress(libvirt.libvirtError):
                    conn.domainEventDeregisterAny(cb_id)

    @property
    def name(self) -> str:
        return str(self._dom.name())

    @property
    def uuid(self) -> str:
        return str(self._dom.UUIDString())

    def is_active(self) -> bool:
        try:
            return bool(self._dom.isActive())
        except libvirt.libvirtError as exc:
            raise _wrap(f"{self.uri}: state of {self.name}", exc) from exc

    def xml(self, *, inactive: bool = False) -> str:
        """The live (or persistent) domain XML, secure parts included."""
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        try:
            return str(self._dom.XMLDesc(flags | libvirt.VIR_DOMAIN_XML_SECURE))
        except libvirt.libvirtError as exc:
            raise _wrap(f"{self.uri}: XML of {self.name}", exc) from exc

    def set_metadata(self, namespace: str, prefix: str, xml: str | None) -> None:
        """Write (or with ``None`` remove) our metadata, live and persistent alike."""
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG
        if self.is_active():
            flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
        try:
            self._dom.setMetadata(
                libvirt.VIR_DOMAIN_METADATA_ELEMENT, xml, prefix, namespace, flags
            )
        except libvirt.libvirtError as exc:
            raise _wrap(f"{self.uri}: set metadata of {self.name}", exc) from exc

    # -- devices ---------------------------------------------------------------------

    def _affect(self, alias: str | None = None) -> int:
        """LIVE, plus CONFIG for a persistent domain (and, for a detach, when the device is
        in the persistent definition): a host's definition names the devices it owns."""
        flags = libvirt.VIR_DOMAIN_AFFECT_LIVE
        try:
            persistent = bool(self._dom.isPersistent())
        except libvirt.libvirtError as exc:
            raise _wrap(f"{self.uri}: {self.name}", exc) from exc
        if persistent and (alias is None or self.has_device(alias, inactive=True)):
            flags |= libvirt.VIR_DOMAIN_AFFECT_CONFIG
        return int(flags)

    def has_device(self, alias: str, *, inactive: bool = False) -> bool:
        """Whether the live (or persistent) domain has a device called *alias*.

        Parsed, not searched for: ptmig's metadata names the alias too, and
        ``ua-ptmig-lan-1`` is a prefix of ``ua-ptmig-lan-10``.
        """
        try:
            return alias in device_aliases(self.xml(inactive=inactive))
        except DomainModelError as exc:
            raise HypervisorError(f"{self.uri}: XML of {self.name}: {exc}") from exc

    def attach(self, device_xml: str) -> None:
        """Hot-plug a device, into the persistent definition too."""
        try:
            self._dom.attachDeviceFlags(device_xml, self._affect())
        except libvirt.libvirtError as exc:
            raise _wrap(f"{self.uri}: attach to {self.name}", exc) from exc

    def detach_and_wait(self, alias: str, timeout: float) -> float:
        """Unplug device *alias* and wait for the guest to release it; returns seconds taken."""
        done = threading.Event()
        outcome: dict[str, int] = {}

        def on_event(_conn: object, _dom: object, dev_alias: str, event_id: int) -> None:
            if dev_alias == alias:
                outcome["event"] = event_id
                done.set()

        removed = libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED
        failed = libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVAL_FAILED
        t0 = time.monotonic()
        # Live first, the definition only once the guest let go: a device the guest never
        # releases must stay in both, or the next boot would silently lose it.
        config = self._affect(alias) & libvirt.VIR_DOMAIN_AFFECT_CONFIG
        with self._events([removed, failed], on_event):
            # Already gone (an operator's virsh, a guest that let go before) is unplugged.
            if not self.has_device(alias):
                self._detach_config(alias, config)
                return 0.0
            try:
                self._dom.detachDeviceAlias(alias, libvirt.VIR_DOMAIN_AFFECT_LIVE)
            except libvirt.libvirtError as exc:
                if not self.has_device(alias):  # it went between the look and the ask
                    self._detach_config(alias, config)
                    return time.monotonic() - t0
                raise _wrap(f"{self.uri}: detach {alias} from {self.name}", exc) from exc
            # The event may have fired before we looked; the live XML settles it.
            while not done.wait(0.25):
                if not self.has_device(alias):
                    break
                if time.monotonic() - t0 > timeout:
                    raise DeviceRemovalError(
                        f"{self.uri}: the guest did not release {alias} within {timeout:.0f} s"
                    )
        if outcome.get("event") == failed:
            raise DeviceRemovalError(f"{self.uri}: the guest refused to release {alias}")
        self._detach_config(alias, config)
        return time.monotonic() - t0

    def _detach_config(self, alias: str, config: int) -> None:
        if not config:
            return
        try:
            self._dom.detachDeviceAlias(alias, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        except libvirt.libvirtError as exc:
            raise _wrap(f"{self.uri}: remove {alias} from {self.name}'s definition", exc) from exc

    # -- migration -------------------------------------------------------------------

    def migrate(
        self,
        destination: Hypervisor,
        *,
        persistent_xml: str,
        peer_uri: str | None = None,
        unsafe: bool = False,
        on_progress: Callable[[MigrationProgress], None] | None = None,
        max_downtime_ms: int | None = None,
        options: MigrationOptions | None = None,
    ) -> MigrationStats:
        """Live-migrate peer-to-peer to *destination* (reached by the source's libvirtd at
        *peer_uri*, by default the destination's URI) with *options*; *persistent_xml*
        becomes the destination's definition.  The job's budget, post-copy switch and
        progress are :class:`~host.migration_job.MigrationJob`'s; this is the libvirt
        call.  The statistics are the destination's record of the completed job (None
        where it has none) and what the job's watcher saw."""
        target_uri = peer_uri or destination.uri
        options = options or MigrationOptions()
        flags, params = migration_call(options, persistent_xml=persistent_xml, unsafe=unsafe)
        job = MigrationJob(self, options, max_downtime_ms, on_progress)
        job.set_start_downtime()

        def on_lifecycle(_c: object, _d: object, event: int, detail: int, _o: object) -> None:
            if (event, detail) == (
                libvirt.VIR_DOMAIN_EVENT_SUSPENDED,
                libvirt.VIR_DOMAIN_EVENT_SUSPENDED_POSTCOPY,
            ):
                job.entered_postcopy()

        events = [libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE] if options.postcopy else []
        with self._events(events, on_lifecycle):
            job.begin()
            try:
                self._dom.migrateToURI3(target_uri, params, flags)
            except libvirt.libvirtError as exc:
                what = f"migrate {self.name} {self.uri} -> {target_uri}"
                if options.postcopy and (job.in_postcopy or self._paused_in_postcopy()):
                    raise PostcopyFailed(
                        f"{what}: failed in post-copy: {exc.get_error_message() or exc}",
                        exc.get_error_code(),
                    ) from exc
                raise _wrap(what, exc) from exc
            finally:
                job.end()
        try:
            completed = destination.domain(self.uuid).completed_job()
        except HypervisorError as exc:
            log.warning("no job statistics: %s", exc)
            completed = {}
        return job.stats(completed)

    # -- what the migration job's watcher asks (host/migration_job.py's JobControl) ----

    def job_stats(self) -> dict[str, Any]:
        """The running job's statistics; {} when libvirt gives none (between samples)."""
        try:
            return dict(self._dom.jobStats(0))
        except libvirt.libvirtError:
            return {}

    def set_max_downtime(self, limit_ms: int) -> None:
        try:
            self._dom.migrateSetMaxDowntime(limit_ms, 0)
        except libvirt.libvirtError as exc:
            raise _wrap(f"{self.uri}: set max downtime", exc) from exc

    def start_postcopy(self) -> None:
        try:
            self._dom.migrateStartPostCopy(0)
        except libvirt.libvirtError as exc:
            raise _wrap(f"{self.uri}: start post-copy", exc) from exc

    def qmp(self, command: str) -> Any:
        try:
            reply = libvirt_qemu.qemuMonitorCommand(self._dom, json.dumps({"execute": command}), 0)
        except libvirt.libvirtError as exc:
            raise _wrap(f"{self.uri}: QMP {command}", exc) from exc
        return json.loads(reply)["return"]

    def _paused_in_postcopy(self) -> bool:
        """The source's own word that the job had reached post-copy (its lifecycle event
        may not have come before the call failed)."""
        try:
            state, reason = self._dom.state()
        except libvirt.libvirtError:
            return False
        return state == libvirt.VIR_DOMAIN_PAUSED and reason in _POSTCOPY_PAUSED

    def completed_job(self) -> dict[str, Any]:
        """Statistics of the domain's last completed job (on a migration's destination)."""
        try:
            return dict(self._dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED))
        except libvirt.libvirtError as exc:
            raise _wrap(f"{self.uri}: job statistics of {self.name}", exc) from exc

    def job_running(self) -> bool:
        """True while the domain has a job (e.g. an outgoing migration) in progress."""
        try:
            return bool(int(self._dom.jobInfo()[0]) != libvirt.VIR_DOMAIN_JOB_NONE)
        except libvirt.libvirtError as exc:
            raise _wrap(f"{self.uri}: job of {self.name}", exc) from exc

    def abort_job(self) -> None:
        """virDomainAbortJob: stop the domain's job (an outgoing migration, which then
        fails in its caller and leaves the domain running here)."""
        try:
            self._dom.abortJob()
        except libvirt.libvirtError as exc:
            raise _wrap(f"{self.uri}: abort the job of {self.name}", exc) from exc

    # -- guest channels --------------------------------------------------------------

    def open_channel(self, name: str) -> ChannelStream:
        """A byte stream to the guest's virtio-serial channel *name*, through libvirt.

        Through libvirt, not the socket file: the channel's socket lives on whichever host
        runs the guest, and libvirt's connection is the only way ptmig reaches other hosts.
        FORCE takes over a stream another client holds (a crashed coordinator's, or a
        second client of this process).  Two processes must not take it from each other
        in a loop: that can break the libvirt connection itself (libvirtd 11.3), so the
        ptmig processes of a host take turns (host/agent_client/turns.py).
        """
        try:
            stream = self._dom.connect().newStream(0)
            self._dom.openChannel(name, stream, libvirt.VIR_DOMAIN_CHANNEL_FORCE)
        except libvirt.libvirtError as exc:
            raise _wrap(f"{self.uri}: open channel {name} of {self.name}", exc) from exc
        return ChannelStream(stream)

    # -- network announcements -------------------------------------------------------

    def announce(
        self,
        *,
        interfaces: list[str] | None = None,
        rounds: int = 3,
        initial_ms: int = 50,
        max_ms: int = 550,
        step_ms: int = 100,
    ) -> None:
        """QMP ``announce-self``: QEMU sends RARPs for the guest's NICs (*interfaces*: only
        those device ids) so switches learn the path to the standby at once."""
        arguments: dict[str, Any] = {
            "initial": initial_ms,
            "max": max_ms,
            "rounds": rounds,
            "step": step_ms,
        }
        if interfaces:
            arguments["interfaces"] = interfaces
        cmd = json.dumps({"execute": "announce-self", "arguments": arguments})
        try:
            libvirt_qemu.qemuMonitorCommand(self._dom, cmd, 0)
        except libvirt.libvirtError as exc:
            raise _wrap(f"{self.uri}: announce-self for {self.name}", exc) from exc
