//! Network mode: `pvc-copy send` streams a volume to `pvc-copy receive` over
//! TLS with several parallel streams; the receiver keeps its progress in the
//! target so a dropped connection or a restarted receiver resumes, and both
//! sides compare digests before either says Succeeded.

pub mod proto;
pub mod receive;
pub mod send;
pub mod tls;

use std::net::TcpStream;
use std::time::Duration;

/// Connections give up on a silent peer after this long.
pub const IO_TIMEOUT: Duration = Duration::from_secs(300);

pub fn tune(tcp: &TcpStream) {
    let _ = tcp.set_nodelay(true);
    let _ = tcp.set_read_timeout(Some(IO_TIMEOUT));
    let _ = tcp.set_write_timeout(Some(IO_TIMEOUT));
}

/// Constant-time comparison, so a wrong token's length of match is not timed.
pub fn same_token(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
