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
pub mod podman;
pub mod proxy;
pub mod run;
pub mod spawn;
pub mod tcpproxy;
pub mod tls;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const SCRATCH_PREFIX: &str = "/var/tmp/populator-tests-";
static SCRATCH: OnceLock<PathBuf> = OnceLock::new();

/// A scratch directory for this test process, under /var/tmp (a real disk,
/// not tmpfs, so holes and sizes behave as on a volume). It is removed when
/// the test binary exits, with any mount or loop device left under it, unless
/// POPULATOR_KEEP_SCRATCH is set (to look at a failure). A process killed
/// outside the test harness (SIGKILL, a timeout) still leaves it behind.
pub fn scratch() -> &'static PathBuf {
    SCRATCH.get_or_init(|| {
        let dir = PathBuf::from(format!("{SCRATCH_PREFIX}{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the scratch directory");
        if std::env::var_os("POPULATOR_KEEP_SCRATCH").is_none() {
            // SAFETY: registers a function without arguments that never unwinds.
            unsafe { libc::atexit(remove_scratch_at_exit) };
        }
        dir
    })
}

/// A directory under the scratch directory shared by the tests of this
/// process (fixtures made once): created if missing, never emptied.
pub fn shared_dir(name: &str) -> PathBuf {
    let dir = scratch().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

extern "C" fn remove_scratch_at_exit() {
    // A panic must not cross the C boundary; nothing here is worth one.
    let _ = std::panic::catch_unwind(|| {
        if let Some(dir) = SCRATCH.get() {
            remove_scratch(dir);
        }
    });
}

/// Unmounts what tests left mounted under `dir` (fixtures in statics are
/// never dropped), detaches the loop devices backed by files under it, then
/// removes it.
fn remove_scratch(dir: &Path) {
    let mut mounts = mounts_under(dir);
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for mount in mounts {
        if let Ok(path) = std::ffi::CString::new(mount) {
            // SAFETY: a valid NUL-terminated path; MNT_DETACH has no other precondition.
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        }
    }
    for device in loop_devices_under(dir) {
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(device)
            .status();
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Mount points at or below `dir`, from /proc/self/mountinfo (which writes
/// a space as `\040`).
fn mounts_under(dir: &Path) -> Vec<String> {
    let prefix = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|m| m.replace("\\040", " "))
        .filter(|m| m == &prefix || m.starts_with(&format!("{prefix}/")))
        .collect()
}

/// /dev/loopN whose backing file lies under `dir`.
fn loop_devices_under(dir: &Path) -> Vec<String> {
    let prefix = format!("{}/", dir.display());
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let backing = std::fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
            (name.starts_with("loop") && backing.starts_with(&prefix))
                .then(|| format!("/dev/{name}"))
        })
        .collect()
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
