//! The import: an HTTP source streamed through the core pipeline.

use anyhow::Result;
use std::sync::Arc;

use populator_core::http::{HttpRangeReader, HttpSource};
use populator_core::pipeline::run_stream;
use populator_core::target::{short_bytes, Target};
use populator_core::Context;

use crate::cli::Args;

pub fn run(args: Args, ctx: &Context) -> Result<String> {
    let http = args.http.config(&args.url)?;
    let target = Target::detect(args.common.target_path().as_deref(), args.common.pvc_size)?;
    ctx.report.set_target(&target);
    let mut spec = args.content.spec(
        &default_file_name(&args.url, args.content.decompress),
        args.common.owner,
    );
    let source = Arc::new(HttpSource::new(
        args.url.clone(),
        http.options,
        http.public_headers,
        http.secret_headers,
        ctx.cancel.clone(),
    )?);
    ctx.report.set("url", source.display_url());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // Disk images stored out of order are read by range from the same URL.
    spec.disk.random_access = Some(Arc::new(HttpRangeReader::new(
        source.clone(),
        runtime.handle().clone(),
    )));

    ctx.progress.set_stage("downloading");
    let mut resumes = 0;
    let mut connections = 1;
    let outcome = run_stream(&target, &spec, ctx, |sender| {
        let stats = runtime.block_on(source.download(sender, http.connections, &ctx.progress));
        // Count resumes of every attempt, also one that ended in a restart.
        let stats = stats?;
        resumes += stats.resumes;
        connections = stats.connections;
        ctx.report.set("resumes", resumes);
        Ok(())
    });
    ctx.report.set("resumes", resumes);
    let outcome = outcome?;
    ctx.report.set("restarts", outcome.restarts);
    ctx.report.set("connections", connections);
    ctx.report.extend(outcome.details.clone());
    Ok(format!(
        "imported {}{} from {} into {} (sha256 {}, {}{})",
        short_bytes(ctx.progress.bytes_read()),
        disk_summary(&outcome.details),
        source.display_url(),
        target.path.display(),
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
        if resumes > 0 {
            format!(", {resumes} resumes")
        } else {
            String::new()
        },
    ))
}

/// ` (qcow2, 10.0 GiB virtual, streamed)` for converted disk images.
fn disk_summary(details: &serde_json::Map<String, serde_json::Value>) -> String {
    match (
        details.get("format").and_then(|f| f.as_str()),
        details.get("virtualSize").and_then(|v| v.as_u64()),
        details.get("conversion").and_then(|c| c.as_str()),
    ) {
        (Some(format), Some(size), Some(conversion)) => format!(
            " ({format} image, {} virtual, {conversion})",
            short_bytes(size)
        ),
        _ => String::new(),
    }
}

/// The name a file gets in a directory target: the URL's last path segment,
/// without a compression suffix when decompressing.
fn default_file_name(
    url: &url::Url,
    decompress: populator_core::decompress::DecompressMode,
) -> String {
    let last = url
        .path_segments()
        .and_then(|mut s| s.next_back())
        .unwrap_or("");
    let decoded = percent_decode(last);
    let mut name = if populator_core::content::validate_file_name(&decoded).is_ok() {
        decoded
    } else {
        "data".into()
    };
    if decompress == populator_core::decompress::DecompressMode::Auto {
        for suffix in [".gz", ".xz", ".zst", ".bz2"] {
            if let Some(stem) = name.strip_suffix(suffix).filter(|s| !s.is_empty()) {
                name = stem.to_string();
                break;
            }
        }
    }
    name
}

fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={}", s.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use populator_core::decompress::DecompressMode;

    #[test]
    fn file_names() {
        let u = |s: &str| url::Url::parse(s).unwrap();
        assert_eq!(
            default_file_name(&u("http://h/a/disk%20one.img.gz"), DecompressMode::Auto),
            "disk one.img"
        );
        assert_eq!(
            default_file_name(&u("http://h/a/x.gz"), DecompressMode::None),
            "x.gz"
        );
        assert_eq!(
            default_file_name(&u("http://h/"), DecompressMode::Auto),
            "data"
        );
    }
}
