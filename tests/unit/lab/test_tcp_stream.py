"""The TCP stream beside the pings: its analysis, and a real stream over loopback."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from lab.traffic import Phase
from lab.traffic.tcp import TcpSample, TcpStream, analyze_tcp, load_tcp_record, tcp_counters

MS = 1_000_000


def samples(*rows: tuple[int, int, int, int]) -> list[TcpSample]:
    """(ms, acked, retrans, outstanding) rows."""
    return [TcpSample(t * MS, a, r, o) for t, a, r, o in rows]


def test_steady_acks_give_the_sampling_interval_as_longest_stall() -> None:
    rows = [(t, t * 100, 0, 100) for t in range(0, 100, 5)]
    report = analyze_tcp(samples(*rows))
    assert report.longest_stall_ms == pytest.approx(5.0)
    assert report.retransmits == 0
    assert report.bytes_acked == 95 * 100


def test_a_gap_in_acks_while_bytes_wait_is_the_stall_and_names_its_phase() -> None:
    rows = [(0, 0, 3, 10), (5, 10, 3, 10), (10, 20, 3, 10)]
    rows += [(t, 20, 4, 500) for t in range(15, 800, 5)]  # no ack for 790 ms
    rows += [(800, 600, 7, 10), (805, 610, 7, 10)]
    phases = [Phase("switch", 0.0, 0.005), Phase("migrate", 0.005, 1.0)]
    report = analyze_tcp(samples(*rows), phases)
    assert report.longest_stall_ms == pytest.approx(790.0)
    assert report.stall_phase == "migrate"
    assert report.retransmits == 4


def test_an_idle_sender_is_not_a_stall() -> None:
    rows = [(0, 0, 0, 10), (5, 10, 0, 0), (900, 10, 0, 0), (905, 20, 0, 10), (910, 30, 0, 0)]
    assert analyze_tcp(samples(*rows)).longest_stall_ms == pytest.approx(5.0)


def test_a_stream_still_stalled_at_its_end_counts_to_the_end() -> None:
    rows = [(0, 0, 0, 10), (5, 10, 0, 10), (400, 10, 2, 900)]
    report = analyze_tcp(samples(*rows))
    assert report.longest_stall_ms == pytest.approx(395.0)
    assert report.retransmits == 2


def test_too_short_a_record_is_refused() -> None:
    with pytest.raises(ValueError):
        analyze_tcp(samples((0, 0, 0, 0)))


def test_tcp_info_counts_the_bytes_the_peer_acknowledged() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    got = bytearray()

    def drain() -> None:
        conn, _ = server.accept()
        with conn:
            while chunk := conn.recv(65536):
                got.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    with socket.create_connection(server.getsockname()) as client:
        before, _ = tcp_counters(client)  # the SYN's acknowledgement counts as one byte
        client.sendall(b"x" * 300_000)
        deadline = time.monotonic() + 30  # a bound, not a wait: a loaded machine's reader is late
        while tcp_counters(client)[0] - before < 300_000 and time.monotonic() < deadline:
            time.sleep(0.01)
        acked, retrans = tcp_counters(client)
        acked -= before
    reader.join(30)
    server.close()
    assert acked == 300_000 and len(got) == 300_000
    assert retrans == 0


def test_a_real_stream_over_loopback(tmp_path: Path) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def drain() -> None:
        conn, _ = server.accept()
        with conn:
            while conn.recv(65536):
                pass

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    stream = TcpStream("127.0.0.1", tmp_path / "tcp.tsv", port=port, rate=4 << 20)
    stream.start()
    time.sleep(1.0)  # a second of stream: what the report below measures, not a wait
    report = stream.stop()
    server.close()
    assert 0.8 < report.duration_s < 2.0
    assert report.bytes_acked > 2 << 20  # about 4 MiB offered in a second
    assert report.longest_stall_ms < 200
    assert report.retransmits == 0
    assert len(load_tcp_record(tmp_path / "tcp.tsv")) > 50
