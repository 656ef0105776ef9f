//! The checkout, done here rather than by libgit2: libgit2's is single-threaded
//! and cannot be interrupted once it writes. The commit's tree is walked and
//! every name checked (no `..`, no `.git`, no `/`: nothing escapes the
//! target or plants hooks); directories are made first, then files are
//! written by a bounded pool of threads that poll the cancel flag, symlinks
//! last (so no write ever goes through one), and the index is written with
//! the files' stat data so `git status` is clean at once. Blobs land as
//! stored: no `.gitattributes` filters, exactly what `git archive` gives.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::{Context as _, Result};
use git2::{IndexEntry, IndexTime, Oid, Repository, Tree};
use populator_core::error::{fail, is_no_space, Kind};
use populator_core::target::human_bytes;
use populator_core::Context;

const MODE_TREE: i32 = 0o040000;
const MODE_EXEC: i32 = 0o100755;
const MODE_LINK: i32 = 0o120000;
const MODE_GITLINK: i32 = 0o160000;
const SKIP_WORKTREE: u16 = 1 << 14;

#[derive(Clone, Debug)]
pub struct Entry {
    /// Relative, `/`-separated, as in the tree.
    pub path: Vec<u8>,
    pub oid: Oid,
    pub mode: i32,
}

impl Entry {
    pub fn rel(&self) -> &Path {
        Path::new(OsStr::from_bytes(&self.path))
    }
}

/// What the checkout will create.
#[derive(Default)]
pub struct Plan {
    pub dirs: Vec<Vec<u8>>,
    pub files: Vec<Entry>,
    pub symlinks: Vec<Entry>,
    /// Submodule commits, by path.
    pub gitlinks: Vec<Entry>,
    /// Pairs of paths that differ only in case.
    pub case_collisions: Vec<(String, String)>,
    sparse: bool,
}

/// Walks `tree`, keeping only `sparse` paths (all when empty), and refuses
/// any name that could escape the target or reach into `.git`.
pub fn plan(repo: &Repository, tree: &Tree<'_>, sparse: &[String]) -> Result<Plan> {
    let mut plan = Plan {
        sparse: !sparse.is_empty(),
        ..Plan::default()
    };
    let mut seen = HashMap::new();
    walk(repo, tree, b"", sparse, &mut plan, &mut seen)?;
    Ok(plan)
}

fn walk(
    repo: &Repository,
    tree: &Tree<'_>,
    prefix: &[u8],
    sparse: &[String],
    plan: &mut Plan,
    seen: &mut HashMap<Vec<u8>, Vec<u8>>,
) -> Result<()> {
    for entry in tree.iter() {
        let name = entry.name_bytes();
        let mut path = prefix.to_vec();
        if !path.is_empty() {
            path.push(b'/');
        }
        path.extend_from_slice(name);
        check_name(name, &path)?;
        let mode = entry.filemode();
        if mode == MODE_LINK && name.eq_ignore_ascii_case(b".gitmodules") {
            return Err(hostile(&path, "'.gitmodules' is a symlink"));
        }
        let wanted = sparse_wants(sparse, &path);
        if mode == MODE_TREE {
            if wanted != Want::No {
                let subtree = repo
                    .find_tree(entry.id())
                    .with_context(|| format!("reading tree {}", String::from_utf8_lossy(&path)))?;
                note_case(&path, seen, plan);
                plan.dirs.push(path.clone());
                walk(repo, &subtree, &path, sparse, plan, seen)?;
            }
            continue;
        }
        if wanted != Want::Yes {
            continue;
        }
        note_case(&path, seen, plan);
        let e = Entry {
            path,
            oid: entry.id(),
            mode,
        };
        match mode {
            MODE_LINK => plan.symlinks.push(e),
            MODE_GITLINK => plan.gitlinks.push(e),
            _ => plan.files.push(e),
        }
    }
    Ok(())
}

fn note_case(path: &[u8], seen: &mut HashMap<Vec<u8>, Vec<u8>>, plan: &mut Plan) {
    if let Some(prev) = seen.insert(path.to_ascii_lowercase(), path.to_vec()) {
        plan.case_collisions.push((
            String::from_utf8_lossy(&prev).into_owned(),
            String::from_utf8_lossy(path).into_owned(),
        ));
    }
}

#[derive(PartialEq, Eq)]
enum Want {
    Yes,
    /// A directory on the way to a wanted path.
    Through,
    No,
}

fn sparse_wants(sparse: &[String], path: &[u8]) -> Want {
    if sparse.is_empty() {
        return Want::Yes;
    }
    let mut want = Want::No;
    for p in sparse {
        let p = p.as_bytes();
        if path == p || (path.starts_with(p) && path.get(p.len()) == Some(&b'/')) {
            return Want::Yes;
        }
        if p.starts_with(path) && p.get(path.len()) == Some(&b'/') {
            want = Want::Through;
        }
    }
    want
}

/// git's own rules for a tree entry name, on every platform: no empty name,
/// `.`, `..`, `/` or NUL, and no `.git` in any case or NTFS spelling.
fn check_name(name: &[u8], path: &[u8]) -> Result<()> {
    let why = if name.is_empty() {
        Some("an empty name")
    } else if name == b"." || name == b".." {
        Some("a '.' or '..' entry would climb out of its directory")
    } else if name.contains(&b'/') || name.contains(&0) {
        Some("a name holding '/' or NUL")
    } else if is_dot_git(name) {
        Some("a '.git' entry would plant files (hooks, config) in the repository itself")
    } else {
        None
    };
    match why {
        Some(why) => Err(hostile(path, why)),
        None => Ok(()),
    }
}

fn is_dot_git(name: &[u8]) -> bool {
    let trimmed = {
        let mut n = name;
        while let Some((last, rest)) = n.split_last() {
            if *last == b'.' || *last == b' ' {
                n = rest;
            } else {
                break;
            }
        }
        n
    };
    trimmed.eq_ignore_ascii_case(b".git") || name.eq_ignore_ascii_case(b"git~1")
}

fn hostile(path: &[u8], why: &str) -> anyhow::Error {
    fail(
        Kind::Integrity,
        "HostileRepository",
        format!(
            "the commit's tree holds an unsafe path '{}' ({why}); refusing to check it out",
            String::from_utf8_lossy(path).escape_debug()
        ),
    )
}

/// Limits the checkout enforces as it writes.
pub struct Limits {
    /// Bytes the target can take (`--pvc-size`, free space).
    pub capacity: Option<u64>,
    pub threads: usize,
}

/// Writes the plan under `root` with `limits.threads` writers; returns the
/// stat data of what it wrote, for the index.
pub fn write(
    gitdir: &Path,
    root: &Path,
    plan: &Plan,
    limits: &Limits,
    ctx: &Context,
) -> Result<Vec<(usize, fs::Metadata)>> {
    for dir in &plan.dirs {
        let p = root.join(OsStr::from_bytes(dir));
        fs::create_dir(&p).map_err(|e| create_error(e, dir, &p))?;
    }
    // Submodules get an empty directory, as git (and git archive) leave them.
    for link in &plan.gitlinks {
        let p = root.join(link.rel());
        fs::create_dir(&p).map_err(|e| create_error(e, &link.path, &p))?;
    }
    let runs = directory_runs(&plan.files);
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let used = AtomicU64::new(0);
    let first_error: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    let stats: Mutex<Vec<(usize, fs::Metadata)>> = Mutex::new(Vec::with_capacity(plan.files.len()));
    std::thread::scope(|s| {
        for _ in 0..limits.threads.max(1) {
            s.spawn(|| {
                let outcome =
                    write_files(gitdir, root, plan, &runs, limits, ctx, &next, &stop, &used);
                match outcome {
                    Ok(mut mine) => stats.lock().unwrap().append(&mut mine),
                    Err(e) => {
                        stop.store(true, Ordering::SeqCst);
                        first_error.lock().unwrap().get_or_insert(e);
                    }
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().unwrap() {
        return Err(e);
    }
    let mut stats = stats.into_inner().unwrap();
    let repo = Repository::open(gitdir)?;
    let odb = repo.odb()?;
    for (i, link) in plan.symlinks.iter().enumerate() {
        ctx.cancel.check()?;
        let object = odb.read(link.oid)?;
        let p = root.join(link.rel());
        std::os::unix::fs::symlink(OsStr::from_bytes(object.data()), &p)
            .map_err(|e| create_error(e, &link.path, &p))?;
        stats.push((plan.files.len() + i, fs::symlink_metadata(&p)?));
    }
    Ok(stats)
}

/// The plan's files cut into runs that share a parent directory (at most
/// [`MAX_RUN`] files each), the unit a writer claims. Two writers creating
/// files in one directory take turns on its lock, and the kernel spins
/// while it waits: claiming one file at a time put both writers in the same
/// directory almost always, and perf showed a tenth of the run spinning in
/// `rwsem_spin_on_owner` under `openat`.
fn directory_runs(files: &[Entry]) -> Vec<std::ops::Range<usize>> {
    fn parent(e: &Entry) -> &[u8] {
        let end = e.path.iter().rposition(|&b| b == b'/').unwrap_or(0);
        &e.path[..end]
    }
    let mut runs = Vec::new();
    let mut start = 0;
    for i in 1..=files.len() {
        let cut =
            i == files.len() || i - start == MAX_RUN || parent(&files[i]) != parent(&files[start]);
        if cut {
            runs.push(start..i);
            start = i;
        }
    }
    runs
}

/// A very large directory is still shared by the writers, in runs this long.
const MAX_RUN: usize = 1024;

#[allow(clippy::too_many_arguments)]
fn write_files(
    gitdir: &Path,
    root: &Path,
    plan: &Plan,
    runs: &[std::ops::Range<usize>],
    limits: &Limits,
    ctx: &Context,
    next: &AtomicUsize,
    stop: &AtomicBool,
    used: &AtomicU64,
) -> Result<Vec<(usize, fs::Metadata)>> {
    let repo = Repository::open(gitdir)?;
    let odb = repo.odb()?;
    let mut out = Vec::new();
    let mut claimed = 0..0;
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(out);
        }
        ctx.cancel.check()?;
        if claimed.is_empty() {
            match runs.get(next.fetch_add(1, Ordering::Relaxed)) {
                Some(run) => claimed = run.clone(),
                None => return Ok(out),
            }
        }
        let i = claimed.next().expect("a claimed index");
        let entry = &plan.files[i];
        let object = odb
            .read(entry.oid)
            .with_context(|| format!("reading blob {} for {}", entry.oid, entry.rel().display()))?;
        let data = object.data();
        // What the file takes on disk, in 4 KiB blocks, against --pvc-size.
        let blocks = (data.len() as u64).div_ceil(4096) * 4096;
        let total = used.fetch_add(blocks, Ordering::Relaxed) + blocks;
        if let Some(cap) = limits.capacity {
            if total > cap {
                return Err(fail(
                    Kind::Capacity,
                    "InsufficientCapacity",
                    format!(
                        "the checkout needs more than the {} the target can take",
                        human_bytes(cap)
                    ),
                ));
            }
        }
        let path = root.join(entry.rel());
        let mode = if entry.mode == MODE_EXEC {
            0o777
        } else {
            0o666
        };
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .map_err(|e| create_error(e, &entry.path, &path))?;
        file.write_all(data).map_err(|e| write_error(e, &path))?;
        out.push((i, file.metadata()?));
        ctx.progress.add_written(data.len() as u64);
        ctx.progress.advance(data.len() as u64);
    }
}

fn create_error(e: std::io::Error, rel: &[u8], path: &Path) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::AlreadyExists {
        return hostile(
            rel,
            "it names the same file as another entry (a duplicate, or a name differing only in case on a case-insensitive filesystem)",
        );
    }
    write_error(e, path)
}

fn write_error(e: std::io::Error, path: &Path) -> anyhow::Error {
    if is_no_space(&e) {
        return fail(
            Kind::Capacity,
            "NoSpaceLeft",
            format!("the target is full while writing {}", path.display()),
        );
    }
    anyhow::Error::new(e).context(format!("writing {}", path.display()))
}

/// The index of the checkout, with the stat data of the files written so
/// that git sees them clean. A full checkout's index is written directly
/// (format 2: one sorted pass, a tenth of the time of libgit2's one entry at
/// a time); a sparse one goes through libgit2 to mark skip-worktree.
pub fn write_index(
    repo: &Repository,
    tree: &Tree<'_>,
    plan: &Plan,
    stats: &[(usize, fs::Metadata)],
) -> Result<()> {
    if plan.sparse {
        return write_index_libgit2(repo, tree, plan, stats);
    }
    let mut entries: Vec<(&Entry, Option<&fs::Metadata>)> = stats
        .iter()
        .map(|(i, meta)| {
            let e = if *i < plan.files.len() {
                &plan.files[*i]
            } else {
                &plan.symlinks[*i - plan.files.len()]
            };
            (e, Some(meta))
        })
        .chain(plan.gitlinks.iter().map(|e| (e, None)))
        .collect();
    entries.sort_by(|a, b| a.0.path.cmp(&b.0.path));
    let mut out = Vec::with_capacity(entries.len() * 96 + 32);
    out.extend_from_slice(b"DIRC");
    out.extend_from_slice(&2u32.to_be_bytes());
    out.extend_from_slice(&(entries.len() as u32).to_be_bytes());
    for (e, meta) in entries {
        let mode: u32 = match e.mode {
            MODE_LINK => 0o120000,
            MODE_EXEC => 0o100755,
            MODE_GITLINK => 0o160000,
            _ => 0o100644,
        };
        let start = out.len();
        let stat: [u32; 6] = match meta {
            Some(m) => [
                m.ctime() as u32,
                m.ctime_nsec() as u32,
                m.mtime() as u32,
                m.mtime_nsec() as u32,
                m.dev() as u32,
                m.ino() as u32,
            ],
            None => [0; 6],
        };
        for v in stat {
            out.extend_from_slice(&v.to_be_bytes());
        }
        let (uid, gid, size) = meta.map_or((0, 0, 0), |m| (m.uid(), m.gid(), m.len() as u32));
        for v in [mode, uid, gid, size] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        out.extend_from_slice(e.oid.as_bytes());
        out.extend_from_slice(&(e.path.len().min(0xfff) as u16).to_be_bytes());
        out.extend_from_slice(&e.path);
        // NUL-padded to a multiple of 8, at least one NUL.
        let len = out.len() - start;
        out.resize(start + (len + 8) / 8 * 8, 0);
    }
    let digest = <sha1::Sha1 as sha1::Digest>::digest(&out);
    out.extend_from_slice(&digest);
    let path = repo.path().join("index");
    let tmp = repo.path().join("index.lock");
    fs::write(&tmp, &out).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn write_index_libgit2(
    repo: &Repository,
    tree: &Tree<'_>,
    plan: &Plan,
    stats: &[(usize, fs::Metadata)],
) -> Result<()> {
    let mut index = repo.index()?;
    index.read_tree(tree)?;
    let mut sorted: Vec<&(usize, fs::Metadata)> = stats.iter().collect();
    let entry_of = |i: usize| {
        if i < plan.files.len() {
            &plan.files[i]
        } else {
            &plan.symlinks[i - plan.files.len()]
        }
    };
    sorted.sort_by(|a, b| entry_of(a.0).path.cmp(&entry_of(b.0).path));
    for (i, meta) in sorted {
        let e = entry_of(*i);
        let mode = match e.mode {
            MODE_LINK => MODE_LINK,
            MODE_EXEC => MODE_EXEC,
            _ => 0o100644,
        } as u32;
        index.add(&IndexEntry {
            ctime: IndexTime::new(meta.ctime() as i32, meta.ctime_nsec() as u32),
            mtime: IndexTime::new(meta.mtime() as i32, meta.mtime_nsec() as u32),
            dev: meta.dev() as u32,
            ino: meta.ino() as u32,
            mode,
            uid: meta.uid(),
            gid: meta.gid(),
            file_size: meta.len() as u32,
            id: e.oid,
            flags: e.path.len().min(0xfff) as u16,
            flags_extended: 0,
            path: e.path.clone(),
        })?;
    }
    if plan.sparse {
        let written: std::collections::HashSet<&[u8]> = plan
            .files
            .iter()
            .chain(&plan.symlinks)
            .chain(&plan.gitlinks)
            .map(|e| e.path.as_slice())
            .collect();
        let skipped: Vec<IndexEntry> = index
            .iter()
            .filter(|e| !written.contains(e.path.as_slice()))
            .collect();
        for mut e in skipped {
            e.flags_extended |= SKIP_WORKTREE;
            index.add(&e)?;
        }
    }
    index.write()?;
    Ok(())
}

/// A new repository with a worktree at `dir`, from no template and without
/// a hooks directory: the host's git templates stay out of the volume.
pub fn init_repo(dir: &Path) -> Result<Repository> {
    let mut opts = git2::RepositoryInitOptions::new();
    opts.external_template(false);
    let repo = Repository::init_opts(dir, &opts)?;
    // Even libgit2's built-in template has a hooks/README.sample.
    let hooks = repo.path().join("hooks");
    if hooks.exists() {
        fs::remove_dir_all(&hooks).with_context(|| format!("removing {}", hooks.display()))?;
    }
    Ok(repo)
}

/// A warning naming the paths that differ only in case, if any.
pub fn describe_collisions(plan: &Plan) -> Option<String> {
    if plan.case_collisions.is_empty() {
        return None;
    }
    let shown: Vec<String> = plan
        .case_collisions
        .iter()
        .take(5)
        .map(|(a, b)| format!("'{a}' and '{b}'"))
        .collect();
    Some(format!(
        "the tree holds {} name(s) differing only in case ({}{}); both are checked out here, a case-insensitive filesystem would keep one",
        plan.case_collisions.len(),
        shown.join(", "),
        if plan.case_collisions.len() > 5 { ", …" } else { "" }
    ))
}

/// `root` joined with a tree path.
pub fn root_path(root: &Path, rel: &[u8]) -> PathBuf {
    root.join(OsStr::from_bytes(rel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for bad in [
            &b".."[..],
            b".",
            b"",
            b".git",
            b".GIT",
            b".git.",
            b"git~1",
            b"a/b",
        ] {
            assert!(
                check_name(bad, bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        for good in [&b".gitignore"[..], b".github", b"git", b"..a"] {
            assert!(check_name(good, good).is_ok());
        }
    }

    #[test]
    fn sparse() {
        let s = vec!["docs/api".to_string(), "README".to_string()];
        assert!(sparse_wants(&s, b"docs") == Want::Through);
        assert!(sparse_wants(&s, b"docs/api") == Want::Yes);
        assert!(sparse_wants(&s, b"docs/api/x.md") == Want::Yes);
        assert!(sparse_wants(&s, b"docs/other") == Want::No);
        assert!(sparse_wants(&s, b"README") == Want::Yes);
        assert!(sparse_wants(&s, b"README.md") == Want::No);
        assert!(sparse_wants(&[], b"x") == Want::Yes);
    }
}
