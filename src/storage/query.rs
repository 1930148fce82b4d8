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
use sea_orm::sea_query::{Alias, Expr, ExprTrait, Func, JoinType, Order, Query, SelectStatement};
use sea_orm::{ColumnTrait, Condition, DatabaseBackend, Iterable, Statement, Value};

use super::entity::users;
use crate::domain::filter::{
    BoolField, Filter, ListField, Member, Op, Pattern, TextField, TimeField,
};
use crate::domain::query::{Cursor, OrderField, SortValue};
use crate::domain::{State, Timestamp, UserQuery};

/// What the rows are selected for: lists need `delete_time IS NULL` (the
/// partial indexes' predicate); counts use `state <> DELETED`, which the
/// state index covers without reading rows.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    List,
    Count,
}

/// Most users a `Sorted` plan reads and sorts. Above it a `Scan` in the
/// requested order may stop after one page sooner, but may also read every
/// user when the matches are few or far down the order: a sort of up to
/// this many is bounded (tens of milliseconds).
pub(crate) const SORT_LIMIT: u64 = 16_384;

/// A term condition that every selected user satisfies (a conjunct of the
/// filter, or the search prefix): the terms' index can drive the query.
#[derive(Clone, Debug)]
pub(crate) struct Driver {
    rows: Rows,
    /// The condition it stands for, left out of the WHERE clause when it
    /// drives (a second, probed copy would only skew the estimates).
    source: Source,
}

/// Where a driver comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Search,
    /// The filter's top-level conjunct of this index.
    Conjunct(usize),
    /// Terms every user matching the filter's top-level conjunct of this
    /// index has, and some others: the conjunct itself stays in the WHERE
    /// clause (see `search_cover`).
    Covers(usize),
}

/// The index rows a driver reads, one or more per selected user.
#[derive(Clone, Debug)]
enum Rows {
    /// `user_terms` of one kind.
    Terms { kind: i16, test: TermTest },
    /// `group_users` of a group and of the groups nested in it
    /// (`groups:"g"`), listed when the storage resolved them.
    Members {
        group: String,
        within: Option<Vec<String>>,
    },
}

impl Driver {
    /// One exact term: at most one row per user, in `create_time` order.
    fn is_exact(&self) -> bool {
        matches!(
            self.rows,
            Rows::Terms {
                test: TermTest::Eq(_),
                ..
            }
        )
    }

    /// Its rows are the condition's own (not a cover of it, see
    /// `search_cover`), and it is an exact term: a page in `create_time`
    /// order reads about one page of its entries.
    fn orders_exactly(&self) -> bool {
        self.is_exact() && !matches!(self.source, Source::Covers(_))
    }
}

/// How one page is read.
#[derive(Clone, Debug)]
pub(crate) enum Plan {
    /// `users` through the index of the order (or of a filtered column),
    /// term conditions probed per row; stops after one page.
    Scan,
    /// The default order with an exact term: that term's index entries are
    /// in `create_time` order, so one page reads one page of entries.
    Ordered(Driver),
    /// Few users (at most `SORT_LIMIT`) have the driver's terms: read them
    /// and sort.
    Sorted(Driver),
    /// SearchUsers' default order: the search terms are the order.
    Match(Driver),
    /// As `Ordered` by the driver (`Scan` in `create_time` order without
    /// one), reading only the entries (users) up to this `create_time` (see
    /// `window_bound`): a full page from them is the page; a short one says
    /// nothing.
    Window(Option<Driver>, i64),
}

/// Entries (users) at least a `Window` plan reads, probing the conditions
/// of each: a page of 50 when one in 20 of them matches.
pub(crate) const WINDOW: u64 = 1024;

/// The window bound that bounds nothing: fewer than `WINDOW` entries are
/// left, and a short page of the `Window` plan is the whole answer.
pub(crate) fn unbounded(q: &UserQuery) -> i64 {
    if q.order.tie_desc() {
        i64::MIN
    } else {
        i64::MAX
    }
}

/// `SELECT n`: the `create_time` of the driver's `WINDOW`-th entry (the
/// project's `WINDOW`-th user without a driver) after `after` in the page's
/// order; `unbounded` when there are fewer. Reads an index only.
pub(crate) fn window_bound(
    backend: DatabaseBackend,
    q: &UserQuery,
    d: Option<&Driver>,
    after: Option<&Cursor>,
) -> Statement {
    let c = Compiler::new(backend, q, d);
    let desc = q.order.tie_desc();
    let table = if d.is_some() { "d" } else { "users" };
    let cols = [
        format!("\"{table}\".\"create_time\""),
        format!("\"{table}\".\"user_id\""),
    ];
    let mut sub = Query::select();
    sub.expr_as(Expr::cust(cols[0].clone()), Alias::new("t"));
    match d {
        Some(d) => {
            sub.from_as(Alias::new(d.rows.table()), Alias::new("d"))
                .cond_where(c.rows_cond("d", q.project.as_str(), &d.rows));
        }
        None => {
            sub.from(users::Entity)
                .and_where(users::Column::Project.eq(q.project.as_str()));
        }
    }
    if let Some(cursor) = after {
        sub.and_where(c.after_columns(&cols, desc, cursor));
    }
    for col in &cols {
        sub.order_by_expr(Expr::cust(col.clone()), dir(desc));
    }
    sub.limit(1).offset(WINDOW - 1);
    let mut outer = Query::select();
    outer
        .expr_as(
            Func::coalesce([Expr::cust("MAX(\"x\".\"t\")"), Expr::val(unbounded(q))]),
            Alias::new("n"),
        )
        .from_subquery(sub, Alias::new("x"));
    backend.build(&outer)
}

/// The term conditions of `q` that can drive it: the search prefix, then the
/// term leaves of the filter's top-level conjunction.
fn drivers(q: &UserQuery) -> Vec<Driver> {
    let mut out = Vec::new();
    if let Some(prefix) = &q.search {
        out.push(Driver {
            rows: Rows::Terms {
                kind: kinds::SEARCH,
                test: TermTest::Prefix(prefix.clone()),
            },
            source: Source::Search,
        });
    }
    let top: &[Filter] = match &q.filter {
        Some(Filter::And(parts)) => parts,
        Some(f) => std::slice::from_ref(f),
        None => &[],
    };
    for (i, f) in top.iter().enumerate() {
        if let Some((kind, test)) = term_leaf(f) {
            out.push(Driver {
                rows: Rows::Terms { kind, test },
                source: Source::Conjunct(i),
            });
        } else if let Filter::InGroup { group, within } = f {
            out.push(Driver {
                rows: Rows::Members {
                    group: group.clone(),
                    within: within.clone(),
                },
                source: Source::Conjunct(i),
            });
        } else if let Some(test) = search_cover(f) {
            out.push(Driver {
                rows: Rows::Terms {
                    kind: kinds::SEARCH,
                    test,
                },
                source: Source::Covers(i),
            });
        }
    }
    // A condition repeated is one driver; at most `MAX_DRIVERS` are weighed.
    let mut seen = std::collections::HashSet::new();
    out.retain(|d| seen.insert(format!("{:?}", d.rows)));
    out.truncate(MAX_DRIVERS);
    out
}

/// Most term conditions of one query that are counted to pick a driver (a
/// filter may have 200 comparisons); the others are probed per row.
const MAX_DRIVERS: usize = 8;

/// The search terms that cover an equality or prefix condition on a
/// searchable text field: a user whose field equals (starts with) `v` has
/// the search term `fold(v)` (one starting with the folded prefix). Other
/// users may have it too (through another field, or another case), so the
/// condition is still checked on each row.
fn search_cover(f: &Filter) -> Option<TermTest> {
    let Filter::Text {
        field,
        op: Op::Eq,
        value,
    } = f
    else {
        return None;
    };
    let searchable = matches!(
        field,
        TextField::Email
            | TextField::PhoneNumber
            | TextField::Username
            | TextField::DisplayName
            | TextField::GivenName
            | TextField::FamilyName
    );
    if !searchable {
        return None;
    }
    match value {
        Pattern::Exact(s) if !s.is_empty() => Some(TermTest::Eq(kinds::fold(s))),
        Pattern::Prefix(p) => {
            let folded = kinds::fold_prefix(p);
            (!folded.is_empty()).then_some(TermTest::Prefix(folded))
        }
        _ => None,
    }
}

/// How the plan of a query is chosen.
pub(crate) enum Choice {
    Decided(Plan),
    /// Counting the users having each driver's terms (up to `first_cap`,
    /// see `probe_count`) decides: `Ordered` (with `ordered`: the default
    /// order and several exact terms) or `Sorted` by one few users have.
    /// Else, in `create_time` order, a `Window` at the start of the order
    /// (of the first driver's entries with `ordered`, of the users without)
    /// is read, and when it holds no full page: `Ordered` by the rarest
    /// driver (counted through `RAREST_CAPS`), or `Sorted` by the rarest
    /// when at most `SORT_LIMIT` users have its terms, `Scan` otherwise.
    Rarest {
        drivers: Vec<Driver>,
        ordered: bool,
    },
}

/// An exact term at most this many users have is walked whole.
pub(crate) const RARE: u64 = 256;

/// At most this many users with a term are sorted without first trying a
/// `Window` of the order.
pub(crate) const FEW: u64 = 2000;

/// What the first count of a `Choice::Rarest` counts up to: one more than
/// the most that decides.
pub(crate) fn first_cap(ordered: bool) -> u64 {
    if ordered { RARE + 1 } else { FEW + 1 }
}

/// The caps `probe_count` counts drivers up to, in rounds, after a `Window`
/// found no full page: a round whose smallest count is under its cap found
/// the rarest driver (the counts of the others reached it).
pub(crate) const RAREST_CAPS: [u64; 3] = [16_384, 131_072, 1_048_576];

/// The plan of `q` before counting anything.
pub(crate) fn plan(q: &UserQuery) -> Choice {
    let ds = drivers(q);
    if q.order.is_search_match() {
        if let Some(d) = ds.into_iter().find(|d| d.source == Source::Search) {
            return Choice::Decided(Plan::Match(d));
        }
        return Choice::Decided(Plan::Scan);
    }
    let by_create_time = by_create_time(q);
    let exact: Vec<Driver> = ds.iter().filter(|d| d.orders_exactly()).cloned().collect();
    if by_create_time && !exact.is_empty() {
        return match <[Driver; 1]>::try_from(exact) {
            Ok([d]) => Choice::Decided(Plan::Ordered(d)),
            Err(drivers) => Choice::Rarest {
                drivers,
                ordered: true,
            },
        };
    }
    if ds.is_empty() {
        return Choice::Decided(Plan::Scan);
    }
    Choice::Rarest {
        drivers: ds,
        ordered: false,
    }
}

/// Whether `q` is in `create_time` order (the time index's order).
pub(crate) fn by_create_time(q: &UserQuery) -> bool {
    matches!(q.order.keys(), [k] if k.field == OrderField::CreateTime)
}

/// `SELECT COUNT(*)` of the driver's term rows, counting at most `cap`.
pub(crate) fn probe_count(
    backend: DatabaseBackend,
    q: &UserQuery,
    d: &Driver,
    cap: u64,
) -> Statement {
    let c = Compiler::new(backend, q, None);
    let mut sub = Query::select();
    sub.expr(Expr::cust("1"))
        .from_as(Alias::new(d.rows.table()), Alias::new("d"))
        .cond_where(c.rows_cond("d", q.project.as_str(), &d.rows))
        .limit(cap);
    let mut outer = Query::select();
    outer
        .expr_as(Expr::cust("COUNT(*)"), Alias::new("n"))
        .from_subquery(sub, Alias::new("x"));
    backend.build(&outer)
}

/// The SELECT for one page of `q` after `after`, at most `limit` rows.
pub(crate) fn select_page(
    backend: DatabaseBackend,
    q: &UserQuery,
    plan: &Plan,
    after: Option<&Cursor>,
    limit: u64,
) -> Statement {
    let (driver, ordered) = match plan {
        Plan::Scan => (None, false),
        Plan::Ordered(d) | Plan::Match(d) | Plan::Window(Some(d), _) => (Some(d), true),
        Plan::Window(None, _) => (None, false),
        Plan::Sorted(d) => (Some(d), false),
    };
    let c = Compiler::new(backend, q, driver);
    let mut s = Query::select();
    // Every column, in the entity's order (the inline SQLite reader maps
    // them by position).
    for col in users::Column::iter() {
        s.column((users::Entity, col));
    }
    let tie_desc = q.order.tie_desc();
    // The driver's index order: (term,) create_time, user_id.
    let d = |col: &str| format!("\"d\".\"{col}\"");
    let mut cols = Vec::new();
    if matches!(plan, Plan::Match(_)) {
        cols.push(d("term"));
    }
    cols.push(d("create_time"));
    cols.push(d("user_id"));
    match driver {
        None => {
            s.from(users::Entity);
        }
        Some(d) => c.drive(&mut s, q, d),
    }
    if let Plan::Window(_, bound) = plan {
        let table = if driver.is_some() { "d" } else { "users" };
        let col = Expr::col((Alias::new(table), Alias::new("create_time")));
        s.and_where(if tie_desc {
            col.gte(*bound)
        } else {
            col.lte(*bound)
        });
    }
    s.cond_where(c.base(q, Purpose::List, driver.map(|d| d.source)));
    if ordered {
        if let Some(cursor) = after {
            s.and_where(c.after_columns(&cols, tie_desc, cursor));
        }
        for col in cols {
            s.order_by_expr(Expr::cust(col), dir(tie_desc));
        }
    } else {
        if let Some(cursor) = after {
            s.and_where(c.after(q, cursor));
        }
        for key in q.order.keys() {
            s.order_by_expr(Expr::cust(c.sort_expr(key.field)), dir(key.desc));
        }
        s.order_by((users::Entity, users::Column::UserId), dir(tie_desc));
    }
    s.limit(limit);
    backend.build(&s)
}

/// `SELECT COUNT(*)` over the users of `q`, from the terms of `driver` when
/// given.
pub(crate) fn select_count(
    backend: DatabaseBackend,
    q: &UserQuery,
    driver: Option<&Driver>,
) -> Statement {
    let c = Compiler::new(backend, q, driver);
    let mut s = Query::select();
    s.expr_as(Expr::cust("COUNT(*)"), Alias::new("n"));
    match driver {
        None => {
            s.from(users::Entity);
        }
        Some(d) => c.drive(&mut s, q, d),
    }
    s.cond_where(c.base(q, Purpose::Count, driver.map(|d| d.source)));
    backend.build(&s)
}

/// The driver for a count: any term condition beats reading every user.
pub(crate) fn count_driver(q: &UserQuery) -> Option<Driver> {
    let ds = drivers(q);
    let exact = ds.iter().position(|d| d.orders_exactly());
    exact.map(|i| ds[i].clone()).or(ds.into_iter().next())
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
    /// The table alias whose `user_id` term and membership probes
    /// correlate with: the driver's row when there is one, so that a probe
    /// runs before the user's row is read (and only users that pass are).
    owner: &'static str,
    /// The alias whose `create_time` term probes also match (a term carries
    /// its user's create time): the owner's, or `users` when the owner is a
    /// membership row (which has none).
    owner_time: &'static str,
    /// The query's project, also pinned in every probe of the terms and
    /// memberships: a probe the engine turns into a hashed subplan (under
    /// OR) then still seeks the index instead of scanning it.
    project: String,
}

const T: &str = "\"users\".";

impl Compiler {
    fn new(backend: DatabaseBackend, q: &UserQuery, driver: Option<&Driver>) -> Self {
        let (owner, owner_time) = match driver.map(|d| &d.rows) {
            None => ("users", "users"),
            Some(Rows::Terms { .. }) => ("d", "d"),
            Some(Rows::Members { .. }) => ("d", "users"),
        };
        Compiler {
            backend,
            owner,
            owner_time,
            project: q.project.as_str().to_owned(),
        }
    }

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

    /// The WHERE clause on `users`, without the condition of the driver
    /// (its join already enforces it).
    fn base(&self, q: &UserQuery, purpose: Purpose, skip: Option<Source>) -> Condition {
        let mut cond = Condition::all().add(users::Column::Project.eq(q.project.as_str()));
        if q.show_deleted {
            // A user past its purge time is gone for every read, purged by
            // the background task yet or not (as GetUser says).
            cond = cond.add(
                Condition::any()
                    .add(users::Column::PurgeTime.is_null())
                    .add(users::Column::PurgeTime.gt(Timestamp::now().nanos())),
            );
        } else {
            cond = cond.add(match purpose {
                Purpose::List => users::Column::DeleteTime.is_null(),
                Purpose::Count => users::Column::State.ne(State::Deleted as i32),
            });
        }
        if let Some(prefix) = &q.search
            && skip != Some(Source::Search)
        {
            cond = cond.add(self.in_terms(kinds::SEARCH, TermTest::Prefix(prefix.clone())));
        }
        match &q.filter {
            Some(Filter::And(parts)) => {
                for (i, p) in parts.iter().enumerate() {
                    if skip != Some(Source::Conjunct(i)) {
                        cond = cond.add(self.filter(p));
                    }
                }
            }
            Some(f) if skip != Some(Source::Conjunct(0)) => cond = cond.add(self.filter(f)),
            _ => {}
        }
        cond
    }

    fn filter(&self, f: &Filter) -> Expr {
        match f {
            Filter::And(parts) => parts
                .iter()
                .fold(Condition::all(), |c, p| c.add(self.filter(p)))
                .into(),
            Filter::Or(parts) => parts
                .iter()
                .fold(Condition::any(), |c, p| c.add(self.filter(p)))
                .into(),
            // Unknown (NULL) counts as false, so the negation is exact.
            Filter::Not(inner) => {
                Expr::from(Func::coalesce([self.filter(inner), Expr::val(false)])).not()
            }
            Filter::Const(b) => Expr::cust(if *b { "1 = 1" } else { "1 = 0" }),
            Filter::Text { field, op, value } => self.text(*field, *op, value),
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
            Filter::Has { .. } | Filter::HasMetadataKey(_) => match term_leaf(f) {
                Some((kind, test)) => self.in_terms(kind, test),
                None => Expr::cust("1 = 0"),
            },
            Filter::Metadata { key, op, value } => self.metadata(key, *op, value),
            Filter::InGroup { group, within } => self.in_groups(group, within.as_deref()),
        }
    }

    fn text(&self, field: TextField, op: Op, value: &Pattern) -> Expr {
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
                self.in_terms(kinds::EMAIL_REVERSED, email_suffix(s))
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

    fn metadata(&self, key: &str, op: Op, value: &Pattern) -> Expr {
        let positive = self.in_terms(kinds::METADATA, metadata_test(key, op, value));
        if op == Op::Ne {
            // The key is there and its value does not match.
            Condition::all()
                .add(self.in_terms(kinds::METADATA, TermTest::Prefix(meta_prefix(key))))
                .add(positive.not())
                .into()
        } else {
            positive
        }
    }

    /// `EXISTS` a term of the row's user: one seek of `ix_user_terms_user`.
    fn in_terms(&self, kind: i16, test: TermTest) -> Expr {
        let mut sub = Query::select();
        sub.expr(Expr::cust("1"))
            .from_as(Alias::new("user_terms"), Alias::new("p"))
            .and_where(
                Expr::col((Alias::new("p"), Alias::new("user_id")))
                    .equals((Alias::new(self.owner), Alias::new("user_id"))),
            )
            // A term carries its user's create time: with it an exact term is
            // a seek of the whole key (30% faster than the key less it).
            .and_where(
                Expr::col((Alias::new("p"), Alias::new("create_time")))
                    .equals((Alias::new(self.owner_time), Alias::new("create_time"))),
            )
            .cond_where(self.term_cond("p", Some(&self.project), kind, &test));
        Expr::exists(self.probe(sub))
    }

    /// A probe subquery as the engine should run it: on SQLite with
    /// `LIMIT 1`, which keeps it a probe run as soon as the driver's row is
    /// read. Without it SQLite (3.46 and later) turns `EXISTS` into a join it
    /// may order after `users`, reading every candidate user's row first
    /// (2x slower over a common term). PostgreSQL drops such a limit.
    fn probe(&self, mut sub: SelectStatement) -> SelectStatement {
        if !self.pg() {
            sub.limit(1);
        }
        sub
    }

    /// The conditions on the driver's row `alias` (of `rows.table()`).
    fn rows_cond(&self, alias: &str, project: &str, rows: &Rows) -> Condition {
        match rows {
            Rows::Terms { kind, test } => self.term_cond(alias, Some(project), *kind, test),
            Rows::Members { group, within } => Condition::all()
                .add(Expr::col((Alias::new(alias), Alias::new("project"))).eq(project))
                .add(self.in_closure(alias, group, within.as_deref())),
        }
    }

    /// `alias.group_id` is `group` or a group nested in it, at any depth:
    /// one of `within` when the storage listed them (the engines plan an
    /// index range per group), else the closure computed by the engine once
    /// per statement, however many groups it holds.
    fn in_closure(&self, alias: &str, group: &str, within: Option<&[String]>) -> Expr {
        if let Some(groups) = within {
            if groups.is_empty() {
                return Expr::cust("1 = 0");
            }
            return Expr::col((Alias::new(alias), Alias::new("group_id")))
                .is_in(groups.iter().cloned());
        }
        self.cust(
            format!(
                "\"{alias}\".\"group_id\" IN (WITH RECURSIVE down(g) AS (\
                   SELECT group_id FROM groups WHERE project = ? AND group_id = ? \
                   UNION \
                   SELECT m.member_id FROM group_groups m JOIN down ON m.group_id = down.g \
                   WHERE m.project = ?) \
                 SELECT g FROM down)"
            ),
            [
                Value::from(self.project.clone()),
                Value::from(group.to_owned()),
                Value::from(self.project.clone()),
            ],
        )
    }

    /// `EXISTS` a membership of the row's user in `group` or a group nested
    /// in it: one seek of `ix_group_users_user`.
    fn in_groups(&self, group: &str, within: Option<&[String]>) -> Expr {
        let mut sub = Query::select();
        sub.expr(Expr::cust("1"))
            .from_as(Alias::new("group_users"), Alias::new("p"))
            .and_where(
                Expr::col((Alias::new("p"), Alias::new("project"))).eq(self.project.as_str()),
            )
            .and_where(
                Expr::col((Alias::new("p"), Alias::new("user_id")))
                    .equals((Alias::new(self.owner), Alias::new("user_id"))),
            )
            .and_where(self.in_closure("p", group, within));
        Expr::exists(self.probe(sub))
    }

    /// `FROM user_terms d JOIN users` on the user of each of the driver's
    /// terms (or memberships). A user with several terms in a range (or
    /// several of the groups) counts at its first.
    fn drive(&self, s: &mut SelectStatement, q: &UserQuery, d: &Driver) {
        let dcol = |c: &str| Expr::col((Alias::new("d"), Alias::new(c)));
        s.from_as(Alias::new(d.rows.table()), Alias::new("d"))
            .join(
                JoinType::InnerJoin,
                users::Entity,
                Condition::all()
                    .add(
                        Expr::col((users::Entity, users::Column::Project))
                            .equals((Alias::new("d"), Alias::new("project"))),
                    )
                    .add(
                        Expr::col((users::Entity, users::Column::UserId))
                            .equals((Alias::new("d"), Alias::new("user_id"))),
                    ),
            )
            .cond_where(self.rows_cond("d", q.project.as_str(), &d.rows));
        let one_group = matches!(&d.rows, Rows::Members { within: Some(g), .. } if g.len() == 1);
        if !d.is_exact() && !one_group {
            let (key, same) = match &d.rows {
                Rows::Terms { kind, test } => ("term", self.term_cond("e", None, *kind, test)),
                Rows::Members { group, within } => (
                    "group_id",
                    Condition::all().add(self.in_closure("e", group, within.as_deref())),
                ),
            };
            let mut earlier = Query::select();
            earlier
                .expr(Expr::cust("1"))
                .from_as(Alias::new(d.rows.table()), Alias::new("e"))
                .and_where(
                    Expr::col((Alias::new("e"), Alias::new("project")))
                        .equals((Alias::new("d"), Alias::new("project"))),
                )
                .and_where(
                    Expr::col((Alias::new("e"), Alias::new("user_id")))
                        .equals((Alias::new("d"), Alias::new("user_id"))),
                )
                .cond_where(same)
                .and_where(Expr::col((Alias::new("e"), Alias::new(key))).lt(dcol(key)));
            s.and_where(Expr::not_exists(earlier));
        }
    }

    /// The conditions on the terms row `alias` of one kind and test; with
    /// `project`, also its project.
    fn term_cond(
        &self,
        alias: &str,
        project: Option<&str>,
        kind: i16,
        test: &TermTest,
    ) -> Condition {
        let col = |c: &str| Expr::col((Alias::new(alias), Alias::new(c)));
        let term = format!("\"{alias}\".\"term\"");
        let mut cond = Condition::all();
        if let Some(p) = project {
            cond = cond.add(col("project").eq(p));
        }
        cond = cond.add(col("kind").eq(kind));
        let range =
            |mut cond: Condition, lo: &Option<(String, bool)>, hi: &Option<(String, bool)>| {
                if let Some((lo, inclusive)) = lo {
                    cond = cond.add(if *inclusive {
                        col("term").gte(lo.clone())
                    } else {
                        col("term").gt(lo.clone())
                    });
                }
                if let Some((hi, inclusive)) = hi {
                    cond = cond.add(if *inclusive {
                        col("term").lte(hi.clone())
                    } else {
                        col("term").lt(hi.clone())
                    });
                }
                cond
            };
        match test {
            TermTest::Eq(v) => cond.add(col("term").eq(v.clone())),
            TermTest::Prefix(p) if p.is_empty() => cond,
            TermTest::Prefix(p) => {
                let hi = prefix_upper(p).map(|u| (u, false));
                range(cond, &Some((p.clone(), true)), &hi)
            }
            TermTest::Range(lo, hi) => range(cond, lo, hi),
            TermTest::ValueSuffix { prefix, suffix } => {
                let hi = prefix_upper(prefix).map(|u| (u, false));
                let min_len = (prefix.chars().count() + suffix.chars().count()) as i32;
                range(cond, &Some((prefix.clone(), true)), &hi).add(self.cust(
                    format!("length({term}) >= ? AND substr({term}, length({term}) - ? + 1) = ?"),
                    [
                        Value::from(min_len),
                        Value::from(suffix.chars().count() as i32),
                        Value::from(suffix.clone()),
                    ],
                ))
            }
            TermTest::ValueContains { prefix, part } => {
                let hi = prefix_upper(prefix).map(|u| (u, false));
                let start = prefix.chars().count() as i32 + 1;
                let cond = range(cond, &Some((prefix.clone(), true)), &hi);
                if part.is_empty() {
                    return cond;
                }
                let f = if self.pg() { "strpos" } else { "instr" };
                cond.add(self.cust(
                    format!("{f}(substr({term}, ?), ?) > 0"),
                    [Value::from(start), Value::from(part.clone())],
                ))
            }
        }
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
            // Only the `Match` plan orders by it, on its own columns.
            OrderField::SearchMatch => "\"d\".\"term\"".to_owned(),
        }
    }

    /// Rows strictly after `cursor` on the driver's own columns, all in one
    /// direction: a row-value comparison the terms' index seeks to.
    fn after_columns(&self, cols: &[String], desc: bool, cursor: &Cursor) -> Expr {
        let mut values: Vec<Value> = cursor
            .values
            .iter()
            .map(|v| match v {
                SortValue::Int(n) => Value::from(*n),
                SortValue::Text(s) => Value::from(s.clone()),
            })
            .collect();
        values.push(Value::from(cursor.user_id.clone()));
        // The columns' own collations (`term` is byte-wise by definition), as
        // in the ORDER BY and the index.
        let marks = vec!["?"; values.len()].join(", ");
        let op = if desc { "<" } else { ">" };
        self.cust(format!("({}) {op} ({marks})", cols.join(", ")), values)
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

impl Rows {
    fn table(&self) -> &'static str {
        match self {
            Rows::Terms { .. } => "user_terms",
            Rows::Members { .. } => "group_users",
        }
    }
}

#[derive(Clone, Debug)]
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

/// The term condition of a filter leaf that holds exactly when the user has
/// a matching term; `None` for other leaves.
fn term_leaf(f: &Filter) -> Option<(i16, TermTest)> {
    match f {
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
            Some((kind, test))
        }
        Filter::HasMetadataKey(key) => Some((kinds::METADATA, TermTest::Prefix(meta_prefix(key)))),
        Filter::Metadata { key, op, value } if *op != Op::Ne => {
            Some((kinds::METADATA, metadata_test(key, *op, value)))
        }
        Filter::Text {
            field: TextField::Email,
            op: Op::Eq,
            value: Pattern::Suffix(s),
        } if !s.is_empty() => Some((kinds::EMAIL_REVERSED, email_suffix(s))),
        _ => None,
    }
}

/// `*@example.com`: the reversed addresses make a suffix a prefix.
fn email_suffix(s: &str) -> TermTest {
    TermTest::Prefix(migration::terms::reversed(s))
}

/// The metadata terms of `key` whose value compares `op` to `value` (for
/// `!=`, those equal to it).
fn metadata_test(key: &str, op: Op, value: &Pattern) -> TermTest {
    let prefix = meta_prefix(key);
    let term = |v: &str| format!("{prefix}{v}");
    match value {
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
    }
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
        // Columns of `events`: the parser gives these to event filters only,
        // which are evaluated on read rows, not compiled here.
        TextField::EventType => ("event_type", false),
        TextField::Resource => ("resource", false),
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
    use migration::terms::{fold, fold_prefix};

    /// What makes the search terms a cover of a prefix condition on a
    /// searchable field (`search_cover`).
    #[test]
    fn a_folded_prefix_starts_every_folded_text_it_starts() {
        let texts = [
            "ΟΔΥΣΣΕΑΣ",
            "Οδυσσέας",
            "İstanbul",
            "STRASSE",
            "Ǆemal",
            "ΣΑΣ",
            "abc",
        ];
        for t in texts {
            let chars: Vec<char> = t.chars().collect();
            for n in 0..=chars.len() {
                let p: String = chars[..n].iter().collect();
                assert!(
                    fold(t).starts_with(&fold_prefix(&p)),
                    "{t:?} / {p:?}: {:?} vs {:?}",
                    fold(t),
                    fold_prefix(&p)
                );
            }
        }
    }

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
