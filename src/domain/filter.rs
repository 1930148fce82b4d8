//! The AIP-160 filter language of ListUsers, SearchUsers and CountUsers:
//! lexing, parsing and type-checking against the user's fields in one pass.
//! The result is a typed tree that storage compiles to SQL with bound
//! parameters; nothing of the filter text ever reaches SQL.
//!
//! Grammar (AIP-160; `OR` binds tighter than `AND`, juxtaposition is `AND`):
//!
//! ```text
//! expression  = sequence { "AND" sequence }
//! sequence    = factor { factor }
//! factor      = term { "OR" term }
//! term        = [ "NOT" | "-" ] simple
//! simple      = restriction | "(" expression ")"
//! restriction = member comparator value
//! ```

use chrono::{DateTime, NaiveDate};

use super::events::EventKind;
use super::group::{GroupId, GroupName};
use super::user::State;
use super::values::{PhoneNumber, ProjectId};

/// Longest filter accepted, in characters.
pub const MAX_FILTER_CHARS: usize = 4096;
/// Most comparisons in one filter.
pub const MAX_COMPARISONS: usize = 200;
/// Deepest nesting of parentheses and negations.
pub const MAX_DEPTH: usize = 32;

/// Why a filter was refused, and where (1-based character position).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilterError {
    pub position: usize,
    pub message: String,
}

impl std::fmt::Display for FilterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "position {}: {}", self.position, self.message)
    }
}

fn err<T>(position: usize, message: impl Into<String>) -> Result<T, FilterError> {
    Err(FilterError {
        position,
        message: message.into(),
    })
}

/// A type-checked filter.
#[derive(Clone, Debug, PartialEq)]
pub enum Filter {
    And(Vec<Filter>),
    Or(Vec<Filter>),
    Not(Box<Filter>),
    /// Decided without looking at a user (a `name` in another project).
    Const(bool),
    Text {
        field: TextField,
        op: Op,
        value: Pattern,
    },
    Time {
        field: TimeField,
        op: Op,
        nanos: i64,
    },
    /// `birthday` against `YYYY-MM-DD`, which sorts like the date.
    Birthday {
        op: Op,
        date: String,
    },
    Bool {
        field: BoolField,
        value: bool,
    },
    State {
        equal: bool,
        state: State,
    },
    /// `field:value` on a repeated field.
    Has {
        field: ListField,
        member: Member,
    },
    /// `metadata.KEY op value`; false for a user without the key.
    Metadata {
        key: String,
        op: Op,
        value: Pattern,
    },
    /// `metadata:KEY`.
    HasMetadataKey(String),
    /// `groups:"g"`: a member of group `g` (an id of the query's project),
    /// directly or through groups nested in it. `within` is None as parsed;
    /// the storage may list `g` and its nested groups there before the
    /// query runs (else it follows the nesting in the query itself).
    InGroup {
        group: String,
        within: Option<Vec<String>>,
    },
}

/// What a filter selects: the fields it may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subject {
    User,
    /// ListGroups: `display_name`, `create_time`, `metadata`.
    Group,
    /// ListEvents and WatchEvents: `type`, `resource`.
    Event,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// A string operand. Wildcards only come with `=` and `!=`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pattern {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
}

/// A member test on a repeated field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Member {
    /// `tags:*`: at least one element.
    Any,
    Exact(String),
    Prefix(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextField {
    /// The `{user}` part of the name (the project is fixed by `parent`).
    UserId,
    /// Compared lower-cased.
    Email,
    PhoneNumber,
    /// Stored lower-cased; compared lower-cased.
    Username,
    ExternalId,
    DisplayName,
    GivenName,
    MiddleName,
    FamilyName,
    Title,
    PreferredLocale,
    PictureUri,
    Bio,
    Note,
    /// An event's type name (events only).
    EventType,
    /// An event's resource name (events only).
    Resource,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeField {
    CreateTime,
    UpdateTime,
    DeleteTime,
    PurgeTime,
    LastLoginTime,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BoolField {
    EmailVerified,
    PhoneNumberVerified,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListField {
    Tags,
    Roles,
    SecondaryEmails,
    SecondaryPhoneNumbers,
}

enum FieldKind {
    Text(TextField),
    Name,
    Time(TimeField),
    Birthday,
    Bool(BoolField),
    State,
    List(ListField),
    Metadata(Option<String>),
    Groups,
}

fn field_kind(path: &str, subject: Subject) -> Option<FieldKind> {
    use FieldKind as K;
    if subject == Subject::Event {
        return match path {
            "type" => Some(K::Text(TextField::EventType)),
            "resource" => Some(K::Text(TextField::Resource)),
            _ => None,
        };
    }
    if subject == Subject::Group {
        return match path {
            "display_name" => Some(K::Text(TextField::DisplayName)),
            "create_time" => Some(K::Time(TimeField::CreateTime)),
            "metadata" => Some(K::Metadata(None)),
            _ => None,
        };
    }
    Some(match path {
        "name" => K::Name,
        "email" => K::Text(TextField::Email),
        "phone_number" => K::Text(TextField::PhoneNumber),
        "username" => K::Text(TextField::Username),
        "external_id" => K::Text(TextField::ExternalId),
        "display_name" => K::Text(TextField::DisplayName),
        "given_name" => K::Text(TextField::GivenName),
        "middle_name" => K::Text(TextField::MiddleName),
        "family_name" => K::Text(TextField::FamilyName),
        "title" => K::Text(TextField::Title),
        "preferred_locale" => K::Text(TextField::PreferredLocale),
        "picture_uri" => K::Text(TextField::PictureUri),
        "bio" => K::Text(TextField::Bio),
        "note" => K::Text(TextField::Note),
        "create_time" => K::Time(TimeField::CreateTime),
        "update_time" => K::Time(TimeField::UpdateTime),
        "delete_time" => K::Time(TimeField::DeleteTime),
        "purge_time" => K::Time(TimeField::PurgeTime),
        "last_login_time" => K::Time(TimeField::LastLoginTime),
        "birthday" => K::Birthday,
        "email_verified" => K::Bool(BoolField::EmailVerified),
        "phone_number_verified" => K::Bool(BoolField::PhoneNumberVerified),
        "state" => K::State,
        "tags" => K::List(ListField::Tags),
        "roles" => K::List(ListField::Roles),
        "secondary_emails" => K::List(ListField::SecondaryEmails),
        "secondary_phone_numbers" => K::List(ListField::SecondaryPhoneNumbers),
        "metadata" => K::Metadata(None),
        "groups" => K::Groups,
        _ => return None,
    })
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    LParen,
    RParen,
    Cmp(Cmp),
    Minus,
    And,
    Or,
    Not,
    /// Unquoted text; may contain dots and wildcards.
    Text(String),
    /// A double- or single-quoted string, unescaped; `stars` says whether the
    /// first/last character was an unescaped `*`.
    Str {
        value: String,
        lead_star: bool,
        trail_star: bool,
    },
    /// A backtick-quoted name part.
    Quoted(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cmp {
    Op(Op),
    Has,
}

struct Token {
    tok: Tok,
    pos: usize,
    /// Whether whitespace separates this token from the previous one.
    spaced: bool,
}

fn is_text_char(c: char) -> bool {
    !c.is_whitespace()
        && !matches!(
            c,
            '(' | ')' | '"' | '\'' | '`' | '=' | '!' | '<' | '>' | ':'
        )
}

fn lex(input: &str) -> Result<Vec<Token>, FilterError> {
    let chars: Vec<char> = input.chars().collect();
    let mut out: Vec<Token> = Vec::new();
    let mut i = 0;
    let mut spaced = true;
    while i < chars.len() {
        let c = chars[i];
        let pos = i + 1;
        if c.is_whitespace() {
            spaced = true;
            i += 1;
            continue;
        }
        if c.is_control() {
            return err(pos, "control characters are not allowed");
        }
        let prev_is_cmp = matches!(
            out.last(),
            Some(Token {
                tok: Tok::Cmp(_),
                ..
            })
        );
        let next = chars.get(i + 1).copied();
        let (tok, len) = match c {
            '(' => (Tok::LParen, 1),
            ')' => (Tok::RParen, 1),
            ':' => (Tok::Cmp(Cmp::Has), 1),
            '=' => (Tok::Cmp(Cmp::Op(Op::Eq)), 1),
            '!' if next == Some('=') => (Tok::Cmp(Cmp::Op(Op::Ne)), 2),
            '!' => return err(pos, "expected `!=`"),
            '<' if next == Some('=') => (Tok::Cmp(Cmp::Op(Op::Le)), 2),
            '<' => (Tok::Cmp(Cmp::Op(Op::Lt)), 1),
            '>' if next == Some('=') => (Tok::Cmp(Cmp::Op(Op::Ge)), 2),
            '>' => (Tok::Cmp(Cmp::Op(Op::Gt)), 1),
            // A minus that starts a term (not a value) negates it.
            '-' if !prev_is_cmp && next.is_some_and(|n| !n.is_whitespace() && n != ')') => {
                (Tok::Minus, 1)
            }
            '"' | '\'' => lex_string(&chars, i)?,
            '`' => {
                let end = chars[i + 1..]
                    .iter()
                    .position(|c| *c == '`')
                    .ok_or(FilterError {
                        position: pos,
                        message: "unterminated backtick-quoted name".into(),
                    })?;
                let name: String = chars[i + 1..i + 1 + end].iter().collect();
                (Tok::Quoted(name), end + 2)
            }
            _ => {
                let len = chars[i..].iter().take_while(|c| is_text_char(**c)).count();
                let text: String = chars[i..i + len].iter().collect();
                let tok = match text.as_str() {
                    "AND" => Tok::And,
                    "OR" => Tok::Or,
                    "NOT" => Tok::Not,
                    _ => Tok::Text(text),
                };
                (tok, len)
            }
        };
        out.push(Token { tok, pos, spaced });
        i += len;
        spaced = false;
    }
    Ok(out)
}

/// A quoted string starting at `chars[start]`; returns the token and its
/// length in characters.
fn lex_string(chars: &[char], start: usize) -> Result<(Tok, usize), FilterError> {
    let quote = chars[start];
    let mut value = String::new();
    let mut i = start + 1;
    let mut lead_star = false;
    // Whether the last character so far was an unescaped `*`.
    let mut trail_star = false;
    loop {
        let Some(&c) = chars.get(i) else {
            return err(start + 1, "unterminated string");
        };
        if c == quote {
            break;
        }
        match c {
            '\\' => {
                let Some(&n) = chars.get(i + 1) else {
                    return err(i + 1, "unterminated string");
                };
                value.push(match n {
                    'n' => '\n',
                    't' => '\t',
                    '\\' | '"' | '\'' | '*' => n,
                    _ => return err(i + 1, format!("unknown escape `\\{n}`")),
                });
                trail_star = false;
                i += 2;
                continue;
            }
            '*' => {
                if i == start + 1 {
                    lead_star = true;
                    trail_star = false;
                } else {
                    trail_star = true;
                }
                value.push('*');
            }
            _ => {
                trail_star = false;
                value.push(c);
            }
        }
        i += 1;
    }
    // A lone "*" is one wildcard, not two.
    if lead_star && value.chars().count() == 1 {
        trail_star = false;
    }
    Ok((
        Tok::Str {
            value,
            lead_star,
            trail_star,
        },
        i + 1 - start,
    ))
}

/// Parses and type-checks `input` for the users of `project`. An empty (or
/// blank) filter is `None`.
pub fn parse(input: &str, project: &ProjectId) -> Result<Option<Filter>, FilterError> {
    parse_for(input, project, Subject::User)
}

/// As `parse`, for the fields of `subject`.
pub fn parse_for(
    input: &str,
    project: &ProjectId,
    subject: Subject,
) -> Result<Option<Filter>, FilterError> {
    let n = input.chars().count();
    if n > MAX_FILTER_CHARS {
        return err(
            MAX_FILTER_CHARS + 1,
            format!("a filter is at most {MAX_FILTER_CHARS} characters"),
        );
    }
    let tokens = lex(input)?;
    if tokens.is_empty() {
        return Ok(None);
    }
    let mut p = Parser {
        tokens,
        at: 0,
        end: n + 1,
        comparisons: 0,
        project,
        subject,
    };
    let f = p.expression(0)?;
    if let Some(t) = p.tokens.get(p.at) {
        return err(
            t.pos,
            match t.tok {
                Tok::RParen => "unbalanced `)`",
                _ => "expected AND, OR or the end of the filter",
            },
        );
    }
    Ok(Some(f))
}

struct Parser<'a> {
    tokens: Vec<Token>,
    at: usize,
    end: usize,
    comparisons: usize,
    project: &'a ProjectId,
    subject: Subject,
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Tok> {
        self.tokens.get(self.at).map(|t| &t.tok)
    }

    fn pos(&self) -> usize {
        self.tokens.get(self.at).map_or(self.end, |t| t.pos)
    }

    fn expression(&mut self, depth: usize) -> Result<Filter, FilterError> {
        if depth > MAX_DEPTH {
            return err(self.pos(), format!("nested deeper than {MAX_DEPTH} levels"));
        }
        let mut parts = vec![self.sequence(depth)?];
        while self.peek() == Some(&Tok::And) {
            self.at += 1;
            parts.push(self.sequence(depth)?);
        }
        Ok(flatten(parts, true))
    }

    fn sequence(&mut self, depth: usize) -> Result<Filter, FilterError> {
        let mut parts = vec![self.factor(depth)?];
        while matches!(
            self.peek(),
            Some(Tok::LParen | Tok::Not | Tok::Minus | Tok::Text(_) | Tok::Quoted(_))
        ) {
            parts.push(self.factor(depth)?);
        }
        Ok(flatten(parts, true))
    }

    fn factor(&mut self, depth: usize) -> Result<Filter, FilterError> {
        let mut parts = vec![self.term(depth)?];
        while self.peek() == Some(&Tok::Or) {
            self.at += 1;
            parts.push(self.term(depth)?);
        }
        Ok(flatten(parts, false))
    }

    fn term(&mut self, depth: usize) -> Result<Filter, FilterError> {
        match self.peek() {
            Some(Tok::Not) | Some(Tok::Minus) => {
                let is_not = self.peek() == Some(&Tok::Not);
                self.at += 1;
                if is_not && self.tokens.get(self.at).is_some_and(|t| !t.spaced) {
                    return err(self.pos(), "expected a space after NOT");
                }
                if depth + 1 > MAX_DEPTH {
                    return err(self.pos(), format!("nested deeper than {MAX_DEPTH} levels"));
                }
                Ok(match self.simple(depth + 1)? {
                    Filter::Not(inner) => *inner,
                    f => Filter::Not(Box::new(f)),
                })
            }
            _ => self.simple(depth),
        }
    }

    fn simple(&mut self, depth: usize) -> Result<Filter, FilterError> {
        let pos = self.pos();
        match self.peek() {
            Some(Tok::LParen) => {
                self.at += 1;
                if self.peek() == Some(&Tok::RParen) {
                    return err(self.pos(), "empty parentheses");
                }
                let inner = self.expression(depth + 1)?;
                if self.peek() != Some(&Tok::RParen) {
                    return err(self.pos(), "expected `)`");
                }
                self.at += 1;
                Ok(inner)
            }
            Some(Tok::Text(_)) | Some(Tok::Quoted(_)) => self.restriction(),
            Some(Tok::And) | Some(Tok::Or) => err(pos, "expected a comparison before AND/OR"),
            Some(Tok::RParen) => err(pos, "unbalanced `)`"),
            Some(Tok::Cmp(_)) => err(pos, "expected a field name before the operator"),
            Some(Tok::Str { .. }) => err(
                pos,
                "expected a field name; free-text search is not supported (use SearchUsers)",
            ),
            Some(Tok::Not) | Some(Tok::Minus) => err(pos, "expected a comparison"),
            None => err(pos, "unexpected end of the filter"),
        }
    }

    /// The member path: `field`, or `metadata.KEY` / `metadata.`KEY``.
    fn member(&mut self) -> Result<(usize, FieldKind), FilterError> {
        let pos = self.pos();
        let text = match self.peek() {
            Some(Tok::Text(t)) => t.clone(),
            Some(Tok::Quoted(q)) => return err(pos, format!("unknown field `{q}`")),
            _ => return err(pos, "expected a field name"),
        };
        self.at += 1;
        if let Some(rest) = text.strip_prefix("metadata.") {
            let key = if rest.is_empty() {
                match self.tokens.get(self.at) {
                    Some(Token {
                        tok: Tok::Quoted(k),
                        spaced: false,
                        ..
                    }) => {
                        let k = k.clone();
                        self.at += 1;
                        k
                    }
                    _ => return err(pos + 9, "expected a metadata key after `metadata.`"),
                }
            } else {
                rest.to_owned()
            };
            check_metadata_key(&key).or_else(|m| err(pos + 9, m))?;
            return Ok((pos, FieldKind::Metadata(Some(key))));
        }
        match field_kind(&text, self.subject) {
            Some(k) => Ok((pos, k)),
            None if self.subject == Subject::Event => err(
                pos,
                format!("events are filtered by type and resource, not `{text}`"),
            ),
            None if self.subject == Subject::Group => err(
                pos,
                format!(
                    "groups are filtered by display_name, create_time and metadata, not `{text}`"
                ),
            ),
            None if text.contains('.') => err(
                pos,
                format!("`{text}` is not filterable: only metadata.KEY has sub-fields"),
            ),
            None => err(pos, format!("unknown field `{text}`")),
        }
    }

    fn restriction(&mut self) -> Result<Filter, FilterError> {
        let (field_pos, kind) = self.member()?;
        let op_pos = self.pos();
        let cmp = match self.peek() {
            Some(Tok::Cmp(c)) => *c,
            _ => {
                return err(
                    op_pos,
                    "expected a comparison operator (=, !=, <, <=, >, >=, :)",
                );
            }
        };
        self.at += 1;
        let value_pos = self.pos();
        let value = match self.tokens.get(self.at).map(|t| &t.tok) {
            Some(Tok::Text(t)) => {
                let lead = t.starts_with('*');
                let trail = t.len() > 1 && t.ends_with('*');
                Value {
                    text: t.clone(),
                    quoted: false,
                    lead_star: lead,
                    trail_star: trail,
                }
            }
            Some(Tok::Str {
                value,
                lead_star,
                trail_star,
            }) => Value {
                text: value.clone(),
                quoted: true,
                lead_star: *lead_star,
                trail_star: *trail_star,
            },
            // `state = NOT` and the like: keywords are values here.
            Some(Tok::And) | Some(Tok::Or) | Some(Tok::Not) => {
                return err(value_pos, "expected a value; quote keywords used as values");
            }
            _ => return err(value_pos, "expected a value after the operator"),
        };
        self.at += 1;
        self.comparisons += 1;
        if self.comparisons > MAX_COMPARISONS {
            return err(
                field_pos,
                format!("a filter has at most {MAX_COMPARISONS} comparisons"),
            );
        }
        let project = self.project;
        typed(kind, cmp, value, op_pos, value_pos, project)
    }
}

fn flatten(mut parts: Vec<Filter>, and: bool) -> Filter {
    if parts.len() == 1 {
        return parts.pop().unwrap_or(Filter::Const(true));
    }
    let mut out = Vec::with_capacity(parts.len());
    for p in parts {
        match (p, and) {
            (Filter::And(inner), true) | (Filter::Or(inner), false) => out.extend(inner),
            (p, _) => out.push(p),
        }
    }
    if and {
        Filter::And(out)
    } else {
        Filter::Or(out)
    }
}

struct Value {
    /// Unescaped; still holds the wildcard stars.
    text: String,
    quoted: bool,
    lead_star: bool,
    trail_star: bool,
}

impl Value {
    fn has_wildcard(&self) -> bool {
        self.lead_star || self.trail_star
    }

    /// The text without its wildcard stars.
    fn core(&self) -> String {
        let mut chars: Vec<char> = self.text.chars().collect();
        if self.trail_star {
            chars.pop();
        }
        if self.lead_star && !chars.is_empty() {
            chars.remove(0);
        }
        chars.into_iter().collect()
    }

    fn pattern(&self, fold: impl Fn(&str) -> String) -> Pattern {
        let core = fold(&self.core());
        match (self.lead_star, self.trail_star) {
            (false, false) => Pattern::Exact(core),
            (false, true) => Pattern::Prefix(core),
            (true, false) => Pattern::Suffix(core),
            (true, true) => Pattern::Contains(core),
        }
    }
}

fn check_metadata_key(key: &str) -> Result<(), String> {
    if key.is_empty()
        || key.len() > 64
        || !key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        return Err(format!(
            "`{key}` is not a metadata key (1 to 64 of letters, digits, '_', '.', '-')"
        ));
    }
    Ok(())
}

fn typed(
    kind: FieldKind,
    cmp: Cmp,
    value: Value,
    op_pos: usize,
    value_pos: usize,
    project: &ProjectId,
) -> Result<Filter, FilterError> {
    let ordering_op = |what: &str| -> Result<Op, FilterError> {
        match cmp {
            Cmp::Op(op) => Ok(op),
            Cmp::Has => err(
                op_pos,
                format!(
                    "`:` applies to tags, roles, secondary_emails, secondary_phone_numbers, metadata and groups, not to {what}"
                ),
            ),
        }
    };
    let equality_op = |what: &str| -> Result<bool, FilterError> {
        match cmp {
            Cmp::Op(Op::Eq) => Ok(true),
            Cmp::Op(Op::Ne) => Ok(false),
            _ => err(op_pos, format!("{what} supports only `=` and `!=`")),
        }
    };
    let no_wildcard = |what: &str| -> Result<(), FilterError> {
        if value.has_wildcard() {
            return err(value_pos, format!("{what} takes no `*` wildcard"));
        }
        Ok(())
    };
    let pattern_for = |op: Op, fold: &dyn Fn(&str) -> String| -> Result<Pattern, FilterError> {
        if value.has_wildcard() && !matches!(op, Op::Eq | Op::Ne) {
            return err(value_pos, "a `*` wildcard needs `=` or `!=`");
        }
        Ok(value.pattern(fold))
    };
    let as_is = |s: &str| s.to_owned();
    match kind {
        FieldKind::Text(field) => {
            let op = ordering_op("a string field")?;
            let value = match field {
                TextField::Email | TextField::Username => {
                    pattern_for(op, &|s: &str| s.to_lowercase())?
                }
                TextField::EventType => {
                    equality_op("type")?;
                    if value.has_wildcard() || EventKind::parse(&value.text).is_none() {
                        return err(
                            value_pos,
                            format!("`{}` is not an event type such as USER_CREATED", value.text),
                        );
                    }
                    Pattern::Exact(value.text.clone())
                }
                TextField::PhoneNumber if !value.has_wildcard() => {
                    // A formatted number compares in its stored E.164 form.
                    let raw = value.core();
                    Pattern::Exact(
                        PhoneNumber::parse(&raw)
                            .map(|p| p.as_str().to_owned())
                            .unwrap_or(raw),
                    )
                }
                _ => pattern_for(op, &as_is)?,
            };
            Ok(Filter::Text { field, op, value })
        }
        FieldKind::Name => {
            let equal = equality_op("name")?;
            let prefix = format!("projects/{project}/users/");
            let core = value.core();
            if value.lead_star {
                return err(value_pos, "name takes only a trailing `*` wildcard");
            }
            let Some(id) = core.strip_prefix(&prefix) else {
                // Names of another project match nothing here.
                let matches_all_of_project = value.trail_star && prefix.starts_with(&core);
                return Ok(Filter::Const(matches_all_of_project == equal));
            };
            let pattern = if value.trail_star {
                Pattern::Prefix(id.to_owned())
            } else {
                Pattern::Exact(id.to_owned())
            };
            Ok(Filter::Text {
                field: TextField::UserId,
                op: if equal { Op::Eq } else { Op::Ne },
                value: pattern,
            })
        }
        FieldKind::Time(field) => {
            let op = ordering_op("a time")?;
            no_wildcard("a time")?;
            let nanos = DateTime::parse_from_rfc3339(&value.text)
                .ok()
                .and_then(|t| t.timestamp_nanos_opt())
                .ok_or_else(|| FilterError {
                    position: value_pos,
                    message: format!(
                        "`{}` is not an RFC 3339 time such as \"2025-01-31T12:00:00Z\" (quote it)",
                        value.text
                    ),
                })?;
            Ok(Filter::Time { field, op, nanos })
        }
        FieldKind::Birthday => {
            let op = ordering_op("birthday")?;
            no_wildcard("birthday")?;
            let date = NaiveDate::parse_from_str(&value.text, "%Y-%m-%d")
                .ok()
                .filter(|d| {
                    value.text.len() == 10 && d.format("%Y-%m-%d").to_string() == value.text
                })
                .ok_or_else(|| FilterError {
                    position: value_pos,
                    message: format!("`{}` is not a date such as \"1990-12-31\"", value.text),
                })?;
            Ok(Filter::Birthday {
                op,
                date: date.format("%Y-%m-%d").to_string(),
            })
        }
        FieldKind::Bool(field) => {
            let equal = equality_op("a boolean field")?;
            let b = match value.text.as_str() {
                "true" => true,
                "false" => false,
                other => {
                    return err(value_pos, format!("`{other}` is not `true` or `false`"));
                }
            };
            Ok(Filter::Bool {
                field,
                value: b == equal,
            })
        }
        FieldKind::State => {
            let equal = equality_op("state")?;
            let state = match value.text.as_str() {
                "PENDING" => State::Pending,
                "ACTIVE" => State::Active,
                "DISABLED" => State::Disabled,
                "DELETED" => State::Deleted,
                other => {
                    return err(
                        value_pos,
                        format!("`{other}` is not a state: PENDING, ACTIVE, DISABLED or DELETED"),
                    );
                }
            };
            Ok(Filter::State { equal, state })
        }
        FieldKind::List(field) => {
            if cmp != Cmp::Has {
                return err(
                    op_pos,
                    "a repeated field is tested with `:` (`tags:\"vip\"`)",
                );
            }
            if value.lead_star && value.text.chars().count() > 1 {
                return err(value_pos, "only a trailing `*` wildcard is supported here");
            }
            let fold = |s: &str| match field {
                ListField::SecondaryEmails => s.to_lowercase(),
                _ => s.to_owned(),
            };
            let member = if value.text == "*" {
                Member::Any
            } else if value.trail_star {
                Member::Prefix(fold(&value.core()))
            } else if field == ListField::SecondaryPhoneNumbers {
                let raw = value.core();
                Member::Exact(
                    PhoneNumber::parse(&raw)
                        .map(|p| p.as_str().to_owned())
                        .unwrap_or(raw),
                )
            } else {
                Member::Exact(fold(&value.core()))
            };
            Ok(Filter::Has { field, member })
        }
        FieldKind::Groups => {
            if cmp != Cmp::Has {
                return err(
                    op_pos,
                    "group membership is tested with `:` (`groups:\"team\"`)",
                );
            }
            if value.has_wildcard() {
                return err(value_pos, "`groups:` takes a group id or name without `*`");
            }
            let text = value.text;
            let id = if text.starts_with("projects/") {
                let name = GroupName::parse(&text).or_else(|m| err(value_pos, m))?;
                if &name.project != project {
                    // A group of another project has no members here.
                    return Ok(Filter::Const(false));
                }
                name.group
            } else {
                GroupId::parse(&text).or_else(|m| err(value_pos, m))?
            };
            Ok(Filter::InGroup {
                group: id.as_str().to_owned(),
                within: None,
            })
        }
        FieldKind::Metadata(None) => {
            if cmp != Cmp::Has {
                return err(
                    op_pos,
                    "compare a key with `metadata.KEY = \"value\"`, or test it with `metadata:KEY`",
                );
            }
            if value.has_wildcard() {
                return err(value_pos, "`metadata:KEY` takes a key without `*`");
            }
            check_metadata_key(&value.text).or_else(|m| err(value_pos, m))?;
            Ok(Filter::HasMetadataKey(value.text))
        }
        FieldKind::Metadata(Some(key)) => match cmp {
            Cmp::Has if value.text == "*" && !value.quoted => Ok(Filter::HasMetadataKey(key)),
            Cmp::Has => err(
                op_pos,
                "use `metadata.KEY:*` to test a key, `=` to compare it",
            ),
            Cmp::Op(op) => {
                let value = pattern_for(op, &as_is)?;
                Ok(Filter::Metadata { key, op, value })
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn project() -> ProjectId {
        ProjectId::parse("acme").unwrap()
    }

    fn ok(s: &str) -> Filter {
        parse(s, &project()).unwrap().unwrap()
    }

    fn fails(s: &str) -> FilterError {
        parse(s, &project()).unwrap_err()
    }

    fn text(field: TextField, op: Op, value: Pattern) -> Filter {
        Filter::Text { field, op, value }
    }

    fn state(s: State) -> Filter {
        Filter::State {
            equal: true,
            state: s,
        }
    }

    #[test]
    fn or_binds_tighter_than_and() {
        let f = ok("state = ACTIVE AND tags:vip OR roles:admin");
        assert_eq!(
            f,
            Filter::And(vec![
                state(State::Active),
                Filter::Or(vec![
                    Filter::Has {
                        field: ListField::Tags,
                        member: Member::Exact("vip".into())
                    },
                    Filter::Has {
                        field: ListField::Roles,
                        member: Member::Exact("admin".into())
                    },
                ])
            ])
        );
    }

    #[test]
    fn juxtaposition_is_and_and_parentheses_group() {
        assert_eq!(
            ok("(state = ACTIVE OR state = PENDING) email_verified = true"),
            Filter::And(vec![
                Filter::Or(vec![state(State::Active), state(State::Pending)]),
                Filter::Bool {
                    field: BoolField::EmailVerified,
                    value: true
                },
            ])
        );
    }

    #[test]
    fn negation_by_not_and_minus() {
        let expected = Filter::Not(Box::new(state(State::Active)));
        assert_eq!(ok("NOT state = ACTIVE"), expected);
        assert_eq!(ok("-state = ACTIVE"), expected);
        assert_eq!(ok("NOT (NOT state = ACTIVE)"), state(State::Active));
        // A minus inside a value is text.
        assert_eq!(
            ok("tags:team-a"),
            Filter::Has {
                field: ListField::Tags,
                member: Member::Exact("team-a".into())
            }
        );
    }

    #[test]
    fn wildcards_and_case_folding() {
        assert_eq!(
            ok(r#"email = "*@Example.COM""#),
            text(
                TextField::Email,
                Op::Eq,
                Pattern::Suffix("@example.com".into())
            )
        );
        assert_eq!(
            ok(r#"display_name = "Ann*""#),
            text(
                TextField::DisplayName,
                Op::Eq,
                Pattern::Prefix("Ann".into())
            )
        );
        assert_eq!(
            ok(r#"display_name != "*nn*""#),
            text(
                TextField::DisplayName,
                Op::Ne,
                Pattern::Contains("nn".into())
            )
        );
        assert_eq!(
            ok(r#"display_name = "a\*""#),
            text(TextField::DisplayName, Op::Eq, Pattern::Exact("a*".into()))
        );
        assert_eq!(
            ok("tags:*"),
            Filter::Has {
                field: ListField::Tags,
                member: Member::Any
            }
        );
        assert_eq!(
            ok(r#"tags:"team-*""#),
            Filter::Has {
                field: ListField::Tags,
                member: Member::Prefix("team-".into())
            }
        );
    }

    #[test]
    fn metadata_keys() {
        assert_eq!(
            ok(r#"metadata.plan = "pro""#),
            Filter::Metadata {
                key: "plan".into(),
                op: Op::Eq,
                value: Pattern::Exact("pro".into())
            }
        );
        assert_eq!(
            ok("metadata.`plan-v2` >= b"),
            Filter::Metadata {
                key: "plan-v2".into(),
                op: Op::Ge,
                value: Pattern::Exact("b".into())
            }
        );
        assert_eq!(ok("metadata:plan"), Filter::HasMetadataKey("plan".into()));
        assert_eq!(ok("metadata.plan:*"), Filter::HasMetadataKey("plan".into()));
    }

    #[test]
    fn times_dates_and_phone_numbers() {
        assert_eq!(
            ok(r#"create_time >= "1970-01-01T00:00:01.5+00:00""#),
            Filter::Time {
                field: TimeField::CreateTime,
                op: Op::Ge,
                nanos: 1_500_000_000
            }
        );
        assert_eq!(
            ok(r#"birthday < "1990-01-31""#),
            Filter::Birthday {
                op: Op::Lt,
                date: "1990-01-31".into()
            }
        );
        assert_eq!(
            ok(r#"phone_number = "+1 (212) 555-0100""#),
            text(
                TextField::PhoneNumber,
                Op::Eq,
                Pattern::Exact("+12125550100".into())
            )
        );
    }

    #[test]
    fn names_in_and_outside_the_project() {
        assert_eq!(
            ok(r#"name = "projects/acme/users/u1""#),
            text(TextField::UserId, Op::Eq, Pattern::Exact("u1".into()))
        );
        assert_eq!(
            ok(r#"name = "projects/other/users/u1""#),
            Filter::Const(false)
        );
        assert_eq!(
            ok(r#"name != "projects/other/users/u1""#),
            Filter::Const(true)
        );
    }

    #[test]
    fn errors_point_at_the_position() {
        let e = fails("emial = \"a\"");
        assert_eq!(e.position, 1);
        assert!(e.message.contains("unknown field"), "{e}");
        let e = fails("state = ACTIVE AND state = GONE");
        assert_eq!(e.position, 28);
        assert!(e.message.contains("not a state"), "{e}");
        let e = fails("state > ACTIVE");
        assert_eq!(e.position, 7);
        let e = fails(r#"create_time > "yesterday""#);
        assert_eq!(e.position, 15);
        assert_eq!(fails("(state = ACTIVE").position, 16);
        assert_eq!(fails("state = ACTIVE)").position, 15);
        assert_eq!(fails("tags = vip").position, 6);
        assert_eq!(fails("email:x").position, 6);
        assert_eq!(fails("email").position, 6);
        assert_eq!(fails("email = \"x").position, 9);
        assert_eq!(fails("email_verified = yes").position, 18);
        assert_eq!(fails("custom_data.a = 1").position, 1);
        assert_eq!(fails(r#"display_name < "a*""#).position, 16);
        assert_eq!(fails("AND state = ACTIVE").position, 1);
        assert_eq!(fails("\"free text\"").position, 1);
        assert_eq!(fails("metadata.`a b` = 1").position, 10);
    }

    #[test]
    fn limits_are_enforced_without_recursion_blowup() {
        let deep = format!("{}state = ACTIVE{}", "(".repeat(10_000), ")".repeat(10_000));
        assert!(fails(&deep).message.contains("characters"));
        let deep = format!("{}state = ACTIVE{}", "(".repeat(40), ")".repeat(40));
        assert!(fails(&deep).message.contains("deeper"));
        let nots = format!("{}state = ACTIVE", "NOT (".repeat(40));
        assert!(fails(&nots).message.contains("deeper"));
        // AIP-160 allows one negation per term.
        assert_eq!(fails("NOT NOT state = ACTIVE").position, 5);
        let many = vec!["tags:a"; MAX_COMPARISONS + 1].join(" OR ");
        assert!(fails(&many).message.contains("at most"));
        assert_eq!(parse("   ", &project()).unwrap(), None);
    }
}
