//! Paged, filtered reads for operator lists (`mayfly entry list`, `mayfly agent list`).
//!
//! Lists are read a page at a time in key order with keyset pagination: a page starts after
//! the last key of the previous one (`(spiffe_id, id)` for entries, `spiffe_id` for agents), so
//! neither side ever holds the whole table, and an entry created or deleted between two pages
//! cannot make another appear twice or not at all. Filters are evaluated by the database.

use mayfly_attestors::Selector;

use super::EntryId;
use crate::id::{MAX_SPIFFE_ID_LEN, SpiffeId, TrustDomain};

/// Where a page of entries starts: after this key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryCursor {
    /// The SPIFFE ID of the last entry of the previous page.
    pub spiffe_id: SpiffeId,
    /// Its ID, which breaks ties between entries with one SPIFFE ID.
    pub id: EntryId,
}

/// Which entries to list, and how many at most.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntryQuery {
    /// Only entries of this parent.
    pub parent_id: Option<SpiffeId>,
    /// Only entries whose SPIFFE ID starts with this text.
    pub spiffe_id_prefix: Option<SpiffeIdPrefix>,
    /// Only entries that have every one of these selectors (and maybe others).
    pub selectors: Vec<Selector>,
    /// Only entries after this key (the previous page's last).
    pub after: Option<EntryCursor>,
    /// At most this many, ordered by SPIFFE ID then ID; at least one is always asked for.
    pub limit: u32,
}

/// Why a prefix of SPIFFE IDs was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    /// It does not begin with `spiffe://` and a trust domain name.
    #[error(
        "'{0}' is not the beginning of a SPIFFE ID: write spiffe://<trust domain>[/path...], e.g. spiffe://acme.test/agents/"
    )]
    NotSpiffe(String),
    /// It holds a character no SPIFFE ID may hold, or is longer than any.
    #[error(
        "'{0}' cannot begin any SPIFFE ID: paths hold only letters, digits, '.', '-', '_' and '/', and an ID is at most 2048 bytes"
    )]
    Impossible(String),
}

/// The beginning of SPIFFE IDs: `spiffe://`, a trust domain name (or its beginning), and
/// optionally path characters. Matching is on text, so `spiffe://acme.test/agents/bil` lists
/// `.../agents/billing-bot`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpiffeIdPrefix(String);

impl SpiffeIdPrefix {
    /// Validates a prefix given by a caller.
    ///
    /// # Errors
    /// [`PrefixError`] when no SPIFFE ID could begin with it.
    pub fn parse(text: &str) -> Result<Self, PrefixError> {
        let shown = || crate::text::escape_bounded(text, 120).into_owned();
        let rest = text
            .strip_prefix("spiffe://")
            .ok_or_else(|| PrefixError::NotSpiffe(shown()))?;
        let (domain, path) = rest.split_once('/').unwrap_or((rest, ""));
        TrustDomain::new(domain).map_err(|_| PrefixError::NotSpiffe(shown()))?;
        let path_ok = path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'/'));
        if !path_ok || text.len() > MAX_SPIFFE_ID_LEN {
            return Err(PrefixError::Impossible(shown()));
        }
        Ok(Self(text.to_owned()))
    }

    /// The prefix as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The least text above every string that begins with this prefix and holds only the
    /// printable ASCII a SPIFFE ID may hold: the prefix followed by DEL (0x7f). With it, the
    /// filter is a range `prefix <= id < upper` that an index on the SPIFFE ID serves, in byte
    /// order (SQLite's default, and `COLLATE "C"` in PostgreSQL).
    pub fn upper_bound(&self) -> String {
        format!("{}\u{7f}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_validated() {
        for ok in [
            "spiffe://acme.test",
            "spiffe://acme.test/",
            "spiffe://acme.test/agents/bil",
            "spiffe://acme",
        ] {
            assert_eq!(SpiffeIdPrefix::parse(ok).unwrap().as_str(), ok);
        }
        for bad in [
            "",
            "acme.test/x",
            "spiffe://",
            "spiffe://ACME",
            "https://acme.test/",
        ] {
            assert!(
                matches!(SpiffeIdPrefix::parse(bad), Err(PrefixError::NotSpiffe(_))),
                "{bad}"
            );
        }
        for bad in [
            "spiffe://acme.test/a b",
            "spiffe://acme.test/%41",
            "spiffe://acme.test/é",
        ] {
            assert!(
                matches!(SpiffeIdPrefix::parse(bad), Err(PrefixError::Impossible(_))),
                "{bad}"
            );
        }
        let p = SpiffeIdPrefix::parse("spiffe://acme.test/a").unwrap();
        assert!("spiffe://acme.test/a/zzz~" < p.upper_bound().as_str());
        assert!("spiffe://acme.test/b" > p.upper_bound().as_str());
    }
}
