//! Tenant isolation: with a token for one project, no RPC returns anything of
//! another project or changes anything in it, whatever names, parents,
//! filters, page tokens or resume tokens it carries. A refusal is decided
//! before any lookup, so it reads the same whether the foreign user (or a
//! match of the filter) exists or not.
//!
//! Randomised: the seed is printed; `ISOLATION_SEED=<seed>` replays a run
//! (the server's generated ids differ between runs, the choices do not).

use std::collections::{BTreeMap, BTreeSet};

use prost::Message;
use tonic::{Code, Status};
use tonic_types::StatusExt;
use user_service::proto::users::v1 as pb;
use user_service::proto::users::v1::lookup_user_request::Identifier;
use user_service::proto::users::v1::user::State;

use crate::both_engines;
use crate::harness::*;

const PROJECTS: [&str; 3] = ["iso-a", "iso-b", "iso-c"];
const TAGS: [&str; 4] = ["red", "green", "blue", "vip"];
const PLANS: [&str; 3] = ["free", "pro", "team"];
const GIVEN: [&str; 5] = ["Ann", "Bob", "Cy", "Dora", "Eli"];
const FAMILY: [&str; 4] = ["Archer", "Baker", "Cole", "Dunn"];
const ORDERS: [&str; 6] = [
    "",
    "email",
    "create_time",
    "display_name desc",
    "username",
    "update_time desc",
];
const SEARCHES: [&str; 8] = ["u", "u1", "user", "user1", "ann", "bo", "d", "renamed"];
/// Random operations per round; each of the three projects is the token's
/// project for one round.
const STEPS_PER_ROUND: usize = 40;

fn seed() -> u64 {
    let seed = match std::env::var("ISOLATION_SEED") {
        Ok(s) => s.trim().parse().expect("ISOLATION_SEED must be a u64"),
        Err(_) => fastrand::u64(..),
    };
    eprintln!("isolation: seed {seed} (replay with ISOLATION_SEED={seed})");
    seed
}

fn parent(project: &str) -> String {
    format!("projects/{project}")
}

fn prefix(project: &str) -> String {
    format!("projects/{project}/users/")
}

/// The `{user}` of a user's name.
fn id_of(name: &str) -> &str {
    name.rsplit_once('/').map_or(name, |(_, id)| id)
}

fn is_deleted(u: &User) -> bool {
    u.state == State::Deleted as i32
}

fn pick<T: Copy>(rng: &mut fastrand::Rng, xs: &[T]) -> T {
    xs[rng.usize(..xs.len())]
}

/// A valid user numbered `serial`. Projects number their first users from 0,
/// so the same email, username and external id exist in several projects.
fn make_user(rng: &mut fastrand::Rng, serial: usize) -> User {
    let given = pick(rng, &GIVEN);
    let family = pick(rng, &FAMILY);
    let domain = if rng.bool() {
        "example.com"
    } else {
        "example.org"
    };
    let mut tags = Vec::new();
    for t in TAGS {
        if rng.u8(..3) == 0 {
            tags.push(t.to_owned());
        }
    }
    let mut u = User {
        email: format!("u{serial}@{domain}"),
        username: format!("user{serial}"),
        external_id: format!("ext-{serial}"),
        given_name: given.to_owned(),
        family_name: family.to_owned(),
        display_name: format!("{given} {family}"),
        tags,
        ..Default::default()
    };
    if rng.u8(..4) != 0 {
        u.metadata
            .insert("plan".to_owned(), pick(rng, &PLANS).to_owned());
    }
    u
}

/// Stores 5 to 14 users in `project`, some pending, disabled or deleted.
async fn populate(admin: &mut Client, rng: &mut fastrand::Rng, project: &str) {
    let n = rng.usize(5..15);
    let mut requests = Vec::new();
    for i in 0..n {
        let user = make_user(rng, i);
        // Chosen ids repeat across projects too.
        let user_id = if rng.bool() {
            format!("m{i}")
        } else {
            String::new()
        };
        let initial_state = if rng.u8(..5) == 0 {
            State::Pending as i32
        } else {
            0
        };
        requests.push(pb::CreateUserRequest {
            user: Some(user),
            user_id,
            initial_state,
            ..Default::default()
        });
    }
    let created = admin
        .batch_create_users(pb::BatchCreateUsersRequest {
            parent: parent(project),
            requests,
            request_id: String::new(),
        })
        .await
        .expect("populate")
        .into_inner()
        .users;
    for u in created {
        match rng.u8(..6) {
            0 => {
                admin
                    .disable_user(pb::DisableUserRequest {
                        name: u.name,
                        etag: String::new(),
                    })
                    .await
                    .expect("disable");
            }
            1 => {
                admin
                    .delete_user(pb::DeleteUserRequest {
                        name: u.name,
                        ..Default::default()
                    })
                    .await
                    .expect("delete");
            }
            _ => {}
        }
    }
}

/// Every message of an export.
async fn stream_all(
    c: &mut Client,
    req: pb::StreamUsersRequest,
) -> Result<Vec<pb::StreamUsersResponse>, Status> {
    let mut s = c.stream_users(req).await?.into_inner();
    let mut out = Vec::new();
    while let Some(m) = s.message().await? {
        out.push(m);
    }
    Ok(out)
}

/// Every user of `project`, deleted ones included, by name.
async fn export(c: &mut Client, project: &str) -> BTreeMap<String, User> {
    let messages = stream_all(
        c,
        pb::StreamUsersRequest {
            parent: parent(project),
            show_deleted: true,
            batch_size: 1000,
            ..Default::default()
        },
    )
    .await
    .expect("export");
    messages
        .into_iter()
        .flat_map(|m| m.users)
        .map(|u| (u.name.clone(), u))
        .collect()
}

async fn count_of(c: &mut Client, project: &str, filter: &str, show_deleted: bool) -> i64 {
    c.count_users(pb::CountUsersRequest {
        parent: parent(project),
        filter: filter.to_owned(),
        show_deleted,
    })
    .await
    .expect("count")
    .into_inner()
    .total_size
}

/// Sends `messages` as one import and collects every acknowledgement.
async fn import_all(
    c: &mut Client,
    messages: Vec<pb::ImportUsersRequest>,
) -> Result<Vec<pb::ImportUsersResponse>, Status> {
    let mut s = c
        .import_users(tokio_stream::iter(messages))
        .await?
        .into_inner();
    let mut acks = Vec::new();
    while let Some(a) = s.message().await? {
        acks.push(a);
    }
    Ok(acks)
}

/// An import failure as the status a client would have received.
fn failure_status(f: &pb::ImportFailure) -> Status {
    let st = f.status.clone().expect("a failure carries a status");
    Status::with_details(
        Code::from(st.code),
        st.message.clone(),
        st.encode_to_vec().into(),
    )
}

async fn lookup(c: &mut Client, project: &str, id: Option<Identifier>) -> Result<User, Status> {
    c.lookup_user(pb::LookupUserRequest {
        parent: parent(project),
        identifier: id,
    })
    .await
    .map(tonic::Response::into_inner)
}

/// Asserts that every answer is the same PROJECT_NOT_GRANTED refusal naming
/// `project`: the caller cannot tell an existing user, or a filter that
/// matches, from nothing.
#[track_caller]
fn same_refusal<T: std::fmt::Debug>(at: &str, project: &str, answers: Vec<Result<T, Status>>) {
    let shapes: Vec<(String, Vec<(String, String)>)> = answers
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let s = match r {
                Ok(v) => panic!("{at}: call {i} on project {project} was answered: {v:?}"),
                Err(s) => s,
            };
            assert_eq!(s.code(), Code::PermissionDenied, "{at}: call {i}: {s:?}");
            assert_eq!(reason(&s), "PROJECT_NOT_GRANTED", "{at}: call {i}: {s:?}");
            let info = s
                .get_error_details()
                .error_info()
                .cloned()
                .expect("an ErrorInfo");
            assert_eq!(
                info.metadata.get("project").map(String::as_str),
                Some(project),
                "{at}: call {i}: {s:?}"
            );
            let mut metadata: Vec<(String, String)> = info.metadata.into_iter().collect();
            metadata.sort();
            (s.message().to_owned(), metadata)
        })
        .collect();
    for (i, shape) in shapes.iter().enumerate().skip(1) {
        assert_eq!(
            shape, &shapes[0],
            "{at}: call {i} was refused differently from call 0"
        );
    }
}

/// A filter, with what it selects among the users of the token's project.
#[derive(Clone, Debug)]
enum Filt {
    All,
    Tag(&'static str),
    NotTag(&'static str),
    AnyTag(&'static str, &'static str),
    Plan(&'static str),
    TagAndPlan(&'static str, &'static str),
    State(State),
    Domain(&'static str),
    /// `name = "projects/*"`: every user of the parent.
    AnyProject,
    /// `name = "projects/{other}/users/*"`.
    ProjectPrefix(String),
    /// `name = "<a user of another project>"`.
    Name(String),
    /// `name != "<a user of another project>"`.
    NotName(String),
}

impl Filt {
    fn text(&self) -> String {
        match self {
            Filt::All => String::new(),
            Filt::Tag(t) => format!("tags:\"{t}\""),
            Filt::NotTag(t) => format!("NOT tags:\"{t}\""),
            Filt::AnyTag(a, b) => format!("tags:\"{a}\" OR tags:\"{b}\""),
            Filt::Plan(p) => format!("metadata.plan = \"{p}\""),
            Filt::TagAndPlan(t, p) => format!("tags:\"{t}\" AND metadata.plan = \"{p}\""),
            Filt::State(s) => format!("state = {}", s.as_str_name()),
            Filt::Domain(d) => format!("email = \"*@{d}\""),
            Filt::AnyProject => "name = \"projects/*\"".to_owned(),
            Filt::ProjectPrefix(p) => format!("name = \"projects/{p}/users/*\""),
            Filt::Name(n) => format!("name = \"{n}\""),
            Filt::NotName(n) => format!("name != \"{n}\""),
        }
    }

    /// Whether a user of the parent project matches.
    fn matches(&self, u: &User) -> bool {
        let tag = |t: &str| u.tags.iter().any(|x| x == t);
        let plan = u.metadata.get("plan").map(String::as_str);
        match self {
            Filt::All | Filt::AnyProject | Filt::NotName(_) => true,
            // Names of another project match nothing here.
            Filt::ProjectPrefix(_) | Filt::Name(_) => false,
            Filt::Tag(t) => tag(t),
            Filt::NotTag(t) => !tag(t),
            Filt::AnyTag(a, b) => tag(a) || tag(b),
            Filt::Plan(p) => plan == Some(*p),
            Filt::TagAndPlan(t, p) => tag(t) && plan == Some(*p),
            Filt::State(s) => u.state == *s as i32,
            Filt::Domain(d) => u.email.ends_with(&format!("@{d}")),
        }
    }
}

/// A filter for a query whose other project is `other`, with `other_name` a
/// user of it.
fn pick_filter(rng: &mut fastrand::Rng, other: &str, other_name: &str) -> Filt {
    match rng.usize(..12) {
        0 => Filt::All,
        1 => Filt::Tag(pick(rng, &TAGS)),
        2 => Filt::NotTag(pick(rng, &TAGS)),
        3 => Filt::AnyTag(pick(rng, &TAGS), pick(rng, &TAGS)),
        4 => Filt::Plan(pick(rng, &PLANS)),
        5 => Filt::TagAndPlan(pick(rng, &TAGS), pick(rng, &PLANS)),
        6 => Filt::State(pick(rng, &[State::Active, State::Disabled, State::Pending])),
        7 => Filt::Domain(pick(rng, &["example.com", "example.org"])),
        8 => Filt::AnyProject,
        9 => Filt::ProjectPrefix(other.to_owned()),
        10 => Filt::Name(other_name.to_owned()),
        _ => Filt::NotName(other_name.to_owned()),
    }
}

/// Whether SearchUsers finds `u` for `query`.
fn search_hit(u: &User, query: &str) -> bool {
    let q = query.to_lowercase();
    [
        &u.email,
        &u.phone_number,
        &u.username,
        &u.display_name,
        &u.given_name,
        &u.family_name,
    ]
    .iter()
    .any(|v| v.to_lowercase().starts_with(&q))
}

/// The calls that name one user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NameRpc {
    Get,
    Update,
    Delete { allow_missing: bool },
    Erase,
    Undelete,
    Activate,
    Disable,
}

impl NameRpc {
    fn from_index(k: usize, allow_missing: bool) -> Self {
        match k {
            0 => NameRpc::Get,
            1 => NameRpc::Update,
            2 => NameRpc::Delete { allow_missing },
            3 => NameRpc::Erase,
            4 => NameRpc::Undelete,
            5 => NameRpc::Activate,
            _ => NameRpc::Disable,
        }
    }
}

/// `rpc` on `name`, conditional on `etag` when not empty; an update sets the
/// display name to `label`.
async fn call(
    c: &mut Client,
    rpc: NameRpc,
    name: &str,
    etag: &str,
    label: &str,
) -> Result<User, Status> {
    let name = name.to_owned();
    let etag = etag.to_owned();
    let r = match rpc {
        NameRpc::Get => c.get_user(pb::GetUserRequest { name }).await,
        NameRpc::Update => {
            c.update_user(pb::UpdateUserRequest {
                user: Some(User {
                    name,
                    etag,
                    display_name: label.to_owned(),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["display_name".to_owned()],
                }),
            })
            .await
        }
        NameRpc::Delete { allow_missing } => {
            c.delete_user(pb::DeleteUserRequest {
                name,
                etag,
                allow_missing,
                force: false,
            })
            .await
        }
        NameRpc::Erase => {
            c.delete_user(pb::DeleteUserRequest {
                name,
                etag,
                allow_missing: false,
                force: true,
            })
            .await
        }
        NameRpc::Undelete => {
            c.undelete_user(pb::UndeleteUserRequest { name, etag })
                .await
        }
        NameRpc::Activate => {
            c.activate_user(pb::ActivateUserRequest { name, etag })
                .await
        }
        NameRpc::Disable => c.disable_user(pb::DisableUserRequest { name, etag }).await,
    };
    r.map(tonic::Response::into_inner)
}

/// How the token's own project refuses `rpc` on an existing user, if it does.
fn own_refusal(rpc: NameRpc, deleted: bool) -> Option<(Code, &'static str)> {
    match rpc {
        NameRpc::Update if deleted => Some((Code::FailedPrecondition, "USER_DELETED")),
        NameRpc::Delete {
            allow_missing: false,
        } if deleted => Some((Code::NotFound, "USER_ALREADY_DELETED")),
        NameRpc::Undelete if !deleted => Some((Code::AlreadyExists, "USER_NOT_DELETED")),
        NameRpc::Activate | NameRpc::Disable if deleted => {
            Some((Code::FailedPrecondition, "INVALID_STATE_TRANSITION"))
        }
        _ => None,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Read {
    List,
    Search,
    Count,
    Stream,
}

/// The parameters of a read (ListUsers, SearchUsers, CountUsers, StreamUsers).
#[derive(Clone, Debug, Default)]
struct Query {
    parent: String,
    filter: String,
    order_by: String,
    show_deleted: bool,
    /// page_size or batch_size.
    size: i32,
    /// page_token or resume_token.
    token: String,
    /// SearchUsers' query.
    text: String,
}

/// What a read answered.
#[derive(Debug)]
struct Answer {
    users: Vec<User>,
    /// The next page token, or the resume token of the last message.
    next: String,
    count: Option<i64>,
}

/// One call: one page, one count, or one whole stream.
async fn read_once(c: &mut Client, kind: Read, q: &Query) -> Result<Answer, Status> {
    match kind {
        Read::List => {
            let r = c
                .list_users(pb::ListUsersRequest {
                    parent: q.parent.clone(),
                    page_size: q.size,
                    page_token: q.token.clone(),
                    filter: q.filter.clone(),
                    order_by: q.order_by.clone(),
                    show_deleted: q.show_deleted,
                })
                .await?
                .into_inner();
            Ok(Answer {
                users: r.users,
                next: r.next_page_token,
                count: None,
            })
        }
        Read::Search => {
            let r = c
                .search_users(pb::SearchUsersRequest {
                    parent: q.parent.clone(),
                    query: q.text.clone(),
                    filter: q.filter.clone(),
                    order_by: q.order_by.clone(),
                    page_size: q.size,
                    page_token: q.token.clone(),
                    show_deleted: q.show_deleted,
                })
                .await?
                .into_inner();
            Ok(Answer {
                users: r.users,
                next: r.next_page_token,
                count: None,
            })
        }
        Read::Count => {
            let r = c
                .count_users(pb::CountUsersRequest {
                    parent: q.parent.clone(),
                    filter: q.filter.clone(),
                    show_deleted: q.show_deleted,
                })
                .await?
                .into_inner();
            Ok(Answer {
                users: Vec::new(),
                next: String::new(),
                count: Some(r.total_size),
            })
        }
        Read::Stream => {
            let messages = stream_all(
                c,
                pb::StreamUsersRequest {
                    parent: q.parent.clone(),
                    filter: q.filter.clone(),
                    order_by: q.order_by.clone(),
                    show_deleted: q.show_deleted,
                    resume_token: q.token.clone(),
                    batch_size: q.size,
                },
            )
            .await?;
            let next = messages
                .last()
                .map(|m| m.resume_token.clone())
                .unwrap_or_default();
            Ok(Answer {
                users: messages.into_iter().flat_map(|m| m.users).collect(),
                next,
                count: None,
            })
        }
    }
}

/// Every page of a read.
async fn read_all(c: &mut Client, kind: Read, mut q: Query) -> Result<Answer, Status> {
    let mut users = Vec::new();
    for _ in 0..1000 {
        let a = read_once(c, kind, &q).await?;
        users.extend(a.users);
        if a.count.is_some() || a.next.is_empty() || kind == Read::Stream {
            return Ok(Answer {
                users,
                next: String::new(),
                count: a.count,
            });
        }
        q.token = a.next;
    }
    panic!("the pages never ended");
}

#[derive(Clone, Copy, Debug)]
enum Ident {
    Email,
    Username,
    ExternalId,
}

impl Ident {
    fn of(self, u: &User) -> String {
        match self {
            Ident::Email => u.email.clone(),
            Ident::Username => u.username.clone(),
            Ident::ExternalId => u.external_id.clone(),
        }
    }

    fn ask(self, value: String) -> Identifier {
        match self {
            Ident::Email => Identifier::Email(value),
            Ident::Username => Identifier::Username(value),
            Ident::ExternalId => Identifier::ExternalId(value),
        }
    }
}

struct World {
    seed: u64,
    rng: fastrand::Rng,
    /// All projects, all scopes: sets up and checks.
    admin: Client,
    /// The project the round's token grants, and a client sending it.
    own: &'static str,
    c: Client,
    /// Every user of `own` as the last answer about it showed it.
    model: BTreeMap<String, User>,
    /// Every id ever used in `own`, erased ones included.
    taken: BTreeSet<String>,
    /// The other projects as they were when the round began.
    snapshot: BTreeMap<String, BTreeMap<String, User>>,
    /// Numbers the users made during the rounds (beyond those of populate).
    serial: usize,
    /// The step of the round.
    n: usize,
}

impl World {
    fn at(&self) -> String {
        format!("seed {}, token of {}, step {}", self.seed, self.own, self.n)
    }

    fn log(&self, what: &str) {
        eprintln!("{}: {what}", self.at());
    }

    /// A project the token does not grant.
    fn foreign(&mut self) -> &'static str {
        let others: Vec<&'static str> = PROJECTS.into_iter().filter(|p| *p != self.own).collect();
        pick(&mut self.rng, &others)
    }

    /// A user of the foreign project `f`, deleted ones included.
    fn foreign_user(&mut self, f: &str) -> User {
        let users: Vec<&User> = self.snapshot[f].values().collect();
        users[self.rng.usize(..users.len())].clone()
    }

    fn own_user(&mut self) -> Option<User> {
        if self.model.is_empty() {
            return None;
        }
        let i = self.rng.usize(..self.model.len());
        self.model.values().nth(i).cloned()
    }

    /// The name of a user `project` does not have.
    fn ghost(&mut self, project: &str) -> String {
        format!("{}ghost-{}", prefix(project), self.rng.u32(..))
    }

    fn fresh_user(&mut self) -> User {
        self.serial += 1;
        make_user(&mut self.rng, self.serial)
    }

    fn label(&mut self) -> String {
        format!("Renamed {}", self.rng.u32(..))
    }

    /// Starts the round of `own`'s token: notes every project as it is.
    async fn begin(&mut self, own: &'static str, c: Client) {
        self.own = own;
        self.c = c;
        self.n = 0;
        self.snapshot.clear();
        for p in PROJECTS {
            let users = export(&mut self.admin, p).await;
            let live = users.values().filter(|u| !is_deleted(u)).count() as i64;
            assert_eq!(count_of(&mut self.admin, p, "", false).await, live);
            assert_eq!(
                count_of(&mut self.admin, p, "", true).await,
                users.len() as i64
            );
            if p == own {
                self.model = users;
            } else {
                self.snapshot.insert(p.to_owned(), users);
            }
        }
        self.taken = self.model.keys().map(|n| id_of(n).to_owned()).collect();
        // A filter has no way to name a project.
        let f = self.foreign();
        let q = Query {
            parent: parent(own),
            filter: format!("project = \"{f}\""),
            ..Default::default()
        };
        assert_error(
            read_once(&mut self.c, Read::Count, &q).await,
            Code::InvalidArgument,
            "INVALID_FILTER",
        );
    }

    async fn step(&mut self) {
        self.n += 1;
        let foreign = self.rng.u8(..5) < 3;
        match self.rng.usize(..16) {
            k @ 0..=6 => {
                let rpc = NameRpc::from_index(k, self.rng.bool());
                if foreign {
                    self.foreign_name_rpc(rpc).await;
                } else {
                    self.own_name_rpc(rpc).await;
                }
            }
            7 if foreign => self.foreign_lookup().await,
            7 => self.own_lookup().await,
            k @ 8..=11 => {
                let kind = [Read::List, Read::Search, Read::Count, Read::Stream][k - 8];
                if foreign {
                    self.foreign_read(kind).await;
                } else {
                    self.own_read(kind).await;
                }
            }
            12 if foreign => self.foreign_batch_get().await,
            12 => self.own_batch_get().await,
            13 if foreign => self.foreign_batch_create().await,
            13 => self.own_batch_create().await,
            14 if foreign => self.foreign_import().await,
            14 => self.own_import().await,
            _ => self.foreign_tokens().await,
        }
    }

    /// Every foreign project is exactly as it was; the own one is what the
    /// answers of the round said.
    async fn verify(&mut self) {
        let at = self.at();
        for (p, before) in &self.snapshot {
            let after = export(&mut self.admin, p).await;
            for (name, u) in before {
                assert_eq!(after.get(name), Some(u), "{at}: {name} changed or vanished");
            }
            for name in after.keys() {
                assert!(before.contains_key(name), "{at}: {name} appeared in {p}");
            }
            let live = before.values().filter(|u| !is_deleted(u)).count() as i64;
            assert_eq!(
                count_of(&mut self.admin, p, "", false).await,
                live,
                "{at}: count of {p}"
            );
            assert_eq!(
                count_of(&mut self.admin, p, "", true).await,
                before.len() as i64,
                "{at}: count of {p} with deleted users"
            );
            for t in TAGS {
                let want = before
                    .values()
                    .filter(|u| !is_deleted(u) && u.tags.iter().any(|x| x == t))
                    .count() as i64;
                let filter = format!("tags:\"{t}\"");
                assert_eq!(
                    count_of(&mut self.admin, p, &filter, false).await,
                    want,
                    "{at}: count of {p} tagged {t}"
                );
            }
        }
        let own = export(&mut self.admin, self.own).await;
        assert_eq!(
            own, self.model,
            "{at}: the own project differs from the answers"
        );
    }

    async fn foreign_name_rpc(&mut self, rpc: NameRpc) {
        let f = self.foreign();
        let target = self.foreign_user(f);
        let ghost = self.ghost(f);
        let label = self.label();
        // The id of a user of the own project, which f may have or not.
        let borrowed = self
            .own_user()
            .map(|u| format!("{}{}", prefix(f), id_of(&u.name)));
        self.log(&format!(
            "{rpc:?} on {} / {ghost} / {borrowed:?}",
            target.name
        ));
        let mut answers = vec![
            call(&mut self.c, rpc, &target.name, &target.etag, &label).await,
            call(&mut self.c, rpc, &ghost, &target.etag, &label).await,
        ];
        if let Some(name) = &borrowed {
            answers.push(call(&mut self.c, rpc, name, &target.etag, &label).await);
        }
        same_refusal(&self.at(), f, answers);
    }

    async fn own_name_rpc(&mut self, rpc: NameRpc) {
        let own = self.own;
        let label = self.label();
        let target = if self.rng.u8(..8) == 0 {
            None
        } else {
            self.own_user()
        };
        let Some(target) = target else {
            let name = self.ghost(own);
            self.log(&format!("{rpc:?} on {name}, which {own} lacks"));
            let r = call(&mut self.c, rpc, &name, "", &label).await;
            if matches!(
                rpc,
                NameRpc::Delete {
                    allow_missing: true
                }
            ) {
                let u = r.unwrap_or_else(|e| panic!("{}: {e:?}", self.at()));
                let want = User {
                    name,
                    ..Default::default()
                };
                assert_eq!(u, want, "{}", self.at());
            } else {
                assert_error(r, Code::NotFound, "USER_NOT_FOUND");
            }
            return;
        };
        let etag = if self.rng.bool() {
            target.etag.clone()
        } else {
            String::new()
        };
        self.log(&format!(
            "{rpc:?} on {} ({:?}), etag {etag:?}",
            target.name,
            State::try_from(target.state)
        ));
        let r = call(&mut self.c, rpc, &target.name, &etag, &label).await;
        if let Some((code, why)) = own_refusal(rpc, is_deleted(&target)) {
            assert_error(r, code, why);
            return;
        }
        let at = self.at();
        let u = r.unwrap_or_else(|e| panic!("{at}: {rpc:?} {}: {e:?}", target.name));
        assert_eq!(u.name, target.name, "{at}");
        match rpc {
            NameRpc::Get => assert_eq!(u, target, "{at}"),
            NameRpc::Update => {
                assert_eq!(u.display_name, label, "{at}");
                assert_eq!(u.state, target.state, "{at}");
            }
            NameRpc::Delete { .. } => {
                assert!(is_deleted(&u), "{at}");
                if is_deleted(&target) {
                    assert_eq!(u, target, "{at}");
                }
            }
            NameRpc::Erase => {}
            NameRpc::Undelete => assert!(!is_deleted(&u), "{at}"),
            NameRpc::Activate => assert_eq!(u.state, State::Active as i32, "{at}"),
            NameRpc::Disable => assert_eq!(u.state, State::Disabled as i32, "{at}"),
        }
        if rpc == NameRpc::Erase {
            self.model.remove(&u.name);
            assert_error(
                get(&mut self.c, &u.name).await,
                Code::NotFound,
                "USER_NOT_FOUND",
            );
        } else {
            self.model.insert(u.name.clone(), u);
        }
    }

    async fn foreign_lookup(&mut self) {
        let f = self.foreign();
        let target = self.foreign_user(f);
        let k = pick(
            &mut self.rng,
            &[Ident::Email, Ident::Username, Ident::ExternalId],
        );
        let n = self.rng.u32(..);
        let ghost = match k {
            Ident::Email => format!("ghost{n}@example.com"),
            Ident::Username => format!("ghost{n}"),
            Ident::ExternalId => format!("ghost-{n}"),
        };
        self.log(&format!(
            "lookup {k:?} in {f}: {} / {ghost} / nothing",
            k.of(&target)
        ));
        let answers = vec![
            lookup(&mut self.c, f, Some(k.ask(k.of(&target)))).await,
            lookup(&mut self.c, f, Some(k.ask(ghost))).await,
            lookup(&mut self.c, f, None).await,
        ];
        same_refusal(&self.at(), f, answers);
    }

    /// Identifiers repeat across projects: one of another project's users
    /// finds the own project's namesake, or nothing.
    async fn own_lookup(&mut self) {
        let own = self.own;
        let k = pick(
            &mut self.rng,
            &[Ident::Email, Ident::Username, Ident::ExternalId],
        );
        let mine = self.rng.bool();
        let source = match (self.own_user(), mine) {
            (Some(u), true) => u,
            _ => {
                let f = self.foreign();
                self.foreign_user(f)
            }
        };
        let value = k.of(&source);
        let want = self
            .model
            .values()
            .find(|u| !is_deleted(u) && k.of(u) == value)
            .cloned();
        self.log(&format!(
            "lookup {k:?} {value} (of {}), expecting {:?}",
            source.name,
            want.as_ref().map(|u| &u.name)
        ));
        let r = lookup(&mut self.c, own, Some(k.ask(value))).await;
        match want {
            Some(u) => {
                let got = r.unwrap_or_else(|e| panic!("{}: {e:?}", self.at()));
                assert_eq!(got, u, "{}", self.at());
            }
            None => {
                assert_error(r, Code::NotFound, "USER_NOT_FOUND");
            }
        }
    }

    /// A query on `project` with random parameters.
    fn query(&mut self, project: &str, filt: &Filt) -> Query {
        Query {
            parent: parent(project),
            filter: filt.text(),
            order_by: pick(&mut self.rng, &ORDERS).to_owned(),
            show_deleted: self.rng.bool(),
            size: self.rng.i32(1..6),
            token: String::new(),
            text: pick(&mut self.rng, &SEARCHES).to_owned(),
        }
    }

    /// Filters (naming other projects' users or not) select own users only:
    /// exactly those the model says, as they are.
    async fn own_read(&mut self, kind: Read) {
        let own = self.own;
        let f = self.foreign();
        let other = self.foreign_user(f);
        let filt = pick_filter(&mut self.rng, f, &other.name);
        let q = self.query(own, &filt);
        let want: BTreeSet<String> = self
            .model
            .values()
            .filter(|u| {
                (q.show_deleted || !is_deleted(u))
                    && filt.matches(u)
                    && (kind != Read::Search || search_hit(u, &q.text))
            })
            .map(|u| u.name.clone())
            .collect();
        self.log(&format!("{kind:?} {q:?}: expecting {} users", want.len()));
        let at = self.at();
        let a = read_all(&mut self.c, kind, q)
            .await
            .unwrap_or_else(|e| panic!("{at}: {e:?}"));
        if let Some(n) = a.count {
            assert_eq!(n, want.len() as i64, "{at}");
            return;
        }
        let own_prefix = prefix(own);
        for u in &a.users {
            assert!(
                u.name.starts_with(&own_prefix),
                "{at}: {} answered to a token of {own}",
                u.name
            );
            assert_eq!(Some(u), self.model.get(&u.name), "{at}");
        }
        let got: BTreeSet<String> = a.users.iter().map(|u| u.name.clone()).collect();
        assert_eq!(got.len(), a.users.len(), "{at}: a user came twice");
        assert_eq!(got, want, "{at}");
    }

    /// Refused alike whether the filter matches, matches nothing or is
    /// malformed (and whatever the page size).
    async fn foreign_read(&mut self, kind: Read) {
        let f = self.foreign();
        let target = self.foreign_user(f);
        let filt = pick_filter(&mut self.rng, f, &target.name);
        let mut q = self.query(f, &filt);
        q.size = pick(&mut self.rng, &[-1, 0, 1, 50]);
        let nothing = Query {
            filter: "tags:\"no-such-tag\"".to_owned(),
            ..q.clone()
        };
        let malformed = Query {
            filter: "tags:".to_owned(),
            order_by: "nope".to_owned(),
            text: String::new(),
            ..q.clone()
        };
        self.log(&format!("{kind:?} {q:?}"));
        let answers = vec![
            read_once(&mut self.c, kind, &q).await,
            read_once(&mut self.c, kind, &nothing).await,
            read_once(&mut self.c, kind, &malformed).await,
        ];
        same_refusal(&self.at(), f, answers);
    }

    async fn own_batch_get(&mut self) {
        let own = self.own;
        let mut names = Vec::new();
        for _ in 0..self.rng.usize(1..5) {
            if let Some(u) = self.own_user() {
                names.push(u.name);
            }
        }
        if names.is_empty() {
            return self.own_batch_create().await;
        }
        self.log(&format!("batch get {names:?}"));
        let at = self.at();
        let got = self
            .c
            .batch_get_users(pb::BatchGetUsersRequest {
                parent: parent(own),
                names: names.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("{at}: {e:?}"))
            .into_inner()
            .users;
        let want: Vec<User> = names.iter().map(|n| self.model[n].clone()).collect();
        assert_eq!(got, want, "{at}");
    }

    /// Own names mixed with another project's, existing or not: the whole
    /// call is refused the same way.
    async fn foreign_batch_get(&mut self) {
        let own = self.own;
        let f = self.foreign();
        let mut slots = vec![true; self.rng.usize(1..3)];
        slots.resize(slots.len() + self.rng.usize(0..3), false);
        self.rng.shuffle(&mut slots);
        let mut existing = Vec::new();
        let mut ghosts = Vec::new();
        for foreign in slots {
            if foreign {
                existing.push(self.foreign_user(f).name);
                ghosts.push(self.ghost(f));
            } else if let Some(u) = self.own_user() {
                existing.push(u.name.clone());
                ghosts.push(u.name);
            }
        }
        let own_prefix = prefix(own);
        let foreign_only: Vec<String> = existing
            .iter()
            .filter(|n| !n.starts_with(&own_prefix))
            .cloned()
            .collect();
        self.log(&format!("batch get {existing:?} / {ghosts:?}"));
        let req = |project: &str, names: Vec<String>| pb::BatchGetUsersRequest {
            parent: parent(project),
            names,
        };
        let answers = vec![
            self.c.batch_get_users(req(own, existing)).await,
            self.c.batch_get_users(req(own, ghosts)).await,
            self.c.batch_get_users(req(own, foreign_only.clone())).await,
            self.c.batch_get_users(req(f, foreign_only)).await,
        ];
        same_refusal(&self.at(), f, answers);
    }

    /// New users, one maybe with the id of another project's user (ids are
    /// per project).
    async fn own_batch_create(&mut self) {
        let own = self.own;
        let mut items = Vec::new();
        for _ in 0..self.rng.usize(1..4) {
            let user = self.fresh_user();
            let initial_state = if self.rng.bool() {
                State::Pending as i32
            } else {
                0
            };
            let item_parent = if self.rng.bool() {
                parent(own)
            } else {
                String::new()
            };
            items.push(pb::CreateUserRequest {
                parent: item_parent,
                user: Some(user),
                initial_state,
                ..Default::default()
            });
        }
        if self.rng.bool() {
            let f = self.foreign();
            let other = self.foreign_user(f);
            let id = id_of(&other.name);
            if !self.taken.contains(id) {
                items[0].user_id = id.to_owned();
            }
        }
        let ids: Vec<&str> = items.iter().map(|i| i.user_id.as_str()).collect();
        self.log(&format!("batch create {} users, ids {ids:?}", items.len()));
        let at = self.at();
        let created = self
            .c
            .batch_create_users(pb::BatchCreateUsersRequest {
                parent: parent(own),
                requests: items.clone(),
                request_id: String::new(),
            })
            .await
            .unwrap_or_else(|e| panic!("{at}: {e:?}"))
            .into_inner()
            .users;
        assert_eq!(created.len(), items.len(), "{at}");
        let own_prefix = prefix(own);
        for (item, u) in items.iter().zip(created) {
            assert!(u.name.starts_with(&own_prefix), "{at}: {}", u.name);
            if !item.user_id.is_empty() {
                assert_eq!(u.name, format!("{own_prefix}{}", item.user_id), "{at}");
            }
            assert_eq!(Some(&u.email), item.user.as_ref().map(|x| &x.email), "{at}");
            self.taken.insert(id_of(&u.name).to_owned());
            self.model.insert(u.name.clone(), u);
        }
    }

    async fn foreign_batch_create(&mut self) {
        let own = self.own;
        let f = self.foreign();
        let target = self.foreign_user(f);
        let ghost = self.ghost(f);
        let a = self.fresh_user();
        let b = self.fresh_user();
        let item = |user: User, user_id: &str| pb::CreateUserRequest {
            user: Some(user),
            user_id: user_id.to_owned(),
            ..Default::default()
        };
        let into_f = |requests: Vec<pb::CreateUserRequest>| pb::BatchCreateUsersRequest {
            parent: parent(f),
            requests,
            request_id: String::new(),
        };
        self.log(&format!(
            "batch create in {f}, ids {} / {}",
            id_of(&target.name),
            id_of(&ghost)
        ));
        let answers = vec![
            self.c
                .batch_create_users(into_f(vec![
                    item(a.clone(), id_of(&target.name)),
                    item(b.clone(), ""),
                ]))
                .await,
            self.c
                .batch_create_users(into_f(vec![
                    item(a.clone(), id_of(&ghost)),
                    item(b.clone(), ""),
                ]))
                .await,
        ];
        same_refusal(&self.at(), f, answers);

        // The batch's parent is the own project, one item's is not.
        let mut requests = vec![item(a, ""), item(b, "")];
        let k = self.rng.usize(..requests.len());
        requests[k].parent = parent(f);
        self.log(&format!("batch create in {own}, item {k} in {f}"));
        let at = self.at();
        let s = assert_error(
            self.c
                .batch_create_users(pb::BatchCreateUsersRequest {
                    parent: parent(own),
                    requests,
                    request_id: String::new(),
                })
                .await,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
        assert_eq!(bad_fields(&s), [format!("requests[{k}].parent")], "{at}");
        assert_eq!(
            count_of(&mut self.c, own, "", true).await,
            self.model.len() as i64,
            "{at}: nothing of the batch is stored"
        );
    }

    /// New users, maybe one with the id of another project's user (stored
    /// here) and one named as a user of another project (refused alone).
    async fn own_import(&mut self) {
        let own = self.own;
        let own_prefix = prefix(own);
        let mut users = Vec::new();
        for _ in 0..self.rng.usize(1..4) {
            let mut u = self.fresh_user();
            u.state = pick(
                &mut self.rng,
                &[0, State::Pending as i32, State::Disabled as i32],
            );
            users.push(u);
        }
        if self.rng.bool() {
            let f = self.foreign();
            let other = self.foreign_user(f);
            let id = id_of(&other.name);
            if !self.taken.contains(id) {
                users[0].name = format!("{own_prefix}{id}");
            }
        }
        let bad = if self.rng.bool() {
            let f = self.foreign();
            let mut u = self.fresh_user();
            u.name = if self.rng.bool() {
                self.foreign_user(f).name
            } else {
                self.ghost(f)
            };
            let i = self.rng.usize(..=users.len());
            users.insert(i, u);
            Some(i)
        } else {
            None
        };
        let split = self.rng.usize(1..=users.len());
        let second_parent = if self.rng.bool() {
            parent(own)
        } else {
            String::new()
        };
        let messages = vec![
            pb::ImportUsersRequest {
                parent: parent(own),
                users: users[..split].to_vec(),
            },
            pb::ImportUsersRequest {
                parent: second_parent,
                users: users[split..].to_vec(),
            },
        ];
        let names: Vec<&str> = users.iter().map(|u| u.name.as_str()).collect();
        self.log(&format!("import into {own}: names {names:?}"));
        let at = self.at();
        let acks = import_all(&mut self.c, messages)
            .await
            .unwrap_or_else(|e| panic!("{at}: {e:?}"));
        let created: i64 = acks.iter().map(|a| a.created_count).sum();
        let failures: Vec<&pb::ImportFailure> = acks.iter().flat_map(|a| &a.failures).collect();
        assert_eq!(
            created as usize,
            users.len() - usize::from(bad.is_some()),
            "{at}: {acks:?}"
        );
        match bad {
            Some(i) => {
                assert_eq!(failures.len(), 1, "{at}: {failures:?}");
                assert_eq!(failures[0].index, i as i64, "{at}");
                let s = failure_status(failures[0]);
                assert_eq!(s.code(), Code::InvalidArgument, "{at}: {s:?}");
                assert_eq!(bad_fields(&s), [format!("users[{i}].name")], "{at}");
            }
            None => assert!(failures.is_empty(), "{at}: {failures:?}"),
        }
        for (i, u) in users.iter().enumerate() {
            let found = lookup(&mut self.c, own, Some(Identifier::Email(u.email.clone()))).await;
            if bad == Some(i) {
                assert_error(found, Code::NotFound, "USER_NOT_FOUND");
                continue;
            }
            let found = found.unwrap_or_else(|e| panic!("{at}: {} not stored: {e:?}", u.email));
            if u.name.is_empty() {
                assert!(found.name.starts_with(&own_prefix), "{at}: {}", found.name);
            } else {
                assert_eq!(found.name, u.name, "{at}");
            }
            self.taken.insert(id_of(&found.name).to_owned());
            self.model.insert(found.name.clone(), found);
        }
    }

    async fn foreign_import(&mut self) {
        let own = self.own;
        let f = self.foreign();
        let target = self.foreign_user(f);
        let ghost = self.ghost(f);
        let plain = self.fresh_user();
        let mut as_target = self.fresh_user();
        as_target.name = target.name.clone();
        let mut as_ghost = self.fresh_user();
        as_ghost.name = ghost.clone();
        self.log(&format!("import into {f}: {} / {ghost}", target.name));
        let into_f = |users: Vec<User>| {
            vec![pb::ImportUsersRequest {
                parent: parent(f),
                users,
            }]
        };
        let answers = vec![
            import_all(&mut self.c, into_f(vec![as_target.clone(), plain.clone()])).await,
            import_all(&mut self.c, into_f(vec![as_ghost, plain.clone()])).await,
        ];
        same_refusal(&self.at(), f, answers);

        // Switching to another project mid-stream fails the call; what was
        // sent for the own project before is stored there, nothing after.
        let first = self.fresh_user();
        let messages = vec![
            pb::ImportUsersRequest {
                parent: parent(own),
                users: vec![first.clone()],
            },
            pb::ImportUsersRequest {
                parent: parent(f),
                users: vec![plain.clone(), as_target],
            },
        ];
        self.log(&format!("import into {own}, then {f}"));
        let at = self.at();
        let s = assert_error(
            import_all(&mut self.c, messages).await,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
        assert_eq!(bad_fields(&s), ["parent"], "{at}");
        let stored = lookup(
            &mut self.c,
            own,
            Some(Identifier::Email(first.email.clone())),
        )
        .await
        .unwrap_or_else(|e| panic!("{at}: the first message was not stored: {e:?}"));
        assert!(stored.name.starts_with(&prefix(own)), "{at}");
        self.taken.insert(id_of(&stored.name).to_owned());
        self.model.insert(stored.name.clone(), stored);
        assert_error(
            lookup(&mut self.c, own, Some(Identifier::Email(plain.email))).await,
            Code::NotFound,
            "USER_NOT_FOUND",
        );
    }

    /// A page token or resume token of another project's query is no token
    /// for the own project's same query, and opens nothing of the other.
    async fn foreign_tokens(&mut self) {
        let own = self.own;
        let f = self.foreign();
        let kind = pick(&mut self.rng, &[Read::List, Read::Search, Read::Stream]);
        let target = self.foreign_user(f);
        let filt = pick_filter(&mut self.rng, f, &target.name);
        let mut q = self.query(f, &filt);
        q.size = 1;
        let mut theirs = read_once(&mut self.admin, kind, &q)
            .await
            .expect("admin read");
        if theirs.next.is_empty() {
            // Too few matches for a second page: every user matches this.
            q.filter.clear();
            q.show_deleted = true;
            q.text = "u".to_owned();
            theirs = read_once(&mut self.admin, kind, &q)
                .await
                .expect("admin read");
        }
        let at = self.at();
        assert!(!theirs.next.is_empty(), "{at}: no token from {q:?}");
        let mine = Query {
            parent: parent(own),
            token: theirs.next,
            size: self.rng.i32(1..4),
            ..q
        };
        self.log(&format!("{kind:?} {mine:?} with a token of {f}"));
        let s = assert_error(
            read_once(&mut self.c, kind, &mine).await,
            Code::InvalidArgument,
            "INVALID_PAGE_TOKEN",
        );
        let field = if kind == Read::Stream {
            "resume_token"
        } else {
            "page_token"
        };
        assert_eq!(bad_fields(&s), [field], "{at}");
        // On f itself the token opens nothing either.
        let with = Query {
            parent: parent(f),
            ..mine
        };
        let without = Query {
            token: String::new(),
            ..with.clone()
        };
        let answers = vec![
            read_once(&mut self.c, kind, &with).await,
            read_once(&mut self.c, kind, &without).await,
        ];
        same_refusal(&at, f, answers);
        // The token was a good one: it continues f's query for the admin.
        let next = read_once(&mut self.admin, kind, &with)
            .await
            .unwrap_or_else(|e| panic!("{at}: {e:?}"));
        let f_prefix = prefix(f);
        assert!(
            next.users.iter().all(|u| u.name.starts_with(&f_prefix)),
            "{at}"
        );
    }
}

async fn a_token_reads_and_changes_nothing_of_another_project(engine: Engine) {
    let seed = seed();
    let keys = AuthKeys::new();
    let server = TestServer::start_authed(engine, &keys).await;
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut admin = server.client();
    for p in PROJECTS {
        populate(&mut admin, &mut rng, p).await;
    }
    let mut order = PROJECTS;
    rng.shuffle(&mut order);
    let mut world = World {
        seed,
        rng,
        c: admin.clone(),
        admin,
        own: order[0],
        model: BTreeMap::new(),
        taken: BTreeSet::new(),
        snapshot: BTreeMap::new(),
        serial: 1000,
        n: 0,
    };
    for own in order {
        let token = keys.token(&[own], ALL_SCOPES);
        world
            .begin(own, server.client_with(Some(token.as_str())))
            .await;
        for _ in 0..STEPS_PER_ROUND {
            world.step().await;
        }
        world.verify().await;
    }
}

both_engines!(a_token_reads_and_changes_nothing_of_another_project);
