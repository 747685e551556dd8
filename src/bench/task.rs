//! The task SVID benchmark behind `mayfly bench task`: the just-in-time path
//! workload → agent → server → workload.
//!
//! `MintX509SVID` over one HTTP/2 connection to the agent's Unix socket, kept open, with a
//! fixed number of requests in flight, for each level asked for. Each mint is an agent P-256
//! key and CSR, an mTLS round trip to the server (entry lookup, policy, CSR verify, leaf sign,
//! durable audit record) and the answer back.
//!
//! It runs in each [`Layout`] asked for (see [`super::deploy`]): first as deployed — `mayfly
//! server run` and `mayfly agent run` as child processes on a throwaway data dir with SQLite,
//! the benchmark process being only the workload, and the CPU of each process read from
//! /proc — then, unless left out, with server and agent in this process on the workload's
//! runtime. After each layout the audit chain is verified through the admin API. Last, with
//! everything stopped, the reference: the crypto the path cannot avoid (keygen + CSR sign, CSR
//! verify + leaf sign) on one thread.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use mayfly::ca::Authority;
use mayfly::id::{ScopedId, TrustDomain, parse_scopes};
use mayfly::proto::task::{MintJwtsvidRequest, MintX509svidRequest};
use mayfly::server;
use mayfly::svid::{self, KeyAndCsr, LeafSpec, SvidError};
use mayfly::workload_client as wc;
use serde::Serialize;

use super::agent::{
    AgentBenchError, Latency, SCOPE, TTL_SECS, Tally, invalid, met, status_text, timed,
};
use super::deploy::{Deployment, Layout};
use super::{BenchError, pid_cpu_secs, process_cpu_secs};

/// The goal for the p50 of one task SVID at 1 in flight, in µs.
pub const TASK_GOAL_P50_US: f64 = 750.0;
/// The goal for the p99 of one task SVID at 1 in flight, in µs.
pub const TASK_GOAL_P99_US: f64 = 2500.0;

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
    /// The layouts to measure, in this order (default: processes, then in-process).
    pub layouts: Vec<Layout>,
    /// The `mayfly` executable for the server and agent processes; this process's executable
    /// when `None`.
    pub exe: Option<PathBuf>,
    /// Rotate the server's CA (prepare, then activate) this often while the levels run.
    pub rotate_every: Option<Duration>,
    /// What each level mints, one measurement per kind in this order (default: X.509 only).
    /// With both, each level measures them back to back on the same deployment, so their
    /// ratio is taken on the same machine in the same minute.
    pub kinds: Vec<MintKind>,
}

/// What a level mints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MintKind {
    /// `MintX509SVID`: an agent key and CSR, a certificate signed by the server.
    X509,
    /// `MintJWTSVID`: no key and no CSR; a token signed by the server.
    Jwt,
}

/// The audience of the benchmark's task JWTs.
const JWT_AUDIENCE: &str = "bench-api";

impl Default for TaskBenchOptions {
    fn default() -> Self {
        Self {
            in_flight: vec![1, 16],
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(1),
            reference_duration: Duration::from_secs(3),
            layouts: vec![Layout::Processes, Layout::InProcess],
            exe: None,
            rotate_every: None,
            kinds: vec![MintKind::X509],
        }
    }
}

/// CPU time per task SVID of each process, in microseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct CpuPerProcess {
    /// The benchmark process: the workload's gRPC client and its runtime.
    pub workload_us: f64,
    /// The agent process: the task API, the key and CSR, the node API client.
    pub agent_us: f64,
    /// The server process: the node API, policy, CSR verify, leaf sign, store and audit.
    pub server_us: f64,
}

/// One in-flight level of the task benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct TaskLevel {
    /// What was minted.
    pub kind: MintKind,
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
    /// CPU time per task SVID of workload, agent and server together, in microseconds;
    /// `None` where /proc is unavailable.
    pub cpu_us_per_svid: Option<f64>,
    /// That CPU time over what the run's threads offer in the window (1.0: all busy).
    pub cpu_busy: Option<f64>,
    /// The same CPU time split by process; `None` in the in-process layout.
    pub by_process: Option<CpuPerProcess>,
}

/// The measurements of one layout.
#[derive(Debug, Clone, Serialize)]
pub struct TaskRun {
    /// Where server and agent ran.
    pub layout: Layout,
    /// In-process: the runtime's worker threads, shared by the workload, the agent and the
    /// server. Processes: the machine's cores (each process's runtime has as many workers).
    pub threads: usize,
    /// One measurement per in-flight level.
    pub levels: Vec<TaskLevel>,
    /// Audit records after the run (setup records included).
    pub audit_records: i64,
    /// Whether the audit hash chain verified after the run.
    pub audit_chain_ok: bool,
    /// CA rotations (prepare + activate) completed while the levels ran.
    pub ca_rotations: u64,
    /// Task JWT p50 over task X509-SVID p50 at 1 in flight, when both were measured (the
    /// issue's goal: at most 0.6).
    pub jwt_to_x509_p50: Option<f64>,
    /// The goal at 1 in flight: p50 ≤ 750 µs; `None` when 1 was not measured.
    pub goal_p50_met: Option<bool>,
    /// The goal at 1 in flight: p99 ≤ 2.5 ms.
    pub goal_p99_met: Option<bool>,
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
    /// The timed window of each level, in seconds.
    pub duration_secs: f64,
    /// One run per layout, in the order measured.
    pub runs: Vec<TaskRun>,
    /// The reference, measured after the load with servers and agents stopped.
    pub reference: CryptoReference,
}

impl fmt::Display for TaskBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "task SVIDs (MintX509SVID) workload -> agent -> server -> workload over one HTTP/2 connection to the agent socket; SQLite store, durable audit; {:.1}s per level",
            self.duration_secs
        )?;
        for run in &self.runs {
            write_run(f, run, self.duration_secs, self.reference.total_us)?;
        }
        let r = &self.reference;
        write!(
            f,
            "reference (one thread, in process): keygen + CSR sign {:.0} µs, CSR verify + leaf sign {:.0} µs, together {:.0} µs ({:.0}/s)",
            r.keygen_csr_us, r.verify_sign_us, r.total_us, r.per_sec
        )
    }
}

fn write_run(
    f: &mut fmt::Formatter<'_>,
    run: &TaskRun,
    secs: f64,
    reference_us: f64,
) -> fmt::Result {
    match run.layout {
        Layout::Processes => writeln!(
            f,
            "as deployed: server, agent and workload are three processes ({} cores)",
            run.threads
        )?,
        Layout::InProcess => writeln!(
            f,
            "in one process: server and agent on the workload's runtime ({} threads)",
            run.threads
        )?,
    }
    if run.ca_rotations > 0 {
        writeln!(
            f,
            "  with {} CA rotations (prepare + activate) during the run",
            run.ca_rotations
        )?;
    }
    for level in &run.levels {
        let kind = match level.kind {
            MintKind::X509 => "x509",
            MintKind::Jwt => "jwt ",
        };
        writeln!(
            f,
            "  {kind} {:>3} in flight: {:.0} SVIDs/s ({} in {secs:.1}s); {}",
            level.in_flight, level.per_sec, level.minted, level.latency
        )?;
        if let (Some(cpu), Some(busy)) = (level.cpu_us_per_svid, level.cpu_busy) {
            let split = level.by_process.map_or_else(String::new, |p| {
                format!(
                    ": workload {:.0}, agent {:.0}, server {:.0}",
                    p.workload_us, p.agent_us, p.server_us
                )
            });
            let of = match run.layout {
                Layout::Processes => "cores",
                Layout::InProcess => "threads",
            };
            writeln!(
                f,
                "                  cpu per SVID {cpu:.0} µs{split}; {:.0}% of {} {of} busy",
                busy * 100.0,
                run.threads
            )?;
        }
        match &level.first_error {
            None => writeln!(f, "                  errors: 0")?,
            Some(e) => writeln!(f, "                  errors: {} (first: {e})", level.errors)?,
        }
    }
    if let Some(ratio) = run.jwt_to_x509_p50 {
        writeln!(
            f,
            "  task JWT p50 / task X509-SVID p50 at 1 in flight: {ratio:.2} (goal <= 0.60: {})",
            met(ratio <= 0.6)
        )?;
    }
    if let Some(one) = run
        .levels
        .iter()
        .find(|l| l.in_flight == 1 && l.kind == MintKind::X509)
        && reference_us > 0.0
    {
        writeln!(
            f,
            "  ratio at 1 in flight: p50 {:.1}x the reference",
            one.latency.p50_us / reference_us
        )?;
    }
    writeln!(
        f,
        "  audit: {} records, hash chain {}",
        run.audit_records,
        if run.audit_chain_ok {
            "verified"
        } else {
            "BROKEN"
        }
    )?;
    match (run.goal_p50_met, run.goal_p99_met) {
        (Some(p50), Some(p99)) => writeln!(
            f,
            "  goal at 1 in flight: p50 <= {TASK_GOAL_P50_US:.0} µs {}, p99 <= {TASK_GOAL_P99_US:.0} µs {} (a shared, noisy machine: compare with the reference)",
            met(p50),
            met(p99)
        ),
        _ => writeln!(f, "  goal: not checked (1 in flight was not measured)"),
    }
}

/// Runs `mayfly bench task`: each in-flight level in each layout, then the reference.
///
/// Call it on a multi-threaded tokio runtime: in the in-process layout, server, agent and
/// workload share its workers.
///
/// # Errors
/// [`AgentBenchError`] when the benchmark cannot be set up (a process that does not start or
/// dies is one); failing requests are counted in the report instead.
pub async fn task_benchmark(opts: TaskBenchOptions) -> Result<TaskBenchReport, AgentBenchError> {
    if opts.in_flight.is_empty() || opts.in_flight.contains(&0) {
        return Err(invalid("every in-flight level must be at least 1"));
    }
    if opts.duration.is_zero() || opts.reference_duration.is_zero() {
        return Err(invalid(
            "the duration and the reference duration must be above zero",
        ));
    }
    if opts.layouts.is_empty() {
        return Err(invalid("at least one layout must be measured"));
    }
    if opts.kinds.is_empty() {
        return Err(invalid(
            "at least one kind of task credential must be measured",
        ));
    }
    let mut runs = Vec::with_capacity(opts.layouts.len());
    for &layout in &opts.layouts {
        runs.push(run_layout(layout, &opts).await?);
    }
    let reference = crypto_reference(opts.reference_duration).await?;
    Ok(TaskBenchReport {
        duration_secs: opts.duration.as_secs_f64(),
        runs,
        reference,
    })
}

async fn run_layout(layout: Layout, opts: &TaskBenchOptions) -> Result<TaskRun, AgentBenchError> {
    let threads = match layout {
        Layout::InProcess => tokio::runtime::Handle::current().metrics().num_workers(),
        Layout::Processes => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let mut deployment = Deployment::start(layout, opts.exe.as_deref()).await?;
    let result = async {
        let agent = deployment.start_agent().await?;
        let pids = (deployment.server_pid(), agent.pid());
        let rotations = opts
            .rotate_every
            .map(|every| tokio::spawn(super::rotate_cas(deployment.admin.clone(), every)));
        let levels = run_levels(&deployment, opts, threads, pids).await;
        let ca_rotations = super::stop_rotations(rotations).await;
        // A process that died under load explains the errors better than their count.
        let alive = deployment.check_server();
        agent.stop().await;
        alive?;
        let levels = levels?;
        let audit = deployment.verify_audit().await?;
        Ok::<_, AgentBenchError>((levels, audit, ca_rotations))
    }
    .await;
    deployment.stop().await;
    let (levels, (audit_records, audit_chain_ok), ca_rotations) = result?;
    let p50_at_one = |kind| {
        levels
            .iter()
            .find(|l| l.in_flight == 1 && l.kind == kind)
            .map(|l| l.latency.p50_us)
    };
    let jwt_to_x509_p50 = p50_at_one(MintKind::Jwt)
        .zip(p50_at_one(MintKind::X509))
        .filter(|(_, x)| *x > 0.0)
        .map(|(j, x)| j / x);
    let one = levels
        .iter()
        .find(|l| l.in_flight == 1 && l.kind == opts.kinds[0]);
    Ok(TaskRun {
        layout,
        threads,
        jwt_to_x509_p50,
        goal_p50_met: one.map(|l| l.latency.p50_us <= TASK_GOAL_P50_US),
        goal_p99_met: one.map(|l| l.latency.p99_us <= TASK_GOAL_P99_US),
        levels,
        audit_records,
        audit_chain_ok,
        ca_rotations,
    })
}

/// CPU seconds so far of the workload (this process), the agent and the server; the agent's
/// and server's are `None` when they run in this process.
#[derive(Clone, Copy)]
struct CpuSample {
    workload: Option<f64>,
    agent: Option<f64>,
    server: Option<f64>,
}

impl CpuSample {
    fn take((server, agent): (Option<u32>, Option<u32>)) -> Self {
        Self {
            workload: process_cpu_secs(),
            agent: agent.and_then(pid_cpu_secs),
            server: server.and_then(pid_cpu_secs),
        }
    }
}

async fn run_levels(
    deployment: &Deployment,
    opts: &TaskBenchOptions,
    threads: usize,
    pids: (Option<u32>, Option<u32>),
) -> Result<Vec<TaskLevel>, AgentBenchError> {
    let channel = wc::connect(&deployment.agent_socket()).await?;
    let api = wc::task_api(channel);
    let expected =
        ScopedId::new(deployment.entry_spiffe_id.clone(), parse_scopes(&[SCOPE])?)?.to_string();
    let mut levels = Vec::with_capacity(opts.in_flight.len() * opts.kinds.len());
    let runs = opts
        .in_flight
        .iter()
        .flat_map(|&n| opts.kinds.iter().map(move |&k| (n, k)));
    for (index, (in_flight, kind)) in runs.enumerate() {
        let start = Instant::now();
        let window = (start + opts.warmup, start + opts.warmup + opts.duration);
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = tokio::task::JoinSet::new();
        for worker in 0..in_flight {
            tasks.spawn(mint_loop(
                api.clone(),
                kind,
                format!("bench-{index}-{worker}"),
                expected.clone(),
                window,
                stop.clone(),
            ));
        }
        let (tally, from, until) =
            timed(window, &stop, &mut tasks, || CpuSample::take(pids)).await?;
        levels.push(level(
            (kind, in_flight),
            tally,
            (from, until),
            opts.duration,
            threads,
        ));
    }
    Ok(levels)
}

/// One level's figures from what its load counted and the CPU samples around its window.
fn level(
    (kind, in_flight): (MintKind, usize),
    tally: Tally,
    (from, until): (CpuSample, CpuSample),
    duration: Duration,
    threads: usize,
) -> TaskLevel {
    let secs = duration.as_secs_f64();
    let used = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| b - a);
    let workload = used(from.workload, until.workload);
    let agent = used(from.agent, until.agent);
    let server = used(from.server, until.server);
    let total = match (workload, agent, server) {
        (Some(w), Some(a), Some(s)) => Some(w + a + s),
        // In process: this process's CPU time is all three.
        (Some(w), None, None) => Some(w),
        _ => None,
    };
    let per_svid = |cpu: f64| cpu * 1e6 / tally.ok as f64;
    let by_process = match (workload, agent, server) {
        (Some(w), Some(a), Some(s)) if tally.ok > 0 => Some(CpuPerProcess {
            workload_us: per_svid(w),
            agent_us: per_svid(a),
            server_us: per_svid(s),
        }),
        _ => None,
    };
    TaskLevel {
        kind,
        in_flight,
        minted: tally.ok,
        per_sec: tally.ok as f64 / secs,
        cpu_us_per_svid: total.filter(|_| tally.ok > 0).map(per_svid),
        cpu_busy: total.map(|cpu| cpu / (secs * threads.max(1) as f64)),
        by_process,
        errors: tally.errors,
        first_error: tally.first_error,
        latency: Latency::of(tally.latencies_us),
    }
}

/// Keeps one MintX509SVID (or MintJWTSVID) in flight until `stop`.
pub(super) async fn mint_loop(
    mut api: wc::TaskApi,
    kind: MintKind,
    task_prefix: String,
    expected_id: String,
    window: (Instant, Instant),
    stop: Arc<AtomicBool>,
) -> Tally {
    let mut tally = Tally::default();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let task_id = format!("{task_prefix}-{n}");
        let sent = Instant::now();
        if kind == MintKind::Jwt {
            let answer = api.mint_jwtsvid(jwt_request(task_id)).await;
            let done = Instant::now();
            let problem = match answer {
                Ok(response) => {
                    let jwt = response.into_inner();
                    (jwt.spiffe_id != expected_id || jwt.token.is_empty()).then(|| {
                        format!(
                            "the agent answered {} ({} token bytes); expected {expected_id}",
                            jwt.spiffe_id,
                            jwt.token.len()
                        )
                    })
                }
                Err(status) => Some(status_text(&status)),
            };
            tally.record(problem, done, done.duration_since(sent), window);
            continue;
        }
        let request = MintX509svidRequest {
            task_id,
            scopes: vec![SCOPE.to_owned()],
            ttl_seconds: TTL_SECS,
            spiffe_id: String::new(),
        };
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

fn jwt_request(task_id: String) -> MintJwtsvidRequest {
    MintJwtsvidRequest {
        task_id,
        scopes: vec![SCOPE.to_owned()],
        ttl_seconds: TTL_SECS,
        spiffe_id: String::new(),
        audience: JWT_AUDIENCE.to_owned(),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A short run in the in-process layout (the process layout needs the `mayfly` binary:
    /// tests/bench.rs runs it):
    /// `cargo test --release --bin mayfly bench::task -- --ignored --nocapture`.
    #[test]
    #[ignore = "a benchmark: run it in release mode on purpose"]
    fn task_benchmark_in_process_short() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        let task = runtime
            .block_on(task_benchmark(TaskBenchOptions {
                duration: Duration::from_secs(2),
                reference_duration: Duration::from_secs(1),
                layouts: vec![Layout::InProcess],
                rotate_every: Some(Duration::from_millis(500)),
                ..TaskBenchOptions::default()
            }))
            .unwrap();
        println!("{task}");
        let run = &task.runs[0];
        // Rotations under way fail no mint.
        assert!(run.ca_rotations > 0, "{task}");
        assert!(run.levels.iter().all(|l| l.errors == 0 && l.minted > 0));
        assert!(run.audit_chain_ok);
    }
}
