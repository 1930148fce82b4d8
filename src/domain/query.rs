//! Queries over the users of a project: sort orders, keyset cursors and the
//! opaque page tokens that carry them.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

use super::error::{DomainError, QueryProblem};
use super::filter::Filter;
use super::user::User;
use super::values::ProjectId;

/// Page size when the caller leaves it at 0.
pub const DEFAULT_PAGE_SIZE: u32 = 50;
/// Larger page sizes are clamped to this.
pub const MAX_PAGE_SIZE: u32 = 1000;

/// A field users can be sorted by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OrderField {
    CreateTime,
    UpdateTime,
    /// By the lower-cased address, as uniqueness compares it.
    Email,
    DisplayName,
    FamilyName,
    Username,
    LastLoginTime,
    /// SearchUsers' default: the smallest lower-cased searchable value that
    /// starts with the query. Not accepted in `order_by`.
    SearchMatch,
}

impl OrderField {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "create_time" => Self::CreateTime,
            "update_time" => Self::UpdateTime,
            "email" => Self::Email,
            "display_name" => Self::DisplayName,
            "family_name" => Self::FamilyName,
            "username" => Self::Username,
            "last_login_time" => Self::LastLoginTime,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::CreateTime => "create_time",
            Self::UpdateTime => "update_time",
            Self::Email => "email",
            Self::DisplayName => "display_name",
            Self::FamilyName => "family_name",
            Self::Username => "username",
            Self::LastLoginTime => "last_login_time",
            Self::SearchMatch => "search_match",
        }
    }

    /// Whether the sort key is a number (times) rather than text.
    pub fn is_time(self) -> bool {
        matches!(
            self,
            Self::CreateTime | Self::UpdateTime | Self::LastLoginTime
        )
    }

    /// The sort key of `u`: an unset field is the smallest value (`""`, or -1
    /// for a time, since stored times are never negative). `search`: the
    /// folded SearchUsers query, for `SearchMatch`.
    pub fn key_of(self, u: &User, search: Option<&str>) -> SortValue {
        let p = &u.profile;
        match self {
            Self::CreateTime => SortValue::Int(u.create_time.nanos()),
            Self::UpdateTime => SortValue::Int(u.update_time.nanos()),
            Self::LastLoginTime => SortValue::Int(p.last_login_time.map_or(-1, |t| t.nanos())),
            Self::Email => SortValue::Text(p.email.as_ref().map(|e| e.key()).unwrap_or_default()),
            Self::DisplayName => SortValue::Text(p.display_name.clone()),
            Self::FamilyName => SortValue::Text(p.family_name.clone()),
            Self::Username => SortValue::Text(
                p.username
                    .as_ref()
                    .map(|v| v.as_str().to_owned())
                    .unwrap_or_default(),
            ),
            Self::SearchMatch => {
                let prefix = search.unwrap_or_default();
                let email = p.email.as_ref().map(|e| e.key());
                [
                    email.as_deref(),
                    p.phone_number.as_ref().map(|v| v.as_str()),
                    p.username.as_ref().map(|v| v.as_str()),
                    Some(p.display_name.as_str()),
                    Some(p.given_name.as_str()),
                    Some(p.family_name.as_str()),
                ]
                .into_iter()
                .flatten()
                .map(migration::terms::fold)
                .filter(|v| v.starts_with(prefix))
                .min()
                .map_or(SortValue::Text(String::new()), SortValue::Text)
            }
        }
    }
}

/// One key of a sort order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrderKey {
    pub field: OrderField,
    pub desc: bool,
}

/// A sort order; ties are broken by the user id, in the direction of the
/// first key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrderBy(Vec<OrderKey>);

impl Default for OrderBy {
    /// Newest first.
    fn default() -> Self {
        Self(vec![OrderKey {
            field: OrderField::CreateTime,
            desc: true,
        }])
    }
}

impl OrderBy {
    /// Parses AIP-132 `order_by`: `field [desc|asc], ...`. Errors carry a
    /// 1-based character position.
    pub fn parse(s: &str) -> Result<Self, (usize, String)> {
        if s.trim().is_empty() {
            return Ok(Self::default());
        }
        let mut keys: Vec<OrderKey> = Vec::new();
        let mut offset = 0;
        for part in s.split(',') {
            let start = offset + part.chars().take_while(|c| c.is_whitespace()).count() + 1;
            offset += part.chars().count() + 1;
            let words: Vec<&str> = part.split_whitespace().collect();
            let (name, desc) = match words.as_slice() {
                [name] => (*name, false),
                [name, "desc"] => (*name, true),
                [name, "asc"] => (*name, false),
                [] => return Err((start, "empty sort key".into())),
                [_, other, ..] => {
                    return Err((start, format!("expected `desc` or `asc`, found `{other}`")));
                }
            };
            let field = OrderField::parse(name).ok_or_else(|| {
                (
                    start,
                    format!(
                        "cannot sort by `{name}`: use create_time, update_time, email, \
                         display_name, family_name, username or last_login_time"
                    ),
                )
            })?;
            if keys.iter().any(|k| k.field == field) {
                return Err((start, format!("`{name}` is listed twice")));
            }
            keys.push(OrderKey { field, desc });
        }
        Ok(Self(keys))
    }

    /// SearchUsers without `order_by`: best match first (the matched value in
    /// code-point order, so the query itself, then its shortest completions),
    /// then oldest first.
    pub fn search_default() -> Self {
        Self(vec![
            OrderKey {
                field: OrderField::SearchMatch,
                desc: false,
            },
            OrderKey {
                field: OrderField::CreateTime,
                desc: false,
            },
        ])
    }

    /// Whether this is `search_default`.
    pub fn is_search_match(&self) -> bool {
        self.0.first().map(|k| k.field) == Some(OrderField::SearchMatch)
    }

    pub fn keys(&self) -> &[OrderKey] {
        &self.0
    }

    /// Direction of the user-id tie breaker.
    pub fn tie_desc(&self) -> bool {
        self.0.first().is_some_and(|k| k.desc)
    }

    /// The canonical text, e.g. `create_time desc,email`.
    pub fn canonical(&self) -> String {
        self.0
            .iter()
            .map(|k| {
                if k.desc {
                    format!("{} desc", k.field.name())
                } else {
                    k.field.name().to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The position of `u` in this order: the keyset cursor after it.
    pub fn cursor_of(&self, u: &User, search: Option<&str>) -> Cursor {
        Cursor {
            values: self.0.iter().map(|k| k.field.key_of(u, search)).collect(),
            user_id: u.id.as_str().to_owned(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SortValue {
    Int(i64),
    Text(String),
}

/// Where a page ends: the sort keys and id of its last user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cursor {
    pub values: Vec<SortValue>,
    pub user_id: String,
}

/// Longest search query, in characters.
pub const MAX_SEARCH_CHARS: usize = 200;

/// A SearchUsers query as the prefix to look for: folded the way the search
/// terms are (see `migration::terms::fold`).
pub fn parse_search(s: &str) -> Result<String, String> {
    let n = s.chars().count();
    if n == 0 {
        return Err("is required: the prefix to search for".into());
    }
    if n > MAX_SEARCH_CHARS {
        return Err(format!("must be at most {MAX_SEARCH_CHARS} characters"));
    }
    if s.chars().any(char::is_control) {
        return Err("must not contain control characters".into());
    }
    Ok(migration::terms::fold(s))
}

/// A page size already known not to be negative: 0 means the default,
/// larger than the maximum is clamped (AIP-158).
pub fn clamp_page_size(n: u32) -> u32 {
    match n {
        0 => DEFAULT_PAGE_SIZE,
        n => n.min(MAX_PAGE_SIZE),
    }
}

/// A refused page token as the error a client gets; `must_match` names
/// the request fields a token is tied to.
pub fn page_token_error(e: TokenError, field: &'static str, must_match: &str) -> DomainError {
    DomainError::BadQuery {
        reason: QueryProblem::PageToken,
        field,
        description: match e {
            TokenError::Malformed => "not a token of this service, or damaged".to_owned(),
            TokenError::OtherQuery => format!("belongs to another query: {must_match}"),
        },
    }
}

/// A short hash of some request fields, length-prefixed so that no two
/// splits of the same text collide: what ties a page token to its query.
pub fn fingerprint(parts: &[&str]) -> [u8; 8] {
    let mut h = Sha256::new();
    for part in parts {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    let digest = h.finalize();
    let mut out = [0u8; 8];
    out.copy_from_slice(&digest[..8]);
    out
}

/// The page size of a request: 0 means the default, larger than the maximum
/// is clamped, negative is refused (AIP-158).
pub fn page_size(n: i32) -> Result<u32, String> {
    match n {
        n if n < 0 => Err("must not be negative".into()),
        0 => Ok(DEFAULT_PAGE_SIZE),
        n => Ok((n as u32).min(MAX_PAGE_SIZE)),
    }
}

/// What to select: one project's users matching a filter and, for search, a
/// prefix, in an order.
#[derive(Clone, Debug)]
pub struct UserQuery {
    pub project: ProjectId,
    pub filter: Option<Filter>,
    /// Lower-cased prefix of one of the searchable fields.
    pub search: Option<String>,
    pub order: OrderBy,
    pub show_deleted: bool,
    /// Identifies the query for its page tokens: a hash of the request's
    /// parent, filter text, order, show_deleted and search query.
    pub fingerprint: [u8; 8],
}

impl UserQuery {
    /// A query from request fields, as ListUsers (`search` None) or
    /// SearchUsers reads them; the first problem as text. For tools and
    /// tests; the RPCs report every problem at once.
    pub fn parse(
        parent: &str,
        filter: &str,
        order_by: &str,
        search: Option<&str>,
        show_deleted: bool,
    ) -> Result<Self, String> {
        let project = ProjectId::parse_parent(parent).map_err(|r| format!("parent: {r}"))?;
        let parsed = super::filter::parse(filter, &project).map_err(|e| format!("filter: {e}"))?;
        let order = match (search, order_by.trim().is_empty()) {
            (Some(_), true) => OrderBy::search_default(),
            _ => OrderBy::parse(order_by).map_err(|(pos, m)| format!("order_by: {pos}: {m}"))?,
        };
        let search = search.map(parse_search).transpose()?;
        Ok(Self {
            fingerprint: Self::fingerprint_of(
                &project,
                filter,
                &order,
                show_deleted,
                search.as_deref(),
            ),
            project,
            filter: parsed,
            search,
            order,
            show_deleted,
        })
    }

    /// The fingerprint of a query given by its request fields.
    pub fn fingerprint_of(
        project: &ProjectId,
        filter: &str,
        order: &OrderBy,
        show_deleted: bool,
        search: Option<&str>,
    ) -> [u8; 8] {
        fingerprint(&[
            "users.v1.query",
            project.as_str(),
            filter,
            &order.canonical(),
            if show_deleted { "1" } else { "0" },
            search.unwrap_or("\u{0}none"),
        ])
    }
}

/// Why a page token was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenError {
    /// Not a token this service issued, or damaged.
    Malformed,
    /// A token of another query (parent, filter, order or show_deleted).
    OtherQuery,
}

const TOKEN_VERSION: u8 = 1;

/// Encodes a cursor for `query` as an opaque, checksummed token.
/// The token of the page that starts right after `last`.
pub fn next_page_token(query: &UserQuery, last: &super::User) -> String {
    encode_page_token(query, &query.order.cursor_of(last, query.search.as_deref()))
}

pub fn encode_page_token(query: &UserQuery, cursor: &Cursor) -> String {
    encode_token(&query.fingerprint, cursor)
}

/// A cursor as an opaque, checksummed token of the query with this
/// fingerprint (user and group lists, member lists).
pub fn encode_token(fingerprint: &[u8; 8], cursor: &Cursor) -> String {
    let mut b = vec![TOKEN_VERSION];
    b.extend_from_slice(fingerprint);
    b.push(cursor.values.len() as u8);
    for v in &cursor.values {
        match v {
            SortValue::Int(n) => {
                b.push(b'i');
                b.extend_from_slice(&n.to_be_bytes());
            }
            SortValue::Text(s) => {
                b.push(b's');
                b.extend_from_slice(&(s.len() as u32).to_be_bytes());
                b.extend_from_slice(s.as_bytes());
            }
        }
    }
    b.extend_from_slice(&(cursor.user_id.len() as u32).to_be_bytes());
    b.extend_from_slice(cursor.user_id.as_bytes());
    let sum = checksum(&b);
    b.extend_from_slice(&sum);
    URL_SAFE_NO_PAD.encode(b)
}

fn checksum(b: &[u8]) -> [u8; 8] {
    let digest = Sha256::new()
        .chain_update(b"users.v1.page_token")
        .chain_update(b)
        .finalize();
    let mut out = [0u8; 8];
    out.copy_from_slice(&digest[..8]);
    out
}

/// Decodes a token issued for `query`; the cursor's values have the types of
/// its order keys.
pub fn decode_page_token(query: &UserQuery, token: &str) -> Result<Cursor, TokenError> {
    let times: Vec<bool> = query
        .order
        .keys()
        .iter()
        .map(|k| k.field.is_time())
        .collect();
    decode_token(&query.fingerprint, &times, token)
}

/// Decodes a token of `encode_token` for the query with this fingerprint,
/// whose cursor values are integers where `times` is true, text elsewhere.
pub fn decode_token(
    fingerprint: &[u8; 8],
    times: &[bool],
    token: &str,
) -> Result<Cursor, TokenError> {
    use TokenError::Malformed;
    if token.len() > 4096 {
        return Err(Malformed);
    }
    let b = URL_SAFE_NO_PAD.decode(token).map_err(|_| Malformed)?;
    if b.len() < 1 + 8 + 1 + 4 + 8 {
        return Err(Malformed);
    }
    let (body, sum) = b.split_at(b.len() - 8);
    if checksum(body) != sum {
        return Err(Malformed);
    }
    let mut r = Reader(body);
    if r.take(1)? != [TOKEN_VERSION] {
        return Err(Malformed);
    }
    if r.take(8)? != fingerprint {
        return Err(TokenError::OtherQuery);
    }
    let n = r.take(1)?[0] as usize;
    if n != times.len() {
        return Err(TokenError::OtherQuery);
    }
    let mut values = Vec::with_capacity(n);
    for is_time in times {
        let tag = r.take(1)?[0];
        values.push(match (tag, *is_time) {
            (b'i', true) => {
                let raw: [u8; 8] = r.take(8)?.try_into().map_err(|_| Malformed)?;
                SortValue::Int(i64::from_be_bytes(raw))
            }
            (b's', false) => SortValue::Text(r.string()?),
            _ => return Err(Malformed),
        });
    }
    let user_id = r.string()?;
    if !r.0.is_empty() {
        return Err(Malformed);
    }
    Ok(Cursor { values, user_id })
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], TokenError> {
        if self.0.len() < n {
            return Err(TokenError::Malformed);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn string(&mut self) -> Result<String, TokenError> {
        let raw: [u8; 4] = self
            .take(4)?
            .try_into()
            .map_err(|_| TokenError::Malformed)?;
        let len = u32::from_be_bytes(raw) as usize;
        String::from_utf8(self.take(len)?.to_vec()).map_err(|_| TokenError::Malformed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(order: &str, filter: &str) -> UserQuery {
        let project = ProjectId::parse("acme").unwrap();
        let order = OrderBy::parse(order).unwrap();
        UserQuery {
            fingerprint: UserQuery::fingerprint_of(&project, filter, &order, false, None),
            project,
            filter: None,
            search: None,
            order,
            show_deleted: false,
        }
    }

    #[test]
    fn order_by_parses_aip_132() {
        let o = OrderBy::parse(" email desc , create_time").unwrap();
        assert_eq!(o.canonical(), "email desc,create_time");
        assert!(o.tie_desc());
        assert_eq!(OrderBy::parse("").unwrap().canonical(), "create_time desc");
        assert_eq!(OrderBy::parse("emial").unwrap_err().0, 1);
        assert_eq!(OrderBy::parse("email, bio").unwrap_err().0, 8);
        assert_eq!(OrderBy::parse("email,email desc").unwrap_err().0, 7);
        assert_eq!(OrderBy::parse("email descending").unwrap_err().0, 1);
        assert_eq!(OrderBy::parse("email,").unwrap_err().0, 7);
    }

    #[test]
    fn tokens_round_trip_and_refuse_tampering_and_other_queries() {
        let q = query("email desc, create_time", "tags:a");
        let c = Cursor {
            values: vec![SortValue::Text("ä@x".into()), SortValue::Int(-1)],
            user_id: "u-1".into(),
        };
        let t = encode_page_token(&q, &c);
        assert_eq!(decode_page_token(&q, &t), Ok(c));

        let mut raw = URL_SAFE_NO_PAD.decode(&t).unwrap();
        raw[12] ^= 1;
        let tampered = URL_SAFE_NO_PAD.encode(&raw);
        assert_eq!(decode_page_token(&q, &tampered), Err(TokenError::Malformed));
        assert_eq!(
            decode_page_token(&q, "garbage!"),
            Err(TokenError::Malformed)
        );
        assert_eq!(decode_page_token(&q, ""), Err(TokenError::Malformed));
        let other = query("email desc, create_time", "tags:b");
        assert_eq!(decode_page_token(&other, &t), Err(TokenError::OtherQuery));
    }
}
