//! Groups and their memberships.
//!
//! A membership is a row of `group_users` (a user in a group) or of
//! `group_groups` (a group in a group). Foreign keys keep them honest on both
//! engines: a membership of a missing group or user cannot be stored, and
//! deleting a group or erasing a user removes its memberships in the same
//! statement (`ON DELETE CASCADE`), so a racing add and delete never leave an
//! orphan. Primary keys make every pair unique; the second index of each
//! table reads a member's groups. Ids are byte-ordered (PostgreSQL
//! `COLLATE "C"`), as keyset pages expect.
//!
//! Beware in later migrations: SQLite runs with foreign keys on, so
//! rebuilding `users` or `groups` the SQLite way (create a copy, drop the
//! original, rename) would cascade the DROP and erase every membership. Such
//! a migration must turn foreign keys off around the rebuild (`PRAGMA
//! foreign_keys = OFF` outside the transaction) and check them after.

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
        let (c, without_rowid) = match db.get_database_backend() {
            DatabaseBackend::Postgres => (" COLLATE \"C\"", ""),
            _ => ("", " WITHOUT ROWID"),
        };
        for sql in [
            format!(
                "CREATE TABLE IF NOT EXISTS groups (\
                   project TEXT NOT NULL, \
                   group_id TEXT{c} NOT NULL, \
                   display_name TEXT{c} NOT NULL, \
                   description TEXT NOT NULL, \
                   metadata TEXT NOT NULL, \
                   create_time BIGINT NOT NULL, \
                   update_time BIGINT NOT NULL, \
                   revision BIGINT NOT NULL, \
                   PRIMARY KEY (project, group_id))"
            ),
            "CREATE INDEX IF NOT EXISTS ix_groups_project_create_time \
             ON groups (project, create_time, group_id)"
                .into(),
            "CREATE INDEX IF NOT EXISTS ix_groups_project_display_name \
             ON groups (project, display_name, group_id)"
                .into(),
            format!(
                "CREATE TABLE IF NOT EXISTS group_users (\
                   project TEXT NOT NULL, \
                   group_id TEXT{c} NOT NULL, \
                   user_id TEXT{c} NOT NULL, \
                   PRIMARY KEY (project, group_id, user_id), \
                   FOREIGN KEY (project, group_id) REFERENCES groups (project, group_id) \
                     ON DELETE CASCADE, \
                   FOREIGN KEY (project, user_id) REFERENCES users (project, user_id) \
                     ON DELETE CASCADE){without_rowid}"
            ),
            "CREATE INDEX IF NOT EXISTS ix_group_users_user \
             ON group_users (project, user_id, group_id)"
                .into(),
            format!(
                "CREATE TABLE IF NOT EXISTS group_groups (\
                   project TEXT NOT NULL, \
                   group_id TEXT{c} NOT NULL, \
                   member_id TEXT{c} NOT NULL, \
                   PRIMARY KEY (project, group_id, member_id), \
                   FOREIGN KEY (project, group_id) REFERENCES groups (project, group_id) \
                     ON DELETE CASCADE, \
                   FOREIGN KEY (project, member_id) REFERENCES groups (project, group_id) \
                     ON DELETE CASCADE, \
                   CHECK (group_id <> member_id)){without_rowid}"
            ),
            "CREATE INDEX IF NOT EXISTS ix_group_groups_member \
             ON group_groups (project, member_id, group_id)"
                .into(),
        ] {
            db.execute_unprepared(&sql).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        for table in ["group_groups", "group_users", "groups"] {
            db.execute_unprepared(&format!("DROP TABLE IF EXISTS {table}"))
                .await?;
        }
        Ok(())
    }
}
