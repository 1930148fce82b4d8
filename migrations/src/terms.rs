//! The index-term rules the service writes with every user (see
//! `terms_v1` for what a term is). Today they are exactly version 1, the
//! rules migration 2 backfilled with; a change of the rules is made here,
//! with a migration that re-indexes the stored users, and never in
//! `terms_v1`.

pub use crate::terms_v1::*;
