//! Verifies a bearer JWT and turns its claims into a `Caller`.
//!
//! HS256/384/512 tokens are checked with the shared secret, RS*/PS*/ES*/EdDSA
//! tokens with the public keys of a JWKS file or URL; which algorithms a key
//! verifies follows from the key, never from the token alone. `exp` is
//! required, `nbf` is checked when present, both with the configured leeway;
//! `iss` and `aud` are required and checked when configured; `sub` is
//! required. Verified tokens are remembered (by their SHA-256) for a few
//! minutes so that a client reusing its token pays for the signature once.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::jwks::{self, KeyMap, PublicKey, RemoteJwks};
use super::{AuthError, AuthSettings, read_secret_file};
use crate::domain::{Caller, Projects, Scope};

/// Longest token accepted; a real one is well under 2 KiB.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Most projects one token may list.
const MAX_PROJECTS: usize = 1000;
/// Verified tokens remembered at most; when full, expired entries go, then
/// all.
const CACHE_ENTRIES: usize = 4096;
/// Longest a verified token is trusted without checking its signature again.
const CACHE_SECONDS: u64 = 300;

const HMAC: [Algorithm; 3] = [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];

pub struct Verifier {
    secret: Option<Arc<PublicKey>>,
    file_keys: Option<KeyMap>,
    remote: Option<Arc<RemoteJwks>>,
    base: Validation,
    cache: Mutex<HashMap<[u8; 32], Cached>>,
}

#[derive(Clone)]
struct Cached {
    caller: Arc<Caller>,
    /// `exp` plus leeway, and the end of the cache period, whichever is first.
    valid_until: u64,
    expires: u64,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn items(&self) -> Vec<&str> {
        match self {
            OneOrMany::One(s) => s.split_whitespace().collect(),
            OneOrMany::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    /// Seconds; some libraries write it as a float.
    exp: Option<f64>,
    projects: Option<OneOrMany>,
    scope: Option<OneOrMany>,
}

impl Verifier {
    pub async fn new(s: &AuthSettings) -> Result<Self, String> {
        let secret = match &s.jwt_secret_file {
            Some(path) => {
                let bytes = read_secret_file(path)?;
                if bytes.len() < 32 {
                    tracing::warn!(
                        "the HS256 secret is {} bytes; use at least 32 random bytes",
                        bytes.len()
                    );
                }
                Some(Arc::new(PublicKey {
                    key: DecodingKey::from_secret(&bytes)
                        .map_err(|e| format!("bad secret: {e}"))?,
                    algorithms: HMAC.to_vec(),
                }))
            }
            None => None,
        };
        let file_keys = match &s.jwks_file {
            Some(path) => {
                let bytes = std::fs::read(path)
                    .map_err(|e| format!("cannot read the JWKS file {}: {e}", path.display()))?;
                let (keys, skipped) = jwks::parse_jwks(&bytes)
                    .map_err(|e| format!("the JWKS file {}: {e}", path.display()))?;
                for sk in skipped {
                    tracing::warn!(file = %path.display(), "JWKS key skipped: {sk}");
                }
                if keys.is_empty() {
                    return Err(format!(
                        "the JWKS file {} holds no usable key",
                        path.display()
                    ));
                }
                Some(keys)
            }
            None => None,
        };
        let remote = match &s.jwks_url {
            Some(url) => Some(RemoteJwks::start(url.clone()).await?),
            None => None,
        };
        let mut base = Validation::new(Algorithm::HS256);
        base.leeway = s.leeway.as_secs();
        base.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        match &s.issuer {
            Some(iss) => {
                base.set_issuer(&[iss]);
                required.push("iss");
            }
            None => base.iss = None,
        }
        match &s.audience {
            Some(aud) => {
                base.set_audience(&[aud]);
                required.push("aud");
            }
            // Without a configured audience the claim is not checked.
            None => base.validate_aud = false,
        }
        base.set_required_spec_claims(&required);
        Ok(Self {
            secret,
            file_keys,
            remote,
            base,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// The caller a bearer token stands for.
    pub async fn verify(&self, token: &str) -> Result<Arc<Caller>, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Invalid("longer than 8 KiB"));
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = jsonwebtoken::get_current_timestamp();
        if let Some(hit) = self.cached(&digest, now) {
            return hit;
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| AuthError::Invalid("not a well-formed JWT"))?;
        let key = self.key_for(header.kid.as_deref(), header.alg).await?;
        let mut validation = self.base.clone();
        validation.algorithms = key.algorithms.clone();
        let claims = if HMAC.contains(&header.alg) {
            // A microsecond or two: inline.
            jsonwebtoken::decode::<Claims>(token, &key.key, &validation)
        } else {
            // RSA and ECDSA take a fraction of a millisecond each: off the
            // async workers, so a flood of bad signatures delays no call.
            let token = token.to_owned();
            tokio::task::spawn_blocking(move || {
                jsonwebtoken::decode::<Claims>(&token, &key.key, &validation)
            })
            .await
            .map_err(|_| AuthError::Invalid("the signature could not be checked"))?
        }
        .map_err(|e| map_error(e.kind()))?
        .claims;
        let subject = claims
            .sub
            .filter(|s| !s.is_empty())
            .ok_or(AuthError::Invalid("the sub claim is missing or empty"))?;
        let projects = match &claims.projects {
            None => Projects::Only(BTreeSet::new()),
            Some(p) => {
                let items = p.items();
                if items.len() > MAX_PROJECTS {
                    return Err(AuthError::Invalid(
                        "it grants more than 1000 projects; use \"*\"",
                    ));
                }
                if items.contains(&"*") {
                    Projects::All
                } else {
                    Projects::Only(items.into_iter().map(str::to_owned).collect())
                }
            }
        };
        let scopes: Vec<Scope> = claims
            .scope
            .as_ref()
            .map(|s| s.items().into_iter().filter_map(Scope::parse).collect())
            .unwrap_or_default();
        let caller = Arc::new(Caller::new(subject, projects, scopes));
        let expires = (claims.exp.unwrap_or(0.0).max(0.0) as u64).saturating_add(self.base.leeway);
        self.remember(digest, caller.clone(), now, expires);
        Ok(caller)
    }

    async fn key_for(
        &self,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<Arc<PublicKey>, AuthError> {
        if HMAC.contains(&alg) {
            return self
                .secret
                .clone()
                .ok_or(AuthError::Invalid("HS* tokens are not accepted here"));
        }
        if let Some(keys) = &self.file_keys
            && let Some(k) = jwks::pick(keys, kid, alg)
        {
            return Ok(k);
        }
        match &self.remote {
            Some(remote) => remote.key(kid, alg).await,
            None if self.file_keys.is_some() => Err(AuthError::Invalid(
                "no signing key of the issuer matches its kid and alg",
            )),
            None => Err(AuthError::Invalid("only HS256 tokens are accepted here")),
        }
    }

    fn cached(&self, digest: &[u8; 32], now: u64) -> Option<Result<Arc<Caller>, AuthError>> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let hit = cache.get(digest)?;
        if now > hit.expires {
            return Some(Err(AuthError::Expired));
        }
        (now <= hit.valid_until).then(|| Ok(hit.caller.clone()))
    }

    fn remember(&self, digest: [u8; 32], caller: Arc<Caller>, now: u64, expires: u64) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHE_ENTRIES {
            cache.retain(|_, c| c.valid_until >= now);
            if cache.len() >= CACHE_ENTRIES {
                cache.clear();
            }
        }
        cache.insert(
            digest,
            Cached {
                caller,
                valid_until: expires.min(now + CACHE_SECONDS),
                expires,
            },
        );
    }
}

fn map_error(kind: &ErrorKind) -> AuthError {
    match kind {
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::Invalid("not valid yet (nbf)"),
        ErrorKind::InvalidIssuer => {
            AuthError::Invalid("issued by an issuer this service does not accept")
        }
        ErrorKind::InvalidAudience => AuthError::Invalid("meant for another audience"),
        ErrorKind::MissingRequiredClaim(c) => match c.as_str() {
            "exp" => AuthError::Invalid("the exp claim is missing"),
            "sub" => AuthError::Invalid("the sub claim is missing or empty"),
            "iss" => AuthError::Invalid("the iss claim is missing"),
            "aud" => AuthError::Invalid("the aud claim is missing"),
            _ => AuthError::Invalid("a required claim is missing"),
        },
        ErrorKind::InvalidSignature => AuthError::Invalid("the signature does not verify"),
        ErrorKind::InvalidAlgorithm => AuthError::Invalid("its algorithm does not fit the key"),
        ErrorKind::InvalidClaimFormat(_) | ErrorKind::Json(_) => {
            AuthError::Invalid("its claims are malformed")
        }
        _ => AuthError::Invalid("not a well-formed JWT"),
    }
}
