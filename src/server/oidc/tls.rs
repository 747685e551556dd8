//! The discovery endpoint's serving certificate: the operator's (PEM files, typically from
//! their web PKI), or one the server issues itself from its own CA for the issuer's host, so a
//! client that trusts `mayfly bundle show` can fetch the documents.
//!
//! The self-issued certificate is not an X509-SVID: it carries the server's SPIFFE ID, but
//! also the DNS name or IP address clients dial (web PKI clients match only that), and it is
//! for serverAuth only.

use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyIdMethod,
    KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber, string::Ia5String,
};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::issuer::IssuerHost;
use super::{OidcConfigError, OidcError};
use crate::ca::Authority;
use crate::id::TrustDomain;
use crate::svid::{CLOCK_SKEW, LEAF_ORGANIZATION, Serial};
use crate::wire::server_id;

/// The most bytes read from either PEM file: a chain of a few certificates, or one key.
const MAX_PEM_LEN: u64 = 256 * 1024;

/// Reads the operator's certificate chain and key (PEM; the key PKCS#8, PKCS#1 or SEC1) and
/// checks that the key is the leaf's.
///
/// # Errors
/// [`OidcConfigError`] naming the file that cannot be read or holds no usable PEM, or the
/// mismatch.
pub fn load_files(cert_path: &Path, key_path: &Path) -> Result<Arc<CertifiedKey>, OidcConfigError> {
    let cert_pem = read_bounded(cert_path)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| OidcConfigError::Pem {
            path: cert_path.to_owned(),
            what: "a PEM certificate chain",
        })?;
    if chain.is_empty() {
        return Err(OidcConfigError::Pem {
            path: cert_path.to_owned(),
            what: "a PEM certificate chain",
        });
    }
    let key = PrivateKeyDer::from_pem_slice(&read_bounded(key_path)?).map_err(|_| {
        OidcConfigError::Pem {
            path: key_path.to_owned(),
            what: "a PEM private key",
        }
    })?;
    let mismatch = || OidcConfigError::KeyMismatch {
        cert: cert_path.to_owned(),
        key: key_path.to_owned(),
    };
    let certified =
        CertifiedKey::from_der(chain, key, &crate::mtls::provider()).map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => mismatch(),
            _ => OidcConfigError::Pem {
                path: key_path.to_owned(),
                what: "a private key rustls can sign with (ECDSA, Ed25519 or RSA)",
            },
        })?;
    // rustls lets a key whose public half it cannot compute through; refuse that too, since a
    // wrong key would only show as failed handshakes.
    certified.keys_match().map_err(|_| mismatch())?;
    Ok(Arc::new(certified))
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, OidcConfigError> {
    use std::io::Read as _;
    let unreadable = |source| OidcConfigError::Unreadable {
        path: path.to_owned(),
        source,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .map_err(unreadable)?
        .take(MAX_PEM_LEN)
        .read_to_end(&mut bytes)
        .map_err(unreadable)?;
    Ok(bytes)
}

/// Issues a serving certificate from `ca` for `host` (and `bind_ip` when it is a specific
/// address), valid for `ttl`; returns it with its key and its notAfter.
///
/// # Errors
/// [`OidcError::Certificate`] when the certificate cannot be made.
pub fn issue(
    ca: &Authority,
    td: &TrustDomain,
    host: &IssuerHost,
    bind_ip: IpAddr,
    ttl: Duration,
) -> Result<(Arc<CertifiedKey>, SystemTime), OidcError> {
    let fail = |what: &'static str| OidcError::Certificate(what);
    let now = SystemTime::now();
    let ca_end = ca.not_after();
    if ca_end <= now {
        return Err(fail("the CA has expired"));
    }
    let not_after = (now + ttl).min(ca_end);

    let mut sans = vec![SanType::URI(
        Ia5String::try_from(server_id(td).as_str()).map_err(|_| fail("the server's ID"))?,
    )];
    match host {
        IssuerHost::Dns(name) => sans.push(SanType::DnsName(
            Ia5String::try_from(name.as_str()).map_err(|_| fail("the issuer's host name"))?,
        )),
        IssuerHost::Ip(ip) => sans.push(SanType::IpAddress(*ip)),
    }
    if !bind_ip.is_unspecified() && host != &IssuerHost::Ip(bind_ip) {
        sans.push(SanType::IpAddress(bind_ip));
    }

    let mut subject = DistinguishedName::new();
    subject.push(DnType::OrganizationName, LEAF_ORGANIZATION);
    let serial = Serial::try_generate().map_err(|_| fail("no serial number could be drawn"))?;
    let mut params = CertificateParams::default();
    params.not_before = (now - CLOCK_SKEW).into();
    params.not_after = truncate_to_secs(not_after).into();
    params.serial_number = Some(SerialNumber::from_slice(serial.as_bytes()));
    params.subject_alt_names = sans;
    params.distinguished_name = subject;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.key_identifier_method = KeyIdMethod::Sha256;

    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|_| fail("no P-256 key could be generated"))?;
    let leaf = params
        .signed_by(&key, ca.issuer())
        .map_err(|_| fail("the CA could not sign it"))?;
    let mut chain = vec![CertificateDer::from(leaf)];
    chain.extend(ca.chain_tail().iter().cloned());
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let certified = CertifiedKey::from_der(chain, der, &crate::mtls::provider())
        .map_err(|_| fail("rustls refused its key"))?;
    Ok((Arc::new(certified), not_after))
}

/// Whole seconds: an X.509 time has no fraction.
fn truncate_to_secs(t: SystemTime) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs())
}

/// The certificate the listener presents, replaceable while it serves (the self-issued one is
/// renewed with the server's SVID); each handshake reads the current one.
#[derive(Debug, Clone)]
pub struct ServingCert(Arc<RwLock<Arc<CertifiedKey>>>);

impl ServingCert {
    /// Starts with `cert`.
    pub fn new(cert: Arc<CertifiedKey>) -> Self {
        Self(Arc::new(RwLock::new(cert)))
    }

    /// Presents `cert` from the next handshake on.
    pub fn set(&self, cert: Arc<CertifiedKey>) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = cert;
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.0
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        )
    }
}

/// The listener's TLS config: TLS 1.2 and 1.3 (cloud IAM fetchers are not all on 1.3), no
/// client certificate, HTTP/1.1, the explicit aws-lc-rs provider.
///
/// # Errors
/// [`OidcError::Tls`] when rustls refuses the configuration.
pub fn server_config(cert: ServingCert) -> Result<rustls::ServerConfig, OidcError> {
    let mut config = rustls::ServerConfig::builder_with_provider(crate::mtls::provider())
        .with_safe_default_protocol_versions()
        .map_err(OidcError::Tls)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(cert));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
