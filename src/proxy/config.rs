//! The proxy's settings: a TOML file, the environment and command-line flags merged once
//! (flags over environment over file), then validated into a [`ProxyConfig`].

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

use super::routes::{RouteError, Routes};
use super::{Accept, BearerPolicy, ProxyConfig, ProxyMode};
use crate::config_file::{ConfigFileError, Layer};
use crate::id::{IdError, Scope, SpiffeId};
use crate::mtls::{PeerPolicy, PolicyError};

/// Why the proxy's configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProxyConfigError {
    /// The settings file could not be read or parsed.
    #[error(transparent)]
    File(#[from] ConfigFileError),
    /// The agent socket's address is malformed.
    #[error(transparent)]
    Socket(#[from] crate::workload_client::WorkloadClientError),
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
    #[error("--require-scope")]
    Scope(#[from] IdError),
    /// An allowed-ID pattern is malformed.
    #[error("--allow-id")]
    Policy(#[from] PolicyError),
    /// The proxy's own SPIFFE ID is malformed.
    #[error("--spiffe-id: {0}")]
    OwnId(IdError),
    /// `--accept` names something other than x509 and jwt.
    #[error("--accept '{0}' is not a credential: write x509, jwt or x509,jwt")]
    Accept(String),
    /// Bearer tokens were asked for without an audience.
    #[error(
        "--accept jwt needs --audience: the audience tokens must name to be accepted here, such as --audience https://refunds.internal"
    )]
    NoAudience,
    /// `--audience` or `--single-use` without bearer tokens.
    #[error("--{0} applies to bearer tokens only: add --accept jwt (or x509,jwt) or remove it")]
    JwtOnly(&'static str),
    /// Bearer tokens in TCP mode.
    #[error(
        "--accept jwt needs HTTP mode: a bearer token travels in an HTTP header, so give --route rules (TCP mode can only check certificates)"
    )]
    JwtNeedsHttp,
    /// Neither mode was chosen.
    #[error(
        "say what to enforce: --route 'METHOD /prefix scope' rules (HTTP mode) or --require-scope / --allow-id (TCP mode)"
    )]
    NoRules,
}

crate::settings_layer! {
    /// Every setting of `mayfly proxy`, each optional: the same keys in the TOML file
    /// (`require_scopes`), as flags (`--require-scope`, repeated) and, for single values, as
    /// environment variables (`MAYFLY_PROXY_LISTEN`).
    pub struct ProxySettings {
        /// Where to listen for mTLS clients, HOST:PORT.
        #[arg(long, env = "MAYFLY_PROXY_LISTEN")]
        pub listen: Option<String>,
        /// Where to forward, HOST:PORT (plain TCP or HTTP).
        #[arg(long, env = "MAYFLY_PROXY_UPSTREAM")]
        pub upstream: Option<String>,
        /// HTTP mode: 'METHOD /prefix scope' ('*' any method, '-' no scope); first match wins,
        /// no match is a 403.
        #[arg(long = "route")]
        #[serde(default)]
        pub routes: Vec<String>,
        /// A scope every client must carry, checked in the handshake (repeat for several).
        #[arg(long = "require-scope")]
        #[serde(default)]
        pub require_scopes: Vec<String>,
        /// A SPIFFE ID allowed to connect, exact or ending in /* (repeat for several).
        #[arg(long = "allow-id")]
        #[serde(default)]
        pub allow_ids: Vec<String>,
        /// The agent's socket the proxy gets its own SVID from [default: SPIFFE_ENDPOINT_SOCKET,
        /// else .mayfly/agent.sock].
        #[arg(long, env = "MAYFLY_PROXY_SOCKET")]
        pub socket: Option<String>,
        /// Which of the proxy's identities to present, when its process matches several entries.
        #[arg(long, env = "MAYFLY_PROXY_SPIFFE_ID")]
        pub spiffe_id: Option<String>,
        /// Which client credentials authenticate: x509 (client certificates, the default), jwt
        /// (Authorization: Bearer JWT-SVIDs, HTTP mode) or x509,jwt (a certificate if the client
        /// presents one, else a bearer token).
        #[arg(long, value_delimiter = ',')]
        #[serde(default)]
        pub accept: Vec<String>,
        /// The audience a bearer token must name (required with --accept jwt).
        #[arg(long, env = "MAYFLY_PROXY_AUDIENCE")]
        pub audience: Option<String>,
        /// Accept each bearer token once: a jti seen before is refused until the token's exp.
        #[arg(
            long,
            num_args = 0..=1,
            default_missing_value = "true",
            value_name = "BOOL"
        )]
        pub single_use: Option<bool>,
    }
}

/// A proxy ready to start: what it enforces, and the agent socket its own SVID comes from.
#[derive(Debug, Clone)]
pub struct ProxySetup {
    /// What the proxy listens on, forwards to and enforces.
    pub config: ProxyConfig,
    /// The Workload API socket of the proxy's own agent.
    pub socket: PathBuf,
}

impl ProxySettings {
    /// These settings (from the command line) over the config file's, validated, with the
    /// agent socket found (the setting, else `SPIFFE_ENDPOINT_SOCKET`, else the default).
    ///
    /// # Errors
    /// The [`ProxyConfigError`] for the file or the first bad setting.
    pub fn resolve_over(self, file: Option<&Path>) -> Result<ProxySetup, ProxyConfigError> {
        let settings = self.over_file(file)?;
        let socket = crate::workload_client::socket_path(
            settings.socket.as_deref(),
            Path::new(crate::workload_client::DEFAULT_SOCKET),
        )?;
        Ok(ProxySetup {
            config: settings.resolve()?,
            socket,
        })
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
        let accept = accept(
            &self.accept,
            self.audience,
            self.single_use.unwrap_or(false),
        )?;
        if accept.jwt.is_some() && matches!(mode, ProxyMode::Tcp) {
            return Err(ProxyConfigError::JwtNeedsHttp);
        }
        Ok(ProxyConfig {
            listen,
            upstream,
            mode,
            policy,
            own_id,
            accept,
        })
    }
}

/// `--accept` with `--audience` and `--single-use`, checked together.
fn accept(
    names: &[String],
    audience: Option<String>,
    single_use: bool,
) -> Result<Accept, ProxyConfigError> {
    let mut accept = Accept {
        x509: names.is_empty(),
        jwt: None,
    };
    let mut jwt = false;
    for name in names.iter().flat_map(|n| n.split(',')).map(str::trim) {
        match name {
            "x509" => accept.x509 = true,
            "jwt" => jwt = true,
            other => {
                return Err(ProxyConfigError::Accept(
                    crate::text::escape_bounded(other, 40).into_owned(),
                ));
            }
        }
    }
    match (jwt, audience) {
        (true, Some(audience)) if !audience.trim().is_empty() => {
            accept.jwt = Some(BearerPolicy {
                audience,
                single_use,
            });
        }
        (true, _) => return Err(ProxyConfigError::NoAudience),
        (false, Some(_)) => return Err(ProxyConfigError::JwtOnly("audience")),
        (false, None) if single_use => return Err(ProxyConfigError::JwtOnly("single-use")),
        (false, None) => {}
    }
    Ok(accept)
}

fn address(flag: &'static str, value: Option<String>) -> Result<SocketAddr, ProxyConfigError> {
    let value = value.ok_or(ProxyConfigError::Missing(flag))?;
    value
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or(ProxyConfigError::Address(flag, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(accept: &[&str], audience: Option<&str>, single_use: bool) -> ProxySettings {
        ProxySettings {
            listen: Some("127.0.0.1:0".into()),
            upstream: Some("127.0.0.1:1".into()),
            routes: vec!["GET / a:read".into()],
            accept: accept.iter().map(|s| (*s).to_owned()).collect(),
            audience: audience.map(str::to_owned),
            single_use: Some(single_use),
            ..Default::default()
        }
    }

    #[test]
    fn accept_defaults_to_x509_and_takes_jwt_with_an_audience() {
        let config = settings(&[], None, false).resolve().unwrap();
        assert_eq!(config.accept, Accept::default());
        let config = settings(&["x509,jwt"], Some("aud"), true)
            .resolve()
            .unwrap();
        assert!(config.accept.x509);
        assert_eq!(
            config.accept.jwt,
            Some(BearerPolicy {
                audience: "aud".into(),
                single_use: true
            })
        );
        let config = settings(&["jwt"], Some("aud"), false).resolve().unwrap();
        assert!(!config.accept.x509);
    }

    #[test]
    fn bearer_settings_without_their_counterpart_are_refused_in_one_sentence() {
        let e = settings(&["jwt"], None, false).resolve().unwrap_err();
        assert!(matches!(e, ProxyConfigError::NoAudience), "{e}");
        assert!(
            e.to_string().contains("--accept jwt needs --audience"),
            "{e}"
        );
        let e = settings(&["x509"], Some("aud"), false)
            .resolve()
            .unwrap_err();
        assert!(matches!(e, ProxyConfigError::JwtOnly("audience")), "{e}");
        let e = settings(&[], None, true).resolve().unwrap_err();
        assert!(matches!(e, ProxyConfigError::JwtOnly("single-use")), "{e}");
        let e = settings(&["x509,oidc"], None, false).resolve().unwrap_err();
        assert!(e.to_string().contains("'oidc' is not a credential"), "{e}");
        // TCP mode cannot carry a token; its positive control is the same settings with routes.
        let mut tcp = settings(&["jwt"], Some("aud"), false);
        tcp.routes.clear();
        tcp.require_scopes = vec!["a:read".into()];
        let e = tcp.resolve().unwrap_err();
        assert!(matches!(e, ProxyConfigError::JwtNeedsHttp), "{e}");
    }

    #[test]
    fn the_toml_keys_accept_audience_and_single_use_are_read() {
        let file: ProxySettings = toml::from_str(
            r#"listen = "127.0.0.1:0"
upstream = "127.0.0.1:1"
routes = ["GET / a:read"]
accept = ["x509", "jwt"]
audience = "aud"
single_use = true
"#,
        )
        .unwrap();
        let config = file.resolve().unwrap();
        assert!(config.accept.x509);
        assert_eq!(
            config.accept.jwt,
            Some(BearerPolicy {
                audience: "aud".into(),
                single_use: true
            })
        );
    }
}
