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
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import libvirt
import libvirt_qemu

from host.domain.domain_xml import device_aliases
from host.domain.errors import DomainModelError
from host.domain.xmltree import parse_xml, parse_xml_keeping_prefixes, to_text_as_read
from host.errors import PtmigError
from host.migration_options import (
    DOWNTIME_BUDGET_PASSES,
    QEMU_DOWNTIME_MS,
    TUNED_DOWNTIME_MS,
    CopyStorage,
    MigrationOptions,
    MigrationStats,
)

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


@dataclass(frozen=True)
class MigrationProgress:
    """A sample of the migration job, for progress displays."""

    elapsed_ms: int
    data_processed: int
    data_total: int
    data_remaining: int
    iteration: int

    @property
    def fraction(self) -> float:
        return self.data_processed / self.data_total if self.data_total else 0.0


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
#: How often the progress watcher samples a migration job.
JOB_POLL_S = 0.5
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


class PostcopyTrigger:
    """When the progress watcher switches a post-copy-enabled job to post-copy.

    None after: once the first pre-copy pass has ended (libvirt's iteration 2 began),
    as virsh's --postcopy-after-precopy.  After S seconds: then, or earlier once the job
    stalls, i.e. a pass ended with no less left to send than the pass before it.
    """

    def __init__(self, after_s: float | None) -> None:
        self.after_s = after_s
        self._iteration = 0
        self._remaining_at: dict[int, int] = {}  # pass -> bytes left when it was first seen

    def reason(self, elapsed_s: float, iteration: int, remaining: int) -> str:
        """Why to switch now, or "" to wait."""
        if iteration > self._iteration:
            self._iteration = iteration
            self._remaining_at[iteration] = remaining
        if self.after_s is None:
            return "first pass ended" if iteration >= 2 else ""
        if elapsed_s >= self.after_s:
            return f"after {self.after_s:g} s"
        now, before = self._remaining_at.get(iteration), self._remaining_at.get(iteration - 1)
        if iteration >= 3 and now is not None and before is not None and now >= before:
            return "stalled"
        return ""


class DowntimeBudget:
    """The downtime limit of one job: the operator's (fixed), libvirt's (untouched), or
    ptmig's: :data:`TUNED_DOWNTIME_MS` for :data:`DOWNTIME_BUDGET_PASSES` passes, then
    QEMU's default.  A pass is libvirt's memory_iteration (1: the first full copy)."""

    def __init__(self, operator_ms: int | None, options: MigrationOptions) -> None:
        self.budgeted = operator_ms is None and not options.libvirt_defaults
        self.start_ms = (
            operator_ms
            if operator_ms is not None
            else (TUNED_DOWNTIME_MS if self.budgeted else None)
        )
        self.relaxed_at_pass: int | None = None

    def give_up(self) -> None:
        """libvirt would not take the limit: the job runs with its defaults."""
        self.budgeted, self.start_ms = False, None

    def relax(self, iteration: int) -> int | None:
        """The limit to set now (once), or None."""
        if not self.budgeted or self.relaxed_at_pass is not None:
            return None
        if iteration <= DOWNTIME_BUDGET_PASSES:
            return None
        self.relaxed_at_pass = iteration
        return QEMU_DOWNTIME_MS


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

    @contextmanager
    def _events(
        self, dom: libvirt.virDomain, event_ids: list[int], handler: Callable[..., None]
    ) -> Iterator[None]:
        ids = []
        try:
            for event_id in event_ids:
                ids.append(self._conn.domainEventRegisterAny(dom, event_id, handler, event_id))
            yield
        finally:
            for cb_id in ids:
                with suppress(libvirt.libvirtError):
                    self._conn.domainEventDeregisterAny(cb_id)

    def _new_stream(self) -> libvirt.virStream:
        return self._conn.newStream(0)

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
            xml = self._keep_network_uuid(xml)
            net = self._conn.networkDefineXML(xml)
            if start:
                if not net.isActive():
                    net.create()
                net.setAutostart(1)
        except libvirt.libvirtError as exc:
            raise _wrap(f"{self.uri}: define network", exc) from exc

    def _keep_network_uuid(self, xml: str) -> str:
        """libvirt redefines a network only under its existing UUID; carry it over."""
        try:
            root, declared = parse_xml_keeping_prefixes(xml, "network XML")
        except DomainModelError as exc:
            raise HypervisorError(f"{self.uri}: define network: {exc}") from exc
        name = root.findtext("name") or ""
        if root.find("uuid") is not None:
            return xml
        try:
            existing = self._conn.networkLookupByName(name)
        except libvirt.libvirtError:
            return xml
        uuid = ET.Element("uuid")
        uuid.text = existing.UUIDString()
        root.insert(1, uuid)
        return to_text_as_read(root, declared)

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
        with self.hv._events(self._dom, [removed, failed], on_event):
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
        becomes the destination's definition.  The statistics are the destination's record
        of the completed job (None where it has none) and what the watcher saw: TLS
        credentials, the vCPU throttle, the switch to post-copy."""
        target_uri = peer_uri or destination.uri
        options = options or MigrationOptions()
        flags, params = migration_call(options, persistent_xml=persistent_xml, unsafe=unsafe)
        stop = threading.Event()
        budget = DowntimeBudget(max_downtime_ms, options)
        if budget.start_ms is not None:
            try:
                self._dom.migrateSetMaxDowntime(budget.start_ms, 0)
            except libvirt.libvirtError as exc:
                if not budget.budgeted:  # the operator's limit: not without it
                    raise _wrap(f"{self.uri}: set max downtime", exc) from exc
                # ptmig's own tuning: without it the job is libvirt's plain one
                log.warning("%s: libvirt's downtime limit kept: %s", self.name, exc)
                budget.give_up()
        seen = _JobWatch(options, budget)
        t0 = time.monotonic()

        def watch() -> None:
            trigger = PostcopyTrigger(options.postcopy_after_s) if options.postcopy else None
            while not stop.wait(JOB_POLL_S):
                try:
                    info = self._dom.jobStats(0)
                except libvirt.libvirtError:
                    continue
                if info.get("type", 0) in (0, None):
                    continue
                seen.sample(info)
                # Once memory moves: libvirt sets QEMU's capabilities and parameters just
                # before the migrate command (after the destination's prepare and any
                # storage copy).  In its own thread: the watcher must not wait on it.
                if not seen.asked_qemu and int(info.get("memory_total", 0)) > 0:
                    seen.asked_qemu = True
                    threading.Thread(
                        target=self._ask_qemu, args=(seen,), name="migration-qmp", daemon=True
                    ).start()
                relaxed = budget.relax(int(info.get("memory_iteration", 0)))
                if relaxed is not None:
                    self._relax_downtime(relaxed, budget)
                if trigger is not None and seen.postcopy_asked_s is None:
                    elapsed = int(info.get("time_elapsed", 0)) / 1000 or time.monotonic() - t0
                    reason = trigger.reason(
                        elapsed,
                        int(info.get("memory_iteration", 0)),
                        int(info.get("memory_remaining", info.get("data_remaining", 0))),
                    )
                    if reason:
                        self._start_postcopy(seen, reason, time.monotonic() - t0)
                if on_progress is not None:
                    on_progress(
                        MigrationProgress(
                            elapsed_ms=int(info.get("time_elapsed", 0)),
                            data_processed=int(info.get("data_processed", 0)),
                            data_total=int(info.get("data_total", 0)),
                            data_remaining=int(info.get("data_remaining", 0)),
                            iteration=int(info.get("memory_iteration", 0)),
                        )
                    )

        def on_lifecycle(_c: object, _d: object, event: int, detail: int, _o: object) -> None:
            if (event, detail) == (
                libvirt.VIR_DOMAIN_EVENT_SUSPENDED,
                libvirt.VIR_DOMAIN_EVENT_SUSPENDED_POSTCOPY,
            ):
                seen.postcopy_entered_s = time.monotonic() - t0

        watcher = threading.Thread(target=watch, name="migration-progress", daemon=True)
        events = [libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE] if options.postcopy else []
        with self.hv._events(self._dom, events, on_lifecycle):
            watcher.start()
            try:
                self._dom.migrateToURI3(target_uri, params, flags)
            except libvirt.libvirtError as exc:
                what = f"migrate {self.name} {self.uri} -> {target_uri}"
                if options.postcopy and (
                    seen.postcopy_entered_s is not None or self._paused_in_postcopy()
                ):
                    raise PostcopyFailed(
                        f"{what}: failed in post-copy: {exc.get_error_message() or exc}",
                        exc.get_error_code(),
                    ) from exc
                raise _wrap(what, exc) from exc
            finally:
                stop.set()
                watcher.join()
        wall = time.monotonic() - t0
        try:
            job = destination.domain(self.uuid).completed_job()
        except HypervisorError as exc:
            log.warning("no job statistics: %s", exc)
            job = {}
        return seen.stats(wall, job)

    def _ask_qemu(self, seen: _JobWatch) -> None:
        """QEMU's migration capabilities and parameters while the job runs (libvirt resets
        them when it ends): the proof that TLS, multifd, auto-converge, post-copy were on."""
        try:
            caps = self._qmp("query-migrate-capabilities")
            params = self._qmp("query-migrate-parameters")
        except (libvirt.libvirtError, ValueError, KeyError) as exc:
            log.info("%s: QEMU's migration settings not read: %s", self.name, exc)
            return
        if isinstance(caps, list):
            seen.capabilities = tuple(
                str(c.get("capability")) for c in caps if isinstance(c, dict) and c.get("state")
            )
        if isinstance(params, dict):
            creds = params.get("tls-creds")
            seen.tls_creds = creds if isinstance(creds, str) else ""
            channels = params.get("multifd-channels")
            seen.multifd_channels = channels if isinstance(channels, int) else None

    def _qmp(self, command: str) -> Any:
        reply = libvirt_qemu.qemuMonitorCommand(self._dom, json.dumps({"execute": command}), 0)
        return json.loads(reply)["return"]

    def _paused_in_postcopy(self) -> bool:
        """The source's own word that the job had reached post-copy (its lifecycle event
        may not have come before the call failed)."""
        try:
            state, reason = self._dom.state()
        except libvirt.libvirtError:
            return False
        return state == libvirt.VIR_DOMAIN_PAUSED and reason in _POSTCOPY_PAUSED

    def _relax_downtime(self, limit_ms: int, budget: DowntimeBudget) -> None:
        try:
            self._dom.migrateSetMaxDowntime(limit_ms, 0)
        except libvirt.libvirtError as exc:  # the job may be ending
            log.info("relax the downtime limit: %s", exc.get_error_message())
            return
        log.info(
            "migration of %s: pass %s, downtime limit now %d ms",
            self.name,
            budget.relaxed_at_pass,
            limit_ms,
        )

    def _start_postcopy(self, seen: _JobWatch, reason: str, at_s: float) -> None:
        try:
            self._dom.migrateStartPostCopy(0)
        except libvirt.libvirtError as exc:  # the job may be ending; the next sample retries
            log.info("start post-copy (%s): %s", reason, exc.get_error_message())
            return
        log.info("migration of %s: post-copy asked at %.1f s (%s)", self.name, at_s, reason)
        seen.postcopy_asked_s = at_s
        seen.postcopy_reason = reason

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
            stream = self.hv._new_stream()
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


class _JobWatch:
    """What the progress watcher saw of one job, for its :class:`MigrationStats`."""

    def __init__(self, options: MigrationOptions, budget: DowntimeBudget) -> None:
        self.options = options
        self.budget = budget
        self.asked_qemu = False
        self.tls_creds = ""
        self.capabilities: tuple[str, ...] = ()
        self.multifd_channels: int | None = None
        self.throttle: int | None = None
        self.disk: dict[str, int] = {}
        self.postcopy_asked_s: float | None = None
        self.postcopy_entered_s: float | None = None
        self.postcopy_reason = ""

    def sample(self, info: dict[str, Any]) -> None:
        throttle = _int_or_none(info.get("auto_converge_throttle"))
        if throttle is not None:
            self.throttle = max(throttle, self.throttle or 0)
        for key in ("disk_total", "disk_processed"):
            value = _int_or_none(info.get(key))
            if value is not None:
                self.disk[key] = max(value, self.disk.get(key, 0))

    def stats(self, wall_s: float, job: dict[str, Any]) -> MigrationStats:
        o = self.options
        throttle = _int_or_none(job.get("auto_converge_throttle"))
        if self.throttle is not None:
            throttle = max(throttle or 0, self.throttle)
        copying = o.copy_storage is not CopyStorage.NONE

        def disk(key: str) -> int | None:
            # The source's samples: the destination's record of the job says 0 (its
            # statistics come in the migration cookie, without the storage mirror's).
            values = [v for v in (_int_or_none(job.get(key)), self.disk.get(key)) if v is not None]
            return max(values) if values else None

        entered = self.postcopy_entered_s is not None
        return MigrationStats(
            wall_s=wall_s,
            downtime_ms=_int_or_none(job.get("downtime")),
            elapsed_ms=_int_or_none(job.get("time_elapsed")),
            data_total=_int_or_none(job.get("data_total")),
            iterations=_int_or_none(job.get("memory_iteration")),
            tls=o.tls,
            tls_creds=self.tls_creds,
            copy_storage=o.copy_storage,
            disk_total=disk("disk_total") if copying else None,
            disk_processed=disk("disk_processed") if copying else None,
            migrate_disks=o.migrate_disks,
            bandwidth_mib_s=o.bandwidth_mib_s,
            memory_bps=_int_or_none(job.get("memory_bps")),
            auto_converge=o.auto_converge,
            auto_converge_throttle_pct=throttle if o.auto_converge else None,
            postcopy=o.postcopy,
            postcopy_started=entered,
            postcopy_started_after_s=(
                round(self.postcopy_asked_s, 3)
                if entered and self.postcopy_asked_s is not None
                else None
            ),
            postcopy_reason=self.postcopy_reason,
            parallel_connections=o.parallel_connections,
            max_downtime_ms=self.budget.start_ms,
            downtime_relaxed_at_pass=self.budget.relaxed_at_pass,
            qemu_capabilities=self.capabilities,
            multifd_channels=self.multifd_channels if o.parallel_connections else None,
        )


def _int_or_none(value: object) -> int | None:
    return int(value) if isinstance(value, int | float) else None
