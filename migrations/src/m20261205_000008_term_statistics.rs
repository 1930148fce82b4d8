//! PostgreSQL estimates a term's users from the selectivities of `project`,
//! `kind` and `term` as if they were independent. Over a million users a tag
//! half of them have was estimated at an eighth of that, and the planner
//! hashed every entry of the tag for `NOT tags:"even"` (1.6 s) instead of
//! probing the first users of the time index (0.5 ms). Extended statistics
//! (most common combinations, functional dependencies) give it the real
//! numbers after the next ANALYZE (imports run one; autovacuum does too).
//! SQLite plans these queries by rule and has nothing to add.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DatabaseBackend;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        if db.get_database_backend() == DatabaseBackend::Postgres {
            db.execute_unprepared(
                "CREATE STATISTICS IF NOT EXISTS st_user_terms_project_kind_term \
                 (dependencies, mcv) ON project, kind, term FROM user_terms",
            )
            .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        if db.get_database_backend() == DatabaseBackend::Postgres {
            db.execute_unprepared("DROP STATISTICS IF EXISTS st_user_terms_project_kind_term")
                .await?;
        }
        Ok(())
    }
}
