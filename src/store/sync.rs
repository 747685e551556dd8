//! Entry sync for agents (issue 10): per-entry revisions and tombstones, read one page at a
//! time in `(revision, id)` order, written once for both engines (the statements are the same
//! text; both engines take `$N` placeholders and row-value comparisons).
//!
//! Every entry write first bumps the one `entries_revision` row and uses the new value, in the
//! same transaction. The row lock (PostgreSQL) or the write lock (SQLite) is held until commit,
//! so revisions commit in order: a reader that sees revision N has every write up to N, and an
//! agent that reads `(since, N]` misses nothing, whichever server wrote.

use super::rows::{EntryRow, entry_columns};
use super::{Entry, StoreError};
use crate::id::SpiffeId;

/// Bumps the global revision and returns the new value; the first statement of every entry
/// write, so it takes the lock that orders revisions.
pub(super) const BUMP_REVISION: &str =
    "UPDATE entries_revision SET revision = revision + 1 WHERE id = 1 RETURNING revision";

/// Inserts an entry with its revision (`$10`).
pub(super) const INSERT_ENTRY: &str = "INSERT INTO entries (id, spiffe_id, parent_id, selectors, \
     scopes, ttl_secs, dns_names, created_at, identity_key, revision, hint, jwt_ttl_secs) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)";

/// Updates what `entry update` may change, with the new revision (`$9`): `$1` ID, `$2`
/// selectors, `$3` scopes, `$4` TTL, `$5` DNS names, `$6` hint, `$7` JWT TTL, `$8` identity
/// key; only while the stored row is still the entry the update was computed from: its SPIFFE
/// ID and parent `$10` and `$11` (the identity key was computed from them), and `$12`-`$17`
/// its selectors, scopes, TTL, DNS names, hint and JWT TTL as they were read.
pub(super) const UPDATE_ENTRY: &str = "UPDATE entries SET selectors = $2, scopes = $3, \
     ttl_secs = $4, dns_names = $5, hint = $6, jwt_ttl_secs = $7, identity_key = $8, \
     revision = $9 WHERE id = $1 AND spiffe_id = $10 AND parent_id = $11 AND selectors = $12 \
     AND scopes = $13 AND ttl_secs = $14 AND dns_names = $15 AND hint = $16 \
     AND jwt_ttl_secs = $17";

/// Deletes an entry and returns its parent, for its tombstone.
pub(super) const DELETE_ENTRY: &str = "DELETE FROM entries WHERE id = $1 RETURNING parent_id";

/// Records a deletion: `(id, parent_id, revision, deleted_at)`.
pub(super) const INSERT_TOMBSTONE: &str = "INSERT INTO entry_tombstones \
     (id, parent_id, revision, deleted_at) VALUES ($1, $2, $3, $4)";

/// The current revision and the prune horizon.
pub(super) const REVISIONS: &str =
    "SELECT revision, horizon, groups FROM entries_revision WHERE id = 1";

/// Records that the write at revision `$1` changed a node entry (see [`Revisions::groups`]).
pub(super) const MARK_GROUPS: &str = "UPDATE entries_revision SET groups = $1 WHERE id = 1";

/// One page of an agent's entries changed in `(since, upto]`, after a cursor, for a dialect
/// whose `$1` (a JSON array of the agent's parents: itself and its node groups) is read as
/// rows by `parents`: `$2` upto, `$3` cursor revision (at least `since`), `$4` cursor ID, `$5`
/// limit.
macro_rules! changes_page {
    ($parents:literal) => {
        concat!(
            "SELECT ",
            entry_columns!(),
            ", revision FROM entries WHERE parent_id IN (",
            $parents,
            ") AND revision <= $2 AND (revision, id) > ($3, $4) ORDER BY revision, id LIMIT $5"
        )
    };
}

/// As [`changes_page`], for tombstones: `(revision, id)`.
macro_rules! deletions_page {
    ($parents:literal) => {
        concat!(
            "SELECT revision, id FROM entry_tombstones WHERE parent_id IN (",
            $parents,
            ") AND revision <= $2 AND (revision, id) > ($3, $4) ORDER BY revision, id LIMIT $5"
        )
    };
}

/// [`changes_page`] for SQLite.
pub(super) const CHANGES_PAGE_SQLITE: &str = changes_page!("SELECT value FROM json_each($1)");
/// [`deletions_page`] for SQLite.
pub(super) const DELETIONS_PAGE_SQLITE: &str = deletions_page!("SELECT value FROM json_each($1)");
/// [`changes_page`] for PostgreSQL.
pub(super) const CHANGES_PAGE_POSTGRES: &str =
    changes_page!("SELECT json_array_elements_text($1::json)");
/// [`deletions_page`] for PostgreSQL.
pub(super) const DELETIONS_PAGE_POSTGRES: &str =
    deletions_page!("SELECT json_array_elements_text($1::json)");

/// A sync query's parents as bound: a JSON array.
pub(super) fn parents_json(query: &SyncQuery) -> String {
    super::rows::encode_list(query.parents.iter().map(SpiffeId::as_str))
}

/// The newest revision among the tombstones about to be pruned (`deleted_at < $1`).
pub(super) const PRUNED_HORIZON: &str =
    "SELECT COALESCE(MAX(revision), 0) FROM entry_tombstones WHERE deleted_at < $1";
/// Prunes tombstones deleted before `$1`.
pub(super) const PRUNE: &str = "DELETE FROM entry_tombstones WHERE deleted_at < $1";
/// Raises the horizon to `$1` (never lowers it).
pub(super) const RAISE_HORIZON: &str =
    "UPDATE entries_revision SET horizon = $1 WHERE id = 1 AND horizon < $1";

/// The global entry revision and how far back deletions are remembered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Revisions {
    /// Grows by one with every entry created or deleted.
    pub current: i64,
    /// The newest revision whose tombstone was pruned: an agent whose known revision is below
    /// it may have missed a deletion and must sync in full.
    pub horizon: i64,
    /// The revision of the newest write of a node entry: node groups decide which entries an
    /// agent gets, so an agent whose known revision is below it must sync in full.
    pub groups: i64,
}

/// Where a page of a sync starts: after this `(revision, id)`. IDs are never empty, so
/// `(r, "")` stands before every row of revision `r`: a sync from known revision `k` starts at
/// `(k + 1, "")`, a full one at `(0, "")`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SyncCursor {
    /// The revision of the last row sent.
    pub revision: i64,
    /// The ID of the last row sent (empty before the first).
    pub id: String,
}

/// One page of the changes under one agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncQuery {
    /// The parents whose entries are read: the agent and the node groups it belongs to.
    pub parents: Vec<SpiffeId>,
    /// Only rows with a revision at most this (the revision the sync brings the agent to).
    pub upto: i64,
    /// Only rows after this.
    pub after: SyncCursor,
    /// At most this many rows (at least one is asked for).
    pub limit: u32,
}

/// A changed entry as read, or why it could not be read (it is then skipped by ID, and the
/// others still sync).
#[derive(Debug)]
pub struct SyncRow {
    /// The row's position, for the next page's cursor.
    pub cursor: SyncCursor,
    /// The entry, or [`StoreError::Corrupt`] naming what is wrong with the row.
    pub entry: Result<Entry, StoreError>,
}

/// A deleted entry: its tombstone's position (whose ID is the entry's, as stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deletion {
    /// The tombstone's position (its ID is the deleted entry's).
    pub cursor: SyncCursor,
}

/// An `entries` row with its revision.
#[derive(sqlx::FromRow)]
pub(super) struct SyncEntryRow {
    #[sqlx(flatten)]
    entry: EntryRow,
    revision: i64,
}

impl From<SyncEntryRow> for SyncRow {
    fn from(row: SyncEntryRow) -> Self {
        let cursor = SyncCursor {
            revision: row.revision,
            id: row.entry.id().to_owned(),
        };
        Self {
            cursor,
            entry: Entry::try_from(row.entry),
        }
    }
}

/// A tombstone row as read: `(revision, id)`.
pub(super) fn deletion((revision, id): (i64, String)) -> Deletion {
    Deletion {
        cursor: SyncCursor { revision, id },
    }
}
