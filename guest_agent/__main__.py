"""ptmig-agent: the in-guest agent daemon (run as root, e.g. from a systemd unit)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from guest_agent import __version__, config


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's help formatter, given the terminal's width by os instead of shutil.

    argparse makes a formatter for every add_argument (to check its metavar), and the
    default one imports shutil for the width, which imports bz2, lzma and fnmatch: on
    every start of the agent, for a help text it seldom prints.  COLUMNS first, as
    shutil.get_terminal_size does.
    """

    def __init__(self, prog: str) -> None:
        try:
            columns = int(os.environ["COLUMNS"])
        except (KeyError, ValueError):
            try:
                columns = os.get_terminal_size(sys.stdout.fileno()).columns
            except (AttributeError, ValueError, OSError):  # no stdout, or not a terminal
                columns = 80
        super().__init__(prog, width=columns - 2)  # as argparse's own default


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ptmig-agent", description=__doc__, formatter_class=_HelpFormatter
    )
    parser.add_argument("--config", default=config.DEFAULT_PATH, help="TOML config file")
    parser.add_argument("--socket", help="override the gRPC unix socket path")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
    parser.add_argument("--check-config", action="store_true", help="validate the config and exit")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


#: Debugging only, off unless set: trace Python allocations with this many frames each
#: (tracemalloc); every SIGUSR2 logs what grew most since the previous one.
TRACEMALLOC_ENV = "PTMIG_AGENT_TRACEMALLOC"


def trace_allocations(frames: int) -> None:
    """Start tracemalloc; on each SIGUSR2 log the 10 biggest growths since the last one.

    For finding what a long-running agent keeps (``ptmig-lab agent-churn --trace``);
    tracing costs memory and time, so it is never on unless asked for.
    """
    import signal
    import tracemalloc

    tracemalloc.start(frames)
    log = logging.getLogger("ptmig.tracemalloc")
    last = [tracemalloc.take_snapshot()]

    def report(*_: object) -> None:
        now = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, tracemalloc.__file__)]
        )
        stats = now.compare_to(last[0], "traceback")
        last[0] = now
        log.info("tracemalloc: %+.0f kB in all", sum(s.size_diff for s in stats) / 1024)
        for stat in stats[:10]:
            lines = stat.traceback.format()[-2 * frames :: 2]
            where = " <- ".join(line.strip() for line in reversed(lines))
            log.info("tracemalloc: %+.0f kB %+d: %s", stat.size_diff / 1024, stat.count_diff, where)

    signal.signal(signal.SIGUSR2, report)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if os.environ.get(TRACEMALLOC_ENV):
        trace_allocations(int(os.environ[TRACEMALLOC_ENV]))
    try:
        cfg = config.load(args.config, missing_ok=args.config == config.DEFAULT_PATH)
    except config.ConfigError as exc:
        print(f"ptmig-agent: {exc}", file=sys.stderr)
        return 2
    if args.socket:
        cfg = cfg._replace(socket=args.socket)
    if args.check_config:
        print(f"{args.config}: OK ({len(cfg.teams)} team(s))")
        return 0
    log = logging.getLogger("ptmig")
    if not cfg.teams:
        log.warning("no teams configured in %s", args.config)
    reasons = config.reasons_to_run(cfg)
    if not reasons:
        log.info(
            "nothing to serve: no host channel (%s, %s) and no guest-managed team; "
            "started again when a channel appears",
            cfg.virtio_serial.port,
            config.VSOCK_DEVICE,
        )
        return 0
    log.info("serving: %s", "; ".join(reasons))
    os.umask(0o077)

    from guest_agent import netlink, server  # grpc and the netlink module, only now

    try:
        links = netlink.NetlinkLinks()
        agent = server.start(cfg, links, warm_up=lambda: netlink.warm_up(links))
    except (server.SocketError, OSError) as exc:
        print(f"ptmig-agent: {exc}", file=sys.stderr)
        return 1
    server.run_until_signalled(agent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
