"""Domain: libvirt domain XML, ptmig's team metadata and device pools, as models.

Pure XML: nothing here talks to libvirt (the Hypervisor does).  Every parser
takes untrusted text and raises only DomainModelError for anything it cannot use.

- xmlmodel: the declarations every model below reads and builds its XML from
- teams: `Team`/`TeamSet` metadata, `format_teams` (read by `parse_domain`)
- domain_xml: `parse_domain` (interfaces, hostdevs, team metadata),
  `strip_primary` for the persistent XML sent to a destination
- devices: the device XML to attach on a destination, per pool kind
- pools: pools as ``ptmig-pool-<name>`` libvirt networks, `free_slots`
"""

from host.domain.errors import DomainModelError

__all__ = ["DomainModelError"]
