"""The lab itself: a real guest kernel on real libvirt and QEMU, reachable and migratable."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from lab import CLIENT_IP, GUEST_IP, PRIMARY_MAC
from lab.console import ConsoleError
from lab.fabric import CLIENT_NS
from lab.guest import DOMAIN_NAME, PRIMARY_ALIAS, Nic
from lab.measure import wait_reachable
from lab.paths import run_dir
from lab.traffic import FixedRatePinger, Phase, analyze
from lab.vmlab import GuestHealthError, VmLab

pytestmark = pytest.mark.e2e


def test_guest_answers_on_console_with_output_and_status(lab: VmLab) -> None:
    result = lab.exec("uname -r; printf 'two\\nlines\\n'; (exit 3)")
    assert result.status == 3
    assert result.output.splitlines()[0].endswith("-amd64")
    assert result.output.splitlines()[1:] == ["two", "lines"]
    assert lab.exec("echo \"quotes 'and' $((6*7))\"").check() == "quotes 'and' 42\n"


def test_cli_exec_returns_guest_output_and_exit_status(lab: VmLab) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "lab.cli", "exec", "--", "hostname;", "false"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stdout.strip() == "ptmig-guest"


def test_guest_runs_tcg_q35_with_acpi_hotplug(lab: VmLab) -> None:
    xml = lab.domain().XMLDesc(0)
    assert "type='qemu'" in xml and "pc-q35" in xml
    dmesg = lab.exec("dmesg | grep -c 'acpiphp: Slot' || true").check()
    assert int(dmesg.strip()) > 0, "guest does not use ACPI PCI hotplug"


def test_client_pings_guest_without_loss(lab: VmLab) -> None:
    with FixedRatePinger(
        GUEST_IP, run_dir() / "steady.ping", rate=1000, prefix=["ip", "netns", "exec", CLIENT_NS]
    ) as pinger:
        time.sleep(2)
        record = pinger.stop()
    report = analyze(record)
    assert report.sent >= 1900
    assert report.lost == 0, report.format_table()


def test_e1000e_unplug_then_new_mac_plugged_is_seen_in_guest(guest_on_hosta: VmLab) -> None:
    lab = guest_on_hosta
    links = lab.guest_links()
    assert PRIMARY_MAC in {link["address"] for link in links.values()}
    seconds = lab.detach_nic(PRIMARY_ALIAS)
    assert seconds < 10
    assert lab.exec(f"ip -br link | grep -c {PRIMARY_MAC} || true").check().strip() == "0"

    new = Nic("52:54:00:cc:00:02", "ptv-hot1", "ua-hot1")
    lab.attach_nic(new)
    name = lab.wait_for_guest_mac(new.mac)
    driver = lab.exec(f"basename $(readlink /sys/class/net/{name}/device/driver)").check()
    assert driver.strip() == "e1000e"
    lab.check_health()


def counter_growth(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The counters of *after* that grew since *before* (a guest link on another host
    starts again from 0, so a counter that shrank is shown whole)."""
    return {
        k: v - before.get(k, 0) if v >= before.get(k, 0) else v
        for k, v in after.items()
        if v != before.get(k, 0)
    }


def test_live_migration_round_trip_keeps_guest_answering(
    guest_on_hosta: VmLab, record_property: pytest.RecordProperty
) -> None:
    lab = guest_on_hosta
    phases = []
    # The claim is about migrations: the sender starts on a path that answers, as the
    # benches, the demo and the fault matrix do.  Without it CI lost pings from the
    # sender's very start (once 196 from 56 ms in; once seq 0-547), most likely the test
    # before this one's doing: it unplugs the bond's active e1000e by surprise, and until
    # the guest's next frame through its standby the fabric sends its MAC to the gone port.
    wait_reachable(GUEST_IP)
    drops_before = lab.link_drops()
    with FixedRatePinger(
        GUEST_IP, run_dir() / "migrate.ping", rate=1000, prefix=["ip", "netns", "exec", CLIENT_NS]
    ) as pinger:
        time.sleep(1)
        for dest in ("hostb", "hosta"):
            start = time.time()
            result = lab.migrate(dest)
            assert lab.where() == dest
            # persistent on the destination only
            other = "hosta" if dest == "hostb" else "hostb"
            assert DOMAIN_NAME not in lab.conn(other).listDefinedDomains()
            lab.check_health()
            time.sleep(2)
            phases.append(Phase(f"{result.source}->{dest}", start, time.time()))
        record = pinger.stop()
    report = analyze(record, phases)
    print(report.format_table())
    for phase in report.phases:
        record_property(f"lost_{phase.name}", phase.lost)
        if phase.name == "other":
            # Outside the migrations, on a path that answered before the sender started,
            # nothing is lost (a 200 ms stall of the sender loses none).  Where the
            # frames died, should it happen: the links' drop counters.
            assert phase.lost == 0, (
                f"pings lost outside the migrations: {phase.longest_outage}; link drops "
                f"grew: {counter_growth(drops_before, lab.link_drops())}"
            )
            continue
        # the guest answers again after each migration: the outage ends inside the phase
        assert phase.received > 0
        assert phase.lost < phase.sent / 2, report.format_table()
    assert report.rate_measured is not None and abs(report.rate_measured - 1000) < 50, (
        "the sender must keep its rate through the outages"
    )


def test_health_check_fails_on_a_kernel_bug_line(lab: VmLab) -> None:
    lab.exec("echo '<2>BUG: ptmig lab health self-test' > /dev/kmsg").check()
    with pytest.raises(GuestHealthError, match="1 new bad lines"):
        lab.check_health()
    lab.state.dmesg_baseline += 1  # the self-test line is known now
    lab.check_health()


def test_client_address_is_the_lab_client(lab: VmLab) -> None:
    out = subprocess.run(
        ["ip", "-n", CLIENT_NS, "-br", "addr", "show", "cl0"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert CLIENT_IP in out


@pytest.fixture
def guest_to_kill(lab: VmLab) -> str:
    """A guest of its own (the lab's main guest serves the other tests, in any order)."""
    (guest,) = lab.boot_extra_guests(1)
    return guest.name


def test_dead_guest_fails_loudly_not_hangs(lab: VmLab, guest_to_kill: str) -> None:
    lab.check_health(guest_to_kill)  # alive and answering first
    lab.domain(name=guest_to_kill).destroy()
    t0 = time.monotonic()
    with pytest.raises(GuestHealthError, match="no host"):
        lab.check_health(guest_to_kill)
    with pytest.raises((ConsoleError, GuestHealthError)):
        lab.exec("true", timeout=5, name=guest_to_kill)
    assert time.monotonic() - t0 < 30
    lab.check_health()  # the lab's own guest did not go with it
