//! `ListEntries` for agents that speak the incremental protocol (issue 10): answers in pages of
//! at most [`PAGE_BUDGET`] encoded bytes, well under the 64 KiB the agent decodes, with only
//! what changed under the agent since the revision it has, and the bundle only when its digest
//! differs from the agent's.
//!
//! A sync pass is pinned to the revision current at its first page (`upto`, carried in the page
//! token), so the pages form one consistent step: later writes come in the next pass. Rows are
//! read in `(revision, id)` order, deletions first, then entries. A row that cannot be read
//! back, or an entry too large for any page, is skipped by ID (warned here, and named in
//! `skipped_entry_ids` for the agent to warn too); the others still sync.

use prost::Message;

use crate::id::SpiffeId;
use crate::proto::node as pb;
use crate::store::{AgentRecord, Entry, StoreError, SyncCursor, SyncQuery};

/// The most encoded bytes a page carries (the agent decodes at most 64 KiB).
pub(crate) const PAGE_BUDGET: usize = 48 * 1024;
/// Room kept on a page for the answer's own fields (revision, flags, token).
const PAGE_OVERHEAD: usize = 512;
/// How many rows are read from the store at a time while a page fills.
const ROWS_PER_READ: u32 = 256;
/// The longest page token accepted.
const MAX_TOKEN_LEN: usize = 256;
/// The most characters of a stored ID echoed back or logged (IDs of corrupt rows are
/// untrusted text).
const MAX_ID_CHARS: usize = 64;

/// Why an incremental `ListEntries` failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum EntrySyncError {
    /// The page token is not one this server hands out.
    #[error(
        "the page token is malformed; start the sync again without one (agents do this on their own)"
    )]
    BadPageToken,
    /// The store failed.
    #[error("the server's store failed")]
    Store(#[from] StoreError),
}

/// Where a sync pass stands; travels to the agent and back as an opaque token.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PageToken {
    /// The whole set is being sent (not changes).
    full: bool,
    /// The revision the agent had when the pass started.
    since: i64,
    /// The revision the pass brings it to.
    upto: i64,
    /// Deletions are all sent; entries are being sent.
    deletions_done: bool,
    /// The last row sent.
    after: SyncCursor,
}

impl PageToken {
    fn encode(&self) -> String {
        format!(
            "1.{}.{}.{}.{}.{}.{}",
            u8::from(self.full),
            self.since,
            self.upto,
            u8::from(self.deletions_done),
            self.after.revision,
            self.after.id
        )
    }

    fn parse(text: &str) -> Result<Self, EntrySyncError> {
        if text.len() > MAX_TOKEN_LEN {
            return Err(EntrySyncError::BadPageToken);
        }
        let mut parts = text.splitn(7, '.');
        let mut next = || parts.next().ok_or(EntrySyncError::BadPageToken);
        let flag = |s: &str| match s {
            "0" => Ok(false),
            "1" => Ok(true),
            _ => Err(EntrySyncError::BadPageToken),
        };
        let number = |s: &str| s.parse::<i64>().map_err(|_| EntrySyncError::BadPageToken);
        if next()? != "1" {
            return Err(EntrySyncError::BadPageToken);
        }
        Ok(Self {
            full: flag(next()?)?,
            since: number(next()?)?,
            upto: number(next()?)?,
            deletions_done: flag(next()?)?,
            after: SyncCursor {
                revision: number(next()?)?,
                id: next()?.to_owned(),
            },
        })
    }
}

/// The cursor before the first row of a pass: every row for a full one, the rows after revision
/// `since` otherwise.
fn start(full: bool, since: i64) -> SyncCursor {
    SyncCursor {
        revision: if full { 0 } else { since.saturating_add(1) },
        id: String::new(),
    }
}

/// The entry as the agent gets it.
pub(crate) fn entry_message(entry: Entry) -> pb::Entry {
    pb::Entry {
        id: entry.id.to_string(),
        spiffe_id: entry.spiffe_id.to_string(),
        selectors: entry.selectors.iter().map(|s| s.to_string()).collect(),
        scopes: entry.scopes.iter().map(|s| s.to_string()).collect(),
        ttl_seconds: entry.ttl_secs,
        dns_names: entry.dns_names,
        hint: entry.hint,
        jwt_ttl_seconds: entry.jwt_ttl_secs,
        created_at: entry.created_at,
    }
}

/// Bytes a repeated-field element of `len` bytes takes in the answer (tag and length prefix).
fn field_cost(len: usize) -> usize {
    len + 1 + prost::encoding::encoded_len_varint(len as u64)
}

/// A page being filled.
struct Page {
    answer: pb::ListEntriesResponse,
    used: usize,
}

impl Page {
    /// Adds `len` bytes if they fit; `false` (nothing added) when the page is full.
    fn take(&mut self, len: usize) -> bool {
        if self.used + field_cost(len) > PAGE_BUDGET {
            return false;
        }
        self.used += field_cost(len);
        true
    }

    /// Names an entry the agent will not get, if the page has room for its ID.
    fn skip(&mut self, agent: &SpiffeId, id: &str, why: &str) -> bool {
        let id = crate::text::escape_bounded(id, MAX_ID_CHARS).into_owned();
        if !self.take(id.len()) {
            return false;
        }
        tracing::warn!(agent = %agent, entry = %id, reason = why, "skipping an entry in the agent's sync; the others still sync");
        self.answer.skipped_entry_ids.push(id);
        true
    }
}

/// The parents whose entries `agent` gets: itself and the node groups it belongs to (the
/// SPIFFE IDs of the node entries under `server` whose selectors it has), without repeats.
///
/// # Errors
/// [`StoreError`] when the store fails.
pub(crate) async fn parents_of(
    store: &dyn crate::store::Store,
    server: &SpiffeId,
    agent: &AgentRecord,
) -> Result<Vec<SpiffeId>, StoreError> {
    let mut parents = vec![agent.spiffe_id.clone()];
    // Agents admitted by a join token have no node selectors, so no groups: no read.
    if agent.node_selectors.is_empty() {
        return Ok(parents);
    }
    for group in store.list_node_entries(server, None).await? {
        if agent.is_member_of(&group) && !parents.contains(&group.spiffe_id) {
            parents.push(group.spiffe_id);
        }
    }
    Ok(parents)
}

/// One page of the incremental sync of `agent` (of the server whose ID is `server`), whose
/// request is `req` and whose server's bundle is `bundle` (its CA certificates and JWT keys).
/// The agent gets the entries under its own ID and under its node groups'.
///
/// The agent's record is read again after the revisions, not taken from `record` (read when
/// the call began, or long before for a held call): a re-attestation that changed its node
/// selectors is then either seen here, or committed after this pass's revision, so its resync
/// revision is above what this pass gives the agent and the next pass is full. Either way the
/// agent cannot keep entries of a group it left, nor miss those of one it joined.
///
/// # Errors
/// [`EntrySyncError::BadPageToken`] for a token this server did not hand out;
/// [`EntrySyncError::Store`] when the store fails.
pub(crate) async fn page(
    store: &dyn crate::store::Store,
    (server, record): (&SpiffeId, &AgentRecord),
    req: &pb::ListEntriesRequest,
    (bundle, jwt_keys): (Vec<Vec<u8>>, Vec<Vec<u8>>),
) -> Result<pb::ListEntriesResponse, EntrySyncError> {
    let agent = &record.spiffe_id;
    let first = req.page_token.is_empty();
    let revisions = if first {
        Some(store.entry_revisions().await?)
    } else {
        None
    };
    // Evicted meanwhile: the record the call began with still names its own entries, and the
    // agent's next call is refused anyway.
    let fresh = store.get_agent(agent).await?;
    let record = fresh.as_ref().unwrap_or(record);
    let mut token = if let Some(revisions) = revisions {
        let known = req.known_revision;
        // A new agent, one behind the prune horizon (it may have missed deletions), one ahead
        // of the store (a database restored from backup), or one whose node groups may have
        // changed since its known revision (a node entry was written, or it attested again
        // with other node selectors) syncs in full: only a full sync both adds the entries of
        // a group it joined and removes those of a group it left.
        let full = known <= 0
            || known < revisions.horizon
            || known > revisions.current
            || known < revisions.groups
            || known < record.resync_revision;
        PageToken {
            full,
            since: if full { 0 } else { known },
            upto: revisions.current,
            deletions_done: full,
            after: start(full, known),
        }
    } else {
        PageToken::parse(&req.page_token)?
    };
    let mut page = Page {
        answer: pb::ListEntriesResponse {
            revision: token.upto,
            incremental: true,
            full: token.full,
            ..Default::default()
        },
        used: PAGE_OVERHEAD,
    };
    if first && crate::wire::bundle_digest(&bundle, &jwt_keys) != req.bundle_sha256 {
        page.used += bundle
            .iter()
            .chain(&jwt_keys)
            .map(|c| field_cost(c.len()))
            .sum::<usize>();
        page.answer.bundle = bundle;
        page.answer.jwt_keys = jwt_keys;
    }
    // Read again on every page: a group change during the pass makes the next pass full.
    let (parents, upto) = (parents_of(store, server, record).await?, token.upto);
    let query = |after: &SyncCursor, limit: u32| SyncQuery {
        parents: parents.clone(),
        upto,
        after: after.clone(),
        limit,
    };
    let mut more = false;
    // Deletions first: IDs only, so many fit on a page.
    while !token.deletions_done {
        let rows = store
            .entry_deletions_page(&query(&token.after, ROWS_PER_READ))
            .await?;
        let read = rows.len();
        for row in rows {
            let id = crate::text::escape_bounded(&row.cursor.id, MAX_ID_CHARS).into_owned();
            if !page.take(id.len()) {
                more = true;
                break;
            }
            page.answer.deleted_entry_ids.push(id);
            token.after = row.cursor;
        }
        if more {
            break;
        }
        if read < ROWS_PER_READ as usize {
            token.deletions_done = true;
            token.after = start(token.full, token.since);
        }
    }
    let page_start = page.used;
    while !more {
        // After the first read, ask for about what the page still has room for (by the mean
        // size so far), not a whole batch: rows read but not sent are read again next page.
        let sent = page.answer.entries.len();
        let limit = match (page.used - page_start).checked_div(sent) {
            None => ROWS_PER_READ,
            Some(mean) => {
                let room = PAGE_BUDGET.saturating_sub(page.used) / mean.max(1) + 1;
                u32::try_from(room)
                    .unwrap_or(ROWS_PER_READ)
                    .clamp(1, ROWS_PER_READ)
            }
        };
        let rows = store
            .entry_changes_page(&query(&token.after, limit))
            .await?;
        let read = rows.len();
        for row in rows {
            let fits = match row.entry {
                Err(e) => page.skip(agent, &row.cursor.id, &crate::wire::error_chain(&e)),
                Ok(entry) => {
                    let message = entry_message(entry);
                    let len = message.encoded_len();
                    if field_cost(len) + PAGE_OVERHEAD > PAGE_BUDGET {
                        page.skip(
                            agent,
                            &row.cursor.id,
                            &format!(
                                "the entry takes {len} bytes, more than a sync page carries ({PAGE_BUDGET} bytes)"
                            ),
                        )
                    } else if page.take(len) {
                        page.answer.entries.push(message);
                        true
                    } else {
                        false
                    }
                }
            };
            if !fits {
                more = true;
                break;
            }
            token.after = row.cursor;
        }
        if read < limit as usize {
            break;
        }
    }
    let answer = &mut page.answer;
    if more {
        answer.next_page_token = token.encode();
    }
    answer.unchanged = !token.full
        && !more
        && first
        && answer.entries.is_empty()
        && answer.deleted_entry_ids.is_empty()
        && answer.skipped_entry_ids.is_empty();
    tracing::debug!(
        agent = %agent,
        full = answer.full,
        entries = answer.entries.len(),
        deleted = answer.deleted_entry_ids.len(),
        skipped = answer.skipped_entry_ids.len(),
        bytes = answer.encoded_len(),
        last = !more,
        "ListEntries page"
    );
    Ok(page.answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_refuse_garbage() {
        let token = PageToken {
            full: false,
            since: 7,
            upto: 42,
            deletions_done: true,
            after: SyncCursor {
                revision: 9,
                id: "a.b".into(),
            },
        };
        assert_eq!(PageToken::parse(&token.encode()).unwrap(), token);
        for bad in [
            "",
            "2.0.1.2.0.1.x",
            "1.0.x.2.0.1.x",
            "1.3.1.2.0.1.x",
            "1.0.1",
        ] {
            assert!(PageToken::parse(bad).is_err(), "{bad}");
        }
        assert!(PageToken::parse(&"1".repeat(MAX_TOKEN_LEN + 1)).is_err());
    }
}
