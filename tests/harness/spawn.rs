//! Servers that live as long as the test process: spawned from a thread that
//! never ends, with PDEATHSIG (which fires when the spawning *thread* exits),
//! so they die with the tests however those end, and waited for until they
//! listen.

use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// Spawns `cmd` (named `what` in messages), its stdout and stderr going to
/// `log` when given, and returns its pid once it runs.
pub fn spawn_for_life(mut cmd: Command, what: &str, log: Option<PathBuf>) -> u32 {
    let (tx, rx) = std::sync::mpsc::channel();
    let what = what.to_string();
    std::thread::spawn(move || {
        if let Some(log) = log {
            let file = std::fs::File::create(&log)
                .unwrap_or_else(|e| panic!("creating {}: {e}", log.display()));
            cmd.stdout(file.try_clone().unwrap()).stderr(file);
        }
        // SAFETY: prctl in the child before exec, async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| {
            panic!("starting {what} (install it: scripts/install-test-deps.sh): {e}")
        });
        tx.send(child.id()).unwrap();
        // Waiting keeps this thread, and so the server, alive for the whole run.
        let _ = child.wait();
    });
    rx.recv()
        .expect("the server did not start (see the panic above)")
}

/// Whether every one of `ports` on `addr` accepts a connection within `within`.
pub fn wait_listening(addr: &str, ports: &[u16], within: Duration) -> bool {
    let start = Instant::now();
    loop {
        if ports
            .iter()
            .all(|&port| TcpStream::connect((addr, port)).is_ok())
        {
            return true;
        }
        if start.elapsed() >= within {
            return false;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}
