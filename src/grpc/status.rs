//! DomainError to gRPC status, with google.rpc details. The match has no
//! catch-all arm: a new error variant must decide its code here.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::domain::{Denied, DomainError, Identifier, QueryProblem};

pub const DOMAIN: &str = "user-service";
const USER_TYPE: &str = "users.v1.User";
const GROUP_TYPE: &str = "users.v1.Group";

fn info(reason: &str, metadata: &[(&str, String)]) -> ErrorDetails {
    let md: HashMap<String, String> = metadata
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    ErrorDetails::with_error_info(reason, DOMAIN, md)
}

/// Longest field path or description an error carries: whatever a
/// validator quoted, the error stays small.
const MAX_DETAIL_BYTES: usize = 200;
/// Bytes of field violations one BadRequest lists at most: with the message
/// and the rest, the trailer stays well under the 8 KiB that gRPC clients
/// accept by default.
const MAX_VIOLATION_BYTES: usize = 3000;

fn bounded(s: &str) -> String {
    if s.len() <= MAX_DETAIL_BYTES {
        return s.to_owned();
    }
    let mut end = MAX_DETAIL_BYTES;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

fn status(code: Code, message: impl Into<String>, details: ErrorDetails) -> Status {
    Status::with_error_details(code, message, details)
}

pub fn conflict_reason(id: Identifier) -> &'static str {
    match id {
        Identifier::Email => "EMAIL_ALREADY_EXISTS",
        Identifier::PhoneNumber => "PHONE_NUMBER_ALREADY_EXISTS",
        Identifier::Username => "USERNAME_ALREADY_EXISTS",
        Identifier::ExternalId => "EXTERNAL_ID_ALREADY_EXISTS",
        Identifier::Name => "USER_ALREADY_EXISTS",
    }
}

impl From<DomainError> for Status {
    fn from(e: DomainError) -> Self {
        match e {
            DomainError::InvalidArgument {
                violations,
                omitted,
            } => {
                // Listed while they fit the trailer budget; the rest are
                // counted (clients refuse trailers over 8 KiB).
                let mut listed = Vec::new();
                let mut bytes = 0;
                for v in &violations {
                    let (field, description) = (bounded(&v.field), bounded(&v.description));
                    let n = field.len() + description.len() + 8;
                    if !listed.is_empty() && bytes + n > MAX_VIOLATION_BYTES {
                        break;
                    }
                    bytes += n;
                    listed.push((field, description));
                }
                let total = violations.len() + omitted;
                let mut md = Vec::new();
                if total > listed.len() {
                    md.push(("violations", total.to_string()));
                }
                let mut d = info("INVALID_ARGUMENT", &md);
                for (field, description) in &listed {
                    d.add_bad_request_violation(field.clone(), description.clone());
                }
                let more = total.saturating_sub(1);
                let message = match listed.first() {
                    None => "invalid request".to_owned(),
                    Some((field, description)) if more == 0 => format!("{field}: {description}"),
                    Some((field, description)) => {
                        format!("{field}: {description} (and {more} more violations)")
                    }
                };
                status(Code::InvalidArgument, message, d)
            }
            DomainError::BadQuery {
                reason,
                field,
                description,
            } => {
                let reason = match reason {
                    QueryProblem::Filter => "INVALID_FILTER",
                    QueryProblem::OrderBy => "INVALID_ORDER_BY",
                    QueryProblem::PageToken => "INVALID_PAGE_TOKEN",
                };
                let description = bounded(&description);
                let mut d = info(reason, &[("field", field.to_owned())]);
                d.add_bad_request_violation(field, description.clone());
                status(Code::InvalidArgument, format!("{field}: {description}"), d)
            }
            DomainError::NotFound(name) => {
                let mut d = info("USER_NOT_FOUND", &[("name", name.clone())]);
                d.set_resource_info(USER_TYPE, name.clone(), "", "no such user");
                status(Code::NotFound, format!("user {name} not found"), d)
            }
            DomainError::AlreadyDeleted(name) => {
                let name = name.to_string();
                let mut d = info("USER_ALREADY_DELETED", &[("name", name.clone())]);
                d.set_resource_info(USER_TYPE, name.clone(), "", "already soft-deleted");
                status(
                    Code::NotFound,
                    format!("user {name} is already deleted; use force to erase it"),
                    d,
                )
            }
            DomainError::AlreadyExists(id) => {
                let field = format!("user.{}", id.field());
                let d = info(conflict_reason(id), &[("field", field.clone())]);
                let message = match id {
                    Identifier::Name => "a user with this name already exists".to_owned(),
                    _ => format!(
                        "another user of this project already has this {}",
                        id.field()
                    ),
                };
                status(Code::AlreadyExists, message, d)
            }
            DomainError::ItemAlreadyExists { field, id } => {
                let d = info(conflict_reason(id), &[("field", field.clone())]);
                let message = match id {
                    Identifier::Name => format!("{field}: a user with this name already exists"),
                    _ => format!(
                        "{field}: another user of this project already has this {}",
                        id.field()
                    ),
                };
                status(Code::AlreadyExists, message, d)
            }
            DomainError::DuplicateInImport { field, id, earlier } => {
                let mut md = vec![("field", field.clone())];
                let who = match earlier {
                    Some(i) => {
                        md.push(("earlier_index", i.to_string()));
                        format!("users[{i}]")
                    }
                    None => "an earlier user of this import".to_owned(),
                };
                let d = info("DUPLICATE_IN_IMPORT", &md);
                let message = format!("{field}: the same {} as {who}", id.field());
                status(Code::AlreadyExists, message, d)
            }
            DomainError::NotDeleted(name) => {
                let name = name.to_string();
                let d = info("USER_NOT_DELETED", &[("name", name.clone())]);
                status(
                    Code::AlreadyExists,
                    format!("user {name} is not deleted"),
                    d,
                )
            }
            DomainError::EtagMismatch => status(
                Code::Aborted,
                "the user changed since the etag was read; read it again and retry",
                info("ETAG_MISMATCH", &[]),
            ),
            DomainError::ConcurrentModification => status(
                Code::Aborted,
                "a concurrent change conflicted with this one; nothing was stored; retry",
                info("CONCURRENT_MODIFICATION", &[]),
            ),
            DomainError::UserDeleted(name) => {
                let name = name.to_string();
                let mut d = info("USER_DELETED", &[("name", name.clone())]);
                d.add_precondition_failure_violation(
                    "STATE",
                    name.clone(),
                    "the user is deleted; undelete it first",
                );
                status(
                    Code::FailedPrecondition,
                    format!("user {name} is deleted and cannot be changed"),
                    d,
                )
            }
            DomainError::InvalidTransition(name) => {
                let name = name.to_string();
                let mut d = info("INVALID_STATE_TRANSITION", &[("name", name.clone())]);
                d.add_precondition_failure_violation(
                    "STATE",
                    name.clone(),
                    "a deleted user's state cannot change; undelete it first",
                );
                status(
                    Code::FailedPrecondition,
                    format!("user {name} is deleted; its state cannot change"),
                    d,
                )
            }
            DomainError::RequestIdReused => {
                let mut d = info("REQUEST_ID_REUSED", &[]);
                d.add_precondition_failure_violation(
                    "REQUEST_ID",
                    "request_id",
                    "this request_id was used before with a different request",
                );
                status(
                    Code::FailedPrecondition,
                    "request_id was already used with a different request",
                    d,
                )
            }
            DomainError::PermissionDenied(Denied::ProjectNotGranted(project)) => status(
                Code::PermissionDenied,
                format!("the token does not grant project {project}"),
                info("PROJECT_NOT_GRANTED", &[("project", project.to_string())]),
            ),
            DomainError::PermissionDenied(Denied::ScopeMissing(scope)) => status(
                Code::PermissionDenied,
                format!("the token lacks the scope {scope}"),
                info("SCOPE_MISSING", &[("scope", scope.to_string())]),
            ),
            DomainError::TooLarge { field, description } => {
                let mut d = info("TOO_LARGE", &[("field", field.clone())]);
                d.add_quota_failure_violation(field.clone(), description.clone());
                status(
                    Code::ResourceExhausted,
                    format!("{field}: {description}"),
                    d,
                )
            }
            DomainError::GroupNotFound(name) => {
                let mut d = info("GROUP_NOT_FOUND", &[("name", name.clone())]);
                d.set_resource_info(GROUP_TYPE, name.clone(), "", "no such group");
                status(Code::NotFound, format!("group {name} not found"), d)
            }
            DomainError::GroupAlreadyExists => status(
                Code::AlreadyExists,
                "a group with this name already exists",
                info("GROUP_ALREADY_EXISTS", &[("field", "group_id".into())]),
            ),
            DomainError::MemberNotFound { field, name } => {
                let name = bounded(&name);
                let mut d = info(
                    "MEMBER_NOT_FOUND",
                    &[("field", field.clone()), ("name", name.clone())],
                );
                // `projects/{project}/groups/{group}` or `.../users/{user}`.
                let kind = if name.split('/').nth(2) == Some("groups") {
                    GROUP_TYPE
                } else {
                    USER_TYPE
                };
                d.set_resource_info(kind, name.clone(), "", "no such member; nothing was added");
                status(
                    Code::NotFound,
                    format!("{field}: {name} not found; nothing was added"),
                    d,
                )
            }
            DomainError::GroupCycle { field, name } => {
                let mut d = info(
                    "GROUP_CYCLE",
                    &[("field", field.clone()), ("name", name.clone())],
                );
                d.add_precondition_failure_violation(
                    "GROUP_CYCLE",
                    field.clone(),
                    "the member contains this group, directly or through nested groups",
                );
                status(
                    Code::FailedPrecondition,
                    format!(
                        "{field}: {name} contains this group (directly or through nested groups); \
                         adding it would make a cycle; nothing was added"
                    ),
                    d,
                )
            }
            DomainError::GroupTooDeep { field, name, depth } => {
                let mut d = info(
                    "GROUP_TOO_DEEP",
                    &[
                        ("field", field.clone()),
                        ("name", name.clone()),
                        ("depth", depth.to_string()),
                    ],
                );
                d.add_precondition_failure_violation(
                    "GROUP_TOO_DEEP",
                    field.clone(),
                    format!(
                        "groups may be nested at most {} levels deep",
                        crate::domain::group::MAX_NESTING
                    ),
                );
                status(
                    Code::FailedPrecondition,
                    format!(
                        "{field}: adding {name} would nest groups {depth} levels deep (at most {}); \
                         nothing was added",
                        crate::domain::group::MAX_NESTING
                    ),
                    d,
                )
            }
            DomainError::EventsCompacted {
                after,
                oldest,
                head,
            } => {
                let mut d = info(
                    "EVENTS_COMPACTED",
                    &[
                        ("oldest_revision", oldest.to_string()),
                        ("head_revision", head.to_string()),
                    ],
                );
                d.add_bad_request_violation(
                    "after_revision",
                    format!("the events after {after} are compacted; the oldest kept is {oldest}"),
                );
                status(
                    Code::OutOfRange,
                    format!(
                        "the events after revision {after} are no longer kept (retention); the \
                         oldest available revision is {oldest}: export again, then watch"
                    ),
                    d,
                )
            }
            DomainError::RevisionAhead { after, head } => {
                let mut d = info("REVISION_AHEAD", &[("head_revision", head.to_string())]);
                d.add_bad_request_violation(
                    "after_revision",
                    format!("is beyond the project's head revision {head}"),
                );
                status(
                    Code::OutOfRange,
                    format!("revision {after} is beyond the project's head revision {head}"),
                    d,
                )
            }
            DomainError::Unavailable(_) => {
                let mut d = info("DATABASE_UNAVAILABLE", &[]);
                d.set_retry_info(Some(std::time::Duration::from_secs(1)));
                status(
                    Code::Unavailable,
                    "the database is unavailable; retry with backoff",
                    d,
                )
            }
            // The cause was logged where it happened; the client learns nothing
            // of the internals.
            DomainError::Internal(_) => {
                status(Code::Internal, "internal error", info("INTERNAL", &[]))
            }
        }
    }
}

impl From<crate::auth::AuthError> for Status {
    fn from(e: crate::auth::AuthError) -> Self {
        use crate::auth::AuthError;
        let message = e.to_string();
        match e {
            AuthError::Missing => {
                status(Code::Unauthenticated, message, info("TOKEN_MISSING", &[]))
            }
            AuthError::Expired => {
                status(Code::Unauthenticated, message, info("TOKEN_EXPIRED", &[]))
            }
            AuthError::Invalid(_) => {
                status(Code::Unauthenticated, message, info("TOKEN_INVALID", &[]))
            }
            AuthError::KeysUnavailable => {
                let mut d = info("SIGNING_KEYS_UNAVAILABLE", &[]);
                d.set_retry_info(Some(std::time::Duration::from_secs(5)));
                status(Code::Unavailable, message, d)
            }
        }
    }
}

/// A status tonic made itself while reading a request (a message over the
/// size limit, a broken frame), restated the way this service reports
/// errors: the right code and an ErrorInfo. None for any other status.
pub fn decode_error(s: &Status) -> Option<Status> {
    if !s.details().is_empty() {
        return None;
    }
    let m = s.message();
    if m.starts_with("Error, decoded message length too large")
        || m.starts_with("Error decompressing: size limit")
    {
        let mut d = info("REQUEST_TOO_LARGE", &[]);
        d.add_quota_failure_violation("request", m.to_owned());
        return Some(status(Code::ResourceExhausted, m.to_owned(), d));
    }
    // gRPC's spec asks INTERNAL for a compressed flag without an encoding;
    // here every malformed request is the client's mistake.
    if m.starts_with("protocol error: received message with")
        || m.starts_with("Unexpected EOF decoding stream")
        || m.starts_with("Error decompressing")
        || m.starts_with("Message compressed, compression not supported")
    {
        return Some(status(
            Code::InvalidArgument,
            m.to_owned(),
            info("MALFORMED_REQUEST", &[]),
        ));
    }
    None
}

/// An error a request stream ended with, as the client should see it.
pub fn from_transport(s: Status) -> Status {
    if let Some(restated) = decode_error(&s) {
        return restated;
    }
    if !s.details().is_empty() {
        return s;
    }
    let reason = match s.code() {
        Code::Cancelled => "CANCELLED",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        _ => "STREAM_FAILED",
    };
    status(s.code(), s.message().to_owned(), info(reason, &[]))
}

/// The server is stopping: an open stream ends with UNAVAILABLE, and the
/// details say where to pick up on another replica (ErrorInfo metadata
/// `resume_token` for StreamUsers, `committed_through` for ImportUsers).
pub fn shutting_down(resume: &[(&str, String)]) -> Status {
    let md: Vec<(&str, String)> = resume
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .cloned()
        .collect();
    let mut d = info("SHUTTING_DOWN", &md);
    d.set_retry_info(Some(std::time::Duration::from_millis(100)));
    status(
        Code::Unavailable,
        "the server is shutting down; resume on another replica from the details",
        d,
    )
}

/// A call refused because the server is at capacity.
pub fn overloaded() -> Status {
    let mut d = info("OVERLOADED", &[]);
    d.set_retry_info(Some(std::time::Duration::from_millis(100)));
    status(
        Code::ResourceExhausted,
        "the server is at capacity; retry with backoff, preferably on another replica",
        d,
    )
}

/// A call that ran past --request-timeout.
pub fn request_timeout(limit: std::time::Duration) -> Status {
    status(
        Code::DeadlineExceeded,
        format!("the call took longer than the server allows ({limit:?})"),
        info("REQUEST_TIMEOUT", &[("limit", format!("{limit:?}"))]),
    )
}
