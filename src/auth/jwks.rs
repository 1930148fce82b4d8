//! Public keys for RS*/PS*/ES* tokens, from a JWKS file or URL. A URL is
//! fetched at start, again every `REFRESH_EVERY`, and at once when a token
//! names an unknown `kid` (at most once per `UNKNOWN_KID_COOLDOWN`, so a
//! stream of tokens with made-up kids cannot make the server hammer the
//! identity provider).

use std::collections::HashMap;
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};
use tracing::{info, warn};

use super::AuthError;

/// How often a JWKS URL is fetched again while all goes well.
pub const REFRESH_EVERY: Duration = Duration::from_secs(600);
/// After a failed fetch, how soon the background task tries again.
const RETRY_AFTER: Duration = Duration::from_secs(30);
/// Least time between two fetches caused by unknown kids.
pub const UNKNOWN_KID_COOLDOWN: Duration = Duration::from_secs(30);
/// Longest a fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Most bytes a JWKS document may have.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// One usable public key and the algorithms it verifies.
pub struct PublicKey {
    pub key: DecodingKey,
    pub algorithms: Vec<Algorithm>,
}

/// Keys by `kid` (a key without one is stored under a name no token can
/// carry).
pub type KeyMap = HashMap<String, Arc<PublicKey>>;

/// Parses a JWKS document. Keys this service cannot use (symmetric keys,
/// unknown types or curves, keys marked for encryption) are skipped and
/// named in the second value.
pub fn parse_jwks(bytes: &[u8]) -> Result<(KeyMap, Vec<String>), String> {
    #[derive(serde::Deserialize)]
    struct Doc {
        keys: Vec<serde_json::Value>,
    }
    let doc: Doc = serde_json::from_slice(bytes)
        .map_err(|e| format!("not a JWKS document ({{\"keys\": [...]}}): {e}"))?;
    let mut keys = KeyMap::new();
    let mut skipped = Vec::new();
    for (i, raw) in doc.keys.into_iter().enumerate() {
        let jwk: Jwk = match serde_json::from_value(raw) {
            Ok(j) => j,
            Err(e) => {
                skipped.push(format!("keys[{i}]: {e}"));
                continue;
            }
        };
        // A key without a kid is found by its algorithm alone; it gets a
        // name no token can ask for.
        let kid = jwk
            .common
            .key_id
            .clone()
            .unwrap_or_else(|| format!("\0{i}"));
        match usable(&jwk) {
            Ok(k) => {
                keys.insert(kid, Arc::new(k));
            }
            Err(why) => skipped.push(format!("keys[{i}] (kid {kid:?}): {why}")),
        }
    }
    Ok((keys, skipped))
}

fn usable(jwk: &Jwk) -> Result<PublicKey, String> {
    use jsonwebtoken::jwk::PublicKeyUse;
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return Err("meant for encryption (use = enc)".into());
    }
    // The algorithms are fixed by the key's type, never taken from the
    // token alone: an RSA key can never verify an HS256 token.
    let family: Vec<Algorithm> = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => vec![
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ],
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => vec![Algorithm::ES256],
            EllipticCurve::P384 => vec![Algorithm::ES384],
            _ => return Err("unsupported curve".into()),
        },
        AlgorithmParameters::OctetKeyPair(_) => vec![Algorithm::EdDSA],
        AlgorithmParameters::OctetKey(_) => {
            return Err("symmetric keys are not taken from a JWKS".into());
        }
        _ => return Err("unsupported key type".into()),
    };
    let algorithms = match jwk.common.key_algorithm {
        None => family,
        Some(declared) => {
            let alg = key_algorithm(declared).ok_or("unsupported alg")?;
            if !family.contains(&alg) {
                return Err("alg does not fit the key type".into());
            }
            vec![alg]
        }
    };
    let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("unusable key: {e}"))?;
    Ok(PublicKey { key, algorithms })
}

fn key_algorithm(a: KeyAlgorithm) -> Option<Algorithm> {
    Some(match a {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

/// The key a token names: by kid, or the only key for its algorithm when the
/// token has no kid.
pub fn pick(keys: &KeyMap, kid: Option<&str>, alg: Algorithm) -> Option<Arc<PublicKey>> {
    match kid {
        Some(kid) => keys.get(kid).cloned(),
        None => {
            let mut fitting = keys.values().filter(|k| k.algorithms.contains(&alg));
            match (fitting.next(), fitting.next()) {
                (Some(one), None) => Some(one.clone()),
                _ => None,
            }
        }
    }
}

/// A JWKS URL and the keys last fetched from it.
pub struct RemoteJwks {
    url: String,
    client: reqwest::Client,
    keys: RwLock<Option<Arc<KeyMap>>>,
    /// When an unknown kid last caused a fetch; also serialises such fetches.
    last_on_demand: Arc<tokio::sync::Mutex<Option<Instant>>>,
}

impl RemoteJwks {
    /// Fetches the keys once (a failure is logged, not fatal: the identity
    /// provider may come up after this service) and keeps them fresh in the
    /// background for as long as the returned value lives.
    pub async fn start(url: String) -> Result<Arc<Self>, String> {
        let client = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .redirect(reqwest::redirect::Policy::limited(3))
            .build()
            .map_err(|e| format!("cannot build the JWKS client: {e}"))?;
        let remote = Arc::new(Self {
            url,
            client,
            keys: RwLock::new(None),
            last_on_demand: Arc::new(tokio::sync::Mutex::new(None)),
        });
        let first = remote.refresh().await;
        if let Err(e) = &first {
            warn!(url = %remote.url, error = %e, "cannot fetch the JWKS yet; calls are refused with UNAVAILABLE until it loads");
        }
        tokio::spawn(keep_fresh(Arc::downgrade(&remote), first.is_ok()));
        Ok(remote)
    }

    fn current(&self) -> Option<Arc<KeyMap>> {
        self.keys
            .read()
            .map(|k| k.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Fetches the document and replaces the keys.
    pub async fn refresh(&self) -> Result<(), String> {
        let bytes = self.fetch().await?;
        let (keys, skipped) = parse_jwks(&bytes)?;
        for s in &skipped {
            warn!(url = %self.url, "JWKS key skipped: {s}");
        }
        if keys.is_empty() {
            // A broken document does not take away keys that worked.
            return Err("the JWKS holds no usable key; keeping the keys we have".into());
        }
        info!(url = %self.url, keys = keys.len(), "JWKS loaded");
        let keys = Some(Arc::new(keys));
        match self.keys.write() {
            Ok(mut k) => *k = keys,
            Err(p) => *p.into_inner() = keys,
        }
        Ok(())
    }

    async fn fetch(&self) -> Result<Vec<u8>, String> {
        let mut resp = self
            .client
            .get(&self.url)
            .send()
            .await
            .map_err(|e| format!("fetch failed: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("the JWKS URL answered {}", resp.status()));
        }
        if resp
            .content_length()
            .is_some_and(|n| n > MAX_JWKS_BYTES as u64)
        {
            return Err(format!("the JWKS is larger than {MAX_JWKS_BYTES} bytes"));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| format!("reading the JWKS failed: {e}"))?
        {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(format!("the JWKS is larger than {MAX_JWKS_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    /// The key for a token; an unknown kid refreshes the keys first, at most
    /// once per cooldown.
    pub async fn key(
        self: &Arc<Self>,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<Arc<PublicKey>, AuthError> {
        if let Some(keys) = self.current()
            && let Some(k) = pick(&keys, kid, alg)
        {
            return Ok(k);
        }
        let mut last = self.last_on_demand.clone().lock_owned().await;
        // Another call may have refreshed while this one waited.
        if let Some(keys) = self.current()
            && let Some(k) = pick(&keys, kid, alg)
        {
            return Ok(k);
        }
        if last.is_none_or(|t| t.elapsed() >= UNKNOWN_KID_COOLDOWN) {
            *last = Some(Instant::now());
            // In a task of its own that holds the lock until it is done: a
            // caller that gives up aborts nothing, and the callers waiting
            // behind it see the refreshed keys.
            let me = self.clone();
            let refresh = tokio::spawn(async move {
                let r = me.refresh().await;
                drop(last);
                r
            });
            match refresh.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    warn!(url = %self.url, error = %e, "JWKS refresh for an unknown key id failed")
                }
                Err(e) => warn!(url = %self.url, error = %e, "JWKS refresh task failed"),
            }
        } else {
            drop(last);
        }
        match self.current() {
            None => Err(AuthError::KeysUnavailable),
            Some(keys) => pick(&keys, kid, alg).ok_or(AuthError::Invalid(
                "no signing key of the issuer matches its kid and alg",
            )),
        }
    }
}

async fn keep_fresh(remote: Weak<RemoteJwks>, mut ok: bool) {
    loop {
        tokio::time::sleep(if ok { REFRESH_EVERY } else { RETRY_AFTER }).await;
        let Some(r) = remote.upgrade() else { return };
        ok = match r.refresh().await {
            Ok(()) => true,
            Err(e) => {
                warn!(url = %r.url, error = %e, "JWKS refresh failed; keeping the keys we have");
                false
            }
        };
    }
}
