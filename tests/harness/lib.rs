//! The end-to-end test harness: runs the release binaries against real
//! servers (nginx with TLS and auth), a fault-injecting proxy, and loop
//! devices with real filesystems. A failed check prints the command, its
//! stdout, stderr and result, so the failure explains itself.

pub mod daemon;
pub mod fixtures;
pub mod forward_proxy;
pub mod git_servers;
pub mod loopdev;
pub mod netns;
pub mod nginx;
pub mod proxy;
pub mod run;
pub mod tcpproxy;
pub mod tls;

use std::path::PathBuf;
use std::sync::OnceLock;

/// A scratch directory for this test process, under /var/tmp (a real disk,
/// not tmpfs, so holes and sizes behave as on a volume).
pub fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = PathBuf::from(format!("/var/tmp/populator-tests-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the scratch directory");
        dir
    })
}

/// A fresh empty directory for one test.
pub fn test_dir(name: &str) -> PathBuf {
    let dir = scratch().join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The tests need root (loop devices, mounts). They fail loudly without it,
/// never skip silently.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "these tests need root (loop devices, mount); run them as root, as CI does"
    );
}

/// Runs a shell command, panicking with its output when it fails.
pub fn sh(script: &str) -> String {
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(script)
        .output()
        .expect("running bash");
    assert!(
        out.status.success(),
        "command failed ({}): {script}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
