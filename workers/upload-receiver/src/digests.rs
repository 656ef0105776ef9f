//! Digests a client sends with its data: `Content-Digest` (RFC 9530,
//! `sha-256=:BASE64:`) over a whole upload, and tus `Upload-Checksum`
//! (`sha1 BASE64`) over one PATCH body. Both become core [`Checksum`]s.

use base64::Engine as _;
use populator_core::digest::Checksum;

/// The checksums of a `Content-Digest` header. Algorithms the core cannot
/// compute are ignored, as RFC 9530 allows; a malformed value is an error.
pub fn content_digest(header: &str) -> Result<Vec<Checksum>, String> {
    let mut out = Vec::new();
    for member in header.split(',').map(str::trim).filter(|m| !m.is_empty()) {
        let bad = || format!("Content-Digest member '{member}' is not ALGO=:BASE64:");
        let (algo, value) = member.split_once('=').ok_or_else(bad)?;
        let value = value
            .strip_prefix(':')
            .and_then(|v| v.strip_suffix(':'))
            .ok_or_else(bad)?;
        let name = match algo.trim().to_ascii_lowercase().as_str() {
            "sha-256" => "sha256",
            "sha-512" => "sha512",
            "md5" => "md5",
            "sha" => "sha1",
            _ => continue,
        };
        out.push(from_base64(name, value).map_err(|e| format!("Content-Digest: {e}"))?);
    }
    Ok(out)
}

/// The checksum of a tus `Upload-Checksum` header (`ALGO BASE64`).
pub fn upload_checksum(header: &str) -> Result<Checksum, String> {
    let (algo, value) = header
        .trim()
        .split_once(' ')
        .ok_or_else(|| format!("Upload-Checksum '{header}' is not 'ALGO BASE64'"))?;
    let name = algo.to_ascii_lowercase();
    if !matches!(name.as_str(), "md5" | "sha1" | "sha256" | "sha512") {
        return Err(format!(
            "Upload-Checksum algorithm '{algo}' is not supported (use md5, sha1, sha256 or sha512)"
        ));
    }
    from_base64(&name, value.trim()).map_err(|e| format!("Upload-Checksum: {e}"))
}

fn from_base64(algorithm: &str, value: &str) -> Result<Checksum, String> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(value)
        .map_err(|e| format!("'{value}' is not base64: {e}"))?;
    format!("{algorithm}:{}", hex_encode(&raw)).parse()
}

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    // sha256("hello") and sha1("hello")
    const SHA256_HELLO: &str = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

    #[test]
    fn content_digest_members() {
        let c = content_digest(
            "sha-256=:LPJNul+wow4m6DsqxbninhsWHlwfp0JecwQzYpOLmCQ=:, unixsum=:AA==:",
        )
        .unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].to_string(), format!("sha256:{SHA256_HELLO}"));
        assert!(content_digest("sha-256=abc").is_err());
        assert!(content_digest("sha-256=:AAAA:").is_err(), "wrong length");
    }

    #[test]
    fn tus_checksum() {
        let c = upload_checksum("sha1 qvTGHdzF6KLavt4PO0gs2a6pQ00=").unwrap();
        assert_eq!(
            c.to_string(),
            "sha1:aaf4c61ddcc5e8a2dabede0f3b482cd9aea9434d"
        );
        assert!(upload_checksum("crc32 AAAA").is_err());
    }
}
