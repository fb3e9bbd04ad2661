"""Guest-managed teams against the fake links: the agent acts on its own, per team.

The scene: bond0 (team lan) = enp1s0 (virtio standby) + enp2s0 (e1000e, active);
bond1 (team db) = enp5s0 (its standby) alone.  An orchestrator's unplug is the fake's
`remove`, its plug the fake's `add` of an e1000e with another PCI address and burned-in
MAC.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_fake_links import FakeLinks
from agent_grpc import stubs
from agent_scene import NEW_MAC, NEW_PCI, OLD_MAC, build_scene, lan_team
from ptmig.v1 import guest_agent_pb2 as pb

from guest_agent import config, server
from guest_agent.autonomy import Plugged, Watcher
from guest_agent.links import FailOverMac
from guest_agent.operations import OperationLog
from guest_agent.rules import ManagedBy, PrimaryRule
from guest_agent.service import GuestAgentServicer, team_to_pb
from guest_agent.teams import DeviceMatch, MacPolicy, TeamConfig, TeamEvent, Teams, deadline_in

E1000E = {"pci_id": "8086:10d3", "driver": "e1000e"}
RULE = PrimaryRule(driver="e1000e")
WAIT_S = 5.0


def guest_lan(**overrides: object) -> TeamConfig:
    fields: dict[str, object] = {"managed_by": ManagedBy.GUEST, "primary_rule": RULE}
    fields.update(overrides)
    return lan_team(**fields)


def db_team(**overrides: object) -> TeamConfig:
    fields: dict[str, object] = {
        "name": "db",
        "bond": "bond1",
        "standby": DeviceMatch(name="enp5s0"),
        "mac": None,
    }
    fields.update(overrides)
    return lan_team(**fields)


def scene(fake: FakeLinks) -> FakeLinks:
    fake.update("enp2s0", **E1000E)
    return fake


@pytest.fixture
def fake_follow() -> Iterator[FakeLinks]:
    links = FakeLinks()
    build_scene(links, fail_over_mac=FailOverMac.ACTIVE)
    yield scene(links)
    links.close()


class Running:
    """A watcher thread over *teams*, its events in a queue the test waits on."""

    def __init__(self, fake: FakeLinks, teams: Teams, timeout_s: float = WAIT_S) -> None:
        self.fake, self.teams = fake, teams
        self.events: queue.Queue[tuple[str, TeamEvent]] = queue.Queue()
        self.watcher = Watcher(teams, fake, timeout_s, on_event=self._put)
        self.thread = self.watcher.start()

    def _put(self, team: str, event: TeamEvent) -> None:
        self.events.put((team, event))

    def barrier(self, name: str = "enp8s0") -> str:
        """Plug a NIC no team wants and wait for the watcher to log it: every change made
        before has been seen and acted on by then.  Returns the line it logged (read here:
        the test's caplog gets the record only after this handler has seen it)."""
        lines: queue.Queue[str] = queue.Queue()
        handler = logging.Handler(logging.INFO)
        handler.emit = lambda record: (  # type: ignore[method-assign]
            lines.put(record.getMessage()) if name in record.getMessage() else None
        )
        logger = logging.getLogger("guest_agent.autonomy")
        level = logger.level
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        try:
            plug(self.fake, name=name, pci="0000:08:00.0", pci_id="1af4:1041", driver="virtio_net")
            return lines.get(timeout=WAIT_S)
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)

    def next_event(self) -> tuple[str, TeamEvent]:
        return self.events.get(timeout=WAIT_S)

    def stop(self) -> None:
        self.watcher.stop()
        with self.fake.cond:
            self.fake.cond.notify_all()  # the wake-up a link event would be
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive()


@pytest.fixture
def running(fake: FakeLinks) -> Iterator[Running]:
    run = Running(scene(fake), Teams(fake, [guest_lan(), db_team()]))
    yield run
    run.stop()


def plug(fake: FakeLinks, name: str = "enp3s0", **kwargs: Any) -> None:
    """What virDomainAttachDeviceFlags of a whole NIC from the destination's pool gives."""
    fields: dict[str, Any] = {"mac": NEW_MAC, "pci": NEW_PCI, **E1000E}
    fields.update(kwargs)
    fake.add(name, **fields)


def enslaves(fake: FakeLinks, name: str) -> int:
    return sum(1 for call in fake.calls if call[:2] == ("enslave", name))


# -- configuration ------------------------------------------------------------


TEAM = """
[[teams]]
name = "lan"
bond = "bond0"
standby = "enp1s0"
"""


def test_config_reads_managed_by_and_the_primary_rule() -> None:
    cfg = config.parse(
        {
            "teams": [
                {
                    "name": "lan",
                    "bond": "bond0",
                    "standby": "enp1s0",
                    "managed_by": "guest",
                    "primary_rule": {
                        "mac": "52:54:00:CC:00:02",
                        "pci_id": "8086:10D3",
                        "driver": "e1000e",
                        "pci_slot": "0000:03:00",
                    },
                }
            ]
        }
    )
    (team,) = cfg.teams
    assert team.managed_by is ManagedBy.GUEST
    assert team.primary_rule == PrimaryRule(
        "52:54:00:cc:00:02", "8086:10d3", "e1000e", "0000:03:00"
    )


def test_config_default_is_coordinator_managed_without_a_rule() -> None:
    (team,) = config.parse({"teams": [{"name": "lan", "bond": "bond0", "standby": "x"}]}).teams
    assert (team.managed_by, team.primary_rule) == (ManagedBy.COORDINATOR, None)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"managed_by": "guest"}, "go together"),
        ({"primary_rule": {"driver": "e1000e"}}, "go together"),
        ({"managed_by": "host"}, "not one of coordinator, guest"),
        ({"managed_by": "guest", "primary_rule": {}}, "give at least one of"),
        ({"managed_by": "guest", "primary_rule": {"pci_id": "8086"}}, "vendor:device"),
        ({"managed_by": "guest", "primary_rule": {"pci_slot": "3:0"}}, "malformed PCI slot"),
        ({"managed_by": "guest", "primary_rule": {"mac": "01:00:5e:00:00:01"}}, "multicast"),
        ({"managed_by": "guest", "primary_rule": {"vendor": "8086"}}, "unknown key"),
    ],
)
def test_config_refuses_a_bad_rule_with_its_place(extra: dict[str, Any], message: str) -> None:
    team = {"name": "lan", "bond": "bond0", "standby": "enp1s0", **extra}
    with pytest.raises(config.ConfigError, match=message) as info:
        config.parse({"teams": [team]}, "agent.toml")
    assert "agent.toml.teams[0]" in str(info.value)


def test_rule_fields_all_must_match(fake: FakeLinks) -> None:
    plug(fake)
    new = fake.get("enp3s0")
    assert PrimaryRule(mac=NEW_MAC, pci_id="8086:10d3", driver="e1000e").matches(new)
    assert PrimaryRule(pci_slot="0000:03:00").matches(new)  # a slot: any function
    assert PrimaryRule(pci_slot=NEW_PCI).matches(new)
    assert not PrimaryRule(pci_slot="0000:03:01").matches(new)
    assert not PrimaryRule(driver="e1000e", mac=OLD_MAC).matches(new)
    assert not PrimaryRule(pci_id="1af4:1041").matches(new)


# -- the primary goes -----------------------------------------------------------


def test_primary_removed_is_confirmed_on_standby_and_reported(running: Running) -> None:
    running.fake.remove("enp2s0")  # surprise removal: nobody switched first
    team, event = running.next_event()
    assert team == "lan" and event.kind == "primary-lost" and event.ok
    assert event.device == "enp2s0" and "removed" in event.reason
    assert event.detail == "on standby enp1s0"
    lan = running.teams.states()[0]
    assert lan.active_member == "enp1s0" and lan.last_event == event
    assert not any(call[0] in ("enslave", "set_mac") for call in running.fake.calls)


def test_primary_losing_its_carrier_is_reported_and_made_active_when_it_returns(
    running: Running,
) -> None:
    fake = running.fake
    fake.set_carrier("enp2s0", False)  # a driver reset: the bond's miimon fails over
    _, lost = running.next_event()
    assert lost.kind == "primary-lost" and "lost its carrier" in lost.reason and lost.ok
    assert running.teams.states()[0].active_member == "enp1s0"
    fake.set_carrier("enp2s0", True)
    _, back = running.next_event()
    assert back.kind == "primary-bound" and back.ok and "carrier again" in back.reason
    assert running.teams.states()[0].active_member == "enp2s0"
    assert enslaves(fake, "enp2s0") == 0  # it never left the bond


def test_a_primary_the_standby_cannot_take_over_is_recorded_as_failed(fake: FakeLinks) -> None:
    run = Running(scene(fake), Teams(fake, [guest_lan()]), timeout_s=0.5)
    try:
        fake.set_carrier("enp1s0", False)
        fake.remove("enp2s0")
        _, event = run.next_event()
        assert event.kind == "primary-lost" and not event.ok
        assert "no carrier" in event.detail
    finally:
        run.stop()


def test_watcher_survives_an_unexpected_failure_and_acts_after_it(
    fake: FakeLinks, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in one wake-up must not leave the teams to nobody for the rest of the run."""
    teams = Teams(scene(fake), [guest_lan()])
    original = teams.layouts
    calls = {"n": 0}
    watching_again = threading.Event()

    def layouts_failing_once(links: list[Any]) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("a bug")
        watching_again.set()
        return original(links)

    teams.layouts = layouts_failing_once  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="guest_agent.autonomy"):
        run = Running(fake, teams)
        try:
            assert watching_again.wait(WAIT_S)  # after its pause, it reads the links again
            fake.remove("enp2s0")
            _, event = run.next_event()
        finally:
            run.stop()
    assert event.kind == "primary-lost" and event.ok
    assert any("unexpected failure" in r.getMessage() for r in caplog.records)


# -- a NIC is plugged -----------------------------------------------------------


def test_plugged_nic_is_bound_with_the_team_mac_under_preserve(running: Running) -> None:
    fake = running.fake
    fake.remove("enp2s0")
    running.next_event()
    plug(fake)
    team, event = running.next_event()
    assert (team, event.kind, event.device, event.ok) == ("lan", "primary-bound", "enp3s0", True)
    assert "plugged, matches its rule" in event.reason
    lan = running.teams.states()[0]
    assert lan.active_member == "enp3s0" and lan.mac == OLD_MAC
    assert fake.get("enp3s0").mac == OLD_MAC and fake.get("enp3s0").permanent_mac == NEW_MAC
    assert enslaves(fake, "enp3s0") == 1


def test_plugged_nic_under_follow_takes_the_bond_mac_with_it(fake_follow: FakeLinks) -> None:
    team = guest_lan(mac_policy=MacPolicy.FOLLOW, mac=None)
    run = Running(fake_follow, Teams(fake_follow, [team]))
    try:
        fake_follow.remove("enp2s0")
        run.next_event()
        plug(fake_follow)
        _, event = run.next_event()
        assert event.kind == "primary-bound" and event.ok
        assert fake_follow.get("bond0").mac == NEW_MAC == fake_follow.get("enp3s0").mac
        assert not any(call[0] == "set_mac" for call in fake_follow.calls)
    finally:
        run.stop()


def test_plugged_nic_under_none_keeps_its_mac(fake: FakeLinks) -> None:
    run = Running(scene(fake), Teams(fake, [guest_lan(mac_policy=MacPolicy.NONE, mac=None)]))
    try:
        fake.remove("enp2s0")
        run.next_event()
        plug(fake)
        _, event = run.next_event()
        assert event.ok and run.teams.states()[0].active_member == "enp3s0"
        assert not any(call[0] == "set_mac" for call in fake.calls)
    finally:
        run.stop()


def test_nic_waits_for_udev_before_it_is_bound(
    running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    fake = running.fake
    fake.remove("enp2s0")
    running.next_event()
    caplog.set_level(logging.INFO, logger="guest_agent.autonomy")
    plug(fake, name="eth0", udev_initialized=False)
    running.barrier()  # the watcher has seen eth0 and left it: udev is renaming it
    assert running.events.empty() and enslaves(fake, "eth0") == 0
    fake.update("eth0", name="enp3s0", udev_initialized=True)
    _, event = running.next_event()
    assert event.device == "enp3s0" and event.ok
    assert enslaves(fake, "enp3s0") == 1 and enslaves(fake, "eth0") == 0


def test_nic_read_under_its_old_name_is_judged_again_after_the_rename(fake: FakeLinks) -> None:
    """A dump can name a NIC eth0 after udev renamed it: its sysfs reads then find nothing
    (no PCI address, no driver).  It must be judged again, not forgotten as not wanted."""
    teams = Teams(scene(fake), [guest_lan()])
    watcher = Watcher(teams, fake, WAIT_S)
    fake.remove("enp2s0")
    watcher.step(fake.list_links())
    plug(fake, name="eth0", pci=None, pci_id=None, driver=None)  # the stale read
    assert [a for a in watcher.step(fake.list_links()) if isinstance(a, Plugged)] == []
    fake.update("eth0", name="enp3s0", pci_address=NEW_PCI, **E1000E)  # read again
    (action,) = watcher.step(fake.list_links())
    assert isinstance(action, Plugged) and action.link.name == "enp3s0"


def test_nic_present_at_start_is_bound(fake: FakeLinks) -> None:
    """An agent (re)started after the orchestrator's plug finds the NIC in its first dump."""
    scene(fake).remove("enp2s0")
    plug(fake)
    run = Running(fake, Teams(fake, [guest_lan()]))
    try:
        _, event = run.next_event()
        assert event.kind == "primary-bound" and "present at start" in event.reason
        assert run.teams.states()[0].active_member == "enp3s0"
    finally:
        run.stop()


def test_second_matching_nic_is_not_bound_beside_a_primary(running: Running) -> None:
    """enp2s0 is still the active primary: a second e1000e is not made a second one."""
    fake = running.fake
    plug(fake)
    watcher = Watcher(running.teams, fake, WAIT_S)
    (action,) = [a for a in watcher.step(fake.list_links()) if isinstance(a, Plugged)]
    watcher.act(action)
    assert enslaves(fake, "enp3s0") == 0
    assert running.teams.states()[0].active_member == "enp2s0"


def test_nic_matching_two_teams_is_left_alone_and_logged(
    fake: FakeLinks, caplog: pytest.LogCaptureFixture
) -> None:
    teams = Teams(
        scene(fake), [guest_lan(), db_team(managed_by=ManagedBy.GUEST, primary_rule=RULE)]
    )
    watcher = Watcher(teams, fake, WAIT_S)
    watcher.step(fake.list_links())
    plug(fake)
    with caplog.at_level(logging.INFO, logger="guest_agent.autonomy"):
        assert watcher.step(fake.list_links()) == []
        assert watcher.step(fake.list_links()) == []  # logged once, still left alone
    lines = [r.getMessage() for r in caplog.records if "enp3s0" in r.getMessage()]
    assert len(lines) == 1 and "matches teams lan, db; leaving it alone" in lines[0]
    assert enslaves(fake, "enp3s0") == 0


def test_another_teams_configured_primary_is_not_taken_even_unbound(fake: FakeLinks) -> None:
    """An agent-owned team's `primary` that it could not bind yet stays that team's."""
    db = db_team(primary=DeviceMatch(mac=NEW_MAC))
    teams = Teams(scene(fake), [guest_lan(), db])
    watcher = Watcher(teams, fake, WAIT_S)
    fake.remove("enp2s0")
    watcher.step(fake.list_links())
    plug(fake)  # an e1000e, as lan's rule says, but db's configured primary
    assert [a for a in watcher.step(fake.list_links()) if isinstance(a, Plugged)] == []


def test_nic_matching_no_team_is_left_alone_and_logged(running: Running) -> None:
    fake = running.fake
    line = running.barrier(name="enp7s0")
    assert "matches no guest-managed team; left alone" in line
    assert enslaves(fake, "enp7s0") == 0 and running.events.empty()


def test_nic_released_on_purpose_is_not_bound_again(
    running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    fake = running.fake
    caplog.set_level(logging.INFO, logger="guest_agent.autonomy")
    fake.release(fake.get("enp2s0").index)  # an admin's `ip link set enp2s0 nomaster`
    _, event = running.next_event()
    assert event.kind == "primary-lost" and "released from bond0" in event.reason
    running.barrier()
    assert enslaves(fake, "enp2s0") == 0 and running.events.empty()


# -- one operation per team: the coordinator's bind and the agent's ------------


def _wait_call(fake: FakeLinks, call: tuple[Any, ...]) -> None:
    with fake.cond:
        assert fake.cond.wait_for(lambda: call in fake.calls, WAIT_S)


def _plugged_while_binding(fake: FakeLinks) -> tuple[Teams, Watcher, Plugged]:
    """lan's primary gone, an e1000e plugged whose link comes 0.3 s after enslaving (its
    autonegotiation), and the watcher's action for it, not yet done."""
    teams = Teams(scene(fake), [guest_lan()])
    watcher = Watcher(teams, fake, WAIT_S)
    fake.remove("enp2s0")
    watcher.step(fake.list_links())
    fake.carrier_delay[fake._next] = 0.3
    plug(fake)
    (action,) = watcher.step(fake.list_links())
    assert isinstance(action, Plugged) and action.link.name == "enp3s0"
    return teams, watcher, action


def test_agent_first_then_the_coordinators_bind_of_the_same_nic_sees_it_done(
    fake: FakeLinks,
) -> None:
    teams, watcher, action = _plugged_while_binding(fake)
    agent = threading.Thread(target=watcher.act, args=(action,))
    agent.start()
    _wait_call(fake, ("enslave", "enp3s0", "bond0"))  # the agent holds the team now
    result = teams.bind_primary("lan", NEW_PCI, None, None, deadline_in(WAIT_S))
    agent.join(WAIT_S)
    assert result.device == "enp3s0" and result.team.active_member == "enp3s0"
    assert enslaves(fake, "enp3s0") == 1
    event = teams.states()[0].last_event
    assert event is not None and event.ok and event.kind == "primary-bound"


def test_coordinator_first_then_the_agents_bind_of_the_same_nic_sees_it_done(
    fake: FakeLinks,
) -> None:
    teams, watcher, action = _plugged_while_binding(fake)
    results: list[Any] = []
    coordinator = threading.Thread(
        target=lambda: results.append(
            teams.bind_primary("lan", NEW_PCI, None, None, deadline_in(WAIT_S))
        )
    )
    coordinator.start()
    _wait_call(fake, ("enslave", "enp3s0", "bond0"))  # the coordinator's bind holds the team
    watcher.act(action)  # waits for the team, then finds enp3s0 active: nothing to do
    coordinator.join(WAIT_S)
    assert results and results[0].team.active_member == "enp3s0"
    assert enslaves(fake, "enp3s0") == 1
    assert teams.states()[0].last_event is None  # the agent did nothing, so reports nothing


# -- autonomy off: the coordinator's teams are untouched ------------------------


def test_coordinator_managed_teams_get_no_actions(fake: FakeLinks) -> None:
    teams = Teams(scene(fake), [lan_team(), db_team()])
    watcher = Watcher(teams, fake, WAIT_S)
    assert watcher.step(fake.list_links()) == []
    fake.remove("enp2s0")
    plug(fake)
    assert watcher.step(fake.list_links()) == []


def test_coordinator_managed_team_message_is_what_it_was(fake: FakeLinks) -> None:
    state = Teams(scene(fake), [lan_team()]).states()[0]
    message = team_to_pb(state)
    assert not message.managed_by_guest and not message.HasField("last_event")
    old = pb.TeamState()
    old.CopyFrom(message)
    old.ClearField("managed_by_guest")
    assert message.SerializeToString() == old.SerializeToString()
    assert {f.number for f, _ in message.ListFields()} <= set(range(1, 12))


def test_agent_without_guest_managed_teams_starts_no_watcher(
    fake: FakeLinks, short_tmp: Path
) -> None:
    cfg = config.AgentConfig(
        socket=str(short_tmp / "run" / "agent.sock"),
        teams=(lan_team(),),
        virtio_serial=config.SerialConfig(enabled=False),
        vsock=config.VsockConfig(enabled=False),
    )
    agent = server.start(cfg, scene(fake))
    try:
        assert agent.watcher is None
        assert not any(t.name == "autonomy" for t in threading.enumerate())
    finally:
        agent.stop()


def test_get_state_says_why_over_grpc(running: Running, short_tmp: Path) -> None:
    path = str(short_tmp / "run" / "agent.sock")
    servicer = GuestAgentServicer(running.teams, OperationLog(8), WAIT_S, ["managed-by:guest"])
    grpc_server = server.build_server(path, servicer, 64 * 1024, frozenset(config.ALL_RPCS))
    try:
        with stubs(f"unix:{path}") as (stub, _):
            before = stub.GetState(pb.GetStateRequest(operation_id="s1"))
            assert before.teams[0].managed_by_guest and not before.teams[1].managed_by_guest
            assert not before.teams[0].HasField("last_event")
            running.fake.remove("enp2s0")
            _, event = running.next_event()
            after = stub.GetState(pb.GetStateRequest(operation_id="s2")).teams[0]
    finally:
        grpc_server.stop(None).wait()
    assert after.active_member == "enp1s0"
    reported = after.last_event
    assert (reported.kind, reported.device, reported.ok) == ("primary-lost", "enp2s0", True)
    assert reported.reason == event.reason and reported.detail == "on standby enp1s0"
    assert reported.unix_ms == event.unix_ms > 0
