//! Callers: bearer tokens (HS256 secret, JWKS file and URL), projects and
//! scopes on every RPC, issuer/audience/clock checks, the token helper, the
//! audit trail, and the refusal to serve a network without authentication.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{Code, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use user_service::proto::users::v1 as pb;

use crate::both_engines;
use crate::harness::*;

fn ok<T>(r: Result<tonic::Response<T>, Status>) -> Result<(), Status> {
    r.map(|_| ())
}

/// Every UserService RPC once, on `project`, with what the server answered
/// (for streams: the call or, if it started, its first message).
pub async fn every_rpc(c: &mut Client, project: &str) -> Vec<(&'static str, Result<(), Status>)> {
    let parent = format!("projects/{project}");
    let name = format!("{parent}/users/someone");
    let mut out = Vec::new();
    out.push((
        "CreateUser",
        ok(c.create_user(pb::CreateUserRequest {
            parent: parent.clone(),
            user: Some(user("new@example.com")),
            ..Default::default()
        })
        .await),
    ));
    out.push((
        "GetUser",
        ok(c.get_user(pb::GetUserRequest { name: name.clone() }).await),
    ));
    out.push((
        "LookupUser",
        ok(c.lookup_user(pb::LookupUserRequest {
            parent: parent.clone(),
            identifier: Some(pb::lookup_user_request::Identifier::Email(
                "victim@example.com".into(),
            )),
        })
        .await),
    ));
    out.push((
        "UpdateUser",
        ok(c.update_user(pb::UpdateUserRequest {
            user: Some(pb::User {
                name: name.clone(),
                display_name: "Mallory".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await),
    ));
    out.push((
        "DeleteUser",
        ok(c.delete_user(pb::DeleteUserRequest {
            name: name.clone(),
            ..Default::default()
        })
        .await),
    ));
    out.push((
        "DeleteUser(force)",
        ok(c.delete_user(pb::DeleteUserRequest {
            name: name.clone(),
            force: true,
            ..Default::default()
        })
        .await),
    ));
    out.push((
        "UndeleteUser",
        ok(c.undelete_user(pb::UndeleteUserRequest {
            name: name.clone(),
            ..Default::default()
        })
        .await),
    ));
    out.push((
        "ActivateUser",
        ok(c.activate_user(pb::ActivateUserRequest {
            name: name.clone(),
            ..Default::default()
        })
        .await),
    ));
    out.push((
        "DisableUser",
        ok(c.disable_user(pb::DisableUserRequest {
            name: name.clone(),
            ..Default::default()
        })
        .await),
    ));
    out.push((
        "ListUsers",
        ok(c.list_users(pb::ListUsersRequest {
            parent: parent.clone(),
            filter: "tags:\"vip\"".into(),
            ..Default::default()
        })
        .await),
    ));
    out.push((
        "SearchUsers",
        ok(c.search_users(pb::SearchUsersRequest {
            parent: parent.clone(),
            query: "vic".into(),
            ..Default::default()
        })
        .await),
    ));
    out.push((
        "CountUsers",
        ok(c.count_users(pb::CountUsersRequest {
            parent: parent.clone(),
            ..Default::default()
        })
        .await),
    ));
    out.push((
        "BatchGetUsers",
        ok(c.batch_get_users(pb::BatchGetUsersRequest {
            parent: parent.clone(),
            names: vec![name.clone()],
        })
        .await),
    ));
    let stream = match c
        .stream_users(pb::StreamUsersRequest {
            parent: parent.clone(),
            ..Default::default()
        })
        .await
    {
        Ok(s) => s.into_inner().message().await.map(|_| ()),
        Err(e) => Err(e),
    };
    out.push(("StreamUsers", stream));
    out.push((
        "BatchCreateUsers",
        ok(c.batch_create_users(pb::BatchCreateUsersRequest {
            parent: parent.clone(),
            requests: vec![pb::CreateUserRequest {
                user: Some(user("batch@example.com")),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await),
    ));
    let import = c
        .import_users(tokio_stream::iter(vec![pb::ImportUsersRequest {
            parent: parent.clone(),
            users: vec![user("imported@example.com")],
        }]))
        .await;
    let import = match import {
        Ok(s) => s.into_inner().message().await.map(|_| ()),
        Err(e) => Err(e),
    };
    out.push(("ImportUsers", import));
    out
}

#[track_caller]
fn assert_all(outcomes: &[(&str, Result<(), Status>)], code: Code, want: &str) {
    for (rpc, r) in outcomes {
        let s = r
            .as_ref()
            .err()
            .unwrap_or_else(|| panic!("{rpc} succeeded; expected {code:?}/{want}"));
        assert_eq!(s.code(), code, "{rpc}: {s:?}");
        assert_eq!(reason(s), want, "{rpc}: {s:?}");
    }
}

/// Users of `project` seen by an all-powerful client, deleted ones included.
async fn snapshot(c: &mut Client, project: &str) -> Vec<pb::User> {
    c.list_users(pb::ListUsersRequest {
        parent: format!("projects/{project}"),
        page_size: 1000,
        show_deleted: true,
        ..Default::default()
    })
    .await
    .expect("list")
    .into_inner()
    .users
}

async fn every_rpc_needs_a_valid_token(e: Engine) {
    let keys = AuthKeys::new();
    let s = TestServer::start_authed(e, &keys).await;
    let other = AuthKeys::new();

    let mut none = s.client_with(None);
    assert_all(
        &every_rpc(&mut none, "acme").await,
        Code::Unauthenticated,
        "TOKEN_MISSING",
    );

    let garbage = "not.a.jwt";
    let outcomes = every_rpc(&mut s.client_with(Some(garbage)), "acme").await;
    assert_all(&outcomes, Code::Unauthenticated, "TOKEN_INVALID");

    let foreign = other.token(&["acme"], ALL_SCOPES);
    let outcomes = every_rpc(&mut s.client_with(Some(&foreign)), "acme").await;
    assert_all(&outcomes, Code::Unauthenticated, "TOKEN_INVALID");
    for (_, r) in &outcomes {
        let s = r.as_ref().unwrap_err();
        assert!(
            !s.message().contains(&foreign),
            "the token is echoed: {s:?}"
        );
        assert!(!format!("{:?}", s.metadata()).contains(&foreign));
    }

    let expired = sign_hs(
        &keys,
        json!({"sub": "svc", "exp": now() - 3600, "projects": ["acme"], "scope": ALL_SCOPES}),
    );
    let outcomes = every_rpc(&mut s.client_with(Some(&expired)), "acme").await;
    assert_all(&outcomes, Code::Unauthenticated, "TOKEN_EXPIRED");

    // A scheme other than Bearer.
    let mut basic = s.client_with(None);
    let mut req = tonic::Request::new(pb::GetUserRequest {
        name: "projects/acme/users/x".into(),
    });
    req.metadata_mut()
        .insert("authorization", "Basic YWRtaW46YWRtaW4=".parse().unwrap());
    assert_error(
        basic.get_user(req).await,
        Code::Unauthenticated,
        "TOKEN_INVALID",
    );

    // Probes and reflection stay open.
    let health = HealthClient::new(s.channel.clone())
        .check(HealthCheckRequest {
            service: "users.v1.UserService".into(),
        })
        .await
        .expect("health without a token");
    assert_eq!(health.into_inner().status, 1);
    {
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        let mut r = ServerReflectionClient::new(s.channel.clone());
        let mut stream = r
            .server_reflection_info(tokio_stream::iter(vec![ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            }]))
            .await
            .expect("reflection without a token")
            .into_inner();
        assert!(stream.message().await.expect("reflection answer").is_some());
    }

    // Nothing was written by any of the refused calls.
    let mut admin = s.client();
    assert!(snapshot(&mut admin, "acme").await.is_empty());
}

async fn every_rpc_is_confined_to_granted_projects(e: Engine) {
    let keys = AuthKeys::new();
    let s = TestServer::start_authed(e, &keys).await;
    let mut admin = s.client();
    let victim = create_in(
        &mut admin,
        "projects/globex",
        pb::User {
            email: "victim@example.com".into(),
            tags: vec!["vip".into()],
            ..Default::default()
        },
    )
    .await;
    // `someone` exists in globex too, so a refusal cannot tell existence.
    admin
        .create_user(pb::CreateUserRequest {
            parent: "projects/globex".into(),
            user_id: "someone".into(),
            user: Some(user("someone@example.com")),
            ..Default::default()
        })
        .await
        .unwrap();
    let before = snapshot(&mut admin, "globex").await;

    let acme_only = keys.token(&["acme", "initech"], ALL_SCOPES);
    let mut c = s.client_with(Some(&acme_only));
    assert_all(
        &every_rpc(&mut c, "globex").await,
        Code::PermissionDenied,
        "PROJECT_NOT_GRANTED",
    );
    // A project that does not exist anywhere is refused the same way.
    assert_all(
        &every_rpc(&mut c, "nowhere").await,
        Code::PermissionDenied,
        "PROJECT_NOT_GRANTED",
    );
    let denied = c
        .get_user(pb::GetUserRequest {
            name: victim.name.clone(),
        })
        .await
        .unwrap_err();
    let info = tonic_types::StatusExt::get_error_details(&denied);
    assert_eq!(info.error_info().unwrap().metadata["project"], "globex");

    // The token works where it is granted: nothing there is refused, and
    // what needs no existing user succeeds.
    let must_succeed = [
        "CreateUser",
        "ListUsers",
        "SearchUsers",
        "CountUsers",
        "StreamUsers",
        "BatchCreateUsers",
        "ImportUsers",
    ];
    for (rpc, r) in every_rpc(&mut c, "acme").await {
        if let Err(s) = r {
            assert!(!must_succeed.contains(&rpc), "{rpc}: {s:?}");
            assert_ne!(s.code(), Code::PermissionDenied, "{rpc}: {s:?}");
            assert_ne!(s.code(), Code::Unauthenticated, "{rpc}: {s:?}");
        }
    }
    assert_eq!(snapshot(&mut admin, "globex").await, before);

    // A wildcard grants every project.
    let all = keys.token(&["*"], "users.read");
    let got = s
        .client_with(Some(&all))
        .get_user(pb::GetUserRequest {
            name: victim.name.clone(),
        })
        .await
        .expect("wildcard token reads globex");
    assert_eq!(got.into_inner(), victim);
}

async fn each_rpc_needs_its_scope(e: Engine) {
    let keys = AuthKeys::new();
    let s = TestServer::start_authed(e, &keys).await;
    let reads = [
        "GetUser",
        "LookupUser",
        "ListUsers",
        "SearchUsers",
        "CountUsers",
        "BatchGetUsers",
        "StreamUsers",
    ];
    let writes = [
        "CreateUser",
        "UpdateUser",
        "DeleteUser",
        "UndeleteUser",
        "ActivateUser",
        "DisableUser",
        "BatchCreateUsers",
    ];
    let admin = ["DeleteUser(force)", "ImportUsers"];
    let needs = |rpc: &str| {
        if reads.contains(&rpc) {
            "users.read"
        } else if writes.contains(&rpc) {
            "users.write"
        } else {
            assert!(admin.contains(&rpc), "{rpc} is in no list");
            "users.admin"
        }
    };
    for scope in [
        "users.read",
        "users.write",
        "users.admin",
        "users.read users.write",
    ] {
        let token = keys.token(&["acme"], scope);
        for (rpc, r) in every_rpc(&mut s.client_with(Some(&token)), "acme").await {
            let need = needs(rpc);
            if scope.split(' ').any(|s| s == need) {
                if let Err(st) = r {
                    assert_ne!(st.code(), Code::PermissionDenied, "{scope}: {rpc}: {st:?}");
                }
            } else {
                let st = r.expect_err(rpc);
                assert_eq!(st.code(), Code::PermissionDenied, "{scope}: {rpc}: {st:?}");
                assert_eq!(reason(&st), "SCOPE_MISSING", "{scope}: {rpc}");
                let d = tonic_types::StatusExt::get_error_details(&st);
                assert_eq!(d.error_info().unwrap().metadata["scope"], need);
            }
        }
    }
    // A token with no projects and no scopes is valid and grants nothing.
    let empty = sign_hs(&keys, json!({"sub": "nobody", "exp": now() + 600}));
    assert_all(
        &every_rpc(&mut s.client_with(Some(&empty)), "acme").await,
        Code::PermissionDenied,
        "SCOPE_MISSING",
    );
}

both_engines!(
    every_rpc_needs_a_valid_token,
    every_rpc_is_confined_to_granted_projects,
    each_rpc_needs_its_scope,
);

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn sign(alg: Algorithm, key: &EncodingKey, kid: Option<&str>, claims: Value) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&h, &claims, key).expect("sign")
}

fn sign_hs(keys: &AuthKeys, claims: Value) -> String {
    let secret = std::fs::read_to_string(&keys.secret_file).unwrap();
    let key = EncodingKey::from_secret(secret.trim_end().as_bytes()).unwrap();
    sign(Algorithm::HS256, &key, None, claims)
}

fn good_claims() -> Value {
    json!({"sub": "svc", "exp": now() + 600, "projects": ["acme"], "scope": "users.read"})
}

/// GetUser of a user that does not exist: NOT_FOUND means the token passed.
async fn try_token(s: &TestServer, token: &str) -> Result<(), Status> {
    match s
        .client_with(Some(token))
        .get_user(pb::GetUserRequest {
            name: "projects/acme/users/nobody".into(),
        })
        .await
    {
        Err(st) if st.code() == Code::NotFound => Ok(()),
        Err(st) => Err(st),
        Ok(_) => panic!("a user that was never created was found"),
    }
}

#[track_caller]
fn refused(r: Result<(), Status>, want: &str) {
    let st = r.expect_err("the token was accepted");
    assert_eq!(st.code(), Code::Unauthenticated, "{st:?}");
    assert_eq!(reason(&st), want, "{st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuer_audience_and_clock_are_checked() {
    let keys = AuthKeys::new();
    let s = TestServer::start_authed_with(Engine::Sqlite, &keys, |s| {
        s.auth_issuer = Some("https://idp.example.com".into());
        s.auth_audience = Some("user-service".into());
        s.auth_leeway = Duration::from_secs(5);
    })
    .await;
    let with = |extra: Value| {
        let mut c = good_claims();
        c["iss"] = json!("https://idp.example.com");
        c["aud"] = json!("user-service");
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        sign_hs(&keys, c)
    };
    try_token(&s, &with(json!({}))).await.expect("good token");
    try_token(&s, &with(json!({"aud": ["other", "user-service"]})))
        .await
        .expect("one of several audiences");
    // Expired 2 s ago: inside the 5 s leeway.
    try_token(&s, &with(json!({"exp": now() - 2})))
        .await
        .expect("within leeway");
    // `exp` as a float, as some libraries write it.
    try_token(&s, &with(json!({"exp": (now() + 60) as f64 + 0.5})))
        .await
        .expect("float exp");
    refused(
        try_token(&s, &with(json!({"exp": now() - 60}))).await,
        "TOKEN_EXPIRED",
    );
    refused(
        try_token(&s, &with(json!({"exp": null}))).await,
        "TOKEN_INVALID",
    );
    refused(
        try_token(&s, &with(json!({"nbf": now() + 60}))).await,
        "TOKEN_INVALID",
    );
    refused(
        try_token(&s, &with(json!({"iss": null}))).await,
        "TOKEN_INVALID",
    );
    refused(
        try_token(&s, &with(json!({"iss": "https://evil.example.com"}))).await,
        "TOKEN_INVALID",
    );
    refused(
        try_token(&s, &with(json!({"aud": null}))).await,
        "TOKEN_INVALID",
    );
    refused(
        try_token(&s, &with(json!({"aud": "billing"}))).await,
        "TOKEN_INVALID",
    );
    refused(
        try_token(&s, &with(json!({"sub": null}))).await,
        "TOKEN_INVALID",
    );
    refused(
        try_token(&s, &with(json!({"sub": ""}))).await,
        "TOKEN_INVALID",
    );
    // The token helper's issuer/audience flags produce what the server wants.
    let minted = user_service::auth::mint::mint(&user_service::auth::mint::TokenRequest {
        secret_file: &keys.secret_file,
        projects: &["acme".to_owned()],
        scope: "users.read",
        ttl: Duration::from_secs(60),
        subject: "ops",
        issuer: Some("https://idp.example.com"),
        audience: Some("user-service"),
    })
    .unwrap();
    try_token(&s, &minted).await.expect("minted token");
    // An unsigned token.
    let unsigned = {
        use base64::Engine as _;
        let b = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let claims = with(json!({}));
        let payload = claims.split('.').nth(1).unwrap().to_owned();
        format!("{}.{payload}.", b.encode(br#"{"alg":"none","typ":"JWT"}"#))
    };
    refused(try_token(&s, &unsigned).await, "TOKEN_INVALID");
    // A token of 100 KiB is refused without being parsed.
    let huge = format!("{}.{}.x", "a".repeat(50_000), "b".repeat(50_000));
    let st = try_token(&s, &huge).await.unwrap_err();
    assert_ne!(st.code(), Code::Ok, "{st:?}");
    // The server may close the connection that carried the huge header; a
    // call racing with that close is cancelled, and the client's next call
    // reconnects. The server itself must still answer.
    let mut last = None;
    for _ in 0..5 {
        match try_token(&s, &with(json!({}))).await {
            Ok(()) => {
                last = None;
                break;
            }
            Err(st) if matches!(st.code(), Code::Cancelled | Code::Unavailable) => {
                last = Some(st);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(st) => panic!("the server still serves after a huge header: {st:?}"),
        }
    }
    assert!(
        last.is_none(),
        "the server still serves after a huge header: {last:?}"
    );
}

/// An RSA key for tests only (generated with openssl for this suite).
const RSA_TEST_KEY: &[u8] = include_bytes!("fixtures/rsa-test-key.pem");

struct Keys {
    rsa: EncodingKey,
    ec: EncodingKey,
    /// Another EC key the server does not know.
    rogue: EncodingKey,
}

impl Keys {
    fn new() -> Self {
        let ec = || {
            let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap()
        };
        Keys {
            rsa: EncodingKey::from_rsa_pem(RSA_TEST_KEY).unwrap(),
            ec: ec(),
            rogue: ec(),
        }
    }

    fn jwk(key: &EncodingKey, alg: Algorithm, kid: &str) -> Value {
        let mut j = jsonwebtoken::jwk::Jwk::from_encoding_key(key, alg).unwrap();
        j.common.key_id = Some(kid.into());
        serde_json::to_value(j).unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_file_verifies_rs256_and_es256_only_with_their_keys() {
    let k = Keys::new();
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    let doc = json!({"keys": [
        Keys::jwk(&k.rsa, Algorithm::RS256, "rsa-1"),
        Keys::jwk(&k.ec, Algorithm::ES256, "ec-1"),
        // Skipped: symmetric keys are never taken from a JWKS.
        {"kty": "oct", "k": "c2VjcmV0", "kid": "oct-1"},
    ]});
    std::fs::write(&jwks, doc.to_string()).unwrap();
    let path = jwks.clone();
    let s = TestServer::start_with(Engine::Sqlite, move |s| s.auth_jwks_file = Some(path)).await;

    try_token(
        &s,
        &sign(Algorithm::RS256, &k.rsa, Some("rsa-1"), good_claims()),
    )
    .await
    .expect("RS256");
    try_token(
        &s,
        &sign(Algorithm::ES256, &k.ec, Some("ec-1"), good_claims()),
    )
    .await
    .expect("ES256");
    try_token(
        &s,
        &sign(Algorithm::PS256, &k.rsa, Some("rsa-1"), good_claims()),
    )
    .await
    .expect_err("the JWK says RS256 only");
    refused(
        try_token(
            &s,
            &sign(Algorithm::ES256, &k.rogue, Some("ec-1"), good_claims()),
        )
        .await,
        "TOKEN_INVALID",
    );
    refused(
        try_token(
            &s,
            &sign(Algorithm::ES256, &k.ec, Some("unknown"), good_claims()),
        )
        .await,
        "TOKEN_INVALID",
    );
    // Two keys and no kid: ambiguous for RS256? No, only one RSA key.
    try_token(&s, &sign(Algorithm::RS256, &k.rsa, None, good_claims()))
        .await
        .expect("the only RSA key, without a kid");
    // Algorithm confusion: HS256 "signed" with the published key material,
    // and an HS256 token naming the oct key, are both refused.
    let public = Keys::jwk(&k.rsa, Algorithm::RS256, "rsa-1").to_string();
    let confused = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(public.as_bytes()).unwrap(),
        Some("rsa-1"),
        good_claims(),
    );
    refused(try_token(&s, &confused).await, "TOKEN_INVALID");
    let oct = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(b"secret").unwrap(),
        Some("oct-1"),
        good_claims(),
    );
    refused(try_token(&s, &oct).await, "TOKEN_INVALID");
}

/// A JWKS endpoint: serves whatever `doc` holds and counts requests.
struct JwksServer {
    url: String,
    doc: Arc<Mutex<(u16, String)>>,
    hits: Arc<Mutex<usize>>,
}

impl JwksServer {
    async fn start(doc: Value) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/.well-known/jwks.json",
            listener.local_addr().unwrap()
        );
        let doc = Arc::new(Mutex::new((200, doc.to_string())));
        let hits = Arc::new(Mutex::new(0));
        let (d, h) = (doc.clone(), hits.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let (d, h) = (d.clone(), h.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    *h.lock().unwrap() += 1;
                    let (code, body) = d.lock().unwrap().clone();
                    let resp = format!(
                        "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = sock.write_all(resp.as_bytes()).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        JwksServer { url, doc, hits }
    }

    fn set(&self, code: u16, doc: Value) {
        *self.doc.lock().unwrap() = (code, doc.to_string());
    }

    fn hits(&self) -> usize {
        *self.hits.lock().unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_url_is_refetched_for_a_new_kid_within_a_cooldown() {
    let k = Keys::new();
    let idp =
        JwksServer::start(json!({"keys": [Keys::jwk(&k.ec, Algorithm::ES256, "ec-1")]})).await;
    let url = idp.url.clone();
    let s = TestServer::start_with(Engine::Sqlite, move |s| s.auth_jwks_url = Some(url)).await;
    assert_eq!(idp.hits(), 1, "fetched once at start");
    for _ in 0..3 {
        try_token(
            &s,
            &sign(Algorithm::ES256, &k.ec, Some("ec-1"), good_claims()),
        )
        .await
        .expect("ES256 from the URL");
    }
    assert_eq!(idp.hits(), 1, "known kids are served from the cache");

    // The issuer rotates in an RSA key: the first token naming it makes the
    // server fetch again.
    idp.set(
        200,
        json!({"keys": [
            Keys::jwk(&k.ec, Algorithm::ES256, "ec-1"),
            Keys::jwk(&k.rsa, Algorithm::RS256, "rsa-2"),
        ]}),
    );
    try_token(
        &s,
        &sign(Algorithm::RS256, &k.rsa, Some("rsa-2"), good_claims()),
    )
    .await
    .expect("rotated-in key");
    assert_eq!(idp.hits(), 2);

    // Made-up kids do not make the server hammer the issuer: within the
    // cooldown, no further fetch.
    for i in 0..5 {
        let kid = format!("made-up-{i}");
        refused(
            try_token(
                &s,
                &sign(Algorithm::ES256, &k.rogue, Some(&kid), good_claims()),
            )
            .await,
            "TOKEN_INVALID",
        );
    }
    assert_eq!(
        idp.hits(),
        2,
        "unknown kids within the cooldown fetch nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_url_down_at_start_answers_unavailable() {
    let k = Keys::new();
    let idp = JwksServer::start(json!({})).await;
    idp.set(503, json!({"error": "down"}));
    let url = idp.url.clone();
    let s = TestServer::start_with(Engine::Sqlite, move |s| s.auth_jwks_url = Some(url)).await;
    let st = try_token(
        &s,
        &sign(Algorithm::ES256, &k.ec, Some("ec-1"), good_claims()),
    )
    .await
    .unwrap_err();
    assert_eq!(st.code(), Code::Unavailable, "{st:?}");
    assert_eq!(reason(&st), "SIGNING_KEYS_UNAVAILABLE");
}

/// The operator's token helper, as a process: its token is accepted by a
/// server with the same secret and grants exactly what was asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_helper_mints_what_the_server_accepts() {
    let keys = AuthKeys::new();
    let s = TestServer::start_authed(Engine::Sqlite, &keys).await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_user-service"))
        .args(["token", "--secret-file"])
        .arg(&keys.secret_file)
        .args(["--project", "acme", "--scope", "users.read", "--ttl", "10m"])
        .args(["--subject", "ops"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    try_token(&s, &token)
        .await
        .expect("minted token reads acme");
    let mut c = s.client_with(Some(&token));
    assert_error(
        c.get_user(pb::GetUserRequest {
            name: "projects/globex/users/x".into(),
        })
        .await,
        Code::PermissionDenied,
        "PROJECT_NOT_GRANTED",
    );
    assert_error(
        c.create_user(pb::CreateUserRequest {
            parent: "projects/acme".into(),
            user: Some(user("a@example.com")),
            ..Default::default()
        })
        .await,
        Code::PermissionDenied,
        "SCOPE_MISSING",
    );
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_user-service"))
        .args(["token", "--secret-file"])
        .arg(&keys.secret_file)
        .args(["--project", "acme", "--scope", "users.everything"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown scope"));
}
