//! `user-service token`: signs an HS256 token with the shared secret, for
//! operators and scripts (grpcurl -H "authorization: Bearer $TOKEN").

use std::path::Path;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

use super::read_secret_file;
use crate::domain::{ProjectId, Scope};

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    iat: u64,
    nbf: u64,
    exp: u64,
    /// `"*"` or a list of project ids.
    projects: serde_json::Value,
    scope: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
}

/// What the token grants and to whom.
pub struct TokenRequest<'a> {
    pub secret_file: &'a Path,
    pub projects: &'a [String],
    pub scope: &'a str,
    pub ttl: Duration,
    pub subject: &'a str,
    pub issuer: Option<&'a str>,
    pub audience: Option<&'a str>,
}

/// A signed token, or why the request cannot be served.
pub fn mint(r: &TokenRequest<'_>) -> Result<String, String> {
    if r.projects.is_empty() {
        return Err("name at least one --project (or --project '*' for every project)".into());
    }
    let all = r.projects.iter().any(|p| p == "*");
    for p in r.projects.iter().filter(|p| *p != "*") {
        ProjectId::parse(p).map_err(|e| format!("--project {p:?}: {e}"))?;
    }
    let mut scopes = Vec::new();
    for s in r.scope.split_whitespace() {
        let scope = Scope::parse(s).ok_or_else(|| {
            format!("--scope: unknown scope {s:?} (users.read, users.write, users.admin)")
        })?;
        scopes.push(scope.as_str());
    }
    if scopes.is_empty() {
        return Err("--scope names no scope (users.read, users.write, users.admin)".into());
    }
    if r.subject.is_empty() {
        return Err("--subject must not be empty".into());
    }
    if r.ttl.is_zero() {
        return Err("--ttl must be positive".into());
    }
    let secret = read_secret_file(r.secret_file)?;
    let now = jsonwebtoken::get_current_timestamp();
    let claims = Claims {
        sub: r.subject,
        iat: now,
        nbf: now,
        exp: now.saturating_add(r.ttl.as_secs().max(1)),
        projects: if all {
            serde_json::Value::from("*")
        } else {
            serde_json::Value::from(r.projects.to_vec())
        },
        scope: scopes.join(" "),
        iss: r.issuer,
        aud: r.audience,
    };
    let key = EncodingKey::from_secret(&secret).map_err(|e| format!("bad secret: {e}"))?;
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key)
        .map_err(|e| format!("cannot sign the token: {e}"))
}
