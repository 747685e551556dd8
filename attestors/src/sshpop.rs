//! The `sshpop` node attestor (issue 12), with SPIRE's semantics: a node holds an OpenSSH host
//! certificate signed by an operator's SSH CA (as `ssh-keygen -s ca -h` makes it) and proves
//! possession of the host key by signing a challenge from the server.
//!
//! The evidence is the certificate's OpenSSH wire encoding: the bytes that the base64 field of
//! `ssh_host_ed25519_key-cert.pub` holds. The server
//! parses it ([`SshPopAttestor::begin`]): a host certificate, signed by one of the configured
//! CAs, valid now, with at least one principal and no critical option (OpenSSH defines none for
//! host certificates, so one the server does not understand must not be ignored). It then sends
//! a fresh 32-byte nonce; the agent answers with an SSH signature by the host key over
//! [`challenge_message`]: a fixed label, the nonce and the SHA-256 of the evidence bytes, so
//! the signature covers exactly the certificate the identity is taken from and a response
//! cannot be replayed for another nonce or certificate.
//!
//! The node ID is the SHA-256 of the host public key's wire encoding in lowercase hex (the
//! fingerprint `ssh-keygen -l -E sha256` prints, in hex rather than base64); the selectors are
//! `sshpop:principal:<name>` for each principal.
//!
//! Host and CA keys may be Ed25519, ECDSA P-256 or P-384, or RSA (signatures `rsa-sha2-256` or
//! `rsa-sha2-512`; SHA-1 `ssh-rsa` signatures are refused). A certificate valid "forever" (what
//! `ssh-keygen -s` makes without `-V`) is accepted, as SPIRE and OpenSSH accept it: the operator
//! chose its validity. The certificate is read by the `wire` submodule, since `ssh-key` 0.6 cannot
//! represent "forever"; `ssh-key` reads the keys and checks the signatures.

use std::time::{SystemTime, UNIX_EPOCH};

use signature::Verifier;
use ssh_key::public::KeyData;
use ssh_key::{Algorithm, EcdsaCurve, Fingerprint, HashAlg, PublicKey};

use crate::node::{
    AttestError, Begun, Challenge, MAX_EVIDENCE, NodeAttestor, NodeClaim, ProvenNode, nonce,
};
use crate::selector::Selector;

mod evidence;
mod wire;
pub use evidence::SshPopEvidence;
use wire::{HOST_CERT, SshCertificate};

/// The attestor's name.
pub const NAME: &str = "sshpop";
/// The length of the server's nonce, the whole challenge.
pub const NONCE_LEN: usize = 32;
/// The label that starts every signed challenge, so a host key's signature for sshpop is never
/// one for anything else (an SSH session, another attestor).
const LABEL: &[u8] = b"mayfly sshpop challenge v1\0";

/// Why the configured SSH certificate authorities are unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SshPopConfigError {
    /// No CA key was given.
    #[error(
        "sshpop needs at least one SSH CA public key in cert_authorities (the ssh_ca.pub line that signs host certificates)"
    )]
    NoAuthority,
    /// An entry is not an OpenSSH public key line.
    #[error(
        "sshpop cert_authorities entry {entry}, line {line}, is not an OpenSSH public key ({reason}); give the CA's .pub line as ssh-keygen wrote it"
    )]
    Unparsable {
        /// The entry's position in the list, from 1.
        entry: usize,
        /// The line's position within the entry, from 1.
        line: usize,
        /// What the parser said.
        reason: String,
    },
    /// An entry is a key of a type sshpop does not verify.
    #[error(
        "sshpop cert_authorities entry {entry}, line {line}, is a {algorithm} key; use an Ed25519, ECDSA P-256/P-384 or RSA CA key"
    )]
    UnsupportedKey {
        /// The entry's position in the list, from 1.
        entry: usize,
        /// The line's position within the entry, from 1.
        line: usize,
        /// The key's algorithm name.
        algorithm: String,
    },
}

/// The bytes the host key signs: the label, the nonce and the SHA-256 of the certificate's
/// wire encoding (the evidence).
pub fn challenge_message(nonce: &[u8], certificate: &[u8]) -> Vec<u8> {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, certificate);
    let mut message = Vec::with_capacity(LABEL.len() + nonce.len() + 32);
    message.extend_from_slice(LABEL);
    message.extend_from_slice(nonce);
    message.extend_from_slice(digest.as_ref());
    message
}

/// The node ID for a host key: SHA-256 of its wire encoding, lowercase hex.
pub fn node_id(host_key: &KeyData) -> String {
    hex::encode(Fingerprint::new(HashAlg::Sha256, host_key).as_bytes())
}

/// Whether sshpop verifies signatures by keys of this algorithm.
pub(crate) fn supported_key(algorithm: &Algorithm) -> bool {
    matches!(
        algorithm,
        Algorithm::Ed25519
            | Algorithm::Rsa { .. }
            | Algorithm::Ecdsa {
                curve: EcdsaCurve::NistP256 | EcdsaCurve::NistP384
            }
    )
}

/// The server side: the operator's SSH certificate authorities.
#[derive(Debug, Clone)]
pub struct SshPopAttestor {
    /// SHA-256 fingerprints of the trusted CA keys.
    authorities: Vec<Fingerprint>,
}

impl SshPopAttestor {
    /// An attestor trusting the CA keys in `cert_authorities`: each entry holds one or more
    /// OpenSSH public key lines (a `ssh_ca.pub` file's text); blank lines and `#` comments
    /// are skipped.
    ///
    /// # Errors
    /// [`SshPopConfigError`] when no key is given, or a line is not a supported public key.
    pub fn new(cert_authorities: &[String]) -> Result<Self, SshPopConfigError> {
        let mut authorities = Vec::new();
        for (entry, text) in cert_authorities.iter().enumerate() {
            let lines = text.lines().enumerate();
            for (line, key) in lines.filter(|(_, l)| !l.trim().is_empty()) {
                let key = key.trim();
                if key.starts_with('#') {
                    continue;
                }
                let (entry, line) = (entry + 1, line + 1);
                let key =
                    PublicKey::from_openssh(key).map_err(|e| SshPopConfigError::Unparsable {
                        entry,
                        line,
                        reason: e.to_string(),
                    })?;
                if !supported_key(&key.algorithm()) {
                    return Err(SshPopConfigError::UnsupportedKey {
                        entry,
                        line,
                        algorithm: key.algorithm().as_str().to_owned(),
                    });
                }
                authorities.push(key.fingerprint(HashAlg::Sha256));
            }
        }
        if authorities.is_empty() {
            return Err(SshPopConfigError::NoAuthority);
        }
        Ok(Self { authorities })
    }

    /// Verifies the certificate in `evidence` at `now` and the node it names, before any
    /// challenge: what [`NodeAttestor::begin`] checks. `Err` is [`AttestError::Malformed`]
    /// when the evidence is not an OpenSSH certificate, [`AttestError::Refused`] when it is not
    /// a host certificate of a configured CA valid now.
    fn verify_certificate(
        &self,
        evidence: &[u8],
        now: SystemTime,
    ) -> Result<(SshCertificate, ProvenNode), AttestError> {
        if evidence.len() > MAX_EVIDENCE {
            return Err(malformed("the evidence is over 64 KiB"));
        }
        let cert = SshCertificate::parse(evidence).map_err(|e| {
            malformed(&format!(
                "it is not an OpenSSH certificate in wire form: {e}"
            ))
        })?;
        if cert.cert_type != HOST_CERT {
            return Err(refused(&format!(
                "it is a {} certificate, not a host certificate (sign the host key with ssh-keygen -h)",
                if cert.cert_type == 1 {
                    "user"
                } else {
                    "unknown type of"
                }
            )));
        }
        let ca = cert.signature_key.fingerprint(HashAlg::Sha256);
        if !self.authorities.contains(&ca) {
            return Err(refused(&format!(
                "it is signed by the SSH CA {ca}, which is not in cert_authorities"
            )));
        }
        // Over exactly the bytes received: every field the identity is read from.
        cert.signature_key
            .verify(cert.signed(evidence), &cert.signature)
            .map_err(|_| refused("the CA's signature on it does not verify"))?;
        check_validity(&cert, now)?;
        if cert.has_critical_options {
            return Err(refused(
                "it carries critical options, which no host certificate may have",
            ));
        }
        if cert.principals.is_empty() {
            return Err(refused(
                "it names no principal (sign it with ssh-keygen -n HOSTNAME)",
            ));
        }
        let mut selectors = Vec::with_capacity(cert.principals.len());
        for (i, principal) in cert.principals.iter().enumerate() {
            let selector = Selector::node(NAME, "principal", principal).map_err(|_| {
                refused(&format!(
                    "its principal {} is empty, over 1024 bytes or holds control characters",
                    i + 1
                ))
            })?;
            selectors.push(selector);
        }
        let node = ProvenNode::new(node_id(&cert.key), selectors);
        Ok((cert, node))
    }
}

impl NodeAttestor for SshPopAttestor {
    fn name(&self) -> &'static str {
        NAME
    }

    fn begin(&self, evidence: &[u8], now: SystemTime) -> Result<Begun, AttestError> {
        let (cert, node) = self.verify_certificate(evidence, now)?;
        Ok(Begun::Challenge(Box::new(SshPopChallenge {
            nonce: nonce(NAME)?,
            evidence: evidence.to_vec(),
            cert,
            node,
        })))
    }
}

/// A challenge in flight: the nonce sent and the certificate it must be signed with.
struct SshPopChallenge {
    nonce: [u8; NONCE_LEN],
    /// The evidence bytes, hashed into the message the host key must sign.
    evidence: Vec<u8>,
    cert: SshCertificate,
    node: ProvenNode,
}

impl Challenge for SshPopChallenge {
    fn challenge(&self) -> &[u8] {
        &self.nonce
    }

    fn finish(self: Box<Self>, response: &[u8], now: SystemTime) -> Result<NodeClaim, AttestError> {
        if response.len() > MAX_EVIDENCE {
            return Err(malformed("the challenge response is over 64 KiB"));
        }
        let signature = wire::parse_signature(response).ok_or_else(|| {
            malformed(
                "the challenge response is not an SSH signature (string algorithm, string blob)",
            )
        })?;
        let message = challenge_message(&self.nonce, &self.evidence);
        self.cert.key.verify(&message, &signature).map_err(|_| {
            refused("the challenge response is not a signature by the certificate's host key over this challenge")
        })?;
        // The certificate may have expired while the agent was signing.
        check_validity(&self.cert, now)?;
        Ok(NodeClaim::Proven(self.node))
    }
}

/// Refuses a certificate outside its validity window at `now` (valid_after <= now <
/// valid_before, as OpenSSH's PROTOCOL.certkeys says).
fn check_validity(cert: &SshCertificate, now: SystemTime) -> Result<(), AttestError> {
    let secs = unix_secs(now);
    if secs < cert.valid_after {
        return Err(refused(&format!(
            "the certificate is not valid yet (valid after {} s since the epoch, now {secs})",
            cert.valid_after
        )));
    }
    if secs >= cert.valid_before {
        return Err(refused(&format!(
            "the certificate has expired (valid before {} s since the epoch, now {secs})",
            cert.valid_before
        )));
    }
    Ok(())
}

fn unix_secs(now: SystemTime) -> u64 {
    now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn malformed(reason: &str) -> AttestError {
    AttestError::Malformed {
        attestor: NAME,
        reason: reason.to_owned(),
    }
}

fn refused(reason: &str) -> AttestError {
    AttestError::Refused {
        attestor: NAME,
        reason: reason.to_owned(),
    }
}

#[cfg(test)]
mod tests;
