"""Safe parsing of XML that may come from anywhere, and small ElementTree helpers.

Domain XML, its metadata and network XML are written by libvirt, but whoever may
define a domain or network can put anything in them; the parsers treat every
input as hostile.  ElementTree does not fetch
external entities but does expand internal ones, so a DOCTYPE is refused outright
(libvirt never writes one); a size and a nesting limit keep huge or deep input
from costing memory or recursion later on.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
import xml.parsers.expat
from collections.abc import Iterable

from host.domain.errors import DomainModelError, shown

MAX_XML_CHARS = 4 * 1024 * 1024  # a domain with hundreds of devices is ~100 KiB
MAX_DEPTH = 64  # libvirt's own XML nests fewer than 10 levels


class _Refused(Exception):
    """Raised inside expat callbacks to stop at the first forbidden construct."""


def parse_xml(text: object, what: str, *, max_chars: int = MAX_XML_CHARS) -> ET.Element:
    """Parse `text` into an element tree or raise DomainModelError naming `what`."""
    if not isinstance(text, str):
        raise DomainModelError(f"{what}: want XML text, got {type(text).__name__}")
    if len(text) > max_chars:
        raise DomainModelError(f"{what}: {len(text)} characters is more than {max_chars}")
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise DomainModelError(f"{what}: not encodable as UTF-8 ({err.reason})") from None
    _prescan(data, what)
    try:
        return ET.fromstring(data)
    except (ET.ParseError, ValueError, LookupError) as err:  # pragma: no cover - prescan
        raise DomainModelError(f"{what}: not well-formed XML ({err})") from None


def _prescan(data: bytes, what: str) -> None:
    """Check well-formedness, refuse DOCTYPE/entity declarations, limit depth.

    Runs before ElementTree sees the bytes: expat calls the DOCTYPE handler at
    ``<!DOCTYPE`` before it reads any entity definition, so nothing is expanded.
    """
    parser = xml.parsers.expat.ParserCreate()
    parser.SetParamEntityParsing(xml.parsers.expat.XML_PARAM_ENTITY_PARSING_NEVER)
    depth = 0

    def refuse_doctype(*_args: object) -> None:
        raise _Refused("a DOCTYPE is not allowed")

    def refuse_entity(*_args: object) -> None:
        raise _Refused("entity declarations are not allowed")

    def start(_name: str, _attrs: dict[str, str]) -> None:
        nonlocal depth
        depth += 1
        if depth > MAX_DEPTH:
            raise _Refused(f"elements nest deeper than {MAX_DEPTH} levels")

    def end(_name: str) -> None:
        nonlocal depth
        depth -= 1

    parser.StartDoctypeDeclHandler = refuse_doctype
    parser.EntityDeclHandler = refuse_entity
    parser.UnparsedEntityDeclHandler = refuse_entity
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    try:
        parser.Parse(data, True)
    except _Refused as err:
        raise DomainModelError(f"{what}: {err}") from None
    except (xml.parsers.expat.ExpatError, ValueError, LookupError) as err:
        raise DomainModelError(f"{what}: not well-formed XML ({err})") from None


def split_tag(element: ET.Element) -> tuple[str, str]:
    """(namespace, local name) of `element`; the namespace is "" for none."""
    tag = element.tag
    if not isinstance(tag, str):  # comments and processing instructions
        return "", ""
    if tag.startswith("{"):
        namespace, _, local = tag[1:].partition("}")
        return namespace, local
    return "", tag


def check_attributes(element: ET.Element, allowed: Iterable[str], where: str) -> None:
    """Refuse attributes outside `allowed`: a misspelt one must not be ignored."""
    unknown = sorted(set(element.attrib) - set(allowed))
    if unknown:
        raise DomainModelError(f"{where}: unknown attribute {shown(unknown[0])}")


def to_text(element: ET.Element) -> str:
    """Serialise `element` (no XML declaration), indented for people to read."""
    ET.indent(element)
    return ET.tostring(element, encoding="unicode")
