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
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mayfly::agent::{self, AgentError};
use mayfly::ca::CaError;
use mayfly::client::ClientError;
use mayfly::id::IdError;
use mayfly::proto::workload::X509svidRequest;
use mayfly::server::ServerError;
use mayfly::workload_client::{self as wc, WorkloadClientError};
use serde::Serialize;
use tokio::sync::{Semaphore, mpsc, watch};
use tonic::transport::Channel;

use super::deploy::{Deployment, Layout, create_entry, this_executable, wait_for_agent};
use super::{BenchError, percentile_ms, process_cpu_secs};

/// The scope every benchmark entry grants and every task SVID asks for.
pub(super) const SCOPE: &str = "bench:read";
/// The TTL of the benchmark entries and of the task SVIDs asked for, in seconds.
pub(super) const TTL_SECS: u32 = 300;
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

pub(super) fn invalid(message: &str) -> AgentBenchError {
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
    pub(super) fn of(mut samples_us: Vec<u32>) -> Self {
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
pub(super) struct Tally {
    pub(super) ok: u64,
    pub(super) ok_total: u64,
    pub(super) errors: u64,
    pub(super) first_error: Option<String>,
    pub(super) latencies_us: Vec<u32>,
}

impl Tally {
    /// Counts one answer that arrived at `done`, `elapsed` after it was sent.
    pub(super) fn record(
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

pub(super) fn status_text(status: &tonic::Status) -> String {
    format!(
        "{:?}: {}",
        status.code(),
        status.message().chars().take(300).collect::<String>()
    )
}

/// The goal for the p50 of a cached FetchX509SVID, in µs.
pub const FETCH_GOAL_P50_US: f64 = 200.0;
/// The goal for the agent's resident memory with the streams open, in bytes.
pub const STREAMS_GOAL_BYTES: u64 = 32 * 1024 * 1024;

pub(super) fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

/// Waits out the timed window, calling `sample` (CPU times) at both ends, stops the load and
/// adds up what its tasks counted.
pub(super) async fn timed<S>(
    (from, until): (Instant, Instant),
    stop: &AtomicBool,
    tasks: &mut tokio::task::JoinSet<Tally>,
    sample: impl Fn() -> S,
) -> Result<(Tally, S, S), AgentBenchError> {
    tokio::time::sleep_until(from.into()).await;
    let at_start = sample();
    tokio::time::sleep_until(until.into()).await;
    let at_end = sample();
    stop.store(true, Ordering::Relaxed);
    let mut total = Tally::default();
    while let Some(joined) = tasks.join_next().await {
        let tally = joined.map_err(|e| BenchError::Task(e.to_string()))?;
        total.merge(tally);
    }
    Ok((total, at_start, at_end))
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
    let mut deployment = Deployment::start(Layout::InProcess, None).await?;
    let result = async {
        let agent = deployment.start_agent().await?;
        let measured = run_fetches(&deployment, &opts).await;
        agent.stop().await;
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
    let (tally, start, end) = timed(window, &stop, &mut tasks, process_cpu_secs).await?;
    Ok((tally, start.zip(end).map(|(a, b)| b - a)))
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
        None => this_executable()?,
    };
    let mut deployment = Deployment::start(Layout::InProcess, None).await?;
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
    let mut agent = deployment.spawn_agent(exe)?;
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

    /// A short run of the fetch benchmark (the task benchmark's is in `task`):
    /// `cargo test --release --bin mayfly bench::agent -- --ignored --nocapture`.
    #[test]
    #[ignore = "a benchmark: run it in release mode on purpose"]
    fn fetch_benchmark_short() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
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
