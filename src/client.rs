//! Clients of the server's APIs: the node API over TLS (agents, tests, benchmarks) and the
//! admin API over its Unix socket (the CLI).

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::{TcpStream, UnixStream};
use tonic::transport::{Channel, Endpoint};

use crate::id::SpiffeId;
use crate::proto::admin::admin_client::AdminClient;
use crate::proto::node::node_client::NodeClient;
use crate::tls::{self, LiveBundles, RotatingCert, TlsError};

/// Why a client could not connect.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// TLS could not be configured.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The server could not be reached.
    #[error("could not connect to the Mayfly server at {target}: {reason}")]
    Connect {
        /// Where.
        target: String,
        /// Why: the innermost cause (tonic's own chain repeats itself).
        reason: String,
    },
    /// The admin socket does not exist.
    #[error(
        "there is no admin socket at {0}: is `mayfly server run` running with that data dir? Point to it with --admin-socket or MAYFLY_ADMIN_SOCKET"
    )]
    NoAdminSocket(PathBuf),
}

/// Connects to the node API at `addr`, accepting only the server `server_id` chained to
/// `bundles`, presenting `agent_cert` when given. One HTTP/2 connection, multiplexed.
///
/// # Errors
/// [`ClientError`] when TLS cannot be configured or the server cannot be reached.
pub async fn connect_node(
    addr: SocketAddr,
    bundles: LiveBundles,
    server_id: SpiffeId,
    agent_cert: Option<Arc<RotatingCert>>,
) -> Result<NodeClient<Channel>, ClientError> {
    let config = tls::node_client_config(bundles, server_id, agent_cert)?;
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
    let config = Arc::new(config);
    let connector = tower::service_fn(move |_uri| {
        let config = config.clone();
        async move {
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            // The name is not checked: the verifier authenticates the server by SPIFFE ID.
            let name = ServerName::try_from("mayfly-server").map_err(io::Error::other)?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok::<_, io::Error>(TokioIo::new(tls))
        }
    });
    let channel = Endpoint::from_static("http://mayfly-server")
        .connect_with_connector(connector)
        .await
        .map_err(|e| ClientError::Connect {
            target: addr.to_string(),
            reason: root_cause(&e),
        })?;
    Ok(NodeClient::new(channel).max_decoding_message_size(crate::server::MAX_NODE_MESSAGE))
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

/// The innermost cause of `e`, which is what a person can act on ("Connection refused").
pub fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
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
    /// The trust bundle the server sent.
    pub bundles: LiveBundles,
    /// The certificate the mTLS client presents (swap it on renewal).
    pub cert: Arc<RotatingCert>,
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
    #[error("could not generate the agent key: {0}")]
    Key(#[from] crate::svid::SvidError),
    /// The server's answer was not usable.
    #[error("the server's answer was malformed: {0}")]
    BadAnswer(String),
}

/// Attests with a join token: generates a key locally, sends a CSR over TLS (verifying the
/// server against `bundles`), and connects again with mTLS as the new agent.
///
/// # Errors
/// [`AttestError`] naming what failed.
pub async fn attest_with_join_token(
    addr: SocketAddr,
    bundles: LiveBundles,
    server_id: SpiffeId,
    token: &str,
) -> Result<AttestedAgent, AttestError> {
    use crate::proto::node as pb;
    let request = crate::svid::KeyAndCsr::generate()?;
    let mut client = connect_node(addr, bundles.clone(), server_id.clone(), None).await?;
    let answer = client
        .attest(pb::AttestRequest {
            attestor: mayfly_attestors::join_token::NAME.into(),
            evidence: token.as_bytes().to_vec(),
            csr: request.csr.clone(),
        })
        .await
        .map_err(AttestError::Refused)?
        .into_inner();
    let svid = answer
        .svid
        .ok_or_else(|| AttestError::BadAnswer("no SVID".into()))?;
    let spiffe_id =
        SpiffeId::parse(&svid.spiffe_id).map_err(|e| AttestError::BadAnswer(e.to_string()))?;
    let chain: Vec<_> = svid
        .cert_chain
        .into_iter()
        .map(rustls_pki_types::CertificateDer::from)
        .collect();
    let cert = Arc::new(
        RotatingCert::new(chain.clone(), &request.key_pkcs8, tls::provider())
            .map_err(ClientError::from)?,
    );
    let node = connect_node(addr, bundles.clone(), server_id, Some(cert.clone())).await?;
    Ok(AttestedAgent {
        spiffe_id,
        chain,
        key_pkcs8: request.key_pkcs8,
        bundles,
        cert,
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

/// Bundles holding `certs` (DER) for `td`, ready for the verifiers.
pub fn bundles_from_der(td: &crate::id::TrustDomain, certs: &[Vec<u8>]) -> LiveBundles {
    Arc::new(std::sync::RwLock::new(bundle_map(td, certs)))
}
