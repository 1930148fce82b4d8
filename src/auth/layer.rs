//! The tower layer that authenticates every call except health checks and
//! reflection: it verifies the bearer token and puts the `Caller` into the
//! request's extensions, or answers UNAUTHENTICATED itself. A layer rather
//! than a tonic interceptor because fetching signing keys is asynchronous.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};

use tonic::Status;
use tower::{Layer, Service};

use super::{AuthError, Verifier};
use crate::domain::Caller;
use crate::domain::events::Origin;

/// Paths served without a token: the mesh's health probes and reflection.
const OPEN_PREFIXES: [&str; 2] = ["/grpc.health.v1.Health/", "/grpc.reflection."];

static UNAUTHENTICATED: LazyLock<Arc<Caller>> =
    LazyLock::new(|| Arc::new(Caller::unauthenticated()));

/// `verifier` None: no authentication configured; every call runs as the
/// all-powerful local caller.
#[derive(Clone)]
pub struct AuthLayer {
    verifier: Option<Arc<Verifier>>,
}

impl AuthLayer {
    pub fn new(verifier: Option<Arc<Verifier>>) -> Self {
        Self { verifier }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            verifier: self.verifier.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    verifier: Option<Arc<Verifier>>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, RB> Service<http::Request<B>> for Auth<S>
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

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let path = req.uri().path();
        let open = OPEN_PREFIXES.iter().any(|p| path.starts_with(p));
        let Some(verifier) = self.verifier.clone().filter(|_| !open) else {
            if open {
                return Box::pin(self.inner.call(req));
            }
            req.extensions_mut().insert(UNAUTHENTICATED.clone());
            let origin = Origin::new(UNAUTHENTICATED.subject.clone());
            return Box::pin(Origin::scope(origin, self.inner.call(req)));
        };
        // The service that was polled ready serves this call; the clone
        // stays for the next one.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let token = bearer(req.headers());
        Box::pin(async move {
            let caller = match token {
                Ok(t) => verifier.verify(&t).await,
                Err(e) => Err(e),
            };
            match caller {
                Ok(caller) => {
                    tracing::Span::current().record("caller", caller.subject.as_str());
                    // The changes the call makes are recorded as the
                    // caller's (change events' `actor`).
                    let origin = Origin::new(caller.subject.clone());
                    req.extensions_mut().insert(caller);
                    Origin::scope(origin, inner.call(req)).await
                }
                Err(e) => {
                    tracing::debug!(error = %e, "call refused");
                    Ok(Status::from(e).into_http())
                }
            }
        })
    }
}

/// The token of an `authorization: Bearer <token>` header.
fn bearer(headers: &http::HeaderMap) -> Result<String, AuthError> {
    let Some(value) = headers.get(http::header::AUTHORIZATION) else {
        return Err(AuthError::Missing);
    };
    let value = value
        .to_str()
        .map_err(|_| AuthError::Invalid("the authorization header is not `Bearer <token>`"))?;
    match value.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(token.trim().to_owned())
        }
        _ => Err(AuthError::Invalid(
            "the authorization header is not `Bearer <token>`",
        )),
    }
}

/// The caller the layer attached to a request. Fails closed: a request that
/// did not pass the layer is unauthenticated.
pub fn caller_of<T>(request: &tonic::Request<T>) -> Result<Arc<Caller>, Status> {
    request
        .extensions()
        .get::<Arc<Caller>>()
        .cloned()
        .ok_or_else(|| Status::from(AuthError::Missing))
}
