//! The audit trail: every write call emits exactly one event on the tracing
//! target `audit`, with the caller's `sub`, the project, the RPC, the
//! resource name, the request_id and the outcome (the gRPC code name, e.g.
//! `OK`, `PERMISSION_DENIED`; `CANCELLED` when the client went away before
//! the answer). Writes the handler refuses (scope, project, validation) are
//! recorded too; calls refused before a handler runs (no or a bad token, a
//! message too large to decode) appear only in the per-RPC log. ImportUsers
//! records each committed chunk and a refused start. No personal data:
//! names are ids, never emails.
//!
//! `RUST_LOG=warn,audit=info` keeps only the trail; with
//! `--log-format json` each event is one JSON object.

use std::sync::{Arc, Mutex};

use tonic::Status;

use crate::domain::Caller;

/// One write in progress; the handler names what it touches as it learns it.
pub struct Audit {
    caller: Arc<Caller>,
    rpc: &'static str,
    target: Mutex<Target>,
    /// Set once the event is out; an Audit dropped before (the client
    /// cancelled, the handler panicked) records the write as CANCELLED.
    done: bool,
}

#[derive(Default)]
struct Target {
    project: String,
    resource: String,
    request_id: String,
}

impl Audit {
    pub fn new(caller: Arc<Caller>, rpc: &'static str) -> Self {
        Self {
            caller,
            rpc,
            target: Mutex::new(Target::default()),
            done: false,
        }
    }

    pub fn caller(&self) -> &Caller {
        &self.caller
    }

    /// The project and resource the call is about.
    pub fn about(&self, project: &str, resource: impl Into<String>) {
        let mut t = self.target.lock().unwrap_or_else(|p| p.into_inner());
        t.project = project.to_owned();
        t.resource = resource.into();
    }

    pub fn request_id(&self, id: &str) {
        crate::domain::events::Origin::current().set_request_id(id);
        let mut t = self.target.lock().unwrap_or_else(|p| p.into_inner());
        id.clone_into(&mut t.request_id);
    }

    /// Emits the event for the call's outcome and hands the outcome back.
    pub fn finish<T>(mut self, outcome: Result<T, Status>) -> Result<T, Status> {
        let code = match &outcome {
            Ok(_) => tonic::Code::Ok,
            Err(s) => s.code(),
        };
        self.emit(code);
        outcome
    }

    fn emit(&mut self, code: tonic::Code) {
        self.done = true;
        let t = self.target.lock().unwrap_or_else(|p| p.into_inner());
        record(
            &self.caller,
            self.rpc,
            &t.project,
            &t.resource,
            &t.request_id,
            code,
            None,
        );
    }
}

impl Drop for Audit {
    fn drop(&mut self) {
        if !self.done {
            // Unwinding: the catch-panic layer answers INTERNAL.
            let code = if std::thread::panicking() {
                tonic::Code::Internal
            } else {
                tonic::Code::Cancelled
            };
            self.emit(code);
        }
    }
}

/// The canonical name of a gRPC status code.
pub fn code_name(c: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match c {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// One audit event. `detail` carries counts for bulk writes.
pub fn record(
    caller: &Caller,
    rpc: &str,
    project: &str,
    resource: &str,
    request_id: &str,
    outcome: tonic::Code,
    detail: Option<&str>,
) {
    tracing::info!(
        target: "audit",
        caller = %caller.subject,
        project,
        rpc,
        resource,
        request_id,
        outcome = code_name(outcome),
        detail = detail.unwrap_or(""),
        "write"
    );
}
