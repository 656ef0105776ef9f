//! One filesystem entry and its metadata (type, owner, mode, times, xattrs
//! including POSIX ACLs and security.*), read from a source and applied to a
//! target with the few syscalls it needs. Shared by the local copy, the
//! network receiver and the tree digest.

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FileKind {
    Dir,
    File,
    Symlink,
    Fifo,
    Char,
    Block,
    Socket,
}

impl FileKind {
    pub fn code(self) -> u8 {
        match self {
            FileKind::Dir => b'd',
            FileKind::File => b'f',
            FileKind::Symlink => b'l',
            FileKind::Fifo => b'p',
            FileKind::Char => b'c',
            FileKind::Block => b'b',
            FileKind::Socket => b's',
        }
    }

    pub fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            b'd' => FileKind::Dir,
            b'f' => FileKind::File,
            b'l' => FileKind::Symlink,
            b'p' => FileKind::Fifo,
            b'c' => FileKind::Char,
            b'b' => FileKind::Block,
            b's' => FileKind::Socket,
            _ => return None,
        })
    }

    fn of(ft: std::fs::FileType) -> FileKind {
        if ft.is_dir() {
            FileKind::Dir
        } else if ft.is_symlink() {
            FileKind::Symlink
        } else if ft.is_fifo() {
            FileKind::Fifo
        } else if ft.is_char_device() {
            FileKind::Char
        } else if ft.is_block_device() {
            FileKind::Block
        } else if ft.is_socket() {
            FileKind::Socket
        } else {
            FileKind::File
        }
    }

    fn mknod_type(self) -> libc::mode_t {
        match self {
            FileKind::Fifo => libc::S_IFIFO,
            FileKind::Char => libc::S_IFCHR,
            FileKind::Block => libc::S_IFBLK,
            FileKind::Socket => libc::S_IFSOCK,
            _ => 0,
        }
    }
}

/// Everything the copy keeps about one entry, with its path relative to the
/// tree's root (empty for the root itself).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub rel: PathBuf,
    pub kind: FileKind,
    /// Permission bits including setuid, setgid and sticky.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub atime: (i64, i64),
    pub mtime: (i64, i64),
    pub rdev: u64,
    /// Symlink target.
    pub link: Vec<u8>,
    /// (name, value), sorted by name.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    pub nlink: u64,
    pub dev: u64,
    pub ino: u64,
    /// Bytes allocated (st_blocks × 512).
    pub allocated: u64,
}

impl Entry {
    pub fn from_metadata(rel: PathBuf, m: &std::fs::Metadata) -> Entry {
        Entry {
            rel,
            kind: FileKind::of(m.file_type()),
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            size: if m.is_file() { m.len() } else { 0 },
            atime: (m.atime(), m.atime_nsec()),
            mtime: (m.mtime(), m.mtime_nsec()),
            rdev: m.rdev(),
            link: Vec::new(),
            xattrs: Vec::new(),
            nlink: m.nlink(),
            dev: m.dev(),
            ino: m.ino(),
            allocated: m.blocks() * 512,
        }
    }

    /// lstat, the symlink target and the xattrs of `root/rel`.
    pub fn read(root: &Path, rel: &Path) -> io::Result<Entry> {
        let path = join(root, rel);
        let m = std::fs::symlink_metadata(&path)?;
        let mut e = Entry::from_metadata(rel.to_path_buf(), &m);
        if e.kind == FileKind::Symlink {
            e.link = std::fs::read_link(&path)?.into_os_string().into_vec();
        }
        e.xattrs = read_xattrs(XattrTarget::Path(&cpath(&path)?))?;
        Ok(e)
    }

    /// Reads an open regular file's metadata and xattrs (fstat, flistxattr).
    pub fn read_open(rel: PathBuf, file: &File) -> io::Result<Entry> {
        let m = file.metadata()?;
        let mut e = Entry::from_metadata(rel, &m);
        e.xattrs = read_xattrs(XattrTarget::Fd(file.as_raw_fd()))?;
        Ok(e)
    }

    pub fn is_hardlinked(&self) -> bool {
        self.kind != FileKind::Dir && self.nlink > 1
    }
}

/// `root/rel`, with an empty `rel` meaning the root.
pub fn join(root: &Path, rel: &Path) -> PathBuf {
    if rel.as_os_str().is_empty() {
        root.to_path_buf()
    } else {
        root.join(rel)
    }
}

pub fn cpath(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum XattrTarget<'a> {
    Path(&'a CString),
    Fd(libc::c_int),
}

/// All xattrs, sorted by name. The common case (none) costs one syscall: the
/// list is read into a stack buffer first and sized only when it overflows.
fn read_xattrs(target: XattrTarget<'_>) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let list = |buf: &mut [u8]| -> isize {
        // SAFETY: the buffer pointer and length describe valid memory.
        unsafe {
            match target {
                XattrTarget::Path(p) => {
                    libc::llistxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
                }
                XattrTarget::Fd(fd) => libc::flistxattr(fd, buf.as_mut_ptr().cast(), buf.len()),
            }
        }
    };
    let mut small = [0u8; 1024];
    let mut big;
    let names: &[u8] = loop {
        let n = list(&mut small);
        if n >= 0 {
            break &small[..n as usize];
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::ENOTSUP) => return Ok(Vec::new()),
            Some(libc::ERANGE) => {}
            _ => return Err(err),
        }
        let size = list(&mut []);
        if size < 0 {
            return Err(io::Error::last_os_error());
        }
        big = vec![0u8; size as usize + 256];
        let n = list(&mut big);
        if n >= 0 {
            break &big[..n as usize];
        }
    };
    let mut out = Vec::new();
    // XFS shows its POSIX ACLs a second time as trusted.SGI_ACL_*: the
    // system.posix_acl_* names carry them portably.
    let internal = |n: &[u8]| n.starts_with(b"trusted.SGI_ACL_");
    for name in names
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty() && !internal(n))
    {
        let cname = CString::new(name).expect("xattr names have no NUL");
        if let Some(value) = get_xattr(target, &cname)? {
            out.push((name.to_vec(), value));
        }
    }
    out.sort();
    Ok(out)
}

fn get_xattr(target: XattrTarget<'_>, name: &CString) -> io::Result<Option<Vec<u8>>> {
    let get = |buf: &mut [u8]| -> isize {
        // SAFETY: valid C strings and a valid buffer.
        unsafe {
            match target {
                XattrTarget::Path(p) => libc::lgetxattr(
                    p.as_ptr(),
                    name.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                ),
                XattrTarget::Fd(fd) => {
                    libc::fgetxattr(fd, name.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
                }
            }
        }
    };
    let mut buf = vec![0u8; 4096];
    loop {
        let n = get(&mut buf);
        if n >= 0 {
            buf.truncate(n as usize);
            return Ok(Some(buf));
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            // Removed meanwhile, or not readable by us (trusted.* as non-root).
            Some(libc::ENODATA) | Some(libc::EPERM) | Some(libc::EACCES) => return Ok(None),
            Some(libc::ERANGE) => {
                let size = get(&mut []);
                if size < 0 {
                    return Err(io::Error::last_os_error());
                }
                buf = vec![0u8; size as usize];
            }
            _ => return Err(err),
        }
    }
}

/// What may be changed on the target.
#[derive(Clone, Copy, Debug)]
pub struct Preserve {
    /// chown to the source's numeric ids (root, without --no-chown).
    pub owner: bool,
    /// An explicit owner for everything (--owner), instead of the source's.
    pub fixed_owner: Option<(u32, u32)>,
    /// Running as root: device nodes, setuid bits, trusted.* xattrs.
    pub root: bool,
}

/// Creates a non-regular, non-directory entry (symlink, fifo, device node,
/// socket) at `path`.
pub fn create_special(path: &Path, e: &Entry) -> io::Result<()> {
    let c = cpath(path)?;
    match e.kind {
        FileKind::Symlink => {
            std::os::unix::fs::symlink(OsStr::from_bytes(&e.link), path)?;
        }
        FileKind::Fifo | FileKind::Char | FileKind::Block | FileKind::Socket => {
            // SAFETY: a valid C string.
            check(unsafe {
                libc::mknod(
                    c.as_ptr(),
                    e.kind.mknod_type() | (e.mode & 0o777) as libc::mode_t,
                    e.rdev as libc::dev_t,
                )
            })?;
        }
        FileKind::Dir | FileKind::File => unreachable!("created elsewhere"),
    }
    Ok(())
}

/// Owner, xattrs, mode and times of an open file or directory, in the
/// order that keeps each: chown first (it clears setuid and
/// security.capability), then xattrs, then the mode, then the times.
pub fn apply_to_fd(
    file: &File,
    e: &Entry,
    p: Preserve,
    created_mode: Option<u32>,
) -> io::Result<()> {
    let fd = file.as_raw_fd();
    let owner = p.fixed_owner.or((p.owner).then_some((e.uid, e.gid)));
    let mut chowned = false;
    if let Some((uid, gid)) = owner {
        // SAFETY: a valid descriptor.
        check(unsafe { libc::fchown(fd, uid, gid) })?;
        chowned = true;
    }
    for (name, value) in &e.xattrs {
        set_xattr(XattrTarget::Fd(fd), name, value, p)?;
    }
    let mode = if p.root || p.owner {
        e.mode
    } else {
        e.mode & 0o1777
    };
    // A file created with its final mode keeps it unless chown cleared bits.
    if created_mode != Some(mode) || (chowned && mode & 0o6000 != 0) || !e.xattrs.is_empty() {
        // SAFETY: a valid descriptor.
        check(unsafe { libc::fchmod(fd, mode as libc::mode_t) })?;
    }
    let times = timespecs(e);
    // SAFETY: a valid descriptor and two timespecs.
    check(unsafe { libc::futimens(fd, times.as_ptr()) })
}

/// The same for an entry that cannot be opened (symlinks, fifos, devices).
pub fn apply_to_path(path: &Path, e: &Entry, p: Preserve) -> io::Result<()> {
    let c = cpath(path)?;
    let owner = p.fixed_owner.or((p.owner).then_some((e.uid, e.gid)));
    if let Some((uid, gid)) = owner {
        // SAFETY: a valid C string.
        check(unsafe { libc::lchown(c.as_ptr(), uid, gid) })?;
    }
    for (name, value) in &e.xattrs {
        set_xattr(XattrTarget::Path(&c), name, value, p)?;
    }
    if e.kind != FileKind::Symlink {
        let mode = if p.root || p.owner {
            e.mode
        } else {
            e.mode & 0o1777
        };
        // SAFETY: a valid C string.
        check(unsafe { libc::chmod(c.as_ptr(), mode as libc::mode_t) })?;
    }
    let times = timespecs(e);
    // SAFETY: a valid C string and two timespecs.
    check(unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
}

/// Sets the atime and mtime of `path` (not following symlinks).
pub fn set_times(path: &Path, e: &Entry) -> io::Result<()> {
    let c = cpath(path)?;
    let times = timespecs(e);
    // SAFETY: a valid C string and two timespecs.
    check(unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
}

fn timespecs(e: &Entry) -> [libc::timespec; 2] {
    [
        libc::timespec {
            tv_sec: e.atime.0,
            tv_nsec: e.atime.1,
        },
        libc::timespec {
            tv_sec: e.mtime.0,
            tv_nsec: e.mtime.1,
        },
    ]
}

fn set_xattr(target: XattrTarget<'_>, name: &[u8], value: &[u8], p: Preserve) -> io::Result<()> {
    let cname = CString::new(name).expect("xattr names have no NUL");
    // SAFETY: valid C strings and a valid value buffer.
    let rc = unsafe {
        match target {
            XattrTarget::Path(c) => libc::lsetxattr(
                c.as_ptr(),
                cname.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            ),
            XattrTarget::Fd(fd) => {
                libc::fsetxattr(fd, cname.as_ptr(), value.as_ptr().cast(), value.len(), 0)
            }
        }
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    let optional = name.starts_with(b"security.") || name.starts_with(b"trusted.") || !p.root;
    // security.* and trusted.* are kept "where permitted": a filesystem or an
    // LSM may refuse them, which is not a reason to fail the copy.
    if optional
        && matches!(
            err.raw_os_error(),
            Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::ENOTSUP) | Some(libc::EINVAL)
        )
    {
        return Ok(());
    }
    Err(io::Error::new(
        err.kind(),
        format!("setting xattr {}: {err}", String::from_utf8_lossy(name)),
    ))
}

/// `rel` as bytes for hashing and the wire.
pub fn rel_bytes(rel: &Path) -> &[u8] {
    rel.as_os_str().as_bytes()
}

pub fn rel_from_bytes(b: Vec<u8>) -> PathBuf {
    PathBuf::from(OsString::from_vec(b))
}

/// Process umask 0, so files are created with exactly the source's mode.
pub fn clear_umask() {
    // SAFETY: umask has no preconditions.
    unsafe { libc::umask(0) };
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
