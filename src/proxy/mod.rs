//! `mayfly proxy`: an mTLS front for any service. Peers are verified in the handshake (chain,
//! X509-SVID rules, allowed IDs, required scopes); in HTTP mode each request is then decided
//! by route rules, in TCP mode bytes are piped once the handshake passed. In HTTP mode a client
//! without a certificate may authenticate each request with a bearer JWT-SVID instead
//! (`--accept jwt`, [`bearer`]), decided by the same routes.

pub mod bearer;
pub(crate) mod http;
pub mod replay;
pub mod routes;

use crate::id::ScopedId;
use crate::svid::Serial;

/// The verified peer of one connection, as the proxy logs and forwards it.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// Identity and scopes, from the peer's one URI SAN.
    pub id: ScopedId,
    /// Leaf serial.
    pub serial: Serial,
    /// Leaf notAfter, Unix seconds.
    pub not_after: i64,
}

impl PeerInfo {
    /// The peer's scopes in human form, comma-separated (empty for none).
    pub(crate) fn scopes_header(&self) -> String {
        self.id
            .scopes()
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl From<crate::mtls::VerifiedPeer> for PeerInfo {
    fn from(peer: crate::mtls::VerifiedPeer) -> Self {
        Self {
            id: peer.id,
            serial: peer.serial,
            not_after: crate::wire::unix_secs(peer.not_after),
        }
    }
}

pub mod config;
mod run;

pub use bearer::BearerPolicy;
pub use run::{Accept, ProxyConfig, ProxyError, ProxyMode, RunningProxy, start, start_with_jwt};
