//! The proxy's listener: accept, mTLS handshake with the SPIFFE verifier and the ID/scope
//! policy, then HTTP routing or a TCP pipe, with one access log line per request or
//! connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use super::PeerInfo;
use super::bearer::{Bearer, BearerPolicy};
use super::http::HttpProxy;
use super::routes::Routes;
use crate::mtls::{self, MtlsError, PeerPolicy, SvidSource};
use crate::workload_client::JwtBundleSource;

/// How long a client may take to complete the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a refused client may take to close after the alert.
const LINGER_TIMEOUT: Duration = Duration::from_secs(2);

/// What the proxy does after the handshake.
#[derive(Debug, Clone)]
pub enum ProxyMode {
    /// HTTP/1.1 and HTTP/2, each request decided by the routes.
    Http(Routes),
    /// Bytes piped to the upstream.
    Tcp,
}

/// A validated proxy configuration.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Where to listen.
    pub listen: SocketAddr,
    /// Where to forward.
    pub upstream: SocketAddr,
    /// HTTP or TCP.
    pub mode: ProxyMode,
    /// Who may complete the handshake: allowed IDs and the scopes every peer must carry.
    pub policy: PeerPolicy,
    /// Which of the proxy's own SVIDs to present; the first when `None`.
    pub own_id: Option<crate::id::SpiffeId>,
    /// Which client credentials authenticate.
    pub accept: Accept,
}

/// Which client credentials the proxy accepts (`--accept`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accept {
    /// A client certificate (X509-SVID), verified in the handshake. With `jwt` too, the
    /// certificate is optional: a client that presents one is verified and identified by it;
    /// one that does not needs a bearer token on every request.
    pub x509: bool,
    /// Bearer JWT-SVIDs, in HTTP mode only.
    pub jwt: Option<BearerPolicy>,
}

impl Default for Accept {
    /// Client certificates only, as before bearer tokens existed.
    fn default() -> Self {
        Self {
            x509: true,
            jwt: None,
        }
    }
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The listen address could not be bound.
    #[error("could not listen on {addr}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// TLS could not be configured.
    #[error(transparent)]
    Mtls(#[from] MtlsError),
    /// Bearer tokens were asked for where they cannot be carried or checked.
    #[error("{0}")]
    Accept(&'static str),
}

/// A running proxy.
pub struct RunningProxy {
    /// The address it listens on.
    pub local_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl RunningProxy {
    /// Stops accepting; open connections are dropped.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }
}

/// Starts the proxy with its SVID and bundles from `source`, accepting client certificates
/// only (`config.accept` must not ask for bearer tokens; see [`start_with_jwt`]).
///
/// # Errors
/// [`ProxyError`] when the address cannot be bound or TLS cannot be configured.
pub async fn start(config: ProxyConfig, source: SvidSource) -> Result<RunningProxy, ProxyError> {
    start_inner(config, source, None).await
}

/// [`start`], validating the bearer tokens `config.accept` asks for against the JWT bundles
/// of `jwt_bundles`.
///
/// # Errors
/// [`ProxyError`] when the address cannot be bound, TLS cannot be configured, or the
/// configuration accepts neither credential or bearer tokens in TCP mode.
pub async fn start_with_jwt(
    config: ProxyConfig,
    source: SvidSource,
    jwt_bundles: JwtBundleSource,
) -> Result<RunningProxy, ProxyError> {
    start_inner(config, source, Some(jwt_bundles)).await
}

async fn start_inner(
    config: ProxyConfig,
    source: SvidSource,
    jwt_bundles: Option<JwtBundleSource>,
) -> Result<RunningProxy, ProxyError> {
    let bearer = match (&config.accept.jwt, jwt_bundles, &config.mode) {
        (None, _, _) => None,
        (Some(_), _, ProxyMode::Tcp) => {
            return Err(ProxyError::Accept(
                "bearer tokens travel in HTTP headers, so --accept jwt needs HTTP mode: give --route rules",
            ));
        }
        (Some(_), None, _) => {
            return Err(ProxyError::Accept(
                "--accept jwt needs JWT bundles to validate tokens against; start the proxy with a JWT bundle source",
            ));
        }
        (Some(policy), Some(bundles), ProxyMode::Http(_)) => {
            Some(Bearer::new(policy.clone(), config.policy.clone(), bundles))
        }
    };
    let mut tls = match (config.accept.x509, bearer.is_some()) {
        (true, false) => mtls::server_config(&source, config.policy.clone())?,
        (true, true) => mtls::server_config_optional_client(&source, config.policy.clone())?,
        (false, true) => mtls::server_config_no_client_auth(&source)?,
        (false, false) => {
            return Err(ProxyError::Accept(
                "the proxy accepts no credential: give --accept x509, jwt or x509,jwt",
            ));
        }
    };
    if matches!(config.mode, ProxyMode::Http(_)) {
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    }
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ProxyError::Listen {
            addr: config.listen,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| ProxyError::Listen {
        addr: config.listen,
        source,
    })?;
    let http = match &config.mode {
        ProxyMode::Http(routes) => Some(Arc::new(HttpProxy::new(
            routes.clone(),
            config.upstream,
            bearer,
        ))),
        ProxyMode::Tcp => None,
    };
    let (shutdown, mut stop) = watch::channel(false);
    let upstream = config.upstream;
    let task = tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = stop.changed() => return,
            };
            let acceptor = acceptor.clone();
            let http = http.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                handle(acceptor, tcp, remote, http, upstream).await;
            });
        }
    });
    Ok(RunningProxy {
        local_addr,
        shutdown,
        task,
    })
}

async fn handle(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    remote: SocketAddr,
    http: Option<Arc<HttpProxy>>,
    upstream: SocketAddr,
) {
    let accept = acceptor.accept(tcp).into_fallible();
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
        Ok(Ok(tls)) => tls,
        Ok(Err((e, tcp))) => {
            tracing::info!(target: "mayfly::access", %remote, decision = "deny", reason = %e, "handshake refused");
            linger(tcp).await;
            return;
        }
        Err(_) => {
            tracing::info!(target: "mayfly::access", %remote, decision = "deny", reason = "handshake timed out", "handshake refused");
            return;
        }
    };
    // With --accept x509,jwt a client may present no certificate (then `peer` is `None` and
    // each request needs a bearer token); with jwt alone none is asked for.
    let peer = mtls::peer_of(tls.get_ref().1).map(PeerInfo::from);
    match (http, peer) {
        (Some(proxy), peer) => proxy.serve_connection(peer, tls).await,
        (None, Some(peer)) => pipe(tls, peer, upstream).await,
        (None, None) => {}
    }
}

/// Closes a connection whose handshake was refused, after rustls sent its alert: our side is
/// shut down and what the client already sent is read and discarded (for at most
/// [`LINGER_TIMEOUT`]), so the connection ends with a FIN. Dropping it with that data unread
/// would reset it, and the reset can destroy the alert before the client reads it, leaving the
/// client with "connection reset" instead of the reason (under TLS 1.3 a client learns that its
/// certificate was refused only from that alert).
async fn linger(mut tcp: TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tcp.shutdown().await;
    let mut discard = [0u8; 4096];
    let drain = async { while let Ok(1..) = tcp.read(&mut discard).await {} };
    let _ = tokio::time::timeout(LINGER_TIMEOUT, drain).await;
}

async fn pipe(
    mut tls: tokio_rustls::server::TlsStream<TcpStream>,
    peer: PeerInfo,
    upstream: SocketAddr,
) {
    let log = |decision: &str, detail: String| {
        tracing::info!(
            target: "mayfly::access",
            peer = %peer.id.base(),
            scopes = %peer.scopes_header(),
            serial = %peer.serial,
            decision,
            detail,
        );
    };
    let mut up = match TcpStream::connect(upstream).await {
        Ok(up) => up,
        Err(e) => {
            log("allow", format!("the upstream {upstream} refused: {e}"));
            return;
        }
    };
    let _ = up.set_nodelay(true);
    match tokio::io::copy_bidirectional(&mut tls, &mut up).await {
        Ok((sent, received)) => log("allow", format!("closed; {sent} bytes up, {received} down")),
        Err(e) => log("allow", format!("ended: {e}")),
    }
}
