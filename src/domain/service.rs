//! The rules of the user lifecycle, independent of transport and storage.

use std::time::Duration;

use tracing::instrument;

use super::error::{DomainError, FieldViolation};
use super::repository::{Created, IdempotencyKey, Identity, UserRepository};
use super::user::{FieldPath, MAX_METADATA, Profile, State, User};
use super::values::{ProjectId, Timestamp, UserId, UserName};

/// How often a write re-reads and retries after losing a race with another
/// writer, when the caller did not pin an etag.
const MAX_ATTEMPTS: usize = 32;

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
                    if self.repo.save(&next, current.revision).await? {
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
