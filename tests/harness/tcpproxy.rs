//! A TCP fault proxy for protocols the HTTP proxy does not speak (TLS
//! streams of pvc-copy): forwards connections, optionally cuts every open
//! connection once after N bytes from the clients, and optionally throttles.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct State {
    /// Cut every open connection once this many client bytes went through.
    cut_after: Mutex<Option<u64>>,
    /// Client bytes per second, all connections together (0: unlimited).
    rate: AtomicU64,
    forwarded: AtomicU64,
    cuts: AtomicU64,
    /// Clones of the open sockets, by connection, for cutting them.
    open: Mutex<Vec<(usize, TcpStream)>>,
    stop: AtomicBool,
}

pub struct TcpProxy {
    pub addr: SocketAddr,
    state: Arc<State>,
}

impl TcpProxy {
    /// Listens on `listen` (inside network namespace `netns` when given) and
    /// forwards to `upstream`.
    pub fn start(netns: Option<&str>, listen: SocketAddr, upstream: SocketAddr) -> TcpProxy {
        let state = Arc::new(State::default());
        let (tx, rx) = std::sync::mpsc::channel();
        let netns = netns.map(str::to_string);
        let st = state.clone();
        std::thread::spawn(move || {
            if let Some(ns) = &netns {
                crate::netns::enter(ns);
            }
            let listener = TcpListener::bind(listen).expect("binding the proxy");
            listener.set_nonblocking(true).unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            let started = Instant::now();
            let mut next_id = 0;
            while !st.stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).unwrap();
                        // This thread is in the namespace: so is the upstream socket.
                        let Ok(server) = TcpStream::connect(upstream) else {
                            continue;
                        };
                        let id = next_id;
                        next_id += 1;
                        for s in [&client, &server] {
                            st.open.lock().unwrap().push((id, s.try_clone().unwrap()));
                        }
                        let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                        let st1 = st.clone();
                        std::thread::spawn(move || pump(id, client, server, &st1, true, started));
                        let st2 = st.clone();
                        std::thread::spawn(move || pump(id, s2, c2, &st2, false, started));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        let addr = rx.recv().unwrap();
        TcpProxy { addr, state }
    }

    pub fn cut_after(&self, bytes: u64) -> &Self {
        *self.state.cut_after.lock().unwrap() = Some(bytes);
        self
    }

    pub fn throttle(&self, bytes_per_second: u64) -> &Self {
        self.state.rate.store(bytes_per_second, Ordering::SeqCst);
        self
    }

    pub fn cuts(&self) -> u64 {
        self.state.cuts.load(Ordering::SeqCst)
    }

    pub fn forwarded(&self) -> u64 {
        self.state.forwarded.load(Ordering::SeqCst)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        for (_, s) in self.state.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

fn pump(
    id: usize,
    mut from: TcpStream,
    mut to: TcpStream,
    st: &State,
    upstream: bool,
    started: Instant,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if upstream {
            let total = st.forwarded.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
            let rate = st.rate.load(Ordering::SeqCst);
            if rate > 0 {
                let due = Duration::from_secs_f64(total as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait.min(Duration::from_secs(5)));
                }
            }
            let cut = {
                let mut c = st.cut_after.lock().unwrap();
                match *c {
                    Some(limit) if total >= limit => c.take().is_some(),
                    _ => false,
                }
            };
            if cut {
                st.cuts.fetch_add(1, Ordering::SeqCst);
                for (_, s) in st.open.lock().unwrap().drain(..) {
                    let _ = s.shutdown(Shutdown::Both);
                }
                break;
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    // One side ended: end both and close every descriptor of the
    // connection, so the other peer gets a reset, as from a dead process.
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
    st.open.lock().unwrap().retain(|(i, _)| *i != id);
}
