//! Property test of the filter language: for random filters over random
//! users, the users ListUsers and CountUsers return are exactly those an
//! in-memory evaluation of the documented semantics selects.

use std::collections::BTreeMap;

use user_service::proto::google::r#type::Date;
use user_service::proto::users::v1 as pb;

use crate::both_engines;
use crate::harness::*;
use crate::list::{list_all, list_req};

/// Filters tried per engine.
const CASES: usize = 300;

#[derive(Clone, Debug)]
enum F {
    And(Vec<F>),
    Or(Vec<F>),
    Not(Box<F>),
    Text {
        field: &'static str,
        op: &'static str,
        lead: bool,
        trail: bool,
        value: String,
    },
    Time {
        field: &'static str,
        op: &'static str,
        nanos: i128,
    },
    Birthday {
        op: &'static str,
        date: String,
    },
    Bool {
        field: &'static str,
        equal: bool,
        value: bool,
    },
    State {
        equal: bool,
        state: &'static str,
    },
    Has {
        field: &'static str,
        value: Option<String>,
        prefix: bool,
    },
    Meta {
        key: &'static str,
        op: &'static str,
        lead: bool,
        trail: bool,
        value: String,
    },
    HasKey(&'static str),
}

const TEXT_FIELDS: &[&str] = &[
    "email",
    "phone_number",
    "username",
    "display_name",
    "family_name",
    "external_id",
    "title",
];
const OPS: &[&str] = &["=", "!=", "<", "<=", ">", ">="];
const STATES: &[&str] = &["ACTIVE", "PENDING", "DISABLED", "DELETED"];
const TAGS: &[&str] = &["vip", "beta", "team-red", "team-blue", "x"];
const ROLES: &[&str] = &["admin", "editor", "viewer"];
const META_KEYS: &[&str] = &["plan", "tier", "region.eu"];
const META_VALUES: &[&str] = &["pro", "free", "Pro", "b", "ü", "", "enterprise"];
const NAMES: &[&str] = &[
    "Ann", "ann", "Bob", "Zoë", "Ünal", "", "Ann Lee", "Bo*b", "Q\"x",
];

fn pick<T: Copy>(r: &mut fastrand::Rng, v: &[T]) -> T {
    v[r.usize(..v.len())]
}

fn quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' | '\\' | '*' => {
                out.push('\\');
                out.push(c);
            }
            _ => out.push(c),
        }
    }
    out.push('"');
    out
}

fn wild(lead: bool, trail: bool, v: &str) -> String {
    let q = quote(v);
    let inner = &q[1..q.len() - 1];
    format!(
        "\"{}{inner}{}\"",
        if lead { "*" } else { "" },
        if trail { "*" } else { "" }
    )
}

fn render(f: &F) -> String {
    match f {
        F::And(v) => format!(
            "({})",
            v.iter().map(render).collect::<Vec<_>>().join(" AND ")
        ),
        F::Or(v) => format!(
            "({})",
            v.iter().map(render).collect::<Vec<_>>().join(" OR ")
        ),
        F::Not(inner) => format!("NOT ({})", render(inner)),
        F::Text {
            field,
            op,
            lead,
            trail,
            value,
        } => format!("{field} {op} {}", wild(*lead, *trail, value)),
        F::Time { field, op, nanos } => {
            let secs = nanos.div_euclid(1_000_000_000) as i64;
            let sub = nanos.rem_euclid(1_000_000_000) as u32;
            let t = chrono::DateTime::from_timestamp(secs, sub).unwrap();
            format!(
                "{field} {op} \"{}\"",
                t.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
            )
        }
        F::Birthday { op, date } => format!("birthday {op} \"{date}\""),
        F::Bool {
            field,
            equal,
            value,
        } => format!("{field} {} {value}", if *equal { "=" } else { "!=" }),
        F::State { equal, state } => {
            format!("state {} {state}", if *equal { "=" } else { "!=" })
        }
        F::Has {
            field,
            value,
            prefix,
        } => match value {
            None => format!("{field}:*"),
            Some(v) if *prefix => format!("{field}:{}", wild(false, true, v)),
            Some(v) => format!("{field}:{}", quote(v)),
        },
        F::Meta {
            key,
            op,
            lead,
            trail,
            value,
        } => format!("metadata.`{key}` {op} {}", wild(*lead, *trail, value)),
        F::HasKey(k) => format!("metadata:{k}"),
    }
}

fn text_of(u: &pb::User, field: &str) -> String {
    match field {
        "email" => u.email.to_lowercase(),
        "phone_number" => u.phone_number.clone(),
        "username" => u.username.clone(),
        "display_name" => u.display_name.clone(),
        "family_name" => u.family_name.clone(),
        "external_id" => u.external_id.clone(),
        "title" => u.title.clone(),
        _ => unreachable!("{field}"),
    }
}

fn cmp_ok<T: Ord>(a: T, op: &str, b: T) -> bool {
    match op {
        "=" => a == b,
        "!=" => a != b,
        "<" => a < b,
        "<=" => a <= b,
        ">" => a > b,
        ">=" => a >= b,
        _ => unreachable!(),
    }
}

fn string_match(v: &str, op: &str, lead: bool, trail: bool, pattern: &str) -> bool {
    let hit = match (lead, trail) {
        (false, false) => return cmp_ok(v, op, pattern),
        (false, true) => v.starts_with(pattern),
        (true, false) => v.ends_with(pattern),
        (true, true) => v.contains(pattern),
    };
    if op == "=" { hit } else { !hit }
}

fn time_of(u: &pb::User, field: &str) -> Option<i128> {
    let t = match field {
        "create_time" => &u.create_time,
        "update_time" => &u.update_time,
        "last_login_time" => &u.last_login_time,
        "delete_time" => &u.delete_time,
        _ => unreachable!(),
    };
    t.as_ref()
        .map(|t| i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos))
}

fn eval(f: &F, u: &pb::User) -> bool {
    match f {
        F::And(v) => v.iter().all(|f| eval(f, u)),
        F::Or(v) => v.iter().any(|f| eval(f, u)),
        F::Not(inner) => !eval(inner, u),
        F::Text {
            field,
            op,
            lead,
            trail,
            value,
        } => {
            let value = if matches!(*field, "email" | "username") {
                value.to_lowercase()
            } else {
                value.clone()
            };
            string_match(&text_of(u, field), op, *lead, *trail, &value)
        }
        F::Time { field, op, nanos } => match time_of(u, field) {
            Some(t) => cmp_ok(t, op, *nanos),
            None => *op == "!=",
        },
        F::Birthday { op, date } => match &u.birthday {
            Some(d) => cmp_ok(
                format!("{:04}-{:02}-{:02}", d.year, d.month, d.day).as_str(),
                op,
                date.as_str(),
            ),
            None => *op == "!=",
        },
        F::Bool {
            field,
            equal,
            value,
        } => {
            let v = match *field {
                "email_verified" => u.email_verified,
                _ => u.phone_number_verified,
            };
            (v == *value) == *equal
        }
        F::State { equal, state } => {
            let s = pb::user::State::try_from(u.state).unwrap().as_str_name();
            (s == *state) == *equal
        }
        F::Has {
            field,
            value,
            prefix,
        } => {
            let list = if *field == "tags" { &u.tags } else { &u.roles };
            match value {
                None => !list.is_empty(),
                Some(v) if *prefix => list.iter().any(|t| t.starts_with(v.as_str())),
                Some(v) => list.contains(v),
            }
        }
        F::Meta {
            key,
            op,
            lead,
            trail,
            value,
        } => match u.metadata.get(*key) {
            Some(v) => string_match(v, op, *lead, *trail, value),
            None => false,
        },
        F::HasKey(k) => u.metadata.contains_key(*k),
    }
}

/// A string some user has in this field, or a piece of it, or something else.
fn sample_text(r: &mut fastrand::Rng, users: &[pb::User], field: &str) -> String {
    let u = &users[r.usize(..users.len())];
    let v = text_of(u, field);
    let chars: Vec<char> = v.chars().collect();
    match r.u8(..4) {
        0 => pick(r, NAMES).to_string(),
        1 if !chars.is_empty() => {
            let a = r.usize(..chars.len());
            let b = r.usize(a..=chars.len());
            chars[a..b].iter().collect()
        }
        _ => v,
    }
}

fn gen_leaf(r: &mut fastrand::Rng, users: &[pb::User]) -> F {
    match r.u8(..10) {
        0 | 1 => {
            let field = pick(r, TEXT_FIELDS);
            let value = sample_text(r, users, field);
            let (lead, trail) = if r.bool() {
                (false, false)
            } else {
                (r.bool(), r.bool())
            };
            let op = if lead || trail {
                pick(r, &["=", "!="])
            } else {
                pick(r, OPS)
            };
            F::Text {
                field,
                op,
                lead,
                trail,
                value,
            }
        }
        2 => {
            let field = pick(
                r,
                &[
                    "create_time",
                    "update_time",
                    "last_login_time",
                    "delete_time",
                ],
            );
            let base = users
                .iter()
                .filter_map(|u| time_of(u, field))
                .nth(r.usize(..users.len()))
                .unwrap_or(1_700_000_000_000_000_000);
            F::Time {
                field,
                op: pick(r, OPS),
                nanos: base + i128::from(r.i8(-1..=1)),
            }
        }
        3 => F::Birthday {
            op: pick(r, OPS),
            date: format!("19{:02}-0{}-15", r.u8(80..99), r.u8(1..=9)),
        },
        4 => F::Bool {
            field: pick(r, &["email_verified", "phone_number_verified"]),
            equal: r.bool(),
            value: r.bool(),
        },
        5 => F::State {
            equal: r.bool(),
            state: pick(r, STATES),
        },
        6 | 7 => {
            let field = pick(r, &["tags", "roles"]);
            let vocab = if field == "tags" { TAGS } else { ROLES };
            match r.u8(..4) {
                0 => F::Has {
                    field,
                    value: None,
                    prefix: false,
                },
                1 => {
                    let v = pick(r, vocab);
                    F::Has {
                        field,
                        value: Some(v[..r.usize(..v.len())].to_string()),
                        prefix: true,
                    }
                }
                _ => F::Has {
                    field,
                    value: Some(pick(r, vocab).to_string()),
                    prefix: false,
                },
            }
        }
        8 => F::HasKey(pick(r, META_KEYS)),
        _ => {
            let (lead, trail) = if r.bool() {
                (false, false)
            } else {
                (r.bool(), r.bool())
            };
            let raw = pick(r, META_VALUES).to_string();
            let value = if lead || trail {
                let chars: Vec<char> = raw.chars().collect();
                chars[..r.usize(..=chars.len())].iter().collect()
            } else {
                raw
            };
            F::Meta {
                key: pick(r, META_KEYS),
                op: if lead || trail {
                    pick(r, &["=", "!="])
                } else {
                    pick(r, OPS)
                },
                lead,
                trail,
                value,
            }
        }
    }
}

fn gen_filter(r: &mut fastrand::Rng, users: &[pb::User], depth: u32) -> F {
    if depth == 0 || r.u8(..3) == 0 {
        return gen_leaf(r, users);
    }
    match r.u8(..3) {
        0 => F::Not(Box::new(gen_filter(r, users, depth - 1))),
        1 => F::And(
            (0..r.usize(2..4))
                .map(|_| gen_filter(r, users, depth - 1))
                .collect(),
        ),
        _ => F::Or(
            (0..r.usize(2..4))
                .map(|_| gen_filter(r, users, depth - 1))
                .collect(),
        ),
    }
}

fn random_user(r: &mut fastrand::Rng, i: usize) -> pb::User {
    let subset = |r: &mut fastrand::Rng, vocab: &[&str]| -> Vec<String> {
        vocab
            .iter()
            .filter(|_| r.u8(..3) == 0)
            .map(|s| s.to_string())
            .collect()
    };
    let mut metadata = BTreeMap::new();
    for k in META_KEYS {
        if r.bool() {
            metadata.insert(k.to_string(), pick(r, META_VALUES).to_string());
        }
    }
    let with_email = r.u8(..4) != 0;
    pb::User {
        email: if with_email {
            format!(
                "{}{i}@{}",
                pick(r, &["Ann", "bob", "Zoë", "x"]),
                pick(r, &["example.com", "Example.org", "b.io"])
            )
        } else {
            String::new()
        },
        email_verified: r.bool(),
        phone_number: if !with_email || r.bool() {
            format!("+4791{:06}", i * 7 + r.usize(..5))
        } else {
            String::new()
        },
        phone_number_verified: r.bool(),
        username: if r.bool() {
            format!("{}{i}", pick(r, &["ann", "bo.b", "z_"]))
        } else {
            String::new()
        },
        external_id: if r.bool() {
            format!("ext-{}-{i}", r.u16(..))
        } else {
            String::new()
        },
        display_name: pick(r, NAMES).to_string(),
        family_name: pick(r, NAMES).to_string(),
        title: pick(r, &["", "Dr", "Ms"]).to_string(),
        tags: subset(r, TAGS),
        roles: subset(r, ROLES),
        metadata: metadata.into_iter().collect(),
        birthday: r.bool().then(|| Date {
            year: 1980 + r.i32(0..20),
            month: r.i32(1..=9),
            day: 15,
        }),
        last_login_time: r.bool().then(|| prost_types::Timestamp {
            seconds: 1_700_000_000 + r.i64(0..1000),
            nanos: r.i32(0..1_000_000_000),
        }),
        ..Default::default()
    }
}

async fn filters_agree_with_an_in_memory_evaluation(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let seed = std::env::var("FILTER_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("filter property seed {seed} (FILTER_SEED to replay)");
    let mut r = fastrand::Rng::with_seed(seed);
    for i in 0..40 {
        let u = create(&mut c, random_user(&mut r, i)).await;
        match r.u8(..6) {
            0 => {
                c.disable_user(pb::DisableUserRequest {
                    name: u.name.clone(),
                    ..Default::default()
                })
                .await
                .unwrap();
            }
            1 => {
                c.delete_user(pb::DeleteUserRequest {
                    name: u.name.clone(),
                    ..Default::default()
                })
                .await
                .unwrap();
            }
            _ => {}
        }
    }
    create_in(&mut c, "projects/other", random_user(&mut r, 99)).await;
    let stored = list_all(
        &mut c,
        pb::ListUsersRequest {
            show_deleted: true,
            ..list_req("", "")
        },
    )
    .await;
    assert_eq!(stored.len(), 40);

    for case in 0..CASES {
        let f = gen_filter(&mut r, &stored, 3);
        let text = render(&f);
        let show_deleted = r.bool();
        // A quarter of the cases are SearchUsers: a prefix of some user's
        // searchable value, in a random case.
        let search = (r.u8(..4) == 0).then(|| search_prefix(&mut r, &stored));
        let mut want: Vec<&pb::User> = stored
            .iter()
            .filter(|u| show_deleted || u.state != pb::user::State::Deleted as i32)
            .filter(|u| eval(&f, u))
            .filter(|u| search.as_ref().is_none_or(|q| search_key(u, q).is_some()))
            .collect();
        let got = match &search {
            None => {
                // Newest first, ties by id, newest id first.
                want.sort_by_key(|u| std::cmp::Reverse((create_nanos(u), u.name.clone())));
                list_all(
                    &mut c,
                    pb::ListUsersRequest {
                        show_deleted,
                        page_size: 7,
                        ..list_req(&text, "")
                    },
                )
                .await
            }
            Some(q) => {
                // Best match: the smallest matching value, then oldest first.
                want.sort_by_key(|u| (search_key(u, q), create_nanos(u), u.name.clone()));
                search_all(&mut c, q, &text, show_deleted).await
            }
        };
        let got: Vec<&str> = got.iter().map(|u| u.name.as_str()).collect();
        let want: Vec<&str> = want.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(
            got, want,
            "case {case} (seed {seed}), show_deleted {show_deleted}, search {search:?}: {text}"
        );
        if search.is_some() {
            continue;
        }
        let n = c
            .count_users(pb::CountUsersRequest {
                parent: PROJECT.into(),
                filter: text.clone(),
                show_deleted,
            })
            .await
            .unwrap()
            .into_inner()
            .total_size;
        assert_eq!(n as usize, want.len(), "count, case {case}: {text}");
    }
}

fn create_nanos(u: &pb::User) -> i128 {
    let t = u.create_time.expect("create_time");
    i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos)
}

/// The values SearchUsers matches, lower-cased.
fn searchable(u: &pb::User) -> Vec<String> {
    [
        &u.email,
        &u.phone_number,
        &u.username,
        &u.display_name,
        &u.given_name,
        &u.family_name,
    ]
    .into_iter()
    .filter(|v| !v.is_empty())
    .map(|v| v.to_lowercase())
    .collect()
}

/// The smallest searchable value of `u` starting with `q` (case-insensitive).
fn search_key(u: &pb::User, q: &str) -> Option<String> {
    let q = q.to_lowercase();
    searchable(u)
        .into_iter()
        .filter(|v| v.starts_with(&q))
        .min()
}

fn search_prefix(r: &mut fastrand::Rng, users: &[pb::User]) -> String {
    let values: Vec<String> = users.iter().flat_map(searchable).collect();
    let v: Vec<char> = values[r.usize(..values.len())].chars().collect();
    let p: String = v[..r.usize(1..=v.len().min(6))].iter().collect();
    if r.bool() { p.to_uppercase() } else { p }
}

async fn search_all(
    c: &mut crate::list::Client,
    query: &str,
    filter: &str,
    show_deleted: bool,
) -> Vec<pb::User> {
    let mut req = pb::SearchUsersRequest {
        parent: PROJECT.into(),
        query: query.into(),
        filter: filter.into(),
        show_deleted,
        page_size: 3,
        ..Default::default()
    };
    let mut out = Vec::new();
    loop {
        let page = match c.search_users(req.clone()).await {
            Ok(p) => p.into_inner(),
            Err(e) => panic!("search {query:?} {filter:?}: {e:?}"),
        };
        out.extend(page.users);
        if page.next_page_token.is_empty() {
            return out;
        }
        req.page_token = page.next_page_token;
    }
}

both_engines!(filters_agree_with_an_in_memory_evaluation);
