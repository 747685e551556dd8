//! Upstream CAs of any kind (issue 10, point 4): a server whose CA is an intermediate under an
//! ordinary corporate root — RSA 2048 or 3072, EC P-256 or P-384, with or without a subject key
//! identifier, with or without a SPIFFE URI SAN — starts, publishes the root in its bundle, an
//! agent bootstraps from the output of `mayfly bundle show`, and the chains it and its workloads
//! get verify with `openssl verify`. The roots are made here with rcgen; the server and the
//! agent are real processes.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use common::cluster::{BIN, Cluster};
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType, IsCa, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_ED25519, PKCS_RSA_SHA256,
    RsaKeySize, SanType,
};
use serde_json::Value;

/// The kinds of key an upstream root may have.
#[derive(Clone, Copy, Debug)]
enum KeyKind {
    Rsa2048,
    Rsa3072,
    P256,
    P384,
    Ed25519,
}

/// An upstream root as an organisation might run it.
struct Root {
    cert_der: Vec<u8>,
    cert_pem: String,
    key: KeyPair,
}

/// Makes a self-signed root: CA=true, keyCertSign + cRLSign; a subject key identifier only
/// when `ski` (rcgen always writes one for a CA, so without it basicConstraints is written by
/// hand); a URI SAN when `uri` is given.
fn make_root(kind: KeyKind, ski: bool, uri: Option<&str>) -> Root {
    let key = match kind {
        KeyKind::Rsa2048 => KeyPair::generate_rsa_for(&PKCS_RSA_SHA256, RsaKeySize::_2048),
        KeyKind::Rsa3072 => KeyPair::generate_rsa_for(&PKCS_RSA_SHA256, RsaKeySize::_3072),
        KeyKind::P256 => KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256),
        KeyKind::P384 => KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384),
        KeyKind::Ed25519 => KeyPair::generate_for(&PKCS_ED25519),
    }
    .expect("generate the root key");
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Example Corp");
    dn.push(DnType::CommonName, format!("Example Corp Root {kind:?}"));
    params.distinguished_name = dn;
    if ski {
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    } else {
        params.is_ca = IsCa::NoCa;
        // basicConstraints, critical: SEQUENCE { BOOLEAN TRUE }.
        let mut bc = CustomExtension::from_oid_content(&[2, 5, 29, 19], vec![0x30, 3, 1, 1, 0xff]);
        bc.set_criticality(true);
        params.custom_extensions = vec![bc];
    }
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    if let Some(uri) = uri {
        params.subject_alt_names = vec![SanType::URI(uri.try_into().expect("ia5"))];
    }
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(365);
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&[
        0x41, 0x17, 0x03, 0x99, 0x5a, 0x01, 0x02, 0x7c,
    ]));
    let cert = params.self_signed(&key).expect("self-sign the root");
    Root {
        cert_der: cert.der().to_vec(),
        cert_pem: cert.pem(),
        key,
    }
}

/// Writes the root's certificate and PKCS#8 key as the server's upstream files.
fn write_root(root: &Root, dir: &Path) -> (PathBuf, PathBuf) {
    let cert = dir.join("corp-root.pem");
    let key = dir.join("corp-root.key");
    std::fs::write(&cert, &root.cert_pem).expect("write root");
    std::fs::write(&key, root.key.serialize_pem()).expect("write root key");
    (cert, key)
}

fn b64url(text: &Value) -> Vec<u8> {
    URL_SAFE_NO_PAD
        .decode(text.as_str().expect("a string"))
        .expect("base64url without padding")
}

/// The modulus of an RSA certificate, as openssl prints it (upper-case hex, no leading zero).
fn openssl_modulus(pem: &str, dir: &Path) -> String {
    let path = dir.join("modulus-of.pem");
    std::fs::write(&path, pem).expect("write");
    let out = Command::new("/usr/bin/openssl")
        .args(["x509", "-noout", "-modulus", "-in"])
        .arg(&path)
        .output()
        .expect("run openssl");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .trim_start_matches("Modulus=")
        .to_owned()
}

/// The one JWK of a one-certificate bundle, checked for what every key must have: `use`,
/// `x5c` holding exactly the certificate, and no private member.
fn only_key(certs: &[Vec<u8>]) -> Value {
    let json = mayfly::bundle::to_spiffe_json(certs).expect("render the bundle");
    let doc: Value = serde_json::from_str(&json).expect("JSON");
    let keys = doc["keys"].as_array().expect("keys");
    assert_eq!(keys.len(), 1, "{json}");
    let key = keys[0].clone();
    assert_eq!(key["use"], "x509-svid", "{json}");
    let x5c = key["x5c"].as_array().expect("x5c");
    assert_eq!(x5c.len(), 1, "{json}");
    // Round trip: the x5c certificate is the PEM's, byte for byte.
    let from_pem = mayfly::bundle::from_pem(mayfly::bundle::to_pem(certs).as_bytes()).unwrap();
    assert_eq!(
        STANDARD.decode(x5c[0].as_str().unwrap()).unwrap(),
        from_pem[0]
    );
    for private in ["d", "p", "q", "dp", "dq", "qi"] {
        assert!(key.get(private).is_none(), "{private} in {json}");
    }
    key
}

#[test]
fn the_spiffe_bundle_renders_rsa_and_ec_roots_field_by_field() {
    let tmp = tempfile::tempdir().unwrap();
    for (kind, bits) in [(KeyKind::Rsa2048, 2048), (KeyKind::Rsa3072, 3072)] {
        let root = make_root(kind, true, None);
        let key = only_key(std::slice::from_ref(&root.cert_der));
        assert_eq!(key["kty"], "RSA");
        assert!(key.get("crv").is_none() && key.get("x").is_none(), "{key}");
        assert_eq!(key["e"], "AQAB", "65537 as the shortest big-endian octets");
        let n = b64url(&key["n"]);
        assert_eq!(n.len() * 8, bits, "no leading zero octet");
        assert_eq!(
            hex::encode_upper(&n),
            openssl_modulus(&root.cert_pem, tmp.path())
        );
    }
    for (kind, crv, len) in [(KeyKind::P256, "P-256", 32), (KeyKind::P384, "P-384", 48)] {
        let root = make_root(kind, false, None);
        let key = only_key(std::slice::from_ref(&root.cert_der));
        assert_eq!(key["kty"], "EC");
        assert_eq!(key["crv"], crv);
        assert!(key.get("n").is_none() && key.get("e").is_none(), "{key}");
        let (x, y) = (b64url(&key["x"]), b64url(&key["y"]));
        assert_eq!((x.len(), y.len()), (len, len), "full-length coordinates");
        // rcgen's raw public key is the uncompressed point 04 || x || y.
        let point = root.key.public_key_raw();
        assert_eq!(point[0], 4);
        assert_eq!(&point[1..=len], x.as_slice());
        assert_eq!(&point[len + 1..], y.as_slice());
    }
    // A Mayfly CA (P-256, with its SPIFFE SAN) renders as before.
    let own = make_root(KeyKind::P256, true, Some("spiffe://acme.test"));
    assert_eq!(only_key(&[own.cert_der])["crv"], "P-256");

    // A key no JWK here can carry is refused by name, not rendered half.
    let ed = make_root(KeyKind::Ed25519, true, None);
    let err = mayfly::bundle::to_spiffe_json(&[ed.cert_der]).unwrap_err();
    assert!(
        matches!(err, mayfly::bundle::BundleError::UnsupportedKey(_)),
        "{err:?}"
    );
    assert!(err.to_string().contains("1.3.101.112"), "{err}");
}

#[test]
fn sequence_and_refresh_hint_are_the_callers() {
    let root = make_root(KeyKind::P256, true, None);
    let info = mayfly::bundle::SpiffeBundleInfo {
        sequence: Some(7),
        refresh_hint_secs: 42,
    };
    let json =
        mayfly::bundle::to_spiffe_json_with(std::slice::from_ref(&root.cert_der), info).unwrap();
    let doc: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(doc["spiffe_sequence"], 7);
    assert_eq!(doc["spiffe_refresh_hint"], 42);
    let plain: Value =
        serde_json::from_str(&mayfly::bundle::to_spiffe_json(&[root.cert_der]).unwrap()).unwrap();
    assert!(plain.get("spiffe_sequence").is_none(), "{plain}");
    assert_eq!(plain["spiffe_refresh_hint"], 300);
}

/// A cluster whose server signs under `root`; the cluster's `bundle.pem` is `bundle show`'s.
fn cluster_under(root: &Root, tmp: &Path) -> Cluster {
    let (cert, key) = write_root(root, tmp);
    Cluster::start_with(&[
        "--upstream-ca-cert",
        cert.to_str().unwrap(),
        "--upstream-ca-key",
        key.to_str().unwrap(),
    ])
}

/// Splits a PEM chain file (leaf first) into `leaf.pem` and `intermediates.pem` in `dir`.
fn split_chain(chain_pem: &Path, dir: &Path) -> (PathBuf, PathBuf) {
    let certs = mayfly::bundle::from_pem(&std::fs::read(chain_pem).unwrap()).unwrap();
    assert!(certs.len() >= 2, "the chain holds the intermediate");
    let leaf = dir.join("leaf.pem");
    let rest = dir.join("intermediates.pem");
    std::fs::write(&leaf, mayfly::bundle::to_pem(&certs[..1])).unwrap();
    std::fs::write(&rest, mayfly::bundle::to_pem(&certs[1..])).unwrap();
    (leaf, rest)
}

/// `openssl verify -CAfile bundle -untrusted intermediates leaf`, required to pass.
fn openssl_verify(bundle: &Path, chain_pem: &Path, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let (leaf, rest) = split_chain(chain_pem, dir);
    let out = Command::new("/usr/bin/openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(bundle)
        .arg("-untrusted")
        .arg(&rest)
        .arg(&leaf)
        .output()
        .expect("run openssl verify");
    assert!(
        out.status.success(),
        "openssl verify refused {}: {}{}",
        chain_pem.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Where pkilint's commands are (`MAYFLY_PKILINT_BIN`, set by `.ci/run`, which installs
/// pkilint from PyPI into a virtualenv under target/); `None` prints a skip notice.
fn pkilint_bin() -> Option<PathBuf> {
    match std::env::var("MAYFLY_PKILINT_BIN") {
        Ok(dir) if !dir.is_empty() => Some(PathBuf::from(dir)),
        _ => {
            println!("skipped pkilint: MAYFLY_PKILINT_BIN is not set");
            None
        }
    }
}

/// The finding codes of one pkilint run (`code (SEVERITY): ...` lines).
fn pkilint_findings(bin: &Path, tool: &str, files: &[&Path]) -> Vec<String> {
    let out = Command::new(bin.join(tool))
        .arg("lint")
        .args(files)
        .output()
        .unwrap_or_else(|e| panic!("run {tool}: {e}"));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("    "))
        .map(|l| l.trim().to_owned())
        .collect()
}

/// pkilint on the intermediate and the leaf of `chain_pem`, and on both signer/signee pairs:
/// nothing but what DESIGN.md expects of every Mayfly certificate (the `spiffe` URI scheme,
/// which pkilint's URI syntax check does not know, and a notice that the key identifier is the
/// RFC 7093 SHA-256 method).
fn pkilint_chain(root_pem: &Path, chain_pem: &Path, dir: &Path) {
    let Some(bin) = pkilint_bin() else { return };
    let (leaf, intermediate) = split_chain(chain_pem, dir);
    for cert in [&intermediate, &leaf] {
        for finding in pkilint_findings(&bin, "lint_pkix_cert", &[cert]) {
            let expected = (finding.starts_with("pkix.invalid_uri_syntax (ERROR)")
                && finding.contains("\"spiffe://"))
                || finding == "pkix.unknown_subject_key_identifier_calculation_method (NOTICE)";
            assert!(expected, "pkilint on {}: {finding}", cert.display());
        }
    }
    for (signer, signee) in [(root_pem, intermediate.as_path()), (&intermediate, &leaf)] {
        let findings = pkilint_findings(
            &bin,
            "lint_pkix_signer_signee_cert_chain",
            &[signer, signee],
        );
        assert!(findings.is_empty(), "{findings:?}");
    }
}

/// The whole path for one kind of root: the bundle is the root alone; the agent bootstraps
/// from it; a workload gets an SVID; both chains verify with openssl; the SPIFFE bundle
/// renders the root's key as `kty`.
fn bootstrap_and_verify(root: Root, kty: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let mut cluster = cluster_under(&root, tmp.path());
    let bundle =
        mayfly::bundle::from_pem(&std::fs::read(cluster.path("bundle.pem")).unwrap()).unwrap();
    assert_eq!(
        bundle,
        vec![root.cert_der.clone()],
        "the bundle is the root"
    );

    cluster.start_agent();
    cluster.create_entry(
        "spiffe://mayfly.local/corp/workload",
        &["--selector", "unix:uid:0"],
    );
    let dir = cluster.path("svid");
    fetch_chain(&cluster, &dir);
    let bundle_pem = cluster.path("bundle.pem");
    openssl_verify(
        &bundle_pem,
        &cluster.path("agent-data/agent.pem"),
        &cluster.path("check-agent"),
    );
    openssl_verify(
        &bundle_pem,
        &dir.join("svid.pem"),
        &cluster.path("check-workload"),
    );
    pkilint_chain(
        &bundle_pem,
        &dir.join("svid.pem"),
        &cluster.path("check-workload"),
    );
    // The workload's own bundle file (from the Workload API) holds the same root.
    assert_eq!(
        mayfly::bundle::from_pem(&std::fs::read(dir.join("bundle.pem")).unwrap()).unwrap(),
        vec![root.cert_der.clone()]
    );

    let json = cluster.ok(&["bundle", "show", "--format", "spiffe"]);
    let doc: Value = serde_json::from_str(&json).expect("bundle JSON");
    assert_eq!(doc["keys"][0]["kty"], kty, "{json}");
    assert_eq!(
        STANDARD
            .decode(doc["keys"][0]["x5c"][0].as_str().unwrap())
            .unwrap(),
        root.cert_der
    );
}

#[test]
fn an_rsa_2048_root_without_san_or_ski() {
    bootstrap_and_verify(make_root(KeyKind::Rsa2048, false, None), "RSA");
}

#[test]
fn an_rsa_3072_root_without_san() {
    bootstrap_and_verify(make_root(KeyKind::Rsa3072, true, None), "RSA");
}

#[test]
fn an_ec_p384_root_without_san_or_ski() {
    bootstrap_and_verify(make_root(KeyKind::P384, false, None), "EC");
}

#[test]
fn an_ec_p256_root_with_a_non_spiffe_uri_san() {
    bootstrap_and_verify(
        make_root(KeyKind::P256, true, Some("https://pki.example.com/root")),
        "EC",
    );
}

/// Runs `mayfly agent run` against the cluster's server with `bundle` and `extra` flags, in a
/// fresh data dir, until it exits (a refused bootstrap) or its socket appears (attested).
/// Returns whether it attested, and its log.
fn try_agent(cluster: &Cluster, name: &str, bundle: &Path, extra: &[&str]) -> (bool, String) {
    let (token, _) = cluster.new_token();
    let socket = cluster.path(&format!("{name}.sock"));
    let log = cluster.path(&format!("{name}.log"));
    let mut child = Command::new(BIN)
        .args(["agent", "run", "--server"])
        .arg(format!("127.0.0.1:{}", cluster.port))
        .args(["--join-token", &token, "--trust-bundle"])
        .arg(bundle)
        .arg("--socket")
        .arg(&socket)
        .arg("--data-dir")
        .arg(cluster.path(&format!("{name}-data")))
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
        .spawn()
        .expect("spawn agent");
    let deadline = Instant::now() + Duration::from_secs(30);
    let attested = loop {
        if socket.exists() {
            break true;
        }
        if child.try_wait().expect("wait").is_some() {
            break false;
        }
        assert!(
            Instant::now() < deadline,
            "the agent neither attested nor exited"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    (attested, std::fs::read_to_string(&log).unwrap_or_default())
}

#[test]
fn bootstrap_from_a_sanless_root_checks_the_server_against_it_and_a_pinned_trust_domain() {
    let tmp = tempfile::tempdir().unwrap();
    let root = make_root(KeyKind::P256, true, None);
    let cluster = cluster_under(&root, tmp.path());
    let bundle = cluster.path("bundle.pem");

    // Positive controls: the trust domain learnt from the verified server SVID, or pinned.
    let (ok, log) = try_agent(&cluster, "learnt", &bundle, &[]);
    assert!(ok, "{log}");
    let (ok, log) = try_agent(
        &cluster,
        "pinned",
        &bundle,
        &["--trust-domain", "mayfly.local"],
    );
    assert!(ok, "{log}");

    // A pin that is not the server's trust domain: refused, saying so.
    let (ok, log) = try_agent(
        &cluster,
        "wrong-pin",
        &bundle,
        &["--trust-domain", "other.test"],
    );
    assert!(!ok, "{log}");
    assert!(log.contains("spiffe://other.test/mayfly/server"), "{log}");

    // Another organisation's root: the server's SVID does not chain to it.
    let other = make_root(KeyKind::P256, true, None);
    let other_bundle = cluster.path("other-bundle.pem");
    std::fs::write(&other_bundle, &other.cert_pem).unwrap();
    let (ok, log) = try_agent(&cluster, "other-root", &other_bundle, &[]);
    assert!(!ok, "{log}");
    assert!(log.contains("does not lead to a root"), "{log}");

    // A pin that contradicts a root's SPIFFE SAN is refused before connecting.
    let named = make_root(KeyKind::P256, true, Some("spiffe://acme.test"));
    let named_bundle = cluster.path("named-bundle.pem");
    std::fs::write(
        &named_bundle,
        format!("{}{}", root.cert_pem, named.cert_pem),
    )
    .unwrap();
    let (ok, log) = try_agent(
        &cluster,
        "contradiction",
        &named_bundle,
        &["--trust-domain", "mayfly.local"],
    );
    assert!(!ok, "{log}");
    assert!(log.contains("disagrees with the trust bundle"), "{log}");
}

/// A TCP upstream on a thread: reads one line, answers `echo: <line>`, closes.
fn line_echo_upstream() -> std::net::SocketAddr {
    use std::io::{BufRead as _, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind upstream");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for mut tcp in listener.incoming().flatten() {
            let mut line = String::new();
            let mut reader = std::io::BufReader::new(tcp.try_clone().expect("clone"));
            if reader.read_line(&mut line).is_ok() {
                let _ = tcp.write_all(format!("echo: {line}").as_bytes());
            }
        }
    });
    addr
}

#[test]
fn mayfly_proxy_serves_mtls_under_a_sanless_rsa_root() {
    let tmp = tempfile::tempdir().unwrap();
    let root = make_root(KeyKind::Rsa2048, false, None);
    let mut cluster = cluster_under(&root, tmp.path());
    cluster.start_agent();
    cluster.create_entry(
        "spiffe://mayfly.local/corp/proxy",
        &["--selector", "unix:uid:0", "--dns", "localhost"],
    );
    cluster.create_entry(
        "spiffe://mayfly.local/corp/workload",
        &["--selector", "unix:uid:0"],
    );
    let upstream = line_echo_upstream();
    let port = common::cluster::free_port();
    let log = cluster.path("proxy.log");
    let child = Command::new(BIN)
        .args([
            "proxy",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--socket",
        ])
        .arg(cluster.endpoint())
        .args([
            "--spiffe-id",
            "spiffe://mayfly.local/corp/proxy",
            "--upstream",
            &upstream.to_string(),
            "--allow-id",
            "spiffe://mayfly.local/corp/*",
        ])
        .env_remove("SPIFFE_ENDPOINT_SOCKET")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn mayfly proxy");
    let _proxy = common::cluster::Proc(child);
    let deadline = Instant::now() + Duration::from_secs(40);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("mayfly proxy running")
    {
        assert!(
            Instant::now() < deadline,
            "the proxy did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The client's credentials from the Workload API; its chain carries the intermediate.
    let creds = cluster.path("client");
    cluster.ok(&["svid", "fetch", "--write", creds.to_str().unwrap()]);
    let (leaf, intermediates) = split_chain(&creds.join("svid.pem"), &creds);
    let s_client = |with_chain: bool| {
        let mut cmd = Command::new("/usr/bin/openssl");
        cmd.args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
            .args(["-servername", "localhost", "-verify_hostname", "localhost"])
            .args(["-verify_return_error", "-quiet", "-CAfile"])
            .arg(cluster.path("bundle.pem"))
            .arg("-cert")
            .arg(&leaf)
            .arg("-key")
            .arg(creds.join("svid.key"));
        if with_chain {
            cmd.arg("-cert_chain").arg(&intermediates);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("openssl s_client");
        use std::io::Write as _;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"hello through the proxy\n")
            .unwrap();
        child.wait_with_output().expect("s_client output")
    };
    let out = s_client(true);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "echo: hello through the proxy\n",
        "{}; proxy log: {}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // Negative control: without its intermediate the client's leaf does not chain to the root.
    let out = s_client(false);
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("echo:"),
        "{out:?}"
    );
}

/// `svid fetch --write DIR` until it succeeds (the agent syncs first), for at most 30 s; the
/// certificates of the chain it wrote, leaf first.
fn fetch_chain(cluster: &Cluster, dir: &Path) -> Vec<Vec<u8>> {
    let dir_text = dir.display().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = cluster.mayfly(&["svid", "fetch", "--write", &dir_text]);
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no SVID for the workload: {}; agent log: {}",
            String::from_utf8_lossy(&out.stderr),
            cluster.agent_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    mayfly::bundle::from_pem(&std::fs::read(dir.join("svid.pem")).unwrap()).unwrap()
}

/// The `(id, state, upstream)` of each CA in `ca list --output json`.
fn ca_rows(cluster: &Cluster) -> Vec<(String, String, bool)> {
    let doc: Value =
        serde_json::from_str(&cluster.ok(&["ca", "list", "--output", "json"])).expect("json");
    doc.as_array()
        .expect("an array")
        .iter()
        .map(|c| {
            (
                c["id"].as_str().expect("id").to_owned(),
                c["state"].as_str().expect("state").to_owned(),
                c["upstream"] == true,
            )
        })
        .collect()
}

/// Rotation under an upstream root (issue 10, point 1): with a 36 s CA, the server prepares
/// and activates a new intermediate signed by the same corporate root on its own schedule; the
/// bundle stays exactly the root throughout; the workload's SVID moves to the new intermediate
/// and its chain verifies with openssl against the root, before and after.
#[test]
fn the_intermediate_under_an_upstream_root_rotates_and_chains_keep_verifying() {
    let tmp = tempfile::tempdir().unwrap();
    let root = make_root(KeyKind::P256, false, None);
    let (cert, key) = write_root(&root, tmp.path());
    let mut args = vec![
        "--upstream-ca-cert",
        cert.to_str().unwrap(),
        "--upstream-ca-key",
        key.to_str().unwrap(),
    ];
    args.extend_from_slice(common::cluster::FAST_ROTATION);
    let mut cluster = Cluster::start_with(&args);
    let rows = ca_rows(&cluster);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert!(
        rows[0].1 == "active" && rows[0].2,
        "an active upstream CA: {rows:?}"
    );
    let first = rows[0].0.clone();

    cluster.start_agent();
    cluster.create_entry(
        "spiffe://mayfly.local/corp/rotating",
        &["--selector", "unix:uid:0", "--ttl", "5s"],
    );
    let bundle_pem = cluster.path("bundle.pem");
    let before = fetch_chain(&cluster, &cluster.path("before"));
    openssl_verify(
        &bundle_pem,
        &cluster.path("before/svid.pem"),
        &cluster.path("check-before"),
    );

    // The schedule activates a new intermediate at 1/6 of the first one's life left.
    let deadline = Instant::now() + Duration::from_secs(90);
    let next = loop {
        let rows = ca_rows(&cluster);
        assert!(
            rows.iter().all(|r| r.2),
            "every CA is under the upstream: {rows:?}"
        );
        assert_eq!(
            mayfly::bundle::from_pem(cluster.ok(&["bundle", "show"]).as_bytes()).unwrap(),
            vec![root.cert_der.clone()],
            "the bundle is the root alone"
        );
        if let Some(active) = rows.iter().find(|r| r.1 == "active" && r.0 != first) {
            break active.0.clone();
        }
        assert!(Instant::now() < deadline, "no new CA activated: {rows:?}");
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_ne!(next, first);

    // The workload's SVID moves to the new intermediate at its next rotation.
    let deadline = Instant::now() + Duration::from_secs(30);
    let after = loop {
        let chain = fetch_chain(&cluster, &cluster.path("after"));
        if chain[1] != before[1] {
            break chain;
        }
        assert!(
            Instant::now() < deadline,
            "the SVID stayed under the first CA"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(after.len(), 2, "leaf and intermediate");
    let issuer = hex::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        &after[1],
    ));
    assert_eq!(issuer, next, "the new SVID chains to the activated CA");
    openssl_verify(
        &bundle_pem,
        &cluster.path("after/svid.pem"),
        &cluster.path("check-after"),
    );
}

/// Rotation by hand under an upstream root: the next CA is an intermediate signed by the same
/// root, the bundle keeps holding just that root, and such a CA cannot be revoked alone.
#[test]
fn a_rotation_by_hand_under_the_upstream_keeps_the_root_and_refuses_revoking_an_intermediate() {
    let tmp = tempfile::tempdir().unwrap();
    let root = make_root(KeyKind::P256, true, None);
    let cluster = cluster_under(&root, tmp.path());
    let bundle = cluster.ok(&["bundle", "show"]);
    let first = ca_rows(&cluster).remove(0).0;
    cluster.ok(&["ca", "prepare"]);
    cluster.ok(&["ca", "activate"]);
    let rows = ca_rows(&cluster);
    let (active, _, upstream) = rows.iter().find(|(_, state, _)| state == "active").unwrap();
    assert!(upstream, "{rows:?}");
    assert_ne!(*active, first);
    // The new CA chains to the upstream root.
    let verify = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(tmp.path().join("corp-root.pem"))
        .arg(cluster.path(&format!(".mayfly/server/ca/{active}.pem")))
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    assert_eq!(
        cluster.ok(&["bundle", "show"]),
        bundle,
        "still the one root"
    );
    // Tainting the old intermediate works; revoking it alone is refused in one sentence.
    cluster.ok(&["ca", "taint", &first]);
    let out = cluster.mayfly(&["ca", "revoke", &first]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("intermediate under the upstream CA"), "{err}");
}
