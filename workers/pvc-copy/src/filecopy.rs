//! The bytes of one regular file, holes kept: FICLONE (a reflink, when both
//! sides share a filesystem that can), else copy_file_range over each data
//! segment (SEEK_DATA/SEEK_HOLE), else pread/pwrite. A method that the
//! filesystems refuse (EXDEV, EOPNOTSUPP, EINVAL, ENOSYS) is not tried again
//! in this run, so a tree of small files pays for a refusal once.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};

/// Which methods still work in this run.
#[derive(Debug)]
pub struct Methods {
    clone: AtomicBool,
    copy_range: AtomicBool,
}

impl Default for Methods {
    fn default() -> Self {
        Self {
            clone: AtomicBool::new(true),
            copy_range: AtomicBool::new(true),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Used {
    Clone,
    CopyRange,
    ReadWrite,
}

fn refused(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EXDEV)
            | Some(libc::EOPNOTSUPP)
            | Some(libc::EINVAL)
            | Some(libc::ENOSYS)
            | Some(libc::ENOTTY)
            | Some(libc::EBADF)
    )
}

/// Data segments of `file` as (start, end), from SEEK_DATA/SEEK_HOLE. A file
/// that is fully allocated is one segment without asking.
pub fn data_segments(file: &File, size: u64, allocated: u64) -> io::Result<Vec<(u64, u64)>> {
    if size == 0 {
        return Ok(Vec::new());
    }
    if allocated >= size {
        return Ok(vec![(0, size)]);
    }
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: u64 = 0;
    while pos < size {
        // SAFETY: lseek on a valid descriptor.
        let data = unsafe { libc::lseek(fd, pos as i64, libc::SEEK_DATA) };
        if data < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole remains
            }
            if refused(&err) {
                return Ok(vec![(0, size)]);
            }
            return Err(err);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let (start, end) = (data as u64, (hole as u64).min(size));
        if start >= end {
            break;
        }
        out.push((start, end));
        pos = end;
    }
    Ok(out)
}

/// Copies `size` bytes of `src` into the empty `dst`, keeping holes.
pub fn copy_file(
    src: &File,
    dst: &File,
    size: u64,
    allocated: u64,
    methods: &Methods,
    buf: &mut Vec<u8>,
) -> io::Result<Used> {
    if size == 0 {
        return Ok(Used::CopyRange);
    }
    if methods.clone.load(Ordering::Relaxed) {
        const FICLONE: libc::c_ulong = 0x4004_9409;
        // SAFETY: FICLONE takes the source descriptor as its argument.
        let rc = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE, src.as_raw_fd()) };
        if rc == 0 {
            return Ok(Used::Clone);
        }
        let err = io::Error::last_os_error();
        if !refused(&err) {
            return Err(err);
        }
        methods.clone.store(false, Ordering::Relaxed);
    }
    let segments = data_segments(src, size, allocated)?;
    // Data up to the end sets the size itself; a trailing hole needs a call.
    let ends_in_hole = segments.last().is_none_or(|&(_, end)| end < size);
    let mut used = Used::CopyRange;
    for (start, end) in segments {
        if methods.copy_range.load(Ordering::Relaxed) {
            match copy_range(src, dst, start, end) {
                Ok(()) => continue,
                Err((done, e)) if refused(&e) && done == start => {
                    methods.copy_range.store(false, Ordering::Relaxed);
                }
                Err((_, e)) => return Err(e),
            }
        }
        used = Used::ReadWrite;
        read_write(src, dst, start, end, buf)?;
    }
    if ends_in_hole {
        dst.set_len(size)?;
    }
    Ok(used)
}

/// copy_file_range over [start, end); on failure, how far it got.
fn copy_range(src: &File, dst: &File, start: u64, end: u64) -> Result<(), (u64, io::Error)> {
    let mut pos = start;
    while pos < end {
        let mut off_in = pos as i64;
        let mut off_out = pos as i64;
        let want = (end - pos).min(1 << 30) as usize;
        // SAFETY: valid descriptors and offset pointers.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                want,
                0,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err((pos, err));
        }
        if n == 0 {
            // The source shrank under us: --verify will tell.
            break;
        }
        pos += n as u64;
    }
    Ok(())
}

fn read_write(src: &File, dst: &File, start: u64, end: u64, buf: &mut Vec<u8>) -> io::Result<()> {
    if buf.len() < (1 << 20) {
        buf.resize(1 << 20, 0);
    }
    let mut pos = start;
    while pos < end {
        let want = ((end - pos) as usize).min(buf.len());
        let n = src.read_at(&mut buf[..want], pos)?;
        if n == 0 {
            break;
        }
        dst.write_all_at(&buf[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}
