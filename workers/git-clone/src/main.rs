//! git-clone: fills a volume with a Git repository checked out at a pinned
//! ref. The work is in `clone.rs` over the core crate; this only hands over.

mod auth;
mod checkout;
mod cli;
mod clone;
mod errors;
mod fetch;
mod known_hosts;
mod repo_url;
mod submodules;

fn main() -> std::process::ExitCode {
    populator_core::Worker {
        name: "git-clone",
        version: env!("CARGO_PKG_VERSION"),
        common: |args: &cli::Args| &args.common,
        run: clone::run,
    }
    .main()
}
