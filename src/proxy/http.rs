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

/// Headers that describe one hop and must not be forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
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
    client: Client<HttpConnector, Incoming>,
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
            client,
        }
    }

    /// Serves one verified connection until the client closes it.
    pub async fn serve_connection<S>(self: Arc<Self>, peer: Arc<PeerInfo>, io: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let service = hyper::service::service_fn(move |request| {
            let proxy = self.clone();
            let peer = peer.clone();
            async move { Ok::<_, Infallible>(proxy.handle(&peer, request).await) }
        });
        let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        if let Err(e) = builder.serve_connection(TokioIo::new(io), service).await {
            tracing::debug!(error = %e, "HTTP connection ended with an error");
        }
    }

    /// Decides and, if allowed, forwards one request.
    pub async fn handle(&self, peer: &PeerInfo, request: Request<Incoming>) -> Response<ProxyBody> {
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
            Decision::Allow { .. } => match self.forward(peer, request).await {
                Ok(response) => (response, "allow"),
                Err(e) => {
                    tracing::warn!(error = %e, upstream = %self.upstream, "the upstream failed");
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
            scopes = %peer.scopes_header(),
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
        peer: &PeerInfo,
        request: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, hyper_util::client::legacy::Error> {
        let (mut parts, body) = request.into_parts();
        let path_and_query = parts
            .uri
            .path_and_query()
            .map_or("/", http::uri::PathAndQuery::as_str)
            .to_owned();
        // The URI is rebuilt from the validated path, so an absolute-form or HTTP/2 authority
        // cannot steer the request elsewhere.
        parts.uri = format!("http://{}{}", self.upstream, path_and_query)
            .parse()
            .unwrap_or_else(|_| http::Uri::from_static("/"));
        parts.version = http::Version::HTTP_11;
        strip_and_set_headers(&mut parts.headers, peer);
        let upstream = self
            .client
            .request(Request::from_parts(parts, body))
            .await?;
        let (mut parts, body) = upstream.into_parts();
        for name in HOP_BY_HOP {
            parts.headers.remove(name);
        }
        Ok(Response::from_parts(parts, body.boxed()))
    }
}

/// Removes hop-by-hop headers and any client-sent peer headers, then names the verified peer.
pub fn strip_and_set_headers(headers: &mut http::HeaderMap, peer: &PeerInfo) {
    for name in HOP_BY_HOP {
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
    let values = [
        peer.id.base().as_str().to_owned(),
        peer.scopes_header(),
        peer.serial.clone(),
    ];
    for (name, value) in PEER_HEADERS.into_iter().zip(values) {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(HeaderName::from_static(name), value);
        }
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
            serial: "0a".into(),
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
        strip_and_set_headers(&mut headers, &peer);
        assert_eq!(headers["x-mayfly-spiffe-id"], "spiffe://t.test/bot");
        assert_eq!(headers["x-mayfly-scopes"], "a:read,b:write");
        assert_eq!(headers["x-mayfly-serial"], "0a");
        assert!(!headers.contains_key("x-mayfly-other"));
        assert!(!headers.contains_key("connection"));
        assert_eq!(headers["accept"], "*/*");
    }
}
