//! Writing a byte stream onto a volume: a bounded buffer, zero regions that
//! cost no data writes (holes in files, BLKZEROOUT on block devices), a hard
//! capacity limit checked before each write, page cache dropped behind the
//! writer so a pod's memory cgroup does not fill with dirty pages, and a flush
//! before success.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use crate::error::{into_io, Kind};
use crate::progress::Progress;
use crate::target::human_bytes;

/// Bytes gathered before they are examined for zeros and written.
pub const CHUNK: usize = 1 << 20;
/// Zero detection granularity: a page, the smallest hole a filesystem keeps.
const GRAIN: usize = 4096;
/// Page-cache window: written data is pushed to disk and dropped from the cache
/// one window behind the writer, so at most about two windows stay dirty.
const CACHE_WINDOW: u64 = 32 << 20;

static ZEROS: [u8; GRAIN] = [0; GRAIN];

/// How zero regions are represented on the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZeroMode {
    /// A file truncated before writing: skipped regions are holes.
    Holes,
    /// A device (or a file not truncated): zero regions are written by BLKZEROOUT,
    /// or as zeros where that is not supported.
    ZeroOut,
}

pub struct VolumeWriter {
    file: File,
    mode: ZeroMode,
    /// Logical offset of the first byte in `buf`.
    offset: u64,
    buf: Vec<u8>,
    /// A zero region not yet materialised: (start, length).
    zero_run: Option<(u64, u64)>,
    limit: Option<u64>,
    limit_what: String,
    cache_flushing_to: u64,
    zeroout_supported: bool,
    progress: Option<Arc<Progress>>,
    /// Bytes that went out as data writes (not zero regions).
    pub data_bytes: u64,
}

impl VolumeWriter {
    /// A writer at offset 0. `limit` is the capacity; `limit_what` names the
    /// target in the capacity error.
    pub fn new(
        file: File,
        mode: ZeroMode,
        limit: Option<u64>,
        limit_what: impl Into<String>,
    ) -> Self {
        Self {
            file,
            mode,
            offset: 0,
            buf: Vec::new(),
            zero_run: None,
            limit,
            limit_what: limit_what.into(),
            cache_flushing_to: 0,
            zeroout_supported: true,
            progress: None,
            data_bytes: 0,
        }
    }

    /// Counts written bytes into `progress` as they are produced.
    pub fn with_progress(mut self, progress: Arc<Progress>) -> Self {
        self.progress = Some(progress);
        self
    }

    /// Logical bytes accepted so far.
    pub fn position(&self) -> u64 {
        self.offset + self.buf.len() as u64
    }

    /// Moves the write position forward to `offset`, leaving zeros (a hole)
    /// behind without reading or writing them: sparse regions of archives.
    pub fn skip_to(&mut self, offset: u64) -> io::Result<()> {
        let position = self.position();
        if offset < position {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "sparse regions out of order",
            ));
        }
        self.write_buffer()?;
        let len = offset - self.offset;
        if len > 0 {
            self.zero_run = match self.zero_run {
                Some((s, l)) if s + l == self.offset => Some((s, l + len)),
                _ => Some((self.offset, len)),
            };
            self.materialise_zero_run()?;
            self.offset = offset;
        }
        Ok(())
    }

    /// Writes `data` at `offset`, behind the current position (a disk image
    /// whose clusters are stored out of order). The region was already
    /// accepted as zeros, so pending data and zero regions go out first and
    /// this write lands on top of them.
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.write_buffer()?;
        self.materialise_zero_run()?;
        self.file.write_all_at(data, offset)?;
        self.data_bytes += data.len() as u64;
        if let Some(p) = &self.progress {
            p.add_written(data.len() as u64);
        }
        Ok(())
    }

    /// Writes everything out, extends a file over trailing zeros and, when
    /// `sync` is set, flushes it to stable storage. Returns the file.
    pub fn finish(mut self, sync: bool) -> io::Result<File> {
        self.write_buffer()?;
        self.materialise_zero_run()?;
        if self.mode == ZeroMode::Holes && self.file.metadata()?.len() < self.offset {
            self.file.set_len(self.offset)?;
        }
        if sync {
            self.file.sync_data()?;
        }
        Ok(self.file)
    }

    fn write_buffer(&mut self) -> io::Result<()> {
        let mut buf = std::mem::take(&mut self.buf);
        let written = self.write_region(&buf);
        buf.clear();
        self.buf = buf;
        written
    }

    /// Writes `buf` at the current offset, zero blocks as zero regions.
    fn write_region(&mut self, buf: &[u8]) -> io::Result<()> {
        let mut at = 0;
        while at < buf.len() {
            let end = (at + GRAIN).min(buf.len());
            let zero = buf[at..end] == ZEROS[..end - at];
            // Extend the run of blocks of the same kind, then emit it at once.
            let mut run_end = end;
            while run_end < buf.len() {
                let next = (run_end + GRAIN).min(buf.len());
                if (buf[run_end..next] == ZEROS[..next - run_end]) != zero {
                    break;
                }
                run_end = next;
            }
            let start = self.offset + at as u64;
            let len = (run_end - at) as u64;
            if zero {
                self.zero_run = match self.zero_run {
                    Some((s, l)) if s + l == start => Some((s, l + len)),
                    _ => Some((start, len)),
                };
            } else {
                self.materialise_zero_run()?;
                self.file.write_all_at(&buf[at..run_end], start)?;
                self.data_bytes += len;
            }
            at = run_end;
        }
        self.offset += buf.len() as u64;
        self.drop_cache_behind()?;
        Ok(())
    }

    fn materialise_zero_run(&mut self) -> io::Result<()> {
        let Some((start, len)) = self.zero_run.take() else {
            return Ok(());
        };
        if self.mode == ZeroMode::Holes {
            return Ok(());
        }
        let aligned = len & !511;
        if self.zeroout_supported && aligned > 0 && start % 512 == 0 {
            if self.blk_zeroout(start, aligned).is_ok() {
                return self.write_zeros(start + aligned, len - aligned);
            }
            // Not a block device, or the device refuses: write zeros from now on.
            self.zeroout_supported = false;
        }
        self.write_zeros(start, len)
    }

    fn blk_zeroout(&self, start: u64, len: u64) -> io::Result<()> {
        const BLKZEROOUT: libc::c_ulong = 0x127f;
        let range: [u64; 2] = [start, len];
        // SAFETY: BLKZEROOUT reads two u64 (start, length) from the pointer.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), BLKZEROOUT, range.as_ptr()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn write_zeros(&mut self, mut start: u64, mut len: u64) -> io::Result<()> {
        static BIG_ZEROS: [u8; 256 * 1024] = [0; 256 * 1024];
        while len > 0 {
            let n = len.min(BIG_ZEROS.len() as u64) as usize;
            self.file.write_all_at(&BIG_ZEROS[..n], start)?;
            start += n as u64;
            len -= n as u64;
        }
        Ok(())
    }

    /// Starts writeback of the last full window and drops the one before it
    /// from the page cache once it is on disk.
    fn drop_cache_behind(&mut self) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        while self.offset >= self.cache_flushing_to + CACHE_WINDOW {
            let start = self.cache_flushing_to;
            // SAFETY: plain syscalls on a valid descriptor; failures only cost memory.
            unsafe {
                libc::sync_file_range(
                    fd,
                    start as i64,
                    CACHE_WINDOW as i64,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
            self.cache_flushing_to += CACHE_WINDOW;
            if start >= CACHE_WINDOW {
                let prev = start - CACHE_WINDOW;
                unsafe {
                    libc::sync_file_range(
                        fd,
                        prev as i64,
                        CACHE_WINDOW as i64,
                        libc::SYNC_FILE_RANGE_WAIT_BEFORE
                            | libc::SYNC_FILE_RANGE_WRITE
                            | libc::SYNC_FILE_RANGE_WAIT_AFTER,
                    );
                    libc::posix_fadvise(
                        fd,
                        prev as i64,
                        CACHE_WINDOW as i64,
                        libc::POSIX_FADV_DONTNEED,
                    );
                }
            }
        }
        Ok(())
    }
}

impl Write for VolumeWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if let Some(limit) = self.limit {
            let after = self.position() + data.len() as u64;
            if after > limit {
                return Err(into_io(
                    Kind::Capacity,
                    "InsufficientCapacity",
                    format!(
                        "the data does not fit: more than {} would be written but {} can take only {}",
                        human_bytes(after),
                        self.limit_what,
                        human_bytes(limit)
                    ),
                ));
            }
        }
        if self.buf.is_empty() && data.len() >= CHUNK {
            // A whole chunk: straight from the caller's buffer.
            self.write_region(&data[..CHUNK])?;
            if let Some(p) = &self.progress {
                p.add_written(CHUNK as u64);
            }
            return Ok(CHUNK);
        }
        if self.buf.capacity() == 0 {
            self.buf.reserve_exact(CHUNK);
        }
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.write_buffer()?;
        }
        if let Some(p) = &self.progress {
            p.add_written(n as u64);
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;

    fn temp(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("vw-{}-{name}", std::process::id()))
    }

    #[test]
    fn zeros_become_holes_and_read_back() {
        let path = temp("holes");
        let mut data = vec![0u8; 8 << 20];
        data[5] = 1;
        data[(6 << 20) + 3] = 7;
        data.extend_from_slice(&[0u8; 1000]);
        let mut w = VolumeWriter::new(File::create(&path).unwrap(), ZeroMode::Holes, None, "t");
        for piece in data.chunks(70_001) {
            w.write_all(piece).unwrap();
        }
        assert_eq!(w.position(), data.len() as u64);
        w.finish(true).unwrap();
        let mut back = Vec::new();
        File::open(&path).unwrap().read_to_end(&mut back).unwrap();
        assert!(back == data);
        let blocks = std::fs::metadata(&path).unwrap().blocks() * 512;
        assert!(
            blocks <= 64 * 1024,
            "{blocks} bytes allocated for 2 data pages"
        );
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn zeroout_mode_overwrites_old_data() {
        let path = temp("zeroout");
        std::fs::write(&path, vec![0xAAu8; 3 << 20]).unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let mut w = VolumeWriter::new(file, ZeroMode::ZeroOut, None, "t");
        w.write_all(&vec![0u8; (2 << 20) + 100]).unwrap();
        w.finish(false).unwrap();
        let back = std::fs::read(&path).unwrap();
        assert!(back[..(2 << 20) + 100].iter().all(|&b| b == 0));
        assert!(back[(2 << 20) + 100..].iter().all(|&b| b == 0xAA));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn limit_is_enforced_before_writing() {
        let path = temp("limit");
        let mut w = VolumeWriter::new(
            File::create(&path).unwrap(),
            ZeroMode::Holes,
            Some(10),
            "the test file",
        );
        w.write_all(b"0123456789").unwrap();
        let err = w.write_all(b"x").unwrap_err();
        assert!(err.to_string().contains("can take only 10 B"), "{err}");
        std::fs::remove_file(path).unwrap();
    }
}
