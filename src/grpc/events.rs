//! The EventService implementation: ListEvents and WatchEvents over the
//! change log, and the encoding of an event as the log keeps it.

use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::bulk::{spawn_answering, until_draining};
use super::convert::{timestamp, user_to_proto};
use super::groups::{group_to_proto, member_to_proto};
use super::trace::record_project;
use super::{authorize, status};
use crate::domain::events::{
    DEFAULT_PAGE, Event, EventFilter, EventRepository, Events, MAX_PAGE, Snapshot, StoredEvent,
    decode_page_token, encode_page_token,
};
use crate::domain::{DomainError, ProjectId, QueryProblem, Scope, Violations};
use crate::proto::users::v1 as pb;
use pb::event_service_server::EventService;

pub use pb::event_service_server::EventServiceServer;

/// How often a watcher that is caught up looks for commits made through
/// other replicas (its own replica's commits wake it at once).
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// How often an idle watcher gets a progress marker.
pub const MARKER_INTERVAL: Duration = Duration::from_secs(5);
/// Events per WatchEvents message at most.
const WATCH_BATCH: u32 = 500;

/// The bytes the change log keeps of an event: `users.v1.Event` without its
/// revision (the log's key).
pub fn encode_event(e: &Event) -> Vec<u8> {
    let state = match &e.snapshot {
        Snapshot::User(u) => pb::event::ResourceState::User(user_to_proto(u)),
        Snapshot::Group(g) => pb::event::ResourceState::Group(group_to_proto(g)),
    };
    pb::Event {
        revision: 0,
        event_id: e.id.clone(),
        r#type: pb::event::Type::from_str_name(e.kind.as_str())
            .unwrap_or(pb::event::Type::Unspecified) as i32,
        resource: e.resource.clone(),
        event_time: Some(timestamp(e.time)),
        actor: e.origin.actor().to_owned(),
        request_id: e.origin.request_id().to_owned(),
        resource_state: Some(state),
        changed_paths: e.changed_paths.iter().map(|p| (*p).to_owned()).collect(),
        members: e
            .members
            .iter()
            .map(|m| member_to_proto(&e.project, m))
            .collect(),
    }
    .encode_to_vec()
}

/// A stored event as the client gets it.
pub fn event_to_proto(e: &StoredEvent) -> Result<pb::Event, DomainError> {
    let mut out = pb::Event::decode(e.body.as_slice())
        .map_err(|err| DomainError::Internal(format!("event {} undecodable: {err}", e.revision)))?;
    out.revision = e.revision;
    Ok(out)
}

fn events_to_proto(events: &[StoredEvent]) -> Result<Vec<pb::Event>, DomainError> {
    events.iter().map(event_to_proto).collect()
}

pub struct EventServiceImpl<R> {
    events: Arc<Events<R>>,
    draining: tokio::sync::watch::Receiver<bool>,
}

impl<R> EventServiceImpl<R> {
    pub fn new(events: Arc<Events<R>>, draining: tokio::sync::watch::Receiver<bool>) -> Self {
        Self { events, draining }
    }
}

/// The project, filter and start of a read, checked together (every bad
/// field at once) after the caller's grant of the project.
fn parse_read<T>(
    request: &Request<T>,
    parent: &str,
    filter: &str,
    after_revision: i64,
    v: &mut Violations,
) -> Result<Option<(ProjectId, EventFilter, i64)>, Status> {
    let caller = authorize(request, Scope::Read)?;
    let project = v.check(|| "parent".into(), ProjectId::parse_parent(parent));
    if let Some(p) = &project {
        record_project(p.as_str());
        caller.require_project(p)?;
    }
    if after_revision < 0 {
        v.push("after_revision", "must not be negative");
    }
    let filter = match project.as_ref().map(|p| EventFilter::parse(filter, p)) {
        Some(Ok(f)) => Some(f),
        Some(Err(e)) => {
            v.push("filter", e.to_string());
            None
        }
        None => None,
    };
    Ok(project.zip(filter).map(|(p, f)| (p, f, after_revision)))
}

/// A lone filter problem keeps its own reason (INVALID_FILTER).
fn refuse(v: Violations) -> Result<(), Status> {
    if v.len() == 1
        && let Some(d) = v.description_of("filter")
    {
        return Err(DomainError::BadQuery {
            reason: QueryProblem::Filter,
            field: "filter",
            description: d,
        }
        .into());
    }
    v.into_result().map_err(Status::from)
}

#[tonic::async_trait]
impl<R: EventRepository> EventService for EventServiceImpl<R> {
    async fn list_events(
        &self,
        request: Request<pb::ListEventsRequest>,
    ) -> Result<Response<pb::ListEventsResponse>, Status> {
        let req = request.get_ref();
        let mut v = Violations::default();
        let read = parse_read(
            &request,
            &req.parent,
            &req.filter,
            req.after_revision,
            &mut v,
        )?;
        let size = match req.page_size {
            n if n < 0 => {
                v.push("page_size", "must not be negative");
                0
            }
            0 => DEFAULT_PAGE,
            n => (n as u32).min(MAX_PAGE),
        };
        let mut start = None;
        if let Some((project, _, _)) = &read
            && !req.page_token.is_empty()
        {
            match decode_page_token(project, &req.filter, &req.page_token) {
                Ok(n) => start = Some(n),
                Err(e) => {
                    if v.is_empty() {
                        return Err(e.into());
                    }
                    v.push("page_token", e.to_string());
                }
            }
        }
        refuse(v)?;
        let Some((project, filter, after)) = read else {
            return Err(DomainError::Internal("validated request incomplete".into()).into());
        };
        let after = start.unwrap_or(after);
        let page = self.events.read(&project, after, &filter, size).await?;
        let next_page_token = if page.through < page.head {
            encode_page_token(&project, &req.filter, page.through)
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListEventsResponse {
            events: events_to_proto(&page.events)?,
            next_page_token,
            head_revision: page.head,
        }))
    }

    type WatchEventsStream = ReceiverStream<Result<pb::WatchEventsResponse, Status>>;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let req = request.get_ref();
        let mut v = Violations::default();
        let read = parse_read(
            &request,
            &req.parent,
            &req.filter,
            req.after_revision,
            &mut v,
        )?;
        refuse(v)?;
        let Some((project, filter, after)) = read else {
            return Err(DomainError::Internal("validated request incomplete".into()).into());
        };
        Ok(Response::new(watch(
            self.events.clone(),
            project,
            filter,
            after,
            self.draining.clone(),
        )))
    }
}

/// Follows a project's log in a task that reads one message ahead: the
/// channel holds one message, so a slow watcher stalls the task (and its
/// reads) instead of growing a buffer; a cancelled call ends it.
fn watch<R: EventRepository>(
    events: Arc<Events<R>>,
    project: ProjectId,
    filter: EventFilter,
    mut after: i64,
    mut draining: tokio::sync::watch::Receiver<bool>,
) -> ReceiverStream<Result<pb::WatchEventsResponse, Status>> {
    let (tx, rx) = mpsc::channel(1);
    spawn_answering(&tx.clone(), async move {
        let mut woken = events.repository().appended();
        // A marker goes out as soon as the replay is done, then while idle.
        let mut marker_due = tokio::time::Instant::now();
        loop {
            woken.borrow_and_update();
            let page = match events.read(&project, after, &filter, WATCH_BATCH).await {
                Ok(p) => p,
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            };
            let caught_up = page.through >= page.head;
            let now = tokio::time::Instant::now();
            // Events, or progress: once caught up, and while a filter skips
            // everything, every MARKER_INTERVAL.
            let message = if !page.events.is_empty() {
                match events_to_proto(&page.events) {
                    Ok(events) => Some(pb::WatchEventsResponse {
                        events,
                        head_revision: page.through,
                    }),
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                }
            } else if (page.through > after || caught_up) && now >= marker_due {
                Some(pb::WatchEventsResponse {
                    events: Vec::new(),
                    head_revision: page.through,
                })
            } else {
                None
            };
            if let Some(m) = message {
                tokio::select! {
                    sent = tx.send(Ok(m)) => if sent.is_err() { return },
                    () = until_draining(&mut draining) => {
                        // The message was not sent: resume before it.
                        let _ = tx.send(Err(stop(after))).await;
                        return;
                    }
                }
                marker_due = tokio::time::Instant::now() + MARKER_INTERVAL;
            }
            // Skipped revisions need no message: the next one covers them.
            after = page.through;
            if !caught_up {
                continue;
            }
            tokio::select! {
                _ = woken.changed() => {}
                () = tokio::time::sleep(POLL_INTERVAL) => {}
                () = tx.closed() => return,
                () = until_draining(&mut draining) => {
                    let _ = tx.send(Err(stop(after))).await;
                    return;
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

/// The server is stopping: resume after `after` on another replica.
fn stop(after: i64) -> Status {
    status::shutting_down(&[("after_revision", after.to_string())])
}
