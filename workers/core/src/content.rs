//! Content modes (`--content file|archive|disk`): what the decoded byte
//! stream becomes on the target. Each mode is a [`Sink`] that writes into a
//! place that is not yet visible (a hidden file or staging directory, or the
//! raw device), then commits after verification or aborts and removes what
//! it created.

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

use crate::archive::{self, ExtractOptions};
use crate::decompress::{Compression, DecompressMode};
use crate::digest::Checksum;
use crate::error::{fail, Kind};
use crate::target::{Target, TargetKind};
use crate::worker::Context;
use crate::writer::{VolumeWriter, ZeroMode};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum ContentMode {
    /// The bytes, decompressed, as one file (or the raw device).
    #[default]
    File,
    /// A tar stream, decompressed, extracted into a directory target.
    Archive,
    /// A disk image converted to raw (qcow2, vmdk, vhd, vhdx).
    Disk,
}

/// Everything the pipeline needs to know about the wanted content.
#[derive(Clone, Debug, Default)]
pub struct ContentSpec {
    pub mode: ContentMode,
    pub decompress: DecompressMode,
    pub checksums: Vec<Checksum>,
    /// File name inside a directory target (`file` mode).
    pub file_name: String,
    pub extract: ExtractOptions,
    /// `disk` mode: growing, random access to the source, spooling.
    pub disk: crate::disk::DiskOptions,
}

/// Facts known once the stream starts.
pub struct StreamInfo {
    pub compression: Compression,
    /// Size of the source bytes, when the source declared it.
    pub declared_size: Option<u64>,
}

pub trait Sink: Send {
    fn write_stream(&mut self, reader: &mut dyn Read, info: &StreamInfo) -> Result<()>;
    /// Makes the written data durable and visible.
    fn commit(&mut self) -> Result<()>;
    /// Removes what this sink created.
    fn abort(&mut self);
    /// Fields for the result.
    fn details(&self) -> serde_json::Map<String, serde_json::Value> {
        serde_json::Map::new()
    }
}

/// Hidden names in the target root that the workers own.
pub const STAGING_DIR: &str = ".populator-staging";

pub fn open_sink(target: &Target, spec: &ContentSpec, ctx: &Context) -> Result<Box<dyn Sink>> {
    match (spec.mode, target.kind) {
        (ContentMode::File, _) => Ok(Box::new(FileSink::open(target, spec, ctx)?)),
        (ContentMode::Archive, TargetKind::Filesystem) => {
            Ok(Box::new(ArchiveSink::open(target, spec, ctx)?))
        }
        (ContentMode::Archive, kind) => Err(fail(
            Kind::Usage,
            "InvalidConfiguration",
            format!(
                "--content archive needs a directory target, but {} is a {} target",
                target.path.display(),
                kind.name()
            ),
        )),
        (ContentMode::Disk, _) => Ok(Box::new(crate::disk::DiskSink::open(target, spec, ctx)?)),
    }
}

/// Checks a `--file-name`: one plain name, no directories.
pub fn validate_file_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(format!("'{name}' is not a plain file name"));
    }
    Ok(())
}

/// `file` content: the stream as one file, or onto the device.
struct FileSink {
    kind: TargetKind,
    /// Where the data lands when committed.
    final_path: PathBuf,
    /// Where it is written meanwhile (a hidden name in a directory target).
    write_path: PathBuf,
    created: bool,
    capacity_what: String,
    target: Target,
    writer: Option<VolumeWriter>,
    file: Option<File>,
    progress: std::sync::Arc<crate::progress::Progress>,
    owner: Option<(u32, u32)>,
}

impl FileSink {
    fn open(target: &Target, spec: &ContentSpec, ctx: &Context) -> Result<FileSink> {
        let file_name = &spec.file_name;
        let (final_path, write_path) = match target.kind {
            TargetKind::Filesystem => (
                target.path.join(file_name),
                target.path.join(format!(".{file_name}.populator-partial")),
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
        Ok(FileSink {
            kind: target.kind,
            created: !existed || target.kind == TargetKind::Filesystem,
            capacity_what: format!("target {}", target.path.display()),
            final_path,
            write_path,
            target: target.clone(),
            writer: None,
            file: Some(file),
            progress: ctx.progress.clone(),
            owner: spec.extract.owner,
        })
    }
}

impl Sink for FileSink {
    fn write_stream(&mut self, reader: &mut dyn Read, info: &StreamInfo) -> Result<()> {
        if let (Compression::None, Some(size)) = (info.compression, info.declared_size) {
            self.target.check_fits(size, "the source")?;
        }
        let mode = if self.kind == TargetKind::Block {
            ZeroMode::ZeroOut
        } else {
            ZeroMode::Holes
        };
        let file = self.file.take().expect("write_stream runs once");
        let writer = self.writer.insert(
            VolumeWriter::new(file, mode, self.target.capacity, self.capacity_what.clone())
                .with_progress(self.progress.clone()),
        );
        crate::pipeline::copy(reader, writer)
            .with_context(|| format!("writing {}", self.write_path.display()))?;
        Ok(())
    }

    fn commit(&mut self) -> Result<()> {
        let writer = self.writer.take().expect("commit after write_stream");
        let file = writer
            .finish(true)
            .with_context(|| format!("flushing {}", self.write_path.display()))?;
        if self.kind == TargetKind::Block {
            return Ok(());
        }
        place_file(
            &file,
            self.owner,
            &self.write_path,
            &self.final_path,
            &self.target.path,
        )
    }

    fn abort(&mut self) {
        self.writer = None;
        self.file = None;
        if self.created && self.kind != TargetKind::Block {
            let _ = fs::remove_file(&self.write_path);
        }
    }

    fn details(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        m.insert("path".into(), self.final_path.display().to_string().into());
        m
    }
}

/// Finishes a file written under a hidden name in a directory target: sets
/// its owner (`--owner`), renames it to its final name and syncs the
/// directory, so a crash never leaves a complete-looking but unflushed file.
pub(crate) fn place_file(
    file: &File,
    owner: Option<(u32, u32)>,
    write_path: &Path,
    final_path: &Path,
    dir: &Path,
) -> Result<()> {
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(file, Some(uid), Some(gid)).with_context(|| {
            format!(
                "setting the owner of {} to {uid}:{gid}",
                write_path.display()
            )
        })?;
    }
    if write_path != final_path {
        fs::rename(write_path, final_path)
            .with_context(|| format!("moving {} into place", final_path.display()))?;
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// `archive` content: extracted into a hidden staging directory in the
/// target, moved into place after verification.
struct ArchiveSink {
    root: PathBuf,
    staging: PathBuf,
    options: ExtractOptions,
    summary: Option<archive::ExtractSummary>,
    ctx_progress: std::sync::Arc<crate::progress::Progress>,
    cancel: crate::cancel::CancelToken,
    /// Flushes the target's filesystem while entries are written.
    writeback: Option<crate::writeback::EarlyWriteback>,
}

impl ArchiveSink {
    fn open(target: &Target, spec: &ContentSpec, ctx: &Context) -> Result<ArchiveSink> {
        let staging = target.path.join(STAGING_DIR);
        remove_tree(&staging)?;
        fs::create_dir(&staging).with_context(|| format!("creating {}", staging.display()))?;
        let mut options = spec.extract.clone();
        options.capacity = options.capacity.or(target.capacity);
        if options.max_entries.is_none() {
            options.max_entries = crate::target::free_inodes(&target.path)
                .ok()
                .filter(|&n| n > 0);
        }
        Ok(ArchiveSink {
            root: target.path.clone(),
            staging,
            options,
            summary: None,
            ctx_progress: ctx.progress.clone(),
            cancel: ctx.cancel.clone(),
            writeback: None,
        })
    }
}

fn remove_tree(path: &Path) -> Result<()> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

impl Sink for ArchiveSink {
    fn write_stream(&mut self, reader: &mut dyn Read, _info: &StreamInfo) -> Result<()> {
        self.writeback = Some(crate::writeback::EarlyWriteback::start(&self.staging)?);
        self.summary = Some(archive::extract(
            reader,
            &self.staging,
            &self.options,
            &self.ctx_progress,
            &self.cancel,
        )?);
        Ok(())
    }

    fn commit(&mut self) -> Result<()> {
        let summary = self.summary.as_ref().expect("commit after write_stream");
        archive::move_into_place(&self.staging, &self.root)?;
        archive::apply_dir_metadata(&self.root, &summary.directories, &self.options)?;
        let writeback = self.writeback.take().expect("commit after write_stream");
        writeback.finish()
    }

    fn abort(&mut self) {
        let _ = remove_tree(&self.staging);
    }

    fn details(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        if let Some(s) = &self.summary {
            m.insert("entries".into(), s.entries.into());
            m.insert("files".into(), s.files.into());
            m.insert("skippedEntries".into(), s.skipped.into());
        }
        m
    }
}
