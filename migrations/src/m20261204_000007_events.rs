//! The change log (transactional outbox) of every project.
//!
//! `events` holds one row per committed change, keyed by the project and its
//! revision. `body` is the encoded `users.v1.Event` protobuf without its
//! revision (the key carries it): the log keeps the public wire format, which
//! later versions can still read. `event_type` and `resource` are copied out
//! for filters, `event_id` for the bus relay.
//!
//! `event_heads` holds each project's last revision. A writer bumps it in the
//! same transaction as its change, as the last statement before the commit:
//! the row lock it takes then makes the writers of one project append in
//! commit order, which a sequence would not (a sequence hands out numbers at
//! first use, not at commit). `compacted_through` is the highest revision
//! retention has removed.
//!
//! `event_relay` is the bus relay's durable cursor: the last revision of each
//! project that the message bus acknowledged.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DatabaseBackend};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }

    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        let (c, blob) = match db.get_database_backend() {
            DatabaseBackend::Postgres => (" COLLATE \"C\"", "BYTEA"),
            _ => ("", "BLOB"),
        };
        for sql in [
            format!(
                "CREATE TABLE IF NOT EXISTS event_heads (\
                   project TEXT{c} NOT NULL PRIMARY KEY, \
                   revision BIGINT NOT NULL, \
                   compacted_through BIGINT NOT NULL DEFAULT 0)"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS events (\
                   project TEXT{c} NOT NULL, \
                   revision BIGINT NOT NULL, \
                   event_id TEXT NOT NULL, \
                   event_type TEXT NOT NULL, \
                   resource TEXT NOT NULL, \
                   event_time BIGINT NOT NULL, \
                   body {blob} NOT NULL, \
                   PRIMARY KEY (project, revision))"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS event_relay (\
                   project TEXT{c} NOT NULL PRIMARY KEY, \
                   revision BIGINT NOT NULL)"
            ),
        ] {
            db.execute_unprepared(&sql).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        for table in ["event_relay", "events", "event_heads"] {
            db.execute_unprepared(&format!("DROP TABLE IF EXISTS {table}"))
                .await?;
        }
        Ok(())
    }
}
