//! The agent's first attestation with a bundle whose roots name no trust domain: an upstream
//! CA (a corporate root, RSA or EC) carries no `spiffe://<td>` URI SAN, so the bundle alone
//! cannot say which trust domain's server to expect.
//!
//! The server's SVID says it instead, and is believed only once it has passed every check of
//! the verifier stack: the leaf's trust domain is taken as the one these roots serve, the chain
//! must verify against them (path, X509-SVID leaf rules, serverAuth), and the ID must be that
//! trust domain's server ID, `spiffe://<td>/mayfly/server`. A server whose SVID does not chain
//! to the roots is refused exactly as with a named trust domain. Operators who want to pin the
//! trust domain as well pass `mayfly agent run --trust-domain`, and the ordinary verifier is
//! used with it.

use std::sync::Arc;

use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::verifier::{describe_leaf, tls13_only_signatures, verify_peer};
use super::{MtlsError, PeerError, PeerPolicy, TrustSet, Usage};
use crate::id::TrustDomain;
use crate::svid::Bundles;

/// Accepts a Mayfly server of whatever trust domain its SVID names, if the SVID verifies
/// against `roots` as that trust domain's bundle.
#[derive(Debug)]
struct ServerOfAnyDomain {
    roots: Vec<CertificateDer<'static>>,
    /// The trust domain the server must be in, when the operator pinned one.
    expected: Option<TrustDomain>,
    provider: Arc<CryptoProvider>,
}

impl ServerOfAnyDomain {
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), PeerError> {
        let claimed = describe_leaf(end_entity)?;
        let td = claimed.id.base().trust_domain();
        let trust =
            TrustSet::new(Bundles::from([(td.clone(), self.roots.clone())])).map_err(|e| {
                refused(
                    "the bootstrap bundle holds a certificate that is not a root",
                    e,
                )
            })?;
        // The chain is checked first, so a refusal for the wrong trust domain is about a
        // server these roots do vouch for.
        let wanted = self.expected.as_ref().unwrap_or(&td);
        let policy = PeerPolicy::exact(crate::wire::server_id(wanted))
            .map_err(|e| refused("its trust domain has no server ID", e))?;
        verify_peer(
            end_entity,
            intermediates,
            &trust,
            &policy,
            Usage::Server,
            &self.provider,
            now,
            None,
        )?;
        Ok(())
    }
}

/// A refusal for a reason outside the leaf rules, with the error that found it.
fn refused<E: std::error::Error + Send + Sync + 'static>(reason: &str, e: E) -> PeerError {
    PeerError::Svid(crate::svid::SvidError::Malformed {
        reason: reason.to_owned(),
        source: Some(crate::svid::Cause::new(e)),
    })
}

impl ServerCertVerifier for ServerOfAnyDomain {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verify(end_entity, intermediates, now).map_err(|e| {
            tracing::info!(error = %crate::wire::error_chain(&e), "bootstrap: the server was refused");
            rustls::Error::from(e)
        })?;
        Ok(ServerCertVerified::assertion())
    }

    tls13_only_signatures!(provider);
}

/// The client config of a first attestation against `roots` that name no trust domain: the
/// server must present an SVID that verifies against `roots` and is the server ID of the trust
/// domain it names, which must be `expected` when given (see the module documentation). No client certificate is presented, TLS 1.3
/// only, no resumption; set `alpn_protocols` as needed.
///
/// # Errors
/// [`MtlsError::Tls`] when rustls refuses the configuration.
pub fn any_domain_bootstrap_client_config(
    roots: Vec<CertificateDer<'static>>,
    expected: Option<TrustDomain>,
) -> Result<rustls::ClientConfig, MtlsError> {
    let provider = super::provider();
    let verifier = Arc::new(ServerOfAnyDomain {
        roots,
        expected,
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
