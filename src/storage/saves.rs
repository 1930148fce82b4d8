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
//! never wait on each other's rows in a cycle. If anything fails (a unique
//! index refuses a new email, a deadlock, a lost connection), the batch is
//! rolled back and every write runs again in a transaction of its own, which
//! reports its own error.

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
        if jobs.len() > 1 {
            match save_batch(&db, &outbox, &jobs).await {
                Ok(saved) => {
                    for (job, saved) in jobs.into_iter().zip(saved) {
                        let _ = job.reply.send(Ok(saved));
                    }
                    continue;
                }
                Err(e) => tracing::debug!(error = %e, "batched writes failed; one at a time"),
            }
        }
        for job in jobs {
            let r = save_alone(&db, &outbox, &job).await;
            let _ = job.reply.send(r);
        }
    }
}

/// The conditional UPDATE of one user and, if it matched, its index terms.
async fn save_in<C: ConnectionTrait>(
    conn: &C,
    next: &User,
    previous: &User,
) -> Result<bool, DbErr> {
    // Every column is written (`reset_all` marks them Set); the key is the
    // filter, not a value to write.
    let model = to_model(next).map_err(|e| DbErr::Custom(e.to_string()))?;
    let mut am = users::ActiveModel::from(model).reset_all();
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
) -> Result<Vec<bool>, DbErr> {
    let txn = db.begin().await?;
    let mut saved = Vec::with_capacity(jobs.len());
    let mut events = Vec::new();
    for job in jobs {
        let ok = save_in(&txn, &job.next, &job.previous).await?;
        if ok {
            events.push(Event::of_user_save_by(
                &job.previous,
                &job.next,
                job.origin.clone(),
            ));
        }
        saved.push(ok);
    }
    outbox.append(&txn, &events).await?;
    txn.commit().await?;
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
    let saved = match save_in(&txn, next, previous).await {
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
