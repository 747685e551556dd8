//! The real py-spiffe (the SPIFFE Python library, on the current grpcio) against a real server
//! and agent: its `WorkloadApiClient`, with its own gRPC channel and no channel options, fetches
//! this process's X.509-SVID and the X.509 bundles, and its `X509Source` follows the
//! FetchX509SVID stream (tests/py/fetch_x509.py).
//!
//! grpcio >= 1.57 sends the percent-encoded socket path as `:authority`, which upstream h2
//! resets; this is the end-to-end proof that the agent serves it (see vendor/h2/MAYFLY-PATCH.md).
//! `.ci/run` builds the virtualenv from PyPI and sets `MAYFLY_PYSPIFFE_PYTHON`; without it the
//! test prints a skip notice.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::cluster::Cluster;

const ID: &str = "spiffe://mayfly.local/agents/python";
const TRUST_DOMAIN: &str = "mayfly.local";

/// The virtualenv's Python (`MAYFLY_PYSPIFFE_PYTHON`); `None` prints a skip notice.
fn python() -> Option<PathBuf> {
    match std::env::var("MAYFLY_PYSPIFFE_PYTHON") {
        Ok(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => {
            println!("skipped py-spiffe interop: MAYFLY_PYSPIFFE_PYTHON is not set");
            None
        }
    }
}

/// Runs tests/py/fetch_x509.py on the cluster's socket, as py-spiffe finds it: from
/// `SPIFFE_ENDPOINT_SOCKET`.
fn fetch_x509(python: &PathBuf, cluster: &Cluster) -> Output {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/fetch_x509.py");
    Command::new(python)
        .arg(script)
        .args([ID, TRUST_DOMAIN])
        .env("SPIFFE_ENDPOINT_SOCKET", cluster.endpoint())
        .output()
        .expect("run python")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn py_spiffe_fetches_its_x509_svid_and_bundles() {
    let Some(python) = python() else { return };
    let mut cluster = Cluster::start();
    cluster.start_agent();

    // Negative first, on the same agent: no entry yet, so py-spiffe gets the agent's refusal
    // (a gRPC status from the Workload API, not a reset stream).
    let refused = fetch_x509(&python, &cluster);
    assert!(!refused.status.success(), "{}", text(&refused.stdout));
    let err = text(&refused.stderr);
    assert!(err.contains("PERMISSION_DENIED"), "{err}");
    assert!(!err.contains("RST_STREAM"), "{err}");

    let uid = nix::unistd::getuid().as_raw().to_string();
    cluster.create_entry(ID, &["--selector", &format!("unix:uid:{uid}")]);
    // Wait until the agent serves the entry, asked with Mayfly's own client.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cluster.mayfly(&["svid", "fetch"]).status.success() {
        assert!(
            Instant::now() < deadline,
            "the agent never served the entry"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let out = fetch_x509(&python, &cluster);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains(&format!("x509-svid {ID}\n")), "{stdout}");
    assert!(
        stdout.contains(&format!("x509-bundle {TRUST_DOMAIN} ")),
        "{stdout}"
    );
    assert!(stdout.contains(&format!("x509-source {ID}\n")), "{stdout}");
}

/// The JWT half through py-spiffe: FetchJWTSVID, FetchJWTBundles (parsed by py-spiffe's JWKS
/// reader and used to verify the token locally on PyJWT), ValidateJWTSVID (the wrong audience
/// refused), a JwtSource, and a task JWT minted by `mayfly svid mint --jwt` verified locally
/// (tests/py/fetch_jwt.py).
#[test]
fn py_spiffe_fetches_and_validates_jwt_svids_and_bundles() {
    let Some(python) = python() else { return };
    let mut cluster = Cluster::start();
    cluster.start_agent();
    let uid = nix::unistd::getuid().as_raw().to_string();
    cluster.create_entry(
        ID,
        &[
            "--selector",
            &format!("unix:uid:{uid}"),
            "--scope",
            "db:read",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let task_token = loop {
        let out = cluster.mayfly(&[
            "svid",
            "mint",
            "--jwt",
            "--audience",
            "db-api",
            "--task",
            "py-1",
            "--scope",
            "db:read",
        ]);
        if out.status.success() {
            break text(&out.stdout).trim().to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "the agent never minted: {}",
            text(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    };

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/fetch_jwt.py");
    let out = Command::new(&python)
        .arg(script)
        .args([ID, TRUST_DOMAIN, &task_token, "db-api"])
        .env("SPIFFE_ENDPOINT_SOCKET", cluster.endpoint())
        .output()
        .expect("run python");
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    for line in [
        format!("jwt-svid {ID}\n"),
        format!("jwt-bundle {TRUST_DOMAIN} 1\n"),
        format!("jwt-verified-locally {ID}\n"),
        format!("jwt-validated-by-agent {ID}\n"),
        "jwt-wrong-audience-refused ".to_owned(),
        format!("task-jwt {ID}/scope/db.read scope=db:read\n"),
        format!("jwt-source {TRUST_DOMAIN}\n"),
    ] {
        assert!(stdout.contains(&line), "{line:?} missing from:\n{stdout}");
    }
}
