//! The benchmarks as a user runs them, through the `mayfly` binary (ignored: they are slow in
//! debug builds; run them with
//! `cargo test --release --test bench -- --ignored --nocapture`).

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_mayfly");

/// `mayfly bench task` runs `mayfly server run` and `mayfly agent run` as processes of their
/// own (and the in-process layout beside them), mints without errors in both, and finds the
/// audit chain intact afterwards.
#[test]
#[ignore = "a benchmark: run it in release mode on purpose"]
fn bench_task_runs_server_and_agent_as_processes() {
    let out = Command::new(BIN)
        .args([
            "--output",
            "json",
            "bench",
            "task",
            "--duration",
            "2s",
            "--jwt",
        ])
        .output()
        .expect("run mayfly bench task");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench task failed: {stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON report");
    println!("{report:#}");
    let runs = report["runs"].as_array().expect("runs");
    let layouts: Vec<&str> = runs.iter().map(|r| r["layout"].as_str().unwrap()).collect();
    assert_eq!(layouts, ["processes", "in-process"]);
    for run in runs {
        assert_eq!(run["audit_chain_ok"], true, "{run}");
        for level in run["levels"].as_array().expect("levels") {
            assert_eq!(level["errors"], 0, "{level}");
            assert!(level["minted"].as_u64().unwrap() > 0, "{level}");
        }
    }
    // Task JWTs are measured beside their X.509 twins, and their ratio is reported.
    for run in runs {
        let kinds: Vec<&str> = run["levels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["kind"].as_str().unwrap())
            .collect();
        assert_eq!(kinds, ["x509", "jwt", "x509", "jwt"], "{run}");
        assert!(run["jwt_to_x509_p50"].as_f64().unwrap() > 0.0, "{run}");
    }
    // Each process's CPU is reported in the process layout, and only there.
    let split = &runs[0]["levels"][0]["by_process"];
    assert!(split["server_us"].as_f64().unwrap() > 0.0, "{split}");
    assert!(split["agent_us"].as_f64().unwrap() > 0.0, "{split}");
    assert!(runs[1]["levels"][0]["by_process"].is_null());
}

/// `mayfly bench sync` with tiny numbers: server and agent as processes, a full list paged
/// through, and every stream sees an entry come and go.
#[test]
fn bench_sync_smoke() {
    let out = Command::new(BIN)
        .args(["--output", "json", "bench", "sync"])
        .args([
            "--entries",
            "60",
            "--streams",
            "8",
            "--rounds",
            "2",
            "--list-passes",
            "2",
        ])
        .output()
        .expect("run mayfly bench sync");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench sync failed: {stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON report");
    println!("{report:#}");
    assert_eq!(report["entries"], 60);
    assert!(report["pages_per_list"].as_u64().unwrap() >= 1, "{report}");
    assert!(report["server_cpu_us_per_entry"].as_f64().unwrap() >= 0.0);
    for phase in ["created", "deleted"] {
        assert_eq!(report[phase]["samples"], 2 * 8, "{report}");
        assert!(report[phase]["p99_us"].as_f64().unwrap() > 0.0, "{report}");
    }
}

/// `mayfly bench attest-flood` with tiny numbers: mints go on during a flood of bad
/// attestations, which is mostly throttled.
#[test]
fn bench_attest_flood_smoke() {
    let out = Command::new(BIN)
        .args(["--output", "json", "bench", "attest-flood"])
        .args(["--duration", "1s", "--flooders", "2"])
        .output()
        .expect("run mayfly bench attest-flood");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench attest-flood failed: {stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON report");
    for window in ["quiet", "flood"] {
        assert!(report[window]["minted"].as_u64().unwrap() > 0, "{report:#}");
        assert_eq!(report[window]["errors"], 0, "{report:#}");
    }
    let attempts = report["attempts"].as_u64().unwrap();
    let throttled = report["throttled"].as_u64().unwrap();
    assert!(attempts > 0, "{report:#}");
    assert!(
        throttled * 2 > attempts,
        "most of the flood is throttled: {report:#}"
    );
    assert!(report["p99_ratio"].as_f64().unwrap() > 0.0);
}
