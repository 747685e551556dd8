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
use super::bearer::{Bearer, ConnectionTokens, Refusal};
use super::routes::{Decision, Routes};
use crate::id::ScopedId;

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
    /// With `--accept jwt`: how a client without a certificate authenticates.
    bearer: Option<Bearer>,
}

/// Who made a request, as the routes, the upstream and the access log see it: a verified
/// client certificate (one per connection) or a validated bearer token (per request, remembered
/// per connection). Its headers are built once: `x-mayfly-spiffe-id`, `x-mayfly-scopes`, and
/// `x-mayfly-serial` for a certificate or `x-mayfly-jti` for a token. Every `x-mayfly-*`
/// header arriving from the client is removed first, so the upstream can trust them.
pub(crate) struct Principal {
    /// Identity and scopes.
    pub(crate) id: ScopedId,
    values: Vec<(HeaderName, HeaderValue)>,
    /// The scopes, comma-separated, for the access log.
    scopes: String,
    /// The certificate's serial (hex), for the access log; `-` for a token.
    serial: String,
    /// The token's `jti`; `None` for a certificate or a token without one.
    jti: Option<String>,
}

impl Principal {
    /// A certificate's peer: `x-mayfly-spiffe-id`, `x-mayfly-scopes`, `x-mayfly-serial`.
    pub(crate) fn from_peer(peer: &PeerInfo) -> Self {
        let serial = peer.serial.to_hex();
        Self::new(
            peer.id.clone(),
            Some(("x-mayfly-serial", serial.clone())),
            serial,
            None,
        )
    }

    /// A token's subject: `x-mayfly-spiffe-id`, `x-mayfly-scopes`, and `x-mayfly-jti` in place
    /// of the serial (a token has no serial; the `jti` is what names it in the agent's and the
    /// server's logs).
    pub(crate) fn from_token(token: &crate::jwt::Validated) -> Self {
        // A token without a `jti` gets no `x-mayfly-jti` rather than an empty one.
        let jti = token.jti.clone().map(|jti| ("x-mayfly-jti", jti));
        Self::new(
            token.subject.clone(),
            jti,
            "-".to_owned(),
            token.jti.clone(),
        )
    }

    fn new(
        id: ScopedId,
        credential: Option<(&'static str, String)>,
        serial: String,
        jti: Option<String>,
    ) -> Self {
        let scopes = id
            .scopes()
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(",");
        let values = [
            ("x-mayfly-spiffe-id", id.base().as_str()),
            ("x-mayfly-scopes", scopes.as_str()),
        ]
        .into_iter()
        .chain(
            credential
                .as_ref()
                .map(|(name, value)| (*name, value.as_str())),
        )
        .filter_map(|(name, value)| {
            let value = HeaderValue::from_str(value).ok()?;
            Some((HeaderName::from_static(name), value))
        })
        .collect();
        Self {
            id,
            values,
            scopes,
            serial,
            jti,
        }
    }

    /// The token's `jti`, if it is a token with one.
    pub(crate) fn jti(&self) -> Option<&str> {
        self.jti.as_deref()
    }
}

impl HttpProxy {
    /// A proxy to `upstream` deciding with `routes`; with `bearer`, a connection without a
    /// client certificate authenticates each request with a bearer token.
    pub(crate) fn new(routes: Routes, upstream: SocketAddr, bearer: Option<Bearer>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Self {
            routes,
            upstream,
            authority: http::uri::Authority::try_from(upstream.to_string()).ok(),
            client,
            bearer,
        }
    }

    /// Serves one connection until the client closes it: `peer` is its verified client
    /// certificate, `None` when it presented none (each request then needs a bearer token).
    pub(crate) async fn serve_connection<S>(self: Arc<Self>, peer: Option<PeerInfo>, io: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let principal = peer.map(|p| Arc::new(Principal::from_peer(&p)));
        let tokens = Arc::new(ConnectionTokens::default());
        let service = hyper::service::service_fn(move |request| {
            let proxy = self.clone();
            let principal = principal.clone();
            let tokens = tokens.clone();
            async move { Ok::<_, Infallible>(proxy.handle_with(principal, &tokens, request).await) }
        });
        let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        if let Err(e) = builder.serve_connection(TokioIo::new(io), service).await {
            tracing::debug!(error = %crate::wire::error_chain(&*e), "HTTP connection ended with an error");
        }
    }

    /// Authenticates (by the connection's certificate, else the request's token), decides and,
    /// if allowed, forwards one request.
    async fn handle_with(
        &self,
        principal: Option<Arc<Principal>>,
        tokens: &ConnectionTokens,
        request: Request<Incoming>,
    ) -> Response<ProxyBody> {
        let principal = match (principal, &self.bearer) {
            (Some(principal), _) => principal,
            (None, Some(bearer)) => {
                match bearer.authenticate(request.headers(), tokens, now_secs()) {
                    Ok(principal) => principal,
                    Err(refusal) => return refuse_token(refusal, request).await,
                }
            }
            (None, None) => {
                return refuse(
                    StatusCode::UNAUTHORIZED,
                    "the connection presented no client certificate",
                    request,
                )
                .await;
            }
        };
        let method = request.method().clone();
        let path = request.uri().path().to_owned();
        let (response, decision) = match self.routes.decide(&principal.id, &method, &path) {
            Decision::BadPath(e) => (
                refuse(StatusCode::BAD_REQUEST, &e.to_string(), request).await,
                "bad-path",
            ),
            Decision::Deny(reason) => (
                refuse(StatusCode::FORBIDDEN, &reason, request).await,
                "deny",
            ),
            Decision::Allow { .. } => match self.forward(&principal, request).await {
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
            peer = %principal.id.base(),
            scopes = %principal.scopes,
            serial = %principal.serial,
            jti = %principal.jti().map_or_else(|| "-".into(), |j| crate::text::escape_bounded(j, 80)),
            method = %method,
            path = %path,
            decision,
            status = response.status().as_u16(),
        );
        response
    }

    async fn forward(
        &self,
        principal: &Principal,
        request: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, hyper_util::client::legacy::Error> {
        let (mut parts, body) = request.into_parts();
        // The URI is rebuilt from the validated path, so an absolute-form or HTTP/2 authority
        // cannot steer the request elsewhere.
        parts.uri = self.upstream_uri(parts.uri.path_and_query());
        parts.version = http::Version::HTTP_11;
        strip_and_set(&mut parts.headers, principal);
        // A bearer token is the client's credential for this proxy, not for the upstream: were
        // it passed on, the upstream (or anyone it logs to) could replay it here.
        if self.bearer.is_some() {
            parts.headers.remove(http::header::AUTHORIZATION);
        }
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
fn strip_and_set(headers: &mut http::HeaderMap, peer: &Principal) {
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

/// The 401, 403 or 503 of a refused token, with the access log line.
async fn refuse_token(refusal: Refusal, request: Request<Incoming>) -> Response<ProxyBody> {
    let method = request.method().clone();
    let path = crate::text::escape_bounded(request.uri().path(), 200).into_owned();
    let (status, reason, challenge) = match refusal {
        Refusal::Unauthorized { reason, missing } => {
            let challenge = super::bearer::challenge(&reason, missing);
            (StatusCode::UNAUTHORIZED, reason, Some(challenge))
        }
        Refusal::Forbidden(reason) => (StatusCode::FORBIDDEN, reason, None),
        Refusal::Unavailable(reason) => (StatusCode::SERVICE_UNAVAILABLE, reason, None),
    };
    tracing::info!(
        target: "mayfly::access",
        peer = "-",
        method = %method,
        path = %path,
        decision = "deny",
        reason = %reason,
        status = status.as_u16(),
    );
    let mut response = refuse(status, &reason, request).await;
    if let Some(challenge) = challenge {
        response
            .headers_mut()
            .insert(http::header::WWW_AUTHENTICATE, challenge);
    }
    response
}

/// Now, in Unix seconds (0 for a clock set before 1970).
fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
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
        strip_and_set(&mut headers, &Principal::from_peer(&peer));
        assert_eq!(headers["x-mayfly-spiffe-id"], "spiffe://t.test/bot");
        assert_eq!(headers["x-mayfly-scopes"], "a:read,b:write");
        assert_eq!(headers["x-mayfly-serial"], "0a");
        assert!(!headers.contains_key("x-mayfly-other"));
        assert!(!headers.contains_key("connection"));
        assert_eq!(headers["accept"], "*/*");
    }
}
