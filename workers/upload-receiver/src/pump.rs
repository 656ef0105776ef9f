//! Reading request bodies under the receiver's limits: every wait for the
//! client is bounded by the idle timeout, the `--deadline` and SIGTERM, and
//! a body that breaks off is told apart from a failure of our own.

use std::future::Future;
use std::time::{Duration, SystemTime};

use anyhow::Result;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use populator_core::cancel::CancelToken;
use populator_core::error::{classify, fail, terminated, Kind};

/// Reasons of failures caused by one client: the receiver answers, drops the
/// attempt and waits for the next one.
pub const CLIENT_REASONS: &[&str] = &["ClientDisconnected", "ClientStalled", "BadRequest"];

pub fn is_client_failure(err: &anyhow::Error) -> bool {
    CLIENT_REASONS.contains(&classify(err).reason.as_str())
}

pub fn bad_request(message: impl Into<String>) -> anyhow::Error {
    fail(Kind::Usage, "BadRequest", message)
}

#[derive(Clone)]
pub struct Limits {
    pub idle: Duration,
    pub deadline: Option<(tokio::time::Instant, String)>,
    pub cancel: CancelToken,
}

impl Limits {
    /// `deadline` as given on the command line (shown in the message).
    pub fn new(idle: Duration, deadline: Option<SystemTime>, cancel: CancelToken) -> Limits {
        let deadline = deadline.map(|at| {
            let left = at
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            (tokio::time::Instant::now() + left, rfc3339(at))
        });
        Limits {
            idle,
            deadline,
            cancel,
        }
    }

    pub fn deadline_passed(&self) -> Option<anyhow::Error> {
        let (at, text) = self.deadline.as_ref()?;
        (tokio::time::Instant::now() >= *at).then(|| deadline_error(text))
    }

    /// Runs `work` until it ends, SIGTERM arrives or the deadline passes.
    pub async fn bounded<T>(&self, work: impl Future<Output = Result<T>>) -> Result<T> {
        let deadline = async {
            match &self.deadline {
                Some((at, text)) => {
                    tokio::time::sleep_until(*at).await;
                    deadline_error(text)
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            out = work => out,
            _ = self.cancel.cancelled() => Err(terminated()),
            e = deadline => Err(e),
        }
    }

    /// The next data of a body: `Some(bytes)`, or `None` at its end. A body
    /// that breaks off or stalls longer than the idle timeout is a client
    /// failure.
    pub async fn next_data(&self, body: &mut Incoming) -> Result<Option<Bytes>> {
        let idle = self.idle;
        self.bounded(async {
            loop {
                let frame = match tokio::time::timeout(idle, body.frame()).await {
                    Err(_) => {
                        return Err(fail(
                            Kind::Transient,
                            "ClientStalled",
                            format!(
                            "the client sent nothing for {} s (--idle-timeout): disconnected it",
                            idle.as_secs_f64()
                        ),
                        ))
                    }
                    Ok(None) => return Ok(None),
                    Ok(Some(Err(e))) => {
                        return Err(fail(
                            Kind::Transient,
                            "ClientDisconnected",
                            format!("the upload broke off: {e}"),
                        ))
                    }
                    Ok(Some(Ok(frame))) => frame,
                };
                // Trailers carry nothing we use.
                if let Ok(data) = frame.into_data() {
                    if !data.is_empty() {
                        return Ok(Some(data));
                    }
                }
            }
        })
        .await
    }
}

/// How long, and how much of, a refused request's body is read and dropped.
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 256 << 20;

/// A lingering close for a request answered before its body was read (401,
/// 409, 413, 503, a failed write): the body is read and dropped for a short
/// while, so that the client reads the answer instead of a connection reset
/// (closing a socket with unread data sends RST, which discards the answer
/// in the client's receive buffer). curl stops sending once it sees the
/// answer. Needs a tokio runtime.
pub async fn linger(mut body: Incoming) {
    let drain = async {
        let mut read = 0;
        while let Some(Ok(frame)) = body.frame().await {
            read += frame.data_ref().map_or(0, |d| d.len());
            if read > LINGER_BYTES {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(LINGER_TIME, drain).await;
}

fn deadline_error(at: &str) -> anyhow::Error {
    fail(
        Kind::Transient,
        "DeadlinePassed",
        format!("the deadline {at} (--deadline) passed before an upload completed"),
    )
}

/// A SystemTime as RFC 3339 UTC, for messages.
fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_times() {
        let t = crate::cli::parse_rfc3339("2030-01-02T15:04:05Z").unwrap();
        assert_eq!(rfc3339(t), "2030-01-02T15:04:05Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
    }
}
