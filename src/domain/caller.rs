//! Who is calling and what they may do: the projects and scopes a verified
//! token grants. Every RPC names the scope it needs and checks the project of
//! its parent or name *before* it reads anything, so a caller learns nothing
//! about a project it was not granted.

use std::collections::BTreeSet;
use std::fmt;

use super::error::DomainError;
use super::values::ProjectId;

/// A permission a token's `scope` claim grants. Scopes are independent: one
/// does not imply another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// get, lookup, list, search, count, batch get, stream.
    Read,
    /// create, update, delete, undelete, state changes, batch create.
    Write,
    /// force erase and import.
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Scope::Read, Scope::Write, Scope::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "users.read",
            Scope::Write => "users.write",
            Scope::Admin => "users.admin",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|x| x.as_str() == s)
    }

    fn bit(self) -> u8 {
        match self {
            Scope::Read => 1,
            Scope::Write => 2,
            Scope::Admin => 4,
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The projects a caller may touch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Projects {
    /// `"projects": "*"`: every project.
    All,
    Only(BTreeSet<String>),
}

/// Why a verified caller may not do what it asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Denied {
    ProjectNotGranted(ProjectId),
    ScopeMissing(Scope),
}

/// A caller whose token was verified (or the local caller of a server that
/// runs without authentication).
#[derive(Clone, Debug)]
pub struct Caller {
    /// The token's `sub`: the caller's identity in logs and audit events.
    pub subject: String,
    pub projects: Projects,
    scopes: u8,
}

impl Caller {
    pub fn new(
        subject: String,
        projects: Projects,
        scopes: impl IntoIterator<Item = Scope>,
    ) -> Self {
        Self {
            subject,
            projects,
            scopes: scopes.into_iter().fold(0, |acc, s| acc | s.bit()),
        }
    }

    /// The caller of a server started without authentication (loopback only,
    /// or `--insecure-no-auth`): every project, every scope.
    pub fn unauthenticated() -> Self {
        Self::new("anonymous".into(), Projects::All, Scope::ALL)
    }

    pub fn has_scope(&self, s: Scope) -> bool {
        self.scopes & s.bit() != 0
    }

    pub fn scopes(&self) -> impl Iterator<Item = Scope> + '_ {
        Scope::ALL.into_iter().filter(|s| self.has_scope(*s))
    }

    pub fn require_scope(&self, s: Scope) -> Result<(), DomainError> {
        if self.has_scope(s) {
            Ok(())
        } else {
            Err(DomainError::PermissionDenied(Denied::ScopeMissing(s)))
        }
    }

    pub fn may_access(&self, project: &ProjectId) -> bool {
        match &self.projects {
            Projects::All => true,
            Projects::Only(set) => set.contains(project.as_str()),
        }
    }

    pub fn require_project(&self, project: &ProjectId) -> Result<(), DomainError> {
        if self.may_access(project) {
            Ok(())
        } else {
            Err(DomainError::PermissionDenied(Denied::ProjectNotGranted(
                project.clone(),
            )))
        }
    }

    /// Both checks, scope first (it does not depend on the request).
    pub fn require(&self, project: &ProjectId, s: Scope) -> Result<(), DomainError> {
        self.require_scope(s)?;
        self.require_project(project)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants() {
        let acme = ProjectId::parse("acme").unwrap();
        let globex = ProjectId::parse("globex").unwrap();
        let c = Caller::new(
            "svc".into(),
            Projects::Only(["acme".to_owned()].into()),
            [Scope::Read],
        );
        assert!(c.require(&acme, Scope::Read).is_ok());
        assert!(matches!(
            c.require(&acme, Scope::Write),
            Err(DomainError::PermissionDenied(Denied::ScopeMissing(
                Scope::Write
            )))
        ));
        assert!(matches!(
            c.require(&globex, Scope::Read),
            Err(DomainError::PermissionDenied(Denied::ProjectNotGranted(_)))
        ));
        let all = Caller::unauthenticated();
        assert!(all.require(&globex, Scope::Admin).is_ok());
        assert_eq!(all.scopes().count(), 3);
    }
}
