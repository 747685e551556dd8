//! `mayfly proxy --accept jwt` at the HTTP layer, in process on real sockets: the proxy
//! (`mayfly::proxy::start_with_jwt`), an echo upstream, and clients over TCP + TLS 1.3 (rustls
//! and hyper, and the `curl` binary for one). Tokens are signed here with `jwt::JwtSigner` and
//! the proxy trusts a `JwtBundleSource` given in code, so every refusal the validator knows can
//! be provoked with a token made for it; the end-to-end test with the agent's tokens is in
//! tests/proxy_jwt_e2e.rs. Every refusal has its positive control on the same proxy.

#[path = "common/echo.rs"]
mod echo;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use mayfly::id::{ScopedId, SpiffeId, TrustDomain};
use mayfly::jwt::{Claims, JwtBundle, JwtBundles, JwtSigner, TokenKind};
use mayfly::mtls::{self, PeerPolicy, SvidSource};
use mayfly::proxy::routes::Routes;
use mayfly::proxy::{Accept, BearerPolicy, ProxyConfig, ProxyMode, RunningProxy};
use mayfly::svid::Bundles;
use mayfly::workload_client::JwtBundleSource;
use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

const TD: &str = "t.test";
const PROXY_ID: &str = "spiffe://t.test/proxy";
const BOT: &str = "spiffe://t.test/bot";
const AUDIENCE: &str = "https://refunds.internal";
const ROUTES: [&str; 2] = ["GET /read a:read", "POST /write a:write"];

// ---------------------------------------------------------------------------------------------
// The fixture: a CA, the proxy's SVID, a client SVID, the JWT key, the upstream.

struct Ca {
    cert: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new() -> Self {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names = vec![uri(&format!("spiffe://{TD}"))];
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, "t CA");
        params.serial_number = Some(SerialNumber::from_slice(&[1]));
        let cert = params.self_signed(&key).unwrap();
        Self {
            cert: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// An X509-SVID for `id` (also naming `localhost`, for curl): its chain and PKCS#8 key.
    fn leaf(&self, id: &str) -> (Vec<CertificateDer<'static>>, Vec<u8>) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.subject_alt_names = vec![
            uri(id),
            SanType::DnsName(Ia5String::try_from("localhost").unwrap()),
        ];
        params.distinguished_name = DistinguishedName::new();
        params.serial_number = Some(SerialNumber::from_slice(&[0x0a]));
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + time::Duration::minutes(10);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (vec![cert.der().clone()], key.serialize_der())
    }

    fn bundles(&self) -> Bundles {
        [(TrustDomain::new(TD).unwrap(), vec![self.cert.clone()])]
            .into_iter()
            .collect()
    }
}

fn uri(s: &str) -> SanType {
    SanType::URI(Ia5String::try_from(s).unwrap())
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn bundles_of(signers: &[&JwtSigner]) -> JwtBundles {
    [JwtBundle::new(
        TrustDomain::new(TD).unwrap(),
        signers.iter().map(|s| s.public().clone()),
    )]
    .into_iter()
    .collect()
}

/// A task token for BOT with `scopes`, signed by `signer`.
fn token(signer: &JwtSigner, scopes: &str, aud: &str, iat: u64, exp: u64) -> String {
    let id = if scopes.is_empty() {
        SpiffeId::parse(BOT).unwrap()
    } else {
        SpiffeId::parse(&format!("{BOT}/scope/{scopes}")).unwrap()
    };
    let scoped = ScopedId::from_spiffe_id(&id).unwrap();
    Claims::new(&TokenKind::Task(scoped), &id, aud, iat, exp)
        .unwrap()
        .sign(signer)
        .unwrap()
}

fn valid(signer: &JwtSigner, scopes: &str) -> String {
    token(signer, scopes, AUDIENCE, now() - 5, now() + 300)
}

/// A compact JWS with `header` and `claims` (JSON) and `signature` (raw bytes), as an attacker
/// would write it.
fn forged(header: &str, claims: &str, signature: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims),
        URL_SAFE_NO_PAD.encode(signature)
    )
}

struct Fixture {
    ca: Ca,
    signer: JwtSigner,
    /// The signer's PKCS#8 key, to sign tokens `Claims` cannot write.
    pkcs8: Vec<u8>,
    jwt: JwtBundleSource,
    proxy: RunningProxy,
}

async fn fixture(x509: bool, single_use: bool) -> Fixture {
    let ca = Ca::new();
    let (chain, key) = ca.leaf(PROXY_ID);
    let source = SvidSource::from_parts(chain, &key, ca.bundles()).unwrap();
    let (signer, pkcs8) = JwtSigner::generate().unwrap();
    let jwt = JwtBundleSource::fixed(bundles_of(&[&signer]));
    let config = ProxyConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        upstream: echo::echo_upstream().await,
        mode: ProxyMode::Http(Routes::parse(&ROUTES).unwrap()),
        policy: PeerPolicy::any_id(),
        own_id: None,
        accept: Accept {
            x509,
            jwt: Some(BearerPolicy {
                audience: AUDIENCE.into(),
                single_use,
            }),
        },
    };
    let proxy = mayfly::proxy::start_with_jwt(config, source, jwt.clone())
        .await
        .unwrap();
    Fixture {
        ca,
        signer,
        pkcs8,
        jwt,
        proxy,
    }
}

// ---------------------------------------------------------------------------------------------
// The client.

struct Answer {
    status: u16,
    challenge: Option<String>,
    body: String,
}

struct Client {
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
}

impl Client {
    /// A TLS connection to the proxy, with the client SVID of `with_cert` if given.
    async fn connect(f: &Fixture, with_cert: Option<&str>) -> Result<Self, String> {
        let source = match with_cert {
            Some(id) => {
                let (chain, key) = f.ca.leaf(id);
                SvidSource::from_parts(chain, &key, f.ca.bundles()).unwrap()
            }
            None => SvidSource::trust_only(f.ca.bundles()).unwrap(),
        };
        let mut config = mtls::client_config(&source, PeerPolicy::any_id()).unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tcp = TcpStream::connect(f.proxy.local_addr).await.unwrap();
        let tls = TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .map_err(|e| e.to_string())?;
        let (sender, driver) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(driver);
        Ok(Self { sender })
    }

    async fn send(&mut self, method: &str, path: &str, authorization: Option<&str>) -> Answer {
        self.sender.ready().await.unwrap();
        let mut request = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, "localhost")
            .header("x-mayfly-spiffe-id", "spiffe://t.test/forged");
        if let Some(value) = authorization {
            request = request.header(http::header::AUTHORIZATION, value);
        }
        let response = self
            .sender
            .send_request(request.body(Empty::new()).unwrap())
            .await
            .unwrap();
        let status = response.status().as_u16();
        let challenge = response
            .headers()
            .get(http::header::WWW_AUTHENTICATE)
            .map(|v| v.to_str().unwrap().to_owned());
        let body = response.into_body().collect().await.unwrap().to_bytes();
        Answer {
            status,
            challenge,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }

    async fn bearer(&mut self, method: &str, path: &str, token: &str) -> Answer {
        self.send(method, path, Some(&format!("Bearer {token}")))
            .await
    }
}

/// A 401 whose one-line body holds `reason`, with the challenge carrying it too.
fn assert_401(answer: &Answer, reason: &str) {
    assert_eq!(answer.status, 401, "{}", answer.body);
    assert!(
        answer.body.contains(reason),
        "{reason:?} in {:?}",
        answer.body
    );
    assert_eq!(
        answer.body.trim_end().lines().count(),
        1,
        "{:?}",
        answer.body
    );
    let challenge = answer.challenge.as_deref().expect("WWW-Authenticate");
    assert!(
        challenge
            .starts_with("Bearer realm=\"mayfly\", error=\"invalid_token\", error_description=\""),
        "{challenge}"
    );
}

fn echoed_token(method_path: &str, scopes: &str, jti_of: &str) -> String {
    let claims = jti_of.split('.').nth(1).unwrap();
    let claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims).unwrap()).unwrap();
    let jti = claims["jti"].as_str().unwrap();
    format!(
        "{method_path}\nx-mayfly-jti: {jti}\nx-mayfly-scopes: {scopes}\nx-mayfly-spiffe-id: {BOT}\n"
    )
}

// ---------------------------------------------------------------------------------------------
// The tests.

#[tokio::test]
async fn a_valid_token_is_decided_by_the_routes_and_forwarded_without_authorization() {
    let f = fixture(false, false).await;
    let read = valid(&f.signer, "a.read");
    let mut c = Client::connect(&f, None).await.unwrap();
    let ok = c.bearer("GET", "/read/42", &read).await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(ok.body, echoed_token("GET /read/42", "a:read", &read));
    // Again on the same connection (the remembered token), then the scope it lacks.
    assert_eq!(c.bearer("GET", "/read", &read).await.status, 200);
    let denied = c.bearer("POST", "/write", &read).await;
    assert_eq!(denied.status, 403, "{}", denied.body);
    assert!(
        denied.body.contains("needs scope a:write"),
        "{}",
        denied.body
    );
    assert!(denied.challenge.is_none());
    let write = valid(&f.signer, "a.write");
    let ok = c.bearer("POST", "/write", &write).await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(ok.body, echoed_token("POST /write", "a:write", &write));
}

#[tokio::test]
async fn each_bad_token_is_refused_with_401_and_its_reason() {
    let f = fixture(false, false).await;
    let mut c = Client::connect(&f, None).await.unwrap();
    // The positive control, on the same connection as every refusal.
    assert_eq!(
        c.bearer("GET", "/read", &valid(&f.signer, "a.read"))
            .await
            .status,
        200
    );

    let missing = c.send("GET", "/read", None).await;
    assert_eq!(missing.status, 401);
    assert!(missing.body.contains("no bearer token"), "{}", missing.body);
    assert_eq!(
        missing.challenge.as_deref(),
        Some("Bearer realm=\"mayfly\"")
    );

    let basic = c.send("GET", "/read", Some("Basic dXNlcjpwdw==")).await;
    assert_401(&basic, "is not 'Bearer <JWT-SVID>'");
    assert_401(
        &c.bearer("GET", "/read", "not-a-jwt").await,
        "not a compact JWS",
    );

    let t = now();
    let claims = format!(
        r#"{{"sub":"{BOT}/scope/a.read","aud":["{AUDIENCE}"],"iat":{},"exp":{},"jti":"x","scope":"a:read"}}"#,
        t - 5,
        t + 300
    );
    let kid = f.signer.kid();
    let none = forged(r#"{"alg":"none","typ":"JWT"}"#, &claims, b"");
    assert_401(&c.bearer("GET", "/read", &none).await, "alg none");
    let hmac = forged(
        &format!(r#"{{"alg":"HS256","kid":"{kid}"}}"#),
        &claims,
        &[7; 32],
    );
    assert_401(
        &c.bearer("GET", "/read", &hmac).await,
        "HMAC-signed (HS256)",
    );
    let unknown = forged(r#"{"alg":"ES256","kid":"nobody"}"#, &claims, &[7; 64]);
    assert_401(
        &c.bearer("GET", "/read", &unknown).await,
        "key nobody is not in the JWT bundle",
    );
    let bad_sig = forged(
        &format!(r#"{{"alg":"ES256","kid":"{kid}"}}"#),
        &claims,
        &[7; 64],
    );
    assert_401(
        &c.bearer("GET", "/read", &bad_sig).await,
        "signature does not verify",
    );

    let expired = token(&f.signer, "a.read", AUDIENCE, t - 600, t - 60);
    assert_401(&c.bearer("GET", "/read", &expired).await, "expired");
    let wrong_aud = token(&f.signer, "a.read", "https://other", t - 5, t + 300);
    assert_401(
        &c.bearer("GET", "/read", &wrong_aud).await,
        "is for the audience https://other, not https://refunds.internal",
    );
    let mut nbf_claims: serde_json::Value = serde_json::from_str(&claims).unwrap();
    nbf_claims["nbf"] = (t + 120).into();
    let header = format!(r#"{{"alg":"ES256","kid":"{kid}"}}"#);
    let unsigned = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(&header),
        URL_SAFE_NO_PAD.encode(nbf_claims.to_string())
    );
    // Not yet valid needs a real signature: the check comes after it.
    let early = sign_raw(&f.pkcs8, &unsigned);
    assert_401(
        &c.bearer("GET", "/read", &early).await,
        "not valid for another",
    );

    let huge = format!(
        "{}.{}.{}",
        "a".repeat(32 * 1024),
        "b".repeat(32 * 1024),
        "c"
    );
    assert_401(
        &c.bearer("GET", "/read", &huge).await,
        "over the 8192-byte limit",
    );

    // The connection is still good after every refusal, and the control still passes.
    assert_eq!(
        c.bearer("GET", "/read", &valid(&f.signer, "a.read"))
            .await
            .status,
        200
    );
}

/// `signing_input` (`header.payload`) with an ES256 signature by the PKCS#8 key `pkcs8`: a
/// properly signed token with claims `Claims` does not write (nbf).
fn sign_raw(pkcs8: &[u8], signing_input: &str) -> String {
    let pair = aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        pkcs8,
    )
    .unwrap();
    let sig = pair
        .sign(
            &aws_lc_rs::rand::SystemRandom::new(),
            signing_input.as_bytes(),
        )
        .unwrap();
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
}

#[tokio::test]
async fn a_key_rotated_out_of_the_bundle_refuses_its_tokens_on_open_connections() {
    let f = fixture(false, false).await;
    let old = valid(&f.signer, "a.read");
    let mut c = Client::connect(&f, None).await.unwrap();
    assert_eq!(c.bearer("GET", "/read", &old).await.status, 200);
    // The new key joins: both verify.
    let (next, _) = JwtSigner::generate().unwrap();
    f.jwt.set(bundles_of(&[&f.signer, &next]));
    let new = valid(&next, "a.read");
    assert_eq!(c.bearer("GET", "/read", &new).await.status, 200);
    assert_eq!(c.bearer("GET", "/read", &old).await.status, 200);
    // The old key leaves: its token, remembered by this connection, is validated again.
    f.jwt.set(bundles_of(&[&next]));
    assert_401(
        &c.bearer("GET", "/read", &old).await,
        "is not in the JWT bundle of t.test",
    );
    assert_eq!(c.bearer("GET", "/read", &new).await.status, 200);
}

#[tokio::test]
async fn single_use_accepts_a_token_once_on_any_connection() {
    let f = fixture(false, true).await;
    let once = valid(&f.signer, "a.read");
    let mut c = Client::connect(&f, None).await.unwrap();
    assert_eq!(c.bearer("GET", "/read", &once).await.status, 200);
    assert_401(&c.bearer("GET", "/read", &once).await, "already used");
    let mut other = Client::connect(&f, None).await.unwrap();
    assert_401(&other.bearer("GET", "/read", &once).await, "already used");
    // Another token of the same subject is another jti.
    assert_eq!(
        other
            .bearer("GET", "/read", &valid(&f.signer, "a.read"))
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn with_x509_and_jwt_a_certificate_or_a_token_authenticates() {
    let f = fixture(true, false).await;
    // A client certificate alone: the routes decide by its scopes, the serial is forwarded.
    let mut with_cert = Client::connect(&f, Some(&format!("{BOT}/scope/a.read")))
        .await
        .unwrap();
    let ok = with_cert.send("GET", "/read", None).await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(
        ok.body,
        format!(
            "GET /read\nx-mayfly-scopes: a:read\nx-mayfly-serial: 0a\nx-mayfly-spiffe-id: {BOT}\n"
        )
    );
    assert_eq!(with_cert.send("POST", "/write", None).await.status, 403);
    // Without a certificate, the token.
    let mut without = Client::connect(&f, None).await.unwrap();
    assert_eq!(without.send("GET", "/read", None).await.status, 401);
    let read = valid(&f.signer, "a.read");
    let ok = without.bearer("GET", "/read", &read).await;
    assert_eq!(ok.body, echoed_token("GET /read", "a:read", &read));
}

#[tokio::test]
async fn with_jwt_alone_no_certificate_is_asked_for_and_a_token_is_required() {
    let f = fixture(false, false).await;
    // A client that would present a certificate is not asked for one: it still needs a token.
    let mut c = Client::connect(&f, Some(&format!("{BOT}/scope/a.read")))
        .await
        .unwrap();
    assert_eq!(c.send("GET", "/read", None).await.status, 401);
    assert_eq!(
        c.bearer("GET", "/read", &valid(&f.signer, "a.read"))
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn curl_sends_a_bearer_token_over_tls_without_a_certificate() {
    let f = fixture(false, false).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, mayfly::bundle::pem_block("CERTIFICATE", &f.ca.cert)).unwrap();
    let port = f.proxy.local_addr.port();
    let curl = |extra: Vec<String>| {
        let ca = ca.clone();
        tokio::task::spawn_blocking(move || {
            let out = std::process::Command::new("/usr/bin/curl")
                .args(["-sS", "--max-time", "15", "--resolve"])
                .arg(format!("localhost:{port}:127.0.0.1"))
                .arg("--cacert")
                .arg(&ca)
                .args(["-w", "\n%{http_code} %{http_version}"])
                .args(extra)
                .arg(format!("https://localhost:{port}/read"))
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
    };
    let read = valid(&f.signer, "a.read");
    for version in ["--http1.1", "--http2"] {
        let out = curl(vec![
            version.into(),
            "-H".into(),
            format!("Authorization: Bearer {read}"),
        ])
        .await
        .unwrap();
        let want_version = if version == "--http2" { "2" } else { "1.1" };
        assert!(out.ends_with(&format!("\n200 {want_version}")), "{out}");
        assert!(
            out.starts_with(&echoed_token("GET /read", "a:read", &read)),
            "{out}"
        );
        let refused = curl(vec![version.into()]).await.unwrap();
        assert!(
            refused.ends_with(&format!("\n401 {want_version}")),
            "{refused}"
        );
        assert!(refused.contains("no bearer token"), "{refused}");
    }
}

#[tokio::test]
async fn a_remembered_token_is_refused_on_its_connection_once_it_expires() {
    let f = fixture(false, false).await;
    let t = now();
    let short = token(&f.signer, "a.read", AUDIENCE, t - 5, t + 2);
    let mut c = Client::connect(&f, None).await.unwrap();
    // Accepted, then remembered by the connection: the second use skips the signature check.
    assert_eq!(c.bearer("GET", "/read", &short).await.status, 200);
    assert_eq!(c.bearer("GET", "/read", &short).await.status, 200);
    while now() < t + 2 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_401(&c.bearer("GET", "/read", &short).await, "expired");
    // The connection itself is fine: a live token passes.
    assert_eq!(
        c.bearer("GET", "/read", &valid(&f.signer, "a.read"))
            .await
            .status,
        200
    );
}
