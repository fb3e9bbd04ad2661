"""The device-only view of a host (host/workflow/inventory.py's DeviceView) on libvirt's
test driver: which pool devices the host's domains hold, running or defined, with ptmig's
metadata or without, and that a view is one step's (the next step reads libvirt again).

The driver's state is one per process: every test names its domains uniquely, uses PCI
addresses no other test uses, and removes what it made.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

libvirt = pytest.importorskip("libvirt")

from domain_samples import minimal_domain  # noqa: E402

from host.domain.devices import emulated_nic_xml, pci_hostdev_xml  # noqa: E402
from host.domain.domain_xml import parse_domain  # noqa: E402
from host.domain.pools import EmulatedPool, MdevPool, PciPool, PciSlot, TapSlot  # noqa: E402
from host.domain.teams import Team, TeamSet, format_teams  # noqa: E402
from host.hypervisor import Hypervisor  # noqa: E402
from host.workflow.inventory import DeviceView, HeldByHost  # noqa: E402

#: Addresses of this file alone (bus 0x7a), so other tests' domains hold none of them.
NICS = PciPool("inv", ("0000:7a:00.0", "0000:7a:00.1", "0000:7a:00.2"))
TAPS = EmulatedPool(
    "invlab",
    bridge="ptmigbr0",
    model="e1000e",
    slots=(TapSlot("ptinv-0", "52:54:00:7a:00:00"), TapSlot("ptinv-1", "52:54:00:7a:00:01")),
)
MDEV_A = "6e0f7a2c-1b3d-4c5e-8f90-0a1b2c3d4e5f"
MDEV_B = "7e0f7a2c-1b3d-4c5e-8f90-0a1b2c3d4e5f"
TEAMS = TeamSet((Team("lan", "52:54:00:00:7a:01", "preserve", "inv"),))


@pytest.fixture
def hv() -> Iterator[Hypervisor]:
    with Hypervisor("test:///default") as hypervisor:
        yield hypervisor


@pytest.fixture
def define() -> Iterator[Callable[..., Any]]:
    """Define a test-driver domain around *devices* (with ptmig's teams unless *bare*);
    started when *running*.  Every domain made is destroyed and undefined afterwards."""
    conn = libvirt.open("test:///default")
    made: list[Any] = []

    def make(devices: str, *, running: bool = False, bare: bool = False) -> Any:
        metadata = "" if bare else format_teams(TEAMS, namespaced=True)
        name = f"ptmig-inv-{uuid.uuid4().hex[:8]}"
        dom = conn.defineXML(
            minimal_domain(devices, metadata=metadata, name=name, domain_type="test")
        )
        made.append(dom)
        if running:
            dom.create()
        return dom

    yield make
    for dom in made:
        with contextlib.suppress(libvirt.libvirtError):
            dom.destroy()
        with contextlib.suppress(libvirt.libvirtError):
            dom.undefine()
    conn.close()


def hostdev(address: str) -> str:
    return pci_hostdev_xml(alias="ua-ptmig-lan-1", pci_address=address)


def test_a_device_of_a_defined_shut_off_domain_is_not_free(
    hv: Hypervisor, define: Callable[..., Any]
) -> None:
    dom = define(hostdev("0000:7a:00.0"))
    assert not dom.isActive()
    view = DeviceView.read(hv)
    # It would take the device when started: never hand it to another domain.
    assert list(view.free_slots(NICS)) == [
        PciSlot("inv", "0000:7a:00.1"),
        PciSlot("inv", "0000:7a:00.2"),
    ]
    assert view.free(NICS) == 2


def test_a_device_of_a_running_domain_is_not_free(
    hv: Hypervisor, define: Callable[..., Any]
) -> None:
    define(
        hostdev("0000:7a:00.1")
        + emulated_nic_xml(
            alias="ua-ptmig-lan-2", mac="52:54:00:7a:00:01", bridge="ptmigbr0", tap="ptinv-1"
        ),
        running=True,
    )
    view = DeviceView.read(hv)
    assert [s.address for s in view.free_slots(NICS)] == [  # type: ignore[union-attr]
        "0000:7a:00.0",
        "0000:7a:00.2",
    ]
    assert [s.tap for s in view.free_slots(TAPS)] == ["ptinv-0"]  # type: ignore[union-attr]
    assert (view.free(NICS), view.free(TAPS), view.free(None)) == (2, 1, 0)


def test_a_hostdev_an_operator_attached_without_ptmig_is_not_free(
    hv: Hypervisor, define: Callable[..., Any]
) -> None:
    dom = define("", running=True, bare=True)  # no ptmig metadata at all
    assert DeviceView.read(hv).free(NICS) == 3
    # As `virsh attach-device --live` does: libvirt's call, not ptmig's.
    dom.attachDeviceFlags(hostdev("0000:7a:00.2"), libvirt.VIR_DOMAIN_AFFECT_LIVE)
    assert [h.host_pci_address for h in parse_domain(dom.XMLDesc(0)).hostdevs] == ["0000:7a:00.2"]
    assert [s.address for s in DeviceView.read(hv).free_slots(NICS)] == [  # type: ignore[union-attr]
        "0000:7a:00.0",
        "0000:7a:00.1",
    ]


def test_a_view_is_its_steps_alone_the_next_step_reads_libvirt_again(
    hv: Hypervisor, define: Callable[..., Any]
) -> None:
    dom = define("", running=True)
    first = DeviceView.read(hv)
    assert first.free(NICS) == 3
    dom.attachDeviceFlags(hostdev("0000:7a:00.0"), libvirt.VIR_DOMAIN_AFFECT_LIVE)
    # The step that read `first` goes on with what it read (the attach is the claim) ...
    assert first.free(NICS) == 3
    # ... and the next step's view has the domain's new XML, so the device is taken.
    assert DeviceView.read(hv).free(NICS) == 2


def test_what_a_domain_holds_follows_its_xml_text() -> None:
    held = HeldByHost()
    bare = minimal_domain("", name="inv-memo")
    plugged = minimal_domain(hostdev("0000:7a:00.1"), name="inv-memo")
    assert held.of("test:///a", [bare])[0].pci == frozenset()
    assert held.of("test:///a", [plugged])[0].pci == {"0000:7a:00.1"}
    assert held.of("test:///a", [bare])[0].pci == frozenset()  # the same text, the same answer


def test_a_hosts_unchanged_domains_are_not_parsed_again_and_older_texts_not_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The soak's ptmigd grew with every migration while a cache kept each text it had
    seen; now a host's read keeps that read's texts only."""
    from host.workflow import inventory

    parsed: list[str] = []

    def counting(xml: str) -> Any:
        parsed.append(xml)
        return parse_domain(xml)

    monkeypatch.setattr(inventory, "parse_domain", counting)
    held = HeldByHost()
    other = minimal_domain("", name="inv-other")
    versions = [minimal_domain(hostdev(f"0000:7a:00.{i % 3}"), name=f"inv-v{i}") for i in range(6)]
    for version in versions:  # a domain whose XML changes at every read, beside one that does not
        held.of("test:///a", [other, version])
    assert parsed.count(other) == 1 and parsed.count(versions[-1]) == 1
    assert held.of("test:///b", [other])[0].pci == frozenset()  # another host: its own read
    assert parsed.count(other) == 2
    kept = held._by_host  # the test's look inside: what a long-running ptmigd keeps
    assert {uri: list(texts) for uri, texts in kept.items()} == {
        "test:///a": [other, versions[-1]],
        "test:///b": [other],
    }


def test_an_unreadable_domain_makes_every_count_an_error() -> None:
    view = DeviceView.of(
        "test:///x", [minimal_domain(""), "<domain><devices><hostdev type='pci'/></devices>"]
    )
    with pytest.raises(Exception, match="a domain of test:///x"):
        view.free(NICS)
    with pytest.raises(Exception, match="a domain of test:///x"):
        view.free_slots(NICS)


def test_an_mdev_any_domain_holds_is_not_free() -> None:
    pool = MdevPool("tty", "mtty-2", (MDEV_A, MDEV_B))
    holder = minimal_domain(
        "<hostdev mode='subsystem' type='mdev' model='vfio-pci'>"
        f"<source><address uuid='{MDEV_B}'/></source></hostdev>",
        name="inv-mdev",
    )
    view = DeviceView.of("test:///x", [minimal_domain(""), holder])
    assert [s.uuid for s in view.free_slots(pool)] == [MDEV_A]  # type: ignore[union-attr]
    assert view.free(pool) == 1
