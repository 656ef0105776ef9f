//! `--content disk`: VM disk images (qcow2, vmdk, vhd, vhdx) converted to
//! raw while they stream in, with no scratch space; anything else (raw, ISO)
//! is written as it is. The format is recognised by magic bytes, after
//! decompression, so `.qcow2.xz` and `.vmdk.gz` work too.
//!
//! Why hand-written parsers: the Rust crates that read these formats
//! (`imago`, `qcow2-rs`, `vhdx`, `vmdk`) are random-access readers — they
//! open a file or an async block device and seek to the tables — and most
//! are async and tied to one runtime. A download is a forward-only stream,
//! possibly compressed, so they would need the whole image on disk first,
//! which is exactly the scratch space this converter avoids. The parsers
//! here only parse headers and tables from bounded byte slices (no I/O, no
//! unchecked arithmetic, every size validated before it is used) and
//! [`stream`] serves them the bytes they ask for in file order; see that
//! module for ranged and spooled reads when a layout is out of order.

mod qcow2;
pub mod stream;
mod vhd;
mod vhdx;
mod vmdk;

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context as _, Result};

use crate::content::{ContentSpec, Sink, StreamInfo};
use crate::decompress::Compression;
use crate::error::{classify, fail, Kind};
use crate::progress::Progress;
use crate::target::{human_bytes, Target, TargetKind};
use crate::worker::Context;
use crate::writer::{VolumeWriter, ZeroMode};
use stream::{Cursor, Driver, Layout, Output, Plan, Spool, Stats};

/// The image's name in a directory target (as KubeVirt expects it).
pub const DISK_FILE_NAME: &str = "disk.img";

/// Random access to the source bytes as published (an HTTP server that
/// answers Range requests).
pub trait RandomAccess: Send + Sync + fmt::Debug {
    /// Passes `offset..offset + len` to `each` in pieces. Fails with
    /// [`ranges_unsupported`] when the source cannot do it.
    fn read_at(
        &self,
        offset: u64,
        len: u64,
        each: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<()>;
}

/// The error a [`RandomAccess`] returns when the source refuses ranges.
pub fn ranges_unsupported(what: impl Into<String>) -> anyhow::Error {
    fail(Kind::Transient, "RangesUnsupported", what)
}

fn is_ranges_unsupported(err: &anyhow::Error) -> bool {
    classify(err).reason == "RangesUnsupported"
}

/// Disk-mode settings.
#[derive(Clone, Debug)]
pub struct DiskOptions {
    pub grow: bool,
    pub filesystem_overhead: f64,
    /// Range reads of the source, for layouts that are out of order.
    pub random_access: Option<Arc<dyn RandomAccess>>,
    /// Set (and kept across pipeline restarts) when the source must be
    /// spooled: an out-of-order layout and no range support.
    pub spool: Arc<AtomicBool>,
}

impl Default for DiskOptions {
    fn default() -> Self {
        DiskOptions {
            grow: false,
            filesystem_overhead: 0.06,
            random_access: None,
            spool: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// Corrupt or hostile image data: exit 3.
pub(crate) fn corrupt(message: impl Into<String>) -> anyhow::Error {
    fail(Kind::Integrity, "CorruptImage", message)
}

/// A feature this converter refuses: exit 3, naming it.
pub(crate) fn unsupported(message: impl Into<String>) -> anyhow::Error {
    fail(Kind::Integrity, "UnsupportedImage", message)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
    Vmdk,
    Vhd,
    Vhdx,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vmdk => "vmdk",
            Format::Vhd => "vhd",
            Format::Vhdx => "vhdx",
        }
    }

    /// Recognises an image from its first bytes. A fixed VHD has no header
    /// (only a footer), so it starts out as raw.
    pub fn detect(magic: &[u8]) -> Result<Format> {
        if magic.starts_with(b"QFI\xfb") {
            return Ok(Format::Qcow2);
        }
        if magic.starts_with(b"KDMV") {
            return Ok(Format::Vmdk);
        }
        if magic.starts_with(b"conectix") {
            return Ok(Format::Vhd);
        }
        if magic.starts_with(b"vhdxfile") {
            return Ok(Format::Vhdx);
        }
        if magic.starts_with(b"# Disk DescriptorFile") {
            return Err(unsupported(
                "this is a vmdk descriptor whose data lives in other files (split, flat or multi-extent vmdk); convert it to one monolithicSparse or streamOptimized file first (qemu-img convert -O vmdk)",
            ));
        }
        if magic.starts_with(b"COWD") {
            return Err(unsupported(
                "this is a VMware ESX sparse (COWD) vmdk, which is not supported; convert it with qemu-img convert -O vmdk",
            ));
        }
        Ok(Format::Raw)
    }
}

/// Reads up to `n` first bytes, then hands them back ahead of the rest.
fn peek(reader: &mut dyn Read, n: usize) -> io::Result<Vec<u8>> {
    let mut head = vec![0u8; n];
    let mut filled = 0;
    while filled < n {
        match reader.read(&mut head[filled..]) {
            Ok(0) => break,
            Ok(k) => filled += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    head.truncate(filled);
    Ok(head)
}

/// `disk` content: the converted image on the device, in an image file, or
/// as `disk.img` in a directory target.
pub struct DiskSink {
    kind: TargetKind,
    final_path: PathBuf,
    write_path: PathBuf,
    created: bool,
    target: Target,
    file: Option<File>,
    written: Option<File>,
    progress: Arc<Progress>,
    options: DiskOptions,
    owner: Option<(u32, u32)>,
    details: serde_json::Map<String, serde_json::Value>,
    virtual_size: u64,
}

impl DiskSink {
    pub fn open(target: &Target, spec: &ContentSpec, ctx: &Context) -> Result<DiskSink> {
        let (final_path, write_path) = match target.kind {
            TargetKind::Filesystem => (
                target.path.join(&spec.file_name),
                target
                    .path
                    .join(format!(".{}.populator-partial", spec.file_name)),
            ),
            _ => (target.path.clone(), target.path.clone()),
        };
        let existed = write_path.exists();
        let file = match target.kind {
            TargetKind::Block => OpenOptions::new().write(true).open(&write_path),
            _ => OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&write_path),
        }
        .with_context(|| format!("opening {} for writing", write_path.display()))?;
        Ok(DiskSink {
            kind: target.kind,
            created: !existed || target.kind == TargetKind::Filesystem,
            final_path,
            write_path,
            target: target.clone(),
            file: Some(file),
            written: None,
            progress: ctx.progress.clone(),
            options: spec.disk.clone(),
            owner: spec.extract.owner,
            details: serde_json::Map::new(),
            virtual_size: 0,
        })
    }

    fn volume_writer(&mut self) -> VolumeWriter {
        let mode = if self.kind == TargetKind::Block {
            ZeroMode::ZeroOut
        } else {
            ZeroMode::Holes
        };
        let file = self.file.take().expect("write_stream runs once");
        VolumeWriter::new(
            file,
            mode,
            self.target.capacity,
            format!("target {}", self.target.path.display()),
        )
        .with_progress(self.progress.clone())
    }

    /// Opens the output once the virtual size is known, after checking it
    /// against the capacity (nothing is written before).
    fn begin(&mut self, format: Format, virtual_size: u64) -> Result<Output> {
        self.details
            .insert("virtualSize".into(), virtual_size.into());
        self.target.check_fits(
            virtual_size,
            &format!("the {} image's virtual size", format.name()),
        )?;
        self.virtual_size = virtual_size;
        crate::log::info(format!(
            "converting a {} image of {} (virtual size) to raw",
            format.name(),
            human_bytes(virtual_size)
        ));
        let writer = self.volume_writer();
        Ok(Output::new(writer, virtual_size, self.progress.clone()))
    }

    fn convert<L: Layout>(
        &mut self,
        format: Format,
        layout: L,
        reader: &mut dyn Read,
        info: &StreamInfo,
    ) -> Result<()> {
        let spool = if self.options.spool.load(Ordering::SeqCst) {
            Some(Spool::create()?)
        } else {
            None
        };
        // Ranges address the bytes as published, which are these bytes only
        // when nothing was decompressed.
        let random = match info.compression {
            Compression::None => self.options.random_access.clone(),
            _ => None,
        };
        let source_len = match info.compression {
            Compression::None => info.declared_size,
            _ => None,
        };
        let plan = Plan::new(source_len, unit_name(format));
        let driver = Driver::new(
            layout,
            plan,
            Cursor::new(reader, spool),
            random,
            self.options.clone(),
        );
        let (output, stats) = driver.run(&mut |size| self.begin(format, size))?;
        self.record(&stats);
        self.written = Some(output.finish()?);
        Ok(())
    }

    fn record(&mut self, stats: &Stats) {
        let conversion = stats.conversion.map(|c| c.name()).unwrap_or("streamed");
        self.details.insert("conversion".into(), conversion.into());
        if stats.range_requests > 0 {
            self.details
                .insert("rangeRequests".into(), stats.range_requests.into());
        }
        if self.options.spool.load(Ordering::SeqCst) {
            self.details
                .insert("spooledBytes".into(), stats.spooled_bytes.into());
        }
    }

    /// Raw data (and fixed VHD, recognised by its footer at the end).
    fn copy_raw(&mut self, reader: &mut dyn Read, info: &StreamInfo) -> Result<()> {
        if let (Compression::None, Some(size)) = (info.compression, info.declared_size) {
            self.target.check_fits(
                size.saturating_sub(vhd::FOOTER_SIZE as u64),
                "the raw image",
            )?;
        }
        let mut writer = self.volume_writer();
        let outcome = vhd::copy_raw_or_fixed(reader, &mut writer)?;
        self.details
            .insert("format".into(), outcome.format.name().into());
        self.details
            .insert("virtualSize".into(), outcome.virtual_size.into());
        self.details.insert("conversion".into(), "streamed".into());
        self.virtual_size = outcome.virtual_size;
        let file = writer.finish(true)?;
        if self.kind != TargetKind::Block && file.metadata()?.len() > outcome.virtual_size {
            file.set_len(outcome.virtual_size)?;
        }
        self.written = Some(file);
        Ok(())
    }

    /// `--grow`: a `disk.img` in a directory target is extended (sparsely)
    /// to the space the volume had, minus the filesystem overhead.
    fn grow(&mut self, file: &File) -> Result<()> {
        if !self.options.grow || self.kind != TargetKind::Filesystem {
            return Ok(());
        }
        let Some(capacity) = self.target.capacity else {
            return Ok(());
        };
        let usable = (capacity as f64 * (1.0 - self.options.filesystem_overhead)) as u64;
        let grown = usable & !((1 << 20) - 1);
        if grown > self.virtual_size {
            file.set_len(grown).with_context(|| {
                format!("growing {} to {grown} bytes", self.write_path.display())
            })?;
            self.details.insert("grownTo".into(), grown.into());
        }
        Ok(())
    }
}

fn unit_name(format: Format) -> &'static str {
    match format {
        Format::Qcow2 => "cluster",
        Format::Vmdk => "grain",
        Format::Vhd | Format::Vhdx => "block",
        Format::Raw => "region",
    }
}

impl Sink for DiskSink {
    fn write_stream(&mut self, reader: &mut dyn Read, info: &StreamInfo) -> Result<()> {
        let head = peek(reader, 512)?;
        let format = Format::detect(&head)?;
        self.details.insert("format".into(), format.name().into());
        let mut whole = io::Cursor::new(head).chain(reader);
        match format {
            Format::Raw => self.copy_raw(&mut whole, info),
            Format::Qcow2 => self.convert(format, qcow2::Qcow2::default(), &mut whole, info),
            Format::Vmdk => self.convert(format, vmdk::Vmdk::default(), &mut whole, info),
            Format::Vhd => self.convert(format, vhd::Vhd::default(), &mut whole, info),
            Format::Vhdx => self.convert(format, vhdx::Vhdx::default(), &mut whole, info),
        }
    }

    fn commit(&mut self) -> Result<()> {
        let file = self.written.take().expect("commit after write_stream");
        self.grow(&file)?;
        if self.kind == TargetKind::Block {
            return Ok(());
        }
        file.sync_all()
            .with_context(|| format!("flushing {}", self.write_path.display()))?;
        crate::content::place_file(
            &file,
            self.owner,
            &self.write_path,
            &self.final_path,
            &self.target.path,
        )
    }

    fn abort(&mut self) {
        self.file = None;
        self.written = None;
        if self.created && self.kind != TargetKind::Block {
            let _ = fs::remove_file(&self.write_path);
        }
    }

    fn details(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = self.details.clone();
        m.insert("path".into(), self.final_path.display().to_string().into());
        m
    }
}

/// Converts an in-memory image of a known format onto `/dev/null` with a
/// capacity of `capacity` bytes: the entry point of the fuzz targets (and a
/// quick way to check a parser on hostile bytes). No ranges, no spooling.
pub fn convert_bytes(format: Format, data: &[u8], capacity: u64) -> Result<()> {
    let null = Target {
        path: PathBuf::from("/dev/null"),
        kind: TargetKind::Block,
        capacity: Some(capacity),
    };
    convert_slice(format, data, &null, true)
}

/// [`convert_bytes`], with or without the length declared (as a server
/// declares it, or as a decompressed stream does not).
fn convert_slice(format: Format, data: &[u8], target: &Target, declared: bool) -> Result<()> {
    let ctx = Context::new(crate::cancel::CancelToken::default());
    let spec = ContentSpec::default();
    let mut sink = DiskSink::open(target, &spec, &ctx)?;
    let info = StreamInfo {
        compression: Compression::None,
        declared_size: declared.then_some(data.len() as u64),
    };
    let mut reader = data;
    match format {
        Format::Raw => sink.copy_raw(&mut reader, &info),
        Format::Qcow2 => sink.convert(format, qcow2::Qcow2::default(), &mut reader, &info),
        Format::Vmdk => sink.convert(format, vmdk::Vmdk::default(), &mut reader, &info),
        Format::Vhd => sink.convert(format, vhd::Vhd::default(), &mut reader, &info),
        Format::Vhdx => sink.convert(format, vhdx::Vhdx::default(), &mut reader, &info),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_formats_by_magic() {
        assert_eq!(Format::detect(b"QFI\xfb\0\0\0\x03").unwrap(), Format::Qcow2);
        assert_eq!(Format::detect(b"KDMV\x01").unwrap(), Format::Vmdk);
        assert_eq!(Format::detect(b"conectix").unwrap(), Format::Vhd);
        assert_eq!(Format::detect(b"vhdxfile").unwrap(), Format::Vhdx);
        assert_eq!(Format::detect(b"CD001 iso").unwrap(), Format::Raw);
        let split = Format::detect(b"# Disk DescriptorFile\nversion=1").unwrap_err();
        assert_eq!(classify(&split).reason, "UnsupportedImage");
    }

    /// Hostile headers fail with exit 3, quickly and without allocating
    /// what they claim.
    #[test]
    fn hostile_headers_fail_cleanly() {
        let mut q = vec![0u8; 4096];
        q[..4].copy_from_slice(b"QFI\xfb");
        q[4..8].copy_from_slice(&3u32.to_be_bytes());
        q[20..24].copy_from_slice(&16u32.to_be_bytes());
        q[24..32].copy_from_slice(&(1u64 << 62).to_be_bytes());
        let err = convert_bytes(Format::Qcow2, &q, 1 << 20).unwrap_err();
        assert_eq!(classify(&err).kind, Kind::Integrity, "{err:#}");
        // A plausible size, an L1 table far past the end of the data.
        q[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes());
        q[36..40].copy_from_slice(&1u32.to_be_bytes());
        q[40..48].copy_from_slice(&(1u64 << 40).to_be_bytes());
        let err = convert_bytes(Format::Qcow2, &q, 1 << 20).unwrap_err();
        assert!(format!("{err:#}").contains("past the end"), "{err:#}");
        // Found by fuzzing: a descriptor offset whose byte offset overflows.
        let mut v = vec![0u8; 512];
        v[..4].copy_from_slice(b"KDMV");
        v[4..8].copy_from_slice(&1u32.to_le_bytes());
        v[12..20].copy_from_slice(&2048u64.to_le_bytes());
        v[20..28].copy_from_slice(&128u64.to_le_bytes());
        v[28..36].copy_from_slice(&(u64::MAX / 3).to_le_bytes());
        v[36..44].copy_from_slice(&1u64.to_le_bytes());
        let err = convert_bytes(Format::Vmdk, &v, 1 << 20).unwrap_err();
        assert!(format!("{err:#}").contains("impossible size"), "{err:#}");
        for format in [Format::Vmdk, Format::Vhd, Format::Vhdx] {
            assert!(convert_bytes(format, &[0xff; 100], 1 << 20).is_err());
        }
    }

    /// A one-grain streamOptimized vmdk (64 KiB disk) and where its
    /// end-of-stream marker starts.
    fn stream_vmdk() -> (Vec<u8>, usize) {
        use std::io::Write as _;
        let mut h = vec![0u8; 512];
        h[..4].copy_from_slice(b"KDMV");
        h[4..8].copy_from_slice(&3u32.to_le_bytes());
        h[8..12].copy_from_slice(&(1u32 << 16 | 1 << 17).to_le_bytes());
        h[12..20].copy_from_slice(&128u64.to_le_bytes());
        h[20..28].copy_from_slice(&128u64.to_le_bytes());
        h[64..72].copy_from_slice(&1u64.to_le_bytes());
        h[77..79].copy_from_slice(&1u16.to_le_bytes());
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        z.write_all(&[0x5a; 64 << 10]).unwrap();
        let grain = z.finish().unwrap();
        let mut image = h;
        image.extend_from_slice(&0u64.to_le_bytes());
        image.extend_from_slice(&(grain.len() as u32).to_le_bytes());
        image.extend_from_slice(&grain);
        image.resize(image.len().div_ceil(512) * 512, 0);
        let eos = image.len();
        image.resize(eos + 512, 0);
        (image, eos)
    }

    /// A dynamic vhd of 8 KiB in 4 KiB blocks, the first allocated, and
    /// where its trailing footer starts.
    fn dynamic_vhd() -> (Vec<u8>, usize) {
        let mut footer = vec![0u8; 512];
        footer[..8].copy_from_slice(b"conectix");
        footer[16..24].copy_from_slice(&512u64.to_be_bytes());
        footer[28..32].copy_from_slice(b"qem2");
        footer[48..56].copy_from_slice(&8192u64.to_be_bytes());
        footer[60..64].copy_from_slice(&3u32.to_be_bytes());
        let mut image = footer.clone();
        let mut dynamic = vec![0u8; 1024];
        dynamic[..8].copy_from_slice(b"cxsparse");
        dynamic[16..24].copy_from_slice(&1536u64.to_be_bytes());
        dynamic[28..32].copy_from_slice(&2u32.to_be_bytes());
        dynamic[32..36].copy_from_slice(&4096u32.to_be_bytes());
        image.extend_from_slice(&dynamic);
        let mut bat = vec![0xffu8; 512];
        bat[..4].copy_from_slice(&4u32.to_be_bytes());
        image.extend_from_slice(&bat);
        image.extend_from_slice(&[0xff; 512]); // the block's sector bitmap
        image.extend_from_slice(&[0x5a; 4096]);
        let at = image.len();
        image.extend_from_slice(&footer);
        (image, at)
    }

    /// An image file in the temporary directory (a successful conversion
    /// flushes, which /dev/null refuses).
    fn image_file(name: &str) -> Target {
        Target {
            path: std::env::temp_dir().join(format!("populator-{}-{name}", std::process::id())),
            kind: TargetKind::File,
            capacity: Some(1 << 20),
        }
    }

    fn convert_ok(format: Format, data: &[u8], declared: bool) {
        let target = image_file(format.name());
        let converted = convert_slice(format, data, &target, declared);
        let _ = fs::remove_file(&target.path);
        converted.unwrap();
    }

    fn failure(format: Format, data: &[u8], declared: bool) -> String {
        let target = image_file("bad");
        let converted = convert_slice(format, data, &target, declared);
        let _ = fs::remove_file(&target.path);
        let err = converted.unwrap_err();
        assert_eq!(classify(&err).kind, Kind::Integrity, "{err:#}");
        format!("{err:#}")
    }

    /// A stream cut at any point fails (exit 3), whether the server
    /// declared its length or it arrived decompressed without one; it never
    /// succeeds with the rest of the disk read as zeros.
    #[test]
    fn truncated_streams_fail_at_any_cut() {
        for declared in [true, false] {
            let (vmdk, eos) = stream_vmdk();
            convert_ok(Format::Vmdk, &vmdk, declared);
            let msg = failure(Format::Vmdk, &vmdk[..eos], declared);
            assert!(msg.contains("before its end-of-stream marker"), "{msg}");
            for cut in [520, 600, eos - 100, eos + 8] {
                let msg = failure(Format::Vmdk, &vmdk[..cut], declared);
                assert!(msg.contains("truncated"), "cut at {cut}: {msg}");
            }
            let (vhd, footer) = dynamic_vhd();
            convert_ok(Format::Vhd, &vhd, declared);
            for cut in [footer, footer + 100, footer + 511] {
                let msg = failure(Format::Vhd, &vhd[..cut], declared);
                assert!(
                    msg.contains("ends before its footer"),
                    "cut at {cut}: {msg}"
                );
            }
            for cut in [700, 1600, 2600, footer - 1] {
                let msg = failure(Format::Vhd, &vhd[..cut], declared);
                assert!(msg.contains("truncated"), "cut at {cut}: {msg}");
            }
        }
    }
}
