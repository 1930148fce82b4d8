//! The UserService implementation: decode, call the domain, encode. No SQL and
//! no business rules here.

pub mod audit;
mod bulk;
pub use bulk::IMPORT_CHUNK;
pub mod codec;
pub mod convert;
pub mod events;
pub mod groups;
pub mod overload;
pub mod status;
pub mod trace;
pub mod wire_budget;

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::auth::layer::caller_of;
use crate::domain::events::EventRepository;
use crate::domain::filter::{self as domain_filter, Filter};
use crate::domain::query;
use crate::domain::{
    DomainError, Email, ExternalId, Field, IdempotencyKey, Identity, OrderBy, PhoneNumber,
    ProjectId, QueryProblem, Scope, State, UserName, UserQuery, UserRepository, Username, Users,
    Violations,
};
use crate::proto::users::v1 as pb;
use audit::Audit;
use bulk::check_request_id;
use convert::{fingerprint, parse_mask, parse_profile, populated_fields, user_to_proto};
use pb::user_service_server::UserService;
use trace::record_project;

pub use pb::user_service_server::UserServiceServer;

pub struct UserServiceImpl<R> {
    users: Arc<Users<R>>,
    /// Becomes true when the server stops: open streams end with
    /// UNAVAILABLE and the token to resume them.
    draining: tokio::sync::watch::Receiver<bool>,
}

impl<R> UserServiceImpl<R> {
    pub fn new(users: Arc<Users<R>>, draining: tokio::sync::watch::Receiver<bool>) -> Self {
        Self { users, draining }
    }
}

type Reply = Result<Response<pb::User>, Status>;

fn reply(user: &crate::domain::User) -> Reply {
    Ok(Response::new(user_to_proto(user)))
}

/// Largest response message the server sends: what a default gRPC client
/// accepts. Pages and stream messages are cut to fit within `PAGE_BYTES`.
pub const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;
/// Bytes of users one page or stream message carries at most (the rest of
/// the response is a token).
pub const PAGE_BYTES: usize = MAX_RESPONSE_BYTES - 64 * 1024;

/// Users as protos, cut so that their encoding stays within `PAGE_BYTES`
/// (always at least one): the first `len()` of `users`.
pub(crate) fn fit_page(users: &[crate::domain::User]) -> Vec<pb::User> {
    use prost::Message;
    let mut out = Vec::with_capacity(users.len());
    let mut bytes = 0;
    for u in users {
        let p = user_to_proto(u);
        // The user's field tag and length prefix.
        let n = p.encoded_len() + 8;
        if !out.is_empty() && bytes + n > PAGE_BYTES {
            break;
        }
        bytes += n;
        out.push(p);
    }
    out
}

/// What a request handler that panicked answers (the connection and the
/// other calls on it live on).
pub fn panic_response(_: Box<dyn std::any::Any + Send>) -> http::Response<tonic::body::Body> {
    tracing::error!("a request handler panicked; answered INTERNAL");
    Status::from(DomainError::Internal("panic".into())).into_http()
}

/// The caller of a call that needs `scope`, checked before anything else.
fn authorize<T>(
    request: &Request<T>,
    scope: Scope,
) -> Result<std::sync::Arc<crate::domain::Caller>, Status> {
    let caller = caller_of(request)?;
    caller.require_scope(scope)?;
    Ok(caller)
}

/// The audit record of a write call (every outcome is recorded, refusals
/// included).
fn write_call<T>(request: &Request<T>, rpc: &'static str) -> Result<Audit, Status> {
    Ok(Audit::new(caller_of(request)?, rpc))
}

fn parse_name(name: &str, field: &str) -> Result<UserName, Status> {
    let parsed = UserName::parse(name).map_err(|r| DomainError::invalid(field, r))?;
    record_project(parsed.project.as_str());
    Ok(parsed)
}

/// The project of a create's `parent`: recorded for the trace and the
/// audit trail, and refused unless the caller may write it.
fn write_parent(
    audit: &Audit,
    parent: &str,
    v: &mut Violations,
) -> Result<Option<ProjectId>, Status> {
    let project = v.check(|| "parent".into(), ProjectId::parse_parent(parent));
    if let Some(p) = &project {
        record_project(p.as_str());
        audit.about(p.as_str(), parent.to_owned());
        audit.caller().require_project(p)?;
    }
    Ok(project)
}

/// Checks an idempotency key (empty: none) and, when valid, records it in
/// the audit trail.
fn check_key(audit: &Audit, request_id: &str, v: &mut Violations) {
    if !request_id.is_empty()
        && v.check(|| "request_id".into(), check_request_id(request_id))
            .is_some()
    {
        audit.request_id(request_id);
    }
}

fn etag(e: &str) -> Option<&str> {
    if e.is_empty() { None } else { Some(e) }
}

#[tonic::async_trait]
impl<R: UserRepository + EventRepository> UserService for UserServiceImpl<R> {
    async fn create_user(&self, request: Request<pb::CreateUserRequest>) -> Reply {
        let audit = write_call(&request, "CreateUser")?;
        let req = request.into_inner();
        let outcome = async {
            audit.caller().require_scope(Scope::Write)?;
            let mut v = Violations::default();
            let project = write_parent(&audit, &req.parent, &mut v)?;
            check_key(&audit, &req.request_id, &mut v);
            let new = bulk::parse_create(&req, "", project, &mut v);
            v.into_result()?;
            let Some(new) = new else {
                return Err(DomainError::Internal("validated request incomplete".into()).into());
            };
            let key = (!req.request_id.is_empty()).then(|| IdempotencyKey {
                request_id: req.request_id.clone(),
                fingerprint: fingerprint(&req),
            });
            let user = self.users.create(new, key, req.validate_only).await?;
            let mut out = user_to_proto(&user);
            audit.about(user.project.as_str(), out.name.clone());
            if req.validate_only {
                // Nothing was stored: there is no version to quote back.
                out.etag.clear();
            }
            Ok(Response::new(out))
        }
        .await;
        audit.finish(outcome)
    }

    async fn get_user(&self, request: Request<pb::GetUserRequest>) -> Reply {
        let caller = authorize(&request, Scope::Read)?;
        let name = parse_name(&request.get_ref().name, "name")?;
        caller.require_project(&name.project)?;
        reply(&self.users.get(&name).await?)
    }

    async fn lookup_user(&self, request: Request<pb::LookupUserRequest>) -> Reply {
        use pb::lookup_user_request::Identifier as Id;
        let caller = authorize(&request, Scope::Read)?;
        let req = request.into_inner();
        let mut v = Violations::default();
        let project = v.check(|| "parent".into(), ProjectId::parse_parent(&req.parent));
        if let Some(p) = &project {
            record_project(p.as_str());
            caller.require_project(p)?;
        }
        let identity = match &req.identifier {
            Some(Id::Email(s)) => v.check(|| "email".into(), Email::parse(s).map(Identity::Email)),
            Some(Id::PhoneNumber(s)) => v.check(
                || "phone_number".into(),
                PhoneNumber::parse(s).map(Identity::PhoneNumber),
            ),
            Some(Id::Username(s)) => v.check(
                || "username".into(),
                Username::parse(s).map(Identity::Username),
            ),
            Some(Id::ExternalId(s)) => v.check(
                || "external_id".into(),
                ExternalId::parse(s)
                    .and_then(|x| {
                        if s.is_empty() {
                            Err("must not be empty".into())
                        } else {
                            Ok(x)
                        }
                    })
                    .map(Identity::ExternalId),
            ),
            None => {
                v.push(
                    "identifier",
                    "exactly one of email, phone_number, username, external_id must be set",
                );
                None
            }
        };
        v.into_result()?;
        let (Some(project), Some(identity)) = (project, identity) else {
            return Err(DomainError::Internal("validated request incomplete".into()).into());
        };
        reply(&self.users.lookup(&project, &identity).await?)
    }

    async fn update_user(&self, request: Request<pb::UpdateUserRequest>) -> Reply {
        let audit = write_call(&request, "UpdateUser")?;
        let req = request.into_inner();
        let outcome = async {
            audit.caller().require_scope(Scope::Write)?;
            let Some(user) = &req.user else {
                return Err(DomainError::invalid("user", "is required").into());
            };
            let name = self.target(&audit, &user.name, "user.name", Scope::Write)?;
            let mut v = Violations::default();
            let paths = match &req.update_mask {
                Some(mask) if !mask.paths.is_empty() => parse_mask(&mask.paths, &mut v),
                _ => populated_fields(user),
            };
            let selected: Vec<Field> = paths.iter().map(|p| p.field()).collect();
            let patch = parse_profile(user, "user", &|f| selected.contains(&f), &mut v);
            v.into_result()?;
            let updated = self
                .users
                .update(&name, etag(&user.etag), &patch, &paths)
                .await?;
            reply(&updated)
        }
        .await;
        audit.finish(outcome)
    }

    async fn delete_user(&self, request: Request<pb::DeleteUserRequest>) -> Reply {
        let audit = write_call(&request, "DeleteUser")?;
        let req = request.into_inner();
        let outcome = async {
            // Erasing for good is an admin's call.
            let scope = if req.force {
                Scope::Admin
            } else {
                Scope::Write
            };
            audit.caller().require_scope(scope)?;
            let name = self.target(&audit, &req.name, "name", scope)?;
            let deleted = self
                .users
                .delete(&name, etag(&req.etag), req.allow_missing, req.force)
                .await?;
            match deleted {
                Some(user) => reply(&user),
                None => Ok(Response::new(pb::User {
                    name: name.to_string(),
                    ..Default::default()
                })),
            }
        }
        .await;
        audit.finish(outcome)
    }

    async fn undelete_user(&self, request: Request<pb::UndeleteUserRequest>) -> Reply {
        let audit = write_call(&request, "UndeleteUser")?;
        let req = request.into_inner();
        let outcome = async {
            audit.caller().require_scope(Scope::Write)?;
            let name = self.target(&audit, &req.name, "name", Scope::Write)?;
            reply(&self.users.undelete(&name, etag(&req.etag)).await?)
        }
        .await;
        audit.finish(outcome)
    }

    async fn activate_user(&self, request: Request<pb::ActivateUserRequest>) -> Reply {
        let audit = write_call(&request, "ActivateUser")?;
        let req = request.into_inner();
        let outcome = self
            .change_state(&audit, &req.name, &req.etag, State::Active)
            .await;
        audit.finish(outcome)
    }

    async fn disable_user(&self, request: Request<pb::DisableUserRequest>) -> Reply {
        let audit = write_call(&request, "DisableUser")?;
        let req = request.into_inner();
        let outcome = self
            .change_state(&audit, &req.name, &req.etag, State::Disabled)
            .await;
        audit.finish(outcome)
    }

    async fn list_users(
        &self,
        request: Request<pb::ListUsersRequest>,
    ) -> Result<Response<pb::ListUsersResponse>, Status> {
        let caller = authorize(&request, Scope::Read)?;
        let req = request.into_inner();
        let mut q = QueryRequest::new(&req.parent, &req.filter, &req.order_by, req.show_deleted);
        q.authorize(&caller)?;
        let size = q.page_size(req.page_size);
        let query = q.finish(None)?;
        let page = self.users.list(&query, size, &req.page_token).await?;
        let (users, next_page_token) = self.fit(&query, page);
        Ok(Response::new(pb::ListUsersResponse {
            users,
            next_page_token,
        }))
    }

    async fn search_users(
        &self,
        request: Request<pb::SearchUsersRequest>,
    ) -> Result<Response<pb::SearchUsersResponse>, Status> {
        let caller = authorize(&request, Scope::Read)?;
        let req = request.into_inner();
        let mut q = QueryRequest::new(&req.parent, &req.filter, &req.order_by, req.show_deleted);
        q.authorize(&caller)?;
        let size = q.page_size(req.page_size);
        if req.order_by.trim().is_empty() {
            q.order = OrderBy::search_default();
        }
        let search =
            q.v.check(|| "query".into(), query::parse_search(&req.query));
        let query = q.finish(search)?;
        let page = self.users.list(&query, size, &req.page_token).await?;
        let (users, next_page_token) = self.fit(&query, page);
        Ok(Response::new(pb::SearchUsersResponse {
            users,
            next_page_token,
        }))
    }

    async fn count_users(
        &self,
        request: Request<pb::CountUsersRequest>,
    ) -> Result<Response<pb::CountUsersResponse>, Status> {
        let caller = authorize(&request, Scope::Read)?;
        let req = request.into_inner();
        let q = QueryRequest::new(&req.parent, &req.filter, "", req.show_deleted);
        q.authorize(&caller)?;
        let query = q.finish(None)?;
        let total = self.users.count(&query).await?;
        Ok(Response::new(pb::CountUsersResponse {
            total_size: i64::try_from(total).unwrap_or(i64::MAX),
        }))
    }

    async fn batch_get_users(
        &self,
        request: Request<pb::BatchGetUsersRequest>,
    ) -> Result<Response<pb::BatchGetUsersResponse>, Status> {
        let caller = authorize(&request, Scope::Read)?;
        let req = request.into_inner();
        let mut v = Violations::default();
        let project = v.check(|| "parent".into(), ProjectId::parse_parent(&req.parent));
        if let Some(p) = &project {
            record_project(p.as_str());
            caller.require_project(p)?;
        }
        if req.names.len() > MAX_BATCH_GET {
            v.push(
                "names",
                format!(
                    "at most {MAX_BATCH_GET} names per call; {} given",
                    req.names.len()
                ),
            );
            return Err(std::mem::take(&mut v)
                .into_result()
                .err()
                .map_or_else(|| Status::internal("internal error"), Status::from));
        }
        let mut ids = Vec::with_capacity(req.names.len());
        for (i, name) in req.names.iter().enumerate() {
            match UserName::parse(name) {
                // One name in a project the caller may not read refuses the
                // whole call, before anything is looked up.
                Ok(n) if !caller.may_access(&n.project) => {
                    return Err(caller
                        .require_project(&n.project)
                        .err()
                        .map_or_else(|| Status::internal("internal error"), Status::from));
                }
                Ok(n) if project.as_ref().is_some_and(|p| *p != n.project) => v.push(
                    format!("names[{i}]"),
                    "must be a user of `parent` (AIP-231: one project per call)",
                ),
                Ok(n) => ids.push(n.user),
                Err(r) => v.push(format!("names[{i}]"), r),
            }
        }
        v.into_result()?;
        let Some(project) = project else {
            return Err(DomainError::Internal("validated request incomplete".into()).into());
        };
        // A name asked twice is answered twice, but read, converted and
        // measured once: the size check comes before any copy is made.
        let mut distinct = Vec::new();
        let mut slot = std::collections::HashMap::new();
        let order: Vec<usize> = ids
            .iter()
            .map(|id| {
                *slot.entry(id).or_insert_with(|| {
                    distinct.push(id.clone());
                    distinct.len() - 1
                })
            })
            .collect();
        let found = self.users.batch_get(&project, &distinct).await?;
        let protos: Vec<pb::User> = found.iter().map(user_to_proto).collect();
        drop(found);
        let sizes: Vec<usize> = protos
            .iter()
            .map(|p| prost::Message::encoded_len(p) + 8)
            .collect();
        let mut total = 0;
        let fit = order
            .iter()
            .take_while(|&&i| {
                total += sizes[i];
                total <= PAGE_BYTES
            })
            .count();
        if fit < order.len() {
            return Err(DomainError::TooLarge {
                field: "names".into(),
                description: format!(
                    "the {} users asked for exceed the {MAX_RESPONSE_BYTES}-byte response \
                     limit; the first {fit} fit: ask for fewer names per call",
                    ids.len()
                ),
            }
            .into());
        }
        let users = order.iter().map(|&i| protos[i].clone()).collect();
        Ok(Response::new(pb::BatchGetUsersResponse { users }))
    }

    type StreamUsersStream = bulk::ExportStream;

    async fn stream_users(
        &self,
        request: Request<pb::StreamUsersRequest>,
    ) -> Result<Response<Self::StreamUsersStream>, Status> {
        let caller = authorize(&request, Scope::Read)?;
        let req = request.into_inner();
        let mut q = QueryRequest::new(&req.parent, &req.filter, &req.order_by, req.show_deleted);
        q.authorize(&caller)?;
        let size =
            q.v.check(
                || "batch_size".into(),
                bulk::stream_batch_size(req.batch_size),
            )
            .unwrap_or(0);
        let query = q.finish(None)?;
        let after = self
            .users
            .decode_token(&query, &req.resume_token, "resume_token")?;
        Ok(Response::new(bulk::export(
            self.users.clone(),
            query,
            size,
            after,
            self.draining.clone(),
        )))
    }

    async fn batch_create_users(
        &self,
        request: Request<pb::BatchCreateUsersRequest>,
    ) -> Result<Response<pb::BatchCreateUsersResponse>, Status> {
        let audit = write_call(&request, "BatchCreateUsers")?;
        let outcome = bulk::batch_create(&self.users, &audit, request.into_inner())
            .await
            .map(Response::new);
        audit.finish(outcome)
    }

    type ImportUsersStream = bulk::ImportStream;

    async fn import_users(
        &self,
        request: Request<tonic::Streaming<pb::ImportUsersRequest>>,
    ) -> Result<Response<Self::ImportUsersStream>, Status> {
        let caller = caller_of(&request)?;
        if let Err(e) = caller.require_scope(Scope::Admin) {
            let status = Status::from(e);
            audit::record(&caller, "ImportUsers", "", "", "", status.code(), None);
            return Err(status);
        }
        Ok(Response::new(bulk::import(
            self.users.clone(),
            caller,
            request.into_inner(),
            self.draining.clone(),
        )))
    }
}

impl<R: UserRepository> UserServiceImpl<R> {
    /// The user a write names, once the caller may write there with `scope`.
    fn target(
        &self,
        audit: &Audit,
        name: &str,
        field: &str,
        scope: Scope,
    ) -> Result<UserName, Status> {
        let name = parse_name(name, field)?;
        audit.about(name.project.as_str(), name.to_string());
        audit.caller().require(&name.project, scope)?;
        Ok(name)
    }

    async fn change_state(&self, audit: &Audit, name: &str, tag: &str, to: State) -> Reply {
        audit.caller().require_scope(Scope::Write)?;
        let name = self.target(audit, name, "name", Scope::Write)?;
        reply(&self.users.set_state(&name, etag(tag), to).await?)
    }

    /// A page cut to the response budget; when users were left out, the
    /// token resumes right after the last one sent.
    fn fit(&self, query: &UserQuery, page: crate::domain::Page) -> (Vec<pb::User>, String) {
        let users = fit_page(&page.users);
        let taken = users.len();
        if taken == page.users.len() {
            return (users, page.next_page_token);
        }
        let token = page
            .users
            .get(taken.wrapping_sub(1))
            .map(|last| query::next_page_token(query, last))
            .unwrap_or_default();
        (users, token)
    }
}

/// Most names one BatchGetUsers call takes.
const MAX_BATCH_GET: usize = 1000;

/// The common parameters of ListUsers, SearchUsers and CountUsers, validated
/// together so that every bad field is reported at once.
struct QueryRequest<'a> {
    v: Violations,
    /// A filter or order_by problem, when it is the only one.
    query_problem: Option<(QueryProblem, &'static str, String)>,
    project: Option<ProjectId>,
    filter_text: &'a str,
    filter: Option<Filter>,
    order: OrderBy,
    show_deleted: bool,
}

impl<'a> QueryRequest<'a> {
    fn new(parent: &str, filter: &'a str, order_by: &str, show_deleted: bool) -> Self {
        let mut v = Violations::default();
        let mut problems = Vec::new();
        let project = v.check(|| "parent".into(), ProjectId::parse_parent(parent));
        if let Some(p) = &project {
            record_project(p.as_str());
        }
        let parsed = project
            .as_ref()
            .map(|p| domain_filter::parse(filter, p))
            .transpose();
        let filter_text = filter;
        let filter = match parsed {
            Ok(f) => f.flatten(),
            Err(e) => {
                let d = e.to_string();
                v.push("filter", d.clone());
                problems.push((QueryProblem::Filter, "filter", d));
                None
            }
        };
        let order = match OrderBy::parse(order_by) {
            Ok(o) => o,
            Err((pos, m)) => {
                let d = format!("position {pos}: {m}");
                v.push("order_by", d.clone());
                problems.push((QueryProblem::OrderBy, "order_by", d));
                OrderBy::default()
            }
        };
        Self {
            v,
            query_problem: (problems.len() == 1).then(|| problems.remove(0)),
            project,
            filter_text,
            filter,
            order,
            show_deleted,
        }
    }

    /// Refuses a caller that may not read the parent project (before the
    /// filter or a token is looked at any further).
    fn authorize(&self, caller: &crate::domain::Caller) -> Result<(), Status> {
        match &self.project {
            Some(p) => Ok(caller.require_project(p)?),
            None => Ok(()),
        }
    }

    fn page_size(&mut self, n: i32) -> u32 {
        self.v
            .check(|| "page_size".into(), query::page_size(n))
            .unwrap_or(0)
    }

    fn finish(self, search: Option<String>) -> Result<UserQuery, Status> {
        if !self.v.is_empty() {
            if let (Some((reason, field, description)), 1) = (self.query_problem, self.v.len()) {
                return Err(DomainError::BadQuery {
                    reason,
                    field,
                    description,
                }
                .into());
            }
            self.v.into_result()?;
        }
        let Some(project) = self.project else {
            return Err(DomainError::Internal("validated request incomplete".into()).into());
        };
        Ok(UserQuery {
            fingerprint: UserQuery::fingerprint_of(
                &project,
                self.filter_text,
                &self.order,
                self.show_deleted,
                search.as_deref(),
            ),
            project,
            filter: self.filter,
            search,
            order: self.order,
            show_deleted: self.show_deleted,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    /// The layers the server stacks in front of every service: a handler
    /// that panics answers INTERNAL with details, and the connection lives.
    #[tokio::test]
    async fn a_panicking_handler_answers_internal() {
        use tower::Layer;
        let svc = crate::app::layers(
            None,
            crate::config::Settings::for_database("sqlite::memory:").call_limits(),
        )
        .layer(tower::service_fn(|_req: http::Request<()>| async move {
            let phone = "+0";
            if !phone.is_empty() {
                panic!("the parser fell over");
            }
            Ok::<_, std::convert::Infallible>(http::Response::new(tonic::body::Body::empty()))
        }));
        let req = http::Request::builder()
            .uri("/users.v1.UserService/GetUser")
            .body(())
            .unwrap();
        let resp = svc.oneshot(req).await.unwrap();
        let status = Status::from_header_map(resp.headers()).expect("a gRPC status");
        assert_eq!(status.code(), tonic::Code::Internal);
        assert!(!status.details().is_empty(), "with an ErrorInfo");
    }
}
