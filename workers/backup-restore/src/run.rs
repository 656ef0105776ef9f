//! The run: a restic snapshot restored file by file, or an archive or image
//! streamed through the core pipeline.

use std::path::{Component, Path, PathBuf};

use anyhow::Result;
use populator_core::content::ContentMode;
use populator_core::error::{fail, Kind};
use populator_core::target::{short_bytes, Target, TargetKind};
use populator_core::Context;

use crate::cli::{Args, ResticSource, Source};
use crate::repo::{self, rustic_message};
use crate::restore::Restorer;

pub fn run(args: Args, ctx: &Context) -> Result<String> {
    match args.source()? {
        Source::Archive(archive) => crate::stream::run(&args, &archive, ContentMode::Archive, ctx),
        Source::Image(image) => {
            crate::stream::run(&args, &image, crate::stream::IMAGE_CONTENT, ctx)
        }
        Source::Restic(source) => restore_snapshot(&args, &source, ctx),
    }
}

fn restore_snapshot(args: &Args, source: &ResticSource, ctx: &Context) -> Result<String> {
    let target = Target::detect(args.common.target_path().as_deref(), args.common.pvc_size)?;
    ctx.report.set_target(&target);
    if target.kind != TargetKind::Filesystem {
        return Err(fail(
            Kind::Usage,
            "InvalidTarget",
            format!(
                "a restic snapshot is restored into a directory, but {} is a {} target",
                target.path.display(),
                target.kind.name()
            ),
        ));
    }
    let name = source.location.display();
    ctx.report.set("repository", name.clone());
    ctx.progress.set_stage("opening");
    let (repo, backend) = repo::open(source)?;
    let snap = repo::select_snapshot(&repo, source)?;
    let snap_id = snap.id.to_hex().to_string();
    ctx.report.set("snapshotId", snap_id.clone());
    ctx.report
        .set("snapshotTime", snap.time.timestamp().to_string());
    ctx.report.set("snapshotHost", snap.hostname.clone());
    ctx.report.set(
        "snapshotPaths",
        snap.paths.iter().cloned().collect::<Vec<_>>(),
    );

    // The backed-up path lands at the volume's root (Velero and VolSync
    // back up the volume's mount point); several paths keep their layout.
    let paths: Vec<&String> = snap.paths.iter().collect();
    let base = match paths.as_slice() {
        [one] => PathBuf::from(one.as_str()),
        _ => PathBuf::from("/"),
    };
    let node_at = |path: &Path, what: &str| {
        repo.node_from_snapshot_and_path(&snap, &path.to_string_lossy())
            .map_err(|e| {
                fail(
                    Kind::Usage,
                    "IncludeNotFound",
                    format!(
                        "{what} {} is not in snapshot {}: {}",
                        path.display(),
                        &snap_id[..8],
                        rustic_message(&e)
                    ),
                )
            })
    };
    // restic records the absolute path in the snapshot, but builds its tree
    // from the path as given: `restic backup data` in /srv keeps /srv/data
    // as just `data`. Take the longest tail of the path that is in the tree.
    let base = tails(&base)
        .into_iter()
        .find(|tail| {
            repo.node_from_snapshot_and_path(&snap, &tail.to_string_lossy())
                .is_ok()
        })
        .unwrap_or(base);
    let roots = if source.includes.is_empty() {
        vec![(PathBuf::new(), node_at(&base, "the backed-up path")?)]
    } else {
        let mut roots = Vec::new();
        for include in &source.includes {
            let rel = include_path(include)?;
            let node = node_at(&base.join(&rel), "--include")?;
            if let Some(parent) = rel.parent() {
                std::fs::create_dir_all(target.path.join(parent))?;
            }
            roots.push((rel, node));
        }
        roots
    };
    let restorer = Restorer {
        repo: &repo,
        backend,
        repo_name: name.clone(),
        root: target.path.clone(),
        threads: source.connections,
        ctx,
        capacity: target.capacity,
        is_root: populator_core::archive::is_root(),
    };
    let restored = restorer.run(roots)?;
    ctx.report.set("files", restored.files);
    ctx.report.set("directories", restored.dirs);
    ctx.report.set("symlinks", restored.symlinks);
    ctx.report.set("hardlinks", restored.hardlinks);
    ctx.report.set("bytes", restored.file_bytes);
    ctx.report.set("dataBytes", restored.data_bytes);
    Ok(format!(
        "restored snapshot {} of {} ({}) from {name} into {}: {} files, {} ({} of data), verified",
        &snap_id[..8],
        snap.hostname,
        snap.time.timestamp(),
        target.path.display(),
        restored.files,
        short_bytes(restored.file_bytes),
        short_bytes(restored.data_bytes),
    ))
}

/// `/a/b/c`, then `b/c`, then `c`.
fn tails(path: &Path) -> Vec<PathBuf> {
    let parts: Vec<Component> = path
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect();
    let mut out = vec![path.to_path_buf()];
    for start in 1..parts.len() {
        out.push(parts[start..].iter().collect());
    }
    // `restic backup .` (how VolSync's mover backs up its mount point)
    // records the absolute directory but puts its entries at the root.
    out.push(PathBuf::from("/"));
    out
}

/// An `--include` subpath: relative to the backed-up path, no `..`.
fn include_path(include: &str) -> Result<PathBuf> {
    let rel: PathBuf = Path::new(include)
        .components()
        .filter(|c| !matches!(c, Component::RootDir | Component::CurDir))
        .collect();
    if rel.as_os_str().is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(crate::cli::usage(format!(
            "--include {include}: give a path inside the snapshot's backed-up directory, without .."
        )));
    }
    Ok(rel)
}
