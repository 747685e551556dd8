//! One sync pass over the node API's `ListEntries` (issue 10): every page of it, in order, so
//! the caller applies the pass as one step. Against a server of an earlier version (no
//! `incremental` in its answer) the one answer is the whole list, as before.

use std::time::Duration;

use prost::Message;

use super::link::ServerLink;
use super::sync_error::SyncError;
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
