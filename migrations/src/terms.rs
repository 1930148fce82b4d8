//! The index-term rules the service writes with every user (see
//! `terms_v1` for what a term is). Today they are exactly version 1, the
//! rules migration 2 backfilled with; a change of the rules is made here,
//! with a migration that re-indexes the stored users, and never in
//! `terms_v1`.

pub use crate::terms_v1::*;

/// A prefix of search text folded so that every text starting with it
/// folds to a text starting with the result. Folding lower-cases character
/// by character except a capital sigma, whose lower case depends on what
/// follows it (`Σ` ends a word as `ς`, else `σ`): the prefix is cut before
/// the first one.
pub fn fold_prefix(p: &str) -> String {
    p.chars()
        .take_while(|c| *c != '\u{03A3}')
        .flat_map(char::to_lowercase)
        .collect()
}
