//! The `mayfly` command: parses, calls the library, prints. No logic lives here: the settings
//! are merged and validated in the library, the areas' commands live in `cli/`, and every line
//! goes through one printer that takes a closed stdout as a quiet end.
#![forbid(unsafe_code)]

mod bench;
mod cli;
mod demo;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, CommandFactory, Parser, Subcommand};
use cli::admin::{AgentAdminCommand, AuditCommand, BundleCommand, TokenCommand};
use cli::ca::CaCommand;
use cli::entry::EntryCommand;
use cli::output::{Format, Printer, is_closed};
use cli::run::{AgentRunArgs, ProxyArgs, ServerRunArgs};
use cli::workload::SvidCommand;
use mayfly::client::connect_admin;

/// Mayfly: short-lived, scope-carrying SPIFFE identities for AI agents and the services they
/// call.
#[derive(Parser)]
#[command(name = "mayfly", version, about, propagate_version = true)]
struct Cli {
    /// The server's admin socket.
    #[arg(
        long,
        global = true,
        env = "MAYFLY_ADMIN_SOCKET",
        default_value = ".mayfly/server/admin.sock"
    )]
    admin_socket: PathBuf,
    /// How to print records.
    #[arg(long, global = true, value_enum, default_value_t = Format::Text)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    #[command(subcommand)]
    Server(ServerCommand),
    /// Join tokens for agents.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Registration entries.
    #[command(subcommand)]
    Entry(EntryCommand),
    /// Attested agents.
    #[command(subcommand)]
    Agent(AgentCommand),
    /// The trust bundle.
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// The CAs, and rotating them by hand.
    #[command(subcommand)]
    Ca(CaCommand),
    /// SVIDs for this workload, from the agent's socket.
    #[command(subcommand)]
    Svid(SvidCommand),
    /// The enforcing mTLS proxy: verifies SPIFFE ID and scope, then forwards.
    Proxy(ProxyArgs),
    /// The whole story in one process on a throwaway data dir, narrated.
    Demo,
    /// The issuance audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Print a shell completion script, e.g. `mayfly completions bash > /etc/bash_completion.d/mayfly`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand)]
enum ServerCommand {
    /// Run the server on the embedded defaults, a config file, the environment, or flags.
    Run(Box<ServerRunArgs>),
}

#[derive(Subcommand)]
enum AgentCommand {
    /// Run an agent: attest this node, then serve the Workload API to its workloads.
    Run(Box<AgentRunArgs>),
    #[command(flatten)]
    Admin(AgentAdminCommand),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Issuance over the real node API with concurrent mTLS clients, audit durable.
    Issue(BenchIssueArgs),
    /// Task SVID latency, workload -> agent -> server -> workload, over the agent socket.
    Task(BenchTaskArgs),
    /// Cached FetchX509SVID latency: a new stream per request on one connection.
    Fetch(BenchFetchArgs),
    /// Agent memory with many workloads holding FetchX509SVID streams, and fan-out of a change.
    Streams(BenchStreamsArgs),
    /// Server CPU of an mTLS handshake: our SPIFFE+scope verifier against plain webpki.
    Handshake(BenchHandshakeArgs),
    /// mayfly proxy against nginx (mTLS requests/s and new-connection handshakes/s), and with
    /// --accept jwt against --accept x509, plus jwt::validate against raw ES256 verify.
    Proxy(BenchProxyArgs),
    /// Server memory with many entries, while creating them and while `entry list` pages them.
    List(BenchListArgs),
    /// Entry sync: server time per entry of an agent's full list, and how fast a new or
    /// deleted entry reaches many workload streams.
    Sync(BenchSyncArgs),
    /// Task mint latency and server CPU, quiet and during a flood of bad attestations from
    /// one address.
    AttestFlood(BenchAttestFloodArgs),
    /// Node attestations per second for each node attestor (server as a process), beside
    /// the raw cost of the checks each makes.
    Attest(BenchAttestArgs),
}

#[derive(Args)]
struct BenchAttestArgs {
    /// Attestations per attestor.
    #[arg(long, default_value_t = 400)]
    count: usize,
    /// Concurrent attesting connections.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
}

#[derive(Args)]
struct BenchAttestFloodArgs {
    /// Each window's measured part (quiet, then flood).
    #[arg(long, default_value = "5s")]
    duration: String,
    /// Concurrent flooding connections.
    #[arg(long, default_value_t = 4)]
    flooders: usize,
}

#[derive(Args)]
struct BenchSyncArgs {
    /// Entries per agent.
    #[arg(long, default_value_t = 5_000)]
    entries: usize,
    /// Workload streams held on the agent.
    #[arg(long, default_value_t = 1_000)]
    streams: usize,
    /// Entries created and deleted while the streams are held.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Full lists read for the server CPU figure.
    #[arg(long, default_value_t = 20)]
    list_passes: usize,
}

#[derive(Args)]
struct BenchListArgs {
    /// Entries to create.
    #[arg(long, default_value_t = 100_000)]
    entries: usize,
    /// Parent agents they are spread over.
    #[arg(long, default_value_t = 1_000)]
    agents: usize,
    /// Create requests in flight.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
}

#[derive(Args)]
struct BenchProxyArgs {
    /// How long to measure each load on each target, each round.
    #[arg(long, default_value = "10s")]
    duration: String,
    /// Concurrent client connections.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Rounds, each measuring both loads on both targets.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The nginx executable (`apt-get install -y nginx`); without it only ours is measured.
    #[arg(long, default_value = "/usr/sbin/nginx")]
    nginx: PathBuf,
}

#[derive(Args)]
struct BenchHandshakeArgs {
    /// Handshakes per verifier (and as many direct verifications).
    #[arg(long, default_value_t = 5000)]
    iterations: usize,
    /// Rounds alternating the two verifiers.
    #[arg(long, default_value_t = 50)]
    rounds: usize,
}

#[derive(Args)]
struct BenchTaskArgs {
    /// Requests in flight on the one connection: one measurement per level.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    in_flight: Vec<usize>,
    /// How long to measure each level.
    #[arg(long, default_value = "10s")]
    duration: String,
    /// Rotate the server's CA (prepare, then activate) this often during the run, e.g. 2s.
    #[arg(long)]
    rotate_every: Option<String>,
    /// Also measure task JWT-SVIDs (MintJWTSVID), each level right after its X.509 twin.
    #[arg(long)]
    jwt: bool,
}

#[derive(Args)]
struct BenchFetchArgs {
    /// How long to measure.
    #[arg(long, default_value = "10s")]
    duration: String,
}

#[derive(Args)]
struct BenchStreamsArgs {
    /// Workloads, each with its own connection and stream.
    #[arg(long, default_value_t = 1000)]
    workloads: usize,
    /// The mayfly executable to run `agent run` with [default: this one].
    #[arg(long)]
    agent_exe: Option<PathBuf>,
}

#[derive(Args)]
struct BenchIssueArgs {
    /// Concurrent mTLS connections.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 32)]
    in_flight: usize,
    /// How long to measure.
    #[arg(long, default_value = "10s")]
    duration: String,
    /// A postgres:// URL instead of SQLite.
    #[arg(long)]
    database: Option<String>,
    /// Rotate the server's CA (prepare, then activate) this often during the run, e.g. 2s.
    #[arg(long)]
    rotate_every: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "error: could not start the async runtime: {e}"
            );
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of our output went away (`mayfly entry list | head -1`): that is its
        // choice, not a failure, so there is nothing to say.
        Err(e) if is_closed(&e) => ExitCode::SUCCESS,
        Err(e) => {
            // Errors can quote what a server or a workload sent: escaped, they stay one line.
            let line = mayfly::text::escape(&format!("{e:#}")).into_owned();
            // A closed stderr leaves no one to tell; that is no reason to panic.
            let _ = writeln!(std::io::stderr(), "error: {line}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let out = Printer::new(cli.output);
    match cli.command {
        Command::Server(ServerCommand::Run(args)) => cli::run::server(*args).await,
        Command::Agent(AgentCommand::Run(args)) => cli::run::agent(*args).await,
        Command::Proxy(args) => cli::run::proxy(args).await,
        Command::Svid(cmd) => cli::workload::svid(cmd, out).await,
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "mayfly", &mut script);
            out.raw(&String::from_utf8_lossy(&script))
        }
        Command::Demo => {
            // The narration is printed as it happens; a closed stdout ends it quietly after.
            let mut closed = None;
            let mut say = |line: &str| {
                if closed.is_none() {
                    closed = out.line(line).err();
                }
            };
            let result = demo::run(&mut say).await;
            closed.map_or(Ok(()), Err)?;
            Ok(result?)
        }
        Command::Bench(cmd) => bench_command(cmd, out).await,
        Command::Token(cmd) => {
            cli::admin::token(&mut admin(&cli.admin_socket).await?, cmd, out).await
        }
        Command::Entry(cmd) => {
            cli::entry::entry(&mut admin(&cli.admin_socket).await?, cmd, out).await
        }
        Command::Agent(AgentCommand::Admin(cmd)) => {
            cli::admin::agent(&mut admin(&cli.admin_socket).await?, cmd, out).await
        }
        Command::Bundle(cmd) => {
            cli::admin::bundle(&mut admin(&cli.admin_socket).await?, cmd, out).await
        }
        Command::Ca(cmd) => cli::ca::ca(&mut admin(&cli.admin_socket).await?, cmd, out).await,
        Command::Audit(cmd) => {
            cli::admin::audit(&mut admin(&cli.admin_socket).await?, cmd, out).await
        }
    }
}

async fn admin(socket: &std::path::Path) -> Result<cli::admin::Admin> {
    Ok(connect_admin(socket).await?)
}

async fn bench_command(cmd: BenchCommand, out: Printer) -> Result<()> {
    match cmd {
        BenchCommand::Issue(args) => bench_issue(args, out).await,
        BenchCommand::Task(args) => bench_task(args, out).await,
        BenchCommand::AttestFlood(args) => bench_attest_flood(args, out).await,
        BenchCommand::Attest(args) => {
            let options = bench::attest_rate::AttestRateOptions {
                count: args.count,
                concurrency: args.concurrency,
            };
            print_report(
                &bench::attest_rate::attest_rate_benchmark(options).await?,
                out,
            )
        }
        BenchCommand::Fetch(args) => bench_fetch(args, out).await,
        BenchCommand::Streams(args) => bench_streams(args, out).await,
        BenchCommand::Handshake(args) => bench_handshake(args, out).await,
        BenchCommand::Proxy(args) => bench_proxy(args, out).await,
        BenchCommand::List(args) => bench_list(args, out).await,
        BenchCommand::Sync(args) => bench_sync(args, out).await,
    }
}

async fn bench_sync(args: BenchSyncArgs, out: Printer) -> Result<()> {
    let options = bench::sync::SyncBenchOptions {
        entries: args.entries,
        streams: args.streams,
        rounds: args.rounds,
        list_passes: args.list_passes,
        exe: None,
    };
    let report = bench::sync::sync_benchmark(options).await?;
    print_report(&report, out)
}

async fn bench_list(args: BenchListArgs, out: Printer) -> Result<()> {
    let options = bench::list::ListBenchOptions {
        entries: args.entries,
        agents: args.agents,
        concurrency: args.concurrency,
        exe: None,
    };
    let report = bench::list::list_benchmark(options).await?;
    print_report(&report, out)
}

async fn bench_proxy(args: BenchProxyArgs, out: Printer) -> Result<()> {
    let options = bench::proxy::ProxyBenchOptions {
        duration: mayfly::duration::parse(&args.duration)?,
        connections: args.connections,
        rounds: args.rounds,
        nginx: args.nginx,
        ..Default::default()
    };
    let report = bench::proxy::proxy_benchmark(options).await?;
    print_report(&report, out)
}

async fn bench_handshake(args: BenchHandshakeArgs, out: Printer) -> Result<()> {
    let options = bench::handshake::HandshakeBenchOptions {
        iterations: args.iterations,
        rounds: args.rounds,
    };
    let report = bench::handshake::handshake_benchmark(options).await?;
    print_report(&report, out)
}

/// Prints a benchmark report as text or JSON.
fn print_report(report: &(impl serde::Serialize + std::fmt::Display), out: Printer) -> Result<()> {
    if out.json_wanted() {
        out.json(report)
    } else {
        out.line(report)
    }
}

async fn bench_attest_flood(args: BenchAttestFloodArgs, out: Printer) -> Result<()> {
    let options = bench::attest::AttestFloodOptions {
        duration: mayfly::duration::parse(&args.duration)?,
        flooders: args.flooders,
        ..Default::default()
    };
    let report = bench::attest::attest_flood_benchmark(options).await?;
    print_report(&report, out)
}

async fn bench_task(args: BenchTaskArgs, out: Printer) -> Result<()> {
    let options = bench::task::TaskBenchOptions {
        in_flight: args.in_flight,
        duration: mayfly::duration::parse(&args.duration)?,
        rotate_every: args
            .rotate_every
            .as_deref()
            .map(mayfly::duration::parse)
            .transpose()?,
        kinds: if args.jwt {
            vec![bench::task::MintKind::X509, bench::task::MintKind::Jwt]
        } else {
            vec![bench::task::MintKind::X509]
        },
        ..Default::default()
    };
    let report = bench::task::task_benchmark(options).await?;
    print_report(&report, out)
}

async fn bench_fetch(args: BenchFetchArgs, out: Printer) -> Result<()> {
    let options = bench::agent::FetchBenchOptions {
        duration: mayfly::duration::parse(&args.duration)?,
        ..Default::default()
    };
    let report = bench::agent::fetch_benchmark(options).await?;
    print_report(&report, out)
}

async fn bench_streams(args: BenchStreamsArgs, out: Printer) -> Result<()> {
    let options = bench::agent::StreamsBenchOptions {
        workloads: args.workloads,
        agent_exe: args.agent_exe,
        ..Default::default()
    };
    let report = bench::agent::streams_benchmark(options).await?;
    print_report(&report, out)
}

async fn bench_issue(args: BenchIssueArgs, out: Printer) -> Result<()> {
    let options = bench::IssueBenchOptions {
        connections: args.connections,
        in_flight: args.in_flight,
        duration: mayfly::duration::parse(&args.duration)?,
        database: args.database,
        rotate_every: args
            .rotate_every
            .as_deref()
            .map(mayfly::duration::parse)
            .transpose()?,
        ..Default::default()
    };
    let report = bench::issue_benchmark(options).await?;
    print_report(&report, out)
}
