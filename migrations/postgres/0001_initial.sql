-- Mayfly's registration store, PostgreSQL engine. Same logical schema as migrations/sqlite.
-- Lists (selectors, scopes, DNS names, audit scopes) are JSON arrays of strings, as text.
-- Tables are created in the first schema of the connection's search_path. Identifiers sort
-- in byte order (COLLATE "C"), as in SQLite, whatever the database's locale.

CREATE TABLE entries (
    id           TEXT    COLLATE "C" NOT NULL PRIMARY KEY,
    spiffe_id    TEXT    COLLATE "C" NOT NULL,
    parent_id    TEXT    COLLATE "C" NOT NULL,
    -- JSON array, sorted and duplicate-free, so equal selector sets are equal text.
    selectors    TEXT    NOT NULL,
    scopes       TEXT    NOT NULL,
    ttl_secs     BIGINT  NOT NULL CHECK (ttl_secs >= 0),
    dns_names    TEXT    NOT NULL,
    created_at   BIGINT  NOT NULL,
    -- SHA-256 over (spiffe_id, parent_id, selectors): a B-tree cannot index arbitrarily long
    -- text (about 2.7 kB per key), so uniqueness is enforced on a fixed-size key.
    identity_key BYTEA   NOT NULL UNIQUE CHECK (length(identity_key) = 32)
);

CREATE INDEX entries_by_spiffe_id ON entries (spiffe_id, id);
CREATE INDEX entries_by_parent ON entries (parent_id, spiffe_id, id);

-- Grows whenever an entry is created or deleted, in the same transaction.
CREATE TABLE entries_revision (
    id       INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    revision BIGINT  NOT NULL
);
INSERT INTO entries_revision (id, revision) VALUES (1, 0);

CREATE TABLE join_tokens (
    secret_hash BYTEA   NOT NULL PRIMARY KEY CHECK (length(secret_hash) = 32),
    node_id     TEXT    NOT NULL,
    expires_at  BIGINT  NOT NULL
);

CREATE TABLE agents (
    spiffe_id      TEXT    COLLATE "C" NOT NULL PRIMARY KEY,
    attestor       TEXT    NOT NULL,
    current_serial TEXT    NOT NULL,
    next_serial    TEXT,
    not_after      BIGINT  NOT NULL,
    banned         BOOLEAN NOT NULL DEFAULT FALSE,
    created_at     BIGINT  NOT NULL
);

CREATE TABLE ca_certs (
    fingerprint TEXT    COLLATE "C" NOT NULL PRIMARY KEY,
    der         BYTEA   NOT NULL,
    not_after   BIGINT  NOT NULL
);

CREATE TABLE audit (
    seq       BIGINT  NOT NULL PRIMARY KEY,
    time_ms   BIGINT  NOT NULL,
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
    not_after BIGINT,
    prev_hash BYTEA   NOT NULL,
    hash      BYTEA   NOT NULL
);

CREATE INDEX audit_by_task ON audit (task_id, seq);

-- The newest record's sequence number and hash, so deleting records at the end is detected.
-- Appenders lock this row (SELECT ... FOR UPDATE), which serialises them across replicas.
CREATE TABLE audit_head (
    id   INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    seq  BIGINT  NOT NULL,
    hash BYTEA   NOT NULL
);
INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, decode(repeat('00', 32), 'hex'));
