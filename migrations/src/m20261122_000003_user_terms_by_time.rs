//! Terms carry their user's `create_time`, so that a list by one term in the
//! default order (`create_time desc`) reads the term's index in order and
//! stops after one page, however many users share the term. The probe index
//! `(project, user_id, kind, term)` answers "does this user have a term in
//! this range" with one seek. The table is rebuilt and backfilled in the same
//! transaction.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DatabaseBackend;

use crate::m20261122_000002_user_terms::backfill;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }

    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        let backend = db.get_database_backend();
        let (collate, without_rowid) = match backend {
            DatabaseBackend::Postgres => (" COLLATE \"C\"", ""),
            _ => ("", " WITHOUT ROWID"),
        };
        db.execute_unprepared("DROP TABLE IF EXISTS user_terms")
            .await?;
        db.execute_unprepared(&format!(
            "CREATE TABLE user_terms (\
               project TEXT NOT NULL, \
               kind SMALLINT NOT NULL, \
               term TEXT{collate} NOT NULL, \
               create_time BIGINT NOT NULL, \
               user_id TEXT NOT NULL, \
               PRIMARY KEY (project, kind, term, create_time, user_id)){without_rowid}"
        ))
        .await?;
        db.execute_unprepared(
            "CREATE INDEX ix_user_terms_user ON user_terms (project, user_id, kind, term)",
        )
        .await?;
        backfill(db, backend, true).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        let backend = db.get_database_backend();
        let (collate, without_rowid) = match backend {
            DatabaseBackend::Postgres => (" COLLATE \"C\"", ""),
            _ => ("", " WITHOUT ROWID"),
        };
        db.execute_unprepared("DROP TABLE IF EXISTS user_terms")
            .await?;
        db.execute_unprepared(&format!(
            "CREATE TABLE user_terms (\
               project TEXT NOT NULL, \
               kind SMALLINT NOT NULL, \
               term TEXT{collate} NOT NULL, \
               user_id TEXT NOT NULL, \
               PRIMARY KEY (project, kind, term, user_id)){without_rowid}"
        ))
        .await?;
        db.execute_unprepared("CREATE INDEX ix_user_terms_user ON user_terms (project, user_id)")
            .await?;
        backfill(db, backend, false).await
    }
}
