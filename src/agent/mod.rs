//! The agent: attests its node to the server, keeps the entries authorized for it and their
//! identity SVIDs current, and answers the workloads on its node over a Unix socket with the
//! SPIFFE Workload API and Mayfly's task API.
//!
//! [`start`] attests (or reuses the identity stored in the data dir), binds the workload
//! socket, and spawns two tasks: the [`sync::Syncer`] loop, the only writer of the serving
//! [`state::Snapshot`], and the [`endpoint`] that answers workloads from it.

pub mod config;
pub mod endpoint;
pub(crate) mod entry_pages;
pub mod identity;
pub(crate) mod introspection;
pub mod jwt_cache;
pub(crate) mod keys;
pub mod link;
pub mod node_evidence;
pub mod state;
pub(crate) mod sync;
pub mod sync_error;
// Re-issuing what a tainted CA signed (issue 10).
pub(crate) mod taint;
pub(crate) mod task_api;
pub(crate) mod workload_api;
pub(crate) mod workload_jwt;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::id::SpiffeId;
use crate::server_set::ServerSet;
use identity::{AgentSvid, Bootstrap, IdentityError, IdentityFiles};
use link::ServerLink;
use state::SnapshotRx;

/// Defaults a user gets without configuring.
pub mod defaults {
    use std::time::Duration;

    /// The agent's data dir.
    pub const DATA_DIR: &str = ".mayfly/agent";
    /// The Workload API socket.
    pub use crate::workload_client::DEFAULT_SOCKET as SOCKET;
    /// How often the agent asks the server whether its entries changed. The call is cheap
    /// (a revision compare), and a new or deleted entry must reach workloads within 5 s.
    pub const SYNC_INTERVAL: Duration = Duration::from_secs(2);
}

/// Everything `mayfly agent run` needs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The servers' node APIs (at least one): the agent uses one and fails over to the others.
    pub servers: Vec<SocketAddr>,
    /// A single-use join token; needed only when the agent has no valid stored identity and
    /// no `node_attestor`.
    pub join_token: Option<String>,
    /// The node attestor's evidence (`--attestor`): the agent attests with it when it has no
    /// valid identity, and again by itself after an eviction or an expired SVID.
    pub node_attestor: Option<Arc<dyn mayfly_attestors::NodeEvidence>>,
    /// How to trust the server before the agent has a bundle of its own.
    pub bootstrap: Option<Bootstrap>,
    /// The Workload API socket.
    pub socket: PathBuf,
    /// Where the agent keeps its SVID, key and bundle.
    pub data_dir: PathBuf,
    /// How often to poll the server for entry changes.
    pub sync_interval: Duration,
    /// The trust domain to expect of the server at the first attestation (`--trust-domain`);
    /// `None`: the one the bundle's roots name, else the one the server's verified SVID names.
    pub trust_domain: Option<crate::id::TrustDomain>,
}

impl AgentConfig {
    /// What the agent attests with: the node attestor, else the join token, if any.
    pub fn evidence(&self) -> Option<Arc<dyn mayfly_attestors::NodeEvidence>> {
        self.node_attestor.clone().or_else(|| {
            self.join_token.clone().map(|token| {
                let evidence: Arc<dyn mayfly_attestors::NodeEvidence> =
                    Arc::new(mayfly_attestors::join_token::JoinTokenEvidence::new(token));
                evidence
            })
        })
    }

    /// The defaults, for the server at `server`.
    pub fn with_defaults(server: SocketAddr) -> Self {
        Self {
            servers: vec![server],
            join_token: None,
            node_attestor: None,
            bootstrap: None,
            socket: PathBuf::from(defaults::SOCKET),
            data_dir: PathBuf::from(defaults::DATA_DIR),
            sync_interval: defaults::SYNC_INTERVAL,
            trust_domain: None,
        }
    }
}

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Its identity could not be loaded or obtained.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// A fresh agent needs to know how to trust the server.
    #[error(
        "the agent has no trust bundle yet: pass --trust-bundle with the output of `mayfly bundle show`, or --insecure-bootstrap to trust the first server that answers"
    )]
    NoBootstrap,
    /// The workload socket could not be set up.
    #[error(transparent)]
    Endpoint(#[from] endpoint::EndpointError),
    /// The node API could not be reached with the agent's SVID.
    #[error(transparent)]
    Client(#[from] crate::client::ClientError),
    /// The TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] crate::mtls::MtlsError),
}

/// A started agent.
pub struct RunningAgent {
    /// The agent's SPIFFE ID at start.
    pub spiffe_id: SpiffeId,
    /// The Workload API socket.
    pub socket: PathBuf,
    snapshot: SnapshotRx,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningAgent {
    /// The serving state, for tests and benchmarks that wait on it.
    pub fn snapshot(&self) -> SnapshotRx {
        self.snapshot.clone()
    }

    /// Stops serving, removes the socket file, and waits for the tasks to end.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Starts the agent: its identity (stored, or attested with the join token), the sync loop,
/// and the workload socket.
///
/// # Errors
/// [`AgentError`] when the agent has no usable identity and cannot get one, or the socket
/// cannot be bound.
pub async fn start(config: AgentConfig) -> Result<RunningAgent, AgentError> {
    let files = IdentityFiles::new(&config.data_dir);
    // One set for every connection the agent makes, so they share what they learnt about
    // which server answers.
    let servers =
        Arc::new(ServerSet::new(&config.servers).map_err(crate::client::ClientError::from)?);
    let agent = obtain_identity(&config, &servers, &files).await?;
    tracing::info!(agent = %agent.spiffe_id, not_after = crate::wire::unix_secs(agent.not_after), "agent identity ready");

    let source =
        crate::mtls::SvidSource::from_parts(agent.cert_chain(), &agent.key_pkcs8, agent.bundles())?;
    let server_id = crate::wire::server_id(&agent.trust_domain());
    // Connecting is lazy: if every server is down now, the agent still starts, and its first
    // calls (the sync loop's, retried with backoff) connect when one is back.
    let (node, on) =
        crate::client::connect_node_servers_lazy(&servers, &source, &server_id).await?;
    let link = Arc::new(ServerLink::over(
        servers.clone(),
        server_id,
        source,
        node,
        on,
    ));

    let (tx, rx) = watch::channel(Arc::new(sync::initial_snapshot(&agent)));
    let (shutdown, shutdown_rx) = watch::channel(false);
    let listener = endpoint::bind(&config.socket)?;
    let spiffe_id = agent.spiffe_id.clone();
    let syncer = sync::Syncer::new(
        link.clone(),
        files,
        agent,
        sync::Reattest {
            servers,
            evidence: config.evidence(),
        },
        config.sync_interval,
        tx,
    );
    let sync_task = tokio::spawn(syncer.run(shutdown_rx.clone()));
    let attestor: Arc<dyn mayfly_attestors::WorkloadAttestor> = Arc::new(
        mayfly_attestors::UnixAttestor::new(mayfly_attestors::UnixAttestorConfig::default()),
    );
    let mut stop = shutdown_rx;
    let rx_serve = rx.clone();
    let serve_task = tokio::spawn(async move {
        let stopped = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        if let Err(e) = endpoint::serve(listener, rx_serve, link, attestor, stopped).await {
            tracing::error!(error = %crate::wire::error_chain(&e), "the workload socket stopped serving");
        }
    });
    Ok(RunningAgent {
        spiffe_id,
        socket: config.socket,
        snapshot: rx,
        shutdown,
        tasks: vec![sync_task, serve_task],
    })
}

/// The stored identity if it is still valid, else a fresh attestation with the node
/// attestor's evidence or the join token.
async fn obtain_identity(
    config: &AgentConfig,
    servers: &Arc<ServerSet>,
    files: &IdentityFiles,
) -> Result<AgentSvid, AgentError> {
    let stored = files.load()?;
    if let Some(svid) = &stored {
        if svid.is_valid_at(SystemTime::now()) {
            return Ok(svid.clone());
        }
        tracing::warn!(agent = %svid.spiffe_id, "the stored agent SVID has expired; attesting again");
    }
    let evidence = config.evidence().ok_or(IdentityError::NoToken)?;
    // A stored bundle is newer than any file given at first start (the CA may have rotated).
    let bootstrap = match (&stored, &config.bootstrap) {
        (Some(svid), _) => Bootstrap::Bundle(svid.bundle.clone()),
        (None, Some(b)) => b.clone(),
        (None, None) => return Err(AgentError::NoBootstrap),
    };
    if matches!(bootstrap, Bootstrap::Insecure) {
        tracing::warn!(
            "INSECURE BOOTSTRAP: the server's certificate is not verified for this first attestation; an attacker on the path to {} could impersonate it and hand this agent its own trust bundle. Use --trust-bundle in production.",
            servers
                .addrs()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    // An agent that had an identity stays in its trust domain when it attests again.
    let pinned = stored
        .as_ref()
        .map(AgentSvid::trust_domain)
        .or_else(|| config.trust_domain.clone());
    let svid = identity::attest(servers, &bootstrap, evidence, pinned.as_ref()).await?;
    files.save(&svid)?;
    Ok(svid)
}
