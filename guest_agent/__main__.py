"""ptmig-agent: the in-guest agent daemon (run as root, e.g. from a systemd unit)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from guest_agent import __version__, config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ptmig-agent", description=__doc__)
    parser.add_argument("--config", default=config.DEFAULT_PATH, help="TOML config file")
    parser.add_argument("--socket", help="override the gRPC unix socket path")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
    parser.add_argument("--check-config", action="store_true", help="validate the config and exit")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
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
