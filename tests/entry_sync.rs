//! Entry sync at scale (issue 10), as real processes: `mayfly server run`, `mayfly agent run`
//! and this test as the workload on the agent's socket.
//!
//! Figures (time to serve, propagation, pages and bytes) are printed; run with `--nocapture`
//! (nextest: `--no-capture`) to see them.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::{TestServer, entry_request};
use futures::StreamExt;
use mayfly::proto::admin as admin_pb;
use mayfly::proto::node::ListEntriesRequest;
use mayfly::proto::workload::{X509svidRequest, X509svidResponse};
use mayfly::workload_client;
use prost::Message as _;

const TD: &str = "spiffe://mayfly.local";
/// Identity SVIDs live an hour, so none rotates during a test.
const TTL_SECS: u32 = 3600;
/// The most a new or deleted entry may take to reach the workload's stream.
const PROPAGATION: Duration = Duration::from_secs(1);

/// The selectors this test process has (uid and gid), so entries with them are its own.
fn my_selectors() -> Vec<String> {
    vec![
        format!("unix:uid:{}", nix::unistd::getuid()),
        format!("unix:gid:{}", nix::unistd::getgid()),
    ]
}

fn admin_socket(cluster: &Cluster) -> PathBuf {
    cluster.path(".mayfly/server/admin.sock")
}

/// Creates entries `prefix/w-00000`… under `parent` over the admin API, 16 in flight, each with
/// 3 scopes and 2 selectors no process of this test has; returns their IDs.
async fn create_many(cluster: &Cluster, parent: &str, prefix: &str, n: usize) -> Vec<String> {
    let admin = mayfly::client::connect_admin(&admin_socket(cluster))
        .await
        .expect("admin socket");
    futures::stream::iter(0..n)
        .map(|i| {
            let mut admin = admin.clone();
            let request = admin_pb::CreateEntryRequest {
                spiffe_id: format!("{TD}/{prefix}/w-{i:05}"),
                parent_id: parent.to_owned(),
                selectors: vec![
                    format!("unix:uid:{}", 20_000 + i),
                    format!("unix:gid:{}", 20_000 + i),
                ],
                scopes: vec![
                    "inventory:read:items".into(),
                    "inventory:write:items".into(),
                    "inventory:list:items".into(),
                ],
                ttl_seconds: TTL_SECS,
                dns_names: Vec::new(),
                ..Default::default()
            };
            async move { admin.create_entry(request).await }
        })
        .buffer_unordered(16)
        .map(|r| r.expect("create entry").into_inner().id)
        .collect()
        .await
}

/// An entry for this test process under the cluster's agent; returns its ID.
fn create_mine(cluster: &Cluster, spiffe_id: &str) -> String {
    let mut args = Vec::new();
    for s in my_selectors() {
        args.push("--selector".to_owned());
        args.push(s);
    }
    args.extend(["--ttl".to_owned(), "1h".to_owned()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    cluster.create_entry(spiffe_id, &args)
}

/// A FetchX509SVID stream from this process, or why there is none (no socket yet, or no
/// identity for this process yet).
async fn svid_stream(socket: &Path) -> Result<tonic::Streaming<X509svidResponse>, String> {
    let channel = workload_client::connect(socket)
        .await
        .map_err(|e| e.to_string())?;
    Ok(workload_client::workload_api(channel)
        .fetch_x509svid(X509svidRequest {})
        .await
        .map_err(|s| s.to_string())?
        .into_inner())
}

/// Waits (up to `limit`) for a stream message whose SPIFFE IDs satisfy `done`; returns them.
async fn wait_for(
    stream: &mut tonic::Streaming<X509svidResponse>,
    limit: Duration,
    done: impl Fn(&BTreeSet<String>) -> bool,
) -> BTreeSet<String> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let message = tokio::time::timeout_at(deadline, stream.message())
            .await
            .expect("the stream brought no such message in time")
            .expect("the stream failed")
            .expect("the stream ended");
        let ids: BTreeSet<String> = message.svids.into_iter().map(|s| s.spiffe_id).collect();
        if done(&ids) {
            return ids;
        }
    }
}

/// Waits (up to `limit`) until the agent serves this process `id`, retrying while it has no
/// identity for it yet (the stream then ends with PermissionDenied).
async fn wait_served(
    socket: &Path,
    id: &str,
    limit: Duration,
) -> tonic::Streaming<X509svidResponse> {
    let deadline = Instant::now() + limit;
    loop {
        let answer = match svid_stream(socket).await {
            Ok(mut stream) => {
                match tokio::time::timeout(Duration::from_secs(5), stream.message()).await {
                    Ok(Ok(Some(m))) if m.svids.iter().any(|s| s.spiffe_id == id) => {
                        return stream;
                    }
                    other => format!("{other:?}"),
                }
            }
            Err(e) => e,
        };
        assert!(
            Instant::now() < deadline,
            "the agent never served {id}: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One "synced entries" line of an agent's log.
#[derive(Debug, Clone, Copy, Default)]
struct Synced {
    full: bool,
    pages: u64,
    bytes: u64,
    entries: u64,
    deleted: u64,
}

/// The "synced entries" lines of the log at `path`.
fn synced(path: &Path) -> Vec<Synced> {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    log.lines()
        .filter(|l| l.contains("synced entries"))
        .map(|line| {
            let field = |name: &str| -> u64 {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(&format!("{name}=")))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            Synced {
                full: line.contains("full=true"),
                pages: field("pages"),
                bytes: field("bytes"),
                entries: field("entries"),
                deleted: field("deleted"),
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn five_thousand_entries_sync_in_pages_and_changes_reach_the_workload_within_a_second() {
    let mut cluster = Cluster::start();
    let agent_id = cluster.agent_id.clone();
    let started = Instant::now();
    create_many(&cluster, &agent_id, "scale", 5_000).await;
    println!("created 5,000 entries in {:?}", started.elapsed());
    let mine = format!("{TD}/sync/me");
    create_mine(&cluster, &mine);

    let started = Instant::now();
    cluster.start_agent();
    let mut stream = wait_served(&cluster.socket(), &mine, Duration::from_secs(600)).await;
    println!(
        "agent synced 5,001 entries and served the workload in {:?}",
        started.elapsed()
    );
    let first = synced(&cluster.path("agent.log"))[0];
    println!("first sync: {first:?}");
    assert!(first.full, "{first:?}");
    assert_eq!(first.entries, 5_001, "{first:?}");
    assert!(first.pages > 1, "paged: {first:?}");
    assert!(
        first.bytes / first.pages < 48 * 1024 + 1024,
        "pages stay under the page budget: {first:?}"
    );

    // A new entry reaches the open stream; a deleted one leaves it.
    let new = format!("{TD}/sync/me-new");
    let started = Instant::now();
    let new_entry = create_mine(&cluster, &new);
    wait_for(&mut stream, Duration::from_secs(30), |ids| {
        ids.contains(&new)
    })
    .await;
    let created_in = started.elapsed();
    let started = Instant::now();
    cluster.ok(&["entry", "delete", &new_entry]);
    let left = wait_for(&mut stream, Duration::from_secs(30), |ids| {
        !ids.contains(&new)
    })
    .await;
    let deleted_in = started.elapsed();
    println!("propagation to the workload stream: created {created_in:?}, deleted {deleted_in:?}");
    assert!(left.contains(&mine), "the other entry stays: {left:?}");
    assert!(created_in < PROPAGATION, "a new entry took {created_in:?}");
    assert!(
        deleted_in < PROPAGATION,
        "a deleted entry took {deleted_in:?}"
    );
    // The changes came as changes, not as the whole list again.
    let later = &synced(&cluster.path("agent.log"))[1..];
    assert!(!later.is_empty());
    assert!(
        later.iter().all(|s| !s.full && s.entries + s.deleted <= 1),
        "{later:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_for_one_agent_is_not_downloaded_by_another() {
    let mut cluster = Cluster::start();
    cluster.start_agent();
    let (token_b, agent_b) = cluster.new_token();
    let _b = cluster.spawn_agent("agent-b", &token_b);
    let (log_a, log_b) = (cluster.path("agent.log"), cluster.path("agent-b.log"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while synced(&log_a).is_empty() || synced(&log_b).is_empty() {
        assert!(Instant::now() < deadline, "the agents never synced");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (before_a, before_b) = (synced(&log_a).len(), synced(&log_b).len());

    let agent_a = cluster.agent_id.clone();
    let started = Instant::now();
    create_many(&cluster, &agent_a, "burst", 1_000).await;
    let deadline = Instant::now() + Duration::from_secs(300);
    let burst_a = loop {
        let burst: Vec<Synced> = synced(&log_a).split_off(before_a);
        if burst.iter().map(|s| s.entries).sum::<u64>() >= 1_000 {
            break burst;
        }
        assert!(Instant::now() < deadline, "agent A never got the burst");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "burst of 1,000 entries for agent A: A synced them in {:?} over {} rounds, {} pages, {} bytes",
        started.elapsed(),
        burst_a.len(),
        burst_a.iter().map(|s| s.pages).sum::<u64>(),
        burst_a.iter().map(|s| s.bytes).sum::<u64>(),
    );
    assert!(
        burst_a.iter().all(|s| !s.full),
        "A got changes only: {burst_a:?}"
    );
    // Give B every chance to re-download, then count.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let burst_b: Vec<Synced> = synced(&log_b).split_off(before_b);
    println!(
        "agent B during the burst: {} rounds with entries",
        burst_b.len()
    );
    assert!(burst_b.is_empty(), "agent B downloaded: {burst_b:?}");

    // Positive control: B gets its own entry, alone.
    create_many(&cluster, &agent_b, "for-b", 1).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let got = loop {
        let got: Vec<Synced> = synced(&log_b).split_off(before_b);
        if !got.is_empty() {
            break got;
        }
        assert!(Instant::now() < deadline, "agent B never got its entry");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(
        !got[0].full && got[0].entries == 1 && got[0].pages == 1,
        "{got:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreadable_or_oversized_entry_is_skipped_and_the_others_sync() {
    let mut cluster = Cluster::start();
    let agent_id = cluster.agent_id.clone();
    let mine = format!("{TD}/sync/fine");
    create_mine(&cluster, &mine);
    let ids = create_many(&cluster, &agent_id, "broken", 3).await;
    let (unreadable, oversized) = (&ids[0], &ids[1]);
    // Edit the server's SQLite file directly, as a damaged or hand-edited store would be.
    let db = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}",
        cluster.path(".mayfly/server/mayfly.sqlite").display()
    ))
    .await
    .expect("open the server's SQLite file");
    sqlx::query("UPDATE entries SET selectors = '[\"unix:pid:1\"]' WHERE id = $1")
        .bind(unreadable)
        .execute(&db)
        .await
        .expect("break an entry");
    let names: Vec<String> = (0..3_000)
        .map(|i| format!("name-{i:05}.example.test"))
        .collect();
    sqlx::query("UPDATE entries SET dns_names = $1 WHERE id = $2")
        .bind(serde_json::to_string(&names).unwrap())
        .bind(oversized)
        .execute(&db)
        .await
        .expect("grow an entry");
    db.close().await;

    cluster.start_agent();
    // Positive control on the same store: the readable entries sync and are served.
    wait_served(&cluster.socket(), &mine, Duration::from_secs(60)).await;
    let first = synced(&cluster.path("agent.log"))[0];
    assert_eq!(
        first.entries, 2,
        "the fine entry and the third one: {first:?}"
    );
    let agent_log = cluster.agent_log();
    let server_log = std::fs::read_to_string(cluster.path("server.log")).unwrap_or_default();
    for id in [unreadable, oversized] {
        assert!(
            agent_log.contains(id.as_str()),
            "agent log names {id}: {agent_log}"
        );
        assert!(
            server_log.contains(id.as_str()),
            "server log names {id}: {server_log}"
        );
    }
    assert!(
        server_log.contains("more than a sync page carries"),
        "{server_log}"
    );
    assert!(
        server_log.contains("stored data is corrupt"),
        "{server_log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_entry_created_on_one_server_reaches_an_agent_on_another() {
    let Some(mut cluster) = common::ha::HaCluster::start(2).await else {
        eprintln!("skipped: set MAYFLY_TEST_POSTGRES_URL to run the PostgreSQL tests");
        return;
    };
    cluster.start_agent(&[1]);
    let selectors: Vec<String> = my_selectors()
        .into_iter()
        .flat_map(|s| ["--selector".to_owned(), s])
        .chain(["--ttl".to_owned(), "1h".to_owned()])
        .collect();
    let selectors: Vec<&str> = selectors.iter().map(String::as_str).collect();
    let base = format!("{TD}/sync/base");
    cluster.create_entry(1, &base, &selectors);
    let mut stream = wait_served(&cluster.socket(), &base, Duration::from_secs(60)).await;
    let new = format!("{TD}/sync/from-server-0");
    let started = Instant::now();
    cluster.create_entry(0, &new, &selectors);
    wait_for(&mut stream, Duration::from_secs(30), |ids| {
        ids.contains(&new)
    })
    .await;
    let took = started.elapsed();
    println!(
        "an entry created on server 0 reached the workload of an agent on server 1 in {took:?}"
    );
    // Another server sees the change by polling the revision every 200 ms.
    assert!(took < Duration::from_secs(5), "{took:?}");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_node_api_pages_sends_changes_only_holds_and_refuses_a_forged_token() {
    let server = TestServer::start().await;
    let agent = server.attest().await;
    let other = server.attest().await;
    let mut node = agent.node.clone();
    let parent = agent.spiffe_id.to_string();
    for _ in 0..600 {
        server.create_entry(entry_request(&parent)).await.unwrap();
    }
    let (_, bundle) = server.bundle_der().await;
    let digest = mayfly::wire::bundle_digest(&bundle);

    // A full pass, in pages under the client's 64 KiB limit; the bundle on the first only.
    let mut request = ListEntriesRequest {
        incremental: true,
        ..Default::default()
    };
    let mut ids = BTreeSet::new();
    let mut pages = 0;
    let revision = loop {
        let page = node
            .list_entries(request.clone())
            .await
            .unwrap()
            .into_inner();
        assert!(page.incremental && page.full && !page.unchanged);
        assert!(page.encoded_len() <= 48 * 1024, "{}", page.encoded_len());
        assert_eq!(page.bundle.is_empty(), pages > 0, "the bundle comes once");
        pages += 1;
        ids.extend(page.entries.into_iter().map(|e| e.id));
        if page.next_page_token.is_empty() {
            break page.revision;
        }
        request.page_token = page.next_page_token;
    };
    assert!(pages > 1);
    assert_eq!(ids.len(), 600);

    // A token the server did not hand out is refused.
    request.page_token = "garbage".into();
    let refused = node.list_entries(request).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");

    // Up to date, with the bundle's digest: held for the wait asked, then "unchanged", no bundle.
    let current = ListEntriesRequest {
        known_revision: revision,
        incremental: true,
        bundle_sha256: digest.clone(),
        wait_ms: 400,
        ..Default::default()
    };
    let started = Instant::now();
    let same = node
        .list_entries(current.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(started.elapsed() >= Duration::from_millis(350), "held");
    assert!(same.unchanged && same.entries.is_empty() && same.bundle.is_empty());
    // Positive control: without the digest the bundle comes.
    let without = ListEntriesRequest {
        bundle_sha256: Vec::new(),
        wait_ms: 0,
        ..current.clone()
    };
    assert_eq!(
        node.list_entries(without)
            .await
            .unwrap()
            .into_inner()
            .bundle,
        bundle
    );

    // Another agent's new entry does not answer this agent's held call...
    server
        .create_entry(entry_request(other.spiffe_id.as_str()))
        .await
        .unwrap();
    let quiet = node
        .list_entries(current.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(quiet.unchanged, "{quiet:?}");
    assert_eq!(quiet.revision, revision + 1, "but moves its revision on");

    // ...its own does, at once, with that entry alone.
    let held = ListEntriesRequest {
        known_revision: quiet.revision,
        wait_ms: 20_000,
        ..current
    };
    let call = tokio::spawn({
        let (mut node, held) = (node.clone(), held.clone());
        async move { node.list_entries(held).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let created = server.create_entry(entry_request(&parent)).await.unwrap();
    let started = Instant::now();
    let change = call.await.unwrap().unwrap().into_inner();
    println!(
        "a held call answered {:?} after the entry was created",
        started.elapsed()
    );
    assert!(!change.full && !change.unchanged);
    assert_eq!(change.entries.len(), 1);
    assert_eq!(change.entries[0].id, created.id);
    assert!(started.elapsed() < Duration::from_secs(10));

    // A deletion comes as its ID.
    let mut admin = server.admin();
    admin
        .delete_entry(admin_pb::EntryIdRequest {
            id: created.id.clone(),
        })
        .await
        .unwrap();
    let after = ListEntriesRequest {
        known_revision: change.revision,
        wait_ms: 5_000,
        ..held
    };
    let gone = node.list_entries(after).await.unwrap().into_inner();
    assert_eq!(gone.deleted_entry_ids, vec![created.id]);
    assert!(gone.entries.is_empty());
}

/// A held sync call does not delay the agent's stop: after SIGTERM the agent exits well before
/// the server would end the hold (25 s). The same agent served its workload just before, and
/// has had time to enter its next, held, call.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_waiting_in_a_held_sync_call_stops_at_once() {
    let mut cluster = Cluster::start();
    let mine = format!("{TD}/sync/stopping");
    create_mine(&cluster, &mine);
    cluster.start_agent();
    let stream = wait_served(&cluster.socket(), &mine, Duration::from_secs(60)).await;
    drop(stream);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut agent = cluster.agent.take().expect("the agent runs");
    let started = Instant::now();
    let status = agent.stop();
    let took = started.elapsed();
    assert!(status.success(), "{status:?}: {}", cluster.agent_log());
    assert!(
        took < Duration::from_secs(10),
        "the agent took {took:?} to stop"
    );
}
