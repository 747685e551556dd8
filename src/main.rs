//! The `mayfly` command: parses, calls the library, prints. No logic lives here.
#![forbid(unsafe_code)]

mod bench;
mod demo;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, anyhow};
use clap::{Args, Parser, Subcommand, ValueEnum};
use futures::StreamExt;
use mayfly::agent::config::AgentSettings;
use mayfly::client::connect_admin;
use mayfly::proto::admin as pb;
use mayfly::proxy::config::ProxySettings;
use mayfly::server::config::Settings;
use tonic::transport::Channel;

type Admin = pb::admin_client::AdminClient<Channel>;

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
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
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
}

#[derive(Subcommand)]
enum ServerCommand {
    /// Run the server on the embedded defaults, a config file, or flags.
    Run(ServerRunArgs),
}

#[derive(Args)]
struct ServerRunArgs {
    /// A TOML file with the same settings as the flags.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where the CA key, the SQLite file and the admin socket live [default: .mayfly/server].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The trust domain [default: mayfly.local].
    #[arg(long)]
    trust_domain: Option<String>,
    /// The node API address [default: 127.0.0.1:8081].
    #[arg(long)]
    bind: Option<String>,
    /// A postgres:// URL to share one database between replicas [default: SQLite in the data dir].
    #[arg(long)]
    database: Option<String>,
    /// The CA lifetime [default: 7d].
    #[arg(long)]
    ca_ttl: Option<String>,
    /// The agent SVID lifetime [default: 1h].
    #[arg(long)]
    agent_ttl: Option<String>,
    /// The shortest TTL an entry may have [default: 30s]; lower only for tests.
    #[arg(long, hide = true)]
    min_entry_ttl: Option<String>,
    /// Sign Mayfly's CA with this upstream CA certificate (PEM).
    #[arg(long)]
    upstream_ca_cert: Option<PathBuf>,
    /// The upstream CA's key (PEM PKCS#8).
    #[arg(long)]
    upstream_ca_key: Option<PathBuf>,
}

#[derive(Args)]
struct AgentRunArgs {
    /// A TOML file with the same settings as the flags.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The server's node API, HOST:PORT [default: 127.0.0.1:8081].
    #[arg(long)]
    server: Option<String>,
    /// A single-use join token from `mayfly token generate` (needed until the agent has an SVID).
    #[arg(long, env = "MAYFLY_JOIN_TOKEN")]
    join_token: Option<String>,
    /// The server's trust bundle, PEM (the output of `mayfly bundle show`).
    #[arg(long)]
    trust_bundle: Option<PathBuf>,
    /// Trust the first server that answers instead of a bundle (not for production).
    #[arg(long)]
    insecure_bootstrap: bool,
    /// The Workload API socket [default: .mayfly/agent.sock].
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Where the agent keeps its SVID and key [default: .mayfly/agent].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// How often to ask the server for entry changes [default: 2s].
    #[arg(long)]
    sync_interval: Option<String>,
}

#[derive(Args)]
struct ProxyArgs {
    /// A TOML file with the same settings as the flags.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where to listen for mTLS clients, HOST:PORT.
    #[arg(long)]
    listen: Option<String>,
    /// Where to forward, HOST:PORT (plain TCP or HTTP).
    #[arg(long)]
    upstream: Option<String>,
    /// HTTP mode: 'METHOD /prefix scope' ('*' any method, '-' no scope); first match wins, no
    /// match is a 403.
    #[arg(long = "route")]
    routes: Vec<String>,
    /// A scope every client must carry, checked in the handshake (repeat for several).
    #[arg(long = "require-scope")]
    require_scopes: Vec<String>,
    /// A SPIFFE ID allowed to connect, exact or ending in /* (repeat for several).
    #[arg(long = "allow-id")]
    allow_ids: Vec<String>,
    /// The agent's socket the proxy gets its own SVID from [default: SPIFFE_ENDPOINT_SOCKET, else .mayfly/agent.sock].
    #[arg(long)]
    socket: Option<String>,
    /// Which of the proxy's identities to present, when its process matches several entries.
    #[arg(long)]
    spiffe_id: Option<String>,
}

#[derive(Args)]
struct WorkloadArgs {
    /// The agent's socket, unix:///path [default: SPIFFE_ENDPOINT_SOCKET, else .mayfly/agent.sock].
    #[arg(long)]
    socket: Option<String>,
    /// Write svid.pem (chain), svid.key (0600) and bundle.pem into this directory.
    #[arg(long)]
    write: Option<PathBuf>,
}

#[derive(Subcommand)]
enum SvidCommand {
    /// This workload's identity SVID, from the SPIFFE Workload API.
    Fetch(WorkloadArgs),
    /// A task SVID with exactly the given scopes, from the task API.
    Mint {
        /// The task this SVID is for (1-128 of A-Z a-z 0-9 . _ : -), recorded in the audit log.
        #[arg(long)]
        task: String,
        /// A scope the task needs, e.g. stripe:read:customers (repeat for several).
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// Its lifetime, e.g. 90s or 5m [default: 5m, or the entry's ceiling if lower].
        #[arg(long)]
        ttl: Option<String>,
        /// Which of this workload's identities to use [default: the first that matches].
        #[arg(long)]
        spiffe_id: Option<String>,
        #[command(flatten)]
        workload: WorkloadArgs,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a single-use join token and the SPIFFE ID its agent will get.
    Generate {
        /// How long the token stays usable.
        #[arg(long, default_value = "10m")]
        ttl: String,
    },
}

#[derive(Subcommand)]
enum EntryCommand {
    /// Register a workload; prints the entry ID.
    Create(EntryCreateArgs),
    /// List the entries.
    List,
    /// Show one entry.
    Show {
        /// The entry ID.
        id: String,
    },
    /// Delete an entry: its workloads get nothing more.
    Delete {
        /// The entry ID.
        id: String,
    },
}

#[derive(Args)]
struct EntryCreateArgs {
    /// The workload's identity, e.g. spiffe://mayfly.local/agents/billing-bot.
    #[arg(long)]
    spiffe_id: String,
    /// The agent allowed to ask for it (see `mayfly agent list` or `mayfly token generate`).
    #[arg(long)]
    parent_id: String,
    /// TYPE:KIND:VALUE the workload must have, e.g. unix:uid:1001 (repeat for more; all must match).
    #[arg(long = "selector", required = true)]
    selectors: Vec<String>,
    /// A scope task SVIDs may carry, e.g. stripe:read:customers (repeat for more).
    #[arg(long = "scope")]
    scopes: Vec<String>,
    /// The longest SVID lifetime for this entry (at most 1h).
    #[arg(long, default_value = "5m")]
    ttl: String,
    /// A DNS name to put in its SVIDs (repeat for more).
    #[arg(long = "dns")]
    dns_names: Vec<String>,
}

#[derive(Subcommand)]
enum AgentCommand {
    /// Run an agent: attest this node, then serve the Workload API to its workloads.
    Run(AgentRunArgs),
    /// List the attested agents.
    List,
    /// Ban an agent: refused at its next call, for good.
    Ban {
        /// The agent's SPIFFE ID.
        id: String,
    },
    /// Evict an agent: it must attest again with a new join token.
    Evict {
        /// The agent's SPIFFE ID.
        id: String,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BundleFormat {
    Pem,
    Spiffe,
}

#[derive(Subcommand)]
enum BundleCommand {
    /// Print the trust bundle.
    Show {
        /// PEM certificates, or a SPIFFE bundle (JWKS).
        #[arg(long, value_enum, default_value_t = BundleFormat::Pem)]
        format: BundleFormat,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// List audit records, oldest first.
    List {
        /// Only this task's records.
        #[arg(long)]
        task: Option<String>,
        /// Keep printing new records as they are written.
        #[arg(long)]
        follow: bool,
        /// Only records after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: i64,
        /// At most this many records (0: all).
        #[arg(long, default_value_t = 0)]
        limit: u32,
    },
    /// Check the hash chain: detects edited, inserted and deleted records.
    Verify,
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
    /// mayfly proxy against nginx: mTLS requests/s and new-connection handshakes/s.
    Proxy(BenchProxyArgs),
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: could not start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let output = cli.output;
    match cli.command {
        Command::Server(ServerCommand::Run(args)) => server_run(args).await,
        Command::Agent(AgentCommand::Run(args)) => agent_run(args).await,
        Command::Svid(cmd) => svid_command(cmd, output).await,
        Command::Proxy(args) => proxy_run(args).await,
        Command::Demo => {
            let mut say = |line: &str| println!("{line}");
            demo::run(&mut say).await?;
            Ok(())
        }
        Command::Bench(cmd) => bench_command(cmd, output).await,
        command => {
            let admin = connect_admin(&cli.admin_socket).await?;
            admin_command(admin, command, output).await
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

async fn server_run(args: ServerRunArgs) -> Result<()> {
    init_logging();
    let file = match &args.config {
        Some(path) => Settings::from_file(path)?,
        None => Settings::default(),
    };
    let flags = Settings {
        trust_domain: args.trust_domain,
        data_dir: args.data_dir,
        bind: args.bind,
        database: args.database,
        ca_ttl: args.ca_ttl,
        agent_ttl: args.agent_ttl,
        min_entry_ttl: args.min_entry_ttl,
        upstream_ca_cert: args.upstream_ca_cert,
        upstream_ca_key: args.upstream_ca_key,
    };
    let config = file.overridden_by(flags).resolve()?;
    let server = mayfly::server::start(config).await?;
    tracing::info!(
        trust_domain = %server.trust_domain,
        node_api = %server.node_addr,
        admin_socket = %server.admin_socket.display(),
        "mayfly server running; stop with Ctrl-C"
    );
    shutdown_signal().await;
    tracing::info!("shutting down");
    server.shutdown().await;
    Ok(())
}

async fn agent_run(args: AgentRunArgs) -> Result<()> {
    init_logging();
    let file = match &args.config {
        Some(path) => AgentSettings::from_file(path)?,
        None => AgentSettings::default(),
    };
    let flags = AgentSettings {
        server: args.server,
        join_token: args.join_token,
        trust_bundle: args.trust_bundle,
        insecure_bootstrap: args.insecure_bootstrap.then_some(true),
        socket: args.socket,
        data_dir: args.data_dir,
        sync_interval: args.sync_interval,
    };
    let config = file.overridden_by(flags).resolve()?;
    let agent = mayfly::agent::start(config).await?;
    tracing::info!(
        agent = %agent.spiffe_id,
        socket = %agent.socket.display(),
        "mayfly agent running; workloads use SPIFFE_ENDPOINT_SOCKET=unix://{}; stop with Ctrl-C",
        agent.socket.display()
    );
    shutdown_signal().await;
    tracing::info!("shutting down");
    agent.shutdown().await;
    Ok(())
}

async fn svid_command(cmd: SvidCommand, output: Output) -> Result<()> {
    use mayfly::workload_client as wc;
    let default_socket = PathBuf::from(mayfly::agent::defaults::SOCKET);
    let (workload, svid) = match cmd {
        SvidCommand::Fetch(workload) => {
            let path = wc::socket_path(workload.socket.as_deref(), &default_socket)?;
            let svid = wc::fetch_x509(wc::connect(&path).await?).await?;
            (workload, svid)
        }
        SvidCommand::Mint {
            task,
            scopes,
            ttl,
            spiffe_id,
            workload,
        } => {
            let ttl_seconds = match ttl {
                Some(t) => u32::try_from(mayfly::duration::parse(&t)?.as_secs())
                    .context("the TTL is too long")?,
                None => 0,
            };
            let path = wc::socket_path(workload.socket.as_deref(), &default_socket)?;
            let request = mayfly::proto::task::MintX509svidRequest {
                task_id: task,
                scopes,
                ttl_seconds,
                spiffe_id: spiffe_id.unwrap_or_default(),
            };
            let svid = wc::mint_x509(wc::connect(&path).await?, request).await?;
            (workload, svid)
        }
    };
    if let Some(dir) = &workload.write {
        wc::write_files(dir, &svid)?;
    }
    let (serial, not_after) = svid.leaf_summary().unwrap_or_default();
    match output {
        Output::Json => print_json(&serde_json::json!({
            "spiffe_id": svid.spiffe_id,
            "serial": serial,
            "not_after": not_after,
            "written_to": workload.write,
        }))?,
        Output::Text => {
            println!("SPIFFE ID: {}", svid.spiffe_id);
            println!("Serial:    {serial}");
            println!("Expires:   {}", expires_in(not_after));
            match &workload.write {
                Some(dir) => println!(
                    "Wrote {0}/svid.pem, {0}/svid.key and {0}/bundle.pem",
                    dir.display()
                ),
                None => print!("{}", mayfly::bundle::to_pem(&svid.chain)),
            }
        }
    }
    Ok(())
}

async fn proxy_run(args: ProxyArgs) -> Result<()> {
    init_logging();
    let file = match &args.config {
        Some(path) => ProxySettings::from_file(path)?,
        None => ProxySettings::default(),
    };
    let flags = ProxySettings {
        listen: args.listen,
        upstream: args.upstream,
        routes: args.routes,
        require_scopes: args.require_scopes,
        allow_ids: args.allow_ids,
        socket: args.socket,
        spiffe_id: args.spiffe_id,
    };
    let settings = file.overridden_by(flags);
    let socket = mayfly::workload_client::socket_path(
        settings.socket.as_deref(),
        std::path::Path::new(mayfly::agent::defaults::SOCKET),
    )?;
    let config = settings.resolve()?;
    let source = mayfly::mtls::SvidSource::spawn_for(&socket, config.own_id.clone());
    source
        .wait_ready(std::time::Duration::from_secs(30))
        .await
        .with_context(|| {
            format!(
                "the proxy got no SVID from the agent at {}",
                socket.display()
            )
        })?;
    let proxy = mayfly::proxy::start(config.clone(), source).await?;
    tracing::info!(
        listen = %proxy.local_addr,
        upstream = %config.upstream,
        mode = if matches!(config.mode, mayfly::proxy::ProxyMode::Http(_)) { "http" } else { "tcp" },
        "mayfly proxy running; stop with Ctrl-C"
    );
    shutdown_signal().await;
    proxy.shutdown().await;
    Ok(())
}

/// A notAfter in Unix seconds, with how far away it is.
fn expires_in(not_after: i64) -> String {
    let now = mayfly::server::policy::unix_secs(std::time::SystemTime::now());
    format!("{not_after} (Unix seconds; in {}s)", not_after - now)
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async {
            match term.as_mut() {
                Some(t) => { t.recv().await; }
                None => std::future::pending::<()>().await,
            }
        } => {}
    }
}

async fn bench_command(cmd: BenchCommand, output: Output) -> Result<()> {
    match cmd {
        BenchCommand::Issue(args) => bench_issue(args, output).await,
        BenchCommand::Task(args) => bench_task(args, output).await,
        BenchCommand::Fetch(args) => bench_fetch(args, output).await,
        BenchCommand::Streams(args) => bench_streams(args, output).await,
        BenchCommand::Handshake(args) => bench_handshake(args, output).await,
        BenchCommand::Proxy(args) => bench_proxy(args, output).await,
    }
}

async fn bench_proxy(args: BenchProxyArgs, output: Output) -> Result<()> {
    let options = bench::proxy::ProxyBenchOptions {
        duration: mayfly::duration::parse(&args.duration)?,
        connections: args.connections,
        rounds: args.rounds,
        nginx: args.nginx,
        ..Default::default()
    };
    let report = bench::proxy::proxy_benchmark(options).await?;
    print_report(&report, output)
}

async fn bench_handshake(args: BenchHandshakeArgs, output: Output) -> Result<()> {
    let options = bench::handshake::HandshakeBenchOptions {
        iterations: args.iterations,
        rounds: args.rounds,
    };
    let report = bench::handshake::handshake_benchmark(options).await?;
    print_report(&report, output)
}

/// Prints a benchmark report as text or JSON.
fn print_report(
    report: &(impl serde::Serialize + std::fmt::Display),
    output: Output,
) -> Result<()> {
    match output {
        Output::Json => print_json(report),
        Output::Text => {
            println!("{report}");
            Ok(())
        }
    }
}

async fn bench_task(args: BenchTaskArgs, output: Output) -> Result<()> {
    let options = bench::task::TaskBenchOptions {
        in_flight: args.in_flight,
        duration: mayfly::duration::parse(&args.duration)?,
        ..Default::default()
    };
    let report = bench::task::task_benchmark(options).await?;
    print_report(&report, output)
}

async fn bench_fetch(args: BenchFetchArgs, output: Output) -> Result<()> {
    let options = bench::agent::FetchBenchOptions {
        duration: mayfly::duration::parse(&args.duration)?,
        ..Default::default()
    };
    let report = bench::agent::fetch_benchmark(options).await?;
    print_report(&report, output)
}

async fn bench_streams(args: BenchStreamsArgs, output: Output) -> Result<()> {
    let options = bench::agent::StreamsBenchOptions {
        workloads: args.workloads,
        agent_exe: args.agent_exe,
        ..Default::default()
    };
    let report = bench::agent::streams_benchmark(options).await?;
    print_report(&report, output)
}

async fn bench_issue(args: BenchIssueArgs, output: Output) -> Result<()> {
    let options = bench::IssueBenchOptions {
        connections: args.connections,
        in_flight: args.in_flight,
        duration: mayfly::duration::parse(&args.duration)?,
        database: args.database,
        ..Default::default()
    };
    let report = bench::issue_benchmark(options).await?;
    match output {
        Output::Json => print_json(&report)?,
        Output::Text => println!("{report}"),
    }
    Ok(())
}

/// A gRPC status as the one sentence the server wrote.
fn refused(status: tonic::Status) -> anyhow::Error {
    anyhow!("{}", status.message())
}

async fn admin_command(mut admin: Admin, command: Command, output: Output) -> Result<()> {
    match command {
        Command::Token(TokenCommand::Generate { ttl }) => {
            let ttl = mayfly::duration::parse(&ttl)?;
            let token = admin
                .create_join_token(pb::CreateJoinTokenRequest {
                    ttl_seconds: u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX),
                })
                .await
                .map_err(refused)?
                .into_inner();
            match output {
                Output::Json => print_json(&serde_json::json!({
                    "token": token.token,
                    "agent_id": token.agent_id,
                    "expires_at": token.expires_at,
                }))?,
                Output::Text => {
                    println!("Token:    {}", token.token);
                    println!("Agent ID: {}", token.agent_id);
                    println!("Expires:  {} (Unix time; single use)", token.expires_at);
                }
            }
        }
        Command::Entry(cmd) => entry_command(&mut admin, cmd, output).await?,
        Command::Agent(cmd) => agent_command(&mut admin, cmd, output).await?,
        Command::Bundle(BundleCommand::Show { format }) => {
            let bundle = admin
                .get_bundle(pb::GetBundleRequest {})
                .await
                .map_err(refused)?
                .into_inner();
            match format {
                BundleFormat::Pem => print!("{}", mayfly::bundle::to_pem(&bundle.certificates)),
                BundleFormat::Spiffe => {
                    println!("{}", mayfly::bundle::to_spiffe_json(&bundle.certificates)?)
                }
            }
        }
        Command::Audit(AuditCommand::List {
            task,
            follow,
            after,
            limit,
        }) => {
            let mut stream = admin
                .list_audit(pb::ListAuditRequest {
                    after_seq: after,
                    task_id: task.unwrap_or_default(),
                    follow,
                    limit,
                })
                .await
                .map_err(refused)?
                .into_inner();
            let stdout = std::io::stdout();
            while let Some(record) = stream.next().await {
                let record = record.map_err(refused)?;
                let mut out = stdout.lock();
                match output {
                    Output::Json => writeln!(out, "{}", audit_json(&record))?,
                    Output::Text => writeln!(out, "{}", audit_line(&record))?,
                }
                out.flush()?;
            }
        }
        Command::Audit(AuditCommand::Verify) => {
            let answer = admin
                .verify_audit(pb::VerifyAuditRequest {})
                .await
                .map_err(refused)?
                .into_inner();
            if output == Output::Json {
                print_json(&serde_json::json!({
                    "ok": answer.ok, "records": answer.records, "problem": answer.problem,
                }))?;
            }
            if !answer.ok {
                return Err(anyhow!(
                    "the audit log has been tampered with: {}",
                    answer.problem
                ));
            }
            if output == Output::Text {
                println!(
                    "audit log intact: {} records, hash chain verified",
                    answer.records
                );
            }
        }
        Command::Server(_)
        | Command::Bench(_)
        | Command::Svid(_)
        | Command::Proxy(_)
        | Command::Demo => {
            unreachable!("handled before connecting")
        }
    }
    Ok(())
}

async fn entry_command(admin: &mut Admin, cmd: EntryCommand, output: Output) -> Result<()> {
    match cmd {
        EntryCommand::Create(args) => {
            let ttl = mayfly::duration::parse(&args.ttl)?;
            let entry = admin
                .create_entry(pb::CreateEntryRequest {
                    spiffe_id: args.spiffe_id,
                    parent_id: args.parent_id,
                    selectors: args.selectors,
                    scopes: args.scopes,
                    ttl_seconds: u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX),
                    dns_names: args.dns_names,
                })
                .await
                .map_err(refused)?
                .into_inner();
            match output {
                Output::Json => print_json(&entry_json(&entry))?,
                Output::Text => println!("{}", entry.id),
            }
        }
        EntryCommand::List => {
            let entries = admin
                .list_entries(pb::ListEntriesRequest {})
                .await
                .map_err(refused)?
                .into_inner()
                .entries;
            match output {
                Output::Json => print_json(&entries.iter().map(entry_json).collect::<Vec<_>>())?,
                Output::Text if entries.is_empty() => println!("no entries"),
                Output::Text => {
                    for e in &entries {
                        println!("{}", entry_text(e));
                    }
                }
            }
        }
        EntryCommand::Show { id } => {
            let entry = admin
                .get_entry(pb::EntryIdRequest { id })
                .await
                .map_err(refused)?
                .into_inner();
            match output {
                Output::Json => print_json(&entry_json(&entry))?,
                Output::Text => println!("{}", entry_text(&entry)),
            }
        }
        EntryCommand::Delete { id } => {
            admin
                .delete_entry(pb::EntryIdRequest { id: id.clone() })
                .await
                .map_err(refused)?;
            if output == Output::Json {
                print_json(&serde_json::json!({ "deleted": id }))?;
            } else {
                println!("deleted entry {id}");
            }
        }
    }
    Ok(())
}

async fn agent_command(admin: &mut Admin, cmd: AgentCommand, output: Output) -> Result<()> {
    match cmd {
        AgentCommand::List => {
            let agents = admin
                .list_agents(pb::ListAgentsRequest {})
                .await
                .map_err(refused)?
                .into_inner()
                .agents;
            match output {
                Output::Json => print_json(&agents.iter().map(agent_json).collect::<Vec<_>>())?,
                Output::Text if agents.is_empty() => println!("no agents"),
                Output::Text => {
                    for a in &agents {
                        println!(
                            "{}  attestor={}  serial={}  not_after={}{}",
                            a.spiffe_id,
                            a.attestor,
                            a.current_serial,
                            a.not_after,
                            if a.banned { "  BANNED" } else { "" }
                        );
                    }
                }
            }
        }
        AgentCommand::Ban { id } => {
            let agent = admin
                .ban_agent(pb::AgentIdRequest { spiffe_id: id })
                .await
                .map_err(refused)?
                .into_inner();
            match output {
                Output::Json => print_json(&agent_json(&agent))?,
                Output::Text => println!("banned {}", agent.spiffe_id),
            }
        }
        AgentCommand::Evict { id } => {
            admin
                .evict_agent(pb::AgentIdRequest {
                    spiffe_id: id.clone(),
                })
                .await
                .map_err(refused)?;
            match output {
                Output::Json => print_json(&serde_json::json!({ "evicted": id }))?,
                Output::Text => println!("evicted {id}; it must attest again"),
            }
        }
        AgentCommand::Run(_) => unreachable!("handled before connecting"),
    }
    Ok(())
}

fn print_json(value: &impl serde::Serialize) -> Result<()> {
    println!(
        "{}",
        serde_json::to_string_pretty(value).context("could not encode JSON")?
    );
    Ok(())
}

fn entry_json(e: &pb::Entry) -> serde_json::Value {
    serde_json::json!({
        "id": e.id,
        "spiffe_id": e.spiffe_id,
        "parent_id": e.parent_id,
        "selectors": e.selectors,
        "scopes": e.scopes,
        "ttl_seconds": e.ttl_seconds,
        "dns_names": e.dns_names,
        "created_at": e.created_at,
    })
}

fn entry_text(e: &pb::Entry) -> String {
    format!(
        "{}  {}\n  parent:    {}\n  selectors: {}\n  scopes:    {}\n  ttl:       {}s{}",
        e.id,
        e.spiffe_id,
        e.parent_id,
        e.selectors.join(", "),
        if e.scopes.is_empty() {
            "(none)".to_owned()
        } else {
            e.scopes.join(", ")
        },
        e.ttl_seconds,
        if e.dns_names.is_empty() {
            String::new()
        } else {
            format!("\n  dns:       {}", e.dns_names.join(", "))
        }
    )
}

fn agent_json(a: &pb::Agent) -> serde_json::Value {
    serde_json::json!({
        "spiffe_id": a.spiffe_id,
        "attestor": a.attestor,
        "current_serial": a.current_serial,
        "next_serial": a.next_serial,
        "not_after": a.not_after,
        "banned": a.banned,
        "created_at": a.created_at,
    })
}

fn audit_json(r: &pb::AuditRecord) -> String {
    serde_json::json!({
        "seq": r.seq,
        "time_ms": r.time_ms,
        "action": r.action,
        "decision": r.decision,
        "reason": r.reason,
        "agent_id": r.agent_id,
        "attestor": r.attestor,
        "entry_id": r.entry_id,
        "spiffe_id": r.spiffe_id,
        "task_id": r.task_id,
        "scopes": r.scopes,
        "serial": r.serial,
        "not_after": r.not_after,
        "prev_hash": r.prev_hash,
        "hash": r.hash,
    })
    .to_string()
}

fn audit_line(r: &pb::AuditRecord) -> String {
    let mut line = format!(
        "#{} {} {} {}",
        r.seq,
        r.time_ms,
        r.action,
        if r.decision.is_empty() {
            "-"
        } else {
            &r.decision
        }
    );
    let fields = [
        ("agent", &r.agent_id),
        ("entry", &r.entry_id),
        ("id", &r.spiffe_id),
        ("task", &r.task_id),
        ("serial", &r.serial),
    ];
    for (name, value) in fields {
        if !value.is_empty() {
            line.push_str(&format!(" {name}={value}"));
        }
    }
    if !r.scopes.is_empty() {
        line.push_str(&format!(" scopes={}", r.scopes.join(",")));
    }
    if r.not_after != 0 {
        line.push_str(&format!(" not_after={}", r.not_after));
    }
    line.push_str(&format!(" reason=\"{}\"", r.reason));
    line
}
