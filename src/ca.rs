//! CA keys: create, load, and (later) rotate; an intermediate under an upstream CA.
//!
//! An [`Authority`] is one CA certificate and its P-256 key, kept in a directory as `ca.key`
//! (PKCS#8 PEM, mode 0600) and `ca.pem`. It is self-signed, or an intermediate signed by an
//! upstream CA loaded from disk. Its certificate follows the profile in DESIGN.md: URI SAN
//! `spiffe://<td>`, CA=true, keyCertSign + cRLSign, a subject key identifier, and no name
//! constraints (rustls-webpki fails closed on URI name constraints). A [`CaSet`] holds the
//! current authority and the ones around a rotation, and publishes the union of their roots.

use std::fmt;
use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyIdMethod,
    KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData as _, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer as _;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::files;
use crate::id::TrustDomain;
use crate::jwt::JwtSigner;
use crate::svid::{Bundles, CLOCK_SKEW, Serial};

/// The private key file in a CA directory.
pub(crate) const KEY_FILE: &str = "ca.key";
/// The certificate file in a CA directory.
pub(crate) const CERT_FILE: &str = "ca.pem";
/// A stored CA is reused only while it has more than this much life left.
pub(crate) const MIN_REMAINING_LIFE: Duration = Duration::from_secs(60);
/// A journaled CA is resumed while it has more than this left: the schedule replaces it in
/// time, and a CA TTL may be shorter than [`MIN_REMAINING_LIFE`] in tests.
const MIN_RESUMED_LIFE: Duration = Duration::from_secs(1);
/// The organization (O=) in the CA's subject.
pub(crate) const CA_ORGANIZATION: &str = "Mayfly";
/// The longest common name RFC 5280 allows (ub-common-name).
const MAX_COMMON_NAME_LEN: usize = 64;

/// Why the CA could not be created or loaded.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// Reading or writing a key or certificate file failed.
    #[error("could not {action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file held something that is not a usable key or certificate.
    #[error("{path} is not a usable {what}: {reason}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What it should hold.
        what: &'static str,
        /// Why it is not, in words.
        reason: String,
        /// The parser's or crypto library's error that found it, if one did.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// Key generation or signing failed.
    #[error("CA crypto failed while {step}")]
    Crypto {
        /// What was being done.
        step: &'static str,
        /// The crypto library's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A validity time cannot be written in a certificate.
    #[error("the time {0} (Unix seconds) cannot be written in a CA certificate")]
    TimeOutOfRange(u64),
    /// The CA lifetime asked for was under one second.
    #[error("the CA lifetime must be at least one second; give a longer CA TTL")]
    InvalidTtl,
}

/// An upstream CA given on disk: Mayfly's CA becomes an intermediate signed by it.
#[derive(Debug, Clone)]
pub struct UpstreamCa {
    /// PEM certificate of the upstream CA (the bundle's root).
    pub cert_path: PathBuf,
    /// PEM PKCS#8 private key of the upstream CA.
    pub key_path: PathBuf,
}

/// One signing authority: a CA certificate and its private key.
pub struct Authority {
    td: TrustDomain,
    cert: CertificateDer<'static>,
    chain_tail: Vec<CertificateDer<'static>>,
    bundle_roots: Vec<CertificateDer<'static>>,
    not_after_unix: u64,
    not_before_unix: u64,
    /// The CA's name, key identifier and signing key, parsed once for the issuing hot path.
    issuer: Issuer<'static, KeyPair>,
    /// The JWT-SVID signing key that lives and dies with this CA (see [`Authority::with_jwt`]).
    jwt: Option<Arc<JwtSigner>>,
}

impl fmt::Debug for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authority")
            .field("trust_domain", &self.td)
            .field("intermediate", &!self.chain_tail.is_empty())
            .field("not_after_unix", &self.not_after_unix)
            .finish_non_exhaustive()
    }
}

/// The upstream CA, loaded and checked.
struct LoadedUpstream {
    cert_path: PathBuf,
    cert: CertificateDer<'static>,
    /// The upstream's subject, DER, exactly as in its certificate.
    subject_raw: Vec<u8>,
    /// The upstream's SubjectPublicKeyInfo, DER.
    spki_raw: Vec<u8>,
    not_after_unix: u64,
    issuer: Issuer<'static, KeyPair>,
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CaError {
    let path = path.to_owned();
    move |source| CaError::Io {
        action,
        path,
        source,
    }
}

fn bad_file(path: &Path, what: &'static str, reason: impl Into<String>) -> CaError {
    CaError::BadFile {
        path: path.to_owned(),
        what,
        reason: reason.into(),
        source: None,
    }
}

/// [`CaError::BadFile`] found by a lower layer, whose error is kept as the source.
fn bad_file_because<E: std::error::Error + Send + Sync + 'static>(
    path: &Path,
    what: &'static str,
    reason: &'static str,
) -> impl FnOnce(E) -> CaError {
    move |e| CaError::BadFile {
        path: path.to_owned(),
        what,
        reason: reason.to_owned(),
        source: Some(Box::new(e)),
    }
}

/// [`CaError::Crypto`] while doing `step`.
fn crypto<E: std::error::Error + Send + Sync + 'static>(
    step: &'static str,
) -> impl FnOnce(E) -> CaError {
    move |e| CaError::Crypto {
        step,
        source: Box::new(e),
    }
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn cert_not_after(cert: &X509Certificate<'_>) -> u64 {
    u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0)
}

fn datetime(secs: u64) -> Result<OffsetDateTime, CaError> {
    i64::try_from(secs)
        .ok()
        .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
        .ok_or(CaError::TimeOutOfRange(secs))
}

/// The URI SANs of a certificate (empty when it has none or they cannot be parsed).
fn uri_sans<'a>(cert: &'a X509Certificate<'_>) -> Vec<&'a str> {
    match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(u) => Some(*u),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Whether the certificate says CA=true (a malformed or repeated extension counts as no).
fn is_ca(cert: &X509Certificate<'_>) -> bool {
    matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca)
}

/// Whether the certificate may sign certificates: CA=true and, if keyUsage is present,
/// keyCertSign.
fn can_sign_certs(cert: &X509Certificate<'_>) -> bool {
    is_ca(cert)
        && match cert.key_usage() {
            Ok(None) => true,
            Ok(Some(ku)) => ku.value.key_cert_sign(),
            Err(_) => false,
        }
}

fn parse_cert<'a>(
    der: &'a [u8],
    path: &Path,
    what: &'static str,
) -> Result<X509Certificate<'a>, CaError> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err(bad_file(path, what, "it has bytes after the certificate")),
        Err(e) => Err(bad_file_because(
            path,
            what,
            "it does not parse as a certificate",
        )(e)),
    }
}

/// Reads the one PEM certificate a file must hold.
fn read_one_cert(path: &Path, what: &'static str) -> Result<CertificateDer<'static>, CaError> {
    let pem = fs::read(path).map_err(io_error("read", path))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(bad_file_because(path, what, "it does not parse as PEM"))?;
    match <[_; 1]>::try_from(certs) {
        Ok([cert]) => Ok(cert),
        Err(certs) if certs.is_empty() => Err(bad_file(path, what, "it holds no PEM certificate")),
        Err(certs) => Err(bad_file(
            path,
            what,
            format!("it holds {} certificates; give only this CA's", certs.len()),
        )),
    }
}

impl LoadedUpstream {
    fn load(upstream: &UpstreamCa, now: u64) -> Result<Self, CaError> {
        const CERT: &str = "upstream CA certificate";
        const KEY: &str = "upstream CA private key";
        let cert = read_one_cert(&upstream.cert_path, CERT)?;
        let key_pem = fs::read(&upstream.key_path).map_err(io_error("read", &upstream.key_path))?;
        let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(bad_file_because(
            &upstream.key_path,
            KEY,
            "it holds no PEM private key",
        ))?;
        let key = KeyPair::try_from(&key_der).map_err(bad_file_because(
            &upstream.key_path,
            KEY,
            "it is not a key this CA can sign with",
        ))?;

        let parsed = parse_cert(&cert, &upstream.cert_path, CERT)?;
        if !can_sign_certs(&parsed) {
            return Err(bad_file(
                &upstream.cert_path,
                CERT,
                "it is not a CA certificate allowed to sign certificates (CA=true, keyCertSign)",
            ));
        }
        if key.subject_public_key_info() != parsed.public_key().raw {
            return Err(bad_file(
                &upstream.key_path,
                KEY,
                format!(
                    "it does not match the certificate in {}",
                    upstream.cert_path.display()
                ),
            ));
        }
        let not_after_unix = cert_not_after(&parsed);
        if not_after_unix <= now + MIN_REMAINING_LIFE.as_secs() {
            return Err(bad_file(
                &upstream.cert_path,
                CERT,
                "it has expired or expires within a minute; renew the upstream CA",
            ));
        }
        let subject_raw = parsed.subject().as_raw().to_vec();
        let spki_raw = parsed.public_key().raw.to_vec();
        drop(parsed);
        let issuer = Issuer::from_ca_cert_der(&cert, key).map_err(bad_file_because(
            &upstream.cert_path,
            CERT,
            "it cannot sign with its key",
        ))?;
        Ok(Self {
            cert_path: upstream.cert_path.clone(),
            cert,
            subject_raw,
            spki_raw,
            not_after_unix,
            issuer,
        })
    }
}

impl Authority {
    /// Loads the CA kept in `dir` (`ca.key`, mode 0600, and `ca.pem`), or creates one there when
    /// none exists or the stored one has expired. A self-signed CA for `td` unless `upstream`.
    ///
    /// A stored CA is reused when it has more than [`MIN_REMAINING_LIFE`] left, names `td`, and
    /// is signed the way asked for (by itself, or by `upstream`); otherwise a new one replaces
    /// it. Files are written to a temporary file and renamed, so neither is ever half-written;
    /// the key is created with mode 0600 whatever the umask, the directory is set to 0700.
    ///
    /// # Errors
    /// [`CaError`] when files cannot be read, written or parsed.
    pub fn load_or_create(
        dir: &Path,
        td: &TrustDomain,
        ttl: Duration,
        upstream: Option<&UpstreamCa>,
    ) -> Result<Self, CaError> {
        let now = unix_secs(SystemTime::now());
        let upstream = upstream.map(|u| LoadedUpstream::load(u, now)).transpose()?;
        let key_path = dir.join(KEY_FILE);
        let cert_path = dir.join(CERT_FILE);
        let key_exists = key_path
            .try_exists()
            .map_err(io_error("look for", &key_path))?;
        let cert_exists = cert_path
            .try_exists()
            .map_err(io_error("look for", &cert_path))?;
        if key_exists
            && cert_exists
            && let Some(ca) = Self::load(&key_path, &cert_path, td, upstream.as_ref(), now)?
        {
            return Ok(ca);
        }
        let ca = Self::create(td, ttl, upstream, now)?;
        write_ca_files(dir, &ca.issuer.key().serialize_pem(), &ca.certificate_pem())?;
        tracing::info!(
            trust_domain = %td,
            not_after = ca.not_after_unix,
            intermediate = !ca.chain_tail.is_empty(),
            dir = %dir.display(),
            "created a new CA"
        );
        Ok(ca)
    }

    /// Creates a self-signed CA for `td` in memory, valid from now for `ttl`, without writing
    /// anything (for tests, demos and a next CA prepared before it is persisted).
    ///
    /// # Errors
    /// [`CaError::InvalidTtl`] or [`CaError::Crypto`].
    pub fn generate(td: &TrustDomain, ttl: Duration) -> Result<Self, CaError> {
        Self::create(td, ttl, None, unix_secs(SystemTime::now()))
    }

    /// Creates a new CA for `td`, valid from now for `ttl` (capped by the upstream CA's
    /// notAfter), self-signed or signed by `upstream` (read from disk again, so a renewed
    /// upstream is picked up at the next rotation). Nothing is written.
    ///
    /// # Errors
    /// [`CaError`] when the upstream files are unusable or signing fails.
    pub fn create_with(
        td: &TrustDomain,
        ttl: Duration,
        upstream: Option<&UpstreamCa>,
    ) -> Result<Self, CaError> {
        let now = unix_secs(SystemTime::now());
        let upstream = upstream.map(|u| LoadedUpstream::load(u, now)).transpose()?;
        Self::create(td, ttl, upstream, now)
    }

    /// The journaled CA of certificate `der` whose key is the file `key_path`, if it is usable
    /// as is: key and certificate match, it names `td`, it is signed the way configured (by
    /// itself, or by `upstream`), and it has more than a second left. `None`
    /// otherwise.
    ///
    /// # Errors
    /// [`CaError`] when the key file cannot be read or the upstream files are unusable.
    pub fn resume(
        td: &TrustDomain,
        der: &[u8],
        key_path: &Path,
        upstream: Option<&UpstreamCa>,
    ) -> Result<Option<Self>, CaError> {
        let now = unix_secs(SystemTime::now());
        let upstream = upstream.map(|u| LoadedUpstream::load(u, now)).transpose()?;
        let cert = CertificateDer::from(der.to_vec());
        let parts = (key_path, cert, key_path);
        Self::from_parts(parts, td, upstream.as_ref(), now, MIN_RESUMED_LIFE)
    }

    /// Loads the CA of the layout before the journal (`ca.key` and `ca.pem` in `dir`) if it
    /// exists and is usable as is; `None` otherwise.
    ///
    /// # Errors
    /// [`CaError`] when the files cannot be read or the upstream files are unusable.
    pub fn load_legacy(
        dir: &Path,
        td: &TrustDomain,
        upstream: Option<&UpstreamCa>,
    ) -> Result<Option<Self>, CaError> {
        let now = unix_secs(SystemTime::now());
        let key_path = dir.join(KEY_FILE);
        let cert_path = dir.join(CERT_FILE);
        if !key_path.exists() || !cert_path.exists() {
            return Ok(None);
        }
        let upstream = upstream.map(|u| LoadedUpstream::load(u, now)).transpose()?;
        Self::load(&key_path, &cert_path, td, upstream.as_ref(), now)
    }

    /// The stored CA if it is usable as is; `None` when it must be replaced.
    fn load(
        key_path: &Path,
        cert_path: &Path,
        td: &TrustDomain,
        upstream: Option<&LoadedUpstream>,
        now: u64,
    ) -> Result<Option<Self>, CaError> {
        let cert = read_one_cert(cert_path, "CA certificate")?;
        let parts = (key_path, cert, cert_path);
        Self::from_parts(parts, td, upstream, now, MIN_REMAINING_LIFE)
    }

    /// The CA of the key file `key_path` and certificate `cert` (read from `cert_path`, named
    /// in errors), if it is usable as is with more than `min_left` to live; `None` when it
    /// must be replaced.
    fn from_parts(
        (key_path, cert, cert_path): (&Path, CertificateDer<'static>, &Path),
        td: &TrustDomain,
        upstream: Option<&LoadedUpstream>,
        now: u64,
        min_left: Duration,
    ) -> Result<Option<Self>, CaError> {
        const CERT: &str = "CA certificate";
        const KEY: &str = "CA private key (PKCS#8 PEM, P-256)";
        let key_pem = fs::read_to_string(key_path).map_err(io_error("read", key_path))?;
        let mode = fs::metadata(key_path)
            .map_err(io_error("inspect", key_path))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            tracing::warn!(path = %key_path.display(), mode = format!("{:o}", mode & 0o777), "the CA key file is readable by others; set its mode to 0600");
        }
        let key =
            KeyPair::from_pkcs8_pem_and_sign_algo(&key_pem, &PKCS_ECDSA_P256_SHA256).map_err(
                bad_file_because(key_path, KEY, "it is not a PKCS#8 PEM P-256 key"),
            )?;
        let parsed = parse_cert(&cert, cert_path, CERT)?;
        if key.subject_public_key_info() != parsed.public_key().raw {
            return Err(bad_file(
                key_path,
                KEY,
                format!(
                    "it does not match the certificate in {}",
                    cert_path.display()
                ),
            ));
        }
        if !can_sign_certs(&parsed) {
            return Err(bad_file(cert_path, CERT, "it is not a CA certificate"));
        }
        let not_after_unix = cert_not_after(&parsed);
        let not_before_unix = u64::try_from(parsed.validity().not_before.timestamp()).unwrap_or(0);
        if not_after_unix <= now + min_left.as_secs() {
            tracing::info!(path = %cert_path.display(), "the stored CA has expired or is about to; replacing it");
            return Ok(None);
        }
        let td_id = td.id();
        if uri_sans(&parsed) != [td_id.as_str()] {
            tracing::warn!(path = %cert_path.display(), trust_domain = %td, "the stored CA is not for this trust domain; replacing it");
            return Ok(None);
        }
        let signed_as_asked = match upstream {
            None => {
                parsed.issuer().as_raw() == parsed.subject().as_raw()
                    && parsed.verify_signature(None).is_ok()
            }
            Some(up) => {
                let (_, up_spki) = SubjectPublicKeyInfo::from_der(&up.spki_raw)
                    .map_err(crypto("reading the upstream CA's public key"))?;
                parsed.issuer().as_raw() == up.subject_raw.as_slice()
                    && parsed.verify_signature(Some(&up_spki)).is_ok()
            }
        };
        if !signed_as_asked {
            tracing::warn!(path = %cert_path.display(), "the stored CA is not signed by the configured upstream (or is not self-signed when no upstream is set); replacing it");
            return Ok(None);
        }
        drop(parsed);
        let issuer = Issuer::from_ca_cert_der(&cert, key).map_err(bad_file_because(
            cert_path,
            CERT,
            "it cannot sign with its key",
        ))?;
        let (chain_tail, bundle_roots) = match upstream {
            None => (Vec::new(), vec![cert.clone()]),
            Some(up) => (vec![cert.clone()], vec![up.cert.clone()]),
        };
        Ok(Some(Self {
            td: td.clone(),
            cert,
            chain_tail,
            bundle_roots,
            not_after_unix,
            not_before_unix,
            issuer,
            jwt: None,
        }))
    }

    /// Creates a new CA key and certificate, self-signed or signed by `upstream`.
    fn create(
        td: &TrustDomain,
        ttl: Duration,
        upstream: Option<LoadedUpstream>,
        now: u64,
    ) -> Result<Self, CaError> {
        if ttl.as_secs() == 0 {
            return Err(CaError::InvalidTtl);
        }
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(crypto("generating the CA key"))?;
        let mut not_after = now.saturating_add(ttl.as_secs());
        if let Some(up) = &upstream {
            not_after = not_after.min(up.not_after_unix);
        }
        let serial = Serial::try_generate().map_err(crypto("generating a serial number"))?;

        let mut common_name = format!("Mayfly CA {td}");
        common_name.truncate(MAX_COMMON_NAME_LEN);
        let mut subject = DistinguishedName::new();
        subject.push(DnType::OrganizationName, CA_ORGANIZATION);
        subject.push(DnType::CommonName, common_name);

        let td_uri = Ia5String::try_from(td.id().as_str())
            .map_err(crypto("writing the trust domain URI"))?;
        let mut params = CertificateParams::default();
        params.not_before = datetime(now.saturating_sub(CLOCK_SKEW.as_secs()))?;
        params.not_after = datetime(not_after)?;
        params.serial_number = Some(SerialNumber::from_slice(serial.as_bytes()));
        params.subject_alt_names = vec![SanType::URI(td_uri)];
        params.distinguished_name = subject;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.extended_key_usages = Vec::new();
        params.name_constraints = None;
        params.crl_distribution_points = Vec::new();
        params.custom_extensions = Vec::new();
        // RFC 5280 §4.2.1.1: every certificate but a self-signed one names its issuer's key.
        // An upstream root without a subject key identifier gets one derived from its public
        // key (rcgen's SHA-256 method); verifiers match it only against an SKI the root has.
        params.use_authority_key_identifier_extension = upstream.is_some();
        params.key_identifier_method = KeyIdMethod::Sha256;

        let cert = match &upstream {
            None => params.self_signed(&key),
            Some(up) => params.signed_by(&key, &up.issuer),
        }
        .map_err(crypto("signing the CA certificate"))?;
        let cert = CertificateDer::from(cert);

        if let Some(up) = &upstream {
            // rcgen rebuilds the issuer name from the parsed upstream subject; path building
            // compares names byte for byte, so make sure the rebuilt one is identical.
            let parsed = X509Certificate::from_der(&cert)
                .map_err(crypto("reading the new CA certificate"))?
                .1;
            let (_, up_spki) = SubjectPublicKeyInfo::from_der(&up.spki_raw)
                .map_err(crypto("reading the upstream CA's public key"))?;
            if parsed.issuer().as_raw() != up.subject_raw.as_slice()
                || parsed.verify_signature(Some(&up_spki)).is_err()
            {
                return Err(bad_file(
                    &up.cert_path,
                    "upstream CA certificate",
                    "its subject name cannot be reproduced byte for byte in the certificates it signs",
                ));
            }
        }

        let issuer =
            Issuer::from_ca_cert_der(&cert, key).map_err(crypto("making the CA an issuer"))?;
        let (chain_tail, bundle_roots) = match upstream {
            None => (Vec::new(), vec![cert.clone()]),
            Some(up) => (vec![cert.clone()], vec![up.cert]),
        };
        Ok(Self {
            td: td.clone(),
            cert,
            chain_tail,
            bundle_roots,
            not_after_unix: not_after,
            not_before_unix: now.saturating_sub(CLOCK_SKEW.as_secs()),
            issuer,
            jwt: None,
        })
    }

    /// This CA with `signer` as the JWT-SVID key it signs with while it is active. The server
    /// pairs each CA of its journal with one JWT key, so JWT keys follow the CA lifecycle.
    #[must_use]
    pub fn with_jwt(mut self, signer: JwtSigner) -> Self {
        self.jwt = Some(Arc::new(signer));
        self
    }

    /// The JWT-SVID key paired with this CA, if it has one.
    pub fn jwt_signer(&self) -> Option<&Arc<JwtSigner>> {
        self.jwt.as_ref()
    }

    /// This CA's certificate.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// This CA's certificate, PEM.
    pub fn certificate_pem(&self) -> String {
        pem_encode("CERTIFICATE", &self.cert)
    }

    /// Certificates to send after a leaf this CA signed: this CA's certificate when it is an
    /// intermediate (empty when it is self-signed, since the root is in the bundle).
    pub fn chain_tail(&self) -> &[CertificateDer<'static>] {
        &self.chain_tail
    }

    /// The roots this authority publishes in the trust bundle.
    pub fn bundle_roots(&self) -> &[CertificateDer<'static>] {
        &self.bundle_roots
    }

    /// When this CA expires.
    pub fn not_after(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.not_after_unix)
    }

    /// This CA's ID: the hex SHA-256 of its certificate's DER.
    pub fn id(&self) -> String {
        hex::encode(aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            &self.cert,
        ))
    }

    /// When this CA became valid, in whole seconds since the Unix epoch.
    pub(crate) fn not_before_unix(&self) -> u64 {
        self.not_before_unix
    }

    /// This CA's private key, PKCS#8 PEM (to keep in its key file).
    pub(crate) fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// The trust domain this CA signs for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.td
    }

    /// Whether this CA is an intermediate under an upstream CA.
    pub fn is_intermediate(&self) -> bool {
        !self.chain_tail.is_empty()
    }

    /// When this CA expires, in whole seconds since the Unix epoch.
    pub(crate) fn not_after_unix(&self) -> u64 {
        self.not_after_unix
    }

    /// The rcgen issuer (name, key identifier, signing key) leaves are signed with.
    pub(crate) fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }
}

/// PEM-encodes DER with 64-column lines.
fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}

/// Creates `dir` (0700) and writes the key (0600) and certificate (0644) atomically.
fn write_ca_files(dir: &Path, key_pem: &str, cert_pem: &str) -> Result<(), CaError> {
    files::create_dir(dir, 0o700)?;
    files::write_atomically(dir, KEY_FILE, key_pem.as_bytes(), 0o600)?;
    files::write_atomically(dir, CERT_FILE, cert_pem.as_bytes(), 0o644)?;
    Ok(())
}

/// The authorities of one trust domain around a rotation: the one that signs now, the next one
/// (published in the bundle before it signs anything), and previous ones whose leaves may still
/// be live. Readers take cheap `Arc` snapshots; rotation swaps them under a write lock.
pub struct CaSet {
    state: RwLock<CaSetState>,
}

struct CaSetState {
    current: Arc<Authority>,
    next: Option<Arc<Authority>>,
    previous: Vec<Arc<Authority>>,
}

impl fmt::Debug for CaSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.read();
        f.debug_struct("CaSet")
            .field("current", &state.current)
            .field("next", &state.next)
            .field("previous", &state.previous)
            .finish()
    }
}

impl CaSet {
    /// A set holding `current` and, published to follow it, `next`.
    pub fn from_arcs(current: Arc<Authority>, next: Option<Arc<Authority>>) -> Self {
        Self {
            state: RwLock::new(CaSetState {
                current,
                next,
                previous: Vec::new(),
            }),
        }
    }

    /// A set holding only `current`.
    pub fn new(current: Authority) -> Self {
        Self {
            state: RwLock::new(CaSetState {
                current: Arc::new(current),
                next: None,
                previous: Vec::new(),
            }),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, CaSetState> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, CaSetState> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// The authority that signs now.
    pub fn current(&self) -> Arc<Authority> {
        Arc::clone(&self.read().current)
    }

    /// The authority published to take over at the next rotation, if any.
    pub fn next(&self) -> Option<Arc<Authority>> {
        self.read().next.clone()
    }

    /// Publishes `next`: its roots join the bundle now; it signs after [`CaSet::activate_next`].
    pub fn publish_next(&self, next: Authority) {
        self.write().next = Some(Arc::new(next));
    }

    /// Makes the published next authority the current one; the old current one stays in the
    /// bundle as a previous authority. Returns `false` when no next authority was published.
    pub fn activate_next(&self) -> bool {
        let mut state = self.write();
        let Some(next) = state.next.take() else {
            return false;
        };
        let old = std::mem::replace(&mut state.current, next);
        state.previous.push(old);
        true
    }

    /// Replaces the authority that signs and the one published to follow it.
    pub fn set(&self, current: Arc<Authority>, next: Option<Arc<Authority>>) {
        let mut state = self.write();
        state.current = current;
        state.next = next;
        state.previous.clear();
    }

    /// Drops previous authorities that expired before `now`.
    pub fn prune_expired(&self, now: SystemTime) {
        self.write().previous.retain(|ca| ca.not_after() > now);
    }

    /// The union of the roots of every authority held (current first), without duplicates.
    pub fn bundle(&self) -> Vec<CertificateDer<'static>> {
        let state = self.read();
        let mut roots: Vec<CertificateDer<'static>> = Vec::new();
        let all = std::iter::once(&state.current)
            .chain(state.next.iter())
            .chain(state.previous.iter());
        for ca in all {
            for root in ca.bundle_roots() {
                if !roots.contains(root) {
                    roots.push(root.clone());
                }
            }
        }
        roots
    }

    /// [`CaSet::bundle`] keyed by the current authority's trust domain, ready for
    /// [`crate::mtls::verify_chain`].
    pub fn bundles(&self) -> Bundles {
        let td = self.read().current.trust_domain().clone();
        Bundles::from([(td, self.bundle())])
    }
}

impl From<files::FileError> for CaError {
    fn from(e: files::FileError) -> Self {
        Self::Io {
            action: e.action,
            path: e.path,
            source: e.source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn has_subject_key_id(cert: &X509Certificate<'_>) -> bool {
        cert.iter_extensions().any(|e| {
            matches!(
                e.parsed_extension(),
                x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(_)
            )
        })
    }

    fn td() -> TrustDomain {
        TrustDomain::new("ca.test").unwrap()
    }

    #[test]
    fn generated_ca_profile() {
        let ca = Authority::generate(&td(), Duration::from_secs(3600)).unwrap();
        let (_, cert) = X509Certificate::from_der(ca.certificate()).unwrap();
        assert!(is_ca(&cert));
        assert!(can_sign_certs(&cert));
        assert!(has_subject_key_id(&cert));
        assert_eq!(uri_sans(&cert), ["spiffe://ca.test"]);
        assert!(ca.chain_tail().is_empty());
        assert_eq!(ca.bundle_roots(), std::slice::from_ref(ca.certificate()));
        assert!(!ca.is_intermediate());
        let pem = ca.certificate_pem();
        assert_eq!(
            CertificateDer::from_pem_slice(pem.as_bytes()).unwrap(),
            *ca.certificate()
        );
    }

    #[test]
    fn shared_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Authority>();
        assert_send_sync::<CaSet>();
    }

    #[test]
    fn zero_ttl_is_refused() {
        assert!(matches!(
            Authority::generate(&td(), Duration::ZERO),
            Err(CaError::InvalidTtl)
        ));
    }

    #[test]
    fn ca_set_rotation_and_bundle() {
        let a = Authority::generate(&td(), Duration::from_secs(3600)).unwrap();
        let b = Authority::generate(&td(), Duration::from_secs(7200)).unwrap();
        let a_cert = a.certificate().clone();
        let b_cert = b.certificate().clone();
        let set = CaSet::new(a);
        assert_eq!(set.bundle(), vec![a_cert.clone()]);
        assert!(!set.activate_next());
        set.publish_next(b);
        assert_eq!(set.current().certificate(), &a_cert);
        assert_eq!(set.bundle(), vec![a_cert.clone(), b_cert.clone()]);
        assert!(set.activate_next());
        assert_eq!(set.current().certificate(), &b_cert);
        assert_eq!(set.bundle(), vec![b_cert.clone(), a_cert.clone()]);
        set.prune_expired(SystemTime::now() + Duration::from_secs(5000));
        assert_eq!(set.bundle(), vec![b_cert.clone()]);
        assert_eq!(set.bundles().get(&td()), Some(&vec![b_cert]));
    }
}
