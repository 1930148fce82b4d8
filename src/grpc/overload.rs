//! Load shedding: at most `max_in_flight` UserService calls run at once; a
//! few more wait in a bounded queue for a bounded time; the rest are
//! refused at once with RESOURCE_EXHAUSTED (reason OVERLOADED, RetryInfo),
//! so that under any load the calls the server accepts keep their latency
//! and the queue never grows with what clients send. Health and reflection
//! are never shed (a mesh must see the server alive while it sheds).
//!
//! Streaming calls (StreamUsers, ImportUsers) hold a slot only until their
//! response starts; their work is bounded elsewhere (exports share the
//! heavy-read limit, imports commit one chunk at a time). The layer runs
//! after authentication, so an unauthenticated flood never takes a slot.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::Semaphore;
use tower::{Layer, Service};

/// How many calls may run and wait.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_in_flight: usize,
    pub max_queued: usize,
    pub max_wait: Duration,
    /// Longest a call may take (queue included); then DEADLINE_EXCEEDED.
    pub request_timeout: Duration,
}

struct Shared {
    slots: Semaphore,
    queued: AtomicUsize,
    limits: Limits,
}

#[derive(Clone)]
pub struct LoadShedLayer {
    shared: Arc<Shared>,
}

impl LoadShedLayer {
    pub fn new(limits: Limits) -> Self {
        Self {
            shared: Arc::new(Shared {
                slots: Semaphore::new(limits.max_in_flight.max(1)),
                queued: AtomicUsize::new(0),
                limits,
            }),
        }
    }
}

impl<S> Layer<S> for LoadShedLayer {
    type Service = LoadShed<S>;

    fn layer(&self, inner: S) -> Self::Service {
        LoadShed {
            inner,
            shared: self.shared.clone(),
        }
    }
}

#[derive(Clone)]
pub struct LoadShed<S> {
    inner: S,
    shared: Arc<Shared>,
}

/// How long a refused client should wait before it retries (also the
/// RetryInfo delay of the status).
const PUSHBACK_MS: &str = "100";

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Holds a place in the queue; gives it back however the wait ends.
struct Queued<'a>(&'a AtomicUsize);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<S, B, RB> Service<http::Request<B>> for LoadShed<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    RB: Default + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if !req.uri().path().starts_with("/users.v1.") {
            return Box::pin(self.inner.call(req));
        }
        let shared = self.shared.clone();
        // A free slot: no queueing, no allocation beyond the box. The slot
        // travels with the future (given back even if it is never polled).
        if let Ok(permit) = self.shared.slots.try_acquire() {
            permit.forget();
            let timeout = shared.limits.request_timeout;
            let slot = Slot(shared);
            let call = self.inner.call(req);
            return Box::pin(async move {
                let _slot = slot;
                within(timeout, timeout, call).await
            });
        }
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        // The wait is bounded by the call's own deadline as well.
        let wait = grpc_timeout(req.headers())
            .map_or(shared.limits.max_wait, |t| t.min(shared.limits.max_wait));
        Box::pin(async move {
            let arrived = tokio::time::Instant::now();
            let acquired = {
                // A place in the queue, if there is one left.
                let max = shared.limits.max_queued;
                let placed = shared
                    .queued
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |q| {
                        (q < max).then_some(q + 1)
                    })
                    .is_ok();
                if placed {
                    let _place = Queued(&shared.queued);
                    tokio::time::timeout(wait, shared.slots.acquire())
                        .await
                        .ok()
                        .and_then(Result::ok)
                } else {
                    None
                }
            };
            let Some(permit) = acquired else {
                crate::metrics::call_shed();
                let mut refused = super::status::overloaded().into_http::<RB>();
                // gRPC clients with a retry policy wait this long before
                // trying again (gRFC A6), instead of retrying at once.
                refused.headers_mut().insert(
                    "grpc-retry-pushback-ms",
                    http::HeaderValue::from_static(PUSHBACK_MS),
                );
                return Ok(refused);
            };
            permit.forget();
            let _slot = Slot(shared.clone());
            let left = shared
                .limits
                .request_timeout
                .saturating_sub(arrived.elapsed());
            within(left, shared.limits.request_timeout, inner.call(req)).await
        })
    }
}

/// The call's answer, or DEADLINE_EXCEEDED once `left` (of `limit`) has passed (the
/// call is dropped: its SQLite statement is interrupted). This is
/// --request-timeout; a client's own `grpc-timeout` is enforced by tonic
/// (and reported by the client itself).
async fn within<F, RB, E>(left: Duration, limit: Duration, call: F) -> Result<http::Response<RB>, E>
where
    F: Future<Output = Result<http::Response<RB>, E>>,
    RB: Default,
{
    match tokio::time::timeout(left, call).await {
        Ok(answer) => answer,
        Err(_) => Ok(super::status::request_timeout(limit).into_http()),
    }
}

/// A running call's slot, given back when the call's answer is ready (or
/// the call is dropped).
struct Slot(Arc<Shared>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.slots.add_permits(1);
    }
}

/// The `grpc-timeout` header: digits and a unit (H, M, S, m, u, n).
fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units() {
        let h = |v: &str| {
            let mut m = http::HeaderMap::new();
            m.insert("grpc-timeout", v.parse().unwrap());
            grpc_timeout(&m)
        };
        assert_eq!(h("100m"), Some(Duration::from_millis(100)));
        assert_eq!(h("2S"), Some(Duration::from_secs(2)));
        assert_eq!(h("5u"), Some(Duration::from_micros(5)));
        assert_eq!(h("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(h("m"), None);
        assert_eq!(h("12x"), None);
        assert_eq!(h("1234567890S"), None);
    }
}
