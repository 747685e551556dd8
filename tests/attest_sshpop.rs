//! sshpop end to end (issue 12): a real `mayfly server run` configured with an SSH CA made by
//! `ssh-keygen`, and real `mayfly agent run` processes attesting with host certificates that
//! `ssh-keygen -s` signed. The agent gets `.../mayfly/agent/sshpop/<SHA-256 of its host key>`
//! and `sshpop:principal:` selectors, and serves an entry of the node group they put it in;
//! then each refusal the issue lists, after that positive control on the same server.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::attest_stream::attest_by_hand;
use common::cluster::{BIN, Cluster, Proc, wait_for_path};
use common::{Engine, TestServer};
use mayfly::server::node_attestors::{NodeAttestors, NodeAttestorsSettings, SshPopSettings};
use mayfly_attestors::NodeEvidence;
use mayfly_attestors::sshpop::{self, SshPopEvidence};
use tempfile::TempDir;
use tonic::Code;

const GROUP: &str = "spiffe://mayfly.local/nodes/web";

/// SSH keys and certificates made by `ssh-keygen` in their own directory.
struct Ssh {
    dir: TempDir,
}

impl Ssh {
    fn new() -> Self {
        Self {
            dir: TempDir::new().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn keygen(&self, args: &[&str]) {
        let out = Command::new("ssh-keygen")
            .current_dir(self.dir.path())
            .args(args)
            .output()
            .expect("ssh-keygen runs");
        assert!(
            out.status.success(),
            "ssh-keygen {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// An unencrypted ed25519 key pair `name`, `name.pub`.
    fn key(&self, name: &str) {
        self.keygen(&["-q", "-t", "ed25519", "-N", "", "-C", name, "-f", name]);
    }

    /// `key.pub` signed by `ca` with `args`, as `<label>-cert.pub`.
    fn certify(&self, ca: &str, key: &str, label: &str, args: &[&str]) -> PathBuf {
        let public = format!("{label}.pub");
        std::fs::copy(self.path(&format!("{key}.pub")), self.path(&public)).unwrap();
        let mut all = vec!["-q", "-s", ca, "-I", label];
        all.extend(args);
        all.push(&public);
        self.keygen(&all);
        self.path(&format!("{label}-cert.pub"))
    }

    /// The SHA-256 of `name.pub`'s key blob, hex, by the shell's tools.
    fn fingerprint(&self, name: &str) -> String {
        let out = Command::new("sh")
            .arg("-c")
            .arg("cut -d' ' -f2 \"$0\" | base64 -d | sha256sum | cut -d' ' -f1")
            .arg(self.path(&format!("{name}.pub")))
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }
}

const HOST: [&str; 5] = ["-h", "-n", "web-1,web-1.example", "-V", "-5m:+1h"];

/// `mayfly agent run` attesting with sshpop, named `tag` in the cluster's directory.
fn agent(cluster: &Cluster, tag: &str, cert: &Path, key: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(["agent", "run", "--server"])
        .arg(format!("127.0.0.1:{}", cluster.port))
        .args(["--attestor", "sshpop", "--sshpop-cert"])
        .arg(cert)
        .arg("--sshpop-key")
        .arg(key)
        .arg("--trust-bundle")
        .arg(cluster.path("bundle.pem"))
        .arg("--socket")
        .arg(cluster.path(&format!("{tag}.sock")))
        .arg("--data-dir")
        .arg(cluster.path(&format!("{tag}-data")))
        .current_dir(cluster.dir.path())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null());
    cmd
}

/// Starts an sshpop agent and waits for its socket.
fn start_agent(cluster: &Cluster, tag: &str, cert: &Path, key: &Path) -> Proc {
    let log = std::fs::File::create(cluster.path(&format!("{tag}.log"))).unwrap();
    let child = agent(cluster, tag, cert, key)
        .stderr(log)
        .spawn()
        .expect("spawn mayfly agent run");
    wait_for_path(
        &cluster.path(&format!("{tag}.sock")),
        Duration::from_secs(30),
        "the sshpop agent's socket",
    );
    Proc(child)
}

/// Runs an sshpop agent that must fail to attest, and returns what it printed.
fn refused_agent(cluster: &Cluster, tag: &str, cert: &Path, key: &Path) -> String {
    let child = agent(cluster, tag, cert, key)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mayfly agent run");
    let mut proc = Proc(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = proc.0.try_wait().unwrap() {
            assert!(!status.success(), "{tag}: the agent attested");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{tag}: the agent neither attested nor stopped"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !cluster.path(&format!("{tag}.sock")).exists(),
        "{tag}: the agent serves a socket"
    );
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut proc.0.stderr.take().unwrap(), &mut stderr).unwrap();
    stderr
}

/// A server accepting host certificates of the CA `ssh.path("ca.pub")`, from its TOML file.
fn server_trusting(ssh: &Ssh) -> Cluster {
    let config = ssh.path("server.toml");
    std::fs::write(
        &config,
        format!(
            "[node_attestors.sshpop]\ncert_authorities = [{:?}]\n",
            ssh.path("ca.pub")
        ),
    )
    .unwrap();
    Cluster::start_with(&["--config", config.to_str().unwrap()])
}

#[test]
fn an_sshpop_agent_gets_its_host_key_id_its_principals_and_its_group_entry() {
    let ssh = Ssh::new();
    ssh.key("ca");
    ssh.key("host");
    let cert = ssh.certify("ca", "host", "web", &HOST);
    let cluster = server_trusting(&ssh);
    // Tagged `agent`, the socket the cluster's CLI calls reach.
    let _agent = start_agent(&cluster, "agent", &cert, &ssh.path("host"));

    let agent_id = format!(
        "spiffe://mayfly.local/mayfly/agent/sshpop/{}",
        ssh.fingerprint("host")
    );
    let shown = cluster.ok(&["agent", "show", &agent_id]);
    assert!(shown.contains("Attestor:  sshpop\n"), "{shown}");
    assert!(
        shown.contains(
            "Node selectors:\n  sshpop:principal:web-1\n  sshpop:principal:web-1.example\n"
        ),
        "{shown}"
    );

    // The principal puts the agent in a node group; the group's workload entry is served.
    cluster.ok(&[
        "entry",
        "create",
        "--node",
        "--spiffe-id",
        GROUP,
        "--selector",
        "sshpop:principal:web-1",
    ]);
    let uid = format!("unix:uid:{}", nix::unistd::getuid().as_raw());
    cluster.ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://mayfly.local/workloads/shop",
        "--parent-id",
        GROUP,
        "--selector",
        &uid,
        "--scope",
        "orders:read",
    ]);
    let minted = cluster.ok_eventually(&[
        "svid",
        "mint",
        "--task",
        "t-1",
        "--scope",
        "orders:read",
        "--output",
        "json",
    ]);
    assert!(
        minted.contains("spiffe://mayfly.local/workloads/shop/scope/orders.read"),
        "{minted}"
    );
    let shown = cluster.ok(&["agent", "show", &agent_id]);
    assert!(
        shown.contains(&format!("Node groups:\n  {GROUP} (node entry ")),
        "{shown}"
    );
}

#[test]
fn sshpop_refuses_another_ca_expired_future_and_user_certificates_and_the_wrong_key() {
    let ssh = Ssh::new();
    ssh.key("ca");
    ssh.key("other_ca");
    ssh.key("host");
    ssh.key("other_host");
    let cluster = server_trusting(&ssh);
    let good = ssh.certify("ca", "host", "web", &HOST);
    let _agent = start_agent(&cluster, "web", &good, &ssh.path("host"));
    let agent_id = format!(
        "spiffe://mayfly.local/mayfly/agent/sshpop/{}",
        ssh.fingerprint("host")
    );
    assert!(
        cluster
            .ok(&["agent", "show", &agent_id])
            .contains("sshpop:principal:web-1")
    );

    let host = ssh.path("host");
    let cases = [
        (
            "other-ca",
            "other_ca",
            HOST.to_vec(),
            "not in cert_authorities",
        ),
        (
            "expired",
            "ca",
            vec!["-h", "-n", "web-1", "-V", "-2h:-1h"],
            "has expired",
        ),
        (
            "future",
            "ca",
            vec!["-h", "-n", "web-1", "-V", "+1h:+2h"],
            "not valid yet",
        ),
        (
            "user",
            "ca",
            vec!["-n", "web-1", "-V", "-5m:+1h"],
            "not a host certificate",
        ),
    ];
    for (tag, ca, args, words) in cases {
        let cert = ssh.certify(ca, "host", tag, &args);
        let said = refused_agent(&cluster, tag, &cert, &host);
        assert!(
            said.contains("the server refused") && said.contains(words),
            "{tag}: {said}"
        );
    }
    // Host key X's certificate with key Y: the agent says so before asking the server.
    let said = refused_agent(&cluster, "wrong-key", &good, &ssh.path("other_host"));
    assert!(said.contains("is not the key certified by"), "{said}");

    // Each refusal is audited with its reason; the server still serves the good agent.
    let log = cluster.ok(&["audit", "list", "--output", "json"]);
    for words in [
        "not in cert_authorities",
        "has expired",
        "not valid yet",
        "not a host certificate",
    ] {
        assert!(log.contains(words), "{words}: {log}");
    }
    assert!(
        cluster
            .ok(&["agent", "show", &agent_id])
            .contains("Status:    active")
    );
}

/// Runs `mayfly args` until it succeeds, for up to `limit`; returns its stdout.
fn ok_within(cluster: &Cluster, args: &[&str], limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let out = cluster.mayfly(args);
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(
            Instant::now() < deadline,
            "mayfly {args:?} never succeeded: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn an_evicted_sshpop_agent_attests_again_by_itself_and_a_banned_one_stays_banned() {
    let ssh = Ssh::new();
    ssh.key("ca");
    ssh.key("host");
    let cert = ssh.certify("ca", "host", "web", &HOST);
    let cluster = server_trusting(&ssh);
    let _agent = start_agent(&cluster, "agent", &cert, &ssh.path("host"));
    let agent_id = format!(
        "spiffe://mayfly.local/mayfly/agent/sshpop/{}",
        ssh.fingerprint("host")
    );
    let serial = |shown: &str| {
        shown
            .lines()
            .find_map(|l| l.strip_prefix("Serial:").map(|s| s.trim().to_owned()))
            .expect("a serial line")
    };
    let first = serial(&cluster.ok(&["agent", "show", &agent_id]));

    cluster.ok(&["agent", "evict", &agent_id]);
    assert!(
        !cluster
            .mayfly(&["agent", "show", &agent_id])
            .status
            .success(),
        "the eviction removed the agent"
    );
    // No operator step: the agent proves its host certificate again and gets a new SVID.
    let again = ok_within(
        &cluster,
        &["agent", "show", &agent_id],
        Duration::from_secs(40),
    );
    assert_ne!(serial(&again), first, "{again}");
    assert!(again.contains("sshpop:principal:web-1"), "{again}");

    // A banned agent stays banned, whatever host certificate it brings.
    cluster.ok(&["agent", "ban", &agent_id]);
    let said = refused_agent(&cluster, "banned", &cert, &ssh.path("host"));
    assert!(said.contains("banned"), "{said}");
}

/// The node API on its socket, with the server trusting the CA `ssh.path("ca.pub")`.
async fn node_api_trusting(ssh: &Ssh) -> TestServer {
    let ca = ssh.path("ca.pub");
    TestServer::start_with(Engine::Sqlite, move |config| {
        let settings = NodeAttestorsSettings {
            sshpop: Some(SshPopSettings {
                cert_authorities: vec![ca],
            }),
            ..Default::default()
        };
        config.node_attestors = NodeAttestors::from_settings(&settings).unwrap();
    })
    .await
    .expect("SQLite")
}

#[tokio::test]
async fn a_challenge_response_counts_once_for_its_own_nonce_certificate_and_key() {
    let ssh = Ssh::new();
    ssh.key("ca");
    ssh.key("host");
    ssh.key("db");
    let web = SshPopEvidence::new(ssh.certify("ca", "host", "web", &HOST), ssh.path("host"));
    let db = SshPopEvidence::new(ssh.certify("ca", "db", "db1", &HOST), ssh.path("db"));
    let server = node_api_trusting(&ssh).await;
    let server = &server;

    // Positive control, keeping the response.
    let mut kept = Vec::new();
    let answer = attest_by_hand(server, sshpop::NAME, web.evidence().unwrap(), |nonce| {
        kept = web.answer(&nonce).unwrap();
        kept.clone()
    })
    .await
    .expect("sshpop attests");
    assert!(
        answer
            .node_selectors
            .contains(&"sshpop:principal:web-1".to_owned())
    );

    // Replayed on a later stream (a new nonce).
    let replayed = attest_by_hand(server, sshpop::NAME, web.evidence().unwrap(), |_| {
        kept.clone()
    })
    .await
    .unwrap_err();
    assert_eq!(replayed.code(), Code::PermissionDenied, "{replayed:?}");
    assert!(
        replayed.message().contains("not a signature"),
        "{replayed:?}"
    );
    // A signature over another nonce; db's answer for web's certificate.
    let other_nonce = attest_by_hand(
        server,
        sshpop::NAME,
        web.evidence().unwrap(),
        |mut nonce| {
            nonce[0] ^= 1;
            web.answer(&nonce).unwrap()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(
        other_nonce.code(),
        Code::PermissionDenied,
        "{other_nonce:?}"
    );
    let other_key = attest_by_hand(server, sshpop::NAME, web.evidence().unwrap(), |nonce| {
        db.answer(&nonce).unwrap()
    })
    .await
    .unwrap_err();
    assert_eq!(other_key.code(), Code::PermissionDenied, "{other_key:?}");
    attest_by_hand(server, sshpop::NAME, db.evidence().unwrap(), |nonce| {
        db.answer(&nonce).unwrap()
    })
    .await
    .expect("db attests with its own answer");

    // 1 MiB of evidence never reaches the attestor; garbage is refused as malformed.
    let huge = attest_by_hand(server, sshpop::NAME, vec![0; 1 << 20], |_| Vec::new())
        .await
        .unwrap_err();
    assert_ne!(huge.code(), Code::Ok);
    let garbage = attest_by_hand(server, sshpop::NAME, b"not a certificate".to_vec(), |_| {
        Vec::new()
    })
    .await
    .unwrap_err();
    assert_eq!(garbage.code(), Code::InvalidArgument, "{garbage:?}");
}
