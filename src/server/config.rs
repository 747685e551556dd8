//! The server's settings: a TOML file, the environment and command-line flags merged once
//! (flags over environment over file), then validated into a [`ServerConfig`] with the defaults
//! filling what no layer set.

use std::path::{Path, PathBuf};

use crate::ca::UpstreamCa;
use crate::config_file::{ConfigFileError, Layer};
use crate::duration::{self, DurationError};
use crate::id::{IdError, TrustDomain};
use crate::server::node_attestors::{
    NodeAttestors, NodeAttestorsError, NodeAttestorsSettings, X509PopSettings,
};
use crate::server::oidc::{self, Issuer, OidcConfig, OidcConfigError};
use crate::server::{ServerConfig, defaults};

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The settings file could not be read or parsed.
    #[error(transparent)]
    File(#[from] ConfigFileError),
    /// The trust domain is malformed.
    #[error("bad trust domain")]
    TrustDomain(#[from] IdError),
    /// The bind address is malformed.
    #[error("'{0}' is not an address to listen on: write IP:PORT, such as 127.0.0.1:8081")]
    Bind(String),
    /// A duration setting is malformed.
    #[error("--{flag} ({key} in a config file)")]
    Duration {
        /// The flag that sets it.
        flag: &'static str,
        /// The config file key that sets it.
        key: &'static str,
        /// What is wrong with the value.
        source: DurationError,
    },
    /// A bound on refused attestations is not a positive number.
    #[error(
        "--{0} must be a positive number (refused attestations per source address); the defaults are 5 per second and a burst of 20"
    )]
    AttestLimit(&'static str),
    /// Only one of the upstream CA's two files was given.
    #[error("an upstream CA needs both its certificate and its key file; give both or neither")]
    UpstreamIncomplete,
    /// A setting of the OIDC discovery endpoint is refused.
    #[error(transparent)]
    Oidc(#[from] OidcConfigError),
    /// A node attestor's settings are refused.
    #[error(transparent)]
    NodeAttestors(#[from] NodeAttestorsError),
}

crate::settings_layer! {
    /// Every setting of `mayfly server run`, each optional: the same keys in the TOML file
    /// (`ca_ttl`), as flags (`--ca-ttl`) and as environment variables (`MAYFLY_SERVER_CA_TTL`).
    pub struct ServerSettings {
        /// Where the CA key, the SQLite file and the admin socket live [default: .mayfly/server].
        #[arg(long, env = "MAYFLY_SERVER_DATA_DIR")]
        pub data_dir: Option<PathBuf>,
        /// The trust domain [default: mayfly.local].
        #[arg(long, env = "MAYFLY_SERVER_TRUST_DOMAIN")]
        pub trust_domain: Option<String>,
        /// The node API address [default: 127.0.0.1:8081].
        #[arg(long, env = "MAYFLY_SERVER_BIND")]
        pub bind: Option<String>,
        /// A postgres:// URL to share one database between replicas [default: SQLite in the
        /// data dir].
        #[arg(long, env = "MAYFLY_SERVER_DATABASE", hide_env_values = true)]
        pub database: Option<String>,
        /// The CA lifetime, e.g. 7d [default: 7d].
        #[arg(long, env = "MAYFLY_SERVER_CA_TTL")]
        pub ca_ttl: Option<String>,
        /// The agent SVID lifetime, e.g. 1h or 1h30m [default: 1h].
        #[arg(long, env = "MAYFLY_SERVER_AGENT_TTL")]
        pub agent_ttl: Option<String>,
        /// The shortest TTL an entry may have [default: 30s]; lower only for tests that watch
        /// rotations, since the agent renews at half-life.
        #[arg(long, env = "MAYFLY_SERVER_MIN_ENTRY_TTL", hide = true)]
        pub min_entry_ttl: Option<String>,
        /// Sign Mayfly's CA with this upstream CA certificate (PEM).
        #[arg(long, env = "MAYFLY_SERVER_UPSTREAM_CA_CERT")]
        pub upstream_ca_cert: Option<PathBuf>,
        /// The upstream CA's key (PEM PKCS#8).
        #[arg(long, env = "MAYFLY_SERVER_UPSTREAM_CA_KEY")]
        pub upstream_ca_key: Option<PathBuf>,
        /// Refused attestations one source address may make per second, sustained, before it
        /// is answered ResourceExhausted [default: 5].
        #[arg(long, env = "MAYFLY_SERVER_ATTEST_RATE")]
        pub attest_rate: Option<f64>,
        /// Refused attestations one source address may make in a burst [default: 20].
        #[arg(long, env = "MAYFLY_SERVER_ATTEST_BURST")]
        pub attest_burst: Option<u32>,
        /// Serve OIDC discovery (/.well-known/openid-configuration and /keys) over HTTPS on
        /// this address, e.g. 0.0.0.0:8443 [default: off].
        #[arg(long, env = "MAYFLY_SERVER_OIDC_BIND")]
        pub oidc_bind: Option<String>,
        /// The issuer URL the discovery document names, https://HOST[:PORT]
        /// [default: https://<oidc bind address>].
        #[arg(long, env = "MAYFLY_SERVER_OIDC_ISSUER")]
        pub oidc_issuer: Option<String>,
        /// The discovery endpoint's certificate chain (PEM) [default: one issued by the
        /// server's CA for the issuer's host].
        #[arg(long, env = "MAYFLY_SERVER_OIDC_CERT")]
        pub oidc_cert: Option<PathBuf>,
        /// The key of --oidc-cert (PEM).
        #[arg(long, env = "MAYFLY_SERVER_OIDC_KEY")]
        pub oidc_key: Option<PathBuf>,
        /// Accept x509pop node attestation: node certificates must chain to these PEM CA
        /// certificates (`[node_attestors.x509pop] ca_bundle` in a config file).
        #[arg(long, env = "MAYFLY_SERVER_X509POP_CA_BUNDLE")]
        pub x509pop_ca_bundle: Option<PathBuf>,
        /// The node attestors besides join tokens: `[node_attestors.x509pop]`,
        /// `[node_attestors.sshpop]`, `[[node_attestors.k8s_psat.clusters]]`,
        /// `[node_attestors.aws_iid]` (config file only; see the README).
        #[arg(skip)]
        pub node_attestors: Option<NodeAttestorsSettings>,
    }
}

impl ServerSettings {
    /// These settings (from the command line) over the config file's, validated.
    ///
    /// # Errors
    /// The [`ConfigError`] for the file or the first bad setting.
    pub fn resolve_over(self, file: Option<&Path>) -> Result<ServerConfig, ConfigError> {
        self.over_file(file)?.resolve()
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
            config.ca_ttl = parse_duration("ca-ttl", "ca_ttl", &ttl)?;
        }
        if let Some(ttl) = self.agent_ttl {
            config.agent_ttl = parse_duration("agent-ttl", "agent_ttl", &ttl)?;
        }
        if let Some(ttl) = self.min_entry_ttl {
            config.min_entry_ttl = parse_duration("min-entry-ttl", "min_entry_ttl", &ttl)?;
        }
        if let Some(rate) = self.attest_rate {
            if !(rate.is_finite() && rate > 0.0) {
                return Err(ConfigError::AttestLimit("attest-rate"));
            }
            config.attest_limits.rate_per_sec = rate;
        }
        if let Some(burst) = self.attest_burst {
            if burst == 0 {
                return Err(ConfigError::AttestLimit("attest-burst"));
            }
            config.attest_limits.burst = burst;
        }
        config.upstream_ca = match (self.upstream_ca_cert, self.upstream_ca_key) {
            (Some(cert_path), Some(key_path)) => Some(UpstreamCa {
                cert_path,
                key_path,
            }),
            (None, None) => None,
            _ => return Err(ConfigError::UpstreamIncomplete),
        };
        config.oidc = resolve_oidc(
            self.oidc_bind,
            self.oidc_issuer,
            self.oidc_cert,
            self.oidc_key,
        )?;
        let mut attestors = self.node_attestors.unwrap_or_default();
        if let Some(ca_bundle) = self.x509pop_ca_bundle {
            attestors.x509pop = Some(X509PopSettings { ca_bundle });
        }
        config.node_attestors = NodeAttestors::from_settings(&attestors)?;
        Ok(config)
    }
}

/// The discovery endpoint's settings, checked: the address, the issuer, and the operator's
/// certificate read now, so a wrong file stops the server before it starts.
fn resolve_oidc(
    bind: Option<String>,
    issuer: Option<String>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
) -> Result<Option<OidcConfig>, OidcConfigError> {
    let Some(bind) = bind else {
        for (flag, given) in [
            ("oidc-issuer", issuer.is_some()),
            ("oidc-cert", cert.is_some()),
            ("oidc-key", key.is_some()),
        ] {
            if given {
                return Err(OidcConfigError::WithoutBind(flag));
            }
        }
        return Ok(None);
    };
    let bind = bind
        .parse()
        .map_err(|_| OidcConfigError::Bind(crate::text::escape_bounded(&bind, 120).into_owned()))?;
    let issuer = match issuer {
        Some(text) => Some(text.parse::<Issuer>()?),
        // Checked now rather than once bound: an unspecified address gives no issuer.
        None => Issuer::of_addr(bind).map(|_| None)?,
    };
    let cert = match (cert, key) {
        (Some(cert), Some(key)) => Some(oidc::tls::load_files(&cert, &key)?),
        (None, None) => None,
        _ => return Err(OidcConfigError::CertIncomplete),
    };
    Ok(Some(OidcConfig { bind, issuer, cert }))
}

fn parse_duration(
    flag: &'static str,
    key: &'static str,
    value: &str,
) -> Result<std::time::Duration, ConfigError> {
    duration::parse(value).map_err(|source| ConfigError::Duration { flag, key, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file_and_defaults_fill_the_rest() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(
            &mut file,
            b"trust_domain = \"file.test\"\nagent_ttl = \"1h30m\"\nbind = \"127.0.0.1:9\"\n",
        )
        .unwrap();
        let flags = ServerSettings {
            bind: Some("127.0.0.1:7".into()),
            ..ServerSettings::default()
        };
        let config = flags.resolve_over(Some(file.path())).unwrap();
        assert_eq!(config.trust_domain.as_str(), "file.test");
        assert_eq!(config.bind.port(), 7);
        assert_eq!(config.agent_ttl.as_secs(), 5400);
        assert_eq!(config.ca_ttl, defaults::CA_TTL);
    }

    #[test]
    fn attestation_bounds_are_positive_numbers() {
        let ok = ServerSettings {
            attest_rate: Some(0.5),
            attest_burst: Some(3),
            ..ServerSettings::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(ok.attest_limits.rate_per_sec, 0.5);
        assert_eq!(ok.attest_limits.burst, 3);
        for bad in [
            ServerSettings {
                attest_rate: Some(0.0),
                ..ServerSettings::default()
            },
            ServerSettings {
                attest_rate: Some(f64::NAN),
                ..ServerSettings::default()
            },
            ServerSettings {
                attest_burst: Some(0),
                ..ServerSettings::default()
            },
        ] {
            let err = bad.resolve().unwrap_err().to_string();
            assert!(err.contains("must be a positive number"), "{err}");
        }
    }

    #[test]
    fn the_discovery_endpoint_is_set_from_the_file_and_its_issuer_needs_its_address() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(
            &mut file,
            b"oidc_bind = \"127.0.0.1:8443\"\noidc_issuer = \"https://oidc.example.com/\"\n",
        )
        .unwrap();
        let config = ServerSettings::default()
            .resolve_over(Some(file.path()))
            .unwrap();
        let oidc = config.oidc.expect("the endpoint is on");
        assert_eq!(oidc.bind.port(), 8443);
        assert_eq!(
            oidc.issuer.expect("an issuer").as_str(),
            "https://oidc.example.com"
        );
        assert!(oidc.cert.is_none(), "self-issued when no files are given");
        assert!(ServerSettings::default().resolve().unwrap().oidc.is_none());

        let err = ServerSettings {
            oidc_issuer: Some("https://oidc.example.com".into()),
            ..ServerSettings::default()
        }
        .resolve()
        .unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::Oidc(OidcConfigError::WithoutBind("oidc-issuer"))
            ),
            "{err:?}"
        );
    }

    #[test]
    fn a_bad_duration_names_its_flag_and_key() {
        let err = ServerSettings {
            ca_ttl: Some("5 minutes".into()),
            ..ServerSettings::default()
        }
        .resolve()
        .unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::Duration {
                    flag: "ca-ttl",
                    key: "ca_ttl",
                    source: DurationError::Malformed(_)
                }
            ),
            "{err:?}"
        );
    }
}
