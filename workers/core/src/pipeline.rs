//! The byte-stream pipeline shared by http-import, upload-receiver and
//! backup-restore:
//!
//! ```text
//! source (network, async) ─chunks─▶ digest thread ─chunks─▶ decode thread ─buffers─▶ sink thread
//!                                   md5/sha*/…              decompress              content sink → target
//! ```
//!
//! Each arrow is a bounded channel, so memory stays small and the stages run
//! on different cores. A source that must start over (the file changed
//! between resumed requests) returns [`restart`]; the pipeline then discards
//! what the sink wrote and runs again from zero. Checksums are compared before
//! the sink commits: nothing is reported as populated until it is verified.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;

use crate::content::{self, ContentSpec, Sink, StreamInfo};
use crate::decompress::{self, Compression};
use crate::digest::{Digests, MultiDigest};
use crate::error::{classify, fail, into_io, Kind};
use crate::progress::Progress;
use crate::target::Target;
use crate::worker::Context;

/// Chunks in flight per channel.
const CHANNEL_DEPTH: usize = 64;
/// Source bytes in flight between the source and the sink, whatever the
/// chunk sizes (hyper's reads grow to hundreds of KiB; a parallel download
/// delivers 4 MiB pieces): this, not the chunk count, bounds the memory.
const IN_FLIGHT_BYTES: u32 = 8 << 20;
/// Larger chunks are sliced (without copying) so that one chunk never needs
/// the whole budget.
const MAX_CHUNK: usize = 1 << 20;
/// How often a source may start over from zero before the import fails.
const MAX_RESTARTS: u32 = 3;
/// The sink's copy buffer: the writer's chunk size, so full buffers go
/// from here to the target without another copy.
pub const COPY_BUFFER: usize = crate::writer::CHUNK;

/// A share of the in-flight budget, returned when the sink has consumed the
/// chunk that holds it.
type Budget = tokio::sync::OwnedSemaphorePermit;

enum Chunk {
    Data(Bytes, Budget),
    End,
}

/// The source's end of the pipeline.
pub struct ChunkSender {
    tx: tokio::sync::mpsc::Sender<Chunk>,
    budget: Arc<tokio::sync::Semaphore>,
    progress: Arc<Progress>,
}

impl ChunkSender {
    /// Sends source bytes downstream, waiting while the in-flight budget is
    /// spent; counts them as read and done.
    pub async fn send(&self, mut data: Bytes) -> Result<()> {
        while !data.is_empty() {
            let piece = data.split_to(data.len().min(MAX_CHUNK));
            let n = piece.len();
            let budget = self
                .budget
                .clone()
                .acquire_many_owned(n as u32)
                .await
                .map_err(|_| pipeline_closed())?;
            self.tx
                .send(Chunk::Data(piece, budget))
                .await
                .map_err(|_| pipeline_closed())?;
            self.progress.add_read(n as u64);
            self.progress.advance(n as u64);
        }
        Ok(())
    }

    /// `send` for sources that are not async.
    pub fn send_blocking(&self, data: Bytes) -> Result<()> {
        block_on(self.send(data))
    }

    /// Marks the end of the source: everything was sent.
    pub async fn finish(self) -> Result<()> {
        self.tx
            .send(Chunk::End)
            .await
            .map_err(|_| pipeline_closed())
    }

    pub fn finish_blocking(self) -> Result<()> {
        block_on(self.finish())
    }
}

/// Runs a future on the current thread (for the blocking senders: the
/// futures here only wait for the budget or a channel slot).
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Arc::new(Unpark(std::thread::current())).into();
    let mut cx = std::task::Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let std::task::Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return out;
        }
        std::thread::park();
    }
}

fn pipeline_closed() -> anyhow::Error {
    fail(
        Kind::Internal,
        "PipelineClosed",
        "the pipeline stopped taking data",
    )
}

/// The error a source returns to make the pipeline start over from zero.
pub fn restart(why: impl Into<String>) -> anyhow::Error {
    fail(Kind::Transient, "SourceRestart", why)
}

fn is_reason(err: &anyhow::Error, reason: &str) -> bool {
    classify(err).reason == reason
}

/// What a finished stream produced.
#[derive(Debug)]
pub struct StreamOutcome {
    pub digests: Digests,
    pub compression: Compression,
    pub restarts: u32,
    pub details: serde_json::Map<String, serde_json::Value>,
}

/// Runs `source` into the target through digest, decompression and the
/// content sink, starting over when the source asks to.
pub fn run_stream<S>(
    target: &Target,
    spec: &ContentSpec,
    ctx: &Context,
    mut source: S,
) -> Result<StreamOutcome>
where
    S: FnMut(ChunkSender) -> Result<()>,
{
    let mut restarts = 0;
    loop {
        match attempt(target, spec, ctx, &mut source) {
            Err(e)
                if is_reason(&e, "SourceRestart")
                    && restarts < MAX_RESTARTS
                    && !ctx.cancel.is_cancelled() =>
            {
                restarts += 1;
                crate::log::warn(format!("starting over from zero: {e:#}"));
                ctx.progress.restart();
            }
            Err(e) => return Err(e),
            Ok(mut outcome) => {
                outcome.restarts = restarts;
                return Ok(outcome);
            }
        }
    }
}

fn attempt<S>(
    target: &Target,
    spec: &ContentSpec,
    ctx: &Context,
    source: &mut S,
) -> Result<StreamOutcome>
where
    S: FnMut(ChunkSender) -> Result<()>,
{
    let mut sink = content::open_sink(target, spec, ctx)?;
    let (tx, rx) = tokio::sync::mpsc::channel(CHANNEL_DEPTH);
    let (tx2, rx2) = mpsc::sync_channel(CHANNEL_DEPTH);
    let expected = spec.checksums.clone();
    let (source_result, digests, consumed) = std::thread::scope(|s| {
        let hasher = std::thread::Builder::new()
            .name("digest".into())
            .spawn_scoped(s, move || hash_stage(rx, tx2, MultiDigest::new(&expected)))
            .expect("spawning the digest thread");
        let sink_ref = &mut sink;
        let consumer = std::thread::Builder::new()
            .name("sink".into())
            .spawn_scoped(s, move || consume(sink_ref.as_mut(), rx2, spec, ctx))
            .expect("spawning the sink thread");
        let source_result = source(ChunkSender {
            tx,
            budget: Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT_BYTES as usize)),
            progress: ctx.progress.clone(),
        });
        let digests = hasher.join().expect("the digest thread panicked");
        let consumed = consumer.join().expect("the sink thread panicked");
        (source_result, digests, consumed)
    });
    let outcome = (|| {
        ctx.cancel.check()?;
        // The sink's own failure (corrupt data, no space) explains more than
        // the source noticing that the pipeline closed.
        let compression = match consumed {
            Err(e) if !is_reason(&e, "SourceAborted") => return Err(e),
            Err(e) => {
                source_result?;
                return Err(e);
            }
            Ok(c) => c,
        };
        source_result?;
        let digests = digests.ok_or_else(|| {
            fail(
                Kind::Internal,
                "InternalError",
                "the digest stage stopped early",
            )
        })?;
        ctx.report.set_digests(&digests);
        if let Some(mismatch) = digests.mismatch(&spec.checksums) {
            return Err(fail(Kind::Integrity, "ChecksumMismatch", mismatch));
        }
        ctx.progress.set_stage("flushing");
        sink.commit()?;
        Ok(StreamOutcome {
            digests,
            compression,
            restarts: 0,
            details: sink.details(),
        })
    })();
    if outcome.is_err() {
        sink.abort();
    }
    outcome
}

fn hash_stage(
    mut rx: tokio::sync::mpsc::Receiver<Chunk>,
    tx: mpsc::SyncSender<Chunk>,
    mut digest: MultiDigest,
) -> Option<Digests> {
    while let Some(chunk) = rx.blocking_recv() {
        match chunk {
            Chunk::Data(data, budget) => {
                digest.update(&data);
                tx.send(Chunk::Data(data, budget)).ok()?;
            }
            Chunk::End => {
                tx.send(Chunk::End).ok()?;
                return Some(digest.finish());
            }
        }
    }
    None
}

/// The sink thread: a decode thread detects the compression and decodes
/// (as `zstd -dc | tar x` runs two processes, decoding overlaps the sink's
/// writes); the sink takes the plain bytes, then the source is read to its
/// end so every byte is digested.
fn consume(
    sink: &mut dyn Sink,
    rx: mpsc::Receiver<Chunk>,
    spec: &ContentSpec,
    ctx: &Context,
) -> Result<Compression> {
    let mut reader = ChannelReader {
        rx,
        current: Bytes::new(),
        _budget: None,
        ended: false,
        cancel: ctx.cancel.clone(),
        abandoned: Arc::new(AtomicBool::new(false)),
    };
    let abandoned = reader.abandoned.clone();
    let (info_tx, info_rx) = mpsc::sync_channel(1);
    let (data_tx, data_rx) = mpsc::sync_channel(DECODED_BUFFERS);
    let sunk = std::thread::scope(|s| {
        let reader_ref = &mut reader;
        let decoder = std::thread::Builder::new()
            .name("decode".into())
            .spawn_scoped(s, move || {
                decode_stage(reader_ref, spec.decompress, info_tx, data_tx)
            })
            .expect("spawning the decode thread");
        let sunk = (|| -> Result<Compression> {
            let compression = info_rx.recv().map_err(|_| pipeline_closed())??;
            ctx.report.set("compression", compression.name());
            let info = StreamInfo {
                compression,
                declared_size: ctx.progress.total(),
            };
            let mut decoded = DecodedReader {
                rx: data_rx,
                current: Vec::new(),
                pos: 0,
            };
            sink.write_stream(&mut decoded, &info)?;
            Ok(compression)
        })();
        if sunk.is_err() {
            // A decode thread waiting for source bytes gives up.
            abandoned.store(true, Ordering::Relaxed);
        }
        // The receiver is gone: the decode thread stops at its next send.
        decoder.join().expect("the decode thread panicked");
        sunk
    });
    let compression = sunk?;
    copy(&mut reader, &mut io::sink())?;
    Ok(compression)
}

/// Decoded bytes in flight between the decode thread and the sink.
const DECODED_BUFFERS: usize = 8;
const DECODED_BUFFER: usize = 1 << 20;

/// The decode thread: the compression first, then full buffers of plain
/// bytes; a decoding error goes to the sink in place of the data (bytes
/// the sink never asks for cannot fail it); the end is the channel closing.
fn decode_stage(
    reader: &mut ChannelReader,
    mode: decompress::DecompressMode,
    info_tx: mpsc::SyncSender<io::Result<Compression>>,
    data_tx: mpsc::SyncSender<io::Result<Vec<u8>>>,
) {
    let (compression, mut decoded) = match decompress::open(reader, mode) {
        Ok(opened) => opened,
        Err(e) => {
            let _ = info_tx.send(Err(e));
            return;
        }
    };
    if info_tx.send(Ok(compression)).is_err() {
        return;
    }
    loop {
        let mut buf = vec![0u8; DECODED_BUFFER];
        let mut filled = 0;
        let result = loop {
            match decoded.read(&mut buf[filled..]) {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    filled += n;
                    if filled == buf.len() {
                        break Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        if filled > 0 {
            buf.truncate(filled);
            if data_tx.send(Ok(buf)).is_err() {
                return;
            }
        }
        match result {
            Err(e) => {
                let _ = data_tx.send(Err(e));
                return;
            }
            Ok(()) if filled < DECODED_BUFFER => return,
            Ok(()) => {}
        }
    }
}

/// `io::Read` over the decode thread's buffers.
struct DecodedReader {
    rx: mpsc::Receiver<io::Result<Vec<u8>>>,
    current: Vec<u8>,
    pos: usize,
}

impl Read for DecodedReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.current.len() {
            match self.rx.recv() {
                Ok(data) => {
                    self.current = data?;
                    self.pos = 0;
                }
                // The decode thread closes the channel at the end.
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len() - self.pos);
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// `io::Read` over the chunks from the digest stage.
struct ChannelReader {
    rx: mpsc::Receiver<Chunk>,
    current: Bytes,
    /// Held until `current` is consumed.
    _budget: Option<Budget>,
    ended: bool,
    cancel: crate::cancel::CancelToken,
    /// Set when the sink failed: nobody wants more bytes.
    abandoned: Arc<AtomicBool>,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            if self.ended {
                return Ok(0);
            }
            match self.rx.recv_timeout(Duration::from_millis(200)) {
                Ok(Chunk::Data(d, budget)) => {
                    self.current = d;
                    self._budget = Some(budget);
                }
                Ok(Chunk::End) => self.ended = true,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if self.abandoned.load(Ordering::Relaxed) {
                        return Err(io::Error::other("the sink stopped"));
                    }
                    if self.cancel.is_cancelled() {
                        return Err(into_io(
                            Kind::Terminated,
                            "Terminated",
                            "terminated by signal",
                        ));
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(into_io(
                        Kind::Transient,
                        "SourceAborted",
                        "the source stopped before the end of the data",
                    ))
                }
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        let _ = self.current.split_to(n);
        Ok(n)
    }
}

/// `io::copy` with a large buffer (the std one reads 8 KiB at a time). The
/// buffer is filled before it is written: sources deliver pieces of a few
/// hundred KiB, and whole buffers pass through the writer without a copy.
pub fn copy(reader: &mut dyn Read, writer: &mut dyn Write) -> io::Result<u64> {
    copy_with_buffer(reader, writer, &mut vec![0u8; COPY_BUFFER])
}

/// [`copy`] through the caller's buffer: for callers that copy many small
/// streams (archive entries), where a fresh zeroed buffer each would cost
/// more than the data.
pub fn copy_with_buffer(
    reader: &mut dyn Read,
    writer: &mut dyn Write,
    buf: &mut [u8],
) -> io::Result<u64> {
    let mut total = 0;
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            match reader.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        if filled == 0 {
            return Ok(total);
        }
        writer.write_all(&buf[..filled])?;
        total += filled as u64;
    }
}
