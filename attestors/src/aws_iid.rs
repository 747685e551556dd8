//! The `aws_iid` node attestor (issue 12 point 5): an EC2 instance proves what it is with its
//! instance identity document, signed by AWS.
//!
//! The agent reads the document and its signature from the instance metadata service (IMDSv2,
//! [`AwsIidEvidence::imds`]) or from files ([`AwsIidEvidence::from_files`]) and sends them as
//! the JSON `{"document": "<the document, verbatim>", "signature": "<base64>"}`. The server
//! decides at once, without a challenge: AWS signed the document, so no key on the node is
//! involved, and a replayed document is bounded by its age.
//!
//! **Which signature.** AWS publishes three signatures of the document: `signature` (base64
//! RSA PKCS#1 v1.5 over SHA-256 of the document bytes), `pkcs7` (DSA over SHA-1, in a PKCS#7
//! envelope) and `rsa2048` (RSA-2048 over SHA-256, in a PKCS#7 envelope). This attestor
//! verifies the `signature` form, which SPIRE's `aws_iid` verifies too (its legacy field;
//! SPIRE also takes `rsa2048`, which needs a PKCS#7 parser Mayfly does not have yet). AWS's
//! certificate for the `signature` form ("RSA" in AWS's list of public certificates) holds a
//! 1024-bit key in most regions, so keys of 1024 to 8192 bits are accepted. The configured
//! certificates are pinned keys, not a PKI: their dates are not checked, as SPIRE does not.
//!
//! **Age.** A document is refused when its `pendingTime` (when the instance was last launched
//! or started) is older than the configured `max_document_age`, or more than
//! [`CLOCK_SKEW`] in the future. Since `pendingTime` does not move while the instance runs, an
//! instance can attest (and re-attest) only within that window after its launch.
//!
//! **Identity.** The node ID is `<accountId>/<region>/<instanceId>`; the selectors are
//! `aws_iid:account_id:<id>`, `aws_iid:region:<r>`, `aws_iid:az:<zone>`,
//! `aws_iid:instance:id:<instance id>` and `aws_iid:image:id:<ami id>`. Each value is checked
//! for AWS's form before it is used.

mod evidence;
mod imds;

use std::time::{Duration, SystemTime};

use aws_lc_rs::signature::{RSA_PKCS1_1024_8192_SHA256_FOR_LEGACY_USE_ONLY, UnparsedPublicKey};
use base64::Engine as _;
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::public_key::PublicKey;

use crate::node::{
    AttestError, Begun, MAX_EVIDENCE, NodeAttestor, NodeClaim, ProvenNode, is_valid_node_id,
};
use crate::selector::Selector;

pub use evidence::{AwsIidEvidence, DEFAULT_IMDS_URL};
pub use imds::{ImdsClient, ImdsError, InstanceIdentity};

/// The attestor's name.
pub const NAME: &str = "aws_iid";
/// How far in the future a document's `pendingTime` may be, for the server's and AWS's clocks
/// to disagree.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);
/// The largest signature accepted, in bytes once decoded: an 8192-bit RSA signature.
const MAX_SIGNATURE: usize = 1024;
/// The RSA key sizes accepted in a configured certificate, in bits.
const MIN_KEY_BITS: usize = 1024;
const MAX_KEY_BITS: usize = 8192;

/// Why the attestor's configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AwsIidConfigError {
    /// No certificate was configured.
    #[error(
        "the aws_iid attestor has no AWS certificate: configure the RSA certificate AWS publishes for each region your instances run in"
    )]
    NoCertificate,
    /// A certificate could not be parsed as X.509 DER.
    #[error(
        "AWS certificate {index} is not an X.509 certificate ({reason}): give the PEM AWS publishes"
    )]
    Unparsable {
        /// Its position in the list, from 1.
        index: usize,
        /// The parser's words.
        reason: String,
    },
    /// A certificate holds no RSA key of a usable size (AWS's DSA certificate is for the
    /// `pkcs7` signature, which this attestor does not verify).
    #[error(
        "AWS certificate {index} holds {found}, not an RSA key of 1024 to 8192 bits: use AWS's RSA certificate for the region (the one for the base64 'signature'), not the DSA one"
    )]
    NotRsa {
        /// Its position in the list, from 1.
        index: usize,
        /// What key it holds, in words.
        found: String,
    },
    /// The maximum document age is zero, so no document could ever attest.
    #[error("the aws_iid max_document_age is zero: give a duration such as \"5m\"")]
    ZeroAge,
}

/// The server side: the AWS certificates trusted and the oldest document accepted.
#[derive(Debug, Clone)]
pub struct AwsIidAttestor {
    /// The RSA public keys of the certificates (PKCS#1 `RSAPublicKey` DER).
    keys: Vec<Vec<u8>>,
    max_document_age: Duration,
}

impl AwsIidAttestor {
    /// An attestor trusting the RSA keys of `certificates` (DER) and refusing documents whose
    /// `pendingTime` is older than `max_document_age`.
    ///
    /// # Errors
    /// The [`AwsIidConfigError`] for an empty list, a certificate that does not parse or
    /// holds no RSA key, or a zero age.
    pub fn new(
        certificates: Vec<Vec<u8>>,
        max_document_age: Duration,
    ) -> Result<Self, AwsIidConfigError> {
        if certificates.is_empty() {
            return Err(AwsIidConfigError::NoCertificate);
        }
        if max_document_age.is_zero() {
            return Err(AwsIidConfigError::ZeroAge);
        }
        let keys = certificates
            .iter()
            .enumerate()
            .map(|(i, der)| rsa_key(i + 1, der))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            keys,
            max_document_age,
        })
    }

    /// Verifies `evidence` at `now` and returns the node it proves.
    ///
    /// # Errors
    /// [`AttestError::Malformed`] for evidence or a document not of AWS's form;
    /// [`AttestError::Refused`] for a signature no configured key made, or a document too old
    /// or from the future.
    pub fn verify(&self, evidence: &[u8], now: SystemTime) -> Result<ProvenNode, AttestError> {
        if evidence.len() > MAX_EVIDENCE {
            return Err(malformed("it is over 64 KiB"));
        }
        let wire = evidence::Wire::decode(evidence)?;
        let signature = decode_signature(&wire.signature)?;
        // The signature is checked over exactly the bytes the identity is then read from.
        let document = wire.document.as_bytes();
        let signed = self.keys.iter().any(|key| {
            UnparsedPublicKey::new(&RSA_PKCS1_1024_8192_SHA256_FOR_LEGACY_USE_ONLY, key)
                .verify(document, &signature)
                .is_ok()
        });
        if !signed {
            return Err(refused(
                "the document's signature does not verify with any configured AWS certificate; configure the RSA certificate of the instance's region",
            ));
        }
        let fields = Document::parse(document)?;
        self.check_age(&fields.pending_time, now)?;
        fields.into_node()
    }

    fn check_age(&self, pending_time: &str, now: SystemTime) -> Result<(), AttestError> {
        let pending = humantime::parse_rfc3339(pending_time).map_err(|_| {
            malformed("the document's pendingTime is not an RFC 3339 UTC time such as 2026-12-02T14:00:00Z")
        })?;
        match now.duration_since(pending) {
            Ok(age) if age > self.max_document_age => Err(refused(&format!(
                "the document is stale: its pendingTime is {}s old, over the max_document_age of {}s; stop and start the instance for a fresh document, or raise max_document_age",
                age.as_secs(),
                self.max_document_age.as_secs()
            ))),
            Ok(_) => Ok(()),
            Err(ahead) if ahead.duration() > CLOCK_SKEW => Err(refused(&format!(
                "the document's pendingTime is {}s in the future, beyond the {}s of clock skew allowed; check the server's clock",
                ahead.duration().as_secs(),
                CLOCK_SKEW.as_secs()
            ))),
            Err(_) => Ok(()),
        }
    }
}

impl NodeAttestor for AwsIidAttestor {
    fn name(&self) -> &'static str {
        NAME
    }

    fn begin(&self, evidence: &[u8], now: SystemTime) -> Result<Begun, AttestError> {
        self.verify(evidence, now)
            .map(|node| Begun::Claim(NodeClaim::Proven(node)))
    }
}

/// The RSA public key of certificate `index` (from 1), as PKCS#1 DER.
fn rsa_key(index: usize, der: &[u8]) -> Result<Vec<u8>, AwsIidConfigError> {
    let (rest, cert) =
        X509Certificate::from_der(der).map_err(|e| AwsIidConfigError::Unparsable {
            index,
            reason: e.to_string(),
        })?;
    if !rest.is_empty() {
        return Err(AwsIidConfigError::Unparsable {
            index,
            reason: "bytes follow the certificate".into(),
        });
    }
    let spki = cert.public_key();
    let not_rsa = |found: String| AwsIidConfigError::NotRsa { index, found };
    match spki.parsed() {
        Ok(PublicKey::RSA(rsa)) => {
            let bits = rsa.key_size();
            if (MIN_KEY_BITS..=MAX_KEY_BITS).contains(&bits) {
                Ok(spki.subject_public_key.data.to_vec())
            } else {
                Err(not_rsa(format!("a {bits}-bit RSA key")))
            }
        }
        Ok(PublicKey::DSA(_)) => Err(not_rsa("a DSA key".into())),
        Ok(PublicKey::EC(_)) => Err(not_rsa("an elliptic-curve key".into())),
        Ok(_) | Err(_) => Err(not_rsa("a key of another kind".into())),
    }
}

/// Decodes AWS's base64 signature; like AWS's and SPIRE's readers, it ignores line breaks,
/// since the metadata service wraps the text at 64 columns.
fn decode_signature(text: &str) -> Result<Vec<u8>, AttestError> {
    let compact: String = text.chars().filter(|c| !matches!(c, '\r' | '\n')).collect();
    let signature = base64::engine::general_purpose::STANDARD
        .decode(compact.trim())
        .map_err(|_| malformed("the signature is not standard base64"))?;
    if signature.is_empty() || signature.len() > MAX_SIGNATURE {
        return Err(malformed(
            "the signature is not an RSA signature of 1024 to 8192 bits",
        ));
    }
    Ok(signature)
}

/// The fields of the instance identity document this attestor reads; AWS's other fields
/// (instanceType, privateIp, ...) are ignored.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    account_id: String,
    region: String,
    availability_zone: String,
    instance_id: String,
    image_id: String,
    pending_time: String,
}

impl Document {
    fn parse(document: &[u8]) -> Result<Self, AttestError> {
        serde_json::from_slice(document).map_err(|e| {
            malformed(&format!(
                "the instance identity document is not AWS's ({}); send the document exactly as the metadata service gives it",
                json_reason(&e)
            ))
        })
    }

    /// Checks each value for AWS's form and builds the node from them.
    fn into_node(self) -> Result<ProvenNode, AttestError> {
        let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        let hex =
            |s: &str| !s.is_empty() && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        let zone_like = |s: &str| {
            !s.is_empty()
                && s.len() <= 64
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !s.starts_with('-')
                && !s.ends_with('-')
        };
        if self.account_id.len() != 12 || !digits(&self.account_id) {
            return Err(malformed(
                "the document's accountId is not 12 decimal digits",
            ));
        }
        if !zone_like(&self.region) {
            return Err(malformed(
                "the document's region is not an AWS region name such as us-east-1",
            ));
        }
        if !zone_like(&self.availability_zone) {
            return Err(malformed(
                "the document's availabilityZone is not an AWS zone name such as us-east-1a",
            ));
        }
        if !self
            .instance_id
            .strip_prefix("i-")
            .is_some_and(|h| h.len() <= 32 && hex(h))
        {
            return Err(malformed(
                "the document's instanceId is not i- followed by lowercase hexadecimal digits",
            ));
        }
        if !self
            .image_id
            .strip_prefix("ami-")
            .is_some_and(|h| h.len() <= 32 && hex(h))
        {
            return Err(malformed(
                "the document's imageId is not ami- followed by lowercase hexadecimal digits",
            ));
        }
        let node_id = format!("{}/{}/{}", self.account_id, self.region, self.instance_id);
        if !is_valid_node_id(&node_id) {
            return Err(malformed("the document's identity does not make a node ID"));
        }
        let selector = |kind: &str, value: &str| {
            Selector::node(NAME, kind, value)
                .map_err(|e| malformed(&format!("a selector could not be made: {e}")))
        };
        let selectors = vec![
            selector("account_id", &self.account_id)?,
            selector("region", &self.region)?,
            selector("az", &self.availability_zone)?,
            selector("instance", &format!("id:{}", self.instance_id))?,
            selector("image", &format!("id:{}", self.image_id))?,
        ];
        Ok(ProvenNode::new(node_id, selectors))
    }
}

/// What was wrong with a JSON text, in words that quote none of it: serde_json's own message
/// may echo the untrusted value.
pub(crate) fn json_reason(error: &serde_json::Error) -> String {
    use serde_json::error::Category;
    match error.classify() {
        Category::Syntax | Category::Io => "it is not JSON".into(),
        Category::Eof => "its JSON ends early".into(),
        Category::Data => {
            let text = error.to_string();
            // "missing field `accountId`" names only our own field.
            match text.split_once(" at line ") {
                Some((head, _)) if head.starts_with("missing field `") => head.to_owned(),
                _ => "a field is missing or of the wrong type".into(),
            }
        }
    }
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
