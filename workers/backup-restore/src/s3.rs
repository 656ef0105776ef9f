//! A read-only S3 backend for rustic_core over opendal's S3 service alone
//! (rustic_backend's `opendal` feature would link about 25 services).
//! Restic's object layout: `config`, `keys/ID`, `snapshots/ID`, `index/ID`,
//! `data/XX/ID` under the repository prefix.

use std::sync::OnceLock;

use bytes::Bytes;
use opendal::blocking::Operator;
use opendal::options::{ListOptions, ReadOptions};
use rustic_core::{
    BytesList, ErrorKind, FileType, Id, ReadBackend, RusticError, RusticResult, WriteBackend,
};

use crate::cli::S3Location;
use populator_core::secrets::Secret;
use populator_core::tls::CertificateDer;

/// opendal's blocking operator drives its async core on this runtime.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("starting the S3 runtime")
    })
}

#[derive(Clone, Debug)]
pub struct S3Backend {
    operator: Operator,
    location: String,
}

impl S3Backend {
    pub fn new(
        location: &S3Location,
        access_key_id: &Secret,
        secret_access_key: &Secret,
        ca_certificates: Option<&[CertificateDer<'static>]>,
    ) -> anyhow::Result<Self> {
        // The reqwest HTTP transport (no auto-registration without opendal's
        // default features).
        opendal::install_default();
        let builder = opendal::services::S3::default()
            .endpoint(&location.endpoint)
            .bucket(&location.bucket)
            .root(&format!("/{}", location.prefix))
            .region(&location.region)
            .access_key_id(access_key_id.expose())
            .secret_access_key(secret_access_key.expose())
            // Credentials come from our flags or environment only, never from
            // ~/.aws or the EC2 metadata service.
            .disable_config_load()
            .disable_ec2_metadata();
        let mut operator = opendal::Operator::new(builder)?
            .layer(opendal::layers::RetryLayer::new().with_max_times(3));
        if let Some(certs) = ca_certificates {
            operator = operator.with_context(
                opendal::OperationContext::new().with_http_transport(transport_trusting(certs)?),
            );
        }
        let _guard = runtime().enter();
        Ok(S3Backend {
            operator: Operator::new(operator)?,
            location: location.display(),
        })
    }

    fn path(tpe: FileType, id: &Id) -> String {
        let hex = id.to_hex();
        match tpe {
            FileType::Config => "config".into(),
            FileType::Pack => format!("data/{}/{}", &hex[..2], &*hex),
            _ => format!("{}/{}", tpe.dirname(), &*hex),
        }
    }
}

/// opendal's HTTP client (reqwest 0.13, rustls) trusting the system roots
/// and `--ca-file`'s certificates (a private MinIO or Ceph RGW, say).
fn transport_trusting(
    ca_certificates: &[CertificateDer<'static>],
) -> anyhow::Result<opendal::HttpTransporter> {
    use anyhow::Context as _;
    let certs = ca_certificates
        .iter()
        .map(|der| reqwest13::Certificate::from_der(der))
        .collect::<Result<Vec<_>, _>>()
        .context("a certificate of --ca-file")?;
    let client = reqwest13::Client::builder()
        .tls_certs_merge(certs)
        .build()
        .context("building the S3 HTTP client")?;
    Ok(opendal::HttpTransporter::new(
        opendal_http_transport_reqwest::ReqwestTransport::new(client),
    ))
}

fn backend_error(what: &str, path: &str, err: opendal::Error) -> Box<RusticError> {
    RusticError::with_source(ErrorKind::Backend, "S3: {what} `{path}` failed", err)
        .attach_context("what", what.to_string())
        .attach_context("path", path.to_string())
}

impl ReadBackend for S3Backend {
    fn location(&self) -> String {
        self.location.clone()
    }

    fn list_with_size(&self, tpe: FileType) -> RusticResult<Vec<(Id, u32)>> {
        if tpe == FileType::Config {
            return match self.operator.stat("config") {
                Ok(meta) => Ok(vec![(
                    Id::default(),
                    u32::try_from(meta.content_length()).unwrap_or(u32::MAX),
                )]),
                Err(e) if e.kind() == opendal::ErrorKind::NotFound => Ok(Vec::new()),
                Err(e) => Err(backend_error("reading", "config", e)),
            };
        }
        let dir = format!("{}/", tpe.dirname());
        let options = ListOptions {
            recursive: true,
            ..Default::default()
        };
        let lister = self
            .operator
            .lister_options(&dir, options)
            .map_err(|e| backend_error("listing", &dir, e))?;
        let mut out = Vec::new();
        for entry in lister {
            let entry = entry.map_err(|e| backend_error("listing", &dir, e))?;
            if !entry.metadata().is_file() {
                continue;
            }
            if let Some(id) = Id::parse_some(entry.name(), tpe) {
                let size = u32::try_from(entry.metadata().content_length()).unwrap_or(u32::MAX);
                out.push((id, size));
            }
        }
        Ok(out)
    }

    fn read_full(&self, tpe: FileType, id: &Id) -> RusticResult<Bytes> {
        let path = Self::path(tpe, id);
        self.operator
            .read(&path)
            .map(|b| b.to_bytes())
            .map_err(|e| backend_error("reading", &path, e))
    }

    fn read_partial(
        &self,
        tpe: FileType,
        id: &Id,
        _cacheable: bool,
        offset: u32,
        length: u32,
    ) -> RusticResult<Bytes> {
        let path = Self::path(tpe, id);
        let options = ReadOptions {
            range: (u64::from(offset)..u64::from(offset) + u64::from(length)).into(),
            ..Default::default()
        };
        self.operator
            .read_options(&path, options)
            .map(|b| b.to_bytes())
            .map_err(|e| backend_error("reading", &path, e))
    }

    fn warmup_path(&self, tpe: FileType, id: &Id) -> String {
        Self::path(tpe, id)
    }
}

/// A restore never writes to the repository; rustic_core's repository type
/// still wants a writable backend.
impl WriteBackend for S3Backend {
    fn write_bytes(
        &self,
        _tpe: FileType,
        _id: &Id,
        _cacheable: bool,
        _content: BytesList,
    ) -> RusticResult<()> {
        Err(read_only())
    }

    fn remove(&self, _tpe: FileType, _id: &Id, _cacheable: bool) -> RusticResult<()> {
        Err(read_only())
    }
}

fn read_only() -> Box<RusticError> {
    RusticError::new(
        ErrorKind::Unsupported,
        "backup-restore opens S3 repositories read-only",
    )
}
