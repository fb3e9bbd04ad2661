"""ptmigd's Prometheus metrics: an Observer of the coordinator, served over HTTP.

Off unless ``metrics_listen`` (ptmigd.toml) or ``--metrics-listen`` names an address.
prometheus_client is imported only then, so ptmigd runs without it otherwise (Debian 12
has python3-prometheus-client 0.16, which the package recommends).  Served with the
standard library's WSGI server on its own thread and registry, so a stop is a clean
shutdown and no process-wide default collector is touched.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from host.workflow.model import MigrationReport, Outcome
from host.workflow.observer import HostPass, PoolUse

log = logging.getLogger(__name__)

#: Migration outcomes packaging/host/monitoring/ptmig-alerts.yml alerts on.
ALERTED_OUTCOMES = (Outcome.FAILED, Outcome.ROLLED_BACK)

#: Phase and standby durations under TCG and on real hosts: 50 ms to 10 min.
SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
AGENT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class MetricsError(RuntimeError):
    """Metrics cannot be served; the message is one line."""


class PrometheusObserver:
    """Counts what the coordinator reports into its own registry."""

    def __init__(self) -> None:
        try:
            import prometheus_client as prom
        except ImportError:
            raise MetricsError(
                "metrics need prometheus_client (Debian: python3-prometheus-client)"
            ) from None
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.migrations = prom.Counter(
            "ptmig_migrations", "Migration workflows ended, by outcome", ["outcome"], registry=r
        )
        self.phase_seconds = prom.Histogram(
            "ptmig_phase_seconds",
            "Duration of each migration phase",
            ["phase"],
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.standby_seconds = prom.Histogram(
            "ptmig_team_standby_seconds",
            "Time a team spent on its virtio standby in a migration (switch end to bind end)",
            ["team"],
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.degraded = prom.Gauge(
            "ptmig_degraded_teams",
            "Teams on their standby at the last reconciler pass",
            ["host"],
            registry=r,
        )
        self.repairs = prom.Counter(
            "ptmig_repairs",
            "Repairs of degraded domains by the reconciler, by outcome",
            ["outcome"],
            registry=r,
        )
        self.agent_seconds = prom.Histogram(
            "ptmig_agent_call_seconds",
            "Guest agent call latency",
            ["rpc"],
            buckets=AGENT_BUCKETS,
            registry=r,
        )
        self.agent_errors = prom.Counter(
            "ptmig_agent_call_errors",
            "Guest agent calls that failed, by gRPC code",
            ["rpc", "code"],
            registry=r,
        )
        self.hosts = HostViews()
        r.register(self.hosts)
        # The outcomes the alerting rules count start at 0: a series that appears at 1
        # is no increase() to Prometheus, so a first failure would go unnoticed.
        for outcome in ALERTED_OUTCOMES:
            self.migrations.labels(str(outcome))

    def migration_finished(self, report: MigrationReport) -> None:
        self.migrations.labels(str(report.outcome)).inc()
        for phase in report.phases:
            self.phase_seconds.labels(phase.name).observe(phase.seconds)
        for team, seconds in standby_seconds(report):
            self.standby_seconds.labels(team).observe(seconds)

    def repair_finished(self, domain: str, outcome: str) -> None:
        self.repairs.labels(outcome).inc()

    def degraded_teams(self, uri: str, count: int) -> None:
        self.degraded.labels(uri).set(count)

    def agent_call(self, rpc: str, seconds: float, error: str) -> None:
        self.agent_seconds.labels(rpc).observe(seconds)
        if error:
            self.agent_errors.labels(rpc, error).inc()

    def pool_free(self, uri: str, pool: str, free: int, total: int) -> None:
        self.hosts.pool_free(uri, pool, free, total)

    def host_passed(self, uri: str, seen: HostPass) -> None:
        self.hosts.passed(uri, seen)


def standby_seconds(report: MigrationReport) -> Iterator[tuple[str, float]]:
    """Per team back on a primary: from the end of the switch to the end of the bind.

    Teams left on their standby are not counted here: their time on standby ends with a
    repair, and ``ptmig_degraded_teams`` shows them meanwhile.
    """
    ends = {p.name: p.started_at + p.seconds for p in report.phases if p.started_at}
    if "switch" not in ends or "bind" not in ends:
        return
    for team, on in report.teams.items():
        if on == "primary":
            yield team, max(0.0, ends["bind"] - ends["switch"])


@dataclass
class _HostView:
    agents: dict[str, bool] = field(default_factory=dict)
    pools: dict[str, PoolUse] = field(default_factory=dict)
    passed_at: float | None = None  # time.time() of the last reconciler pass


class HostViews:
    """A collector of what the last reconciler pass saw of each host (its agents, its
    pools) and when; each pass replaces its host's view, so a domain or a pool that left
    the host leaves the metrics too (a labelled Gauge would keep its last value)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._lock = threading.Lock()
        self._hosts: dict[str, _HostView] = {}
        self._clock = clock

    def passed(self, uri: str, seen: HostPass) -> None:
        view = _HostView(dict(seen.agents), {p.name: p for p in seen.pools}, self._clock())
        with self._lock:
            self._hosts[uri] = view

    def pool_free(self, uri: str, pool: str, free: int, total: int) -> None:
        """A pool listing (``ptmig pools``) between passes: its counts, teams as known."""
        with self._lock:
            view = self._hosts.setdefault(uri, _HostView())
            teams = view.pools[pool].teams if pool in view.pools else None
            view.pools[pool] = PoolUse(pool, total, free, teams)

    def describe(self) -> Iterator[Any]:
        return self._families()

    def collect(self) -> Iterator[Any]:
        with self._lock:
            hosts = {
                uri: (dict(v.agents), dict(v.pools), v.passed_at) for uri, v in self._hosts.items()
            }
        return self._families(hosts)

    @staticmethod
    def _families(
        hosts: dict[str, tuple[dict[str, bool], dict[str, PoolUse], float | None]] | None = None,
    ) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        def family(name: str, doc: str, labels: list[str]) -> Any:
            return GaugeMetricFamily(name, doc, labels=labels)

        up = family(
            "ptmig_agent_up",
            "1 when the domain's guest agent answered the reconciler's last pass, 0 when not",
            ["host", "domain"],
        )
        free = family("ptmig_pool_free_devices", "Unclaimed devices of a pool", ["host", "pool"])
        total = family("ptmig_pool_devices", "Devices of a pool", ["host", "pool"])
        teams = family(
            "ptmig_pool_teams",
            "Teams of the host's domains (running or defined) that name the pool",
            ["host", "pool"],
        )
        passed = family(
            "ptmig_reconcile_last_pass_timestamp_seconds",
            "When the reconciler last finished a pass over the host (Unix time)",
            ["host"],
        )
        for uri, (agents, pools, passed_at) in sorted((hosts or {}).items()):
            for domain, answered in sorted(agents.items()):
                up.add_metric([uri, domain], 1.0 if answered else 0.0)
            for name, pool in sorted(pools.items()):
                total.add_metric([uri, name], pool.total)
                if pool.free is not None:
                    free.add_metric([uri, name], pool.free)
                if pool.teams is not None:
                    teams.add_metric([uri, name], pool.teams)
            if passed_at is not None:
                passed.add_metric([uri], passed_at)
        yield from (up, free, total, teams, passed)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics: " + format, *args)


@dataclass
class MetricsServer:
    """The HTTP endpoint, on its own thread until :meth:`stop`."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port); a clear error for anything else."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if (
        not sep
        or not host
        or not port.isascii()
        or not port.isdigit()
        or not (0 <= int(port) <= 65535)
    ):
        raise MetricsError(f"metrics address {text!r} is not HOST:PORT")
    return host, int(port)


def serve(observer: PrometheusObserver, listen: str) -> MetricsServer:
    """Serve `observer`'s registry at http://`listen`/metrics."""
    import prometheus_client as prom

    host, port = parse_listen(listen)
    app = prom.make_wsgi_app(observer.registry)
    server_class = WSGIServer
    if ":" in host:
        import socket

        class _V6Server(WSGIServer):
            address_family = socket.AF_INET6

        server_class = _V6Server
    try:
        server = make_server(
            host, port, app, server_class=server_class, handler_class=_QuietHandler
        )
    except OSError as exc:
        raise MetricsError(f"metrics: cannot listen on {listen}: {exc.strerror}") from None
    thread = threading.Thread(target=server.serve_forever, name="ptmig-metrics", daemon=True)
    thread.start()
    return MetricsServer(server, thread)
