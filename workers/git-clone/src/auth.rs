//! One remote's session: the libgit2 callbacks that hand out credentials
//! (only to the host they were given for), check the SSH host key against
//! known_hosts and the TLS certificate, count received bytes for progress,
//! and abort the transfer when SIGTERM arrives. libgit2 replaces a callback's
//! error with its own words, so the real reason is kept here to report it.

use std::cell::RefCell;

use git2::{CertificateCheckStatus, Cred, CredentialType, ProxyOptions, RemoteCallbacks};
use populator_core::error::Kind;
use populator_core::Context;

use crate::cli::AuthConfig;
use crate::known_hosts::Verdict;
use crate::repo_url::{RepoUrl, Scheme};

/// A failure a callback decided, with the contract's kind.
#[derive(Clone, Debug)]
pub struct CallbackFailure {
    pub kind: Kind,
    pub reason: &'static str,
    pub message: String,
}

pub struct Session<'a> {
    pub url: RepoUrl,
    auth: &'a AuthConfig,
    /// The credentials may be used: the URL is the one they were given for,
    /// or on the same host.
    trusted: bool,
    ctx: &'a Context,
    state: RefCell<State>,
}

#[derive(Default)]
struct State {
    asked: Vec<CredentialType>,
    failure: Option<CallbackFailure>,
    received_bytes: u64,
    objects: (usize, usize),
}

impl<'a> Session<'a> {
    pub fn new(url: RepoUrl, auth: &'a AuthConfig, trusted: bool, ctx: &'a Context) -> Self {
        Session {
            url,
            auth,
            trusted,
            ctx,
            state: RefCell::new(State::default()),
        }
    }

    pub fn auth(&self) -> &AuthConfig {
        self.auth
    }

    pub fn take_failure(&self) -> Option<CallbackFailure> {
        self.state.borrow_mut().failure.take()
    }

    /// Forget the credentials tried and the bytes counted, before a new attempt.
    pub fn reset(&self) {
        let mut s = self.state.borrow_mut();
        s.asked.clear();
        s.failure = None;
        s.received_bytes = 0;
    }

    pub fn objects(&self) -> (usize, usize) {
        self.state.borrow().objects
    }

    fn fail(&self, kind: Kind, reason: &'static str, message: String) -> git2::Error {
        let err = git2::Error::from_str(&message);
        self.state.borrow_mut().failure = Some(CallbackFailure {
            kind,
            reason,
            message,
        });
        err
    }

    pub fn callbacks(&self) -> RemoteCallbacks<'_> {
        let mut cb = RemoteCallbacks::new();
        cb.credentials(|_url, user_from_url, allowed| self.credentials(user_from_url, allowed));
        cb.certificate_check(|cert, host| self.certificate_check(cert, host));
        cb.transfer_progress(|p| {
            let mut s = self.state.borrow_mut();
            let delta = (p.received_bytes() as u64).saturating_sub(s.received_bytes);
            s.received_bytes = p.received_bytes() as u64;
            s.objects = (p.received_objects(), p.total_objects());
            self.ctx.progress.add_read(delta);
            self.ctx.progress.advance(delta);
            !self.ctx.cancel.is_cancelled()
        });
        cb.sideband_progress(|_| !self.ctx.cancel.is_cancelled());
        cb
    }

    pub fn proxy(&self) -> ProxyOptions<'static> {
        let mut p = ProxyOptions::new();
        // libgit2 tunnels only https through a proxy (plain http goes direct).
        if self.url.scheme == Scheme::Https {
            if let Some(proxy) = proxy_for(&self.url, self.auth.network.proxy.as_deref()) {
                p.url(&proxy);
            }
        }
        p
    }

    fn credentials(
        &self,
        user_from_url: Option<&str>,
        allowed: CredentialType,
    ) -> Result<Cred, git2::Error> {
        let repeated = {
            let mut s = self.state.borrow_mut();
            let repeated = s.asked.contains(&allowed);
            s.asked.push(allowed);
            repeated
        };
        let host = self.url.host.clone().unwrap_or_default();
        let user = self
            .auth
            .username
            .clone()
            .filter(|_| self.trusted)
            .or_else(|| user_from_url.map(str::to_string))
            .or_else(|| self.url.user.clone())
            .unwrap_or_else(|| "git".into());
        if allowed.contains(CredentialType::USERNAME) {
            return Cred::username(&user);
        }
        if allowed.contains(CredentialType::SSH_KEY) {
            if repeated {
                return Err(self.fail(
                    Kind::Auth,
                    "AuthenticationFailed",
                    format!("{host} refused the SSH key for user {user}: check --ssh-key-file and that the key is authorized"),
                ));
            }
            let key = self.auth.ssh_key.as_deref().filter(|_| self.trusted);
            return match key {
                Some(key) => Cred::ssh_key(
                    &user,
                    None,
                    key,
                    self.auth.ssh_passphrase.as_ref().map(|p| p.expose()),
                )
                .map_err(|e| {
                    self.fail(
                        Kind::Usage,
                        "InvalidSshKey",
                        format!(
                            "cannot use the SSH key {} (wrong passphrase or format?): {}",
                            key.display(),
                            e.message()
                        ),
                    )
                }),
                None => Err(self.fail(
                    Kind::Auth,
                    "AuthenticationRequired",
                    format!("{host} asks for an SSH key: give --ssh-key-file"),
                )),
            };
        }
        if allowed.contains(CredentialType::USER_PASS_PLAINTEXT) {
            if repeated {
                return Err(self.fail(
                    Kind::Auth,
                    "AuthenticationFailed",
                    format!("{} refused the credentials: check --username-file and --password-file or --token-file", self.url.url),
                ));
            }
            return match self.auth.basic.as_ref().filter(|_| self.trusted) {
                Some(b) => Cred::userpass_plaintext(&b.username, b.password.expose()),
                None => Err(self.fail(
                    Kind::Auth,
                    "AuthenticationRequired",
                    format!("{} asks for credentials: give --username-file and --password-file, or --token-file", self.url.url),
                )),
            };
        }
        Err(self.fail(
            Kind::Auth,
            "AuthenticationFailed",
            format!(
                "{host} asks for a kind of authentication git-clone does not offer ({allowed:?})"
            ),
        ))
    }

    fn certificate_check(
        &self,
        cert: &git2::cert::Cert<'_>,
        host: &str,
    ) -> Result<CertificateCheckStatus, git2::Error> {
        if let Some(hostkey) = cert.as_hostkey() {
            if self.auth.accept_any_host_key {
                return Ok(CertificateCheckStatus::CertificateOk);
            }
            let Some(raw) = hostkey.hostkey() else {
                return Err(self.fail(
                    Kind::Auth,
                    "HostKeyUnknown",
                    format!("{host} sent no host key"),
                ));
            };
            let Some(known) = &self.auth.known_hosts else {
                return Err(self.fail(
                    Kind::Auth,
                    "HostKeyUnknown",
                    format!("cannot verify the SSH host key of {host}: give --known-hosts-file (or --ssh-accept-any-host-key for tests)"),
                ));
            };
            let port = self.url.effective_port().unwrap_or(22);
            let fingerprint = hostkey
                .hash_sha256()
                .map(|h| format!("SHA256:{}", base64_no_pad(h)))
                .unwrap_or_default();
            return match known.check(host, port, raw) {
                Verdict::Known => Ok(CertificateCheckStatus::CertificateOk),
                Verdict::Changed => Err(self.fail(
                    Kind::Auth,
                    "HostKeyChanged",
                    format!("the SSH host key of {host} port {port} ({fingerprint}) differs from the one in the known_hosts file: the key changed or someone is intercepting; update the known_hosts file only if the change is expected"),
                )),
                Verdict::OtherTypes(types) => Err(self.fail(
                    Kind::Auth,
                    "HostKeyUnknown",
                    format!("{host} port {port} offered a host key ({fingerprint}) of a type the known_hosts file does not list for it (it lists {})", types.join(", ")),
                )),
                Verdict::Unknown => Err(self.fail(
                    Kind::Auth,
                    "HostKeyUnknown",
                    format!("{host} port {port} is not in the known_hosts file (its key is {fingerprint}); add it, e.g. from ssh-keyscan -p {port} {host}"),
                )),
                Verdict::Revoked => Err(self.fail(
                    Kind::Auth,
                    "HostKeyRevoked",
                    format!("the SSH host key of {host} ({fingerprint}) is marked @revoked"),
                )),
            };
        }
        if self.auth.network.insecure_skip_tls_verify {
            return Ok(CertificateCheckStatus::CertificateOk);
        }
        Ok(CertificateCheckStatus::CertificatePassthrough)
    }
}

/// The proxy for an http(s) remote: `--proxy`, else HTTPS_PROXY/HTTP_PROXY
/// unless NO_PROXY names the host.
fn proxy_for(url: &RepoUrl, explicit: Option<&str>) -> Option<String> {
    if let Some(p) = explicit {
        return Some(p.to_string());
    }
    let env = |names: &[&str]| {
        names
            .iter()
            .find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()))
    };
    let proxy = env(&["HTTPS_PROXY", "https_proxy"])?;
    let host = url.host.as_deref().unwrap_or("");
    let no_proxy = env(&["NO_PROXY", "no_proxy"]).unwrap_or_default();
    if no_proxy_matches(&no_proxy, host) {
        return None;
    }
    Some(proxy)
}

fn no_proxy_matches(list: &str, host: &str) -> bool {
    list.split(',').map(str::trim).any(|entry| {
        let entry = entry.split(':').next().unwrap_or("").to_ascii_lowercase();
        let bare = entry.trim_start_matches('.');
        entry == "*" || (!bare.is_empty() && (host == bare || host.ends_with(&format!(".{bare}"))))
    })
}

fn base64_no_pad(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..=c.len() {
            s.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_proxy() {
        assert!(no_proxy_matches(
            "localhost,.example.com",
            "git.example.com"
        ));
        assert!(no_proxy_matches("example.com", "example.com"));
        assert!(no_proxy_matches("*", "x"));
        assert!(!no_proxy_matches("example.com", "notexample.com"));
        assert!(!no_proxy_matches("", "x"));
    }
}
