"""Hypothesis strategies that mutate valid XML samples into near-valid hostile input.

A mutation is one of: drop an element, duplicate one, rename one, set an attribute
to a bad value (empty, huge, unicode, control characters, a value valid elsewhere),
drop or add an attribute, replace an element's text, or wrap the document.  Several
mutations are applied in turn, so most outputs stay close to what libvirt writes and
reach the parser's deeper checks instead of failing at the first byte.
"""

from __future__ import annotations

import copy
import xml.etree.ElementTree as ET

from hypothesis import strategies as st

# Values valid somewhere in ptmig's XML: used out of place they test the checks.
NEAR_VALID = [
    "",
    " ",
    "0",
    "0x0",
    "0x1f",
    "0x20",
    "0xffff",
    "0x10000",
    "-1",
    "1e3",
    "7",
    "8",
    "³",  # a digit to str.isdigit(), not to int()
    "٣",  # Arabic-Indic three
    "pci",
    "usb",
    "yes",
    "no",
    "auto",
    "bridge",
    "network",
    "hostdev",
    "virtio",
    "e1000e",
    "emulated",
    "vf-network",
    "preserve",
    "follow",
    "none",
    "52:54:00:00:01:01",
    "52:54:00:00:01:0",
    "53:54:00:00:01:01",
    "00:00:00:00:00:00",
    "52-54-00-00-01-01",
    "0000:03:00.0",
    "03:00.0",
    "0000:03:20.0",
    "ua-ptmig-lan-1",
    "ua-",
    "hostdev0",
    "ptmig-pool-lab",
    "org.ptmig.agent.0",
    "a" * 16,
    "lan\n",
    "lan\x7f",
    "\u202e",
]


def nasty_text() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(NEAR_VALID),
        st.text(max_size=24),
        st.text(st.characters(min_codepoint=0, max_codepoint=0x1F), max_size=4),
        st.sampled_from(["9" * 4096, "x" * 70_000]),
    )


NAMES = st.sampled_from(
    [
        "name",
        "type",
        "mode",
        "address",
        "alias",
        "mac",
        "source",
        "target",
        "model",
        "team",
        "primary",
        "kind",
        "dev",
        "tap",
        "pool",
        "slot",
        "device",
        "cid",
        "bogus",
    ]
)


def _elements(root: ET.Element) -> list[tuple[ET.Element | None, ET.Element]]:
    """(parent, element) for every element, the root with parent None."""
    out: list[tuple[ET.Element | None, ET.Element]] = [(None, root)]
    for parent in root.iter():
        out.extend((parent, child) for child in parent)
    return out


@st.composite
def mutated_xml(draw: st.DrawFn, samples: list[str], max_mutations: int = 4) -> str:
    """One of `samples`, parsed, changed by 0..max_mutations mutations, serialised."""
    root = ET.fromstring(draw(st.sampled_from(samples)))
    for _ in range(draw(st.integers(0, max_mutations))):
        elements = _elements(root)
        parent, element = draw(st.sampled_from(elements))
        op = draw(
            st.sampled_from(
                ["drop", "duplicate", "rename", "set", "unset", "text", "wrap", "add-child"]
            )
        )
        if op == "drop" and parent is not None:
            parent.remove(element)
        elif op == "duplicate" and parent is not None:
            parent.append(copy.deepcopy(element))
        elif op == "rename":
            element.tag = draw(NAMES)
        elif op == "set":
            names = [*element.attrib, "bogus"]
            element.set(draw(st.sampled_from(names) | NAMES), draw(nasty_text()))
        elif op == "unset" and element.attrib:
            del element.attrib[draw(st.sampled_from(sorted(element.attrib)))]
        elif op == "text":
            element.text = draw(nasty_text())
        elif op == "wrap":
            wrapper = ET.Element(draw(NAMES))
            wrapper.append(root)
            root = wrapper
        elif op == "add-child":
            ET.SubElement(element, draw(NAMES), {draw(NAMES): draw(nasty_text())})
    text = ET.tostring(root, encoding="unicode")
    if draw(st.integers(0, 9)) == 0:  # and now and then a textual cut or splice
        cut = draw(st.integers(0, len(text)))
        text = text[:cut] + draw(st.sampled_from(["", "<", "&", "]]>", "<!DOCTYPE x>", "\x00"]))
    return text
