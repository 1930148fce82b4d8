use tonic::Code;
use tonic_types::StatusExt;
use user_service::proto::users::v1 as pb;
use user_service::proto::users::v1::lookup_user_request::Identifier as Id;

use crate::both_engines;
use crate::harness::*;

async fn get_unknown_or_malformed_names(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let st = assert_error(
        get(&mut c, "projects/acme/users/nobody").await,
        Code::NotFound,
        "USER_NOT_FOUND",
    );
    let d = st.get_error_details();
    let ri = d.resource_info().expect("ResourceInfo on NOT_FOUND");
    assert_eq!(ri.resource_name, "projects/acme/users/nobody");

    for bad in [
        "",
        "users/x",
        "projects/acme/users/",
        "projects/ACME/users/x",
        "projects/a/users/x/y",
    ] {
        let st = assert_error(
            get(&mut c, bad).await,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
        assert_eq!(bad_fields(&st), vec!["name"], "{bad}");
    }
    // A user of one project is not visible from another.
    let u = create(&mut c, user("p@example.com")).await;
    let other = u.name.replace("projects/acme/", "projects/other/");
    assert_error(get(&mut c, &other).await, Code::NotFound, "USER_NOT_FOUND");
}

async fn lookup(c: &mut crate::harness::Client, id: Id) -> Result<pb::User, tonic::Status> {
    c.lookup_user(pb::LookupUserRequest {
        parent: PROJECT.into(),
        identifier: Some(id),
    })
    .await
    .map(|r| r.into_inner())
}

async fn lookup_by_every_identifier(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let u = create(
        &mut c,
        pb::User {
            email: "Look.Up@Example.com".into(),
            phone_number: "+12125550100".into(),
            username: "lookup".into(),
            external_id: "ext-42".into(),
            ..Default::default()
        },
    )
    .await;
    create(&mut c, user("someone@example.com")).await;
    for id in [
        Id::Email("look.up@EXAMPLE.COM".into()),
        Id::Email("LOOK.UP@example.com".into()),
        Id::PhoneNumber("+1 (212) 555-0100".into()),
        Id::Username("LookUp".into()),
        Id::ExternalId("ext-42".into()),
    ] {
        let found = lookup(&mut c, id.clone())
            .await
            .unwrap_or_else(|e| panic!("{id:?}: {e:?}"));
        assert_eq!(found.name, u.name);
    }
    for id in [
        Id::Email("nobody@example.com".into()),
        Id::PhoneNumber("+12125550199".into()),
        Id::Username("nobody".into()),
        Id::ExternalId("EXT-42".into()),
    ] {
        assert_error(lookup(&mut c, id).await, Code::NotFound, "USER_NOT_FOUND");
    }

    // Soft-deleted users are not found by identity.
    c.delete_user(pb::DeleteUserRequest {
        name: u.name.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_error(
        lookup(&mut c, Id::Email("look.up@example.com".into())).await,
        Code::NotFound,
        "USER_NOT_FOUND",
    );
}

async fn lookup_rejects_bad_input(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let none = c
        .lookup_user(pb::LookupUserRequest {
            parent: PROJECT.into(),
            identifier: None,
        })
        .await;
    let st = assert_error(none, Code::InvalidArgument, "INVALID_ARGUMENT");
    assert_eq!(bad_fields(&st), vec!["identifier"]);
    let st = assert_error(
        lookup(&mut c, Id::PhoneNumber("555".into())).await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(bad_fields(&st), vec!["phone_number"]);
    let st = assert_error(
        c.lookup_user(pb::LookupUserRequest {
            parent: "nope".into(),
            identifier: Some(Id::Email("x".into())),
        })
        .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(bad_fields(&st), vec!["email", "parent"]);
}

/// Concurrent gets are served in batches on PostgreSQL: every caller must get
/// its own user (or NOT_FOUND), whatever else is in the batch.
async fn concurrent_reads_each_get_their_own_user(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let mut users = Vec::new();
    for i in 0..20 {
        users.push(create(&mut c, user(&format!("many{i}@example.com"))).await);
    }
    let other = create_in(&mut c, "projects/other", user("many0@example.com")).await;
    let mut tasks = Vec::new();
    for round in 0..10 {
        for (i, u) in users.iter().enumerate() {
            let mut c = s.client();
            let (name, want) = if (i + round) % 7 == 0 {
                (format!("projects/acme/users/missing-{i}"), None)
            } else {
                (u.name.clone(), Some(u.clone()))
            };
            tasks.push(tokio::spawn(
                async move { (want, get(&mut c, &name).await) },
            ));
        }
        let mut c2 = s.client();
        let o = other.clone();
        tasks.push(tokio::spawn(async move {
            (Some(o.clone()), get(&mut c2, &o.name).await)
        }));
    }
    for t in tasks {
        match t.await.unwrap() {
            (Some(want), got) => assert_eq!(got.unwrap(), want),
            (None, got) => {
                assert_error(got, Code::NotFound, "USER_NOT_FOUND");
            }
        }
    }

    // The same for lookups by email, with a soft-deleted user in the mix.
    c.delete_user(pb::DeleteUserRequest {
        name: users[3].name.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut tasks = Vec::new();
    for round in 0..10 {
        for (i, u) in users.iter().enumerate() {
            let mut c = s.client();
            let email = if (i + round) % 5 == 0 {
                format!("NOBODY{i}@example.com")
            } else {
                u.email.to_uppercase()
            };
            let want = (i != 3 && (i + round) % 5 != 0).then(|| u.name.clone());
            tasks.push(tokio::spawn(async move {
                (want, lookup(&mut c, Id::Email(email)).await)
            }));
        }
    }
    for t in tasks {
        match t.await.unwrap() {
            (Some(want), got) => assert_eq!(got.unwrap().name, want),
            (None, got) => {
                assert_error(got, Code::NotFound, "USER_NOT_FOUND");
            }
        }
    }
}

both_engines!(
    concurrent_reads_each_get_their_own_user,
    get_unknown_or_malformed_names,
    lookup_by_every_identifier,
    lookup_rejects_bad_input,
);
