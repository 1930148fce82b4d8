//! The user model and the rules of changing it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::values::{
    Birthday, Email, ExternalId, Locale, PhoneNumber, PictureUri, ProjectId, Timestamp, UserId,
    UserName, Username,
};

pub const MAX_SECONDARY: usize = 10;
pub const MAX_ADDRESSES: usize = 10;
pub const MAX_ADDRESS_LINES: usize = 5;
pub const MAX_LABELS: usize = 100;
pub const MAX_METADATA: usize = 50;
pub const MAX_METADATA_VALUE: usize = 500;
pub const MAX_SHORT_TEXT: usize = 200;
pub const MAX_LONG_TEXT: usize = 4096;
pub const MAX_CUSTOM_DATA_BYTES: usize = 16 * 1024;

/// Lifecycle state; the numbers are those of the protobuf enum and of storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Pending = 1,
    Active = 2,
    Disabled = 3,
    Deleted = 4,
}

impl State {
    pub fn from_i32(n: i32) -> Option<Self> {
        Some(match n {
            1 => Self::Pending,
            2 => Self::Active,
            3 => Self::Disabled,
            4 => Self::Deleted,
            _ => return None,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AddressKind {
    Unspecified,
    Home,
    Work,
    Billing,
    Shipping,
    Other,
}

/// A validated postal address (its JSON form is also its storage form).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Address {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub label: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lines: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub locality: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub region: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub postal_code: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub country_code: String,
    pub kind: AddressKind,
}

/// Every field a caller can write. Absent values are `None`, empty strings or
/// empty collections.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Profile {
    pub email: Option<Email>,
    pub email_verified: bool,
    pub phone_number: Option<PhoneNumber>,
    pub phone_number_verified: bool,
    pub secondary_emails: Vec<Email>,
    pub secondary_phone_numbers: Vec<PhoneNumber>,
    pub username: Option<Username>,
    pub external_id: Option<ExternalId>,
    pub display_name: String,
    pub given_name: String,
    pub middle_name: String,
    pub family_name: String,
    pub title: String,
    pub birthday: Option<Birthday>,
    pub preferred_locale: Option<Locale>,
    pub picture_uri: Option<PictureUri>,
    pub addresses: Vec<Address>,
    pub bio: String,
    pub note: String,
    pub tags: Vec<String>,
    pub roles: Vec<String>,
    pub metadata: BTreeMap<String, String>,
    pub custom_data: Option<serde_json::Map<String, serde_json::Value>>,
    pub last_login_time: Option<Timestamp>,
}

macro_rules! fields {
    ($($variant:ident => $path:literal),* $(,)?) => {
        /// A writable top-level field, named as in the update mask.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Field { $($variant),* }

        impl Field {
            pub const ALL: &'static [Field] = &[$(Field::$variant),*];

            pub fn path(self) -> &'static str {
                match self { $(Field::$variant => $path),* }
            }

            pub fn from_path(p: &str) -> Option<Field> {
                match p { $($path => Some(Field::$variant),)* _ => None }
            }
        }
    };
}

fields! {
    Email => "email",
    EmailVerified => "email_verified",
    PhoneNumber => "phone_number",
    PhoneNumberVerified => "phone_number_verified",
    SecondaryEmails => "secondary_emails",
    SecondaryPhoneNumbers => "secondary_phone_numbers",
    Username => "username",
    ExternalId => "external_id",
    DisplayName => "display_name",
    GivenName => "given_name",
    MiddleName => "middle_name",
    FamilyName => "family_name",
    Title => "title",
    Birthday => "birthday",
    PreferredLocale => "preferred_locale",
    PictureUri => "picture_uri",
    Addresses => "addresses",
    Bio => "bio",
    Note => "note",
    Tags => "tags",
    Roles => "roles",
    Metadata => "metadata",
    CustomData => "custom_data",
    LastLoginTime => "last_login_time",
}

/// Fields the server owns; an update mask naming one is refused.
pub const OUTPUT_ONLY_PATHS: &[&str] = &[
    "name",
    "state",
    "create_time",
    "update_time",
    "delete_time",
    "purge_time",
    "etag",
];

/// One entry of an update mask over the fields `F` of a resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MaskPath<F> {
    Whole(F),
    /// `metadata.KEY`: set or remove one key.
    MetadataKey(String),
}

/// One entry of a User update mask.
pub type FieldPath = MaskPath<Field>;

impl MaskPath<Field> {
    pub fn field(&self) -> Field {
        match self {
            FieldPath::Whole(f) => *f,
            FieldPath::MetadataKey(_) => Field::Metadata,
        }
    }
}

impl Profile {
    /// About how many bytes the profile takes in memory (and, within a small
    /// factor, on the wire): what reads budget pages with.
    pub fn approx_bytes(&self) -> usize {
        fn json(v: &serde_json::Value) -> usize {
            16 + match v {
                serde_json::Value::String(s) => s.len(),
                serde_json::Value::Array(a) => a.iter().map(json).sum(),
                serde_json::Value::Object(o) => o.iter().map(|(k, v)| k.len() + json(v)).sum(),
                _ => 0,
            }
        }
        let opt = |s: Option<&str>| s.map_or(0, str::len);
        let list = |l: &[String]| l.iter().map(|x| x.len() + 24).sum::<usize>();
        512 + opt(self.email.as_ref().map(|e| e.as_str()))
            + opt(self.phone_number.as_ref().map(|p| p.as_str()))
            + self
                .secondary_emails
                .iter()
                .map(|e| e.as_str().len() + 24)
                .sum::<usize>()
            + self
                .secondary_phone_numbers
                .iter()
                .map(|p| p.as_str().len() + 24)
                .sum::<usize>()
            + opt(self.username.as_ref().map(|u| u.as_str()))
            + opt(self.external_id.as_ref().map(|x| x.as_str()))
            + self.display_name.len()
            + self.given_name.len()
            + self.middle_name.len()
            + self.family_name.len()
            + self.title.len()
            + opt(self.picture_uri.as_ref().map(|p| p.as_str()))
            + self
                .addresses
                .iter()
                .map(|a| {
                    64 + a.label.len()
                        + list(&a.lines)
                        + a.locality.len()
                        + a.region.len()
                        + a.postal_code.len()
                })
                .sum::<usize>()
            + self.bio.len()
            + self.note.len()
            + list(&self.tags)
            + list(&self.roles)
            + self
                .metadata
                .iter()
                .map(|(k, v)| k.len() + v.len() + 48)
                .sum::<usize>()
            + self
                .custom_data
                .as_ref()
                .map_or(0, |m| m.iter().map(|(k, v)| k.len() + json(v)).sum())
    }

    /// A user must be reachable: at least one of email and phone number.
    pub fn has_contact(&self) -> bool {
        self.email.is_some() || self.phone_number.is_some()
    }

    /// Copies the named fields from `from` into `self`.
    pub fn apply(&mut self, from: &Profile, paths: &[FieldPath]) {
        for path in paths {
            match path {
                FieldPath::MetadataKey(key) => match from.metadata.get(key) {
                    Some(v) => {
                        self.metadata.insert(key.clone(), v.clone());
                    }
                    None => {
                        self.metadata.remove(key);
                    }
                },
                FieldPath::Whole(field) => self.copy_field(from, *field),
            }
        }
    }

    /// The fields whose values differ between `self` and `other`.
    pub fn changed_fields(&self, other: &Profile) -> Vec<Field> {
        Field::ALL
            .iter()
            .copied()
            .filter(|f| !self.same_field(other, *f))
            .collect()
    }

    fn same_field(&self, o: &Profile, field: Field) -> bool {
        match field {
            Field::Email => self.email == o.email,
            Field::EmailVerified => self.email_verified == o.email_verified,
            Field::PhoneNumber => self.phone_number == o.phone_number,
            Field::PhoneNumberVerified => self.phone_number_verified == o.phone_number_verified,
            Field::SecondaryEmails => self.secondary_emails == o.secondary_emails,
            Field::SecondaryPhoneNumbers => {
                self.secondary_phone_numbers == o.secondary_phone_numbers
            }
            Field::Username => self.username == o.username,
            Field::ExternalId => self.external_id == o.external_id,
            Field::DisplayName => self.display_name == o.display_name,
            Field::GivenName => self.given_name == o.given_name,
            Field::MiddleName => self.middle_name == o.middle_name,
            Field::FamilyName => self.family_name == o.family_name,
            Field::Title => self.title == o.title,
            Field::Birthday => self.birthday == o.birthday,
            Field::PreferredLocale => self.preferred_locale == o.preferred_locale,
            Field::PictureUri => self.picture_uri == o.picture_uri,
            Field::Addresses => self.addresses == o.addresses,
            Field::Bio => self.bio == o.bio,
            Field::Note => self.note == o.note,
            Field::Tags => self.tags == o.tags,
            Field::Roles => self.roles == o.roles,
            Field::Metadata => self.metadata == o.metadata,
            Field::CustomData => self.custom_data == o.custom_data,
            Field::LastLoginTime => self.last_login_time == o.last_login_time,
        }
    }

    fn copy_field(&mut self, from: &Profile, field: Field) {
        match field {
            Field::Email => self.email = from.email.clone(),
            Field::EmailVerified => self.email_verified = from.email_verified,
            Field::PhoneNumber => self.phone_number = from.phone_number.clone(),
            Field::PhoneNumberVerified => self.phone_number_verified = from.phone_number_verified,
            Field::SecondaryEmails => self.secondary_emails = from.secondary_emails.clone(),
            Field::SecondaryPhoneNumbers => {
                self.secondary_phone_numbers = from.secondary_phone_numbers.clone()
            }
            Field::Username => self.username = from.username.clone(),
            Field::ExternalId => self.external_id = from.external_id.clone(),
            Field::DisplayName => self.display_name = from.display_name.clone(),
            Field::GivenName => self.given_name = from.given_name.clone(),
            Field::MiddleName => self.middle_name = from.middle_name.clone(),
            Field::FamilyName => self.family_name = from.family_name.clone(),
            Field::Title => self.title = from.title.clone(),
            Field::Birthday => self.birthday = from.birthday,
            Field::PreferredLocale => self.preferred_locale = from.preferred_locale.clone(),
            Field::PictureUri => self.picture_uri = from.picture_uri.clone(),
            Field::Addresses => self.addresses = from.addresses.clone(),
            Field::Bio => self.bio = from.bio.clone(),
            Field::Note => self.note = from.note.clone(),
            Field::Tags => self.tags = from.tags.clone(),
            Field::Roles => self.roles = from.roles.clone(),
            Field::Metadata => self.metadata = from.metadata.clone(),
            Field::CustomData => self.custom_data = from.custom_data.clone(),
            Field::LastLoginTime => self.last_login_time = from.last_login_time,
        }
    }
}

/// A stored user.
#[derive(Clone, Debug, PartialEq)]
pub struct User {
    pub project: ProjectId,
    pub id: UserId,
    pub profile: Profile,
    pub state: State,
    /// The state to restore on undelete.
    pub pre_delete_state: Option<State>,
    pub create_time: Timestamp,
    pub update_time: Timestamp,
    pub delete_time: Option<Timestamp>,
    pub purge_time: Option<Timestamp>,
    /// Incremented by every write; the database compares it to make writes
    /// conditional.
    pub revision: i64,
}

impl User {
    pub fn name(&self) -> UserName {
        UserName {
            project: self.project.clone(),
            user: self.id.clone(),
        }
    }

    /// Whether the user's retention has run out at `now`: it reads as gone
    /// whether or not the purge has erased it yet.
    pub fn is_purged_at(&self, now: Timestamp) -> bool {
        self.purge_time.is_some_and(|p| p <= now)
    }

    /// Opaque version tag: the revision plus the creation time, so that a user
    /// re-created under the same name never matches an etag of its predecessor.
    pub fn etag(&self) -> String {
        format!("W/\"{}-{:x}\"", self.revision, self.create_time.nanos())
    }

    /// Marks a write: bumps the revision and moves update_time forward.
    pub fn touch(&mut self, now: Timestamp) {
        self.revision += 1;
        self.update_time = now.max(Timestamp::from_nanos(self.update_time.nanos() + 1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_has_a_unique_path() {
        for f in Field::ALL {
            assert_eq!(Field::from_path(f.path()), Some(*f));
            assert!(!OUTPUT_ONLY_PATHS.contains(&f.path()));
        }
        assert_eq!(Field::from_path("nope"), None);
    }

    #[test]
    fn apply_copies_only_named_fields_and_metadata_keys() {
        let mut base = Profile {
            display_name: "Old".into(),
            given_name: "Keep".into(),
            metadata: [("a".to_string(), "1".to_string()), ("b".into(), "2".into())].into(),
            ..Profile::default()
        };
        let from = Profile {
            display_name: "New".into(),
            given_name: "Ignored".into(),
            metadata: [("a".to_string(), "9".to_string())].into(),
            ..Profile::default()
        };
        base.apply(
            &from,
            &[
                FieldPath::Whole(Field::DisplayName),
                FieldPath::MetadataKey("a".into()),
                FieldPath::MetadataKey("b".into()),
            ],
        );
        assert_eq!(base.display_name, "New");
        assert_eq!(base.given_name, "Keep");
        assert_eq!(base.metadata, [("a".to_string(), "9".to_string())].into());
    }
}
