//! sea-orm entities. They never leave the storage module.

pub mod users {
    use sea_orm::entity::prelude::*;
    use serde::{Deserialize, Serialize};

    /// Also the idempotency record of a created user
    /// (`storage::idempotency`): a field missing from an older record
    /// reads as its default.
    #[derive(Clone, Debug, Default, PartialEq, Eq, DeriveEntityModel, Serialize, Deserialize)]
    #[serde(default)]
    #[sea_orm(table_name = "users")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub project: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub user_id: String,
        pub email: Option<String>,
        pub email_key: Option<String>,
        pub email_verified: bool,
        pub phone_number: Option<String>,
        pub phone_number_verified: bool,
        pub secondary_emails: String,
        pub secondary_phone_numbers: String,
        pub username: Option<String>,
        pub external_id: Option<String>,
        pub display_name: String,
        pub given_name: String,
        pub middle_name: String,
        pub family_name: String,
        pub title: String,
        pub birthday: Option<String>,
        pub preferred_locale: String,
        pub picture_uri: String,
        pub addresses: String,
        pub bio: String,
        pub note: String,
        pub tags: String,
        pub roles: String,
        pub metadata: String,
        pub custom_data: Option<String>,
        pub last_login_time: Option<i64>,
        pub state: i32,
        pub pre_delete_state: Option<i32>,
        pub create_time: i64,
        pub update_time: i64,
        pub delete_time: Option<i64>,
        pub purge_time: Option<i64>,
        pub revision: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod groups {
    use sea_orm::entity::prelude::*;
    use serde::{Deserialize, Serialize};

    /// Also the idempotency record of a created group.
    #[derive(Clone, Debug, Default, PartialEq, Eq, DeriveEntityModel, Serialize, Deserialize)]
    #[serde(default)]
    #[sea_orm(table_name = "groups")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub project: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub group_id: String,
        pub display_name: String,
        pub description: String,
        /// JSON object of strings.
        pub metadata: String,
        pub create_time: i64,
        pub update_time: i64,
        pub revision: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod request_ids {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "request_ids")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub project: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub request_id: String,
        pub fingerprint: String,
        pub user_id: String,
        /// The created user as stored, JSON: what a retry gets back.
        pub response: String,
        pub create_time: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod user_terms {
    use sea_orm::entity::prelude::*;

    /// One index term of a user (see `migration::terms`).
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "user_terms")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub project: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub kind: i16,
        #[sea_orm(primary_key, auto_increment = false)]
        pub term: String,
        /// The user's `create_time`: a term's users in list order.
        #[sea_orm(primary_key, auto_increment = false)]
        pub create_time: i64,
        #[sea_orm(primary_key, auto_increment = false)]
        pub user_id: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
