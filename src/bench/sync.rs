//! The entry-sync benchmark behind `mayfly bench sync` (issue 10): what one agent's entry list
//! costs the server, and how fast a new or deleted entry reaches many workload streams.
//!
//! `mayfly server run` and `mayfly agent run` are child processes (SQLite, `synchronous=FULL`).
//! Two agents get N entries each (3 scopes, 2 selectors; default 5,000): the real agent, and a
//! client in this process attested with a join token of its own, which pages through its whole
//! list over the node API again and again while the server's CPU time is read from /proc: the
//! server's CPU per entry of a full list (goal ≤ 10 µs in release). Then W workloads (default
//! 1,000) hold FetchX509SVID streams on the agent, and each round an entry for them is created
//! (the time from the admin API's answer to each stream's message carrying it) and deleted (to
//! each stream's message without it): p50/p99 over all streams and rounds.

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use mayfly::proto::admin as admin_pb;
use mayfly::proto::node as node_pb;
use mayfly::proto::workload::X509svidRequest;
use mayfly::workload_client as wc;
use serde::Serialize;
use tokio::sync::mpsc;

use super::agent::{AgentBenchError, Latency, TTL_SECS, invalid, met, status_text};
use super::deploy::{Deployment, Layout, create_entry};
use super::{admin_err, pid_cpu_secs};

/// The goal for the server's CPU per entry of a full list, µs.
const GOAL_US_PER_ENTRY: f64 = 10.0;
/// How long one phase (streams opening, a change reaching every stream) may take.
const PHASE_TIMEOUT: Duration = Duration::from_secs(120);

/// What to run.
#[derive(Debug, Clone)]
pub struct SyncBenchOptions {
    /// Entries per agent (default 5,000).
    pub entries: usize,
    /// Workload streams held on the agent (default 1,000).
    pub streams: usize,
    /// Entries created and deleted while the streams are held (default 5).
    pub rounds: usize,
    /// Full lists read for the server's CPU figure (default 20).
    pub list_passes: usize,
    /// The `mayfly` executable for server and agent; this one when `None`.
    pub exe: Option<PathBuf>,
}

impl Default for SyncBenchOptions {
    fn default() -> Self {
        Self {
            entries: 5_000,
            streams: 1_000,
            rounds: 5,
            list_passes: 20,
            exe: None,
        }
    }
}

/// What one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct SyncBenchReport {
    /// Entries per agent.
    pub entries: usize,
    /// Pages and encoded bytes of one full list.
    pub pages_per_list: u32,
    /// Bytes of one full list.
    pub bytes_per_list: usize,
    /// Server CPU per entry of a full list, µs (from /proc, 10 ms ticks over every pass).
    pub server_cpu_us_per_entry: f64,
    /// Wall time per entry of a full list as this client saw it (decoding included), µs.
    pub wall_us_per_entry: f64,
    /// From the agent's start to its first workload served (its first sync and an SVID for
    /// every entry), s.
    pub agent_ready_secs: f64,
    /// Streams held.
    pub streams: usize,
    /// Entry created to each stream's message carrying it.
    pub created: Latency,
    /// Entry deleted to each stream's message without it.
    pub deleted: Latency,
}

impl fmt::Display for SyncBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "mayfly bench sync: {} entries per agent, {} workload streams, server and agent as processes (SQLite)",
            self.entries, self.streams
        )?;
        writeln!(
            f,
            "  full list:   {} pages, {} bytes; server CPU {:.2} µs per entry, client wall {:.2} µs per entry",
            self.pages_per_list,
            self.bytes_per_list,
            self.server_cpu_us_per_entry,
            self.wall_us_per_entry
        )?;
        writeln!(
            f,
            "  agent ready: {:.1} s (first sync and an identity SVID per entry)",
            self.agent_ready_secs
        )?;
        writeln!(f, "  created:     {}", self.created)?;
        writeln!(f, "  deleted:     {}", self.deleted)?;
        write!(
            f,
            "goal: server CPU <= {GOAL_US_PER_ENTRY:.0} µs per entry of a full list: {}",
            met(self.server_cpu_us_per_entry <= GOAL_US_PER_ENTRY)
        )
    }
}

/// Runs the benchmark.
///
/// # Errors
/// [`AgentBenchError`] when the deployment cannot be set up, a change does not reach every
/// stream in time, or a process dies.
pub async fn sync_benchmark(opts: SyncBenchOptions) -> Result<SyncBenchReport, AgentBenchError> {
    if opts.entries == 0 || opts.streams == 0 || opts.rounds == 0 || opts.list_passes == 0 {
        return Err(invalid(
            "--entries, --streams, --rounds and --list-passes must each be at least 1",
        ));
    }
    let mut deployment = Deployment::start(Layout::Processes, opts.exe.as_deref()).await?;
    let result = run(&mut deployment, &opts).await;
    deployment.stop().await;
    result
}

async fn run(
    deployment: &mut Deployment,
    opts: &SyncBenchOptions,
) -> Result<SyncBenchReport, AgentBenchError> {
    let server_pid = deployment
        .server_pid()
        .ok_or_else(|| AgentBenchError::Stalled("the server is not a process".into()))?;
    // The list reader: an agent of its own, attested in this process.
    let token = deployment
        .admin
        .create_join_token(admin_pb::CreateJoinTokenRequest { ttl_seconds: 0 })
        .await
        .map_err(admin_err("create a join token"))?
        .into_inner();
    let bundles = mayfly::client::bundle_map(&deployment.td, &deployment.bundle);
    let server_id = mayfly::wire::server_id(&deployment.td);
    let reader = mayfly::client::attest_with_join_token(
        deployment.node_addr,
        bundles,
        &server_id,
        &token.token,
    )
    .await
    .map_err(|e| AgentBenchError::Stalled(format!("the list reader could not attest: {e}")))?;
    let agent_id = deployment.agent_id.clone();
    for parent in [reader.spiffe_id.to_string(), agent_id.clone()] {
        create_entries(deployment, &parent, opts.entries).await?;
    }

    let mut node = reader.node.clone();
    // The bundle digest covers the JWT keys too: learn them once, as an agent does at its
    // first sync, so the measured passes are not sent the bundle.
    let jwt_keys = node
        .list_entries(node_pb::ListEntriesRequest {
            incremental: true,
            ..Default::default()
        })
        .await
        .map_err(|e| AgentBenchError::Stalled(format!("the first list failed: {}", e.message())))?
        .into_inner()
        .jwt_keys;
    let digest = mayfly::wire::bundle_digest(&deployment.bundle, &jwt_keys);
    let (mut pages, mut bytes) = (0, 0);
    let cpu_before = pid_cpu_secs(server_pid);
    let started = Instant::now();
    for _ in 0..opts.list_passes {
        (pages, bytes) = full_list(&mut node, &digest, opts.entries).await?;
    }
    let wall = started.elapsed();
    let cpu = pid_cpu_secs(server_pid)
        .zip(cpu_before)
        .map_or(0.0, |(b, a)| b - a);
    let listed = (opts.entries * opts.list_passes) as f64;

    let started = Instant::now();
    let agent = deployment.start_agent().await?;
    let agent_ready_secs = started.elapsed().as_secs_f64();
    let result = propagation(deployment, opts).await;
    agent.stop().await;
    let (created, deleted) = result?;
    Ok(SyncBenchReport {
        entries: opts.entries,
        pages_per_list: pages,
        bytes_per_list: bytes,
        server_cpu_us_per_entry: cpu * 1e6 / listed,
        wall_us_per_entry: wall.as_secs_f64() * 1e6 / listed,
        agent_ready_secs,
        streams: opts.streams,
        created: Latency::of(created),
        deleted: Latency::of(deleted),
    })
}

/// Creates `n` entries under `parent`, 64 in flight, none of them for this process.
async fn create_entries(
    deployment: &Deployment,
    parent: &str,
    n: usize,
) -> Result<(), AgentBenchError> {
    let td = deployment.td.clone();
    let mut creates = futures::stream::iter(0..n)
        .map(|i| {
            let mut admin = deployment.admin.clone();
            let request = admin_pb::CreateEntryRequest {
                spiffe_id: format!("spiffe://{td}/bench/sync/w-{i:06}"),
                parent_id: parent.to_owned(),
                selectors: vec![
                    format!("unix:uid:{}", 100_000 + i),
                    format!("unix:gid:{}", 100_000 + i),
                ],
                scopes: vec![
                    "bench:read:items".into(),
                    "bench:write:items".into(),
                    "bench:list:items".into(),
                ],
                ttl_seconds: TTL_SECS,
                dns_names: Vec::new(),
                ..Default::default()
            };
            async move { admin.create_entry(request).await }
        })
        .buffer_unordered(64);
    while let Some(done) = creates.next().await {
        done.map_err(admin_err("create an entry"))?;
    }
    Ok(())
}

/// Pages through the reader's whole list once; its pages and bytes.
async fn full_list(
    node: &mut mayfly::proto::node::node_client::NodeClient<tonic::transport::Channel>,
    digest: &[u8],
    expected: usize,
) -> Result<(u32, usize), AgentBenchError> {
    use prost::Message as _;
    let mut request = node_pb::ListEntriesRequest {
        incremental: true,
        bundle_sha256: digest.to_vec(),
        ..Default::default()
    };
    let (mut pages, mut bytes, mut entries) = (0, 0, 0);
    loop {
        let answer = node
            .list_entries(request.clone())
            .await
            .map_err(|s| AgentBenchError::Stalled(format!("ListEntries: {}", status_text(&s))))?
            .into_inner();
        pages += 1;
        bytes += answer.encoded_len();
        entries += answer.entries.len();
        if answer.next_page_token.is_empty() {
            break;
        }
        request.page_token = answer.next_page_token;
    }
    if entries != expected {
        return Err(AgentBenchError::Stalled(format!(
            "a full list held {entries} entries, not {expected}"
        )));
    }
    Ok((pages, bytes))
}

/// One stream's message: which stream, when, and the SPIFFE IDs it carried.
type Arrival = (usize, Instant, HashSet<String>);

/// Holds the streams, then creates and deletes an entry per round; the latencies in µs.
async fn propagation(
    deployment: &mut Deployment,
    opts: &SyncBenchOptions,
) -> Result<(Vec<u32>, Vec<u32>), AgentBenchError> {
    let socket = deployment.agent_socket();
    let (tx, mut rx) = mpsc::unbounded_channel::<Arrival>();
    let mut holders = tokio::task::JoinSet::new();
    for index in 0..opts.streams {
        let (socket, tx) = (socket.clone(), tx.clone());
        holders.spawn(async move {
            let channel = wc::connect(&socket).await.map_err(|e| e.to_string())?;
            let mut stream = wc::workload_api(channel)
                .fetch_x509svid(X509svidRequest {})
                .await
                .map_err(|s| status_text(&s))?
                .into_inner();
            while let Some(m) = stream.message().await.map_err(|s| status_text(&s))? {
                let ids = m.svids.into_iter().map(|s| s.spiffe_id).collect();
                if tx.send((index, Instant::now(), ids)).is_err() {
                    break;
                }
            }
            Ok::<(), String>(())
        });
    }
    drop(tx);
    let outcome = async {
        // Every stream's first message.
        wait_all(&mut rx, opts.streams, Instant::now(), |_| true).await?;
        let (mut created, mut deleted) = (Vec::new(), Vec::new());
        for round in 0..opts.rounds {
            let agent_id = deployment.agent_id.clone();
            let path = format!("/bench/sync/new-{round}");
            let (entry_id, spiffe_id) =
                create_entry(&mut deployment.admin, &deployment.td, &agent_id, &path).await?;
            let id = spiffe_id.to_string();
            let at = Instant::now();
            created.extend(wait_all(&mut rx, opts.streams, at, |ids| ids.contains(&id)).await?);
            deployment
                .admin
                .delete_entry(admin_pb::EntryIdRequest { id: entry_id })
                .await
                .map_err(admin_err("delete an entry"))?;
            let at = Instant::now();
            deleted.extend(wait_all(&mut rx, opts.streams, at, |ids| !ids.contains(&id)).await?);
        }
        Ok::<_, AgentBenchError>((created, deleted))
    }
    .await;
    holders.abort_all();
    outcome
}

/// Waits until each of `streams` streams sent a message whose IDs satisfy `done`; their
/// latencies since `since`, µs.
async fn wait_all(
    rx: &mut mpsc::UnboundedReceiver<Arrival>,
    streams: usize,
    since: Instant,
    done: impl Fn(&HashSet<String>) -> bool,
) -> Result<Vec<u32>, AgentBenchError> {
    let deadline = tokio::time::Instant::now() + PHASE_TIMEOUT;
    let mut seen = vec![false; streams];
    let mut latencies = Vec::with_capacity(streams);
    while latencies.len() < streams {
        let (index, at, ids) = match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(arrival)) => arrival,
            Ok(None) | Err(_) => {
                return Err(AgentBenchError::Stalled(format!(
                    "{} of {streams} workload streams saw the change within {}s (or a stream failed)",
                    latencies.len(),
                    PHASE_TIMEOUT.as_secs()
                )));
            }
        };
        if !seen[index] && done(&ids) {
            seen[index] = true;
            let us = at.saturating_duration_since(since).as_micros();
            latencies.push(u32::try_from(us).unwrap_or(u32::MAX));
        }
    }
    Ok(latencies)
}
