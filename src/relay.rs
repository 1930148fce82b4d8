//! The bus relay: publishes every change event to NATS JetStream, on subject
//! `{prefix}.{project}`, encoded as `users.v1.Event`, with `Nats-Msg-Id` =
//! the event id.
//!
//! Order and durability. One relay runs among the replicas of a database
//! (`RelayLease`). Per project it publishes the events after its durable
//! cursor (`event_relay`) in revision order, waits for JetStream to
//! acknowledge them all, then moves the cursor. A crash between the two
//! publishes some events again on restart; JetStream drops them as
//! duplicates of their `Nats-Msg-Id` (within the stream's duplicate window,
//! two minutes by default). Events compacted before the relay published them
//! (a bus down for longer than the retention) are skipped, with an error in
//! the log.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use prost::Message;
use tracing::{error, info, warn};

use crate::domain::DomainError;
use crate::domain::events::{Backlog, EventRepository, Events};
use crate::proto::users::v1 as pb;
use crate::storage::RelayLease;

/// Events published before their acknowledgements are awaited.
const BATCH: u32 = 500;
/// How often the relay looks for events committed through other replicas.
const POLL: Duration = Duration::from_millis(250);
/// How long the relay waits before trying again after a failure.
const BACKOFF: Duration = Duration::from_secs(1);

pub struct Relay<R> {
    events: Arc<Events<R>>,
    nats_url: String,
    prefix: String,
    database_url: String,
    retention: Duration,
}

#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error("NATS: {0}")]
    Nats(String),
    #[error(transparent)]
    Store(#[from] DomainError),
}

fn nats<E: std::fmt::Display>(e: E) -> RelayError {
    RelayError::Nats(e.to_string())
}

impl<R: EventRepository> Relay<R> {
    pub fn new(
        events: Arc<Events<R>>,
        nats_url: String,
        prefix: String,
        database_url: String,
        retention: Duration,
    ) -> Self {
        Relay {
            events,
            nats_url,
            prefix,
            database_url,
            retention,
        }
    }

    /// Runs until aborted: waits for the lease, then relays; starts over
    /// after any failure.
    pub async fn run(self) {
        loop {
            let lease = match RelayLease::try_acquire(&self.database_url).await {
                Ok(Some(lease)) => lease,
                Ok(None) => {
                    // Another replica relays; take over if it goes away.
                    tokio::time::sleep(BACKOFF * 2).await;
                    continue;
                }
                Err(e) => {
                    warn!(error = %e, "event relay: cannot take the lease");
                    tokio::time::sleep(BACKOFF).await;
                    continue;
                }
            };
            info!(url = %self.nats_url, prefix = %self.prefix, "event relay: publishing to NATS");
            if let Err(e) = self.relay(lease).await {
                warn!(error = %e, "event relay stopped; retrying");
                tokio::time::sleep(BACKOFF).await;
            }
        }
    }

    async fn relay(&self, mut lease: RelayLease) -> Result<(), RelayError> {
        let client = async_nats::ConnectOptions::new()
            .name("user-service event relay")
            .connect(&self.nats_url)
            .await
            .map_err(nats)?;
        let js = jetstream::new(client);
        self.ensure_stream(&js).await?;
        let mut woken = self.events.repository().appended();
        loop {
            woken.borrow_and_update();
            if !lease.holds().await {
                return Err(RelayError::Store(DomainError::Unavailable(
                    "the relay lease was lost".into(),
                )));
            }
            let mut busy = false;
            for backlog in self.events.repository().relay_backlog().await? {
                busy |= self.publish(&js, &backlog).await?;
            }
            if !busy {
                tokio::select! {
                    _ = woken.changed() => {}
                    () = tokio::time::sleep(POLL) => {}
                }
            }
        }
    }

    /// A stream that takes `{prefix}.>`: the one that already does, or a new
    /// one named after the prefix.
    async fn ensure_stream(&self, js: &jetstream::Context) -> Result<(), RelayError> {
        let subjects = format!("{}.>", self.prefix);
        if js.stream_by_subject(&subjects).await.is_ok() {
            return Ok(());
        }
        let name = self.prefix.replace('.', "_").to_uppercase();
        // The stream keeps what the service's own log keeps.
        js.get_or_create_stream(jetstream::stream::Config {
            name,
            subjects: vec![subjects],
            max_age: self.retention,
            ..Default::default()
        })
        .await
        .map_err(nats)?;
        Ok(())
    }

    /// Publishes up to `BATCH` events of one project's backlog and moves its
    /// cursor; whether there was anything to publish.
    async fn publish(&self, js: &jetstream::Context, b: &Backlog) -> Result<bool, RelayError> {
        let mut from = b.published;
        if from < b.bounds.compacted_through {
            error!(
                project = %b.project,
                lost_through = b.bounds.compacted_through,
                "event relay: events were compacted before they were published; skipping them"
            );
            from = b.bounds.compacted_through;
        }
        let rows = self
            .events
            .repository()
            .read_events(&b.project, from, b.bounds.head, BATCH as u64, true)
            .await?;
        if let Some(first) = rows.first().map(|e| e.revision)
            && first != from + 1
        {
            error!(
                project = %b.project,
                lost_after = from,
                next = first,
                "event relay: events were compacted before they were published; skipping them"
            );
        }
        let Some(last) = rows.last().map(|e| e.revision) else {
            if from > b.published {
                self.events
                    .repository()
                    .advance_relay(&b.project, from)
                    .await?;
            }
            return Ok(false);
        };
        let subject = format!("{}.{}", self.prefix, b.project);
        let mut acks = Vec::with_capacity(rows.len());
        for e in rows {
            let mut payload = e.body;
            // A field appended to an encoded message is part of it: the
            // revision the log keeps beside the body.
            payload.extend(
                pb::Event {
                    revision: e.revision,
                    ..Default::default()
                }
                .encode_to_vec(),
            );
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, e.event_id.as_str());
            let ack = js
                .publish_with_headers(subject.clone(), headers, payload.into())
                .await
                .map_err(nats)?;
            acks.push(ack);
        }
        for ack in acks {
            ack.await.map_err(nats)?;
        }
        self.events
            .repository()
            .advance_relay(&b.project, last)
            .await?;
        crate::metrics::events_published(last - from);
        Ok(true)
    }
}
