//! A minimal blocking IMDSv2 client: the three requests the agent needs, in plain HTTP/1.1
//! over `std::net`, each bounded in time and size.
//!
//! IMDSv2 first asks for a session token (`PUT /latest/api/token` with the token's lifetime
//! in `X-aws-ec2-metadata-token-ttl-seconds`) and then requires it on every read
//! (`X-aws-ec2-metadata-token`); instances set to require IMDSv2 refuse reads without it.
//! Nothing else of HTTP is needed: the metadata service answers with a `Content-Length` and
//! closes the connection when asked, so chunked bodies are refused rather than parsed.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs as _};
use std::time::{Duration, Instant};

use crate::node::MAX_EVIDENCE;

/// How long one request may take in all: connecting, sending and reading the answer.
pub const TIMEOUT: Duration = Duration::from_secs(2);
/// The session token's lifetime asked for, in seconds (AWS's documented example; the token
/// is used at once and not kept).
const TOKEN_TTL_SECONDS: &str = "21600";
/// The largest answer read: a body of up to 64 KiB and its headers.
const MAX_RESPONSE: usize = MAX_EVIDENCE + 8 * 1024;
/// The longest session token accepted (AWS's are 56 characters).
const MAX_TOKEN: usize = 1024;

const TOKEN_PATH: &str = "/latest/api/token";
const DOCUMENT_PATH: &str = "/latest/dynamic/instance-identity/document";
const SIGNATURE_PATH: &str = "/latest/dynamic/instance-identity/signature";

/// Why the metadata service could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImdsError {
    /// The base URL is not `http://host[:port]`.
    #[error(
        "'{0}' is not a metadata service URL: write http://HOST[:PORT], e.g. http://169.254.169.254"
    )]
    BadUrl(String),
    /// No connection could be made in time.
    #[error(
        "the metadata service at {address} could not be reached: {reason}; is the agent running on EC2 with the metadata service enabled?"
    )]
    Connect {
        /// The host and port tried.
        address: String,
        /// What failed.
        reason: String,
    },
    /// The request did not complete within [`TIMEOUT`].
    #[error("the metadata service did not answer {path} within 2 s")]
    Timeout {
        /// The path requested.
        path: &'static str,
    },
    /// Reading or writing the connection failed.
    #[error("the connection to the metadata service failed during {path}: {reason}")]
    Io {
        /// The path requested.
        path: &'static str,
        /// The system's words.
        reason: String,
    },
    /// The service answered with a status other than 200.
    #[error("the metadata service answered {path} with HTTP status {status}{hint}")]
    Status {
        /// The path requested.
        path: &'static str,
        /// The HTTP status code.
        status: u16,
        /// What the status usually means, with a leading separator, or nothing.
        hint: &'static str,
    },
    /// The answer was larger than [`MAX_RESPONSE`].
    #[error(
        "the metadata service's answer to {path} is over 72 KiB, more than a document or signature can be"
    )]
    TooLarge {
        /// The path requested.
        path: &'static str,
    },
    /// The answer was not an HTTP response this client reads.
    #[error("the metadata service's answer to {path} is not a plain HTTP/1.1 response: {reason}")]
    BadResponse {
        /// The path requested.
        path: &'static str,
        /// What was wrong.
        reason: &'static str,
    },
}

/// The document and signature, as the service served them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceIdentity {
    /// The instance identity document, verbatim.
    pub document: String,
    /// AWS's base64 signature of it.
    pub signature: String,
}

/// A client for one metadata service address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImdsClient {
    host: String,
    port: u16,
}

impl ImdsClient {
    /// A client for `base_url`, `http://host[:port]` (a trailing `/` is allowed).
    ///
    /// # Errors
    /// [`ImdsError::BadUrl`] for anything else.
    pub fn new(base_url: &str) -> Result<Self, ImdsError> {
        let bad = || ImdsError::BadUrl(base_url.escape_debug().to_string());
        let authority = base_url
            .strip_prefix("http://")
            .ok_or_else(bad)?
            .trim_end_matches('/');
        if authority.is_empty() || authority.contains(['/', '@', '?', '#']) {
            return Err(bad());
        }
        let (host, port) = match authority.rsplit_once(':') {
            // An IPv6 literal without a port: its colons are inside the brackets.
            Some((_, tail)) if tail.ends_with(']') => (authority, 80),
            Some((host, port)) => (host, port.parse::<u16>().map_err(|_| bad())?),
            None => (authority, 80),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty()
            || !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'))
        {
            return Err(bad());
        }
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }

    /// Fetches a session token, then the document and its signature with it.
    ///
    /// # Errors
    /// The [`ImdsError`] of the first request that fails.
    pub fn instance_identity(&self) -> Result<InstanceIdentity, ImdsError> {
        let token = self.request(
            "PUT",
            TOKEN_PATH,
            &[("X-aws-ec2-metadata-token-ttl-seconds", TOKEN_TTL_SECONDS)],
        )?;
        let token = token.trim();
        // The token goes back in a header: it must not be able to add lines to a request.
        if token.is_empty()
            || token.len() > MAX_TOKEN
            || !token.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(ImdsError::BadResponse {
                path: TOKEN_PATH,
                reason: "the session token is not one line of printable text",
            });
        }
        let header = [("X-aws-ec2-metadata-token", token)];
        let document = self.request("GET", DOCUMENT_PATH, &header)?;
        let signature = self.request("GET", SIGNATURE_PATH, &header)?;
        Ok(InstanceIdentity {
            document,
            signature,
        })
    }

    /// One request on a fresh connection; the body of a 200 answer, as text.
    fn request(
        &self,
        method: &str,
        path: &'static str,
        headers: &[(&str, &str)],
    ) -> Result<String, ImdsError> {
        let deadline = Instant::now() + TIMEOUT;
        let mut stream = self.connect()?;
        let io = |e: std::io::Error| {
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) {
                ImdsError::Timeout { path }
            } else {
                ImdsError::Io {
                    path,
                    reason: e.to_string(),
                }
            }
        };
        let host = if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        };
        let mut request =
            format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        if method == "PUT" {
            request.push_str("Content-Length: 0\r\n");
        }
        request.push_str("\r\n");
        stream.set_write_timeout(Some(TIMEOUT)).map_err(io)?;
        stream.write_all(request.as_bytes()).map_err(io)?;

        let mut buffer = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            if let Some(body) = complete_body(&buffer, path)? {
                return into_text(body, path);
            }
            let left = deadline
                .checked_duration_since(Instant::now())
                .filter(|d| !d.is_zero())
                .ok_or(ImdsError::Timeout { path })?;
            stream.set_read_timeout(Some(left)).map_err(io)?;
            let n = stream.read(&mut chunk).map_err(io)?;
            if n == 0 {
                // The server closed: what was read is the whole answer.
                return match complete_body(&buffer, path)? {
                    Some(body) => into_text(body, path),
                    None => finish_at_close(&buffer, path),
                };
            }
            buffer.extend_from_slice(&chunk[..n]);
            if buffer.len() > MAX_RESPONSE {
                return Err(ImdsError::TooLarge { path });
            }
        }
    }

    fn connect(&self) -> Result<TcpStream, ImdsError> {
        let address = format!("{}:{}", self.host, self.port);
        let failed = |reason: String| ImdsError::Connect {
            address: address.clone(),
            reason,
        };
        let addrs: Vec<SocketAddr> = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|e| failed(e.to_string()))?
            .collect();
        let mut last = "the host name has no address".to_owned();
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, TIMEOUT) {
                Ok(stream) => return Ok(stream),
                Err(e) => last = e.to_string(),
            }
        }
        Err(failed(last))
    }
}

/// The parsed head of an answer: its status and body length, and where the body starts.
struct Head {
    status: u16,
    content_length: Option<usize>,
    body_start: usize,
}

fn parse_head(buffer: &[u8], path: &'static str) -> Result<Option<Head>, ImdsError> {
    let bad = |reason| ImdsError::BadResponse { path, reason };
    let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&buffer[..end]).map_err(|_| bad("its headers are not text"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err(bad("its status line is malformed"));
    };
    if !version.starts_with("HTTP/1.") || code.len() != 3 {
        return Err(bad("its status line is malformed"));
    }
    let status = code
        .parse()
        .map_err(|_| bad("its status is not a number"))?;
    let mut content_length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(bad("a header line has no ':'"));
        };
        if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(bad("it uses a transfer encoding, which IMDS does not"));
        }
        if name.eq_ignore_ascii_case("content-length") {
            let length = value
                .trim()
                .parse::<usize>()
                .map_err(|_| bad("its Content-Length is not a number"))?;
            if content_length.is_some_and(|l| l != length) {
                return Err(bad("it has two different Content-Length headers"));
            }
            content_length = Some(length);
        }
    }
    Ok(Some(Head {
        status,
        content_length,
        body_start: end + 4,
    }))
}

/// The body once the answer is complete by its `Content-Length`; `None` while more is to come.
fn complete_body<'b>(buffer: &'b [u8], path: &'static str) -> Result<Option<&'b [u8]>, ImdsError> {
    let Some(head) = parse_head(buffer, path)? else {
        return Ok(None);
    };
    check_status(head.status, path)?;
    let Some(length) = head.content_length else {
        return Ok(None);
    };
    if length > MAX_RESPONSE {
        return Err(ImdsError::TooLarge { path });
    }
    Ok(buffer.get(head.body_start..head.body_start + length))
}

/// The body of an answer without a `Content-Length`, delimited by the connection's close.
fn finish_at_close(buffer: &[u8], path: &'static str) -> Result<String, ImdsError> {
    match parse_head(buffer, path)? {
        Some(head) if head.content_length.is_none() => into_text(&buffer[head.body_start..], path),
        Some(_) => Err(ImdsError::BadResponse {
            path,
            reason: "the connection closed before the whole body came",
        }),
        None => Err(ImdsError::BadResponse {
            path,
            reason: "the connection closed before the headers ended",
        }),
    }
}

fn check_status(status: u16, path: &'static str) -> Result<(), ImdsError> {
    let hint = match status {
        200 => return Ok(()),
        401 => "; the session token was refused",
        403 => "; the metadata service is disabled for this instance",
        404 => "; this is not an EC2 instance's metadata service",
        405 => "; the service does not speak IMDSv2",
        _ => "",
    };
    Err(ImdsError::Status { path, status, hint })
}

fn into_text(body: &[u8], path: &'static str) -> Result<String, ImdsError> {
    String::from_utf8(body.to_vec()).map_err(|_| ImdsError::BadResponse {
        path,
        reason: "its body is not UTF-8 text",
    })
}

#[cfg(test)]
mod tests;
