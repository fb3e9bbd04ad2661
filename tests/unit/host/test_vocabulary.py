"""The host's one vocabulary: each word declared once, the wider enums built from it."""

from __future__ import annotations

from host.domain.kinds import MacPolicy, PoolKind
from host.domain.teams import MAC_POLICIES, PrimaryDevice
from host.workflow.guest import BindResult
from host.workflow.model import EvacuationOutcome, Outcome, TeamMode, team_modes


def test_an_evacuation_outcome_is_every_workflow_outcome_and_three_more() -> None:
    workflow = {str(o) for o in Outcome}
    evacuation = {str(o) for o in EvacuationOutcome}
    assert workflow <= evacuation
    assert evacuation - workflow == {"skipped", "migrated-plain", "not-started"}
    assert all(EvacuationOutcome(str(o)) == o for o in Outcome)


def test_a_primary_kind_read_from_metadata_is_the_pool_kind() -> None:
    primary = PrimaryDevice("pci", "ua-ptmig-lan-0", pci_address="0000:03:00.0")  # type: ignore[arg-type]
    assert primary.kind is PoolKind.PCI


def test_mac_policies_are_listed_in_the_enum_order() -> None:
    assert MAC_POLICIES == ("preserve", "follow", "none")
    assert [MacPolicy(p) for p in MAC_POLICIES] == list(MacPolicy)


def test_a_bind_result_keeps_the_journal_form() -> None:
    bound = BindResult("lan", TeamMode.PRIMARY, device="enp2s0", alias="ua-ptmig-lan-1")
    left = BindResult("wan", TeamMode.STANDBY, "no free device")
    assert bound.journal() == {
        "team": "lan",
        "result": "primary",
        "device": "enp2s0",
        "alias": "ua-ptmig-lan-1",
    }
    assert left.journal() == {"team": "wan", "result": "standby", "detail": "no free device"}


def test_team_modes_from_the_active_members() -> None:
    assert team_modes({"lan": True, "wan": False}) == {
        "lan": TeamMode.PRIMARY,
        "wan": TeamMode.STANDBY,
    }
