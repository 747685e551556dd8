-- Mayfly's registration store, SQLite engine. Same logical schema as migrations/postgres.
-- Lists (selectors, scopes, DNS names, audit scopes) are JSON arrays of strings.

CREATE TABLE entries (
    id           TEXT    NOT NULL PRIMARY KEY,
    spiffe_id    TEXT    NOT NULL,
    parent_id    TEXT    NOT NULL,
    -- JSON array, sorted and duplicate-free, so equal selector sets are equal text.
    selectors    TEXT    NOT NULL,
    scopes       TEXT    NOT NULL,
    ttl_secs     INTEGER NOT NULL CHECK (ttl_secs >= 0),
    dns_names    TEXT    NOT NULL,
    created_at   INTEGER NOT NULL,
    -- SHA-256 over (spiffe_id, parent_id, selectors): enforces their uniqueness with a
    -- fixed-size key (PostgreSQL cannot index arbitrarily long text).
    identity_key BLOB    NOT NULL UNIQUE CHECK (length(identity_key) = 32)
) STRICT;

CREATE INDEX entries_by_spiffe_id ON entries (spiffe_id, id);
CREATE INDEX entries_by_parent ON entries (parent_id, spiffe_id, id);

-- Grows whenever an entry is created or deleted, in the same transaction.
CREATE TABLE entries_revision (
    id       INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    revision INTEGER NOT NULL
) STRICT;
INSERT INTO entries_revision (id, revision) VALUES (1, 0);

CREATE TABLE join_tokens (
    secret_hash BLOB    NOT NULL PRIMARY KEY CHECK (length(secret_hash) = 32),
    node_id     TEXT    NOT NULL,
    expires_at  INTEGER NOT NULL
) STRICT;

CREATE TABLE agents (
    spiffe_id      TEXT    NOT NULL PRIMARY KEY,
    attestor       TEXT    NOT NULL,
    current_serial TEXT    NOT NULL,
    next_serial    TEXT,
    not_after      INTEGER NOT NULL,
    banned         INTEGER NOT NULL DEFAULT 0 CHECK (banned IN (0, 1)),
    created_at     INTEGER NOT NULL
) STRICT;

CREATE TABLE ca_certs (
    fingerprint TEXT    NOT NULL PRIMARY KEY,
    der         BLOB    NOT NULL,
    not_after   INTEGER NOT NULL
) STRICT;

CREATE TABLE audit (
    seq       INTEGER NOT NULL PRIMARY KEY,
    time_ms   INTEGER NOT NULL,
    action    TEXT    NOT NULL,
    decision  TEXT,
    reason    TEXT    NOT NULL,
    agent_id  TEXT,
    attestor  TEXT,
    entry_id  TEXT,
    spiffe_id TEXT,
    task_id   TEXT,
    scopes    TEXT    NOT NULL,
    serial    TEXT    UNIQUE,
    not_after INTEGER,
    prev_hash BLOB    NOT NULL,
    hash      BLOB    NOT NULL
) STRICT;

CREATE INDEX audit_by_task ON audit (task_id, seq);

-- The newest record's sequence number and hash, so deleting records at the end is detected.
CREATE TABLE audit_head (
    id   INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    seq  INTEGER NOT NULL,
    hash BLOB    NOT NULL
) STRICT;
INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, zeroblob(32));
