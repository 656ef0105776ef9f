//! A parallel directory walk: `jobs` threads share a queue of directories
//! to list and batches of their entries to handle, so one huge directory is
//! spread over every thread as well as a deep tree is.

use std::ffi::OsString;
use std::fs::FileType;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context as _, Result};
use crossbeam_channel::{unbounded, Receiver, Sender};
use populator_core::cancel::CancelToken;

/// Entries of one directory handled as one job.
const BATCH: usize = 128;

/// What a walk does with what it finds.
pub trait Visitor: Sync {
    /// A directory, before its entries are listed (the root has an empty `rel`).
    fn dir(&self, rel: &Path) -> Result<()>;
    /// A non-directory entry; `scratch` is a per-thread buffer.
    fn item(&self, rel: &Path, kind: FileType, scratch: &mut Vec<u8>) -> Result<()>;
}

enum Job {
    Dir(PathBuf),
    Items(PathBuf, Vec<(OsString, FileType)>),
}

struct Shared<'a, V> {
    root: &'a Path,
    skip_at_root: &'a [&'a str],
    visitor: &'a V,
    queue: Sender<Job>,
    outstanding: AtomicUsize,
    failed: AtomicBool,
    error: Mutex<Option<anyhow::Error>>,
    cancel: &'a CancelToken,
}

/// Walks `root` with `jobs` threads; names in `skip_at_root` are left out
/// at the top level. Returns the first error.
pub fn walk<V: Visitor>(
    root: &Path,
    skip_at_root: &[&str],
    jobs: usize,
    cancel: &CancelToken,
    visitor: &V,
) -> Result<()> {
    let (tx, rx) = unbounded();
    let shared = Shared {
        root,
        skip_at_root,
        visitor,
        queue: tx,
        outstanding: AtomicUsize::new(1),
        failed: AtomicBool::new(false),
        error: Mutex::new(None),
        cancel,
    };
    shared
        .queue
        .send(Job::Dir(PathBuf::new()))
        .expect("the queue is open");
    std::thread::scope(|s| {
        for _ in 0..jobs.max(1) {
            let rx = rx.clone();
            let shared = &shared;
            s.spawn(move || worker(shared, rx));
        }
    });
    if let Some(e) = shared.error.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e);
    }
    cancel.check()
}

fn worker<V: Visitor>(shared: &Shared<'_, V>, rx: Receiver<Job>) {
    let mut scratch = Vec::new();
    loop {
        if shared.outstanding.load(Ordering::SeqCst) == 0 || shared.failed.load(Ordering::SeqCst) {
            return;
        }
        let job = match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(job) => job,
            Err(_) => continue,
        };
        if shared.cancel.is_cancelled() {
            shared.failed.store(true, Ordering::SeqCst);
        }
        if !shared.failed.load(Ordering::SeqCst) {
            if let Err(e) = run_job(shared, job, &mut scratch) {
                let mut slot = shared.error.lock().unwrap_or_else(|e| e.into_inner());
                slot.get_or_insert(e);
                shared.failed.store(true, Ordering::SeqCst);
            }
        }
        shared.outstanding.fetch_sub(1, Ordering::SeqCst);
    }
}

fn run_job<V: Visitor>(shared: &Shared<'_, V>, job: Job, scratch: &mut Vec<u8>) -> Result<()> {
    match job {
        Job::Items(parent, items) => {
            for (name, kind) in items {
                let rel = parent.join(&name);
                shared.visitor.item(&rel, kind, scratch)?;
            }
            Ok(())
        }
        Job::Dir(rel) => {
            shared.visitor.dir(&rel)?;
            let path = crate::meta::join(shared.root, &rel);
            let listing =
                std::fs::read_dir(&path).with_context(|| format!("listing {}", path.display()))?;
            let mut batch = Vec::new();
            for entry in listing {
                let entry = entry.with_context(|| format!("listing {}", path.display()))?;
                let name = entry.file_name();
                if rel.as_os_str().is_empty()
                    && shared.skip_at_root.iter().any(|s| name.as_os_str() == *s)
                {
                    continue;
                }
                let kind = entry
                    .file_type()
                    .with_context(|| format!("inspecting {}", entry.path().display()))?;
                if kind.is_dir() {
                    push(shared, Job::Dir(rel.join(&name)));
                } else {
                    batch.push((name, kind));
                    if batch.len() == BATCH {
                        push(shared, Job::Items(rel.clone(), std::mem::take(&mut batch)));
                    }
                }
            }
            if !batch.is_empty() {
                push(shared, Job::Items(rel, batch));
            }
            Ok(())
        }
    }
}

fn push<V>(shared: &Shared<'_, V>, job: Job) {
    shared.outstanding.fetch_add(1, Ordering::SeqCst);
    let _ = shared.queue.send(job);
}

/// The default parallelism: the CPUs this process may use.
pub fn default_jobs() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}
