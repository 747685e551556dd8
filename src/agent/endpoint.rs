//! The agent's workload socket: binds it, attests every process that connects, and serves the
//! SPIFFE Workload API and Mayfly's task API on it.
//!
//! A workload is known by what the kernel says about the other end of its connection, never by
//! anything it sends. So attestation happens once per connection, at accept (SO_PEERCRED and a
//! pidfd, then the attestor on a blocking thread), and its result travels with the connection
//! into tonic as [`WorkloadPeer`], the connection's `ConnectInfo`. Every RPC confirms again
//! that the process that connected is still alive at its pid before it is answered, so a socket
//! handed on to another process after its creator died gets nothing.
//!
//! Every standard gRPC client is served unchanged, whatever it sends as `:authority` on a Unix
//! socket: `localhost` (grpc-go, tonic), nothing, the socket path (grpc-java) or the
//! percent-encoded path (grpcio >= 1.57, hence py-spiffe). Upstream h2 resets a stream whose
//! `:authority` does not parse as a URI authority before hyper or tonic see it, and neither has
//! an option to accept it. A layer on the socket rewriting `:authority` before h2 would have to
//! decode and re-encode every HPACK header block (the value may be Huffman-coded or an index
//! into the connection's dynamic table) and re-split frames, a second HTTP/2 implementation in
//! front of the first. So the workspace patches h2 instead (`[patch.crates-io]`,
//! vendor/h2/MAYFLY-PATCH.md): a one-function change that serves such a request as one without
//! `:authority`, which nothing here reads (tonic routes by path).
//!
//! The socket also serves gRPC health checking and server reflection ([`super::introspection`]),
//! without the `workload.spiffe.io` header.

use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use mayfly_attestors::{PeerProcess, Selector, WorkloadAttestor};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::Connected;
use tonic::{Request, Status};

use super::introspection;
use super::link::ServerLink;
use super::state::SnapshotRx;
use super::task_api::TaskApi;
use super::workload_api::SpiffeWorkloadApi;
use crate::proto::task::task_server::TaskServer;
use crate::proto::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer;

pub use crate::workload_client::HEADER;
/// The largest request decoded: every request of both APIs is a few hundred bytes at most.
const MAX_REQUEST: usize = 64 * 1024;
/// Connections attested but not yet taken by the gRPC server.
const HANDOFF_QUEUE: usize = 64;
/// The pause after a failed accept (for instance out of file descriptors), so the loop does not
/// spin while the condition lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How many connections may be in attestation at once. Attestation reads /proc and may hash an
/// executable on a blocking thread; past this many, accepting waits, so a flood of connections
/// queues in the kernel's backlog instead of piling up threads and memory in the agent.
const MAX_ATTESTING: usize = 64;

/// Why the workload socket could not be set up, or why a workload's request was refused.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The directory that is to hold the socket could not be created.
    #[error("could not create the directory {path} for the agent socket")]
    SocketDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Something other than a socket is at the socket path, and it is not ours to delete.
    #[error(
        "{0} exists and is not a socket; refusing to delete it: remove it or choose another --socket"
    )]
    NotASocket(PathBuf),
    /// Another process still answers on the socket path.
    #[error(
        "another process is already serving on {0}; stop the other agent or choose another --socket"
    )]
    InUse(PathBuf),
    /// A socket left over from an earlier run could not be inspected or removed.
    #[error("could not remove the stale socket {path}")]
    Stale {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The socket could not be bound, or its mode set.
    #[error("could not listen on the agent socket {path}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The gRPC server on the socket failed.
    #[error("the workload API stopped")]
    Serve(#[source] tonic::transport::Error),
    /// The descriptors built into the agent for server reflection do not decode.
    #[error(
        "server reflection could not be set up from the built-in API descriptors; this is a build defect, report it"
    )]
    Reflection(#[source] tonic_reflection::server::Error),
    /// The request lacks the header the SPIFFE Workload API requires of every call.
    #[error(
        "the request lacks the `workload.spiffe.io: true` header that the SPIFFE Workload API requires"
    )]
    MissingHeader,
    /// The connecting process could not be attested, so nothing can be said about who it is.
    #[error("the agent could not attest the calling process: {0}")]
    NotAttested(String),
    /// The process that connected has exited, so whoever holds the socket now is not it.
    #[error(
        "the process that opened this connection is gone ({0}); connect again from the workload itself"
    )]
    PeerChanged(String),
    /// The workload matches no registration entry.
    #[error(
        "no identity issued: no registration entry matches this workload's selectors ({selectors}); register one with `mayfly entry create`"
    )]
    NoEntry {
        /// The workload's selectors, comma-separated.
        selectors: String,
    },
    /// The workload matches entries, but the agent holds no unexpired SVID for any of them.
    #[error(
        "no identity issued: the registration entries matching this workload ({entries}) have no valid SVID yet; the agent may not have reached the server"
    )]
    NoValidSvid {
        /// The SPIFFE IDs of the matching entries, comma-separated.
        entries: String,
    },
    /// The task request named a SPIFFE ID that does not parse.
    #[error("'{id}' is not a SPIFFE ID: {reason}")]
    BadSpiffeId {
        /// The ID as given (cut to 200 characters).
        id: String,
        /// Why it does not parse.
        reason: String,
    },
    /// The task request named an identity that none of the caller's entries grants.
    #[error(
        "{0} is not an identity of this workload: no registration entry with that SPIFFE ID matches the caller's selectors"
    )]
    NotCallersEntry(String),
    /// A JWT-SVID request names no audience.
    #[error("a JWT-SVID needs an audience; name the service that will receive it")]
    NoAudience,
    /// A JWT-SVID request names several audiences.
    #[error(
        "the request names {0} audiences; a Mayfly JWT-SVID is for exactly one, so ask once per audience"
    )]
    SeveralAudiences(usize),
    /// A validation request carries no token.
    #[error("no token to validate; send the JWT-SVID in the `svid` field")]
    NoToken,
    /// The token to validate was refused.
    #[error("the JWT-SVID is not valid: {0}")]
    InvalidToken(#[source] crate::jwt::JwtError),
    /// The agent is stopping.
    #[error("the agent is shutting down; connect again once it is back")]
    ShuttingDown,
}

impl From<EndpointError> for Status {
    /// The one place where endpoint errors become gRPC statuses.
    fn from(e: EndpointError) -> Self {
        use EndpointError as E;
        let message = e.to_string();
        match e {
            E::MissingHeader
            | E::BadSpiffeId { .. }
            | E::NoAudience
            | E::SeveralAudiences(_)
            | E::NoToken
            | E::InvalidToken(_) => Status::invalid_argument(message),
            E::NotAttested(_)
            | E::PeerChanged(_)
            | E::NoEntry { .. }
            | E::NoValidSvid { .. }
            | E::NotCallersEntry(_) => Status::permission_denied(message),
            E::ShuttingDown => Status::unavailable(message),
            E::SocketDir { .. }
            | E::NotASocket(_)
            | E::InUse(_)
            | E::Stale { .. }
            | E::Bind { .. }
            | E::Serve(_)
            | E::Reflection(_) => Status::internal(message),
        }
    }
}

/// Binds the workload socket at `path`: creates its directory if missing, replaces a stale
/// socket left by an earlier run, and makes the socket mode 0777.
///
/// The mode is wide open on purpose: who gets what is decided by attesting the connecting
/// process, not by file permissions, and any process on the node may ask (most get
/// PermissionDenied). Restricting the mode would only hide the agent from legitimate workloads
/// running as other users.
///
/// Must be called within a Tokio runtime.
///
/// # Errors
/// [`EndpointError::SocketDir`], [`EndpointError::NotASocket`] when a regular file (or anything
/// but a socket) is in the way, [`EndpointError::InUse`] when another agent answers there,
/// [`EndpointError::Stale`] or [`EndpointError::Bind`].
pub fn bind(path: &Path) -> Result<UnixListener, EndpointError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| EndpointError::SocketDir {
            path: dir.to_owned(),
            source,
        })?;
    }
    let stale = |source| EndpointError::Stale {
        path: path.to_owned(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            // A socket someone still answers on belongs to a running agent: removing it would
            // silently cut that agent off from its workloads.
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(EndpointError::InUse(path.to_owned()));
            }
            std::fs::remove_file(path).map_err(stale)?;
        }
        Ok(_) => return Err(EndpointError::NotASocket(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(stale(e)),
    }
    let bind_err = |source| EndpointError::Bind {
        path: path.to_owned(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777)).map_err(bind_err)?;
    Ok(listener)
}

/// Serves the SPIFFE Workload API and the task API on `listener` until `shutdown` completes,
/// then ends every open stream (with `Unavailable`), waits for the connections to close and
/// removes the socket file.
///
/// Workloads are answered from `snapshot`; task SVIDs are minted over `link`; connecting
/// processes are attested with `attestor`.
///
/// # Errors
/// [`EndpointError::Serve`] when the gRPC server fails, [`EndpointError::Reflection`] when
/// reflection cannot be set up.
pub async fn serve(
    listener: UnixListener,
    snapshot: SnapshotRx,
    link: Arc<ServerLink>,
    attestor: Arc<dyn WorkloadAttestor>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), EndpointError> {
    let socket_path = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_owned));
    let extras = introspection::build()
        .await
        .map_err(EndpointError::Reflection)?;
    // Long-lived streams would hold graceful shutdown open forever, so they watch this too.
    let (stop_tx, stop) = watch::channel(false);
    let (handoff, attested) = mpsc::channel(HANDOFF_QUEUE);
    let accept = tokio::spawn(accept_loop(listener, attestor, handoff));

    let workload = SpiffeWorkloadApiServer::new(SpiffeWorkloadApi::new(
        snapshot.clone(),
        link.clone(),
        stop.clone(),
    ))
    .max_decoding_message_size(MAX_REQUEST);
    let task =
        TaskServer::new(TaskApi::new(snapshot, link, stop)).max_decoding_message_size(MAX_REQUEST);
    let result = tonic::transport::Server::builder()
        .add_service(InterceptedService::new(workload, require_header))
        .add_service(InterceptedService::new(task, require_header))
        .add_service(extras.health)
        .add_service(extras.reflection)
        .add_service(extras.reflection_alpha)
        .serve_with_incoming_shutdown(
            ReceiverStream::new(attested).map(Ok::<_, io::Error>),
            async move {
                shutdown.await;
                let _ = stop_tx.send(true);
                extras.reporter.stopping().await;
            },
        )
        .await;
    accept.abort();
    let _ = accept.await;
    if let Some(path) = socket_path {
        let _ = std::fs::remove_file(path);
    }
    result.map_err(EndpointError::Serve)
}

/// The header rule, applied to every service on the socket: exactly one
/// `workload.spiffe.io` value, and it is `true`.
fn require_header(request: Request<()>) -> Result<Request<()>, Status> {
    let mut values = request.metadata().get_all(HEADER).iter();
    match (values.next(), values.next()) {
        (Some(v), None) if v.as_bytes() == b"true" => Ok(request),
        _ => Err(EndpointError::MissingHeader.into()),
    }
}

/// Accepts connections and attests each on a task of its own, so a slow attestation (hashing a
/// large executable) never holds up the next workload.
async fn accept_loop(
    listener: UnixListener,
    attestor: Arc<dyn WorkloadAttestor>,
    handoff: mpsc::Sender<WorkloadConn>,
) {
    let attesting = Arc::new(tokio::sync::Semaphore::new(MAX_ATTESTING));
    loop {
        let Ok(permit) = attesting.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %crate::wire::error_chain(&e), "could not accept a workload connection");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let attestor = attestor.clone();
        let handoff = handoff.clone();
        tokio::spawn(async move {
            let peer = attest(&stream, attestor).await;
            drop(permit);
            // The server is gone only at shutdown; the connection is then dropped with it.
            let _ = handoff.send(WorkloadConn { io: stream, peer }).await;
        });
    }
}

/// Attests the process at the other end of `stream`. A failure is recorded, not dropped, so
/// the workload's first call learns why it gets nothing.
async fn attest(stream: &UnixStream, attestor: Arc<dyn WorkloadAttestor>) -> WorkloadPeer {
    let refused = |reason: String| {
        tracing::warn!(%reason, "workload attestation failed");
        WorkloadPeer(Arc::new(Attestation::Refused(reason)))
    };
    let process = match PeerProcess::from_socket(stream) {
        Ok(p) => p,
        Err(e) => return refused(e.to_string()),
    };
    let credentials = process.credentials();
    let name = attestor.name();
    let selectors = match tokio::task::spawn_blocking(move || attestor.attest(&credentials)).await {
        Ok(Ok(selectors)) => selectors,
        Ok(Err(e)) => return refused(format!("the {name} attestor failed: {e}")),
        Err(e) => return refused(format!("the {name} attestor did not finish: {e}")),
    };
    // The selectors were read by pid: they are the peer's only if it still holds that pid.
    if let Err(e) = process.confirm() {
        return refused(format!("{e} while it was being attested"));
    }
    tracing::debug!(pid = credentials.pid, ?selectors, "workload attested");
    WorkloadPeer(Arc::new(Attestation::Attested { process, selectors }))
}

/// What attestation at accept established about one connection's peer: the connection's
/// `ConnectInfo`, found in every request's extensions.
#[derive(Debug, Clone)]
pub(crate) struct WorkloadPeer(Arc<Attestation>);

#[derive(Debug)]
enum Attestation {
    Attested {
        process: PeerProcess,
        selectors: Vec<Selector>,
    },
    Refused(String),
}

impl WorkloadPeer {
    /// Confirms the connection was attested and its process is still alive at its pid.
    ///
    /// # Errors
    /// [`EndpointError::NotAttested`] with the reason attestation failed,
    /// [`EndpointError::PeerChanged`] when the process has exited (or its pid was reused).
    pub fn confirm(&self) -> Result<(), EndpointError> {
        match &*self.0 {
            Attestation::Attested { process, .. } => process
                .confirm()
                .map_err(|e| EndpointError::PeerChanged(e.to_string())),
            Attestation::Refused(reason) => Err(EndpointError::NotAttested(reason.clone())),
        }
    }

    /// The selectors attested at accept; none for a connection whose attestation failed (which
    /// matches no entry). Call [`WorkloadPeer::confirm`] before relying on them.
    pub fn selectors(&self) -> &[Selector] {
        match &*self.0 {
            Attestation::Attested { selectors, .. } => selectors,
            Attestation::Refused(_) => &[],
        }
    }
}

/// The attested peer of the connection `request` came on, confirmed still alive.
///
/// # Errors
/// As [`WorkloadPeer::confirm`]; [`EndpointError::NotAttested`] for a request that did not
/// come through [`serve`]'s accept loop.
pub(crate) fn caller<T>(request: &Request<T>) -> Result<WorkloadPeer, EndpointError> {
    let peer = request.extensions().get::<WorkloadPeer>().ok_or_else(|| {
        EndpointError::NotAttested("the connection did not pass the agent's accept loop".into())
    })?;
    peer.confirm()?;
    Ok(peer.clone())
}

/// An accepted, attested connection, as tonic takes it.
struct WorkloadConn {
    io: UnixStream,
    peer: WorkloadPeer,
}

impl Connected for WorkloadConn {
    type ConnectInfo = WorkloadPeer;

    fn connect_info(&self) -> WorkloadPeer {
        self.peer.clone()
    }
}

impl AsyncRead for WorkloadConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for WorkloadConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
