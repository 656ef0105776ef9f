//! vmdk, hosted sparse extents in one file: monolithicSparse (grain
//! directory → grain tables → grains) and streamOptimized (compressed grains,
//! each behind a marker that names its guest sector, so the stream is read
//! marker by marker and the tables at the end are not needed). Split,
//! flat and multi-extent images live in several files and are refused, as
//! are differencing images (a parent).

use anyhow::Result;

use super::stream::{le16, le32, le64, Codec, Layout, Plan};
use super::{corrupt, unsupported};

const SECTOR: u64 = 512;
const FLAG_COMPRESSED: u32 = 1 << 16;
const FLAG_MARKERS: u32 = 1 << 17;
const MARKER_EOS: u32 = 0;
/// Bytes of a marker read ahead of its data: lba (8), size (4), type (4).
const MARKER_READ: u64 = 16;
const MAX_DESCRIPTOR: u64 = 1 << 20;

#[derive(Clone, Debug)]
pub enum Tag {
    Header,
    Descriptor,
    Directory,
    Table { guest_base: u64 },
    Marker,
}

#[derive(Default)]
pub struct Vmdk {
    capacity: u64,
    grain: u64,
    gtes_per_gt: u64,
    streamed: bool,
    /// streamOptimized: how the end of the stream is proven. VMware ends
    /// it with an end-of-stream marker; qemu writes none, but its grain
    /// tables come first, so the last grain they map must be reached.
    end_of_stream: bool,
    tables_ahead: bool,
    last_mapped_grain: Option<u64>,
    last_grain_read: Option<u64>,
}

impl Vmdk {
    fn parse_header(&mut self, h: &[u8], plan: &mut Plan<Tag>) -> Result<()> {
        let version = le32(h, 4);
        if !(1..=3).contains(&version) {
            return Err(unsupported(format!(
                "vmdk sparse extent version {version} is not supported"
            )));
        }
        let flags = le32(h, 8);
        let sectors = le64(h, 12);
        let grain_sectors = le64(h, 20);
        let descriptor_offset = le64(h, 28);
        let descriptor_size = le64(h, 36);
        self.gtes_per_gt = le32(h, 44) as u64;
        let gd_offset = le64(h, 56);
        let overhead = le64(h, 64);
        if sectors > (1 << 47) {
            return Err(corrupt(format!(
                "the vmdk capacity of {sectors} sectors is absurd"
            )));
        }
        if !grain_sectors.is_power_of_two() || !(8..=1 << 16).contains(&grain_sectors) {
            return Err(corrupt(format!(
                "the vmdk grain size of {grain_sectors} sectors is invalid"
            )));
        }
        self.capacity = sectors * SECTOR;
        self.grain = grain_sectors * SECTOR;
        plan.virtual_size = Some(self.capacity);
        if descriptor_offset > 0 {
            let len = descriptor_size.saturating_mul(SECTOR);
            if len > MAX_DESCRIPTOR {
                return Err(corrupt(format!(
                    "the vmdk descriptor of {len} bytes is absurdly large"
                )));
            }
            plan.meta(
                descriptor_offset.saturating_mul(SECTOR),
                len,
                Tag::Descriptor,
                "vmdk descriptor",
            )?;
        }
        self.streamed = flags & FLAG_MARKERS != 0;
        let grains = sectors.div_ceil(grain_sectors);
        if self.streamed {
            if flags & FLAG_COMPRESSED == 0 || le16(h, 77) != 1 {
                return Err(unsupported(
                    "the vmdk has grain markers but no deflate compression; only streamOptimized (deflate) is supported",
                ));
            }
            // Tables ahead of the first grain (qemu's layout) are read to
            // learn where the last grain is; tables at the end (VMware's,
            // gd_offset = GD_AT_END) are not needed.
            if gd_offset > 0 && gd_offset < overhead {
                self.check_table_size()?;
                self.tables_ahead = true;
                plan.meta(
                    gd_offset * SECTOR,
                    grains.div_ceil(self.gtes_per_gt) * 4,
                    Tag::Directory,
                    "grain directory",
                )?;
            }
            return plan.marker(
                overhead.saturating_mul(SECTOR),
                MARKER_READ,
                Tag::Marker,
                "grain marker",
            );
        }
        if flags & FLAG_COMPRESSED != 0 {
            return Err(unsupported(
                "compressed vmdk grains without markers are not supported; use streamOptimized",
            ));
        }
        self.check_table_size()?;
        plan.meta(
            gd_offset.saturating_mul(SECTOR),
            grains.div_ceil(self.gtes_per_gt) * 4,
            Tag::Directory,
            "grain directory",
        )
    }

    fn check_table_size(&self) -> Result<()> {
        if !(1..=1 << 16).contains(&self.gtes_per_gt) {
            return Err(corrupt(format!(
                "the vmdk has {} entries per grain table",
                self.gtes_per_gt
            )));
        }
        Ok(())
    }

    fn parse_descriptor(&self, d: &[u8]) -> Result<()> {
        let text = String::from_utf8_lossy(d);
        let text = text.trim_end_matches('\0');
        let mut extents = 0;
        for line in text.lines().map(str::trim) {
            if let Some(v) = value_of(line, "createType") {
                if v != "monolithicSparse" && v != "streamOptimized" {
                    return Err(unsupported(format!(
                        "vmdk createType {v} keeps its data in other files (split or flat extents); only monolithicSparse and streamOptimized are supported"
                    )));
                }
            }
            if let Some(v) = value_of(line, "parentCID") {
                if !v.eq_ignore_ascii_case("ffffffff") {
                    return Err(unsupported(
                        "the vmdk is a differencing image with a parent (backing file); convert it to a standalone image first",
                    ));
                }
            }
            if ["RW ", "RDONLY ", "NOACCESS "]
                .iter()
                .any(|p| line.starts_with(p))
            {
                extents += 1;
            }
        }
        if extents > 1 {
            return Err(unsupported(format!(
                "the vmdk has {extents} extents (multi-extent or split); only single-extent images are supported"
            )));
        }
        Ok(())
    }

    fn parse_directory(&self, d: &[u8], plan: &mut Plan<Tag>) -> Result<()> {
        for (i, e) in d.chunks_exact(4).enumerate() {
            let sector = le32(e, 0) as u64;
            if sector == 0 {
                continue;
            }
            let guest_base = i as u64 * self.gtes_per_gt * self.grain;
            plan.meta(
                sector * SECTOR,
                self.gtes_per_gt * 4,
                Tag::Table { guest_base },
                "grain table",
            )?;
        }
        Ok(())
    }

    fn parse_table(&mut self, guest_base: u64, d: &[u8], plan: &mut Plan<Tag>) -> Result<()> {
        for (i, e) in d.chunks_exact(4).enumerate() {
            let sector = le32(e, 0) as u64;
            let guest = guest_base + i as u64 * self.grain;
            // 0: never written; 1: a zeroed grain.
            if sector <= 1 || guest >= self.capacity {
                continue;
            }
            if self.streamed {
                // The grain's marker: its data comes from the marker chain.
                self.last_mapped_grain = self.last_mapped_grain.max(Some(sector * SECTOR));
                continue;
            }
            plan.data(sector * SECTOR, self.grain, guest)?;
        }
        Ok(())
    }

    /// A streamOptimized marker: a grain (its guest sector and compressed
    /// size) or a metadata block to skip; schedules the next marker.
    fn parse_marker(&mut self, offset: u64, m: &[u8], plan: &mut Plan<Tag>) -> Result<()> {
        let value = le64(m, 0);
        let size = le32(m, 8) as u64;
        if size > 0 {
            let guest = value.checked_mul(SECTOR).filter(|&g| g < self.capacity).ok_or_else(|| {
                corrupt(format!(
                    "the grain marker at byte {offset} names sector {value}, outside the {}-byte disk",
                    self.capacity
                ))
            })?;
            plan.compressed(offset + 12, size, guest, self.grain, Codec::Zlib)?;
            self.last_grain_read = self.last_grain_read.max(Some(offset));
            let next = (offset + 12 + size).div_ceil(SECTOR) * SECTOR;
            return plan.marker(next, MARKER_READ, Tag::Marker, "grain marker");
        }
        if le32(m, 12) == MARKER_EOS {
            self.end_of_stream = true;
            return Ok(());
        }
        let skip = value
            .checked_mul(SECTOR)
            .filter(|&s| s <= 1 << 40)
            .ok_or_else(|| {
                corrupt(format!(
                    "the metadata marker at byte {offset} spans an absurd {value} sectors"
                ))
            })?;
        plan.marker(
            offset + SECTOR + skip,
            MARKER_READ,
            Tag::Marker,
            "grain marker",
        )
    }
}

fn value_of<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let rest = line.strip_prefix(key)?.trim_start().strip_prefix('=')?;
    Some(rest.trim().trim_matches('"'))
}

impl Layout for Vmdk {
    type Tag = Tag;

    fn start(&mut self, plan: &mut Plan<Tag>) -> Result<()> {
        plan.meta(0, SECTOR, Tag::Header, "vmdk header")
    }

    fn on_meta(&mut self, tag: Tag, offset: u64, data: &[u8], plan: &mut Plan<Tag>) -> Result<()> {
        match tag {
            Tag::Header => self.parse_header(data, plan),
            Tag::Descriptor => self.parse_descriptor(data),
            Tag::Directory => self.parse_directory(data, plan),
            Tag::Table { guest_base } => self.parse_table(guest_base, data, plan),
            Tag::Marker => self.parse_marker(offset, data, plan),
        }
    }

    /// A streamOptimized image has no tables to say where its data ends:
    /// only the end-of-stream marker proves that no grain is missing.
    fn finish(&mut self, _trailer: &[u8]) -> Result<()> {
        if !self.streamed || self.end_of_stream {
            return Ok(());
        }
        if !self.tables_ahead {
            return Err(corrupt(
                "the streamOptimized vmdk ends before its end-of-stream marker: the image is truncated (download it again, or check the file on the server)",
            ));
        }
        match self.last_mapped_grain {
            Some(last) if self.last_grain_read < Some(last) => Err(corrupt(format!(
                "the streamOptimized vmdk ends before the grain at byte {last} that its grain tables map: the image is truncated (download it again, or check the file on the server)"
            ))),
            _ => Ok(()),
        }
    }
}
