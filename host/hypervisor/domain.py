"""One domain as one host's libvirt has it (:class:`Domain`): its state, XML and metadata,
device attach and detach with a real wait, the migration call and what the migration
job's watcher asks of it, its channels and QEMU's announcements."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any

import libvirt

from host.domain.domain_xml import device_aliases
from host.domain.errors import DomainModelError
from host.hypervisor.errors import DeviceRemovalError, HypervisorError, PostcopyFailed, wrap
from host.hypervisor.events import domain_events
from host.hypervisor.migration_call import POSTCOPY_PAUSED, migration_call
from host.hypervisor.qemu import ChannelStream, monitor_command, open_channel
from host.migration_job import MigrationJob, MigrationProgress
from host.migration_options import MigrationOptions, MigrationStats

if TYPE_CHECKING:
    from host.hypervisor.connection import Hypervisor

log = logging.getLogger(__name__)


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
            raise wrap(f"{self.uri}: state of {self.name}", exc) from exc

    def xml(self, *, inactive: bool = False) -> str:
        """The live (or persistent) domain XML, secure parts included."""
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        try:
            return str(self._dom.XMLDesc(flags | libvirt.VIR_DOMAIN_XML_SECURE))
        except libvirt.libvirtError as exc:
            raise wrap(f"{self.uri}: XML of {self.name}", exc) from exc

    def migratable_xml(self) -> str:
        """The live XML as a migration's destination XML must start from (libvirt's
        MIGRATABLE form: no runtime-only parts)."""
        flags = libvirt.VIR_DOMAIN_XML_MIGRATABLE | libvirt.VIR_DOMAIN_XML_SECURE
        try:
            return str(self._dom.XMLDesc(flags))
        except libvirt.libvirtError as exc:
            raise wrap(f"{self.uri}: migratable XML of {self.name}", exc) from exc

    def migration_blockers(self) -> list[str]:
        """What QEMU says blocks a migration of the domain now (``query-migrate``'s
        ``blocked-reasons``, QEMU >= 6.0: free text, often naming the device); empty when
        nothing does.  libvirt refuses a migration on any of them."""
        reply = self.qmp("query-migrate")
        reasons = reply.get("blocked-reasons", []) if isinstance(reply, dict) else []
        return [str(r) for r in reasons]

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
            raise wrap(f"{self.uri}: set metadata of {self.name}", exc) from exc

    # -- devices ---------------------------------------------------------------------

    def _affect(self, alias: str | None = None) -> int:
        """LIVE, plus CONFIG for a persistent domain (and, for a detach, when the device is
        in the persistent definition): a host's definition names the devices it owns."""
        flags = libvirt.VIR_DOMAIN_AFFECT_LIVE
        try:
            persistent = bool(self._dom.isPersistent())
        except libvirt.libvirtError as exc:
            raise wrap(f"{self.uri}: {self.name}", exc) from exc
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
            raise wrap(f"{self.uri}: attach to {self.name}", exc) from exc

    @contextmanager
    def devices_added(self) -> Iterator[dict[str, float]]:
        """While the block runs: alias -> when (epoch s) libvirt's DEVICE_ADDED event for
        it reached this process.  Only recorded, never waited for: the guest's agent waits
        for the device itself, and the attach call has returned by then.  libvirt takes
        one registration of an event per domain and connection ("event callback already
        tracked"): a second block at the same time (two teams repaired in parallel, each
        plugging) records nothing rather than failing its plug."""
        seen: dict[str, float] = {}

        def on_event(_conn: object, _dom: object, dev_alias: str, _opaque: object) -> None:
            seen.setdefault(dev_alias, time.time())

        with ExitStack() as stack:
            try:
                stack.enter_context(
                    domain_events(self._dom, [libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED], on_event)
                )
            except libvirt.libvirtError as exc:
                log.debug("%s: DEVICE_ADDED not recorded: %s", self.name, exc)
            yield seen

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
        with domain_events(self._dom, [removed, failed], on_event):
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
                raise wrap(f"{self.uri}: detach {alias} from {self.name}", exc) from exc
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
            raise wrap(f"{self.uri}: remove {alias} from {self.name}'s definition", exc) from exc

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
        destination_xml: str | None = None,
    ) -> MigrationStats:
        """Live-migrate peer-to-peer to *destination* (reached by the source's libvirtd at
        *peer_uri*, by default the destination's URI) with *options*; *persistent_xml*
        becomes the destination's definition.  The job's budget, post-copy switch and
        progress are :class:`~host.migration_job.MigrationJob`'s; this is the libvirt
        call.  The statistics are the destination's record of the completed job (None
        where it has none) and what the job's watcher saw."""
        target_uri = peer_uri or destination.uri
        options = options or MigrationOptions()
        flags, params = migration_call(
            options, persistent_xml=persistent_xml, unsafe=unsafe, destination_xml=destination_xml
        )
        job = MigrationJob(self, options, max_downtime_ms, on_progress)
        job.set_start_downtime()

        def on_lifecycle(_c: object, _d: object, event: int, detail: int, _o: object) -> None:
            if (event, detail) == (
                libvirt.VIR_DOMAIN_EVENT_SUSPENDED,
                libvirt.VIR_DOMAIN_EVENT_SUSPENDED_POSTCOPY,
            ):
                job.entered_postcopy()

        events = [libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE] if options.postcopy else []
        with domain_events(self._dom, events, on_lifecycle):
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
                raise wrap(what, exc) from exc
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
            raise wrap(f"{self.uri}: set max downtime", exc) from exc

    def start_postcopy(self) -> None:
        try:
            self._dom.migrateStartPostCopy(0)
        except libvirt.libvirtError as exc:
            raise wrap(f"{self.uri}: start post-copy", exc) from exc

    def qmp(self, command: str) -> Any:
        try:
            reply = monitor_command(self._dom, command)
        except libvirt.libvirtError as exc:
            raise wrap(f"{self.uri}: QMP {command}", exc) from exc
        return json.loads(reply)["return"]

    def _paused_in_postcopy(self) -> bool:
        """The source's own word that the job had reached post-copy (its lifecycle event
        may not have come before the call failed)."""
        try:
            state, reason = self._dom.state()
        except libvirt.libvirtError:
            return False
        return state == libvirt.VIR_DOMAIN_PAUSED and reason in POSTCOPY_PAUSED

    def completed_job(self) -> dict[str, Any]:
        """Statistics of the domain's last completed job (on a migration's destination)."""
        try:
            return dict(self._dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED))
        except libvirt.libvirtError as exc:
            raise wrap(f"{self.uri}: job statistics of {self.name}", exc) from exc

    def job_running(self) -> bool:
        """True while the domain has a job (e.g. an outgoing migration) in progress."""
        try:
            return bool(int(self._dom.jobInfo()[0]) != libvirt.VIR_DOMAIN_JOB_NONE)
        except libvirt.libvirtError as exc:
            raise wrap(f"{self.uri}: job of {self.name}", exc) from exc

    def abort_job(self) -> None:
        """virDomainAbortJob: stop the domain's job (an outgoing migration, which then
        fails in its caller and leaves the domain running here)."""
        try:
            self._dom.abortJob()
        except libvirt.libvirtError as exc:
            raise wrap(f"{self.uri}: abort the job of {self.name}", exc) from exc

    # -- guest channels --------------------------------------------------------------

    def open_channel(self, name: str) -> ChannelStream:
        """A byte stream to the guest's virtio-serial channel *name*, through libvirt.

        Through libvirt, not the socket file: the channel's socket lives on whichever host
        runs the guest, and libvirt's connection is the only way ptmig reaches other hosts.
        FORCE takes over a stream another client holds (a crashed coordinator's, or a
        second client of this process), but only after the previous stream stayed for a
        grace period (host/hypervisor/qemu.py: FORCE against a stream being closed
        deadlocks libvirtd 11.3).  Two processes must not take it from each other in a
        loop, so the ptmig processes of a host take turns (host/agent_client/turns.py).
        """
        try:
            return open_channel(self._dom, name)
        except libvirt.libvirtError as exc:
            raise wrap(f"{self.uri}: open channel {name} of {self.name}", exc) from exc

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
        try:
            monitor_command(self._dom, "announce-self", arguments)
        except libvirt.libvirtError as exc:
            raise wrap(f"{self.uri}: announce-self for {self.name}", exc) from exc
