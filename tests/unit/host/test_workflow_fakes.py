"""The fakes the workflow tests stand on: same face as the real classes, libvirt's rules."""

from __future__ import annotations

import inspect

import pytest
from workflow_fakes import VM2, A, B, FakeAgent, FakeDomain, FakeHypervisor, World

from host.agent_client import AgentClient, AgentError
from host.domain.devices import attachment_for_slot
from host.domain.domain_xml import parse_domain, strip_primary
from host.domain.pools import EmulatedSlot, free_slots, parse_pool_network
from host.hypervisor import DeviceRemovalError, Domain, Hypervisor, HypervisorError


def public_methods(cls: type) -> list[str]:
    """Every public method of *cls* (and its context manager), read from the class."""
    return sorted(
        name
        for name, _ in inspect.getmembers(cls, inspect.isfunction)
        if not name.startswith("_") or name in ("__enter__", "__exit__")
    )


def public_properties(cls: type) -> set[str]:
    return {name for name, value in inspect.getmembers(cls) if isinstance(value, property)}


#: The real classes the workflow may call any public method of, and their fakes.
PAIRS = [(Hypervisor, FakeHypervisor), (Domain, FakeDomain)]


def test_the_parity_list_is_the_real_classes() -> None:
    assert {"domain", "all_domain_xml", "__enter__"} <= set(public_methods(Hypervisor))
    assert {"detach_and_wait", "job_running", "migrate", "xml"} <= set(public_methods(Domain))


@pytest.mark.parametrize(
    ("real", "fake", "name"),
    [(real, fake, name) for real, fake in PAIRS for name in public_methods(real)],
)
def test_the_fakes_have_the_real_signatures(real: type, fake: type, name: str) -> None:
    expected = inspect.signature(getattr(real, name))
    got = inspect.signature(getattr(fake, name))
    assert [(p.name, p.kind, p.default) for p in got.parameters.values()] == [
        (p.name, p.kind, p.default) for p in expected.parameters.values()
    ]


@pytest.mark.parametrize(("real", "fake"), PAIRS)
def test_the_fakes_have_the_real_properties(real: type, fake: type) -> None:
    assert public_properties(real) <= public_properties(fake)


@pytest.mark.parametrize(
    "name", ["version", "healthy", "state", "use_standby", "bind_primary", "close"]
)
def test_fake_agent_is_the_real_client(name: str) -> None:
    assert getattr(FakeAgent, name) is getattr(AgentClient, name)


def test_domain_xml_reads_like_libvirts() -> None:
    world = World()
    hv = world.connect(A)
    live = hv.domain("vm1").xml()
    inactive = hv.domain("vm1").xml(inactive=True)

    assert '<ptmig:teams xmlns:ptmig="https://ptmig.dev/xmlns/teams/1">' in live
    assert "<alias name='ua-ptmig-lan-1'/>" in live and "<alias name='ua-ptmig-lan-1'/>" in inactive
    assert "id='1'" in live and " id=" not in inactive.splitlines()[0]
    info = parse_domain(live)
    assert info.teams is not None and [t.name for t in info.teams.teams] == ["lan", "wan"]
    assert info.device("ua-ptmig-lan-1").guest_pci_address == "0000:03:00.0"  # type: ignore[union-attr]
    pool = parse_pool_network(hv.network_xml("ptmig-pool-lab") or "")
    assert [s.tap for s in free_slots(pool, hv.all_domain_xml())] == ["ptv-a3", "ptv-a4"]
    stripped = parse_domain(strip_primary(inactive, info.teams.teams[0].primary))  # type: ignore[arg-type]
    assert [i.target_dev for i in stripped.interfaces] == ["ptv-standby", "ptv-wstandby", "ptv-a2"]


def test_attach_refuses_what_libvirt_refuses() -> None:
    world = World()
    hv = world.connect(A)
    vm1 = hv.domain("vm1")
    busy = attachment_for_slot(
        EmulatedSlot("lab", "br-g", "e1000e", "ptv-a1", "52:54:00:ba:00:09"), alias="ua-ptmig-lan-7"
    )
    with pytest.raises(HypervisorError, match="non unique alias"):
        vm1.attach(busy.device_xml.replace("ua-ptmig-lan-7", "ua-ptmig-lan-1"))
    with pytest.raises(HypervisorError, match="network device with mac"):
        vm1.attach(
            busy.device_xml.replace("52:54:00:ba:00:09", "52:54:00:ba:00:01").replace(
                "ptv-a1", "ptv-a4"
            ),
        )

    world.add_guest(VM2)  # vm2 holds ptv-a3
    taken = attachment_for_slot(
        EmulatedSlot("lab", "br-g", "e1000e", "ptv-a3", "52:54:00:ba:00:03"), alias="ua-ptmig-lan-7"
    )
    with pytest.raises(HypervisorError, match="Unable to create tap device ptv-a3"):
        vm1.attach(taken.device_xml)

    free = attachment_for_slot(
        EmulatedSlot("lab", "br-g", "e1000e", "ptv-a4", "52:54:00:ba:00:04"), alias="ua-ptmig-lan-7"
    )
    vm1.attach(free.device_xml)
    device = parse_domain(vm1.xml()).device("ua-ptmig-lan-7")
    assert device is not None and device.guest_pci_address == "0000:05:00.0"
    assert "ua-ptmig-lan-7" in vm1.xml(inactive=True)


def test_a_held_device_stays_in_both_and_a_released_one_leaves_both() -> None:
    """Production's order: live first, the definition once the guest let go."""
    world = World()
    world.guest("vm1").hold["ua-ptmig-wan-1"] = "timeout"
    hv = world.connect(A)
    vm1 = hv.domain("vm1")

    with pytest.raises(DeviceRemovalError, match="did not release ua-ptmig-wan-1 within 3 s"):
        vm1.detach_and_wait("ua-ptmig-wan-1", 3)
    assert parse_domain(vm1.xml()).device("ua-ptmig-wan-1") is not None
    assert parse_domain(vm1.xml(inactive=True)).device("ua-ptmig-wan-1") is not None

    assert vm1.detach_and_wait("ua-ptmig-lan-1", 3) > 0
    assert parse_domain(vm1.xml()).device("ua-ptmig-lan-1") is None
    assert parse_domain(vm1.xml(inactive=True)).device("ua-ptmig-lan-1") is None
    assert world.modes("vm1")["lan"] == "standby"  # the bond failed over
    assert vm1.detach_and_wait("ua-ptmig-lan-1", 3) == 0.0


def test_a_device_gone_from_the_live_domain_is_unplugged_and_leaves_the_definition() -> None:
    """virsh detach-device-alias (live only): the metadata still names the alias."""
    world = World()
    world.detach_outside("vm1", "ua-ptmig-lan-1")
    hv = world.connect(A)
    vm1 = hv.domain("vm1")
    assert "ua-ptmig-lan-1" in vm1.xml()  # the team record
    assert not vm1.has_device("ua-ptmig-lan-1")
    assert vm1.has_device("ua-ptmig-lan-1", inactive=True)

    assert vm1.detach_and_wait("ua-ptmig-lan-1", 3) == 0.0
    assert not vm1.has_device("ua-ptmig-lan-1", inactive=True)


def test_migration_moves_the_domain_and_leaves_a_stale_handle() -> None:
    world = World()
    a, b = world.connect(A), world.connect(B)
    handle = a.domain("vm1")
    persistent = handle.xml(inactive=True)
    with pytest.raises(HypervisorError, match="does not match"):
        handle.migrate(b, persistent_xml=persistent.replace("vm1", "vm9"))

    stats = handle.migrate(b, persistent_xml=persistent)

    assert world.running_on("vm1") == [B]
    with pytest.raises(HypervisorError, match="Domain not found") as caught:
        handle.is_active()
    assert caught.value.code == 42
    assert b.domain("vm1").completed_job()["downtime"] == 42
    assert (stats.downtime_ms, stats.elapsed_ms) == (42, 1800)  # the destination's record


def test_fake_agent_replies_go_through_the_clients_checks() -> None:
    world = World()
    hv = world.connect(A)
    agent = world.agent_for(hv.domain("vm1"), 5)
    assert agent.healthy()
    reply = agent.use_standby("lan", release_primary=True, operation_id="op-1")
    assert (reply.team.active_member, list(reply.released)) == ("enp1s0", ["enp3s0"])
    assert agent.use_standby("lan", release_primary=True, operation_id="op-1").replayed
    with pytest.raises(AgentError) as caught:
        agent.use_standby("lan", release_primary=False, operation_id="op-1")
    assert caught.value.code == "INVALID_ARGUMENT"
    with pytest.raises(AgentError) as caught:
        agent.bind_primary("lan", operation_id="op-2", pci_address="0000:04:00.0")
    assert caught.value.code == "FAILED_PRECONDITION"  # wan's device

    world.tamper["BindPrimary"] = lambda r: setattr(r, "device", "x" * 16)
    with pytest.raises(AgentError) as caught:
        agent.bind_primary("lan", operation_id="op-3", pci_address="0000:03:00.0")
    assert caught.value.code == "PROTOCOL"
    agent.close()
    assert world.agents_open == 0
