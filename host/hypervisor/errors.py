"""How libvirt's failures leave this package: :class:`HypervisorError` with libvirt's
message and code, and the two a workflow tells apart."""

from __future__ import annotations

import libvirt

from host.errors import PtmigError


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


def wrap(what: str, exc: libvirt.libvirtError) -> HypervisorError:
    return HypervisorError(f"{what}: {exc.get_error_message()}", exc.get_error_code())
