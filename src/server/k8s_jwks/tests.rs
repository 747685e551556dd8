//! The refresher against a JWKS served over real HTTPS: a tokio-rustls server on 127.0.0.1
//! with a certificate from a CA made here by rcgen.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::time::SystemTime;

use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use mayfly_attestors::k8s_psat::{K8sPsatError, PsatCluster};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;

use super::*;

struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(name: &str) -> Ca {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Ca {
        pem: cert.pem(),
        issuer: Issuer::new(params, key),
    }
}

/// What the test server answers; the test changes it between reads.
#[derive(Default)]
struct Answer {
    body: Mutex<Vec<u8>>,
    status: AtomicU16,
    /// Accept the connection, then say nothing.
    stall: AtomicBool,
    hits: AtomicUsize,
}

struct JwksServer {
    addr: SocketAddr,
    answer: Arc<Answer>,
    task: JoinHandle<()>,
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl JwksServer {
    async fn start(ca: &Ca, body: Vec<u8>) -> Self {
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .signed_by(&leaf_key, &ca.issuer)
            .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(crate::mtls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let answer = Arc::new(Answer {
            body: Mutex::new(body),
            status: AtomicU16::new(200),
            ..Answer::default()
        });
        let served = Arc::clone(&answer);
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                if served.stall.load(Ordering::SeqCst) {
                    held.push(tcp);
                    continue;
                }
                let acceptor = acceptor.clone();
                let served = Arc::clone(&served);
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |request| {
                        let served = Arc::clone(&served);
                        async move {
                            served.hits.fetch_add(1, Ordering::SeqCst);
                            assert_eq!(request.uri().path(), "/openid/v1/jwks");
                            let body = served.body.lock().unwrap().clone();
                            let status = served.status.load(Ordering::SeqCst);
                            http::Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::from(body)))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Self { addr, answer, task }
    }

    fn url(&self) -> String {
        format!("https://localhost:{}/openid/v1/jwks", self.addr.port())
    }

    fn serve(&self, body: Vec<u8>) {
        *self.answer.body.lock().unwrap() = body;
    }

    fn hits(&self) -> usize {
        self.answer.hits.load(Ordering::SeqCst)
    }
}

/// A JWKS holding one fresh P-256 key under each of `kids`.
fn jwks(kids: &[&str]) -> Vec<u8> {
    let keys: Vec<_> = kids
        .iter()
        .map(|kid| {
            let key = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
            let point = key.public_key().as_ref();
            serde_json::json!({"kty": "EC", "crv": "P-256", "kid": kid,
                "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..65])})
        })
        .collect();
    serde_json::to_vec(&serde_json::json!({ "keys": keys })).unwrap()
}

fn attestor() -> Arc<K8sPsatAttestor> {
    Arc::new(
        K8sPsatAttestor::new(vec![PsatCluster {
            name: "prod".into(),
            issuer: "https://kubernetes.default.svc".into(),
            audience: "mayfly".into(),
            allowed_service_accounts: vec!["mayfly-system:mayfly-agent".into()],
        }])
        .unwrap(),
    )
}

/// Presents a token naming `kid`: refused before its (empty) signature is looked at, which
/// tells the refresher.
fn present_kid(attestor: &K8sPsatAttestor, kid: &str) -> K8sPsatError {
    let header = URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"ES256","kid":"{kid}"}}"#));
    let evidence = serde_json::json!({"cluster": "prod", "token": format!("{header}.e30.AA")});
    attestor
        .verify(&serde_json::to_vec(&evidence).unwrap(), SystemTime::now())
        .unwrap_err()
}

fn ca_file(dir: &tempfile::TempDir, ca: &Ca) -> PathBuf {
    let path = dir.path().join("ca.pem");
    std::fs::write(&path, &ca.pem).unwrap();
    path
}

async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..100 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what} did not happen within 5 s");
}

#[tokio::test]
async fn fetches_over_https_only_from_a_server_its_ca_file_trusts() {
    let dir = tempfile::TempDir::new().unwrap();
    let (server_ca, other_ca) = (ca("cluster CA"), ca("another CA"));
    let document = jwks(&["k1"]);
    let server = JwksServer::start(&server_ca, document.clone()).await;
    let trusted =
        ClusterJwks::new("prod", &server.url(), Some(&ca_file(&dir, &server_ca))).unwrap();
    assert_eq!(trusted.read(FETCH_TIMEOUT).await.unwrap(), document);

    let other_dir = tempfile::TempDir::new().unwrap();
    let untrusted =
        ClusterJwks::new("prod", &server.url(), Some(&ca_file(&other_dir, &other_ca))).unwrap();
    let err = untrusted.read(FETCH_TIMEOUT).await.unwrap_err();
    assert!(
        matches!(&err, JwksError::Fetch { reason, .. } if reason.contains("TLS handshake")),
        "{err}"
    );
    // The system's roots do not know the test CA either.
    let system = ClusterJwks::new("prod", &server.url(), None).unwrap();
    assert!(matches!(
        system.read(FETCH_TIMEOUT).await,
        Err(JwksError::Fetch { .. })
    ));
}

#[tokio::test]
async fn fetches_are_bounded_in_size_status_and_time() {
    let dir = tempfile::TempDir::new().unwrap();
    let server_ca = ca("cluster CA");
    let server = JwksServer::start(&server_ca, jwks(&["k1"])).await;
    let source = ClusterJwks::new("prod", &server.url(), Some(&ca_file(&dir, &server_ca))).unwrap();
    let short = Duration::from_millis(500);
    source.read(short).await.unwrap();

    server.serve(vec![b' '; MAX_JWKS + 1]);
    assert!(matches!(
        source.read(short).await,
        Err(JwksError::TooLarge(_))
    ));
    server.serve(jwks(&["k1"]));
    source.read(short).await.unwrap();

    server.answer.status.store(404, Ordering::SeqCst);
    assert!(matches!(
        source.read(short).await,
        Err(JwksError::Status { status: 404, .. })
    ));
    server.answer.status.store(200, Ordering::SeqCst);
    source.read(short).await.unwrap();

    server.answer.stall.store(true, Ordering::SeqCst);
    let started = Instant::now();
    assert!(matches!(
        source.read(short).await,
        Err(JwksError::Timeout { .. })
    ));
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn an_unknown_kid_prompts_one_fetch_per_gap() {
    let dir = tempfile::TempDir::new().unwrap();
    let server_ca = ca("cluster CA");
    let server = JwksServer::start(&server_ca, jwks(&["k1"])).await;
    let source = ClusterJwks::new("prod", &server.url(), Some(&ca_file(&dir, &server_ca))).unwrap();
    let attestor = attestor();
    let times = RefreshTimes {
        period: Duration::from_secs(3600),
        unknown_kid_gap: Duration::from_secs(2),
        fetch_timeout: FETCH_TIMEOUT,
    };
    let task = start(&attestor, vec![source], times).await.unwrap();
    assert!(attestor.has_key("prod", "k1"));
    assert_eq!(server.hits(), 1);

    // The cluster rotates to k2; a token naming k2 is refused and prompts a fetch.
    server.serve(jwks(&["k1", "k2"]));
    assert!(matches!(
        present_kid(&attestor, "k2"),
        K8sPsatError::UnknownKid { .. }
    ));
    eventually("the fetch of k2", || attestor.has_key("prod", "k2")).await;
    assert_eq!(server.hits(), 2);

    // Within the gap, more unknown kids fetch nothing.
    server.serve(jwks(&["k3"]));
    for _ in 0..20 {
        present_kid(&attestor, "made-up");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(server.hits(), 2);
    assert!(!attestor.has_key("prod", "k3"));
    // After it, one does.
    tokio::time::sleep(Duration::from_millis(1800)).await;
    present_kid(&attestor, "k3");
    eventually("the fetch of k3", || attestor.has_key("prod", "k3")).await;
    assert_eq!(server.hits(), 3);
    drop(attestor);
    // The task ends with the attestor (the hook held the only sender).
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn urls_are_read_again_each_period_and_failures_keep_the_keys() {
    let dir = tempfile::TempDir::new().unwrap();
    let server_ca = ca("cluster CA");
    let server = JwksServer::start(&server_ca, jwks(&["k1"])).await;
    let source = ClusterJwks::new("prod", &server.url(), Some(&ca_file(&dir, &server_ca))).unwrap();
    let attestor = attestor();
    let times = RefreshTimes {
        period: Duration::from_millis(200),
        ..RefreshTimes::default()
    };
    let task = start(&attestor, vec![source], times).await.unwrap();
    assert!(attestor.has_key("prod", "k1"));
    server.serve(jwks(&["k2"]));
    eventually("the periodic read", || attestor.has_key("prod", "k2")).await;
    assert!(!attestor.has_key("prod", "k1"));

    server.answer.status.store(500, Ordering::SeqCst);
    let hits = server.hits();
    eventually("two failed reads", || server.hits() >= hits + 2).await;
    assert!(attestor.has_key("prod", "k2"));
    server.answer.status.store(200, Ordering::SeqCst);
    server.serve(br#"{"keys": []}"#.to_vec());
    let hits = server.hits();
    eventually("two reads of an empty JWKS", || server.hits() >= hits + 2).await;
    assert!(attestor.has_key("prod", "k2"));
    task.abort();
}

#[tokio::test]
async fn an_unreachable_url_at_start_is_retried_not_fatal() {
    let dir = tempfile::TempDir::new().unwrap();
    let server_ca = ca("cluster CA");
    let server = JwksServer::start(&server_ca, jwks(&["k1"])).await;
    let source = ClusterJwks::new("prod", &server.url(), Some(&ca_file(&dir, &server_ca))).unwrap();
    server.answer.status.store(503, Ordering::SeqCst);
    let attestor = attestor();
    let times = RefreshTimes {
        period: Duration::from_millis(200),
        ..RefreshTimes::default()
    };
    let task = start(&attestor, vec![source], times).await.unwrap();
    assert!(!attestor.has_key("prod", "k1"));
    server.answer.status.store(200, Ordering::SeqCst);
    eventually("the retry", || attestor.has_key("prod", "k1")).await;
    task.abort();
}

#[tokio::test]
async fn file_jwks_are_read_at_start_and_a_bad_one_stops_it() {
    let dir = tempfile::TempDir::new().unwrap();
    let path = dir.path().join("prod-jwks.json");
    std::fs::write(&path, jwks(&["file-key"])).unwrap();
    let attestor = attestor();
    let source = ClusterJwks::new("prod", path.to_str().unwrap(), None).unwrap();
    let task = start(&attestor, vec![source], RefreshTimes::default())
        .await
        .unwrap();
    assert!(attestor.has_key("prod", "file-key"));
    task.abort();

    let missing = ClusterJwks::new("prod", "/nonexistent/prod-jwks.json", None).unwrap();
    assert!(matches!(
        start(&attestor, vec![missing], RefreshTimes::default()).await,
        Err(JwksError::File { .. })
    ));
    std::fs::write(&path, b"{\"keys\": 7}").unwrap();
    let garbage = ClusterJwks::new("prod", path.to_str().unwrap(), None).unwrap();
    assert!(matches!(
        start(&attestor, vec![garbage], RefreshTimes::default()).await,
        Err(JwksError::Document { .. })
    ));
    assert!(attestor.has_key("prod", "file-key"));
}

#[test]
fn jwks_urls_must_be_https_with_a_host() {
    let url = HttpsUrl::parse("https://kube.example:6443/openid/v1/jwks").unwrap();
    assert_eq!(
        (url.host.as_str(), url.port, url.path.as_str()),
        ("kube.example", 6443, "/openid/v1/jwks")
    );
    let default_port = HttpsUrl::parse("https://[::1]/keys").unwrap();
    assert_eq!(
        (default_port.host.as_str(), default_port.port),
        ("::1", 443)
    );
    for bad in [
        "http://kube.example/openid/v1/jwks",
        "https://",
        "https:///jwks",
        "https://user:pw@kube.example/jwks",
        "ftp://kube.example/jwks",
        "https://kube example/jwks",
    ] {
        assert!(
            matches!(
                ClusterJwks::new("prod", bad, None),
                Err(JwksError::BadUrl(_))
            ),
            "{bad}"
        );
    }
    let dir = tempfile::TempDir::new().unwrap();
    let not_pem = dir.path().join("ca.pem");
    std::fs::write(&not_pem, "not a certificate").unwrap();
    assert!(matches!(
        ClusterJwks::new("prod", "https://kube.example/jwks", Some(&not_pem)),
        Err(JwksError::NoRoots { .. })
    ));
}

#[tokio::test]
async fn settings_read_as_the_issue_writes_them() {
    let dir = tempfile::TempDir::new().unwrap();
    let path = dir.path().join("prod-jwks.json");
    std::fs::write(&path, jwks(&["file-key"])).unwrap();
    let toml = format!(
        r#"
        [[clusters]]
        name = "prod"
        issuer = "https://kubernetes.default.svc"
        jwks = "{}"
        audience = "mayfly"
        allowed_service_accounts = ["mayfly-system:mayfly-agent"]
        "#,
        path.display()
    );
    let settings: K8sPsatSettings = toml::from_str(&toml).unwrap();
    let (attestor, task) = settings.start(RefreshTimes::default()).await.unwrap();
    assert!(attestor.has_key("prod", "file-key"));
    task.abort();

    let typo = toml.replace("audience", "audiences");
    assert!(toml::from_str::<K8sPsatSettings>(&typo).is_err());
    let mut bad = settings.clone();
    bad.clusters[0].allowed_service_accounts = vec!["no-colon".into()];
    assert!(matches!(
        bad.build(),
        Err(JwksError::Attestor(K8sPsatError::BadCluster(_)))
    ));
    let mut plain_http = settings;
    plain_http.clusters[0].jwks = "http://kube.example/openid/v1/jwks".into();
    assert!(matches!(plain_http.build(), Err(JwksError::BadUrl(_))));
}
