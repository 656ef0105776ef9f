//! Test data: reproducible pseudo-random bytes (incompressible), zero runs,
//! and digests of files.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use sha2::{Digest, Sha256};

/// xorshift64*: fast, reproducible, incompressible enough for zstd/gzip.
pub struct Noise(u64);

impl Noise {
    pub fn new(seed: u64) -> Self {
        Noise(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// `size` bytes of noise in `name` under the process's shared fixtures
/// directory, made once per test process.
pub fn random_fixture(name: &str, size: u64, seed: u64) -> PathBuf {
    let path = crate::shared_dir("fixtures").join(name);
    random_file(&path, size, seed);
    path
}

/// Writes `size` bytes of noise to `path` (once: an existing file of the
/// right size is kept, so tests in one process share fixtures).
pub fn random_file(path: &Path, size: u64, seed: u64) {
    if std::fs::metadata(path).is_ok_and(|m| m.len() == size) {
        return;
    }
    write_atomically(path, |tmp| {
        let mut out = BufWriter::with_capacity(1 << 20, File::create(tmp).unwrap());
        let mut noise = Noise::new(seed);
        let mut buf = vec![0u8; 1 << 20];
        let mut left = size;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            noise.fill(&mut buf[..n]);
            out.write_all(&buf[..n]).unwrap();
            left -= n as u64;
        }
        out.flush().unwrap();
    });
}

/// Makes `path` with `write` under a name no other writer uses, then renames
/// it into place: parallel tests asking for the same fixture each write
/// their own copy, and a reader never sees a partial file.
fn write_atomically(path: &Path, write: impl FnOnce(&Path)) {
    static N: AtomicUsize = AtomicUsize::new(0);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(
        ".tmp-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let tmp = PathBuf::from(tmp);
    write(&tmp);
    std::fs::rename(&tmp, path).unwrap();
}

/// A file where only every `period`-th MiB holds data and the rest is zeros
/// (written sparse, so the fixture itself costs little disk).
pub fn mostly_zero_file(path: &Path, size: u64, period: u64, seed: u64) {
    if std::fs::metadata(path).is_ok_and(|m| m.len() == size) {
        return;
    }
    write_atomically(path, |tmp| {
        let file = File::create(tmp).unwrap();
        let mut noise = Noise::new(seed);
        let mut buf = vec![0u8; 1 << 20];
        let mib = size.div_ceil(1 << 20);
        for i in (0..mib).step_by(period as usize) {
            noise.fill(&mut buf);
            let n = ((size - i * (1 << 20)).min(1 << 20)) as usize;
            std::os::unix::fs::FileExt::write_all_at(&file, &buf[..n], i << 20).unwrap();
        }
        file.set_len(size).unwrap();
    });
}

/// Writes a secret file the way Kubernetes mounts one: the value and a
/// newline (which the workers must strip).
pub fn secret_file(dir: &Path, name: &str, value: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("{value}\n")).unwrap();
    path
}

pub fn sha256_file(path: &Path) -> String {
    let mut file = File::open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    sha256_reader(&mut file)
}

/// sha256 of the first `len` bytes of a file or device.
pub fn sha256_prefix(path: &Path, len: u64) -> String {
    let file = File::open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    sha256_reader(&mut file.take(len))
}

pub fn sha256_reader(r: &mut dyn Read) -> String {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex::encode(h.finalize())
}

pub fn sha256_bytes(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}
