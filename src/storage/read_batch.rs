//! Batched point reads for PostgreSQL. Concurrent GetUser and LookupUser calls
//! are queued to a few reader tasks; each takes what is waiting (up to
//! `MAX_BATCH`, never waiting for more) and answers every caller of one
//! project and key with one query, so one round trip to a backend serves many
//! callers.
//!
//! - GetUser: `user_id = ANY($2)` on the primary key. Its text does not depend
//!   on the batch size, so it is prepared once per connection.
//! - LookupUser: a `UNION ALL` of single-value probes, padded to a few fixed
//!   sizes. `email_key = ANY($2)` would be shorter, but on the partial unique
//!   indexes PostgreSQL's generic plan for it degrades to a scan of the whole
//!   project while the table's statistics are stale (e.g. right after a bulk
//!   load); the single-value form always uses the index.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use sea_orm::{DatabaseConnection, DbBackend, FromQueryResult, Statement, Value};
use tokio::sync::{Mutex, mpsc, oneshot};

use super::db_error;
use super::entity::users;
use super::sqlite_read::{COLUMNS, LookupColumn};
use crate::domain::DomainError;

const MAX_BATCH: usize = 128;
/// Lookup probes per statement; batches are padded up to one of these.
const PROBE_SIZES: [usize; 6] = [1, 2, 4, 8, 16, 32];

/// Which rows a read wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Key {
    /// By primary key, soft-deleted rows included.
    Id,
    /// By a live (not deleted) identity.
    Live(LookupColumn),
}

type Reply = oneshot::Sender<Result<Option<users::Model>, DomainError>>;

struct Job {
    project: String,
    key: Key,
    value: String,
    reply: Reply,
}

#[derive(Clone)]
pub(crate) struct ReadBatcher {
    tx: mpsc::Sender<Job>,
}

impl ReadBatcher {
    pub(crate) fn start(db: DatabaseConnection, readers: usize) -> Self {
        let (tx, rx) = mpsc::channel(MAX_BATCH * 8);
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..readers.max(1) {
            tokio::spawn(reader(db.clone(), rx.clone()));
        }
        ReadBatcher { tx }
    }

    /// The row of `project` whose `key` is `value`.
    pub(crate) async fn read(
        &self,
        project: &str,
        key: Key,
        value: String,
    ) -> Result<Option<users::Model>, DomainError> {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            project: project.to_owned(),
            key,
            value,
            reply,
        };
        self.tx
            .send(job)
            .await
            .map_err(|_| DomainError::Unavailable("the reader stopped".into()))?;
        rx.await
            .map_err(|_| DomainError::Unavailable("the reader stopped".into()))?
    }
}

static BY_ID: LazyLock<String> = LazyLock::new(|| {
    format!("SELECT {COLUMNS} FROM users WHERE project = $1 AND user_id = ANY($2)")
});

/// `n` single-value probes of a live identity, `$1` the project.
fn probes_sql(column: LookupColumn, n: usize) -> String {
    let col = column.column();
    (0..n)
        .map(|i| {
            format!(
                "SELECT {COLUMNS} FROM users WHERE project = $1 AND {col} = ${} \
                 AND delete_time IS NULL",
                i + 2
            )
        })
        .collect::<Vec<_>>()
        .join(" UNION ALL ")
}

/// The value of `m` that a read by `key` matched.
fn matched(key: Key, m: &users::Model) -> Option<&str> {
    match key {
        Key::Id => Some(&m.user_id),
        Key::Live(LookupColumn::EmailKey) => m.email_key.as_deref(),
        Key::Live(LookupColumn::PhoneNumber) => m.phone_number.as_deref(),
        Key::Live(LookupColumn::Username) => m.username.as_deref(),
        Key::Live(LookupColumn::ExternalId) => m.external_id.as_deref(),
    }
}

async fn reader(db: DatabaseConnection, rx: Arc<Mutex<mpsc::Receiver<Job>>>) {
    loop {
        let Some(jobs) = super::next_batch(&rx, MAX_BATCH).await else {
            return;
        };
        let mut groups: HashMap<(String, Key), Vec<Job>> = HashMap::new();
        for job in jobs {
            groups
                .entry((job.project.clone(), job.key))
                .or_default()
                .push(job);
        }
        for ((project, key), jobs) in groups {
            let mut values: Vec<String> = jobs.iter().map(|j| j.value.clone()).collect();
            values.sort();
            values.dedup();
            let rows = fetch(&db, &project, key, values).await;
            match rows {
                Ok(rows) => {
                    let found: HashMap<&str, &users::Model> = rows
                        .iter()
                        .filter_map(|m| matched(key, m).map(|v| (v, m)))
                        .collect();
                    for job in jobs {
                        let row = found.get(job.value.as_str()).map(|m| (*m).clone());
                        let _ = job.reply.send(Ok(row));
                    }
                }
                Err(e) => {
                    for job in jobs {
                        let _ = job.reply.send(Err(for_caller(&e)));
                    }
                }
            }
        }
    }
}

async fn fetch(
    db: &DatabaseConnection,
    project: &str,
    key: Key,
    values: Vec<String>,
) -> Result<Vec<users::Model>, DomainError> {
    match key {
        Key::Id => {
            let stmt = Statement::from_sql_and_values(
                DbBackend::Postgres,
                BY_ID.as_str(),
                [Value::from(project), Value::from(values)],
            );
            users::Model::find_by_statement(stmt)
                .all(db)
                .await
                .map_err(db_error)
        }
        Key::Live(column) => {
            let mut out = Vec::new();
            for chunk in values.chunks(PROBE_SIZES[PROBE_SIZES.len() - 1]) {
                let size = PROBE_SIZES
                    .into_iter()
                    .find(|s| *s >= chunk.len())
                    .unwrap_or(chunk.len());
                let mut params = vec![Value::from(project)];
                // Padding repeats the last value; duplicate rows are harmless.
                params
                    .extend((0..size).map(|i| Value::from(chunk[i.min(chunk.len() - 1)].as_str())));
                let stmt = Statement::from_sql_and_values(
                    DbBackend::Postgres,
                    probes_sql(column, size),
                    params,
                );
                out.extend(
                    users::Model::find_by_statement(stmt)
                        .all(db)
                        .await
                        .map_err(db_error)?,
                );
            }
            Ok(out)
        }
    }
}

/// Every caller of a failed batch gets the failure; internal details stay in
/// the log written by `db_error`.
fn for_caller(e: &DomainError) -> DomainError {
    match e {
        DomainError::Unavailable(m) => DomainError::Unavailable(m.clone()),
        other => DomainError::Internal(other.to_string()),
    }
}
