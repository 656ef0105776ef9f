//! backup-restore's flags, and their validation into a [`Source`] (no I/O
//! besides reading the secret files the flags name).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use populator_core::decompress::DecompressMode;
use populator_core::digest::Checksum;
use populator_core::error::{fail, Kind};
use populator_core::http::HttpOptions;
use populator_core::options::CommonArgs;
use populator_core::secrets::{secret_from, Secret};

/// Fill a volume from a backup: a snapshot of a restic repository (local,
/// REST or S3; Velero's and VolSync's too), a tar archive, or a disk image.
#[derive(clap::Parser, Debug)]
#[command(name = "backup-restore", version, about, max_term_width = 100)]
pub struct Args {
    #[command(flatten)]
    pub source: SourceArgs,

    #[command(flatten)]
    pub restic: ResticArgs,

    #[command(flatten)]
    pub stream: StreamArgs,

    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(clap::Args, Debug)]
#[command(next_help_heading = "Source (exactly one)")]
#[group(required = true, multiple = false)]
pub struct SourceArgs {
    /// A restic repository as restic names it: a local path, rest:http(s)://…,
    /// or s3:http(s)://host/bucket/prefix.
    #[arg(long, env = "POPULATOR_REPOSITORY", value_name = "REPO")]
    pub repository: Option<String>,

    /// Velero's restic repository of this namespace's volumes (with
    /// --velero-bucket-url): REPO/restic/NAMESPACE, Velero's default password.
    #[arg(
        long,
        env = "POPULATOR_VELERO_NAMESPACE",
        value_name = "NAMESPACE",
        requires = "velero_bucket_url"
    )]
    pub velero_namespace: Option<String>,

    /// A tar archive (tar, .gz, .zst, .xz, .bz2) to extract into a directory
    /// target: an http(s) URL or a local path.
    #[arg(long, env = "POPULATOR_ARCHIVE", value_name = "URL|PATH")]
    pub archive: Option<String>,

    /// A disk image (raw, or compressed raw) to write onto a block volume or
    /// disk.img: an http(s) URL or a local path.
    #[arg(long, env = "POPULATOR_IMAGE", value_name = "URL|PATH")]
    pub image: Option<String>,
}

#[derive(clap::Args, Debug)]
#[command(next_help_heading = "Restic repository")]
pub struct ResticArgs {
    /// File holding the repository password (or the value itself in
    /// POPULATOR_PASSWORD, or RESTIC_PASSWORD).
    #[arg(long, env = "POPULATOR_PASSWORD_FILE", value_name = "PATH")]
    pub password_file: Option<PathBuf>,

    /// The snapshot: "latest" (the newest that matches --host, --tag and
    /// --path) or a snapshot ID (or a unique prefix of it).
    #[arg(
        long,
        env = "POPULATOR_SNAPSHOT",
        default_value = "latest",
        value_name = "latest|ID"
    )]
    pub snapshot: String,

    /// Only snapshots of this host (repeatable: any of them).
    #[arg(long = "host", env = "POPULATOR_HOST", value_name = "HOST")]
    pub hosts: Vec<String>,

    /// Only snapshots with these tags (comma-separated: all of them;
    /// repeatable: any of the lists), as restic's --tag.
    #[arg(long = "tag", env = "POPULATOR_TAG", value_name = "TAG[,TAG…]")]
    pub tags: Vec<String>,

    /// Only snapshots of this backed-up path (repeatable: all of them).
    #[arg(long = "path", env = "POPULATOR_PATH", value_name = "PATH")]
    pub paths: Vec<String>,

    /// Restore only this subpath of the snapshot, relative to its backed-up
    /// path (repeatable).
    #[arg(long = "include", env = "POPULATOR_INCLUDE", value_name = "SUBPATH")]
    pub includes: Vec<String>,

    /// The bucket URL Velero's BackupStorageLocation points to, as restic
    /// names it (s3:http(s)://host/bucket[/prefix]).
    #[arg(long, env = "POPULATOR_VELERO_BUCKET_URL", value_name = "REPO")]
    pub velero_bucket_url: Option<String>,

    /// File holding the S3 access key ID (or AWS_ACCESS_KEY_ID).
    #[arg(long, env = "POPULATOR_ACCESS_KEY_ID_FILE", value_name = "PATH")]
    pub access_key_id_file: Option<PathBuf>,

    /// File holding the S3 secret access key (or AWS_SECRET_ACCESS_KEY).
    #[arg(long, env = "POPULATOR_SECRET_ACCESS_KEY_FILE", value_name = "PATH")]
    pub secret_access_key_file: Option<PathBuf>,

    /// The S3 region (default: AWS_DEFAULT_REGION, AWS_REGION, else us-east-1).
    #[arg(long, env = "POPULATOR_REGION", value_name = "REGION")]
    pub region: Option<String>,

    /// Blobs read and written in parallel.
    #[arg(long, env = "POPULATOR_CONNECTIONS", default_value_t = 8, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub connections: u16,
}

#[derive(clap::Args, Debug)]
#[command(next_help_heading = "Archives and images")]
pub struct StreamArgs {
    /// Expected digest of the archive or image as stored: md5, sha1, sha256
    /// or sha512 (repeatable).
    #[arg(
        long = "checksum",
        env = "POPULATOR_CHECKSUM",
        value_name = "ALGO:HEX",
        value_delimiter = ','
    )]
    pub checksums: Vec<Checksum>,

    /// Decompress gzip, xz, zstd and bzip2 found by magic bytes (auto), or not.
    #[arg(
        long,
        env = "POPULATOR_DECOMPRESS",
        value_enum,
        default_value_t,
        value_name = "MODE"
    )]
    pub decompress: DecompressMode,

    /// PEM file of CA certificates trusted besides the system ones (HTTPS
    /// sources and repositories).
    #[arg(long, env = "POPULATOR_CA_FILE", value_name = "PATH")]
    pub ca_file: Option<PathBuf>,

    /// Do not verify the server's certificate (logs a warning).
    #[arg(long, env = "POPULATOR_INSECURE_SKIP_TLS_VERIFY", action = clap::ArgAction::SetTrue, value_parser = clap::builder::BoolishValueParser::new())]
    pub insecure_skip_tls_verify: bool,
}

/// Where a restic repository lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepoLocation {
    Local(PathBuf),
    Rest(String),
    S3(S3Location),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Location {
    /// http(s)://host[:port]
    pub endpoint: String,
    pub bucket: String,
    /// Without leading or trailing slashes; may be empty.
    pub prefix: String,
    pub region: String,
}

impl S3Location {
    pub fn display(&self) -> String {
        format!("s3:{}/{}/{}", self.endpoint, self.bucket, self.prefix)
            .trim_end_matches('/')
            .to_string()
    }
}

impl RepoLocation {
    /// A repository name as restic writes it. Restic's `s3:host/bucket`
    /// form (no scheme) means https.
    pub fn parse(repo: &str, region: &str) -> Result<RepoLocation> {
        if let Some(rest) = repo.strip_prefix("rest:") {
            if !(rest.starts_with("http://") || rest.starts_with("https://")) {
                return Err(usage(format!(
                    "--repository {repo}: a REST repository is rest:http(s)://host[:port]/path"
                )));
            }
            return Ok(RepoLocation::Rest(rest.to_string()));
        }
        if let Some(s3) = repo.strip_prefix("s3:") {
            return parse_s3(repo, s3, region).map(RepoLocation::S3);
        }
        if let Some((scheme, _)) = repo.split_once(':') {
            if ["sftp", "rclone", "b2", "azure", "gs", "swift", "opendal"].contains(&scheme) {
                return Err(usage(format!(
                    "--repository {scheme}:… is not supported; use a local path, rest:http(s)://… or s3:http(s)://host/bucket/prefix"
                )));
            }
        }
        let path = repo.strip_prefix("local:").unwrap_or(repo);
        if path.is_empty() {
            return Err(usage("--repository is empty".into()));
        }
        Ok(RepoLocation::Local(PathBuf::from(path)))
    }

    pub fn display(&self) -> String {
        match self {
            RepoLocation::Local(p) => p.display().to_string(),
            RepoLocation::Rest(url) => format!("rest:{}", redact_url(url)),
            RepoLocation::S3(s3) => s3.display(),
        }
    }
}

fn parse_s3(repo: &str, s3: &str, region: &str) -> Result<S3Location> {
    let (endpoint_scheme, rest) = if let Some(r) = s3.strip_prefix("http://") {
        ("http://", r)
    } else if let Some(r) = s3.strip_prefix("https://") {
        ("https://", r)
    } else {
        ("https://", s3)
    };
    let mut parts = rest.trim_end_matches('/').splitn(3, '/');
    let host = parts.next().unwrap_or("");
    let bucket = parts.next().unwrap_or("");
    let prefix = parts.next().unwrap_or("").trim_matches('/');
    if host.is_empty() || bucket.is_empty() {
        return Err(usage(format!(
            "--repository {repo}: an S3 repository is s3:http(s)://host[:port]/bucket[/prefix]"
        )));
    }
    Ok(S3Location {
        endpoint: format!("{endpoint_scheme}{host}"),
        bucket: bucket.to_string(),
        prefix: prefix.to_string(),
        region: region.to_string(),
    })
}

/// A URL without its user info, for messages and the result.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if !u.username().is_empty() || u.password().is_some() => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.to_string()
        }
        _ => url.to_string(),
    }
}

/// Velero's restic repositories live under `<bucket url>/restic/<namespace>`
/// and, unless the user changed it, are encrypted with this password
/// (Velero's `velero-repo-credentials` secret, key `repository-password`).
pub const VELERO_DEFAULT_PASSWORD: &str = "static-passw0rd";

pub fn velero_repository(bucket_url: &str, namespace: &str) -> Result<String> {
    if namespace.is_empty() || namespace.contains('/') {
        return Err(usage(format!(
            "--velero-namespace '{namespace}' is not a namespace name"
        )));
    }
    Ok(format!(
        "{}/restic/{namespace}",
        bucket_url.trim_end_matches('/')
    ))
}

/// What the run restores, validated.
pub enum Source {
    Restic(Box<ResticSource>),
    Archive(String),
    Image(String),
}

pub struct ResticSource {
    pub location: RepoLocation,
    pub password: Secret,
    pub s3_keys: Option<(Secret, Secret)>,
    pub snapshot: String,
    pub hosts: Vec<String>,
    pub tags: Vec<String>,
    pub paths: Vec<String>,
    pub includes: Vec<String>,
    pub connections: usize,
    /// `--ca-file`, trusted by the connection to an HTTPS REST server or S3
    /// endpoint.
    pub ca_file: Option<PathBuf>,
}

impl Args {
    pub fn source(&self) -> Result<Source> {
        let s = &self.source;
        if let Some(archive) = &s.archive {
            return Ok(Source::Archive(archive.clone()));
        }
        if let Some(image) = &s.image {
            return Ok(Source::Image(image.clone()));
        }
        let r = &self.restic;
        let region = r
            .region
            .clone()
            .or_else(|| env_nonempty("AWS_DEFAULT_REGION"))
            .or_else(|| env_nonempty("AWS_REGION"))
            .unwrap_or_else(|| "us-east-1".into());
        let (repo, default_password) = match (&s.repository, &s.velero_namespace) {
            (Some(repo), _) => (repo.clone(), None),
            (None, Some(ns)) => {
                let bucket = r.velero_bucket_url.as_deref().unwrap_or_default();
                (
                    velero_repository(bucket, ns)?,
                    Some(Secret::new(VELERO_DEFAULT_PASSWORD)),
                )
            }
            (None, None) => {
                return Err(usage(
                    "give a source: --repository, --velero-namespace, --archive or --image".into(),
                ))
            }
        };
        let location = RepoLocation::parse(&repo, &region)?;
        let password = secret_from(
            r.password_file.as_deref(),
            "POPULATOR_PASSWORD",
            "repository password",
        )?
        .or_else(|| env_nonempty("RESTIC_PASSWORD").map(Secret::new))
        .or(default_password)
        .ok_or_else(|| {
            usage(
                "the repository password is missing: give --password-file (or POPULATOR_PASSWORD)"
                    .into(),
            )
        })?;
        let s3_keys = match &location {
            RepoLocation::S3(_) => Some(s3_keys(r)?),
            _ => None,
        };
        let snapshot = r.snapshot.trim().to_string();
        if snapshot != "latest" && !snapshot.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(usage(format!(
                "--snapshot '{snapshot}' is neither 'latest' nor a snapshot ID (hex)"
            )));
        }
        Ok(Source::Restic(Box::new(ResticSource {
            location,
            password,
            s3_keys,
            snapshot,
            hosts: r.hosts.clone(),
            tags: r.tags.clone(),
            paths: r.paths.clone(),
            includes: r.includes.clone(),
            connections: r.connections as usize,
            ca_file: self.stream.ca_file.clone(),
        })))
    }

    pub fn http_options(&self) -> HttpOptions {
        HttpOptions {
            ca_file: self.stream.ca_file.clone(),
            insecure_skip_tls_verify: self.stream.insecure_skip_tls_verify,
            proxy: None,
            timeout: Duration::from_secs(30),
            retries: 5,
            retry_backoff: Duration::from_secs(1),
        }
    }
}

fn s3_keys(r: &ResticArgs) -> Result<(Secret, Secret)> {
    let id = secret_from(
        r.access_key_id_file.as_deref(),
        "AWS_ACCESS_KEY_ID",
        "S3 access key ID",
    )?;
    let key = secret_from(
        r.secret_access_key_file.as_deref(),
        "AWS_SECRET_ACCESS_KEY",
        "S3 secret access key",
    )?;
    match (id, key) {
        (Some(id), Some(key)) => Ok((id, key)),
        _ => Err(usage(
            "an S3 repository needs credentials: --access-key-id-file and --secret-access-key-file (or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)".into(),
        )),
    }
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

pub fn usage(message: String) -> anyhow::Error {
    fail(Kind::Usage, "InvalidConfiguration", message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_names() {
        assert_eq!(
            RepoLocation::parse("/srv/repo", "r").unwrap(),
            RepoLocation::Local("/srv/repo".into())
        );
        assert_eq!(
            RepoLocation::parse("rest:http://h:8000/x", "r").unwrap(),
            RepoLocation::Rest("http://h:8000/x".into())
        );
        let RepoLocation::S3(s3) =
            RepoLocation::parse("s3:http://h:8333/bucket/a/b/", "eu").unwrap()
        else {
            panic!("not s3")
        };
        assert_eq!(s3.endpoint, "http://h:8333");
        assert_eq!(s3.bucket, "bucket");
        assert_eq!(s3.prefix, "a/b");
        assert_eq!(s3.region, "eu");
        let RepoLocation::S3(aws) = RepoLocation::parse("s3:s3.amazonaws.com/b", "r").unwrap()
        else {
            panic!("not s3")
        };
        assert_eq!(aws.endpoint, "https://s3.amazonaws.com");
        assert_eq!(aws.prefix, "");
        assert!(RepoLocation::parse("sftp:host:/x", "r").is_err());
        assert!(RepoLocation::parse("s3:http://h", "r").is_err());
    }

    #[test]
    fn velero_path() {
        assert_eq!(
            velero_repository("s3:http://minio:9000/velero/", "app").unwrap(),
            "s3:http://minio:9000/velero/restic/app"
        );
        assert!(velero_repository("s3:x/b", "a/b").is_err());
    }
}
