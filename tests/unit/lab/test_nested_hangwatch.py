"""The L2 hang watch (lab.nested.hangwatch) on samples a stand-in lab hands it: what
makes a spin, and what the watch does when it finds one."""

from __future__ import annotations

import threading

import pytest

from lab.nested.hangwatch import HangWatch
from lab.nested.vlab import SPIN_HEADER, SPIN_SAMPLES, SpinSample, is_l2_hang, is_spinning

RIP = 0xFFFFFFFFAE64F739
REGISTERS = f"RIP={RIP:016x} RFL=00000002 [-------] CPL=0 II=0 A20=1 SMM=0 HLT=0"


def spin(n: int = SPIN_SAMPLES, **change: float) -> list[SpinSample]:
    """*n* samples 5 s apart of a vCPU busy 1.1 s a second at RIP, IF=0, CPL 0; *change*
    applies to the last one."""
    out = [SpinSample(5.0 * i, 5.5 * i, RIP + 9 * (i % 2), 0x2, 0, REGISTERS) for i in range(n)]
    last = out[-1]
    out[-1] = SpinSample(
        last.at,
        change.get("cpu_s", last.cpu_s),
        int(change.get("rip", last.rip)),
        int(change.get("rflags", last.rflags)),
        int(change.get("cpl", last.cpl)),
        REGISTERS,
    )
    return out


@pytest.mark.parametrize(
    ("samples", "spinning"),
    [
        (spin(), True),
        (spin(SPIN_SAMPLES - 1), False),  # not long enough yet
        (spin(rflags=0x202), False),  # IF=1 in one sample: not the hang
        (spin(cpl=3), False),  # in user space
        (spin(rip=RIP + 0x1000), False),  # moving: a kernel at work
        (spin(cpu_s=5.6), False),  # halted in its last 5 s, not spinning
    ],
)
def test_a_spin_is_l2_in_its_kernel_at_one_place_busy_with_interrupts_off(
    samples: list[SpinSample], spinning: bool
) -> None:
    assert is_spinning(samples) is spinning


class StandIn:
    """A lab whose L2 gives *samples* in turn (None: not readable), then repeats the
    last; records whether it was destroyed."""

    def __init__(self, samples: list[SpinSample | None]) -> None:
        self.samples = samples
        self.taken = 0
        self.destroyed = threading.Event()
        self.report_of: list[SpinSample] = []

    def spin_sample(self) -> SpinSample | None:
        sample = self.samples[min(self.taken, len(self.samples) - 1)]
        self.taken += 1
        return sample

    def spin_report(self, samples: list[SpinSample]) -> str:
        self.report_of = list(samples)
        return f"{SPIN_HEADER}: ...\nL2 vCPU time over 1 s on hosta: 1.10 s\n{REGISTERS}"

    def destroy_guest(self) -> None:
        self.destroyed.set()


def test_the_watch_reports_the_spin_and_destroys_l2() -> None:
    lab = StandIn(list(spin()))
    watch = HangWatch(lab, period=0.01).start()
    assert lab.destroyed.wait(10)
    report = watch.stop()
    assert report is not None and is_l2_hang(report)
    assert lab.report_of == spin()


def test_an_unreadable_sample_starts_the_spin_again() -> None:
    first, second, third = spin()
    lab = StandIn([first, second, None, first, second, third])
    watch = HangWatch(lab, period=0.01).start()
    assert lab.destroyed.wait(10)
    watch.stop()
    assert lab.taken == 6, "the spin must be counted again after the gap"


def test_a_healthy_l2_is_never_destroyed() -> None:
    moving = [SpinSample(5.0 * i, 5.5 * i, RIP + 0x1000 * i, 0x2, 0, "") for i in range(50)]
    lab = StandIn(list(moving))
    watch = HangWatch(lab, period=0.001).start()
    while lab.taken < 50:  # every distinct sample seen
        if lab.destroyed.wait(0.01):
            break
    assert watch.stop() is None
    assert not lab.destroyed.is_set()
