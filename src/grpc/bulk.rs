//! StreamUsers, BatchCreateUsers and ImportUsers: the request parsing and the
//! stream plumbing. Storage and the rules live in the domain.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use super::audit::{self, Audit};
use super::convert::{batch_fingerprint, parse_profile, user_to_proto};
use super::trace::record_project;
use super::{MAX_RESPONSE_BYTES, PAGE_BYTES, check_key, fit_page, write_parent};
use crate::domain::events::EventRepository;
use crate::domain::query::{encode_page_token, next_page_token};
use crate::domain::{
    Caller, DomainError, IdempotencyKey, ImportLog, NewUser, ProjectId, Scope, State, UserId,
    UserName, UserQuery, UserRepository, Users, Violations,
};
use crate::proto::users::v1 as pb;

/// What the server adds to a user it returns (name, times, state, etag),
/// generously.
const OUTPUT_BYTES_PER_USER: usize = 256;

/// Most users one BatchCreateUsers call creates.
pub const MAX_BATCH_CREATE: usize = 1000;

/// Users an import commits in one transaction (at most; a chunk is also cut
/// when the client pauses and no earlier chunk waits to be stored, so that
/// every user sent is acknowledged promptly).
pub const IMPORT_CHUNK: usize = 5000;

/// An import refreshes the planner's statistics after storing this many
/// users, and at its end if it stored at least `ANALYZE_AFTER` since.
const ANALYZE_EVERY: i64 = 250_000;
const ANALYZE_AFTER: i64 = 10_000;

/// Most users a StreamUsers message carries.
pub const MAX_STREAM_BATCH: u32 = 1000;

/// The user a CreateUserRequest asks for, its violations recorded under
/// `prefix` (`""` for CreateUser, `"requests[3]."` in a batch).
pub(super) fn parse_create(
    req: &pb::CreateUserRequest,
    prefix: &str,
    project: Option<ProjectId>,
    v: &mut Violations,
) -> Option<NewUser> {
    let id = if req.user_id.is_empty() {
        None
    } else {
        v.check(|| format!("{prefix}user_id"), UserId::parse(&req.user_id))
    };
    let initial_state = match pb::user::State::try_from(req.initial_state) {
        Ok(pb::user::State::Unspecified | pb::user::State::Active) => State::Active,
        Ok(pb::user::State::Pending) => State::Pending,
        _ => {
            v.push(
                format!("{prefix}initial_state"),
                "must be PENDING or ACTIVE (or unset, meaning ACTIVE)",
            );
            State::Active
        }
    };
    let profile = match &req.user {
        Some(u) => Some(parse_contactable(u, &format!("{prefix}user"), v)),
        None => {
            v.push(format!("{prefix}user"), "is required");
            None
        }
    };
    Some(NewUser {
        project: project?,
        id,
        profile: profile?,
        initial_state,
    })
}

/// All writable fields of a new user, which needs an email or a phone number.
fn parse_contactable(u: &pb::User, path: &str, v: &mut Violations) -> crate::domain::Profile {
    let p = parse_profile(u, path, &|_| true, v);
    if !p.has_contact() && u.email.is_empty() && u.phone_number.is_empty() {
        for f in ["email", "phone_number"] {
            v.push(
                format!("{path}.{f}"),
                "a user needs at least one of email and phone_number",
            );
        }
    }
    p
}

pub(super) fn check_request_id(s: &str) -> Result<(), String> {
    if s.len() > 100
        || !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-'))
    {
        return Err(
            "must be at most 100 characters of letters, digits, '_', '.', ':' and '-'".into(),
        );
    }
    Ok(())
}

pub(super) async fn batch_create<R: UserRepository>(
    users: &Users<R>,
    audit: &Audit,
    req: pb::BatchCreateUsersRequest,
) -> Result<pb::BatchCreateUsersResponse, Status> {
    audit.caller().require_scope(Scope::Write)?;
    let mut v = Violations::default();
    let project = write_parent(audit, &req.parent, &mut v)?;
    if req.requests.is_empty() || req.requests.len() > MAX_BATCH_CREATE {
        v.push(
            "requests",
            format!(
                "must hold 1 to {MAX_BATCH_CREATE} requests; {} given",
                req.requests.len()
            ),
        );
        return Err(v
            .into_result()
            .err()
            .map_or_else(|| Status::internal("internal error"), Status::from));
    }
    check_key(audit, &req.request_id, &mut v);
    // The answer repeats every user with its output fields: it must fit in
    // one response too.
    let answer = prost::Message::encoded_len(&req) + req.requests.len() * OUTPUT_BYTES_PER_USER;
    if answer > PAGE_BYTES {
        return Err(DomainError::TooLarge {
            field: "requests".into(),
            description: format!(
                "the created users would not fit in one {MAX_RESPONSE_BYTES}-byte response; \
                 send fewer or smaller users per call"
            ),
        }
        .into());
    }
    let mut news = Vec::with_capacity(req.requests.len());
    for (i, item) in req.requests.iter().enumerate() {
        let prefix = format!("requests[{i}].");
        if !item.parent.is_empty() && item.parent != req.parent {
            v.push(
                format!("{prefix}parent"),
                "must be empty or equal to the batch's parent",
            );
        }
        if !item.request_id.is_empty() {
            v.push(
                format!("{prefix}request_id"),
                "must be empty: the batch's request_id covers every item",
            );
        }
        if item.validate_only {
            v.push(
                format!("{prefix}validate_only"),
                "is not supported inside a batch",
            );
        }
        news.extend(parse_create(item, &prefix, project.clone(), &mut v));
    }
    v.into_result()?;
    let Some(project) = project else {
        return Err(DomainError::Internal("validated request incomplete".into()).into());
    };
    let key = (!req.request_id.is_empty()).then(|| IdempotencyKey {
        request_id: req.request_id.clone(),
        fingerprint: batch_fingerprint(&req),
    });
    let created = users.batch_create(&project, news, key).await?;
    audit.about(project.as_str(), format!("{} users", created.len()));
    Ok(pb::BatchCreateUsersResponse {
        users: created.iter().map(user_to_proto).collect(),
    })
}

pub(super) type ExportStream = ReceiverStream<Result<pb::StreamUsersResponse, Status>>;

/// Runs an export in a task that reads one batch ahead: the channel holds at
/// most two batches, so a slow client stalls the task (and the database
/// reads) instead of growing a buffer, and a cancelled call closes the
/// channel, which ends the task.
pub(super) fn export<R: UserRepository + EventRepository>(
    users: Arc<Users<R>>,
    query: UserQuery,
    size: u32,
    mut after: Option<crate::domain::Cursor>,
    mut draining: tokio::sync::watch::Receiver<bool>,
) -> ExportStream {
    let (tx, rx) = mpsc::channel(1);
    spawn_answering(&tx.clone(), async move {
        // Where a client resumes: after the last message it was sent.
        let mut resume = after
            .as_ref()
            .map(|c| encode_page_token(&query, c))
            .unwrap_or_default();
        let stop = |resume: &str| {
            Err(super::status::shutting_down(&[(
                "resume_token",
                resume.to_owned(),
            )]))
        };
        // Read before the first batch: every change the export may miss
        // comes after it in the change log.
        let mut sent_head = false;
        let mut head_revision = match users.repository().bounds(&query.project).await {
            Ok(b) => b.head,
            Err(e) => {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
        };
        loop {
            let read = tokio::select! {
                r = users.export_batch(&query, size, after.as_ref()) => r,
                () = tx.closed() => return,
                () = until_draining(&mut draining) => {
                    let _ = tx.send(stop(&resume)).await;
                    return;
                }
            };
            let (batch, cursor, exhausted) = match read {
                Ok(r) => r,
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            };
            let Some(cursor) = cursor else {
                // Nothing (more) to export; the head still reaches the client.
                if !sent_head {
                    let message = pb::StreamUsersResponse {
                        users: Vec::new(),
                        resume_token: resume.clone(),
                        head_revision,
                    };
                    let _ = tx.send(Ok(message)).await;
                }
                return;
            };
            // A batch larger than one message allows goes out in several,
            // each resumable after its own last user.
            let mut rest = &batch[..];
            while !rest.is_empty() {
                let users = fit_page(rest);
                let taken = users.len();
                let resume_token = if taken == rest.len() {
                    encode_page_token(&query, &cursor)
                } else {
                    next_page_token(&query, &rest[taken - 1])
                };
                rest = &rest[taken..];
                let message = pb::StreamUsersResponse {
                    users,
                    resume_token: resume_token.clone(),
                    head_revision: std::mem::take(&mut head_revision),
                };
                sent_head = true;
                tokio::select! {
                    sent = tx.send(Ok(message)) => {
                        if sent.is_err() {
                            return;
                        }
                        crate::metrics::exported(taken as u64);
                    }
                    () = until_draining(&mut draining) => {
                        let _ = tx.send(stop(&resume)).await;
                        return;
                    }
                }
                resume = resume_token;
            }
            drop(batch);
            if exhausted {
                return;
            }
            after = Some(cursor);
        }
    });
    ReceiverStream::new(rx)
}

/// Resolves once the server starts stopping (never, if it never does).
pub(super) async fn until_draining(rx: &mut tokio::sync::watch::Receiver<bool>) {
    if rx.wait_for(|d| *d).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Spawns a task that answers a stream through `tx`. Should it panic, the
/// client gets INTERNAL rather than a stream that simply ends, which would
/// read as a complete export or import.
pub(super) fn spawn_answering<T: Send + 'static>(
    tx: &mpsc::Sender<Result<T, Status>>,
    task: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let guard = tx.clone();
    // The caller's origin goes along: an import's events name it.
    let origin = crate::domain::events::Origin::current();
    let handle = tokio::spawn(crate::domain::events::Origin::scope(origin, task));
    tokio::spawn(async move {
        if let Err(e) = handle.await
            && e.is_panic()
        {
            tracing::error!("a streaming task panicked; answered INTERNAL");
            let _ = guard
                .send(Err(Status::from(DomainError::Internal("panic".into()))))
                .await;
        }
    });
}

pub(super) fn stream_batch_size(n: i32) -> Result<u32, String> {
    match n {
        n if n < 0 => Err("must not be negative".into()),
        0 => Ok(crate::domain::service::DEFAULT_STREAM_BATCH),
        n => Ok((n as u32).min(MAX_STREAM_BATCH)),
    }
}

pub(super) type ImportStream = ReceiverStream<Result<pb::ImportUsersResponse, Status>>;

/// The users of one chunk: the valid ones and the failures found while
/// parsing, with `last` the index of its last user.
struct Chunk {
    project: ProjectId,
    first: u64,
    last: u64,
    valid: Vec<(u64, NewUser)>,
    invalid: Vec<(u64, DomainError)>,
}

/// Runs an import: a reader task parses and validates the incoming users and
/// cuts them into chunks; a committer task stores one chunk at a time and
/// acknowledges it. The chunk being parsed overlaps the one being committed;
/// at most one more waits in between.
pub(super) fn import<R: UserRepository>(
    users: Arc<Users<R>>,
    caller: Arc<Caller>,
    inbound: Streaming<pb::ImportUsersRequest>,
    draining: tokio::sync::watch::Receiver<bool>,
) -> ImportStream {
    let (acks, rx) = mpsc::channel(4);
    let (chunks, mut todo) = mpsc::channel::<Result<Chunk, Status>>(1);
    spawn_answering(
        &chunks.clone(),
        read_import(inbound, caller.clone(), chunks, draining),
    );
    spawn_answering(&acks.clone(), async move {
        let mut log = ImportLog::default();
        let mut unanalyzed = 0;
        while let Some(next) = todo.recv().await {
            let chunk = match next {
                Ok(c) => c,
                Err(status) => {
                    let _ = acks.send(Err(status)).await;
                    return;
                }
            };
            let (first, last) = (chunk.first, chunk.last);
            let outcome = users
                .import_chunk(&chunk.project, chunk.valid, &mut log)
                .await;

            let ack = outcome.map_err(Status::from).map(|o| {
                let mut failures: Vec<(u64, DomainError)> = chunk.invalid;
                failures.extend(o.failures);
                failures.sort_by_key(|(i, _)| *i);
                pb::ImportUsersResponse {
                    committed_through: chunk.last as i64,
                    created_count: o.created as i64,
                    failures: failures
                        .into_iter()
                        .map(|(index, e)| pb::ImportFailure {
                            index: index as i64,
                            status: Some(rpc_status(e)),
                        })
                        .collect(),
                }
            });
            audit::record(
                &caller,
                "ImportUsers",
                chunk.project.as_str(),
                &format!("projects/{}", chunk.project),
                "",
                ack.as_ref().map_or_else(Status::code, |_| tonic::Code::Ok),
                Some(&format!(
                    "users {first}..={last}, created {}",
                    ack.as_ref().map_or(0, |a| a.created_count)
                )),
            );
            let failed = ack.is_err();
            if let Ok(a) = &ack {
                unanalyzed += a.created_count;
                let settled = last.saturating_sub(first) + 1;
                crate::metrics::imported(
                    a.created_count as u64,
                    settled.saturating_sub(a.created_count as u64),
                );
            }
            if unanalyzed >= ANALYZE_EVERY {
                users.refresh_statistics().await;
                unanalyzed = 0;
            }
            let mut closed = false;
            for part in split_ack(ack) {
                if acks.send(part).await.is_err() {
                    closed = true;
                    break;
                }
            }
            if closed || failed {
                break;
            }
        }
        // Before the stream ends: a client that queries right after its
        // import gets plans made with the new rows' statistics.
        if unanalyzed >= ANALYZE_AFTER {
            users.refresh_statistics().await;
        }
    });
    ReceiverStream::new(rx)
}

/// An acknowledgement whose failures would make it larger than a response
/// may be goes out as several: each settles the users up to its last failure
/// (the chunk is committed), the last one carries the chunk's end and its
/// created count.
fn split_ack(
    ack: Result<pb::ImportUsersResponse, Status>,
) -> Vec<Result<pb::ImportUsersResponse, Status>> {
    use prost::Message;
    let ack = match ack {
        Ok(a) if a.encoded_len() > PAGE_BYTES => a,
        other => return vec![other],
    };
    let mut out = Vec::new();
    let mut part = Vec::new();
    let mut bytes = 0;
    for f in ack.failures {
        let n = f.encoded_len() + 8;
        if !part.is_empty() && bytes + n > PAGE_BYTES {
            let through = part.last().map_or(0, |p: &pb::ImportFailure| p.index);
            out.push(Ok(pb::ImportUsersResponse {
                committed_through: through,
                created_count: 0,
                failures: std::mem::take(&mut part),
            }));
            bytes = 0;
        }
        bytes += n;
        part.push(f);
    }
    out.push(Ok(pb::ImportUsersResponse {
        committed_through: ack.committed_through,
        created_count: ack.created_count,
        failures: part,
    }));
    out
}

/// A domain error as the google.rpc.Status a client would have received.
fn rpc_status(e: DomainError) -> tonic_types::pb::Status {
    let status = Status::from(e);
    prost::Message::decode(status.details()).unwrap_or_else(|_| tonic_types::pb::Status {
        code: status.code() as i32,
        message: status.message().to_owned(),
        details: Vec::new(),
    })
}

async fn read_import(
    mut inbound: Streaming<pb::ImportUsersRequest>,
    caller: Arc<Caller>,
    chunks: mpsc::Sender<Result<Chunk, Status>>,
    mut draining: tokio::sync::watch::Receiver<bool>,
) {
    let mut project: Option<ProjectId> = None;
    let mut next_index: u64 = 0;
    let mut pending: Option<Chunk> = None;
    loop {
        // Wait for the client only when nothing is pending; otherwise a
        // pause of the client commits what it sent so far.
        let message = if pending.is_none() {
            tokio::select! {
                m = inbound.message() => m,
                // The server is stopping: what came is committed (nothing is
                // pending here); the client resends the rest elsewhere.
                () = until_draining(&mut draining) => {
                    let through = next_index.checked_sub(1).map(|i| i.to_string()).unwrap_or_default();
                    let _ = chunks
                        .send(Err(super::status::shutting_down(&[("committed_through", through)])))
                        .await;
                    return;
                }
            }
        } else {
            match futures_now(inbound.message()) {
                Some(m) => m,
                // The client paused: what is pending goes as soon as no
                // earlier chunk waits for the committer (one may be being
                // stored). Until then what arrives joins the pending chunk,
                // so chunks grow while the database is the slower side
                // (fewer, larger transactions) and stay small while the
                // client is.
                None => tokio::select! {
                    biased;
                    slot = chunks.reserve() => {
                        let Ok(slot) = slot else { return };
                        if let Some(c) = pending.take() {
                            slot.send(Ok(c));
                        }
                        continue;
                    }
                    m = inbound.message() => m,
                },
            }
        };
        let m = match message {
            Ok(Some(m)) => m,
            // The client finished sending: commit the rest.
            Ok(None) => {
                if let Some(c) = pending.take() {
                    let _ = chunks.send(Ok(c)).await;
                }
                return;
            }
            // A message the server cannot take (too large, not protobuf):
            // commit what came before it, then fail the call. If the client
            // went away instead, nobody reads either.
            Err(status) => {
                if let Some(c) = pending.take() {
                    let _ = chunks.send(Ok(c)).await;
                }
                let _ = chunks
                    .send(Err(super::status::from_transport(status)))
                    .await;
                return;
            }
        };
        if let Err(status) = check_parent(&mut project, &m.parent, &caller) {
            audit::record(
                &caller,
                "ImportUsers",
                ProjectId::parse_parent(&m.parent)
                    .as_ref()
                    .map_or("", |p| p.as_str()),
                "",
                "",
                status.code(),
                Some("refused: bad or ungranted parent"),
            );
            if let Some(c) = pending.take() {
                let _ = chunks.send(Ok(c)).await;
            }
            let _ = chunks.send(Err(status)).await;
            return;
        }
        let Some(project) = &project else { return };
        for u in &m.users {
            let index = next_index;
            next_index += 1;
            let chunk = pending.get_or_insert_with(|| Chunk {
                project: project.clone(),
                first: index,
                last: index,
                valid: Vec::new(),
                invalid: Vec::new(),
            });
            chunk.last = index;
            match parse_import_user(u, index, project) {
                Ok(new) => chunk.valid.push((index, new)),
                Err(e) => chunk.invalid.push((index, e)),
            }
            if chunk.valid.len() + chunk.invalid.len() >= IMPORT_CHUNK
                && let Some(c) = pending.take()
                && chunks.send(Ok(c)).await.is_err()
            {
                return;
            }
        }
    }
}

/// Polls a future once: its output if it is ready now.
fn futures_now<F: std::future::Future>(f: F) -> Option<F::Output> {
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    }
}

/// The first message names the project (which the caller must be granted);
/// later ones repeat it or leave it empty.
fn check_parent(
    project: &mut Option<ProjectId>,
    parent: &str,
    caller: &Caller,
) -> Result<(), Status> {
    match project {
        None => {
            let p = ProjectId::parse_parent(parent).map_err(|r| {
                let reason = if parent.is_empty() {
                    "is required in the first message".to_owned()
                } else {
                    r
                };
                DomainError::invalid("parent", reason)
            })?;
            record_project(p.as_str());
            caller.require_project(&p)?;
            *project = Some(p);
            Ok(())
        }
        Some(p) if parent.is_empty() || parent == format!("projects/{p}") => Ok(()),
        Some(_) => Err(DomainError::invalid(
            "parent",
            "must stay the same for the whole import (or be left empty after the first message)",
        )
        .into()),
    }
}

/// One imported user: every writable field as in CreateUser, plus `name`
/// (to choose the id) and `state` (PENDING, ACTIVE or DISABLED).
fn parse_import_user(
    u: &pb::User,
    index: u64,
    project: &ProjectId,
) -> Result<NewUser, DomainError> {
    let path = format!("users[{index}]");
    let mut v = Violations::default();
    let id = if u.name.is_empty() {
        None
    } else {
        match UserName::parse(&u.name) {
            Ok(n) if n.project == *project => Some(n.user),
            Ok(_) => {
                v.push(
                    format!("{path}.name"),
                    "must be a user of the import's parent",
                );
                None
            }
            Err(r) => {
                v.push(format!("{path}.name"), r);
                None
            }
        }
    };
    let initial_state = match pb::user::State::try_from(u.state) {
        Ok(pb::user::State::Unspecified | pb::user::State::Active) => State::Active,
        Ok(pb::user::State::Pending) => State::Pending,
        Ok(pb::user::State::Disabled) => State::Disabled,
        _ => {
            v.push(
                format!("{path}.state"),
                "must be PENDING, ACTIVE or DISABLED (or unset, meaning ACTIVE)",
            );
            State::Active
        }
    };
    let profile = parse_contactable(u, &path, &mut v);
    v.into_result()?;
    Ok(NewUser {
        project: project.clone(),
        id,
        profile,
        initial_state,
    })
}
