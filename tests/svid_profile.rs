//! The X509-SVID profile over the public API: what `svid::issue` puts in a leaf (and what it
//! never takes from a CSR), what `svid::parse_csr` refuses, and what the one verifier
//! (`mtls::verify_chain`, which the TLS verifiers run too) accepts and refuses. Every PKI here is generated at test time with rcgen.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mayfly::ca::{Authority, UpstreamCa};
use mayfly::id::{IdError, ScopedId, SpiffeId, TrustDomain, parse_scopes};
use mayfly::mtls::{self, PeerError, PeerPolicy, TrustSet, VerifiedPeer};
use mayfly::svid::{
    self, Bundles, IssuedSvid, KeyAndCsr, LeafSpec, RequestedKey, Serial, SvidError, Usage,
};
use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
    PKCS_ECDSA_P384_SHA384, PKCS_ED25519, PublicKeyData, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use tempfile::TempDir;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{
    OID_SIG_ECDSA_WITH_SHA256, OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER,
    OID_X509_EXT_BASIC_CONSTRAINTS, OID_X509_EXT_EXTENDED_KEY_USAGE, OID_X509_EXT_KEY_USAGE,
    OID_X509_EXT_SUBJECT_ALT_NAME, OID_X509_EXT_SUBJECT_KEY_IDENTIFIER,
};
use x509_parser::prelude::FromDer;
use x509_parser::x509::X509Version;

const HOUR: Duration = Duration::from_secs(3600);

fn td(name: &str) -> TrustDomain {
    TrustDomain::new(name).unwrap()
}

fn scoped(id: &str, scopes: &[&str]) -> ScopedId {
    ScopedId::new(SpiffeId::parse(id).unwrap(), parse_scopes(scopes).unwrap()).unwrap()
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn requested_key() -> (KeyAndCsr, RequestedKey) {
    let kc = KeyAndCsr::generate().unwrap();
    let key = svid::parse_csr(&kc.csr).unwrap();
    (kc, key)
}

fn issue(
    ca: &Authority,
    id: &ScopedId,
    key: &RequestedKey,
    ttl: Duration,
    dns: &[String],
    now: SystemTime,
) -> IssuedSvid {
    svid::issue(
        ca,
        &LeafSpec {
            id,
            key,
            ttl,
            dns_names: dns,
        },
        now,
    )
    .unwrap()
}

/// `mtls::verify_chain` over `bundles` with no policy beyond them (any trusted ID).
fn verify_peer(
    chain: &[CertificateDer<'_>],
    bundles: &Bundles,
    usage: Usage,
    now: SystemTime,
) -> Result<VerifiedPeer, PeerError> {
    let trust = TrustSet::new(bundles.clone()).expect("usable roots");
    mtls::verify_chain(chain, &trust, usage, now, &PeerPolicy::any_id())
}

/// [`verify_peer`], for the refusals of an X509-SVID rule or of the path (every refusal of this
/// file but the extended key usage one, which is checked with [`verify_peer`]).
fn verify(
    chain: &[CertificateDer<'_>],
    bundles: &Bundles,
    usage: Usage,
    now: SystemTime,
) -> Result<VerifiedPeer, SvidError> {
    verify_peer(chain, bundles, usage, now).map_err(|e| match e {
        PeerError::Svid(e) => e,
        other => panic!("expected an X509-SVID or path refusal, got {other}"),
    })
}

fn bundles(cas: &[&Authority]) -> Bundles {
    let mut out = Bundles::new();
    for ca in cas {
        out.entry(ca.trust_domain().clone())
            .or_default()
            .extend(ca.bundle_roots().iter().cloned());
    }
    out
}

fn parse(der: &[u8]) -> X509Certificate<'_> {
    let (rest, cert) = X509Certificate::from_der(der).unwrap();
    assert!(rest.is_empty());
    cert
}

/// A CA kept on disk, plus an rcgen issuer over the same key and certificate, so tests can sign
/// hand-made (bad) leaves with the trusted CA.
struct Fixture {
    _dir: TempDir,
    ca: Authority,
    issuer: Issuer<'static, KeyPair>,
}

fn fixture(trust_domain: &str) -> Fixture {
    let dir = TempDir::new().unwrap();
    let ca = Authority::load_or_create(dir.path(), &td(trust_domain), 24 * HOUR, None).unwrap();
    let issuer = issuer_from_dir(dir.path());
    Fixture {
        _dir: dir,
        ca,
        issuer,
    }
}

fn issuer_from_dir(dir: &Path) -> Issuer<'static, KeyPair> {
    let key = KeyPair::from_pem(&std::fs::read_to_string(dir.join("ca.key")).unwrap()).unwrap();
    Issuer::from_ca_cert_pem(&std::fs::read_to_string(dir.join("ca.pem")).unwrap(), key).unwrap()
}

// ---------------------------------------------------------------------------------------------
// The profile, checked field by field.

struct Expected<'a> {
    id: &'a ScopedId,
    dns: &'a [String],
    spki: &'a [u8],
    not_before: u64,
    not_after: u64,
    ca: &'a Authority,
}

fn assert_profile(leaf_der: &[u8], serial: Serial, want: &Expected<'_>) {
    let leaf = parse(leaf_der);
    let (_, ca) = X509Certificate::from_der(want.ca.certificate()).unwrap();

    assert_eq!(leaf.version(), X509Version::V3);
    // Exactly these extensions, each once: nothing else from anywhere.
    let oids: Vec<String> = leaf
        .extensions()
        .iter()
        .map(|e| e.oid.to_id_string())
        .collect();
    let mut expected_oids: Vec<String> = [
        &OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER,
        &OID_X509_EXT_SUBJECT_ALT_NAME,
        &OID_X509_EXT_KEY_USAGE,
        &OID_X509_EXT_EXTENDED_KEY_USAGE,
        &OID_X509_EXT_SUBJECT_KEY_IDENTIFIER,
        &OID_X509_EXT_BASIC_CONSTRAINTS,
    ]
    .iter()
    .map(|o| o.to_id_string())
    .collect();
    let mut sorted = oids.clone();
    sorted.sort();
    expected_oids.sort();
    assert_eq!(sorted, expected_oids, "extensions of the leaf");

    // SANs: one URI (the scoped ID), then the DNS names; non-critical.
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    assert!(
        !san.critical,
        "SAN must be non-critical with a non-empty subject"
    );
    let mut want_names = vec![format!("URI:{}", want.id)];
    want_names.extend(want.dns.iter().map(|d| format!("DNS:{d}")));
    let names: Vec<String> = san
        .value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::URI(u) => format!("URI:{u}"),
            GeneralName::DNSName(d) => format!("DNS:{d}"),
            other => format!("OTHER:{other:?}"),
        })
        .collect();
    assert_eq!(names, want_names);

    // Subject O=Mayfly; issuer is the CA's subject, byte for byte.
    assert_eq!(leaf.subject().to_string(), "O=Mayfly");
    assert_eq!(leaf.issuer().as_raw(), ca.subject().as_raw());

    let bc = leaf
        .basic_constraints()
        .unwrap()
        .expect("basicConstraints present");
    assert!(!bc.value.ca);
    assert!(bc.value.path_len_constraint.is_none());

    let ku = leaf.key_usage().unwrap().expect("keyUsage present");
    assert!(ku.critical, "keyUsage must be critical");
    assert!(ku.value.digital_signature());
    assert_eq!(ku.value.flags, 1, "digitalSignature only, got {}", ku.value);

    let eku = leaf.extended_key_usage().unwrap().expect("EKU present");
    assert!(!eku.critical);
    let e = eku.value;
    assert!(e.server_auth && e.client_auth);
    assert!(
        !e.any && !e.code_signing && !e.email_protection && !e.time_stamping && !e.ocsp_signing
    );
    assert!(e.other.is_empty());

    // Authority key identifier is the CA's subject key identifier.
    let ca_ski = ca
        .iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        })
        .expect("CA has a SKI");
    let aki = leaf
        .iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(a) => Some(a.key_identifier.clone()),
            _ => None,
        })
        .expect("leaf has an AKI")
        .expect("AKI has a key identifier");
    assert_eq!(aki.0, ca_ski.as_slice());

    // Serial: 16 bytes, positive, the one reported.
    let raw_serial = leaf.raw_serial();
    assert_eq!(raw_serial.len(), 16);
    assert!(raw_serial[0] & 0x80 == 0 && raw_serial[0] != 0);
    assert_eq!(raw_serial, serial.as_bytes());

    // Validity.
    let nb = leaf.validity().not_before.timestamp();
    let na = leaf.validity().not_after.timestamp();
    assert_eq!(nb, i64::try_from(want.not_before).unwrap());
    assert_eq!(na, i64::try_from(want.not_after).unwrap());
    assert!(na <= ca.validity().not_after.timestamp());

    // ECDSA P-256 with SHA-256, signed by the CA, over the requester's key.
    assert_eq!(
        leaf.signature_algorithm.algorithm,
        OID_SIG_ECDSA_WITH_SHA256
    );
    assert!(leaf.signature_algorithm.parameters.is_none());
    assert_eq!(
        leaf.tbs_certificate.signature.algorithm,
        OID_SIG_ECDSA_WITH_SHA256
    );
    assert_eq!(leaf.public_key().raw, want.spki);
    leaf.verify_signature(Some(ca.public_key()))
        .expect("leaf is signed by the CA");
}

#[test]
fn issued_leaf_has_the_exact_profile() {
    let ca = Authority::generate(&td("acme.test"), 24 * HOUR).unwrap();
    let (_kc, key) = requested_key();
    let id = scoped(
        "spiffe://acme.test/agents/billing-bot",
        &["stripe:read:customers", "stripe:write:refunds"],
    );
    let now = SystemTime::now();
    let ttl = Duration::from_secs(300);

    // Without DNS names.
    let svid = issue(&ca, &id, &key, ttl, &[], now);
    assert_eq!(
        svid.chain.len(),
        1,
        "self-signed CA: chain is the leaf only"
    );
    assert_eq!(unix(svid.not_after), unix(now) + 300);
    assert_profile(
        &svid.chain[0],
        svid.serial,
        &Expected {
            id: &id,
            dns: &[],
            spki: key.spki_der(),
            not_before: unix(now) - 30,
            not_after: unix(now) + 300,
            ca: &ca,
        },
    );

    // With DNS names.
    let dns = vec!["billing.acme.test".to_owned(), "localhost".to_owned()];
    let svid = issue(&ca, &id, &key, ttl, &dns, now);
    assert_profile(
        &svid.chain[0],
        svid.serial,
        &Expected {
            id: &id,
            dns: &dns,
            spki: key.spki_der(),
            not_before: unix(now) - 30,
            not_after: unix(now) + 300,
            ca: &ca,
        },
    );
}

#[test]
fn ttl_is_cut_to_the_ca_not_after() {
    let ca = Authority::generate(&td("acme.test"), HOUR).unwrap();
    let (_kc, key) = requested_key();
    let id = scoped("spiffe://acme.test/agents/bot", &[]);
    let now = SystemTime::now();
    let ca_end = unix(ca.not_after());

    // Positive control: a TTL inside the CA's life is kept.
    let svid = issue(&ca, &id, &key, Duration::from_secs(60), &[], now);
    assert_eq!(unix(svid.not_after), unix(now) + 60);

    // A TTL beyond the CA's life stops at the CA's notAfter.
    let svid = issue(&ca, &id, &key, 10 * HOUR, &[], now);
    assert_eq!(unix(svid.not_after), ca_end);
    assert_profile(
        &svid.chain[0],
        svid.serial,
        &Expected {
            id: &id,
            dns: &[],
            spki: key.spki_der(),
            not_before: unix(now) - 30,
            not_after: ca_end,
            ca: &ca,
        },
    );
    // Even an absurd TTL does not overflow.
    let svid = issue(&ca, &id, &key, Duration::MAX, &[], now);
    assert_eq!(unix(svid.not_after), ca_end);
}

#[test]
fn issue_refuses_what_the_ca_must_not_sign() {
    let ca = Authority::generate(&td("acme.test"), HOUR).unwrap();
    let (_kc, key) = requested_key();
    let now = SystemTime::now();
    let spec = |id: &ScopedId, ttl, dns: &[String]| {
        svid::issue(
            &ca,
            &LeafSpec {
                id,
                key: &key,
                ttl,
                dns_names: dns,
            },
            now,
        )
    };
    let good = scoped("spiffe://acme.test/agents/bot", &[]);
    assert!(spec(&good, HOUR, &[]).is_ok());

    let foreign = scoped("spiffe://other.test/agents/bot", &[]);
    assert!(matches!(
        spec(&foreign, HOUR, &[]),
        Err(SvidError::ForeignTrustDomain { .. })
    ));
    let root = ScopedId::new(td("acme.test").id(), Default::default()).unwrap();
    assert!(matches!(spec(&root, HOUR, &[]), Err(SvidError::RootId(_))));
    assert_eq!(
        spec(&good, Duration::from_millis(999), &[]).unwrap_err(),
        SvidError::ZeroTtl
    );
    assert!(matches!(
        spec(&good, HOUR, &["not a dns name".to_owned()]),
        Err(SvidError::BadDnsName(_))
    ));
    let late = svid::issue(
        &ca,
        &LeafSpec {
            id: &good,
            key: &key,
            ttl: HOUR,
            dns_names: &[],
        },
        ca.not_after() + Duration::from_secs(1),
    );
    assert_eq!(late.unwrap_err(), SvidError::CaExpired);
}

// ---------------------------------------------------------------------------------------------
// An independent SPIFFE implementation accepts what we issue.

fn concat(chain: &[CertificateDer<'_>]) -> Vec<u8> {
    chain.iter().flat_map(|c| c.iter().copied()).collect()
}

#[test]
fn spiffe_crate_accepts_the_svid_and_the_bundle() {
    let ca = Authority::generate(&td("acme.test"), 24 * HOUR).unwrap();
    let (kc, key) = requested_key();
    let id = scoped(
        "spiffe://acme.test/agents/billing-bot",
        &["stripe:read:customers"],
    );
    let svid = issue(
        &ca,
        &id,
        &key,
        Duration::from_secs(300),
        &[],
        SystemTime::now(),
    );

    let parsed = spiffe::X509Svid::parse_from_der(&concat(&svid.chain), &kc.key_pkcs8).unwrap();
    assert_eq!(parsed.spiffe_id().to_string(), id.to_string());
    assert_eq!(parsed.cert_chain().len(), 1);

    let spiffe_td = spiffe::TrustDomain::new("acme.test").unwrap();
    let bundle =
        spiffe::X509Bundle::parse_from_der(spiffe_td.clone(), ca.certificate().as_ref()).unwrap();
    assert_eq!(bundle.authorities().len(), 1);
    let bundle =
        spiffe::X509Bundle::from_x509_authorities(spiffe_td, &[ca.certificate().as_ref()]).unwrap();
    assert_eq!(bundle.authorities().len(), 1);
    let ca_id = spiffe::cert::spiffe_id_from_der(ca.certificate()).unwrap();
    assert_eq!(ca_id.to_string(), "spiffe://acme.test");
}

#[test]
fn spiffe_crate_accepts_an_svid_under_an_upstream_ca() {
    let dir = TempDir::new().unwrap();
    let upstream = write_upstream_root(dir.path());
    let ca = Authority::load_or_create(
        &dir.path().join("ca"),
        &td("acme.test"),
        24 * HOUR,
        Some(&upstream),
    )
    .unwrap();
    let (kc, key) = requested_key();
    let id = scoped("spiffe://acme.test/agents/bot", &[]);
    let svid = issue(
        &ca,
        &id,
        &key,
        Duration::from_secs(300),
        &[],
        SystemTime::now(),
    );
    assert_eq!(svid.chain.len(), 2);
    let parsed = spiffe::X509Svid::parse_from_der(&concat(&svid.chain), &kc.key_pkcs8).unwrap();
    assert_eq!(parsed.spiffe_id().to_string(), id.to_string());
    assert_eq!(parsed.cert_chain().len(), 2);
    assert!(
        verify(
            &svid.chain,
            &bundles(&[&ca]),
            Usage::Client,
            SystemTime::now()
        )
        .is_ok()
    );
}

fn write_upstream_root(dir: &Path) -> UpstreamCa {
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
    params.not_after = now + time::Duration::days(30);
    params.serial_number = Some(SerialNumber::from_slice(Serial::generate().as_bytes()));
    let cert = params.self_signed(&key).unwrap();
    let cert_path = dir.join("upstream.pem");
    let key_path = dir.join("upstream.key");
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    UpstreamCa {
        cert_path,
        key_path,
    }
}

// ---------------------------------------------------------------------------------------------
// Nothing but the public key is taken from a CSR.

#[test]
fn csr_content_other_than_the_key_is_ignored() {
    let ca = Authority::generate(&td("acme.test"), 24 * HOUR).unwrap();
    let id = scoped("spiffe://acme.test/agents/bot", &["db:read"]);
    let now = SystemTime::now();
    let ttl = Duration::from_secs(300);

    let requester = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let requester_spki = requester.subject_public_key_info();
    let expected = Expected {
        id: &id,
        dns: &[],
        spki: &requester_spki,
        not_before: unix(now) - 30,
        not_after: unix(now) + 300,
        ca: &ca,
    };

    // Positive control: a plain CSR for the same key.
    let mut plain = CertificateParams::default();
    plain.distinguished_name = DistinguishedName::new();
    let plain_csr = plain.serialize_request(&requester).unwrap();
    let key = svid::parse_csr(plain_csr.der()).unwrap();
    assert_eq!(key.spki_der(), requester_spki.as_slice());
    let svid = issue(&ca, &id, &key, ttl, &[], now);
    assert_profile(&svid.chain[0], svid.serial, &expected);

    // A CSR asking for everything it must not get.
    let mut greedy = CertificateParams::default();
    greedy.distinguished_name = DistinguishedName::new();
    greedy
        .distinguished_name
        .push(DnType::CommonName, "evil-root");
    greedy
        .distinguished_name
        .push(DnType::OrganizationName, "Evil Corp");
    greedy.subject_alt_names = vec![
        SanType::URI(Ia5String::try_from("spiffe://acme.test/admin").unwrap()),
        SanType::URI(Ia5String::try_from("spiffe://other.test/root").unwrap()),
        SanType::DnsName(Ia5String::try_from("evil.example").unwrap()),
        SanType::IpAddress(IpAddr::V4(Ipv4Addr::new(10, 6, 6, 6))),
        SanType::Rfc822Name(Ia5String::try_from("evil@evil.example").unwrap()),
    ];
    greedy.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    greedy.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    greedy.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::Any,
        ExtendedKeyUsagePurpose::CodeSigning,
    ];
    let mut custom = CustomExtension::from_oid_content(
        &[1, 3, 6, 1, 4, 1, 99999, 1],
        vec![0x04, 0x04, b'e', b'v', b'i', b'l'],
    );
    custom.set_criticality(true);
    greedy.custom_extensions = vec![custom];
    let greedy_csr = greedy.serialize_request(&requester).unwrap();

    // The CSR really asks for those things (so the test means something).
    let (_, parsed_csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(greedy_csr.der())
            .unwrap();
    assert_eq!(parsed_csr.requested_extensions().unwrap().count(), 5);

    let key = svid::parse_csr(greedy_csr.der()).unwrap();
    assert_eq!(key.spki_der(), requester_spki.as_slice());
    let svid = issue(&ca, &id, &key, ttl, &[], now);
    assert_profile(&svid.chain[0], svid.serial, &expected);
    let der = svid.chain[0].as_ref();
    for needle in [&b"evil"[..], b"admin", b"other.test", &[10, 6, 6, 6]] {
        assert!(
            !der.windows(needle.len()).any(|w| w == needle),
            "{needle:?} leaked from the CSR into the leaf"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Malformed CSRs are refused with the right error, fast.

#[test]
fn malformed_csrs_are_refused() {
    let kc = KeyAndCsr::generate().unwrap();
    // Positive control.
    assert!(svid::parse_csr(&kc.csr).is_ok());

    assert!(matches!(
        svid::parse_csr(&[]),
        Err(SvidError::CsrMalformed { .. })
    ));
    assert!(matches!(
        svid::parse_csr(&kc.csr[..kc.csr.len() / 2]),
        Err(SvidError::CsrMalformed { .. })
    ));
    let garbage: Vec<u8> = (0..300u32).map(|i| (i * 7919 % 251) as u8).collect();
    assert!(matches!(
        svid::parse_csr(&garbage),
        Err(SvidError::CsrMalformed { .. })
    ));
    // A well-framed SEQUENCE with junk inside.
    let mut framed = vec![0x30, 0x81, 0xc8];
    framed.extend([0xa5u8; 0xc8]);
    assert!(matches!(
        svid::parse_csr(&framed),
        Err(SvidError::CsrMalformed { .. })
    ));
    // The parser's own error is kept as the source, not flattened into the message; our own
    // checks have none.
    let err = svid::parse_csr(&framed).unwrap_err();
    assert!(
        matches!(
            &err,
            SvidError::CsrMalformed {
                source: Some(_),
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        !err.to_string()
            .contains(&std::error::Error::source(&err).unwrap().to_string())
    );
    assert!(matches!(
        svid::parse_csr(&[]),
        Err(SvidError::CsrMalformed { source: None, .. })
    ));
    // Trailing bytes after a valid CSR.
    let mut padded = kc.csr.clone();
    padded.push(0);
    assert!(matches!(
        svid::parse_csr(&padded),
        Err(SvidError::CsrMalformed { .. })
    ));

    let huge = vec![0x30u8; 16 << 20];
    let start = Instant::now();
    assert_eq!(
        svid::parse_csr(&huge),
        Err(SvidError::CsrTooLarge(16 << 20))
    );
    assert!(
        start.elapsed() < Duration::from_millis(100),
        "took {:?}",
        start.elapsed()
    );
    assert_eq!(
        svid::parse_csr(&[0u8; 4097]),
        Err(SvidError::CsrTooLarge(4097))
    );

    let mut flipped = kc.csr.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x01;
    assert_eq!(svid::parse_csr(&flipped), Err(SvidError::BadSignature));

    for alg in [&PKCS_ECDSA_P384_SHA384, &PKCS_ED25519] {
        let other = KeyPair::generate_for(alg).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let csr = params.serialize_request(&other).unwrap();
        assert!(
            matches!(
                svid::parse_csr(csr.der()),
                Err(SvidError::UnsupportedKey(_))
            ),
            "{alg:?}"
        );
    }
}

#[test]
fn csr_signed_by_another_key_is_refused() {
    // Same bytes, but the key inside is someone else's: splice another CSR's SPKI in.
    let a = KeyAndCsr::generate().unwrap();
    let b = KeyAndCsr::generate().unwrap();
    let a_key = svid::parse_csr(&a.csr).unwrap();
    let b_key = svid::parse_csr(&b.csr).unwrap();
    let pos = a
        .csr
        .windows(a_key.spki_der().len())
        .position(|w| w == a_key.spki_der())
        .unwrap();
    let mut spliced = a.csr.clone();
    spliced[pos..pos + b_key.spki_der().len()].copy_from_slice(b_key.spki_der());
    assert_eq!(svid::parse_csr(&spliced), Err(SvidError::BadSignature));
}

// ---------------------------------------------------------------------------------------------
// mtls::verify_chain.

/// Leaf parameters following the profile, for hand-made leaves.
fn profile_params(uris: &[&str]) -> CertificateParams {
    let now = time::OffsetDateTime::now_utc();
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name
        .push(DnType::OrganizationName, "Mayfly");
    p.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI(Ia5String::try_from(*u).unwrap()))
        .collect();
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.not_before = now - time::Duration::minutes(1);
    p.not_after = now + time::Duration::minutes(10);
    p.serial_number = Some(SerialNumber::from_slice(Serial::generate().as_bytes()));
    p.use_authority_key_identifier_extension = true;
    p
}

fn sign(params: &CertificateParams, issuer: &Issuer<'_, KeyPair>) -> Vec<CertificateDer<'static>> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    vec![params.signed_by(&key, issuer).unwrap().into()]
}

#[test]
fn verify_accepts_a_good_leaf_for_both_usages() {
    let a = fixture("a.test");
    let b = fixture("b.test");
    let all = bundles(&[&a.ca, &b.ca]);
    let (_kc, key) = requested_key();
    let id = scoped("spiffe://a.test/agents/bot", &["db:read", "db:write"]);
    let now = SystemTime::now();
    let svid = issue(&a.ca, &id, &key, Duration::from_secs(300), &[], now);
    for usage in [Usage::Client, Usage::Server] {
        let v = verify(&svid.chain, &all, usage, now).unwrap();
        assert_eq!(v.id, id);
        assert_eq!(v.id.scopes().len(), 2);
        assert_eq!(v.serial, svid.serial);
        assert_eq!(v.not_after, svid.not_after);
    }
    // The hand-made profile leaf is accepted too (the control for every negative below).
    let chain = sign(&profile_params(&["spiffe://a.test/x"]), &a.issuer);
    assert!(verify(&chain, &all, Usage::Client, now).is_ok());
}

#[test]
fn verify_refuses_a_leaf_from_an_untrusted_ca_with_the_same_trust_domain() {
    let a = fixture("a.test");
    let b = fixture("b.test");
    let rogue = fixture("a.test");
    let all = bundles(&[&a.ca, &b.ca]);
    let (_kc, key) = requested_key();
    let id = scoped("spiffe://a.test/agents/bot", &[]);
    let now = SystemTime::now();
    let svid = issue(&rogue.ca, &id, &key, Duration::from_secs(300), &[], now);
    // Control: it verifies against the rogue CA's own bundle.
    assert!(verify(&svid.chain, &bundles(&[&rogue.ca]), Usage::Client, now).is_ok());
    assert!(matches!(
        verify(&svid.chain, &all, Usage::Client, now),
        Err(SvidError::Untrusted(_))
    ));
}

#[test]
fn verify_chooses_roots_by_the_leaf_trust_domain() {
    let a = fixture("a.test");
    let b = fixture("b.test");
    let all = bundles(&[&a.ca, &b.ca]);
    let now = SystemTime::now();
    // A's CA refuses to issue for B through the API...
    let (_kc, key) = requested_key();
    let b_id = scoped("spiffe://b.test/agents/bot", &[]);
    assert!(matches!(
        svid::issue(
            &a.ca,
            &LeafSpec {
                id: &b_id,
                key: &key,
                ttl: HOUR,
                dns_names: &[]
            },
            now
        ),
        Err(SvidError::ForeignTrustDomain { .. })
    ));
    // ...and a hand-made B leaf signed by A is refused although A's root is in the bundles.
    let control = sign(&profile_params(&["spiffe://a.test/agents/bot"]), &a.issuer);
    assert!(verify(&control, &all, Usage::Client, now).is_ok());
    let chain = sign(&profile_params(&["spiffe://b.test/agents/bot"]), &a.issuer);
    assert!(matches!(
        verify(&chain, &all, Usage::Client, now),
        Err(SvidError::Untrusted(_))
    ));
    // A trust domain with no bundle at all.
    let chain = sign(&profile_params(&["spiffe://c.test/agents/bot"]), &a.issuer);
    assert_eq!(
        verify(&chain, &all, Usage::Client, now).unwrap_err(),
        SvidError::UnknownTrustDomain("c.test".to_owned())
    );
}

#[test]
fn verify_refuses_expired_and_not_yet_valid() {
    let a = fixture("a.test");
    let all = bundles(&[&a.ca]);
    let (_kc, key) = requested_key();
    let id = scoped("spiffe://a.test/agents/bot", &[]);
    let now = SystemTime::now();
    let svid = issue(&a.ca, &id, &key, Duration::from_secs(300), &[], now);
    assert!(verify(&svid.chain, &all, Usage::Server, now).is_ok());
    assert!(
        verify(
            &svid.chain,
            &all,
            Usage::Server,
            svid.not_after - Duration::from_secs(1)
        )
        .is_ok()
    );
    assert_eq!(
        verify(
            &svid.chain,
            &all,
            Usage::Server,
            svid.not_after + Duration::from_secs(1)
        )
        .unwrap_err(),
        SvidError::Expired
    );
    // Within the skew allowance it is valid; before it, not yet.
    assert!(
        verify(
            &svid.chain,
            &all,
            Usage::Server,
            now - Duration::from_secs(20)
        )
        .is_ok()
    );
    assert_eq!(
        verify(
            &svid.chain,
            &all,
            Usage::Server,
            now - Duration::from_secs(120)
        )
        .unwrap_err(),
        SvidError::NotYetValid
    );
}

#[test]
fn verify_applies_the_x509_svid_leaf_rules() {
    let a = fixture("a.test");
    let all = bundles(&[&a.ca]);
    let now = SystemTime::now();
    let check =
        |params: &CertificateParams| verify(&sign(params, &a.issuer), &all, Usage::Client, now);
    let good = profile_params(&["spiffe://a.test/x"]);
    assert!(check(&good).is_ok(), "control");

    let p = profile_params(&["spiffe://a.test/x", "spiffe://a.test/y"]);
    assert_eq!(check(&p).unwrap_err(), SvidError::MultipleUriSans(2));

    let mut p = profile_params(&[]);
    p.subject_alt_names = vec![SanType::DnsName(Ia5String::try_from("a.test").unwrap())];
    assert_eq!(check(&p).unwrap_err(), SvidError::NoUriSan);
    let p = profile_params(&[]);
    assert_eq!(check(&p).unwrap_err(), SvidError::NoUriSan);

    let mut p = good.clone();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    assert_eq!(check(&p).unwrap_err(), SvidError::LeafIsCa);

    let mut p = good.clone();
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
    ];
    assert_eq!(
        check(&p).unwrap_err(),
        SvidError::ForbiddenKeyUsage("keyCertSign")
    );

    let mut p = good.clone();
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::CrlSign];
    assert_eq!(
        check(&p).unwrap_err(),
        SvidError::ForbiddenKeyUsage("cRLSign")
    );

    let mut p = good.clone();
    p.key_usages = vec![KeyUsagePurpose::KeyEncipherment];
    assert_eq!(check(&p).unwrap_err(), SvidError::MissingDigitalSignature);

    let mut p = good.clone();
    p.key_usages = Vec::new();
    assert_eq!(check(&p).unwrap_err(), SvidError::MissingDigitalSignature);

    let p = profile_params(&["spiffe://a.test"]);
    assert_eq!(
        check(&p).unwrap_err(),
        SvidError::RootId("spiffe://a.test".to_owned())
    );

    let p = profile_params(&["https://a.test/x"]);
    assert!(matches!(
        check(&p).unwrap_err(),
        SvidError::NotSpiffe(IdError::WrongScheme(_))
    ));
    let p = profile_params(&["spiffe://a.test/x/../y"]);
    assert!(matches!(check(&p).unwrap_err(), SvidError::NotSpiffe(_)));

    let p = profile_params(&["spiffe://a.test/x/scope/db.write/db.read"]);
    assert!(matches!(
        check(&p).unwrap_err(),
        SvidError::BadScopes(IdError::UnsortedScopes(_))
    ));

    // EKU is checked for the usage asked for.
    let mut p = good.clone();
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let chain = sign(&p, &a.issuer);
    assert!(verify(&chain, &all, Usage::Server, now).is_ok());
    assert!(matches!(
        verify_peer(&chain, &all, Usage::Client, now),
        Err(PeerError::ExtendedKeyUsage("clientAuth"))
    ));
}

#[test]
fn verify_refuses_empty_oversized_and_garbage_chains() {
    let a = fixture("a.test");
    let all = bundles(&[&a.ca]);
    let now = SystemTime::now();
    assert_eq!(
        verify(&[], &all, Usage::Client, now).unwrap_err(),
        SvidError::EmptyChain
    );
    let big = CertificateDer::from(vec![0x30u8; 17 * 1024]);
    assert_eq!(
        verify(&[big], &all, Usage::Client, now).unwrap_err(),
        SvidError::LeafTooLarge(17 * 1024)
    );
    let junk = CertificateDer::from(vec![0x30u8, 0x03, 1, 2, 3]);
    assert!(matches!(
        verify(&[junk], &all, Usage::Client, now),
        Err(SvidError::Malformed { .. })
    ));
    let good = sign(&profile_params(&["spiffe://a.test/x"]), &a.issuer);
    let long: Vec<_> = std::iter::repeat_n(good[0].clone(), 9).collect();
    assert_eq!(
        verify(&long, &all, Usage::Client, now).unwrap_err(),
        SvidError::ChainTooLong(9)
    );
}

// ---------------------------------------------------------------------------------------------
// Serials.

#[test]
fn serials_are_unique_over_100k_issuances() {
    let ca = Authority::generate(&td("acme.test"), 24 * HOUR).unwrap();
    let (_kc, key) = requested_key();
    let id = scoped("spiffe://acme.test/agents/bot", &["db:read"]);
    let now = SystemTime::now();
    let start = Instant::now();
    let mut seen = HashSet::with_capacity(100_000);
    for i in 0..100_000u32 {
        let svid = issue(&ca, &id, &key, Duration::from_secs(300), &[], now);
        if i.is_multiple_of(10_000) {
            assert_eq!(parse(&svid.chain[0]).raw_serial(), svid.serial.as_bytes());
        }
        assert!(seen.insert(svid.serial), "serial {} repeated", svid.serial);
    }
    assert_eq!(seen.len(), 100_000);
    eprintln!("100000 SVIDs issued in {:?}", start.elapsed());
}
