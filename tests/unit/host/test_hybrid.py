"""The hybrid path's decisions (host/workflow/hybrid.py) and the XML they need: which
team keeps its primary plugged while QEMU copies its state, which switches, and why."""

from __future__ import annotations

import pytest
from domain_samples import INACTIVE_DOMAIN, LIVE_DOMAIN

from host.domain import DomainModelError
from host.domain.domain_xml import parse_domain, retarget_hostdev
from host.domain.kinds import PoolKind
from host.domain.pools import EmulatedPool, PciPool, format_pool_network, parse_pool_network
from host.domain.teams import PrimaryDevice, Team
from host.workflow.hybrid import (
    Candidate,
    Forced,
    TeamWay,
    Way,
    _with_host_address,
    choose_ways,
    kept,
    lasting_blockers,
    still_blocked,
)

SRC_NIC = "0000:03:00.0"


def _team(name: str, pool: str = "nics") -> Team:
    return Team(name, "52:54:00:aa:00:01", "preserve", pool)


def _pci(alias: str = "ua-ptmig-lan-1", address: str = SRC_NIC) -> PrimaryDevice:
    return PrimaryDevice(PoolKind.PCI, alias, pci_address=address)


def _pool(copy: bool | None = True, *addresses: str) -> PciPool:
    return PciPool("nics", addresses or (SRC_NIC,), state_copy=copy)


def _lan(**kw: object) -> Candidate:
    args: dict[str, object] = {
        "team": _team("lan"),
        "device": _pci(),
        "source_pool": _pool(),
        "destination_pool": _pool(True, "0000:05:00.0"),
    }
    args.update(kw)
    return Candidate(**args)  # type: ignore[arg-type]


FREE = {"nics": ["0000:05:00.0"]}


def test_a_marked_pool_with_no_blocker_and_a_free_destination_device_copies_state() -> None:
    ways = choose_ways([_lan()], blockers=[], destination_free=FREE)
    assert ways["lan"].way is Way.COPY
    assert ways["lan"].destination == "0000:05:00.0"
    assert "0000:05:00.0" in ways["lan"].reason
    assert kept(ways) == ["lan"]


@pytest.mark.parametrize(
    ("candidate", "why"),
    [
        (_lan(source_pool=_pool(None)), "not marked state-copy"),
        (_lan(source_pool=_pool(False)), "not marked state-copy"),
        (_lan(destination_pool=_pool(None, "0000:05:00.0")), "on the destination"),
        (_lan(destination_pool=None), "on the destination"),
        (_lan(device=None), "no primary plugged"),
        (
            _lan(
                device=PrimaryDevice(PoolKind.EMULATED, "ua-x", mac="52:54:00:ba:00:01", tap="t0"),
                source_pool=EmulatedPool("nics", "br0", "e1000e"),
            ),
            "not a pci pool",
        ),
    ],
)
def test_without_the_pools_word_on_both_hosts_a_team_switches(
    candidate: Candidate, why: str
) -> None:
    ways = choose_ways([candidate], blockers=[], destination_free=FREE)
    assert ways["lan"].way is Way.SWITCH
    assert why in ways["lan"].reason


def test_the_operator_forces_the_switch_of_every_team() -> None:
    ways = choose_ways([_lan()], blockers=[], destination_free=FREE, forced=Forced(every=True))
    assert ways["lan"] == TeamWay(Way.SWITCH, "forced by the operator, for every team")


def test_the_operator_forces_the_switch_of_one_team_and_the_other_keeps_its_copy() -> None:
    san = _lan(team=_team("san"), device=_pci("ua-ptmig-san-1", "0000:03:00.1"))
    free = {"nics": ["0000:05:00.0", "0000:05:00.1"]}
    ways = choose_ways(
        [_lan(), san], blockers=[], destination_free=free, forced=Forced(teams=frozenset({"lan"}))
    )
    assert ways["lan"] == TeamWay(Way.SWITCH, "forced by the operator, for this team")
    assert ways["san"].way is Way.COPY
    # lan's device is not taken from the destination's pool for a copy that will not happen
    assert ways["san"].destination == "0000:05:00.0"


def test_a_blocker_naming_a_forced_teams_device_does_not_stop_the_others_copy() -> None:
    san = _lan(team=_team("san"), device=_pci("ua-ptmig-san-1", "0000:03:00.1"))
    blocker = f"{SRC_NIC}: VFIO migration is not supported in kernel"
    forced = Forced(teams=frozenset({"lan"}))
    ways = choose_ways([_lan(), san], blockers=[blocker], destination_free=FREE, forced=forced)
    assert ways["san"].way is Way.COPY
    assert ways["lan"].reason == "forced by the operator, for this team"


def test_a_blocker_that_names_the_device_switches_it() -> None:
    reason = f"{SRC_NIC}: VFIO migration is not supported in kernel"
    ways = choose_ways([_lan()], blockers=[reason], destination_free=FREE)
    assert ways["lan"].way is Way.SWITCH
    assert ways["lan"].reason == f"QEMU blocks it: {reason}"


def test_a_blocker_of_a_primary_that_will_be_unplugged_does_not_stop_the_copy() -> None:
    wan = _lan(
        team=_team("wan", "other"),
        device=_pci("ua-ptmig-wan-1", "0000:04:00.0"),
        source_pool=PciPool("other", ("0000:04:00.0",)),
        destination_pool=PciPool("other", ("0000:06:00.0",)),
    )
    blocker = "0000:04:00.0: VFIO migration is not supported in kernel"
    ways = choose_ways([_lan(), wan], blockers=[blocker], destination_free=FREE)
    assert ways["lan"].way is Way.COPY
    assert ways["wan"].way is Way.SWITCH


def test_a_marked_team_that_qemu_blocks_switches_and_holds_neither_the_others_nor_a_passenger() -> (
    None
):
    """A pci pool marked state-copy whose NIC QEMU blocks (the lab's whole e1000e): that
    team switches, and its blocker, gone with the unplug, keeps no other team or mdev."""
    san = _lan(team=_team("san"), device=_pci("ua-ptmig-san-1", "0000:03:00.1"))
    blocker = f"{SRC_NIC}: VFIO migration is not supported in kernel"
    ways = choose_ways([_lan(), san], blockers=[blocker], destination_free=FREE)
    assert ways["lan"] == TeamWay(Way.SWITCH, f"QEMU blocks it: {blocker}")
    assert ways["san"].way is Way.COPY
    assert lasting_blockers([_lan(), san], [blocker]) == []


def test_a_vfs_blocker_is_known_by_the_address_the_live_domain_shows() -> None:
    """A VF team's record names its network, not the VF: QEMU's blocker names the VF's host
    address, which the live XML gives (so the blocker goes with the VF's unplug)."""
    live = parse_domain(LIVE_DOMAIN)
    vf = PrimaryDevice(
        PoolKind.VF_NETWORK, "ua-ptmig-san-4", mac="52:54:00:00:02:01", network="ptmig-pool-sriov"
    )
    found = _with_host_address(vf, live)
    assert found is not None and found.pci_address == "0000:05:10.2"
    vf_team = Candidate(_team("san", "sriov"), found, None, None)
    blocker = "0000:05:10.2: VFIO migration is not supported in kernel"
    assert lasting_blockers([vf_team], [blocker]) == []
    assert _with_host_address(None, live) is None
    gone = PrimaryDevice(
        PoolKind.VF_NETWORK, "ua-gone", mac="52:54:00:00:02:02", network="ptmig-pool-sriov"
    )
    assert _with_host_address(gone, live) == gone


def test_a_blocker_for_the_whole_vm_switches_every_team() -> None:
    blocker = "Migration is disabled when VirtFS export path '/x' is mounted in the guest"
    ways = choose_ways([_lan()], blockers=[blocker], destination_free=FREE)
    assert ways["lan"] == TeamWay(Way.SWITCH, f"QEMU blocks the VM: {blocker}")


def test_each_kept_team_gets_its_own_destination_device_or_switches() -> None:
    two = _lan(team=_team("san"), device=_pci("ua-ptmig-san-1", "0000:03:00.1"))
    ways = choose_ways([_lan(), two], blockers=[], destination_free=FREE)
    assert ways["lan"].way is Way.COPY
    assert ways["san"].way is Way.SWITCH
    assert "no free device" in ways["san"].reason


def test_a_blocker_left_after_the_unplug_switches_the_kept_ones_too() -> None:
    ways = choose_ways([_lan()], blockers=[], destination_free=FREE)
    assert still_blocked(ways, []) == ways
    after = still_blocked(ways, ["vIOMMU"])
    assert after["lan"].way is Way.SWITCH
    assert "vIOMMU" in after["lan"].reason
    assert kept(after) == []


def test_state_copy_is_declared_on_the_pci_pool_and_absent_unless_set() -> None:
    marked = parse_pool_network(format_pool_network(_pool(True)))
    assert isinstance(marked, PciPool) and marked.state_copy is True
    assert "state-copy='yes'" in format_pool_network(_pool(True)).replace('"', "'")
    plain = format_pool_network(_pool(None))
    assert "state-copy" not in plain
    parsed = parse_pool_network(plain)
    assert isinstance(parsed, PciPool) and not parsed.state_copy


def test_retarget_gives_the_hostdev_the_destination_address_and_keeps_the_rest() -> None:
    before = parse_domain(LIVE_DOMAIN)
    out = parse_domain(retarget_hostdev(LIVE_DOMAIN, {SRC_NIC: "0000:07:00.1"}))
    (old,), (new,) = before.hostdevs, out.hostdevs
    assert new.host_pci_address == "0000:07:00.1"
    assert (new.alias, new.guest_pci_address, new.managed) == (
        old.alias,
        old.guest_pci_address,
        old.managed,
    )
    assert out.interfaces == before.interfaces
    assert out.teams == before.teams


def test_retarget_refuses_an_address_no_hostdev_has_unless_told_not_to() -> None:
    with pytest.raises(DomainModelError, match=r"no hostdev at 0000:09:00\.0"):
        retarget_hostdev(INACTIVE_DOMAIN, {"0000:09:00.0": "0000:07:00.1"})
    same = retarget_hostdev(INACTIVE_DOMAIN, {"0000:09:00.0": "0000:07:00.1"}, strict=False)
    assert parse_domain(same) == parse_domain(INACTIVE_DOMAIN)


def test_the_faces_carry_the_switch_the_pools_word_and_the_ways() -> None:
    from ptmig.v1 import coordinator_pb2 as cpb

    from host.daemon.encode import migration_request, pool_definition, report_message
    from host.domain.pools import make_pool
    from host.workflow.model import MigrationReport, Outcome

    request = cpb.MigrateRequest(domain="vm1", source_uri="a", destination_uri="b")
    assert migration_request(request).switch_all is False
    request.switch_all = True
    assert migration_request(request).switch_all is True
    pool = pool_definition(
        cpb.DefinePoolRequest(name="nics", kind="pci", addresses=[SRC_NIC], state_copy=True)
    )
    assert isinstance(pool, PciPool) and pool.state_copy is True
    with pytest.raises(DomainModelError, match="state copy"):
        make_pool("lab", "emulated", bridge="br0", state_copy=True)
    report = MigrationReport("id", "vm1", "a", "b", Outcome.DONE, ways={"wan": "copy-state: x"})
    assert dict(report_message(report).ways) == {"wan": "copy-state: x"}


def test_both_faces_build_the_same_request_with_teams_forced_to_switch() -> None:
    from ptmig.v1 import coordinator_pb2 as cpb

    from host.cli import build_parser
    from host.commandline.commands import migration_request as cli_request
    from host.daemon.encode import migration_request as rpc_request

    argv = ["-c", "qemu:///system", "migrate", "vm1", "qemu+tcp://b/system"]
    cli = cli_request(
        build_parser().parse_args([*argv, "--switch", "lan", "--switch", "san", "--switch", "lan"])
    )
    rpc = rpc_request(
        cpb.MigrateRequest(
            domain="vm1",
            source_uri="qemu:///system",
            destination_uri="qemu+tcp://b/system",
            switch_teams=["lan", "san", "lan"],
        )
    )
    assert cli == rpc
    assert cli.switch_teams == ("lan", "san")
    assert cli.switch_all is False
    assert cli_request(build_parser().parse_args(argv)).switch_teams == ()
    with pytest.raises(DomainModelError, match="switch_teams"):
        rpc_request(
            cpb.MigrateRequest(
                domain="vm1", source_uri="a", destination_uri="b", switch_teams=["no such"]
            )
        )
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([*argv, "--switch", "no such"])
    assert exited.value.code == 2


def test_both_faces_define_the_same_mdev_pool() -> None:
    from ptmig.v1 import coordinator_pb2 as cpb

    from host.cli import build_parser
    from host.commandline import commands
    from host.daemon.encode import pool_definition
    from host.domain.pools import MdevPool

    uuid = "6a1c9a6e-0000-4000-8000-000000000001"
    args = build_parser().parse_args(
        [
            "pool-define",
            "serial",
            "--kind",
            "mdev",
            "--mdev-type",
            "mtty-2",
            "--uuid",
            uuid,
            "--state-copy",
        ]
    )
    cli = commands.pool_definition(args)
    rpc = pool_definition(
        cpb.DefinePoolRequest(
            name="serial", kind="mdev", mdev_type="mtty-2", mdev_uuids=[uuid], state_copy=True
        )
    )
    assert cli == rpc == MdevPool("serial", "mtty-2", (uuid,), state_copy=True)


def test_the_report_says_how_each_mdev_went_on_every_face() -> None:
    from host.commandline.render import report_text
    from host.daemon.encode import report_from_message, report_message
    from host.workflow.model import MigrationReport, Outcome, from_plain, plain

    line = (
        "copy-state: pool serial (mtty-2) is marked state-copy on both hosts; its state goes to u2"
    )
    report = MigrationReport(
        "id",
        "vm1",
        "a",
        "b",
        Outcome.DONE,
        ways={"lan": "switch: forced by the operator, for this team"},
        devices={"u1": line},
    )
    assert report_from_message(report_message(report)).devices == {"u1": line}
    assert from_plain(MigrationReport, plain(report)).devices == {"u1": line}
    assert f"  mdev u1: {line}" in report_text(report).splitlines()


def test_a_blocker_left_after_the_unplug_stops_a_passenger_unless_it_names_a_device_going() -> None:
    from host.workflow.hybrid import passengers_blocked

    carried = {"u1": TeamWay(Way.COPY, "x", "u2")}
    going = _pci()
    assert passengers_blocked(carried, []) is None
    assert passengers_blocked({}, ["vIOMMU"]) is None
    assert (
        passengers_blocked(carried, [f"{SRC_NIC}: VFIO migration is not supported"], [going])
        is None
    )
    why = passengers_blocked(carried, ["vIOMMU"], [going])
    assert why is not None and "vIOMMU" in why and "mdev u1 cannot be switched" in why


def test_each_mdev_gets_its_own_free_destination_mdev_or_the_migration_is_refused() -> None:
    from host.domain.domain_xml import MdevHostdev
    from host.domain.pools import MdevPool
    from host.workflow.errors import PreflightError
    from host.workflow.hybrid import Passenger, carry

    u = [f"6a1c9a6e-0000-4000-8000-00000000000{n}" for n in range(4)]
    here = MdevPool("serial", "mtty-2", (u[0], u[1]), state_copy=True)
    there = MdevPool("serial", "mtty-2", (u[2], u[3]), state_copy=True)
    riders = [Passenger(MdevHostdev(uuid), here, there) for uuid in (u[0], u[1])]
    ways = carry(riders, lasting=[], destination_free={"serial": [u[2], u[3]]})
    assert {k: w.destination for k, w in ways.items()} == {u[0]: u[2], u[1]: u[3]}
    assert all(w.way is Way.COPY for w in ways.values())
    with pytest.raises(PreflightError, match=f"mdev {u[1]}: no free mdev in pool serial") as err:
        carry(riders, lasting=[], destination_free={"serial": [u[2]]})
    assert f"mdev {u[0]}" not in str(err.value)
