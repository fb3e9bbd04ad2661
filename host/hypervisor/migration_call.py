"""What libvirt's virDomainMigrateToURI3 is given for a migration's options: every
option is a flag or a typed parameter here, nowhere else."""

from __future__ import annotations

from typing import Any

import libvirt

from host.migration_options import CopyStorage, MigrationOptions

MIGRATE_FLAGS = (
    libvirt.VIR_MIGRATE_LIVE
    | libvirt.VIR_MIGRATE_PEER2PEER
    | libvirt.VIR_MIGRATE_PERSIST_DEST
    | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
)
#: A source paused in or after post-copy (libvirt 1.3.3 and 8.5 added them).
POSTCOPY_PAUSED = (
    libvirt.VIR_DOMAIN_PAUSED_POSTCOPY,
    getattr(libvirt, "VIR_DOMAIN_PAUSED_POSTCOPY_FAILED", 13),
)
_COPY_STORAGE_FLAGS = {
    CopyStorage.NONE: 0,
    CopyStorage.ALL: libvirt.VIR_MIGRATE_NON_SHARED_DISK,
    CopyStorage.INCREMENTAL: libvirt.VIR_MIGRATE_NON_SHARED_INC,
}


def migration_call(
    options: MigrationOptions,
    *,
    persistent_xml: str,
    unsafe: bool = False,
    destination_xml: str | None = None,
) -> tuple[int, dict[str, Any]]:
    """The flags and typed parameters virDomainMigrateToURI3 gets for *options*: every
    option is a flag or a parameter here, nowhere else.  *destination_xml*: the running
    domain as the destination is to start it (a state-copied device's destination
    address), from the source's migratable XML."""
    flags = MIGRATE_FLAGS
    params: dict[str, Any] = {libvirt.VIR_MIGRATE_PARAM_PERSIST_XML: persistent_xml}
    if destination_xml is not None:
        params[libvirt.VIR_MIGRATE_PARAM_DEST_XML] = destination_xml
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
