"""The workflow lease: which coordinator acts on a domain, in the domain's own metadata.

Journals are per coordinator (a local SQLite file), so two coordinators on two hosts
could each open a workflow on one domain.  The lease is the one record they all see,
because it lives where the domain lives and travels with it on migration::

    <lease xmlns="https://ptmig.dev/xmlns/lease/1" workflow="UUID" kind="migrate"
           holder="hosta.example" machine="MACHINE-ID" boot="BOOT-ID" pid="1234"
           start="98765" expires="1764640000.5"/>

`holder` and `machine` name the coordinator's machine, `boot`, `pid` and `start` its
process (as the journal records owners), `expires` is epoch seconds.  How it is taken,
renewed and released is host/workflow/lease.py; this module only reads and writes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from host.domain.errors import DomainModelError, shown
from host.domain.xmlmodel import at, build, read
from host.domain.xmltree import metadata_element, parse_xml, to_text

LEASE_NS = "https://ptmig.dev/xmlns/lease/1"
LEASE_PREFIX = "ptmig-lease"


def _number(kind: type[int] | type[float]) -> Callable[[str, str], object]:
    def check(value: str, where: str) -> object:
        try:
            return kind(value)
        except ValueError:
            raise DomainModelError(f"{where}: {shown(value)} is not a number") from None

    return check


def _start(value: str, where: str) -> int | None:
    """The owner's start time; "" (written by ptmig before 0.3) is unknown."""
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise DomainModelError(f"{where}: {shown(value)} is not a number") from None


@dataclass(frozen=True, kw_only=True)
class Lease:
    """``<lease>``, each attribute declared once (host/domain/xmlmodel.py)."""

    XML_TAG: ClassVar[str] = "lease"
    XML_NS: ClassVar[dict[str, str]] = {"lease": LEASE_NS}
    XML_STRICT: ClassVar[tuple[str, ...]] = (".",)

    workflow: str = at("@workflow", default="")
    kind: str = at("@kind", default="")
    holder: str = at("@holder", default="")  # the coordinator's host name, for people
    machine: str = at("@machine", default="")  # /etc/machine-id of its machine ("" unknown)
    boot: str = at("@boot", default="")  # its boot id ("" if unknown)
    pid: int = at("@pid", check=_number(int))
    start: int | None = at("@start", default=None, check=_start)  # /proc/PID/stat field 22
    expires: float = at(  # epoch seconds
        "@expires",
        check=_number(float),
        show=lambda v: repr(float(v)),
    )

    def __post_init__(self) -> None:
        if not self.workflow:
            raise DomainModelError("lease: empty workflow id")
        if self.pid < 0:
            raise DomainModelError(f"lease: pid {self.pid} is negative")
        if not math.isfinite(self.expires):
            raise DomainModelError(f"lease: expires {self.expires} is not a time")

    def describe(self) -> str:
        return f"{self.kind} workflow {self.workflow} of pid {self.pid} on {self.holder or '?'}"


def format_lease(lease: Lease) -> str:
    """The ``<lease>`` element for virDomainSetMetadata (no namespace: libvirt adds it)."""
    return to_text(build(lease))


def lease_from_domain_xml(domain_xml: str) -> Lease | None:
    """The domain's lease, None if it has none.  A lease that cannot be read is an
    error, not "free": a garbled record must not let a second coordinator in."""
    root = parse_xml(domain_xml, "domain XML")
    found = metadata_element(root, LEASE_NS, "lease", "domain XML", "ptmig lease")
    return read(Lease, found, "ptmig lease") if found is not None else None
