//! x509pop node attestation end to end (issue 12): a real `mayfly server run` trusting a node
//! CA made by openssl, real `mayfly agent run` processes proving node certificates made by
//! openssl, a node group serving a workload entry, re-attestation without an operator after
//! an eviction, and a banned agent kept out whatever it brings. The protocol-level refusals
//! (another CA, another key, a replayed or misdirected challenge response, oversized
//! evidence) run against the server's node API on its real socket.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::attest_stream::attest_by_hand;
use common::cluster::Cluster;
use common::openssl_pki::{self, CertFiles};
use common::{Engine, TestServer};
use mayfly_attestors::x509pop::X509PopEvidence;
use mayfly_attestors::{NodeEvidence, x509pop};
use tonic::Code;

const TD: &str = "spiffe://mayfly.local";

fn x509pop_args(node: &CertFiles) -> Vec<String> {
    vec![
        "--attestor".into(),
        "x509pop".into(),
        "--x509pop-cert".into(),
        node.cert.display().to_string(),
        "--x509pop-key".into(),
        node.key.display().to_string(),
    ]
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

fn agent_detail(cluster: &Cluster, id: &str) -> serde_json::Value {
    let out = cluster.ok(&["agent", "show", id, "--output", "json"]);
    serde_json::from_str(&out).expect("agent show json")
}

fn node_selectors(detail: &serde_json::Value) -> Vec<String> {
    detail["agent"]["node_selectors"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| s.as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Runs an agent that must exit by itself (refused), killing it after 30 s.
fn run_to_exit(mut command: std::process::Command) -> std::process::ExitStatus {
    let mut child = command.spawn().expect("spawn mayfly agent run");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the agent kept running although its attestation should be refused");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits for `cond` on the agent log named `tag`, up to 30 s.
fn wait_log(cluster: &Cluster, tag: &str, cond: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let log = std::fs::read_to_string(cluster.path(&format!("{tag}.log"))).unwrap_or_default();
        if cond(&log) {
            return log;
        }
        assert!(std::time::Instant::now() < deadline, "agent log: {log}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_node_proves_its_certificate_joins_its_group_and_attests_again_by_itself() {
    let pki = tempfile::tempdir().unwrap();
    let ca = openssl_pki::ca(pki.path(), "node-ca");
    let web1 = openssl_pki::node(pki.path(), &ca, "web-1", "web-1");
    let ca_arg = ca.cert.display().to_string();
    let cluster = Cluster::start_with(&["--x509pop-ca-bundle", &ca_arg]);

    // The node group and a workload entry under it, registered before any node exists.
    cluster.ok(&[
        "entry",
        "create",
        "--node",
        "--spiffe-id",
        &format!("{TD}/nodes/web"),
        "--selector",
        "x509pop:subject:cn:web-1",
    ]);
    let uid = format!("unix:uid:{}", nix::unistd::getuid().as_raw());
    cluster.ok(&[
        "entry",
        "create",
        "--spiffe-id",
        &format!("{TD}/billing"),
        "--parent-id",
        &format!("{TD}/nodes/web"),
        "--selector",
        &uid,
        "--scope",
        "stripe:read:customers",
    ]);

    // The agent attests with the node certificate: SPIRE's ID and selectors.
    let mut agent = cluster.spawn_agent_with("agent", &strs(&x509pop_args(&web1)));
    let agent_id = format!("{TD}/mayfly/agent/x509pop/{}", web1.sha1());
    let detail = agent_detail(&cluster, &agent_id);
    assert_eq!(detail["agent"]["attestor"], "x509pop", "{detail}");
    let selectors = node_selectors(&detail);
    for expected in [
        "x509pop:subject:cn:web-1".to_owned(),
        "x509pop:san:dns:web-1.example".to_owned(),
        format!("x509pop:ca:fingerprint:{}", ca.sha1()),
        format!("x509pop:serialnumber:{}", web1.serial()),
    ] {
        assert!(selectors.contains(&expected), "{expected} in {selectors:?}");
    }
    assert!(
        detail.to_string().contains(&format!("{TD}/nodes/web")),
        "{detail}"
    );

    // The workload under the group is served by this agent.
    let out = cluster.ok_eventually(&["svid", "fetch", "--output", "json"]);
    assert!(out.contains(&format!("{TD}/billing")), "{out}");

    // Evicted: the agent proves its certificate again by itself, same ID, no operator.
    cluster.ok(&["agent", "evict", &agent_id]);
    wait_log(&cluster, "agent", |log| log.contains("attested again"));
    let detail = agent_detail(&cluster, &agent_id);
    assert!(
        !detail["agent"]["banned"].as_bool().unwrap_or(false),
        "{detail}"
    );
    let out = cluster.ok_eventually(&["svid", "fetch", "--output", "json"]);
    assert!(out.contains(&format!("{TD}/billing")), "{out}");

    // Banned: it stays out whatever evidence it brings, even as a fresh agent (no stored
    // identity) proving the same certificate.
    cluster.ok(&["agent", "ban", &agent_id]);
    agent.kill();
    let status = run_to_exit(cluster.agent_command("again", &strs(&x509pop_args(&web1))));
    assert!(!status.success(), "a banned node attested again");
    let log = std::fs::read_to_string(cluster.path("again.log")).unwrap();
    assert!(log.contains("banned"), "{log}");
    let detail = agent_detail(&cluster, &agent_id);
    assert_eq!(detail["agent"]["banned"], true, "{detail}");
    // Nor can an eviction (which worked above, unbanned) wipe the ban and let it back in.
    let out = cluster.mayfly(&["agent", "evict", &agent_id]);
    assert!(!out.status.success(), "a banned agent was evicted");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is banned") && !err.contains("panicked"),
        "{err}"
    );
    assert_eq!(agent_detail(&cluster, &agent_id)["agent"]["banned"], true);
}

#[test]
fn the_agent_says_in_one_sentence_what_its_node_certificate_lacks() {
    let pki = tempfile::tempdir().unwrap();
    let ca = openssl_pki::ca(pki.path(), "node-ca");
    let rogue = openssl_pki::ca(pki.path(), "rogue-ca");
    let good = openssl_pki::node(pki.path(), &ca, "good", "web-1");
    let foreign = openssl_pki::node(pki.path(), &rogue, "foreign", "web-1");
    let ca_arg = ca.cert.display().to_string();
    let cluster = Cluster::start_with(&["--x509pop-ca-bundle", &ca_arg]);

    // Positive control: the good certificate attests.
    let mut agent = cluster.spawn_agent_with("good", &strs(&x509pop_args(&good)));
    agent.stop();

    let mismatched = CertFiles {
        cert: good.cert.clone(),
        key: foreign.key.clone(),
    };
    for (tag, node, needle) in [
        (
            "foreign",
            &foreign,
            "does not verify against the x509pop CA bundle",
        ),
        (
            "mismatched",
            &mismatched,
            "not a signature by the node certificate's key",
        ),
    ] {
        let status = run_to_exit(cluster.agent_command(tag, &strs(&x509pop_args(node))));
        assert!(!status.success(), "{tag} attested");
        let log = std::fs::read_to_string(cluster.path(&format!("{tag}.log"))).unwrap();
        assert!(log.contains(needle), "{tag}: {log}");
        assert!(!log.contains("panicked"), "{log}");
    }

    // A missing key flag is refused before anything is sent.
    let out = cluster
        .agent_command(
            "nokey",
            &[
                "--attestor",
                "x509pop",
                "--x509pop-cert",
                &good.cert.display().to_string(),
            ],
        )
        .output()
        .unwrap();
    assert!(!out.status.success());
    let log = std::fs::read_to_string(cluster.path("nokey.log")).unwrap();
    assert!(log.contains("--x509pop-key"), "{log}");
}

/// The node API on its socket, with the server trusting `ca` for x509pop.
async fn server_trusting(ca: &CertFiles) -> TestServer {
    let ca_bundle = ca.cert.clone();
    TestServer::start_with(Engine::Sqlite, move |config| {
        let settings = mayfly::server::node_attestors::NodeAttestorsSettings {
            x509pop: Some(mayfly::server::node_attestors::X509PopSettings { ca_bundle }),
            ..Default::default()
        };
        config.node_attestors =
            mayfly::server::node_attestors::NodeAttestors::from_settings(&settings).unwrap();
    })
    .await
    .expect("SQLite")
}

#[tokio::test]
async fn a_challenge_response_counts_once_for_its_own_nonce_and_certificate() {
    let pki = tempfile::tempdir().unwrap();
    let ca = openssl_pki::ca(pki.path(), "node-ca");
    let web1 = openssl_pki::node(pki.path(), &ca, "web-1", "web-1");
    let web2 = openssl_pki::node(pki.path(), &ca, "web-2", "web-2");
    let server = server_trusting(&ca).await;
    let one = Arc::new(X509PopEvidence::new(web1.cert.clone(), web1.key.clone()));
    let two = Arc::new(X509PopEvidence::new(web2.cert.clone(), web2.key.clone()));

    // Positive control: the agent's own answer, through the client the agent uses.
    let attested = mayfly::client::attest_node(
        server.node_addr(),
        server.bundles().await,
        &server.server_id(),
        one.clone(),
    )
    .await
    .expect("x509pop attests");
    assert_eq!(
        attested.spiffe_id.to_string(),
        format!("{TD}/mayfly/agent/x509pop/{}", web1.sha1())
    );

    // The same by hand, keeping the response; it is refused on a later stream (a new nonce).
    let mut kept = Vec::new();
    let answer = attest_by_hand(&server, x509pop::NAME, one.evidence().unwrap(), |nonce| {
        kept = one.answer(&nonce).unwrap();
        kept.clone()
    })
    .await
    .expect("the by-hand attestation succeeds");
    assert!(
        answer
            .node_selectors
            .contains(&"x509pop:subject:cn:web-1".to_owned())
    );
    let replayed = attest_by_hand(&server, x509pop::NAME, one.evidence().unwrap(), |_| {
        kept.clone()
    })
    .await
    .unwrap_err();
    assert_eq!(replayed.code(), Code::PermissionDenied, "{replayed:?}");
    assert!(
        replayed.message().contains("not a signature"),
        "{replayed:?}"
    );

    // A signature over another nonce, and web-2's answer for web-1's certificate.
    let other_nonce = attest_by_hand(&server, x509pop::NAME, one.evidence().unwrap(), |nonce| {
        let mut other = nonce.clone();
        other[0] ^= 1;
        one.answer(&other).unwrap()
    })
    .await
    .unwrap_err();
    assert_eq!(other_nonce.code(), Code::PermissionDenied);
    let other_key = attest_by_hand(&server, x509pop::NAME, one.evidence().unwrap(), |nonce| {
        two.answer(&nonce).unwrap()
    })
    .await
    .unwrap_err();
    assert_eq!(other_key.code(), Code::PermissionDenied);
    // web-2's own answer still works: the refusals above were about the pairing.
    attest_by_hand(&server, x509pop::NAME, two.evidence().unwrap(), |nonce| {
        two.answer(&nonce).unwrap()
    })
    .await
    .expect("web-2 attests");

    // 1 MiB of evidence never reaches the attestor, and garbage is refused as malformed.
    let huge = attest_by_hand(&server, x509pop::NAME, vec![0x30; 1 << 20], |_| Vec::new())
        .await
        .unwrap_err();
    assert_ne!(huge.code(), Code::Ok);
    let garbage = attest_by_hand(
        &server,
        x509pop::NAME,
        b"not a certificate".to_vec(),
        |_| Vec::new(),
    )
    .await
    .unwrap_err();
    assert_eq!(garbage.code(), Code::InvalidArgument, "{garbage:?}");
}

#[test]
fn an_agent_whose_svid_expired_while_it_was_down_attests_again_by_itself() {
    let pki = tempfile::tempdir().unwrap();
    let ca = openssl_pki::ca(pki.path(), "node-ca");
    let web1 = openssl_pki::node(pki.path(), &ca, "web-1", "web-1");
    let ca_arg = ca.cert.display().to_string();
    let cluster = Cluster::start_with(&[
        "--x509pop-ca-bundle",
        &ca_arg,
        "--agent-ttl",
        "5s",
        "--ca-ttl",
        "3m",
    ]);
    let args = x509pop_args(&web1);
    let mut agent = cluster.spawn_agent_with("agent", &strs(&args));
    let agent_id = format!("{TD}/mayfly/agent/x509pop/{}", web1.sha1());
    let first = agent_detail(&cluster, &agent_id);
    // Killed, so it renews nothing; its stored SVID expires while it is down.
    agent.kill();
    std::thread::sleep(Duration::from_secs(8));
    let mut agent = cluster.spawn_agent_with("agent", &strs(&args));
    let log = wait_log(&cluster, "agent", |log| {
        log.contains("has expired; attesting again")
    });
    assert!(!log.contains("join token"), "{log}");
    let again = agent_detail(&cluster, &agent_id);
    assert_ne!(
        first["agent"]["current_serial"], again["agent"]["current_serial"],
        "a new agent SVID: {again}"
    );
    agent.stop();
}
