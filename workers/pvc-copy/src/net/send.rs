//! The sending side: reads the source (a tree or a device), opens a control
//! stream and `--streams` data streams to the receiver, sends what the
//! receiver does not have yet, reconnects and continues after a dropped
//! connection, and compares its digest with the receiver's at the end.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context as _, Result};
use populator_core::error::{classify, fail, Kind};
use populator_core::secrets::secret_from;
use populator_core::target::short_bytes;
use populator_core::Context;
use rustls::pki_types::ServerName;
use serde_json::json;

use super::proto::{
    self, encode_entry, expect_json, pair, write_frame, write_json, Bitset, DataHeader, Frame,
    ManifestEntry,
};
use super::tls::{client_config, is_trust_failure, normalize_fingerprint, Trust};
use crate::cli::{Compress, SendArgs};
use crate::digest::{
    self, chunk_count, chunk_len, combine, open_noatime, sha256, zero_hash, Collected, Hash,
    TreeDigestOptions, CHUNK,
};
use crate::filecopy::data_segments;
use crate::local::{device_size, source_kind, SourceKind};
use crate::meta::{Entry, FileKind};
use crate::tree::LOST_FOUND;
use crate::walk::{walk, Visitor};

pub type Conn = rustls::StreamOwned<rustls::ClientConnection, super::Sock>;

/// What is sent.
enum Plan {
    Tree {
        root: PathBuf,
        entries: Vec<ManifestEntry>,
    },
    Block {
        path: PathBuf,
        size: u64,
        is_file: bool,
    },
}

impl Plan {
    /// Work items: leader files (tree) or chunks (block); the block's last
    /// chunk goes last, on the control stream, since the receiver keeps its
    /// journal there until then.
    fn items(&self) -> u64 {
        match self {
            Plan::Tree { entries, .. } => entries.len() as u64,
            Plan::Block { size, .. } => chunk_count(*size),
        }
    }

    fn is_work(&self, i: u64) -> bool {
        match self {
            Plan::Tree { entries, .. } => {
                let m = &entries[i as usize];
                m.entry.kind == FileKind::File && m.link_to.is_none()
            }
            Plan::Block { size, .. } => i + 1 < chunk_count(*size),
        }
    }
}

struct Sender {
    addr: String,
    server_name: ServerName<'static>,
    config: Arc<rustls::ClientConfig>,
    token: String,
    plan: Plan,
    session: String,
    compress: bool,
    streams: usize,
    /// Chunk hashes (block) or content digests (tree) of what was sent.
    hashes: Vec<Mutex<Option<Hash>>>,
    sent_bytes: AtomicU64,
    read_bytes: AtomicU64,
    /// The sockets of the current attempt, to end it at once when one stream
    /// fails or SIGTERM arrives (a stream blocked in a write would not notice).
    sockets: Mutex<Vec<TcpStream>>,
}

pub fn run(args: SendArgs, ctx: &Context) -> Result<String> {
    let token = secret_from(args.token.token_file.as_deref(), "POPULATOR_TOKEN", "token")?
        .ok_or_else(|| {
            fail(
                Kind::Usage,
                "InvalidConfiguration",
                "give --token-file (the file with the token the receiver expects)",
            )
        })?;
    let trust = match (
        &args.ca_file,
        &args.server_fingerprint,
        args.insecure_skip_tls_verify,
    ) {
        (Some(ca), None, false) => Trust::CaFile(ca.clone()),
        (None, Some(fp), false) => Trust::Fingerprint(normalize_fingerprint(fp)?),
        (None, None, true) => {
            populator_core::log::warn(
                "--insecure-skip-tls-verify: the receiver's certificate is not checked",
            );
            Trust::Insecure
        }
        (None, None, false) => return Err(fail(
            Kind::Usage,
            "InvalidConfiguration",
            "give --server-fingerprint (logged by the receiver) or --ca-file to trust the receiver",
        )),
        _ => {
            return Err(fail(
                Kind::Usage,
                "InvalidConfiguration",
                "give only one of --ca-file, --server-fingerprint and --insecure-skip-tls-verify",
            ))
        }
    };
    let config = client_config(&trust)?;
    let host = args
        .to
        .rsplit_once(':')
        .map(|(h, _)| h.trim_matches(['[', ']']))
        .unwrap_or(&args.to)
        .to_string();
    let name = args.tls_server_name.clone().unwrap_or(host);
    let server_name = ServerName::try_from(name.clone()).map_err(|_| {
        fail(
            Kind::Usage,
            "InvalidConfiguration",
            format!("'{name}' is not a valid server name"),
        )
    })?;
    let kind = source_kind(&args.source)?;
    ctx.progress.set_stage("reading the source");
    let plan = match kind {
        SourceKind::Dir => Plan::Tree {
            root: args.source.clone(),
            entries: manifest(&args.source, args.copy.jobs(), ctx)?,
        },
        _ => Plan::Block {
            path: args.source.clone(),
            size: device_size(&args.source, kind)?,
            is_file: kind == SourceKind::File,
        },
    };
    let session = session_id(&plan);
    let items = plan.items();
    let sender = Sender {
        addr: args.to.clone(),
        server_name,
        config,
        token: token.expose().to_string(),
        session,
        compress: args.compress == Compress::Zstd,
        streams: args.token.streams as usize,
        hashes: (0..items).map(|_| Mutex::new(None)).collect(),
        sent_bytes: AtomicU64::new(0),
        read_bytes: AtomicU64::new(0),
        sockets: Mutex::new(Vec::new()),
        plan,
    };
    ctx.progress.set_total(Some(sender.total_bytes()));
    ctx.report.set("streams", sender.streams);
    ctx.report
        .set("compress", if sender.compress { "zstd" } else { "none" });
    let finished = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !finished.load(Ordering::Relaxed) {
                if ctx.cancel.is_cancelled() {
                    sender.end_attempt();
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let outcome = sender.attempts(&args, ctx);
        finished.store(true, Ordering::Relaxed);
        outcome
    })
}

impl Sender {
    /// Attempts until one succeeds, fails for good, or the retries run out.
    fn attempts(&self, args: &SendArgs, ctx: &Context) -> Result<String> {
        let sender = self;
        let mut attempt = 0u32;
        loop {
            ctx.cancel.check()?;
            let outcome = sender.attempt(ctx);
            sender.end_attempt();
            match outcome {
                Ok(summary) => {
                    ctx.report.set("resumes", attempt);
                    ctx.report
                        .set("bytesSent", sender.sent_bytes.load(Ordering::Relaxed));
                    ctx.progress
                        .add_read(sender.read_bytes.load(Ordering::Relaxed));
                    return Ok(summary);
                }
                Err(e) => {
                    let c = classify(&e);
                    if c.kind != Kind::Internal && c.kind != Kind::Transient {
                        return Err(e);
                    }
                    attempt += 1;
                    ctx.report.set("resumes", attempt);
                    if attempt > args.retries {
                        return Err(fail(
                            Kind::Transient,
                            "NetworkError",
                            format!("giving up after {} attempts: {}", attempt, c.message),
                        ));
                    }
                    populator_core::log::warn(format!("connection to {} failed ({}); reconnecting and resuming (attempt {attempt} of {})", args.to, c.message, args.retries));
                    std::thread::sleep(Duration::from_secs_f64(args.retry_backoff.max(0.05)));
                }
            }
        }
    }
}

/// Every entry of the tree in path order (parents first), root included,
/// hard links pointing at the first path of their inode.
fn manifest(root: &Path, jobs: usize, ctx: &Context) -> Result<Vec<ManifestEntry>> {
    struct Collect<'a> {
        root: &'a Path,
        out: Mutex<Vec<Entry>>,
    }
    impl Collect<'_> {
        fn add(&self, rel: &Path) -> Result<()> {
            let e = Entry::read(self.root, rel).with_context(|| {
                format!("reading {}", crate::meta::join(self.root, rel).display())
            })?;
            self.out.lock().unwrap().push(e);
            Ok(())
        }
    }
    impl Visitor for Collect<'_> {
        fn dir(&self, rel: &Path) -> Result<()> {
            self.add(rel)
        }
        fn item(&self, rel: &Path, _: std::fs::FileType, _: &mut Vec<u8>) -> Result<()> {
            self.add(rel)
        }
    }
    let c = Collect {
        root,
        out: Mutex::new(Vec::new()),
    };
    walk(root, &[LOST_FOUND], jobs, &ctx.cancel, &c)?;
    let mut entries = c.out.into_inner().unwrap();
    entries.sort_by(|a, b| a.rel.cmp(&b.rel));
    let mut leaders: HashMap<(u64, u64), u64> = HashMap::new();
    Ok(entries
        .into_iter()
        .enumerate()
        .map(|(i, entry)| {
            let link_to = if entry.is_hardlinked() {
                let leader = *leaders.entry((entry.dev, entry.ino)).or_insert(i as u64);
                (leader != i as u64).then_some(leader)
            } else {
                None
            };
            ManifestEntry { entry, link_to }
        })
        .collect())
}

/// Names the transfer so the receiver resumes only the same one.
fn session_id(plan: &Plan) -> String {
    let mut all = Vec::new();
    match plan {
        Plan::Tree { entries, .. } => {
            for m in entries {
                all.extend_from_slice(&digest::entry_record(
                    &m.entry,
                    None,
                    TreeDigestOptions { owners: true },
                ));
                all.extend_from_slice(&m.link_to.unwrap_or(u64::MAX).to_le_bytes());
            }
        }
        Plan::Block { path, size, .. } => {
            all.extend_from_slice(path.as_os_str().as_encoded_bytes());
            all.extend_from_slice(&size.to_le_bytes());
        }
    }
    hex::encode(sha256(&all))
}

impl Sender {
    /// Shuts every socket of the attempt down.
    fn end_attempt(&self) {
        for s in self.sockets.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    fn total_bytes(&self) -> u64 {
        match &self.plan {
            Plan::Tree { entries, .. } => entries
                .iter()
                .filter(|m| m.link_to.is_none())
                .map(|m| m.entry.size)
                .sum(),
            Plan::Block { size, .. } => *size,
        }
    }

    /// Space the data takes on the source (sparse files count what they hold).
    fn allocated_bytes(&self) -> u64 {
        match &self.plan {
            Plan::Tree { entries, .. } => entries
                .iter()
                .filter(|m| m.link_to.is_none() && m.entry.kind == FileKind::File)
                .map(|m| m.entry.size.min(m.entry.allocated))
                .sum(),
            Plan::Block { size, .. } => *size,
        }
    }

    fn connect(&self) -> Result<Conn> {
        let addrs: Vec<_> = self
            .addr
            .to_socket_addrs()
            .map_err(|e| {
                fail(
                    Kind::Transient,
                    "NetworkError",
                    format!("resolving {}: {e}", self.addr),
                )
            })?
            .collect();
        let addr = addrs.first().ok_or_else(|| {
            fail(
                Kind::Usage,
                "InvalidConfiguration",
                format!("{} resolves to no address", self.addr),
            )
        })?;
        let tcp = TcpStream::connect_timeout(addr, Duration::from_secs(10)).map_err(|e| {
            fail(
                Kind::Transient,
                "NetworkError",
                format!("connecting to {}: {e}", self.addr),
            )
        })?;
        super::tune(&tcp);
        if let Ok(clone) = tcp.try_clone() {
            self.sockets.lock().unwrap().push(clone);
        }
        let mut conn =
            rustls::ClientConnection::new(self.config.clone(), self.server_name.clone())?;
        conn.set_buffer_limit(Some(super::SEND_BUFFER));
        let mut stream = rustls::StreamOwned::new(conn, super::Sock::new(tcp));
        // Finish the handshake now, so a refused certificate is told apart.
        while stream.conn.is_handshaking() {
            if let Err(e) = stream.conn.complete_io(&mut stream.sock) {
                if let Some(why) = is_trust_failure(&e) {
                    return Err(fail(
                        Kind::Auth,
                        "UntrustedServer",
                        format!("TLS with {} failed: {why}", self.addr),
                    ));
                }
                return Err(anyhow!(e).context(format!("TLS handshake with {}", self.addr)));
            }
        }
        Ok(stream)
    }

    fn hello(&self, conn: &mut Conn, role: &str, buf: &mut Vec<u8>) -> Result<serde_json::Value> {
        let (kind, size) = match &self.plan {
            Plan::Tree { .. } => ("tree", self.total_bytes()),
            Plan::Block { size, .. } => ("block", *size),
        };
        write_json(
            conn,
            Frame::Hello,
            &json!({
                "version": proto::VERSION,
                "token": self.token,
                "role": role,
                "kind": kind,
                "session": self.session,
                "size": size,
                "items": self.plan.items(),
                "allocated": self.allocated_bytes(),
            }),
        )?;
        expect_json(conn, buf, Frame::Welcome)
    }

    /// One attempt: control stream, manifest, data streams, digest.
    fn attempt(&self, ctx: &Context) -> Result<String> {
        let mut buf = Vec::new();
        let mut control = self.connect()?;
        let welcome = self.hello(&mut control, "control", &mut buf)?;
        if let Plan::Tree { entries, .. } = &self.plan {
            ctx.progress.set_stage("sending the manifest");
            let mut batch = Vec::with_capacity(1 << 20);
            for m in entries {
                encode_entry(&mut batch, m);
                if batch.len() > (1 << 20) {
                    write_frame(&mut control, Frame::Manifest, &[&batch])?;
                    batch.clear();
                }
            }
            write_frame(&mut control, Frame::Manifest, &[&batch])?;
            write_frame(&mut control, Frame::ManifestEnd, &[])?;
            control.flush()?;
        }
        let resume = expect_json(&mut control, &mut buf, Frame::Resume)?;
        let done = Bitset(hex::decode(resume["done"].as_str().unwrap_or("")).unwrap_or_default());
        let work: Vec<u64> = (0..self.plan.items())
            .filter(|&i| self.plan.is_work(i) && !done.get(i))
            .collect();
        let resumed = (0..self.plan.items())
            .filter(|&i| self.plan.is_work(i) && done.get(i))
            .count();
        if resumed > 0 {
            populator_core::log::info(format!(
                "the receiver already has {resumed} items; sending the other {}",
                work.len()
            ));
        }
        ctx.progress.restart();
        ctx.progress.set_stage("sending");
        for &i in (0..self.plan.items())
            .filter(|i| done.get(*i))
            .collect::<Vec<_>>()
            .iter()
        {
            ctx.progress.advance(self.item_bytes(i));
        }
        let next = AtomicUsize::new(0);
        let results: Vec<Result<()>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..self.streams.min(work.len().max(1)))
                .map(|_| {
                    s.spawn(|| {
                        let result = self.data_stream(&work, &next, ctx);
                        if result.is_err() {
                            // The other streams may be blocked: end them too.
                            self.end_attempt();
                        }
                        result
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a stream does not panic"))
                .collect()
        });
        for r in results {
            r?;
        }
        if let Plan::Block {
            path,
            size,
            is_file,
        } = &self.plan
        {
            let last = chunk_count(*size).saturating_sub(1);
            if *size > 0 {
                let src = File::open(path)?;
                let segments = if *is_file {
                    data_segments(&src, *size, 0)?
                } else {
                    vec![(0, *size)]
                };
                let mut data = Vec::new();
                self.send_chunk(&mut control, &src, *size, last, &segments, &mut data)?;
                ctx.progress.advance(chunk_len(*size, last));
            }
        }
        write_json(&mut control, Frame::Finish, &json!({}))?;
        ctx.progress.set_stage("verifying");
        let owners = welcome["owners"].as_bool().unwrap_or(false);
        let root = welcome["root"].as_bool().unwrap_or(false);
        let ours = self.digest(owners, root, ctx)?;
        let theirs = expect_json(&mut control, &mut buf, Frame::Digest)?;
        let theirs = theirs["digest"].as_str().unwrap_or("").to_string();
        let agree = theirs == ours;
        write_json(
            &mut control,
            Frame::Verdict,
            &json!({ "ok": agree, "digest": ours }),
        )?;
        let key = if matches!(self.plan, Plan::Tree { .. }) {
            "tree"
        } else {
            "device"
        };
        ctx.report.set_digests(&populator_core::digest::Digests(
            [(key.to_string(), ours.clone())].into_iter().collect(),
        ));
        if !agree {
            return Err(fail(
                Kind::Integrity,
                "VerificationFailed",
                format!("the receiver's digest {theirs} differs from the source's {ours}"),
            ));
        }
        // The receiver's last word: it flushed and cleaned up.
        let _ = expect_json(&mut control, &mut buf, Frame::Verdict);
        Ok(format!(
            "sent {} to {} over {} streams, {key} digest {ours} verified by the receiver",
            short_bytes(self.total_bytes()),
            self.addr,
            self.streams
        ))
    }

    fn item_bytes(&self, i: u64) -> u64 {
        match &self.plan {
            Plan::Tree { entries, .. } => {
                let m = &entries[i as usize];
                if m.entry.kind == FileKind::File && m.link_to.is_none() {
                    m.entry.size
                } else {
                    0
                }
            }
            Plan::Block { size, .. } => chunk_len(*size, i),
        }
    }

    fn data_stream(&self, work: &[u64], next: &AtomicUsize, ctx: &Context) -> Result<()> {
        let mut buf = Vec::new();
        let mut conn = self.connect()?;
        self.hello(&mut conn, "data", &mut buf)?;
        // Small files make small frames: gather them into large TLS records.
        let mut out = std::io::BufWriter::with_capacity(256 << 10, conn);
        let mut data = Vec::new();
        let block_src = match &self.plan {
            Plan::Block {
                path,
                size,
                is_file,
            } => {
                let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
                let segments = if *is_file {
                    data_segments(&f, *size, 0)?
                } else {
                    vec![(0, *size)]
                };
                Some((f, segments, *size))
            }
            Plan::Tree { .. } => None,
        };
        loop {
            ctx.cancel.check()?;
            let k = next.fetch_add(1, Ordering::Relaxed);
            let Some(&i) = work.get(k) else { break };
            match (&self.plan, &block_src) {
                (Plan::Block { .. }, Some((f, segments, size))) => {
                    self.send_chunk(&mut out, f, *size, i, segments, &mut data)?;
                    ctx.progress.advance(chunk_len(*size, i));
                }
                (Plan::Tree { root, entries }, _) => {
                    self.send_file(
                        &mut out,
                        root,
                        i,
                        &entries[i as usize].entry,
                        &mut data,
                        ctx,
                    )?;
                }
                _ => unreachable!(),
            }
        }
        write_frame(&mut out, Frame::StreamEnd, &[])?;
        let mut conn = out.into_inner().map_err(|e| e.into_error())?;
        conn.flush()?;
        expect_json(&mut conn, &mut buf, Frame::StreamOk)?;
        Ok(())
    }

    /// Sends one chunk of a block source: a Zero frame, or a Data frame.
    fn send_chunk(
        &self,
        conn: &mut impl Write,
        src: &File,
        size: u64,
        i: u64,
        segments: &[(u64, u64)],
        data: &mut Vec<u8>,
    ) -> Result<()> {
        let (start, len) = (i * CHUNK, chunk_len(size, i));
        let has_data = crate::block::read_chunk(src, size, i, segments, data)
            .with_context(|| format!("reading the source at offset {start}"))?;
        if !has_data {
            *self.hashes[i as usize].lock().unwrap() = Some(zero_hash(len));
            write_frame(conn, Frame::Zero, &[&pair(start, len)])?;
            return Ok(());
        }
        let hash = sha256(data);
        *self.hashes[i as usize].lock().unwrap() = Some(hash);
        self.send_data(conn, 0, start, data, hash)
    }

    fn send_data(
        &self,
        conn: &mut impl Write,
        item: u64,
        offset: u64,
        data: &[u8],
        hash: Hash,
    ) -> Result<()> {
        let compressed = if self.compress {
            zstd::bulk::compress(data, 1)
                .ok()
                .filter(|c| c.len() < data.len())
        } else {
            None
        };
        let payload = compressed.as_deref().unwrap_or(data);
        let header = DataHeader {
            item,
            offset,
            raw_len: data.len() as u32,
            compressed: compressed.is_some(),
            hash,
        }
        .encode();
        write_frame(conn, Frame::Data, &[&header, payload])?;
        self.sent_bytes
            .fetch_add(payload.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Sends one file's data chunks (holes and zero chunks are not sent),
    /// then FileDone; fails when the file changed meanwhile.
    fn send_file(
        &self,
        conn: &mut impl Write,
        root: &Path,
        i: u64,
        e: &Entry,
        data: &mut Vec<u8>,
        ctx: &Context,
    ) -> Result<()> {
        let path = root.join(&e.rel);
        let f = open_noatime(&path).with_context(|| format!("opening {}", path.display()))?;
        let changed = |f: &File| -> Result<()> {
            let m = f.metadata()?;
            if m.len() != e.size || (m.mtime(), m.mtime_nsec()) != e.mtime {
                return Err(fail(
                    Kind::Integrity,
                    "SourceChanged",
                    format!(
                        "{} changed during the copy: copy from a snapshot or a stopped workload",
                        path.display()
                    ),
                ));
            }
            Ok(())
        };
        changed(&f)?;
        let segments = data_segments(&f, e.size, e.allocated)?;
        let mut hashes = Vec::with_capacity(chunk_count(e.size) as usize);
        for c in 0..chunk_count(e.size) {
            let (start, len) = (c * CHUNK, chunk_len(e.size, c));
            let has_data = crate::block::read_chunk(&f, e.size, c, &segments, data)
                .with_context(|| format!("reading {}", path.display()))?;
            if has_data {
                let h = sha256(data);
                hashes.push(h);
                self.send_data(conn, i, start, data, h)?;
            } else {
                hashes.push(zero_hash(len));
            }
            ctx.progress.advance(len);
        }
        write_frame(conn, Frame::FileDone, &[&pair(i, e.size)])?;
        changed(&f)?;
        *self.hashes[i as usize].lock().unwrap() = Some(combine(&hashes));
        Ok(())
    }

    /// The digest of the source, as the receiver computes it of the target,
    /// from what was sent (items sent in an earlier attempt are read again).
    fn digest(&self, owners: bool, root_receiver: bool, ctx: &Context) -> Result<String> {
        match &self.plan {
            Plan::Block {
                path,
                size,
                is_file,
            } => {
                let src = File::open(path)?;
                let segments = if *is_file {
                    data_segments(&src, *size, 0)?
                } else {
                    vec![(0, *size)]
                };
                let mut data = Vec::new();
                let mut all = Vec::new();
                for i in 0..chunk_count(*size) {
                    let known = *self.hashes[i as usize].lock().unwrap();
                    let h = match known {
                        Some(h) => h,
                        None => {
                            ctx.cancel.check()?;
                            if crate::block::read_chunk(&src, *size, i, &segments, &mut data)? {
                                sha256(&data)
                            } else {
                                zero_hash(chunk_len(*size, i))
                            }
                        }
                    };
                    all.push(h);
                }
                Ok(hex::encode(combine(&all)))
            }
            Plan::Tree { root, entries } => {
                let options = TreeDigestOptions { owners };
                let mut collected = Vec::with_capacity(entries.len());
                let linked: std::collections::HashSet<u64> =
                    entries.iter().filter_map(|m| m.link_to).collect();
                for (i, m) in entries.iter().enumerate() {
                    let leader = m.link_to.unwrap_or(i as u64);
                    let content = if m.entry.kind == FileKind::File {
                        let known = *self.hashes[leader as usize].lock().unwrap();
                        Some(match known {
                            Some(h) => h,
                            None => {
                                let e = &entries[leader as usize].entry;
                                let f = open_noatime(&root.join(&e.rel))?;
                                let h = digest::content_digest(
                                    &f,
                                    e.size,
                                    e.allocated < e.size,
                                    2,
                                    &ctx.cancel,
                                )?;
                                *self.hashes[leader as usize].lock().unwrap() = Some(h);
                                h
                            }
                        })
                    } else {
                        None
                    };
                    let mut e = m.entry.clone();
                    if !(root_receiver || owners) {
                        e.mode &= 0o1777;
                        e.xattrs.retain(|(n, _)| !n.starts_with(b"trusted."));
                    }
                    let hardlinked = m.link_to.is_some() || linked.contains(&(i as u64));
                    collected.push(Collected {
                        record: digest::entry_record(&e, content.as_ref(), options),
                        rel: e.rel,
                        inode: hardlinked.then_some((0, leader)),
                    });
                }
                Ok(hex::encode(digest::aggregate(collected).digest))
            }
        }
    }
}
