//! The x509pop evidence on the wire, and the agent side: the node's certificate chain and key
//! as an operator's PKI wrote them (PEM files), read afresh at each attestation.

use std::path::PathBuf;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P384_SHA384_ASN1_SIGNING, EcdsaKeyPair, Ed25519KeyPair,
    RSA_PKCS1_SHA256, RsaKeyPair,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::{MAX_CHAIN, NAME, X509PopError, challenge_message};
use crate::node::{AttestError, NodeEvidence};

/// The evidence: the chain's DER certificates one after the other, leaf first.
pub fn encode_chain(chain: &[Vec<u8>]) -> Vec<u8> {
    chain.concat()
}

/// Splits evidence into its DER certificates by their outer lengths, without parsing them.
///
/// # Errors
/// [`X509PopError::Malformed`] when the bytes are not whole DER SEQUENCEs, or too many.
pub fn split_chain(mut evidence: &[u8]) -> Result<Vec<Vec<u8>>, X509PopError> {
    let mut chain = Vec::new();
    while !evidence.is_empty() {
        if chain.len() == MAX_CHAIN {
            return Err(X509PopError::Malformed("it holds more than 8 certificates"));
        }
        let len = der_sequence_len(evidence).ok_or(X509PopError::Malformed(
            "it is not DER certificates, leaf first",
        ))?;
        let (cert, rest) = evidence.split_at(len);
        chain.push(cert.to_vec());
        evidence = rest;
    }
    if chain.is_empty() {
        return Err(X509PopError::Malformed("it holds no certificate"));
    }
    Ok(chain)
}

/// The total length of the DER SEQUENCE at the start of `bytes`, when it is whole.
fn der_sequence_len(bytes: &[u8]) -> Option<usize> {
    let (&tag, rest) = bytes.split_first()?;
    let (&first, rest) = rest.split_first()?;
    if tag != 0x30 {
        return None;
    }
    let (content, header) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 3 || rest.len() < count {
            return None;
        }
        let len = rest[..count]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, 2 + count)
    };
    let total = header.checked_add(content)?;
    (total <= bytes.len()).then_some(total)
}

/// The agent side of x509pop: the node's certificate chain (leaf first, PEM) and its private
/// key (PEM: PKCS#8, SEC1 EC or PKCS#1 RSA; P-256, P-384, RSA or Ed25519).
#[derive(Debug, Clone)]
pub struct X509PopEvidence {
    cert_path: PathBuf,
    key_path: PathBuf,
}

impl X509PopEvidence {
    /// Evidence read from `cert_path` and answered with `key_path`.
    pub fn new(cert_path: PathBuf, key_path: PathBuf) -> Self {
        Self {
            cert_path,
            key_path,
        }
    }

    fn unavailable(&self, what: String) -> AttestError {
        AttestError::Unavailable {
            attestor: NAME,
            reason: what,
        }
    }

    fn chain(&self) -> Result<Vec<Vec<u8>>, AttestError> {
        let path = self.cert_path.display();
        let chain = CertificateDer::pem_file_iter(&self.cert_path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.unavailable(format!("cannot read certificates from {path}: {e}")))?;
        if chain.is_empty() {
            return Err(self.unavailable(format!(
                "{path} holds no PEM certificate; give the node certificate (leaf first)"
            )));
        }
        Ok(chain.into_iter().map(|c| c.to_vec()).collect())
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, AttestError> {
        let path = self.key_path.display();
        let key = PrivateKeyDer::from_pem_file(&self.key_path)
            .map_err(|e| self.unavailable(format!("cannot read a private key from {path}: {e}")))?;
        let der = key.secret_der();
        let rng = SystemRandom::new();
        let ec = |alg| EcdsaKeyPair::from_private_key_der(alg, der).ok();
        if let Some(pair) =
            ec(&ECDSA_P256_SHA256_ASN1_SIGNING).or_else(|| ec(&ECDSA_P384_SHA384_ASN1_SIGNING))
        {
            return pair
                .sign(&rng, message)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| self.unavailable(format!("the key in {path} failed to sign")));
        }
        let rsa = match &key {
            PrivateKeyDer::Pkcs1(_) => RsaKeyPair::from_der(der).ok(),
            _ => RsaKeyPair::from_pkcs8(der).ok(),
        };
        if let Some(pair) = rsa {
            let mut signature = vec![0; pair.public_modulus_len()];
            pair.sign(&RSA_PKCS1_SHA256, &rng, message, &mut signature)
                .map_err(|_| self.unavailable(format!("the key in {path} failed to sign")))?;
            return Ok(signature);
        }
        if let Ok(pair) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der) {
            return Ok(pair.sign(message).as_ref().to_vec());
        }
        Err(self.unavailable(format!(
            "{path} holds no P-256, P-384, RSA or Ed25519 private key"
        )))
    }
}

impl NodeEvidence for X509PopEvidence {
    fn name(&self) -> &'static str {
        NAME
    }

    fn evidence(&self) -> Result<Vec<u8>, AttestError> {
        Ok(encode_chain(&self.chain()?))
    }

    /// Signs [`challenge_message`] over the nonce and the leaf read now: the same leaf the
    /// evidence carried unless the file was replaced in between, which the server then
    /// refuses (and the agent tries again).
    fn answer(&self, challenge: &[u8]) -> Result<Vec<u8>, AttestError> {
        let chain = self.chain()?;
        self.sign(&challenge_message(challenge, &chain[0]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_split_back_into_their_certificates() {
        let a = vec![0x30, 0x03, 1, 2, 3];
        let mut b = vec![0x30, 0x81, 0x80];
        b.extend(std::iter::repeat_n(7u8, 0x80));
        let chain = vec![a.clone(), b.clone()];
        assert_eq!(split_chain(&encode_chain(&chain)).unwrap(), chain);
        for bad in [
            vec![],
            vec![0x31, 0x01, 0],
            vec![0x30, 0x05, 1],
            vec![0x30, 0x84, 0, 0, 0, 1, 0],
            [a.clone(), vec![0x30]].concat(),
        ] {
            assert!(split_chain(&bad).is_err(), "{bad:?}");
        }
        let nine = vec![a; 9].concat();
        assert!(split_chain(&nine).is_err());
    }
}
