use std::time::Duration;

use tonic::Code;
use user_service::proto::users::v1 as pb;

use crate::both_engines;
use crate::harness::*;

const DAY_SECS: i64 = 24 * 3600;

async fn delete(
    c: &mut Client,
    name: &str,
    etag: &str,
    allow_missing: bool,
    force: bool,
) -> Result<User, tonic::Status> {
    c.delete_user(pb::DeleteUserRequest {
        name: name.into(),
        etag: etag.into(),
        allow_missing,
        force,
    })
    .await
    .map(|r| r.into_inner())
}

async fn undelete(c: &mut Client, name: &str, etag: &str) -> Result<User, tonic::Status> {
    c.undelete_user(pb::UndeleteUserRequest {
        name: name.into(),
        etag: etag.into(),
    })
    .await
    .map(|r| r.into_inner())
}

async fn soft_delete_frees_identifiers_and_keeps_the_user_readable(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let u = create(
        &mut c,
        User {
            username: "gone".into(),
            ..user("gone@example.com")
        },
    )
    .await;
    let d = delete(&mut c, &u.name, "", false, false).await.unwrap();
    assert_eq!(d.state, pb::user::State::Deleted as i32);
    let dt = d.delete_time.expect("delete_time");
    let pt = d.purge_time.expect("purge_time");
    assert_eq!(
        pt.seconds - dt.seconds,
        30 * DAY_SECS,
        "default retention is 30 days"
    );
    assert_eq!(get(&mut c, &u.name).await.unwrap(), d);

    // Deleting again is NOT_FOUND unless allow_missing.
    assert_error(
        delete(&mut c, &u.name, "", false, false).await,
        Code::NotFound,
        "USER_ALREADY_DELETED",
    );
    assert_eq!(delete(&mut c, &u.name, "", true, false).await.unwrap(), d);
    // A deleted user cannot be changed or change state.
    let upd = c
        .update_user(pb::UpdateUserRequest {
            user: Some(User {
                name: u.name.clone(),
                display_name: "x".into(),
                ..Default::default()
            }),
            update_mask: None,
        })
        .await;
    assert_error(upd, Code::FailedPrecondition, "USER_DELETED");
    let act = c
        .activate_user(pb::ActivateUserRequest {
            name: u.name.clone(),
            etag: String::new(),
        })
        .await;
    assert_error(act, Code::FailedPrecondition, "INVALID_STATE_TRANSITION");

    // Its email and username are free for a new user...
    let newcomer = create(
        &mut c,
        User {
            username: "GONE".into(),
            ..user("Gone@example.com")
        },
    )
    .await;
    // ...so the old one cannot come back while they are taken.
    let st = assert_error(
        undelete(&mut c, &u.name, "").await,
        Code::AlreadyExists,
        "EMAIL_ALREADY_EXISTS",
    );
    assert!(st.message().contains("email"));
    delete(&mut c, &newcomer.name, "", false, true)
        .await
        .unwrap();
    let back = undelete(&mut c, &u.name, "").await.unwrap();
    assert_eq!(back.state, pb::user::State::Active as i32);
    assert!(back.delete_time.is_none() && back.purge_time.is_none());
    assert_error(
        undelete(&mut c, &u.name, "").await,
        Code::AlreadyExists,
        "USER_NOT_DELETED",
    );
}

async fn undelete_restores_the_previous_state(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let u = create(&mut c, user("dis@example.com")).await;
    c.disable_user(pb::DisableUserRequest {
        name: u.name.clone(),
        etag: String::new(),
    })
    .await
    .unwrap();
    let d = delete(&mut c, &u.name, "", false, false).await.unwrap();
    assert_error(
        undelete(&mut c, &u.name, &u.etag).await,
        Code::Aborted,
        "ETAG_MISMATCH",
    );
    let back = undelete(&mut c, &u.name, &d.etag).await.unwrap();
    assert_eq!(back.state, pb::user::State::Disabled as i32);
}

async fn force_delete_erases(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let u = create(&mut c, user("erase@example.com")).await;
    let d = delete(&mut c, &u.name, "", false, true).await.unwrap();
    assert_eq!(d.name, u.name);
    assert_error(get(&mut c, &u.name).await, Code::NotFound, "USER_NOT_FOUND");
    // force also erases a soft-deleted user.
    let v = create(&mut c, user("erase2@example.com")).await;
    delete(&mut c, &v.name, "", false, false).await.unwrap();
    delete(&mut c, &v.name, "", false, true).await.unwrap();
    assert_error(get(&mut c, &v.name).await, Code::NotFound, "USER_NOT_FOUND");
    assert_error(
        undelete(&mut c, &v.name, "").await,
        Code::NotFound,
        "USER_NOT_FOUND",
    );
    // The name can be used again.
    let again = c
        .create_user(pb::CreateUserRequest {
            parent: PROJECT.into(),
            user_id: v.name.rsplit('/').next().unwrap().into(),
            user: Some(user("erase2@example.com")),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(
        again.etag, v.etag,
        "a re-created user never matches an old etag"
    );
}

async fn delete_missing_and_stale(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let missing = "projects/acme/users/missing";
    assert_error(
        delete(&mut c, missing, "", false, false).await,
        Code::NotFound,
        "USER_NOT_FOUND",
    );
    let r = delete(&mut c, missing, "", true, false).await.unwrap();
    assert_eq!(r.name, missing);
    assert!(r.create_time.is_none());

    let u = create(&mut c, user("stale@example.com")).await;
    c.disable_user(pb::DisableUserRequest {
        name: u.name.clone(),
        etag: u.etag.clone(),
    })
    .await
    .unwrap();
    assert_error(
        delete(&mut c, &u.name, &u.etag, false, false).await,
        Code::Aborted,
        "ETAG_MISMATCH",
    );
    assert_error(
        delete(&mut c, &u.name, &u.etag, false, true).await,
        Code::Aborted,
        "ETAG_MISMATCH",
    );
    assert_eq!(
        get(&mut c, &u.name).await.unwrap().state,
        pb::user::State::Disabled as i32
    );
}

async fn state_transitions(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let u = c
        .create_user(pb::CreateUserRequest {
            parent: PROJECT.into(),
            user: Some(user("state@example.com")),
            initial_state: pb::user::State::Pending as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let activate = |etag: &str| pb::ActivateUserRequest {
        name: u.name.clone(),
        etag: etag.into(),
    };
    let disable = |etag: &str| pb::DisableUserRequest {
        name: u.name.clone(),
        etag: etag.into(),
    };
    let a = c
        .activate_user(activate(&u.etag))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.state, pb::user::State::Active as i32);
    assert!(nanos(&a.update_time) > nanos(&u.update_time));
    // Repeating it changes nothing.
    let a2 = c.activate_user(activate("")).await.unwrap().into_inner();
    assert_eq!(a2, a);
    assert_error(
        c.disable_user(disable(&u.etag)).await,
        Code::Aborted,
        "ETAG_MISMATCH",
    );
    let d = c.disable_user(disable(&a.etag)).await.unwrap().into_inner();
    assert_eq!(d.state, pb::user::State::Disabled as i32);
    let d2 = c.disable_user(disable("")).await.unwrap().into_inner();
    assert_eq!(d2, d);
    let back = c
        .activate_user(activate(&d.etag))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(back.state, pb::user::State::Active as i32);
    assert_error(
        c.activate_user(pb::ActivateUserRequest {
            name: "projects/acme/users/none".into(),
            etag: String::new(),
        })
        .await,
        Code::NotFound,
        "USER_NOT_FOUND",
    );
    // A pending user can be disabled directly.
    let p = c
        .create_user(pb::CreateUserRequest {
            parent: PROJECT.into(),
            user: Some(user("pending2@example.com")),
            initial_state: pb::user::State::Pending as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let pd = c
        .disable_user(pb::DisableUserRequest {
            name: p.name.clone(),
            etag: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pd.state, pb::user::State::Disabled as i32);
}

async fn retention_is_configurable_and_expired_users_are_purged(e: Engine) {
    let s = TestServer::start_with(e, |st| {
        st.delete_retention = Duration::from_secs(1);
        // Reads must not depend on the purge having run.
        st.purge_interval = Duration::from_secs(3600);
    })
    .await;
    let mut c = s.client();
    let u = create(&mut c, user("short@example.com")).await;
    let d = delete(&mut c, &u.name, "", false, false).await.unwrap();
    let (dt, pt) = (d.delete_time.unwrap(), d.purge_time.unwrap());
    let gap = (pt.seconds - dt.seconds) * 1_000_000_000 + i64::from(pt.nanos - dt.nanos);
    assert_eq!(gap, 1_000_000_000);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // Past its purge time the user is gone for every read and cannot return.
    assert_error(get(&mut c, &u.name).await, Code::NotFound, "USER_NOT_FOUND");
    // BatchGetUsers agrees with GetUser, purged by the background task yet
    // or not.
    assert_error(
        c.batch_get_users(pb::BatchGetUsersRequest {
            parent: PROJECT.into(),
            names: vec![u.name.clone()],
        })
        .await,
        Code::NotFound,
        "USER_NOT_FOUND",
    );
    assert_error(
        undelete(&mut c, &u.name, "").await,
        Code::NotFound,
        "USER_NOT_FOUND",
    );
    // Lists and counts that show deleted users leave it out too.
    let mut req = crate::list::list_req("", "");
    req.show_deleted = true;
    assert!(crate::list::list_all(&mut c, req).await.is_empty());
    let counted = c
        .count_users(pb::CountUsersRequest {
            parent: PROJECT.into(),
            show_deleted: true,
            ..Default::default()
        })
        .await
        .expect("count")
        .into_inner();
    assert_eq!(counted.total_size, 0);
}

/// The purge of old idempotency keys (every minute, by time) is an index
/// range, not a scan of every key of every project.
async fn idempotency_key_purge_uses_an_index(e: Engine) {
    use sea_orm::{ConnectionTrait, Database, Statement};
    let s = TestServer::start(e).await;
    let db = Database::connect(&s.db.url).await.expect("connect");
    let backend = db.get_database_backend();
    let plan: String = match e {
        Engine::Sqlite => db
            .query_all_raw(Statement::from_string(
                backend,
                "EXPLAIN QUERY PLAN DELETE FROM request_ids WHERE create_time < 1",
            ))
            .await
            .unwrap()
            .iter()
            .map(|r| r.try_get::<String>("", "detail").unwrap())
            .collect::<Vec<_>>()
            .join("\n"),
        Engine::Postgres => {
            // A fresh table is tiny: forbid the scan the planner would
            // rightly pick for it, and see that an index can serve instead.
            let txn = sea_orm::TransactionTrait::begin(&db).await.unwrap();
            txn.execute_unprepared("SET LOCAL enable_seqscan = off")
                .await
                .unwrap();
            let rows = txn
                .query_all_raw(Statement::from_string(
                    backend,
                    "EXPLAIN DELETE FROM request_ids WHERE create_time < 1",
                ))
                .await
                .unwrap();
            rows.iter()
                .map(|r| r.try_get::<String>("", "QUERY PLAN").unwrap())
                .collect::<Vec<_>>()
                .join("\n")
        }
    };
    assert!(plan.contains("request_ids_create_time"), "{plan}");
}

both_engines!(
    soft_delete_frees_identifiers_and_keeps_the_user_readable,
    undelete_restores_the_previous_state,
    force_delete_erases,
    delete_missing_and_stale,
    state_transitions,
    retention_is_configurable_and_expired_users_are_purged,
    idempotency_key_purge_uses_an_index,
);
