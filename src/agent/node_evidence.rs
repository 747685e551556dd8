//! Which node attestor the agent attests with, from its settings (`--attestor` and each
//! attestor's files), checked when the agent starts so a missing flag is one sentence then
//! rather than a refusal later.

use std::path::PathBuf;
use std::sync::Arc;

use mayfly_attestors::NodeEvidence;
use mayfly_attestors::aws_iid::{self, AwsIidEvidence};
use mayfly_attestors::join_token::{self, JoinTokenEvidence};
use mayfly_attestors::k8s_psat::{self, K8sPsatEvidence};
use mayfly_attestors::sshpop::{self, SshPopEvidence};
use mayfly_attestors::x509pop::{self, X509PopEvidence};

/// The attestors an agent can attest with.
pub const ATTESTORS: &[&str] = &[
    join_token::NAME,
    x509pop::NAME,
    sshpop::NAME,
    aws_iid::NAME,
    k8s_psat::NAME,
];

/// Why the agent's attestor settings were refused.
#[derive(Debug, thiserror::Error)]
pub enum NodeEvidenceError {
    /// `--attestor` names no attestor this agent knows.
    #[error(
        "--attestor {0}: unknown node attestor; this agent knows: join_token, x509pop, sshpop, aws_iid, k8s_psat"
    )]
    Unknown(String),
    /// The attestor chosen needs a flag that was not given.
    #[error("--attestor {attestor} needs {flag}")]
    Missing {
        /// The attestor.
        attestor: &'static str,
        /// The flag it needs.
        flag: &'static str,
    },
    /// The metadata service URL is not `http://host[:port]`.
    #[error("--aws-iid-imds-url: {0}")]
    ImdsUrl(String),
}

/// The attestor settings of `mayfly agent run`, as given.
#[derive(Debug, Clone, Default)]
pub struct EvidenceSettings {
    /// `--attestor`.
    pub attestor: Option<String>,
    /// `--join-token`.
    pub join_token: Option<String>,
    /// `--x509pop-cert`.
    pub x509pop_cert: Option<PathBuf>,
    /// `--x509pop-key`.
    pub x509pop_key: Option<PathBuf>,
    /// `--sshpop-cert`.
    pub sshpop_cert: Option<PathBuf>,
    /// `--sshpop-key`.
    pub sshpop_key: Option<PathBuf>,
    /// `--aws-iid-document`.
    pub aws_iid_document: Option<PathBuf>,
    /// `--aws-iid-signature`.
    pub aws_iid_signature: Option<PathBuf>,
    /// `--aws-iid-imds-url`.
    pub aws_iid_imds_url: Option<String>,
    /// `--k8s-cluster`.
    pub k8s_cluster: Option<String>,
    /// `--k8s-token`.
    pub k8s_token: Option<PathBuf>,
}

impl EvidenceSettings {
    /// The evidence the agent attests with. Without `--attestor`, a join token if given, else
    /// x509pop or sshpop if its certificate is given, else none (a stored identity may still
    /// do).
    ///
    /// # Errors
    /// [`NodeEvidenceError`] for an unknown attestor or a missing flag.
    pub fn resolve(self) -> Result<Option<Arc<dyn NodeEvidence>>, NodeEvidenceError> {
        let name = match self.attestor.as_deref() {
            Some(name) => name,
            None if self.join_token.is_some() => join_token::NAME,
            None if self.x509pop_cert.is_some() => x509pop::NAME,
            None if self.sshpop_cert.is_some() => sshpop::NAME,
            None if self.aws_iid_document.is_some() => aws_iid::NAME,
            None => return Ok(None),
        };
        let evidence: Arc<dyn NodeEvidence> = match name {
            n if n == join_token::NAME => Arc::new(JoinTokenEvidence::new(self.join_token.ok_or(
                NodeEvidenceError::Missing {
                    attestor: join_token::NAME,
                    flag: "--join-token (from `mayfly token generate`)",
                },
            )?)),
            n if n == x509pop::NAME => {
                let missing = |flag| NodeEvidenceError::Missing {
                    attestor: x509pop::NAME,
                    flag,
                };
                Arc::new(X509PopEvidence::new(
                    self.x509pop_cert
                        .ok_or(missing("--x509pop-cert (the node certificate, PEM)"))?,
                    self.x509pop_key
                        .ok_or(missing("--x509pop-key (its private key, PEM)"))?,
                ))
            }
            n if n == sshpop::NAME => {
                let missing = |flag| NodeEvidenceError::Missing {
                    attestor: sshpop::NAME,
                    flag,
                };
                Arc::new(SshPopEvidence::new(
                    self.sshpop_cert.ok_or(missing(
                        "--sshpop-cert (the host certificate, e.g. /etc/ssh/ssh_host_ed25519_key-cert.pub)",
                    ))?,
                    self.sshpop_key.ok_or(missing(
                        "--sshpop-key (the host key, e.g. /etc/ssh/ssh_host_ed25519_key)",
                    ))?,
                ))
            }
            n if n == aws_iid::NAME => aws_iid_evidence(
                self.aws_iid_document,
                self.aws_iid_signature,
                self.aws_iid_imds_url,
            )?,
            n if n == k8s_psat::NAME => {
                let missing = |flag| NodeEvidenceError::Missing {
                    attestor: k8s_psat::NAME,
                    flag,
                };
                Arc::new(K8sPsatEvidence::new(
                    self.k8s_cluster.ok_or(missing(
                        "--k8s-cluster (the cluster's name in the server's settings)",
                    ))?,
                    self.k8s_token.ok_or(missing(
                        "--k8s-token (the pod's projected service account token file)",
                    ))?,
                ))
            }
            other => {
                return Err(NodeEvidenceError::Unknown(
                    crate::text::escape_bounded(other, 64).into_owned(),
                ));
            }
        };
        Ok(Some(evidence))
    }
}

/// aws_iid's evidence: from the two files when given (both are needed), else from the
/// metadata service through IMDSv2.
fn aws_iid_evidence(
    document: Option<PathBuf>,
    signature: Option<PathBuf>,
    imds_url: Option<String>,
) -> Result<Arc<dyn NodeEvidence>, NodeEvidenceError> {
    let missing = |flag| NodeEvidenceError::Missing {
        attestor: aws_iid::NAME,
        flag,
    };
    Ok(match (document, signature) {
        (Some(document), Some(signature)) => {
            Arc::new(AwsIidEvidence::from_files(document, signature))
        }
        (Some(_), None) => {
            return Err(missing(
                "--aws-iid-signature beside --aws-iid-document (AWS's base64 signature)",
            ));
        }
        (None, Some(_)) => {
            return Err(missing(
                "--aws-iid-document beside --aws-iid-signature (the instance identity document)",
            ));
        }
        (None, None) => {
            let url = imds_url.as_deref().unwrap_or(aws_iid::DEFAULT_IMDS_URL);
            Arc::new(
                AwsIidEvidence::imds(url).map_err(|e| NodeEvidenceError::ImdsUrl(e.to_string()))?,
            )
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_attestor_follows_the_flags() {
        let none = EvidenceSettings::default().resolve().unwrap();
        assert!(none.is_none());
        let token = EvidenceSettings {
            join_token: Some("t".into()),
            ..Default::default()
        };
        assert_eq!(token.resolve().unwrap().unwrap().name(), "join_token");
        let x509 = EvidenceSettings {
            x509pop_cert: Some("c".into()),
            x509pop_key: Some("k".into()),
            ..Default::default()
        };
        let evidence = x509.clone().resolve().unwrap().unwrap();
        assert_eq!(evidence.name(), "x509pop");
        assert!(evidence.can_reattest());
        let no_key = EvidenceSettings {
            x509pop_key: None,
            ..x509
        };
        assert!(matches!(
            no_key.resolve(),
            Err(NodeEvidenceError::Missing { flag, .. }) if flag.starts_with("--x509pop-key")
        ));
        let k8s = EvidenceSettings {
            attestor: Some("k8s_psat".into()),
            k8s_cluster: Some("prod".into()),
            k8s_token: Some("/var/run/secrets/tokens/mayfly".into()),
            ..Default::default()
        };
        let evidence = k8s.clone().resolve().unwrap().unwrap();
        assert_eq!(evidence.name(), "k8s_psat");
        assert!(evidence.can_reattest());
        let no_cluster = EvidenceSettings {
            k8s_cluster: None,
            ..k8s
        };
        assert!(matches!(
            no_cluster.resolve(),
            Err(NodeEvidenceError::Missing { flag, .. }) if flag.starts_with("--k8s-cluster")
        ));
        let unknown = EvidenceSettings {
            attestor: Some("tpm\u{1b}[31m".into()),
            ..Default::default()
        };
        let err = unknown.resolve().unwrap_err().to_string();
        assert!(
            err.contains("unknown node attestor") && !err.contains('\u{1b}'),
            "{err}"
        );
    }

    #[test]
    fn an_sshpop_certificate_chooses_sshpop_and_needs_its_key() {
        let ssh = EvidenceSettings {
            sshpop_cert: Some("host-cert.pub".into()),
            sshpop_key: Some("host".into()),
            ..Default::default()
        };
        let evidence = ssh.clone().resolve().unwrap().unwrap();
        assert_eq!(evidence.name(), "sshpop");
        assert!(evidence.can_reattest());
        let no_key = EvidenceSettings {
            sshpop_key: None,
            ..ssh
        };
        assert!(matches!(
            no_key.resolve(),
            Err(NodeEvidenceError::Missing { flag, .. }) if flag.starts_with("--sshpop-key")
        ));
        let named = EvidenceSettings {
            attestor: Some("sshpop".into()),
            ..Default::default()
        };
        assert!(matches!(
            named.resolve(),
            Err(NodeEvidenceError::Missing { flag, .. }) if flag.starts_with("--sshpop-cert")
        ));
    }

    #[test]
    fn aws_iid_takes_both_files_or_the_metadata_service() {
        let files = EvidenceSettings {
            aws_iid_document: Some("doc".into()),
            aws_iid_signature: Some("sig".into()),
            ..Default::default()
        };
        let evidence = files.clone().resolve().unwrap().unwrap();
        assert_eq!(evidence.name(), "aws_iid");
        assert!(evidence.can_reattest());
        let no_signature = EvidenceSettings {
            aws_iid_signature: None,
            ..files
        };
        assert!(matches!(
            no_signature.resolve(),
            Err(NodeEvidenceError::Missing { flag, .. }) if flag.starts_with("--aws-iid-signature")
        ));
        let imds = EvidenceSettings {
            attestor: Some("aws_iid".into()),
            ..Default::default()
        };
        assert_eq!(imds.resolve().unwrap().unwrap().name(), "aws_iid");
        let bad_url = EvidenceSettings {
            attestor: Some("aws_iid".into()),
            aws_iid_imds_url: Some("https://169.254.169.254".into()),
            ..Default::default()
        };
        let err = bad_url.resolve().unwrap_err().to_string();
        assert!(
            err.starts_with("--aws-iid-imds-url: ") && err.contains("http://HOST[:PORT]"),
            "{err}"
        );
    }
}
