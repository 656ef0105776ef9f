//! qcow2 (versions 2 and 3): header → L1 table → L2 tables → clusters.
//! Handles 512 B–2 MiB clusters, zlib and zstd compressed clusters, zero and
//! unallocated clusters, preallocated metadata and extended L2 entries
//! (subclusters). Refuses backing files, external data files, encryption
//! and images marked corrupt. Refcounts and snapshots are not needed to read
//! the active disk and are not read.

use anyhow::Result;

use super::stream::{be32, be64, Codec, Layout, Plan};
use super::{corrupt, unsupported};

const HEADER_READ: u64 = 512;
const L1_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COMPRESSED: u64 = 1 << 62;
const ZERO: u64 = 1;

const INCOMPAT_DIRTY: u64 = 1;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;

#[derive(Clone, Debug)]
pub enum Tag {
    Header,
    L1,
    L2 { guest_base: u64 },
}

#[derive(Default)]
pub struct Qcow2 {
    cluster_bits: u32,
    virtual_size: u64,
    extended_l2: bool,
    codec: Option<Codec>,
    l1_entries: u64,
}

impl Qcow2 {
    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn entry_size(&self) -> u64 {
        if self.extended_l2 {
            16
        } else {
            8
        }
    }

    /// Guest bytes one L2 table covers.
    fn l2_span(&self) -> u64 {
        self.cluster_size() / self.entry_size() * self.cluster_size()
    }

    fn parse_header(&mut self, h: &[u8], plan: &mut Plan<Tag>) -> Result<()> {
        let version = be32(h, 4);
        if version != 2 && version != 3 {
            return Err(unsupported(format!(
                "qcow2 version {version} is not supported (only 2 and 3)"
            )));
        }
        if be64(h, 8) != 0 {
            return Err(unsupported(
                "the qcow2 image has a backing file; convert it to a standalone image first (qemu-img convert -O qcow2 without -B)",
            ));
        }
        self.cluster_bits = be32(h, 20);
        if !(9..=21).contains(&self.cluster_bits) {
            return Err(corrupt(format!(
                "the qcow2 cluster size 2^{} is outside 512 B..2 MiB",
                self.cluster_bits
            )));
        }
        self.virtual_size = be64(h, 24);
        if be32(h, 32) != 0 {
            return Err(unsupported(
                "the qcow2 image is encrypted (AES or LUKS); decrypt it first (qemu-img convert --object secret,... -O qcow2)",
            ));
        }
        if version == 3 {
            self.parse_v3_features(h)?;
        } else {
            self.codec = Some(Codec::Deflate);
        }
        if self.virtual_size > 1 << 56 {
            return Err(corrupt(format!(
                "the qcow2 virtual size of {} bytes is absurd",
                self.virtual_size
            )));
        }
        let l1_size = be32(h, 36) as u64;
        let l1_offset = be64(h, 40);
        self.l1_entries = self.virtual_size.div_ceil(self.l2_span());
        if l1_size < self.l1_entries {
            return Err(corrupt(format!(
                "the qcow2 L1 table has {l1_size} entries but a {}-byte disk needs {}",
                self.virtual_size, self.l1_entries
            )));
        }
        if l1_offset % self.cluster_size() != 0 || (l1_offset == 0 && self.l1_entries > 0) {
            return Err(corrupt(format!(
                "the qcow2 L1 table offset {l1_offset} is not cluster-aligned"
            )));
        }
        plan.virtual_size = Some(self.virtual_size);
        if self.l1_entries > 0 {
            plan.meta(l1_offset, self.l1_entries * 8, Tag::L1, "L1 table")?;
        }
        Ok(())
    }

    fn parse_v3_features(&mut self, h: &[u8]) -> Result<()> {
        let incompatible = be64(h, 72);
        if incompatible & INCOMPAT_DATA_FILE != 0 {
            return Err(unsupported(
                "the qcow2 image keeps its data in an external data file, which a stream cannot reach; convert it to a standalone image first",
            ));
        }
        if incompatible & INCOMPAT_CORRUPT != 0 {
            return Err(corrupt(
                "the qcow2 image is marked corrupt; repair it with qemu-img check -r all",
            ));
        }
        let known = INCOMPAT_DIRTY | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
        if incompatible & !known != 0 {
            return Err(unsupported(format!(
                "the qcow2 image uses unknown incompatible features (bits {:#x})",
                incompatible & !known
            )));
        }
        self.extended_l2 = incompatible & INCOMPAT_EXTL2 != 0;
        if self.extended_l2 && self.cluster_bits < 14 {
            return Err(corrupt(
                "extended L2 entries need clusters of at least 16 KiB",
            ));
        }
        let header_length = be32(h, 100) as u64;
        let compression_type = if header_length > 104 { h[104] } else { 0 };
        self.codec = match compression_type {
            0 => Some(Codec::Deflate),
            1 => Some(Codec::Zstd),
            other => {
                return Err(unsupported(format!(
                    "qcow2 compression type {other} is not supported (only zlib and zstd)"
                )))
            }
        };
        Ok(())
    }

    fn parse_l1(&self, data: &[u8], plan: &mut Plan<Tag>) -> Result<()> {
        for (i, entry) in data.chunks_exact(8).enumerate() {
            let l2 = be64(entry, 0) & L1_OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            if l2 % self.cluster_size() != 0 {
                return Err(corrupt(format!(
                    "L1 entry {i} points to byte {l2}, which is not the start of a cluster"
                )));
            }
            let guest_base = i as u64 * self.l2_span();
            plan.meta(l2, self.cluster_size(), Tag::L2 { guest_base }, "L2 table")?;
        }
        Ok(())
    }

    fn parse_l2(&self, guest_base: u64, data: &[u8], plan: &mut Plan<Tag>) -> Result<()> {
        let cluster = self.cluster_size();
        for (i, entry) in data.chunks_exact(self.entry_size() as usize).enumerate() {
            let guest = guest_base + i as u64 * cluster;
            if guest >= self.virtual_size {
                break;
            }
            let word = be64(entry, 0);
            if word & COMPRESSED != 0 {
                self.compressed(word, guest, plan)?;
                continue;
            }
            let host = word & L2_OFFSET_MASK;
            if host % cluster != 0 {
                return Err(corrupt(format!(
                    "the L2 entry for guest offset {guest} points to byte {host}, which is not the start of a cluster"
                )));
            }
            if self.extended_l2 {
                self.subclusters(host, guest, be64(entry, 8), plan)?;
            } else if word & ZERO == 0 && host != 0 {
                plan.data(host, cluster, guest)?;
            }
        }
        Ok(())
    }

    /// Extended L2: 32 subclusters, each allocated, zero or unallocated.
    fn subclusters(&self, host: u64, guest: u64, bitmap: u64, plan: &mut Plan<Tag>) -> Result<()> {
        let sub = self.cluster_size() / 32;
        let allocated = bitmap as u32;
        let zero = (bitmap >> 32) as u32;
        if allocated & zero != 0 {
            return Err(corrupt(format!(
                "the subcluster bitmap for guest offset {guest} marks subclusters both allocated and zero"
            )));
        }
        if allocated != 0 && host == 0 {
            return Err(corrupt(format!(
                "the L2 entry for guest offset {guest} has allocated subclusters but no cluster"
            )));
        }
        for s in 0..32u64 {
            if allocated & (1 << s) != 0 {
                plan.data(host + s * sub, sub, guest + s * sub)?;
            }
        }
        Ok(())
    }

    fn compressed(&self, word: u64, guest: u64, plan: &mut Plan<Tag>) -> Result<()> {
        let x = 62 - (self.cluster_bits - 8);
        let offset = word & ((1u64 << x) - 1);
        let sectors = ((word >> x) & ((1u64 << (self.cluster_bits - 8)) - 1)) + 1;
        let len = sectors * 512 - (offset & 511);
        let codec = self.codec.unwrap_or(Codec::Deflate);
        // The length is rounded up to sectors and may run past the end of a
        // file whose last cluster is compressed; clip it there.
        let len = match plan.source_len {
            Some(size) if offset < size => len.min(size - offset),
            _ => len,
        };
        plan.compressed(offset, len, guest, self.cluster_size(), codec)
    }
}

impl Layout for Qcow2 {
    type Tag = Tag;

    fn start(&mut self, plan: &mut Plan<Tag>) -> Result<()> {
        plan.meta(0, HEADER_READ, Tag::Header, "qcow2 header")
    }

    fn on_meta(&mut self, tag: Tag, _offset: u64, data: &[u8], plan: &mut Plan<Tag>) -> Result<()> {
        match tag {
            Tag::Header => self.parse_header(data, plan),
            Tag::L1 => self.parse_l1(data, plan),
            Tag::L2 { guest_base } => self.parse_l2(guest_base, data, plan),
        }
    }
}
