"""The only package that talks to libvirt (and libvirt-qemu).

Everything the coordinator asks of a host goes through :class:`Hypervisor` (a connection:
domains by name, every domain's XML, the pool networks) and of a domain through its
:class:`Domain` (a virDomain bound to its Hypervisor, as nova's ``Guest``): XML and
metadata, device attach and detach with a real wait, live migration with progress and its
statistics, the agent's channel and QMP ``announce-self``.  Errors leave as
:class:`HypervisorError` with libvirt's message, as the subclass of the caller's category
(``errors.libvirt_error``, the one translation of libvirt's codes).

Why the waits are event-driven: ``virDomainDetachDeviceAlias`` returns as soon as QEMU has
*asked* the guest to release the device; only libvirt's DEVICE_REMOVED event means it is
gone, and DEVICE_REMOVAL_FAILED that the guest refused.  A guest that never answers gets
neither, so every wait has a deadline.

Its modules: ``connection`` (:class:`Hypervisor`), ``domain`` (:class:`Domain`),
``migration_call`` (the flags and parameters of the migration call), ``qemu`` (the
channel stream and the QEMU monitor), ``events`` (libvirt's event loop), ``errors``.
"""

from host.hypervisor.connection import Hypervisor
from host.hypervisor.domain import Domain
from host.hypervisor.errors import (
    DeviceRemovalError,
    DomainNotFound,
    HostDenied,
    HostRefused,
    HostTimedOut,
    HostUnreachable,
    HypervisorError,
    InvalidURI,
    NetworkNotFound,
    PostcopyFailed,
    libvirt_error,
)
from host.hypervisor.migration_call import MIGRATE_FLAGS, migration_call
from host.hypervisor.qemu import ChannelStream

__all__ = [
    "MIGRATE_FLAGS",
    "ChannelStream",
    "DeviceRemovalError",
    "Domain",
    "DomainNotFound",
    "HostDenied",
    "HostRefused",
    "HostTimedOut",
    "HostUnreachable",
    "Hypervisor",
    "HypervisorError",
    "InvalidURI",
    "NetworkNotFound",
    "PostcopyFailed",
    "libvirt_error",
    "migration_call",
]
