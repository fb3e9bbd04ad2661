"""How libvirt's failures leave this package: :class:`HypervisorError` with libvirt's
message and code, translated here, once, into the subclass that says the caller's
category (:func:`libvirt_error`: no such domain, the host cannot be reached, the domain's
state forbids it, ...), and the two a workflow tells apart."""

from __future__ import annotations

import libvirt

from host.errors import Category, PtmigError


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


class DomainNotFound(HypervisorError, LookupError):
    """libvirt has no domain of that name or UUID on this host."""

    category = Category.NOT_FOUND
    hint = "'virsh -c URI list --all' lists the domains there"


class NetworkNotFound(HypervisorError, LookupError):
    """libvirt has no network (pool definition) of that name on this host."""

    category = Category.NOT_FOUND


class InvalidURI(HypervisorError, ValueError):
    """libvirt cannot parse the connection URI."""

    category = Category.INVALID


class HostUnreachable(HypervisorError):
    """The host's libvirtd cannot be reached, or the connection to it broke."""

    category = Category.UNREACHABLE
    hint = "check the URI and that libvirtd runs there ('virsh -c URI version')"


class HostDenied(HypervisorError):
    """libvirt refused ptmig's credentials or the operation (authentication, ACLs)."""

    category = Category.DENIED


class HostRefused(HypervisorError):
    """libvirt refused the operation in the domain's current state (not running, a job
    in progress)."""

    category = Category.REFUSED


class HostTimedOut(HypervisorError):
    """libvirt or QEMU did not complete the operation in time."""

    category = Category.TIMED_OUT


_BY_CODE: dict[int, type[HypervisorError]] = {
    libvirt.VIR_ERR_NO_DOMAIN: DomainNotFound,
    libvirt.VIR_ERR_NO_NETWORK: NetworkNotFound,
    libvirt.VIR_ERR_OPERATION_INVALID: HostRefused,
    libvirt.VIR_ERR_NO_CONNECT: HostUnreachable,
    libvirt.VIR_ERR_INVALID_CONN: HostUnreachable,
    libvirt.VIR_ERR_RPC: HostUnreachable,
    libvirt.VIR_ERR_AUTH_FAILED: HostDenied,
    libvirt.VIR_ERR_ACCESS_DENIED: HostDenied,
    libvirt.VIR_ERR_OPERATION_DENIED: HostDenied,
    libvirt.VIR_ERR_OPERATION_TIMEOUT: HostTimedOut,
    libvirt.VIR_ERR_AGENT_UNRESPONSIVE: HostTimedOut,
}
#: libvirt's error domains of the connection itself (a "system error" there is a socket's).
_CONNECTION_DOMAINS = frozenset({libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE})
_AUTH_CODES = frozenset(
    {libvirt.VIR_ERR_AUTH_FAILED, libvirt.VIR_ERR_ACCESS_DENIED, libvirt.VIR_ERR_AUTH_CANCELLED}
)


def libvirt_error(
    message: str, code: int | None, error_domain: int | None = None, *, connecting: bool = False
) -> HypervisorError:
    """The error ptmig raises for a libvirt error: the one translation of libvirt's codes
    into categories (also used by the unit tests' fake libvirt).  *connecting*: the error
    came from opening the connection, where anything but a bad URI or bad credentials
    means the host cannot be reached."""
    if connecting:
        if error_domain == libvirt.VIR_FROM_URI:  # libvirt calls its parse error internal
            return InvalidURI(message.replace("internal error: ", "malformed URI: ", 1), code)
        cls: type[HypervisorError] = HostDenied if code in _AUTH_CODES else HostUnreachable
        return cls(message, code)
    if code is None:
        return HypervisorError(message, code)
    if error_domain in _CONNECTION_DOMAINS and code in (
        libvirt.VIR_ERR_SYSTEM_ERROR,
        libvirt.VIR_ERR_INTERNAL_ERROR,
    ):
        return HostUnreachable(message, code)
    return _BY_CODE.get(code, HypervisorError)(message, code)


def wrap(what: str, exc: libvirt.libvirtError, *, connecting: bool = False) -> HypervisorError:
    return libvirt_error(
        f"{what}: {exc.get_error_message()}",
        exc.get_error_code(),
        exc.get_error_domain(),
        connecting=connecting,
    )
