//! The OIDC discovery endpoint (`server run --oidc-bind`), like SPIRE's discovery provider: it
//! serves `/.well-known/openid-configuration` and the JWKS it names over HTTPS, so verifiers
//! outside SPIFFE (cloud IAM, Vault's JWT auth, PyJWT's `PyJWKClient`) can check JWT-SVIDs
//! with the trust domain's live keys.
//!
//! - [`issuer`]: the issuer URL, which the documents and the serving certificate derive from.
//! - [`documents`]: the answers, as pure functions.
//! - [`tls`]: the serving certificate, the operator's or self-issued from the server's CA.
//!
//! The listener is bounded like the node API's: handshakes and request headers time out, a
//! request head is at most [`MAX_HEAD`] bytes, a connection lives at most
//! [`CONNECTION_LIFETIME`], at most [`MAX_CONNECTIONS`] are served at once, and no request
//! body is ever read.

pub mod documents;
pub mod issuer;
pub mod tls;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use super::jwt_keys::PublishedJwtKeys;
use crate::id::TrustDomain;
pub use issuer::{Issuer, IssuerHost};

/// A TLS handshake slower than this is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A request head must arrive within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a connection is kept, keep-alive included.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// The most connections served at once; more wait in the kernel's backlog.
pub const MAX_CONNECTIONS: usize = 256;
/// The largest request head read (hyper's smallest buffer).
pub const MAX_HEAD: usize = 8192;
/// The longest clients are told to cache a document.
const MAX_CACHE: Duration = Duration::from_secs(300);

/// Why the discovery endpoint's settings were refused.
#[derive(Debug, thiserror::Error)]
pub enum OidcConfigError {
    /// The bind address is malformed.
    #[error(
        "'{0}' is not an address for --oidc-bind (oidc_bind in a config file): write IP:PORT, such as 127.0.0.1:8443"
    )]
    Bind(String),
    /// The bind address is unspecified and no issuer was given.
    #[error(
        "--oidc-bind {0} listens on every address, so the issuer cannot be derived from it: give --oidc-issuer https://NAME with the name clients use"
    )]
    UnspecifiedBind(SocketAddr),
    /// The issuer URL is not an https origin.
    #[error("--oidc-issuer '{value}' is not usable: {why}")]
    Issuer {
        /// The value, escaped.
        value: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A discovery setting was given without `--oidc-bind`.
    #[error("--{0} only applies to the discovery endpoint: give --oidc-bind too, or drop it")]
    WithoutBind(&'static str),
    /// Only one of the certificate and key files was given.
    #[error(
        "the discovery endpoint's certificate needs both --oidc-cert and --oidc-key; give both, or neither to have the server issue one from its CA"
    )]
    CertIncomplete,
    /// A certificate or key file could not be read.
    #[error("could not read {path} (check the path and its permissions)")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file holds no usable PEM.
    #[error("{path} does not hold {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What it should hold.
        what: &'static str,
    },
    /// The key is not the certificate's.
    #[error("the key in {key} is not the key of the certificate in {cert}; give the matching pair")]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
}

/// Why the discovery endpoint could not start or renew its certificate.
#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    /// The address could not be bound.
    #[error(
        "could not listen on {addr} for the OIDC discovery endpoint (is another server using it? choose another address with --oidc-bind)"
    )]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The issuer could not be derived from the bound address.
    #[error(transparent)]
    Config(#[from] OidcConfigError),
    /// The self-issued serving certificate could not be made.
    #[error("could not issue the discovery endpoint's certificate: {0}")]
    Certificate(&'static str),
    /// rustls refused the configuration.
    #[error("the discovery endpoint's TLS configuration was refused: {0}")]
    Tls(rustls::Error),
}

/// The discovery endpoint's settings.
#[derive(Debug, Clone)]
pub struct OidcConfig {
    /// Where it listens.
    pub bind: SocketAddr,
    /// The issuer; `None` for `https://<bound address>`.
    pub issuer: Option<Issuer>,
    /// The operator's certificate and key; `None` to issue one from the server's CA.
    pub cert: Option<Arc<CertifiedKey>>,
}

/// What the listener reads per request.
#[derive(Clone)]
struct Served {
    td: TrustDomain,
    issuer: Arc<Issuer>,
    keys: PublishedJwtKeys,
    max_age: Duration,
}

/// Binds `addr`, and the issuer it gives when none is configured.
///
/// # Errors
/// [`OidcError::Bind`], or [`OidcConfigError::UnspecifiedBind`] through [`OidcError::Config`].
pub(crate) async fn bind(config: &OidcConfig) -> Result<(TcpListener, Issuer), OidcError> {
    let err = |source| OidcError::Bind {
        addr: config.bind,
        source,
    };
    let listener = TcpListener::bind(config.bind).await.map_err(err)?;
    let issuer = match &config.issuer {
        Some(issuer) => issuer.clone(),
        None => Issuer::of_addr(listener.local_addr().map_err(err)?)?,
    };
    Ok((listener, issuer))
}

/// Serves the documents of `td` on `listener` with `cert` until `stop` changes; `max_age`
/// (at most [`MAX_CACHE`]) is how long clients may cache them.
///
/// # Errors
/// [`OidcError::Tls`] when the TLS configuration is refused.
pub(crate) fn serve(
    td: TrustDomain,
    listener: TcpListener,
    issuer: Issuer,
    cert: tls::ServingCert,
    keys: PublishedJwtKeys,
    max_age: Duration,
    mut stop: watch::Receiver<bool>,
) -> Result<JoinHandle<()>, OidcError> {
    let acceptor = TlsAcceptor::from(Arc::new(tls::server_config(cert)?));
    let served = Served {
        td,
        issuer: Arc::new(issuer),
        keys,
        max_age: max_age.min(MAX_CACHE),
    };
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    Ok(tokio::spawn(async move {
        loop {
            // A free slot first, so that at the limit new connections wait in the backlog
            // instead of being accepted and left unserved; the server may stop meanwhile.
            let permit = tokio::select! {
                permit = slots.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
                _ = stop.changed() => return,
            };
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = stop.changed() => return,
            };
            let (tcp, addr) = match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "OIDC discovery: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let acceptor = acceptor.clone();
            let served = served.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let connection = async {
                    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
                        .await
                    {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            tracing::debug!(%addr, error = %e, "OIDC discovery: TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    };
                    serve_connection(tls, served, stop).await;
                };
                let _ = tokio::time::timeout(CONNECTION_LIFETIME, connection).await;
            });
        }
    }))
}

/// Serves HTTP/1.1 on one handshaken connection, closing it gracefully when the server stops.
async fn serve_connection(
    tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    served: Served,
    mut stop: watch::Receiver<bool>,
) {
    let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let served = served.clone();
        async move {
            // The body is never read: both documents are answers to GETs.
            Ok::<_, Infallible>(documents::respond(
                req.method(),
                req.uri().path(),
                &served.issuer,
                || served.keys.bundle(&served.td),
                served.max_age,
            ))
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEAD);
    let connection = builder.serve_connection(TokioIo::new(tls), service);
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "OIDC discovery: connection ended with an error");
            }
        }
        _ = stop.changed() => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}
