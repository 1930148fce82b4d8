//! Change events (EventService) through the generated clients: which write
//! appends which event, the gapless per-project log, ListEvents paging,
//! filters and errors, WatchEvents (replay, live, markers, resume), callers,
//! retention, export-then-watch, two replicas on one PostgreSQL database, a
//! SIGKILL, and the NATS JetStream relay.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream;
use prost::Message;
use prost_types::FieldMask;
use tokio::task::JoinSet;
use tonic::{Code, Status, Streaming};
use tonic_types::StatusExt;
use user_service::config::Settings;
use user_service::proto::users::v1 as pb;
use user_service::proto::users::v1::event::{ResourceState, Type};
use user_service::proto::users::v1::event_service_client::EventServiceClient;

use crate::both_engines;
use crate::harness::*;
use crate::server::{Process, connect_to};

both_engines!(
    every_write_appends_one_event,
    purge_after_retention_is_an_event_without_actor,
    no_op_and_failed_writes_append_nothing,
    list_events_pages_in_order,
    list_events_filters,
    list_and_watch_errors,
    watch_replays_then_follows_live,
    watch_sends_idle_markers,
    watch_resumes_filters_and_batches,
    watch_ends_with_shutting_down_on_stop,
    events_need_read_scope_and_project,
    actor_is_the_subject_of_the_writer,
    compacted_events_are_out_of_range,
    stream_users_reports_the_head_revision,
    export_then_watch_misses_nothing,
    sigkill_keeps_one_event_per_acknowledged_write,
    relay_publishes_each_event_once_across_restarts,
);

// ------------------------------------------------------------------ helpers

/// How long a test waits for what should come at once.
const WAIT: Duration = Duration::from_secs(10);
/// The contract: a commit reaches a caught-up watcher within a second.
const LIVE: Duration = Duration::from_secs(1);
/// The actor of changes made on a server without authentication.
const ANONYMOUS: &str = "anonymous";
/// NATS JetStream runs here on every machine that runs the tests.
const NATS_URL: &str = "nats://127.0.0.1:4222";

type Watch = Streaming<pb::WatchEventsResponse>;

fn uname(parent: &str, id: &str) -> String {
    format!("{parent}/users/{id}")
}

fn gname(parent: &str, id: &str) -> String {
    format!("{parent}/groups/{id}")
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// The wall clock, as nanoseconds since the epoch.
fn wall() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as i128
}

fn list_req(parent: &str, after: i64, page_size: i32) -> pb::ListEventsRequest {
    pb::ListEventsRequest {
        parent: parent.into(),
        after_revision: after,
        page_size,
        ..Default::default()
    }
}

fn watch_req(parent: &str, after: i64, filter: &str) -> pb::WatchEventsRequest {
    pb::WatchEventsRequest {
        parent: parent.into(),
        after_revision: after,
        filter: filter.into(),
    }
}

async fn list_page(ev: &mut Events, req: pb::ListEventsRequest) -> pb::ListEventsResponse {
    match ev.list_events(req.clone()).await {
        Ok(r) => r.into_inner(),
        Err(s) => panic!("ListEvents {req:?}: {s:?}"),
    }
}

/// Every event of `parent` after `after` that `filter` selects, following
/// the page tokens.
async fn list_all(
    ev: &mut Events,
    parent: &str,
    filter: &str,
    after: i64,
    page_size: i32,
) -> Vec<pb::Event> {
    let mut req = pb::ListEventsRequest {
        filter: filter.into(),
        ..list_req(parent, after, page_size)
    };
    let mut out = Vec::new();
    for _ in 0..100_000 {
        let page = list_page(ev, req.clone()).await;
        if let Some(last) = page.events.last() {
            assert!(
                last.revision <= page.head_revision,
                "revision {} beyond the page's head {}",
                last.revision,
                page.head_revision
            );
        }
        out.extend(page.events);
        if page.next_page_token.is_empty() {
            return out;
        }
        req.page_token = page.next_page_token;
    }
    panic!("ListEvents of {parent} never reached the head");
}

/// The head revision of `parent`'s log.
async fn head(ev: &mut Events, parent: &str) -> i64 {
    list_page(ev, list_req(parent, 0, 1)).await.head_revision
}

fn revisions(events: &[pb::Event]) -> Vec<i64> {
    events.iter().map(|e| e.revision).collect()
}

fn span(from: i64, through: i64) -> Vec<i64> {
    (from..=through).collect()
}

/// The events appended since `*at` (the head the caller saw last), which
/// must continue the log without a gap; moves `*at` to the new head.
async fn since(ev: &mut Events, parent: &str, at: &mut i64) -> Vec<pb::Event> {
    let events = list_all(ev, parent, "", *at, 1000).await;
    let n = events.len() as i64;
    assert_eq!(
        revisions(&events),
        span(*at + 1, *at + n),
        "the events after {at}"
    );
    *at += n;
    events
}

/// The one event the last write appended.
async fn one(ev: &mut Events, parent: &str, at: &mut i64) -> pb::Event {
    let mut events = since(ev, parent, at).await;
    assert_eq!(events.len(), 1, "one write, one event: {events:?}");
    events.remove(0)
}

#[track_caller]
fn user_of(e: &pb::Event) -> &pb::User {
    match &e.resource_state {
        Some(ResourceState::User(u)) => u,
        other => panic!("event {} carries {other:?}, not a user", e.revision),
    }
}

#[track_caller]
fn group_of(e: &pb::Event) -> &pb::Group {
    match &e.resource_state {
        Some(ResourceState::Group(g)) => g,
        other => panic!("event {} carries {other:?}, not a group", e.revision),
    }
}

/// The type, resource, actor and request id of an event, and the fields
/// every event has.
#[track_caller]
fn check(e: &pb::Event, ty: Type, resource: &str, request_id: &str) {
    assert_eq!(e.r#type(), ty, "{e:?}");
    assert_eq!(e.resource, resource, "{e:?}");
    assert_eq!(e.actor, ANONYMOUS, "{e:?}");
    assert_eq!(e.request_id, request_id, "{e:?}");
    assert_eq!(e.event_id.len(), 36, "not a UUID: {e:?}");
    assert_eq!(&e.event_id[14..15], "7", "not a UUIDv7: {e:?}");
    assert!(e.event_time.is_some(), "no event_time: {e:?}");
    let lists = matches!(ty, Type::UserUpdated | Type::GroupUpdated);
    assert_eq!(!e.changed_paths.is_empty(), lists, "changed_paths: {e:?}");
    let members = matches!(ty, Type::GroupMembersAdded | Type::GroupMembersRemoved);
    assert_eq!(!e.members.is_empty(), members, "members: {e:?}");
}

fn member(name: &str) -> pb::GroupMember {
    let kind = if name.contains("/groups/") {
        pb::group_member::Kind::Group
    } else {
        pb::group_member::Kind::User
    };
    pb::GroupMember {
        name: name.into(),
        kind: kind as i32,
    }
}

/// One entry of the ErrorInfo metadata of an error.
#[track_caller]
fn meta(s: &Status, key: &str) -> String {
    let d = s.get_error_details();
    let info = d
        .error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo: {s:?}"));
    info.metadata
        .get(key)
        .cloned()
        .unwrap_or_else(|| panic!("no ErrorInfo metadata `{key}`: {s:?}"))
}

async fn batch_create(c: &mut Client, parent: &str, n: usize, tag: &str) -> Vec<pb::User> {
    c.batch_create_users(pb::BatchCreateUsersRequest {
        parent: parent.into(),
        requests: (0..n)
            .map(|i| pb::CreateUserRequest {
                user: Some(user(&format!("{tag}{i}@example.com"))),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|s| panic!("BatchCreateUsers of {n} in {parent}: {s:?}"))
    .into_inner()
    .users
}

fn rename_req(name: &str, display_name: &str) -> pb::UpdateUserRequest {
    pb::UpdateUserRequest {
        user: Some(pb::User {
            name: name.into(),
            display_name: display_name.into(),
            ..Default::default()
        }),
        update_mask: Some(FieldMask {
            paths: vec!["display_name".into()],
        }),
    }
}

async fn rename(c: &mut Client, name: &str, display_name: &str) -> pb::User {
    c.update_user(rename_req(name, display_name))
        .await
        .unwrap_or_else(|s| panic!("rename {name}: {s:?}"))
        .into_inner()
}

async fn delete(c: &mut Client, name: &str, force: bool) -> pb::User {
    c.delete_user(pb::DeleteUserRequest {
        name: name.into(),
        force,
        ..Default::default()
    })
    .await
    .unwrap_or_else(|s| panic!("delete {name} (force {force}): {s:?}"))
    .into_inner()
}

async fn create_group(g: &mut Groups, parent: &str, id: &str) -> pb::Group {
    g.create_group(pb::CreateGroupRequest {
        parent: parent.into(),
        group_id: id.into(),
        group: Some(pb::Group {
            display_name: format!("Group {id}"),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|s| panic!("create group {id}: {s:?}"))
    .into_inner()
}

async fn watch(ev: &mut Events, parent: &str, after: i64, filter: &str) -> Watch {
    let req = watch_req(parent, after, filter);
    match ev.watch_events(req.clone()).await {
        Ok(r) => r.into_inner(),
        Err(s) => panic!("WatchEvents {req:?}: {s:?}"),
    }
}

/// The next message of a watch, within `within`.
async fn next(w: &mut Watch, within: Duration) -> pb::WatchEventsResponse {
    match tokio::time::timeout(within, w.message()).await {
        Ok(Ok(Some(m))) => {
            if let Some(last) = m.events.last() {
                assert!(
                    last.revision <= m.head_revision,
                    "revision {} beyond the message's head {}",
                    last.revision,
                    m.head_revision
                );
            }
            m
        }
        Ok(Ok(None)) => panic!("the watch ended"),
        Ok(Err(s)) => panic!("the watch failed: {s:?}"),
        Err(_) => panic!("no watch message within {within:?}"),
    }
}

/// The next message of a watch that carries events (markers are skipped).
async fn next_events(w: &mut Watch, within: Duration) -> pb::WatchEventsResponse {
    let deadline = Instant::now() + within;
    loop {
        let m = next(w, deadline.saturating_duration_since(Instant::now())).await;
        if !m.events.is_empty() {
            return m;
        }
    }
}

/// The events of a watch until its head reaches `through`.
async fn follow(w: &mut Watch, through: i64) -> Vec<pb::Event> {
    let start = Instant::now();
    let mut out = Vec::new();
    loop {
        let m = next(w, WAIT).await;
        out.extend(m.events);
        if m.head_revision >= through {
            return out;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the watch did not reach revision {through}"
        );
    }
}

/// The error a WatchEvents call ends with: refused at once, or as the
/// stream's first item.
async fn watch_error(ev: &mut Events, req: pb::WatchEventsRequest) -> Status {
    let mut w = match ev.watch_events(req.clone()).await {
        Ok(r) => r.into_inner(),
        Err(s) => return s,
    };
    match tokio::time::timeout(WAIT, w.message()).await {
        Ok(Err(s)) => s,
        Ok(Ok(m)) => panic!("WatchEvents {req:?}: want an error, got {m:?}"),
        Err(_) => panic!("WatchEvents {req:?}: no answer within {WAIT:?}"),
    }
}

/// Asserts a refused write and its code.
#[track_caller]
fn refused<T: std::fmt::Debug>(r: Result<tonic::Response<T>, Status>, code: Code) {
    let s = r.expect_err("the write was expected to fail");
    assert_eq!(s.code(), code, "{s:?}");
}

/// EventService on a server started as a process.
async fn events_of(p: &Process) -> Events {
    EventServiceClient::with_interceptor(connect_to(&p.addr).await, Bearer::default())
}

// ---------------------------------------------------- what each write appends

async fn every_write_appends_one_event(e: Engine) {
    const P: &str = "projects/ev-kinds";
    const OTHER: &str = "projects/ev-kinds-other";
    let s = TestServer::start(e).await;
    let (mut c, mut g, mut ev) = (s.client(), s.groups(), s.events());
    let started = wall();
    let mut at = 0;

    // CreateUser, with its request_id.
    let ann = c
        .create_user(pb::CreateUserRequest {
            parent: P.into(),
            user: Some(user("ann@example.com")),
            user_id: "ann".into(),
            request_id: "req-ann".into(),
            ..Default::default()
        })
        .await
        .expect("create ann")
        .into_inner();
    let e1 = one(&mut ev, P, &mut at).await;
    assert_eq!(e1.revision, 1, "a project's log starts at 1");
    check(&e1, Type::UserCreated, &ann.name, "req-ann");
    assert_eq!(user_of(&e1), &ann);

    // BatchCreateUsers: one event per user, in request order.
    let batch = c
        .batch_create_users(pb::BatchCreateUsersRequest {
            parent: P.into(),
            requests: ["bob", "cat"]
                .map(|id| pb::CreateUserRequest {
                    user: Some(user(&format!("{id}@example.com"))),
                    user_id: id.into(),
                    ..Default::default()
                })
                .into(),
            request_id: "req-batch".into(),
        })
        .await
        .expect("batch create")
        .into_inner()
        .users;
    let events = since(&mut ev, P, &mut at).await;
    assert_eq!(events.len(), 2, "{events:?}");
    for (e, u) in events.iter().zip(&batch) {
        check(e, Type::UserCreated, &u.name, "req-batch");
        assert_eq!(user_of(e), u);
    }

    // ImportUsers.
    let mut acks = c
        .import_users(tokio_stream::iter([pb::ImportUsersRequest {
            parent: P.into(),
            users: vec![pb::User {
                name: uname(P, "dan"),
                ..user("dan@example.com")
            }],
        }]))
        .await
        .expect("import")
        .into_inner();
    while let Some(a) = acks.message().await.expect("import ack") {
        assert!(a.failures.is_empty(), "{:?}", a.failures);
    }
    let dan = get(&mut c, &uname(P, "dan")).await.expect("dan imported");
    let e = one(&mut ev, P, &mut at).await;
    check(&e, Type::UserCreated, &dan.name, "");
    assert_eq!(user_of(&e), &dan);

    // UpdateUser: the top-level fields that changed.
    let ann = c
        .update_user(pb::UpdateUserRequest {
            user: Some(pb::User {
                name: ann.name.clone(),
                display_name: "Ann".into(),
                metadata: [("plan".to_string(), "pro".to_string())].into(),
                ..Default::default()
            }),
            update_mask: Some(FieldMask {
                paths: vec!["display_name".into(), "metadata.plan".into()],
            }),
        })
        .await
        .expect("update ann")
        .into_inner();
    let e = one(&mut ev, P, &mut at).await;
    check(&e, Type::UserUpdated, &ann.name, "");
    assert_eq!(user_of(&e), &ann);
    assert_eq!(
        sorted(e.changed_paths.clone()),
        ["display_name", "metadata"]
    );

    // DisableUser and ActivateUser that change the state.
    let ann = c
        .disable_user(pb::DisableUserRequest {
            name: ann.name.clone(),
            ..Default::default()
        })
        .await
        .expect("disable ann")
        .into_inner();
    let e = one(&mut ev, P, &mut at).await;
    check(&e, Type::UserStateChanged, &ann.name, "");
    assert_eq!(user_of(&e).state(), pb::user::State::Disabled);
    assert_eq!(user_of(&e), &ann);
    let ann = c
        .activate_user(pb::ActivateUserRequest {
            name: ann.name.clone(),
            ..Default::default()
        })
        .await
        .expect("activate ann")
        .into_inner();
    let e = one(&mut ev, P, &mut at).await;
    check(&e, Type::UserStateChanged, &ann.name, "");
    assert_eq!(user_of(&e).state(), pb::user::State::Active);
    assert_eq!(user_of(&e), &ann);

    // DeleteUser (soft), UndeleteUser, DeleteUser with force.
    let bob = delete(&mut c, &batch[0].name, false).await;
    let e = one(&mut ev, P, &mut at).await;
    check(&e, Type::UserDeleted, &bob.name, "");
    assert_eq!(user_of(&e).state(), pb::user::State::Deleted);
    assert_eq!(user_of(&e), &bob);
    let bob = c
        .undelete_user(pb::UndeleteUserRequest {
            name: bob.name.clone(),
            ..Default::default()
        })
        .await
        .expect("undelete bob")
        .into_inner();
    let e = one(&mut ev, P, &mut at).await;
    check(&e, Type::UserUndeleted, &bob.name, "");
    assert_eq!(user_of(&e).state(), pb::user::State::Active);
    assert_eq!(user_of(&e), &bob);
    let cat = delete(&mut c, &batch[1].name, true).await;
    let e = one(&mut ev, P, &mut at).await;
    check(&e, Type::UserPurged, &cat.name, "");
    assert_eq!(user_of(&e), &cat, "USER_PURGED carries the user as it was");

    // CreateGroup (with its request_id), UpdateGroup.
    let eng = g
        .create_group(pb::CreateGroupRequest {
            parent: P.into(),
            group_id: "eng".into(),
            request_id: "req-eng".into(),
            group: Some(pb::Group {
                display_name: "Engineering".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("create eng")
        .into_inner();
    let e = one(&mut ev, P, &mut at).await;
    check(&e, Type::GroupCreated, &eng.name, "req-eng");
    assert_eq!(group_of(&e), &eng);
    let eng = g
        .update_group(pb::UpdateGroupRequest {
            group: Some(pb::Group {
                name: eng.name.clone(),
                display_name: "Eng".into(),
                description: "Builds things".into(),
                ..Default::default()
            }),
            update_mask: Some(FieldMask {
                paths: vec!["display_name".into(), "description".into()],
            }),
        })
        .await
        .expect("update eng")
        .into_inner();
    let e = one(&mut ev, P, &mut at).await;
    check(&e, Type::GroupUpdated, &eng.name, "");
    assert_eq!(group_of(&e), &eng);
    assert_eq!(
        sorted(e.changed_paths.clone()),
        ["description", "display_name"]
    );
    let ops = create_group(&mut g, P, "ops").await;
    let e = one(&mut ev, P, &mut at).await;
    check(&e, Type::GroupCreated, &ops.name, "");

    // AddGroupMembers: the members added, in request order, a repeat once.
    let added = g
        .add_group_members(pb::AddGroupMembersRequest {
            group: eng.name.clone(),
            members: vec![
                dan.name.clone(),
                ops.name.clone(),
                dan.name.clone(),
                ann.name.clone(),
            ],
        })
        .await
        .expect("add members")
        .into_inner();
    let e = one(&mut ev, P, &mut at).await;
    check(&e, Type::GroupMembersAdded, &eng.name, "");
    assert_eq!(group_of(&e), &added);
    assert_eq!(
        e.members,
        [member(&dan.name), member(&ops.name), member(&ann.name)]
    );
    // Only the members that were not there yet.
    g.add_group_members(pb::AddGroupMembersRequest {
        group: eng.name.clone(),
        members: vec![ann.name.clone(), bob.name.clone()],
    })
    .await
    .expect("add members again");
    let e = one(&mut ev, P, &mut at).await;
    check(&e, Type::GroupMembersAdded, &eng.name, "");
    assert_eq!(e.members, [member(&bob.name)]);

    // RemoveGroupMembers: only the members that were removed.
    let removed = g
        .remove_group_members(pb::RemoveGroupMembersRequest {
            group: eng.name.clone(),
            members: vec![ann.name.clone(), uname(P, "nobody"), ops.name.clone()],
        })
        .await
        .expect("remove members")
        .into_inner();
    let e = one(&mut ev, P, &mut at).await;
    check(&e, Type::GroupMembersRemoved, &eng.name, "");
    assert_eq!(group_of(&e), &removed);
    assert_eq!(e.members, [member(&ann.name), member(&ops.name)]);

    // DeleteGroup: the group as it was.
    let gone = g
        .delete_group(pb::DeleteGroupRequest {
            name: ops.name.clone(),
            ..Default::default()
        })
        .await
        .expect("delete ops")
        .into_inner();
    let e = one(&mut ev, P, &mut at).await;
    check(&e, Type::GroupDeleted, &ops.name, "");
    assert_eq!(group_of(&e), &gone);
    assert_eq!(at, 17);
    let finished = wall();

    // The whole log: gapless from 1, unique ids, commit times of the test.
    let all = list_all(&mut ev, P, "", 0, 1000).await;
    assert_eq!(revisions(&all), span(1, 17));
    let ids: BTreeSet<&str> = all.iter().map(|e| e.event_id.as_str()).collect();
    assert_eq!(ids.len(), all.len(), "event ids repeat");
    let second = 1_000_000_000;
    for e in &all {
        let t = nanos(&e.event_time);
        assert!(
            (started - second..=finished + second).contains(&t),
            "event {} at {t}, the writes ran from {started} to {finished}",
            e.revision
        );
    }

    // Another project has a log of its own, from 1.
    let other = create_in(&mut c, OTHER, user("ann@example.com")).await;
    let mut other_at = 0;
    let e = one(&mut ev, OTHER, &mut other_at).await;
    assert_eq!(e.revision, 1);
    check(&e, Type::UserCreated, &other.name, "");
    assert_eq!(head(&mut ev, P).await, 17);
}

/// A purge after the delete retention is USER_PURGED, by nobody.
async fn purge_after_retention_is_an_event_without_actor(e: Engine) {
    const P: &str = "projects/ev-purge";
    let s = TestServer::start_with(e, |s| {
        s.delete_retention = Duration::from_secs(1);
        s.purge_interval = Duration::from_millis(200);
    })
    .await;
    let (mut c, mut ev) = (s.client(), s.events());
    let u = create_in(&mut c, P, user("gone@example.com")).await;
    let deleted = delete(&mut c, &u.name, false).await;
    let start = Instant::now();
    let purged = loop {
        let found = list_all(&mut ev, P, "type = USER_PURGED", 0, 100).await;
        if let Some(e) = found.into_iter().next() {
            break e;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{} not purged after {:?}",
            u.name,
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(purged.revision, 3);
    assert_eq!(purged.resource, u.name);
    assert_eq!(purged.actor, "", "the service purged it on its own");
    assert_eq!(purged.request_id, "");
    assert_eq!(user_of(&purged), &deleted, "the user as it was last stored");
    let types: Vec<Type> = list_all(&mut ev, P, "", 0, 100)
        .await
        .iter()
        .map(pb::Event::r#type)
        .collect();
    assert_eq!(
        types,
        [Type::UserCreated, Type::UserDeleted, Type::UserPurged]
    );
}

async fn no_op_and_failed_writes_append_nothing(e: Engine) {
    const P: &str = "projects/ev-noop";
    let s = TestServer::start(e).await;
    let (mut c, mut g, mut ev) = (s.client(), s.groups(), s.events());

    let create_ann = pb::CreateUserRequest {
        parent: P.into(),
        user: Some(pb::User {
            display_name: "Ann".into(),
            ..user("ann@example.com")
        }),
        user_id: "ann".into(),
        request_id: "req-ann".into(),
        ..Default::default()
    };
    let ann = c
        .create_user(create_ann.clone())
        .await
        .expect("create ann")
        .into_inner();
    let create_bob = pb::BatchCreateUsersRequest {
        parent: P.into(),
        requests: vec![pb::CreateUserRequest {
            user: Some(user("bob@example.com")),
            user_id: "bob".into(),
            ..Default::default()
        }],
        request_id: "req-batch".into(),
    };
    let bob = c
        .batch_create_users(create_bob.clone())
        .await
        .expect("create bob")
        .into_inner()
        .users
        .remove(0);
    let cat = create_in(&mut c, P, user("cat@example.com")).await;
    delete(&mut c, &cat.name, false).await;
    let create_eng = pb::CreateGroupRequest {
        parent: P.into(),
        group_id: "eng".into(),
        request_id: "req-eng".into(),
        group: Some(pb::Group {
            display_name: "Eng".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let eng = g
        .create_group(create_eng.clone())
        .await
        .expect("create eng")
        .into_inner();
    g.add_group_members(pb::AddGroupMembersRequest {
        group: eng.name.clone(),
        members: vec![ann.name.clone()],
    })
    .await
    .expect("add ann");
    let mut h = 6;
    assert_eq!(head(&mut ev, P).await, h);

    // Writes that change nothing.
    let same = c
        .update_user(pb::UpdateUserRequest {
            user: Some(pb::User {
                name: ann.name.clone(),
                display_name: "Ann".into(),
                ..Default::default()
            }),
            update_mask: None,
        })
        .await
        .expect("update to the same value")
        .into_inner();
    assert_eq!(same.etag, ann.etag);
    assert_eq!(head(&mut ev, P).await, h, "an update to the same value");
    c.update_user(pb::UpdateUserRequest {
        user: Some(pb::User {
            name: ann.name.clone(),
            ..Default::default()
        }),
        update_mask: Some(FieldMask {
            paths: vec!["metadata.absent".into()],
        }),
    })
    .await
    .expect("remove an absent metadata key");
    assert_eq!(head(&mut ev, P).await, h, "removing an absent key");
    c.activate_user(pb::ActivateUserRequest {
        name: ann.name.clone(),
        ..Default::default()
    })
    .await
    .expect("activate an active user");
    assert_eq!(head(&mut ev, P).await, h, "activating an active user");
    let disable = pb::DisableUserRequest {
        name: bob.name.clone(),
        ..Default::default()
    };
    c.disable_user(disable.clone()).await.expect("disable bob");
    h += 1;
    assert_eq!(head(&mut ev, P).await, h, "disabling an active user");
    c.disable_user(disable).await.expect("disable bob again");
    assert_eq!(head(&mut ev, P).await, h, "disabling a disabled user");
    c.delete_user(pb::DeleteUserRequest {
        name: cat.name.clone(),
        allow_missing: true,
        ..Default::default()
    })
    .await
    .expect("delete a deleted user with allow_missing");
    assert_eq!(head(&mut ev, P).await, h, "deleting a deleted user");
    c.delete_user(pb::DeleteUserRequest {
        name: uname(P, "nobody"),
        allow_missing: true,
        ..Default::default()
    })
    .await
    .expect("delete a missing user with allow_missing");
    assert_eq!(head(&mut ev, P).await, h, "deleting a missing user");
    let again = c
        .create_user(create_ann.clone())
        .await
        .expect("replay of CreateUser")
        .into_inner();
    assert_eq!(again.name, ann.name);
    assert_eq!(head(&mut ev, P).await, h, "a replayed CreateUser");
    let again = c
        .batch_create_users(create_bob)
        .await
        .expect("replay of BatchCreateUsers")
        .into_inner();
    assert_eq!(again.users[0].name, bob.name);
    assert_eq!(head(&mut ev, P).await, h, "a replayed BatchCreateUsers");
    let again = g
        .create_group(create_eng)
        .await
        .expect("replay of CreateGroup")
        .into_inner();
    assert_eq!(again.name, eng.name);
    assert_eq!(head(&mut ev, P).await, h, "a replayed CreateGroup");
    c.create_user(pb::CreateUserRequest {
        parent: P.into(),
        user: Some(user("dry@example.com")),
        validate_only: true,
        ..Default::default()
    })
    .await
    .expect("validate_only CreateUser");
    g.create_group(pb::CreateGroupRequest {
        parent: P.into(),
        group_id: "dry".into(),
        group: Some(pb::Group::default()),
        validate_only: true,
        ..Default::default()
    })
    .await
    .expect("validate_only CreateGroup");
    assert_eq!(head(&mut ev, P).await, h, "validate_only");
    g.update_group(pb::UpdateGroupRequest {
        group: Some(pb::Group {
            name: eng.name.clone(),
            display_name: "Eng".into(),
            ..Default::default()
        }),
        update_mask: Some(FieldMask {
            paths: vec!["display_name".into()],
        }),
    })
    .await
    .expect("update a group to the same value");
    assert_eq!(
        head(&mut ev, P).await,
        h,
        "a group update to the same value"
    );
    g.add_group_members(pb::AddGroupMembersRequest {
        group: eng.name.clone(),
        members: vec![ann.name.clone()],
    })
    .await
    .expect("add a present member");
    assert_eq!(head(&mut ev, P).await, h, "adding a present member");
    g.remove_group_members(pb::RemoveGroupMembersRequest {
        group: eng.name.clone(),
        members: vec![bob.name.clone()],
    })
    .await
    .expect("remove an absent member");
    assert_eq!(head(&mut ev, P).await, h, "removing an absent member");
    g.delete_group(pb::DeleteGroupRequest {
        name: gname(P, "nothing"),
        allow_missing: true,
        ..Default::default()
    })
    .await
    .expect("delete a missing group with allow_missing");
    assert_eq!(head(&mut ev, P).await, h, "deleting a missing group");

    // Writes that fail.
    refused(
        c.create_user(pb::CreateUserRequest {
            parent: P.into(),
            user: Some(user("ann@example.com")),
            ..Default::default()
        })
        .await,
        Code::AlreadyExists,
    );
    refused(
        c.create_user(pb::CreateUserRequest {
            parent: P.into(),
            user: Some(user("ann2@example.com")),
            user_id: "ann".into(),
            ..Default::default()
        })
        .await,
        Code::AlreadyExists,
    );
    refused(
        c.create_user(pb::CreateUserRequest {
            parent: P.into(),
            user: Some(user("other@example.com")),
            request_id: "req-ann".into(),
            ..Default::default()
        })
        .await,
        Code::FailedPrecondition,
    );
    refused(
        c.batch_create_users(pb::BatchCreateUsersRequest {
            parent: P.into(),
            requests: ["new@example.com", "bob@example.com"]
                .map(|email| pb::CreateUserRequest {
                    user: Some(user(email)),
                    ..Default::default()
                })
                .into(),
            ..Default::default()
        })
        .await,
        Code::AlreadyExists,
    );
    assert_eq!(head(&mut ev, P).await, h, "refused creates");
    let stale = ann.etag.clone();
    rename(&mut c, &ann.name, "Ann B").await;
    h += 1;
    assert_eq!(head(&mut ev, P).await, h, "a rename");
    let mut outdated = rename_req(&ann.name, "Ann C");
    outdated.user.as_mut().expect("a user").etag = stale.clone();
    refused(c.update_user(outdated).await, Code::Aborted);
    refused(
        c.delete_user(pb::DeleteUserRequest {
            name: ann.name.clone(),
            etag: stale,
            ..Default::default()
        })
        .await,
        Code::Aborted,
    );
    refused(
        c.update_user(rename_req(&cat.name, "Deleted Cat")).await,
        Code::FailedPrecondition,
    );
    refused(
        c.disable_user(pb::DisableUserRequest {
            name: cat.name.clone(),
            ..Default::default()
        })
        .await,
        Code::FailedPrecondition,
    );
    refused(
        c.undelete_user(pb::UndeleteUserRequest {
            name: ann.name.clone(),
            ..Default::default()
        })
        .await,
        Code::AlreadyExists,
    );
    refused(
        c.delete_user(pb::DeleteUserRequest {
            name: cat.name.clone(),
            ..Default::default()
        })
        .await,
        Code::NotFound,
    );
    assert_eq!(head(&mut ev, P).await, h, "refused user writes");
    refused(
        g.create_group(pb::CreateGroupRequest {
            parent: P.into(),
            group_id: "eng".into(),
            group: Some(pb::Group::default()),
            ..Default::default()
        })
        .await,
        Code::AlreadyExists,
    );
    let stale = pb::Group {
        name: eng.name.clone(),
        display_name: "Stale".into(),
        etag: "W/\"stale\"".into(),
        ..Default::default()
    };
    assert!(
        g.update_group(pb::UpdateGroupRequest {
            group: Some(stale),
            update_mask: None,
        })
        .await
        .is_err(),
        "an update with another etag"
    );
    assert!(
        g.add_group_members(pb::AddGroupMembersRequest {
            group: eng.name.clone(),
            members: vec![bob.name.clone(), uname(P, "nobody")],
        })
        .await
        .is_err(),
        "adding a user that does not exist"
    );
    assert_eq!(head(&mut ev, P).await, h, "refused group writes");
}

// ---------------------------------------------------------------- ListEvents

/// Twenty events in `parent`: ten users created in one batch (1-10), four
/// of them renamed (11-14), three soft-deleted (15-17), two erased (18-19,
/// the first soft-deleted before) and a group (20).
async fn twenty_events(s: &TestServer, parent: &str) -> Vec<pb::Event> {
    let (mut c, mut g, mut ev) = (s.client(), s.groups(), s.events());
    let users = batch_create(&mut c, parent, 10, "u").await;
    for u in &users[..4] {
        rename(&mut c, &u.name, "Renamed").await;
    }
    for u in &users[4..7] {
        delete(&mut c, &u.name, false).await;
    }
    for u in &users[6..8] {
        delete(&mut c, &u.name, true).await;
    }
    create_group(&mut g, parent, "team").await;
    let all = list_all(&mut ev, parent, "", 0, 1000).await;
    assert_eq!(revisions(&all), span(1, 20));
    all
}

async fn list_events_pages_in_order(e: Engine) {
    const P: &str = "projects/ev-pages";
    let s = TestServer::start(e).await;
    let all = twenty_events(&s, P).await;
    let mut ev = s.events();

    // Pages of 3: every event once, in order, the token empty at the head.
    let mut req = list_req(P, 0, 3);
    let mut paged = Vec::new();
    let mut pages = 0;
    loop {
        let page = list_page(&mut ev, req.clone()).await;
        pages += 1;
        assert!(page.events.len() <= 3, "{} events", page.events.len());
        assert_eq!(page.head_revision, 20);
        paged.extend(page.events);
        if page.next_page_token.is_empty() {
            break;
        }
        req.page_token = page.next_page_token;
    }
    assert_eq!(paged, all);
    assert_eq!(pages, 7);

    // The page size may change between pages.
    let first = list_page(&mut ev, list_req(P, 0, 3)).await;
    assert_eq!(revisions(&first.events), [1, 2, 3]);
    let second = list_page(
        &mut ev,
        pb::ListEventsRequest {
            page_token: first.next_page_token,
            ..list_req(P, 0, 7)
        },
    )
    .await;
    assert_eq!(revisions(&second.events), span(4, 10));

    // From the middle; the default page size holds all twenty.
    assert_eq!(list_all(&mut ev, P, "", 15, 2).await, all[15..].to_vec());
    let whole = list_page(&mut ev, list_req(P, 0, 0)).await;
    assert_eq!(whole.events, all);
    assert!(whole.next_page_token.is_empty());
    assert_eq!(whole.head_revision, 20);

    // At the head: nothing, no token.
    let at_head = list_page(&mut ev, list_req(P, 20, 5)).await;
    assert!(at_head.events.is_empty());
    assert!(at_head.next_page_token.is_empty());
    assert_eq!(at_head.head_revision, 20);

    // A project without events.
    let none = list_page(&mut ev, list_req("projects/ev-pages-none", 0, 0)).await;
    assert!(none.events.is_empty());
    assert!(none.next_page_token.is_empty());
    assert_eq!(none.head_revision, 0);
}

/// ListEvents with `filter`, in pages of several sizes and from the middle,
/// returns exactly the `count` events of `all` that `keep` selects.
async fn filtered(
    ev: &mut Events,
    filter: &str,
    all: &[pb::Event],
    count: usize,
    keep: impl Fn(&pb::Event) -> bool,
) {
    let parent = all[0].resource.split("/users/").next().expect("a name");
    let mut want = Vec::new();
    for e in all {
        if keep(e) {
            want.push(e.clone());
        }
    }
    assert_eq!(want.len(), count, "{filter}: the test's own expectation");
    for page_size in [1, 4, 100] {
        assert_eq!(
            list_all(ev, parent, filter, 0, page_size).await,
            want,
            "{filter} in pages of {page_size}"
        );
    }
    let after = all.len() as i64 / 2;
    let tail: Vec<pb::Event> = want
        .iter()
        .filter(|e| e.revision > after)
        .cloned()
        .collect();
    assert_eq!(
        list_all(ev, parent, filter, after, 3).await,
        tail,
        "{filter} after {after}"
    );
}

async fn list_events_filters(e: Engine) {
    const P: &str = "projects/ev-filter";
    let s = TestServer::start(e).await;
    let all = twenty_events(&s, P).await;
    let mut ev = s.events();
    let first = all[0].resource.clone();
    let users = format!("{P}/users/");

    filtered(
        &mut ev,
        "type = USER_DELETED OR type = USER_PURGED",
        &all,
        5,
        |e| matches!(e.r#type(), Type::UserDeleted | Type::UserPurged),
    )
    .await;
    filtered(
        &mut ev,
        &format!("resource = \"{P}/users/*\""),
        &all,
        19,
        |e| e.resource.starts_with(&users),
    )
    .await;
    filtered(&mut ev, "NOT type = USER_CREATED", &all, 10, |e| {
        e.r#type() != Type::UserCreated
    })
    .await;
    filtered(
        &mut ev,
        &format!("type != USER_CREATED AND resource = \"{P}/groups/*\""),
        &all,
        1,
        |e| e.r#type() == Type::GroupCreated,
    )
    .await;
    filtered(&mut ev, &format!("resource = \"{first}\""), &all, 2, |e| {
        e.resource == first
    })
    .await;
    filtered(
        &mut ev,
        &format!("(type = USER_UPDATED OR type = USER_PURGED) AND NOT resource = \"{first}\""),
        &all,
        5,
        |e| matches!(e.r#type(), Type::UserUpdated | Type::UserPurged) && e.resource != first,
    )
    .await;
    filtered(&mut ev, "type = GROUP_DELETED", &all, 0, |e| {
        e.r#type() == Type::GroupDeleted
    })
    .await;
}

/// ListEvents refuses `req` with INVALID_ARGUMENT naming `fields`.
async fn invalid(ev: &mut Events, req: pb::ListEventsRequest, fields: &[&str]) {
    let s = assert_error(
        ev.list_events(req.clone()).await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(bad_fields(&s), fields, "{req:?}");
}

async fn list_and_watch_errors(e: Engine) {
    const P: &str = "projects/ev-errors";
    let s = TestServer::start(e).await;
    let (mut c, mut ev) = (s.client(), s.events());
    batch_create(&mut c, P, 5, "err").await;
    let req = |filter: &str, after: i64, page_size: i32| pb::ListEventsRequest {
        filter: filter.into(),
        ..list_req(P, after, page_size)
    };

    for filter in [
        "type = NOPE",
        "type = \"USER_*\"",
        "email = \"a@example.com\"",
        "type =",
        "type = USER_CREATED AND",
    ] {
        let st = assert_error(
            ev.list_events(req(filter, 0, 0)).await,
            Code::InvalidArgument,
            "INVALID_FILTER",
        );
        assert_eq!(bad_fields(&st), ["filter"], "{filter}: {st:?}");
        let st = watch_error(&mut ev, watch_req(P, 0, filter)).await;
        assert_eq!(st.code(), Code::InvalidArgument, "{filter}: {st:?}");
        assert_eq!(reason(&st), "INVALID_FILTER", "{filter}: {st:?}");
        assert_eq!(bad_fields(&st), ["filter"], "{filter}: {st:?}");
    }

    invalid(&mut ev, req("", 0, -1), &["page_size"]).await;
    invalid(&mut ev, req("", -1, 0), &["after_revision"]).await;
    invalid(&mut ev, req("", -1, -1), &["after_revision", "page_size"]).await;
    invalid(&mut ev, req("type = NOPE", 0, -1), &["filter", "page_size"]).await;
    for parent in ["", "acme", "projects/", "projects/a/b"] {
        invalid(
            &mut ev,
            pb::ListEventsRequest {
                parent: parent.into(),
                ..req("", 0, 0)
            },
            &["parent"],
        )
        .await;
        let st = watch_error(&mut ev, watch_req(parent, 0, "")).await;
        assert_eq!(st.code(), Code::InvalidArgument, "{parent:?}: {st:?}");
        assert_eq!(bad_fields(&st), ["parent"], "{parent:?}: {st:?}");
    }
    let st = watch_error(&mut ev, watch_req(P, -1, "")).await;
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
    assert_eq!(bad_fields(&st), ["after_revision"], "{st:?}");

    // A page token belongs to its parent and filter.
    let first = list_page(&mut ev, req("", 0, 2)).await;
    assert!(!first.next_page_token.is_empty());
    let token = first.next_page_token;
    let second = list_page(
        &mut ev,
        pb::ListEventsRequest {
            page_token: token.clone(),
            ..req("", 0, 2)
        },
    )
    .await;
    assert_eq!(revisions(&second.events), [3, 4]);
    for bad in [
        pb::ListEventsRequest {
            page_token: "garbage".into(),
            ..req("", 0, 2)
        },
        pb::ListEventsRequest {
            page_token: token.clone(),
            ..req("type = USER_CREATED", 0, 2)
        },
        pb::ListEventsRequest {
            page_token: token.clone(),
            ..list_req("projects/ev-errors-other", 0, 2)
        },
    ] {
        let st = assert_error(
            ev.list_events(bad.clone()).await,
            Code::InvalidArgument,
            "INVALID_PAGE_TOKEN",
        );
        assert_eq!(bad_fields(&st), ["page_token"], "{bad:?}");
    }

    // Beyond the head.
    let st = assert_error(
        ev.list_events(req("", 6, 0)).await,
        Code::OutOfRange,
        "REVISION_AHEAD",
    );
    assert_eq!(meta(&st, "head_revision"), "5");
    assert_eq!(bad_fields(&st), ["after_revision"]);
    let st = watch_error(&mut ev, watch_req(P, 6, "")).await;
    assert_eq!(st.code(), Code::OutOfRange, "{st:?}");
    assert_eq!(reason(&st), "REVISION_AHEAD", "{st:?}");
    assert_eq!(meta(&st, "head_revision"), "5");
    assert_error(
        ev.list_events(list_req("projects/ev-errors-none", 1, 0))
            .await,
        Code::OutOfRange,
        "REVISION_AHEAD",
    );

    // Larger pages than the maximum are clamped, not refused.
    let big = list_page(&mut ev, req("", 0, 5000)).await;
    assert_eq!(revisions(&big.events), span(1, 5));
}

// --------------------------------------------------------------- WatchEvents

async fn watch_replays_then_follows_live(e: Engine) {
    const P: &str = "projects/ev-watch";
    let s = TestServer::start(e).await;
    let (mut c, mut ev) = (s.client(), s.events());
    let users = batch_create(&mut c, P, 5, "watch").await;

    let mut w = watch(&mut ev, P, 0, "").await;
    let replay = follow(&mut w, 5).await;
    assert_eq!(replay, list_all(&mut ev, P, "", 0, 100).await);

    // Caught up: each write arrives on its own, within a second of its ack.
    for (i, u) in users.iter().take(3).enumerate() {
        let renamed = rename(&mut c, &u.name, "Live").await;
        let acked = Instant::now();
        let m = next_events(&mut w, WAIT).await;
        let took = acked.elapsed();
        assert!(
            took < LIVE,
            "a live event took {took:?} after the write's ack"
        );
        let want = 6 + i as i64;
        assert_eq!(revisions(&m.events), [want]);
        assert_eq!(m.head_revision, want);
        assert_eq!(m.events[0].r#type(), Type::UserUpdated);
        assert_eq!(user_of(&m.events[0]), &renamed);
    }

    // A batch while watching: every event once, in order.
    batch_create(&mut c, P, 30, "more").await;
    let more = follow(&mut w, 38).await;
    assert_eq!(revisions(&more), span(9, 38));
    assert_eq!(more, list_all(&mut ev, P, "", 8, 100).await);
}

async fn watch_sends_idle_markers(e: Engine) {
    const P: &str = "projects/ev-markers";
    let s = TestServer::start(e).await;
    let (mut c, mut ev) = (s.client(), s.events());
    batch_create(&mut c, P, 2, "marker").await;

    // From the head: nothing to replay, a marker at once.
    let mut w = watch(&mut ev, P, 2, "").await;
    let m = next(&mut w, WAIT).await;
    assert!(m.events.is_empty(), "{m:?}");
    assert_eq!(m.head_revision, 2);
    // Idle: another marker within a few seconds, not a stream of them.
    let t = Instant::now();
    let m = next(&mut w, Duration::from_secs(7)).await;
    let gap = t.elapsed();
    assert!(m.events.is_empty(), "{m:?}");
    assert_eq!(m.head_revision, 2);
    assert!(gap > Duration::from_secs(1), "markers {gap:?} apart");

    // A project without events: a marker with head 0.
    let mut w = watch(&mut ev, "projects/ev-markers-none", 0, "").await;
    let m = next(&mut w, WAIT).await;
    assert!(m.events.is_empty(), "{m:?}");
    assert_eq!(m.head_revision, 0);

    // A filter that selects nothing: the marker still moves to the head.
    let mut w = watch(&mut ev, P, 0, "type = GROUP_DELETED").await;
    let m = next(&mut w, WAIT).await;
    assert!(m.events.is_empty(), "{m:?}");
    assert_eq!(m.head_revision, 2);
}

async fn watch_resumes_filters_and_batches(e: Engine) {
    const P: &str = "projects/ev-resume";
    let s = TestServer::start(e).await;
    let (mut c, mut ev) = (s.client(), s.events());
    let users = batch_create(&mut c, P, 10, "resume").await;
    delete(&mut c, &users[0].name, false).await;
    delete(&mut c, &users[1].name, true).await;
    rename(&mut c, &users[2].name, "Resumed").await;
    let all = list_all(&mut ev, P, "", 0, 100).await;
    assert_eq!(revisions(&all), span(1, 13));

    // Resuming after revision 7 starts at 8: nothing twice, nothing missed.
    let mut w = watch(&mut ev, P, 7, "").await;
    assert_eq!(follow(&mut w, 13).await, all[7..].to_vec());
    drop(w);
    // Resuming after the last revision seen sends only what comes after.
    let mut w = watch(&mut ev, P, 13, "").await;
    let m = next(&mut w, WAIT).await;
    assert!(m.events.is_empty(), "{m:?}");
    assert_eq!(m.head_revision, 13);
    rename(&mut c, &users[3].name, "Resumed").await;
    let m = next_events(&mut w, WAIT).await;
    assert_eq!(revisions(&m.events), [14]);
    drop(w);

    // A filter, in the replay and live.
    let mut w = watch(&mut ev, P, 0, "type = USER_DELETED OR type = USER_PURGED").await;
    let replay = follow(&mut w, 14).await;
    assert_eq!(revisions(&replay), [11, 12]);
    assert_eq!(replay, [all[10].clone(), all[11].clone()]);
    let late = create_in(&mut c, P, user("late@example.com")).await;
    delete(&mut c, &late.name, false).await;
    let m = next_events(&mut w, WAIT).await;
    assert_eq!(revisions(&m.events), [16], "{m:?}");
    assert_eq!(m.events[0].r#type(), Type::UserDeleted);
    assert_eq!(m.events[0].resource, late.name);
    assert!(m.head_revision >= 16);
    drop(w);

    // A long replay comes in messages of at most 500 events.
    batch_create(&mut c, P, 1000, "bulk").await;
    batch_create(&mut c, P, 100, "tail").await;
    let head = 16 + 1100;
    let mut w = watch(&mut ev, P, 0, "").await;
    let mut last = 0;
    let mut messages = 0;
    while last < head {
        let m = next(&mut w, WAIT).await;
        assert!(
            m.events.len() <= 500,
            "{} events in a message",
            m.events.len()
        );
        assert_eq!(
            revisions(&m.events),
            span(last + 1, last + m.events.len() as i64)
        );
        last += m.events.len() as i64;
        assert_eq!(m.head_revision, last, "an unfiltered message's head");
        messages += 1;
    }
    assert_eq!(last, head);
    assert!(messages >= 3, "{head} events in {messages} messages");

    // ListEvents clamps a page to 1000.
    let page = list_page(&mut ev, list_req(P, 0, 5000)).await;
    assert_eq!(page.events.len(), 1000);
    assert!(!page.next_page_token.is_empty());
    assert_eq!(page.head_revision, head);
}

async fn watch_ends_with_shutting_down_on_stop(e: Engine) {
    const P: &str = "projects/ev-stop";
    let s = TestServer::start(e).await;
    batch_create(&mut s.client(), P, 3, "stop").await;
    let mut w = watch(&mut s.events(), P, 0, "").await;
    assert_eq!(revisions(&follow(&mut w, 3).await), [1, 2, 3]);

    let stopping = tokio::spawn(s.stop());
    let err = loop {
        match tokio::time::timeout(WAIT, w.message()).await {
            Ok(Ok(Some(m))) => assert!(m.events.is_empty(), "{m:?}"),
            Ok(Ok(None)) => panic!("the watch ended without a status"),
            Ok(Err(st)) => break st,
            Err(_) => panic!("the watch did not end when the server stopped"),
        }
    };
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(reason(&err), "SHUTTING_DOWN");
    assert_eq!(meta(&err, "after_revision"), "3");
    let db = stopping.await.expect("stop");

    // Resumed on the restarted server.
    let s = TestServer::start_on(db, |_| {}).await;
    let mut w = watch(&mut s.events(), P, 3, "").await;
    let m = next(&mut w, WAIT).await;
    assert!(m.events.is_empty(), "{m:?}");
    assert_eq!(m.head_revision, 3);
    create_in(&mut s.client(), P, user("after@example.com")).await;
    assert_eq!(revisions(&next_events(&mut w, WAIT).await.events), [4]);
}

// ------------------------------------------------------------------- callers

async fn events_need_read_scope_and_project(e: Engine) {
    const P: &str = "projects/ev-auth";
    let keys = AuthKeys::new();
    let s = TestServer::start_authed(e, &keys).await;
    create_in(&mut s.client(), P, user("a@example.com")).await;

    for (token, code, why) in [
        (None, Code::Unauthenticated, "TOKEN_MISSING"),
        (
            Some(keys.token(&["other"], ALL_SCOPES)),
            Code::PermissionDenied,
            "PROJECT_NOT_GRANTED",
        ),
        (
            Some(keys.token(&["ev-auth"], "users.write users.admin")),
            Code::PermissionDenied,
            "SCOPE_MISSING",
        ),
    ] {
        let mut ev = s.events_with(token.as_deref());
        assert_error(ev.list_events(list_req(P, 0, 10)).await, code, why);
        let st = watch_error(&mut ev, watch_req(P, 0, "")).await;
        assert_eq!(st.code(), code, "{why}: {st:?}");
        assert_eq!(reason(&st), why, "{st:?}");
    }

    // Refused before anything is looked at: a bad request does not show.
    let other = keys.token(&["other"], "users.read");
    let mut ev = s.events_with(Some(&other));
    assert_error(
        ev.list_events(pb::ListEventsRequest {
            filter: "type = NOPE".into(),
            ..list_req(P, -1, -1)
        })
        .await,
        Code::PermissionDenied,
        "PROJECT_NOT_GRANTED",
    );
    let st = watch_error(&mut ev, watch_req(P, 99, "type = NOPE")).await;
    assert_eq!(st.code(), Code::PermissionDenied, "{st:?}");

    // users.read and the project: both methods answer.
    for token in [
        keys.token(&["ev-auth"], "users.read"),
        keys.token(&["*"], "users.read"),
    ] {
        let mut ev = s.events_with(Some(&token));
        let page = list_page(&mut ev, list_req(P, 0, 10)).await;
        assert_eq!(revisions(&page.events), [1]);
        assert_eq!(page.events[0].actor, "admin");
        let mut w = watch(&mut ev, P, 0, "").await;
        assert_eq!(revisions(&next(&mut w, WAIT).await.events), [1]);
    }
}

async fn actor_is_the_subject_of_the_writer(e: Engine) {
    const P: &str = "projects/ev-actor";
    let keys = AuthKeys::new();
    let s = TestServer::start_authed(e, &keys).await;
    let alice = keys.token_as("alice", &["ev-actor"], ALL_SCOPES);
    let bob = keys.token_as("bob", &["*"], ALL_SCOPES);
    let (mut as_alice, mut as_bob) = (s.client_with(Some(&alice)), s.client_with(Some(&bob)));

    let u = create_in(&mut as_alice, P, user("x@example.com")).await;
    rename(&mut as_bob, &u.name, "By Bob").await;
    let team = create_group(&mut s.groups_with(Some(&alice)), P, "team").await;
    s.groups_with(Some(&bob))
        .add_group_members(pb::AddGroupMembersRequest {
            group: team.name,
            members: vec![u.name.clone()],
        })
        .await
        .expect("add as bob");
    let mut acks = as_alice
        .import_users(tokio_stream::iter([pb::ImportUsersRequest {
            parent: P.into(),
            users: vec![user("imported@example.com")],
        }]))
        .await
        .expect("import as alice")
        .into_inner();
    while let Some(a) = acks.message().await.expect("import ack") {
        assert!(a.failures.is_empty(), "{:?}", a.failures);
    }
    batch_create(&mut as_bob, P, 1, "batch").await;
    delete(&mut as_alice, &u.name, true).await;

    let events = list_all(&mut s.events(), P, "", 0, 100).await;
    let actors: Vec<(Type, &str)> = events
        .iter()
        .map(|e| (e.r#type(), e.actor.as_str()))
        .collect();
    assert_eq!(
        actors,
        [
            (Type::UserCreated, "alice"),
            (Type::UserUpdated, "bob"),
            (Type::GroupCreated, "alice"),
            (Type::GroupMembersAdded, "bob"),
            (Type::UserCreated, "alice"),
            (Type::UserCreated, "bob"),
            (Type::UserPurged, "alice"),
        ]
    );
}

// ----------------------------------------------------------------- retention

async fn compacted_events_are_out_of_range(e: Engine) {
    const P: &str = "projects/ev-retention";
    let s = TestServer::start_with(e, |s| {
        s.event_retention = Duration::from_secs(1);
        s.purge_interval = Duration::from_millis(200);
    })
    .await;
    let (mut c, mut ev) = (s.client(), s.events());
    batch_create(&mut c, P, 3, "old").await;

    // Wait until all three are compacted away.
    let start = Instant::now();
    let st = loop {
        if let Err(st) = ev.list_events(list_req(P, 1, 100)).await {
            assert_eq!(st.code(), Code::OutOfRange, "{st:?}");
            assert_eq!(reason(&st), "EVENTS_COMPACTED", "{st:?}");
            if meta(&st, "oldest_revision") == "4" {
                break st;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "events older than the retention still listed after {:?}",
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(meta(&st, "head_revision"), "3");
    assert_eq!(bad_fields(&st), ["after_revision"]);
    let st = assert_error(
        ev.list_events(list_req(P, 2, 100)).await,
        Code::OutOfRange,
        "EVENTS_COMPACTED",
    );
    assert_eq!(meta(&st, "oldest_revision"), "4");

    // From the oldest available revision minus one, or from 0 (the oldest
    // kept): an empty log, at head 3.
    for after in [3, 0] {
        let page = list_page(&mut ev, list_req(P, after, 100)).await;
        assert!(page.events.is_empty());
        assert!(page.next_page_token.is_empty());
        assert_eq!(page.head_revision, 3);
    }
    let mut w = watch(&mut ev, P, 0, "").await;
    assert_eq!(next(&mut w, WAIT).await.head_revision, 3);
    drop(w);

    let st = watch_error(&mut ev, watch_req(P, 1, "")).await;
    assert_eq!(st.code(), Code::OutOfRange, "{st:?}");
    assert_eq!(reason(&st), "EVENTS_COMPACTED", "{st:?}");
    assert_eq!(meta(&st, "oldest_revision"), "4");
    assert_eq!(meta(&st, "head_revision"), "3");

    // Watching from there works, and new events still come.
    let mut w = watch(&mut ev, P, 3, "").await;
    let m = next(&mut w, WAIT).await;
    assert!(m.events.is_empty(), "{m:?}");
    assert_eq!(m.head_revision, 3);
    create_in(&mut c, P, user("new@example.com")).await;
    assert_eq!(revisions(&next_events(&mut w, WAIT).await.events), [4]);
}

// ------------------------------------------------------- export, then watch

async fn stream_users_reports_the_head_revision(e: Engine) {
    const P: &str = "projects/ev-export-head";
    const EMPTIED: &str = "projects/ev-export-head-emptied";
    let s = TestServer::start(e).await;
    let (mut c, mut ev) = (s.client(), s.events());
    let users = batch_create(&mut c, P, 5, "head").await;
    rename(&mut c, &users[0].name, "Head").await;
    assert_eq!(head(&mut ev, P).await, 6);
    let export = pb::StreamUsersRequest {
        parent: P.into(),
        batch_size: 2,
        ..Default::default()
    };

    let mut stream = c
        .stream_users(export.clone())
        .await
        .expect("export")
        .into_inner();
    let mut heads = Vec::new();
    let mut exported = 0;
    while let Some(m) = stream.message().await.expect("export message") {
        heads.push(m.head_revision);
        exported += m.users.len();
    }
    assert_eq!(exported, 5);
    assert_eq!(heads, [6, 0, 0], "the head in the first message only");

    // A resumed export reports the head again, read at the resume.
    let mut stream = c
        .stream_users(export.clone())
        .await
        .expect("export")
        .into_inner();
    let first = stream
        .message()
        .await
        .expect("export message")
        .expect("a first message");
    drop(stream);
    rename(&mut c, &users[1].name, "Moved").await;
    let mut stream = c
        .stream_users(pb::StreamUsersRequest {
            resume_token: first.resume_token,
            ..export
        })
        .await
        .expect("resumed export")
        .into_inner();
    let mut heads = Vec::new();
    while let Some(m) = stream.message().await.expect("export message") {
        heads.push(m.head_revision);
    }
    assert_eq!(heads.first(), Some(&7), "{heads:?}");
    assert!(heads[1..].iter().all(|h| *h == 0), "{heads:?}");

    // Events but no users left: one message without users, with the head.
    let u = create_in(&mut c, EMPTIED, user("gone@example.com")).await;
    delete(&mut c, &u.name, true).await;
    let mut stream = c
        .stream_users(pb::StreamUsersRequest {
            parent: EMPTIED.into(),
            ..Default::default()
        })
        .await
        .expect("export")
        .into_inner();
    let mut messages = Vec::new();
    while let Some(m) = stream.message().await.expect("export message") {
        messages.push(m);
    }
    assert_eq!(messages.len(), 1, "{messages:?}");
    assert!(messages[0].users.is_empty());
    assert_eq!(messages[0].head_revision, 2);
}

/// A user's state, as one writer of `export_then_watch_misses_nothing`
/// knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Life {
    Active,
    Disabled,
    Deleted,
}

/// Creates, renames, disables, activates, deletes, undeletes and erases its
/// own users until `stop` (and at least 20 writes); every write must succeed.
async fn churn(
    mut c: Client,
    parent: &'static str,
    w: usize,
    mine: Vec<String>,
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicUsize>,
) {
    let mut users: Vec<(String, Life)> = mine.into_iter().map(|n| (n, Life::Active)).collect();
    for step in 0usize.. {
        if step >= 20 && stop.load(Ordering::SeqCst) {
            return;
        }
        if users.is_empty() || step.is_multiple_of(5) {
            let u = create_in(
                &mut c,
                parent,
                user(&format!("churn{w}-{step}@example.com")),
            )
            .await;
            users.push((u.name, Life::Active));
        } else {
            let i = fastrand::usize(..users.len());
            let name = users[i].0.clone();
            match (users[i].1, fastrand::u8(..4)) {
                (Life::Active, 0) => {
                    delete(&mut c, &name, false).await;
                    users[i].1 = Life::Deleted;
                }
                (Life::Active, 1) => {
                    c.disable_user(pb::DisableUserRequest {
                        name,
                        ..Default::default()
                    })
                    .await
                    .expect("disable");
                    users[i].1 = Life::Disabled;
                }
                (Life::Disabled, 0) => {
                    c.activate_user(pb::ActivateUserRequest {
                        name,
                        ..Default::default()
                    })
                    .await
                    .expect("activate");
                    users[i].1 = Life::Active;
                }
                (Life::Deleted, 0 | 1) => {
                    c.undelete_user(pb::UndeleteUserRequest {
                        name,
                        ..Default::default()
                    })
                    .await
                    .expect("undelete");
                    users[i].1 = Life::Active;
                }
                (Life::Deleted, _) | (Life::Active, 2) => {
                    delete(&mut c, &name, true).await;
                    users.swap_remove(i);
                }
                _ => {
                    rename(&mut c, &name, &format!("w{w} step {step}")).await;
                }
            }
        }
        writes.fetch_add(1, Ordering::SeqCst);
    }
}

/// Applies user events to an export, as a consumer does.
fn apply(state: &mut BTreeMap<String, pb::User>, events: &[pb::Event]) {
    for e in events {
        match e.r#type() {
            Type::UserPurged => {
                state.remove(&e.resource);
            }
            Type::UserCreated
            | Type::UserUpdated
            | Type::UserDeleted
            | Type::UserUndeleted
            | Type::UserStateChanged => {
                let u = user_of(e);
                assert_eq!(u.name, e.resource, "{e:?}");
                state.insert(e.resource.clone(), u.clone());
            }
            other => panic!("no writer made a {other:?}: {e:?}"),
        }
    }
}

fn etags(users: &BTreeMap<String, pb::User>) -> BTreeMap<String, String> {
    users
        .iter()
        .map(|(name, u)| (name.clone(), u.etag.clone()))
        .collect()
}

async fn export_then_watch_misses_nothing(e: Engine) {
    const P: &str = "projects/ev-export";
    const WRITERS: usize = 3;
    let s = TestServer::start(e).await;
    let (mut c, mut ev) = (s.client(), s.events());
    let base = batch_create(&mut c, P, 300, "base").await;

    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let mine = base
            .iter()
            .skip(w)
            .step_by(WRITERS)
            .map(|u| u.name.clone())
            .collect();
        writers.push(tokio::spawn(churn(
            s.client(),
            P,
            w,
            mine,
            stop.clone(),
            writes.clone(),
        )));
    }
    let start = Instant::now();
    while writes.load(Ordering::SeqCst) < 10 {
        assert!(start.elapsed() < WAIT, "the writers do not write");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // Export while they write, slowly enough for writes to land in between.
    let mut export = c
        .stream_users(pb::StreamUsersRequest {
            parent: P.into(),
            show_deleted: true,
            batch_size: 20,
            ..Default::default()
        })
        .await
        .expect("export")
        .into_inner();
    let mut from = None;
    let mut snapshot = BTreeMap::new();
    while let Some(m) = export.message().await.expect("export message") {
        match from {
            None => from = Some(m.head_revision),
            Some(_) => assert_eq!(m.head_revision, 0, "a head after the first message"),
        }
        for u in m.users {
            snapshot.insert(u.name.clone(), u);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let from = from.expect("the export sent a message");
    assert!(from >= 300, "the head before the export: {from}");
    stop.store(true, Ordering::SeqCst);
    for h in writers {
        h.await.expect("writer");
    }
    let head = head(&mut ev, P).await;
    eprintln!(
        "{e:?}: export from revision {from}; {} writes; head {head}",
        writes.load(Ordering::SeqCst)
    );
    assert!(head > from, "nothing written during the export");

    let stored: BTreeMap<String, String> = crate::list::list_all(
        &mut c,
        pb::ListUsersRequest {
            parent: P.into(),
            page_size: 1000,
            show_deleted: true,
            ..Default::default()
        },
    )
    .await
    .into_iter()
    .map(|u| (u.name, u.etag))
    .collect();

    // The export plus ListEvents after its head.
    let events = list_all(&mut ev, P, "", from, 200).await;
    assert_eq!(revisions(&events), span(from + 1, head));
    let mut by_list = snapshot.clone();
    apply(&mut by_list, &events);
    assert_eq!(etags(&by_list), stored, "export + ListEvents");

    // The export plus WatchEvents after its head.
    let mut w = watch(&mut ev, P, from, "").await;
    let watched = follow(&mut w, head).await;
    assert_eq!(watched, events);
    let mut by_watch = snapshot;
    apply(&mut by_watch, &watched);
    assert_eq!(etags(&by_watch), stored, "export + WatchEvents");
}

// ---------------------------------------------- two replicas (PostgreSQL)

/// 50 writes, creates and renames of its own users; how many of each.
async fn replica_writer(mut c: Client, parent: &'static str, t: usize) -> (i64, i64) {
    let mut mine: Vec<String> = Vec::new();
    let (mut creates, mut updates) = (0, 0);
    for i in 0..50usize {
        if mine.is_empty() || i.is_multiple_of(3) {
            let u = create_in(&mut c, parent, user(&format!("r{t}-{i}@example.com"))).await;
            mine.push(u.name);
            creates += 1;
        } else {
            let name = &mine[fastrand::usize(..mine.len())];
            rename(&mut c, name, &format!("t{t} i{i}")).await;
            updates += 1;
        }
    }
    (creates, updates)
}

/// What `read_contiguously` read.
struct ReadLog {
    last: i64,
    by_type: BTreeMap<Type, i64>,
    pages: usize,
}

/// Reads `parent`'s log after `last` from both replicas in turn until
/// `done` and the head is reached; every page must continue the last one.
async fn read_contiguously(
    mut replicas: [Events; 2],
    parent: &'static str,
    mut last: i64,
    done: Arc<AtomicBool>,
) -> ReadLog {
    let mut by_type: BTreeMap<Type, i64> = BTreeMap::new();
    let mut pages: usize = 0;
    loop {
        let finished = done.load(Ordering::SeqCst);
        let replica = pages % 2;
        let page = match replicas[replica]
            .list_events(list_req(parent, last, 37))
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) => panic!("ListEvents after {last} from replica {replica}: {s:?}"),
        };
        pages += 1;
        for e in &page.events {
            assert_eq!(
                e.revision,
                last + 1,
                "replica {replica}: a page after {last} is not contiguous"
            );
            last = e.revision;
            *by_type.entry(e.r#type()).or_default() += 1;
        }
        assert!(page.head_revision >= last);
        if finished && last == page.head_revision {
            return ReadLog {
                last,
                by_type,
                pages,
            };
        }
        if page.events.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_keep_one_gapless_log() {
    if postgres_url().is_none() {
        return;
    }
    const P: &str = "projects/ev-replicas";
    let db = TestDb::new(Engine::Postgres).await;
    let a = TestServer::start_on(TestDb::at(db.url.clone()), |_| {}).await;
    let b = TestServer::start_on(TestDb::at(db.url.clone()), |_| {}).await;

    // A watcher on A sees a write made through B within a second.
    let mut w = watch(&mut a.events(), P, 0, "").await;
    let m = next(&mut w, WAIT).await;
    assert!(m.events.is_empty(), "{m:?}");
    assert_eq!(m.head_revision, 0);
    let first = create_in(&mut b.client(), P, user("first@example.com")).await;
    let acked = Instant::now();
    let m = next_events(&mut w, WAIT).await;
    let took = acked.elapsed();
    assert!(
        took < LIVE,
        "a write through B reached A's watcher after {took:?}"
    );
    assert_eq!(revisions(&m.events), [1]);
    assert_eq!(m.events[0].resource, first.name);

    // Writers on both replicas at once; a reader checks every page.
    let done = Arc::new(AtomicBool::new(false));
    let reader = tokio::spawn(read_contiguously(
        [a.events(), b.events()],
        P,
        1,
        done.clone(),
    ));
    let mut writers = JoinSet::new();
    for t in 0..4usize {
        let c = if t.is_multiple_of(2) {
            a.client()
        } else {
            b.client()
        };
        writers.spawn(replica_writer(c, P, t));
    }
    let (mut creates, mut updates) = (0, 0);
    while let Some(r) = writers.join_next().await {
        let (cr, up) = r.expect("writer");
        creates += cr;
        updates += up;
    }
    done.store(true, Ordering::SeqCst);
    let read = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("the reader reached the head")
        .expect("reader");
    eprintln!(
        "{creates} creates, {updates} updates; read in {} pages",
        read.pages
    );
    let acknowledged = 1 + creates + updates;
    assert_eq!(read.last, acknowledged, "one event per acknowledged write");
    assert_eq!(read.by_type.get(&Type::UserCreated), Some(&creates));
    assert_eq!(read.by_type.get(&Type::UserUpdated), Some(&updates));
    assert_eq!(read.by_type.len(), 2, "{:?}", read.by_type);
    assert_eq!(head(&mut a.events(), P).await, acknowledged);
    assert_eq!(head(&mut b.events(), P).await, acknowledged);

    // A's watcher, slow meanwhile, has the same log without a gap.
    let rest = follow(&mut w, acknowledged).await;
    assert_eq!(revisions(&rest), span(2, acknowledged));
    drop(w);
    a.stop().await;
    b.stop().await;
}

// ------------------------------------------------------------------ SIGKILL

type Key = (String, Type);

/// The writes of one `acked_writer`: acknowledged ones by (resource, type),
/// and the one in flight at the kill.
struct Acked {
    writes: BTreeMap<Key, usize>,
    in_flight: Option<Key>,
}

/// Creates, renames twice and soft-deletes users `w{w}-0`, `w{w}-1`, ...
/// until a write fails (after the kill).
async fn acked_writer(
    mut c: Client,
    parent: &'static str,
    w: usize,
    count: Arc<AtomicUsize>,
    killed: Arc<AtomicBool>,
) -> Acked {
    let mut writes: BTreeMap<Key, usize> = BTreeMap::new();
    for i in 0.. {
        let id = format!("w{w}-{i}");
        let name = uname(parent, &id);
        for step in 0..4 {
            let (ty, reply) = match step {
                0 => (
                    Type::UserCreated,
                    c.create_user(pb::CreateUserRequest {
                        parent: parent.into(),
                        user: Some(user(&format!("{id}@crash.example"))),
                        user_id: id.clone(),
                        ..Default::default()
                    })
                    .await,
                ),
                1 | 2 => (
                    Type::UserUpdated,
                    c.update_user(rename_req(&name, &format!("gen{step}")))
                        .await,
                ),
                _ => (
                    Type::UserDeleted,
                    c.delete_user(pb::DeleteUserRequest {
                        name: name.clone(),
                        ..Default::default()
                    })
                    .await,
                ),
            };
            let key = (name.clone(), ty);
            match reply {
                Ok(_) => {
                    *writes.entry(key).or_default() += 1;
                    count.fetch_add(1, Ordering::SeqCst);
                }
                Err(e) => {
                    assert!(
                        killed.load(Ordering::SeqCst),
                        "{ty:?} of {name} failed before the kill: {e:?}"
                    );
                    return Acked {
                        writes,
                        in_flight: Some(key),
                    };
                }
            }
        }
    }
    unreachable!("a writer stops at its first failed write")
}

/// The revisions a watch delivers until it breaks.
async fn record_revisions(mut w: Watch) -> Vec<i64> {
    let mut seen = Vec::new();
    while let Ok(Some(m)) = w.message().await {
        seen.extend(m.events.iter().map(|e| e.revision));
    }
    seen
}

async fn sigkill_keeps_one_event_per_acknowledged_write(e: Engine) {
    const P: &str = "projects/ev-crash";
    let db = TestDb::new(e).await;
    let mut server = Process::start("events-crash", &db.url, &[]).await;
    let watcher = tokio::spawn(record_revisions(
        watch(&mut events_of(&server).await, P, 0, "").await,
    ));
    let count = Arc::new(AtomicUsize::new(0));
    let killed = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..3 {
        let c = server.client().await;
        writers.push(tokio::spawn(acked_writer(
            c,
            P,
            w,
            count.clone(),
            killed.clone(),
        )));
    }
    let start = Instant::now();
    while count.load(Ordering::SeqCst) < 60 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "only {} writes acknowledged",
            count.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    killed.store(true, Ordering::SeqCst);
    server.kill();

    let mut acked: BTreeMap<Key, usize> = BTreeMap::new();
    let mut in_flight = BTreeSet::new();
    for h in writers {
        let a = tokio::time::timeout(WAIT, h)
            .await
            .expect("a write still waits after the kill")
            .expect("writer");
        for (k, n) in a.writes {
            *acked.entry(k).or_default() += n;
        }
        in_flight.extend(a.in_flight);
    }
    let seen = tokio::time::timeout(WAIT, watcher)
        .await
        .expect("the watch did not end with the server")
        .expect("watcher");
    let last = seen.last().copied().unwrap_or(0);
    assert_eq!(seen, span(1, last), "the watcher saw a gap or a repeat");

    let server = Process::start("events-restarted", &db.url, &[]).await;
    let mut ev = events_of(&server).await;
    let events = list_all(&mut ev, P, "", 0, 1000).await;
    let head = events.len() as i64;
    assert_eq!(revisions(&events), span(1, head), "the log has a gap");
    assert!(
        head >= last,
        "the watcher saw {last}, the log ends at {head}"
    );
    eprintln!(
        "{e:?}: {} writes acknowledged, {} in flight, {head} events; the watcher saw {last}",
        acked.values().sum::<usize>(),
        in_flight.len()
    );

    // Every acknowledged write has its event; one in flight at most one.
    let mut logged: BTreeMap<Key, usize> = BTreeMap::new();
    for e in &events {
        *logged.entry((e.resource.clone(), e.r#type())).or_default() += 1;
    }
    let keys: BTreeSet<&Key> = acked.keys().chain(logged.keys()).collect();
    let mut problems = Vec::new();
    for k in keys {
        let want = acked.get(k).copied().unwrap_or(0);
        let got = logged.get(k).copied().unwrap_or(0);
        let flying = in_flight.contains(k);
        let ok = got == want || (flying && got == want + 1);
        if !ok {
            problems.push(format!(
                "{k:?}: {got} events for {want} acknowledged writes (in flight: {flying})"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );

    // The watcher resumes after its last revision: the next one, then every
    // one through the head.
    let mut w = watch(&mut ev, P, last, "").await;
    assert_eq!(revisions(&follow(&mut w, head).await), span(last + 1, head));
}

// ---------------------------------------------------------------- NATS relay

/// The NATS server of the machine; the relay tests fail without it.
async fn nats() -> async_nats::Client {
    match tokio::time::timeout(WAIT, async_nats::connect(NATS_URL)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => panic!("NATS JetStream must run on {NATS_URL}: {e}"),
        Err(_) => panic!("NATS on {NATS_URL} did not answer within {WAIT:?}"),
    }
}

/// A subject prefix of the test's own, and the name of the stream the relay
/// creates for it.
fn relay_prefix() -> (String, String) {
    let prefix = format!("test.{}", uuid::Uuid::now_v7().simple());
    let stream = prefix.replace('.', "_").to_uppercase();
    (prefix, stream)
}

fn relay_to(prefix: String) -> impl FnOnce(&mut Settings) {
    move |s: &mut Settings| {
        s.events_nats_url = Some(NATS_URL.into());
        s.events_nats_subject_prefix = prefix;
    }
}

/// One message of the relay's stream: subject, `Nats-Msg-Id`, event.
type Published = (String, String, pb::Event);

/// Waits (at most 30 s) until stream `name` holds `n` messages, then reads
/// all of them, in stream order.
async fn published(js: &jetstream::Context, name: &str, n: u64) -> Vec<Published> {
    let start = Instant::now();
    let stream = loop {
        if let Ok(mut stream) = js.get_stream(name).await {
            let info = stream.info().await.expect("stream info");
            if info.state.messages >= n {
                break stream;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "stream {name} did not get {n} messages"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let state = &stream.cached_info().state;
    let mut out = Vec::new();
    for seq in state.first_sequence..=state.last_sequence {
        let m = stream
            .get_raw_message(seq)
            .await
            .unwrap_or_else(|e| panic!("message {seq} of {name}: {e}"));
        let id = m
            .headers
            .get(async_nats::header::NATS_MESSAGE_ID)
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        let event = pb::Event::decode(&m.payload[..])
            .unwrap_or_else(|e| panic!("message {seq} of {name} is no users.v1.Event: {e}"));
        out.push((m.subject.as_str().to_owned(), id, event));
    }
    out
}

/// The messages of `parent` are on `{prefix}.{project}`, each revision
/// once and in order, equal to what ListEvents returns, with the event id as
/// `Nats-Msg-Id`.
#[track_caller]
fn check_published(got: &[Published], prefix: &str, parent: &str, want: &[pb::Event]) {
    let subject = format!("{prefix}.{}", parent.trim_start_matches("projects/"));
    let mine: Vec<&Published> = got.iter().filter(|(s, _, _)| *s == subject).collect();
    for (_, id, e) in &mine {
        assert_eq!(id, &e.event_id, "Nats-Msg-Id of revision {}", e.revision);
    }
    let events: Vec<&pb::Event> = mine.iter().map(|(_, _, e)| e).collect();
    assert_eq!(
        events.iter().map(|e| e.revision).collect::<Vec<_>>(),
        span(1, want.len() as i64),
        "revisions on {subject}"
    );
    assert_eq!(
        events,
        want.iter().collect::<Vec<_>>(),
        "events on {subject}"
    );
}

async fn relay_publishes_each_event_once_across_restarts(e: Engine) {
    const P: &str = "projects/ev-relay";
    const Q: &str = "projects/ev-relay-other";
    let js = jetstream::new(nats().await);
    let (prefix, stream) = relay_prefix();

    let s = TestServer::start_with(e, relay_to(prefix.clone())).await;
    let mut c = s.client();
    let users = batch_create(&mut c, P, 3, "relay").await;
    rename(&mut c, &users[0].name, "Relayed").await;
    create_in(&mut c, Q, user("q@example.com")).await;
    let got = published(&js, &stream, 5).await;
    assert_eq!(got.len(), 5, "{got:?}");
    check_published(
        &got,
        &prefix,
        P,
        &list_all(&mut s.events(), P, "", 0, 100).await,
    );
    check_published(
        &got,
        &prefix,
        Q,
        &list_all(&mut s.events(), Q, "", 0, 100).await,
    );

    // Stopped and started again on the same database: the relay goes on
    // where it was, nothing twice.
    let db = s.stop().await;
    let s = TestServer::start_on(db, relay_to(prefix.clone())).await;
    let mut c = s.client();
    rename(&mut c, &users[1].name, "After the restart").await;
    delete(&mut c, &users[2].name, false).await;
    create_in(&mut c, Q, user("q2@example.com")).await;
    let got = published(&js, &stream, 8).await;
    assert_eq!(got.len(), 8, "{got:?}");
    let want_p = list_all(&mut s.events(), P, "", 0, 100).await;
    assert_eq!(want_p.len(), 6);
    check_published(&got, &prefix, P, &want_p);
    check_published(
        &got,
        &prefix,
        Q,
        &list_all(&mut s.events(), Q, "", 0, 100).await,
    );

    s.stop().await;
    js.delete_stream(stream)
        .await
        .expect("delete the test's stream");
}

/// Two replicas with the relay on one PostgreSQL database: one of them
/// relays, each event is published once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_relay_each_event_once() {
    if postgres_url().is_none() {
        return;
    }
    const P: &str = "projects/ev-relay-replicas";
    let js = jetstream::new(nats().await);
    let (prefix, stream) = relay_prefix();
    let db = TestDb::new(Engine::Postgres).await;
    let a = TestServer::start_on(TestDb::at(db.url.clone()), relay_to(prefix.clone())).await;
    let b = TestServer::start_on(TestDb::at(db.url.clone()), relay_to(prefix.clone())).await;
    let (mut ca, mut cb) = (a.client(), b.client());
    for i in 0..5 {
        create_in(&mut ca, P, user(&format!("a{i}@example.com"))).await;
        create_in(&mut cb, P, user(&format!("b{i}@example.com"))).await;
    }
    let want = list_all(&mut a.events(), P, "", 0, 100).await;
    assert_eq!(want.len(), 10);
    let got = published(&js, &stream, 10).await;
    assert_eq!(got.len(), 10, "{got:?}");
    check_published(&got, &prefix, P, &want);

    a.stop().await;
    b.stop().await;
    js.delete_stream(stream)
        .await
        .expect("delete the test's stream");
}
