//! The CA on disk: file modes (under a wide-open umask, which is process-wide, hence this
//! separate test binary), reload after a restart, replacement, refusal of bad files, the CA
//! certificate's profile, and an intermediate CA under an upstream root.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use mayfly::ca::{Authority, CaError, CaSet, UpstreamCa};
use mayfly::id::{ScopedId, SpiffeId, TrustDomain};
use mayfly::mtls::{self, PeerError, PeerPolicy, TrustSet, Usage, VerifiedPeer};
use mayfly::svid::{self, Bundles, KeyAndCsr, LeafSpec, Serial};
use nix::sys::stat::{Mode, umask};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use tempfile::TempDir;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::OID_X509_EXT_NAME_CONSTRAINTS;
use x509_parser::prelude::FromDer;

const HOUR: Duration = Duration::from_secs(3600);
const WEEK: Duration = Duration::from_secs(7 * 24 * 3600);

/// Tests in this binary share the process umask; they run one at a time.
static UMASK: Mutex<()> = Mutex::new(());

fn serial_lock() -> MutexGuard<'static, ()> {
    UMASK.lock().unwrap_or_else(PoisonError::into_inner)
}

fn td() -> TrustDomain {
    TrustDomain::new("acme.test").unwrap()
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn parse(der: &[u8]) -> X509Certificate<'_> {
    X509Certificate::from_der(der).unwrap().1
}

fn ski(cert: &X509Certificate<'_>) -> Option<Vec<u8>> {
    cert.iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        })
}

fn aki(cert: &X509Certificate<'_>) -> Option<Vec<u8>> {
    cert.iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(a) => {
                a.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        })
}

/// Checks the CA certificate profile of DESIGN.md.
fn assert_ca_profile(der: &[u8]) {
    let cert = parse(der);
    let bc = cert.basic_constraints().unwrap().expect("basicConstraints");
    assert!(bc.critical);
    assert!(bc.value.ca);
    let ku = cert.key_usage().unwrap().expect("keyUsage");
    assert!(ku.critical);
    assert!(ku.value.key_cert_sign() && ku.value.crl_sign());
    assert_eq!(ku.value.flags, 0b110_0000, "keyCertSign + cRLSign only");
    assert!(ski(&cert).is_some(), "subject key identifier");
    let san = cert.subject_alternative_name().unwrap().expect("SAN");
    let uris: Vec<_> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    assert_eq!(uris, ["spiffe://acme.test"]);
    assert!(
        cert.get_extension_unique(&OID_X509_EXT_NAME_CONSTRAINTS)
            .unwrap()
            .is_none(),
        "no name constraints"
    );
    assert!(cert.extended_key_usage().unwrap().is_none());
    let subject = cert.subject().to_string();
    assert!(
        subject.contains("O=Mayfly") && subject.contains("CN=Mayfly CA acme.test"),
        "{subject}"
    );
    assert_eq!(cert.raw_serial().len(), 16);
    assert_eq!(
        cert.signature_algorithm.algorithm,
        x509_parser::oid_registry::OID_SIG_ECDSA_WITH_SHA256
    );
}

fn issue_leaf(ca: &Authority) -> Vec<CertificateDer<'static>> {
    let kc = KeyAndCsr::generate().unwrap();
    let key = svid::parse_csr(&kc.csr).unwrap();
    let id = ScopedId::new(
        SpiffeId::parse("spiffe://acme.test/agents/bot").unwrap(),
        Default::default(),
    )
    .unwrap();
    svid::issue(
        ca,
        &LeafSpec {
            id: &id,
            key: &key,
            ttl: Duration::from_secs(300),
            dns_names: &[],
        },
        SystemTime::now(),
    )
    .unwrap()
    .chain
}

/// The one verifier, `mtls::verify_chain`, over `bundles` with no policy beyond them.
fn verify_chain(
    chain: &[CertificateDer<'_>],
    bundles: &Bundles,
    usage: Usage,
    now: SystemTime,
) -> Result<VerifiedPeer, PeerError> {
    let trust = TrustSet::new(bundles.clone()).expect("usable roots");
    mtls::verify_chain(chain, &trust, usage, now, &PeerPolicy::any_id())
}

fn bundle_of(roots: &[CertificateDer<'static>]) -> Bundles {
    Bundles::from([(td(), roots.to_vec())])
}

#[test]
fn key_is_0600_even_under_umask_000() {
    let _guard = serial_lock();
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("server").join("ca");
    let old = umask(Mode::empty());
    let result = Authority::load_or_create(&dir, &td(), WEEK, None);
    umask(old);
    let ca = result.unwrap();
    assert_eq!(mode(&dir.join("ca.key")), 0o600);
    assert_eq!(mode(&dir.join("ca.pem")), 0o644);
    assert_eq!(mode(&dir), 0o700);
    // Nothing left over from the atomic writes.
    let mut names: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["ca.key", "ca.pem"]);
    assert!(
        fs::read_to_string(dir.join("ca.key"))
            .unwrap()
            .starts_with("-----BEGIN PRIVATE KEY-----")
    );
    assert_ca_profile(ca.certificate());
}

#[test]
fn reload_after_restart_yields_the_same_ca() {
    let _guard = serial_lock();
    let tmp = TempDir::new().unwrap();
    let first = Authority::load_or_create(tmp.path(), &td(), WEEK, None).unwrap();
    let key_before = fs::read(tmp.path().join("ca.key")).unwrap();
    let second = Authority::load_or_create(tmp.path(), &td(), WEEK, None).unwrap();
    assert_eq!(first.certificate(), second.certificate());
    assert_eq!(first.not_after(), second.not_after());
    assert_eq!(key_before, fs::read(tmp.path().join("ca.key")).unwrap());
    assert!(second.chain_tail().is_empty());
    assert_eq!(
        second.bundle_roots(),
        std::slice::from_ref(second.certificate())
    );
    // The reloaded CA signs leaves the first one's bundle trusts.
    let chain = issue_leaf(&second);
    assert!(
        verify_chain(
            &chain,
            &bundle_of(first.bundle_roots()),
            Usage::Client,
            SystemTime::now()
        )
        .is_ok()
    );

    // Another directory gets another CA.
    let other_dir = TempDir::new().unwrap();
    let other = Authority::load_or_create(other_dir.path(), &td(), WEEK, None).unwrap();
    assert_ne!(other.certificate(), first.certificate());
    assert!(
        verify_chain(
            &chain,
            &bundle_of(other.bundle_roots()),
            Usage::Client,
            SystemTime::now()
        )
        .is_err()
    );
}

#[test]
fn a_ca_about_to_expire_or_for_another_trust_domain_is_replaced() {
    let _guard = serial_lock();
    let tmp = TempDir::new().unwrap();
    // 30 s of life: less than the minute a stored CA must have left.
    let short =
        Authority::load_or_create(tmp.path(), &td(), Duration::from_secs(30), None).unwrap();
    let renewed = Authority::load_or_create(tmp.path(), &td(), WEEK, None).unwrap();
    assert_ne!(short.certificate(), renewed.certificate());
    // Control: a healthy one is kept.
    let kept = Authority::load_or_create(tmp.path(), &td(), WEEK, None).unwrap();
    assert_eq!(kept.certificate(), renewed.certificate());
    // Another trust domain: replaced, for that trust domain.
    let other_td = TrustDomain::new("other.test").unwrap();
    let other = Authority::load_or_create(tmp.path(), &other_td, WEEK, None).unwrap();
    assert_ne!(other.certificate(), renewed.certificate());
    assert_eq!(other.trust_domain(), &other_td);
}

#[test]
fn bad_files_are_refused() {
    let _guard = serial_lock();
    let tmp = TempDir::new().unwrap();
    Authority::load_or_create(tmp.path(), &td(), WEEK, None).unwrap();
    let key_path = tmp.path().join("ca.key");
    let cert_path = tmp.path().join("ca.pem");
    let good_key = fs::read(&key_path).unwrap();
    let good_cert = fs::read(&cert_path).unwrap();

    // A key that does not match the certificate.
    let stranger = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    fs::write(&key_path, stranger.serialize_pem()).unwrap();
    let err = Authority::load_or_create(tmp.path(), &td(), WEEK, None).unwrap_err();
    assert!(
        matches!(&err, CaError::BadFile { path, .. } if *path == key_path),
        "{err}"
    );
    fs::write(&key_path, &good_key).unwrap();

    // A key file that is not a key.
    fs::write(&key_path, "not a key").unwrap();
    let err = Authority::load_or_create(tmp.path(), &td(), WEEK, None).unwrap_err();
    assert!(
        matches!(&err, CaError::BadFile { path, .. } if *path == key_path),
        "{err}"
    );
    fs::write(&key_path, &good_key).unwrap();

    // A certificate file that is not a certificate.
    fs::write(
        &cert_path,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let err = Authority::load_or_create(tmp.path(), &td(), WEEK, None).unwrap_err();
    assert!(
        matches!(&err, CaError::BadFile { path, .. } if *path == cert_path),
        "{err}"
    );
    fs::write(&cert_path, &good_cert).unwrap();

    // Control: the restored pair loads.
    Authority::load_or_create(tmp.path(), &td(), WEEK, None).unwrap();
}

/// An upstream root made with rcgen, written as PEM; returns its paths and certificate.
fn write_upstream_root(dir: &Path, life: time::Duration) -> (UpstreamCa, CertificateDer<'static>) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Upstream Corp");
    params
        .distinguished_name
        .push(DnType::CommonName, "Upstream Root");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + life;
    params.serial_number = Some(SerialNumber::from_slice(Serial::generate().as_bytes()));
    let cert = params.self_signed(&key).unwrap();
    let cert_path = dir.join("upstream.pem");
    let key_path = dir.join("upstream.key");
    fs::write(&cert_path, cert.pem()).unwrap();
    fs::write(&key_path, key.serialize_pem()).unwrap();
    (
        UpstreamCa {
            cert_path,
            key_path,
        },
        cert.der().clone(),
    )
}

#[test]
fn intermediate_under_an_upstream_root() {
    let _guard = serial_lock();
    let tmp = TempDir::new().unwrap();
    let (upstream, root) = write_upstream_root(tmp.path(), time::Duration::hours(2));
    let ca_dir = tmp.path().join("ca");
    let ca = Authority::load_or_create(&ca_dir, &td(), WEEK, Some(&upstream)).unwrap();

    assert!(ca.is_intermediate());
    assert_ca_profile(ca.certificate());
    let cert = parse(ca.certificate());
    let root_parsed = parse(&root);
    assert_eq!(cert.issuer().as_raw(), root_parsed.subject().as_raw());
    cert.verify_signature(Some(root_parsed.public_key()))
        .expect("signed by the upstream");
    assert_eq!(aki(&cert), ski(&root_parsed), "AKI is the upstream's SKI");
    assert_eq!(ca.chain_tail(), std::slice::from_ref(ca.certificate()));
    assert_eq!(ca.bundle_roots(), std::slice::from_ref(&root));
    // The CA cannot outlive its upstream.
    assert!(ca.not_after() <= SystemTime::now() + 2 * HOUR);
    assert!(cert.validity().not_after.timestamp() <= root_parsed.validity().not_after.timestamp());

    // A leaf verifies against a bundle holding only the upstream root.
    let chain = issue_leaf(&ca);
    assert_eq!(chain.len(), 2);
    assert_eq!(&chain[1], ca.certificate());
    let now = SystemTime::now();
    assert!(
        verify_chain(
            &chain,
            &bundle_of(std::slice::from_ref(&root)),
            Usage::Server,
            now
        )
        .is_ok()
    );
    // Without the intermediate in the chain it does not.
    assert!(
        verify_chain(
            &chain[..1],
            &bundle_of(std::slice::from_ref(&root)),
            Usage::Server,
            now
        )
        .is_err()
    );

    // Restart: the same intermediate is reused.
    let again = Authority::load_or_create(&ca_dir, &td(), WEEK, Some(&upstream)).unwrap();
    assert_eq!(again.certificate(), ca.certificate());
    // Dropping the upstream: replaced by a self-signed CA.
    let alone = Authority::load_or_create(&ca_dir, &td(), WEEK, None).unwrap();
    assert!(!alone.is_intermediate());
    assert_ne!(alone.certificate(), ca.certificate());
    // A new upstream: a new intermediate under it.
    let tmp2 = TempDir::new().unwrap();
    let (upstream2, root2) = write_upstream_root(tmp2.path(), time::Duration::days(30));
    let under2 = Authority::load_or_create(&ca_dir, &td(), WEEK, Some(&upstream2)).unwrap();
    assert_eq!(under2.bundle_roots(), std::slice::from_ref(&root2));
    let chain = issue_leaf(&under2);
    assert!(
        verify_chain(
            &chain,
            &bundle_of(std::slice::from_ref(&root2)),
            Usage::Client,
            now
        )
        .is_ok()
    );
}

#[test]
fn bad_upstreams_are_refused() {
    let _guard = serial_lock();
    let tmp = TempDir::new().unwrap();
    let (upstream, _root) = write_upstream_root(tmp.path(), time::Duration::hours(2));
    // Control.
    Authority::load_or_create(&tmp.path().join("ok"), &td(), WEEK, Some(&upstream)).unwrap();

    // Key that does not match.
    let stranger = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let wrong_key = tmp.path().join("wrong.key");
    fs::write(&wrong_key, stranger.serialize_pem()).unwrap();
    let bad = UpstreamCa {
        cert_path: upstream.cert_path.clone(),
        key_path: wrong_key.clone(),
    };
    let err =
        Authority::load_or_create(&tmp.path().join("a"), &td(), WEEK, Some(&bad)).unwrap_err();
    assert!(
        matches!(&err, CaError::BadFile { path, .. } if *path == wrong_key),
        "{err}"
    );

    // Not a CA.
    let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::new(vec!["leaf.test".to_owned()]).unwrap();
    params.is_ca = IsCa::ExplicitNoCa;
    let leaf = params.self_signed(&leaf_key).unwrap();
    let leaf_cert = tmp.path().join("leaf.pem");
    let leaf_key_path = tmp.path().join("leaf.key");
    fs::write(&leaf_cert, leaf.pem()).unwrap();
    fs::write(&leaf_key_path, leaf_key.serialize_pem()).unwrap();
    let bad = UpstreamCa {
        cert_path: leaf_cert.clone(),
        key_path: leaf_key_path,
    };
    let err =
        Authority::load_or_create(&tmp.path().join("b"), &td(), WEEK, Some(&bad)).unwrap_err();
    assert!(
        matches!(&err, CaError::BadFile { path, .. } if *path == leaf_cert),
        "{err}"
    );

    // Missing file.
    let bad = UpstreamCa {
        cert_path: tmp.path().join("missing.pem"),
        key_path: upstream.key_path.clone(),
    };
    let err =
        Authority::load_or_create(&tmp.path().join("c"), &td(), WEEK, Some(&bad)).unwrap_err();
    assert!(matches!(err, CaError::Io { .. }), "{err}");
}

#[test]
fn ca_set_publishes_the_union_of_roots() {
    let _guard = serial_lock();
    let a = Authority::generate(&td(), WEEK).unwrap();
    let b = Authority::generate(&td(), 2 * WEEK).unwrap();
    let (a_cert, b_cert) = (a.certificate().clone(), b.certificate().clone());
    let set = CaSet::new(a);
    set.publish_next(b);
    assert_eq!(set.bundle(), vec![a_cert.clone(), b_cert.clone()]);
    // A leaf from the current CA verifies against the published bundle, before and after rotation.
    let chain = issue_leaf(&set.current());
    assert!(verify_chain(&chain, &set.bundles(), Usage::Client, SystemTime::now()).is_ok());
    assert!(set.activate_next());
    assert_eq!(set.current().certificate(), &b_cert);
    assert!(verify_chain(&chain, &set.bundles(), Usage::Client, SystemTime::now()).is_ok());
    let chain = issue_leaf(&set.current());
    assert!(verify_chain(&chain, &set.bundles(), Usage::Client, SystemTime::now()).is_ok());
}
