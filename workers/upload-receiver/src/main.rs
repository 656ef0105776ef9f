//! upload-receiver: receives one upload over HTTPS into a volume. The work
//! is in `receiver.rs` and its modules over the core crate; this only hands over.

mod auth;
mod cli;
mod digests;
mod pump;
mod receiver;
mod resumable;
mod server;
mod session;
mod tus;

fn main() -> std::process::ExitCode {
    populator_core::Worker {
        name: "upload-receiver",
        version: env!("CARGO_PKG_VERSION"),
        common: |args: &cli::Args| &args.common,
        run: receiver::run,
    }
    .main()
}
