//! The rules of the user lifecycle, independent of transport and storage.

use std::time::Duration;

use tracing::instrument;

use super::error::{DomainError, FieldViolation, QueryProblem};
use super::query::{
    DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, TokenError, UserQuery, decode_page_token, encode_page_token,
};
use super::repository::{Created, IdempotencyKey, Identity, UserRepository};
use super::user::{FieldPath, MAX_METADATA, Profile, State, User};
use super::values::{ProjectId, Timestamp, UserId, UserName};

/// How often a write re-reads and retries after losing a race with another
/// writer, when the caller did not pin an etag.
const MAX_ATTEMPTS: usize = 32;

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
        let now = Timestamp::now();
        let user = User {
            project: new.project,
            id: new.id.unwrap_or_else(UserId::generate),
            profile: new.profile,
            state: new.initial_state,
            pre_delete_state: None,
            create_time: now,
            update_time: now,
            delete_time: None,
            purge_time: None,
            revision: 1,
        };
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
        user.filter(|u| u.purge_time.is_none_or(|p| p > now))
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

    /// One page of `query`: `page_token` is empty for the first page.
    #[instrument(skip_all, fields(project = %query.project))]
    pub async fn list(
        &self,
        query: &UserQuery,
        page_size: u32,
        page_token: &str,
    ) -> Result<Page, DomainError> {
        let after = if page_token.is_empty() {
            None
        } else {
            Some(decode_page_token(query, page_token).map_err(|e| {
                DomainError::BadQuery {
                    reason: QueryProblem::PageToken,
                    field: "page_token",
                    description: match e {
                        TokenError::Malformed => "not a page token of this service, or damaged",
                        TokenError::OtherQuery => {
                            "belongs to another query: parent, filter, order_by, \
                             show_deleted and query must stay the same while paging"
                        }
                    }
                    .into(),
                }
            })?)
        };
        // 0 means the default; more than the maximum is clamped (AIP-158).
        let size = match page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        let mut users = self
            .repo
            .list(query, after.as_ref(), u64::from(size) + 1)
            .await?;
        let next_page_token = if users.len() > size as usize {
            users.truncate(size as usize);
            users
                .last()
                .map(|u| {
                    encode_page_token(query, &query.order.cursor_of(u, query.search.as_deref()))
                })
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
        let by_id: std::collections::HashMap<&str, &User> =
            found.iter().map(|u| (u.id.as_str(), u)).collect();
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
                    if self
                        .repo
                        .erase(&name.project, &name.user, current.revision)
                        .await?
                    {
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

fn replay(key: &IdempotencyKey, fingerprint: &str, user: User) -> Result<User, DomainError> {
    if fingerprint == key.fingerprint {
        Ok(user)
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
        Err(DomainError::InvalidArgument(v))
    }
}
