//! The target volume: a directory (filesystem volume), a block device (block
//! volume) or an image file written like a block device, and how many bytes it
//! can take (device size, free space and `--pvc-size`, whichever is smallest).

use std::fs::{self, File};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use serde::Serialize;

use crate::error::{fail, Kind};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    Filesystem,
    Block,
    File,
}

impl TargetKind {
    pub fn name(self) -> &'static str {
        match self {
            TargetKind::Filesystem => "filesystem",
            TargetKind::Block => "block",
            TargetKind::File => "file",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Target {
    pub path: PathBuf,
    pub kind: TargetKind,
    /// Bytes the target can take; `None` when nothing bounds it.
    pub capacity: Option<u64>,
}

pub const DEFAULT_BLOCK_PATH: &str = "/dev/block";
pub const DEFAULT_FILESYSTEM_PATH: &str = "/mnt";

impl Target {
    /// Finds the target: `--target` if given, else `/dev/block` when it is a
    /// block device, else `/mnt` when it is a directory.
    pub fn detect(path: Option<&Path>, pvc_size: Option<u64>) -> Result<Target> {
        let path = match path {
            Some(p) => p.to_path_buf(),
            None => default_path()?,
        };
        let kind = match fs::metadata(&path) {
            Ok(m) if m.is_dir() => TargetKind::Filesystem,
            Ok(m) if m.file_type().is_block_device() => TargetKind::Block,
            Ok(m) if m.is_file() => TargetKind::File,
            Ok(_) => {
                return Err(fail(
                    Kind::Usage,
                    "InvalidTarget",
                    format!(
                        "target {} is neither a directory, a block device nor a regular file",
                        path.display()
                    ),
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let parent = path
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(Path::new("."));
                if !parent.is_dir() {
                    return Err(fail(
                        Kind::Usage,
                        "InvalidTarget",
                        format!(
                            "target {} does not exist and its directory {} is missing",
                            path.display(),
                            parent.display()
                        ),
                    ));
                }
                TargetKind::File
            }
            Err(e) => {
                return Err(e).with_context(|| format!("inspecting target {}", path.display()))
            }
        };
        let physical = match kind {
            TargetKind::Block => Some(block_device_size(&path)?),
            TargetKind::Filesystem => Some(free_space(&path)?),
            TargetKind::File => {
                // The file is rewritten from the start, so its current size counts as free.
                let existing = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                let dir = path
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(Path::new("."));
                Some(free_space(dir)?.saturating_add(existing))
            }
        };
        let capacity = match (physical, pvc_size) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Ok(Target {
            path,
            kind,
            capacity,
        })
    }

    /// Fails with exit 4 when `size` bytes cannot fit; `what` names the data.
    pub fn check_fits(&self, size: u64, what: &str) -> Result<()> {
        match self.capacity {
            Some(cap) if size > cap => Err(fail(
                Kind::Capacity,
                "InsufficientCapacity",
                format!(
                    "{what} is {} but target {} can take only {}",
                    human_bytes(size),
                    self.path.display(),
                    human_bytes(cap)
                ),
            )),
            _ => Ok(()),
        }
    }
}

fn default_path() -> Result<PathBuf> {
    let block = Path::new(DEFAULT_BLOCK_PATH);
    if fs::metadata(block).is_ok_and(|m| m.file_type().is_block_device()) {
        return Ok(block.to_path_buf());
    }
    let dir = Path::new(DEFAULT_FILESYSTEM_PATH);
    if dir.is_dir() {
        return Ok(dir.to_path_buf());
    }
    Err(fail(
        Kind::Usage,
        "InvalidTarget",
        "no --target given, and neither /dev/block (a block device) nor /mnt (a directory) exists",
    ))
}

/// The size of a block device (BLKGETSIZE64).
pub fn block_device_size(path: &Path) -> Result<u64> {
    let file =
        File::open(path).with_context(|| format!("opening block device {}", path.display()))?;
    file_device_size(&file)
        .with_context(|| format!("reading the size of block device {}", path.display()))
}

/// BLKGETSIZE64 on an open device.
pub fn file_device_size(file: &File) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd;
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(size)
}

/// Bytes an unprivileged writer may still use on the filesystem holding `path`.
pub fn free_space(path: &Path) -> Result<u64> {
    let st = statvfs(path)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Inodes still available on the filesystem holding `path`.
pub fn free_inodes(path: &Path) -> Result<u64> {
    Ok(statvfs(path)?.f_favail)
}

fn statvfs(path: &Path) -> Result<libc::statvfs> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string and `st` a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("statvfs {}", path.display()));
    }
    Ok(st)
}

/// `1.5 GiB (1610612736 bytes)`: a size for messages, exact where it matters.
pub fn human_bytes(n: u64) -> String {
    let short = short_bytes(n);
    if n < 1024 {
        short
    } else {
        format!("{short} ({n} bytes)")
    }
}

/// `1.5 GiB`: a size for progress lines.
pub fn short_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// syncfs: flushes every file written on the filesystem holding `path`.
pub fn sync_filesystem(path: &Path) -> Result<()> {
    let dir = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    syncfs(&dir).with_context(|| format!("syncing {}", path.display()))
}

/// syncfs on an open file or directory of the filesystem.
pub fn syncfs(file: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid descriptor for the life of the call.
    if unsafe { libc::syncfs(file.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_and_missing_file() {
        let dir = std::env::temp_dir();
        let t = Target::detect(Some(&dir), Some(1000)).unwrap();
        assert_eq!(t.kind, TargetKind::Filesystem);
        assert_eq!(t.capacity, Some(1000));
        let err = t.check_fits(1001, "the source").unwrap_err();
        assert_eq!(crate::error::classify(&err).kind, Kind::Capacity);
        let img = dir.join(format!("nope-{}.img", std::process::id()));
        assert_eq!(
            Target::detect(Some(&img), None).unwrap().kind,
            TargetKind::File
        );
        let bad = dir.join("missing-dir-xyz/disk.img");
        assert_eq!(
            crate::error::classify(&Target::detect(Some(&bad), None).unwrap_err()).kind,
            Kind::Usage
        );
    }

    #[test]
    fn human() {
        assert_eq!(human_bytes(10), "10 B");
        assert_eq!(human_bytes(1536), "1.5 KiB (1536 bytes)");
    }
}
