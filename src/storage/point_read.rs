//! Point reads: GetUser (a row by primary key, soft-deleted rows included)
//! and LookupUser (the row holding a live identity). Each is one statement,
//! defined once here for both engines, and every read runs it:
//!
//! `SELECT … FROM users WHERE project = $1 AND <key> = $2 [AND delete_time
//! IS NULL] UNION ALL … WHERE project = $1 AND <key> = $3 …`
//!
//! one single-value probe per value, padded to one of a few fixed sizes so
//! that each text is prepared once per connection. The single-value form
//! always uses the index: `= ANY($2)` would be shorter, but on the partial
//! unique indexes PostgreSQL's generic plan for it degrades to a scan of the
//! whole project while the table's statistics are stale (right after a bulk
//! load, say).
//!
//! Concurrent reads are queued to a few batcher tasks; each takes what is
//! waiting (up to `MAX_BATCH`, never waiting for more) and answers every
//! caller of one project and key with one statement, run by the engine's
//! executor: on SQLite a reader thread's read-only connection (see
//! `sqlite_read`), on PostgreSQL (and SQLite in memory) the pool. One hand-off
//! to a reader thread or one round trip to a backend serves many callers.
//! `plans.rs` checks the plans of exactly these statements.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use sea_orm::{DatabaseBackend, DatabaseConnection, FromQueryResult, Statement, Value};
use tokio::sync::{Mutex, mpsc, oneshot};

use super::db_error;
use super::entity::users;
use super::sqlite_read::{COLUMNS, SqliteReaders};
use crate::domain::{DomainError, Identity, ProjectId, UserId};

const MAX_BATCH: usize = 128;
/// Probes per statement; batches are padded up to one of these.
pub(crate) const SIZES: [usize; 6] = [1, 2, 4, 8, 16, 32];

/// Which live identity a lookup compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum LookupColumn {
    EmailKey,
    PhoneNumber,
    Username,
    ExternalId,
}

/// Which rows a read wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Key {
    /// By primary key, soft-deleted rows included.
    Id,
    /// By a live (not deleted) identity.
    Live(LookupColumn),
}

impl Key {
    const ALL: [Key; 5] = [
        Key::Id,
        Key::Live(LookupColumn::EmailKey),
        Key::Live(LookupColumn::PhoneNumber),
        Key::Live(LookupColumn::Username),
        Key::Live(LookupColumn::ExternalId),
    ];

    fn column(self) -> &'static str {
        match self {
            Key::Id => "user_id",
            Key::Live(LookupColumn::EmailKey) => "email_key",
            Key::Live(LookupColumn::PhoneNumber) => "phone_number",
            Key::Live(LookupColumn::Username) => "username",
            Key::Live(LookupColumn::ExternalId) => "external_id",
        }
    }

    /// The value of `m` this key compares.
    fn of(self, m: &users::Model) -> Option<&str> {
        match self {
            Key::Id => Some(&m.user_id),
            Key::Live(LookupColumn::EmailKey) => m.email_key.as_deref(),
            Key::Live(LookupColumn::PhoneNumber) => m.phone_number.as_deref(),
            Key::Live(LookupColumn::Username) => m.username.as_deref(),
            Key::Live(LookupColumn::ExternalId) => m.external_id.as_deref(),
        }
    }

    /// The key and value a read of `identity` compares.
    pub(crate) fn of_identity(identity: &Identity) -> (Key, String) {
        match identity {
            Identity::Email(e) => (Key::Live(LookupColumn::EmailKey), e.key()),
            Identity::PhoneNumber(p) => {
                (Key::Live(LookupColumn::PhoneNumber), p.as_str().to_owned())
            }
            Identity::Username(u) => (Key::Live(LookupColumn::Username), u.as_str().to_owned()),
            Identity::ExternalId(x) => (Key::Live(LookupColumn::ExternalId), x.as_str().to_owned()),
        }
    }
}

/// The text of the statement reading `n` values of `key` (`n` one of
/// `SIZES`), in each engine's placeholder style.
fn build_sql(backend: DatabaseBackend, key: Key, n: usize) -> String {
    let mark = |i: usize| match backend {
        DatabaseBackend::Postgres => format!("${i}"),
        _ => format!("?{i}"),
    };
    let live = if matches!(key, Key::Live(_)) {
        " AND delete_time IS NULL"
    } else {
        ""
    };
    let col = key.column();
    (0..n)
        .map(|i| {
            format!(
                "SELECT {COLUMNS} FROM users WHERE project = {} AND {col} = {}{live}",
                mark(1),
                mark(i + 2)
            )
        })
        .collect::<Vec<_>>()
        .join(" UNION ALL ")
}

/// Every statement text, built once: by engine, key and size.
static TEXTS: LazyLock<HashMap<(bool, Key, usize), String>> = LazyLock::new(|| {
    let mut m = HashMap::new();
    for backend in [DatabaseBackend::Postgres, DatabaseBackend::Sqlite] {
        for key in Key::ALL {
            for n in SIZES {
                m.insert(
                    (backend == DatabaseBackend::Postgres, key, n),
                    build_sql(backend, key, n),
                );
            }
        }
    }
    m
});

/// The statement reading `values` (at most the largest of `SIZES`) of `key`
/// in `project`; padding repeats the last value (duplicate rows are
/// harmless).
pub(crate) fn statement(
    backend: DatabaseBackend,
    project: &str,
    key: Key,
    values: &[String],
) -> Statement {
    let n = SIZES
        .into_iter()
        .find(|s| *s >= values.len())
        .unwrap_or(SIZES[SIZES.len() - 1]);
    let sql = TEXTS[&(backend == DatabaseBackend::Postgres, key, n)].clone();
    let mut params = Vec::with_capacity(n + 1);
    params.push(Value::from(project));
    params.extend((0..n).map(|i| Value::from(values[i.min(values.len() - 1)].as_str())));
    Statement::from_sql_and_values(backend, sql, params)
}

/// Where the statements run.
#[derive(Clone)]
pub(crate) struct Executor {
    db: DatabaseConnection,
    /// SQLite on a file: the reader threads' connections.
    readers: Option<Arc<SqliteReaders>>,
}

impl Executor {
    pub(crate) fn new(db: DatabaseConnection, readers: Option<Arc<SqliteReaders>>) -> Self {
        Executor { db, readers }
    }

    async fn run(&self, stmt: Statement) -> Result<Vec<users::Model>, DomainError> {
        if let Some(r) = &self.readers {
            match r.users(&stmt).await {
                Ok(rows) => return Ok(rows),
                Err(e) => tracing::debug!(error = %e, "inline point read failed; using the pool"),
            }
        }
        users::Model::find_by_statement(stmt)
            .all(&self.db)
            .await
            .map_err(db_error)
    }
}

type Reply = oneshot::Sender<Result<Option<users::Model>, DomainError>>;

struct Job {
    project: String,
    key: Key,
    value: String,
    reply: Reply,
}

#[derive(Clone)]
pub(crate) struct PointReads {
    tx: mpsc::Sender<Job>,
}

impl PointReads {
    /// Starts `batchers` tasks running batches on `executor`.
    pub(crate) fn start(executor: Executor, batchers: usize) -> Self {
        let (tx, rx) = mpsc::channel(MAX_BATCH * 8);
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..batchers.max(1) {
            tokio::spawn(batcher(executor.clone(), rx.clone()));
        }
        PointReads { tx }
    }

    /// The user `id` of `project`, soft-deleted or not.
    pub(crate) async fn get(
        &self,
        project: &ProjectId,
        id: &UserId,
    ) -> Result<Option<users::Model>, DomainError> {
        self.read(project, Key::Id, id.as_str().to_owned()).await
    }

    /// The live user of `project` holding `identity`.
    pub(crate) async fn lookup(
        &self,
        project: &ProjectId,
        identity: &Identity,
    ) -> Result<Option<users::Model>, DomainError> {
        let (key, value) = Key::of_identity(identity);
        self.read(project, key, value).await
    }

    async fn read(
        &self,
        project: &ProjectId,
        key: Key,
        value: String,
    ) -> Result<Option<users::Model>, DomainError> {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            project: project.as_str().to_owned(),
            key,
            value,
            reply,
        };
        let stopped = || DomainError::Unavailable("the reader stopped".into());
        self.tx.send(job).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

async fn batcher(executor: Executor, rx: Arc<Mutex<mpsc::Receiver<Job>>>) {
    let backend = executor.db.get_database_backend();
    loop {
        let Some(jobs) = super::next_batch(&rx, MAX_BATCH).await else {
            return;
        };
        let mut groups: HashMap<(String, Key), Vec<Job>> = HashMap::new();
        for job in jobs {
            // A caller that has gone away needs no read.
            if job.reply.is_closed() {
                continue;
            }
            groups
                .entry((job.project.clone(), job.key))
                .or_default()
                .push(job);
        }
        for ((project, key), mut jobs) in groups {
            jobs.sort_by(|a, b| a.value.cmp(&b.value));
            let mut values: Vec<String> = jobs.iter().map(|j| j.value.clone()).collect();
            values.dedup();
            let mut found: HashMap<String, users::Model> = HashMap::new();
            let mut failed = None;
            for chunk in values.chunks(SIZES[SIZES.len() - 1]) {
                match executor.run(statement(backend, &project, key, chunk)).await {
                    Ok(rows) => {
                        for m in rows {
                            if let Some(v) = key.of(&m) {
                                found.insert(v.to_owned(), m);
                            }
                        }
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            // Jobs are sorted by value: every caller of a value but the
            // last gets a copy, the last the row itself.
            let mut jobs = jobs.into_iter().peekable();
            while let Some(job) = jobs.next() {
                let answer = match &failed {
                    Some(e) => Err(for_caller(e)),
                    None if jobs.peek().is_some_and(|n| n.value == job.value) => {
                        Ok(found.get(&job.value).cloned())
                    }
                    None => Ok(found.remove(&job.value)),
                };
                let _ = job.reply.send(answer);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Padding repeats the last value, and the text has one probe per slot.
    #[test]
    fn statements_are_padded_to_a_fixed_size() {
        let values: Vec<String> = (0..3).map(|i| format!("v{i}")).collect();
        let s = statement(DatabaseBackend::Sqlite, "p", Key::Id, &values);
        assert_eq!(s.sql.matches("UNION ALL").count(), 3);
        let bound = s.values.expect("values").0;
        assert_eq!(bound.len(), 5);
        assert_eq!(bound[4], Value::from("v2"));
        let s = statement(
            DatabaseBackend::Postgres,
            "p",
            Key::Live(LookupColumn::EmailKey),
            &values[..1],
        );
        assert!(s.sql.ends_with("email_key = $2 AND delete_time IS NULL"));
    }
}
