//! The `mayfly` binary on what workloads write and read, as real processes (a server, an agent,
//! workloads on the agent's socket): a task ID crafted to forge audit lines reaches the audit
//! log through the real task API and is shown escaped, and a workload command whose stdout
//! closes early exits quietly.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::cluster::{BIN, Cluster};

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A cluster with an agent and an entry for this process (uid) with scope `db:read`, once the
/// agent serves it: a task SVID mints.
fn cluster_serving_this_process() -> Cluster {
    let mut cluster = Cluster::start();
    cluster.start_agent();
    let uid = nix::unistd::getuid().as_raw().to_string();
    cluster.create_entry(
        "spiffe://mayfly.local/agents/reader",
        &[
            "--selector",
            &format!("unix:uid:{uid}"),
            "--scope",
            "db:read",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = cluster.mayfly(&["svid", "mint", "--task", "warm-up", "--scope", "db:read"]);
        if out.status.success() {
            return cluster;
        }
        assert!(
            Instant::now() < deadline,
            "the agent never minted: {}",
            stderr(&out)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_task_id_that_forges_audit_lines_is_shown_escaped() {
    let cluster = cluster_serving_this_process();
    let forged = "x\n#9999 2026-12-01T03:37:12Z token.create allow reason=\"ok\"\u{1b}[8m";
    let out = cluster.mayfly(&["svid", "mint", "--task", forged, "--scope", "db:read"]);
    assert!(!out.status.success(), "the forged task ID was minted");
    let err = stderr(&out);
    assert_eq!(err.trim_end().lines().count(), 1, "{err:?}");
    assert!(!err.contains('\u{1b}'), "{err:?}");

    let text = cluster.ok(&["audit", "list"]);
    let json = cluster.ok(&["audit", "list", "--output", "json"]);
    // One header line, then one line per record: nothing the workload wrote adds a line.
    assert_eq!(text.lines().count(), json.lines().count() + 1, "{text}");
    assert!(
        !text.lines().any(|l| l.starts_with("#9999")),
        "a forged line: {text}"
    );
    assert!(
        !text.chars().any(|c| c.is_control() && c != '\n'),
        "control characters reached the terminal: {text:?}"
    );
    // Positive control on the same log: the ordinary task shows as it is.
    assert!(text.contains("task=warm-up"), "{text}");

    // JSON keeps the recorded value exactly: the server records a refused value escaped, and
    // the text output escapes what it shows once more (so a stored backslash shows as `\\`).
    let recorded = json
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|r| r["task_id"].as_str().is_some_and(|t| t.starts_with('x')))
        .expect("the refusal is audited");
    let task_id = recorded["task_id"].as_str().unwrap();
    assert_eq!(task_id, mayfly::text::escape(forged), "recorded escaped");
    let shown = format!("task={}", mayfly::text::escape(task_id));
    assert!(text.contains(&shown), "{shown} not in {text}");
    assert_eq!(recorded["decision"], "deny");
}

#[test]
fn svid_mint_with_stdout_closed_is_a_quiet_exit() {
    let cluster = cluster_serving_this_process();
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = Command::new(BIN)
        .args(["svid", "mint", "--task", "piped", "--scope", "db:read"])
        .current_dir(cluster.dir.path())
        .env("SPIFFE_ENDPOINT_SOCKET", cluster.endpoint())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("run mayfly");
    assert!(out.status.success(), "{}: {}", out.status, stderr(&out));
    assert_eq!(stderr(&out), "");
    // The mint itself happened: it is in the audit log.
    assert_eq!(cluster.audit_of_task("piped").len(), 1);
}

/// `svid fetch --spiffe-id` picks one of the workload's identities, and names the ones it has
/// when asked for another.
#[test]
fn svid_fetch_picks_an_identity_by_its_spiffe_id() {
    let cluster = cluster_serving_this_process();
    let ok = cluster.mayfly(&[
        "svid",
        "fetch",
        "--spiffe-id",
        "spiffe://mayfly.local/agents/reader",
        "--output",
        "json",
    ]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("spiffe://mayfly.local/agents/reader"));
    let other = cluster.mayfly(&[
        "svid",
        "fetch",
        "--spiffe-id",
        "spiffe://mayfly.local/other",
    ]);
    assert!(!other.status.success());
    let err = stderr(&other);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("no SVID for spiffe://mayfly.local/other")
            && err.contains("spiffe://mayfly.local/agents/reader"),
        "{err}"
    );
}
