//! The receiving side: a TLS listener that checks the token before anything
//! else, builds the tree (or fills the device) from the sender's frames,
//! keeps its progress in the target (a journal in `.pvc-copy-state/` of a
//! directory, or in the last chunk of a device until that chunk is written
//! last), and exits after one verified transfer.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use crossbeam_channel::{unbounded, Sender as Tx};
use populator_core::error::{classify, fail, Kind};
use populator_core::secrets::secret_from;
use populator_core::target::{short_bytes, sync_filesystem, Target, TargetKind};
use populator_core::Context;
use serde_json::{json, Value};

use super::proto::{
    decode_entries, read_frame, read_json, unpair, write_json, Bitset, DataHeader, Frame,
    ManifestEntry, DATA_HEADER,
};
use crate::block::{zero_range, ChunkWriter, Zeroing};
use crate::cli::ReceiveArgs;
use crate::digest::{
    chunk_count, chunk_hash, chunk_len, combine, sha256, tree_digest_with, zero_hash, Hash,
    TreeDigestOptions, CHUNK,
};
use crate::meta::{apply_to_fd, apply_to_path, create_special, Entry, FileKind, Preserve};
use crate::tree::{preserve_for, target_contents, LOST_FOUND, STATE_DIR};

type Conn = rustls::StreamOwned<rustls::ServerConnection, super::Sock>;

struct Receiver<'a> {
    target: Target,
    token: Vec<u8>,
    preserve: Preserve,
    overwrite: bool,
    jobs: usize,
    /// Progress is made durable at most this often (and at the end of a stream).
    commit_every: Duration,
    ctx: &'a Context,
    current: Mutex<Option<Arc<Transfer>>>,
    outcome: Tx<Result<String>>,
    connections: AtomicU64,
    /// Accepted sockets, shut down at the end so no thread waits on a peer.
    sockets: Mutex<Vec<TcpStream>>,
}

struct Transfer {
    session: String,
    kind: TransferKind,
    journal: Mutex<Journal>,
    /// Held while progress is made durable, which runs outside the journal
    /// lock: streams go on marking items done during a flush.
    committing: Mutex<()>,
    resumed: u64,
    /// Content digest of each file (tree) or hash of each chunk (block),
    /// taken from the bytes as they arrived, so the final digest does not
    /// read the target again; items that arrived before a restart are
    /// hashed from the target at the end.
    hashes: Mutex<Vec<Option<Hash>>>,
}

impl Transfer {
    fn record_hash(&self, item: u64, hash: Hash) {
        if let Some(slot) = self.hashes.lock().unwrap().get_mut(item as usize) {
            *slot = Some(hash);
        }
    }

    /// Takes over the hashes an earlier attempt of the same session took
    /// of items this one does not send again.
    fn inherit_hashes(&self, previous: &Transfer) {
        if previous.session != self.session {
            return;
        }
        let done = &self.journal.lock().unwrap().done;
        let old = previous.hashes.lock().unwrap();
        let mut new = self.hashes.lock().unwrap();
        if old.len() != new.len() {
            return;
        }
        for (i, (n, o)) in new.iter_mut().zip(old.iter()).enumerate() {
            if done.get(i as u64) {
                *n = *o;
            }
        }
    }
}

/// The chunk hashes of one file as its Data frames arrive on a stream.
struct FileHasher {
    item: u64,
    size: u64,
    chunks: Vec<Option<Hash>>,
}

impl FileHasher {
    fn new(item: u64, size: u64) -> Self {
        Self {
            item,
            size,
            chunks: vec![None; chunk_count(size) as usize],
        }
    }

    /// The file's content digest: chunks not sent are holes or zeros.
    fn finish(self) -> Hash {
        let size = self.size;
        let list: Vec<Hash> = self
            .chunks
            .into_iter()
            .enumerate()
            .map(|(c, h)| h.unwrap_or_else(|| zero_hash(chunk_len(size, c as u64))))
            .collect();
        combine(&list)
    }
}

enum TransferKind {
    Tree {
        entries: Vec<ManifestEntry>,
    },
    Block {
        file: File,
        size: u64,
        zeroing: Zeroing,
    },
}

struct Journal {
    done: Bitset,
    dirty: bool,
    last_commit: Instant,
    /// The block journal lives in the last chunk; once that is written, no more.
    closed: bool,
}

pub fn run(args: ReceiveArgs, ctx: &Context) -> Result<String> {
    crate::meta::clear_umask();
    let token = secret_from(args.token.token_file.as_deref(), "POPULATOR_TOKEN", "token")?
        .ok_or_else(|| {
            fail(
                Kind::Usage,
                "InvalidConfiguration",
                "give --token-file (the file with the token the sender presents)",
            )
        })?;
    let target = Target::detect(args.common.target_path().as_deref(), args.common.pvc_size)?;
    ctx.report.set_target(&target);
    let identity = args.tls.identity(&["pvc-copy-receiver", "localhost"])?;
    populator_core::log::info(format!(
        "TLS certificate SHA-256 fingerprint {} (give it to the sender as --server-fingerprint)",
        identity.fingerprint()
    ));
    let config = identity.server_config()?;
    let listener = TcpListener::bind(args.listen).map_err(|e| {
        fail(
            Kind::Usage,
            "InvalidConfiguration",
            format!("cannot listen on {}: {e}", args.listen),
        )
    })?;
    listener.set_nonblocking(true)?;
    populator_core::log::info(format!(
        "listening on {} for one transfer into {}",
        listener.local_addr()?,
        target.path.display()
    ));
    ctx.progress.set_stage("waiting for the sender");
    let (tx, rx) = unbounded();
    let receiver = Receiver {
        preserve: preserve_for(args.copy.no_chown, args.common.owner),
        target,
        token: token.expose().as_bytes().to_vec(),
        overwrite: args.copy.overwrite,
        jobs: args.copy.jobs(),
        commit_every: args.commit.every(),
        ctx,
        current: Mutex::new(None),
        outcome: tx,
        connections: AtomicU64::new(0),
        sockets: Mutex::new(Vec::new()),
    };
    let idle = (args.idle_timeout > 0.0).then(|| Duration::from_secs_f64(args.idle_timeout));
    let receiver = &receiver;
    std::thread::scope(|s| {
        let outcome = accept_loop(receiver, s, &listener, &config, &rx, idle);
        // No connection thread may wait on a peer now.
        for sock in receiver.sockets.lock().unwrap().drain(..) {
            let _ = sock.shutdown(std::net::Shutdown::Both);
        }
        ctx.report
            .set("connections", receiver.connections.load(Ordering::Relaxed));
        outcome
    })
}

/// Accepts connections (each served on its own thread) until the transfer
/// ends, SIGTERM arrives or no sender came within `idle`.
fn accept_loop<'s, 'a: 's>(
    receiver: &'s Receiver<'a>,
    s: &'s std::thread::Scope<'s, '_>,
    listener: &TcpListener,
    config: &Arc<rustls::ServerConfig>,
    rx: &crossbeam_channel::Receiver<Result<String>>,
    idle: Option<Duration>,
) -> Result<String> {
    let mut last_activity = Instant::now();
    loop {
        if let Ok(outcome) = rx.try_recv() {
            return outcome;
        }
        receiver.ctx.cancel.check()?;
        match listener.accept() {
            Ok((tcp, peer)) => {
                last_activity = Instant::now();
                if let Ok(clone) = tcp.try_clone() {
                    receiver.sockets.lock().unwrap().push(clone);
                }
                receiver.connections.fetch_add(1, Ordering::Relaxed);
                let config = config.clone();
                s.spawn(move || {
                    if let Err(e) = receiver.serve(tcp, config) {
                        let c = classify(&e);
                        populator_core::log::warn(format!("connection from {peer}: {}", c.message));
                    }
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if let Some(idle) = idle {
                    if last_activity.elapsed() > idle && receiver.current.lock().unwrap().is_none()
                    {
                        return Err(fail(
                            Kind::Transient,
                            "NoSender",
                            format!("no sender connected within {} s", idle.as_secs()),
                        ));
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(anyhow!(e).context("accepting a connection")),
        }
    }
}

fn refuse(conn: &mut Conn, kind: &str, message: &str) {
    let _ = write_json(
        conn,
        Frame::Error,
        &json!({ "kind": kind, "message": message }),
    );
    conn.conn.send_close_notify();
    let _ = conn.flush();
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Auth => "auth",
        Kind::Capacity => "capacity",
        Kind::Usage => "usage",
        Kind::Integrity => "integrity",
        _ => "internal",
    }
}

impl Receiver<'_> {
    fn serve(&self, tcp: TcpStream, config: Arc<rustls::ServerConfig>) -> Result<()> {
        tcp.set_nonblocking(false)?;
        super::tune(&tcp);
        let mut server = rustls::ServerConnection::new(config)?;
        server.set_buffer_limit(Some(super::SEND_BUFFER));
        let mut conn = rustls::StreamOwned::new(server, super::Sock::new(tcp));
        let mut buf = Vec::new();
        let (kind, hello) = read_json(&mut conn, &mut buf).context("reading the sender's hello")?;
        if kind != Frame::Hello {
            bail!("protocol error: the first frame is not a hello");
        }
        let presented = hello["token"].as_str().unwrap_or("").as_bytes();
        if !super::same_token(presented, &self.token) {
            refuse(&mut conn, "auth", "wrong token");
            bail!("refused a sender with a wrong token; nothing was written");
        }
        match hello["role"].as_str() {
            Some("control") => match self.control(&mut conn, &hello, &mut buf) {
                Ok(()) => Ok(()),
                Err(e) => {
                    let c = classify(&e);
                    if matches!(c.kind, Kind::Usage | Kind::Capacity | Kind::Integrity) {
                        refuse(&mut conn, kind_name(c.kind), &c.message);
                        let _ = self.outcome.send(Err(e));
                        return Ok(());
                    }
                    Err(e)
                }
            },
            Some("data") => {
                let transfer = self.current.lock().unwrap().clone();
                let Some(t) =
                    transfer.filter(|t| Some(t.session.as_str()) == hello["session"].as_str())
                else {
                    refuse(
                        &mut conn,
                        "retry",
                        "no transfer in progress for this session",
                    );
                    bail!("a data stream arrived before its control stream");
                };
                write_json(&mut conn, Frame::Welcome, &json!({}))?;
                let result = self.data(&mut conn, &t, &mut buf);
                if result.is_err() {
                    // A dropped stream: keep what arrived, for the resume.
                    let _ = self.commit(&t, true);
                }
                result
            }
            _ => bail!("protocol error: unknown role"),
        }
    }

    fn control(&self, conn: &mut Conn, hello: &Value, buf: &mut Vec<u8>) -> Result<()> {
        let session = hello["session"].as_str().unwrap_or("").to_string();
        let size = hello["size"].as_u64().unwrap_or(0);
        let is_tree = match (hello["kind"].as_str(), self.target.kind) {
            (Some("tree"), TargetKind::Filesystem) => true,
            (Some("block"), TargetKind::Block | TargetKind::File) => false,
            (k, t) => {
                return Err(fail(
                    Kind::Usage,
                    "MixedVolumeModes",
                    format!("the sender sends a {} volume but target {} is a {} volume: use matching volume modes", if k == Some("tree") { "filesystem" } else { "block" }, self.target.path.display(), t.name()),
                ))
            }
        };
        // A new control stream starts a new attempt. The old attempt's streams
        // end (their peer is gone); what they wrote is recorded before the
        // journal is read back, or the resume would miss it.
        let previous = self.current.lock().unwrap().take();
        if let Some(previous) = &previous {
            let deadline = Instant::now() + Duration::from_secs(30);
            while Arc::strong_count(previous) > 1 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            self.commit(previous, true)?;
        }
        self.ctx.progress.set_total(Some(size));
        let transfer = if is_tree {
            self.start_tree(conn, &session, hello, buf)?
        } else {
            self.start_block(conn, &session, size)?
        };
        if let Some(previous) = &previous {
            transfer.inherit_hashes(previous);
        }
        let transfer = Arc::new(transfer);
        let done_hex = hex::encode(&transfer.journal.lock().unwrap().done.0);
        *self.current.lock().unwrap() = Some(transfer.clone());
        write_json(conn, Frame::Resume, &json!({ "done": done_hex }))?;
        self.ctx.progress.set_stage("receiving");
        self.ctx.report.set("session", session);
        self.ctx.report.set("resumedItems", transfer.resumed);
        // The control stream carries the block's last chunk, then Finish.
        loop {
            let kind = read_frame(conn, buf)?;
            match kind {
                Frame::Data | Frame::Zero => {
                    {
                        // After any commit under way: it may still write
                        // the journal where this chunk goes.
                        let _no_commit = transfer.committing.lock().unwrap();
                        transfer.journal.lock().unwrap().closed = true;
                    }
                    self.block_frame(&transfer, kind, buf)?;
                }
                Frame::Finish => break,
                other => bail!("protocol error: unexpected {other:?} on the control stream"),
            }
        }
        self.finish(conn, &transfer, buf)
    }

    fn welcome(&self, conn: &mut Conn) -> Result<()> {
        write_json(
            conn,
            Frame::Welcome,
            &json!({ "owners": self.preserve.owner, "root": self.preserve.root }),
        )?;
        Ok(())
    }

    fn start_tree(
        &self,
        conn: &mut Conn,
        session: &str,
        hello: &Value,
        buf: &mut Vec<u8>,
    ) -> Result<Transfer> {
        let dst = &self.target.path;
        let (others, has_state) = target_contents(dst)?;
        if !others.is_empty() && !has_state && !self.overwrite {
            return Err(fail(Kind::Usage, "TargetNotEmpty", format!("target {} is not empty (it holds '{}'…): give the receiver --overwrite, or use an empty volume", dst.display(), others[0])));
        }
        self.target.check_fits(
            hello["allocated"].as_u64().unwrap_or(0),
            "the source's data",
        )?;
        self.welcome(conn)?;
        let mut entries = Vec::new();
        loop {
            match read_frame(conn, buf)? {
                Frame::Manifest => entries.extend(decode_entries(buf)?),
                Frame::ManifestEnd => break,
                other => bail!("protocol error: unexpected {other:?} in the manifest"),
            }
        }
        check_manifest(&entries)?;
        let state = dst.join(STATE_DIR);
        crate::tree::create_state_dir(&state)?;
        let mut done = load_tree_journal(&state, session, entries.len() as u64);
        let resumed = prepare_tree(dst, &entries, &mut done, self.preserve)?;
        if resumed > 0 {
            populator_core::log::info(format!("resuming: {resumed} files are already here"));
        }
        std::fs::write(state.join("session"), session)?;
        write_tree_journal(&state, &done)?;
        Ok(Transfer {
            session: session.to_string(),
            hashes: Mutex::new(vec![None; entries.len()]),
            kind: TransferKind::Tree { entries },
            journal: Mutex::new(Journal {
                done,
                dirty: false,
                last_commit: Instant::now(),
                closed: false,
            }),
            committing: Mutex::new(()),
            resumed,
        })
    }

    fn start_block(&self, conn: &mut Conn, session: &str, size: u64) -> Result<Transfer> {
        self.target.check_fits(size, "the source device")?;
        let path = &self.target.path;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(self.target.kind == TargetKind::File)
            .truncate(false)
            .open(path)
            .with_context(|| format!("opening target {}", path.display()))?;
        let count = chunk_count(size);
        let mut done =
            load_block_journal(&file, size, session).unwrap_or_else(|| Bitset::new(count));
        let resumed = done.count();
        let zeroing = if self.target.kind == TargetKind::File && resumed == 0 {
            // A fresh sparse file: zero regions stay holes.
            file.set_len(0)?;
            file.set_len(size)?;
            Zeroing::Skip
        } else {
            Zeroing::Explicit
        };
        if resumed > 0 {
            populator_core::log::info(format!(
                "resuming: {resumed} of {count} chunks are already here"
            ));
        } else {
            done = Bitset::new(count);
        }
        self.welcome(conn)?;
        Ok(Transfer {
            session: session.to_string(),
            kind: TransferKind::Block {
                file,
                size,
                zeroing,
            },
            hashes: Mutex::new(vec![None; count as usize]),
            journal: Mutex::new(Journal {
                done,
                dirty: false,
                last_commit: Instant::now(),
                closed: false,
            }),
            committing: Mutex::new(()),
            resumed,
        })
    }

    /// A data stream: chunks and file ends until StreamEnd.
    fn data(&self, conn: &mut Conn, t: &Transfer, buf: &mut Vec<u8>) -> Result<()> {
        let mut open: Option<(u64, File)> = None;
        // How far the open file's data reaches: when that is its size, it
        // needs no ftruncate (the common case: a 4 KiB file in one frame).
        let mut data_end = 0u64;
        let mut hasher: Option<FileHasher> = None;
        let mut raw = Vec::new();
        loop {
            let kind = read_frame(conn, buf)?;
            match (&t.kind, kind) {
                (_, Frame::StreamEnd) => {
                    self.commit(t, true)?;
                    write_json(conn, Frame::StreamOk, &json!({}))?;
                    return Ok(());
                }
                (TransferKind::Block { .. }, Frame::Data | Frame::Zero) => {
                    self.block_frame(t, kind, buf)?
                }
                (TransferKind::Tree { entries }, Frame::Data) => {
                    let (h, payload) = decode_data(buf, &mut raw)?;
                    let e = leader_file(entries, h.item)?;
                    if e.size == 0 {
                        bail!("data beyond the end of {}", e.rel.display());
                    }
                    check_chunk(e.size, h.offset, payload.len() as u64)
                        .with_context(|| format!("data for {}", e.rel.display()))?;
                    if hasher.as_ref().map(|f| f.item) != Some(h.item) {
                        hasher = Some(FileHasher::new(h.item, e.size));
                    }
                    if let Some(f) = hasher.as_mut() {
                        f.chunks[(h.offset / CHUNK) as usize] = Some(h.hash);
                    }
                    if open.as_ref().map(|(i, _)| *i) != Some(h.item) {
                        let path = self.target.path.join(&e.rel);
                        let f = OpenOptions::new()
                            .write(true)
                            .custom_flags(libc::O_NOFOLLOW)
                            .open(&path)
                            .with_context(|| format!("opening {}", path.display()))?;
                        open = Some((h.item, f));
                        data_end = 0;
                    }
                    let f = &open.as_ref().unwrap().1;
                    ChunkWriter::new(f, Zeroing::Skip).write_chunk(h.offset, payload)?;
                    data_end = data_end.max(h.offset + payload.len() as u64);
                    self.ctx.progress.advance(payload.len() as u64);
                    self.ctx.progress.add_written(payload.len() as u64);
                }
                (TransferKind::Tree { entries }, Frame::FileDone) => {
                    let (item, size) = unpair(buf)?;
                    let e = leader_file(entries, item)?;
                    if size != e.size {
                        bail!("protocol error: size of {} disagrees", e.rel.display());
                    }
                    let path = self.target.path.join(&e.rel);
                    let (f, reaches_size) = match open.take() {
                        Some((i, f)) if i == item => (f, data_end == size),
                        _ => (
                            OpenOptions::new()
                                .write(true)
                                .custom_flags(libc::O_NOFOLLOW)
                                .open(&path)
                                .with_context(|| format!("opening {}", path.display()))?,
                            false,
                        ),
                    };
                    if !reaches_size {
                        // Trailing holes, or a file of an earlier attempt.
                        f.set_len(size)?;
                    }
                    // All its data is here: its metadata now, on this stream,
                    // while the file is open (times last, after the writes).
                    apply_to_fd(&f, e, self.preserve, Some(e.mode & 0o777))
                        .with_context(|| format!("setting the metadata of {}", path.display()))?;
                    drop(f);
                    let content = match hasher.take() {
                        Some(f) if f.item == item => f.finish(),
                        _ => FileHasher::new(item, size).finish(),
                    };
                    t.record_hash(item, content);
                    self.mark_done(t, item)?;
                }
                (_, other) => bail!("protocol error: unexpected {other:?} on a data stream"),
            }
        }
    }

    fn block_frame(&self, t: &Transfer, kind: Frame, buf: &[u8]) -> Result<()> {
        let TransferKind::Block {
            file,
            size,
            zeroing,
        } = &t.kind
        else {
            bail!("protocol error: block frames in a tree transfer");
        };
        let (start, len) = match kind {
            Frame::Zero => {
                let (start, len) = unpair(buf)?;
                check_chunk(*size, start, len)?;
                if *zeroing == Zeroing::Explicit {
                    zero_range(file, start, len)
                        .with_context(|| format!("zeroing the target at offset {start}"))?;
                }
                t.record_hash(start / CHUNK, zero_hash(len));
                (start, len)
            }
            _ => {
                let mut raw = Vec::new();
                let (h, payload) = decode_data(buf, &mut raw)?;
                check_chunk(*size, h.offset, payload.len() as u64)?;
                ChunkWriter::new(file, *zeroing)
                    .write_chunk(h.offset, payload)
                    .with_context(|| format!("writing the target at offset {}", h.offset))?;
                self.ctx.progress.add_written(payload.len() as u64);
                t.record_hash(h.offset / CHUNK, h.hash);
                (h.offset, payload.len() as u64)
            }
        };
        self.ctx.progress.advance(len);
        self.mark_done(t, start / CHUNK)
    }

    fn mark_done(&self, t: &Transfer, item: u64) -> Result<()> {
        {
            let mut j = t.journal.lock().unwrap();
            j.done.set(item);
            j.dirty = true;
        }
        self.commit(t, false)
    }

    /// Makes written data durable, then records it as done. The flush runs
    /// without the journal lock (holding it stalled every stream for the
    /// length of a syncfs every two seconds); one commit at a time, and a
    /// periodic one is skipped while another runs.
    fn commit(&self, t: &Transfer, force: bool) -> Result<()> {
        let _committing = match t.committing.try_lock() {
            Ok(guard) => guard,
            Err(_) if !force => return Ok(()),
            Err(_) => t.committing.lock().unwrap(),
        };
        let (done, closed) = {
            let mut j = t.journal.lock().unwrap();
            if !j.dirty || (!force && j.last_commit.elapsed() < self.commit_every) {
                return Ok(());
            }
            j.dirty = false;
            j.last_commit = Instant::now();
            (j.done.clone(), j.closed)
        };
        // Every item in `done` was written before it was marked: flushed now.
        let made_durable = match &t.kind {
            TransferKind::Tree { .. } => sync_filesystem(&self.target.path)
                .and_then(|()| write_tree_journal(&self.target.path.join(STATE_DIR), &done)),
            TransferKind::Block { file, size, .. } => file
                .sync_data()
                .map_err(Into::into)
                .and_then(|()| match closed {
                    true => Ok(()),
                    false => write_block_journal(file, *size, &t.session, &done),
                }),
        };
        if made_durable.is_err() {
            t.journal.lock().unwrap().dirty = true;
        }
        made_durable
    }

    /// All data is here: metadata, flush, digest, the sender's verdict.
    fn finish(&self, conn: &mut Conn, t: &Transfer, buf: &mut Vec<u8>) -> Result<()> {
        self.ctx.progress.set_stage("verifying");
        let digest = match &t.kind {
            TransferKind::Tree { entries } => {
                let j = t.journal.lock().unwrap();
                if let Some((i, m)) = entries.iter().enumerate().find(|(i, m)| {
                    m.entry.kind == FileKind::File && m.link_to.is_none() && !j.done.get(*i as u64)
                }) {
                    bail!(
                        "the sender finished but {} (#{i}) never arrived",
                        m.entry.rel.display()
                    );
                }
                drop(j);
                // Files that arrived now got theirs at FileDone.
                let arrived: Vec<bool> = t
                    .hashes
                    .lock()
                    .unwrap()
                    .iter()
                    .map(Option::is_some)
                    .collect();
                apply_tree_metadata(&self.target.path, entries, &arrived, self.preserve)?;
                sync_filesystem(&self.target.path)?;
                let options = TreeDigestOptions {
                    owners: self.preserve.owner,
                };
                // Metadata is read back from the target; content digests come
                // from the bytes as they arrived (files of an earlier run are
                // read again).
                let hashes = t.hashes.lock().unwrap();
                let known: HashMap<&Path, Hash> = entries
                    .iter()
                    .enumerate()
                    .filter(|(_, m)| m.entry.kind == FileKind::File)
                    .filter_map(|(i, m)| {
                        let leader = m.link_to.unwrap_or(i as u64) as usize;
                        Some((
                            m.entry.rel.as_path(),
                            hashes.get(leader).copied().flatten()?,
                        ))
                    })
                    .collect();
                let reread = entries
                    .iter()
                    .enumerate()
                    .filter(|(i, m)| {
                        m.entry.kind == FileKind::File
                            && m.link_to.is_none()
                            && hashes[*i].is_none()
                    })
                    .count();
                self.ctx.report.set("digestRereadItems", reread);
                let lookup = |rel: &Path| known.get(rel).copied();
                tree_digest_with(
                    &self.target.path,
                    &[LOST_FOUND, STATE_DIR],
                    options,
                    self.jobs,
                    &self.ctx.cancel,
                    Some(&lookup),
                )?
                .hex()
            }
            TransferKind::Block { file, size, .. } => {
                let j = t.journal.lock().unwrap();
                let missing = (0..chunk_count(*size)).find(|&i| !j.done.get(i));
                drop(j);
                if let Some(i) = missing {
                    bail!("the sender finished but chunk {i} never arrived");
                }
                file.sync_data()?;
                hex::encode(self.device_digest(t, file, *size)?)
            }
        };
        let key = if matches!(t.kind, TransferKind::Tree { .. }) {
            "tree"
        } else {
            "device"
        };
        self.ctx
            .report
            .set_digests(&populator_core::digest::Digests(
                [(key.to_string(), digest.clone())].into_iter().collect(),
            ));
        write_json(conn, Frame::Digest, &json!({ "digest": digest }))?;
        let (kind, verdict) = read_json(conn, buf)?;
        if kind != Frame::Verdict {
            bail!("protocol error: expected the verdict");
        }
        if verdict["ok"].as_bool() != Some(true) {
            let e = fail(
                Kind::Integrity,
                "VerificationFailed",
                format!(
                    "the target's digest {digest} differs from the source's {}",
                    verdict["digest"].as_str().unwrap_or("?")
                ),
            );
            let _ = self.outcome.send(Err(e));
            return Ok(());
        }
        if let TransferKind::Tree { entries } = &t.kind {
            let state = self.target.path.join(STATE_DIR);
            std::fs::remove_dir_all(&state)
                .with_context(|| format!("removing {}", state.display()))?;
            // Removing the state touched the top directory: its times again.
            crate::meta::set_times(&self.target.path, &entries[0].entry)?;
            sync_filesystem(&self.target.path)?;
        }
        write_json(conn, Frame::Verdict, &json!({ "ok": true }))?;
        let summary = format!(
            "received {} into {} ({key} digest {digest} verified by the sender)",
            short_bytes(self.ctx.progress.done()),
            self.target.path.display()
        );
        let _ = self.outcome.send(Ok(summary));
        Ok(())
    }
}

impl Receiver<'_> {
    /// The device digest from the chunk hashes taken as the chunks arrived;
    /// chunks written before a restart are read back from the target.
    fn device_digest(&self, t: &Transfer, file: &File, size: u64) -> Result<Hash> {
        let mut hashes = t.hashes.lock().unwrap();
        let reread = hashes.iter().filter(|h| h.is_none()).count();
        self.ctx.report.set("digestRereadItems", reread);
        let mut buf = Vec::new();
        for (i, slot) in hashes.iter_mut().enumerate() {
            if slot.is_none() {
                self.ctx.cancel.check()?;
                let (start, len) = (i as u64 * CHUNK, chunk_len(size, i as u64));
                buf.resize(len as usize, 0);
                file.read_exact_at(&mut buf, start)
                    .with_context(|| format!("reading the target at offset {start}"))?;
                *slot = Some(chunk_hash(&buf));
            }
        }
        Ok(combine(
            &hashes.iter().map(|h| h.unwrap()).collect::<Vec<_>>(),
        ))
    }
}

fn decode_data<'a>(buf: &'a [u8], raw: &'a mut Vec<u8>) -> Result<(DataHeader, &'a [u8])> {
    let h = DataHeader::decode(buf)?;
    let body = &buf[DATA_HEADER..];
    let payload: &[u8] = if h.compressed {
        *raw = zstd::bulk::decompress(body, h.raw_len as usize)
            .context("decompressing a data frame")?;
        raw
    } else {
        body
    };
    if payload.len() != h.raw_len as usize || sha256(payload) != h.hash {
        return Err(fail(
            Kind::Internal,
            "ChunkCorrupted",
            format!(
                "a data chunk at offset {} does not match its hash",
                h.offset
            ),
        ));
    }
    Ok((h, payload))
}

fn check_chunk(size: u64, start: u64, len: u64) -> Result<()> {
    if start % CHUNK != 0 || start >= size.max(1) || len != chunk_len(size, start / CHUNK) {
        bail!("protocol error: a chunk at offset {start} of {len} bytes does not fit a {size}-byte device");
    }
    Ok(())
}

fn leader_file(entries: &[ManifestEntry], item: u64) -> Result<&Entry> {
    match entries.get(item as usize) {
        Some(m) if m.entry.kind == FileKind::File && m.link_to.is_none() => Ok(&m.entry),
        _ => bail!("protocol error: data for entry #{item}, which is not a regular file"),
    }
}

/// Every entry's parent is a directory of the manifest, the root comes
/// first, links point backwards: a hostile manifest cannot write through a
/// symlink or outside the target.
fn check_manifest(entries: &[ManifestEntry]) -> Result<()> {
    let hostile = |what: String| fail(Kind::Integrity, "HostileManifest", what);
    match entries.first() {
        Some(m) if m.entry.rel.as_os_str().is_empty() && m.entry.kind == FileKind::Dir => {}
        _ => {
            return Err(hostile(
                "the manifest does not start with the top directory".into(),
            ))
        }
    }
    let mut dirs: HashSet<&Path> = HashSet::new();
    for (i, m) in entries.iter().enumerate() {
        let rel = &m.entry.rel;
        if i > 0 {
            let parent = rel.parent().unwrap_or(Path::new(""));
            if !dirs.contains(parent) || crate::tree::is_reserved_top(rel) {
                return Err(hostile(format!(
                    "entry {} has no directory above it in the manifest",
                    rel.display()
                )));
            }
        }
        if let Some(l) = m.link_to {
            if l >= i as u64
                || entries[l as usize].entry.kind != m.entry.kind
                || m.entry.kind == FileKind::Dir
            {
                return Err(hostile(format!("bad hard link {}", rel.display())));
            }
        }
        if m.entry.kind == FileKind::Dir {
            dirs.insert(rel);
        }
    }
    Ok(())
}

/// Creates every entry that has no data (directories, links, special
/// files) and empties the files still to come. Returns how many files are
/// already complete.
fn prepare_tree(
    dst: &Path,
    entries: &[ManifestEntry],
    done: &mut Bitset,
    preserve: Preserve,
) -> Result<u64> {
    let clear = |path: &Path, keep_dir: bool| -> std::io::Result<()> {
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() && keep_dir => Ok(()),
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
            Ok(_) => std::fs::remove_file(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    };
    let mut resumed = 0;
    for (i, m) in entries.iter().enumerate().skip(1) {
        let e = &m.entry;
        let path = dst.join(&e.rel);
        let ctx = || format!("creating {}", path.display());
        if let Some(l) = m.link_to {
            clear(&path, false).with_context(ctx)?;
            std::fs::hard_link(dst.join(&entries[l as usize].entry.rel), &path)
                .with_context(ctx)?;
            continue;
        }
        match e.kind {
            FileKind::Dir => {
                clear(&path, true).with_context(ctx)?;
                use std::os::unix::fs::DirBuilderExt;
                match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                    Err(err) if err.kind() != std::io::ErrorKind::AlreadyExists => {
                        return Err(err).with_context(ctx)
                    }
                    _ => {}
                }
            }
            FileKind::File => {
                if done.get(i as u64)
                    && std::fs::symlink_metadata(&path)
                        .is_ok_and(|md| md.is_file() && md.len() == e.size)
                {
                    resumed += 1;
                    continue;
                }
                clear(&path, false).with_context(ctx)?;
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(e.mode & 0o777)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&path)
                    .with_context(ctx)?;
                unset(done, i as u64);
            }
            _ => {
                if matches!(e.kind, FileKind::Char | FileKind::Block) && !preserve.root {
                    populator_core::log::warn(format!(
                        "skipping device node {}: creating device nodes needs root",
                        e.rel.display()
                    ));
                    continue;
                }
                clear(&path, false).with_context(ctx)?;
                create_special(&path, e).with_context(ctx)?;
                apply_to_path(&path, e, preserve)
                    .with_context(|| format!("setting the metadata of {}", path.display()))?;
            }
        }
    }
    Ok(resumed)
}

fn unset(b: &mut Bitset, i: u64) {
    if let Some(x) = b.0.get_mut((i / 8) as usize) {
        *x &= !(1 << (i % 8));
    }
}

/// Owners, xattrs, modes and times of files that did not arrive in this
/// attempt (a resume's), then of directories deepest first, the top
/// directory last.
fn apply_tree_metadata(
    dst: &Path,
    entries: &[ManifestEntry],
    arrived: &[bool],
    preserve: Preserve,
) -> Result<()> {
    let open = |path: &Path, dir: bool| {
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | if dir { libc::O_DIRECTORY } else { 0 })
            .open(path)
    };
    for (_, m) in entries.iter().enumerate().filter(|(i, m)| {
        m.entry.kind == FileKind::File
            && m.link_to.is_none()
            && !arrived.get(*i).is_some_and(|a| *a)
    }) {
        let path = dst.join(&m.entry.rel);
        let f = open(&path, false).with_context(|| format!("opening {}", path.display()))?;
        apply_to_fd(&f, &m.entry, preserve, None)
            .with_context(|| format!("setting the metadata of {}", path.display()))?;
    }
    let mut dirs: Vec<&Entry> = entries
        .iter()
        .map(|m| &m.entry)
        .filter(|e| e.kind == FileKind::Dir)
        .collect();
    dirs.sort_by_key(|e| {
        std::cmp::Reverse(if e.rel.as_os_str().is_empty() {
            0
        } else {
            e.rel.components().count()
        })
    });
    for e in dirs {
        let path = crate::meta::join(dst, &e.rel);
        let f = open(&path, true).with_context(|| format!("opening {}", path.display()))?;
        apply_to_fd(&f, e, preserve, None)
            .with_context(|| format!("setting the metadata of {}", path.display()))?;
    }
    Ok(())
}

fn load_tree_journal(state: &Path, session: &str, n: u64) -> Bitset {
    let same = std::fs::read_to_string(state.join("session")).is_ok_and(|s| s == session);
    match std::fs::read(state.join("done")) {
        Ok(bits) if same && bits.len() as u64 == n.div_ceil(8) => Bitset(bits),
        _ => Bitset::new(n),
    }
}

fn write_tree_journal(state: &Path, done: &Bitset) -> Result<()> {
    let tmp = state.join("done.tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(&done.0)?;
    f.sync_data()?;
    std::fs::rename(&tmp, state.join("done"))?;
    Ok(())
}

const MAGIC: &[u8; 8] = b"PVCCOPY1";

/// Where the block journal lives: the last chunk, written last.
fn journal_region(size: u64) -> (u64, u64) {
    let last = chunk_count(size).saturating_sub(1);
    (last * CHUNK, chunk_len(size, last))
}

fn encode_block_journal(session: &str, done: &Bitset) -> Vec<u8> {
    let mut out = Vec::with_capacity(96 + done.0.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&sha256(session.as_bytes()));
    out.extend_from_slice(&(done.0.len() as u64).to_le_bytes());
    out.extend_from_slice(&done.0);
    let check = sha256(&out);
    out.extend_from_slice(&check);
    out
}

fn write_block_journal(file: &File, size: u64, session: &str, done: &Bitset) -> Result<()> {
    let (at, room) = journal_region(size);
    let bytes = encode_block_journal(session, done);
    if bytes.len() as u64 > room {
        return Ok(()); // too small to hold it: a restart starts over
    }
    file.write_all_at(&bytes, at)?;
    file.sync_data()?;
    Ok(())
}

fn load_block_journal(file: &File, size: u64, session: &str) -> Option<Bitset> {
    let (at, room) = journal_region(size);
    let n = chunk_count(size).div_ceil(8) as usize;
    let len = 8 + 32 + 8 + n + 32;
    if len as u64 > room {
        return None;
    }
    let mut b = vec![0u8; len];
    file.read_exact_at(&mut b, at).ok()?;
    let expected = encode_block_journal(session, &Bitset(b[48..48 + n].to_vec()));
    (expected == b).then(|| Bitset(b[48..48 + n].to_vec()))
}
