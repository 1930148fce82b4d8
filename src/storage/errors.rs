//! Database errors in the domain's terms: which are conflicts, which mean
//! the database is unavailable, which are the client's to retry.

use sea_orm::sqlx;
use sea_orm::{DbErr, RuntimeErr, SqlErr};
use tracing::{error, warn};

use crate::domain::{DomainError, Identifier};

/// Maps a database error to the domain: constraint violations become conflicts,
/// lost connections become Unavailable, the rest is internal (and logged here,
/// since the client only sees a generic message).
pub(crate) fn db_error(e: DbErr) -> DomainError {
    if let Some(SqlErr::UniqueConstraintViolation(msg)) = e.sql_err() {
        return DomainError::AlreadyExists(identifier_of_constraint(&msg));
    }
    // 40P01 deadlock, 40001 serialization failure: the transaction was
    // rolled back whole; the client may retry.
    if let DbErr::Exec(RuntimeErr::SqlxError(se)) | DbErr::Query(RuntimeErr::SqlxError(se)) = &e
        && let sqlx::Error::Database(d) = se.as_ref()
        && matches!(d.code().as_deref(), Some("40P01" | "40001"))
    {
        warn!(error = %e, "transaction conflict");
        return DomainError::ConcurrentModification;
    }
    let unavailable = match &e {
        DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => true,
        DbErr::Exec(RuntimeErr::SqlxError(se)) | DbErr::Query(RuntimeErr::SqlxError(se)) => {
            match se.as_ref() {
                sqlx::Error::Io(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed => true,
                // SQLite "database is locked" after the busy timeout.
                sqlx::Error::Database(d) => {
                    matches!(d.code().as_deref(), Some("5" | "6" | "261" | "517"))
                        || d.code().is_some_and(|c| {
                            // 57014: cancelled by statement_timeout.
                            c.starts_with("08") || c == "57P01" || c == "57014"
                        })
                }
                _ => false,
            }
        }
        _ => false,
    };
    if unavailable {
        warn!(error = %e, "database unavailable");
        DomainError::Unavailable(e.to_string())
    } else {
        error!(error = %e, "database error");
        DomainError::Internal(e.to_string())
    }
}

/// Which identifier a unique violation is about. PostgreSQL names the index,
/// SQLite the columns; the index names contain the column names.
fn identifier_of_constraint(msg: &str) -> Identifier {
    if msg.contains("email_key") {
        Identifier::Email
    } else if msg.contains("phone_number") {
        Identifier::PhoneNumber
    } else if msg.contains("username") {
        Identifier::Username
    } else if msg.contains("external_id") {
        Identifier::ExternalId
    } else {
        Identifier::Name
    }
}

#[cfg(test)]
mod tests {
    use sea_orm::{ConnectionTrait, Database, TransactionTrait};

    use super::*;

    /// Two transactions that wait for each other's row: PostgreSQL breaks
    /// the deadlock by failing one (40P01), which the client sees as
    /// ABORTED / CONCURRENT_MODIFICATION, not INTERNAL.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_postgres_deadlock_is_a_concurrent_modification() {
        let Ok(url) = std::env::var("TEST_DATABASE_URL") else {
            assert!(std::env::var("CI").is_err(), "CI needs TEST_DATABASE_URL");
            return;
        };
        let db = Database::connect(&url).await.expect("connect");
        let table = format!("deadlock_{}", uuid::Uuid::now_v7().simple());
        db.execute_unprepared(&format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, v int); \
             INSERT INTO {table} VALUES (1, 0), (2, 0)"
        ))
        .await
        .expect("create");
        let (a, b) = (db.begin().await.unwrap(), db.begin().await.unwrap());
        let upd = |id: i32| format!("UPDATE {table} SET v = v + 1 WHERE id = {id}");
        a.execute_unprepared(&upd(1)).await.unwrap();
        b.execute_unprepared(&upd(2)).await.unwrap();
        let (second_a, second_b) = (upd(2), upd(1));
        let (ra, rb) = tokio::join!(
            a.execute_unprepared(&second_a),
            b.execute_unprepared(&second_b)
        );
        let failed = [ra.err(), rb.err()].into_iter().flatten().next();
        let mapped = db_error(failed.expect("one side of the deadlock fails"));
        assert!(
            matches!(mapped, DomainError::ConcurrentModification),
            "{mapped:?}"
        );
        drop((a, b));
        db.execute_unprepared(&format!("DROP TABLE {table}"))
            .await
            .expect("drop");
    }
}
