"""Property tests of the Domain part over mutated real samples.

The property (host.domain's contract): whatever the text, every parser and every
function over parsed models returns a value or raises DomainModelError, nothing
else; and what is accepted survives a format/parse round trip.  The inputs are
the samples libvirt writes, mutated a few times each (xml_mutations), so that the
deeper checks (addresses, aliases, metadata, pool entries) see hostile values.
"""

from __future__ import annotations

import dataclasses

from domain_samples import INACTIVE_DOMAIN, LIVE_DOMAIN, TEAMS
from hypothesis import given, settings
from hypothesis import strategies as st
from xml_mutations import mutated_xml

from host.domain import DomainModelError
from host.domain.devices import attachment_for_slot, mdev_hostdev_xml, next_primary_alias
from host.domain.domain_xml import DomainInfo, parse_domain, retarget_hostdev, strip_primary
from host.domain.pools import (
    EmulatedPool,
    MdevPool,
    MdevSlot,
    PciPool,
    TapSlot,
    VfNetworkPool,
    format_pool_network,
    free_slots,
    parse_pool_network,
)
from host.domain.teams import PrimaryDevice, TeamSet, format_teams, teams_from_element
from host.domain.xmltree import parse_xml

#: A PCI address no sample uses: strip_primary then matches by alias alone.
_NOWHERE = "ffff:ff:1f.7"
#: The mediated device of the mdev samples, and one no sample holds.
_MDEV = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"
_ELSEWHERE = "83b8f4f2-509f-382f-3c1e-e6bfe0fa10ff"


def strip_alias(domain_xml: str, alias: str) -> str:
    """*domain_xml* without the device called *alias* (strip_primary, matched by alias)."""
    return strip_primary(domain_xml, PrimaryDevice("pci", alias, pci_address=_NOWHERE))


def parse_teams(xml: str) -> TeamSet:
    """The teams element as virDomainGetMetadata returns it (or namespaced, as in a domain)."""
    return teams_from_element(parse_xml(xml, "teams metadata"))


POOL_SAMPLES = [
    format_pool_network(pool)
    for pool in (
        EmulatedPool(
            "lab",
            "ptmigbr0",
            "e1000e",
            (
                TapSlot("ptmig-lab-0", "52:54:00:a0:00:00"),
                TapSlot("ptmig-lab-1", "52:54:00:a0:00:01"),
            ),
        ),
        PciPool("nics", ("0000:04:00.0", "0000:03:00.0")),
        VfNetworkPool("sriov", vf_addresses=("0000:05:10.2", "0000:05:10.3")),
        VfNetworkPool("pf", pf_dev="enp6s0"),
        MdevPool("serial", "mtty-2", (_MDEV, "83b8f4f2-509f-382f-3c1e-e6bfe0fa1002"), True),
    )
]
TEAM_SAMPLES = [format_teams(TEAMS), format_teams(TEAMS, namespaced=True)]
DOMAIN_SAMPLES = [
    LIVE_DOMAIN,
    INACTIVE_DOMAIN,
    LIVE_DOMAIN.replace(
        "</devices>", mdev_hostdev_xml(alias="ua-serial0", uuid=_MDEV) + "</devices>"
    ),
]


@settings(max_examples=400)
@given(mutated_xml(DOMAIN_SAMPLES))
def test_mutated_domain_xml_gives_a_domain_or_domain_model_error(xml: str) -> None:
    try:
        info = parse_domain(xml)
    except DomainModelError:
        return
    assert isinstance(info, DomainInfo)
    for device in (*info.interfaces, *info.hostdevs):
        if device.alias is not None:
            stripped = parse_domain(strip_alias(xml, device.alias))
            assert stripped.device(device.alias) is None
            assert stripped.name == info.name
    for mdev in info.mdevs:
        moved = parse_domain(retarget_hostdev(xml, {mdev.uuid: _ELSEWHERE}))
        assert _ELSEWHERE in [m.uuid for m in moved.mdevs]
        assert (moved.interfaces, moved.hostdevs) == (info.interfaces, info.hostdevs)
    if info.teams is not None:
        assert parse_teams(format_teams(info.teams)) == info.teams
        for team in info.teams.teams:
            if team.primary is not None:
                assert parse_domain(strip_primary(xml, team.primary)).name == info.name
            aliases = [d.alias for d in (*info.interfaces, *info.hostdevs)]
            assert next_primary_alias(team.name, aliases) not in aliases


@settings(max_examples=400)
@given(mutated_xml(TEAM_SAMPLES))
def test_mutated_team_metadata_gives_teams_or_domain_model_error(xml: str) -> None:
    try:
        teams = parse_teams(xml)
    except DomainModelError:
        return
    assert isinstance(teams, TeamSet)
    assert parse_teams(format_teams(teams)) == teams
    assert parse_teams(format_teams(teams, namespaced=True)) == teams


@settings(max_examples=400)
@given(mutated_xml(POOL_SAMPLES), st.lists(mutated_xml(DOMAIN_SAMPLES, 2), max_size=2))
def test_mutated_pool_networks_give_a_pool_or_domain_model_error(
    xml: str, domains: list[str]
) -> None:
    try:
        pool = parse_pool_network(xml)
    except DomainModelError:
        return
    again = parse_pool_network(format_pool_network(pool))
    if isinstance(pool, VfNetworkPool) and pool.pf_dev is not None:
        pool = dataclasses.replace(pool, vf_addresses=())  # libvirt lists VFs only live
    assert again == pool
    try:
        slots = free_slots(pool, domains)
    except DomainModelError:
        return
    for slot in slots:
        if isinstance(slot, MdevSlot):  # no team's primary: carried, never plugged
            continue
        try:
            attachment = attachment_for_slot(
                slot, alias="ua-ptmig-lan-1", vf_mac="52:54:00:00:02:01"
            )
        except DomainModelError:  # pragma: no cover - the pool's values were all checked
            raise AssertionError(f"slot {slot} of an accepted pool cannot be attached") from None
        assert attachment.primary.alias == "ua-ptmig-lan-1"


@settings(max_examples=50)
@given(st.sampled_from([*DOMAIN_SAMPLES, *TEAM_SAMPLES, *POOL_SAMPLES]), st.integers(0, 2000))
def test_truncated_samples_are_refused_cleanly(xml: str, cut: int) -> None:
    xml = xml.rstrip()  # a sample's trailing newline is no part of the document to cut
    text = xml[: min(cut, len(xml) - 1)]
    for parse in (parse_domain, parse_teams, parse_pool_network):
        try:
            parse(text)
        except DomainModelError:
            continue
        raise AssertionError(f"{parse.__name__} accepted a cut document: {text!r}")
