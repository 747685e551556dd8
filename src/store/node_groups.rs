//! Store statements for node attestation and node groups (issue 12), the same text for both
//! engines: agents that attest again by themselves, single-use evidence, and node entries.
//!
//! A node entry is an entry whose parent is the server's ID: it defines a node group (the
//! agents whose node selectors include all of its selectors) and issues nothing itself.
//! Which entries an agent gets depends on its groups, so a write of a node entry, or an agent
//! attesting again with other node selectors, makes the agents concerned sync in full (see
//! [`super::Revisions::groups`] and [`super::AgentRecord::resync_revision`]).

use super::rows::{agent_columns, entry_columns};

/// How many expired single-use keys one claim forgets at most: enough to keep up with the
/// claims that add them, bounded so a claim never does unbounded work.
pub(super) const PRUNE_SINGLE_USE: i64 = 16;

/// An agent's ban flag, node selectors and resync revision, to decide a re-attestation: `$1`
/// ID.
pub(super) const AGENT_STANDING: &str =
    "SELECT banned, node_selectors, resync_revision FROM agents WHERE spiffe_id = $1";

/// Inserts an agent, or replaces what a re-attestation changes of one that is not banned
/// (nothing is written for a banned one): `$1` ID, `$2` attestor, `$3` current serial, `$4`
/// not-after, `$5` created-at (kept when the record exists), `$6` node selectors, `$7` resync
/// revision.
pub(super) const UPSERT_AGENT: &str = "INSERT INTO agents (spiffe_id, attestor, current_serial, \
     next_serial, not_after, banned, created_at, node_selectors, resync_revision) \
     VALUES ($1, $2, $3, NULL, $4, FALSE, $5, $6, $7) \
     ON CONFLICT (spiffe_id) DO UPDATE SET attestor = excluded.attestor, \
     current_serial = excluded.current_serial, next_serial = NULL, \
     not_after = excluded.not_after, node_selectors = excluded.node_selectors, \
     resync_revision = excluded.resync_revision WHERE agents.banned = FALSE";

/// Inserts an agent as `create_agent` does: `$1`-`$9` as [`agent_columns`] reads them.
pub(super) const INSERT_AGENT: &str = concat!(
    "INSERT INTO agents (",
    agent_columns!(),
    ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
);

/// Forgets up to `$2` single-use keys that expired at `$1`.
pub(super) const PRUNE_EXPIRED: &str = "DELETE FROM attest_single_use WHERE key IN \
     (SELECT key FROM attest_single_use WHERE until <= $1 ORDER BY until LIMIT $2)";

/// Claims key `$1` until `$2` unless it is remembered past `$3`: one row affected when
/// claimed, none for a replay.
pub(super) const CLAIM: &str = "INSERT INTO attest_single_use (key, until) VALUES ($1, $2) \
     ON CONFLICT (key) DO UPDATE SET until = excluded.until \
     WHERE attest_single_use.until <= $3";

/// The node entries under server `$1`, all (`$2` NULL) or of one group (`$2` its ID).
pub(super) const NODE_ENTRIES: &str = concat!(
    "SELECT ",
    entry_columns!(),
    " FROM entries WHERE parent_id = $1 AND ($2 IS NULL OR spiffe_id = $2) \
     ORDER BY spiffe_id, id"
);
