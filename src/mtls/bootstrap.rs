//! The one verifier outside the stack: `mayfly agent run --insecure-bootstrap`'s very first
//! attestation, which has no bundle to check the server against.

use std::sync::Arc;

use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::MtlsError;
use super::verifier::tls13_only_signatures;

/// Accepts any server certificate. The agent then learns the bundle from the server it happened
/// to reach, which an attacker on the path could be. The handshake signature is still checked,
/// so the server at least holds the key of the certificate it shows.
#[derive(Debug)]
struct AnyServerCertificate {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AnyServerCertificate {
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

/// The client config of an insecure bootstrap: **any server certificate is accepted**, no
/// client certificate is presented, TLS 1.3 only, no resumption. Only for an agent's first
/// attestation under `--insecure-bootstrap`, which the agent announces with a loud warning;
/// every later connection uses [`super::client_config`]. Set `alpn_protocols` as needed.
///
/// # Errors
/// [`MtlsError::Tls`] when rustls refuses the configuration.
pub fn insecure_bootstrap_client_config() -> Result<rustls::ClientConfig, MtlsError> {
    let provider = super::provider();
    let verifier = Arc::new(AnyServerCertificate {
        provider: provider.clone(),
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    config.enable_early_data = false;
    Ok(config)
}
