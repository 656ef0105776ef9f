//! Local mode: both volumes mounted in one pod. Picks the copy by what the
//! source and the target are, checks capacity and emptiness before writing
//! anything, and verifies on request.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use anyhow::{Context as _, Result};
use populator_core::error::{fail, Kind};
use populator_core::target::{block_device_size, short_bytes, Target, TargetKind};
use populator_core::Context;

use crate::block::{copy_device, load_local_journal, Resume, Zeroing};
use crate::cli::LocalArgs;
use crate::digest::{content_digest, tree_digest, TreeDigestOptions};
use crate::tree::{preserve_for, target_contents, TreeCopy, LOST_FOUND, STATE_DIR};

/// What a source path is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceKind {
    Dir,
    Block,
    File,
}

impl SourceKind {
    pub fn name(self) -> &'static str {
        match self {
            SourceKind::Dir => "directory",
            SourceKind::Block => "block device",
            SourceKind::File => "image file",
        }
    }
}

pub fn source_kind(path: &Path) -> Result<SourceKind> {
    let m = std::fs::metadata(path).map_err(|e| {
        fail(
            Kind::Usage,
            "SourceUnreadable",
            format!(
                "source {} cannot be read: {e} (mount the source volume there)",
                path.display()
            ),
        )
    })?;
    if m.is_dir() {
        Ok(SourceKind::Dir)
    } else if m.file_type().is_block_device() {
        Ok(SourceKind::Block)
    } else if m.is_file() {
        Ok(SourceKind::File)
    } else {
        Err(fail(
            Kind::Usage,
            "InvalidSource",
            format!(
                "source {} is neither a directory, a block device nor an image file",
                path.display()
            ),
        ))
    }
}

/// The size of a block source (device or image file).
pub fn device_size(path: &Path, kind: SourceKind) -> Result<u64> {
    match kind {
        SourceKind::Block => block_device_size(path),
        _ => Ok(std::fs::metadata(path)?.len()),
    }
}

fn usage(reason: &'static str, message: String) -> anyhow::Error {
    fail(Kind::Usage, reason, message)
}

pub fn run(args: LocalArgs, ctx: &Context) -> Result<String> {
    crate::meta::clear_umask();
    let source = resolve_source(args.source.as_deref(), args.source_file.as_deref())?;
    let kind = source_kind(&source)?;
    let target = Target::detect(args.common.target_path().as_deref(), args.common.pvc_size)?;
    ctx.report.set_target(&target);
    ctx.report.set("source", source.display().to_string());
    match (kind, target.kind) {
        (SourceKind::Dir, TargetKind::Filesystem) if args.source_file.is_none() => {
            copy_tree(&source, &target, &args, ctx)
        }
        (SourceKind::Block | SourceKind::File, TargetKind::Block | TargetKind::File) => {
            copy_block(&source, kind, &target, &args, ctx)
        }
        (s, t) => Err(usage(
            "MixedVolumeModes",
            format!(
                "cannot copy a {} source ({}) onto a {} target ({}): copy a directory to a directory, or a block device or image file (--source-file) to a block device or image file",
                s.name(),
                source.display(),
                t.name(),
                target.path.display()
            ),
        )),
    }
}

fn resolve_source(source: Option<&Path>, file: Option<&Path>) -> Result<PathBuf> {
    match (source, file) {
        (None, None) => Err(usage(
            "InvalidArguments",
            "give --source PATH (a directory, block device or image file)".into(),
        )),
        (Some(s), None) => Ok(s.to_path_buf()),
        (None, Some(f)) => Ok(f.to_path_buf()),
        (Some(s), Some(f)) if f.is_absolute() => {
            if !f.starts_with(s) {
                populator_core::log::warn(format!(
                    "--source-file {} is outside --source {}",
                    f.display(),
                    s.display()
                ));
            }
            Ok(f.to_path_buf())
        }
        (Some(s), Some(f)) => Ok(s.join(f)),
    }
}

fn copy_tree(src: &Path, target: &Target, args: &LocalArgs, ctx: &Context) -> Result<String> {
    let dst = &target.path;
    let (others, resuming) = target_contents(dst)?;
    if !others.is_empty() && !resuming && !args.copy.overwrite {
        return Err(usage(
            "TargetNotEmpty",
            format!(
                "target {} is not empty (it holds {}): give --overwrite to copy over it, or use an empty volume",
                dst.display(),
                sample(&others)
            ),
        ));
    }
    if same_filesystem_tree(src, dst) {
        return Err(usage(
            "InvalidArguments",
            format!(
                "source {} and target {} are the same directory",
                src.display(),
                dst.display()
            ),
        ));
    }
    check_tree_fits(src, target)?;
    let state = dst.join(STATE_DIR);
    crate::tree::create_state_dir(&state)?;
    std::fs::write(state.join("source"), src.as_os_str().as_encoded_bytes())
        .with_context(|| format!("writing {}", state.display()))?;
    if resuming {
        populator_core::log::info(format!(
            "resuming an interrupted copy into {}",
            dst.display()
        ));
    }
    let preserve = preserve_for(args.copy.no_chown, args.common.owner);
    let jobs = args.copy.jobs();
    ctx.progress.set_stage("copying");
    ctx.progress.set_total(source_used_bytes(src));
    let copy = TreeCopy::new(
        src,
        dst,
        preserve,
        args.copy.overwrite,
        resuming,
        &ctx.progress,
    );
    // The disk works while the tree is copied; the flush below only has the
    // tail left (see populator_core::writeback).
    let writeback = populator_core::writeback::EarlyWriteback::start(dst)?;
    crate::walk::walk(src, &[LOST_FOUND], jobs, &ctx.cancel, &copy)?;
    copy.finish_dirs(|| {
        std::fs::remove_dir_all(&state).with_context(|| format!("removing {}", state.display()))
    })?;
    ctx.progress.set_stage("flushing");
    writeback.finish()?;
    let s = &copy.stats;
    let files = s.files.load(Ordering::Relaxed);
    ctx.report.set("files", files);
    ctx.report
        .set("directories", s.dirs.load(Ordering::Relaxed));
    ctx.report
        .set("hardlinks", s.hardlinks.load(Ordering::Relaxed));
    ctx.report
        .set("otherEntries", s.others.load(Ordering::Relaxed));
    ctx.report
        .set("reflinkedFiles", s.cloned.load(Ordering::Relaxed));
    ctx.report
        .set("resumedFiles", s.skipped.load(Ordering::Relaxed));
    ctx.report.set("jobs", jobs);
    let digest_note = if args.copy.verify {
        ctx.progress.set_stage("verifying");
        let options = TreeDigestOptions {
            owners: preserve.owner,
        };
        let digest = verify_trees(src, dst, options, jobs, ctx)?;
        format!(", verified, tree digest {digest}")
    } else {
        String::new()
    };
    Ok(format!(
        "copied {} files ({}), {} directories, {} hard links into {}{}",
        files,
        short_bytes(s.bytes.load(Ordering::Relaxed)),
        s.dirs.load(Ordering::Relaxed),
        s.hardlinks.load(Ordering::Relaxed),
        dst.display(),
        digest_note
    ))
}

/// Hashes both trees at once and fails with exit 3 when they differ.
pub fn verify_trees(
    src: &Path,
    dst: &Path,
    options: TreeDigestOptions,
    jobs: usize,
    ctx: &Context,
) -> Result<String> {
    let half = jobs.div_ceil(2);
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| tree_digest(src, &[LOST_FOUND], options, half, &ctx.cancel));
        let b = tree_digest(dst, &[LOST_FOUND, STATE_DIR], options, half, &ctx.cancel);
        (a.join().expect("the digest does not panic"), b)
    });
    let (a, b) = (
        a.context("hashing the source")?,
        b.context("hashing the target")?,
    );
    ctx.report.set_digests(&populator_core::digest::Digests(
        [("tree".to_string(), b.hex())].into_iter().collect(),
    ));
    ctx.report.set("sourceDigest", a.hex());
    if a.digest != b.digest {
        let what = a
            .first_difference(&b)
            .unwrap_or_else(|| "the digests differ".into());
        return Err(fail(
            Kind::Integrity,
            "VerificationFailed",
            format!("the copy differs from the source: {what} (did the source change during the copy? copy from a snapshot or a stopped workload)"),
        ));
    }
    Ok(b.hex())
}

fn sample(names: &[String]) -> String {
    let mut s = names
        .iter()
        .take(3)
        .map(|n| format!("'{n}'"))
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > 3 {
        s.push_str(&format!(" and {} more", names.len() - 3));
    }
    s
}

fn same_filesystem_tree(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

fn statvfs(path: &Path) -> Option<libc::statvfs> {
    let c = crate::meta::cpath(path).ok()?;
    // SAFETY: a valid C string and out-pointer.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statvfs(c.as_ptr(), &mut st) } == 0).then_some(st)
}

/// Bytes in use on the source's filesystem when the source is its mount
/// root (a volume); unknown otherwise.
fn source_used_bytes(src: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let here = std::fs::metadata(src).ok()?;
    let parent = std::fs::metadata(src.join("..")).ok()?;
    if here.dev() == parent.dev() && here.ino() != parent.ino() {
        return None;
    }
    let st = statvfs(src)?;
    Some((st.f_blocks - st.f_bfree) * st.f_frsize)
}

/// Fails early (exit 4) when the source volume's used space or inodes
/// cannot fit the target's free ones.
fn check_tree_fits(src: &Path, target: &Target) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Some(used) = source_used_bytes(src) else {
        return Ok(());
    };
    // Source and target on one filesystem (bind mounts of one disk): its
    // used space says nothing about what the copy needs.
    if let (Ok(a), Ok(b)) = (std::fs::metadata(src), std::fs::metadata(&target.path)) {
        if a.dev() == b.dev() {
            return Ok(());
        }
    }
    target.check_fits(
        used,
        &format!("the data on source volume {}", src.display()),
    )?;
    if let (Some(s), Some(t)) = (statvfs(src), statvfs(&target.path)) {
        let inodes = s.f_files.saturating_sub(s.f_ffree);
        if s.f_files > 0 && inodes > t.f_favail {
            return Err(fail(
                Kind::Capacity,
                "InsufficientCapacity",
                format!(
                    "source volume {} holds {inodes} inodes but target {} has only {} free",
                    src.display(),
                    target.path.display(),
                    t.f_favail
                ),
            ));
        }
    }
    Ok(())
}

fn copy_block(
    src_path: &Path,
    kind: SourceKind,
    target: &Target,
    args: &LocalArgs,
    ctx: &Context,
) -> Result<String> {
    let copy = &args.copy;
    let size = device_size(src_path, kind)?;
    target.check_fits(size, &format!("source {}", src_path.display()))?;
    let src =
        File::open(src_path).with_context(|| format!("opening source {}", src_path.display()))?;
    let session = block_session(src_path, size);
    let (dst, zeroing, first) = open_block_target(target, size, &session)?;
    if first > 0 {
        populator_core::log::info(format!(
            "resuming an interrupted copy onto {}: {} are there already",
            target.path.display(),
            short_bytes(first * crate::digest::CHUNK)
        ));
    }
    ctx.report
        .set("resumedBytes", (first * crate::digest::CHUNK).min(size));
    ctx.progress.set_stage("copying");
    ctx.progress.set_total(Some(size));
    let outcome = copy_device(
        &src,
        kind == SourceKind::File,
        size,
        &dst,
        zeroing,
        Resume {
            session,
            first,
            commit_every: args.commit.every(),
        },
        ctx,
    )?;
    let digest = hex::encode(outcome.digest);
    ctx.report.set_digests(&populator_core::digest::Digests(
        [("device".to_string(), digest.clone())]
            .into_iter()
            .collect(),
    ));
    ctx.report.set("sourceBytes", size);
    ctx.report.set("zeroBytes", outcome.zero_bytes);
    ctx.report.set("dataBytes", outcome.data_bytes);
    if copy.verify {
        ctx.progress.set_stage("verifying");
        verify_device(src_path, kind, &dst, size, &digest, ctx)?;
    }
    Ok(format!(
        "copied {} ({} of zeros not written) from {} onto {}, device digest {digest}{}",
        short_bytes(size),
        short_bytes(outcome.zero_bytes),
        src_path.display(),
        target.path.display(),
        if copy.verify { ", verified" } else { "" }
    ))
}

/// Names a block copy, so a rerun resumes only the same one.
fn block_session(src: &Path, size: u64) -> crate::digest::Hash {
    let mut all = src.as_os_str().as_encoded_bytes().to_vec();
    all.extend_from_slice(&size.to_le_bytes());
    crate::digest::sha256(&all)
}

/// The target opened for writing, how zero chunks are made there, and the
/// chunks an interrupted copy of the same source already completed.
pub fn open_block_target(
    target: &Target,
    size: u64,
    session: &crate::digest::Hash,
) -> Result<(File, Zeroing, u64)> {
    let path = &target.path;
    let f = OpenOptions::new()
        .write(true)
        .read(true)
        .create(target.kind != TargetKind::Block)
        .truncate(false)
        .open(path)
        .with_context(|| format!("opening target {}", path.display()))?;
    let first = load_local_journal(&f, size, session).unwrap_or(0);
    match target.kind {
        TargetKind::Block => Ok((f, Zeroing::Explicit, first)),
        // An image file of an interrupted copy: its zero chunks are holes still.
        _ if first > 0 && f.metadata()?.len() >= size => Ok((f, Zeroing::Skip, first)),
        _ => {
            // A fresh sparse file of the source's length: zero chunks stay
            // holes, a zero tail included.
            f.set_len(0)
                .and_then(|()| f.set_len(size))
                .with_context(|| format!("emptying target {}", path.display()))?;
            Ok((f, Zeroing::Skip, 0))
        }
    }
}

/// Re-reads source and target (the target from the device, not the cache)
/// and compares both with the digest of what was copied.
pub fn verify_device(
    src_path: &Path,
    kind: SourceKind,
    dst: &File,
    size: u64,
    copied: &str,
    ctx: &Context,
) -> Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: an advisory call on a valid descriptor.
    unsafe { libc::posix_fadvise(dst.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    let src = File::open(src_path)?;
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| content_digest(&src, size, kind == SourceKind::File, 2, &ctx.cancel));
        let b = content_digest(dst, size, false, 2, &ctx.cancel);
        (a.join().expect("the digest does not panic"), b)
    });
    let (a, b) = (
        hex::encode(a.context("re-reading the source")?),
        hex::encode(b.context("re-reading the target")?),
    );
    ctx.report.set("sourceDigest", a.clone());
    if b != copied {
        return Err(fail(Kind::Integrity, "VerificationFailed", format!("the target reads back differently from what was written (digest {b}, expected {copied}): the device may be faulty")));
    }
    if a != copied {
        return Err(fail(Kind::Integrity, "VerificationFailed", format!("the source changed during the copy (digest now {a}, copied {copied}): copy from a snapshot or a detached volume")));
    }
    Ok(())
}
