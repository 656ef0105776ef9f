//! Opening a restic repository through rustic_core and choosing the
//! snapshot; rustic's errors turned into the contract's kinds.

use std::sync::Arc;

use anyhow::Result;
use populator_core::error::{fail, Kind};
use rustic_core::repofile::SnapshotFile;
use rustic_core::{
    Credentials, IndexedFullStatus, Repository, RepositoryBackends, RepositoryOptions, RusticError,
    StringList, WriteBackend,
};

use crate::cli::{RepoLocation, ResticSource};
use crate::s3::S3Backend;

pub type IndexedRepo = Repository<IndexedFullStatus>;

/// Opens, checks the password and reads the index; the storage comes back
/// too, for reading pack ranges.
pub fn open(source: &ResticSource) -> Result<(IndexedRepo, Arc<dyn WriteBackend>)> {
    let name = source.location.display();
    // --ca-file, read and checked by the core (the workers' one message for
    // a file that cannot be read or holds no certificate) before a client
    // is built on it.
    let ca_certificates = || {
        source
            .ca_file
            .as_deref()
            .map(populator_core::tls::ca_certificates)
            .transpose()
    };
    let backend: Arc<dyn WriteBackend> = match &source.location {
        RepoLocation::Local(path) => {
            if !path.join("config").is_file() {
                return Err(fail(
                    Kind::Usage,
                    "RepositoryNotFound",
                    format!(
                        "no restic repository at {} (no config file there): check --repository",
                        path.display()
                    ),
                ));
            }
            let path = path
                .to_str()
                .ok_or_else(|| crate::cli::usage(format!("{} is not UTF-8", path.display())))?;
            Arc::new(
                rustic_backend::LocalBackend::new(path, std::iter::empty())
                    .map_err(|e| from_rustic(&e, Kind::Usage, "RepositoryNotFound", &name))?,
            )
        }
        RepoLocation::Rest(url) => {
            // rustic's REST client trusts the system roots plus `cacert`
            // (a path: it reads the file again).
            ca_certificates()?;
            let ca = source
                .ca_file
                .as_ref()
                .map(|ca| ("cacert".to_string(), ca.to_string_lossy().into_owned()));
            Arc::new(
                rustic_backend::RestBackend::new(url, ca)
                    .map_err(|e| from_rustic(&e, Kind::Usage, "InvalidConfiguration", &name))?,
            )
        }
        RepoLocation::S3(location) => {
            let (id, key) = source.s3_keys.as_ref().expect("S3 keys are checked in cli");
            let ca = ca_certificates()?;
            Arc::new(
                S3Backend::new(location, id, key, ca.as_deref()).map_err(|e| {
                    fail(
                        Kind::Usage,
                        "InvalidConfiguration",
                        format!("S3 repository {name}: {e:#}"),
                    )
                })?,
            )
        }
    };
    let options = RepositoryOptions::default().no_cache(true);
    let repo = Repository::new(&options, &RepositoryBackends::new(backend.clone(), None))
        .map_err(|e| from_rustic(&e, Kind::Usage, "InvalidConfiguration", &name))?;
    let repo = repo
        .open(&Credentials::password(source.password.expose()))
        .map_err(|e| open_error(&e, &name))?;
    let repo = repo
        .to_indexed()
        .map_err(|e| from_rustic(&e, Kind::Integrity, "CorruptRepository", &name))?;
    Ok((repo, backend))
}

/// The snapshot asked for, among those that pass the filters.
pub fn select_snapshot(repo: &IndexedRepo, source: &ResticSource) -> Result<SnapshotFile> {
    let tag_lists: Vec<StringList> = source
        .tags
        .iter()
        .map(|t| t.parse::<StringList>().unwrap_or_default())
        .collect();
    let filter = |snap: &SnapshotFile| {
        (source.hosts.is_empty() || source.hosts.contains(&snap.hostname))
            && (tag_lists.is_empty() || snap.tags.matches(&tag_lists))
            && source
                .paths
                .iter()
                .all(|p| snap.paths.iter().any(|sp| sp == p))
    };
    repo.get_snapshot_from_str(&source.snapshot, filter)
        .map_err(|e| {
            let what = if source.snapshot == "latest" {
                let mut filters = Vec::new();
                if !source.hosts.is_empty() {
                    filters.push(format!("host {}", source.hosts.join("|")));
                }
                if !source.tags.is_empty() {
                    filters.push(format!("tags {}", source.tags.join("|")));
                }
                if !source.paths.is_empty() {
                    filters.push(format!("path {}", source.paths.join(" and ")));
                }
                if filters.is_empty() {
                    "the repository has no snapshot".to_string()
                } else {
                    format!("no snapshot matches {}", filters.join(", "))
                }
            } else {
                format!("snapshot {} not found", source.snapshot)
            };
            fail(
                Kind::Usage,
                "SnapshotNotFound",
                format!(
                    "{what} in {} ({}): check --snapshot, --host, --tag and --path",
                    source.location.display(),
                    rustic_message(&e)
                ),
            )
        })
}

/// Opening fails for a wrong password, for a repository that is not there,
/// or because the storage refused us.
fn open_error(err: &RusticError, name: &str) -> anyhow::Error {
    let message = rustic_message(err);
    if err.is_incorrect_password() {
        return fail(
            Kind::Auth,
            "WrongPassword",
            format!("the password does not open repository {name}: check --password-file"),
        );
    }
    if is_auth_refusal(&message) {
        return fail(
            Kind::Auth,
            "Unauthorized",
            format!("repository {name} refused the credentials: {message}"),
        );
    }
    if message.contains("No repository config file found")
        || message.contains("NoSuchBucket")
        || message.contains("404")
    {
        return fail(
            Kind::Usage,
            "RepositoryNotFound",
            format!("no restic repository at {name}: {message}"),
        );
    }
    if message.contains("onnect") || message.contains("timed out") {
        return fail(
            Kind::Transient,
            "RepositoryUnreachable",
            format!("repository {name} is unreachable: {message}"),
        );
    }
    fail(
        Kind::Internal,
        "InternalError",
        format!("opening repository {name}: {message}"),
    )
}

fn is_auth_refusal(message: &str) -> bool {
    [
        "403",
        "401",
        "SignatureDoesNotMatch",
        "InvalidAccessKeyId",
        "AccessDenied",
        "PermissionDenied",
    ]
    .iter()
    .any(|needle| message.contains(needle))
}

pub fn from_rustic(
    err: &RusticError,
    kind: Kind,
    reason: &'static str,
    name: &str,
) -> anyhow::Error {
    fail(
        kind,
        reason,
        format!("repository {name}: {}", rustic_message(err)),
    )
}

/// rustic's error on one line: its guidance with the context filled in,
/// then the causes.
pub fn rustic_message(err: &RusticError) -> String {
    let mut out = err.display_log();
    out = out.strip_prefix("Error: ").unwrap_or(&out).to_string();
    if let Some(cut) = out.find(" (kind: related to") {
        out.truncate(cut);
    }
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        let text = cause.to_string().replace('\n', " ");
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}
