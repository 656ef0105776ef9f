//! Error kinds of the worker contract: each kind decides the exit code and the
//! default `reason` of the JSON result. Errors travel as `anyhow::Error`; a
//! [`WorkerError`] anywhere in the chain says what kind of failure it was.

use std::fmt;
use std::io;

/// What went wrong, as far as the caller (a controller, a person) cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A bug or an unexpected condition: exit 1.
    Internal,
    /// A bad flag, a missing secret file, a source that does not exist: exit 2.
    Usage,
    /// Checksum mismatch, corrupt or hostile data: exit 3.
    Integrity,
    /// The data does not fit the target: exit 4.
    Capacity,
    /// Authentication or authorization refused, TLS trust failed: exit 5.
    Auth,
    /// The network kept failing after retries; a controller may retry: exit 75.
    Transient,
    /// SIGTERM (or SIGINT) arrived; the worker cleaned up: exit 143.
    Terminated,
}

impl Kind {
    pub fn exit_code(self) -> i32 {
        match self {
            Kind::Internal => 1,
            Kind::Usage => 2,
            Kind::Integrity => 3,
            Kind::Capacity => 4,
            Kind::Auth => 5,
            Kind::Transient => 75,
            Kind::Terminated => 143,
        }
    }

    /// The `reason` used when the error did not name a more precise one.
    pub fn default_reason(self) -> &'static str {
        match self {
            Kind::Internal => "InternalError",
            Kind::Usage => "InvalidConfiguration",
            Kind::Integrity => "IntegrityError",
            Kind::Capacity => "InsufficientCapacity",
            Kind::Auth => "Unauthorized",
            Kind::Transient => "TransientError",
            Kind::Terminated => "Terminated",
        }
    }
}

/// An error with a kind and a machine-readable reason; the message is for people.
#[derive(Debug)]
pub struct WorkerError {
    pub kind: Kind,
    pub reason: &'static str,
    pub message: String,
}

impl fmt::Display for WorkerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for WorkerError {}

/// Builds an `anyhow::Error` of the given kind and reason.
pub fn fail(kind: Kind, reason: &'static str, message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(WorkerError {
        kind,
        reason,
        message: message.into(),
    })
}

/// The error a terminated worker unwinds with.
pub fn terminated() -> anyhow::Error {
    fail(Kind::Terminated, "Terminated", "terminated by signal")
}

/// How an error is reported: kind, reason and a one-line message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Classified {
    pub kind: Kind,
    pub reason: String,
    pub message: String,
}

/// Finds the kind of an error: the outermost [`WorkerError`] in the chain wins;
/// otherwise a full disk is a capacity error and everything else is internal.
pub fn classify(err: &anyhow::Error) -> Classified {
    let message = one_line(err);
    for cause in err.chain() {
        if let Some(we) = cause.downcast_ref::<WorkerError>() {
            return Classified {
                kind: we.kind,
                reason: we.reason.to_string(),
                message,
            };
        }
        if let Some(io) = cause.downcast_ref::<io::Error>() {
            if let Some(we) = io.get_ref().and_then(|e| e.downcast_ref::<WorkerError>()) {
                return Classified {
                    kind: we.kind,
                    reason: we.reason.to_string(),
                    message,
                };
            }
            if io.kind() == io::ErrorKind::PermissionDenied {
                return Classified {
                    kind: Kind::Usage,
                    reason: "PermissionDenied".into(),
                    message: format!("{message} (the worker runs as uid {}: make the volume writable for it, e.g. with fsGroup)", current_uid()),
                };
            }
            if is_no_space(io) {
                return Classified {
                    kind: Kind::Capacity,
                    reason: "NoSpaceLeft".into(),
                    message,
                };
            }
        }
    }
    Classified {
        kind: Kind::Internal,
        reason: Kind::Internal.default_reason().into(),
        message,
    }
}

fn current_uid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// ENOSPC and EDQUOT both mean "the volume is full" to a user.
pub fn is_no_space(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// The whole context chain on one line, without repeating a cause that an
/// outer message already quotes.
fn one_line(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if text.is_empty() || out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out.replace('\n', " ")
}

/// Wraps a [`WorkerError`] into an `io::Error`, for code that must speak `io::Read`.
pub fn into_io(kind: Kind, reason: &'static str, message: impl Into<String>) -> io::Error {
    io::Error::other(WorkerError {
        kind,
        reason,
        message: message.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context as _;

    #[test]
    fn kind_found_under_context() {
        let err = Err::<(), _>(fail(Kind::Auth, "Unauthorized", "401 from server"))
            .context("downloading http://x/y")
            .unwrap_err();
        let c = classify(&err);
        assert_eq!(c.kind, Kind::Auth);
        assert_eq!(c.reason, "Unauthorized");
        assert_eq!(c.message, "downloading http://x/y: 401 from server");
    }

    #[test]
    fn enospc_is_capacity() {
        let err = anyhow::Error::new(io::Error::from_raw_os_error(libc::ENOSPC)).context("writing");
        assert_eq!(classify(&err).kind, Kind::Capacity);
        assert_eq!(classify(&anyhow::anyhow!("boom")).kind, Kind::Internal);
    }

    #[test]
    fn worker_error_inside_io_error() {
        let err = anyhow::Error::new(into_io(Kind::Integrity, "CorruptData", "bad gzip"));
        assert_eq!(classify(&err).reason, "CorruptData");
    }
}
