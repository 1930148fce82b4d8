//! Keyset pages break ties on the user id. SQLite compares text byte-wise;
//! PostgreSQL used the database's collation (e.g. en_US.UTF-8, where `a-b`
//! and `ab` sort differently than by bytes), so the same page token meant a
//! different position on each engine. On PostgreSQL the user id columns are
//! byte-ordered (`COLLATE "C"`), like the index terms; their indexes are
//! rebuilt in the process. SQLite needs nothing.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DatabaseBackend};

#[derive(DeriveMigrationName)]
pub struct Migration;

const TABLES: [&str; 2] = ["users", "user_terms"];

async fn collate(manager: &SchemaManager<'_>, collation: &str) -> Result<(), DbErr> {
    let db = manager.get_connection();
    if db.get_database_backend() != DatabaseBackend::Postgres {
        return Ok(());
    }
    for table in TABLES {
        db.execute_unprepared(&format!(
            "ALTER TABLE {table} ALTER COLUMN user_id TYPE TEXT COLLATE {collation}"
        ))
        .await?;
    }
    Ok(())
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        collate(manager, "\"C\"").await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        collate(manager, "\"default\"").await
    }
}
