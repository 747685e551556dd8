//! CA rotation end to end (issue 10), on real processes: the journal survives restarts and
//! `kill -9` between steps, the operator's steps are refused out of order and audited in
//! order, and the 6x TTL rule holds at start and at `entry create`.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::{BIN, Cluster};
use serde_json::Value;

/// `ca list --output json`.
fn cas(cluster: &Cluster) -> Vec<Value> {
    let out = cluster.ok(&["ca", "list", "--output", "json"]);
    serde_json::from_str::<Value>(&out)
        .expect("ca list json")
        .as_array()
        .expect("an array")
        .clone()
}

/// The IDs of the CAs in `state`.
fn ids_in(cluster: &Cluster, state: &str) -> Vec<String> {
    cas(cluster)
        .iter()
        .filter(|c| c["state"] == state && c["revoked"] == false)
        .map(|c| c["id"].as_str().expect("id").to_owned())
        .collect()
}

/// `(id, state)` of every CA, sorted by ID.
fn journal(cluster: &Cluster) -> Vec<(String, String)> {
    let mut all: Vec<_> = cas(cluster)
        .iter()
        .map(|c| {
            (
                c["id"].as_str().expect("id").to_owned(),
                c["state"].as_str().expect("state").to_owned(),
            )
        })
        .collect();
    all.sort();
    all
}

/// The SPIFFE bundle document `bundle show --format spiffe` prints.
fn spiffe_bundle(cluster: &Cluster) -> Value {
    serde_json::from_str(&cluster.ok(&["bundle", "show", "--format", "spiffe"]))
        .expect("bundle json")
}

/// The certificates of the PEM bundle, as PEM blocks.
fn bundle_certs(cluster: &Cluster) -> usize {
    cluster
        .ok(&["bundle", "show"])
        .matches("BEGIN CERTIFICATE")
        .count()
}

/// Runs `mayfly` expecting a refusal; returns its stderr.
fn refused(cluster: &Cluster, args: &[&str]) -> String {
    let out = cluster.mayfly(args);
    assert!(!out.status.success(), "mayfly {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Waits (generously: the machine is shared) until `done` holds.
fn wait_for(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// `kill -9` of the server, then a start on the same data dir.
fn kill_and_restart(cluster: &mut Cluster) {
    if let Some(mut server) = cluster.server.take() {
        server.kill();
    }
    cluster.start_server();
}

#[test]
fn a_restart_keeps_the_same_ca_and_kill_9_between_steps_resumes_the_rotation() {
    let mut cluster = Cluster::start_with(&["--ca-ttl", "1h", "--agent-ttl", "5m"]);
    let first = ids_in(&cluster, "active");
    assert_eq!(first.len(), 1, "{:?}", cas(&cluster));
    let bundle_before = cluster.ok(&["bundle", "show"]);

    // A clean restart: the same CA, the same bundle.
    cluster.stop_server();
    cluster.start_server();
    assert_eq!(ids_in(&cluster, "active"), first);
    assert_eq!(cluster.ok(&["bundle", "show"]), bundle_before);

    // kill -9 right after prepare: the same active and prepared CAs.
    cluster.ok(&["ca", "prepare"]);
    let prepared = journal(&cluster);
    assert_eq!(prepared.len(), 2);
    kill_and_restart(&mut cluster);
    assert_eq!(journal(&cluster), prepared);
    assert_eq!(bundle_certs(&cluster), 2);

    // kill -9 right after activate: the prepared CA signs, the first is old.
    let next = ids_in(&cluster, "prepared");
    cluster.ok(&["ca", "activate"]);
    let activated = journal(&cluster);
    kill_and_restart(&mut cluster);
    assert_eq!(journal(&cluster), activated);
    assert_eq!(ids_in(&cluster, "active"), next);
    assert_eq!(ids_in(&cluster, "old"), first);
    // And the rotation goes on from there.
    cluster.ok(&["ca", "prepare"]);
    assert_eq!(ids_in(&cluster, "prepared").len(), 1);
    assert_eq!(bundle_certs(&cluster), 3);
}

#[test]
fn the_schedule_rotates_on_its_own_and_survives_kill_9() {
    let mut cluster = Cluster::start_with(common::cluster::FAST_ROTATION);
    let first = ids_in(&cluster, "active");
    // Prepared at 1/2 of the life left (18 s of 36 s) and published at once.
    wait_for(Duration::from_secs(60), "a prepared CA", || {
        ids_in(&cluster, "prepared").len() == 1
    });
    assert_eq!(bundle_certs(&cluster), 2);
    let next = ids_in(&cluster, "prepared");
    kill_and_restart(&mut cluster);
    // Activated at 1/6 left, even though the server was killed in between.
    wait_for(
        Duration::from_secs(60),
        "the prepared CA to activate",
        || ids_in(&cluster, "active") == next,
    );
    let old = ids_in(&cluster, "old");
    assert_eq!(old, first);
    // The old CA leaves the bundle once nothing it signed can be valid.
    wait_for(Duration::from_secs(60), "the old CA to be dropped", || {
        !journal(&cluster).iter().any(|(id, _)| *id == first[0])
    });
    let log = std::fs::read_to_string(cluster.path("server.log")).unwrap_or_default();
    assert!(!log.contains("ERROR"), "{log}");
}

#[test]
fn operator_steps_out_of_order_are_refused_and_every_step_is_audited_in_order() {
    let cluster = Cluster::start_with(&["--ca-ttl", "1h", "--agent-ttl", "5m"]);
    let first = ids_in(&cluster, "active").remove(0);
    let seq0 = spiffe_bundle(&cluster)["spiffe_sequence"].as_u64().unwrap();

    let err = refused(&cluster, &["ca", "activate"]);
    assert!(err.contains("no CA is prepared"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one sentence: {err}");
    let err = refused(&cluster, &["ca", "taint", &first]);
    assert!(err.contains("is active and signing"), "{err}");
    let err = refused(&cluster, &["ca", "revoke", &first]);
    assert!(err.contains("is active and signing"), "{err}");
    let err = refused(&cluster, &["ca", "taint", "not-an-id"]);
    assert!(err.contains("is not a CA ID"), "{err}");

    cluster.ok(&["ca", "prepare"]);
    let seq1 = spiffe_bundle(&cluster)["spiffe_sequence"].as_u64().unwrap();
    assert!(seq1 > seq0, "publishing the next CA bumps the sequence");
    let err = refused(&cluster, &["ca", "prepare"]);
    assert!(err.contains("is already prepared"), "{err}");
    cluster.ok(&["ca", "activate"]);
    let err = refused(&cluster, &["ca", "revoke", &first]);
    assert!(err.contains("is not tainted"), "{err}");
    cluster.ok(&["ca", "taint", &first]);
    let err = refused(&cluster, &["ca", "taint", &first]);
    assert!(err.contains("already tainted"), "{err}");
    // Still in the bundle while only tainted (verifiers keep accepting it).
    assert_eq!(bundle_certs(&cluster), 2);
    let revoked: Value =
        serde_json::from_str(&cluster.ok(&["ca", "revoke", &first, "--output", "json"])).unwrap();
    assert_eq!(revoked["revoked"], true);
    assert_eq!(bundle_certs(&cluster), 1, "a revoked CA leaves the bundle");
    let seq2 = spiffe_bundle(&cluster)["spiffe_sequence"].as_u64().unwrap();
    assert!(seq2 > seq1, "revoking bumps the sequence");
    assert!(
        spiffe_bundle(&cluster)["spiffe_refresh_hint"]
            .as_u64()
            .unwrap()
            <= 300
    );

    // The audit log holds every step, refused or not, in order.
    let out = cluster.ok(&["audit", "list", "--output", "json"]);
    let steps: Vec<(String, String)> = out
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["action"].as_str().unwrap_or_default().starts_with("ca."))
        .map(|r| {
            (
                r["action"].as_str().unwrap().to_owned(),
                r["decision"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected = [
        ("ca.activate", "deny"),
        ("ca.taint", "deny"),
        ("ca.revoke", "deny"),
        ("ca.prepare", "allow"),
        ("ca.prepare", "deny"),
        ("ca.activate", "allow"),
        ("ca.revoke", "deny"),
        ("ca.taint", "allow"),
        ("ca.taint", "deny"),
        ("ca.revoke", "allow"),
    ];
    let expected: Vec<(String, String)> = expected
        .iter()
        .map(|(a, d)| (a.to_string(), d.to_string()))
        .collect();
    assert_eq!(steps, expected);
    let verify = cluster.ok(&["audit", "verify"]);
    assert!(verify.contains("intact"), "{verify}");
}

#[test]
fn the_6x_rule_is_enforced_at_start_and_at_entry_create() {
    // At start: a CA TTL under 6x the agent TTL is refused in one sentence.
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["server", "run", "--bind", "127.0.0.1:0", "--ca-ttl", "60s"])
        .current_dir(dir.path())
        .output()
        .expect("run the server");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("must be at least 6 times the agent SVID TTL"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one sentence: {err}");

    // An entry TTL floor above the ceiling (60 s / 6 = 10 s) is refused in one sentence.
    let out = Command::new(BIN)
        .args(["server", "run", "--bind", "127.0.0.1:0", "--ca-ttl", "60s"])
        .args(["--agent-ttl", "10s", "--min-entry-ttl", "11s"])
        .current_dir(dir.path())
        .output()
        .expect("run the server");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no entry could be registered"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one sentence: {err}");

    // Positive control: the same CA TTL with an agent TTL of a sixth of it starts.
    let mut cluster = Cluster::start_with(&[
        "--ca-ttl",
        "60s",
        "--agent-ttl",
        "10s",
        "--min-entry-ttl",
        "2s",
    ]);
    cluster.start_agent();
    // At entry create: the ceiling is min(1h, ca_ttl / 6) = 10 s.
    let out = cluster.mayfly(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://mayfly.local/bot",
        "--parent-id",
        &cluster.agent_id,
        "--selector",
        "unix:uid:1001",
        "--ttl",
        "11s",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("above the ceiling of 10s"), "{err}");
    // Positive control: at the ceiling.
    cluster.create_entry(
        "spiffe://mayfly.local/bot",
        &["--selector", "unix:uid:1001", "--ttl", "10s"],
    );
}

// ---------------------------------------------------------------------------------------------
// Rotation under traffic.

const CLIENT_ID: &str = "spiffe://mayfly.local/agents/rotation-client";
const PROXY_ID: &str = "spiffe://mayfly.local/services/proxy";

/// hex SHA-256 of DER: a CA's ID.
fn ca_id(der: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der))
}

/// The IDs of the CAs in the bundle `bundle show` prints now.
fn bundle_ids(cluster: &Cluster) -> Vec<String> {
    let pem = cluster.ok(&["bundle", "show"]);
    mayfly::bundle::from_pem(pem.as_bytes())
        .expect("a PEM bundle")
        .iter()
        .map(|der| ca_id(der))
        .collect()
}

/// A TCP upstream that answers each line with `echo: <line>`, until the client closes.
async fn line_echo_upstream() -> std::net::SocketAddr {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let addr = listener.local_addr().expect("upstream addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (read, mut write) = tcp.into_split();
                let mut lines = tokio::io::BufReader::new(read).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let answer = format!("echo: {line}\n");
                    if write.write_all(answer.as_bytes()).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// Registers the proxy's and the client's entries (SVID TTL `ttl`), starts a line echo
/// upstream and `mayfly proxy` in TCP mode admitting the client; returns the proxy process and
/// its port once it runs. Its log is `<cluster>/proxy.log`.
async fn start_proxy(cluster: &Cluster, ttl: &str) -> (common::cluster::Proc, u16) {
    let dns = ["--dns", "localhost"];
    let scope = ["--scope", "echo:use:lines"];
    for (id, extra) in [(PROXY_ID, dns), (CLIENT_ID, scope)] {
        let mut args = vec!["--selector", "unix:uid:0", "--ttl", ttl];
        args.extend_from_slice(&extra);
        cluster.create_entry(id, &args);
    }
    let upstream = line_echo_upstream().await;
    let port = common::cluster::free_port();
    let proxy_log = cluster.path("proxy.log");
    let proxy = common::cluster::Proc(
        Command::new(BIN)
            .args([
                "proxy",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--upstream",
            ])
            .arg(upstream.to_string())
            .args(["--socket", &cluster.endpoint(), "--spiffe-id", PROXY_ID])
            .args(["--allow-id", CLIENT_ID])
            .current_dir(cluster.dir.path())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&proxy_log).expect("proxy log"))
            .spawn()
            .expect("spawn mayfly proxy"),
    );
    wait_for(Duration::from_secs(40), "the proxy to run", || {
        std::fs::read_to_string(&proxy_log)
            .unwrap_or_default()
            .contains("mayfly proxy running")
    });
    (proxy, port)
}

/// One mTLS connection through the proxy with the client's live SVID: a line up, its echo
/// back.
async fn one_request(
    connector: &tokio_rustls::TlsConnector,
    addr: std::net::SocketAddr,
    n: usize,
) -> Result<(), String> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("a name");
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tls.write_all(format!("request {n}\n").as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut line = String::new();
    tokio::io::BufReader::new(tls)
        .read_line(&mut line)
        .await
        .map_err(|e| format!("read: {e}"))?;
    if line == format!("echo: request {n}\n") {
        Ok(())
    } else {
        Err(format!("unexpected answer {line:?}"))
    }
}

/// `mayfly svid mint` of a 10 s task SVID into `dir`; then `openssl verify` of it against the
/// bundle that came with it. `Err` says which failed.
fn mint_and_verify(cluster: &Cluster, n: usize) -> Result<(), String> {
    let dir = cluster.path(&format!("mint-{n}"));
    let dir_text = dir.display().to_string();
    let task = format!("task-{n}");
    let out = cluster.mayfly(&[
        "svid",
        "mint",
        "--task",
        &task,
        "--spiffe-id",
        CLIENT_ID,
        "--scope",
        "echo:use:lines",
        "--ttl",
        "10s",
        "--write",
        &dir_text,
    ]);
    if !out.status.success() {
        return Err(format!(
            "mint {n} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let verify = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(dir.join("bundle.pem"))
        .arg(dir.join("svid.pem"))
        .output()
        .map_err(|e| format!("run openssl: {e}"))?;
    if verify.status.success() {
        Ok(())
    } else {
        Err(format!(
            "openssl verify of mint {n}: {}{}",
            String::from_utf8_lossy(&verify.stdout),
            String::from_utf8_lossy(&verify.stderr)
        ))
    }
}

/// The scenario: CA TTL 90 s, agent SVIDs 15 s (the 6x rule allows no more), task
/// SVIDs 10 s, for 2.5 CA lifetimes: every task mint succeeds and verifies with openssl
/// against the bundle fetched with it, one mTLS request a second through `mayfly proxy` never
/// fails, and at every handover the bundle holds both the old and the new CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotations_under_traffic_fail_no_mint_and_no_request() {
    const RUN: Duration = Duration::from_secs(230);
    let mut cluster = Cluster::start_with(&[
        "--ca-ttl",
        "90s",
        "--agent-ttl",
        "15s",
        "--min-entry-ttl",
        "2s",
    ]);
    cluster.start_agent();
    let (_proxy, port) = start_proxy(&cluster, "10s").await;
    let listen = format!("127.0.0.1:{port}");
    let proxy_log = cluster.path("proxy.log");
    let read_proxy_log = || std::fs::read_to_string(&proxy_log).unwrap_or_default();

    let source = mayfly::mtls::SvidSource::spawn_for(
        cluster.socket(),
        Some(mayfly::id::SpiffeId::parse(CLIENT_ID).expect("an ID")),
    );
    source
        .wait_ready(Duration::from_secs(30))
        .await
        .expect("the client's SVID");
    let policy = mayfly::mtls::PeerPolicy::parse_ids(&[PROXY_ID]).expect("a policy");
    let config = mayfly::mtls::client_config(&source, policy).expect("client config");
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let addr: std::net::SocketAddr = listen.parse().expect("an address");

    // The client: one request a second, all along.
    let start = Instant::now();
    let client = tokio::spawn(async move {
        let mut failures = Vec::new();
        let mut n = 0;
        while start.elapsed() < RUN {
            n += 1;
            let at = start.elapsed();
            match tokio::time::timeout(Duration::from_secs(10), one_request(&connector, addr, n))
                .await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failures.push(format!("at {at:?}: {e}")),
                Err(_) => failures.push(format!("at {at:?}: timed out")),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        (n, failures)
    });

    // Meanwhile: a task mint every few seconds, and the journal and bundle watched.
    let cluster = std::sync::Arc::new(cluster);
    let watcher = {
        let cluster = cluster.clone();
        tokio::task::spawn_blocking(move || {
            let mut mint_failures = Vec::new();
            let mut mints = 0;
            let mut handovers = Vec::new();
            let mut active = ids_in(&cluster, "active");
            while start.elapsed() < RUN {
                mints += 1;
                if let Err(e) = mint_and_verify(&cluster, mints) {
                    mint_failures.push(format!("at {:?}: {e}", start.elapsed()));
                }
                let now_active = ids_in(&cluster, "active");
                if now_active != active {
                    let bundle = bundle_ids(&cluster);
                    handovers.push((active.clone(), now_active.clone(), bundle));
                    active = now_active;
                }
                std::thread::sleep(Duration::from_secs(2));
            }
            (mints, mint_failures, handovers)
        })
    };
    let (requests, failures) = client.await.expect("the client");
    let (mints, mint_failures, handovers) = watcher.await.expect("the watcher");
    println!(
        "{requests} requests, {mints} mints, {} handovers in {:?}",
        handovers.len(),
        start.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} of {requests} requests failed: {failures:#?}\nproxy log:\n{}",
        failures.len(),
        read_proxy_log()
    );
    assert!(
        mint_failures.is_empty(),
        "{} of {mints} mints failed: {mint_failures:#?}",
        mint_failures.len()
    );
    // 230 s from a CA born at the start: activations near 75 s, 150 s and 225 s.
    assert!(handovers.len() >= 2, "only {} handovers", handovers.len());
    for (old, new, bundle) in &handovers {
        for id in old.iter().chain(new) {
            assert!(
                bundle.contains(id),
                "the bundle at a handover lacks CA {id}: {bundle:?}"
            );
        }
    }
    assert!(requests >= 150, "only {requests} requests");
}

// ---------------------------------------------------------------------------------------------
// Taint and revoke.

/// `svid fetch` (identity) or `svid mint` (task) into `<cluster>/<name>`, retried for up to
/// 15 s while the agent has not synced the entry yet; returns the directory and the serial.
fn write_svid(cluster: &Cluster, name: &str, args: &[&str]) -> (std::path::PathBuf, String) {
    let dir = cluster.path(name);
    let dir_text = dir.display().to_string();
    let mut all = args.to_vec();
    all.extend_from_slice(&["--write", &dir_text, "--output", "json"]);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = cluster.mayfly(&all);
        if out.status.success() {
            let v: Value = serde_json::from_slice(&out.stdout).expect("svid json");
            return (dir, v["serial"].as_str().expect("serial").to_owned());
        }
        assert!(
            Instant::now() < deadline,
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Whether `openssl verify` accepts the SVID in `dir` against the one CA `ca_pem`.
fn signed_by(dir: &std::path::Path, ca_pem: &std::path::Path) -> bool {
    Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(ca_pem)
        .arg(dir.join("svid.pem"))
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The PEM file of CA `id` in the server's data dir.
fn ca_pem(cluster: &Cluster, id: &str) -> std::path::PathBuf {
    cluster.path(&format!(".mayfly/server/ca/{id}.pem"))
}

/// `openssl s_client` through the proxy with the SVID in `dir`, verifying the proxy against
/// `bundle`; whether the line came back echoed.
fn echoed_through(port: u16, dir: &std::path::Path, bundle: &std::path::Path) -> bool {
    use std::io::Write as _;
    let mut child = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(["-servername", "localhost", "-verify_return_error", "-quiet"])
        .arg("-CAfile")
        .arg(bundle)
        .arg("-cert")
        .arg(dir.join("svid.pem"))
        .arg("-key")
        .arg(dir.join("svid.key"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run openssl s_client");
    let mut stdin = child.stdin.take().expect("stdin");
    let _ = stdin.write_all(b"hello\n");
    // -quiet ignores the end of its input, and the echo upstream keeps the connection while
    // the client does: give the answer a few seconds, then end this s_client.
    std::thread::sleep(Duration::from_secs(3));
    let _ = child.kill();
    drop(stdin);
    let out = child.wait_with_output().expect("s_client output");
    String::from_utf8_lossy(&out.stdout).contains("echo: hello")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn taint_reissues_within_a_sync_round_and_revoke_is_refused_by_the_proxy() {
    let mut cluster = Cluster::start_with(&["--ca-ttl", "1h", "--agent-ttl", "5m"]);
    cluster.start_agent();
    let (_proxy, port) = start_proxy(&cluster, "5m").await;

    let old_ca = ids_in(&cluster, "active").remove(0);
    let (identity, identity_serial) = write_svid(&cluster, "identity", &["svid", "fetch"]);
    assert!(signed_by(&identity, &ca_pem(&cluster, &old_ca)));
    let task_args = [
        "svid",
        "mint",
        "--task",
        "before-revoke",
        "--spiffe-id",
        CLIENT_ID,
        "--scope",
        "echo:use:lines",
    ];
    let (old_task, _) = write_svid(&cluster, "old-task", &task_args);
    // Positive control: an SVID of the CA about to be revoked gets through the proxy.
    std::fs::write(
        cluster.path("bundle-now.pem"),
        cluster.ok(&["bundle", "show"]),
    )
    .unwrap();
    assert!(echoed_through(
        port,
        &old_task,
        &cluster.path("bundle-now.pem")
    ));

    cluster.ok(&["ca", "prepare"]);
    cluster.ok(&["ca", "activate"]);
    let new_ca = ids_in(&cluster, "active").remove(0);
    // The proxy verified against both CAs, since its own SVID changes CA on the taint.
    std::fs::write(
        cluster.path("bundle-now.pem"),
        cluster.ok(&["bundle", "show"]),
    )
    .unwrap();
    // Nothing is re-issued for a rotation alone: the identity SVID is the same.
    std::thread::sleep(Duration::from_secs(5));
    let (_, serial) = write_svid(&cluster, "identity-after-rotation", &["svid", "fetch"]);
    assert_eq!(serial, identity_serial, "no re-issue without a taint");

    // Taint: within one sync round (2 s) plus issuance, the identity SVIDs and the agent's
    // own SVID come from the new CA.
    let tainted_at = Instant::now();
    cluster.ok(&["ca", "taint", &old_ca]);
    let mut replaced = None;
    wait_for(
        Duration::from_secs(15),
        "the identity SVID re-issued",
        || {
            let (dir, serial) = write_svid(&cluster, "identity-after-taint", &["svid", "fetch"]);
            let done = serial != identity_serial && signed_by(&dir, &ca_pem(&cluster, &new_ca));
            if done {
                replaced = Some(tainted_at.elapsed());
            }
            done
        },
    );
    println!(
        "identity SVID replaced {:?} after the taint",
        replaced.unwrap()
    );
    wait_for(Duration::from_secs(15), "the agent SVID renewed", || {
        cluster.agent_log().contains("renewed the agent SVID")
    });
    // Tainted, not revoked: the old task SVID still gets through.
    assert!(echoed_through(
        port,
        &old_task,
        &cluster.path("bundle-now.pem")
    ));

    // Revoke: the old CA leaves the bundle; at the proxy's next bundle update the old SVID is
    // refused, while a fresh one gets through (positive control on the same proxy).
    cluster.ok(&["ca", "revoke", &old_ca]);
    std::fs::write(
        cluster.path("bundle-now.pem"),
        cluster.ok(&["bundle", "show"]),
    )
    .unwrap();
    wait_for(
        Duration::from_secs(20),
        "the proxy to refuse the revoked CA",
        || !echoed_through(port, &old_task, &cluster.path("bundle-now.pem")),
    );
    let fresh_args = [
        "svid",
        "mint",
        "--task",
        "after-revoke",
        "--spiffe-id",
        CLIENT_ID,
        "--scope",
        "echo:use:lines",
    ];
    let (fresh, _) = write_svid(&cluster, "fresh-task", &fresh_args);
    assert!(echoed_through(
        port,
        &fresh,
        &cluster.path("bundle-now.pem")
    ));
}

// ---------------------------------------------------------------------------------------------
// Several servers, one PostgreSQL.

/// Each server rotates its own CA; the other's stays as it was, and every server serves the
/// union with the same sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_on_one_postgres_each_rotate_their_own_ca_and_share_the_bundle() {
    let Some(ha) =
        common::ha::HaCluster::start_with(2, &["--ca-ttl", "1h", "--agent-ttl", "5m"]).await
    else {
        return;
    };
    let list = |i: usize| -> Vec<Value> {
        serde_json::from_str::<Value>(&ha.ok(i, &["ca", "list", "--output", "json"]))
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    };
    let own_active = |i: usize| -> String {
        list(i)
            .iter()
            .find(|c| c["this_server"] == true && c["state"] == "active")
            .map(|c| c["id"].as_str().unwrap().to_owned())
            .expect("an own active CA")
    };
    assert_eq!(list(0).len(), 2, "{:?}", list(0));
    let (a, b) = (own_active(0), own_active(1));
    assert_ne!(a, b, "each server has a CA of its own");

    ha.ok(0, &["ca", "prepare"]);
    ha.ok(0, &["ca", "activate"]);
    assert_ne!(own_active(0), a, "server 0 rotated");
    assert_eq!(own_active(1), b, "server 1's CA is untouched");
    // Server 1 serves server 0's new CA after its next re-read of the store (every 5 s).
    wait_for(Duration::from_secs(30), "server 1 to serve 3 CAs", || {
        ha.bundle_size(1) == 3
    });
    let sequence = |i: usize| -> u64 {
        serde_json::from_str::<Value>(&ha.ok(i, &["bundle", "show", "--format", "spiffe"])).unwrap()
            ["spiffe_sequence"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(sequence(0), sequence(1));
    // Server 1 refuses to activate: it has nothing prepared of its own.
    let out = ha.mayfly(1, &["ca", "activate"]);
    assert!(!out.status.success());
}

/// The IDs of the CAs in the bundle the agent serves its workloads (`svid fetch --write`).
fn served_bundle_ids(cluster: &Cluster) -> Vec<String> {
    let dir = cluster.path("served");
    let out = cluster.mayfly(&["svid", "fetch", "--write", &dir.display().to_string()]);
    if !out.status.success() {
        return Vec::new();
    }
    mayfly::bundle::from_pem(&std::fs::read(dir.join("bundle.pem")).unwrap_or_default())
        .unwrap_or_default()
        .iter()
        .map(|der| ca_id(der))
        .collect()
}

/// A prepared CA reaches the workloads' bundle even when the agent renews its own SVID (whose
/// answer carries the server's newest bundle too) before its sync sees the change. With a 6 s
/// agent SVID the agent renews every ~3 s, so over five prepare/activate rounds a renewal comes
/// first in some of them; each prepared CA must still be served within 15 s.
#[test]
fn every_prepared_ca_reaches_the_workloads_even_when_a_renewal_brings_it_first() {
    let mut cluster = Cluster::start_with(&["--ca-ttl", "1h", "--agent-ttl", "6s"]);
    cluster.start_agent();
    cluster.create_entry(
        "spiffe://mayfly.local/rotation/served",
        &["--selector", "unix:uid:0"],
    );
    let first = ids_in(&cluster, "active");
    wait_for(Duration::from_secs(30), "the first SVID", || {
        served_bundle_ids(&cluster) == first
    });
    for round in 0..5 {
        cluster.ok(&["ca", "prepare"]);
        let prepared = ids_in(&cluster, "prepared");
        assert_eq!(prepared.len(), 1);
        wait_for(
            Duration::from_secs(15),
            &format!("round {round}: the prepared CA in the workloads' bundle"),
            || served_bundle_ids(&cluster).contains(&prepared[0]),
        );
        cluster.ok(&["ca", "activate"]);
    }
}

/// A prepared CA that was tainted never signs: `ca activate` refuses it in one sentence and
/// nothing changes; once it is revoked, a fresh CA is prepared and activated (the positive
/// control on the same server).
#[test]
fn a_tainted_prepared_ca_is_never_activated() {
    let cluster = Cluster::start_with(&["--ca-ttl", "1h", "--agent-ttl", "5m"]);
    let first = ids_in(&cluster, "active");
    cluster.ok(&["ca", "prepare"]);
    let tainted = ids_in(&cluster, "prepared");
    cluster.ok(&["ca", "taint", &tainted[0]]);
    let before = journal(&cluster);
    let err = refused(&cluster, &["ca", "activate"]);
    assert!(err.contains("is tainted"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one sentence: {err}");
    assert_eq!(journal(&cluster), before, "the refusal changed nothing");
    assert_eq!(ids_in(&cluster, "active"), first);

    cluster.ok(&["ca", "revoke", &tainted[0]]);
    cluster.ok(&["ca", "prepare"]);
    let next = ids_in(&cluster, "prepared");
    assert_ne!(next, tainted);
    cluster.ok(&["ca", "activate"]);
    assert_eq!(ids_in(&cluster, "active"), next);
}
