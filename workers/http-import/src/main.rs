//! http-import: fills a volume from an HTTP(S) URL. All the work is in
//! `import.rs` over the core crate; this only hands over.

mod cli;
mod import;

fn main() -> std::process::ExitCode {
    populator_core::Worker {
        name: "http-import",
        version: env!("CARGO_PKG_VERSION"),
        common: |args: &cli::Args| &args.common,
        run: import::run,
    }
    .main()
}
