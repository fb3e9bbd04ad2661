"""Checks for the names ptmig writes into libvirt XML.

Team and pool names end up inside device aliases (``ua-ptmig-<team>-<n>``) and
network names (``ptmig-pool-<pool>``), so they are held to the characters both
allow.  Each check returns its argument so that it can be used inline.
"""

from __future__ import annotations

import re

from host.domain.errors import DomainModelError, shown

USER_ALIAS_PREFIX = "ua-"  # libvirt keeps only aliases with this prefix as given

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")
_ALIAS = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # libvirt's aliasName, length capped
_IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")  # IFNAMSIZ - 1, no '/', ':' or spaces
_NETWORK = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")
_MODEL = re.compile(r"[A-Za-z0-9_-]{1,32}")
_MDEV_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # a sysfs mdev_supported_types entry


def check_name(value: object, where: str) -> str:
    """A team or pool name: 1-32 of [A-Za-z0-9_-], not starting with - or _."""
    return _check(_NAME, value, where, "a name of 1-32 letters, digits, '_' or '-'")


def check_alias(value: object, where: str) -> str:
    """A device alias as libvirt reports it (``net0``, ``hostdev1``, ``ua-...``)."""
    return _check(_ALIAS, value, where, "a libvirt device alias")


def check_user_alias(value: object, where: str) -> str:
    """An alias ptmig may give a device: libvirt drops those without ``ua-``."""
    alias = check_alias(value, where)
    if not alias.startswith(USER_ALIAS_PREFIX) or alias == USER_ALIAS_PREFIX:
        raise DomainModelError(f"{where}: user alias {shown(alias)} must start with 'ua-'")
    return alias


def check_ifname(value: object, where: str) -> str:
    """A host interface (tap, bridge, PF) name the kernel accepts."""
    return _check(_IFNAME, value, where, "an interface name of at most 15 characters")


def check_network_name(value: object, where: str) -> str:
    """A libvirt network name."""
    return _check(_NETWORK, value, where, "a libvirt network name")


def check_model(value: object, where: str) -> str:
    """A QEMU NIC model such as e1000e or virtio."""
    return _check(_MODEL, value, where, "a NIC model such as e1000e")


def check_mdev_type(value: object, where: str) -> str:
    """A mediated device type as sysfs names it (``mtty-2``, ``nvidia-35``)."""
    return _check(_MDEV_TYPE, value, where, "an mdev type such as mtty-2")


def _check(pattern: re.Pattern[str], value: object, where: str, want: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise DomainModelError(f"{where}: {shown(value)} is not {want}")
    return value
