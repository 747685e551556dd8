//! The `aws_iid` node attestor end to end, with real processes: `mayfly server run` trusting an
//! AWS-style certificate from its TOML file (`[node_attestors.aws_iid]`), `mayfly agent run
//! --attestor aws_iid` with an instance identity document and its signature in files, the
//! `mayfly` CLI as the operator, and this test process as the workload. The certificate and
//! the signatures are made by `openssl` here, as AWS's documentation verifies them
//! (`openssl dgst -sha256`).

mod common;

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use common::cluster::{BIN, Cluster, Proc, wait_for_path};
use tempfile::TempDir;

const INSTANCE: &str = "i-0aa11bb22cc33dd44";
const AGENT_ID: &str =
    "spiffe://mayfly.local/mayfly/agent/aws_iid/123456789012/us-east-1/i-0aa11bb22cc33dd44";
const GROUP: &str = "spiffe://mayfly.local/nodes/aws-prod";

/// A stand-in for AWS: a self-signed RSA certificate (PEM, for the server) and its key.
struct Aws {
    dir: TempDir,
}

fn openssl(dir: &Path, args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

impl Aws {
    fn new() -> Self {
        let dir = TempDir::new().unwrap();
        openssl(
            dir.path(),
            &[
                "req",
                "-x509",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=test AWS",
                "-newkey",
                "rsa:2048",
                "-keyout",
                "key.pem",
                "-out",
                "cert.pem",
            ],
        );
        Self { dir }
    }

    fn cert(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }

    /// Writes `document` and this AWS's base64 signature of it as `<name>.json` and
    /// `<name>.sig`, and returns their paths.
    fn sign(&self, name: &str, document: &str) -> (PathBuf, PathBuf) {
        let doc = self.dir.path().join(format!("{name}.json"));
        std::fs::write(&doc, document).unwrap();
        let bin = format!("{name}.bin");
        openssl(
            self.dir.path(),
            &[
                "dgst",
                "-sha256",
                "-sign",
                "key.pem",
                "-out",
                &bin,
                doc.to_str().unwrap(),
            ],
        );
        let signature = openssl(self.dir.path(), &["base64", "-in", &bin]);
        let sig = self.dir.path().join(format!("{name}.sig"));
        std::fs::write(&sig, signature).unwrap();
        (doc, sig)
    }
}

/// An instance identity document as the metadata service serves it, launched `age` ago.
fn document(instance_id: &str, age: Duration) -> String {
    let pending = humantime::format_rfc3339_seconds(SystemTime::now() - age);
    format!(
        r#"{{
  "accountId" : "123456789012",
  "architecture" : "x86_64",
  "availabilityZone" : "us-east-1a",
  "imageId" : "ami-0abcdef1234567890",
  "instanceId" : "{instance_id}",
  "instanceType" : "t3.micro",
  "pendingTime" : "{pending}",
  "privateIp" : "10.0.1.17",
  "region" : "us-east-1",
  "version" : "2017-09-30"
}}"#
    )
}

/// A server whose TOML file accepts aws_iid with `aws`'s certificate and a 5-minute age.
fn cluster(aws: &Aws) -> Cluster {
    let config = aws.dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "[node_attestors.aws_iid]\ncertificates = [{:?}]\nmax_document_age = \"5m\"\n",
            aws.cert().display().to_string()
        ),
    )
    .unwrap();
    Cluster::start_with(&["--config", config.to_str().unwrap()])
}

fn agent_command(cluster: &Cluster, tag: &str, document: &Path, signature: &Path) -> Command {
    let mut command = agent_base(cluster, tag);
    command
        .arg("--aws-iid-document")
        .arg(document)
        .arg("--aws-iid-signature")
        .arg(signature);
    command
}

/// `mayfly agent run --attestor aws_iid` for agent `tag`, without its evidence flags.
fn agent_base(cluster: &Cluster, tag: &str) -> Command {
    let mut command = Command::new(BIN);
    command
        .args(["agent", "run", "--server"])
        .arg(format!("127.0.0.1:{}", cluster.port))
        .args(["--attestor", "aws_iid"])
        .arg("--trust-bundle")
        .arg(cluster.path("bundle.pem"))
        .arg("--socket")
        .arg(cluster.path(&format!("{tag}.sock")))
        .arg("--data-dir")
        .arg(cluster.path(&format!("{tag}-data")))
        .current_dir(cluster.dir.path())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(
            std::fs::File::create(cluster.path(&format!("{tag}.log"))).expect("agent log file"),
        );
    command
}

/// Starts the cluster's own agent (`agent`) with `document` and `signature`, and waits for
/// its socket: it attested.
fn start_agent(cluster: &mut Cluster, document: &Path, signature: &Path) {
    let child = agent_command(cluster, "agent", document, signature)
        .spawn()
        .expect("spawn mayfly agent run");
    cluster.agent = Some(Proc(child));
    wait_for_path(
        &cluster.socket(),
        Duration::from_secs(30),
        "the aws_iid agent's socket",
    );
    cluster.agent_id = AGENT_ID.to_owned();
}

/// Runs an agent (`tag`) expected to be refused: it must exit with an error, without a
/// socket; returns its log.
fn refused_agent(cluster: &Cluster, tag: &str, document: &Path, signature: &Path) -> String {
    let mut child = Proc(
        agent_command(cluster, tag, document, signature)
            .spawn()
            .expect("spawn mayfly agent run"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the {tag} agent still runs after 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = std::fs::read_to_string(cluster.path(&format!("{tag}.log"))).unwrap_or_default();
    assert!(!status.success(), "the {tag} agent attested: {log}");
    assert!(!cluster.path(&format!("{tag}.sock")).exists());
    log
}

#[test]
fn an_instance_attests_with_its_document_and_serves_its_node_groups_entry() {
    let aws = Aws::new();
    let mut cluster = cluster(&aws);
    let (doc, sig) = aws.sign("good", &document(INSTANCE, Duration::from_secs(60)));
    start_agent(&mut cluster, &doc, &sig);

    let json = |out: String| -> serde_json::Value { serde_json::from_str(&out).expect("json") };
    let shown = json(cluster.ok(&["agent", "show", AGENT_ID, "--output", "json"]));
    assert_eq!(
        shown["agent"]["node_selectors"],
        serde_json::json!([
            "aws_iid:account_id:123456789012",
            "aws_iid:az:us-east-1a",
            "aws_iid:image:id:ami-0abcdef1234567890",
            "aws_iid:instance:id:i-0aa11bb22cc33dd44",
            "aws_iid:region:us-east-1",
        ])
    );

    // A node group of the account's instances in the region, and a workload entry under it.
    cluster.ok(&[
        "entry",
        "create",
        "--node",
        "--spiffe-id",
        GROUP,
        "--selector",
        "aws_iid:account_id:123456789012",
        "--selector",
        "aws_iid:region:us-east-1",
    ]);
    let uid = format!("unix:uid:{}", nix::unistd::getuid().as_raw());
    cluster.ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://mayfly.local/workloads/billing",
        "--parent-id",
        GROUP,
        "--selector",
        &uid,
        "--scope",
        "invoices:read",
    ]);
    let minted = cluster.ok_eventually(&[
        "svid",
        "mint",
        "--task",
        "t-1",
        "--scope",
        "invoices:read",
        "--output",
        "json",
    ]);
    assert!(
        minted.contains("spiffe://mayfly.local/workloads/billing/scope/invoices.read"),
        "{minted}"
    );
    let shown = json(cluster.ok(&["agent", "show", AGENT_ID, "--output", "json"]));
    assert_eq!(shown["node_groups"][0]["spiffe_id"], GROUP);
}

#[test]
fn forged_stale_and_oversized_documents_are_refused_after_a_good_one_attests() {
    let aws = Aws::new();
    let mut cluster = cluster(&aws);
    let (doc, sig) = aws.sign("good", &document(INSTANCE, Duration::from_secs(60)));
    start_agent(&mut cluster, &doc, &sig);
    assert!(cluster.ok(&["agent", "list"]).contains(AGENT_ID));

    // Signed by another certificate's key than the server trusts.
    let other = Aws::new();
    let (doc, sig) = other.sign("other", &document("i-0bb", Duration::from_secs(60)));
    let log = refused_agent(&cluster, "other", &doc, &sig);
    assert!(
        log.contains("does not verify with any configured AWS certificate"),
        "{log}"
    );

    // Evidence for instance X with the signature of instance Y's document.
    let (_, good_sig) = aws.sign("y", &document("i-0cc", Duration::from_secs(60)));
    let (forged, _) = aws.sign("x", &document("i-0dd", Duration::from_secs(60)));
    let log = refused_agent(&cluster, "forged", &forged, &good_sig);
    assert!(log.contains("does not verify"), "{log}");

    // Signed by AWS, but launched longer ago than max_document_age.
    let (doc, sig) = aws.sign("stale", &document("i-0ee", Duration::from_secs(600)));
    let log = refused_agent(&cluster, "stale", &doc, &sig);
    assert!(log.contains("the document is stale"), "{log}");

    // 1 MiB of evidence: the agent refuses to send it.
    let huge = aws.dir.path().join("huge.json");
    std::fs::write(&huge, vec![b' '; 1024 * 1024]).unwrap();
    let log = refused_agent(&cluster, "huge", &huge, &sig);
    assert!(log.contains("over 64 KiB"), "{log}");

    // None of them became an agent.
    let agents = cluster.ok(&["agent", "list"]);
    for refused in ["i-0bb", "i-0dd", "i-0ee"] {
        assert!(!agents.contains(refused), "{agents}");
    }
}

/// A metadata service on 127.0.0.1 speaking IMDSv2 as EC2's does (a session token from
/// `PUT /latest/api/token`, reads without it refused with 401), serving `document` and
/// `signature`. Returns its URL and how many session tokens it handed out.
fn fake_imds(document: String, signature: String) -> (String, Arc<AtomicUsize>) {
    const TOKEN: &str = "AQAEAFake-session-token==";
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let tokens = Arc::new(AtomicUsize::new(0));
    let handed = tokens.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            let mut headers = Vec::new();
            reader.read_line(&mut request).unwrap_or_default();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or_default() == 0 || line == "\r\n" {
                    break;
                }
                headers.push(line.to_ascii_lowercase());
            }
            let has = |h: &str| headers.iter().any(|l| l.starts_with(h));
            let token = headers.iter().any(|l| {
                *l == format!(
                    "x-aws-ec2-metadata-token: {}\r\n",
                    TOKEN.to_ascii_lowercase()
                )
            });
            let (status, body) = match request.split_whitespace().take(2).collect::<Vec<_>>()[..] {
                ["PUT", "/latest/api/token"] if has("x-aws-ec2-metadata-token-ttl-seconds:") => {
                    handed.fetch_add(1, Ordering::SeqCst);
                    ("200 OK", TOKEN.to_owned())
                }
                ["GET", _] if !token => ("401 Unauthorized", String::new()),
                ["GET", "/latest/dynamic/instance-identity/document"] => {
                    ("200 OK", document.clone())
                }
                ["GET", "/latest/dynamic/instance-identity/signature"] => {
                    ("200 OK", signature.clone())
                }
                _ => ("404 Not Found", String::new()),
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (url, tokens)
}

#[test]
fn an_evicted_instance_attests_again_through_imdsv2_by_itself_and_a_banned_one_stays_out() {
    let aws = Aws::new();
    let mut cluster = cluster(&aws);
    let (doc, sig) = aws.sign("imds", &document(INSTANCE, Duration::from_secs(60)));
    let (url, tokens) = fake_imds(
        std::fs::read_to_string(doc).unwrap(),
        std::fs::read_to_string(sig).unwrap(),
    );
    let child = agent_base(&cluster, "agent")
        .args(["--aws-iid-imds-url", &url])
        .spawn()
        .expect("spawn mayfly agent run");
    cluster.agent = Some(Proc(child));
    wait_for_path(
        &cluster.socket(),
        Duration::from_secs(30),
        "the agent's socket",
    );
    cluster.agent_id = AGENT_ID.to_owned();
    assert_eq!(
        tokens.load(Ordering::SeqCst),
        1,
        "one IMDSv2 session for the attestation"
    );
    cluster.create_entry_for_this_process(
        "spiffe://mayfly.local/workloads/billing",
        &["--scope", "invoices:read"],
    );
    let mint =
        |task: &str| cluster.mayfly(&["svid", "mint", "--task", task, "--scope", "invoices:read"]);
    cluster.ok_eventually(&["svid", "mint", "--task", "t-1", "--scope", "invoices:read"]);

    // Evicted, the agent reads its document through IMDSv2 again and comes back by itself.
    cluster.ok(&["agent", "evict", AGENT_ID]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokens.load(Ordering::SeqCst) < 2 {
        assert!(
            Instant::now() < deadline,
            "the agent did not attest again:\n{}",
            cluster.agent_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    cluster.ok_eventually(&["svid", "mint", "--task", "t-2", "--scope", "invoices:read"]);
    assert!(cluster.ok(&["agent", "list"]).contains(AGENT_ID));

    // Banned, the same document brings it nothing.
    cluster.ok(&["agent", "ban", AGENT_ID]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cluster.agent_log().contains("banned") {
        assert!(
            Instant::now() < deadline,
            "the agent did not log its ban:\n{}",
            cluster.agent_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    let out = mint("t-3");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("banned"), "{stderr}");
}
