//! Index terms: the rows of `user_terms` that make filters on lists and maps
//! (tags, roles, metadata, secondary contacts), email suffixes and
//! case-insensitive prefix search answerable from a B-tree.
//!
//! These are the rules as migration 2 (`user_terms`) backfilled them, and
//! they stay so: an old migration must give the same result on any later
//! build. Never edit this file. When the rules change, `terms` gets its own
//! definition and a new migration re-indexes the stored users with it.
//! Terms are compared byte-wise (SQLite BINARY, PostgreSQL `COLLATE "C"`), so
//! a prefix is a range `[p, p + U+10FFFF)`.

use std::collections::BTreeSet;

/// One tag of `tags`, as stored.
pub const TAG: i16 = 1;
/// One role of `roles`, as stored.
pub const ROLE: i16 = 2;
/// One `metadata` entry, as `metadata_term(key, value)`.
pub const METADATA: i16 = 3;
/// A lower-cased search field (email, phone number, username, display,
/// given and family name).
pub const SEARCH: i16 = 4;
/// The lower-cased primary email, reversed, so that `*@example.com` is a
/// prefix range.
pub const EMAIL_REVERSED: i16 = 5;
/// A lower-cased secondary email.
pub const SECONDARY_EMAIL: i16 = 6;
/// A secondary phone number (E.164).
pub const SECONDARY_PHONE: i16 = 7;

/// The indexed fields of one user, as stored.
pub struct Indexed<'a> {
    pub email_key: Option<&'a str>,
    pub phone_number: Option<&'a str>,
    pub username: Option<&'a str>,
    pub display_name: &'a str,
    pub given_name: &'a str,
    pub family_name: &'a str,
    pub tags: &'a [String],
    pub roles: &'a [String],
    pub metadata: Vec<(&'a str, &'a str)>,
    pub secondary_emails: &'a [String],
    pub secondary_phone_numbers: &'a [String],
}

/// How search text and queries are folded: Unicode lower case.
pub fn fold(s: &str) -> String {
    s.to_lowercase()
}

/// A string reversed by characters.
pub fn reversed(s: &str) -> String {
    s.chars().rev().collect()
}

/// The term of one metadata entry. `=` cannot occur in a key, so the terms of
/// one key are exactly those starting with `key=`.
pub fn metadata_term(key: &str, value: &str) -> String {
    format!("{key}={value}")
}

/// Every (kind, term) of a user, without duplicates.
pub fn terms(u: &Indexed<'_>) -> BTreeSet<(i16, String)> {
    let mut out = BTreeSet::new();
    for t in u.tags {
        out.insert((TAG, t.clone()));
    }
    for r in u.roles {
        out.insert((ROLE, r.clone()));
    }
    for (k, v) in &u.metadata {
        out.insert((METADATA, metadata_term(k, v)));
    }
    let searchable = [
        u.email_key.unwrap_or_default(),
        u.phone_number.unwrap_or_default(),
        u.username.unwrap_or_default(),
        u.display_name,
        u.given_name,
        u.family_name,
    ];
    for s in searchable.into_iter().filter(|s| !s.is_empty()) {
        out.insert((SEARCH, fold(s)));
    }
    if let Some(e) = u.email_key {
        out.insert((EMAIL_REVERSED, reversed(e)));
    }
    for e in u.secondary_emails {
        out.insert((SECONDARY_EMAIL, fold(e)));
    }
    for p in u.secondary_phone_numbers {
        out.insert((SECONDARY_PHONE, p.clone()));
    }
    out
}
