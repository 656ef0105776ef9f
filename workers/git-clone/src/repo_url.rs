//! Repository URLs in every form git accepts (https, http, ssh://, scp-like
//! `user@host:path`, git://, file:// and plain paths): what transport they
//! use, which host credentials belong to, and how a submodule's relative URL
//! resolves against its superproject's.

use anyhow::Result;

use crate::cli::usage;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Https,
    Http,
    Ssh,
    Git,
    File,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepoUrl {
    /// What libgit2 is given and what `.git/config` keeps: never a password.
    pub url: String,
    pub scheme: Scheme,
    /// Lower-case host name, `None` for local repositories.
    pub host: Option<String>,
    pub port: Option<u16>,
    pub user: Option<String>,
}

impl RepoUrl {
    pub fn parse(raw: &str) -> Result<RepoUrl> {
        let raw = raw.trim();
        if raw.is_empty() {
            return Err(usage("--repo is empty"));
        }
        if let Some((scheme, _)) = raw.split_once("://") {
            return Self::parse_url(raw, scheme);
        }
        if raw.starts_with('/') || raw.starts_with("./") || raw.starts_with("../") {
            return Ok(RepoUrl {
                url: raw.to_string(),
                scheme: Scheme::File,
                host: None,
                port: None,
                user: None,
            });
        }
        Self::parse_scp_like(raw)
    }

    fn parse_url(raw: &str, scheme: &str) -> Result<RepoUrl> {
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "https" => Scheme::Https,
            "http" => Scheme::Http,
            "ssh" | "git+ssh" | "ssh+git" => Scheme::Ssh,
            "git" => Scheme::Git,
            "file" => Scheme::File,
            other => {
                return Err(usage(format!(
                    "--repo scheme '{other}' is not supported (use https, http, ssh, git or file)"
                )))
            }
        };
        let parsed = url::Url::parse(raw)
            .map_err(|e| usage(format!("--repo '{raw}' is not a valid URL: {e}")))?;
        if parsed.password().is_some() {
            return Err(usage(
                "--repo must not carry a password: put it in --password-file or --token-file",
            ));
        }
        let user = Some(parsed.username().to_string()).filter(|u| !u.is_empty());
        let host = parsed.host_str().map(|h| h.to_ascii_lowercase());
        if scheme != Scheme::File && host.is_none() {
            return Err(usage(format!("--repo '{raw}' names no host")));
        }
        let mut url = raw.to_string();
        if scheme == Scheme::Ssh && !raw.to_ascii_lowercase().starts_with("ssh://") {
            url = format!("ssh://{}", &raw[raw.find("://").unwrap() + 3..]);
        }
        Ok(RepoUrl {
            url,
            scheme,
            host: host.filter(|_| scheme != Scheme::File),
            port: parsed.port(),
            user,
        })
    }

    /// `[user@]host:path`, as scp writes it.
    fn parse_scp_like(raw: &str) -> Result<RepoUrl> {
        let bad = || {
            usage(format!(
                "--repo '{raw}' is neither a URL (https://, ssh://, git://, file://) nor user@host:path"
            ))
        };
        let (authority, path) = raw.split_once(':').ok_or_else(bad)?;
        if authority.contains('/') || path.is_empty() {
            return Err(bad());
        }
        let (user, host) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u.to_string()), h),
            None => (None, authority),
        };
        if host.is_empty() || user.as_deref().is_some_and(|u| u.contains(':')) {
            return Err(bad());
        }
        Ok(RepoUrl {
            url: raw.to_string(),
            scheme: Scheme::Ssh,
            host: Some(host.trim_matches(['[', ']']).to_ascii_lowercase()),
            port: None,
            user,
        })
    }

    /// The port the transport connects to.
    pub fn effective_port(&self) -> Option<u16> {
        self.port.or(match self.scheme {
            Scheme::Https => Some(443),
            Scheme::Http => Some(80),
            Scheme::Ssh => Some(22),
            Scheme::Git => Some(9418),
            Scheme::File => None,
        })
    }

    /// Credentials given for `self` may go to `other`: same host and port,
    /// and the same kind of transport.
    pub fn same_origin(&self, other: &RepoUrl) -> bool {
        let family = |s: Scheme| match s {
            Scheme::Http | Scheme::Https => 0,
            other => other as u8 + 1,
        };
        self.host == other.host
            && self.effective_port() == other.effective_port()
            && family(self.scheme) == family(other.scheme)
    }

    /// A submodule URL, relative (`./x`, `../x`) to this one or absolute.
    pub fn join_submodule(&self, sub: &str) -> Result<RepoUrl> {
        if !(sub.starts_with("./") || sub.starts_with("../")) {
            return RepoUrl::parse(sub);
        }
        RepoUrl::parse(&resolve_relative(&self.url, sub))
    }
}

/// git's rule for relative submodule URLs: each `../` removes one path
/// component of the superproject's URL, `./` none; the rest is appended.
fn resolve_relative(base: &str, rel: &str) -> String {
    let mut base = base.trim_end_matches('/').to_string();
    let mut rel = rel;
    // The part of `base` that `..` may not remove: scheme and host.
    let floor = match base.find("://") {
        Some(i) => base[i + 3..]
            .find('/')
            .map(|j| i + 3 + j)
            .unwrap_or(base.len()),
        None => base.find(':').map(|i| i + 1).unwrap_or(0),
    };
    let mut separator = '/';
    loop {
        if let Some(r) = rel.strip_prefix("./") {
            rel = r;
        } else if let Some(r) = rel.strip_prefix("../") {
            rel = r;
            let cut = base[floor..].rfind('/').map(|i| floor + i);
            match cut {
                Some(i) => base.truncate(i),
                None => {
                    base.truncate(floor);
                    if base.ends_with(':') {
                        base.pop();
                        separator = ':';
                    }
                }
            }
        } else {
            break;
        }
    }
    format!("{base}{separator}{rel}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        let u = RepoUrl::parse("git@example.com:org/repo.git").unwrap();
        assert_eq!(u.scheme, Scheme::Ssh);
        assert_eq!(u.host.as_deref(), Some("example.com"));
        assert_eq!(u.user.as_deref(), Some("git"));
        let u = RepoUrl::parse("ssh://git@127.0.0.1:2222/srv/r.git").unwrap();
        assert_eq!(u.port, Some(2222));
        assert_eq!(
            RepoUrl::parse("file:///srv/r").unwrap().scheme,
            Scheme::File
        );
        assert_eq!(RepoUrl::parse("/srv/r").unwrap().scheme, Scheme::File);
        assert!(RepoUrl::parse("https://u:p@h/r").is_err());
        assert!(RepoUrl::parse("ftp://h/r").is_err());
        assert!(RepoUrl::parse("nonsense").is_err());
    }

    #[test]
    fn relative_submodules() {
        assert_eq!(
            resolve_relative("https://h/org/super.git", "../sub.git"),
            "https://h/org/sub.git"
        );
        assert_eq!(
            resolve_relative("https://h/org/super", "./sub"),
            "https://h/org/super/sub"
        );
        assert_eq!(
            resolve_relative("git@h:org/super.git", "../other.git"),
            "git@h:org/other.git"
        );
        assert_eq!(
            resolve_relative("git@h:super.git", "../other.git"),
            "git@h:other.git"
        );
        assert_eq!(
            resolve_relative("file:///srv/git/super", "../../x/sub"),
            "file:///srv/x/sub"
        );
    }

    #[test]
    fn origins() {
        let a = RepoUrl::parse("https://h/a").unwrap();
        assert!(a.same_origin(&RepoUrl::parse("https://h:443/b").unwrap()));
        assert!(!a.same_origin(&RepoUrl::parse("https://other/b").unwrap()));
        assert!(!a.same_origin(&RepoUrl::parse("https://h:8443/b").unwrap()));
    }
}
