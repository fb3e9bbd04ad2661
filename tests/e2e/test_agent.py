"""The guest agent in the real guest kernel, through its real transport (virtio-serial via
libvirt's channel stream), while the client sends at 1000 packets per second.

The tests share one guest per suite but not an order: each brings the teams to the state
it starts from (a primary plugged and bound, on the standby, no primary) through the
fixtures below, whatever the tests before it left.
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Callable

import pytest
from migration_checks import traffic

from host.agent_client import AgentClient, AgentError, LinkState, TeamState
from host.domain.domain_xml import device_aliases
from lab import (
    GUEST_IP,
    STANDBY_MAC,
    TEAM_MAC,
    WAN_GUEST_IP,
    WAN_PRIMARY_MAC,
    WAN_STANDBY_MAC,
)
from lab.guest import PRIMARY_NIC, WAN_PRIMARY_NIC, Nic
from lab.vmlab import VmLab

#: The guest distributions this module runs on, each in its own lab, tests in file order.
#: Debian 13 was left out for a while: one full run saw its GetState name team wan's active
#: member outside the bond the agent was building at start-up.  The agent now reads its
#: state only from a link dump that agrees with itself, between team operations
#: (``Teams.snapshot``, ``links.contradiction``).
GUEST_SUITES_UNDER_TEST = ["bookworm", "trixie"]
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.parametrize("lab", GUEST_SUITES_UNDER_TEST, indirect=True, scope="module"),
]

#: Packets at 1000/s (= ms).  A switch loses 0-5 here (a rehearsal: 2-3); the bound leaves
#: room for lab noise: QEMU's TCG vCPUs share the machine's two cores with the pinger, and a
#: descheduled vCPU shows as tens of ms lost (54 ms seen once).  See test_coordinator.
MAX_SWITCH_LOSS = 100


#: The NICs each team's primary can be: the lab's own, and one with another MAC that a
#: rebind test plugs in its place.
LAN_NICS = (PRIMARY_NIC, Nic("52:54:00:cc:00:01", "ptv-hot-lan", "ua-hot-lan"))
WAN_NICS = (WAN_PRIMARY_NIC, Nic("52:54:00:cc:00:02", "ptv-hot-wan", "ua-hot-wan"))


def team(client: AgentClient, name: str) -> TeamState:
    return next(t for t in client.state().teams if t.name == name)


def link_by_mac(client: AgentClient, mac: str) -> LinkState:
    return next(link for link in client.state().links if link.permanent_mac == mac)


def op(name: str) -> str:
    return f"e2e-{name}-{time.time_ns()}"


@pytest.fixture(scope="module")
def on_hosta(lab: VmLab) -> VmLab:
    if lab.where() != "hosta":
        lab.migrate("hosta")
    return lab


def plugged(lab: VmLab, nics: tuple[Nic, ...]) -> list[Nic]:
    aliases = device_aliases(lab.domain().XMLDesc(0))
    return [nic for nic in nics if nic.alias in aliases]


def plug_one(lab: VmLab, nics: tuple[Nic, ...]) -> Nic:
    """The team's primary NIC: the one plugged, or the first of *nics*, plugged now."""
    present = plugged(lab, nics)
    if present:
        return present[0]
    lab.attach_nic(nics[0])
    lab.wait_for_guest_mac(nics[0].mac)
    return nics[0]


def unplug_all(lab: VmLab, client: AgentClient, name: str, nics: tuple[Nic, ...]) -> None:
    """The team on its standby with no primary plugged."""
    client.use_standby(name, release_primary=True, operation_id=op(f"{name}-clear"))
    for nic in plugged(lab, nics):
        lab.detach_nic(nic.alias)


@pytest.fixture
def lan_primary(on_hosta: VmLab) -> Nic:
    """Team lan's primary NIC is plugged (it may be bound or not)."""
    return plug_one(on_hosta, LAN_NICS)


@pytest.fixture
def lan_on_primary(lan_primary: Nic, agent_of: Callable[[], AgentClient]) -> Nic:
    """Team lan is bound to its plugged primary and sends on it."""
    agent_of().bind_primary("lan", operation_id=op("lan-bind"), mac=lan_primary.mac, timeout=30)
    return lan_primary


def test_agent_answers_over_virtio_serial(
    on_hosta: VmLab, agent_of: Callable[[], AgentClient], record_property: pytest.RecordProperty
) -> None:
    client = agent_of()
    version = client.version()
    assert {"use-standby", "bind-primary", "transport:virtio-serial"} <= set(version.capabilities)
    assert client.healthy()
    client.state()  # the first may wait for the agent's start-up set-up of team wan
    t0 = time.monotonic()
    for _ in range(5):
        state = client.state()
    rtt = (time.monotonic() - t0) / 5
    record_property("get_state_rtt_ms", round(rtt * 1000, 1))
    print(f"GetState round trip over virtio-serial: {rtt * 1000:.1f} ms")
    teams = {t.name: t for t in state.teams}
    assert teams["lan"].bond_present and teams["lan"].active_member
    assert teams["wan"].fail_over_mac in ("active", "follow")


def test_agent_binds_wan_primary_at_start_up(
    on_hosta: VmLab, agent_of: Callable[[], AgentClient]
) -> None:
    """Team wan is agent-owned: at start-up the agent makes bond1 and binds the primary its
    configuration names, which takes a few seconds (the e1000e's link comes up about 3 s
    after enslaving).  So: the primary plugged while the agent is stopped, then a start."""
    unplug_all(on_hosta, agent_of(), "wan", WAN_NICS)
    on_hosta.exec("systemctl stop ptmig-agent").check()
    try:
        on_hosta.attach_nic(WAN_PRIMARY_NIC)
        on_hosta.wait_for_guest_mac(WAN_PRIMARY_NIC.mac)
    finally:
        on_hosta.exec("systemctl start ptmig-agent").check()
    client = agent_of()
    deadline = time.monotonic() + 60
    while team(client, "wan").active_member != link_by_mac(client, WAN_PRIMARY_MAC).name:
        assert time.monotonic() < deadline, "the agent did not bind wan's primary at start-up"
        time.sleep(1)


def test_bind_existing_primary_under_preserve(
    on_hosta: VmLab, agent_of: Callable[[], AgentClient], lan_primary: Nic
) -> None:
    client = agent_of()
    client.use_standby("lan", release_primary=False, operation_id=op("lan-off"))
    with traffic(GUEST_IP, "bind-lan") as loss:
        reply = client.bind_primary("lan", operation_id=op("bind"), mac=lan_primary.mac, timeout=30)
    primary = link_by_mac(client, lan_primary.mac)
    assert reply.device == primary.name
    assert reply.team.active_member == primary.name
    assert primary.carrier
    assert primary.mac == TEAM_MAC, "preserve: the primary carries the team's MAC"
    assert loss["lost"] <= MAX_SWITCH_LOSS, loss


def test_switch_to_standby_under_traffic(
    on_hosta: VmLab,
    agent_of: Callable[[], AgentClient],
    lan_on_primary: Nic,
    record_property: pytest.RecordProperty,
) -> None:
    client = agent_of()
    assert team(client, "lan").active_member == link_by_mac(client, lan_on_primary.mac).name
    with traffic(GUEST_IP, "switch-lan") as loss:
        reply = client.use_standby("lan", release_primary=False, operation_id=op("switch"))
    standby = link_by_mac(client, STANDBY_MAC)
    assert reply.team.active_member == standby.name
    record_property("switch_lost", loss["lost"])
    assert loss["lost"] <= MAX_SWITCH_LOSS, loss


def test_retried_switch_is_replayed_not_redone(
    on_hosta: VmLab, agent_of: Callable[[], AgentClient], lan_on_primary: Nic
) -> None:
    client = agent_of()
    same = op("replay")
    first = client.use_standby("lan", release_primary=False, operation_id=same)
    client.bind_primary("lan", operation_id=op("lan-back"), mac=lan_on_primary.mac, timeout=30)
    again = client.use_standby("lan", release_primary=False, operation_id=same)
    assert not first.replayed and again.replayed
    assert (
        again.team.active_member
        == first.team.active_member
        == link_by_mac(client, STANDBY_MAC).name
    )
    # replayed, not redone: the bind between the two left lan on its primary
    assert team(client, "lan").active_member == link_by_mac(client, lan_on_primary.mac).name


def test_unplug_after_switch_loses_nothing(
    on_hosta: VmLab,
    agent_of: Callable[[], AgentClient],
    lan_on_primary: Nic,
    record_property: pytest.RecordProperty,
) -> None:
    client = agent_of()
    client.use_standby("lan", release_primary=False, operation_id=op("lan-switch"))
    assert team(client, "lan").active_member == link_by_mac(client, STANDBY_MAC).name
    with traffic(GUEST_IP, "unplug-lan") as loss:
        on_hosta.detach_nic(lan_on_primary.alias)
    record_property("unplug_lost", loss["lost"])
    # 0 here; an unplug of the *active* NIC costs ~80 ms (lab-notes), half that fails
    assert loss["lost"] <= 40, loss
    state = team(agent_of(), "lan")
    assert state.primary == "" and list(state.members) == [state.standby]


def test_new_mac_rebound_under_preserve(
    on_hosta: VmLab, agent_of: Callable[[], AgentClient], record_property: pytest.RecordProperty
) -> None:
    client = agent_of()
    unplug_all(on_hosta, client, "lan", LAN_NICS)
    new = LAN_NICS[1]
    with traffic(GUEST_IP, "rebind-lan") as loss:
        on_hosta.attach_nic(new)
        reply = client.bind_primary("lan", operation_id=op("rebind"), mac=new.mac, timeout=30)
    device = link_by_mac(client, new.mac)
    assert reply.device == device.name == reply.team.active_member
    assert device.mac == TEAM_MAC, "preserve: the new device was given the team's MAC"
    assert reply.team.mac == TEAM_MAC
    record_property("rebind_preserve_lost", loss["lost"])
    assert loss["lost"] <= MAX_SWITCH_LOSS, loss


def test_new_mac_rebound_under_follow(
    on_hosta: VmLab, agent_of: Callable[[], AgentClient], record_property: pytest.RecordProperty
) -> None:
    client = agent_of()
    old = plug_one(on_hosta, WAN_NICS)
    client.bind_primary("wan", operation_id=op("wan-on"), mac=old.mac, timeout=30)
    new = next(nic for nic in WAN_NICS if nic != old)
    with traffic(WAN_GUEST_IP, "switch-wan") as switch_loss:
        reply = client.use_standby("wan", release_primary=True, operation_id=op("wan-switch"))
    assert reply.team.active_member == link_by_mac(client, WAN_STANDBY_MAC).name
    assert reply.team.mac == WAN_STANDBY_MAC, "follow: the team's MAC is the active member's"
    with traffic(WAN_GUEST_IP, "rebind-wan") as rebind_loss:
        on_hosta.detach_nic(old.alias)
        on_hosta.attach_nic(new)
        reply = client.bind_primary("wan", operation_id=op("wan-bind"), mac=new.mac, timeout=30)
    device = link_by_mac(client, new.mac)
    assert reply.team.active_member == device.name
    assert device.mac == new.mac, "follow: the new device keeps its own MAC"
    assert reply.team.mac == new.mac, "follow: the bond took the new device's MAC"
    record_property("switch_follow_lost", switch_loss["lost"])
    record_property("rebind_follow_lost", rebind_loss["lost"])
    assert switch_loss["lost"] <= MAX_SWITCH_LOSS, switch_loss
    assert rebind_loss["lost"] <= MAX_SWITCH_LOSS, rebind_loss


def _summary(client: AgentClient) -> list[tuple[str, ...]]:
    state = client.state()
    return sorted((t.name, t.active_member, t.mac, *sorted(t.members)) for t in state.teams)


@pytest.mark.parametrize(
    ("call", "code"),
    [
        (
            lambda c: c.use_standby("nosuchteam", release_primary=False, operation_id=op("x")),
            "NOT_FOUND",
        ),
        (
            lambda c: c.bind_primary("lan", operation_id=op("x"), mac="52:54:00:zz:00:01"),
            "INVALID_ARGUMENT",
        ),
        (
            lambda c: c.bind_primary("lan", operation_id=op("x"), mac=WAN_STANDBY_MAC, timeout=5),
            "FAILED_PRECONDITION",
        ),
        (
            lambda c: c.bind_primary(
                "lan", operation_id=op("x"), mac="52:54:00:de:ad:01", timeout=2
            ),
            None,
        ),
        (
            lambda c: c.use_standby("x" * 300_000, release_primary=False, operation_id=op("x")),
            "RESOURCE_EXHAUSTED",
        ),
    ],
    ids=["unknown-team", "malformed-mac", "member-of-another-team", "unknown-device", "oversized"],
)
def test_bad_input_gets_a_clear_error_and_changes_nothing(
    on_hosta: VmLab,
    agent_of: Callable[[], AgentClient],
    call: Callable[[AgentClient], object],
    code: str | None,
) -> None:
    client = agent_of()
    before = _summary(client)
    with pytest.raises(AgentError) as exc:
        call(client)
    if code is None:  # a device that never appears: not found in time
        assert exc.value.code in ("NOT_FOUND", "DEADLINE_EXCEEDED"), exc.value
    else:
        assert exc.value.code == code, exc.value
    assert "Traceback" not in exc.value.message
    assert _summary(client) == before


def test_session_survives_garbage_and_host_reconnects(
    on_hosta: VmLab, agent_of: Callable[[], AgentClient]
) -> None:
    from ptmig import serial_session
    from ptmig.serial_session import AGENT_CHANNEL

    from host.hypervisor import Hypervisor
    from lab.guest import DOMAIN_NAME

    hv = Hypervisor(on_hosta.hosts[on_hosta.where()].uri)
    try:
        dom = hv.domain(DOMAIN_NAME)
        # a host that connects, sends junk and half a HELLO, and vanishes
        stream = dom.open_channel(AGENT_CHANNEL)
        hello = serial_session.encode(serial_session.FrameType.HELLO, b"\x01" * 16)
        stream.sendall(b"PRI * HTTP/2.0 garbage" + hello[:20])
        stream.close()
    finally:
        hv.close()
    for _ in range(3):  # each client is a fresh session and a fresh HTTP/2 connection
        client = agent_of()
        assert client.healthy()
        client.close()


def test_agent_reachable_again_after_live_migration(
    on_hosta: VmLab, agent_of: Callable[[], AgentClient]
) -> None:
    before = agent_of()
    assert before.healthy()
    on_hosta.migrate("hostb")
    on_hosta.check_health()
    after = agent_of()  # the destination's channel, a new session
    assert after.healthy()
    assert {t.name for t in after.state().teams} == {"lan", "wan"}
    on_hosta.migrate("hosta")
    on_hosta.check_health()


VSOCK_PROBE = r"""
import os, socket, sys, tempfile, threading, time
sys.path.insert(0, "/usr/lib/ptmig-agent")
import grpc
from ptmig.v1 import guest_agent_pb2 as pb, guest_agent_pb2_grpc as pbg
path = tempfile.mkdtemp() + "/relay.sock"
listener = socket.socket(socket.AF_UNIX)
listener.bind(path)
listener.listen(1)
def pump(a, b):
    while True:
        data = a.recv(65536)
        if not data:
            break
        b.sendall(data)
def agent_vsock():
    # Soon after boot the agent's listener may not be open yet: it retries every 2 s
    # while the guest has no vsock transport, and no connection reaches it till then.
    deadline = time.monotonic() + 20
    while True:
        vsock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        try:
            vsock.connect((1, 7031))  # VMADDR_CID_LOCAL: the guest's own vsock loopback
            return vsock
        except (ConnectionResetError, ConnectionRefusedError):
            vsock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
def relay():
    conn, _ = listener.accept()
    vsock = agent_vsock()
    threading.Thread(target=pump, args=(vsock, conn), daemon=True).start()
    pump(conn, vsock)
threading.Thread(target=relay, daemon=True).start()
reply = pbg.HealthStub(grpc.insecure_channel("unix:" + path)).Check(
    pb.HealthCheckRequest(), timeout=40)
print("vsock-health", reply.status, flush=True)
os._exit(0)  # the relay's daemon threads must not race interpreter shutdown
"""


def test_vsock_listener_answers_through_guest_loopback(on_hosta: VmLab) -> None:
    """No vhost-vsock on this machine: the guest's vsock loopback stands in for the host."""
    script = base64.b64encode(VSOCK_PROBE.encode()).decode()
    out = on_hosta.exec(
        f"echo {script} | base64 -d > /tmp/vsock_probe.py && python3 /tmp/vsock_probe.py",
        timeout=90,
    ).check()
    assert "vsock-health 1" in out  # SERVING


#: systemd's "OK" band ends below 2.0.  As root with only CAP_NET_ADMIN the unit scored 1.8
#: on Debian 12; as its own user 1.5 there, and 1.8 by Debian 13's systemd 257, which
#: weighs more settings.  The bounds guard against a hardening regression per suite.
MAX_AGENT_EXPOSURE = {"bookworm": 1.6, "trixie": 1.9}


def test_agent_unit_exposure_as_the_guests_systemd_rates_it(
    on_hosta: VmLab, record_property: Callable[[str, object], None]
) -> None:
    """The installed, running unit, as Debian 12's systemd reviews it (not the offline file)."""
    out = on_hosta.exec("systemd-analyze security --no-pager ptmig-agent.service").check()
    found = re.search(r"Overall exposure level for ptmig-agent\.service: (\d+\.\d+)", out)
    assert found, out[-2000:]
    exposure = float(found.group(1))
    suite = on_hosta.exec(". /etc/os-release; echo $VERSION_CODENAME").check().strip()
    counted = [line.strip() for line in out.splitlines() if "✗" in line]
    print(f"systemd-analyze security ptmig-agent.service on {suite}: {exposure}; still counts:")
    print("\n".join(counted))
    record_property("agent_unit_exposure", exposure)
    assert exposure <= MAX_AGENT_EXPOSURE[suite], "\n".join(counted)
    capabilities = on_hosta.exec(
        "grep CapEff /proc/$(systemctl show -p MainPID --value ptmig-agent)/status"
    ).check()
    assert int(capabilities.split()[-1], 16) == 1 << 12, capabilities  # CAP_NET_ADMIN only
    owner = on_hosta.exec(
        "stat -c '%U %G' /proc/$(systemctl show -p MainPID --value ptmig-agent)"
    ).check()
    assert owner.split() == ["ptmig-agent", "ptmig-agent"], owner  # not root
    port = on_hosta.exec("stat -L -c '%G %a' /dev/virtio-ports/org.ptmig.agent.0").check()
    assert port.split() == ["ptmig-agent", "660"], port  # udev gave the agent its channel
