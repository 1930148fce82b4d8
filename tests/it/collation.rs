//! Keyset pages break ties on the user id in byte order on both engines,
//! whatever collation the PostgreSQL database was created with (here ICU
//! en-US with punctuation ignored at first, as glibc's en_US does it).

use sea_orm::{ConnectionTrait, Database};
use user_service::proto::users::v1 as pb;

use crate::both_engines;
use crate::harness::*;
use crate::list::{list_all, list_req};

/// Byte order: a-b-c, a-c, a0, ab, ac, b. With punctuation ignored at
/// first (ICU `ka-shifted`, glibc's en_US): a0, ab, a-b-c, ac, a-c, b.
const IDS: [&str; 6] = ["ab", "a-c", "a0", "b", "a-b-c", "ac"];

async fn ids_in_page_order(s: &TestServer) -> Vec<String> {
    let mut c = s.client();
    for id in IDS {
        c.create_user(pb::CreateUserRequest {
            parent: PROJECT.into(),
            user_id: id.into(),
            user: Some(pb::User {
                email: format!("{id}@example.com"),
                family_name: "Same".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("create {id}: {e:?}"));
    }
    let mut ids = paged_ids(&mut c, "family_name", 1).await;
    let mut back = paged_ids(&mut c, "family_name desc", 3).await;
    back.reverse();
    assert_eq!(
        ids, back,
        "descending pages are the ascending ones reversed"
    );
    ids.dedup();
    ids
}

/// The user ids of every page of a list in `order`, `size` a page.
async fn paged_ids(c: &mut Client, order: &str, size: i32) -> Vec<String> {
    let mut req = list_req("", order);
    req.page_size = size;
    list_all(c, req)
        .await
        .into_iter()
        .map(|u| u.name.rsplit('/').next().unwrap().to_owned())
        .collect()
}

fn byte_order() -> Vec<String> {
    let mut v: Vec<String> = IDS.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

both_engines!(user_id_ties_break_in_byte_order);

async fn user_id_ties_break_in_byte_order(e: Engine) {
    let s = TestServer::start(e).await;
    assert_eq!(ids_in_page_order(&s).await, byte_order());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_id_ties_break_in_byte_order_under_an_icu_collation() {
    let Some(base) = postgres_url() else { return };
    let admin = Database::connect(&base).await.expect("connect");
    let name = format!("icu_{}", uuid::Uuid::now_v7().simple());
    admin
        .execute_unprepared(&format!(
            "CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8' \
             LOCALE_PROVIDER icu ICU_LOCALE 'en-US-u-ka-shifted' LOCALE 'C.UTF-8'"
        ))
        .await
        .expect("create an ICU database");
    let (prefix, query) = base.split_once('?').unwrap_or((&base, ""));
    let url = format!(
        "{}/{name}{}{query}",
        &prefix[..prefix.rfind('/').unwrap()],
        if query.is_empty() { "" } else { "?" }
    );
    let s = TestServer::start_on(TestDb::at(url), |_| {}).await;
    let got = ids_in_page_order(&s).await;
    drop(s.stop().await);
    admin
        .execute_unprepared(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .await
        .expect("drop the ICU database");
    assert_eq!(got, byte_order());
}
