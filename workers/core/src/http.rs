//! The HTTP(S) client the workers share: rustls with extra CAs or an explicit
//! opt-out of verification, proxies, redirects that never carry credentials
//! to another origin, retries with exponential backoff, and downloads that
//! resume with `Range` + `If-Range` after a dropped connection or fetch
//! several ranges at once, delivering bytes in order into the pipeline.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::StatusCode;
use url::Url;

use crate::cancel::CancelToken;
use crate::error::{fail, Kind};
use crate::pipeline::{restart, ChunkSender};

#[derive(Clone, Debug)]
pub struct HttpOptions {
    pub ca_file: Option<PathBuf>,
    pub insecure_skip_tls_verify: bool,
    pub proxy: Option<String>,
    /// Connect timeout, and the longest a read may stall.
    pub timeout: Duration,
    pub retries: u32,
    pub retry_backoff: Duration,
}

/// A URL to fetch and the headers that go with it.
pub struct HttpSource {
    client: reqwest::Client,
    url: Url,
    public_headers: HeaderMap,
    /// Credentials: sent only to the URL's own origin, never after a redirect elsewhere.
    secret_headers: HeaderMap,
    options: HttpOptions,
    cancel: CancelToken,
    /// The validator (strong ETag, else Last-Modified) of the current
    /// download's first response: range reads must see the same resource.
    validator: std::sync::Mutex<Option<String>>,
}

/// A byte range `start..end` (end exclusive, `None` = to the end).
#[derive(Clone, Copy, Debug)]
pub struct ByteRange {
    pub start: u64,
    pub end: Option<u64>,
}

/// What the server said about the resource in its first answer.
#[derive(Clone, Debug, Default)]
pub struct ResourceInfo {
    pub size: Option<u64>,
    pub ranges: bool,
    /// Strong ETag or Last-Modified, for If-Range.
    pub validator: Option<String>,
}

#[derive(Debug, Default)]
pub struct DownloadStats {
    pub resumes: u32,
    pub connections: usize,
    pub info: ResourceInfo,
}

impl HttpSource {
    pub fn new(
        url: Url,
        options: HttpOptions,
        public_headers: HeaderMap,
        secret_headers: HeaderMap,
        cancel: CancelToken,
    ) -> Result<HttpSource> {
        if !url.username().is_empty() || url.password().is_some() {
            return Err(fail(
                Kind::Usage,
                "InvalidConfiguration",
                "credentials in the URL are not accepted; use --username-file and --password-file",
            ));
        }
        let client = build_client(&options)?;
        Ok(HttpSource {
            client,
            url,
            public_headers,
            secret_headers,
            options,
            cancel,
            validator: Default::default(),
        })
    }

    /// The validator of the current download's first response, if the
    /// server sent one.
    pub fn validator(&self) -> Option<String> {
        self.validator.lock().unwrap().clone()
    }

    /// The URL as it may be shown: no query string (it may hold a signature).
    pub fn display_url(&self) -> String {
        redact(&self.url)
    }

    /// A GET that follows redirects and retries transient failures; returns a
    /// response with a 2xx status or the classified error.
    pub async fn get(
        &self,
        range: Option<ByteRange>,
        validator: Option<&str>,
    ) -> Result<reqwest::Response> {
        self.get_conditional(range, validator, false).await
    }

    /// [`HttpSource::get`]; with `must_match`, the validator is also sent as
    /// a precondition (`If-Match` for an ETag, `If-Unmodified-Since` for a
    /// date), so a changed resource answers 412 rather than a full 200.
    pub async fn get_conditional(
        &self,
        range: Option<ByteRange>,
        validator: Option<&str>,
        must_match: bool,
    ) -> Result<reqwest::Response> {
        let mut attempt = 0;
        loop {
            let failure = match self.get_once(range, validator, must_match).await {
                Ok(resp) if resp.status().is_success() => return Ok(resp),
                Ok(resp) => match classify_status(resp.status(), &self.display_url()) {
                    Retry::No(e) => return Err(e),
                    Retry::Yes(e) => e,
                },
                Err(e) if is_tls_error(&e) => {
                    return Err(fail(
                        Kind::Auth,
                        "TlsVerificationFailed",
                        format!(
                        "TLS verification of {} failed (pass the server's CA with --ca-file): {}",
                        self.display_url(),
                        tls_cause(&e)
                    ),
                    ))
                }
                Err(e) => {
                    let what = if e.is_timeout() {
                        "timed out"
                    } else {
                        "failed"
                    };
                    fail(
                        Kind::Transient,
                        "Unreachable",
                        format!(
                            "request to {} {what}: {}",
                            self.display_url(),
                            root_cause(&e)
                        ),
                    )
                }
            };
            if attempt >= self.options.retries {
                let retries = self.options.retries;
                return Err(failure.context(format!("giving up after {retries} retries")));
            }
            let delay = backoff(self.options.retry_backoff, attempt);
            crate::log::warn(format!(
                "{failure:#}; retrying in {:.1}s",
                delay.as_secs_f64()
            ));
            self.sleep(delay).await?;
            attempt += 1;
        }
    }

    async fn sleep(&self, delay: Duration) -> Result<()> {
        tokio::select! {
            _ = tokio::time::sleep(delay) => Ok(()),
            _ = self.cancel.cancelled() => Err(crate::error::terminated()),
        }
    }

    async fn get_once(
        &self,
        range: Option<ByteRange>,
        validator: Option<&str>,
        must_match: bool,
    ) -> reqwest::Result<reqwest::Response> {
        let origin = self.url.origin();
        let mut url = self.url.clone();
        for _ in 0..10 {
            let mut req = self
                .client
                .get(url.clone())
                .headers(self.public_headers.clone());
            if url.origin() == origin {
                req = req.headers(self.secret_headers.clone());
            }
            if let Some(r) = range {
                let spec = match r.end {
                    Some(end) => format!("bytes={}-{}", r.start, end - 1),
                    None => format!("bytes={}-", r.start),
                };
                req = req.header(reqwest::header::RANGE, spec);
                if let Some(v) = validator {
                    req = req.header(reqwest::header::IF_RANGE, v);
                }
            }
            if let Some(v) = validator.filter(|_| must_match) {
                let precondition = if v.starts_with('"') {
                    reqwest::header::IF_MATCH
                } else {
                    reqwest::header::IF_UNMODIFIED_SINCE
                };
                req = req.header(precondition, v);
            }
            let resp = req.send().await?;
            if resp.status().is_redirection() {
                if let Some(next) = resp
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .and_then(|l| l.to_str().ok())
                    .and_then(|l| url.join(l).ok())
                {
                    url = next;
                    continue;
                }
            }
            return Ok(resp);
        }
        // Too many redirects: answer with the last one, which classify_status reports.
        self.client.get(url).send().await
    }

    /// Streams the whole resource into the pipeline, resuming after drops.
    /// With `connections > 1` and a server that allows ranges, fetches pieces
    /// in parallel and delivers them in order.
    pub async fn download(
        &self,
        sender: ChunkSender,
        connections: usize,
        progress: &crate::progress::Progress,
    ) -> Result<DownloadStats> {
        let first = self.get(None, None).await?;
        let info = resource_info(&first);
        *self.validator.lock().unwrap() = info.validator.clone();
        progress.set_total(info.size);
        let mut stats = DownloadStats {
            info: info.clone(),
            connections: 1,
            ..Default::default()
        };
        match info.size {
            Some(size) if connections > 1 && info.ranges && size >= 2 * piece_size(connections) => {
                drop(first);
                stats.connections = connections;
                stats.resumes = self
                    .download_parallel(&sender, size, connections, info.validator.as_deref())
                    .await?;
            }
            _ => stats.resumes = self.download_sequential(&sender, first, &info).await?,
        }
        sender.finish().await?;
        Ok(stats)
    }

    async fn download_sequential(
        &self,
        sender: &ChunkSender,
        mut resp: reqwest::Response,
        info: &ResourceInfo,
    ) -> Result<u32> {
        let mut offset = 0u64;
        let mut resumes = 0;
        let mut failures_without_progress = 0;
        loop {
            let before = offset;
            let dropped = match self
                .stream_body(&mut resp, |chunk| {
                    offset += chunk.len() as u64;
                    sender.send(chunk)
                })
                .await
            {
                Ok(()) if info.size.is_some_and(|s| offset > s) => {
                    return Err(fail(
                        Kind::Integrity,
                        "CorruptData",
                        format!("{} sent more bytes than it declared", self.display_url()),
                    ))
                }
                Ok(()) if info.size.is_none_or(|s| offset == s) => return Ok(resumes),
                Ok(()) => format!(
                    "the connection closed after {offset} of {} bytes",
                    info.size.unwrap_or(0)
                ),
                Err(BodyError::Pipeline(e)) => return Err(e),
                Err(BodyError::Network(e)) => e,
            };
            if !info.ranges {
                return Err(restart(format!(
                    "{dropped}, and {} does not support ranges",
                    self.display_url()
                )));
            }
            self.pause_before_resume(
                &mut failures_without_progress,
                offset > before,
                &dropped,
                offset,
            )
            .await?;
            resumes += 1;
            resp = self
                .get(
                    Some(ByteRange {
                        start: offset,
                        end: None,
                    }),
                    info.validator.as_deref(),
                )
                .await?;
            check_partial(&resp, offset, &self.display_url())?;
        }
    }

    async fn download_parallel(
        &self,
        sender: &ChunkSender,
        size: u64,
        connections: usize,
        validator: Option<&str>,
    ) -> Result<u32> {
        let piece = piece_size(connections);
        let pieces = size.div_ceil(piece);
        let next = AtomicU64::new(0);
        let resumes = AtomicU32::new(0);
        // A piece holds a permit from its start until it is delivered in order,
        // so at most `connections + 1` pieces (PARALLEL_WINDOW bytes) are in memory.
        let window = Arc::new(tokio::sync::Semaphore::new(connections + 1));
        let (done_tx, mut done_rx) = tokio::sync::mpsc::channel(connections + 1);
        let fetchers = (0..connections).map(|_| {
            let done_tx = done_tx.clone();
            let (window, next, resumes) = (window.clone(), &next, &resumes);
            async move {
                loop {
                    let Ok(permit) = window.clone().acquire_owned().await else {
                        return;
                    };
                    let index = next.fetch_add(1, Ordering::SeqCst);
                    if index >= pieces {
                        return;
                    }
                    let range = ByteRange {
                        start: index * piece,
                        end: Some(((index + 1) * piece).min(size)),
                    };
                    let piece = self.fetch_piece(range, validator, resumes).await;
                    let failed = piece.is_err();
                    if done_tx.send((index, piece, permit)).await.is_err() || failed {
                        return;
                    }
                }
            }
        });
        let fetchers: Vec<_> = fetchers.collect();
        drop(done_tx);
        // `deliver` owns the receiver: when it stops early (an error), the
        // fetchers' sends fail and they stop too.
        let deliver = async move {
            let mut waiting = BTreeMap::new();
            let mut expected = 0;
            while expected < pieces {
                let Some((index, piece, permit)) = done_rx.recv().await else {
                    return Err(fail(
                        Kind::Internal,
                        "InternalError",
                        "the parallel download stopped early",
                    ));
                };
                waiting.insert(index, (piece?, permit));
                while let Some((data, permit)) = waiting.remove(&expected) {
                    sender.send(data).await?;
                    drop(permit);
                    expected += 1;
                }
            }
            Ok(())
        };
        // Both run to their end: the fetchers finishing says nothing about
        // whether every piece has been handed to the pipeline.
        let (delivered, _) = tokio::join!(deliver, futures_util::future::join_all(fetchers));
        delivered?;
        Ok(resumes.load(Ordering::SeqCst))
    }

    async fn fetch_piece(
        &self,
        range: ByteRange,
        validator: Option<&str>,
        resumes: &AtomicU32,
    ) -> Result<Bytes> {
        let end = range.end.expect("pieces are bounded");
        let mut buf = BytesMut::with_capacity((end - range.start) as usize);
        let mut failures_without_progress = 0;
        loop {
            let start = range.start + buf.len() as u64;
            let mut resp = self
                .get(
                    Some(ByteRange {
                        start,
                        end: Some(end),
                    }),
                    validator,
                )
                .await?;
            check_partial(&resp, start, &self.display_url())?;
            let before = buf.len();
            let result = self
                .stream_body(&mut resp, |chunk| {
                    buf.extend_from_slice(&chunk);
                    async { Ok(()) }
                })
                .await;
            let dropped = match result {
                Ok(()) if range.start + buf.len() as u64 >= end => {
                    buf.truncate((end - range.start) as usize);
                    return Ok(buf.freeze());
                }
                Ok(()) => format!(
                    "the connection closed inside bytes {}-{}",
                    range.start,
                    end - 1
                ),
                Err(BodyError::Pipeline(e)) => return Err(e),
                Err(BodyError::Network(e)) => e,
            };
            let at = range.start + buf.len() as u64;
            self.pause_before_resume(
                &mut failures_without_progress,
                buf.len() > before,
                &dropped,
                at,
            )
            .await?;
            resumes.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Between a broken transfer and its resumption: gives up (Transient)
    /// after `retries` breaks in a row that made no progress, else logs and
    /// backs off when the last attempt made none.
    async fn pause_before_resume(
        &self,
        stalls: &mut u32,
        progressed: bool,
        dropped: &str,
        at: u64,
    ) -> Result<()> {
        *stalls = if progressed { 0 } else { *stalls + 1 };
        if *stalls > self.options.retries {
            let retries = self.options.retries;
            return Err(fail(
                Kind::Transient,
                "Unreachable",
                format!("{dropped}; no progress after {retries} retries"),
            ));
        }
        crate::log::warn(format!("{dropped}; resuming at byte {at}"));
        if *stalls > 0 {
            self.sleep(backoff(self.options.retry_backoff, *stalls - 1))
                .await?;
        }
        Ok(())
    }

    /// Feeds the body to `each` until it ends; a network failure is returned
    /// as text (the caller resumes), a pipeline failure as an error.
    async fn stream_body<F, Fut>(
        &self,
        resp: &mut reqwest::Response,
        mut each: F,
    ) -> Result<(), BodyError>
    where
        F: FnMut(Bytes) -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        let body = std::mem::replace(resp, empty_response()).bytes_stream();
        tokio::pin!(body);
        loop {
            let next = tokio::select! {
                n = body.next() => n,
                _ = self.cancel.cancelled() => return Err(BodyError::Pipeline(crate::error::terminated())),
            };
            match next {
                None => return Ok(()),
                Some(Ok(chunk)) => each(chunk).await.map_err(BodyError::Pipeline)?,
                Some(Err(e)) => {
                    return Err(BodyError::Network(format!(
                        "the download from {} broke: {}",
                        self.display_url(),
                        root_cause(&e)
                    )))
                }
            }
        }
    }
}

/// Bytes a parallel download holds in pieces not yet delivered in order.
const PARALLEL_WINDOW: u64 = 32 << 20;

/// Piece size for `connections` parallel requests: large pieces (fewer
/// requests) while `connections + 1` of them fit the window, 1–4 MiB.
fn piece_size(connections: usize) -> u64 {
    (PARALLEL_WINDOW / (connections as u64 + 1)).clamp(1 << 20, 4 << 20) & !0xFFFF
}

enum BodyError {
    Network(String),
    Pipeline(anyhow::Error),
}

fn empty_response() -> reqwest::Response {
    reqwest::Response::from(http_response_empty())
}

fn http_response_empty() -> hyper::Response<reqwest::Body> {
    hyper::Response::new(reqwest::Body::from(Vec::new()))
}

fn build_client(options: &HttpOptions) -> Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(options.timeout)
        .read_timeout(options.timeout)
        .user_agent(concat!("populator-workers/", env!("CARGO_PKG_VERSION")));
    if let Some(ca) = &options.ca_file {
        for der in crate::tls::ca_certificates(ca)? {
            let cert = reqwest::Certificate::from_der(&der).map_err(|e| {
                fail(
                    Kind::Usage,
                    "InvalidConfiguration",
                    format!("a certificate in the CA file {}: {e}", ca.display()),
                )
            })?;
            builder = builder.add_root_certificate(cert);
        }
    }
    if options.insecure_skip_tls_verify {
        crate::log::warn("TLS verification is off (--insecure-skip-tls-verify): the server's identity is not checked");
        builder = builder.danger_accept_invalid_certs(true);
    }
    if let Some(proxy) = &options.proxy {
        let p = reqwest::Proxy::all(proxy)
            .map_err(|e| {
                fail(
                    Kind::Usage,
                    "InvalidConfiguration",
                    format!("invalid --proxy {proxy}: {e}"),
                )
            })?
            .no_proxy(reqwest::NoProxy::from_env());
        builder = builder.proxy(p);
    }
    builder.build().context("building the HTTP client")
}

enum Retry {
    Yes(anyhow::Error),
    No(anyhow::Error),
}

fn classify_status(status: StatusCode, url: &str) -> Retry {
    let msg = format!("{url} answered {status}");
    match status.as_u16() {
        401 => Retry::No(fail(
            Kind::Auth,
            "Unauthorized",
            format!("{msg}: check the credentials"),
        )),
        403 => Retry::No(fail(
            Kind::Auth,
            "Forbidden",
            format!("{msg}: the credentials are not allowed to read it"),
        )),
        412 => Retry::No(source_changed(format!(
            "{msg}: it changed since the download started"
        ))),
        404 | 410 => Retry::No(fail(
            Kind::Usage,
            "NotFound",
            format!("{msg}: check the URL"),
        )),
        408 | 429 | 500..=599 => Retry::Yes(fail(Kind::Transient, "ServerError", msg)),
        300..=399 => Retry::No(fail(
            Kind::Usage,
            "BadRedirect",
            format!("{msg}: a redirect without a usable Location, or more than 10 in a row"),
        )),
        _ => Retry::No(fail(Kind::Usage, "HttpError", msg)),
    }
}

fn resource_info(resp: &reqwest::Response) -> ResourceInfo {
    let headers = resp.headers();
    let get = |name: HeaderName| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let encoded = get(reqwest::header::CONTENT_ENCODING).is_some_and(|e| e != "identity");
    let etag = get(reqwest::header::ETAG).filter(|e| !e.starts_with("W/"));
    let validator = etag.or_else(|| get(reqwest::header::LAST_MODIFIED));
    ResourceInfo {
        size: if encoded { None } else { resp.content_length() },
        ranges: get(reqwest::header::ACCEPT_RANGES).is_some_and(|r| r.contains("bytes")),
        validator,
    }
}

/// The source is no longer the resource the import started reading: its
/// pieces cannot be put together (exit 3).
fn source_changed(message: String) -> anyhow::Error {
    fail(
        Kind::Integrity,
        "SourceChanged",
        format!("{message}; its pieces cannot be combined: start the import again"),
    )
}

/// A resumed request must answer 206 from the offset asked for; a 200 means
/// the resource changed (If-Range failed) or ranges stopped working.
fn check_partial(resp: &reqwest::Response, offset: u64, url: &str) -> Result<()> {
    if resp.status() != StatusCode::PARTIAL_CONTENT {
        return Err(restart(format!(
            "{url} changed since the download started (or stopped honouring ranges)"
        )));
    }
    let start = resp
        .headers()
        .get(reqwest::header::CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes "))
        .and_then(|v| v.split('-').next())
        .and_then(|v| v.parse::<u64>().ok());
    if start != Some(offset) {
        return Err(restart(format!(
            "{url} answered a range that does not start at byte {offset}"
        )));
    }
    Ok(())
}

fn backoff(initial: Duration, attempt: u32) -> Duration {
    initial
        .saturating_mul(1 << attempt.min(16))
        .min(Duration::from_secs(30))
}

/// Walks an error's causes, looking inside `io::Error`s too (their `source()`
/// skips the error they wrap).
fn causes<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> Vec<&'a (dyn std::error::Error + 'static)> {
    let mut out = Vec::new();
    let mut next = Some(e);
    while let Some(cur) = next {
        out.push(cur);
        next = match cur
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => cur.source(),
        };
    }
    out
}

fn is_tls_error(e: &reqwest::Error) -> bool {
    causes(e).iter().any(|c| c.is::<rustls::Error>())
}

fn tls_cause(e: &reqwest::Error) -> String {
    causes(e)
        .iter()
        .find(|c| c.is::<rustls::Error>())
        .map(|c| c.to_string())
        .unwrap_or_else(|| e.to_string())
}

fn root_cause(e: &reqwest::Error) -> String {
    let all = causes(e);
    let last = all.last().map(|c| c.to_string()).unwrap_or_default();
    if e.is_timeout() && !last.contains("timed out") {
        format!("{last} (timed out)")
    } else {
        last
    }
}

/// `scheme://host[:port]/path`, without credentials or query.
pub fn redact(url: &Url) -> String {
    let mut shown = url.clone();
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    let had_query = shown.query().is_some();
    shown.set_query(None);
    shown.set_fragment(None);
    if had_query {
        format!("{shown}?…")
    } else {
        shown.to_string()
    }
}

/// Parses `Name: value` into a header pair; `secret` marks it sensitive.
pub fn parse_header(line: &str, secret: bool) -> Result<(HeaderName, HeaderValue)> {
    let bad = |why: &str| {
        // A malformed secret line may be all value: never echo any of it.
        let shown = if secret {
            "a line of the header file".to_string()
        } else {
            format!("'{line}'")
        };
        fail(
            Kind::Usage,
            "InvalidConfiguration",
            format!("invalid header {shown}: {why} (expected 'Name: value')"),
        )
    };
    let (name, value) = line.split_once(':').ok_or_else(|| bad("no ':'"))?;
    let name = HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| bad("bad name"))?;
    let mut value = HeaderValue::from_str(value.trim()).map_err(|_| bad("bad value"))?;
    value.set_sensitive(secret);
    Ok((name, value))
}

/// Random access to an HTTP resource by Range requests, for disk images
/// whose metadata comes after the data it maps. Runs its requests on the
/// download's runtime from the (blocking) sink thread.
pub struct HttpRangeReader {
    source: Arc<HttpSource>,
    runtime: tokio::runtime::Handle,
}

impl HttpRangeReader {
    pub fn new(source: Arc<HttpSource>, runtime: tokio::runtime::Handle) -> Self {
        Self { source, runtime }
    }
}

impl std::fmt::Debug for HttpRangeReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HttpRangeReader({})", self.source.display_url())
    }
}

impl crate::disk::RandomAccess for HttpRangeReader {
    fn read_at(
        &self,
        offset: u64,
        len: u64,
        each: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        let url = self.source.display_url();
        // Every range must come from the resource the stream is reading:
        // If-Range and If-Match (or If-Unmodified-Since) carry its validator.
        let validator = self.source.validator();
        self.runtime.block_on(async {
            let range = ByteRange {
                start: offset,
                end: Some(offset + len),
            };
            let mut resp = self
                .source
                .get_conditional(Some(range), validator.as_deref(), true)
                .await?;
            let answered = resource_info(&resp).validator;
            if validator.is_some() && answered.is_some() && answered != validator {
                return Err(source_changed(format!(
                    "{url} changed since the download started (its validator was {}, a range request got {})",
                    validator.unwrap_or_default(),
                    answered.unwrap_or_default()
                )));
            }
            if resp.status() != StatusCode::PARTIAL_CONTENT {
                return Err(crate::disk::ranges_unsupported(format!(
                    "{url} does not answer range requests"
                )));
            }
            check_partial(&resp, offset, &url)?;
            let mut got = 0u64;
            while let Some(chunk) = resp.chunk().await.map_err(|e| {
                fail(
                    Kind::Transient,
                    "Unreachable",
                    format!("a range request to {url} broke: {}", root_cause(&e)),
                )
            })? {
                let n = (chunk.len() as u64).min(len - got) as usize;
                each(&chunk[..n])?;
                got += n as u64;
                if got == len {
                    break;
                }
            }
            if got < len {
                return Err(fail(
                    Kind::Transient,
                    "Unreachable",
                    format!("{url} ended a range request after {got} of {len} bytes"),
                ));
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_query_and_credentials() {
        let u = Url::parse("https://u:p@host:8443/a/b.img?X-Amz-Signature=abc").unwrap();
        assert_eq!(redact(&u), "https://host:8443/a/b.img?…");
    }

    #[test]
    fn headers_parse_and_secret_values_stay_hidden() {
        let (n, v) = parse_header("X-Token:  abc ", true).unwrap();
        assert_eq!((n.as_str(), v.to_str().unwrap()), ("x-token", "abc"));
        assert!(v.is_sensitive());
        let err = parse_header("X-Token abc", true).unwrap_err().to_string();
        assert!(!err.contains("abc"), "{err}");
    }

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(Duration::from_secs(1), 0), Duration::from_secs(1));
        assert_eq!(backoff(Duration::from_secs(1), 3), Duration::from_secs(8));
        assert_eq!(backoff(Duration::from_secs(1), 10), Duration::from_secs(30));
    }
}
