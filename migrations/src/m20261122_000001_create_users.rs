//! The users table and the idempotency-key table.
//!
//! Portable choices, so that SQLite and PostgreSQL behave the same:
//! - times are BIGINT nanoseconds since the Unix epoch (UTC): exact, ordered and
//!   compared the same way on both engines;
//! - lists, maps and structs are JSON text;
//! - uniqueness among users that are not deleted is a partial unique index
//!   (`WHERE delete_time IS NULL`), so the database, not the service, decides the
//!   winner when two replicas race.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Users {
    Table,
    Project,
    UserId,
    Email,
    EmailKey,
    EmailVerified,
    PhoneNumber,
    PhoneNumberVerified,
    SecondaryEmails,
    SecondaryPhoneNumbers,
    Username,
    ExternalId,
    DisplayName,
    GivenName,
    MiddleName,
    FamilyName,
    Title,
    Birthday,
    PreferredLocale,
    PictureUri,
    Addresses,
    Bio,
    Note,
    Tags,
    Roles,
    Metadata,
    CustomData,
    LastLoginTime,
    State,
    PreDeleteState,
    CreateTime,
    UpdateTime,
    DeleteTime,
    PurgeTime,
    Revision,
}

#[derive(DeriveIden)]
enum RequestIds {
    Table,
    Project,
    RequestId,
    Fingerprint,
    UserId,
    Response,
    CreateTime,
}

/// Partial unique indexes: one live owner per identifier and project.
const UNIQUE_LIVE: &[(&str, &str)] = &[
    ("ux_users_project_email_key", "email_key"),
    ("ux_users_project_phone_number", "phone_number"),
    ("ux_users_project_username", "username"),
    ("ux_users_project_external_id", "external_id"),
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    // All or nothing on both engines: a crash mid-way leaves no half-made schema.
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }

    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let text = |c: Users| ColumnDef::new(c).text().not_null().to_owned();
        let opt_text = |c: Users| ColumnDef::new(c).text().null().to_owned();
        let flag = |c: Users| ColumnDef::new(c).boolean().not_null().to_owned();
        let time = |c: Users| ColumnDef::new(c).big_integer().not_null().to_owned();
        let opt_time = |c: Users| ColumnDef::new(c).big_integer().null().to_owned();

        manager
            .create_table(
                Table::create()
                    .table(Users::Table)
                    .if_not_exists()
                    .col(text(Users::Project))
                    .col(text(Users::UserId))
                    .col(opt_text(Users::Email))
                    .col(opt_text(Users::EmailKey))
                    .col(flag(Users::EmailVerified))
                    .col(opt_text(Users::PhoneNumber))
                    .col(flag(Users::PhoneNumberVerified))
                    .col(text(Users::SecondaryEmails))
                    .col(text(Users::SecondaryPhoneNumbers))
                    .col(opt_text(Users::Username))
                    .col(opt_text(Users::ExternalId))
                    .col(text(Users::DisplayName))
                    .col(text(Users::GivenName))
                    .col(text(Users::MiddleName))
                    .col(text(Users::FamilyName))
                    .col(text(Users::Title))
                    .col(opt_text(Users::Birthday))
                    .col(text(Users::PreferredLocale))
                    .col(text(Users::PictureUri))
                    .col(text(Users::Addresses))
                    .col(text(Users::Bio))
                    .col(text(Users::Note))
                    .col(text(Users::Tags))
                    .col(text(Users::Roles))
                    .col(text(Users::Metadata))
                    .col(opt_text(Users::CustomData))
                    .col(opt_time(Users::LastLoginTime))
                    .col(ColumnDef::new(Users::State).integer().not_null())
                    .col(ColumnDef::new(Users::PreDeleteState).integer().null())
                    .col(time(Users::CreateTime))
                    .col(time(Users::UpdateTime))
                    .col(opt_time(Users::DeleteTime))
                    .col(opt_time(Users::PurgeTime))
                    .col(time(Users::Revision))
                    .primary_key(Index::create().col(Users::Project).col(Users::UserId))
                    .to_owned(),
            )
            .await?;

        let db = manager.get_connection();
        for (name, column) in UNIQUE_LIVE {
            // Partial indexes are written as SQL: the syntax is the same on SQLite
            // and PostgreSQL.
            db.execute_unprepared(&format!(
                "CREATE UNIQUE INDEX IF NOT EXISTS {name} ON users (project, {column}) \
                 WHERE delete_time IS NULL AND {column} IS NOT NULL"
            ))
            .await?;
        }
        db.execute_unprepared(
            "CREATE INDEX IF NOT EXISTS ix_users_project_create_time \
             ON users (project, create_time, user_id)",
        )
        .await?;
        db.execute_unprepared(
            "CREATE INDEX IF NOT EXISTS ix_users_purge_time ON users (purge_time) \
             WHERE purge_time IS NOT NULL",
        )
        .await?;

        manager
            .create_table(
                Table::create()
                    .table(RequestIds::Table)
                    .if_not_exists()
                    .col(ColumnDef::new(RequestIds::Project).text().not_null())
                    .col(ColumnDef::new(RequestIds::RequestId).text().not_null())
                    .col(ColumnDef::new(RequestIds::Fingerprint).text().not_null())
                    .col(ColumnDef::new(RequestIds::UserId).text().not_null())
                    .col(ColumnDef::new(RequestIds::Response).text().not_null())
                    .col(
                        ColumnDef::new(RequestIds::CreateTime)
                            .big_integer()
                            .not_null(),
                    )
                    .primary_key(
                        Index::create()
                            .col(RequestIds::Project)
                            .col(RequestIds::RequestId),
                    )
                    .to_owned(),
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(RequestIds::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(Users::Table).to_owned())
            .await
    }
}
