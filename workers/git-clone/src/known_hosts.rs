//! OpenSSH known_hosts files: plain and hashed (`|1|salt|hash`) host
//! patterns with wildcards and negation, `[host]:port` for other ports, and
//! `@revoked` keys. The host key an SSH server offers is checked strictly
//! against them.

use std::path::Path;

use anyhow::Result;
use populator_core::error::{fail, Kind};
use sha1::{Digest, Sha1};

#[derive(Clone, Debug)]
pub struct KnownHosts {
    entries: Vec<Entry>,
}

#[derive(Clone, Debug)]
struct Entry {
    revoked: bool,
    hosts: Hosts,
    key_type: String,
    key: Vec<u8>,
}

#[derive(Clone, Debug)]
enum Hosts {
    Patterns(Vec<String>),
    Hashed { salt: Vec<u8>, hash: Vec<u8> },
}

/// What the known_hosts file says about a host's key.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Known,
    /// The host is listed with other keys of the same type: it changed.
    Changed,
    /// The host is listed, but only with keys of other types.
    OtherTypes(Vec<String>),
    Unknown,
    Revoked,
}

impl KnownHosts {
    pub fn load(path: &Path) -> Result<KnownHosts> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            fail(
                Kind::Usage,
                "SecretUnreadable",
                format!("cannot read the known_hosts file {}: {e}", path.display()),
            )
        })?;
        let entries: Vec<Entry> = text.lines().filter_map(parse_line).collect();
        if entries.is_empty() {
            return Err(fail(
                Kind::Usage,
                "InvalidConfiguration",
                format!(
                    "the known_hosts file {} holds no host key (ssh-keyscan -p PORT HOST writes lines for it)",
                    path.display()
                ),
            ));
        }
        Ok(KnownHosts { entries })
    }

    /// Checks `key` (the raw key blob the server sent) for `host` on `port`.
    pub fn check(&self, host: &str, port: u16, key: &[u8]) -> Verdict {
        let name = if port == 22 {
            host.to_ascii_lowercase()
        } else {
            format!("[{}]:{port}", host.to_ascii_lowercase())
        };
        let offered_type = key_type_of(key);
        let mut same_type_other_key = false;
        let mut other_types = Vec::new();
        let mut known = false;
        for e in self.entries.iter().filter(|e| e.hosts.matches(&name)) {
            if e.key == key {
                if e.revoked {
                    return Verdict::Revoked;
                }
                known = true;
            } else if !e.revoked {
                if Some(e.key_type.as_str()) == offered_type.as_deref() {
                    same_type_other_key = true;
                } else {
                    other_types.push(e.key_type.clone());
                }
            }
        }
        match (known, same_type_other_key, other_types.is_empty()) {
            (true, _, _) => Verdict::Known,
            (false, true, _) => Verdict::Changed,
            (false, false, false) => Verdict::OtherTypes(other_types),
            (false, false, true) => Verdict::Unknown,
        }
    }
}

fn parse_line(line: &str) -> Option<Entry> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let mut fields = line.split_whitespace();
    let mut first = fields.next()?;
    let mut revoked = false;
    if first.starts_with('@') {
        match first {
            "@revoked" => revoked = true,
            // Certificate authorities need certificate support; skip them.
            _ => return None,
        }
        first = fields.next()?;
    }
    let key_type = fields.next()?.to_string();
    let key = base64_decode(fields.next()?)?;
    let hosts = if let Some(rest) = first.strip_prefix("|1|") {
        let (salt, hash) = rest.split_once('|')?;
        Hosts::Hashed {
            salt: base64_decode(salt)?,
            hash: base64_decode(hash)?,
        }
    } else {
        Hosts::Patterns(first.split(',').map(|p| p.to_ascii_lowercase()).collect())
    };
    Some(Entry {
        revoked,
        hosts,
        key_type,
        key,
    })
}

impl Hosts {
    fn matches(&self, name: &str) -> bool {
        match self {
            Hosts::Hashed { salt, hash } => hmac_sha1(salt, name.as_bytes()).as_slice() == hash,
            Hosts::Patterns(patterns) => {
                let mut matched = false;
                for p in patterns {
                    if let Some(neg) = p.strip_prefix('!') {
                        if glob(neg.as_bytes(), name.as_bytes()) {
                            return false;
                        }
                    } else if glob(p.as_bytes(), name.as_bytes()) {
                        matched = true;
                    }
                }
                matched
            }
        }
    }
}

/// `*` and `?` wildcards, as OpenSSH's match_pattern.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    match (pattern.first(), text.first()) {
        (None, None) => true,
        (Some(b'*'), _) => {
            glob(&pattern[1..], text) || (!text.is_empty() && glob(pattern, &text[1..]))
        }
        (Some(b'?'), Some(_)) => glob(&pattern[1..], &text[1..]),
        (Some(p), Some(t)) if p == t => glob(&pattern[1..], &text[1..]),
        _ => false,
    }
}

/// The key type named inside an SSH key blob (a length-prefixed string).
fn key_type_of(blob: &[u8]) -> Option<String> {
    let len = u32::from_be_bytes(blob.get(..4)?.try_into().ok()?) as usize;
    String::from_utf8(blob.get(4..4 + len)?.to_vec()).ok()
}

fn hmac_sha1(key: &[u8], message: &[u8]) -> [u8; 20] {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..20].copy_from_slice(&Sha1::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.map(|b| b ^ byte);
    let inner = Sha1::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    Sha1::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => return None,
        };
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";

    fn hosts(text: &str) -> KnownHosts {
        KnownHosts {
            entries: text.lines().filter_map(parse_line).collect(),
        }
    }

    #[test]
    fn plain_ports_and_patterns() {
        let key = base64_decode(KEY).unwrap();
        let kh = hosts(&format!(
            "[127.0.0.1]:2222 ssh-ed25519 {KEY}\n*.example.com,!bad.example.com ssh-ed25519 {KEY}"
        ));
        assert_eq!(kh.check("127.0.0.1", 2222, &key), Verdict::Known);
        assert_eq!(kh.check("127.0.0.1", 22, &key), Verdict::Unknown);
        assert_eq!(kh.check("git.example.com", 22, &key), Verdict::Known);
        assert_eq!(kh.check("bad.example.com", 22, &key), Verdict::Unknown);
        let mut other = key.clone();
        *other.last_mut().unwrap() ^= 1;
        assert_eq!(kh.check("127.0.0.1", 2222, &other), Verdict::Changed);
    }

    #[test]
    fn hashed_and_revoked() {
        // `ssh-keygen -H` of "[127.0.0.1]:2222" with this salt.
        let salt = b"0123456789abcdefghij";
        let hash = hmac_sha1(salt, b"[127.0.0.1]:2222");
        let enc = |b: &[u8]| {
            let t = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
            let mut s = String::new();
            for c in b.chunks(3) {
                let n = (c[0] as u32) << 16
                    | (*c.get(1).unwrap_or(&0) as u32) << 8
                    | *c.get(2).unwrap_or(&0) as u32;
                for i in 0..=c.len() {
                    s.push(t[(n >> (18 - 6 * i) & 63) as usize] as char);
                }
            }
            s
        };
        let key = base64_decode(KEY).unwrap();
        let kh = hosts(&format!(
            "|1|{}|{} ssh-ed25519 {KEY}",
            enc(salt),
            enc(&hash)
        ));
        assert_eq!(kh.check("127.0.0.1", 2222, &key), Verdict::Known);
        let kh = hosts(&format!(
            "@revoked * ssh-ed25519 {KEY}\n127.0.0.1 ssh-ed25519 {KEY}"
        ));
        assert_eq!(kh.check("127.0.0.1", 22, &key), Verdict::Revoked);
    }

    #[test]
    fn hmac_known_vector() {
        // RFC 2202 test case 2.
        assert_eq!(
            hex(&hmac_sha1(b"Jefe", b"what do ya want for nothing?")),
            "effcdf6ae5eb2fa2d27416d5f184df9c259a7c79"
        );
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }
}
