//! The vocabulary the server and the agent share on the node API: the kinds of refusal and how
//! they travel as gRPC metadata, the server's SPIFFE ID, the message size limit and the time
//! encoding.
//!
//! Both sides import this module, so neither needs the other: nothing under `agent/`, `proxy/`
//! or the client modules imports `server::`. It depends only on [`crate::id`], `tonic`'s status
//! type, std and (for the bundle digest) aws-lc-rs, so it compiles in the small `mtls` build too.

use std::fmt;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use tonic::Status;
use tonic::metadata::MetadataValue;

use crate::id::{SpiffeId, TrustDomain};

/// The gRPC metadata key that carries a [`RefusalKind`], so agents act on the reason without
/// parsing the message.
pub const REFUSAL_METADATA: &str = "mayfly-refusal";

/// The largest gRPC message the node API decodes, on both ends; anything bigger is refused
/// unread.
pub const MAX_NODE_MESSAGE: usize = 64 * 1024;

/// The path of the server's SPIFFE ID in its trust domain.
pub const SERVER_PATH: &str = "/mayfly/server";

/// Why the server refused a request, as a stable machine-readable name sent beside the message.
///
/// The names are part of the wire protocol: agents of other versions compare them, so a name
/// never changes once released.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalKind {
    /// The call needs an agent SVID and the connection presented none.
    NotAuthenticated,
    /// The client certificate is an SVID, but not an agent's.
    NotAnAgent,
    /// The agent is not in the store: evicted, or never attested.
    UnknownAgent,
    /// The agent was banned by an operator.
    Banned,
    /// The agent presented an SVID that a renewal replaced.
    SupersededSvid,
    /// The agent's SVID expired during a long-lived connection.
    ExpiredSvid,
    /// The entry does not exist or belongs to another agent.
    EntryNotAuthorized,
    /// A scope asked for is not among the entry's.
    ScopeNotGranted,
    /// The TTL asked for is above the entry's ceiling.
    TtlAboveCeiling,
    /// A request field is malformed.
    Invalid,
    /// The join token is unknown, spent or expired.
    TokenRefused,
    /// Too many refused attempts from this source (or, later, mints past a limit): wait.
    RateLimited,
    /// A node attestor refused the evidence.
    EvidenceRefused,
}

impl RefusalKind {
    /// Every kind, in declaration order (for tests and documentation).
    pub const ALL: [Self; 13] = [
        Self::NotAuthenticated,
        Self::NotAnAgent,
        Self::UnknownAgent,
        Self::Banned,
        Self::SupersededSvid,
        Self::ExpiredSvid,
        Self::EntryNotAuthorized,
        Self::ScopeNotGranted,
        Self::TtlAboveCeiling,
        Self::Invalid,
        Self::TokenRefused,
        Self::RateLimited,
        Self::EvidenceRefused,
    ];

    /// The name sent on the wire as the value of [`REFUSAL_METADATA`].
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotAuthenticated => "not-authenticated",
            Self::NotAnAgent => "not-an-agent",
            Self::UnknownAgent => "unknown-agent",
            Self::Banned => "banned",
            Self::SupersededSvid => "superseded-svid",
            Self::ExpiredSvid => "expired-svid",
            Self::EntryNotAuthorized => "entry-not-authorized",
            Self::ScopeNotGranted => "scope-not-granted",
            Self::TtlAboveCeiling => "ttl-above-ceiling",
            Self::Invalid => "invalid",
            Self::TokenRefused => "token-refused",
            Self::RateLimited => "rate-limited",
            Self::EvidenceRefused => "evidence-refused",
        }
    }

    /// Attaches this kind to `status` as [`REFUSAL_METADATA`] (server side), replacing any kind
    /// already there.
    pub fn attach(self, status: &mut Status) {
        status
            .metadata_mut()
            .insert(REFUSAL_METADATA, MetadataValue::from_static(self.as_str()));
    }

    /// The kind the server attached to `status` (agent side): `None` when there is none, or when
    /// it is a name this version does not know (a newer server may send new kinds).
    pub fn of(status: &Status) -> Option<Self> {
        status
            .metadata()
            .get(REFUSAL_METADATA)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.parse().ok())
    }
}

impl fmt::Display for RefusalKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refusal kind name this version does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a refusal kind this version knows")]
pub struct UnknownRefusalKind(pub String);

impl FromStr for RefusalKind {
    type Err = UnknownRefusalKind;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownRefusalKind(s.to_owned()))
    }
}

/// The server's own SPIFFE ID, which agents expect: `spiffe://<td>/mayfly/server`.
///
/// # Panics
/// Never: the path is a valid constant (checked by a unit test).
pub fn server_id(td: &TrustDomain) -> SpiffeId {
    td.join(SERVER_PATH).expect("valid constant path")
}

/// Unix seconds of `t`, as the node API and the store carry times (0 before the epoch, and
/// `i64::MAX` for times too far ahead to count).
pub fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// `error` and each of its causes, joined by `": "`: how an error is written where one line of
/// text is all that travels (a gRPC status message, an audit reason), since the message of
/// each error no longer repeats its cause.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(cause) = next {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        next = cause.source();
    }
    text
}

/// The digest an agent sends of the bundle it holds and the server compares with its own, so
/// an unchanged bundle is not sent again (entry sync, issue 10): SHA-256 over each DER
/// certificate's length (8 bytes, big-endian) and bytes, in order, then the same over each
/// JWT key's point after a separator, so a change of either is sent.
pub fn bundle_digest<C: AsRef<[u8]>, K: AsRef<[u8]>>(certs: &[C], jwt_keys: &[K]) -> Vec<u8> {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for cert in certs {
        let der = cert.as_ref();
        ctx.update(&(der.len() as u64).to_be_bytes());
        ctx.update(der);
    }
    if !jwt_keys.is_empty() {
        ctx.update(&u64::MAX.to_be_bytes());
        for key in jwt_keys {
            let point = key.as_ref();
            ctx.update(&(point.len() as u64).to_be_bytes());
            ctx.update(point);
        }
    }
    ctx.finish().as_ref().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn every_kind_round_trips_through_its_name() {
        for kind in RefusalKind::ALL {
            assert_eq!(kind.as_str().parse::<RefusalKind>(), Ok(kind));
            let mut status = Status::permission_denied("no");
            kind.attach(&mut status);
            assert_eq!(RefusalKind::of(&status), Some(kind));
        }
    }

    #[test]
    fn the_names_are_the_released_ones() {
        // Agents of other versions compare these names: they must not change.
        let names: Vec<_> = RefusalKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(
            names,
            [
                "not-authenticated",
                "not-an-agent",
                "unknown-agent",
                "banned",
                "superseded-svid",
                "expired-svid",
                "entry-not-authorized",
                "scope-not-granted",
                "ttl-above-ceiling",
                "invalid",
                "token-refused",
                "rate-limited",
                "evidence-refused",
            ]
        );
    }

    #[test]
    fn unknown_or_missing_kinds_are_none() {
        let status = Status::permission_denied("no");
        assert_eq!(RefusalKind::of(&status), None);
        for value in ["", "Unknown-Agent", "unknown-agent ", "from-the-future"] {
            let mut status = Status::permission_denied("no");
            status
                .metadata_mut()
                .insert(REFUSAL_METADATA, value.parse().unwrap());
            assert_eq!(RefusalKind::of(&status), None, "{value:?}");
        }
        // A value that is not visible ASCII is not a kind either, and does not panic.
        let mut status = Status::permission_denied("no");
        status.metadata_mut().insert(
            REFUSAL_METADATA,
            MetadataValue::try_from(&b"\xffbanned"[..]).unwrap(),
        );
        assert_eq!(RefusalKind::of(&status), None);
        assert!(matches!(
            "nope".parse::<RefusalKind>(),
            Err(UnknownRefusalKind(s)) if s == "nope"
        ));
    }

    #[test]
    fn the_server_id_is_under_mayfly_server() {
        let td = TrustDomain::new("example.org").unwrap();
        assert_eq!(
            server_id(&td).to_string(),
            "spiffe://example.org/mayfly/server"
        );
    }

    #[test]
    fn an_error_chain_lists_each_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(error_chain(&e), "outer: inner");
        assert_eq!(error_chain(&std::io::Error::other("alone")), "alone");
    }

    #[test]
    fn unix_secs_clamps_at_both_ends() {
        assert_eq!(unix_secs(UNIX_EPOCH), 0);
        assert_eq!(unix_secs(UNIX_EPOCH - Duration::from_secs(5)), 0);
        assert_eq!(unix_secs(UNIX_EPOCH + Duration::from_secs(42)), 42);
    }
}
