//! A fault-injecting HTTP proxy in front of nginx: per connection it passes
//! through, drops the connection after N body bytes, stalls, answers 503,
//! throttles, or hides the Content-Length. Each connection takes the next
//! fault from a plan; when the plan is empty, connections pass through.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub enum Fault {
    Pass,
    /// Close the connection after this many body bytes.
    DropAfter(u64),
    /// Stop sending after this many body bytes and hold the connection (up to 60 s).
    StallAfter(u64),
    /// Answer 503 without asking the upstream.
    Status503,
    /// Send the body at about this many bytes per second.
    Throttle(u64),
    /// Remove Content-Length: the body ends when the connection closes.
    HideLength,
}

type Hook = Arc<dyn Fn(usize) + Send + Sync>;

pub struct FaultProxy {
    pub port: u16,
    upstream: u16,
    plan: Arc<Mutex<VecDeque<Fault>>>,
    default: Arc<Mutex<Fault>>,
    /// Request heads seen, in order.
    pub requests: Arc<Mutex<Vec<String>>>,
    on_drop: Arc<Mutex<Option<Hook>>>,
    /// Upstream answers whose head has arrived (the upstream has opened
    /// what it serves).
    answered: Arc<std::sync::atomic::AtomicUsize>,
}

impl FaultProxy {
    pub fn start(upstream: u16) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let proxy = FaultProxy {
            port: listener.local_addr().unwrap().port(),
            upstream,
            plan: Default::default(),
            default: Arc::new(Mutex::new(Fault::Pass)),
            requests: Default::default(),
            on_drop: Default::default(),
            answered: Default::default(),
        };
        let answered = proxy.answered.clone();
        let (plan, default, requests, on_drop) = (
            proxy.plan.clone(),
            proxy.default.clone(),
            proxy.requests.clone(),
            proxy.on_drop.clone(),
        );
        let upstream = proxy.upstream;
        std::thread::spawn(move || {
            for (index, client) in listener.incoming().enumerate() {
                let Ok(client) = client else { continue };
                let fault = plan
                    .lock()
                    .unwrap()
                    .pop_front()
                    .unwrap_or_else(|| default.lock().unwrap().clone());
                let (requests, on_drop) = (requests.clone(), on_drop.lock().unwrap().clone());
                let answered = answered.clone();
                std::thread::spawn(move || {
                    let _ = handle(
                        client, upstream, fault, index, &requests, on_drop, &answered,
                    );
                });
            }
        });
        proxy
    }

    /// Faults for the next connections, in order.
    pub fn plan(&self, faults: impl IntoIterator<Item = Fault>) -> &Self {
        self.plan.lock().unwrap().extend(faults);
        self
    }

    /// The fault for connections once the plan is used up.
    pub fn default_fault(&self, fault: Fault) -> &Self {
        *self.default.lock().unwrap() = fault;
        self
    }

    /// Runs `hook(connection index)` just before a DropAfter connection is cut.
    pub fn on_drop(&self, hook: impl Fn(usize) + Send + Sync + 'static) -> &Self {
        *self.on_drop.lock().unwrap() = Some(Arc::new(hook));
        self
    }

    pub fn url(&self, path: &str) -> String {
        format!(
            "http://127.0.0.1:{}/{}",
            self.port,
            path.trim_start_matches('/')
        )
    }

    /// How many upstream answers have started (their heads arrived).
    pub fn answered_count(&self) -> usize {
        self.answered.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn request_count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }
}

fn read_head(stream: &mut TcpStream) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(pos + 4);
            return Ok((buf, rest));
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Replaces (or removes, with `value` None) a header in an HTTP head.
fn set_header(head: &[u8], name: &str, value: Option<&str>) -> Vec<u8> {
    let text = String::from_utf8_lossy(head);
    let mut lines: Vec<String> = text
        .trim_end_matches("\r\n")
        .split("\r\n")
        .filter(|l| {
            !l.to_ascii_lowercase()
                .starts_with(&format!("{}:", name.to_ascii_lowercase()))
        })
        .map(str::to_string)
        .collect();
    if let Some(v) = value {
        lines.push(format!("{name}: {v}"));
    }
    format!("{}\r\n\r\n", lines.join("\r\n")).into_bytes()
}

fn handle(
    mut client: TcpStream,
    upstream: u16,
    fault: Fault,
    index: usize,
    requests: &Mutex<Vec<String>>,
    on_drop: Option<Hook>,
    answered: &std::sync::atomic::AtomicUsize,
) -> std::io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(30)))?;
    let (head, _) = read_head(&mut client)?;
    requests
        .lock()
        .unwrap()
        .push(String::from_utf8_lossy(&head).into_owned());
    if let Fault::Status503 = fault {
        client.write_all(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )?;
        return Ok(());
    }
    // One request per connection keeps the fault bookkeeping simple.
    let mut up = TcpStream::connect(("127.0.0.1", upstream))?;
    up.write_all(&set_header(&head, "Connection", Some("close")))?;
    let (resp_head, first_body) = read_head(&mut up)?;
    answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let resp_head = match fault {
        Fault::HideLength => set_header(&resp_head, "Content-Length", None),
        _ => resp_head,
    };
    client.write_all(&resp_head)?;
    let mut sent = 0u64;
    let started = Instant::now();
    let mut pending = first_body;
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        if pending.is_empty() {
            let n = up.read(&mut chunk)?;
            if n == 0 {
                break;
            }
            pending.extend_from_slice(&chunk[..n]);
        }
        let mut take = pending.len();
        match fault {
            Fault::DropAfter(limit) | Fault::StallAfter(limit) if sent + take as u64 >= limit => {
                take = (limit - sent) as usize;
                client.write_all(&pending[..take])?;
                client.flush()?;
                if let Fault::StallAfter(_) = fault {
                    let deadline = Instant::now() + Duration::from_secs(60);
                    let mut probe = [0u8; 1];
                    client.set_read_timeout(Some(Duration::from_millis(200)))?;
                    while Instant::now() < deadline {
                        if let Ok(0) = client.read(&mut probe) {
                            break;
                        }
                    }
                } else if let Some(hook) = &on_drop {
                    hook(index);
                }
                let _ = client.shutdown(Shutdown::Both);
                return Ok(());
            }
            Fault::Throttle(bps) => {
                take = take.min(16 * 1024);
                let due = Duration::from_secs_f64((sent + take as u64) as f64 / bps as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
            _ => {}
        }
        client.write_all(&pending[..take])?;
        pending.drain(..take);
        sent += take as u64;
    }
    let _ = client.shutdown(Shutdown::Both);
    Ok(())
}
