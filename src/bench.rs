//! The issuance benchmark behind `mayfly bench issue`.
//!
//! It starts a real server in this process (the SQLite store with `synchronous=FULL` in WAL
//! mode unless a PostgreSQL URL is given, real TLS, the group-committed durable audit log),
//! registers one agent per connection through the admin API, attests each with a join token,
//! and then drives `IssueTask` over the node API: every connection is its own TCP + TLS 1.3 +
//! HTTP/2 channel, authenticated with its agent SVID, carrying a fixed number of requests in
//! flight. A request counts when it is answered OK with the SVID asked for within the timed
//! window (the warm-up is not timed); anything else is an error and is reported.
//!
//! The client keeps its own cost low: CSRs come from a small pool generated before the clock
//! starts (a real agent generates a key per SVID, but this measures the server), and responses
//! are not parsed beyond their SPIFFE ID.
//!
//! After the load, in the same run and with the server stopped, it measures the in-process
//! reference: what issuance costs in pure crypto and certificate building, that is
//! [`svid::parse_csr`] (ECDSA P-256 verify of the CSR) followed by [`svid::issue`] (building and
//! signing the leaf) with an in-memory CA, on one thread and on as many threads as the runtime
//! that served the load has workers. The ratio of the two rates says how much of the machine
//! the server spends on anything but issuing.
//!
//! Run a short one with
//! `cargo test --release --bin mayfly bench -- --ignored --nocapture`
//! (environment `MAYFLY_BENCH_SECS`, `MAYFLY_BENCH_CONNECTIONS`, `MAYFLY_BENCH_IN_FLIGHT`,
//! `MAYFLY_BENCH_DATABASE` and `MAYFLY_BENCH_WORKERS`, the runtime's worker threads, override
//! its settings).

pub mod agent;
pub mod attest;
pub mod attest_rate;
pub mod deploy;
pub mod handshake;
pub mod jwt;
pub mod list;
pub mod proxy;
pub mod sync;
pub mod task;

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tonic::transport::Channel;

use mayfly::ca::{Authority, CaError};
use mayfly::client::{self, AttestError, ClientError};
use mayfly::id::{IdError, ScopedId, SpiffeId, TrustDomain, parse_scopes};
use mayfly::proto::admin as admin_pb;
use mayfly::proto::admin::admin_client::AdminClient;
use mayfly::proto::node as node_pb;
use mayfly::proto::node::node_client::NodeClient;
use mayfly::server::{self, ServerConfig, ServerError};
use mayfly::svid::{self, KeyAndCsr, LeafSpec, SvidError};

/// The scope every benchmark task asks for (and its entry grants).
const SCOPE: &str = "bench:read";
/// The TTL every benchmark SVID asks for, in seconds.
const TTL_SECS: u32 = 300;
/// How many distinct CSRs the load generator cycles through.
const CSR_POOL: usize = 64;

/// What to run.
#[derive(Debug, Clone)]
pub struct IssueBenchOptions {
    /// Concurrent mTLS connections, one attested agent each (default 8).
    pub connections: usize,
    /// Requests kept in flight on each connection (default 32).
    pub in_flight: usize,
    /// The timed part of the load (default 10 s).
    pub duration: Duration,
    /// Load before the clock starts, not counted (default 2 s).
    pub warmup: Duration,
    /// How long each reference measurement (one thread, then all) runs (default 3 s).
    pub reference_duration: Duration,
    /// The server's data dir (a scratch one: the benchmark registers agents and entries and
    /// fills the audit log); a fresh temporary one, removed afterwards, when `None`.
    pub data_dir: Option<PathBuf>,
    /// `postgres://…` to use PostgreSQL (the benchmark writes entries, agents and audit records
    /// into it); `None` for SQLite in the data dir.
    pub database: Option<String>,
    /// Rotate the server's CA (`ca prepare`, then `ca activate`) this often during the run, to
    /// measure issuance with rotations under way; `None` for none.
    pub rotate_every: Option<Duration>,
}

impl Default for IssueBenchOptions {
    fn default() -> Self {
        Self {
            connections: 8,
            in_flight: 32,
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(2),
            reference_duration: Duration::from_secs(3),
            data_dir: None,
            database: None,
            rotate_every: None,
        }
    }
}

/// Why the benchmark could not run. Failed requests during the load are not errors of the
/// benchmark: they are counted in [`IssueBenchReport::errors`].
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// An option was out of range.
    #[error("invalid benchmark option: {0}")]
    InvalidOption(String),
    /// The temporary data directory could not be created.
    #[error("could not create a temporary data directory {path}: {source}")]
    TempDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The server did not start.
    #[error("the benchmark server did not start: {0}")]
    Server(#[from] ServerError),
    /// A client could not connect.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The admin API refused a setup step.
    #[error("the admin API refused to {what}: {}", .status.message())]
    Admin {
        /// The step.
        what: &'static str,
        /// Its answer.
        status: tonic::Status,
    },
    /// An agent could not attest.
    #[error("a benchmark agent could not attest: {0}")]
    Attest(#[from] AttestError),
    /// The server answered setup with something unusable.
    #[error("the server's answer during setup was unusable: {0}")]
    BadAnswer(String),
    /// A CSR for the pool could not be generated.
    #[error("could not generate a benchmark CSR: {0}")]
    Csr(SvidError),
    /// The reference CA could not be created.
    #[error("could not create the reference CA: {0}")]
    Ca(#[from] CaError),
    /// The reference issuance failed.
    #[error("the reference issuance failed: {0}")]
    Reference(SvidError),
    /// A load or reference task panicked or was cancelled.
    #[error("a benchmark task failed: {0}")]
    Task(String),
}

impl From<IdError> for BenchError {
    fn from(e: IdError) -> Self {
        Self::BadAnswer(e.to_string())
    }
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct IssueBenchReport {
    /// `sqlite` or `postgres`.
    pub database: String,
    /// Concurrent mTLS connections (one agent each).
    pub connections: usize,
    /// Requests in flight per connection.
    pub in_flight: usize,
    /// The runtime's worker threads, shared by server and load generator; also the thread count
    /// of the parallel reference.
    pub threads: usize,
    /// The timed window, in seconds.
    pub duration_secs: f64,
    /// SVIDs issued OK within the timed window.
    pub issued: u64,
    /// SVIDs issued OK over the whole run, warm-up included.
    pub issued_total: u64,
    /// Requests that failed or were answered with something other than the SVID asked for,
    /// over the whole run.
    pub errors: u64,
    /// The first such failure, when there was one.
    pub first_error: Option<String>,
    /// Issuance rate over the node API.
    pub svids_per_sec: f64,
    /// Median request latency, in milliseconds.
    pub latency_p50_ms: f64,
    /// 99th percentile request latency, in milliseconds.
    pub latency_p99_ms: f64,
    /// Slowest request, in milliseconds.
    pub latency_max_ms: f64,
    /// CA rotations (prepare and activate) completed during the run.
    pub ca_rotations: u64,
    /// The process's CPU time during the timed window over what `threads` cores offer (1.0:
    /// all busy); `None` where /proc is not available. A PostgreSQL server's own work is not
    /// in it.
    pub cpu_busy: Option<f64>,
    /// The process's CPU time per SVID issued in the timed window (server and load generator
    /// together), in microseconds; `None` where /proc is not available.
    pub cpu_us_per_svid: Option<f64>,
    /// The server's part of it: every thread but the load generator's (the node API, TLS,
    /// HTTP/2, policy, store and audit), in microseconds.
    pub server_cpu_us_per_svid: Option<f64>,
    /// The load generator's part of it (its TLS, HTTP/2 and gRPC client), in microseconds.
    pub load_cpu_us_per_svid: Option<f64>,
    /// Records in the audit log after the run (setup records included).
    pub audit_records: i64,
    /// Whether the audit hash chain verified after the run.
    pub audit_chain_ok: bool,
    /// Reference: CSR verify + leaf sign per second on one thread.
    pub reference_single_per_sec: f64,
    /// Reference: CSR verify + leaf sign per second on `threads` threads.
    pub reference_parallel_per_sec: f64,
    /// `svids_per_sec / reference_parallel_per_sec`.
    pub ratio: f64,
    /// The reference's CPU per issuance (one thread) over the server's CPU per SVID: the share
    /// of the server's work that is the issuance itself, independent of what the load
    /// generator in the same process costs.
    pub server_cpu_ratio: Option<f64>,
}

impl fmt::Display for IssueBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "issuance over the node API: {:.0} SVIDs/s ({} in {:.1}s; {} mTLS connections x {} in flight; {} store, durable audit; {} threads)",
            self.svids_per_sec,
            self.issued,
            self.duration_secs,
            self.connections,
            self.in_flight,
            self.database,
            self.threads,
        )?;
        if self.ca_rotations > 0 {
            writeln!(
                f,
                "with {} CA rotations (prepare + activate) during the run",
                self.ca_rotations
            )?;
        }
        writeln!(
            f,
            "latency: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            self.latency_p50_ms, self.latency_p99_ms, self.latency_max_ms
        )?;
        match &self.first_error {
            None => writeln!(f, "errors: 0")?,
            Some(e) => writeln!(f, "errors: {} (first: {e})", self.errors)?,
        }
        if let (Some(busy), Some(per_svid)) = (self.cpu_busy, self.cpu_us_per_svid) {
            let reference = if self.reference_single_per_sec > 0.0 {
                1e6 / self.reference_single_per_sec
            } else {
                0.0
            };
            writeln!(
                f,
                "cpu: {:.0}% of {} cores busy; {per_svid:.0} µs of CPU per SVID: server {:.0} µs, load generator {:.0} µs; reference {reference:.0} µs",
                busy * 100.0,
                self.threads,
                self.server_cpu_us_per_svid.unwrap_or(0.0),
                self.load_cpu_us_per_svid.unwrap_or(0.0),
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
        writeln!(
            f,
            "reference (CSR verify + sign, in process): {:.0} ops/s on {} threads, {:.0} ops/s on 1 thread",
            self.reference_parallel_per_sec, self.threads, self.reference_single_per_sec
        )?;
        write!(
            f,
            "ratio: {:.2} (node API SVIDs/s / reference on {} threads)",
            self.ratio, self.threads
        )?;
        if let Some(server) = self.server_cpu_ratio {
            write!(
                f,
                "; server CPU ratio {server:.2} (reference µs / server µs per SVID)"
            )?;
        }
        Ok(())
    }
}

/// Removes the temporary data dir when the benchmark ends, however it ends.
struct TempDir(PathBuf);

impl TempDir {
    fn create() -> Result<Self, BenchError> {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let path =
            std::env::temp_dir().join(format!("mayfly-bench-{}-{nanos:x}", std::process::id()));
        std::fs::create_dir(&path).map_err(|source| BenchError::TempDir {
            path: path.clone(),
            source,
        })?;
        Ok(Self(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the issuance benchmark: the load over the node API, then the in-process reference.
///
/// Call it on a multi-threaded tokio runtime: its worker count is the thread count the server
/// (and the load generator) get, and the reference runs on as many threads.
///
/// # Errors
/// [`BenchError`] when the benchmark cannot be set up; failing requests are counted in the
/// report instead.
pub async fn issue_benchmark(opts: IssueBenchOptions) -> Result<IssueBenchReport, BenchError> {
    if opts.connections == 0 || opts.in_flight == 0 {
        return Err(BenchError::InvalidOption(
            "connections and in-flight requests must be at least 1".into(),
        ));
    }
    if opts.duration.is_zero() || opts.reference_duration.is_zero() {
        return Err(BenchError::InvalidOption(
            "the duration and the reference duration must be above zero".into(),
        ));
    }
    let threads = tokio::runtime::Handle::current().metrics().num_workers();

    let (data_dir, temp) = match &opts.data_dir {
        Some(dir) => (dir.clone(), None),
        None => {
            let temp = TempDir::create()?;
            (temp.0.join("server"), Some(temp))
        }
    };
    let mut config = ServerConfig::with_defaults(data_dir);
    config.bind = SocketAddr::from(([127, 0, 0, 1], 0));
    config.database = opts.database.clone();
    let running = server::start(config).await?;

    // The load generator gets a runtime (and threads) of its own, named so that its CPU time
    // can be told apart from the server's: both share the machine's cores, and the report
    // gives the server's CPU per SVID beside the total.
    let load_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .thread_name(LOAD_THREAD_NAME)
        .enable_all()
        .build()
        .map_err(|e| {
            BenchError::Task(format!("could not start the load generator's runtime: {e}"))
        })?;
    let target = LoadTarget {
        trust_domain: running.trust_domain.clone(),
        admin_socket: running.admin_socket.clone(),
        node_addr: running.node_addr,
    };
    let rotations = match opts.rotate_every {
        Some(every) => {
            let admin = client::connect_admin(&running.admin_socket)
                .await
                .map_err(|e| BenchError::Task(format!("could not reach the admin API: {e}")))?;
            Some(tokio::spawn(rotate_cas(admin, every)))
        }
        None => None,
    };
    let load = load_runtime
        .spawn(run_load(target, opts.clone()))
        .await
        .map_err(|e| BenchError::Task(e.to_string()));
    let ca_rotations = stop_rotations(rotations).await;
    load_runtime.shutdown_background();
    running.shutdown().await;
    let load = load??;

    let (single, parallel) = reference(threads, opts.reference_duration).await?;
    drop(temp);

    let secs = opts.duration.as_secs_f64();
    let svids_per_sec = load.issued as f64 / secs;
    let issued = load.issued;
    let per_svid = |cpu: Option<f64>| {
        cpu.filter(|_| issued > 0)
            .map(|cpu| cpu * 1e6 / issued as f64)
    };
    let server_cpu_us_per_svid = per_svid(load.cpu.map(|cpu| cpu.total - cpu.load));
    let mut latencies = load.latencies_us;
    latencies.sort_unstable();
    Ok(IssueBenchReport {
        database: if opts.database.is_some() {
            "postgres".into()
        } else {
            "sqlite".into()
        },
        connections: opts.connections,
        in_flight: opts.in_flight,
        threads,
        duration_secs: secs,
        issued: load.issued,
        issued_total: load.issued_total,
        errors: load.errors,
        first_error: load.first_error,
        svids_per_sec,
        latency_p50_ms: percentile_ms(&latencies, 0.50),
        latency_p99_ms: percentile_ms(&latencies, 0.99),
        latency_max_ms: latencies.last().map_or(0.0, |&us| f64::from(us) / 1000.0),
        ca_rotations,
        cpu_busy: load
            .cpu
            .map(|cpu| cpu.total / (secs * threads.max(1) as f64)),
        cpu_us_per_svid: per_svid(load.cpu.map(|cpu| cpu.total)),
        server_cpu_us_per_svid,
        load_cpu_us_per_svid: per_svid(load.cpu.map(|cpu| cpu.load)),
        audit_records: load.audit_records,
        audit_chain_ok: load.audit_chain_ok,
        reference_single_per_sec: single,
        reference_parallel_per_sec: parallel,
        ratio: if parallel > 0.0 {
            svids_per_sec / parallel
        } else {
            0.0
        },
        server_cpu_ratio: server_cpu_us_per_svid
            .filter(|&server_us| server_us > 0.0 && single > 0.0)
            .map(|server_us| (1e6 / single) / server_us),
    })
}

/// Rotations done by [`rotate_cas`], read when its task is aborted.
static ROTATIONS: AtomicU64 = AtomicU64::new(0);

/// Rotates the server's CA every `every` through the admin API until aborted; returns (and
/// leaves in [`ROTATIONS`]) how many rotations completed.
pub(crate) async fn rotate_cas(mut admin: AdminClient<Channel>, every: Duration) -> u64 {
    ROTATIONS.store(0, Ordering::Relaxed);
    loop {
        tokio::time::sleep(every).await;
        let prepared = admin.prepare_ca(admin_pb::PrepareCaRequest {}).await;
        let activated = admin.activate_ca(admin_pb::ActivateCaRequest {}).await;
        if prepared.is_ok() && activated.is_ok() {
            ROTATIONS.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Stops a [`rotate_cas`] task and returns how many rotations it completed.
pub(crate) async fn stop_rotations(task: Option<tokio::task::JoinHandle<u64>>) -> u64 {
    match task {
        Some(task) => {
            task.abort();
            task.await
                .unwrap_or_else(|_| ROTATIONS.swap(0, Ordering::Relaxed))
        }
        None => 0,
    }
}

/// What the benchmark's load generator threads are called (at most 15 bytes, the kernel's
/// limit, so /proc shows the whole name).
const LOAD_THREAD_NAME: &str = "mayfly-load";

/// The server the load is aimed at.
struct LoadTarget {
    trust_domain: TrustDomain,
    admin_socket: PathBuf,
    node_addr: SocketAddr,
}

/// CPU seconds over the timed window: the whole process's, and the load generator's part.
#[derive(Debug, Clone, Copy)]
struct CpuSplit {
    total: f64,
    load: f64,
}

impl CpuSplit {
    /// This process's CPU time so far, and that of its load generator threads.
    fn now() -> Option<Self> {
        Some(Self {
            total: process_cpu_secs()?,
            load: threads_cpu_secs(LOAD_THREAD_NAME)?,
        })
    }

    fn since(self, start: Self) -> Self {
        Self {
            total: self.total - start.total,
            load: self.load - start.load,
        }
    }
}

/// What the load phase measured.
struct LoadResult {
    issued: u64,
    issued_total: u64,
    errors: u64,
    first_error: Option<String>,
    latencies_us: Vec<u32>,
    cpu: Option<CpuSplit>,
    audit_records: i64,
    audit_chain_ok: bool,
}

/// One load task's tally.
#[derive(Default)]
struct Tally {
    issued: u64,
    issued_total: u64,
    errors: u64,
    first_error: Option<String>,
    latencies_us: Vec<u32>,
}

/// The agents and entries to issue for, one per connection.
struct Worker {
    node: NodeClient<Channel>,
    entry_id: String,
    expected_id: String,
}

fn admin_err(what: &'static str) -> impl FnOnce(tonic::Status) -> BenchError {
    move |status| BenchError::Admin { what, status }
}

/// Registers and attests one agent per connection, then runs the timed load and checks the
/// audit log.
async fn run_load(target: LoadTarget, opts: IssueBenchOptions) -> Result<LoadResult, BenchError> {
    let td = target.trust_domain;
    let mut admin = client::connect_admin(&target.admin_socket).await?;
    let bundle = admin
        .get_bundle(admin_pb::GetBundleRequest {})
        .await
        .map_err(admin_err("return the trust bundle"))?
        .into_inner();
    let bundles = client::bundle_map(&td, &bundle.certificates);
    let server_id = mayfly::wire::server_id(&td);

    let mut workers = Vec::with_capacity(opts.connections);
    for i in 0..opts.connections {
        workers.push(
            register_worker(&mut admin, &td, target.node_addr, &bundles, &server_id, i).await?,
        );
    }

    let csrs: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..CSR_POOL)
            .map(|_| KeyAndCsr::generate().map(|k| k.csr))
            .collect::<Result<_, _>>()
            .map_err(BenchError::Csr)?,
    );

    let start = Instant::now();
    let measure_from = start + opts.warmup;
    let measure_until = measure_from + opts.duration;
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    for (c, worker) in workers.iter().enumerate() {
        for t in 0..opts.in_flight {
            let request = node_pb::IssueTaskRequest {
                entry_id: worker.entry_id.clone(),
                csr: Vec::new(),
                task_id: String::new(),
                scopes: vec![SCOPE.to_owned()],
                ttl_seconds: TTL_SECS,
            };
            tasks.spawn(load_task(
                worker.node.clone(),
                request,
                worker.expected_id.clone(),
                csrs.clone(),
                c * opts.in_flight + t,
                (measure_from, measure_until),
                stop.clone(),
            ));
        }
    }
    // The process's CPU time over the timed window, sampled at both ends of it.
    tokio::time::sleep_until(measure_from.into()).await;
    let cpu_start = CpuSplit::now();
    tokio::time::sleep_until(measure_until.into()).await;
    let cpu_end = CpuSplit::now();
    stop.store(true, Ordering::Relaxed);

    let mut total = Tally::default();
    while let Some(joined) = tasks.join_next().await {
        let tally = joined.map_err(|e| BenchError::Task(e.to_string()))?;
        total.issued += tally.issued;
        total.issued_total += tally.issued_total;
        total.errors += tally.errors;
        if total.first_error.is_none() {
            total.first_error = tally.first_error;
        }
        total.latencies_us.extend(tally.latencies_us);
    }
    drop(workers);

    let verdict = admin
        .verify_audit(admin_pb::VerifyAuditRequest {})
        .await
        .map_err(admin_err("verify the audit log"))?
        .into_inner();
    if !verdict.ok && total.first_error.is_none() {
        total.first_error = Some(format!("the audit chain is broken: {}", verdict.problem));
    }
    Ok(LoadResult {
        issued: total.issued,
        issued_total: total.issued_total,
        errors: total.errors,
        first_error: total.first_error,
        latencies_us: total.latencies_us,
        cpu: cpu_start.zip(cpu_end).map(|(a, b)| b.since(a)),
        audit_records: verdict.records,
        audit_chain_ok: verdict.ok,
    })
}

/// Creates a join token, attests an agent with it over its own mTLS connection, and registers
/// an entry for that agent.
async fn register_worker(
    admin: &mut mayfly::proto::admin::admin_client::AdminClient<Channel>,
    td: &TrustDomain,
    addr: SocketAddr,
    bundles: &mayfly::svid::Bundles,
    server_id: &SpiffeId,
    index: usize,
) -> Result<Worker, BenchError> {
    let token = admin
        .create_join_token(admin_pb::CreateJoinTokenRequest { ttl_seconds: 0 })
        .await
        .map_err(admin_err("create a join token"))?
        .into_inner();
    let agent =
        client::attest_with_join_token(addr, bundles.clone(), server_id, &token.token).await?;
    let spiffe_id = td.join(&format!("/bench/worker-{index}"))?;
    let entry = admin
        .create_entry(admin_pb::CreateEntryRequest {
            spiffe_id: spiffe_id.to_string(),
            parent_id: agent.spiffe_id.to_string(),
            selectors: vec!["unix:uid:1000".into()],
            scopes: vec![SCOPE.into()],
            ttl_seconds: TTL_SECS,
            dns_names: Vec::new(),
            ..Default::default()
        })
        .await
        .map_err(admin_err("create an entry"))?
        .into_inner();
    let expected = ScopedId::new(spiffe_id, parse_scopes(&[SCOPE])?)?;
    Ok(Worker {
        node: agent.node,
        entry_id: entry.id,
        expected_id: expected.to_string(),
    })
}

/// Keeps one request in flight until `stop`, counting the answers that complete within the
/// timed window.
async fn load_task(
    mut node: NodeClient<Channel>,
    mut request: node_pb::IssueTaskRequest,
    expected_id: String,
    csrs: Arc<Vec<Vec<u8>>>,
    slot: usize,
    (from, until): (Instant, Instant),
    stop: Arc<AtomicBool>,
) -> Tally {
    let mut tally = Tally::default();
    // Every request is a task of its own with an unpredictable ID, as agents send them (a
    // UUID, say): the audit log's index by task sees scattered keys, not a few hot ones.
    let mut task = slot as u64;
    let mut next_csr = slot % csrs.len();
    while !stop.load(Ordering::Relaxed) {
        task = task.wrapping_add(0x9e37_79b9_7f4a_7c15);
        request.task_id = format!("bench-{:016x}", splitmix64(task));
        request.csr.clone_from(&csrs[next_csr]);
        next_csr = (next_csr + 1) % csrs.len();
        let sent = Instant::now();
        let answer = node.issue_task(request.clone()).await;
        let done = Instant::now();
        let problem = match answer {
            Ok(response) => match response.into_inner().svid {
                Some(svid) if svid.spiffe_id == expected_id && !svid.cert_chain.is_empty() => None,
                Some(svid) => Some(format!(
                    "the server issued {} with {} certificates; expected {expected_id}",
                    svid.spiffe_id,
                    svid.cert_chain.len()
                )),
                None => Some("the server answered OK without an SVID".to_owned()),
            },
            Err(status) => Some(format!(
                "{:?}: {}",
                status.code(),
                status.message().chars().take(300).collect::<String>()
            )),
        };
        match problem {
            None => {
                tally.issued_total += 1;
                if done >= from && done < until {
                    tally.issued += 1;
                    let us = done.duration_since(sent).as_micros();
                    tally
                        .latencies_us
                        .push(u32::try_from(us).unwrap_or(u32::MAX));
                }
            }
            Some(problem) => {
                tally.errors += 1;
                if tally.first_error.is_none() {
                    tally.first_error = Some(problem);
                }
            }
        }
    }
    tally
}

/// SplitMix64's output function: a well-mixed 64-bit value for each input, for task IDs that
/// look random without asking the system for randomness.
fn splitmix64(x: u64) -> u64 {
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The value at quantile `q` of sorted microsecond samples, in milliseconds.
fn percentile_ms(sorted_us: &[u32], q: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let rank = ((sorted_us.len() as f64 * q).ceil() as usize).clamp(1, sorted_us.len());
    f64::from(sorted_us[rank - 1]) / 1000.0
}

/// This process's user + system CPU time in seconds, from /proc (Linux reports it in units of
/// USER_HZ, 100 per second); `None` where that is unavailable.
fn process_cpu_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let (_, ticks) = stat_cpu_ticks(&stat)?;
    Some(ticks as f64 / 100.0)
}

/// Process `pid`'s user + system CPU time in seconds, from /proc; `None` where that is
/// unavailable or the process is gone.
fn pid_cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, ticks) = stat_cpu_ticks(&stat)?;
    Some(ticks as f64 / 100.0)
}

/// The CPU time in seconds of this process's threads named `name`, from /proc; `None` where
/// that is unavailable.
fn threads_cpu_secs(name: &str) -> Option<f64> {
    let mut ticks = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let Ok(stat) = std::fs::read_to_string(task.ok()?.path().join("stat")) else {
            // The thread ended between listing and reading.
            continue;
        };
        let (comm, thread_ticks) = stat_cpu_ticks(&stat)?;
        if comm == name {
            ticks += thread_ticks;
        }
    }
    Some(ticks as f64 / 100.0)
}

/// The command name and user + system CPU ticks of a process's or thread's `stat` line.
fn stat_cpu_ticks(stat: &str) -> Option<(&str, u64)> {
    // The command name (field 2) may hold spaces; the fields after its ')' are fixed.
    let (head, after) = stat.rsplit_once(')')?;
    let comm = head.split_once('(')?.1;
    let mut fields = after.split_whitespace();
    // After ')': state is field 3, so utime (14) and stime (15) are the 12th and 13th.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((comm, utime + stime))
}

/// The reference: [`svid::parse_csr`] then [`svid::issue`] with an in-memory CA, for the same
/// ID, TTL and CSR pool as the load, on one thread and then on `threads` threads. Ops/s each.
async fn reference(threads: usize, duration: Duration) -> Result<(f64, f64), BenchError> {
    tokio::task::spawn_blocking(move || -> Result<(f64, f64), BenchError> {
        let td = TrustDomain::new(server::defaults::TRUST_DOMAIN)?;
        let authority = Authority::generate(&td, server::defaults::CA_TTL)?;
        let id = ScopedId::new(td.join("/bench/worker-0")?, parse_scopes(&[SCOPE])?)?;
        let csrs = (0..CSR_POOL)
            .map(|_| KeyAndCsr::generate().map(|k| k.csr))
            .collect::<Result<Vec<_>, _>>()
            .map_err(BenchError::Csr)?;
        let run = |offset: usize| -> Result<u64, BenchError> {
            let until = Instant::now() + duration;
            let mut ops = 0u64;
            let mut i = offset;
            while Instant::now() < until {
                let key = svid::parse_csr(&csrs[i % csrs.len()]).map_err(BenchError::Reference)?;
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
                .map_err(BenchError::Reference)?;
                std::hint::black_box(issued);
                ops += 1;
                i += 1;
            }
            Ok(ops)
        };
        let secs = duration.as_secs_f64();
        let single = run(0)? as f64 / secs;
        let threads = threads.max(1);
        let parallel = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|t| scope.spawn(move || run(t * 7)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .map_err(|_| BenchError::Task("a reference thread panicked".into()))?
                })
                .sum::<Result<u64, BenchError>>()
        })? as f64
            / secs;
        Ok((single, parallel))
    })
    .await
    .map_err(|e| BenchError::Task(e.to_string()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_num<T: std::str::FromStr>(name: &str) -> Option<T> {
        std::env::var(name).ok().and_then(|v| v.parse().ok())
    }

    /// A short benchmark, for profiling and as an example of running it:
    /// `cargo test --release --bin mayfly bench -- --ignored --nocapture`.
    #[test]
    #[ignore = "a benchmark: run it in release mode on purpose"]
    fn issue_benchmark_short() {
        let threads = env_num("MAYFLY_BENCH_WORKERS")
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
            .unwrap();
        let defaults = IssueBenchOptions::default();
        let opts = IssueBenchOptions {
            connections: env_num("MAYFLY_BENCH_CONNECTIONS").unwrap_or(defaults.connections),
            in_flight: env_num("MAYFLY_BENCH_IN_FLIGHT").unwrap_or(defaults.in_flight),
            duration: Duration::from_secs(env_num("MAYFLY_BENCH_SECS").unwrap_or(4)),
            warmup: Duration::from_secs(1),
            reference_duration: Duration::from_secs(2),
            database: std::env::var("MAYFLY_BENCH_DATABASE").ok(),
            ..defaults
        };
        let report = runtime.block_on(issue_benchmark(opts)).unwrap();
        println!("{report}");
        println!("{}", serde_json::to_string(&report).unwrap());
        assert_eq!(report.errors, 0, "{:?}", report.first_error);
        assert!(report.issued > 0);
        assert!(report.audit_chain_ok);
        assert!(report.audit_records >= i64::try_from(report.issued_total).unwrap());
    }

    #[test]
    fn stat_lines_give_the_name_and_cpu_ticks() {
        // A name with a space and a ')' of its own: only the last ')' ends it.
        let line = "42 (load (x) y) S 1 42 42 0 -1 4194560 100 0 0 0 7 5 0 0 20 0 3";
        assert_eq!(stat_cpu_ticks(line), Some(("load (x) y", 12)));
        assert_eq!(stat_cpu_ticks("42 (short) S 1"), None);
    }

    #[test]
    fn percentiles() {
        assert_eq!(percentile_ms(&[], 0.5), 0.0);
        let samples: Vec<u32> = (1..=100).map(|ms| ms * 1000).collect();
        assert_eq!(percentile_ms(&samples, 0.50), 50.0);
        assert_eq!(percentile_ms(&samples, 0.99), 99.0);
        assert_eq!(percentile_ms(&samples, 1.0), 100.0);
    }
}
