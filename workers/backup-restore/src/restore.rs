//! Restoring a snapshot's tree into a directory target, in four passes:
//! 1. walk the tree: create directories, empty files of their final size
//!    (so zero blobs stay holes), symlinks, hardlinks and special files;
//! 2. contents: blobs fetched (decrypted and authenticated by rustic_core)
//!    and written by N threads (bounded memory: one blob per thread, plus
//!    rustic's 32 MB blob cache);
//! 3. as soon as a file is complete, the thread that finished it reads it
//!    back and compares it blob by blob with the repository's content
//!    hashes (one hash pass, overlapped with the other threads' I/O);
//! 4. metadata, children before their directory: owner (as root), mode,
//!    xattrs, times. Failures here fail the restore (rustic only logs them).
//!
//! rustic_core's own `restore` is not used: it panics on a damaged pack
//! (the process aborts without a result) and its 20 readers buffer whole
//! pack ranges (400–800 MB RSS in the probe).

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::num::NonZeroU32;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use aes256ctr_poly1305aes::aead::AeadInPlace;
use aes256ctr_poly1305aes::{Aes256CtrPoly1305Aes, Nonce, Tag};
use anyhow::{Context as _, Result};
use populator_core::error::{fail, Kind};
use populator_core::worker::Context;
use rustic_core::repofile::{BlobType, Node, NodeType, PackId};
use rustic_core::{DataId, FileType, Id, LsOptions, ReadBackend, WriteBackend};
use sha2::{Digest, Sha256};

use crate::repo::{rustic_message, IndexedRepo};

/// What was restored, for the result.
#[derive(Debug, Default, Clone)]
pub struct Restored {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub hardlinks: u64,
    pub specials: u64,
    /// Sum of the file sizes.
    pub file_bytes: u64,
    /// Bytes written (file sizes minus holes).
    pub data_bytes: u64,
}

/// One node and where it goes, relative to the target root.
struct Entry {
    dest: PathBuf,
    node: Node,
}

struct FileJob {
    dest: PathBuf,
    blobs: Vec<(DataId, u32)>,
}

/// One blob of a pack and the places it goes: (file index, offset).
struct PackBlob {
    id: DataId,
    /// Where the sealed blob is in its pack.
    offset: u32,
    length: u32,
    /// Set when the blob is compressed (repository version 2).
    uncompressed_length: Option<NonZeroU32>,
    targets: Vec<(u32, u64)>,
}

/// One read of a pack: a range that holds blobs the snapshot needs, read
/// at once and cut into its blobs (a read per blob cost an open, a seek and
/// a read each through rustic's local backend).
struct PackRead {
    pack: PackId,
    offset: u32,
    length: u32,
    blobs: Vec<PackBlob>,
}

/// Ranges of one pack are cut where the needed blobs are more than this
/// apart (reading the gap would cost more than another read)…
const MAX_GAP: u32 = 1 << 20;
/// …or grow beyond this, which bounds memory: each thread holds one range.
const MAX_RANGE: u32 = 4 << 20;

pub struct Restorer<'a> {
    pub repo: &'a IndexedRepo,
    /// The repository's storage, for reading pack ranges directly.
    pub backend: Arc<dyn WriteBackend>,
    pub repo_name: String,
    pub root: PathBuf,
    pub threads: usize,
    pub ctx: &'a Context,
    pub capacity: Option<u64>,
    pub is_root: bool,
}

impl Restorer<'_> {
    /// Restores each (destination, node) — the snapshot's backed-up path
    /// to "", or the `--include` subpaths to their own place.
    pub fn run(&self, roots: Vec<(PathBuf, Node)>) -> Result<Restored> {
        let progress = &self.ctx.progress;
        progress.set_stage("listing");
        let entries = self.list(roots)?;
        let mut restored = Restored::default();
        let files = self.plan_files(&entries)?;
        let zero_blobs = self.zero_blobs(&files)?;
        let data_bytes: u64 = files
            .iter()
            .flat_map(|f| &f.blobs)
            .filter(|(id, _)| !zero_blobs.contains(id))
            .map(|(_, len)| u64::from(*len))
            .sum();
        restored.data_bytes = data_bytes;
        if let Some(cap) = self.capacity {
            if data_bytes > cap {
                return Err(fail(
                    Kind::Capacity,
                    "InsufficientCapacity",
                    format!(
                        "the snapshot holds {} of data but target {} can take only {}",
                        populator_core::target::human_bytes(data_bytes),
                        self.root.display(),
                        populator_core::target::human_bytes(cap)
                    ),
                ));
            }
        }
        if let Ok(free) = populator_core::target::free_inodes(&self.root) {
            if free > 0 && entries.len() as u64 > free {
                return Err(fail(
                    Kind::Capacity,
                    "InsufficientCapacity",
                    format!(
                        "the snapshot holds {} entries but target {} has only {free} free inodes",
                        entries.len(),
                        self.root.display()
                    ),
                ));
            }
        }
        progress.set_stage("creating");
        // The disk works while contents are written; the flush below only
        // has the tail left (see populator_core::writeback).
        let writeback = populator_core::writeback::EarlyWriteback::start(&self.root)?;
        self.create_nodes(&entries, &mut restored)?;
        self.ctx.report.set("files", files.len() as u64);
        progress.set_total(Some(restored.file_bytes.max(1)));
        progress.set_files_total(Some(files.len() as u64));
        progress.set_stage("restoring");
        self.write_contents(&files, &zero_blobs)?;
        progress.set_stage("flushing");
        writeback.finish()?;
        progress.set_stage("metadata");
        for entry in entries.iter().rev() {
            self.ctx.cancel.check()?;
            let path = self.root.join(&entry.dest);
            let result = set_metadata(&path, &entry.node, self.is_root)
                .with_context(|| format!("restoring the metadata of {}", path.display()));
            match result {
                // Not root, the volume's root is usually not ours to change
                // (owned by root, group fsGroup): keep its own metadata.
                Err(e) if entry.dest.as_os_str().is_empty() && !self.is_root => {
                    populator_core::log::warn(format!("{e:#}; the volume root keeps its own"));
                }
                other => other?,
            }
        }
        populator_core::target::sync_filesystem(&self.root)?;
        Ok(restored)
    }

    /// Pass 1a: every node, checked: plain names only, each path once.
    fn list(&self, roots: Vec<(PathBuf, Node)>) -> Result<Vec<Entry>> {
        let mut entries = Vec::new();
        let mut seen = HashSet::new();
        for (dest, node) in roots {
            let is_dir = node.is_dir();
            let root_node = node.clone();
            entries.push(Entry {
                dest: dest.clone(),
                node,
            });
            if !is_dir {
                continue;
            }
            let listing = self
                .repo
                .ls(&root_node, &LsOptions::default())
                .map_err(|e| self.read_error(&e, "listing the snapshot"))?;
            for item in listing {
                self.ctx.cancel.check()?;
                let (path, node) = item.map_err(|e| self.read_error(&e, "listing the snapshot"))?;
                if !path.components().all(|c| matches!(c, Component::Normal(_))) {
                    return Err(hostile(format!(
                        "the snapshot holds an entry named {} (not a plain path)",
                        path.display()
                    )));
                }
                let dest = dest.join(&path);
                if !seen.insert(dest.clone()) {
                    return Err(hostile(format!(
                        "the snapshot holds {} twice",
                        dest.display()
                    )));
                }
                entries.push(Entry { dest, node });
            }
        }
        Ok(entries)
    }

    /// The files whose contents are written (a hardlinked file once), with
    /// their blobs: known before anything is created, so that a snapshot
    /// too large for the target fails first.
    fn plan_files(&self, entries: &[Entry]) -> Result<Vec<FileJob>> {
        let mut files = Vec::new();
        let mut seen = HashSet::new();
        for entry in entries {
            let node = &entry.node;
            if !matches!(node.node_type, NodeType::File) {
                continue;
            }
            if let Some(key) = hardlink_key(node) {
                if !seen.insert(key) {
                    continue;
                }
            }
            let mut blobs = Vec::new();
            for id in node.content.iter().flatten() {
                let len = self
                    .repo
                    .get_index_entry(id)
                    .map_err(|e| self.read_error(&e, "looking up a blob"))?
                    .data_length();
                blobs.push((*id, len));
            }
            files.push(FileJob {
                dest: entry.dest.clone(),
                blobs,
            });
        }
        Ok(files)
    }

    /// Pass 1b: directories, empty files of their final size, links, specials.
    fn create_nodes(&self, entries: &[Entry], restored: &mut Restored) -> Result<()> {
        let mut hardlinks: HashMap<(u64, u64), PathBuf> = HashMap::new();
        // Directories this run created: nothing of an earlier attempt can
        // be in them, so their entries skip the leftover check (a stat each).
        let mut fresh_dirs: HashSet<&Path> = HashSet::new();
        for entry in entries {
            self.ctx.cancel.check()?;
            let path = self.root.join(&entry.dest);
            let node = &entry.node;
            let in_fresh_dir = entry.dest.parent().is_some_and(|p| fresh_dirs.contains(p));
            let make_room = |path: &Path, want_dir: bool| {
                if in_fresh_dir {
                    Ok(())
                } else {
                    make_room(path, want_dir)
                }
            };
            let created = (|| -> Result<()> {
                match &node.node_type {
                    NodeType::Dir => {
                        make_room(&path, true)?;
                        match fs::create_dir(&path) {
                            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                            other => {
                                other?;
                                fresh_dirs.insert(&entry.dest);
                            }
                        }
                        restored.dirs += 1;
                    }
                    NodeType::File => {
                        make_room(&path, false)?;
                        let key = hardlink_key(node);
                        if let Some(first) = key.and_then(|k| hardlinks.get(&k)) {
                            fs::hard_link(first, &path)?;
                            restored.hardlinks += 1;
                            return Ok(());
                        }
                        if let Some(k) = key {
                            hardlinks.insert(k, path.clone());
                        }
                        let file = OpenOptions::new()
                            .write(true)
                            .create_new(true)
                            .custom_flags(libc::O_NOFOLLOW)
                            .open(&path)?;
                        file.set_len(node.meta.size)?;
                        restored.files += 1;
                        restored.file_bytes += node.meta.size;
                    }
                    NodeType::Symlink { .. } => {
                        make_room(&path, false)?;
                        std::os::unix::fs::symlink(node.node_type.to_link(), &path)?;
                        restored.symlinks += 1;
                    }
                    NodeType::Fifo => {
                        make_room(&path, false)?;
                        mknod(&path, libc::S_IFIFO | 0o600, 0)?;
                        restored.specials += 1;
                    }
                    NodeType::Dev { device } | NodeType::Chardev { device } => {
                        if !self.is_root {
                            populator_core::log::warn(format!(
                                "skipping device node {} (creating devices needs root)",
                                entry.dest.display()
                            ));
                            return Ok(());
                        }
                        make_room(&path, false)?;
                        let kind = if matches!(node.node_type, NodeType::Dev { .. }) {
                            libc::S_IFBLK
                        } else {
                            libc::S_IFCHR
                        };
                        mknod(&path, kind | 0o600, *device)?;
                        restored.specials += 1;
                    }
                    NodeType::Socket => {}
                }
                Ok(())
            })();
            created.with_context(|| format!("creating {}", path.display()))?;
        }
        Ok(())
    }

    /// Blobs that occur more than once are read once to see whether they
    /// are zeros (restic's chunker cuts long zero runs into identical
    /// blobs): those become holes and do not count against the capacity.
    fn zero_blobs(&self, files: &[FileJob]) -> Result<HashSet<DataId>> {
        let mut counts: HashMap<DataId, u32> = HashMap::new();
        for (id, _) in files.iter().flat_map(|f| &f.blobs) {
            *counts.entry(*id).or_default() += 1;
        }
        let mut zeros = HashSet::new();
        for (id, count) in counts {
            if count > 1 {
                let data = self.fetch(&id)?;
                if Id::new(Sha256::digest(&data).into()) != id.into_inner() {
                    return Err(self.blob_error(&id, "its content does not match its hash"));
                }
                if data.iter().all(|&b| b == 0) {
                    zeros.insert(id);
                }
            }
        }
        Ok(zeros)
    }

    /// One blob from the repository (authenticated by its encryption; its
    /// hash is checked when the file is read back).
    fn fetch(&self, id: &DataId) -> Result<bytes::Bytes> {
        self.repo
            .get_blob_cached(&(*id).into(), BlobType::Data)
            .map_err(|e| self.blob_error(id, &rustic_message(&e)))
    }

    /// The pack reads that bring every needed blob once, in the order the
    /// snapshot first needs their packs (restic writes packs in that order,
    /// so reads go forward through the repository).
    fn plan_reads(
        &self,
        files: &[FileJob],
        zero_blobs: &HashSet<DataId>,
    ) -> Result<(Vec<PackRead>, Vec<u32>)> {
        let mut blobs: Vec<PackBlob> = Vec::new();
        let mut blob_index: HashMap<DataId, usize> = HashMap::new();
        let mut packs: Vec<(PackId, Vec<usize>)> = Vec::new();
        let mut pack_index: HashMap<PackId, usize> = HashMap::new();
        let mut writes_per_file = vec![0u32; files.len()];
        for (i, file) in files.iter().enumerate() {
            let mut offset = 0u64;
            for &(id, len) in &file.blobs {
                if !zero_blobs.contains(&id) {
                    let b = match blob_index.get(&id) {
                        Some(&b) => b,
                        None => {
                            let entry = self
                                .repo
                                .get_index_entry(&id)
                                .map_err(|e| self.read_error(&e, "looking up a blob"))?;
                            let p = *pack_index.entry(entry.pack).or_insert_with(|| {
                                packs.push((entry.pack, Vec::new()));
                                packs.len() - 1
                            });
                            packs[p].1.push(blobs.len());
                            blob_index.insert(id, blobs.len());
                            blobs.push(PackBlob {
                                id,
                                offset: entry.location.offset,
                                length: entry.location.length,
                                uncompressed_length: entry.location.uncompressed_length,
                                targets: Vec::new(),
                            });
                            blobs.len() - 1
                        }
                    };
                    blobs[b].targets.push((i as u32, offset));
                    writes_per_file[i] += 1;
                }
                offset += u64::from(len);
            }
        }
        let mut slots: Vec<Option<PackBlob>> = blobs.into_iter().map(Some).collect();
        let mut reads = Vec::new();
        for (pack, mut members) in packs {
            members.sort_by_key(|&b| slots[b].as_ref().map_or(0, |b| b.offset));
            let mut current: Option<PackRead> = None;
            for b in members {
                let blob = slots[b].take().expect("each blob is in one pack");
                let (start, end) = (blob.offset, blob.offset + blob.length);
                match current.as_mut() {
                    Some(read)
                        if start <= read.offset + read.length + MAX_GAP
                            && end - read.offset <= MAX_RANGE =>
                    {
                        read.length = read.length.max(end - read.offset);
                        read.blobs.push(blob);
                    }
                    _ => {
                        reads.extend(current.take());
                        current = Some(PackRead {
                            pack,
                            offset: start,
                            length: end - start,
                            blobs: vec![blob],
                        });
                    }
                }
            }
            reads.extend(current);
        }
        Ok((reads, writes_per_file))
    }

    /// Pass 2: pack ranges read by `threads` workers, each cutting its
    /// range into blobs (decrypted and authenticated here) and writing them
    /// at their offsets. The thread that writes a file's last blob reads
    /// the file back through the same descriptor (pass 3).
    fn write_contents(&self, files: &[FileJob], zero_blobs: &HashSet<DataId>) -> Result<()> {
        let (reads, writes_per_file) = self.plan_reads(files, zero_blobs)?;
        let key = self.repo.key();
        let mut raw_key = aes256ctr_poly1305aes::Key::default();
        raw_key[0..32].copy_from_slice(&key.encrypt);
        raw_key[32..48].copy_from_slice(&key.mac.k);
        raw_key[48..64].copy_from_slice(&key.mac.r);
        let cipher = Aes256CtrPoly1305Aes::new(&raw_key);
        let progress = &self.ctx.progress;
        let mut buf = Vec::new();
        for (i, file) in files.iter().enumerate() {
            let zeros: u64 = file
                .blobs
                .iter()
                .filter(|(id, _)| zero_blobs.contains(id))
                .map(|(_, len)| u64::from(*len))
                .sum();
            progress.advance(zeros);
            if writes_per_file[i] == 0 {
                let path = self.root.join(&file.dest);
                let handle = File::open(&path)
                    .with_context(|| format!("reading back {}", path.display()))?;
                self.verify_file(file, &handle, &mut buf)?;
                progress.add_file_done();
            }
        }
        let remaining: Vec<AtomicU32> = writes_per_file.into_iter().map(AtomicU32::new).collect();
        let next = AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        let first_error = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..self.threads.max(1) {
                s.spawn(|| {
                    let mut writer = Writer {
                        restorer: self,
                        files,
                        remaining: &remaining,
                        open: None,
                        buf: Vec::new(),
                    };
                    loop {
                        if failed.load(Ordering::Relaxed) {
                            return;
                        }
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(read) = reads.get(i) else { return };
                        if let Err(e) = writer.restore_range(read, &cipher) {
                            failed.store(true, Ordering::Relaxed);
                            first_error
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .get_or_insert(e);
                            return;
                        }
                    }
                });
            }
        });
        match first_error.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Pass 3: a complete file read back and compared with the blob hashes
    /// (holes included: a zero blob must read back as zeros).
    fn verify_file(&self, job: &FileJob, file: &File, buf: &mut Vec<u8>) -> Result<()> {
        self.ctx.cancel.check()?;
        let path = || self.root.join(&job.dest);
        let mut offset = 0u64;
        for (id, len) in &job.blobs {
            buf.resize(*len as usize, 0);
            file.read_exact_at(buf, offset)
                .with_context(|| format!("reading back {}", path().display()))?;
            if Id::new(Sha256::digest(&buf[..]).into()) != id.into_inner() {
                return Err(self.blob_error(
                    id,
                    &format!(
                        "{} does not match the blob's hash when read back (at byte {offset})",
                        path().display()
                    ),
                ));
            }
            offset += u64::from(*len);
        }
        let size = file.metadata()?.len();
        if size != offset {
            return Err(fail(
                Kind::Integrity,
                "VerificationFailed",
                format!(
                    "{} is {size} bytes after restoring, the snapshot says {offset}",
                    path().display()
                ),
            ));
        }
        Ok(())
    }
    /// A blob that cannot be read or does not match: the pack file that
    /// holds it is named, so that a person can repair the repository.
    fn blob_error(&self, id: &DataId, why: &str) -> anyhow::Error {
        let pack = match self.repo.get_index_entry(id) {
            Ok(entry) => {
                let hex = entry.pack.to_hex();
                format!("pack file data/{}/{}", &hex[..2], &*hex)
            }
            Err(_) => "no pack file (the index does not know it)".into(),
        };
        let hex = id.to_hex();
        let transient = why.contains("onnect") || why.contains("timed out");
        let (kind, reason) = if transient {
            (Kind::Transient, "RepositoryUnreachable")
        } else {
            (Kind::Integrity, "CorruptPack")
        };
        fail(
            kind,
            reason,
            format!(
                "blob {} in {pack} of repository {} cannot be restored: {why} (check the repository with `restic check --read-data`)",
                &*hex, self.repo_name
            ),
        )
    }

    fn read_error(&self, err: &rustic_core::RusticError, what: &str) -> anyhow::Error {
        fail(
            Kind::Integrity,
            "CorruptRepository",
            format!("{what} in {}: {}", self.repo_name, rustic_message(err)),
        )
    }
}

/// One pass-2 thread: the file it last wrote stays open for its next blob.
struct Writer<'r, 'a> {
    restorer: &'r Restorer<'a>,
    files: &'r [FileJob],
    remaining: &'r [AtomicU32],
    open: Option<(u32, File)>,
    buf: Vec<u8>,
}

impl Writer<'_, '_> {
    fn restore_range(&mut self, read: &PackRead, cipher: &Aes256CtrPoly1305Aes) -> Result<()> {
        let r = self.restorer;
        r.ctx.cancel.check()?;
        let first = &read.blobs[0].id;
        let data = r
            .backend
            .read_partial(
                FileType::Pack,
                &read.pack.into_inner(),
                false,
                read.offset,
                read.length,
            )
            .map_err(|e| r.blob_error(first, &rustic_message(&e)))?;
        if data.len() != read.length as usize {
            return Err(r.blob_error(
                first,
                &format!(
                    "the pack file ends early ({} of {} bytes at offset {})",
                    data.len(),
                    read.length,
                    read.offset
                ),
            ));
        }
        r.ctx.progress.add_read(data.len() as u64);
        let mut data: Vec<u8> = data.into();
        for blob in &read.blobs {
            let start = (blob.offset - read.offset) as usize;
            let sealed = &mut data[start..start + blob.length as usize];
            let plain = open_blob(cipher, sealed, blob.uncompressed_length)
                .map_err(|why| r.blob_error(&blob.id, &why))?;
            let hole = plain.iter().all(|&b| b == 0);
            for &(file, offset) in &blob.targets {
                if hole {
                    // The file was created at its full size: zeros are there.
                    r.ctx.progress.advance(plain.len() as u64);
                } else {
                    self.write_at(file, offset, &plain)?;
                }
                if self.remaining[file as usize].fetch_sub(1, Ordering::AcqRel) == 1 {
                    self.file_complete(file)?;
                }
            }
        }
        Ok(())
    }

    fn write_at(&mut self, file: u32, offset: u64, data: &[u8]) -> Result<()> {
        let r = self.restorer;
        let handle = self.handle(file)?;
        handle.write_all_at(data, offset).with_context(|| {
            format!(
                "writing {}",
                r.root.join(&self.files[file as usize].dest).display()
            )
        })?;
        r.ctx.progress.add_written(data.len() as u64);
        r.ctx.progress.advance(data.len() as u64);
        Ok(())
    }

    /// The file open for reading and writing (reused from the last blob).
    fn handle(&mut self, file: u32) -> Result<&File> {
        if self.open.as_ref().map(|(f, _)| *f) != Some(file) {
            let path = self.restorer.root.join(&self.files[file as usize].dest);
            let handle = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            self.open = Some((file, handle));
        }
        Ok(&self.open.as_ref().expect("just opened").1)
    }

    /// This thread wrote the file's last blob: the whole file is there to
    /// be read back.
    fn file_complete(&mut self, file: u32) -> Result<()> {
        self.handle(file)?;
        let (_, handle) = self.open.take().expect("just opened");
        let mut buf = std::mem::take(&mut self.buf);
        let result = self
            .restorer
            .verify_file(&self.files[file as usize], &handle, &mut buf);
        self.buf = buf;
        self.restorer.ctx.progress.add_file_done();
        result
    }
}

/// A sealed blob (nonce, ciphertext, MAC) opened in place: authenticated,
/// decrypted, and decompressed when the repository compressed it.
fn open_blob<'d>(
    cipher: &Aes256CtrPoly1305Aes,
    sealed: &'d mut [u8],
    uncompressed_length: Option<NonZeroU32>,
) -> std::result::Result<Cow<'d, [u8]>, String> {
    if sealed.len() < 32 {
        return Err(format!(
            "the blob is {} bytes, too short to be sealed",
            sealed.len()
        ));
    }
    let (nonce, rest) = sealed.split_at_mut(16);
    let (text, tag) = rest.split_at_mut(rest.len() - 16);
    cipher
        .decrypt_in_place_detached(Nonce::from_slice(nonce), b"", text, Tag::from_slice(tag))
        .map_err(|_| {
            "its MAC does not match (the data is damaged or not from this repository)".to_string()
        })?;
    let Some(length) = uncompressed_length else {
        return Ok(Cow::Borrowed(text));
    };
    let plain = zstd::bulk::decompress(text, length.get() as usize)
        .map_err(|e| format!("it does not decompress: {e}"))?;
    if plain.len() != length.get() as usize {
        return Err(format!(
            "it decompresses to {} bytes, the index says {}",
            plain.len(),
            length
        ));
    }
    Ok(Cow::Owned(plain))
}

/// Names of one file: restic records the inode and link count.
fn hardlink_key(node: &Node) -> Option<(u64, u64)> {
    (node.meta.links > 1 && node.meta.inode != 0).then_some((node.meta.device_id, node.meta.inode))
}

fn hostile(message: String) -> anyhow::Error {
    fail(Kind::Integrity, "HostileEntry", message)
}

/// Clears the way for a new entry: a leftover of an earlier attempt that is
/// not a directory is removed (never followed); a directory stays when a
/// directory comes.
fn make_room(path: &Path, want_dir: bool) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() && want_dir => Ok(()),
        Ok(m) if m.is_dir() => Ok(fs::remove_dir_all(path)?),
        Ok(_) => Ok(fs::remove_file(path)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn cpath(path: &Path) -> Result<CString> {
    Ok(CString::new(path.as_os_str().as_bytes())?)
}

fn check(rc: libc::c_int, what: &str) -> Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(anyhow::Error::new(std::io::Error::last_os_error()).context(what.to_string()))
    }
}

fn mknod(path: &Path, mode: libc::mode_t, dev: u64) -> Result<()> {
    let p = cpath(path)?;
    // SAFETY: p is a valid NUL-terminated path.
    check(
        unsafe { libc::mknod(p.as_ptr(), mode, dev as libc::dev_t) },
        "mknod",
    )
}

/// Go's os.FileMode bits (what restic stores) to a Unix mode.
fn unix_mode(go_mode: u32) -> u32 {
    const GO_SETUID: u32 = 1 << 23;
    const GO_SETGID: u32 = 1 << 22;
    const GO_STICKY: u32 = 1 << 20;
    let mut mode = go_mode & 0o777;
    if go_mode & GO_SETUID != 0 {
        mode |= libc::S_ISUID;
    }
    if go_mode & GO_SETGID != 0 {
        mode |= libc::S_ISGID;
    }
    if go_mode & GO_STICKY != 0 {
        mode |= libc::S_ISVTX;
    }
    mode
}

/// Owner first (chown clears setuid bits), then mode, xattrs, and times last.
fn set_metadata(path: &Path, node: &Node, is_root: bool) -> Result<()> {
    let p = cpath(path)?;
    let meta = &node.meta;
    if is_root {
        if let (Some(uid), Some(gid)) = (meta.uid, meta.gid) {
            // SAFETY: p is a valid NUL-terminated path.
            check(unsafe { libc::lchown(p.as_ptr(), uid, gid) }, "lchown")?;
        }
    }
    if !node.is_symlink() {
        if let Some(mode) = meta.mode {
            // SAFETY: p is a valid NUL-terminated path.
            check(unsafe { libc::chmod(p.as_ptr(), unix_mode(mode)) }, "chmod")?;
        }
    }
    for xattr in &meta.extended_attributes {
        let name = CString::new(xattr.name.as_bytes())?;
        let value = xattr.value.as_deref().unwrap_or_default();
        // SAFETY: valid C strings, value pointer and length from a slice.
        let rc = unsafe {
            libc::lsetxattr(
                p.as_ptr(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        check(rc, &format!("setting xattr {}", xattr.name))?;
    }
    let time = |t: Option<rustic_core::jiff::Timestamp>| match t {
        Some(t) => libc::timespec {
            tv_sec: t.as_second() as libc::time_t,
            tv_nsec: libc::c_long::from(t.subsec_nanosecond()),
        },
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
    };
    let times = [time(meta.atime), time(meta.mtime)];
    // SAFETY: p is valid; times is an array of two timespecs.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            p.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    check(rc, "setting times")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_modes() {
        assert_eq!(unix_mode(0o755), 0o755);
        assert_eq!(unix_mode((1 << 31) | 0o1777 & 0o777 | (1 << 20)), 0o1777);
        assert_eq!(unix_mode((1 << 23) | 0o755), 0o4755);
    }
}
