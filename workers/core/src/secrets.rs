//! Secrets come only from files or the environment, never from argument
//! values, and never reach a log line or the result: [`Secret`] hides its value
//! from `Debug` and `Display`.

use std::fmt;
use std::path::Path;

use anyhow::Result;

use crate::error::{fail, Kind};

#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Reads a secret file, dropping one trailing newline (Kubernetes secrets and
/// `echo` both add one). A missing or empty file is a usage error (exit 2).
pub fn read_secret_file(path: &Path, what: &str) -> Result<Secret> {
    let raw = std::fs::read_to_string(path).map_err(|e| {
        fail(
            Kind::Usage,
            "SecretUnreadable",
            format!("cannot read the {what} file {}: {e}", path.display()),
        )
    })?;
    let value = raw
        .strip_suffix("\r\n")
        .or_else(|| raw.strip_suffix('\n'))
        .unwrap_or(&raw);
    if value.is_empty() {
        return Err(fail(
            Kind::Usage,
            "SecretUnreadable",
            format!("the {what} file {} is empty", path.display()),
        ));
    }
    Ok(Secret(value.to_string()))
}

/// A secret from its file (the flag's value), else from the environment
/// variable `env` holding the value itself, else none.
pub fn secret_from(file: Option<&Path>, env: &str, what: &str) -> Result<Option<Secret>> {
    if let Some(path) = file {
        return read_secret_file(path, what).map(Some);
    }
    Ok(std::env::var(env)
        .ok()
        .filter(|v| !v.is_empty())
        .map(Secret))
}

/// Reads a file of secret lines (for example `Name: value` headers), skipping
/// blank lines and `#` comments.
pub fn read_secret_lines(path: &Path, what: &str) -> Result<Vec<Secret>> {
    let all = read_secret_file(path, what)?;
    Ok(all
        .expose()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(Secret::new)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_value() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "Secret(***) ***");
    }

    #[test]
    fn trailing_newline_dropped_and_missing_file_is_usage() {
        let dir = std::env::temp_dir().join(format!("secret-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("pw");
        std::fs::write(&f, "s3cret\n").unwrap();
        assert_eq!(read_secret_file(&f, "password").unwrap().expose(), "s3cret");
        let err = read_secret_file(&dir.join("missing"), "password").unwrap_err();
        assert_eq!(crate::error::classify(&err).kind, Kind::Usage);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
