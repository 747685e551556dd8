//! `mayfly bench attest --flood` (issue 12): what a flood of bad attestations from one address
//! costs legitimate work. Server and agent run as processes (as deployed); this process is a
//! workload minting task SVIDs at 1 in flight, first on a quiet server, then while flooders
//! send made-up join tokens to `Attest` as fast as the server answers, over anonymous TLS
//! connections from the same machine. It reports the mints' latency in both windows, the
//! server's CPU in both, and how the flood was answered (judged or throttled).

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mayfly::id::{ScopedId, parse_scopes};
use mayfly::mtls::SvidSource;
use mayfly::proto::node as node_pb;
use mayfly::workload_client as wc;
use serde::Serialize;
use tonic::Code;

use super::agent::{AgentBenchError, Latency, SCOPE, invalid, timed};
use super::deploy::{Deployment, Layout};
use super::pid_cpu_secs;
use super::task::{MintKind, mint_loop};

/// What `mayfly bench attest --flood` runs.
#[derive(Debug, Clone)]
pub struct AttestFloodOptions {
    /// Each window's timed part (default 5 s).
    pub duration: Duration,
    /// Concurrent flooding connections (default 4).
    pub flooders: usize,
    /// The `mayfly` executable for the server and agent processes; this one when `None`.
    pub exe: Option<PathBuf>,
}

impl Default for AttestFloodOptions {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(5),
            flooders: 4,
            exe: None,
        }
    }
}

/// One window's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Window {
    /// Task SVIDs minted.
    pub minted: u64,
    /// Their latency.
    pub latency: Latency,
    /// Failed mints.
    pub errors: u64,
    /// The server's CPU over the window, in cores (1.0: one core busy).
    pub server_cores: Option<f64>,
}

/// What the benchmark measured.
#[derive(Debug, Clone, Serialize)]
pub struct AttestFloodReport {
    /// Mints with nothing else going on.
    pub quiet: Window,
    /// Mints during the flood.
    pub flood: Window,
    /// Bad attestations sent during the flood window.
    pub attempts: u64,
    /// Of them, judged (refused after reading the evidence).
    pub judged: u64,
    /// Of them, answered ResourceExhausted unread.
    pub throttled: u64,
    /// Flood p99 over quiet p99 (the goal: at most 2).
    pub p99_ratio: f64,
}

impl fmt::Display for AttestFloodReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cores = |w: &Window| w.server_cores.map_or("?".into(), |c| format!("{c:.2}"));
        writeln!(
            f,
            "task SVID mints at 1 in flight, server and agent as processes, SQLite, durable audit"
        )?;
        writeln!(
            f,
            "  quiet: {} minted; {}; server {} cores",
            self.quiet.minted,
            self.quiet.latency,
            cores(&self.quiet)
        )?;
        writeln!(
            f,
            "  flood: {} minted; {}; server {} cores",
            self.flood.minted,
            self.flood.latency,
            cores(&self.flood)
        )?;
        let share = |n: u64| 100.0 * n as f64 / self.attempts.max(1) as f64;
        writeln!(
            f,
            "  the flood: {} bad attestations, {} judged ({:.1}%), {} throttled ({:.1}%)",
            self.attempts,
            self.judged,
            share(self.judged),
            self.throttled,
            share(self.throttled)
        )?;
        write!(
            f,
            "  mint p99 during the flood / quiet: {:.2} (goal <= 2: {})",
            self.p99_ratio,
            super::agent::met(self.p99_ratio <= 2.0)
        )
    }
}

/// Runs the benchmark.
///
/// # Errors
/// [`AgentBenchError`] when it cannot be set up.
pub async fn attest_flood_benchmark(
    opts: AttestFloodOptions,
) -> Result<AttestFloodReport, AgentBenchError> {
    if opts.duration.is_zero() || opts.flooders == 0 {
        return Err(invalid("the duration and the flooders must be above zero"));
    }
    let mut deployment = Deployment::start(Layout::Processes, opts.exe.as_deref()).await?;
    let result = async {
        let agent = deployment.start_agent().await?;
        let measured = measure(&deployment, &opts).await;
        let alive = deployment.check_server();
        agent.stop().await;
        alive?;
        measured
    }
    .await;
    deployment.stop().await;
    result
}

async fn measure(
    deployment: &Deployment,
    opts: &AttestFloodOptions,
) -> Result<AttestFloodReport, AgentBenchError> {
    let api = wc::task_api(wc::connect(&deployment.agent_socket()).await?);
    let expected =
        ScopedId::new(deployment.entry_spiffe_id.clone(), parse_scopes(&[SCOPE])?)?.to_string();
    let server = deployment.server_pid();
    let window = |name: &'static str| {
        let api = api.clone();
        let expected = expected.clone();
        async move {
            let start = Instant::now();
            let span = (
                start + Duration::from_secs(1),
                start + Duration::from_secs(1) + opts.duration,
            );
            let stop = Arc::new(AtomicBool::new(false));
            let mut tasks = tokio::task::JoinSet::new();
            tasks.spawn(mint_loop(
                api,
                MintKind::X509,
                format!("flood-{name}"),
                expected,
                span,
                stop.clone(),
            ));
            let (tally, from, until) =
                timed(span, &stop, &mut tasks, || server.and_then(pid_cpu_secs)).await?;
            let cores = from
                .zip(until)
                .map(|(a, b)| (b - a) / opts.duration.as_secs_f64());
            Ok::<_, AgentBenchError>(Window {
                minted: tally.ok,
                errors: tally.errors,
                latency: Latency::of(tally.latencies_us),
                server_cores: cores,
            })
        }
    };
    let quiet = window("quiet").await?;

    let counts = Arc::new(FloodCounts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let bundles = mayfly::client::bundle_map(&deployment.td, &deployment.bundle);
    let server_id = mayfly::wire::server_id(&deployment.td);
    // A well-formed CSR, so each bad token is looked up in the store like a real attempt.
    let csr = mayfly::svid::KeyAndCsr::generate()
        .map_err(|e| invalid(&format!("no CSR could be made: {e}")))?
        .csr;
    let mut flooders = Vec::with_capacity(opts.flooders);
    for n in 0..opts.flooders {
        let source = SvidSource::trust_only(bundles.clone())
            .map_err(|e| invalid(&format!("the bundle is unusable: {e}")))?;
        let node = mayfly::client::connect_node(deployment.node_addr, &source, &server_id)
            .await
            .map_err(|e| invalid(&format!("a flooder could not connect: {e}")))?;
        flooders.push(tokio::spawn(flood(
            (node, csr.clone()),
            n,
            counts.clone(),
            stop.clone(),
        )));
    }
    // Let the flood reach its steady state (the burst spent) before the window counts.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = counts.snapshot();
    let flood_window = window("flood").await;
    let after = counts.snapshot();
    stop.store(true, Ordering::Relaxed);
    for f in flooders {
        let _ = f.await;
    }
    let flood_window = flood_window?;
    let p99_ratio = flood_window.latency.p99_us / quiet.latency.p99_us.max(1.0);
    Ok(AttestFloodReport {
        quiet,
        flood: flood_window,
        attempts: after.0 - before.0,
        judged: after.1 - before.1,
        throttled: after.2 - before.2,
        p99_ratio,
    })
}

#[derive(Default)]
struct FloodCounts {
    attempts: AtomicU64,
    judged: AtomicU64,
    throttled: AtomicU64,
}

impl FloodCounts {
    fn snapshot(&self) -> (u64, u64, u64) {
        (
            self.attempts.load(Ordering::Relaxed),
            self.judged.load(Ordering::Relaxed),
            self.throttled.load(Ordering::Relaxed),
        )
    }
}

/// Sends made-up join tokens until `stop`, counting how each is answered.
async fn flood(
    (mut node, csr): (
        node_pb::node_client::NodeClient<tonic::transport::Channel>,
        Vec<u8>,
    ),
    flooder: usize,
    counts: Arc<FloodCounts>,
    stop: Arc<AtomicBool>,
) {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let token = format!("{:032x}{:032x}", flooder, n);
        let answer = node
            .attest(node_pb::AttestRequest {
                attestor: "join_token".into(),
                evidence: token.into_bytes(),
                csr: csr.clone(),
            })
            .await;
        counts.attempts.fetch_add(1, Ordering::Relaxed);
        match answer {
            Err(s) if s.code() == Code::ResourceExhausted => {
                counts.throttled.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                counts.judged.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
