"""Edits of a libvirt network's XML that ptmig makes before defining it (no libvirt here:
the Hypervisor asks libvirt and calls these)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable

from host.domain.xmltree import parse_xml_keeping_prefixes, to_text_as_read


def keep_network_uuid(xml: str, existing_uuid: Callable[[str], str | None]) -> str:
    """*xml* with the UUID libvirt has for a network of its name (*existing_uuid*, None
    for none), where it names none: libvirt redefines a network only under its existing
    UUID.  The document's prefixes and comments are kept as written."""
    root, declared = parse_xml_keeping_prefixes(xml, "network XML")
    if root.find("uuid") is not None:
        return xml
    uuid = existing_uuid(root.findtext("name") or "")
    if uuid is None:
        return xml
    element = ET.Element("uuid")
    element.text = uuid
    root.insert(1, element)
    return to_text_as_read(root, declared)
