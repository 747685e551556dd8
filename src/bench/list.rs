//! The operator-list benchmark behind `mayfly bench list`: the server's memory with many
//! entries, while they are created and while `mayfly entry list` pages through all of them.
//!
//! Every part is real: `mayfly server run` is a child process (SQLite in a fresh temporary
//! data dir, `synchronous=FULL`, the durable audit log), entries are created through its admin
//! API with many requests in flight, and the listing is `mayfly entry list --output json`, a
//! process of its own whose output is read as it streams, then `mayfly audit list --output
//! json` through the audit log (one record per entry created). The server's VmRSS is sampled from
//! /proc every 50 ms during each phase, and its VmHWM (the kernel's peak) read at the end.
//! The goal: ≤ 64 MiB at all times with 100,000 entries over 1,000 agents.
//!
//! Entries name 1,000 agent IDs as parents (`.../mayfly/agent/join_token/bench-node-NNNN`);
//! those agents are not attested, since neither creating nor listing entries needs them.

use std::fmt;
use std::io::{BufRead as _, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use mayfly::proto::admin as admin_pb;
use mayfly::server::ServerConfig;
use serde::Serialize;
use tokio::sync::watch;

use super::admin_err;
use super::agent::{AgentBenchError, ProcessMemory, SCOPE, TTL_SECS, invalid, met};
use super::deploy::{Deployment, Layout, this_executable};

/// The memory goal for the server, MiB.
const GOAL_MIB: f64 = 64.0;
/// How often the server's memory is sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);

/// What to run.
#[derive(Debug, Clone)]
pub struct ListBenchOptions {
    /// Entries to create (default 100,000).
    pub entries: usize,
    /// Distinct parent agents they are spread over (default 1,000).
    pub agents: usize,
    /// Create requests in flight (default 64).
    pub concurrency: usize,
    /// The `mayfly` executable for the server and the listing; this one when `None`.
    pub exe: Option<PathBuf>,
}

impl Default for ListBenchOptions {
    fn default() -> Self {
        Self {
            entries: 100_000,
            agents: 1_000,
            concurrency: 64,
            exe: None,
        }
    }
}

/// What one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct ListBenchReport {
    /// Entries created (besides the deployment's own one).
    pub entries: usize,
    /// Parent agents.
    pub agents: usize,
    /// The server before any entry was created.
    pub idle: Option<ProcessMemory>,
    /// Wall time to create them, seconds.
    pub create_secs: f64,
    /// Highest VmRSS sampled while creating, KiB.
    pub creating_max_rss_kib: u64,
    /// Entries `mayfly entry list --output json` printed.
    pub listed: usize,
    /// Its wall time, seconds.
    pub list_secs: f64,
    /// Highest server VmRSS sampled while it listed, KiB.
    pub listing_max_rss_kib: u64,
    /// Highest VmRSS of the `entry list` process itself, KiB.
    pub cli_max_rss_kib: u64,
    /// Audit records `mayfly audit list --output json` printed (one per entry created, and
    /// the deployment's own).
    pub audited: usize,
    /// Its wall time, seconds.
    pub audit_secs: f64,
    /// Highest server VmRSS sampled while it streamed, KiB.
    pub audit_max_rss_kib: u64,
    /// Paging through every entry over the admin API in this process (pages of 1000):
    /// microseconds per entry, as the server answers and the client decodes.
    pub api_us_per_entry: f64,
    /// One agent's entries with `entry list --parent-id` (its count, and the wall time of the
    /// command, ms).
    pub one_parent: (usize, f64),
    /// The server at the end, with its peak over the whole run (VmHWM).
    pub end: Option<ProcessMemory>,
}

impl ListBenchReport {
    /// The highest resident size seen in any phase, KiB (VmHWM when it could be read).
    pub fn peak_kib(&self) -> u64 {
        let sampled = self
            .creating_max_rss_kib
            .max(self.listing_max_rss_kib)
            .max(self.audit_max_rss_kib);
        self.end.map_or(sampled, |m| m.hwm_kib.max(sampled))
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

impl fmt::Display for ListBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let memory = |m: Option<ProcessMemory>| m.map_or("unknown".to_owned(), |m| m.to_string());
        writeln!(
            f,
            "mayfly bench list: {} entries over {} agents, server as a process (SQLite)",
            self.entries, self.agents
        )?;
        writeln!(f, "  server idle:       {}", memory(self.idle))?;
        writeln!(
            f,
            "  creating:          {:.1} s ({:.0} entries/s), server VmRSS max {:.1} MiB",
            self.create_secs,
            self.entries as f64 / self.create_secs.max(1e-9),
            mib(self.creating_max_rss_kib)
        )?;
        writeln!(
            f,
            "  entry list (JSON): {} entries in {:.1} s, server VmRSS max {:.1} MiB, CLI VmRSS max {:.1} MiB",
            self.listed,
            self.list_secs,
            mib(self.listing_max_rss_kib),
            mib(self.cli_max_rss_kib)
        )?;
        writeln!(
            f,
            "  audit list (JSON): {} records in {:.1} s, server VmRSS max {:.1} MiB",
            self.audited,
            self.audit_secs,
            mib(self.audit_max_rss_kib)
        )?;
        writeln!(
            f,
            "  admin API paging:  {:.2} µs per entry",
            self.api_us_per_entry
        )?;
        writeln!(
            f,
            "  --parent-id:       {} entries in {:.0} ms",
            self.one_parent.0, self.one_parent.1
        )?;
        writeln!(f, "  server at the end: {}", memory(self.end))?;
        write!(
            f,
            "goal: server memory <= {GOAL_MIB:.0} MiB at all times: peak {:.1} MiB: {}",
            mib(self.peak_kib()),
            met(mib(self.peak_kib()) <= GOAL_MIB)
        )
    }
}

/// Samples a process's VmRSS until stopped; answers the highest.
struct Sampler {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<u64>,
}

impl Sampler {
    fn start(pid: u32) -> Self {
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut max = 0;
            loop {
                if let Some(m) = ProcessMemory::of(pid) {
                    max = max.max(m.rss_kib);
                }
                tokio::select! {
                    _ = tokio::time::sleep(SAMPLE_EVERY) => {}
                    _ = stopped.changed() => return max,
                }
            }
        });
        Self { stop, task }
    }

    async fn finish(self) -> u64 {
        let _ = self.stop.send(true);
        self.task.await.unwrap_or(0)
    }
}

/// Runs the benchmark.
///
/// # Errors
/// [`AgentBenchError`] when the server cannot be started, an entry cannot be created, or the
/// listing fails.
pub async fn list_benchmark(opts: ListBenchOptions) -> Result<ListBenchReport, AgentBenchError> {
    if opts.entries == 0 || opts.agents == 0 || opts.concurrency == 0 {
        return Err(invalid(
            "--entries, --agents and --concurrency must each be at least 1",
        ));
    }
    let exe = match &opts.exe {
        Some(exe) => exe.clone(),
        None => this_executable()?,
    };
    let deployment = Deployment::start(Layout::Processes, Some(&exe)).await?;
    let pid = deployment
        .server_pid()
        .ok_or_else(|| AgentBenchError::Stalled("the server is not a process".into()))?;
    let socket = ServerConfig::with_defaults(deployment.dir().join("server")).admin_socket();
    let td = deployment.td.clone();
    let idle = ProcessMemory::of(pid);

    // Creating: many requests in flight over one HTTP/2 connection.
    let sampler = Sampler::start(pid);
    let started = Instant::now();
    let parent = |n: usize| format!("spiffe://{td}/mayfly/agent/join_token/bench-node-{n:04}");
    let mut creates = futures::stream::iter(0..opts.entries)
        .map(|i| {
            let mut admin = deployment.admin.clone();
            let request = admin_pb::CreateEntryRequest {
                spiffe_id: format!("spiffe://{td}/bench/list/workload-{i:06}"),
                parent_id: parent(i % opts.agents),
                selectors: vec![format!("unix:uid:{}", 1000 + i % 100)],
                scopes: vec![SCOPE.into()],
                ttl_seconds: TTL_SECS,
                dns_names: Vec::new(),
                ..Default::default()
            };
            async move { admin.create_entry(request).await }
        })
        .buffer_unordered(opts.concurrency);
    while let Some(done) = creates.next().await {
        done.map_err(admin_err("create an entry"))?;
    }
    drop(creates);
    let create_secs = started.elapsed().as_secs_f64();
    let creating_max_rss_kib = sampler.finish().await;

    // Listing with the CLI, its output read as it streams.
    let sampler = Sampler::start(pid);
    let started = Instant::now();
    let (listed, cli_max_rss_kib) = run_cli_list(&exe, &socket, &[]).await?;
    let list_secs = started.elapsed().as_secs_f64();
    let listing_max_rss_kib = sampler.finish().await;

    // The audit log (a record per entry created) streamed through `audit list`.
    let sampler = Sampler::start(pid);
    let started = Instant::now();
    let (audited, _) = run_cli(
        &exe,
        &socket,
        &["audit", "list", "--output", "json"],
        |line| line.starts_with('{'),
    )
    .await?;
    let audit_secs = started.elapsed().as_secs_f64();
    let audit_max_rss_kib = sampler.finish().await;

    // Paging in this process, and one agent's entries with a filter.
    let api_us_per_entry = page_through(&deployment).await?;
    let started = Instant::now();
    let one_parent_id = parent(0);
    let (one, _) = run_cli_list(&exe, &socket, &["--parent-id", &one_parent_id]).await?;
    let one_parent = (one, started.elapsed().as_secs_f64() * 1000.0);

    let end = ProcessMemory::of(pid);
    Ok(ListBenchReport {
        entries: opts.entries,
        agents: opts.agents,
        idle,
        create_secs,
        creating_max_rss_kib,
        listed,
        list_secs,
        listing_max_rss_kib,
        cli_max_rss_kib,
        audited,
        audit_secs,
        audit_max_rss_kib,
        api_us_per_entry,
        one_parent,
        end,
    })
}

/// Runs `mayfly entry list --output json <extra>` and counts the entries it prints; answers
/// them and the command's own highest VmRSS.
async fn run_cli_list(
    exe: &PathBuf,
    socket: &std::path::Path,
    extra: &[&str],
) -> Result<(usize, u64), AgentBenchError> {
    let mut args = vec!["entry", "list", "--output", "json"];
    args.extend_from_slice(extra);
    // Each entry of the pretty array has exactly one line `    "id": "…",`.
    run_cli(exe, socket, &args, |line| line.starts_with("    \"id\": ")).await
}

/// Runs `mayfly <args> --admin-socket <socket>` and counts the lines of its output that
/// `counts`; answers them and the command's own highest VmRSS.
async fn run_cli(
    exe: &PathBuf,
    socket: &std::path::Path,
    args: &[&str],
    counts: fn(&str) -> bool,
) -> Result<(usize, u64), AgentBenchError> {
    let mut child = Command::new(exe)
        .args(args)
        .arg("--admin-socket")
        .arg(socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| AgentBenchError::Spawn {
            exe: exe.clone(),
            source,
        })?;
    let sampler = Sampler::start(child.id());
    let stdout = child.stdout.take();
    let counted = tokio::task::spawn_blocking(move || {
        let count = stdout.map_or(0, |out| {
            BufReader::new(out)
                .lines()
                .map_while(Result::ok)
                .filter(|line| counts(line))
                .count()
        });
        (count, child.wait_with_output())
    })
    .await
    .map_err(|e| AgentBenchError::Stalled(format!("the listing reader failed: {e}")))?;
    let cli_max = sampler.finish().await;
    let (count, output) = counted;
    let output =
        output.map_err(|e| AgentBenchError::Stalled(format!("`entry list` failed: {e}")))?;
    if !output.status.success() {
        return Err(AgentBenchError::Stalled(format!(
            "`mayfly {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok((count, cli_max))
}

/// Pages through every entry over the admin API; answers microseconds per entry.
async fn page_through(deployment: &Deployment) -> Result<f64, AgentBenchError> {
    let mut admin = deployment.admin.clone();
    let mut request = admin_pb::ListEntriesRequest {
        page_size: 1000,
        ..Default::default()
    };
    let started = Instant::now();
    let mut total = 0usize;
    loop {
        let page = admin
            .list_entries(request.clone())
            .await
            .map_err(admin_err("list entries"))?
            .into_inner();
        total += page.entries.len();
        if page.next_page_token.is_empty() {
            break;
        }
        request.page_token = page.next_page_token;
    }
    Ok(started.elapsed().as_secs_f64() * 1e6 / total.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small run end to end (the figures are not checked: speed belongs to the benchmark).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "starts a server process; run with --ignored"]
    async fn list_benchmark_short() {
        let report = list_benchmark(ListBenchOptions {
            entries: 300,
            agents: 10,
            concurrency: 8,
            // The test binary lives in target/<profile>/deps; the `mayfly` binary beside it.
            exe: std::env::current_exe()
                .ok()
                .and_then(|t| Some(t.parent()?.parent()?.join("mayfly"))),
        })
        .await
        .unwrap();
        // The deployment's own entry is listed too; each entry and the join token is audited.
        assert_eq!(report.listed, 301);
        assert_eq!(report.audited, 302);
        assert_eq!(report.one_parent.0, 30);
        println!("{report}");
    }
}
