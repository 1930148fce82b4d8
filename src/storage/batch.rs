//! Group commit for CreateUser: concurrent creates are queued to writer tasks
//! that store up to `MAX_BATCH` users in one transaction (one multi-row INSERT
//! when nothing conflicts), so a burst of sign-ups costs one commit per batch
//! instead of one per user. Every constraint still holds: a unique violation
//! inside a batch is isolated with savepoints and reported to its own caller
//! only, and a batch that fails as a whole is retried one user at a time.

use std::sync::Arc;

use sea_orm::{
    DatabaseConnection, DatabaseTransaction, DbErr, EntityTrait, SqlErr, TransactionTrait,
};
use tokio::sync::{Mutex, mpsc, oneshot};

use super::bulk::store_on;
use super::entity::users;
use super::events::Outbox;
use super::{Stores, claim_key, db_error, encode_response, explain, find_request, terms, to_model};
use crate::domain::events::{Event, Origin};
use crate::domain::{Created, DomainError, IdempotencyKey, User};

/// Most users one transaction stores.
const MAX_BATCH: usize = 256;

struct Job {
    user: User,
    key: Option<IdempotencyKey>,
    /// The caller's, for the creation event (the writer task has none).
    origin: Arc<Origin>,
    reply: oneshot::Sender<Result<Created, DomainError>>,
}

/// What became of one user of a batch.
enum Outcome {
    Inserted,
    /// The idempotency key was already stored by an earlier request.
    KeyTaken,
}

#[derive(Clone)]
pub(crate) struct Batcher {
    tx: mpsc::Sender<Job>,
}

impl Batcher {
    /// Starts `writers` writer tasks (a few for PostgreSQL; on SQLite, whose
    /// writes are serial anyway, two with a writer thread: one builds its
    /// batch while the thread runs the other's).
    pub(crate) fn start(writers: usize, stores: Stores) -> Self {
        let (tx, rx) = mpsc::channel::<Job>(MAX_BATCH * 8);
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..writers.max(1) {
            tokio::spawn(writer(stores.clone(), rx.clone()));
        }
        Batcher { tx }
    }

    pub(crate) async fn submit(
        &self,
        user: User,
        key: Option<IdempotencyKey>,
    ) -> Result<Created, DomainError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job {
                user,
                key,
                origin: Origin::current(),
                reply,
            })
            .await
            .map_err(|_| DomainError::Unavailable("the writer stopped".into()))?;
        rx.await
            .map_err(|_| DomainError::Unavailable("the writer stopped".into()))?
    }
}

async fn writer(stores: Stores, rx: Arc<Mutex<mpsc::Receiver<Job>>>) {
    loop {
        let Some(jobs) = super::next_batch(&rx, MAX_BATCH).await else {
            return;
        };
        commit_batch(&stores, jobs).await;
    }
}

async fn commit_batch(stores: &Stores, jobs: Vec<Job>) {
    crate::metrics::create_batch(jobs.len());
    let (db, outbox) = (&stores.db, &*stores.outbox);
    // On the writer thread in one hand-off when nothing needs a savepoint:
    // no idempotency keys, no conflict. Otherwise (or when it fails) the
    // pool's path below finds out each user's own outcome.
    if let Some(thread) = &stores.thread
        && jobs.iter().all(|j| j.key.is_none())
    {
        let users: Vec<&User> = jobs.iter().map(|j| &j.user).collect();
        let events: Vec<Event> = jobs
            .iter()
            .map(|j| Event::user_created(&j.user, j.origin.clone()))
            .collect();
        match store_on(thread, outbox, &users, &events).await {
            Ok(()) => {
                outbox.committed();
                for job in jobs {
                    let _ = job.reply.send(Ok(Created::New(job.user)));
                }
                return;
            }
            Err(e) => tracing::debug!(error = %e, "a batch of creates runs through the pool"),
        }
    }
    match store_batch(db, outbox, &jobs).await {
        Ok(outcomes) => {
            for (job, outcome) in jobs.into_iter().zip(outcomes) {
                let result = match outcome {
                    Ok(outcome) => resolve(db, &job, outcome).await,
                    Err(e) => Err(e),
                };
                let _ = job.reply.send(result);
            }
        }
        // The batch as a whole failed (a deadlock between writers, a busy
        // database, a lost connection): each user gets a transaction of its own.
        Err(_) => {
            for job in jobs {
                let result = match store_alone(db, outbox, &job).await {
                    Ok(Ok(outcome)) => resolve(db, &job, outcome).await,
                    Ok(Err(e)) => Err(e),
                    Err(e) => Err(db_error(e)),
                };
                let _ = job.reply.send(result);
            }
        }
    }
}

/// The caller's answer once its user's fate is committed.
async fn resolve(
    db: &DatabaseConnection,
    job: &Job,
    outcome: Outcome,
) -> Result<Created, DomainError> {
    match (outcome, &job.key) {
        (Outcome::Inserted, _) => Ok(Created::New(job.user.clone())),
        (Outcome::KeyTaken, Some(key)) => {
            match find_request(db, job.user.project.as_str(), &key.request_id).await? {
                Some((fingerprint, user)) => Ok(Created::Earlier { fingerprint, user }),
                None => Err(DomainError::Unavailable(
                    "idempotency key vanished while in use; retry".into(),
                )),
            }
        }
        (Outcome::KeyTaken, None) => Err(DomainError::Internal("key outcome without key".into())),
    }
}

type ItemResult = Result<Outcome, DomainError>;

/// Stores a batch in one transaction. The outer error fails the whole batch;
/// the inner results are per user.
async fn store_batch(
    db: &DatabaseConnection,
    outbox: &Outbox,
    jobs: &[Job],
) -> Result<Vec<ItemResult>, DbErr> {
    let txn = db.begin().await?;
    let mut results: Vec<Option<ItemResult>> = jobs.iter().map(|_| None).collect();

    let plain: Vec<usize> = (0..jobs.len()).filter(|i| jobs[*i].key.is_none()).collect();
    if !plain.is_empty() {
        let mut models = Vec::with_capacity(plain.len());
        for &i in &plain {
            match to_model(&jobs[i].user) {
                Ok(m) => models.push(users::ActiveModel::from(m)),
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        let sp = txn.begin().await?;
        let stored = plain.iter().filter(|i| results[**i].is_none());
        let stored: Vec<&User> = stored.map(|&i| &jobs[i].user).collect();
        let inserted = match insert_chunked(&sp, models).await {
            Ok(()) => terms::insert(&sp, stored).await,
            Err(e) => Err(e),
        };
        match inserted {
            Ok(()) => {
                sp.commit().await?;
                for &i in &plain {
                    results[i].get_or_insert(Ok(Outcome::Inserted));
                }
            }
            Err(e) if matches!(e.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) => {
                // Someone in (or before) this batch holds an identifier: find
                // out who, one savepoint per user.
                sp.rollback().await?;
                for &i in &plain {
                    if results[i].is_none() {
                        results[i] = Some(store_one(&txn, &jobs[i].user, None).await?);
                    }
                }
            }
            Err(e) => return Err(e),
        }
    }
    for (i, job) in jobs.iter().enumerate() {
        if job.key.is_some() {
            results[i] = Some(store_one(&txn, &job.user, job.key.as_ref()).await?);
        }
    }
    let events: Vec<Event> = jobs
        .iter()
        .zip(&results)
        .filter(|(_, r)| matches!(r, Some(Ok(Outcome::Inserted))))
        .map(|(job, _)| Event::user_created(&job.user, job.origin.clone()))
        .collect();
    outbox.append(&txn, &events).await?;
    txn.commit().await?;
    if !events.is_empty() {
        outbox.committed();
    }
    Ok(results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(DomainError::Internal("unprocessed".into()))))
        .collect())
}

/// `items` cut into parts of the fixed `sizes` (largest first, the last 1):
/// a multi-row statement's text depends on its row count, and a few fixed
/// counts keep every shape in the prepared-statement cache instead of
/// parsing a new one per batch.
pub(crate) fn fixed_parts<T>(items: Vec<T>, sizes: &[usize]) -> Vec<Vec<T>> {
    let mut out = Vec::new();
    // Each part is a vector of its own size (cutting with `split_off` would
    // leave every part holding the capacity of what it was cut from).
    let mut rest = items.into_iter();
    while rest.len() > 0 {
        let size = sizes
            .iter()
            .copied()
            .find(|s| *s > 0 && *s <= rest.len())
            .unwrap_or(1);
        out.push(rest.by_ref().take(size).collect());
    }
    out
}

/// The multi-row INSERTs of `models`.
pub(crate) fn user_statements(
    backend: sea_orm::DatabaseBackend,
    models: Vec<users::ActiveModel>,
) -> Vec<sea_orm::Statement> {
    use sea_orm::QueryTrait;
    fixed_parts(models, &[64, 16, 4, 1])
        .into_iter()
        .map(|part| users::Entity::insert_many(part).build(backend))
        .collect()
}

/// Inserts `models` with the statements of `user_statements`.
pub(crate) async fn insert_chunked<C: sea_orm::ConnectionTrait>(
    conn: &C,
    models: Vec<users::ActiveModel>,
) -> Result<(), DbErr> {
    for stmt in user_statements(conn.get_database_backend(), models) {
        conn.execute_raw(stmt).await?;
    }
    Ok(())
}

/// Stores one user in a transaction of its own.
async fn store_alone(
    db: &DatabaseConnection,
    outbox: &Outbox,
    job: &Job,
) -> Result<ItemResult, DbErr> {
    let txn = db.begin().await?;
    let r = store_one(&txn, &job.user, job.key.as_ref()).await?;
    let inserted = matches!(r, Ok(Outcome::Inserted));
    if inserted {
        outbox
            .append(&txn, &[Event::user_created(&job.user, job.origin.clone())])
            .await?;
    }
    txn.commit().await?;
    if inserted {
        outbox.committed();
    }
    Ok(r)
}

/// Stores one user (and its idempotency key) inside `conn`'s transaction,
/// within a savepoint so that a conflict leaves the rest untouched.
async fn store_one(
    conn: &DatabaseTransaction,
    user: &User,
    key: Option<&IdempotencyKey>,
) -> Result<ItemResult, DbErr> {
    let model = match to_model(user) {
        Ok(m) => m,
        Err(e) => return Ok(Err(e)),
    };
    let sp = conn.begin().await?;
    if let Some(key) = key {
        // The key goes in first: a concurrent twin blocks on it and then
        // replays this request instead of tripping over its email.
        let response = match encode_response(std::slice::from_ref(&model)) {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        let inserted = claim_key(&sp, user, key, response).await?;
        if !inserted {
            sp.rollback().await?;
            return Ok(Ok(Outcome::KeyTaken));
        }
    }
    match users::Entity::insert(users::ActiveModel::from(model))
        .exec_without_returning(&sp)
        .await
    {
        Ok(_) => {
            terms::insert(&sp, [user]).await?;
            sp.commit().await?;
            Ok(Ok(Outcome::Inserted))
        }
        Err(e) if matches!(e.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) => {
            sp.rollback().await?;
            Ok(Err(explain(conn, user, true, db_error(e)).await))
        }
        Err(e) => Err(e),
    }
}
