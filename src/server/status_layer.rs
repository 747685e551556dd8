//! Turns tonic's "message too large" status into `InvalidArgument` on the node API.
//!
//! tonic refuses a message above the decoding limit from its 5-byte length prefix, before
//! reading the body, which is what we want; but it answers `OutOfRange`, while a malformed
//! request is `InvalidArgument` everywhere else in Mayfly. No handler of ours answers
//! `OutOfRange`, so every such status on this API is the size limit and is rewritten here.

use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tonic::codegen::http::{self, HeaderValue};
use tower::{Layer, Service};

const GRPC_STATUS: &str = "grpc-status";
const GRPC_MESSAGE: &str = "grpc-message";
const OUT_OF_RANGE: &str = "11";
const INVALID_ARGUMENT: &str = "3";

/// The layer.
#[derive(Debug, Clone, Copy, Default)]
pub struct InvalidArgumentForOversize;

impl<S> Layer<S> for InvalidArgumentForOversize {
    type Service = Rewrite<S>;
    fn layer(&self, inner: S) -> Rewrite<S> {
        Rewrite { inner }
    }
}

/// The service the layer wraps around the node API.
#[derive(Debug, Clone)]
pub struct Rewrite<S> {
    inner: S,
}

impl<S, Req, B> Service<Req> for Rewrite<S>
where
    S: Service<Req, Response = http::Response<B>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<B>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<http::Response<B>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let future = self.inner.call(request);
        Box::pin(async move {
            let mut response = future.await?;
            let headers = response.headers_mut();
            if headers.get(GRPC_STATUS).map(HeaderValue::as_bytes) == Some(OUT_OF_RANGE.as_bytes())
            {
                headers.insert(GRPC_STATUS, HeaderValue::from_static(INVALID_ARGUMENT));
                headers.insert(
                    GRPC_MESSAGE,
                    HeaderValue::from_static(
                        "the%20request%20is%20larger%20than%20the%20node%20API%20accepts%20(64%20KiB)%3B%20send%20a%20smaller%20message",
                    ),
                );
            }
            Ok(response)
        })
    }
}
