//! Block → block, block → image file, image file → block: 4 MiB aligned
//! chunks read by one thread and written by another, holes of an image file
//! never read, zero chunks never written as data (BLKZEROOUT on a device,
//! holes in a fresh image file), the device digest hashed on a third thread
//! from the same buffers.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use crossbeam_channel::bounded;

use crate::digest::{chunk_count, chunk_hash, chunk_len, combine, is_zero, zero_hash, Hash, CHUNK};
use crate::filecopy::data_segments;

/// One chunk as read: data, or known zeros.
pub enum Chunk {
    Data(Arc<Vec<u8>>),
    Zero,
}

/// Reads chunk `index` of `src`; `segments` are its data ranges (holes are
/// zeros without reading).
pub fn read_chunk(
    src: &File,
    size: u64,
    index: u64,
    segments: &[(u64, u64)],
    buf: &mut Vec<u8>,
) -> io::Result<bool> {
    let (start, len) = (index * CHUNK, chunk_len(size, index));
    if !segments.iter().any(|&(a, b)| a < start + len && b > start) {
        return Ok(false);
    }
    buf.resize(len as usize, 0);
    src.read_exact_at(buf, start)?;
    Ok(!is_zero(buf))
}

/// Where zero chunks go on the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Zeroing {
    /// A fresh (truncated) file: skipping leaves a hole.
    Skip,
    /// A device or existing file: BLKZEROOUT, else punch a hole, else write zeros.
    Explicit,
}

/// Writes chunks at their offsets, merging zero runs into one request.
pub struct ChunkWriter<'a> {
    pub file: &'a File,
    pub zeroing: Zeroing,
    zero_run: Option<(u64, u64)>,
    /// Writeback was started up to here.
    pub flushed_to: u64,
    pub data_bytes: u64,
    pub zero_bytes: u64,
    writeback: bool,
}

const WINDOW: u64 = 64 << 20;
/// Zero detection grain inside a data chunk: a page, the smallest hole.
const GRAIN: usize = 4096;

impl<'a> ChunkWriter<'a> {
    pub fn new(file: &'a File, zeroing: Zeroing) -> Self {
        Self {
            file,
            zeroing,
            zero_run: None,
            flushed_to: 0,
            data_bytes: 0,
            zero_bytes: 0,
            writeback: true,
        }
    }

    /// Writes one chunk and its zero regions, nothing left pending: for
    /// chunks that arrive at scattered offsets (network streams).
    pub fn write_chunk(mut self, start: u64, data: &[u8]) -> io::Result<()> {
        self.writeback = false;
        self.data(start, data)?;
        match self.zero_run.take() {
            Some(run) => self.flush_zeros(run),
            None => Ok(()),
        }
    }

    pub fn zero(&mut self, start: u64, len: u64) -> io::Result<()> {
        self.zero_bytes += len;
        self.zero_run = match self.zero_run {
            Some((s, l)) if s + l == start => Some((s, l + len)),
            Some(run) => {
                self.flush_zeros(run)?;
                Some((start, len))
            }
            None => Some((start, len)),
        };
        Ok(())
    }

    /// Writes a chunk; its zero regions (at a 64 KiB grain) go the cheap way.
    pub fn data(&mut self, start: u64, data: &[u8]) -> io::Result<()> {
        let mut at = 0;
        while at < data.len() {
            let zero = is_zero(&data[at..(at + GRAIN).min(data.len())]);
            let mut end = (at + GRAIN).min(data.len());
            while end < data.len() && is_zero(&data[end..(end + GRAIN).min(data.len())]) == zero {
                end = (end + GRAIN).min(data.len());
            }
            let offset = start + at as u64;
            if zero {
                self.zero(offset, (end - at) as u64)?;
            } else {
                if let Some(run) = self.zero_run.take() {
                    self.flush_zeros(run)?;
                }
                self.file.write_all_at(&data[at..end], offset)?;
                self.data_bytes += (end - at) as u64;
            }
            at = end;
        }
        self.writeback(start + data.len() as u64);
        Ok(())
    }

    /// Writes the pending zero run.
    pub fn flush_pending(&mut self) -> io::Result<()> {
        match self.zero_run.take() {
            Some(run) => self.flush_zeros(run),
            None => Ok(()),
        }
    }

    pub fn finish(mut self) -> io::Result<()> {
        if let Some(run) = self.zero_run.take() {
            self.flush_zeros(run)?;
        }
        self.file.sync_data()
    }

    fn flush_zeros(&mut self, (start, len): (u64, u64)) -> io::Result<()> {
        if self.zeroing == Zeroing::Skip {
            return Ok(());
        }
        zero_range(self.file, start, len)
    }

    /// Starts writeback behind the writer and waits for the window before
    /// it, so dirty pages stay bounded (a pod's memory limit counts them).
    fn writeback(&mut self, upto: u64) {
        if !self.writeback {
            return;
        }
        let fd = self.file.as_raw_fd();
        while upto >= self.flushed_to + WINDOW {
            let start = self.flushed_to;
            // SAFETY: plain syscalls on a valid descriptor; failures only cost memory.
            unsafe {
                libc::sync_file_range(fd, start as i64, WINDOW as i64, libc::SYNC_FILE_RANGE_WRITE);
                if start >= WINDOW {
                    let prev = (start - WINDOW) as i64;
                    libc::sync_file_range(
                        fd,
                        prev,
                        WINDOW as i64,
                        libc::SYNC_FILE_RANGE_WAIT_BEFORE
                            | libc::SYNC_FILE_RANGE_WRITE
                            | libc::SYNC_FILE_RANGE_WAIT_AFTER,
                    );
                    libc::posix_fadvise(fd, prev, WINDOW as i64, libc::POSIX_FADV_DONTNEED);
                }
            }
            self.flushed_to += WINDOW;
        }
    }
}

/// Makes [start, start+len) read as zeros at the least cost: BLKZEROOUT on a
/// device, a punched hole in a file, else written zeros.
pub fn zero_range(file: &File, start: u64, len: u64) -> io::Result<()> {
    const BLKZEROOUT: libc::c_ulong = 0x127f;
    let aligned = len & !511;
    if start % 512 == 0 && aligned > 0 {
        let range: [u64; 2] = [start, aligned];
        // SAFETY: BLKZEROOUT reads two u64 from the pointer.
        if unsafe { libc::ioctl(file.as_raw_fd(), BLKZEROOUT, range.as_ptr()) } == 0 {
            return write_zeros(file, start + aligned, len - aligned);
        }
    }
    // SAFETY: fallocate on a valid descriptor.
    let punched = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            start as i64,
            len as i64,
        )
    };
    if punched == 0 {
        return Ok(());
    }
    write_zeros(file, start, len)
}

fn write_zeros(file: &File, mut start: u64, mut len: u64) -> io::Result<()> {
    static ZEROS: [u8; 1 << 20] = [0; 1 << 20];
    while len > 0 {
        let n = len.min(ZEROS.len() as u64) as usize;
        file.write_all_at(&ZEROS[..n], start)?;
        start += n as u64;
        len -= n as u64;
    }
    Ok(())
}

/// Least bytes copied between two records of a local block copy's progress
/// (and at least `Resume::commit_every` between them).
const COMMIT_BYTES: u64 = 256 << 20;
const LOCAL_MAGIC: &[u8; 8] = b"PVCLOCAL";
const LOCAL_JOURNAL: usize = 8 + 32 + 8 + 32;

/// Where a local block copy records how far it got: the start of the last
/// chunk, which is copied last (so the record lives until the copy ends).
/// None when the device is too small to have a separate last chunk.
fn journal_at(size: u64) -> Option<u64> {
    let count = chunk_count(size);
    (count >= 2 && chunk_len(size, count - 1) >= LOCAL_JOURNAL as u64).then(|| (count - 1) * CHUNK)
}

fn encode_local_journal(session: &Hash, done: u64) -> [u8; LOCAL_JOURNAL] {
    let mut out = [0u8; LOCAL_JOURNAL];
    out[..8].copy_from_slice(LOCAL_MAGIC);
    out[8..40].copy_from_slice(session);
    out[40..48].copy_from_slice(&done.to_le_bytes());
    let check = crate::digest::sha256(&out[..48]);
    out[48..].copy_from_slice(&check);
    out
}

/// The chunks an interrupted copy of the same session completed (durably).
pub fn load_local_journal(dst: &File, size: u64, session: &Hash) -> Option<u64> {
    let at = journal_at(size)?;
    let mut b = [0u8; LOCAL_JOURNAL];
    dst.read_exact_at(&mut b, at).ok()?;
    let done = u64::from_le_bytes(b[40..48].try_into().unwrap());
    (b == encode_local_journal(session, done) && done < chunk_count(size)).then_some(done)
}

/// Where a copy starts and how it records its progress.
#[derive(Clone, Copy)]
pub struct Resume {
    /// Names this copy (source and size): a journal of another is ignored.
    pub session: Hash,
    /// Chunks already on the target (from the journal), not copied again.
    pub first: u64,
    /// Least time between two records (each costs two flushes of the target).
    pub commit_every: std::time::Duration,
}

/// What a block copy did.
pub struct BlockOutcome {
    pub digest: Hash,
    pub data_bytes: u64,
    pub zero_bytes: u64,
}

/// Copies `size` bytes of `src` onto `dst`; returns the device digest of
/// what was read.
pub fn copy_device(
    src: &File,
    src_is_file: bool,
    size: u64,
    dst: &File,
    zeroing: Zeroing,
    resume: Resume,
    ctx: &populator_core::Context,
) -> Result<BlockOutcome> {
    let (progress, cancel) = (&ctx.progress, &ctx.cancel);
    let segments = if src_is_file {
        data_segments(src, size, 0).context("finding the data regions of the source")?
    } else {
        vec![(0, size)]
    };
    // SAFETY: an advisory call on a valid descriptor.
    unsafe { libc::posix_fadvise(src.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL) };
    let count = chunk_count(size);
    let (to_writer, from_reader) = bounded::<(u64, Chunk)>(3);
    let (to_hasher, from_writer) = bounded::<(u64, Arc<Vec<u8>>)>(3);
    let (recycle, recycled) = bounded::<Vec<u8>>(8);
    let mut hashes: Vec<Hash> = (0..count).map(|i| zero_hash(chunk_len(size, i))).collect();
    let first = resume.first.min(count);
    // The resumed part's hashes: from the target, which holds it.
    let mut buf = Vec::new();
    for (i, hash) in hashes.iter_mut().enumerate().take(first as usize) {
        cancel.check()?;
        let (start, len) = (i as u64 * CHUNK, chunk_len(size, i as u64));
        buf.resize(len as usize, 0);
        dst.read_exact_at(&mut buf, start)
            .with_context(|| format!("reading the target at offset {start}"))?;
        *hash = chunk_hash(&buf);
        progress.advance(len);
    }
    drop(buf);
    let journal = journal_at(size);
    let mut journal_written = first > 0;
    let mut committed = first * CHUNK;
    let mut last_commit = std::time::Instant::now();
    let mut writer = ChunkWriter::new(dst, zeroing);
    writer.flushed_to = first * CHUNK / WINDOW * WINDOW;
    let (read_result, write_result) = std::thread::scope(|s| {
        let reader = s.spawn(move || -> Result<()> {
            let mut spare: Option<Vec<u8>> = None;
            for i in first..count {
                cancel.check()?;
                let mut buf = spare
                    .take()
                    .or_else(|| recycled.try_recv().ok())
                    .unwrap_or_default();
                let has_data = read_chunk(src, size, i, &segments, &mut buf)
                    .with_context(|| format!("reading the source at offset {}", i * CHUNK))?;
                let chunk = if has_data {
                    Chunk::Data(Arc::new(buf))
                } else {
                    spare = Some(buf);
                    Chunk::Zero
                };
                if to_writer.send((i, chunk)).is_err() {
                    break;
                }
            }
            Ok(())
        });
        let hasher = s.spawn(move || {
            let mut out = Vec::new();
            for (i, data) in from_writer {
                out.push((i, chunk_hash(&data)));
                if let Ok(buf) = Arc::try_unwrap(data) {
                    let _ = recycle.try_send(buf);
                }
            }
            out
        });
        let mut write = || -> Result<()> {
            for (i, chunk) in from_reader.iter() {
                let (start, len) = (i * CHUNK, chunk_len(size, i));
                if Some(start) == journal && journal_written && zeroing == Zeroing::Skip {
                    // Zeros are skipped on this target: clear the record first.
                    zero_range(dst, start, LOCAL_JOURNAL as u64)?;
                }
                match chunk {
                    Chunk::Zero => writer.zero(start, len)?,
                    Chunk::Data(data) => {
                        writer
                            .data(start, &data)
                            .with_context(|| format!("writing the target at offset {start}"))?;
                        progress.add_written(len);
                        let _ = to_hasher.send((i, data));
                    }
                }
                progress.add_read(len);
                progress.advance(len);
                let done = start + len;
                if let Some(at) = journal.filter(|&at| {
                    done < at
                        && done >= committed + COMMIT_BYTES
                        && last_commit.elapsed() >= resume.commit_every
                }) {
                    // Durable first, then recorded: a restart trusts the record.
                    writer.flush_pending()?;
                    dst.sync_data()?;
                    dst.write_all_at(&encode_local_journal(&resume.session, i + 1), at)?;
                    dst.sync_data()?;
                    journal_written = true;
                    committed = done;
                    last_commit = std::time::Instant::now();
                }
            }
            Ok(())
        };
        let written = write();
        drop(from_reader);
        drop(to_hasher);
        for (i, h) in hasher.join().expect("the hasher does not panic") {
            hashes[i as usize] = h;
        }
        let read = reader.join().expect("the reader does not panic");
        (read, written)
    });
    read_result?;
    write_result?;
    let (data_bytes, zero_bytes) = (writer.data_bytes, writer.zero_bytes);
    writer.finish().context("flushing the target")?;
    Ok(BlockOutcome {
        digest: combine(&hashes),
        data_bytes,
        zero_bytes,
    })
}
