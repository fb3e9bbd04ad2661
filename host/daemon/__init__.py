"""ptmigd: the Coordinator gRPC service (protos/ptmig/v1/coordinator.proto).

The servicer is a thin face: it turns messages into calls on a :class:`Coordinator`
(the workflow's entry point; tests use a fake) and answers back, never the reverse.

Who may call
    By default ptmigd listens on one unix socket, ``/run/ptmig/ptmigd.sock``.  The
    socket is 0600 (bound under umask 177, then chmod'ed) in a directory that must
    be owned by ptmigd's user (root in production) with mode 0700: ptmigd creates it
    so when missing and refuses to start when it exists with another owner or mode,
    or is a symlink.  Only that user (and root) can connect.  gRPC Python does not
    expose the peer's SO_PEERCRED credentials (``context.peer()`` is just
    ``unix:...``), so the file permissions *are* the access control; they are
    checked, not assumed.
    TCP is served only with ``--listen-tcp HOST:PORT`` together with ``--tls-cert``,
    ``--tls-key`` and ``--tls-client-ca``: mutual TLS, a client must present a
    certificate issued by that CA.  TCP without them is refused at start.

Errors
    Exceptions from the coordinator become a gRPC status and a one-line message,
    never a traceback (that goes to ptmigd's log).  The status is the error's
    category (``PtmigError.category``, host/errors.py) through one table,
    ``errors.STATUS``; anything that is not a PtmigError is INTERNAL.  A migration
    that rolled back or failed after it started is not an RPC error: the stream ends
    normally with its report.

Migrate and clients that go away
    The migration runs in its own (non-daemon) worker thread; its events go through a
    queue to the RPC's stream.  If the client cancels or disconnects, that is logged
    and the stream stops, but the migration goes on: a half-finished migration (a
    detached device, a guest on its standby, a half-copied VM) must be finished or
    rolled back, never abandoned because a client went away.  Its outcome is
    logged and is in the journal (ListWorkflows).  On SIGTERM ptmigd stops taking
    RPCs and waits for running migrations before it exits.
"""

from host.daemon.errors import status_for
from host.daemon.listen import ConfigError, Daemon, ListenConfig, TlsFiles, serve
from host.daemon.servicer import Coordinator, CoordinatorServicer

__all__ = [
    "ConfigError",
    "Coordinator",
    "CoordinatorServicer",
    "Daemon",
    "ListenConfig",
    "TlsFiles",
    "serve",
    "status_for",
]
