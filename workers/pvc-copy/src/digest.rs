//! Digests that prove a copy: the device digest of a block volume and the
//! tree digest of a filesystem volume. Both hash content in 4 MiB chunks
//! (sha256 of the list of chunk sha256s), so zero chunks and holes cost no
//! hashing, the chunks hash in parallel, and the result does not depend on
//! how a filesystem laid out its holes. The tree digest adds each entry's
//! path, type, mode, owner, size, mtime, device number, symlink target,
//! xattrs and hard-link group (atime is left out: reading changes it).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use anyhow::{Context as _, Result};
use populator_core::cancel::CancelToken;
use sha2::{Digest as _, Sha256};

use crate::meta::{rel_bytes, Entry, FileKind};
use crate::walk::{walk, Visitor};

pub const CHUNK: u64 = 4 << 20;
pub type Hash = [u8; 32];

pub fn sha256(data: &[u8]) -> Hash {
    Sha256::digest(data).into()
}

fn zero_chunk_hash() -> &'static Hash {
    static H: OnceLock<Hash> = OnceLock::new();
    H.get_or_init(|| sha256(&vec![0u8; CHUNK as usize]))
}

pub fn is_zero(data: &[u8]) -> bool {
    let (prefix, words, suffix) = unsafe { data.align_to::<u128>() };
    prefix.iter().all(|&b| b == 0)
        && suffix.iter().all(|&b| b == 0)
        && words.iter().all(|&w| w == 0)
}

/// The hash of one chunk; all-zero chunks skip the hashing.
pub fn chunk_hash(data: &[u8]) -> Hash {
    if data.len() as u64 == CHUNK && is_zero(data) {
        *zero_chunk_hash()
    } else {
        sha256(data)
    }
}

/// The hash of a chunk known to be zeros (a hole) of `len` bytes.
pub fn zero_hash(len: u64) -> Hash {
    if len == CHUNK {
        *zero_chunk_hash()
    } else {
        sha256(&vec![0u8; len as usize])
    }
}

/// Combines chunk hashes into a content digest.
pub fn combine(chunks: &[Hash]) -> Hash {
    let mut h = Sha256::new();
    for c in chunks {
        h.update(c);
    }
    h.finalize().into()
}

pub fn chunk_count(size: u64) -> u64 {
    size.div_ceil(CHUNK)
}

pub fn chunk_len(size: u64, index: u64) -> u64 {
    (size - index * CHUNK).min(CHUNK)
}

/// Opens for reading without touching atime when allowed.
pub fn open_noatime(path: &Path) -> io::Result<File> {
    let open = |flags| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(flags | libc::O_NOFOLLOW)
            .open(path)
    };
    match open(libc::O_NOATIME) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => open(0),
        other => other,
    }
}

/// Content digest of the first `size` bytes of a file or device, with
/// `threads` readers (chunks whose range is a hole are not read).
pub fn content_digest(
    file: &File,
    size: u64,
    holes_known: bool,
    threads: usize,
    cancel: &CancelToken,
) -> Result<Hash> {
    let count = chunk_count(size);
    let segments = if holes_known {
        crate::filecopy::data_segments(file, size, 0)?
    } else {
        vec![(0, size)]
    };
    let hashes: Vec<Mutex<Hash>> = (0..count).map(|_| Mutex::new([0; 32])).collect();
    let next = AtomicU64::new(0);
    let error: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads.clamp(1, count.max(1) as usize) {
            s.spawn(|| {
                let mut buf = vec![0u8; 0];
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count || cancel.is_cancelled() {
                        return;
                    }
                    let (start, len) = (i * CHUNK, chunk_len(size, i));
                    let has_data = segments.iter().any(|&(a, b)| a < start + len && b > start);
                    let h = if has_data {
                        if buf.is_empty() {
                            buf = vec![0u8; CHUNK as usize];
                        }
                        match file.read_exact_at(&mut buf[..len as usize], start) {
                            Ok(()) => chunk_hash(&buf[..len as usize]),
                            Err(e) => {
                                error.lock().unwrap().get_or_insert(e.into());
                                return;
                            }
                        }
                    } else {
                        zero_hash(len)
                    };
                    *hashes[i as usize].lock().unwrap() = h;
                }
            });
        }
    });
    if let Some(e) = error.into_inner().unwrap() {
        return Err(e);
    }
    cancel.check()?;
    let list: Vec<Hash> = hashes
        .into_iter()
        .map(|m| m.into_inner().unwrap())
        .collect();
    Ok(combine(&list))
}

/// What the tree digest covers beyond content.
#[derive(Clone, Copy, Debug)]
pub struct TreeDigestOptions {
    pub owners: bool,
}

/// One entry's record: everything compared, hashed.
pub fn entry_record(e: &Entry, content: Option<&Hash>, o: TreeDigestOptions) -> Vec<u8> {
    let mut r = Vec::with_capacity(128);
    let rel = rel_bytes(&e.rel);
    r.extend_from_slice(&(rel.len() as u32).to_le_bytes());
    r.extend_from_slice(rel);
    r.push(e.kind.code());
    if e.kind != FileKind::Symlink {
        r.extend_from_slice(&e.mode.to_le_bytes());
    }
    if o.owners {
        r.extend_from_slice(&e.uid.to_le_bytes());
        r.extend_from_slice(&e.gid.to_le_bytes());
    }
    r.extend_from_slice(&e.size.to_le_bytes());
    r.extend_from_slice(&e.mtime.0.to_le_bytes());
    r.extend_from_slice(&e.mtime.1.to_le_bytes());
    if matches!(e.kind, FileKind::Char | FileKind::Block) {
        r.extend_from_slice(&e.rdev.to_le_bytes());
    }
    r.extend_from_slice(&(e.link.len() as u32).to_le_bytes());
    r.extend_from_slice(&e.link);
    for (name, value) in &e.xattrs {
        r.extend_from_slice(&(name.len() as u32).to_le_bytes());
        r.extend_from_slice(name);
        r.extend_from_slice(&(value.len() as u32).to_le_bytes());
        r.extend_from_slice(value);
    }
    r.push(0xff);
    if let Some(c) = content {
        r.extend_from_slice(c);
    }
    r
}

/// One entry's record and, for a hard-linked entry, its inode key.
pub struct Collected {
    pub rel: PathBuf,
    pub record: Vec<u8>,
    pub inode: Option<(u64, u64)>,
}

/// Content digests already known by path (a receiver hashed the bytes as
/// they arrived), so those files are not read again.
pub type KnownContent<'a> = &'a (dyn Fn(&Path) -> Option<Hash> + Sync);

struct TreeDigester<'a> {
    root: &'a Path,
    options: TreeDigestOptions,
    known: Option<KnownContent<'a>>,
    cancel: &'a CancelToken,
    out: Mutex<Vec<Collected>>,
}

impl TreeDigester<'_> {
    fn collect(&self, rel: &Path) -> Result<()> {
        let path = crate::meta::join(self.root, rel);
        let (e, content) = if rel.as_os_str().is_empty() {
            (Entry::read(self.root, rel)?, None)
        } else {
            let e = Entry::read(self.root, rel)
                .with_context(|| format!("reading {}", path.display()))?;
            let known = (e.kind == FileKind::File)
                .then(|| self.known.and_then(|k| k(rel)))
                .flatten();
            let content = if known.is_some() {
                known
            } else if e.kind == FileKind::File {
                let f =
                    open_noatime(&path).with_context(|| format!("opening {}", path.display()))?;
                Some(
                    content_digest(&f, e.size, e.allocated < e.size, 1, self.cancel)
                        .with_context(|| format!("reading {}", path.display()))?,
                )
            } else {
                None
            };
            (e, content)
        };
        let record = entry_record(&e, content.as_ref(), self.options);
        let inode = e.is_hardlinked().then_some((e.dev, e.ino));
        self.out.lock().unwrap().push(Collected {
            rel: e.rel,
            record,
            inode,
        });
        Ok(())
    }
}

impl Visitor for TreeDigester<'_> {
    fn dir(&self, rel: &Path) -> Result<()> {
        self.collect(rel)
    }

    fn item(&self, rel: &Path, _kind: std::fs::FileType, _scratch: &mut Vec<u8>) -> Result<()> {
        self.collect(rel)
    }
}

/// A tree's digest and the record hash of each path (to name a difference).
pub struct TreeDigest {
    pub digest: Hash,
    pub records: Vec<(PathBuf, Hash)>,
}

impl TreeDigest {
    pub fn hex(&self) -> String {
        hex::encode(self.digest)
    }

    /// The first path whose record differs, for a message.
    pub fn first_difference(&self, other: &TreeDigest) -> Option<String> {
        let theirs: HashMap<&PathBuf, &Hash> = other.records.iter().map(|(p, h)| (p, h)).collect();
        for (p, h) in &self.records {
            match theirs.get(p) {
                Some(t) if *t == h => {}
                Some(_) => return Some(format!("{} differs", show(p))),
                None => return Some(format!("{} is missing from the copy", show(p))),
            }
        }
        let ours: HashMap<&PathBuf, ()> = self.records.iter().map(|(p, _)| (p, ())).collect();
        other
            .records
            .iter()
            .find(|(p, _)| !ours.contains_key(p))
            .map(|(p, _)| format!("{} is only in the copy", show(p)))
    }
}

fn show(rel: &Path) -> String {
    if rel.as_os_str().is_empty() {
        "the top directory".into()
    } else {
        format!("'{}'", rel.display())
    }
}

/// Walks and hashes a tree; `skip_at_root` names are left out.
pub fn tree_digest(
    root: &Path,
    skip_at_root: &[&str],
    options: TreeDigestOptions,
    jobs: usize,
    cancel: &CancelToken,
) -> Result<TreeDigest> {
    tree_digest_with(root, skip_at_root, options, jobs, cancel, None)
}

/// `tree_digest`, taking the content digest of files `known` names from it
/// (their metadata is still read from the tree).
pub fn tree_digest_with(
    root: &Path,
    skip_at_root: &[&str],
    options: TreeDigestOptions,
    jobs: usize,
    cancel: &CancelToken,
    known: Option<KnownContent>,
) -> Result<TreeDigest> {
    let d = TreeDigester {
        root,
        options,
        known,
        cancel,
        out: Mutex::new(Vec::new()),
    };
    walk(root, skip_at_root, jobs, cancel, &d)?;
    Ok(aggregate(d.out.into_inner().unwrap()))
}

/// The tree digest of collected records, in path order.
pub fn aggregate(mut collected: Vec<Collected>) -> TreeDigest {
    collected.sort_by(|a, b| a.rel.cmp(&b.rel));
    // A hard-link group is named by its first path, so the record says which
    // paths share an inode whatever the inode numbers are.
    // Links that leave the tree do not count: only groups seen twice here.
    let mut members: HashMap<(u64, u64), usize> = HashMap::new();
    for inode in collected.iter().filter_map(|c| c.inode) {
        *members.entry(inode).or_default() += 1;
    }
    let mut leaders: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    let mut h = Sha256::new();
    let mut records = Vec::with_capacity(collected.len());
    for c in &mut collected {
        if let Some(inode) = c.inode.filter(|i| members[i] > 1) {
            let leader = leaders
                .entry(inode)
                .or_insert_with(|| rel_bytes(&c.rel).to_vec());
            c.record.extend_from_slice(b"link");
            c.record.extend_from_slice(leader);
        }
        let rh = sha256(&c.record);
        h.update(rh);
        records.push((std::mem::take(&mut c.rel), rh));
    }
    TreeDigest {
        digest: h.finalize().into(),
        records,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn content_digest_ignores_how_zeros_are_stored() {
        let dir = std::env::temp_dir().join(format!("pvc-digest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let size = 9 * CHUNK + 12345;
        let (sparse, dense) = (dir.join("sparse"), dir.join("dense"));
        let f = File::create(&sparse).unwrap();
        f.write_all_at(b"data", 5 * CHUNK + 7).unwrap();
        f.set_len(size).unwrap();
        let mut all = vec![0u8; size as usize];
        all[(5 * CHUNK + 7) as usize..(5 * CHUNK + 11) as usize].copy_from_slice(b"data");
        std::fs::write(&dense, &all).unwrap();
        let cancel = CancelToken::default();
        let a = content_digest(&File::open(&sparse).unwrap(), size, true, 2, &cancel).unwrap();
        let b = content_digest(&File::open(&dense).unwrap(), size, false, 1, &cancel).unwrap();
        assert_eq!(a, b);
        let hashes: Vec<Hash> = all.chunks(CHUNK as usize).map(sha256).collect();
        assert_eq!(a, combine(&hashes));
        assert!(is_zero(&all[..CHUNK as usize]) && !is_zero(&all[(5 * CHUNK) as usize..]));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
