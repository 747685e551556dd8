//! The `mayfly` binary as an operator uses it: a real server process on its embedded
//! defaults, the operator commands against its admin socket, bad input refused with one
//! sentence and a non-zero exit, nothing stored.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_mayfly");

struct Server {
    child: Child,
    dir: PathBuf,
}

impl Server {
    /// Starts `mayfly server run` in `dir` with `args` and waits for its admin socket.
    fn start(dir: &Path, args: &[&str]) -> Self {
        let socket = dir.join(".mayfly/server/admin.sock");
        let _ = std::fs::remove_file(&socket);
        let child = Command::new(BIN)
            .args(["server", "run"])
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mayfly server run");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "the server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            child,
            dir: dir.to_owned(),
        }
    }

    fn mayfly(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .current_dir(&self.dir)
            .output()
            .expect("run mayfly")
    }

    /// Stops the server with SIGTERM and checks it exits cleanly.
    fn stop(mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("signal");
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "server exited with {status}");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: Output) -> String {
    assert!(o.status.success(), "failed: {}", stderr(&o));
    stdout(&o)
}

/// A refusal: non-zero exit, one `error:` sentence on stderr containing `needle`, no panic.
fn refused(o: Output, needle: &str) {
    let err = stderr(&o);
    assert!(
        !o.status.success(),
        "expected a refusal, got success: {}",
        stdout(&o)
    );
    assert!(err.starts_with("error: "), "stderr: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.contains(needle), "'{needle}' not in: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

fn entry_count(server: &Server) -> usize {
    let out = ok(server.mayfly(&["entry", "list", "--output", "json"]));
    serde_json::from_str::<Vec<serde_json::Value>>(&out)
        .expect("json")
        .len()
}

#[test]
fn operator_workflow_on_the_embedded_defaults() {
    let dir = tempfile::tempdir().unwrap();
    // No flags at all: trust domain, data dir, node API address and store are the defaults.
    let server = Server::start(dir.path(), &[]);
    assert!(dir.path().join(".mayfly/server/mayfly.sqlite").exists());
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.path().join(".mayfly/server/admin.sock"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "admin socket mode");

    let token: serde_json::Value = serde_json::from_str(&ok(
        server.mayfly(&["token", "generate", "--ttl", "5m", "--output", "json"])
    ))
    .unwrap();
    let agent = token["agent_id"].as_str().unwrap().to_owned();
    assert!(agent.starts_with("spiffe://mayfly.local/mayfly/agent/join_token/"));
    assert_eq!(token["token"].as_str().unwrap().len(), 64);

    let id = ok(server.mayfly(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://mayfly.local/agents/billing-bot",
        "--parent-id",
        &agent,
        "--selector",
        "unix:uid:1001",
        "--scope",
        "stripe:write:refunds",
        "--scope",
        "stripe:read:customers",
        "--ttl",
        "5m",
    ]));
    let id = id.trim();
    assert_eq!(id.len(), 32);
    let shown: serde_json::Value = serde_json::from_str(&ok(
        server.mayfly(&["entry", "show", id, "--output", "json"])
    ))
    .unwrap();
    assert_eq!(
        shown["spiffe_id"],
        "spiffe://mayfly.local/agents/billing-bot"
    );
    assert_eq!(
        shown["scopes"],
        serde_json::json!(["stripe:read:customers", "stripe:write:refunds"])
    );
    assert_eq!(shown["ttl_seconds"], 300);
    assert_eq!(entry_count(&server), 1);

    let pem = ok(server.mayfly(&["bundle", "show"]));
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
    let spiffe: serde_json::Value =
        serde_json::from_str(&ok(server.mayfly(&["bundle", "show", "--format", "spiffe"])))
            .unwrap();
    assert_eq!(spiffe["keys"][0]["use"], "x509-svid");
    assert_eq!(spiffe["keys"][0]["crv"], "P-256");

    let audit = ok(server.mayfly(&["audit", "list"]));
    assert!(audit.contains("token.create"), "{audit}");
    assert!(audit.contains("entry.create"), "{audit}");
    assert!(ok(server.mayfly(&["audit", "verify"])).contains("intact: 2 records"));

    // A restart keeps the entries, the CA and the audit log.
    server.stop();
    let server = Server::start(dir.path(), &[]);
    assert_eq!(entry_count(&server), 1);
    assert_eq!(ok(server.mayfly(&["bundle", "show"])), pem);
    assert!(ok(server.mayfly(&["audit", "verify"])).contains("intact: 2 records"));

    ok(server.mayfly(&["entry", "delete", id]));
    assert_eq!(entry_count(&server), 0);
    refused(server.mayfly(&["entry", "delete", id]), "no entry");
    server.stop();
}

#[test]
fn bad_input_is_one_sentence_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--bind", "127.0.0.1:0"]);
    let agent = "spiffe://mayfly.local/mayfly/agent/join_token/00000000000000000000000000000000";
    let create = |spiffe_id: &str, selector: &str, extra: &[&str]| {
        let mut args = vec![
            "entry",
            "create",
            "--spiffe-id",
            spiffe_id,
            "--parent-id",
            agent,
            "--selector",
            selector,
        ];
        args.extend_from_slice(extra);
        server.mayfly(&args)
    };
    let good = "spiffe://mayfly.local/agents/bot";

    refused(
        create("spiffe://mayfly.local/agents//bot", "unix:uid:1", &[]),
        "empty path segment",
    );
    refused(
        create("http://mayfly.local/bot", "unix:uid:1", &[]),
        "spiffe://",
    );
    refused(create(good, "unix:pid:1", &[]), "unknown unix selector");
    refused(create(good, "uid:1", &[]), "is not a selector");
    refused(
        create(good, "unix:uid:1", &["--ttl", "2h"]),
        "above the ceiling",
    );
    refused(
        create(good, "unix:uid:1", &["--ttl", "5 minutes"]),
        "not a duration",
    );
    refused(
        create("spiffe://mayfly.local/agents/scope/bot", "unix:uid:1", &[]),
        "reserves",
    );
    refused(
        create("spiffe://other.test/agents/bot", "unix:uid:1", &[]),
        "not in trust domain",
    );
    refused(
        create(good, "unix:uid:1", &["--scope", "stripe:Read"]),
        "not a valid scope",
    );
    assert_eq!(entry_count(&server), 0, "nothing stored after refusals");

    // Positive control on the same server: the corrected request is stored.
    ok(create(good, "unix:uid:1", &["--ttl", "1h"]));
    assert_eq!(entry_count(&server), 1);

    refused(
        server.mayfly(&["entry", "show", "not-an-id"]),
        "not an entry ID",
    );
    refused(
        server.mayfly(&["agent", "ban", "spiffe://mayfly.local/mayfly/agent/x/y"]),
        "no agent",
    );
    refused(
        server.mayfly(&["--admin-socket", "/nonexistent/admin.sock", "entry", "list"]),
        "no admin socket",
    );
    refused(
        Command::new(BIN)
            .args(["server", "run", "--trust-domain", "Bad_Domain!"])
            .current_dir(dir.path())
            .output()
            .unwrap(),
        "trust domain",
    );
    server.stop();
}

#[test]
fn audit_verify_fails_on_a_tampered_log() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--bind", "127.0.0.1:0"]);
    for _ in 0..3 {
        ok(server.mayfly(&["token", "generate"]));
    }
    assert!(ok(server.mayfly(&["audit", "verify"])).contains("intact: 3 records"));

    let db = dir.path().join(".mayfly/server/mayfly.sqlite");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display()))
            .await
            .unwrap();
        sqlx::query("UPDATE audit SET reason = 'nothing happened' WHERE seq = 2")
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
    });
    refused(server.mayfly(&["audit", "verify"]), "altered");
    server.stop();
}
