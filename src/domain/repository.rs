//! What the domain needs from storage. Uniqueness and concurrency are decided by
//! the database: inserts and conditional writes report conflicts as
//! `DomainError::AlreadyExists`, and a conditional write that lost a race
//! returns `false`.

use std::future::Future;

use super::error::{DomainError, Identifier};
use super::query::{Cursor, UserQuery};
use super::user::User;
use super::values::{Email, ExternalId, PhoneNumber, ProjectId, Timestamp, UserId, Username};

/// An idempotency key with the fingerprint of the request that used it first.
#[derive(Clone, Debug)]
pub struct IdempotencyKey {
    pub request_id: String,
    pub fingerprint: String,
}

/// What a create stored, or found stored under the same idempotency key.
#[derive(Debug)]
pub enum Created {
    New(User),
    /// An earlier request with this key: its fingerprint and its result.
    Earlier {
        fingerprint: String,
        user: User,
    },
}

/// What an all-or-nothing batch create stored, or why it stored nothing.
#[derive(Debug)]
pub enum BatchCreated {
    New(Vec<User>),
    /// An earlier request with this key: its fingerprint and its result.
    Earlier {
        fingerprint: String,
        users: Vec<User>,
    },
    /// Nothing was stored: the user at `index` holds an identifier of a stored
    /// user.
    Conflict {
        index: usize,
        id: Identifier,
    },
}

/// A user of an import that was not stored because a stored user holds one of
/// its identifiers; `holder_create_time` is that user's create time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoredConflict {
    pub id: Identifier,
    pub holder_create_time: Timestamp,
}

/// A live identity to look a user up by.
#[derive(Clone, Debug)]
pub enum Identity {
    Email(Email),
    PhoneNumber(PhoneNumber),
    Username(Username),
    ExternalId(ExternalId),
}

pub trait UserRepository: Send + Sync + 'static {
    /// Inserts a new user (and, atomically with it, the idempotency key).
    fn insert(
        &self,
        user: &User,
        key: Option<&IdempotencyKey>,
    ) -> impl Future<Output = Result<Created, DomainError>> + Send;

    /// The result stored under an idempotency key, if any.
    fn find_request(
        &self,
        project: &ProjectId,
        request_id: &str,
    ) -> impl Future<Output = Result<Option<(String, User)>, DomainError>> + Send;

    /// Inserts every user of `users` or none, with the idempotency key
    /// (whose stored response is the whole list) in the same transaction.
    fn insert_all(
        &self,
        users: &[User],
        key: Option<&IdempotencyKey>,
    ) -> impl Future<Output = Result<BatchCreated, DomainError>> + Send;

    /// The result of a batch create stored under an idempotency key, if any.
    fn find_batch_request(
        &self,
        project: &ProjectId,
        request_id: &str,
    ) -> impl Future<Output = Result<Option<(String, Vec<User>)>, DomainError>> + Send;

    /// Inserts the users of one import chunk in one transaction, skipping
    /// those that conflict with stored users (`Some` at their position).
    /// The users must not conflict with each other.
    fn import(
        &self,
        users: &[User],
    ) -> impl Future<Output = Result<Vec<Option<StoredConflict>>, DomainError>> + Send;

    /// Fails with `AlreadyExists` if inserting `user` now would conflict.
    fn check_available(&self, user: &User) -> impl Future<Output = Result<(), DomainError>> + Send;

    fn get(
        &self,
        project: &ProjectId,
        id: &UserId,
    ) -> impl Future<Output = Result<Option<User>, DomainError>> + Send;

    /// The live (not deleted) user holding an identity.
    fn lookup(
        &self,
        project: &ProjectId,
        identity: &Identity,
    ) -> impl Future<Output = Result<Option<User>, DomainError>> + Send;

    /// Writes `user` over `previous` if the stored revision is still
    /// `previous.revision`.
    fn save(
        &self,
        user: &User,
        previous: &User,
    ) -> impl Future<Output = Result<bool, DomainError>> + Send;

    /// Up to `limit` users of `query`, in its order, after `after`.
    fn list(
        &self,
        query: &UserQuery,
        after: Option<&Cursor>,
        limit: u64,
    ) -> impl Future<Output = Result<Vec<User>, DomainError>> + Send;

    /// As `list`, for exports that read every page: the storage may read
    /// them in a way that keeps memory flat rather than one tuned for
    /// latency.
    fn export(
        &self,
        query: &UserQuery,
        after: Option<&Cursor>,
        limit: u64,
    ) -> impl Future<Output = Result<Vec<User>, DomainError>> + Send;

    /// Brings the query planner's statistics up to date after a bulk load.
    fn refresh_statistics(&self) -> impl Future<Output = Result<(), DomainError>> + Send;

    /// How many users match `query` (its order is ignored).
    fn count(&self, query: &UserQuery) -> impl Future<Output = Result<u64, DomainError>> + Send;

    /// The users with these ids that exist (deleted ones included), in any
    /// order.
    fn get_many(
        &self,
        project: &ProjectId,
        ids: &[UserId],
    ) -> impl Future<Output = Result<Vec<User>, DomainError>> + Send;

    /// Erases `user` if its stored revision is still `user.revision`.
    fn erase(&self, user: &User) -> impl Future<Output = Result<bool, DomainError>> + Send;

    /// Erases up to `limit` soft-deleted users whose purge time has passed.
    fn purge_expired(
        &self,
        now: Timestamp,
        limit: u64,
    ) -> impl Future<Output = Result<u64, DomainError>> + Send;

    /// Checks that the database answers.
    fn ping(&self) -> impl Future<Output = Result<(), DomainError>> + Send;

    /// Leaves the database ready for a fast restart, at a clean stop
    /// (SQLite: the write-ahead log is folded into the file).
    fn checkpoint(&self) -> impl Future<Output = Result<(), DomainError>> + Send;

    /// Publishes how much of its connection pools is in use (metrics).
    fn report_pool_use(&self) {}
}
