//! Running a worker binary and checking what it did: exit code, stderr and
//! the JSON result. A failed check panics with everything a reader needs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value;

/// Where the release binaries are: `POPULATOR_BIN_DIR` (set by `make test`),
/// else the workspace's static build.
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("POPULATOR_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/x86_64-unknown-linux-gnu/release")
        });
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build it first with `make static` (make test does)",
        path.display()
    );
    path
}

pub struct WorkerCmd {
    name: String,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    result_path: PathBuf,
    /// A command the worker runs under, e.g. `ip netns exec NS`.
    wrapper: Vec<String>,
}

/// A command line for worker `name` with a fresh `--termination-log`.
pub fn worker(name: &str) -> WorkerCmd {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    let result_path = crate::scratch().join(format!("result-{n}.json"));
    let _ = std::fs::remove_file(&result_path);
    WorkerCmd {
        name: name.into(),
        args: Vec::new(),
        envs: Vec::new(),
        result_path,
        wrapper: Vec::new(),
    }
}

impl WorkerCmd {
    pub fn arg(mut self, a: impl AsRef<std::ffi::OsStr>) -> Self {
        self.args.push(a.as_ref().to_string_lossy().into_owned());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: AsRef<std::ffi::OsStr>>(mut self, items: I) -> Self {
        for a in items {
            self = self.arg(a);
        }
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.envs.push((k.into(), v.into()));
        self
    }

    /// Runs the worker inside network namespace `ns` (`ip netns exec`, which
    /// execs the worker, so signals reach it).
    pub fn in_netns(mut self, ns: &str) -> Self {
        self.wrapper = vec!["ip".into(), "netns".into(), "exec".into(), ns.into()];
        self
    }

    fn command(&self) -> Command {
        let mut c = match self.wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(bin(&self.name));
                c
            }
            None => Command::new(bin(&self.name)),
        };
        c.args(&self.args)
            .arg("--termination-log")
            .arg(&self.result_path);
        c.env_remove("http_proxy")
            .env_remove("HTTP_PROXY")
            .env_remove("https_proxy")
            .env_remove("HTTPS_PROXY")
            // The machine's CA bundle for AWS breaks S3 clients against the
            // plain-http test servers.
            .env_remove("AWS_CA_BUNDLE");
        for (k, v) in &self.envs {
            c.env(k, v);
        }
        c
    }

    pub fn display(&self) -> String {
        format!("{} {}", self.name, self.args.join(" "))
    }

    pub fn run(&self) -> Run {
        let out = self.command().output().expect("starting the worker");
        self.finish(out.status, out.stdout, out.stderr)
    }

    /// Starts the worker with piped output, for tests that signal it.
    pub fn spawn(&self) -> Spawned<'_> {
        let child = self
            .command()
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting the worker");
        Spawned { cmd: self, child }
    }

    fn finish(&self, status: std::process::ExitStatus, stdout: Vec<u8>, stderr: Vec<u8>) -> Run {
        use std::os::unix::process::ExitStatusExt;
        let raw = std::fs::read_to_string(&self.result_path).ok();
        Run {
            cmd: self.display(),
            code: status
                .code()
                .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)),
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
            result: raw.as_deref().and_then(|r| serde_json::from_str(r).ok()),
            result_raw: raw,
        }
    }
}

pub struct Spawned<'a> {
    cmd: &'a WorkerCmd,
    pub child: Child,
}

impl Spawned<'_> {
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    pub fn wait(self) -> Run {
        let out = self
            .child
            .wait_with_output()
            .expect("waiting for the worker");
        self.cmd.finish(out.status, out.stdout, out.stderr)
    }
}

pub struct Run {
    pub cmd: String,
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub result: Option<Value>,
    pub result_raw: Option<String>,
}

impl Run {
    pub fn dump(&self) -> String {
        format!(
            "\n--- command: {}\n--- exit code: {}\n--- stderr:\n{}\n--- stdout:\n{}\n--- result:\n{}\n",
            self.cmd,
            self.code,
            self.stderr,
            self.stdout,
            self.result_raw.as_deref().unwrap_or("(none written)")
        )
    }

    /// Checks the exit code and that the result agrees with it.
    pub fn code(&self, expected: i32) -> &Self {
        assert_eq!(self.code, expected, "unexpected exit code{}", self.dump());
        let status = self.result().get("status").and_then(Value::as_str);
        let want = if expected == 0 { "Succeeded" } else { "Failed" };
        assert_eq!(
            status,
            Some(want),
            "result status disagrees with the exit code{}",
            self.dump()
        );
        self
    }

    pub fn success(&self) -> &Self {
        self.code(0)
    }

    pub fn reason(&self, reason: &str) -> &Self {
        assert_eq!(
            self.result()["reason"].as_str(),
            Some(reason),
            "unexpected reason{}",
            self.dump()
        );
        self
    }

    /// The failure message on stderr: one `worker: Failed (...)` line that contains `text`.
    pub fn message_contains(&self, text: &str) -> &Self {
        let line = self
            .stderr
            .lines()
            .find(|l| l.contains(": Failed ("))
            .unwrap_or("");
        assert!(
            line.contains(text),
            "the failure line does not say {text:?}{}",
            self.dump()
        );
        assert!(
            self.result()["message"]
                .as_str()
                .unwrap_or("")
                .contains(text),
            "the result message does not say {text:?}{}",
            self.dump()
        );
        self
    }

    pub fn stderr_contains(&self, text: &str) -> &Self {
        assert!(
            self.stderr.contains(text),
            "stderr does not contain {text:?}{}",
            self.dump()
        );
        self
    }

    pub fn result(&self) -> &Value {
        self.result
            .as_ref()
            .unwrap_or_else(|| panic!("no JSON result was written{}", self.dump()))
    }

    pub fn sha256(&self) -> &str {
        self.result()["digests"]["sha256"]
            .as_str()
            .unwrap_or_else(|| panic!("no sha256 in the result{}", self.dump()))
    }

    /// Asserts that `secret` appears nowhere the worker wrote text.
    pub fn never_shows(&self, secret: &str) -> &Self {
        for (what, text) in [("stderr", &self.stderr), ("stdout", &self.stdout)] {
            assert!(
                !text.contains(secret),
                "the secret appears on {what}{}",
                self.dump()
            );
        }
        assert!(
            !self.result_raw.as_deref().unwrap_or("").contains(secret),
            "the secret appears in the result{}",
            self.dump()
        );
        self
    }
}

/// `dir` holds nothing but `lost+found`: what a failed run must leave.
pub fn assert_empty_dir(dir: &Path, run: &Run) {
    let left: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "lost+found")
        .collect();
    assert!(
        left.is_empty(),
        "the target should be empty, holds {left:?}{}",
        run.dump()
    );
}

/// One scrape of a worker's metrics endpoint on 127.0.0.1 (HTTPS, its
/// self-signed certificate accepted): the body, or "" when it does not
/// answer within 2 s.
pub fn scrape_metrics(port: u16) -> String {
    let out = std::process::Command::new("curl")
        .args([
            "-ksf",
            "--max-time",
            "2",
            &format!("https://127.0.0.1:{port}/metrics"),
        ])
        .output()
        .expect("running curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}
