"""The journal's SQLite schema, as the list of upgrades from each version to the next
(the version is kept in ``PRAGMA user_version``)."""

from __future__ import annotations

# Each entry upgrades the schema from version N to N+1 (index N); append, never edit.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE workflows (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL CHECK (kind IN ('migrate', 'failover', 'repair')),
        domain_uuid TEXT NOT NULL,
        domain_name TEXT NOT NULL,
        source_uri TEXT NOT NULL,
        destination_uri TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('open', 'closed')),
        outcome TEXT,
        created REAL NOT NULL,
        updated REAL NOT NULL,
        owner_pid INTEGER NOT NULL,
        owner_start INTEGER,
        owner_boot_id TEXT,
        request_json TEXT NOT NULL,
        report_json TEXT
    );
    CREATE UNIQUE INDEX workflows_one_open_per_domain
        ON workflows (domain_uuid) WHERE state = 'open';
    CREATE INDEX workflows_created ON workflows (created);
    CREATE TABLE steps (
        workflow_id TEXT NOT NULL REFERENCES workflows (id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        name TEXT NOT NULL,
        status TEXT NOT NULL
            CHECK (status IN ('started', 'done', 'failed', 'compensating', 'compensated')),
        data_json TEXT NOT NULL,
        at REAL NOT NULL,
        PRIMARY KEY (workflow_id, seq)
    );
    """,
    # 2: the one-call configuration kinds.  SQLite cannot change a CHECK in place: the
    # table is rebuilt (with foreign keys off, so that dropping it keeps the steps).
    """
    CREATE TABLE workflows_2 (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL CHECK (kind IN ('migrate', 'failover', 'repair', 'team-set',
                                           'team-remove', 'pool-define', 'pool-undefine')),
        domain_uuid TEXT NOT NULL,
        domain_name TEXT NOT NULL,
        source_uri TEXT NOT NULL,
        destination_uri TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('open', 'closed')),
        outcome TEXT,
        created REAL NOT NULL,
        updated REAL NOT NULL,
        owner_pid INTEGER NOT NULL,
        owner_start INTEGER,
        owner_boot_id TEXT,
        request_json TEXT NOT NULL,
        report_json TEXT
    );
    INSERT INTO workflows_2 SELECT * FROM workflows;
    DROP TABLE workflows;
    ALTER TABLE workflows_2 RENAME TO workflows;
    CREATE UNIQUE INDEX workflows_one_open_per_domain
        ON workflows (domain_uuid) WHERE state = 'open';
    CREATE INDEX workflows_created ON workflows (created);
    """,
    # 3: cancel requests, one per workflow, kept with it.
    """
    CREATE TABLE cancel_requests (
        workflow_id TEXT PRIMARY KEY REFERENCES workflows (id) ON DELETE CASCADE,
        requested REAL NOT NULL,
        requested_by TEXT NOT NULL
    );
    """,
)

WORKFLOW_COLUMNS = (
    "id, kind, domain_uuid, domain_name, source_uri, destination_uri, state, outcome, "
    "created, updated, owner_pid, owner_start, owner_boot_id, request_json, report_json"
)

#: The version a journal has once every upgrade has run.
SCHEMA_VERSION = len(MIGRATIONS)


def statements(script: str) -> list[str]:
    """The SQL statements of one upgrade, to run one by one inside its transaction."""
    return [s.strip() for s in script.split(";") if s.strip()]
