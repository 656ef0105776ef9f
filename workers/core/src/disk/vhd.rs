//! vhd (Virtual PC): dynamic disks (footer copy → dynamic header → block
//! allocation table → blocks, each a sector bitmap and its data) and fixed
//! disks (raw data followed by a 512-byte footer, recognised at the end of a
//! raw stream). Differencing disks need their parent and are refused. The
//! disk size follows qemu's rule: CHS geometry for images made by Virtual
//! PC or qemu's `vpc` driver, the footer's current size otherwise.

use std::io::{self, Read, Write};

use anyhow::Result;

use super::stream::{be32, be64, Layout, Plan};
use super::{corrupt, unsupported, Format};
use crate::writer::VolumeWriter;

pub const FOOTER_SIZE: usize = 512;
const SECTOR: u64 = 512;
const DISK_FIXED: u32 = 2;
const DISK_DYNAMIC: u32 = 3;
const DISK_DIFFERENCING: u32 = 4;
const UNALLOCATED: u32 = 0xffff_ffff;
/// CHS 65535/16/255: the largest geometry, where qemu uses the current size.
const MAX_GEOMETRY_SECTORS: u64 = 65535 * 16 * 255;

#[derive(Clone, Debug)]
pub enum Tag {
    Footer,
    Dynamic,
    Bat,
}

#[derive(Default)]
pub struct Vhd {
    virtual_size: u64,
    block_size: u64,
    bitmap_size: u64,
    entries: u64,
}

/// The disk size qemu sees for a footer.
fn virtual_size(footer: &[u8]) -> u64 {
    let current = be64(footer, 48);
    let cylinders = u16::from_be_bytes([footer[56], footer[57]]) as u64;
    let chs = cylinders * footer[58] as u64 * footer[59] as u64;
    let creator = &footer[28..32];
    let uses_chs = !matches!(creator, b"win " | b"qem2" | b"d2v " | b"CTXS" | b"tap\0");
    if uses_chs && chs != MAX_GEOMETRY_SECTORS {
        chs * SECTOR
    } else {
        current
    }
}

impl Vhd {
    fn parse_footer(&mut self, f: &[u8], plan: &mut Plan<Tag>) -> Result<()> {
        match be32(f, 60) {
            DISK_DYNAMIC => {}
            DISK_DIFFERENCING => {
                return Err(unsupported(
                    "the vhd is a differencing disk (it needs its parent, a backing file); merge it into a standalone disk first",
                ))
            }
            DISK_FIXED => {
                return Err(corrupt(
                    "the vhd footer at the start says fixed disk, but a fixed disk has its footer only at the end",
                ))
            }
            other => return Err(corrupt(format!("unknown vhd disk type {other}"))),
        }
        self.virtual_size = virtual_size(f);
        if self.virtual_size > 1 << 48 {
            return Err(corrupt(format!(
                "the vhd size of {} bytes is absurd",
                self.virtual_size
            )));
        }
        plan.virtual_size = Some(self.virtual_size);
        let dynamic = be64(f, 16);
        plan.meta(dynamic, 1024, Tag::Dynamic, "vhd dynamic header")
    }

    fn parse_dynamic(&mut self, d: &[u8], plan: &mut Plan<Tag>) -> Result<()> {
        if &d[..8] != b"cxsparse" {
            return Err(corrupt("the vhd dynamic header has no cxsparse signature"));
        }
        let table = be64(d, 16);
        self.entries = be32(d, 28) as u64;
        self.block_size = be32(d, 32) as u64;
        if !self.block_size.is_power_of_two() || !(SECTOR..=1 << 28).contains(&self.block_size) {
            return Err(corrupt(format!(
                "the vhd block size of {} bytes is invalid",
                self.block_size
            )));
        }
        if self.entries < self.virtual_size.div_ceil(self.block_size) {
            return Err(corrupt(format!(
                "the vhd block table has {} entries, too few for a {}-byte disk",
                self.entries, self.virtual_size
            )));
        }
        self.bitmap_size = (self.block_size / SECTOR).div_ceil(8).div_ceil(SECTOR) * SECTOR;
        plan.meta(
            table,
            self.entries * 4,
            Tag::Bat,
            "vhd block allocation table",
        )
    }

    fn parse_bat(&self, d: &[u8], plan: &mut Plan<Tag>) -> Result<()> {
        for (i, e) in d.chunks_exact(4).enumerate() {
            let sector = be32(e, 0);
            let guest = i as u64 * self.block_size;
            if sector == UNALLOCATED || guest >= self.virtual_size {
                continue;
            }
            // The sector bitmap is not read: qemu reads allocated blocks
            // whole, and so does this converter (identical output).
            let data = sector as u64 * SECTOR + self.bitmap_size;
            plan.data(data, self.block_size, guest)?;
        }
        Ok(())
    }
}

impl Layout for Vhd {
    type Tag = Tag;

    fn start(&mut self, plan: &mut Plan<Tag>) -> Result<()> {
        plan.meta(0, FOOTER_SIZE as u64, Tag::Footer, "vhd footer copy")
    }

    fn on_meta(&mut self, tag: Tag, _offset: u64, data: &[u8], plan: &mut Plan<Tag>) -> Result<()> {
        match tag {
            Tag::Footer => self.parse_footer(data, plan),
            Tag::Dynamic => self.parse_dynamic(data, plan),
            Tag::Bat => self.parse_bat(data, plan),
        }
    }

    fn trailer_len(&self) -> u64 {
        FOOTER_SIZE as u64
    }

    /// A dynamic disk ends with its footer, after the last block: without
    /// it the file was cut, and blocks its table maps may be missing too.
    fn finish(&mut self, trailer: &[u8]) -> Result<()> {
        if trailer.len() < FOOTER_SIZE || !trailer.starts_with(b"conectix") {
            return Err(corrupt(format!(
                "the vhd ends before its footer (the last {} bytes after its blocks are not a vhd footer): the image is truncated (download it again, or check the file on the server)",
                FOOTER_SIZE
            )));
        }
        Ok(())
    }
}

/// What a raw copy turned out to be.
pub struct RawOutcome {
    pub format: Format,
    pub virtual_size: u64,
}

/// Copies raw bytes, holding the last 512 back: if they are a fixed-disk
/// VHD footer, they are the footer, not data, and the disk size is the
/// footer's.
pub fn copy_raw_or_fixed(reader: &mut dyn Read, writer: &mut VolumeWriter) -> Result<RawOutcome> {
    let mut buf = vec![0u8; 256 << 10];
    let mut held = 0usize;
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buf[held..]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        let have = held + n;
        let emit = have.saturating_sub(FOOTER_SIZE);
        writer.write_all(&buf[..emit])?;
        total += emit as u64;
        buf.copy_within(emit..have, 0);
        held = have - emit;
    }
    let tail = &buf[..held];
    if held == FOOTER_SIZE && tail.starts_with(b"conectix") && be32(tail, 60) == DISK_FIXED {
        let size = virtual_size(tail);
        if size > total {
            return Err(corrupt(format!(
                "the fixed vhd footer says {size} bytes but only {total} bytes of data came before it: the image is truncated"
            )));
        }
        return Ok(RawOutcome {
            format: Format::Vhd,
            virtual_size: size,
        });
    }
    writer.write_all(tail)?;
    Ok(RawOutcome {
        format: Format::Raw,
        virtual_size: total + held as u64,
    })
}
