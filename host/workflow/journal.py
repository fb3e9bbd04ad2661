"""The workflow journal: what each workflow did, step by step, on disk before it is done.

A coordinator killed at any point (SIGKILL, power loss) leaves an *open* workflow
whose last step rows say how far it got, for a person (``ptmig workflows``); ``ptmig
recover`` adopts it and decides from where the VM runs, not from the rows
(host/workflow/recovery.py).  For the rows to be true, a step is recorded *before* the
action it describes and every commit is durable when :meth:`Journal.record` returns:
SQLite in WAL mode with ``synchronous=FULL`` (WAL fsynced at each commit).

Tables (schema version :data:`SCHEMA_VERSION` in ``PRAGMA user_version``):

``workflows``
    one row per workflow; ``state`` is ``open`` until :meth:`Journal.finish`.  A
    UNIQUE partial index on ``domain_uuid WHERE state='open'`` makes a second open
    workflow for the same domain impossible, atomically and across processes:
    :meth:`Journal.begin` raises :class:`WorkflowConflict` naming the open one.
``steps``
    append-only rows ``(workflow_id, seq, name, status, data_json, at)``; a step's
    current status is its last row.
``cancel_requests``
    at most one row per workflow: someone (``ptmig cancel`` in another process, a
    signal, ptmigd's Cancel RPC) asked it to stop.  The running workflow polls it
    between steps and during the migration job (:meth:`Journal.cancel_request`), so
    the journal is the one place a cancel travels through, whatever process asks.

The owner of a workflow is the process that began (or adopted) it, recorded as
pid + start time (``/proc/PID/stat`` field 22) + boot id, so that a recycled pid or
a reboot is not mistaken for a live owner (:meth:`Journal.is_owner_alive`).

The schema is in ``journal_schema.py``, the records and the JSON the journal accepts in
``journal_records.py``, the owners' liveness in ``owners.py``.

One :class:`Journal` holds one connection, shared by its threads under a lock.
Several processes may open the same file (``busy_timeout`` makes them wait for
each other's short write transactions).
"""

from __future__ import annotations

import errno
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from host.workflow.journal_records import (
    CancelRequest,
    JournalDataError,
    JournalError,
    JournalUnwritable,
    StepRecord,
    StepStatus,
    UnknownWorkflow,
    WorkflowClosed,
    WorkflowConflict,
    WorkflowKind,
    WorkflowRecord,
    WorkflowState,
    checked_enum,
    json_object,
    to_json,
)
from host.workflow.journal_schema import MIGRATIONS, SCHEMA_VERSION, WORKFLOW_COLUMNS, statements
from host.workflow.owners import boot_id_now, process_alive, process_start_time

__all__ = [
    "DEFAULT_PATH",
    "SCHEMA_VERSION",
    "CancelRequest",
    "Journal",
    "JournalDataError",
    "JournalError",
    "JournalUnwritable",
    "StepRecord",
    "StepStatus",
    "UnknownWorkflow",
    "WorkflowClosed",
    "WorkflowConflict",
    "WorkflowKind",
    "WorkflowRecord",
    "WorkflowState",
]

DEFAULT_PATH = Path("/var/lib/ptmig/journal.sqlite")
DEFAULT_BUSY_TIMEOUT_MS = 10_000
#: Free space a workflow needs on the journal's filesystem before it begins: a migration
#: commits about 30 transactions, and the WAL grows up to SQLite's autocheckpoint of 1000
#: pages (4 MiB) before it starts over.  Less, and a step could fail to be recorded half-way
#: through a migration; so :meth:`Journal.begin` refuses before anything changes.
MIN_FREE_BYTES = 4 * 1024 * 1024
#: SQLite's primary result codes a full or read-only filesystem gives: READONLY, IOERR,
#: FULL, CANTOPEN.
_SQLITE_STORAGE_ERRORS = (8, 10, 13, 14)
#: How long a closed workflow is kept, steps and report with it (its outcome is in the
#: logs and metrics too).  Without a bound the journal grows ~5 kB a workflow forever
#: (docs/benchmarks/soak.md); an open workflow is never pruned, whatever its age.
KEEP_CLOSED_S = 90 * 86400.0


class Journal:
    """The journal at `path` (created, with its directory 0700, when missing)."""

    def __init__(
        self,
        path: str | os.PathLike[str] = DEFAULT_PATH,
        *,
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
        keep_closed_s: float = KEEP_CLOSED_S,
        min_free_bytes: int = MIN_FREE_BYTES,
    ) -> None:
        self.path = Path(path)
        self.keep_closed_s = keep_closed_s
        self.min_free_bytes = min_free_bytes
        self._lock = threading.RLock()
        self._create_file()
        try:
            self._db = sqlite3.connect(
                self.path,
                timeout=busy_timeout_ms / 1000,
                isolation_level=None,  # transactions are explicit (BEGIN IMMEDIATE)
                check_same_thread=False,  # guarded by self._lock
            )
        except sqlite3.Error as exc:
            self._raise_if_unwritable(exc)
            raise JournalError(f"journal {self.path}: cannot open: {exc}") from exc
        try:
            self._configure(busy_timeout_ms)
            self._migrate()  # with foreign keys off: a migration may rebuild a table
            self._db.execute("PRAGMA foreign_keys = ON")
        except JournalError:
            self._db.close()
            raise
        except sqlite3.Error as exc:
            self._db.close()
            self._raise_if_unwritable(exc)
            raise JournalError(f"journal {self.path}: unreadable or corrupt: {exc}") from exc

    # -- life cycle ------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _create_file(self) -> None:
        directory = self.path.parent
        try:
            if not directory.exists():
                try:
                    directory.mkdir(mode=0o700, parents=True)
                    directory.chmod(0o700)  # mkdir's mode is filtered by the umask
                except FileExistsError:
                    pass  # another coordinator starting at the same moment made it
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
        except OSError as exc:
            self._raise_if_unwritable(exc)
            raise JournalError(f"journal {self.path}: cannot create: {exc}") from exc

    def _unwritable(self) -> JournalUnwritable | None:
        """Why the journal's filesystem cannot take a workflow, if it cannot: read-only,
        or less free than :attr:`min_free_bytes`."""
        try:
            fs = os.statvfs(self.path.parent)
        except OSError:
            return None
        todo = (
            "nothing was changed: {}, or point --journal (PTMIG_JOURNAL, ptmigd's journal) "
            "at another filesystem"
        )
        if fs.f_flag & os.ST_RDONLY:
            return JournalUnwritable(
                f"journal {self.path}: its filesystem is read-only; "
                + todo.format("remount it read-write"),
                "FAILED_PRECONDITION",
            )
        free = fs.f_bavail * fs.f_frsize
        if free < self.min_free_bytes:
            return JournalUnwritable(
                f"journal {self.path}: its filesystem is full ({free // 1024} KiB free, "
                f"a workflow needs {self.min_free_bytes // 1024} KiB); "
                + todo.format(f"free space on {self.path.parent}"),
                "RESOURCE_EXHAUSTED",
            )
        return None

    def _raise_if_unwritable(self, exc: BaseException) -> None:
        """Say a full or read-only filesystem as such, not as a corrupt journal."""
        if isinstance(exc, OSError):
            storage = exc.errno in (errno.EROFS, errno.ENOSPC, errno.EDQUOT)
        else:  # sqlite3.Error: its primary result code
            storage = getattr(exc, "sqlite_errorcode", 0) & 0xFF in _SQLITE_STORAGE_ERRORS
        found = self._unwritable() if storage else None
        if found is not None:
            raise found from exc

    def _configure(self, busy_timeout_ms: int) -> None:
        self._db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        # Switching to WAL needs the database to itself and SQLite answers "locked" at once,
        # without its busy handler, while another process opens the same new journal (two
        # coordinators starting together): retry until the busy timeout.
        deadline = time.monotonic() + busy_timeout_ms / 1000
        while True:
            try:
                mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        if str(mode).lower() != "wal":
            raise JournalError(f"journal {self.path}: cannot switch to WAL mode (got {mode})")
        self._db.execute("PRAGMA synchronous = FULL")

    def _migrate(self) -> None:
        with self._write() as db:
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            if version > len(MIGRATIONS):
                raise JournalError(
                    f"journal {self.path}: schema version {version} is newer than this "
                    f"ptmig understands ({len(MIGRATIONS)}); upgrade ptmig"
                )
            for step in range(version, len(MIGRATIONS)):
                for statement in statements(MIGRATIONS[step]):
                    db.execute(statement)
            if version < len(MIGRATIONS):
                if db.execute("PRAGMA foreign_key_check").fetchall():
                    raise JournalError(f"journal {self.path}: steps without a workflow")
                db.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction, taken up front so concurrent writers queue, not deadlock."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.IntegrityError:
            raise
        except sqlite3.Error as exc:
            self._raise_if_unwritable(exc)
            raise JournalError(f"journal {self.path}: {exc}") from exc

    # -- workflows -------------------------------------------------------------------

    def begin(
        self,
        kind: WorkflowKind | str,
        domain_uuid: str,
        domain_name: str,
        source_uri: str,
        destination_uri: str,
        request: Mapping[str, Any],
    ) -> str:
        """Open a workflow owned by this process; its id (a uuid4).

        In the same transaction, closed workflows older than ``keep_closed_s`` are
        forgotten: the journal grows only when workflows begin, so that bounds it.
        Raises :class:`WorkflowConflict` when the domain already has an open workflow,
        :class:`JournalUnwritable` when its filesystem could not record the workflow to
        its end (before any row is written).
        """
        kind = checked_enum(WorkflowKind, kind, "workflow kind")
        unwritable = self._unwritable()
        if unwritable is not None:
            raise unwritable
        if not domain_uuid:
            raise JournalDataError("begin: domain_uuid is empty")
        request_json = to_json(request, "request")
        workflow_id = str(uuid.uuid4())
        now = time.time()
        owner_start, boot_id = process_start_time(os.getpid()), boot_id_now()
        row = (
            workflow_id,
            str(kind),
            domain_uuid,
            domain_name,
            source_uri,
            destination_uri,
            now,
            now,
            os.getpid(),
            owner_start,
            boot_id,
            request_json,
        )
        with self._errors():
            for _ in range(3):
                try:
                    with self._write() as db:
                        db.execute(
                            f"INSERT INTO workflows ({WORKFLOW_COLUMNS}) VALUES "
                            "(?, ?, ?, ?, ?, ?, 'open', NULL, ?, ?, ?, ?, ?, ?, NULL)",
                            row,
                        )
                        db.execute(  # their steps and cancel requests go by cascade
                            "DELETE FROM workflows WHERE state = 'closed' AND updated < ?",
                            (now - self.keep_closed_s,),
                        )
                    break
                except sqlite3.IntegrityError as exc:
                    existing = self.open_for_domain(domain_uuid)
                    if existing is not None:
                        raise WorkflowConflict(existing, self.is_owner_alive(existing)) from None
                    error = exc  # finished in between: try again
            else:
                raise JournalError(f"journal {self.path}: cannot begin: {error}")
        return workflow_id

    def adopt(self, workflow_id: str) -> WorkflowRecord:
        """Make this process the owner of an open workflow whose owner is gone (recovery).

        Raises :class:`WorkflowConflict` if its owner is still alive -- this process
        included: in ptmigd a Recover call must not take over a migration that the same
        daemon is running -- and :class:`WorkflowClosed` if it is finished.
        """
        with self._errors(), self._write() as db:
            record = self._get(db, workflow_id)
            if not record.is_open:
                raise WorkflowClosed(f"workflow {workflow_id} is already {record.outcome}")
            if self.is_owner_alive(record):
                raise WorkflowConflict(record, owner_alive=True)
            db.execute(
                "UPDATE workflows SET owner_pid = ?, owner_start = ?, owner_boot_id = ?, "
                "updated = ? WHERE id = ?",
                (
                    os.getpid(),
                    process_start_time(os.getpid()),
                    boot_id_now(),
                    time.time(),
                    workflow_id,
                ),
            )
            return self._get(db, workflow_id)

    def record(
        self,
        workflow_id: str,
        step_name: str,
        status: StepStatus | str,
        data: Mapping[str, Any] | None = None,
    ) -> None:
        """Append a step row; durable on return.  Record `started` before acting."""
        status = checked_enum(StepStatus, status, "step status")
        if not step_name:
            raise JournalDataError("record: step name is empty")
        data_json = to_json({} if data is None else data, f"step {step_name} data")
        now = time.time()
        with self._errors(), self._write() as db:
            row = db.execute("SELECT state FROM workflows WHERE id = ?", (workflow_id,)).fetchone()
            if row is None:
                raise UnknownWorkflow(f"journal {self.path}: no workflow {workflow_id}")
            if row[0] != WorkflowState.OPEN:
                raise WorkflowClosed(
                    f"workflow {workflow_id} is closed; cannot record step {step_name}"
                )
            (seq,) = db.execute(
                "SELECT COALESCE(MAX(seq), 0) + 1 FROM steps WHERE workflow_id = ?",
                (workflow_id,),
            ).fetchone()
            db.execute(
                "INSERT INTO steps (workflow_id, seq, name, status, data_json, at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (workflow_id, seq, step_name, str(status), data_json, now),
            )
            db.execute("UPDATE workflows SET updated = ? WHERE id = ?", (now, workflow_id))

    def finish(self, workflow_id: str, outcome: str, report: Mapping[str, Any]) -> None:
        """Close the workflow with its outcome and report; the domain is free again."""
        if not outcome:
            raise JournalDataError("finish: outcome is empty")
        report_json = to_json(report, "report")
        with self._errors(), self._write() as db:
            record = self._get(db, workflow_id)
            if not record.is_open:
                raise WorkflowClosed(f"workflow {workflow_id} is already {record.outcome}")
            db.execute(
                "UPDATE workflows SET state = 'closed', outcome = ?, report_json = ?, "
                "updated = ? WHERE id = ?",
                (str(outcome), report_json, time.time(), workflow_id),
            )

    # -- cancel requests ---------------------------------------------------------------

    def request_cancel(self, workflow_id: str, requested_by: str) -> CancelRequest:
        """Ask the open workflow to stop; the first request is kept (and returned).

        Raises :class:`WorkflowClosed` when it already ended: nothing is recorded.
        """
        with self._errors(), self._write() as db:
            record = self._get(db, workflow_id)
            if not record.is_open:
                raise WorkflowClosed(f"workflow {workflow_id} is already {record.outcome}")
            db.execute(
                "INSERT OR IGNORE INTO cancel_requests (workflow_id, requested, requested_by) "
                "VALUES (?, ?, ?)",
                (workflow_id, time.time(), requested_by),
            )
            row = db.execute(
                "SELECT workflow_id, requested, requested_by FROM cancel_requests "
                "WHERE workflow_id = ?",
                (workflow_id,),
            ).fetchone()
        return CancelRequest(row[0], float(row[1]), row[2])

    def cancel_request(self, workflow_id: str) -> CancelRequest | None:
        """The workflow's cancel request, None if nobody asked (one indexed read)."""
        with self._errors(), self._lock:
            row = self._db.execute(
                "SELECT workflow_id, requested, requested_by FROM cancel_requests "
                "WHERE workflow_id = ?",
                (workflow_id,),
            ).fetchone()
        return None if row is None else CancelRequest(row[0], float(row[1]), row[2])

    # -- reading ---------------------------------------------------------------------

    def get(self, workflow_id: str) -> WorkflowRecord | None:
        with self._errors(), self._lock:
            row = self._db.execute(
                f"SELECT {WORKFLOW_COLUMNS} FROM workflows WHERE id = ?", (workflow_id,)
            ).fetchone()
        return None if row is None else self._workflow(row)

    def open_workflows(self) -> list[WorkflowRecord]:
        """Every open workflow, oldest first."""
        return self._select("WHERE state = 'open' ORDER BY created, rowid")

    def recent(self, limit: int = 20) -> list[WorkflowRecord]:
        """The `limit` most recently created workflows, newest first."""
        return self._select("ORDER BY created DESC, rowid DESC LIMIT ?", (max(0, int(limit)),))

    def steps(self, workflow_id: str) -> list[StepRecord]:
        """Every step row of the workflow, in the order recorded."""
        with self._errors(), self._lock:
            rows = self._db.execute(
                "SELECT workflow_id, seq, name, status, data_json, at FROM steps "
                "WHERE workflow_id = ? ORDER BY seq",
                (workflow_id,),
            ).fetchall()
        return [self._step(row) for row in rows]

    # -- owners ----------------------------------------------------------------------

    def is_owner_alive(self, record: WorkflowRecord) -> bool:
        """Whether the process that owns `record` still runs on this machine.

        A pid that exists but started at another time (recycled) or in another boot
        is not the owner; neither is a zombie.
        """
        return process_alive(record.owner_pid, record.owner_start, record.owner_boot_id)

    # -- internals -------------------------------------------------------------------

    def _select(self, tail: str, args: tuple[Any, ...] = ()) -> list[WorkflowRecord]:
        with self._errors(), self._lock:
            rows = self._db.execute(
                f"SELECT {WORKFLOW_COLUMNS} FROM workflows {tail}", args
            ).fetchall()
        return [self._workflow(row) for row in rows]

    def open_for_domain(self, domain_uuid: str) -> WorkflowRecord | None:
        """The open workflow of the domain, None if it has none."""
        found = self._select("WHERE state = 'open' AND domain_uuid = ?", (domain_uuid,))
        return found[0] if found else None

    def _get(self, db: sqlite3.Connection, workflow_id: str) -> WorkflowRecord:
        row = db.execute(
            f"SELECT {WORKFLOW_COLUMNS} FROM workflows WHERE id = ?", (workflow_id,)
        ).fetchone()
        if row is None:
            raise UnknownWorkflow(f"journal {self.path}: no workflow {workflow_id}")
        return self._workflow(row)

    def _workflow(self, row: tuple[Any, ...]) -> WorkflowRecord:
        try:
            return WorkflowRecord(
                id=row[0],
                kind=WorkflowKind(row[1]),
                domain_uuid=row[2],
                domain_name=row[3],
                source_uri=row[4],
                destination_uri=row[5],
                state=WorkflowState(row[6]),
                outcome=row[7],
                created=float(row[8]),
                updated=float(row[9]),
                owner_pid=int(row[10]),
                owner_start=None if row[11] is None else int(row[11]),
                owner_boot_id=row[12],
                request=json_object(row[13]),
                report=None if row[14] is None else json_object(row[14]),
            )
        except (ValueError, TypeError) as exc:
            raise JournalError(
                f"journal {self.path}: corrupt workflow row {row[0]!r}: {exc}"
            ) from exc

    def _step(self, row: tuple[Any, ...]) -> StepRecord:
        try:
            return StepRecord(
                workflow_id=row[0],
                seq=int(row[1]),
                name=row[2],
                status=StepStatus(row[3]),
                data=json_object(row[4]),
                at=float(row[5]),
            )
        except (ValueError, TypeError) as exc:
            raise JournalError(
                f"journal {self.path}: corrupt step row {row[0]!r}/{row[1]!r}: {exc}"
            ) from exc
