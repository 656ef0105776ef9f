//! The HTTPS front: accepts a bounded number of TLS connections, checks
//! credentials, routes CDI's upload API, tus and `/healthz`, and hands each
//! upload to the session runner (the main thread) as a [`Job`]. Only one
//! upload runs at a time; the others get 503, and every upload after a
//! completed one gets 409.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{header, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use populator_core::digest::Checksum;
use populator_core::error::{fail, Kind};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};

use crate::auth::{subject_cn, Auth, Peer};
use crate::tus::TusUploads;

/// Where the receiver is in its one-upload life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Idle,
    Busy,
    Done,
}

/// How long the client waits: until the data is written, verified and
/// flushed (CDI's sync endpoints) or until its bytes are in (async).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    Sync,
    Async,
}

/// An answer from the session runner to the handler that waits on it.
pub struct Reply {
    pub status: StatusCode,
    pub message: String,
    pub headers: Vec<(&'static str, String)>,
}

impl Reply {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Reply {
        Reply {
            status,
            message: message.into(),
            headers: Vec::new(),
        }
    }

    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Reply {
        self.headers.push((name, value.into()));
        self
    }
}

/// One CDI upload (raw body or multipart form).
pub struct Upload {
    pub body: Incoming,
    /// The multipart boundary of a form upload.
    pub form_boundary: Option<String>,
    pub wait: Wait,
    pub content_length: Option<u64>,
    /// From `Content-Digest`.
    pub checksums: Vec<Checksum>,
    pub reply: oneshot::Sender<Reply>,
}

pub enum Job {
    Upload(Upload),
    Tus(crate::tus::Session),
}

/// State shared by the connection tasks and the session runner.
pub struct Shared {
    pub auth: Auth,
    pub phase: Mutex<Phase>,
    pub jobs: mpsc::Sender<Job>,
    pub tus: TusUploads,
}

impl Shared {
    pub fn phase(&self) -> Phase {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_phase(&self, phase: Phase) {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) = phase;
    }

    /// Idle → Busy, or the answer for a client that must not start now.
    pub fn claim(&self) -> Result<(), Reply> {
        let mut phase = self.phase.lock().unwrap_or_else(|e| e.into_inner());
        match *phase {
            Phase::Idle => {
                *phase = Phase::Busy;
                Ok(())
            }
            Phase::Busy => Err(busy()),
            Phase::Done => Err(completed()),
        }
    }
}

pub fn busy() -> Reply {
    Reply::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "another upload is in progress; try again later",
    )
    .header("retry-after", "5")
}

pub fn completed() -> Reply {
    Reply::new(
        StatusCode::CONFLICT,
        "an upload has already completed; this receiver takes no more",
    )
}

/// Bytes read from a socket at once.
const SOCKET_READ_BUFFER: usize = 256 * 1024;

pub struct ServerOptions {
    pub listen: SocketAddr,
    pub tls: Arc<rustls::ServerConfig>,
    pub header_read_timeout: Duration,
    pub max_connections: usize,
}

/// The running accept loop.
pub struct Server {
    stop: watch::Sender<bool>,
    stopped: oneshot::Receiver<()>,
}

impl Server {
    /// Binds now (a busy address is a usage error) and serves in the background.
    pub async fn start(options: ServerOptions, shared: Arc<Shared>) -> Result<Server> {
        let listener = tokio::net::TcpListener::bind(options.listen)
            .await
            .map_err(|e| {
                fail(
                    Kind::Usage,
                    "InvalidConfiguration",
                    format!("cannot listen on {}: {e}", options.listen),
                )
            })?;
        let (stop, stop_rx) = watch::channel(false);
        let (stopped_tx, stopped) = oneshot::channel();
        tokio::spawn(async move {
            accept_loop(listener, options, shared, stop_rx).await;
            let _ = stopped_tx.send(());
        });
        Ok(Server { stop, stopped })
    }

    /// Stops accepting, lets the connections finish the answers they are
    /// writing (at most `grace`), then closes them.
    pub async fn shutdown(self, grace: Duration) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(grace + Duration::from_secs(1), self.stopped).await;
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    options: ServerOptions,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(options.tls.clone());
    let slots = Arc::new(Semaphore::new(options.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        // hyper's default read buffer (400 KiB at most): body frames are
        // slices of it and keep it alive while they travel down the
        // pipeline, so a larger one costs memory, not speed (TLS hands
        // over about one 16 KiB record per read anyway).
        .keep_alive(true);
    loop {
        // A free connection slot first, so at most max_connections are served.
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => s.expect("the semaphore is never closed"),
            _ = stop.changed() => break,
        };
        let (tcp, _) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(_) => {
                    // Out of descriptors or similar: breathe, then go on.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let shared = shared.clone();
        let http = http.clone();
        let watcher = graceful.watcher();
        let handshake_timeout = options.header_read_timeout;
        tokio::spawn(async move {
            let _slot = slot;
            // rustls asks the socket for 4 KiB at a time: read it in large
            // pieces instead, one syscall per many TLS records.
            let tcp = tokio::io::BufReader::with_capacity(SOCKET_READ_BUFFER, tcp);
            let Ok(Ok(tls)) = tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await
            else {
                return;
            };
            let peer = Arc::new(Peer {
                client_cn: tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(subject_cn),
            });
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                let peer = peer.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(req, &shared, &peer).await) }
            });
            let conn = http.serve_connection(TokioIo::new(tls), service);
            let _ = watcher.watch(conn).await;
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
}

type Answer = Response<Full<Bytes>>;

pub fn respond(reply: Reply) -> Answer {
    let mut builder = Response::builder()
        .status(reply.status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8");
    for (name, value) in &reply.headers {
        builder = builder.header(*name, value.as_str());
    }
    let mut text = reply.message;
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    builder
        .body(Full::new(Bytes::from(text)))
        .expect("a valid response")
}

async fn handle(req: Request<Incoming>, shared: &Shared, peer: &Peer) -> Answer {
    let path = req.uri().path().to_string();
    if path == "/healthz" {
        return respond(Reply::new(StatusCode::OK, "OK"));
    }
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    if let Err(why) = shared.auth.check(authorization, peer) {
        tokio::spawn(crate::pump::linger(req.into_body()));
        return respond(
            Reply::new(StatusCode::UNAUTHORIZED, format!("unauthorized: {why}"))
                .header("www-authenticate", "Bearer"),
        );
    }
    let cdi = path
        .strip_prefix("/v1beta1/")
        .or_else(|| path.strip_prefix("/v1alpha1/"));
    match cdi {
        Some("upload") => cdi_upload(req, shared, Wait::Sync, false).await,
        Some("upload-async") => cdi_upload(req, shared, Wait::Async, false).await,
        Some("upload-form") => cdi_upload(req, shared, Wait::Sync, true).await,
        Some("upload-form-async") => cdi_upload(req, shared, Wait::Async, true).await,
        Some(_) => respond(Reply::new(StatusCode::NOT_FOUND, "no such endpoint")),
        None if path == "/files" || path == "/files/" || path.starts_with("/files/") => {
            respond(crate::tus::handle(req, shared).await)
        }
        None => respond(Reply::new(StatusCode::NOT_FOUND, "no such endpoint")),
    }
}

async fn cdi_upload(req: Request<Incoming>, shared: &Shared, wait: Wait, form: bool) -> Answer {
    match *req.method() {
        Method::POST => {}
        // CDI's upload proxy asks with HEAD whether the async endpoints exist.
        Method::HEAD | Method::GET if wait == Wait::Async => {
            return respond(Reply::new(StatusCode::OK, ""))
        }
        _ => {
            return respond(
                Reply::new(StatusCode::METHOD_NOT_ALLOWED, "use POST").header("allow", "POST"),
            )
        }
    }
    match prepare_upload(req, wait, form) {
        Err(reply) => respond(reply),
        Ok((upload, answer)) => {
            if let Err(reply) = shared.claim() {
                tokio::spawn(crate::pump::linger(upload.body));
                return respond(reply);
            }
            if shared.jobs.send(Job::Upload(upload)).await.is_err() {
                return respond(busy());
            }
            match answer.await {
                Ok(reply) => respond(reply),
                Err(_) => respond(Reply::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the receiver is shutting down",
                )),
            }
        }
    }
}

/// Reads the request's headers into an [`Upload`]; a bad header is a 400
/// before anything starts.
fn prepare_upload(
    req: Request<Incoming>,
    wait: Wait,
    form: bool,
) -> Result<(Upload, oneshot::Receiver<Reply>), Reply> {
    let bad = |m: String| Reply::new(StatusCode::BAD_REQUEST, m);
    let headers = req.headers();
    let content_length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let checksums = match headers.get("content-digest") {
        None => Vec::new(),
        Some(v) => crate::digests::content_digest(v.to_str().unwrap_or("")).map_err(bad)?,
    };
    let form_boundary = if form {
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        Some(multer::parse_boundary(content_type).map_err(|_| {
            bad(format!(
                "a form upload needs Content-Type multipart/form-data with a boundary, not '{content_type}'"
            ))
        })?)
    } else {
        None
    };
    let (reply, answer) = oneshot::channel();
    Ok((
        Upload {
            body: req.into_body(),
            form_boundary,
            wait,
            content_length,
            checksums,
            reply,
        },
        answer,
    ))
}
