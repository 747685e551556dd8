//! The agent benchmarks behind `mayfly bench task`, `mayfly bench fetch` and
//! `mayfly bench streams`.
//!
//! Every part is real: a server started in this process with the SQLite store in a temporary
//! data dir (`synchronous=FULL`, the group-committed durable audit log), a real agent attested
//! with a join token over the node API's mTLS, the agent's real Unix socket, and workloads that
//! reach it with the same client `mayfly svid` uses (the `workload.spiffe.io` header on every
//! call). Entries are created through the admin API with the selector `unix:uid:<this uid>` and
//! the agent as parent, so the agent attests the benchmark process itself as the workload.
//!
//! - [`task_benchmark`]: the just-in-time path workload → agent → server → workload.
//!   `MintX509SVID` over one HTTP/2 connection kept open, with a fixed number of requests in
//!   flight, for each level asked for. Each mint is an agent P-256 key and CSR, an mTLS round
//!   trip to the server (entry lookup, policy, CSR verify, leaf sign, durable audit record) and
//!   the answer back. Server and agent run in this process, on this process's runtime. In the
//!   same run, with server and agent stopped, it measures the reference: the crypto that path
//!   cannot avoid (keygen + CSR sign, CSR verify + leaf sign) on one thread.
//! - [`fetch_benchmark`]: a cached `FetchX509SVID`: one connection, and per request a new
//!   stream, its first message, and the stream dropped. Server and agent in this process.
//! - [`streams_benchmark`]: the agent as a separate process (`mayfly agent run`), many
//!   workloads each holding an open `FetchX509SVID` stream on a connection of its own; the
//!   agent's resident memory before and with them, and how long an entry change takes to reach
//!   every stream.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::sync::{Semaphore, mpsc, watch};
use tonic::transport::Channel;

use super::{BenchError, TempDir, admin_err, percentile_ms, process_cpu_secs};
use mayfly::agent::identity::Bootstrap;
use mayfly::agent::{self, AgentConfig, AgentError, RunningAgent};
use mayfly::ca::{Authority, CaError};
use mayfly::client::{self, ClientError};
use mayfly::id::{IdError, ScopedId, SpiffeId, TrustDomain, parse_scopes};
use mayfly::proto::admin as admin_pb;
use mayfly::proto::admin::admin_client::AdminClient;
use mayfly::proto::task::MintX509svidRequest;
use mayfly::proto::workload::X509svidRequest;
use mayfly::server::{self, ServerConfig, ServerError};
use mayfly::svid::{self, KeyAndCsr, LeafSpec, SvidError};
use mayfly::workload_client::{self as wc, WorkloadClientError};

/// The scope every benchmark entry grants and every task SVID asks for.
const SCOPE: &str = "bench:read";
/// The TTL of the benchmark entries and of the task SVIDs asked for, in seconds.
const TTL_SECS: u32 = 300;
/// How long the agent may take to attest and hold an SVID for the benchmark entry.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How many workload connections of the streams benchmark are being set up at once.
const CONNECT_CONCURRENCY: usize = 64;
/// File descriptors the streams benchmark needs besides one per workload (each side).
const FD_MARGIN: u64 = 128;

/// Why an agent benchmark could not run. Failed requests during the load are not errors of
/// the benchmark: they are counted in the reports.
#[derive(Debug, thiserror::Error)]
pub enum AgentBenchError {
    /// The server, the admin API or an option.
    #[error(transparent)]
    Setup(#[from] BenchError),
    /// The in-process agent did not start.
    #[error("the benchmark agent did not start: {0}")]
    Agent(#[from] AgentError),
    /// A workload could not reach the agent, or the agent refused it during setup.
    #[error("a benchmark workload failed during setup: {0}")]
    Workload(#[from] WorkloadClientError),
    /// The agent process could not be started.
    #[error("could not start the agent process {exe}: {source}")]
    Spawn {
        /// The executable.
        exe: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file of the benchmark could not be written.
    #[error("could not write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Something did not happen in time, or the agent process died.
    #[error("{0}")]
    Stalled(String),
    /// The open-files limit is too low for the workloads asked for.
    #[error(
        "{workloads} workloads need about {needed} open files in this process and in the agent, but the limit is {soft} (hard limit {hard}): raise it with `ulimit -n {needed}` first, or ask for fewer --workloads"
    )]
    FdLimit {
        /// Workloads asked for.
        workloads: usize,
        /// Descriptors needed.
        needed: u64,
        /// The soft limit.
        soft: u64,
        /// The hard limit.
        hard: String,
    },
}

impl From<ServerError> for AgentBenchError {
    fn from(e: ServerError) -> Self {
        Self::Setup(e.into())
    }
}

impl From<ClientError> for AgentBenchError {
    fn from(e: ClientError) -> Self {
        Self::Setup(e.into())
    }
}

impl From<IdError> for AgentBenchError {
    fn from(e: IdError) -> Self {
        Self::Setup(e.into())
    }
}

impl From<CaError> for AgentBenchError {
    fn from(e: CaError) -> Self {
        Self::Setup(e.into())
    }
}

fn invalid(message: &str) -> AgentBenchError {
    AgentBenchError::Setup(BenchError::InvalidOption(message.to_owned()))
}

/// Latency percentiles of one measurement, in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Latency {
    /// Requests measured.
    pub samples: usize,
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// Slowest.
    pub max_us: f64,
}

impl Latency {
    fn of(mut samples_us: Vec<u32>) -> Self {
        samples_us.sort_unstable();
        let at = |q: f64| percentile_ms(&samples_us, q) * 1000.0;
        Self {
            samples: samples_us.len(),
            p50_us: at(0.50),
            p90_us: at(0.90),
            p99_us: at(0.99),
            max_us: samples_us.last().map_or(0.0, |&us| f64::from(us)),
        }
    }
}

impl fmt::Display for Latency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "p50 {:.0} µs, p90 {:.0} µs, p99 {:.0} µs, max {:.0} µs",
            self.p50_us, self.p90_us, self.p99_us, self.max_us
        )
    }
}

/// What one timed load counted.
#[derive(Default)]
struct Tally {
    ok: u64,
    ok_total: u64,
    errors: u64,
    first_error: Option<String>,
    latencies_us: Vec<u32>,
}

impl Tally {
    /// Counts one answer that arrived at `done`, `elapsed` after it was sent.
    fn record(
        &mut self,
        problem: Option<String>,
        done: Instant,
        elapsed: Duration,
        (from, until): (Instant, Instant),
    ) {
        match problem {
            None => {
                self.ok_total += 1;
                if done >= from && done < until {
                    self.ok += 1;
                    let us = u32::try_from(elapsed.as_micros()).unwrap_or(u32::MAX);
                    self.latencies_us.push(us);
                }
            }
            Some(problem) => {
                self.errors += 1;
                if self.first_error.is_none() {
                    self.first_error = Some(problem);
                }
            }
        }
    }

    fn merge(&mut self, other: Tally) {
        self.ok += other.ok;
        self.ok_total += other.ok_total;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.latencies_us.extend(other.latencies_us);
    }
}

fn status_text(status: &tonic::Status) -> String {
    format!(
        "{:?}: {}",
        status.code(),
        status.message().chars().take(300).collect::<String>()
    )
}

// ---------------------------------------------------------------------------------------------
// The deployment: a server in this process, an entry for this process, a join token.

/// A server in this process, its admin client, and the benchmark's first entry.
struct Deployment {
    temp: TempDir,
    server: server::RunningServer,
    admin: AdminClient<Channel>,
    td: TrustDomain,
    /// DER CA certificates.
    bundle: Vec<Vec<u8>>,
    /// The join token for the agent, and the SPIFFE ID it will get.
    token: String,
    agent_id: String,
    /// The entry every workload of the benchmark matches, and its SPIFFE ID.
    entry_id: String,
    entry_spiffe_id: SpiffeId,
}

impl Deployment {
    /// Starts a server on a fresh temporary data dir, takes a join token and registers one
    /// entry, under the agent-to-be, for this process's uid.
    async fn start() -> Result<Self, AgentBenchError> {
        let temp = TempDir::create()?;
        let mut config = ServerConfig::with_defaults(temp.0.join("server"));
        config.bind = SocketAddr::from(([127, 0, 0, 1], 0));
        let running = server::start(config).await?;
        match Self::prepare(temp, running).await {
            Ok(deployment) => Ok(deployment),
            Err((running, e)) => {
                running.shutdown().await;
                Err(e)
            }
        }
    }

    async fn prepare(
        temp: TempDir,
        running: server::RunningServer,
    ) -> Result<Self, (server::RunningServer, AgentBenchError)> {
        let setup = async {
            let mut admin = client::connect_admin(&running.admin_socket).await?;
            let bundle = admin
                .get_bundle(admin_pb::GetBundleRequest {})
                .await
                .map_err(admin_err("return the trust bundle"))?
                .into_inner()
                .certificates;
            let token = admin
                .create_join_token(admin_pb::CreateJoinTokenRequest { ttl_seconds: 0 })
                .await
                .map_err(admin_err("create a join token"))?
                .into_inner();
            let td = running.trust_domain.clone();
            let (entry_id, entry_spiffe_id) =
                create_entry(&mut admin, &td, &token.agent_id, "/bench/workload").await?;
            Ok::<_, AgentBenchError>((admin, bundle, token, td, entry_id, entry_spiffe_id))
        };
        match setup.await {
            Ok((admin, bundle, token, td, entry_id, entry_spiffe_id)) => Ok(Self {
                temp,
                server: running,
                admin,
                td,
                bundle,
                token: token.token,
                agent_id: token.agent_id,
                entry_id,
                entry_spiffe_id,
            }),
            Err(e) => Err((running, e)),
        }
    }

    fn dir(&self) -> &Path {
        &self.temp.0
    }

    fn agent_socket(&self) -> PathBuf {
        self.dir().join("agent.sock")
    }

    /// Starts the agent in this process, and waits until it holds an SVID for the entry.
    async fn start_agent(&self) -> Result<RunningAgent, AgentBenchError> {
        let mut config = AgentConfig::with_defaults(self.server.node_addr);
        config.join_token = Some(self.token.clone());
        config.bootstrap = Some(Bootstrap::Bundle(self.bundle.clone()));
        config.socket = self.agent_socket();
        config.data_dir = self.dir().join("agent");
        let agent = agent::start(config).await?;
        let mut snapshot = agent.snapshot();
        let entry_id = self.entry_id.clone();
        let ready = tokio::time::timeout(
            READY_TIMEOUT,
            snapshot.wait_for(|s| s.ready && s.svids.contains_key(&entry_id)),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        if !ready {
            agent.shutdown().await;
            return Err(AgentBenchError::Stalled(format!(
                "the agent did not hold an SVID for the benchmark entry within {}s",
                READY_TIMEOUT.as_secs()
            )));
        }
        Ok(agent)
    }

    /// The audit log's record count and whether its hash chain verifies.
    async fn verify_audit(&mut self) -> Result<(i64, bool), AgentBenchError> {
        let verdict = self
            .admin
            .verify_audit(admin_pb::VerifyAuditRequest {})
            .await
            .map_err(admin_err("verify the audit log"))?
            .into_inner();
        Ok((verdict.records, verdict.ok))
    }

    /// Stops the server and removes the data dir.
    async fn stop(self) {
        drop(self.admin);
        self.server.shutdown().await;
        drop(self.temp);
    }
}

/// Registers an entry `path` under `parent` for this process's uid, granting [`SCOPE`].
async fn create_entry(
    admin: &mut AdminClient<Channel>,
    td: &TrustDomain,
    parent: &str,
    path: &str,
) -> Result<(String, SpiffeId), AgentBenchError> {
    let spiffe_id = td.join(path)?;
    let entry = admin
        .create_entry(admin_pb::CreateEntryRequest {
            spiffe_id: spiffe_id.to_string(),
            parent_id: parent.to_owned(),
            selectors: vec![format!("unix:uid:{}", nix::unistd::getuid())],
            scopes: vec![SCOPE.into()],
            ttl_seconds: TTL_SECS,
            dns_names: Vec::new(),
        })
        .await
        .map_err(admin_err("create an entry"))?
        .into_inner();
    Ok((entry.id, spiffe_id))
}

// ---------------------------------------------------------------------------------------------
// bench task

/// What `mayfly bench task` runs.
#[derive(Debug, Clone)]
pub struct TaskBenchOptions {
    /// The requests kept in flight on the one connection, one measurement per level
    /// (default 1 and 16).
    pub in_flight: Vec<usize>,
    /// The timed part of each level (default 10 s).
    pub duration: Duration,
    /// Load before each level's clock starts, not counted (default 1 s).
    pub warmup: Duration,
    /// How long the crypto reference runs (default 3 s).
    pub reference_duration: Duration,
}

impl Default for TaskBenchOptions {
    fn default() -> Self {
        Self {
            in_flight: vec![1, 16],
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(1),
            reference_duration: Duration::from_secs(3),
        }
    }
}

/// One in-flight level of the task benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct TaskLevel {
    /// Requests in flight on the one connection.
    pub in_flight: usize,
    /// Task SVIDs answered OK within the timed window.
    pub minted: u64,
    /// Task SVIDs per second.
    pub per_sec: f64,
    /// Request latency as the workload saw it.
    pub latency: Latency,
    /// Failed requests (or answers other than the SVID asked for) over the level, warm-up
    /// included.
    pub errors: u64,
    /// The first such failure.
    pub first_error: Option<String>,
    /// The process's CPU time (workload, agent and server together) per task SVID, in
    /// microseconds; `None` where /proc is unavailable.
    pub cpu_us_per_svid: Option<f64>,
    /// The process's CPU time over what the runtime's worker threads offer (1.0: all busy).
    pub cpu_busy: Option<f64>,
}

/// The crypto a task SVID cannot do without, timed on one thread in this process.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct CryptoReference {
    /// Iterations run.
    pub iterations: u64,
    /// The agent's part: P-256 key generation and the CSR signature, median, µs.
    pub keygen_csr_us: f64,
    /// The server's part: CSR signature verify and the leaf built and signed, median, µs.
    pub verify_sign_us: f64,
    /// Both, median of the sums, µs.
    pub total_us: f64,
    /// Iterations per second on one thread.
    pub per_sec: f64,
}

/// What `mayfly bench task` measured.
#[derive(Debug, Clone, Serialize)]
pub struct TaskBenchReport {
    /// Where server and agent ran: `in-process`.
    pub mode: String,
    /// The runtime's worker threads, shared by the workload, the agent and the server.
    pub threads: usize,
    /// The timed window of each level, in seconds.
    pub duration_secs: f64,
    /// One measurement per in-flight level.
    pub levels: Vec<TaskLevel>,
    /// The reference, measured after the load with server and agent stopped.
    pub reference: CryptoReference,
    /// Audit records after the run (setup records included).
    pub audit_records: i64,
    /// Whether the audit hash chain verified after the run.
    pub audit_chain_ok: bool,
    /// The goal at 1 in flight: p50 ≤ 750 µs; `None` when 1 was not measured.
    pub goal_p50_met: Option<bool>,
    /// The goal at 1 in flight: p99 ≤ 2.5 ms.
    pub goal_p99_met: Option<bool>,
}

/// The goal for the p50 of one task SVID at 1 in flight, in µs.
pub const TASK_GOAL_P50_US: f64 = 750.0;
/// The goal for the p99 of one task SVID at 1 in flight, in µs.
pub const TASK_GOAL_P99_US: f64 = 2500.0;
/// The goal for the p50 of a cached FetchX509SVID, in µs.
pub const FETCH_GOAL_P50_US: f64 = 200.0;
/// The goal for the agent's resident memory with the streams open, in bytes.
pub const STREAMS_GOAL_BYTES: u64 = 32 * 1024 * 1024;

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

impl fmt::Display for TaskBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "task SVIDs (MintX509SVID) workload -> agent -> server -> workload; server and agent {} on {} runtime threads shared with the workload; one HTTP/2 connection to the agent socket; SQLite store, durable audit",
            self.mode, self.threads
        )?;
        for level in &self.levels {
            writeln!(
                f,
                "  {:>3} in flight: {:.0} SVIDs/s ({} in {:.1}s); {}",
                level.in_flight, level.per_sec, level.minted, self.duration_secs, level.latency
            )?;
            if let (Some(cpu), Some(busy)) = (level.cpu_us_per_svid, level.cpu_busy) {
                writeln!(
                    f,
                    "                  cpu: {cpu:.0} µs per SVID (workload + agent + server), {:.0}% of {} threads busy",
                    busy * 100.0,
                    self.threads
                )?;
            }
            match &level.first_error {
                None => writeln!(f, "                  errors: 0")?,
                Some(e) => writeln!(f, "                  errors: {} (first: {e})", level.errors)?,
            }
        }
        let r = &self.reference;
        writeln!(
            f,
            "reference (one thread, in process): keygen + CSR sign {:.0} µs, CSR verify + leaf sign {:.0} µs, together {:.0} µs ({:.0}/s)",
            r.keygen_csr_us, r.verify_sign_us, r.total_us, r.per_sec
        )?;
        if let Some(one) = self.levels.iter().find(|l| l.in_flight == 1)
            && r.total_us > 0.0
        {
            writeln!(
                f,
                "ratio at 1 in flight: p50 {:.1}x the reference",
                one.latency.p50_us / r.total_us
            )?;
        }
        writeln!(
            f,
            "audit: {} records, hash chain {}",
            self.audit_records,
            if self.audit_chain_ok {
                "verified"
            } else {
                "BROKEN"
            }
        )?;
        match (self.goal_p50_met, self.goal_p99_met) {
            (Some(p50), Some(p99)) => write!(
                f,
                "goal at 1 in flight: p50 <= {TASK_GOAL_P50_US:.0} µs {}, p99 <= {TASK_GOAL_P99_US:.0} µs {} (a shared, noisy machine: compare with the reference)",
                met(p50),
                met(p99)
            ),
            _ => write!(f, "goal: not checked (1 in flight was not measured)"),
        }
    }
}

/// Runs `mayfly bench task`: each in-flight level, then the reference.
///
/// Call it on a multi-threaded tokio runtime: server, agent and workload share its workers.
///
/// # Errors
/// [`AgentBenchError`] when the benchmark cannot be set up; failing requests are counted in
/// the report instead.
pub async fn task_benchmark(opts: TaskBenchOptions) -> Result<TaskBenchReport, AgentBenchError> {
    if opts.in_flight.is_empty() || opts.in_flight.contains(&0) {
        return Err(invalid("every in-flight level must be at least 1"));
    }
    if opts.duration.is_zero() || opts.reference_duration.is_zero() {
        return Err(invalid(
            "the duration and the reference duration must be above zero",
        ));
    }
    let threads = tokio::runtime::Handle::current().metrics().num_workers();
    let mut deployment = Deployment::start().await?;
    let result = async {
        let agent = deployment.start_agent().await?;
        let levels = run_task_levels(&deployment, &opts, threads).await;
        agent.shutdown().await;
        let levels = levels?;
        let audit = deployment.verify_audit().await?;
        Ok::<_, AgentBenchError>((levels, audit))
    }
    .await;
    deployment.stop().await;
    let (levels, (audit_records, audit_chain_ok)) = result?;

    let reference = crypto_reference(opts.reference_duration).await?;
    let one = levels.iter().find(|l| l.in_flight == 1);
    Ok(TaskBenchReport {
        mode: "in-process".into(),
        threads,
        duration_secs: opts.duration.as_secs_f64(),
        goal_p50_met: one.map(|l| l.latency.p50_us <= TASK_GOAL_P50_US),
        goal_p99_met: one.map(|l| l.latency.p99_us <= TASK_GOAL_P99_US),
        levels,
        reference,
        audit_records,
        audit_chain_ok,
    })
}

async fn run_task_levels(
    deployment: &Deployment,
    opts: &TaskBenchOptions,
    threads: usize,
) -> Result<Vec<TaskLevel>, AgentBenchError> {
    let channel = wc::connect(&deployment.agent_socket()).await?;
    let api = wc::task_api(channel);
    let expected =
        ScopedId::new(deployment.entry_spiffe_id.clone(), parse_scopes(&[SCOPE])?)?.to_string();
    let mut levels = Vec::with_capacity(opts.in_flight.len());
    for (index, &in_flight) in opts.in_flight.iter().enumerate() {
        let start = Instant::now();
        let window = (start + opts.warmup, start + opts.warmup + opts.duration);
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = tokio::task::JoinSet::new();
        for worker in 0..in_flight {
            tasks.spawn(mint_loop(
                api.clone(),
                format!("bench-{index}-{worker}"),
                expected.clone(),
                window,
                stop.clone(),
            ));
        }
        let (tally, cpu_secs) = timed(window, &stop, &mut tasks).await?;
        let secs = opts.duration.as_secs_f64();
        levels.push(TaskLevel {
            in_flight,
            minted: tally.ok,
            per_sec: tally.ok as f64 / secs,
            cpu_us_per_svid: cpu_secs
                .filter(|_| tally.ok > 0)
                .map(|cpu| cpu * 1e6 / tally.ok as f64),
            cpu_busy: cpu_secs.map(|cpu| cpu / (secs * threads.max(1) as f64)),
            errors: tally.errors,
            first_error: tally.first_error,
            latency: Latency::of(tally.latencies_us),
        });
    }
    Ok(levels)
}

/// Waits out the timed window, sampling the process's CPU time at both ends, stops the load
/// and adds up what its tasks counted.
async fn timed(
    (from, until): (Instant, Instant),
    stop: &AtomicBool,
    tasks: &mut tokio::task::JoinSet<Tally>,
) -> Result<(Tally, Option<f64>), AgentBenchError> {
    tokio::time::sleep_until(from.into()).await;
    let cpu_start = process_cpu_secs();
    tokio::time::sleep_until(until.into()).await;
    let cpu_end = process_cpu_secs();
    stop.store(true, Ordering::Relaxed);
    let mut total = Tally::default();
    while let Some(joined) = tasks.join_next().await {
        let tally = joined.map_err(|e| BenchError::Task(e.to_string()))?;
        total.merge(tally);
    }
    Ok((total, cpu_start.zip(cpu_end).map(|(a, b)| b - a)))
}

/// Keeps one MintX509SVID in flight until `stop`.
async fn mint_loop(
    mut api: wc::TaskApi,
    task_prefix: String,
    expected_id: String,
    window: (Instant, Instant),
    stop: Arc<AtomicBool>,
) -> Tally {
    let mut tally = Tally::default();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let request = MintX509svidRequest {
            task_id: format!("{task_prefix}-{n}"),
            scopes: vec![SCOPE.to_owned()],
            ttl_seconds: TTL_SECS,
            spiffe_id: String::new(),
        };
        let sent = Instant::now();
        let answer = api.mint_x509svid(request).await;
        let done = Instant::now();
        let problem = match answer {
            Ok(response) => {
                let svid = response.into_inner();
                if svid.spiffe_id != expected_id
                    || svid.x509_svid.is_empty()
                    || svid.x509_svid_key.is_empty()
                {
                    Some(format!(
                        "the agent answered {} ({} certificate bytes, {} key bytes); expected {expected_id}",
                        svid.spiffe_id,
                        svid.x509_svid.len(),
                        svid.x509_svid_key.len()
                    ))
                } else {
                    None
                }
            }
            Err(status) => Some(status_text(&status)),
        };
        tally.record(problem, done, done.duration_since(sent), window);
    }
    tally
}

/// The reference: an agent's key and CSR ([`KeyAndCsr::generate`]), then the server's CSR
/// verify ([`svid::parse_csr`]) and leaf ([`svid::issue`]) with an in-memory CA, on one
/// thread for `duration`.
async fn crypto_reference(duration: Duration) -> Result<CryptoReference, AgentBenchError> {
    tokio::task::spawn_blocking(move || -> Result<CryptoReference, AgentBenchError> {
        let td = TrustDomain::new(server::defaults::TRUST_DOMAIN)?;
        let authority = Authority::generate(&td, server::defaults::CA_TTL)?;
        let id = ScopedId::new(td.join("/bench/workload")?, parse_scopes(&[SCOPE])?)?;
        let reference_err = |e: SvidError| AgentBenchError::Setup(BenchError::Reference(e));
        let mut keygen = Vec::new();
        let mut sign = Vec::new();
        let mut total = Vec::new();
        let start = Instant::now();
        let until = start + duration;
        while Instant::now() < until {
            let t0 = Instant::now();
            let request = KeyAndCsr::generate().map_err(reference_err)?;
            let t1 = Instant::now();
            let key = svid::parse_csr(&request.csr).map_err(reference_err)?;
            let issued = svid::issue(
                &authority,
                &LeafSpec {
                    id: &id,
                    key: &key,
                    ttl: Duration::from_secs(TTL_SECS.into()),
                    dns_names: &[],
                },
                SystemTime::now(),
            )
            .map_err(reference_err)?;
            let t2 = Instant::now();
            std::hint::black_box((request, issued));
            let us = |d: Duration| u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
            keygen.push(us(t1 - t0));
            sign.push(us(t2 - t1));
            total.push(us(t2 - t0));
        }
        let secs = start.elapsed().as_secs_f64();
        let iterations = total.len() as u64;
        Ok(CryptoReference {
            iterations,
            keygen_csr_us: Latency::of(keygen).p50_us,
            verify_sign_us: Latency::of(sign).p50_us,
            total_us: Latency::of(total).p50_us,
            per_sec: iterations as f64 / secs,
        })
    })
    .await
    .map_err(|e| BenchError::Task(e.to_string()))?
}

// ---------------------------------------------------------------------------------------------
// bench fetch

/// What `mayfly bench fetch` runs.
#[derive(Debug, Clone)]
pub struct FetchBenchOptions {
    /// The timed part (default 10 s).
    pub duration: Duration,
    /// Requests before the clock starts, not counted (default 1 s).
    pub warmup: Duration,
}

impl Default for FetchBenchOptions {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(1),
        }
    }
}

/// What `mayfly bench fetch` measured.
#[derive(Debug, Clone, Serialize)]
pub struct FetchBenchReport {
    /// Where server and agent ran: `in-process`.
    pub mode: String,
    /// The runtime's worker threads, shared by the workload, the agent and the server.
    pub threads: usize,
    /// The timed window, in seconds.
    pub duration_secs: f64,
    /// First messages received within the timed window.
    pub fetched: u64,
    /// Fetches per second, one at a time.
    pub per_sec: f64,
    /// From opening the stream to its first message.
    pub latency: Latency,
    /// Failed fetches (or messages without the SVID), warm-up included.
    pub errors: u64,
    /// The first such failure.
    pub first_error: Option<String>,
    /// The process's CPU time (workload and agent) per fetch, in microseconds.
    pub cpu_us_per_fetch: Option<f64>,
    /// The goal: p50 ≤ 200 µs.
    pub goal_p50_met: bool,
}

impl fmt::Display for FetchBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "cached FetchX509SVID, a new stream per request on one connection, first message then dropped; server and agent {} on {} runtime threads shared with the workload",
            self.mode, self.threads
        )?;
        writeln!(
            f,
            "  {:.0} fetches/s ({} in {:.1}s, one at a time); {}",
            self.per_sec, self.fetched, self.duration_secs, self.latency
        )?;
        if let Some(cpu) = self.cpu_us_per_fetch {
            writeln!(f, "  cpu: {cpu:.0} µs per fetch (workload + agent)")?;
        }
        match &self.first_error {
            None => writeln!(f, "  errors: 0")?,
            Some(e) => writeln!(f, "  errors: {} (first: {e})", self.errors)?,
        }
        write!(
            f,
            "goal: p50 <= {FETCH_GOAL_P50_US:.0} µs {} (a shared, noisy machine)",
            met(self.goal_p50_met)
        )
    }
}

/// Runs `mayfly bench fetch`.
///
/// # Errors
/// [`AgentBenchError`] when the benchmark cannot be set up; failing fetches are counted in the
/// report instead.
pub async fn fetch_benchmark(opts: FetchBenchOptions) -> Result<FetchBenchReport, AgentBenchError> {
    if opts.duration.is_zero() {
        return Err(invalid("the duration must be above zero"));
    }
    let threads = tokio::runtime::Handle::current().metrics().num_workers();
    let deployment = Deployment::start().await?;
    let result = async {
        let agent = deployment.start_agent().await?;
        let measured = run_fetches(&deployment, &opts).await;
        agent.shutdown().await;
        measured
    }
    .await;
    deployment.stop().await;
    let (tally, cpu_secs) = result?;
    let secs = opts.duration.as_secs_f64();
    let latency = Latency::of(tally.latencies_us);
    Ok(FetchBenchReport {
        mode: "in-process".into(),
        threads,
        duration_secs: secs,
        fetched: tally.ok,
        per_sec: tally.ok as f64 / secs,
        goal_p50_met: latency.samples > 0 && latency.p50_us <= FETCH_GOAL_P50_US,
        latency,
        errors: tally.errors,
        first_error: tally.first_error,
        cpu_us_per_fetch: cpu_secs
            .filter(|_| tally.ok > 0)
            .map(|cpu| cpu * 1e6 / tally.ok as f64),
    })
}

async fn run_fetches(
    deployment: &Deployment,
    opts: &FetchBenchOptions,
) -> Result<(Tally, Option<f64>), AgentBenchError> {
    let channel = wc::connect(&deployment.agent_socket()).await?;
    let expected = deployment.entry_spiffe_id.to_string();
    let start = Instant::now();
    let window = (start + opts.warmup, start + opts.warmup + opts.duration);
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(fetch_loop(channel, expected, window, stop.clone()));
    timed(window, &stop, &mut tasks).await
}

/// Fetches one at a time until `stop`: a new stream each, its first message, then dropped.
async fn fetch_loop(
    channel: Channel,
    expected_id: String,
    window: (Instant, Instant),
    stop: Arc<AtomicBool>,
) -> Tally {
    let mut tally = Tally::default();
    let mut api = wc::workload_api(channel);
    while !stop.load(Ordering::Relaxed) {
        let sent = Instant::now();
        let first = match api.fetch_x509svid(X509svidRequest {}).await {
            Ok(response) => {
                let mut stream = response.into_inner();
                stream.message().await
            }
            Err(status) => Err(status),
        };
        let done = Instant::now();
        let problem = match first {
            Ok(Some(message)) => match message.svids.first() {
                Some(svid) if svid.spiffe_id == expected_id && !svid.x509_svid.is_empty() => None,
                Some(svid) => Some(format!(
                    "the agent sent {}; expected {expected_id}",
                    svid.spiffe_id
                )),
                None => Some("the agent's first message held no SVID".into()),
            },
            Ok(None) => Some("the stream ended before its first message".into()),
            Err(status) => Some(status_text(&status)),
        };
        tally.record(problem, done, done.duration_since(sent), window);
    }
    tally
}

// ---------------------------------------------------------------------------------------------
// bench streams

/// What `mayfly bench streams` runs.
#[derive(Debug, Clone)]
pub struct StreamsBenchOptions {
    /// Workloads, each with a connection and a FetchX509SVID stream of its own (default 1000).
    pub workloads: usize,
    /// The `mayfly` executable to run `agent run` with; this process's executable when `None`.
    pub agent_exe: Option<PathBuf>,
    /// How long every workload may take to connect and get its first message, and the entry
    /// change to reach every stream (default 120 s).
    pub timeout: Duration,
}

impl Default for StreamsBenchOptions {
    fn default() -> Self {
        Self {
            workloads: 1000,
            agent_exe: None,
            timeout: Duration::from_secs(120),
        }
    }
}

/// The memory of a process, from /proc/<pid>/status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ProcessMemory {
    /// Resident set size now, KiB.
    pub rss_kib: u64,
    /// Peak resident set size so far, KiB.
    pub hwm_kib: u64,
    /// The anonymous part of the resident set (heap, stacks), KiB.
    pub rss_anon_kib: u64,
    /// The file-backed part (the executable's pages, shared with the page cache), KiB.
    pub rss_file_kib: u64,
    /// Threads.
    pub threads: u64,
}

impl ProcessMemory {
    /// The memory of process `pid`; `None` where /proc is not available.
    pub fn of(pid: u32) -> Option<Self> {
        Self::parse(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
    }

    fn parse(status: &str) -> Option<Self> {
        let field = |name: &str| {
            status.lines().find_map(|line| {
                line.strip_prefix(name)
                    .and_then(|rest| rest.strip_prefix(':'))
                    .and_then(|rest| rest.split_whitespace().next())
                    .and_then(|n| n.parse::<u64>().ok())
            })
        };
        Some(Self {
            rss_kib: field("VmRSS")?,
            hwm_kib: field("VmHWM")?,
            rss_anon_kib: field("RssAnon").unwrap_or(0),
            rss_file_kib: field("RssFile").unwrap_or(0),
            threads: field("Threads").unwrap_or(0),
        })
    }
}

impl fmt::Display for ProcessMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "VmRSS {:.1} MiB (anon {:.1}, file {:.1}), VmHWM {:.1} MiB, {} threads",
            self.rss_kib as f64 / 1024.0,
            self.rss_anon_kib as f64 / 1024.0,
            self.rss_file_kib as f64 / 1024.0,
            self.hwm_kib as f64 / 1024.0,
            self.threads
        )
    }
}

/// How an entry change reached the open streams.
#[derive(Debug, Clone, Serialize)]
pub struct FanOut {
    /// Streams that received the new state (both SVIDs).
    pub updated: usize,
    /// Streams that failed, ended, or received something else instead.
    pub failed: usize,
    /// The first such failure.
    pub first_error: Option<String>,
    /// From the admin API's answer to the first stream's update, ms (mostly the agent's poll
    /// interval and one identity SVID issuance).
    pub change_to_first_ms: f64,
    /// From the admin API's answer to the last stream's update, ms.
    pub change_to_all_ms: f64,
    /// From the first stream's update to the last's: the fan-out itself, ms.
    pub first_to_last_ms: f64,
}

/// What `mayfly bench streams` measured.
#[derive(Debug, Clone, Serialize)]
pub struct StreamsBenchReport {
    /// Workloads (connections, each with one open stream).
    pub workloads: usize,
    /// The agent process's pid.
    pub agent_pid: u32,
    /// The agent's poll interval for entry changes, seconds.
    pub sync_interval_secs: f64,
    /// The agent once it served its first workload, before the benchmark's workloads connected.
    pub before: Option<ProcessMemory>,
    /// The agent with every stream open and answered.
    pub with_streams: Option<ProcessMemory>,
    /// The agent after the entry change reached the streams (which are still open).
    pub after_fan_out: Option<ProcessMemory>,
    /// How long all the workloads took to connect and receive their first message, seconds.
    pub connect_secs: f64,
    /// How an entry change reached the streams.
    pub fan_out: FanOut,
    /// The goal: the agent's VmRSS with the streams open ≤ 32 MiB.
    pub goal_rss_met: Option<bool>,
    /// The same for its peak (VmHWM) over the whole run.
    pub goal_hwm_met: Option<bool>,
}

fn memory_text(memory: Option<ProcessMemory>) -> String {
    memory.map_or_else(|| "unavailable".to_owned(), |m| m.to_string())
}

impl fmt::Display for StreamsBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} workloads, each its own Unix connection with an open FetchX509SVID stream, to an agent process (pid {}; server in the benchmark process; all workloads are this process, so one uid)",
            self.workloads, self.agent_pid
        )?;
        writeln!(
            f,
            "  connect + first message for all: {:.2}s",
            self.connect_secs
        )?;
        writeln!(
            f,
            "  agent before the workloads: {}",
            memory_text(self.before)
        )?;
        writeln!(
            f,
            "  agent with the streams:     {}",
            memory_text(self.with_streams)
        )?;
        writeln!(
            f,
            "  agent after the fan-out:    {}",
            memory_text(self.after_fan_out)
        )?;
        if let (Some(before), Some(with)) = (self.before, self.with_streams) {
            writeln!(
                f,
                "  per stream: {:.1} KiB of RSS",
                (with.rss_kib as f64 - before.rss_kib as f64) / self.workloads.max(1) as f64
            )?;
        }
        let fan = &self.fan_out;
        writeln!(
            f,
            "entry change (a second entry for the same workloads) reached {}/{} streams: the first {:.0} ms after the admin API answered, the last {:.0} ms after; fan-out first to last {:.1} ms (agent polls every {:.0}s)",
            fan.updated,
            self.workloads,
            fan.change_to_first_ms,
            fan.change_to_all_ms,
            fan.first_to_last_ms,
            self.sync_interval_secs
        )?;
        if let Some(e) = &fan.first_error {
            writeln!(f, "  {} streams failed (first: {e})", fan.failed)?;
        }
        match (self.goal_rss_met, self.goal_hwm_met) {
            (Some(rss), Some(hwm)) => write!(
                f,
                "goal: agent memory <= 32 MiB with {} streams: VmRSS {}, VmHWM {}",
                self.workloads,
                met(rss),
                met(hwm)
            ),
            _ => write!(f, "goal: not checked (/proc unavailable)"),
        }
    }
}

/// The agent as a child process, stopped (SIGTERM, then SIGKILL) when dropped.
struct AgentProcess {
    child: Child,
    log: PathBuf,
}

impl AgentProcess {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The end of the agent's log, for an error message.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n")
    }

    /// An error saying the agent process died, if it has.
    fn check_alive(&mut self) -> Result<(), AgentBenchError> {
        match self.child.try_wait() {
            Ok(Some(status)) => Err(AgentBenchError::Stalled(format!(
                "the agent process exited ({status}); its log ends with:\n{}",
                self.log_tail()
            ))),
            _ => Ok(()),
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(0));
        if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).is_ok() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The soft and hard limits on open files of this process, from /proc (`None`: unlimited or
/// unknown).
fn open_files_limit() -> Option<(u64, String)> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))?;
    let mut fields = line.split_whitespace();
    let soft = fields.next()?.parse().ok()?;
    Some((soft, fields.next()?.to_owned()))
}

/// Runs `mayfly bench streams`.
///
/// # Errors
/// [`AgentBenchError`] when the benchmark cannot be set up, the open-files limit is too low,
/// or the workloads cannot all connect within the timeout.
pub async fn streams_benchmark(
    opts: StreamsBenchOptions,
) -> Result<StreamsBenchReport, AgentBenchError> {
    if opts.workloads == 0 {
        return Err(invalid("at least one workload is needed"));
    }
    let needed = opts.workloads as u64 + FD_MARGIN;
    if let Some((soft, hard)) = open_files_limit().filter(|(soft, _)| *soft < needed) {
        return Err(AgentBenchError::FdLimit {
            workloads: opts.workloads,
            needed,
            soft,
            hard,
        });
    }
    let exe = match &opts.agent_exe {
        Some(exe) => exe.clone(),
        None => std::env::current_exe().map_err(|source| AgentBenchError::Spawn {
            exe: PathBuf::from("(this executable)"),
            source,
        })?,
    };
    let mut deployment = Deployment::start().await?;
    let result = run_streams(&mut deployment, &opts, &exe).await;
    deployment.stop().await;
    result
}

async fn run_streams(
    deployment: &mut Deployment,
    opts: &StreamsBenchOptions,
    exe: &Path,
) -> Result<StreamsBenchReport, AgentBenchError> {
    let socket = deployment.agent_socket();
    let mut agent = spawn_agent(deployment, exe)?;
    wait_for_agent(&mut agent, &socket).await?;
    // The agent has served one workload; let it settle before the baseline.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = ProcessMemory::of(agent.pid());

    let (stop_tx, stop) = watch::channel(false);
    let (ready_tx, mut ready_rx) = mpsc::channel(opts.workloads);
    let (update_tx, mut update_rx) = mpsc::channel(opts.workloads);
    let permits = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let mut holders = tokio::task::JoinSet::new();
    let started = Instant::now();
    for _ in 0..opts.workloads {
        holders.spawn(hold_stream(
            socket.clone(),
            permits.clone(),
            ready_tx.clone(),
            update_tx.clone(),
            stop.clone(),
        ));
    }
    drop((ready_tx, update_tx));
    let outcome = async {
        let deadline = tokio::time::Instant::now() + opts.timeout;
        for _ in 0..opts.workloads {
            match tokio::time::timeout_at(deadline, ready_rx.recv()).await {
                Ok(Some(Ok(()))) => {}
                Ok(Some(Err(e))) => {
                    agent.check_alive()?;
                    return Err(AgentBenchError::Stalled(format!(
                        "a workload did not get its stream: {e}"
                    )));
                }
                Ok(None) | Err(_) => {
                    agent.check_alive()?;
                    return Err(AgentBenchError::Stalled(format!(
                        "the {} workloads did not all receive their first message within {}s",
                        opts.workloads,
                        opts.timeout.as_secs()
                    )));
                }
            }
        }
        let connect_secs = started.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let with_streams = ProcessMemory::of(agent.pid());

        // The change: a second entry for the same workloads. Every stream must then carry two
        // SVIDs.
        let agent_id = deployment.agent_id.clone();
        create_entry(
            &mut deployment.admin,
            &deployment.td,
            &agent_id,
            "/bench/workload-second",
        )
        .await?;
        let changed = Instant::now();
        let deadline = tokio::time::Instant::now() + opts.timeout;
        let mut arrivals = Vec::with_capacity(opts.workloads);
        let mut failed = 0usize;
        let mut first_error = None;
        while arrivals.len() + failed < opts.workloads {
            match tokio::time::timeout_at(deadline, update_rx.recv()).await {
                Ok(Some(Ok(at))) => arrivals.push(at),
                Ok(Some(Err(e))) => {
                    failed += 1;
                    first_error.get_or_insert(e);
                }
                Ok(None) | Err(_) => break,
            }
        }
        let missing = opts.workloads - arrivals.len() - failed;
        if missing > 0 {
            failed += missing;
            first_error.get_or_insert(format!(
                "{missing} streams saw no change within {}s",
                opts.timeout.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after_fan_out = ProcessMemory::of(agent.pid());
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let first = arrivals.iter().min().copied();
        let last = arrivals.iter().max().copied();
        let fan_out = FanOut {
            updated: arrivals.len(),
            failed,
            first_error,
            change_to_first_ms: first.map_or(0.0, |t| ms(t.saturating_duration_since(changed))),
            change_to_all_ms: last.map_or(0.0, |t| ms(t.saturating_duration_since(changed))),
            first_to_last_ms: first
                .zip(last)
                .map_or(0.0, |(a, b)| ms(b.saturating_duration_since(a))),
        };
        Ok((connect_secs, with_streams, after_fan_out, fan_out))
    }
    .await;
    let _ = stop_tx.send(true);
    while holders.join_next().await.is_some() {}
    let pid = agent.pid();
    drop(agent);
    let (connect_secs, with_streams, after_fan_out, fan_out) = outcome?;
    let peak = [before, with_streams, after_fan_out]
        .iter()
        .flatten()
        .map(|m| m.hwm_kib)
        .max();
    Ok(StreamsBenchReport {
        workloads: opts.workloads,
        agent_pid: pid,
        sync_interval_secs: agent::defaults::SYNC_INTERVAL.as_secs_f64(),
        before,
        with_streams,
        after_fan_out,
        connect_secs,
        goal_rss_met: with_streams.map(|m| m.rss_kib * 1024 <= STREAMS_GOAL_BYTES),
        goal_hwm_met: peak.map(|kib| kib * 1024 <= STREAMS_GOAL_BYTES),
        fan_out,
    })
}

/// Starts `exe agent run` against the deployment's server, with its own data dir and socket.
fn spawn_agent(deployment: &Deployment, exe: &Path) -> Result<AgentProcess, AgentBenchError> {
    let dir = deployment.dir();
    let bundle_path = dir.join("bundle.pem");
    std::fs::write(&bundle_path, mayfly::bundle::to_pem(&deployment.bundle)).map_err(|source| {
        AgentBenchError::Write {
            path: bundle_path.clone(),
            source,
        }
    })?;
    let log = dir.join("agent.log");
    let log_file = std::fs::File::create(&log).map_err(|source| AgentBenchError::Write {
        path: log.clone(),
        source,
    })?;
    let child = Command::new(exe)
        .args(["agent", "run", "--server"])
        .arg(deployment.server.node_addr.to_string())
        .arg("--join-token")
        .arg(&deployment.token)
        .arg("--trust-bundle")
        .arg(&bundle_path)
        .arg("--socket")
        .arg(deployment.agent_socket())
        .arg("--data-dir")
        .arg(dir.join("agent"))
        .env("RUST_LOG", "warn")
        .env_remove(wc::ENDPOINT_ENV)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log_file))
        .spawn()
        .map_err(|source| AgentBenchError::Spawn {
            exe: exe.to_owned(),
            source,
        })?;
    Ok(AgentProcess { child, log })
}

/// Waits for the agent's socket, then until a workload gets its SVID from it.
async fn wait_for_agent(agent: &mut AgentProcess, socket: &Path) -> Result<(), AgentBenchError> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut last_error = String::from("its socket did not appear");
    while Instant::now() < deadline {
        agent.check_alive()?;
        if socket.exists() {
            let attempt = async { wc::fetch_x509(wc::connect(socket).await?).await };
            match tokio::time::timeout(Duration::from_secs(10), attempt).await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) => last_error = e.to_string(),
                Err(_) => last_error = "the first fetch took more than 10s".into(),
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(AgentBenchError::Stalled(format!(
        "the agent process did not serve an SVID within {}s ({last_error}); its log ends with:\n{}",
        READY_TIMEOUT.as_secs(),
        agent.log_tail()
    )))
}

/// One workload: connects, opens FetchX509SVID and reports its first message on `ready`, then
/// reports when the next message arrives on `updated` (OK when it carries two SVIDs), and holds
/// the stream open until `stop`.
async fn hold_stream(
    socket: PathBuf,
    permits: Arc<Semaphore>,
    ready: mpsc::Sender<Result<(), String>>,
    updated: mpsc::Sender<Result<Instant, String>>,
    mut stop: watch::Receiver<bool>,
) {
    let opened = async {
        let _permit = permits.acquire_owned().await.map_err(|e| e.to_string())?;
        let channel = wc::connect(&socket).await.map_err(|e| e.to_string())?;
        let mut stream = wc::workload_api(channel)
            .fetch_x509svid(X509svidRequest {})
            .await
            .map_err(|s| status_text(&s))?
            .into_inner();
        match stream.message().await {
            Ok(Some(m)) if !m.svids.is_empty() => Ok(stream),
            Ok(Some(_)) => Err("the first message held no SVID".to_owned()),
            Ok(None) => Err("the stream ended before its first message".to_owned()),
            Err(s) => Err(status_text(&s)),
        }
    }
    .await;
    let mut stream = match opened {
        Ok(stream) => {
            let _ = ready.send(Ok(())).await;
            stream
        }
        Err(e) => {
            let _ = ready.send(Err(e)).await;
            return;
        }
    };
    tokio::select! {
        next = stream.message() => {
            let at = Instant::now();
            let report = match next {
                Ok(Some(m)) if m.svids.len() == 2 => Ok(at),
                Ok(Some(m)) => Err(format!("an update held {} SVIDs instead of 2", m.svids.len())),
                Ok(None) => Err("the stream ended instead of updating".to_owned()),
                Err(s) => Err(status_text(&s)),
            };
            let _ = updated.send(report).await;
        }
        () = stopped(&mut stop) => return,
    }
    stopped(&mut stop).await;
    drop(stream);
}

/// Resolves once `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_status_is_parsed() {
        let status = "Name:\tmayfly\nVmPeak:\t  100 kB\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\nRssAnon:\t    8192 kB\nRssFile:\t    2048 kB\nThreads:\t3\n";
        assert_eq!(
            ProcessMemory::parse(status),
            Some(ProcessMemory {
                rss_kib: 10240,
                hwm_kib: 20480,
                rss_anon_kib: 8192,
                rss_file_kib: 2048,
                threads: 3
            })
        );
        assert_eq!(ProcessMemory::parse("Name:\tx\n"), None);
        assert!(ProcessMemory::of(std::process::id()).is_some_and(|m| m.rss_kib > 0));
    }

    #[test]
    fn latency_percentiles_in_microseconds() {
        let l = Latency::of((1..=100).rev().collect());
        assert_eq!(l.samples, 100);
        assert_eq!(l.p50_us, 50.0);
        assert_eq!(l.p90_us, 90.0);
        assert_eq!(l.p99_us, 99.0);
        assert_eq!(l.max_us, 100.0);
        assert_eq!(Latency::of(Vec::new()).max_us, 0.0);
    }

    /// A short run of the task and fetch benchmarks:
    /// `cargo test --release --bin mayfly bench::agent -- --ignored --nocapture`.
    #[test]
    #[ignore = "a benchmark: run it in release mode on purpose"]
    fn task_and_fetch_benchmarks_short() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        let task = runtime
            .block_on(task_benchmark(TaskBenchOptions {
                duration: Duration::from_secs(2),
                reference_duration: Duration::from_secs(1),
                ..TaskBenchOptions::default()
            }))
            .unwrap();
        println!("{task}");
        assert!(task.levels.iter().all(|l| l.errors == 0 && l.minted > 0));
        assert!(task.audit_chain_ok);
        let fetch = runtime
            .block_on(fetch_benchmark(FetchBenchOptions {
                duration: Duration::from_secs(2),
                ..FetchBenchOptions::default()
            }))
            .unwrap();
        println!("{fetch}");
        assert_eq!(fetch.errors, 0, "{:?}", fetch.first_error);
        assert!(fetch.fetched > 0);
    }
}
