//! The background task deletes idempotency keys older than their retention
//! once a minute (`DELETE FROM request_ids WHERE create_time < ?`); without
//! an index on the time that is a scan of every key of every project.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum RequestIds {
    Table,
    CreateTime,
}

const INDEX: &str = "request_ids_create_time";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_index(
                Index::create()
                    .name(INDEX)
                    .table(RequestIds::Table)
                    .col(RequestIds::CreateTime)
                    .if_not_exists()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name(INDEX)
                    .table(RequestIds::Table)
                    .to_owned(),
            )
            .await
    }
}
