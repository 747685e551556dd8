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

/// `args` run in `server`'s directory with stdout the write end of a pipe whose reader is
/// already gone, so the first write fails with EPIPE.
fn run_with_closed_stdout(dir: &Path, args: &[&str]) -> Output {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("run mayfly")
}

#[test]
fn closing_stdout_early_is_a_quiet_exit() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--bind", "127.0.0.1:0"]);
    ok(server.mayfly(&["token", "generate"]));
    for args in [
        &["entry", "list"][..],
        &["audit", "list"],
        &["audit", "list", "--output", "json"],
        &["bundle", "show"],
        &["token", "generate", "--output", "json"],
        &["completions", "bash"],
    ] {
        // Positive control: with a reader, the command prints.
        assert!(!ok(server.mayfly(args)).is_empty(), "{args:?}");
        let out = run_with_closed_stdout(dir.path(), args);
        assert!(
            out.status.success(),
            "{args:?} exited with {}: {}",
            out.status,
            stderr(&out)
        );
        assert_eq!(
            stderr(&out),
            "",
            "{args:?}: nothing to say when stdout closes"
        );
    }
    server.stop();
}

/// Starts `mayfly server run` with stderr to `log` and waits for its admin socket.
fn server_with_log(dir: &Path, args: &[&str], log: &Path) -> Server {
    let socket = dir.join(".mayfly/server/admin.sock");
    let _ = std::fs::remove_file(&socket);
    let child = Command::new(BIN)
        .args(["server", "run", "--bind", "127.0.0.1:0"])
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", "info")
        .env_remove("MAYFLY_LOG_FORMAT")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("spawn mayfly server run");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "the server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Server {
        child,
        dir: dir.to_owned(),
    }
}

#[test]
fn server_logs_in_a_file_have_no_colour_codes_and_json_logs_are_json() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server.log");
    server_with_log(dir.path(), &[], &log).stop();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("mayfly server running"), "{text}");
    assert!(
        !text.contains('\u{1b}'),
        "escape codes in a log file: {text:?}"
    );

    let log = dir.path().join("server.json.log");
    server_with_log(dir.path(), &["--log-format", "json"], &log).stop();
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "mayfly server running; stop with Ctrl-C"),
        "{text}"
    );
    assert!(!text.contains('\u{1b}'), "{text:?}");
}

/// The trust domain a running server issues under, read from a join token's agent ID.
fn trust_domain_of(server: &Server) -> String {
    let token: serde_json::Value = serde_json::from_str(&ok(
        server.mayfly(&["token", "generate", "--output", "json"])
    ))
    .unwrap();
    let agent = token["agent_id"].as_str().unwrap();
    agent["spiffe://".len()..]
        .split('/')
        .next()
        .unwrap()
        .to_owned()
}

#[test]
fn settings_come_from_flags_over_environment_over_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        "trust_domain = \"file.test\"\nbind = \"127.0.0.1:0\"\nagent_ttl = \"1h30m\"\n",
    )
    .unwrap();
    let config = config.display().to_string();
    let start = |env: Option<&str>, flags: &[&str]| {
        let socket = dir.path().join(".mayfly/server/admin.sock");
        let _ = std::fs::remove_file(&socket);
        let mut cmd = Command::new(BIN);
        cmd.args(["server", "run", "--config", &config])
            .args(flags)
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        match env {
            Some(td) => cmd.env("MAYFLY_SERVER_TRUST_DOMAIN", td),
            None => cmd.env_remove("MAYFLY_SERVER_TRUST_DOMAIN"),
        };
        let child = cmd.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "the server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Server {
            child,
            dir: dir.path().to_owned(),
        }
    };
    for (env, flags, want) in [
        (None, &[][..], "file.test"),
        (Some("env.test"), &[][..], "env.test"),
        (
            Some("env.test"),
            &["--trust-domain", "flag.test"][..],
            "flag.test",
        ),
    ] {
        // Each run gets a fresh data dir: the CA is made for one trust domain.
        let _ = std::fs::remove_dir_all(dir.path().join(".mayfly"));
        let server = start(env, flags);
        assert_eq!(
            trust_domain_of(&server),
            want,
            "env {env:?}, flags {flags:?}"
        );
        server.stop();
    }

    // An unknown key is refused naming the key, its line and the file; nothing starts.
    let typo = dir.path().join("typo.toml");
    std::fs::write(&typo, "bind = \"127.0.0.1:0\"\ntrust_domian = \"x.test\"\n").unwrap();
    let out = Command::new(BIN)
        .args(["server", "run", "--config"])
        .arg(&typo)
        .current_dir(dir.path())
        .output()
        .unwrap();
    refused(out, "trust_domian");
    // A malformed duration names its flag and key, and says what is wrong once.
    let out = Command::new(BIN)
        .args([
            "server",
            "run",
            "--config",
            &config,
            "--ca-ttl",
            "5 minutes",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(
        stderr(&out).matches("is not a duration").count(),
        1,
        "{}",
        stderr(&out)
    );
    refused(
        out,
        "--ca-ttl (ca_ttl in a config file): '5 minutes' is not a duration",
    );
}

#[test]
fn durations_text_tables_and_completions() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--bind", "127.0.0.1:0"]);
    let token: serde_json::Value = serde_json::from_str(&ok(
        server.mayfly(&["token", "generate", "--ttl", "1h30m", "--output", "json"])
    ))
    .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let expires = token["expires_at"].as_i64().unwrap();
    assert!((expires - now - 5400).abs() < 60, "{token}");
    refused(
        server.mayfly(&["token", "generate", "--ttl", "1500ms"]),
        "whole number of seconds",
    );

    let text = ok(server.mayfly(&["token", "generate", "--ttl", "5m"]));
    let expires = text.lines().find(|l| l.starts_with("Expires:")).unwrap();
    assert!(
        expires.contains("Z, in 4m5") || expires.contains("Z, in 5m"),
        "{text}"
    );

    let agent = token["agent_id"].as_str().unwrap();
    ok(server.mayfly(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://mayfly.local/agents/billing-bot",
        "--parent-id",
        agent,
        "--selector",
        "unix:uid:1001",
        "--scope",
        "stripe:read:customers",
        "--ttl",
        "1h",
    ]));
    let list = ok(server.mayfly(&["entry", "list"]));
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(lines.len(), 2, "{list}");
    assert!(lines[0].starts_with("ID "), "{list}");
    // The columns line up: each header starts where its value does.
    let scopes_at = lines[0].find("SCOPES").unwrap();
    assert_eq!(
        &lines[1][scopes_at..scopes_at + 21],
        "stripe:read:customers"
    );
    assert!(lines[1].contains("  1h  "), "{list}");
    assert!(
        lines[1].contains("Z, now") || lines[1].contains("s ago"),
        "{list}"
    );

    let audit = ok(server.mayfly(&["audit", "list"]));
    assert!(audit.lines().next().unwrap().starts_with("SEQ"), "{audit}");
    assert!(audit.contains("entry.create"), "{audit}");
    // Times are RFC 3339 in text, Unix milliseconds only in JSON.
    let json = ok(server.mayfly(&["audit", "list", "--output", "json"]));
    let first: serde_json::Value = serde_json::from_str(json.lines().next().unwrap()).unwrap();
    let ms = first["time_ms"].as_i64().unwrap();
    assert!(!audit.contains(&ms.to_string()), "{audit}");
    assert!(audit.contains("Z, "), "{audit}");

    for shell in ["bash", "zsh", "fish"] {
        let script = ok(server.mayfly(&["completions", shell]));
        assert!(script.contains("mayfly"), "{shell}");
        assert!(script.contains("entry"), "{shell}");
    }
    let out = server.mayfly(&["completions", "tcsh"]);
    assert!(!out.status.success() && stderr(&out).contains("tcsh"));
    server.stop();
}

#[test]
fn a_server_that_cannot_listen_says_why_once() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = Command::new(BIN)
        .args(["server", "run", "--bind", &addr])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("run mayfly server run");
    assert!(!out.status.success());
    let err = stderr(&out);
    let first = err.lines().find(|l| l.starts_with("error:")).unwrap_or("");
    assert!(
        first.contains(&format!("could not listen on {addr}")),
        "{err}"
    );
    // The OS's reason comes from the error's source chain, once, not again in the message.
    assert_eq!(first.matches("in use").count(), 1, "{err}");

    // Positive control on the same address once it is free: the server starts and serves.
    drop(taken);
    let server = Server::start(dir.path(), &["--bind", &addr]);
    ok(server.mayfly(&["entry", "list"]));
}
