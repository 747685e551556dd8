//! The agent side of `sshpop`: the host certificate and host key as `ssh-keygen` wrote them,
//! read afresh for each attestation since host certificates are re-signed on a schedule.

use std::path::{Path, PathBuf};

use signature::Signer;
use ssh_key::private::{KeypairData, RsaKeypair};
use ssh_key::{Algorithm, HashAlg, PrivateKey, Signature};

use super::wire::SshCertificate;
use super::{NAME, NONCE_LEN, challenge_message, supported_key};
use crate::node::{AttestError, NodeEvidence};
use base64ct::{Base64, Encoding};

/// The node's host certificate (`ssh_host_ed25519_key-cert.pub`) and its private host key
/// (`ssh_host_ed25519_key`, unencrypted OpenSSH format).
#[derive(Debug, Clone)]
pub struct SshPopEvidence {
    cert_path: PathBuf,
    key_path: PathBuf,
}

impl SshPopEvidence {
    /// Evidence read from `cert_path` and signed with the key at `key_path`; nothing is read
    /// until the first attestation.
    pub fn new(cert_path: impl Into<PathBuf>, key_path: impl Into<PathBuf>) -> Self {
        Self {
            cert_path: cert_path.into(),
            key_path: key_path.into(),
        }
    }

    /// Reads the certificate and the key, and checks that the key is the certificate's.
    fn load(&self) -> Result<(Vec<u8>, PrivateKey), AttestError> {
        let cert_text = read(&self.cert_path, "host certificate")?;
        let not_cert = |why: &str| {
            unavailable(
                &self.cert_path,
                &format!(
                    "is not an OpenSSH certificate ({why}); give the -cert.pub file ssh-keygen -s wrote"
                ),
            )
        };
        // `TYPE BASE64 [COMMENT]`, as ssh-keygen writes it.
        let text = std::str::from_utf8(&cert_text).map_err(|_| not_cert("it is not text"))?;
        let mut words = text.split_ascii_whitespace();
        let (Some(cert_type), Some(base64)) = (words.next(), words.next()) else {
            return Err(not_cert("it is not one line of TYPE BASE64"));
        };
        if !cert_type.ends_with("-cert-v01@openssh.com") {
            return Err(not_cert("its type is not an OpenSSH certificate type"));
        }
        let wire =
            Base64::decode_vec(base64).map_err(|_| not_cert("its second word is not base64"))?;
        let cert = SshCertificate::parse(&wire).map_err(|e| not_cert(&e.to_string()))?;
        // The key's text is wiped from memory once parsed.
        let key_text = zeroize::Zeroizing::new(read(&self.key_path, "host key")?);
        let key = PrivateKey::from_openssh(key_text.as_slice()).map_err(|e| {
            unavailable(
                &self.key_path,
                &format!("is not an OpenSSH private key ({e}); give the key ssh-keygen wrote"),
            )
        })?;
        if key.is_encrypted() {
            return Err(unavailable(
                &self.key_path,
                "is encrypted with a passphrase; host keys must be readable without one",
            ));
        }
        if !supported_key(&key.algorithm()) {
            return Err(unavailable(
                &self.key_path,
                "is of a type sshpop does not sign with; use Ed25519, ECDSA P-256/P-384 or RSA",
            ));
        }
        if key.public_key().key_data() != &cert.key {
            return Err(AttestError::Unavailable {
                attestor: NAME,
                reason: format!(
                    "the host key {} is not the key certified by {}; give the key the certificate was made for",
                    self.key_path.display(),
                    self.cert_path.display()
                ),
            });
        }
        Ok((wire, key))
    }
}

impl NodeEvidence for SshPopEvidence {
    fn name(&self) -> &'static str {
        NAME
    }

    fn evidence(&self) -> Result<Vec<u8>, AttestError> {
        // The key is read too, so that a mismatched pair fails here, before the server is
        // asked anything.
        self.load().map(|(wire, _)| wire)
    }

    fn answer(&self, challenge: &[u8]) -> Result<Vec<u8>, AttestError> {
        if challenge.len() != NONCE_LEN {
            return Err(AttestError::Malformed {
                attestor: NAME,
                reason: format!(
                    "the server's challenge is {} bytes, not the {NONCE_LEN}-byte nonce sshpop signs",
                    challenge.len()
                ),
            });
        }
        // Read again: a certificate re-signed since `evidence` makes a response the server
        // refuses, and the agent attests again with the new one.
        let (wire, key) = self.load()?;
        let message = challenge_message(challenge, &wire);
        let signed = match key.key_data() {
            KeypairData::Rsa(rsa) => sign_rsa(rsa, &message),
            other => other.try_sign(&message).map_err(|e| e.to_string()),
        };
        let signature =
            signed.map_err(|e| unavailable(&self.key_path, &format!("could not sign ({e})")))?;
        Vec::<u8>::try_from(signature).map_err(|e| {
            unavailable(
                &self.key_path,
                &format!("made a signature that cannot be encoded ({e})"),
            )
        })
    }
}

/// Signs `message` with an RSA host key as `rsa-sha2-512`. ssh-key 0.6.7 cannot (it builds the
/// private key from p twice), so the key is assembled by `rsa`, whose signing is not constant
/// time, and signed by aws-lc-rs, whose is.
fn sign_rsa(key: &RsaKeypair, message: &[u8]) -> Result<Signature, String> {
    use rsa::pkcs8::EncodePrivateKey;
    let uint = |m: &ssh_key::Mpint| {
        m.as_positive_bytes()
            .map(rsa::BigUint::from_bytes_be)
            .ok_or_else(|| "the RSA key holds a negative number".to_owned())
    };
    let primes = vec![uint(&key.private.p)?, uint(&key.private.q)?];
    let assembled = rsa::RsaPrivateKey::from_components(
        uint(&key.public.n)?,
        uint(&key.public.e)?,
        uint(&key.private.d)?,
        primes,
    )
    .map_err(|e| format!("the RSA key is inconsistent: {e}"))?;
    let pkcs8 = assembled
        .to_pkcs8_der()
        .map_err(|e| format!("the RSA key cannot be encoded: {e}"))?;
    let pair = aws_lc_rs::signature::RsaKeyPair::from_pkcs8(pkcs8.as_bytes())
        .map_err(|e| format!("the RSA key is refused: {e}"))?;
    let mut signature = vec![0u8; pair.public_modulus_len()];
    pair.sign(
        &aws_lc_rs::signature::RSA_PKCS1_SHA512,
        &aws_lc_rs::rand::SystemRandom::new(),
        message,
        &mut signature,
    )
    .map_err(|_| "the RSA signature failed".to_owned())?;
    Signature::new(
        Algorithm::Rsa {
            hash: Some(HashAlg::Sha512),
        },
        signature,
    )
    .map_err(|e| e.to_string())
}

/// Reads a file of at most 64 KiB (a certificate or key is a few KiB at most).
fn read(path: &Path, what: &str) -> Result<Vec<u8>, AttestError> {
    use std::io::Read;
    let file = std::fs::File::open(path)
        .map_err(|e| unavailable(path, &format!("cannot be opened as the {what} ({e})")))?;
    let mut bytes = Vec::new();
    file.take(crate::node::MAX_EVIDENCE as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| unavailable(path, &format!("cannot be read as the {what} ({e})")))?;
    if bytes.len() > crate::node::MAX_EVIDENCE {
        return Err(unavailable(
            path,
            &format!("is over 64 KiB, too large for an SSH {what}"),
        ));
    }
    Ok(bytes)
}

fn unavailable(path: &Path, what: &str) -> AttestError {
    AttestError::Unavailable {
        attestor: NAME,
        reason: format!("{} {what}", path.display()),
    }
}
