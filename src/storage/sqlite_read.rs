//! Reads on the SQLite engine through read-only rusqlite connections.
//!
//! sqlx runs every SQLite connection on a worker thread of its own and hands
//! each statement and each row across threads; a profile of GetUser showed
//! most of the server's CPU in those hand-offs (futex wake/wait, channel
//! traffic), not in SQLite. Reads instead run on read-only connections to the
//! same file (WAL mode: readers never wait for the writer) with cached
//! prepared statements, each owned by a reader thread of its own: never on
//! an async worker, and a caller waits for its answer asynchronously. A call
//! that is cancelled (the client went away, its deadline passed) interrupts
//! its statement. Writes stay on sea-orm, except import chunks (see
//! `sqlite_write`).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, InterruptHandle, OpenFlags, Row};

use super::entity::users;

/// Column list in the order of `users::Model`'s fields.
pub(crate) const COLUMNS: &str = "project, user_id, email, email_key, email_verified, phone_number, \
    phone_number_verified, secondary_emails, secondary_phone_numbers, username, external_id, \
    display_name, given_name, middle_name, family_name, title, birthday, preferred_locale, \
    picture_uri, addresses, bio, note, tags, roles, metadata, custom_data, last_login_time, \
    state, pre_delete_state, create_time, update_time, delete_time, purge_time, revision";

/// A few read-only connections, each owned by a thread of its own that
/// runs the reads queued to it.
///
/// A profile of GetUser with one `spawn_blocking` per read showed the
/// server's time in thread hand-offs (a futex wake and a context switch for
/// every read, both ways), not in SQLite. A reader thread that finds the
/// queue non-empty takes the next read without sleeping, so under load the
/// hand-off costs a queue push; the async caller only awaits its reply.
pub(crate) struct SqliteReaders {
    jobs: flume::Sender<Job>,
    /// Reads running now (for the readers-in-use gauge).
    busy: Arc<AtomicUsize>,
}

type Job = Box<dyn FnOnce(&Connection) + Send>;

/// The interrupt handle of a connection while one call's read runs on it;
/// taken out (under the lock) when the read ends, so a late interrupt never
/// reaches the next read.
type Interrupt = Arc<Mutex<Option<InterruptHandle>>>;

/// Stops the work of a call that is dropped before it finished: marks it
/// cancelled (checked before it starts and, through a progress handler,
/// while it runs: SQLite forgets an interrupt that arrives before the
/// statement's first step) and interrupts the running statement.
struct InterruptOnDrop {
    interrupt: Interrupt,
    cancelled: Arc<AtomicBool>,
}

impl Drop for InterruptOnDrop {
    fn drop(&mut self) {
        self.cancelled.store(true, Ordering::Relaxed);
        if let Some(h) = lock(&self.interrupt).as_ref() {
            h.interrupt();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// SQLite virtual-machine steps between two looks at the cancel flag.
const PROGRESS_STEPS: i32 = 10_000;

impl SqliteReaders {
    /// Opens `n` read-only connections to the database of a sqlite:// URL,
    /// each with its reader thread; `None` for in-memory databases or
    /// anything that cannot be opened (the sea-orm path then serves every
    /// read).
    /// `mmap`: map the file (fast point reads, but every page a scan
    /// touches then counts in the process's RSS).
    pub(crate) fn open(url: &str, n: usize, mmap: bool) -> Option<Self> {
        let path = file_of(url)?;
        let mut conns = Vec::with_capacity(n);
        for _ in 0..n.max(1) {
            let c = Connection::open_with_flags(
                &path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .ok()?;
            c.busy_timeout(Duration::from_millis(200)).ok()?;
            // Map the file instead of copying pages through read(2) into a
            // private cache per connection.
            if mmap {
                c.pragma_update(None, "mmap_size", 1_i64 << 30).ok()?;
            }
            // Every point-read text (5 keys x 6 sizes) and the list shapes.
            c.set_prepared_statement_cache_capacity(64);
            conns.push(c);
        }
        let (jobs, queue) = flume::unbounded::<Job>();
        for conn in conns {
            let queue = queue.clone();
            // The thread ends when the last sender (this pool) is dropped.
            std::thread::Builder::new()
                .name("sqlite-reader".into())
                .spawn(move || {
                    while let Ok(job) = queue.recv() {
                        // A job catches its own panics; this keeps the
                        // thread serving the queue whatever happens.
                        let _ =
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&conn)));
                    }
                })
                .ok()?;
        }
        Some(Self {
            jobs,
            busy: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Reads running now.
    pub(crate) fn in_use(&self) -> usize {
        self.busy.load(Ordering::Relaxed)
    }

    /// Runs `f` on the next free reader thread's connection; the caller
    /// waits asynchronously. Dropping the returned future interrupts `f`'s
    /// statement, or skips it if it has not started.
    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> rusqlite::Result<T> {
        let failed = |m: &str| rusqlite::Error::InvalidParameterName(m.into());
        let interrupt: Interrupt = Arc::new(Mutex::new(None));
        let cancelled = Arc::new(AtomicBool::new(false));
        let _guard = InterruptOnDrop {
            interrupt: interrupt.clone(),
            cancelled: cancelled.clone(),
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        let busy = self.busy.clone();
        let job: Job = Box::new(move |conn: &Connection| {
            if cancelled.load(Ordering::Relaxed) || reply.is_closed() {
                return;
            }
            *lock(&interrupt) = Some(conn.get_interrupt_handle());
            busy.fetch_add(1, Ordering::Relaxed);
            let flag = cancelled.clone();
            let out = conn
                .progress_handler(PROGRESS_STEPS, Some(move || flag.load(Ordering::Relaxed)))
                .and_then(|()| {
                    // A panic in `f` fails this read, not the reader thread.
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(conn)))
                        .unwrap_or_else(|_| Err(failed("the read panicked")))
                });
            let _ = conn.progress_handler(0, None::<fn() -> bool>);
            lock(&interrupt).take();
            busy.fetch_sub(1, Ordering::Relaxed);
            let _ = reply.send(out);
        });
        self.jobs
            .send(job)
            .map_err(|_| failed("reader pool closed"))?;
        answer
            .await
            .map_err(|_| failed("the reader thread stopped"))?
    }
}

impl SqliteReaders {
    /// Runs a SELECT built for SQLite whose columns are those of
    /// `users::Model`, in order (lists and searches).
    pub(crate) async fn users(
        &self,
        stmt: &sea_orm::Statement,
    ) -> rusqlite::Result<Vec<users::Model>> {
        let params = params(stmt)?;
        let sql = stmt.sql.clone();
        self.with(move |c| {
            let mut st = c.prepare_cached(&sql)?;
            let rows = st.query_map(rusqlite::params_from_iter(params), model)?;
            rows.collect()
        })
        .await
    }

    /// Runs a SELECT of one integer column `n` (counts).
    pub(crate) async fn number(&self, stmt: &sea_orm::Statement) -> rusqlite::Result<i64> {
        let params = params(stmt)?;
        let sql = stmt.sql.clone();
        self.with(move |c| {
            c.prepare_cached(&sql)?
                .query_row(rusqlite::params_from_iter(params), |r| r.get(0))
        })
        .await
    }
}

/// The bound values of a statement as SQLite values.
/// The existing database file a sqlite:// URL names; `None` for in-memory
/// databases and files that do not exist.
pub(crate) fn file_of(url: &str) -> Option<std::path::PathBuf> {
    use std::str::FromStr;
    let opts = sea_orm::sqlx::sqlite::SqliteConnectOptions::from_str(url).ok()?;
    let path = opts.get_filename().to_owned();
    if url.contains(":memory:") || url.contains("mode=memory") || !path.exists() {
        return None;
    }
    Some(path)
}

pub(crate) fn params(stmt: &sea_orm::Statement) -> rusqlite::Result<Vec<rusqlite::types::Value>> {
    use rusqlite::types::Value as S;
    use sea_orm::Value as V;
    let Some(values) = &stmt.values else {
        return Ok(Vec::new());
    };
    values
        .0
        .iter()
        .map(|v| {
            Ok(match v {
                V::Bool(b) => b.map_or(S::Null, |b| S::Integer(i64::from(b))),
                V::SmallInt(n) => n.map_or(S::Null, |n| S::Integer(i64::from(n))),
                V::Int(n) => n.map_or(S::Null, |n| S::Integer(i64::from(n))),
                V::BigInt(n) => n.map_or(S::Null, S::Integer),
                V::BigUnsigned(n) => {
                    n.map_or(S::Null, |n| S::Integer(n.min(i64::MAX as u64) as i64))
                }
                V::Unsigned(n) => n.map_or(S::Null, |n| S::Integer(i64::from(n))),
                V::String(t) => t.clone().map_or(S::Null, S::Text),
                V::Bytes(b) => b.clone().map_or(S::Null, S::Blob),
                other => {
                    return Err(rusqlite::Error::ToSqlConversionFailure(
                        format!("unsupported bound value {other:?}").into(),
                    ));
                }
            })
        })
        .collect()
}

pub(crate) fn model(r: &Row<'_>) -> rusqlite::Result<users::Model> {
    Ok(users::Model {
        project: r.get(0)?,
        user_id: r.get(1)?,
        email: r.get(2)?,
        email_key: r.get(3)?,
        email_verified: r.get(4)?,
        phone_number: r.get(5)?,
        phone_number_verified: r.get(6)?,
        secondary_emails: r.get(7)?,
        secondary_phone_numbers: r.get(8)?,
        username: r.get(9)?,
        external_id: r.get(10)?,
        display_name: r.get(11)?,
        given_name: r.get(12)?,
        middle_name: r.get(13)?,
        family_name: r.get(14)?,
        title: r.get(15)?,
        birthday: r.get(16)?,
        preferred_locale: r.get(17)?,
        picture_uri: r.get(18)?,
        addresses: r.get(19)?,
        bio: r.get(20)?,
        note: r.get(21)?,
        tags: r.get(22)?,
        roles: r.get(23)?,
        metadata: r.get(24)?,
        custom_data: r.get(25)?,
        last_login_time: r.get(26)?,
        state: r.get(27)?,
        pre_delete_state: r.get(28)?,
        create_time: r.get(29)?,
        update_time: r.get(30)?,
        delete_time: r.get(31)?,
        purge_time: r.get(32)?,
        revision: r.get(33)?,
    })
}

#[cfg(test)]
mod tests {
    use sea_orm::{Iden, Iterable};

    use super::*;

    /// The hand-written column list follows the entity, field for field.
    #[test]
    fn columns_match_the_entity() {
        let entity: Vec<String> = users::Column::iter().map(|c| c.to_string()).collect();
        let listed: Vec<String> = COLUMNS.split(',').map(|c| c.trim().to_owned()).collect();
        assert_eq!(listed, entity);
    }
}
