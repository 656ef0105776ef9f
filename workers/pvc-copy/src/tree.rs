//! Directory → directory: a parallel walk that recreates every entry with its
//! metadata, hard links by device and inode, holes kept, directory metadata
//! set last (deepest first), so that creating children does not change a
//! directory's mtime after it was set.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use anyhow::{Context as _, Result};
use populator_core::progress::Progress;

use crate::digest::open_noatime;
use crate::filecopy::{copy_file, Methods, Used};
use crate::meta::{
    self, apply_to_fd, apply_to_path, create_special, join, Entry, FileKind, Preserve,
};
use crate::walk::Visitor;

/// The worker's own resume state in a directory target.
pub const STATE_DIR: &str = ".pvc-copy-state";
pub const LOST_FOUND: &str = "lost+found";

#[derive(Default, Debug)]
pub struct Stats {
    pub files: AtomicU64,
    pub dirs: AtomicU64,
    pub others: AtomicU64,
    pub hardlinks: AtomicU64,
    pub bytes: AtomicU64,
    pub cloned: AtomicU64,
    pub read_write: AtomicU64,
    pub skipped: AtomicU64,
}

pub struct TreeCopy<'a> {
    pub src: &'a Path,
    pub dst: &'a Path,
    pub preserve: Preserve,
    /// Entries may exist already (--overwrite, or a resumed run): replace them.
    pub existing: bool,
    /// A resumed run: keep a regular file whose size and mtime already match.
    pub resuming: bool,
    pub progress: &'a Progress,
    pub methods: Methods,
    pub stats: Stats,
    links: Mutex<HashMap<(u64, u64), PathBuf>>,
    dirs: Mutex<Vec<Entry>>,
    /// The owner a file created now gets, when that is certain: our user and
    /// group, in directories this run created (no set-group-ID bit) under a
    /// top directory without one. Files of that owner skip the chown.
    creator: Option<(u32, u32)>,
}

/// Our user and group, unless the top directory passes its group on.
fn creator_of(dst: &Path) -> Option<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    let top = std::fs::metadata(dst).ok()?;
    // SAFETY: plain getters.
    let ids = unsafe { (libc::geteuid(), libc::getegid()) };
    (top.mode() & libc::S_ISGID == 0).then_some(ids)
}

impl<'a> TreeCopy<'a> {
    pub fn new(
        src: &'a Path,
        dst: &'a Path,
        preserve: Preserve,
        existing: bool,
        resuming: bool,
        progress: &'a Progress,
    ) -> Self {
        Self {
            src,
            dst,
            preserve,
            existing: existing || resuming,
            resuming,
            progress,
            methods: Methods::default(),
            stats: Stats::default(),
            links: Mutex::new(HashMap::new()),
            dirs: Mutex::new(Vec::new()),
            creator: if existing || resuming {
                None
            } else {
                creator_of(dst)
            },
        }
    }

    /// Sets every directory's metadata, deepest first; the root's last.
    /// `before_root` runs just before the root (removing the resume state).
    pub fn finish_dirs(&self, before_root: impl FnOnce() -> Result<()>) -> Result<()> {
        let mut dirs = std::mem::take(&mut *self.dirs.lock().unwrap());
        dirs.sort_by_key(|e| std::cmp::Reverse(e.rel.components().count()));
        let mut root = None;
        for e in dirs {
            if e.rel.as_os_str().is_empty() {
                root = Some(e);
                continue;
            }
            self.apply_dir(&e)?;
        }
        before_root()?;
        if let Some(root) = root {
            self.apply_dir(&root)?;
        }
        Ok(())
    }

    fn apply_dir(&self, e: &Entry) -> Result<()> {
        let path = join(self.dst, &e.rel);
        let dir = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(&path)
            .with_context(|| format!("opening directory {}", path.display()))?;
        apply_to_fd(&dir, e, self.preserve, None)
            .with_context(|| format!("setting the metadata of {}", path.display()))
    }

    /// Removes whatever is at `path` (a resumed or overwriting run).
    fn clear(&self, path: &Path, keep_dir: bool) -> io::Result<()> {
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() => {
                if keep_dir {
                    Ok(())
                } else {
                    std::fs::remove_dir_all(path)
                }
            }
            Ok(_) => std::fs::remove_file(path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn copy_regular(&self, rel: &Path, buf: &mut Vec<u8>) -> Result<()> {
        let src_path = self.src.join(rel);
        let src =
            open_noatime(&src_path).with_context(|| format!("opening {}", src_path.display()))?;
        let e = Entry::read_open(rel.to_path_buf(), &src)
            .with_context(|| format!("reading {}", src_path.display()))?;
        let dst_path = self.dst.join(rel);
        if self.resuming && self.unchanged(&dst_path, &e) {
            self.stats.skipped.fetch_add(1, Ordering::Relaxed);
            self.progress.advance(e.size);
            if e.is_hardlinked() {
                self.links
                    .lock()
                    .unwrap()
                    .entry((e.dev, e.ino))
                    .or_insert_with(|| rel.to_path_buf());
            }
            return Ok(());
        }
        let created_mode = e.mode & 0o777;
        let dst = if e.is_hardlinked() {
            let mut links = self.links.lock().unwrap();
            if let Some(leader) = links.get(&(e.dev, e.ino)) {
                let leader = self.dst.join(leader);
                drop(links);
                return self.hard_link(&leader, &dst_path);
            }
            let dst = self.create_file(&dst_path, created_mode)?;
            links.insert((e.dev, e.ino), rel.to_path_buf());
            dst
        } else {
            self.create_file(&dst_path, created_mode)?
        };
        let used = copy_file(&src, &dst, e.size, e.allocated, &self.methods, buf)
            .with_context(|| format!("copying {} to {}", src_path.display(), dst_path.display()))?;
        match used {
            Used::Clone => self.stats.cloned.fetch_add(1, Ordering::Relaxed),
            Used::ReadWrite => self.stats.read_write.fetch_add(1, Ordering::Relaxed),
            Used::CopyRange => 0,
        };
        let mut preserve = self.preserve;
        if preserve.fixed_owner.is_none() && self.creator == Some((e.uid, e.gid)) {
            preserve.owner = false; // already its owner: no chown
        }
        apply_to_fd(&dst, &e, preserve, Some(created_mode))
            .with_context(|| format!("setting the metadata of {}", dst_path.display()))?;
        self.stats.files.fetch_add(1, Ordering::Relaxed);
        self.stats.bytes.fetch_add(e.size, Ordering::Relaxed);
        self.progress.advance(e.size);
        self.progress.add_read(e.size);
        self.progress.add_written(e.size);
        Ok(())
    }

    /// A file left by an earlier run: complete when size and mtime match,
    /// because the mtime is set only after the content.
    fn unchanged(&self, dst: &Path, e: &Entry) -> bool {
        use std::os::unix::fs::MetadataExt;
        std::fs::symlink_metadata(dst).is_ok_and(|m| {
            m.is_file() && m.len() == e.size && (m.mtime(), m.mtime_nsec()) == e.mtime
        })
    }

    fn create_file(&self, path: &Path, mode: u32) -> Result<File> {
        if self.existing {
            self.clear(path, false)
                .with_context(|| format!("replacing {}", path.display()))?;
        }
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .with_context(|| format!("creating {}", path.display()))
    }

    fn hard_link(&self, leader: &Path, path: &Path) -> Result<()> {
        if self.existing {
            self.clear(path, false)
                .with_context(|| format!("replacing {}", path.display()))?;
        }
        std::fs::hard_link(leader, path)
            .with_context(|| format!("linking {} to {}", path.display(), leader.display()))?;
        self.stats.hardlinks.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn copy_other(&self, rel: &Path) -> Result<()> {
        let src_path = self.src.join(rel);
        let e = Entry::read(self.src, rel)
            .with_context(|| format!("reading {}", src_path.display()))?;
        let dst_path = self.dst.join(rel);
        if e.is_hardlinked() {
            let mut links = self.links.lock().unwrap();
            if let Some(leader) = links.get(&(e.dev, e.ino)) {
                let leader = self.dst.join(leader);
                drop(links);
                return self.hard_link(&leader, &dst_path);
            }
            links.insert((e.dev, e.ino), rel.to_path_buf());
            self.create_other(&dst_path, &e)?;
        } else {
            self.create_other(&dst_path, &e)?;
        }
        self.stats.others.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn create_other(&self, dst_path: &Path, e: &Entry) -> Result<()> {
        if matches!(e.kind, FileKind::Char | FileKind::Block) && !self.preserve.root {
            populator_core::log::warn(format!(
                "skipping device node {}: creating device nodes needs root",
                e.rel.display()
            ));
            return Ok(());
        }
        if self.existing {
            self.clear(dst_path, false)
                .with_context(|| format!("replacing {}", dst_path.display()))?;
        }
        create_special(dst_path, e).with_context(|| format!("creating {}", dst_path.display()))?;
        apply_to_path(dst_path, e, self.preserve)
            .with_context(|| format!("setting the metadata of {}", dst_path.display()))
    }
}

impl Visitor for TreeCopy<'_> {
    fn dir(&self, rel: &Path) -> Result<()> {
        let e = Entry::read(self.src, rel)
            .with_context(|| format!("reading {}", join(self.src, rel).display()))?;
        if !rel.as_os_str().is_empty() {
            let path = self.dst.join(rel);
            if self.existing {
                self.clear(&path, true)
                    .with_context(|| format!("replacing {}", path.display()))?;
            }
            // Writable for us until its own metadata is set at the end.
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => {}
                Err(err) if self.existing && err.kind() == io::ErrorKind::AlreadyExists => {}
                Err(err) => {
                    return Err(err)
                        .with_context(|| format!("creating directory {}", path.display()))
                }
            }
            self.stats.dirs.fetch_add(1, Ordering::Relaxed);
        }
        self.dirs.lock().unwrap().push(e);
        Ok(())
    }

    fn item(&self, rel: &Path, kind: std::fs::FileType, scratch: &mut Vec<u8>) -> Result<()> {
        if kind.is_file() {
            self.copy_regular(rel, scratch)
        } else {
            self.copy_other(rel)
        }
    }
}

/// Whether `dir` holds anything but lost+found and the resume state; and
/// whether the resume state is there.
pub fn target_contents(dir: &Path) -> Result<(Vec<String>, bool)> {
    let mut others = Vec::new();
    let mut state = false;
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let name = entry?.file_name();
        if name == STATE_DIR {
            state = true;
        } else if name != LOST_FOUND {
            others.push(name.to_string_lossy().into_owned());
        }
    }
    others.sort();
    Ok((others, state))
}

/// A top-level name the copy never writes from a source: ours or lost+found.
pub fn is_reserved_top(rel: &Path) -> bool {
    let mut parts = rel.components();
    match (parts.next(), parts.next()) {
        (Some(first), None) => first.as_os_str() == STATE_DIR || first.as_os_str() == LOST_FOUND,
        _ => false,
    }
}

pub fn preserve_for(no_chown: bool, owner: Option<(u32, u32)>) -> Preserve {
    let root = meta::is_root();
    Preserve {
        owner: root && !no_chown && owner.is_none(),
        fixed_owner: owner,
        root,
    }
}

/// The resume state directory, private to the worker.
pub fn create_state_dir(state: &Path) -> Result<()> {
    match std::fs::DirBuilder::new().mode(0o700).create(state) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
            Err(e).with_context(|| format!("creating {}", state.display()))
        }
        _ => Ok(()),
    }
}
