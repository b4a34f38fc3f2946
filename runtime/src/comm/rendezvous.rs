//! A minimal TCP key-value store for exchanging NCCL unique ids, as torchrun's c10d store
//! does: rank 0 serves on MASTER_ADDR:MASTER_PORT, every rank (0 too) connects as a client.
//! `get` blocks until the key is set, the timeout passes, or a rank is gone.
//!
//! The connection is also the liveness channel: a client says which rank it is on connecting
//! and stays connected for the whole run. If its connection closes without a goodbye (the
//! process died, or exited on an error), the server marks that rank gone and tells every
//! other client ([`Rendezvous::watch`]); if the server's process (rank 0) dies, every client
//! sees its connection close. Either way each survivor learns which rank is gone within a
//! TCP round trip, not after a collective timeout. (A host that vanishes without closing its
//! sockets is caught by the collective timeout instead.)
use crate::error::{Result, RuntimeError};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

const OP_SET: u8 = 1;
const OP_GET: u8 = 2;
/// Client -> server: "I am rank r" (sent on connecting).
const OP_HELLO: u8 = 3;
/// Client -> server: a clean end; closing after it is not a failure.
const OP_BYE: u8 = 4;
/// Client -> server: switch this connection to watching; server -> client: a fault notice.
const OP_WATCH: u8 = 5;

/// The server's state: the table, and the first rank that went away.
struct Server {
    table: Mutex<HashMap<String, Vec<u8>>>,
    cv: Condvar,
    fault: Mutex<Option<String>>,
    /// Write halves of the watching connections.
    watchers: Mutex<Vec<TcpStream>>,
}

type Table = Arc<Server>;

impl Server {
    fn fault(&self) -> Option<String> {
        self.fault.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Records the first fault and tells every watcher.
    fn set_fault(&self, msg: String) {
        {
            let mut f = self.fault.lock().unwrap_or_else(|e| e.into_inner());
            if f.is_some() {
                return;
            }
            *f = Some(msg.clone());
        }
        self.cv.notify_all();
        let mut ws = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        for w in ws.iter_mut() {
            let _ = w
                .write_all(&[OP_WATCH])
                .and_then(|_| write_frame(w, msg.as_bytes()));
        }
    }
}

fn write_frame(s: &mut TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    s.write_all(&(bytes.len() as u32).to_le_bytes())?;
    s.write_all(bytes)
}

fn read_frame(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let n = u32::from_le_bytes(len) as usize;
    if n > (1 << 20) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "rendezvous frame too large",
        ));
    }
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf)?;
    Ok(buf)
}

/// Serves one client until it says goodbye or its connection closes; a close without a
/// goodbye from a client that said which rank it is marks that rank gone.
fn serve_client(s: TcpStream, table: Table, timeout: Duration) {
    let mut rank: Option<usize> = None;
    let clean = serve_ops(s, &table, timeout, &mut rank).unwrap_or(false);
    if let (false, Some(r)) = (clean, rank) {
        table.set_fault(format!(
            "rank {r} is gone: its connection to the rendezvous on rank 0 closed without a \
             clean end (the process died or exited on an error)"
        ));
    }
}

/// Returns Ok(true) after a goodbye, Ok(false) when the connection closed without one.
fn serve_ops(
    mut s: TcpStream,
    table: &Table,
    timeout: Duration,
    rank: &mut Option<usize>,
) -> std::io::Result<bool> {
    loop {
        let mut op = [0u8; 1];
        if s.read_exact(&mut op).is_err() {
            return Ok(false); // client closed
        }
        match op[0] {
            OP_BYE => return Ok(true),
            OP_WATCH => {
                let w = s.try_clone()?;
                let early = table.fault();
                table
                    .watchers
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(w);
                if let Some(msg) = early {
                    s.write_all(&[OP_WATCH])?;
                    write_frame(&mut s, msg.as_bytes())?;
                }
                s.set_read_timeout(None)?;
                continue;
            }
            _ => {}
        }
        let key = String::from_utf8_lossy(&read_frame(&mut s)?).into_owned();
        match op[0] {
            OP_HELLO => *rank = key.parse().ok(),
            OP_SET => {
                let val = read_frame(&mut s)?;
                table
                    .table
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(key, val);
                table.cv.notify_all();
                s.write_all(&[1])?;
            }
            OP_GET => {
                let deadline = Instant::now() + timeout;
                let mut g = table.table.lock().unwrap_or_else(|e| e.into_inner());
                let val = loop {
                    if let Some(v) = g.get(&key) {
                        break Ok(v.clone());
                    }
                    if let Some(f) = table.fault() {
                        break Err(f);
                    }
                    let now = Instant::now();
                    if now >= deadline {
                        break Err(String::new());
                    }
                    g = table
                        .cv
                        .wait_timeout(g, (deadline - now).min(Duration::from_millis(200)))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                };
                drop(g);
                match val {
                    Ok(v) => {
                        s.write_all(&[1])?;
                        write_frame(&mut s, &v)?;
                    }
                    Err(f) if f.is_empty() => s.write_all(&[0])?,
                    Err(f) => {
                        s.write_all(&[2])?;
                        write_frame(&mut s, f.as_bytes())?;
                    }
                }
            }
            _ => return Ok(false),
        }
    }
}

/// Client of the store (rank 0 also runs the server).
pub struct Rendezvous {
    stream: TcpStream,
    timeout: Duration,
    rank: usize,
}

impl Rendezvous {
    /// Rank 0 binds `port` and serves in background threads; every rank then connects,
    /// retrying until `timeout`.
    pub fn connect(addr: &str, port: u16, rank: usize, timeout: Duration) -> Result<Rendezvous> {
        if rank == 0 {
            let listener = TcpListener::bind(("0.0.0.0", port)).map_err(|e| {
                RuntimeError::Rendezvous(format!("rank 0 cannot listen on port {port}: {e}"))
            })?;
            let table: Table = Arc::new(Server {
                table: Mutex::new(HashMap::new()),
                cv: Condvar::new(),
                fault: Mutex::new(None),
                watchers: Mutex::new(Vec::new()),
            });
            std::thread::spawn(move || {
                for conn in listener.incoming().flatten() {
                    let t = table.clone();
                    std::thread::spawn(move || serve_client(conn, t, timeout));
                }
            });
        }
        Self::connect_client(addr, port, rank, timeout)
    }

    /// Another connection to the store (rank 0 included), without serving.
    pub fn connect_client(
        addr: &str,
        port: u16,
        rank: usize,
        timeout: Duration,
    ) -> Result<Rendezvous> {
        let deadline = Instant::now() + timeout;
        let target = (addr, port)
            .to_socket_addrs()
            .map_err(|e| RuntimeError::Rendezvous(format!("cannot resolve {addr}:{port}: {e}")))?
            .next()
            .ok_or_else(|| {
                RuntimeError::Rendezvous(format!("{addr}:{port} resolves to nothing"))
            })?;
        loop {
            match TcpStream::connect_timeout(&target, Duration::from_secs(5)) {
                Ok(mut stream) => {
                    stream.set_read_timeout(Some(timeout + Duration::from_secs(5)))?;
                    stream.set_nodelay(true)?;
                    stream.write_all(&[OP_HELLO])?;
                    write_frame(&mut stream, rank.to_string().as_bytes())?;
                    return Ok(Rendezvous {
                        stream,
                        timeout,
                        rank,
                    });
                }
                Err(e) if Instant::now() >= deadline => {
                    return Err(RuntimeError::Rendezvous(format!(
                        "rank {rank} could not reach {addr}:{port} within {} s: {e}",
                        timeout.as_secs()
                    )))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Stores `value` under `key`.
    pub fn set(&mut self, key: &str, value: &[u8]) -> Result<()> {
        self.stream.write_all(&[OP_SET])?;
        write_frame(&mut self.stream, key.as_bytes())?;
        write_frame(&mut self.stream, value)?;
        let mut ack = [0u8; 1];
        self.stream.read_exact(&mut ack).map_err(|e| self.lost(e))?;
        Ok(())
    }

    /// Waits for `key` and returns its value.
    pub fn get(&mut self, key: &str) -> Result<Vec<u8>> {
        self.stream.write_all(&[OP_GET])?;
        write_frame(&mut self.stream, key.as_bytes())?;
        let mut ok = [0u8; 1];
        self.stream.read_exact(&mut ok).map_err(|e| self.lost(e))?;
        match ok[0] {
            1 => Ok(read_frame(&mut self.stream)?),
            2 => {
                let msg = read_frame(&mut self.stream)?;
                Err(RuntimeError::PeerGone(format!(
                    "{} (rank {} waiting for {key:?} at the rendezvous)",
                    String::from_utf8_lossy(&msg),
                    self.rank
                )))
            }
            _ => Err(RuntimeError::Rendezvous(format!(
                "key {key:?} was not set within {} s",
                self.timeout.as_secs()
            ))),
        }
    }

    /// Ends this connection cleanly (closing it is then not a fault).
    pub fn close(mut self) {
        let _ = self.stream.write_all(&[OP_BYE]);
        let _ = self.stream.flush();
    }

    fn lost(&self, e: std::io::Error) -> RuntimeError {
        RuntimeError::PeerGone(format!(
            "rank 0 is gone: the rendezvous connection of rank {} failed ({e})",
            self.rank
        ))
    }

    /// Turns the connection into the liveness channel: `on_fault` is called once, from a
    /// background thread, with a message naming the rank that is gone, unless
    /// [`Liveness::finish`] was called first.
    pub fn watch(mut self, on_fault: impl FnOnce(String) + Send + 'static) -> Result<Liveness> {
        self.stream.write_all(&[OP_WATCH])?;
        self.stream.set_read_timeout(None)?;
        let mut reader = self.stream.try_clone()?;
        // Whatever way this process exits, the others hear of it at once.
        crate::ffi::shutdown_on_exit(self.stream.as_raw_fd())?;
        let closing = Arc::new(AtomicBool::new(false));
        let c = closing.clone();
        let me = self.rank;
        std::thread::spawn(move || {
            let mut op = [0u8; 1];
            let msg = match reader.read_exact(&mut op) {
                Ok(()) if op[0] == OP_WATCH => read_frame(&mut reader)
                    .map(|m| String::from_utf8_lossy(&m).into_owned())
                    .unwrap_or_else(|e| format!("rank 0 is gone: reading its notice failed ({e})")),
                Ok(()) => format!("rank 0 sent an unknown liveness message {}", op[0]),
                Err(e) => {
                    format!("rank 0 is gone: the rendezvous connection of rank {me} closed ({e})")
                }
            };
            if !c.load(Ordering::Acquire) {
                on_fault(msg);
            }
        });
        Ok(Liveness {
            stream: Mutex::new(self.stream),
            closing,
        })
    }
}

/// The liveness channel of one rank. Dropping it without [`Liveness::finish`] closes the
/// connection without a goodbye: the other ranks are told this rank is gone (right for a
/// rank that ends on an error).
pub struct Liveness {
    stream: Mutex<TcpStream>,
    closing: Arc<AtomicBool>,
}

impl Liveness {
    /// A clean end: call after the last collective (after a barrier, so that no rank is still
    /// waiting on this one). Later faults, including rank 0's exit, are ignored.
    pub fn finish(&self) {
        self.closing.store(true, Ordering::Release);
        let mut s = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        let _ = s.write_all(&[OP_BYE]);
        let _ = s.flush();
    }

    /// Whether [`Liveness::finish`] was called.
    pub fn finished(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }
}

impl Drop for Liveness {
    fn drop(&mut self) {
        // This rank is leaving: its own watcher stays silent; the others are told.
        self.closing.store(true, Ordering::Release);
        let s = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        let _ = s.shutdown(Shutdown::Both);
        crate::ffi::forget_exit_socket(s.as_raw_fd());
    }
}
