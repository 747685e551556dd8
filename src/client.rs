//! Clients of the server's APIs: the node API over TLS (agents, tests, benchmarks) and the
//! admin API over its Unix socket (the CLI).

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::{TcpStream, UnixStream};
use tonic::transport::{Channel, Endpoint};

use crate::id::SpiffeId;
use crate::mtls::{self, MtlsError, PeerPolicy, PolicyError, SvidSource};
use crate::proto::admin::admin_client::AdminClient;
use crate::proto::node::node_client::NodeClient;
use crate::server_set::ServerSet;
use crate::svid::Bundles;
use crate::workload_client::root_cause;

/// Why a client could not connect.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// TLS could not be configured, or an SVID or bundle was not usable for it.
    #[error(transparent)]
    Tls(#[from] MtlsError),
    /// The server's SPIFFE ID cannot be expected of a peer (it names a trust domain).
    #[error("the server's SPIFFE ID cannot be expected of a peer")]
    ServerId(#[source] PolicyError),
    /// The server could not be reached.
    #[error("could not connect to the Mayfly server at {target}: {reason}")]
    Connect {
        /// Where.
        target: String,
        /// Why: the innermost cause (tonic's own chain repeats itself).
        reason: String,
    },
    /// The list of servers is unusable.
    #[error(transparent)]
    Servers(#[from] crate::server_set::ServerSetError),
    /// The admin socket does not exist.
    #[error(
        "there is no admin socket at {0}: is `mayfly server run` running with that data dir? Point to it with --admin-socket or MAYFLY_ADMIN_SOCKET"
    )]
    NoAdminSocket(PathBuf),
}

/// The node API's TLS client config: [`mtls::client_config`] over `source` (presenting its
/// SVID, or no certificate while it holds none, as when attesting), accepting only a server
/// that passes `server` (in production exactly the server's ID, see [`server_policy`]), HTTP/2.
///
/// # Errors
/// [`MtlsError::Tls`] when rustls refuses the configuration.
pub fn node_tls_config(
    source: &SvidSource,
    server: PeerPolicy,
) -> Result<rustls::ClientConfig, MtlsError> {
    let mut config = mtls::client_config(source, server)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// What an agent expects of the server: exactly `server_id` (`spiffe://<td>/mayfly/server`).
///
/// # Errors
/// [`ClientError::ServerId`] when `server_id` names a trust domain, not a workload.
pub fn server_policy(server_id: &SpiffeId) -> Result<PeerPolicy, ClientError> {
    PeerPolicy::exact(server_id.clone()).map_err(ClientError::ServerId)
}

/// Connects to the node API at `addr` with `source`'s SVID (none while it holds none) and
/// bundles, accepting only the server `server_id`. One HTTP/2 connection, multiplexed.
///
/// # Errors
/// [`ClientError`] when TLS cannot be configured or the server cannot be reached.
pub async fn connect_node(
    addr: SocketAddr,
    source: &SvidSource,
    server_id: &SpiffeId,
) -> Result<NodeClient<Channel>, ClientError> {
    let config = node_tls_config(source, server_policy(server_id)?)?;
    connect_node_with(addr, config).await
}

/// Connects to the node API at `addr` with a prepared TLS client config (an insecure
/// bootstrap's, say).
///
/// # Errors
/// [`ClientError::Connect`] when the server cannot be reached.
pub async fn connect_node_with(
    addr: SocketAddr,
    config: rustls::ClientConfig,
) -> Result<NodeClient<Channel>, ClientError> {
    let (client, _) = connect_node_any(&Arc::new(ServerSet::single(addr)), config).await?;
    Ok(client)
}

/// Connects to the node API at `servers` with `source`'s SVID (none while it holds none) and
/// bundles, accepting only the server `server_id`: see [`connect_node_any`].
///
/// # Errors
/// As [`connect_node_any`], and [`ClientError`] when TLS cannot be configured.
pub async fn connect_node_servers(
    servers: &Arc<ServerSet>,
    source: &SvidSource,
    server_id: &SpiffeId,
) -> Result<(NodeClient<Channel>, ConnectedTo), ClientError> {
    let config = node_tls_config(source, server_policy(server_id)?)?;
    connect_node_any(servers, config).await
}

/// The server a channel made by [`connect_node_any`] is connected to (the one it reached
/// last: the channel reconnects on its own when its connection is lost).
#[derive(Debug, Clone, Default)]
pub struct ConnectedTo(Arc<std::sync::Mutex<Option<SocketAddr>>>);

impl ConnectedTo {
    /// The server reached last, if any.
    pub fn get(&self) -> Option<SocketAddr> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that the channel reached `addr`.
    pub fn set(&self, addr: SocketAddr) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(addr);
    }
}

/// Connects to the node API of one of `servers` with a prepared TLS client config. One HTTP/2
/// connection, multiplexed; whenever it has to be made again (the server was lost), the
/// servers are tried again in [`ServerSet::attempt_order`], so the channel fails over on its
/// own. A call in flight when the connection is lost fails; the next one reconnects.
///
/// # Errors
/// [`ClientError::Connect`] when no server can be reached, naming each one's reason.
pub async fn connect_node_any(
    servers: &Arc<ServerSet>,
    config: rustls::ClientConfig,
) -> Result<(NodeClient<Channel>, ConnectedTo), ClientError> {
    failover_client(servers, config, false).await
}

/// Like [`connect_node_servers`], but the connection is made at the first call, so a client
/// can be set up while every server is down (an agent restarting with a stored identity
/// during an outage keeps running and connects when a server is back).
///
/// # Errors
/// [`ClientError`] when TLS cannot be configured.
pub async fn connect_node_servers_lazy(
    servers: &Arc<ServerSet>,
    source: &SvidSource,
    server_id: &SpiffeId,
) -> Result<(NodeClient<Channel>, ConnectedTo), ClientError> {
    let config = node_tls_config(source, server_policy(server_id)?)?;
    failover_client(servers, config, true).await
}

async fn failover_client(
    servers: &Arc<ServerSet>,
    config: rustls::ClientConfig,
    lazy: bool,
) -> Result<(NodeClient<Channel>, ConnectedTo), ClientError> {
    let config = Arc::new(config);
    let connected = ConnectedTo::default();
    let connector = {
        let servers = servers.clone();
        let connected = connected.clone();
        tower::service_fn(move |_uri| {
            let (config, servers, connected) = (config.clone(), servers.clone(), connected.clone());
            async move {
                let tls = connect_first(&servers, config).await?;
                let before = connected.get();
                connected.set(tls.0);
                // The channel reconnects on its own after a lost connection; when that lands
                // on another server, operators see the failover as they do for a retried call.
                if let Some(from) = before.filter(|from| *from != tls.0) {
                    tracing::info!(%from, to = %tls.0, "moved to another server");
                }
                Ok::<_, io::Error>(TokioIo::new(tls.1))
            }
        })
    };
    let endpoint = Endpoint::from_static("http://mayfly-server")
        // A server that vanished without closing its connections (a host gone, a cable cut)
        // is noticed by the missing ping answer, so the channel can move to another server.
        .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(KEEP_ALIVE_TIMEOUT);
    let channel = if lazy {
        endpoint.connect_with_connector_lazy(connector)
    } else {
        endpoint
            .connect_with_connector(connector)
            .await
            .map_err(|e| ClientError::Connect {
                target: servers
                    .addrs()
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
                reason: root_cause(&e),
            })?
    };
    let client = NodeClient::new(channel).max_decoding_message_size(crate::wire::MAX_NODE_MESSAGE);
    Ok((client, connected))
}

/// How long one server may take to accept a connection and finish the TLS handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often an idle connection to the server is pinged.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(20);
/// How long a ping may go unanswered before the connection is given up.
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A TLS connection to the first of `servers` that answers, and its address.
async fn connect_first(
    servers: &ServerSet,
    config: Arc<rustls::ClientConfig>,
) -> Result<(SocketAddr, tokio_rustls::client::TlsStream<TcpStream>), io::Error> {
    let (order, wait) = servers.attempt_order(Instant::now());
    if !wait.is_zero() {
        // Every server failed recently: wait out the soonest backoff (jittered) instead of
        // knocking again at once.
        tokio::time::sleep(wait).await;
    }
    let single = order.len() == 1;
    let mut reasons = Vec::with_capacity(order.len());
    for addr in order {
        let attempt = tokio::time::timeout(CONNECT_TIMEOUT, connect_tls(addr, config.clone()));
        let reason = match attempt.await {
            Ok(Ok(tls)) => {
                servers.succeeded(addr);
                return Ok((addr, tls));
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {}s", CONNECT_TIMEOUT.as_secs()),
        };
        servers.failed(addr, Instant::now());
        tracing::debug!(server = %addr, %reason, "could not connect to a server");
        reasons.push(if single {
            reason
        } else {
            format!("{addr}: {reason}")
        });
    }
    Err(io::Error::other(reasons.join("; ")))
}

async fn connect_tls(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, io::Error> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    // The name is not checked: the verifier authenticates the server by SPIFFE ID.
    let name = ServerName::try_from("mayfly-server").map_err(io::Error::other)?;
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}

/// Connects to the admin API on the Unix socket `path`.
///
/// # Errors
/// [`ClientError::NoAdminSocket`] when there is no socket there, [`ClientError::Connect`]
/// when it does not answer.
pub async fn connect_admin(path: &Path) -> Result<AdminClient<Channel>, ClientError> {
    if !path.exists() {
        return Err(ClientError::NoAdminSocket(path.to_owned()));
    }
    let socket = path.to_owned();
    let connector = tower::service_fn(move |_uri| {
        let socket = socket.clone();
        async move { Ok::<_, io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
    });
    let channel = Endpoint::from_static("http://mayfly-admin")
        .connect_with_connector(connector)
        .await
        .map_err(|e| ClientError::Connect {
            target: path.display().to_string(),
            reason: root_cause(&e),
        })?;
    Ok(AdminClient::new(channel))
}

/// An agent identity obtained from the server: its SVID chain and key, the bundle, and a node
/// API client authenticated with them.
pub struct AttestedAgent {
    /// The agent's SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// The agent SVID, leaf first.
    pub chain: Vec<rustls_pki_types::CertificateDer<'static>>,
    /// Its PKCS#8 private key, generated locally.
    pub key_pkcs8: Vec<u8>,
    /// The agent SVID and the trust bundle, as the node client uses them (renew in place with
    /// [`SvidSource::set_svid`]).
    pub source: SvidSource,
    /// A node API client over mTLS with the agent SVID.
    pub node: NodeClient<Channel>,
}

/// Why attestation failed.
#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    /// Connecting failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The server refused.
    #[error("the server refused attestation: {}", .0.message())]
    Refused(tonic::Status),
    /// Generating the key failed.
    #[error("could not generate the agent key")]
    Key(#[from] crate::svid::SvidError),
    /// The server's answer held no SVID.
    #[error("the server's answer was malformed: it holds no SVID")]
    NoSvid,
    /// The evidence could not be produced, or the server broke the attestation protocol.
    #[error("{0}")]
    Evidence(String),
    /// The server's answer named an SPIFFE ID that does not parse.
    #[error("the server's answer was malformed: its SPIFFE ID does not parse")]
    BadSpiffeId(#[source] crate::id::IdError),
}

/// Attests with a join token: generates a key locally, sends a CSR over TLS (verifying the
/// server against `bundles`, presenting no certificate), and connects again with mTLS as the
/// new agent.
///
/// # Errors
/// [`AttestError`] naming what failed.
pub async fn attest_with_join_token(
    addr: SocketAddr,
    bundles: Bundles,
    server_id: &SpiffeId,
    token: &str,
) -> Result<AttestedAgent, AttestError> {
    let evidence = mayfly_attestors::join_token::JoinTokenEvidence::new(token.to_owned());
    attest_node(addr, bundles, server_id, std::sync::Arc::new(evidence)).await
}

/// Attests with any node attestor's `evidence` on the node API's attestation stream
/// (answering its challenge when it asks one), then connects again with mTLS as the new
/// agent.
///
/// # Errors
/// [`AttestError`] naming what failed.
pub async fn attest_node(
    addr: SocketAddr,
    bundles: Bundles,
    server_id: &SpiffeId,
    evidence: std::sync::Arc<dyn mayfly_attestors::NodeEvidence>,
) -> Result<AttestedAgent, AttestError> {
    let request = crate::svid::KeyAndCsr::generate()?;
    let source = SvidSource::trust_only(bundles).map_err(ClientError::from)?;
    let mut client = connect_node(addr, &source, server_id).await?;
    let answer = crate::node_attest::attest(&mut client, evidence, request.csr.clone())
        .await
        .map_err(|e| match e {
            crate::node_attest::NodeAttestError::Refused(status) => AttestError::Refused(status),
            other => AttestError::Evidence(other.to_string()),
        })?;
    let svid = answer.svid.ok_or(AttestError::NoSvid)?;
    let spiffe_id = SpiffeId::parse(&svid.spiffe_id).map_err(AttestError::BadSpiffeId)?;
    let chain: Vec<_> = svid
        .cert_chain
        .into_iter()
        .map(rustls_pki_types::CertificateDer::from)
        .collect();
    source
        .set_svid(chain.clone(), &request.key_pkcs8)
        .map_err(ClientError::from)?;
    let node = connect_node(addr, &source, server_id).await?;
    Ok(AttestedAgent {
        spiffe_id,
        chain,
        key_pkcs8: request.key_pkcs8,
        source,
        node,
    })
}

/// Bundles holding `certs` (DER) for `td`.
pub fn bundle_map(td: &crate::id::TrustDomain, certs: &[Vec<u8>]) -> crate::svid::Bundles {
    crate::svid::Bundles::from([(
        td.clone(),
        certs
            .iter()
            .map(|c| rustls_pki_types::CertificateDer::from(c.clone()))
            .collect(),
    )])
}
