//! The admin API's operator lists, paged (issue 10): `ListEntries` with its filters and
//! `ListAgents`. Each answer is one page read from the store with keyset pagination, so the
//! server holds at most one page of records per call however many there are, and no answer
//! comes near gRPC's message limit: a page stops at [`MAX_PAGE`] records or about
//! [`MAX_PAGE_BYTES`], whichever comes first.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use mayfly_attestors::Selector;
use prost::Message;

use crate::id::SpiffeId;
use crate::proto::admin as pb;
use crate::store::{EntryCursor, EntryId, EntryQuery, SpiffeIdPrefix};
use crate::text::escape_bounded;

/// Records per page when the caller asks for none in particular.
pub(crate) const DEFAULT_PAGE: u32 = 500;
/// The most records per page.
pub(crate) const MAX_PAGE: u32 = 1000;
/// A page stops before its records' encoded size passes this (a quarter of the default
/// 4 MiB gRPC limit, so even a page of the largest entries fits).
pub(crate) const MAX_PAGE_BYTES: usize = 1 << 20;

/// Why a list request was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ListError {
    /// A filter or the page token does not parse; the text says which, and what to do.
    #[error("{0}")]
    Invalid(String),
}

/// A refused filter: the flag, then the parser's sentence (which quotes the value), escaped
/// since it echoes what the caller sent.
fn invalid(flag: &str, why: impl std::fmt::Display) -> ListError {
    ListError::Invalid(format!("{flag}: {}", escape_bounded(&why.to_string(), 400)))
}

fn page_size(asked: u32) -> u32 {
    match asked {
        0 => DEFAULT_PAGE,
        n => n.min(MAX_PAGE),
    }
}

fn bad_token(token: &str) -> ListError {
    ListError::Invalid(format!(
        "the page token '{}' is not one this server gave; start the list again without one",
        escape_bounded(token, 120)
    ))
}

/// The store query a `ListEntries` request asks for, every filter validated.
///
/// # Errors
/// [`ListError::Invalid`] naming the first filter (or the page token) that does not parse.
pub(crate) fn entry_query(req: &pb::ListEntriesRequest) -> Result<EntryQuery, ListError> {
    let parent_id = match req.parent_id.as_str() {
        "" => None,
        text => Some(SpiffeId::parse(text).map_err(|e| invalid("--parent-id", e))?),
    };
    let spiffe_id_prefix = match req.spiffe_id_prefix.as_str() {
        "" => None,
        text => Some(SpiffeIdPrefix::parse(text).map_err(|e| invalid("--spiffe-id-prefix", e))?),
    };
    let selectors = req
        .selectors
        .iter()
        .map(|text| Selector::parse(text).map_err(|e| invalid("--selector", e)))
        .collect::<Result<Vec<_>, _>>()?;
    let after = match req.page_token.as_str() {
        "" => None,
        token => Some(decode_entry_token(token).ok_or_else(|| bad_token(token))?),
    };
    Ok(EntryQuery {
        parent_id,
        spiffe_id_prefix,
        selectors,
        after,
        limit: page_size(req.page_size),
    })
}

/// The page size a `ListAgents` request asks for and where its page starts.
///
/// # Errors
/// [`ListError::Invalid`] when the page token does not parse.
pub(crate) fn agent_query(
    req: &pb::ListAgentsRequest,
) -> Result<(Option<SpiffeId>, u32), ListError> {
    let after = match req.page_token.as_str() {
        "" => None,
        token => Some(
            URL_SAFE_NO_PAD
                .decode(token)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .and_then(|s| SpiffeId::parse(&s).ok())
                .ok_or_else(|| bad_token(token))?,
        ),
    };
    Ok((after, page_size(req.page_size)))
}

/// A cursor as a page token: opaque to callers, `<spiffe id>\n<entry id>` in base64url.
fn entry_token(entry: &pb::Entry) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}\n{}", entry.spiffe_id, entry.id))
}

fn decode_entry_token(token: &str) -> Option<EntryCursor> {
    let text = String::from_utf8(URL_SAFE_NO_PAD.decode(token).ok()?).ok()?;
    let (spiffe_id, id) = text.split_once('\n')?;
    Some(EntryCursor {
        spiffe_id: SpiffeId::parse(spiffe_id).ok()?,
        id: EntryId::parse(id)?,
    })
}

/// Keeps the leading records whose encoded size stays within [`MAX_PAGE_BYTES`] (at least
/// one); returns whether any were left out.
fn within_budget<M: Message>(records: &mut Vec<M>) -> bool {
    let mut bytes = 0;
    let keep = records
        .iter()
        .take_while(|m| {
            // Each repeated field element costs its length prefix and tag too.
            bytes += m.encoded_len() + 6;
            bytes <= MAX_PAGE_BYTES
        })
        .count()
        .max(1);
    let cut = keep < records.len();
    records.truncate(keep);
    cut
}

/// One `ListEntries` answer from a store page read with `limit`: the entries within the byte
/// budget, and a token for the next page unless this one was the last.
pub(crate) fn entries_answer(mut entries: Vec<pb::Entry>, limit: u32) -> pb::ListEntriesResponse {
    let full = entries.len() >= limit as usize;
    let cut = within_budget(&mut entries);
    let next_page_token = match entries.last() {
        Some(last) if full || cut => entry_token(last),
        _ => String::new(),
    };
    pb::ListEntriesResponse {
        entries,
        next_page_token,
    }
}

/// One `ListAgents` answer, as [`entries_answer`].
pub(crate) fn agents_answer(mut agents: Vec<pb::Agent>, limit: u32) -> pb::ListAgentsResponse {
    let full = agents.len() >= limit as usize;
    let cut = within_budget(&mut agents);
    let next_page_token = match agents.last() {
        Some(last) if full || cut => URL_SAFE_NO_PAD.encode(&last.spiffe_id),
        _ => String::new(),
    };
    pb::ListAgentsResponse {
        agents,
        next_page_token,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: usize, filler: usize) -> pb::Entry {
        pb::Entry {
            id: format!("{n:032x}"),
            spiffe_id: format!("spiffe://acme.test/w{n}"),
            dns_names: vec!["x".repeat(filler)],
            ..pb::Entry::default()
        }
    }

    #[test]
    fn tokens_round_trip_and_strangers_are_refused() {
        let answer = entries_answer((0..3).map(|n| entry(n, 1)).collect(), 3);
        let req = pb::ListEntriesRequest {
            page_token: answer.next_page_token.clone(),
            ..Default::default()
        };
        let cursor = entry_query(&req).unwrap().after.unwrap();
        assert_eq!(cursor.spiffe_id.as_str(), "spiffe://acme.test/w2");
        assert_eq!(cursor.id.as_str(), format!("{:032x}", 2));
        // A short page is the last one.
        assert!(
            entries_answer((0..2).map(|n| entry(n, 1)).collect(), 3)
                .next_page_token
                .is_empty()
        );
        for bad in [
            "!!",
            "bm90IGEgY3Vyc29y",
            &URL_SAFE_NO_PAD.encode("spiffe://a/b\nzz"),
        ] {
            let req = pb::ListEntriesRequest {
                page_token: bad.to_owned(),
                ..Default::default()
            };
            let err = entry_query(&req).unwrap_err().to_string();
            assert!(err.contains("not one this server gave"), "{err}");
        }
    }

    #[test]
    fn a_page_stops_at_its_byte_budget_but_holds_at_least_one() {
        // 200 entries of ~10 KiB: about 100 fit in 1 MiB.
        let answer = entries_answer((0..200).map(|n| entry(n, 10_000)).collect(), 1000);
        let n = answer.entries.len();
        assert!((90..=105).contains(&n), "{n}");
        assert!(answer.encoded_len() <= MAX_PAGE_BYTES + 64);
        assert!(
            !answer.next_page_token.is_empty(),
            "cut short, so not the last page"
        );
        let huge = entries_answer(vec![entry(0, 2 * MAX_PAGE_BYTES)], 1000);
        assert_eq!(huge.entries.len(), 1);
        assert!(huge.next_page_token.is_empty());
    }

    #[test]
    fn filters_are_validated_with_one_sentence_each() {
        let bad = [
            pb::ListEntriesRequest {
                parent_id: "not-an-id".into(),
                ..Default::default()
            },
            pb::ListEntriesRequest {
                spiffe_id_prefix: "acme.test/".into(),
                ..Default::default()
            },
            pb::ListEntriesRequest {
                selectors: vec!["uid:1000".into()],
                ..Default::default()
            },
        ];
        for (req, flag) in bad
            .iter()
            .zip(["--parent-id", "--spiffe-id-prefix", "--selector"])
        {
            let err = entry_query(req).unwrap_err().to_string();
            assert!(err.starts_with(flag), "{err}");
            assert_eq!(err.lines().count(), 1, "{err}");
        }
        let good = pb::ListEntriesRequest {
            parent_id: "spiffe://acme.test/mayfly/agent/join_token/a".into(),
            spiffe_id_prefix: "spiffe://acme.test/agents/".into(),
            selectors: vec!["unix:uid:1000".into()],
            page_size: 5000,
            ..Default::default()
        };
        let q = entry_query(&good).unwrap();
        assert_eq!(q.limit, MAX_PAGE);
        assert_eq!(q.selectors.len(), 1);
        assert_eq!(
            entry_query(&pb::ListEntriesRequest::default())
                .unwrap()
                .limit,
            DEFAULT_PAGE
        );
    }
}
