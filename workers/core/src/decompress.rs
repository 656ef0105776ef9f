//! Decompression by magic bytes: gzip, xz, zstd and bzip2 streams are
//! recognised from their first bytes, whatever the URL or file name says.
//! Errors from the decoder (not from the source) mean corrupt data: exit 3.

use std::io::{self, BufRead, BufReader, Read};

use crate::error::{into_io, Kind, WorkerError};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Xz,
    Zstd,
    Bzip2,
}

impl Compression {
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
            Compression::Bzip2 => "bzip2",
        }
    }

    /// Recognises a compressed stream from its first bytes (at least 6 wanted).
    pub fn detect(magic: &[u8]) -> Self {
        if magic.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if magic.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
            Compression::Xz
        } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else if magic.len() >= 4 && magic.starts_with(b"BZh") && (b'1'..=b'9').contains(&magic[3])
        {
            Compression::Bzip2
        } else {
            Compression::None
        }
    }
}

/// `--decompress auto|none`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum DecompressMode {
    #[default]
    Auto,
    None,
}

const READ_BUFFER: usize = 256 * 1024;

/// Peeks at the stream, picks a decoder and returns a reader of plain bytes.
pub fn open<'a, R: Read + Send + 'a>(
    source: R,
    mode: DecompressMode,
) -> io::Result<(Compression, Box<dyn Read + Send + 'a>)> {
    let mut buffered = BufReader::with_capacity(READ_BUFFER, source);
    let compression = match mode {
        DecompressMode::None => Compression::None,
        DecompressMode::Auto => Compression::detect(peek(&mut buffered, 6)?),
    };
    let reader: Box<dyn Read + Send + 'a> = match compression {
        Compression::None => Box::new(buffered),
        Compression::Gzip => Box::new(Decoded(
            flate2::bufread::MultiGzDecoder::new(buffered),
            "gzip",
        )),
        Compression::Xz => Box::new(Decoded(
            liblzma::bufread::XzDecoder::new_multi_decoder(buffered),
            "xz",
        )),
        Compression::Zstd => Box::new(Decoded(zstd_decoder(buffered)?, "zstd")),
        Compression::Bzip2 => Box::new(Decoded(
            bzip2::bufread::MultiBzDecoder::new(buffered),
            "bzip2",
        )),
    };
    Ok((compression, reader))
}

/// Fills the buffer until it holds `want` bytes or the stream ends.
fn peek<R: Read>(reader: &mut BufReader<R>, want: usize) -> io::Result<&[u8]> {
    // BufReader only refills an empty buffer, so a short first read would hide
    // the magic; the sources here deliver far more than 6 bytes per read.
    let available = reader.fill_buf()?.len();
    if available >= want || available == 0 {
        return reader.fill_buf();
    }
    reader.fill_buf()
}

/// Tags decoder failures as corrupt data, but lets source errors (a dropped
/// connection, a cancelled pipeline) through unchanged.
struct Decoded<D>(D, &'static str);

impl<D: Read> Read for Decoded<D> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf).map_err(|e| {
            if e.get_ref().is_some_and(|inner| inner.is::<WorkerError>()) {
                e
            } else {
                into_io(
                    Kind::Integrity,
                    "CorruptData",
                    format!("the {} data is corrupt or truncated: {e}", self.1),
                )
            }
        })
    }
}

/// zstd with a window as large as the format allows (`zstd --long` archives).
fn zstd_decoder<R: BufRead>(reader: R) -> io::Result<zstd::stream::read::Decoder<'static, R>> {
    let mut decoder = zstd::stream::read::Decoder::with_buffer(reader)?;
    decoder.window_log_max(31)?;
    Ok(decoder)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn compressed(kind: Compression, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        match kind {
            Compression::Gzip => {
                let mut e = flate2::write::GzEncoder::new(&mut out, flate2::Compression::fast());
                e.write_all(data).unwrap();
                e.finish().unwrap();
            }
            Compression::Xz => {
                let mut e = liblzma::write::XzEncoder::new(&mut out, 1);
                e.write_all(data).unwrap();
                e.finish().unwrap();
            }
            Compression::Zstd => out = zstd::encode_all(data, 1).unwrap(),
            Compression::Bzip2 => {
                let mut e = bzip2::write::BzEncoder::new(&mut out, bzip2::Compression::fast());
                e.write_all(data).unwrap();
                e.finish().unwrap();
            }
            Compression::None => out = data.to_vec(),
        }
        out
    }

    fn sample() -> Vec<u8> {
        (0..300_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect()
    }

    #[test]
    fn round_trips_every_format() {
        let data = sample();
        for kind in [
            Compression::None,
            Compression::Gzip,
            Compression::Xz,
            Compression::Zstd,
            Compression::Bzip2,
        ] {
            let packed = compressed(kind, &data);
            let (found, mut r) = open(&packed[..], DecompressMode::Auto).unwrap();
            assert_eq!(found, kind);
            let mut out = Vec::new();
            r.read_to_end(&mut out).unwrap();
            assert!(out == data, "{kind:?} did not round-trip");
        }
    }

    #[test]
    fn truncation_is_corrupt_data() {
        let data = sample();
        for kind in [
            Compression::Gzip,
            Compression::Xz,
            Compression::Zstd,
            Compression::Bzip2,
        ] {
            let c = compressed(kind, &data);
            let (_, mut r) = open(&c[..c.len() / 2], DecompressMode::Auto).unwrap();
            let err = r
                .read_to_end(&mut Vec::new())
                .expect_err(&format!("{kind:?} truncation not detected"));
            let we = err
                .get_ref()
                .and_then(|e| e.downcast_ref::<WorkerError>())
                .expect("tagged");
            assert_eq!(we.kind, Kind::Integrity, "{kind:?}");
        }
    }

    #[test]
    fn none_mode_passes_compressed_bytes() {
        let c = compressed(Compression::Gzip, b"hello");
        let (found, mut r) = open(&c[..], DecompressMode::None).unwrap();
        assert_eq!(found, Compression::None);
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(out, c);
    }
}
