-- Node attestation and node groups (issue 12).
--
-- An agent remembers the node selectors its attestor proved (a JSON array, sorted and
-- duplicate-free), and the entry revision from which it must sync in full: set when it
-- attests again without a record or with other selectors, since its node groups (and so its
-- entries) may then differ from what it holds.
ALTER TABLE agents ADD COLUMN node_selectors TEXT NOT NULL DEFAULT '[]';
ALTER TABLE agents ADD COLUMN resync_revision BIGINT NOT NULL DEFAULT 0;

-- The revision of the newest write of a node entry (an entry whose parent is the server):
-- node groups decide which entries every agent gets, so an agent behind it syncs in full.
ALTER TABLE entries_revision ADD COLUMN groups BIGINT NOT NULL DEFAULT 0;

-- Evidence accepted once (a projected service account token's jti or hash, ...) is
-- remembered here until it expires, so it cannot be replayed.
CREATE TABLE attest_single_use (
    key   BYTEA  NOT NULL PRIMARY KEY CHECK (length(key) = 32),
    until BIGINT NOT NULL
);
CREATE INDEX attest_single_use_by_until ON attest_single_use (until);
