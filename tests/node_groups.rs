//! Node groups (issue 12, SPIRE's node entries) end to end on a real server: its node API
//! over mTLS on a real socket, its admin API on its Unix socket, its SQLite file.
//!
//! The agents here join with join tokens and speak the node API themselves (as `mayfly agent`
//! does: incremental ListEntries, then IssueTask for an entry). Their node selectors are given
//! through the store, on the server's own SQLite file, with `reattest_agent` — the call the
//! node attestors make when an agent proves x509pop and the like — since those attestors are
//! not wired to the node API on this branch yet. The rest is the server's own path.

mod common;

use std::collections::BTreeSet;

use common::{TestServer, csr, expect_code, task_request};
use mayfly::Selector;
use mayfly::client::AttestedAgent;
use mayfly::proto::admin as admin_pb;
use mayfly::proto::node::{ListEntriesRequest, ListEntriesResponse};
use mayfly::store::Store;
use mayfly::store::sqlite::SqliteStore;
use tonic::Code;

const GROUP: &str = "spiffe://mayfly.local/nodes/web";
const CN_WEB1: &str = "x509pop:subject:cn:web-1";
const CA_FP: &str = "x509pop:ca:fingerprint:00aa";

/// Gives `agent` node selectors as a re-attestation would (keeping its current serial, so its
/// SVID stays good).
async fn give_node_selectors(store: &SqliteStore, agent: &AttestedAgent, selectors: &[&str]) {
    let mut record = store
        .get_agent(&agent.spiffe_id)
        .await
        .unwrap()
        .expect("the agent is stored");
    record.node_selectors = selectors
        .iter()
        .map(|s| Selector::parse(s).unwrap())
        .collect();
    record.attestor = "x509pop".into();
    assert!(store.reattest_agent(&record).await.unwrap());
}

/// What an agent holds after syncing: its entry IDs and the revision it knows.
#[derive(Default)]
struct Synced {
    revision: i64,
    ids: BTreeSet<String>,
}

/// One sync round as an agent does it: every page from its known revision, applied to what
/// it holds (a full answer replaces it; an incremental one adds and removes). Returns whether
/// the round was a full one.
async fn sync(agent: &mut AttestedAgent, held: &mut Synced) -> bool {
    let mut token = String::new();
    let mut full = None;
    loop {
        let page: ListEntriesResponse = agent
            .node
            .list_entries(ListEntriesRequest {
                known_revision: held.revision,
                incremental: true,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .expect("ListEntries")
            .into_inner();
        if full.is_none() && page.full {
            held.ids.clear();
        }
        full.get_or_insert(page.full);
        for id in &page.deleted_entry_ids {
            held.ids.remove(id);
        }
        held.ids.extend(page.entries.iter().map(|e| e.id.clone()));
        held.revision = page.revision;
        if page.next_page_token.is_empty() {
            return full.unwrap_or(false);
        }
        token = page.next_page_token;
    }
}

async fn create(server: &TestServer, request: admin_pb::CreateEntryRequest) -> admin_pb::Entry {
    server.create_entry(request).await.expect("create entry")
}

fn node_entry(spiffe_id: &str, selectors: &[&str]) -> admin_pb::CreateEntryRequest {
    admin_pb::CreateEntryRequest {
        spiffe_id: spiffe_id.into(),
        node: true,
        selectors: selectors.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn workload_entry(name: &str, parent: &str) -> admin_pb::CreateEntryRequest {
    admin_pb::CreateEntryRequest {
        spiffe_id: format!("spiffe://mayfly.local/workloads/{name}"),
        parent_id: parent.into(),
        selectors: vec!["unix:uid:1001".into()],
        scopes: vec!["orders:read".into()],
        ttl_seconds: 300,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_entry_reaches_members_only_and_leaves_with_its_node_entry() {
    let server = TestServer::start().await;
    let store = SqliteStore::open(&server.sqlite_path()).await.unwrap();
    let mut member = server.attest().await;
    let mut outsider = server.attest().await;
    // Both have node selectors; only the member has all of the group's.
    give_node_selectors(&store, &member, &[CN_WEB1, CA_FP]).await;
    give_node_selectors(&store, &outsider, &[CA_FP]).await;

    let node = create(&server, node_entry(GROUP, &[CN_WEB1, CA_FP])).await;
    assert!(node.node, "a node entry is marked as one");
    assert_eq!(node.parent_id, "spiffe://mayfly.local/mayfly/server");
    let shared = create(&server, workload_entry("shop", GROUP)).await;
    let own = create(&server, workload_entry("own", member.spiffe_id.as_str())).await;

    // The member gets its own entry and the group's; the outsider gets neither. Node entries
    // themselves are never sent to an agent.
    let (mut m, mut o) = (Synced::default(), Synced::default());
    sync(&mut member, &mut m).await;
    sync(&mut outsider, &mut o).await;
    assert_eq!(m.ids, BTreeSet::from([shared.id.clone(), own.id.clone()]));
    assert!(o.ids.is_empty(), "{:?}", o.ids);

    // The member can mint from the group's entry; the outsider is refused as for any entry
    // that is not its own.
    let key = csr();
    let issued = member
        .node
        .issue_task(task_request(
            &shared.id,
            &key.csr,
            "t-1",
            &["orders:read"],
            60,
        ))
        .await
        .expect("a member mints from the group's entry")
        .into_inner();
    let svid = issued.svid.expect("an SVID");
    assert_eq!(
        svid.spiffe_id,
        "spiffe://mayfly.local/workloads/shop/scope/orders.read"
    );
    let mark = server.audit_mark().await;
    let refused = outsider
        .node
        .issue_task(task_request(
            &shared.id,
            &key.csr,
            "t-2",
            &["orders:read"],
            60,
        ))
        .await;
    let status = expect_code(refused, Code::PermissionDenied);
    assert!(
        status.message().contains("not registered to this agent"),
        "{status:?}"
    );
    server
        .assert_one_denial(mark, "svid.task", "not registered to this agent")
        .await;

    // A quiet round changes nothing and is incremental.
    let before = m.revision;
    assert!(!sync(&mut member, &mut m).await);
    assert_eq!(m.revision, before);

    // Removing the node entry removes the group's entry from the member's next round (a full
    // one: a group change could add or remove entries the agent has), and minting from it is
    // refused from then on; its own entry stays.
    let mut admin = server.admin();
    admin
        .delete_entry(admin_pb::EntryIdRequest {
            id: node.id.clone(),
        })
        .await
        .expect("delete the node entry");
    assert!(sync(&mut member, &mut m).await, "a full round");
    assert_eq!(m.ids, BTreeSet::from([own.id.clone()]));
    let after = member
        .node
        .issue_task(task_request(
            &shared.id,
            &key.csr,
            "t-3",
            &["orders:read"],
            60,
        ))
        .await;
    expect_code(after, Code::PermissionDenied);

    // After the full round, the member is back to incremental rounds.
    assert!(!sync(&mut member, &mut m).await);

    // The group is defined again, needing only CN_WEB1: the outsider (CA_FP only) is still
    // out. It joins by attesting again with CN_WEB1: its next round is full and brings the
    // group's entry, with no entry written in between.
    create(&server, node_entry(GROUP, &[CN_WEB1])).await;
    sync(&mut outsider, &mut o).await;
    assert!(o.ids.is_empty(), "{:?}", o.ids);
    assert!(!sync(&mut outsider, &mut o).await);
    give_node_selectors(&store, &outsider, &[CA_FP, CN_WEB1]).await;
    assert!(sync(&mut outsider, &mut o).await, "a full round");
    assert_eq!(o.ids, BTreeSet::from([shared.id.clone()]));
    outsider
        .node
        .issue_task(task_request(
            &shared.id,
            &key.csr,
            "t-4",
            &["orders:read"],
            60,
        ))
        .await
        .expect("a new member mints from the group's entry");
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_entries_take_node_selectors_and_workload_entries_workload_ones() {
    let server = TestServer::start().await;
    let store = SqliteStore::open(&server.sqlite_path()).await.unwrap();
    let mut admin = server.admin();
    let count = |s: &SqliteStore| {
        let s = s.clone();
        async move { s.list_entries().await.unwrap().len() }
    };

    // Positive controls: a node entry, and a workload entry under its group.
    create(&server, node_entry(GROUP, &[CN_WEB1])).await;
    create(&server, workload_entry("shop", GROUP)).await;
    assert_eq!(count(&store).await, 2);

    let refusals = [
        (
            node_entry("spiffe://mayfly.local/nodes/db", &["unix:uid:1001"]),
            "a node entry takes only node selectors",
        ),
        (
            admin_pb::CreateEntryRequest {
                selectors: vec![CN_WEB1.into()],
                ..workload_entry("wrong", GROUP)
            },
            "only a node entry may name",
        ),
        (
            admin_pb::CreateEntryRequest {
                scopes: vec!["orders:read".into()],
                ..node_entry("spiffe://mayfly.local/nodes/db", &[CN_WEB1])
            },
            "takes no --scope",
        ),
        (
            admin_pb::CreateEntryRequest {
                parent_id: "spiffe://mayfly.local/mayfly/server".into(),
                ..node_entry("spiffe://mayfly.local/nodes/db", &[CN_WEB1])
            },
            "takes no --parent-id",
        ),
        (
            workload_entry("orphan", "spiffe://mayfly.local/nodes/none"),
            "neither an agent nor a node group",
        ),
        (
            workload_entry("server-child", "spiffe://mayfly.local/mayfly/server"),
            "must be an agent",
        ),
    ];
    for (request, message) in refusals {
        let status = expect_code(admin.create_entry(request).await, Code::InvalidArgument);
        assert!(status.message().contains(message), "{message}: {status:?}");
        assert!(!status.message().contains('\n'), "one sentence: {status:?}");
    }
    assert_eq!(count(&store).await, 2, "nothing was stored");

    // Updates keep to the same rules.
    let node = server
        .entries()
        .await
        .into_iter()
        .find(|e| e.node)
        .expect("the node entry");
    let selectors = |v: &[&str]| {
        Some(admin_pb::StringList {
            values: v.iter().map(|s| s.to_string()).collect(),
        })
    };
    let ok = admin
        .update_entry(admin_pb::UpdateEntryRequest {
            id: node.id.clone(),
            selectors: selectors(&[CN_WEB1, CA_FP]),
            ..Default::default()
        })
        .await
        .expect("a node entry's selectors may change")
        .into_inner();
    assert_eq!(ok.selectors.len(), 2);
    let bad = admin
        .update_entry(admin_pb::UpdateEntryRequest {
            id: node.id.clone(),
            selectors: selectors(&["unix:uid:0"]),
            ..Default::default()
        })
        .await;
    expect_code(bad, Code::InvalidArgument);
    let bad = admin
        .update_entry(admin_pb::UpdateEntryRequest {
            id: node.id.clone(),
            hint: Some("web".into()),
            ..Default::default()
        })
        .await;
    expect_code(bad, Code::InvalidArgument);
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_agent_shows_node_selectors_and_groups() {
    let server = TestServer::start().await;
    let store = SqliteStore::open(&server.sqlite_path()).await.unwrap();
    let agent = server.attest().await;
    create(&server, node_entry(GROUP, &[CN_WEB1])).await;
    create(
        &server,
        node_entry("spiffe://mayfly.local/nodes/db", &[CA_FP]),
    )
    .await;
    let mut admin = server.admin();
    let show = |admin: &mut mayfly::proto::admin::admin_client::AdminClient<_>| {
        let request = admin_pb::AgentIdRequest {
            spiffe_id: agent.spiffe_id.to_string(),
        };
        let mut admin = admin.clone();
        async move {
            admin
                .get_agent(request)
                .await
                .expect("GetAgent")
                .into_inner()
        }
    };

    // A join-token agent: no selectors, no groups.
    let plain = show(&mut admin).await;
    assert!(plain.agent.unwrap().node_selectors.is_empty());
    assert!(plain.node_groups.is_empty());

    give_node_selectors(&store, &agent, &[CN_WEB1]).await;
    let detail = show(&mut admin).await;
    assert_eq!(
        detail.agent.unwrap().node_selectors,
        vec![CN_WEB1.to_owned()]
    );
    let groups: Vec<_> = detail
        .node_groups
        .iter()
        .map(|g| g.spiffe_id.as_str())
        .collect();
    assert_eq!(groups, vec![GROUP]);

    let missing = admin
        .get_agent(admin_pb::AgentIdRequest {
            spiffe_id: "spiffe://mayfly.local/mayfly/agent/join_token/nobody".into(),
        })
        .await;
    expect_code(missing, Code::NotFound);
    store.close().await;
}

/// As an operator and a workload see it, with real processes: `mayfly server run`, `mayfly
/// agent run` (joined by a join token; its node selectors then given through the store as a
/// re-attestation would, see the top of this file), the `mayfly` CLI, and this test process as
/// the workload minting on the agent's socket.
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
