"""Fixed-rate ICMP echo sender and loss analysis for live-migration measurements.

Why: iputils ``ping -i 0.001`` drops to about 100 pps while replies are outstanding, so during an
outage it sends about 10x fewer requests and undercounts the loss. This sender keeps the schedule
(request n is due at t0 + n/rate) through an outage and catches up if the process falls behind.

Run as a process (root, raw socket)::

    python -m lab.traffic send TARGET_IP OUTFILE --rate 1000 [--payload-size 56] [--duration S]
    python -m lab.traffic analyze OUTFILE [--phases FILE] [--json]

The output file is TSV, one event per line, written in order and flushed every 0.2 s, so a killed
run still leaves usable data::

    #ptmig-traffic  1                    magic and format version
    #target         127.0.0.1
    #rate           1000
    #payload_size   56
    #token          0123456789abcdef     per-run random 64-bit token (hex), carried in every payload
    #ident          4660                 ICMP id of this run
    #start_ns       <epoch ns>           CLOCK_REALTIME at t0 (request 0 due)
    s  SEQ  SEND_NS  [ERRNO]             request SEQ sent (ERRNO: sendto failed; counts as lost)
    r  SEQ  RECV_NS                      reply to SEQ received (a later duplicate is ignored)
    #stop_ns        <epoch ns>           sending stopped (absent if the sender was killed)
    #end_ns         <epoch ns>           listening stopped, 1 s after #stop_ns (ditto)

All times are CLOCK_REALTIME ns (``time.time_ns``; reply times from the kernel's SO_TIMESTAMPNS
when available), so they can be matched against phase marks written by other processes.
"""

from __future__ import annotations

from lab.traffic.analysis import (
    Gap,
    Outage,
    Phase,
    PhaseStats,
    TrafficReport,
    analyze,
    connectivity_gaps,
    load_phases,
)
from lab.traffic.codec import build_request, icmp_checksum, parse_reply
from lab.traffic.record import PingRecord, RecordWriter, load_record
from lab.traffic.sender import FixedRatePinger, RateSchedule, run_schedule, send_main

__all__ = [
    "FixedRatePinger",
    "Gap",
    "Outage",
    "Phase",
    "PhaseStats",
    "PingRecord",
    "RateSchedule",
    "RecordWriter",
    "TrafficReport",
    "analyze",
    "build_request",
    "connectivity_gaps",
    "icmp_checksum",
    "load_phases",
    "load_record",
    "parse_reply",
    "run_schedule",
    "send_main",
]
