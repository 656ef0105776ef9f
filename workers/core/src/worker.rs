//! The entry wrapper every worker's `main` hands over to: parse the flags,
//! start progress and metrics, run the worker, then write the JSON result,
//! print one summary line and exit with the contract's code.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;

use crate::cancel::CancelToken;
use crate::digest::Digests;
use crate::error::{classify, Classified, Kind};
use crate::metrics::{MetricsOptions, MetricsServer};
use crate::options::CommonArgs;
use crate::progress::{Progress, ProgressMode, Reporter};
use crate::result::{termination_log_path, write_result, TargetInfo, WorkerResult};
use crate::target::Target;

/// What a running worker shares with the pipeline: progress, cancellation and
/// the facts gathered for the result.
pub struct Context {
    pub progress: Arc<Progress>,
    pub cancel: CancelToken,
    pub report: Report,
}

impl Context {
    pub fn new(cancel: CancelToken) -> Self {
        Self {
            progress: Arc::new(Progress::default()),
            cancel,
            report: Report::default(),
        }
    }
}

/// Facts for the result, set as the worker learns them, so a failed run
/// still reports what it knew.
#[derive(Default)]
pub struct Report {
    inner: Mutex<ReportFields>,
}

#[derive(Default)]
struct ReportFields {
    target: Option<TargetInfo>,
    digests: BTreeMap<String, String>,
    extra: serde_json::Map<String, serde_json::Value>,
}

impl Report {
    fn with<T>(&self, f: impl FnOnce(&mut ReportFields) -> T) -> T {
        f(&mut self.inner.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn set_target(&self, target: &Target) {
        let info = TargetInfo {
            kind: target.kind.name().into(),
            path: target.path.display().to_string(),
        };
        self.with(|r| r.target = Some(info));
    }

    pub fn set_digests(&self, digests: &Digests) {
        self.with(|r| r.digests = digests.0.clone());
    }

    pub fn set(&self, key: &str, value: impl Into<serde_json::Value>) {
        let value = value.into();
        self.with(|r| r.extra.insert(key.to_string(), value));
    }

    pub fn extend(&self, fields: serde_json::Map<String, serde_json::Value>) {
        self.with(|r| r.extra.extend(fields));
    }
}

/// A worker: its flags type, how to reach the common flags in it, and the run.
pub struct Worker<A> {
    pub name: &'static str,
    pub version: &'static str,
    pub common: fn(&A) -> &CommonArgs,
    /// Does the work; returns the one-line summary of a success.
    pub run: fn(A, &Context) -> Result<String>,
}

impl<A: clap::Parser> Worker<A> {
    pub fn main(self) -> ExitCode {
        tune_allocator();
        let args = match A::try_parse() {
            Ok(a) => a,
            Err(e) => return self.usage_error(e),
        };
        let common = (self.common)(&args).clone();
        crate::log::init(self.name, common.progress == ProgressMode::Json);
        let cancel = match CancelToken::from_signals() {
            Ok(c) => c,
            Err(e) => {
                return self.finish(&common, &Context::new(CancelToken::default()), Err(e), None)
            }
        };
        let ctx = Context::new(cancel);
        let metrics = match start_metrics(&common, &ctx) {
            Ok(m) => m,
            Err(e) => return self.finish(&common, &ctx, Err(e), None),
        };
        let reporter = Reporter::start(
            ctx.progress.clone(),
            common.progress,
            Duration::from_secs_f64(common.progress_interval.max(0.1)),
        );
        let outcome = (self.run)(args, &ctx);
        if outcome.is_ok() {
            ctx.progress.mark_succeeded();
        }
        reporter.stop();
        self.finish(&common, &ctx, outcome, metrics)
    }

    fn usage_error(&self, e: clap::Error) -> ExitCode {
        use clap::error::ErrorKind;
        if matches!(
            e.kind(),
            ErrorKind::DisplayHelp
                | ErrorKind::DisplayVersion
                | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
        ) {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        crate::log::init(self.name, false);
        let rendered = e.render().to_string();
        let first = rendered
            .lines()
            .next()
            .unwrap_or("invalid arguments")
            .trim_start_matches("error: ");
        let message = format!("{first} (see {} --help)", self.name);
        let classified = Classified {
            kind: Kind::Usage,
            reason: "InvalidArguments".into(),
            message,
        };
        // The flags did not parse as a whole; --termination-log may still be
        // among them.
        let log = termination_log_from_argv()
            .or_else(|| std::env::var_os("POPULATOR_TERMINATION_LOG").map(PathBuf::from));
        self.emit_failure(
            log.as_deref(),
            &Context::new(CancelToken::default()),
            &classified,
        );
        ExitCode::from(Kind::Usage.exit_code() as u8)
    }

    fn finish(
        &self,
        common: &CommonArgs,
        ctx: &Context,
        outcome: Result<String>,
        metrics: Option<MetricsServer>,
    ) -> ExitCode {
        let code = match outcome {
            Ok(summary) => {
                let result = self.result(ctx, "Succeeded", "Completed", &summary, None);
                write_result_somewhere(common.termination_log.as_deref(), &result);
                summary_line(
                    "Succeeded",
                    &format!("{}: Succeeded: {summary}", self.name),
                    &result,
                );
                0
            }
            Err(e) => {
                let mut classified = classify(&e);
                if ctx.cancel.is_cancelled() {
                    classified.kind = Kind::Terminated;
                    classified.reason = "Terminated".into();
                }
                self.emit_failure(common.termination_log.as_deref(), ctx, &classified);
                classified.kind.exit_code()
            }
        };
        if let Some(m) = metrics {
            m.linger_and_stop();
        }
        ExitCode::from(code as u8)
    }

    fn emit_failure(&self, log: Option<&std::path::Path>, ctx: &Context, c: &Classified) {
        let result = self.result(
            ctx,
            "Failed",
            &c.reason,
            &c.message,
            Some(c.kind.exit_code()),
        );
        write_result_somewhere(log, &result);
        let line = format!(
            "{}: Failed ({}, exit {}): {}",
            self.name,
            c.reason,
            c.kind.exit_code(),
            c.message
        );
        summary_line("Failed", &line, &result);
    }

    fn result(
        &self,
        ctx: &Context,
        status: &'static str,
        reason: &str,
        message: &str,
        exit_code: Option<i32>,
    ) -> WorkerResult {
        ctx.report.with(|r| WorkerResult {
            worker: self.name.into(),
            version: self.version.into(),
            status,
            reason: reason.into(),
            message: message.into(),
            target: r.target.clone(),
            bytes_read: ctx.progress.bytes_read(),
            bytes_written: ctx.progress.bytes_written(),
            digests: r.digests.clone(),
            duration_seconds: (ctx.progress.started.elapsed().as_secs_f64() * 1000.0).round()
                / 1000.0,
            exit_code,
            extra: r.extra.clone(),
        })
    }
}

/// The one summary line on stderr: plain text, or the result itself as a
/// JSON line with `--progress json`.
fn summary_line(status: &str, text: &str, result: &WorkerResult) {
    if crate::log::json_mode() {
        let mut v: serde_json::Value = serde_json::from_str(&result.to_json()).unwrap_or_default();
        v["event"] = "result".into();
        v["status"] = status.into();
        crate::log::print_line(&v.to_string());
    } else {
        crate::log::print_line(text);
    }
}

/// `--termination-log PATH` or `--termination-log=PATH` from the raw arguments.
fn termination_log_from_argv() -> Option<PathBuf> {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    args.iter().enumerate().find_map(|(i, a)| {
        let a = a.to_str()?;
        if a == "--termination-log" {
            args.get(i + 1).map(PathBuf::from)
        } else {
            a.strip_prefix("--termination-log=").map(PathBuf::from)
        }
    })
}

fn write_result_somewhere(explicit: Option<&std::path::Path>, result: &WorkerResult) {
    if let Some(path) = termination_log_path(explicit) {
        if let Err(e) = write_result(&path, result) {
            crate::log::warn(format!(
                "cannot write the result to {}: {e}",
                path.display()
            ));
        }
    }
}

fn start_metrics(common: &CommonArgs, ctx: &Context) -> Result<Option<MetricsServer>> {
    let Some(addr) = common.metrics_addr else {
        return Ok(None);
    };
    let options = MetricsOptions {
        addr,
        cert_file: common.metrics_cert_file.clone(),
        key_file: common.metrics_key_file.clone(),
        insecure_http: common.metrics_insecure_http,
        progress_name: common.metrics_progress_name.clone(),
        owner_uid: common.owner_uid.clone(),
        linger: Duration::from_secs_f64(common.metrics_linger.max(0.0)),
    };
    MetricsServer::start(options, ctx.progress.clone()).map(Some)
}

/// One allocator setting for every worker. Workers pass buffers of up to a
/// few MiB between threads (body frames, decoded chunks, pack ranges of up
/// to 4 MiB, blobs of up to 8 MiB). With glibc's defaults those above the
/// mmap threshold were mapped and unmapped each time, and freed heap memory
/// went back to the kernel: every reuse came back as fresh zeroed pages
/// (about 40,000 page faults per GiB received in upload-receiver; a tenth of
/// backup-restore's CPU in page faults and page clearing). Buffers up to
/// 16 MiB now come from the heap and up to 64 MiB of freed memory stays
/// there; four arenas instead of one per thread keep what is retained
/// bounded (with one per thread, backup-restore's eight writers kept about
/// 250 MB resident on a 1 GiB restore).
pub fn tune_allocator() {
    // SAFETY: mallopt only tunes the allocator; it takes plain integers.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 16 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 4);
    }
}
