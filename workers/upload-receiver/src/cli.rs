//! upload-receiver's flags, and their validation into a [`Config`] (no I/O
//! besides reading the secret and certificate files the flags name).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::Result;
use populator_core::error::{fail, Kind};
use populator_core::options::{CommonArgs, ContentArgs, ServerTlsArgs};
use populator_core::secrets::{secret_from, Secret};

/// Receive one upload over HTTPS into a volume: CDI's upload API (what
/// `virtctl image-upload` speaks), tus 1.0 resumable uploads, digests checked
/// before anything is reported as populated. Exits after one successful upload.
#[derive(clap::Parser, Debug)]
#[command(
    name = "upload-receiver",
    version,
    about,
    max_term_width = 100,
    args_override_self = true
)]
pub struct Args {
    #[command(flatten)]
    pub server: ServerArgs,

    #[command(flatten)]
    pub content: ContentArgs,

    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(clap::Args, Debug)]
#[command(next_help_heading = "Server")]
pub struct ServerArgs {
    /// Address to listen on (HTTPS).
    #[arg(
        long,
        env = "POPULATOR_LISTEN",
        default_value = "0.0.0.0:8443",
        value_name = "HOST:PORT"
    )]
    pub listen: SocketAddr,

    #[command(flatten)]
    pub tls: ServerTlsArgs,

    /// File holding the bearer token clients must send (or the value itself
    /// in POPULATOR_UPLOAD_TOKEN).
    #[arg(long, env = "POPULATOR_TOKEN_FILE", value_name = "PATH")]
    pub token_file: Option<PathBuf>,

    /// PEM file of CAs whose client certificates are accepted (mutual TLS).
    #[arg(long, env = "POPULATOR_CLIENT_CA_FILE", value_name = "PATH")]
    pub client_ca_file: Option<PathBuf>,

    /// The common name a client certificate must carry (as CDI's upload
    /// proxy presents "cdi-uploadproxy").
    #[arg(
        long,
        env = "POPULATOR_CLIENT_NAME",
        value_name = "CN",
        requires = "client_ca_file"
    )]
    pub client_name: Option<String>,

    /// Accept uploads from anyone (no token, no client certificate).
    #[arg(long, env = "POPULATOR_INSECURE_NO_AUTH", action = clap::ArgAction::SetTrue, value_parser = clap::builder::BoolishValueParser::new())]
    pub insecure_no_auth: bool,

    /// Give up at this time (RFC 3339, e.g. 2030-01-02T15:04:05Z), even in
    /// the middle of an upload: Failed, reason DeadlinePassed.
    #[arg(long, env = "POPULATOR_DEADLINE", value_name = "TIME", value_parser = parse_rfc3339)]
    pub deadline: Option<SystemTime>,

    /// Seconds a client may take to send a request's headers.
    #[arg(
        long,
        env = "POPULATOR_HEADER_READ_TIMEOUT",
        default_value_t = 30.0,
        value_name = "SECONDS"
    )]
    pub header_read_timeout: f64,

    /// Seconds an upload may stall (no body bytes) before the client is
    /// disconnected.
    #[arg(
        long,
        env = "POPULATOR_IDLE_TIMEOUT",
        default_value_t = 60.0,
        value_name = "SECONDS"
    )]
    pub idle_timeout: f64,

    /// Seconds the receiver keeps answering after the upload completed
    /// (409 to new uploads, the final offset to tus HEAD) before it exits.
    #[arg(
        long,
        env = "POPULATOR_LINGER",
        default_value_t = 2.0,
        value_name = "SECONDS"
    )]
    pub linger: f64,

    /// Connections served at once; more wait in the listen queue.
    #[arg(long, env = "POPULATOR_MAX_CONNECTIONS", default_value_t = 16, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub max_connections: u16,
}

/// Validated server settings, secrets read.
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub tls: ServerTlsArgs,
    pub token: Option<Secret>,
    pub client_ca_file: Option<PathBuf>,
    pub client_name: Option<String>,
    pub deadline: Option<SystemTime>,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub linger: Duration,
}

impl ServerArgs {
    pub fn config(&self) -> Result<ServerConfig> {
        let token = secret_from(
            self.token_file.as_deref(),
            "POPULATOR_UPLOAD_TOKEN",
            "upload token",
        )?;
        if token.is_none() && self.client_ca_file.is_none() && !self.insecure_no_auth {
            return Err(usage(
                "no authentication configured: give --token-file and/or --client-ca-file (with --client-name), or --insecure-no-auth to accept anyone",
            ));
        }
        Ok(ServerConfig {
            listen: self.listen,
            tls: self.tls.clone(),
            token,
            client_ca_file: self.client_ca_file.clone(),
            client_name: self.client_name.clone(),
            deadline: self.deadline,
            header_read_timeout: seconds(self.header_read_timeout, "--header-read-timeout")?,
            idle_timeout: seconds(self.idle_timeout, "--idle-timeout")?,
            max_connections: self.max_connections as usize,
            linger: Duration::from_secs_f64(if self.linger.is_finite() {
                self.linger.max(0.0)
            } else {
                0.0
            }),
        })
    }
}

fn seconds(s: f64, flag: &str) -> Result<Duration> {
    if s.is_finite() && s > 0.0 {
        Ok(Duration::from_secs_f64(s))
    } else {
        Err(usage(&format!(
            "{flag} must be a positive number of seconds"
        )))
    }
}

fn usage(message: &str) -> anyhow::Error {
    fail(Kind::Usage, "InvalidConfiguration", message)
}

/// RFC 3339 date-time (`2030-01-02T15:04:05Z`, `…05.5+02:00`) as a SystemTime.
pub fn parse_rfc3339(s: &str) -> Result<SystemTime, String> {
    let bad = || format!("'{s}' is not an RFC 3339 time (for example 2030-01-02T15:04:05Z)");
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| -> Result<i64, String> {
        s.get(r)
            .filter(|t| t.bytes().all(|c| c.is_ascii_digit()))
            .and_then(|t| t.parse().ok())
            .ok_or_else(bad)
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if b[13] != b':' || b[16] != b':' {
        return Err(bad());
    }
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return Err(bad());
    }
    let mut rest = &s[19..];
    let mut nanos = 0u32;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad());
        }
        let padded = format!("{:0<9}", &frac[..digits.min(9)]);
        nanos = padded.parse().map_err(|_| bad())?;
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6
            && matches!(rest.as_bytes()[0], b'+' | b'-')
            && rest.as_bytes()[3] == b':' =>
        {
            let sign = if rest.starts_with('-') { -1 } else { 1 };
            let h: i64 = rest[1..3].parse().map_err(|_| bad())?;
            let m: i64 = rest[4..6].parse().map_err(|_| bad())?;
            sign * (h * 3600 + m * 60)
        }
        _ => return Err(bad()),
    };
    let secs =
        days_from_civil(year, month, day) * 86400 + hour * 3600 + minute * 60 + second - offset;
    let secs = u64::try_from(secs).map_err(|_| bad())?;
    Ok(SystemTime::UNIX_EPOCH + Duration::new(secs, nanos))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: &str) -> u64 {
        parse_rfc3339(s)
            .unwrap()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[test]
    fn rfc3339() {
        assert_eq!(secs("1970-01-01T00:00:00Z"), 0);
        assert_eq!(secs("2030-01-02T15:04:05Z"), 1_893_596_645);
        assert_eq!(secs("2030-01-02T17:04:05.250+02:00"), 1_893_596_645);
        assert!(parse_rfc3339("2030-01-02").is_err());
        assert!(parse_rfc3339("2030-13-02T15:04:05Z").is_err());
        assert!(parse_rfc3339("2030-01-02T15:04:05").is_err());
    }
}
