//! Every refusal next to its positive control: the same fixture, one thing changed.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::json;

use super::*;
use crate::id::{Scope, TrustDomain};
use crate::jwt::{Claims, JwtBundle, JwtSigner, TokenKind};

const NOW: u64 = 1_800_000_000;

struct Fixture {
    signer: JwtSigner,
    bundles: JwtBundles,
}

fn fixture() -> Fixture {
    let (signer, _) = JwtSigner::generate().unwrap();
    let td = TrustDomain::new("t.test").unwrap();
    let bundles = [JwtBundle::new(td, [signer.public().clone()])]
        .into_iter()
        .collect();
    Fixture { signer, bundles }
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

/// A token with exactly `header` and `body`, signed by `signer` (ES256 over the two parts).
fn raw(signer: &JwtSigner, header: &Value, body: &Value) -> String {
    let mut t = URL_SAFE_NO_PAD.encode(header.to_string());
    t.push('.');
    t.push_str(&URL_SAFE_NO_PAD.encode(body.to_string()));
    let sig = signer.sign(t.as_bytes()).unwrap();
    format!("{t}.{}", URL_SAFE_NO_PAD.encode(sig))
}

fn header(f: &Fixture) -> Value {
    json!({"alg": "ES256", "kid": f.signer.kid(), "typ": "JWT"})
}

fn body() -> Value {
    json!({"sub": "spiffe://t.test/bot", "aud": ["api"], "iat": NOW - 10, "exp": NOW + 60, "jti": "j1"})
}

fn check(f: &Fixture, token: &str) -> Result<Validated, JwtError> {
    validate(token, "api", &f.bundles, NOW)
}

#[test]
fn a_signed_identity_token_validates_and_returns_its_claims() {
    let f = fixture();
    let claims = Claims::new(
        &TokenKind::Identity,
        &id("spiffe://t.test/bot"),
        "api",
        NOW - 1,
        NOW + 300,
    )
    .unwrap();
    let token = claims.sign(&f.signer).unwrap();
    let ok = check(&f, &token).unwrap();
    assert_eq!(ok.spiffe_id().as_str(), "spiffe://t.test/bot");
    assert!(ok.subject.scopes().is_empty());
    assert_eq!(ok.expires_at, NOW + 300);
    assert_eq!(ok.jti.as_deref().map(str::len), Some(32));
    assert_eq!(ok.claims["aud"], json!(["api"]));
    // Two tokens never share a jti.
    let other = Claims::new(
        &TokenKind::Identity,
        &id("spiffe://t.test/bot"),
        "api",
        NOW,
        NOW + 1,
    )
    .unwrap();
    assert_ne!(other.jti, claims.jti);
}

#[test]
fn a_task_token_carries_its_scopes_in_sub_and_in_the_scope_claim() {
    let f = fixture();
    let scopes = [
        Scope::parse("stripe:read:customers").unwrap(),
        Scope::parse("db:read").unwrap(),
    ]
    .into_iter()
    .collect();
    let scoped = ScopedId::new(id("spiffe://t.test/bot"), scopes).unwrap();
    let claims = Claims::new(
        &TokenKind::Task(scoped.clone()),
        scoped.base(),
        "api",
        NOW,
        NOW + 60,
    )
    .unwrap();
    let token = claims.sign(&f.signer).unwrap();
    let ok = check(&f, &token).unwrap();
    assert_eq!(ok.subject, scoped);
    assert_eq!(ok.claims["scope"], json!("db:read stripe:read:customers"));

    // A scope claim that disagrees with sub is refused, though signed.
    let mut b = body();
    b["sub"] = json!(scoped.spiffe_id().as_str());
    b["scope"] = json!("db:read stripe:read:customers");
    assert!(check(&f, &raw(&f.signer, &header(&f), &b)).is_ok());
    b["scope"] = json!("db:read stripe:write:customers");
    assert_eq!(
        check(&f, &raw(&f.signer, &header(&f), &b)),
        Err(JwtError::ScopeMismatch)
    );
}

#[test]
fn the_shape_is_checked_first() {
    let f = fixture();
    let good = raw(&f.signer, &header(&f), &body());
    assert!(check(&f, &good).is_ok());
    let parts: Vec<&str> = good.split('.').collect();
    assert!(matches!(
        check(&f, &parts[..2].join(".")),
        Err(JwtError::Malformed(_))
    ));
    assert!(matches!(
        check(&f, &format!("{good}.x")),
        Err(JwtError::Malformed(_))
    ));
    assert!(matches!(check(&f, "abc"), Err(JwtError::Malformed(_))));
    assert!(matches!(
        check(&f, &format!("{}.{}!.{}", parts[0], parts[1], parts[2])),
        Err(JwtError::Malformed(_))
    ));
    let long = format!("{good}{}", "A".repeat(64 * 1024));
    assert_eq!(check(&f, &long), Err(JwtError::TooLong(long.len())));
}

#[test]
fn only_es256_with_a_known_kid_is_accepted() {
    let f = fixture();
    assert!(check(&f, &raw(&f.signer, &header(&f), &body())).is_ok());
    let mut h = header(&f);
    h["alg"] = json!("none");
    let unsigned = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(h.to_string()),
        URL_SAFE_NO_PAD.encode(body().to_string())
    );
    assert_eq!(check(&f, &unsigned), Err(JwtError::AlgNone));
    h["alg"] = json!("HS256");
    // HS256 "signed" with the public key as the secret: the classic confusion attack.
    let mut t = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(h.to_string()),
        URL_SAFE_NO_PAD.encode(body().to_string())
    );
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, f.signer.public().point());
    let tag = aws_lc_rs::hmac::sign(&key, t.as_bytes());
    t = format!("{t}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()));
    assert!(matches!(check(&f, &t), Err(JwtError::AlgHmac(_))));
    h["alg"] = json!("RS256");
    assert!(matches!(
        check(&f, &raw(&f.signer, &h, &body())),
        Err(JwtError::AlgUnsupported(_))
    ));
    let mut h = header(&f);
    h.as_object_mut().unwrap().remove("kid");
    assert_eq!(
        check(&f, &raw(&f.signer, &h, &body())),
        Err(JwtError::MissingKid)
    );
    h["kid"] = json!("unknown");
    assert!(matches!(
        check(&f, &raw(&f.signer, &h, &body())),
        Err(JwtError::UnknownKid { .. })
    ));
}

#[test]
fn a_signature_by_another_key_or_over_other_bytes_fails() {
    let f = fixture();
    let good = raw(&f.signer, &header(&f), &body());
    assert!(check(&f, &good).is_ok());
    let (other, _) = JwtSigner::generate().unwrap();
    // Signed by another key under our kid.
    assert_eq!(
        check(&f, &raw(&other, &header(&f), &body())),
        Err(JwtError::BadSignature)
    );
    // Our signature over a changed payload.
    let mut b = body();
    b["sub"] = json!("spiffe://t.test/admin");
    let parts: Vec<&str> = good.split('.').collect();
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(b.to_string()),
        parts[2]
    );
    assert_eq!(check(&f, &forged), Err(JwtError::BadSignature));
    // A subject of a trust domain we hold no bundle for.
    b["sub"] = json!("spiffe://other.test/bot");
    assert!(matches!(
        check(&f, &raw(&f.signer, &header(&f), &b)),
        Err(JwtError::UnknownTrustDomain(_))
    ));
}

#[test]
fn time_claims_are_enforced() {
    let f = fixture();
    let mut b = body();
    assert!(check(&f, &raw(&f.signer, &header(&f), &b)).is_ok());
    b["exp"] = json!(NOW);
    assert_eq!(
        check(&f, &raw(&f.signer, &header(&f), &b)),
        Err(JwtError::Expired(0))
    );
    b.as_object_mut().unwrap().remove("exp");
    assert_eq!(
        check(&f, &raw(&f.signer, &header(&f), &b)),
        Err(JwtError::BadClaim("exp"))
    );
    b["exp"] = json!("tomorrow");
    assert_eq!(
        check(&f, &raw(&f.signer, &header(&f), &b)),
        Err(JwtError::BadClaim("exp"))
    );
    b["exp"] = json!(NOW + 60);
    b["nbf"] = json!(NOW + 30);
    assert_eq!(
        check(&f, &raw(&f.signer, &header(&f), &b)),
        Err(JwtError::NotYetValid(30))
    );
    b["nbf"] = json!(NOW);
    assert!(check(&f, &raw(&f.signer, &header(&f), &b)).is_ok());
}

#[test]
fn exactly_one_matching_audience_and_a_spiffe_subject() {
    let f = fixture();
    let mut b = body();
    b["aud"] = json!("api");
    assert!(
        check(&f, &raw(&f.signer, &header(&f), &b)).is_ok(),
        "a plain string audience"
    );
    b["aud"] = json!(["api", "other"]);
    assert_eq!(
        check(&f, &raw(&f.signer, &header(&f), &b)),
        Err(JwtError::SeveralAudiences(2))
    );
    b["aud"] = json!(["other"]);
    assert!(matches!(
        check(&f, &raw(&f.signer, &header(&f), &b)),
        Err(JwtError::WrongAudience { .. })
    ));
    b.as_object_mut().unwrap().remove("aud");
    assert_eq!(
        check(&f, &raw(&f.signer, &header(&f), &b)),
        Err(JwtError::BadClaim("aud"))
    );
    b["aud"] = json!("api");
    b["sub"] = json!("https://t.test/bot");
    assert!(matches!(
        check(&f, &raw(&f.signer, &header(&f), &b)),
        Err(JwtError::BadSubject(_))
    ));
}
