//! Compiles a `UserQuery` (filter, search prefix, order, keyset cursor) to one
//! sea-orm SELECT over `users`. Every value is a bound parameter; the SQL text
//! only ever holds fixed column names and operators.
//!
//! Semantics shared with the filter documentation in the proto:
//! - an unset string column compares as `""`;
//! - an unset time or birthday matches no comparison but `!=`;
//! - strings order by code point (PostgreSQL: `COLLATE "C"`), as terms do;
//! - every leaf is TRUE or FALSE, never NULL, so `NOT` is exact.

use migration::terms as kinds;
use sea_orm::sea_query::{Alias, Expr, ExprTrait, Func, Order, Query, SelectStatement};
use sea_orm::{
    ColumnTrait, Condition, DatabaseBackend, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
    Select, Value,
};

use super::entity::users;
use crate::domain::filter::{
    BoolField, Filter, ListField, Member, Op, Pattern, TextField, TimeField,
};
use crate::domain::query::{Cursor, OrderField, SortValue};
use crate::domain::{State, UserQuery};

/// What the rows are selected for: lists need `delete_time IS NULL` (the
/// partial indexes' predicate); counts use `state <> DELETED`, which the
/// state index covers without reading rows.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    List,
    Count,
}

/// The SELECT for one page of `q` after `after`, at most `limit` rows.
pub(crate) fn select_page(
    backend: DatabaseBackend,
    q: &UserQuery,
    after: Option<&Cursor>,
    limit: u64,
) -> Select<users::Entity> {
    let c = Compiler { backend };
    let mut select = users::Entity::find().filter(c.base(q, Purpose::List));
    if let Some(cursor) = after {
        select = select.filter(c.after(q, cursor));
    }
    for key in q.order.keys() {
        select = select.order_by(Expr::cust(c.sort_expr(key.field)), dir(key.desc));
    }
    select
        .order_by(users::Column::UserId, dir(q.order.tie_desc()))
        .limit(limit)
}

/// `SELECT COUNT(*)` over the users of `q`.
pub(crate) fn select_count(backend: DatabaseBackend, q: &UserQuery) -> Select<users::Entity> {
    let c = Compiler { backend };
    users::Entity::find()
        .select_only()
        .column_as(Expr::cust("COUNT(*)"), "n")
        .filter(c.base(q, Purpose::Count))
}

fn dir(desc: bool) -> Order {
    if desc { Order::Desc } else { Order::Asc }
}

/// The smallest string greater than every string starting with `p`, in code
/// point order; `None` when there is none (`p` is all U+10FFFF).
pub(crate) fn prefix_upper(p: &str) -> Option<String> {
    let mut chars: Vec<char> = p.chars().collect();
    while let Some(last) = chars.pop() {
        let next = match last as u32 {
            0xD7FF => Some('\u{E000}'),
            n => char::from_u32(n + 1),
        };
        if let Some(next) = next {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

struct Compiler {
    backend: DatabaseBackend,
}

const T: &str = "\"users\".";

impl Compiler {
    fn pg(&self) -> bool {
        self.backend == DatabaseBackend::Postgres
    }

    /// A custom SQL fragment with `?` marks for its bound values (PostgreSQL
    /// numbers them `$1`, `$2`, ... within the fragment).
    fn cust<V: Into<Value>>(
        &self,
        template: impl AsRef<str>,
        values: impl IntoIterator<Item = V>,
    ) -> Expr {
        let template = template.as_ref();
        if !self.pg() {
            return Expr::cust_with_values(template.to_owned(), values);
        }
        let mut out = String::with_capacity(template.len() + 8);
        let mut n = 0;
        for ch in template.chars() {
            if ch == '?' {
                n += 1;
                out.push_str(&format!("${n}"));
            } else {
                out.push(ch);
            }
        }
        Expr::cust_with_values(out, values)
    }

    /// Code-point order for a text expression.
    fn binary(&self, e: &str) -> String {
        if self.pg() {
            format!("{e} COLLATE \"C\"")
        } else {
            e.to_owned()
        }
    }

    fn base(&self, q: &UserQuery, purpose: Purpose) -> Condition {
        let mut cond = Condition::all().add(users::Column::Project.eq(q.project.as_str()));
        if !q.show_deleted {
            cond = cond.add(match purpose {
                Purpose::List => users::Column::DeleteTime.is_null(),
                Purpose::Count => users::Column::State.ne(State::Deleted as i32),
            });
        }
        if let Some(prefix) = &q.search {
            cond = cond.add(self.in_terms(q, kinds::SEARCH, TermTest::Prefix(prefix.clone())));
        }
        if let Some(f) = &q.filter {
            cond = cond.add(self.filter(q, f));
        }
        cond
    }

    fn filter(&self, q: &UserQuery, f: &Filter) -> Expr {
        match f {
            Filter::And(parts) => parts
                .iter()
                .fold(Condition::all(), |c, p| c.add(self.filter(q, p)))
                .into(),
            Filter::Or(parts) => parts
                .iter()
                .fold(Condition::any(), |c, p| c.add(self.filter(q, p)))
                .into(),
            // Unknown (NULL) counts as false, so the negation is exact.
            Filter::Not(inner) => {
                Expr::from(Func::coalesce([self.filter(q, inner), Expr::val(false)])).not()
            }
            Filter::Const(b) => Expr::cust(if *b { "1 = 1" } else { "1 = 0" }),
            Filter::Text { field, op, value } => self.text(q, *field, *op, value),
            Filter::Time { field, op, nanos } => {
                let (column, nullable) = time_column(*field);
                nullable_cmp(Expr::col((users::Entity, column)), nullable, *op, *nanos)
            }
            Filter::Birthday { op, date } => self.cust(
                match op {
                    Op::Ne => format!(
                        "({T}\"birthday\" IS NULL OR {} <> ?)",
                        self.binary(&format!("{T}\"birthday\""))
                    ),
                    _ => format!(
                        "({T}\"birthday\" IS NOT NULL AND {} {} ?)",
                        self.binary(&format!("{T}\"birthday\"")),
                        sql_op(*op)
                    ),
                },
                [date.clone()],
            ),
            Filter::Bool { field, value } => {
                let column = match field {
                    BoolField::EmailVerified => users::Column::EmailVerified,
                    BoolField::PhoneNumberVerified => users::Column::PhoneNumberVerified,
                };
                column.eq(*value)
            }
            Filter::State { equal, state } => {
                if *equal {
                    users::Column::State.eq(*state as i32)
                } else {
                    users::Column::State.ne(*state as i32)
                }
            }
            Filter::Has { field, member } => {
                let kind = match field {
                    ListField::Tags => kinds::TAG,
                    ListField::Roles => kinds::ROLE,
                    ListField::SecondaryEmails => kinds::SECONDARY_EMAIL,
                    ListField::SecondaryPhoneNumbers => kinds::SECONDARY_PHONE,
                };
                let test = match member {
                    Member::Any => TermTest::Prefix(String::new()),
                    Member::Exact(v) => TermTest::Eq(v.clone()),
                    Member::Prefix(p) => TermTest::Prefix(p.clone()),
                };
                self.in_terms(q, kind, test)
            }
            Filter::HasMetadataKey(key) => {
                self.in_terms(q, kinds::METADATA, TermTest::Prefix(meta_prefix(key)))
            }
            Filter::Metadata { key, op, value } => self.metadata(q, key, *op, value),
        }
    }

    fn text(&self, q: &UserQuery, field: TextField, op: Op, value: &Pattern) -> Expr {
        let (name, nullable) = text_column(field);
        let col = format!("{T}\"{name}\"");
        let v = if nullable {
            format!("COALESCE({col}, '')")
        } else {
            col.clone()
        };
        let positive = match (op, value) {
            (Op::Eq | Op::Ne, Pattern::Exact(s)) if s.is_empty() => Expr::cust(if nullable {
                format!("{col} IS NULL")
            } else {
                format!("{col} = ''")
            }),
            // Equality on the bare column, so that indexes apply.
            (Op::Eq | Op::Ne, Pattern::Exact(s)) => self.cust(format!("{col} = ?"), [s.clone()]),
            (Op::Eq | Op::Ne, Pattern::Prefix(p)) if p.is_empty() => Expr::cust("1 = 1"),
            (Op::Eq | Op::Ne, Pattern::Prefix(p)) => self.cust(
                format!("substr({v}, 1, ?) = ?"),
                [
                    Value::from(p.chars().count() as i32),
                    Value::from(p.clone()),
                ],
            ),
            (Op::Eq | Op::Ne, Pattern::Suffix(s)) if s.is_empty() => Expr::cust("1 = 1"),
            // `*@example.com`: the reversed addresses make a suffix a range.
            (Op::Eq | Op::Ne, Pattern::Suffix(s)) if field == TextField::Email => {
                let reversed = migration::terms::reversed(s);
                self.in_terms(q, kinds::EMAIL_REVERSED, TermTest::Prefix(reversed))
            }
            (Op::Eq | Op::Ne, Pattern::Suffix(s)) => self.suffix(&v, s),
            (Op::Eq | Op::Ne, Pattern::Contains(s)) => self.contains(&v, s),
            (_, Pattern::Exact(s)) => {
                self.cust(format!("{} {} ?", self.binary(&v), sql_op(op)), [s.clone()])
            }
            // The parser allows wildcards only with = and !=.
            (_, _) => Expr::cust("1 = 0"),
        };
        if op == Op::Ne {
            // Every positive form is TRUE or FALSE (never NULL), so NOT is exact.
            match value {
                Pattern::Exact(s) if !s.is_empty() && nullable => {
                    self.cust(format!("({col} IS NULL OR {col} <> ?)"), [s.clone()])
                }
                _ => positive.not(),
            }
        } else {
            positive
        }
    }

    fn suffix(&self, v: &str, s: &str) -> Expr {
        // A start below 1 yields a string shorter than `s`, never equal to it.
        self.cust(
            format!("substr({v}, length({v}) - ? + 1) = ?"),
            [
                Value::from(s.chars().count() as i32),
                Value::from(s.to_owned()),
            ],
        )
    }

    fn contains(&self, v: &str, s: &str) -> Expr {
        if s.is_empty() {
            return Expr::cust("1 = 1");
        }
        let f = if self.pg() { "strpos" } else { "instr" };
        self.cust(format!("{f}({v}, ?) > 0"), [s.to_owned()])
    }

    fn metadata(&self, q: &UserQuery, key: &str, op: Op, value: &Pattern) -> Expr {
        let prefix = meta_prefix(key);
        let has_key = || self.in_terms(q, kinds::METADATA, TermTest::Prefix(prefix.clone()));
        let term = |v: &str| format!("{prefix}{v}");
        let matching = match value {
            Pattern::Exact(v) => match op {
                Op::Eq | Op::Ne => TermTest::Eq(term(v)),
                Op::Lt => TermTest::Range(Some((prefix.clone(), true)), Some((term(v), false))),
                Op::Le => TermTest::Range(Some((prefix.clone(), true)), Some((term(v), true))),
                Op::Gt => TermTest::Range(
                    Some((term(v), false)),
                    prefix_upper(&prefix).map(|u| (u, false)),
                ),
                Op::Ge => TermTest::Range(
                    Some((term(v), true)),
                    prefix_upper(&prefix).map(|u| (u, false)),
                ),
            },
            Pattern::Prefix(p) => TermTest::Prefix(term(p)),
            Pattern::Suffix(s) => TermTest::ValueSuffix {
                prefix: prefix.clone(),
                suffix: s.clone(),
            },
            Pattern::Contains(s) => TermTest::ValueContains {
                prefix: prefix.clone(),
                part: s.clone(),
            },
        };
        let positive = self.in_terms(q, kinds::METADATA, matching);
        if op == Op::Ne {
            // The key is there and its value does not match.
            Condition::all().add(has_key()).add(positive.not()).into()
        } else {
            positive
        }
    }

    /// `users.user_id IN (SELECT user_id FROM user_terms WHERE ...)`.
    fn in_terms(&self, q: &UserQuery, kind: i16, test: TermTest) -> Expr {
        let term = Alias::new("term");
        let mut sub: SelectStatement = Query::select()
            .column(Alias::new("user_id"))
            .from(Alias::new("user_terms"))
            .and_where(Expr::col(Alias::new("project")).eq(q.project.as_str()))
            .and_where(Expr::col(Alias::new("kind")).eq(kind))
            .to_owned();
        let range =
            |sub: &mut SelectStatement, lo: Option<(String, bool)>, hi: Option<(String, bool)>| {
                if let Some((lo, inclusive)) = lo {
                    sub.and_where(if inclusive {
                        Expr::col(term.clone()).gte(lo)
                    } else {
                        Expr::col(term.clone()).gt(lo)
                    });
                }
                if let Some((hi, inclusive)) = hi {
                    sub.and_where(if inclusive {
                        Expr::col(term.clone()).lte(hi)
                    } else {
                        Expr::col(term.clone()).lt(hi)
                    });
                }
            };
        match test {
            TermTest::Eq(v) => {
                sub.and_where(Expr::col(term.clone()).eq(v));
            }
            TermTest::Prefix(p) if p.is_empty() => {}
            TermTest::Prefix(p) => {
                let hi = prefix_upper(&p).map(|u| (u, false));
                range(&mut sub, Some((p, true)), hi);
            }
            TermTest::Range(lo, hi) => range(&mut sub, lo, hi),
            TermTest::ValueSuffix { prefix, suffix } => {
                let hi = prefix_upper(&prefix).map(|u| (u, false));
                let min_len = (prefix.chars().count() + suffix.chars().count()) as i32;
                range(&mut sub, Some((prefix, true)), hi);
                sub.and_where(self.cust(
                    "length(\"term\") >= ? AND substr(\"term\", length(\"term\") - ? + 1) = ?",
                    [
                        Value::from(min_len),
                        Value::from(suffix.chars().count() as i32),
                        Value::from(suffix),
                    ],
                ));
            }
            TermTest::ValueContains { prefix, part } => {
                let hi = prefix_upper(&prefix).map(|u| (u, false));
                let start = prefix.chars().count() as i32 + 1;
                range(&mut sub, Some((prefix, true)), hi);
                if !part.is_empty() {
                    let f = if self.pg() { "strpos" } else { "instr" };
                    sub.and_where(self.cust(
                        format!("{f}(substr(\"term\", ?), ?) > 0"),
                        [Value::from(start), Value::from(part)],
                    ));
                }
            }
        }
        Expr::col((users::Entity, users::Column::UserId)).in_subquery(sub)
    }

    /// The SQL of a sort key; unset values sort as the smallest.
    fn sort_expr(&self, f: OrderField) -> String {
        match f {
            OrderField::CreateTime => format!("{T}\"create_time\""),
            OrderField::UpdateTime => format!("{T}\"update_time\""),
            OrderField::LastLoginTime => format!("COALESCE({T}\"last_login_time\", -1)"),
            OrderField::Email => self.binary(&format!("COALESCE({T}\"email_key\", '')")),
            OrderField::DisplayName => self.binary(&format!("{T}\"display_name\"")),
            OrderField::FamilyName => self.binary(&format!("{T}\"family_name\"")),
            OrderField::Username => self.binary(&format!("COALESCE({T}\"username\", '')")),
        }
    }

    /// Rows strictly after `cursor` in the order of `q`. With one direction
    /// throughout this is a row-value comparison an index can seek to.
    fn after(&self, q: &UserQuery, cursor: &Cursor) -> Expr {
        let keys = q.order.keys();
        let tie_desc = q.order.tie_desc();
        let mut exprs: Vec<(String, bool, Value)> = keys
            .iter()
            .zip(&cursor.values)
            .map(|(k, v)| {
                let value = match v {
                    SortValue::Int(n) => Value::from(*n),
                    SortValue::Text(s) => Value::from(s.clone()),
                };
                (self.sort_expr(k.field), k.desc, value)
            })
            .collect();
        exprs.push((
            format!("{T}\"user_id\""),
            tie_desc,
            Value::from(cursor.user_id.clone()),
        ));
        if exprs.iter().all(|(_, desc, _)| *desc == tie_desc) {
            let lhs: Vec<&str> = exprs.iter().map(|(e, _, _)| e.as_str()).collect();
            let marks = vec!["?"; exprs.len()].join(", ");
            let op = if tie_desc { "<" } else { ">" };
            return self.cust(
                format!("({}) {op} ({marks})", lhs.join(", ")),
                exprs.into_iter().map(|(_, _, v)| v),
            );
        }
        // Mixed directions: (a > x) OR (a = x AND b < y) OR ...
        let mut any = Condition::any();
        for i in 0..exprs.len() {
            let mut all = Condition::all();
            for (e, _, v) in &exprs[..i] {
                all = all.add(self.cust(format!("{e} = ?"), [v.clone()]));
            }
            let (e, desc, v) = &exprs[i];
            let op = if *desc { "<" } else { ">" };
            all = all.add(self.cust(format!("{e} {op} ?"), [v.clone()]));
            any = any.add(all);
        }
        any.into()
    }
}

enum TermTest {
    Eq(String),
    /// Every term starting with this (all of the kind when empty).
    Prefix(String),
    /// Bounds with inclusiveness.
    Range(Option<(String, bool)>, Option<(String, bool)>),
    /// Terms `prefix + value` whose value ends with `suffix`.
    ValueSuffix {
        prefix: String,
        suffix: String,
    },
    /// Terms `prefix + value` whose value contains `part`.
    ValueContains {
        prefix: String,
        part: String,
    },
}

fn meta_prefix(key: &str) -> String {
    migration::terms::metadata_term(key, "")
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

/// The column of a string field and whether it can be NULL.
fn text_column(f: TextField) -> (&'static str, bool) {
    match f {
        TextField::UserId => ("user_id", false),
        TextField::Email => ("email_key", true),
        TextField::PhoneNumber => ("phone_number", true),
        TextField::Username => ("username", true),
        TextField::ExternalId => ("external_id", true),
        TextField::DisplayName => ("display_name", false),
        TextField::GivenName => ("given_name", false),
        TextField::MiddleName => ("middle_name", false),
        TextField::FamilyName => ("family_name", false),
        TextField::Title => ("title", false),
        TextField::PreferredLocale => ("preferred_locale", false),
        TextField::PictureUri => ("picture_uri", false),
        TextField::Bio => ("bio", false),
        TextField::Note => ("note", false),
    }
}

fn time_column(f: TimeField) -> (users::Column, bool) {
    match f {
        TimeField::CreateTime => (users::Column::CreateTime, false),
        TimeField::UpdateTime => (users::Column::UpdateTime, false),
        TimeField::DeleteTime => (users::Column::DeleteTime, true),
        TimeField::PurgeTime => (users::Column::PurgeTime, true),
        TimeField::LastLoginTime => (users::Column::LastLoginTime, true),
    }
}

/// `col op v` that is FALSE (not NULL) on an unset column, except `!=`,
/// which is TRUE there.
fn nullable_cmp(col: Expr, nullable: bool, op: Op, v: i64) -> Expr {
    let cmp = match op {
        Op::Eq => col.clone().eq(v),
        Op::Ne => col.clone().ne(v),
        Op::Lt => col.clone().lt(v),
        Op::Le => col.clone().lte(v),
        Op::Gt => col.clone().gt(v),
        Op::Ge => col.clone().gte(v),
    };
    match (nullable, op) {
        (false, _) => cmp,
        (true, Op::Ne) => Condition::any().add(col.is_null()).add(cmp).into(),
        (true, _) => Condition::all().add(col.is_not_null()).add(cmp).into(),
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_upper;

    #[test]
    fn prefix_upper_is_the_next_string_in_code_point_order() {
        assert_eq!(prefix_upper("abc").as_deref(), Some("abd"));
        assert_eq!(prefix_upper("plan=").as_deref(), Some("plan>"));
        assert_eq!(prefix_upper("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(prefix_upper("\u{D7FF}").as_deref(), Some("\u{E000}"));
        assert_eq!(prefix_upper("\u{10FFFF}"), None);
        assert_eq!(prefix_upper(""), None);
    }
}
