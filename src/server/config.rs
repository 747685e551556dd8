//! The server's configuration: a TOML file, command-line flags over it, defaults under both.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::ca::UpstreamCa;
use crate::duration::{self, DurationError};
use crate::id::{IdError, TrustDomain};
use crate::server::{ServerConfig, defaults};

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The settings file could not be read or parsed.
    #[error(transparent)]
    File(#[from] crate::config_file::ConfigFileError),
    /// The trust domain is malformed.
    #[error("bad trust domain: {0}")]
    TrustDomain(#[from] IdError),
    /// The bind address is malformed.
    #[error("'{0}' is not an address to listen on: write IP:PORT, such as 127.0.0.1:8081")]
    Bind(String),
    /// A duration is malformed.
    #[error(transparent)]
    Duration(#[from] DurationError),
    /// Only one of the upstream CA's two files was given.
    #[error("an upstream CA needs both its certificate and its key file; give both or neither")]
    UpstreamIncomplete,
}

/// Every setting, each optional: the same keys in the TOML file and as flags.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Trust domain name.
    pub trust_domain: Option<String>,
    /// Data directory.
    pub data_dir: Option<PathBuf>,
    /// Node API address.
    pub bind: Option<String>,
    /// Database URL (`postgres://…`); SQLite in the data dir when unset.
    pub database: Option<String>,
    /// CA lifetime, e.g. `7d`.
    pub ca_ttl: Option<String>,
    /// Agent SVID lifetime, e.g. `1h`.
    pub agent_ttl: Option<String>,
    /// The shortest entry TTL, e.g. `30s` (lower only for tests that watch rotations).
    pub min_entry_ttl: Option<String>,
    /// Upstream CA certificate (PEM).
    pub upstream_ca_cert: Option<PathBuf>,
    /// Upstream CA key (PEM PKCS#8).
    pub upstream_ca_key: Option<PathBuf>,
}

impl Settings {
    /// Reads a TOML file.
    ///
    /// # Errors
    /// [`ConfigError::File`].
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        Ok(crate::config_file::read(path)?)
    }

    /// `self`, with every setting `over` has replacing ours.
    pub fn overridden_by(self, over: Settings) -> Settings {
        Settings {
            trust_domain: over.trust_domain.or(self.trust_domain),
            data_dir: over.data_dir.or(self.data_dir),
            bind: over.bind.or(self.bind),
            database: over.database.or(self.database),
            ca_ttl: over.ca_ttl.or(self.ca_ttl),
            agent_ttl: over.agent_ttl.or(self.agent_ttl),
            min_entry_ttl: over.min_entry_ttl.or(self.min_entry_ttl),
            upstream_ca_cert: over.upstream_ca_cert.or(self.upstream_ca_cert),
            upstream_ca_key: over.upstream_ca_key.or(self.upstream_ca_key),
        }
    }

    /// Validates the settings and fills the rest from the defaults.
    ///
    /// # Errors
    /// The [`ConfigError`] for the first bad setting.
    pub fn resolve(self) -> Result<ServerConfig, ConfigError> {
        let mut config = ServerConfig::with_defaults(
            self.data_dir
                .unwrap_or_else(|| PathBuf::from(defaults::DATA_DIR)),
        );
        if let Some(td) = self.trust_domain {
            config.trust_domain = td.parse::<TrustDomain>()?;
        }
        if let Some(bind) = self.bind {
            config.bind = bind.parse().map_err(|_| ConfigError::Bind(bind))?;
        }
        config.database = self.database;
        if let Some(ttl) = self.ca_ttl {
            config.ca_ttl = duration::parse(&ttl)?;
        }
        if let Some(ttl) = self.agent_ttl {
            config.agent_ttl = duration::parse(&ttl)?;
        }
        if let Some(ttl) = self.min_entry_ttl {
            config.min_entry_ttl = duration::parse(&ttl)?;
        }
        config.upstream_ca = match (self.upstream_ca_cert, self.upstream_ca_key) {
            (Some(cert_path), Some(key_path)) => Some(UpstreamCa {
                cert_path,
                key_path,
            }),
            (None, None) => None,
            _ => return Err(ConfigError::UpstreamIncomplete),
        };
        Ok(config)
    }
}
