"""Team logic against the fake links: switch, bind, MAC policies, refusals."""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest
from agent_fake_links import FakeLinks
from agent_scene import NEW_MAC, NEW_PCI, OLD_MAC, VIRTIO_MAC, build_scene, lan_team

from guest_agent.links import FailOverMac, Link, LinkRefused
from guest_agent.teams import (
    HANDOVER_GRACE_S,
    Conflict,
    DeviceMatch,
    DeviceNotFound,
    InvalidRequest,
    MacPolicy,
    Ownership,
    Teams,
    Timeout,
    UnknownTeam,
    deadline_in,
)

OTHER = lan_team(name="db", bond="bond1", standby=DeviceMatch(name="enp9s0"), mac=None)


def teams(fake: FakeLinks, **overrides: object) -> Teams:
    return Teams(fake, [lan_team(**overrides), OTHER])


def unplug_primary(fake: FakeLinks) -> None:
    """What the host's detach does: the old e1000e leaves, the bond fails over."""
    fake.remove("enp2s0")


def test_state_reports_members_and_active(fake: FakeLinks) -> None:
    state = teams(fake).states()[0]
    assert state.bond_present and state.active_member == "enp2s0"
    assert state.members == ("enp1s0", "enp2s0")
    assert (state.standby, state.primary, state.mac) == ("enp1s0", "enp2s0", OLD_MAC)
    assert state.fail_over_mac is FailOverMac.NONE


def test_an_active_member_missing_from_the_dump_is_reported_as_none_not_named(
    fake: FakeLinks,
) -> None:
    """A bond can name an active slave the same dump lacks (it just left): the contract's
    "no active member" is "", which the host accepts; a made-up name it would refuse."""
    fake._set_active(fake.get("bond0").index, 999)
    state = teams(fake).states()[0]
    assert state.active_member == ""


def test_an_active_slave_outside_the_bond_in_the_dump_is_not_named(fake: FakeLinks) -> None:
    """A torn dump (the active slave listed before it was enslaved) must not reach the
    contract as an active member outside the members: the host refuses that as a lie."""
    fake.update("enp2s0", master=None)
    state = teams(fake).states()[0]
    assert state.members == ("enp1s0",)
    assert state.active_member == "" and state.primary is None


def test_snapshot_waits_for_the_start_up_set_up_of_an_agent_owned_team() -> None:
    """GetState during start-up: the agent has made the bond and enslaved the primary,
    whose carrier comes up later (e1000e: about 3 s).  The snapshot waits for the set-up,
    so the host never sees the half-built team (on its standby, primary inactive)."""
    fake = FakeLinks()
    fake.add("enp1s0", mac=VIRTIO_MAC, pci="0000:01:00.0")
    primary = fake.add("enp2s0", mac=OLD_MAC, pci="0000:02:00.0")
    fake.carrier_delay[primary.index] = 0.6
    team = lan_team(ownership=Ownership.AGENT, primary=DeviceMatch(pci_address="0000:02:00.0"))
    t = Teams(fake, [team])
    setting_up = threading.Thread(target=t.set_up_owned, args=(deadline_in(5),))
    setting_up.start()
    try:
        fake.await_(lambda: ("enslave", "enp2s0", "bond0") in fake.calls, "the enslave")
        assert t.states()[0].active_member == "enp1s0", "half-built, as a plain read sees it"
        links, states = t.snapshot(deadline_in(5))
    finally:
        setting_up.join()
        fake.close()
    assert states[0].active_member == "enp2s0" and states[0].members == ("enp1s0", "enp2s0")
    assert next(link for link in links if link.name == "enp2s0").carrier  # the same dump


def test_snapshot_of_a_team_busy_past_its_deadline_is_read_as_it_is(fake: FakeLinks) -> None:
    """An operation still waiting for a carrier when the caller's patience ends: the state
    is read mid-operation (consistent, since each dump is) rather than not at all."""
    t = teams(fake)
    fake.set_carrier("enp1s0", False)  # lan's standby: the switch waits for its carrier
    outcome: list[BaseException] = []

    def switch() -> None:
        try:
            t.use_standby("lan", False, deadline_in(1.5))
        except Timeout as exc:
            outcome.append(exc)

    switching = threading.Thread(target=switch)
    waits = fake.waits
    switching.start()
    fake.waiting(waits, "the switch's wait for its standby's carrier")
    started = time.monotonic()
    _, states = t.snapshot(deadline_in(0.3))
    took = time.monotonic() - started
    switching.join()
    assert outcome, "the switch was still waiting for its carrier"
    assert 0.25 <= took < 1.0
    assert [s.name for s in states] == ["lan", "db"] and states[0].active_member == "enp2s0"


def test_use_standby_switches_and_verifies(fake: FakeLinks) -> None:
    result = teams(fake).use_standby("lan", release_primary=False, deadline=deadline_in(2))
    assert result.team.active_member == "enp1s0"
    assert result.released == ()
    assert fake.get("bond0").bond.active_slave == fake.get("enp1s0").index  # type: ignore[union-attr]


def test_use_standby_releases_primary(fake: FakeLinks) -> None:
    result = teams(fake).use_standby("lan", release_primary=True, deadline=deadline_in(2))
    assert result.released == ("enp2s0",)
    assert result.team.members == ("enp1s0",)
    assert fake.get("enp2s0").master is None
    # switch first, the old member's frames delivered meanwhile; release after the grace
    assert fake.calls == [
        ("set_all_slaves_active", "bond0", True),
        ("set_active_slave", "bond0", "enp1s0"),
        ("set_all_slaves_active", "bond0", False),
        ("release", "enp2s0"),
    ]


def test_handover_keeps_the_old_members_frames_for_the_grace(fake: FakeLinks) -> None:
    """all_slaves_active is on from before the change until HANDOVER_GRACE_S after the
    bond confirmed it, then off again: the bond drops a backup's frames as before."""
    seen: list[tuple[bool, float]] = []
    real = fake.set_all_slaves_active

    def timed(bond: int, on: bool) -> None:
        seen.append((on, time.monotonic()))
        real(bond, on)

    fake.set_all_slaves_active = timed  # type: ignore[method-assign]
    teams(fake).use_standby("lan", release_primary=False, deadline=deadline_in(2))
    (on, t_on), (off, t_off) = seen
    assert on and not off and t_off - t_on >= HANDOVER_GRACE_S
    assert fake.get("bond0").bond.all_slaves_active is False  # type: ignore[union-attr]


def test_handover_leaves_the_operators_all_slaves_active_alone(fake: FakeLinks) -> None:
    bond = fake.get("bond0")
    assert bond.bond is not None
    fake._put(bond._replace(bond=bond.bond._replace(all_slaves_active=True)))
    teams(fake).use_standby("lan", release_primary=False, deadline=deadline_in(2))
    assert [c[0] for c in fake.calls] == ["set_active_slave"]
    assert fake.get("bond0").bond.all_slaves_active is True  # type: ignore[union-attr]


def test_handover_is_off_again_when_the_change_fails(fake: FakeLinks) -> None:
    def refuse(bond: int, index: int) -> None:
        raise LinkRefused("bond_active_slave: not a slave", errno.ERANGE)

    fake.set_active_slave = refuse  # type: ignore[method-assign]
    with pytest.raises(Conflict):
        teams(fake).use_standby("lan", release_primary=False, deadline=deadline_in(2))
    assert [c[1:] for c in fake.calls] == [("bond0", True), ("bond0", False)]
    assert fake.get("bond0").bond.all_slaves_active is False  # type: ignore[union-attr]


def test_handover_under_follow_delivers_the_old_members_frames() -> None:
    """Under fail_over_mac active each member keeps its own MAC, so the old member's frames
    are its host's and reach the bond with all_slaves_active on for the change."""
    fake = FakeLinks()
    build_scene(fake, fail_over_mac=FailOverMac.ACTIVE)
    t = teams(fake, mac_policy=MacPolicy.FOLLOW, mac=None)
    assert fake.get("bond0").bond.active_slave == fake.get("enp2s0").index  # type: ignore[union-attr]
    result = t.use_standby("lan", True, deadline_in(2))
    assert fake.calls == [
        ("set_all_slaves_active", "bond0", True),
        ("set_active_slave", "bond0", "enp1s0"),
        ("set_all_slaves_active", "bond0", False),
        ("release", "enp2s0"),
    ]
    assert fake.get("bond0").bond.active_slave == fake.get("enp1s0").index  # type: ignore[union-attr]
    assert result.team.active_member == "enp1s0"
    fake.close()


def test_no_handover_under_kernel_follow() -> None:
    """fail_over_mac follow (2) swaps the members' MACs: the old member's frames are for a
    MAC it no longer has."""
    fake = FakeLinks()
    build_scene(fake, fail_over_mac=FailOverMac.FOLLOW)
    t = teams(fake, mac_policy=MacPolicy.NONE, mac=None)
    t.use_standby("lan", False, deadline_in(2))
    assert [c[0] for c in fake.calls] == ["set_active_slave"]
    fake.close()


def test_bind_hands_over_and_answers_before_the_grace_which_the_next_operation_waits_for(
    fake: FakeLinks,
) -> None:
    """The handover's grace keeps the old member's frames for a while after the change; a
    bind answers without waiting for it, and the team's next operation starts after it."""
    t = teams(fake)
    switched_and_unplugged(fake, t)
    fake.add("enp3s0", mac=NEW_MAC, pci=NEW_PCI)
    real = fake.set_all_slaves_active
    may_end = threading.Event()

    def held_off(bond: int, on: bool) -> None:
        if not on:
            assert may_end.wait(5)
        real(bond, on)

    fake.set_all_slaves_active = held_off  # type: ignore[method-assign]
    assert t.bind_primary("lan", NEW_PCI, None, None, deadline_in(5)).team.active_member == (
        "enp3s0"
    )
    assert fake.get("bond0").bond.all_slaves_active is True  # type: ignore[union-attr]
    switch = threading.Thread(target=t.use_standby, args=("lan", False, deadline_in(5)))
    switch.start()
    switch.join(0.5)  # in the fakes a switch takes milliseconds: this one waits for the lock
    assert switch.is_alive()
    may_end.set()
    switch.join(5)
    calls = [c for c in fake.calls if c[0] in ("set_all_slaves_active", "set_active_slave")]
    assert calls == [
        ("set_all_slaves_active", "bond0", True),
        ("set_active_slave", "bond0", "enp3s0"),
        ("set_all_slaves_active", "bond0", False),  # the bind's grace ended...
        ("set_all_slaves_active", "bond0", True),  # ...before the switch began
        ("set_active_slave", "bond0", "enp1s0"),
        ("set_all_slaves_active", "bond0", False),
    ]


def test_use_standby_already_active_changes_nothing(fake: FakeLinks) -> None:
    t = teams(fake)
    t.use_standby("lan", False, deadline_in(2))
    fake.calls.clear()
    assert t.use_standby("lan", False, deadline_in(2)).team.active_member == "enp1s0"
    assert fake.calls == []


def test_use_standby_waits_for_standby_carrier_by_event(fake: FakeLinks) -> None:
    fake.set_carrier("enp1s0", False)
    fake.later(0.2, lambda: fake.set_carrier("enp1s0", True))
    started = time.monotonic()
    result = teams(fake).use_standby("lan", False, deadline_in(5))
    assert result.team.active_member == "enp1s0"
    assert time.monotonic() - started < 2


def test_use_standby_without_carrier_times_out_and_keeps_primary(fake: FakeLinks) -> None:
    fake.set_carrier("enp1s0", False)
    with pytest.raises(Timeout, match="standby enp1s0 has no carrier"):
        teams(fake).use_standby("lan", True, deadline_in(0.2))
    assert fake.calls == []
    assert fake.get("enp2s0").master == fake.get("bond0").index


def test_use_standby_refuses_standby_outside_bond(fake: FakeLinks) -> None:
    fake.update("enp1s0", master=None)
    with pytest.raises(Conflict, match="not a member of bond0"):
        teams(fake).use_standby("lan", False, deadline_in(1))


def test_unknown_team_and_missing_bond(fake: FakeLinks) -> None:
    with pytest.raises(UnknownTeam, match="unknown team 'wan'"):
        teams(fake).use_standby("wan", False, deadline_in(1))
    with pytest.raises(Conflict, match="bond bond7 does not exist"):
        teams(fake, bond="bond7").use_standby("lan", False, deadline_in(1))


def switched_and_unplugged(fake: FakeLinks, t: Teams) -> None:
    t.use_standby("lan", release_primary=True, deadline=deadline_in(2))
    unplug_primary(fake)
    fake.calls.clear()


def test_bind_preserve_sets_team_mac_before_enslaving(fake: FakeLinks) -> None:
    t = teams(fake)
    switched_and_unplugged(fake, t)
    fake.hotplug_later(0.1, "enp3s0", mac=NEW_MAC, pci=NEW_PCI)
    fake.carrier_delay[fake._next] = 0.3  # like e1000e: enslaving takes the link down a while
    result = t.bind_primary("lan", NEW_PCI, None, None, deadline_in(5))
    assert result.device == "enp3s0"
    assert result.team.active_member == "enp3s0"
    link = fake.get("enp3s0")
    assert (link.mac, link.permanent_mac) == (OLD_MAC, NEW_MAC)
    kinds = [call[0] for call in fake.calls]
    assert kinds.index("set_mac") < kinds.index("enslave") < kinds.index("set_active_slave")


def _nic_calls(fake: FakeLinks, name: str) -> list[tuple[object, ...]]:
    return [call for call in fake.calls if call[1:2] == (name,) and call[0] != "enslave"]


SET_MAC, DOWN, UP = (
    ("set_mac", "enp3s0", OLD_MAC),
    ("set_up", "enp3s0", False),
    ("set_up", "enp3s0", True),
)


@pytest.mark.parametrize(
    ("up", "read_up", "steps"),
    [
        # freshly probed, down: the MAC at once (e1000e refuses it only live)
        (False, False, [SET_MAC, UP]),
        # read up: down first
        (True, True, [DOWN, SET_MAC, UP]),
        # read down, up by the time its MAC is set (EBUSY): down, and the MAC again
        (True, False, [SET_MAC, DOWN, SET_MAC, UP]),
    ],
    ids=["down", "up", "came-up-after-the-read"],
)
def test_bind_preserve_sets_a_nic_down_for_its_mac_only_when_it_is_up(
    fake: FakeLinks, up: bool, read_up: bool, steps: list[tuple[object, ...]]
) -> None:
    t = teams(fake)
    switched_and_unplugged(fake, t)
    link = fake.add("enp3s0", mac=NEW_MAC, pci=NEW_PCI, up=up)
    fake.refuse_live_mac.add(link.index)
    real_list, real_get = fake.list_links, fake.get_links

    def as_read(links: list[Link]) -> list[Link]:
        return [ln._replace(admin_up=read_up) if ln.index == link.index else ln for ln in links]

    fake.list_links = lambda: as_read(real_list())  # type: ignore[method-assign]
    fake.get_links = lambda indexes: as_read(real_get(indexes))  # type: ignore[method-assign]
    t.bind_primary("lan", NEW_PCI, None, None, deadline_in(5))
    assert _nic_calls(fake, "enp3s0")[: len(steps)] == steps
    assert fake.get("enp3s0").mac == OLD_MAC


def test_bind_preserve_checks_the_mac_on_its_waits_reads(fake: FakeLinks) -> None:
    """The MAC checks after carrier and after the change take the NIC as the waits read
    it: outside its waits the bind reads the NIC once as found (udev's name) and the bond
    alone (before the change), nothing else."""
    t = teams(fake)
    switched_and_unplugged(fake, t)
    link = fake.add("enp3s0", mac=NEW_MAC, pci=NEW_PCI, up=False)
    fake.carrier_delay[link.index] = 0.2
    waiting, outside = [False], []
    real_wait, real_get = fake.wait_for, fake.get_links

    def wait_for(*args: Any, **kwargs: Any) -> Any:
        waiting[0] = True
        try:
            return real_wait(*args, **kwargs)
        finally:
            waiting[0] = False

    def get_links(indexes: Sequence[int]) -> list[Link]:
        if not waiting[0]:
            outside.append(tuple(indexes))
        return real_get(indexes)

    fake.wait_for, fake.get_links = wait_for, get_links  # type: ignore[method-assign]
    t.bind_primary("lan", NEW_PCI, None, None, deadline_in(5))
    assert outside == [(link.index,), (fake.get("bond0").index,)]
    assert fake.get("enp3s0").mac == OLD_MAC


def test_bind_names_the_device_as_udev_renamed_it(fake: FakeLinks) -> None:
    """A dump can name a link as before its rename while udev's entry, read after it,
    already exists (seen in the lab: bind said eth0, the link was enp2s0): the bind
    reads the link again and reports, and acts on, udev's name."""
    t = teams(fake)
    switched_and_unplugged(fake, t)
    fake.add("enp3s0", mac=NEW_MAC, pci=NEW_PCI)
    renamed = fake.get("enp3s0")
    real_list = fake.list_links
    stale = iter([True])  # the dump that finds the device

    def list_links_stale_at_first() -> list[Link]:
        links = real_list()
        if next(stale, False):
            return [ln._replace(name="eth0") if ln.index == renamed.index else ln for ln in links]
        return links

    fake.list_links = list_links_stale_at_first  # type: ignore[method-assign]
    result = t.bind_primary("lan", None, NEW_MAC, None, deadline_in(5))
    assert result.device == "enp3s0" == result.team.active_member


def test_bind_waits_for_carrier_event_before_activating(fake: FakeLinks) -> None:
    t = teams(fake)
    switched_and_unplugged(fake, t)
    link = fake.add("enp3s0", mac=NEW_MAC, pci=NEW_PCI)
    fake.carrier_delay[link.index] = 0.4
    started = time.monotonic()
    t.bind_primary("lan", NEW_PCI, None, None, deadline_in(5))
    took = time.monotonic() - started
    assert 0.35 < took < 2.0
    assert fake.get("bond0").bond.active_slave == link.index  # type: ignore[union-attr]


def test_bind_dumps_every_link_twice_and_waits_on_its_nic_and_bond_alone(
    fake: FakeLinks,
) -> None:
    t = teams(fake)
    switched_and_unplugged(fake, t)
    link = fake.add("enp3s0", mac=NEW_MAC, pci=NEW_PCI)
    fake.carrier_delay[link.index] = 0.3
    fake.dumps, fake.reads = 0, []
    t.bind_primary("lan", NEW_PCI, None, None, deadline_in(5))
    # the device found: the bond is read alone, nothing while waiting, the state answered
    # from the NIC and bond as last read
    assert fake.dumps == 1
    bond = fake.get("bond0").index
    assert (bond,) in fake.reads
    assert set(fake.reads) <= {(link.index,), (bond,), (link.index, bond)}


def test_bind_by_pci_dumps_no_link_until_its_nic_is_there_and_udev_done(
    fake: FakeLinks,
) -> None:
    """The probe of a hot-plugged NIC sends dozens of events; by PCI address the wait asks
    sysfs on each and dumps the links once, when the NIC is there and named."""
    t = teams(fake)
    switched_and_unplugged(fake, t)
    for i in range(5):  # other links come and go while the NIC is probed
        fake.later(0.02 * i, lambda i=i: fake.add(f"veth{i}", mac=f"52:54:00:ee:00:0{i}"))
    fake.hotplug_later(0.15, "eth0", mac=NEW_MAC, pci=NEW_PCI, udev_initialized=False)
    fake.later(0.3, lambda: fake.update("eth0", name="enp3s0", udev_initialized=True))
    fake.dumps = 0
    assert t.bind_primary("lan", NEW_PCI, NEW_MAC, None, deadline_in(5)).device == "enp3s0"
    assert fake.dumps == 1  # when the NIC is there


def test_bind_by_mac_alone_reads_the_links_on_each_change(fake: FakeLinks) -> None:
    """Without a PCI address there is nothing to look for in sysfs: every change is read."""
    t = teams(fake)
    switched_and_unplugged(fake, t)
    fake.hotplug_later(0.1, "eth0", mac=NEW_MAC, udev_initialized=False)
    fake.later(0.2, lambda: fake.update("eth0", name="enp3s0", udev_initialized=True))
    fake.dumps = 0
    assert t.bind_primary("lan", None, NEW_MAC, None, deadline_in(5)).device == "enp3s0"
    assert fake.dumps > 1


def test_use_standby_dumps_every_link_once_and_answers_the_team_as_it_left_it(
    fake: FakeLinks,
) -> None:
    fake.dumps = 0
    result = teams(fake).use_standby("lan", release_primary=True, deadline=deadline_in(2))
    assert fake.dumps == 1  # the first read; the state answered from it and the bond's reads
    assert set(fake.reads) == {(fake.get("enp1s0").index,), (fake.get("bond0").index,)}
    assert result.team == teams(fake).states()[0]  # what a dump now shows


def test_use_standby_skips_a_member_gone_before_its_release(fake: FakeLinks) -> None:
    t = teams(fake)
    real = fake.release

    def gone_first(index: int) -> None:
        fake.remove("enp2s0")  # hot-unplugged between the dump and the release
        real(index)

    fake.release = gone_first  # type: ignore[method-assign]
    result = t.use_standby("lan", release_primary=True, deadline=deadline_in(2))
    assert result.released == ()
    assert result.team.members == ("enp1s0",)


def test_bind_reapplies_mac_after_driver_reset(fake: FakeLinks) -> None:
    t = teams(fake)
    switched_and_unplugged(fake, t)
    link = fake.add("enp3s0", mac=NEW_MAC, pci=NEW_PCI)
    fake.mac_reset_on_up.add(link.index)
    fake.refuse_live_mac.add(link.index)
    t.bind_primary("lan", None, NEW_MAC, None, deadline_in(5))
    assert fake.get("enp3s0").mac == OLD_MAC
    assert sum(1 for call in fake.calls if call[0] == "set_mac") >= 2


def test_bind_follow_keeps_device_mac_and_bond_follows() -> None:
    fake = FakeLinks()
    build_scene(fake, fail_over_mac=FailOverMac.ACTIVE)
    t = teams(fake, mac_policy=MacPolicy.FOLLOW, mac=None)
    switched_and_unplugged(fake, t)
    fake.add("enp3s0", mac=NEW_MAC, pci=NEW_PCI)
    result = t.bind_primary("lan", NEW_PCI, NEW_MAC, None, deadline_in(5))
    assert result.team.mac == NEW_MAC
    assert fake.get("enp3s0").mac == NEW_MAC
    assert not [call for call in fake.calls if call[0] == "set_mac"]


def test_bind_follow_refused_on_fail_over_mac_none(fake: FakeLinks) -> None:
    t = teams(fake)
    switched_and_unplugged(fake, t)
    fake.add("enp3s0", mac=NEW_MAC, pci=NEW_PCI)
    with pytest.raises(Conflict, match="fail_over_mac=active"):
        t.bind_primary("lan", NEW_PCI, None, MacPolicy.FOLLOW, deadline_in(1))
    assert fake.calls == []


def test_bind_policy_none_never_touches_macs(fake: FakeLinks) -> None:
    t = teams(fake, mac_policy=MacPolicy.NONE, mac=None)
    switched_and_unplugged(fake, t)
    fake.add("enp3s0", mac=NEW_MAC, pci=NEW_PCI)
    result = t.bind_primary("lan", NEW_PCI, None, None, deadline_in(5))
    assert not [call for call in fake.calls if call[0] == "set_mac"]
    # ...and the bind did happen: the new device is the bond's active member
    assert result.team.active_member == "enp3s0"
    assert fake.get("bond0").bond.active_slave == fake.get("enp3s0").index  # type: ignore[union-attr]


def test_bind_waits_for_udev_rename(fake: FakeLinks) -> None:
    t = teams(fake)
    switched_and_unplugged(fake, t)
    fake.add("eth0", mac=NEW_MAC, pci=NEW_PCI, udev_initialized=False)
    fake.later(0.2, lambda: fake.update("eth0", name="enp3s0", udev_initialized=True))
    assert t.bind_primary("lan", NEW_PCI, None, None, deadline_in(5)).device == "enp3s0"
    assert all("eth0" not in call for call in fake.calls)


def test_bind_device_never_appears(fake: FakeLinks) -> None:
    t = teams(fake)
    switched_and_unplugged(fake, t)
    with pytest.raises(DeviceNotFound, match=r"no device with pci 0000:03:00\.0 appeared"):
        t.bind_primary("lan", NEW_PCI, None, None, deadline_in(0.2))
    assert fake.calls == []


def test_bind_carrier_never_comes(fake: FakeLinks) -> None:
    t = teams(fake)
    switched_and_unplugged(fake, t)
    fake.add("enp3s0", mac=NEW_MAC, pci=NEW_PCI, carrier=False)
    with pytest.raises(Timeout, match="enp3s0 is a member of bond0 but has no carrier"):
        t.bind_primary("lan", NEW_PCI, None, None, deadline_in(0.3))
    assert fake.get("bond0").bond.active_slave == fake.get("enp1s0").index  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("pci", "mac", "message"),
    [
        (None, "52:54:00:zz:00:02", "malformed MAC"),
        (None, "01:00:5e:00:00:01", "multicast"),
        ("02:00", None, "malformed PCI"),
        (None, None, "pci_address, mac, or both"),
    ],
)
def test_bind_rejects_bad_arguments_without_change(
    fake: FakeLinks, pci: str | None, mac: str | None, message: str
) -> None:
    with pytest.raises(InvalidRequest, match=message):
        teams(fake).bind_primary("lan", pci, mac, None, deadline_in(1))
    assert fake.calls == []


def test_bind_refuses_member_of_another_team(fake: FakeLinks) -> None:
    with pytest.raises(Conflict, match="enp5s0 is a member of team db"):
        teams(fake).bind_primary("lan", "0000:05:00.0", None, None, deadline_in(1))
    assert fake.calls == []


def test_bind_refuses_the_standby_and_foreign_masters(fake: FakeLinks) -> None:
    t = teams(fake)
    with pytest.raises(Conflict, match="team's standby"):
        t.bind_primary("lan", "0000:01:00.0", None, None, deadline_in(1))
    bridge = fake.add("br0", mac="02:00:00:00:00:b0", kind="bridge")
    fake.add("enp7s0", mac="52:54:00:ee:00:07", pci="0000:07:00.0", master=bridge.index)
    with pytest.raises(Conflict, match="enslaved to br0"):
        t.bind_primary("lan", "0000:07:00.0", None, None, deadline_in(1))
    assert fake.calls == []


def test_bind_ambiguous_mac_is_refused(fake: FakeLinks) -> None:
    fake.add("enp3s0", mac=OLD_MAC, pci=NEW_PCI)  # a second card with the same burned-in MAC
    calls_before = list(fake.calls)
    with pytest.raises(Conflict, match="ambiguous"):
        teams(fake).bind_primary("lan", None, OLD_MAC, None, deadline_in(1))
    assert fake.calls == calls_before


def test_bind_by_mac_prefers_the_burned_in_address(fake: FakeLinks) -> None:
    """The standby carries the bond's MAC (OLD_MAC) too; the primary's burned-in one wins."""
    result = teams(fake).bind_primary("lan", None, OLD_MAC, None, deadline_in(2))
    assert result.device == "enp2s0"


def test_bind_again_is_harmless(fake: FakeLinks) -> None:
    t = teams(fake)
    switched_and_unplugged(fake, t)
    fake.add("enp3s0", mac=NEW_MAC, pci=NEW_PCI)
    t.bind_primary("lan", NEW_PCI, None, None, deadline_in(5))
    fake.await_(lambda: not fake.get("bond0").bond.all_slaves_active, "the handover's end")  # type: ignore[union-attr]
    fake.calls.clear()
    assert t.bind_primary("lan", NEW_PCI, NEW_MAC, None, deadline_in(5)).device == "enp3s0"
    assert [call[0] for call in fake.calls] == ["set_up"]


def test_agent_owned_team_is_created_and_primary_bound() -> None:
    fake = FakeLinks()
    fake.add("enp1s0", mac=VIRTIO_MAC, pci="0000:01:00.0")
    fake.add("enp2s0", mac=OLD_MAC, pci="0000:02:00.0")
    team = lan_team(ownership=Ownership.AGENT, primary=DeviceMatch(pci_address="0000:02:00.0"))
    t = Teams(fake, [team])
    t.set_up_owned(deadline_in(5))
    state = t.states()[0]
    assert state.members == ("enp1s0", "enp2s0")
    assert (state.active_member, state.mac) == ("enp2s0", OLD_MAC)
    assert fake.calls[0] == ("create_bond", "bond0", FailOverMac.NONE, 1)
    assert ("set_mac", "bond0", OLD_MAC) in fake.calls


def test_bind_retries_when_the_carrier_drops_again_as_it_is_made_active() -> None:
    """Seen in the Debian 12 guest at start-up: the agent saw enp4s0's carrier, then bond1
    refused it as active slave ("either enp4s0 is down or the link is down", EINVAL).  The
    bind waits for the carrier again and retries within its deadline."""
    fake = FakeLinks()
    fake.add("enp1s0", mac=VIRTIO_MAC, pci="0000:01:00.0")
    fake.add("enp2s0", mac=OLD_MAC, pci="0000:02:00.0")
    refuse_once = fake.set_active_slave
    flaps: list[float] = []

    def flapping(bond: int, index: int) -> None:
        if fake._name(index) == "enp2s0" and not flaps:
            flaps.append(time.monotonic())
            fake.set_carrier("enp2s0", False)  # the link drops as the bond is asked
            fake.later(0.3, lambda: fake.set_carrier("enp2s0", True))
        refuse_once(bond, index)

    fake.set_active_slave = flapping  # type: ignore[method-assign]
    team = lan_team(ownership=Ownership.AGENT, primary=DeviceMatch(pci_address="0000:02:00.0"))
    t = Teams(fake, [team])
    try:
        assert t.set_up_owned(deadline_in(5)) == []
        state = t.states()[0]
    finally:
        fake.close()
    assert flaps, "the carrier flapped"
    assert state.active_member == "enp2s0"
    assert [c for c in fake.calls if c[0] == "set_active_slave"] == [
        ("set_active_slave", "bond0", "enp2s0")
    ] * 2


def test_bind_gives_up_on_a_carrier_that_does_not_come_back(fake: FakeLinks) -> None:
    t = teams(fake)
    t.use_standby("lan", True, deadline_in(2))
    fake.remove("enp2s0")
    fake.add("enp3s0", mac=NEW_MAC, pci=NEW_PCI)
    original = fake.set_active_slave

    def drop(bond: int, index: int) -> None:
        fake.set_carrier("enp3s0", False)
        original(bond, index)

    fake.set_active_slave = drop  # type: ignore[method-assign]
    started = time.monotonic()
    with pytest.raises(Timeout, match="did not come back"):
        t.bind_primary("lan", NEW_PCI, None, None, deadline_in(1))
    assert time.monotonic() - started < 2


def test_agent_owned_follow_team_uses_fail_over_mac_active() -> None:
    fake = FakeLinks()
    fake.add("enp1s0", mac=VIRTIO_MAC)
    t = Teams(fake, [lan_team(ownership=Ownership.AGENT, mac_policy=MacPolicy.FOLLOW, mac=None)])
    t.set_up_owned(deadline_in(2))
    assert fake.calls[0] == ("create_bond", "bond0", FailOverMac.ACTIVE, 1)
    assert t.states()[0].members == ("enp1s0",)
    t.set_up_owned(deadline_in(2))  # a restart adopts the bond it made
    assert [call[0] for call in fake.calls].count("create_bond") == 1


def test_agent_owned_set_up_isolates_failures() -> None:
    fake = FakeLinks()
    fake.add("enp1s0", mac=VIRTIO_MAC)
    broken = lan_team(
        name="wan", bond="bond9", standby=DeviceMatch(name="missing0"), ownership=Ownership.AGENT
    )
    good = lan_team(ownership=Ownership.AGENT)
    t = Teams(fake, [broken, good])
    failures = t.set_up_owned(deadline_in(2))
    assert len(failures) == 1 and "standby" in str(failures[0])
    assert t.states()[1].members == ("enp1s0",)


def test_standby_named_by_mac_stays_unique_when_primary_carries_that_mac(
    fake: FakeLinks,
) -> None:
    """Preserve with the team MAC = the standby's burned-in MAC (the lab's team lan): the
    primary then carries the standby's MAC too; the burned-in address decides."""
    fake.update("enp2s0", mac=VIRTIO_MAC)
    fake.update("bond0", mac=VIRTIO_MAC)
    t = Teams(fake, [lan_team(standby=DeviceMatch(mac=VIRTIO_MAC), mac=VIRTIO_MAC), OTHER])
    assert t.states()[0].standby == "enp1s0"
    result = t.use_standby("lan", release_primary=False, deadline=deadline_in(2))
    assert result.team.active_member == "enp1s0"


def vf_scene(fake: FakeLinks) -> Teams:
    """Team lan under preserve with the team MAC = the standby's, its primary unplugged:
    the host is about to plug an SR-IOV VF whose MAC it set through the PF to that MAC."""
    fake.update("enp1s0", driver="virtio_net")
    fake.update("bond0", mac=VIRTIO_MAC)
    t = Teams(fake, [lan_team(standby=DeviceMatch(mac=VIRTIO_MAC), mac=VIRTIO_MAC), OTHER])
    switched_and_unplugged(fake, t)
    return t


def test_a_vf_with_the_standbys_mac_binds_as_primary_and_the_virtio_stays_standby(
    fake: FakeLinks,
) -> None:
    """igbvf reports the PF-set MAC as its burned-in one, so two links carry the
    standby's burned-in MAC: the standby is the virtio one, the VF the primary."""
    t = vf_scene(fake)
    fake.add("enp3s0", mac=VIRTIO_MAC, pci=NEW_PCI, driver="igbvf")
    result = t.bind_primary("lan", NEW_PCI, VIRTIO_MAC, None, deadline_in(5))
    assert (result.device, result.team.active_member) == ("enp3s0", "enp3s0")
    assert (result.team.standby, result.team.primary) == ("enp1s0", "enp3s0")
    switched = t.use_standby("lan", release_primary=False, deadline=deadline_in(2))
    assert switched.team.active_member == "enp1s0"
    assert fake.get("enp3s0").master == fake.get("bond0").index  # the VF stays a member


def test_two_links_with_the_standbys_mac_and_no_virtio_leave_the_standby_unnamed(
    fake: FakeLinks,
) -> None:
    """Without a virtio_net link among them nothing tells the standby: it is not guessed."""
    t = vf_scene(fake)
    fake.update("enp1s0", driver="e1000e")
    fake.add("enp3s0", mac=VIRTIO_MAC, pci=NEW_PCI, driver="igbvf")
    assert t.states()[0].standby is None
    with pytest.raises(Conflict, match="not found or ambiguous"):
        t.use_standby("lan", release_primary=False, deadline=deadline_in(2))
