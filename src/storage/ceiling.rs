//! Benchmark support: the raw ceilings the bulk figures are divided by. The
//! same rows the service writes (users and their index terms), written and
//! read with plain multi-row and keyset statements on one connection, with
//! no gRPC, no validation and no service logic in between. Only `user-bench`
//! calls this.

use std::time::{Duration, Instant};

use sea_orm::{
    ConnectionTrait, DatabaseBackend, DatabaseConnection, EntityTrait, QueryTrait, Statement,
    TransactionTrait,
};

use super::entity::{user_terms, users};
use super::sqlite_read::{COLUMNS, model, params};
use super::{db_error, terms, to_model};
use crate::domain::{DomainError, User};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The INSERTs that store `chunk` (users, then terms) in the service's
/// statement sizes.
fn statements(backend: DatabaseBackend, chunk: &[User]) -> Result<Vec<Statement>, DomainError> {
    let mut out = Vec::new();
    let mut rows = Vec::with_capacity(chunk.len());
    for u in chunk {
        rows.push(users::ActiveModel::from(to_model(u)?));
    }
    while !rows.is_empty() {
        let rest = rows.split_off(rows.len().min(64));
        let part = std::mem::replace(&mut rows, rest);
        out.push(users::Entity::insert_many(part).build(backend));
    }
    let mut term_rows: Vec<user_terms::ActiveModel> = Vec::new();
    for u in chunk {
        for (kind, term) in terms::of(u) {
            term_rows.push(user_terms::ActiveModel {
                project: sea_orm::ActiveValue::Set(u.project.as_str().to_owned()),
                kind: sea_orm::ActiveValue::Set(kind),
                term: sea_orm::ActiveValue::Set(term),
                create_time: sea_orm::ActiveValue::Set(u.create_time.nanos()),
                user_id: sea_orm::ActiveValue::Set(u.id.as_str().to_owned()),
            });
        }
    }
    while !term_rows.is_empty() {
        let rest = term_rows.split_off(term_rows.len().min(128));
        let part = std::mem::replace(&mut term_rows, rest);
        out.push(user_terms::Entity::insert_many(part).build(backend));
    }
    Ok(out)
}

/// Inserts `make(i)` for every chunk index into the (migrated, empty)
/// database at `url`, one transaction per chunk; returns the time spent in
/// the database only (building the statements is not counted).
pub async fn raw_insert(
    url: &str,
    chunks: usize,
    make: impl Fn(usize) -> Vec<User>,
) -> Result<(u64, Duration), BoxError> {
    let mut spent = Duration::ZERO;
    let mut rows = 0;
    if url.starts_with("sqlite:") {
        let conn = rusqlite::Connection::open(sqlite_path(url)?)?;
        conn.pragma_update(None, "journal_mode", "wal")?;
        conn.pragma_update(None, "synchronous", "normal")?;
        conn.set_prepared_statement_cache_capacity(16);
        for i in 0..chunks {
            let chunk = make(i);
            let stmts = statements(DatabaseBackend::Sqlite, &chunk)?;
            let t0 = Instant::now();
            conn.execute_batch("BEGIN")?;
            for s in &stmts {
                conn.prepare_cached(&s.sql)?
                    .execute(rusqlite::params_from_iter(params(s)?))?;
            }
            conn.execute_batch("COMMIT")?;
            spent += t0.elapsed();
            rows += chunk.len() as u64;
        }
    } else {
        let db = super::connect(url, 1).await?;
        for i in 0..chunks {
            let chunk = make(i);
            let stmts = statements(DatabaseBackend::Postgres, &chunk)?;
            let t0 = Instant::now();
            let txn = db.begin().await?;
            for s in stmts {
                txn.execute_raw(s).await?;
            }
            txn.commit().await?;
            spent += t0.elapsed();
            rows += chunk.len() as u64;
        }
    }
    Ok((rows, spent))
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
            sqlite_path(url)?,
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

fn sqlite_path(url: &str) -> Result<std::path::PathBuf, BoxError> {
    use std::str::FromStr;
    let opts = sea_orm::sqlx::sqlite::SqliteConnectOptions::from_str(url)?;
    Ok(opts.get_filename().to_owned())
}
