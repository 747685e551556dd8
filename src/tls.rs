//! TLS for Mayfly's own connections: the node API's listener and the clients that call it.
//!
//! Peers are authenticated by SPIFFE ID, never by DNS name: each verifier picks the roots by the
//! trust domain of the peer's ID and applies the X509-SVID rules ([`crate::svid::verify_chain`]).
//! Configs are TLS 1.3 only, built with one explicit aws-lc-rs provider, and never resume
//! sessions: resumption would restore a peer identity without running the verifier again, so a
//! banned or expired peer could slip back in.

use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};

use crate::id::SpiffeId;
use crate::svid::{self, Bundles, Usage, VerifiedSvid};

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rustls refused the configuration or the key.
    #[error("TLS configuration failed: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The one crypto provider every Mayfly TLS config uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Trust bundles that can be replaced while connections use them.
pub type LiveBundles = Arc<RwLock<Bundles>>;

fn to_system_time(now: UnixTime) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(now.as_secs())
}

fn verify(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    bundles: &LiveBundles,
    usage: Usage,
    now: UnixTime,
) -> Result<VerifiedSvid, rustls::Error> {
    let mut chain = Vec::with_capacity(1 + intermediates.len());
    chain.push(end_entity.clone());
    chain.extend(intermediates.iter().cloned());
    let bundles = bundles.read().unwrap_or_else(|e| e.into_inner());
    svid::verify_chain(&chain, &bundles, usage, to_system_time(now))
        .map_err(|e| rustls::Error::General(e.to_string()))
}

/// The three signature methods of rustls' `ServerCertVerifier` and `ClientCertVerifier` for
/// Mayfly's configs, which are TLS 1.3 only: a TLS 1.2 signature never reaches a verifier and is
/// refused, a TLS 1.3 one is checked with the provider's algorithms. The argument is the path
/// below `self` of the verifier's `Arc<CryptoProvider>`, as in `tls13_only_signatures!(provider)`.
macro_rules! tls13_only_signatures {
    ($($provider:tt)+) => {
        fn verify_tls12_signature(
            &self,
            _message: &[u8],
            _cert: &rustls_pki_types::CertificateDer<'_>,
            _dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Err(rustls::Error::PeerIncompatible(
                rustls::PeerIncompatible::Tls12NotOffered,
            ))
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &rustls_pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.$($provider)+.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.$($provider)+
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}
pub(crate) use tls13_only_signatures;

/// Verifies SVIDs presented by TLS clients (agents). Client certificates are optional, since an
/// agent attests before it has one; each API decides whether the call needs a verified peer.
pub struct SvidClientVerifier {
    bundles: LiveBundles,
    provider: Arc<CryptoProvider>,
}

impl SvidClientVerifier {
    /// A verifier over `bundles`.
    pub fn new(bundles: LiveBundles, provider: Arc<CryptoProvider>) -> Self {
        Self { bundles, provider }
    }
}

impl fmt::Debug for SvidClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SvidClientVerifier")
    }
}

impl ClientCertVerifier for SvidClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        verify(end_entity, intermediates, &self.bundles, Usage::Client, now)?;
        Ok(ClientCertVerified::assertion())
    }

    tls13_only_signatures!(provider);
}

/// Verifies the server's SVID and that its SPIFFE ID is exactly the expected one.
pub struct SvidServerVerifier {
    bundles: LiveBundles,
    expected: SpiffeId,
    provider: Arc<CryptoProvider>,
}

impl SvidServerVerifier {
    /// A verifier that accepts only `expected`, chained to `bundles`.
    pub fn new(bundles: LiveBundles, expected: SpiffeId, provider: Arc<CryptoProvider>) -> Self {
        Self {
            bundles,
            expected,
            provider,
        }
    }
}

impl fmt::Debug for SvidServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SvidServerVerifier({})", self.expected)
    }
}

impl ServerCertVerifier for SvidServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let peer = verify(end_entity, intermediates, &self.bundles, Usage::Server, now)?;
        if peer.id.spiffe_id() != &self.expected {
            return Err(rustls::Error::General(format!(
                "the server presented {} but {} was expected",
                peer.id, self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    tls13_only_signatures!(provider);
}

/// A certificate and key that can be swapped while the config is in use, so an SVID rotates
/// without rebuilding listeners or dropping connections.
#[derive(Debug)]
pub struct RotatingCert {
    current: RwLock<Arc<CertifiedKey>>,
    provider: Arc<CryptoProvider>,
}

impl RotatingCert {
    /// Starts with `chain` (leaf first) and its PKCS#8 key.
    ///
    /// # Errors
    /// [`TlsError::Rustls`] when the key is not usable.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key_pkcs8: &[u8],
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, TlsError> {
        let certified = Self::certified(&provider, chain, key_pkcs8)?;
        Ok(Self {
            current: RwLock::new(Arc::new(certified)),
            provider,
        })
    }

    fn certified(
        provider: &CryptoProvider,
        chain: Vec<CertificateDer<'static>>,
        key_pkcs8: &[u8],
    ) -> Result<CertifiedKey, TlsError> {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pkcs8.to_vec()));
        let signing_key = provider.key_provider.load_private_key(key)?;
        Ok(CertifiedKey::new(chain, signing_key))
    }

    /// Replaces the certificate and key for new handshakes.
    ///
    /// # Errors
    /// [`TlsError::Rustls`] when the key is not usable; the old certificate stays.
    pub fn replace(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key_pkcs8: &[u8],
    ) -> Result<(), TlsError> {
        let certified = Arc::new(Self::certified(&self.provider, chain, key_pkcs8)?);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = certified;
        Ok(())
    }

    fn get(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl ResolvesServerCert for RotatingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

impl rustls::client::ResolvesClientCert for RotatingCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

const ALPN_H2: &[u8] = b"h2";

/// The node API's server config: its own rotating SVID, optional agent client certificates,
/// TLS 1.3, HTTP/2, no session resumption.
///
/// # Errors
/// [`TlsError::Rustls`] when rustls refuses the configuration.
pub fn node_server_config(
    cert: Arc<RotatingCert>,
    bundles: LiveBundles,
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let verifier = Arc::new(SvidClientVerifier::new(bundles, provider.clone()));
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// Accepts any server certificate. Only for `mayfly agent run --insecure-bootstrap`, whose first
/// connection has no bundle to check the server against: the agent then learns the bundle from
/// the server it happened to reach, which an attacker on the path could be. The handshake
/// signature is still checked, so the server at least holds the key of what it shows.
#[derive(Debug)]
pub struct InsecureBootstrapVerifier {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for InsecureBootstrapVerifier {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    tls13_only_signatures!(provider);
}

/// The client config of an insecure bootstrap: any server certificate, no client certificate,
/// TLS 1.3, HTTP/2, no resumption. See [`InsecureBootstrapVerifier`] for what this gives up.
///
/// # Errors
/// [`TlsError::Rustls`] when rustls refuses the configuration.
pub fn insecure_bootstrap_client_config() -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let verifier = Arc::new(InsecureBootstrapVerifier {
        provider: provider.clone(),
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// A client config that accepts only the server `expected` and presents `client_cert` when
/// given (an agent's SVID), TLS 1.3, HTTP/2, no session resumption.
///
/// # Errors
/// [`TlsError::Rustls`] when rustls refuses the configuration.
pub fn node_client_config(
    bundles: LiveBundles,
    expected: SpiffeId,
    client_cert: Option<Arc<RotatingCert>>,
) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let verifier = Arc::new(SvidServerVerifier::new(bundles, expected, provider.clone()));
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match client_cert {
        Some(cert) => builder.with_client_cert_resolver(cert),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}
