//! Benchmark support: the raw ceilings the bulk figures are divided by. The
//! same rows the service writes (users, their index terms, their events;
//! or only the users, into a table with just the identifier indexes),
//! written with the statements and executor the service's import uses and
//! read with plain keyset statements on one connection, with no gRPC, no
//! validation and no service logic in between. Only `user-bench` calls this.

use std::time::{Duration, Instant};

use sea_orm::{
    ConnectionTrait, DatabaseBackend, DatabaseConnection, EntityTrait, Statement, TransactionTrait,
};

use super::db_error;
use super::entity::users;
use super::events::Outbox;
use super::sqlite_read::{COLUMNS, file_of, model, params};
use super::sqlite_write::{SqliteWriter, Step, check_rows};
use crate::domain::events::EventEncoder;
use crate::domain::{DomainError, User};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What a raw import ceiling writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rows {
    /// The service's rows in its schema: users, their index terms and their
    /// creation events.
    Full,
    /// Only the users' rows, into a table with just the primary key and the
    /// four unique identifier indexes: the least any correct user store
    /// pays.
    Identifiers,
}

/// The indexes of `users` that `Rows::Identifiers` drops.
const NOT_IDENTIFIERS: [&str; 3] = [
    "ix_users_project_create_time",
    "ix_users_purge_time",
    "ix_users_project_state_create_time",
];

/// Prepares a migrated, empty database for `rows`.
pub async fn prepare(url: &str, rows: Rows) -> Result<(), BoxError> {
    if rows == Rows::Identifiers {
        let db = super::connect(url, 1).await?;
        for index in NOT_IDENTIFIERS {
            db.execute_unprepared(&format!("DROP INDEX {index}"))
                .await?;
        }
        db.close().await?;
    }
    Ok(())
}

/// The statements the service runs to store `chunk` (see `bulk`), in parts
/// of the size it hands its SQLite writer.
fn steps(
    backend: DatabaseBackend,
    outbox: &Outbox,
    chunk: &[User],
    rows: Rows,
) -> Result<Vec<Vec<Step>>, DomainError> {
    let refs: Vec<&User> = chunk.iter().collect();
    let mut parts = Vec::new();
    for part in refs.chunks(super::bulk::PART) {
        let stmts = match rows {
            Rows::Full => super::bulk::row_statements(backend, part),
            Rows::Identifiers => super::bulk::user_rows(backend, part),
        }
        .map_err(db_error)?;
        parts.push(stmts.into_iter().map(Step::from).collect());
    }
    if rows == Rows::Full {
        parts.push(outbox.steps(backend, &super::bulk::creation_events(&refs)));
    }
    Ok(parts)
}

/// Inserts `make(i)` for every chunk index into the database at `url`
/// (see `prepare`), one transaction per chunk, as the service's import runs
/// them: on SQLite through its writer thread, on PostgreSQL one statement
/// at a time on one connection. Returns the time spent in the database only
/// (building the statements is not counted).
pub async fn raw_insert(
    url: &str,
    rows: Rows,
    encode: EventEncoder,
    chunks: usize,
    make: impl Fn(usize) -> Vec<User>,
) -> Result<(u64, Duration), BoxError> {
    let mut spent = Duration::ZERO;
    let mut n = 0;
    let outbox = Outbox::new(encode);
    // The executor the service's import uses on this engine.
    enum Sink {
        Writer(SqliteWriter),
        Pool(DatabaseConnection),
    }
    let (sink, backend) = if url.starts_with("sqlite:") {
        let writer = SqliteWriter::open(url).ok_or("cannot open the ceiling's SQLite file")?;
        (Sink::Writer(writer), DatabaseBackend::Sqlite)
    } else {
        let db = super::connect(url, 1).await?;
        (Sink::Pool(db), DatabaseBackend::Postgres)
    };
    for i in 0..chunks {
        let chunk = make(i);
        let parts = steps(backend, &outbox, &chunk, rows)?;
        let t0 = Instant::now();
        match &sink {
            Sink::Writer(w) => {
                let mut txn = w.begin()?;
                for part in parts {
                    txn.run(part).await?;
                }
                txn.commit().await?;
            }
            Sink::Pool(db) => {
                let txn = db.begin().await?;
                for step in parts.into_iter().flatten() {
                    let changed = txn.execute_raw(step.stmt).await?.rows_affected();
                    check_rows(step.rows, changed)?;
                }
                txn.commit().await?;
            }
        }
        spent += t0.elapsed();
        n += chunk.len() as u64;
    }
    Ok((n, spent))
}

/// Reads every user of `project` newest first in keyset pages of `page`,
/// decoding each row; returns how many and how long.
pub async fn raw_scan(url: &str, project: &str, page: u64) -> Result<(u64, Duration), BoxError> {
    let t0 = Instant::now();
    let mut n = 0;
    let mut after: Option<(i64, String)> = None;
    let db: Option<DatabaseConnection> = if url.starts_with("sqlite:") {
        None
    } else {
        Some(super::connect(url, 1).await?)
    };
    let sqlite = match &db {
        None => Some(rusqlite::Connection::open_with_flags(
            file_of(url).ok_or("no such SQLite file")?,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )?),
        Some(_) => None,
    };
    loop {
        let (cond, values): (&str, Vec<sea_orm::Value>) = match &after {
            None => ("", vec![project.into()]),
            Some((t, id)) => (
                " AND (create_time, user_id) < ($2, $3)",
                vec![project.into(), (*t).into(), id.clone().into()],
            ),
        };
        let sql = format!(
            "SELECT {COLUMNS} FROM users WHERE project = $1 AND delete_time IS NULL{cond} \
             ORDER BY create_time DESC, user_id DESC LIMIT {page}"
        );
        let models: Vec<users::Model> = match (&db, &sqlite) {
            (Some(db), _) => users::Entity::find()
                .from_raw_sql(Statement::from_sql_and_values(
                    DatabaseBackend::Postgres,
                    sql,
                    values,
                ))
                .all(db)
                .await
                .map_err(db_error)?,
            (None, Some(c)) => {
                let stmt = Statement::from_sql_and_values(
                    DatabaseBackend::Sqlite,
                    sql.replace('$', "?"),
                    values,
                );
                let mut st = c.prepare_cached(&stmt.sql)?;
                st.query_map(rusqlite::params_from_iter(params(&stmt)?), model)?
                    .collect::<Result<_, _>>()?
            }
            _ => unreachable!("one of the two connections is open"),
        };
        let Some(last) = models.last() else { break };
        n += models.len() as u64;
        after = Some((last.create_time, last.user_id.clone()));
        if (models.len() as u64) < page {
            break;
        }
    }
    Ok((n, t0.elapsed()))
}
