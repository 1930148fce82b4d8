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

use std::sync::Arc;

use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DatabaseConnection, DbErr, EntityTrait,
    QueryFilter, TransactionTrait,
};
use tokio::sync::{Mutex, mpsc, oneshot};

use super::entity::users;
use super::events::Outbox;
use super::{db_error, explain, terms, to_model};
use crate::domain::events::{Event, Origin};
use crate::domain::{DomainError, User};

/// Most writes one transaction applies.
const MAX_BATCH: usize = 128;

struct Job {
    next: User,
    /// `next` as a row, encoded on the caller's task.
    model: users::Model,
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
    pub(crate) fn start(db: DatabaseConnection, writers: usize, outbox: Arc<Outbox>) -> Self {
        let (tx, rx) = mpsc::channel::<Job>(MAX_BATCH * 8);
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..writers.max(1) {
            tokio::spawn(writer(db.clone(), outbox.clone(), rx.clone()));
        }
        Saver { tx }
    }

    /// Writes `next` over `previous` if the stored revision is still
    /// `previous.revision`; whether it did.
    pub(crate) async fn submit(&self, next: User, previous: User) -> Result<bool, DomainError> {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            model: to_model(&next)?,
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
    /// The statement of this job failed.
    Job(usize, DbErr),
    /// The database as a whole (begin, the events, the commit).
    Batch(DbErr),
}

async fn writer(db: DatabaseConnection, outbox: Arc<Outbox>, rx: Arc<Mutex<mpsc::Receiver<Job>>>) {
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
            match save_batch(&db, &outbox, &jobs).await {
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
                    let e = db_error(e);
                    for job in jobs.drain(..) {
                        let _ = job.reply.send(Err(copy(&e)));
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

/// The conditional UPDATE of one user and, if it matched, its index terms.
async fn save_in<C: ConnectionTrait>(conn: &C, job: &Job) -> Result<bool, DbErr> {
    let (next, previous) = (&job.next, &job.previous);
    // Every column is written (`reset_all` marks them Set); the key is the
    // filter, not a value to write.
    let mut am = users::ActiveModel::from(job.model.clone()).reset_all();
    am.project = sea_orm::ActiveValue::NotSet;
    am.user_id = sea_orm::ActiveValue::NotSet;
    let res = users::Entity::update_many()
        .set(am)
        .filter(users::Column::Project.eq(next.project.as_str()))
        .filter(users::Column::UserId.eq(next.id.as_str()))
        .filter(users::Column::Revision.eq(previous.revision))
        .exec(conn)
        .await?;
    let saved = res.rows_affected == 1;
    if saved && terms::of(next) != terms::of(previous) {
        terms::replace(conn, next, previous).await?;
    }
    Ok(saved)
}

async fn save_batch(
    db: &DatabaseConnection,
    outbox: &Outbox,
    jobs: &[Job],
) -> Result<Vec<bool>, Failed> {
    let txn = db.begin().await.map_err(Failed::Batch)?;
    let mut saved = Vec::with_capacity(jobs.len());
    let mut events = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        let ok = save_in(&txn, job).await.map_err(|e| Failed::Job(i, e))?;
        if ok {
            events.push(Event::of_user_save_by(
                &job.previous,
                &job.next,
                job.origin.clone(),
            ));
        }
        saved.push(ok);
    }
    outbox.append(&txn, &events).await.map_err(Failed::Batch)?;
    txn.commit().await.map_err(Failed::Batch)?;
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
