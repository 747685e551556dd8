//! Which node attestor the agent attests with, from its settings (`--attestor` and each
//! attestor's files), checked when the agent starts so a missing flag is one sentence then
//! rather than a refusal later.

use std::path::PathBuf;
use std::sync::Arc;

use mayfly_attestors::NodeEvidence;
use mayfly_attestors::join_token::{self, JoinTokenEvidence};
use mayfly_attestors::sshpop::{self, SshPopEvidence};
use mayfly_attestors::x509pop::{self, X509PopEvidence};

/// The attestors an agent can attest with.
pub const ATTESTORS: &[&str] = &[join_token::NAME, x509pop::NAME, sshpop::NAME];

/// Why the agent's attestor settings were refused.
#[derive(Debug, thiserror::Error)]
pub enum NodeEvidenceError {
    /// `--attestor` names no attestor this agent knows.
    #[error("--attestor {0}: unknown node attestor; this agent knows: join_token, x509pop, sshpop")]
    Unknown(String),
    /// The attestor chosen needs a flag that was not given.
    #[error("--attestor {attestor} needs {flag}")]
    Missing {
        /// The attestor.
        attestor: &'static str,
        /// The flag it needs.
        flag: &'static str,
    },
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
            other => {
                return Err(NodeEvidenceError::Unknown(
                    crate::text::escape_bounded(other, 64).into_owned(),
                ));
            }
        };
        Ok(Some(evidence))
    }
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
}
