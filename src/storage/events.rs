//! The change log (see `m20261204_000007_events`): appending inside a write's
//! transaction, reading, and compaction.
//!
//! Order. `append` bumps the project's row of `event_heads` as the last
//! statement before its transaction commits, and takes its revisions from
//! the bumped value. The row stays locked until the commit, so a second
//! writer of the project waits there and reads the head only once the first
//! has committed: revisions are handed out in commit order, and when a reader
//! sees revision N+1 the transaction of N has committed before it. SQLite
//! has one writer at a time anyway. Several projects are bumped in one order
//! (sorted), so two batches never wait on each other in a cycle.

use std::collections::BTreeMap;
use std::sync::Arc;

use sea_orm::{ConnectionTrait, DatabaseBackend, DbErr, TransactionTrait, Value};
use tokio::sync::watch;

use super::batch::fixed_parts;
use super::groups::{marks, sql};
use super::sqlite_write::{Step, check_rows};
use super::{SeaOrmRepository, db_error};
use crate::domain::events::{
    Backlog, Event, EventEncoder, EventRepository, LogBounds, StoredEvent,
};
use crate::domain::{DomainError, ProjectId, Timestamp};

/// Rows per multi-row INSERT (at most 8 parameters each; see `fixed_parts`).
const ROW_COUNTS: [usize; 4] = [256, 16, 4, 1];

/// Appends events and tells this process's watchers about new commits.
pub(crate) struct Outbox {
    encode: EventEncoder,
    appended: watch::Sender<u64>,
}

impl Outbox {
    pub(crate) fn new(encode: EventEncoder) -> Arc<Self> {
        Arc::new(Outbox {
            encode,
            appended: watch::Sender::new(0),
        })
    }

    /// Appends `events` inside `conn`'s transaction; call as the last step
    /// before the commit (the head row stays locked until then).
    pub(crate) async fn append<C: ConnectionTrait>(
        &self,
        conn: &C,
        events: &[Event],
    ) -> Result<(), DbErr> {
        for step in self.steps(conn.get_database_backend(), events) {
            let changed = conn.execute_raw(step.stmt).await?.rows_affected();
            check_rows(step.rows, changed)
                .map_err(|e| DbErr::Custom(format!("appending events: {e}")))?;
        }
        Ok(())
    }

    /// The statements `append` runs, for an executor of its own (see
    /// `sqlite_write`); the same rule: last before the commit.
    pub(crate) fn steps(&self, backend: DatabaseBackend, events: &[Event]) -> Vec<Step> {
        let mut out = Vec::new();
        if events.is_empty() {
            return out;
        }
        // Encoded before the head is bumped: its row stays locked from the
        // bump to the commit, and that time is what writers of a project
        // wait for.
        let mut bodies: Vec<Vec<u8>> = events.iter().map(|e| (self.encode)(e)).collect();
        let mut by_project: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, e) in events.iter().enumerate() {
            by_project.entry(e.project.as_str()).or_default().push(i);
        }
        for (project, indexes) in by_project {
            for chunk in fixed_parts(indexes, &ROW_COUNTS) {
                let n = chunk.len() as i64;
                let mut rows = Vec::with_capacity(chunk.len());
                for (k, &i) in chunk.iter().enumerate() {
                    let e = &events[i];
                    rows.push([
                        Value::from(k as i64 + 1),
                        Value::from(e.id.as_str()),
                        Value::from(e.kind.as_str()),
                        Value::from(e.resource.as_str()),
                        Value::from(e.time.nanos()),
                        Value::from(std::mem::take(&mut bodies[i])),
                    ]);
                }
                if backend == DatabaseBackend::Postgres {
                    out.push(append_pg(project, n, rows));
                } else {
                    out.extend(append_sqlite(project, n, rows));
                }
            }
        }
        out
    }

    /// Wakes this process's watchers; call after a commit that appended.
    pub(crate) fn committed(&self) {
        self.appended.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// The head bump as one statement: the project's head grows by `n` (and
/// PostgreSQL's returns the new head).
const BUMP: &str = "INSERT INTO event_heads (project, revision) VALUES (?, ?) \
     ON CONFLICT (project) DO UPDATE SET revision = event_heads.revision + excluded.revision";

/// One event row: its 1-based position `k` in the chunk, then event_id,
/// event_type, resource, event_time, body.
type Row = [Value; 6];

/// PostgreSQL: bump and insert in one statement, so that the head's row lock
/// is taken as late as possible.
fn append_pg(project: &str, n: i64, rows: Vec<Row>) -> Step {
    let marks = vec!["(?::bigint, ?, ?, ?, ?::bigint, ?::bytea)"; rows.len()].join(", ");
    let template = format!(
        "WITH h AS ({BUMP} RETURNING revision) \
         INSERT INTO events (project, revision, event_id, event_type, resource, event_time, body) \
         SELECT h.project, h.revision - h.n + v.k, v.event_id, v.event_type, v.resource, \
                v.event_time, v.body \
         FROM (SELECT ?::text AS project, ?::bigint AS n, revision FROM h) h, \
              (VALUES {marks}) AS v (k, event_id, event_type, resource, event_time, body)"
    );
    // The bump's own two values, then the projection's copy, then the rows.
    let mut values = Vec::with_capacity(4 + rows.len() * 6);
    values.extend([Value::from(project), Value::from(n)]);
    values.extend([Value::from(project), Value::from(n)]);
    values.extend(rows.into_iter().flatten());
    Step {
        stmt: sql(DatabaseBackend::Postgres, &template, values),
        rows: Some(n as u64),
    }
}

/// SQLite (one writer at a time): bump, then insert numbered from the
/// bumped head.
fn append_sqlite(project: &str, n: i64, rows: Vec<Row>) -> [Step; 2] {
    let backend = DatabaseBackend::Sqlite;
    let bump = Step {
        stmt: sql(backend, BUMP, vec![project.into(), n.into()]),
        rows: Some(1),
    };
    let marks = vec!["(?, ?, ?, ?, ?, ?)"; rows.len()].join(", ");
    let mut values = Vec::with_capacity(2 + rows.len() * 6);
    values.push(Value::from(n));
    values.extend(rows.into_iter().flatten());
    values.push(Value::from(project));
    let insert = Step {
        stmt: sql(
            backend,
            &format!(
                "INSERT INTO events (project, revision, event_id, event_type, resource, \
                 event_time, body) \
                 SELECT h.project, h.revision - ? + v.column1, v.column2, v.column3, \
                        v.column4, v.column5, v.column6 \
                 FROM (VALUES {marks}) AS v, event_heads h WHERE h.project = ?"
            ),
            values,
        ),
        rows: Some(n as u64),
    };
    [bump, insert]
}

impl EventRepository for SeaOrmRepository {
    async fn bounds(&self, project: &ProjectId) -> Result<LogBounds, DomainError> {
        let row = self
            .db
            .query_one_raw(sql(
                self.db.get_database_backend(),
                "SELECT revision, compacted_through FROM event_heads WHERE project = ?",
                vec![project.as_str().into()],
            ))
            .await
            .map_err(db_error)?;
        match row {
            None => Ok(LogBounds::default()),
            Some(r) => Ok(LogBounds {
                head: r.try_get_by_index(0).map_err(db_error)?,
                compacted_through: r.try_get_by_index(1).map_err(db_error)?,
            }),
        }
    }

    async fn read_events(
        &self,
        project: &ProjectId,
        after: i64,
        through: i64,
        limit: u64,
        bodies: bool,
    ) -> Result<Vec<StoredEvent>, DomainError> {
        let body = if bodies { "body" } else { "NULL" };
        let rows = self
            .db
            .query_all_raw(sql(
                self.db.get_database_backend(),
                &format!(
                    "SELECT revision, event_id, event_type, resource, {body} FROM events \
                     WHERE project = ? AND revision > ? AND revision <= ? \
                     ORDER BY revision LIMIT ?"
                ),
                vec![
                    project.as_str().into(),
                    after.into(),
                    through.into(),
                    (limit as i64).into(),
                ],
            ))
            .await
            .map_err(db_error)?;
        rows.into_iter()
            .map(|r| {
                Ok(StoredEvent {
                    revision: r.try_get_by_index(0)?,
                    event_id: r.try_get_by_index(1)?,
                    kind: r.try_get_by_index(2)?,
                    resource: r.try_get_by_index(3)?,
                    body: r
                        .try_get_by_index::<Option<Vec<u8>>>(4)?
                        .unwrap_or_default(),
                })
            })
            .collect::<Result<_, DbErr>>()
            .map_err(db_error)
    }

    async fn event_bodies(
        &self,
        project: &ProjectId,
        revisions: &[i64],
    ) -> Result<Vec<(i64, Vec<u8>)>, DomainError> {
        let mut out = Vec::with_capacity(revisions.len());
        for chunk in revisions.chunks(500) {
            let mut values = vec![Value::from(project.as_str())];
            values.extend(chunk.iter().map(|r| Value::from(*r)));
            let marks = marks(chunk.len());
            let rows = self
                .db
                .query_all_raw(sql(
                    self.db.get_database_backend(),
                    &format!(
                        "SELECT revision, body FROM events WHERE project = ? \
                         AND revision IN ({marks})"
                    ),
                    values,
                ))
                .await
                .map_err(db_error)?;
            for r in rows {
                out.push((
                    r.try_get_by_index(0).map_err(db_error)?,
                    r.try_get_by_index(1).map_err(db_error)?,
                ));
            }
        }
        Ok(out)
    }

    async fn compact_events(
        &self,
        horizon: Timestamp,
        budget: std::time::Duration,
    ) -> Result<u64, DomainError> {
        let started = std::time::Instant::now();
        let backend = self.db.get_database_backend();
        let projects = self
            .db
            .query_all_raw(sql(
                backend,
                "SELECT project, compacted_through FROM event_heads \
                 WHERE compacted_through < revision ORDER BY compacted_through",
                vec![],
            ))
            .await
            .map_err(db_error)?;
        let mut removed = 0u64;
        for row in projects {
            let project: String = row.try_get_by_index(0).map_err(db_error)?;
            loop {
                if started.elapsed() >= budget {
                    return Ok(removed);
                }
                let n = compact_prefix(&self.db, backend, &project, horizon)
                    .await
                    .map_err(db_error)?;
                if n == 0 {
                    break;
                }
                removed += n;
            }
        }
        Ok(removed)
    }

    fn appended(&self) -> watch::Receiver<u64> {
        self.outbox.appended.subscribe()
    }

    async fn relay_backlog(&self) -> Result<Vec<Backlog>, DomainError> {
        let rows = self
            .db
            .query_all_raw(sql(
                self.db.get_database_backend(),
                "SELECT h.project, COALESCE(r.revision, 0), h.revision, h.compacted_through \
                 FROM event_heads h LEFT JOIN event_relay r ON r.project = h.project \
                 WHERE h.revision > COALESCE(r.revision, 0) ORDER BY h.project",
                vec![],
            ))
            .await
            .map_err(db_error)?;
        rows.into_iter()
            .map(|r| {
                Ok(Backlog {
                    project: ProjectId::from_stored(r.try_get_by_index::<String>(0)?),
                    published: r.try_get_by_index(1)?,
                    bounds: LogBounds {
                        head: r.try_get_by_index(2)?,
                        compacted_through: r.try_get_by_index(3)?,
                    },
                })
            })
            .collect::<Result<_, DbErr>>()
            .map_err(db_error)
    }

    async fn advance_relay(&self, project: &ProjectId, revision: i64) -> Result<(), DomainError> {
        self.db
            .execute_raw(sql(
                self.db.get_database_backend(),
                "INSERT INTO event_relay (project, revision) VALUES (?, ?) \
                 ON CONFLICT (project) DO UPDATE SET revision = excluded.revision \
                 WHERE event_relay.revision < excluded.revision",
                vec![project.as_str().into(), revision.into()],
            ))
            .await
            .map_err(db_error)?;
        Ok(())
    }
}

/// The right to run the bus relay: one holder among the replicas of a
/// PostgreSQL database (a session advisory lock on a connection of its own,
/// released when the connection ends); always granted on SQLite, whose file
/// one server owns.
pub struct RelayLease {
    conn: Option<sea_orm::sqlx::PgConnection>,
}

/// The advisory lock of the relay: one per database and schema (advisory
/// locks are per database; several deployments may share one in schemas).
const RELAY_LOCK: &str = "SELECT pg_try_advisory_lock(('x' || substr(md5(\
     'user-service event relay ' || current_schema()), 1, 16))::bit(64)::bigint)";

impl RelayLease {
    /// The lease, if no other replica holds it.
    pub async fn try_acquire(database_url: &str) -> Result<Option<RelayLease>, DomainError> {
        use sea_orm::sqlx::Connection;
        if !database_url.starts_with("postgres") {
            return Ok(Some(RelayLease { conn: None }));
        }
        let mut conn = sea_orm::sqlx::PgConnection::connect(database_url)
            .await
            .map_err(|e| DomainError::Unavailable(format!("relay lease: {e}")))?;
        let (got,): (bool,) = sea_orm::sqlx::query_as(RELAY_LOCK)
            .fetch_one(&mut conn)
            .await
            .map_err(|e| DomainError::Unavailable(format!("relay lease: {e}")))?;
        Ok(got.then_some(RelayLease { conn: Some(conn) }))
    }

    /// Whether the lease still holds (its connection answers within 5 s).
    pub async fn holds(&mut self) -> bool {
        use sea_orm::sqlx::Connection;
        match &mut self.conn {
            None => true,
            Some(c) => matches!(
                tokio::time::timeout(std::time::Duration::from_secs(5), c.ping()).await,
                Ok(Ok(()))
            ),
        }
    }
}

/// Removes the oldest run (at most 1000) of a project's events older than
/// `horizon`, and raises its compaction mark in the same transaction.
async fn compact_prefix(
    db: &sea_orm::DatabaseConnection,
    backend: DatabaseBackend,
    project: &str,
    horizon: Timestamp,
) -> Result<u64, DbErr> {
    let txn = db.begin().await?;
    let oldest = txn
        .query_all_raw(sql(
            backend,
            "SELECT revision, event_time FROM events WHERE project = ? \
             ORDER BY revision LIMIT 1000",
            vec![project.into()],
        ))
        .await?;
    // A prefix: an event stays while an older one must (clocks of replicas
    // may disagree a little).
    let mut cut = None;
    for r in &oldest {
        let time: i64 = r.try_get_by_index(1)?;
        if time >= horizon.nanos() {
            break;
        }
        cut = Some(r.try_get_by_index::<i64>(0)?);
    }
    let Some(cut) = cut else {
        txn.rollback().await?;
        return Ok(0);
    };
    txn.execute_raw(sql(
        backend,
        "UPDATE event_heads SET compacted_through = ? \
         WHERE project = ? AND compacted_through < ?",
        vec![cut.into(), project.into(), cut.into()],
    ))
    .await?;
    let res = txn
        .execute_raw(sql(
            backend,
            "DELETE FROM events WHERE project = ? AND revision <= ?",
            vec![project.into(), cut.into()],
        ))
        .await?;
    txn.commit().await?;
    Ok(res.rows_affected())
}
