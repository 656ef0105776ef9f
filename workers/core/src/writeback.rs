//! Early writeback for workers that write many files into a filesystem.
//!
//! The contract flushes (syncfs) before success. On a machine with a lot of
//! memory the kernel starts background writeback late (10 % of RAM dirty, or
//! data 30 s old), so without help nothing reaches the disk while the worker
//! writes and the whole volume's data is written by the final syncfs, after
//! the work: the flush adds its full time to the run. [`EarlyWriteback`]
//! runs syncfs from its own thread every [`INTERVAL`] while the worker
//! writes, so the disk works alongside the worker and the final flush only
//! has the tail left.
//!
//! Measured on the benchmark machine, into a fresh ext4 on a direct-I/O loop
//! device: git-clone's 50 000-file checkout 2.7–2.8 s → 2.3–2.5 s (the final
//! flush 0.5–0.6 s → under 0.1 s), backup-restore's 1 GiB restic restore
//! and tar.zst about 0.3 s faster. A syncfs loop without pauses was slower
//! than none (every call commits the journal and competes with the writer),
//! and into a directory of a busy filesystem whose files had just been
//! removed the gain disappeared in that filesystem's own costs.

use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context as _, Result};

use crate::target::syncfs;

/// How long the flusher waits between two syncfs calls.
pub const INTERVAL: Duration = Duration::from_millis(200);

/// A thread that flushes one filesystem while the worker writes to it.
/// [`EarlyWriteback::finish`] stops it and does the final, reported flush;
/// dropping it stops the thread without flushing (a failed run).
pub struct EarlyWriteback {
    state: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    dir: File,
    path: std::path::PathBuf,
}

#[derive(Default)]
struct Shared {
    stopped: Mutex<bool>,
    wake: Condvar,
    /// The first error a background syncfs saw. A syncfs that fails marks
    /// the filesystem's error as seen, so the final flush might not see it
    /// again: it is kept here and returned by `finish`.
    error: Mutex<Option<std::io::Error>>,
}

impl EarlyWriteback {
    /// Starts flushing the filesystem that holds `path` (a directory).
    pub fn start(path: &Path) -> Result<Self> {
        let dir = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let flusher = dir
            .try_clone()
            .with_context(|| format!("opening {}", path.display()))?;
        let state = Arc::new(Shared::default());
        let shared = state.clone();
        let thread = std::thread::Builder::new()
            .name("writeback".into())
            .spawn(move || flush_until_stopped(&flusher, &shared))
            .context("starting the writeback thread")?;
        Ok(EarlyWriteback {
            state,
            thread: Some(thread),
            dir,
            path: path.to_path_buf(),
        })
    }

    /// Stops the thread and flushes what is left; returns any error a
    /// flush saw, the background ones included.
    pub fn finish(mut self) -> Result<()> {
        self.stop();
        if let Some(e) = self.state.error.lock().unwrap().take() {
            return Err(e).with_context(|| format!("syncing {}", self.path.display()));
        }
        syncfs(&self.dir).with_context(|| format!("syncing {}", self.path.display()))
    }

    fn stop(&mut self) {
        *self.state.stopped.lock().unwrap() = true;
        self.state.wake.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for EarlyWriteback {
    fn drop(&mut self) {
        self.stop();
    }
}

fn flush_until_stopped(dir: &File, shared: &Shared) {
    let mut stopped = shared.stopped.lock().unwrap();
    loop {
        stopped = shared.wake.wait_timeout(stopped, INTERVAL).unwrap().0;
        if *stopped {
            return;
        }
        drop(stopped);
        if let Err(e) = syncfs(dir) {
            shared.error.lock().unwrap().get_or_insert(e);
            return;
        }
        stopped = shared.stopped.lock().unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flushes_in_the_background_and_finishes() {
        let dir = std::env::temp_dir().join(format!("writeback-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let flusher = EarlyWriteback::start(&dir).unwrap();
        std::fs::write(dir.join("a"), b"data").unwrap();
        std::thread::sleep(INTERVAL * 2);
        flusher.finish().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_directory_is_an_error_naming_it() {
        let err = EarlyWriteback::start(Path::new("/nonexistent/writeback"))
            .err()
            .expect("a missing directory cannot be flushed");
        assert!(format!("{err:#}").contains("/nonexistent/writeback"));
    }
}
