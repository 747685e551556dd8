//! mTLS for services: rustls configs whose peers are authenticated by X509-SVID and authorized
//! by SPIFFE ID and scope, fed live from the Workload API.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use mayfly::id::Scope;
//! use mayfly::mtls::{self, IdPattern, PeerPolicy, SvidSource};
//!
//! let source = SvidSource::connect("/run/mayfly/agent.sock", Duration::from_secs(10)).await?;
//! let policy = PeerPolicy::ids([IdPattern::parse("spiffe://acme.test/agents/*")?])?
//!     .require_scope(Scope::parse("stripe:write:refunds")?);
//! let mut config = mtls::server_config(&source, policy)?;
//! config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
//! let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
//! # let tcp: tokio::net::TcpStream = unimplemented!();
//! let tls = acceptor.accept(tcp).await?;
//! let peer = mtls::peer_of(tls.get_ref().1).expect("a verified peer");
//! println!("{} (serial {}) until {:?}", peer.id, peer.serial, peer.not_after);
//! # Ok(()) }
//! ```
//!
//! - [`SvidSource`]: the service's own SVID and the trust bundles, replaced on every Workload
//!   API message (or given in code), read at every handshake.
//! - [`server_config`] / [`client_config`]: TLS 1.3 only, the explicit aws-lc-rs provider,
//!   the service's SVID presented, the peer verified (below). ALPN is left empty for the
//!   caller to set. [`server_config_optional_client`] lets a client without a certificate
//!   through (the node API, where agents attest before they have an SVID).
//! - [`peer_of`]: the verified peer of a finished handshake, the one way to ask who a peer is.
//! - [`verify_chain`]: the same verification outside a handshake.
//! - [`insecure_bootstrap_client_config`]: the one exception, an agent's first attestation
//!   under `--insecure-bootstrap`.
//!
//! Both sides verify the peer in this fixed order, stopping at the first failure:
//!
//! 1. parse the leaf, bounded (at most [`crate::svid::MAX_CHAIN_LEN`] certificates, a leaf of
//!    at most [`crate::svid::MAX_LEAF_LEN`] bytes);
//! 2. take its SPIFFE ID from its one URI SAN and pick the roots of that ID's trust domain
//!    only (never one merged root store);
//! 3. apply the X509-SVID leaf rules: exactly one URI SAN, a SPIFFE ID with a path (both
//!    checked in step 2, which reads the ID), CA=false, digitalSignature and neither
//!    keyCertSign nor cRLSign;
//! 4. validate the chain with webpki at the handshake's time, for clientAuth (server side) or
//!    serverAuth (client side);
//! 5. authorize with the [`PeerPolicy`]: the identity (the ID without its scopes) against the
//!    allowed IDs, then every required scope, exactly.
//!
//! A refusal is `rustls::Error::InvalidCertificate(CertificateError::Other(..))` holding a
//! [`PeerError`] whose text names the rule broken. The server name a client dials is never
//! matched against the certificate: peers are their SPIFFE IDs, not DNS names.
//!
//! **No session resumption**, on either side. A resumed TLS 1.3 session skips the certificate
//! exchange, so the verifier would not run: a peer whose CA was removed from the bundle, whose
//! SVID expired, or that a new policy excludes could come back in on an old ticket. Servers
//! therefore store no sessions and issue no tickets, and clients never offer one; every
//! connection pays a full handshake, which is what makes trust and policy changes take effect
//! on the next connection.

mod any_domain;
mod bootstrap;
mod policy;
mod source;
mod verifier;

use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::crypto::CryptoProvider;
use rustls_pki_types::{CertificateDer, UnixTime};

pub use any_domain::any_domain_bootstrap_client_config;
pub use bootstrap::insecure_bootstrap_client_config;
pub use policy::{IdPattern, PeerPolicy, PolicyError, Refusal};
pub use source::{SvidSource, TrustSet};
use verifier::ClientAuth;
pub use verifier::PeerError;

use crate::id::ScopedId;
pub use crate::svid::Usage;
use crate::svid::{Serial, SvidError};

/// The one crypto provider every Mayfly TLS config uses: aws-lc-rs, named explicitly.
static PROVIDER: LazyLock<Arc<CryptoProvider>> =
    LazyLock::new(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));

/// The crypto provider of every config this module builds (aws-lc-rs).
pub fn provider() -> Arc<CryptoProvider> {
    PROVIDER.clone()
}

/// Why an mTLS config or source could not be built or made ready.
#[derive(Debug, thiserror::Error)]
pub enum MtlsError {
    /// rustls refused the configuration.
    #[error("the mTLS configuration was refused")]
    Tls(#[from] rustls::Error),
    /// The SVID given to a source is unusable (no SPIFFE ID, or a key that does not fit).
    #[error("the SVID cannot be used: {reason}")]
    BadSvid {
        /// What is wrong with it, in words.
        reason: &'static str,
        /// The lower layer's error that found it, if one did.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// A certificate of a trust bundle could not be used as a root.
    #[error("a certificate in the bundle of trust domain '{trust_domain}' is not a usable root")]
    BadBundle {
        /// The trust domain whose bundle held it.
        trust_domain: String,
        /// Why webpki refused it.
        #[source]
        source: webpki::Error,
    },
    /// The source got no SVID and bundle from the Workload API in time.
    #[error(
        "no SVID and trust bundle from the Workload API after {waited:?} (last problem: {last_error}); is the agent running and is this workload registered?"
    )]
    NotReady {
        /// How long it waited.
        waited: Duration,
        /// The last failure seen.
        last_error: String,
    },
}

/// A peer that completed an mTLS handshake: who it is, with what scopes, and its SVID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedPeer {
    /// Its SPIFFE ID: the identity ([`ScopedId::base`]) and the scopes it carries.
    pub id: ScopedId,
    /// Its leaf's serial number.
    pub serial: Serial,
    /// Its leaf's notAfter.
    pub not_after: SystemTime,
}

/// The server config of an mTLS listener: presents the source's SVID, requires a client SVID
/// that passes `policy`, TLS 1.3 only, no session storage and no tickets (see the module
/// documentation). Set `alpn_protocols` on the result as the service needs.
///
/// # Errors
/// [`MtlsError::Tls`] when rustls refuses the configuration.
pub fn server_config(
    source: &SvidSource,
    policy: PeerPolicy,
) -> Result<rustls::ServerConfig, MtlsError> {
    server_config_with(source, policy, ClientAuth::Required)
}

/// [`server_config`], except that a client may present no certificate at all: the handshake
/// then completes and [`peer_of`] answers `None`, so every request that needs an authenticated
/// peer must ask [`peer_of`] (the node API: an agent attests before it has an SVID). A client
/// that does present one is verified exactly as by [`server_config`], `policy` included.
///
/// # Errors
/// [`MtlsError::Tls`] when rustls refuses the configuration.
pub fn server_config_optional_client(
    source: &SvidSource,
    policy: PeerPolicy,
) -> Result<rustls::ServerConfig, MtlsError> {
    server_config_with(source, policy, ClientAuth::Optional)
}

/// The server config of a TLS listener whose clients authenticate otherwise (a proxy taking
/// only bearer JWT-SVIDs): presents the source's SVID and asks for no client certificate, so
/// [`peer_of`] always answers `None`. TLS 1.3 only, no session storage and no tickets, as
/// [`server_config`].
///
/// # Errors
/// [`MtlsError::Tls`] when rustls refuses the configuration.
pub fn server_config_no_client_auth(
    source: &SvidSource,
) -> Result<rustls::ServerConfig, MtlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(source.provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(source::SvidResolver(source.clone())));
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.max_early_data_size = 0;
    Ok(config)
}

fn server_config_with(
    source: &SvidSource,
    policy: PeerPolicy,
    auth: ClientAuth,
) -> Result<rustls::ServerConfig, MtlsError> {
    let verifier = Arc::new(verifier::SpiffeClientVerifier::new(
        source.clone(),
        policy,
        auth,
    ));
    let mut config = rustls::ServerConfig::builder_with_provider(source.provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(source::SvidResolver(source.clone())));
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.max_early_data_size = 0;
    Ok(config)
}

/// The client-certificate verifier [`server_config`] installs, on its own: for a server that
/// builds its own rustls config (another certificate resolver, its own session settings), and
/// for measuring the verifier without a handshake around it (`mayfly bench handshake`).
/// Whoever installs it alone keeps session resumption off, as [`server_config`] does.
pub fn client_cert_verifier(
    source: &SvidSource,
    policy: PeerPolicy,
) -> Arc<dyn rustls::server::danger::ClientCertVerifier> {
    Arc::new(verifier::SpiffeClientVerifier::new(
        source.clone(),
        policy,
        ClientAuth::Required,
    ))
}

/// The client config of an mTLS client: presents the source's SVID (none while the source holds
/// none, as one from [`SvidSource::trust_only`]), accepts only a server
/// whose SVID passes `expected_server` (its SPIFFE ID, never a DNS name: the server name given
/// to connect is only sent as SNI), TLS 1.3 only, no resumption. Set `alpn_protocols` on the
/// result as the service needs.
///
/// # Errors
/// [`MtlsError::Tls`] when rustls refuses the configuration.
pub fn client_config(
    source: &SvidSource,
    expected_server: PeerPolicy,
) -> Result<rustls::ClientConfig, MtlsError> {
    let verifier = Arc::new(verifier::SpiffeServerVerifier::new(
        source.clone(),
        expected_server,
    ));
    let mut config = rustls::ClientConfig::builder_with_provider(source.provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(source::SvidResolver(source.clone())));
    config.resumption = rustls::client::Resumption::disabled();
    config.enable_early_data = false;
    Ok(config)
}

/// The verified peer of a connection whose handshake completed with a config from this
/// module; `None` while it is still handshaking.
///
/// It is read back from the peer's leaf (`peer_certificates()`) rather than stored at
/// verification: the leaf is the very certificate the verifier accepted — resumption is off,
/// so it always comes from this handshake — and parsing it again costs microseconds, so the two
/// cannot diverge and no per-connection state is kept.
pub fn peer_of(connection: &rustls::CommonState) -> Option<VerifiedPeer> {
    if connection.is_handshaking() {
        return None;
    }
    let leaf = connection.peer_certificates()?.first()?;
    verifier::describe_leaf(leaf).ok()
}

/// Verifies `chain` (leaf first) at `now` as the verifiers of this module do in a handshake —
/// the same five steps, in the same order, by the same code — for a peer in role `usage`
/// (`Usage::Client`: the chain a TLS client presents). For checks outside a handshake: an
/// SVID just issued, a chain read from files.
///
/// # Errors
/// [`PeerError`] naming the first rule broken; [`SvidError::EmptyChain`] for no certificate.
pub fn verify_chain(
    chain: &[CertificateDer<'_>],
    trust: &TrustSet,
    usage: Usage,
    now: SystemTime,
    policy: &PeerPolicy,
) -> Result<VerifiedPeer, PeerError> {
    let (end_entity, intermediates) = chain.split_first().ok_or(SvidError::EmptyChain)?;
    let now = UnixTime::since_unix_epoch(now.duration_since(UNIX_EPOCH).unwrap_or_default());
    verifier::verify_peer(
        end_entity,
        intermediates,
        trust,
        policy,
        usage,
        &PROVIDER,
        now,
        None,
    )
}
