//! The `join_token` node attestor: a single-use random secret handed to one agent by an
//! operator.
//!
//! A token is 32 random bytes written as 64 lowercase hex digits. The server stores only its
//! SHA-256; the node ID is the first 32 hex digits of that hash, so `mayfly token generate`
//! can print the agent's SPIFFE ID up front and nobody can work back from the ID to the token.

use std::time::SystemTime;

use crate::node::{AttestError, Begun, NodeAttestor, NodeClaim, NodeEvidence};

/// The attestor's name.
pub const NAME: &str = "join_token";
const TOKEN_BYTES: usize = 32;

/// A freshly generated join token, with what the server keeps of it.
#[derive(Clone, PartialEq, Eq)]
pub struct GeneratedToken {
    /// The secret, to hand to the agent once.
    pub secret: String,
    /// Its SHA-256, the only form stored.
    pub secret_hash: [u8; 32],
    /// The node ID the agent will get.
    pub node_id: String,
}

impl std::fmt::Debug for GeneratedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret stays out of logs and debug output.
        f.debug_struct("GeneratedToken")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

/// Generates a new token from the system's secure random source.
///
/// # Errors
/// Fails only when the operating system's random source fails.
pub fn generate() -> Result<GeneratedToken, aws_lc_rs::error::Unspecified> {
    let mut bytes = [0u8; TOKEN_BYTES];
    aws_lc_rs::rand::fill(&mut bytes)?;
    let secret = hex::encode(bytes);
    let (secret_hash, node_id) = hash_and_id(&secret);
    Ok(GeneratedToken {
        secret,
        secret_hash,
        node_id,
    })
}

fn hash_and_id(secret: &str) -> ([u8; 32], String) {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, secret.as_bytes());
    let mut hash = [0u8; 32];
    hash.copy_from_slice(digest.as_ref());
    let node_id = hex::encode(&hash[..16]);
    (hash, node_id)
}

/// The join token attestor.
#[derive(Debug, Default, Clone, Copy)]
pub struct JoinTokenAttestor;

impl NodeAttestor for JoinTokenAttestor {
    fn name(&self) -> &'static str {
        NAME
    }

    fn begin(&self, evidence: &[u8], _now: SystemTime) -> Result<Begun, AttestError> {
        self.verify(evidence).map(Begun::Claim)
    }
}

impl JoinTokenAttestor {
    /// Checks the token's form and derives the claim it makes: the secret's hash, for the
    /// server to consume, and the node ID.
    ///
    /// # Errors
    /// [`AttestError::Malformed`] when the evidence is not a join token.
    pub fn verify(&self, evidence: &[u8]) -> Result<NodeClaim, AttestError> {
        let malformed = |reason: &str| AttestError::Malformed {
            attestor: NAME,
            reason: reason.to_owned(),
        };
        if evidence.len() != TOKEN_BYTES * 2 {
            return Err(malformed("a join token is 64 hexadecimal digits"));
        }
        if !evidence
            .iter()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(malformed("a join token has only the digits 0-9 and a-f"));
        }
        // The length and charset checks above make this valid UTF-8.
        let secret = std::str::from_utf8(evidence).map_err(|_| malformed("not text"))?;
        let (secret_hash, node_id) = hash_and_id(secret);
        Ok(NodeClaim::SingleUseSecret {
            secret_hash,
            node_id,
        })
    }
}

/// The agent side: the token the operator handed over.
#[derive(Clone)]
pub struct JoinTokenEvidence {
    token: String,
}

impl JoinTokenEvidence {
    /// Evidence carrying `token`.
    pub fn new(token: String) -> Self {
        Self { token }
    }
}

impl std::fmt::Debug for JoinTokenEvidence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret stays out of logs and debug output.
        f.write_str("JoinTokenEvidence")
    }
}

impl NodeEvidence for JoinTokenEvidence {
    fn name(&self) -> &'static str {
        NAME
    }

    fn evidence(&self) -> Result<Vec<u8>, AttestError> {
        Ok(self.token.as_bytes().to_vec())
    }

    fn can_reattest(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_token_verifies_to_the_same_claim() {
        let token = generate().unwrap();
        let claim = JoinTokenAttestor.verify(token.secret.as_bytes()).unwrap();
        assert_eq!(
            claim,
            NodeClaim::SingleUseSecret {
                secret_hash: token.secret_hash,
                node_id: token.node_id.clone()
            }
        );
        assert_eq!(token.node_id.len(), 32);
        assert!(!format!("{token:?}").contains(&token.secret));
    }

    #[test]
    fn two_tokens_differ() {
        assert_ne!(generate().unwrap().secret, generate().unwrap().secret);
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let good = generate().unwrap().secret;
        assert!(JoinTokenAttestor.verify(good.as_bytes()).is_ok());
        for bad in [
            "",
            &good[..63],
            &format!("{good}0"),
            &good.to_uppercase(),
            &format!("{}g", &good[..63]),
        ] {
            assert!(JoinTokenAttestor.verify(bad.as_bytes()).is_err(), "{bad}");
        }
    }
}
