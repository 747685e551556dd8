//! Every refusal beside its positive control, on tokens signed here: an RSA key made by
//! `openssl genpkey`, P-256 keys made by aws-lc-rs.

use std::process::Command;
use std::sync::{Mutex, OnceLock};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _, RSA_PKCS1_SHA256, RsaKeyPair,
};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

use super::*;
use crate::node::NodeEvidence as _;

mod refusals;

const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const NODE_UID: &str = "5f2c0a9e-7d1b-4c3e-9a55-0e6f1d2c3b4a";

/// An RSA-2048 key from `openssl genpkey`: its PKCS#8 DER and its modulus, made once.
fn openssl_rsa() -> &'static (Vec<u8>, Vec<u8>) {
    static KEY: OnceLock<(Vec<u8>, Vec<u8>)> = OnceLock::new();
    KEY.get_or_init(|| {
        let dir = tempfile::TempDir::new().unwrap();
        let pem = dir.path().join("sa.pem");
        let path = dir.path().join("sa.der");
        let status = Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
            ])
            .arg(&pem)
            .status()
            .unwrap();
        assert!(status.success());
        // PKCS#8 DER whatever the openssl version's default output.
        let status = Command::new("openssl")
            .args(["pkcs8", "-topk8", "-nocrypt", "-outform", "DER", "-in"])
            .arg(&pem)
            .arg("-out")
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success());
        let out = Command::new("openssl")
            .args(["rsa", "-inform", "DER", "-noout", "-modulus", "-in"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        let modulus = hex::decode(text.trim().trim_start_matches("Modulus=")).unwrap();
        (std::fs::read(&path).unwrap(), modulus)
    })
}

struct Fixture {
    attestor: K8sPsatAttestor,
    rsa: RsaKeyPair,
    ec: EcdsaKeyPair,
    jwks: Vec<u8>,
    now: SystemTime,
    unknown_kid_calls: Arc<Mutex<Vec<String>>>,
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn ec_jwk(key: &EcdsaKeyPair, kid: &str) -> Value {
    let point = key.public_key().as_ref();
    json!({"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256",
           "x": b64(&point[1..33]), "y": b64(&point[33..65])})
}

fn cluster(name: &str) -> PsatCluster {
    PsatCluster {
        name: name.into(),
        issuer: ISSUER.into(),
        audience: "mayfly".into(),
        allowed_service_accounts: vec!["mayfly-system:mayfly-agent".into()],
    }
}

fn fixture() -> Fixture {
    let (pkcs8, modulus) = openssl_rsa();
    let rsa = RsaKeyPair::from_pkcs8(pkcs8).unwrap();
    let ec = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
    let jwks = json!({"keys": [
        {"kty": "RSA", "kid": "rsa-1", "use": "sig", "alg": "RS256",
         "n": b64(modulus), "e": "AQAB"},
        ec_jwk(&ec, "ec-1"),
        // A key for another use, skipped.
        {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
    ]});
    let jwks = serde_json::to_vec(&jwks).unwrap();
    let attestor = K8sPsatAttestor::new(vec![cluster("prod"), cluster("staging")]).unwrap();
    assert_eq!(attestor.set_jwks("prod", &jwks).unwrap(), 2);
    let calls = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&calls);
    attestor.on_unknown_kid(Arc::new(move |c: &str| {
        seen.lock().unwrap().push(c.to_owned())
    }));
    Fixture {
        attestor,
        rsa,
        ec,
        jwks,
        now: UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        unknown_kid_calls: calls,
    }
}

impl Fixture {
    fn secs(&self) -> u64 {
        self.now.duration_since(UNIX_EPOCH).unwrap().as_secs()
    }

    /// The claims the kubelet projects for the agent's pod.
    fn claims(&self) -> Value {
        let now = self.secs();
        json!({
            "iss": ISSUER, "aud": ["mayfly"], "sub": "system:serviceaccount:mayfly-system:mayfly-agent",
            "exp": now + 600, "iat": now - 5, "nbf": now - 5, "jti": "7a1e2b3c-jti",
            "kubernetes.io": {
                "namespace": "mayfly-system",
                "serviceaccount": {"name": "mayfly-agent", "uid": "sa-uid-1"},
                "pod": {"name": "mayfly-agent-x7k2p", "uid": "pod-uid-1"},
                "node": {"name": "worker-1", "uid": NODE_UID},
            },
        })
    }

    fn rs256(&self, claims: &Value) -> String {
        jws(&json!({"alg": "RS256", "kid": "rsa-1"}), claims, |m| {
            let mut sig = vec![0; self.rsa.public_modulus_len()];
            self.rsa
                .sign(&RSA_PKCS1_SHA256, &SystemRandom::new(), m, &mut sig)
                .unwrap();
            sig
        })
    }

    fn es256(&self, header: &Value, claims: &Value) -> String {
        jws(header, claims, |m| {
            self.ec
                .sign(&SystemRandom::new(), m)
                .unwrap()
                .as_ref()
                .to_vec()
        })
    }

    fn verify(&self, token: &str) -> Result<ProvenNode, K8sPsatError> {
        self.attestor.verify(&evidence("prod", token), self.now)
    }

    /// The RS256 token with `change` applied to its claims is refused with `expected`; the
    /// unchanged token, the positive control, attests.
    fn refused_after_control(&self, change: impl FnOnce(&mut Value), expected: K8sPsatError) {
        let mut claims = self.claims();
        self.verify(&self.rs256(&claims)).unwrap();
        change(&mut claims);
        assert_eq!(self.verify(&self.rs256(&claims)).unwrap_err(), expected);
    }
}

fn jws(header: &Value, claims: &Value, sign: impl FnOnce(&[u8]) -> Vec<u8>) -> String {
    let input = format!(
        "{}.{}",
        b64(&serde_json::to_vec(header).unwrap()),
        b64(&serde_json::to_vec(claims).unwrap())
    );
    let sig = sign(input.as_bytes());
    format!("{input}.{}", b64(&sig))
}

fn evidence(cluster: &str, token: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"cluster": cluster, "token": token})).unwrap()
}

fn texts(node: &ProvenNode) -> Vec<&str> {
    node.selectors.iter().map(Selector::as_str).collect()
}

#[test]
fn rs256_and_es256_tokens_attest_the_bound_node() {
    let fx = fixture();
    let claims = fx.claims();
    let node = fx.verify(&fx.rs256(&claims)).unwrap();
    assert_eq!(node.node_id, format!("prod/{NODE_UID}"));
    assert_eq!(
        texts(&node),
        vec![
            "k8s_psat:agent_node_name:worker-1".to_owned(),
            format!("k8s_psat:agent_node_uid:{NODE_UID}"),
            "k8s_psat:agent_ns:mayfly-system".into(),
            "k8s_psat:agent_pod_name:mayfly-agent-x7k2p".into(),
            "k8s_psat:agent_pod_uid:pod-uid-1".into(),
            "k8s_psat:agent_sa:mayfly-agent".into(),
            "k8s_psat:cluster:prod".into(),
        ]
    );
    let single = node.single_use.clone().unwrap();
    assert_eq!(single.until, fx.now + Duration::from_secs(600));
    assert_eq!(single.key, single_use_key("prod", "7a1e2b3c-jti"));

    let es = fx.es256(
        &json!({"alg": "ES256", "kid": "ec-1", "typ": "JWT"}),
        &claims,
    );
    let node_es = fx.verify(&es).unwrap();
    assert_eq!(node_es.node_id, node.node_id);
    assert_eq!(node_es.selectors, node.selectors);
    // Both carry the same jti: the server's single-use store refuses the second.
    assert_eq!(node_es.single_use, node.single_use);

    // Through the trait: decided at once, no challenge.
    match fx.attestor.begin(&evidence("prod", &es), fx.now).unwrap() {
        Begun::Claim(NodeClaim::Proven(proven)) => assert_eq!(proven, node_es),
        other => panic!("expected a proven claim, got {other:?}"),
    }
}

#[test]
fn a_token_without_jti_is_single_use_by_its_hash() {
    let fx = fixture();
    let mut claims = fx.claims();
    let with_jti = fx.verify(&fx.rs256(&claims)).unwrap();
    claims.as_object_mut().unwrap().remove("jti");
    let token = fx.rs256(&claims);
    let without = fx.verify(&token).unwrap();
    assert_eq!(
        without.single_use.unwrap().key,
        single_use_key("prod", &token)
    );
    assert_ne!(
        with_jti.single_use.unwrap().key,
        single_use_key("prod", &token)
    );
}

#[test]
fn a_token_of_one_cluster_does_not_attest_in_another() {
    let fx = fixture();
    let token = fx.rs256(&fx.claims());
    fx.verify(&token).unwrap();
    // staging trusts its own key only, under the same kid.
    let staging_key = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
    let jwks = json!({"keys": [ec_jwk(&staging_key, "rsa-1")]});
    fx.attestor
        .set_jwks("staging", &serde_json::to_vec(&jwks).unwrap())
        .unwrap();
    assert!(matches!(
        fx.attestor.verify(&evidence("staging", &token), fx.now),
        Err(K8sPsatError::AlgMismatch { .. })
    ));
}

#[test]
fn set_jwks_replaces_the_keys_and_keeps_them_on_a_bad_document() {
    let fx = fixture();
    let claims = fx.claims();
    let rsa_token = fx.rs256(&claims);
    fx.verify(&rsa_token).unwrap();
    for bad in [
        &b"not json"[..],
        br#"{"keys": []}"#,
        br#"{"keys": [{"kty": "oct", "kid": "a", "k": "AA"}]}"#,
        br#"{"keys": [{"kty": "EC", "crv": "P-256", "kid": "a", "x": "AA", "y": "AA"}]}"#,
        br#"{"keys": [{"kty": "RSA", "kid": "a", "n": "AQAB", "e": "AQAB"}]}"#,
    ] {
        assert!(matches!(
            fx.attestor.set_jwks("prod", bad),
            Err(K8sPsatError::BadJwks(_))
        ));
        fx.verify(&rsa_token).unwrap();
    }
    let twice = json!({"keys": [ec_jwk(&fx.ec, "k"), ec_jwk(&fx.ec, "k")]});
    assert!(matches!(
        fx.attestor.set_jwks("prod", &serde_json::to_vec(&twice).unwrap()),
        Err(K8sPsatError::BadJwks(m)) if m.contains("twice")
    ));
    assert!(matches!(
        fx.attestor.set_jwks("nowhere", &fx.jwks),
        Err(K8sPsatError::UnknownCluster(_))
    ));
    // Rotation: only the EC key remains, so the RSA token no longer verifies.
    let rotated = json!({"keys": [ec_jwk(&fx.ec, "ec-1")]});
    assert_eq!(
        fx.attestor
            .set_jwks("prod", &serde_json::to_vec(&rotated).unwrap())
            .unwrap(),
        1
    );
    assert!(matches!(
        fx.verify(&rsa_token),
        Err(K8sPsatError::UnknownKid { .. })
    ));
    assert!(fx.attestor.has_key("prod", "ec-1"));
    assert!(!fx.attestor.has_key("prod", "rsa-1"));
    assert!(!fx.attestor.has_key("nowhere", "ec-1"));
    fx.verify(&fx.es256(&json!({"alg": "ES256", "kid": "ec-1"}), &claims))
        .unwrap();
}

#[test]
fn cluster_configurations_are_checked() {
    assert!(K8sPsatAttestor::new(vec![cluster("prod")]).is_ok());
    let bad = |change: fn(&mut PsatCluster)| {
        let mut c = cluster("prod");
        change(&mut c);
        K8sPsatAttestor::new(vec![c]).unwrap_err()
    };
    for err in [
        bad(|c| c.name = "a/b".into()),
        bad(|c| c.name = String::new()),
        bad(|c| c.issuer = String::new()),
        bad(|c| c.audience = String::new()),
        bad(|c| c.allowed_service_accounts = vec![]),
        bad(|c| c.allowed_service_accounts = vec!["just-a-name".into()]),
        bad(|c| c.allowed_service_accounts = vec!["a:b:c".into()]),
        K8sPsatAttestor::new(vec![]).unwrap_err(),
        K8sPsatAttestor::new(vec![cluster("prod"), cluster("prod")]).unwrap_err(),
    ] {
        assert!(matches!(err, K8sPsatError::BadCluster(_)), "{err:?}");
    }
}

#[test]
fn the_agent_reads_its_token_afresh_each_time() {
    let fx = fixture();
    let dir = tempfile::TempDir::new().unwrap();
    let path = dir.path().join("token");
    let agent = K8sPsatEvidence::new("prod".into(), path.clone());
    assert!(matches!(
        agent.evidence(),
        Err(AttestError::Unavailable { reason, .. }) if reason.contains("token")
    ));
    let first = fx.rs256(&fx.claims());
    std::fs::write(&path, format!("{first}\n")).unwrap();
    let evidence = agent.evidence().unwrap();
    let node = fx.attestor.verify(&evidence, fx.now).unwrap();
    assert_eq!(node.node_id, format!("prod/{NODE_UID}"));
    // The kubelet rotated the token: the next evidence carries the new one.
    let mut claims = fx.claims();
    claims["jti"] = json!("rotated-jti");
    std::fs::write(&path, fx.rs256(&claims)).unwrap();
    let rotated = fx
        .attestor
        .verify(&agent.evidence().unwrap(), fx.now)
        .unwrap();
    assert_ne!(rotated.single_use, node.single_use);
    assert!(agent.can_reattest());
    assert!(agent.answer(b"nonce").is_err());
    std::fs::write(&path, "  \n").unwrap();
    assert!(matches!(
        agent.evidence(),
        Err(AttestError::Unavailable { .. })
    ));
}

#[test]
fn mutated_evidence_never_panics_nor_attests_another_node() {
    let fx = fixture();
    let good = evidence("prod", &fx.rs256(&fx.claims()));
    let node = fx.attestor.verify(&good, fx.now).unwrap();
    let mut random = [0u8; 4096];
    aws_lc_rs::rand::fill(&mut random).unwrap();
    let (mut refused, mut same) = (0, 0);
    for pair in random.chunks(2) {
        let mut bad = good.clone();
        let at = usize::from(u16::from_be_bytes([pair[0], pair[1]])) % bad.len();
        bad[at] ^= 1 << (pair[0] % 8);
        match fx.attestor.verify(&bad, fx.now) {
            Err(_) => refused += 1,
            // A flip JSON reads the same way (none is expected, but it would be harmless).
            Ok(other) => {
                assert_eq!(other, node, "flip at {at}");
                same += 1;
            }
        }
    }
    assert_eq!(refused + same, 2048);
    assert!(refused > 2000, "{refused} refused, {same} read the same");
}
