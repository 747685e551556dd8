//! A client of the agent's socket, for `mayfly svid fetch|mint`, the proxy and tests: the
//! SPIFFE Workload API and the task API, with the `workload.spiffe.io` header on every call,
//! and the files a workload gets (`svid.pem`, `svid.key`, `bundle.pem`).

use std::io;
use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::bundle;
use crate::files::{self, FileError};
use crate::proto::task::task_client::TaskClient;
use crate::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;

pub mod jwt_bundles;
pub use jwt_bundles::JwtBundleSource;

/// The environment variable SPIFFE clients read the socket address from.
pub const ENDPOINT_ENV: &str = "SPIFFE_ENDPOINT_SOCKET";
/// The header every Workload API call carries; the agent refuses a call without it.
pub const HEADER: &str = "workload.spiffe.io";
/// Where the agent's socket is when nothing says otherwise (made absolute by
/// [`socket_path`]).
pub const DEFAULT_SOCKET: &str = ".mayfly/agent.sock";

/// Why a workload call failed.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadClientError {
    /// The socket address is not `unix:///absolute/path` or a path.
    #[error(
        "'{0}' is not a Workload API socket address: write unix:///absolute/path or a file path"
    )]
    BadAddress(String),
    /// Nothing listens at the socket.
    #[error(
        "could not reach the agent at {path}: {reason}; is `mayfly agent run` running with that --socket (or SPIFFE_ENDPOINT_SOCKET)?"
    )]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why: the innermost cause.
        reason: String,
    },
    /// The agent refused.
    #[error("the agent refused: {}", .0.message())]
    Refused(tonic::Status),
    /// The agent answered without an SVID.
    #[error("the agent's answer held no SVID")]
    Empty,
    /// The agent serves this workload other identities than the one asked for.
    #[error("this workload has no SVID for {wanted}; the agent serves it: {served}")]
    NotServed {
        /// The SPIFFE ID asked for, escaped.
        wanted: String,
        /// The SPIFFE IDs served, comma-separated.
        served: String,
    },
    /// Writing the files failed.
    #[error(transparent)]
    File(#[from] FileError),
    /// No JWT bundles arrived from `FetchJWTBundles` in time.
    #[error(
        "no JWT bundles from the Workload API after {waited:?} (last problem: {last_error}); is the agent running and does it serve FetchJWTBundles?"
    )]
    NoJwtBundles {
        /// How long it waited.
        waited: std::time::Duration,
        /// The last failure seen.
        last_error: String,
    },
}

/// Adds the Workload API header to every call.
#[derive(Clone, Copy, Debug, Default)]
pub struct WorkloadHeader;

impl Interceptor for WorkloadHeader {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert(HEADER, MetadataValue::from_static("true"));
        Ok(request)
    }
}

/// A Workload API client that sends the header.
pub type WorkloadApi = SpiffeWorkloadApiClient<InterceptedService<Channel, WorkloadHeader>>;
/// A task API client that sends the header.
pub type TaskApi = TaskClient<InterceptedService<Channel, WorkloadHeader>>;

/// The socket path from `--socket`, else `SPIFFE_ENDPOINT_SOCKET`, else `default`, made
/// absolute. Accepts `unix:///path`, `unix:path` and plain paths.
///
/// # Errors
/// [`WorkloadClientError::BadAddress`] for any other scheme or a `unix://host/…` form.
pub fn socket_path(flag: Option<&str>, default: &Path) -> Result<PathBuf, WorkloadClientError> {
    let env = std::env::var(ENDPOINT_ENV).ok();
    let raw = match flag.or(env.as_deref()) {
        Some(s) => s.to_owned(),
        None => default.display().to_string(),
    };
    let path = if let Some(rest) = raw.strip_prefix("unix://") {
        // The authority must be empty: unix:///path.
        if !rest.starts_with('/') {
            return Err(WorkloadClientError::BadAddress(raw));
        }
        PathBuf::from(rest)
    } else if let Some(rest) = raw.strip_prefix("unix:") {
        PathBuf::from(rest)
    } else if raw.contains("://") {
        return Err(WorkloadClientError::BadAddress(raw));
    } else {
        PathBuf::from(&raw)
    };
    Ok(std::path::absolute(&path).unwrap_or(path))
}

/// Connects to the agent socket at `path`.
///
/// # Errors
/// [`WorkloadClientError::Connect`] when nothing answers there.
pub async fn connect(path: &Path) -> Result<Channel, WorkloadClientError> {
    let socket = path.to_owned();
    let connector = tower::service_fn(move |_uri| {
        let socket = socket.clone();
        async move { Ok::<_, io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
    });
    Endpoint::from_static("http://mayfly-agent")
        .connect_with_connector(connector)
        .await
        .map_err(|e| WorkloadClientError::Connect {
            path: path.to_owned(),
            reason: root_cause(&e),
        })
}

/// The innermost cause of `e`, which is what a person can act on ("Connection refused").
pub(crate) fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// The Workload API over `channel`, with the header.
pub fn workload_api(channel: Channel) -> WorkloadApi {
    SpiffeWorkloadApiClient::with_interceptor(channel, WorkloadHeader)
}

/// The task API over `channel`, with the header.
pub fn task_api(channel: Channel) -> TaskApi {
    TaskClient::with_interceptor(channel, WorkloadHeader)
}

/// An SVID as a workload receives it.
#[derive(Clone)]
pub struct WorkloadSvid {
    /// The SPIFFE ID.
    pub spiffe_id: String,
    /// DER certificates, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// PKCS#8 DER key.
    pub key_pkcs8: Vec<u8>,
    /// DER CA certificates.
    pub bundle: Vec<Vec<u8>>,
    /// The entry's hint, telling the workload's identities apart (empty: none, and always
    /// empty for a task SVID).
    pub hint: String,
}

impl WorkloadSvid {
    /// The leaf's serial (lowercase hex) and notAfter (Unix seconds), for printing.
    pub fn leaf_summary(&self) -> Option<(String, i64)> {
        let leaf = crate::svid::parse_leaf(self.chain.first()?).ok()?;
        let (serial, not_after) = crate::svid::serial_and_not_after(&leaf).ok()?;
        // The serial as the audit log writes it, so the two can be matched.
        Some((serial.to_hex(), crate::wire::unix_secs(not_after)))
    }
}

/// The first SVID of the first FetchX509SVID message (the workload's default identity).
///
/// # Errors
/// [`WorkloadClientError`] when the agent refuses or sends nothing usable.
pub async fn fetch_x509(channel: Channel) -> Result<WorkloadSvid, WorkloadClientError> {
    fetch_x509_as(channel, None).await
}

/// The SVID with the SPIFFE ID `wanted` from the first FetchX509SVID message, or the first
/// one when `None`.
///
/// # Errors
/// [`WorkloadClientError`] when the agent refuses, sends nothing usable, or holds no SVID
/// with that ID for this workload ([`WorkloadClientError::NotServed`]).
pub async fn fetch_x509_as(
    channel: Channel,
    wanted: Option<&str>,
) -> Result<WorkloadSvid, WorkloadClientError> {
    use crate::proto::workload::X509svidRequest;
    let mut stream = workload_api(channel)
        .fetch_x509svid(X509svidRequest {})
        .await
        .map_err(WorkloadClientError::Refused)?
        .into_inner();
    let message = stream
        .message()
        .await
        .map_err(WorkloadClientError::Refused)?
        .ok_or(WorkloadClientError::Empty)?;
    let served: Vec<String> = message.svids.iter().map(|s| s.spiffe_id.clone()).collect();
    let svid = match wanted {
        None => message.svids.into_iter().next(),
        Some(id) => message.svids.into_iter().find(|s| s.spiffe_id == id),
    };
    let svid = match (svid, wanted) {
        (Some(svid), _) => svid,
        (None, None) => return Err(WorkloadClientError::Empty),
        (None, Some(id)) => {
            return Err(WorkloadClientError::NotServed {
                wanted: crate::text::escape_bounded(id, 200).into_owned(),
                served: served.join(", "),
            });
        }
    };
    Ok(WorkloadSvid {
        spiffe_id: svid.spiffe_id,
        chain: split_der(&svid.x509_svid),
        key_pkcs8: svid.x509_svid_key,
        bundle: split_der(&svid.bundle),
        hint: svid.hint,
    })
}

/// A task SVID from the task API.
///
/// # Errors
/// [`WorkloadClientError::Refused`] with the agent's (and server's) reason.
pub async fn mint_x509(
    channel: Channel,
    request: crate::proto::task::MintX509svidRequest,
) -> Result<WorkloadSvid, WorkloadClientError> {
    let answer = task_api(channel)
        .mint_x509svid(request)
        .await
        .map_err(WorkloadClientError::Refused)?
        .into_inner();
    Ok(WorkloadSvid {
        spiffe_id: answer.spiffe_id,
        chain: split_der(&answer.x509_svid),
        key_pkcs8: answer.x509_svid_key,
        bundle: split_der(&answer.bundle),
        hint: String::new(),
    })
}

/// Splits concatenated DER certificates (the Workload API's wire form) into one per
/// certificate, by reading each outer SEQUENCE's length. Trailing garbage is dropped.
pub fn split_der(mut der: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while der.len() >= 2 && der[0] == 0x30 {
        let (len, header) = match der[1] {
            n if n < 0x80 => (usize::from(n), 2),
            0x81 if der.len() >= 3 => (usize::from(der[2]), 3),
            0x82 if der.len() >= 4 => (usize::from(der[2]) << 8 | usize::from(der[3]), 4),
            0x83 if der.len() >= 5 => (
                usize::from(der[2]) << 16 | usize::from(der[3]) << 8 | usize::from(der[4]),
                5,
            ),
            _ => break,
        };
        let Some(cert) = der.get(..header + len) else {
            break;
        };
        out.push(cert.to_vec());
        der = &der[header + len..];
    }
    out
}

/// Writes `svid.pem` (chain, 0644), `svid.key` (0600) and `bundle.pem` (0644) into `dir`.
///
/// # Errors
/// [`WorkloadClientError::File`] when a file cannot be written.
pub fn write_files(dir: &Path, svid: &WorkloadSvid) -> Result<(), WorkloadClientError> {
    files::create_dir_if_missing(dir, 0o755)?;
    let key = bundle::pem_block("PRIVATE KEY", &svid.key_pkcs8);
    files::write_atomically(dir, "svid.key", key.as_bytes(), 0o600)?;
    files::write_atomically(
        dir,
        "svid.pem",
        bundle::to_pem(&svid.chain).as_bytes(),
        0o644,
    )?;
    files::write_atomically(
        dir,
        "bundle.pem",
        bundle::to_pem(&svid.bundle).as_bytes(),
        0o644,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_addresses_are_parsed_strictly() {
        let d = Path::new("/x/default.sock");
        assert_eq!(
            socket_path(Some("unix:///a/b.sock"), d).unwrap(),
            PathBuf::from("/a/b.sock")
        );
        assert_eq!(
            socket_path(Some("unix:/a/b.sock"), d).unwrap(),
            PathBuf::from("/a/b.sock")
        );
        assert_eq!(
            socket_path(Some("/a/b.sock"), d).unwrap(),
            PathBuf::from("/a/b.sock")
        );
        assert!(socket_path(Some("unix://host/a.sock"), d).is_err());
        assert!(socket_path(Some("tcp://127.0.0.1:1"), d).is_err());
    }

    #[test]
    fn concatenated_der_splits_back_into_certificates() {
        let a = [0x30, 0x03, 1, 2, 3];
        let mut long = vec![0x30, 0x82, 0x01, 0x00];
        long.extend(std::iter::repeat_n(7u8, 256));
        let joined = [&a[..], &long[..]].concat();
        assert_eq!(split_der(&joined), vec![a.to_vec(), long]);
        assert!(split_der(&[0x30, 0x05, 1]).is_empty(), "truncated");
    }
}
