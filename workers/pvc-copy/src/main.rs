//! pvc-copy: clones one volume into another, locally (`--source`/`--target`)
//! or over TLS (`send` on the source side, `receive` on the target side).
//! The mode is the first argument; each hands over to the core's entry wrapper.

mod block;
mod cli;
mod digest;
mod filecopy;
mod local;
mod meta;
mod net;
mod tree;
mod walk;

fn main() -> std::process::ExitCode {
    let version = env!("CARGO_PKG_VERSION");
    match std::env::args_os()
        .nth(1)
        .as_deref()
        .and_then(|a| a.to_str())
    {
        Some("send") => populator_core::Worker {
            name: "pvc-copy",
            version,
            common: |a: &cli::SendArgs| &a.common,
            run: net::send::run,
        }
        .main(),
        Some("receive") => populator_core::Worker {
            name: "pvc-copy",
            version,
            common: |a: &cli::ReceiveArgs| &a.common,
            run: net::receive::run,
        }
        .main(),
        _ => populator_core::Worker {
            name: "pvc-copy",
            version,
            common: |a: &cli::LocalArgs| &a.common,
            run: local::run,
        }
        .main(),
    }
}
