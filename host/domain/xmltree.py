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
from collections.abc import Iterable, Iterator
from typing import Any

from host.domain.errors import DomainModelError, shown

MAX_XML_CHARS = 4 * 1024 * 1024  # a domain with hundreds of devices is ~100 KiB
MAX_DEPTH = 64  # libvirt's own XML nests fewer than 10 levels


class _Refused(Exception):
    """Raised inside expat callbacks to stop at the first forbidden construct."""


def parse_xml(text: object, what: str, *, max_chars: int = MAX_XML_CHARS) -> ET.Element:
    """Parse `text` into an element tree or raise DomainModelError naming `what`."""
    data = _checked(text, what, max_chars)
    try:
        return ET.fromstring(data)
    except (ET.ParseError, ValueError, LookupError) as err:  # pragma: no cover - prescan
        raise DomainModelError(f"{what}: not well-formed XML ({err})") from None


#: The namespace declarations (prefix, namespace) written on each element of a tree.
Declarations = dict[ET.Element, list[tuple[str, str]]]


def parse_xml_keeping_prefixes(
    text: object, what: str, *, max_chars: int = MAX_XML_CHARS
) -> tuple[ET.Element, Declarations]:
    """Like `parse_xml`, keeping comments and where each namespace prefix was declared,
    for `to_text_as_read`."""
    data = _checked(text, what, max_chars)
    declared: Declarations = {}
    pending: list[tuple[str, str]] = []
    root: ET.Element | None = None
    builder = ET.XMLParser(target=ET.TreeBuilder(insert_comments=True))
    parser = ET.XMLPullParser(("start-ns", "start"), _parser=builder)
    try:
        parser.feed(data)
        parser.close()
        events: Iterator[Any] = parser.read_events()
        for event, item in events:
            if event == "start-ns":
                pending.append(item)  # (prefix, namespace), for the element that follows
            else:
                element: ET.Element = item
                root = element if root is None else root
                if pending:
                    declared[element], pending = pending, []
    except (ET.ParseError, ValueError, LookupError) as err:  # pragma: no cover - prescan
        raise DomainModelError(f"{what}: not well-formed XML ({err})") from None
    if root is None:  # pragma: no cover - prescan refuses a document without elements
        raise DomainModelError(f"{what}: no element")
    return root, declared


def to_text_as_read(root: ET.Element, declared: Declarations) -> str:
    """Serialise a tree of `parse_xml_keeping_prefixes` with its namespace prefixes
    declared where they were (ElementTree alone would rename them ns0, ns1...) and its
    whitespace as it was."""
    return ET.tostring(_as_read(root, declared, {}), encoding="unicode")


def _as_read(element: ET.Element, declared: Declarations, scope: dict[str, str]) -> ET.Element:
    """A copy of `element` whose ``{namespace}name`` tags and attributes are spelt
    ``prefix:name``, with the declarations it was read with."""
    if not isinstance(element.tag, str):  # a comment or processing instruction
        out = ET.Element(element.tag)
        out.text, out.tail = element.text, element.tail
        return out
    declare = {
        (f"xmlns:{prefix}" if prefix else "xmlns"): namespace
        for prefix, namespace in declared.get(element, [])
    }
    scope = {**scope, **{ns: p for p, ns in declared.get(element, [])}}

    def spelt(name: str) -> str:
        if not name.startswith("{"):
            return name
        namespace, _, local = name[1:].partition("}")
        if namespace not in scope:  # not declared in what was read: declare it here
            scope[namespace] = f"ns{len(scope)}"
            declare[f"xmlns:{scope[namespace]}"] = namespace
        prefix = scope[namespace]
        return f"{prefix}:{local}" if prefix else local

    tag = spelt(element.tag)
    attrib = {spelt(k): v for k, v in element.attrib.items()}
    out = ET.Element(tag, {**declare, **attrib})
    out.text, out.tail = element.text, element.tail
    out.extend(_as_read(c, declared, scope) for c in element)
    return out


def _checked(text: object, what: str, max_chars: int) -> bytes:
    """`text` as UTF-8, once it passed the size, DOCTYPE and depth checks."""
    if not isinstance(text, str):
        raise DomainModelError(f"{what}: want XML text, got {type(text).__name__}")
    if len(text) > max_chars:
        raise DomainModelError(f"{what}: {len(text)} characters is more than {max_chars}")
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise DomainModelError(f"{what}: not encodable as UTF-8 ({err.reason})") from None
    _prescan(data, what)
    return data


def _prescan(data: bytes, what: str) -> dict[str, str]:
    """Check well-formedness, refuse DOCTYPE/entity declarations, limit depth; return
    the prefix of each namespace declared (the first one, for a namespace declared twice).

    Runs before ElementTree sees the bytes: expat calls the DOCTYPE handler at
    ``<!DOCTYPE`` before it reads any entity definition, so nothing is expanded.
    """
    parser = xml.parsers.expat.ParserCreate()
    parser.SetParamEntityParsing(xml.parsers.expat.XML_PARAM_ENTITY_PARSING_NEVER)
    depth = 0
    prefixes: dict[str, str] = {}

    def refuse_doctype(*_args: object) -> None:
        raise _Refused("a DOCTYPE is not allowed")

    def refuse_entity(*_args: object) -> None:
        raise _Refused("entity declarations are not allowed")

    def start(_name: str, attrs: dict[str, str]) -> None:
        nonlocal depth
        depth += 1
        for name, value in attrs.items():
            if name == "xmlns" or name.startswith("xmlns:"):
                prefixes.setdefault(value, name[6:])
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
    return prefixes


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


def metadata_element(
    root: ET.Element, namespace: str, tag: str, where: str, what: str
) -> ET.Element | None:
    """The domain's one ``<metadata>`` child *tag* in *namespace* (ptmig's teams, its
    lease), None if it has none; two are an error (*what* names them in it)."""
    metadata = root.find("metadata")
    if metadata is None:
        return None
    found = [child for child in metadata if split_tag(child) == (namespace, tag)]
    if len(found) > 1:
        raise DomainModelError(f"{where}: more than one {what} in <metadata>")
    return found[0] if found else None
