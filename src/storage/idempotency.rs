//! Idempotency keys: the `request_ids` row written in the same transaction
//! as the users a request created, and the response a retry gets back.
//!
//! The response is the rows as stored. A field missing from a record reads
//! as its default, so a key stored before a column was added still replays
//! (with the new field empty, as the user was then). This release writes
//! the rows in the form the previous release reads (one row, or an array
//! for a batch), so a retry that reaches a replica not yet upgraded, or a
//! rollback, still replays; it also reads the versioned envelope
//! `{"v":1,"users":[...]}` that the next release will write, and refuses a
//! newer version instead of misreading it.

use sea_orm::sea_query::OnConflict;
use sea_orm::{ActiveValue::Set, ConnectionTrait, DbErr, EntityTrait};
use serde::Deserialize;

use super::entity::{request_ids, users};
use super::{db_error, from_model};
use crate::domain::{DomainError, IdempotencyKey, User};

/// The newest envelope version this build reads.
const VERSION: u32 = 1;

#[derive(Deserialize)]
struct Envelope {
    v: u32,
    users: Vec<users::Model>,
}

/// The record of the users a request created, as stored.
pub(crate) fn encode_response(users: &[users::Model]) -> Result<String, DomainError> {
    let encoded = match users {
        [one] => serde_json::to_string(one),
        many => serde_json::to_string(many),
    };
    encoded.map_err(|e| DomainError::Internal(format!("encode idempotency record: {e}")))
}

/// Reads a record of any form this build knows.
fn decode_response(s: &str) -> Result<Vec<users::Model>, DomainError> {
    let bad = |e: serde_json::Error| DomainError::Internal(format!("idempotency record: {e}"));
    let rows: Vec<users::Model> = match s.as_bytes().first() {
        Some(b'[') => serde_json::from_str(s).map_err(bad)?,
        Some(b'{') if !s.starts_with("{\"v\":") => vec![serde_json::from_str(s).map_err(bad)?],
        _ => {
            let e: Envelope = serde_json::from_str(s).map_err(bad)?;
            if e.v > VERSION {
                return Err(DomainError::Internal(format!(
                    "idempotency record version {} is newer than this build",
                    e.v
                )));
            }
            e.users
        }
    };
    // Defaults stand in for columns a record predates, never for its
    // identity: a record without one is corrupt.
    if rows.is_empty()
        || rows
            .iter()
            .any(|r| r.project.is_empty() || r.user_id.is_empty())
    {
        return Err(DomainError::Internal(
            "idempotency record without its users' names".into(),
        ));
    }
    Ok(rows)
}

/// The result stored under an idempotency key: one user (CreateUser) or a
/// list (BatchCreateUsers).
pub(crate) async fn find_request_users<C: ConnectionTrait>(
    conn: &C,
    project: &str,
    request_id: &str,
) -> Result<Option<(String, Vec<User>)>, DomainError> {
    let found = request_ids::Entity::find_by_id((project.to_owned(), request_id.to_owned()))
        .one(conn)
        .await
        .map_err(db_error)?;
    let Some(rec) = found else { return Ok(None) };
    let models = decode_response(&rec.response)?;
    let users = models
        .into_iter()
        .map(from_model)
        .collect::<Result<_, _>>()?;
    Ok(Some((rec.fingerprint, users)))
}

/// The user stored under a CreateUser idempotency key. A key of a batch
/// answers with its first user; its fingerprint never matches a CreateUser.
pub(crate) async fn find_request<C: ConnectionTrait>(
    conn: &C,
    project: &str,
    request_id: &str,
) -> Result<Option<(String, User)>, DomainError> {
    Ok(find_request_users(conn, project, request_id)
        .await?
        .and_then(|(fingerprint, users)| users.into_iter().next().map(|u| (fingerprint, u))))
}

/// Stores an idempotency key with the response it answers (for `first`, the
/// first user of the request); `false` if the key is already stored.
pub(crate) async fn claim_key<C: ConnectionTrait>(
    conn: &C,
    first: &User,
    key: &IdempotencyKey,
    response: String,
) -> Result<bool, DbErr> {
    let rec = request_ids::ActiveModel {
        project: Set(first.project.as_str().to_owned()),
        request_id: Set(key.request_id.clone()),
        fingerprint: Set(key.fingerprint.clone()),
        user_id: Set(first.id.as_str().to_owned()),
        response: Set(response),
        create_time: Set(first.create_time.nanos()),
    };
    let inserted = request_ids::Entity::insert(rec)
        .on_conflict(
            OnConflict::columns([request_ids::Column::Project, request_ids::Column::RequestId])
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(conn)
        .await?;
    Ok(inserted == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str) -> users::Model {
        users::Model {
            project: "acme".into(),
            user_id: id.into(),
            email: Some(format!("{id}@example.com")),
            state: crate::domain::State::Active as i32,
            ..Default::default()
        }
    }

    #[test]
    fn records_round_trip_in_every_form() {
        let rows = vec![row("a"), row("b")];
        let many = encode_response(&rows).unwrap();
        assert!(many.starts_with('['), "{many}");
        assert_eq!(decode_response(&many).unwrap(), rows);
        let one = encode_response(&rows[..1]).unwrap();
        assert!(one.starts_with("{\"project\":"), "{one}");
        assert_eq!(decode_response(&one).unwrap(), vec![rows[0].clone()]);
        // The versioned envelope of the next release.
        let v1 = format!("{{\"v\":1,\"users\":{many}}}");
        assert_eq!(decode_response(&v1).unwrap(), rows);
    }

    #[test]
    fn a_record_without_names_is_corrupt() {
        assert!(decode_response("{}").is_err());
        assert!(decode_response("[]").is_err());
        assert!(decode_response("{\"v\":1,\"users\":[{}]}").is_err());
    }

    #[test]
    fn a_record_older_than_a_column_still_reads() {
        let mut v = serde_json::to_value(row("a")).unwrap();
        // As if `custom_data` and `revision` had been added after it.
        let o = v.as_object_mut().unwrap();
        o.remove("custom_data");
        o.remove("revision");
        let s = format!("{{\"v\":1,\"users\":[{v}]}}");
        assert_eq!(decode_response(&s).unwrap(), vec![row("a")]);
        // Also the JSON text columns: an absent one is empty, and the row
        // still becomes a user.
        let mut v = serde_json::to_value(row("b")).unwrap();
        let o = v.as_object_mut().unwrap();
        for column in ["tags", "roles", "metadata", "addresses", "secondary_emails"] {
            o.remove(column);
        }
        let rows = decode_response(&v.to_string()).unwrap();
        let user = from_model(rows[0].clone()).expect("a user");
        assert!(user.profile.tags.is_empty() && user.profile.metadata.is_empty());
    }

    #[test]
    fn a_newer_record_is_refused() {
        assert!(decode_response("{\"v\":2,\"users\":[]}").is_err());
    }
}
