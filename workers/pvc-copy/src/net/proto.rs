//! The wire protocol (see docs/pvc-copy.md): frames of `type u8, length
//! u32 LE, payload` over TLS. Control messages are JSON; the manifest and
//! data frames are binary.

use std::io::{self, Read, Write};
use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};
use serde_json::Value;

use crate::meta::{rel_bytes, rel_from_bytes, Entry, FileKind};

pub const VERSION: u64 = 1;
/// Largest frame accepted: a 4 MiB chunk plus its header, with room.
pub const MAX_FRAME: usize = 5 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Frame {
    /// Sender → receiver, first on every connection (JSON).
    Hello = 1,
    /// Receiver → sender: accepted (JSON), or refused (Error).
    Welcome = 2,
    Error = 3,
    /// Tree entries (binary), then ManifestEnd.
    Manifest = 4,
    ManifestEnd = 5,
    /// Receiver → sender: what is already done (JSON with a hex bitset).
    Resume = 6,
    /// A chunk of data (binary header + payload).
    Data = 7,
    /// A zero region of a block volume.
    Zero = 8,
    /// All data of a file was sent.
    FileDone = 9,
    /// A data stream has nothing more; the receiver answers StreamOk once
    /// what it wrote is durable.
    StreamEnd = 10,
    StreamOk = 11,
    /// Sender → receiver on the control stream: all data sent.
    Finish = 12,
    /// Receiver → sender: its digest of the target (JSON).
    Digest = 13,
    /// Sender → receiver: the digests agree or not (JSON).
    Verdict = 14,
}

impl Frame {
    fn from_u8(b: u8) -> Option<Frame> {
        use Frame::*;
        Some(match b {
            1 => Hello,
            2 => Welcome,
            3 => Error,
            4 => Manifest,
            5 => ManifestEnd,
            6 => Resume,
            7 => Data,
            8 => Zero,
            9 => FileDone,
            10 => StreamEnd,
            11 => StreamOk,
            12 => Finish,
            13 => Digest,
            14 => Verdict,
            _ => return None,
        })
    }
}

pub fn write_frame(w: &mut impl Write, kind: Frame, parts: &[&[u8]]) -> io::Result<()> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut head = [0u8; 5];
    head[0] = kind as u8;
    head[1..].copy_from_slice(&(len as u32).to_le_bytes());
    w.write_all(&head)?;
    for p in parts {
        w.write_all(p)?;
    }
    Ok(())
}

pub fn write_json(w: &mut impl Write, kind: Frame, v: &Value) -> io::Result<()> {
    write_frame(w, kind, &[v.to_string().as_bytes()])?;
    w.flush()
}

/// Reads one frame into `buf`; returns its type.
pub fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>) -> Result<Frame> {
    let mut head = [0u8; 5];
    r.read_exact(&mut head)?;
    let kind = Frame::from_u8(head[0]).ok_or_else(|| anyhow!("unknown frame type {}", head[0]))?;
    let len = u32::from_le_bytes(head[1..].try_into().unwrap()) as usize;
    if len > MAX_FRAME {
        bail!("frame of {len} bytes is larger than allowed");
    }
    buf.resize(len, 0);
    r.read_exact(buf)?;
    Ok(kind)
}

pub fn read_json(r: &mut impl Read, buf: &mut Vec<u8>) -> Result<(Frame, Value)> {
    let kind = read_frame(r, buf)?;
    Ok((kind, serde_json::from_slice(buf)?))
}

/// Expects a JSON frame of `want`; an Error frame becomes the error it names.
pub fn expect_json(r: &mut impl Read, buf: &mut Vec<u8>, want: Frame) -> Result<Value> {
    let (kind, v) = read_json(r, buf)?;
    if kind == Frame::Error {
        return Err(remote_error(&v));
    }
    if kind != want {
        bail!("protocol error: expected {want:?}, got {kind:?}");
    }
    Ok(v)
}

/// An Error frame's content as an error of the kind it names.
pub fn remote_error(v: &Value) -> anyhow::Error {
    use populator_core::error::{fail, Kind};
    let message = format!(
        "the receiver refused: {}",
        v["message"].as_str().unwrap_or("no reason given")
    );
    match v["kind"].as_str() {
        Some("auth") => fail(Kind::Auth, "Unauthorized", message),
        Some("capacity") => fail(Kind::Capacity, "InsufficientCapacity", message),
        Some("usage") => fail(Kind::Usage, "ReceiverRefused", message),
        Some("integrity") => fail(Kind::Integrity, "VerificationFailed", message),
        _ => anyhow!(message),
    }
}

/// Header of a Data frame.
pub struct DataHeader {
    /// File index (tree) or 0 (block).
    pub item: u64,
    pub offset: u64,
    pub raw_len: u32,
    pub compressed: bool,
    pub hash: [u8; 32],
}

pub const DATA_HEADER: usize = 8 + 8 + 4 + 1 + 32;

impl DataHeader {
    pub fn encode(&self) -> [u8; DATA_HEADER] {
        let mut h = [0u8; DATA_HEADER];
        h[0..8].copy_from_slice(&self.item.to_le_bytes());
        h[8..16].copy_from_slice(&self.offset.to_le_bytes());
        h[16..20].copy_from_slice(&self.raw_len.to_le_bytes());
        h[20] = self.compressed as u8;
        h[21..].copy_from_slice(&self.hash);
        h
    }

    pub fn decode(b: &[u8]) -> Result<DataHeader> {
        if b.len() < DATA_HEADER {
            bail!("short data frame");
        }
        Ok(DataHeader {
            item: u64::from_le_bytes(b[0..8].try_into().unwrap()),
            offset: u64::from_le_bytes(b[8..16].try_into().unwrap()),
            raw_len: u32::from_le_bytes(b[16..20].try_into().unwrap()),
            compressed: b[20] != 0,
            hash: b[21..DATA_HEADER].try_into().unwrap(),
        })
    }
}

/// Two u64 (Zero: offset and length; FileDone: index and size).
pub fn pair(a: u64, b: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&a.to_le_bytes());
    out[8..].copy_from_slice(&b.to_le_bytes());
    out
}

pub fn unpair(b: &[u8]) -> Result<(u64, u64)> {
    if b.len() != 16 {
        bail!("malformed frame");
    }
    Ok((
        u64::from_le_bytes(b[..8].try_into().unwrap()),
        u64::from_le_bytes(b[8..].try_into().unwrap()),
    ))
}

/// A manifest entry: the entry and, for a hard link, the index of the
/// entry whose inode it shares.
pub struct ManifestEntry {
    pub entry: Entry,
    pub link_to: Option<u64>,
}

fn put(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

pub fn encode_entry(out: &mut Vec<u8>, m: &ManifestEntry) {
    let e = &m.entry;
    put(out, rel_bytes(&e.rel));
    out.push(e.kind.code());
    for v in [e.mode, e.uid, e.gid] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    for v in [
        e.size,
        e.atime.0 as u64,
        e.atime.1 as u64,
        e.mtime.0 as u64,
        e.mtime.1 as u64,
        e.rdev,
        e.allocated,
    ] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&m.link_to.map(|i| i + 1).unwrap_or(0).to_le_bytes());
    put(out, &e.link);
    out.extend_from_slice(&(e.xattrs.len() as u32).to_le_bytes());
    for (n, v) in &e.xattrs {
        put(out, n);
        put(out, v);
    }
}

struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        if self.0.len() < n {
            bail!("truncated manifest");
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn bytes(&mut self) -> Result<Vec<u8>> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
}

/// Decodes a Manifest frame's entries, checking that each path stays
/// inside the tree.
pub fn decode_entries(b: &[u8]) -> Result<Vec<ManifestEntry>> {
    let mut c = Cursor(b);
    let mut out = Vec::new();
    while !c.0.is_empty() {
        let rel: PathBuf = rel_from_bytes(c.bytes()?);
        if rel.is_absolute()
            || rel
                .components()
                .any(|p| !matches!(p, std::path::Component::Normal(_)))
        {
            bail!("unsafe path in manifest: {}", rel.display());
        }
        let kind = FileKind::from_code(c.take(1)?[0]).ok_or_else(|| anyhow!("bad entry type"))?;
        let (mode, uid, gid) = (c.u32()?, c.u32()?, c.u32()?);
        let size = c.u64()?;
        let atime = (c.u64()? as i64, c.u64()? as i64);
        let mtime = (c.u64()? as i64, c.u64()? as i64);
        let rdev = c.u64()?;
        let allocated = c.u64()?;
        let link_to = c.u64()?.checked_sub(1);
        let link = c.bytes()?;
        let n = c.u32()?;
        let mut xattrs = Vec::new();
        for _ in 0..n {
            xattrs.push((c.bytes()?, c.bytes()?));
        }
        out.push(ManifestEntry {
            entry: Entry {
                rel,
                kind,
                mode,
                uid,
                gid,
                size,
                atime,
                mtime,
                rdev,
                link,
                xattrs,
                nlink: 1,
                dev: 0,
                ino: 0,
                allocated,
            },
            link_to,
        });
    }
    Ok(out)
}

/// A set of done indexes, as hex on the wire and bytes in the journal.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Bitset(pub Vec<u8>);

impl Bitset {
    pub fn new(n: u64) -> Bitset {
        Bitset(vec![0; n.div_ceil(8) as usize])
    }
    pub fn set(&mut self, i: u64) {
        if let Some(b) = self.0.get_mut((i / 8) as usize) {
            *b |= 1 << (i % 8);
        }
    }
    pub fn get(&self, i: u64) -> bool {
        self.0
            .get((i / 8) as usize)
            .is_some_and(|b| b & (1 << (i % 8)) != 0)
    }
    pub fn count(&self) -> u64 {
        self.0.iter().map(|b| b.count_ones() as u64).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(rel: &[u8], kind: FileKind) -> Entry {
        Entry {
            rel: rel_from_bytes(rel.to_vec()),
            kind,
            mode: 0o4755,
            uid: 1,
            gid: 2,
            size: 3,
            atime: (4, 5),
            mtime: (-6, 7),
            rdev: 8,
            link: b"target".to_vec(),
            xattrs: vec![(b"user.a".to_vec(), vec![0, 255])],
            nlink: 1,
            dev: 0,
            ino: 0,
            allocated: 9,
        }
    }

    #[test]
    fn manifest_entries_round_trip_with_non_utf8_names() {
        let entries = [
            ManifestEntry {
                entry: entry(b"", FileKind::Dir),
                link_to: None,
            },
            ManifestEntry {
                entry: entry(b"caf\xe9", FileKind::File),
                link_to: None,
            },
            ManifestEntry {
                entry: entry(b"link", FileKind::File),
                link_to: Some(1),
            },
        ];
        let mut out = Vec::new();
        for e in &entries {
            encode_entry(&mut out, e);
        }
        let back = decode_entries(&out).unwrap();
        assert_eq!(back.len(), 3);
        for (a, b) in entries.iter().zip(&back) {
            assert_eq!(a.entry, b.entry);
            assert_eq!(a.link_to, b.link_to);
        }
    }

    #[test]
    fn paths_leaving_the_tree_are_refused() {
        for bad in [&b"../etc/passwd"[..], b"/etc/passwd", b"a/../../b"] {
            let mut out = Vec::new();
            encode_entry(
                &mut out,
                &ManifestEntry {
                    entry: entry(bad, FileKind::File),
                    link_to: None,
                },
            );
            assert!(
                decode_entries(&out).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn data_header_and_bitset() {
        let h = DataHeader {
            item: 7,
            offset: 4 << 20,
            raw_len: 123,
            compressed: true,
            hash: [9; 32],
        };
        let d = DataHeader::decode(&h.encode()).unwrap();
        assert_eq!(
            (d.item, d.offset, d.raw_len, d.compressed, d.hash),
            (7, 4 << 20, 123, true, [9; 32])
        );
        let mut b = Bitset::new(20);
        b.set(0);
        b.set(19);
        b.set(25); // out of range: ignored
        assert!(b.get(0) && b.get(19) && !b.get(1));
        assert_eq!(b.count(), 2);
    }
}
