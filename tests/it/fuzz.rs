//! Fuzzing with property tests (the toolchain is stable, so proptest rather
//! than cargo-fuzz). These cover what a client's bytes reach first: the filter
//! language, page and resume tokens, update masks and user validation. No
//! server is involved; every test is a plain synchronous function.
//!
//! Each property must hold for any input, and "never panics" holds for all of
//! them. `FUZZ_CASES` sets the number of cases per property (default 256), so
//! CI can bound the time: `FUZZ_CASES=5000 cargo test --test it fuzz::`.
//! A failing case is shrunk and its seed is written to
//! `tests/it/fuzz.regressions`, and every later run replays that seed first.
//! Commit the file so that found cases stay regression tests; the explicit
//! `#[test]`s below are earlier edge cases written out by hand.

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use user_service::domain::error::MAX_VIOLATIONS;
use user_service::domain::{DomainError, FieldViolation, Violations};

/// Cases from `FUZZ_CASES` (default 256); failures are saved next to this file.
fn config() -> ProptestConfig {
    let cases = std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..ProptestConfig::default()
    }
}

/// The listed violations and the omitted count, after checking that the list
/// stays within `MAX_VIOLATIONS` and that `len()` counts both.
fn listed(v: Violations) -> (Vec<FieldViolation>, usize) {
    let total = v.len();
    let (list, omitted) = match v.into_result() {
        Ok(()) => (Vec::new(), 0),
        Err(DomainError::InvalidArgument {
            violations,
            omitted,
        }) => (violations, omitted),
        Err(other) => panic!("violations became {other:?}"),
    };
    assert_eq!(list.len() + omitted, total, "len() is not listed + omitted");
    assert!(
        list.len() <= MAX_VIOLATIONS,
        "{} violations listed",
        list.len()
    );
    (list, omitted)
}

/// The AIP-160 filter parser (`domain::filter::parse`).
mod filter_language {
    use super::config;
    use proptest::prelude::*;
    use proptest::sample::select;
    use user_service::domain::ProjectId;
    use user_service::domain::filter::{self as lang, FilterError, MAX_DEPTH, MAX_FILTER_CHARS};

    fn project() -> ProjectId {
        ProjectId::parse("acme").expect("project id")
    }

    /// Pieces of filters, valid and broken, for the token soup.
    const PIECES: &[&str] = &[
        "(",
        ")",
        "((",
        "))",
        "=",
        "!=",
        "!",
        "<",
        "<=",
        ">",
        ">=",
        ":",
        "AND",
        "OR",
        "NOT",
        "-",
        "\"",
        "'",
        "`",
        "\\",
        "*",
        "state",
        "ACTIVE",
        "GONE",
        "email",
        "display_name",
        "phone_number",
        "create_time",
        "birthday",
        "email_verified",
        "true",
        "yes",
        "tags",
        "roles",
        "secondary_emails",
        "metadata",
        "metadata.",
        "metadata.plan",
        "`plan`",
        "`a b`",
        "name",
        "custom_data.a",
        "x.y",
        "vip",
        "team-*",
        "\"a*\"",
        "\"*\"",
        "\"**\"",
        "'b\\*'",
        "\"\\n\"",
        "\"\\x\"",
        "\"projects/acme/users/u1\"",
        "\"projects/other/users/*\"",
        "\"2025-01-31T12:00:00Z\"",
        "\"yesterday\"",
        "\"1990-12-31\"",
        "\"1990-02-30\"",
        "\"+1 (212) 555-0100\"",
        "0",
        "-1",
        "ü",
        "𝔘",
        "\u{0}",
        "\u{7f}",
        "\u{85}",
        "\u{200b}",
        "\u{feff}",
        "\u{202e}",
    ];
    /// What separates the pieces.
    const GAPS: &[&str] = &["", " ", " ", " ", "  ", "\t", "\n", "\r\n", "\u{3000}"];

    /// Random sequences of filter pieces: mostly near-misses of real filters.
    fn soup() -> impl Strategy<Value = String> {
        prop::collection::vec((select(PIECES), select(GAPS)), 0..48).prop_map(|parts| {
            parts
                .into_iter()
                .flat_map(|(p, g)| [p, g])
                .collect::<String>()
        })
    }

    const INNER: &[&str] = &[
        "state = ACTIVE",
        "",
        "tags:*",
        "NOT state = ACTIVE",
        ")",
        "state",
    ];
    const OPENERS: &[&str] = &["(", "(", "NOT (", "-(", "( ", "(NOT "];

    /// Parentheses nested up to a few thousand deep, balanced or not.
    fn deep() -> impl Strategy<Value = String> {
        (0usize..2100, 0usize..2100, select(INNER), select(OPENERS)).prop_map(
            |(open, close, inner, opener)| {
                format!("{}{inner}{}", opener.repeat(open), ")".repeat(close))
            },
        )
    }

    const REPEATS: &[&str] = &[
        "tags:a OR ",
        "(",
        "a",
        "ü",
        "\"",
        "state = ACTIVE ",
        "metadata.k = \"v\" AND ",
    ];

    /// Inputs around the length limit.
    fn long() -> impl Strategy<Value = String> {
        (select(REPEATS), 4000usize..4200)
            .prop_map(|(unit, n)| unit.chars().cycle().take(n).collect::<String>())
    }

    fn any_input() -> impl Strategy<Value = String> {
        prop_oneof![
            2 => "(?s).{0,200}",
            2 => "[ -~]{0,200}",
            4 => soup(),
            1 => deep(),
            1 => long(),
        ]
    }

    /// What every outcome of `parse` must satisfy.
    fn check_any(input: &str) -> Result<(), TestCaseError> {
        let project = project();
        let n = input.chars().count();
        let got = lang::parse(input, &project);
        match &got {
            Err(e) => {
                prop_assert!(
                    (1..=n + 1).contains(&e.position),
                    "position {} outside 1..={} for {input:?}: {e}",
                    e.position,
                    n + 1
                );
                prop_assert!(!e.message.is_empty());
                prop_assert!(
                    e.message.len() <= input.len() + 256,
                    "a {}-byte message for a {}-byte filter",
                    e.message.len(),
                    input.len()
                );
                if n > MAX_FILTER_CHARS {
                    prop_assert_eq!(e.position, MAX_FILTER_CHARS + 1);
                }
            }
            Ok(None) => prop_assert!(input.chars().all(char::is_whitespace)),
            Ok(Some(_)) => prop_assert!(n <= MAX_FILTER_CHARS),
        }
        if n <= MAX_FILTER_CHARS && input.chars().all(char::is_whitespace) {
            prop_assert!(matches!(got, Ok(None)), "blank filter gave {got:?}");
        }
        prop_assert_eq!(&lang::parse(input, &project), &got, "parsing twice differs");
        // A leading space changes nothing but the positions, by one.
        if n < MAX_FILTER_CHARS {
            let shifted = lang::parse(&format!(" {input}"), &project).map_err(|e| FilterError {
                position: e.position.saturating_sub(1),
                ..e
            });
            prop_assert_eq!(shifted, got, "a leading space changed the outcome");
        }
        Ok(())
    }

    /// One comparison: `field op value`, rendered with spaces around the
    /// operator in the canonical form and with `gap` in the variant.
    #[derive(Clone, Debug)]
    struct Leaf {
        field: String,
        op: &'static str,
        value: String,
        tight: bool,
    }

    /// A filter known to be valid, in a shape that can be rendered two ways.
    #[derive(Clone, Debug)]
    enum Node {
        Leaf(Leaf),
        /// The flag: the variant juxtaposes instead of writing AND.
        And(Vec<Node>, bool),
        Or(Vec<Node>),
        /// The flag: the variant writes `-` instead of `NOT `.
        Not(Box<Node>, bool),
    }

    const ORDERING: &[&str] = &["=", "!=", "<", "<=", ">", ">="];
    const EQUALITY: &[&str] = &["=", "!="];
    const TEXT_FIELDS: &[&str] = &[
        "email",
        "phone_number",
        "username",
        "external_id",
        "display_name",
        "given_name",
        "middle_name",
        "family_name",
        "title",
        "preferred_locale",
        "picture_uri",
        "bio",
        "note",
    ];
    const TIME_FIELDS: &[&str] = &[
        "create_time",
        "update_time",
        "delete_time",
        "purge_time",
        "last_login_time",
    ];
    const LIST_FIELDS: &[&str] = &[
        "tags",
        "roles",
        "secondary_emails",
        "secondary_phone_numbers",
    ];
    const STATES: &[&str] = &["PENDING", "ACTIVE", "DISABLED", "DELETED"];
    const OFFSETS: &[i32] = &[0, 3600, -34200, 50400];
    const EQUALITY_FIELDS: &[&str] = &["email_verified", "phone_number_verified", "state"];
    const NAME_PROJECTS: &[&str] = &["acme", "other"];

    fn leaf(field: impl Into<String>, op: &'static str, value: String, tight: bool) -> Leaf {
        Leaf {
            field: field.into(),
            op,
            value,
            tight,
        }
    }

    /// `value` quoted so that it unescapes to itself, with wildcards around it.
    fn quoted(value: &str, single: bool, lead: bool, trail: bool) -> String {
        let q = if single { '\'' } else { '"' };
        let mut out = String::from(q);
        if lead {
            out.push('*');
        }
        for c in value.chars() {
            if c == q || matches!(c, '\\' | '*') {
                out.push('\\');
            }
            out.push(c);
        }
        if trail {
            out.push('*');
        }
        out.push(q);
        out
    }

    /// Wildcards only come with `=` and `!=`.
    fn op_for(op: &'static str, wildcard: bool) -> &'static str {
        if wildcard && !EQUALITY.contains(&op) {
            "="
        } else {
            op
        }
    }

    fn text_leaf() -> impl Strategy<Value = Leaf> {
        (
            select(TEXT_FIELDS),
            select(ORDERING),
            any::<(bool, bool, bool)>(),
            "\\PC{0,12}",
            any::<bool>(),
        )
            .prop_map(|(field, op, (lead, trail, single), value, tight)| {
                let op = op_for(op, lead || trail);
                leaf(field, op, quoted(&value, single, lead, trail), tight)
            })
    }

    fn time_leaf() -> impl Strategy<Value = Leaf> {
        (
            select(TIME_FIELDS),
            select(ORDERING),
            -2_000_000_000i64..9_000_000_000,
            0u32..1_000_000_000,
            select(OFFSETS),
            any::<bool>(),
        )
            .prop_map(|(field, op, secs, nanos, offset, tight)| {
                let t = chrono::DateTime::from_timestamp(secs, nanos).expect("in range");
                let zone = chrono::FixedOffset::east_opt(offset).expect("offset");
                let text = t
                    .with_timezone(&zone)
                    .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
                leaf(field, op, format!("\"{text}\""), tight)
            })
    }

    fn birthday_leaf() -> impl Strategy<Value = Leaf> {
        (
            select(ORDERING),
            1000i32..=9999,
            1u32..=12,
            1u32..=28,
            any::<bool>(),
        )
            .prop_map(|(op, y, m, d, tight)| {
                leaf("birthday", op, format!("\"{y:04}-{m:02}-{d:02}\""), tight)
            })
    }

    fn bool_or_state_leaf() -> impl Strategy<Value = Leaf> {
        (
            select(EQUALITY_FIELDS),
            select(EQUALITY),
            any::<bool>(),
            select(STATES),
            any::<bool>(),
        )
            .prop_map(|(field, op, b, state, tight)| {
                let value = if field == "state" {
                    state.to_owned()
                } else {
                    b.to_string()
                };
                leaf(field, op, value, tight)
            })
    }

    fn has_leaf() -> impl Strategy<Value = Leaf> {
        (
            select(LIST_FIELDS),
            0u8..4,
            "[a-z][a-z0-9_.-]{0,8}",
            "\\PC{0,10}",
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(field, kind, label, text, single, tight)| {
                let value = match kind {
                    0 => "*".to_owned(),
                    1 => label,
                    2 => quoted(&text, single, false, false),
                    _ => quoted(&text, single, false, true),
                };
                leaf(field, ":", value, tight)
            })
    }

    fn metadata_leaf() -> impl Strategy<Value = Leaf> {
        (
            "[A-Za-z0-9_.-]{1,20}",
            0u8..4,
            select(ORDERING),
            "\\PC{0,10}",
            any::<(bool, bool, bool)>(),
            any::<bool>(),
        )
            .prop_map(|(key, form, op, text, (lead, trail, single), tight)| {
                let value = quoted(&text, single, lead, trail);
                let op = op_for(op, lead || trail);
                match form {
                    0 => leaf(format!("metadata.{key}"), op, value, tight),
                    1 => leaf(format!("metadata.`{key}`"), op, value, tight),
                    2 => leaf(format!("metadata.{key}"), ":", "*".to_owned(), tight),
                    _ if matches!(key.as_str(), "AND" | "OR" | "NOT") => {
                        leaf("metadata", ":", quoted(&key, single, false, false), tight)
                    }
                    _ => leaf("metadata", ":", key, tight),
                }
            })
    }

    fn name_leaf() -> impl Strategy<Value = Leaf> {
        (
            select(EQUALITY),
            select(NAME_PROJECTS),
            "[a-z0-9][a-z0-9-]{0,10}",
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(op, project, id, trail, tight)| {
                let name = format!("projects/{project}/users/{id}");
                leaf("name", op, quoted(&name, false, false, trail), tight)
            })
    }

    fn valid_leaf() -> impl Strategy<Value = Leaf> {
        prop_oneof![
            3 => text_leaf(),
            1 => time_leaf(),
            1 => birthday_leaf(),
            2 => bool_or_state_leaf(),
            2 => has_leaf(),
            2 => metadata_leaf(),
            1 => name_leaf(),
        ]
    }

    /// At most 81 comparisons, nested at most about 10 deep: within limits.
    fn valid_tree() -> impl Strategy<Value = Node> {
        valid_leaf()
            .prop_map(Node::Leaf)
            .prop_recursive(4, 24, 3, |inner| {
                prop_oneof![
                    (prop::collection::vec(inner.clone(), 2..4), any::<bool>())
                        .prop_map(|(c, juxtapose)| Node::And(c, juxtapose)),
                    prop::collection::vec(inner.clone(), 2..4).prop_map(Node::Or),
                    (inner, any::<bool>()).prop_map(|(c, minus)| Node::Not(Box::new(c), minus)),
                ]
            })
    }

    /// The canonical spelling (`variant` false) or an equivalent one.
    fn render(n: &Node, variant: bool) -> String {
        match n {
            Node::Leaf(l) => {
                let gap = match (variant, l.tight) {
                    (false, _) => " ",
                    (true, true) => "",
                    (true, false) => "  ",
                };
                format!("{}{gap}{}{gap}{}", l.field, l.op, l.value)
            }
            Node::And(children, juxtapose) => {
                let sep = match (variant, *juxtapose) {
                    (false, _) => " AND ",
                    (true, true) => " ",
                    (true, false) => "\nAND\t",
                };
                join(children, sep, variant)
            }
            Node::Or(children) => join(children, if variant { "  OR " } else { " OR " }, variant),
            Node::Not(child, minus) if variant && *minus => format!("-{}", group(child, variant)),
            Node::Not(child, _) => format!("NOT {}", group(child, variant)),
        }
    }

    fn join(children: &[Node], sep: &str, variant: bool) -> String {
        children
            .iter()
            .map(|c| group(c, variant))
            .collect::<Vec<_>>()
            .join(sep)
    }

    /// Compound operands go in parentheses.
    fn group(n: &Node, variant: bool) -> String {
        match n {
            Node::Leaf(_) => render(n, variant),
            _ if variant => format!("( {} )", render(n, variant)),
            _ => format!("({})", render(n, variant)),
        }
    }

    /// Nested parentheses with nothing else that adds depth.
    const FLAT: &[&str] = &[
        "state = ACTIVE",
        "tags:* OR roles:admin",
        "email = \"a@b.c\" AND bio = \"x\"",
    ];

    proptest! {
        #![proptest_config(config())]

        /// Any text: parse never panics; an error points into the input (or
        /// just past it); blank is no filter; the outcome is deterministic and
        /// a leading space only moves the error position.
        #[test]
        fn any_text_is_parsed_or_refused_in_place(input in any_input()) {
            check_any(&input)?;
        }

        /// Valid filters are accepted; the optional spellings (juxtaposition
        /// for AND, `-` for NOT, extra parentheses and whitespace, no spaces
        /// around operators) mean the same filter.
        #[test]
        fn valid_filters_parse_whatever_the_spelling(
            tree in valid_tree(),
            pad in select(GAPS),
        ) {
            let canonical = render(&tree, false);
            let variant = format!("{pad}({}){pad}", render(&tree, true));
            prop_assume!(canonical.chars().count() <= MAX_FILTER_CHARS);
            prop_assume!(variant.chars().count() <= MAX_FILTER_CHARS);
            let project = project();
            let want = lang::parse(&canonical, &project);
            prop_assert!(matches!(want, Ok(Some(_))), "{canonical:?} was refused: {want:?}");
            prop_assert_eq!(
                lang::parse(&variant, &project),
                want,
                "{:?} differs from {:?}",
                variant,
                canonical
            );
        }

        /// Parentheses change nothing up to MAX_DEPTH and are refused beyond.
        #[test]
        fn nesting_is_refused_exactly_beyond_the_limit(
            depth in 0usize..80,
            inner in select(FLAT),
        ) {
            let text = format!("{}{inner}{}", "(".repeat(depth), ")".repeat(depth));
            let got = lang::parse(&text, &project());
            if depth <= MAX_DEPTH {
                prop_assert_eq!(got, lang::parse(inner, &project()));
            } else {
                prop_assert!(
                    matches!(&got, Err(e) if e.message.contains("deeper")),
                    "{depth} levels: {got:?}"
                );
            }
        }
    }

    #[test]
    fn ten_thousand_open_parentheses_fail_fast() {
        let e = lang::parse(&"(".repeat(10_000), &project()).expect_err("too long");
        assert_eq!(e.position, MAX_FILTER_CHARS + 1);
        // As many as are allowed: refused by depth, without deep recursion.
        let e = lang::parse(&"(".repeat(MAX_FILTER_CHARS), &project()).expect_err("too deep");
        assert!(e.message.contains("deeper"), "{e}");
        assert_eq!(e.position, MAX_DEPTH + 2);
        let e = lang::parse(&"NOT (".repeat(800), &project()).expect_err("too deep");
        assert!(e.message.contains("deeper"), "{e}");
        let minus = format!("{}state = ACTIVE", "-".repeat(4000));
        assert!(lang::parse(&minus, &project()).is_err());
    }

    #[test]
    fn odd_inputs_fail_in_place() {
        for (input, position) in [
            ("\u{0}", 1),
            ("email = \"abc\\", 13),
            ("metadata.", 10),
            ("state = ACTIVE AND", 19),
            ("`abc", 1),
            ("state = ACTIVE)", 15),
        ] {
            let e = lang::parse(input, &project()).expect_err(input);
            assert_eq!(e.position, position, "{input:?}: {e}");
        }
    }
}

/// Page and resume tokens (`domain::query`).
mod page_tokens {
    use super::config;
    use base64::Engine;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    use proptest::prelude::*;
    use proptest::sample::{Index, select};
    use sha2::{Digest, Sha256};
    use user_service::domain::ProjectId;
    use user_service::domain::filter as lang;
    use user_service::domain::query::{
        self, Cursor, OrderBy, OrderField, OrderKey, SortValue, TokenError, UserQuery,
        decode_page_token, encode_page_token,
    };

    const PARENTS: &[&str] = &[
        "projects/acme",
        "projects/other",
        "projects/a",
        "projects/acme-2",
    ];
    const FILTERS: &[&str] = &[
        "",
        " ",
        "state = ACTIVE",
        "state=ACTIVE",
        "tags:vip",
        "tags:a",
        "email = \"*@example.com\"",
        "metadata.plan = \"pro\" OR roles:admin",
    ];
    const ORDERS: &[&str] = &[
        "",
        "create_time desc",
        "email desc, create_time",
        "display_name",
        "update_time asc, username desc, family_name",
        "last_login_time desc, email",
    ];
    const SEARCHES: &[Option<&str>] = &[None, Some("ann"), Some("ANN"), Some("Zoë"), Some("+47")];

    /// A query built as `QueryRequest::finish` (src/grpc/mod.rs) builds it
    /// for ListUsers (`search` None) or SearchUsers, with its filter text.
    #[derive(Clone, Debug)]
    struct Query {
        q: UserQuery,
        filter_text: &'static str,
    }

    impl Query {
        fn build(
            parent: &str,
            filter_text: &'static str,
            order_by: &str,
            show_deleted: bool,
            search: Option<&str>,
        ) -> Self {
            let project = ProjectId::parse_parent(parent).expect("parent");
            let filter = lang::parse(filter_text, &project).expect("filter");
            let order = if search.is_some() && order_by.trim().is_empty() {
                OrderBy::search_default()
            } else {
                OrderBy::parse(order_by).expect("order_by")
            };
            let search = search.map(|s| query::parse_search(s).expect("search"));
            let q = UserQuery {
                fingerprint: UserQuery::fingerprint_of(
                    &project,
                    filter_text,
                    &order,
                    show_deleted,
                    search.as_deref(),
                ),
                project,
                filter,
                search,
                order,
                show_deleted,
            };
            Query { q, filter_text }
        }

        /// What the fingerprint stands for.
        fn identity(&self) -> (String, &'static str, String, bool, Option<String>) {
            (
                self.q.project.as_str().to_owned(),
                self.filter_text,
                self.q.order.canonical(),
                self.q.show_deleted,
                self.q.search.clone(),
            )
        }
    }

    fn any_query() -> impl Strategy<Value = Query> {
        (
            select(PARENTS),
            select(FILTERS),
            select(ORDERS),
            any::<bool>(),
            select(SEARCHES),
        )
            .prop_map(|(p, f, o, d, s)| Query::build(p, f, o, d, s))
    }

    /// A cursor with values of the types of `keys`.
    fn cursor_for(keys: Vec<OrderKey>) -> impl Strategy<Value = Cursor> {
        let values: Vec<BoxedStrategy<SortValue>> = keys
            .iter()
            .map(|k| {
                if k.field.is_time() {
                    any::<i64>().prop_map(SortValue::Int).boxed()
                } else {
                    "\\PC{0,40}".prop_map(SortValue::Text).boxed()
                }
            })
            .collect();
        (values, "[a-z0-9-]{1,63}|\\PC{0,20}")
            .prop_map(|(values, user_id)| Cursor { values, user_id })
    }

    fn query_and_cursor() -> impl Strategy<Value = (Query, Cursor)> {
        any_query().prop_flat_map(|q| {
            let keys = q.q.order.keys().to_vec();
            (Just(q), cursor_for(keys))
        })
    }

    /// A token body with a checksum as the service computes it.
    fn seal(body: &[u8]) -> String {
        let digest = Sha256::new()
            .chain_update(b"users.v1.page_token")
            .chain_update(body)
            .finalize();
        let mut raw = body.to_vec();
        raw.extend_from_slice(&digest[..8]);
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// One change to a token body.
    #[derive(Clone, Debug)]
    enum Edit {
        Set(Index, u8),
        Insert(Index, u8),
        Remove(Index),
        Truncate(Index),
        Append(Vec<u8>),
    }

    fn any_edit() -> impl Strategy<Value = Edit> {
        prop_oneof![
            (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Edit::Set(i, b)),
            (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Edit::Insert(i, b)),
            any::<Index>().prop_map(Edit::Remove),
            any::<Index>().prop_map(Edit::Truncate),
            prop::collection::vec(any::<u8>(), 1..8).prop_map(Edit::Append),
        ]
    }

    fn edit_body(body: &mut Vec<u8>, e: &Edit) {
        match e {
            Edit::Set(i, b) if !body.is_empty() => {
                let at = i.index(body.len());
                body[at] = *b;
            }
            Edit::Insert(i, b) => {
                let at = i.index(body.len() + 1);
                body.insert(at, *b);
            }
            Edit::Remove(i) if !body.is_empty() => {
                let at = i.index(body.len());
                let _removed = body.remove(at);
            }
            Edit::Truncate(i) => {
                let at = i.index(body.len() + 1);
                body.truncate(at);
            }
            Edit::Append(bytes) => body.extend_from_slice(bytes),
            Edit::Set(..) | Edit::Remove(_) => {}
        }
    }

    const ORDER_WORDS: &[&str] = &[
        "email",
        "create_time",
        "update_time",
        "display_name",
        "family_name",
        "username",
        "last_login_time",
        "search_match",
        "bio",
        "desc",
        "asc",
        "DESC",
        ",",
        ",",
        " ",
        " ",
        "  ",
        "\t",
        "ü",
    ];

    fn order_text() -> impl Strategy<Value = String> {
        prop_oneof![
            "(?s).{0,60}",
            prop::collection::vec(select(ORDER_WORDS), 0..10).prop_map(|w| w.concat()),
        ]
    }

    proptest! {
        #![proptest_config(config())]

        /// A token decodes, for its own query, to the cursor it was made from;
        /// it is short and URL-safe.
        #[test]
        fn tokens_round_trip((q, c) in query_and_cursor()) {
            let t = encode_page_token(&q.q, &c);
            prop_assert!(t.len() <= 4096, "{} bytes", t.len());
            prop_assert!(
                t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
                "not URL-safe: {t}"
            );
            prop_assert_eq!(decode_page_token(&q.q, &t), Ok(c));
        }

        /// A token is refused (OtherQuery) by any query with another parent,
        /// filter text, order, show_deleted or search; different queries never
        /// share a fingerprint.
        #[test]
        fn tokens_only_fit_their_own_query((q, c) in query_and_cursor(), other in any_query()) {
            let t = encode_page_token(&q.q, &c);
            let got = decode_page_token(&other.q, &t);
            if q.identity() == other.identity() {
                prop_assert_eq!(other.q.fingerprint, q.q.fingerprint);
                prop_assert_eq!(got, Ok(c));
            } else {
                prop_assert_ne!(
                    other.q.fingerprint,
                    q.q.fingerprint,
                    "{:?} and {:?} share a fingerprint",
                    q.identity(),
                    other.identity()
                );
                prop_assert_eq!(got, Err(TokenError::OtherQuery));
            }
        }

        /// Text that is not a token is malformed, whatever it looks like.
        #[test]
        fn arbitrary_text_is_refused(
            q in any_query(),
            s in prop_oneof![
                "(?s).{0,300}",
                "[A-Za-z0-9_-]{0,300}",
                "[A-Za-z0-9_-]{4090,4200}",
            ],
        ) {
            prop_assert_eq!(decode_page_token(&q.q, &s), Err(TokenError::Malformed));
        }

        /// Arbitrary bytes in either base64 alphabet are malformed.
        #[test]
        fn arbitrary_bytes_are_refused(
            q in any_query(),
            bytes in prop::collection::vec(any::<u8>(), 0..600),
        ) {
            let url = URL_SAFE_NO_PAD.encode(&bytes);
            prop_assert_eq!(decode_page_token(&q.q, &url), Err(TokenError::Malformed));
            let standard = STANDARD.encode(bytes);
            prop_assert_eq!(decode_page_token(&q.q, &standard), Err(TokenError::Malformed));
        }

        /// A real token with one bit flipped, one character replaced, cut
        /// short or extended is refused.
        #[test]
        fn tampered_tokens_are_refused(
            (q, c) in query_and_cursor(),
            at in any::<Index>(),
            bit in 0u8..8,
            ch in any::<char>(),
            cut in any::<Index>(),
        ) {
            let t = encode_page_token(&q.q, &c);
            let mut raw = URL_SAFE_NO_PAD.decode(&t).expect("own token");
            let i = at.index(raw.len());
            raw[i] ^= 1u8 << bit;
            let flipped = URL_SAFE_NO_PAD.encode(raw);
            prop_assert_eq!(decode_page_token(&q.q, &flipped), Err(TokenError::Malformed));

            let mut chars: Vec<char> = t.chars().collect();
            let j = at.index(chars.len());
            if chars[j] != ch {
                chars[j] = ch;
                let edited: String = chars.into_iter().collect();
                prop_assert!(decode_page_token(&q.q, &edited).is_err(), "{edited} was accepted");
            }
            // Tokens are ASCII: byte and character positions agree.
            let k = cut.index(t.len());
            prop_assert!(decode_page_token(&q.q, &t[..k]).is_err(), "{} accepted", &t[..k]);
            let longer = format!("{t}{ch}");
            prop_assert!(decode_page_token(&q.q, &longer).is_err(), "{longer} accepted");
        }

        /// Bodies that carry a valid checksum but were edited (or are random)
        /// never panic the decoder, and an accepted one is exactly the token
        /// encoding its cursor gives: a cursor has one token.
        #[test]
        fn forged_tokens_with_valid_checksums(
            (q, c) in query_and_cursor(),
            edits in prop::collection::vec(any_edit(), 0..4),
            random_body in prop::collection::vec(any::<u8>(), 0..64),
        ) {
            let token = encode_page_token(&q.q, &c);
            let raw = URL_SAFE_NO_PAD.decode(&token).expect("own token");
            let mut body = raw[..raw.len() - 8].to_vec();
            prop_assert_eq!(seal(&body), token, "the checksum is not computed as assumed here");
            for e in &edits {
                edit_body(&mut body, e);
            }
            for forged in [seal(&body), seal(&random_body)] {
                if let Ok(got) = decode_page_token(&q.q, &forged) {
                    prop_assert_eq!(encode_page_token(&q.q, &got), forged, "two tokens for one cursor");
                }
            }
            if edits.is_empty() {
                prop_assert_eq!(decode_page_token(&q.q, &seal(&body)), Ok(c));
            }
        }

        /// `order_by` errors point into the text; an accepted order has
        /// distinct keys and parses again from its canonical text.
        #[test]
        fn order_by_is_parsed_or_refused_in_place(s in order_text()) {
            let n = s.chars().count();
            match OrderBy::parse(&s) {
                Err((pos, message)) => {
                    prop_assert!((1..=n + 1).contains(&pos), "position {pos} outside 1..={} in {s:?}", n + 1);
                    prop_assert!(!message.is_empty());
                }
                Ok(order) => {
                    let keys = order.keys();
                    prop_assert!(!keys.is_empty());
                    for (i, k) in keys.iter().enumerate() {
                        prop_assert!(
                            keys[..i].iter().all(|o| o.field != k.field),
                            "{s:?}: {:?} twice",
                            k.field
                        );
                    }
                    prop_assert_eq!(OrderBy::parse(&order.canonical()), Ok(order.clone()));
                }
            }
        }
    }

    #[test]
    fn empty_and_oversized_tokens_are_malformed() {
        let q = Query::build("projects/acme", "", "", false, None);
        for t in ["", "=", "A", "AAAA", "garbage!", "\u{0}", " "] {
            assert_eq!(
                decode_page_token(&q.q, t),
                Err(TokenError::Malformed),
                "{t:?}"
            );
        }
        let long = "A".repeat(4097);
        assert_eq!(decode_page_token(&q.q, &long), Err(TokenError::Malformed));
    }

    /// Every sort key at the largest value a stored user can have still makes
    /// a token the decoder takes (it refuses tokens over 4096 bytes).
    #[test]
    fn the_largest_real_cursor_fits_in_a_token() {
        let q = Query::build(
            "projects/acme",
            "",
            "email, display_name, family_name, username, create_time, update_time, last_login_time",
            false,
            None,
        );
        let values =
            q.q.order
                .keys()
                .iter()
                .map(|k| match k.field {
                    f if f.is_time() => SortValue::Int(i64::MAX),
                    OrderField::Email => SortValue::Text("a".repeat(254)),
                    OrderField::Username => SortValue::Text("u".repeat(64)),
                    _ => SortValue::Text("𝔘".repeat(200)),
                })
                .collect();
        let c = Cursor {
            values,
            user_id: "u".repeat(63),
        };
        let t = encode_page_token(&q.q, &c);
        assert!(t.len() <= 4096, "{} bytes", t.len());
        assert_eq!(decode_page_token(&q.q, &t), Ok(c));
    }
}

/// Update masks (`grpc::convert::parse_mask`).
mod update_masks {
    use std::time::{Duration, Instant};

    use super::{config, listed};
    use proptest::prelude::*;
    use proptest::sample::select;
    use user_service::domain::error::MAX_VIOLATIONS;
    use user_service::domain::user::OUTPUT_ONLY_PATHS;
    use user_service::domain::{Field, FieldPath, Violations};
    use user_service::grpc::convert::{MAX_MASK_PATHS, parse_mask};

    const PADS: &[&str] = &["", "", " ", "\t", "\n ", "\u{3000}"];

    /// `display_name` as a JSON client spells it: `displayName`.
    fn camel(path: &str) -> String {
        let mut out = String::new();
        for (i, part) in path.split('_').enumerate() {
            let mut chars = part.chars();
            match chars.next() {
                Some(first) if i > 0 => {
                    out.push(first.to_ascii_uppercase());
                    out.extend(chars);
                }
                _ => out.push_str(part),
            }
        }
        out
    }

    fn valid_key(k: &str) -> bool {
        !k.is_empty()
            && k.len() <= 64
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    }

    /// A valid path and what it must parse to.
    fn good_path() -> impl Strategy<Value = (String, FieldPath)> {
        prop_oneof![
            3 => (select(Field::ALL), any::<bool>(), select(PADS)).prop_map(|(f, camel_case, pad)| {
                let p = if camel_case { camel(f.path()) } else { f.path().to_owned() };
                (format!("{pad}{p}{pad}"), FieldPath::Whole(f))
            }),
            1 => ("[A-Za-z0-9_.-]{1,64}", any::<bool>(), select(PADS)).prop_map(|(k, ticks, pad)| {
                let p = if ticks { format!("metadata.`{k}`") } else { format!("metadata.{k}") };
                (format!("{pad}{p}{pad}"), FieldPath::MetadataKey(k))
            }),
        ]
    }

    fn any_path() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => good_path().prop_map(|(p, _)| p),
            1 => Just("*".to_owned()),
            1 => select(OUTPUT_ONLY_PATHS).prop_map(String::from),
            2 => "(?s).{0,100}",
            1 => "metadata\\.[^`]{0,70}`?",
            1 => "\\PC{70,90}",
            1 => (0usize..5000, any::<char>()).prop_map(|(n, c)| c.to_string().repeat(n)),
        ]
    }

    proptest! {
        #![proptest_config(config())]

        /// Field names (snake or lowerCamel case, padded) and metadata keys
        /// (bare or in backticks) are accepted, in order, without violations.
        #[test]
        fn valid_masks_are_accepted(
            paths in prop::collection::vec(good_path(), 1..=MAX_MASK_PATHS),
        ) {
            let (raw, want): (Vec<String>, Vec<FieldPath>) = paths.into_iter().unzip();
            let mut v = Violations::default();
            let got = parse_mask(&raw, &mut v);
            let (list, _) = listed(v);
            prop_assert!(list.is_empty(), "{raw:?}: {list:?}");
            prop_assert_eq!(got, want);
        }

        /// Up to MAX_MASK_PATHS paths of anything: at most one short violation
        /// per path, each naming its path; keys that come out are valid; the
        /// outcome is deterministic.
        #[test]
        fn any_mask_is_answered_briefly(
            paths in prop::collection::vec(any_path(), 0..=MAX_MASK_PATHS),
        ) {
            let mut v = Violations::default();
            let got = parse_mask(&paths, &mut v);
            let total = v.len();
            let (list, omitted) = listed(v);
            prop_assert!(total <= paths.len(), "{total} violations for {} paths", paths.len());
            for f in &list {
                prop_assert!(f.description.len() < 2048, "{} bytes of description", f.description.len());
                let i: usize = f
                    .field
                    .strip_prefix("update_mask.paths[")
                    .and_then(|r| r.strip_suffix(']'))
                    .and_then(|i| i.parse().ok())
                    .ok_or_else(|| TestCaseError::fail(format!("violation on {:?}", f.field)))?;
                prop_assert!(i < paths.len());
            }
            for p in &got {
                if let FieldPath::MetadataKey(k) = p {
                    prop_assert!(valid_key(k), "key {k:?} accepted");
                }
            }
            if list.is_empty() {
                prop_assert!(got.len() >= paths.len());
            }
            let mut again = Violations::default();
            prop_assert_eq!(parse_mask(&paths, &mut again), got);
            prop_assert_eq!(listed(again), (list, omitted));
        }

        /// More than MAX_MASK_PATHS paths: one violation on the list as a
        /// whole and nothing parsed, whatever the paths hold.
        #[test]
        fn too_many_paths_are_one_violation(
            paths in prop::collection::vec(any_path(), MAX_MASK_PATHS + 1..400),
        ) {
            let mut v = Violations::default();
            let got = parse_mask(&paths, &mut v);
            prop_assert!(got.is_empty());
            let (list, omitted) = listed(v);
            prop_assert_eq!(omitted, 0);
            prop_assert_eq!(list.len(), 1);
            prop_assert_eq!(list[0].field.as_str(), "update_mask.paths");
            prop_assert!(list[0].description.contains(&paths.len().to_string()));
        }
    }

    /// What a 4 MiB FieldMask of `*` paths holds: one violation, at once.
    #[test]
    fn a_million_stars_cost_one_violation() {
        let paths = vec!["*".to_owned(); 1_300_000];
        let mut v = Violations::default();
        let started = Instant::now();
        let got = parse_mask(&paths, &mut v);
        let took = started.elapsed();
        assert!(got.is_empty());
        let (list, omitted) = listed(v);
        assert_eq!((list.len(), omitted), (1, 0));
        assert_eq!(list[0].field, "update_mask.paths");
        assert!(list[0].description.len() < 200, "{}", list[0].description);
        assert!(took < Duration::from_secs(1), "took {took:?}");
    }

    #[test]
    fn a_huge_path_is_refused_without_being_quoted() {
        let paths = [format!("metadata.{}", "k".repeat(4 << 20))];
        let mut v = Violations::default();
        assert!(parse_mask(&paths, &mut v).is_empty());
        let (list, _) = listed(v);
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].field, "update_mask.paths[0]");
        assert!(list[0].description.len() < 200, "{}", list[0].description);
    }

    #[test]
    fn stars_alone_and_together() {
        let mut v = Violations::default();
        let got = parse_mask(&["*".to_owned()], &mut v);
        assert!(v.is_empty());
        let every: Vec<FieldPath> = Field::ALL.iter().copied().map(FieldPath::Whole).collect();
        assert_eq!(got, every);

        let paths = vec!["*".to_owned(); MAX_MASK_PATHS];
        let mut v = Violations::default();
        let got = parse_mask(&paths, &mut v);
        assert_eq!(got.len(), MAX_MASK_PATHS * Field::ALL.len());
        let total = v.len();
        let (list, omitted) = listed(v);
        assert_eq!(total, MAX_MASK_PATHS);
        assert_eq!(list.len(), MAX_MASK_PATHS.min(MAX_VIOLATIONS));
        assert_eq!(omitted, MAX_MASK_PATHS - list.len());
    }
}

/// User validation (`grpc::convert::parse_profile`) and the value types it
/// normalises with.
mod user_validation {
    use std::collections::BTreeMap;

    use super::{config, listed};
    use proptest::collection::{btree_map, vec as vec_of};
    use proptest::prelude::*;
    use proptest::sample::select;
    use prost_types::value::Kind;
    use prost_types::{ListValue, Struct, Value};
    use user_service::domain::error::MAX_VIOLATIONS;
    use user_service::domain::{
        Email, Field, FieldPath, FieldViolation, Locale, PhoneNumber, Profile, ProjectId, State,
        Timestamp, User, UserId, Username, Violations,
    };
    use user_service::grpc::convert::{parse_profile, user_to_proto};
    use user_service::proto::google::r#type::Date;
    use user_service::proto::users::v1 as pb;

    const ODD_EMAILS: &[&str] = &[
        "a@b",
        "a@b.c",
        "a@[127.0.0.1]",
        "Ann <a@example.com>",
        "\"a b\"@example.com",
        "\"ab\"@example.com",
        "a@example.com\n",
        "A.B@EXAMPLE.COM",
        ".a@example.com",
        "a..b@example.com",
        "a@-example.com",
        "a@example..com",
        "@example.com",
        "a@",
        "a@@example.com",
        "a@xn--bcher-kva.example",
    ];

    fn email() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => "[a-zA-Z0-9._%+-]{1,16}@[a-zA-Z0-9-]{1,12}\\.[a-zA-Z]{2,6}",
            1 => "[a-zA-Zé]{1,8}@[a-zA-ZÀ-ÿ]{1,8}(\\.[a-zA-Z]{2,3}){1,2}",
            1 => "\\PC{0,24}",
            1 => "(?s).{0,16}",
            // Around the 254-character limit.
            1 => "[a-z]{1,64}@[a-z]{1,63}\\.[a-z]{60,63}\\.[a-z]{60,63}\\.com",
            1 => select(ODD_EMAILS).prop_map(String::from),
        ]
    }

    const PHONES: &[&str] = &[
        "+4712345678",
        "+1 (212) 555-0100",
        "+47 412 34 567",
        "+44 20 7946 0000",
        "+39 06 1234 5678",
        "+54 9 11 1234-5678",
        "+52 1 55 1234 5678",
        "+49 030 123456",
        "+7 (495) 123-45-67",
        "+86 10 1234 5678",
        "+61 2 1234 5678",
        "+1 212 555 0100 ext. 5",
        "+1 800 FLOWERS",
        "tel:+1-212-555-0100",
        "12125550100",
        "+999 1234",
        "+1",
        "+",
    ];

    fn phone() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => select(PHONES).prop_map(String::from),
            3 => "\\+[1-9][0-9]{6,14}",
            // Trunk prefixes and punctuation after known country codes.
            2 => "\\+(1|7|33|39|44|47|49|52|54|55|61|81|86|353) ?0{0,3}[0-9 ()-]{4,16}",
            1 => " *\\+[0-9 ().-]{1,20}",
            1 => "\\PC{0,20}",
            1 => "(?s).{0,12}",
        ]
    }

    const LOCALES: &[&str] = &[
        "en",
        "en-US",
        "en-us",
        "EN_us",
        "ZH-hant-tw",
        "nb",
        "pt-BR",
        "sr-Latn-RS",
        "es-419",
        "de-DE-u-co-phonebk",
        "en-u-ca-buddhist-nu-thai",
        "ja-JP-u-ca-japanese",
        "en-t-ja",
        "en-US-x-private",
        "x-whatever",
        "und",
        "i-klingon",
        "art-lojban",
        "zh-yue",
        "en-",
        "english",
        "12",
    ];

    fn locale() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => select(LOCALES).prop_map(String::from),
            2 => "[a-zA-Z]{2,3}(-[a-zA-Z]{4})?(-([a-zA-Z]{2}|[0-9]{3}))?(-[a-zA-Z0-9]{5,8}){0,2}",
            1 => "[a-z]{2}(-[a-z0-9]{1,8}){0,6}",
            1 => "\\PC{0,12}",
        ]
    }

    fn username() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => "[a-zA-Z0-9._-]{0,70}",
            // U+212A KELVIN SIGN lower-cases to an ASCII k.
            1 => "[a-zA-ZÀ-ÿ\u{212A}]{2,8}",
            1 => "\\PC{0,10}",
        ]
    }

    fn external_id() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => "\\PC{0,40}",
            1 => "(?s).{0,10}",
            1 => (250usize..260).prop_map(|n| "x".repeat(n)),
        ]
    }

    const PICTURES: &[&str] = &[
        "https://cdn.example.com/a.png",
        "http://x.example",
        "https://user:pw@example.com:8080/p?q#f",
        "http://[::1]/a",
        "https://bücher.example/ä",
        "ftp://x.example/a",
        "javascript:alert(1)",
        "https://",
        "https://exa mple.com/",
        "/a.png",
    ];

    fn picture() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => select(PICTURES).prop_map(String::from),
            2 => "https?://[a-z0-9.-]{1,20}(/\\PC{0,20})?",
            1 => "\\PC{0,30}",
            1 => (2030usize..2040).prop_map(|n| format!("https://x.example/{}", "a".repeat(n))),
        ]
    }

    /// Around MAX_SHORT_TEXT (200 characters).
    fn short_text() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => "\\PC{0,24}",
            1 => "(?s).{0,12}",
            1 => (195usize..206, any::<char>()).prop_map(|(n, c)| c.to_string().repeat(n)),
            2 => Just(String::new()),
        ]
    }

    /// Around MAX_LONG_TEXT (4096 characters), line breaks allowed.
    fn long_text() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => "(?s).{0,40}",
            1 => "[a-z\n\r\t]{0,40}",
            1 => (4090usize..4100).prop_map(|n| "é".repeat(n)),
            2 => Just(String::new()),
        ]
    }

    fn label() -> impl Strategy<Value = String> {
        prop_oneof![
            6 => "[A-Za-z0-9:._-]{1,12}",
            1 => "\\PC{0,10}",
            1 => "[a-z]{60,70}",
        ]
    }

    /// Around MAX_LABELS (100).
    fn labels() -> impl Strategy<Value = Vec<String>> {
        prop_oneof![
            3 => vec_of(label(), 0..12),
            1 => vec_of(label(), 90..150),
        ]
    }

    fn meta_key() -> impl Strategy<Value = String> {
        prop_oneof![
            5 => "[A-Za-z0-9_.-]{1,12}",
            1 => "\\PC{0,10}",
            1 => "[a-z]{60,70}",
        ]
    }

    fn meta_value() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => "(?s).{0,20}",
            1 => (495usize..505).prop_map(|n| "v".repeat(n)),
        ]
    }

    /// Around MAX_METADATA (50 keys).
    fn metadata() -> impl Strategy<Value = BTreeMap<String, String>> {
        prop_oneof![
            3 => btree_map(meta_key(), meta_value(), 0..8),
            1 => btree_map(meta_key(), meta_value(), 40..80),
        ]
    }

    const COUNTRIES: &[&str] = &["NO", "no", "US", "us", "gb", "XX", "", "GBR", "N O", "ZZ"];

    fn country() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => select(COUNTRIES).prop_map(String::from),
            1 => "[A-Za-z]{2}",
            1 => "\\PC{0,3}",
        ]
    }

    fn address() -> impl Strategy<Value = pb::Address> {
        (
            short_text(),
            vec_of(short_text(), 0..8),
            short_text(),
            short_text(),
            "\\PC{0,40}",
            country(),
            -2i32..8,
        )
            .prop_map(
                |(label, lines, locality, region, postal_code, country_code, kind)| pb::Address {
                    label,
                    lines,
                    locality,
                    region,
                    postal_code,
                    country_code,
                    kind,
                },
            )
    }

    fn birthday() -> impl Strategy<Value = Option<Date>> {
        prop_oneof![
            2 => Just(None),
            1 => Just(Some(Date { year: 0, month: 0, day: 0 })),
            3 => (1900i32..2100, 1i32..=12, 1i32..=31)
                .prop_map(|(year, month, day)| Some(Date { year, month, day })),
            1 => (any::<i32>(), -2i32..15, -2i32..35)
                .prop_map(|(year, month, day)| Some(Date { year, month, day })),
        ]
    }

    fn login_time() -> impl Strategy<Value = Option<prost_types::Timestamp>> {
        prop_oneof![
            2 => Just(None),
            3 => (0i64..4_000_000_000, 0i32..1_000_000_000)
                .prop_map(|(seconds, nanos)| Some(prost_types::Timestamp { seconds, nanos })),
            1 => (any::<i64>(), any::<i32>())
                .prop_map(|(seconds, nanos)| Some(prost_types::Timestamp { seconds, nanos })),
        ]
    }

    fn json_leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value { kind: None }),
            Just(Value {
                kind: Some(Kind::NullValue(0))
            }),
            any::<bool>().prop_map(|b| Value {
                kind: Some(Kind::BoolValue(b))
            }),
            prop_oneof![
                any::<f64>(),
                Just(f64::NAN),
                Just(f64::INFINITY),
                Just(-0.0),
            ]
            .prop_map(|n| Value {
                kind: Some(Kind::NumberValue(n))
            }),
            "\\PC{0,12}".prop_map(|s| Value {
                kind: Some(Kind::StringValue(s))
            }),
        ]
    }

    fn json_value() -> impl Strategy<Value = Value> {
        json_leaf().prop_recursive(4, 24, 4, |inner| {
            prop_oneof![
                vec_of(inner.clone(), 0..4).prop_map(|values| Value {
                    kind: Some(Kind::ListValue(ListValue { values }))
                }),
                btree_map("\\PC{0,6}", inner, 0..4).prop_map(|fields| Value {
                    kind: Some(Kind::StructValue(Struct { fields }))
                }),
            ]
        })
    }

    /// Small structs (far below the 16 KiB limit), and some far above it.
    fn custom_data() -> impl Strategy<Value = Option<Struct>> {
        prop_oneof![
            2 => Just(None),
            4 => btree_map("\\PC{0,8}", json_value(), 0..6).prop_map(|fields| Some(Struct { fields })),
            1 => (17_000usize..17_100).prop_map(|n| {
                let big = Value { kind: Some(Kind::StringValue("x".repeat(n))) };
                Some(Struct { fields: BTreeMap::from([("s".to_owned(), big)]) })
            }),
        ]
    }

    fn user() -> impl Strategy<Value = pb::User> {
        let ids = (
            email(),
            any::<bool>(),
            phone(),
            any::<bool>(),
            vec_of(email(), 0..15),
            vec_of(phone(), 0..15),
            username(),
            external_id(),
        );
        let names = (
            short_text(),
            short_text(),
            short_text(),
            short_text(),
            short_text(),
            birthday(),
            locale(),
            picture(),
        );
        let rest = (
            vec_of(address(), 0..15),
            long_text(),
            long_text(),
            labels(),
            labels(),
            metadata(),
            custom_data(),
            login_time(),
        );
        (ids, names, rest).prop_map(|(ids, names, rest)| {
            let (
                email,
                email_verified,
                phone_number,
                phone_number_verified,
                secondary_emails,
                secondary_phone_numbers,
                username,
                external_id,
            ) = ids;
            let (
                display_name,
                given_name,
                middle_name,
                family_name,
                title,
                birthday,
                preferred_locale,
                picture_uri,
            ) = names;
            let (addresses, bio, note, tags, roles, metadata, custom_data, last_login_time) = rest;
            pb::User {
                email,
                email_verified,
                phone_number,
                phone_number_verified,
                secondary_emails,
                secondary_phone_numbers,
                username,
                external_id,
                display_name,
                given_name,
                middle_name,
                family_name,
                title,
                birthday,
                preferred_locale,
                picture_uri,
                addresses,
                bio,
                note,
                tags,
                roles,
                metadata,
                custom_data,
                last_login_time,
                ..Default::default()
            }
        })
    }

    /// Parses `u` as CreateUser and UpdateUser do. Checks that every
    /// violation is under `user.` and short, and returns the listed ones.
    fn validate(
        u: &pb::User,
        selected: &dyn Fn(Field) -> bool,
    ) -> Result<(Profile, Vec<FieldViolation>, usize), TestCaseError> {
        let mut v = Violations::default();
        let p = parse_profile(u, "user", selected, &mut v);
        let (list, omitted) = listed(v);
        for f in &list {
            prop_assert!(f.field.starts_with("user."), "violation on {:?}", f.field);
            prop_assert!(f.field.len() < 2048, "{}-byte field path", f.field.len());
            prop_assert!(!f.description.is_empty());
            prop_assert!(
                f.description.len() < 2048,
                "{}-byte description on {}",
                f.description.len(),
                f.field
            );
        }
        Ok((p, list, omitted))
    }

    /// A stored user with this profile.
    fn stored(profile: Profile) -> User {
        let t = Timestamp::from_nanos(1_700_000_000_000_000_000);
        User {
            project: ProjectId::parse("acme").expect("project"),
            id: UserId::parse("u-1").expect("user id"),
            profile,
            state: State::Active,
            pre_delete_state: None,
            create_time: t,
            update_time: t,
            delete_time: None,
            purge_time: None,
            revision: 1,
        }
    }

    proptest! {
        #![proptest_config(config())]

        /// Any user: no panic, bounded and short violations, the same outcome
        /// twice. What is kept is normalised for good: a stored user's proto
        /// parses back to the same profile without a violation. A mask parses
        /// exactly its fields, each as the whole user's parse has it.
        #[test]
        fn user_validation_is_bounded_deterministic_and_idempotent(
            u in user(),
            mask in any::<u32>(),
        ) {
            let all = |_: Field| true;
            let (full, list, omitted) = validate(&u, &all)?;
            prop_assert_eq!(validate(&u, &all)?, (full.clone(), list, omitted), "parsing twice differs");

            let echoed = user_to_proto(&stored(full.clone()));
            let (again, list, _) = validate(&echoed, &all)?;
            prop_assert!(list.is_empty(), "the stored user is refused: {list:?}");
            prop_assert_eq!(&again, &full, "normalising twice differs");

            let chosen: Vec<Field> = Field::ALL
                .iter()
                .copied()
                .enumerate()
                .filter(|(i, _)| (mask >> i) & 1 == 1)
                .map(|(_, f)| f)
                .collect();
            let (part, _, _) = validate(&u, &|f| chosen.contains(&f))?;
            let paths: Vec<FieldPath> = chosen.iter().copied().map(FieldPath::Whole).collect();
            let mut want = Profile::default();
            want.apply(&full, &paths);
            prop_assert_eq!(part, want);
        }

        /// Normalised emails, phone numbers, locales and usernames parse to
        /// themselves.
        #[test]
        fn normalised_values_parse_to_themselves(
            e in email(),
            p in phone(),
            l in locale(),
            n in username(),
        ) {
            if let Ok(x) = Email::parse(&e) {
                prop_assert_eq!(Email::parse(x.as_str()), Ok(x.clone()), "from {:?}", e);
            }
            if let Ok(x) = PhoneNumber::parse(&p) {
                prop_assert_eq!(PhoneNumber::parse(x.as_str()), Ok(x.clone()), "from {:?}", p);
            }
            if let Ok(x) = Locale::parse(&l) {
                prop_assert_eq!(Locale::parse(x.as_str()), Ok(x.clone()), "from {:?}", l);
            }
            if let Ok(x) = Username::parse(&n) {
                prop_assert_eq!(Username::parse(x.as_str()), Ok(x.clone()), "from {:?}", n);
            }
        }
    }

    #[test]
    fn a_flood_of_bad_items_lists_at_most_the_cap() {
        let u = pb::User {
            email: "not an email".into(),
            phone_number: "12345".into(),
            secondary_emails: vec!["x".into(); 10],
            tags: (0..100).map(|i| format!("bad tag {i}")).collect(),
            roles: vec!["bad role".into(); 100],
            ..Default::default()
        };
        let mut v = Violations::default();
        let _profile = parse_profile(&u, "user", &|_| true, &mut v);
        let total = v.len();
        let (list, omitted) = listed(v);
        assert_eq!(total, 2 + 10 + 100 + 100);
        assert_eq!(list.len(), MAX_VIOLATIONS);
        assert_eq!(omitted, total - MAX_VIOLATIONS);
    }

    /// Nesting as deep as a decoded request can carry is handled.
    #[test]
    fn deeply_nested_custom_data_is_accepted() {
        let mut value = Value {
            kind: Some(Kind::StringValue("leaf".into())),
        };
        for _ in 0..64 {
            value = Value {
                kind: Some(Kind::ListValue(ListValue {
                    values: vec![value],
                })),
            };
        }
        let u = pb::User {
            custom_data: Some(Struct {
                fields: BTreeMap::from([("deep".to_owned(), value)]),
            }),
            ..Default::default()
        };
        let mut v = Violations::default();
        let p = parse_profile(&u, "user", &|_| true, &mut v);
        assert!(v.is_empty());
        assert!(p.custom_data.is_some());
    }

    /// Found by the fuzzer: `İ` lower-cases to `i` plus a combining dot,
    /// which the address parser refuses, so the stored email could not be
    /// parsed again. Such an address is now refused up front.
    #[test]
    fn an_email_domain_that_lower_cases_to_an_invalid_one_is_refused() {
        assert!(Email::parse("ann@İstanbul.example").is_err());
        let e = Email::parse("Ann@EXAMPLE.com").expect("plain upper case");
        assert_eq!(Email::parse(e.as_str()), Ok(e));
    }

    /// Found by the fuzzer: `+810000000001` was stored in a form that read
    /// back as another number or not at all.
    #[test]
    fn a_phone_number_is_stored_only_in_a_form_that_reads_back_as_itself() {
        if let Ok(p) = PhoneNumber::parse("+810000000001") {
            assert_eq!(PhoneNumber::parse(p.as_str()), Ok(p));
        }
        let p = PhoneNumber::parse("+1 (212) 555-0100").expect("formatted input");
        assert_eq!(p.as_str(), "+12125550100");
        assert_eq!(PhoneNumber::parse(p.as_str()), Ok(p));
    }
}
