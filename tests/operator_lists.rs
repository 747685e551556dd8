//! Operator lists, paged and filtered (issue 10, point 6): `mayfly entry list` and
//! `mayfly agent list` as processes of the built binary against a real server's admin socket,
//! with lists longer than one page and larger than gRPC's 4 MiB message limit, and the filters
//! `--parent-id`, `--spiffe-id-prefix` and `--selector`.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Arc;

use common::TestServer;
use common::cluster::BIN;
use mayfly::proto::admin as admin_pb;
use prost::Message as _;
use serde_json::Value;

/// `mayfly <args> --admin-socket <socket>`, run off the async runtime.
async fn mayfly(socket: &PathBuf, args: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).arg("--admin-socket").arg(socket);
    tokio::task::spawn_blocking(move || cmd.output().expect("run mayfly"))
        .await
        .expect("join")
}

/// Runs `mayfly`, requiring success; returns stdout.
async fn ok(socket: &PathBuf, args: &[&str]) -> String {
    let out = mayfly(socket, args).await;
    assert!(
        out.status.success(),
        "mayfly {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

fn socket_of(server: &TestServer) -> PathBuf {
    let socket = server.data_dir().join("admin.sock");
    assert!(socket.exists(), "{}", socket.display());
    socket
}

fn ids_of_json(text: &str) -> Vec<String> {
    let doc: Value = serde_json::from_str(text).expect("one JSON array");
    doc.as_array()
        .expect("an array")
        .iter()
        .map(|e| e["id"].as_str().expect("id").to_owned())
        .collect()
}

/// An entry request: `name` under `/svc/`, parent `parent`, these selectors.
fn request(name: &str, parent: &str, selectors: &[&str]) -> admin_pb::CreateEntryRequest {
    admin_pb::CreateEntryRequest {
        spiffe_id: format!("spiffe://mayfly.local/svc/{name}"),
        parent_id: parent.into(),
        selectors: selectors.iter().map(|s| s.to_string()).collect(),
        ttl_seconds: 300,
        ..Default::default()
    }
}

const SCOPES: [&str; 4] = [
    "stripe:read:customers",
    "stripe:write:refunds",
    "ledger:read:accounts",
    "ledger:write:journal-entries",
];
const DNS: [&str; 5] = [
    "billing.internal.example.com",
    "billing.eu-west-1.example.com",
    "billing.us-east-1.example.com",
    "billing.ap-south-1.example.com",
    "billing.sa-east-1.example.com",
];

const PARENT_A: &str = "spiffe://mayfly.local/mayfly/agent/join_token/node-a";
const PARENT_B: &str = "spiffe://mayfly.local/mayfly/agent/join_token/node-b";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_list_larger_than_one_message_streams_through_the_cli() {
    let server = TestServer::start().await;
    let socket = socket_of(&server);
    // 10,000 entries of about 510 bytes each: over 5 MB as one message, which the old
    // single-answer ListEntries could not send (the client's limit is 4 MiB).
    const N: usize = 10_000;
    let created = Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let mut workers = Vec::new();
    for w in 0..16 {
        let mut admin = server.admin();
        let created = created.clone();
        workers.push(tokio::spawn(async move {
            for n in (w..N).step_by(16) {
                let mut req = request(
                    &format!(
                        "team-payments/eu-west-1/cluster-prod-7/namespace-billing/workload-{n:06}"
                    ),
                    if n % 2 == 0 { PARENT_A } else { PARENT_B },
                    &["unix:uid:1001", "unix:gid:1001"],
                );
                req.scopes = SCOPES.iter().map(|s| s.to_string()).collect();
                req.dns_names = DNS.iter().map(|s| format!("w{n}.{s}")).collect();
                let entry = admin.create_entry(req).await.expect("create").into_inner();
                created.lock().unwrap().insert(entry.id);
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    let created = created.lock().unwrap().clone();
    assert_eq!(created.len(), N);

    let json = ok(&socket, &["entry", "list", "--output", "json"]).await;
    let listed = ids_of_json(&json);
    assert_eq!(listed.len(), N, "every entry");
    assert_eq!(
        listed.iter().cloned().collect::<BTreeSet<_>>(),
        created,
        "each exactly once"
    );
    // What one answer would have weighed.
    let one_message = admin_pb::ListEntriesResponse {
        entries: server.entries().await,
        next_page_token: String::new(),
    }
    .encoded_len();
    assert!(one_message > 4 * 1024 * 1024, "{one_message} bytes");

    // The table: a header and one row per entry, the same entries.
    let text = ok(&socket, &["entry", "list"]).await;
    let mut lines = text.lines();
    assert!(lines.next().unwrap().starts_with("ID "), "a header first");
    let rows: BTreeSet<String> = lines
        .map(|l| l.split_whitespace().next().unwrap().to_owned())
        .collect();
    assert_eq!(rows, created);
    assert_eq!(text.lines().count(), N + 1);

    // The audit log (one record per entry created) streams as well: one header, then the
    // records in order, printed a chunk at a time.
    let audit = ok(&socket, &["audit", "list"]).await;
    let mut lines = audit.lines();
    assert!(lines.next().unwrap().starts_with("SEQ "), "a header first");
    let seqs: Vec<String> = lines
        .map(|l| l.split_whitespace().next().unwrap().to_owned())
        .collect();
    let expected: Vec<String> = (1..=N).map(|n| format!("#{n}")).collect();
    assert_eq!(seqs, expected);
    let json = ok(&socket, &["audit", "list", "--output", "json"]).await;
    assert_eq!(json.lines().count(), N, "one JSON record a line");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn small_pages_and_filters_through_the_cli() {
    let server = TestServer::start().await;
    let socket = socket_of(&server);
    let mut admin = server.admin();
    let mut create = async |req: admin_pb::CreateEntryRequest| {
        admin
            .create_entry(req)
            .await
            .expect("create")
            .into_inner()
            .id
    };
    // Five entries share one SPIFFE ID: pages of 2 split that run.
    let mut same = Vec::new();
    for uid in 0..5 {
        same.push(create(request("same", PARENT_A, &[&format!("unix:uid:{uid}")])).await);
    }
    let web = create(request("web", PARENT_A, &["unix:uid:80", "unix:gid:33"])).await;
    let web_b = create(request("web-b", PARENT_B, &["unix:uid:80"])).await;
    let db = create(request("db", PARENT_B, &["unix:uid:5432", "unix:gid:33"])).await;

    let list = async |extra: &[&str]| {
        let mut args = vec!["entry", "list", "--output", "json"];
        args.extend_from_slice(extra);
        ids_of_json(&ok(&socket, &args).await)
    };
    let set = |ids: &[&String]| ids.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();

    let all = list(&[]).await;
    assert_eq!(all.len(), 8);
    for size in ["1", "2", "3"] {
        assert_eq!(list(&["--page-size", size]).await, all, "pages of {size}");
    }

    // Each filter, with a value that matches and one that does not.
    let parent_b = list(&["--parent-id", PARENT_B]).await;
    assert_eq!(
        set(&parent_b.iter().collect::<Vec<_>>()),
        set(&[&web_b, &db])
    );
    let nobody = "spiffe://mayfly.local/mayfly/agent/join_token/nobody";
    assert!(list(&["--parent-id", nobody]).await.is_empty());

    let webs = list(&["--spiffe-id-prefix", "spiffe://mayfly.local/svc/web"]).await;
    assert_eq!(set(&webs.iter().collect::<Vec<_>>()), set(&[&web, &web_b]));
    assert!(
        list(&["--spiffe-id-prefix", "spiffe://mayfly.local/other/"])
            .await
            .is_empty()
    );

    let gid = list(&["--selector", "unix:gid:33"]).await;
    assert_eq!(set(&gid.iter().collect::<Vec<_>>()), set(&[&web, &db]));
    let both = list(&["--selector", "unix:gid:33", "--selector", "unix:uid:80"]).await;
    assert_eq!(both, vec![web.clone()]);
    assert!(
        list(&["--selector", "unix:gid:33", "--selector", "unix:uid:0"])
            .await
            .is_empty()
    );
    let combined = list(&[
        "--parent-id",
        PARENT_A,
        "--spiffe-id-prefix",
        "spiffe://mayfly.local/svc/same",
        "--selector",
        "unix:uid:3",
        "--page-size",
        "1",
    ])
    .await;
    assert_eq!(combined, vec![same[3].clone()]);

    // Empty results print what they always did.
    let none = ok(&socket, &["entry", "list", "--parent-id", nobody]).await;
    assert_eq!(none, "no entries\n");
    let none = ok(
        &socket,
        &["entry", "list", "--parent-id", nobody, "--output", "json"],
    )
    .await;
    assert_eq!(none, "[]\n");
    // A small JSON list is byte for byte what serde_json prints for the array.
    let json = ok(
        &socket,
        &["entry", "list", "--output", "json", "--page-size", "3"],
    )
    .await;
    assert_eq!(
        json,
        format!(
            "{}\n",
            serde_json::to_string_pretty(&server.entries().await).unwrap()
        )
    );

    // Bad filter values: one sentence naming the flag, non-zero exit, nothing on stdout.
    for (flag, value) in [
        ("--parent-id", "node-a"),
        ("--spiffe-id-prefix", "mayfly.local/svc"),
        ("--selector", "uid:80"),
    ] {
        let out = mayfly(&socket, &["entry", "list", flag, value]).await;
        assert!(!out.status.success(), "{flag} {value}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains(flag), "{err}");
        assert!(out.stdout.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_are_listed_a_page_at_a_time() {
    let server = TestServer::start().await;
    let socket = socket_of(&server);
    let mut ids = BTreeSet::new();
    for _ in 0..3 {
        ids.insert(server.attest().await.spiffe_id.to_string());
    }
    let mut admin = server.admin();
    let mut request = admin_pb::ListAgentsRequest {
        page_size: 1,
        ..Default::default()
    };
    let mut seen = Vec::new();
    loop {
        let page = admin
            .list_agents(request.clone())
            .await
            .unwrap()
            .into_inner();
        assert!(page.agents.len() <= 1);
        seen.extend(page.agents.into_iter().map(|a| a.spiffe_id));
        if page.next_page_token.is_empty() {
            break;
        }
        request.page_token = page.next_page_token;
    }
    assert_eq!(seen.len(), 3);
    assert_eq!(seen.iter().cloned().collect::<BTreeSet<_>>(), ids);

    let json: Value =
        serde_json::from_str(&ok(&socket, &["agent", "list", "--output", "json"]).await).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 3);
    let text = ok(&socket, &["agent", "list"]).await;
    assert_eq!(text.lines().count(), 4, "{text}");

    // A page token this server never gave is refused in one sentence.
    let err = admin
        .list_agents(admin_pb::ListAgentsRequest {
            page_token: "not-a-token".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("not one this server gave"),
        "{err:?}"
    );
}
