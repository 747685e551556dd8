//! The server side of the `x509pop` node attestor (issue 12), with SPIRE's semantics: a node
//! holds a certificate and key issued by an operator CA, and proves possession of the key by
//! signing a challenge from the server.
//!
//! What the agent signs is [`challenge_message`]: a fixed label, the server's nonce and the
//! SHA-256 of the leaf certificate, so the signature covers exactly the certificate the
//! identity is taken from and a response cannot be replayed for another nonce or certificate.
//! The node ID is the SHA-1 of the leaf's DER (hex), as SPIRE's; the selectors are
//! `x509pop:subject:cn:<CN>`, `x509pop:ca:fingerprint:<SHA-1 hex>` for each CA certificate of
//! the verified chain (intermediates and the root), `x509pop:serialnumber:<hex>` and
//! `x509pop:san:dns:<name>` for each DNS SAN.
//!
//! On the wire the evidence is the chain's DER certificates one after the other, leaf first
//! ([`encode_chain`]); the challenge is a 32-byte nonce. The agent side is [`X509PopEvidence`].

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls_pki_types::{CertificateDer, UnixTime};
use webpki::{EndEntityCert, KeyUsage, anchor_from_trusted_cert};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::node::{AttestError, Begun, Challenge, NodeAttestor, NodeClaim, ProvenNode};
use crate::selector::Selector;

mod evidence;

pub use evidence::{X509PopEvidence, encode_chain, split_chain};

/// The attestor's name.
pub const NAME: &str = "x509pop";
/// The most certificates a chain may hold (leaf and intermediates).
pub const MAX_CHAIN: usize = 8;
/// The largest total evidence, in bytes; larger is refused before anything is parsed.
pub const MAX_EVIDENCE: usize = 64 * 1024;
/// The label that starts every signed challenge, so a node key's signature for x509pop is
/// never one for anything else.
const LABEL: &[u8] = b"mayfly x509pop challenge v1\0";

/// Why an x509pop attestation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum X509PopError {
    /// The configured CA bundle holds no usable certificate.
    #[error("the x509pop CA bundle holds no usable CA certificate: {0}")]
    BadBundle(String),
    /// The evidence is too large, empty or holds too many certificates.
    #[error("the x509pop evidence is malformed: {0}")]
    Malformed(&'static str),
    /// The chain does not verify to the operator's CA (expired, not yet valid, another CA, a
    /// CA certificate as the leaf, a leaf not for client authentication).
    #[error("the node certificate does not verify against the x509pop CA bundle: {0}")]
    Chain(String),
    /// The challenge was not signed by the certificate's key.
    #[error("the challenge response is not a signature by the node certificate's key")]
    BadSignature,
    /// The verified leaf could not be read for its selectors.
    #[error("the node certificate could not be read: {0}")]
    Unreadable(String),
}

/// What a verified x509pop attestation establishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct X509PopNode {
    /// SHA-1 of the leaf's DER, hex: the agent ID is `.../mayfly/agent/x509pop/<node_id>`.
    pub node_id: String,
    /// The node selectors, `x509pop:KIND:VALUE`, sorted.
    pub selectors: Vec<String>,
}

/// The bytes the node signs: the label, the nonce and the SHA-256 of the leaf's DER.
pub fn challenge_message(nonce: &[u8], leaf_der: &[u8]) -> Vec<u8> {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, leaf_der);
    let mut message = Vec::with_capacity(LABEL.len() + nonce.len() + 32);
    message.extend_from_slice(LABEL);
    message.extend_from_slice(nonce);
    message.extend_from_slice(digest.as_ref());
    message
}

/// The server side: the operator's node CA bundle.
#[derive(Debug, Clone)]
pub struct X509PopVerifier {
    roots: Arc<Vec<CertificateDer<'static>>>,
}

fn sha1_hex(der: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY,
        der,
    ))
}

impl X509PopVerifier {
    /// A verifier trusting the CA certificates `roots` (DER).
    ///
    /// # Errors
    /// [`X509PopError::BadBundle`] when none is usable as a trust anchor.
    pub fn new(roots: Vec<Vec<u8>>) -> Result<Self, X509PopError> {
        let roots: Vec<CertificateDer<'static>> = roots.into_iter().map(Into::into).collect();
        if roots.is_empty() {
            return Err(X509PopError::BadBundle("it is empty".into()));
        }
        for root in &roots {
            anchor_from_trusted_cert(root).map_err(|e| X509PopError::BadBundle(e.to_string()))?;
        }
        Ok(Self {
            roots: Arc::new(roots),
        })
    }

    /// Verifies `chain` (leaf first) at `now`, without a proof of possession: the first
    /// half of an attestation.
    ///
    /// # Errors
    /// The [`X509PopError`] for the first check that fails.
    pub fn check_chain(&self, chain: &[Vec<u8>], now: SystemTime) -> Result<(), X509PopError> {
        self.with_path(chain, b"", now, |_, _| Ok(()))
    }

    /// Verifies `chain` (leaf first) at `now` and the `signature` of
    /// [`challenge_message`]`(nonce, leaf)` by the leaf's key.
    ///
    /// # Errors
    /// The [`X509PopError`] for the first check that fails.
    pub fn verify(
        &self,
        chain: &[Vec<u8>],
        nonce: &[u8],
        signature: &[u8],
        now: SystemTime,
    ) -> Result<X509PopNode, X509PopError> {
        self.with_path(chain, signature, now, |end_entity, path| {
            let leaf = &chain[0];
            let message = challenge_message(nonce, leaf);
            let signed = webpki::ALL_VERIFICATION_ALGS.iter().any(|alg| {
                end_entity
                    .verify_signature(*alg, &message, signature)
                    .is_ok()
            });
            if !signed {
                return Err(X509PopError::BadSignature);
            }
            let mut selectors = leaf_selectors(leaf)?;
            // The CA certificates of the verified path: the intermediates used and the
            // anchor's certificate (found among the roots by its subject and key).
            for ca in path.intermediate_certificates() {
                selectors.push(format!(
                    "x509pop:ca:fingerprint:{}",
                    sha1_hex(ca.der().as_ref())
                ));
            }
            let anchor = path.anchor();
            if let Some(root) = self.roots.iter().find(|r| {
                anchor_from_trusted_cert(r).is_ok_and(|a| {
                    a.subject == anchor.subject
                        && a.subject_public_key_info == anchor.subject_public_key_info
                })
            }) {
                selectors.push(format!("x509pop:ca:fingerprint:{}", sha1_hex(root)));
            }
            selectors.sort();
            selectors.dedup();
            Ok(X509PopNode {
                node_id: sha1_hex(leaf),
                selectors,
            })
        })
    }

    /// Checks the evidence's size and shape, verifies the chain to the roots at `now` for
    /// client authentication, then hands the leaf and the verified path to `then`.
    fn with_path<R>(
        &self,
        chain: &[Vec<u8>],
        signature: &[u8],
        now: SystemTime,
        then: impl FnOnce(&EndEntityCert<'_>, &webpki::VerifiedPath<'_>) -> Result<R, X509PopError>,
    ) -> Result<R, X509PopError> {
        let size: usize = chain.iter().map(Vec::len).sum::<usize>() + signature.len();
        if size > MAX_EVIDENCE {
            return Err(X509PopError::Malformed("it is over 64 KiB"));
        }
        let (leaf, intermediates) = match chain {
            [] => return Err(X509PopError::Malformed("it holds no certificate")),
            _ if chain.len() > MAX_CHAIN => {
                return Err(X509PopError::Malformed("it holds more than 8 certificates"));
            }
            [leaf, rest @ ..] => (CertificateDer::from(leaf.as_slice()), rest),
        };
        let intermediates: Vec<CertificateDer<'_>> = intermediates
            .iter()
            .map(|c| CertificateDer::from(c.as_slice()))
            .collect();
        let anchors = self
            .roots
            .iter()
            .map(|r| anchor_from_trusted_cert(r))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| X509PopError::BadBundle(e.to_string()))?;
        let end_entity =
            EndEntityCert::try_from(&leaf).map_err(|e| X509PopError::Chain(e.to_string()))?;
        let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let path = end_entity
            .verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                &anchors,
                &intermediates,
                UnixTime::since_unix_epoch(std::time::Duration::from_secs(secs)),
                KeyUsage::client_auth(),
                None,
                None,
            )
            .map_err(|e| X509PopError::Chain(e.to_string()))?;
        then(&end_entity, &path)
    }
}

impl From<X509PopError> for AttestError {
    fn from(err: X509PopError) -> Self {
        match err {
            X509PopError::Malformed(_) | X509PopError::Unreadable(_) => AttestError::Malformed {
                attestor: NAME,
                reason: err.to_string(),
            },
            _ => AttestError::Refused {
                attestor: NAME,
                reason: err.to_string(),
            },
        }
    }
}

impl NodeAttestor for X509PopVerifier {
    fn name(&self) -> &'static str {
        NAME
    }

    /// Checks the chain now, so a node whose certificate cannot verify gets no challenge, and
    /// asks for a signature over a fresh nonce.
    fn begin(&self, evidence: &[u8], now: SystemTime) -> Result<Begun, AttestError> {
        if evidence.len() > MAX_EVIDENCE {
            return Err(X509PopError::Malformed("it is over 64 KiB").into());
        }
        let chain = split_chain(evidence)?;
        self.check_chain(&chain, now)?;
        Ok(Begun::Challenge(Box::new(PendingProof {
            verifier: self.clone(),
            chain,
            nonce: crate::node::nonce(NAME)?,
        })))
    }
}

/// A challenge sent to a node whose chain verified.
struct PendingProof {
    verifier: X509PopVerifier,
    chain: Vec<Vec<u8>>,
    nonce: [u8; 32],
}

impl Challenge for PendingProof {
    fn challenge(&self) -> &[u8] {
        &self.nonce
    }

    fn finish(self: Box<Self>, response: &[u8], now: SystemTime) -> Result<NodeClaim, AttestError> {
        // The whole check again, at the time of the answer: the signature is verified over
        // exactly the chain the identity is taken from.
        let node = self
            .verifier
            .verify(&self.chain, &self.nonce, response, now)?;
        let selectors = node
            .selectors
            .iter()
            .filter_map(|s| {
                let (kind, value) = s.strip_prefix("x509pop:")?.split_once(':')?;
                // A value no entry could name (a control character in a CN) grants nothing,
                // so it is left out rather than refusing the node.
                Selector::node(NAME, kind, value).ok()
            })
            .collect();
        Ok(NodeClaim::Proven(ProvenNode::new(node.node_id, selectors)))
    }
}

/// The leaf's own selectors: subject CN, serial number, DNS SANs.
fn leaf_selectors(leaf: &[u8]) -> Result<Vec<String>, X509PopError> {
    let (_, cert) =
        X509Certificate::from_der(leaf).map_err(|e| X509PopError::Unreadable(e.to_string()))?;
    let mut selectors = Vec::new();
    for cn in cert.subject().iter_common_name() {
        if let Ok(cn) = cn.as_str() {
            selectors.push(format!("x509pop:subject:cn:{cn}"));
        }
    }
    selectors.push(format!(
        "x509pop:serialnumber:{}",
        hex::encode(cert.raw_serial())
    ));
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(dns) = name {
                selectors.push(format!("x509pop:san:dns:{dns}"));
            }
        }
    }
    Ok(selectors)
}

#[cfg(test)]
mod tests;
