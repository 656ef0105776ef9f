//! The session runner, on the main thread: takes one upload at a time from
//! the server and streams it into the volume through the core pipeline
//! (digest → decompress → content sink), or for a plain tus file upload
//! through the [`crate::resumable`] writer. A failure caused by the client
//! (it went away, stalled, sent a bad form) is answered and forgotten; any
//! other failure, like success, ends the receiver.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Result;
use bytes::Bytes;
use hyper::StatusCode;
use populator_core::content::{ContentMode, ContentSpec};
use populator_core::decompress::{Compression, DecompressMode};
use populator_core::digest::MultiDigest;
use populator_core::error::{classify, fail, Classified, Kind};
use populator_core::pipeline::{run_stream, ChunkSender, StreamOutcome};
use populator_core::target::{short_bytes, Target};
use populator_core::Context;
use tokio::runtime::Runtime;

use crate::pump::{bad_request, is_client_failure, Limits};
use crate::resumable::Resumable;
use crate::server::{Job, Phase, Reply, Shared, Upload, Wait};
use crate::tus::{Segment, Session};

/// Room for a form's boundaries and part headers around its file.
const FORM_FRAMING: u64 = 1 << 20;

pub struct Runner<'a> {
    pub runtime: &'a Runtime,
    pub shared: Arc<Shared>,
    pub target: Target,
    pub spec: ContentSpec,
    pub ctx: &'a Context,
    pub limits: Limits,
    /// No --file-name: a tus client's `filename` metadata names the file.
    pub client_names_file: bool,
}

/// What an upload ended with.
enum Ending {
    /// Written, verified, flushed: the summary line.
    Completed(String),
    /// The client's fault; the receiver waits for the next upload.
    Dropped,
    /// A tus file upload that got no PATCH for the idle timeout: it no
    /// longer holds the receiver, but resumes when a PATCH comes before
    /// another upload starts.
    Parked(Box<Parked>),
}

pub struct Parked {
    session: Session,
    writer: Resumable,
    spec: ContentSpec,
}

/// What the runner waits for next.
enum Next {
    Job(Job),
    /// A PATCH of the parked tus upload.
    Resume(crate::tus::Segment),
}

/// The reason of "no PATCH within the idle timeout".
const TUS_IDLE: &str = "TusIdle";

impl Runner<'_> {
    /// Serves jobs until one upload completes (the summary) or fails for good.
    pub fn run(&self, jobs: &mut tokio::sync::mpsc::Receiver<Job>) -> Result<String> {
        let mut parked: Option<Box<Parked>> = None;
        loop {
            let next = self.runtime.block_on(self.limits.bounded(async {
                let closed = || fail(Kind::Internal, "InternalError", "the server stopped");
                match parked.as_mut() {
                    None => jobs.recv().await.map(Next::Job).ok_or_else(closed),
                    Some(p) => tokio::select! {
                        job = jobs.recv() => job.map(Next::Job).ok_or_else(closed),
                        patch = p.session.segments.recv() => patch.map(Next::Resume).ok_or_else(closed),
                    },
                }
            }))?;
            let ending = match next {
                Next::Resume(patch) => {
                    let mut p = parked
                        .take()
                        .expect("a PATCH comes only from a parked upload");
                    if let Err(reply) = self.shared.claim() {
                        // Another upload claimed the receiver meanwhile.
                        answer(&mut Some(patch.reply), reply);
                        self.linger(patch.body);
                        parked = Some(p);
                        continue;
                    }
                    populator_core::log::info(format!(
                        "tus upload {} resumed at {} bytes",
                        p.session.id,
                        p.session.offset.load(Ordering::SeqCst)
                    ));
                    p.session.pending = Some(patch);
                    self.ctx.progress.set_stage("receiving");
                    self.tus_file(p.session, p.writer, &p.spec)?
                }
                Next::Job(job) => {
                    if let Some(p) = parked.take() {
                        populator_core::log::warn(format!(
                            "another upload started: the parked tus upload {} at {} of {} bytes is discarded",
                            p.session.id,
                            p.session.offset.load(Ordering::SeqCst),
                            p.session.length
                        ));
                        self.shared.tus.forget(&p.session.id);
                        p.writer.abort();
                        self.ctx.progress.restart();
                    }
                    match job {
                        Job::Upload(upload) => self.upload(upload),
                        Job::Tus(session) => self.tus(session),
                    }?
                }
            };
            match ending {
                Ending::Completed(summary) => {
                    self.shared.set_phase(Phase::Done);
                    return Ok(summary);
                }
                Ending::Dropped => {
                    self.ctx.progress.restart();
                    self.ctx.progress.set_stage("waiting");
                    self.shared.set_phase(Phase::Idle);
                }
                Ending::Parked(p) => {
                    populator_core::log::warn(format!(
                        "tus upload {} got no PATCH for {} s (--idle-timeout) at {} of {} bytes: \
                         it no longer holds the receiver; a client may resume it at /files/{} \
                         until another upload starts",
                        p.session.id,
                        self.limits.idle.as_secs_f64(),
                        p.session.offset.load(Ordering::SeqCst),
                        p.session.length,
                        p.session.id
                    ));
                    self.ctx.progress.set_stage("waiting");
                    self.shared.set_phase(Phase::Idle);
                    parked = Some(p);
                }
            }
        }
    }

    /// A CDI upload: the whole body (or the form's `file` field) through the
    /// pipeline, the checksums of `--checksum` and `Content-Digest` checked.
    fn upload(&self, upload: Upload) -> Result<Ending> {
        let Upload {
            body,
            form_boundary,
            wait,
            content_length,
            checksums,
            reply,
        } = upload;
        let mut reply = Some(reply);
        if let Err(e) = self.check_declared(content_length, form_boundary.is_some()) {
            answer(&mut reply, too_large(&e));
            self.linger(body);
            return Err(e);
        }
        let mut spec = self.spec.clone();
        spec.checksums.extend(checksums);
        self.ctx.progress.set_total(content_length);
        self.ctx.progress.set_stage("receiving");
        let mut body = Some(body);
        // A raw body that the pipeline stopped taking (no space, a bad
        // archive): kept for the lingering close after the answer.
        let mut unread = None;
        let outcome = run_stream(&self.target, &spec, self.ctx, |sender| {
            let mut body = body.take().ok_or_else(|| {
                fail(
                    Kind::Internal,
                    "InternalError",
                    "the upload cannot start over",
                )
            })?;
            self.runtime.block_on(async {
                match &form_boundary {
                    None => {
                        let pumped = self.pump_body(&mut body, &sender).await;
                        if pumped.is_err() {
                            unread = Some(body);
                        }
                        pumped?
                    }
                    Some(boundary) => self.pump_form(body, boundary, &sender).await?,
                }
                sender.finish().await
            })?;
            if wait == Wait::Async {
                self.ctx.progress.set_stage("processing");
                answer(
                    &mut reply,
                    Reply::new(StatusCode::OK, "received; processing continues"),
                );
            }
            Ok(())
        });
        let ending = self.finish(outcome, &mut reply, "upload");
        if let Some(body) = unread {
            self.linger(body);
        }
        ending
    }

    /// Drains a body answered early in the background (see [`crate::pump::linger`]).
    fn linger(&self, body: hyper::body::Incoming) {
        self.runtime.spawn(crate::pump::linger(body));
    }

    /// Answers the client and decides what the outcome means for the receiver.
    fn finish(
        &self,
        outcome: Result<StreamOutcome>,
        reply: &mut Option<tokio::sync::oneshot::Sender<Reply>>,
        how: &str,
    ) -> Result<Ending> {
        match outcome {
            Ok(outcome) => {
                self.ctx.report.extend(outcome.details.clone());
                let summary = self.summary(how, &outcome.digests.0, outcome.compression);
                self.shared.set_phase(Phase::Done);
                answer(reply, Reply::new(StatusCode::OK, "upload complete"));
                Ok(Ending::Completed(summary))
            }
            Err(e) => {
                let c = classify(&e);
                answer(reply, failure_reply(&c));
                if is_client_failure(&e) {
                    populator_core::log::warn(format!(
                        "upload dropped, waiting for another: {}",
                        c.message
                    ));
                    Ok(Ending::Dropped)
                } else {
                    Err(e)
                }
            }
        }
    }

    fn summary(
        &self,
        how: &str,
        digests: &std::collections::BTreeMap<String, String>,
        compression: Compression,
    ) -> String {
        format!(
            "received {} by {how} into {} (sha256 {}, {})",
            short_bytes(self.ctx.progress.bytes_read()),
            self.target.path.display(),
            digests.get("sha256").map(String::as_str).unwrap_or("?"),
            match compression.name() {
                "none" => "not compressed".to_string(),
                c => format!("{c} decompressed"),
            },
        )
    }

    /// A declared size over capacity is refused before any byte is read
    /// (413, exit 4). Only for file content: an archive or a compressed
    /// stream may grow or shrink on the way.
    ///
    /// A form's Content-Length also counts its boundaries and part headers
    /// (a few hundred bytes for CDI's clients, which send only the `file`
    /// field): a form more than [`FORM_FRAMING`] larger than the volume
    /// cannot carry a file that fits. A smaller one is checked while
    /// writing (507).
    fn check_declared(&self, size: Option<u64>, form: bool) -> Result<()> {
        match size {
            Some(size) if self.spec.mode == ContentMode::File && !form => {
                self.target.check_fits(size, "the declared upload")
            }
            Some(size) if self.spec.mode == ContentMode::File => self.target.check_fits(
                size.saturating_sub(FORM_FRAMING),
                "the form's file (its Content-Length less 1 MiB for the form's framing)",
            ),
            _ => Ok(()),
        }
    }

    async fn pump_body(
        &self,
        body: &mut hyper::body::Incoming,
        sender: &ChunkSender,
    ) -> Result<()> {
        while let Some(data) = self.limits.next_data(body).await? {
            sender.send(data).await?;
        }
        Ok(())
    }

    /// The form's `file` field into the pipeline; other fields are skipped.
    async fn pump_form(
        &self,
        body: hyper::body::Incoming,
        boundary: &str,
        sender: &ChunkSender,
    ) -> Result<()> {
        // multer sees only bytes; the real error of a broken body is kept aside.
        let failure = std::sync::Mutex::new(None);
        let stream = futures_util::stream::unfold(Some(body), |body| async {
            let mut body = body?;
            match self.limits.next_data(&mut body).await {
                Ok(Some(data)) => Some((Ok::<Bytes, std::io::Error>(data), Some(body))),
                Ok(None) => None,
                Err(e) => {
                    let text = e.to_string();
                    *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    Some((Err(std::io::Error::other(text)), None))
                }
            }
        });
        let mut form = multer::Multipart::new(stream, boundary);
        let taken = |e: multer::Error| -> anyhow::Error {
            failure
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
                .unwrap_or_else(|| bad_request(format!("the form is malformed: {e}")))
        };
        let mut found = false;
        while let Some(mut field) = form.next_field().await.map_err(taken)? {
            if found || field.name() != Some("file") {
                while field.chunk().await.map_err(taken)?.is_some() {}
                continue;
            }
            found = true;
            while let Some(data) = field.chunk().await.map_err(taken)? {
                sender.send(data).await?;
            }
        }
        if !found {
            return Err(bad_request("the form has no field named 'file'"));
        }
        Ok(())
    }

    /// A tus upload: PATCH bodies arrive as segments. A plain file goes
    /// straight to its place with resumable state; anything to decompress
    /// or extract runs through the pipeline, which waits between PATCHes.
    fn tus(&self, mut session: Session) -> Result<Ending> {
        self.ctx.progress.set_total(Some(session.length));
        self.ctx.progress.set_stage("receiving");
        let mut spec = self.spec.clone();
        if let Some(name) = session.file_name.clone().filter(|_| self.client_names_file) {
            spec.file_name = name;
        }
        if let Some(saved) = session.resume.take() {
            spec.file_name = saved.file_name.clone();
            if saved.offset > 0 {
                let writer = Resumable::resume(&self.target, &spec, saved, self.ctx)?;
                return self.tus_direct(session, writer, None, &spec);
            }
        }
        if spec.mode != ContentMode::File {
            session.announce_created();
            return self.tus_pipeline(session, None, &spec);
        }
        if let Err(e) = self
            .target
            .check_fits(session.length, "the declared upload")
        {
            answer(&mut session.created, too_large(&e));
            return Err(e);
        }
        // The state is saved on creation, so that a restarted receiver knows
        // the upload even before its first PATCH.
        let writer = Resumable::create(&self.target, &spec, &session, &spec.file_name, self.ctx)?;
        session.announce_created();
        self.tus_file(session, writer, &spec)
    }

    /// A tus upload of a plain file, created or parked: straight to its
    /// place unless its first bytes show compression.
    fn tus_file(
        &self,
        mut session: Session,
        writer: Resumable,
        spec: &ContentSpec,
    ) -> Result<Ending> {
        if session.length == 0 || session.offset.load(Ordering::SeqCst) > 0 {
            return self.tus_direct(session, writer, None, spec);
        }
        // Its first bytes tell whether it is compressed.
        let first = match self.first_bytes(&mut session) {
            Err(e) if classify(&e).reason == TUS_IDLE => {
                return Ok(Ending::Parked(Box::new(Parked {
                    session,
                    writer,
                    spec: spec.clone(),
                })))
            }
            first => first,
        };
        let first = first.inspect_err(|e| {
            // Kept for a restart when terminated; a deadline ends it for good.
            if classify(e).kind != Kind::Terminated {
                writer.abort();
            }
        })?;
        let Some((segment, first)) = first else {
            writer.abort();
            return Ok(Ending::Dropped);
        };
        let compressed = spec.decompress == DecompressMode::Auto
            && Compression::detect(&first) != Compression::None;
        if compressed {
            // Decompression cannot resume after a restart: through the
            // pipeline, resumable while this receiver lives.
            writer.abort();
            return self.tus_pipeline(session, Some((segment, first)), spec);
        }
        self.tus_direct(session, writer, Some((segment, first)), spec)
    }

    /// Waits for the first PATCH and its first bytes (up to 6, enough for
    /// the compression magic).
    fn first_bytes(&self, session: &mut Session) -> Result<Option<(Segment, Bytes)>> {
        loop {
            let Some(mut segment) = self.next_segment(session)? else {
                return Ok(None);
            };
            let mut first = Vec::new();
            let broke = self.runtime.block_on(async {
                while first.len() < 6 {
                    match self.limits.next_data(&mut segment.body).await {
                        Ok(Some(d)) => first.extend_from_slice(&d),
                        Ok(None) => break,
                        Err(e) if is_client_failure(&e) => return Ok(Some(e)),
                        Err(e) => return Err(e),
                    }
                }
                Ok(None)
            })?;
            match broke {
                Some(e) => answer(&mut Some(segment.reply), failure_reply(&classify(&e))),
                None if first.is_empty() => {
                    answer(&mut Some(segment.reply), session.offset_reply())
                }
                None => return Ok(Some((segment, Bytes::from(first)))),
            }
        }
    }

    fn next_segment(&self, session: &mut Session) -> Result<Option<Segment>> {
        self.runtime
            .block_on(self.limits.bounded(self.wait_segment(session)))
    }

    /// The next PATCH of `session`: one that arrived while it was parked,
    /// or one within the idle timeout (else a [`TUS_IDLE`] error).
    async fn wait_segment(&self, session: &mut Session) -> Result<Option<Segment>> {
        if let Some(patch) = session.pending.take() {
            return Ok(Some(patch));
        }
        tokio::time::timeout(self.limits.idle, session.segments.recv())
            .await
            .map_err(|_| {
                fail(
                    Kind::Transient,
                    TUS_IDLE,
                    format!(
                        "tus upload {} got no PATCH for {} s (--idle-timeout)",
                        session.id,
                        self.limits.idle.as_secs_f64()
                    ),
                )
            })
    }

    /// tus into the resumable writer: bytes land at their offset, state is
    /// saved as they come, and the last PATCH is answered after the data is
    /// verified and flushed.
    fn tus_direct(
        &self,
        mut session: Session,
        mut writer: Resumable,
        mut pending: Option<(Segment, Bytes)>,
        spec: &ContentSpec,
    ) -> Result<Ending> {
        let received = self.runtime.block_on(async {
            let mut last = None;
            let mut sink = PatchSink::Writer(&mut writer);
            while session.offset.load(Ordering::SeqCst) < session.length {
                let (segment, first) = self.wait_patch(&mut session, &mut pending).await?;
                if let PatchEnd::Last(reply) = self
                    .apply_patch(&session, segment, first, &mut sink)
                    .await?
                {
                    last = Some(reply);
                }
            }
            Ok(last)
        });
        let mut last = match received {
            Ok(last) => last,
            Err(e) if classify(&e).reason == TUS_IDLE => {
                writer.checkpoint()?;
                return Ok(Ending::Parked(Box::new(Parked {
                    session,
                    writer,
                    spec: spec.clone(),
                })));
            }
            Err(e) if classify(&e).kind == Kind::Terminated => {
                // Stopped from outside: keep what arrived, so that the
                // receiver started again resumes it.
                let _ = writer.checkpoint();
                return Err(e);
            }
            Err(e) => {
                writer.abort();
                return Err(e);
            }
        };
        self.ctx.progress.set_stage("flushing");
        match writer.finish(&spec.checksums, self.ctx) {
            Ok(digests) => {
                self.ctx.report.set_digests(&digests);
                session.complete();
                self.shared.set_phase(Phase::Done);
                answer(&mut last, session.offset_reply());
                Ok(Ending::Completed(self.summary(
                    "tus",
                    &digests.0,
                    Compression::None,
                )))
            }
            Err(e) => {
                answer(&mut last, failure_reply(&classify(&e)));
                Err(e)
            }
        }
    }

    /// tus through the pipeline: one stream across all PATCHes of this
    /// receiver's life (a restart starts over).
    fn tus_pipeline(
        &self,
        mut session: Session,
        mut pending: Option<(Segment, Bytes)>,
        spec: &ContentSpec,
    ) -> Result<Ending> {
        let mut last = None;
        let outcome = run_stream(&self.target, spec, self.ctx, |sender| {
            self.runtime.block_on(async {
                let mut sink = PatchSink::Pipeline(&sender);
                while session.offset.load(Ordering::SeqCst) < session.length {
                    let (segment, first) = self.wait_patch(&mut session, &mut pending).await?;
                    if let PatchEnd::Last(reply) = self
                        .apply_patch(&session, segment, first, &mut sink)
                        .await?
                    {
                        last = Some(reply);
                    }
                }
                sender.finish().await
            })
        });
        match outcome {
            Ok(o) => {
                session.complete();
                self.shared.set_phase(Phase::Done);
                answer(&mut last, session.offset_reply());
                self.ctx.report.extend(o.details.clone());
                Ok(Ending::Completed(self.summary(
                    "tus",
                    &o.digests.0,
                    o.compression,
                )))
            }
            Err(e) if classify(&e).reason == TUS_IDLE => {
                // A stream through the pipeline cannot wait without holding
                // the receiver: dropped, like a stalled CDI upload.
                populator_core::log::warn(format!("upload dropped: {e:#}"));
                self.shared.tus.forget(&session.id);
                Ok(Ending::Dropped)
            }
            Err(e) => {
                answer(&mut last, failure_reply(&classify(&e)));
                Err(e)
            }
        }
    }

    /// The pending PATCH, or the next one to arrive.
    async fn wait_patch(
        &self,
        session: &mut Session,
        pending: &mut Option<(Segment, Bytes)>,
    ) -> Result<(Segment, Bytes)> {
        if let Some(p) = pending.take() {
            return Ok(p);
        }
        match self.limits.bounded(self.wait_segment(session)).await? {
            Some(segment) => Ok((segment, Bytes::new())),
            None => Err(fail(Kind::Internal, "InternalError", "the server stopped")),
        }
    }

    /// Applies one PATCH: its bytes (`first`, then the rest of its body) go
    /// into `sink` within Upload-Length, and its Upload-Checksum is checked.
    /// Every outcome but the completing PATCH is answered here; a fatal one
    /// is also returned.
    async fn apply_patch(
        &self,
        session: &Session,
        mut segment: Segment,
        first: Bytes,
        sink: &mut PatchSink<'_>,
    ) -> Result<PatchEnd> {
        let mut check = segment
            .checksum
            .as_ref()
            .map(|c| MultiDigest::new(std::slice::from_ref(c)));
        let received: Result<()> = async {
            let mut data = first;
            loop {
                if !data.is_empty() {
                    let offset = session.offset.load(Ordering::SeqCst);
                    if data.len() as u64 > session.length - offset {
                        return Err(bad_request("the PATCH holds more bytes than Upload-Length"));
                    }
                    if let Some(c) = &mut check {
                        c.update(&data);
                    }
                    let n = data.len() as u64;
                    sink.take(data).await?;
                    session.offset.store(offset + n, Ordering::SeqCst);
                }
                match self.limits.next_data(&mut segment.body).await? {
                    Some(d) => data = d,
                    None => return Ok(()),
                }
            }
        }
        .await;
        // What arrived is durable before the client hears the offset.
        let received = received.and_then(|()| sink.checkpoint()).or_else(|e| {
            let saved = sink.checkpoint();
            if is_client_failure(&e) {
                saved.and(Err(e))
            } else {
                Err(e)
            }
        });
        let mut reply = Some(segment.reply);
        match received {
            Err(e) if is_client_failure(&e) => {
                answer(&mut reply, failure_reply(&classify(&e)));
                return Ok(PatchEnd::Broken);
            }
            Err(e) => {
                answer(&mut reply, failure_reply(&classify(&e)));
                return Err(e);
            }
            Ok(()) => {}
        }
        if let (Some(c), Some(expected)) = (check, &segment.checksum) {
            if let Some(m) = c.finish().mismatch(std::slice::from_ref(expected)) {
                let e = patch_checksum_mismatch(segment.offset, &m);
                answer(&mut reply, tus_checksum_reply(&e));
                return Err(e);
            }
        }
        if session.offset.load(Ordering::SeqCst) == session.length {
            return Ok(PatchEnd::Last(reply.take().expect("not answered yet")));
        }
        answer(&mut reply, session.offset_reply());
        Ok(PatchEnd::Applied)
    }
}

/// Where the bytes of tus PATCHes go.
enum PatchSink<'a> {
    /// Straight to their place, with resumable state.
    Writer(&'a mut Resumable),
    /// Into the pipeline (decompression, extraction).
    Pipeline(&'a ChunkSender),
}

impl PatchSink<'_> {
    async fn take(&mut self, data: Bytes) -> Result<()> {
        match self {
            PatchSink::Writer(w) => w.write(&data),
            PatchSink::Pipeline(s) => s.send(data).await,
        }
    }

    /// Makes what arrived durable and records the offset (writer only: the
    /// pipeline cannot resume after a restart).
    fn checkpoint(&mut self) -> Result<()> {
        match self {
            PatchSink::Writer(w) => w.checkpoint(),
            PatchSink::Pipeline(_) => Ok(()),
        }
    }
}

/// How one PATCH ended.
enum PatchEnd {
    /// Applied and answered with the new offset.
    Applied,
    /// Applied and the upload is complete: the answer waits for the
    /// verification and flush.
    Last(tokio::sync::oneshot::Sender<Reply>),
    /// The client failed (answered); the upload waits for another PATCH.
    Broken,
}

/// Sends the answer once; a client that went away is not an error.
pub fn answer(reply: &mut Option<tokio::sync::oneshot::Sender<Reply>>, with: Reply) {
    if let Some(r) = reply.take() {
        let _ = r.send(with);
    }
}

/// The HTTP status for a failure, as CDI's clients expect them.
pub fn failure_reply(c: &Classified) -> Reply {
    let status = match (c.kind, c.reason.as_str()) {
        (_, "ChecksumMismatch") => StatusCode::BAD_REQUEST,
        (_, "BadRequest") => StatusCode::BAD_REQUEST,
        (Kind::Integrity, _) => StatusCode::BAD_REQUEST,
        // Found while writing: the declared size fitted, or none was given.
        (Kind::Capacity, _) => StatusCode::INSUFFICIENT_STORAGE,
        (_, "ClientStalled") => StatusCode::REQUEST_TIMEOUT,
        (_, "ClientDisconnected") => StatusCode::BAD_REQUEST,
        (Kind::Terminated, _) | (_, "DeadlinePassed") => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    Reply::new(status, format!("{}: {}", c.reason, c.message))
}

fn patch_checksum_mismatch(offset: u64, mismatch: &str) -> anyhow::Error {
    fail(
        Kind::Integrity,
        "ChecksumMismatch",
        format!("Upload-Checksum of the PATCH at offset {offset}: {mismatch}"),
    )
}

/// tus answers a checksum mismatch with its own status, 460.
fn tus_checksum_reply(e: &anyhow::Error) -> Reply {
    let mut reply = failure_reply(&classify(e));
    reply.status = StatusCode::from_u16(460).expect("a valid status");
    reply
}

/// A declared size over capacity, refused before any byte is read.
fn too_large(e: &anyhow::Error) -> Reply {
    let mut reply = failure_reply(&classify(e));
    reply.status = StatusCode::PAYLOAD_TOO_LARGE;
    reply
}
