//! Reads on the SQLite engine through read-only rusqlite connections.
//!
//! sqlx runs every SQLite connection on a worker thread of its own and hands
//! each statement and each row across threads; a profile of GetUser showed
//! most of the server's CPU in those hand-offs (futex wake/wait, channel
//! traffic), not in SQLite. Reads instead take a read-only connection to the
//! same file (WAL mode: readers never wait for the writer) with cached
//! prepared statements, and run on tokio's blocking pool: never on an async
//! worker, and a caller waits for a free connection asynchronously. A call
//! that is cancelled (the client went away, its deadline passed) interrupts
//! its statement. Writes stay on sea-orm.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, InterruptHandle, OpenFlags, OptionalExtension, Row};
use tokio::sync::Semaphore;

use super::entity::users;

/// Column list in the order of `users::Model`'s fields.
pub(crate) const COLUMNS: &str = "project, user_id, email, email_key, email_verified, phone_number, \
    phone_number_verified, secondary_emails, secondary_phone_numbers, username, external_id, \
    display_name, given_name, middle_name, family_name, title, birthday, preferred_locale, \
    picture_uri, addresses, bio, note, tags, roles, metadata, custom_data, last_login_time, \
    state, pre_delete_state, create_time, update_time, delete_time, purge_time, revision";

/// Which live identity a lookup compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum LookupColumn {
    EmailKey,
    PhoneNumber,
    Username,
    ExternalId,
}

impl LookupColumn {
    pub(crate) fn column(self) -> &'static str {
        match self {
            LookupColumn::EmailKey => "email_key",
            LookupColumn::PhoneNumber => "phone_number",
            LookupColumn::Username => "username",
            LookupColumn::ExternalId => "external_id",
        }
    }
}

/// A few read-only connections, handed out one call at a time.
pub(crate) struct SqliteReaders {
    free: Mutex<Vec<Connection>>,
    /// One permit per connection in `free`: waiting for one is async.
    permits: Semaphore,
    size: usize,
}

/// The interrupt handle of a connection while one call uses it; the call
/// takes it out (under the lock) before the connection goes back, so a late
/// interrupt never reaches the next call's statement.
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
        if let Some(h) = self
            .interrupt
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            h.interrupt();
        }
    }
}

/// SQLite virtual-machine steps between two looks at the cancel flag.
const PROGRESS_STEPS: i32 = 10_000;

/// A borrowed connection: goes back to the pool (with its permit) however
/// the call ends, panics included.
struct Lent {
    conn: Option<Connection>,
    pool: Arc<SqliteReaders>,
    interrupt: Interrupt,
}

impl Drop for Lent {
    fn drop(&mut self) {
        self.interrupt
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(c) = self.conn.take() {
            self.pool
                .free
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(c);
            self.pool.permits.add_permits(1);
        }
    }
}

impl SqliteReaders {
    /// Opens `n` read-only connections to the database of a sqlite:// URL;
    /// `None` for in-memory databases or anything that cannot be opened (the
    /// sea-orm path then serves every read).
    /// `mmap`: map the file (fast point reads, but every page a scan
    /// touches then counts in the process's RSS).
    pub(crate) fn open(url: &str, n: usize, mmap: bool) -> Option<Self> {
        use std::str::FromStr;
        let opts = sea_orm::sqlx::sqlite::SqliteConnectOptions::from_str(url).ok()?;
        let path = opts.get_filename().to_owned();
        if url.contains(":memory:") || url.contains("mode=memory") || !path.exists() {
            return None;
        }
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
            c.set_prepared_statement_cache_capacity(16);
            conns.push(c);
        }
        Some(Self {
            permits: Semaphore::new(conns.len()),
            size: conns.len(),
            free: Mutex::new(conns),
        })
    }

    /// Connections lent out now.
    pub(crate) fn in_use(&self) -> usize {
        self.size.saturating_sub(self.permits.available_permits())
    }

    /// Runs `f` on a free connection, on the blocking pool. Waiting for a
    /// connection is async; dropping the returned future interrupts `f`'s
    /// statement.
    async fn with<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> rusqlite::Result<T> {
        let closed = || rusqlite::Error::InvalidParameterName("reader pool closed".into());
        let permit = self.permits.acquire().await.map_err(|_| closed())?;
        let conn = self
            .free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .ok_or_else(closed)?;
        let interrupt: Interrupt = Arc::new(Mutex::new(Some(conn.get_interrupt_handle())));
        let cancelled = Arc::new(AtomicBool::new(false));
        let _guard = InterruptOnDrop {
            interrupt: interrupt.clone(),
            cancelled: cancelled.clone(),
        };
        let lent = Lent {
            conn: Some(conn),
            pool: self.clone(),
            interrupt,
        };
        // The permit travels with the connection: `Lent` gives it back.
        permit.forget();
        tokio::task::spawn_blocking(move || {
            let conn = lent.conn.as_ref().ok_or_else(closed)?;
            let stop = || {
                rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_INTERRUPT),
                    Some("the call was cancelled".into()),
                )
            };
            if cancelled.load(Ordering::Relaxed) {
                return Err(stop());
            }
            let flag = cancelled.clone();
            conn.progress_handler(PROGRESS_STEPS, Some(move || flag.load(Ordering::Relaxed)))?;
            let out = f(conn);
            conn.progress_handler(0, None::<fn() -> bool>)?;
            out
        })
        .await
        .map_err(|e| rusqlite::Error::InvalidParameterName(format!("reader task: {e}")))?
    }

    pub(crate) async fn get(
        self: &Arc<Self>,
        project: &str,
        user_id: &str,
    ) -> rusqlite::Result<Option<users::Model>> {
        let (project, user_id) = (project.to_owned(), user_id.to_owned());
        self.with(move |c| {
            c.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM users WHERE project = ?1 AND user_id = ?2"
            ))?
            .query_row((project, user_id), model)
            .optional()
        })
        .await
    }

    pub(crate) async fn lookup(
        self: &Arc<Self>,
        project: &str,
        column: LookupColumn,
        value: &str,
    ) -> rusqlite::Result<Option<users::Model>> {
        let column = column.column();
        let (project, value) = (project.to_owned(), value.to_owned());
        self.with(move |c| {
            c.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM users \
                 WHERE project = ?1 AND {column} = ?2 AND delete_time IS NULL"
            ))?
            .query_row((project, value), model)
            .optional()
        })
        .await
    }
}

impl SqliteReaders {
    /// Runs a SELECT built for SQLite whose columns are those of
    /// `users::Model`, in order (lists and searches).
    pub(crate) async fn users(
        self: &Arc<Self>,
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
    pub(crate) async fn number(
        self: &Arc<Self>,
        stmt: &sea_orm::Statement,
    ) -> rusqlite::Result<i64> {
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
