//! Node groups (issue 12) as operators and workloads see them, with real processes: `mayfly
//! server run`, `mayfly agent run`, the `mayfly` CLI, and this test process as the workload
//! minting on an agent's socket. `x509pop_agents_are_grouped_by_what_they_proved` takes the
//! whole path: agents prove openssl-made node certificates and the server stores what they
//! proved; the other test joins its agent by join token and gives it node selectors through
//! the store (`reattest_agent`, as the attest handler stores a proven node) to follow one
//! group entry from creation to withdrawal.

mod common;

use mayfly::Selector;
use mayfly::store::Store;
use mayfly::store::sqlite::SqliteStore;

const GROUP: &str = "spiffe://mayfly.local/nodes/web";
const CN_WEB1: &str = "x509pop:subject:cn:web-1";

/// As an operator and a workload see it, with real processes: `mayfly server run`, `mayfly
/// agent run` (joined by a join token; its node selectors then given through the store as the
/// attest handler would store them, see the top of this file), the `mayfly` CLI, and this test
/// process as the workload minting on the agent's socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_groups_nodes_and_a_real_agent_serves_the_group_entry() {
    use common::cluster::Cluster;
    use std::time::{Duration, Instant};

    let mut cluster = Cluster::start();
    cluster.start_agent();
    let store = SqliteStore::open(&cluster.path(".mayfly/server/mayfly.sqlite"))
        .await
        .unwrap();
    let agent_id = mayfly::id::SpiffeId::parse(&cluster.agent_id).unwrap();
    let mut record = store.get_agent(&agent_id).await.unwrap().expect("attested");
    record.node_selectors = vec![Selector::parse(CN_WEB1).unwrap()];
    assert!(store.reattest_agent(&record).await.unwrap());

    let json = |out: String| -> serde_json::Value { serde_json::from_str(&out).expect("json") };
    let node = json(cluster.ok(&[
        "entry",
        "create",
        "--node",
        "--spiffe-id",
        GROUP,
        "--selector",
        CN_WEB1,
        "--output",
        "json",
    ]));
    assert_eq!(node["node"], true);
    assert_eq!(node["parent_id"], "spiffe://mayfly.local/mayfly/server");
    let uid = format!("unix:uid:{}", nix::unistd::getuid().as_raw());
    let shop = json(cluster.ok(&[
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
        "--output",
        "json",
    ]));
    assert_eq!(shop["node"], false);

    // The agent serves the group's entry: this process mints a task SVID from it.
    let mint = || cluster.mayfly(&["svid", "mint", "--task", "t-1", "--scope", "orders:read"]);
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

    // The operator sees the agent's selectors and groups, and which entries are node entries.
    let shown = json(cluster.ok(&["agent", "show", &cluster.agent_id, "--output", "json"]));
    assert_eq!(
        shown["agent"]["node_selectors"],
        serde_json::json!([CN_WEB1])
    );
    assert_eq!(shown["node_groups"][0]["spiffe_id"], GROUP);
    let text = cluster.ok(&["agent", "show", &cluster.agent_id]);
    assert!(
        text.contains(&format!("Node groups:\n  {GROUP} (node entry ")),
        "{text}"
    );
    let list = cluster.ok(&["entry", "list"]);
    let node_row = list
        .lines()
        .find(|l| l.contains(GROUP) && !l.contains("/workloads/"));
    assert!(node_row.is_some_and(|l| l.contains(" node ")), "{list}");

    // Bad input at the operator's door: one sentence each, nothing stored.
    let before = cluster.ok(&["entry", "list", "--output", "json"]);
    for (args, needle) in [
        (
            vec![
                "--node",
                "--spiffe-id",
                "spiffe://mayfly.local/nodes/db",
                "--selector",
                "unix:uid:0",
            ],
            "a node entry takes only node selectors",
        ),
        (
            vec![
                "--node",
                "--spiffe-id",
                "spiffe://mayfly.local/nodes/db",
                "--selector",
                CN_WEB1,
                "--scope",
                "a:b",
            ],
            "takes no --scope",
        ),
        (
            vec![
                "--spiffe-id",
                "spiffe://mayfly.local/w/x",
                "--parent-id",
                &cluster.agent_id,
                "--selector",
                CN_WEB1,
            ],
            "only a node entry may name",
        ),
    ] {
        let mut full = vec!["entry", "create"];
        full.extend(args);
        let out = cluster.mayfly(&full);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{full:?}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        assert!(err.contains(needle), "{needle}: {err}");
    }
    assert_eq!(cluster.ok(&["entry", "list", "--output", "json"]), before);

    // Deleting the node entry takes the group's entry from the agent within a sync round:
    // minting is refused from then on (the same mint succeeds just before: the control).
    let control = mint();
    assert!(
        control.status.success(),
        "{}",
        String::from_utf8_lossy(&control.stderr)
    );
    cluster.ok(&["entry", "delete", node["id"].as_str().unwrap()]);
    let deleted = Instant::now();
    loop {
        let out = mint();
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("no registration entry matches"), "{err}");
            println!("refused: {}", err.trim());
            break;
        }
        assert!(
            deleted.elapsed() < Duration::from_secs(10),
            "the agent still serves the group's entry"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "group entry withdrawn from the agent {} ms after its node entry was deleted",
        deleted.elapsed().as_millis()
    );
    let shown = json(cluster.ok(&["agent", "show", &cluster.agent_id, "--output", "json"]));
    assert_eq!(shown["node_groups"], serde_json::json!([]));
    store.close().await;
}

/// A node CA and node certificates made by `openssl` in `dir`, as an operator makes them.
struct NodePki {
    dir: std::path::PathBuf,
}

impl NodePki {
    fn openssl(dir: &std::path::Path, args: &[&str]) {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A CA (`node-ca.pem`) with its key.
    fn new(dir: &std::path::Path) -> Self {
        Self::openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "node-ca.key",
                "-out",
                "node-ca.pem",
                "-days",
                "1",
                "-subj",
                "/CN=mayfly test node CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
        std::fs::write(
            dir.join("node.ext"),
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n",
        )
        .unwrap();
        Self {
            dir: dir.to_owned(),
        }
    }

    /// A client-auth node certificate with common name `cn`: `<cn>.pem` and `<cn>.key`.
    fn node(&self, cn: &str) -> (String, String) {
        let (key, csr, cert) = (
            format!("{cn}.key"),
            format!("{cn}.csr"),
            format!("{cn}.pem"),
        );
        let subject = format!("/CN={cn}");
        Self::openssl(
            &self.dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                &subject,
            ],
        );
        Self::openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "node-ca.pem",
                "-CAkey",
                "node-ca.key",
                "-CAcreateserial",
                "-out",
                &cert,
                "-days",
                "1",
                "-extfile",
                "node.ext",
            ],
        );
        let path = |f: &str| self.dir.join(f).display().to_string();
        (path(&cert), path(&key))
    }
}

/// The whole path with real processes and real x509pop attestation: `mayfly server run`
/// trusting an openssl-made node CA, two `mayfly agent run` proving openssl-made node
/// certificates (CN web-1 and db-1), the `mayfly` CLI, and this test process as the workload.
/// The web-1 agent is in the group and serves its entry; the db-1 agent never gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509pop_agents_are_grouped_by_what_they_proved() {
    use common::cluster::{BIN, Cluster, Proc, wait_for_path};
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    let pki_dir = tempfile::tempdir().unwrap();
    let pki = NodePki::new(pki_dir.path());
    let ca = pki_dir.path().join("node-ca.pem").display().to_string();
    let cluster = Cluster::start_with(&["--x509pop-ca-bundle", &ca]);
    let spawn = |tag: &str, (cert, key): (String, String)| {
        let socket = cluster.path(&format!("{tag}.sock"));
        let log = std::fs::File::create(cluster.path(&format!("{tag}.log"))).unwrap();
        let child = Command::new(BIN)
            .args(["agent", "run", "--server"])
            .arg(format!("127.0.0.1:{}", cluster.port))
            .args([
                "--x509pop-cert",
                &cert,
                "--x509pop-key",
                &key,
                "--trust-bundle",
            ])
            .arg(cluster.path("bundle.pem"))
            .arg("--socket")
            .arg(&socket)
            .arg("--data-dir")
            .arg(cluster.path(&format!("{tag}-data")))
            .current_dir(cluster.dir.path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn mayfly agent run");
        wait_for_path(&socket, Duration::from_secs(30), "the agent's socket");
        (Proc(child), format!("unix://{}", socket.display()))
    };
    let (_web, web_socket) = spawn("web", pki.node("web-1"));
    let (_db, db_socket) = spawn("db", pki.node("db-1"));
    let json = |out: String| -> serde_json::Value { serde_json::from_str(&out).expect("json") };

    // Each agent is stored with what it proved.
    let agents = json(cluster.ok(&["agent", "list", "--output", "json"]));
    let by_cn = |cn: &str| {
        agents
            .as_array()
            .unwrap()
            .iter()
            .find(|a| {
                a["node_selectors"]
                    .as_array()
                    .unwrap()
                    .contains(&serde_json::json!(format!("x509pop:subject:cn:{cn}")))
            })
            .unwrap_or_else(|| panic!("no agent proved CN {cn}: {agents}"))["spiffe_id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (web_id, db_id) = (by_cn("web-1"), by_cn("db-1"));
    assert!(
        web_id.starts_with("spiffe://mayfly.local/mayfly/agent/x509pop/"),
        "{web_id}"
    );

    let node = json(cluster.ok(&[
        "entry",
        "create",
        "--node",
        "--spiffe-id",
        GROUP,
        "--selector",
        "x509pop:subject:cn:web-1",
        "--output",
        "json",
    ]));
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
    let mint_on = |socket: &str| {
        Command::new(BIN)
            .args(["svid", "mint", "--task", "t-1", "--scope", "orders:read"])
            .current_dir(cluster.dir.path())
            .env("SPIFFE_ENDPOINT_SOCKET", socket)
            .output()
            .expect("run mayfly svid mint")
    };

    // The member's workload mints from the group's entry.
    let started = Instant::now();
    loop {
        let out = mint_on(&web_socket);
        if out.status.success() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the web-1 agent never served the group's entry: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The other agent got the same sync round, and nothing for this workload.
    let out = mint_on(&db_socket);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no registration entry matches"),
        "{err}"
    );

    let web = json(cluster.ok(&["agent", "show", &web_id, "--output", "json"]));
    assert_eq!(web["node_groups"][0]["spiffe_id"], GROUP);
    assert_eq!(web["node_groups"][0]["id"], node["id"]);
    let db = json(cluster.ok(&["agent", "show", &db_id, "--output", "json"]));
    assert_eq!(db["node_groups"], serde_json::json!([]));
    let selectors = db["agent"]["node_selectors"].as_array().unwrap();
    assert!(
        selectors
            .iter()
            .any(|s| s.as_str().unwrap().starts_with("x509pop:ca:fingerprint:")),
        "{db}"
    );
}
