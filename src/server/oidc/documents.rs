//! What the discovery endpoint answers: the OpenID provider configuration, the JWKS, and
//! short errors for anything else. Pure functions of the request line and the published keys,
//! so every answer is tested without a socket.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Response, StatusCode, header};
use http_body_util::Full;

use super::issuer::Issuer;
use crate::jwt::JwtBundle;

/// The discovery document's path (OpenID Connect Discovery 1.0, section 4).
pub const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";
/// The JWKS path; `jwks_uri` is the issuer followed by it.
pub const KEYS_PATH: &str = "/keys";

/// The OpenID provider configuration for `issuer`, as SPIRE's discovery provider writes it:
/// relying parties that only verify tokens (cloud IAM, Vault's JWT auth, PyJWT) read `issuer`
/// and `jwks_uri`; the other fields are required by the specification and say that tokens are
/// ES256 ID tokens with public subjects. There is no authorization endpoint: the empty string
/// is what SPIRE sends, which parsers that insist on the field accept.
pub fn discovery_document(issuer: &Issuer) -> Vec<u8> {
    let doc = serde_json::json!({
        "issuer": issuer.as_str(),
        "jwks_uri": issuer.jwks_uri(),
        "authorization_endpoint": "",
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["ES256"],
    });
    serde_json::to_vec(&doc).unwrap_or_default()
}

/// The JWKS of `bundle`'s keys for relying parties outside SPIFFE. Each key is marked
/// `use: sig`, not `jwt-svid` as in a SPIFFE bundle: generic OIDC clients keep only signing
/// keys (PyJWT's `PyJWKClient` drops every key whose `use` is neither `sig` nor absent), and
/// SPIRE's discovery provider does the same.
pub fn jwks_document(bundle: &JwtBundle) -> Vec<u8> {
    let keys: Vec<_> = bundle
        .keys()
        .map(|k| {
            let mut jwk = k.to_jwk();
            jwk.use_ = Some("sig".into());
            jwk
        })
        .collect();
    serde_json::to_vec(&serde_json::json!({ "keys": keys })).unwrap_or_default()
}

/// The answer to `method path`: the two documents for GET (and HEAD, whose body hyper drops),
/// 405 for other methods on them, 404 elsewhere. `keys` is only called for the JWKS, and
/// `max_age` is how long clients may cache either document.
pub fn respond(
    method: &Method,
    path: &str,
    issuer: &Issuer,
    keys: impl FnOnce() -> JwtBundle,
    max_age: Duration,
) -> Response<Full<Bytes>> {
    let body = match path {
        DISCOVERY_PATH => discovery_document(issuer),
        KEYS_PATH if method == Method::GET || method == Method::HEAD => jwks_document(&keys()),
        KEYS_PATH => Vec::new(),
        _ => {
            return text(
                StatusCode::NOT_FOUND,
                "not found: this server serves only /.well-known/openid-configuration and /keys\n",
            );
        }
    };
    if method != Method::GET && method != Method::HEAD {
        let mut response = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed: use GET\n",
        );
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let mut response = Response::new(Full::new(Bytes::from(body)));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(value) = HeaderValue::from_str(&format!("public, max-age={}", max_age.as_secs())) {
        headers.insert(header::CACHE_CONTROL, value);
    }
    response
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::TrustDomain;
    use crate::jwt::JwtSigner;

    fn no_keys() -> JwtBundle {
        JwtBundle::new(TrustDomain::new("t.test").unwrap(), [])
    }

    fn issuer() -> Issuer {
        "https://oidc.example.com".parse().unwrap()
    }

    fn json(response: &Response<Full<Bytes>>) -> serde_json::Value {
        use http_body_util::BodyExt as _;
        let body = futures::executor::block_on(response.body().clone().collect())
            .unwrap()
            .to_bytes();
        serde_json::from_slice(&body).unwrap()
    }

    #[test]
    fn the_discovery_document_names_the_issuer_and_its_jwks_uri() {
        let r = respond(
            &Method::GET,
            DISCOVERY_PATH,
            &issuer(),
            no_keys,
            Duration::from_secs(60),
        );
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
        assert_eq!(r.headers()[header::CACHE_CONTROL], "public, max-age=60");
        let doc = json(&r);
        assert_eq!(doc["issuer"], "https://oidc.example.com");
        assert_eq!(doc["jwks_uri"], "https://oidc.example.com/keys");
        assert_eq!(doc["id_token_signing_alg_values_supported"][0], "ES256");
    }

    #[test]
    fn the_jwks_holds_every_key_as_a_signing_key() {
        let (a, _) = JwtSigner::generate().unwrap();
        let (b, _) = JwtSigner::generate().unwrap();
        let mut keys = vec![a.public().clone(), b.public().clone()];
        keys.sort_by(|x, y| x.kid().cmp(y.kid()));
        let bundle = JwtBundle::new(TrustDomain::new("t.test").unwrap(), keys.clone());
        let r = respond(
            &Method::GET,
            KEYS_PATH,
            &issuer(),
            || bundle,
            Duration::from_secs(5),
        );
        let doc = json(&r);
        let got = doc["keys"].as_array().unwrap();
        assert_eq!(got.len(), 2);
        for (jwk, key) in got.iter().zip(&keys) {
            assert_eq!(jwk["kid"], key.kid());
            assert_eq!(jwk["use"], "sig");
            assert_eq!(jwk["kty"], "EC");
            assert_eq!(jwk["alg"], "ES256");
        }
    }

    #[test]
    fn other_paths_are_not_found_and_other_methods_not_allowed() {
        let missing = respond(&Method::GET, "/keys/", &issuer(), no_keys, Duration::ZERO);
        assert_eq!(missing.status(), StatusCode::NOT_FOUND);
        let post = respond(
            &Method::POST,
            KEYS_PATH,
            &issuer(),
            || panic!("no keys read"),
            Duration::ZERO,
        );
        assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(post.headers()[header::ALLOW], "GET, HEAD");
        let control = respond(&Method::HEAD, KEYS_PATH, &issuer(), no_keys, Duration::ZERO);
        assert_eq!(control.status(), StatusCode::OK);
    }
}
