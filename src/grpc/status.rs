//! DomainError to gRPC status, with google.rpc details. The match has no
//! catch-all arm: a new error variant must decide its code here.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::domain::{DomainError, Identifier, QueryProblem};

pub const DOMAIN: &str = "user-service";
const USER_TYPE: &str = "users.v1.User";

fn info(reason: &str, metadata: &[(&str, String)]) -> ErrorDetails {
    let md: HashMap<String, String> = metadata
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    ErrorDetails::with_error_info(reason, DOMAIN, md)
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
            DomainError::InvalidArgument(violations) => {
                let mut d = info("INVALID_ARGUMENT", &[]);
                for v in &violations {
                    d.add_bad_request_violation(v.field.clone(), v.description.clone());
                }
                let message = match violations.as_slice() {
                    [] => "invalid request".to_owned(),
                    [one] => format!("{}: {}", one.field, one.description),
                    [first, rest @ ..] => format!(
                        "{}: {} (and {} more violations)",
                        first.field,
                        first.description,
                        rest.len()
                    ),
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
                "the user kept changing concurrently; retry",
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
