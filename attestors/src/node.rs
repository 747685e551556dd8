//! The node attestor interface.

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
}

/// Why evidence was refused before any lookup.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttestError {
    /// The evidence was not of the form the attestor expects.
    #[error("the {attestor} evidence is malformed: {reason}")]
    Malformed {
        /// The attestor's name.
        attestor: &'static str,
        /// What was wrong, in words.
        reason: &'static str,
    },
}

/// A node attestor: a pure function from the evidence an agent presents to a claim about its
/// node.
pub trait NodeAttestor: Send + Sync {
    /// The attestor's name, used in the agent's SPIFFE ID
    /// (`spiffe://<td>/mayfly/agent/<name>/<node id>`) and in audit records.
    fn name(&self) -> &'static str;

    /// Checks the evidence's form and derives the claim it makes.
    ///
    /// # Errors
    /// [`AttestError::Malformed`] when the evidence cannot be what this attestor accepts.
    fn verify(&self, evidence: &[u8]) -> Result<NodeClaim, AttestError>;
}
