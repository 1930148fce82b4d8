//! sea-orm persistence: connecting, migrating, and the repository.

mod batch;
mod bulk;
pub mod ceiling;
mod entity;
mod errors;
mod events;
pub use events::RelayLease;
mod groups;
mod idempotency;
pub mod nodelay;
mod point_read;
mod query;
mod saves;
mod sqlite_read;
mod sqlite_write;
mod terms;

use std::time::Duration;

use migration::{Migrator, MigratorTrait};
use sea_orm::sqlx;
use sea_orm::{
    ColumnTrait, ConnectOptions, ConnectionTrait, Database, DatabaseBackend, DatabaseConnection,
    DatabaseTransaction, DbErr, EntityTrait, QueryFilter, QuerySelect, Statement, TransactionTrait,
};
use tracing::{debug, instrument};

use crate::domain::events::{Event, EventEncoder};
use crate::domain::{
    Address, BatchCreated, Birthday, Created, Cursor, DomainError, Email, ExternalId,
    IdempotencyKey, Identifier, Identity, Locale, PhoneNumber, PictureUri, Profile, ProjectId,
    State, StoredConflict, Timestamp, User, UserId, UserQuery, UserRepository, Username,
};
use std::sync::Arc;

use batch::Batcher;
use entity::{request_ids, users};
pub(crate) use errors::db_error;
use events::Outbox;
pub(crate) use idempotency::{claim_key, encode_response, find_request, find_request_users};
use point_read::{Executor, PointReads};
use query::{Choice, Driver, Plan};
use sqlite_read::SqliteReaders;

/// How long an idempotency key is remembered.
const REQUEST_ID_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Opens a pool. SQLite files are created when missing and run in WAL mode with
/// a busy timeout and foreign keys on.
pub async fn connect(url: &str, max_connections: u32) -> Result<DatabaseConnection, DbErr> {
    connect_with(url, max_connections, None, DEFAULT_DB_TIMEOUT).await
}

/// How long a connection attempt or the wait for a free pool connection may
/// take before the call fails with UNAVAILABLE.
pub const DEFAULT_DB_TIMEOUT: Duration = Duration::from_secs(5);

/// As `connect`; on PostgreSQL every statement of the pool is cancelled by
/// the server after `statement_timeout`, so a query whose caller gave up
/// does not run on. Connecting and waiting for a pool connection give up
/// after `db_timeout` (the call then fails with UNAVAILABLE).
pub async fn connect_with(
    url: &str,
    max_connections: u32,
    statement_timeout: Option<Duration>,
    db_timeout: Duration,
) -> Result<DatabaseConnection, DbErr> {
    let timeout_ms = statement_timeout
        .map_or(0, |t| t.as_millis().max(1))
        .to_string();
    let mut opts = ConnectOptions::new(url.to_owned());
    opts.max_connections(max_connections)
        .min_connections(1)
        .connect_timeout(db_timeout)
        .acquire_timeout(db_timeout)
        .sqlx_logging(false)
        // A ping before every checkout costs a round trip per query; a dead
        // connection shows up as an error on use instead, and the pool drops it.
        .test_before_acquire(false)
        .map_sqlx_sqlite_opts(|o| {
            o.create_if_missing(true)
                .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                .synchronous(sqlx::sqlite::SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(10))
                .foreign_keys(true)
                // Statement journals (multi-row statements, savepoints) in
                // memory rather than in temporary files.
                .pragma("temp_store", "memory")
        })
        // Every statement is prepared once per connection and run many
        // times; after five runs PostgreSQL may switch to a generic plan that
        // ignores the values (a keyset page then scans and sorts the whole
        // project). The plans here depend on the values: plan each run.
        .map_sqlx_postgres_pool_opts(|o| {
            o.after_connect(|_conn, _meta| {
                Box::pin(async {
                    // Reads /proc: off the async workers.
                    let _ = tokio::task::spawn_blocking(nodelay::set_on_tcp_sockets).await;
                    Ok(())
                })
            })
        })
        .map_sqlx_postgres_opts(move |o| {
            o.options([
                ("plan_cache_mode", "force_custom_plan"),
                ("statement_timeout", timeout_ms.as_str()),
            ])
        });
    Database::connect(opts).await
}

/// Applies pending migrations. On PostgreSQL an advisory lock serialises
/// replicas that start together.
pub async fn migrate(db: &DatabaseConnection) -> Result<(), DbErr> {
    if db.get_database_backend() == DatabaseBackend::Postgres {
        let txn = db.begin().await?;
        txn.execute_unprepared("SELECT pg_advisory_xact_lock(7204319411)")
            .await?;
        let result = Migrator::up(db, None).await;
        txn.commit().await?;
        result
    } else {
        Migrator::up(db, None).await
    }
}

#[derive(Clone)]
pub struct SeaOrmRepository {
    db: DatabaseConnection,
    creates: Batcher,
    /// Group commit of conditional single-user writes (see `saves`).
    saves: saves::Saver,
    /// SQLite only: lists, searches and counts (see `sqlite_read`).
    readers: Option<Arc<SqliteReaders>>,
    /// SQLite only: connections for exports, without a memory map, so that
    /// reading the whole table leaves the process's memory flat.
    scan_readers: Option<Arc<SqliteReaders>>,
    /// GetUser and LookupUser (see `point_read`); on SQLite on reader
    /// threads of their own, so that slow lists and counts never keep a
    /// point read waiting.
    points: PointReads,
    /// The point readers' threads, for the in-use gauge.
    point_readers: Option<Arc<SqliteReaders>>,
    /// Lists, searches, counts and export batches running at once: at most
    /// half the pool, so that point reads and writes always find a
    /// connection however many slow queries are asked for.
    heavy: Arc<tokio::sync::Semaphore>,
    /// Every write appends its change events through this.
    outbox: Arc<Outbox>,
    /// SQLite only: import chunks and batches of conditional writes, each
    /// handed over whole (see `sqlite_write`).
    writer: Option<Arc<sqlite_write::SqliteWriter>>,
}

/// Group-commit tasks per kind of write on SQLite with a writer thread: one
/// builds its batch while the thread runs the other's.
const THREAD_WRITERS: usize = 2;

/// What the group-commit writer tasks (`batch`, `saves`) write through.
#[derive(Clone)]
pub(crate) struct Stores {
    db: DatabaseConnection,
    outbox: Arc<Outbox>,
    /// SQLite: a batch is handed to the writer thread whole, instead of one
    /// statement at a time to the pool's connection (see `sqlite_write`).
    /// What needs savepoints or runs alone still uses the pool.
    thread: Option<Arc<sqlite_write::SqliteWriter>>,
}

/// Tasks batching GetUser and LookupUser calls (see `point_read`).
const POINT_BATCHERS: usize = 4;

impl SeaOrmRepository {
    /// Wraps a pool; starts the group-commit writers for CreateUser (must run
    /// inside a tokio runtime).
    /// `encode` gives the bytes the change log keeps of an event.
    pub fn new(db: DatabaseConnection, encode: EventEncoder) -> Self {
        let writers = match db.get_database_backend() {
            DatabaseBackend::Postgres => 4,
            _ => 1,
        };
        let outbox = Outbox::new(encode);
        let stores = Stores {
            db: db.clone(),
            outbox: outbox.clone(),
            thread: None,
        };
        let creates = Batcher::start(writers, stores.clone());
        let saves = saves::Saver::start(writers, stores);
        let points = PointReads::start(Executor::new(db.clone(), None), POINT_BATCHERS);
        Self {
            db,
            creates,
            saves,
            readers: None,
            scan_readers: None,
            points,
            point_readers: None,
            heavy: Arc::new(tokio::sync::Semaphore::new(4)),
            outbox,
            writer: None,
        }
    }

    /// How many lists, searches, counts and export batches may run at once
    /// (the rest wait their turn, asynchronously).
    pub fn with_heavy_read_limit(mut self, n: usize) -> Self {
        self.heavy = Arc::new(tokio::sync::Semaphore::new(n.max(1)));
        self
    }

    /// On SQLite, serves reads from read-only rusqlite connections to the
    /// file of `url` on the blocking pool: point reads, lists and counts,
    /// and exports each on connections of their own.
    pub fn with_sqlite_readers(mut self, url: &str) -> Self {
        if self.db.get_database_backend() == DatabaseBackend::Sqlite {
            self.point_readers = SqliteReaders::open(url, 4, true).map(Arc::new);
            if self.point_readers.is_some() {
                let executor = Executor::new(self.db.clone(), self.point_readers.clone());
                self.points = PointReads::start(executor, POINT_BATCHERS);
            }
            self.readers = SqliteReaders::open(url, 4, true).map(Arc::new);
            self.scan_readers = SqliteReaders::open(url, 2, false).map(Arc::new);
            self.writer = sqlite_write::SqliteWriter::open(url).map(Arc::new);
            if self.writer.is_some() {
                // The group commits hand their batches to the writer thread.
                let stores = Stores {
                    db: self.db.clone(),
                    outbox: self.outbox.clone(),
                    thread: self.writer.clone(),
                };
                self.creates = Batcher::start(THREAD_WRITERS, stores.clone());
                self.saves = saves::Saver::start(THREAD_WRITERS, stores);
            }
        }
        self
    }
}

/// Waits for the next job of a shared queue, then takes whatever else is
/// already waiting, up to `max`; never waits for a batch to fill. `None` once
/// the queue is closed.
async fn next_batch<T>(
    rx: &tokio::sync::Mutex<tokio::sync::mpsc::Receiver<T>>,
    max: usize,
) -> Option<Vec<T>> {
    let mut rx = rx.lock().await;
    let mut batch = vec![rx.recv().await?];
    while batch.len() < max {
        match rx.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
    }
    Some(batch)
}

/// The identifier of `user` that another row holds, by a fixed priority
/// (email, phone number, username, external id, name) so that both engines
/// report the same one. `with_name`: whether a row with the same name counts.
async fn first_conflict<C: ConnectionTrait>(
    conn: &C,
    user: &User,
    with_name: bool,
) -> Result<Option<Identifier>, DomainError> {
    let p = &user.profile;
    let mut live = sea_orm::Condition::any();
    if let Some(e) = &p.email {
        live = live.add(users::Column::EmailKey.eq(e.key()));
    }
    if let Some(v) = &p.phone_number {
        live = live.add(users::Column::PhoneNumber.eq(v.as_str()));
    }
    if let Some(v) = &p.username {
        live = live.add(users::Column::Username.eq(v.as_str()));
    }
    if let Some(v) = &p.external_id {
        live = live.add(users::Column::ExternalId.eq(v.as_str()));
    }
    let live = sea_orm::Condition::all()
        .add(users::Column::DeleteTime.is_null())
        .add(live);
    let cond = if with_name {
        sea_orm::Condition::any()
            .add(users::Column::UserId.eq(user.id.as_str()))
            .add(live)
    } else {
        live.add(users::Column::UserId.ne(user.id.as_str()))
    };
    let rows = users::Entity::find()
        .filter(users::Column::Project.eq(user.project.as_str()))
        .filter(cond)
        .limit(5)
        .all(conn)
        .await
        .map_err(db_error)?;
    let classify = |row: &users::Model| {
        if row.user_id == user.id.as_str() {
            Identifier::Name
        } else if row.email_key.is_some() && p.email.as_ref().map(Email::key) == row.email_key {
            Identifier::Email
        } else if row.phone_number.is_some()
            && p.phone_number.as_ref().map(|v| v.as_str()) == row.phone_number.as_deref()
        {
            Identifier::PhoneNumber
        } else if row.username.is_some()
            && p.username.as_ref().map(|v| v.as_str()) == row.username.as_deref()
        {
            Identifier::Username
        } else {
            Identifier::ExternalId
        }
    };
    // Report the same identifier an insert would trip over first.
    Ok(rows.iter().map(classify).min_by_key(|i| *i as u8))
}

/// A unique violation names whichever index the engine checked first;
/// re-reads to name the conflict by the fixed priority instead.
pub(crate) async fn explain<C: ConnectionTrait>(
    conn: &C,
    user: &User,
    with_name: bool,
    e: DomainError,
) -> DomainError {
    if let DomainError::AlreadyExists(fallback) = e {
        let taken = first_conflict(conn, user, with_name).await.ok().flatten();
        DomainError::AlreadyExists(taken.unwrap_or(fallback))
    } else {
        e
    }
}

/// The statements a list page ran, each with the engine's plan of it, when
/// asked for (`explain_list`).
type Trace = Option<Vec<(String, Vec<String>)>>;

impl SeaOrmRepository {
    /// One page of `query`, read inline through `readers` on SQLite.
    async fn page(
        &self,
        readers: Option<&Arc<SqliteReaders>>,
        query: &UserQuery,
        after: Option<&Cursor>,
        limit: u64,
    ) -> Result<Vec<User>, DomainError> {
        let _turn = self.heavy_turn().await?;
        let query = &*self.resolve_groups(query).await?;
        self.plan_and_read(readers, query, after, limit, &mut None)
            .await
    }

    /// Plans and reads one page (see `query::Choice`): decided from the
    /// query's shape, or by counting (up to a bound) the users having each
    /// of its term conditions. When every condition is common, a page found
    /// in a window at the start of the order is the page; else the rarest
    /// condition drives.
    async fn plan_and_read(
        &self,
        readers: Option<&Arc<SqliteReaders>>,
        query: &UserQuery,
        after: Option<&Cursor>,
        limit: u64,
        trace: &mut Trace,
    ) -> Result<Vec<User>, DomainError> {
        let backend = self.db.get_database_backend();
        let (drivers, ordered) = match query::plan(query) {
            Choice::Decided(plan) => {
                let stmt = query::select_page(backend, query, &plan, after, limit);
                return self.read_page(readers, stmt, trace).await;
            }
            Choice::Rarest { drivers, ordered } => (drivers, ordered),
        };
        let cap = query::first_cap(ordered);
        let (driver, n) = self
            .rarest(readers, query, drivers.clone(), &[cap], trace)
            .await?;
        let plan = if n < cap {
            if ordered {
                Plan::Ordered(driver)
            } else {
                Plan::Sorted(driver)
            }
        } else {
            if ordered || query::by_create_time(query) {
                let first = ordered.then(|| drivers[0].clone());
                let stmt = query::window_bound(backend, query, first.as_ref(), after);
                let bound = self.traced_number(readers, stmt, trace).await?;
                let plan = Plan::Window(first, bound);
                let stmt = query::select_page(backend, query, &plan, after, limit);
                let rows = self.read_page(readers, stmt, trace).await?;
                if rows.len() as u64 >= limit || bound == query::unbounded(query) {
                    return Ok(rows);
                }
            }
            if ordered {
                let caps = &query::RAREST_CAPS;
                Plan::Ordered(self.rarest(readers, query, drivers, caps, trace).await?.0)
            } else {
                let cap = query::SORT_LIMIT + 1;
                match self.rarest(readers, query, drivers, &[cap], trace).await? {
                    (driver, n) if n < cap => Plan::Sorted(driver),
                    _ => Plan::Scan,
                }
            }
        };
        let stmt = query::select_page(backend, query, &plan, after, limit);
        self.read_page(readers, stmt, trace).await
    }

    /// The users a page statement selects; inline through `readers` on
    /// SQLite.
    async fn read_page(
        &self,
        readers: Option<&Arc<SqliteReaders>>,
        stmt: Statement,
        trace: &mut Trace,
    ) -> Result<Vec<User>, DomainError> {
        if let Some(t) = trace {
            t.push(self.explain(stmt.clone()).await?);
        }
        if let Some(r) = readers {
            match r.users(&stmt).await {
                Ok(rows) => return rows.into_iter().map(from_model).collect(),
                Err(e) => debug!(error = %e, "inline list failed; using the pool"),
            }
        }
        users::Entity::find()
            .from_raw_sql(stmt)
            .all(&self.db)
            .await
            .map_err(db_error)?
            .into_iter()
            .map(from_model)
            .collect()
    }

    async fn heavy_turn(&self) -> Result<tokio::sync::SemaphorePermit<'_>, DomainError> {
        self.heavy
            .acquire()
            .await
            .map_err(|_| DomainError::Unavailable("shutting down".into()))
    }

    /// The driver fewest users have, and how many (counted up to a cap):
    /// round by round through `caps`, until one count is under its round's
    /// cap. Within a round a count stops once it reaches the smallest so far.
    async fn rarest(
        &self,
        readers: Option<&Arc<SqliteReaders>>,
        query: &UserQuery,
        mut drivers: Vec<Driver>,
        caps: &[u64],
        trace: &mut Trace,
    ) -> Result<(Driver, u64), DomainError> {
        let backend = self.db.get_database_backend();
        let mut best = (0, u64::MAX);
        for &cap in caps {
            best = (0, u64::MAX);
            for (i, d) in drivers.iter().enumerate() {
                let cap = cap.min(best.1.saturating_add(1));
                let stmt = query::probe_count(backend, query, d, cap);
                let n = self.traced_number(readers, stmt, trace).await? as u64;
                if n < best.1 {
                    best = (i, n);
                }
            }
            if best.1 < cap {
                break;
            }
        }
        Ok((drivers.swap_remove(best.0), best.1))
    }

    /// `number`, explained into `trace` first when asked.
    async fn traced_number(
        &self,
        readers: Option<&Arc<SqliteReaders>>,
        stmt: Statement,
        trace: &mut Trace,
    ) -> Result<i64, DomainError> {
        if let Some(t) = trace {
            t.push(self.explain(stmt.clone()).await?);
        }
        self.number(readers, stmt).await
    }

    /// The one integer `n` a statement selects; inline on SQLite (through
    /// `readers`, those of the page it plans).
    async fn number(
        &self,
        readers: Option<&Arc<SqliteReaders>>,
        stmt: Statement,
    ) -> Result<i64, DomainError> {
        if let Some(r) = readers {
            match r.number(&stmt).await {
                Ok(n) => return Ok(n),
                Err(e) => debug!(error = %e, "inline count failed; using the pool"),
            }
        }
        Ok(match self.db.query_one_raw(stmt).await.map_err(db_error)? {
            Some(row) => row.try_get("", "n").map_err(db_error)?,
            None => 0,
        })
    }

    /// The statements a ListUsers/SearchUsers page of `query` runs, with the
    /// engine's plan for each (SQLite `EXPLAIN QUERY PLAN`, PostgreSQL
    /// `EXPLAIN`), one line per plan node. For tests and diagnosis.
    pub async fn explain_list(
        &self,
        query: &UserQuery,
        after: Option<&Cursor>,
        limit: u64,
    ) -> Result<Vec<(String, Vec<String>)>, DomainError> {
        let query = &*self.resolve_groups(query).await?;
        let mut trace = Some(Vec::new());
        self.plan_and_read(None, query, after, limit, &mut trace)
            .await?;
        Ok(trace.unwrap_or_default())
    }

    /// As `explain_list`, for CountUsers.
    pub async fn explain_count(
        &self,
        query: &UserQuery,
    ) -> Result<Vec<(String, Vec<String>)>, DomainError> {
        let query = &*self.resolve_groups(query).await?;
        let backend = self.db.get_database_backend();
        let driver = query::count_driver(query);
        Ok(vec![
            self.explain(query::select_count(backend, query, driver.as_ref()))
                .await?,
        ])
    }

    /// As `explain_list`, for GetUser (`identity` None, by `id`) and
    /// LookupUser: the point-read statement production runs, with one probe
    /// and with the largest batch. On PostgreSQL the plan shown is that of
    /// the statement prepared on a pool connection and executed, as
    /// production runs it (the pool plans every execution: see
    /// `connect_with`).
    pub async fn explain_point_read(
        &self,
        project: &ProjectId,
        id: &UserId,
        identity: Option<&Identity>,
    ) -> Result<Vec<(String, Vec<String>)>, DomainError> {
        let (key, value) = match identity {
            Some(identity) => point_read::Key::of_identity(identity),
            None => (point_read::Key::Id, id.as_str().to_owned()),
        };
        let backend = self.db.get_database_backend();
        let mut out = Vec::new();
        for n in [1, point_read::SIZES[point_read::SIZES.len() - 1]] {
            let values: Vec<String> = (0..n).map(|_| value.clone()).collect();
            let stmt = point_read::statement(backend, project.as_str(), key, &values);
            out.push(match backend {
                DatabaseBackend::Postgres => self.explain_prepared(stmt).await?,
                _ => self.explain(stmt).await?,
            });
        }
        Ok(out)
    }

    /// PostgreSQL's plan of a statement whose bound values are strings or
    /// arrays of strings, prepared and executed on a pool connection with
    /// its settings, as `explain` gives it.
    async fn explain_prepared(
        &self,
        stmt: Statement,
    ) -> Result<(String, Vec<String>), DomainError> {
        let literals: Vec<String> = stmt
            .values
            .iter()
            .flat_map(|v| v.0.iter())
            .map(literal)
            .collect::<Result<_, _>>()?;
        // PREPARE outlives a rollback: a name of its own per call, so that
        // one left behind by a failure never collides with the next.
        let name = format!("explained_{}", uuid::Uuid::now_v7().simple());
        let txn = self.db.begin().await.map_err(db_error)?;
        txn.execute_unprepared(&format!("PREPARE {name} AS {}", stmt.sql))
            .await
            .map_err(db_error)?;
        let rows = txn
            .query_all_raw(Statement::from_string(
                DatabaseBackend::Postgres,
                format!("EXPLAIN EXECUTE {name}({})", literals.join(", ")),
            ))
            .await
            .map_err(db_error)?;
        txn.execute_unprepared(&format!("DEALLOCATE {name}"))
            .await
            .map_err(db_error)?;
        txn.commit().await.map_err(db_error)?;
        let lines = rows
            .iter()
            .map(|r| r.try_get::<String>("", "QUERY PLAN").map_err(db_error))
            .collect::<Result<_, _>>()?;
        Ok((stmt.sql, lines))
    }

    async fn explain(&self, stmt: Statement) -> Result<(String, Vec<String>), DomainError> {
        let backend = self.db.get_database_backend();
        let prefix = match backend {
            DatabaseBackend::Postgres => "EXPLAIN ",
            _ => "EXPLAIN QUERY PLAN ",
        };
        let sql = stmt.sql.clone();
        let explain = Statement {
            sql: format!("{prefix}{}", stmt.sql),
            ..stmt
        };
        let rows = self.db.query_all_raw(explain).await.map_err(db_error)?;
        let mut lines = Vec::new();
        for row in rows {
            let line: String = match backend {
                DatabaseBackend::Postgres => row.try_get("", "QUERY PLAN"),
                _ => row.try_get("", "detail"),
            }
            .map_err(db_error)?;
            lines.push(line);
        }
        Ok((sql, lines))
    }
}

/// A string, or an array of strings, as a PostgreSQL literal.
fn literal(v: &sea_orm::Value) -> Result<String, DomainError> {
    match v {
        sea_orm::Value::String(Some(s)) => Ok(format!(
            "E'{}'",
            s.replace('\\', "\\\\").replace('\'', "''")
        )),
        sea_orm::Value::Array(_, Some(items)) => Ok(format!(
            "ARRAY[{}]::text[]",
            items
                .iter()
                .map(literal)
                .collect::<Result<Vec<_>, _>>()?
                .join(", ")
        )),
        other => Err(DomainError::Internal(format!("cannot quote {other:?}"))),
    }
}

impl SeaOrmRepository {
    /// Deletes one user row (with its index terms) inside `txn`, if the
    /// extra conditions `cond` still hold.
    async fn erase_in(
        &self,
        txn: &DatabaseTransaction,
        project: &str,
        user_id: &str,
        cond: impl FnOnce(sea_orm::DeleteMany<users::Entity>) -> sea_orm::DeleteMany<users::Entity>,
    ) -> Result<bool, DomainError> {
        let delete = users::Entity::delete_many()
            .filter(users::Column::Project.eq(project))
            .filter(users::Column::UserId.eq(user_id));
        let res = cond(delete).exec(txn).await.map_err(db_error)?;
        if res.rows_affected == 1 {
            terms::delete(txn, project, user_id)
                .await
                .map_err(db_error)?;
        }
        Ok(res.rows_affected == 1)
    }
}

impl UserRepository for SeaOrmRepository {
    #[instrument(skip_all, fields(project = %user.project))]
    async fn insert(
        &self,
        user: &User,
        key: Option<&IdempotencyKey>,
    ) -> Result<Created, DomainError> {
        self.creates.submit(user.clone(), key.cloned()).await
    }

    async fn find_request(
        &self,
        project: &ProjectId,
        request_id: &str,
    ) -> Result<Option<(String, User)>, DomainError> {
        find_request(&self.db, project.as_str(), request_id).await
    }

    #[instrument(skip_all, fields(users = users.len()))]
    async fn insert_all(
        &self,
        users: &[User],
        key: Option<&IdempotencyKey>,
    ) -> Result<BatchCreated, DomainError> {
        bulk::insert_all(&self.db, &self.outbox, users, key).await
    }

    async fn find_batch_request(
        &self,
        project: &ProjectId,
        request_id: &str,
    ) -> Result<Option<(String, Vec<User>)>, DomainError> {
        find_request_users(&self.db, project.as_str(), request_id).await
    }

    #[instrument(skip_all, fields(users = users.len()))]
    async fn import(&self, users: &[User]) -> Result<Vec<Option<StoredConflict>>, DomainError> {
        bulk::import(&self.db, self.writer.as_deref(), &self.outbox, users).await
    }

    #[instrument(skip_all, fields(project = %user.project))]
    async fn check_available(&self, user: &User) -> Result<(), DomainError> {
        match first_conflict(&self.db, user, true).await? {
            Some(taken) => Err(DomainError::AlreadyExists(taken)),
            None => Ok(()),
        }
    }

    #[instrument(skip_all, fields(project = %project))]
    async fn get(&self, project: &ProjectId, id: &UserId) -> Result<Option<User>, DomainError> {
        self.points
            .get(project, id)
            .await?
            .map(from_model)
            .transpose()
    }

    #[instrument(skip_all, fields(project = %project))]
    async fn lookup(
        &self,
        project: &ProjectId,
        identity: &Identity,
    ) -> Result<Option<User>, DomainError> {
        self.points
            .lookup(project, identity)
            .await?
            .map(from_model)
            .transpose()
    }

    #[instrument(skip_all, fields(project = %user.project))]
    async fn save(&self, user: &User, previous: &User) -> Result<bool, DomainError> {
        self.saves.submit(user.clone(), previous.clone()).await
    }

    #[instrument(skip_all, fields(project = %user.project))]
    async fn erase(&self, user: &User) -> Result<bool, DomainError> {
        let txn = self.db.begin().await.map_err(db_error)?;
        let erased = self
            .erase_in(&txn, user.project.as_str(), user.id.as_str(), |d| {
                d.filter(users::Column::Revision.eq(user.revision))
            })
            .await?;
        if erased {
            self.outbox
                .append(&txn, &[Event::user_purged(user.clone())])
                .await
                .map_err(db_error)?;
        }
        txn.commit().await.map_err(db_error)?;
        if erased {
            self.outbox.committed();
        }
        Ok(erased)
    }

    #[instrument(skip_all, fields(project = %query.project))]
    async fn list(
        &self,
        query: &UserQuery,
        after: Option<&Cursor>,
        limit: u64,
    ) -> Result<Vec<User>, DomainError> {
        self.page(self.readers.as_ref(), query, after, limit).await
    }

    #[instrument(skip_all, fields(project = %query.project))]
    async fn export(
        &self,
        query: &UserQuery,
        after: Option<&Cursor>,
        limit: u64,
    ) -> Result<Vec<User>, DomainError> {
        self.page(self.scan_readers.as_ref(), query, after, limit)
            .await
    }

    async fn refresh_statistics(&self) -> Result<(), DomainError> {
        if self.db.get_database_backend() == DatabaseBackend::Postgres {
            // VACUUM as well as ANALYZE: right after a bulk load no page of
            // the new rows is marked all-visible, so every index-only scan
            // of the terms (counting a term, probing one per user) also reads
            // the table's pages; measured at a million users, a conjunction
            // of two terms took 23-27 ms before and 7 ms after. It runs
            // outside a transaction, on one connection, without the pool's
            // statement timeout (a large table may take longer than any
            // call), which it gets back afterwards.
            use sea_orm::RuntimeErr;
            let pool = self.db.get_postgres_connection_pool();
            let mut conn = pool
                .acquire()
                .await
                .map_err(|e| db_error(DbErr::Conn(RuntimeErr::SqlxError(e.into()))))?;
            // Never back into the pool: should a step fail (or this future
            // be dropped) between the SET and the RESET, the connection
            // would serve calls without their statement timeout.
            conn.close_on_drop();
            for step in [
                "SET statement_timeout = 0",
                // Another replica's (or autovacuum's for wraparound) run
                // does the same: skip rather than wait for it.
                "VACUUM (ANALYZE, SKIP_LOCKED) users, user_terms",
                "RESET statement_timeout",
            ] {
                sqlx::raw_sql(step)
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| db_error(DbErr::Exec(RuntimeErr::SqlxError(e.into()))))?;
            }
        }
        Ok(())
    }

    #[instrument(skip_all, fields(project = %query.project))]
    async fn count(&self, query: &UserQuery) -> Result<u64, DomainError> {
        let _turn = self.heavy_turn().await?;
        let query = &*self.resolve_groups(query).await?;
        let backend = self.db.get_database_backend();
        let driver = query::count_driver(query);
        let stmt = query::select_count(backend, query, driver.as_ref());
        Ok(self.number(self.readers.as_ref(), stmt).await?.max(0) as u64)
    }

    #[instrument(skip_all, fields(project = %project))]
    async fn get_many(
        &self,
        project: &ProjectId,
        ids: &[UserId],
    ) -> Result<Vec<User>, DomainError> {
        let mut out = Vec::with_capacity(ids.len());
        // Bounded statements: at most 500 parameters each.
        for chunk in ids.chunks(500) {
            let rows = users::Entity::find()
                .filter(users::Column::Project.eq(project.as_str()))
                .filter(users::Column::UserId.is_in(chunk.iter().map(|id| id.as_str())))
                .all(&self.db)
                .await
                .map_err(db_error)?;
            for row in rows {
                out.push(from_model(row)?);
            }
        }
        Ok(out)
    }

    #[instrument(skip_all)]
    async fn purge_expired(&self, now: Timestamp, limit: u64) -> Result<u64, DomainError> {
        let due: Vec<(String, String)> = users::Entity::find()
            .select_only()
            .column(users::Column::Project)
            .column(users::Column::UserId)
            .filter(users::Column::PurgeTime.lte(now.nanos()))
            .limit(limit)
            .into_tuple()
            .all(&self.db)
            .await
            .map_err(db_error)?;
        let mut purged = 0;
        for (project, user_id) in due {
            // Read outside the write transaction (a read first would make a
            // SQLite transaction fail to upgrade under concurrent writes);
            // the delete re-checks the revision and the purge time, so an
            // undelete or any change in between wins.
            let Some(model) = users::Entity::find_by_id((project.clone(), user_id.clone()))
                .one(&self.db)
                .await
                .map_err(db_error)?
            else {
                continue;
            };
            let user = from_model(model)?;
            let txn = self.db.begin().await.map_err(db_error)?;
            let erased = self
                .erase_in(&txn, &project, &user_id, |d| {
                    d.filter(users::Column::Revision.eq(user.revision))
                        .filter(users::Column::PurgeTime.lte(now.nanos()))
                })
                .await?;
            if erased {
                self.outbox
                    .append(&txn, &[Event::user_purged(user)])
                    .await
                    .map_err(db_error)?;
            }
            txn.commit().await.map_err(db_error)?;
            if erased {
                self.outbox.committed();
                purged += 1;
            }
        }
        let horizon = now
            .nanos()
            .saturating_sub(REQUEST_ID_RETENTION.as_nanos() as i64);
        request_ids::Entity::delete_many()
            .filter(request_ids::Column::CreateTime.lt(horizon))
            .exec(&self.db)
            .await
            .map_err(db_error)?;
        Ok(purged)
    }

    async fn ping(&self) -> Result<(), DomainError> {
        self.db.ping().await.map_err(db_error)
    }

    fn report_pool_use(&self) {
        let (size, idle, max) = match self.db.get_database_backend() {
            DatabaseBackend::Postgres => {
                let p = self.db.get_postgres_connection_pool();
                (p.size(), p.num_idle(), p.options().get_max_connections())
            }
            _ => {
                let p = self.db.get_sqlite_connection_pool();
                (p.size(), p.num_idle(), p.options().get_max_connections())
            }
        };
        crate::metrics::pool_use((size as usize).saturating_sub(idle), idle, max);
        for (name, readers) in [
            ("point", &self.point_readers),
            ("list", &self.readers),
            ("export", &self.scan_readers),
        ] {
            if let Some(r) = readers {
                crate::metrics::readers_in_use(name, r.in_use());
            }
        }
    }

    async fn checkpoint(&self) -> Result<(), DomainError> {
        if self.db.get_database_backend() != DatabaseBackend::Sqlite {
            return Ok(());
        }
        // The checkpointer thread (`sqlite_write`) may be copying the log
        // right now: the pragma then answers busy (a row, not an error).
        for _ in 0..50 {
            let row = self
                .db
                .query_one_raw(Statement::from_string(
                    DatabaseBackend::Sqlite,
                    "PRAGMA wal_checkpoint(TRUNCATE)",
                ))
                .await
                .map_err(db_error)?;
            let busy: i32 = match row {
                Some(row) => row.try_get_by_index(0).map_err(db_error)?,
                None => 0,
            };
            if busy == 0 {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        Err(DomainError::Unavailable(
            "the write-ahead log stayed busy; not truncated".into(),
        ))
    }
}

fn json<T: serde::Serialize>(v: &T) -> Result<String, DomainError> {
    serde_json::to_string(v).map_err(|e| DomainError::Internal(format!("encode: {e}")))
}

/// A JSON text column. Empty (a column an idempotency record predates, see
/// `idempotency`) is the type's empty value.
fn unjson<T: serde::de::DeserializeOwned + Default>(s: &str) -> Result<T, DomainError> {
    if s.is_empty() {
        return Ok(T::default());
    }
    serde_json::from_str(s)
        .map_err(|e| DomainError::Internal(format!("stored row unreadable: {e}")))
}

pub(crate) fn to_model(u: &User) -> Result<users::Model, DomainError> {
    let p = &u.profile;
    let strs = |v: &[String]| json(&v);
    Ok(users::Model {
        project: u.project.as_str().to_owned(),
        user_id: u.id.as_str().to_owned(),
        email: p.email.as_ref().map(|e| e.as_str().to_owned()),
        email_key: p.email.as_ref().map(Email::key),
        email_verified: p.email_verified,
        phone_number: p.phone_number.as_ref().map(|v| v.as_str().to_owned()),
        phone_number_verified: p.phone_number_verified,
        secondary_emails: json(&p.secondary_emails)?,
        secondary_phone_numbers: json(&p.secondary_phone_numbers)?,
        username: p.username.as_ref().map(|v| v.as_str().to_owned()),
        external_id: p.external_id.as_ref().map(|v| v.as_str().to_owned()),
        display_name: p.display_name.clone(),
        given_name: p.given_name.clone(),
        middle_name: p.middle_name.clone(),
        family_name: p.family_name.clone(),
        title: p.title.clone(),
        birthday: p.birthday.map(Birthday::to_stored),
        preferred_locale: p
            .preferred_locale
            .as_ref()
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default(),
        picture_uri: p
            .picture_uri
            .as_ref()
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default(),
        addresses: json(&p.addresses)?,
        bio: p.bio.clone(),
        note: p.note.clone(),
        tags: strs(&p.tags)?,
        roles: strs(&p.roles)?,
        metadata: json(&p.metadata)?,
        custom_data: p.custom_data.as_ref().map(json).transpose()?,
        last_login_time: p.last_login_time.map(Timestamp::nanos),
        state: u.state as i32,
        pre_delete_state: u.pre_delete_state.map(|s| s as i32),
        create_time: u.create_time.nanos(),
        update_time: u.update_time.nanos(),
        delete_time: u.delete_time.map(Timestamp::nanos),
        purge_time: u.purge_time.map(Timestamp::nanos),
        revision: u.revision,
    })
}

fn from_model(m: users::Model) -> Result<User, DomainError> {
    let state = |n: i32| {
        State::from_i32(n).ok_or_else(|| DomainError::Internal(format!("stored state {n}")))
    };
    let secondary_emails: Vec<String> = unjson(&m.secondary_emails)?;
    let secondary_phones: Vec<String> = unjson(&m.secondary_phone_numbers)?;
    let addresses: Vec<Address> = unjson(&m.addresses)?;
    let profile = Profile {
        email: m.email.map(Email::from_stored),
        email_verified: m.email_verified,
        phone_number: m.phone_number.map(PhoneNumber::from_stored),
        phone_number_verified: m.phone_number_verified,
        secondary_emails: secondary_emails
            .into_iter()
            .map(Email::from_stored)
            .collect(),
        secondary_phone_numbers: secondary_phones
            .into_iter()
            .map(PhoneNumber::from_stored)
            .collect(),
        username: m.username.map(Username::from_stored),
        external_id: m.external_id.map(ExternalId::from_stored),
        display_name: m.display_name,
        given_name: m.given_name,
        middle_name: m.middle_name,
        family_name: m.family_name,
        title: m.title,
        birthday: m.birthday.as_deref().and_then(Birthday::from_stored),
        preferred_locale: Some(m.preferred_locale)
            .filter(|s| !s.is_empty())
            .map(Locale::from_stored),
        picture_uri: Some(m.picture_uri)
            .filter(|s| !s.is_empty())
            .map(PictureUri::from_stored),
        addresses,
        bio: m.bio,
        note: m.note,
        tags: unjson(&m.tags)?,
        roles: unjson(&m.roles)?,
        metadata: unjson(&m.metadata)?,
        custom_data: m.custom_data.as_deref().map(unjson).transpose()?,
        last_login_time: m.last_login_time.map(Timestamp::from_nanos),
    };
    Ok(User {
        project: ProjectId::from_stored(m.project),
        id: UserId::from_stored(m.user_id),
        profile,
        state: state(m.state)?,
        pre_delete_state: m.pre_delete_state.map(state).transpose()?,
        create_time: Timestamp::from_nanos(m.create_time),
        update_time: Timestamp::from_nanos(m.update_time),
        delete_time: m.delete_time.map(Timestamp::from_nanos),
        purge_time: m.purge_time.map(Timestamp::from_nanos),
        revision: m.revision,
    })
}
