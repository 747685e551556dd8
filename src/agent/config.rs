//! The agent's settings: a TOML file, the environment and command-line flags merged once
//! (flags over environment over file), then validated into an [`AgentConfig`] with the defaults
//! filling what no layer set.

use std::path::{Path, PathBuf};

use super::AgentConfig;
use super::identity::{Bootstrap, IdentityError};
use crate::config_file::{ConfigFileError, Layer};
use crate::duration::{self, DurationError};

/// The server address when none is given: the server's default node API.
pub(crate) const DEFAULT_SERVER: &str = "127.0.0.1:8081";

/// Why the agent's configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum AgentConfigError {
    /// The settings file could not be read or parsed.
    #[error(transparent)]
    File(#[from] ConfigFileError),
    /// A server address is malformed or does not resolve.
    #[error("--server (server in a config file)")]
    Server(#[source] crate::server_set::ServerSetError),
    /// Both ways of trusting the server were given.
    #[error(
        "--trust-bundle and --insecure-bootstrap contradict each other; give one (--trust-bundle in production)"
    )]
    BothBootstraps,
    /// The trust bundle file is not usable.
    #[error(transparent)]
    TrustBundle(#[from] IdentityError),
    /// The sync interval is malformed.
    #[error("--sync-interval (sync_interval in a config file)")]
    SyncInterval(#[source] DurationError),
    /// The node attestor settings are incomplete or unknown.
    #[error(transparent)]
    Attestor(#[from] super::node_evidence::NodeEvidenceError),
    /// The pinned trust domain is not a trust domain name.
    #[error("--trust-domain (trust_domain in a config file) is not a trust domain name")]
    TrustDomain(#[source] crate::id::IdError),
}

crate::settings_layer! {
    /// Every setting of `mayfly agent run`, each optional: the same keys in the TOML file
    /// (`sync_interval`), as flags (`--sync-interval`) and as environment variables
    /// (`MAYFLY_AGENT_SYNC_INTERVAL`; the join token's is `MAYFLY_JOIN_TOKEN`).
    pub struct AgentSettings {
        /// A server's node API, HOST:PORT [default: 127.0.0.1:8081]. Repeat it (or separate
        /// with commas) for several servers sharing one database: the agent uses one and fails
        /// over to the others; a name with several addresses counts as several servers. In a
        /// config file, a string or a list of strings.
        #[arg(long, env = "MAYFLY_AGENT_SERVER", value_delimiter = ',')]
        #[serde(default, deserialize_with = "one_or_many")]
        pub server: Vec<String>,
        /// A single-use join token from `mayfly token generate` (needed until the agent has an
        /// SVID).
        #[arg(long, env = "MAYFLY_JOIN_TOKEN", hide_env_values = true)]
        pub join_token: Option<String>,
        /// The node attestor: join_token, x509pop, sshpop, k8s_psat or aws_iid [default:
        /// join_token when --join-token is given, x509pop when --x509pop-cert is, sshpop when
        /// --sshpop-cert is, aws_iid when --aws-iid-document is]. Agents of attestors other
        /// than join_token attest again by themselves after an eviction or an expired SVID.
        #[arg(long, env = "MAYFLY_AGENT_ATTESTOR")]
        pub attestor: Option<String>,
        /// x509pop: the node certificate issued by the operator's CA, PEM, leaf first
        /// (intermediates may follow).
        #[arg(long, env = "MAYFLY_AGENT_X509POP_CERT")]
        pub x509pop_cert: Option<PathBuf>,
        /// x509pop: the node certificate's private key, PEM.
        #[arg(long, env = "MAYFLY_AGENT_X509POP_KEY")]
        pub x509pop_key: Option<PathBuf>,
        /// sshpop: the host certificate signed by the operator's SSH CA (`ssh-keygen -s CA
        /// -h`), e.g. /etc/ssh/ssh_host_ed25519_key-cert.pub.
        #[arg(long, env = "MAYFLY_AGENT_SSHPOP_CERT")]
        pub sshpop_cert: Option<PathBuf>,
        /// sshpop: the host key the certificate certifies (OpenSSH format, unencrypted).
        #[arg(long, env = "MAYFLY_AGENT_SSHPOP_KEY")]
        pub sshpop_key: Option<PathBuf>,
        /// aws_iid: the instance identity document, byte for byte as the metadata service
        /// serves it (for offline use; without it, the agent reads it through IMDSv2).
        #[arg(long, env = "MAYFLY_AGENT_AWS_IID_DOCUMENT")]
        pub aws_iid_document: Option<PathBuf>,
        /// aws_iid: AWS's base64 signature of the document
        /// (/latest/dynamic/instance-identity/signature).
        #[arg(long, env = "MAYFLY_AGENT_AWS_IID_SIGNATURE")]
        pub aws_iid_signature: Option<PathBuf>,
        /// aws_iid: the instance metadata service [default: http://169.254.169.254].
        #[arg(long, env = "MAYFLY_AGENT_AWS_IID_IMDS_URL")]
        pub aws_iid_imds_url: Option<String>,
        /// k8s_psat: the cluster's name, as the server's `[[node_attestors.k8s_psat.clusters]]`
        /// names it.
        #[arg(long, env = "MAYFLY_AGENT_K8S_CLUSTER")]
        pub k8s_cluster: Option<String>,
        /// k8s_psat: the pod's projected service account token (read again at each
        /// attestation, as the kubelet rotates it).
        #[arg(long, env = "MAYFLY_AGENT_K8S_TOKEN")]
        pub k8s_token: Option<PathBuf>,
        /// The server's trust bundle, PEM (the output of `mayfly bundle show`).
        #[arg(long, env = "MAYFLY_AGENT_TRUST_BUNDLE")]
        pub trust_bundle: Option<PathBuf>,
        /// Trust the first server that answers instead of a bundle (not for production).
        #[arg(
            long,
            env = "MAYFLY_AGENT_INSECURE_BOOTSTRAP",
            num_args = 0..=1,
            default_missing_value = "true",
            value_name = "BOOL"
        )]
        pub insecure_bootstrap: Option<bool>,
        /// The Workload API socket [default: .mayfly/agent.sock].
        #[arg(long, env = "MAYFLY_AGENT_SOCKET")]
        pub socket: Option<PathBuf>,
        /// Where the agent keeps its SVID and key [default: .mayfly/agent].
        #[arg(long, env = "MAYFLY_AGENT_DATA_DIR")]
        pub data_dir: Option<PathBuf>,
        /// How often to ask the server for entry changes, e.g. 2s or 500ms [default: 2s].
        #[arg(long, env = "MAYFLY_AGENT_SYNC_INTERVAL")]
        pub sync_interval: Option<String>,
        /// The server's trust domain, e.g. acme.test: pins it when the trust bundle's roots
        /// name none (an upstream CA without a SPIFFE URI SAN), and must agree with the ones
        /// they name [default: the bundle's, else the server SVID's that verifies against it].
        #[arg(long, env = "MAYFLY_AGENT_TRUST_DOMAIN")]
        pub trust_domain: Option<String>,
    }
}

impl AgentSettings {
    /// These settings (from the command line) over the config file's, validated.
    ///
    /// # Errors
    /// The [`AgentConfigError`] for the file or the first bad setting.
    pub fn resolve_over(self, file: Option<&Path>) -> Result<AgentConfig, AgentConfigError> {
        self.over_file(file)?.resolve()
    }

    /// Validates the settings and fills the rest from the defaults.
    ///
    /// # Errors
    /// The [`AgentConfigError`] for the first bad setting.
    pub fn resolve(self) -> Result<AgentConfig, AgentConfigError> {
        let names = if self.server.is_empty() {
            vec![DEFAULT_SERVER.to_owned()]
        } else {
            self.server
        };
        let servers = crate::server_set::resolve(&names).map_err(AgentConfigError::Server)?;
        let mut config = AgentConfig::with_defaults(servers[0]);
        config.servers = servers;
        config.node_attestor = super::node_evidence::EvidenceSettings {
            attestor: self.attestor,
            join_token: self.join_token.clone(),
            x509pop_cert: self.x509pop_cert,
            x509pop_key: self.x509pop_key,
            sshpop_cert: self.sshpop_cert,
            sshpop_key: self.sshpop_key,
            aws_iid_document: self.aws_iid_document,
            aws_iid_signature: self.aws_iid_signature,
            aws_iid_imds_url: self.aws_iid_imds_url,
            k8s_cluster: self.k8s_cluster,
            k8s_token: self.k8s_token,
        }
        .resolve()?;
        config.join_token = self.join_token;
        config.bootstrap = match (self.trust_bundle, self.insecure_bootstrap.unwrap_or(false)) {
            (Some(_), true) => return Err(AgentConfigError::BothBootstraps),
            (Some(path), false) => Some(Bootstrap::from_pem_file(&path)?),
            (None, true) => Some(Bootstrap::Insecure),
            (None, false) => None,
        };
        if let Some(socket) = self.socket {
            config.socket = socket;
        }
        if let Some(dir) = self.data_dir {
            config.data_dir = dir;
        }
        // Relative paths are made absolute once, so the socket path the agent logs and the
        // one workloads are told about are the same wherever they run from.
        config.socket = absolute(&config.socket);
        config.data_dir = absolute(&config.data_dir);
        config.trust_domain = self
            .trust_domain
            .map(|td| crate::id::TrustDomain::new(&td))
            .transpose()
            .map_err(AgentConfigError::TrustDomain)?;
        if let Some(interval) = self.sync_interval {
            config.sync_interval =
                duration::parse(&interval).map_err(AgentConfigError::SyncInterval)?;
        }
        Ok(config)
    }
}

/// A config file's `server`: one address as a string, or a list of them.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match serde::Deserialize::deserialize(d)? {
        OneOrMany::One(one) => vec![one],
        OneOrMany::Many(many) => many,
    })
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pinned_trust_domain_is_validated() {
        let config = AgentSettings {
            trust_domain: Some("acme.test".into()),
            ..AgentSettings::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(config.trust_domain.unwrap().as_str(), "acme.test");
        assert!(
            AgentSettings::default()
                .resolve()
                .unwrap()
                .trust_domain
                .is_none()
        );
        let err = AgentSettings {
            trust_domain: Some("spiffe://acme.test".into()),
            ..AgentSettings::default()
        }
        .resolve()
        .unwrap_err();
        assert!(matches!(err, AgentConfigError::TrustDomain(_)), "{err:?}");
    }

    #[test]
    fn a_sub_second_sync_interval_is_accepted_and_a_bad_one_named() {
        let config = AgentSettings {
            sync_interval: Some("500ms".into()),
            ..AgentSettings::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(config.sync_interval.as_millis(), 500);
        let err = AgentSettings {
            sync_interval: Some("soon".into()),
            ..AgentSettings::default()
        }
        .resolve()
        .unwrap_err();
        assert!(
            matches!(
                err,
                AgentConfigError::SyncInterval(DurationError::Malformed(_))
            ),
            "{err:?}"
        );
    }

    #[test]
    fn several_servers_from_flags_file_and_env_forms() {
        use crate::config_file::Layer;
        let config = AgentSettings {
            server: vec!["127.0.0.1:8081".into(), "127.0.0.2:8082".into()],
            ..AgentSettings::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(
            config.servers,
            vec![
                "127.0.0.1:8081".parse().unwrap(),
                "127.0.0.2:8082".parse().unwrap()
            ]
        );
        // The file accepts one string (as before) or a list; flags replace the file's list.
        let one: AgentSettings = toml::from_str("server = \"127.0.0.3:1\"").unwrap();
        assert_eq!(one.server, vec!["127.0.0.3:1".to_owned()]);
        let many: AgentSettings =
            toml::from_str("server = [\"127.0.0.3:1\", \"127.0.0.4:2\"]").unwrap();
        assert_eq!(many.server.len(), 2);
        let merged = AgentSettings::default().or(many.clone()).resolve().unwrap();
        assert_eq!(merged.servers.len(), 2);
        // The environment's comma-separated form, as clap splits it.
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            settings: AgentSettings,
        }
        let cli = Cli::try_parse_from([
            "x",
            "--server",
            "127.0.0.1:1,127.0.0.1:2",
            "--server",
            "127.0.0.1:3",
        ])
        .unwrap();
        assert_eq!(cli.settings.server.len(), 3);
        // A missing port is refused with what to write.
        let err = AgentSettings {
            server: vec!["127.0.0.1".into()],
            ..AgentSettings::default()
        }
        .resolve()
        .unwrap_err();
        assert!(
            crate::wire::error_chain(&err).contains("HOST:PORT"),
            "{err:?}"
        );
    }
}
