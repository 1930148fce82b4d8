//! Change events: the per-project log every committed change appends to, in
//! the same transaction as the change (a transactional outbox).
//!
//! The storage appends; the domain decides what an event says
//! (`Event::of_user_save_by` and friends) and who caused it: the transport sets
//! the caller's `Origin` for the task that runs a call, and the storage reads
//! it when it appends (`Origin::current`), so no write method needs an extra
//! parameter that every caller must remember to pass.

use std::future::Future;
use std::sync::{Arc, OnceLock};

use tracing::instrument;

use super::error::DomainError;
use super::filter::{Filter, Op, Pattern, Subject, TextField};
use super::group::{Group, Member};
use super::query::{
    Cursor, SortValue, TokenError, decode_token, encode_token, fingerprint, page_token_error,
};
use super::user::{State, User};
use super::values::{ProjectId, Timestamp};

macro_rules! kinds {
    ($($variant:ident => $name:literal),* $(,)?) => {
        /// What an event records (`users.v1.Event.Type`).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum EventKind { $($variant),* }

        impl EventKind {
            pub const ALL: &'static [EventKind] = &[$(EventKind::$variant),*];

            pub fn as_str(self) -> &'static str {
                match self { $(EventKind::$variant => $name),* }
            }

            pub fn parse(s: &str) -> Option<EventKind> {
                match s { $($name => Some(EventKind::$variant),)* _ => None }
            }
        }
    };
}

kinds! {
    UserCreated => "USER_CREATED",
    UserUpdated => "USER_UPDATED",
    UserDeleted => "USER_DELETED",
    UserUndeleted => "USER_UNDELETED",
    UserPurged => "USER_PURGED",
    UserStateChanged => "USER_STATE_CHANGED",
    GroupCreated => "GROUP_CREATED",
    GroupUpdated => "GROUP_UPDATED",
    GroupDeleted => "GROUP_DELETED",
    GroupMembersAdded => "GROUP_MEMBERS_ADDED",
    GroupMembersRemoved => "GROUP_MEMBERS_REMOVED",
}

/// Who caused the changes a call makes: the token's `sub` and the call's
/// `request_id`, if it has one (known once the request is parsed).
#[derive(Debug, Default)]
pub struct Origin {
    actor: String,
    request_id: OnceLock<String>,
}

tokio::task_local! {
    static ORIGIN: Arc<Origin>;
}

impl Origin {
    pub fn new(actor: impl Into<String>) -> Arc<Self> {
        Arc::new(Origin {
            actor: actor.into(),
            request_id: OnceLock::new(),
        })
    }

    pub fn set_request_id(&self, id: &str) {
        if !id.is_empty() {
            let _ = self.request_id.set(id.to_owned());
        }
    }

    pub fn actor(&self) -> &str {
        &self.actor
    }

    pub fn request_id(&self) -> &str {
        self.request_id.get().map(String::as_str).unwrap_or("")
    }

    /// Runs `fut` with `origin` as the origin of the changes it makes.
    pub fn scope<F: Future>(origin: Arc<Origin>, fut: F) -> impl Future<Output = F::Output> {
        ORIGIN.scope(origin, fut)
    }

    /// The origin of the running task; the service itself (empty actor)
    /// outside a call (the purge). Writer tasks that commit on behalf of
    /// callers carry each caller's origin along with its job.
    pub fn current() -> Arc<Origin> {
        ORIGIN
            .try_with(Arc::clone)
            .unwrap_or_else(|_| Arc::new(Origin::default()))
    }
}

/// The resource an event carries, as it is after the change.
#[derive(Clone, Debug)]
pub enum Snapshot {
    User(Box<User>),
    Group(Group),
}

/// One change, as it is appended (the storage assigns its revision).
#[derive(Clone, Debug)]
pub struct Event {
    pub id: String,
    pub kind: EventKind,
    pub project: ProjectId,
    pub resource: String,
    pub time: Timestamp,
    pub origin: Arc<Origin>,
    pub snapshot: Snapshot,
    pub changed_paths: Vec<&'static str>,
    pub members: Vec<Member>,
}

/// Encodes an event as the bytes the log keeps (`users.v1.Event` without
/// its revision); provided by the transport, which owns the wire format.
pub type EventEncoder = fn(&Event) -> Vec<u8>;

impl Event {
    fn new(kind: EventKind, origin: Arc<Origin>, snapshot: Snapshot) -> Self {
        let (project, resource) = match &snapshot {
            Snapshot::User(u) => (u.project.clone(), u.name().to_string()),
            Snapshot::Group(g) => (g.project.clone(), g.name().to_string()),
        };
        Event {
            id: uuid::Uuid::now_v7().to_string(),
            kind,
            project,
            resource,
            time: Timestamp::now(),
            origin,
            snapshot,
            changed_paths: Vec::new(),
            members: Vec::new(),
        }
    }

    /// A user's creation, by `origin`.
    pub fn user_created(user: &User, origin: Arc<Origin>) -> Self {
        Event::new(
            EventKind::UserCreated,
            origin,
            Snapshot::User(Box::new(user.clone())),
        )
    }

    /// A user's erasure (force delete or purge), by the current origin.
    pub fn user_purged(user: User) -> Self {
        Event::new(
            EventKind::UserPurged,
            Origin::current(),
            Snapshot::User(Box::new(user)),
        )
    }

    /// What a conditional write of `next` over `previous` changed, by
    /// `origin`.
    pub fn of_user_save_by(previous: &User, next: &User, origin: Arc<Origin>) -> Self {
        let deleted = |u: &User| u.state == State::Deleted;
        let kind = match (deleted(previous), deleted(next)) {
            (false, true) => EventKind::UserDeleted,
            (true, false) => EventKind::UserUndeleted,
            _ if previous.state != next.state => EventKind::UserStateChanged,
            _ => EventKind::UserUpdated,
        };
        let mut e = Event::new(kind, origin, Snapshot::User(Box::new(next.clone())));
        if kind == EventKind::UserUpdated {
            e.changed_paths = previous
                .profile
                .changed_fields(&next.profile)
                .into_iter()
                .map(|f| f.path())
                .collect();
        }
        e
    }

    pub fn group_created(group: &Group) -> Self {
        Event::new(
            EventKind::GroupCreated,
            Origin::current(),
            Snapshot::Group(group.clone()),
        )
    }

    pub fn group_updated(previous: &Group, next: &Group) -> Self {
        let mut e = Event::new(
            EventKind::GroupUpdated,
            Origin::current(),
            Snapshot::Group(next.clone()),
        );
        e.changed_paths = previous.fields.changed_paths(&next.fields);
        e
    }

    pub fn group_deleted(group: &Group) -> Self {
        Event::new(
            EventKind::GroupDeleted,
            Origin::current(),
            Snapshot::Group(group.clone()),
        )
    }

    /// Members added (`added`) or removed; None when the list is empty (a
    /// call that changed nothing appends nothing).
    pub fn members_changed(group: &Group, members: Vec<Member>, added: bool) -> Option<Self> {
        if members.is_empty() {
            return None;
        }
        let kind = if added {
            EventKind::GroupMembersAdded
        } else {
            EventKind::GroupMembersRemoved
        };
        let mut e = Event::new(kind, Origin::current(), Snapshot::Group(group.clone()));
        e.members = members;
        Some(e)
    }
}

/// An event as the log holds it.
#[derive(Clone, Debug)]
pub struct StoredEvent {
    pub revision: i64,
    pub event_id: String,
    pub kind: String,
    pub resource: String,
    /// `users.v1.Event` without its revision.
    pub body: Vec<u8>,
}

/// Where a project's log stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogBounds {
    /// The last revision appended (0 before the first event).
    pub head: i64,
    /// Every revision up to this one was compacted away.
    pub compacted_through: i64,
}

pub trait EventRepository: Send + Sync + 'static {
    /// The project's head and compaction mark.
    fn bounds(
        &self,
        project: &ProjectId,
    ) -> impl Future<Output = Result<LogBounds, DomainError>> + Send;

    /// The events of `project` with `after < revision <= through`, in
    /// revision order, at most `limit`; without their bodies (empty) unless
    /// `bodies`.
    fn read_events(
        &self,
        project: &ProjectId,
        after: i64,
        through: i64,
        limit: u64,
        bodies: bool,
    ) -> impl Future<Output = Result<Vec<StoredEvent>, DomainError>> + Send;

    /// The bodies of these revisions of `project` that are kept.
    fn event_bodies(
        &self,
        project: &ProjectId,
        revisions: &[i64],
    ) -> impl Future<Output = Result<Vec<(i64, Vec<u8>)>, DomainError>> + Send;

    /// Removes the events older than `horizon`, per project a prefix of its
    /// log (in transactions of at most 1000 events), and raises the
    /// compaction marks, for at most `budget`. Returns how many.
    fn compact_events(
        &self,
        horizon: Timestamp,
        budget: std::time::Duration,
    ) -> impl Future<Output = Result<u64, DomainError>> + Send;

    /// A receiver woken after every commit this process makes that appends
    /// events (other replicas' commits are found by polling).
    fn appended(&self) -> tokio::sync::watch::Receiver<u64>;

    /// The projects whose log the bus relay has not published to the end.
    fn relay_backlog(&self) -> impl Future<Output = Result<Vec<Backlog>, DomainError>> + Send;

    /// Records that the bus acknowledged `project`'s events through
    /// `revision` (never moves back).
    fn advance_relay(
        &self,
        project: &ProjectId,
        revision: i64,
    ) -> impl Future<Output = Result<(), DomainError>> + Send;
}

/// Where the bus relay stands on one project's log.
#[derive(Clone, Debug)]
pub struct Backlog {
    pub project: ProjectId,
    /// The last revision the bus acknowledged.
    pub published: i64,
    pub bounds: LogBounds,
}

/// Most events a read returns before it gives back a page.
pub const MAX_SCAN: i64 = 2_000;
/// Events per page unless the caller asks otherwise.
pub const DEFAULT_PAGE: u32 = 100;
pub const MAX_PAGE: u32 = 1000;
/// A page of events is cut once it holds this many bytes.
pub const PAGE_BYTES: usize = 3 << 20;

/// Which events a reader wants.
#[derive(Clone, Debug, Default)]
pub struct EventFilter(Option<Filter>);

impl EventFilter {
    pub fn parse(input: &str, project: &ProjectId) -> Result<Self, super::filter::FilterError> {
        super::filter::parse_for(input, project, Subject::Event).map(EventFilter)
    }

    pub fn matches(&self, e: &StoredEvent) -> bool {
        self.0.as_ref().is_none_or(|f| test(f, e))
    }
}

fn test(f: &Filter, e: &StoredEvent) -> bool {
    match f {
        Filter::And(v) => v.iter().all(|f| test(f, e)),
        Filter::Or(v) => v.iter().any(|f| test(f, e)),
        Filter::Not(f) => !test(f, e),
        Filter::Const(b) => *b,
        Filter::Text { field, op, value } => {
            let text = match field {
                TextField::EventType => e.kind.as_str(),
                TextField::Resource => e.resource.as_str(),
                _ => return false,
            };
            let hit = match value {
                Pattern::Exact(v) => match op {
                    Op::Eq | Op::Ne => text == v,
                    Op::Lt => text < v.as_str(),
                    Op::Le => text <= v.as_str(),
                    Op::Gt => text > v.as_str(),
                    Op::Ge => text >= v.as_str(),
                },
                Pattern::Prefix(p) => text.starts_with(p.as_str()),
                Pattern::Suffix(s) => text.ends_with(s.as_str()),
                Pattern::Contains(c) => text.contains(c.as_str()),
            };
            if *op == Op::Ne { !hit } else { hit }
        }
        _ => false,
    }
}

/// One page read from the log.
#[derive(Debug, Default)]
pub struct EventPage {
    pub events: Vec<StoredEvent>,
    /// Every revision up to this one was read (or skipped by the filter).
    pub through: i64,
    /// The project's head when the page was read.
    pub head: i64,
}

/// The page-token fingerprint of a ListEvents query.
fn token_fingerprint(project: &ProjectId, filter: &str) -> [u8; 8] {
    fingerprint(&["users.v1.events", project.as_str(), filter])
}

pub fn encode_page_token(project: &ProjectId, filter: &str, through: i64) -> String {
    let cursor = Cursor {
        values: vec![SortValue::Int(through)],
        user_id: String::new(),
    };
    encode_token(&token_fingerprint(project, filter), &cursor)
}

pub fn decode_page_token(
    project: &ProjectId,
    filter: &str,
    token: &str,
) -> Result<i64, DomainError> {
    let bad = |e: TokenError| page_token_error(e, "page_token", "parent and filter");
    let c = decode_token(&token_fingerprint(project, filter), &[true], token).map_err(bad)?;
    match c.values.as_slice() {
        [SortValue::Int(n)] if *n >= 0 => Ok(*n),
        _ => Err(bad(TokenError::Malformed)),
    }
}

/// Reading the log: ListEvents and WatchEvents.
pub struct Events<R> {
    repo: R,
    retention: std::time::Duration,
}

impl<R: EventRepository> Events<R> {
    pub fn new(repo: R, retention: std::time::Duration) -> Self {
        Self { repo, retention }
    }

    pub fn repository(&self) -> &R {
        &self.repo
    }

    /// The project's head revision.
    pub async fn head(&self, project: &ProjectId) -> Result<i64, DomainError> {
        Ok(self.repo.bounds(project).await?.head)
    }

    /// The matching events after `after`: up to `limit` of them, reading at
    /// most `MAX_SCAN` revisions, cut at `PAGE_BYTES`. Refuses an `after`
    /// the log no longer holds, or one beyond its head.
    #[instrument(skip_all, fields(project = %project))]
    pub async fn read(
        &self,
        project: &ProjectId,
        after: i64,
        filter: &EventFilter,
        limit: u32,
    ) -> Result<EventPage, DomainError> {
        match self.read_once(project, after, filter, limit).await {
            // "From the oldest kept" met a compaction that ran meanwhile:
            // what is kept now.
            Err(DomainError::EventsCompacted { .. }) if after == 0 => {
                self.read_once(project, after, filter, limit).await
            }
            r => r,
        }
    }

    async fn read_once(
        &self,
        project: &ProjectId,
        after: i64,
        filter: &EventFilter,
        limit: u32,
    ) -> Result<EventPage, DomainError> {
        let bounds = self.repo.bounds(project).await?;
        // 0: from the oldest event kept.
        let after = if after == 0 {
            bounds.compacted_through
        } else {
            after
        };
        if after > bounds.head {
            return Err(DomainError::RevisionAhead {
                after,
                head: bounds.head,
            });
        }
        let through = bounds.head.min(after.saturating_add(MAX_SCAN));
        let mut page = EventPage {
            events: Vec::new(),
            through: after,
            head: bounds.head,
        };
        if through == after {
            return Ok(page);
        }
        // Without a filter every row read is returned: read no more than
        // asked. With one, rows are scanned without their bodies, and only
        // the bodies of matches are read.
        let unfiltered = filter.0.is_none();
        let want = if unfiltered { limit as i64 } else { MAX_SCAN };
        let rows = self
            .repo
            .read_events(project, after, through, want as u64, unfiltered)
            .await?;
        // The log has no gaps: a first revision other than `after + 1`
        // means compaction removed it (the mark is read after the rows, so
        // a compaction that ran meanwhile is seen).
        if rows.first().map(|e| e.revision) != Some(after + 1) {
            return Err(self.missing(project, after).await);
        }
        let mut chosen = Vec::new();
        for e in rows {
            if chosen.len() >= limit as usize {
                break;
            }
            page.through = e.revision;
            if filter.matches(&e) {
                chosen.push(e);
            }
        }
        if !unfiltered && !chosen.is_empty() {
            let revisions: Vec<i64> = chosen.iter().map(|e| e.revision).collect();
            let mut bodies: std::collections::HashMap<i64, Vec<u8>> = self
                .repo
                .event_bodies(project, &revisions)
                .await?
                .into_iter()
                .collect();
            for e in &mut chosen {
                match bodies.remove(&e.revision) {
                    Some(b) => e.body = b,
                    None => return Err(self.missing(project, after).await),
                }
            }
        }
        // Cut to stay within one response message (at least one event).
        let mut bytes = 0;
        for (i, e) in chosen.iter().enumerate() {
            bytes += e.body.len() + 64;
            if i > 0 && bytes > PAGE_BYTES {
                page.through = chosen[i - 1].revision;
                chosen.truncate(i);
                break;
            }
        }
        page.events = chosen;
        Ok(page)
    }

    /// Why events after `after` are missing: compacted meanwhile, else a
    /// broken log.
    async fn missing(&self, project: &ProjectId, after: i64) -> DomainError {
        match self.repo.bounds(project).await {
            Ok(now) if after < now.compacted_through => DomainError::EventsCompacted {
                after,
                oldest: now.compacted_through + 1,
                head: now.head,
            },
            Ok(_) => {
                DomainError::Internal(format!("event log of {project} has a gap after {after}"))
            }
            Err(e) => e,
        }
    }

    /// Removes the events older than the retention; returns how many.
    pub async fn compact(&self) -> Result<u64, DomainError> {
        let horizon =
            Timestamp::now().nanos() - self.retention.as_nanos().min(i64::MAX as u128) as i64;
        self.repo
            .compact_events(
                Timestamp::from_nanos(horizon),
                std::time::Duration::from_secs(20),
            )
            .await
    }
}
