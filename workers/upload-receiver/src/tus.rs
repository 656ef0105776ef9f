//! tus 1.0 (core, creation and checksum extensions) on `/files`: creation
//! with `Upload-Length`, `HEAD` for the offset, `PATCH` with `Upload-Offset`.
//! One upload at a time, like the CDI endpoints; the PATCH bodies are handed
//! to the session runner as [`Segment`]s of one [`Session`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use hyper::body::Incoming;
use hyper::{header, Method, Request, StatusCode};
use populator_core::digest::Checksum;
use tokio::sync::{mpsc, oneshot};

use crate::resumable::Saved;
use crate::server::{busy, completed, Job, Phase, Reply, Shared};

pub const VERSION: &str = "1.0.0";
const BASE: &str = "/files";

/// One PATCH body.
pub struct Segment {
    pub body: Incoming,
    pub offset: u64,
    pub checksum: Option<Checksum>,
    pub reply: oneshot::Sender<Reply>,
}

/// A tus upload as the session runner sees it.
pub struct Session {
    pub id: String,
    pub length: u64,
    pub file_name: Option<String>,
    pub offset: Arc<AtomicU64>,
    pub segments: mpsc::Receiver<Segment>,
    /// State found in the target at start: continue where it stopped.
    pub resume: Option<Saved>,
    /// The answer to the creation request, once the runner accepted it.
    pub created: Option<oneshot::Sender<Reply>>,
    /// A PATCH that arrived while the upload was parked, read first.
    pub pending: Option<Segment>,
    registry: Arc<Mutex<Registry>>,
}

impl Session {
    pub fn created_reply(&self) -> Reply {
        Reply::new(StatusCode::CREATED, "")
            .header("location", format!("{BASE}/{}", self.id))
            .header("tus-resumable", VERSION)
            .header(
                "upload-offset",
                self.offset.load(Ordering::SeqCst).to_string(),
            )
    }

    /// Answers the creation request (once).
    pub fn announce_created(&mut self) {
        let reply = self.created_reply();
        if let Some(r) = self.created.take() {
            let _ = r.send(reply);
        }
    }

    pub fn offset_reply(&self) -> Reply {
        Reply::new(StatusCode::NO_CONTENT, "")
            .header("tus-resumable", VERSION)
            .header(
                "upload-offset",
                self.offset.load(Ordering::SeqCst).to_string(),
            )
    }

    /// The upload is complete: HEAD keeps answering its full length.
    pub fn complete(&self) {
        let mut r = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        r.completed = Some((self.id.clone(), self.length));
        r.current = None;
    }
}

/// What the connection tasks know of the tus upload.
#[derive(Clone)]
struct Handle {
    id: String,
    length: u64,
    offset: Arc<AtomicU64>,
    patching: Arc<AtomicBool>,
    segments: mpsc::Sender<Segment>,
}

#[derive(Default)]
struct Registry {
    current: Option<Handle>,
    completed: Option<(String, u64)>,
}

/// The tus uploads of this receiver (at most one at a time).
pub struct TusUploads {
    registry: Arc<Mutex<Registry>>,
    /// Announced as Tus-Max-Size.
    pub max_size: Option<u64>,
}

impl TusUploads {
    pub fn new(max_size: Option<u64>) -> TusUploads {
        TusUploads {
            registry: Arc::default(),
            max_size,
        }
    }

    /// Registers an upload and returns its runner side.
    pub fn register(
        &self,
        id: String,
        length: u64,
        offset: u64,
        file_name: Option<String>,
    ) -> Session {
        let (tx, rx) = mpsc::channel(1);
        let offset = Arc::new(AtomicU64::new(offset));
        self.lock().current = Some(Handle {
            id: id.clone(),
            length,
            offset: offset.clone(),
            patching: Arc::default(),
            segments: tx,
        });
        Session {
            id,
            length,
            file_name,
            offset,
            segments: rx,
            resume: None,
            created: None,
            pending: None,
            registry: self.registry.clone(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn forget(&self, id: &str) {
        let mut r = self.lock();
        if r.current.as_ref().is_some_and(|h| h.id == id) {
            r.current = None;
        }
    }

    fn find(&self, id: &str) -> Option<Handle> {
        self.lock().current.clone().filter(|h| h.id == id)
    }
}

pub async fn handle(req: Request<Incoming>, shared: &Shared) -> Reply {
    let reply = route(req, shared).await;
    // Every tus answer names the protocol version.
    if reply.headers.iter().any(|(n, _)| *n == "tus-resumable") {
        reply
    } else {
        reply.header("tus-resumable", VERSION)
    }
}

async fn route(req: Request<Incoming>, shared: &Shared) -> Reply {
    let path = req.uri().path().trim_end_matches('/').to_string();
    let method = req.method().clone();
    if method == Method::OPTIONS {
        return options(shared);
    }
    if let Some(bad) = version_mismatch(&req) {
        return bad;
    }
    if path == BASE {
        return match method {
            Method::POST => create(req, shared).await,
            _ => Reply::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "use POST to create an upload",
            )
            .header("allow", "POST, OPTIONS"),
        };
    }
    let Some(id) = path.strip_prefix("/files/").filter(|i| !i.contains('/')) else {
        return not_found();
    };
    match method {
        Method::HEAD => head(id, shared),
        Method::PATCH => patch(req, id, shared).await,
        _ => Reply::new(StatusCode::METHOD_NOT_ALLOWED, "use HEAD or PATCH")
            .header("allow", "HEAD, PATCH, OPTIONS"),
    }
}

fn options(shared: &Shared) -> Reply {
    let mut reply = Reply::new(StatusCode::NO_CONTENT, "")
        .header("tus-version", VERSION)
        .header("tus-extension", "creation,checksum")
        .header("tus-checksum-algorithm", "md5,sha1,sha256,sha512");
    if let Some(max) = shared.tus.max_size {
        reply = reply.header("tus-max-size", max.to_string());
    }
    reply
}

fn version_mismatch(req: &Request<Incoming>) -> Option<Reply> {
    let given = req
        .headers()
        .get("tus-resumable")
        .and_then(|v| v.to_str().ok());
    (given != Some(VERSION)).then(|| {
        Reply::new(
            StatusCode::PRECONDITION_FAILED,
            format!("this server speaks tus {VERSION}: send Tus-Resumable: {VERSION}"),
        )
        .header("tus-version", VERSION)
    })
}

fn not_found() -> Reply {
    Reply::new(StatusCode::NOT_FOUND, "no such upload")
}

fn header_u64(headers: &hyper::HeaderMap, name: &str) -> Result<Option<u64>, Reply> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .map(Some)
            .ok_or_else(|| {
                Reply::new(
                    StatusCode::BAD_REQUEST,
                    format!("{name} must be a non-negative integer"),
                )
            }),
    }
}

async fn create(req: Request<Incoming>, shared: &Shared) -> Reply {
    let length = match header_u64(req.headers(), "upload-length") {
        Ok(Some(l)) => l,
        Ok(None) => {
            return Reply::new(
                StatusCode::BAD_REQUEST,
                "Upload-Length is required (deferred lengths are not supported)",
            )
        }
        Err(r) => return r,
    };
    let file_name = req
        .headers()
        .get("upload-metadata")
        .and_then(|v| v.to_str().ok())
        .and_then(metadata_file_name);
    if let Err(reply) = shared.claim() {
        return reply;
    }
    let mut session = shared.tus.register(new_id(), length, 0, file_name);
    let id = session.id.clone();
    let (tx, rx) = oneshot::channel();
    session.created = Some(tx);
    if shared.jobs.send(Job::Tus(session)).await.is_err() {
        shared.tus.forget(&id);
        return busy();
    }
    let reply = rx.await.unwrap_or_else(|_| {
        Reply::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the receiver is shutting down",
        )
    });
    if reply.status != StatusCode::CREATED {
        shared.tus.forget(&id);
    }
    reply
}

fn head(id: &str, shared: &Shared) -> Reply {
    let (offset, length) = match shared.tus.find(id) {
        Some(h) => (h.offset.load(Ordering::SeqCst), h.length),
        None => match shared.tus.lock().completed.clone() {
            Some((done, length)) if done == id => (length, length),
            _ => return not_found(),
        },
    };
    Reply::new(StatusCode::OK, "")
        .header("upload-offset", offset.to_string())
        .header("upload-length", length.to_string())
        .header("cache-control", "no-store")
}

async fn patch(req: Request<Incoming>, id: &str, shared: &Shared) -> Reply {
    let (parts, body) = req.into_parts();
    let mut body = Some(body);
    let reply = apply_patch(&parts.headers, &mut body, id, shared).await;
    // Refused before its body was read: linger, so the client sees why.
    if let Some(body) = body {
        tokio::spawn(crate::pump::linger(body));
    }
    reply
}

async fn apply_patch(
    headers: &hyper::HeaderMap,
    body: &mut Option<Incoming>,
    id: &str,
    shared: &Shared,
) -> Reply {
    let Some(handle) = shared.tus.find(id) else {
        if shared.phase() == Phase::Done {
            return completed();
        }
        return not_found();
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !content_type.starts_with("application/offset+octet-stream") {
        return Reply::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "a PATCH needs Content-Type: application/offset+octet-stream",
        );
    }
    let offset = match header_u64(headers, "upload-offset") {
        Ok(Some(o)) => o,
        Ok(None) => return Reply::new(StatusCode::BAD_REQUEST, "Upload-Offset is required"),
        Err(r) => return r,
    };
    let checksum = match headers.get("upload-checksum") {
        None => None,
        Some(v) => match crate::digests::upload_checksum(v.to_str().unwrap_or("")) {
            Ok(c) => Some(c),
            Err(m) => return Reply::new(StatusCode::BAD_REQUEST, m),
        },
    };
    if handle
        .patching
        .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        return Reply::new(
            StatusCode::LOCKED,
            "another PATCH of this upload is running",
        )
        .header("retry-after", "1");
    }
    let _unlock = Unlock(&handle.patching);
    let current = handle.offset.load(Ordering::SeqCst);
    if offset != current {
        return Reply::new(
            StatusCode::CONFLICT,
            format!("Upload-Offset {offset} does not match the upload's offset {current}"),
        )
        .header("upload-offset", current.to_string());
    }
    let (tx, rx) = oneshot::channel();
    let segment = Segment {
        body: body.take().expect("the body is taken once"),
        offset,
        checksum,
        reply: tx,
    };
    if handle.segments.send(segment).await.is_err() {
        return busy();
    }
    rx.await.unwrap_or_else(|_| {
        Reply::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the receiver is shutting down",
        )
    })
}

struct Unlock<'a>(&'a AtomicBool);

impl Drop for Unlock<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// `filename` (or `name`) from `Upload-Metadata: key base64,key base64`.
fn metadata_file_name(metadata: &str) -> Option<String> {
    metadata.split(',').find_map(|pair| {
        let (key, value) = pair.trim().split_once(' ')?;
        if key != "filename" && key != "name" {
            return None;
        }
        let raw = base64::engine::general_purpose::STANDARD
            .decode(value.trim())
            .ok()?;
        let name = String::from_utf8(raw).ok()?;
        populator_core::content::validate_file_name(&name)
            .is_ok()
            .then_some(name)
    })
}

/// 128 random bits, hex: an upload URL nobody guesses.
fn new_id() -> String {
    let mut bytes = [0u8; 16];
    // SAFETY: getrandom writes at most `len` bytes into the buffer.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        // No getrandom: time and pid still make a fresh id per receiver.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        bytes = (t ^ (std::process::id() as u128) << 64).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_name_from_metadata() {
        // "disk.img" and "../x"
        assert_eq!(
            metadata_file_name("filetype dGV4dA==,filename ZGlzay5pbWc=").as_deref(),
            Some("disk.img")
        );
        assert_eq!(metadata_file_name("filename Li4veA=="), None);
        assert_eq!(new_id().len(), 32);
    }
}
