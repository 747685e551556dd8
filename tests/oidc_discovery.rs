//! The OIDC discovery endpoint (issue 11) through the real `mayfly` binary, read by third-party
//! clients over real TLS: curl fetches the discovery document and the JWKS trusting only the
//! trust domain's bundle (or the operator's CA); the JWKS gains a prepared CA's key before it
//! signs; PyJWT's `PyJWKClient` (tests/py/verify_oidc.py) verifies JWT-SVIDs an agent minted,
//! before and after a CA rotation (the serving certificate renewed under the new CA); the
//! self-issued certificate holds the issuer's host name and no other; bad settings stop the
//! server in one sentence.
//!
//! The PyJWT test needs `MAYFLY_PYSPIFFE_PYTHON` (the virtualenv `.ci/run` builds, which holds
//! PyJWT); without it the test prints a skip notice.

mod common;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::cluster::{BIN, Cluster, free_port};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A cluster whose server serves discovery on 127.0.0.1; returns it and the issuer.
fn discovery_cluster() -> (Cluster, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let cluster = Cluster::start_with(&["--oidc-bind", &addr]);
    (cluster, format!("https://{addr}"))
}

/// `curl -sS` with `args`; the documents are small, so a few seconds is plenty.
fn curl(args: &[&str]) -> Output {
    Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .expect("run curl")
}

/// The body of a successful `curl --cacert ca url`, as JSON.
fn fetch_json(ca: &Path, url: &str) -> serde_json::Value {
    let out = curl(&["--fail", "--cacert", ca.to_str().unwrap(), url]);
    assert!(out.status.success(), "curl {url}: {}", text(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{url}: {e}: {}", text(&out.stdout)))
}

fn kids(jwks: &serde_json::Value) -> Vec<String> {
    jwks["keys"]
        .as_array()
        .expect("a keys array")
        .iter()
        .map(|k| k["kid"].as_str().expect("a kid").to_owned())
        .collect()
}

#[test]
fn curl_reads_the_discovery_document_and_the_jwks_which_gains_a_prepared_key() {
    let (cluster, issuer) = discovery_cluster();
    let ca = cluster.path("bundle.pem");

    let doc = fetch_json(&ca, &format!("{issuer}/.well-known/openid-configuration"));
    assert_eq!(doc["issuer"], issuer.as_str());
    let jwks_uri = format!("{issuer}/keys");
    assert_eq!(doc["jwks_uri"], jwks_uri.as_str());
    assert_eq!(
        doc["id_token_signing_alg_values_supported"],
        serde_json::json!(["ES256"])
    );
    assert_eq!(
        doc["response_types_supported"],
        serde_json::json!(["id_token"])
    );
    assert_eq!(
        doc["subject_types_supported"],
        serde_json::json!(["public"])
    );

    let jwks = fetch_json(&ca, &jwks_uri);
    let first = kids(&jwks);
    assert_eq!(first.len(), 1, "one CA, one key: {jwks}");
    let key = &jwks["keys"][0];
    assert_eq!(key["kty"], "EC");
    assert_eq!(key["crv"], "P-256");
    assert_eq!(key["alg"], "ES256");
    assert_eq!(key["use"], "sig");

    let head = curl(&["-i", "--cacert", ca.to_str().unwrap(), &jwks_uri]);
    let head = text(&head.stdout).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-type: application/json"), "{head}");
    assert!(head.contains("cache-control: public, max-age="), "{head}");

    // The same server, not trusted: curl with only the system store refuses the certificate,
    // which proves the positive fetches above trusted the bundle and nothing else.
    let untrusted = curl(&[&jwks_uri]);
    assert!(!untrusted.status.success());
    assert_eq!(
        untrusted.status.code(),
        Some(60),
        "{}",
        text(&untrusted.stderr)
    );

    // Anything but the two documents, or another method, is refused without a body read.
    let status = |args: &[&str]| {
        let mut all = vec![
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--cacert",
            ca.to_str().unwrap(),
        ];
        all.extend_from_slice(args);
        text(&curl(&all).stdout)
    };
    assert_eq!(status(&[&format!("{issuer}/keys/x")]), "404");
    assert_eq!(status(&["-X", "POST", "-d", "x=1", &jwks_uri]), "405");
    assert_eq!(status(&[&jwks_uri]), "200", "positive control");
    assert_eq!(
        status(&["-I", &jwks_uri]),
        "200",
        "HEAD is a GET without the body"
    );
    // A request head over the 8 KiB bound is refused before it is read to its end.
    let big = format!("x-padding: {}", "a".repeat(10 * 1024));
    assert_eq!(status(&["-H", &big, &jwks_uri]), "431");

    // A prepared CA's key is published before that CA signs: the JWKS gains it, and keeps the
    // active one.
    cluster.ok(&["ca", "prepare"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let grown = loop {
        let now = kids(&fetch_json(&ca, &jwks_uri));
        if now.len() == 2 {
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "the prepared key never appeared: {now:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(grown.contains(&first[0]), "{grown:?} lost {first:?}");
}

/// The virtualenv's Python (`MAYFLY_PYSPIFFE_PYTHON`); `None` prints a skip notice.
fn python() -> Option<PathBuf> {
    match std::env::var("MAYFLY_PYSPIFFE_PYTHON") {
        Ok(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => {
            println!("skipped PyJWT interop: MAYFLY_PYSPIFFE_PYTHON is not set");
            None
        }
    }
}

/// Runs tests/py/verify_oidc.py with `token` on stdin.
fn pyjwt_verify(python: &Path, issuer: &str, ca: &Path, audience: &str, token: &str) -> Output {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/verify_oidc.py");
    let mut child = Command::new(python)
        .arg(script)
        .args([issuer, ca.to_str().unwrap(), audience])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(token.as_bytes())
        .unwrap();
    child.wait_with_output().expect("python output")
}

#[test]
fn pyjwt_verifies_minted_tokens_through_discovery_across_a_rotation_and_refuses_bad_ones() {
    let Some(python) = python() else { return };
    let (mut cluster, issuer) = discovery_cluster();
    let ca = cluster.path("bundle.pem");
    cluster.start_agent();
    cluster.create_entry_for_this_process(
        "spiffe://mayfly.local/agents/reader",
        &["--scope", "db:read"],
    );
    let identity = cluster
        .ok_eventually(&["svid", "fetch", "--jwt", "--audience", "vault"])
        .trim()
        .to_owned();
    let task = cluster.ok(&[
        "svid",
        "mint",
        "--jwt",
        "--audience",
        "stripe-api",
        "--task",
        "t-7",
        "--scope",
        "db:read",
    ]);
    let task = task.trim();

    // Positive controls: both kinds of token verify with the key PyJWT found by kid.
    let out = pyjwt_verify(&python, &issuer, &ca, "vault", &identity);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).starts_with("verified sub=spiffe://mayfly.local/agents/reader kid="),
        "{}",
        text(&out.stdout)
    );
    let out = pyjwt_verify(&python, &issuer, &ca, "stripe-api", task);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout)
            .starts_with("verified sub=spiffe://mayfly.local/agents/reader/scope/db.read kid="),
        "{}",
        text(&out.stdout)
    );

    // The same token for another audience is refused by PyJWT's audience check.
    let out = pyjwt_verify(&python, &issuer, &ca, "github-api", task);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stderr).starts_with("refused: InvalidAudienceError"),
        "{}",
        text(&out.stderr)
    );

    // One character of the payload changed: the signature no longer verifies.
    let mut parts: Vec<String> = task.split('.').map(str::to_owned).collect();
    let flipped = if parts[1].ends_with('A') { 'B' } else { 'A' };
    parts[1].pop();
    parts[1].push(flipped);
    let forged = parts.join(".");
    let out = pyjwt_verify(&python, &issuer, &ca, "stripe-api", &forged);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let err = text(&out.stderr);
    assert!(
        err.starts_with("refused: InvalidSignatureError")
            || err.starts_with("refused: DecodeError"),
        "{err}"
    );
    // Rotation: once the prepared CA is active, new tokens carry its key's kid, and PyJWT finds
    // that key through the same jwks_uri; the old key stays published for the tokens it signed.
    let kid_of = |out: &Output| {
        let line = text(&out.stdout);
        line.trim().rsplit_once("kid=").expect("a kid").1.to_owned()
    };
    let old_kid = kid_of(&pyjwt_verify(&python, &issuer, &ca, "stripe-api", task));
    cluster.ok(&["ca", "prepare"]);
    // A verifier that trusts the bundle follows it: the prepared CA is in it from now on, and
    // the endpoint's certificate is renewed under it once it is active.
    let rotated = cluster.path("bundle-rotated.pem");
    std::fs::write(&rotated, cluster.ok(&["bundle", "show"])).unwrap();
    let ca = rotated.as_path();
    cluster.ok(&["ca", "activate"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let fresh = cluster.ok(&[
            "svid",
            "mint",
            "--jwt",
            "--audience",
            "stripe-api",
            "--task",
            "t-8",
            "--scope",
            "db:read",
        ]);
        let out = pyjwt_verify(&python, &issuer, ca, "stripe-api", fresh.trim());
        assert!(
            out.status.success(),
            "{}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        if kid_of(&out) != old_kid {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "tokens are still signed by {old_kid}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = pyjwt_verify(&python, &issuer, ca, "stripe-api", task);
    assert!(out.status.success(), "the old token: {}", text(&out.stderr));
    assert_eq!(kid_of(&out), old_kid);
    // The old bundle alone no longer does: the certificate now chains to the new CA.
    let old_bundle = cluster.path("bundle.pem");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = curl(&[
            "--cacert",
            old_bundle.to_str().unwrap(),
            &format!("{issuer}/keys"),
        ]);
        if out.status.code() == Some(60) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the certificate was not renewed under the new CA"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs `mayfly server run` with `args` in `dir`, expecting it to stop on its own; returns its
/// output. A server that keeps running is killed and fails the test.
fn server_run(dir: &Path, args: &[&str]) -> Output {
    let mut child = Command::new(BIN)
        .args(["server", "run", "--bind", "127.0.0.1:0", "--data-dir"])
        .arg(dir.join("data"))
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mayfly server run");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("the server ran with {args:?}: {}", text(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("output")
}

/// An operator's CA and a certificate it signed for `localhost`, written as PEM files into
/// `dir`: `op-ca.pem`, `op-cert.pem`, `op-key.pem`, and `other-key.pem` (not the cert's).
fn operator_pki(dir: &Path) {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, IsCa,
        KeyPair,
    };
    // Distinct names: with rcgen's one default name the leaf would look self-signed.
    let named = |cn: &str, sans: Vec<String>| {
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        params
    };
    let mut ca_params = named("Operator Test CA", Vec::new());
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = named("localhost", vec!["localhost".to_owned()])
        .signed_by(&key, &ca)
        .unwrap();
    std::fs::write(dir.join("op-ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("op-cert.pem"), leaf.pem()).unwrap();
    std::fs::write(dir.join("op-key.pem"), key.serialize_pem()).unwrap();
    std::fs::write(
        dir.join("other-key.pem"),
        KeyPair::generate().unwrap().serialize_pem(),
    )
    .unwrap();
    std::fs::write(dir.join("garbage.pem"), "not a certificate\n").unwrap();
}

/// A one-line error on stderr, containing `needle`, and a failed exit.
fn assert_refused(out: &Output, needle: &str) {
    let err = text(&out.stderr);
    assert!(!out.status.success(), "exited 0: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains(needle), "{needle:?} not in {err}");
}

#[test]
fn an_operator_certificate_is_served_and_bad_oidc_settings_stop_the_server_in_one_sentence() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    operator_pki(d);
    let p = |name: &str| d.join(name).to_str().unwrap().to_owned();
    let port = free_port();
    let bind = format!("127.0.0.1:{port}");
    let issuer = format!("https://localhost:{port}");

    // Positive control: the operator's matching pair is served under the issuer's name, and a
    // client trusting only the operator's CA reads the JWKS.
    let mut server = common::cluster::Proc(
        Command::new(BIN)
            .args(["server", "run", "--bind", "127.0.0.1:0", "--data-dir"])
            .arg(d.join("data"))
            .args(["--oidc-bind", &bind, "--oidc-issuer", &issuer])
            .args([
                "--oidc-cert",
                &p("op-cert.pem"),
                "--oidc-key",
                &p("op-key.pem"),
            ])
            .current_dir(d)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    common::cluster::wait_for_path(
        &d.join("data/admin.sock"),
        Duration::from_secs(30),
        "the admin socket",
    );
    let resolve = format!("localhost:{port}:127.0.0.1");
    let deadline = Instant::now() + Duration::from_secs(10);
    let doc = loop {
        let out = curl(&[
            "--fail",
            "--resolve",
            &resolve,
            "--cacert",
            &p("op-ca.pem"),
            &format!("{issuer}/.well-known/openid-configuration"),
        ]);
        if out.status.success() {
            break serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap();
        }
        assert!(Instant::now() < deadline, "{}", text(&out.stderr));
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(doc["issuer"], issuer.as_str());
    assert_eq!(doc["jwks_uri"], format!("{issuer}/keys").as_str());

    // The address is taken now (by that server): a second one cannot listen there.
    let other = tempfile::tempdir().unwrap();
    let out = server_run(other.path(), &["--oidc-bind", &bind]);
    assert_refused(&out, "could not listen on");
    server.stop();

    let port = free_port().to_string();
    let bind = format!("127.0.0.1:{port}");
    let cases: &[(&[&str], &str)] = &[
        (
            &["--oidc-bind", "localhost"],
            "is not an address for --oidc-bind",
        ),
        (
            &["--oidc-bind", &format!("0.0.0.0:{port}")],
            "give --oidc-issuer",
        ),
        (
            &[
                "--oidc-bind",
                &bind,
                "--oidc-issuer",
                "http://oidc.example.com",
            ],
            "must start with https://",
        ),
        (
            &[
                "--oidc-bind",
                &bind,
                "--oidc-issuer",
                "https://oidc.example.com/path",
            ],
            "no path",
        ),
        (
            &["--oidc-issuer", "https://oidc.example.com"],
            "give --oidc-bind too",
        ),
        (
            &["--oidc-bind", &bind, "--oidc-cert", &p("op-cert.pem")],
            "needs both --oidc-cert and --oidc-key",
        ),
        (
            &[
                "--oidc-bind",
                &bind,
                "--oidc-cert",
                &p("missing.pem"),
                "--oidc-key",
                &p("op-key.pem"),
            ],
            "could not read",
        ),
        (
            &[
                "--oidc-bind",
                &bind,
                "--oidc-cert",
                &p("garbage.pem"),
                "--oidc-key",
                &p("op-key.pem"),
            ],
            "does not hold a PEM certificate chain",
        ),
        (
            &[
                "--oidc-bind",
                &bind,
                "--oidc-cert",
                &p("op-cert.pem"),
                "--oidc-key",
                &p("other-key.pem"),
            ],
            "is not the key of the certificate",
        ),
    ];
    for (args, needle) in cases {
        let out = server_run(d, args);
        assert_refused(&out, needle);
    }
}

#[test]
fn a_self_issued_certificate_names_the_issuers_host_and_no_other() {
    let port = free_port();
    let bind = format!("127.0.0.1:{port}");
    let issuer = format!("https://localhost:{port}");
    let cluster = Cluster::start_with(&["--oidc-bind", &bind, "--oidc-issuer", &issuer]);
    let ca = cluster.path("bundle.pem");
    let fetch = |host: &str| {
        curl(&[
            "--resolve",
            &format!("{host}:{port}:127.0.0.1"),
            "--cacert",
            ca.to_str().unwrap(),
            &format!("https://{host}:{port}/.well-known/openid-configuration"),
        ])
    };
    let out = fetch("localhost");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["issuer"], issuer.as_str());
    assert_eq!(doc["jwks_uri"], format!("{issuer}/keys").as_str());
    // The same server and CA under a name the certificate does not hold: refused.
    let out = fetch("other.test");
    assert_eq!(out.status.code(), Some(60), "{}", text(&out.stderr));
}
