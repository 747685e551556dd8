//! The agent's own identity: attested once with a join token, kept in the agent's data dir so
//! a restart needs no new token while the SVID is valid, and renewed at half its lifetime.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mayfly_attestors::NodeEvidence;
use rustls_pki_types::CertificateDer;

use super::link::ServerLink;
use crate::bundle;
use crate::client::{self, ClientError};
use crate::files::{self, FileError};
use crate::id::{SpiffeId, TrustDomain};
use crate::mtls::{self, MtlsError, SvidSource};
use crate::node_attest::NodeAttestError;
use crate::proto::node as pb;
use crate::server_set::ServerSet;
use crate::svid::{self, Bundles, KeyAndCsr};

const SVID_FILE: &str = "agent.pem";
const KEY_FILE: &str = "agent.key";
const BUNDLE_FILE: &str = "bundle.pem";

/// Why the agent could not obtain or keep its identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A file in the data dir could not be read or written.
    #[error(transparent)]
    File(#[from] FileError),
    /// A stored file is not what it should be.
    #[error("{path} is not usable; remove it to attest again, or fix the file")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The trust bundle given with `--trust-bundle` is not usable.
    #[error("the trust bundle {path} is not usable")]
    BadTrustBundle {
        /// The file.
        path: PathBuf,
        /// Why.
        source: bundle::BundleError,
    },
    /// The agent has no stored SVID and was given no node attestor's evidence.
    #[error(
        "the agent has no identity yet and nothing to attest with: pass a join token with --join-token (from `mayfly token generate`), or a node attestor with its evidence (e.g. --attestor x509pop --x509pop-cert FILE --x509pop-key FILE)"
    )]
    NoToken,
    /// This node could not produce its attestation evidence.
    #[error(transparent)]
    Evidence(#[from] mayfly_attestors::AttestError),
    /// The server could not be reached.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] MtlsError),
    /// The server refused the attestation or renewal.
    #[error("the server refused: {}", .0.message())]
    Refused(tonic::Status),
    /// The bootstrap trust bundle names no trust domain.
    #[error("the bootstrap trust bundle names no trust domain")]
    Bootstrap(#[source] bundle::BundleError),
    // Upstream CAs of any kind: the trust domain when the roots name none, or several.
    /// The roots name trust domains, and the pinned one (`--trust-domain`) is not among them.
    #[error(
        "--trust-domain {pinned} disagrees with the trust bundle, whose roots are for {named}; pass the bundle of that server, or fix --trust-domain"
    )]
    TrustDomainMismatch {
        /// The trust domain pinned.
        pinned: TrustDomain,
        /// The ones the roots name, comma-separated.
        named: String,
    },
    /// The roots name several trust domains and none was pinned.
    #[error(
        "the trust bundle's roots name several trust domains ({0}); pass --trust-domain to say which server to trust"
    )]
    AmbiguousTrustDomain(String),
    /// The server issued an SVID in a trust domain other than the one pinned.
    #[error(
        "the server issued an agent SVID in trust domain {got}, not {pinned}; it serves another trust domain than --trust-domain says"
    )]
    WrongTrustDomain {
        /// The trust domain pinned.
        pinned: TrustDomain,
        /// The one the SVID names.
        got: TrustDomain,
    },
    /// The server's answer could not be used.
    #[error("the server's answer was malformed")]
    BadAnswer(#[source] AgentSvidError),
    /// The server's attestation answers broke the protocol.
    #[error("the server's attestation answer was malformed: {0}")]
    Protocol(&'static str),
    /// The local key could not be generated.
    #[error("could not generate the agent key")]
    Key(#[source] svid::SvidError),
}

/// Why a chain, key and bundle (from the server or from the data dir) are no agent identity.
#[derive(Debug, thiserror::Error)]
pub enum AgentSvidError {
    /// The server's answer held no SVID.
    #[error("it holds no SVID")]
    NoSvid,
    /// The certificate chain holds no certificate.
    #[error("the certificate chain is empty")]
    EmptyChain,
    /// The leaf is not a usable X509-SVID.
    #[error("the leaf certificate is not a usable X509-SVID")]
    Leaf(#[source] svid::SvidError),
    /// The trust bundle holds no certificate.
    #[error("the trust bundle is empty")]
    EmptyBundle,
}

/// How the agent trusts the server before it has an SVID.
#[derive(Debug, Clone)]
pub enum Bootstrap {
    /// CA certificates (DER) of the server's trust domain, from `--trust-bundle`.
    Bundle(Vec<Vec<u8>>),
    /// Trust whatever server answers the first time (`--insecure-bootstrap`).
    Insecure,
}

impl Bootstrap {
    /// Reads a PEM bundle file (the output of `mayfly bundle show`).
    ///
    /// # Errors
    /// [`IdentityError`] when the file cannot be read or holds no usable CA certificate.
    pub(crate) fn from_pem_file(path: &Path) -> Result<Self, IdentityError> {
        let text = std::fs::read(path).map_err(files::io_error("read", path))?;
        let certs = bundle::from_pem(&text).map_err(|source| IdentityError::BadTrustBundle {
            path: path.to_owned(),
            source,
        })?;
        // Every root must parse; a SPIFFE URI SAN is welcome but not required, since an
        // upstream CA's root usually has none (see `bootstrap_trust_domain`).
        for cert in &certs {
            bundle::trust_domain_named(cert).map_err(|source| IdentityError::BadTrustBundle {
                path: path.to_owned(),
                source,
            })?;
        }
        Ok(Self::Bundle(certs))
    }
}

/// The agent's SVID, its key, and the trust bundle that came with it.
#[derive(Clone)]
pub(crate) struct AgentSvid {
    /// The agent's SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// DER certificates, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// PKCS#8 private key, generated by this agent.
    pub key_pkcs8: Vec<u8>,
    /// The leaf's notBefore.
    pub not_before: SystemTime,
    /// The leaf's notAfter.
    pub not_after: SystemTime,
    /// DER CA certificates of the trust domain.
    pub bundle: Vec<Vec<u8>>,
}

impl std::fmt::Debug for AgentSvid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentSvid")
            .field("spiffe_id", &self.spiffe_id)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl AgentSvid {
    fn new(
        chain: Vec<Vec<u8>>,
        key_pkcs8: Vec<u8>,
        bundle: Vec<Vec<u8>>,
    ) -> Result<Self, AgentSvidError> {
        let leaf = chain.first().ok_or(AgentSvidError::EmptyChain)?;
        let cert = svid::parse_leaf(leaf).map_err(AgentSvidError::Leaf)?;
        let spiffe_id = svid::leaf_spiffe_id(&cert).map_err(AgentSvidError::Leaf)?;
        let (_, not_after) = svid::serial_and_not_after(&cert).map_err(AgentSvidError::Leaf)?;
        let not_before = UNIX_EPOCH
            + Duration::from_secs(
                u64::try_from(cert.validity().not_before.timestamp()).unwrap_or(0),
            );
        if bundle.is_empty() {
            return Err(AgentSvidError::EmptyBundle);
        }
        Ok(Self {
            spiffe_id,
            not_before,
            not_after,
            chain,
            key_pkcs8,
            bundle,
        })
    }

    /// The trust domain the agent belongs to.
    pub fn trust_domain(&self) -> TrustDomain {
        self.spiffe_id.trust_domain()
    }

    /// When to renew: half-way through the SVID's life, counted from its issuance. The
    /// server backdates notBefore by [`crate::svid::CLOCK_SKEW`] to absorb clock drift; counting
    /// from notBefore would renew a short-lived SVID at once, and again at every round.
    pub(crate) fn renew_at(&self) -> SystemTime {
        let issued = (self.not_before + crate::svid::CLOCK_SKEW).min(self.not_after);
        let life = self.not_after.duration_since(issued).unwrap_or_default();
        issued + life / 2
    }

    /// Whether the SVID is still valid at `now`.
    pub(crate) fn is_valid_at(&self, now: SystemTime) -> bool {
        now < self.not_after
    }

    /// The chain as rustls wants it.
    pub fn cert_chain(&self) -> Vec<CertificateDer<'static>> {
        self.chain
            .iter()
            .map(|c| CertificateDer::from(c.clone()))
            .collect()
    }

    /// The bundle, keyed by trust domain, for the TLS verifiers.
    pub fn bundles(&self) -> Bundles {
        client::bundle_map(&self.trust_domain(), &self.bundle)
    }
}

/// The agent's files in its data dir: `agent.pem` (chain), `agent.key` (0600), `bundle.pem`.
#[derive(Debug, Clone)]
pub(crate) struct IdentityFiles {
    dir: PathBuf,
}

impl IdentityFiles {
    /// The files in `dir`.
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
        }
    }

    /// The stored identity, if there is one.
    ///
    /// # Errors
    /// [`IdentityError`] when the files exist but cannot be read or parsed.
    pub fn load(&self) -> Result<Option<AgentSvid>, IdentityError> {
        let svid_path = self.dir.join(SVID_FILE);
        if !svid_path.exists() {
            return Ok(None);
        }
        let read = |name: &str| {
            let path = self.dir.join(name);
            std::fs::read(&path).map_err(files::io_error("read", &path))
        };
        let bad = |name: &str| {
            let path = self.dir.join(name);
            move |e: Box<dyn std::error::Error + Send + Sync>| IdentityError::BadFile {
                path,
                source: e,
            }
        };
        let chain = bundle::from_pem(&read(SVID_FILE)?).map_err(|e| bad(SVID_FILE)(e.into()))?;
        let key = {
            use rustls_pki_types::PrivatePkcs8KeyDer;
            use rustls_pki_types::pem::PemObject;
            PrivatePkcs8KeyDer::from_pem_slice(&read(KEY_FILE)?)
                .map_err(|e| bad(KEY_FILE)(e.into()))?
                .secret_pkcs8_der()
                .to_vec()
        };
        let bundle =
            bundle::from_pem(&read(BUNDLE_FILE)?).map_err(|e| bad(BUNDLE_FILE)(e.into()))?;
        AgentSvid::new(chain, key, bundle)
            .map(Some)
            .map_err(|e| bad(SVID_FILE)(e.into()))
    }

    /// Stores `svid`: the key first, so a stored chain always has its key beside it.
    ///
    /// # Errors
    /// [`IdentityError::File`] when a file cannot be written.
    pub(crate) fn save(&self, svid: &AgentSvid) -> Result<(), IdentityError> {
        files::create_dir(&self.dir, 0o700)?;
        let key_pem = bundle::pem_block("PRIVATE KEY", &svid.key_pkcs8);
        files::write_atomically(&self.dir, KEY_FILE, key_pem.as_bytes(), 0o600)?;
        files::write_atomically(
            &self.dir,
            SVID_FILE,
            bundle::to_pem(&svid.chain).as_bytes(),
            0o644,
        )?;
        self.save_bundle(&svid.bundle)
    }

    /// Stores a newer trust bundle.
    ///
    /// # Errors
    /// [`IdentityError::File`] when the file cannot be written.
    pub(crate) fn save_bundle(&self, certs: &[Vec<u8>]) -> Result<(), IdentityError> {
        files::create_dir(&self.dir, 0o700)?;
        files::write_atomically(
            &self.dir,
            BUNDLE_FILE,
            bundle::to_pem(certs).as_bytes(),
            0o644,
        )?;
        Ok(())
    }

    /// Removes the stored SVID and key (after the server forgot the agent).
    pub(crate) fn forget(&self) {
        let _ = std::fs::remove_file(self.dir.join(SVID_FILE));
        let _ = std::fs::remove_file(self.dir.join(KEY_FILE));
    }
}

/// Where a bootstrap bundle's trust domain comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BootstrapTrust {
    /// The roots name it (in a URI SAN `spiffe://<td>`), and a pin agrees.
    Named(TrustDomain),
    /// The roots name none (an upstream CA's): the server's SVID names it, believed once it
    /// verifies against the roots (see [`mtls::any_domain_bootstrap_client_config`]), and it
    /// must be the pinned one when one is given.
    FromServer(Option<TrustDomain>),
}

/// Where the trust domain of a bootstrap bundle's server comes from, given the pin
/// (`--trust-domain`, or the trust domain of the agent's previous SVID).
///
/// # Errors
/// [`IdentityError::Bootstrap`] for a root that does not parse,
/// [`IdentityError::TrustDomainMismatch`] when the roots name trust domains and the pin is not
/// among them, [`IdentityError::AmbiguousTrustDomain`] when they name several and there is no
/// pin.
pub(crate) fn bootstrap_trust(
    certs: &[Vec<u8>],
    pinned: Option<&TrustDomain>,
) -> Result<BootstrapTrust, IdentityError> {
    let mut named = std::collections::BTreeSet::new();
    for cert in certs {
        if let Some(td) = bundle::trust_domain_named(cert).map_err(IdentityError::Bootstrap)? {
            named.insert(td);
        }
    }
    let list = || {
        named
            .iter()
            .map(TrustDomain::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    match (pinned, named.len()) {
        (pinned, 0) => Ok(BootstrapTrust::FromServer(pinned.cloned())),
        (Some(td), _) if named.contains(td) => Ok(BootstrapTrust::Named(td.clone())),
        (Some(td), _) => Err(IdentityError::TrustDomainMismatch {
            pinned: td.clone(),
            named: list(),
        }),
        (None, 1) => Ok(BootstrapTrust::Named(
            named.into_iter().next().expect("one element"),
        )),
        (None, _) => Err(IdentityError::AmbiguousTrustDomain(list())),
    }
}

/// Attests to one of `servers` (the first that answers) with `evidence`, trusting it as
/// `bootstrap` says, in trust domain `pinned` when given. Any server will do: they share one
/// store, so a join token is spent once whichever consumes it, and a challenge is answered on
/// the stream of the server that asked it.
///
/// # Errors
/// [`IdentityError`] when no server can be reached, or the server refuses or answers nonsense.
pub(crate) async fn attest(
    servers: &Arc<ServerSet>,
    bootstrap: &Bootstrap,
    evidence: Arc<dyn NodeEvidence>,
    pinned: Option<&TrustDomain>,
) -> Result<AgentSvid, IdentityError> {
    let key = KeyAndCsr::generate().map_err(IdentityError::Key)?;
    let mut node = match bootstrap {
        Bootstrap::Bundle(certs) => match bootstrap_trust(certs, pinned)? {
            BootstrapTrust::Named(td) => {
                // No agent SVID yet: the source holds only the bundle, so no certificate is
                // sent.
                let source = SvidSource::trust_only(client::bundle_map(&td, certs))?;
                client::connect_node_servers(servers, &source, &crate::wire::server_id(&td))
                    .await?
                    .0
            }
            BootstrapTrust::FromServer(expected) => {
                let roots = certs.iter().cloned().map(CertificateDer::from).collect();
                let mut config = mtls::any_domain_bootstrap_client_config(roots, expected)?;
                config.alpn_protocols = vec![b"h2".to_vec()];
                client::connect_node_any(servers, config).await?.0
            }
        },
        Bootstrap::Insecure => {
            let mut config = mtls::insecure_bootstrap_client_config()?;
            config.alpn_protocols = vec![b"h2".to_vec()];
            client::connect_node_any(servers, config).await?.0
        }
    };
    let answer = crate::node_attest::attest(&mut node, evidence, key.csr)
        .await
        .map_err(|e| match e {
            NodeAttestError::Refused(status) => IdentityError::Refused(status),
            NodeAttestError::Evidence(e) => IdentityError::Evidence(e),
            NodeAttestError::Protocol(what) => IdentityError::Protocol(what),
        })?;
    let svid = from_answer(answer.svid, key.key_pkcs8, answer.bundle)?;
    if let Some(pinned) = pinned
        && svid.trust_domain() != *pinned
    {
        return Err(IdentityError::WrongTrustDomain {
            pinned: pinned.clone(),
            got: svid.trust_domain(),
        });
    }
    Ok(svid)
}

/// Renews the agent SVID over `link`: a new key, a new SVID. The caller swaps the certificate
/// and reconnects; the server accepts the old SVID until the new one is first used. A renewal
/// whose server is lost is asked once more of another server (with the same key: the SVID the
/// lost server may have signed was never delivered, and the newer request supersedes it).
///
/// # Errors
/// [`IdentityError`] when the server refuses or answers nonsense.
pub(crate) async fn renew(link: &ServerLink) -> Result<AgentSvid, IdentityError> {
    let key = KeyAndCsr::generate().map_err(IdentityError::Key)?;
    let answer = link
        .call_with_failover("the agent SVID's renewal", |mut node| {
            let csr = key.csr.clone();
            async move {
                node.renew_agent(pb::RenewAgentRequest { csr })
                    .await
                    .map(tonic::Response::into_inner)
            }
        })
        .await
        .map_err(IdentityError::Refused)?;
    from_answer(answer.svid, key.key_pkcs8, answer.bundle)
}

/// The agent identity in an attestation or renewal answer, with the key made for it.
fn from_answer(
    svid: Option<pb::Svid>,
    key_pkcs8: Vec<u8>,
    bundle: Vec<Vec<u8>>,
) -> Result<AgentSvid, IdentityError> {
    let svid = svid.ok_or(IdentityError::BadAnswer(AgentSvidError::NoSvid))?;
    AgentSvid::new(svid.cert_chain, key_pkcs8, bundle).map_err(IdentityError::BadAnswer)
}
