//! The agent's settings: a TOML file, the environment and command-line flags merged once
//! (flags over environment over file), then validated into an [`AgentConfig`] with the defaults
//! filling what no layer set.

use std::net::{SocketAddr, ToSocketAddrs};
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
    /// The server address does not resolve.
    #[error("'{0}' is not a server address: write HOST:PORT, such as 127.0.0.1:8081")]
    Server(String),
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
    /// The pinned trust domain is not a trust domain name.
    #[error("--trust-domain (trust_domain in a config file) is not a trust domain name")]
    TrustDomain(#[source] crate::id::IdError),
}

crate::settings_layer! {
    /// Every setting of `mayfly agent run`, each optional: the same keys in the TOML file
    /// (`sync_interval`), as flags (`--sync-interval`) and as environment variables
    /// (`MAYFLY_AGENT_SYNC_INTERVAL`; the join token's is `MAYFLY_JOIN_TOKEN`).
    pub struct AgentSettings {
        /// The server's node API, HOST:PORT [default: 127.0.0.1:8081].
        #[arg(long, env = "MAYFLY_AGENT_SERVER")]
        pub server: Option<String>,
        /// A single-use join token from `mayfly token generate` (needed until the agent has an
        /// SVID).
        #[arg(long, env = "MAYFLY_JOIN_TOKEN", hide_env_values = true)]
        pub join_token: Option<String>,
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
        let server = self.server.unwrap_or_else(|| DEFAULT_SERVER.to_owned());
        let addr: SocketAddr = server
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| AgentConfigError::Server(server.clone()))?;
        let mut config = AgentConfig::with_defaults(addr);
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
}
