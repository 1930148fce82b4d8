//! One span per RPC with the method, the project (recorded by the handler),
//! the status code its client received and the latency, logged and counted
//! in the metrics when the response's last frame (its trailers) is sent.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use pin_project_lite::pin_project;
use tower::{Layer, Service};
use tracing::{Level, Span, field::Empty};

use crate::metrics::RpcLabels;

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
    type Response = http::Response<RpcBody<RB>>;
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
            tracing::debug_span!("rpc", method = %method, caller = Empty, project = Empty, code = Empty, latency_ms = Empty, otel.name = %method, otel.kind = "server", otel.status_code = Empty)
        } else {
            tracing::info_span!("rpc", method = %method, caller = Empty, project = Empty, code = Empty, latency_ms = Empty, otel.name = %method, otel.kind = "server", otel.status_code = Empty)
        };
        crate::telemetry::continue_trace(&span, req.headers());
        let labels = RpcLabels::of_path(&method);
        crate::metrics::rpc_started(&labels);
        let start = Instant::now();
        let inner = {
            let _entered = span.enter();
            self.inner.call(req)
        };
        RpcTraceFuture {
            inner,
            end: Some(RpcEnd {
                span,
                start,
                quiet,
                labels,
            }),
        }
    }
}

/// What is reported when an RPC ends: once, with the code its client got.
struct RpcEnd {
    span: Span,
    start: Instant,
    quiet: bool,
    labels: RpcLabels,
}

impl RpcEnd {
    fn finish(self, code: tonic::Code) {
        let latency = self.start.elapsed();
        let latency_ms = latency.as_secs_f64() * 1000.0;
        crate::metrics::rpc_finished(&self.labels, code, latency);
        if code != tonic::Code::Ok {
            self.span.record("otel.status_code", "ERROR");
        }
        let code = format!("{code:?}");
        self.span.record("code", code.as_str());
        self.span.record("latency_ms", latency_ms);
        let _entered = self.span.enter();
        if self.quiet {
            tracing::event!(Level::DEBUG, code, latency_ms, "rpc finished");
        } else {
            tracing::event!(Level::INFO, code, latency_ms, "rpc finished");
        }
    }
}

pin_project! {
    pub struct RpcTraceFuture<F> {
        #[pin]
        inner: F,
        end: Option<RpcEnd>,
    }

    impl<F> PinnedDrop for RpcTraceFuture<F> {
        // Dropped before it answered: the client went away.
        fn drop(this: Pin<&mut Self>) {
            if let Some(end) = this.project().end.take() {
                end.finish(tonic::Code::Cancelled);
            }
        }
    }
}

impl<F, RB, E> Future for RpcTraceFuture<F>
where
    F: Future<Output = Result<http::Response<RB>, E>>,
{
    type Output = Result<http::Response<RpcBody<RB>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = {
            let _entered = this.end.as_ref().map(|e| e.span.enter());
            std::task::ready!(this.inner.poll(cx))
        };
        let Some(end) = this.end.take() else {
            return Poll::Ready(out.map(|r| r.map(RpcBody::done)));
        };
        Poll::Ready(match out {
            Ok(mut resp) => {
                restate_decode_error(resp.headers_mut());
                // A trailers-only response (every failed unary call) has its
                // code in the headers; the others in the trailers.
                let early = code_in(resp.headers());
                Ok(resp.map(|inner| RpcBody {
                    inner,
                    end: Some(end),
                    early,
                }))
            }
            Err(e) => {
                end.finish(tonic::Code::Internal);
                Err(e)
            }
        })
    }
}

pin_project! {
    /// The response body, watched to its end: the status its client gets is
    /// in the trailers (or, trailers-only, in the headers), and a stream can
    /// fail after its first messages.
    pub struct RpcBody<B> {
        #[pin]
        inner: B,
        end: Option<RpcEnd>,
        early: Option<tonic::Code>,
    }

    impl<B> PinnedDrop for RpcBody<B> {
        // Dropped before its end: the client reset the stream (or the server
        // stopped), unless the code was already in the headers.
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(end) = this.end.take() {
                end.finish(this.early.unwrap_or(tonic::Code::Cancelled));
            }
        }
    }
}

impl<B> RpcBody<B> {
    fn done(inner: B) -> Self {
        RpcBody {
            inner,
            end: None,
            early: None,
        }
    }
}

impl<B: http_body::Body> http_body::Body for RpcBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = std::task::ready!(this.inner.poll_frame(cx));
        let code = match &frame {
            Some(Ok(f)) => f
                .trailers_ref()
                .map(|t| code_in(t).unwrap_or(tonic::Code::Unknown)),
            // The stream broke: the client sees a reset, not a status.
            Some(Err(_)) => Some(tonic::Code::Internal),
            // Ended without trailers: the code was in the headers, if at all.
            None => Some(this.early.unwrap_or(tonic::Code::Unknown)),
        };
        if let Some(code) = code
            && let Some(end) = this.end.take()
        {
            end.finish(code);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The grpc-status of a header or trailer map, if it has one.
fn code_in(headers: &http::HeaderMap) -> Option<tonic::Code> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(tonic::Code::from_i32)
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
