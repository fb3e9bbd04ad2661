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
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from host.domain.errors import DomainModelError, shown
from host.domain.xmltree import check_attributes, parse_xml, split_tag

LEASE_NS = "https://ptmig.dev/xmlns/lease/1"
LEASE_PREFIX = "ptmig-lease"
_ATTRIBUTES = ("workflow", "kind", "holder", "machine", "boot", "pid", "start", "expires")


@dataclass(frozen=True)
class Lease:
    workflow: str
    kind: str
    holder: str  # the coordinator's host name, for people
    machine: str  # /etc/machine-id of the coordinator's machine ("" if unknown)
    boot: str  # its boot id ("" if unknown)
    pid: int
    start: int | None  # /proc/PID/stat field 22
    expires: float

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
    root = ET.Element(
        "lease",
        {
            "workflow": lease.workflow,
            "kind": lease.kind,
            "holder": lease.holder,
            "machine": lease.machine,
            "boot": lease.boot,
            "pid": str(lease.pid),
            "start": "" if lease.start is None else str(lease.start),
            "expires": repr(float(lease.expires)),
        },
    )
    return ET.tostring(root, encoding="unicode")


def lease_from_domain_xml(domain_xml: str) -> Lease | None:
    """The domain's lease, None if it has none.  A lease that cannot be read is an
    error, not "free": a garbled record must not let a second coordinator in."""
    root = parse_xml(domain_xml, "domain XML")
    metadata = root.find("metadata")
    if metadata is None:
        return None
    found = [child for child in metadata if split_tag(child) == (LEASE_NS, "lease")]
    if not found:
        return None
    if len(found) > 1:
        raise DomainModelError("domain XML: more than one ptmig lease in <metadata>")
    return lease_from_element(found[0])


def lease_from_element(element: ET.Element) -> Lease:
    where = "ptmig lease"
    check_attributes(element, _ATTRIBUTES, where)
    get = element.attrib.get
    try:
        pid = int(get("pid", ""))
        start_text = get("start", "")
        start = int(start_text) if start_text else None
        expires = float(get("expires", ""))
    except ValueError:
        raise DomainModelError(
            f"{where}: bad pid, start or expires in {shown(element.attrib)}"
        ) from None
    return Lease(
        workflow=get("workflow", ""),
        kind=get("kind", ""),
        holder=get("holder", ""),
        machine=get("machine", ""),
        boot=get("boot", ""),
        pid=pid,
        start=start,
        expires=expires,
    )
