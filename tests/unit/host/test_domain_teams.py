"""Team metadata: round trips, validation, hostile input, and libvirt's test driver."""

from __future__ import annotations

import contextlib
import dataclasses
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Any

import pytest
from domain_samples import STANDBY_MAC, TEAMS, minimal_domain, virt_xml_validate
from hypothesis import given, settings
from hypothesis import strategies as st

from host.domain import DomainModelError
from host.domain.domain_xml import parse_domain
from host.domain.teams import (
    MAC_POLICIES,
    TEAMS_NS,
    TEAMS_PREFIX,
    PrimaryDevice,
    Team,
    TeamSet,
    format_teams,
    teams_from_element,
)
from host.domain.xmltree import parse_xml


def parse_teams(xml: str) -> TeamSet:
    """The teams element as virDomainGetMetadata returns it (or namespaced, as in a domain)."""
    return teams_from_element(parse_xml(xml, "teams metadata"))


EMULATED = PrimaryDevice("emulated", "ua-ptmig-lan-1", mac="52:54:00:a0:00:01", tap="ptmig-lab-0")


def team(**changes: object) -> Team:
    base = Team(name="lan", standby_mac=STANDBY_MAC, mac_policy="preserve", pool="lab")
    return dataclasses.replace(base, **changes)


# --- round trips -------------------------------------------------------------


@pytest.mark.parametrize(
    "teams",
    [
        TeamSet(),
        TeamSet((team(),)),
        TeamSet((team(primary=EMULATED, team_mac="52:54:00:bb:00:01"),)),
        TEAMS,
        TeamSet(
            (
                team(
                    mac_policy="follow",
                    primary=PrimaryDevice("pci", "ua-p", pci_address="01:00.0"),
                ),
                team(
                    name="wan",
                    standby_mac="52:54:00:00:09:09",
                    mac_policy="none",
                    primary=PrimaryDevice(
                        "vf-network",
                        "ua-ptmig-wan-2",
                        mac="52:54:00:00:09:09",
                        network="ptmig-pool-sriov",
                        pci_address="0000:05:10.2",
                    ),
                ),
            )
        ),
    ],
)
def test_round_trip(teams: TeamSet) -> None:
    xml = format_teams(teams)
    assert parse_teams(xml) == teams
    assert parse_teams(format_teams(teams, namespaced=True)) == teams


def test_format_is_the_element_setmetadata_takes() -> None:
    root = ET.fromstring(format_teams(TeamSet((team(primary=EMULATED),))))
    assert root.tag == "teams"  # no namespace: libvirt adds TEAMS_NS itself
    [element] = list(root)
    assert element.attrib == {
        "name": "lan",
        "pool": "lab",
        "mac-policy": "preserve",
        "standby-mac": STANDBY_MAC,
    }
    assert element[0].attrib == {
        "kind": "emulated",
        "alias": "ua-ptmig-lan-1",
        "mac": "52:54:00:a0:00:01",
        "tap": "ptmig-lab-0",
    }


def test_values_are_normalised() -> None:
    primary = PrimaryDevice("pci", "hostdev0", pci_address="03:00.0")
    t = team(standby_mac="52:54:00:AB:CD:EF", primary=primary)
    assert t.standby_mac == "52:54:00:ab:cd:ef"
    assert t.primary is not None and t.primary.pci_address == "0000:03:00.0"


def test_children_in_the_namespace_are_accepted() -> None:
    xml = (
        f'<p:teams xmlns:p="{TEAMS_NS}"><p:team name="lan" pool="lab" mac-policy="none" '
        f'standby-mac="{STANDBY_MAC}"><p:primary kind="pci" alias="hostdev0" '
        'pci-address="0000:03:00.0"/></p:team></p:teams>'
    )
    [t] = parse_teams(xml).teams
    assert t.primary == PrimaryDevice("pci", "hostdev0", pci_address="0000:03:00.0")


def test_team_set_helpers() -> None:
    teams = TeamSet((team(),))
    plugged = teams.with_team(teams.team("lan").with_primary(EMULATED))
    assert plugged.team("lan").primary == EMULATED
    assert teams.team("lan").primary is None  # frozen: the old set is unchanged
    wan = team(name="wan", standby_mac="52:54:00:00:09:09")
    assert [t.name for t in plugged.with_team(wan).teams] == ["lan", "wan"]
    with pytest.raises(DomainModelError, match="no team named 'nope'"):
        teams.team("nope")


# --- validation ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: team(standby_mac="52:54:00:00:01"), "malformed MAC address"),
        (lambda: team(standby_mac="01:00:5e:00:00:01"), "multicast"),
        (lambda: team(standby_mac="00:00:00:00:00:00"), "not usable"),
        (lambda: team(mac_policy="sometimes"), "unknown value 'sometimes'"),
        (lambda: team(name="lan/0"), "team name"),
        (lambda: team(name="x" * 33), "team name"),
        (lambda: team(pool=""), "pool"),
        (lambda: team(team_mac="zz"), "team-mac"),
        (lambda: PrimaryDevice("usb", "ua-x"), "unknown value 'usb'"),
        (lambda: PrimaryDevice("pci", "ua-x"), "needs pci-address"),
        (lambda: PrimaryDevice("emulated", "ua-x", mac=STANDBY_MAC), "needs tap"),
        (lambda: PrimaryDevice("vf-network", "ua-x", network="n"), "needs mac"),
        (lambda: PrimaryDevice("pci", "ua-x", pci_address="03:00.0", tap="t"), "has no tap"),
        (lambda: PrimaryDevice("pci", "ua x", pci_address="03:00.0"), "alias"),
        (lambda: PrimaryDevice("pci", "ua-x", pci_address="03:20.0"), "out of range"),
        (lambda: PrimaryDevice("emulated", "ua-x", mac=STANDBY_MAC, tap="t" * 16), "interface"),
        (lambda: TeamSet((team(), team())), "duplicate team name lan"),
        (lambda: TeamSet((team(), team(name="wan"))), "duplicate standby MAC"),
        (
            lambda: TeamSet(
                (
                    team(primary=EMULATED),
                    team(name="wan", standby_mac="52:54:00:00:09:09", primary=EMULATED),
                )
            ),
            "duplicate primary alias",
        ),
    ],
)
def test_models_refuse_bad_values(build: object, message: str) -> None:
    with pytest.raises(DomainModelError, match=message):
        build()


GOOD_TEAM = f'<team name="lan" pool="lab" mac-policy="preserve" standby-mac="{STANDBY_MAC}"/>'


def teams_of(*teams: str) -> str:
    return "<teams>" + "".join(teams) + "</teams>"


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        ("<teams><team/></teams>", "missing attribute"),
        (teams_of(GOOD_TEAM.replace("preserve", "keep")), "unknown value 'keep'"),
        (teams_of(GOOD_TEAM.replace("/>", ' colour="red"/>')), "unknown attribute 'colour'"),
        (teams_of(GOOD_TEAM.replace("mac-policy", "mac_policy")), "unknown attribute"),
        ("<teams><bond/></teams>", "expected <team>"),
        ('<teams version="2"/>', "unknown attribute 'version'"),
        ("<team/>", "expected <teams>"),
        ('<teams xmlns="https://example.com/other"/>', "namespace"),
        (f'<teams xmlns:o="urn:o">{GOOD_TEAM.replace("<team", "<o:team")}</teams>', "namespace"),
        (f"<teams>{GOOD_TEAM}{GOOD_TEAM}</teams>", "duplicate team name"),
        (
            teams_of(GOOD_TEAM.replace("/>", '><primary kind="pci"/></team>')),
            "missing attribute alias",
        ),
        (
            teams_of(
                GOOD_TEAM.replace(
                    "/>",
                    '><primary kind="pci" alias="a" pci-address="01:00.0"/>'
                    '<primary kind="pci" alias="b" pci-address="02:00.0"/></team>',
                )
            ),
            "more than one child",
        ),
    ],
)
def test_parse_refuses_bad_xml(xml: str, message: str) -> None:
    with pytest.raises(DomainModelError, match=message):
        parse_teams(xml)


# --- hostile input --------------------------------------------------------------

BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE teams [
  <!ENTITY a "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa">
  <!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">
  <!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">
  <!ENTITY d "&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;">
  <!ENTITY e "&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;">
  <!ENTITY f "&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;">
]>
<teams><team name="&f;"/></teams>"""


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        (BILLION_LAUGHS, "DOCTYPE"),
        ('<!DOCTYPE t SYSTEM "file:///etc/passwd"><teams/>', "DOCTYPE"),
        ("<!DOCTYPE teams><teams/>", "DOCTYPE"),
        ("<teams>&unknown;</teams>", "well-formed"),
        ("", "well-formed"),
        ("not xml at all", "well-formed"),
        ("<teams>", "well-formed"),
        ("<teams/><teams/>", "well-formed"),
        ("<teams>\ud800</teams>", "UTF-8"),
        ("<a>" * 100 + "</a>" * 100, "nest deeper"),
        (f'<teams><team name="{"x" * 200_000}"/></teams>', "missing attribute|team name"),
        (f'<teams><team standby-mac="{"a" * 200_000}"/></teams>', "missing attribute|MAC"),
        ("<teams>" + " " * (4 << 20) + "</teams>", "characters is more than"),
    ],
)
def test_hostile_xml_is_refused(xml: str, message: str) -> None:
    started = time.monotonic()
    with pytest.raises(DomainModelError, match=message) as caught:
        parse_teams(xml)
    assert time.monotonic() - started < 2
    assert len(str(caught.value)) < 300  # huge values are not echoed back


@pytest.mark.parametrize("value", [None, b"<teams/>", 42])
def test_non_text_is_refused(value: object) -> None:
    with pytest.raises(DomainModelError, match="want XML text"):
        parse_teams(value)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_any_text_gives_teams_or_domain_model_error(text: str) -> None:
    with contextlib.suppress(DomainModelError):
        assert isinstance(parse_teams(text), TeamSet)


_ATTRS = st.dictionaries(
    st.sampled_from(
        [
            "name",
            "pool",
            "mac-policy",
            "standby-mac",
            "team-mac",
            "kind",
            "alias",
            "mac",
            "tap",
            "network",
            "pci-address",
        ]
    ),
    st.one_of(
        st.sampled_from(["lan", "lab", "preserve", "none", STANDBY_MAC, "pci", "03:00.0", "ua-x"]),
        st.text(max_size=20),
    ),
)


@st.composite
def _xmlish(draw: st.DrawFn) -> str:
    teams = ET.Element(draw(st.sampled_from(["teams", "team", "x"])))
    for _ in range(draw(st.integers(0, 3))):
        child = ET.SubElement(teams, draw(st.sampled_from(["team", "primary"])), draw(_ATTRS))
        if draw(st.booleans()):
            ET.SubElement(child, draw(st.sampled_from(["primary", "team"])), draw(_ATTRS))
    return ET.tostring(teams, encoding="unicode")


@settings(max_examples=300, deadline=None)
@given(_xmlish())
def test_any_structured_xml_gives_teams_or_domain_model_error(xml: str) -> None:
    try:
        teams = parse_teams(xml)
    except DomainModelError:
        return
    assert parse_teams(format_teams(teams)) == teams


_MACS = st.integers(0, 0xFFFFFF).map(
    lambda n: "52:54:00:" + ":".join(f"{n:06x}"[i : i + 2] for i in (0, 2, 4))
)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.from_regex(r"[a-z][a-z0-9_-]{0,10}", fullmatch=True),
            _MACS,
            st.sampled_from(MAC_POLICIES),
            st.one_of(st.none(), _MACS),
        ),
        max_size=5,
        unique_by=(lambda t: t[0], lambda t: t[1]),
    )
)
def test_valid_models_round_trip(rows: list[tuple[str, str, str, str | None]]) -> None:
    teams = TeamSet(
        tuple(
            Team(name, mac, policy, "pool", team_mac=team_mac)
            for name, mac, policy, team_mac in rows
        )
    )
    assert parse_teams(format_teams(teams)) == teams


# --- libvirt ---------------------------------------------------------------------


def test_domain_with_team_metadata_validates() -> None:
    virt_xml_validate(minimal_domain(metadata=format_teams(TEAMS, namespaced=True)), "domain")


@pytest.fixture
def test_domain() -> Iterator[tuple[Any, Any]]:
    libvirt = pytest.importorskip("libvirt")
    conn = libvirt.open("test:///default")
    name = f"ptmig-{uuid.uuid4().hex[:8]}"
    dom = conn.defineXML(minimal_domain(name=name, domain_type="test"))
    yield libvirt, dom
    dom.undefine()
    conn.close()


def test_libvirt_stores_and_returns_the_metadata(test_domain: tuple[Any, Any]) -> None:
    libvirt, dom = test_domain
    flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG
    element = libvirt.VIR_DOMAIN_METADATA_ELEMENT
    dom.setMetadata(element, format_teams(TEAMS), TEAMS_PREFIX, TEAMS_NS, flags)

    returned = dom.metadata(element, TEAMS_NS, flags)
    assert parse_teams(returned) == TEAMS
    domain_xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    assert f'<{TEAMS_PREFIX}:teams xmlns:{TEAMS_PREFIX}="{TEAMS_NS}">' in domain_xml
    assert parse_domain(domain_xml).teams == TEAMS

    # Writing again replaces the element; an empty set is still a (empty) record.
    dom.setMetadata(element, format_teams(TeamSet()), TEAMS_PREFIX, TEAMS_NS, flags)
    assert parse_teams(dom.metadata(element, TEAMS_NS, flags)) == TeamSet()


def test_libvirt_refuses_the_namespaced_form(test_domain: tuple[Any, Any]) -> None:
    """Why format_teams writes no namespace by default: libvirt adds the prefix itself."""
    libvirt, dom = test_domain
    with pytest.raises(libvirt.libvirtError, match="namespace"):
        dom.setMetadata(
            libvirt.VIR_DOMAIN_METADATA_ELEMENT,
            format_teams(TEAMS, namespaced=True),
            TEAMS_PREFIX,
            TEAMS_NS,
            libvirt.VIR_DOMAIN_AFFECT_CONFIG,
        )
