//! Writing the index terms of users (`user_terms`, see `migration::terms`)
//! in the same transaction as the users themselves.

use std::collections::BTreeSet;

use migration::terms::{Indexed, terms};
use sea_orm::sea_query::OnConflict;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseBackend, DbErr, EntityTrait,
    QueryFilter, QueryTrait, Statement,
};

use super::batch::fixed_parts;
use super::entity::user_terms;
use crate::domain::{Email, User};

/// Every (kind, term) of `u`.
pub(crate) fn of(u: &User) -> BTreeSet<(i16, String)> {
    let p = &u.profile;
    let email_key = p.email.as_ref().map(Email::key);
    let secondary_emails: Vec<String> = p
        .secondary_emails
        .iter()
        .map(|e| e.as_str().to_owned())
        .collect();
    let secondary_phone_numbers: Vec<String> = p
        .secondary_phone_numbers
        .iter()
        .map(|v| v.as_str().to_owned())
        .collect();
    terms(&Indexed {
        email_key: email_key.as_deref(),
        phone_number: p.phone_number.as_ref().map(|v| v.as_str()),
        username: p.username.as_ref().map(|v| v.as_str()),
        display_name: &p.display_name,
        given_name: &p.given_name,
        family_name: &p.family_name,
        tags: &p.tags,
        roles: &p.roles,
        metadata: p
            .metadata
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect(),
        secondary_emails: &secondary_emails,
        secondary_phone_numbers: &secondary_phone_numbers,
    })
}

/// The INSERTs of the terms of new users: multi-row statements of a few
/// fixed sizes (each size is one prepared statement), rows sorted by key, so
/// that the statements walk the term index in order instead of landing all
/// over it.
pub(crate) fn statements<'a>(
    backend: DatabaseBackend,
    users: impl IntoIterator<Item = &'a User>,
) -> Vec<Statement> {
    let mut keyed: Vec<(i16, String, &User)> = Vec::new();
    for u in users {
        keyed.extend(of(u).into_iter().map(|(kind, term)| (kind, term, u)));
    }
    insert_statements(backend, keyed, false)
}

/// The INSERTs of the given terms, each of its user (see `statements`);
/// `tolerant`: a term already stored is left as it is.
fn insert_statements(
    backend: DatabaseBackend,
    mut keyed: Vec<(i16, String, &User)>,
    tolerant: bool,
) -> Vec<Statement> {
    keyed.sort_by(|a, b| {
        (
            a.2.project.as_str(),
            a.0,
            &a.1,
            a.2.create_time.nanos(),
            a.2.id.as_str(),
        )
            .cmp(&(
                b.2.project.as_str(),
                b.0,
                &b.1,
                b.2.create_time.nanos(),
                b.2.id.as_str(),
            ))
    });
    let rows: Vec<user_terms::ActiveModel> = keyed
        .into_iter()
        .map(|(kind, term, u)| user_terms::ActiveModel {
            project: Set(u.project.as_str().to_owned()),
            kind: Set(kind),
            term: Set(term),
            create_time: Set(u.create_time.nanos()),
            user_id: Set(u.id.as_str().to_owned()),
        })
        .collect();
    let key = [
        user_terms::Column::Project,
        user_terms::Column::Kind,
        user_terms::Column::Term,
        user_terms::Column::CreateTime,
        user_terms::Column::UserId,
    ];
    fixed_parts(rows, &[128, 32, 8, 1])
        .into_iter()
        .map(|part| {
            let insert = user_terms::Entity::insert_many(part);
            if tolerant {
                let keep = OnConflict::columns(key).do_nothing().to_owned();
                insert.on_conflict(keep).build(backend)
            } else {
                insert.build(backend)
            }
        })
        .collect()
}

/// The statements that bring the terms of `user` from those of `previous`
/// to its own: one DELETE by the whole key per term it lost, the INSERTs of
/// those it gained. A term both have is not touched (rewriting it would
/// dirty its index page for nothing). Empty when the terms are the same.
pub(crate) fn change_statements(
    backend: DatabaseBackend,
    user: &User,
    previous: &User,
) -> Vec<Statement> {
    let (old, new) = (of(previous), of(user));
    let mut out: Vec<Statement> = old
        .difference(&new)
        .map(|(kind, term)| {
            user_terms::Entity::delete_many()
                .filter(user_terms::Column::Project.eq(user.project.as_str()))
                .filter(user_terms::Column::Kind.eq(*kind))
                .filter(user_terms::Column::Term.eq(term.as_str()))
                .filter(user_terms::Column::CreateTime.eq(previous.create_time.nanos()))
                .filter(user_terms::Column::UserId.eq(user.id.as_str()))
                .build(backend)
        })
        .collect();
    let gained = new.into_iter().filter(|t| !old.contains(t));
    // Tolerant: a term the stored row already has (it should not) must
    // not make the user impossible to update.
    out.extend(insert_statements(
        backend,
        gained.map(|(kind, term)| (kind, term, user)).collect(),
        true,
    ));
    out
}

/// Inserts the terms of new users (see `statements`).
pub(crate) async fn insert<'a, C: ConnectionTrait>(
    conn: &C,
    users: impl IntoIterator<Item = &'a User>,
) -> Result<(), DbErr> {
    for stmt in statements(conn.get_database_backend(), users) {
        conn.execute_raw(stmt).await?;
    }
    Ok(())
}

/// Removes every term of one user.
pub(crate) async fn delete<C: ConnectionTrait>(
    conn: &C,
    project: &str,
    user_id: &str,
) -> Result<(), DbErr> {
    user_terms::Entity::delete_many()
        .filter(user_terms::Column::Project.eq(project))
        .filter(user_terms::Column::UserId.eq(user_id))
        .exec(conn)
        .await?;
    Ok(())
}

/// Brings the terms of `user` from those of `previous` to its own (see
/// `change_statements`).
pub(crate) async fn replace<C: ConnectionTrait>(
    conn: &C,
    user: &User,
    previous: &User,
) -> Result<(), DbErr> {
    for stmt in change_statements(conn.get_database_backend(), user, previous) {
        conn.execute_raw(stmt).await?;
    }
    Ok(())
}
