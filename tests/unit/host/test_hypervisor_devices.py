"""The real Hypervisor's device logic on libvirt's test driver (test:///default).

The test driver keeps a domain's live and persistent definitions apart and refuses a
detach of a device that is not there ("no device found with alias"), as QEMU's driver
does; it cannot hot-unplug an interface, so what it proves is the deciding around the
calls: whether a device is there, and which definitions a detach is asked of.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

libvirt = pytest.importorskip("libvirt")

from host.domain.domain_xml import parse_domain  # noqa: E402
from host.hypervisor import Domain, Hypervisor, HypervisorError  # noqa: E402

TEAMS = """<ptmig:teams xmlns:ptmig="https://ptmig.dev/xmlns/teams/1">
  <team name="lan" pool="lab" mac-policy="preserve" standby-mac="52:54:00:00:00:01">
    <primary kind="emulated" alias="ua-ptmig-lan-1" mac="52:54:00:aa:00:01" tap="t1"/>
  </team></ptmig:teams>"""


def nic(alias: str, mac: str) -> str:
    return (
        f"<interface type='network'><mac address='{mac}'/><source network='default'/>"
        f"<alias name='{alias}'/></interface>"
    )


def domain_xml(*devices: str) -> str:
    return (
        "<domain type='test'><name>drift</name><uuid>" + UUID + "</uuid><memory>65536</memory>"
        f"<os><type>hvm</type></os><metadata>{TEAMS}</metadata>"
        f"<devices>{''.join(devices)}</devices></domain>"
    )


UUID = "5e6b7c8d-0000-4000-8000-000000000012"
LAN_1 = nic("ua-ptmig-lan-1", "52:54:00:aa:00:01")
LAN_10 = nic("ua-ptmig-lan-10", "52:54:00:aa:00:10")


@pytest.fixture
def hv() -> Iterator[Hypervisor]:
    """The test driver's state is one per process: the domain goes again after each test."""
    with Hypervisor("test:///default") as hv:
        yield hv
        dom = hv._conn.lookupByName("drift")
        if dom.isActive():
            dom.destroy()
        dom.undefine()


def running(hv: Hypervisor, *devices: str) -> Domain:
    hv._conn.defineXML(domain_xml(*devices)).create()
    return hv.domain("drift")


def test_a_device_is_there_only_if_a_device_has_its_alias(hv: Hypervisor) -> None:
    """The metadata names ua-ptmig-lan-1, and ua-ptmig-lan-10 starts with it."""
    dom = running(hv, LAN_10)
    teams = parse_domain(dom.xml()).teams
    assert teams is not None and teams.teams[0].primary is not None
    assert teams.teams[0].primary.alias == "ua-ptmig-lan-1"  # the metadata names it
    assert not dom.has_device("ua-ptmig-lan-1")
    assert not dom.has_device("ua-ptmig-lan-1", inactive=True)
    assert dom.has_device("ua-ptmig-lan-10")
    assert dom.has_device("ua-ptmig-lan-10", inactive=True)


def test_unplugging_a_device_that_is_gone_is_done_at_once(hv: Hypervisor) -> None:
    dom = running(hv, LAN_10)
    with pytest.raises(libvirt.libvirtError, match="no device found"):
        dom._dom.detachDeviceAlias("ua-ptmig-lan-1", libvirt.VIR_DOMAIN_AFFECT_LIVE)

    assert dom.detach_and_wait("ua-ptmig-lan-1", 5) == 0.0
    assert dom.has_device("ua-ptmig-lan-10")


def test_a_device_gone_live_but_still_defined_is_removed_from_the_definition(
    hv: Hypervisor,
) -> None:
    """virsh detach-device-alias without --config: only the definition is asked."""
    dom = running(hv, LAN_10)
    hv._conn.defineXML(domain_xml(LAN_1, LAN_10))  # the next boot's definition has it
    assert not dom.has_device("ua-ptmig-lan-1")
    assert dom.has_device("ua-ptmig-lan-1", inactive=True)
    assert dom._affect("ua-ptmig-lan-1") & libvirt.VIR_DOMAIN_AFFECT_CONFIG

    # The test driver cannot change a definition by alias; that it was asked is the point.
    with pytest.raises(HypervisorError, match="remove ua-ptmig-lan-1 from drift's definition"):
        dom.detach_and_wait("ua-ptmig-lan-1", 5)


def test_a_plugged_device_is_detached_live(hv: Hypervisor) -> None:
    dom = running(hv, LAN_1)
    with pytest.raises(HypervisorError, match="detach ua-ptmig-lan-1 from drift"):
        dom.detach_and_wait("ua-ptmig-lan-1", 5)  # the test driver cannot unplug NICs


def test_attach_and_detach_affect_the_definition_only_where_it_has_the_device(
    hv: Hypervisor,
) -> None:
    dom = running(hv, LAN_10)
    live, config = libvirt.VIR_DOMAIN_AFFECT_LIVE, libvirt.VIR_DOMAIN_AFFECT_CONFIG
    assert dom._affect() == live | config  # an attach: both
    assert dom._affect("ua-ptmig-lan-10") == live | config
    assert dom._affect("ua-ptmig-lan-1") == live  # named in the metadata only


class _OneRegistrationPerEvent:
    """A connection as libvirt's client library keeps domain event callbacks: one per
    (domain, event) on a connection; a second is refused as "already tracked"."""

    def __init__(self) -> None:
        self.callbacks: dict[int, tuple[int, object]] = {}
        self._next = 1

    def domainEventRegisterAny(self, dom: object, event_id: int, cb: object, opaque: object) -> int:
        if any(e == event_id for e, _ in self.callbacks.values()):
            raise libvirt.libvirtError("invalid argument: event callback already tracked")
        self._next += 1
        self.callbacks[self._next] = (event_id, cb)
        return self._next

    def domainEventDeregisterAny(self, cb_id: int) -> None:
        del self.callbacks[cb_id]


class _VirDomain:
    def __init__(self, conn: _OneRegistrationPerEvent) -> None:
        self.conn = conn

    def connect(self) -> _OneRegistrationPerEvent:
        return self.conn

    def name(self) -> str:
        return "drift"


def test_devices_added_records_the_events_and_a_second_block_at_once_records_nothing() -> None:
    """Two teams plugged in parallel (a repair of each) must not fail the second's plug
    because libvirt tracks one DEVICE_ADDED callback per domain and connection."""
    conn = _OneRegistrationPerEvent()
    dom = Domain(None, _VirDomain(conn))  # type: ignore[arg-type]
    added = libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED
    with dom.devices_added() as first:
        ((event_id, callback),) = conn.callbacks.values()
        assert event_id == added
        callback(conn, None, "ua-ptmig-lan-1", added)  # type: ignore[operator]
        with dom.devices_added() as second:
            assert second == {}
        assert list(first) == ["ua-ptmig-lan-1"]
    assert conn.callbacks == {}
