"""host/hypervisor/ on libvirt's test driver (test:///default): what that driver supports.

Domains defined and looked up, metadata written and read back, devices attached to the
live domain and its definition, pool networks defined, listed, redefined and undefined,
and a migration the driver cannot do failing as a HypervisorError.  Unplugging is in
test_hypervisor_devices.py (the driver cannot hot-unplug NICs).  The driver's state is
one per process: every test names its objects uniquely and removes them.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import pytest

libvirt = pytest.importorskip("libvirt")

from host.domain.devices import emulated_nic_xml  # noqa: E402
from host.domain.domain_xml import parse_domain  # noqa: E402
from host.domain.pools import (  # noqa: E402
    EmulatedPool,
    TapSlot,
    format_pool_network,
    parse_pool_network,
)
from host.domain.teams import (  # noqa: E402
    TEAMS_NS,
    TEAMS_PREFIX,
    PrimaryDevice,
    Team,
    TeamSet,
    format_teams,
)
from host.domain.xmltree import parse_xml  # noqa: E402
from host.errors import Category  # noqa: E402
from host.hypervisor import (  # noqa: E402
    Domain,
    DomainNotFound,
    HostRefused,
    HostUnreachable,
    Hypervisor,
    HypervisorError,
    InvalidURI,
    NetworkNotFound,
)

TEAMS = TeamSet(
    (
        Team(
            "lan",
            "52:54:00:00:00:01",
            "preserve",
            "lab",
            primary=PrimaryDevice("emulated", "ua-ptmig-lan-1", mac="52:54:00:aa:00:01", tap="t1"),
        ),
    )
)


@pytest.fixture
def hv() -> Iterator[Hypervisor]:
    with Hypervisor("test:///default") as hv:
        yield hv


@pytest.fixture
def name(hv: Hypervisor) -> Iterator[str]:
    """A fresh domain name; the domain, if one was defined, goes after the test."""
    name = f"ptmig-{uuid.uuid4().hex[:8]}"
    yield name
    try:
        dom = hv._conn.lookupByName(name)
    except libvirt.libvirtError:
        return
    persistent = dom.isPersistent()
    if dom.isActive():
        dom.destroy()
    if persistent:
        dom.undefine()


def define(hv: Hypervisor, name: str, *, start: bool = True) -> Domain:
    xml = (
        f"<domain type='test'><name>{name}</name><memory>65536</memory>"
        "<os><type>hvm</type></os><devices/></domain>"
    )
    dom = hv._conn.defineXML(xml)
    if start:
        dom.create()
    return hv.domain(name)


def test_a_domain_is_found_by_name_or_uuid(hv: Hypervisor, name: str) -> None:
    dom = define(hv, name, start=False)
    assert hv.domain(dom.uuid).name == name
    assert hv.has_domain(name) and hv.has_domain(dom.uuid)
    assert not dom.is_active()
    dom._dom.create()
    assert dom.is_active()
    names = [parse_domain(xml).name for xml in hv.all_domain_xml()]
    assert name in names and "test" in names  # the driver's own domain too
    assert dom.uri == "test:///default"
    assert dom.hv is hv


def test_an_unknown_domain_is_a_hypervisor_error(hv: Hypervisor) -> None:
    with pytest.raises(DomainNotFound, match="domain 'ptmig-nonesuch'") as caught:
        hv.domain("ptmig-nonesuch")
    assert caught.value.code == libvirt.VIR_ERR_NO_DOMAIN
    assert caught.value.category is Category.NOT_FOUND
    with pytest.raises(DomainNotFound):
        hv.domain(str(uuid.uuid4()))
    assert not hv.has_domain("ptmig-nonesuch")
    assert not hv.has_domain(str(uuid.uuid4()))


def test_a_host_that_cannot_answer_is_not_a_host_without_the_domain(name: str) -> None:
    """has_domain raises when the host cannot be asked: "no" would send recovery and the
    lease's release after a VM that may well run there."""
    gone = Hypervisor("test:///default")
    gone.close()
    with pytest.raises(HostUnreachable):
        gone.has_domain(name)


def test_metadata_is_written_live_and_persistent_and_removed(hv: Hypervisor, name: str) -> None:
    dom = define(hv, name)
    dom.set_metadata(TEAMS_NS, TEAMS_PREFIX, format_teams(TEAMS))

    assert parse_domain(dom.xml()).teams == TEAMS
    assert parse_domain(dom.xml(inactive=True)).teams == TEAMS
    returned = dom._dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, TEAMS_NS, 0)
    assert parse_xml(returned, "metadata").tag == "teams"  # without its namespace

    dom.set_metadata(TEAMS_NS, TEAMS_PREFIX, None)
    assert parse_domain(dom.xml()).teams is None
    assert parse_domain(dom.xml(inactive=True)).teams is None


def test_metadata_of_an_inactive_domain_goes_into_its_definition(hv: Hypervisor, name: str) -> None:
    dom = define(hv, name, start=False)
    dom.set_metadata(TEAMS_NS, TEAMS_PREFIX, format_teams(TEAMS))
    assert parse_domain(dom.xml(inactive=True)).teams == TEAMS


def test_namespaced_metadata_is_refused_by_libvirt(hv: Hypervisor, name: str) -> None:
    dom = define(hv, name)
    with pytest.raises(HypervisorError, match="set metadata of"):
        dom.set_metadata(TEAMS_NS, TEAMS_PREFIX, format_teams(TEAMS, namespaced=True))


def test_attach_to_a_persistent_domain_asks_for_its_definition_too(
    hv: Hypervisor, name: str
) -> None:
    """The test driver attaches live only; that the definition was asked is the point."""
    dom = define(hv, name)
    nic = emulated_nic_xml(alias="ua-ptmig-lan-3", mac="52:54:00:aa:00:03", bridge="br", tap="t3")
    with pytest.raises(HypervisorError, match=r"attach to ptmig-\w+: unsupported flags \(0x2\)"):
        dom.attach(nic)  # 0x2: VIR_DOMAIN_AFFECT_CONFIG
    assert not dom.has_device("ua-ptmig-lan-3")


def test_attach_to_a_transient_domain_is_live_only(hv: Hypervisor, name: str) -> None:
    xml = (
        f"<domain type='test'><name>{name}</name><memory>65536</memory>"
        "<os><type>hvm</type></os><devices/></domain>"
    )
    hv._conn.createXML(xml, 0)  # transient: no definition to write into
    dom = hv.domain(name)
    dom.attach(emulated_nic_xml(alias="ua-x", mac="52:54:00:aa:00:09", bridge="br", tap="t9"))
    assert dom.has_device("ua-x")
    device = parse_domain(dom.xml()).device("ua-x")
    assert device is not None and (device.target_dev, device.model) == ("t9", "e1000e")
    with pytest.raises(HypervisorError):
        dom.attach("<interface type='bogus'/>")


def test_a_migration_the_driver_cannot_do_is_a_hypervisor_error(hv: Hypervisor, name: str) -> None:
    dom = define(hv, name)
    with (
        Hypervisor("test:///default") as other,
        pytest.raises(HypervisorError, match=f"migrate {name} test:///default ->"),
    ):
        dom.migrate(other, persistent_xml=dom.xml(inactive=True))
    assert dom.is_active()  # still here


def test_pool_networks_are_defined_listed_redefined_and_undefined(hv: Hypervisor) -> None:
    pool_name = f"p{uuid.uuid4().hex[:8]}"
    pool = EmulatedPool(pool_name, "br-g", "e1000e", (TapSlot("ptv-1", "52:54:00:ba:00:01"),))
    network = pool.network
    assert hv.network_xml(network) is None
    hv.define_network(format_pool_network(pool))
    try:
        assert network in hv.network_names()
        first = hv.network_xml(network)
        assert first is not None and parse_pool_network(first) == pool
        net_uuid = parse_xml(first, "network").findtext("uuid")

        bigger = EmulatedPool(
            pool_name, "br-g", "e1000e", (*pool.slots, TapSlot("ptv-2", "52:54:00:ba:00:02"))
        )
        hv.define_network(format_pool_network(bigger))  # redefined under its UUID
        again = hv.network_xml(network)
        assert again is not None and parse_pool_network(again) == bigger
        assert parse_xml(again, "network").findtext("uuid") == net_uuid
    finally:
        hv.undefine_network(network)
    assert hv.network_xml(network) is None
    assert network not in hv.network_names()
    with pytest.raises(NetworkNotFound, match=f"undefine network {network}"):
        hv.undefine_network(network)


def test_a_malformed_network_is_refused_before_libvirt(hv: Hypervisor) -> None:
    with pytest.raises(HypervisorError, match="DOCTYPE"):
        hv.define_network("<!DOCTYPE n><network><name>x</name></network>")


def test_the_migratable_xml_is_the_running_domain(hv: Hypervisor, name: str) -> None:
    dom = define(hv, name)
    assert parse_domain(dom.migratable_xml()).name == name


def test_blockers_need_qemu_and_say_so_as_a_hypervisor_error(hv: Hypervisor, name: str) -> None:
    dom = define(hv, name)
    with pytest.raises(HypervisorError, match="query-migrate"):
        dom.migration_blockers()


@pytest.mark.parametrize(
    "uri",
    [
        "qemu+tcp://127.0.0.1:1/system",  # nobody listens: refused at once
        "qemu+unix:///system?socket=/nonexistent/libvirt-sock",  # libvirtd is not there
    ],
)
def test_a_host_that_cannot_be_reached_is_unreachable(uri: str) -> None:
    with pytest.raises(HostUnreachable, match=f"cannot connect to {re.escape(uri)}: ") as caught:
        Hypervisor(uri)
    assert caught.value.category is Category.UNREACHABLE


def test_a_uri_libvirt_cannot_parse_is_invalid() -> None:
    with pytest.raises(InvalidURI, match="malformed URI: Unable to parse URI") as caught:
        Hypervisor("qemu:///sys tem")
    assert isinstance(caught.value, ValueError)
    assert caught.value.category is Category.INVALID


def test_an_operation_the_domain_state_forbids_is_refused(hv: Hypervisor, name: str) -> None:
    dom = define(hv, name, start=False)
    nic = "<interface type='bridge'><source bridge='br0'/><model type='virtio'/></interface>"
    with pytest.raises(HostRefused, match="domain is not running") as caught:
        dom.attach(nic)  # to the live domain, which is not running
    assert caught.value.category is Category.REFUSED
    assert not dom.is_active()
