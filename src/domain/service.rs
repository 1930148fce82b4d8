//! The rules of the user lifecycle, independent of transport and storage.

use std::time::Duration;

use tracing::instrument;

use super::bulk::{ChunkOutcome, Claims, ImportLog};
use super::error::{DomainError, FieldViolation, Identifier, Violations};
use super::query::{
    Cursor, UserQuery, clamp_page_size, decode_page_token, next_page_token, page_token_error,
};
use super::repository::{BatchCreated, Created, IdempotencyKey, Identity, UserRepository};
use super::user::{FieldPath, MAX_METADATA, Profile, State, User};
use super::values::{ProjectId, Timestamp, UserId, UserName};

/// How often a write re-reads and retries after losing a race with another
/// writer, when the caller did not pin an etag.
pub(super) const MAX_ATTEMPTS: usize = 32;

/// One page of a list or search.
#[derive(Debug)]
pub struct Page {
    pub users: Vec<User>,
    /// Empty on the last page.
    pub next_page_token: String,
}

/// A user to create, already validated.
#[derive(Debug)]
pub struct NewUser {
    pub project: ProjectId,
    pub id: Option<UserId>,
    pub profile: Profile,
    pub initial_state: State,
}

impl NewUser {
    /// The user as first stored: revision 1, created and updated `now`.
    pub fn into_user(self, now: Timestamp) -> User {
        User {
            project: self.project,
            id: self.id.unwrap_or_else(UserId::generate),
            profile: self.profile,
            state: self.initial_state,
            pre_delete_state: None,
            create_time: now,
            update_time: now,
            delete_time: None,
            purge_time: None,
            revision: 1,
        }
    }
}

/// Users per StreamUsers message unless the caller asks otherwise.
pub const DEFAULT_STREAM_BATCH: u32 = 500;

/// About how many bytes of users one page or export batch holds in memory
/// at most (beyond one slice); a page of large users is cut short instead.
const READ_BUDGET: usize = 8 * 1024 * 1024;
/// The first read of a page: few enough that even the largest users stay
/// within the budget; the rest follows in one read when they are small.
const FIRST_SLICE: u64 = 32;

/// Reads up to `want` users after `after` with `read`, in slices sized so
/// that about `READ_BUDGET` bytes of users are held at most. Returns the
/// users and whether the query ran out (fewer than asked were there).
async fn read_bounded<F, Fut>(
    query: &UserQuery,
    after: Option<Cursor>,
    want: u64,
    mut read: F,
) -> Result<(Vec<User>, bool), DomainError>
where
    F: FnMut(Option<Cursor>, u64) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<User>, DomainError>>,
{
    let mut out: Vec<User> = Vec::new();
    let mut bytes = 0usize;
    let mut cursor = after;
    let mut slice = want.min(FIRST_SLICE);
    loop {
        let got = read(cursor.take(), slice).await?;
        let n = got.len() as u64;
        bytes += got.iter().map(|u| u.profile.approx_bytes()).sum::<usize>();
        out.extend(got);
        let remaining = want.saturating_sub(out.len() as u64);
        if n < slice {
            return Ok((out, true));
        }
        if remaining == 0 || bytes >= READ_BUDGET {
            return Ok((out, false));
        }
        let Some(last) = out.last() else {
            return Ok((out, true));
        };
        cursor = Some(query.order.cursor_of(last, query.search.as_deref()));
        let per_user = bytes / out.len() + 1;
        let room = ((READ_BUDGET - bytes) / per_user).max(1) as u64;
        slice = remaining.min(room);
    }
}

/// The outcome of one attempt of a conditional write.
enum Change {
    Keep,
    Save(Box<User>),
    Erase,
}

pub struct Users<R> {
    repo: R,
    retention: Duration,
}

impl<R: UserRepository> Users<R> {
    pub fn new(repo: R, retention: Duration) -> Self {
        Self { repo, retention }
    }

    pub fn repository(&self) -> &R {
        &self.repo
    }

    #[instrument(skip_all, fields(project = %new.project))]
    pub async fn create(
        &self,
        new: NewUser,
        key: Option<IdempotencyKey>,
        validate_only: bool,
    ) -> Result<User, DomainError> {
        let user = new.into_user(Timestamp::now());
        if validate_only {
            self.repo.check_available(&user).await?;
            return Ok(user);
        }
        if let Some(key) = &key
            && let Some((fingerprint, earlier)) = self
                .repo
                .find_request(&user.project, &key.request_id)
                .await?
        {
            return replay(key, &fingerprint, earlier);
        }
        match self.repo.insert(&user, key.as_ref()).await? {
            Created::New(user) => Ok(user),
            Created::Earlier { fingerprint, user } => match &key {
                Some(key) => replay(key, &fingerprint, user),
                None => Err(DomainError::Internal("replay without a key".into())),
            },
        }
    }

    /// A user by name, soft-deleted ones included; purged ones are gone.
    #[instrument(skip_all, fields(project = %name.project))]
    pub async fn get(&self, name: &UserName) -> Result<User, DomainError> {
        let user = self.repo.get(&name.project, &name.user).await?;
        let now = Timestamp::now();
        user.filter(|u| !u.is_purged_at(now))
            .ok_or_else(|| DomainError::NotFound(name.to_string()))
    }

    #[instrument(skip_all, fields(project = %project))]
    pub async fn lookup(
        &self,
        project: &ProjectId,
        identity: &Identity,
    ) -> Result<User, DomainError> {
        self.repo
            .lookup(project, identity)
            .await?
            .ok_or_else(|| DomainError::NotFound(format!("projects/{project}/users/-")))
    }

    /// Writes the fields named by `paths` from `patch`.
    #[instrument(skip_all, fields(project = %name.project))]
    pub async fn update(
        &self,
        name: &UserName,
        etag: Option<&str>,
        patch: &Profile,
        paths: &[FieldPath],
    ) -> Result<User, DomainError> {
        self.mutate(name, etag, |current| {
            if current.state == State::Deleted {
                return Err(DomainError::UserDeleted(name.clone()));
            }
            let mut next = current.clone();
            next.profile.apply(patch, paths);
            check_merged(&next.profile)?;
            if next.profile == current.profile {
                return Ok(Change::Keep);
            }
            Ok(Change::Save(Box::new(next)))
        })
        .await
    }

    /// Soft-deletes (or with `force` erases) a user. `Ok(None)`: nothing to
    /// delete and `allow_missing` was set.
    #[instrument(skip_all, fields(project = %name.project))]
    pub async fn delete(
        &self,
        name: &UserName,
        etag: Option<&str>,
        allow_missing: bool,
        force: bool,
    ) -> Result<Option<User>, DomainError> {
        let retention = self.retention;
        let result = self
            .mutate(name, etag, |current| {
                if force {
                    return Ok(Change::Erase);
                }
                if current.state == State::Deleted {
                    return if allow_missing {
                        Ok(Change::Keep)
                    } else {
                        Err(DomainError::AlreadyDeleted(name.clone()))
                    };
                }
                let now = Timestamp::now();
                let mut next = current.clone();
                next.pre_delete_state = Some(current.state);
                next.state = State::Deleted;
                next.delete_time = Some(now);
                next.purge_time = Some(now.plus(retention));
                Ok(Change::Save(Box::new(next)))
            })
            .await;
        match result {
            Ok(user) => Ok(Some(user)),
            Err(DomainError::NotFound(_)) if allow_missing => Ok(None),
            Err(e) => Err(e),
        }
    }

    #[instrument(skip_all, fields(project = %name.project))]
    pub async fn undelete(&self, name: &UserName, etag: Option<&str>) -> Result<User, DomainError> {
        self.mutate(name, etag, |current| {
            if current.state != State::Deleted {
                return Err(DomainError::NotDeleted(name.clone()));
            }
            let mut next = current.clone();
            next.state = current.pre_delete_state.unwrap_or(State::Active);
            next.pre_delete_state = None;
            next.delete_time = None;
            next.purge_time = None;
            Ok(Change::Save(Box::new(next)))
        })
        .await
    }

    /// ActivateUser and DisableUser. Asking for the state the user is already
    /// in changes nothing and succeeds.
    #[instrument(skip_all, fields(project = %name.project))]
    pub async fn set_state(
        &self,
        name: &UserName,
        etag: Option<&str>,
        target: State,
    ) -> Result<User, DomainError> {
        self.mutate(name, etag, |current| {
            if current.state == State::Deleted {
                return Err(DomainError::InvalidTransition(name.clone()));
            }
            if current.state == target {
                return Ok(Change::Keep);
            }
            let mut next = current.clone();
            next.state = target;
            Ok(Change::Save(Box::new(next)))
        })
        .await
    }

    /// Creates every user of `news` or none (BatchCreateUsers). Two items
    /// claiming the same identifier are INVALID_ARGUMENT naming both; an item
    /// conflicting with a stored user fails the whole batch, naming the item.
    #[instrument(skip_all, fields(project = %project, users = news.len()))]
    pub async fn batch_create(
        &self,
        project: &ProjectId,
        news: Vec<NewUser>,
        key: Option<IdempotencyKey>,
    ) -> Result<Vec<User>, DomainError> {
        if let Some(key) = &key
            && let Some((fingerprint, earlier)) = self
                .repo
                .find_batch_request(project, &key.request_id)
                .await?
        {
            return replay(key, &fingerprint, earlier);
        }
        let now = Timestamp::now();
        let users: Vec<User> = news.into_iter().map(|n| n.into_user(now)).collect();
        let mut claims = Claims::default();
        let mut v = Violations::default();
        for (i, u) in users.iter().enumerate() {
            if let Some((id, earlier)) = claims.claim(i as u64, u) {
                v.push(
                    batch_field(i, id),
                    format!("the same {} as requests[{earlier}]", id.field()),
                );
            }
        }
        v.into_result()?;
        match self.repo.insert_all(&users, key.as_ref()).await? {
            BatchCreated::New(users) => Ok(users),
            BatchCreated::Earlier { fingerprint, users } => match &key {
                Some(key) => replay(key, &fingerprint, users),
                None => Err(DomainError::Internal("replay without a key".into())),
            },
            BatchCreated::Conflict { index, id } => Err(DomainError::ItemAlreadyExists {
                field: batch_field(index, id),
                id,
            }),
        }
    }

    /// Stores one chunk of an import: `items` are the valid users of the
    /// chunk with their index in the import. Every stored user gets the
    /// chunk's create time (see `ImportLog`).
    #[instrument(skip_all, fields(project = %project, users = items.len()))]
    pub async fn import_chunk(
        &self,
        project: &ProjectId,
        items: Vec<(u64, NewUser)>,
        log: &mut ImportLog,
    ) -> Result<ChunkOutcome, DomainError> {
        let now = Timestamp::from_nanos(log.next_time(Timestamp::now().nanos()));
        let mut out = ChunkOutcome::default();
        let mut claims = Claims::default();
        let mut indexes = Vec::with_capacity(items.len());
        let mut users = Vec::with_capacity(items.len());
        for (index, new) in items {
            let user = new.into_user(now);
            match claims.claim(index, &user) {
                Some((id, earlier)) => out.failures.push((
                    index,
                    DomainError::DuplicateInImport {
                        field: import_field(index, id),
                        id,
                        earlier: Some(earlier),
                    },
                )),
                None => {
                    indexes.push(index);
                    users.push(user);
                }
            }
        }
        let conflicts = self.repo.import(&users).await?;
        log.record(now.nanos());
        for (index, conflict) in indexes.into_iter().zip(conflicts) {
            match conflict {
                None => out.created += 1,
                Some(c) if log.stored_here(c.holder_create_time.nanos()) => out.failures.push((
                    index,
                    DomainError::DuplicateInImport {
                        field: import_field(index, c.id),
                        id: c.id,
                        earlier: None,
                    },
                )),
                Some(c) => out.failures.push((
                    index,
                    DomainError::ItemAlreadyExists {
                        field: import_field(index, c.id),
                        id: c.id,
                    },
                )),
            }
        }
        out.failures.sort_by_key(|(i, _)| *i);
        Ok(out)
    }

    /// After a bulk load: the planner's statistics would otherwise describe
    /// the table as it was before (PostgreSQL), and lists would be planned
    /// as if it were nearly empty.
    pub async fn refresh_statistics(&self) {
        if let Err(e) = self.repo.refresh_statistics().await {
            tracing::warn!(error = %e, "statistics not refreshed");
        }
    }

    /// The next batch of an export after `after`, the cursor right after its
    /// last user, and whether the export is complete with it. A batch may
    /// hold fewer than `size` users when they are large.
    #[instrument(skip_all, fields(project = %query.project))]
    pub async fn export_batch(
        &self,
        query: &UserQuery,
        size: u32,
        after: Option<&Cursor>,
    ) -> Result<(Vec<User>, Option<Cursor>, bool), DomainError> {
        let (users, exhausted) =
            read_bounded(query, after.cloned(), u64::from(size), |c, n| async move {
                self.repo.export(query, c.as_ref(), n).await
            })
            .await?;
        let cursor = users
            .last()
            .map(|u| query.order.cursor_of(u, query.search.as_deref()));
        Ok((users, cursor, exhausted))
    }

    /// The cursor a page or resume token carries; `field` names the token in
    /// errors.
    pub fn decode_token(
        &self,
        query: &UserQuery,
        token: &str,
        field: &'static str,
    ) -> Result<Option<Cursor>, DomainError> {
        if token.is_empty() {
            return Ok(None);
        }
        decode_page_token(query, token).map(Some).map_err(|e| {
            page_token_error(
                e,
                field,
                "parent, filter, order_by, show_deleted and query must stay the same",
            )
        })
    }

    /// One page of `query`: `page_token` is empty for the first page.
    #[instrument(skip_all, fields(project = %query.project))]
    pub async fn list(
        &self,
        query: &UserQuery,
        page_size: u32,
        page_token: &str,
    ) -> Result<Page, DomainError> {
        let after = self.decode_token(query, page_token, "page_token")?;
        // 0 means the default; more than the maximum is clamped (AIP-158).
        let size = clamp_page_size(page_size);
        let (mut users, exhausted) =
            read_bounded(query, after, u64::from(size) + 1, |c, n| async move {
                self.repo.list(query, c.as_ref(), n).await
            })
            .await?;
        // More than a page: there is a next one. Fewer, but cut to bound
        // memory (large users): the next page starts after the last one.
        let next_page_token = if users.len() > size as usize || !exhausted {
            users.truncate(size as usize);
            users
                .last()
                .map(|u| next_page_token(query, u))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Page {
            users,
            next_page_token,
        })
    }

    #[instrument(skip_all, fields(project = %query.project))]
    pub async fn count(&self, query: &UserQuery) -> Result<u64, DomainError> {
        self.repo.count(query).await
    }

    /// The users named, in order; NOT_FOUND names the first missing one.
    #[instrument(skip_all, fields(project = %project))]
    pub async fn batch_get(
        &self,
        project: &ProjectId,
        ids: &[UserId],
    ) -> Result<Vec<User>, DomainError> {
        let found = self.repo.get_many(project, ids).await?;
        let now = Timestamp::now();
        // As GetUser: a user past its purge time is gone, purged or not yet.
        let by_id: std::collections::HashMap<&str, &User> = found
            .iter()
            .filter(|u| !u.is_purged_at(now))
            .map(|u| (u.id.as_str(), u))
            .collect();
        ids.iter()
            .map(|id| {
                by_id.get(id.as_str()).map(|u| (*u).clone()).ok_or_else(|| {
                    DomainError::NotFound(
                        UserName {
                            project: project.clone(),
                            user: id.clone(),
                        }
                        .to_string(),
                    )
                })
            })
            .collect()
    }

    /// Erases soft-deleted users whose purge time has passed.
    pub async fn purge_expired(&self) -> Result<u64, DomainError> {
        self.repo.purge_expired(Timestamp::now(), 1000).await
    }

    /// Reads, decides with `decide`, and writes conditionally on the revision
    /// read; a lost race is retried unless the caller pinned an etag.
    async fn mutate<F>(
        &self,
        name: &UserName,
        etag: Option<&str>,
        mut decide: F,
    ) -> Result<User, DomainError>
    where
        F: FnMut(&User) -> Result<Change, DomainError> + Send,
    {
        for _ in 0..MAX_ATTEMPTS {
            let current = self.get(name).await?;
            if etag.is_some_and(|e| e != current.etag()) {
                return Err(DomainError::EtagMismatch);
            }
            let won = match decide(&current)? {
                Change::Keep => return Ok(current),
                Change::Save(mut next) => {
                    next.touch(Timestamp::now());
                    if self.repo.save(&next, &current).await? {
                        return Ok(*next);
                    }
                    false
                }
                Change::Erase => {
                    if self.repo.erase(&current).await? {
                        return Ok(current);
                    }
                    false
                }
            };
            debug_assert!(!won);
            if etag.is_some() {
                return Err(DomainError::EtagMismatch);
            }
        }
        Err(DomainError::ConcurrentModification)
    }
}

/// The path of an identifier of `requests[index]` in BatchCreateUsers.
fn batch_field(index: usize, id: Identifier) -> String {
    match id {
        Identifier::Name => format!("requests[{index}].user_id"),
        _ => format!("requests[{index}].user.{}", id.field()),
    }
}

/// The path of an identifier of `users[index]` in ImportUsers.
fn import_field(index: u64, id: Identifier) -> String {
    format!("users[{index}].{}", id.field())
}

pub(super) fn replay<T>(
    key: &IdempotencyKey,
    fingerprint: &str,
    result: T,
) -> Result<T, DomainError> {
    if fingerprint == key.fingerprint {
        Ok(result)
    } else {
        Err(DomainError::RequestIdReused)
    }
}

/// Rules that hold for the user as a whole after an update has been merged.
fn check_merged(p: &Profile) -> Result<(), DomainError> {
    let mut v = Vec::new();
    if !p.has_contact() {
        for field in ["user.email", "user.phone_number"] {
            v.push(FieldViolation {
                field: field.into(),
                description: "a user needs an email or a phone number; this update would \
                              leave it with neither"
                    .into(),
            });
        }
    }
    if p.metadata.len() > MAX_METADATA {
        v.push(FieldViolation {
            field: "user.metadata".into(),
            description: format!(
                "a user has at most {MAX_METADATA} metadata keys; this update would leave {}",
                p.metadata.len()
            ),
        });
    }
    if v.is_empty() {
        Ok(())
    } else {
        Err(DomainError::InvalidArgument {
            violations: v,
            omitted: 0,
        })
    }
}
