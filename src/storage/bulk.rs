//! Bulk writes: BatchCreateUsers (all or nothing) and ImportUsers chunks
//! (one transaction each, conflicting users skipped). Both write with the
//! multi-row INSERTs of the group commit; when a unique index refuses a
//! statement, one query per 100 users finds who holds what.

use std::collections::HashMap;

use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, DatabaseBackend, DatabaseConnection, DbErr,
    EntityTrait, QueryFilter, SqlErr, Statement, TransactionTrait,
};

use super::batch::user_statements;
use super::entity::users;
use super::events::Outbox;
use super::sqlite_write::{SqliteWriter, Step, WriteError};
use super::{claim_key, db_error, encode_response, find_request_users, terms, to_model};
use crate::domain::bulk::identifiers;
use crate::domain::events::{Event, Origin};
use crate::domain::{
    BatchCreated, DomainError, IdempotencyKey, Identifier, StoredConflict, Timestamp, User,
};

fn is_unique_violation(e: &DbErr) -> bool {
    matches!(e.sql_err(), Some(SqlErr::UniqueConstraintViolation(_)))
}

/// The statements storing the users' rows only.
pub(crate) fn user_rows(
    backend: DatabaseBackend,
    users: &[&User],
) -> Result<Vec<Statement>, DbErr> {
    let mut models = Vec::with_capacity(users.len());
    for u in users {
        let m = to_model(u).map_err(|e| DbErr::Custom(e.to_string()))?;
        models.push(users::ActiveModel::from(m));
    }
    Ok(user_statements(backend, models))
}

/// The statements storing users: their rows, then their index terms.
pub(crate) fn row_statements(
    backend: DatabaseBackend,
    users: &[&User],
) -> Result<Vec<Statement>, DbErr> {
    let mut out = user_rows(backend, users)?;
    out.extend(terms::statements(backend, users.iter().copied()));
    Ok(out)
}

/// Writes users and their index terms inside `conn`'s transaction.
async fn write<C: ConnectionTrait>(conn: &C, users: &[&User]) -> Result<(), DbErr> {
    for stmt in row_statements(conn.get_database_backend(), users)? {
        conn.execute_raw(stmt).await?;
    }
    Ok(())
}

/// The creation events of `users`, recording the current caller.
pub(crate) fn creation_events(users: &[&User]) -> Vec<Event> {
    let origin = Origin::current();
    users
        .iter()
        .map(|u| Event::user_created(u, origin.clone()))
        .collect()
}

/// Appends the creation events of `users` inside `conn`'s transaction.
async fn created<C: ConnectionTrait>(
    conn: &C,
    outbox: &Outbox,
    users: &[&User],
) -> Result<(), DbErr> {
    outbox.append(conn, &creation_events(users)).await
}

/// Users per part handed to the SQLite writer: the next part is built while
/// the writer runs the last one, and only a few parts are in memory at once.
pub(crate) const PART: usize = 250;

/// Stores new users, their index terms and `events` in one transaction on
/// the SQLite writer thread. The caller calls `outbox.committed()`.
pub(crate) async fn store_on(
    writer: &SqliteWriter,
    outbox: &Outbox,
    users: &[&User],
    events: &[Event],
) -> Result<(), WriteError> {
    if users.is_empty() {
        return Ok(());
    }
    let backend = DatabaseBackend::Sqlite;
    // Built before the writer takes the lock: the events last (the head's
    // bump is the last statement), the first part before it begins.
    let events = outbox.steps(backend, events);
    let part = |users: &[&User]| -> Result<Vec<Step>, WriteError> {
        Ok(row_statements(backend, users)
            .map_err(|e| WriteError::Build(e.to_string()))?
            .into_iter()
            .map(Step::from)
            .collect())
    };
    let mut parts = users.chunks(PART);
    let first = part(parts.next().unwrap_or_default())?;
    let mut txn = writer.begin()?;
    txn.run(first).await?;
    for users in parts {
        txn.run(part(users)?).await?;
    }
    txn.run(events).await?;
    txn.commit().await
}

/// Why an import chunk's transaction did not commit.
enum Refused {
    /// A unique index refused a user; nothing was written.
    Unique,
    Failed(DomainError),
}

/// Stores `users` and their creation events in one transaction: on SQLite
/// handed whole to the writer thread (see `sqlite_write`), elsewhere through
/// the pool.
async fn store_chunk(
    db: &DatabaseConnection,
    writer: Option<&SqliteWriter>,
    outbox: &Outbox,
    users: &[&User],
) -> Result<(), Refused> {
    if let Some(writer) = writer {
        return match store_on(writer, outbox, users, &creation_events(users)).await {
            Ok(()) => Ok(()),
            Err(WriteError::Unique(_)) => Err(Refused::Unique),
            Err(e) => Err(Refused::Failed(e.into_domain("storing an import chunk"))),
        };
    }
    let txn = db.begin().await.map_err(|e| Refused::Failed(db_error(e)))?;
    let written = match write(&txn, users).await {
        Ok(()) => created(&txn, outbox, users).await,
        Err(e) => Err(e),
    };
    match written {
        Ok(()) => txn.commit().await.map_err(|e| Refused::Failed(db_error(e))),
        Err(e) if is_unique_violation(&e) => {
            let _ = txn.rollback().await;
            Err(Refused::Unique)
        }
        Err(e) => {
            let _ = txn.rollback().await;
            Err(Refused::Failed(db_error(e)))
        }
    }
}

pub(crate) async fn insert_all(
    db: &DatabaseConnection,
    outbox: &Outbox,
    batch: &[User],
    key: Option<&IdempotencyKey>,
) -> Result<BatchCreated, DomainError> {
    let Some(first) = batch.first() else {
        return Ok(BatchCreated::New(Vec::new()));
    };
    let project = first.project.as_str();
    let txn = db.begin().await.map_err(db_error)?;
    if let Some(key) = key {
        let models = batch.iter().map(to_model).collect::<Result<Vec<_>, _>>()?;
        let inserted = claim_key(&txn, first, key, encode_response(&models)?)
            .await
            .map_err(db_error)?;
        if !inserted {
            // A concurrent twin committed first: answer with its result.
            txn.rollback().await.map_err(db_error)?;
            return match find_request_users(db, project, &key.request_id).await? {
                Some((fingerprint, users)) => Ok(BatchCreated::Earlier { fingerprint, users }),
                None => Err(DomainError::Unavailable(
                    "idempotency key vanished while in use; retry".into(),
                )),
            };
        }
    }
    let refs: Vec<&User> = batch.iter().collect();
    let written = match write(&txn, &refs).await {
        Ok(()) => created(&txn, outbox, &refs).await,
        Err(e) => Err(e),
    };
    match written {
        Ok(()) => {
            txn.commit().await.map_err(db_error)?;
            outbox.committed();
            Ok(BatchCreated::New(batch.to_vec()))
        }
        Err(e) if is_unique_violation(&e) => {
            txn.rollback().await.map_err(db_error)?;
            let conflicts = find_conflicts(db, &refs).await?;
            match conflicts.iter().position(Option::is_some) {
                Some(index) => Ok(BatchCreated::Conflict {
                    index,
                    id: conflicts[index].map_or(Identifier::Name, |c| c.id),
                }),
                // The holder went away meanwhile; the caller may retry.
                None => Err(db_error(e)),
            }
        }
        Err(e) => {
            let _ = txn.rollback().await;
            Err(db_error(e))
        }
    }
}

/// How often a chunk is retried without the users found conflicting before
/// falling back to one savepoint per user (only under concurrent writes of
/// the same identifiers).
const IMPORT_ATTEMPTS: usize = 3;

pub(crate) async fn import(
    db: &DatabaseConnection,
    writer: Option<&SqliteWriter>,
    outbox: &Outbox,
    chunk: &[User],
) -> Result<Vec<Option<StoredConflict>>, DomainError> {
    let mut out: Vec<Option<StoredConflict>> = vec![None; chunk.len()];
    // No savepoints: SQLite copies every page a savepoint changes into a
    // sub-journal, which cost more than the inserts. A refused chunk rolls
    // back whole and is retried without the users found conflicting.
    for _ in 0..IMPORT_ATTEMPTS {
        let pending: Vec<usize> = (0..chunk.len()).filter(|i| out[*i].is_none()).collect();
        let users: Vec<&User> = pending.iter().map(|i| &chunk[*i]).collect();
        match store_chunk(db, writer, outbox, &users).await {
            Ok(()) => {
                outbox.committed();
                return Ok(out);
            }
            Err(Refused::Unique) => {
                let found = find_conflicts(db, &users).await?;
                if found.iter().all(Option::is_none) {
                    break;
                }
                for (i, c) in pending.into_iter().zip(found) {
                    out[i] = c;
                }
            }
            Err(Refused::Failed(e)) => return Err(e),
        }
    }
    // Someone keeps taking identifiers of this chunk: one savepoint per user.
    let txn = db.begin().await.map_err(db_error)?;
    let mut stored: Vec<&User> = Vec::new();
    for i in 0..chunk.len() {
        if out[i].is_some() {
            continue;
        }
        let sp = txn.begin().await.map_err(db_error)?;
        match write(&sp, &[&chunk[i]]).await {
            Ok(()) => {
                sp.commit().await.map_err(db_error)?;
                stored.push(&chunk[i]);
            }
            Err(e) if is_unique_violation(&e) => {
                sp.rollback().await.map_err(db_error)?;
                let found = find_conflicts(&txn, &[&chunk[i]]).await?;
                out[i] = Some(found[0].unwrap_or(StoredConflict {
                    id: match db_error(e) {
                        DomainError::AlreadyExists(id) => id,
                        _ => Identifier::Name,
                    },
                    holder_create_time: Timestamp::from_nanos(0),
                }));
            }
            Err(e) => return Err(db_error(e)),
        }
    }
    created(&txn, outbox, &stored).await.map_err(db_error)?;
    txn.commit().await.map_err(db_error)?;
    outbox.committed();
    Ok(out)
}

/// For each user, the first of its identifiers (by the fixed priority) that a
/// stored user holds: a live user for email, phone number, username and
/// external id, any user for the name.
async fn find_conflicts<C: ConnectionTrait>(
    conn: &C,
    batch: &[&User],
) -> Result<Vec<Option<StoredConflict>>, DomainError> {
    let mut held: HashMap<(Identifier, String), i64> = HashMap::new();
    for part in batch.chunks(100) {
        let Some(first) = part.first() else { continue };
        let mut by: HashMap<Identifier, Vec<String>> = HashMap::new();
        for u in part {
            for (id, v) in identifiers(u) {
                by.entry(id).or_default().push(v);
            }
        }
        let mut live = Condition::any();
        for (id, values) in &by {
            let column = match id {
                Identifier::Email => users::Column::EmailKey,
                Identifier::PhoneNumber => users::Column::PhoneNumber,
                Identifier::Username => users::Column::Username,
                Identifier::ExternalId => users::Column::ExternalId,
                Identifier::Name => continue,
            };
            live = live.add(column.is_in(values.iter().map(String::as_str)));
        }
        let names = by.get(&Identifier::Name).cloned().unwrap_or_default();
        let rows = users::Entity::find()
            .filter(users::Column::Project.eq(first.project.as_str()))
            .filter(
                Condition::any()
                    .add(users::Column::UserId.is_in(names))
                    .add(
                        Condition::all()
                            .add(users::Column::DeleteTime.is_null())
                            .add(live),
                    ),
            )
            .all(conn)
            .await
            .map_err(db_error)?;
        for row in rows {
            let live = row.delete_time.is_none();
            let mut hold = |id, v: Option<String>| {
                if let Some(v) = v {
                    held.insert((id, v), row.create_time);
                }
            };
            hold(Identifier::Name, Some(row.user_id.clone()));
            if live {
                hold(Identifier::Email, row.email_key.clone());
                hold(Identifier::PhoneNumber, row.phone_number.clone());
                hold(Identifier::Username, row.username.clone());
                hold(Identifier::ExternalId, row.external_id.clone());
            }
        }
    }
    Ok(batch
        .iter()
        .map(|u| {
            identifiers(u).find_map(|key| {
                held.get(&key).map(|t| StoredConflict {
                    id: key.0,
                    holder_create_time: Timestamp::from_nanos(*t),
                })
            })
        })
        .collect())
}
