//! Real Git servers on loopback for the git-clone tests, one of each per test
//! process: git-http-backend behind nginx + fcgiwrap (smart HTTP, a location
//! behind basic auth, the same over TLS with a test CA), `git daemon`, and
//! sshd with an ed25519 host key, a client key and a known_hosts file. All
//! serve the bare repositories under one directory and die with the test
//! process.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use crate::nginx::free_port;
use crate::spawn::{spawn_for_life, wait_listening};
use crate::tls::{make_ca, TestCa};
use crate::{scratch, sh};

pub const GIT_USER: &str = "cloner";
pub const GIT_PASSWORD: &str = "gitpw-83c1f0e9";
/// Accepted as the password of user "oauth2" (how --token-file sends it).
pub const GIT_TOKEN: &str = "gittok-5d2a7b11";

/// Where the bare repositories live; every server exports this directory.
pub fn git_root() -> &'static PathBuf {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let root = scratch().join("git-root");
        std::fs::create_dir_all(&root).unwrap();
        root
    })
}

/// Starts `cmd` for the rest of the test process; returns once `port` accepts.
fn spawn_server(cmd: Command, addr: &str, port: u16, what: &str, log: &Path) {
    spawn_for_life(cmd, what, Some(log.to_path_buf()));
    assert!(
        wait_listening(addr, &[port], Duration::from_secs(5)),
        "{what} did not start on port {port}; its log:\n{}",
        std::fs::read_to_string(log_path(what)).unwrap_or_default()
    );
}

fn log_path(what: &str) -> PathBuf {
    scratch().join(format!("{}.log", what.replace(' ', "-")))
}

/// nginx + fcgiwrap + git-http-backend.
pub struct GitHttp {
    pub port: u16,
    pub tls_port: u16,
    pub ca: TestCa,
}

impl GitHttp {
    /// Open smart HTTP: `http://127.0.0.1:PORT/git/NAME`.
    pub fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/git/{name}", self.port)
    }
    /// Behind basic auth (GIT_USER/GIT_PASSWORD, or oauth2/GIT_TOKEN).
    pub fn auth_url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/auth/{name}", self.port)
    }
    pub fn tls_url(&self, name: &str) -> String {
        format!("https://localhost:{}/git/{name}", self.tls_port)
    }
}

pub fn git_http() -> &'static GitHttp {
    static SERVER: OnceLock<GitHttp> = OnceLock::new();
    SERVER.get_or_init(start_git_http)
}

fn start_git_http() -> GitHttp {
    let dir = scratch().join("git-http");
    std::fs::create_dir_all(dir.join("tmp")).unwrap();
    let ca = make_ca(&dir.join("tls"));
    let hash = |pw: &str| {
        sh(&format!("openssl passwd -apr1 '{pw}'"))
            .trim()
            .to_string()
    };
    std::fs::write(
        dir.join("htpasswd"),
        format!(
            "{GIT_USER}:{}\noauth2:{}\n",
            hash(GIT_PASSWORD),
            hash(GIT_TOKEN)
        ),
    )
    .unwrap();
    let socket = dir.join("fcgiwrap.sock");
    let _ = std::fs::remove_file(&socket);
    let mut fcgi = Command::new("fcgiwrap");
    // One process (-c 1): preforked children would outlive the test process.
    fcgi.arg("-c")
        .arg("1")
        .arg("-s")
        .arg(format!("unix:{}", socket.display()));
    // fcgiwrap listens on a socket, not a port: wait for the socket file.
    {
        spawn_for_life(fcgi, "fcgiwrap", Some(log_path("fcgiwrap")));
        for _ in 0..200 {
            if socket.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        assert!(
            socket.exists(),
            "fcgiwrap did not create {}",
            socket.display()
        );
    }
    let (port, tls_port) = (free_port(), free_port());
    let d = dir.display();
    let root = git_root().display();
    let backend = |prefix: &str, auth: &str| {
        format!(
            r#"
    location ~ ^/{prefix}(/.*)$ {{
      {auth}
      client_max_body_size 0;
      fastcgi_pass unix:{sock};
      include /etc/nginx/fastcgi_params;
      fastcgi_param SCRIPT_FILENAME /usr/lib/git-core/git-http-backend;
      fastcgi_param GIT_PROJECT_ROOT {root};
      fastcgi_param GIT_HTTP_EXPORT_ALL "";
      fastcgi_param PATH_INFO $1;
      fastcgi_param REMOTE_USER $remote_user;
    }}"#,
            sock = socket.display()
        )
    };
    let conf = format!(
        r#"
master_process off;
worker_processes 1;
error_log {d}/error.log warn;
pid {d}/nginx.pid;
events {{ worker_connections 512; }}
http {{
  access_log off;
  client_body_temp_path {d}/tmp/body; proxy_temp_path {d}/tmp/proxy;
  fastcgi_temp_path {d}/tmp/fastcgi; uwsgi_temp_path {d}/tmp/uwsgi; scgi_temp_path {d}/tmp/scgi;
  server {{
    listen 127.0.0.1:{port};
    listen 127.0.0.1:{tls_port} ssl;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    {open}
    {auth}
  }}
}}
"#,
        cert = ca.server_cert.display(),
        key = ca.server_key.display(),
        open = backend("git", ""),
        auth = backend(
            "auth",
            &format!(r#"auth_basic "git"; auth_basic_user_file {d}/htpasswd;"#)
        ),
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let mut cmd = Command::new("nginx");
    cmd.arg("-c").arg(&conf_path).arg("-g").arg("daemon off;");
    spawn_server(cmd, "127.0.0.1", port, "git nginx", &log_path("git nginx"));
    GitHttp { port, tls_port, ca }
}

/// `git daemon` exporting every repository under [`git_root`].
pub struct GitDaemon {
    pub port: u16,
}

impl GitDaemon {
    pub fn url(&self, name: &str) -> String {
        format!("git://127.0.0.1:{}/{name}", self.port)
    }
}

pub fn git_daemon() -> &'static GitDaemon {
    static SERVER: OnceLock<GitDaemon> = OnceLock::new();
    SERVER.get_or_init(|| {
        let port = free_port();
        // git-daemon itself, not `git daemon`: PDEATHSIG reaches only the
        // direct child.
        let exec_path = sh("git --exec-path").trim().to_string();
        let mut cmd = Command::new(Path::new(&exec_path).join("git-daemon"));
        cmd.arg("--reuseaddr")
            .arg("--export-all")
            .arg("--listen=127.0.0.1")
            .arg(format!("--port={port}"))
            .arg(format!("--base-path={}", git_root().display()))
            .arg(git_root());
        spawn_server(
            cmd,
            "127.0.0.1",
            port,
            "git daemon",
            &log_path("git daemon"),
        );
        GitDaemon { port }
    })
}

/// sshd on a free loopback port: ed25519 host key, key-only login as root.
pub struct Sshd {
    pub addr: &'static str,
    pub port: u16,
    /// The client's ed25519 private key (authorized).
    pub key: PathBuf,
    /// An ed25519 key protected by a passphrase (authorized), and the passphrase.
    pub key_with_passphrase: PathBuf,
    pub passphrase: &'static str,
    /// RSA and ECDSA client keys (authorized).
    pub rsa_key: PathBuf,
    pub ecdsa_key: PathBuf,
    /// A key the server does not know.
    pub stranger_key: PathBuf,
    /// `[127.0.0.1]:PORT ssh-ed25519 …`, the server's real host key.
    pub known_hosts: PathBuf,
    /// The same host with another ed25519 key: a changed host key.
    pub wrong_known_hosts: PathBuf,
    /// Lists only another host.
    pub other_known_hosts: PathBuf,
}

impl Sshd {
    pub fn url(&self, name: &str) -> String {
        format!(
            "ssh://root@{}:{}{}/{name}",
            self.addr,
            self.port,
            git_root().display()
        )
    }

    /// `root@ADDR:/path/NAME`, scp-like (port 22 only).
    pub fn scp_url(&self, name: &str) -> String {
        format!("root@{}:{}/{name}", self.addr, git_root().display())
    }
}

pub fn sshd() -> &'static Sshd {
    static SERVER: OnceLock<Sshd> = OnceLock::new();
    SERVER.get_or_init(|| start_sshd("127.0.0.1", free_port(), "sshd"))
}

/// An sshd on 127.0.0.2 port 22, for scp-like URLs (which cannot name a port).
pub fn sshd_port_22() -> &'static Sshd {
    static SERVER: OnceLock<Sshd> = OnceLock::new();
    SERVER.get_or_init(|| {
        assert!(
            std::net::TcpListener::bind("127.0.0.2:22").is_ok(),
            "port 22 on 127.0.0.2 is taken: the scp-like URL test needs it for its own sshd"
        );
        start_sshd("127.0.0.2", 22, "sshd-22")
    })
}

fn keygen(path: &Path, kind: &str, passphrase: &str) {
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(path.with_extension("pub"));
    sh(&format!(
        "ssh-keygen -q -t {kind} -N '{passphrase}' -C test -f {}",
        path.display()
    ));
}

fn pub_key(path: &Path) -> String {
    std::fs::read_to_string(format!("{}.pub", path.display())).unwrap()
}

fn start_sshd(addr: &'static str, port: u16, name: &str) -> Sshd {
    let dir = scratch().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::create_dir_all("/run/sshd").unwrap();
    let host_key = dir.join("host_ed25519");
    keygen(&host_key, "ed25519", "");
    let other_host_key = dir.join("other_host_ed25519");
    keygen(&other_host_key, "ed25519", "");
    let key = dir.join("client_ed25519");
    keygen(&key, "ed25519", "");
    let key_with_passphrase = dir.join("client_pass_ed25519");
    let passphrase = "open-sesame-42";
    keygen(&key_with_passphrase, "ed25519", passphrase);
    let rsa_key = dir.join("client_rsa");
    sh(&format!(
        "ssh-keygen -q -t rsa -b 3072 -m PEM -N '' -C test -f {}",
        rsa_key.display()
    ));
    let ecdsa_key = dir.join("client_ecdsa");
    keygen(&ecdsa_key, "ecdsa", "");
    let stranger_key = dir.join("stranger_ed25519");
    keygen(&stranger_key, "ed25519", "");
    let authorized = dir.join("authorized_keys");
    std::fs::write(
        &authorized,
        [&key, &key_with_passphrase, &rsa_key, &ecdsa_key]
            .iter()
            .map(|k| pub_key(k))
            .collect::<String>(),
    )
    .unwrap();
    let host = if port == 22 {
        addr.to_string()
    } else {
        format!("[{addr}]:{port}")
    };
    let host_line = |k: &Path, host: &str| {
        let p = pub_key(k);
        let mut f = p.split_whitespace();
        format!("{host} {} {}\n", f.next().unwrap(), f.next().unwrap())
    };
    let known_hosts = dir.join("known_hosts");
    std::fs::write(&known_hosts, host_line(&host_key, &host)).unwrap();
    let wrong_known_hosts = dir.join("known_hosts_wrong");
    std::fs::write(&wrong_known_hosts, host_line(&other_host_key, &host)).unwrap();
    let other_known_hosts = dir.join("known_hosts_other");
    std::fs::write(&other_known_hosts, host_line(&host_key, "git.example.com")).unwrap();
    let config = dir.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "Port {port}\nListenAddress {addr}\nHostKey {hk}\nAuthorizedKeysFile {ak}\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
             PermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\nPidFile {pid}\n\
             LogLevel ERROR\nSubsystem sftp internal-sftp\n",
            hk = host_key.display(),
            ak = authorized.display(),
            pid = dir.join("sshd.pid").display(),
        ),
    )
    .unwrap();
    let mut cmd = Command::new("/usr/sbin/sshd");
    cmd.arg("-D").arg("-e").arg("-f").arg(&config);
    spawn_server(cmd, addr, port, name, &log_path(name));
    Sshd {
        addr,
        port,
        key,
        key_with_passphrase,
        passphrase,
        rsa_key,
        ecdsa_key,
        stranger_key,
        known_hosts,
        wrong_known_hosts,
        other_known_hosts,
    }
}

/// Git plumbing for fixtures: runs git in `dir` with a fixed identity and
/// dates, so commits are reproducible.
pub fn git(dir: &Path, args: &str) -> String {
    sh(&format!(
        "cd {} && export GIT_AUTHOR_NAME=t GIT_AUTHOR_EMAIL=t@example.com GIT_COMMITTER_NAME=t \
         GIT_COMMITTER_EMAIL=t@example.com GIT_AUTHOR_DATE='2024-01-02T03:04:05Z' \
         GIT_COMMITTER_DATE='2024-01-02T03:04:05Z' GIT_CONFIG_NOSYSTEM=1 HOME=/nonexistent && \
         git -c init.defaultBranch=main -c protocol.file.allow=always {args}",
        dir.display()
    ))
    .trim()
    .to_string()
}

/// A tree object written verbatim, names unchecked (for hostile fixtures):
/// entries are (mode, name, hex id).
pub fn raw_tree(repo: &Path, entries: &[(&str, &[u8], &str)]) -> String {
    let mut bytes = Vec::new();
    for (mode, name, id) in entries {
        bytes.extend_from_slice(mode.as_bytes());
        bytes.push(b' ');
        bytes.extend_from_slice(name);
        bytes.push(0);
        bytes.extend_from_slice(&hex::decode(id).unwrap());
    }
    let tmp = repo.join("raw-tree.bin");
    std::fs::write(&tmp, bytes).unwrap();
    let id = git(
        repo,
        &format!("hash-object -t tree --literally -w {}", tmp.display()),
    );
    std::fs::remove_file(tmp).unwrap();
    id
}

/// A blob with `content`, by id.
pub fn blob(repo: &Path, content: &str) -> String {
    let tmp = repo.join("blob.tmp");
    std::fs::write(&tmp, content).unwrap();
    let id = git(repo, &format!("hash-object -w {}", tmp.display()));
    std::fs::remove_file(tmp).unwrap();
    id
}
