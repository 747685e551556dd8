//! The node API's listener: TLS handshakes done by us (tonic's own TLS takes no custom
//! verifier), each connection handed to tonic with the peer its handshake verified attached.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

use crate::mtls::{self, VerifiedPeer};
use crate::server::bundle_wake::BundleWake;

/// A handshake slower than this is dropped, so idle sockets cannot pile up.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What tonic hands each request about its connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The client the handshake verified ([`mtls::peer_of`]); `None` when it presented no
    /// certificate, which the node API's config allows so that agents can attest.
    pub peer: Option<Arc<VerifiedPeer>>,
    /// The client's address, which failed attestations are counted against.
    pub remote: Option<std::net::SocketAddr>,
}

/// One accepted, handshaken TLS connection.
pub struct TlsConn {
    inner: TlsStream<TcpStream>,
    peer: PeerInfo,
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts TCP connections on `listener`, handshakes each concurrently, and yields the
/// successful ones. Failed handshakes are logged and dropped; the listener keeps serving. A
/// refused client certificate wakes `refused` (a re-read of the bundle: the certificate may
/// come from a server whose CA this one has not loaded yet).
///
/// The listener is closed as soon as the stream is dropped (the server stopped); the returned
/// task ends then, so awaiting it guarantees the address is free again.
pub fn incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    refused: BundleWake,
) -> (
    impl Stream<Item = Result<TlsConn, io::Error>>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = mpsc::channel::<Result<TlsConn, io::Error>>(128);
    let accept_loop = tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = tx.closed() => break,
            };
            let (tcp, addr) = match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let refused = refused.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(inner)) => {
                        let peer = PeerInfo {
                            peer: mtls::peer_of(inner.get_ref().1).map(Arc::new),
                            remote: Some(addr),
                        };
                        let _ = tx.send(Ok(TlsConn { inner, peer })).await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(%addr, error = %e, "TLS handshake failed");
                        if BundleWake::is_refused_certificate(&e) {
                            refused.wake();
                        }
                    }
                    Err(_) => tracing::debug!(%addr, "TLS handshake timed out"),
                }
            });
        }
    });
    (tokio_stream::wrappers::ReceiverStream::new(rx), accept_loop)
}
