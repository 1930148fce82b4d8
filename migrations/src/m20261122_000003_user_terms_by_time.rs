//! Terms carry their user's `create_time`, so that a list by one term in the
//! default order (`create_time desc`) reads the term's index in order and
//! stops after one page, however many users share the term. The probe index
//! `(project, user_id, kind, term)` answers "does this user have a term in
//! this range" with one seek. The table is rebuilt and backfilled in the same
//! transaction.

use crate::m20261122_000002_user_terms::{backfill, create_table};
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }

    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        rebuild(manager, true).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        rebuild(manager, false).await
    }
}

/// Drops `user_terms` and makes it again in one layout, with every user's
/// terms.
async fn rebuild(manager: &SchemaManager<'_>, with_create_time: bool) -> Result<(), DbErr> {
    let db = manager.get_connection();
    let backend = db.get_database_backend();
    db.execute_unprepared("DROP TABLE IF EXISTS user_terms")
        .await?;
    create_table(db, backend, with_create_time).await?;
    backfill(db, backend, with_create_time).await
}
