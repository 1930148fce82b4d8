//! Groups: the model, its names and members, and what a group list asks for.

use std::collections::BTreeMap;
use std::fmt;

use super::filter::Filter;
use super::query::fingerprint;
use super::values::{ProjectId, Reason, Timestamp, UserId, resource_id};

/// Most members one AddGroupMembers or RemoveGroupMembers call may name.
pub const MAX_MEMBERS_PER_CALL: usize = 1000;
/// Most group-in-group memberships along any chain of nested groups.
pub const MAX_NESTING: u32 = 8;
/// Most characters of a group's description.
pub const MAX_DESCRIPTION: usize = 4096;

resource_id!(
    /// The `{group}` of a resource name.
    GroupId,
    "group id"
);

/// `projects/{project}/groups/{group}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupName {
    pub project: ProjectId,
    pub group: GroupId,
}

impl GroupName {
    pub fn parse(s: &str) -> Result<Self, Reason> {
        let shape = || "must have the form projects/{project}/groups/{group}".to_string();
        let rest = s.strip_prefix("projects/").ok_or_else(shape)?;
        let (project, group) = rest.split_once("/groups/").ok_or_else(shape)?;
        if project.contains('/') || group.contains('/') {
            return Err(shape());
        }
        Ok(Self {
            project: ProjectId::parse(project)?,
            group: GroupId::parse(group)?,
        })
    }
}

impl fmt::Display for GroupName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "projects/{}/groups/{}", self.project, self.group)
    }
}

/// What kind of resource a member is. Groups sort before users in member
/// lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MemberKind {
    Group,
    User,
}

impl MemberKind {
    /// Its place in member lists (and in page tokens).
    pub fn rank(self) -> i64 {
        match self {
            MemberKind::Group => 0,
            MemberKind::User => 1,
        }
    }

    pub fn from_rank(n: i64) -> Option<Self> {
        match n {
            0 => Some(MemberKind::Group),
            1 => Some(MemberKind::User),
            _ => None,
        }
    }
}

/// A member of a group: a user or a group of the group's project.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Member {
    pub kind: MemberKind,
    pub id: String,
}

impl Member {
    pub fn user(id: &UserId) -> Self {
        Self {
            kind: MemberKind::User,
            id: id.as_str().to_owned(),
        }
    }

    pub fn group(id: &GroupId) -> Self {
        Self {
            kind: MemberKind::Group,
            id: id.as_str().to_owned(),
        }
    }

    /// A member's resource name, which must be in `project`.
    pub fn parse(s: &str, project: &ProjectId) -> Result<Self, Reason> {
        let shape = || {
            "must be a user or group name: projects/{project}/users/{user} or \
             projects/{project}/groups/{group}"
                .to_string()
        };
        let rest = s.strip_prefix("projects/").ok_or_else(shape)?;
        let (p, rest) = rest.split_once('/').ok_or_else(shape)?;
        let (collection, id) = rest.split_once('/').ok_or_else(shape)?;
        if id.contains('/') {
            return Err(shape());
        }
        let p = ProjectId::parse(p)?;
        let member = match collection {
            "users" => Self::user(&UserId::parse(id)?),
            "groups" => Self::group(&GroupId::parse(id)?),
            _ => return Err(shape()),
        };
        if &p != project {
            return Err(format!(
                "must be a member of the group's own project `{project}`"
            ));
        }
        Ok(member)
    }

    pub fn name(&self, project: &ProjectId) -> String {
        match self.kind {
            MemberKind::User => format!("projects/{project}/users/{}", self.id),
            MemberKind::Group => format!("projects/{project}/groups/{}", self.id),
        }
    }
}

/// The fields of a group a caller writes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupFields {
    pub display_name: String,
    pub description: String,
    pub metadata: BTreeMap<String, String>,
}

/// A writable field of a group, for update masks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupField {
    DisplayName,
    Description,
    Metadata,
}

impl GroupField {
    pub const ALL: [GroupField; 3] = [
        GroupField::DisplayName,
        GroupField::Description,
        GroupField::Metadata,
    ];

    pub fn from_path(p: &str) -> Option<Self> {
        match p {
            "display_name" | "displayName" => Some(GroupField::DisplayName),
            "description" => Some(GroupField::Description),
            "metadata" => Some(GroupField::Metadata),
            _ => None,
        }
    }
}

/// Group fields the server owns; an update mask naming one is refused.
pub const GROUP_OUTPUT_ONLY_PATHS: &[&str] = &["name", "create_time", "update_time", "etag"];

/// One entry of a group update mask.
pub type GroupPath = super::user::MaskPath<GroupField>;

impl GroupFields {
    /// The paths of the fields whose values differ from `other`'s.
    pub fn changed_paths(&self, other: &GroupFields) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.display_name != other.display_name {
            out.push("display_name");
        }
        if self.description != other.description {
            out.push("description");
        }
        if self.metadata != other.metadata {
            out.push("metadata");
        }
        out
    }

    /// Copies the fields named by `paths` from `from`.
    pub fn apply(&mut self, from: &GroupFields, paths: &[GroupPath]) {
        for path in paths {
            match path {
                GroupPath::MetadataKey(key) => match from.metadata.get(key) {
                    Some(v) => {
                        self.metadata.insert(key.clone(), v.clone());
                    }
                    None => {
                        self.metadata.remove(key);
                    }
                },
                GroupPath::Whole(GroupField::DisplayName) => {
                    self.display_name = from.display_name.clone()
                }
                GroupPath::Whole(GroupField::Description) => {
                    self.description = from.description.clone()
                }
                GroupPath::Whole(GroupField::Metadata) => self.metadata = from.metadata.clone(),
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    pub project: ProjectId,
    pub id: GroupId,
    pub fields: GroupFields,
    pub create_time: Timestamp,
    pub update_time: Timestamp,
    /// Bumped by every write of the group's fields (the etag).
    pub revision: i64,
}

impl Group {
    pub fn name(&self) -> GroupName {
        GroupName {
            project: self.project.clone(),
            group: self.id.clone(),
        }
    }

    pub fn etag(&self) -> String {
        format!("W/\"{}-{:x}\"", self.revision, self.create_time.nanos())
    }

    /// About how many bytes the group takes encoded (what pages budget).
    pub fn approx_bytes(&self) -> usize {
        128 + self.project.as_str().len()
            + self.id.as_str().len()
            + self.fields.display_name.len()
            + self.fields.description.len()
            + self
                .fields
                .metadata
                .iter()
                .map(|(k, v)| k.len() + v.len() + 8)
                .sum::<usize>()
    }

    /// Marks a write: bumps the revision and moves update_time forward.
    pub fn touch(&mut self, now: Timestamp) {
        self.revision += 1;
        self.update_time = now.max(Timestamp::from_nanos(self.update_time.nanos() + 1));
    }
}

/// A group to create, already validated.
#[derive(Debug)]
pub struct NewGroup {
    pub project: ProjectId,
    pub id: Option<GroupId>,
    pub fields: GroupFields,
}

impl NewGroup {
    pub fn into_group(self, now: Timestamp) -> Group {
        Group {
            project: self.project,
            id: self.id.unwrap_or_else(GroupId::generate),
            fields: self.fields,
            create_time: now,
            update_time: now,
            revision: 1,
        }
    }
}

/// The order of a group list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupOrderField {
    CreateTime,
    DisplayName,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupOrder {
    pub field: GroupOrderField,
    pub desc: bool,
}

impl GroupOrder {
    /// `create_time desc` when empty; else one of `create_time` and
    /// `display_name`, optionally followed by `desc` or `asc`. An error
    /// carries the 1-based character position it is about (as ListUsers').
    pub fn parse(s: &str) -> Result<Self, (usize, String)> {
        if s.trim().is_empty() {
            return Ok(Self {
                field: GroupOrderField::CreateTime,
                desc: true,
            });
        }
        if let Some(comma) = s.chars().position(|c| c == ',') {
            return Err((comma + 1, "groups are ordered by one field".into()));
        }
        let start = s.chars().take_while(|c| c.is_whitespace()).count() + 1;
        let words: Vec<&str> = s.split_whitespace().collect();
        let (name, desc) = match words.as_slice() {
            [name] => (*name, false),
            [name, "desc"] => (*name, true),
            [name, "asc"] => (*name, false),
            [_, other, ..] => {
                return Err((start, format!("expected `desc` or `asc`, found `{other}`")));
            }
            [] => return Err((start, "empty sort key".into())),
        };
        let field = match name {
            "create_time" | "createTime" => GroupOrderField::CreateTime,
            "display_name" | "displayName" => GroupOrderField::DisplayName,
            _ => {
                return Err((
                    start,
                    format!("cannot order groups by `{name}`: use create_time or display_name"),
                ));
            }
        };
        Ok(Self { field, desc })
    }

    fn canonical(self) -> String {
        let f = match self.field {
            GroupOrderField::CreateTime => "create_time",
            GroupOrderField::DisplayName => "display_name",
        };
        if self.desc {
            format!("{f} desc")
        } else {
            f.to_owned()
        }
    }
}

/// What ListGroups selects: a project's groups matching a filter, in order.
#[derive(Clone, Debug)]
pub struct GroupQuery {
    pub project: ProjectId,
    pub filter: Option<Filter>,
    pub order: GroupOrder,
    /// Identifies the query for its page tokens.
    pub fingerprint: [u8; 8],
}

impl GroupQuery {
    pub fn new(
        project: ProjectId,
        filter_text: &str,
        filter: Option<Filter>,
        order: GroupOrder,
    ) -> Self {
        let fingerprint = fingerprint(&[
            "users.v1.groups",
            project.as_str(),
            filter_text,
            &order.canonical(),
        ]);
        Self {
            project,
            filter,
            order,
            fingerprint,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acme() -> ProjectId {
        ProjectId::parse("acme").unwrap()
    }

    #[test]
    fn members_are_names_of_the_same_project() {
        assert_eq!(
            Member::parse("projects/acme/users/ann", &acme()).unwrap(),
            Member {
                kind: MemberKind::User,
                id: "ann".into()
            }
        );
        assert_eq!(
            Member::parse("projects/acme/groups/ops", &acme())
                .unwrap()
                .kind,
            MemberKind::Group
        );
        for bad in [
            "projects/other/users/ann",
            "projects/acme/things/x",
            "projects/acme/users/Ann",
            "projects/acme/users/a/b",
            "users/ann",
            "",
        ] {
            assert!(Member::parse(bad, &acme()).is_err(), "{bad}");
        }
    }

    #[test]
    fn group_orders() {
        assert_eq!(
            GroupOrder::parse("").unwrap(),
            GroupOrder {
                field: GroupOrderField::CreateTime,
                desc: true
            }
        );
        assert_eq!(
            GroupOrder::parse(" display_name desc").unwrap(),
            GroupOrder {
                field: GroupOrderField::DisplayName,
                desc: true
            }
        );
        assert!(GroupOrder::parse("email").is_err());
        assert!(GroupOrder::parse("create_time up").is_err());
        assert!(GroupOrder::parse("create_time desc, display_name").is_err());
    }
}
