"""Dataclasses that say where each field lives in XML: one declaration reads and writes.

In the spirit of virt-manager's ``XMLProperty``: a model's fields are declared with
their place in the element (``at("source/@bridge")``, ``each("forward/address",
codec=PCI)``, ``child("primary", PrimaryDevice)``), and :func:`read` and :func:`build`
both walk those declarations, so the attribute list of an element is written down
once.  Class variables complete a model:

- ``XML_TAG``: the element's name; ``XML_NS``: prefixes of the namespaces its paths
  use (``"ptmig:pool"``).  A step without a prefix matches an element in no namespace
  or in one of the model's, as libvirt namespaces only a metadata element's root.
- ``XML_FIXED``: attributes with one value (``hostdev/@mode``), written by
  :func:`build` and required by :func:`matches` (``XML_IMPLIED``: the value an absent
  one has).
- ``XML_STRICT``: the paths of elements ptmig owns (``"."`` is the model's own): an
  attribute or child element there that no field declares is refused, so a misspelt
  ``mac-policy`` cannot fall back to a default.  Elements libvirt owns are read
  leniently (libvirt adds what it likes).
- ``XML_LABEL``: the field that names an element in error messages.
- ``XML_ORDER``: the order of the root's children when built.

Values are read as text and handed to the dataclass, whose ``__post_init__`` (or the
field's ``check``) validates them; every error is a DomainModelError.
"""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from host.domain.addresses import pci_attributes, pci_from_element
from host.domain.errors import DomainModelError, shown
from host.domain.xmltree import check_attributes, split_tag

_KEY = "ptmig.xml"
_REQUIRED: Any = dataclasses.MISSING

M = TypeVar("M")
Check = Callable[[str, str], object]  # (value, where) -> the value to store


class Codec(Protocol):
    """How a value that is a whole element (text, a PCI address) reads and writes."""

    def read(self, element: ET.Element, where: str) -> object: ...

    def write(self, value: Any, element: ET.Element) -> None: ...


class _Text:
    def read(self, element: ET.Element, where: str) -> object:
        return (element.text or "").strip()

    def write(self, value: Any, element: ET.Element) -> None:
        element.text = str(value)


class _Pci:
    """libvirt's ``<address domain= bus= slot= function=/>``, with or without type.

    `absent` is the type an address without one has; `other` what an address of
    another type (``drive``, ``virtio-serial``) reads as: None, or refused.
    """

    def __init__(self, *, with_type: bool, absent: str | None = "pci", refuse_other: bool) -> None:
        self.with_type = with_type
        self.absent = absent
        self.refuse_other = refuse_other

    def read(self, element: ET.Element, where: str) -> object:
        if element.get("type", self.absent) != "pci" and not self.refuse_other:
            return None
        return pci_from_element(element, where)

    def write(self, value: Any, element: ET.Element) -> None:
        element.attrib.update(pci_attributes(str(value), with_type=self.with_type))


TEXT: Codec = _Text()
#: A network's ``<forward><address type='pci'>``.
PCI: Codec = _Pci(with_type=True, refuse_other=True)
#: A device's guest address: only ``type='pci'`` is one the agent can look for.
GUEST_PCI: Codec = _Pci(with_type=True, absent=None, refuse_other=False)
#: A hostdev's ``<source><address>`` (no type there: libvirt's schema refuses one).
HOST_PCI: Codec = _Pci(with_type=False, refuse_other=True)
#: An interface's ``<source><address>``: a PCI one for type hostdev, else not ours.  Written
#: with ``type='pci'``: libvirt refuses one without ("unknown host device source address
#: type '(null)'", libvirt 11.3 attaching an ``<interface type='hostdev'>``).
SOURCE_PCI: Codec = _Pci(with_type=True, refuse_other=False)


@dataclass(frozen=True)
class _Place:
    steps: tuple[str, ...]  # element steps below the model's element
    attribute: str | None  # the attribute at the last step; None: the element itself
    codec: Codec | None = None
    model: type | None = None  # a nested model
    many: bool = False
    check: Check | None = None
    limit: int | None = None
    required: bool = False
    show: Callable[[Any], str] = str  # a field's value as the attribute's text


def _parse_path(path: str) -> tuple[tuple[str, ...], str | None]:
    parts = tuple(p for p in path.split("/") if p not in ("", "."))
    if parts and parts[-1].startswith("@"):
        return parts[:-1], parts[-1][1:]
    return parts, None


def at(
    path: str,
    *,
    default: Any = _REQUIRED,
    check: Check | None = None,
    codec: Codec | None = None,
    show: Callable[[Any], str] = str,
) -> Any:
    """A field at `path`: ``"@name"``, ``"source/@bridge"``, or an element with `codec`.

    Without a default it is required when reading.  `check` validates what is read,
    `show` turns the field's value into the attribute's text.
    """
    steps, attribute = _parse_path(path)
    if attribute is None and codec is None:
        codec = TEXT
    required = default is _REQUIRED
    place = _Place(steps, attribute, codec, check=check, required=required, show=show)
    return dataclasses.field(default=default, metadata={_KEY: place})


def each(
    path: str, *, check: Check | None = None, codec: Codec | None = None, limit: int | None = None
) -> Any:
    """A tuple field: one value per element at `path` (its attribute, or its codec's)."""
    steps, attribute = _parse_path(path)
    place = _Place(steps, attribute, codec, many=True, check=check, limit=limit)
    return dataclasses.field(default=(), metadata={_KEY: place})


def child(path: str, model: type, *, many: bool = False, limit: int | None = None) -> Any:
    """A nested model at `path` (None when absent), or with `many` a tuple of them."""
    steps, _ = _parse_path(path)
    place = _Place(steps, None, model=model, many=many, limit=limit)
    return dataclasses.field(default=() if many else None, metadata={_KEY: place})


def _places(cls: type) -> Iterator[tuple[str, _Place]]:
    for f in dataclasses.fields(cls):
        place = f.metadata.get(_KEY)
        if place is not None:
            yield f.name, place


def _conf(cls: type, name: str, default: Any = None) -> Any:
    """A model's class variable (``XML_TAG``...), or `default`."""
    return getattr(cls, name, default)


def _namespaces(cls: type) -> Mapping[str, str]:
    namespaces: Mapping[str, str] = _conf(cls, "XML_NS", {})
    return namespaces


def _step_matches(element: ET.Element, step: str, ns: Mapping[str, str]) -> bool:
    namespace, local = split_tag(element)
    prefix, _, name = step.rpartition(":")
    if prefix:
        return (namespace, local) == (ns[prefix], name)
    return local == name and (namespace == "" or namespace in ns.values())


def _children(element: ET.Element) -> list[ET.Element]:
    return [c for c in element if isinstance(c.tag, str)]


def _find_all(
    element: ET.Element, steps: tuple[str, ...], ns: Mapping[str, str]
) -> list[ET.Element]:
    """Elements at `steps` below `element`: the first match of each step but the last."""
    for step in steps[:-1]:
        found = [c for c in _children(element) if _step_matches(c, step, ns)]
        if not found:
            return []
        element = found[0]
    if not steps:
        return [element]
    return [c for c in _children(element) if _step_matches(c, steps[-1], ns)]


def _find(element: ET.Element, steps: tuple[str, ...], ns: Mapping[str, str]) -> ET.Element | None:
    found = _find_all(element, steps, ns)
    return found[0] if found else None


def value_at(element: ET.Element, path: str, ns: Mapping[str, str] | None = None) -> str | None:
    """The attribute at `path` (``"forward/@mode"``) of an already parsed element."""
    steps, attribute = _parse_path(path)
    found = _find(element, steps, ns or {})
    if found is None:
        return None
    return found.get(attribute) if attribute is not None else (found.text or "").strip()


def matches(cls: type, element: ET.Element) -> bool:
    """Whether `element` has every fixed attribute of `cls` (its kind of device); an
    absent one counts as its value in ``XML_IMPLIED`` (libvirt's default), if any."""
    implied = _conf(cls, "XML_IMPLIED", {})
    ns = _namespaces(cls)
    for path, value in _conf(cls, "XML_FIXED", {}).items():
        found = value_at(element, path, ns)
        if (found if found is not None else implied.get(path)) != value:
            return False
    return True


def read(cls: type[M], element: ET.Element, where: str) -> M:
    """The model `cls` of `element`, every declared field read, owned elements checked.

    `where` names the element in error messages, e.g. ``domain 'vm1': interface 'net0'``.
    """
    return _read(cls, element, where, None)


def _where_of(cls: type, element: ET.Element, where: str) -> str:
    """`where` followed by the element's kind and its label (``interface 'net0'``)."""
    tag = _conf(cls, "XML_TAG").rpartition(":")[2]
    label = _conf(cls, "XML_LABEL", None)
    if label is None:
        return f"{where}: {tag}"
    value = _read_one(element, dict(_places(cls))[label], _namespaces(cls), where, raw=True)
    return f"{where}: {tag} {shown(value)}"


def _read(cls: type[M], element: ET.Element, where: str, outer: Mapping[str, str] | None) -> M:
    """`outer`: the namespaces of the model this one is nested in (None: not nested)."""
    nested = outer is not None
    ns = {**(outer or {}), **_namespaces(cls)}
    tag = _conf(cls, "XML_TAG")
    _expect(element, tag, ns, where)
    if nested or _conf(cls, "XML_LABEL", None) is not None:
        where = _where_of(cls, element, where)
    for path in _conf(cls, "XML_STRICT", ()):
        steps, _ = _parse_path(path)
        for owned in _find_all(element, steps, ns):
            _check_owned(cls, steps, owned, ns, where)
    values = {name: _read_one(element, place, ns, where) for name, place in _places(cls)}
    try:
        return cls(**values)
    except TypeError as err:  # pragma: no cover - a declaration error
        raise DomainModelError(f"{where}: {err}") from None


def _read_one(
    element: ET.Element, place: _Place, ns: Mapping[str, str], where: str, *, raw: bool = False
) -> Any:
    if place.many:
        found = _find_all(element, place.steps, ns)
        if place.limit is not None and len(found) > place.limit:
            raise DomainModelError(f"{where}: more than {place.limit} entries")
        return tuple(_value(e, place, ns, where) for e in found)
    found_one = _find(element, place.steps, ns)
    if found_one is None or (
        place.attribute is not None and place.attribute not in found_one.attrib
    ):
        if place.required and not raw:
            if place.attribute is None or (found_one is None and place.steps):
                raise DomainModelError(f"{where}: no <{'><'.join(place.steps)}>")
            raise DomainModelError(f"{where}: missing attribute {place.attribute}")
        return None
    if raw:
        return found_one.get(place.attribute) if place.attribute else None
    return _value(found_one, place, ns, where)


def _value(element: ET.Element, place: _Place, ns: Mapping[str, str], where: str) -> Any:
    if place.model is not None:
        return _read(place.model, element, where, ns)
    if place.codec is not None:
        value: Any = place.codec.read(element, f"{where}: {element.tag}")
    else:
        assert place.attribute is not None
        value = element.get(place.attribute)
        if value is None:
            raise DomainModelError(f"{where}: <{element.tag}> without {place.attribute}")
    label = place.attribute or "/".join(place.steps)
    return place.check(value, f"{where}: {label}") if place.check is not None else value


def _expect(element: ET.Element, tag: str, ns: Mapping[str, str], where: str) -> None:
    namespace, local = split_tag(element)
    if namespace and namespace not in ns.values() and ":" not in tag:
        want = ", ".join(ns.values()) or "no namespace"
        raise DomainModelError(
            f"{where}: element {shown(local)} is in namespace {shown(namespace)}, not {want}"
        )
    if not _step_matches(element, tag, ns):
        raise DomainModelError(f"{where}: expected <{tag}>, found {shown(local)}")


def _check_owned(
    cls: type, steps: tuple[str, ...], element: ET.Element, ns: Mapping[str, str], where: str
) -> None:
    """Refuse what no declaration of `cls` puts in the owned element at `steps`."""
    n = len(steps)
    attributes: set[str] = set()
    children: dict[str, bool] = {}  # child step -> may repeat
    for path in _conf(cls, "XML_FIXED", {}):
        fixed_steps, attribute = _parse_path(path)
        if fixed_steps == steps and attribute:
            attributes.add(attribute)
    for _, place in _places(cls):
        if place.steps[:n] != steps:
            continue
        if len(place.steps) == n:
            if place.attribute is not None:
                attributes.add(place.attribute)
        else:
            last = len(place.steps) == n + 1
            children[place.steps[n]] = children.get(place.steps[n], False) or (place.many and last)
    check_attributes(element, attributes, where if not steps else f"{where}: <{steps[-1]}>")
    seen: set[str] = set()
    for c in _children(element):
        step = next((s for s in children if _step_matches(c, s, ns)), None)
        if step is None:
            namespace, local = split_tag(c)
            if namespace and namespace not in ns.values():
                raise DomainModelError(
                    f"{where}: element {shown(local)} is in namespace {shown(namespace)}, "
                    f"not {', '.join(ns.values()) or 'no namespace'}"
                )
            if len(children) == 1:
                raise DomainModelError(
                    f"{where}: expected <{next(iter(children))}>, found {shown(local)}"
                )
            raise DomainModelError(f"{where}: unexpected child element {shown(local)}")
        if step in seen and not children[step]:
            raise DomainModelError(f"{where}: more than one child element <{step}>")
        seen.add(step)


def build(
    obj: object, *, tag: str | None = None, prefixes: Mapping[str, str] | None = None
) -> ET.Element:
    """The element of model `obj`: fixed attributes, then each field that is not None.

    `tag` overrides the model's (``"ptmig:teams"``); `prefixes` maps each prefix a tag
    uses to its namespace, declared on the element that first uses it.
    """
    cls = type(obj)
    ns = {**_namespaces(cls), **(prefixes or {})}
    root = _new(None, tag or _conf(cls, "XML_TAG"), ns)
    for path, value in _conf(cls, "XML_FIXED", {}).items():
        steps, attribute = _parse_path(path)
        assert attribute is not None
        _ensure(root, steps, ns).set(attribute, value)
    for name, place in _places(cls):
        value = getattr(obj, name)
        if value is None or (place.many and not value):
            continue
        for item in value if place.many else (value,):
            parent = _ensure(root, place.steps[:-1], ns) if place.steps else root
            if place.many or place.model is not None:
                target = _new(parent, place.steps[-1], ns)
            else:
                target = _ensure(root, place.steps, ns)
            if place.model is not None:
                nested = build(item, tag=place.steps[-1])
                target.attrib.update(nested.attrib)
                target.extend(list(nested))
            elif place.codec is not None:
                place.codec.write(item, target)
            else:
                assert place.attribute is not None
                target.set(place.attribute, place.show(item))
    order = _conf(cls, "XML_ORDER", ())
    if order:
        ranked = sorted(
            _children(root), key=lambda c: order.index(c.tag) if c.tag in order else len(order)
        )
        root[:] = ranked
    return root


def write_field(cls: type, element: ET.Element, name: str, value: Any) -> None:
    """Set field `name` of model `cls` in `element`, an element libvirt wrote and ptmig
    otherwise keeps as it is (a hostdev's source address rewritten for a destination)."""
    place = dict(_places(cls))[name]
    ns = _namespaces(cls)
    target = _find(element, place.steps, ns) or _ensure(element, place.steps, ns)
    if place.codec is not None:
        target.attrib.clear()
        place.codec.write(value, target)
    else:
        assert place.attribute is not None
        target.set(place.attribute, place.show(value))


def _new(parent: ET.Element | None, step: str, ns: Mapping[str, str]) -> ET.Element:
    """An element for `step`; a prefixed one carries its namespace declaration."""
    prefix = step.partition(":")[0] if ":" in step else None
    attrs = {f"xmlns:{prefix}": ns[prefix]} if prefix else {}
    if parent is None:
        return ET.Element(step, attrs)
    return ET.SubElement(parent, step, attrs)


def _ensure(root: ET.Element, steps: tuple[str, ...], ns: Mapping[str, str]) -> ET.Element:
    element = root
    for step in steps:
        found = next((c for c in element if c.tag == step), None)
        element = found if found is not None else _new(element, step, ns)
    return element
