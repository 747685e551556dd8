//! The node attestors a server accepts: join tokens always, and the ones its settings
//! configure (`[node_attestors.<name>]` in the TOML file, or a flag where one value suffices).
//! Every file is read when the server starts, so a wrong path or a bad CA stops it then with
//! one sentence, not at the first attestation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mayfly_attestors::NodeAttestor;
use mayfly_attestors::aws_iid::{self, AwsIidAttestor, AwsIidConfigError};
use mayfly_attestors::join_token::JoinTokenAttestor;
use mayfly_attestors::k8s_psat::K8sPsatAttestor;
use mayfly_attestors::sshpop::{self, SshPopAttestor, SshPopConfigError};
use mayfly_attestors::x509pop::{self, X509PopVerifier};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::k8s_jwks::{self, ClusterJwks, JwksError, K8sPsatSettings};

/// Why a node attestor's settings were refused.
#[derive(Debug, thiserror::Error)]
pub enum NodeAttestorsError {
    /// A file named in the settings could not be read.
    #[error("node_attestors.{attestor}: cannot read {path}: {reason}")]
    Read {
        /// The attestor whose settings name the file.
        attestor: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS's or the PEM parser's words.
        reason: String,
    },
    /// The x509pop CA bundle is not usable.
    #[error(
        "node_attestors.x509pop.ca_bundle {path}: {source}; give the PEM certificates of the CA that issues node certificates"
    )]
    X509Pop {
        /// The bundle file.
        path: PathBuf,
        /// Why it was refused.
        source: x509pop::X509PopError,
    },
    /// The sshpop CA keys are not usable.
    #[error("node_attestors.sshpop.cert_authorities: {source}")]
    SshPop {
        /// Why they were refused (naming the entry and line at fault).
        #[source]
        source: SshPopConfigError,
    },
    /// The aws_iid certificates or maximum age are not usable.
    #[error("node_attestors.aws_iid: {0}")]
    AwsIid(#[source] AwsIidConfigError),
    /// The aws_iid maximum document age is not a duration.
    #[error("node_attestors.aws_iid.max_document_age: {0}")]
    AwsIidAge(#[source] crate::duration::DurationError),
    /// A k8s_psat cluster, its JWKS file, URL or CA file is not usable.
    #[error("node_attestors.k8s_psat: {0}")]
    K8sPsat(JwksError),
}

/// The `[node_attestors]` table of the server's TOML file.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeAttestorsSettings {
    /// `[node_attestors.x509pop]`.
    pub x509pop: Option<X509PopSettings>,
    /// `[node_attestors.sshpop]`.
    pub sshpop: Option<SshPopSettings>,
    /// `[node_attestors.aws_iid]` (boxed: the server's settings are held in the CLI's command
    /// enum, which clippy keeps small).
    pub aws_iid: Option<Box<AwsIidSettings>>,
    /// `[[node_attestors.k8s_psat.clusters]]`.
    pub k8s_psat: Option<K8sPsatSettings>,
}

/// `[node_attestors.x509pop]`: nodes prove a certificate issued by the operator's CA.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct X509PopSettings {
    /// The PEM CA certificates node certificates must chain to.
    pub ca_bundle: PathBuf,
}

/// `[node_attestors.sshpop]`: nodes prove an OpenSSH host certificate signed by the operator's
/// SSH CA.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshPopSettings {
    /// Files of OpenSSH CA public key lines (`ssh_ca.pub`), any of which may sign host
    /// certificates.
    pub cert_authorities: Vec<PathBuf>,
}

/// `[node_attestors.aws_iid]`: EC2 instances prove their instance identity document, signed
/// by AWS.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsIidSettings {
    /// PEM files of AWS's RSA certificates (the ones for the base64 `signature`), one per
    /// region the instances run in, or several in one file.
    pub certificates: Vec<PathBuf>,
    /// The oldest `pendingTime` accepted, e.g. `"5m"`: instances attest within this time of
    /// their launch (or start).
    pub max_document_age: String,
}

/// The node attestors a server accepts, by name.
#[derive(Clone)]
pub struct NodeAttestors {
    by_name: BTreeMap<&'static str, Arc<dyn NodeAttestor>>,
    /// The k8s_psat attestor and its clusters' JWKS, for the refresher the server starts.
    k8s_jwks: Option<(Arc<K8sPsatAttestor>, Vec<ClusterJwks>)>,
}

impl std::fmt::Debug for NodeAttestors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.by_name.keys()).finish()
    }
}

impl Default for NodeAttestors {
    /// Join tokens only.
    fn default() -> Self {
        let mut by_name: BTreeMap<&'static str, Arc<dyn NodeAttestor>> = BTreeMap::new();
        by_name.insert(JoinTokenAttestor.name(), Arc::new(JoinTokenAttestor));
        Self {
            by_name,
            k8s_jwks: None,
        }
    }
}

impl NodeAttestors {
    /// Join tokens and the attestors `settings` configure, with their files read now.
    ///
    /// # Errors
    /// [`NodeAttestorsError`] for the first file or setting that is not usable.
    pub fn from_settings(settings: &NodeAttestorsSettings) -> Result<Self, NodeAttestorsError> {
        let mut attestors = Self::default();
        if let Some(x509pop) = &settings.x509pop {
            let roots = read_certs(x509pop::NAME, &x509pop.ca_bundle)?;
            let verifier =
                X509PopVerifier::new(roots).map_err(|source| NodeAttestorsError::X509Pop {
                    path: x509pop.ca_bundle.clone(),
                    source,
                })?;
            attestors.add(Arc::new(verifier));
        }
        if let Some(settings) = &settings.sshpop {
            let mut keys = Vec::with_capacity(settings.cert_authorities.len());
            for path in &settings.cert_authorities {
                let text = std::fs::read_to_string(path).map_err(|e| NodeAttestorsError::Read {
                    attestor: sshpop::NAME,
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                keys.push(text);
            }
            let attestor = SshPopAttestor::new(&keys)
                .map_err(|source| NodeAttestorsError::SshPop { source })?;
            attestors.add(Arc::new(attestor));
        }
        if let Some(aws) = &settings.aws_iid {
            let mut certificates = Vec::new();
            for path in &aws.certificates {
                certificates.extend(read_certs(aws_iid::NAME, path)?);
            }
            let age = crate::duration::parse(&aws.max_document_age)
                .map_err(NodeAttestorsError::AwsIidAge)?;
            let attestor =
                AwsIidAttestor::new(certificates, age).map_err(NodeAttestorsError::AwsIid)?;
            attestors.add(Arc::new(attestor));
        }
        if let Some(k8s) = &settings.k8s_psat {
            // Files are read now, so a bad one stops the server at start; URLs are fetched by
            // the refresher the server starts.
            let (attestor, sources) = k8s.build().map_err(NodeAttestorsError::K8sPsat)?;
            k8s_jwks::load_files(&attestor, &sources).map_err(NodeAttestorsError::K8sPsat)?;
            attestors.add(attestor.clone());
            attestors.k8s_jwks = Some((attestor, sources));
        }
        Ok(attestors)
    }

    /// Starts what keeps attestors' keys fresh (the k8s_psat JWKS refresher); called once by
    /// the server, inside its runtime. The tasks end when the attestors are dropped.
    pub fn start_refreshers(&self) {
        if let Some((attestor, sources)) = &self.k8s_jwks {
            k8s_jwks::spawn_refresher(attestor, sources.clone(), k8s_jwks::RefreshTimes::default());
        }
    }

    /// Accepts `attestor` (replacing one of the same name).
    pub fn add(&mut self, attestor: Arc<dyn NodeAttestor>) {
        self.by_name.insert(attestor.name(), attestor);
    }

    /// The attestor called `name`, if this server accepts it.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn NodeAttestor>> {
        self.by_name.get(name)
    }

    /// The names accepted, comma-separated, for refusals.
    pub fn names(&self) -> String {
        self.by_name.keys().copied().collect::<Vec<_>>().join(", ")
    }
}

/// The DER certificates of the PEM file at `path`; none is an error.
fn read_certs(attestor: &'static str, path: &Path) -> Result<Vec<Vec<u8>>, NodeAttestorsError> {
    let read = |reason: String| NodeAttestorsError::Read {
        attestor,
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| read(e.to_string()))?;
    if certs.is_empty() {
        return Err(read("it holds no PEM certificate".into()));
    }
    Ok(certs.into_iter().map(|c| c.to_vec()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Settings naming the sshpop CA files `paths`.
    fn sshpop(paths: Vec<PathBuf>) -> NodeAttestorsSettings {
        NodeAttestorsSettings {
            sshpop: Some(SshPopSettings {
                cert_authorities: paths,
            }),
            ..Default::default()
        }
    }

    /// An RSA certificate made by `openssl req`, as PEM in `dir`.
    fn rsa_cert(dir: &Path) -> PathBuf {
        let out = std::process::Command::new("openssl")
            .current_dir(dir)
            .args([
                "req",
                "-x509",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=test AWS",
            ])
            .args([
                "-newkey", "rsa:2048", "-keyout", "key.pem", "-out", "cert.pem",
            ])
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir.join("cert.pem")
    }

    fn aws(certificates: Vec<PathBuf>, age: &str) -> NodeAttestorsSettings {
        NodeAttestorsSettings {
            aws_iid: Some(Box::new(AwsIidSettings {
                certificates,
                max_document_age: age.into(),
            })),
            ..Default::default()
        }
    }

    #[test]
    fn sshpop_ca_files_are_read_at_start_and_bad_ones_named() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ssh_ca.pub");
        let out = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(dir.path().join("ssh_ca"))
            .output()
            .unwrap();
        assert!(out.status.success());
        let attestors = NodeAttestors::from_settings(&sshpop(vec![ca.clone()])).unwrap();
        assert!(attestors.get("sshpop").is_some());
        assert_eq!(attestors.names(), "join_token, sshpop");

        let missing = dir.path().join("missing.pub");
        let err = NodeAttestors::from_settings(&sshpop(vec![ca.clone(), missing])).unwrap_err();
        assert!(
            matches!(&err, NodeAttestorsError::Read { attestor: "sshpop", path, .. } if path.ends_with("missing.pub")),
            "{err}"
        );
        let junk = dir.path().join("junk.pub");
        std::fs::write(&junk, "not a key\n").unwrap();
        let err = NodeAttestors::from_settings(&sshpop(vec![ca, junk])).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("node_attestors.sshpop.cert_authorities: ")
                && text.contains("entry 2, line 1"),
            "{text}"
        );
        let err = NodeAttestors::from_settings(&sshpop(vec![])).unwrap_err();
        assert!(err.to_string().contains("at least one SSH CA"), "{err}");
    }

    #[test]
    fn aws_iid_settings_are_read_at_start_and_refused_in_one_sentence() {
        let dir = tempfile::tempdir().unwrap();
        let cert = rsa_cert(dir.path());
        let accepted = NodeAttestors::from_settings(&aws(vec![cert.clone()], "5m")).unwrap();
        assert!(accepted.get("aws_iid").is_some());
        assert_eq!(accepted.names(), "aws_iid, join_token");
        assert!(NodeAttestors::default().get("aws_iid").is_none());

        let age = NodeAttestors::from_settings(&aws(vec![cert.clone()], "5 minutes"))
            .unwrap_err()
            .to_string();
        assert!(
            age.starts_with(
                "node_attestors.aws_iid.max_document_age: '5 minutes' is not a duration"
            ),
            "{age}"
        );
        let none = NodeAttestors::from_settings(&aws(vec![], "5m"))
            .unwrap_err()
            .to_string();
        assert!(none.contains("has no AWS certificate"), "{none}");
        let missing = NodeAttestors::from_settings(&aws(vec![dir.path().join("nope.pem")], "5m"))
            .unwrap_err()
            .to_string();
        assert!(
            missing.starts_with("node_attestors.aws_iid: cannot read")
                && missing.contains("nope.pem"),
            "{missing}"
        );
        let key_only = NodeAttestors::from_settings(&aws(vec![dir.path().join("key.pem")], "5m"))
            .unwrap_err()
            .to_string();
        assert!(key_only.contains("no PEM certificate"), "{key_only}");
    }
}
