//! One JWKS fetch: an `https://` URL checked, rustls with the system's CA bundle or a CA file,
//! HTTP/1.1 GET with a size limit and a timeout.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, Uri, header};
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::rt::TokioIo;
use mayfly_attestors::k8s_psat::MAX_JWKS;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

use super::JwksError;

/// Where Linux distributions keep the system's CA bundle; the first that exists is used
/// (`SSL_CERT_FILE` first, as OpenSSL reads it).
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];
/// The largest CA file read.
const MAX_CA_FILE: u64 = 4 * 1024 * 1024;

/// An `https://` URL, checked.
#[derive(Debug, Clone)]
pub struct HttpsUrl {
    text: String,
    pub(super) host: String,
    pub(super) port: u16,
    authority: String,
    pub(super) path: String,
}

impl HttpsUrl {
    /// Parses `text`.
    ///
    /// # Errors
    /// [`JwksError::BadUrl`] unless it is `https://HOST[:PORT]/PATH`.
    pub fn parse(text: &str) -> Result<Self, JwksError> {
        let bad = || JwksError::BadUrl(crate::text::escape_bounded(text, 200).into_owned());
        let uri: Uri = text.parse().map_err(|_| bad())?;
        if uri.scheme_str() != Some("https") {
            return Err(bad());
        }
        let authority = uri.authority().ok_or_else(bad)?;
        if authority.as_str().contains('@') {
            return Err(bad());
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        if host.is_empty() {
            return Err(bad());
        }
        Ok(Self {
            text: text.to_owned(),
            host: host.to_owned(),
            port: authority.port_u16().unwrap_or(443),
            authority: authority.as_str().to_owned(),
            path: uri
                .path_and_query()
                .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
        })
    }

    /// The URL as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// A TLS client trusting `ca_file`, or the system's CA bundle.
pub(super) fn client_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, JwksError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let pem = read_ca(path)?;
            let certs = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| JwksError::NoRoots {
                    path: path.display().to_string(),
                    reason: "it is not a PEM certificate bundle".into(),
                })?;
            for cert in certs {
                roots.add(cert).map_err(|e| JwksError::NoRoots {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })?;
            }
        }
        None => {
            let env = std::env::var_os("SSL_CERT_FILE").map(PathBuf::from);
            let candidates = env
                .into_iter()
                .chain(SYSTEM_BUNDLES.iter().map(PathBuf::from));
            if let Some(pem) = candidates.filter_map(|p| read_ca(&p).ok()).next() {
                // A system bundle may hold certificates webpki cannot use; the rest still do.
                roots.add_parsable_certificates(
                    CertificateDer::pem_slice_iter(&pem).filter_map(Result::ok),
                );
            }
        }
    }
    if roots.is_empty() {
        return Err(JwksError::NoRoots {
            path: ca_file.map_or_else(
                || format!("SSL_CERT_FILE or {}", SYSTEM_BUNDLES.join(", ")),
                |p| p.display().to_string(),
            ),
            reason: "no usable certificate was found".into(),
        });
    }
    let mut config = rustls::ClientConfig::builder_with_provider(crate::mtls::provider())
        .with_safe_default_protocol_versions()
        .map_err(JwksError::Tls)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

fn read_ca(path: &Path) -> Result<Vec<u8>, JwksError> {
    use std::io::Read as _;
    let err = |reason: String| JwksError::NoRoots {
        path: path.display().to_string(),
        reason,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_CA_FILE).read_to_end(&mut bytes))
        .map_err(|e| err(e.to_string()))?;
    Ok(bytes)
}

/// One GET of `url`, within `timeout`.
pub(super) async fn fetch(
    url: &HttpsUrl,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> Result<Vec<u8>, JwksError> {
    match tokio::time::timeout(timeout, fetch_unbounded(url, tls)).await {
        Ok(result) => result,
        Err(_) => Err(JwksError::Timeout {
            url: url.text.clone(),
            secs: timeout.as_secs(),
        }),
    }
}

async fn fetch_unbounded(
    url: &HttpsUrl,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Vec<u8>, JwksError> {
    let failed = |reason: String| JwksError::Fetch {
        url: url.text.clone(),
        reason,
    };
    let tcp = TcpStream::connect((url.host.as_str(), url.port))
        .await
        .map_err(|e| failed(format!("could not connect: {e}")))?;
    let name = ServerName::try_from(url.host.clone())
        .map_err(|_| failed("the host is not a DNS name or IP address".into()))?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| failed(format!("the TLS handshake failed: {e}")))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| failed(format!("HTTP/1.1 failed: {e}")))?;
    // The connection is driven beside the request; it ends when `sender` is dropped.
    let conn = tokio::spawn(conn);
    let request = Request::get(url.path.as_str())
        .header(header::HOST, url.authority.as_str())
        .header(header::ACCEPT, "application/json, application/jwk-set+json")
        .body(Empty::<Bytes>::new())
        .map_err(|e| failed(e.to_string()))?;
    let result = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| failed(format!("the request failed: {e}")))?;
        if response.status() != StatusCode::OK {
            return Err(JwksError::Status {
                url: url.text.clone(),
                status: response.status().as_u16(),
            });
        }
        let body = Limited::new(response.into_body(), MAX_JWKS)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    JwksError::TooLarge(url.text.clone())
                } else {
                    failed(format!("the body could not be read: {e}"))
                }
            })?;
        Ok(body.to_bytes().to_vec())
    }
    .await;
    drop(sender);
    conn.abort();
    result
}
