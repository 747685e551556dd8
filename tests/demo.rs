//! `mayfly demo` as a user runs it from the README: one command, exit 0 only when every step
//! behaved as narrated.

use std::process::Command;

#[test]
fn the_demo_tells_the_whole_story_and_exits_zero() {
    let out = Command::new(env!("CARGO_BIN_EXE_mayfly"))
        .arg("demo")
        .current_dir(std::env::temp_dir())
        .output()
        .expect("run mayfly demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "GET /customers → 200",
        "POST /refunds → 403",
        "stripe.write.refunds → 200",
        "expired SVID → refused in the TLS handshake",
        "chain intact",
        "Every step behaved as stated.",
    ] {
        assert!(stdout.contains(line), "missing '{line}' in:\n{stdout}");
    }
    assert!(!stdout.contains("NOT AS EXPECTED"));
}
