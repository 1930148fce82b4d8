//! Batched GetUser for PostgreSQL. Concurrent calls are queued to a few reader
//! tasks; each takes what is waiting (up to `MAX_BATCH`, never waiting for
//! more) and serves every call of one project with a single
//! `user_id = ANY($2)` query on the primary key, so one round trip to a backend
//! answers many callers. The statement text does not depend on the batch size,
//! so it is prepared once per connection.
//!
//! LookupUser is not batched: on the partial unique indexes, PostgreSQL's
//! generic plan for `email_key = ANY($2)` degrades to a scan of the project
//! while the table's statistics are stale (e.g. right after a bulk load),
//! whereas the single-value form always uses the index.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use sea_orm::{DatabaseConnection, DbBackend, FromQueryResult, Statement, Value};
use tokio::sync::{Mutex, mpsc, oneshot};

use super::db_error;
use super::entity::users;
use super::sqlite_read::COLUMNS;
use crate::domain::DomainError;

const MAX_BATCH: usize = 128;

struct Job {
    project: String,
    user_id: String,
    reply: oneshot::Sender<Result<Option<users::Model>, DomainError>>,
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

    /// The user with this primary key, soft-deleted or not.
    pub(crate) async fn get(
        &self,
        project: &str,
        user_id: &str,
    ) -> Result<Option<users::Model>, DomainError> {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            project: project.to_owned(),
            user_id: user_id.to_owned(),
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

static SQL: LazyLock<String> = LazyLock::new(|| {
    format!("SELECT {COLUMNS} FROM users WHERE project = $1 AND user_id = ANY($2)")
});

async fn reader(db: DatabaseConnection, rx: Arc<Mutex<mpsc::Receiver<Job>>>) {
    loop {
        let mut jobs = Vec::new();
        {
            let mut rx = rx.lock().await;
            match rx.recv().await {
                Some(job) => jobs.push(job),
                None => return,
            }
            while jobs.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
        }
        let mut groups: HashMap<String, Vec<Job>> = HashMap::new();
        for job in jobs {
            groups.entry(job.project.clone()).or_default().push(job);
        }
        for (project, jobs) in groups {
            let mut ids: Vec<String> = jobs.iter().map(|j| j.user_id.clone()).collect();
            ids.sort();
            ids.dedup();
            let stmt = Statement::from_sql_and_values(
                DbBackend::Postgres,
                SQL.as_str(),
                [Value::from(project), Value::from(ids)],
            );
            match users::Model::find_by_statement(stmt).all(&db).await {
                Ok(rows) => {
                    let found: HashMap<&str, &users::Model> =
                        rows.iter().map(|m| (m.user_id.as_str(), m)).collect();
                    for job in jobs {
                        let row = found.get(job.user_id.as_str()).map(|m| (*m).clone());
                        let _ = job.reply.send(Ok(row));
                    }
                }
                Err(e) => {
                    let e = db_error(e);
                    for job in jobs {
                        let _ = job.reply.send(Err(for_caller(&e)));
                    }
                }
            }
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
