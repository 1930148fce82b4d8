//! StreamUsers, BatchCreateUsers and ImportUsers as a client sees them.

use std::collections::{BTreeSet, HashSet};

use prost::Message;
use tonic::{Code, Status};
use tonic_types::StatusExt;
use user_service::grpc::IMPORT_CHUNK;
use user_service::proto::users::v1 as pb;

use crate::both_engines;
use crate::harness::*;
use crate::list::{Client, list_all, list_req};

fn member(i: usize) -> User {
    User {
        email: format!("Member{i}@Example.com"),
        display_name: format!("Member {i}"),
        tags: vec![format!("group-{}", i % 3)],
        ..Default::default()
    }
}

fn item(u: User) -> pb::CreateUserRequest {
    pb::CreateUserRequest {
        user: Some(u),
        ..Default::default()
    }
}

fn batch(items: Vec<pb::CreateUserRequest>) -> pb::BatchCreateUsersRequest {
    pb::BatchCreateUsersRequest {
        parent: PROJECT.into(),
        requests: items,
        request_id: String::new(),
    }
}

/// Stores `n` users `member(offset..offset + n)` with BatchCreateUsers.
async fn seed(c: &mut Client, offset: usize, n: usize) -> Vec<User> {
    let mut out = Vec::new();
    let all: Vec<usize> = (offset..offset + n).collect();
    for part in all.chunks(1000) {
        let req = batch(part.iter().map(|i| item(member(*i))).collect());
        out.extend(
            c.batch_create_users(req)
                .await
                .expect("batch")
                .into_inner()
                .users,
        );
    }
    out
}

fn stream_req(filter: &str, order_by: &str, batch_size: i32) -> pb::StreamUsersRequest {
    pb::StreamUsersRequest {
        parent: PROJECT.into(),
        filter: filter.into(),
        order_by: order_by.into(),
        batch_size,
        ..Default::default()
    }
}

/// Every message of an export.
async fn stream_all(
    c: &mut Client,
    req: pb::StreamUsersRequest,
) -> Result<Vec<pb::StreamUsersResponse>, Status> {
    let mut s = c.stream_users(req).await?.into_inner();
    let mut out = Vec::new();
    while let Some(m) = s.message().await? {
        out.push(m);
    }
    Ok(out)
}

fn names(users: &[User]) -> Vec<String> {
    users.iter().map(|u| u.name.clone()).collect()
}

async fn stream_exports_exactly_what_list_returns(engine: Engine) {
    let server = TestServer::start(engine).await;
    let mut c = server.client();
    let created = seed(&mut c, 0, 1234).await;
    // A soft-deleted user shows only with show_deleted.
    c.delete_user(pb::DeleteUserRequest {
        name: created[10].name.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    for (filter, order_by) in [
        ("", ""),
        ("tags:\"group-1\"", ""),
        ("", "email"),
        ("email = \"*@example.com\"", "display_name desc"),
    ] {
        let messages = stream_all(&mut c, stream_req(filter, order_by, 100))
            .await
            .unwrap();
        let streamed: Vec<User> = messages.iter().flat_map(|m| m.users.clone()).collect();
        let listed = list_all(&mut c, list_req(filter, order_by)).await;
        assert_eq!(names(&streamed), names(&listed), "{filter} / {order_by}");
        assert!(messages.iter().all(|m| m.users.len() <= 100));
        assert!(messages.iter().all(|m| !m.resume_token.is_empty()));
        assert_eq!(messages.len(), listed.len().div_ceil(100));
        assert_eq!(streamed[0], listed[0], "full users, not just names");
    }
    // Default batch size 500; clamped to 1000.
    let all = stream_all(&mut c, stream_req("", "", 0)).await.unwrap();
    assert_eq!(
        all.iter().map(|m| m.users.len()).collect::<Vec<_>>(),
        [500, 500, 233]
    );
    let big = stream_all(&mut c, stream_req("", "", 5000)).await.unwrap();
    assert_eq!(big[0].users.len(), 1000);
    let mut with_deleted = stream_req("", "", 0);
    with_deleted.show_deleted = true;
    let n: usize = stream_all(&mut c, with_deleted)
        .await
        .unwrap()
        .iter()
        .map(|m| m.users.len())
        .sum();
    assert_eq!(n, 1234);
    // Nothing matches: one message without users, carrying the head revision.
    let none = stream_all(&mut c, stream_req("tags:\"nobody\"", "", 0))
        .await
        .unwrap();
    assert_eq!(none.len(), 1);
    assert!(none[0].users.is_empty());
    assert!(none[0].head_revision >= 1234, "{}", none[0].head_revision);
}

/// A client that loses the stream resumes from the last token it got: no gap
/// and no duplicate even while users are created and deleted meanwhile.
async fn stream_resumes_after_the_last_message(engine: Engine) {
    let server = TestServer::start(engine).await;
    let mut c = server.client();
    let created = seed(&mut c, 0, 600).await;
    let mut erased = HashSet::new();
    for (round, order_by) in ["", "email desc"].into_iter().enumerate() {
        let mut s = c
            .stream_users(stream_req("", order_by, 50))
            .await
            .unwrap()
            .into_inner();
        let mut seen: Vec<User> = Vec::new();
        let mut token = String::new();
        for _ in 0..3 {
            let m = s.message().await.unwrap().expect("a message");
            seen.extend(m.users);
            token = m.resume_token;
        }
        drop(s);
        // Meanwhile: new users (ahead of or behind the cursor) and deletions.
        seed(&mut c, 10_000 * (round + 1), 5).await;
        let gone = &created[300 + round];
        erased.insert(gone.name.clone());
        c.delete_user(pb::DeleteUserRequest {
            name: gone.name.clone(),
            force: true,
            ..Default::default()
        })
        .await
        .unwrap();
        let mut req = stream_req("", order_by, 50);
        req.resume_token = token;
        for m in stream_all(&mut c, req).await.unwrap() {
            seen.extend(m.users);
        }
        let unique: HashSet<&str> = seen.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(unique.len(), seen.len(), "a user was sent twice");
        for u in &created {
            assert!(
                unique.contains(u.name.as_str()) || erased.contains(&u.name),
                "{} was skipped",
                u.email
            );
        }
        // The resumed part follows the order.
        let listed = list_all(&mut c, list_req("", order_by)).await;
        let in_list: Vec<&str> = listed
            .iter()
            .map(|u| u.name.as_str())
            .filter(|n| unique.contains(n))
            .collect();
        let streamed_now: Vec<&str> = seen
            .iter()
            .map(|u| u.name.as_str())
            .filter(|n| listed.iter().any(|l| l.name == *n))
            .collect();
        assert_eq!(in_list, streamed_now);
    }
}

async fn stream_rejects_bad_requests(engine: Engine) {
    let server = TestServer::start(engine).await;
    let mut c = server.client();
    seed(&mut c, 0, 3).await;
    let s = assert_error(
        stream_all(&mut c, stream_req("tags:", "", 0)).await,
        Code::InvalidArgument,
        "INVALID_FILTER",
    );
    assert_eq!(bad_fields(&s), ["filter"]);
    let s = assert_error(
        stream_all(&mut c, stream_req("", "", -1)).await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(bad_fields(&s), ["batch_size"]);
    let mut bad = stream_req("", "", 0);
    bad.resume_token = "garbage".into();
    let s = assert_error(
        stream_all(&mut c, bad).await,
        Code::InvalidArgument,
        "INVALID_PAGE_TOKEN",
    );
    assert_eq!(bad_fields(&s), ["resume_token"]);
    // A token of another export.
    let first = stream_all(&mut c, stream_req("", "", 1)).await.unwrap();
    let mut other = stream_req("", "email", 1);
    other.resume_token = first[0].resume_token.clone();
    assert_error(
        stream_all(&mut c, other).await,
        Code::InvalidArgument,
        "INVALID_PAGE_TOKEN",
    );
    let mut no_parent = stream_req("", "", 0);
    no_parent.parent = "acme".into();
    let s = assert_error(
        stream_all(&mut c, no_parent).await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(bad_fields(&s), ["parent"]);
}

/// Abandoning exports part-way (slow readers that stop reading, then cancel)
/// leaves the server serving. Each reader has a connection of its own, as
/// HTTP/2 flow control is shared by the calls of one connection.
async fn abandoned_streams_leave_the_server_serving(engine: Engine) {
    let server = TestServer::start(engine).await;
    let mut c = server.client();
    seed(&mut c, 0, 2000).await;
    let mut open = Vec::new();
    for _ in 0..20 {
        let mut s = server
            .own_client()
            .await
            .stream_users(stream_req("", "", 100))
            .await
            .unwrap()
            .into_inner();
        s.message().await.unwrap().expect("first batch");
        open.push(s);
    }
    // They stay open, unread, while other calls go on.
    assert_eq!(count_all(&mut c, "").await, 2000);
    drop(open);
    let all = stream_all(&mut c, stream_req("", "", 1000)).await.unwrap();
    assert_eq!(all.iter().map(|m| m.users.len()).sum::<usize>(), 2000);
}

async fn batch_create_stores_every_user_in_order(engine: Engine) {
    let server = TestServer::start(engine).await;
    let mut c = server.client();
    let mut items: Vec<pb::CreateUserRequest> = (0..5).map(|i| item(member(i))).collect();
    items[1].user_id = "chosen-one".into();
    items[2].initial_state = pb::user::State::Pending as i32;
    items[3].parent = PROJECT.into();
    let created = c
        .batch_create_users(batch(items))
        .await
        .unwrap()
        .into_inner()
        .users;
    assert_eq!(created.len(), 5);
    for (i, u) in created.iter().enumerate() {
        assert_eq!(u.email, format!("Member{i}@example.com"));
        assert_eq!(get(&mut c, &u.name).await.unwrap(), *u);
    }
    assert_eq!(created[1].name, format!("{PROJECT}/users/chosen-one"));
    assert_eq!(created[2].state, pb::user::State::Pending as i32);
    assert_eq!(created[0].state, pb::user::State::Active as i32);
    // Found by lists and lookups like any other user.
    // One create time for the whole batch: the newest-first order falls back
    // to the name, descending.
    let tagged = list_all(&mut c, list_req("tags:\"group-1\"", "")).await;
    assert_eq!(
        names(&tagged),
        [created[1].name.clone(), created[4].name.clone()]
    );
    // 1000 at once.
    let many = seed(&mut c, 100, 1000).await;
    assert_eq!(many.len(), 1000);
    assert_eq!(count_all(&mut c, "").await, 1005);
}

async fn batch_create_is_all_or_nothing(engine: Engine) {
    let server = TestServer::start(engine).await;
    let mut c = server.client();
    create(&mut c, user("taken@example.com")).await;
    create(
        &mut c,
        User {
            phone_number: "+4791234567".into(),
            ..Default::default()
        },
    )
    .await;
    let mut items: Vec<pb::CreateUserRequest> = (0..6).map(|i| item(member(i))).collect();
    items[3].user.as_mut().unwrap().email = "TAKEN@example.com".into();
    let s = assert_error(
        c.batch_create_users(batch(items.clone())).await,
        Code::AlreadyExists,
        "EMAIL_ALREADY_EXISTS",
    );
    let info = s.get_error_details().error_info().cloned().unwrap();
    assert_eq!(info.metadata["field"], "requests[3].user.email");
    assert_eq!(
        count_all(&mut c, "").await,
        2,
        "nothing of the batch is stored"
    );

    items[3].user.as_mut().unwrap().email = "fine@example.com".into();
    items[5].user.as_mut().unwrap().phone_number = "+47 912 34 567".into();
    let s = assert_error(
        c.batch_create_users(batch(items.clone())).await,
        Code::AlreadyExists,
        "PHONE_NUMBER_ALREADY_EXISTS",
    );
    let info = s.get_error_details().error_info().cloned().unwrap();
    assert_eq!(info.metadata["field"], "requests[5].user.phone_number");
    assert_eq!(count_all(&mut c, "").await, 2);

    items[5].user.as_mut().unwrap().phone_number.clear();
    let stored = c.batch_create_users(batch(items)).await.unwrap();
    assert_eq!(stored.into_inner().users.len(), 6);
    assert_eq!(count_all(&mut c, "").await, 8);
}

async fn batch_create_reports_every_bad_item(engine: Engine) {
    let server = TestServer::start(engine).await;
    let mut c = server.client();
    let mut items: Vec<pb::CreateUserRequest> = (0..6).map(|i| item(member(i))).collect();
    // Duplicates inside the batch, case-insensitively for emails.
    items[2].user.as_mut().unwrap().email = "MEMBER0@example.com".into();
    items[4].user_id = "same".into();
    items[5].user_id = "same".into();
    // Plain invalid input, reported with the rest.
    items[1].user.as_mut().unwrap().birthday = Some(pb_date(2999, 1, 1));
    items[3].user = None;
    let s = assert_error(
        c.batch_create_users(batch(items)).await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(
        bad_fields(&s),
        ["requests[1].user.birthday", "requests[3].user"]
    );
    // Once the items are valid, the duplicates are named.
    let mut items: Vec<pb::CreateUserRequest> = (0..6).map(|i| item(member(i))).collect();
    items[2].user.as_mut().unwrap().email = "MEMBER0@example.com".into();
    items[4].user_id = "same".into();
    items[5].user_id = "same".into();
    let s = assert_error(
        c.batch_create_users(batch(items)).await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(
        bad_fields(&s),
        ["requests[2].user.email", "requests[5].user_id"]
    );
    assert!(s.message().contains("requests[0]"), "{}", s.message());

    let cases: Vec<(pb::BatchCreateUsersRequest, &str)> = vec![
        (batch(vec![]), "requests"),
        (
            batch((0..1001).map(|i| item(member(i))).collect()),
            "requests",
        ),
        (
            pb::BatchCreateUsersRequest {
                parent: "nope".into(),
                ..batch(vec![item(member(1))])
            },
            "parent",
        ),
        (
            batch(vec![pb::CreateUserRequest {
                parent: "projects/other".into(),
                ..item(member(1))
            }]),
            "requests[0].parent",
        ),
        (
            batch(vec![pb::CreateUserRequest {
                request_id: "abc".into(),
                ..item(member(1))
            }]),
            "requests[0].request_id",
        ),
    ];
    for (req, field) in cases {
        let s = assert_error(
            c.batch_create_users(req).await,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
        assert_eq!(bad_fields(&s), [field]);
    }
    assert_eq!(count_all(&mut c, "").await, 0);
}

fn pb_date(year: i32, month: i32, day: i32) -> user_service::proto::google::r#type::Date {
    user_service::proto::google::r#type::Date { year, month, day }
}

async fn batch_create_request_id_replays(engine: Engine) {
    let server = TestServer::start(engine).await;
    let mut c = server.client();
    let mut req = batch((0..3).map(|i| item(member(i))).collect());
    req.request_id = "import-7".into();
    let first = c
        .batch_create_users(req.clone())
        .await
        .unwrap()
        .into_inner();
    let again = c
        .batch_create_users(req.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first, again);
    assert_eq!(count_all(&mut c, "").await, 3);
    // The same key with another batch (even one of the same size), or with
    // a CreateUser.
    let mut same_size = req.clone();
    same_size.requests[2] = item(member(7));
    assert_error(
        c.batch_create_users(same_size).await,
        Code::FailedPrecondition,
        "REQUEST_ID_REUSED",
    );
    let mut other = req.clone();
    other.requests.pop();
    assert_error(
        c.batch_create_users(other).await,
        Code::FailedPrecondition,
        "REQUEST_ID_REUSED",
    );
    assert_error(
        c.create_user(pb::CreateUserRequest {
            parent: PROJECT.into(),
            user: Some(member(0)),
            request_id: "import-7".into(),
            ..Default::default()
        })
        .await,
        Code::FailedPrecondition,
        "REQUEST_ID_REUSED",
    );
    // Concurrent twins create once.
    let mut twin = batch((10..20).map(|i| item(member(i))).collect());
    twin.request_id = "twin".into();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let mut c = server.client();
        let twin = twin.clone();
        tasks.push(tokio::spawn(async move {
            c.batch_create_users(twin).await.map(|r| r.into_inner())
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap().expect("twin"));
    }
    assert!(results.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(count_all(&mut c, "").await, 13);
}

/// The failures of an import as (index, code, reason, field).
fn failures(acks: &[pb::ImportUsersResponse]) -> Vec<(i64, Code, String, String)> {
    acks.iter()
        .flat_map(|a| a.failures.iter())
        .map(|f| {
            let st = f.status.clone().expect("status");
            let s = Status::with_details(
                Code::from(st.code),
                st.message.clone(),
                st.encode_to_vec().into(),
            );
            let d = s.get_error_details();
            let field = match (d.bad_request(), d.error_info()) {
                (Some(b), _) => b.field_violations[0].field.clone(),
                (None, Some(i)) => i.metadata.get("field").cloned().unwrap_or_default(),
                _ => String::new(),
            };
            (f.index, s.code(), reason(&s), field)
        })
        .collect()
}

fn import_msg(parent: &str, users: Vec<User>) -> pb::ImportUsersRequest {
    pb::ImportUsersRequest {
        parent: parent.into(),
        users,
    }
}

/// Sends `users` in messages of `per_message` and collects every ack.
pub async fn import(
    c: &mut Client,
    users: Vec<User>,
    per_message: usize,
) -> Result<Vec<pb::ImportUsersResponse>, Status> {
    let msgs: Vec<pb::ImportUsersRequest> = users
        .chunks(per_message)
        .enumerate()
        .map(|(i, part)| import_msg(if i == 0 { PROJECT } else { "" }, part.to_vec()))
        .collect();
    import_messages(c, msgs).await
}

pub async fn import_messages(
    c: &mut Client,
    msgs: Vec<pb::ImportUsersRequest>,
) -> Result<Vec<pb::ImportUsersResponse>, Status> {
    let mut s = c.import_users(tokio_stream::iter(msgs)).await?.into_inner();
    let mut acks = Vec::new();
    while let Some(a) = s.message().await? {
        acks.push(a);
    }
    Ok(acks)
}

/// Acks are in order, each covers a contiguous range, and together they
/// settle every index exactly once.
fn check_acks(acks: &[pb::ImportUsersResponse], total: i64) {
    let mut through = -1;
    let mut settled = 0;
    for a in acks {
        assert!(a.committed_through > through, "acks out of order");
        let span = a.committed_through - through;
        assert_eq!(
            a.created_count + a.failures.len() as i64,
            span,
            "an ack settles exactly its range"
        );
        for f in &a.failures {
            assert!(f.index > through && f.index <= a.committed_through);
        }
        through = a.committed_through;
        settled += span;
    }
    assert_eq!(through, total - 1);
    assert_eq!(settled, total);
}

async fn import_stores_valid_users_and_reports_each_failure(engine: Engine) {
    let server = TestServer::start(engine).await;
    let mut c = server.client();
    create(&mut c, user("already@example.com")).await;
    // More than one chunk whatever the timing: a chunk holds at most
    // IMPORT_CHUNK users.
    let total = IMPORT_CHUNK + 1600;
    let late = IMPORT_CHUNK + 500;
    let mut users: Vec<User> = (0..total).map(member).collect();
    users[5].email = "not-an-email".into();
    users[7].email.clear();
    users[10].email = "member9@EXAMPLE.COM".into(); // repeats users[9], same chunk
    users[late].email = "member3@example.com".into(); // repeats users[3], earlier chunk
    users[20].email = "Already@example.com".into(); // a stored user
    users[30].name = format!("{PROJECT}/users/picked-id");
    users[31].state = pb::user::State::Disabled as i32;
    users[32].state = pb::user::State::Deleted as i32;
    users[33].name = "projects/other/users/x".into();
    let acks = import(&mut c, users.clone(), 300).await.unwrap();
    check_acks(&acks, total as i64);
    assert!(acks.len() >= 2, "committed in chunks: {}", acks.len());
    let got = failures(&acks);
    let want = vec![
        (
            5,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
            "users[5].email",
        ),
        (
            7,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
            "users[7].email",
        ),
        (
            10,
            Code::AlreadyExists,
            "DUPLICATE_IN_IMPORT",
            "users[10].email",
        ),
        (
            20,
            Code::AlreadyExists,
            "EMAIL_ALREADY_EXISTS",
            "users[20].email",
        ),
        (
            32,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
            "users[32].state",
        ),
        (
            33,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
            "users[33].name",
        ),
    ];
    let mut want: Vec<(i64, Code, String, String)> = want
        .into_iter()
        .map(|(i, c, r, f)| (i, c, r.to_owned(), f.to_owned()))
        .collect();
    want.push((
        late as i64,
        Code::AlreadyExists,
        "DUPLICATE_IN_IMPORT".to_owned(),
        format!("users[{late}].email"),
    ));
    assert_eq!(got, want);
    let created: i64 = acks.iter().map(|a| a.created_count).sum();
    assert_eq!(created, total as i64 - 7);
    assert_eq!(count_all(&mut c, "").await, created + 1);
    let picked = get(&mut c, &format!("{PROJECT}/users/picked-id"))
        .await
        .unwrap();
    assert_eq!(picked.email, "Member30@example.com");
    let disabled = list_all(&mut c, list_req("state = DISABLED", "")).await;
    assert_eq!(names(&disabled).len(), 1);
    assert_eq!(disabled[0].email, "Member31@example.com");
    // Imported users are found like any other.
    let found = list_all(&mut c, list_req("tags:\"group-2\"", "")).await;
    let rejected = [5, 7, 10, 20, 32, 33, late];
    let want = (0..total)
        .filter(|i| i % 3 == 2 && !rejected.contains(i))
        .count();
    assert_eq!(found.len(), want);
    let by_email = c
        .lookup_user(pb::LookupUserRequest {
            parent: PROJECT.into(),
            identifier: Some(pb::lookup_user_request::Identifier::Email(
                "member2000@example.com".into(),
            )),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_email.display_name, "Member 2000");
}

/// A client that sends a few users and waits gets its acknowledgement without
/// closing the stream.
async fn import_acknowledges_while_the_client_waits(engine: Engine) {
    let server = TestServer::start(engine).await;
    let mut c = server.client();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut acks = c
        .import_users(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut next = 0;
    for round in 0..3 {
        let users: Vec<User> = (next..next + 10).map(member).collect();
        let parent = if round == 0 { PROJECT } else { "" };
        tx.send(import_msg(parent, users)).await.unwrap();
        let mut through = -1;
        while through < next as i64 + 9 {
            let ack = tokio::time::timeout(std::time::Duration::from_secs(10), acks.message())
                .await
                .expect("an ack while the stream stays open")
                .unwrap()
                .expect("ack");
            through = ack.committed_through;
        }
        assert_eq!(count_all(&mut c, "").await, next as i64 + 10);
        next += 10;
    }
    drop(tx);
    assert!(acks.message().await.unwrap().is_none());
}

async fn import_rejects_a_bad_or_changing_parent(engine: Engine) {
    let server = TestServer::start(engine).await;
    let mut c = server.client();
    let s = assert_error(
        import_messages(&mut c, vec![import_msg("", vec![member(1)])]).await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(bad_fields(&s), ["parent"]);
    assert_eq!(count_all(&mut c, "").await, 0);

    // Users before the change are committed and acknowledged, then the call
    // fails.
    let mut s = c
        .import_users(tokio_stream::iter(vec![
            import_msg(PROJECT, vec![member(1), member(2)]),
            import_msg("projects/other", vec![member(3)]),
        ]))
        .await
        .unwrap()
        .into_inner();
    let mut through = -1;
    let err = loop {
        match s.message().await {
            Ok(Some(a)) => through = a.committed_through,
            Ok(None) => panic!("the stream must fail"),
            Err(e) => break e,
        }
    };
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(bad_fields(&err), ["parent"]);
    assert_eq!(through, 1);
    assert_eq!(count_all(&mut c, "").await, 2);
    // An empty import is fine.
    assert!(import(&mut c, vec![], 10).await.unwrap().is_empty());
}

/// Sending the same users again (what a client does after losing the
/// stream) stores nothing twice.
async fn import_again_reports_duplicates_of_stored_users(engine: Engine) {
    let server = TestServer::start(engine).await;
    let mut c = server.client();
    let users: Vec<User> = (0..1500).map(member).collect();
    let first = import(&mut c, users[..700].to_vec(), 200).await.unwrap();
    check_acks(&first, 700);
    let again = import(&mut c, users.clone(), 500).await.unwrap();
    check_acks(&again, 1500);
    let f = failures(&again);
    assert_eq!(f.len(), 700);
    assert!(
        f.iter()
            .enumerate()
            .all(|(i, (index, code, reason, _))| *index == i as i64
                && *code == Code::AlreadyExists
                && reason == "EMAIL_ALREADY_EXISTS")
    );
    assert_eq!(count_all(&mut c, "").await, 1500);
    let emails: BTreeSet<String> = list_all(&mut c, list_req("", ""))
        .await
        .into_iter()
        .map(|u| u.email)
        .collect();
    assert_eq!(emails.len(), 1500);
}

both_engines!(
    stream_exports_exactly_what_list_returns,
    stream_resumes_after_the_last_message,
    stream_rejects_bad_requests,
    abandoned_streams_leave_the_server_serving,
    batch_create_stores_every_user_in_order,
    batch_create_is_all_or_nothing,
    batch_create_reports_every_bad_item,
    batch_create_request_id_replays,
    import_stores_valid_users_and_reports_each_failure,
    import_acknowledges_while_the_client_waits,
    import_rejects_a_bad_or_changing_parent,
    import_again_reports_duplicates_of_stored_users,
);
