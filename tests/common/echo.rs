//! An HTTP/1.1 upstream for the proxy's tests, shared with `#[path = "common/echo.rs"] mod
//! echo;`: it answers what reached it, so a test sees what the proxy passed on.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// An HTTP/1.1 upstream answering `METHOD PATH`, then each `x-mayfly-*` header it got and
/// `authorization: passed on` if that header reached it, sorted, one per line.
pub async fn echo_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(|req: http::Request<Incoming>| async move {
                        let mut lines: Vec<String> = req
                            .headers()
                            .iter()
                            .filter(|(n, _)| n.as_str().starts_with("x-mayfly-"))
                            .map(|(n, v)| format!("{n}: {}", v.to_str().unwrap_or("?")))
                            .collect();
                        if req.headers().contains_key(http::header::AUTHORIZATION) {
                            lines.push("authorization: passed on".into());
                        }
                        lines.sort();
                        let body = format!(
                            "{} {}\n{}\n",
                            req.method(),
                            req.uri().path(),
                            lines.join("\n")
                        );
                        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(body))))
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    addr
}
