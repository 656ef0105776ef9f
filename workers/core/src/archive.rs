//! Safe tar extraction into a directory. The archive is treated as hostile:
//! entries may not climb out with `..`, be absolute, pass through a symlink
//! (also one the archive itself just made), or hardlink to anything outside
//! the tree being extracted. Device nodes and fifos are made only as root and
//! when asked; setuid/setgid bits only when asked; the bytes and entries an
//! archive may produce are bounded by the target's capacity.
//!
//! The `tar` crate parses (headers, GNU long names, PAX, GNU sparse); the
//! files are created here, because its own unpacking follows symlinks in
//! ways this contract does not allow.

use std::collections::HashSet;
use std::ffi::{CString, OsStr};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, OnceLock};

use anyhow::{Context as _, Result};

use crate::cancel::CancelToken;
use crate::error::{fail, Kind};
use crate::progress::Progress;
use crate::writer::{VolumeWriter, ZeroMode};

#[derive(Clone, Debug, Default)]
pub struct ExtractOptions {
    /// Set numeric owners from the archive (only meaningful as root).
    pub preserve_owner: bool,
    /// Create device nodes and fifos (needs root); otherwise they are skipped.
    pub preserve_devices: bool,
    /// Keep setuid/setgid bits; otherwise they are dropped.
    pub preserve_setuid: bool,
    /// Bytes of file data the archive may produce.
    pub capacity: Option<u64>,
    /// Entries the archive may produce (free inodes).
    pub max_entries: Option<u64>,
    /// `--owner UID:GID`: every entry gets this owner, whatever the archive says.
    pub owner: Option<(u32, u32)>,
}

impl ExtractOptions {
    /// The owner an entry gets: `--owner`, else the archive's own when
    /// preserving as root, else the extracting user (no change).
    fn owner_for(&self, uid: u64, gid: u64) -> Option<(u32, u32)> {
        self.owner
            .or_else(|| (self.preserve_owner && is_root()).then_some((uid as u32, gid as u32)))
    }
}

#[derive(Clone, Debug, Default)]
pub struct ExtractSummary {
    pub entries: u64,
    pub files: u64,
    pub bytes: u64,
    pub skipped: u64,
    /// Directory metadata, applied after everything is in place.
    pub directories: Vec<DirMeta>,
}

#[derive(Clone, Debug)]
pub struct DirMeta {
    pub path: PathBuf,
    meta: EntryMeta,
}

#[derive(Clone, Debug)]
struct EntryMeta {
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: (i64, i64),
}

fn hostile(message: String) -> anyhow::Error {
    fail(Kind::Integrity, "UnsafeArchive", message)
}

pub fn is_root() -> bool {
    // Asked per entry: remember the answer (a worker never changes its uid).
    static ROOT: OnceLock<bool> = OnceLock::new();
    // SAFETY: geteuid has no preconditions.
    *ROOT.get_or_init(|| unsafe { libc::geteuid() == 0 })
}

/// Extracts a tar stream into `root` (which must exist).
pub fn extract(
    reader: &mut dyn Read,
    root: &Path,
    options: &ExtractOptions,
    progress: &Arc<Progress>,
    cancel: &CancelToken,
) -> Result<ExtractSummary> {
    let mut archive = tar::Archive::new(reader);
    let mut summary = ExtractSummary::default();
    let mut extractor = Extractor {
        root,
        options,
        progress,
        summary: &mut summary,
        warned_devices: false,
        known_dirs: HashSet::new(),
        copy_buffer: Vec::new(),
    };
    for entry in archive.entries().map_err(corrupt)? {
        cancel.check()?;
        let mut entry = entry.map_err(corrupt)?;
        extractor.entry(&mut entry)?;
    }
    Ok(summary)
}

fn corrupt(e: io::Error) -> anyhow::Error {
    // Errors from below the tar parser (decompression, the source) keep their kind.
    if e.get_ref()
        .is_some_and(|inner| inner.is::<crate::error::WorkerError>())
    {
        return anyhow::Error::new(e);
    }
    fail(
        Kind::Integrity,
        "CorruptData",
        format!("the tar archive is corrupt or truncated: {e}"),
    )
}

struct Extractor<'a> {
    root: &'a Path,
    options: &'a ExtractOptions,
    progress: &'a Arc<Progress>,
    summary: &'a mut ExtractSummary,
    warned_devices: bool,
    /// Directories below the root already checked or made by this run. Safe
    /// to trust: extraction never removes or replaces a directory, so a
    /// directory checked once stays one (this saves an lstat per parent per
    /// entry on trees of many small files).
    known_dirs: HashSet<PathBuf>,
    /// One copy buffer for every file, not a fresh zeroed megabyte each.
    copy_buffer: Vec<u8>,
}

impl Extractor<'_> {
    fn entry(&mut self, entry: &mut tar::Entry<'_, &mut dyn Read>) -> Result<()> {
        use tar::EntryType as T;
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink
        ) {
            return Ok(());
        }
        let sparse = pax_sparse_v1(entry)?;
        let raw = match &sparse {
            Some(s) => s.name.clone(),
            None => entry.path().map_err(corrupt)?.into_owned(),
        };
        let rel = safe_relative(&raw)?;
        if rel.as_os_str().is_empty() {
            return Ok(()); // "./" itself: the target root keeps its own metadata
        }
        self.summary.entries += 1;
        if let Some(max) = self.options.max_entries {
            if self.summary.entries > max {
                return Err(fail(
                    Kind::Capacity,
                    "InsufficientCapacity",
                    format!("the archive has more entries than the target has free inodes ({max})"),
                ));
            }
        }
        let dst = self.root.join(&rel);
        self.make_parents(&rel)?;
        let meta = entry_meta(entry)?;
        match kind {
            T::Directory => {
                match fs::symlink_metadata(&dst) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        fs::remove_file(&dst)?;
                        fs::create_dir(&dst)?;
                    }
                    Err(_) => fs::create_dir(&dst)
                        .with_context(|| format!("creating directory {}", dst.display()))?,
                }
                // Xattrs now; modes, owners and times once the tree is complete.
                apply_xattrs(entry, &dst);
                self.known_dirs.insert(rel.clone());
                self.summary.directories.push(DirMeta { path: rel, meta });
                return Ok(());
            }
            T::Regular | T::Continuous | T::GNUSparse => {
                self.write_file(entry, &dst, &rel, sparse.as_ref())?;
                self.summary.files += 1;
                self.progress.add_file_done();
            }
            T::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(corrupt)?
                    .ok_or_else(|| hostile(format!("symlink {} has no target", raw.display())))?;
                self.clear(&dst, &rel)?;
                std::os::unix::fs::symlink(&*target, &dst)
                    .with_context(|| format!("creating symlink {}", dst.display()))?;
            }
            T::Link => {
                let link = entry
                    .link_name()
                    .map_err(corrupt)?
                    .ok_or_else(|| hostile(format!("hardlink {} has no target", raw.display())))?;
                let link_rel = safe_relative(&link).map_err(|_| {
                    hostile(format!(
                        "hardlink {} points outside the target: {}",
                        raw.display(),
                        link.display()
                    ))
                })?;
                self.check_no_symlink_parents(&link_rel, &raw)?;
                let src = self.root.join(&link_rel);
                match fs::symlink_metadata(&src) {
                    Ok(m) if !m.is_dir() => {}
                    _ => {
                        return Err(hostile(format!(
                            "hardlink {} points to {}, which is not a file earlier in the archive",
                            raw.display(),
                            link.display()
                        )))
                    }
                }
                self.clear(&dst, &rel)?;
                fs::hard_link(&src, &dst)
                    .with_context(|| format!("creating hardlink {}", dst.display()))?;
                return Ok(()); // a hardlink shares its inode's metadata
            }
            T::Char | T::Block | T::Fifo => {
                if !(self.options.preserve_devices && is_root()) {
                    self.summary.skipped += 1;
                    if !self.warned_devices {
                        self.warned_devices = true;
                        crate::log::warn(format!(
                            "skipping device nodes and fifos such as {} (they are made only as root with --preserve-devices)",
                            raw.display()
                        ));
                    }
                    return Ok(());
                }
                self.clear(&dst, &rel)?;
                let file_type = match kind {
                    T::Char => libc::S_IFCHR,
                    T::Block => libc::S_IFBLK,
                    _ => libc::S_IFIFO,
                };
                let major = entry.header().device_major().ok().flatten().unwrap_or(0);
                let minor = entry.header().device_minor().ok().flatten().unwrap_or(0);
                let c = cstr(&dst)?;
                // SAFETY: valid C string; mknod has no memory preconditions.
                if unsafe {
                    libc::mknod(c.as_ptr(), file_type | 0o600, libc::makedev(major, minor))
                } != 0
                {
                    return Err(io::Error::last_os_error())
                        .with_context(|| format!("creating {}", dst.display()));
                }
            }
            other => {
                self.summary.skipped += 1;
                crate::log::warn(format!(
                    "skipping {} of unsupported tar type {other:?}",
                    raw.display()
                ));
                return Ok(());
            }
        }
        apply_xattrs(entry, &dst);
        self.apply_meta(&dst, &meta, kind == tar::EntryType::Symlink)
    }

    /// Creates missing parent directories; an existing parent must be a real
    /// directory, never a symlink.
    fn make_parents(&mut self, rel: &Path) -> Result<()> {
        if rel.parent().is_none_or(|p| self.known_dirs.contains(p)) {
            return Ok(());
        }
        let mut at = self.root.to_path_buf();
        let mut at_rel = PathBuf::new();
        let parts: Vec<_> = rel.components().collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            at.push(part);
            at_rel.push(part);
            if self.known_dirs.contains(&at_rel) {
                continue;
            }
            match fs::symlink_metadata(&at) {
                Ok(m) if m.is_dir() => {}
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(hostile(format!(
                        "entry {} would be written through the symlink {}",
                        rel.display(),
                        at.strip_prefix(self.root).unwrap_or(&at).display()
                    )))
                }
                Ok(_) => {
                    return Err(hostile(format!(
                        "entry {} needs {} to be a directory, but the archive made it a file",
                        rel.display(),
                        at.strip_prefix(self.root).unwrap_or(&at).display()
                    )))
                }
                Err(_) => fs::create_dir(&at)
                    .with_context(|| format!("creating directory {}", at.display()))?,
            }
            self.known_dirs.insert(at_rel.clone());
        }
        Ok(())
    }

    fn check_no_symlink_parents(&self, rel: &Path, entry: &Path) -> Result<()> {
        let mut at = self.root.to_path_buf();
        let parts: Vec<_> = rel.components().collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            at.push(part);
            if !fs::symlink_metadata(&at).is_ok_and(|m| m.is_dir()) {
                return Err(hostile(format!(
                    "hardlink {} points through a symlink or a missing directory",
                    entry.display()
                )));
            }
        }
        Ok(())
    }

    /// Removes what stands at `dst` (a later entry replaces an earlier one, as
    /// tar does); unlinking a symlink never touches what it points to.
    fn clear(&self, dst: &Path, rel: &Path) -> Result<()> {
        match fs::symlink_metadata(dst) {
            Ok(m) if m.is_dir() => Err(hostile(format!(
                "entry {} would replace a directory",
                rel.display()
            ))),
            Ok(_) => Ok(fs::remove_file(dst)?),
            Err(_) => Ok(()),
        }
    }

    /// Creates `dst` exclusively (never through a symlink); only when
    /// something already stands there is it looked at and cleared, so the
    /// common case costs one open and no lstat.
    fn create_file(&self, dst: &Path, rel: &Path) -> Result<File> {
        let open = || {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(dst)
        };
        let file = match open() {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                self.clear(dst, rel)?;
                open()
            }
            other => other,
        };
        file.with_context(|| format!("creating {}", dst.display()))
    }

    fn write_file(
        &mut self,
        entry: &mut tar::Entry<'_, &mut dyn Read>,
        dst: &Path,
        rel: &Path,
        sparse: Option<&SparseV1>,
    ) -> Result<()> {
        let file = self.create_file(dst, rel)?;
        let remaining = self
            .options
            .capacity
            .map(|c| c.saturating_sub(self.summary.bytes));
        let mut writer = VolumeWriter::new(
            file,
            ZeroMode::Holes,
            remaining,
            format!("the rest of target {}", self.root.display()),
        )
        .with_progress(self.progress.clone());
        if self.copy_buffer.is_empty() {
            self.copy_buffer = vec![0u8; crate::pipeline::COPY_BUFFER];
        }
        let copied = match sparse {
            None => crate::pipeline::copy_with_buffer(entry, &mut writer, &mut self.copy_buffer),
            Some(s) => copy_sparse_v1(entry, &mut writer, s.real_size),
        }
        .map_err(|e| {
            if e.get_ref().is_some() {
                anyhow::Error::new(e)
            } else {
                corrupt(e)
            }
        })?;
        writer
            .finish(false)
            .with_context(|| format!("writing {}", dst.display()))?;
        self.summary.bytes += copied;
        Ok(())
    }

    fn apply_meta(&self, dst: &Path, meta: &EntryMeta, is_symlink: bool) -> Result<()> {
        set_meta(dst, meta, self.options, is_symlink)
    }
}

/// A file stored in the PAX sparse format 1.0 (GNU tar `--format=posix -S`):
/// its real name and size are in PAX keys, and its data starts with a map of
/// the regions that hold data.
struct SparseV1 {
    name: PathBuf,
    real_size: u64,
}

fn pax_sparse_v1(entry: &mut tar::Entry<'_, &mut dyn Read>) -> Result<Option<SparseV1>> {
    let Ok(Some(pax)) = entry.pax_extensions() else {
        return Ok(None);
    };
    let (mut major, mut name, mut size) = (None, None, None);
    for ext in pax.flatten() {
        match ext.key() {
            Ok("GNU.sparse.major") => major = ext.value().ok().map(str::to_string),
            Ok("GNU.sparse.name") => {
                name = Some(PathBuf::from(std::ffi::OsStr::from_bytes(
                    ext.value_bytes(),
                )))
            }
            Ok("GNU.sparse.realsize") => {
                size = ext.value().ok().and_then(|v| v.parse::<u64>().ok())
            }
            _ => {}
        }
    }
    match (major.as_deref(), name, size) {
        (Some("1"), Some(name), Some(real_size)) => Ok(Some(SparseV1 { name, real_size })),
        (Some(v), _, _) => Err(fail(
            Kind::Integrity,
            "CorruptData",
            format!("unsupported or incomplete PAX sparse entry (format {v})"),
        )),
        _ => Ok(None),
    }
}

/// Copies a PAX 1.0 sparse file: a decimal map (count, then offset/size
/// pairs, one number per line, padded to 512 bytes), then the data regions.
fn copy_sparse_v1(
    reader: &mut dyn Read,
    writer: &mut VolumeWriter,
    real_size: u64,
) -> io::Result<u64> {
    let mut consumed = 0u64;
    let number = |reader: &mut dyn Read, consumed: &mut u64| -> io::Result<u64> {
        let mut digits = String::new();
        let mut byte = [0u8; 1];
        loop {
            reader.read_exact(&mut byte)?;
            *consumed += 1;
            match byte[0] {
                b'\n' => break,
                b @ b'0'..=b'9' if digits.len() < 20 => digits.push(b as char),
                _ => return Err(io::Error::new(io::ErrorKind::InvalidData, "bad sparse map")),
            }
        }
        digits
            .parse()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad sparse map"))
    };
    let count = number(reader, &mut consumed)?;
    let mut regions = Vec::new();
    for _ in 0..count.min(1 << 20) {
        regions.push((
            number(reader, &mut consumed)?,
            number(reader, &mut consumed)?,
        ));
    }
    let padding = (512 - consumed % 512) % 512;
    io::copy(&mut reader.take(padding), &mut io::sink())?;
    let mut data = 0;
    for (offset, size) in regions {
        if offset.checked_add(size).is_none_or(|end| end > real_size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "sparse region past the file's end",
            ));
        }
        writer.skip_to(offset)?;
        let n = crate::pipeline::copy(&mut reader.take(size), writer)?;
        if n != size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "sparse data ends early",
            ));
        }
        data += n;
    }
    writer.skip_to(real_size)?;
    Ok(data)
}

/// Owner (lchown, never following a symlink), mode (setuid/setgid dropped
/// unless asked) and mtime of one extracted entry.
fn set_meta(
    dst: &Path,
    meta: &EntryMeta,
    options: &ExtractOptions,
    is_symlink: bool,
) -> Result<()> {
    let c = cstr(dst)?;
    if let Some((uid, gid)) = options.owner_for(meta.uid, meta.gid) {
        // SAFETY: valid C string.
        if unsafe { libc::lchown(c.as_ptr(), uid, gid) } != 0 {
            crate::log::warn(format!(
                "cannot set the owner of {}: {}",
                dst.display(),
                io::Error::last_os_error()
            ));
        }
    }
    if !is_symlink {
        let mut mode = meta.mode & 0o7777;
        if !options.preserve_setuid {
            mode &= !0o6000;
        }
        // SAFETY: valid C string; the path is not a symlink.
        if unsafe { libc::chmod(c.as_ptr(), mode) } != 0 {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("setting the mode of {}", dst.display()));
        }
    }
    set_mtime(&c, meta.mtime);
    Ok(())
}

/// The archive path as a clean relative path, or a hostile-archive error.
pub fn safe_relative(path: &Path) -> Result<PathBuf> {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(hostile(format!(
                    "entry {} climbs out of the target with '..'",
                    path.display()
                )))
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(hostile(format!(
                    "entry {} has an absolute path",
                    path.display()
                )))
            }
        }
    }
    Ok(out)
}

fn entry_meta(entry: &mut tar::Entry<'_, &mut dyn Read>) -> Result<EntryMeta> {
    let header = entry.header();
    let mut mtime = (header.mtime().unwrap_or(0) as i64, 0);
    if let Ok(Some(pax)) = entry.pax_extensions() {
        for ext in pax.flatten() {
            if ext.key() == Ok("mtime") {
                if let Some(t) = ext.value().ok().and_then(parse_pax_time) {
                    mtime = t;
                }
            }
        }
    }
    let header = entry.header();
    Ok(EntryMeta {
        mode: header.mode().unwrap_or(0o644),
        uid: header.uid().unwrap_or(0),
        gid: header.gid().unwrap_or(0),
        mtime,
    })
}

/// PAX times are decimal seconds with an optional fraction: `1700000000.5`.
fn parse_pax_time(value: &str) -> Option<(i64, i64)> {
    let (secs, frac) = value.split_once('.').unwrap_or((value, ""));
    let secs: i64 = secs.parse().ok()?;
    let digits: String = frac.chars().take(9).collect();
    let nanos = if digits.is_empty() {
        0
    } else {
        format!("{digits:0<9}").parse().ok()?
    };
    Some((secs, if secs < 0 && nanos > 0 { -nanos } else { nanos }))
}

fn apply_xattrs(entry: &mut tar::Entry<'_, &mut dyn Read>, dst: &Path) {
    let Ok(Some(pax)) = entry.pax_extensions() else {
        return;
    };
    for ext in pax.flatten() {
        let Ok(key) = ext.key() else { continue };
        let Some(name) = key.strip_prefix("SCHILY.xattr.") else {
            continue;
        };
        let (Ok(c_path), Ok(c_name)) = (cstr(dst), CString::new(name)) else {
            continue;
        };
        let value = ext.value_bytes();
        // SAFETY: valid C strings and a valid buffer of the given length.
        let rc = unsafe {
            libc::lsetxattr(
                c_path.as_ptr(),
                c_name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        if rc != 0 {
            crate::log::warn(format!(
                "cannot set xattr {name} on {}: {}",
                dst.display(),
                io::Error::last_os_error()
            ));
        }
    }
}

fn set_mtime(path: &CString, (secs, nanos): (i64, i64)) {
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: secs as libc::time_t,
            tv_nsec: nanos as _,
        },
    ];
    // SAFETY: valid C string and a two-element timespec array.
    unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            path.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
}

fn cstr(path: &Path) -> Result<CString> {
    Ok(CString::new(path.as_os_str().as_bytes())?)
}

/// Sets directory modes, owners and times, deepest first, once all entries
/// are in place under `root` (creating files inside would change the times).
pub fn apply_dir_metadata(root: &Path, dirs: &[DirMeta], options: &ExtractOptions) -> Result<()> {
    let mut ordered: Vec<&DirMeta> = dirs.iter().collect();
    ordered.sort_by_key(|d| std::cmp::Reverse(d.path.components().count()));
    for d in ordered {
        set_meta(&root.join(&d.path), &d.meta, options, false)?;
    }
    Ok(())
}

/// Moves every top-level entry of `staging` into `root`, replacing what is
/// there, so a killed run never leaves a half-extracted tree in place.
pub fn move_into_place(staging: &Path, root: &Path) -> Result<()> {
    for item in fs::read_dir(staging)? {
        let item = item?;
        let name: &OsStr = &item.file_name();
        let dst = root.join(name);
        if let Ok(m) = fs::symlink_metadata(&dst) {
            if m.is_dir() {
                fs::remove_dir_all(&dst)?;
            } else {
                fs::remove_file(&dst)?;
            }
        }
        fs::rename(item.path(), &dst)
            .with_context(|| format!("moving {} into place", dst.display()))?;
    }
    fs::remove_dir(staging).with_context(|| format!("removing {}", staging.display()))?;
    File::open(root)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        assert_eq!(
            safe_relative(Path::new("./a/./b")).unwrap(),
            PathBuf::from("a/b")
        );
        assert!(safe_relative(Path::new("a/../../b")).is_err());
        assert!(safe_relative(Path::new("/etc/passwd")).is_err());
    }

    #[test]
    fn pax_times() {
        assert_eq!(
            parse_pax_time("1700000000.25"),
            Some((1700000000, 250_000_000))
        );
        assert_eq!(parse_pax_time("12"), Some((12, 0)));
        assert_eq!(parse_pax_time("x"), None);
    }
}
