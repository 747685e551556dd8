//! One sync pass over the node API's `ListEntries` (issue 10): every page of it, in order, so
//! the caller applies the pass as one step, and the entry set after it ([`merge`]). Against a server of an earlier version (no
//! `incremental` in its answer) the one answer is the whole list, as before.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;

use super::link::ServerLink;
use super::state::AgentEntry;
use super::sync_error::SyncError;
use crate::attestors::Selector;
use crate::id::{SpiffeId, parse_scopes};
use crate::proto::node as pb;

/// The call's name in messages.
const CALL: &str = "ListEntries";
/// The most pages one pass may take (5,000 entries take about 20); more means a server that
/// never ends its pass.
const MAX_PAGES: u32 = 10_000;

/// What one pass brought.
#[derive(Debug, Default)]
pub(super) struct Pass {
    /// The revision the agent has after applying the pass.
    pub revision: i64,
    /// The server speaks the incremental protocol (it pages, sends changes and holds calls).
    pub incremental: bool,
    /// `entries` replace the agent's set; otherwise they and `deleted` are changes.
    pub full: bool,
    /// Nothing changed for the agent.
    pub unchanged: bool,
    /// Entries new or changed (or all of them, when `full`).
    pub entries: Vec<pb::Entry>,
    /// IDs of entries deleted.
    pub deleted: Vec<String>,
    /// IDs of entries the server could not send.
    pub skipped: Vec<String>,
    /// The bundle, when it changed (empty otherwise).
    pub bundle: Vec<Vec<u8>>,
    /// The JWT keys (uncompressed points), sent with the bundle.
    pub jwt_keys: Vec<Vec<u8>>,
    /// SHA-256 of each CA the server marked tainted (what they signed is re-issued).
    pub tainted: Vec<Vec<u8>>,
    /// Answers received.
    pub pages: u32,
    /// Their encoded size.
    pub bytes: usize,
}

/// Reads one whole pass: from `known`, with the digest of the bundle held, the first call held
/// by the server up to `wait` while nothing changes.
///
/// # Errors
/// [`SyncError`] saying which side refused what.
pub(super) async fn fetch(
    link: &ServerLink,
    known: i64,
    bundle_sha256: Vec<u8>,
    wait: Duration,
) -> Result<Pass, SyncError> {
    let mut pass = Pass::default();
    let mut request = pb::ListEntriesRequest {
        known_revision: known,
        incremental: true,
        page_token: String::new(),
        bundle_sha256,
        wait_ms: u32::try_from(wait.as_millis()).unwrap_or(u32::MAX),
    };
    loop {
        let answer = link
            .client()
            .list_entries(request.clone())
            .await
            .map_err(|status| SyncError::of_call(CALL, status))?
            .into_inner();
        pass.pages += 1;
        pass.bytes += answer.encoded_len();
        if pass.pages == 1 {
            pass.revision = answer.revision;
            pass.incremental = answer.incremental;
            pass.unchanged = answer.unchanged;
            // An older server sends the whole list unless it is unchanged.
            pass.full = if answer.incremental {
                answer.full
            } else {
                !answer.unchanged
            };
            pass.bundle = answer.bundle;
            pass.jwt_keys = answer.jwt_keys;
            pass.tainted = answer.tainted_ca_fingerprints;
        } else if answer.revision != pass.revision || answer.full != pass.full {
            return Err(SyncError::Protocol {
                call: CALL,
                detail: "a later page changed the revision of the pass".into(),
            });
        }
        pass.entries.extend(answer.entries);
        pass.deleted.extend(answer.deleted_entry_ids);
        pass.skipped.extend(answer.skipped_entry_ids);
        if !answer.incremental || answer.next_page_token.is_empty() {
            return Ok(pass);
        }
        if pass.pages >= MAX_PAGES {
            return Err(SyncError::Protocol {
                call: CALL,
                detail: format!("the pass did not end after {MAX_PAGES} pages"),
            });
        }
        request.page_token = answer.next_page_token;
        request.bundle_sha256.clear();
        request.wait_ms = 0;
    }
}

/// Logs what a pass brought, and at warn level the entries the server could not send.
pub(super) fn report(pass: &Pass) {
    if !pass.skipped.is_empty() {
        // The IDs were escaped by the server; escaped again in case the server is older.
        let ids: Vec<String> = pass
            .skipped
            .iter()
            .map(|id| crate::text::escape_bounded(id, 64).into_owned())
            .collect();
        tracing::warn!(entries = ?ids, "the server skipped entries it could not send (unreadable in its store, or too large); the others are synced: check them with `mayfly entry show ID`");
    }
    tracing::info!(
        full = pass.full,
        pages = pass.pages,
        bytes = pass.bytes,
        entries = pass.entries.len(),
        deleted = pass.deleted.len(),
        revision = pass.revision,
        "synced entries"
    );
}

/// The entry set after `pass`: its entries replace `current` when it is a full pass, and are
/// applied to it as changes (with its deletions) otherwise. Ordered by SPIFFE ID, then ID.
pub(super) fn merge(current: &[Arc<AgentEntry>], pass: Pass) -> Vec<Arc<AgentEntry>> {
    let mut by_id: HashMap<String, Arc<AgentEntry>> = if pass.full {
        HashMap::new()
    } else {
        current.iter().map(|e| (e.id.clone(), e.clone())).collect()
    };
    for id in pass.deleted.iter().chain(&pass.skipped) {
        by_id.remove(id);
    }
    for e in pass.entries {
        match to_entry(e) {
            Ok(entry) => {
                by_id.insert(entry.id.clone(), Arc::new(entry));
            }
            Err(reason) => {
                tracing::warn!(%reason, "ignoring an entry the agent cannot use");
            }
        }
    }
    let mut entries: Vec<Arc<AgentEntry>> = by_id.into_values().collect();
    // First created first: a workload's default identity is its oldest entry, whatever IDs
    // later entries get (see `AgentEntry::order_key`).
    entries.sort_by(|a, b| a.order_key().cmp(&b.order_key()));
    entries
}

fn to_entry(e: pb::Entry) -> Result<AgentEntry, String> {
    let spiffe_id = SpiffeId::parse(&e.spiffe_id).map_err(|err| err.to_string())?;
    let selectors = e
        .selectors
        .iter()
        .map(|s| Selector::parse(s).map_err(|err| err.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    let scopes = parse_scopes(&e.scopes).map_err(|err| err.to_string())?;
    Ok(AgentEntry {
        id: e.id,
        spiffe_id,
        selectors,
        scopes,
        ttl: Duration::from_secs(u64::from(e.ttl_seconds)),
        dns_names: e.dns_names,
        hint: e.hint,
        jwt_ttl: (e.jwt_ttl_seconds > 0).then(|| Duration::from_secs(u64::from(e.jwt_ttl_seconds))),
        created_at: e.created_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An entry created at `created_at`.
    fn entry_at(id: &str, path: &str, created_at: i64) -> pb::Entry {
        pb::Entry {
            id: id.into(),
            spiffe_id: format!("spiffe://t.test/{path}"),
            selectors: vec!["unix:uid:1".into()],
            ttl_seconds: 60,
            created_at,
            ..pb::Entry::default()
        }
    }

    /// An entry whose creation time follows its ID (so ID order is creation order).
    fn entry(id: &str, path: &str) -> pb::Entry {
        entry_at(id, path, i64::from(id.as_bytes()[0]))
    }

    fn ids(entries: &[Arc<AgentEntry>]) -> Vec<&str> {
        entries.iter().map(|e| e.id.as_str()).collect()
    }

    #[test]
    fn a_full_pass_replaces_and_a_delta_applies_changes() {
        let full = Pass {
            full: true,
            entries: vec![entry("b", "w/2"), entry("a", "w/1")],
            ..Pass::default()
        };
        let set = merge(&[], full);
        assert_eq!(ids(&set), ["a", "b"], "ordered by creation");
        let delta = Pass {
            entries: vec![entry("c", "w/0"), entry("bad", "not a spiffe id")],
            deleted: vec!["a".into(), "unknown".into()],
            skipped: vec!["b".into()],
            ..Pass::default()
        };
        assert_eq!(ids(&merge(&set, delta)), ["c"]);
        // Positive control: an empty delta keeps the set; a full pass drops what it lacks.
        assert_eq!(ids(&merge(&set, Pass::default())), ["a", "b"]);
        let again = Pass {
            full: true,
            entries: vec![entry("b", "w/2")],
            ..Pass::default()
        };
        assert_eq!(ids(&merge(&set, again)), ["b"]);
    }

    #[test]
    fn entries_are_kept_first_created_first_whatever_their_ids_or_spiffe_ids() {
        let full = Pass {
            full: true,
            entries: vec![entry_at("b", "w/a", 10), entry_at("c", "w/b", 20)],
            ..Pass::default()
        };
        let set = merge(&[], full);
        assert_eq!(ids(&set), ["b", "c"], "positive control: creation order");
        // A later entry whose ID and SPIFFE ID both sort first still comes last.
        let added = Pass {
            entries: vec![entry_at("a", "w/0", 30)],
            ..Pass::default()
        };
        let set = merge(&set, added);
        assert_eq!(ids(&set), ["b", "c", "a"]);
        // An update (same ID, same creation time, new content) keeps its place.
        let mut updated = entry_at("b", "w/a", 10);
        updated.hint = "renamed".into();
        let set = merge(
            &set,
            Pass {
                entries: vec![updated],
                ..Pass::default()
            },
        );
        assert_eq!(ids(&set), ["b", "c", "a"]);
        assert_eq!(set[0].hint, "renamed");
        // Ties in creation time fall back to the ID.
        let tied = Pass {
            full: true,
            entries: vec![entry_at("y", "w/1", 5), entry_at("x", "w/2", 5)],
            ..Pass::default()
        };
        assert_eq!(ids(&merge(&[], tied)), ["x", "y"]);
    }
}
