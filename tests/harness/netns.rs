//! Two network namespaces joined by a veth pair: a real network hop between
//! a sender and a receiver on one machine. Names are unique per test
//! process and pair; both namespaces (and so the veth pair) go on drop.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::sh;

pub struct NetnsPair {
    pub a: String,
    pub b: String,
    /// The address of `a` on the veth link, reachable from `b`.
    pub addr_a: String,
    pub addr_b: String,
}

impl NetnsPair {
    pub fn new() -> NetnsPair {
        crate::require_root();
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let tag = format!("{}{}", pid % 100_000, n);
        // Each pair has namespaces of its own, so the addresses never clash.
        let pair = NetnsPair {
            a: format!("pca{tag}"),
            b: format!("pcb{tag}"),
            addr_a: "10.99.0.1".into(),
            addr_b: "10.99.0.2".into(),
        };
        let (va, vb) = (format!("va{tag}"), format!("vb{tag}"));
        sh(&format!(
            "set -e
             ip netns add {a}; ip netns add {b}
             ip link add {va} netns {a} type veth peer name {vb} netns {b}
             ip -n {a} addr add {addr_a}/30 dev {va}; ip -n {b} addr add {addr_b}/30 dev {vb}
             ip -n {a} link set {va} up; ip -n {b} link set {vb} up
             ip -n {a} link set lo up; ip -n {b} link set lo up",
            a = pair.a,
            b = pair.b,
            addr_a = pair.addr_a,
            addr_b = pair.addr_b,
        ));
        pair
    }
}

impl Default for NetnsPair {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .status();
        }
    }
}

/// Moves the calling thread into network namespace `ns` (sockets it creates
/// afterwards live there, whichever thread uses them).
pub fn enter(ns: &str) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(format!("/var/run/netns/{ns}"))
        .unwrap_or_else(|e| panic!("opening network namespace {ns}: {e}"));
    // SAFETY: setns on a valid namespace descriptor affects only this thread.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {ns}: {}", std::io::Error::last_os_error());
}
