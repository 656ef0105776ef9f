//! Archives and disk images: one byte stream (an HTTP(S) URL or a local
//! file) through the core pipeline — digests, decompression, then safe tar
//! extraction into a directory, or the image onto the device or disk.img.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use anyhow::{Context as _, Result};
use bytes::Bytes;
use populator_core::content::{ContentMode, ContentSpec};
use populator_core::error::{fail, Kind};
use populator_core::http::HttpSource;
use populator_core::pipeline::{run_stream, ChunkSender, StreamOutcome};
use populator_core::target::{short_bytes, Target};
use populator_core::Context;
use url::Url;

use crate::cli::Args;

/// How `--image` content is written: the core's disk content, which takes
/// raw and compressed raw images and converts qcow2, vmdk, vhd and vhdx to
/// raw as they stream (an out-of-order layout is spooled, as no range reader
/// is given here).
pub const IMAGE_CONTENT: ContentMode = ContentMode::Disk;

/// The name an image gets in a directory target, as the contract's `disk`
/// content does.
const IMAGE_FILE_NAME: &str = "disk.img";

pub fn run(args: &Args, source: &str, mode: ContentMode, ctx: &Context) -> Result<String> {
    let target = Target::detect(args.common.target_path().as_deref(), args.common.pvc_size)?;
    ctx.report.set_target(&target);
    let what = if mode == ContentMode::Archive {
        "archive"
    } else {
        "image"
    };
    let spec = spec(args, mode);
    ctx.report.set(what, display_source(source));
    let outcome = if is_url(source) {
        let url = Url::parse(source)
            .map_err(|e| crate::cli::usage(format!("--{what} {source}: not a URL: {e}")))?;
        from_http(url, args, &target, &spec, ctx)?
    } else {
        from_file(Path::new(source), what, &target, &spec, ctx)?
    };
    ctx.report.extend(outcome.details.clone());
    Ok(format!(
        "restored the {what} {} into {} ({}, sha256 {}, {})",
        display_source(source),
        target.path.display(),
        short_bytes(ctx.progress.bytes_read()),
        outcome
            .digests
            .0
            .get("sha256")
            .map(String::as_str)
            .unwrap_or("?"),
        match outcome.compression.name() {
            "none" => "not compressed".to_string(),
            c => format!("{c} decompressed"),
        },
    ))
}

fn spec(args: &Args, mode: ContentMode) -> ContentSpec {
    let mut spec = ContentSpec {
        mode,
        decompress: args.stream.decompress,
        checksums: args.stream.checksums.clone(),
        file_name: IMAGE_FILE_NAME.into(),
        ..Default::default()
    };
    // A backup is restored as it was: owners (as root), fifos and devices
    // (the core creates devices only as root), setuid bits.
    spec.extract.preserve_owner = true;
    spec.extract.preserve_devices = true;
    spec.extract.preserve_setuid = true;
    spec.extract.owner = args.common.owner;
    spec
}

fn is_url(source: &str) -> bool {
    source.starts_with("http://") || source.starts_with("https://")
}

fn display_source(source: &str) -> String {
    if is_url(source) {
        match Url::parse(source) {
            Ok(mut u) => {
                u.set_query(None);
                let _ = u.set_password(None);
                let _ = u.set_username("");
                u.to_string()
            }
            Err(_) => source.to_string(),
        }
    } else {
        source.to_string()
    }
}

fn from_http(
    url: Url,
    args: &Args,
    target: &Target,
    spec: &ContentSpec,
    ctx: &Context,
) -> Result<StreamOutcome> {
    let source = HttpSource::new(
        url,
        args.http_options(),
        Default::default(),
        Default::default(),
        ctx.cancel.clone(),
    )?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    ctx.progress.set_stage("downloading");
    run_stream(target, spec, ctx, |sender| {
        runtime.block_on(source.download(sender, 1, &ctx.progress))?;
        Ok(())
    })
}

fn from_file(
    path: &Path,
    what: &str,
    target: &Target,
    spec: &ContentSpec,
    ctx: &Context,
) -> Result<StreamOutcome> {
    let size = std::fs::metadata(path)
        .map_err(|e| {
            fail(
                Kind::Usage,
                "SourceNotFound",
                format!("cannot read the {what} {}: {e}", path.display()),
            )
        })?
        .len();
    ctx.progress.set_stage("reading");
    run_stream(target, spec, ctx, |sender| {
        ctx.progress.set_total(Some(size));
        send_file(path, sender)
    })
}

/// A local file into the pipeline, 1 MiB at a time.
fn send_file(path: &Path, sender: ChunkSender) -> Result<()> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    loop {
        let mut buf = vec![0u8; 1 << 20];
        let n = file
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        buf.truncate(n);
        sender.send_blocking(Bytes::from(buf))?;
    }
    sender.finish_blocking()
}
