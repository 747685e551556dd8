//! The agent's configuration: a TOML file, command-line flags over it, defaults under both.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::AgentConfig;
use super::identity::{Bootstrap, IdentityError};
use crate::duration::{self, DurationError};

/// The server address when none is given: the server's default node API.
pub const DEFAULT_SERVER: &str = "127.0.0.1:8081";

/// Why the agent's configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum AgentConfigError {
    /// The settings file could not be read or parsed.
    #[error(transparent)]
    File(#[from] crate::config_file::ConfigFileError),
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
    /// A duration is malformed.
    #[error(transparent)]
    Duration(#[from] DurationError),
}

/// Every setting, each optional: the same keys in the TOML file and as flags.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSettings {
    /// The server's node API, HOST:PORT.
    pub server: Option<String>,
    /// A single-use join token.
    pub join_token: Option<String>,
    /// The server's trust bundle (PEM), for the first attestation.
    pub trust_bundle: Option<PathBuf>,
    /// Trust the first server that answers.
    pub insecure_bootstrap: Option<bool>,
    /// The Workload API socket.
    pub socket: Option<PathBuf>,
    /// The agent's data dir.
    pub data_dir: Option<PathBuf>,
    /// How often to poll the server for entry changes, e.g. `2s`.
    pub sync_interval: Option<String>,
}

impl AgentSettings {
    /// Reads a TOML file.
    ///
    /// # Errors
    /// [`AgentConfigError::File`].
    pub fn from_file(path: &Path) -> Result<Self, AgentConfigError> {
        Ok(crate::config_file::read(path)?)
    }

    /// `self`, with every setting `over` has replacing ours.
    pub fn overridden_by(self, over: AgentSettings) -> AgentSettings {
        AgentSettings {
            server: over.server.or(self.server),
            join_token: over.join_token.or(self.join_token),
            trust_bundle: over.trust_bundle.or(self.trust_bundle),
            insecure_bootstrap: over.insecure_bootstrap.or(self.insecure_bootstrap),
            socket: over.socket.or(self.socket),
            data_dir: over.data_dir.or(self.data_dir),
            sync_interval: over.sync_interval.or(self.sync_interval),
        }
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
        if let Some(interval) = self.sync_interval {
            config.sync_interval = duration::parse(&interval)?;
        }
        Ok(config)
    }
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}
