//! ListUsers, SearchUsers, CountUsers and BatchGetUsers as a client sees them.

use std::collections::HashSet;

use tonic::Code;
use tonic_types::StatusExt;
use user_service::proto::users::v1 as pb;

use crate::both_engines;
use crate::harness::*;

pub use crate::harness::Client;

pub fn list_req(filter: &str, order_by: &str) -> pb::ListUsersRequest {
    pb::ListUsersRequest {
        parent: PROJECT.into(),
        filter: filter.into(),
        order_by: order_by.into(),
        ..Default::default()
    }
}

/// Every page of a list, following the tokens.
pub async fn list_all(c: &mut Client, mut req: pb::ListUsersRequest) -> Vec<pb::User> {
    let mut out = Vec::new();
    for _ in 0..10_000 {
        let page = match c.list_users(req.clone()).await {
            Ok(r) => r.into_inner(),
            Err(e) => panic!("list {:?} {:?}: {e:?}", req.filter, req.order_by),
        };
        out.extend(page.users);
        if page.next_page_token.is_empty() {
            return out;
        }
        req.page_token = page.next_page_token;
    }
    panic!("the list never ended");
}

/// The emails of every user a filter selects, in list order.
async fn emails(c: &mut Client, filter: &str) -> Vec<String> {
    list_all(c, list_req(filter, ""))
        .await
        .into_iter()
        .map(|u| u.email)
        .collect()
}

async fn count(c: &mut Client, filter: &str, show_deleted: bool) -> i64 {
    c.count_users(pb::CountUsersRequest {
        parent: PROJECT.into(),
        filter: filter.into(),
        show_deleted,
    })
    .await
    .expect("count")
    .into_inner()
    .total_size
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

async fn pages_newest_first_with_tokens(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let mut created = Vec::new();
    for i in 0..7 {
        created.push(
            create(&mut c, user(&format!("u{i}@example.com")))
                .await
                .name,
        );
    }
    create_in(&mut c, "projects/other", user("x@example.com")).await;
    created.reverse();

    let mut req = pb::ListUsersRequest {
        page_size: 3,
        ..list_req("", "")
    };
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let page = c.list_users(req.clone()).await.unwrap().into_inner();
        pages += 1;
        assert!(page.users.len() <= 3);
        seen.extend(page.users.into_iter().map(|u| u.name));
        if page.next_page_token.is_empty() {
            break;
        }
        req.page_token = page.next_page_token;
        // page_size may change between pages.
        req.page_size = 2;
    }
    assert_eq!(seen, created, "newest first, every user once");
    assert_eq!(pages, 3);

    // Default page size, and an empty project.
    let all = c.list_users(list_req("", "")).await.unwrap().into_inner();
    assert_eq!(all.users.len(), 7);
    assert!(all.next_page_token.is_empty());
    let none = c
        .list_users(pb::ListUsersRequest {
            parent: "projects/empty".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(none.users.is_empty() && none.next_page_token.is_empty());

    let st = assert_error(
        c.list_users(pb::ListUsersRequest {
            page_size: -1,
            ..list_req("", "")
        })
        .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(bad_fields(&st), vec!["page_size"]);
    let st = assert_error(
        c.list_users(pb::ListUsersRequest {
            parent: "acme".into(),
            page_size: -1,
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(bad_fields(&st), vec!["page_size", "parent"]);
}

async fn page_tokens_are_bound_to_their_query(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    for i in 0..3 {
        create(&mut c, user(&format!("t{i}@example.com"))).await;
    }
    let first = c
        .list_users(pb::ListUsersRequest {
            page_size: 1,
            ..list_req("state = ACTIVE", "")
        })
        .await
        .unwrap()
        .into_inner();
    let token = first.next_page_token;
    assert!(!token.is_empty());
    let with = |filter: &str, order: &str, show_deleted: bool, parent: &str, token: &str| {
        pb::ListUsersRequest {
            parent: parent.into(),
            page_token: token.into(),
            filter: filter.into(),
            order_by: order.into(),
            show_deleted,
            page_size: 1,
        }
    };
    for req in [
        with("state = PENDING", "", false, PROJECT, &token),
        with("state = ACTIVE", "email", false, PROJECT, &token),
        with("state = ACTIVE", "", true, PROJECT, &token),
        with("state = ACTIVE", "", false, "projects/other", &token),
        with(
            "state = ACTIVE",
            "",
            false,
            PROJECT,
            &token[..token.len() - 2],
        ),
        with("state = ACTIVE", "", false, PROJECT, &format!("{token}x")),
        with("state = ACTIVE", "", false, PROJECT, "not-a-token"),
    ] {
        let st = assert_error(
            c.list_users(req.clone()).await,
            Code::InvalidArgument,
            "INVALID_PAGE_TOKEN",
        );
        assert_eq!(bad_fields(&st), vec!["page_token"], "{req:?}");
    }
    // Every single-character change of the token is refused.
    let mut chars: Vec<char> = token.chars().collect();
    for i in (0..chars.len()).step_by(3) {
        let orig = chars[i];
        chars[i] = if orig == 'A' { 'B' } else { 'A' };
        let tampered: String = chars.iter().collect();
        chars[i] = orig;
        assert_error(
            c.list_users(with("state = ACTIVE", "", false, PROJECT, &tampered))
                .await,
            Code::InvalidArgument,
            "INVALID_PAGE_TOKEN",
        );
    }
    // The same query continues.
    let next = c
        .list_users(with("state = ACTIVE", "", false, PROJECT, &token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next.users.len(), 1);
    assert_ne!(next.users[0].name, first.users[0].name);
}

async fn filters_select_the_right_users(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let a = create(
        &mut c,
        pb::User {
            email: "Ann@Example.com".into(),
            display_name: "Ann Archer".into(),
            given_name: "Ann".into(),
            family_name: "Archer".into(),
            username: "ann".into(),
            tags: strs(&["vip", "team-red"]),
            roles: strs(&["admin"]),
            metadata: [("plan".to_string(), "pro".to_string())].into(),
            email_verified: true,
            birthday: Some(user_service::proto::google::r#type::Date {
                year: 1990,
                month: 5,
                day: 17,
            }),
            ..Default::default()
        },
    )
    .await;
    let b = create(
        &mut c,
        pb::User {
            email: "bob@other.org".into(),
            display_name: "Bob Baker".into(),
            tags: strs(&["team-blue"]),
            metadata: [("plan".to_string(), "free".to_string())].into(),
            phone_number: "+4712345678".into(),
            ..Default::default()
        },
    )
    .await;
    let cc = create(
        &mut c,
        pb::User {
            phone_number: "+12125550100".into(),
            display_name: "Cy".into(),
            secondary_emails: strs(&["Cy@Example.com"]),
            ..Default::default()
        },
    )
    .await;
    c.disable_user(pb::DisableUserRequest {
        name: b.name.clone(),
        ..Default::default()
    })
    .await
    .unwrap();

    let check = |want: &[&str]| strs(want);
    let ann = "Ann@example.com";
    let bob = "bob@other.org";
    let cy = "";
    for (filter, want) in [
        ("tags:vip", check(&[ann])),
        ("tags:\"team-*\"", check(&[bob, ann])),
        ("tags:*", check(&[bob, ann])),
        ("-tags:*", check(&[cy])),
        ("roles:admin", check(&[ann])),
        ("metadata.plan = \"pro\"", check(&[ann])),
        ("metadata.plan != \"pro\"", check(&[bob])),
        ("metadata:plan", check(&[bob, ann])),
        ("NOT metadata.plan = pro", check(&[cy, bob])),
        ("metadata.plan > \"g\"", check(&[ann])),
        ("metadata.plan = \"*re*\"", check(&[bob])),
        ("email = \"*@example.com\"", check(&[ann])),
        ("email = \"*@EXAMPLE.COM\"", check(&[ann])),
        ("email = \"ann@example.com\"", check(&[ann])),
        ("email != \"ann@example.com\"", check(&[cy, bob])),
        ("email = \"\"", check(&[cy])),
        ("email = \"b*\"", check(&[bob])),
        ("secondary_emails:\"cy@example.com\"", check(&[cy])),
        ("display_name = \"*er\"", check(&[bob, ann])),
        ("display_name < \"B\"", check(&[ann])),
        ("state = DISABLED", check(&[bob])),
        ("state != DISABLED", check(&[cy, ann])),
        ("email_verified = true", check(&[ann])),
        ("birthday < \"2000-01-01\"", check(&[ann])),
        ("birthday != \"1990-05-17\"", check(&[cy, bob])),
        ("last_login_time < \"2100-01-01T00:00:00Z\"", check(&[])),
        ("phone_number = \"+47 123 45 678\"", check(&[bob])),
        ("username = ANN", check(&[ann])),
        (
            "state = ACTIVE AND tags:vip OR phone_number = \"+12125550100\"",
            check(&[cy, ann]),
        ),
        (
            "(state = ACTIVE AND tags:vip) OR state = DISABLED",
            check(&[bob, ann]),
        ),
        ("tags:vip roles:admin", check(&[ann])),
        (&format!("name = \"{}\"", cc.name), check(&[cy])),
        ("name = \"projects/other/users/x\"", check(&[])),
        (
            &format!("create_time >= \"{}\"", rfc3339(&b.create_time)),
            check(&[cy, bob]),
        ),
    ] {
        assert_eq!(emails(&mut c, filter).await, want, "filter {filter}");
        assert_eq!(
            count(&mut c, filter, false).await,
            want.len() as i64,
            "count {filter}"
        );
    }
    assert_eq!(a.email, ann);
}

fn rfc3339(t: &Option<prost_types::Timestamp>) -> String {
    let t = t.as_ref().unwrap();
    chrono::DateTime::from_timestamp(t.seconds, t.nanos as u32)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

async fn bad_filters_and_orders_point_at_the_position(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    for (filter, pos) in [
        ("emial = \"a\"", 1),
        ("state = ACTIVE AND state = GONE", 28),
        ("tags = vip", 6),
        ("create_time > \"yesterday\"", 15),
        ("(state = ACTIVE", 16),
        ("email = 'x", 9),
        ("state = ACTIVE; DROP TABLE users", 9),
    ] {
        let st = assert_error(
            c.list_users(list_req(filter, "")).await,
            Code::InvalidArgument,
            "INVALID_FILTER",
        );
        let d = st.get_error_details();
        let v = &d.bad_request().expect("BadRequest").field_violations[0];
        assert_eq!(v.field, "filter");
        assert!(
            v.description.starts_with(&format!("position {pos}:")),
            "{filter}: {}",
            v.description
        );
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
    }
    for order in ["emial", "email,email", "email sideways", "bio"] {
        let st = assert_error(
            c.list_users(list_req("", order)).await,
            Code::InvalidArgument,
            "INVALID_ORDER_BY",
        );
        assert_eq!(bad_fields(&st), vec!["order_by"]);
    }
    // Both wrong at once: every violation is reported.
    let st = assert_error(
        c.list_users(list_req("x = 1", "y")).await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(bad_fields(&st), vec!["filter", "order_by"]);
    // The database is untouched by hostile filters.
    create(&mut c, user("still@example.com")).await;
    assert_eq!(count(&mut c, "", false).await, 1);
}

async fn orders_page_across_ties(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    // Many equal sort keys: paging must rely on the id tie breaker.
    for i in 0..9 {
        create(
            &mut c,
            pb::User {
                email: format!("o{i}@example.com"),
                display_name: ["b", "a", "c"][i % 3].into(),
                family_name: if i % 2 == 0 {
                    "Z".into()
                } else {
                    String::new()
                },
                ..Default::default()
            },
        )
        .await;
    }
    for order in [
        "display_name",
        "display_name desc",
        "family_name, display_name desc",
        "email desc",
        "username, create_time",
        "last_login_time desc, update_time",
    ] {
        let all = list_all(
            &mut c,
            pb::ListUsersRequest {
                page_size: 2,
                ..list_req("", order)
            },
        )
        .await;
        assert_eq!(all.len(), 9, "{order}");
        let names: HashSet<&str> = all.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names.len(), 9, "{order}: no user twice");
        let key = |u: &pb::User| match order.split(',').next().unwrap().trim() {
            "display_name" | "display_name desc" => u.display_name.clone(),
            "family_name" => u.family_name.clone(),
            "email desc" => u.email.to_lowercase(),
            _ => String::new(),
        };
        let keys: Vec<String> = all.iter().map(key).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        if order.split(',').next().unwrap().ends_with("desc") {
            sorted.reverse();
        }
        assert_eq!(keys, sorted, "{order}");
    }
}

async fn deleted_users_only_with_show_deleted(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let keep = create(&mut c, user("keep@example.com")).await;
    let gone = create(&mut c, user("gone@example.com")).await;
    c.delete_user(pb::DeleteUserRequest {
        name: gone.name.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let names = |v: Vec<pb::User>| v.into_iter().map(|u| u.name).collect::<Vec<_>>();
    assert_eq!(
        names(list_all(&mut c, list_req("", "")).await),
        vec![keep.name.clone()]
    );
    let with_deleted = list_all(
        &mut c,
        pb::ListUsersRequest {
            show_deleted: true,
            ..list_req("", "")
        },
    )
    .await;
    assert_eq!(
        names(with_deleted),
        vec![gone.name.clone(), keep.name.clone()]
    );
    assert_eq!(count(&mut c, "", false).await, 1);
    assert_eq!(count(&mut c, "", true).await, 2);
    assert_eq!(count(&mut c, "state = DELETED", true).await, 1);
    assert_eq!(count(&mut c, "state = DELETED", false).await, 0);
    assert_eq!(
        count(&mut c, "delete_time > \"2000-01-01T00:00:00Z\"", true).await,
        1
    );
}

async fn index_terms_follow_updates_and_erasure(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let u = create(
        &mut c,
        pb::User {
            email: "terms@example.com".into(),
            tags: strs(&["old", "kept"]),
            ..Default::default()
        },
    )
    .await;
    c.update_user(pb::UpdateUserRequest {
        user: Some(pb::User {
            name: u.name.clone(),
            tags: strs(&["new", "kept"]),
            email: "moved@example.org".into(),
            display_name: "Renamed".into(),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: strs(&["tags", "email", "display_name"]),
        }),
    })
    .await
    .unwrap();
    assert_eq!(count(&mut c, "tags:old", false).await, 0);
    assert_eq!(count(&mut c, "tags:new", false).await, 1);
    // A term the update did not change is still there.
    assert_eq!(count(&mut c, "tags:kept AND tags:new", false).await, 1);
    assert_eq!(count(&mut c, "email = \"*@example.com\"", false).await, 0);
    assert_eq!(count(&mut c, "email = \"*@example.org\"", false).await, 1);
    assert_eq!(search(&mut c, "terms", "").await.len(), 0);
    assert_eq!(search(&mut c, "renam", "").await.len(), 1);
    c.delete_user(pb::DeleteUserRequest {
        name: u.name.clone(),
        force: true,
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(count(&mut c, "tags:new", true).await, 0);
    // A new user with the same id starts without the old terms.
    c.create_user(pb::CreateUserRequest {
        parent: PROJECT.into(),
        user_id: u.name.rsplit('/').next().unwrap().into(),
        user: Some(user("again@example.com")),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(count(&mut c, "tags:new", true).await, 0);
    assert_eq!(count(&mut c, "", true).await, 1);
}

async fn search(c: &mut Client, query: &str, filter: &str) -> Vec<pb::User> {
    let req = pb::SearchUsersRequest {
        parent: PROJECT.into(),
        query: query.into(),
        filter: filter.into(),
        page_size: 2,
        ..Default::default()
    };
    search_all(c, req).await
}

/// Every page of a search, following the tokens.
pub async fn search_all(c: &mut Client, mut req: pb::SearchUsersRequest) -> Vec<pb::User> {
    let mut out = Vec::new();
    loop {
        let page = c
            .search_users(req.clone())
            .await
            .expect("search")
            .into_inner();
        out.extend(page.users);
        if page.next_page_token.is_empty() {
            return out;
        }
        req.page_token = page.next_page_token;
    }
}

async fn search_matches_prefixes_of_six_fields(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let ana = create(
        &mut c,
        pb::User {
            email: "Ana.Lopez@Example.com".into(),
            username: "alopez".into(),
            display_name: "Ána López".into(),
            given_name: "Ána".into(),
            family_name: "López".into(),
            phone_number: "+4798765432".into(),
            ..Default::default()
        },
    )
    .await;
    let lo = create(
        &mut c,
        pb::User {
            email: "lorenzo@example.com".into(),
            note: "ana".into(),
            tags: strs(&["vip"]),
            ..Default::default()
        },
    )
    .await;
    let gone = create(&mut c, user("ana.gone@example.com")).await;
    c.delete_user(pb::DeleteUserRequest {
        name: gone.name.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    create_in(&mut c, "projects/other", user("ana@example.com")).await;

    let names = |v: Vec<pb::User>| v.into_iter().map(|u| u.name).collect::<Vec<_>>();
    assert_eq!(
        names(search(&mut c, "ANA.", "").await),
        vec![ana.name.clone()]
    );
    assert_eq!(
        names(search(&mut c, "alo", "").await),
        vec![ana.name.clone()]
    );
    assert_eq!(
        names(search(&mut c, "ÁNA", "").await),
        vec![ana.name.clone()]
    );
    assert_eq!(
        names(search(&mut c, "lóp", "").await),
        vec![ana.name.clone()]
    );
    assert_eq!(
        names(search(&mut c, "+4798", "").await),
        vec![ana.name.clone()]
    );
    assert_eq!(
        names(search(&mut c, "l", "").await),
        vec![lo.name.clone(), ana.name.clone()]
    );
    assert_eq!(names(search(&mut c, "lo", "").await), vec![lo.name.clone()]);
    assert_eq!(
        names(search(&mut c, "l", "tags:vip").await),
        vec![lo.name.clone()]
    );
    assert!(
        search(&mut c, "example", "").await.is_empty(),
        "prefix, not substring"
    );
    // Deleted users only on request.
    let with_deleted = c
        .search_users(pb::SearchUsersRequest {
            parent: PROJECT.into(),
            query: "ana.g".into(),
            show_deleted: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(names(with_deleted.users), vec![gone.name.clone()]);
    // Orders apply.
    let ordered = c
        .search_users(pb::SearchUsersRequest {
            parent: PROJECT.into(),
            query: "l".into(),
            order_by: "email".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        names(ordered.users),
        vec![ana.name.clone(), lo.name.clone()]
    );

    for q in ["", &"x".repeat(201), "a\u{7}"] {
        let st = assert_error(
            c.search_users(pb::SearchUsersRequest {
                parent: PROJECT.into(),
                query: q.into(),
                ..Default::default()
            })
            .await,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
        assert_eq!(bad_fields(&st), vec!["query"]);
    }
    // A token of one search does not continue another.
    let first = c
        .search_users(pb::SearchUsersRequest {
            parent: PROJECT.into(),
            query: "l".into(),
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_error(
        c.search_users(pb::SearchUsersRequest {
            parent: PROJECT.into(),
            query: "ana".into(),
            page_size: 1,
            page_token: first.next_page_token,
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "INVALID_PAGE_TOKEN",
    );
}

async fn batch_get_keeps_order_and_is_atomic(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let a = create(&mut c, user("a@example.com")).await;
    let b = create(&mut c, user("b@example.com")).await;
    c.delete_user(pb::DeleteUserRequest {
        name: b.name.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let get = |names: Vec<String>| pb::BatchGetUsersRequest {
        parent: PROJECT.into(),
        names,
    };
    let got = c
        .batch_get_users(get(vec![b.name.clone(), a.name.clone(), b.name.clone()]))
        .await
        .unwrap()
        .into_inner()
        .users;
    let names: Vec<&str> = got.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(
        names,
        vec![b.name.as_str(), a.name.as_str(), b.name.as_str()]
    );
    assert_eq!(got[0].state, pb::user::State::Deleted as i32);
    assert_eq!(got[1], get_user(&mut c, &a.name).await);

    let missing1 = format!("{PROJECT}/users/missing-1");
    let missing2 = format!("{PROJECT}/users/missing-2");
    let st = assert_error(
        c.batch_get_users(get(vec![
            a.name.clone(),
            missing2.clone(),
            missing1.clone(),
        ]))
        .await,
        Code::NotFound,
        "USER_NOT_FOUND",
    );
    assert_eq!(
        st.get_error_details()
            .resource_info()
            .unwrap()
            .resource_name,
        missing2
    );

    let st = assert_error(
        c.batch_get_users(get(vec![
            a.name.clone(),
            "projects/other/users/x".into(),
            "garbage".into(),
        ]))
        .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(bad_fields(&st), vec!["names[1]", "names[2]"]);
    let st = assert_error(
        c.batch_get_users(get(vec![a.name.clone(); 1001])).await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(bad_fields(&st), vec!["names"]);
    let most = c
        .batch_get_users(get(vec![a.name.clone(); 1000]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(most.users.len(), 1000);
    let none = c.batch_get_users(get(vec![])).await.unwrap().into_inner();
    assert!(none.users.is_empty());
}

async fn get_user(c: &mut Client, name: &str) -> pb::User {
    get(c, name).await.expect("get")
}

async fn page_size_is_clamped_to_1000(e: Engine) {
    let s = TestServer::start(e).await;
    let c = s.client();
    let mut tasks = Vec::new();
    for w in 0..8 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..126 {
                create(&mut c, user(&format!("c{w}-{i}@example.com"))).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut c = s.client();
    let page = c
        .list_users(pb::ListUsersRequest {
            page_size: 5000,
            ..list_req("", "")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.users.len(), 1000);
    assert!(!page.next_page_token.is_empty());
    let rest = c
        .list_users(pb::ListUsersRequest {
            page_size: i32::MAX,
            page_token: page.next_page_token,
            ..list_req("", "")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.users.len(), 8);
    assert!(rest.next_page_token.is_empty());
    assert_eq!(count(&mut c, "", false).await, 1008);
}

/// Two terms more than a window's worth of users have (1,100 and 303), in
/// common only for the three oldest: the window of the order holds no page,
/// so the read falls back to walking the rarest term. Every page, whatever
/// its size and order, is the unfiltered list with the filter applied by
/// the client.
async fn a_window_without_a_page_falls_back_to_the_rarest_term(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let users: Vec<pb::User> = (0..1400)
        .map(|i| {
            let mut tags = Vec::new();
            if i < 1100 {
                tags.push("a".to_owned());
            }
            if !(3..1100).contains(&i) {
                tags.push("b".to_owned());
            }
            pb::User {
                tags,
                ..user(&format!("w{i:04}@example.com"))
            }
        })
        .collect();
    let acks = crate::bulk::import(&mut c, users, 500)
        .await
        .expect("import");
    assert_eq!(acks.iter().map(|a| a.created_count).sum::<i64>(), 1400);
    let both = |u: &pb::User| u.tags.iter().any(|t| t == "a") && u.tags.iter().any(|t| t == "b");
    for order in ["", "create_time", "create_time desc", "email"] {
        let model: Vec<String> = list_all(&mut c, list_req("", order))
            .await
            .into_iter()
            .filter(both)
            .map(|u| u.email)
            .collect();
        assert_eq!(model.len(), 3, "{order:?}");
        for page_size in [1, 2, 50] {
            let got: Vec<String> = list_all(
                &mut c,
                pb::ListUsersRequest {
                    page_size,
                    ..list_req("tags:\"a\" AND tags:\"b\"", order)
                },
            )
            .await
            .into_iter()
            .map(|u| u.email)
            .collect();
            assert_eq!(got, model, "order {order:?}, pages of {page_size}");
        }
    }
    assert_eq!(count(&mut c, "tags:\"a\" AND tags:\"b\"", false).await, 3);
}

both_engines!(
    pages_newest_first_with_tokens,
    page_tokens_are_bound_to_their_query,
    filters_select_the_right_users,
    bad_filters_and_orders_point_at_the_position,
    orders_page_across_ties,
    deleted_users_only_with_show_deleted,
    index_terms_follow_updates_and_erasure,
    search_matches_prefixes_of_six_fields,
    batch_get_keeps_order_and_is_atomic,
    page_size_is_clamped_to_1000,
    a_window_without_a_page_falls_back_to_the_rarest_term,
);
