//! vhdx (fixed and dynamic): file identifier → two headers (the newer one
//! wins) → region table → metadata region (block size, disk size, sector
//! size) and block allocation table → payload blocks. Differencing disks
//! (a parent locator, partially present blocks) and images with a log that
//! still has to be replayed are refused. Checksums are not verified: the
//! tables are validated field by field instead.

use anyhow::Result;

use super::stream::{le16, le32, le64, Layout, Plan};
use super::{corrupt, unsupported};

const KIB64: u64 = 64 << 10;
const HEADER_1: u64 = 64 << 10;
const HEADER_2: u64 = 128 << 10;
const REGION_TABLE: u64 = 192 << 10;
const MIB: u64 = 1 << 20;

const BAT_GUID: &str = "2DC27766-F623-4200-9D64-115E9BFD4A08";
const METADATA_GUID: &str = "8B7CA206-4790-4B9A-B8FE-575F050F886E";
const FILE_PARAMETERS: &str = "CAA16737-FA36-4D43-B3B6-33F0AA44E76B";
const VIRTUAL_DISK_SIZE: &str = "2FA54224-CD1B-4876-B211-5DBED83BF4B8";
const LOGICAL_SECTOR_SIZE: &str = "8141BF1D-A96F-4709-BA47-F233A8FAAB5F";
const PARENT_LOCATOR: &str = "A8D35F2D-B30B-454D-ABF7-D3D84834AB0C";

const BLOCK_NOT_PRESENT: u64 = 0;
const BLOCK_UNDEFINED: u64 = 1;
const BLOCK_ZERO: u64 = 2;
const BLOCK_UNMAPPED: u64 = 3;
const BLOCK_FULLY_PRESENT: u64 = 6;
const BLOCK_PARTIALLY_PRESENT: u64 = 7;

#[derive(Clone, Debug)]
pub enum Tag {
    Identifier,
    Header,
    RegionTable,
    Metadata,
    Bat,
}

#[derive(Default)]
pub struct Vhdx {
    /// (sequence number, log GUID is set) of the valid headers seen.
    headers: Vec<(u64, bool)>,
    geometry: Option<Geometry>,
    /// The BAT, when it arrived before the metadata.
    pending_bat: Option<Vec<u8>>,
}

#[derive(Clone, Copy)]
struct Geometry {
    virtual_size: u64,
    block_size: u64,
    chunk_ratio: u64,
}

/// A GUID as stored on disk: the first three fields little-endian.
fn guid(text: &str) -> [u8; 16] {
    let hex: Vec<u8> = text
        .bytes()
        .filter(|c| *c != b'-')
        .collect::<Vec<_>>()
        .chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
        .collect();
    let mut g = [0u8; 16];
    g.copy_from_slice(&hex);
    g[0..4].reverse();
    g[4..6].reverse();
    g[6..8].reverse();
    g
}

impl Vhdx {
    fn parse_header(&mut self, h: &[u8]) {
        if &h[..4] == b"head" {
            let log_set = h[48..64].iter().any(|&b| b != 0);
            self.headers.push((le64(h, 8), log_set));
        }
    }

    fn parse_region_table(&mut self, r: &[u8], plan: &mut Plan<Tag>) -> Result<()> {
        let current = self.headers.iter().max_by_key(|h| h.0).ok_or_else(|| {
            corrupt("the vhdx has no valid header (neither copy has the 'head' signature)")
        })?;
        if current.1 {
            return Err(unsupported(
                "the vhdx has a log that was never replayed (it was not closed cleanly); replay it first (qemu-img check -r all, or open it in Hyper-V)",
            ));
        }
        if &r[..4] != b"regi" {
            return Err(corrupt("the vhdx region table has no 'regi' signature"));
        }
        let count = le32(r, 8) as usize;
        if count > 2047 {
            return Err(corrupt(format!(
                "the vhdx region table claims {count} entries"
            )));
        }
        let (mut bat, mut metadata) = (None, None);
        for i in 0..count {
            let e = &r[16 + i * 32..16 + (i + 1) * 32];
            let (offset, len) = (le64(e, 16), le32(e, 24) as u64);
            if offset % MIB != 0 || len % MIB != 0 || len == 0 {
                return Err(corrupt(format!(
                    "vhdx region {i} at byte {offset} ({len} bytes) is not MiB-aligned"
                )));
            }
            if e[..16] == guid(BAT_GUID) {
                bat = Some((offset, len));
            } else if e[..16] == guid(METADATA_GUID) {
                metadata = Some((offset, len));
            } else if le32(e, 28) & 1 != 0 {
                return Err(unsupported(format!(
                    "the vhdx has a required region {} this converter does not know",
                    hex::encode(&e[..16])
                )));
            }
        }
        let (Some((bo, bl)), Some((mo, ml))) = (bat, metadata) else {
            return Err(corrupt(
                "the vhdx region table lacks the BAT or the metadata region",
            ));
        };
        plan.meta(mo, ml, Tag::Metadata, "vhdx metadata region")?;
        plan.meta(bo, bl, Tag::Bat, "vhdx block allocation table")
    }

    fn parse_metadata(&mut self, m: &[u8], plan: &mut Plan<Tag>) -> Result<()> {
        if &m[..8] != b"metadata" {
            return Err(corrupt(
                "the vhdx metadata table has no 'metadata' signature",
            ));
        }
        let count = le16(m, 10) as usize;
        if count > 2047 {
            return Err(corrupt(format!(
                "the vhdx metadata table claims {count} entries"
            )));
        }
        let (mut block_size, mut virtual_size, mut sector) = (None, None, None);
        for i in 0..count {
            let e = &m[32 + i * 32..32 + (i + 1) * 32];
            let (offset, len) = (le32(e, 16) as usize, le32(e, 20) as usize);
            let item = m.get(offset..offset.saturating_add(len)).ok_or_else(|| {
                corrupt(format!(
                    "vhdx metadata item {i} lies outside the metadata region"
                ))
            })?;
            let id = &e[..16];
            if id == guid(FILE_PARAMETERS) {
                if le32(item, 4) & 2 != 0 {
                    return Err(unsupported(
                        "the vhdx is a differencing disk (it has a parent, a backing file); merge it into a standalone disk first",
                    ));
                }
                block_size = Some(le32(item, 0) as u64);
            } else if id == guid(VIRTUAL_DISK_SIZE) {
                virtual_size = Some(le64(item, 0));
            } else if id == guid(LOGICAL_SECTOR_SIZE) {
                sector = Some(le32(item, 0) as u64);
            } else if id == guid(PARENT_LOCATOR) {
                return Err(unsupported(
                    "the vhdx has a parent locator (a differencing disk with a backing file); merge it first",
                ));
            }
        }
        let (Some(block_size), Some(virtual_size), Some(sector)) =
            (block_size, virtual_size, sector)
        else {
            return Err(corrupt(
                "the vhdx metadata lacks the block size, disk size or sector size",
            ));
        };
        if !block_size.is_power_of_two() || !(MIB..=256 * MIB).contains(&block_size) {
            return Err(corrupt(format!(
                "the vhdx block size {block_size} is invalid"
            )));
        }
        if sector != 512 && sector != 4096 {
            return Err(corrupt(format!(
                "the vhdx logical sector size {sector} is invalid"
            )));
        }
        if virtual_size > 64 << 40 {
            return Err(corrupt(format!(
                "the vhdx disk size of {virtual_size} bytes is larger than the format allows (64 TiB)"
            )));
        }
        plan.virtual_size = Some(virtual_size);
        let geometry = Geometry {
            virtual_size,
            block_size,
            chunk_ratio: (1u64 << 23) * sector / block_size,
        };
        self.geometry = Some(geometry);
        if let Some(bat) = self.pending_bat.take() {
            Self::parse_bat(geometry, &bat, plan)?;
        }
        Ok(())
    }

    fn parse_bat(g: Geometry, bat: &[u8], plan: &mut Plan<Tag>) -> Result<()> {
        let blocks = g.virtual_size.div_ceil(g.block_size);
        for i in 0..blocks {
            let index = (i + i / g.chunk_ratio) as usize;
            let entry = bat.get(index * 8..index * 8 + 8).ok_or_else(|| {
                corrupt(format!(
                    "the vhdx BAT is too small for {blocks} blocks of {} bytes",
                    g.block_size
                ))
            })?;
            let entry = le64(entry, 0);
            let guest = i * g.block_size;
            match entry & 7 {
                BLOCK_NOT_PRESENT | BLOCK_UNDEFINED | BLOCK_ZERO | BLOCK_UNMAPPED => {}
                BLOCK_FULLY_PRESENT => {
                    let host = entry & !(MIB - 1);
                    if host < MIB {
                        return Err(corrupt(format!(
                            "the vhdx BAT entry for guest offset {guest} points into the headers"
                        )));
                    }
                    plan.data(host, g.block_size, guest)?;
                }
                BLOCK_PARTIALLY_PRESENT => return Err(unsupported(
                    "the vhdx has partially present blocks (a differencing disk); merge it first",
                )),
                state => {
                    return Err(corrupt(format!(
                        "the vhdx BAT entry for guest offset {guest} has invalid state {state}"
                    )))
                }
            }
        }
        Ok(())
    }
}

impl Layout for Vhdx {
    type Tag = Tag;

    fn start(&mut self, plan: &mut Plan<Tag>) -> Result<()> {
        plan.meta(0, 8, Tag::Identifier, "vhdx file identifier")?;
        plan.meta(HEADER_1, 4096, Tag::Header, "vhdx header")?;
        plan.meta(HEADER_2, 4096, Tag::Header, "vhdx header")?;
        plan.meta(REGION_TABLE, KIB64, Tag::RegionTable, "vhdx region table")
    }

    fn on_meta(&mut self, tag: Tag, _offset: u64, data: &[u8], plan: &mut Plan<Tag>) -> Result<()> {
        match tag {
            Tag::Identifier => Ok(()),
            Tag::Header => {
                self.parse_header(data);
                Ok(())
            }
            Tag::RegionTable => self.parse_region_table(data, plan),
            Tag::Metadata => self.parse_metadata(data, plan),
            Tag::Bat => match self.geometry {
                Some(g) => Self::parse_bat(g, data, plan),
                None => {
                    self.pending_bat = Some(data.to_vec());
                    Ok(())
                }
            },
        }
    }
}
