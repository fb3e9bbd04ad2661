"""libvirt's migration options as ptmig takes them, and what a migration job did: shared by
the workflow, which asks, host/hypervisor/, which tells libvirt, and host/migration_job.py,
which watches the job."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from host.errors import Category, PtmigError


class CopyStorage(enum.StrEnum):
    """Which non-shared disks libvirt copies with the memory (virsh's --copy-storage-*)."""

    NONE = ""  # disks are shared between the hosts
    ALL = "all"  # VIR_MIGRATE_NON_SHARED_DISK: the whole disk
    INCREMENTAL = "inc"  # VIR_MIGRATE_NON_SHARED_INC: what the backing image does not hold


#: libvirt's own bound for parallel migration connections (qemuMigrationParams).
MAX_PARALLEL_CONNECTIONS = 255


class InvalidMigrationOptions(PtmigError, ValueError):
    """A migration option is out of range or contradicts another; nothing was started."""

    category = Category.INVALID


#: QEMU's default downtime limit, which libvirt leaves as it is.
QEMU_DOWNTIME_MS = 300
#: ptmig's: the limit for the first passes, and how many passes it holds before the
#: limit goes back to QEMU's, so a guest that dirties memory too fast for it still
#: converges as it would with libvirt's defaults, a few passes later.
TUNED_DOWNTIME_MS = 50
DOWNTIME_BUDGET_PASSES = 5


@dataclass(frozen=True)
class MigrationOptions:
    """libvirt's migration options that virsh users know, for one migration job.

    Validated when built, so a face refuses a bad combination before any workflow starts
    (libvirt and QEMU would refuse it only once the VM's primaries were unplugged).
    """

    #: VIR_MIGRATE_TLS: the migration stream (and an NBD storage copy) over TLS; the hosts
    #: need libvirt's migrate_tls_x509 certificates (docs/operator-guide.md).
    tls: bool = False
    copy_storage: CopyStorage = CopyStorage.NONE
    #: VIR_MIGRATE_PARAM_MIGRATE_DISKS: copy only these disks (targets: "vdb"), leaving
    #: the others to shared storage; empty = every non-shared, writable disk.
    migrate_disks: tuple[str, ...] = ()
    #: VIR_MIGRATE_PARAM_BANDWIDTH in MiB/s; None = libvirt's default (unlimited).
    bandwidth_mib_s: int | None = None
    #: VIR_MIGRATE_AUTO_CONVERGE: throttle the vCPUs of a guest that dirties memory faster
    #: than it is sent.
    auto_converge: bool = False
    #: VIR_MIGRATE_POSTCOPY, switched to (virDomainMigrateStartPostCopy) by the progress
    #: watcher.  Safe for ptmig: the primaries are unplugged before the VM moves, so only
    #: virtio state travels.
    postcopy: bool = False
    #: When to switch: None = once the first pre-copy pass has ended (virsh's
    #: --postcopy-after-precopy); S = after S seconds of pre-copy, or earlier once the job
    #: stalls (a pass that ends with no less left to send than the one before).
    postcopy_after_s: float | None = None
    #: VIR_MIGRATE_PARALLEL with this many connections; None = one stream.
    parallel_connections: int | None = None
    #: libvirt's own downtime limit (QEMU's 300 ms) instead of ptmig's budget: 50 ms for
    #: the first passes, then 300 (host/migration_job.py DowntimeBudget).  Measured in the
    #: lab: the budget's virtio-only guest lost 0.36x the packets of libvirt's defaults.
    libvirt_defaults: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.copy_storage, CopyStorage):
            try:
                object.__setattr__(self, "copy_storage", CopyStorage(self.copy_storage))
            except ValueError:
                raise InvalidMigrationOptions(
                    f"copy storage {self.copy_storage!r}: must be one of "
                    + ", ".join(repr(c.value) for c in CopyStorage)
                ) from None
        object.__setattr__(self, "migrate_disks", tuple(self.migrate_disks))
        if self.migrate_disks and self.copy_storage is CopyStorage.NONE:
            # libvirt: "use of 'VIR_MIGRATE_PARAM_MIGRATE_DISKS' requires use of
            # 'VIR_MIGRATE_NON_SHARED_DISK' or 'VIR_MIGRATE_NON_SHARED_INC' flag"
            raise InvalidMigrationOptions("migrate disks needs copy storage (all or inc)")
        for target in self.migrate_disks:
            if not target or not target.isprintable() or "," in target or " " in target:
                raise InvalidMigrationOptions(f"migrate disks: {target!r} is not a disk target")
        if self.bandwidth_mib_s is not None and not 1 <= self.bandwidth_mib_s <= 1 << 20:
            raise InvalidMigrationOptions(
                f"bandwidth {self.bandwidth_mib_s} MiB/s: must be 1..{1 << 20}"
            )
        if self.postcopy_after_s is not None:
            if not self.postcopy:
                raise InvalidMigrationOptions("post-copy after a time needs post-copy on")
            if not 0 <= self.postcopy_after_s <= 86400:
                raise InvalidMigrationOptions(
                    f"post-copy after {self.postcopy_after_s} s: must be 0..86400"
                )
        if self.parallel_connections is not None and not (
            2 <= self.parallel_connections <= MAX_PARALLEL_CONNECTIONS
        ):
            raise InvalidMigrationOptions(
                f"parallel connections {self.parallel_connections}: must be "
                f"2..{MAX_PARALLEL_CONNECTIONS}"
            )
        if self.postcopy and self.parallel_connections is not None:
            # QEMU up to 10.0 (the lab's, Debian's) refuses the postcopy-ram capability
            # with multifd: "Postcopy is not yet compatible with multifd".
            raise InvalidMigrationOptions(
                "post-copy and parallel connections together: QEMU (10.0 and older) "
                "refuses post-copy with multifd"
            )


@dataclass(frozen=True)
class MigrationStats:
    """What the migration job did, from the destination's record of the completed job
    (virDomainGetJobStats) and what the progress watcher saw; one field per option used,
    so the report shows each was applied.  None where libvirt said nothing."""

    wall_s: float
    downtime_ms: int | None = None
    elapsed_ms: int | None = None
    data_total: int | None = None  # memory bytes
    iterations: int | None = None  # pre-copy passes
    tls: bool = False
    #: QEMU's migration parameter tls-creds seen during the job (query-migrate-parameters):
    #: the TLS object libvirt made, "" when none was seen.
    tls_creds: str = ""
    copy_storage: CopyStorage = CopyStorage.NONE
    disk_total: int | None = None  # bytes of storage copied (NBD), when copy_storage
    disk_processed: int | None = None
    migrate_disks: tuple[str, ...] = ()  # the disks asked to be copied (empty: all)
    bandwidth_mib_s: int | None = None  # the cap asked for
    memory_bps: int | None = None  # the memory transfer rate libvirt measured, bytes/s
    auto_converge: bool = False
    #: The highest vCPU throttle libvirt reported (auto_converge_throttle, %).
    auto_converge_throttle_pct: int | None = None
    postcopy: bool = False  # enabled for the job
    postcopy_started: bool = False  # the job switched to post-copy
    postcopy_started_after_s: float | None = None  # seconds into the job
    postcopy_reason: str = ""  # "first pass ended", "stalled", "after 5 s"
    parallel_connections: int | None = None
    #: The downtime limit the job started with (None: QEMU's default, 300 ms), and the
    #: pass from which a budget relaxed it to 300 (None: it converged within the budget).
    max_downtime_ms: int | None = None
    downtime_relaxed_at_pass: int | None = None
    #: QEMU's migration capabilities enabled during the job (query-migrate-capabilities:
    #: "auto-converge", "multifd", "postcopy-ram", ...), and its multifd-channels, read
    #: once while the job ran: what QEMU was really told, not what was asked.
    qemu_capabilities: tuple[str, ...] = ()
    multifd_channels: int | None = None

    @property
    def detail(self) -> str:
        """One line for the migrate phase of the per-phase report."""
        downtime = "?" if self.downtime_ms is None else self.downtime_ms
        parts = [f"downtime {downtime} ms"]
        if self.max_downtime_ms is not None:
            relaxed = self.downtime_relaxed_at_pass
            parts[0] += f" (limit {self.max_downtime_ms} ms" + (
                f", {QEMU_DOWNTIME_MS} from pass {relaxed})" if relaxed is not None else ")"
            )
        if self.tls:
            parts.append(f"tls ({self.tls_creds or 'no creds seen'})")
        if self.copy_storage is not CopyStorage.NONE:
            disk = "?" if self.disk_total is None else f"{self.disk_total >> 20} MiB"
            parts.append(f"copy-storage-{self.copy_storage} {disk}")
        if self.bandwidth_mib_s is not None:
            rate = (
                "" if self.memory_bps is None else f", ran at {self.memory_bps / 2**20:.1f} MiB/s"
            )
            parts.append(f"bandwidth {self.bandwidth_mib_s} MiB/s{rate}")
        if self.auto_converge:
            throttle = self.auto_converge_throttle_pct
            parts.append(f"auto-converge (throttle {0 if throttle is None else throttle}%)")
        if self.postcopy:
            parts.append(
                f"post-copy at {self.postcopy_started_after_s:.1f} s ({self.postcopy_reason})"
                if self.postcopy_started and self.postcopy_started_after_s is not None
                else "post-copy not needed"
            )
        if self.parallel_connections is not None:
            parts.append(f"{self.parallel_connections} connections")
        return ", ".join(parts)
