//! A real nginx on loopback serving fixtures: plain HTTP and HTTPS (test CA),
//! locations behind basic auth, a bearer token and a secret header, fixed
//! error statuses, and a redirect to another origin. One per test process.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use crate::tls::{make_ca, TestCa};

pub const USER: &str = "importer";
pub const PASSWORD: &str = "pw-5ecret-7731";
pub const TOKEN: &str = "tok-9f8e7d6c5b";
pub const SECRET_HEADER: &str = "X-Secret-Key";
pub const SECRET_VALUE: &str = "hdr-secret-4242";

pub struct Nginx {
    pub port: u16,
    pub tls_port: u16,
    /// Served at `/` on both ports; `basic/`, `bearer/`, `header/` subdirectories are protected.
    pub www: PathBuf,
    pub ca: TestCa,
}

impl Nginx {
    pub fn url(&self, path: &str) -> String {
        format!(
            "http://127.0.0.1:{}/{}",
            self.port,
            path.trim_start_matches('/')
        )
    }

    pub fn tls_url(&self, path: &str) -> String {
        format!(
            "https://127.0.0.1:{}/{}",
            self.tls_port,
            path.trim_start_matches('/')
        )
    }

    /// The same tree from a location that refuses Range requests.
    pub fn url_without_ranges(&self, path: &str) -> String {
        self.url(&format!("no-ranges/{}", path.trim_start_matches('/')))
    }

    /// Places a file in the served tree (a hardlink when possible: fixtures are big).
    pub fn serve(&self, rel: &str, from: &Path) -> String {
        let dst = self.www.join(rel);
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        let _ = std::fs::remove_file(&dst);
        if std::fs::hard_link(from, &dst).is_err() {
            std::fs::copy(from, &dst).unwrap();
        }
        self.url(rel)
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The shared nginx, started on first use and stopped when the test process ends.
pub fn nginx() -> &'static Nginx {
    static NGINX: OnceLock<Nginx> = OnceLock::new();
    NGINX.get_or_init(start)
}

fn start() -> Nginx {
    let dir = crate::scratch().join("nginx");
    let www = dir.join("www");
    for sub in ["basic", "bearer", "header"] {
        std::fs::create_dir_all(www.join(sub)).unwrap();
    }
    std::fs::create_dir_all(dir.join("tmp")).unwrap();
    let ca = make_ca(&dir.join("tls"));
    let hash = crate::sh(&format!("openssl passwd -apr1 '{PASSWORD}'"));
    std::fs::write(dir.join("htpasswd"), format!("{USER}:{}\n", hash.trim())).unwrap();
    let (port, tls_port) = (free_port(), free_port());
    let d = dir.display();
    let conf = format!(
        r#"
master_process off;
worker_processes 1;
error_log {d}/error.log warn;
pid {d}/nginx.pid;
events {{ worker_connections 512; }}
http {{
  access_log off;
  sendfile on;
  default_type application/octet-stream;
  client_body_temp_path {d}/tmp/body; proxy_temp_path {d}/tmp/proxy;
  fastcgi_temp_path {d}/tmp/fastcgi; uwsgi_temp_path {d}/tmp/uwsgi; scgi_temp_path {d}/tmp/scgi;
  server {{
    listen 127.0.0.1:{port};
    listen 127.0.0.1:{tls_port} ssl;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    root {www};
    location /basic/ {{ auth_basic "test"; auth_basic_user_file {d}/htpasswd; }}
    location /bearer/ {{ if ($http_authorization != "Bearer {TOKEN}") {{ return 401; }} }}
    location /header/ {{ if ($http_x_secret_key != "{SECRET_VALUE}") {{ return 403; }} }}
    location = /status/410 {{ return 410; }}
    location = /status/503 {{ return 503; }}
    location /no-credentials/ {{
      if ($http_authorization) {{ return 400; }}
      if ($http_x_secret_key) {{ return 400; }}
      alias {www}/;
    }}
    location /redirect-elsewhere/ {{
      rewrite ^/redirect-elsewhere/(.*)$ http://localhost:{port}/no-credentials/$1 redirect;
    }}
    location /redirect-same/ {{
      rewrite ^/redirect-same/(.*)$ /$1 redirect;
    }}
    location /no-ranges/ {{ alias {www}/; max_ranges 0; }}
    location /no-etag/ {{ alias {www}/; etag off; }}
  }}
}}
"#,
        cert = ca.server_cert.display(),
        key = ca.server_key.display(),
        www = www.display(),
    );
    std::fs::File::create(dir.join("nginx.conf"))
        .unwrap()
        .write_all(conf.as_bytes())
        .unwrap();
    let mut cmd = std::process::Command::new("nginx");
    cmd.arg("-c")
        .arg(dir.join("nginx.conf"))
        .arg("-g")
        .arg("daemon off;");
    crate::spawn::spawn_for_life(cmd, "nginx", None);
    assert!(
        crate::spawn::wait_listening("127.0.0.1", &[port, tls_port], Duration::from_secs(5)),
        "nginx did not start; see {}/error.log",
        dir.display()
    );
    Nginx {
        port,
        tls_port,
        www,
        ca,
    }
}
