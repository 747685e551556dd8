-- The CA journal (issue 10): one row per CA of every server sharing this store, so a restart,
-- or kill -9 in the middle of a rotation step, resumes where it was. The key of each CA is a
-- file in its server's data dir (<data dir>/ca/<ca_id>.key), written before its row.
CREATE TABLE ca_journal (
    ca_id        TEXT    NOT NULL PRIMARY KEY,  -- hex SHA-256 of the CA certificate's DER
    instance_id  TEXT    NOT NULL,              -- the owning server (<data dir>/instance_id)
    state        TEXT    NOT NULL CHECK (state IN ('prepared', 'active', 'old')),
    tainted      INTEGER NOT NULL DEFAULT 0,
    revoked      INTEGER NOT NULL DEFAULT 0,
    upstream     INTEGER NOT NULL,
    not_before   INTEGER NOT NULL,
    not_after    INTEGER NOT NULL,
    der          BLOB    NOT NULL,
    signed_until INTEGER NOT NULL               -- no SVID it signed lives past this
) STRICT;

-- A server has at most one active and one prepared CA.
CREATE UNIQUE INDEX ca_journal_one_active ON ca_journal (instance_id) WHERE state = 'active';
CREATE UNIQUE INDEX ca_journal_one_prepared ON ca_journal (instance_id) WHERE state = 'prepared';

-- Grows in the same transaction as every change of the published CA certificates.
CREATE TABLE bundle_sequence (
    id  INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL
) STRICT;
INSERT INTO bundle_sequence (id, seq) VALUES (1, 1);
