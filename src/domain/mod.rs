//! Validated values, the user model, the lifecycle rules and the repository
//! trait. Nothing here knows about gRPC or SQL.

pub mod bulk;
pub mod caller;
pub mod error;
pub mod events;
pub mod filter;
pub mod group;
pub mod groups;
pub mod query;
pub mod repository;
pub mod service;
pub mod user;
pub mod values;

pub use bulk::{ChunkOutcome, ImportLog};
pub use caller::{Caller, Denied, Projects, Scope};
pub use error::{DomainError, FieldViolation, Identifier, QueryProblem, Violations};
pub use group::{Group, GroupFields, GroupId, GroupName, GroupQuery, Member, MemberKind, NewGroup};
pub use groups::{GroupCreated, GroupRepository, Groups, ListPage, MembershipError};
pub use query::{Cursor, OrderBy, UserQuery};
pub use repository::{
    BatchCreated, Created, IdempotencyKey, Identity, StoredConflict, UserRepository,
};
pub use service::{NewUser, Page, Users};
pub use user::{Address, AddressKind, Field, FieldPath, Profile, State, User};
pub use values::*;
