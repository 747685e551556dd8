//! The proxy's HTTP mode: HTTP/1.1 and HTTP/2 from verified mTLS peers, each request decided
//! by the route table, allowed ones forwarded to the upstream with headers naming the peer.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};

use super::PeerInfo;
use super::routes::{Decision, Routes};

/// The headers the proxy sets; copies arriving from the client are removed first, so the
/// upstream can trust them.
pub const PEER_HEADERS: [&str; 3] = ["x-mayfly-spiffe-id", "x-mayfly-scopes", "x-mayfly-serial"];

/// Headers that describe one hop and must not be forwarded (RFC 9110 §7.6.1). Names, not
/// strings: removing by a string parses and hashes it first, on every request.
static HOP_BY_HOP: [HeaderName; 7] = [
    http::header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    http::header::TE,
    http::header::TRAILER,
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
];

type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// How much of a refused request's body is read before the refusal is sent.
const REFUSED_BODY_LIMIT: usize = 64 * 1024;
/// How long a refused request's body is read before the refusal is sent.
const REFUSED_BODY_TIME: std::time::Duration = std::time::Duration::from_secs(1);

/// Routes, the upstream, and a pooled HTTP/1.1 client to it.
pub struct HttpProxy {
    routes: Routes,
    upstream: SocketAddr,
    /// `upstream` as a URI authority, parsed once (`None` only if it could not be, which a
    /// socket address cannot cause; the URI is then formatted per request).
    authority: Option<http::uri::Authority>,
    client: Client<HttpConnector, Incoming>,
}

/// The headers naming one connection's verified peer, built once for all its requests.
struct PeerHeaders {
    values: Vec<(HeaderName, HeaderValue)>,
    /// The scopes, comma-separated, for the access log.
    scopes: String,
}

impl PeerHeaders {
    fn new(peer: &PeerInfo) -> Self {
        let scopes = peer.scopes_header();
        let serial = peer.serial.to_hex();
        let values = PEER_HEADERS
            .into_iter()
            .zip([peer.id.base().as_str(), &scopes, &serial])
            .filter_map(|(name, value)| {
                let value = HeaderValue::from_str(value).ok()?;
                Some((HeaderName::from_static(name), value))
            })
            .collect();
        Self { values, scopes }
    }
}

impl HttpProxy {
    /// A proxy to `upstream` deciding with `routes`.
    pub fn new(routes: Routes, upstream: SocketAddr) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Self {
            routes,
            upstream,
            authority: http::uri::Authority::try_from(upstream.to_string()).ok(),
            client,
        }
    }

    /// Serves one verified connection until the client closes it.
    pub async fn serve_connection<S>(self: Arc<Self>, peer: Arc<PeerInfo>, io: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let headers = Arc::new(PeerHeaders::new(&peer));
        let service = hyper::service::service_fn(move |request| {
            let proxy = self.clone();
            let peer = peer.clone();
            let headers = headers.clone();
            async move { Ok::<_, Infallible>(proxy.handle_with(&peer, &headers, request).await) }
        });
        let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        if let Err(e) = builder.serve_connection(TokioIo::new(io), service).await {
            tracing::debug!(error = %crate::wire::error_chain(&*e), "HTTP connection ended with an error");
        }
    }

    /// Decides and, if allowed, forwards one request.
    async fn handle_with(
        &self,
        peer: &PeerInfo,
        headers: &PeerHeaders,
        request: Request<Incoming>,
    ) -> Response<ProxyBody> {
        let method = request.method().clone();
        let path = request.uri().path().to_owned();
        let (response, decision) = match self.routes.decide(&peer.id, &method, &path) {
            Decision::BadPath(e) => (
                refuse(StatusCode::BAD_REQUEST, &e.to_string(), request).await,
                "bad-path",
            ),
            Decision::Deny(reason) => (
                refuse(StatusCode::FORBIDDEN, &reason, request).await,
                "deny",
            ),
            Decision::Allow { .. } => match self.forward(headers, request).await {
                Ok(response) => (response, "allow"),
                Err(e) => {
                    tracing::warn!(error = %crate::wire::error_chain(&e), upstream = %self.upstream, "the upstream failed");
                    (
                        plain(
                            StatusCode::BAD_GATEWAY,
                            &format!("the upstream at {} did not answer", self.upstream),
                        ),
                        "allow",
                    )
                }
            },
        };
        tracing::info!(
            target: "mayfly::access",
            peer = %peer.id.base(),
            scopes = %headers.scopes,
            serial = %peer.serial,
            method = %method,
            path = %path,
            decision,
            status = response.status().as_u16(),
        );
        response
    }

    async fn forward(
        &self,
        headers: &PeerHeaders,
        request: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, hyper_util::client::legacy::Error> {
        let (mut parts, body) = request.into_parts();
        // The URI is rebuilt from the validated path, so an absolute-form or HTTP/2 authority
        // cannot steer the request elsewhere.
        parts.uri = self.upstream_uri(parts.uri.path_and_query());
        parts.version = http::Version::HTTP_11;
        strip_and_set(&mut parts.headers, headers);
        let upstream = self
            .client
            .request(Request::from_parts(parts, body))
            .await?;
        let (mut parts, body) = upstream.into_parts();
        for name in &HOP_BY_HOP {
            parts.headers.remove(name);
        }
        Ok(Response::from_parts(parts, body.boxed()))
    }

    /// `http://<upstream><path_and_query>`, from parts (no formatting and parsing again).
    fn upstream_uri(&self, path_and_query: Option<&http::uri::PathAndQuery>) -> http::Uri {
        let path_and_query = path_and_query
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        let Some(authority) = &self.authority else {
            return format!("http://{}{}", self.upstream, path_and_query)
                .parse()
                .unwrap_or_else(|_| http::Uri::from_static("/"));
        };
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(http::uri::Scheme::HTTP);
        parts.authority = Some(authority.clone());
        parts.path_and_query = Some(path_and_query);
        http::Uri::from_parts(parts).unwrap_or_else(|_| http::Uri::from_static("/"))
    }
}

/// Removes hop-by-hop headers and any client-sent peer headers, then names the verified peer.
fn strip_and_set(headers: &mut http::HeaderMap, peer: &PeerHeaders) {
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    let forged: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("x-mayfly-"))
        .cloned()
        .collect();
    for name in forged {
        headers.remove(name);
    }
    for (name, value) in &peer.values {
        headers.insert(name.clone(), value.clone());
    }
}

/// A one-line refusal. What the client is still sending of its request body is read first (at
/// most [`REFUSED_BODY_LIMIT`] bytes for [`REFUSED_BODY_TIME`]; nothing when it waits for
/// `100-continue`), so that it gets the answer to a complete request: clients still uploading
/// when the stream closes report an error instead of the reason (curl 7.88 over HTTP/2 does).
/// Whatever remains unread is held until the answer has been sent, so that HTTP/2 resets the
/// stream with NO_ERROR after the response (RFC 9113 §8.1) rather than with CANCEL before it,
/// which would cut the response short.
async fn refuse(
    status: StatusCode,
    reason: &str,
    request: Request<Incoming>,
) -> Response<ProxyBody> {
    let waits_for_continue = request
        .headers()
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let mut unread = request.into_body();
    if !waits_for_continue {
        let drain = async {
            let mut read = 0;
            while read <= REFUSED_BODY_LIMIT {
                match unread.frame().await {
                    Some(Ok(frame)) => read += frame.data_ref().map_or(0, Bytes::len),
                    _ => break,
                }
            }
        };
        let _ = tokio::time::timeout(REFUSED_BODY_TIME, drain).await;
    }
    plain(status, reason).map(|body| {
        body.map_frame(move |frame| {
            let _held = &unread;
            frame
        })
        .boxed()
    })
}

/// A one-line plain-text answer.
fn plain(status: StatusCode, reason: &str) -> Response<ProxyBody> {
    let mut response = Response::new(
        Full::new(Bytes::from(format!("{reason}\n")))
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::{ScopedId, SpiffeId};

    #[test]
    fn client_sent_peer_headers_are_replaced_by_the_verified_ones() {
        let id = SpiffeId::parse("spiffe://t.test/bot/scope/a.read/b.write").unwrap();
        let peer = PeerInfo {
            id: ScopedId::from_spiffe_id(&id).unwrap(),
            serial: crate::svid::Serial::from_hex("0a").unwrap(),
            not_after: 0,
        };
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "x-mayfly-spiffe-id",
            HeaderValue::from_static("spiffe://t.test/admin"),
        );
        headers.insert("x-mayfly-scopes", HeaderValue::from_static("admin:all"));
        headers.insert("X-Mayfly-Other", HeaderValue::from_static("x"));
        headers.insert("connection", HeaderValue::from_static("close"));
        headers.insert("accept", HeaderValue::from_static("*/*"));
        strip_and_set(&mut headers, &PeerHeaders::new(&peer));
        assert_eq!(headers["x-mayfly-spiffe-id"], "spiffe://t.test/bot");
        assert_eq!(headers["x-mayfly-scopes"], "a:read,b:write");
        assert_eq!(headers["x-mayfly-serial"], "0a");
        assert!(!headers.contains_key("x-mayfly-other"));
        assert!(!headers.contains_key("connection"));
        assert_eq!(headers["accept"], "*/*");
    }
}
