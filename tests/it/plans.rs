//! The engines' plans for the hot queries at scale: with many users in one
//! project (and others beside it), no ListUsers/SearchUsers page, CountUsers
//! GetUser or LookupUser may read the users table (or the terms) from end to end, and
//! the pages that have an index in their order may not sort.
//!
//! The users are written with SQL (a generated series), which takes seconds
//! where the API would take minutes; their terms follow the same formulas.
//! Only plans are inspected, so the terms need not be exact (the reversed
//! emails are not exactly reversed). `PLAN_USERS` sets the population
//! (default 200,000; 1,000,000 for the figures in BENCHMARKS.md).
//! PostgreSQL is vacuumed and analyzed, as autovacuum would do; SQLite runs without
//! statistics, as the service does.

use sea_orm::{ConnectionTrait, DatabaseBackend, DatabaseConnection};
use user_service::domain::query::SortValue;
use user_service::domain::{Cursor, Email, Identity, ProjectId, UserId, UserQuery};
use user_service::storage::{self, SeaOrmRepository};

use crate::both_engines;
use crate::harness::*;

/// Where the generated create times start (nanoseconds); user i was created
/// `i` microseconds later.
const T0: i64 = 1_700_000_000_000_000_000;

fn population() -> i64 {
    std::env::var("PLAN_USERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000)
}

/// `n` users in `project`, ids `u<offset + i>`, and their terms.
async fn seed(db: &DatabaseConnection, project: &str, n: i64, offset: i64) {
    let series = match db.get_database_backend() {
        DatabaseBackend::Postgres => format!("WITH g(i) AS (SELECT generate_series(1, {n}))"),
        _ => {
            format!("WITH RECURSIVE g(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM g WHERE i < {n})")
        }
    };
    let num = "CAST(i AS TEXT)";
    let domain = "CASE WHEN i % 1000 = 0 THEN 'rare.example' WHEN i % 2 = 0 \
                  THEN 'alpha.example' ELSE 'beta.example' END";
    let email = format!("'user' || {num} || '@' || {domain}");
    let tags = "'[\"cohort-' || CAST(i % 10 AS TEXT) || '\"' || \
         CASE WHEN i % 10000 = 0 THEN ',\"rare\"' ELSE '' END || ']'"
        .to_string();
    let time = format!("{T0} + CAST(i AS BIGINT) * 1000");
    db.execute_unprepared(&format!(
        "{series} INSERT INTO users (project, user_id, email, email_key, email_verified, \
         phone_number, phone_number_verified, secondary_emails, secondary_phone_numbers, \
         username, external_id, display_name, given_name, middle_name, family_name, title, \
         birthday, preferred_locale, picture_uri, addresses, bio, note, tags, roles, metadata, \
         custom_data, last_login_time, state, pre_delete_state, create_time, update_time, \
         delete_time, purge_time, revision) \
         SELECT '{project}', 'u' || CAST({offset} + i AS TEXT), {email}, {email}, FALSE, \
         NULL, FALSE, '[]', '[]', NULL, NULL, 'Name ' || {num}, 'Given', '', \
         'family' || {num}, '', NULL, '', '', '[]', '', '', {tags}, '[]', \
         CASE WHEN i % 3 = 0 THEN '{{\"plan\":\"pro\"}}' ELSE '{{}}' END, NULL, NULL, \
         CASE WHEN i % 20 = 0 THEN 3 ELSE 2 END, NULL, {time}, {time}, NULL, NULL, 1 FROM g"
    ))
    .await
    .expect("seed users");
    let terms = [
        (
            "1".to_string(),
            "'cohort-' || CAST(i % 10 AS TEXT)".to_string(),
            "TRUE",
        ),
        ("1".into(), "'rare'".into(), "i % 10000 = 0"),
        ("3".into(), "'plan=pro'".into(), "i % 3 = 0"),
        ("4".into(), email.clone(), "TRUE"),
        ("4".into(), format!("'name ' || {num}"), "TRUE"),
        ("4".into(), "'given'".into(), "TRUE"),
        ("4".into(), format!("'family' || {num}"), "TRUE"),
        (
            "5".into(),
            format!(
                "CASE WHEN i % 1000 = 0 THEN 'elpmaxe.erar@' WHEN i % 2 = 0 \
                 THEN 'elpmaxe.ahpla@' ELSE 'elpmaxe.ateb@' END || {num} || 'resu'"
            ),
            "TRUE",
        ),
    ];
    for (kind, term, when) in terms {
        db.execute_unprepared(&format!(
            "{series} INSERT INTO user_terms (project, kind, term, create_time, user_id) \
             SELECT '{project}', {kind}, {term}, {time}, 'u' || CAST({offset} + i AS TEXT) \
             FROM g WHERE {when}"
        ))
        .await
        .expect("seed terms");
    }
}

/// Groups of `project`'s first `n` users: ten teams share them all, `big`
/// holds every second user,
/// `small` every thousandth (few enough to read and sort), `parent` holds
/// `small` and `tiny` (every 5000th) as nested groups.
async fn seed_groups(db: &DatabaseConnection, project: &str, n: i64, offset: i64) {
    let series = match db.get_database_backend() {
        DatabaseBackend::Postgres => format!("WITH g(i) AS (SELECT generate_series(1, {n}))"),
        _ => {
            format!("WITH RECURSIVE g(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM g WHERE i < {n})")
        }
    };
    for group in ["big", "small", "tiny", "parent"] {
        db.execute_unprepared(&format!(
            "INSERT INTO groups (project, group_id, display_name, description, metadata, \
             create_time, update_time, revision) \
             VALUES ('{project}', '{group}', '{group}', '', '{{}}', {T0}, {T0}, 1)"
        ))
        .await
        .expect("seed group");
    }
    // Ten more groups hold every user between them, as teams would: the
    // large group is not most of the memberships table.
    let mut groups: Vec<(String, String)> = (0..10)
        .map(|k| (format!("team-{k}"), format!("i % 10 = {k}")))
        .collect();
    groups.extend([
        ("big".to_owned(), "i % 2 = 0".to_owned()),
        ("small".into(), "i % 1000 = 0".into()),
        ("tiny".into(), "i % 5000 = 1".into()),
    ]);
    for (group, _) in &groups[..10] {
        db.execute_unprepared(&format!(
            "INSERT INTO groups (project, group_id, display_name, description, metadata, \
             create_time, update_time, revision) \
             VALUES ('{project}', '{group}', '{group}', '', '{{}}', {T0}, {T0}, 1)"
        ))
        .await
        .expect("seed group");
    }
    for (group, when) in &groups {
        db.execute_unprepared(&format!(
            "{series} INSERT INTO group_users (project, group_id, user_id) \
             SELECT '{project}', '{group}', 'u' || CAST({offset} + i AS TEXT) FROM g WHERE {when}"
        ))
        .await
        .expect("seed members");
    }
    db.execute_unprepared(&format!(
        "INSERT INTO group_groups (project, group_id, member_id) \
         VALUES ('{project}', 'parent', 'small'), ('{project}', 'parent', 'tiny')"
    ))
    .await
    .expect("seed nesting");
}

/// What one hot query may not do.
#[derive(Clone, Copy, PartialEq)]
enum Expect {
    /// No full scan of users or terms.
    NoScan,
    /// That, and no sort: an index supplies the order, so one page reads
    /// about one page of entries.
    IndexOrder,
}

fn check(what: &str, expect: Expect, statements: &[(String, Vec<String>)]) -> Vec<String> {
    let mut problems = Vec::new();
    for (sql, plan) in statements {
        for line in plan {
            let l = line.trim_start_matches(['-', '>', ' ']);
            // SQLite names the table or alias scanned (`SCAN d USING ...`);
            // the recursive closure of a group (`down`) is its own small
            // work table.
            let scanned = l
                .strip_prefix("SCAN ")
                .and_then(|r| r.split_whitespace().next());
            let scan = scanned.is_some_and(|t| {
                ["users", "user_terms", "group_users", "d", "p", "e"].contains(&t)
            }) || l.contains("Seq Scan on users")
                || l.contains("Seq Scan on user_terms")
                || l.contains("Seq Scan on group_users");
            let sort = line.contains("TEMP B-TREE FOR ORDER BY")
                || l.starts_with("Sort ")
                || l.starts_with("Incremental Sort");
            if scan || (expect == Expect::IndexOrder && sort) {
                problems.push(format!(
                    "{what}: `{line}`\n  in {sql}\n  plan:\n    {}",
                    plan.join("\n    ")
                ));
            }
        }
    }
    problems
}

async fn hot_queries_use_indexes_at_scale(e: Engine) {
    let s = TestServer::start(e).await;
    let db = storage::connect(&s.db.url, 2).await.expect("connect");
    let n = population();
    seed(&db, "bench", n, 0).await;
    seed(&db, "other", n / 2, 10 * n).await;
    seed_groups(&db, "bench", n, 0).await;
    seed_groups(&db, "other", n / 2, 10 * n).await;
    if db.get_database_backend() == DatabaseBackend::Postgres {
        for table in [
            "users",
            "user_terms",
            "group_users",
            "groups",
            "group_groups",
        ] {
            db.execute_unprepared(&format!("VACUUM ANALYZE {table}"))
                .await
                .expect("vacuum");
        }
    }
    let repo = SeaOrmRepository::new(db, user_service::grpc::events::encode_event);
    let project = ProjectId::parse("bench").expect("project");
    // The middle of the project in the default order.
    let deep = Cursor {
        values: vec![SortValue::Int(T0 + n / 2 * 1000)],
        user_id: format!("u{}", n / 2),
    };
    let mid_time = |i: i64| {
        chrono::DateTime::from_timestamp_nanos(T0 + i * 1000)
            .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
    };
    let range = format!(
        "create_time >= \"{}\" AND create_time < \"{}\"",
        mid_time(n / 4),
        mid_time(n / 4 + 500)
    );

    use Expect::*;
    let lists: Vec<(&str, String, Option<&str>, Expect)> = vec![
        ("no filter", String::new(), None, IndexOrder),
        ("state", "state = DISABLED".into(), None, IndexOrder),
        ("common tag", "tags:\"cohort-3\"".into(), None, IndexOrder),
        ("rare tag", "tags:\"rare\"".into(), None, IndexOrder),
        (
            "metadata value",
            "metadata.plan = \"pro\"".into(),
            None,
            IndexOrder,
        ),
        ("metadata key", "metadata.plan:*".into(), None, NoScan),
        (
            "common email domain",
            "email = \"*@alpha.example\"".into(),
            None,
            NoScan,
        ),
        (
            "rare email domain",
            "email = \"*@rare.example\"".into(),
            None,
            NoScan,
        ),
        ("create_time range", range.clone(), None, NoScan),
        (
            "tag and state",
            "tags:\"cohort-3\" AND state = ACTIVE".into(),
            None,
            IndexOrder,
        ),
        // Common terms: a window of the first, then the rarest walked whole
        // when the window holds no page (none in common here).
        (
            "two common terms, none in common",
            "tags:\"cohort-3\" AND tags:\"cohort-4\"".into(),
            None,
            IndexOrder,
        ),
        (
            "two common terms, many in common",
            "tags:\"cohort-3\" AND metadata.plan = \"pro\"".into(),
            None,
            IndexOrder,
        ),
        (
            "rare and common term",
            "tags:\"cohort-3\" AND tags:\"rare\"".into(),
            None,
            IndexOrder,
        ),
        // The search terms cover a display name: 111 users start with
        // `Name 1234` (read and sorted).
        (
            "display name prefix",
            "display_name = \"Name 1234*\"".into(),
            None,
            NoScan,
        ),
        // A membership drives; a term is probed per member.
        (
            "small group and tag prefix",
            "groups:\"small\" AND tags:\"cohort-*\"".into(),
            None,
            NoScan,
        ),
        (
            "display name",
            "display_name = \"Name 777\"".into(),
            None,
            NoScan,
        ),
        (
            "search, common prefix",
            String::new(),
            Some("user1"),
            IndexOrder,
        ),
        (
            "search, rare prefix",
            String::new(),
            Some("user12345"),
            IndexOrder,
        ),
        (
            "search with a filter",
            "state = ACTIVE".into(),
            Some("family7"),
            IndexOrder,
        ),
        // Half the project: the order's index, membership probed per user.
        ("large group", "groups:\"big\"".into(), None, IndexOrder),
        // Few members: read them and sort.
        ("small group", "groups:\"small\"".into(), None, NoScan),
        ("nested groups", "groups:\"parent\"".into(), None, NoScan),
        (
            "group and tag",
            "groups:\"big\" AND tags:\"cohort-3\"".into(),
            None,
            IndexOrder,
        ),
        (
            "group or tag",
            "groups:\"small\" OR tags:\"rare\"".into(),
            None,
            IndexOrder,
        ),
        (
            "group in search",
            "groups:\"big\"".into(),
            Some("user1"),
            IndexOrder,
        ),
    ];
    let mut problems = Vec::new();
    for (what, filter, search, expect) in &lists {
        let q = UserQuery::parse("projects/bench", filter, "", *search, false).expect(what);
        let first = repo.explain_list(&q, None, 51).await.expect(what);
        problems.extend(check(&format!("{what}, first page"), *expect, &first));
        if search.is_none() {
            let deep_page = repo.explain_list(&q, Some(&deep), 51).await.expect(what);
            problems.extend(check(&format!("{what}, deep page"), *expect, &deep_page));
        }
    }
    // Search in another order: few matches are read and sorted, many are
    // filtered in the order's index.
    for prefix in ["user1", "user12345"] {
        let q = UserQuery::parse(
            "projects/bench",
            "",
            "create_time desc",
            Some(prefix),
            false,
        )
        .expect("search");
        let plan = repo.explain_list(&q, None, 51).await.expect("search");
        problems.extend(check(
            &format!("search {prefix} by create_time"),
            NoScan,
            &plan,
        ));
    }
    for (what, filter) in [
        ("count by state", "state = DISABLED"),
        ("count by tag", "tags:\"rare\""),
        // (Counting a group of half the project reads half the project
        // whichever way; the engine may rightly hash-join it.)
        ("count by small group", "groups:\"small\""),
        ("count by nested groups", "groups:\"parent\""),
        (
            "count by small group and email domain",
            "groups:\"small\" AND email = \"*@alpha.example\"",
        ),
    ] {
        let q = UserQuery::parse("projects/bench", filter, "", None, false).expect(what);
        let plan = repo.explain_count(&q).await.expect(what);
        problems.extend(check(what, NoScan, &plan));
    }
    // GetUser and LookupUser: the statement production runs, alone and as
    // the largest batch (PostgreSQL: prepared and executed on a pool
    // connection, as production runs it).
    let email = Email::parse("user777@beta.example").expect("email");
    let id = UserId::parse("u777").expect("id");
    let plan = repo
        .explain_point_read(&project, &id, None)
        .await
        .expect("get");
    assert_eq!(plan.len(), 2, "one probe and the largest batch");
    problems.extend(check("get by id", NoScan, &plan));
    let plan = repo
        .explain_point_read(&project, &id, Some(&Identity::Email(email)))
        .await
        .expect("lookup");
    problems.extend(check("lookup by email", NoScan, &plan));

    assert!(
        problems.is_empty(),
        "{} of the hot queries read a table from end to end or sort:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

both_engines!(hot_queries_use_indexes_at_scale);
