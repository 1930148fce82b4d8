//! The GroupService implementation: decode, call the domain, encode.

use std::sync::Arc;

use prost::Message;
use tonic::{Request, Response, Status};

use super::audit::Audit;
use super::convert::{parse_mask_of, parse_metadata, timestamp};
use super::trace::record_project;
use super::{authorize, check_key, etag, write_call, write_parent};
use crate::domain::filter::{Subject, parse_for};
use crate::domain::group::{
    GROUP_OUTPUT_ONLY_PATHS, GroupField, GroupOrder, GroupPath, MAX_DESCRIPTION,
    MAX_MEMBERS_PER_CALL,
};
use crate::domain::query::page_size;
use crate::domain::user::MAX_SHORT_TEXT;
use crate::domain::{
    DomainError, Group, GroupFields, GroupId, GroupName, GroupQuery, GroupRepository, Groups,
    IdempotencyKey, Member, MemberKind, NewGroup, ProjectId, QueryProblem, Scope, UserName,
    Violations, check_text,
};
use crate::proto::users::v1 as pb;
use pb::group_service_server::GroupService;

pub use pb::group_service_server::GroupServiceServer;

pub struct GroupServiceImpl<R> {
    groups: Arc<Groups<R>>,
}

impl<R> GroupServiceImpl<R> {
    pub fn new(groups: Arc<Groups<R>>) -> Self {
        Self { groups }
    }
}

type Reply = Result<Response<pb::Group>, Status>;

pub(crate) fn group_to_proto(g: &Group) -> pb::Group {
    pb::Group {
        name: g.name().to_string(),
        display_name: g.fields.display_name.clone(),
        description: g.fields.description.clone(),
        metadata: g.fields.metadata.clone(),
        create_time: Some(timestamp(g.create_time)),
        update_time: Some(timestamp(g.update_time)),
        etag: g.etag(),
    }
}

pub(crate) fn member_to_proto(project: &ProjectId, m: &Member) -> pb::GroupMember {
    pb::GroupMember {
        name: m.name(project),
        kind: match m.kind {
            MemberKind::User => pb::group_member::Kind::User,
            MemberKind::Group => pb::group_member::Kind::Group,
        } as i32,
    }
}

fn parse_group_name(name: &str, field: &str) -> Result<GroupName, Status> {
    let parsed = GroupName::parse(name).map_err(|r| DomainError::invalid(field, r))?;
    record_project(parsed.project.as_str());
    Ok(parsed)
}

/// The writable fields of `g` that `selected` names, validated under
/// `prefix` (`group`).
fn parse_fields(
    g: &pb::Group,
    selected: &dyn Fn(GroupField) -> bool,
    v: &mut Violations,
) -> GroupFields {
    let mut out = GroupFields::default();
    if selected(GroupField::DisplayName)
        && v.check(
            || "group.display_name".into(),
            check_text(&g.display_name, MAX_SHORT_TEXT, false),
        )
        .is_some()
    {
        out.display_name = g.display_name.clone();
    }
    if selected(GroupField::Description)
        && v.check(
            || "group.description".into(),
            check_text(&g.description, MAX_DESCRIPTION, true),
        )
        .is_some()
    {
        out.description = g.description.clone();
    }
    if selected(GroupField::Metadata) {
        out.metadata = parse_metadata(&g.metadata, "group.metadata", v);
    }
    out
}

fn parse_group_mask(paths: &[String], v: &mut Violations) -> Vec<GroupPath> {
    parse_mask_of(
        paths,
        v,
        &GroupField::ALL,
        GroupField::from_path,
        GROUP_OUTPUT_ONLY_PATHS,
        "Group",
    )
}

/// The fields an update without a mask writes: those populated.
fn populated(g: &pb::Group) -> Vec<GroupPath> {
    let mut out = Vec::new();
    if !g.display_name.is_empty() {
        out.push(GroupPath::Whole(GroupField::DisplayName));
    }
    if !g.description.is_empty() {
        out.push(GroupPath::Whole(GroupField::Description));
    }
    if !g.metadata.is_empty() {
        out.push(GroupPath::Whole(GroupField::Metadata));
    }
    out
}

/// The members of a membership change, all in `project`, counted before
/// anything is parsed.
fn parse_members(
    members: &[String],
    project: Option<&ProjectId>,
    v: &mut Violations,
) -> Vec<Member> {
    if members.is_empty() || members.len() > MAX_MEMBERS_PER_CALL {
        v.push(
            "members",
            format!(
                "must hold 1 to {MAX_MEMBERS_PER_CALL} names; {} given",
                members.len()
            ),
        );
        return Vec::new();
    }
    let Some(project) = project else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(members.len());
    for (i, m) in members.iter().enumerate() {
        if let Some(m) = v.check(|| format!("members[{i}]"), Member::parse(m, project)) {
            out.push(m);
        }
    }
    out
}

fn fingerprint(req: &pb::CreateGroupRequest) -> String {
    let mut r = req.clone();
    r.request_id.clear();
    r.validate_only = false;
    // Output-only fields are ignored, so a retry may differ in them.
    if let Some(g) = &mut r.group {
        g.name.clear();
        g.create_time = None;
        g.update_time = None;
        g.etag.clear();
    }
    super::convert::sha256_hex(&[b"group:", &r.encode_to_vec()])
}

impl<R: GroupRepository> GroupServiceImpl<R> {
    /// The group a write names, with the caller's right to change it.
    fn target(&self, audit: &Audit, name: &str, field: &str) -> Result<GroupName, Status> {
        let name = parse_group_name(name, field)?;
        audit.about(name.project.as_str(), name.to_string());
        audit.caller().require(&name.project, Scope::Write)?;
        Ok(name)
    }

    async fn change_members(
        &self,
        request: Request<(String, Vec<String>)>,
        rpc: &'static str,
        add: bool,
    ) -> Reply {
        let audit = write_call(&request, rpc)?;
        let (group, members) = request.into_inner();
        let outcome = async {
            audit.caller().require_scope(Scope::Write)?;
            let name = self.target(&audit, &group, "group")?;
            let mut v = Violations::default();
            let members = parse_members(&members, Some(&name.project), &mut v);
            v.into_result()?;
            let g = if add {
                self.groups.add_members(&name, &members).await?
            } else {
                self.groups.remove_members(&name, &members).await?
            };
            Ok(Response::new(group_to_proto(&g)))
        }
        .await;
        audit.finish(outcome)
    }
}

#[tonic::async_trait]
impl<R: GroupRepository> GroupService for GroupServiceImpl<R> {
    async fn create_group(&self, request: Request<pb::CreateGroupRequest>) -> Reply {
        let audit = write_call(&request, "CreateGroup")?;
        let req = request.into_inner();
        let outcome = async {
            audit.caller().require_scope(Scope::Write)?;
            let mut v = Violations::default();
            let project = write_parent(&audit, &req.parent, &mut v)?;
            check_key(&audit, &req.request_id, &mut v);
            let id = if req.group_id.is_empty() {
                None
            } else {
                v.check(|| "group_id".into(), GroupId::parse(&req.group_id))
            };
            let fields = match &req.group {
                Some(g) => parse_fields(g, &|_| true, &mut v),
                None => {
                    v.push("group", "is required");
                    GroupFields::default()
                }
            };
            v.into_result()?;
            let Some(project) = project else {
                return Err(DomainError::Internal("validated request incomplete".into()).into());
            };
            let key = (!req.request_id.is_empty()).then(|| IdempotencyKey {
                request_id: req.request_id.clone(),
                fingerprint: fingerprint(&req),
            });
            let new = NewGroup {
                project,
                id,
                fields,
            };
            let group = self.groups.create(new, key, req.validate_only).await?;
            let mut out = group_to_proto(&group);
            audit.about(group.project.as_str(), out.name.clone());
            if req.validate_only {
                out.etag.clear();
            }
            Ok(Response::new(out))
        }
        .await;
        audit.finish(outcome)
    }

    async fn get_group(&self, request: Request<pb::GetGroupRequest>) -> Reply {
        let caller = authorize(&request, Scope::Read)?;
        let name = parse_group_name(&request.get_ref().name, "name")?;
        caller.require_project(&name.project)?;
        Ok(Response::new(group_to_proto(
            &self.groups.get(&name).await?,
        )))
    }

    async fn update_group(&self, request: Request<pb::UpdateGroupRequest>) -> Reply {
        let audit = write_call(&request, "UpdateGroup")?;
        let req = request.into_inner();
        let outcome = async {
            audit.caller().require_scope(Scope::Write)?;
            let Some(group) = &req.group else {
                return Err(DomainError::invalid("group", "is required").into());
            };
            let name = self.target(&audit, &group.name, "group.name")?;
            let mut v = Violations::default();
            let paths = match &req.update_mask {
                Some(mask) if !mask.paths.is_empty() => parse_group_mask(&mask.paths, &mut v),
                _ => populated(group),
            };
            let selected = |f: GroupField| {
                paths.iter().any(|p| match p {
                    GroupPath::Whole(x) => *x == f,
                    GroupPath::MetadataKey(_) => f == GroupField::Metadata,
                })
            };
            let patch = parse_fields(group, &selected, &mut v);
            v.into_result()?;
            let updated = self
                .groups
                .update(&name, etag(&group.etag), &patch, &paths)
                .await?;
            Ok(Response::new(group_to_proto(&updated)))
        }
        .await;
        audit.finish(outcome)
    }

    async fn delete_group(&self, request: Request<pb::DeleteGroupRequest>) -> Reply {
        let audit = write_call(&request, "DeleteGroup")?;
        let req = request.into_inner();
        let outcome = async {
            audit.caller().require_scope(Scope::Write)?;
            let name = self.target(&audit, &req.name, "name")?;
            let deleted = self
                .groups
                .delete(&name, etag(&req.etag), req.allow_missing)
                .await?;
            Ok(Response::new(match deleted {
                Some(g) => group_to_proto(&g),
                None => pb::Group {
                    name: name.to_string(),
                    ..Default::default()
                },
            }))
        }
        .await;
        audit.finish(outcome)
    }

    async fn list_groups(
        &self,
        request: Request<pb::ListGroupsRequest>,
    ) -> Result<Response<pb::ListGroupsResponse>, Status> {
        let caller = authorize(&request, Scope::Read)?;
        let req = request.into_inner();
        let mut v = Violations::default();
        let project = v.check(|| "parent".into(), ProjectId::parse_parent(&req.parent));
        if let Some(p) = &project {
            record_project(p.as_str());
            caller.require_project(p)?;
        }
        let size = v.check(|| "page_size".into(), page_size(req.page_size));
        // Every bad field at once; a lone filter or order problem keeps its
        // own reason (INVALID_FILTER, INVALID_ORDER_BY), as in ListUsers.
        let mut problems = Vec::new();
        let filter = match project
            .as_ref()
            .map(|p| parse_for(&req.filter, p, Subject::Group))
            .transpose()
        {
            Ok(f) => f.flatten(),
            Err(e) => {
                v.push("filter", e.to_string());
                problems.push((QueryProblem::Filter, "filter", e.to_string()));
                None
            }
        };
        let order = match GroupOrder::parse(&req.order_by) {
            Ok(o) => Some(o),
            Err((pos, m)) => {
                let d = format!("position {pos}: {m}");
                v.push("order_by", d.clone());
                problems.push((QueryProblem::OrderBy, "order_by", d));
                None
            }
        };
        if let ([(reason, field, description)], 1) = (problems.as_slice(), v.len()) {
            return Err(DomainError::BadQuery {
                reason: *reason,
                field,
                description: description.clone(),
            }
            .into());
        }
        v.into_result()?;
        let (Some(project), Some(size), Some(order)) = (project, size, order) else {
            return Err(DomainError::Internal("validated request incomplete".into()).into());
        };
        let query = GroupQuery::new(project, &req.filter, filter, order);
        let page = self.groups.list(&query, size, &req.page_token).await?;
        Ok(Response::new(pb::ListGroupsResponse {
            groups: page.items.iter().map(group_to_proto).collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn add_group_members(&self, request: Request<pb::AddGroupMembersRequest>) -> Reply {
        let request = request.map(|r| (r.group, r.members));
        self.change_members(request, "AddGroupMembers", true).await
    }

    async fn remove_group_members(&self, request: Request<pb::RemoveGroupMembersRequest>) -> Reply {
        let request = request.map(|r| (r.group, r.members));
        self.change_members(request, "RemoveGroupMembers", false)
            .await
    }

    async fn list_group_members(
        &self,
        request: Request<pb::ListGroupMembersRequest>,
    ) -> Result<Response<pb::ListGroupMembersResponse>, Status> {
        let caller = authorize(&request, Scope::Read)?;
        let req = request.into_inner();
        let name = parse_group_name(&req.group, "group")?;
        caller.require_project(&name.project)?;
        let size = page_size(req.page_size).map_err(|r| DomainError::invalid("page_size", r))?;
        let page = self
            .groups
            .list_members(&name, req.transitive, size, &req.page_token)
            .await?;
        Ok(Response::new(pb::ListGroupMembersResponse {
            members: page
                .items
                .iter()
                .map(|m| member_to_proto(&name.project, m))
                .collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn list_user_groups(
        &self,
        request: Request<pb::ListUserGroupsRequest>,
    ) -> Result<Response<pb::ListUserGroupsResponse>, Status> {
        let caller = authorize(&request, Scope::Read)?;
        let req = request.into_inner();
        let user = UserName::parse(&req.user).map_err(|r| DomainError::invalid("user", r))?;
        record_project(user.project.as_str());
        caller.require_project(&user.project)?;
        let size = page_size(req.page_size).map_err(|r| DomainError::invalid("page_size", r))?;
        let page = self
            .groups
            .user_groups(&user, req.transitive, size, &req.page_token)
            .await?;
        Ok(Response::new(pb::ListUserGroupsResponse {
            groups: page.items.iter().map(group_to_proto).collect(),
            next_page_token: page.next_page_token,
        }))
    }
}
