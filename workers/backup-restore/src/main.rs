//! backup-restore: fills a volume from a backup (a restic snapshot, a tar
//! archive or a disk image). The work is in `run.rs` and the modules it
//! calls; this only hands over to the core's entry wrapper.

mod cli;
mod repo;
mod restore;
mod run;
mod s3;
mod stream;

fn main() -> std::process::ExitCode {
    populator_core::Worker {
        name: "backup-restore",
        version: env!("CARGO_PKG_VERSION"),
        common: |args: &cli::Args| &args.common,
        run: run::run,
    }
    .main()
}
