//! Each refusal of a token, after its positive control on the same fixture.

use serde_json::{Value, json};

use super::*;

#[test]
fn wrong_audience_is_refused() {
    let fx = fixture();
    fx.refused_after_control(
        |c| c["aud"] = json!(["vault", "https://kubernetes.default.svc"]),
        K8sPsatError::WrongAudience("mayfly".into()),
    );
    fx.refused_after_control(
        |c| {
            c.as_object_mut().unwrap().remove("aud");
        },
        K8sPsatError::WrongAudience("mayfly".into()),
    );
    // A single-string audience is read as well.
    let mut claims = fx.claims();
    claims["aud"] = json!("mayfly");
    fx.verify(&fx.rs256(&claims)).unwrap();
}

#[test]
fn wrong_issuer_is_refused() {
    let fx = fixture();
    fx.refused_after_control(
        |c| c["iss"] = json!("https://other.example"),
        K8sPsatError::WrongIssuer {
            got: "https://other.example".into(),
            cluster: "prod".into(),
        },
    );
}

#[test]
fn alg_none_is_refused() {
    let fx = fixture();
    let claims = fx.claims();
    fx.verify(&fx.rs256(&claims)).unwrap();
    let none = jws(&json!({"alg": "none", "kid": "rsa-1"}), &claims, |_| vec![]);
    assert_eq!(
        fx.verify(&none).unwrap_err(),
        K8sPsatError::Alg("none".into())
    );
    let missing = jws(&json!({"kid": "rsa-1"}), &claims, |_| vec![]);
    assert!(matches!(fx.verify(&missing), Err(K8sPsatError::Alg(_))));
}

#[test]
fn hs256_signed_with_the_public_key_is_refused() {
    let fx = fixture();
    let claims = fx.claims();
    fx.verify(&fx.rs256(&claims)).unwrap();
    // The classic confusion: HMAC keyed with what the verifier holds as the public key.
    for public in [fx.rsa.public_key().as_ref().to_vec(), fx.jwks.clone()] {
        let forged = jws(&json!({"alg": "HS256", "kid": "rsa-1"}), &claims, |m| {
            let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &public);
            aws_lc_rs::hmac::sign(&key, m).as_ref().to_vec()
        });
        let err = fx.verify(&forged).unwrap_err();
        assert_eq!(err, K8sPsatError::Alg("HS256".into()));
        assert!(matches!(
            fx.attestor.begin(&evidence("prod", &forged), fx.now),
            Err(AttestError::Refused { .. })
        ));
    }
    for alg in ["HS384", "PS256", "RS512", "ES384", "EdDSA"] {
        let token = fx.rs256(&claims).replacen(
            &b64(br#"{"alg":"RS256","kid":"rsa-1"}"#),
            &b64(format!(r#"{{"alg":"{alg}","kid":"rsa-1"}}"#).as_bytes()),
            1,
        );
        assert_eq!(
            fx.verify(&token).unwrap_err(),
            K8sPsatError::Alg(alg.into())
        );
    }
}

#[test]
fn unknown_kid_is_refused_and_asks_for_a_refresh() {
    let fx = fixture();
    let claims = fx.claims();
    fx.verify(&fx.rs256(&claims)).unwrap();
    assert!(fx.unknown_kid_calls.lock().unwrap().is_empty());
    let token = fx.es256(&json!({"alg": "ES256", "kid": "rotated-2"}), &claims);
    assert_eq!(
        fx.verify(&token).unwrap_err(),
        K8sPsatError::UnknownKid {
            kid: "rotated-2".into(),
            cluster: "prod".into()
        }
    );
    assert_eq!(
        *fx.unknown_kid_calls.lock().unwrap(),
        vec!["prod".to_owned()]
    );
    // A cluster with no JWKS yet knows no kid either.
    assert!(matches!(
        fx.attestor
            .verify(&evidence("staging", &fx.rs256(&claims)), fx.now),
        Err(K8sPsatError::UnknownKid { .. })
    ));
    let no_kid = fx.es256(&json!({"alg": "ES256"}), &claims);
    assert_eq!(fx.verify(&no_kid).unwrap_err(), K8sPsatError::MissingKid);
}

#[test]
fn bad_signatures_are_refused() {
    let fx = fixture();
    let claims = fx.claims();
    let good = fx.rs256(&claims);
    fx.verify(&good).unwrap();
    // The same header and claims, another pod's namespace swapped in after signing.
    let mut forged_claims = claims.clone();
    forged_claims["kubernetes.io"]["namespace"] = json!("kube-system");
    let (head, rest) = good.split_once('.').unwrap();
    let sig = rest.split_once('.').unwrap().1;
    let swapped = format!(
        "{head}.{}.{sig}",
        b64(&serde_json::to_vec(&forged_claims).unwrap())
    );
    assert_eq!(fx.verify(&swapped).unwrap_err(), K8sPsatError::BadSignature);
    // Signed by another P-256 key under the cluster's kid.
    let other = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
    let by_other = jws(&json!({"alg": "ES256", "kid": "ec-1"}), &claims, |m| {
        other
            .sign(&SystemRandom::new(), m)
            .unwrap()
            .as_ref()
            .to_vec()
    });
    fx.verify(&fx.es256(&json!({"alg": "ES256", "kid": "ec-1"}), &claims))
        .unwrap();
    assert_eq!(
        fx.verify(&by_other).unwrap_err(),
        K8sPsatError::BadSignature
    );
    // An ES256 signature presented under the RSA key's kid.
    let confused = fx.es256(&json!({"alg": "ES256", "kid": "rsa-1"}), &claims);
    assert!(matches!(
        fx.verify(&confused),
        Err(K8sPsatError::AlgMismatch { .. })
    ));
}

#[test]
fn expired_tokens_are_refused() {
    let fx = fixture();
    let now = fx.secs();
    fx.refused_after_control(|c| c["exp"] = json!(now - 10), K8sPsatError::Expired(10));
    fx.refused_after_control(|c| c["exp"] = json!(now), K8sPsatError::Expired(0));
    fx.refused_after_control(
        |c| {
            c.as_object_mut().unwrap().remove("exp");
        },
        K8sPsatError::MissingClaim("exp"),
    );
}

#[test]
fn tokens_from_the_future_are_refused_beyond_the_skew() {
    let fx = fixture();
    let now = fx.secs();
    // Within the 30 s of skew: accepted.
    let mut claims = fx.claims();
    claims["nbf"] = json!(now + 30);
    claims["iat"] = json!(now + 30);
    fx.verify(&fx.rs256(&claims)).unwrap();
    fx.refused_after_control(
        |c| c["nbf"] = json!(now + 31),
        K8sPsatError::NotYetValid {
            claim: "nbf",
            ahead: 31,
        },
    );
    fx.refused_after_control(
        |c| c["iat"] = json!(now + 3600),
        K8sPsatError::NotYetValid {
            claim: "iat",
            ahead: 3600,
        },
    );
}

#[test]
fn disallowed_service_accounts_are_refused() {
    let fx = fixture();
    fx.refused_after_control(
        |c| c["kubernetes.io"]["serviceaccount"]["name"] = json!("default"),
        K8sPsatError::NotAllowed("mayfly-system:default".into(), "prod".into()),
    );
    fx.refused_after_control(
        |c| c["kubernetes.io"]["namespace"] = json!("default"),
        K8sPsatError::NotAllowed("default:mayfly-agent".into(), "prod".into()),
    );
}

#[test]
fn tokens_without_pod_and_node_binding_are_refused() {
    let fx = fixture();
    let remove = |path: &'static [&'static str]| {
        move |c: &mut Value| {
            let (last, parents) = path.split_last().unwrap();
            let mut at = c;
            for p in parents {
                at = &mut at[*p];
            }
            at.as_object_mut().unwrap().remove(*last);
        }
    };
    for (path, claim) in [
        (&["kubernetes.io"][..], "kubernetes.io"),
        (&["kubernetes.io", "pod"], "kubernetes.io.pod.name"),
        (&["kubernetes.io", "node"], "kubernetes.io.node.name"),
        (&["kubernetes.io", "node", "uid"], "kubernetes.io.node.uid"),
        (&["kubernetes.io", "pod", "uid"], "kubernetes.io.pod.uid"),
        (&["kubernetes.io", "namespace"], "kubernetes.io.namespace"),
    ] {
        fx.refused_after_control(remove(path), K8sPsatError::MissingClaim(claim));
    }
}

#[test]
fn node_uids_that_are_not_path_segments_are_refused() {
    let fx = fixture();
    for uid in ["../etc", "a/b", "a b", ".."] {
        fx.refused_after_control(
            |c| c["kubernetes.io"]["node"]["uid"] = json!(uid),
            K8sPsatError::BadValue {
                claim: "kubernetes.io.node.uid",
                value: uid.into(),
            },
        );
    }
    fx.refused_after_control(
        |c| c["kubernetes.io"]["pod"]["name"] = json!("a\u{7}b"),
        K8sPsatError::BadValue {
            claim: "kubernetes.io.pod.name",
            value: "a\\u{7}b".into(),
        },
    );
}

#[test]
fn evidence_over_64_kib_is_refused_before_parsing() {
    let fx = fixture();
    let mut claims = fx.claims();
    claims["padding"] = json!("x".repeat(40 * 1024));
    fx.verify(&fx.rs256(&claims)).unwrap();
    claims["padding"] = json!("x".repeat(64 * 1024));
    let big = evidence("prod", &fx.rs256(&claims));
    assert!(big.len() > MAX_EVIDENCE);
    assert!(matches!(
        fx.attestor.verify(&big, fx.now),
        Err(K8sPsatError::Malformed(m)) if m.contains("64 KiB")
    ));
    assert!(matches!(
        fx.attestor.begin(&vec![b'{'; 1024 * 1024], fx.now),
        Err(AttestError::Malformed { .. })
    ));
}

#[test]
fn garbage_is_refused_as_malformed() {
    let fx = fixture();
    let good = fx.rs256(&fx.claims());
    fx.verify(&good).unwrap();
    let (head, _) = good.split_once('.').unwrap();
    let not_json_claims = format!("{head}.{}.", b64(b"not json"));
    let mut cases: Vec<Vec<u8>> = vec![
        vec![],
        b"\xff\xfe\x00garbage".to_vec(),
        b"null".to_vec(),
        b"[]".to_vec(),
        br#"{"cluster":"prod"}"#.to_vec(),
        br#"{"cluster":"prod","token":7}"#.to_vec(),
        br#"{"cluster":"prod","token":"x","extra":1}"#.to_vec(),
        "[".repeat(10_000).into_bytes(),
    ];
    for token in [
        "",
        "a.b",
        "a.b.c.d.e",
        "!!!.b.c",
        &format!("{}.e30.", b64(b"[1]")),
        &format!("{head}.e30.***"),
        &format!(
            "{}.e30.",
            b64(br#"{"alg":"RS256","kid":"rsa-1","crit":["exp"]}"#)
        ),
    ] {
        cases.push(evidence("prod", token));
    }
    for case in &cases {
        let err = fx.attestor.verify(case, fx.now).unwrap_err();
        assert!(
            matches!(err, K8sPsatError::Malformed(_)),
            "{case:?}: {err:?}"
        );
        assert!(matches!(
            fx.attestor.begin(case, fx.now),
            Err(AttestError::Malformed { .. })
        ));
    }
    // A payload that is not JSON is read only after its signature, which fails first here.
    assert_eq!(
        fx.verify(&not_json_claims).unwrap_err(),
        K8sPsatError::BadSignature
    );
    // A correctly signed payload of the wrong shape is malformed.
    let mut wrong_shape = fx.claims();
    wrong_shape["exp"] = json!("tomorrow");
    assert!(matches!(
        fx.verify(&fx.rs256(&wrong_shape)),
        Err(K8sPsatError::Malformed(_))
    ));
    assert_eq!(
        fx.attestor
            .verify(&evidence("elsewhere", &good), fx.now)
            .unwrap_err(),
        K8sPsatError::UnknownCluster("elsewhere".into())
    );
}
