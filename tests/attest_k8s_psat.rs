//! The k8s_psat node attestor end to end (issue 12 point 4): a real server trusting a cluster
//! whose JWKS is a file, and one whose JWKS is served over real HTTPS (`openssl s_server`, a
//! CA and certificate made by `openssl`); real agents presenting projected service account
//! tokens the test signs (an RSA key from `openssl genpkey`, a P-256 key from aws-lc-rs). Each
//! refusal follows its positive control on the same server.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _, RSA_PKCS1_SHA256, RsaKeyPair,
};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

use common::cluster::{BIN, Cluster, Proc, free_port};

const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const NODE_UID: &str = "5f2c0a9e-7d1b-4c3e-9a55-0e6f1d2c3b4a";

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The cluster's service account signing keys and the tokens they sign.
struct Signer {
    rsa: RsaKeyPair,
    rsa_n: Vec<u8>,
    ec: EcdsaKeyPair,
}

impl Signer {
    fn new(dir: &Path) -> Self {
        openssl(
            dir,
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
                "sa.pem",
            ],
        );
        openssl(
            dir,
            &[
                "pkcs8", "-topk8", "-nocrypt", "-outform", "DER", "-in", "sa.pem", "-out", "sa.der",
            ],
        );
        let out = Command::new("openssl")
            .args(["rsa", "-noout", "-modulus", "-in", "sa.pem"])
            .current_dir(dir)
            .output()
            .unwrap();
        let modulus = String::from_utf8(out.stdout).unwrap();
        Self {
            rsa: RsaKeyPair::from_pkcs8(&std::fs::read(dir.join("sa.der")).unwrap()).unwrap(),
            rsa_n: hex::decode(modulus.trim().trim_start_matches("Modulus=")).unwrap(),
            ec: EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap(),
        }
    }

    fn jwks(&self) -> Vec<u8> {
        let point = self.ec.public_key().as_ref();
        serde_json::to_vec(&json!({"keys": [
            {"kty": "RSA", "kid": "rsa-1", "use": "sig", "alg": "RS256", "n": b64(&self.rsa_n), "e": "AQAB"},
            {"kty": "EC", "crv": "P-256", "kid": "ec-1", "use": "sig", "alg": "ES256",
             "x": b64(&point[1..33]), "y": b64(&point[33..65])},
        ]}))
        .unwrap()
    }

    fn sign(&self, header: &Value, claims: &Value) -> String {
        let input = format!(
            "{}.{}",
            b64(&serde_json::to_vec(header).unwrap()),
            b64(&serde_json::to_vec(claims).unwrap())
        );
        let sig = match header["alg"].as_str() {
            Some("RS256") => {
                let mut sig = vec![0; self.rsa.public_modulus_len()];
                self.rsa
                    .sign(
                        &RSA_PKCS1_SHA256,
                        &SystemRandom::new(),
                        input.as_bytes(),
                        &mut sig,
                    )
                    .unwrap();
                sig
            }
            Some("ES256") => self
                .ec
                .sign(&SystemRandom::new(), input.as_bytes())
                .unwrap()
                .as_ref()
                .to_vec(),
            _ => vec![],
        };
        format!("{input}.{}", b64(&sig))
    }

    fn rs256(&self, claims: &Value) -> String {
        self.sign(&json!({"alg": "RS256", "kid": "rsa-1"}), claims)
    }
}

/// The claims the kubelet projects into the agent's pod, unique by `jti`.
fn claims(jti: &str) -> Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    json!({
        "iss": ISSUER, "aud": ["mayfly"], "sub": "system:serviceaccount:mayfly-system:mayfly-agent",
        "exp": now + 600, "iat": now, "nbf": now, "jti": jti,
        "kubernetes.io": {
            "namespace": "mayfly-system",
            "serviceaccount": {"name": "mayfly-agent", "uid": "sa-uid-1"},
            "pod": {"name": "mayfly-agent-x7k2p", "uid": "pod-uid-1"},
            "node": {"name": "worker-1", "uid": NODE_UID},
        },
    })
}

/// `openssl s_server -WWW` serving `dir` over HTTPS on 127.0.0.1 with a certificate for
/// localhost from a CA made here; returns the server and the CA file.
fn https_server(dir: &Path, port: u16) -> (Proc, PathBuf) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=cluster CA",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "srv.key",
            "-out",
            "srv.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    std::fs::write(
        dir.join("srv.ext"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "srv.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "srv.pem",
            "-days",
            "1",
            "-extfile",
            "srv.ext",
        ],
    );
    let child = Command::new("openssl")
        .args([
            "s_server", "-quiet", "-WWW", "-cert", "srv.pem", "-key", "srv.key", "-accept",
        ])
        .arg(format!("127.0.0.1:{port}"))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn openssl s_server");
    (Proc(child), dir.join("ca.pem"))
}

/// The server's settings: `prod` reads its JWKS from a file, `staging` over HTTPS.
fn write_config(dir: &Path, jwks_file: &Path, staging_url: &str, ca: &Path) -> PathBuf {
    let path = dir.join("server.toml");
    let cluster = |name: &str, jwks: &str, ca: Option<&Path>| {
        let ca = ca.map_or_else(String::new, |p| format!("ca_file = \"{}\"\n", p.display()));
        format!(
            "[[node_attestors.k8s_psat.clusters]]\nname = \"{name}\"\nissuer = \"{ISSUER}\"\n\
             jwks = \"{jwks}\"\naudience = \"mayfly\"\n\
             allowed_service_accounts = [\"mayfly-system:mayfly-agent\"]\n{ca}\n"
        )
    };
    let text = cluster("prod", &jwks_file.display().to_string(), None)
        + &cluster("staging", staging_url, Some(ca));
    std::fs::write(&path, text).unwrap();
    path
}

/// `mayfly agent run --attestor k8s_psat` for `cluster` with `token`, as agent `tag`.
fn spawn_agent(cluster: &Cluster, tag: &str, k8s_cluster: &str, token: &[u8]) -> (Proc, PathBuf) {
    let token_path = cluster.path(&format!("{tag}.token"));
    std::fs::write(&token_path, token).unwrap();
    let socket = cluster.path(&format!("{tag}.sock"));
    let log = cluster.path(&format!("{tag}.log"));
    let child = Command::new(BIN)
        .args(["agent", "run", "--server"])
        .arg(format!("127.0.0.1:{}", cluster.port))
        .args([
            "--attestor",
            "k8s_psat",
            "--k8s-cluster",
            k8s_cluster,
            "--k8s-token",
        ])
        .arg(&token_path)
        .arg("--trust-bundle")
        .arg(cluster.path("bundle.pem"))
        .arg("--socket")
        .arg(&socket)
        .arg("--data-dir")
        .arg(cluster.path(&format!("{tag}-data")))
        .current_dir(cluster.dir.path())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn mayfly agent run");
    (Proc(child), socket)
}

/// The agent `tag` attests: its socket appears.
fn attests(cluster: &Cluster, tag: &str, k8s_cluster: &str, token: &[u8]) -> Proc {
    let (agent, socket) = spawn_agent(cluster, tag, k8s_cluster, token);
    common::cluster::wait_for_path(&socket, Duration::from_secs(30), "the agent's socket");
    agent
}

/// The agent `tag` is refused: it exits with an error whose log says `reason`.
fn refused(cluster: &Cluster, tag: &str, k8s_cluster: &str, token: &[u8], reason: &str) {
    let (mut agent, socket) = spawn_agent(cluster, tag, k8s_cluster, token);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = agent.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "agent {tag} did not exit"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = std::fs::read_to_string(cluster.path(&format!("{tag}.log"))).unwrap();
    assert!(!status.success(), "agent {tag} exited 0: {log}");
    assert!(!socket.exists(), "agent {tag} served a socket");
    assert!(
        log.contains(reason),
        "agent {tag}: expected '{reason}' in: {log}"
    );
}

#[test]
fn agents_attest_with_projected_tokens_and_bad_tokens_are_refused() {
    let material = tempfile::TempDir::new().unwrap();
    let signer = Signer::new(material.path());
    let jwks_file = material.path().join("prod-jwks.json");
    std::fs::write(&jwks_file, signer.jwks()).unwrap();
    // staging's JWKS is served over HTTPS by openssl from the same directory.
    let https_port = free_port();
    let (mut https, ca) = https_server(material.path(), https_port);
    let staging_url = format!("https://localhost:{https_port}/prod-jwks.json");
    let config = write_config(material.path(), &jwks_file, &staging_url, &ca);
    let mut cluster = Cluster::start_with(&["--config", config.to_str().unwrap()]);

    // Positive: an RS256 token of prod, then an ES256 token of staging (keys fetched over
    // HTTPS); each agent gets the ID of its cluster and node.
    let mut prod = attests(
        &cluster,
        "prod",
        "prod",
        signer.rs256(&claims("jti-prod")).as_bytes(),
    );
    let es = signer.sign(
        &json!({"alg": "ES256", "kid": "ec-1"}),
        &claims("jti-staging"),
    );
    let mut staging = attests(&cluster, "staging", "staging", es.as_bytes());
    let agents = cluster.ok(&["agent", "list"]);
    for id in [
        format!("/mayfly/agent/k8s_psat/prod/{NODE_UID}"),
        format!("/mayfly/agent/k8s_psat/staging/{NODE_UID}"),
    ] {
        assert!(agents.contains(&id), "{id} not in: {agents}");
    }

    // The server keeps what the token proved: `agent show` lists prod's node selectors.
    let prod_id = agents
        .split_whitespace()
        .find(|w| w.contains("/k8s_psat/prod/"))
        .expect("prod's ID in the list")
        .to_owned();
    let shown = cluster.ok(&["agent", "show", &prod_id]);
    for selector in [
        "k8s_psat:cluster:prod".to_owned(),
        "k8s_psat:agent_ns:mayfly-system".into(),
        "k8s_psat:agent_sa:mayfly-agent".into(),
        "k8s_psat:agent_pod_name:mayfly-agent-x7k2p".into(),
        "k8s_psat:agent_pod_uid:pod-uid-1".into(),
        "k8s_psat:agent_node_name:worker-1".into(),
        format!("k8s_psat:agent_node_uid:{NODE_UID}"),
    ] {
        assert!(shown.contains(&selector), "{selector} not in: {shown}");
    }

    // Each refusal, on the same server that just admitted both agents. A token attests once.
    let replayed = std::fs::read(cluster.path("prod.token")).unwrap();
    refused(&cluster, "replay", "prod", &replayed, "already used");
    let mut other_audience = claims("jti-aud");
    other_audience["aud"] = json!(["vault"]);
    refused(
        &cluster,
        "aud",
        "prod",
        signer.rs256(&other_audience).as_bytes(),
        "audience",
    );
    let none = signer.sign(&json!({"alg": "none", "kid": "rsa-1"}), &claims("jti-none"));
    refused(&cluster, "none", "prod", none.as_bytes(), "algorithm none");
    let unknown = signer.sign(
        &json!({"alg": "RS256", "kid": "rotated-9"}),
        &claims("jti-kid"),
    );
    refused(&cluster, "kid", "prod", unknown.as_bytes(), "rotated-9");
    let mut default_sa = claims("jti-sa");
    default_sa["kubernetes.io"]["serviceaccount"]["name"] = json!("default");
    refused(
        &cluster,
        "sa",
        "prod",
        signer.rs256(&default_sa).as_bytes(),
        "mayfly-system:default",
    );
    let mut expired = claims("jti-exp");
    expired["exp"] = json!(1_000_000_000);
    refused(
        &cluster,
        "exp",
        "prod",
        signer.rs256(&expired).as_bytes(),
        "expired",
    );
    refused(
        &cluster,
        "other-cluster",
        "dev",
        signer.rs256(&claims("jti-dev")).as_bytes(),
        "dev",
    );
    // A 1 MiB "token" never leaves the agent.
    refused(&cluster, "huge", "prod", &vec![b'a'; 1024 * 1024], "64 KiB");

    // Re-attestation without an operator: evicted, the prod agent attests again by itself
    // with the token the kubelet has rotated in the meantime.
    std::fs::write(
        cluster.path("prod.token"),
        signer.rs256(&claims("jti-prod-rotated")),
    )
    .unwrap();
    cluster.ok(&["agent", "evict", &prod_id]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let log = std::fs::read_to_string(cluster.path("prod.log")).unwrap();
        if log.contains("attested again") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "prod did not attest again after its eviction: {log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    prod.stop();
    staging.stop();
    https.kill();
    cluster.stop_server();
}

/// `mayfly server run --config` with `toml` exits at once; returns its error output.
fn server_refuses(dir: &Path, toml: &str) -> String {
    let config = dir.join("bad.toml");
    std::fs::write(&config, toml).unwrap();
    let out = Command::new(BIN)
        .args(["server", "run", "--bind"])
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--config")
        .arg(&config)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run mayfly server run");
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_k8s_psat_settings_stop_the_server_in_one_sentence() {
    let dir = tempfile::TempDir::new().unwrap();
    let material = tempfile::TempDir::new().unwrap();
    let signer = Signer::new(material.path());
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, signer.jwks()).unwrap();
    let cluster = |jwks: &str, accounts: &str| {
        format!(
            "[[node_attestors.k8s_psat.clusters]]\nname = \"prod\"\nissuer = \"{ISSUER}\"\n\
             jwks = \"{jwks}\"\naudience = \"mayfly\"\nallowed_service_accounts = [{accounts}]\n"
        )
    };
    let good = cluster(
        &jwks.display().to_string(),
        "\"mayfly-system:mayfly-agent\"",
    );
    // The positive control: these settings start a server.
    let started = Cluster::start_with(&["--config", &{
        let path = dir.path().join("good.toml");
        std::fs::write(&path, &good).unwrap();
        path.display().to_string()
    }]);
    drop(started);

    for (toml, expected) in [
        (
            cluster("/nonexistent/jwks.json", "\"mayfly-system:mayfly-agent\""),
            "/nonexistent/jwks.json could not be read",
        ),
        (
            cluster("http://kube.example/openid/v1/jwks", "\"a:b\""),
            "is not an https:// URL",
        ),
        (
            cluster(&jwks.display().to_string(), "\"just-a-name\""),
            "is not namespace:name",
        ),
        (good.replace("audience", "audiences"), "audiences"),
    ] {
        let err = server_refuses(dir.path(), &toml);
        assert_eq!(
            err.matches(expected).count(),
            1,
            "'{expected}' once in: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "one sentence: {err}");
    }
    std::fs::write(&jwks, b"{\"keys\": []}").unwrap();
    let err = server_refuses(dir.path(), &good);
    assert!(err.contains("no RS256 or ES256 signing key"), "{err}");
}
