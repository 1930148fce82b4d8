//! SIGKILL in the middle of an import: every acknowledged user is stored,
//! the stored users are a prefix of the import (no hole, no half-written
//! chunk), and sending the unacknowledged users again finishes the import
//! with no user stored twice.
//!
//! SIGKILL in the middle of concurrent creates, updates, soft deletes and
//! erases: every acknowledged write is there after the restart, a write in
//! flight took effect entirely or not at all, and the indexes (tags,
//! metadata, search, the unique email) agree with the users they point to.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use prost_types::FieldMask;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};
use user_service::grpc::IMPORT_CHUNK;
use user_service::proto::users::v1 as pb;

use crate::both_engines;
use crate::harness::*;
use crate::list::{list_all, list_req};
use crate::server::Process;

/// More than the four acknowledged chunks the client waits for can hold
/// (chunks grow up to IMPORT_CHUNK while the server is busy).
const TOTAL: usize = 8 * IMPORT_CHUNK;
const PER_MESSAGE: usize = 250;

/// Starts the server on `db` again after a SIGKILL and says how long
/// recovery (opening the database, WAL replay, migrations check) took to
/// SERVING; it must stay bounded.
async fn restart(db: &TestDb) -> Process {
    let t = Instant::now();
    let server = Process::start("restarted", &db.url, &[]).await;
    let took = t.elapsed();
    eprintln!("restart to SERVING after SIGKILL: {took:?}");
    assert!(took < Duration::from_secs(10), "recovery took {took:?}");
    server
}

fn imported(i: usize) -> User {
    User {
        email: format!("crash{i}@example.com"),
        display_name: format!("Crash Test {i}"),
        tags: vec![format!("t{}", i % 4)],
        metadata: [("source".to_string(), "legacy".to_string())].into(),
        ..Default::default()
    }
}

fn messages(from: usize) -> Vec<pb::ImportUsersRequest> {
    (from..TOTAL)
        .step_by(PER_MESSAGE)
        .enumerate()
        .map(|(k, start)| pb::ImportUsersRequest {
            parent: if k == 0 {
                PROJECT.into()
            } else {
                String::new()
            },
            users: (start..(start + PER_MESSAGE).min(TOTAL))
                .map(imported)
                .collect(),
        })
        .collect()
}

/// The import index of every stored user, from an export.
async fn stored(c: &mut Client) -> Vec<usize> {
    let mut s = c
        .stream_users(pb::StreamUsersRequest {
            parent: PROJECT.into(),
            batch_size: 1000,
            ..Default::default()
        })
        .await
        .expect("export")
        .into_inner();
    let mut out = Vec::new();
    while let Some(m) = s.message().await.expect("export message") {
        for u in m.users {
            // Not half-written: every field and index entry is there.
            let i: usize = u
                .email
                .trim_start_matches("crash")
                .trim_end_matches("@example.com")
                .parse()
                .expect("an imported email");
            assert_eq!(
                u,
                User {
                    name: u.name.clone(),
                    state: u.state,
                    create_time: u.create_time,
                    update_time: u.update_time,
                    etag: u.etag.clone(),
                    ..imported(i)
                }
            );
            out.push(i);
        }
    }
    out.sort_unstable();
    out
}

async fn sigkill_mid_import_loses_nothing_acknowledged(engine: Engine) {
    let db = TestDb::new(engine).await;
    let mut server = Process::start("crash", &db.url, &[]).await;
    let mut c = server.client().await;

    // The client streams as fast as the server takes users and reads acks
    // as they come; after a few it kills the server.
    let (tx, rx) = mpsc::channel(2);
    let sender = tokio::spawn(async move {
        for m in messages(0) {
            if tx.send(m).await.is_err() {
                return;
            }
        }
        // Keep the stream open: the kill must come before the end.
        tokio::time::sleep(Duration::from_secs(3600)).await;
    });
    let mut acks = c
        .import_users(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut acked: i64 = -1;
    let mut n_acks = 0;
    while n_acks < 4 {
        let a = acks.message().await.unwrap().expect("ack");
        assert!(a.failures.is_empty(), "{:?}", a.failures);
        acked = a.committed_through;
        n_acks += 1;
    }
    server.kill();
    sender.abort();
    assert!(
        (acked as usize) < TOTAL - 1,
        "the import finished before the kill"
    );

    let server = restart(&db).await;
    let mut c = server.client().await;
    let present = stored(&mut c).await;
    // A prefix of the import: nothing is missing before the last stored user,
    // so no chunk after an acknowledged one was lost or half-stored.
    let m = present.len();
    assert!(
        m > acked as usize,
        "acknowledged users lost: {m} stored, acked through {acked}"
    );
    assert_eq!(
        present,
        (0..m).collect::<Vec<_>>(),
        "stored users are not a prefix"
    );
    // At most what was in flight beyond the ack: the chunk being committed
    // and the acks queued behind it.
    assert!(
        m - (acked as usize + 1) <= 6 * IMPORT_CHUNK,
        "{m} stored, acked through {acked}"
    );
    // The index terms were written with the users.
    assert_eq!(
        count_all(&mut c, "tags:\"t1\"").await,
        (0..m).filter(|i| i % 4 == 1).count() as i64
    );
    assert_eq!(
        count_all(&mut c, "metadata.source = \"legacy\"").await,
        m as i64
    );

    // Finish: send everything after the last acknowledged user again.
    let resume = acked as usize + 1;
    let mut s = c
        .import_users(tokio_stream::iter(messages(resume)))
        .await
        .unwrap()
        .into_inner();
    let mut duplicates = BTreeSet::new();
    let mut created = 0;
    let mut last = -1;
    while let Some(a) = s.message().await.unwrap() {
        created += a.created_count;
        last = a.committed_through;
        for f in a.failures {
            let st = f.status.expect("status");
            assert_eq!(Code::from(st.code), Code::AlreadyExists, "{st:?}");
            duplicates.insert(f.index as usize + resume);
        }
    }
    assert_eq!(last as usize, TOTAL - resume - 1);
    assert_eq!(duplicates, (resume..m).collect::<BTreeSet<_>>());
    assert_eq!(created as usize, TOTAL - m);
    assert_eq!(stored(&mut c).await, (0..TOTAL).collect::<Vec<_>>());
    assert_eq!(count_all(&mut c, "").await, TOTAL as i64);
}

const WRITERS: usize = 4;

/// What a user looks like to a reader: its writable fields, and whether it
/// is live or soft-deleted (erased and never created are both `Absent`).
#[derive(Clone, Debug, PartialEq)]
enum Seen {
    Absent,
    Live(User),
    Deleted(User),
}

/// A user after the crash: what its last acknowledged write left, or, when a
/// write on it was in flight at the kill, what that write leaves.
struct Expected {
    acked: Seen,
    in_flight: Option<Seen>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Create,
    Update,
    SoftDelete,
    Erase,
}

/// The writes each user of a writer goes through, by its number.
fn plan(i: usize) -> &'static [Op] {
    use Op::*;
    match i % 6 {
        0 => &[Create],
        1 => &[Create, Update],
        2 => &[Create, SoftDelete],
        3 => &[Create, Erase],
        4 => &[Create, Update, SoftDelete],
        _ => &[Create, SoftDelete, Erase],
    }
}

/// Writer `w`'s user `i` at generation `g` (0 when created, 1 once updated).
fn written(w: usize, i: usize, g: usize) -> User {
    User {
        email: format!("w{w}-{i}@crash.example"),
        display_name: format!("Crash gen{g} w{w} {i}"),
        tags: vec![format!("w{w}"), format!("n{}", (i + g) % 5)],
        metadata: [
            ("gen".to_string(), g.to_string()),
            ("w".to_string(), w.to_string()),
        ]
        .into(),
        addresses: vec![pb::Address {
            lines: vec![format!("Gate {g}"), format!("Door {i}")],
            locality: "Oslo".into(),
            postal_code: format!("{:04}", i % 10_000),
            country_code: "NO".into(),
            kind: pb::address::Kind::Home as i32,
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// A read (or a write's reply) as a `Seen`.
fn seen(r: Result<User, Status>) -> Seen {
    let u = match r {
        Ok(u) => u,
        Err(s) if s.code() == Code::NotFound && reason(&s) == "USER_NOT_FOUND" => {
            return Seen::Absent;
        }
        Err(s) => panic!("read failed: {s:?}"),
    };
    let state = u.state();
    let fields = User {
        name: String::new(),
        state: 0,
        create_time: None,
        update_time: None,
        delete_time: None,
        purge_time: None,
        etag: String::new(),
        ..u
    };
    match state {
        pb::user::State::Active => Seen::Live(fields),
        pb::user::State::Deleted => Seen::Deleted(fields),
        s => panic!("no writer leaves a user {s:?}: {fields:?}"),
    }
}

/// Writes users `w{w}-0`, `w{w}-1`, ... one write at a time until a write
/// fails (after the kill) and returns what each of them may look like now.
async fn writer(mut c: Client, w: usize, killed: Arc<AtomicBool>) -> BTreeMap<String, Expected> {
    let mut model = BTreeMap::new();
    for i in 0.. {
        let id = format!("w{w}-{i}");
        let name = format!("{PROJECT}/users/{id}");
        let mut acked = Seen::Absent;
        for &op in plan(i) {
            let (after, reply) = match (op, &acked) {
                (Op::Create, Seen::Absent) => {
                    let u = written(w, i, 0);
                    let req = pb::CreateUserRequest {
                        parent: PROJECT.into(),
                        user: Some(u.clone()),
                        user_id: id.clone(),
                        ..Default::default()
                    };
                    (Seen::Live(u), c.create_user(req).await)
                }
                (Op::Update, Seen::Live(_)) => {
                    let u = written(w, i, 1);
                    let req = pb::UpdateUserRequest {
                        user: Some(User {
                            name: name.clone(),
                            ..u.clone()
                        }),
                        update_mask: Some(FieldMask {
                            paths: ["display_name", "tags", "metadata.gen", "addresses"]
                                .map(String::from)
                                .into(),
                        }),
                    };
                    (Seen::Live(u), c.update_user(req).await)
                }
                (Op::SoftDelete | Op::Erase, Seen::Live(u) | Seen::Deleted(u)) => {
                    let force = op == Op::Erase;
                    let req = pb::DeleteUserRequest {
                        name: name.clone(),
                        force,
                        ..Default::default()
                    };
                    let after = if force {
                        Seen::Absent
                    } else {
                        Seen::Deleted(u.clone())
                    };
                    (after, c.delete_user(req).await)
                }
                (op, s) => unreachable!("{op:?} on {s:?}"),
            };
            match reply {
                Ok(r) => {
                    if op != Op::Erase {
                        assert_eq!(seen(Ok(r.into_inner())), after, "reply to {op:?} {name}");
                    }
                    acked = after;
                }
                Err(e) => {
                    assert!(
                        killed.load(Ordering::SeqCst),
                        "{op:?} {name} failed before the kill: {e:?}"
                    );
                    let in_flight = Some(after);
                    model.insert(name, Expected { acked, in_flight });
                    return model;
                }
            }
        }
        let in_flight = None;
        model.insert(name, Expected { acked, in_flight });
    }
    unreachable!("a writer stops at its first failed write")
}

/// The names of every user `filter` selects, deleted ones included.
async fn listed(c: &mut Client, filter: &str) -> BTreeSet<String> {
    let req = pb::ListUsersRequest {
        page_size: 1000,
        show_deleted: true,
        ..list_req(filter, "")
    };
    list_all(c, req).await.into_iter().map(|u| u.name).collect()
}

/// The names of every user a search for `query` finds, deleted ones included.
async fn searched(c: &mut Client, query: &str) -> BTreeSet<String> {
    let req = pb::SearchUsersRequest {
        parent: PROJECT.into(),
        query: query.into(),
        page_size: 1000,
        show_deleted: true,
        ..Default::default()
    };
    crate::list::search_all(c, req)
        .await
        .into_iter()
        .map(|u| u.name)
        .collect()
}

/// Notes in `problems` where an index answered `got` for `what` but the
/// stored users for which `has` holds are others.
fn diff(
    problems: &mut Vec<String>,
    what: &str,
    got: BTreeSet<String>,
    stored: &BTreeMap<String, User>,
    has: impl Fn(&User) -> bool,
) {
    let want: BTreeSet<String> = stored
        .values()
        .filter(|u| has(u))
        .map(|u| u.name.clone())
        .collect();
    if got != want {
        problems.push(format!(
            "{what}: missing {:?}, unexpected {:?}",
            want.difference(&got).collect::<Vec<_>>(),
            got.difference(&want).collect::<Vec<_>>()
        ));
    }
}

async fn sigkill_mid_writes_keeps_every_acknowledged_write(engine: Engine) {
    let db = TestDb::new(engine).await;
    let mut server = Process::start("crash", &db.url, &[]).await;
    let killed = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let c = server.client().await;
        writers.push(tokio::spawn(writer(c, w, killed.clone())));
    }
    let ms = fastrand::u64(1500..=3000);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    killed.store(true, Ordering::SeqCst);
    server.kill();
    let mut model = BTreeMap::new();
    for h in writers {
        let m = tokio::time::timeout(Duration::from_secs(10), h)
            .await
            .expect("a write still waits after the kill")
            .expect("writer");
        model.extend(m);
    }
    let settled = |want: fn(&Seen) -> bool| {
        model
            .values()
            .filter(|e| e.in_flight.is_none() && want(&e.acked))
            .count()
    };
    let live = settled(|s| matches!(s, Seen::Live(_)));
    let deleted = settled(|s| matches!(s, Seen::Deleted(_)));
    let erased = settled(|s| *s == Seen::Absent);
    eprintln!(
        "{engine:?}: killed after {ms} ms; acknowledged {live} live, {deleted} soft-deleted, \
         {erased} erased users"
    );
    assert!(
        live > 0 && deleted > 0 && erased > 0,
        "too few writes before the kill"
    );

    let server = restart(&db).await;
    let mut c = server.client().await;
    let req = pb::ListUsersRequest {
        page_size: 1000,
        show_deleted: true,
        ..list_req("", "")
    };
    let stored_users: BTreeMap<String, User> = list_all(&mut c, req)
        .await
        .into_iter()
        .map(|u| (u.name.clone(), u))
        .collect();
    let mut problems = Vec::new();
    for name in stored_users.keys().filter(|n| !model.contains_key(*n)) {
        problems.push(format!("{name}: stored, but never written"));
    }
    for (name, e) in &model {
        let now = seen(get(&mut c, name).await);
        if now != e.acked && e.in_flight.as_ref() != Some(&now) {
            problems.push(format!(
                "{name}: {now:?}\n  acknowledged {:?}\n  in flight {:?}",
                e.acked, e.in_flight
            ));
        }
        let in_list = stored_users
            .get(name)
            .map_or(Seen::Absent, |u| seen(Ok(u.clone())));
        if in_list != now {
            problems.push(format!(
                "{name}: GetUser has {now:?}, ListUsers {in_list:?}"
            ));
        }
        let id = name.rsplit('/').next().expect("an id");
        let found = match c
            .lookup_user(pb::LookupUserRequest {
                parent: PROJECT.into(),
                identifier: Some(pb::lookup_user_request::Identifier::Email(format!(
                    "{id}@crash.example"
                ))),
            })
            .await
        {
            Ok(u) => Some(u.into_inner().name),
            Err(s) if s.code() == Code::NotFound => None,
            Err(s) => panic!("lookup {id}: {s:?}"),
        };
        let want = matches!(now, Seen::Live(_)).then(|| name.clone());
        if found != want {
            problems.push(format!("{name}: {now:?}, but its email finds {found:?}"));
        }
    }

    // Every index term agrees with the stored users.
    let tags = (0..WRITERS)
        .map(|w| format!("w{w}"))
        .chain((0..5).map(|n| format!("n{n}")));
    for t in tags {
        let got = listed(&mut c, &format!("tags:\"{t}\"")).await;
        diff(
            &mut problems,
            &format!("tags:{t:?}"),
            got,
            &stored_users,
            |u| u.tags.contains(&t),
        );
    }
    for (key, values) in [("gen", 0..2), ("w", 0..WRITERS)] {
        for v in values.map(|v| v.to_string()) {
            let filter = format!("metadata.{key} = \"{v}\"");
            let got = listed(&mut c, &filter).await;
            diff(&mut problems, &filter, got, &stored_users, |u| {
                u.metadata.get(key) == Some(&v)
            });
        }
    }
    let queries = (0..2)
        .map(|g| format!("crash gen{g} w"))
        .chain((0..WRITERS).map(|w| format!("w{w}-")));
    for q in queries {
        let got = searched(&mut c, &q).await;
        diff(
            &mut problems,
            &format!("search {q:?}"),
            got,
            &stored_users,
            |u| u.email.starts_with(&q) || u.display_name.to_lowercase().starts_with(&q),
        );
    }
    assert!(
        problems.is_empty(),
        "{} problems after the restart:\n{}",
        problems.len(),
        problems[..problems.len().min(50)].join("\n")
    );
}

both_engines!(
    sigkill_mid_import_loses_nothing_acknowledged,
    sigkill_mid_writes_keeps_every_acknowledged_write,
);
