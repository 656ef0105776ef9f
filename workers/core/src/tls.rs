//! TLS material shared by the servers the workers run (the metrics endpoint,
//! later the upload receiver and the pvc-copy receiver): a certificate from
//! files, or a self-signed one generated at start with its fingerprint logged.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context as _, Result};
/// The certificate type [`ca_certificates`] returns, for workers without
/// their own rustls dependency.
pub use rustls::pki_types::CertificateDer;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::Digest as _;

use crate::error::{fail, Kind};

/// The CA certificates in a PEM file (`--ca-file`), with the one-line usage
/// error every worker gives for a file that cannot be read or holds none.
pub fn ca_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let usage = |e: &dyn std::fmt::Display| {
        fail(
            Kind::Usage,
            "InvalidConfiguration",
            format!("cannot read the CA file {}: {e}", path.display()),
        )
    };
    let pem = std::fs::read(path).map_err(|e| usage(&e))?;
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| usage(&e))?;
    if certs.is_empty() {
        return Err(fail(
            Kind::Usage,
            "InvalidConfiguration",
            format!("the CA file {} holds no PEM certificate", path.display()),
        ));
    }
    Ok(certs)
}

/// A certificate chain and its key.
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    /// From PEM files, or a fresh self-signed certificate for `names` when
    /// neither file is given.
    pub fn load_or_generate(
        cert: Option<&Path>,
        key: Option<&Path>,
        names: &[&str],
    ) -> Result<Identity> {
        match (cert, key) {
            (Some(c), Some(k)) => Identity::from_pem_files(c, k),
            (None, None) => Identity::self_signed(names),
            _ => Err(fail(
                Kind::Usage,
                "InvalidConfiguration",
                "a TLS certificate file and key file must be given together",
            )),
        }
    }

    pub fn self_signed(names: &[&str]) -> Result<Identity> {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let generated = rcgen::generate_simple_self_signed(names)
            .context("generating a self-signed certificate")?;
        Ok(Identity {
            chain: vec![generated.cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(generated.key_pair.serialize_der())),
        })
    }

    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Identity> {
        let usage = |what: &str, path: &Path, e: &dyn std::fmt::Display| {
            fail(
                Kind::Usage,
                "InvalidConfiguration",
                format!("cannot read the TLS {what} {}: {e}", path.display()),
            )
        };
        let cert_pem = std::fs::read(cert).map_err(|e| usage("certificate", cert, &e))?;
        let chain = rustls_pemfile::certs(&mut &cert_pem[..])
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| usage("certificate", cert, &e))?;
        if chain.is_empty() {
            return Err(usage("certificate", cert, &"no PEM certificate in it"));
        }
        let key_pem = std::fs::read(key).map_err(|e| usage("key", key, &e))?;
        let key_der = rustls_pemfile::private_key(&mut &key_pem[..])
            .map_err(|e| usage("key", key, &e))?
            .ok_or_else(|| usage("key", key, &"no PEM private key in it"))?;
        Ok(Identity {
            chain,
            key: key_der,
        })
    }

    /// SHA-256 of the leaf certificate, hex with colons, as `openssl x509 -fingerprint` prints it.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.chain[0])
    }

    pub fn server_config(self) -> Result<Arc<rustls::ServerConfig>> {
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(self.chain, self.key)
        .map_err(|e| {
            fail(
                Kind::Usage,
                "InvalidConfiguration",
                format!("the TLS certificate and key do not fit: {e}"),
            )
        })?;
        Ok(Arc::new(config))
    }
}

pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    let digest = sha2::Sha256::digest(cert.as_ref());
    digest
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}
