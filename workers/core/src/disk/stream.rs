//! The conversion engine every format shares: a format parser never reads
//! the source itself; it asks for *regions* (metadata to parse, data to copy
//! to a guest offset, compressed clusters to inflate) and the driver serves
//! them in the order of their host offsets from one forward pass over the
//! stream.
//!
//! A region that lies behind the stream position (metadata stored after the
//! data it maps) is read by HTTP Range from the source (`ranged`); when the
//! source cannot do that (no range support, or the image arrives
//! compressed), the pipeline starts over with spooling on: bytes the forward
//! pass skips are kept in an unlinked temporary file and served from there
//! (`spooled`). Memory stays bounded: metadata regions are capped, data
//! regions are copied in pieces, and the queue holds merged runs.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use anyhow::Result;

use super::{corrupt, DiskOptions, RandomAccess};
use crate::progress::Progress;
use crate::writer::VolumeWriter;

/// The largest metadata region (an L1 table, a BAT, a grain directory) read
/// into memory: qemu's own limit for qcow2 L1 tables.
pub const MAX_META: u64 = 32 << 20;
/// Regions waiting to be read (and separate host ranges in use): about 100
/// bytes each, so at most ~50 MiB however hostile or fragmented the tables.
const MAX_PENDING: usize = 1 << 19;
/// Data regions are copied in pieces of this size.
const PIECE: usize = 256 << 10;

/// How compressed clusters are encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    /// Raw deflate (qcow2's default).
    Deflate,
    /// Deflate with a zlib header (vmdk streamOptimized).
    Zlib,
    /// One zstd frame (qcow2 compression_type=zstd).
    Zstd,
}

/// What a region's bytes are for.
#[derive(Clone, Debug)]
pub enum Use<T> {
    /// Metadata, handed to the format parser.
    Meta(T),
    /// Raw guest data, copied to `guest`.
    Data { guest: u64 },
    /// A compressed cluster, inflated to `out_len` bytes at `guest`.
    Compressed {
        guest: u64,
        out_len: u64,
        codec: Codec,
    },
}

#[derive(Clone, Debug)]
pub struct Region<T> {
    pub len: u64,
    pub what: Use<T>,
    /// The stream may end exactly where this region would start.
    pub optional: bool,
}

/// A format parser: asks for regions, learns the virtual size.
pub trait Layout {
    type Tag: Clone + std::fmt::Debug;
    /// Schedules the first region (the header).
    fn start(&mut self, plan: &mut Plan<Self::Tag>) -> Result<()>;
    /// Parses a metadata region and schedules what it points to.
    fn on_meta(
        &mut self,
        tag: Self::Tag,
        offset: u64,
        data: &[u8],
        plan: &mut Plan<Self::Tag>,
    ) -> Result<()>;
    /// Bytes the format keeps after everything its tables map (a footer),
    /// checked by [`Layout::finish`].
    fn trailer_len(&self) -> u64 {
        0
    }
    /// Called once every region was served, with the last bytes of the
    /// stream after them (at most [`Layout::trailer_len`]; fewer when the
    /// stream ends early). A format whose end is marked (an end-of-stream
    /// marker, a footer) refuses a stream that stops before it, instead of
    /// the rest of the disk silently reading as zeros.
    fn finish(&mut self, _trailer: &[u8]) -> Result<()> {
        Ok(())
    }
}

/// The regions still to read, ordered by host offset, plus the host ranges
/// already claimed (so a cluster referenced twice, or tables that overlap,
/// are refused instead of producing garbage).
pub struct Plan<T> {
    queue: BTreeMap<(u64, u64), Region<T>>,
    seq: u64,
    claims: BTreeMap<u64, u64>,
    /// The source's size, when known (an uncompressed source that declared it).
    pub source_len: Option<u64>,
    /// Set by the header parser.
    pub virtual_size: Option<u64>,
    /// The last data region scheduled, for merging contiguous runs.
    last_data: Option<(u64, u64)>,
    /// The format's own words for what a "cluster" is, for messages.
    pub unit: &'static str,
}

impl<T: Clone> Plan<T> {
    pub fn new(source_len: Option<u64>, unit: &'static str) -> Self {
        Plan {
            queue: BTreeMap::new(),
            seq: 0,
            claims: BTreeMap::new(),
            source_len,
            virtual_size: None,
            last_data: None,
            unit,
        }
    }

    /// Metadata `what` at `offset`, `len` bytes, handed back with `tag`.
    pub fn meta(&mut self, offset: u64, len: u64, tag: T, what: &str) -> Result<()> {
        if len > MAX_META {
            return Err(corrupt(format!(
                "the {what} is {len} bytes, more than the {MAX_META} bytes this converter reads as metadata"
            )));
        }
        self.check_bounds(offset, len, what)?;
        self.claim(offset, len, what)?;
        self.push(offset, len, Use::Meta(tag))?;
        Ok(())
    }

    /// A stream marker: may overlap what came before, and the stream may
    /// end right before it (an image without an end-of-stream marker).
    pub fn marker(&mut self, offset: u64, len: u64, tag: T, what: &str) -> Result<()> {
        if self.source_len.is_some_and(|size| offset >= size) {
            return Ok(());
        }
        self.check_bounds(offset, len, what)?;
        let key = self.push(offset, len, Use::Meta(tag))?;
        if let Some(region) = self.queue.get_mut(&key) {
            region.optional = true;
        }
        Ok(())
    }

    /// Guest data at host `offset`: merged with the previous region when both
    /// continue it, so a contiguous image becomes a few large copies.
    pub fn data(&mut self, offset: u64, len: u64, guest: u64) -> Result<()> {
        self.check_bounds(offset, len, self.unit)?;
        self.claim(offset, len, self.unit)?;
        if let Some((key_offset, seq)) = self.last_data {
            if let Some(region) = self.queue.get_mut(&(key_offset, seq)) {
                if let Use::Data { guest: g } = region.what {
                    if key_offset + region.len == offset && g + region.len == guest {
                        region.len += len;
                        return Ok(());
                    }
                }
            }
        }
        let key = self.push(offset, len, Use::Data { guest })?;
        self.last_data = Some(key);
        Ok(())
    }

    /// A compressed cluster (compressed clusters may share host sectors, so
    /// they are not claimed).
    pub fn compressed(
        &mut self,
        offset: u64,
        len: u64,
        guest: u64,
        out_len: u64,
        codec: Codec,
    ) -> Result<()> {
        if len > MAX_META {
            return Err(corrupt(format!(
                "a compressed {} of {len} bytes is larger than any valid one",
                self.unit
            )));
        }
        self.check_bounds(offset, len, "compressed data")?;
        self.push(
            offset,
            len,
            Use::Compressed {
                guest,
                out_len,
                codec,
            },
        )?;
        Ok(())
    }

    fn push(&mut self, offset: u64, len: u64, what: Use<T>) -> Result<(u64, u64)> {
        if self.queue.len() >= MAX_PENDING || self.claims.len() >= MAX_PENDING {
            return Err(corrupt(format!(
                "the image maps more than {MAX_PENDING} separate {} runs ahead of its data; this converter refuses it to keep memory bounded (convert it with qemu-img convert first, which lays the data out in order)",
                self.unit
            )));
        }
        self.seq += 1;
        let key = (offset, self.seq);
        self.queue.insert(
            key,
            Region {
                len,
                what,
                optional: false,
            },
        );
        Ok(key)
    }

    fn check_bounds(&self, offset: u64, len: u64, what: &str) -> Result<()> {
        let end = offset.checked_add(len).ok_or_else(|| {
            corrupt(format!(
                "the {what} at byte {offset} has an impossible size"
            ))
        })?;
        if let Some(size) = self.source_len {
            if end > size {
                return Err(corrupt(format!(
                    "the {what} at byte {offset} ({len} bytes) reaches past the end of the file ({size} bytes): the image is truncated or its tables are corrupt"
                )));
            }
        }
        Ok(())
    }

    /// Records `offset..offset+len` as used; fails if any of it already is.
    fn claim(&mut self, offset: u64, len: u64, what: &str) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        if let Some((&start, &stop)) = self.claims.range(..end).next_back() {
            if stop > offset {
                return Err(corrupt(format!(
                    "the {what} at byte {offset} overlaps bytes {start}..{stop} that are already in use: a {} referenced twice or overlapping tables",
                    self.unit
                )));
            }
        }
        // Merge with touching neighbours to keep the set small.
        let mut start = offset;
        let mut stop = end;
        if let Some((&s, &e)) = self.claims.range(..offset + 1).next_back() {
            if e == offset {
                start = s;
                self.claims.remove(&s);
            }
        }
        if let Some(&e) = self.claims.get(&end) {
            stop = e;
            self.claims.remove(&end);
        }
        self.claims.insert(start, stop);
        Ok(())
    }

    fn pop(&mut self) -> Option<(u64, Region<T>)> {
        let ((offset, seq), region) = self.queue.pop_first()?;
        if self.last_data == Some((offset, seq)) {
            self.last_data = None;
        }
        Some((offset, region))
    }
}

/// Which path a conversion took.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Conversion {
    Streamed,
    Ranged,
    Spooled,
}

impl Conversion {
    pub fn name(self) -> &'static str {
        match self {
            Conversion::Streamed => "streamed",
            Conversion::Ranged => "ranged",
            Conversion::Spooled => "spooled",
        }
    }
}

/// What a conversion reports.
#[derive(Debug, Default)]
pub struct Stats {
    pub conversion: Option<Conversion>,
    pub range_requests: u64,
    pub spooled_bytes: u64,
}

/// The forward pass over the source. It keeps the current region plus up to
/// [`LOOKBACK`] bytes before it in memory: compressed clusters are packed
/// into host clusters allocated before the table that maps them, so a
/// layout is often slightly out of order, and that must not cost a range
/// request (or a restart) each time.
pub struct Cursor<'r> {
    reader: &'r mut dyn Read,
    /// Source bytes `start..start + buf.len()`; the stream is at the end.
    buf: Vec<u8>,
    start: u64,
    eof: bool,
    spool: Option<Spool>,
    /// The end of the furthest region served from the stream.
    served_to: u64,
}

/// Bytes kept behind the current region.
pub const LOOKBACK: u64 = 4 << 20;

impl<'r> Cursor<'r> {
    pub fn new(reader: &'r mut dyn Read, spool: Option<Spool>) -> Self {
        Cursor {
            reader,
            buf: Vec::new(),
            start: 0,
            eof: false,
            spool,
            served_to: 0,
        }
    }

    /// The first source offset still available from memory or the stream.
    pub fn start(&self) -> u64 {
        self.start
    }

    fn end(&self) -> u64 {
        self.start + self.buf.len() as u64
    }

    /// Forgets (or spools) what lies more than [`LOOKBACK`] before `offset`;
    /// in batches, so the buffer is not shifted for every region.
    fn trim(&mut self, offset: u64) -> io::Result<()> {
        let keep_from = offset.saturating_sub(LOOKBACK);
        let drop = (keep_from.saturating_sub(self.start) as usize).min(self.buf.len());
        // Shifting the buffer costs a copy: only for a whole window's worth,
        // or when nothing stays.
        if drop == 0 || (drop < LOOKBACK as usize && drop < self.buf.len()) {
            return Ok(());
        }
        if let Some(spool) = &mut self.spool {
            spool.keep(self.start, &self.buf[..drop])?;
        }
        self.buf.drain(..drop);
        self.start += drop as u64;
        Ok(())
    }

    /// Moves everything held in memory to the spool (before reading from
    /// it: a region behind the window may reach into the window).
    fn spool_window(&mut self) -> io::Result<()> {
        if let Some(spool) = &mut self.spool {
            spool.keep(self.start, &self.buf)?;
            self.start += self.buf.len() as u64;
            self.buf.clear();
        }
        Ok(())
    }

    /// Reads forward until the stream is at `offset` (or ends), keeping
    /// only the look-back window.
    fn advance_to(&mut self, offset: u64) -> io::Result<()> {
        self.trim(offset)?;
        if self.buf.is_empty() && self.start < offset.saturating_sub(LOOKBACK) {
            // A long gap: skip it in pieces without holding it.
            let mut piece = vec![0u8; PIECE];
            let skip_to = offset - LOOKBACK;
            while self.start < skip_to {
                let want = ((skip_to - self.start) as usize).min(PIECE);
                let n = read_some(self.reader, &mut self.eof, &mut piece[..want])?;
                if n == 0 {
                    return Ok(());
                }
                if let Some(spool) = &mut self.spool {
                    spool.keep(self.start, &piece[..n])?;
                }
                self.start += n as u64;
            }
        }
        while self.end() < offset {
            let want = ((offset - self.end()) as usize).min(PIECE);
            if self.fill(want)? == 0 {
                return Ok(());
            }
            self.trim(offset)?;
        }
        Ok(())
    }

    /// Appends up to `want` bytes from the stream.
    fn fill(&mut self, want: usize) -> io::Result<usize> {
        let have = self.buf.len();
        self.buf.resize(have + want, 0);
        let n = read_some(self.reader, &mut self.eof, &mut self.buf[have..])?;
        self.buf.truncate(have + n);
        Ok(n)
    }

    /// The bytes `offset..offset + len`, or fewer when the stream ends first.
    pub fn fetch(&mut self, offset: u64, len: u64) -> io::Result<&[u8]> {
        self.advance_to(offset)?;
        let end = offset + len;
        self.served_to = self.served_to.max(end);
        while self.end() < end {
            if self.fill((end - self.end()) as usize)? == 0 {
                break;
            }
        }
        if offset >= self.end() {
            return Ok(&[]);
        }
        let from = (offset - self.start) as usize;
        let to = (end.min(self.end()) - self.start) as usize;
        Ok(&self.buf[from..to])
    }

    /// Reads the stream to its end and returns its last `n` bytes that no
    /// region consumed (fewer when the stream ends sooner).
    pub fn tail(&mut self, n: u64) -> io::Result<Vec<u8>> {
        let n = n as usize;
        let unserved = self.served_to.saturating_sub(self.start) as usize;
        let unserved = &self.buf[unserved.min(self.buf.len())..];
        let mut tail = unserved[unserved.len().saturating_sub(n)..].to_vec();
        if n == 0 {
            return Ok(tail);
        }
        let mut piece = vec![0u8; PIECE];
        loop {
            let got = read_some(self.reader, &mut self.eof, &mut piece)?;
            if got == 0 {
                return Ok(tail);
            }
            tail.extend_from_slice(&piece[..got]);
            let excess = tail.len().saturating_sub(n);
            tail.drain(..excess);
        }
    }

    /// Passes `offset..offset + len` to `each` in pieces without holding it;
    /// returns how many bytes the stream had.
    pub fn copy(
        &mut self,
        offset: u64,
        len: u64,
        each: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<u64> {
        self.advance_to(offset)?;
        self.served_to = self.served_to.max(offset + len);
        if self.end() < offset {
            return Ok(0);
        }
        let mut done = 0u64;
        // Bytes already buffered: the look-back window reaches into the region.
        let from = (offset - self.start) as usize;
        let buffered = ((self.buf.len() - from) as u64).min(len) as usize;
        if buffered > 0 {
            each(&self.buf[from..from + buffered])?;
            done += buffered as u64;
        }
        // Data regions are not kept: forget the window and stream past it.
        if let Some(spool) = &mut self.spool {
            spool.keep(self.start, &self.buf[..from])?;
        }
        self.start = offset + done;
        self.buf.drain(..(from + buffered).min(self.buf.len()));
        if !self.buf.is_empty() {
            // The region ended inside the buffer; what follows stays.
            return Ok(done);
        }
        let mut piece = vec![0u8; PIECE];
        while done < len {
            let want = ((len - done) as usize).min(PIECE);
            let n = read_some(self.reader, &mut self.eof, &mut piece[..want])?;
            if n == 0 {
                break;
            }
            each(&piece[..n])?;
            self.start += n as u64;
            done += n as u64;
        }
        Ok(done)
    }
}

fn read_some(reader: &mut dyn Read, eof: &mut bool, buf: &mut [u8]) -> io::Result<usize> {
    if *eof {
        return Ok(0);
    }
    loop {
        match reader.read(buf) {
            Ok(0) => {
                *eof = true;
                return Ok(0);
            }
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Skipped source bytes kept in an unlinked temporary file, for layouts
/// that need data before the metadata that maps it and a source that cannot
/// be read by range.
pub struct Spool {
    file: File,
    /// (source offset, spool offset, length), in source order.
    extents: Vec<(u64, u64, u64)>,
    pub bytes: u64,
}

impl Spool {
    pub fn create() -> Result<Spool> {
        let dir = std::env::temp_dir();
        let path = dir.join(format!(".populator-spool-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| {
                anyhow::Error::new(e).context(format!("creating a spool file in {}", dir.display()))
            })?;
        let _ = std::fs::remove_file(&path);
        Ok(Spool {
            file,
            extents: Vec::new(),
            bytes: 0,
        })
    }

    fn keep(&mut self, source_offset: u64, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.file.write_all_at(data, self.bytes)?;
        match self.extents.last_mut() {
            Some((s, sp, l)) if *s + *l == source_offset && *sp + *l == self.bytes => {
                *l += data.len() as u64
            }
            _ => self
                .extents
                .push((source_offset, self.bytes, data.len() as u64)),
        }
        self.bytes += data.len() as u64;
        Ok(())
    }

    /// Reads `offset..offset + len` back, if it was all kept.
    fn read(
        &self,
        mut offset: u64,
        len: u64,
        each: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<bool> {
        let end = offset + len;
        let mut piece = vec![0u8; PIECE];
        while offset < end {
            let i = self.extents.partition_point(|&(s, _, _)| s <= offset);
            let Some(&(s, sp, l)) = i.checked_sub(1).and_then(|i| self.extents.get(i)) else {
                return Ok(false);
            };
            if offset >= s + l {
                return Ok(false);
            }
            let n = (end.min(s + l) - offset).min(PIECE as u64) as usize;
            self.file.read_exact_at(&mut piece[..n], sp + offset - s)?;
            each(&piece[..n])?;
            offset += n as u64;
        }
        Ok(true)
    }
}

/// The raw output: guest bytes at guest offsets, zero regions for everything
/// never written, progress over produced bytes.
pub struct Output {
    pub writer: VolumeWriter,
    virtual_size: u64,
    progress: Arc<Progress>,
}

impl Output {
    pub fn new(writer: VolumeWriter, virtual_size: u64, progress: Arc<Progress>) -> Self {
        progress.count_output(virtual_size);
        Output {
            writer,
            virtual_size,
            progress,
        }
    }

    /// Writes guest bytes; what lies past the virtual size is dropped (the
    /// last cluster of an image may be partly outside the disk).
    pub fn write_at(&mut self, guest: u64, data: &[u8]) -> io::Result<()> {
        if guest >= self.virtual_size {
            return Ok(());
        }
        let data = &data[..((self.virtual_size - guest) as usize).min(data.len())];
        let position = self.writer.position();
        if guest >= position {
            self.writer.skip_to(guest)?;
            self.writer.write_all(data)?;
            self.progress
                .advance_output(guest + data.len() as u64 - position);
            Ok(())
        } else {
            self.writer.write_at(guest, data)
        }
    }

    /// Zeros up to the virtual size, then flushes; returns the file.
    pub fn finish(mut self) -> io::Result<File> {
        let position = self.writer.position();
        if position < self.virtual_size {
            self.writer.skip_to(self.virtual_size)?;
            self.progress.advance_output(self.virtual_size - position);
        }
        self.writer.finish(true)
    }
}

/// Runs a layout over the source: the forward pass plus ranged or spooled
/// reads for regions behind it.
pub struct Driver<'r, L: Layout> {
    pub layout: L,
    pub plan: Plan<L::Tag>,
    pub cursor: Cursor<'r>,
    pub random: Option<Arc<dyn RandomAccess>>,
    pub stats: Stats,
    options: DiskOptions,
    inflated: Vec<u8>,
}

impl<'r, L: Layout> Driver<'r, L> {
    pub fn new(
        layout: L,
        plan: Plan<L::Tag>,
        cursor: Cursor<'r>,
        random: Option<Arc<dyn RandomAccess>>,
        options: DiskOptions,
    ) -> Self {
        Driver {
            layout,
            plan,
            cursor,
            random,
            stats: Stats::default(),
            options,
            inflated: Vec::new(),
        }
    }

    /// Runs until the header announced the virtual size; `begin` then opens
    /// the output (after the capacity check); then runs to the end.
    pub fn run(mut self, begin: &mut dyn FnMut(u64) -> Result<Output>) -> Result<(Output, Stats)> {
        self.layout.start(&mut self.plan)?;
        let mut output: Option<Output> = None;
        while let Some((offset, region)) = self.plan.pop() {
            if output.is_none() {
                if let Some(size) = self.plan.virtual_size {
                    output = Some(begin(size)?);
                }
            }
            self.serve(offset, region, &mut output)?;
        }
        let trailer = self.cursor.tail(self.layout.trailer_len())?;
        self.layout.finish(&trailer)?;
        let output = match output {
            Some(o) => o,
            None => begin(self.plan.virtual_size.ok_or_else(|| {
                corrupt("the image ended before its header said how large the disk is")
            })?)?,
        };
        if self.stats.conversion.is_none() {
            self.stats.conversion = Some(Conversion::Streamed);
        }
        if let Some(spool) = &self.cursor.spool {
            self.stats.spooled_bytes = spool.bytes;
        }
        Ok((output, self.stats))
    }

    fn serve(
        &mut self,
        offset: u64,
        region: Region<L::Tag>,
        output: &mut Option<Output>,
    ) -> Result<()> {
        let behind = offset < self.cursor.start();
        match region.what {
            Use::Meta(tag) => {
                if region.optional && !behind && self.cursor.fetch(offset, 1)?.is_empty() {
                    return Ok(());
                }
                let data = self.bytes(offset, region.len, behind, "metadata")?;
                self.layout.on_meta(tag, offset, &data, &mut self.plan)
            }
            Use::Compressed {
                guest,
                out_len,
                codec,
            } => {
                let unit = self.plan.unit;
                let data = self.bytes(offset, region.len, behind, unit)?;
                let out = output.as_mut().ok_or_else(no_header)?;
                // A cluster clipped at the end of the file: a cut file shows
                // up here as data that does not decompress.
                let at_end = self.plan.source_len == Some(offset + region.len);
                inflate(codec, &data, out_len, &mut self.inflated).map_err(|e| {
                    corrupt(format!(
                        "the compressed {} at byte {offset} (guest offset {guest}) does not decompress: {e}{}",
                        self.plan.unit,
                        if at_end { " (it reaches the end of the file: the image is truncated)" } else { "" }
                    ))
                })?;
                out.write_at(guest, &self.inflated)?;
                Ok(())
            }
            Use::Data { guest } => {
                let out = output.as_mut().ok_or_else(no_header)?;
                let mut at = guest;
                let mut each = |piece: &[u8]| -> Result<()> {
                    out.write_at(at, piece)?;
                    at += piece.len() as u64;
                    Ok(())
                };
                let got = if behind {
                    self.read_behind(offset, region.len, &mut each)?;
                    region.len
                } else {
                    self.cursor.copy(offset, region.len, &mut each)?
                };
                if got < region.len {
                    return Err(truncated(offset + got, self.plan.unit));
                }
                Ok(())
            }
        }
    }

    /// A small region's bytes, from the stream or from behind it.
    fn bytes(&mut self, offset: u64, len: u64, behind: bool, what: &str) -> Result<Vec<u8>> {
        if behind {
            let mut data = Vec::with_capacity(len as usize);
            self.read_behind(offset, len, &mut |p| {
                data.extend_from_slice(p);
                Ok(())
            })?;
            return Ok(data);
        }
        let data = self.cursor.fetch(offset, len)?;
        if (data.len() as u64) < len {
            return Err(truncated(offset + data.len() as u64, what));
        }
        Ok(data.to_vec())
    }

    /// Reads a region the forward pass has already passed: from the spool,
    /// else by range request, else starts over with spooling on.
    fn read_behind(
        &mut self,
        offset: u64,
        len: u64,
        each: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        self.cursor.spool_window()?;
        if let Some(spool) = &self.cursor.spool {
            if spool.read(offset, len, each)? {
                self.stats.conversion = Some(Conversion::Spooled);
                return Ok(());
            }
            return Err(corrupt(format!(
                "the image needs bytes {offset}..{} again, after they were used for something else: a {} referenced twice or corrupt tables",
                offset + len,
                self.plan.unit
            )));
        }
        if let Some(random) = self.random.clone() {
            match random.read_at(offset, len, each) {
                Ok(()) => {
                    self.stats.conversion = Some(Conversion::Ranged);
                    self.stats.range_requests += 1;
                    return Ok(());
                }
                Err(e) if super::is_ranges_unsupported(&e) => self.random = None,
                Err(e) => return Err(e),
            }
        }
        self.options
            .spool
            .store(true, std::sync::atomic::Ordering::SeqCst);
        Err(crate::pipeline::restart(format!(
            "the image stores metadata after the data it maps (byte {offset} is needed again) and the source cannot be read by range: starting over, keeping skipped bytes in a temporary file"
        )))
    }
}

fn no_header() -> anyhow::Error {
    corrupt("the image has data before its header said how large the disk is")
}

fn truncated(at: u64, what: &str) -> anyhow::Error {
    corrupt(format!(
        "the image is truncated: the {what} at byte {at} is missing (the file ends before its tables say)"
    ))
}

/// Inflates one compressed cluster into exactly `out_len` bytes.
fn inflate(codec: Codec, input: &[u8], out_len: u64, out: &mut Vec<u8>) -> io::Result<()> {
    out.clear();
    out.resize(out_len as usize, 0);
    let produced = match codec {
        Codec::Deflate | Codec::Zlib => {
            let mut d = flate2::Decompress::new(codec == Codec::Zlib);
            d.decompress(input, out, flate2::FlushDecompress::Finish)
                .map_err(io::Error::other)?;
            d.total_out() as usize
        }
        Codec::Zstd => {
            let mut d = zstd::stream::read::Decoder::with_buffer(input)?.single_frame();
            let mut filled = 0;
            while filled < out.len() {
                let n = d.read(&mut out[filled..])?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            filled
        }
    };
    if produced != out.len() {
        return Err(io::Error::other(format!(
            "it holds {produced} bytes instead of {out_len}"
        )));
    }
    Ok(())
}

/// Big-endian and little-endian field readers that never panic: a short
/// slice reads as zeros (the callers check lengths first).
pub fn be32(d: &[u8], at: usize) -> u32 {
    d.get(at..at + 4)
        .map(|b| u32::from_be_bytes(b.try_into().unwrap()))
        .unwrap_or(0)
}

pub fn be64(d: &[u8], at: usize) -> u64 {
    d.get(at..at + 8)
        .map(|b| u64::from_be_bytes(b.try_into().unwrap()))
        .unwrap_or(0)
}

pub fn le16(d: &[u8], at: usize) -> u16 {
    d.get(at..at + 2)
        .map(|b| u16::from_le_bytes(b.try_into().unwrap()))
        .unwrap_or(0)
}

pub fn le32(d: &[u8], at: usize) -> u32 {
    d.get(at..at + 4)
        .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
        .unwrap_or(0)
}

pub fn le64(d: &[u8], at: usize) -> u64 {
    d.get(at..at + 8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
        .unwrap_or(0)
}
