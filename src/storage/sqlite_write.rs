//! Bulk writes on the SQLite engine through one read-write rusqlite
//! connection, owned by a writer thread of its own: import chunks
//! (`begin`, in parts) and batches of conditional writes (`call`, whole).
//!
//! An import chunk is thousands of statements (users, their index terms,
//! their events). Through sqlx each statement is one hand-off to the
//! connection's worker thread and back, and the service's task waits for it
//! before handing over the next: a profile of a 200,000-user import showed
//! the two cores 37 % idle, the database and the service taking turns. Here
//! the caller builds the statements (with the same builders the pool path
//! and the other engine run) and hands them over in parts of a few hundred
//! users, building the next part while the writer thread runs the last one
//! with cached prepared statements; it waits once, for the commit. SQLite has
//! one writer at a time: this connection takes the write lock when its
//! transaction begins (`BEGIN IMMEDIATE`) and waits
//! for the pool's writers as they wait for it (busy timeout).

use std::time::Duration;

use rusqlite::{Connection, OpenFlags, TransactionBehavior};
use sea_orm::Statement;
use tokio::sync::oneshot;

use tracing::{error, warn};

use super::sqlite_read::{file_of, params};
use crate::domain::DomainError;

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// Why a transaction did not commit.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WriteError {
    /// A unique index (or primary key) refused a row; nothing was written.
    #[error("unique constraint failed: {0}")]
    Unique(String),
    #[error("{0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("a statement changed {changed} rows, not {expected}")]
    Changed { expected: u64, changed: u64 },
    #[error("the SQLite writer stopped")]
    Stopped,
    #[error("the transaction was dropped before its commit")]
    Abandoned,
    #[error("building a statement failed: {0}")]
    Build(String),
}

/// One statement of a transaction, with the number of rows it must change
/// when that is known (anything else rolls the transaction back).
pub(crate) struct Step {
    pub(crate) stmt: Statement,
    pub(crate) rows: Option<u64>,
}

/// Whether a step that must change `rows` rows (when known) and changed
/// `changed` may go on.
pub(crate) fn check_rows(rows: Option<u64>, changed: u64) -> Result<(), WriteError> {
    match rows {
        Some(expected) if expected != changed => Err(WriteError::Changed { expected, changed }),
        _ => Ok(()),
    }
}

impl From<Statement> for Step {
    fn from(stmt: Statement) -> Self {
        Step { stmt, rows: None }
    }
}

pub(crate) struct SqliteWriter {
    jobs: flume::Sender<Job>,
}

/// How long a transaction waits for the write lock (as the pool's
/// connections do).
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Pages in the write-ahead log before a commit of the writer checkpoints
/// it itself (64 MiB of 4 KiB pages): only when the checkpointer falls
/// behind.
const WAL_PAGES: i64 = 16384;

/// Least time between two checkpoints of the checkpointer: a page written
/// many times in between is copied once.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(50);

/// Bytes the log file is cut back to after a checkpoint.
const WAL_LIMIT: i64 = 64 << 20;

impl SqliteWriter {
    /// Opens a read-write connection to the (existing) database file of a
    /// sqlite:// URL and starts its thread; `None` for in-memory databases
    /// or anything that cannot be opened (the pool then does every write).
    pub(crate) fn open(url: &str) -> Option<Self> {
        let path = file_of(url)?;
        let opened = Self::connect(&path);
        if let Err(e) = &opened {
            warn!(error = %e, "no SQLite writer thread; imports write through the pool");
        }
        let mut conn = opened.ok()?;
        // Wakes the checkpointer after a job (never blocks: one pending
        // wake-up is enough).
        let (wrote, dirty) = flume::bounded::<()>(1);
        match Self::connect(&path) {
            Ok(checkpoints) => checkpointer(checkpoints, dirty),
            Err(e) => warn!(error = %e, "no SQLite checkpointer; the writer checkpoints"),
        }
        let (jobs, queue) = flume::unbounded::<Job>();
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || {
                // Ends when the repository (the last sender) is dropped.
                while let Ok(job) = queue.recv() {
                    // A failed rollback (or a panic) must not leave the
                    // next job inside this one's transaction.
                    if !conn.is_autocommit() {
                        let _ = conn.execute_batch("ROLLBACK");
                    }
                    let _ =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&mut conn)));
                    let _ = wrote.try_send(());
                }
            })
            .ok()?;
        Some(Self { jobs })
    }

    fn connect(path: &std::path::Path) -> Result<Connection, WriteError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        // The pool's settings (see `connect_with`).
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.pragma_update(None, "synchronous", "normal")?;
        conn.pragma_update(None, "foreign_keys", true)?;
        conn.pragma_update(None, "temp_store", "memory")?;
        let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(WriteError::Build(format!("journal mode {mode}, not wal")));
        }
        // A chunk dirties pages all over the term and identifier indexes;
        // checkpointing after every 1000 pages (the default) copies the
        // same hot pages into the file again and again. The checkpointer
        // copies the log at most every `CHECKPOINT_EVERY`, on its own
        // thread; the writer only when the log outgrows `WAL_PAGES`. The
        // file is cut back to `WAL_LIMIT` after each.
        conn.pragma_update(None, "wal_autocheckpoint", WAL_PAGES)?;
        conn.pragma_update(None, "journal_size_limit", WAL_LIMIT)?;
        // Every multi-row shape of users, terms and events, and the
        // updates' shapes (one per set of changed columns).
        conn.set_prepared_statement_cache_capacity(64);
        Ok(conn)
    }

    /// Runs `f` with the connection on the writer thread (outside any
    /// transaction: `f` begins and ends its own) and gives back its result;
    /// the caller waits asynchronously.
    pub(crate) async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> R + Send + 'static,
    ) -> Result<R, WriteError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Box::new(move |conn: &mut Connection| {
                let _ = tx.send(f(conn));
            }))
            .map_err(|_| WriteError::Stopped)?;
        rx.await.map_err(|_| WriteError::Stopped)
    }

    /// Begins a transaction on the writer thread (it waits there for the
    /// write lock); the caller then hands over its statements in parts with
    /// `Transaction::run` while building the next part, and commits. The
    /// caller waits asynchronously. A transaction whose handle is dropped
    /// before `commit` rolls back.
    pub(crate) fn begin(&self) -> Result<Transaction, WriteError> {
        let (parts, queue) = flume::bounded::<Part>(2);
        let (tx, done) = oneshot::channel();
        self.jobs
            .send(Box::new(move |conn: &mut Connection| {
                let _ = tx.send(run(conn, &queue));
            }))
            .map_err(|_| WriteError::Stopped)?;
        Ok(Transaction { parts, done })
    }
}

/// Copies the write-ahead log into the database file on a thread of its own
/// (`PRAGMA wal_checkpoint(PASSIVE)`: it never waits for, nor blocks, the
/// writer or the readers), after the writer's jobs and at most every
/// `CHECKPOINT_EVERY`. Before, the writer did it when a commit found the log
/// over its limit: a copy of up to 32 MiB and two fsyncs of 20-100 ms each,
/// during which no write could run (creates measured p99 160-290 ms; with a
/// 250 ms interval still 180 ms, as each fsync then covered more).
/// Ends with the writer thread.
fn checkpointer(conn: Connection, dirty: flume::Receiver<()>) {
    let run = move || {
        while dirty.recv().is_ok() {
            if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                warn!(error = %e, "checkpoint failed; the writer checkpoints when the log is full");
            }
            std::thread::sleep(CHECKPOINT_EVERY);
        }
    };
    if let Err(e) = std::thread::Builder::new()
        .name("sqlite-checkpoint".into())
        .spawn(run)
    {
        warn!(error = %e, "no SQLite checkpointer; the writer checkpoints");
    }
}

/// Runs one statement (prepared once per connection); the rows it changed.
pub(crate) fn execute(conn: &Connection, stmt: &Statement) -> Result<u64, WriteError> {
    Ok(conn
        .prepare_cached(&stmt.sql)?
        .execute(rusqlite::params_from_iter(params(stmt)?))
        .map_err(classify)? as u64)
}

enum Part {
    Steps(Vec<Step>),
    Commit,
}

/// A transaction running on the writer thread (see `SqliteWriter::begin`).
pub(crate) struct Transaction {
    parts: flume::Sender<Part>,
    done: oneshot::Receiver<Result<(), WriteError>>,
}

impl Transaction {
    /// Hands `steps` over; they run after those handed over before. When
    /// the transaction has already failed, its error.
    pub(crate) async fn run(&mut self, steps: Vec<Step>) -> Result<(), WriteError> {
        if self.parts.send_async(Part::Steps(steps)).await.is_ok() {
            return Ok(());
        }
        // The writer stopped taking parts: it rolled back.
        Err((&mut self.done)
            .await
            .map_err(|_| WriteError::Stopped)?
            .err()
            .unwrap_or(WriteError::Stopped))
    }

    /// Commits once every step handed over has run.
    pub(crate) async fn commit(self) -> Result<(), WriteError> {
        let _ = self.parts.send_async(Part::Commit).await;
        self.done.await.map_err(|_| WriteError::Stopped)?
    }
}

fn run(conn: &mut Connection, parts: &flume::Receiver<Part>) -> Result<(), WriteError> {
    // The write lock is taken once the first part is here, not while the
    // caller is still building it.
    let Ok(mut part) = parts.recv() else {
        return Err(WriteError::Abandoned);
    };
    let txn = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    loop {
        let steps = match part {
            Part::Steps(steps) => steps,
            Part::Commit => {
                txn.commit()?;
                return Ok(());
            }
        };
        for step in &steps {
            check_rows(step.rows, execute(&txn, &step.stmt)?)?;
        }
        // Waits (on this thread) for the caller's next part. A caller that
        // went away closes the queue without a commit: what it queued is
        // not run, and dropping `txn` rolls back.
        part = match parts.recv() {
            Ok(next) if !parts.is_disconnected() || matches!(next, Part::Commit) => next,
            _ => return Err(WriteError::Abandoned),
        };
    }
}

impl WriteError {
    /// A client's view: the database is busy or unreachable (retry), or
    /// something is wrong with this service (logged).
    pub(crate) fn into_domain(self, what: &str) -> DomainError {
        let transient = match &self {
            WriteError::Sqlite(rusqlite::Error::SqliteFailure(f, _)) => matches!(
                f.code,
                rusqlite::ErrorCode::DatabaseBusy
                    | rusqlite::ErrorCode::DatabaseLocked
                    | rusqlite::ErrorCode::SystemIoFailure
                    | rusqlite::ErrorCode::DiskFull
            ),
            WriteError::Stopped | WriteError::Abandoned => true,
            _ => false,
        };
        if transient {
            warn!(error = %self, "{what}: database unavailable");
            DomainError::Unavailable(format!("{what}: {self}"))
        } else {
            error!(error = %self, "{what}: database error");
            DomainError::Internal(format!("{what}: {self}"))
        }
    }
}

fn classify(e: rusqlite::Error) -> WriteError {
    use rusqlite::ffi;
    match &e {
        rusqlite::Error::SqliteFailure(f, msg)
            if f.extended_code == ffi::SQLITE_CONSTRAINT_UNIQUE
                || f.extended_code == ffi::SQLITE_CONSTRAINT_PRIMARYKEY =>
        {
            WriteError::Unique(msg.clone().unwrap_or_default())
        }
        _ => WriteError::Sqlite(e),
    }
}
