"""Property tests of the host's validation of agent replies (host.agent_client).

A guest is not trusted: whatever a reply holds, validate_state / validate_team
either accept it, and then every name and address the host will log or show is
well-formed and printable, or raise AgentError("PROTOCOL") with a printable
one-line message; never another exception.  Replies are a real agent's reply
with fields mutated to hostile values.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from ptmig.v1 import guest_agent_pb2 as pb

from host.agent_client import MAX_LINKS, MAX_TEAMS, AgentError, validate_state, validate_team

MAC = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}")
PCI = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]")


def sample_state() -> Any:
    """What the agent answers for a guest with one team (see tests/unit/guest_agent)."""
    return pb.GetStateResponse(
        links=[
            pb.Link(name="lo", index=1, operstate="UNKNOWN", admin_up=True),
            pb.Link(
                name="enp1s0",
                index=2,
                mac="52:54:00:aa:00:01",
                permanent_mac="52:54:00:aa:00:01",
                carrier=True,
                operstate="UP",
                admin_up=True,
                master="bond0",
                pci_address="0000:01:00.0",
            ),
            pb.Link(
                name="enp2s0",
                index=3,
                mac="52:54:00:bb:00:01",
                permanent_mac="52:54:00:bb:00:01",
                carrier=True,
                operstate="UP",
                admin_up=True,
                master="bond0",
                pci_address="0000:02:00.0",
            ),
            pb.Link(
                name="bond0",
                index=4,
                mac="52:54:00:bb:00:01",
                carrier=True,
                operstate="UP",
                admin_up=True,
                kind="bond",
            ),
        ],
        teams=[
            pb.TeamState(
                name="lan",
                bond="bond0",
                bond_present=True,
                mac_policy=pb.MAC_POLICY_PRESERVE,
                ownership=pb.OWNERSHIP_ADMIN,
                mac="52:54:00:bb:00:01",
                fail_over_mac="none",
                active_member="enp2s0",
                standby="enp1s0",
                members=["enp1s0", "enp2s0"],
                primary="enp2s0",
            ),
        ],
    )


HOSTILE = st.one_of(
    st.sampled_from(
        [
            "",
            "eth0",
            "bond0",
            "a" * 15,
            "a" * 16,
            "a b",
            "a/b",
            "a:b",
            "lan",
            "52:54:00:AA:00:01",
            "52:54:00:aa:00:01",
            "52:54:00:aa:00:1",
            "0000:01:00.0",
            "01:00.0",
            "0000:01:00.8",
            "\x1b[2J",
            "e\u200bth0",
            "x" * 5000,
        ]
    ),
    st.text(max_size=20),
    st.text(st.characters(min_codepoint=0, max_codepoint=0x9F), max_size=6),
)
LINK_FIELDS = ["name", "mac", "permanent_mac", "master", "kind", "operstate", "pci_address"]
TEAM_FIELDS = ["name", "bond", "mac", "fail_over_mac", "active_member", "standby", "primary"]


@st.composite
def mutated_state(draw: st.DrawFn) -> Any:
    state = sample_state()
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["link", "team", "member", "dup-link", "dup-team", "many"]))
        if op == "link" and state.links:
            link = state.links[draw(st.integers(0, len(state.links) - 1))]
            setattr(link, draw(st.sampled_from(LINK_FIELDS)), draw(HOSTILE))
        elif op == "team" and state.teams:
            team = state.teams[draw(st.integers(0, len(state.teams) - 1))]
            setattr(team, draw(st.sampled_from(TEAM_FIELDS)), draw(HOSTILE))
        elif op == "member" and state.teams:
            state.teams[0].members.append(draw(HOSTILE))
        elif op == "dup-link" and state.links:
            state.links.add().CopyFrom(state.links[0])
        elif op == "dup-team" and state.teams:
            state.teams.add().CopyFrom(state.teams[0])
        elif op == "many":
            which = draw(st.sampled_from(["links", "teams", "members"]))
            count = draw(st.sampled_from([MAX_LINKS, MAX_LINKS + 1, MAX_TEAMS + 1, 9]))
            if which == "links":
                for n in range(count - len(state.links)):
                    state.links.add(name=f"veth{n}")
            elif which == "teams":
                for n in range(count - len(state.teams)):
                    state.teams.add(name=f"t{n}", bond=f"bond{n}")
            elif state.teams:
                state.teams[0].members.extend(f"m{n}" for n in range(count))
    return state


def _accepted_mac(mac: str) -> bool:
    # removesuffix: see test_a_mac_with_a_trailing_newline_is_refused (a known gap).
    return mac == "" or bool(MAC.fullmatch(mac.removesuffix("\n")))


def _accepted_pci(pci: str) -> bool:
    return pci == "" or bool(PCI.fullmatch(pci.removesuffix("\n")))


def _name_ok(name: str, empty_ok: bool = True) -> bool:
    return (empty_ok and name == "") or (
        name.isprintable() and 1 <= len(name) <= 15 and not any(c in " /:" for c in name)
    )


def _check_team(team: Any) -> None:
    assert team.name and team.name.isprintable()
    assert _name_ok(team.bond, empty_ok=False)
    assert _accepted_mac(team.mac)
    for member in (team.active_member, team.standby, team.primary, *team.members):
        assert _name_ok(member)


@settings(max_examples=400)
@given(mutated_state())
@example(pb.GetStateResponse(links=[pb.Link(name="eth0\n")]))
def test_any_state_reply_is_valid_or_a_protocol_error(state: Any) -> None:
    try:
        validate_state(state)
    except AgentError as exc:
        assert exc.code == "PROTOCOL"
        assert str(exc).isprintable() and len(str(exc)) < 500
        return
    assert len(state.links) <= MAX_LINKS and len(state.teams) <= MAX_TEAMS
    for link in state.links:
        assert _name_ok(link.name, empty_ok=False)
        assert _accepted_mac(link.mac) and _accepted_mac(link.permanent_mac)
        assert _accepted_pci(link.pci_address)
    assert len({t.name for t in state.teams}) == len(state.teams)
    for team in state.teams:
        _check_team(team)


@settings(max_examples=200)
@given(mutated_state())
def test_any_team_in_a_reply_is_valid_or_a_protocol_error(state: Any) -> None:
    for team in state.teams:
        try:
            validate_team(team)
        except AgentError as exc:
            assert exc.code == "PROTOCOL" and str(exc).isprintable()
            continue
        _check_team(team)


@pytest.mark.parametrize("field", ["mac", "pci_address"])
def test_a_mac_with_a_trailing_newline_is_refused(field: str) -> None:
    state = sample_state()
    setattr(state.links[1], field, getattr(state.links[1], field) + "\n")
    with pytest.raises(AgentError):
        validate_state(state)
