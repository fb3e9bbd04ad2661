"""What a coordinator tells whoever counts its work (ptmigd's metrics), as it happens.

The workflow calls an Observer at the few points an operator's dashboard cares about;
it knows nothing of Prometheus.  A broken observer must never break a migration, so
the coordinator calls it through :func:`notify`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from host.workflow.model import MigrationReport

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolUse:
    """One pool of a host as a reconciler pass saw it."""

    name: str
    total: int
    free: int | None  # None when it cannot be computed (PoolStatus.error)
    teams: int | None  # teams of the host's domains that name it; None: not counted


@dataclass(frozen=True)
class HostPass:
    """What one reconciler pass over a host saw, beyond its degraded teams: whether each
    domain's agent answered, and each pool's free devices against the teams using it.
    It replaces the previous pass's view of that host: a domain that left is gone."""

    agents: dict[str, bool] = field(default_factory=dict)  # domain name -> answered
    pools: tuple[PoolUse, ...] = ()


class Observer(Protocol):
    def migration_finished(self, report: MigrationReport) -> None:
        """A migration workflow ended (any outcome), with its phases and teams."""

    def repair_finished(self, domain: str, outcome: str) -> None:
        """The reconciler's repair of one degraded domain ended."""

    def degraded_teams(self, uri: str, count: int) -> None:
        """A reconciler pass over host `uri` found `count` teams on their standby."""

    def agent_call(self, rpc: str, seconds: float, error: str) -> None:
        """One call to a guest agent; `error` is its gRPC code name, or '' when it worked."""

    def pool_free(self, uri: str, pool: str, free: int, total: int) -> None:
        """Host `uri`'s pool `pool` has `free` of its `total` devices unclaimed."""

    def host_passed(self, uri: str, seen: HostPass) -> None:
        """A reconciler pass over host `uri` ended (after :meth:`degraded_teams`)."""


class NoObserver:
    """Counts nothing: the coordinator's default."""

    def migration_finished(self, report: MigrationReport) -> None:
        pass

    def repair_finished(self, domain: str, outcome: str) -> None:
        pass

    def degraded_teams(self, uri: str, count: int) -> None:
        pass

    def agent_call(self, rpc: str, seconds: float, error: str) -> None:
        pass

    def pool_free(self, uri: str, pool: str, free: int, total: int) -> None:
        pass

    def host_passed(self, uri: str, seen: HostPass) -> None:
        pass


def notify(call: Callable[..., None], *args: Any) -> None:
    """``call(*args)`` on an observer; its failure is logged, never raised into the workflow."""
    try:
        call(*args)
    except Exception:
        log.exception("observer failed")
