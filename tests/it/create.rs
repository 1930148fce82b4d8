use std::collections::BTreeMap;

use prost_types::{Struct, Value, value::Kind};
use tonic::Code;
use user_service::proto::google::r#type::Date;
use user_service::proto::users::v1 as pb;

use crate::both_engines;
use crate::harness::*;

async fn create_normalises_and_returns_the_stored_user(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let u = create(
        &mut c,
        User {
            email: "Ann.Lee@Example.COM".into(),
            phone_number: "+1 (212) 555-0100".into(),
            username: "Ann.Lee".into(),
            preferred_locale: "en-us".into(),
            display_name: "Ann Lee".into(),
            tags: vec!["vip".into(), "beta".into(), "vip".into()],
            roles: vec!["admin".into(), "admin".into()],
            secondary_emails: vec!["a@X.org".into(), "A@x.ORG".into()],
            birthday: Some(Date {
                year: 1990,
                month: 2,
                day: 28,
            }),
            addresses: vec![pb::Address {
                label: "Home".into(),
                lines: vec!["Storgata 1".into()],
                locality: "Oslo".into(),
                postal_code: "0155".into(),
                country_code: "no".into(),
                kind: pb::address::Kind::Home as i32,
                ..Default::default()
            }],
            metadata: BTreeMap::from([("plan".into(), "pro".into())]),
            custom_data: Some(Struct {
                fields: BTreeMap::from([(
                    "score".into(),
                    Value {
                        kind: Some(Kind::NumberValue(4.5)),
                    },
                )]),
            }),
            last_login_time: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 123_456_789,
            }),
            // Output-only fields sent by the client are ignored.
            state: pb::user::State::Deleted as i32,
            etag: "bogus".into(),
            ..Default::default()
        },
    )
    .await;

    let id = u.name.strip_prefix("projects/acme/users/").expect("name");
    let uuid = uuid::Uuid::parse_str(id).expect("generated id is a UUID");
    assert_eq!(uuid.get_version_num(), 7);
    assert_eq!(id, uuid.hyphenated().to_string());
    assert_eq!(u.email, "Ann.Lee@example.com");
    assert_eq!(u.phone_number, "+12125550100");
    assert_eq!(u.username, "ann.lee");
    assert_eq!(u.preferred_locale, "en-US");
    assert_eq!(u.tags, vec!["vip", "beta"]);
    assert_eq!(u.roles, vec!["admin"]);
    assert_eq!(u.secondary_emails, vec!["a@x.org"]);
    assert_eq!(u.addresses[0].country_code, "NO");
    assert_eq!(u.state, pb::user::State::Active as i32);
    assert!(u.create_time.is_some() && u.update_time == u.create_time);
    assert!(u.delete_time.is_none() && u.purge_time.is_none());
    assert!(!u.etag.is_empty() && u.etag != "bogus");

    // What Get returns is what Create returned.
    let got = get(&mut c, &u.name).await.expect("get");
    assert_eq!(got, u);
}

async fn create_needs_email_or_phone(e: Engine) {
    let s = TestServer::start(e).await;
    let r = s
        .client()
        .create_user(pb::CreateUserRequest {
            parent: PROJECT.into(),
            user: Some(User {
                display_name: "Nobody".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await;
    let st = assert_error(r, Code::InvalidArgument, "INVALID_ARGUMENT");
    assert_eq!(bad_fields(&st), vec!["user.email", "user.phone_number"]);
}

async fn create_reports_every_violation_at_once(e: Engine) {
    let s = TestServer::start(e).await;
    let r = s
        .client()
        .create_user(pb::CreateUserRequest {
            parent: "projects/Bad_Project".into(),
            user_id: "-bad".into(),
            request_id: "has spaces".into(),
            user: Some(User {
                email: "not-an-email".into(),
                phone_number: "12345".into(),
                username: "x".into(),
                external_id: "a\u{0}b".into(),
                display_name: "x".repeat(201),
                title: "line\nbreak".into(),
                bio: "b".repeat(4097),
                birthday: Some(Date {
                    year: 3000,
                    month: 1,
                    day: 1,
                }),
                preferred_locale: "not a locale".into(),
                picture_uri: "ftp://example.com/a.png".into(),
                tags: vec!["ok".into(), "bad tag".into()],
                secondary_phone_numbers: vec!["+1 212 555 0100".into(), "nope".into()],
                metadata: BTreeMap::from([("bad key".into(), "v".into())]),
                addresses: vec![pb::Address {
                    country_code: "XX".into(),
                    kind: 42,
                    ..Default::default()
                }],
                last_login_time: Some(prost_types::Timestamp {
                    seconds: -5,
                    nanos: 0,
                }),
                ..Default::default()
            }),
            initial_state: pb::user::State::Deleted as i32,
            ..Default::default()
        })
        .await;
    let st = assert_error(r, Code::InvalidArgument, "INVALID_ARGUMENT");
    let fields = bad_fields(&st);
    for want in [
        "parent",
        "user_id",
        "request_id",
        "initial_state",
        "user.email",
        "user.phone_number",
        "user.username",
        "user.external_id",
        "user.display_name",
        "user.title",
        "user.bio",
        "user.birthday",
        "user.preferred_locale",
        "user.picture_uri",
        "user.tags[1]",
        "user.secondary_phone_numbers[1]",
        "user.metadata[\"bad key\"]",
        "user.addresses[0].country_code",
        "user.addresses[0].kind",
        "user.last_login_time",
    ] {
        assert!(
            fields.contains(&want.to_string()),
            "{want} missing from {fields:?}"
        );
    }
}

async fn create_enforces_limits(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let too_many = |n: usize, f: &dyn Fn(usize) -> String| (0..n).map(f).collect::<Vec<_>>();
    let big = Struct {
        fields: BTreeMap::from([(
            "blob".into(),
            Value {
                kind: Some(Kind::StringValue("x".repeat(17 * 1024))),
            },
        )]),
    };
    let r = c
        .create_user(pb::CreateUserRequest {
            parent: PROJECT.into(),
            user: Some(User {
                email: "limits@example.com".into(),
                tags: too_many(101, &|i| format!("t{i}")),
                secondary_emails: too_many(11, &|i| format!("s{i}@example.com")),
                metadata: (0..51).map(|i| (format!("k{i}"), "v".into())).collect(),
                addresses: vec![pb::Address::default(); 11],
                custom_data: Some(big),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await;
    let st = assert_error(r, Code::InvalidArgument, "INVALID_ARGUMENT");
    assert_eq!(
        bad_fields(&st),
        vec![
            "user.addresses",
            "user.custom_data",
            "user.metadata",
            "user.secondary_emails",
            "user.tags"
        ]
    );
    // At the limits exactly, it is accepted.
    let ok = create(
        &mut c,
        User {
            email: "limits@example.com".into(),
            tags: too_many(100, &|i| format!("t{i}")),
            secondary_emails: too_many(10, &|i| format!("s{i}@example.com")),
            metadata: (0..50)
                .map(|i| (format!("k{i}"), "v".repeat(500)))
                .collect(),
            addresses: vec![pb::Address::default(); 10],
            display_name: "é".repeat(200),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(ok.tags.len(), 100);
    assert_eq!(ok.metadata.len(), 50);
}

async fn create_with_chosen_id_and_pending_state(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let u = c
        .create_user(pb::CreateUserRequest {
            parent: PROJECT.into(),
            user_id: "ann-1".into(),
            user: Some(user("ann@example.com")),
            initial_state: pb::user::State::Pending as i32,
            ..Default::default()
        })
        .await
        .expect("create")
        .into_inner();
    assert_eq!(u.name, "projects/acme/users/ann-1");
    assert_eq!(u.state, pb::user::State::Pending as i32);

    let dup = c
        .create_user(pb::CreateUserRequest {
            parent: PROJECT.into(),
            user_id: "ann-1".into(),
            user: Some(user("other@example.com")),
            ..Default::default()
        })
        .await;
    assert_error(dup, Code::AlreadyExists, "USER_ALREADY_EXISTS");

    // The same id in another project is another user.
    let other = c
        .create_user(pb::CreateUserRequest {
            parent: "projects/other".into(),
            user_id: "ann-1".into(),
            user: Some(user("ann@example.com")),
            ..Default::default()
        })
        .await
        .expect("other project")
        .into_inner();
    assert_eq!(other.name, "projects/other/users/ann-1");
}

async fn identifiers_are_unique_per_project(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    create(
        &mut c,
        User {
            email: "Ann@Example.com".into(),
            phone_number: "+4741234567".into(),
            username: "ann".into(),
            external_id: "crm-1".into(),
            ..Default::default()
        },
    )
    .await;
    let cases = [
        (
            user("ANN@example.COM"),
            "EMAIL_ALREADY_EXISTS",
            "user.email",
        ),
        (
            User {
                phone_number: "+47 412 34 567".into(),
                ..Default::default()
            },
            "PHONE_NUMBER_ALREADY_EXISTS",
            "user.phone_number",
        ),
        (
            User {
                username: "ANN".into(),
                ..user("b@example.com")
            },
            "USERNAME_ALREADY_EXISTS",
            "user.username",
        ),
        (
            User {
                external_id: "crm-1".into(),
                ..user("c@example.com")
            },
            "EXTERNAL_ID_ALREADY_EXISTS",
            "user.external_id",
        ),
    ];
    for (u, want, field) in cases {
        let r = c
            .create_user(pb::CreateUserRequest {
                parent: PROJECT.into(),
                user: Some(u.clone()),
                ..Default::default()
            })
            .await;
        let st = assert_error(r, Code::AlreadyExists, want);
        let info = tonic_types::StatusExt::get_error_details(&st);
        assert_eq!(info.error_info().unwrap().metadata["field"], field);
        // Another project is free to use it.
        create_in(&mut c, "projects/elsewhere", u).await;
    }
    // External ids compare exactly: another case is another id.
    create(
        &mut c,
        User {
            external_id: "CRM-1".into(),
            ..user("d@example.com")
        },
    )
    .await;
}

async fn racing_creates_with_one_email_have_one_winner(e: Engine) {
    let s = TestServer::start(e).await;
    let mut tasks = Vec::new();
    for i in 0..16 {
        let mut c = s.client();
        tasks.push(tokio::spawn(async move {
            c.create_user(pb::CreateUserRequest {
                parent: PROJECT.into(),
                user: Some(User {
                    email: if i % 2 == 0 {
                        "race@example.com".into()
                    } else {
                        "RACE@EXAMPLE.COM".into()
                    },
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(st) => {
                assert_eq!(st.code(), Code::AlreadyExists, "{st:?}");
                assert_eq!(reason(&st), "EMAIL_ALREADY_EXISTS");
            }
        }
    }
    assert_eq!(ok, 1);
}

async fn request_id_makes_create_idempotent(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let req = pb::CreateUserRequest {
        parent: PROJECT.into(),
        user: Some(user("idem@example.com")),
        request_id: "0b5c6a47-8f0e-4a59-9d7e-3c1f2a9b8e11".into(),
        ..Default::default()
    };
    let first = c.create_user(req.clone()).await.unwrap().into_inner();
    let again = c.create_user(req.clone()).await.unwrap().into_inner();
    assert_eq!(first, again);

    // The first result comes back even after the user changed.
    c.update_user(pb::UpdateUserRequest {
        user: Some(User {
            name: first.name.clone(),
            display_name: "Changed".into(),
            ..Default::default()
        }),
        update_mask: None,
    })
    .await
    .unwrap();
    let third = c.create_user(req.clone()).await.unwrap().into_inner();
    assert_eq!(third, first);

    // Same key, different request: refused, nothing created.
    let mut other = req.clone();
    other.user = Some(user("someone-else@example.com"));
    assert_error(
        c.create_user(other).await,
        Code::FailedPrecondition,
        "REQUEST_ID_REUSED",
    );
    let lookup = c
        .lookup_user(pb::LookupUserRequest {
            parent: PROJECT.into(),
            identifier: Some(pb::lookup_user_request::Identifier::Email(
                "someone-else@example.com".into(),
            )),
        })
        .await;
    assert_error(lookup, Code::NotFound, "USER_NOT_FOUND");

    // Keys are per project.
    let mut elsewhere = req.clone();
    elsewhere.parent = "projects/elsewhere".into();
    let e2 = c.create_user(elsewhere).await.unwrap().into_inner();
    assert_ne!(e2.name, first.name);
}

async fn racing_retries_with_one_request_id_create_one_user(e: Engine) {
    let s = TestServer::start(e).await;
    let req = pb::CreateUserRequest {
        parent: PROJECT.into(),
        user: Some(user("retry@example.com")),
        request_id: "retry-key-1".into(),
        ..Default::default()
    };
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let mut c = s.client();
        let req = req.clone();
        tasks.push(tokio::spawn(async move { c.create_user(req).await }));
    }
    let mut names = std::collections::HashSet::new();
    for t in tasks {
        let u = t.await.unwrap().expect("every retry succeeds").into_inner();
        names.insert(u.name);
    }
    assert_eq!(names.len(), 1, "one user for one key: {names:?}");
}

async fn validate_only_stores_nothing(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let r = c
        .create_user(pb::CreateUserRequest {
            parent: PROJECT.into(),
            user: Some(user("Dry@Example.com")),
            validate_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.email, "Dry@example.com");
    let lookup = c
        .lookup_user(pb::LookupUserRequest {
            parent: PROJECT.into(),
            identifier: Some(pb::lookup_user_request::Identifier::Email(
                "dry@example.com".into(),
            )),
        })
        .await;
    assert_error(lookup, Code::NotFound, "USER_NOT_FOUND");
    assert_error(get(&mut c, &r.name).await, Code::NotFound, "USER_NOT_FOUND");

    // A conflict is reported by a dry run too.
    create(&mut c, user("taken@example.com")).await;
    let dry = c
        .create_user(pb::CreateUserRequest {
            parent: PROJECT.into(),
            user: Some(user("TAKEN@example.com")),
            validate_only: true,
            ..Default::default()
        })
        .await;
    assert_error(dry, Code::AlreadyExists, "EMAIL_ALREADY_EXISTS");
    // And invalid input is invalid.
    let bad = c
        .create_user(pb::CreateUserRequest {
            parent: PROJECT.into(),
            user: Some(user("nope")),
            validate_only: true,
            ..Default::default()
        })
        .await;
    assert_error(bad, Code::InvalidArgument, "INVALID_ARGUMENT");
}

/// A burst of creates is committed in batches; conflicts inside one batch must
/// still fail only their own request, and every success must be stored.
async fn burst_of_creates_with_collisions_keeps_every_rule(e: Engine) {
    let s = TestServer::start(e).await;
    let mut tasks = Vec::new();
    for i in 0..96u32 {
        let mut c = s.client();
        tasks.push(tokio::spawn(async move {
            // Pairs share an email; every eighth request also reuses a username.
            let u = User {
                email: format!("burst{}@example.com", i / 2),
                username: if i % 8 == 0 {
                    "burst-shared".into()
                } else {
                    String::new()
                },
                ..Default::default()
            };
            let request_id = if i % 3 == 0 {
                format!("burst-key-{i}")
            } else {
                String::new()
            };
            (
                i,
                c.create_user(pb::CreateUserRequest {
                    parent: PROJECT.into(),
                    user: Some(u),
                    request_id,
                    ..Default::default()
                })
                .await,
            )
        }));
    }
    let mut created = Vec::new();
    let mut emails_won = std::collections::HashSet::new();
    let mut username_winners = 0;
    for t in tasks {
        let (i, r) = t.await.unwrap();
        match r {
            Ok(u) => {
                let u = u.into_inner();
                assert!(
                    emails_won.insert(u.email.clone()),
                    "two winners for {}",
                    u.email
                );
                if i % 8 == 0 {
                    username_winners += 1;
                }
                created.push(u);
            }
            Err(st) => {
                assert_eq!(st.code(), Code::AlreadyExists, "{st:?}");
                let why = reason(&st);
                assert!(
                    why == "EMAIL_ALREADY_EXISTS" || why == "USERNAME_ALREADY_EXISTS",
                    "{why}"
                );
            }
        }
    }
    assert_eq!(username_winners, 1, "one user owns the shared username");
    // Every pair has exactly one winner: when the even member loses the
    // username race, the odd one gets the email.
    assert_eq!(created.len(), 48);
    let mut c = s.client();
    for u in created {
        assert_eq!(get(&mut c, &u.name).await.unwrap(), u);
    }
}

/// An idempotency key stored before columns were added still replays the
/// user it created.
async fn replays_read_keys_stored_before_a_column_existed(e: Engine) {
    use sea_orm::{ConnectionTrait, Database, Statement};
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let req = pb::CreateUserRequest {
        parent: PROJECT.into(),
        request_id: "old-key".into(),
        user: Some(pb::User {
            email: "old@example.com".into(),
            display_name: "Old".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let first = c
        .create_user(req.clone())
        .await
        .expect("create")
        .into_inner();
    let db = Database::connect(&s.db.url).await.expect("connect");
    let backend = db.get_database_backend();
    let row = db
        .query_one_raw(Statement::from_string(
            backend,
            "SELECT response FROM request_ids WHERE request_id = 'old-key'",
        ))
        .await
        .expect("select")
        .expect("the key's row");
    let stored: String = row.try_get("", "response").expect("response");
    // The row as stored, as if two of its columns had been added since.
    let mut old: serde_json::Value = serde_json::from_str(&stored).expect("json");
    let o = old.as_object_mut().expect("a row object");
    o.remove("custom_data").expect("custom_data");
    o.remove("last_login_time").expect("last_login_time");
    let mark = if backend == sea_orm::DatabaseBackend::Postgres {
        "$1"
    } else {
        "?"
    };
    db.execute_raw(Statement::from_sql_and_values(
        backend,
        format!("UPDATE request_ids SET response = {mark} WHERE request_id = 'old-key'"),
        [old.to_string().into()],
    ))
    .await
    .expect("rewrite the record");
    let again = c.create_user(req).await.expect("replay").into_inner();
    assert_eq!(again, first);
}

both_engines!(
    burst_of_creates_with_collisions_keeps_every_rule,
    create_normalises_and_returns_the_stored_user,
    create_needs_email_or_phone,
    create_reports_every_violation_at_once,
    create_enforces_limits,
    create_with_chosen_id_and_pending_state,
    identifiers_are_unique_per_project,
    racing_creates_with_one_email_have_one_winner,
    request_id_makes_create_idempotent,
    replays_read_keys_stored_before_a_column_existed,
    racing_retries_with_one_request_id_create_one_user,
    validate_only_stores_nothing,
);
