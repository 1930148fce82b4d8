//! Database migrations of user-service, applied at start-up and by
//! `user-service migrate`. One module per migration, named by date.

pub use sea_orm_migration::prelude::*;

mod m20261122_000001_create_users;
mod m20261122_000002_user_terms;
mod m20261122_000003_user_terms_by_time;
mod m20261202_000004_request_ids_by_time;
mod m20261202_000005_user_id_byte_order;
mod m20261203_000006_groups;
mod m20261204_000007_events;
mod m20261205_000008_term_statistics;
pub mod terms;
mod terms_v1;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261122_000001_create_users::Migration),
            Box::new(m20261122_000002_user_terms::Migration),
            Box::new(m20261122_000003_user_terms_by_time::Migration),
            Box::new(m20261202_000004_request_ids_by_time::Migration),
            Box::new(m20261202_000005_user_id_byte_order::Migration),
            Box::new(m20261203_000006_groups::Migration),
            Box::new(m20261204_000007_events::Migration),
            Box::new(m20261205_000008_term_statistics::Migration),
        ]
    }
}
