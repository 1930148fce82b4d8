//! The rules of groups and memberships, independent of transport and storage.

use std::future::Future;

use tracing::instrument;

use super::error::DomainError;
use super::group::{
    Group, GroupFields, GroupName, GroupPath, GroupQuery, Member, MemberKind, NewGroup,
};
use super::query::{
    Cursor, SortValue, TokenError, clamp_page_size, decode_token, encode_token, fingerprint,
    page_token_error,
};
use super::repository::IdempotencyKey;
use super::service::{MAX_ATTEMPTS, replay};
use super::values::{ProjectId, Timestamp, UserName};

/// What a group create stored, or found stored under the same key.
#[derive(Debug)]
pub enum GroupCreated {
    New(Group),
    Earlier { fingerprint: String, group: Group },
}

/// What the domain needs from storage for groups. Memberships are decided
/// by the database: foreign keys refuse members that are gone, primary keys
/// make every pair unique.
pub trait GroupRepository: Send + Sync + 'static {
    /// Inserts a new group with its idempotency key, in one transaction.
    fn insert_group(
        &self,
        group: &Group,
        key: Option<&IdempotencyKey>,
    ) -> impl Future<Output = Result<GroupCreated, DomainError>> + Send;

    /// The group stored under a CreateGroup idempotency key, if any.
    fn find_group_request(
        &self,
        project: &ProjectId,
        request_id: &str,
    ) -> impl Future<Output = Result<Option<(String, Group)>, DomainError>> + Send;

    fn get_group(
        &self,
        name: &GroupName,
    ) -> impl Future<Output = Result<Option<Group>, DomainError>> + Send;

    /// Writes `group` over `previous` if the stored revision is still
    /// `previous.revision`.
    fn save_group(
        &self,
        group: &Group,
        previous: &Group,
    ) -> impl Future<Output = Result<bool, DomainError>> + Send;

    /// Deletes `group` (and its memberships) if the stored revision is
    /// still `group.revision`.
    fn delete_group(&self, group: &Group)
    -> impl Future<Output = Result<bool, DomainError>> + Send;

    /// Up to `limit` groups of `query`, in its order, after `after`.
    fn list_groups(
        &self,
        query: &GroupQuery,
        after: Option<&Cursor>,
        limit: u64,
    ) -> impl Future<Output = Result<Vec<Group>, DomainError>> + Send;

    /// Adds the members all or none: GroupNotFound, MemberNotFound (with
    /// the index in `members`), GroupCycle or GroupTooDeep otherwise.
    /// Returns the group as the same transaction saw it.
    fn add_members(
        &self,
        group: &GroupName,
        members: &[Member],
    ) -> impl Future<Output = Result<Group, MembershipError>> + Send;

    /// Removes those of `members` that are direct members; returns the
    /// group as the same transaction saw it.
    fn remove_members(
        &self,
        group: &GroupName,
        members: &[Member],
    ) -> impl Future<Output = Result<Group, MembershipError>> + Send;

    /// Up to `limit` members after `after` (groups first, then users, each
    /// by id); soft-deleted users left out. `None` if the group is missing.
    fn list_members(
        &self,
        group: &GroupName,
        transitive: bool,
        after: Option<&Member>,
        limit: u64,
    ) -> impl Future<Output = Result<Option<Vec<Member>>, DomainError>> + Send;

    /// Up to `limit` groups of a user by id after `after`. `None` if the
    /// user is missing.
    fn user_groups(
        &self,
        user: &UserName,
        transitive: bool,
        after: Option<&str>,
        limit: u64,
    ) -> impl Future<Output = Result<Option<Vec<Group>>, DomainError>> + Send;
}

/// Why a membership change stored nothing; indexes are positions in the
/// request's `members`.
#[derive(Debug)]
pub enum MembershipError {
    GroupNotFound,
    MemberNotFound(usize),
    Cycle(usize),
    TooDeep { index: usize, depth: u32 },
    Other(DomainError),
}

impl From<DomainError> for MembershipError {
    fn from(e: DomainError) -> Self {
        MembershipError::Other(e)
    }
}

/// One page of a list.
#[derive(Debug)]
pub struct ListPage<T> {
    pub items: Vec<T>,
    /// Empty on the last page.
    pub next_page_token: String,
}

pub struct Groups<R> {
    repo: R,
}

impl<R: GroupRepository> Groups<R> {
    pub fn new(repo: R) -> Self {
        Self { repo }
    }

    #[instrument(skip_all, fields(project = %new.project))]
    pub async fn create(
        &self,
        new: NewGroup,
        key: Option<IdempotencyKey>,
        validate_only: bool,
    ) -> Result<Group, DomainError> {
        let group = new.into_group(Timestamp::now());
        if validate_only {
            if self.repo.get_group(&group.name()).await?.is_some() {
                return Err(DomainError::GroupAlreadyExists);
            }
            return Ok(group);
        }
        if let Some(key) = &key
            && let Some((fingerprint, earlier)) = self
                .repo
                .find_group_request(&group.project, &key.request_id)
                .await?
        {
            return replay(key, &fingerprint, earlier);
        }
        match self.repo.insert_group(&group, key.as_ref()).await? {
            GroupCreated::New(g) => Ok(g),
            GroupCreated::Earlier { fingerprint, group } => match &key {
                Some(key) => replay(key, &fingerprint, group),
                None => Err(DomainError::Internal("replay without a key".into())),
            },
        }
    }

    #[instrument(skip_all, fields(project = %name.project))]
    pub async fn get(&self, name: &GroupName) -> Result<Group, DomainError> {
        self.repo
            .get_group(name)
            .await?
            .ok_or_else(|| DomainError::GroupNotFound(name.to_string()))
    }

    #[instrument(skip_all, fields(project = %name.project))]
    pub async fn update(
        &self,
        name: &GroupName,
        etag: Option<&str>,
        patch: &GroupFields,
        paths: &[GroupPath],
    ) -> Result<Group, DomainError> {
        for _ in 0..MAX_ATTEMPTS {
            let current = self.get(name).await?;
            if etag.is_some_and(|e| e != current.etag()) {
                return Err(DomainError::EtagMismatch);
            }
            let mut next = current.clone();
            next.fields.apply(patch, paths);
            if next.fields.metadata.len() > super::user::MAX_METADATA {
                return Err(DomainError::invalid(
                    "group.metadata",
                    format!(
                        "a group has at most {} metadata keys; this update would leave {}",
                        super::user::MAX_METADATA,
                        next.fields.metadata.len()
                    ),
                ));
            }
            if next.fields == current.fields {
                return Ok(current);
            }
            next.touch(Timestamp::now());
            if self.repo.save_group(&next, &current).await? {
                return Ok(next);
            }
            if etag.is_some() {
                return Err(DomainError::EtagMismatch);
            }
        }
        Err(DomainError::ConcurrentModification)
    }

    /// `Ok(None)`: nothing to delete and `allow_missing` was set.
    #[instrument(skip_all, fields(project = %name.project))]
    pub async fn delete(
        &self,
        name: &GroupName,
        etag: Option<&str>,
        allow_missing: bool,
    ) -> Result<Option<Group>, DomainError> {
        for _ in 0..MAX_ATTEMPTS {
            let current = match self.get(name).await {
                Ok(g) => g,
                Err(DomainError::GroupNotFound(_)) if allow_missing => return Ok(None),
                Err(e) => return Err(e),
            };
            if etag.is_some_and(|e| e != current.etag()) {
                return Err(DomainError::EtagMismatch);
            }
            if self.repo.delete_group(&current).await? {
                return Ok(Some(current));
            }
            if etag.is_some() {
                return Err(DomainError::EtagMismatch);
            }
        }
        Err(DomainError::ConcurrentModification)
    }

    #[instrument(skip_all, fields(project = %query.project))]
    pub async fn list(
        &self,
        query: &GroupQuery,
        page_size: u32,
        page_token: &str,
    ) -> Result<ListPage<Group>, DomainError> {
        use super::group::GroupOrderField;
        let is_time = query.order.field == GroupOrderField::CreateTime;
        let after = decode(&query.fingerprint, &[is_time], page_token)?;
        let cursor_of = |g: &Group| Cursor {
            values: vec![match query.order.field {
                GroupOrderField::CreateTime => SortValue::Int(g.create_time.nanos()),
                GroupOrderField::DisplayName => SortValue::Text(g.fields.display_name.clone()),
            }],
            user_id: g.id.as_str().to_owned(),
        };
        let (groups, more) = read_groups(page_size, after, &cursor_of, |c, n| async move {
            Ok(Some(self.repo.list_groups(query, c.as_ref(), n).await?))
        })
        .await?
        .ok_or_else(|| DomainError::Internal("group list without a project".into()))?;
        Ok(page(groups, more, |g| {
            encode_token(&query.fingerprint, &cursor_of(g))
        }))
    }

    /// Adds members; `field` of an error is `members[i]` of the request.
    #[instrument(skip_all, fields(project = %group.project, members = members.len()))]
    pub async fn add_members(
        &self,
        group: &GroupName,
        members: &[Member],
    ) -> Result<Group, DomainError> {
        self.repo
            .add_members(group, members)
            .await
            .map_err(|e| membership_error(group, members, e))
    }

    #[instrument(skip_all, fields(project = %group.project, members = members.len()))]
    pub async fn remove_members(
        &self,
        group: &GroupName,
        members: &[Member],
    ) -> Result<Group, DomainError> {
        self.repo
            .remove_members(group, members)
            .await
            .map_err(|e| membership_error(group, members, e))
    }

    #[instrument(skip_all, fields(project = %group.project))]
    pub async fn list_members(
        &self,
        group: &GroupName,
        transitive: bool,
        page_size: u32,
        page_token: &str,
    ) -> Result<ListPage<Member>, DomainError> {
        let fp = fingerprint(&[
            "users.v1.members",
            &group.to_string(),
            if transitive { "1" } else { "0" },
        ]);
        let after = match decode(&fp, &[true], page_token)? {
            None => None,
            Some(c) => {
                let kind = match c.values.first() {
                    Some(SortValue::Int(n)) => MemberKind::from_rank(*n),
                    _ => None,
                };
                match kind {
                    Some(kind) => Some(Member {
                        kind,
                        id: c.user_id,
                    }),
                    None => {
                        return Err(page_token_error(TokenError::Malformed, "page_token", ""));
                    }
                }
            }
        };
        let size = clamp_page_size(page_size);
        let mut members = self
            .repo
            .list_members(group, transitive, after.as_ref(), u64::from(size) + 1)
            .await?
            .ok_or_else(|| DomainError::GroupNotFound(group.to_string()))?;
        let next_page_token = if members.len() > size as usize {
            members.truncate(size as usize);
            members
                .last()
                .map(|m| {
                    encode_token(
                        &fp,
                        &Cursor {
                            values: vec![SortValue::Int(m.kind.rank())],
                            user_id: m.id.clone(),
                        },
                    )
                })
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(ListPage {
            items: members,
            next_page_token,
        })
    }

    #[instrument(skip_all, fields(project = %user.project))]
    pub async fn user_groups(
        &self,
        user: &UserName,
        transitive: bool,
        page_size: u32,
        page_token: &str,
    ) -> Result<ListPage<Group>, DomainError> {
        let fp = fingerprint(&[
            "users.v1.user_groups",
            &user.to_string(),
            if transitive { "1" } else { "0" },
        ]);
        let after = decode(&fp, &[], page_token)?;
        let cursor_of = |g: &Group| Cursor {
            values: vec![],
            user_id: g.id.as_str().to_owned(),
        };
        let (groups, more) = read_groups(page_size, after, &cursor_of, |c, n| async move {
            let after = c.map(|c| c.user_id);
            self.repo
                .user_groups(user, transitive, after.as_deref(), n)
                .await
        })
        .await?
        .ok_or_else(|| DomainError::NotFound(user.to_string()))?;
        Ok(page(groups, more, |g| encode_token(&fp, &cursor_of(g))))
    }
}

/// Bytes of groups one page carries at most: with the rest of the response
/// it stays under the 4 MiB a default gRPC client accepts.
pub const GROUP_PAGE_BYTES: usize = 3 * 1024 * 1024;
/// Groups read per statement while a page fills (a group may take ~120 KB).
const GROUP_SLICE: u64 = 100;

/// Reads up to `page_size` groups after `after` with `read`, in slices,
/// stopping early when `GROUP_PAGE_BYTES` are reached; whether more follow.
/// None when `read` says the listed resource is gone.
async fn read_groups<F, Fut>(
    page_size: u32,
    after: Option<Cursor>,
    cursor_of: &(dyn Fn(&Group) -> Cursor + Sync),
    mut read: F,
) -> Result<Option<(Vec<Group>, bool)>, DomainError>
where
    F: FnMut(Option<Cursor>, u64) -> Fut,
    Fut: Future<Output = Result<Option<Vec<Group>>, DomainError>>,
{
    let size = clamp_page_size(page_size) as usize;
    let mut out: Vec<Group> = Vec::new();
    let mut bytes = 0usize;
    let mut cursor = after;
    loop {
        let slice = (size + 1 - out.len()).min(GROUP_SLICE as usize) as u64;
        let Some(got) = read(cursor.take(), slice).await? else {
            return Ok(None);
        };
        let n = got.len() as u64;
        for g in got {
            let b = g.approx_bytes();
            if !out.is_empty() && bytes + b > GROUP_PAGE_BYTES {
                return Ok(Some((out, true)));
            }
            bytes += b;
            out.push(g);
        }
        if n < slice || out.len() > size {
            break;
        }
        cursor = out.last().map(cursor_of);
    }
    let more = out.len() > size;
    out.truncate(size);
    Ok(Some((out, more)))
}

/// A page, with the token after its last item when `more` follow.
fn page<T>(items: Vec<T>, more: bool, token: impl Fn(&T) -> String) -> ListPage<T> {
    let next_page_token = match items.last() {
        Some(last) if more => token(last),
        _ => String::new(),
    };
    ListPage {
        items,
        next_page_token,
    }
}

fn membership_error(group: &GroupName, members: &[Member], e: MembershipError) -> DomainError {
    let at = |i: usize| {
        (
            format!("members[{i}]"),
            members
                .get(i)
                .map(|m| m.name(&group.project))
                .unwrap_or_default(),
        )
    };
    match e {
        MembershipError::GroupNotFound => DomainError::GroupNotFound(group.to_string()),
        MembershipError::MemberNotFound(i) => {
            let (field, name) = at(i);
            DomainError::MemberNotFound { field, name }
        }
        MembershipError::Cycle(i) => {
            let (field, name) = at(i);
            DomainError::GroupCycle { field, name }
        }
        MembershipError::TooDeep { index, depth } => {
            let (field, name) = at(index);
            DomainError::GroupTooDeep { field, name, depth }
        }
        MembershipError::Other(e) => e,
    }
}

fn decode(fp: &[u8; 8], times: &[bool], token: &str) -> Result<Option<Cursor>, DomainError> {
    if token.is_empty() {
        return Ok(None);
    }
    decode_token(fp, times, token).map(Some).map_err(|e| {
        page_token_error(
            e,
            "page_token",
            "the other fields of the request must stay the same",
        )
    })
}
