//! Progress: one shared state that the pipeline stages advance and that the
//! reporters (a bar on a terminal, log lines, JSON lines) and the metrics
//! endpoint read. The percent is never invented (no total, no percent), only
//! rises, and reaches 100 only on success.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::target::short_bytes;

/// `--progress`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum ProgressMode {
    /// A bar on a terminal, log lines otherwise.
    #[default]
    Auto,
    Bar,
    Log,
    Json,
    None,
}

#[derive(Debug)]
pub struct Progress {
    stage: Mutex<String>,
    done: AtomicU64,
    /// 0 when unknown.
    total: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    /// Highest percent reported so far, in thousandths, so it never falls.
    high_water: AtomicU64,
    succeeded: AtomicBool,
    /// Set when `done` counts produced bytes (a converted disk image) rather
    /// than source bytes: the source's own `advance`/`set_total` are ignored.
    counts_output: AtomicBool,
    /// Files finished, and how many there will be (0: unknown), for workers
    /// that produce many files (archives, backups).
    files_done: AtomicU64,
    files_total: AtomicU64,
    pub started: Instant,
}

impl Default for Progress {
    fn default() -> Self {
        Self {
            stage: Mutex::new("starting".into()),
            done: AtomicU64::new(0),
            total: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            high_water: AtomicU64::new(0),
            succeeded: AtomicBool::new(false),
            counts_output: AtomicBool::new(false),
            files_done: AtomicU64::new(0),
            files_total: AtomicU64::new(0),
            started: Instant::now(),
        }
    }
}

impl Progress {
    pub fn set_stage(&self, stage: &str) {
        *self.stage.lock().unwrap_or_else(|e| e.into_inner()) = stage.to_string();
    }

    pub fn stage(&self) -> String {
        self.stage.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The size that `done` counts toward, when known.
    pub fn set_total(&self, total: Option<u64>) {
        if self.counts_output.load(Ordering::Relaxed) {
            return;
        }
        self.total.store(total.unwrap_or(0), Ordering::Relaxed);
    }

    pub fn total(&self) -> Option<u64> {
        Some(self.total.load(Ordering::Relaxed)).filter(|&t| t > 0)
    }

    pub fn advance(&self, n: u64) {
        if self.counts_output.load(Ordering::Relaxed) {
            return;
        }
        self.done.fetch_add(n, Ordering::Relaxed);
    }

    /// From now on `done` counts produced bytes toward `total` (the virtual
    /// size of a disk image), advanced only by [`Progress::advance_output`].
    pub fn count_output(&self, total: u64) {
        self.counts_output.store(true, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
        self.done.store(0, Ordering::Relaxed);
    }

    /// Produced bytes, when [`Progress::count_output`] is in force.
    pub fn advance_output(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }

    /// Back to zero when a transfer starts over; the reported percent holds.
    pub fn restart(&self) {
        self.done.store(0, Ordering::Relaxed);
        self.bytes_written.store(0, Ordering::Relaxed);
    }

    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    pub fn add_read(&self, n: u64) {
        self.bytes_read.fetch_add(n, Ordering::Relaxed);
    }

    pub fn add_written(&self, n: u64) {
        self.bytes_written.fetch_add(n, Ordering::Relaxed);
    }

    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }

    pub fn bytes_written(&self) -> u64 {
        self.bytes_written.load(Ordering::Relaxed)
    }

    /// The number of files the run will produce, when known.
    pub fn set_files_total(&self, total: Option<u64>) {
        self.files_total
            .store(total.unwrap_or(0), Ordering::Relaxed);
    }

    pub fn add_file_done(&self) {
        self.files_done.fetch_add(1, Ordering::Relaxed);
    }

    pub fn files_done(&self) -> u64 {
        self.files_done.load(Ordering::Relaxed)
    }

    pub fn files_total(&self) -> Option<u64> {
        Some(self.files_total.load(Ordering::Relaxed)).filter(|&t| t > 0)
    }

    pub fn mark_succeeded(&self) {
        self.succeeded.store(true, Ordering::SeqCst);
    }

    /// Percent 0–100, `None` while the total is unknown. Below 100 until success.
    pub fn percent(&self) -> Option<f64> {
        if self.succeeded.load(Ordering::SeqCst) {
            return Some(100.0);
        }
        let total = self.total()?;
        let now = (self.done() as f64 / total as f64 * 100_000.0).min(99_999.0) as u64;
        let high = self.high_water.fetch_max(now, Ordering::Relaxed).max(now);
        Some(high as f64 / 1000.0)
    }
}

/// A running reporter; stop it to print the final state.
pub struct Reporter {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Reporter {
    pub fn start(progress: Arc<Progress>, mode: ProgressMode, interval: Duration) -> Reporter {
        let stop = Arc::new(AtomicBool::new(false));
        let mode = match mode {
            ProgressMode::Auto if std::io::stderr().is_terminal() => ProgressMode::Bar,
            ProgressMode::Auto => ProgressMode::Log,
            other => other,
        };
        let handle = (mode != ProgressMode::None).then(|| {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("progress".into())
                .spawn(move || report_loop(&progress, mode, interval, &stop))
                .expect("spawning the progress thread")
        });
        Reporter { stop, handle }
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn report_loop(progress: &Progress, mode: ProgressMode, interval: Duration, stop: &AtomicBool) {
    let bar = (mode == ProgressMode::Bar).then(new_bar);
    crate::log::set_bar(bar.clone());
    let tick = if bar.is_some() {
        Duration::from_millis(200)
    } else {
        Duration::from_millis(100)
    };
    let mut last_line = Instant::now();
    let mut rate = RateMeter::new(progress.done());
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        if let Some(bar) = &bar {
            bar.set_message(progress.stage());
            match progress.total() {
                Some(t) => bar.set_length(t),
                None => bar.unset_length(),
            }
            bar.set_position(progress.done());
        } else if stopping || last_line.elapsed() >= interval {
            let bps = rate.sample(progress.done());
            crate::log::print_line(&render_line(progress, mode == ProgressMode::Json, bps));
            last_line = Instant::now();
        }
        if stopping {
            break;
        }
        std::thread::sleep(tick);
    }
    if let Some(bar) = bar {
        crate::log::set_bar(None);
        bar.abandon();
    }
}

fn new_bar() -> indicatif::ProgressBar {
    let bar =
        indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:12} [{bar:40}] {percent:>3}% {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar
}

/// Bytes per second over the last reporting interval.
struct RateMeter {
    at: Instant,
    done: u64,
}

impl RateMeter {
    fn new(done: u64) -> Self {
        Self {
            at: Instant::now(),
            done,
        }
    }

    fn sample(&mut self, done: u64) -> f64 {
        let secs = self.at.elapsed().as_secs_f64().max(1e-3);
        let rate = done.saturating_sub(self.done) as f64 / secs;
        *self = Self::new(done);
        rate
    }
}

fn render_line(progress: &Progress, json: bool, bps: f64) -> String {
    let done = progress.done();
    let total = progress.total();
    let percent = progress.percent();
    let eta = total
        .filter(|_| bps > 0.0)
        .map(|t| t.saturating_sub(done) as f64 / bps);
    if json {
        return serde_json::json!({
            "event": "progress",
            "worker": crate::log::worker_name(),
            "stage": progress.stage(),
            "percent": percent,
            "bytes": done,
            "totalBytes": total,
            "bytesPerSecond": bps.round(),
            "etaSeconds": eta.map(f64::round),
            "files": progress.files_done(),
            "totalFiles": progress.files_total(),
        })
        .to_string();
    }
    let mut line = format!("{}: {}", crate::log::worker_name(), progress.stage());
    if let Some(p) = percent {
        line.push_str(&format!(" {p:.1}%"));
    }
    line.push_str(&format!(" {}", short_bytes(done)));
    if let Some(t) = total {
        line.push_str(&format!(" of {}", short_bytes(t)));
    }
    let files = progress.files_done();
    match progress.files_total() {
        Some(t) => line.push_str(&format!(", {files} of {t} files")),
        None if files > 0 => line.push_str(&format!(", {files} files")),
        None => {}
    }
    line.push_str(&format!(" at {}/s", short_bytes(bps as u64)));
    if let Some(e) = eta {
        line.push_str(&format!(", ETA {}s", e.ceil() as u64));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_unknown_then_monotonic_then_100_only_on_success() {
        let p = Progress::default();
        p.advance(50);
        assert_eq!(p.percent(), None);
        p.set_total(Some(100));
        assert_eq!(p.percent(), Some(50.0));
        p.restart();
        assert_eq!(
            p.percent(),
            Some(50.0),
            "restart must not lower the percent"
        );
        p.advance(100);
        assert_eq!(p.percent(), Some(99.999));
        p.mark_succeeded();
        assert_eq!(p.percent(), Some(100.0));
    }

    #[test]
    fn json_line_has_fields() {
        let p = Progress::default();
        p.set_total(Some(200));
        p.advance(100);
        let v: serde_json::Value = serde_json::from_str(&render_line(&p, true, 10.0)).unwrap();
        assert_eq!(v["percent"], 50.0);
        assert_eq!(v["etaSeconds"], 10.0);
    }
}
