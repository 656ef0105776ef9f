//! The result: a JSON document (at most 4096 bytes, the size of a Kubernetes
//! termination message) written on success and on failure, plus one summary
//! line on stderr.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

pub const MAX_RESULT_BYTES: usize = 4096;
pub const DEFAULT_TERMINATION_LOG: &str = "/dev/termination-log";

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TargetInfo {
    pub kind: String,
    pub path: String,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerResult {
    pub worker: String,
    pub version: String,
    pub status: &'static str,
    pub reason: String,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<TargetInfo>,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub digests: BTreeMap<String, String>,
    pub duration_seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl WorkerResult {
    /// Serialises within [`MAX_RESULT_BYTES`]: worker-specific fields go
    /// first, then the message is shortened.
    pub fn to_json(&self) -> String {
        let mut result = self.clone();
        let mut json = serde_json::to_string(&result).expect("a result serialises");
        if json.len() > MAX_RESULT_BYTES {
            result.extra.clear();
            json = serde_json::to_string(&result).expect("a result serialises");
        }
        while json.len() > MAX_RESULT_BYTES && !result.message.is_empty() {
            let keep = result
                .message
                .len()
                .saturating_sub(json.len() - MAX_RESULT_BYTES + 8);
            let mut cut = keep.min(result.message.len());
            while !result.message.is_char_boundary(cut) {
                cut -= 1;
            }
            result.message.truncate(cut);
            result.message.push('…');
            json = serde_json::to_string(&result).expect("a result serialises");
        }
        json
    }
}

/// `--termination-log`, or `/dev/termination-log` when it exists and is writable.
pub fn termination_log_path(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_path_buf());
    }
    let default = Path::new(DEFAULT_TERMINATION_LOG);
    let writable = std::fs::OpenOptions::new()
        .write(true)
        .open(default)
        .is_ok();
    writable.then(|| default.to_path_buf())
}

pub fn write_result(path: &Path, result: &WorkerResult) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    file.write_all(result.to_json().as_bytes())?;
    file.write_all(b"\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(message: String) -> WorkerResult {
        WorkerResult {
            worker: "w".into(),
            version: "1".into(),
            status: "Failed",
            reason: "X".into(),
            message,
            target: None,
            bytes_read: 1,
            bytes_written: 2,
            digests: BTreeMap::new(),
            duration_seconds: 0.5,
            exit_code: Some(3),
            extra: serde_json::Map::new(),
        }
    }

    #[test]
    fn stays_under_4096_bytes() {
        let json = sample("é".repeat(5000)).to_json();
        assert!(json.len() <= MAX_RESULT_BYTES, "{}", json.len());
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["bytesWritten"], 2);
    }
}
