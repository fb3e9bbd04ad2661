"""ptmigd's command line: options (over /etc/ptmig/ptmigd.toml), the server, the
reconciler, the metrics endpoint, a clean stop on SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from host import logfields
from host.daemon import config as daemon_config
from host.daemon.config import DEFAULT_CONFIG
from host.daemon.listen import DEFAULT_SOCKET, ConfigError, ListenConfig, TlsFiles, serve
from host.daemon.servicer import Coordinator
from host.workflow.journal import DEFAULT_PATH as DEFAULT_JOURNAL
from host.workflow.journal import JournalError
from host.workflow.observer import NoObserver, Observer

log = logging.getLogger("ptmig.daemon")


def default_coordinator(journal: Path, observer: Observer | None = None) -> Coordinator:
    """The workflow's Coordinator over the journal at `journal`."""
    from host.workflow.coordinator import Coordinator as WorkflowCoordinator
    from host.workflow.journal import Journal

    coordinator: Coordinator = WorkflowCoordinator(
        journal=Journal(journal), observer=observer or NoObserver()
    )
    return coordinator


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ptmigd",
        description="ptmig coordinator daemon: the Coordinator gRPC API for management layers",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        help="TOML file whose keys give these options' defaults; default %(default)s",
    )
    parser.add_argument(
        "--check-config", action="store_true", help="validate the configuration and exit"
    )
    parser.add_argument(
        "--socket",
        type=Path,
        default=DEFAULT_SOCKET,
        help="unix socket (0600, its directory 0700); default %(default)s",
    )
    parser.add_argument(
        "--journal",
        type=Path,
        default=DEFAULT_JOURNAL,
        help="workflow journal (SQLite); default %(default)s",
    )
    parser.add_argument(
        "--listen-tcp",
        metavar="HOST:PORT",
        help="also serve TCP, with mutual TLS only (needs the --tls-* files)",
    )
    parser.add_argument("--tls-cert", type=Path, help="server certificate chain (PEM)")
    parser.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    parser.add_argument(
        "--tls-client-ca", type=Path, help="CA certificate(s) that issue client certificates (PEM)"
    )
    parser.add_argument(
        "--reconcile",
        action="append",
        default=[],
        metavar="URI",
        help="repair degraded domains on this libvirt host when a device is free (repeat)",
    )
    parser.add_argument(
        "--reconcile-interval",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="least time between two passes over one host; default %(default)s",
    )
    parser.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (default: none)",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-v: debug)"
    )
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The options, their defaults taken from the configuration file (--config)."""
    parser = build_parser()
    given, _ = parser.parse_known_args(argv)
    settings = daemon_config.load(given.config, missing_ok=given.config == DEFAULT_CONFIG)
    parser.set_defaults(**settings.as_defaults())
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> ListenConfig:
    tls_files = (args.tls_cert, args.tls_key, args.tls_client_ca)
    if any(tls_files) and not all(tls_files):
        raise ConfigError("--tls-cert, --tls-key and --tls-client-ca go together")
    tls = TlsFiles(*tls_files) if all(tls_files) else None
    config = ListenConfig(socket=args.socket, tcp=args.listen_tcp, tls=tls)
    config.check()
    return config


def main(argv: Sequence[str] | None = None, *, coordinator: Coordinator | None = None) -> int:
    """Run ptmigd until SIGTERM/SIGINT; then wait for running migrations.  Exit status."""
    try:
        args = parse_args(argv)
    except daemon_config.DaemonConfigError as exc:
        print(f"ptmigd: {exc}", file=sys.stderr)
        return 2
    logfields.configure(logging.DEBUG if args.verbose else logging.INFO)
    metrics = None
    try:
        config = config_from_args(args)
        if args.check_config:
            print(f"{args.config}: OK")
            return 0
        observer: Observer = NoObserver()
        if args.metrics_listen:
            from host.metrics import MetricsError, PrometheusObserver
            from host.metrics import serve as serve_metrics

            try:
                prometheus = PrometheusObserver()
                metrics = serve_metrics(prometheus, args.metrics_listen)
            except MetricsError as exc:
                raise ConfigError(str(exc)) from None
            observer = prometheus
            log.info("metrics on http://%s:%d/metrics", *metrics.address)
        if coordinator is None:
            coordinator = default_coordinator(args.journal, observer)
        daemon = serve(coordinator, config)
    except (ConfigError, JournalError) as exc:
        if metrics is not None:
            metrics.stop()
        print(f"ptmigd: {exc}", file=sys.stderr)
        return 2

    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    reconciler = None
    if args.reconcile:
        from host.workflow.coordinator import Coordinator as WorkflowCoordinator
        from host.workflow.reconcile import Reconciler

        if not isinstance(coordinator, WorkflowCoordinator):
            print("ptmigd: --reconcile needs the workflow coordinator", file=sys.stderr)
            return 2
        reconciler = Reconciler(coordinator, args.reconcile, args.reconcile_interval)
        reconciler.start()
        log.info("reconciling %s every %.0f s", ", ".join(args.reconcile), args.reconcile_interval)
    try:
        while not stop.wait(3600):
            pass
        log.info("stopping: no new RPCs")
        if reconciler is not None:
            log.info("waiting for the reconciler's repair in progress, if any")
            reconciler.stop()
        daemon.stop()
        running = daemon.servicer.workers.running()
        if running:
            log.warning("waiting for %d running migration(s) to finish", len(running))
        daemon.wait_for_workflows()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if metrics is not None:
            metrics.stop()
    log.info("stopped")
    return 0
