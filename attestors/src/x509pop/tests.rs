//! Every refusal beside its positive control, on certificates made here with rcgen.

use std::time::{Duration, SystemTime};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SanType,
};

use super::*;

struct Ca {
    der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(name: &str) -> Ca {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Ca {
        der: cert.der().to_vec(),
        issuer: Issuer::new(params, key),
    }
}

fn intermediate(parent: &Ca, name: &str) -> Ca {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &parent.issuer).unwrap();
    Ca {
        der: cert.der().to_vec(),
        issuer: Issuer::new(params, key),
    }
}

struct Node {
    der: Vec<u8>,
    key: EcdsaKeyPair,
}

fn node(by: &Ca, shape: impl FnOnce(&mut CertificateParams)) -> Node {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, "web-1");
    params.subject_alt_names = vec![SanType::DnsName("web-1.example".try_into().unwrap())];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.serial_number = Some(vec![0x0a, 0xbc].into());
    shape(&mut params);
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &by.issuer).unwrap();
    Node {
        der: cert.der().to_vec(),
        key: EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &key.serialize_der())
            .unwrap(),
    }
}

fn respond(node: &Node, nonce: &[u8]) -> Vec<u8> {
    node.key
        .sign(&SystemRandom::new(), &challenge_message(nonce, &node.der))
        .unwrap()
        .as_ref()
        .to_vec()
}

const NONCE: &[u8] = b"a fresh server nonce of 32 bytes";

#[test]
fn a_node_proves_its_certificate_and_gets_spires_id_and_selectors() {
    let root = ca("node CA");
    let web = node(&root, |_| {});
    let verifier = X509PopVerifier::new(vec![root.der.clone()]).unwrap();
    let got = verifier
        .verify(
            std::slice::from_ref(&web.der),
            NONCE,
            &respond(&web, NONCE),
            SystemTime::now(),
        )
        .unwrap();
    assert_eq!(got.node_id, sha1_hex(&web.der));
    assert_eq!(got.node_id.len(), 40);
    assert_eq!(
        got.selectors,
        vec![
            format!("x509pop:ca:fingerprint:{}", sha1_hex(&root.der)),
            "x509pop:san:dns:web-1.example".to_owned(),
            "x509pop:serialnumber:0abc".to_owned(),
            "x509pop:subject:cn:web-1".to_owned(),
        ]
    );
}

#[test]
fn an_intermediate_adds_its_fingerprint() {
    let root = ca("root");
    let mid = intermediate(&root, "intermediate");
    let web = node(&mid, |_| {});
    let verifier = X509PopVerifier::new(vec![root.der.clone()]).unwrap();
    let chain = [web.der.clone(), mid.der.clone()];
    let got = verifier
        .verify(&chain, NONCE, &respond(&web, NONCE), SystemTime::now())
        .unwrap();
    for ca in [&root.der, &mid.der] {
        let want = format!("x509pop:ca:fingerprint:{}", sha1_hex(ca));
        assert!(got.selectors.contains(&want), "{:?}", got.selectors);
    }
    // Without the intermediate the chain does not build.
    assert!(matches!(
        verifier.verify(&chain[..1], NONCE, &respond(&web, NONCE), SystemTime::now()),
        Err(X509PopError::Chain(_))
    ));
}

#[test]
fn certificates_the_operator_ca_did_not_issue_for_a_node_now_are_refused() {
    let root = ca("node CA");
    let verifier = X509PopVerifier::new(vec![root.der.clone()]).unwrap();
    let now = SystemTime::now();
    let check =
        |n: &Node| verifier.verify(std::slice::from_ref(&n.der), NONCE, &respond(n, NONCE), now);
    assert!(check(&node(&root, |_| {})).is_ok(), "positive control");

    let other = ca("another CA");
    assert!(matches!(
        check(&node(&other, |_| {})),
        Err(X509PopError::Chain(_))
    ));
    let expired = node(&root, |p| {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    });
    assert!(matches!(check(&expired), Err(X509PopError::Chain(_))));
    let future = node(&root, |p| {
        p.not_before = rcgen::date_time_ymd(2090, 1, 1);
        p.not_after = rcgen::date_time_ymd(2091, 1, 1);
    });
    assert!(matches!(check(&future), Err(X509PopError::Chain(_))));
    let is_ca = node(&root, |p| {
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained)
    });
    assert!(matches!(check(&is_ca), Err(X509PopError::Chain(_))));
    let server_only = node(&root, |p| {
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    });
    assert!(matches!(check(&server_only), Err(X509PopError::Chain(_))));
}

#[test]
fn the_response_must_sign_this_nonce_and_this_certificate_with_its_key() {
    let root = ca("node CA");
    let web = node(&root, |_| {});
    let db = node(&root, |p| {
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, "db-1");
    });
    let verifier = X509PopVerifier::new(vec![root.der.clone()]).unwrap();
    let now = SystemTime::now();
    let good = respond(&web, NONCE);
    assert!(
        verifier
            .verify(std::slice::from_ref(&web.der), NONCE, &good, now)
            .is_ok()
    );
    // Replayed for another nonce.
    assert_eq!(
        verifier.verify(std::slice::from_ref(&web.der), b"another nonce", &good, now),
        Err(X509PopError::BadSignature)
    );
    // Evidence for web-1 signed by db-1's key.
    assert_eq!(
        verifier.verify(
            std::slice::from_ref(&web.der),
            NONCE,
            &respond(&db, NONCE),
            now
        ),
        Err(X509PopError::BadSignature)
    );
    // db-1's own response presented with web-1's certificate.
    let db_response = db
        .key
        .sign(&SystemRandom::new(), &challenge_message(NONCE, &db.der))
        .unwrap();
    assert_eq!(
        verifier.verify(
            std::slice::from_ref(&web.der),
            NONCE,
            db_response.as_ref(),
            now
        ),
        Err(X509PopError::BadSignature)
    );
}

#[test]
fn oversized_or_empty_evidence_is_refused_before_parsing() {
    let root = ca("node CA");
    let verifier = X509PopVerifier::new(vec![root.der.clone()]).unwrap();
    let now = SystemTime::now() + Duration::ZERO;
    assert_eq!(
        verifier.verify(&[vec![0x30; MAX_EVIDENCE + 1]], NONCE, b"", now),
        Err(X509PopError::Malformed("it is over 64 KiB"))
    );
    assert_eq!(
        verifier.verify(&[], NONCE, b"", now),
        Err(X509PopError::Malformed("it holds no certificate"))
    );
    assert!(matches!(
        verifier.verify(&[b"not a certificate".to_vec()], NONCE, b"", now),
        Err(X509PopError::Chain(_))
    ));
    assert!(X509PopVerifier::new(vec![]).is_err());
    assert!(X509PopVerifier::new(vec![b"junk".to_vec()]).is_err());
}
