//! Flags every worker accepts (the contract's invocation part), flattened into
//! each worker's own clap struct. Every flag is also read from the environment
//! as `POPULATOR_<FLAG>`; the flag wins.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::archive::ExtractOptions;
use crate::content::{ContentMode, ContentSpec};
use crate::decompress::DecompressMode;
use crate::digest::Checksum;
use crate::error::{fail, Kind};
use crate::http::HttpOptions;
use crate::progress::ProgressMode;

#[derive(clap::Args, Clone, Debug)]
#[command(next_help_heading = "Target and reporting (every worker)")]
pub struct CommonArgs {
    /// The volume: a directory (filesystem volume), a block device, or an image
    /// file. Default: /dev/block when it is a block device, else /mnt.
    #[arg(
        long,
        visible_alias = "volume-path",
        env = "POPULATOR_TARGET",
        value_name = "PATH"
    )]
    pub target: Option<PathBuf>,

    /// The PVC's UID, used as the ownerUID label of the metrics.
    #[arg(
        long,
        env = "POPULATOR_OWNER_UID",
        value_name = "UID",
        default_value = ""
    )]
    pub owner_uid: String,

    /// The requested volume size: an upper bound on what may be written
    /// (bytes, or with a suffix: 10Gi, 500M).
    #[arg(long, env = "POPULATOR_PVC_SIZE", value_name = "BYTES", value_parser = parse_size)]
    pub pvc_size: Option<u64>,

    /// How progress is shown: a bar on a terminal and log lines otherwise
    /// (auto), or always a bar, log lines, JSON lines, or nothing.
    #[arg(
        long,
        env = "POPULATOR_PROGRESS",
        value_enum,
        default_value_t,
        value_name = "MODE"
    )]
    pub progress: ProgressMode,

    /// Seconds between progress log lines.
    #[arg(
        long,
        env = "POPULATOR_PROGRESS_INTERVAL",
        default_value_t = 5.0,
        value_name = "SECONDS"
    )]
    pub progress_interval: f64,

    /// Serve Prometheus metrics on HOST:PORT over HTTPS (off by default).
    #[arg(long, env = "POPULATOR_METRICS_ADDR", value_name = "HOST:PORT")]
    pub metrics_addr: Option<SocketAddr>,

    /// PEM certificate for the metrics endpoint (default: self-signed).
    #[arg(
        long,
        env = "POPULATOR_METRICS_CERT_FILE",
        value_name = "PATH",
        requires = "metrics_key_file"
    )]
    pub metrics_cert_file: Option<PathBuf>,

    /// PEM private key for the metrics endpoint.
    #[arg(
        long,
        env = "POPULATOR_METRICS_KEY_FILE",
        value_name = "PATH",
        requires = "metrics_cert_file"
    )]
    pub metrics_key_file: Option<PathBuf>,

    /// Serve metrics over plain HTTP instead of HTTPS.
    #[arg(long, env = "POPULATOR_METRICS_INSECURE_HTTP", action = clap::ArgAction::SetTrue, value_parser = clap::builder::BoolishValueParser::new())]
    pub metrics_insecure_http: bool,

    /// Name of the progress metric, e.g. kubevirt_cdi_import_progress_total
    /// for CDI's controller.
    #[arg(
        long,
        env = "POPULATOR_METRICS_PROGRESS_NAME",
        default_value = "populator_progress",
        value_name = "NAME"
    )]
    pub metrics_progress_name: String,

    /// Seconds the metrics endpoint keeps serving after the end.
    #[arg(
        long,
        env = "POPULATOR_METRICS_LINGER",
        default_value_t = 5.0,
        value_name = "SECONDS"
    )]
    pub metrics_linger: f64,

    /// Give what the worker creates this owner (numeric UID:GID), e.g. for a
    /// volume used by another uid. Without it, owners change only when
    /// preserving a source's ownership as root.
    #[arg(long, env = "POPULATOR_OWNER", value_name = "UID:GID", value_parser = parse_owner)]
    pub owner: Option<(u32, u32)>,

    /// Where the JSON result goes (default: /dev/termination-log when writable).
    #[arg(long, env = "POPULATOR_TERMINATION_LOG", value_name = "PATH")]
    pub termination_log: Option<PathBuf>,
}

/// Flags of the workers that receive one byte stream (http-import,
/// upload-receiver, backup-restore of archives and images).
#[derive(clap::Args, Clone, Debug)]
#[command(next_help_heading = "Content")]
pub struct ContentArgs {
    /// What the bytes are: a file, a tar archive to extract, or a disk image.
    #[arg(
        long,
        env = "POPULATOR_CONTENT",
        value_enum,
        default_value_t,
        value_name = "KIND"
    )]
    pub content: ContentMode,

    /// File name in a directory target (default: the source's own name).
    #[arg(long, env = "POPULATOR_FILE_NAME", value_name = "NAME", value_parser = parse_file_name)]
    pub file_name: Option<String>,

    /// Decompress gzip, xz, zstd and bzip2 found by magic bytes (auto), or not.
    #[arg(
        long,
        env = "POPULATOR_DECOMPRESS",
        value_enum,
        default_value_t,
        value_name = "MODE"
    )]
    pub decompress: DecompressMode,

    /// Expected digest of the source bytes as received: md5, sha1, sha256 or
    /// sha512 (repeatable).
    #[arg(
        long = "checksum",
        env = "POPULATOR_CHECKSUM",
        value_name = "ALGO:HEX",
        value_delimiter = ','
    )]
    pub checksums: Vec<Checksum>,

    /// Create device nodes and fifos from archives (root only).
    #[arg(long, env = "POPULATOR_PRESERVE_DEVICES", action = clap::ArgAction::SetTrue, value_parser = clap::builder::BoolishValueParser::new())]
    pub preserve_devices: bool,

    /// Keep setuid/setgid bits from archives.
    #[arg(long, env = "POPULATOR_PRESERVE_SETUID", action = clap::ArgAction::SetTrue, value_parser = clap::builder::BoolishValueParser::new())]
    pub preserve_setuid: bool,

    /// Do not set owners from archives (they are set only when running as root).
    #[arg(long, env = "POPULATOR_NO_CHOWN", action = clap::ArgAction::SetTrue, value_parser = clap::builder::BoolishValueParser::new())]
    pub no_chown: bool,

    /// Disk images in a directory target: grow `disk.img` to the available
    /// space minus the filesystem overhead.
    #[arg(long, env = "POPULATOR_GROW", action = clap::ArgAction::SetTrue, value_parser = clap::builder::BoolishValueParser::new())]
    pub grow: bool,

    /// Share of a filesystem volume kept free by --grow (0 to 0.9; as CDI).
    #[arg(long, env = "POPULATOR_FILESYSTEM_OVERHEAD", default_value_t = 0.06, value_name = "FRACTION", value_parser = parse_overhead)]
    pub filesystem_overhead: f64,
}

/// The certificate of the workers that listen for a peer (pvc-copy receive,
/// upload-receiver): a PEM pair, or a self-signed one whose fingerprint the
/// worker logs.
#[derive(clap::Args, Clone, Debug)]
pub struct ServerTlsArgs {
    /// PEM certificate (chain) to serve; default: a self-signed one, its
    /// fingerprint logged.
    #[arg(
        long,
        env = "POPULATOR_TLS_CERT_FILE",
        value_name = "PATH",
        requires = "tls_key_file"
    )]
    pub tls_cert_file: Option<PathBuf>,

    /// PEM private key of --tls-cert-file.
    #[arg(
        long,
        env = "POPULATOR_TLS_KEY_FILE",
        value_name = "PATH",
        requires = "tls_cert_file"
    )]
    pub tls_key_file: Option<PathBuf>,
}

impl ServerTlsArgs {
    /// The identity to serve: the given pair, or a fresh self-signed
    /// certificate for `names`.
    pub fn identity(&self, names: &[&str]) -> anyhow::Result<crate::tls::Identity> {
        crate::tls::Identity::load_or_generate(
            self.tls_cert_file.as_deref(),
            self.tls_key_file.as_deref(),
            names,
        )
    }
}

/// Network flags of the workers that reach a server over HTTP(S)
/// (http-import, git-clone): TLS trust, proxy, retries and timeouts. They
/// carry no heading of their own: they join the heading of the struct that
/// flattens them. A worker may reword a flag's help to its own case with
/// `mut_arg`; names, defaults and environment stay the same everywhere.
#[derive(clap::Args, Clone, Debug)]
pub struct NetworkArgs {
    /// PEM file of CA certificates trusted besides the system ones.
    #[arg(long, env = "POPULATOR_CA_FILE", value_name = "PATH")]
    pub ca_file: Option<PathBuf>,

    /// Do not verify the server's certificate (logs a warning).
    #[arg(long, env = "POPULATOR_INSECURE_SKIP_TLS_VERIFY", action = clap::ArgAction::SetTrue, value_parser = clap::builder::BoolishValueParser::new())]
    pub insecure_skip_tls_verify: bool,

    /// Proxy URL for all requests (HTTP_PROXY, HTTPS_PROXY and NO_PROXY are
    /// honoured without it).
    #[arg(long, env = "POPULATOR_PROXY", value_name = "URL")]
    pub proxy: Option<String>,

    /// Retries after connection errors, timeouts and 5xx answers.
    #[arg(long, env = "POPULATOR_RETRIES", default_value_t = 5, value_name = "N")]
    pub retries: u32,

    /// Seconds before the first retry; doubles each time, at most 30.
    #[arg(
        long,
        env = "POPULATOR_RETRY_BACKOFF",
        default_value_t = 1.0,
        value_name = "SECONDS"
    )]
    pub retry_backoff: f64,

    /// Connect timeout, and the longest a transfer may stall, in seconds.
    #[arg(
        long,
        env = "POPULATOR_TIMEOUT",
        default_value_t = 30.0,
        value_name = "SECONDS"
    )]
    pub timeout: f64,
}

impl NetworkArgs {
    /// The validated settings: `--timeout` and `--retry-backoff` must be a
    /// positive number of seconds (exit 2, `InvalidConfiguration`, otherwise).
    pub fn options(&self) -> anyhow::Result<HttpOptions> {
        Ok(HttpOptions {
            ca_file: self.ca_file.clone(),
            insecure_skip_tls_verify: self.insecure_skip_tls_verify,
            proxy: self.proxy.clone(),
            timeout: positive_seconds(self.timeout, "--timeout")?,
            retries: self.retries,
            retry_backoff: positive_seconds(self.retry_backoff, "--retry-backoff")?,
        })
    }
}

fn positive_seconds(seconds: f64, flag: &str) -> anyhow::Result<Duration> {
    if seconds.is_finite() && seconds > 0.0 {
        Ok(Duration::from_secs_f64(seconds))
    } else {
        Err(fail(
            Kind::Usage,
            "InvalidConfiguration",
            format!("{flag} must be a positive number of seconds"),
        ))
    }
}

impl CommonArgs {
    /// `--target`, or `POPULATOR_VOLUME_PATH` (the env twin of its alias `--volume-path`).
    pub fn target_path(&self) -> Option<PathBuf> {
        self.target
            .clone()
            .or_else(|| std::env::var_os("POPULATOR_VOLUME_PATH").map(PathBuf::from))
    }
}

impl ContentArgs {
    /// The content spec, with `default_name` for file content in a directory
    /// and the `--owner` of the common flags.
    pub fn spec(&self, default_name: &str, owner: Option<(u32, u32)>) -> ContentSpec {
        ContentSpec {
            mode: self.content,
            decompress: self.decompress,
            checksums: self.checksums.clone(),
            file_name: self.file_name.clone().unwrap_or_else(|| {
                if self.content == ContentMode::Disk {
                    crate::disk::DISK_FILE_NAME.to_string()
                } else {
                    default_name.to_string()
                }
            }),
            extract: ExtractOptions {
                preserve_owner: !self.no_chown,
                preserve_devices: self.preserve_devices,
                preserve_setuid: self.preserve_setuid,
                capacity: None,
                max_entries: None,
                owner,
            },
            disk: crate::disk::DiskOptions {
                grow: self.grow,
                filesystem_overhead: self.filesystem_overhead,
                ..Default::default()
            },
        }
    }
}

fn parse_overhead(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if (0.0..=0.9).contains(&v) => Ok(v),
        _ => Err(format!(
            "'{s}' is not a fraction between 0 and 0.9 (e.g. 0.06)"
        )),
    }
}

fn parse_owner(s: &str) -> Result<(u32, u32), String> {
    let bad = || format!("'{s}' is not UID:GID (numeric, e.g. 107:107)");
    let (uid, gid) = s.split_once(':').ok_or_else(bad)?;
    Ok((
        uid.parse().map_err(|_| bad())?,
        gid.parse().map_err(|_| bad())?,
    ))
}

fn parse_file_name(s: &str) -> Result<String, String> {
    crate::content::validate_file_name(s)?;
    Ok(s.to_string())
}

/// Sizes as Kubernetes writes them: `1073741824`, `10Gi`, `500M`, `1.5Ti`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("'{s}' is not a size (for example 10Gi or 1073741824)"))?;
    let unit: f64 = match suffix {
        "" => 1.0,
        "k" | "K" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        other => {
            return Err(format!(
                "unknown size suffix '{other}' in '{s}' (use Ki, Mi, Gi, Ti or k, M, G, T)"
            ))
        }
    };
    Ok((value * unit) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10Gi"), Ok(10 << 30));
        assert_eq!(parse_size("500M"), Ok(500_000_000));
        assert_eq!(parse_size("42"), Ok(42));
        assert!(parse_size("10Qi").is_err());
    }

    #[test]
    fn network_seconds_must_be_positive() {
        assert_eq!(
            positive_seconds(1.5, "--timeout").unwrap(),
            Duration::from_millis(1500)
        );
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let message = positive_seconds(bad, "--timeout").unwrap_err().to_string();
            assert!(
                message.contains("--timeout must be a positive number of seconds"),
                "{message}"
            );
        }
    }
}
