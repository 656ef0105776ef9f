//! The `/metrics` endpoint: HTTPS with a self-signed certificate by default
//! (as CDI's importer serves it), a progress percent labelled with the PVC's
//! UID under a name a controller already scrapes, and byte counters. It keeps
//! serving a few seconds after the end so the last value is scraped.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use http_body_util::Full;
use hyper::body::Bytes;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::error::{fail, Kind};
use crate::progress::Progress;
use crate::tls::Identity;

#[derive(Clone, Debug)]
pub struct MetricsOptions {
    pub addr: SocketAddr,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub insecure_http: bool,
    pub progress_name: String,
    pub owner_uid: String,
    pub linger: Duration,
}

/// Reads the shared progress state at every scrape.
#[derive(Debug)]
struct ProgressCollector {
    progress: Arc<Progress>,
    progress_name: String,
    owner_uid: String,
}

impl prometheus_client::collector::Collector for ProgressCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let labels = [("ownerUID", self.owner_uid.as_str())];
        let percent = ConstGauge::new(self.progress.percent().unwrap_or(0.0));
        let mut family = encoder.encode_descriptor(
            &self.progress_name,
            "Progress of the population in percent (0-100).",
            None,
            percent.metric_type(),
        )?;
        percent.encode(family.encode_family(&labels)?)?;
        for (name, help, value) in [
            (
                "populator_bytes_read",
                "Bytes read from the source.",
                self.progress.bytes_read(),
            ),
            (
                "populator_bytes_written",
                "Bytes written to the target.",
                self.progress.bytes_written(),
            ),
        ] {
            let counter = ConstCounter::new(value);
            let mut family = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
            counter.encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

pub struct MetricsServer {
    shutdown: tokio::sync::watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
    linger: Duration,
}

impl MetricsServer {
    /// Binds now (a busy address is a usage error) and serves on its own thread.
    pub fn start(options: MetricsOptions, progress: Arc<Progress>) -> Result<MetricsServer> {
        let listener = std::net::TcpListener::bind(options.addr).map_err(|e| {
            fail(
                Kind::Usage,
                "InvalidConfiguration",
                format!("cannot serve metrics on {}: {e}", options.addr),
            )
        })?;
        listener.set_nonblocking(true)?;
        let tls = if options.insecure_http {
            None
        } else {
            let identity = Identity::load_or_generate(
                options.cert_file.as_deref(),
                options.key_file.as_deref(),
                &["localhost"],
            )?;
            crate::log::info(format!(
                "serving metrics on https://{}/metrics (certificate SHA-256 {})",
                options.addr,
                identity.fingerprint()
            ));
            Some(tokio_rustls::TlsAcceptor::from(identity.server_config()?))
        };
        let mut registry = Registry::default();
        registry.register_collector(Box::new(ProgressCollector {
            progress,
            progress_name: options.progress_name.clone(),
            owner_uid: options.owner_uid.clone(),
        }));
        let registry = Arc::new(registry);
        let (shutdown, watch) = tokio::sync::watch::channel(false);
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a tokio runtime");
                runtime.block_on(serve(listener, tls, registry, watch));
            })?;
        Ok(MetricsServer {
            shutdown,
            thread: Some(thread),
            linger: options.linger,
        })
    }

    /// Keeps serving for the linger time so the final value is scraped, then stops.
    pub fn linger_and_stop(mut self) {
        std::thread::sleep(self.linger);
        let _ = self.shutdown.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(
    listener: std::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    registry: Arc<Registry>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        return;
    };
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let Ok((stream, _)) = accepted else { continue };
        let registry = registry.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let registry = registry.clone();
                async move { Ok::<_, std::convert::Infallible>(respond(&req, &registry)) }
            });
            let http = hyper::server::conn::http1::Builder::new();
            match tls {
                Some(acceptor) => {
                    let Ok(Ok(stream)) =
                        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream))
                            .await
                    else {
                        return;
                    };
                    let _ = http
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                }
                None => {
                    let _ = http
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                }
            }
        });
    }
}

fn respond<B>(req: &hyper::Request<B>, registry: &Registry) -> hyper::Response<Full<Bytes>> {
    if req.uri().path() != "/metrics" {
        return hyper::Response::builder()
            .status(404)
            .body(Full::new(Bytes::from_static(b"not found\n")))
            .expect("a valid response");
    }
    let mut body = String::new();
    if prometheus_client::encoding::text::encode(&mut body, registry).is_err() {
        return hyper::Response::builder()
            .status(500)
            .body(Full::new(Bytes::new()))
            .expect("a valid response");
    }
    hyper::Response::builder()
        .header(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_renamed_progress_with_owner_label() {
        let progress = Arc::new(Progress::default());
        progress.set_total(Some(200));
        progress.advance(50);
        progress.add_read(7);
        let mut registry = Registry::default();
        registry.register_collector(Box::new(ProgressCollector {
            progress,
            progress_name: "kubevirt_cdi_import_progress_total".into(),
            owner_uid: "abc-123".into(),
        }));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        assert!(
            out.contains("kubevirt_cdi_import_progress_total{ownerUID=\"abc-123\"} 25.0\n"),
            "{out}"
        );
        assert!(
            out.contains("populator_bytes_read_total{ownerUID=\"abc-123\"} 7\n"),
            "{out}"
        );
    }
}
