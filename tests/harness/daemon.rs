//! Long-running servers for tests (rclone's restic REST server, SeaweedFS
//! with S3): started once per test process, killed with it (PDEATHSIG).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::nginx::free_port;

/// Starts `program args…` from a thread that lives as long as the test
/// process, with its output in `log`, and waits until `port` accepts.
pub fn start_daemon(program: &str, args: &[String], log: &Path, port: u16, wait: Duration) {
    let (tx, rx) = std::sync::mpsc::channel();
    let (program_owned, args_owned, log_owned) =
        (program.to_string(), args.to_vec(), log.to_path_buf());
    std::thread::spawn(move || {
        use std::os::unix::process::CommandExt;
        let out = std::fs::File::create(&log_owned).unwrap();
        let mut cmd = Command::new(&program_owned);
        cmd.args(&args_owned)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            // A CA bundle meant for other servers must not reach plain-http tests.
            .env_remove("AWS_CA_BUNDLE");
        // SAFETY: prctl in the child before exec, async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {program_owned}: {e}"));
        tx.send(()).unwrap();
        let _ = child.wait();
    });
    rx.recv().unwrap();
    let start = Instant::now();
    while start.elapsed() < wait {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "{program} did not listen on port {port} within {wait:?}; its log:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// `rclone serve restic` over `root`: repositories at `rest:URL/<subdir>/`.
pub struct RestServer {
    pub port: u16,
    pub root: PathBuf,
    scheme: &'static str,
}

impl RestServer {
    pub fn start(root: &Path, log: &Path) -> RestServer {
        Self::start_with(root, log, None)
    }

    /// The same over HTTPS with this certificate and key (PEM files).
    pub fn start_tls(root: &Path, log: &Path, cert: &Path, key: &Path) -> RestServer {
        Self::start_with(root, log, Some((cert, key)))
    }

    fn start_with(root: &Path, log: &Path, tls: Option<(&Path, &Path)>) -> RestServer {
        std::fs::create_dir_all(root).unwrap();
        let port = free_port();
        let mut args = vec![
            "serve".into(),
            "restic".into(),
            "--addr".into(),
            format!("127.0.0.1:{port}"),
        ];
        if let Some((cert, key)) = tls {
            args.extend([
                "--cert".into(),
                cert.display().to_string(),
                "--key".into(),
                key.display().to_string(),
            ]);
        }
        args.push(root.display().to_string());
        start_daemon("rclone", &args, log, port, Duration::from_secs(30));
        RestServer {
            port,
            root: root.to_path_buf(),
            scheme: if tls.is_some() { "https" } else { "http" },
        }
    }

    pub fn repo(&self, name: &str) -> String {
        format!("rest:{}://127.0.0.1:{}/{name}/", self.scheme, self.port)
    }
}

/// nginx terminating TLS in front of a plain HTTP server on `upstream`
/// (the Host header passed through, so S3 signatures still match); returns
/// its port. Lives as long as the test process.
pub fn tls_front(dir: &Path, upstream: u16, cert: &Path, key: &Path) -> u16 {
    std::fs::create_dir_all(dir.join("tmp")).unwrap();
    let port = free_port();
    let d = dir.display();
    let conf = format!(
        "daemon off; master_process off; pid {d}/nginx.pid; error_log {d}/error.log;
events {{}}
http {{
  access_log off;
  client_body_temp_path {d}/tmp/body; proxy_temp_path {d}/tmp/proxy;
  fastcgi_temp_path {d}/tmp/fcgi; uwsgi_temp_path {d}/tmp/uwsgi; scgi_temp_path {d}/tmp/scgi;
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {cert}; ssl_certificate_key {key};
    client_max_body_size 0;
    proxy_request_buffering off; proxy_buffering off;
    location / {{
      proxy_pass http://127.0.0.1:{upstream};
      proxy_http_version 1.1;
      proxy_set_header Host $http_host;
    }}
  }}
}}
",
        cert = cert.display(),
        key = key.display()
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let mut cmd = Command::new("nginx");
    cmd.arg("-p").arg(dir).arg("-c").arg(dir.join("nginx.conf"));
    crate::spawn::spawn_for_life(cmd, "nginx (TLS front)", Some(dir.join("nginx.log")));
    assert!(
        crate::spawn::wait_listening("127.0.0.1", &[port], Duration::from_secs(10)),
        "the TLS front did not listen on {port}; {}",
        std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
    );
    port
}

pub const S3_ACCESS_KEY: &str = "populator-test-key";
pub const S3_SECRET_KEY: &str = "populator-test-secret-8d1c";

/// SeaweedFS (`weed server -s3`) with one identity, so signatures are checked.
pub struct S3Server {
    pub port: u16,
}

impl S3Server {
    pub fn start(dir: &Path) -> S3Server {
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let config = dir.join("s3.json");
        std::fs::write(
            &config,
            format!(
                r#"{{"identities":[{{"name":"tester","credentials":[{{"accessKey":"{S3_ACCESS_KEY}","secretKey":"{S3_SECRET_KEY}"}}],"actions":["Admin","Read","List","Tagging","Write"]}}]}}"#
            ),
        )
        .unwrap();
        let port = free_port();
        let p = |name: &str, port: u16| format!("-{name}={port}");
        let args = vec![
            "server".into(),
            format!("-dir={}", dir.join("data").display()),
            "-ip=127.0.0.1".into(),
            "-ip.bind=127.0.0.1".into(),
            p("master.port", free_port()),
            p("master.port.grpc", free_port()),
            p("volume.port", free_port()),
            p("volume.port.grpc", free_port()),
            p("filer.port", free_port()),
            p("filer.port.grpc", free_port()),
            "-volume.max=20".into(),
            "-master.volumeSizeLimitMB=64".into(),
            "-s3".into(),
            p("s3.port", port),
            p("s3.port.grpc", free_port()),
            format!("-s3.config={}", config.display()),
        ];
        start_daemon(
            "weed",
            &args,
            &dir.join("weed.log"),
            port,
            Duration::from_secs(60),
        );
        let server = S3Server { port };
        server.wait_ready(dir);
        server
    }

    /// The S3 port opens before the filer behind it answers.
    fn wait_ready(&self, dir: &Path) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            let out = Command::new("bash")
                .arg("-c")
                .arg(format!(
                    "curl -s -o /dev/null -w '%{{http_code}}' http://127.0.0.1:{}/",
                    self.port
                ))
                .output()
                .unwrap();
            let code = String::from_utf8_lossy(&out.stdout).to_string();
            // Anonymous requests are refused once the server is up.
            if code == "403" || code == "200" {
                return;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!(
            "SeaweedFS S3 did not become ready; its log:\n{}",
            std::fs::read_to_string(dir.join("weed.log")).unwrap_or_default()
        );
    }

    pub fn repo(&self, bucket_and_prefix: &str) -> String {
        format!("s3:http://127.0.0.1:{}/{bucket_and_prefix}", self.port)
    }
}
