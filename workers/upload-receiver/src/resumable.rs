//! The resumable writer of plain tus file uploads: every byte goes straight
//! to its final place (the device, the image file, or the hidden partial
//! file of a directory target, renamed on success), and a small state
//! record (upload id, length, durable offset, file name) is kept where a
//! restarted receiver finds it: a hidden file in a directory target, a
//! hidden file beside an image file, or the last 4 KiB of a block device
//! (zeroed on success). A restart re-reads the received prefix to rebuild
//! the digests, then continues; no spool, no extra directory.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use anyhow::{Context as _, Result};
use populator_core::content::ContentSpec;
use populator_core::digest::{Checksum, Digests, MultiDigest};
use populator_core::error::{fail, Kind};
use populator_core::target::{block_device_size, Target, TargetKind};
use populator_core::Context;
use serde::{Deserialize, Serialize};

use crate::tus::Session;

/// The state record: a magic line, JSON, zero padding.
const RECORD: usize = 4096;
const MAGIC: &[u8] = b"populator-upload-state v1\n";
/// Data is flushed and the offset saved at least this often.
const CHECKPOINT_BYTES: u64 = 64 << 20;
const STATE_FILE: &str = ".populator-upload-state";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Saved {
    pub id: String,
    pub length: u64,
    /// Bytes known to be on stable storage.
    pub offset: u64,
    pub file_name: String,
}

/// Where the state record lives.
#[derive(Clone, Debug)]
enum Store {
    File(PathBuf),
    /// Byte offset of the record on the block device.
    DeviceTail(u64),
    /// Nowhere: the device has no room after the data; in-process resume only.
    Nowhere,
}

pub struct Resumable {
    file: File,
    kind: TargetKind,
    write_path: PathBuf,
    final_path: PathBuf,
    target_path: PathBuf,
    store: Store,
    saved: Saved,
    offset: u64,
    digest: MultiDigest,
    unsynced: u64,
    owner: Option<(u32, u32)>,
    progress: std::sync::Arc<populator_core::progress::Progress>,
}

/// Paths of a file upload named `name`: (final, written meanwhile).
fn paths(target: &Target, name: &str) -> (PathBuf, PathBuf) {
    match target.kind {
        TargetKind::Filesystem => (
            target.path.join(name),
            target.path.join(format!(".{name}.populator-partial")),
        ),
        _ => (target.path.clone(), target.path.clone()),
    }
}

fn store_for(target: &Target, length: Option<u64>) -> Result<Store> {
    Ok(match target.kind {
        TargetKind::Filesystem => Store::File(target.path.join(STATE_FILE)),
        TargetKind::File => {
            let name = target
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            Store::File(
                target
                    .path
                    .with_file_name(format!(".{name}.populator-upload-state")),
            )
        }
        TargetKind::Block => {
            let size = block_device_size(&target.path)?;
            let tail = size.saturating_sub(RECORD as u64) & !4095;
            match length {
                Some(l) if l > tail => Store::Nowhere,
                _ if size < 2 * RECORD as u64 => Store::Nowhere,
                _ => Store::DeviceTail(tail),
            }
        }
    })
}

fn encode(saved: &Saved) -> Vec<u8> {
    let mut record = MAGIC.to_vec();
    record.extend_from_slice(&serde_json::to_vec(saved).expect("serializable"));
    record.push(b'\n');
    record.resize(RECORD, 0);
    record
}

fn decode(record: &[u8]) -> Option<Saved> {
    let body = record.strip_prefix(MAGIC)?;
    let end = body.iter().position(|&b| b == b'\n')?;
    serde_json::from_slice(&body[..end]).ok()
}

/// The state a killed receiver left in the target, if any.
pub fn load(target: &Target) -> Option<Saved> {
    let mut record = vec![0u8; RECORD];
    match store_for(target, None).ok()? {
        Store::File(path) => {
            let data = fs::read(path).ok()?;
            record = data;
        }
        Store::DeviceTail(at) => {
            File::open(&target.path)
                .ok()?
                .read_exact_at(&mut record, at)
                .ok()?;
        }
        Store::Nowhere => return None,
    }
    let saved = decode(&record).filter(|s| s.offset <= s.length)?;
    // State without its data (removed by hand, a different volume) is stale.
    let (_, write_path) = paths(target, &saved.file_name);
    let written = fs::metadata(&write_path).ok()?;
    (target.kind == TargetKind::Block || written.len() >= saved.offset).then_some(saved)
}

impl Resumable {
    /// A new upload: the write place truncated (files) and the state saved
    /// at offset 0.
    pub fn create(
        target: &Target,
        spec: &ContentSpec,
        session: &Session,
        file_name: &str,
        ctx: &Context,
    ) -> Result<Resumable> {
        let saved = Saved {
            id: session.id.clone(),
            length: session.length,
            offset: 0,
            file_name: file_name.to_string(),
        };
        let (final_path, write_path) = paths(target, file_name);
        let mut options = OpenOptions::new();
        options.write(true).read(true);
        if target.kind != TargetKind::Block {
            options.create(true).truncate(true);
        }
        let file = options
            .open(&write_path)
            .with_context(|| format!("opening {} for writing", write_path.display()))?;
        let writer = Resumable {
            file,
            kind: target.kind,
            write_path,
            final_path,
            target_path: target.path.clone(),
            store: store_for(target, Some(session.length))?,
            saved,
            offset: 0,
            digest: MultiDigest::new(&spec.checksums),
            unsynced: 0,
            owner: spec.extract.owner,
            progress: ctx.progress.clone(),
        };
        writer.save()?;
        Ok(writer)
    }

    /// Continues a saved upload: the received prefix is read back to
    /// rebuild the digests.
    pub fn resume(
        target: &Target,
        spec: &ContentSpec,
        saved: Saved,
        ctx: &Context,
    ) -> Result<Resumable> {
        let (final_path, write_path) = paths(target, &saved.file_name);
        let file = OpenOptions::new()
            .write(true)
            .read(true)
            .open(&write_path)
            .with_context(|| format!("reopening {} to resume", write_path.display()))?;
        let mut digest = MultiDigest::new(&spec.checksums);
        ctx.progress.set_stage("re-reading");
        let mut buf = vec![0u8; 1 << 20];
        let mut at = 0;
        while at < saved.offset {
            let n = (saved.offset - at).min(buf.len() as u64) as usize;
            file.read_exact_at(&mut buf[..n], at)
                .with_context(|| format!("re-reading {} to resume", write_path.display()))?;
            digest.update(&buf[..n]);
            at += n as u64;
            ctx.cancel.check()?;
        }
        ctx.progress.advance(saved.offset);
        ctx.progress.set_stage("receiving");
        populator_core::log::info(format!(
            "resuming tus upload {} at {} of {} bytes",
            saved.id, saved.offset, saved.length
        ));
        Ok(Resumable {
            file,
            kind: target.kind,
            write_path,
            final_path,
            target_path: target.path.clone(),
            store: store_for(target, Some(saved.length))?,
            offset: saved.offset,
            saved,
            digest,
            unsynced: 0,
            owner: spec.extract.owner,
            progress: ctx.progress.clone(),
        })
    }

    pub fn write(&mut self, data: &[u8]) -> Result<()> {
        self.file
            .write_all_at(data, self.offset)
            .with_context(|| format!("writing {}", self.write_path.display()))?;
        self.digest.update(data);
        let n = data.len() as u64;
        self.offset += n;
        self.unsynced += n;
        self.progress.add_read(n);
        self.progress.advance(n);
        self.progress.add_written(n);
        if self.unsynced >= CHECKPOINT_BYTES {
            self.checkpoint()?;
        }
        Ok(())
    }

    /// Flushes the data, then records the offset: the saved offset never
    /// runs ahead of what is on disk.
    pub fn checkpoint(&mut self) -> Result<()> {
        if self.unsynced == 0 && self.saved.offset == self.offset {
            return Ok(());
        }
        self.file
            .sync_data()
            .with_context(|| format!("flushing {}", self.write_path.display()))?;
        self.unsynced = 0;
        self.saved.offset = self.offset;
        self.save()
    }

    fn save(&self) -> Result<()> {
        let record = encode(&self.saved);
        match &self.store {
            Store::File(path) => {
                let f = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(path)
                    .with_context(|| format!("saving the upload state in {}", path.display()))?;
                f.write_all_at(&record, 0)?;
                f.sync_data()?;
            }
            Store::DeviceTail(at) => {
                self.file.write_all_at(&record, *at)?;
                self.file.sync_data()?;
            }
            Store::Nowhere => {}
        }
        Ok(())
    }

    fn clear_state(&self) -> Result<()> {
        match &self.store {
            Store::File(path) => match fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(e).with_context(|| format!("removing {}", path.display()))
                }
                _ => Ok(()),
            },
            Store::DeviceTail(at) => {
                self.file.write_all_at(&[0u8; RECORD], *at)?;
                self.file.sync_data()?;
                Ok(())
            }
            Store::Nowhere => Ok(()),
        }
    }

    /// Verifies the digests, flushes, moves the file into place and removes
    /// the state. On a mismatch everything written is removed.
    pub fn finish(mut self, expected: &[Checksum], ctx: &Context) -> Result<Digests> {
        let digest = std::mem::replace(&mut self.digest, MultiDigest::new(&[]));
        let digests = digest.finish();
        ctx.report.set_digests(&digests);
        if let Some(mismatch) = digests.mismatch(expected) {
            self.abort();
            return Err(fail(Kind::Integrity, "ChecksumMismatch", mismatch));
        }
        let flushed = (|| -> Result<()> {
            if self.kind != TargetKind::Block && self.file.metadata()?.len() != self.offset {
                self.file.set_len(self.offset)?;
            }
            self.file
                .sync_data()
                .with_context(|| format!("flushing {}", self.write_path.display()))?;
            if let (Some((uid, gid)), false) = (self.owner, self.kind == TargetKind::Block) {
                std::os::unix::fs::fchown(&self.file, Some(uid), Some(gid)).with_context(|| {
                    format!(
                        "setting the owner of {} to {uid}:{gid}",
                        self.write_path.display()
                    )
                })?;
            }
            if self.write_path != self.final_path {
                fs::rename(&self.write_path, &self.final_path)
                    .with_context(|| format!("moving {} into place", self.final_path.display()))?;
            }
            self.clear_state()?;
            if self.kind == TargetKind::Filesystem {
                File::open(&self.target_path)?.sync_all()?;
            }
            Ok(())
        })();
        flushed?;
        ctx.report
            .set("path", self.final_path.display().to_string());
        Ok(digests)
    }

    /// Removes what the upload wrote (files) and its state.
    pub fn abort(&self) {
        let _ = self.clear_state();
        if self.kind == TargetKind::Filesystem {
            let _ = fs::remove_file(&self.write_path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trip() {
        let s = Saved {
            id: "abc".into(),
            length: 10,
            offset: 4,
            file_name: "disk.img".into(),
        };
        let r = encode(&s);
        assert_eq!(r.len(), RECORD);
        assert_eq!(decode(&r), Some(s));
        assert_eq!(decode(&[0u8; RECORD]), None);
    }
}
