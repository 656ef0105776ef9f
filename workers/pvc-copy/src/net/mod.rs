//! Network mode: `pvc-copy send` streams a volume to `pvc-copy receive` over
//! TLS with several parallel streams; the receiver keeps its progress in the
//! target so a dropped connection or a restarted receiver resumes, and both
//! sides compare digests before either says Succeeded.

pub mod proto;
pub mod receive;
pub mod send;
pub mod tls;

use std::io::{self, BufRead, BufReader, Read, Write};
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

/// Bytes of TLS records fetched from the socket per read: rustls asks for
/// one record (16 KiB) at a time, so without this a 4 MiB chunk costs 256
/// reads.
const READ_BUFFER: usize = 512 << 10;
/// Encrypted bytes rustls may queue before a write waits for the socket:
/// its default (64 KiB) makes 64 writes per 4 MiB chunk.
pub const SEND_BUFFER: usize = 1 << 20;

/// A socket read through a large buffer, written directly.
pub struct Sock(BufReader<TcpStream>);

impl Sock {
    pub fn new(tcp: TcpStream) -> Sock {
        Sock(BufReader::with_capacity(READ_BUFFER, tcp))
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // rustls reads into its own buffer: copy what is buffered, or fill
        // the buffer with one large read.
        let available = self.0.fill_buf()?;
        let n = available.len().min(buf.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.0.consume(n);
        Ok(n)
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.get_mut().write(buf)
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.0.get_mut().write_vectored(bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.get_mut().flush()
    }
}
