"""``python -m lab.traffic send|tcp-send|analyze``: the senders and the analysis."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from lab.traffic.analysis import analyze, load_phases
from lab.traffic.record import load_record
from lab.traffic.sender import send_main
from lab.traffic.tcp import SINK_PORT, tcp_send_main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lab.traffic", description="Fixed-rate ICMP echo sender and loss analysis."
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_send = sub.add_parser("send", help="send echo requests at a fixed rate (root)")
    p_send.add_argument("target")
    p_send.add_argument("outfile")
    p_send.add_argument("--rate", type=float, default=1000.0, help="requests per second")
    p_send.add_argument("--payload-size", type=int, default=56, help="ICMP payload bytes (>= 16)")
    p_send.add_argument(
        "--duration", type=float, default=None, help="seconds (default: until a signal)"
    )
    p_tcp = sub.add_parser("tcp-send", help="stream TCP at a fixed rate, sampling TCP_INFO")
    p_tcp.add_argument("target")
    p_tcp.add_argument("outfile")
    p_tcp.add_argument("--port", type=int, default=SINK_PORT)
    p_tcp.add_argument("--rate", type=int, default=1 << 20, help="bytes per second")
    p_an = sub.add_parser("analyze", help="summarize a sender output file")
    p_an.add_argument("outfile")
    p_an.add_argument("--phases", default=None, help="file of 'name start end' lines (epoch s)")
    p_an.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.cmd == "send":
        try:
            return send_main(args.target, args.outfile, args.rate, args.payload_size, args.duration)
        except (ValueError, PermissionError) as exc:
            print(f"lab.traffic send: {exc}", file=sys.stderr)
            return 1
    if args.cmd == "tcp-send":
        try:
            return tcp_send_main(args.target, args.port, args.outfile, args.rate)
        except (ValueError, OSError) as exc:
            print(f"lab.traffic tcp-send: {exc}", file=sys.stderr)
            return 1
    report = analyze(load_record(args.outfile), load_phases(args.phases) if args.phases else None)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
