//! GroupService through the generated client, on both engines.

use tonic::Code;
use user_service::proto::users::v1 as pb;

use crate::both_engines;
use crate::harness::*;

both_engines!(smoke);

async fn new_group(g: &mut Groups, id: &str) -> pb::Group {
    g.create_group(pb::CreateGroupRequest {
        parent: PROJECT.into(),
        group_id: id.into(),
        group: Some(pb::Group {
            display_name: format!("Group {id}"),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .expect("create_group")
    .into_inner()
}

async fn add(g: &mut Groups, group: &str, members: &[&str]) -> Result<pb::Group, tonic::Status> {
    g.add_group_members(pb::AddGroupMembersRequest {
        group: group.into(),
        members: members.iter().map(|m| (*m).to_owned()).collect(),
    })
    .await
    .map(|r| r.into_inner())
}

async fn members(g: &mut Groups, group: &str, transitive: bool) -> Vec<String> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = g
            .list_group_members(pb::ListGroupMembersRequest {
                group: group.into(),
                transitive,
                page_size: 2,
                page_token: token,
            })
            .await
            .expect("list members")
            .into_inner();
        out.extend(page.members.into_iter().map(|m| m.name));
        if page.next_page_token.is_empty() {
            return out;
        }
        token = page.next_page_token;
    }
}

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
