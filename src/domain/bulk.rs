//! Rules shared by the bulk writes (BatchCreateUsers, ImportUsers): telling
//! apart users of one request that claim the same identifier, and
//! remembering what an import stored so that a repeat within the same import
//! is reported as such.

use std::collections::{HashMap, HashSet};

use super::error::{DomainError, Identifier};
use super::user::User;
use super::values::Email;

/// The identifiers of `u` that must be unique in its project, in the order a
/// conflict is reported (email first, the name last).
pub fn identifiers(u: &User) -> impl Iterator<Item = (Identifier, String)> + '_ {
    let p = &u.profile;
    [
        (Identifier::Email, p.email.as_ref().map(Email::key)),
        (
            Identifier::PhoneNumber,
            p.phone_number.as_ref().map(|v| v.as_str().to_owned()),
        ),
        (
            Identifier::Username,
            p.username.as_ref().map(|v| v.as_str().to_owned()),
        ),
        (
            Identifier::ExternalId,
            p.external_id.as_ref().map(|v| v.as_str().to_owned()),
        ),
        (Identifier::Name, Some(u.id.as_str().to_owned())),
    ]
    .into_iter()
    .filter_map(|(id, v)| v.map(|v| (id, v)))
}

/// The identifiers claimed so far by the users of one request.
#[derive(Default)]
pub struct Claims(HashMap<(Identifier, String), u64>);

impl Claims {
    /// Claims every identifier of `u` for `position`, unless an earlier user
    /// already holds one: then nothing is claimed and that identifier and the
    /// earlier position are returned.
    pub fn claim(&mut self, position: u64, u: &User) -> Option<(Identifier, u64)> {
        let ids: Vec<(Identifier, String)> = identifiers(u).collect();
        for key in &ids {
            if let Some(earlier) = self.0.get(key) {
                return Some((key.0, *earlier));
            }
        }
        for key in ids {
            self.0.insert(key, position);
        }
        None
    }
}

/// What one import stream has stored: the create time of each of its chunks.
/// Every user of a chunk gets the chunk's create time, so a stored user whose
/// create time is one of these was stored by this import.
#[derive(Default)]
pub struct ImportLog {
    chunk_times: HashSet<i64>,
    last: i64,
}

impl ImportLog {
    /// A create time for the next chunk, distinct from every earlier one.
    pub(crate) fn next_time(&mut self, now: i64) -> i64 {
        let t = now.max(self.last + 1);
        self.last = t;
        t
    }

    pub(crate) fn record(&mut self, time: i64) {
        self.chunk_times.insert(time);
    }

    pub(crate) fn stored_here(&self, create_time: i64) -> bool {
        self.chunk_times.contains(&create_time)
    }
}

/// The result of one committed import chunk.
#[derive(Debug, Default)]
pub struct ChunkOutcome {
    pub created: u64,
    /// Users not stored, by their index in the import.
    pub failures: Vec<(u64, DomainError)>,
}
