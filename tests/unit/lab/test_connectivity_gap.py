"""The users' connectivity gap: from the last echo reply before a loss to the first after
it, at 100 ms pings taken from a 1000/s record."""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from lab.traffic import connectivity_gaps
from lab.traffic.analysis import user_stride
from lab.traffic.record import PingRecord

T0 = 1_700_000_000 * 10**9
MS = 10**6
RTT = 300_000  # 0.3 ms


def record(n: int, lost: Iterable[int] = (), rate: float = 1000.0) -> PingRecord:
    """n requests at *rate* from T0, each answered RTT later unless in *lost*."""
    period = round(1e9 / rate)
    send = [T0 + i * period for i in range(n)]
    gone = set(lost)
    recv: list[int | None] = [None if i in gone else s + RTT for i, s in enumerate(send)]
    stop = send[-1] + period
    return PingRecord("10.0.0.1", rate, 56, 1, 1, T0, send, recv, {}, 0, stop, stop + 10**9)


def test_no_loss_no_gap() -> None:
    assert connectivity_gaps(record(3000)) == []


def test_loss_between_user_pings_is_not_seen() -> None:
    # requests 101..199 lost: the 100 ms pinger sends 100 and 200, both answered
    assert connectivity_gaps(record(3000, range(101, 200))) == []


def test_gap_across_a_loss_runs_reply_to_reply() -> None:
    # 1000/s requests 450..1349 lost: the user's 500..1300 (9 pings) lost
    (gap,) = connectivity_gaps(record(3000, range(450, 1350)))
    assert (gap.first_seq, gap.last_seq, gap.lost) == (500, 1300, 9)
    assert gap.start_ns == T0 + 400 * MS + RTT  # the reply to 400
    assert gap.end_ns == T0 + 1400 * MS + RTT  # the reply to 1400
    assert gap.duration_ns == 1000 * MS
    assert not gap.open_start and not gap.open_end


def test_two_losses_two_gaps() -> None:
    gaps = connectivity_gaps(record(3000, [*range(300, 301), *range(2000, 2201)]))
    assert [(g.first_seq, g.lost, g.duration_ns // MS) for g in gaps] == [
        (300, 1, 200),
        (2000, 3, 400),
    ]


def test_loss_at_the_start_opens_at_the_first_send() -> None:
    (gap,) = connectivity_gaps(record(3000, range(0, 250)))
    assert gap.open_start and not gap.open_end
    assert gap.start_ns == T0  # no reply before: the first request's send time
    assert gap.end_ns == T0 + 300 * MS + RTT
    assert gap.lost == 3


def test_loss_at_the_end_closes_at_the_last_send() -> None:
    (gap,) = connectivity_gaps(record(3000, range(2500, 3000)))
    assert gap.open_end and not gap.open_start
    assert gap.start_ns == T0 + 2400 * MS + RTT
    assert gap.end_ns == T0 + 2900 * MS  # the last user request's send time
    assert gap.lost == 5


def test_offset_picks_the_other_pings() -> None:
    lost = range(101, 200)
    assert connectivity_gaps(record(3000, lost), offset=50)[0].lost == 1


def test_stride_must_be_whole() -> None:
    assert user_stride(1000.0) == 100
    assert user_stride(100.0) == 10
    with pytest.raises(ValueError, match="whole number"):
        user_stride(1.0)  # a request every second cannot stand for one every 100 ms
    with pytest.raises(ValueError, match="whole number"):
        user_stride(1234.5)


def test_a_reply_held_up_by_the_pause_ends_the_gap_it_does_not_start_it() -> None:
    """Request 400's reply is let out with the others when the VM resumes (at 1405 ms):
    the users saw no reply from 300's (300.3 ms) to 1400's (1400.3 ms)."""
    rec = record(3000, range(450, 1350))
    rec.recv_ns[400] = T0 + 1405 * MS
    (gap,) = connectivity_gaps(rec)
    assert (gap.first_seq, gap.last_seq, gap.lost) == (500, 1300, 9)
    assert gap.start_ns == T0 + 300 * MS + RTT
    assert gap.end_ns == T0 + 1400 * MS + RTT
    assert gap.duration_ns == 1100 * MS
