use std::collections::BTreeMap;

use prost_types::FieldMask;
use tonic::Code;
use user_service::proto::users::v1 as pb;

use crate::both_engines;
use crate::harness::*;

async fn update(c: &mut Client, u: User, paths: &[&str]) -> Result<User, tonic::Status> {
    c.update_user(pb::UpdateUserRequest {
        user: Some(u),
        update_mask: (!paths.is_empty()).then(|| FieldMask {
            paths: paths.iter().map(|p| p.to_string()).collect(),
        }),
    })
    .await
    .map(|r| r.into_inner())
}

fn full_user() -> User {
    User {
        email: "full@example.com".into(),
        display_name: "Full".into(),
        given_name: "Given".into(),
        family_name: "Family".into(),
        tags: vec!["a".into()],
        metadata: BTreeMap::from([("plan".into(), "free".into()), ("tier".into(), "1".into())]),
        ..Default::default()
    }
}

async fn update_with_mask_writes_only_masked_fields(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let u = create(&mut c, full_user()).await;
    let patch = User {
        name: u.name.clone(),
        display_name: "New Name".into(),
        given_name: "ignored: not in mask".into(),
        family_name: String::new(), // in the mask and empty: cleared
        ..Default::default()
    };
    let out = update(&mut c, patch, &["display_name", "family_name"])
        .await
        .unwrap();
    assert_eq!(out.display_name, "New Name");
    assert_eq!(out.given_name, "Given");
    assert_eq!(out.family_name, "");
    assert_eq!(out.email, u.email);
    assert_eq!(out.create_time, u.create_time);
    assert!(nanos(&out.update_time) > nanos(&u.update_time));
    assert_ne!(out.etag, u.etag);
    assert_eq!(get(&mut c, &u.name).await.unwrap(), out);
}

async fn update_without_mask_writes_populated_fields(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let u = create(&mut c, full_user()).await;
    let out = update(
        &mut c,
        User {
            name: u.name.clone(),
            given_name: "Only".into(),
            tags: vec!["x".into(), "y".into()],
            ..Default::default()
        },
        &[],
    )
    .await
    .unwrap();
    assert_eq!(out.given_name, "Only");
    assert_eq!(out.tags, vec!["x", "y"]);
    assert_eq!(out.display_name, "Full");
    assert_eq!(out.family_name, "Family");
    assert_eq!(out.email, "full@example.com");
}

async fn update_star_replaces_everything(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let u = create(&mut c, full_user()).await;
    let out = update(
        &mut c,
        User {
            name: u.name.clone(),
            phone_number: "+4741234567".into(),
            ..Default::default()
        },
        &["*"],
    )
    .await
    .unwrap();
    assert_eq!(out.phone_number, "+4741234567");
    assert_eq!(out.email, "");
    assert_eq!(out.display_name, "");
    assert!(out.tags.is_empty() && out.metadata.is_empty());
    // The email is free again.
    create(&mut c, user("full@example.com")).await;
}

async fn update_single_metadata_keys(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let u = create(&mut c, full_user()).await;
    let out = update(
        &mut c,
        User {
            name: u.name.clone(),
            metadata: BTreeMap::from([
                ("plan".into(), "pro".into()),
                ("a.b".into(), "dotted".into()),
                ("other".into(), "not in mask".into()),
            ]),
            ..Default::default()
        },
        &["metadata.plan", "metadata.`a.b`", "metadata.tier"],
    )
    .await
    .unwrap();
    assert_eq!(
        out.metadata,
        BTreeMap::from([
            ("plan".into(), "pro".into()),
            ("a.b".into(), "dotted".into())
        ])
    );
}

async fn update_rejects_bad_masks_and_values(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let u = create(&mut c, full_user()).await;
    let st = assert_error(
        update(
            &mut c,
            User {
                name: u.name.clone(),
                ..Default::default()
            },
            &["state", "create_time", "no_such_field", "display_name"],
        )
        .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(
        bad_fields(&st),
        vec![
            "update_mask.paths[0]",
            "update_mask.paths[1]",
            "update_mask.paths[2]"
        ]
    );
    let st = assert_error(
        update(
            &mut c,
            User {
                name: u.name.clone(),
                email: "broken".into(),
                display_name: "\u{7}bell".into(),
                ..Default::default()
            },
            &["email", "display_name"],
        )
        .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(bad_fields(&st), vec!["user.display_name", "user.email"]);
    // Removing the only contact is refused.
    let st = assert_error(
        update(
            &mut c,
            User {
                name: u.name.clone(),
                ..Default::default()
            },
            &["email"],
        )
        .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(bad_fields(&st), vec!["user.email", "user.phone_number"]);
    // A malformed or missing name.
    let st = assert_error(
        update(&mut c, User::default(), &["display_name"]).await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(bad_fields(&st), vec!["user.name"]);
    assert_error(
        update(
            &mut c,
            User {
                name: "projects/acme/users/missing".into(),
                display_name: "x".into(),
                ..Default::default()
            },
            &[],
        )
        .await,
        Code::NotFound,
        "USER_NOT_FOUND",
    );
    // Nothing changed through all that.
    assert_eq!(get(&mut c, &u.name).await.unwrap(), u);
}

async fn update_checks_etag(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let u = create(&mut c, full_user()).await;
    let v2 = update(
        &mut c,
        User {
            name: u.name.clone(),
            etag: u.etag.clone(),
            display_name: "v2".into(),
            ..Default::default()
        },
        &[],
    )
    .await
    .expect("current etag accepted");
    let stale = update(
        &mut c,
        User {
            name: u.name.clone(),
            etag: u.etag.clone(),
            display_name: "v3".into(),
            ..Default::default()
        },
        &[],
    )
    .await;
    assert_error(stale, Code::Aborted, "ETAG_MISMATCH");
    assert_eq!(get(&mut c, &u.name).await.unwrap().display_name, "v2");
    // A no-op update keeps the version.
    let same = update(
        &mut c,
        User {
            name: u.name.clone(),
            display_name: "v2".into(),
            ..Default::default()
        },
        &[],
    )
    .await
    .unwrap();
    assert_eq!(same.etag, v2.etag);
    assert_eq!(same.update_time, v2.update_time);
}

async fn update_conflicting_identifier(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    create(&mut c, user("first@example.com")).await;
    let second = create(&mut c, user("second@example.com")).await;
    assert_error(
        update(
            &mut c,
            User {
                name: second.name.clone(),
                email: "FIRST@example.com".into(),
                ..Default::default()
            },
            &[],
        )
        .await,
        Code::AlreadyExists,
        "EMAIL_ALREADY_EXISTS",
    );
    assert_eq!(get(&mut c, &second.name).await.unwrap(), second);
}

async fn concurrent_updates_lose_nothing(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let u = create(&mut c, user("busy@example.com")).await;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let mut c = s.client();
        let name = u.name.clone();
        tasks.push(tokio::spawn(async move {
            update(
                &mut c,
                User {
                    name,
                    metadata: BTreeMap::from([(format!("k{i}"), "v".into())]),
                    ..Default::default()
                },
                &[&format!("metadata.k{i}")],
            )
            .await
        }));
    }
    for t in tasks {
        t.await.unwrap().expect("each update applies");
    }
    let out = get(&mut c, &u.name).await.unwrap();
    assert_eq!(out.metadata.len(), 8, "{:?}", out.metadata);
}

/// Updates of many users at once (batched together) where half claim one
/// new email: one of those wins, the others get their own ALREADY_EXISTS,
/// the rest apply, and every stored user and index term is as answered.
async fn burst_of_updates_with_one_contested_email(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let mut users = Vec::new();
    for i in 0..16 {
        users.push(create(&mut c, user(&format!("burst{i}@example.com"))).await);
    }
    let mut ev = s.events();
    let head = |page: pb::ListEventsResponse| page.head_revision;
    let events_page = pb::ListEventsRequest {
        parent: PROJECT.into(),
        page_size: 1,
        ..Default::default()
    };
    let before = head(
        ev.list_events(events_page.clone())
            .await
            .unwrap()
            .into_inner(),
    );
    let mut tasks = Vec::new();
    for (i, u) in users.iter().enumerate() {
        let mut c = s.client();
        let name = u.name.clone();
        let email = if i < 8 {
            "contested@example.com".to_string()
        } else {
            format!("moved{i}@example.org")
        };
        tasks.push(tokio::spawn(async move {
            let patch = User {
                name,
                email,
                tags: vec![format!("t{i}")],
                ..Default::default()
            };
            update(&mut c, patch, &["email", "tags"]).await
        }));
    }
    let mut winners = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.unwrap() {
            Ok(u) => winners.push((i, u)),
            Err(status) => {
                assert!(i < 8, "user {i} (own email) failed: {status:?}");
                assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
            }
        }
    }
    assert_eq!(winners.len(), 9, "one contested winner and 8 own emails");
    // One change event per applied update, none for a refused one.
    let after = head(ev.list_events(events_page).await.unwrap().into_inner());
    assert_eq!(after - before, 9);
    for (i, u) in users.iter().enumerate() {
        let stored = get(&mut c, &u.name).await.unwrap();
        let won = winners.iter().find(|(w, _)| *w == i);
        match won {
            Some((_, answered)) => assert_eq!(&stored, answered),
            None => assert_eq!(&stored, u, "a refused update left user {i} as it was"),
        }
        let tagged = c
            .list_users(pb::ListUsersRequest {
                parent: PROJECT.into(),
                filter: format!("tags:\"t{i}\""),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .users;
        assert_eq!(
            tagged.len(),
            usize::from(won.is_some()),
            "user {i}'s tag term"
        );
        // The email term follows the stored email.
        let by_old = c
            .list_users(pb::ListUsersRequest {
                parent: PROJECT.into(),
                filter: format!("email = \"*{}\"", &u.email[1..]),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .users;
        assert_eq!(
            by_old.len(),
            usize::from(won.is_none()),
            "user {i}'s old email term"
        );
    }
    let contested = c
        .list_users(pb::ListUsersRequest {
            parent: PROJECT.into(),
            filter: "email = \"contested@example.com\"".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .users;
    assert_eq!(contested.len(), 1);
}

both_engines!(
    burst_of_updates_with_one_contested_email,
    update_with_mask_writes_only_masked_fields,
    update_without_mask_writes_populated_fields,
    update_star_replaces_everything,
    update_single_metadata_keys,
    update_rejects_bad_masks_and_values,
    update_checks_etag,
    update_conflicting_identifier,
    concurrent_updates_lose_nothing,
);
