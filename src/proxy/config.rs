//! The proxy's configuration: a TOML file, command-line flags over it.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;

use serde::Deserialize;

use super::routes::{RouteError, Routes};
use super::{ProxyConfig, ProxyMode};
use crate::id::{IdError, Scope, SpiffeId};
use crate::mtls::{PeerPolicy, PolicyError};

/// Why the proxy's configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProxyConfigError {
    /// The settings file could not be read or parsed.
    #[error(transparent)]
    File(#[from] crate::config_file::ConfigFileError),
    /// A required address is missing.
    #[error("--{0} is required: give HOST:PORT")]
    Missing(&'static str),
    /// An address does not resolve.
    #[error("--{0} '{1}' is not an address: write HOST:PORT, such as 127.0.0.1:8443")]
    Address(&'static str, String),
    /// A route rule is malformed.
    #[error(transparent)]
    Route(#[from] RouteError),
    /// A required scope is malformed.
    #[error("--require-scope: {0}")]
    Scope(#[from] IdError),
    /// An allowed-ID pattern is malformed.
    #[error("--allow-id: {0}")]
    Policy(#[from] PolicyError),
    /// The proxy's own SPIFFE ID is malformed.
    #[error("--spiffe-id: {0}")]
    OwnId(IdError),
    /// Neither mode was chosen.
    #[error(
        "say what to enforce: --route 'METHOD /prefix scope' rules (HTTP mode) or --require-scope / --allow-id (TCP mode)"
    )]
    NoRules,
}

/// Every setting, each optional: the same keys in the TOML file and as flags.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySettings {
    /// Where to listen, HOST:PORT.
    pub listen: Option<String>,
    /// Where to forward, HOST:PORT.
    pub upstream: Option<String>,
    /// HTTP route rules, `METHOD /prefix scope`; any rule means HTTP mode.
    #[serde(default)]
    pub routes: Vec<String>,
    /// Scopes every peer must carry to complete the handshake.
    #[serde(default)]
    pub require_scopes: Vec<String>,
    /// SPIFFE IDs (exact, or ending in `/*`) allowed to connect; empty for any ID of the trust
    /// domain.
    #[serde(default)]
    pub allow_ids: Vec<String>,
    /// The Workload API socket the proxy gets its own SVID from.
    pub socket: Option<String>,
    /// Which of the proxy's SVIDs to present, when it has several.
    pub spiffe_id: Option<String>,
}

impl ProxySettings {
    /// Reads a TOML file.
    ///
    /// # Errors
    /// [`ProxyConfigError::File`].
    pub fn from_file(path: &Path) -> Result<Self, ProxyConfigError> {
        Ok(crate::config_file::read(path)?)
    }

    /// `self`, with every setting `over` has replacing ours (lists replace lists).
    pub fn overridden_by(self, over: ProxySettings) -> ProxySettings {
        let pick = |a: Vec<String>, b: Vec<String>| if a.is_empty() { b } else { a };
        ProxySettings {
            listen: over.listen.or(self.listen),
            upstream: over.upstream.or(self.upstream),
            routes: pick(over.routes, self.routes),
            require_scopes: pick(over.require_scopes, self.require_scopes),
            allow_ids: pick(over.allow_ids, self.allow_ids),
            socket: over.socket.or(self.socket),
            spiffe_id: over.spiffe_id.or(self.spiffe_id),
        }
    }

    /// Validates the settings.
    ///
    /// # Errors
    /// The [`ProxyConfigError`] for the first bad setting.
    pub fn resolve(self) -> Result<ProxyConfig, ProxyConfigError> {
        let listen = address("listen", self.listen)?;
        let upstream = address("upstream", self.upstream)?;
        let routes = Routes::parse(&self.routes)?;
        let scopes = self
            .require_scopes
            .iter()
            .map(|s| Scope::parse(s))
            .collect::<Result<Vec<_>, _>>()?;
        if routes.is_empty() && scopes.is_empty() && self.allow_ids.is_empty() {
            return Err(ProxyConfigError::NoRules);
        }
        let policy = if self.allow_ids.is_empty() {
            PeerPolicy::any_id()
        } else {
            PeerPolicy::parse_ids(&self.allow_ids)?
        }
        .require_scopes(scopes);
        let mode = if routes.is_empty() {
            ProxyMode::Tcp
        } else {
            ProxyMode::Http(routes)
        };
        let own_id = self
            .spiffe_id
            .map(|id| SpiffeId::parse(&id))
            .transpose()
            .map_err(ProxyConfigError::OwnId)?;
        Ok(ProxyConfig {
            listen,
            upstream,
            mode,
            policy,
            own_id,
        })
    }
}

fn address(flag: &'static str, value: Option<String>) -> Result<SocketAddr, ProxyConfigError> {
    let value = value.ok_or(ProxyConfigError::Missing(flag))?;
    value
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or(ProxyConfigError::Address(flag, value))
}
