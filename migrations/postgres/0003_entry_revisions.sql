-- Incremental entry sync (issue 10): each entry remembers the global revision of its creation,
-- and a deleted entry leaves a tombstone with the revision of its deletion, so an agent asks
-- only for what changed under it since the revision it has. Tombstones are pruned after a
-- while; `horizon` is the newest pruned revision: an agent behind it gets a full resync.
-- Writers take the `entries_revision` row lock before they write an entry, so revisions
-- commit in order across replicas.

ALTER TABLE entries ADD COLUMN revision BIGINT NOT NULL DEFAULT 0;
UPDATE entries SET revision = (SELECT revision FROM entries_revision WHERE id = 1);
CREATE INDEX entries_by_parent_revision ON entries (parent_id, revision, id);

CREATE TABLE entry_tombstones (
    id         TEXT   COLLATE "C" NOT NULL PRIMARY KEY,
    parent_id  TEXT   COLLATE "C" NOT NULL,
    revision   BIGINT NOT NULL,
    deleted_at BIGINT NOT NULL
);
CREATE INDEX entry_tombstones_by_parent ON entry_tombstones (parent_id, revision, id);
CREATE INDEX entry_tombstones_by_age ON entry_tombstones (deleted_at);

ALTER TABLE entries_revision ADD COLUMN horizon BIGINT NOT NULL DEFAULT 0;

-- Revision 0 means "none" to an agent: moved past it, so an agent that synced an empty store
-- is not mistaken for one that never synced (and sent everything again, every time).
UPDATE entries_revision SET revision = revision + 1 WHERE id = 1;
