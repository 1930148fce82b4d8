//! Conversions between protobuf messages and domain values. Parsing from the
//! wire collects every violation with its path in the request.

use std::collections::{BTreeMap, HashSet};

use prost::Message;
use prost_types::{ListValue, Struct, Value, value::Kind};
use serde_json::{Map as JsonMap, Number, Value as Json};

use crate::domain::user::{
    MAX_ADDRESS_LINES, MAX_ADDRESSES, MAX_CUSTOM_DATA_BYTES, MAX_LABELS, MAX_LONG_TEXT,
    MAX_METADATA, MAX_METADATA_VALUE, MAX_SECONDARY, MAX_SHORT_TEXT, MaskPath,
};
use crate::domain::values::{
    check_label, check_metadata_key, check_text, clip, parse_country_code,
};
use crate::domain::{
    Address, AddressKind, Birthday, Email, ExternalId, Field, FieldPath, Locale, PhoneNumber,
    PictureUri, Profile, State, Timestamp, User, Username, Violations,
};
use crate::proto::google::r#type::Date;
use crate::proto::users::v1 as pb;

fn nonempty(s: &str) -> Option<&str> {
    if s.is_empty() { None } else { Some(s) }
}

/// How far into the future a reported last login may lie (clock skew).
const LOGIN_SKEW_NANOS: i64 = 24 * 3600 * 1_000_000_000;

/// Parses the fields of `u` for which `selected` holds; the others are left
/// empty and not validated (an update ignores fields outside its mask).
pub fn parse_profile(
    u: &pb::User,
    prefix: &str,
    selected: &dyn Fn(Field) -> bool,
    v: &mut Violations,
) -> Profile {
    let path = |f: &str| format!("{prefix}.{f}");
    let mut p = Profile::default();

    if selected(Field::Email) {
        p.email = nonempty(&u.email).and_then(|s| v.check(|| path("email"), Email::parse(s)));
    }
    if selected(Field::EmailVerified) {
        p.email_verified = u.email_verified;
    }
    if selected(Field::PhoneNumber) {
        p.phone_number = nonempty(&u.phone_number)
            .and_then(|s| v.check(|| path("phone_number"), PhoneNumber::parse(s)));
    }
    if selected(Field::PhoneNumberVerified) {
        p.phone_number_verified = u.phone_number_verified;
    }
    if selected(Field::SecondaryEmails) {
        let field = path("secondary_emails");
        p.secondary_emails = parse_list(&u.secondary_emails, &field, MAX_SECONDARY, v, |s| {
            Email::parse(s).map(|e| (e.key(), e))
        });
    }
    if selected(Field::SecondaryPhoneNumbers) {
        let field = path("secondary_phone_numbers");
        p.secondary_phone_numbers =
            parse_list(&u.secondary_phone_numbers, &field, MAX_SECONDARY, v, |s| {
                PhoneNumber::parse(s).map(|n| (n.as_str().to_owned(), n))
            });
    }
    if selected(Field::Username) {
        p.username =
            nonempty(&u.username).and_then(|s| v.check(|| path("username"), Username::parse(s)));
    }
    if selected(Field::ExternalId) {
        p.external_id = nonempty(&u.external_id)
            .and_then(|s| v.check(|| path("external_id"), ExternalId::parse(s)));
    }
    let short = |v: &mut Violations, name: &str, s: &str| -> String {
        v.check(|| path(name), check_text(s, MAX_SHORT_TEXT, false))
            .map(|_| s.to_owned())
            .unwrap_or_default()
    };
    if selected(Field::DisplayName) {
        p.display_name = short(v, "display_name", &u.display_name);
    }
    if selected(Field::GivenName) {
        p.given_name = short(v, "given_name", &u.given_name);
    }
    if selected(Field::MiddleName) {
        p.middle_name = short(v, "middle_name", &u.middle_name);
    }
    if selected(Field::FamilyName) {
        p.family_name = short(v, "family_name", &u.family_name);
    }
    if selected(Field::Title) {
        p.title = short(v, "title", &u.title);
    }
    if selected(Field::Birthday) {
        p.birthday = u
            .birthday
            .as_ref()
            .filter(|d| (d.year, d.month, d.day) != (0, 0, 0))
            .and_then(|d| v.check(|| path("birthday"), Birthday::parse(d.year, d.month, d.day)));
    }
    if selected(Field::PreferredLocale) {
        p.preferred_locale = nonempty(&u.preferred_locale)
            .and_then(|s| v.check(|| path("preferred_locale"), Locale::parse(s)));
    }
    if selected(Field::PictureUri) {
        p.picture_uri = nonempty(&u.picture_uri)
            .and_then(|s| v.check(|| path("picture_uri"), PictureUri::parse(s)));
    }
    if selected(Field::Addresses) {
        p.addresses = parse_addresses(&u.addresses, &path("addresses"), v);
    }
    let long = |v: &mut Violations, name: &str, s: &str| -> String {
        v.check(|| path(name), check_text(s, MAX_LONG_TEXT, true))
            .map(|_| s.to_owned())
            .unwrap_or_default()
    };
    if selected(Field::Bio) {
        p.bio = long(v, "bio", &u.bio);
    }
    if selected(Field::Note) {
        p.note = long(v, "note", &u.note);
    }
    if selected(Field::Tags) {
        p.tags = parse_list(&u.tags, &path("tags"), MAX_LABELS, v, |s| {
            check_label(s).map(|_| (s.to_owned(), s.to_owned()))
        });
    }
    if selected(Field::Roles) {
        p.roles = parse_list(&u.roles, &path("roles"), MAX_LABELS, v, |s| {
            check_label(s).map(|_| (s.to_owned(), s.to_owned()))
        });
    }
    if selected(Field::Metadata) {
        p.metadata = parse_metadata(&u.metadata, &path("metadata"), v);
    }
    if selected(Field::CustomData) {
        p.custom_data = u
            .custom_data
            .as_ref()
            .and_then(|s| v.check(|| path("custom_data"), struct_to_json(s)));
    }
    if selected(Field::LastLoginTime) {
        p.last_login_time = u.last_login_time.as_ref().and_then(|t| {
            let latest = Timestamp::now().nanos().saturating_add(LOGIN_SKEW_NANOS);
            let parsed = Timestamp::from_parts(t.seconds, t.nanos).and_then(|ts| {
                if ts.nanos() > latest {
                    Err("must not be more than 24 hours in the future".into())
                } else {
                    Ok(ts)
                }
            });
            v.check(|| path("last_login_time"), parsed)
        });
    }
    p
}

/// Parses a repeated field of at most `max` entries: each item validated,
/// duplicates (by the key the parser returns) dropped keeping the first.
fn parse_list<T>(
    items: &[String],
    field: &str,
    max: usize,
    v: &mut Violations,
    parse: impl Fn(&str) -> Result<(String, T), String>,
) -> Vec<T> {
    // Counted before anything is validated: the cost of a refusal does not
    // grow with what was sent.
    if items.len() > max {
        v.push(
            field,
            format!("at most {max} entries are allowed (got {})", items.len()),
        );
        return Vec::new();
    }
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (i, s) in items.iter().enumerate() {
        if let Some((key, item)) = v.check(|| format!("{field}[{i}]"), parse(s))
            && seen.insert(key)
        {
            out.push(item);
        }
    }
    out
}

fn parse_addresses(items: &[pb::Address], field: &str, v: &mut Violations) -> Vec<Address> {
    if items.len() > MAX_ADDRESSES {
        v.push(
            field,
            format!(
                "at most {MAX_ADDRESSES} addresses are allowed (got {})",
                items.len()
            ),
        );
        return Vec::new();
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, a) in items.iter().enumerate() {
        let at = |f: &str| format!("{field}[{i}].{f}");
        let text = |v: &mut Violations, f: &str, s: &str, max: usize| {
            v.check(|| at(f), check_text(s, max, false))
                .map(|_| s.to_owned())
                .unwrap_or_default()
        };
        let too_many_lines = a.lines.len() > MAX_ADDRESS_LINES;
        if too_many_lines {
            v.push(
                at("lines"),
                format!(
                    "at most {MAX_ADDRESS_LINES} lines are allowed (got {})",
                    a.lines.len()
                ),
            );
        }
        let lines = a
            .lines
            .get(..if too_many_lines { 0 } else { a.lines.len() })
            .unwrap_or_default()
            .iter()
            .enumerate()
            .map(|(j, l)| {
                v.check(
                    || format!("{field}[{i}].lines[{j}]"),
                    check_text(l, MAX_SHORT_TEXT, false),
                )
                .map(|_| l.clone())
                .unwrap_or_default()
            })
            .collect();
        let country_code = if a.country_code.is_empty() {
            String::new()
        } else {
            v.check(|| at("country_code"), parse_country_code(&a.country_code))
                .unwrap_or_default()
        };
        let kind = match pb::address::Kind::try_from(a.kind) {
            Ok(pb::address::Kind::Unspecified) => AddressKind::Unspecified,
            Ok(pb::address::Kind::Home) => AddressKind::Home,
            Ok(pb::address::Kind::Work) => AddressKind::Work,
            Ok(pb::address::Kind::Billing) => AddressKind::Billing,
            Ok(pb::address::Kind::Shipping) => AddressKind::Shipping,
            Ok(pb::address::Kind::Other) => AddressKind::Other,
            Err(_) => {
                v.push(
                    at("kind"),
                    format!("{} is not a known address kind", a.kind),
                );
                AddressKind::Unspecified
            }
        };
        out.push(Address {
            label: text(v, "label", &a.label, MAX_SHORT_TEXT),
            lines,
            locality: text(v, "locality", &a.locality, MAX_SHORT_TEXT),
            region: text(v, "region", &a.region, MAX_SHORT_TEXT),
            postal_code: text(v, "postal_code", &a.postal_code, 32),
            country_code,
            kind,
        });
    }
    out
}

pub(super) fn parse_metadata(
    m: &BTreeMap<String, String>,
    field: &str,
    v: &mut Violations,
) -> BTreeMap<String, String> {
    if m.len() > MAX_METADATA {
        v.push(
            field,
            format!("at most {MAX_METADATA} keys are allowed (got {})", m.len()),
        );
        return BTreeMap::new();
    }
    let mut out = BTreeMap::new();
    for (k, val) in m {
        let at = || format!("{field}[{:?}]", clip(k));
        let key_ok = v.check(at, check_metadata_key(k)).is_some();
        let val_ok = v
            .check(at, check_text(val, MAX_METADATA_VALUE, true))
            .is_some();
        if key_ok && val_ok {
            out.insert(k.clone(), val.clone());
        }
    }
    out
}

/// `google.protobuf.Struct` to JSON, refusing what JSON cannot hold and
/// anything over the size limit.
pub fn struct_to_json(s: &Struct) -> Result<JsonMap<String, Json>, String> {
    let size = s.encoded_len();
    if size > MAX_CUSTOM_DATA_BYTES {
        return Err(format!(
            "must be at most {MAX_CUSTOM_DATA_BYTES} bytes encoded (got {size})"
        ));
    }
    fn value(v: &Value) -> Result<Json, String> {
        Ok(match &v.kind {
            None | Some(Kind::NullValue(_)) => Json::Null,
            Some(Kind::BoolValue(b)) => Json::Bool(*b),
            Some(Kind::NumberValue(n)) => Json::Number(
                Number::from_f64(*n).ok_or("numbers must be finite (no NaN or infinity)")?,
            ),
            Some(Kind::StringValue(s)) => Json::String(s.clone()),
            Some(Kind::ListValue(l)) => {
                Json::Array(l.values.iter().map(value).collect::<Result<_, _>>()?)
            }
            Some(Kind::StructValue(s)) => Json::Object(fields(s)?),
        })
    }
    fn fields(s: &Struct) -> Result<JsonMap<String, Json>, String> {
        s.fields
            .iter()
            .map(|(k, v)| Ok((k.clone(), value(v)?)))
            .collect()
    }
    fields(s)
}

pub fn json_to_struct(m: &JsonMap<String, Json>) -> Struct {
    fn value(j: &Json) -> Value {
        let kind = match j {
            Json::Null => Kind::NullValue(0),
            Json::Bool(b) => Kind::BoolValue(*b),
            Json::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
            Json::String(s) => Kind::StringValue(s.clone()),
            Json::Array(a) => Kind::ListValue(ListValue {
                values: a.iter().map(value).collect(),
            }),
            Json::Object(o) => Kind::StructValue(json_to_struct(o)),
        };
        Value { kind: Some(kind) }
    }
    Struct {
        fields: m.iter().map(|(k, v)| (k.clone(), value(v))).collect(),
    }
}

pub(super) fn timestamp(t: Timestamp) -> prost_types::Timestamp {
    let (seconds, nanos) = t.seconds_and_nanos();
    prost_types::Timestamp { seconds, nanos }
}

pub fn state_to_proto(s: State) -> pb::user::State {
    match s {
        State::Pending => pb::user::State::Pending,
        State::Active => pb::user::State::Active,
        State::Disabled => pb::user::State::Disabled,
        State::Deleted => pb::user::State::Deleted,
    }
}

fn address_to_proto(a: &Address) -> pb::Address {
    let kind = match a.kind {
        AddressKind::Unspecified => pb::address::Kind::Unspecified,
        AddressKind::Home => pb::address::Kind::Home,
        AddressKind::Work => pb::address::Kind::Work,
        AddressKind::Billing => pb::address::Kind::Billing,
        AddressKind::Shipping => pb::address::Kind::Shipping,
        AddressKind::Other => pb::address::Kind::Other,
    };
    pb::Address {
        label: a.label.clone(),
        lines: a.lines.clone(),
        locality: a.locality.clone(),
        region: a.region.clone(),
        postal_code: a.postal_code.clone(),
        country_code: a.country_code.clone(),
        kind: kind as i32,
    }
}

pub fn user_to_proto(u: &User) -> pb::User {
    let Profile {
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
    } = &u.profile;
    let s = |o: Option<&str>| o.unwrap_or_default().to_owned();
    pb::User {
        name: u.name().to_string(),
        email: s(email.as_ref().map(Email::as_str)),
        email_verified: *email_verified,
        phone_number: s(phone_number.as_ref().map(PhoneNumber::as_str)),
        phone_number_verified: *phone_number_verified,
        secondary_emails: secondary_emails
            .iter()
            .map(|e| e.as_str().to_owned())
            .collect(),
        secondary_phone_numbers: secondary_phone_numbers
            .iter()
            .map(|e| e.as_str().to_owned())
            .collect(),
        username: s(username.as_ref().map(Username::as_str)),
        external_id: s(external_id.as_ref().map(ExternalId::as_str)),
        display_name: display_name.clone(),
        given_name: given_name.clone(),
        middle_name: middle_name.clone(),
        family_name: family_name.clone(),
        title: title.clone(),
        birthday: birthday.map(|b| {
            let (year, month, day) = b.ymd();
            Date { year, month, day }
        }),
        preferred_locale: s(preferred_locale.as_ref().map(Locale::as_str)),
        picture_uri: s(picture_uri.as_ref().map(PictureUri::as_str)),
        addresses: addresses.iter().map(address_to_proto).collect(),
        bio: bio.clone(),
        note: note.clone(),
        tags: tags.clone(),
        roles: roles.clone(),
        metadata: metadata.clone(),
        custom_data: custom_data.as_ref().map(json_to_struct),
        last_login_time: last_login_time.map(timestamp),
        state: state_to_proto(u.state) as i32,
        create_time: Some(timestamp(u.create_time)),
        update_time: Some(timestamp(u.update_time)),
        delete_time: u.delete_time.map(timestamp),
        purge_time: u.purge_time.map(timestamp),
        etag: u.etag(),
    }
}

/// The writable fields of `u` that hold a value: what an update without a mask
/// writes.
pub fn populated_fields(u: &pb::User) -> Vec<FieldPath> {
    let set = |f: Field| -> bool {
        match f {
            Field::Email => !u.email.is_empty(),
            Field::EmailVerified => u.email_verified,
            Field::PhoneNumber => !u.phone_number.is_empty(),
            Field::PhoneNumberVerified => u.phone_number_verified,
            Field::SecondaryEmails => !u.secondary_emails.is_empty(),
            Field::SecondaryPhoneNumbers => !u.secondary_phone_numbers.is_empty(),
            Field::Username => !u.username.is_empty(),
            Field::ExternalId => !u.external_id.is_empty(),
            Field::DisplayName => !u.display_name.is_empty(),
            Field::GivenName => !u.given_name.is_empty(),
            Field::MiddleName => !u.middle_name.is_empty(),
            Field::FamilyName => !u.family_name.is_empty(),
            Field::Title => !u.title.is_empty(),
            Field::Birthday => u.birthday.is_some(),
            Field::PreferredLocale => !u.preferred_locale.is_empty(),
            Field::PictureUri => !u.picture_uri.is_empty(),
            Field::Addresses => !u.addresses.is_empty(),
            Field::Bio => !u.bio.is_empty(),
            Field::Note => !u.note.is_empty(),
            Field::Tags => !u.tags.is_empty(),
            Field::Roles => !u.roles.is_empty(),
            Field::Metadata => !u.metadata.is_empty(),
            Field::CustomData => u.custom_data.is_some(),
            Field::LastLoginTime => u.last_login_time.is_some(),
        }
    };
    Field::ALL
        .iter()
        .copied()
        .filter(|f| set(*f))
        .map(FieldPath::Whole)
        .collect()
}

/// Most paths one update mask may hold: every field plus every metadata key
/// fits well below it.
pub const MAX_MASK_PATHS: usize = 100;
/// Longest path (`metadata.` and a 64-character key, quoted).
pub(super) const MAX_MASK_PATH_BYTES: usize = 80;

/// Parses the paths of a User update mask. `*` stands for every writable
/// field.
pub fn parse_mask(paths: &[String], v: &mut Violations) -> Vec<FieldPath> {
    use crate::domain::user::OUTPUT_ONLY_PATHS;
    parse_mask_of(
        paths,
        v,
        Field::ALL,
        Field::from_path,
        OUTPUT_ONLY_PATHS,
        "User",
    )
}

/// Parses the paths of an update mask over the writable fields `all` of a
/// resource (`what` names it in errors): snake_case or lowerCamelCase
/// paths, `metadata.KEY` (optionally backquoted), `*` alone for every field.
pub(super) fn parse_mask_of<F: Copy>(
    paths: &[String],
    v: &mut Violations,
    all: &[F],
    from_path: fn(&str) -> Option<F>,
    output_only: &[&str],
    what: &str,
) -> Vec<MaskPath<F>> {
    if paths.len() > MAX_MASK_PATHS {
        v.push(
            "update_mask.paths",
            format!(
                "at most {MAX_MASK_PATHS} paths are allowed (got {})",
                paths.len()
            ),
        );
        return Vec::new();
    }
    let mut out = Vec::new();
    for (i, raw) in paths.iter().enumerate() {
        let at = || format!("update_mask.paths[{i}]");
        let p = raw.trim();
        if p.len() > MAX_MASK_PATH_BYTES {
            v.push(
                at(),
                format!("a path is at most {MAX_MASK_PATH_BYTES} bytes long"),
            );
            continue;
        }
        if p == "*" {
            if paths.len() > 1 {
                v.push(at(), "`*` cannot be combined with other paths");
            }
            out.extend(all.iter().copied().map(MaskPath::Whole));
            continue;
        }
        if let Some(key) = p.strip_prefix("metadata.") {
            let key = key
                .strip_prefix('`')
                .and_then(|k| k.strip_suffix('`'))
                .unwrap_or(key);
            if let Some(key) = v.check(at, check_metadata_key(key).map(|_| key)) {
                out.push(MaskPath::MetadataKey(key.to_owned()));
            }
            continue;
        }
        let snake = snake_case(p);
        match from_path(p).or_else(|| from_path(&snake)) {
            Some(f) => out.push(MaskPath::Whole(f)),
            None if output_only.contains(&p) || output_only.contains(&snake.as_str()) => {
                v.push(at(), format!("`{p}` is output only and cannot be updated"))
            }
            None => v.push(
                at(),
                format!("`{p}` is not a field of {what} that can be updated"),
            ),
        }
    }
    out
}

/// `displayName` to `display_name`: JSON clients send lowerCamelCase paths.
pub(super) fn snake_case(p: &str) -> String {
    let mut out = String::with_capacity(p.len() + 4);
    for c in p.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// A stable fingerprint of a create request, for idempotency keys: the SHA-256
/// of its encoding without the key itself and without `validate_only`.
pub fn fingerprint(req: &pb::CreateUserRequest) -> String {
    let mut r = req.clone();
    r.request_id.clear();
    r.validate_only = false;
    sha256_hex(&[&r.encode_to_vec()])
}

/// As `fingerprint`, for a BatchCreateUsers request; the domain prefix keeps
/// it distinct from every CreateUser fingerprint.
pub fn batch_fingerprint(req: &pb::BatchCreateUsersRequest) -> String {
    let mut r = req.clone();
    r.request_id.clear();
    sha256_hex(&[b"batch:", &r.encode_to_vec()])
}

pub(super) fn sha256_hex(parts: &[&[u8]]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_roundtrip_and_limits() {
        let s = Struct {
            fields: [
                (
                    "n".to_string(),
                    Value {
                        kind: Some(Kind::NumberValue(1.5)),
                    },
                ),
                (
                    "l".to_string(),
                    Value {
                        kind: Some(Kind::ListValue(ListValue {
                            values: vec![Value {
                                kind: Some(Kind::StringValue("x".into())),
                            }],
                        })),
                    },
                ),
            ]
            .into(),
        };
        let j = struct_to_json(&s).unwrap();
        assert_eq!(json_to_struct(&j), s);
        let nan = Struct {
            fields: [(
                "n".to_string(),
                Value {
                    kind: Some(Kind::NumberValue(f64::NAN)),
                },
            )]
            .into(),
        };
        assert!(struct_to_json(&nan).is_err());
        let big = Struct {
            fields: [(
                "s".to_string(),
                Value {
                    kind: Some(Kind::StringValue("x".repeat(17 * 1024))),
                },
            )]
            .into(),
        };
        assert!(struct_to_json(&big).is_err());
    }

    #[test]
    fn masks() {
        let mut v = Violations::default();
        let paths = parse_mask(
            &[
                "display_name".into(),
                "metadata.plan".into(),
                "metadata.`a.b`".into(),
                "lastLoginTime".into(),
            ],
            &mut v,
        );
        assert!(v.is_empty());
        assert_eq!(
            paths,
            vec![
                FieldPath::Whole(Field::DisplayName),
                FieldPath::MetadataKey("plan".into()),
                FieldPath::MetadataKey("a.b".into()),
                FieldPath::Whole(Field::LastLoginTime),
            ]
        );
        let mut v = Violations::default();
        parse_mask(&["state".into(), "nope".into(), "metadata.".into()], &mut v);
        assert!(v.into_result().is_err());
    }

    #[test]
    fn lists_deduplicate_and_report_each_bad_item() {
        let mut v = Violations::default();
        let u = pb::User {
            tags: vec!["a".into(), "b".into(), "a".into(), "bad tag".into()],
            secondary_emails: vec!["X@EXAMPLE.com".into(), "x@example.COM".into()],
            ..Default::default()
        };
        let p = parse_profile(&u, "user", &|_| true, &mut v);
        assert_eq!(p.tags, vec!["a".to_string(), "b".to_string()]);
        assert_eq!(p.secondary_emails.len(), 1);
        let Err(crate::domain::DomainError::InvalidArgument {
            violations: list, ..
        }) = v.into_result()
        else {
            panic!("expected violations")
        };
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].field, "user.tags[3]");
    }
}
