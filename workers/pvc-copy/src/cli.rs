//! pvc-copy's flags: local mode (`pvc-copy --source S --target T`), and the
//! two sides of network mode (`pvc-copy send`, `pvc-copy receive`). Parsing
//! only validates; the run does the I/O.

use std::path::PathBuf;

use populator_core::options::CommonArgs;

/// Flags shared by every mode: how the copy behaves.
#[derive(clap::Args, Clone, Debug)]
#[command(next_help_heading = "Copy")]
pub struct CopyArgs {
    /// Parallel threads for walking, copying and hashing (default: the CPUs).
    #[arg(long, env = "POPULATOR_JOBS", value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub jobs: Option<u16>,

    /// Do not give copied entries the source's numeric owners (they are kept
    /// only when running as root anyway).
    #[arg(long, env = "POPULATOR_NO_CHOWN", action = clap::ArgAction::SetTrue, value_parser = clap::builder::BoolishValueParser::new())]
    pub no_chown: bool,

    /// After copying, hash source and target (content and metadata) and fail
    /// with exit 3 when they differ.
    #[arg(long, env = "POPULATOR_VERIFY", action = clap::ArgAction::SetTrue, value_parser = clap::builder::BoolishValueParser::new())]
    pub verify: bool,

    /// Copy into a target that already holds data, replacing entries of the
    /// same name (nothing else is deleted).
    #[arg(long, env = "POPULATOR_OVERWRITE", action = clap::ArgAction::SetTrue, value_parser = clap::builder::BoolishValueParser::new())]
    pub overwrite: bool,
}

impl CopyArgs {
    pub fn jobs(&self) -> usize {
        self.jobs
            .map(usize::from)
            .unwrap_or_else(crate::walk::default_jobs)
    }
}

/// Clone one volume into another: a directory tree with every piece of
/// metadata, or a block device / image file with its zero regions, verified
/// on request. `pvc-copy send` and `pvc-copy receive` do it over TLS.
#[derive(clap::Parser, Debug)]
#[command(name = "pvc-copy", version, about, max_term_width = 100)]
pub struct LocalArgs {
    /// The source volume: a directory, a block device or an image file.
    #[arg(long, env = "POPULATOR_SOURCE", value_name = "PATH")]
    pub source: Option<PathBuf>,

    /// An image file to copy onto a block target (absolute, or relative to
    /// --source when that is a directory).
    #[arg(long, env = "POPULATOR_SOURCE_FILE", value_name = "PATH")]
    pub source_file: Option<PathBuf>,

    #[command(flatten)]
    pub copy: CopyArgs,

    #[command(flatten)]
    pub commit: CommitArgs,

    #[command(flatten)]
    pub common: CommonArgs,
}

/// How often a copy makes its progress durable for a restart to resume from.
#[derive(clap::Args, Clone, Debug)]
pub struct CommitArgs {
    /// Seconds between making the progress durable (flush, then record what
    /// is done): what a restarted copy or receiver can skip. Each is a flush
    /// of the target, so more often costs speed (a local block copy also
    /// waits for 256 MiB more between two).
    #[arg(
        long,
        env = "POPULATOR_COMMIT_INTERVAL",
        default_value_t = 2.0,
        value_name = "SECONDS"
    )]
    pub commit_interval: f64,
}

impl CommitArgs {
    pub fn every(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.commit_interval.clamp(0.0, 3600.0))
    }
}

/// TLS and authentication of network mode.
#[derive(clap::Args, Clone, Debug)]
#[command(next_help_heading = "Network")]
pub struct TokenArgs {
    /// File holding the shared token (or the value itself in POPULATOR_TOKEN).
    #[arg(long, env = "POPULATOR_TOKEN_FILE", value_name = "PATH")]
    pub token_file: Option<PathBuf>,

    /// Parallel TLS streams.
    #[arg(long, env = "POPULATOR_STREAMS", default_value_t = 4, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=32))]
    pub streams: u16,
}

/// Send a volume to a `pvc-copy receive` over TLS.
#[derive(clap::Parser, Debug)]
#[command(name = "pvc-copy send", version, max_term_width = 100)]
pub struct SendArgs {
    #[arg(hide = true, value_parser = ["send"])]
    pub mode: String,

    /// The source volume: a directory, a block device or an image file.
    #[arg(long, env = "POPULATOR_SOURCE", value_name = "PATH")]
    pub source: PathBuf,

    /// The receiver, HOST:PORT.
    #[arg(long, env = "POPULATOR_TO", value_name = "HOST:PORT")]
    pub to: String,

    /// PEM file of CA certificates that sign the receiver's certificate.
    #[arg(
        long,
        env = "POPULATOR_CA_FILE",
        value_name = "PATH",
        conflicts_with = "server_fingerprint"
    )]
    pub ca_file: Option<PathBuf>,

    /// SHA-256 fingerprint of the receiver's certificate (hex, colons
    /// optional), as the receiver logs it.
    #[arg(long, env = "POPULATOR_SERVER_FINGERPRINT", value_name = "SHA256")]
    pub server_fingerprint: Option<String>,

    /// The name the receiver's certificate is checked against with --ca-file
    /// (default: the host of --to).
    #[arg(long, env = "POPULATOR_TLS_SERVER_NAME", value_name = "NAME")]
    pub tls_server_name: Option<String>,

    /// Do not verify the receiver's certificate (logs a warning).
    #[arg(long, env = "POPULATOR_INSECURE_SKIP_TLS_VERIFY", action = clap::ArgAction::SetTrue, value_parser = clap::builder::BoolishValueParser::new())]
    pub insecure_skip_tls_verify: bool,

    /// Compress data frames.
    #[arg(long, env = "POPULATOR_COMPRESS", value_enum, default_value_t = Compress::None, value_name = "ALGO")]
    pub compress: Compress,

    /// Reconnect attempts after a dropped connection, before giving up (exit 75).
    #[arg(
        long,
        env = "POPULATOR_RETRIES",
        default_value_t = 20,
        value_name = "N"
    )]
    pub retries: u32,

    /// Seconds between reconnect attempts.
    #[arg(
        long,
        env = "POPULATOR_RETRY_BACKOFF",
        default_value_t = 1.0,
        value_name = "SECONDS"
    )]
    pub retry_backoff: f64,

    #[command(flatten)]
    pub token: TokenArgs,

    #[command(flatten)]
    pub copy: CopyArgs,

    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Compress {
    None,
    Zstd,
}

/// Receive a volume from a `pvc-copy send` over TLS; exits after one
/// successful transfer.
#[derive(clap::Parser, Debug)]
#[command(name = "pvc-copy receive", version, max_term_width = 100)]
pub struct ReceiveArgs {
    #[arg(hide = true, value_parser = ["receive"])]
    pub mode: String,

    /// Address to listen on, e.g. 0.0.0.0:8443 or [::]:8443.
    #[arg(long, env = "POPULATOR_LISTEN", value_name = "ADDR")]
    pub listen: std::net::SocketAddr,

    #[command(flatten)]
    pub tls: populator_core::options::ServerTlsArgs,

    #[command(flatten)]
    pub commit: CommitArgs,

    /// Give up when no sender has connected for this many seconds (0: wait forever).
    #[arg(
        long,
        env = "POPULATOR_IDLE_TIMEOUT",
        default_value_t = 0.0,
        value_name = "SECONDS"
    )]
    pub idle_timeout: f64,

    #[command(flatten)]
    pub token: TokenArgs,

    #[command(flatten)]
    pub copy: CopyArgs,

    #[command(flatten)]
    pub common: CommonArgs,
}
