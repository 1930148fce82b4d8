//! Who is calling: bearer tokens (JWT) verified by a tower layer in front of
//! the gRPC services. What a verified caller may do is decided by the handlers
//! with `domain::Caller`, from the request's parent or name.

pub mod jwks;
pub mod jwt;
pub mod layer;
pub mod mint;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub use jwt::Verifier;
pub use layer::AuthLayer;

/// Why a call was refused before any handler ran. The message never quotes
/// the token.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token: send `authorization: Bearer <JWT>`")]
    Missing,
    #[error("the token has expired")]
    Expired,
    /// Malformed, badly signed, not yet valid, or for another issuer or
    /// audience: the description says which, in general terms.
    #[error("the token is not valid: {0}")]
    Invalid(&'static str),
    /// The signing keys (a JWKS URL) could not be loaded yet.
    #[error("the signing keys are not available; retry later")]
    KeysUnavailable,
}

/// The authentication settings a server starts with.
#[derive(Clone, Debug, Default)]
pub struct AuthSettings {
    pub jwt_secret_file: Option<std::path::PathBuf>,
    pub jwks_file: Option<std::path::PathBuf>,
    pub jwks_url: Option<String>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway: Duration,
}

impl AuthSettings {
    /// Whether any key source is configured (otherwise the server runs
    /// without authentication).
    pub fn enabled(&self) -> bool {
        self.jwt_secret_file.is_some() || self.jwks_file.is_some() || self.jwks_url.is_some()
    }

    /// The verifier these settings describe, or None without a key source.
    pub async fn verifier(&self) -> Result<Option<Arc<Verifier>>, String> {
        if !self.enabled() {
            if self.issuer.is_some() || self.audience.is_some() {
                return Err("--auth-issuer and --auth-audience need a key source: \
                            --auth-jwt-secret-file, --auth-jwks-file or --auth-jwks-url"
                    .into());
            }
            return Ok(None);
        }
        Verifier::new(self).await.map(|v| Some(Arc::new(v)))
    }
}

/// Most bytes of an HS256 secret file (a secret is a few dozen bytes; this
/// only refuses to read something that is plainly not one).
const MAX_SECRET_FILE: u64 = 64 * 1024;

/// Reads a shared secret: the file's bytes without trailing whitespace, so
/// `echo secret > file` and `printf secret > file` hold the same secret.
pub fn read_secret_file(path: &Path) -> Result<Vec<u8>, String> {
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("cannot read the secret file {}: {e}", path.display()))?;
    if meta.len() > MAX_SECRET_FILE {
        return Err(format!(
            "the secret file {} is larger than {MAX_SECRET_FILE} bytes",
            path.display()
        ));
    }
    let mut bytes = std::fs::read(path)
        .map_err(|e| format!("cannot read the secret file {}: {e}", path.display()))?;
    while bytes.last().is_some_and(|b| b.is_ascii_whitespace()) {
        bytes.pop();
    }
    if bytes.is_empty() {
        return Err(format!("the secret file {} is empty", path.display()));
    }
    Ok(bytes)
}
