//! Keyset pages under concurrent writes: a user that exists (unchanged) for
//! the whole walk is returned exactly once, whatever is inserted or deleted
//! around it meanwhile, in every plan shape (plain order, a mixed-direction
//! order, a term-driven filter, search's best-match order).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use user_service::proto::users::v1 as pb;

use crate::both_engines;
use crate::harness::*;

fn member(kind: &str, i: usize) -> pb::User {
    pb::User {
        email: format!("{kind}{i}@walk.example"),
        display_name: format!("walker {kind} {:03}", (i * 37) % 101),
        tags: vec!["keep".into()],
        ..Default::default()
    }
}

async fn walk(c: &mut crate::list::Client, how: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let (users, next) = match how {
            "search" => {
                let r = c
                    .search_users(pb::SearchUsersRequest {
                        parent: PROJECT.into(),
                        query: "walker".into(),
                        page_size: 7,
                        page_token: token.clone(),
                        ..Default::default()
                    })
                    .await
                    .expect("search page")
                    .into_inner();
                (r.users, r.next_page_token)
            }
            _ => {
                let (filter, order_by) = match how {
                    "tag" => ("tags:\"keep\"", ""),
                    "mixed" => ("", "display_name desc, create_time"),
                    _ => ("", ""),
                };
                let r = c
                    .list_users(pb::ListUsersRequest {
                        parent: PROJECT.into(),
                        filter: filter.into(),
                        order_by: order_by.into(),
                        page_size: 7,
                        page_token: token.clone(),
                        ..Default::default()
                    })
                    .await
                    .expect("list page")
                    .into_inner();
                (r.users, r.next_page_token)
            }
        };
        out.extend(users.into_iter().map(|u| u.name));
        if next.is_empty() {
            return out;
        }
        token = next;
        tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    }
}

async fn pages_skip_and_repeat_nothing_while_others_write(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let mut stable = HashSet::new();
    let mut volatile = Vec::new();
    for i in 0..120 {
        stable.insert(create(&mut c, member("stable", i)).await.name);
        volatile.push(create(&mut c, member("vol", i)).await.name);
    }
    for how in ["default", "mixed", "tag", "search"] {
        let stop = Arc::new(AtomicBool::new(false));
        // Inserts, and deletes of users that were there before the walk.
        let mut writers = Vec::new();
        {
            let stop = stop.clone();
            let mut c = s.client();
            let how = how.to_owned();
            writers.push(tokio::spawn(async move {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    create(&mut c, member(&format!("new{how}x"), i)).await;
                    i += 1;
                }
                i
            }));
        }
        {
            let stop = stop.clone();
            let mut c = s.client();
            let victims: Vec<String> = volatile.drain(..30.min(volatile.len())).collect();
            writers.push(tokio::spawn(async move {
                let mut n = 0;
                for name in victims {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    c.delete_user(pb::DeleteUserRequest {
                        name,
                        ..Default::default()
                    })
                    .await
                    .expect("delete");
                    n += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                }
                n
            }));
        }
        let seen = walk(&mut c, how).await;
        stop.store(true, Ordering::Relaxed);
        let mut writes = 0;
        for w in writers {
            writes += w.await.expect("writer");
        }
        assert!(writes > 0, "{how}: nothing was written during the walk");
        let mut once = HashSet::new();
        for name in &seen {
            assert!(once.insert(name), "{how}: {name} returned twice");
        }
        let missed: Vec<_> = stable.iter().filter(|n| !once.contains(n)).collect();
        assert!(
            missed.is_empty(),
            "{how}: {} users that existed throughout were skipped, e.g. {:?}",
            missed.len(),
            missed.first()
        );
    }
}

both_engines!(pages_skip_and_repeat_nothing_while_others_write);
