//! TLS for network mode: the sender trusts the receiver by a CA file, by
//! the SHA-256 fingerprint of its certificate (the receiver logs it), or,
//! on explicit request, not at all.

use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use populator_core::error::{fail, Kind};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// How the sender decides to trust the receiver.
pub enum Trust {
    CaFile(std::path::PathBuf),
    Fingerprint(String),
    Insecure,
}

/// `AB:CD:…` or `abcd…` → upper-case hex with colons, as the receiver logs it.
pub fn normalize_fingerprint(s: &str) -> Result<String> {
    let hex: String = s
        .chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_uppercase();
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(fail(
            Kind::Usage,
            "InvalidConfiguration",
            format!("--server-fingerprint '{s}' is not a SHA-256 fingerprint (64 hex digits, colons optional)"),
        ));
    }
    Ok(hex
        .as_bytes()
        .chunks(2)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join(":"))
}

pub fn client_config(trust: &Trust) -> Result<Arc<rustls::ClientConfig>> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let config = match trust {
        Trust::CaFile(path) => {
            let roots = load_roots(path)?;
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Trust::Fingerprint(fp) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCert {
                fingerprint: Some(fp.clone()),
                provider: provider(),
            }))
            .with_no_client_auth(),
        Trust::Insecure => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCert {
                fingerprint: None,
                provider: provider(),
            }))
            .with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

fn load_roots(path: &Path) -> Result<rustls::RootCertStore> {
    let usage = |e: &dyn std::fmt::Display| {
        fail(
            Kind::Usage,
            "InvalidConfiguration",
            format!("cannot read the CA file {}: {e}", path.display()),
        )
    };
    let pem = std::fs::read(path).map_err(|e| usage(&e))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        roots
            .add(cert.map_err(|e| usage(&e))?)
            .map_err(|e| usage(&e))?;
    }
    if roots.is_empty() {
        return Err(usage(&"no PEM certificate in it"));
    }
    Ok(roots)
}

/// Trusts exactly one certificate, by fingerprint (or any, when none is
/// pinned); the handshake signatures are still checked.
#[derive(Debug)]
struct PinnedCert {
    fingerprint: Option<String>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(want) = &self.fingerprint else {
            return Ok(ServerCertVerified::assertion());
        };
        let got = populator_core::tls::fingerprint(end_entity);
        if &got == want {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the receiver's certificate has fingerprint {got}, not the expected {want}"
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Is this error a refused certificate (exit 5) rather than a network failure?
pub fn is_trust_failure(e: &std::io::Error) -> Option<String> {
    let inner = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    match inner {
        rustls::Error::InvalidCertificate(_) | rustls::Error::General(_) => Some(inner.to_string()),
        rustls::Error::AlertReceived(_) => None,
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn fingerprints_are_normalized() {
        let hex = "ab".repeat(32);
        let want = vec!["AB"; 32].join(":");
        assert_eq!(super::normalize_fingerprint(&hex).unwrap(), want);
        assert_eq!(
            super::normalize_fingerprint(&want.to_lowercase()).unwrap(),
            want
        );
        assert!(super::normalize_fingerprint("abc").is_err());
    }
}
