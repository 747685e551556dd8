//! The agent side of `k8s_psat`: the pod's projected service account token, sent with the
//! cluster's name.

use std::path::PathBuf;

use super::{Evidence, K8sPsatError, NAME};
use crate::node::{AttestError, MAX_EVIDENCE, NodeEvidence};

/// The agent side: the cluster's name and the pod's projected token file, which the kubelet
/// rotates, so it is read afresh for each attestation.
#[derive(Debug, Clone)]
pub struct K8sPsatEvidence {
    cluster: String,
    token_path: PathBuf,
}

impl K8sPsatEvidence {
    /// Evidence for `cluster` from the token at `token_path`.
    pub fn new(cluster: String, token_path: PathBuf) -> Self {
        Self {
            cluster,
            token_path,
        }
    }

    fn read_token(&self) -> Result<String, K8sPsatError> {
        use std::io::Read as _;
        let unreadable = |reason: String| K8sPsatError::Unreadable {
            path: self.token_path.display().to_string(),
            reason,
        };
        let file = std::fs::File::open(&self.token_path).map_err(|e| unreadable(e.to_string()))?;
        let mut bytes = Vec::new();
        file.take(MAX_EVIDENCE as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| unreadable(e.to_string()))?;
        if bytes.len() > MAX_EVIDENCE {
            return Err(unreadable("it is over 64 KiB, so it is no token".into()));
        }
        let text = String::from_utf8(bytes).map_err(|_| unreadable("it is not text".into()))?;
        let token = text.trim();
        if token.is_empty() {
            return Err(unreadable("it is empty".into()));
        }
        Ok(token.to_owned())
    }
}

impl NodeEvidence for K8sPsatEvidence {
    fn name(&self) -> &'static str {
        NAME
    }

    fn evidence(&self) -> Result<Vec<u8>, AttestError> {
        let token = self.read_token().map_err(K8sPsatError::into_attest)?;
        serde_json::to_vec(&Evidence {
            cluster: self.cluster.clone(),
            token,
        })
        .map_err(|e| AttestError::Unavailable {
            attestor: NAME,
            reason: format!("the evidence could not be encoded: {e}"),
        })
    }
}
