//! Group commit for conditional writes of one user (UpdateUser, DeleteUser,
//! UndeleteUser, ActivateUser, DisableUser): concurrent writes are queued to
//! writer tasks that apply up to `MAX_BATCH` of them in one transaction, with
//! one bump of each project's event head and one commit, instead of one
//! transaction (and one wait for the head's row lock) per write.
//!
//! Each write keeps its own outcome: its conditional UPDATE matches the
//! revision its caller read, so a second write of the same user in one
//! batch loses the race as it would alone (its caller re-reads and tries
//! again). Rows are written in (project, user) order, so that two batches
//! never wait on each other's rows in a cycle. When one write's statement
//! fails (a unique index refuses a new email, a deadlock), the batch rolls
//! back, that write runs alone (and reports its own error), and the others
//! are batched again. When the database fails as a whole (no connection, a
//! failed commit, whose outcome is unknown), every write of the batch gets
//! that error: nothing is applied twice. A write whose caller has gone away
//! before its batch starts is not applied.
//!
//! Only the columns and index terms a write changes are written. On SQLite
//! a batch runs on the writer thread (`sqlite_write`) in one hand-off.

use std::sync::Arc;

use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DatabaseBackend, DatabaseConnection, DbErr,
    EntityTrait, Iterable, ModelTrait, QueryFilter, QueryTrait, Statement, TransactionTrait,
};
use tokio::sync::{Mutex, mpsc, oneshot};

use super::entity::users;
use super::events::Outbox;
use super::sqlite_write::{SqliteWriter, WriteError, check_rows, execute};
use super::{Stores, db_error, explain, terms, to_model};
use crate::domain::events::{Event, Origin};
use crate::domain::{DomainError, User};

/// Most writes one transaction applies.
const MAX_BATCH: usize = 128;

struct Job {
    next: User,
    /// The columns of `next`'s row that differ from `previous`'s, encoded
    /// on the caller's task.
    changes: users::ActiveModel,
    previous: User,
    /// The caller's, for the event (the writer task has none).
    origin: Arc<Origin>,
    reply: oneshot::Sender<Result<bool, DomainError>>,
}

#[derive(Clone)]
pub(crate) struct Saver {
    tx: mpsc::Sender<Job>,
}

impl Saver {
    /// Starts `writers` writer tasks (see `Batcher::start`).
    pub(crate) fn start(writers: usize, stores: Stores) -> Self {
        let (tx, rx) = mpsc::channel::<Job>(MAX_BATCH * 8);
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..writers.max(1) {
            tokio::spawn(writer(stores.clone(), rx.clone()));
        }
        Saver { tx }
    }

    /// Writes `next` over `previous` if the stored revision is still
    /// `previous.revision`; whether it did.
    pub(crate) async fn submit(&self, next: User, previous: User) -> Result<bool, DomainError> {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            changes: changes(&to_model(&next)?, &to_model(&previous)?),
            next,
            previous,
            origin: Origin::current(),
            reply,
        };
        let stopped = || DomainError::Unavailable("the writer stopped".into());
        self.tx.send(job).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

/// Why a batch did not commit.
enum Failed {
    /// The statement of this job failed (why, for the log).
    Job(usize, String),
    /// The database as a whole (begin, the events, the commit).
    Batch(DomainError),
    /// The writer thread is gone; nothing of the batch ran.
    Stopped,
}

async fn writer(stores: Stores, rx: Arc<Mutex<mpsc::Receiver<Job>>>) {
    let Stores { db, outbox, thread } = stores;
    loop {
        let Some(mut jobs) = super::next_batch(&rx, MAX_BATCH).await else {
            return;
        };
        // Stable: two writes of one user keep their order.
        jobs.sort_by(|a, b| {
            (a.next.project.as_str(), a.next.id.as_str())
                .cmp(&(b.next.project.as_str(), b.next.id.as_str()))
        });
        while !jobs.is_empty() {
            // A caller that went away gets nothing applied, as when its own
            // transaction was dropped.
            jobs.retain(|j| !j.reply.is_closed());
            if jobs.is_empty() {
                break;
            }
            let result = match &thread {
                Some(thread) => match save_batch_on(thread, &outbox, &jobs).await {
                    // Nothing ran: the pool writes instead.
                    Err(Failed::Stopped) => save_batch(&db, &outbox, &jobs).await,
                    other => other,
                },
                None => save_batch(&db, &outbox, &jobs).await,
            };
            match result {
                Ok(saved) => {
                    for (job, saved) in jobs.drain(..).zip(saved) {
                        let _ = job.reply.send(Ok(saved));
                    }
                }
                Err(Failed::Job(i, e)) => {
                    tracing::debug!(error = %e, "a batched write failed; it runs alone");
                    let job = jobs.remove(i);
                    let r = save_alone(&db, &outbox, &job).await;
                    let _ = job.reply.send(r);
                }
                Err(Failed::Batch(e)) => {
                    for job in jobs.drain(..) {
                        let _ = job.reply.send(Err(copy(&e)));
                    }
                }
                Err(Failed::Stopped) => {
                    for job in jobs.drain(..) {
                        let e = DomainError::Unavailable("the writer stopped".into());
                        let _ = job.reply.send(Err(e));
                    }
                }
            }
        }
    }
}

/// The error each write of a failed batch gets.
fn copy(e: &DomainError) -> DomainError {
    match e {
        DomainError::ConcurrentModification => DomainError::ConcurrentModification,
        DomainError::Unavailable(m) => DomainError::Unavailable(m.clone()),
        other => DomainError::Internal(other.to_string()),
    }
}

/// The columns of `next` whose values differ from those of `previous` (the
/// row the conditional UPDATE matches): only they are written, so that an
/// index none of whose columns changed is not rewritten (SQLite rewrites
/// the entry of every index whose column is assigned, even to its value).
fn changes(next: &users::Model, previous: &users::Model) -> users::ActiveModel {
    let mut am = <users::ActiveModel as Default>::default();
    for col in users::Column::iter() {
        let v = next.get(col);
        if v != previous.get(col) {
            am.set(col, v);
        }
    }
    am
}

/// The conditional UPDATE of one user: it changes one row when the stored
/// revision is still the one its caller read.
fn update_statement(backend: DatabaseBackend, job: &Job) -> Statement {
    let (next, previous) = (&job.next, &job.previous);
    users::Entity::update_many()
        .set(job.changes.clone())
        .filter(users::Column::Project.eq(next.project.as_str()))
        .filter(users::Column::UserId.eq(next.id.as_str()))
        .filter(users::Column::Revision.eq(previous.revision))
        // The same user, not one re-created under its id since.
        .filter(users::Column::CreateTime.eq(previous.create_time.nanos()))
        .build(backend)
}

/// The conditional UPDATE of one user and, if it matched, its index terms.
async fn save_in<C: ConnectionTrait>(conn: &C, job: &Job) -> Result<bool, DbErr> {
    let stmt = update_statement(conn.get_database_backend(), job);
    let saved = conn.execute_raw(stmt).await?.rows_affected() == 1;
    if saved {
        terms::replace(conn, &job.next, &job.previous).await?;
    }
    Ok(saved)
}

/// A batch in one transaction on the writer thread, in one hand-off: the
/// statements are built here, the writer runs each update and, when it
/// matched, the user's term changes, then the events of the writes that
/// matched, and commits.
async fn save_batch_on(
    thread: &SqliteWriter,
    outbox: &Arc<Outbox>,
    jobs: &[Job],
) -> Result<Vec<bool>, Failed> {
    let backend = DatabaseBackend::Sqlite;
    let writes: Vec<(Statement, Vec<Statement>)> = jobs
        .iter()
        .map(|j| {
            let terms = terms::change_statements(backend, &j.next, &j.previous);
            (update_statement(backend, j), terms)
        })
        .collect();
    let mut events: Vec<Option<Event>> = jobs
        .iter()
        .map(|j| {
            Some(Event::of_user_save_by(
                &j.previous,
                &j.next,
                j.origin.clone(),
            ))
        })
        .collect();
    let appender = outbox.clone();
    let run = move |conn: &mut rusqlite::Connection| {
        let txn = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| (None, WriteError::from(e)))?;
        let mut saved = Vec::with_capacity(writes.len());
        for (i, (update, terms)) in writes.iter().enumerate() {
            let matched = execute(&txn, update).map_err(|e| (Some(i), e))? == 1;
            if matched {
                for t in terms {
                    execute(&txn, t).map_err(|e| (Some(i), e))?;
                }
            } else {
                events[i] = None;
            }
            saved.push(matched);
        }
        let events: Vec<Event> = events.into_iter().flatten().collect();
        for step in appender.steps(backend, &events) {
            let changed = execute(&txn, &step.stmt).map_err(|e| (None, e))?;
            check_rows(step.rows, changed).map_err(|e| (None, e))?;
        }
        txn.commit().map_err(|e| (None, WriteError::from(e)))?;
        Ok::<_, (Option<usize>, WriteError)>((saved, !events.is_empty()))
    };
    match thread.call(run).await {
        Ok(Ok((saved, appended))) => {
            if appended {
                outbox.committed();
            }
            Ok(saved)
        }
        Ok(Err((Some(i), e))) => Err(Failed::Job(i, e.to_string())),
        Err(WriteError::Stopped) => Err(Failed::Stopped),
        Ok(Err((None, e))) | Err(e) => Err(Failed::Batch(e.into_domain("saving users"))),
    }
}

async fn save_batch(
    db: &DatabaseConnection,
    outbox: &Outbox,
    jobs: &[Job],
) -> Result<Vec<bool>, Failed> {
    let batch = |e| Failed::Batch(db_error(e));
    let txn = db.begin().await.map_err(batch)?;
    let mut saved = Vec::with_capacity(jobs.len());
    let mut events = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        let ok = save_in(&txn, job)
            .await
            .map_err(|e| Failed::Job(i, e.to_string()))?;
        if ok {
            events.push(Event::of_user_save_by(
                &job.previous,
                &job.next,
                job.origin.clone(),
            ));
        }
        saved.push(ok);
    }
    outbox.append(&txn, &events).await.map_err(batch)?;
    txn.commit().await.map_err(batch)?;
    if !events.is_empty() {
        outbox.committed();
    }
    Ok(saved)
}

/// One write in a transaction of its own, with its own error.
async fn save_alone(
    db: &DatabaseConnection,
    outbox: &Outbox,
    job: &Job,
) -> Result<bool, DomainError> {
    let (next, previous) = (&job.next, &job.previous);
    let txn = db.begin().await.map_err(db_error)?;
    let saved = match save_in(&txn, job).await {
        Ok(saved) => saved,
        Err(e) => {
            let e = db_error(e);
            let _ = txn.rollback().await;
            return Err(explain(db, next, false, e).await);
        }
    };
    if saved {
        outbox
            .append(
                &txn,
                &[Event::of_user_save_by(previous, next, job.origin.clone())],
            )
            .await
            .map_err(db_error)?;
    }
    txn.commit().await.map_err(db_error)?;
    if saved {
        outbox.committed();
    }
    Ok(saved)
}
