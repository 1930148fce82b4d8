//! Groups and memberships (see `m20261203_000006_groups`).
//!
//! Membership changes run in one transaction that first locks the group's
//! row (an update that changes nothing): on SQLite it takes the write lock
//! before anything is read, on PostgreSQL it orders changes of one group and
//! holds a concurrent DeleteGroup back. Changes that nest groups also take a
//! per-project advisory lock on PostgreSQL, so that two replicas adding
//! `a` into `b` and `b` into `a` at once cannot both pass the cycle check.
//! Foreign keys refuse a member erased meanwhile.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap, HashSet};

use sea_orm::{
    ConnectionTrait, DatabaseBackend, DatabaseTransaction, DbErr, EntityTrait, SqlErr, Statement,
    TransactionTrait, Value,
};
use sha2::{Digest, Sha256};
use tracing::instrument;

use super::entity::groups;
use super::{SeaOrmRepository, db_error, json, unjson};
use crate::domain::events::Event;
use crate::domain::filter::{Filter, Op, Pattern, TextField, TimeField};
use crate::domain::group::{GroupOrderField, MAX_NESTING};
use crate::domain::query::SortValue;
use crate::domain::{
    Cursor, DomainError, Group, GroupCreated, GroupFields, GroupId, GroupName, GroupQuery,
    GroupRepository, IdempotencyKey, Member, MemberKind, MembershipError, ProjectId, Timestamp,
    UserName, UserQuery,
};

/// Nested groups one transitive read merges per statement.
const GROUPS_PER_STATEMENT: usize = 100;

/// A statement from SQL with `?` marks (numbered `$1`, `$2`, ... on
/// PostgreSQL). The SQL here never holds a `?` of its own.
pub(crate) fn sql(backend: DatabaseBackend, template: &str, values: Vec<Value>) -> Statement {
    let text = if backend == DatabaseBackend::Postgres {
        let mut out = String::with_capacity(template.len() + 16);
        let mut n = 0;
        for ch in template.chars() {
            if ch == '?' {
                n += 1;
                out.push('$');
                out.push_str(&n.to_string());
            } else {
                out.push(ch);
            }
        }
        out
    } else {
        template.to_owned()
    };
    Statement::from_sql_and_values(backend, text, values)
}

/// `?, ?, ?` for `n` values.
pub(crate) fn marks(n: usize) -> String {
    vec!["?"; n].join(", ")
}

fn v(s: &str) -> Value {
    Value::from(s.to_owned())
}

/// The idempotency keys of CreateGroup share `request_ids` with CreateUser
/// under this prefix, which no request_id can start with (`/` is not
/// allowed in one).
fn group_key(request_id: &str) -> String {
    format!("groups/{request_id}")
}

fn to_model(g: &Group) -> Result<groups::Model, DomainError> {
    Ok(groups::Model {
        project: g.project.as_str().to_owned(),
        group_id: g.id.as_str().to_owned(),
        display_name: g.fields.display_name.clone(),
        description: g.fields.description.clone(),
        metadata: json(&g.fields.metadata)?,
        create_time: g.create_time.nanos(),
        update_time: g.update_time.nanos(),
        revision: g.revision,
    })
}

fn from_model(m: groups::Model) -> Result<Group, DomainError> {
    if m.project.is_empty() || m.group_id.is_empty() {
        return Err(DomainError::Internal("group record without a name".into()));
    }
    Ok(Group {
        fields: GroupFields {
            display_name: m.display_name,
            description: m.description,
            metadata: unjson(&m.metadata)?,
        },
        project: ProjectId::from_stored(m.project),
        id: GroupId::from_stored(m.group_id),
        create_time: Timestamp::from_nanos(m.create_time),
        update_time: Timestamp::from_nanos(m.update_time),
        revision: m.revision,
    })
}

/// The members of `members` that are in `done`, once each, in request order.
fn in_request_order(members: &[Member], mut done: HashSet<(MemberKind, String)>) -> Vec<Member> {
    members
        .iter()
        .filter(|m| done.remove(&(m.kind, m.id.clone())))
        .cloned()
        .collect()
}

/// The advisory lock of a project's group nesting (PostgreSQL).
fn nesting_lock_key(project: &ProjectId) -> i64 {
    let d = Sha256::new()
        .chain_update(b"users.v1.group_nesting")
        .chain_update(project.as_str().as_bytes())
        .finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    i64::from_be_bytes(b)
}

fn is_foreign_key_violation(e: &DbErr) -> bool {
    matches!(e.sql_err(), Some(SqlErr::ForeignKeyConstraintViolation(_)))
}

impl SeaOrmRepository {
    /// Runs a conditional write of one row and, if it changed the row,
    /// appends `event`, in one transaction.
    async fn changed(&self, stmt: Statement, event: Event) -> Result<bool, DomainError> {
        let txn = self.db.begin().await.map_err(db_error)?;
        let res = txn.execute_raw(stmt).await.map_err(db_error)?;
        let done = res.rows_affected() == 1;
        if done {
            self.outbox.append(&txn, &[event]).await.map_err(db_error)?;
        }
        txn.commit().await.map_err(db_error)?;
        if done {
            self.outbox.committed();
        }
        Ok(done)
    }

    fn backend(&self) -> DatabaseBackend {
        self.db.get_database_backend()
    }

    async fn strings<C: ConnectionTrait>(
        conn: &C,
        stmt: Statement,
    ) -> Result<Vec<String>, DomainError> {
        conn.query_all_raw(stmt)
            .await
            .map_err(db_error)?
            .iter()
            .map(|r| r.try_get_by_index::<String>(0).map_err(db_error))
            .collect()
    }

    async fn group_rows<C: ConnectionTrait>(
        conn: &C,
        stmt: Statement,
    ) -> Result<Vec<Group>, DomainError> {
        groups::Entity::find()
            .from_raw_sql(stmt)
            .all(conn)
            .await
            .map_err(db_error)?
            .into_iter()
            .map(from_model)
            .collect()
    }

    /// `group` and every group nested in it, at any depth; empty if the
    /// group does not exist.
    async fn closure<C: ConnectionTrait>(
        &self,
        conn: &C,
        project: &str,
        group: &str,
        limit: Option<usize>,
    ) -> Result<Vec<String>, DomainError> {
        let stmt = sql(
            self.backend(),
            "WITH RECURSIVE down(g) AS (\
               SELECT group_id FROM groups WHERE project = ? AND group_id = ? \
               UNION \
               SELECT m.member_id FROM group_groups m JOIN down ON m.group_id = down.g \
               WHERE m.project = ?) \
             SELECT g FROM down LIMIT ?",
            vec![
                v(project),
                v(group),
                v(project),
                Value::from(limit.map_or(i64::MAX, |n| n as i64)),
            ],
        );
        Self::strings(conn, stmt).await
    }

    /// The groups that contain `group` (directly or through nesting), with
    /// `group` itself, and the longest chain of memberships above it
    /// (counted up to `MAX_NESTING + 1`).
    async fn ancestors<C: ConnectionTrait>(
        &self,
        conn: &C,
        project: &str,
        group: &str,
    ) -> Result<(u32, HashSet<String>), DomainError> {
        let stmt = sql(
            self.backend(),
            "WITH RECURSIVE r(g, d) AS (\
               SELECT group_id, 0 FROM groups WHERE project = ? AND group_id = ? \
               UNION \
               SELECT m.group_id, r.d + 1 FROM group_groups m JOIN r ON m.member_id = r.g \
               WHERE m.project = ? AND r.d <= ?) \
             SELECT g, d FROM r",
            vec![
                v(project),
                v(group),
                v(project),
                Value::from(MAX_NESTING as i32),
            ],
        );
        let rows = conn.query_all_raw(stmt).await.map_err(db_error)?;
        let mut depth = 0u32;
        let mut found = HashSet::new();
        for r in rows {
            let g: String = r.try_get_by_index(0).map_err(db_error)?;
            let d: i32 = r.try_get_by_index(1).map_err(db_error)?;
            depth = depth.max(d.max(0) as u32);
            found.insert(g);
        }
        Ok((depth, found))
    }

    /// For each of `groups`, the longest chain of memberships below it
    /// (counted up to `MAX_NESTING + 1`): one statement per 500 groups.
    async fn heights<C: ConnectionTrait>(
        &self,
        conn: &C,
        project: &str,
        groups: &[&str],
    ) -> Result<HashMap<String, u32>, DomainError> {
        let mut out = HashMap::new();
        for chunk in groups.chunks(500) {
            let mut values = vec![v(project)];
            values.extend(chunk.iter().map(|g| v(g)));
            values.extend([v(project), Value::from(MAX_NESTING as i32)]);
            let stmt = sql(
                self.backend(),
                &format!(
                    "WITH RECURSIVE r(o, g, d) AS (\
                       SELECT group_id, group_id, 0 FROM groups \
                       WHERE project = ? AND group_id IN ({}) \
                       UNION \
                       SELECT r.o, m.member_id, r.d + 1 FROM group_groups m \
                       JOIN r ON m.group_id = r.g WHERE m.project = ? AND r.d <= ?) \
                     SELECT o, MAX(d) FROM r GROUP BY o",
                    marks(chunk.len())
                ),
                values,
            );
            for r in conn.query_all_raw(stmt).await.map_err(db_error)? {
                let g: String = r.try_get_by_index(0).map_err(db_error)?;
                let d: i32 = r.try_get_by_index(1).map_err(db_error)?;
                out.insert(g, d.max(0) as u32);
            }
        }
        Ok(out)
    }

    /// Locks the group's row for a membership change and reads it; None if
    /// it is gone. PostgreSQL: READ COMMITTED, so that the checks after a
    /// lock wait see what the lock holder committed; nesting changes first
    /// take the project's advisory lock; the row lock (`FOR NO KEY UPDATE`)
    /// orders changes of one group and holds a DeleteGroup back, and writes
    /// nothing. SQLite: an update that changes nothing takes the database's
    /// write lock before anything is read.
    async fn lock_group(
        &self,
        txn: &DatabaseTransaction,
        name: &GroupName,
        nesting: bool,
    ) -> Result<Option<Group>, DomainError> {
        let key = || vec![v(name.project.as_str()), v(name.group.as_str())];
        let read = if self.backend() == DatabaseBackend::Postgres {
            txn.execute_unprepared("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
                .await
                .map_err(db_error)?;
            if nesting {
                txn.execute_raw(sql(
                    self.backend(),
                    "SELECT pg_advisory_xact_lock(?)",
                    vec![Value::from(nesting_lock_key(&name.project))],
                ))
                .await
                .map_err(db_error)?;
            }
            "SELECT * FROM groups WHERE project = ? AND group_id = ? FOR NO KEY UPDATE"
        } else {
            let res = txn
                .execute_raw(sql(
                    self.backend(),
                    "UPDATE groups SET revision = revision WHERE project = ? AND group_id = ?",
                    key(),
                ))
                .await
                .map_err(db_error)?;
            if res.rows_affected() != 1 {
                return Ok(None);
            }
            "SELECT * FROM groups WHERE project = ? AND group_id = ?"
        };
        Ok(Self::group_rows(txn, sql(self.backend(), read, key()))
            .await?
            .into_iter()
            .next())
    }

    /// Which of `ids` exist (users: not past their purge time).
    async fn existing<C: ConnectionTrait>(
        &self,
        conn: &C,
        project: &str,
        kind: MemberKind,
        ids: &[&str],
    ) -> Result<HashSet<String>, DomainError> {
        let mut out = HashSet::new();
        for chunk in ids.chunks(500) {
            let mut values = vec![v(project)];
            values.extend(chunk.iter().map(|s| v(s)));
            let template = match kind {
                MemberKind::User => {
                    values.push(Value::from(Timestamp::now().nanos()));
                    format!(
                        "SELECT user_id FROM users WHERE project = ? AND user_id IN ({}) \
                         AND (purge_time IS NULL OR purge_time > ?)",
                        marks(chunk.len())
                    )
                }
                MemberKind::Group => format!(
                    "SELECT group_id FROM groups WHERE project = ? AND group_id IN ({})",
                    marks(chunk.len())
                ),
            };
            out.extend(Self::strings(conn, sql(self.backend(), &template, values)).await?);
        }
        Ok(out)
    }

    async fn add_in(
        &self,
        txn: &DatabaseTransaction,
        name: &GroupName,
        members: &[Member],
    ) -> Result<(Group, Vec<Member>), MembershipError> {
        let project = name.project.as_str();
        let nesting = members.iter().any(|m| m.kind == MemberKind::Group);
        let Some(group) = self.lock_group(txn, name, nesting).await? else {
            return Err(MembershipError::GroupNotFound);
        };
        let mut found = HashSet::new();
        for kind in [MemberKind::User, MemberKind::Group] {
            let ids: Vec<&str> = members
                .iter()
                .filter(|m| m.kind == kind)
                .map(|m| m.id.as_str())
                .collect();
            if !ids.is_empty() {
                for id in self.existing(txn, project, kind, &ids).await? {
                    found.insert((kind, id));
                }
            }
        }
        // The first unknown member in the request's order.
        if let Some(i) = members
            .iter()
            .position(|m| !found.contains(&(m.kind, m.id.clone())))
        {
            return Err(MembershipError::MemberNotFound(i));
        }
        if nesting {
            // A member that contains the group (or is the group) would close
            // a cycle: it is one of the group's ancestors.
            let (above, ancestors) = self.ancestors(txn, project, name.group.as_str()).await?;
            let nested: Vec<&str> = members
                .iter()
                .filter(|m| m.kind == MemberKind::Group)
                .map(|m| m.id.as_str())
                .collect();
            let below = self.heights(txn, project, &nested).await?;
            for (i, m) in members.iter().enumerate() {
                if m.kind != MemberKind::Group {
                    continue;
                }
                if ancestors.contains(&m.id) {
                    return Err(MembershipError::Cycle(i));
                }
                let depth = above + 1 + below.get(&m.id).copied().unwrap_or(0);
                if depth > MAX_NESTING {
                    return Err(MembershipError::TooDeep { index: i, depth });
                }
            }
        }
        let mut added = HashSet::new();
        for kind in [MemberKind::User, MemberKind::Group] {
            let ids: BTreeSet<&str> = members
                .iter()
                .filter(|m| m.kind == kind)
                .map(|m| m.id.as_str())
                .collect();
            let ids: Vec<&str> = ids.into_iter().collect();
            let (table, column) = member_table(kind);
            for chunk in ids.chunks(500) {
                let rows = vec!["(?, ?, ?)"; chunk.len()].join(", ");
                let mut values = Vec::with_capacity(chunk.len() * 3);
                for id in chunk {
                    values.extend([v(project), v(name.group.as_str()), v(id)]);
                }
                let stmt = sql(
                    self.backend(),
                    &format!(
                        "INSERT INTO {table} (project, group_id, {column}) VALUES {rows} \
                         ON CONFLICT DO NOTHING RETURNING {column}"
                    ),
                    values,
                );
                let rows = match txn.query_all_raw(stmt).await {
                    Ok(rows) => rows,
                    // A member erased (or a group deleted) since the check.
                    Err(e) => {
                        return Err(MembershipError::Other(if is_foreign_key_violation(&e) {
                            DomainError::ConcurrentModification
                        } else {
                            db_error(e)
                        }));
                    }
                };
                for r in rows {
                    added.insert((kind, r.try_get_by_index::<String>(0).map_err(db_error)?));
                }
            }
        }
        Ok((group, in_request_order(members, added)))
    }

    /// The direct member groups of `group` after `after`, or (transitive)
    /// every group nested in it; sorted by id.
    async fn member_groups(
        &self,
        name: &GroupName,
        transitive: bool,
        after: &str,
        limit: u64,
    ) -> Result<Vec<String>, DomainError> {
        let project = name.project.as_str();
        if transitive {
            let mut all = self
                .closure(&self.db, project, name.group.as_str(), None)
                .await?;
            all.retain(|g| g.as_str() != name.group.as_str() && g.as_str() > after);
            all.sort();
            all.truncate(limit as usize);
            return Ok(all);
        }
        let stmt = sql(
            self.backend(),
            "SELECT member_id FROM group_groups WHERE project = ? AND group_id = ? \
             AND member_id > ? ORDER BY member_id LIMIT ?",
            vec![
                v(project),
                v(name.group.as_str()),
                v(after),
                Value::from(limit as i64),
            ],
        );
        Self::strings(&self.db, stmt).await
    }

    /// Users that are members of any of `groups` (and not soft-deleted),
    /// after `after`, sorted by id, each once: every group is read from
    /// `after` on for at most `limit` rows, so the cost does not grow with
    /// the size of the groups.
    async fn member_users(
        &self,
        project: &str,
        groups: &[String],
        after: &str,
        limit: u64,
    ) -> Result<Vec<String>, DomainError> {
        let mut out: BTreeSet<String> = BTreeSet::new();
        for chunk in groups.chunks(GROUPS_PER_STATEMENT) {
            // Once a page is full, later groups only matter below its end.
            let below = (out.len() as u64 >= limit)
                .then(|| out.last().cloned())
                .flatten();
            let one = format!(
                "SELECT gu.user_id FROM group_users gu \
                 JOIN users u ON u.project = gu.project AND u.user_id = gu.user_id \
                 WHERE gu.project = ? AND gu.group_id = ? AND gu.user_id > ? {} \
                 AND u.delete_time IS NULL ORDER BY gu.user_id LIMIT ?",
                if below.is_some() {
                    "AND gu.user_id < ?"
                } else {
                    ""
                }
            );
            let template = (0..chunk.len())
                .map(|i| format!("SELECT user_id FROM ({one}) AS t{i}"))
                .collect::<Vec<_>>()
                .join(" UNION ALL ");
            let mut values = Vec::with_capacity(chunk.len() * 5);
            for g in chunk {
                values.extend([v(project), v(g), v(after)]);
                if let Some(b) = &below {
                    values.push(v(b));
                }
                values.push(Value::from(limit as i64));
            }
            out.extend(Self::strings(&self.db, sql(self.backend(), &template, values)).await?);
            // Only the first `limit` can be on this page.
            while out.len() as u64 > limit {
                out.pop_last();
            }
        }
        Ok(out.into_iter().collect())
    }
}

impl SeaOrmRepository {
    /// `query` with the nested groups of every `groups:"g"` listed (see
    /// `Filter::InGroup`), unless a group has more than
    /// `MAX_LISTED_CLOSURE`: the query then follows the nesting itself.
    pub(crate) async fn resolve_groups<'q>(
        &self,
        query: &'q UserQuery,
    ) -> Result<Cow<'q, UserQuery>, DomainError> {
        fn has_group(f: &Filter) -> bool {
            match f {
                Filter::InGroup { .. } => true,
                Filter::And(p) | Filter::Or(p) => p.iter().any(has_group),
                Filter::Not(f) => has_group(f),
                _ => false,
            }
        }
        match &query.filter {
            Some(f) if has_group(f) => {}
            _ => return Ok(Cow::Borrowed(query)),
        }
        let mut q = query.clone();
        if let Some(f) = &mut q.filter {
            let mut pending = vec![f];
            while let Some(f) = pending.pop() {
                match f {
                    Filter::InGroup { group, within } => {
                        let mut listed = self
                            .closure(
                                &self.db,
                                query.project.as_str(),
                                group,
                                Some(MAX_LISTED_CLOSURE + 1),
                            )
                            .await?;
                        if listed.len() <= MAX_LISTED_CLOSURE {
                            listed.sort();
                            *within = Some(listed);
                        }
                    }
                    Filter::And(p) | Filter::Or(p) => pending.extend(p.iter_mut()),
                    Filter::Not(f) => pending.push(f),
                    _ => {}
                }
            }
        }
        Ok(Cow::Owned(q))
    }
}

/// Most groups (a group and those nested in it) a `groups:"g"` filter lists
/// as values; a larger hierarchy is followed by the query itself.
const MAX_LISTED_CLOSURE: usize = 200;

fn member_table(kind: MemberKind) -> (&'static str, &'static str) {
    match kind {
        MemberKind::User => ("group_users", "user_id"),
        MemberKind::Group => ("group_groups", "member_id"),
    }
}

impl GroupRepository for SeaOrmRepository {
    #[instrument(skip_all, fields(project = %group.project))]
    async fn insert_group(
        &self,
        group: &Group,
        key: Option<&IdempotencyKey>,
    ) -> Result<GroupCreated, DomainError> {
        let model = to_model(group)?;
        let txn = self.db.begin().await.map_err(db_error)?;
        if let Some(key) = key {
            let response = serde_json::to_string(&model)
                .map_err(|e| DomainError::Internal(format!("encode idempotency record: {e}")))?;
            let stmt = sql(
                self.backend(),
                "INSERT INTO request_ids (project, request_id, fingerprint, user_id, response, \
                 create_time) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                vec![
                    v(group.project.as_str()),
                    v(&group_key(&key.request_id)),
                    v(&key.fingerprint),
                    v(group.id.as_str()),
                    Value::from(response),
                    Value::from(group.create_time.nanos()),
                ],
            );
            let claimed = txn.execute_raw(stmt).await.map_err(db_error)?;
            if claimed.rows_affected() == 0 {
                let _ = txn.rollback().await;
                return match self
                    .find_group_request(&group.project, &key.request_id)
                    .await?
                {
                    Some((fingerprint, group)) => Ok(GroupCreated::Earlier { fingerprint, group }),
                    None => Err(DomainError::ConcurrentModification),
                };
            }
        }
        let am: groups::ActiveModel = model.into();
        if let Err(e) = groups::Entity::insert(am)
            .exec_without_returning(&txn)
            .await
        {
            let _ = txn.rollback().await;
            return Err(match e.sql_err() {
                Some(SqlErr::UniqueConstraintViolation(_)) => DomainError::GroupAlreadyExists,
                _ => db_error(e),
            });
        }
        self.outbox
            .append(&txn, &[Event::group_created(group)])
            .await
            .map_err(db_error)?;
        txn.commit().await.map_err(db_error)?;
        self.outbox.committed();
        Ok(GroupCreated::New(group.clone()))
    }

    async fn find_group_request(
        &self,
        project: &ProjectId,
        request_id: &str,
    ) -> Result<Option<(String, Group)>, DomainError> {
        let stmt = sql(
            self.backend(),
            "SELECT fingerprint, response FROM request_ids WHERE project = ? AND request_id = ?",
            vec![v(project.as_str()), v(&group_key(request_id))],
        );
        let Some(row) = self.db.query_one_raw(stmt).await.map_err(db_error)? else {
            return Ok(None);
        };
        let fingerprint: String = row.try_get_by_index(0).map_err(db_error)?;
        let response: String = row.try_get_by_index(1).map_err(db_error)?;
        let model: groups::Model = serde_json::from_str(&response)
            .map_err(|e| DomainError::Internal(format!("group idempotency record: {e}")))?;
        Ok(Some((fingerprint, from_model(model)?)))
    }

    #[instrument(skip_all, fields(project = %name.project))]
    async fn get_group(&self, name: &GroupName) -> Result<Option<Group>, DomainError> {
        groups::Entity::find_by_id((
            name.project.as_str().to_owned(),
            name.group.as_str().to_owned(),
        ))
        .one(&self.db)
        .await
        .map_err(db_error)?
        .map(from_model)
        .transpose()
    }

    #[instrument(skip_all, fields(project = %group.project))]
    async fn save_group(&self, group: &Group, previous: &Group) -> Result<bool, DomainError> {
        let m = to_model(group)?;
        let stmt = sql(
            self.backend(),
            "UPDATE groups SET display_name = ?, description = ?, metadata = ?, \
             update_time = ?, revision = ? WHERE project = ? AND group_id = ? AND revision = ?",
            vec![
                Value::from(m.display_name),
                Value::from(m.description),
                Value::from(m.metadata),
                Value::from(m.update_time),
                Value::from(m.revision),
                Value::from(m.project),
                Value::from(m.group_id),
                Value::from(previous.revision),
            ],
        );
        let event = Event::group_updated(previous, group);
        self.changed(stmt, event).await
    }

    #[instrument(skip_all, fields(project = %group.project))]
    async fn delete_group(&self, group: &Group) -> Result<bool, DomainError> {
        // The memberships go with it (ON DELETE CASCADE).
        let stmt = sql(
            self.backend(),
            "DELETE FROM groups WHERE project = ? AND group_id = ? AND revision = ?",
            vec![
                v(group.project.as_str()),
                v(group.id.as_str()),
                Value::from(group.revision),
            ],
        );
        self.changed(stmt, Event::group_deleted(group)).await
    }

    #[instrument(skip_all, fields(project = %query.project))]
    async fn list_groups(
        &self,
        query: &GroupQuery,
        after: Option<&Cursor>,
        limit: u64,
    ) -> Result<Vec<Group>, DomainError> {
        let pg = self.backend() == DatabaseBackend::Postgres;
        let mut values = vec![v(query.project.as_str())];
        let mut conds = vec!["project = ?".to_owned()];
        if let Some(f) = &query.filter {
            conds.push(group_filter(pg, f, &mut values));
        }
        let sort = match query.order.field {
            GroupOrderField::CreateTime => "create_time",
            GroupOrderField::DisplayName => "display_name",
        };
        let dir = if query.order.desc { "DESC" } else { "ASC" };
        if let Some(c) = after {
            let op = if query.order.desc { "<" } else { ">" };
            conds.push(format!("({sort}, group_id) {op} (?, ?)"));
            values.push(match c.values.first() {
                Some(SortValue::Int(n)) => Value::from(*n),
                Some(SortValue::Text(s)) => v(s),
                None => return Err(DomainError::Internal("cursor without a value".into())),
            });
            values.push(v(&c.user_id));
        }
        values.push(Value::from(limit as i64));
        let template = format!(
            "SELECT * FROM groups WHERE {} ORDER BY {sort} {dir}, group_id {dir} LIMIT ?",
            conds.join(" AND ")
        );
        let _turn = self.heavy_turn().await?;
        Self::group_rows(&self.db, sql(self.backend(), &template, values)).await
    }

    async fn add_members(
        &self,
        group: &GroupName,
        members: &[Member],
    ) -> Result<Group, MembershipError> {
        let txn = self.db.begin().await.map_err(db_error)?;
        match self.add_in(&txn, group, members).await {
            Ok((g, added)) => {
                let event = Event::members_changed(&g, added, true);
                self.outbox
                    .append(&txn, event.as_slice())
                    .await
                    .map_err(db_error)?;
                txn.commit().await.map_err(db_error)?;
                if event.is_some() {
                    self.outbox.committed();
                }
                Ok(g)
            }
            Err(e) => {
                let _ = txn.rollback().await;
                Err(e)
            }
        }
    }

    async fn remove_members(
        &self,
        group: &GroupName,
        members: &[Member],
    ) -> Result<Group, MembershipError> {
        let project = group.project.as_str();
        let txn = self.db.begin().await.map_err(db_error)?;
        let Some(found) = self.lock_group(&txn, group, false).await? else {
            let _ = txn.rollback().await;
            return Err(MembershipError::GroupNotFound);
        };
        let mut removed = HashSet::new();
        for kind in [MemberKind::User, MemberKind::Group] {
            let ids: Vec<&str> = members
                .iter()
                .filter(|m| m.kind == kind)
                .map(|m| m.id.as_str())
                .collect();
            let (table, column) = member_table(kind);
            for chunk in ids.chunks(500) {
                let mut values = vec![v(project), v(group.group.as_str())];
                values.extend(chunk.iter().map(|s| v(s)));
                let stmt = sql(
                    self.backend(),
                    &format!(
                        "DELETE FROM {table} WHERE project = ? AND group_id = ? AND {column} IN ({}) \
                         RETURNING {column}",
                        marks(chunk.len())
                    ),
                    values,
                );
                match Self::strings(&txn, stmt).await {
                    Ok(ids) => removed.extend(ids.into_iter().map(|id| (kind, id))),
                    Err(e) => {
                        let _ = txn.rollback().await;
                        return Err(e.into());
                    }
                }
            }
        }
        let event = Event::members_changed(&found, in_request_order(members, removed), false);
        self.outbox
            .append(&txn, event.as_slice())
            .await
            .map_err(db_error)?;
        txn.commit().await.map_err(db_error)?;
        if event.is_some() {
            self.outbox.committed();
        }
        Ok(found)
    }

    #[instrument(skip_all, fields(project = %group.project))]
    async fn list_members(
        &self,
        group: &GroupName,
        transitive: bool,
        after: Option<&Member>,
        limit: u64,
    ) -> Result<Option<Vec<Member>>, DomainError> {
        if self.get_group(group).await?.is_none() {
            return Ok(None);
        }
        let _turn = self.heavy_turn().await?;
        let mut out = Vec::new();
        let after_group = match after {
            None => Some(""),
            Some(m) if m.kind == MemberKind::Group => Some(m.id.as_str()),
            Some(_) => None,
        };
        if let Some(after_group) = after_group {
            for id in self
                .member_groups(group, transitive, after_group, limit)
                .await?
            {
                out.push(Member {
                    kind: MemberKind::Group,
                    id,
                });
            }
        }
        let room = limit.saturating_sub(out.len() as u64);
        if room > 0 {
            let after_user = match after {
                Some(m) if m.kind == MemberKind::User => m.id.as_str(),
                _ => "",
            };
            let project = group.project.as_str();
            let groups = if transitive {
                self.closure(&self.db, project, group.group.as_str(), None)
                    .await?
            } else {
                vec![group.group.as_str().to_owned()]
            };
            for id in self
                .member_users(project, &groups, after_user, room)
                .await?
            {
                out.push(Member {
                    kind: MemberKind::User,
                    id,
                });
            }
        }
        Ok(Some(out))
    }

    #[instrument(skip_all, fields(project = %user.project))]
    async fn user_groups(
        &self,
        user: &UserName,
        transitive: bool,
        after: Option<&str>,
        limit: u64,
    ) -> Result<Option<Vec<Group>>, DomainError> {
        let project = user.project.as_str();
        let exists = sql(
            self.backend(),
            "SELECT user_id FROM users WHERE project = ? AND user_id = ? \
             AND (purge_time IS NULL OR purge_time > ?)",
            vec![
                v(project),
                v(user.user.as_str()),
                Value::from(Timestamp::now().nanos()),
            ],
        );
        if Self::strings(&self.db, exists).await?.is_empty() {
            return Ok(None);
        }
        let _turn = self.heavy_turn().await?;
        let (template, mut values) = if transitive {
            (
                "WITH RECURSIVE up(g) AS (\
                   SELECT group_id FROM group_users WHERE project = ? AND user_id = ? \
                   UNION \
                   SELECT m.group_id FROM group_groups m JOIN up ON m.member_id = up.g \
                   WHERE m.project = ?) \
                 SELECT * FROM groups WHERE project = ? AND group_id IN (SELECT g FROM up) \
                 AND group_id > ? ORDER BY group_id LIMIT ?",
                vec![v(project), v(user.user.as_str()), v(project), v(project)],
            )
        } else {
            // The user's memberships in id order (ix_group_users_user).
            (
                "SELECT g.* FROM group_users gu \
                 JOIN groups g ON g.project = gu.project AND g.group_id = gu.group_id \
                 WHERE gu.project = ? AND gu.user_id = ? AND gu.group_id > ? \
                 ORDER BY gu.group_id LIMIT ?",
                vec![v(project), v(user.user.as_str())],
            )
        };
        values.extend([v(after.unwrap_or("")), Value::from(limit as i64)]);
        Ok(Some(
            Self::group_rows(&self.db, sql(self.backend(), template, values)).await?,
        ))
    }
}

/// A ListGroups filter as SQL over `groups` (values appended to `values`
/// in the order of their marks). Every leaf is TRUE or FALSE, never NULL,
/// so `NOT` is exact.
fn group_filter(pg: bool, f: &Filter, values: &mut Vec<Value>) -> String {
    let binary = |e: &str| {
        if pg {
            format!("{e} COLLATE \"C\"")
        } else {
            e.to_owned()
        }
    };
    match f {
        Filter::And(parts) | Filter::Or(parts) => {
            let glue = if matches!(f, Filter::And(_)) {
                " AND "
            } else {
                " OR "
            };
            let inner: Vec<String> = parts.iter().map(|p| group_filter(pg, p, values)).collect();
            format!("({})", inner.join(glue))
        }
        Filter::Not(inner) => format!("NOT ({})", group_filter(pg, inner, values)),
        Filter::Const(b) => if *b { "1 = 1" } else { "1 = 0" }.into(),
        Filter::Text {
            field: TextField::DisplayName,
            op,
            value,
        } => text_cmp(&(binary("display_name"), vec![]), *op, value, values, pg),
        Filter::Time {
            field: TimeField::CreateTime,
            op,
            nanos,
        } => {
            values.push(Value::from(*nanos));
            format!("create_time {} ?", sql_op(*op))
        }
        Filter::Metadata { key, op, value } => {
            // The key's value is NULL when absent: every comparison, `!=`
            // included, needs the key present.
            let (expr, key_values) = json_value(pg, key);
            values.extend(key_values.iter().cloned());
            let cmp = text_cmp(&(binary(&expr), key_values), *op, value, values, pg);
            format!("({expr} IS NOT NULL AND {cmp})")
        }
        Filter::HasMetadataKey(key) => {
            let (expr, key_values) = json_value(pg, key);
            values.extend(key_values);
            format!("({expr} IS NOT NULL)")
        }
        // The parser allows no other field for groups.
        _ => "1 = 0".into(),
    }
}

/// The metadata value of `key` as text (NULL when absent), with its values.
fn json_value(pg: bool, key: &str) -> (String, Vec<Value>) {
    if pg {
        (
            "(CAST(metadata AS jsonb) ->> CAST(? AS TEXT))".into(),
            vec![v(key)],
        )
    } else {
        (
            "json_extract(metadata, ?)".into(),
            vec![Value::from(format!("$.\"{key}\""))],
        )
    }
}

/// `col op value`; `col` is SQL with the values of its own marks, repeated
/// wherever it appears.
fn text_cmp(
    col: &(String, Vec<Value>),
    op: Op,
    value: &Pattern,
    values: &mut Vec<Value>,
    pg: bool,
) -> String {
    let (c, own) = col;
    let chars = |s: &str| Value::from(s.chars().count() as i32);
    let positive = match value {
        Pattern::Exact(s) => {
            values.extend(own.iter().cloned());
            values.push(v(s));
            let o = if op == Op::Ne { "=" } else { sql_op(op) };
            format!("{c} {o} ?")
        }
        Pattern::Prefix(p) => {
            values.extend(own.iter().cloned());
            values.extend([chars(p), v(p)]);
            format!("substr({c}, 1, ?) = ?")
        }
        Pattern::Suffix(s) => {
            values.extend(own.iter().cloned());
            values.extend(own.iter().cloned());
            values.extend([chars(s), v(s)]);
            format!("substr({c}, length({c}) - ? + 1) = ?")
        }
        Pattern::Contains(s) => {
            values.extend(own.iter().cloned());
            values.push(v(s));
            let f = if pg { "strpos" } else { "instr" };
            format!("{f}({c}, ?) > 0")
        }
    };
    if op == Op::Ne {
        format!("NOT ({positive})")
    } else {
        positive
    }
}

fn sql_op(op: Op) -> &'static str {
    match op {
        Op::Eq => "=",
        Op::Ne => "<>",
        Op::Lt => "<",
        Op::Le => "<=",
        Op::Gt => ">",
        Op::Ge => ">=",
    }
}
