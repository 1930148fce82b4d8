//! Everything a domain operation can refuse. The gRPC layer maps each variant
//! to a status code with an exhaustive match.

use super::caller::Denied;
use super::values::UserName;

/// One refused field: its path in the request and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

/// Most violations one error lists; the rest are only counted, so a request
/// with a million bad items costs a bounded answer.
pub const MAX_VIOLATIONS: usize = 100;

/// Collects every violation of a request so they are reported together (the
/// first `MAX_VIOLATIONS` of them, and how many more there were).
#[derive(Debug, Default)]
pub struct Violations {
    list: Vec<FieldViolation>,
    omitted: usize,
}

impl Violations {
    pub fn push(&mut self, field: impl Into<String>, description: impl Into<String>) {
        if self.list.len() >= MAX_VIOLATIONS {
            self.omitted += 1;
            return;
        }
        self.list.push(FieldViolation {
            field: field.into(),
            description: description.into(),
        });
    }

    /// Runs a parse; on refusal records the reason under `field`.
    pub fn check<T>(&mut self, field: impl FnOnce() -> String, r: Result<T, String>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(reason) => {
                self.push(field(), reason);
                None
            }
        }
    }

    /// How many violations were found (listed or not).
    pub fn len(&self) -> usize {
        self.list.len() + self.omitted
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The description of the first violation of `field`, if any.
    pub fn description_of(&self, field: &str) -> Option<String> {
        self.list
            .iter()
            .find(|v| v.field == field)
            .map(|v| v.description.clone())
    }

    pub fn into_result(self) -> Result<(), DomainError> {
        if self.list.is_empty() {
            Ok(())
        } else {
            Err(DomainError::InvalidArgument {
                violations: self.list,
                omitted: self.omitted,
            })
        }
    }
}

/// An identifier that must be unique among the live users of a project.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Identifier {
    Email,
    PhoneNumber,
    Username,
    ExternalId,
    /// The resource name itself (a chosen `user_id` that is taken).
    Name,
}

impl Identifier {
    pub fn field(self) -> &'static str {
        match self {
            Identifier::Email => "email",
            Identifier::PhoneNumber => "phone_number",
            Identifier::Username => "username",
            Identifier::ExternalId => "external_id",
            Identifier::Name => "name",
        }
    }
}

/// What is wrong with a query's parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueryProblem {
    Filter,
    OrderBy,
    PageToken,
}

#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    /// Bad fields: at most `MAX_VIOLATIONS` listed, `omitted` more counted.
    #[error("invalid argument")]
    InvalidArgument {
        violations: Vec<FieldViolation>,
        omitted: usize,
    },
    /// A filter, order, page token or search query that cannot be used.
    #[error("{field}: {description}")]
    BadQuery {
        reason: QueryProblem,
        field: &'static str,
        description: String,
    },
    #[error("user {0} not found")]
    NotFound(String),
    #[error("user {0} is already deleted")]
    AlreadyDeleted(UserName),
    #[error("{} is already used by another user", .0.field())]
    AlreadyExists(Identifier),
    /// One item of a batch or import holds an identifier a stored user has;
    /// `field` is its path in the request (`requests[3].user.email`).
    #[error("{field} is already used by another user")]
    ItemAlreadyExists { field: String, id: Identifier },
    /// An imported user repeats an identifier of an earlier user of the same
    /// import; `earlier` is that user's index when known.
    #[error("{field} repeats an earlier user of this import")]
    DuplicateInImport {
        field: String,
        id: Identifier,
        earlier: Option<u64>,
    },
    #[error("user {0} is not deleted")]
    NotDeleted(UserName),
    #[error("etag mismatch")]
    EtagMismatch,
    /// The write met a concurrent one (also a database deadlock or
    /// serialization failure) and was rolled back.
    #[error("a concurrent change conflicted with this one; retry")]
    ConcurrentModification,
    #[error("user {0} is deleted")]
    UserDeleted(UserName),
    #[error("user {0} is deleted; its state cannot change")]
    InvalidTransition(UserName),
    #[error("request_id was already used with a different request")]
    RequestIdReused,
    /// A verified caller asked for a project or a scope its token does not
    /// grant.
    #[error("permission denied: {0:?}")]
    PermissionDenied(Denied),
    /// The request is larger than the service takes or answers in one call.
    #[error("{field}: {description}")]
    TooLarge { field: String, description: String },
    #[error("group {0} not found")]
    GroupNotFound(String),
    #[error("a group with this name already exists")]
    GroupAlreadyExists,
    /// A member named in a membership change does not exist; `field` is its
    /// path in the request (`members[3]`).
    #[error("{field}: {name} not found")]
    MemberNotFound { field: String, name: String },
    /// Adding the group `name` would make a group contain itself.
    #[error("{field}: {name} contains the group, directly or through nested groups")]
    GroupCycle { field: String, name: String },
    /// Adding the group `name` would nest groups `depth` levels deep.
    #[error("{field}: nesting {name} here makes groups {depth} levels deep")]
    GroupTooDeep {
        field: String,
        name: String,
        depth: u32,
    },
    /// The events after `after` are no longer kept: retention compacted
    /// them. `oldest` is the oldest revision still available.
    #[error("events after revision {after} are compacted; the oldest kept is {oldest}")]
    EventsCompacted { after: i64, oldest: i64, head: i64 },
    /// `after` is beyond the project's last revision `head`.
    #[error("revision {after} is beyond the head revision {head}")]
    RevisionAhead { after: i64, head: i64 },
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl DomainError {
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        DomainError::InvalidArgument {
            violations: vec![FieldViolation {
                field: field.into(),
                description: description.into(),
            }],
            omitted: 0,
        }
    }
}
