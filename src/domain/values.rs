//! Newtypes that validate and normalise on construction. Once a value has one of
//! these types it is valid; nothing downstream checks the string again.
//!
//! Each `parse` returns the reason as a sentence for the client when it refuses.

use std::fmt;

use chrono::{Datelike, NaiveDate};
use serde::{Deserialize, Serialize};

/// Why a single value was refused; the caller adds the field path.
pub type Reason = String;

/// A client's string as an error message may quote it: at most 64
/// characters, so that an answer never grows with what was sent.
pub fn clip(s: &str) -> String {
    const MAX: usize = 64;
    match s.char_indices().nth(MAX) {
        None => s.to_owned(),
        Some((end, _)) => format!("{}…", &s[..end]),
    }
}

fn is_id_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'
}

/// `[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?`
pub(crate) fn check_resource_id(s: &str, what: &str) -> Result<(), Reason> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.chars().all(is_id_char)
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} must be 1 to 63 characters of lowercase letters, digits and hyphens, \
             starting and ending with a letter or digit"
        ))
    }
}

/// The `{project}` of a resource name: one tenant.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProjectId(String);

impl ProjectId {
    pub fn parse(s: &str) -> Result<Self, Reason> {
        check_resource_id(s, "project id")?;
        Ok(Self(s.to_owned()))
    }

    /// Parses `projects/{project}`.
    pub fn parse_parent(s: &str) -> Result<Self, Reason> {
        match s.strip_prefix("projects/") {
            Some(p) if !p.contains('/') => Self::parse(p),
            _ => Err("must have the form projects/{project}".into()),
        }
    }

    pub fn from_stored(s: String) -> Self {
        Self(s)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ProjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A caller-chosen or generated resource id (`{user}`, `{group}`): the id
/// rules, a UUIDv7 when generated, and display; `what` names it in errors.
macro_rules! resource_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            pub fn parse(s: &str) -> Result<Self, $crate::domain::values::Reason> {
                $crate::domain::values::check_resource_id(s, $what)?;
                Ok(Self(s.to_owned()))
            }

            /// A new time-ordered id (UUIDv7, lowercase, hyphenated).
            pub fn generate() -> Self {
                Self(uuid::Uuid::now_v7().hyphenated().to_string())
            }

            pub fn from_stored(s: String) -> Self {
                Self(s)
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}
pub(crate) use resource_id;

resource_id!(
    /// The `{user}` of a resource name.
    UserId,
    "user id"
);

/// A full user resource name, `projects/{project}/users/{user}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserName {
    pub project: ProjectId,
    pub user: UserId,
}

impl UserName {
    pub fn parse(s: &str) -> Result<Self, Reason> {
        let shape = || "must have the form projects/{project}/users/{user}".to_string();
        let rest = s.strip_prefix("projects/").ok_or_else(shape)?;
        let (project, user) = rest.split_once("/users/").ok_or_else(shape)?;
        if project.contains('/') || user.contains('/') {
            return Err(shape());
        }
        Ok(Self {
            project: ProjectId::parse(project)?,
            user: UserId::parse(user)?,
        })
    }
}

impl fmt::Display for UserName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "projects/{}/users/{}", self.project, self.user)
    }
}

/// Nanoseconds since the Unix epoch, UTC. The storage representation of every
/// time: exact and ordered the same way on every database engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

impl Timestamp {
    pub const fn from_nanos(n: i64) -> Self {
        Self(n)
    }

    pub fn now() -> Self {
        let now = chrono::Utc::now();
        // Valid until the year 2262; the clock of the machine is in range.
        Self(now.timestamp_nanos_opt().unwrap_or(i64::MAX))
    }

    pub fn nanos(self) -> i64 {
        self.0
    }

    /// Splits into whole seconds and the nanosecond remainder (always >= 0).
    pub fn seconds_and_nanos(self) -> (i64, i32) {
        (
            self.0.div_euclid(1_000_000_000),
            self.0.rem_euclid(1_000_000_000) as i32,
        )
    }

    /// From protobuf-style seconds and nanos; refuses what does not fit
    /// (before 1970, after 2262, nanos out of range).
    pub fn from_parts(seconds: i64, nanos: i32) -> Result<Self, Reason> {
        if !(0..1_000_000_000).contains(&nanos) {
            return Err("nanos must be between 0 and 999,999,999".into());
        }
        seconds
            .checked_mul(1_000_000_000)
            .and_then(|s| s.checked_add(i64::from(nanos)))
            .filter(|n| *n >= 0)
            .map(Self)
            .ok_or_else(|| "must lie between 1970-01-01 and 2262-04-11".into())
    }

    pub fn plus(self, d: std::time::Duration) -> Self {
        let add = i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
        Self(self.0.saturating_add(add))
    }
}

fn has_control(s: &str, allow_breaks: bool) -> bool {
    s.chars()
        .any(|c| c.is_control() && !(allow_breaks && matches!(c, '\n' | '\r' | '\t')))
}

/// Checks free text: a length in characters and no control characters
/// (line breaks and tabs allowed where `allow_breaks`).
pub fn check_text(s: &str, max: usize, allow_breaks: bool) -> Result<(), Reason> {
    let n = s.chars().count();
    if n > max {
        return Err(format!("must be at most {max} characters (got {n})"));
    }
    if has_control(s, allow_breaks) {
        return Err(if allow_breaks {
            "must not contain control characters other than line breaks and tabs".into()
        } else {
            "must not contain control characters".into()
        });
    }
    Ok(())
}

/// An email address: the domain lower-cased, the local part kept as given.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Email(String);

impl Email {
    pub const MAX_LEN: usize = 254;

    pub fn parse(s: &str) -> Result<Self, Reason> {
        if s.len() > Self::MAX_LEN {
            return Err(format!("must be at most {} characters", Self::MAX_LEN));
        }
        let opts = email_address::Options::default()
            .without_display_text()
            .without_domain_literal()
            .with_required_tld();
        let parsed = email_address::EmailAddress::parse_with_options(s, opts)
            .map_err(|e| format!("is not a valid email address ({e})"))?;
        if has_control(s, false) || s.chars().any(char::is_whitespace) {
            return Err("is not a valid email address (whitespace or control characters)".into());
        }
        let normalised = format!("{}@{}", parsed.local_part(), parsed.domain().to_lowercase());
        // What is stored must parse as itself again: lower-casing can turn a
        // valid domain into an invalid one (`İ` becomes `i` and a combining
        // dot) or make the address longer.
        if normalised.len() > Self::MAX_LEN
            || email_address::EmailAddress::parse_with_options(&normalised, opts).is_err()
        {
            return Err(
                "is not a valid email address (its domain is not valid once lower-cased)".into(),
            );
        }
        Ok(Self(normalised))
    }

    pub fn from_stored(s: String) -> Self {
        Self(s)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The form uniqueness and lookups compare: the whole address lower-cased.
    pub fn key(&self) -> String {
        self.0.to_lowercase()
    }
}

/// A phone number in E.164 form.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PhoneNumber(String);

impl PhoneNumber {
    pub fn parse(s: &str) -> Result<Self, Reason> {
        if s.chars().count() > 64 {
            return Err("must be at most 64 characters".into());
        }
        if !s.trim_start().starts_with('+') {
            return Err("must start with + and the country code (E.164, e.g. +4712345678)".into());
        }
        // The parser has a history of panics on odd input: a panic refuses
        // the number instead of failing the whole call.
        std::panic::catch_unwind(|| Self::parse_e164(s))
            .unwrap_or_else(|_| Err("is not a valid phone number (it cannot be parsed)".into()))
    }

    fn parse_e164(s: &str) -> Result<Self, Reason> {
        let e164 = Self::normalise(s)?;
        // The stored form must read back as itself: the parser strips
        // national prefixes, and for some inputs (`+810000000001`) a second
        // pass would strip again or refuse what the first pass produced.
        match Self::normalise(&e164) {
            Ok(again) if again == e164 => Ok(Self(e164)),
            _ => Err("is not a valid phone number (it has no stable E.164 form)".into()),
        }
    }

    fn normalise(s: &str) -> Result<String, Reason> {
        let n = phonenumber::parse(None, s)
            .map_err(|e| format!("is not a valid phone number ({e})"))?;
        if !phonenumber::is_valid(&n) && !has_possible_length(&n) {
            return Err("is not a valid phone number for its country code".into());
        }
        if n.extension().is_some() {
            return Err("must not carry an extension".into());
        }
        Ok(n.format().mode(phonenumber::Mode::E164).to_string())
    }

    pub fn from_stored(s: String) -> Self {
        Self(s)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Whether the national number has a length that numbers of its country have.
/// Accepting these besides numbers that match a known range keeps newly
/// assigned ranges (and documentation numbers) usable when the library's
/// metadata lags behind the numbering plans.
fn has_possible_length(n: &phonenumber::PhoneNumber) -> bool {
    let len = n.national().to_string().len();
    phonenumber::metadata::DATABASE
        .by_code(&n.code().value())
        .unwrap_or_default()
        .iter()
        .any(|meta| {
            let d = meta.descriptors();
            [
                Some(d.general()),
                d.fixed_line(),
                d.mobile(),
                d.toll_free(),
                d.premium_rate(),
                d.shared_cost(),
                d.personal_number(),
                d.voip(),
                d.pager(),
                d.uan(),
                d.voicemail(),
            ]
            .into_iter()
            .flatten()
            .any(|desc| {
                desc.possible_length()
                    .iter()
                    .any(|l| usize::from(*l) == len)
            })
        })
}

/// A login name: 3 to 64 of `[a-z0-9._-]`, lower-cased.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Username(String);

impl Username {
    pub fn parse(s: &str) -> Result<Self, Reason> {
        let lower = s.to_lowercase();
        let n = lower.chars().count();
        if !(3..=64).contains(&n) {
            return Err(format!("must be 3 to 64 characters (got {n})"));
        }
        if !lower
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'))
        {
            return Err("may contain only letters, digits, '.', '_' and '-'".into());
        }
        Ok(Self(lower))
    }

    pub fn from_stored(s: String) -> Self {
        Self(s)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An identifier from another system, compared exactly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalId(String);

impl ExternalId {
    pub fn parse(s: &str) -> Result<Self, Reason> {
        check_text(s, 255, false)?;
        Ok(Self(s.to_owned()))
    }

    pub fn from_stored(s: String) -> Self {
        Self(s)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A BCP-47 language tag in canonical case.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Locale(String);

impl Locale {
    pub fn parse(s: &str) -> Result<Self, Reason> {
        if s.len() > 85 {
            return Err("must be at most 85 characters".into());
        }
        let loc = icu_locale_core::Locale::try_from_str(s)
            .map_err(|_| "is not a well-formed BCP-47 language tag (e.g. en-US)".to_string())?;
        Ok(Self(loc.to_string()))
    }

    pub fn from_stored(s: String) -> Self {
        Self(s)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An absolute http(s) URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PictureUri(String);

impl PictureUri {
    pub fn parse(s: &str) -> Result<Self, Reason> {
        if s.len() > 2048 {
            return Err("must be at most 2048 characters".into());
        }
        let url = url::Url::parse(s).map_err(|e| format!("is not an absolute URL ({e})"))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
            return Err("must be an http or https URL with a host".into());
        }
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("must not contain whitespace or control characters".into());
        }
        Ok(Self(s.to_owned()))
    }

    pub fn from_stored(s: String) -> Self {
        Self(s)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A complete calendar date that is not in the future.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Birthday(NaiveDate);

impl Birthday {
    pub fn parse(year: i32, month: i32, day: i32) -> Result<Self, Reason> {
        if year < 1 || month < 1 || day < 1 {
            return Err("must be a complete date: year, month and day all set".into());
        }
        let date = u32::try_from(month)
            .ok()
            .zip(u32::try_from(day).ok())
            .and_then(|(m, d)| NaiveDate::from_ymd_opt(year, m, d))
            .ok_or_else(|| format!("{year:04}-{month:02}-{day:02} is not a real date"))?;
        // The most advanced time zone is UTC+14: a birthday that is "today"
        // anywhere on Earth is accepted.
        let latest = (chrono::Utc::now() + chrono::Duration::hours(14)).date_naive();
        if date > latest {
            return Err("must not be in the future".into());
        }
        Ok(Self(date))
    }

    /// Stored as `YYYY-MM-DD`, which sorts like the date.
    pub fn from_stored(s: &str) -> Option<Self> {
        NaiveDate::parse_from_str(s, "%Y-%m-%d").ok().map(Self)
    }

    pub fn to_stored(self) -> String {
        self.0.format("%Y-%m-%d").to_string()
    }

    pub fn ymd(self) -> (i32, i32, i32) {
        (self.0.year(), self.0.month() as i32, self.0.day() as i32)
    }
}

/// A tag or role: 1 to 64 of `[A-Za-z0-9:._-]`.
pub fn check_label(s: &str) -> Result<(), Reason> {
    if s.is_empty() || s.len() > 64 {
        return Err(format!(
            "must be 1 to 64 characters (got {})",
            s.chars().count()
        ));
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, ':' | '.' | '_' | '-'))
    {
        return Err("may contain only letters, digits, ':', '.', '_' and '-'".into());
    }
    Ok(())
}

/// A metadata key: 1 to 64 of `[A-Za-z0-9_.-]`.
pub fn check_metadata_key(s: &str) -> Result<(), Reason> {
    if s.is_empty() || s.len() > 64 {
        return Err(format!(
            "metadata keys must be 1 to 64 characters (got {})",
            s.chars().count()
        ));
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err("metadata keys may contain only letters, digits, '.', '_' and '-'".into());
    }
    Ok(())
}

/// An ISO 3166-1 alpha-2 code, upper-cased.
pub fn parse_country_code(s: &str) -> Result<String, Reason> {
    isocountry::CountryCode::for_alpha2_caseless(s)
        .map(|c| c.alpha2().to_owned())
        .map_err(|_| "must be an ISO 3166-1 alpha-2 country code (e.g. NO, US)".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_ids() {
        assert!(ProjectId::parse("acme").is_ok());
        assert!(ProjectId::parse("a").is_ok());
        assert!(ProjectId::parse(&"a".repeat(63)).is_ok());
        assert!(ProjectId::parse(&"a".repeat(64)).is_err());
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", "ä"] {
            assert!(ProjectId::parse(bad).is_err(), "{bad}");
        }
        let id = UserId::generate();
        assert!(UserId::parse(id.as_str()).is_ok());
        assert_eq!(id.as_str().len(), 36);
        assert_eq!(
            uuid::Uuid::parse_str(id.as_str())
                .unwrap()
                .get_version_num(),
            7
        );
    }

    #[test]
    fn names() {
        let n = UserName::parse("projects/p1/users/u-1").unwrap();
        assert_eq!(n.project.as_str(), "p1");
        assert_eq!(n.user.as_str(), "u-1");
        assert_eq!(n.to_string(), "projects/p1/users/u-1");
        for bad in [
            "",
            "projects/p1",
            "projects/p1/users/",
            "projects//users/u",
            "projects/p1/users/u/x",
            "project/p1/users/u",
            "projects/P1/users/u",
        ] {
            assert!(UserName::parse(bad).is_err(), "{bad}");
        }
        assert!(ProjectId::parse_parent("projects/p1").is_ok());
        assert!(ProjectId::parse_parent("projects/p1/users").is_err());
        assert!(ProjectId::parse_parent("p1").is_err());
    }

    #[test]
    fn emails_lowercase_the_domain_only() {
        let e = Email::parse("Ann.Lee@Example.COM").unwrap();
        assert_eq!(e.as_str(), "Ann.Lee@example.com");
        assert_eq!(e.key(), "ann.lee@example.com");
        for bad in [
            "",
            "plain",
            "a@b",
            "a@[127.0.0.1]",
            "Ann <a@example.com>",
            "a b@example.com",
            "a@example.com\n",
        ] {
            assert!(Email::parse(bad).is_err(), "{bad:?}");
        }
        let long = format!("{}@example.com", "a".repeat(250));
        assert!(Email::parse(&long).is_err());
    }

    #[test]
    fn phone_numbers_normalise_to_e164() {
        assert_eq!(
            PhoneNumber::parse("+1 (212) 555-0100").unwrap().as_str(),
            "+12125550100"
        );
        assert_eq!(
            PhoneNumber::parse("+47 123 45 678").unwrap().as_str(),
            "+4712345678"
        );
        assert_eq!(
            PhoneNumber::parse("+47 412 34 567").unwrap().as_str(),
            "+4741234567"
        );
        for bad in [
            "",
            "12125550100",
            "+1",
            "+999 1234",
            "hello",
            "+1 212 555 0100 ext. 5",
        ] {
            assert!(PhoneNumber::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn usernames_lowercase() {
        assert_eq!(Username::parse("Ann.Lee_1").unwrap().as_str(), "ann.lee_1");
        for bad in ["ab", &"a".repeat(65), "ann lee", "ann@x", "änn"] {
            assert!(Username::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn locales_canonical_case() {
        assert_eq!(Locale::parse("en-us").unwrap().as_str(), "en-US");
        assert_eq!(Locale::parse("ZH-hant-tw").unwrap().as_str(), "zh-Hant-TW");
        assert_eq!(Locale::parse("nb").unwrap().as_str(), "nb");
        for bad in ["", "english", "en-", "12"] {
            assert!(Locale::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn picture_uris() {
        assert!(PictureUri::parse("https://cdn.example.com/a.png").is_ok());
        for bad in [
            "",
            "/a.png",
            "ftp://x.example/a",
            "https://",
            "javascript:alert(1)",
        ] {
            assert!(PictureUri::parse(bad).is_err(), "{bad}");
        }
        assert!(PictureUri::parse(&format!("https://x.example/{}", "a".repeat(2048))).is_err());
    }

    #[test]
    fn birthdays() {
        assert_eq!(
            Birthday::parse(1990, 2, 28).unwrap().to_stored(),
            "1990-02-28"
        );
        assert!(Birthday::parse(2000, 2, 29).is_ok());
        assert!(Birthday::parse(1999, 2, 29).is_err());
        assert!(Birthday::parse(0, 1, 1).is_err());
        assert!(Birthday::parse(1990, 0, 1).is_err());
        assert!(Birthday::parse(1990, 13, 1).is_err());
        assert!(Birthday::parse(9999, 1, 1).is_err());
    }

    #[test]
    fn text_and_labels() {
        assert!(check_text(&"é".repeat(200), 200, false).is_ok());
        assert!(check_text(&"é".repeat(201), 200, false).is_err());
        assert!(check_text("a\nb", 200, false).is_err());
        assert!(check_text("a\nb\tc", 200, true).is_ok());
        assert!(check_text("a\0b", 200, true).is_err());
        assert!(check_label("role:admin.v1_x-y").is_ok());
        assert!(check_label("").is_err());
        assert!(check_label("a b").is_err());
        assert!(check_metadata_key("plan").is_ok());
        assert!(check_metadata_key("a:b").is_err());
        assert_eq!(parse_country_code("no").unwrap(), "NO");
        assert!(parse_country_code("XX").is_err());
    }

    #[test]
    fn timestamps() {
        assert_eq!(Timestamp::from_parts(1, 5).unwrap().nanos(), 1_000_000_005);
        assert!(Timestamp::from_parts(-1, 0).is_err());
        assert!(Timestamp::from_parts(i64::MAX, 0).is_err());
        assert!(Timestamp::from_parts(0, 1_000_000_000).is_err());
        assert_eq!(
            Timestamp::from_nanos(1_500_000_000).seconds_and_nanos(),
            (1, 500_000_000)
        );
    }
}
