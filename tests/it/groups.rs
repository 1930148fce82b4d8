//! GroupService through the generated client, on both engines: what
//! proto/users/v1/group_service.proto promises, as a client sees it.

use std::collections::{BTreeMap, BTreeSet};

use tonic::{Code, Status};
use tonic_types::StatusExt;
use user_service::proto::users::v1 as pb;

use crate::both_engines;
use crate::harness::*;

both_engines!(
    smoke,
    create_group_with_chosen_and_generated_ids,
    create_group_reports_every_bad_field,
    create_group_conflicts_and_validate_only,
    create_group_request_ids,
    get_group_errors,
    update_group_masks,
    update_group_etags_and_times,
    delete_group_semantics,
    delete_group_removes_its_memberships,
    list_groups_pages_and_orders,
    list_groups_filters,
    list_groups_errors_and_projects,
    add_members_is_idempotent_and_all_or_nothing,
    add_members_argument_errors,
    add_members_refuses_cycles,
    add_members_limits_nesting,
    add_a_thousand_members_at_once,
    remove_members,
    list_members_order_transitivity_and_paging,
    soft_deleted_users_stay_members,
    erased_users_lose_their_memberships,
    list_user_groups,
    groups_filter_in_user_queries,
    groups_filter_errors,
    groups_filter_on_a_group_of_2100,
    groups_filter_through_a_wide_hierarchy,
    large_groups_page_within_a_response,
    group_rpcs_need_their_scopes,
    group_rpcs_are_confined_to_granted_projects,
    group_rpcs_need_a_token,
    concurrent_adds_of_the_same_users,
    concurrent_opposite_nestings,
    concurrent_delete_and_add,
);

// ------------------------------------------------------------------ helpers

/// A second project: its groups and users never mix with `PROJECT`'s.
const OTHER: &str = "projects/other";

const GROUP: i32 = pb::group_member::Kind::Group as i32;
const USER: i32 = pb::group_member::Kind::User as i32;

fn gname(id: &str) -> String {
    format!("{PROJECT}/groups/{id}")
}

fn uname(id: &str) -> String {
    format!("{PROJECT}/users/{id}")
}

/// Group names of `ids`, in that order.
fn gnames(ids: &[&str]) -> Vec<String> {
    ids.iter().map(|id| gname(id)).collect()
}

/// User names of `ids`, sorted.
fn unames(ids: &[&str]) -> Vec<String> {
    sorted(ids.iter().map(|id| uname(id)).collect())
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn md(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn names_of(groups: &[pb::Group]) -> Vec<String> {
    groups.iter().map(|g| g.name.clone()).collect()
}

fn ok<T>(r: Result<tonic::Response<T>, Status>) -> Result<(), Status> {
    r.map(|_| ())
}

/// One entry of the ErrorInfo metadata of an error.
#[track_caller]
fn meta(s: &Status, key: &str) -> String {
    let d = s.get_error_details();
    let info = d
        .error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo: {s:?}"));
    info.metadata
        .get(key)
        .cloned()
        .unwrap_or_else(|| panic!("no ErrorInfo metadata `{key}`: {s:?}"))
}

/// The ResourceInfo (type, name) of an error.
#[track_caller]
fn resource(s: &Status) -> (String, String) {
    let d = s.get_error_details();
    let r = d
        .resource_info()
        .unwrap_or_else(|| panic!("no ResourceInfo: {s:?}"));
    (r.resource_type.clone(), r.resource_name.clone())
}

/// A generated id: a UUIDv7, lowercase and hyphenated.
#[track_caller]
fn assert_uuid_v7(id: &str) {
    assert_eq!(id.len(), 36, "{id:?}");
    for (i, ch) in id.char_indices() {
        if [8, 13, 18, 23].contains(&i) {
            assert_eq!(ch, '-', "{id:?}");
        } else {
            assert!(
                ch.is_ascii_digit() || ('a'..='f').contains(&ch),
                "not lowercase hex: {id:?}"
            );
        }
    }
    assert_eq!(&id[14..15], "7", "not a version 7 UUID: {id:?}");
}

/// A timestamp as an RFC 3339 string with every nanosecond, for filters.
fn rfc3339(t: &Option<prost_types::Timestamp>) -> String {
    let t = t.as_ref().expect("timestamp set");
    chrono::DateTime::<chrono::Utc>::from_timestamp(t.seconds, t.nanos as u32)
        .expect("timestamp in range")
        .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

fn group_req(id: &str, display_name: &str) -> pb::CreateGroupRequest {
    pb::CreateGroupRequest {
        parent: PROJECT.into(),
        group_id: id.into(),
        group: Some(pb::Group {
            display_name: display_name.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn group_with(id: &str, display_name: &str, metadata: &[(&str, &str)]) -> pb::CreateGroupRequest {
    pb::CreateGroupRequest {
        group: Some(pb::Group {
            display_name: display_name.into(),
            metadata: md(metadata),
            ..Default::default()
        }),
        ..group_req(id, "")
    }
}

async fn try_create(g: &mut Groups, req: pb::CreateGroupRequest) -> Result<pb::Group, Status> {
    g.create_group(req).await.map(|r| r.into_inner())
}

async fn new_group(g: &mut Groups, id: &str) -> pb::Group {
    try_create(g, group_req(id, &format!("Group {id}")))
        .await
        .unwrap_or_else(|e| panic!("create group {id}: {e:?}"))
}

async fn new_group_in(g: &mut Groups, parent: &str, id: &str) -> pb::Group {
    try_create(
        g,
        pb::CreateGroupRequest {
            parent: parent.into(),
            ..group_req(id, &format!("Group {id}"))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("create group {id} in {parent}: {e:?}"))
}

async fn get_group(g: &mut Groups, name: &str) -> Result<pb::Group, Status> {
    g.get_group(pb::GetGroupRequest { name: name.into() })
        .await
        .map(|r| r.into_inner())
}

/// UpdateGroup with `paths` as the mask (none when empty).
async fn update(g: &mut Groups, group: pb::Group, paths: &[&str]) -> Result<pb::Group, Status> {
    let update_mask = if paths.is_empty() {
        None
    } else {
        Some(prost_types::FieldMask {
            paths: paths.iter().map(|p| (*p).to_owned()).collect(),
        })
    };
    g.update_group(pb::UpdateGroupRequest {
        group: Some(group),
        update_mask,
    })
    .await
    .map(|r| r.into_inner())
}

async fn delete_group(
    g: &mut Groups,
    name: &str,
    etag: &str,
    allow_missing: bool,
) -> Result<pb::Group, Status> {
    g.delete_group(pb::DeleteGroupRequest {
        name: name.into(),
        etag: etag.into(),
        allow_missing,
    })
    .await
    .map(|r| r.into_inner())
}

async fn add(g: &mut Groups, group: &str, members: &[&str]) -> Result<pb::Group, Status> {
    g.add_group_members(pb::AddGroupMembersRequest {
        group: group.into(),
        members: members.iter().map(|m| (*m).to_owned()).collect(),
    })
    .await
    .map(|r| r.into_inner())
}

async fn remove(g: &mut Groups, group: &str, members: &[&str]) -> Result<pb::Group, Status> {
    g.remove_group_members(pb::RemoveGroupMembersRequest {
        group: group.into(),
        members: members.iter().map(|m| (*m).to_owned()).collect(),
    })
    .await
    .map(|r| r.into_inner())
}

async fn member_page(
    g: &mut Groups,
    group: &str,
    transitive: bool,
    page_size: i32,
    page_token: &str,
) -> Result<pb::ListGroupMembersResponse, Status> {
    g.list_group_members(pb::ListGroupMembersRequest {
        group: group.into(),
        transitive,
        page_size,
        page_token: page_token.into(),
    })
    .await
    .map(|r| r.into_inner())
}

/// Every page of a group's members, `page_size` at a time.
async fn member_pages(
    g: &mut Groups,
    group: &str,
    transitive: bool,
    page_size: i32,
) -> Vec<Vec<pb::GroupMember>> {
    let mut pages = Vec::new();
    let mut token = String::new();
    loop {
        let page = member_page(g, group, transitive, page_size, &token)
            .await
            .unwrap_or_else(|e| panic!("ListGroupMembers {group} transitive={transitive}: {e:?}"));
        pages.push(page.members);
        if page.next_page_token.is_empty() {
            return pages;
        }
        assert!(pages.len() < 10_000, "ListGroupMembers never ends");
        token = page.next_page_token;
    }
}

async fn members_with(
    g: &mut Groups,
    group: &str,
    transitive: bool,
    page_size: i32,
) -> Vec<String> {
    member_pages(g, group, transitive, page_size)
        .await
        .into_iter()
        .flatten()
        .map(|m| m.name)
        .collect()
}

/// The names of a group's members, read in pages of 2.
async fn members(g: &mut Groups, group: &str, transitive: bool) -> Vec<String> {
    members_with(g, group, transitive, 2).await
}

async fn user_group_page(
    g: &mut Groups,
    user: &str,
    transitive: bool,
    page_size: i32,
    page_token: &str,
) -> Result<pb::ListUserGroupsResponse, Status> {
    g.list_user_groups(pb::ListUserGroupsRequest {
        user: user.into(),
        transitive,
        page_size,
        page_token: page_token.into(),
    })
    .await
    .map(|r| r.into_inner())
}

/// Every page of a user's groups, `page_size` at a time.
async fn user_groups_with(
    g: &mut Groups,
    user: &str,
    transitive: bool,
    page_size: i32,
) -> Vec<Vec<pb::Group>> {
    let mut pages = Vec::new();
    let mut token = String::new();
    loop {
        let page = user_group_page(g, user, transitive, page_size, &token)
            .await
            .unwrap_or_else(|e| panic!("ListUserGroups {user} transitive={transitive}: {e:?}"));
        pages.push(page.groups);
        if page.next_page_token.is_empty() {
            return pages;
        }
        assert!(pages.len() < 10_000, "ListUserGroups never ends");
        token = page.next_page_token;
    }
}

/// The names of a user's groups, read in pages of 2.
async fn user_groups(g: &mut Groups, user: &str, transitive: bool) -> Vec<String> {
    user_groups_with(g, user, transitive, 2)
        .await
        .into_iter()
        .flatten()
        .map(|g| g.name)
        .collect()
}

fn list_req(filter: &str, order_by: &str, page_size: i32) -> pb::ListGroupsRequest {
    pb::ListGroupsRequest {
        parent: PROJECT.into(),
        filter: filter.into(),
        order_by: order_by.into(),
        page_size,
        page_token: String::new(),
    }
}

/// Every page of `req`, from `token` on.
async fn group_pages_from(
    g: &mut Groups,
    req: pb::ListGroupsRequest,
    token: String,
) -> Result<Vec<Vec<pb::Group>>, Status> {
    let mut pages = Vec::new();
    let mut token = token;
    loop {
        let page = g
            .list_groups(pb::ListGroupsRequest {
                page_token: token,
                ..req.clone()
            })
            .await?
            .into_inner();
        pages.push(page.groups);
        if page.next_page_token.is_empty() {
            return Ok(pages);
        }
        assert!(pages.len() < 10_000, "ListGroups never ends");
        token = page.next_page_token;
    }
}

async fn group_pages(
    g: &mut Groups,
    filter: &str,
    order_by: &str,
    page_size: i32,
) -> Result<Vec<Vec<pb::Group>>, Status> {
    group_pages_from(g, list_req(filter, order_by, page_size), String::new()).await
}

/// Every group of `PROJECT` ListGroups returns, page after page.
async fn list_groups_all(
    g: &mut Groups,
    filter: &str,
    order_by: &str,
    page_size: i32,
) -> Result<Vec<pb::Group>, Status> {
    Ok(group_pages(g, filter, order_by, page_size)
        .await?
        .into_iter()
        .flatten()
        .collect())
}

fn person(email: &str, display_name: &str, family_name: &str) -> User {
    User {
        email: email.into(),
        display_name: display_name.into(),
        family_name: family_name.into(),
        ..Default::default()
    }
}

async fn new_user_in(c: &mut Client, parent: &str, id: &str, u: User) -> User {
    c.create_user(pb::CreateUserRequest {
        parent: parent.into(),
        user_id: id.into(),
        user: Some(u),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("create user {id} in {parent}: {e:?}"))
    .into_inner()
}

async fn new_user_with(c: &mut Client, id: &str, u: User) -> User {
    new_user_in(c, PROJECT, id, u).await
}

/// A user of `PROJECT` named `id`, with the email `{id}@example.com`.
async fn new_user(c: &mut Client, id: &str) -> User {
    new_user_with(c, id, user(&format!("{id}@example.com"))).await
}

/// `n` users `{prefix}{i}@example.com` made with BatchCreateUsers, 1000 a
/// call.
async fn batch_users(c: &mut Client, prefix: &str, n: usize) -> Vec<User> {
    let mut out = Vec::with_capacity(n);
    let all: Vec<usize> = (0..n).collect();
    for part in all.chunks(1000) {
        let requests = part
            .iter()
            .map(|i| pb::CreateUserRequest {
                parent: PROJECT.into(),
                user: Some(user(&format!("{prefix}{i}@example.com"))),
                ..Default::default()
            })
            .collect();
        out.extend(
            c.batch_create_users(pb::BatchCreateUsersRequest {
                parent: PROJECT.into(),
                requests,
                ..Default::default()
            })
            .await
            .expect("batch_create_users")
            .into_inner()
            .users,
        );
    }
    assert_eq!(out.len(), n);
    out
}

async fn delete_user(c: &mut Client, name: &str, force: bool) -> Result<User, Status> {
    c.delete_user(pb::DeleteUserRequest {
        name: name.into(),
        etag: String::new(),
        allow_missing: false,
        force,
    })
    .await
    .map(|r| r.into_inner())
}

async fn undelete_user(c: &mut Client, name: &str) -> Result<User, Status> {
    c.undelete_user(pb::UndeleteUserRequest {
        name: name.into(),
        etag: String::new(),
    })
    .await
    .map(|r| r.into_inner())
}

/// The names ListUsers returns for `filter`, in its order, page after page.
async fn list_users_all(
    c: &mut Client,
    filter: &str,
    show_deleted: bool,
    page_size: i32,
) -> Result<Vec<String>, Status> {
    let mut out = Vec::new();
    let mut token = String::new();
    for _ in 0..10_000 {
        let page = c
            .list_users(pb::ListUsersRequest {
                parent: PROJECT.into(),
                filter: filter.into(),
                show_deleted,
                page_size,
                page_token: token.clone(),
                ..Default::default()
            })
            .await?
            .into_inner();
        out.extend(page.users.into_iter().map(|u| u.name));
        if page.next_page_token.is_empty() {
            return Ok(out);
        }
        token = page.next_page_token;
    }
    panic!("ListUsers never ends");
}

/// The names ListUsers returns for `filter`, sorted.
async fn users_in(c: &mut Client, filter: &str, show_deleted: bool) -> Vec<String> {
    sorted(
        list_users_all(c, filter, show_deleted, 2)
            .await
            .unwrap_or_else(|e| panic!("ListUsers {filter:?}: {e:?}")),
    )
}

async fn count_users(c: &mut Client, filter: &str, show_deleted: bool) -> i64 {
    c.count_users(pb::CountUsersRequest {
        parent: PROJECT.into(),
        filter: filter.into(),
        show_deleted,
    })
    .await
    .unwrap_or_else(|e| panic!("CountUsers {filter:?}: {e:?}"))
    .into_inner()
    .total_size
}

/// The names SearchUsers returns, sorted.
async fn search_all(c: &mut Client, query: &str, filter: &str, show_deleted: bool) -> Vec<String> {
    let mut out = Vec::new();
    let mut token = String::new();
    for _ in 0..10_000 {
        let page = c
            .search_users(pb::SearchUsersRequest {
                parent: PROJECT.into(),
                query: query.into(),
                filter: filter.into(),
                page_size: 2,
                page_token: token.clone(),
                show_deleted,
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("SearchUsers {query:?} {filter:?}: {e:?}"))
            .into_inner();
        out.extend(page.users.into_iter().map(|u| u.name));
        if page.next_page_token.is_empty() {
            return sorted(out);
        }
        token = page.next_page_token;
    }
    panic!("SearchUsers never ends");
}

/// The names StreamUsers exports for `filter`, in its order.
async fn stream_all(c: &mut Client, filter: &str) -> Result<Vec<String>, Status> {
    let mut s = c
        .stream_users(pb::StreamUsersRequest {
            parent: PROJECT.into(),
            filter: filter.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(m) = s.message().await? {
        out.extend(m.users.into_iter().map(|u| u.name));
    }
    Ok(out)
}

/// AddGroupMembers of one member, on a task of its own.
fn spawn_add(
    s: &TestServer,
    group: &str,
    member: &str,
) -> tokio::task::JoinHandle<Result<pb::Group, Status>> {
    let mut client = s.groups();
    let req = pb::AddGroupMembersRequest {
        group: group.to_owned(),
        members: vec![member.to_owned()],
    };
    tokio::spawn(async move { client.add_group_members(req).await.map(|r| r.into_inner()) })
}

/// Every GroupService RPC once, on `project`, naming the group `group_id`
/// and the user `user_id` there, with what the server answered. CreateGroup
/// asks for a generated id, so it never collides.
async fn every_group_rpc(
    g: &mut Groups,
    project: &str,
    group_id: &str,
    user_id: &str,
) -> Vec<(&'static str, Result<(), Status>)> {
    let parent = format!("projects/{project}");
    let group = format!("{parent}/groups/{group_id}");
    let member = format!("{parent}/users/{user_id}");
    let mut out = Vec::new();
    out.push((
        "CreateGroup",
        ok(g.create_group(pb::CreateGroupRequest {
            parent: parent.clone(),
            group: Some(pb::Group {
                display_name: "Created".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await),
    ));
    out.push((
        "GetGroup",
        ok(g.get_group(pb::GetGroupRequest {
            name: group.clone(),
        })
        .await),
    ));
    out.push((
        "ListGroups",
        ok(g.list_groups(pb::ListGroupsRequest {
            parent: parent.clone(),
            ..Default::default()
        })
        .await),
    ));
    out.push((
        "ListGroupMembers",
        ok(g.list_group_members(pb::ListGroupMembersRequest {
            group: group.clone(),
            transitive: true,
            ..Default::default()
        })
        .await),
    ));
    out.push((
        "ListUserGroups",
        ok(g.list_user_groups(pb::ListUserGroupsRequest {
            user: member.clone(),
            transitive: true,
            ..Default::default()
        })
        .await),
    ));
    out.push((
        "UpdateGroup",
        ok(g.update_group(pb::UpdateGroupRequest {
            group: Some(pb::Group {
                name: group.clone(),
                display_name: "Renamed".into(),
                ..Default::default()
            }),
            update_mask: None,
        })
        .await),
    ));
    out.push((
        "AddGroupMembers",
        ok(g.add_group_members(pb::AddGroupMembersRequest {
            group: group.clone(),
            members: vec![member.clone()],
        })
        .await),
    ));
    out.push((
        "RemoveGroupMembers",
        ok(g.remove_group_members(pb::RemoveGroupMembersRequest {
            group: group.clone(),
            members: vec![member.clone()],
        })
        .await),
    ));
    out.push((
        "DeleteGroup",
        ok(g.delete_group(pb::DeleteGroupRequest {
            name: group.clone(),
            ..Default::default()
        })
        .await),
    ));
    out
}

// -------------------------------------------------------------------- smoke

async fn smoke(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let mut g = s.groups();
    let ann = create(&mut c, user("ann@example.com")).await;
    let bob = create(&mut c, user("bob@example.com")).await;
    let team = new_group(&mut g, "team").await;
    let sub = new_group(&mut g, "sub").await;
    add(&mut g, &team.name, &[&ann.name, &sub.name])
        .await
        .expect("add");
    add(&mut g, &sub.name, &[&bob.name]).await.expect("add");
    assert_eq!(
        members(&mut g, &team.name, false).await,
        vec![sub.name.clone(), ann.name.clone()]
    );
    assert_eq!(
        members(&mut g, &team.name, true).await,
        vec![sub.name.clone(), ann.name.clone(), bob.name.clone()]
    );
    let err = add(&mut g, &sub.name, &[&team.name]).await;
    assert_error(err, Code::FailedPrecondition, "GROUP_CYCLE");
    let err = add(&mut g, &sub.name, &["projects/acme/users/nobody"]).await;
    assert_error(err, Code::NotFound, "MEMBER_NOT_FOUND");
    let listed = c
        .list_users(pb::ListUsersRequest {
            parent: PROJECT.into(),
            filter: "groups:\"team\"".into(),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.users.len(), 2);
    let n = count_all(&mut c, "groups:\"sub\"").await;
    assert_eq!(n, 1);
    let ug = g
        .list_user_groups(pb::ListUserGroupsRequest {
            user: bob.name.clone(),
            transitive: true,
            ..Default::default()
        })
        .await
        .expect("user groups")
        .into_inner();
    let names: Vec<_> = ug.groups.into_iter().map(|g| g.name).collect();
    assert_eq!(names, vec![sub.name.clone(), team.name.clone()]);
    let lg = g
        .list_groups(pb::ListGroupsRequest {
            parent: PROJECT.into(),
            filter: "display_name = \"Group t*\"".into(),
            ..Default::default()
        })
        .await
        .expect("list groups")
        .into_inner();
    assert_eq!(lg.groups.len(), 1);
    g.delete_group(pb::DeleteGroupRequest {
        name: sub.name.clone(),
        ..Default::default()
    })
    .await
    .expect("delete");
    assert_eq!(
        members(&mut g, &team.name, true).await,
        vec![ann.name.clone()]
    );
}

// -------------------------------------------------------------- CreateGroup

async fn create_group_with_chosen_and_generated_ids(e: Engine) {
    let s = TestServer::start(e).await;
    let mut g = s.groups();
    let description = "Builds things.\r\nSecond line,\twith a tab.";
    let metadata = md(&[("cost-center", "42"), ("Owner.Team_1", "platform")]);
    let chosen = try_create(
        &mut g,
        pb::CreateGroupRequest {
            parent: PROJECT.into(),
            group_id: "eng-team-2".into(),
            group: Some(pb::Group {
                // Output-only fields are ignored.
                name: gname("something-else"),
                display_name: "Engineering ✓".into(),
                description: description.into(),
                metadata: metadata.clone(),
                create_time: Some(prost_types::Timestamp {
                    seconds: 1,
                    nanos: 0,
                }),
                update_time: Some(prost_types::Timestamp {
                    seconds: 2,
                    nanos: 0,
                }),
                etag: "W/\"made-up\"".into(),
            }),
            ..Default::default()
        },
    )
    .await
    .expect("create with a chosen group_id");
    assert_eq!(chosen.name, gname("eng-team-2"), "group_id names the group");
    assert_eq!(chosen.display_name, "Engineering ✓");
    assert_eq!(chosen.description, description);
    assert_eq!(chosen.metadata, metadata);
    assert!(
        nanos(&chosen.create_time) > 1_000_000_000_000_000_000,
        "create_time is the server's: {:?}",
        chosen.create_time
    );
    assert_eq!(chosen.create_time, chosen.update_time);
    assert!(!chosen.etag.is_empty());
    assert_ne!(chosen.etag, "W/\"made-up\"");
    assert_eq!(
        get_group(&mut g, &chosen.name).await.expect("get chosen"),
        chosen
    );
    assert_error(
        get_group(&mut g, &gname("something-else")).await,
        Code::NotFound,
        "GROUP_NOT_FOUND",
    );

    // Without group_id: a UUIDv7, a new one each time.
    let a = try_create(&mut g, group_req("", "Anonymous"))
        .await
        .expect("generated id");
    let b = try_create(&mut g, group_req("", "Anonymous"))
        .await
        .expect("generated id, same display name");
    assert_ne!(a.name, b.name);
    let prefix = format!("{PROJECT}/groups/");
    for grp in [&a, &b] {
        let id = grp
            .name
            .strip_prefix(&prefix)
            .unwrap_or_else(|| panic!("{} is not a group of {PROJECT}", grp.name));
        assert_uuid_v7(id);
        assert!(!grp.etag.is_empty());
        assert_eq!(
            get_group(&mut g, &grp.name).await.expect("get generated"),
            *grp
        );
    }
    let all = list_groups_all(&mut g, "", "", 0).await.expect("list");
    assert_eq!(
        sorted(names_of(&all)),
        sorted(vec![chosen.name.clone(), a.name.clone(), b.name.clone()])
    );
}

async fn create_group_reports_every_bad_field(e: Engine) {
    let s = TestServer::start(e).await;
    let mut g = s.groups();

    // Everything wrong at once: every field is named.
    let st = assert_error(
        try_create(
            &mut g,
            pb::CreateGroupRequest {
                parent: "projects/ACME".into(),
                group_id: "Bad_Id".into(),
                request_id: "not valid!".into(),
                group: Some(pb::Group {
                    display_name: "x".repeat(201),
                    description: "y".repeat(4097),
                    metadata: md(&[("bad key!", "v"), ("fine", "ok")]),
                    ..Default::default()
                }),
                validate_only: false,
            },
        )
        .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(
        bad_fields(&st),
        vec![
            "group.description",
            "group.display_name",
            "group.metadata[\"bad key!\"]",
            "group_id",
            "parent",
            "request_id",
        ]
    );

    // Control characters: none in the display name (not even a tab), only
    // line breaks and tabs in the description and metadata values.
    let st = assert_error(
        try_create(
            &mut g,
            pb::CreateGroupRequest {
                group: Some(pb::Group {
                    display_name: "Tab\tinside".into(),
                    description: "Bell \u{7} inside".into(),
                    metadata: md(&[("k", "nul \u{0} inside"), ("fine", "two\nlines")]),
                    ..Default::default()
                }),
                ..group_req("ctl", "")
            },
        )
        .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(
        bad_fields(&st),
        vec![
            "group.description",
            "group.display_name",
            "group.metadata[\"k\"]"
        ]
    );

    let long = "a".repeat(64);
    for bad in [
        "Upper",
        "under_score",
        "-lead",
        "trail-",
        "dot.ted",
        "sl/ash",
        " space",
        long.as_str(),
    ] {
        let st = assert_error(
            try_create(&mut g, group_req(bad, "Bad id")).await,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
        assert_eq!(bad_fields(&st), vec!["group_id"], "{bad:?}");
    }

    // The group itself is required.
    let st = assert_error(
        try_create(
            &mut g,
            pb::CreateGroupRequest {
                parent: PROJECT.into(),
                group_id: "nogroup".into(),
                ..Default::default()
            },
        )
        .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(bad_fields(&st), vec!["group"]);

    // Metadata: at most 50 keys, keys of 1-64 characters, values of 500.
    let many: BTreeMap<String, String> =
        (0..51).map(|i| (format!("k{i}"), "v".to_owned())).collect();
    let st = assert_error(
        try_create(
            &mut g,
            pb::CreateGroupRequest {
                group: Some(pb::Group {
                    metadata: many,
                    ..Default::default()
                }),
                ..group_req("many-keys", "")
            },
        )
        .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(bad_fields(&st), vec!["group.metadata"]);
    let long_value = "v".repeat(501);
    let st = assert_error(
        try_create(
            &mut g,
            group_with("long-value", "Long", &[("long", long_value.as_str())]),
        )
        .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(bad_fields(&st), vec!["group.metadata[\"long\"]"]);
    let long_key = "k".repeat(65);
    let st = assert_error(
        try_create(
            &mut g,
            group_with("long-key", "Long", &[(long_key.as_str(), "v")]),
        )
        .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(bad_fields(&st).len(), 1);
    assert!(bad_fields(&st)[0].starts_with("group.metadata["), "{st:?}");

    // Right at every limit: accepted (lengths count characters).
    let mut metadata: BTreeMap<String, String> = (0..49)
        .map(|i| (format!("key-{i}"), "v".repeat(500)))
        .collect();
    metadata.insert("k".repeat(64), "last".into());
    let id = format!("g{}", "0".repeat(62));
    let at_limits = try_create(
        &mut g,
        pb::CreateGroupRequest {
            group: Some(pb::Group {
                display_name: "é".repeat(200),
                description: "d\n".repeat(2048),
                metadata: metadata.clone(),
                ..Default::default()
            }),
            ..group_req(&id, "")
        },
    )
    .await
    .expect("values at their limits are accepted");
    assert_eq!(at_limits.name, gname(&id));
    assert_eq!(at_limits.display_name.chars().count(), 200);
    assert_eq!(at_limits.description.chars().count(), 4096);
    assert_eq!(at_limits.metadata, metadata);
    assert_eq!(
        get_group(&mut g, &at_limits.name).await.expect("get"),
        at_limits
    );

    // None of the refused requests stored anything.
    assert_eq!(
        names_of(&list_groups_all(&mut g, "", "", 0).await.expect("list")),
        vec![at_limits.name.clone()]
    );
}

async fn create_group_conflicts_and_validate_only(e: Engine) {
    let s = TestServer::start(e).await;
    let mut g = s.groups();
    let taken = new_group(&mut g, "taken").await;
    let st = assert_error(
        try_create(&mut g, group_req("taken", "Second")).await,
        Code::AlreadyExists,
        "GROUP_ALREADY_EXISTS",
    );
    assert_eq!(meta(&st, "field"), "group_id");
    assert_eq!(
        get_group(&mut g, &taken.name).await.expect("get"),
        taken,
        "the first group is untouched"
    );

    // validate_only: the group as it would be, nothing stored, no etag.
    let dry = try_create(
        &mut g,
        pb::CreateGroupRequest {
            validate_only: true,
            ..group_req("dry-run", "Dry")
        },
    )
    .await
    .expect("validate_only");
    assert_eq!(dry.name, gname("dry-run"));
    assert_eq!(dry.display_name, "Dry");
    assert!(dry.etag.is_empty(), "validate_only has no etag: {dry:?}");
    assert_error(
        get_group(&mut g, &gname("dry-run")).await,
        Code::NotFound,
        "GROUP_NOT_FOUND",
    );
    let dry = try_create(
        &mut g,
        pb::CreateGroupRequest {
            validate_only: true,
            ..group_req("", "Dry generated")
        },
    )
    .await
    .expect("validate_only with a generated id");
    assert_uuid_v7(
        dry.name
            .strip_prefix(&format!("{PROJECT}/groups/"))
            .expect("a name in acme"),
    );
    assert!(dry.etag.is_empty());
    assert_error(
        get_group(&mut g, &dry.name).await,
        Code::NotFound,
        "GROUP_NOT_FOUND",
    );

    // validate_only checks the name and the fields too.
    assert_error(
        try_create(
            &mut g,
            pb::CreateGroupRequest {
                validate_only: true,
                ..group_req("taken", "Again")
            },
        )
        .await,
        Code::AlreadyExists,
        "GROUP_ALREADY_EXISTS",
    );
    let st = assert_error(
        try_create(
            &mut g,
            pb::CreateGroupRequest {
                validate_only: true,
                ..group_req("Bad!", "Bad")
            },
        )
        .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(bad_fields(&st), vec!["group_id"]);

    // Only `taken` exists, and the validated id is still free.
    assert_eq!(
        names_of(&list_groups_all(&mut g, "", "", 0).await.expect("list")),
        vec![taken.name.clone()]
    );
    let real = try_create(&mut g, group_req("dry-run", "Dry"))
        .await
        .expect("create after validate_only");
    assert!(!real.etag.is_empty());

    // Ids are per project.
    let there = new_group_in(&mut g, OTHER, "taken").await;
    assert_eq!(there.name, format!("{OTHER}/groups/taken"));
    assert_eq!(get_group(&mut g, &taken.name).await.expect("get"), taken);
}

async fn create_group_request_ids(e: Engine) {
    let s = TestServer::start(e).await;
    let mut g = s.groups();
    let mut c = s.client();

    // A generated id: the retry returns the first group, no second one.
    let req = pb::CreateGroupRequest {
        request_id: "retry-1".into(),
        ..group_req("", "Retried")
    };
    let first = try_create(&mut g, req.clone()).await.expect("first");
    let again = try_create(&mut g, req.clone()).await.expect("retry");
    assert_eq!(again.name, first.name);
    assert_eq!(again.create_time, first.create_time);
    assert_eq!(again, first);
    assert_eq!(
        names_of(&list_groups_all(&mut g, "", "", 0).await.expect("list")),
        vec![first.name.clone()]
    );

    // A chosen id: the retry is not ALREADY_EXISTS.
    let keyed = pb::CreateGroupRequest {
        request_id: "retry-2".into(),
        ..group_req("keyed", "Keyed")
    };
    let k1 = try_create(&mut g, keyed.clone()).await.expect("keyed");
    let k2 = try_create(&mut g, keyed.clone())
        .await
        .expect("keyed retry");
    assert_eq!(k2, k1);

    // The same key with another request.
    for other in [
        pb::CreateGroupRequest {
            request_id: "retry-1".into(),
            ..group_req("", "Something else")
        },
        pb::CreateGroupRequest {
            request_id: "retry-2".into(),
            ..group_req("keyed-2", "Keyed")
        },
        pb::CreateGroupRequest {
            request_id: "retry-2".into(),
            ..group_req("keyed", "Keyed, renamed")
        },
    ] {
        let st = assert_error(
            try_create(&mut g, other).await,
            Code::FailedPrecondition,
            "REQUEST_ID_REUSED",
        );
        assert!(
            st.get_error_details().precondition_failure().is_some(),
            "{st:?}"
        );
    }
    assert_eq!(
        list_groups_all(&mut g, "", "", 0)
            .await
            .expect("list")
            .len(),
        2,
        "a reused key stores nothing"
    );
    assert_error(
        get_group(&mut g, &gname("keyed-2")).await,
        Code::NotFound,
        "GROUP_NOT_FOUND",
    );
    assert_eq!(get_group(&mut g, &k1.name).await.expect("get"), k1);

    // CreateUser's keys and CreateGroup's do not meet: a group key first...
    let ureq = pb::CreateUserRequest {
        parent: PROJECT.into(),
        request_id: "retry-1".into(),
        user: Some(user("keyed@example.com")),
        ..Default::default()
    };
    let u1 = c
        .create_user(ureq.clone())
        .await
        .expect("CreateUser with a key CreateGroup used")
        .into_inner();
    let u2 = c
        .create_user(ureq.clone())
        .await
        .expect("CreateUser retry")
        .into_inner();
    assert_eq!(u2.name, u1.name);
    assert_eq!(
        try_create(&mut g, req.clone())
            .await
            .expect("group retry after the user's"),
        first
    );
    // ...and a user key first.
    let ureq2 = pb::CreateUserRequest {
        request_id: "user-first".into(),
        user: Some(user("first@example.com")),
        ..ureq.clone()
    };
    let u3 = c
        .create_user(ureq2.clone())
        .await
        .expect("CreateUser")
        .into_inner();
    let greq = pb::CreateGroupRequest {
        request_id: "user-first".into(),
        ..group_req("after-user", "After")
    };
    let g3 = try_create(&mut g, greq.clone())
        .await
        .expect("CreateGroup with a key CreateUser used");
    assert_eq!(g3.name, gname("after-user"));
    assert_eq!(try_create(&mut g, greq).await.expect("group retry"), g3);
    assert_eq!(
        c.create_user(ureq2)
            .await
            .expect("user retry after the group's")
            .into_inner()
            .name,
        u3.name
    );
}

// ----------------------------------------------------------------- GetGroup

async fn get_group_errors(e: Engine) {
    let s = TestServer::start(e).await;
    let mut g = s.groups();
    let st = assert_error(
        get_group(&mut g, &gname("missing")).await,
        Code::NotFound,
        "GROUP_NOT_FOUND",
    );
    assert_eq!(
        resource(&st),
        ("users.v1.Group".to_owned(), gname("missing"))
    );
    assert_eq!(meta(&st, "name"), gname("missing"));

    for bad in [
        "",
        "missing",
        "groups/missing",
        "projects/acme/groups/",
        "projects/acme/groups/Bad!",
        "projects/acme/users/missing",
        "projects/acme/groups/a/b",
        "projects//groups/a",
    ] {
        let st = assert_error(
            get_group(&mut g, bad).await,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
        assert_eq!(bad_fields(&st), vec!["name"], "{bad:?}");
    }

    // A group of another project is not one of acme's.
    let there = new_group_in(&mut g, OTHER, "elsewhere").await;
    assert_eq!(
        get_group(&mut g, &there.name).await.expect("get in other"),
        there
    );
    assert_error(
        get_group(&mut g, &gname("elsewhere")).await,
        Code::NotFound,
        "GROUP_NOT_FOUND",
    );
}

// -------------------------------------------------------------- UpdateGroup

async fn update_group_masks(e: Engine) {
    let s = TestServer::start(e).await;
    let mut g = s.groups();
    let start = try_create(
        &mut g,
        pb::CreateGroupRequest {
            group: Some(pb::Group {
                display_name: "Before".into(),
                description: "Desc".into(),
                metadata: md(&[("a", "1"), ("b", "2")]),
                ..Default::default()
            }),
            ..group_req("upd", "")
        },
    )
    .await
    .expect("create");
    let name = start.name.clone();
    let patch = |f: pb::Group| pb::Group {
        name: name.clone(),
        ..f
    };

    // One field by mask; what else the request carries is ignored.
    let u = update(
        &mut g,
        patch(pb::Group {
            display_name: "After".into(),
            description: "ignored".into(),
            metadata: md(&[("a", "ignored")]),
            ..Default::default()
        }),
        &["display_name"],
    )
    .await
    .expect("display_name");
    assert_eq!(u.display_name, "After");
    assert_eq!(u.description, "Desc");
    assert_eq!(u.metadata, md(&[("a", "1"), ("b", "2")]));
    assert_eq!(u.create_time, start.create_time);

    // A masked field sent empty is cleared.
    let u = update(&mut g, patch(pb::Group::default()), &["description"])
        .await
        .expect("clear description");
    assert_eq!(u.description, "");
    assert_eq!(u.display_name, "After");

    // metadata.KEY sets that key only...
    let u = update(
        &mut g,
        patch(pb::Group {
            metadata: md(&[("b", "20"), ("a", "ignored")]),
            ..Default::default()
        }),
        &["metadata.b"],
    )
    .await
    .expect("metadata.b");
    assert_eq!(u.metadata, md(&[("a", "1"), ("b", "20")]));
    // ...removes it when the request has no value for it...
    let u = update(&mut g, patch(pb::Group::default()), &["metadata.a"])
        .await
        .expect("metadata.a removed");
    assert_eq!(u.metadata, md(&[("b", "20")]));
    // ...and adds new keys.
    let u = update(
        &mut g,
        patch(pb::Group {
            metadata: md(&[("c", "3"), ("d", "4")]),
            ..Default::default()
        }),
        &["metadata.c", "metadata.d"],
    )
    .await
    .expect("metadata.c and metadata.d");
    assert_eq!(u.metadata, md(&[("b", "20"), ("c", "3"), ("d", "4")]));
    // `metadata` replaces the whole map.
    let u = update(
        &mut g,
        patch(pb::Group {
            metadata: md(&[("z", "26")]),
            ..Default::default()
        }),
        &["metadata"],
    )
    .await
    .expect("metadata");
    assert_eq!(u.metadata, md(&[("z", "26")]));

    // No mask: every populated field; the empty ones are kept.
    let u = update(
        &mut g,
        patch(pb::Group {
            description: "Only this".into(),
            ..Default::default()
        }),
        &[],
    )
    .await
    .expect("no mask, description");
    assert_eq!(u.display_name, "After");
    assert_eq!(u.description, "Only this");
    assert_eq!(u.metadata, md(&[("z", "26")]));
    let u = update(
        &mut g,
        patch(pb::Group {
            display_name: "No mask".into(),
            metadata: md(&[("m", "1")]),
            ..Default::default()
        }),
        &[],
    )
    .await
    .expect("no mask, display_name and metadata");
    assert_eq!(u.display_name, "No mask");
    assert_eq!(u.description, "Only this");
    assert_eq!(u.metadata, md(&[("m", "1")]), "metadata is replaced whole");

    // `*`: every field; empty ones are cleared.
    let u = update(
        &mut g,
        patch(pb::Group {
            display_name: "Star".into(),
            ..Default::default()
        }),
        &["*"],
    )
    .await
    .expect("*");
    assert_eq!(u.display_name, "Star");
    assert_eq!(u.description, "");
    assert!(u.metadata.is_empty());
    assert_eq!(get_group(&mut g, &name).await.expect("get"), u);

    // A field outside the mask is not looked at, even if it would be invalid.
    let u = update(
        &mut g,
        patch(pb::Group {
            display_name: "x".repeat(201),
            description: "Fine".into(),
            ..Default::default()
        }),
        &["description"],
    )
    .await
    .expect("only the masked field is validated");
    assert_eq!(u.display_name, "Star");
    assert_eq!(u.description, "Fine");
    let current = u;

    // Refused masks change nothing.
    for (paths, field) in [
        (&["create_time"][..], "update_mask.paths[0]"),
        (&["update_time"][..], "update_mask.paths[0]"),
        (&["etag"][..], "update_mask.paths[0]"),
        (&["name"][..], "update_mask.paths[0]"),
        (&["nickname"][..], "update_mask.paths[0]"),
        (&["display_name", "members"][..], "update_mask.paths[1]"),
        (&["metadata.bad key!"][..], "update_mask.paths[0]"),
    ] {
        let st = assert_error(
            update(
                &mut g,
                patch(pb::Group {
                    display_name: "Refused".into(),
                    ..Default::default()
                }),
                paths,
            )
            .await,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
        assert_eq!(bad_fields(&st), vec![field], "{paths:?}");
    }
    let st = assert_error(
        update(
            &mut g,
            patch(pb::Group {
                display_name: "Refused".into(),
                ..Default::default()
            }),
            &["*", "display_name"],
        )
        .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    let fields = bad_fields(&st);
    assert!(
        !fields.is_empty() && fields.iter().all(|f| f.starts_with("update_mask.paths")),
        "{st:?}"
    );
    // Invalid values in masked fields.
    let st = assert_error(
        update(
            &mut g,
            patch(pb::Group {
                display_name: "x".repeat(201),
                description: "bell \u{7}".into(),
                ..Default::default()
            }),
            &["display_name", "description"],
        )
        .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(
        bad_fields(&st),
        vec!["group.description", "group.display_name"]
    );
    assert_eq!(
        get_group(&mut g, &name).await.expect("get"),
        current,
        "refused updates changed nothing"
    );

    // Unknown group, no group, bad name.
    assert_error(
        update(
            &mut g,
            pb::Group {
                name: gname("ghost"),
                display_name: "x".into(),
                ..Default::default()
            },
            &[],
        )
        .await,
        Code::NotFound,
        "GROUP_NOT_FOUND",
    );
    let st = assert_error(
        g.update_group(pb::UpdateGroupRequest {
            group: None,
            update_mask: None,
        })
        .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(bad_fields(&st), vec!["group"]);
    let st = assert_error(
        update(
            &mut g,
            pb::Group {
                name: "upd".into(),
                display_name: "x".into(),
                ..Default::default()
            },
            &[],
        )
        .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(bad_fields(&st), vec!["group.name"]);
}

async fn update_group_etags_and_times(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let mut g = s.groups();
    let v0 = new_group(&mut g, "ver").await;

    // The current etag works; the change moves etag and update_time.
    let v1 = update(
        &mut g,
        pb::Group {
            name: v0.name.clone(),
            display_name: "One".into(),
            etag: v0.etag.clone(),
            ..Default::default()
        },
        &["display_name"],
    )
    .await
    .expect("update with the current etag");
    assert_eq!(v1.display_name, "One");
    assert_ne!(v1.etag, v0.etag);
    assert!(nanos(&v1.update_time) > nanos(&v0.update_time));
    assert_eq!(v1.create_time, v0.create_time);

    // A stale etag is refused and changes nothing.
    assert_error(
        update(
            &mut g,
            pb::Group {
                name: v0.name.clone(),
                display_name: "Two".into(),
                etag: v0.etag.clone(),
                ..Default::default()
            },
            &["display_name"],
        )
        .await,
        Code::Aborted,
        "ETAG_MISMATCH",
    );
    assert_error(
        update(
            &mut g,
            pb::Group {
                name: v0.name.clone(),
                display_name: "Two".into(),
                etag: "W/\"garbage\"".into(),
                ..Default::default()
            },
            &[],
        )
        .await,
        Code::Aborted,
        "ETAG_MISMATCH",
    );
    assert_eq!(get_group(&mut g, &v0.name).await.expect("get"), v1);

    // An update that changes nothing keeps etag and update_time.
    let same = update(
        &mut g,
        pb::Group {
            name: v0.name.clone(),
            display_name: "One".into(),
            etag: v1.etag.clone(),
            ..Default::default()
        },
        &["display_name"],
    )
    .await
    .expect("no-op with etag");
    assert_eq!(same, v1);
    let same = update(
        &mut g,
        pb::Group {
            name: v0.name.clone(),
            display_name: "One".into(),
            ..Default::default()
        },
        &[],
    )
    .await
    .expect("no-op without mask");
    assert_eq!(same, v1);
    let same = update(
        &mut g,
        pb::Group {
            name: v0.name.clone(),
            ..Default::default()
        },
        &[],
    )
    .await
    .expect("nothing populated, no mask");
    assert_eq!(same, v1);
    assert_eq!(get_group(&mut g, &v0.name).await.expect("get"), v1);

    // Membership changes leave the group's etag and update_time alone.
    let ann = new_user(&mut c, "ann").await;
    assert_eq!(add(&mut g, &v1.name, &[&ann.name]).await.expect("add"), v1);
    assert_eq!(
        remove(&mut g, &v1.name, &[&ann.name])
            .await
            .expect("remove"),
        v1
    );
    assert_eq!(get_group(&mut g, &v0.name).await.expect("get"), v1);

    // So the etag read before them still works; update_time keeps rising.
    let v2 = update(
        &mut g,
        pb::Group {
            name: v0.name.clone(),
            description: "Two".into(),
            etag: v1.etag.clone(),
            ..Default::default()
        },
        &[],
    )
    .await
    .expect("etag from before the membership changes");
    assert!(nanos(&v2.update_time) > nanos(&v1.update_time));
    assert_ne!(v2.etag, v1.etag);
    let v3 = update(
        &mut g,
        pb::Group {
            name: v0.name.clone(),
            metadata: md(&[("k", "v")]),
            ..Default::default()
        },
        &[],
    )
    .await
    .expect("update without etag");
    assert!(nanos(&v3.update_time) > nanos(&v2.update_time));
    assert_ne!(v3.etag, v2.etag);
    assert_ne!(v3.etag, v1.etag);
    assert_eq!(v3.create_time, v0.create_time);
    assert_eq!(get_group(&mut g, &v0.name).await.expect("get"), v3);
}

// -------------------------------------------------------------- DeleteGroup

async fn delete_group_semantics(e: Engine) {
    let s = TestServer::start(e).await;
    let mut g = s.groups();
    let original = new_group(&mut g, "doomed").await;
    let changed = update(
        &mut g,
        pb::Group {
            name: original.name.clone(),
            display_name: "Changed".into(),
            ..Default::default()
        },
        &[],
    )
    .await
    .expect("update");

    assert_error(
        delete_group(&mut g, &original.name, &original.etag, false).await,
        Code::Aborted,
        "ETAG_MISMATCH",
    );
    assert_eq!(
        get_group(&mut g, &original.name)
            .await
            .expect("still there"),
        changed
    );
    let deleted = delete_group(&mut g, &original.name, &changed.etag, false)
        .await
        .expect("delete with the current etag");
    assert_eq!(deleted, changed, "DeleteGroup returns the group as it was");
    assert_error(
        get_group(&mut g, &original.name).await,
        Code::NotFound,
        "GROUP_NOT_FOUND",
    );

    // Missing: NOT_FOUND, with or without an etag; allow_missing succeeds.
    let st = assert_error(
        delete_group(&mut g, &original.name, "", false).await,
        Code::NotFound,
        "GROUP_NOT_FOUND",
    );
    assert_eq!(
        resource(&st),
        ("users.v1.Group".to_owned(), original.name.clone())
    );
    assert_error(
        delete_group(&mut g, &original.name, &changed.etag, false).await,
        Code::NotFound,
        "GROUP_NOT_FOUND",
    );
    let missing = delete_group(&mut g, &original.name, "", true)
        .await
        .expect("allow_missing");
    assert_eq!(
        missing,
        pb::Group {
            name: original.name.clone(),
            ..Default::default()
        },
        "just the name"
    );

    // allow_missing on a group that exists deletes it.
    let present = new_group(&mut g, "present").await;
    assert_eq!(
        delete_group(&mut g, &present.name, "", true)
            .await
            .expect("allow_missing, present"),
        present
    );
    assert_error(
        get_group(&mut g, &present.name).await,
        Code::NotFound,
        "GROUP_NOT_FOUND",
    );

    // The id is free again, for a new group no old etag matches.
    let reborn = new_group(&mut g, "doomed").await;
    assert_eq!(reborn.display_name, "Group doomed");
    assert_ne!(reborn.etag, original.etag);
    assert_ne!(reborn.etag, changed.etag);
    assert_error(
        delete_group(&mut g, &reborn.name, &original.etag, false).await,
        Code::Aborted,
        "ETAG_MISMATCH",
    );
    assert_eq!(get_group(&mut g, &reborn.name).await.expect("get"), reborn);

    for bad in [
        "",
        "doomed",
        "projects/acme/groups/Doomed",
        "projects/acme/users/doomed",
    ] {
        let st = assert_error(
            delete_group(&mut g, bad, "", true).await,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
        assert_eq!(bad_fields(&st), vec!["name"], "{bad:?}");
    }
}

async fn delete_group_removes_its_memberships(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let mut g = s.groups();
    let ann = new_user(&mut c, "ann").await;
    let bob = new_user(&mut c, "bob").await;
    let parent = new_group(&mut g, "parent").await;
    let mid = new_group(&mut g, "mid").await;
    let leaf = new_group(&mut g, "leaf").await;
    add(&mut g, &parent.name, &[&mid.name, &bob.name])
        .await
        .expect("parent");
    add(&mut g, &mid.name, &[&leaf.name, &ann.name])
        .await
        .expect("mid");
    add(&mut g, &leaf.name, &[&bob.name]).await.expect("leaf");
    assert_eq!(
        members(&mut g, &parent.name, true).await,
        vec![
            leaf.name.clone(),
            mid.name.clone(),
            ann.name.clone(),
            bob.name.clone()
        ]
    );
    assert_eq!(
        user_groups(&mut g, &ann.name, true).await,
        vec![mid.name.clone(), parent.name.clone()]
    );

    delete_group(&mut g, &mid.name, "", false)
        .await
        .expect("delete mid");

    // Its member list is gone with it.
    for transitive in [false, true] {
        assert_error(
            member_page(&mut g, &mid.name, transitive, 0, "").await,
            Code::NotFound,
            "GROUP_NOT_FOUND",
        );
    }
    // The parent no longer lists it, nor what came through it.
    assert_eq!(
        members(&mut g, &parent.name, false).await,
        vec![bob.name.clone()]
    );
    assert_eq!(
        members(&mut g, &parent.name, true).await,
        vec![bob.name.clone()]
    );
    // Its members are untouched, only no longer in it.
    assert_eq!(
        get(&mut c, &ann.name).await.expect("ann exists").etag,
        ann.etag,
        "ann is untouched"
    );
    assert_eq!(
        get_group(&mut g, &leaf.name).await.expect("leaf exists"),
        leaf
    );
    assert_eq!(
        members(&mut g, &leaf.name, false).await,
        vec![bob.name.clone()]
    );
    assert!(user_groups(&mut g, &ann.name, false).await.is_empty());
    assert!(user_groups(&mut g, &ann.name, true).await.is_empty());
    assert_eq!(
        user_groups(&mut g, &bob.name, true).await,
        vec![leaf.name.clone(), parent.name.clone()]
    );
    assert!(users_in(&mut c, "groups:\"mid\"", true).await.is_empty());
    assert_eq!(
        users_in(&mut c, "groups:\"parent\"", false).await,
        vec![bob.name.clone()]
    );

    // A new group with the same id starts empty and inside nothing.
    let reborn = new_group(&mut g, "mid").await;
    assert!(members(&mut g, &reborn.name, true).await.is_empty());
    assert_eq!(
        members(&mut g, &parent.name, false).await,
        vec![bob.name.clone()]
    );
    assert!(user_groups(&mut g, &ann.name, true).await.is_empty());
    assert_eq!(count_users(&mut c, "groups:\"mid\"", true).await, 0);

    // Deleting the parent leaves leaf's and bob's other membership alone.
    delete_group(&mut g, &parent.name, "", false)
        .await
        .expect("delete parent");
    assert_eq!(
        user_groups(&mut g, &bob.name, true).await,
        vec![leaf.name.clone()]
    );
    assert_eq!(
        get(&mut c, &bob.name).await.expect("bob exists").etag,
        bob.etag,
        "bob is untouched"
    );
}

// ---------------------------------------------------------------- ListGroups

async fn list_groups_pages_and_orders(e: Engine) {
    let s = TestServer::start(e).await;
    let mut g = s.groups();
    let spec = [
        ("g1", "Delta"),
        ("g2", "Alpha"),
        ("g3", "Golf"),
        ("g4", "Charlie"),
        ("g5", "Foxtrot"),
        ("g6", "Bravo"),
        ("g7", "Echo"),
    ];
    let mut created = Vec::new();
    for (id, display_name) in spec {
        created.push(
            try_create(&mut g, group_req(id, display_name))
                .await
                .expect("create"),
        );
    }
    let newest_first: Vec<pb::Group> = created.iter().rev().cloned().collect();

    let pages = group_pages(&mut g, "", "", 2).await.expect("pages of 2");
    assert_eq!(
        pages.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![2, 2, 2, 1]
    );
    let flat: Vec<pb::Group> = pages.into_iter().flatten().collect();
    assert_eq!(flat, newest_first, "default order: create_time desc");
    for (order_by, size) in [("", 0), ("", 1000), ("", 5000), ("create_time desc", 3)] {
        assert_eq!(
            list_groups_all(&mut g, "", order_by, size)
                .await
                .expect("list"),
            newest_first,
            "{order_by:?} in pages of {size}"
        );
    }
    assert_eq!(
        names_of(
            &list_groups_all(&mut g, "", "create_time", 2)
                .await
                .expect("oldest first")
        ),
        names_of(&created)
    );
    let by_name = gnames(&["g2", "g6", "g4", "g1", "g7", "g5", "g3"]);
    assert_eq!(
        names_of(
            &list_groups_all(&mut g, "", "display_name", 2)
                .await
                .expect("by display_name")
        ),
        by_name
    );
    let mut by_name_desc = by_name.clone();
    by_name_desc.reverse();
    assert_eq!(
        names_of(
            &list_groups_all(&mut g, "", "display_name desc", 3)
                .await
                .expect("by display_name desc")
        ),
        by_name_desc
    );

    // Keyset: a token continues after the last group it saw, whatever was
    // created or deleted meanwhile.
    let first = g
        .list_groups(list_req("", "display_name", 2))
        .await
        .expect("first page")
        .into_inner();
    assert_eq!(names_of(&first.groups), gnames(&["g2", "g6"]));
    delete_group(&mut g, &gname("g4"), "", false)
        .await
        .expect("delete Charlie, not yet seen");
    try_create(&mut g, group_req("g8", "Aardvark"))
        .await
        .expect("a group before the cursor");
    try_create(&mut g, group_req("g9", "Zulu"))
        .await
        .expect("a group after the cursor");
    let rest: Vec<pb::Group> = group_pages_from(
        &mut g,
        list_req("", "display_name", 2),
        first.next_page_token,
    )
    .await
    .expect("rest")
    .into_iter()
    .flatten()
    .collect();
    assert_eq!(names_of(&rest), gnames(&["g1", "g7", "g5", "g3", "g9"]));

    // Equal display names: each group once, the same order in pages of one
    // as in one page.
    try_create(&mut g, group_req("twin-b", "Twin"))
        .await
        .expect("twin");
    try_create(&mut g, group_req("twin-a", "Twin"))
        .await
        .expect("twin");
    for order_by in ["display_name", "display_name desc", "create_time", ""] {
        let whole = names_of(
            &list_groups_all(&mut g, "", order_by, 1000)
                .await
                .expect("one page"),
        );
        let paged = names_of(
            &list_groups_all(&mut g, "", order_by, 1)
                .await
                .expect("pages of one"),
        );
        assert_eq!(paged, whole, "{order_by:?}");
        assert_eq!(whole.len(), 10, "{order_by:?}");
        assert_eq!(
            whole.iter().collect::<BTreeSet<_>>().len(),
            10,
            "no group twice: {order_by:?}"
        );
    }
}

async fn list_groups_filters(e: Engine) {
    let s = TestServer::start(e).await;
    let mut g = s.groups();
    try_create(
        &mut g,
        group_with("alpha", "Team Alpha", &[("tier", "gold"), ("region", "eu")]),
    )
    .await
    .expect("alpha");
    let beta = try_create(
        &mut g,
        group_with("beta", "Team Beta", &[("tier", "silver")]),
    )
    .await
    .expect("beta");
    try_create(&mut g, group_with("gamma", "Guild Gamma", &[]))
        .await
        .expect("gamma");
    try_create(
        &mut g,
        group_with("delta", "Team Delta", &[("region", "us")]),
    )
    .await
    .expect("delta");
    let t_beta = rfc3339(&beta.create_time);

    let cases: Vec<(String, Vec<&str>)> = vec![
        ("".to_owned(), vec!["alpha", "beta", "delta", "gamma"]),
        ("display_name = \"Team Beta\"".to_owned(), vec!["beta"]),
        ("display_name = \"team beta\"".to_owned(), vec![]),
        (
            "display_name = \"Team*\"".to_owned(),
            vec!["alpha", "beta", "delta"],
        ),
        ("display_name = \"*Gamma\"".to_owned(), vec!["gamma"]),
        ("display_name = \"*m B*\"".to_owned(), vec!["beta"]),
        ("display_name != \"Team*\"".to_owned(), vec!["gamma"]),
        ("display_name > \"Team Beta\"".to_owned(), vec!["delta"]),
        ("metadata.tier = \"gold\"".to_owned(), vec!["alpha"]),
        ("metadata.tier = \"s*\"".to_owned(), vec!["beta"]),
        ("metadata:region".to_owned(), vec!["alpha", "delta"]),
        ("metadata.region:*".to_owned(), vec!["alpha", "delta"]),
        ("NOT metadata:tier".to_owned(), vec!["delta", "gamma"]),
        ("metadata.nothing = \"x\"".to_owned(), vec![]),
        (
            "metadata.tier = \"gold\" OR metadata.region = \"us\"".to_owned(),
            vec!["alpha", "delta"],
        ),
        (
            "(display_name = \"Team*\" AND NOT metadata.tier = \"gold\") OR metadata:region"
                .to_owned(),
            vec!["alpha", "beta", "delta"],
        ),
        (
            "display_name = \"Team*\" metadata:tier".to_owned(),
            vec!["alpha", "beta"],
        ),
        (
            format!("create_time > \"{t_beta}\""),
            vec!["delta", "gamma"],
        ),
        (
            format!("create_time >= \"{t_beta}\""),
            vec!["beta", "delta", "gamma"],
        ),
        (format!("create_time < \"{t_beta}\""), vec!["alpha"]),
        (
            format!("create_time > \"{t_beta}\" AND NOT display_name = \"Guild*\""),
            vec!["delta"],
        ),
        (
            "create_time > \"2000-01-01T00:00:00Z\"".to_owned(),
            vec!["alpha", "beta", "delta", "gamma"],
        ),
        (
            "create_time < \"2000-01-01T00:00:00+01:00\"".to_owned(),
            vec![],
        ),
    ];
    for (filter, want) in cases {
        let got = list_groups_all(&mut g, &filter, "", 1)
            .await
            .unwrap_or_else(|e| panic!("{filter}: {e:?}"));
        assert_eq!(sorted(names_of(&got)), gnames(&want), "{filter}");
    }
}

async fn list_groups_errors_and_projects(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let mut g = s.groups();
    for id in ["ga", "gb", "gc"] {
        new_group(&mut g, id).await;
    }
    // Another project's groups, one with an id acme uses too.
    new_group_in(&mut g, OTHER, "ga").await;
    new_group_in(&mut g, OTHER, "elsewhere").await;

    let mine = list_groups_all(&mut g, "", "", 1).await.expect("acme");
    assert_eq!(sorted(names_of(&mine)), gnames(&["ga", "gb", "gc"]));
    let theirs = group_pages_from(
        &mut g,
        pb::ListGroupsRequest {
            parent: OTHER.into(),
            ..list_req("", "", 1)
        },
        String::new(),
    )
    .await
    .expect("other")
    .concat();
    assert_eq!(
        sorted(names_of(&theirs)),
        vec![
            format!("{OTHER}/groups/elsewhere"),
            format!("{OTHER}/groups/ga")
        ]
    );
    assert!(
        list_groups_all(&mut g, "display_name = \"Group elsewhere\"", "", 0)
            .await
            .expect("filter")
            .is_empty()
    );

    for filter in [
        "email = \"x\"",
        "groups:\"ga\"",
        "state = ACTIVE",
        "name = \"projects/acme/groups/ga\"",
        "display_name = ",
        "display_name = \"a\" AND",
        "(display_name = \"a\"",
        "metadata.bad key = \"x\"",
        "create_time > \"yesterday\"",
    ] {
        let st = assert_error(
            g.list_groups(list_req(filter, "", 0)).await,
            Code::InvalidArgument,
            "INVALID_FILTER",
        );
        assert_eq!(meta(&st, "field"), "filter", "{filter}");
        assert_eq!(bad_fields(&st), vec!["filter"], "{filter}");
    }
    for order_by in [
        "email",
        "name",
        "update_time",
        "create_time up",
        "display_name desc, create_time",
    ] {
        let st = assert_error(
            g.list_groups(list_req("", order_by, 0)).await,
            Code::InvalidArgument,
            "INVALID_ORDER_BY",
        );
        assert_eq!(meta(&st, "field"), "order_by", "{order_by}");
    }

    // Page tokens belong to their query.
    let filter = "display_name = \"Group g*\"";
    let first = g
        .list_groups(list_req(filter, "", 1))
        .await
        .expect("page")
        .into_inner();
    assert_eq!(first.groups.len(), 1);
    let token = first.next_page_token.clone();
    assert!(!token.is_empty());
    let next = g
        .list_groups(pb::ListGroupsRequest {
            page_token: token.clone(),
            ..list_req(filter, "", 5)
        })
        .await
        .expect("the same query with another page_size")
        .into_inner();
    assert_eq!(next.groups.len(), 2);
    assert!(next.next_page_token.is_empty());
    // A ListUserGroups token is no ListGroups token.
    let ann = new_user(&mut c, "ann").await;
    add(&mut g, &gname("ga"), &[&ann.name]).await.expect("add");
    add(&mut g, &gname("gb"), &[&ann.name]).await.expect("add");
    let foreign = user_group_page(&mut g, &ann.name, false, 1, "")
        .await
        .expect("user groups")
        .next_page_token;
    assert!(!foreign.is_empty());
    for (what, req) in [
        ("no filter", list_req("", "", 1)),
        (
            "another filter",
            list_req("display_name = \"Group*\"", "", 1),
        ),
        ("another order", list_req(filter, "display_name", 1)),
        (
            "another project",
            pb::ListGroupsRequest {
                parent: OTHER.into(),
                ..list_req(filter, "", 1)
            },
        ),
    ] {
        let st = assert_error(
            g.list_groups(pb::ListGroupsRequest {
                page_token: token.clone(),
                ..req
            })
            .await,
            Code::InvalidArgument,
            "INVALID_PAGE_TOKEN",
        );
        assert_eq!(meta(&st, "field"), "page_token", "{what}");
    }
    for garbage in ["garbage", "AAAA", "%%%", foreign.as_str()] {
        assert_error(
            g.list_groups(pb::ListGroupsRequest {
                page_token: garbage.into(),
                ..list_req(filter, "", 1)
            })
            .await,
            Code::InvalidArgument,
            "INVALID_PAGE_TOKEN",
        );
    }

    let st = assert_error(
        g.list_groups(list_req("", "", -1)).await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(bad_fields(&st), vec!["page_size"]);
    for parent in [
        "acme",
        "projects/",
        "projects/acme/groups",
        "projects/ACME",
        "",
    ] {
        let st = assert_error(
            g.list_groups(pb::ListGroupsRequest {
                parent: parent.into(),
                ..list_req("", "", 0)
            })
            .await,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
        assert_eq!(bad_fields(&st), vec!["parent"], "{parent:?}");
    }
}

// ---------------------------------------------------------- AddGroupMembers

async fn add_members_is_idempotent_and_all_or_nothing(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let mut g = s.groups();
    let ann = new_user(&mut c, "ann").await;
    let bob = new_user(&mut c, "bob").await;
    let cat = new_user(&mut c, "cat").await;
    let dan = new_user(&mut c, "dan").await;
    let crew = new_group(&mut g, "crew").await;
    let sub = new_group(&mut g, "sub").await;

    let back = add(&mut g, &crew.name, &[&ann.name, &bob.name])
        .await
        .expect("add");
    assert_eq!(back, crew, "AddGroupMembers returns the group, unchanged");
    add(&mut g, &crew.name, &[&ann.name, &bob.name])
        .await
        .expect("adding members again is fine");
    add(
        &mut g,
        &crew.name,
        &[
            &bob.name, &bob.name, &cat.name, &cat.name, &sub.name, &sub.name,
        ],
    )
    .await
    .expect("repeats in one request count once");
    let listed = member_pages(&mut g, &crew.name, false, 0).await.concat();
    assert_eq!(
        listed.iter().map(|m| m.name.clone()).collect::<Vec<_>>(),
        vec![
            sub.name.clone(),
            ann.name.clone(),
            bob.name.clone(),
            cat.name.clone()
        ]
    );
    assert_eq!(
        listed.iter().map(|m| m.kind).collect::<Vec<_>>(),
        vec![GROUP, USER, USER, USER]
    );
    assert_eq!(
        user_groups(&mut g, &ann.name, false).await,
        vec![crew.name.clone()]
    );

    // All or nothing: one unknown member, nothing added.
    let before = members(&mut g, &crew.name, false).await;
    let ghost = uname("ghost");
    let st = assert_error(
        add(
            &mut g,
            &crew.name,
            &[&dan.name, &ann.name, &ghost, &cat.name],
        )
        .await,
        Code::NotFound,
        "MEMBER_NOT_FOUND",
    );
    assert_eq!(meta(&st, "field"), "members[2]");
    assert_eq!(meta(&st, "name"), ghost);
    assert_eq!(resource(&st), ("users.v1.User".to_owned(), ghost.clone()));
    assert_eq!(
        members(&mut g, &crew.name, false).await,
        before,
        "nothing was added"
    );
    assert!(user_groups(&mut g, &dan.name, false).await.is_empty());

    // An unknown group member, first in the request.
    let nowhere = gname("nowhere");
    let st = assert_error(
        add(&mut g, &crew.name, &[&nowhere, &dan.name]).await,
        Code::NotFound,
        "MEMBER_NOT_FOUND",
    );
    assert_eq!(meta(&st, "field"), "members[0]");
    assert_eq!(meta(&st, "name"), nowhere);
    assert_eq!(resource(&st).1, nowhere);

    // A user of another project with the same id is not acme's user.
    new_user_in(&mut c, OTHER, "oscar", user("oscar@example.com")).await;
    let st = assert_error(
        add(&mut g, &crew.name, &[&dan.name, &uname("oscar")]).await,
        Code::NotFound,
        "MEMBER_NOT_FOUND",
    );
    assert_eq!(meta(&st, "field"), "members[1]");

    // Two unknown members: the error names one of them, by its own index.
    let st = assert_error(
        add(&mut g, &crew.name, &[&nowhere, &ghost]).await,
        Code::NotFound,
        "MEMBER_NOT_FOUND",
    );
    let (field, named) = (meta(&st, "field"), meta(&st, "name"));
    assert!(
        (field == "members[0]" && named == nowhere) || (field == "members[1]" && named == ghost),
        "{field} names {named}"
    );
    assert_eq!(members(&mut g, &crew.name, false).await, before);

    // The group itself unknown.
    let st = assert_error(
        add(&mut g, &gname("missing"), &[&ann.name]).await,
        Code::NotFound,
        "GROUP_NOT_FOUND",
    );
    assert_eq!(
        resource(&st),
        ("users.v1.Group".to_owned(), gname("missing"))
    );
    assert_eq!(meta(&st, "name"), gname("missing"));
    assert_eq!(
        user_groups(&mut g, &ann.name, false).await,
        vec![crew.name.clone()]
    );

    // Members already in the group are skipped, new ones added.
    add(&mut g, &crew.name, &[&ann.name, &dan.name])
        .await
        .expect("old and new");
    assert_eq!(
        members(&mut g, &crew.name, false).await,
        vec![
            sub.name.clone(),
            ann.name.clone(),
            bob.name.clone(),
            cat.name.clone(),
            dan.name.clone()
        ]
    );
    assert_eq!(get_group(&mut g, &crew.name).await.expect("get"), crew);
}

async fn add_members_argument_errors(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let mut g = s.groups();
    let ann = new_user(&mut c, "ann").await;
    let crew = new_group(&mut g, "crew").await;
    // The same ids in another project.
    new_group_in(&mut g, OTHER, "crew").await;
    new_user_in(&mut c, OTHER, "ann", user("ann@example.com")).await;
    let foreign_user = format!("{OTHER}/users/ann");
    let foreign_group = format!("{OTHER}/groups/crew");

    let st = assert_error(
        add(&mut g, &crew.name, &[]).await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(bad_fields(&st), vec!["members"]);
    let many: Vec<String> = (0..1001).map(|i| uname(&format!("u{i}"))).collect();
    let st = assert_error(
        add(&mut g, &crew.name, &strs(&many)).await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(bad_fields(&st), vec!["members"]);

    // Members of another project.
    let st = assert_error(
        add(&mut g, &crew.name, &[&ann.name, &foreign_user]).await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(bad_fields(&st), vec!["members[1]"]);
    let st = assert_error(
        add(&mut g, &crew.name, &[&foreign_group]).await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(bad_fields(&st), vec!["members[0]"]);

    // Malformed names, all named at once.
    let st = assert_error(
        add(
            &mut g,
            &crew.name,
            &[
                "users/ann",
                ann.name.as_str(),
                "projects/acme/things/x",
                "projects/acme/users/Ann",
                "projects/acme/users/a/b",
                "",
            ],
        )
        .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(
        bad_fields(&st),
        vec![
            "members[0]",
            "members[2]",
            "members[3]",
            "members[4]",
            "members[5]"
        ]
    );
    assert!(
        members(&mut g, &crew.name, true).await.is_empty(),
        "nothing was added"
    );

    // Malformed group names.
    for bad in [
        "crew",
        "projects/acme/groups/Crew",
        "projects/acme/users/ann",
        "",
    ] {
        let st = assert_error(
            add(&mut g, bad, &[&ann.name]).await,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
        assert_eq!(bad_fields(&st), vec!["group"], "add {bad:?}");
        let st = assert_error(
            remove(&mut g, bad, &[&ann.name]).await,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
        assert_eq!(bad_fields(&st), vec!["group"], "remove {bad:?}");
    }

    // RemoveGroupMembers has the same limits.
    let st = assert_error(
        remove(&mut g, &crew.name, &[]).await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(bad_fields(&st), vec!["members"]);
    let st = assert_error(
        remove(&mut g, &crew.name, &strs(&many)).await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(bad_fields(&st), vec!["members"]);
    let st = assert_error(
        remove(&mut g, &crew.name, &[&foreign_user]).await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(bad_fields(&st), vec!["members[0]"]);

    // 1000 names are within the limit: unknown, not too many.
    let st = assert_error(
        add(&mut g, &crew.name, &strs(&many[..1000])).await,
        Code::NotFound,
        "MEMBER_NOT_FOUND",
    );
    assert_eq!(meta(&st, "field"), "members[0]");
    remove(&mut g, &crew.name, &strs(&many[..1000]))
        .await
        .expect("removing 1000 absent names");
    assert!(members(&mut g, &crew.name, true).await.is_empty());
}

async fn add_members_refuses_cycles(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let mut g = s.groups();
    let ann = new_user(&mut c, "ann").await;
    let a = new_group(&mut g, "a").await;
    let b = new_group(&mut g, "b").await;
    let cc = new_group(&mut g, "c").await;
    add(&mut g, &a.name, &[&b.name]).await.expect("a ⊃ b");
    add(&mut g, &b.name, &[&cc.name]).await.expect("b ⊃ c");

    let st = assert_error(
        add(&mut g, &b.name, &[&a.name]).await,
        Code::FailedPrecondition,
        "GROUP_CYCLE",
    );
    assert_eq!(meta(&st, "field"), "members[0]");
    assert_eq!(meta(&st, "name"), a.name);
    let d = st.get_error_details();
    let pf = d.precondition_failure().expect("a PreconditionFailure");
    assert!(!pf.violations.is_empty());

    // Through a nested group; the user of the same request is not added.
    let st = assert_error(
        add(&mut g, &cc.name, &[&ann.name, &a.name]).await,
        Code::FailedPrecondition,
        "GROUP_CYCLE",
    );
    assert_eq!(meta(&st, "field"), "members[1]");
    assert_eq!(meta(&st, "name"), a.name);
    assert!(members(&mut g, &cc.name, false).await.is_empty());

    // Into itself.
    for grp in [&a, &cc] {
        let st = assert_error(
            add(&mut g, &grp.name, &[&grp.name]).await,
            Code::FailedPrecondition,
            "GROUP_CYCLE",
        );
        assert_eq!(meta(&st, "field"), "members[0]");
    }
    assert_eq!(
        members(&mut g, &a.name, true).await,
        vec![b.name.clone(), cc.name.clone()]
    );
    assert!(members(&mut g, &cc.name, true).await.is_empty());

    // A group nested deeper may be nested directly too (no cycle).
    add(&mut g, &a.name, &[&cc.name]).await.expect("a ⊃ c too");
    add(&mut g, &cc.name, &[&ann.name]).await.expect("c ⊃ ann");
    assert_eq!(
        members(&mut g, &a.name, true).await,
        vec![b.name.clone(), cc.name.clone(), ann.name.clone()]
    );
    assert_eq!(
        members(&mut g, &a.name, false).await,
        vec![b.name.clone(), cc.name.clone()]
    );

    // Once a no longer contains c, c may contain a; then a may not contain b.
    remove(&mut g, &a.name, &[&b.name, &cc.name])
        .await
        .expect("remove");
    add(&mut g, &cc.name, &[&a.name])
        .await
        .expect("c ⊃ a once a no longer contains c");
    let st = assert_error(
        add(&mut g, &a.name, &[&b.name]).await,
        Code::FailedPrecondition,
        "GROUP_CYCLE",
    );
    assert_eq!(meta(&st, "name"), b.name);
    assert_eq!(
        members(&mut g, &b.name, true).await,
        vec![a.name.clone(), cc.name.clone(), ann.name.clone()]
    );
    assert_eq!(
        user_groups(&mut g, &ann.name, true).await,
        vec![b.name.clone(), cc.name.clone()]
    );
    for grp in [&a, &b, &cc] {
        assert!(
            !members(&mut g, &grp.name, true).await.contains(&grp.name),
            "{} contains itself",
            grp.name
        );
    }
}

async fn add_members_limits_nesting(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let mut g = s.groups();
    let ann = new_user(&mut c, "ann").await;
    let mut chain = Vec::new();
    for i in 0..9 {
        chain.push(new_group(&mut g, &format!("lvl-{i}")).await.name);
    }
    // 8 nestings, 9 groups: lvl-0 ⊃ lvl-1 ⊃ ... ⊃ lvl-8.
    for i in 0..8 {
        add(&mut g, &chain[i], &[&chain[i + 1]])
            .await
            .unwrap_or_else(|e| panic!("nesting {} of 8: {e:?}", i + 1));
    }
    assert_eq!(members(&mut g, &chain[0], true).await, chain[1..].to_vec());

    // A 9th nesting below the deepest group; the user of the same request
    // is not added either.
    let below = new_group(&mut g, "below").await;
    let st = assert_error(
        add(&mut g, &chain[8], &[&ann.name, &below.name]).await,
        Code::FailedPrecondition,
        "GROUP_TOO_DEEP",
    );
    assert_eq!(meta(&st, "field"), "members[1]");
    assert_eq!(meta(&st, "name"), below.name);
    assert_eq!(meta(&st, "depth"), "9");
    assert!(st.get_error_details().precondition_failure().is_some());
    assert!(members(&mut g, &chain[8], false).await.is_empty());

    // A 9th nesting above the top.
    let above = new_group(&mut g, "above").await;
    let st = assert_error(
        add(&mut g, &above.name, &[&chain[0]]).await,
        Code::FailedPrecondition,
        "GROUP_TOO_DEEP",
    );
    assert_eq!(meta(&st, "field"), "members[0]");
    assert_eq!(meta(&st, "name"), chain[0]);
    assert_eq!(meta(&st, "depth"), "9");
    assert!(members(&mut g, &above.name, false).await.is_empty());

    // In the middle: a chain of two hung under lvl-4 makes 4 + 1 + 1, under
    // lvl-7 it would make 7 + 1 + 1.
    let s0 = new_group(&mut g, "side-0").await;
    let s1 = new_group(&mut g, "side-1").await;
    add(&mut g, &s0.name, &[&s1.name])
        .await
        .expect("side-0 ⊃ side-1");
    add(&mut g, &chain[4], &[&s0.name])
        .await
        .expect("6 nestings deep");
    let st = assert_error(
        add(&mut g, &chain[7], &[&s0.name]).await,
        Code::FailedPrecondition,
        "GROUP_TOO_DEEP",
    );
    assert_eq!(meta(&st, "depth"), "9");
    assert_eq!(
        members(&mut g, &chain[7], false).await,
        vec![chain[8].clone()]
    );

    // Users may be members at the deepest level.
    add(&mut g, &chain[8], &[&ann.name])
        .await
        .expect("a user at the deepest level");
    assert!(members(&mut g, &chain[0], true).await.contains(&ann.name));
    assert_eq!(user_groups(&mut g, &ann.name, true).await, chain.clone());

    // Shortening the chain makes room above it.
    remove(&mut g, &chain[7], &[&chain[8]])
        .await
        .expect("remove lvl-8");
    add(&mut g, &above.name, &[&chain[0]])
        .await
        .expect("above ⊃ lvl-0 ⊃ ... ⊃ lvl-7: 8 nestings");
    let st = assert_error(
        add(&mut g, &chain[7], &[&chain[8]]).await,
        Code::FailedPrecondition,
        "GROUP_TOO_DEEP",
    );
    assert_eq!(meta(&st, "depth"), "9");
    assert!(members(&mut g, &chain[7], false).await.is_empty());
}

async fn add_a_thousand_members_at_once(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let mut g = s.groups();
    let users = batch_users(&mut c, "k", 1000).await;
    let names: Vec<String> = users.iter().map(|u| u.name.clone()).collect();
    let grp = new_group(&mut g, "thousand").await;
    assert_eq!(
        add(&mut g, &grp.name, &strs(&names))
            .await
            .expect("1000 members in one call"),
        grp
    );

    let pages = member_pages(&mut g, &grp.name, false, 300).await;
    assert_eq!(
        pages.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![300, 300, 300, 100]
    );
    let listed: Vec<String> = pages.concat().into_iter().map(|m| m.name).collect();
    assert_eq!(listed, sorted(names.clone()), "every member once, by id");
    assert_eq!(
        members_with(&mut g, &grp.name, true, 1000).await,
        listed,
        "transitive: the same"
    );
    assert_eq!(
        count_users(&mut c, "groups:\"thousand\"", false).await,
        1000
    );

    // Again: idempotent.
    add(&mut g, &grp.name, &strs(&names))
        .await
        .expect("the same 1000 again");
    assert_eq!(members_with(&mut g, &grp.name, false, 1000).await, listed);
    assert_eq!(
        user_groups(&mut g, &names[500], false).await,
        vec![grp.name.clone()]
    );

    // And all removed at once.
    assert_eq!(
        remove(&mut g, &grp.name, &strs(&names))
            .await
            .expect("remove 1000"),
        grp
    );
    assert!(members(&mut g, &grp.name, true).await.is_empty());
    assert_eq!(count_users(&mut c, "groups:\"thousand\"", false).await, 0);
}

// ------------------------------------------------------- RemoveGroupMembers

async fn remove_members(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let mut g = s.groups();
    let ann = new_user(&mut c, "ann").await;
    let bob = new_user(&mut c, "bob").await;
    let cat = new_user(&mut c, "cat").await;
    let top = new_group(&mut g, "top").await;
    let sub = new_group(&mut g, "sub").await;
    let unrelated = new_group(&mut g, "unrelated").await;
    add(&mut g, &top.name, &[&sub.name, &ann.name, &bob.name])
        .await
        .expect("top");
    add(&mut g, &sub.name, &[&ann.name]).await.expect("sub");
    add(&mut g, &unrelated.name, &[&ann.name])
        .await
        .expect("unrelated");

    // Names that are not members, or do not exist at all, are skipped.
    let back = remove(
        &mut g,
        &top.name,
        &[
            &ann.name,
            &cat.name,
            &uname("ghost"),
            &gname("nowhere"),
            &unrelated.name,
        ],
    )
    .await
    .expect("remove");
    assert_eq!(back, top, "RemoveGroupMembers returns the group, unchanged");
    assert_eq!(
        members(&mut g, &top.name, false).await,
        vec![sub.name.clone(), bob.name.clone()]
    );
    // Only the direct membership went: ann is still in top through sub.
    assert_eq!(
        members(&mut g, &top.name, true).await,
        vec![sub.name.clone(), ann.name.clone(), bob.name.clone()]
    );
    assert_eq!(
        user_groups(&mut g, &ann.name, false).await,
        vec![sub.name.clone(), unrelated.name.clone()]
    );
    assert_eq!(
        user_groups(&mut g, &ann.name, true).await,
        vec![sub.name.clone(), top.name.clone(), unrelated.name.clone()]
    );
    assert_eq!(
        users_in(&mut c, "groups:\"top\"", false).await,
        unames(&["ann", "bob"])
    );
    remove(&mut g, &top.name, &[&ann.name])
        .await
        .expect("removing again is fine");

    // Removing the nested group ends the membership through it.
    remove(&mut g, &top.name, &[&sub.name])
        .await
        .expect("remove sub");
    assert_eq!(
        members(&mut g, &top.name, true).await,
        vec![bob.name.clone()]
    );
    assert_eq!(
        user_groups(&mut g, &ann.name, true).await,
        vec![sub.name.clone(), unrelated.name.clone()]
    );
    assert_eq!(
        users_in(&mut c, "groups:\"top\"", false).await,
        vec![bob.name.clone()]
    );
    assert_eq!(
        members(&mut g, &sub.name, false).await,
        vec![ann.name.clone()],
        "sub keeps its own members"
    );
    assert_eq!(get_group(&mut g, &sub.name).await.expect("sub exists"), sub);

    // Repeats in one request.
    remove(&mut g, &top.name, &[&bob.name, &bob.name])
        .await
        .expect("repeats");
    assert!(members(&mut g, &top.name, true).await.is_empty());
    assert_eq!(
        get(&mut c, &bob.name).await.expect("bob exists").etag,
        bob.etag,
        "members are never touched"
    );

    // An unknown group.
    let st = assert_error(
        remove(&mut g, &gname("missing"), &[&ann.name]).await,
        Code::NotFound,
        "GROUP_NOT_FOUND",
    );
    assert_eq!(meta(&st, "name"), gname("missing"));
    assert_eq!(
        members(&mut g, &unrelated.name, false).await,
        vec![ann.name.clone()]
    );
}

// --------------------------------------------------------- ListGroupMembers

async fn list_members_order_transitivity_and_paging(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let mut g = s.groups();
    // Created in an order unlike their ids.
    for id in ["zed", "amy", "mia", "bo"] {
        new_user(&mut c, id).await;
    }
    for id in ["top", "sub-b", "sub-a", "leaf-c"] {
        new_group(&mut g, id).await;
    }
    // A diamond: top ⊃ sub-a, sub-b; both ⊃ mia and leaf-c.
    add(
        &mut g,
        &gname("top"),
        &[
            &uname("zed"),
            &gname("sub-b"),
            &uname("amy"),
            &gname("sub-a"),
        ],
    )
    .await
    .expect("top");
    add(&mut g, &gname("sub-a"), &[&uname("mia"), &gname("leaf-c")])
        .await
        .expect("sub-a");
    add(
        &mut g,
        &gname("sub-b"),
        &[&gname("leaf-c"), &uname("mia"), &uname("bo")],
    )
    .await
    .expect("sub-b");
    add(&mut g, &gname("leaf-c"), &[&uname("zed"), &uname("amy")])
        .await
        .expect("leaf-c");

    // Direct: groups first, then users, each by id.
    let direct = member_pages(&mut g, &gname("top"), false, 0).await.concat();
    let want_direct = vec![gname("sub-a"), gname("sub-b"), uname("amy"), uname("zed")];
    assert_eq!(
        direct.iter().map(|m| m.name.clone()).collect::<Vec<_>>(),
        want_direct
    );
    assert_eq!(
        direct.iter().map(|m| m.kind).collect::<Vec<_>>(),
        vec![GROUP, GROUP, USER, USER]
    );
    for size in [1, 2, 3] {
        assert_eq!(
            members_with(&mut g, &gname("top"), false, size).await,
            want_direct,
            "direct, pages of {size}"
        );
    }

    // Transitive: everything reachable, each once.
    let want = vec![
        gname("leaf-c"),
        gname("sub-a"),
        gname("sub-b"),
        uname("amy"),
        uname("bo"),
        uname("mia"),
        uname("zed"),
    ];
    for size in [0, 1, 2, 3, 1000] {
        let pages = member_pages(&mut g, &gname("top"), true, size).await;
        let flat = pages.concat();
        assert_eq!(
            flat.iter().map(|m| m.name.clone()).collect::<Vec<_>>(),
            want,
            "transitive, pages of {size}"
        );
        assert_eq!(
            flat.iter().map(|m| m.kind).collect::<Vec<_>>(),
            vec![GROUP, GROUP, GROUP, USER, USER, USER, USER],
            "pages of {size}"
        );
        if size == 1 {
            assert_eq!(pages.len(), 7);
            assert!(pages.iter().all(|p| p.len() == 1));
        }
    }
    assert_eq!(
        members(&mut g, &gname("sub-a"), true).await,
        vec![gname("leaf-c"), uname("amy"), uname("mia"), uname("zed")]
    );
    assert_eq!(
        members(&mut g, &gname("leaf-c"), true).await,
        vec![uname("amy"), uname("zed")]
    );

    // Byte order of ids, not a locale's: `-` < digits < letters.
    for id in ["na", "n-b", "n0", "n9z"] {
        new_user(&mut c, id).await;
    }
    for id in ["ma", "m-b", "m0"] {
        new_group(&mut g, id).await;
    }
    let bytes = new_group(&mut g, "bytes").await;
    add(
        &mut g,
        &bytes.name,
        &[
            &uname("na"),
            &gname("ma"),
            &uname("n-b"),
            &gname("m-b"),
            &uname("n0"),
            &gname("m0"),
            &uname("n9z"),
        ],
    )
    .await
    .expect("bytes");
    let want_bytes = vec![
        gname("m-b"),
        gname("m0"),
        gname("ma"),
        uname("n-b"),
        uname("n0"),
        uname("n9z"),
        uname("na"),
    ];
    assert_eq!(
        members_with(&mut g, &bytes.name, false, 1).await,
        want_bytes
    );
    assert_eq!(members_with(&mut g, &bytes.name, true, 2).await, want_bytes);
    for id in ["ma", "m-b", "m0"] {
        add(&mut g, &gname(id), &[&uname("na")])
            .await
            .expect("na into m*");
    }
    let na_groups = vec![gname("bytes"), gname("m-b"), gname("m0"), gname("ma")];
    assert_eq!(
        user_groups_with(&mut g, &uname("na"), false, 1)
            .await
            .concat()
            .iter()
            .map(|x| x.name.clone())
            .collect::<Vec<_>>(),
        na_groups
    );
    assert_eq!(user_groups(&mut g, &uname("na"), true).await, na_groups);

    // Page tokens belong to their group and `transitive`.
    let first = member_page(&mut g, &gname("top"), false, 1, "")
        .await
        .expect("page");
    assert_eq!(first.members.len(), 1);
    let token = first.next_page_token;
    assert!(!token.is_empty());
    let rest = member_page(&mut g, &gname("top"), false, 5, &token)
        .await
        .expect("another page_size is fine");
    assert_eq!(
        rest.members
            .iter()
            .map(|m| m.name.clone())
            .collect::<Vec<_>>(),
        want_direct[1..].to_vec()
    );
    assert!(rest.next_page_token.is_empty());
    let st = assert_error(
        member_page(&mut g, &gname("top"), true, 1, &token).await,
        Code::InvalidArgument,
        "INVALID_PAGE_TOKEN",
    );
    assert_eq!(meta(&st, "field"), "page_token");
    assert_error(
        member_page(&mut g, &gname("sub-a"), false, 1, &token).await,
        Code::InvalidArgument,
        "INVALID_PAGE_TOKEN",
    );
    assert_error(
        member_page(&mut g, &gname("top"), false, 1, "garbage").await,
        Code::InvalidArgument,
        "INVALID_PAGE_TOKEN",
    );

    let st = assert_error(
        member_page(&mut g, &gname("top"), false, -1, "").await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(bad_fields(&st), vec!["page_size"]);
    let st = assert_error(
        member_page(&mut g, &gname("missing"), true, 0, "").await,
        Code::NotFound,
        "GROUP_NOT_FOUND",
    );
    assert_eq!(resource(&st).1, gname("missing"));
    let st = assert_error(
        member_page(&mut g, "top", false, 0, "").await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(bad_fields(&st), vec!["group"]);
    // An empty group: no members, no token.
    let empty = new_group(&mut g, "empty").await;
    let page = member_page(&mut g, &empty.name, true, 0, "")
        .await
        .expect("empty");
    assert!(page.members.is_empty() && page.next_page_token.is_empty());
}

// ------------------------------------------------------ members' lifecycle

async fn soft_deleted_users_stay_members(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let mut g = s.groups();
    let ann = new_user(&mut c, "ann").await;
    let bob = new_user(&mut c, "bob").await;
    let team = new_group(&mut g, "team").await;
    let sub = new_group(&mut g, "sub").await;
    add(&mut g, &team.name, &[&sub.name, &ann.name])
        .await
        .expect("team");
    add(&mut g, &sub.name, &[&bob.name]).await.expect("sub");

    let deleted = delete_user(&mut c, &bob.name, false)
        .await
        .expect("soft delete");
    assert_eq!(deleted.state, pb::user::State::Deleted as i32);

    // Not listed as a member, directly or through sub.
    assert!(members(&mut g, &sub.name, false).await.is_empty());
    assert!(members(&mut g, &sub.name, true).await.is_empty());
    assert_eq!(
        members(&mut g, &team.name, true).await,
        vec![sub.name.clone(), ann.name.clone()]
    );
    // Not matched by groups:"g" unless show_deleted.
    assert_eq!(
        users_in(&mut c, "groups:\"team\"", false).await,
        vec![ann.name.clone()]
    );
    assert_eq!(
        users_in(&mut c, "groups:\"team\"", true).await,
        unames(&["ann", "bob"])
    );
    assert!(users_in(&mut c, "groups:\"sub\"", false).await.is_empty());
    assert_eq!(
        users_in(&mut c, "groups:\"sub\"", true).await,
        vec![bob.name.clone()]
    );
    assert_eq!(count_users(&mut c, "groups:\"team\"", false).await, 1);
    assert_eq!(count_users(&mut c, "groups:\"team\"", true).await, 2);
    assert!(
        search_all(&mut c, "bob", "groups:\"team\"", false)
            .await
            .is_empty()
    );
    assert_eq!(
        search_all(&mut c, "bob", "groups:\"team\"", true).await,
        vec![bob.name.clone()]
    );
    // It keeps its memberships.
    assert_eq!(
        user_groups(&mut g, &bob.name, false).await,
        vec![sub.name.clone()]
    );
    assert_eq!(
        user_groups(&mut g, &bob.name, true).await,
        vec![sub.name.clone(), team.name.clone()]
    );

    // Undeleted: a member again.
    undelete_user(&mut c, &bob.name).await.expect("undelete");
    assert_eq!(
        members(&mut g, &sub.name, false).await,
        vec![bob.name.clone()]
    );
    assert_eq!(
        members(&mut g, &team.name, true).await,
        vec![sub.name.clone(), ann.name.clone(), bob.name.clone()]
    );
    assert_eq!(
        users_in(&mut c, "groups:\"team\"", false).await,
        unames(&["ann", "bob"])
    );
    assert_eq!(count_users(&mut c, "groups:\"sub\"", false).await, 1);

    // A soft-deleted member can be removed; undeleting does not bring that
    // membership back.
    delete_user(&mut c, &bob.name, false)
        .await
        .expect("soft delete again");
    remove(&mut g, &sub.name, &[&bob.name])
        .await
        .expect("remove a soft-deleted member");
    assert!(user_groups(&mut g, &bob.name, true).await.is_empty());
    undelete_user(&mut c, &bob.name)
        .await
        .expect("undelete again");
    assert!(members(&mut g, &sub.name, true).await.is_empty());
    assert!(user_groups(&mut g, &bob.name, true).await.is_empty());
    assert_eq!(
        users_in(&mut c, "groups:\"team\"", true).await,
        vec![ann.name.clone()]
    );
}

async fn erased_users_lose_their_memberships(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let mut g = s.groups();
    let ann = new_user(&mut c, "ann").await;
    let bob = new_user(&mut c, "bob").await;
    let cat = new_user(&mut c, "cat").await;
    let team = new_group(&mut g, "team").await;
    let sub = new_group(&mut g, "sub").await;
    add(
        &mut g,
        &team.name,
        &[&sub.name, &ann.name, &bob.name, &cat.name],
    )
    .await
    .expect("team");
    add(&mut g, &sub.name, &[&bob.name, &cat.name])
        .await
        .expect("sub");

    delete_user(&mut c, &bob.name, true)
        .await
        .expect("erase bob");
    assert_error(
        get(&mut c, &bob.name).await,
        Code::NotFound,
        "USER_NOT_FOUND",
    );
    for transitive in [false, true] {
        assert_error(
            user_group_page(&mut g, &bob.name, transitive, 0, "").await,
            Code::NotFound,
            "USER_NOT_FOUND",
        );
    }
    assert_eq!(
        members(&mut g, &team.name, false).await,
        vec![sub.name.clone(), ann.name.clone(), cat.name.clone()]
    );
    assert_eq!(
        members(&mut g, &sub.name, true).await,
        vec![cat.name.clone()]
    );
    assert_eq!(
        users_in(&mut c, "groups:\"team\"", true).await,
        unames(&["ann", "cat"])
    );
    assert_eq!(count_users(&mut c, "groups:\"sub\"", true).await, 1);
    assert_error(
        undelete_user(&mut c, &bob.name).await,
        Code::NotFound,
        "USER_NOT_FOUND",
    );

    // Soft-deleted first, then erased: the same.
    delete_user(&mut c, &cat.name, false)
        .await
        .expect("soft delete cat");
    delete_user(&mut c, &cat.name, true)
        .await
        .expect("erase cat");
    assert_eq!(
        members(&mut g, &team.name, false).await,
        vec![sub.name.clone(), ann.name.clone()]
    );
    assert!(members(&mut g, &sub.name, true).await.is_empty());
    assert_eq!(
        users_in(&mut c, "groups:\"team\"", true).await,
        vec![ann.name.clone()]
    );
    assert_error(
        user_group_page(&mut g, &cat.name, true, 0, "").await,
        Code::NotFound,
        "USER_NOT_FOUND",
    );

    // A new user with the same id is a new user: none of the old
    // memberships.
    let bob2 = new_user(&mut c, "bob").await;
    assert_eq!(bob2.name, bob.name);
    assert!(user_groups(&mut g, &bob2.name, true).await.is_empty());
    let cat2 = new_user(&mut c, "cat").await;
    assert!(user_groups(&mut g, &cat2.name, true).await.is_empty());
    assert_eq!(
        members(&mut g, &team.name, true).await,
        vec![sub.name.clone(), ann.name.clone()]
    );
    assert!(members(&mut g, &sub.name, true).await.is_empty());
    assert_eq!(count_users(&mut c, "groups:\"team\"", true).await, 1);
    // It can join like anyone.
    add(&mut g, &sub.name, &[&bob2.name])
        .await
        .expect("add the new bob");
    assert_eq!(
        user_groups(&mut g, &bob2.name, true).await,
        vec![sub.name.clone(), team.name.clone()]
    );
}

// ----------------------------------------------------------- ListUserGroups

async fn list_user_groups(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let mut g = s.groups();
    let ann = new_user(&mut c, "ann").await;
    let loner = new_user(&mut c, "loner").await;
    // Created in an order unlike their ids.
    let gd = new_group(&mut g, "grp-d").await;
    let gc = new_group(&mut g, "grp-c").await;
    let gb = new_group(&mut g, "grp-b").await;
    let ga = new_group(&mut g, "grp-a").await;
    // ann in c, c in b, b in a.
    add(&mut g, &gc.name, &[&ann.name]).await.expect("c");
    add(&mut g, &gb.name, &[&gc.name]).await.expect("b");
    add(&mut g, &ga.name, &[&gb.name]).await.expect("a");
    assert_eq!(
        user_groups_with(&mut g, &ann.name, false, 0).await.concat(),
        vec![gc.clone()],
        "direct: whole groups"
    );
    assert_eq!(
        user_groups_with(&mut g, &ann.name, true, 0).await.concat(),
        vec![ga.clone(), gb.clone(), gc.clone()],
        "transitive, by id"
    );

    // A second way up: ann in d, d in a; a is listed once.
    add(&mut g, &ga.name, &[&gd.name]).await.expect("a ⊃ d");
    add(&mut g, &gd.name, &[&ann.name]).await.expect("d ⊃ ann");
    let direct = vec![gc.clone(), gd.clone()];
    let transitive = vec![ga.clone(), gb.clone(), gc.clone(), gd.clone()];
    assert_eq!(
        user_groups_with(&mut g, &ann.name, false, 0).await.concat(),
        direct
    );
    let pages = user_groups_with(&mut g, &ann.name, true, 1).await;
    assert_eq!(pages.len(), 4);
    assert!(pages.iter().all(|p| p.len() == 1));
    assert_eq!(pages.concat(), transitive);
    assert_eq!(
        user_groups_with(&mut g, &ann.name, false, 1).await.concat(),
        direct
    );
    assert_eq!(
        user_groups_with(&mut g, &ann.name, true, 3).await.concat(),
        transitive
    );

    // Page tokens belong to their user and `transitive`.
    let page = user_group_page(&mut g, &ann.name, false, 1, "")
        .await
        .expect("page");
    assert_eq!(names_of(&page.groups), vec![gc.name.clone()]);
    let token = page.next_page_token;
    assert!(!token.is_empty());
    let rest = user_group_page(&mut g, &ann.name, false, 10, &token)
        .await
        .expect("continue");
    assert_eq!(names_of(&rest.groups), vec![gd.name.clone()]);
    assert!(rest.next_page_token.is_empty());
    let st = assert_error(
        user_group_page(&mut g, &ann.name, true, 1, &token).await,
        Code::InvalidArgument,
        "INVALID_PAGE_TOKEN",
    );
    assert_eq!(meta(&st, "field"), "page_token");
    assert_error(
        user_group_page(&mut g, &loner.name, false, 1, &token).await,
        Code::InvalidArgument,
        "INVALID_PAGE_TOKEN",
    );
    assert_error(
        user_group_page(&mut g, &ann.name, false, 1, "garbage").await,
        Code::InvalidArgument,
        "INVALID_PAGE_TOKEN",
    );

    // No groups: an empty answer.
    let none = user_group_page(&mut g, &loner.name, true, 0, "")
        .await
        .expect("no groups");
    assert!(none.groups.is_empty() && none.next_page_token.is_empty());
    // The same id in another project is another user.
    let twin = new_user_in(&mut c, OTHER, "ann", user("ann@example.com")).await;
    assert!(
        user_group_page(&mut g, &twin.name, true, 0, "")
            .await
            .expect("other's ann")
            .groups
            .is_empty()
    );

    // Errors.
    for transitive in [false, true] {
        let st = assert_error(
            user_group_page(&mut g, &uname("ghost"), transitive, 0, "").await,
            Code::NotFound,
            "USER_NOT_FOUND",
        );
        assert_eq!(meta(&st, "name"), uname("ghost"));
    }
    for bad in [
        "ann",
        "projects/acme/users/Ann",
        "projects/acme/groups/grp-a",
        "",
    ] {
        let st = assert_error(
            user_group_page(&mut g, bad, false, 0, "").await,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
        assert_eq!(bad_fields(&st), vec!["user"], "{bad:?}");
    }
    let st = assert_error(
        user_group_page(&mut g, &ann.name, false, -1, "").await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(bad_fields(&st), vec!["page_size"]);
}

// ------------------------------------------------ groups:"g" in UserService

async fn groups_filter_in_user_queries(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let mut g = s.groups();
    new_user_with(&mut c, "ann", person("ann@a.example", "Ann", "Smith")).await;
    new_user_with(&mut c, "bob", person("bob@b.example", "Bob", "Smith")).await;
    new_user_with(&mut c, "cat", person("cat@b.example", "Cat", "Smith")).await;
    new_user_with(&mut c, "dan", person("dan@b.example", "Dan", "Jones")).await;
    new_user_with(&mut c, "eve", person("eve@a.example", "Eve", "Smith")).await;
    for id in ["team", "sub", "deep", "ops", "empty"] {
        new_group(&mut g, id).await;
    }
    // team ⊃ ann, sub; sub ⊃ bob, deep; deep ⊃ eve; ops ⊃ cat.
    add(&mut g, &gname("team"), &[&uname("ann"), &gname("sub")])
        .await
        .expect("team");
    add(&mut g, &gname("sub"), &[&uname("bob"), &gname("deep")])
        .await
        .expect("sub");
    add(&mut g, &gname("deep"), &[&uname("eve")])
        .await
        .expect("deep");
    add(&mut g, &gname("ops"), &[&uname("cat")])
        .await
        .expect("ops");
    // Another project has a `team` too, with a user of its own.
    let zoe = new_user_in(
        &mut c,
        OTHER,
        "zoe",
        person("zoe@a.example", "Zoe", "Smith"),
    )
    .await;
    new_group_in(&mut g, OTHER, "team").await;
    add(&mut g, &format!("{OTHER}/groups/team"), &[&zoe.name])
        .await
        .expect("other's team");

    let everyone = vec!["ann", "bob", "cat", "dan", "eve"];
    let cases: Vec<(&str, Vec<&str>)> = vec![
        ("groups:\"team\"", vec!["ann", "bob", "eve"]),
        ("groups:team", vec!["ann", "bob", "eve"]),
        ("groups:\"sub\"", vec!["bob", "eve"]),
        ("groups:\"deep\"", vec!["eve"]),
        (
            "groups:\"projects/acme/groups/team\"",
            vec!["ann", "bob", "eve"],
        ),
        ("groups:\"team\" AND email = \"*@b.example\"", vec!["bob"]),
        (
            "groups:\"sub\" OR groups:\"ops\"",
            vec!["bob", "cat", "eve"],
        ),
        ("NOT groups:\"team\"", vec!["cat", "dan"]),
        (
            "NOT groups:\"team\" AND email = \"*@b.example\"",
            vec!["cat", "dan"],
        ),
        ("groups:\"team\" AND NOT groups:\"sub\"", vec!["ann"]),
        ("groups:\"team\" AND groups:\"ops\"", vec![]),
        ("display_name = \"Eve\" AND groups:\"team\"", vec!["eve"]),
        (
            "groups:\"ops\" OR family_name = \"Jones\"",
            vec!["cat", "dan"],
        ),
        ("groups:\"empty\"", vec![]),
        ("groups:\"nosuch\"", vec![]),
        ("NOT groups:\"nosuch\"", everyone.clone()),
        ("groups:\"projects/other/groups/team\"", vec![]),
        ("groups:\"projects/other/groups/nosuch\"", vec![]),
    ];
    for (filter, want) in &cases {
        let want = unames(want);
        assert_eq!(
            users_in(&mut c, filter, false).await,
            want,
            "ListUsers {filter}"
        );
        assert_eq!(
            count_users(&mut c, filter, false).await,
            want.len() as i64,
            "CountUsers {filter}"
        );
        assert_eq!(
            sorted(
                stream_all(&mut c, filter)
                    .await
                    .unwrap_or_else(|e| panic!("StreamUsers {filter}: {e:?}"))
            ),
            want,
            "StreamUsers {filter}"
        );
        // Every user but dan has the family name Smith.
        let smiths: Vec<String> = want
            .iter()
            .filter(|n| **n != uname("dan"))
            .cloned()
            .collect();
        assert_eq!(
            search_all(&mut c, "smi", filter, false).await,
            smiths,
            "SearchUsers smi {filter}"
        );
    }
    assert_eq!(
        search_all(&mut c, "bo", "groups:\"team\"", false).await,
        vec![uname("bob")]
    );

    // Pages of one, in the default order (newest first).
    assert_eq!(
        list_users_all(&mut c, "groups:\"team\"", false, 1)
            .await
            .expect("pages of one"),
        vec![uname("eve"), uname("bob"), uname("ann")]
    );
    // A user reached through several of the groups is matched once.
    add(&mut g, &gname("sub"), &[&uname("ann")])
        .await
        .expect("ann into sub too");
    add(&mut g, &gname("deep"), &[&uname("ann"), &uname("bob")])
        .await
        .expect("ann and bob into deep too");
    let filter = "groups:\"team\"";
    let want = unames(&["ann", "bob", "eve"]);
    assert_eq!(users_in(&mut c, filter, false).await, want);
    assert_eq!(
        sorted(
            list_users_all(&mut c, filter, false, 1)
                .await
                .expect("pages of one")
        ),
        want
    );
    assert_eq!(count_users(&mut c, filter, false).await, 3);
    assert_eq!(
        sorted(stream_all(&mut c, filter).await.expect("stream")),
        want
    );
    assert_eq!(search_all(&mut c, "smi", filter, false).await, want);
    remove(&mut g, &gname("sub"), &[&uname("ann")])
        .await
        .expect("remove ann from sub");
    remove(&mut g, &gname("deep"), &[&uname("ann"), &uname("bob")])
        .await
        .expect("remove ann and bob from deep");

    // Membership follows the groups as they change.
    remove(&mut g, &gname("sub"), &[&gname("deep")])
        .await
        .expect("remove deep from sub");
    assert_eq!(
        users_in(&mut c, "groups:\"team\"", false).await,
        unames(&["ann", "bob"])
    );
    add(&mut g, &gname("ops"), &[&gname("team")])
        .await
        .expect("ops ⊃ team");
    assert_eq!(
        users_in(&mut c, "groups:\"ops\"", false).await,
        unames(&["ann", "bob", "cat"])
    );
    assert_eq!(count_users(&mut c, "groups:\"ops\"", false).await, 3);
}

async fn groups_filter_errors(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let mut g = s.groups();
    new_group(&mut g, "team").await;
    for filter in [
        "groups:\"Bad!\"",
        "groups = \"team\"",
        "groups != \"team\"",
        "groups:\"team*\"",
        "groups:*",
        "groups:\"\"",
        "groups:\"projects/acme/groups/Bad!\"",
        "groups.x = \"y\"",
    ] {
        let st = assert_error(
            c.list_users(pb::ListUsersRequest {
                parent: PROJECT.into(),
                filter: filter.into(),
                ..Default::default()
            })
            .await,
            Code::InvalidArgument,
            "INVALID_FILTER",
        );
        assert_eq!(meta(&st, "field"), "filter", "{filter}");
        assert_error(
            c.count_users(pb::CountUsersRequest {
                parent: PROJECT.into(),
                filter: filter.into(),
                show_deleted: false,
            })
            .await,
            Code::InvalidArgument,
            "INVALID_FILTER",
        );
        assert_error(
            c.search_users(pb::SearchUsersRequest {
                parent: PROJECT.into(),
                query: "a".into(),
                filter: filter.into(),
                ..Default::default()
            })
            .await,
            Code::InvalidArgument,
            "INVALID_FILTER",
        );
        assert_error(
            stream_all(&mut c, filter).await,
            Code::InvalidArgument,
            "INVALID_FILTER",
        );
    }
}

async fn groups_filter_on_a_group_of_2100(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let mut g = s.groups();
    let users = batch_users(&mut c, "big", 2100).await;
    let names: Vec<String> = users.iter().map(|u| u.name.clone()).collect();
    let mut outsiders = Vec::new();
    for i in 0..5 {
        outsiders.push(create(&mut c, user(&format!("outsider{i}@example.com"))).await);
    }
    let big = new_group(&mut g, "big").await;
    for part in names.chunks(1000) {
        add(&mut g, &big.name, &strs(part))
            .await
            .expect("add up to 1000");
    }
    let small = new_group(&mut g, "small").await;
    add(
        &mut g,
        &small.name,
        &[&outsiders[0].name, &outsiders[1].name, &names[0]],
    )
    .await
    .expect("small");
    let outer = new_group(&mut g, "outer").await;
    add(&mut g, &outer.name, &[&big.name, &small.name])
        .await
        .expect("outer");

    // ListUsers in pages of 1000: every member once.
    let mut pages: Vec<Vec<String>> = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_users(pb::ListUsersRequest {
                parent: PROJECT.into(),
                filter: "groups:\"big\"".into(),
                page_size: 1000,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .expect("ListUsers groups:big")
            .into_inner();
        pages.push(page.users.into_iter().map(|u| u.name).collect());
        if page.next_page_token.is_empty() {
            break;
        }
        assert!(pages.len() < 10, "ListUsers never ends");
        token = page.next_page_token;
    }
    assert_eq!(
        pages.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![1000, 1000, 100]
    );
    let listed = pages.concat();
    assert_eq!(
        listed.iter().collect::<BTreeSet<_>>().len(),
        2100,
        "no user twice"
    );
    assert_eq!(sorted(listed), sorted(names.clone()));
    assert_eq!(count_users(&mut c, "groups:\"big\"", false).await, 2100);

    // Through nesting: big's 2100 and small's two others.
    let mut want_outer = names.clone();
    want_outer.push(outsiders[0].name.clone());
    want_outer.push(outsiders[1].name.clone());
    assert_eq!(count_users(&mut c, "groups:\"outer\"", false).await, 2102);
    assert_eq!(
        sorted(
            list_users_all(&mut c, "groups:\"outer\"", false, 1000)
                .await
                .expect("ListUsers groups:outer")
        ),
        sorted(want_outer)
    );
    assert_eq!(count_users(&mut c, "groups:\"small\"", false).await, 3);
    assert_eq!(count_users(&mut c, "NOT groups:\"big\"", false).await, 5);
    assert_eq!(count_users(&mut c, "NOT groups:\"outer\"", false).await, 3);

    // Combined with another term.
    let prefixed: Vec<String> = users
        .iter()
        .filter(|u| u.email.starts_with("big20"))
        .map(|u| u.name.clone())
        .collect();
    assert_eq!(prefixed.len(), 111);
    let filter = "groups:\"big\" AND email = \"big20*\"";
    assert_eq!(count_users(&mut c, filter, false).await, 111);
    assert_eq!(
        sorted(
            list_users_all(&mut c, filter, false, 50)
                .await
                .expect("combined")
        ),
        sorted(prefixed)
    );

    // StreamUsers exports the same.
    let streamed = stream_all(&mut c, "groups:\"big\"")
        .await
        .expect("StreamUsers groups:big");
    assert_eq!(streamed.len(), 2100);
    assert_eq!(sorted(streamed), sorted(names.clone()));

    // A soft-deleted member leaves the count unless show_deleted.
    delete_user(&mut c, &names[7], false)
        .await
        .expect("soft delete");
    assert_eq!(count_users(&mut c, "groups:\"big\"", false).await, 2099);
    assert_eq!(count_users(&mut c, "groups:\"big\"", true).await, 2100);
}

// ------------------------------------------------------------ authorization

async fn group_rpcs_need_their_scopes(e: Engine) {
    let keys = AuthKeys::new();
    let s = TestServer::start_authed(e, &keys).await;
    let mut c = s.client();
    let mut admin = s.groups();
    let ann = create(&mut c, user("ann@example.com")).await;
    let ann_id = ann.name.rsplit('/').next().expect("an id").to_owned();
    let team = new_group(&mut admin, "team").await;
    add(&mut admin, &team.name, &[&ann.name])
        .await
        .expect("add");
    let reads = [
        "GetGroup",
        "ListGroups",
        "ListGroupMembers",
        "ListUserGroups",
    ];

    // users.read: the reads, none of the writes.
    let read_token = keys.token(&["acme"], "users.read");
    let mut r = s.groups_with(Some(&read_token));
    for (rpc, outcome) in every_group_rpc(&mut r, "acme", "team", &ann_id).await {
        if reads.contains(&rpc) {
            outcome.unwrap_or_else(|st| panic!("{rpc} with users.read: {st:?}"));
        } else {
            let st = outcome.expect_err(rpc);
            assert_eq!(st.code(), Code::PermissionDenied, "{rpc}: {st:?}");
            assert_eq!(reason(&st), "SCOPE_MISSING", "{rpc}");
            assert_eq!(meta(&st, "scope"), "users.write", "{rpc}");
        }
    }
    assert_eq!(get_group(&mut r, &team.name).await.expect("get"), team);
    assert_eq!(
        members(&mut r, &team.name, true).await,
        vec![ann.name.clone()]
    );
    assert_eq!(
        user_groups(&mut r, &ann.name, true).await,
        vec![team.name.clone()]
    );
    assert_eq!(
        names_of(&list_groups_all(&mut r, "", "", 0).await.expect("list")),
        vec![team.name.clone()],
        "the refused CreateGroup stored nothing"
    );
    assert_eq!(get_group(&mut admin, &team.name).await.expect("get"), team);
    assert_eq!(
        members(&mut admin, &team.name, false).await,
        vec![ann.name.clone()]
    );

    // users.write: the writes, none of the reads.
    let write_token = keys.token(&["acme"], "users.write");
    let mut w = s.groups_with(Some(&write_token));
    for (rpc, outcome) in every_group_rpc(&mut w, "acme", "nosuch", "nobody").await {
        if reads.contains(&rpc) {
            let st = outcome.expect_err(rpc);
            assert_eq!(st.code(), Code::PermissionDenied, "{rpc}: {st:?}");
            assert_eq!(reason(&st), "SCOPE_MISSING", "{rpc}");
            assert_eq!(meta(&st, "scope"), "users.read", "{rpc}");
        } else if let Err(st) = outcome {
            assert_ne!(st.code(), Code::PermissionDenied, "{rpc}: {st:?}");
            assert_ne!(st.code(), Code::Unauthenticated, "{rpc}: {st:?}");
        }
    }
    let bob = create(&mut c, user("bob@example.com")).await;
    add(&mut w, &team.name, &[&bob.name])
        .await
        .expect("users.write adds members");
    assert_eq!(
        members(&mut admin, &team.name, false).await,
        sorted(vec![ann.name.clone(), bob.name.clone()])
    );

    // With every scope, the same calls succeed: the refusals above were
    // about scopes only.
    for (rpc, outcome) in every_group_rpc(&mut admin, "acme", "team", &ann_id).await {
        outcome.unwrap_or_else(|st| panic!("{rpc} with every scope: {st:?}"));
    }
}

async fn group_rpcs_are_confined_to_granted_projects(e: Engine) {
    let keys = AuthKeys::new();
    let s = TestServer::start_authed(e, &keys).await;
    let mut c = s.client();
    let mut admin = s.groups();
    let ann = create(&mut c, user("ann@example.com")).await;
    let ann_id = ann.name.rsplit('/').next().expect("an id").to_owned();
    let team = new_group(&mut admin, "team").await;
    add(&mut admin, &team.name, &[&ann.name])
        .await
        .expect("add");

    // A token for another project: refused on acme, whether the group and
    // user exist or not, the same way.
    let other_token = keys.token(&["other"], "users.read users.write");
    let mut o = s.groups_with(Some(&other_token));
    for (group, user_id) in [("team", ann_id.as_str()), ("nosuch", "nobody")] {
        for (rpc, outcome) in every_group_rpc(&mut o, "acme", group, user_id).await {
            let st = outcome.expect_err(rpc);
            assert_eq!(
                st.code(),
                Code::PermissionDenied,
                "{rpc} on {group}: {st:?}"
            );
            assert_eq!(reason(&st), "PROJECT_NOT_GRANTED", "{rpc} on {group}");
            assert_eq!(meta(&st, "project"), "acme", "{rpc} on {group}");
        }
    }
    assert_error(
        delete_group(&mut o, &gname("nosuch"), "", true).await,
        Code::PermissionDenied,
        "PROJECT_NOT_GRANTED",
    );
    // Nothing changed in acme.
    assert_eq!(get_group(&mut admin, &team.name).await.expect("get"), team);
    assert_eq!(
        members(&mut admin, &team.name, true).await,
        vec![ann.name.clone()]
    );
    assert_eq!(
        names_of(&list_groups_all(&mut admin, "", "", 0).await.expect("list")),
        vec![team.name.clone()]
    );

    // In its own project it works, but members belong to the group's
    // project: acme's user and group cannot join.
    let mine = try_create(
        &mut o,
        pb::CreateGroupRequest {
            parent: OTHER.into(),
            ..group_req("mine", "Mine")
        },
    )
    .await
    .expect("create in other");
    for member in [&ann.name, &team.name] {
        let st = assert_error(
            add(&mut o, &mine.name, &[member]).await,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
        assert_eq!(bad_fields(&st), vec!["members[0]"], "{member}");
    }
    assert!(
        members(&mut o, &mine.name, true).await.is_empty(),
        "nothing was added"
    );
    assert_eq!(
        user_groups(&mut admin, &ann.name, true).await,
        vec![team.name.clone()]
    );
    // ann's id in other's project is just an unknown user there.
    assert_error(
        add(&mut o, &mine.name, &[&format!("{OTHER}/users/{ann_id}")]).await,
        Code::NotFound,
        "MEMBER_NOT_FOUND",
    );
    // acme's users are no members of other's group.
    assert!(
        users_in(&mut c, &format!("groups:\"{}\"", mine.name), true)
            .await
            .is_empty()
    );

    // A token granting both projects cannot mix them either.
    let both = keys.token(&["acme", "other"], "users.read users.write");
    let mut b = s.groups_with(Some(&both));
    let st = assert_error(
        add(&mut b, &mine.name, &[&ann.name]).await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(bad_fields(&st), vec!["members[0]"]);
    let st = assert_error(
        add(&mut b, &team.name, &[&mine.name]).await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(bad_fields(&st), vec!["members[0]"]);
    assert_eq!(
        members(&mut admin, &team.name, true).await,
        vec![ann.name.clone()]
    );
}

async fn group_rpcs_need_a_token(e: Engine) {
    let keys = AuthKeys::new();
    let s = TestServer::start_authed(e, &keys).await;
    let mut admin = s.groups();
    let team = new_group(&mut admin, "team").await;
    let foreign = AuthKeys::new().token(&["acme"], ALL_SCOPES);
    for (token, want) in [
        (None, "TOKEN_MISSING"),
        (Some("not.a.jwt"), "TOKEN_INVALID"),
        (Some(foreign.as_str()), "TOKEN_INVALID"),
    ] {
        let mut client = s.groups_with(token);
        for (rpc, outcome) in every_group_rpc(&mut client, "acme", "team", "ann").await {
            let st = outcome.expect_err(rpc);
            assert_eq!(st.code(), Code::Unauthenticated, "{rpc}: {st:?}");
            assert_eq!(reason(&st), want, "{rpc}");
        }
    }
    assert_eq!(
        names_of(&list_groups_all(&mut admin, "", "", 0).await.expect("list")),
        vec![team.name.clone()]
    );
    assert_eq!(get_group(&mut admin, &team.name).await.expect("get"), team);
}

// ------------------------------------------------------------------- races

async fn concurrent_adds_of_the_same_users(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let mut g = s.groups();
    let users = batch_users(&mut c, "racer", 50).await;
    let names: Vec<String> = users.iter().map(|u| u.name.clone()).collect();
    let grp = new_group(&mut g, "race").await;

    // Eight calls adding the same 50 users, each in its own order.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let mut client = s.groups();
        let group = grp.name.clone();
        let mut list = names.clone();
        list.rotate_left(i * 6);
        tasks.push(tokio::spawn(async move {
            client
                .add_group_members(pb::AddGroupMembersRequest {
                    group,
                    members: list,
                })
                .await
                .map(|r| r.into_inner())
        }));
    }
    for t in tasks {
        let back = t
            .await
            .expect("task")
            .expect("every concurrent add succeeds");
        assert_eq!(back.name, grp.name);
    }
    assert_eq!(
        members_with(&mut g, &grp.name, false, 1000).await,
        sorted(names.clone())
    );
    assert_eq!(count_users(&mut c, "groups:\"race\"", false).await, 50);

    // The same users into four groups at once, two calls each.
    for i in 0..4 {
        new_group(&mut g, &format!("race-{i}")).await;
    }
    let mut tasks = Vec::new();
    for i in 0..8 {
        let mut client = s.groups();
        let group = gname(&format!("race-{}", i % 4));
        let list = names.clone();
        tasks.push(tokio::spawn(async move {
            client
                .add_group_members(pb::AddGroupMembersRequest {
                    group,
                    members: list,
                })
                .await
                .map(|r| r.into_inner())
        }));
    }
    for t in tasks {
        t.await
            .expect("task")
            .expect("every concurrent add succeeds");
    }
    for i in 0..4 {
        assert_eq!(
            members_with(&mut g, &gname(&format!("race-{i}")), false, 1000).await,
            sorted(names.clone())
        );
    }
    for name in [&names[0], &names[49]] {
        assert_eq!(
            user_groups(&mut g, name, false).await,
            gnames(&["race", "race-0", "race-1", "race-2", "race-3"])
        );
    }
}

async fn concurrent_opposite_nestings(e: Engine) {
    let s = TestServer::start(e).await;
    let mut g = s.groups();
    for round in 0..20 {
        let a = new_group(&mut g, &format!("a{round}")).await.name;
        let b = new_group(&mut g, &format!("b{round}")).await.name;
        let b_holds_a = spawn_add(&s, &b, &a);
        let a_holds_b = spawn_add(&s, &a, &b);
        let outcomes = [
            b_holds_a.await.expect("task"),
            a_holds_b.await.expect("task"),
        ];
        for r in &outcomes {
            if let Err(st) = r {
                assert_eq!(st.code(), Code::FailedPrecondition, "round {round}: {st:?}");
                assert_eq!(reason(st), "GROUP_CYCLE", "round {round}");
            }
        }
        let stored = outcomes.iter().filter(|r| r.is_ok()).count();
        assert_eq!(stored, 1, "round {round}: exactly one nesting is stored");
        let in_a = members(&mut g, &a, true).await;
        let in_b = members(&mut g, &b, true).await;
        assert!(
            !in_a.contains(&a) && !in_b.contains(&b),
            "round {round}: a cycle: {in_a:?} {in_b:?}"
        );
        assert!(
            in_a.contains(&b) != in_b.contains(&a),
            "round {round}: exactly one contains the other: {in_a:?} {in_b:?}"
        );
    }

    // A ring of three: at most two of the three nestings can be stored.
    for round in 0..10 {
        let x = new_group(&mut g, &format!("x{round}")).await.name;
        let y = new_group(&mut g, &format!("y{round}")).await.name;
        let z = new_group(&mut g, &format!("z{round}")).await.name;
        let tasks = [
            spawn_add(&s, &x, &y),
            spawn_add(&s, &y, &z),
            spawn_add(&s, &z, &x),
        ];
        let mut stored = 0;
        for t in tasks {
            match t.await.expect("task") {
                Ok(_) => stored += 1,
                Err(st) => {
                    assert_eq!(st.code(), Code::FailedPrecondition, "ring {round}: {st:?}");
                    assert_eq!(reason(&st), "GROUP_CYCLE", "ring {round}");
                }
            }
        }
        assert_eq!(stored, 2, "ring {round}: two of the three nestings");
        for grp in [&x, &y, &z] {
            let below = members(&mut g, grp, true).await;
            assert!(
                !below.contains(grp),
                "ring {round}: {grp} contains itself: {below:?}"
            );
        }
    }
}

async fn concurrent_delete_and_add(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let mut g = s.groups();
    let users = batch_users(&mut c, "churn", 20).await;
    let names: Vec<String> = users.iter().map(|u| u.name.clone()).collect();
    let holder = new_group(&mut g, "holder").await;
    for round in 0..10 {
        let id = format!("victim-{round}");
        let victim = new_group(&mut g, &id).await;
        let deleting = {
            let mut client = s.groups();
            let name = victim.name.clone();
            tokio::spawn(async move {
                client
                    .delete_group(pb::DeleteGroupRequest {
                        name,
                        ..Default::default()
                    })
                    .await
                    .map(|r| r.into_inner())
            })
        };
        let adding_users = {
            let mut client = s.groups();
            let req = pb::AddGroupMembersRequest {
                group: victim.name.clone(),
                members: names.clone(),
            };
            tokio::spawn(async move { client.add_group_members(req).await.map(|r| r.into_inner()) })
        };
        let nesting = spawn_add(&s, &holder.name, &victim.name);
        let deleted = deleting.await.expect("task");
        let added = adding_users.await.expect("task");
        let nested = nesting.await.expect("task");
        for (what, r) in [("users into it", &added), ("it into holder", &nested)] {
            if let Err(st) = r {
                let lost_race = matches!(
                    (st.code(), reason(st).as_str()),
                    (Code::NotFound, "GROUP_NOT_FOUND")
                        | (Code::NotFound, "MEMBER_NOT_FOUND")
                        | (Code::Aborted, "CONCURRENT_MODIFICATION")
                );
                assert!(lost_race, "round {round}: adding {what}: {st:?}");
            }
        }
        match &deleted {
            Ok(d) => {
                assert_eq!(d.name, victim.name, "round {round}");
                assert_error(
                    get_group(&mut g, &victim.name).await,
                    Code::NotFound,
                    "GROUP_NOT_FOUND",
                );
                assert!(
                    !members(&mut g, &holder.name, true)
                        .await
                        .contains(&victim.name),
                    "round {round}: holder still lists the deleted group"
                );
                assert_eq!(
                    count_users(&mut c, &format!("groups:\"{id}\""), true).await,
                    0,
                    "round {round}"
                );
                // No membership outlived the group: a new group with its id
                // starts empty and inside nothing.
                let reborn = new_group(&mut g, &id).await;
                assert!(
                    members(&mut g, &reborn.name, true).await.is_empty(),
                    "round {round}: the new group inherited members"
                );
                assert!(
                    !members(&mut g, &holder.name, false)
                        .await
                        .contains(&reborn.name),
                    "round {round}: the new group inherited a membership"
                );
                for u in &names {
                    assert!(
                        !user_groups(&mut g, u, true).await.contains(&reborn.name),
                        "round {round}: {u} is still in {id}"
                    );
                }
                delete_group(&mut g, &reborn.name, "", false)
                    .await
                    .expect("delete the new group");
            }
            Err(st) => {
                // Only a lost race may refuse the delete; the group then
                // holds whatever was added.
                assert_eq!(st.code(), Code::Aborted, "round {round}: {st:?}");
                assert_eq!(
                    get_group(&mut g, &victim.name)
                        .await
                        .expect("not deleted")
                        .name,
                    victim.name
                );
                let listed = members(&mut g, &victim.name, false).await;
                if added.is_ok() {
                    assert_eq!(listed, sorted(names.clone()), "round {round}");
                } else {
                    assert!(listed.is_empty(), "round {round}: {listed:?}");
                }
                assert_eq!(
                    members(&mut g, &holder.name, false)
                        .await
                        .contains(&victim.name),
                    nested.is_ok(),
                    "round {round}"
                );
            }
        }
    }
}

/// More nested groups than the storage lists as values (200): the query
/// follows the nesting itself, with the same answers.
async fn groups_filter_through_a_wide_hierarchy(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let mut g = s.groups();
    let top = new_group(&mut g, "top").await;
    let mut subs = Vec::new();
    for i in 0..230 {
        subs.push(new_group(&mut g, &format!("sub-{i:03}")).await.name);
    }
    // Two levels: sub-000 holds sub-001 .. sub-229, top holds sub-000.
    let refs: Vec<&str> = subs[1..].iter().map(String::as_str).collect();
    add(&mut g, &subs[0], &refs).await.expect("nest 229 groups");
    add(&mut g, &top.name, &[&subs[0]])
        .await
        .expect("nest under top");
    let mut expected = Vec::new();
    for i in [0usize, 7, 150, 229] {
        let u = create(&mut c, user(&format!("wide{i}@example.com"))).await;
        add(&mut g, &subs[i], &[&u.name]).await.expect("member");
        expected.push(u.name);
    }
    // One user in two of the groups still counts once.
    add(&mut g, &subs[3], &[&expected[2]])
        .await
        .expect("second membership");
    create(&mut c, user("outside@example.com")).await;
    expected.sort();
    assert_eq!(users_in(&mut c, "groups:\"top\"", false).await, expected);
    assert_eq!(count_users(&mut c, "groups:\"top\"", false).await, 4);
    assert_eq!(
        count_users(&mut c, "NOT groups:\"top\"", false).await,
        1,
        "only the outsider is outside"
    );
    let members = members(&mut g, &top.name, true).await;
    assert_eq!(members.len(), 230 + 4, "every nested group and user once");
}

/// Groups near their size limits: a page of 1000 would be far over what a
/// gRPC client accepts (4 MiB), so pages are cut short, with a token, and
/// every group still comes exactly once (ListGroups and ListUserGroups).
async fn large_groups_page_within_a_response(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let mut g = s.groups();
    let member = create(&mut c, user("joiner@example.com")).await;
    let metadata: std::collections::BTreeMap<String, String> = (0..50)
        .map(|k| (format!("key-{k:02}"), "v".repeat(500)))
        .collect();
    let mut names = Vec::new();
    for i in 0..150 {
        let created = g
            .create_group(pb::CreateGroupRequest {
                parent: PROJECT.into(),
                group_id: format!("big-{i:03}"),
                group: Some(pb::Group {
                    display_name: format!("Big {i}"),
                    description: "d".repeat(4096),
                    metadata: metadata.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .expect("create a large group")
            .into_inner();
        add(&mut g, &created.name, &[&member.name])
            .await
            .expect("member");
        names.push(created.name);
    }
    let pages = group_pages(&mut g, "", "create_time", 1000)
        .await
        .expect("list");
    assert!(
        pages.len() >= 2,
        "150 groups of ~30 KB need more than one page"
    );
    for p in &pages {
        let bytes: usize = p.iter().map(prost::Message::encoded_len).sum();
        assert!(bytes < 4 * 1024 * 1024, "a page of {bytes} bytes");
    }
    let listed: Vec<String> = pages.into_iter().flatten().map(|g| g.name).collect();
    assert_eq!(listed, names, "every group once, in order");
    let mut token = String::new();
    let mut of_user = Vec::new();
    let mut rounds = 0;
    loop {
        let page = g
            .list_user_groups(pb::ListUserGroupsRequest {
                user: member.name.clone(),
                page_size: 1000,
                page_token: token,
                ..Default::default()
            })
            .await
            .expect("user groups")
            .into_inner();
        rounds += 1;
        of_user.extend(page.groups.into_iter().map(|g| g.name));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert!(rounds >= 2, "cut into pages");
    assert_eq!(of_user, names);
}
