//! The agent side of `aws_iid`, and the evidence's JSON form shared with the server.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use super::imds::ImdsClient;
use super::{NAME, json_reason, malformed};
use crate::node::{AttestError, MAX_EVIDENCE, NodeEvidence};

/// The instance metadata service's address on EC2.
pub const DEFAULT_IMDS_URL: &str = "http://169.254.169.254";

/// The evidence on the wire: the document verbatim (the signature covers its exact bytes) and
/// AWS's base64 signature. Other fields are ignored, so that a later agent may add AWS's
/// `rsa2048` form beside these without older servers refusing it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(super) struct Wire {
    pub(super) document: String,
    pub(super) signature: String,
}

impl Wire {
    pub(super) fn decode(evidence: &[u8]) -> Result<Self, AttestError> {
        serde_json::from_slice(evidence).map_err(|e| {
            malformed(&format!(
                "{}; the evidence is the JSON {{\"document\": ..., \"signature\": ...}}",
                json_reason(&e)
            ))
        })
    }

    fn encode(&self) -> Result<Vec<u8>, AttestError> {
        let bytes = serde_json::to_vec(self).map_err(|e| unavailable(e.to_string()))?;
        if bytes.len() > MAX_EVIDENCE {
            return Err(unavailable(format!(
                "the document and signature make {} bytes of evidence, over the server's 64 KiB",
                bytes.len()
            )));
        }
        Ok(bytes)
    }
}

/// Where the agent reads its instance identity document and signature.
#[derive(Debug, Clone)]
enum Source {
    /// Two files, e.g. saved from the metadata service for offline use.
    Files {
        document: PathBuf,
        signature: PathBuf,
    },
    /// The instance metadata service, through IMDSv2.
    Imds(ImdsClient),
}

/// The agent side: reads the instance identity document and its signature afresh for each
/// attestation.
#[derive(Debug, Clone)]
pub struct AwsIidEvidence {
    source: Source,
}

impl AwsIidEvidence {
    /// Evidence read from `document` (the document, byte for byte as AWS serves it) and
    /// `signature` (AWS's base64 `signature`).
    pub fn from_files(document: impl Into<PathBuf>, signature: impl Into<PathBuf>) -> Self {
        Self {
            source: Source::Files {
                document: document.into(),
                signature: signature.into(),
            },
        }
    }

    /// Evidence read from the instance metadata service at `base_url` (an `http://host[:port]`
    /// URL; on EC2, [`DEFAULT_IMDS_URL`]) with IMDSv2's session token.
    ///
    /// # Errors
    /// [`AttestError::Unavailable`] when `base_url` is not such a URL.
    pub fn imds(base_url: &str) -> Result<Self, AttestError> {
        let client = ImdsClient::new(base_url).map_err(|e| unavailable(e.to_string()))?;
        Ok(Self {
            source: Source::Imds(client),
        })
    }
}

impl NodeEvidence for AwsIidEvidence {
    fn name(&self) -> &'static str {
        NAME
    }

    fn evidence(&self) -> Result<Vec<u8>, AttestError> {
        let (document, signature) = match &self.source {
            Source::Files {
                document,
                signature,
            } => (read_text(document)?, read_text(signature)?),
            Source::Imds(client) => {
                let fetched = client
                    .instance_identity()
                    .map_err(|e| unavailable(e.to_string()))?;
                (fetched.document, fetched.signature)
            }
        };
        Wire {
            document,
            signature: signature.trim().to_owned(),
        }
        .encode()
    }
}

/// Reads a UTF-8 file of at most [`MAX_EVIDENCE`] bytes, verbatim.
fn read_text(path: &Path) -> Result<String, AttestError> {
    let what =
        |e: std::io::Error| unavailable(format!("{} could not be read: {e}", path.display()));
    let file = std::fs::File::open(path).map_err(what)?;
    let mut bytes = Vec::new();
    // One byte past the limit tells a file at the limit from a larger one.
    file.take(MAX_EVIDENCE as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(what)?;
    if bytes.len() > MAX_EVIDENCE {
        return Err(unavailable(format!(
            "{} is over 64 KiB, too large for an instance identity document or signature",
            path.display()
        )));
    }
    String::from_utf8(bytes)
        .map_err(|_| unavailable(format!("{} is not UTF-8 text", path.display())))
}

fn unavailable(reason: String) -> AttestError {
    AttestError::Unavailable {
        attestor: NAME,
        reason,
    }
}
