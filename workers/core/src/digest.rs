//! Integrity: `--checksum ALGO:HEX` (md5, sha1, sha256, sha512), computed while
//! the bytes stream past. sha256 is always computed, because the result always
//! carries it.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use sha2::Digest as _;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Algorithm {
    Md5,
    Sha1,
    Sha256,
    Sha512,
}

impl Algorithm {
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Md5 => "md5",
            Algorithm::Sha1 => "sha1",
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algorithm::Md5 => 32,
            Algorithm::Sha1 => 40,
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

/// One expected digest, as given by `--checksum ALGO:HEX`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checksum {
    pub algorithm: Algorithm,
    pub hex: String,
}

impl FromStr for Checksum {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (algo, hex) = s
            .split_once(':')
            .ok_or_else(|| format!("'{s}' is not ALGO:HEX (for example sha256:9f86d0…)"))?;
        let algorithm = match algo.to_ascii_lowercase().as_str() {
            "md5" => Algorithm::Md5,
            "sha1" => Algorithm::Sha1,
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            other => {
                return Err(format!(
                    "unknown checksum algorithm '{other}' (use md5, sha1, sha256 or sha512)"
                ))
            }
        };
        let hex = hex.trim().to_ascii_lowercase();
        if hex.len() != algorithm.hex_len() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "a {} checksum is {} hex digits, got '{hex}'",
                algorithm.name(),
                algorithm.hex_len()
            ));
        }
        Ok(Checksum { algorithm, hex })
    }
}

impl fmt::Display for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.name(), self.hex)
    }
}

enum Hasher {
    Md5(md5::Md5),
    Sha1(sha1::Sha1),
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Hasher {
    fn new(algorithm: Algorithm) -> Self {
        match algorithm {
            Algorithm::Md5 => Hasher::Md5(md5::Md5::new()),
            Algorithm::Sha1 => Hasher::Sha1(sha1::Sha1::new()),
            Algorithm::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }

    fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Md5(h) => h.update(data),
            Hasher::Sha1(h) => h.update(data),
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    fn finish(self) -> String {
        match self {
            Hasher::Md5(h) => hex::encode(h.finalize()),
            Hasher::Sha1(h) => hex::encode(h.finalize()),
            Hasher::Sha256(h) => hex::encode(h.finalize()),
            Hasher::Sha512(h) => hex::encode(h.finalize()),
        }
    }
}

/// Several digests over the same stream: sha256 plus whatever was asked for.
pub struct MultiDigest {
    hashers: Vec<(Algorithm, Hasher)>,
}

impl MultiDigest {
    pub fn new(expected: &[Checksum]) -> Self {
        let mut algorithms: Vec<Algorithm> = expected.iter().map(|c| c.algorithm).collect();
        algorithms.push(Algorithm::Sha256);
        algorithms.sort();
        algorithms.dedup();
        Self {
            hashers: algorithms
                .into_iter()
                .map(|a| (a, Hasher::new(a)))
                .collect(),
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        for (_, h) in &mut self.hashers {
            h.update(data);
        }
    }

    pub fn finish(self) -> Digests {
        Digests(
            self.hashers
                .into_iter()
                .map(|(a, h)| (a.name().to_string(), h.finish()))
                .collect(),
        )
    }
}

/// Finished digests by algorithm name, as they appear in the result.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Digests(pub BTreeMap<String, String>);

impl Digests {
    /// The first expected checksum that does not match, as a message.
    pub fn mismatch(&self, expected: &[Checksum]) -> Option<String> {
        expected.iter().find_map(|c| {
            let got = self.0.get(c.algorithm.name())?;
            (got != &c.hex).then(|| {
                format!(
                    "{} checksum mismatch: expected {}, got {got}",
                    c.algorithm.name(),
                    c.hex
                )
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_verifies() {
        let c: Checksum = "SHA256:2CF24DBA5FB0A30E26E83B2AC5B9E29E1B161E5C1FA7425E73043362938B9824"
            .parse()
            .unwrap();
        let mut d = MultiDigest::new(&[
            c.clone(),
            "md5:5d41402abc4b2a76b9719d911017c592".parse().unwrap(),
        ]);
        d.update(b"hel");
        d.update(b"lo");
        let out = d.finish();
        assert_eq!(out.0.len(), 2);
        assert_eq!(out.mismatch(&[c]), None);
        let wrong: Checksum = "md5:00000000000000000000000000000000".parse().unwrap();
        assert!(out
            .mismatch(&[wrong])
            .unwrap()
            .contains("md5 checksum mismatch"));
    }

    #[test]
    fn rejects_bad_specs() {
        assert!("sha256".parse::<Checksum>().is_err());
        assert!("crc32:abcd"
            .parse::<Checksum>()
            .unwrap_err()
            .contains("unknown checksum algorithm"));
        assert!("sha1:abc"
            .parse::<Checksum>()
            .unwrap_err()
            .contains("40 hex digits"));
    }
}
