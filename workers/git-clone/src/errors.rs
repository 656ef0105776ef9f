//! libgit2's errors in the contract's terms: which exit code, which reason,
//! and whether another attempt may help.

use git2::{ErrorClass, ErrorCode};
use populator_core::error::{fail, Kind};

use crate::auth::CallbackFailure;

/// How a failed network operation is reported.
pub struct Failure {
    pub kind: Kind,
    pub reason: &'static str,
    pub message: String,
    /// A later attempt may succeed (the network, not the request, failed).
    pub retryable: bool,
}

impl Failure {
    pub fn into_error(self) -> anyhow::Error {
        fail(self.kind, self.reason, self.message)
    }
}

impl From<CallbackFailure> for Failure {
    fn from(c: CallbackFailure) -> Self {
        Failure {
            kind: c.kind,
            reason: c.reason,
            message: c.message,
            retryable: false,
        }
    }
}

/// Classifies a libgit2 error from talking to `url`.
pub fn classify(err: &git2::Error, url: &str) -> Failure {
    let msg = err.message().to_string();
    let lower = msg.to_ascii_lowercase();
    let has = |words: &[&str]| words.iter().any(|w| lower.contains(w));
    let make = |kind, reason, retryable| Failure {
        kind,
        reason,
        message: format!("{url}: {msg}"),
        retryable,
    };
    if has(&["no space left", "disk quota"]) {
        return make(Kind::Capacity, "NoSpaceLeft", false);
    }
    if err.code() == ErrorCode::Certificate
        || err.class() == ErrorClass::Ssl && has(&["certificate", "verify"])
    {
        let mut f = make(Kind::Auth, "TlsVerificationFailed", false);
        f.message.push_str(" (give the server's CA with --ca-file)");
        return f;
    }
    if err.code() == ErrorCode::Auth
        || has(&[
            "status code: 401",
            "status code: 403",
            "authentication",
            "too many redirects or authentication replays",
        ])
    {
        return make(Kind::Auth, "AuthenticationFailed", false);
    }
    if has(&[
        "status code: 404",
        "repository not found",
        "does not appear to be a git repository",
        "not exported",
        "could not find repository",
        "no such file or directory",
        "repository not exported",
        "not a git repository",
    ]) {
        return make(Kind::Usage, "RepositoryNotFound", false);
    }
    if has(&["status code: 5", "status code: 429"]) {
        return make(Kind::Transient, "ServerError", true);
    }
    if err.class() == ErrorClass::Os && has(&["permission denied"]) {
        return make(Kind::Usage, "PermissionDenied", false);
    }
    // By words, not by class: libgit2 files "not supported" under Net too.
    let network = has(&[
        "failed to connect",
        "connection refused",
        "timed out",
        "connection reset",
        "early eof",
        "unexpected disconnect",
        "failed to resolve",
        "name or service not known",
        "network is unreachable",
        "no route to host",
        "broken pipe",
        "failed to start ssh session",
        "failed getting banner",
        "could not connect",
        "failed to send request",
        "error receiving data",
        "error sending data",
    ]);
    if network {
        return make(Kind::Transient, "NetworkError", true);
    }
    make(Kind::Internal, "FetchFailed", false)
}
