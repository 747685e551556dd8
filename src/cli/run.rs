//! The long-running commands: `server run`, `agent run` and `proxy`. Each merges its settings
//! once in the library (`resolve_over`: flags and environment over the config file), starts the
//! component, logs where it listens, and stops on Ctrl-C or SIGTERM.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use mayfly::agent::config::AgentSettings;
use mayfly::proxy::config::ProxySettings;
use mayfly::server::config::ServerSettings;

/// How logs are written to stderr.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Lines for people; coloured only when stderr is a terminal.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// The logging flags every long-running command takes.
#[derive(Args)]
pub struct LogArgs {
    /// How to write logs to stderr (the level comes from RUST_LOG, default info).
    #[arg(long, value_enum, default_value_t, env = "MAYFLY_LOG_FORMAT")]
    log_format: LogFormat,
}

/// `mayfly server run`.
#[derive(Args)]
pub struct ServerRunArgs {
    /// A TOML file with the same settings as the flags (keys such as ca_ttl); flags and
    /// MAYFLY_SERVER_* variables win over it.
    #[arg(long, env = "MAYFLY_SERVER_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: ServerSettings,
    #[command(flatten)]
    log: LogArgs,
}

/// `mayfly agent run`.
#[derive(Args)]
pub struct AgentRunArgs {
    /// A TOML file with the same settings as the flags (keys such as sync_interval); flags and
    /// MAYFLY_AGENT_* variables win over it.
    #[arg(long, env = "MAYFLY_AGENT_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: AgentSettings,
    #[command(flatten)]
    log: LogArgs,
}

/// `mayfly proxy`.
#[derive(Args)]
pub struct ProxyArgs {
    /// A TOML file with the same settings as the flags (keys such as require_scopes); flags
    /// and MAYFLY_PROXY_* variables win over it, a list given as flags replaces the file's.
    #[arg(long, env = "MAYFLY_PROXY_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: ProxySettings,
    #[command(flatten)]
    log: LogArgs,
}

fn init_logging(args: &LogArgs) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // Colour codes are for a person at a terminal; in a file or a pipe they are noise.
    let _ = match args.log_format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder.json().with_ansi(false).try_init(),
    };
}

/// `mayfly server run`.
pub async fn server(args: ServerRunArgs) -> Result<()> {
    init_logging(&args.log);
    let config = args.settings.resolve_over(args.config.as_deref())?;
    let server = mayfly::server::start(config).await?;
    tracing::info!(
        trust_domain = %server.trust_domain,
        node_api = %server.node_addr,
        admin_socket = %server.admin_socket.display(),
        "mayfly server running; stop with Ctrl-C"
    );
    if let Some((addr, issuer)) = &server.oidc {
        tracing::info!(%addr, %issuer, "serving OIDC discovery at {issuer}/.well-known/openid-configuration");
    }
    shutdown_signal().await;
    tracing::info!("shutting down");
    server.shutdown().await;
    Ok(())
}

/// `mayfly agent run`.
pub async fn agent(args: AgentRunArgs) -> Result<()> {
    init_logging(&args.log);
    let config = args.settings.resolve_over(args.config.as_deref())?;
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

/// `mayfly proxy`.
pub async fn proxy(args: ProxyArgs) -> Result<()> {
    init_logging(&args.log);
    let setup = args.settings.resolve_over(args.config.as_deref())?;
    let config = setup.config;
    let source = mayfly::mtls::SvidSource::spawn_for(&setup.socket, config.own_id.clone());
    source
        .wait_ready(Duration::from_secs(30))
        .await
        .with_context(|| {
            format!(
                "the proxy got no SVID from the agent at {}",
                setup.socket.display()
            )
        })?;
    let proxy = if config.accept.jwt.is_some() {
        // Bearer tokens are checked against the JWT bundles the agent serves, followed like the
        // X.509 ones: the proxy starts once it holds a first set.
        let bundles = mayfly::workload_client::JwtBundleSource::spawn(&setup.socket);
        bundles
            .wait_ready(Duration::from_secs(30))
            .await
            .with_context(|| {
                format!(
                    "the proxy got no JWT bundles from the agent at {}",
                    setup.socket.display()
                )
            })?;
        mayfly::proxy::start_with_jwt(config.clone(), source, bundles).await?
    } else {
        mayfly::proxy::start(config.clone(), source).await?
    };
    let accepts = match (config.accept.x509, &config.accept.jwt) {
        (true, None) => "x509",
        (true, Some(_)) => "x509,jwt",
        (false, _) => "jwt",
    };
    tracing::info!(
        listen = %proxy.local_addr,
        upstream = %config.upstream,
        accept = accepts,
        mode = if matches!(config.mode, mayfly::proxy::ProxyMode::Http(_)) { "http" } else { "tcp" },
        "mayfly proxy running; stop with Ctrl-C"
    );
    shutdown_signal().await;
    proxy.shutdown().await;
    Ok(())
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
