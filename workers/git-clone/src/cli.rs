//! git-clone's flags, and their validation into a [`Config`] (no I/O besides
//! reading the secret files the flags name).

use std::path::PathBuf;

use anyhow::Result;
use populator_core::error::{fail, Kind};
use populator_core::http::HttpOptions;
use populator_core::options::{CommonArgs, NetworkArgs};
use populator_core::secrets::{read_secret_file, secret_from, Secret};

use crate::repo_url::RepoUrl;

/// Fill a volume with a Git repository checked out at a pinned ref: a branch,
/// a tag or a commit, shallow by default, with its submodules.
#[derive(clap::Parser, Debug)]
#[command(name = "git-clone", version, about, max_term_width = 100)]
pub struct Args {
    /// The repository: https://, http://, ssh://, user@host:path (scp-like),
    /// git:// or file://. Credentials never go in the URL: use the files below.
    #[arg(long, env = "POPULATOR_REPO", value_name = "URL")]
    pub repo: String,

    /// What to check out: a branch, a tag (annotated or lightweight), a full
    /// 40-hex commit SHA, or HEAD (the remote's default branch).
    #[arg(
        long = "ref",
        env = "POPULATOR_REF",
        default_value = "HEAD",
        value_name = "REF"
    )]
    pub git_ref: String,

    /// Commits of history to fetch; 0 fetches the whole history.
    #[arg(long, env = "POPULATOR_DEPTH", default_value_t = 1, value_name = "N")]
    pub depth: u32,

    /// Submodules: none, the first level only (shallow), or all levels.
    #[arg(
        long,
        env = "POPULATOR_SUBMODULES",
        value_enum,
        default_value = "recursive",
        value_name = "MODE"
    )]
    pub submodules: SubmoduleMode,

    /// Check out only this path (a file or a directory; repeatable).
    #[arg(
        long = "sparse",
        env = "POPULATOR_SPARSE",
        value_name = "PATH",
        value_delimiter = ','
    )]
    pub sparse: Vec<String>,

    /// Put the checkout in this directory of the target instead of its root.
    #[arg(long, env = "POPULATOR_SUBDIR", value_name = "NAME")]
    pub subdir: Option<String>,

    /// Leave only the files: no .git directory.
    #[arg(long, env = "POPULATOR_NO_GIT_DIR", action = clap::ArgAction::SetTrue, value_parser = clap::builder::BoolishValueParser::new())]
    pub no_git_dir: bool,

    /// Make every file and directory group-writable (for volumes shared with other uids).
    #[arg(long, env = "POPULATOR_GROUP_WRITE", action = clap::ArgAction::SetTrue, value_parser = clap::builder::BoolishValueParser::new())]
    pub group_write: bool,

    /// Fail with exit 3 unless the ref resolves to this commit (full SHA or a
    /// prefix of at least 7 hex digits).
    #[arg(long, env = "POPULATOR_EXPECT_COMMIT", value_name = "SHA")]
    pub expect_commit: Option<String>,

    /// Also write the commit SHA checked out to this file.
    #[arg(long, env = "POPULATOR_COMMIT_FILE", value_name = "PATH")]
    pub commit_file: Option<PathBuf>,

    /// Threads writing files during the checkout (default: the CPUs, at most 8).
    #[arg(long, env = "POPULATOR_CHECKOUT_THREADS", value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub checkout_threads: Option<u16>,

    #[command(flatten)]
    pub auth: AuthArgs,

    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SubmoduleMode {
    Off,
    Shallow,
    Recursive,
}

/// The network flags are the core's; their help says what they mean for Git.
#[derive(clap::Args, Debug)]
#[command(
    next_help_heading = "Authentication and network",
    mut_arg("insecure_skip_tls_verify", |a| a.help(
        "Do not verify the HTTPS server's certificate (logs a warning)"
    )),
    mut_arg("proxy", |a| a.help(
        "Proxy URL for http(s) remotes (HTTPS_PROXY, HTTP_PROXY and NO_PROXY are honoured without it)"
    )),
    mut_arg("retries", |a| a.help(
        "Attempts after a network failure before giving up with exit 75"
    )),
    mut_arg("timeout", |a| a.help(
        "Connect timeout, and the longest the server may stay silent, in seconds"
    ))
)]
pub struct AuthArgs {
    /// Private SSH key (OpenSSH or PEM: ed25519, rsa, ecdsa).
    #[arg(long, env = "POPULATOR_SSH_KEY_FILE", value_name = "PATH")]
    pub ssh_key_file: Option<PathBuf>,

    /// File holding the passphrase of the SSH key.
    #[arg(long, env = "POPULATOR_SSH_KEY_PASSPHRASE_FILE", value_name = "PATH")]
    pub ssh_key_passphrase_file: Option<PathBuf>,

    /// known_hosts file the SSH server's host key must be in (checked strictly).
    #[arg(long, env = "POPULATOR_KNOWN_HOSTS_FILE", value_name = "PATH")]
    pub known_hosts_file: Option<PathBuf>,

    /// Accept any SSH host key (logs a warning; for tests only).
    #[arg(long, env = "POPULATOR_SSH_ACCEPT_ANY_HOST_KEY", action = clap::ArgAction::SetTrue, value_parser = clap::builder::BoolishValueParser::new())]
    pub ssh_accept_any_host_key: bool,

    /// File holding the user name for HTTPS (or for SSH instead of the URL's).
    #[arg(long, env = "POPULATOR_USERNAME_FILE", value_name = "PATH")]
    pub username_file: Option<PathBuf>,

    /// File holding the HTTPS password.
    #[arg(long, env = "POPULATOR_PASSWORD_FILE", value_name = "PATH")]
    pub password_file: Option<PathBuf>,

    /// File holding an access token for HTTPS (sent as the password of basic
    /// authentication, with user name "oauth2" unless --username-file is given).
    #[arg(long, env = "POPULATOR_TOKEN_FILE", value_name = "PATH")]
    pub token_file: Option<PathBuf>,

    #[command(flatten)]
    pub network: NetworkArgs,
}

/// What the ref names, as far as can be told before asking the remote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WantRef {
    Head,
    Name(String),
    Commit(git2::Oid),
}

impl WantRef {
    pub fn parse(s: &str) -> Result<WantRef> {
        let s = s.trim();
        if s.is_empty() || s == "HEAD" {
            return Ok(WantRef::Head);
        }
        if s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(WantRef::Commit(git2::Oid::from_str(s)?));
        }
        if git2::Reference::is_valid_name(&format!("refs/heads/{s}"))
            || git2::Reference::is_valid_name(s)
        {
            return Ok(WantRef::Name(s.to_string()));
        }
        Err(usage(format!(
            "--ref '{s}' is not a valid branch, tag or full commit SHA"
        )))
    }
}

/// Credentials for basic authentication over HTTP(S).
#[derive(Clone, Debug)]
pub struct UserPass {
    pub username: String,
    pub password: Secret,
}

/// Validated authentication and network settings, secrets read.
#[derive(Clone, Debug)]
pub struct AuthConfig {
    pub ssh_key: Option<PathBuf>,
    pub ssh_passphrase: Option<Secret>,
    pub known_hosts: Option<crate::known_hosts::KnownHosts>,
    pub accept_any_host_key: bool,
    pub username: Option<String>,
    pub basic: Option<UserPass>,
    /// TLS trust, proxy, retries and timeouts.
    pub network: HttpOptions,
}

/// Everything the run needs, validated.
pub struct Config {
    pub repo: RepoUrl,
    pub want: WantRef,
    pub depth: u32,
    pub submodules: SubmoduleMode,
    pub sparse: Vec<String>,
    pub subdir: Option<String>,
    pub no_git_dir: bool,
    pub group_write: bool,
    pub expect_commit: Option<String>,
    pub commit_file: Option<PathBuf>,
    pub threads: usize,
    pub auth: AuthConfig,
}

impl Args {
    pub fn config(&self) -> Result<Config> {
        let repo = RepoUrl::parse(&self.repo)?;
        let want = WantRef::parse(&self.git_ref)?;
        let sparse = self
            .sparse
            .iter()
            .map(|p| normalize_sparse(p))
            .collect::<Result<Vec<_>>>()?;
        if let Some(sub) = &self.subdir {
            populator_core::content::validate_file_name(sub)
                .map_err(|e| usage(format!("--subdir '{sub}': {e}")))?;
        }
        let expect_commit = match &self.expect_commit {
            None => None,
            Some(s) => {
                let s = s.trim().to_ascii_lowercase();
                if s.len() < 7 || s.len() > 40 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(usage(format!(
                        "--expect-commit '{s}' is not a commit SHA (7 to 40 hex digits)"
                    )));
                }
                Some(s)
            }
        };
        let threads = match self.checkout_threads {
            Some(n) => n as usize,
            None => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
                .min(8),
        };
        if self.depth > i32::MAX as u32 {
            return Err(usage("--depth is too large"));
        }
        Ok(Config {
            auth: self.auth.config(&repo)?,
            repo,
            want,
            depth: self.depth,
            submodules: self.submodules,
            sparse,
            subdir: self.subdir.clone(),
            no_git_dir: self.no_git_dir,
            group_write: self.group_write,
            expect_commit,
            commit_file: self.commit_file.clone(),
            threads,
        })
    }
}

impl AuthArgs {
    fn config(&self, repo: &RepoUrl) -> Result<AuthConfig> {
        if let Some(key) = &self.ssh_key_file {
            std::fs::File::open(key).map_err(|e| {
                fail(
                    Kind::Usage,
                    "SecretUnreadable",
                    format!("cannot read the SSH key file {}: {e}", key.display()),
                )
            })?;
        }
        let ssh_passphrase = match &self.ssh_key_passphrase_file {
            Some(p) => Some(read_secret_file(p, "SSH key passphrase")?),
            None => None,
        };
        let known_hosts = match &self.known_hosts_file {
            Some(p) => Some(crate::known_hosts::KnownHosts::load(p)?),
            None => None,
        };
        let username = secret_from(
            self.username_file.as_deref(),
            "POPULATOR_USERNAME",
            "username",
        )?
        .map(|s| s.expose().to_string());
        let password = secret_from(
            self.password_file.as_deref(),
            "POPULATOR_PASSWORD",
            "password",
        )?;
        let token = secret_from(self.token_file.as_deref(), "POPULATOR_TOKEN", "token")?;
        let basic = match (password, token) {
            (Some(_), Some(_)) => {
                return Err(usage(
                    "give a password or a token (--password-file, --token-file), not both",
                ))
            }
            (Some(password), None) => {
                let username = username
                    .clone()
                    .or_else(|| repo.user.clone())
                    .ok_or_else(|| usage("a password needs a user name: give --username-file"))?;
                Some(UserPass { username, password })
            }
            (None, Some(token)) => Some(UserPass {
                username: username.clone().unwrap_or_else(|| "oauth2".into()),
                password: token,
            }),
            (None, None) => None,
        };
        Ok(AuthConfig {
            ssh_key: self.ssh_key_file.clone(),
            ssh_passphrase,
            known_hosts,
            accept_any_host_key: self.ssh_accept_any_host_key,
            username,
            basic,
            network: self.network.options()?,
        })
    }
}

/// A sparse path as a clean relative path with `/` separators.
fn normalize_sparse(p: &str) -> Result<String> {
    let parts: Vec<&str> = p
        .split('/')
        .filter(|s| !s.is_empty() && *s != ".")
        .collect();
    if parts.is_empty() || parts.contains(&"..") {
        return Err(usage(format!(
            "--sparse '{p}' must be a path inside the repository (no '..', not empty)"
        )));
    }
    Ok(parts.join("/"))
}

pub fn usage(message: impl Into<String>) -> anyhow::Error {
    fail(Kind::Usage, "InvalidConfiguration", message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refs() {
        assert_eq!(WantRef::parse("HEAD").unwrap(), WantRef::Head);
        assert_eq!(
            WantRef::parse("v1.0").unwrap(),
            WantRef::Name("v1.0".into())
        );
        let sha = "0123456789abcdef0123456789abcdef01234567";
        assert!(matches!(WantRef::parse(sha).unwrap(), WantRef::Commit(_)));
        assert!(WantRef::parse("a..b").is_err());
    }

    #[test]
    fn sparse_paths() {
        assert_eq!(normalize_sparse("/docs/").unwrap(), "docs");
        assert_eq!(normalize_sparse("./a//b").unwrap(), "a/b");
        assert!(normalize_sparse("../x").is_err());
        assert!(normalize_sparse("/").is_err());
    }
}
