//! Index terms for filters and search (see `terms`), and an index for lists
//! by state. Existing users get their terms in the same transaction.

use std::collections::BTreeMap;

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{
    ConnectionTrait, DatabaseBackend, DbErr, QueryResult, Statement, Value,
};

// The rules as they were when this migration was written (frozen).
use crate::terms_v1::{self as terms, Indexed};

#[derive(DeriveMigrationName)]
pub struct Migration;

/// Users read per backfill round.
const BACKFILL_CHUNK: u64 = 1000;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }

    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        let backend = db.get_database_backend();
        create_table(db, backend, false).await?;
        // Lists and counts by state, newest first.
        db.execute_unprepared(
            "CREATE INDEX IF NOT EXISTS ix_users_project_state_create_time \
             ON users (project, state, create_time, user_id)",
        )
        .await?;
        backfill(db, backend, false).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        db.execute_unprepared("DROP INDEX IF EXISTS ix_users_project_state_create_time")
            .await?;
        db.execute_unprepared("DROP TABLE IF EXISTS user_terms")
            .await?;
        Ok(())
    }
}

/// Creates `user_terms` and its per-user index; `with_create_time`: the
/// layout of `m20261122_000003_user_terms_by_time`.
pub(crate) async fn create_table(
    db: &SchemaManagerConnection<'_>,
    backend: DatabaseBackend,
    with_create_time: bool,
) -> Result<(), DbErr> {
    // Byte-wise order on both engines, so that prefixes are ranges.
    let (collate, without_rowid) = match backend {
        DatabaseBackend::Postgres => (" COLLATE \"C\"", ""),
        _ => ("", " WITHOUT ROWID"),
    };
    let (time_column, time_key, user_index) = if with_create_time {
        (
            "create_time BIGINT NOT NULL, ",
            "create_time, ",
            "(project, user_id, kind, term)",
        )
    } else {
        ("", "", "(project, user_id)")
    };
    db.execute_unprepared(&format!(
        "CREATE TABLE IF NOT EXISTS user_terms (\
           project TEXT NOT NULL, \
           kind SMALLINT NOT NULL, \
           term TEXT{collate} NOT NULL, \
           {time_column}\
           user_id TEXT NOT NULL, \
           PRIMARY KEY (project, kind, term, {time_key}user_id)){without_rowid}"
    ))
    .await?;
    // Replacing or erasing one user's terms (and, with create_time, probing
    // whether a user has a term).
    db.execute_unprepared(&format!(
        "CREATE INDEX IF NOT EXISTS ix_user_terms_user ON user_terms {user_index}"
    ))
    .await?;
    Ok(())
}

/// Writes the terms of every stored user; `with_create_time`: the layout of
/// `m20261122_000003_user_terms_by_time`.
pub(crate) async fn backfill(
    db: &SchemaManagerConnection<'_>,
    backend: DatabaseBackend,
    with_create_time: bool,
) -> Result<(), DbErr> {
    let mut after = (String::new(), String::new());
    loop {
        let rows = db
            .query_all_raw(Statement::from_sql_and_values(
                backend,
                match backend {
                    DatabaseBackend::Postgres => {
                        "SELECT project, user_id, email_key, phone_number, username, \
                         display_name, given_name, family_name, tags, roles, metadata, create_time, \
                         secondary_emails, secondary_phone_numbers FROM users \
                         WHERE (project, user_id) > ($1, $2) ORDER BY project, user_id LIMIT $3"
                    }
                    _ => {
                        "SELECT project, user_id, email_key, phone_number, username, \
                         display_name, given_name, family_name, tags, roles, metadata, create_time, \
                         secondary_emails, secondary_phone_numbers FROM users \
                         WHERE (project, user_id) > (?, ?) ORDER BY project, user_id LIMIT ?"
                    }
                },
                [
                    after.0.clone().into(),
                    after.1.clone().into(),
                    (BACKFILL_CHUNK as i64).into(),
                ],
            ))
            .await?;
        let Some(last) = rows.last() else {
            return Ok(());
        };
        after = (last.try_get("", "project")?, last.try_get("", "user_id")?);
        for row in &rows {
            insert_terms(db, backend, row, with_create_time).await?;
        }
    }
}

fn list(row: &QueryResult, column: &str) -> Result<Vec<String>, DbErr> {
    let text: String = row.try_get("", column)?;
    serde_json::from_str(&text).map_err(|e| DbErr::Custom(format!("users.{column}: {e}")))
}

async fn insert_terms(
    db: &SchemaManagerConnection<'_>,
    backend: DatabaseBackend,
    row: &QueryResult,
    with_create_time: bool,
) -> Result<(), DbErr> {
    let create_time: i64 = row.try_get("", "create_time")?;
    let project: String = row.try_get("", "project")?;
    let user_id: String = row.try_get("", "user_id")?;
    let email_key: Option<String> = row.try_get("", "email_key")?;
    let phone_number: Option<String> = row.try_get("", "phone_number")?;
    let username: Option<String> = row.try_get("", "username")?;
    let display_name: String = row.try_get("", "display_name")?;
    let given_name: String = row.try_get("", "given_name")?;
    let family_name: String = row.try_get("", "family_name")?;
    let tags = list(row, "tags")?;
    let roles = list(row, "roles")?;
    let secondary_emails = list(row, "secondary_emails")?;
    let secondary_phone_numbers = list(row, "secondary_phone_numbers")?;
    let metadata_text: String = row.try_get("", "metadata")?;
    let metadata: BTreeMap<String, String> = serde_json::from_str(&metadata_text)
        .map_err(|e| DbErr::Custom(format!("users.metadata: {e}")))?;
    let all = terms::terms(&Indexed {
        email_key: email_key.as_deref(),
        phone_number: phone_number.as_deref(),
        username: username.as_deref(),
        display_name: &display_name,
        given_name: &given_name,
        family_name: &family_name,
        tags: &tags,
        roles: &roles,
        metadata: metadata
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect(),
        secondary_emails: &secondary_emails,
        secondary_phone_numbers: &secondary_phone_numbers,
    });
    let (columns, marks) = match (with_create_time, backend) {
        (true, DatabaseBackend::Postgres) => (
            "project, kind, term, create_time, user_id",
            "$1, $2, $3, $4, $5",
        ),
        (true, _) => ("project, kind, term, create_time, user_id", "?, ?, ?, ?, ?"),
        (false, DatabaseBackend::Postgres) => ("project, kind, term, user_id", "$1, $2, $3, $4"),
        (false, _) => ("project, kind, term, user_id", "?, ?, ?, ?"),
    };
    let sql = format!("INSERT INTO user_terms ({columns}) VALUES ({marks}) ON CONFLICT DO NOTHING");
    for (kind, term) in all {
        let mut values: Vec<Value> = vec![project.clone().into(), kind.into(), term.into()];
        if with_create_time {
            values.push(create_time.into());
        }
        values.push(user_id.clone().into());
        db.execute_raw(Statement::from_sql_and_values(backend, &sql, values))
            .await?;
    }
    Ok(())
}
