//! The agent end to end, as real processes: `mayfly server run`, `mayfly agent run`, and
//! workloads on the agent's Unix socket — the `spiffe` crate's `X509Source` (an independent
//! SPIFFE client), `mayfly svid fetch|mint` processes (some under another uid), and our own
//! gRPC client where a test needs the exact status of a stream.

mod common;

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::cluster::{BIN, Cluster};
use mayfly::proto::workload::X509svidRequest;
use mayfly::workload_client;
use spiffe::X509Source;
use tonic::Code;
use x509_parser::prelude::{FromDer, X509Certificate};

const NOBODY: u32 = 65534;

/// An `X509Source` on the cluster's agent, reconnecting quickly, once the agent serves this
/// process an SVID (a new entry takes up to one sync interval to arrive).
async fn source(cluster: &Cluster) -> X509Source {
    let deadline = Instant::now() + Duration::from_secs(5);
    while fetch_status(cluster).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the agent never served this workload"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    X509Source::builder()
        .endpoint(cluster.endpoint())
        .reconnect_backoff(Duration::from_millis(100), Duration::from_secs(1))
        .build()
        .await
        .expect("X509Source")
}

/// Serial (hex) and notAfter of a DER leaf.
fn leaf_facts(der: &[u8]) -> (String, SystemTime, SystemTime) {
    let (_, cert) = X509Certificate::from_der(der).expect("leaf parses");
    let t = |s: i64| UNIX_EPOCH + Duration::from_secs(u64::try_from(s).unwrap());
    (
        hex::encode(cert.raw_serial()),
        t(cert.validity().not_before.timestamp()),
        t(cert.validity().not_after.timestamp()),
    )
}

/// The first message (or the status) of a FetchX509SVID stream from this process.
async fn fetch_status(cluster: &Cluster) -> Result<Vec<String>, Code> {
    let channel = workload_client::connect(&cluster.socket())
        .await
        .map_err(|_| Code::Unavailable)?;
    let mut stream = workload_client::workload_api(channel)
        .fetch_x509svid(X509svidRequest {})
        .await
        .map_err(|s| s.code())?
        .into_inner();
    match stream.message().await {
        Ok(Some(m)) => Ok(m.svids.into_iter().map(|s| s.spiffe_id).collect()),
        Ok(None) => Err(Code::Ok),
        Err(s) => Err(s.code()),
    }
}

/// `mayfly svid fetch` run as `uid`.
fn fetch_as(cluster: &Cluster, uid: u32) -> std::process::Output {
    Command::new(BIN)
        .args(["svid", "fetch", "--socket"])
        .arg(cluster.endpoint())
        .uid(uid)
        .gid(uid)
        .current_dir("/")
        .output()
        .expect("run mayfly svid fetch")
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spiffe_crate_gets_its_svid_sees_rotations_before_expiry_and_loses_it_with_its_entry() {
    // 10 s SVIDs, below the entry TTL floor, so that rotations come within the test's time.
    let mut cluster = Cluster::start_with(&["--min-entry-ttl", "10s"]);
    cluster.start_agent();
    let id = "spiffe://mayfly.local/agents/rotating";
    let entry = cluster.create_entry(id, &["--selector", "unix:uid:0", "--ttl", "10s"]);

    let source = source(&cluster).await;
    let first = source.svid().expect("an SVID");
    assert_eq!(first.spiffe_id().to_string(), id);
    let (mut serial, _, mut not_after) = leaf_facts(first.leaf().as_bytes());

    // Over 10 s SVIDs rotate at about half-life: watch for three rotations, each arriving
    // while the previous SVID is still valid.
    let mut rotations = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while rotations < 3 {
        assert!(
            Instant::now() < deadline,
            "only {rotations} rotations in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let svid = source.svid().expect("an SVID");
        let (s, not_before, na) = leaf_facts(svid.leaf().as_bytes());
        if s != serial {
            let now = SystemTime::now();
            assert!(
                now < not_after,
                "rotation {rotations} arrived after the old SVID expired"
            );
            assert!(
                na > not_after && not_before <= now,
                "the new SVID is newer and valid"
            );
            assert_eq!(svid.spiffe_id().to_string(), id);
            rotations += 1;
            serial = s;
            not_after = na;
        }
    }

    // Positive control for the stream status, then delete the entry: the workload has no
    // identity left and the stream ends with PermissionDenied within 5 s.
    assert_eq!(fetch_status(&cluster).await, Ok(vec![id.to_owned()]));
    cluster.ok(&["entry", "delete", &entry]);
    let deleted = Instant::now();
    loop {
        match fetch_status(&cluster).await {
            Err(Code::PermissionDenied) => break,
            other => {
                assert!(
                    deleted.elapsed() < Duration::from_secs(5),
                    "still served: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    source.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_uid_gets_nothing_until_an_entry_names_it_and_then_within_five_seconds() {
    let mut cluster = Cluster::start();
    cluster.start_agent();
    let root_id = "spiffe://mayfly.local/agents/root-bot";
    cluster.create_entry(root_id, &["--selector", "unix:uid:0"]);

    // Positive control: the uid the entry names gets its SVID from a separate process.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = fetch_as(&cluster, 0);
        if out.status.success() {
            assert!(String::from_utf8_lossy(&out.stdout).contains(root_id));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "root got nothing: {}",
            stderr(&out)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Another uid on the same socket is refused with PermissionDenied's reason.
    let out = fetch_as(&cluster, NOBODY);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no registration entry") || stderr(&out).contains("selectors"),
        "{}",
        stderr(&out)
    );

    // Registering an entry for that uid reaches it within 5 s (the agent polls every 2 s).
    let nobody_id = "spiffe://mayfly.local/agents/nobody-bot";
    cluster.create_entry(nobody_id, &["--selector", &format!("unix:uid:{NOBODY}")]);
    let registered = Instant::now();
    loop {
        let out = fetch_as(&cluster, NOBODY);
        if out.status.success() {
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(stdout.contains(nobody_id), "{stdout}");
            assert!(
                !stdout.contains(root_id),
                "uid {NOBODY} must not get root's identity"
            );
            break;
        }
        assert!(
            registered.elapsed() < Duration::from_secs(5),
            "the new entry did not reach the workload in 5 s: {}",
            stderr(&out)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_svids_carry_exactly_the_asked_scopes_and_ttl_and_refusals_are_audited() {
    let mut cluster = Cluster::start();
    cluster.start_agent();
    let id = "spiffe://mayfly.local/agents/billing-bot";
    cluster.create_entry(
        id,
        &[
            "--selector",
            "unix:uid:0",
            "--scope",
            "stripe:read:customers",
            "--scope",
            "stripe:write:refunds",
            "--ttl",
            "5m",
        ],
    );
    let out_dir = cluster.path("task-svid");
    let mint = |task: &str, scopes: &[&str], ttl: Option<&str>, write: bool| {
        let mut args = vec!["svid", "mint", "--task", task, "--output", "json"];
        for s in scopes {
            args.extend_from_slice(&["--scope", s]);
        }
        if let Some(t) = ttl {
            args.extend_from_slice(&["--ttl", t]);
        }
        let dir = out_dir.display().to_string();
        if write {
            args.extend_from_slice(&["--write", &dir]);
        }
        cluster.mayfly(&args)
    };
    // The agent may still be syncing its first entry: wait for the positive case.
    let deadline = Instant::now() + Duration::from_secs(5);
    let ok = loop {
        let out = mint("task-read-1", &["stripe:read:customers"], Some("90s"), true);
        if out.status.success() {
            break out;
        }
        assert!(Instant::now() < deadline, "mint failed: {}", stderr(&out));
        std::thread::sleep(Duration::from_millis(100));
    };
    let v: serde_json::Value = serde_json::from_slice(&ok.stdout).expect("json");
    assert_eq!(v["spiffe_id"], format!("{id}/scope/stripe.read.customers"));
    let chain = std::fs::read(out_dir.join("svid.pem")).unwrap();
    let leaf = mayfly::bundle::from_pem(&chain).unwrap().remove(0);
    let (_, not_before, not_after) = leaf_facts(&leaf);
    // notBefore is backdated by the skew allowance; the lifetime asked for starts at issue.
    let life = not_after.duration_since(not_before).unwrap();
    assert!(
        life >= Duration::from_secs(90) && life <= Duration::from_secs(90 + 60),
        "{life:?}"
    );
    let key_mode = std::fs::metadata(out_dir.join("svid.key")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&key_mode.permissions()) & 0o777,
        0o600
    );
    let issued = cluster.audit_of_task("task-read-1");
    assert!(
        issued.iter().any(|r| r["decision"] == "allow"
            && r["scopes"].to_string().contains("stripe:read:customers")),
        "{issued:?}"
    );

    // Refusals, each with its reason on stderr and an audit record naming the task.
    let cases: [(&str, &[&str], Option<&str>, &str); 2] = [
        (
            "task-superset",
            &["stripe:read:customers", "stripe:write:everything"],
            None,
            "not granted",
        ),
        (
            "task-long",
            &["stripe:read:customers"],
            Some("10m"),
            "ceiling",
        ),
    ];
    for (task, scopes, ttl, needle) in cases {
        let out = mint(task, scopes, ttl, false);
        assert!(!out.status.success(), "{task} was not refused");
        assert!(stderr(&out).contains(needle), "{task}: {}", stderr(&out));
        assert!(!stderr(&out).contains("panicked"));
        let records = cluster.audit_of_task(task);
        assert!(
            records
                .iter()
                .any(|r| r["decision"] == "deny"
                    && r["reason"].as_str().unwrap_or("").contains(needle)),
            "{task}: {records:?}"
        );
    }
    // An empty task ID is refused as malformed, and audited.
    let before = cluster
        .ok(&["audit", "list", "--output", "json"])
        .lines()
        .count();
    let out = mint("", &["stripe:read:customers"], None, false);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("task ID"), "{}", stderr(&out));
    let after = cluster.ok(&["audit", "list", "--output", "json"]);
    assert_eq!(
        after.lines().count(),
        before + 1,
        "one audit record for the refusal"
    );
    assert!(after.lines().last().unwrap().contains("\"deny\""));
    cluster.ok(&["audit", "verify"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_banned_agent_gets_nothing_more_and_an_evicted_one_needs_a_new_token() {
    let mut cluster = Cluster::start();
    cluster.start_agent();
    let id = "spiffe://mayfly.local/agents/banned-bot";
    cluster.create_entry(id, &["--selector", "unix:uid:0", "--scope", "db:read"]);
    let mint =
        |c: &Cluster, task: &str| c.mayfly(&["svid", "mint", "--task", task, "--scope", "db:read"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !mint(&cluster, "before-ban").status.success() {
        assert!(
            Instant::now() < deadline,
            "the positive control never minted"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    cluster.ok(&["agent", "ban", &cluster.agent_id.clone()]);
    let out = mint(&cluster, "after-ban");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("banned"), "{}", stderr(&out));
    // Its next sync is refused too, and it says so.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cluster.agent_log().contains("banned") {
        assert!(
            Instant::now() < deadline,
            "the agent did not log its ban:\n{}",
            cluster.agent_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // A second cluster for eviction: the agent is refused, cannot re-attest with its spent
    // token, says what the operator must do, and comes back with a new token.
    let mut cluster = Cluster::start();
    cluster.start_agent();
    cluster.create_entry(id, &["--selector", "unix:uid:0", "--scope", "db:read"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !mint(&cluster, "before-evict").status.success() {
        assert!(
            Instant::now() < deadline,
            "the positive control never minted"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    cluster.ok(&["agent", "evict", &cluster.agent_id.clone()]);
    let out = mint(&cluster, "after-evict");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("unknown"), "{}", stderr(&out));
    let deadline = Instant::now() + Duration::from_secs(15);
    while !cluster.agent_log().contains("mayfly token generate") {
        assert!(
            Instant::now() < deadline,
            "no hint for the operator:\n{}",
            cluster.agent_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    if let Some(mut agent) = cluster.agent.take() {
        agent.stop();
    }
    let (token, agent_id) = cluster.new_token();
    cluster.agent_id = agent_id;
    cluster.start_agent_with_token(&token);
    cluster.create_entry(id, &["--selector", "unix:uid:0", "--scope", "db:read"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = mint(&cluster, "after-reattest");
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no mint after re-attesting: {}",
            stderr(&out)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_restarts_without_a_token_and_workloads_recover_within_five_seconds() {
    let mut cluster = Cluster::start();
    cluster.start_agent();
    let id = "spiffe://mayfly.local/agents/steady";
    cluster.create_entry(id, &["--selector", "unix:uid:0"]);
    let source = source(&cluster).await;
    let (before, _, _) = leaf_facts(source.svid().expect("an SVID").leaf().as_bytes());

    cluster.agent.take().expect("agent").kill();
    // Restart with a token that does not exist: the stored identity must be enough.
    let bogus = "0".repeat(64);
    cluster.start_agent_with_token(&bogus);
    let ready = Instant::now();
    loop {
        if let Some(svid) = source.try_svid() {
            let (serial, _, not_after) = leaf_facts(svid.leaf().as_bytes());
            if serial != before && not_after > SystemTime::now() {
                break;
            }
        }
        assert!(
            ready.elapsed() < Duration::from_secs(5),
            "no fresh SVID within 5 s of the restart:\n{}",
            cluster.agent_log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!cluster.agent_log().contains("token is unknown"));
    source.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_svids_outlive_a_server_outage_until_expiry_never_after_and_refresh_on_return() {
    // 10 s SVIDs, below the entry TTL floor, so that rotations come within the test's time.
    let mut cluster = Cluster::start_with(&["--min-entry-ttl", "10s"]);
    cluster.start_agent();
    let id = "spiffe://mayfly.local/agents/outage";
    cluster.create_entry(id, &["--selector", "unix:uid:0", "--ttl", "10s"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while fetch_status(&cluster).await.is_err() {
        assert!(Instant::now() < deadline, "no SVID before the outage");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    cluster.stop_server();
    let down = Instant::now();
    // While the server is down, the cached SVID is served as long as it is valid...
    let channel = workload_client::connect(&cluster.socket()).await.unwrap();
    let mut stream = workload_client::workload_api(channel)
        .fetch_x509svid(X509svidRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut last_not_after = UNIX_EPOCH;
    let mut served_during_outage = false;
    loop {
        match stream.message().await {
            Ok(Some(m)) => {
                let now = SystemTime::now();
                for svid in &m.svids {
                    let chain = workload_client::split_der(&svid.x509_svid);
                    let (_, _, not_after) = leaf_facts(&chain[0]);
                    assert!(not_after > now, "an expired SVID was served");
                    last_not_after = last_not_after.max(not_after);
                }
                served_during_outage = true;
            }
            // ...and once it expires the workload is told it has nothing.
            Err(status) => {
                assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
                assert!(
                    SystemTime::now() >= last_not_after,
                    "withdrawn before it expired"
                );
                break;
            }
            Ok(None) => panic!("the stream ended without a status"),
        }
        assert!(down.elapsed() < Duration::from_secs(30), "never withdrawn");
    }
    assert!(served_during_outage);
    assert!(
        down.elapsed() > Duration::from_secs(5),
        "the outage lasted over half the TTL"
    );

    cluster.start_server();
    let back = Instant::now();
    loop {
        if let Ok(ids) = fetch_status(&cluster).await {
            assert_eq!(ids, vec![id.to_owned()]);
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(30),
            "no fresh SVID 30 s after the server returned:\n{}",
            cluster.agent_log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_renews_its_own_svid_at_half_life_and_keeps_working() {
    let mut cluster = Cluster::start_with(&["--agent-ttl", "6s"]);
    cluster.start_agent();
    let id = "spiffe://mayfly.local/agents/long-runner";
    cluster.create_entry(id, &["--selector", "unix:uid:0", "--scope", "db:read"]);
    let serial = |c: &Cluster| -> String {
        let out = c.ok(&["agent", "list", "--output", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("json");
        v.as_array().expect("array")[0]["current_serial"]
            .as_str()
            .expect("serial")
            .to_owned()
    };
    let first = serial(&cluster);
    // Two lifetimes of the first agent SVID: without renewals the agent would be refused.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let out = cluster.mayfly(&["svid", "mint", "--task", "late", "--scope", "db:read"]);
    assert!(
        out.status.success(),
        "{}\n{}",
        stderr(&out),
        cluster.agent_log()
    );
    assert_ne!(
        serial(&cluster),
        first,
        "the server saw a renewed agent SVID in use"
    );
    // At half-life, not at every sync round: about four renewals in 12 s of a 6 s SVID.
    let renewals = cluster
        .agent_log()
        .matches("renewed the agent SVID")
        .count();
    assert!((2..=6).contains(&renewals), "{renewals} renewals in 12 s");
    let stored = std::fs::read(cluster.path("agent-data/agent.pem")).expect("stored SVID");
    let leaf = mayfly::bundle::from_pem(&stored).unwrap().remove(0);
    let (_, _, not_after) = leaf_facts(&leaf);
    assert!(
        not_after > SystemTime::now(),
        "the stored agent SVID is the renewed one"
    );
}

/// A process (A) that connects to the agent as uid 65534 and forks a relay (B) that keeps the
/// connection and exposes it on `relay`; A then exits (`die`) or stays (`live`). A prints its
/// pid once the agent has had time to attest it at accept.
const PID_REUSE_SCRIPT: &str = r#"
import os, socket, sys, threading, time
agent, relay, mode = sys.argv[1], sys.argv[2], sys.argv[3]
s = socket.socket(socket.AF_UNIX)
s.connect(agent)
if os.fork() != 0:
    time.sleep(1.0)
    print(os.getpid(), flush=True)
    if mode == "die":
        os._exit(0)
    time.sleep(60)
    os._exit(0)
srv = socket.socket(socket.AF_UNIX)
srv.bind(relay)
srv.listen(1)
c, _ = srv.accept()
def pump(a, b):
    while True:
        d = a.recv(65536)
        if not d:
            b.shutdown(socket.SHUT_WR)
            return
        b.sendall(d)
threading.Thread(target=pump, args=(c, s), daemon=True).start()
pump(s, c)
"#;

/// Puts a new process of uid 0 on `pid` by steering the kernel's next pid; None if another
/// process took it first every time.
fn occupy_pid(pid: i32) -> Option<common::cluster::Proc> {
    for _ in 0..20 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).ok()?;
        let child = Command::new("sleep").arg("30").spawn().ok()?;
        if child.id() as i32 == pid {
            return Some(common::cluster::Proc(child));
        }
        drop(common::cluster::Proc(child));
    }
    None
}

/// Runs the relay fixture in `mode` and returns what FetchX509SVID over the relayed
/// connection answered, keeping the processes alive until then.
async fn fetch_through_relay(cluster: &Cluster, mode: &str) -> Result<Vec<String>, Code> {
    use std::io::BufRead;
    let dir = cluster.path(&format!("relay-{mode}"));
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let relay = dir.join("relay.sock");
    let mut a = Command::new("/usr/bin/python3")
        .args(["-c", PID_REUSE_SCRIPT])
        .arg(cluster.socket())
        .arg(&relay)
        .arg(mode)
        .uid(NOBODY)
        .gid(NOBODY)
        .current_dir("/")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    std::io::BufReader::new(a.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let pid: i32 = line.trim().parse().expect("A's pid");
    let mut _a = common::cluster::Proc(a);
    let _occupier = if mode == "die" {
        _a.0.wait().unwrap();
        let occupier = occupy_pid(pid);
        if occupier.is_none() {
            println!(
                "note: pid {pid} could not be reused; the test still shows a dead peer gets nothing"
            );
        }
        occupier
    } else {
        None
    };
    common::cluster::wait_for_path(&relay, Duration::from_secs(5), "the relay socket");
    let channel = workload_client::connect(&relay).await.expect("relay");
    let mut stream = match workload_client::workload_api(channel)
        .fetch_x509svid(X509svidRequest {})
        .await
    {
        Ok(s) => s.into_inner(),
        Err(s) => return Err(s.code()),
    };
    match stream.message().await {
        Ok(Some(m)) => Ok(m.svids.into_iter().map(|s| s.spiffe_id).collect()),
        Ok(None) => Err(Code::Ok),
        Err(s) => Err(s.code()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_process_died_gets_nothing_even_when_its_pid_is_reused() {
    let mut cluster = Cluster::start();
    cluster.start_agent();
    let nobody_id = "spiffe://mayfly.local/agents/nobody";
    let root_id = "spiffe://mayfly.local/agents/root";
    cluster.create_entry(nobody_id, &["--selector", &format!("unix:uid:{NOBODY}")]);
    cluster.create_entry(root_id, &["--selector", "unix:uid:0"]);
    // Wait until both entries are on the agent (root's is visible to this process).
    let deadline = Instant::now() + Duration::from_secs(5);
    while fetch_status(&cluster).await != Ok(vec![root_id.to_owned()]) {
        assert!(
            Instant::now() < deadline,
            "the entries never reached the agent"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Positive control: the connecting process is alive, so its own identity is served over
    // the relayed connection.
    assert_eq!(
        fetch_through_relay(&cluster, "live").await,
        Ok(vec![nobody_id.to_owned()])
    );
    // The same fixture, but the connecting process exits and a root process takes its pid:
    // neither its identity nor root's is served.
    assert_eq!(
        fetch_through_relay(&cluster, "die").await,
        Err(Code::PermissionDenied)
    );
}

/// Runs `mayfly agent run` against the cluster's server with `args`, in its own data dir.
fn agent_command(cluster: &Cluster, data_dir: &str, args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command
        .args(["agent", "run", "--server"])
        .arg(format!("127.0.0.1:{}", cluster.port))
        .arg("--socket")
        .arg(cluster.path(&format!("{data_dir}.sock")))
        .arg("--data-dir")
        .arg(cluster.path(data_dir))
        .args(args)
        .current_dir(cluster.dir.path())
        .env("RUST_LOG", "info");
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_trust_is_explicit_and_the_stored_key_is_private() {
    let cluster = Cluster::start();
    let bundle = cluster.path("bundle.pem").display().to_string();

    // No way to trust the server, both ways, a bundle of another trust domain's CA: one
    // sentence each, non-zero exit, the token not spent.
    let other = Cluster::start();
    let other_bundle = other.path("bundle.pem").display().to_string();
    for (args, needle) in [
        (vec!["--join-token", &cluster.token], "--trust-bundle"),
        (
            vec![
                "--join-token",
                &cluster.token,
                "--trust-bundle",
                &bundle,
                "--insecure-bootstrap",
            ],
            "contradict",
        ),
        (
            vec![
                "--join-token",
                &cluster.token,
                "--trust-bundle",
                &other_bundle,
            ],
            "could not connect",
        ),
        (vec!["--trust-bundle", &bundle], "join token"),
    ] {
        let out = agent_command(&cluster, "refused", &args).output().unwrap();
        assert!(!out.status.success(), "{args:?} started");
        let err = stderr(&out);
        assert!(
            err.contains("error:") && err.contains(needle),
            "{args:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }

    // --insecure-bootstrap works, and says loudly what it skips.
    let mut agent = common::cluster::Proc(
        agent_command(
            &cluster,
            "insecure",
            &["--join-token", &cluster.token, "--insecure-bootstrap"],
        )
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap(),
    );
    common::cluster::wait_for_path(
        &cluster.path("insecure.sock"),
        Duration::from_secs(20),
        "the insecure agent's socket",
    );
    let key = cluster.path("insecure/agent.key");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the agent key is private");
    agent.stop();
    let mut log = String::new();
    std::io::Read::read_to_string(agent.0.stderr.as_mut().unwrap(), &mut log).unwrap();
    assert!(log.contains("INSECURE BOOTSTRAP"), "{log}");
    // The token was spent by the insecure agent only: the refused starts above spent nothing.
    let agents = cluster.ok(&["agent", "list", "--output", "json"]);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&agents)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1
    );
}
