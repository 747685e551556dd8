//! The node attestor interface: the agent side produces evidence and answers challenges
//! ([`NodeEvidence`]); the server side verifies them ([`NodeAttestor`]) and says what the node
//! proved ([`NodeClaim`]).
//!
//! One attestation is one exchange on the node API's attestation stream:
//!
//! 1. the agent sends its attestor's name, its evidence and a CSR;
//! 2. the server's attestor reads the evidence ([`NodeAttestor::begin`]) and either decides at
//!    once ([`Begun::Claim`]: join tokens, service account tokens, instance documents) or sends
//!    a challenge ([`Begun::Challenge`]: a fresh server nonce, for attestors whose proof is the
//!    possession of a key);
//! 3. the agent answers the challenge ([`NodeEvidence::answer`]), and the server verifies the
//!    answer against exactly the evidence it took the identity from ([`Challenge::finish`]).
//!
//! The challenge lives in the server's memory for the one stream only, so a response is never
//! valid twice and several servers need to share no secret. Evidence over [`MAX_EVIDENCE`] is
//! refused by the server before any attestor reads it.

use std::time::SystemTime;

use crate::selector::Selector;

/// The largest evidence or challenge response an attestor is ever given, in bytes.
pub const MAX_EVIDENCE: usize = 64 * 1024;

/// What a node attestor concluded from the evidence an agent presented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeClaim {
    /// The evidence names a single-use secret; the node is proven only if the server still holds
    /// the secret and consumes it atomically. `node_id` is stable for the secret, so the agent's
    /// SPIFFE ID can be told to the operator before the agent attests.
    SingleUseSecret {
        /// The SHA-256 of the secret: the only form in which the server stores it.
        secret_hash: [u8; 32],
        /// The node's ID within this attestor, a path-safe string.
        node_id: String,
    },
    /// The node proved what it is with evidence the attestor verified cryptographically.
    Proven(ProvenNode),
}

/// A node proven by its evidence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvenNode {
    /// The node's ID within this attestor: one or more path segments of `[A-Za-z0-9._-]`
    /// joined by `/` (k8s_psat: `<cluster>/<node uid>`). The agent's SPIFFE ID is
    /// `spiffe://<td>/mayfly/agent/<attestor>/<node_id>`.
    pub node_id: String,
    /// The node selectors the evidence proves, sorted and without duplicates.
    pub selectors: Vec<Selector>,
    /// Set when the same evidence must not attest twice (a bearer token): the server keeps
    /// this key until `until` and refuses the evidence a second time.
    pub single_use: Option<SingleUse>,
}

/// Evidence that may attest only once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SingleUse {
    /// A stable key for the evidence (SHA-256 of the token's `jti`, or of the token).
    pub key: [u8; 32],
    /// Until when the evidence could be presented again (its expiry).
    pub until: SystemTime,
}

impl ProvenNode {
    /// A proven node with `selectors` sorted and deduplicated.
    pub fn new(node_id: String, mut selectors: Vec<Selector>) -> Self {
        selectors.sort();
        selectors.dedup();
        Self {
            node_id,
            selectors,
            single_use: None,
        }
    }
}

/// Why evidence was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttestError {
    /// The evidence was not of the form the attestor expects.
    #[error("the {attestor} evidence is malformed: {reason}")]
    Malformed {
        /// The attestor's name.
        attestor: &'static str,
        /// What was wrong, in words.
        reason: String,
    },
    /// The evidence is well formed but proves nothing: a bad signature, another CA, an expired
    /// certificate or token, a disallowed account, a replayed response.
    #[error("the {attestor} evidence was refused: {reason}")]
    Refused {
        /// The attestor's name.
        attestor: &'static str,
        /// Why, in one sentence.
        reason: String,
    },
    /// The agent could not produce its evidence or answer (a file missing, a key unreadable,
    /// the metadata service unreachable).
    #[error("the {attestor} evidence could not be produced: {reason}")]
    Unavailable {
        /// The attestor's name.
        attestor: &'static str,
        /// What failed, with the path or address involved.
        reason: String,
    },
}

/// The server side of a node attestor: verifies evidence.
pub trait NodeAttestor: Send + Sync {
    /// The attestor's name, used in the agent's SPIFFE ID
    /// (`spiffe://<td>/mayfly/agent/<name>/<node id>`) and in audit records.
    fn name(&self) -> &'static str;

    /// Reads the agent's evidence at `now`: either the attestation is decided, or the
    /// attestor needs the agent to answer a challenge first.
    ///
    /// # Errors
    /// [`AttestError::Malformed`] or [`AttestError::Refused`] when the evidence proves
    /// nothing.
    fn begin(&self, evidence: &[u8], now: SystemTime) -> Result<Begun, AttestError>;
}

/// The outcome of [`NodeAttestor::begin`].
pub enum Begun {
    /// Decided from the evidence alone.
    Claim(NodeClaim),
    /// The agent must answer a challenge.
    Challenge(Box<dyn Challenge>),
}

impl std::fmt::Debug for Begun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Claim(claim) => f.debug_tuple("Claim").field(claim).finish(),
            Self::Challenge(_) => f.write_str("Challenge"),
        }
    }
}

/// A challenge in flight: what the server sent and what it will check the answer against.
pub trait Challenge: Send {
    /// The bytes sent to the agent (holding a fresh nonce).
    fn challenge(&self) -> &[u8];

    /// Verifies the agent's `response` at `now`; consumes the challenge, so it is answered
    /// once.
    ///
    /// # Errors
    /// [`AttestError::Refused`] when the response is not the proof asked for.
    fn finish(self: Box<Self>, response: &[u8], now: SystemTime) -> Result<NodeClaim, AttestError>;
}

/// The agent side of a node attestor: produces evidence and answers challenges. Evidence is
/// read afresh for each attestation, since certificates and tokens on a node are rotated.
/// Calls may block (files, the cloud metadata service): the agent makes them off its async
/// threads.
pub trait NodeEvidence: Send + Sync + std::fmt::Debug {
    /// The attestor's name, as the server knows it.
    fn name(&self) -> &'static str;

    /// The evidence for one attestation.
    ///
    /// # Errors
    /// [`AttestError::Unavailable`] when it cannot be read.
    fn evidence(&self) -> Result<Vec<u8>, AttestError>;

    /// The answer to the server's `challenge`.
    ///
    /// # Errors
    /// [`AttestError::Unavailable`] when the key cannot sign; [`AttestError::Malformed`] for a
    /// challenge this attestor never asks (the default: attestors without challenges).
    fn answer(&self, challenge: &[u8]) -> Result<Vec<u8>, AttestError> {
        let _ = challenge;
        Err(AttestError::Malformed {
            attestor: self.name(),
            reason: "this attestor answers no challenge".into(),
        })
    }

    /// Whether the agent may attest again with the same kind of evidence by itself, after an
    /// eviction or an expired SVID. A join token is single-use, so its agents need a new one.
    fn can_reattest(&self) -> bool {
        true
    }
}

/// A fresh 32-byte nonce from the system's secure random source.
///
/// # Errors
/// [`AttestError::Unavailable`] when the random source fails.
pub fn nonce(attestor: &'static str) -> Result<[u8; 32], AttestError> {
    let mut nonce = [0u8; 32];
    aws_lc_rs::rand::fill(&mut nonce).map_err(|_| AttestError::Unavailable {
        attestor,
        reason: "the system's random source failed".into(),
    })?;
    Ok(nonce)
}

/// Whether `id` is a node ID an attestor may return: path segments of `[A-Za-z0-9._-]`, none
/// empty, `.` or `..`, joined by `/`, at most 255 bytes.
pub fn is_valid_node_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 255
        && id.split('/').all(|segment| {
            !segment.is_empty()
                && segment != "."
                && segment != ".."
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_are_path_segments() {
        for good in ["abc", "prod/5f2c-11", "a.b_c-d"] {
            assert!(is_valid_node_id(good), "{good}");
        }
        for bad in [
            "",
            "a//b",
            "/a",
            "a/",
            "..",
            "a/../b",
            "a b",
            "a%2f",
            &"a".repeat(256),
        ] {
            assert!(!is_valid_node_id(bad), "{bad}");
        }
    }

    #[test]
    fn proven_nodes_sort_their_selectors() {
        let a = Selector::parse("x509pop:subject:cn:b").unwrap();
        let b = Selector::parse("x509pop:san:dns:a").unwrap();
        let node = ProvenNode::new("n".into(), vec![a.clone(), b.clone(), a.clone()]);
        assert_eq!(node.selectors, vec![b, a]);
    }
}
