//! Point reads: GetUser (a row by primary key, soft-deleted rows included)
//! and LookupUser (the row holding a live identity). The statement reading a
//! batch of values of one key is defined once here, with the form each
//! engine runs best, and every read runs it:
//!
//! - PostgreSQL: `SELECT u.* FROM unnest($2::text[]) AS k(v), LATERAL
//!   (SELECT … FROM users WHERE project = $1 AND <key> = k.v [AND
//!   delete_time IS NULL] OFFSET 0) u`: one text whatever the batch size
//!   (prepared once per connection; like every statement of the pool it is
//!   planned at each run, see `connect_with`, and its plan is small), and
//!   one index probe per value. `OFFSET 0` keeps the subquery from being flattened into a join,
//!   so each probe is a single-value comparison, which always uses the
//!   index: `<key> = ANY($2)` on the partial unique indexes degrades to a
//!   scan of the whole project in PostgreSQL's generic plan while the
//!   table's statistics are stale (right after a bulk load, say). A
//!   `UNION ALL` of single-value probes, measured too, spent most of the
//!   backend's time planning and starting 32 branches.
//! - SQLite: a `UNION ALL` of single-value probes (`?1` the project), padded
//!   to one of a few fixed sizes so that each text is prepared once per
//!   connection.
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
/// `SIZES`; PostgreSQL's text is the same for every `n`).
fn build_sql(backend: DatabaseBackend, key: Key, n: usize) -> String {
    let live = if matches!(key, Key::Live(_)) {
        " AND delete_time IS NULL"
    } else {
        ""
    };
    let col = key.column();
    match backend {
        DatabaseBackend::Postgres => format!(
            "SELECT u.* FROM unnest($2::text[]) AS k(v), LATERAL (SELECT {COLUMNS} FROM users \
             WHERE project = $1 AND {col} = k.v{live} OFFSET 0) u"
        ),
        _ => (0..n)
            .map(|i| {
                format!(
                    "SELECT {COLUMNS} FROM users WHERE project = ?1 AND {col} = ?{}{live}",
                    i + 2
                )
            })
            .collect::<Vec<_>>()
            .join(" UNION ALL "),
    }
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
/// in `project`. On SQLite padding repeats the last value (duplicate rows
/// are harmless); PostgreSQL takes the values as one array.
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
    let pg = backend == DatabaseBackend::Postgres;
    let sql = TEXTS[&(pg, key, n)].clone();
    let mut params = Vec::with_capacity(n + 1);
    params.push(Value::from(project));
    if pg {
        params.push(Value::from(values.to_vec()));
    } else {
        params.extend((0..n).map(|i| Value::from(values[i.min(values.len() - 1)].as_str())));
    }
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
            // PostgreSQL takes the whole batch as one array.
            let per_statement = match backend {
                DatabaseBackend::Postgres => MAX_BATCH,
                _ => SIZES[SIZES.len() - 1],
            };
            for chunk in values.chunks(per_statement) {
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

    /// SQLite: padding repeats the last value, and the text has one probe per
    /// slot.
    #[test]
    fn statements_are_padded_to_a_fixed_size() {
        let values: Vec<String> = (0..3).map(|i| format!("v{i}")).collect();
        let s = statement(DatabaseBackend::Sqlite, "p", Key::Id, &values);
        assert_eq!(s.sql.matches("UNION ALL").count(), 3);
        let bound = s.values.expect("values").0;
        assert_eq!(bound.len(), 5);
        assert_eq!(bound[4], Value::from("v2"));
        let s = statement(
            DatabaseBackend::Sqlite,
            "p",
            Key::Live(LookupColumn::EmailKey),
            &values[..1],
        );
        assert!(s.sql.ends_with("email_key = ?2 AND delete_time IS NULL"));
        // PostgreSQL: one text, the values as one array.
        let s = statement(DatabaseBackend::Postgres, "p", Key::Id, &values);
        assert_eq!(s.values.expect("values").0.len(), 2);
    }
}
