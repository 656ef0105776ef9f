//! Log lines on stderr, prefixed with the worker's name; JSON lines when
//! `--progress json` is chosen, so a consumer parses one format. Lines never
//! tear a progress bar: while a bar is drawn they go through it.

use std::sync::{Mutex, OnceLock};

static WORKER: OnceLock<&'static str> = OnceLock::new();
static JSON: OnceLock<bool> = OnceLock::new();
static BAR: Mutex<Option<indicatif::ProgressBar>> = Mutex::new(None);

pub(crate) fn init(worker: &'static str, json: bool) {
    let _ = WORKER.set(worker);
    let _ = JSON.set(json);
}

pub(crate) fn set_bar(bar: Option<indicatif::ProgressBar>) {
    *BAR.lock().unwrap_or_else(|e| e.into_inner()) = bar;
}

pub fn worker_name() -> &'static str {
    WORKER.get().copied().unwrap_or("populator")
}

pub(crate) fn json_mode() -> bool {
    JSON.get().copied().unwrap_or(false)
}

fn emit(level: &str, message: &str) {
    let line = if json_mode() {
        serde_json::json!({"level": level, "worker": worker_name(), "message": message}).to_string()
    } else if level == "info" {
        format!("{}: {message}", worker_name())
    } else {
        format!("{}: {level}: {message}", worker_name())
    };
    print_line(&line);
}

/// Prints a whole line on stderr, through the progress bar when one is drawn.
pub(crate) fn print_line(line: &str) {
    let bar = BAR.lock().unwrap_or_else(|e| e.into_inner());
    match bar.as_ref() {
        Some(b) => b.println(line),
        None => eprintln!("{line}"),
    }
}

pub fn info(message: impl AsRef<str>) {
    emit("info", message.as_ref());
}

pub fn warn(message: impl AsRef<str>) {
    emit("warning", message.as_ref());
}
