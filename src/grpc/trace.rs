//! One span per RPC with the method, the project (recorded by the handler),
//! the status code and the latency.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use pin_project_lite::pin_project;
use tower::{Layer, Service};
use tracing::{Level, Span, field::Empty};

#[derive(Clone, Copy, Debug, Default)]
pub struct RpcTraceLayer;

impl<S> Layer<S> for RpcTraceLayer {
    type Service = RpcTrace<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcTrace { inner }
    }
}

#[derive(Clone, Debug)]
pub struct RpcTrace<S> {
    inner: S,
}

impl<S, B, RB> Service<http::Request<B>> for RpcTrace<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = RpcTraceFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = req.uri().path().to_owned();
        // Probes and reflection are frequent and boring: debug level.
        let quiet = method.starts_with("/grpc.");
        let span = if quiet {
            tracing::debug_span!("rpc", method = %method, caller = Empty, project = Empty, code = Empty, latency_ms = Empty)
        } else {
            tracing::info_span!("rpc", method = %method, caller = Empty, project = Empty, code = Empty, latency_ms = Empty)
        };
        let inner = {
            let _entered = span.enter();
            self.inner.call(req)
        };
        RpcTraceFuture {
            inner,
            span,
            start: Instant::now(),
            quiet,
        }
    }
}

pin_project! {
    pub struct RpcTraceFuture<F> {
        #[pin]
        inner: F,
        span: Span,
        start: Instant,
        quiet: bool,
    }
}

impl<F, RB, E> Future for RpcTraceFuture<F>
where
    F: Future<Output = Result<http::Response<RB>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let _entered = this.span.enter();
        let mut out = std::task::ready!(this.inner.poll(cx));
        if let Ok(resp) = &mut out {
            restate_decode_error(resp.headers_mut());
        }
        let latency_ms = this.start.elapsed().as_secs_f64() * 1000.0;
        // A failed unary call is a trailers-only response: the code is in the
        // headers. Success codes travel in the trailers, after the body.
        let code = match &out {
            Ok(resp) => resp
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<i32>().ok())
                .map(tonic::Code::from_i32)
                .unwrap_or(tonic::Code::Ok),
            Err(_) => tonic::Code::Internal,
        };
        let code = format!("{code:?}");
        this.span.record("code", code.as_str());
        this.span.record("latency_ms", latency_ms);
        if *this.quiet {
            tracing::event!(Level::DEBUG, code, latency_ms, "rpc finished");
        } else {
            tracing::event!(Level::INFO, code, latency_ms, "rpc finished");
        }
        Poll::Ready(out)
    }
}

/// A call refused by tonic before its handler ran (a request over the size
/// limit, a bad frame) answers with tonic's bare status; restate it with
/// the code and details this service uses.
fn restate_decode_error(headers: &mut http::HeaderMap) {
    if !headers.contains_key("grpc-status") || headers.contains_key("grpc-status-details-bin") {
        return;
    }
    let Some(status) = tonic::Status::from_header_map(headers) else {
        return;
    };
    if let Some(restated) = super::status::decode_error(&status) {
        headers.remove("grpc-status");
        headers.remove("grpc-message");
        let _ = restated.add_header(headers);
    }
}

/// Records the project of the current RPC on its span.
pub fn record_project(project: &str) {
    Span::current().record("project", project);
}
