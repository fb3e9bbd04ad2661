"""Tests of lab.traffic: analysis on synthetic records, the scheduler on a fake clock, packet
encoding, the file format, and real runs of the sender (root only).

The real no-reply and outage tests run the sender in a fresh network namespace against its own
127.0.0.1 and switch echo replies off with the netns-local sysctl net.ipv4.icmp_echo_ignore_all,
so nothing on the host is touched.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from lab.traffic import (
    FixedRatePinger,
    Phase,
    PingRecord,
    RateSchedule,
    RecordWriter,
    analyze,
    build_request,
    icmp_checksum,
    load_phases,
    load_record,
    parse_reply,
    run_schedule,
)

T0 = 1_800_000_000 * 10**9  # an epoch time in ns
MS = 1_000_000


def make_record(
    n: int,
    lost: Iterable[int] = (),
    *,
    rate: float = 1000.0,
    delay_ns: int = 100_000,
    complete: bool = True,
) -> PingRecord:
    """n requests on a perfect schedule starting at T0; the ones in ``lost`` get no reply."""
    period = round(1e9 / rate)
    send = [T0 + i * period for i in range(n)]
    gone = set(lost)
    recv: list[int | None] = [None if i in gone else s + delay_ns for i, s in enumerate(send)]
    stop = (send[-1] if send else T0) + period
    return PingRecord(
        target="192.0.2.10",
        rate=rate,
        payload_size=56,
        token=0x1234,
        ident=0x1234,
        start_ns=T0,
        send_ns=send,
        recv_ns=recv,
        stop_ns=stop if complete else None,
        end_ns=stop + 10**9 if complete else None,
    )


def at(ms: float) -> float:
    """Epoch seconds of T0 + ms."""
    return (T0 + ms * MS) / 1e9


# ---------------------------------------------------------------------------------------------
# Analysis


def test_no_loss() -> None:
    rep = analyze(make_record(1000))
    assert (rep.sent, rep.received, rep.lost, rep.undetermined) == (1000, 1000, 0, 0)
    assert rep.longest_outage is None
    assert rep.outages == []
    assert rep.longest_reply_gap_ns == 1 * MS
    assert rep.rate_measured == pytest.approx(1000.0)
    assert rep.loss_ratio == 0.0
    assert rep.phases == []


def test_losses_at_known_places() -> None:
    rep = analyze(make_record(1000, [*range(100, 150), 500]))
    assert (rep.sent, rep.received, rep.lost) == (1000, 949, 51)
    assert [(o.first_seq, o.last_seq, o.lost) for o in rep.outages] == [
        (100, 149, 50),
        (500, 500, 1),
    ]
    lo = rep.longest_outage
    assert lo is not None and (lo.first_seq, lo.lost) == (100, 50)
    # From the send time of answered 99 to that of answered 150.
    assert lo.start_ns == T0 + 99 * MS
    assert lo.duration_ns == 51 * MS
    assert rep.outages[1].duration_ns == 2 * MS
    assert rep.longest_reply_gap_ns == 51 * MS
    assert rep.loss_ratio == pytest.approx(51 / 1000)


def test_loss_per_phase_counts_where_sent() -> None:
    # 0..1199 ms; phases a=[100, 400) ms, b=[400, 800) ms; the rest is "other".
    lost = [*range(150, 160), *range(390, 420), 900, 1199]
    phases = [Phase("a", at(100), at(400)), Phase("b", at(400), at(800))]
    rep = analyze(make_record(1200, lost), phases)
    by = {p.name: p for p in rep.phases}
    assert list(by) == ["a", "b", "other"]
    assert (by["a"].sent, by["b"].sent, by["other"].sent) == (300, 400, 500)
    # 390..399 were sent in a, 400..419 in b: the run is split by send time for the counts...
    assert (by["a"].lost, by["b"].lost, by["other"].lost) == (20, 20, 2)
    assert by["a"].received == 280
    # ...but the outage belongs to the phase in which it started.
    assert by["a"].outages == 2
    assert by["b"].outages == 0 and by["b"].longest_outage is None
    la = by["a"].longest_outage
    assert la is not None and (la.first_seq, la.last_seq, la.phase) == (390, 419, "a")
    assert la.duration_ns == 31 * MS
    assert by["other"].outages == 2
    lo = by["other"].longest_outage
    assert lo is not None and lo.duration_ns == 2 * MS
    assert sum(p.lost for p in rep.phases) == rep.lost == 42
    assert (by["a"].start, by["a"].end, by["other"].start) == (at(100), at(400), None)


def test_request_at_phase_end_belongs_to_next_phase() -> None:
    phases = [Phase("a", at(0), at(10)), Phase("b", at(10), at(20))]
    rep = analyze(make_record(20, [10]), phases)
    by = {p.name: p for p in rep.phases}
    assert (by["a"].sent, by["a"].lost, by["b"].sent, by["b"].lost) == (10, 0, 10, 1)


def test_all_lost() -> None:
    rep = analyze(make_record(500, range(500)))
    assert (rep.received, rep.lost) == (0, 500)
    assert len(rep.outages) == 1
    lo = rep.longest_outage
    assert lo is not None and lo.lost == 500
    # No answered neighbour on either side: one nominal period stands in for each.
    assert lo.duration_ns == 501 * MS
    assert rep.longest_reply_gap_ns is None
    assert rep.rate_measured == pytest.approx(1000.0)
    assert rep.loss_ratio == 1.0


def test_loss_at_start_edge() -> None:
    rep = analyze(make_record(100, range(10)))
    lo = rep.longest_outage
    assert lo is not None and (lo.first_seq, lo.last_seq, lo.lost) == (0, 9, 10)
    assert (lo.start_ns, lo.end_ns) == (T0 - 1 * MS, T0 + 10 * MS)
    assert lo.duration_ns == 11 * MS


def test_loss_at_end_edge() -> None:
    rep = analyze(make_record(100, range(90, 100)))
    lo = rep.longest_outage
    assert lo is not None and (lo.first_seq, lo.last_seq, lo.lost) == (90, 99, 10)
    assert (lo.start_ns, lo.end_ns) == (T0 + 89 * MS, T0 + 100 * MS)
    assert rep.lost == 10


def test_killed_run_leaves_the_tail_undetermined() -> None:
    # Replies stop at 1500 ms and the sender is killed at 2999 ms: requests sent within 1 s of
    # the last event cannot be judged yet; the earlier ones are lost.
    rec = make_record(3000, range(1500, 3000), complete=False)
    rep = analyze(rec)
    assert not rep.complete
    assert rep.undetermined == 1000  # sent after 1999 ms
    assert rep.lost == 500
    assert rep.received + rep.lost + rep.undetermined == rep.sent == 3000
    lo = rep.longest_outage
    assert lo is not None and (lo.first_seq, lo.last_seq) == (1500, 1999)
    assert lo.duration_ns == 501 * MS
    assert "undetermined" in rep.format_table()


def test_empty_and_single_request() -> None:
    rep = analyze(make_record(0))
    assert (rep.sent, rep.lost, rep.rate_measured, rep.longest_outage) == (0, 0, None, None)
    rep = analyze(make_record(1, [0]))
    assert rep.lost == 1
    assert rep.longest_outage is not None and rep.longest_outage.duration_ns == 2 * MS


def test_reply_gap_uses_arrival_times() -> None:
    rec = make_record(10)
    rec.recv_ns[5] = T0 + 5 * MS + 20 * MS  # late reply, arrives after 6..9
    rep = analyze(rec)
    assert rep.lost == 0
    # arrivals: 0.1, 1.1, ..., 4.1, 6.1, 7.1, 8.1, 9.1, 25.0 ms
    assert rep.longest_reply_gap_ns == 25 * MS - (9 * MS + 100_000)


def test_report_dict_is_json_and_table_is_readable() -> None:
    phases = [Phase("migrate", at(0), at(500))]
    rep = analyze(make_record(1000, range(200, 300)), phases)
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["lost"] == 100
    assert d["longest_outage_ms"] == pytest.approx(101.0)
    assert d["longest_outage"]["phase"] == "migrate"
    assert [p["name"] for p in d["phases"]] == ["migrate", "other"]
    assert d["phases"][0]["longest_outage_ms"] == pytest.approx(101.0)
    assert d["outages"][0]["first_seq"] == 200
    table = rep.format_table()
    assert "lost 100" in table
    assert "migrate" in table and "101.0" in table


def test_phase_name_other_is_reserved() -> None:
    with pytest.raises(ValueError, match="reserved"):
        analyze(make_record(10), [Phase("other", at(0), at(5))])


def test_load_phases(tmp_path: Path) -> None:
    f = tmp_path / "run.phases"
    f.write_text(
        "# name start end\npre 1800000000.0 1800000003.5\n\nmigrate 1800000003.5 1800000008\n"
    )
    assert load_phases(f) == [
        Phase("pre", 1800000000.0, 1800000003.5),
        Phase("migrate", 1800000003.5, 1800000008.0),
    ]


# ---------------------------------------------------------------------------------------------
# File format


def write_file(path: Path, *, complete: bool, torn_tail: str = "") -> None:
    w = RecordWriter(path)
    w.header("ptmig-traffic", 1)
    w.header("target", "127.0.0.1")
    w.header("rate", 1000.0)
    w.header("payload_size", 56)
    w.header("token", f"{0xDEADBEEF:016x}")
    w.header("ident", 4660)
    w.header("start_ns", T0)
    w.sent(0, T0 + 10, None)
    w.received(0, T0 + 20)
    w.sent(1, T0 + MS, 113)  # EHOSTUNREACH
    w.sent(2, T0 + 2 * MS, None)
    w.received(0, T0 + 30)  # duplicate
    w.received(2, T0 + 2 * MS + 50)
    if complete:
        w.header("stop_ns", T0 + 3 * MS)
        w.header("end_ns", T0 + 3 * MS + 10**9)
    w.close()
    if torn_tail:
        with path.open("a") as f:
            f.write(torn_tail)


def test_file_roundtrip(tmp_path: Path) -> None:
    f = tmp_path / "run.tsv"
    write_file(f, complete=True)
    rec = load_record(f)
    assert (rec.target, rec.rate, rec.payload_size, rec.token, rec.ident) == (
        "127.0.0.1",
        1000.0,
        56,
        0xDEADBEEF,
        4660,
    )
    assert rec.start_ns == T0
    assert rec.send_ns == [T0 + 10, T0 + MS, T0 + 2 * MS]
    assert rec.recv_ns == [T0 + 20, None, T0 + 2 * MS + 50]  # first reply wins
    assert rec.send_errors == {1: 113}
    assert rec.duplicates == 1
    assert rec.complete and rec.stop_ns == T0 + 3 * MS
    rep = analyze(rec)
    assert (rep.lost, rep.send_errors, rep.duplicates) == (1, 1, 1)


def test_killed_file_with_torn_line_loads(tmp_path: Path) -> None:
    f = tmp_path / "run.tsv"
    write_file(f, complete=False, torn_tail="s\t3\t18000000")
    rec = load_record(f)
    assert rec.sent == 3
    assert not rec.complete and rec.stop_ns is None


def test_load_rejects_other_files(tmp_path: Path) -> None:
    f = tmp_path / "x.tsv"
    f.write_text("#something\t2\n")
    with pytest.raises(ValueError, match="not a ptmig-traffic"):
        load_record(f)
    f.write_text("#ptmig-traffic\t1\nr\t5\t100\n")
    with pytest.raises(ValueError, match="unsent"):
        load_record(f)


# ---------------------------------------------------------------------------------------------
# Scheduler (fake clock)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0
        self.waits: list[int] = []

    def __call__(self) -> int:
        return self.now


def test_due_times_are_exact() -> None:
    s = RateSchedule(1000, 5)
    assert [s.due_ns(n) for n in range(4)] == [5, 1_000_005, 2_000_005, 3_000_005]
    assert s.due_ns(10**9) == 5 + 10**15  # no float drift after 11.6 days at 1000 pps
    s3 = RateSchedule(3, 0)
    assert [s3.due_ns(n) for n in (1, 3, 300)] == [333_333_333, 10**9, 100 * 10**9]
    with pytest.raises(ValueError):
        RateSchedule(0, 0)
    with pytest.raises(ValueError):
        RateSchedule(float("nan"), 0)


def test_scheduler_catches_up_after_a_stall_and_keeps_the_rate() -> None:
    clock = FakeClock()
    sends: list[tuple[int, int]] = []

    def wait(d: int) -> None:
        clock.waits.append(d)
        clock.now += d

    def send(n: int) -> None:
        sends.append((n, clock.now))
        if n == 100:
            clock.now += 50 * MS  # the process stalls for 50 ms (e.g. descheduled)

    sent = run_schedule(RateSchedule(1000, 0), clock, wait, send, lambda: False, count=300)
    assert sent == 300
    assert [n for n, _ in sends] == list(range(300))
    times = dict(sends)
    assert all(times[n] == n * MS for n in range(101))
    # 101..150 became due during the stall: all sent at once, at 150 ms...
    assert all(times[n] == 150 * MS for n in range(101, 151))
    # ...and the schedule is unchanged afterwards: no slowdown, no shift.
    assert all(times[n] == n * MS for n in range(151, 300))
    # During the catch-up burst replies were still drained (wait(0) polls).
    assert 0 in clock.waits


def test_scheduler_never_sends_early_even_if_wait_returns_early() -> None:
    clock = FakeClock()
    sends: list[int] = []

    def wait(d: int) -> None:
        clock.now += min(d, 300_000)  # e.g. woken up by a reply

    sched = RateSchedule(1000, 7)
    run_schedule(sched, clock, wait, lambda n: sends.append(clock.now), lambda: False, count=50)
    assert len(sends) == 50
    assert all(t >= sched.due_ns(n) for n, t in enumerate(sends))
    assert all(t - sched.due_ns(n) < 300_000 for n, t in enumerate(sends))


def test_scheduler_with_a_clock_that_jumps_forward() -> None:
    clock = FakeClock()
    sends: list[int] = []

    def wait(d: int) -> None:
        clock.now += d

    def send(n: int) -> None:
        sends.append(clock.now)
        if n == 10:
            clock.now += 1_000 * MS  # a 1 s outage in which the sender was stuck

    run_schedule(RateSchedule(1000, 0), clock, wait, send, lambda: False, count=2000)
    assert len(sends) == 2000
    assert sends[-1] == 1999 * MS  # 2000 requests in 2 s despite the 1 s stall
    assert sends.count(1010 * MS) == 1000  # 11..1010 sent back-to-back


def test_scheduler_stops_on_request() -> None:
    clock = FakeClock()

    def wait(d: int) -> None:
        clock.now += d

    sent = run_schedule(
        RateSchedule(1000, 0), clock, wait, lambda n: None, lambda: clock.now >= 25 * MS
    )
    assert sent == 25


# ---------------------------------------------------------------------------------------------
# Packets


def test_echo_request_and_reply_encoding() -> None:
    req = build_request(70_000, 0xBEEF, 0x0123456789ABCDEF, 56)
    assert len(req) == 8 + 56
    assert icmp_checksum(req) == 0
    typ, code, _csum, ident, seq16 = struct.unpack_from("!BBHHH", req)
    assert (typ, code, ident, seq16) == (8, 0, 0xBEEF, 70_000 & 0xFFFF)
    # The peer echoes id, seq and payload with type 0; the IPv4 raw socket adds the IP header.
    reply = bytes([0, 0]) + req[2:]
    ip_header = bytes([0x45]) + bytes(19)
    assert parse_reply(ip_header + reply, 0xBEEF, 0x0123456789ABCDEF) == 70_000
    assert parse_reply(ip_header + reply, 0xBEEE, 0x0123456789ABCDEF) is None  # other run's id
    assert parse_reply(ip_header + reply, 0xBEEF, 0x0123456789ABCDEE) is None  # stray token
    assert parse_reply(ip_header + req, 0xBEEF, 0x0123456789ABCDEF) is None  # a request
    assert parse_reply(ip_header + reply[:20], 0xBEEF, 0x0123456789ABCDEF) is None  # truncated
    req6 = build_request(5, 1, 2, 16, v6=True)
    assert req6[0] == 128 and len(req6) == 24
    assert parse_reply(bytes([129]) + req6[1:], 1, 2, v6=True) == 5


# ---------------------------------------------------------------------------------------------
# Real runs (root)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="raw ICMP socket needs root")


def _sh_in(ns: str, script: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "sh", "-c", script], check=True)


def set_echo_ignore(ns: str, on: bool) -> None:
    _sh_in(ns, f"echo {int(on)} > /proc/sys/net/ipv4/icmp_echo_ignore_all")


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh network namespace with lo up, deleted afterwards."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2")
    name = f"ptmigt{os.getpid()}"
    if subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode != 0:
        pytest.skip("cannot create a network namespace here")
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@needs_root
def test_real_loopback_1000pps(tmp_path: Path) -> None:
    pinger = FixedRatePinger("127.0.0.1", tmp_path / "lo.tsv", rate=1000, duration=1.5)
    with pinger:
        rec = pinger.wait(timeout=15)
    rep = analyze(rec)
    print(rep.format_table())
    assert rec.complete
    assert rep.sent == 1500
    assert rep.lost == 0 and rep.received == 1500 and rep.send_errors == 0
    assert rep.rate_measured == pytest.approx(1000, rel=0.05)


def test_pinger_reports_a_failing_sender(tmp_path: Path) -> None:
    pinger = FixedRatePinger("not-an-ip", tmp_path / "bad.tsv", python=sys.executable)
    with pytest.raises(RuntimeError, match="exited with"):
        pinger.start()


def test_no_replies_keep_the_rate(netns: str, tmp_path: Path) -> None:
    """No reply at all (echo ignored in the netns): iputils would fall to ~100 pps here."""
    set_echo_ignore(netns, True)
    with FixedRatePinger(
        "127.0.0.1", tmp_path / "silent.tsv", rate=1000, prefix=["ip", "netns", "exec", netns]
    ) as pinger:
        time.sleep(1.0)  # a second of pings: the run measured, not a wait
        rec = pinger.stop()
    rep = analyze(rec)
    print(rep.format_table())
    assert rec.complete
    assert rep.sent >= 900
    assert rep.received == 0 and rep.lost == rep.sent and rep.send_errors == 0
    assert rep.rate_measured == pytest.approx(1000, rel=0.05)
    assert len(rep.outages) == 1


def test_outage_is_measured_and_the_rate_kept(netns: str, tmp_path: Path) -> None:
    """A real 300 ms outage in the middle of a run, attributed to its phase."""
    with FixedRatePinger(
        "127.0.0.1", tmp_path / "outage.tsv", rate=1000, prefix=["ip", "netns", "exec", netns]
    ) as pinger:
        t_start = time.time()
        # The run's phases (0.5 s, a 0.3 s outage, 0.5 s) are what is measured, not waits.
        time.sleep(0.5)
        t1 = time.time()
        set_echo_ignore(netns, True)
        time.sleep(0.3)
        set_echo_ignore(netns, False)
        t2 = time.time()
        time.sleep(0.5)
        rec = pinger.stop()
    phases = [Phase("pre", t_start - 1, t1), Phase("outage", t1, t2), Phase("post", t2, t2 + 10)]
    rep = analyze(rec, phases)
    print(rep.format_table())
    by = {p.name: p for p in rep.phases}
    assert rep.rate_measured == pytest.approx(1000, rel=0.05)
    assert 250 <= rep.lost <= 500
    assert len(rep.outages) == 1
    lo = rep.longest_outage
    assert lo is not None and lo.phase == "outage" and lo.lost == rep.lost
    assert lo.duration_ns / MS == pytest.approx(lo.lost + 1, abs=15)
    assert by["pre"].lost == by["post"].lost == by["other"].lost == 0
    assert by["outage"].lost == rep.lost
