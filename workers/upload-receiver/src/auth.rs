//! Who may upload: a bearer token compared in constant time, and/or a client
//! certificate from `--client-ca-file` whose subject CN is `--client-name`
//! (how CDI's upload proxy authenticates to its upload server). Also builds
//! the TLS server configuration that asks for those certificates.

use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use populator_core::error::{fail, Kind};
use populator_core::secrets::Secret;
use populator_core::tls::Identity;
use rustls::pki_types::CertificateDer;
use sha2::{Digest, Sha256};

/// The accepted credentials.
pub struct Auth {
    /// sha256 of the token: comparing digests takes the same time whatever
    /// the token's length and content.
    token_digest: Option<[u8; 32]>,
    client_certs: bool,
    client_name: Option<String>,
}

/// What a connection brought: the CN of its verified client certificate.
#[derive(Clone, Debug, Default)]
pub struct Peer {
    pub client_cn: Option<String>,
}

impl Auth {
    pub fn new(token: Option<&Secret>, client_certs: bool, client_name: Option<String>) -> Auth {
        Auth {
            token_digest: token.map(|t| Sha256::digest(t.expose().as_bytes()).into()),
            client_certs,
            client_name,
        }
    }

    pub fn open(&self) -> bool {
        self.token_digest.is_none() && !self.client_certs
    }

    /// Allows the request when its bearer token or its connection's client
    /// certificate is accepted. The error says why, without any secret.
    pub fn check(&self, authorization: Option<&[u8]>, peer: &Peer) -> Result<(), &'static str> {
        if self.open() {
            return Ok(());
        }
        if let (Some(want), Some(header)) = (&self.token_digest, authorization) {
            let presented = strip_bearer(header).unwrap_or(b"");
            let got: [u8; 32] = Sha256::digest(presented).into();
            if constant_time_eq(&got, want) {
                return Ok(());
            }
            return Err("wrong bearer token");
        }
        if self.client_certs {
            match (&peer.client_cn, &self.client_name) {
                (Some(_), None) => return Ok(()),
                (Some(cn), Some(want)) if cn == want => return Ok(()),
                (Some(_), Some(_)) => return Err("client certificate has the wrong common name"),
                (None, _) => {}
            }
        }
        Err(if self.token_digest.is_some() {
            "no bearer token (Authorization: Bearer …)"
        } else {
            "no client certificate"
        })
    }
}

fn strip_bearer(header: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = header.split_at(header.iter().position(|&b| b == b' ')?);
    scheme
        .eq_ignore_ascii_case(b"bearer")
        .then(|| rest.trim_ascii())
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// The TLS configuration: the server identity, and client certificates
/// verified against `client_ca` (required unless a token may be used instead).
pub fn server_config(
    identity: Identity,
    client_ca: Option<&Path>,
    token_allowed: bool,
) -> Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let roots = load_roots(path)?;
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            );
            let verifier = if token_allowed {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            let verifier = verifier.build().map_err(|e| {
                usage(format!(
                    "the client CA file {} cannot be used: {e}",
                    path.display()
                ))
            })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(identity.chain, identity.key)
        .map_err(|e| usage(format!("the TLS certificate and key do not fit: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn load_roots(path: &Path) -> Result<rustls::RootCertStore> {
    let pem = std::fs::read(path).map_err(|e| {
        usage(format!(
            "cannot read the client CA file {}: {e}",
            path.display()
        ))
    })?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        let cert = cert.map_err(|e| usage(format!("bad PEM in {}: {e}", path.display())))?;
        roots
            .add(cert)
            .map_err(|e| usage(format!("bad CA certificate in {}: {e}", path.display())))?;
    }
    if roots.is_empty() {
        return Err(usage(format!(
            "the client CA file {} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(roots)
}

fn usage(message: String) -> anyhow::Error {
    fail(Kind::Usage, "InvalidConfiguration", message)
}

/// The subject common name of a DER certificate: Certificate → tbsCertificate
/// → (version, serial, signature, issuer, validity) → subject → the
/// attribute with OID 2.5.4.3.
pub fn subject_cn(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, certificate, _) = der_item(cert.as_ref())?;
    let (_, tbs, _) = der_item(certificate)?;
    let mut rest = tbs;
    // An explicit [0] version comes first when present.
    if rest.first() == Some(&0xa0) {
        rest = der_item(rest)?.2;
    }
    for _ in 0..4 {
        rest = der_item(rest)?.2; // serial, signature, issuer, validity
    }
    let (tag, mut subject, _) = der_item(rest)?;
    if tag != 0x30 {
        return None;
    }
    while !subject.is_empty() {
        let (_, set, next) = der_item(subject)?;
        subject = next;
        let (_, attribute, _) = der_item(set)?;
        let (oid_tag, oid, value) = der_item(attribute)?;
        if oid_tag == 0x06 && oid == [0x55, 0x04, 0x03] {
            let (_, text, _) = der_item(value)?;
            return String::from_utf8(text.to_vec()).ok();
        }
    }
    None
}

/// One DER item: (tag, contents, what follows).
fn der_item(data: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *data.first()?;
    let first = *data.get(1)? as usize;
    let (len, header) = if first < 0x80 {
        (first, 2)
    } else {
        let n = first & 0x7f;
        if n == 0 || n > 4 {
            return None;
        }
        let len = data
            .get(2..2 + n)?
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | b as usize);
        (len, 2 + n)
    };
    let contents = data.get(header..header.checked_add(len)?)?;
    Some((tag, contents, &data[header + len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_name_of_a_generated_certificate() {
        let mut params = rcgen_params("cdi-uploadproxy");
        params.is_ca = rcgen::IsCa::NoCa;
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(subject_cn(cert.der()).as_deref(), Some("cdi-uploadproxy"));
    }

    fn rcgen_params(cn: &str) -> rcgen::CertificateParams {
        let mut p = rcgen::CertificateParams::new(vec!["x".to_string()]).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p
    }

    #[test]
    fn tokens() {
        let auth = Auth::new(Some(&Secret::new("s3cret")), false, None);
        let peer = Peer::default();
        assert!(auth.check(Some(b"Bearer s3cret"), &peer).is_ok());
        assert!(auth.check(Some(b"bearer  s3cret "), &peer).is_ok());
        assert_eq!(
            auth.check(Some(b"Bearer s3cre"), &peer),
            Err("wrong bearer token")
        );
        assert!(auth.check(None, &peer).is_err());
        let open = Auth::new(None, false, None);
        assert!(open.check(None, &peer).is_ok());
    }

    #[test]
    fn client_names() {
        let auth = Auth::new(None, true, Some("cdi-uploadproxy".into()));
        let ok = Peer {
            client_cn: Some("cdi-uploadproxy".into()),
        };
        let wrong = Peer {
            client_cn: Some("someone".into()),
        };
        assert!(auth.check(None, &ok).is_ok());
        assert!(auth.check(None, &wrong).is_err());
        assert!(auth.check(None, &Peer::default()).is_err());
    }
}
