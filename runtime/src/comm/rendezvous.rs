//! A minimal TCP key-value store for exchanging NCCL unique ids, as torchrun's c10d store
//! does: rank 0 serves on MASTER_ADDR:MASTER_PORT, every rank (0 too) connects as a client.
//! `get` blocks until the key is set or the timeout passes.
use crate::error::{Result, RuntimeError};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

const OP_SET: u8 = 1;
const OP_GET: u8 = 2;

type Table = Arc<(Mutex<HashMap<String, Vec<u8>>>, Condvar)>;

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

fn serve_client(mut s: TcpStream, table: Table, timeout: Duration) -> std::io::Result<()> {
    loop {
        let mut op = [0u8; 1];
        if s.read_exact(&mut op).is_err() {
            return Ok(()); // client closed
        }
        let key = String::from_utf8_lossy(&read_frame(&mut s)?).into_owned();
        match op[0] {
            OP_SET => {
                let val = read_frame(&mut s)?;
                let (m, cv) = &*table;
                m.lock().unwrap_or_else(|e| e.into_inner()).insert(key, val);
                cv.notify_all();
                s.write_all(&[1])?;
            }
            OP_GET => {
                let (m, cv) = &*table;
                let deadline = Instant::now() + timeout;
                let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
                let val = loop {
                    if let Some(v) = g.get(&key) {
                        break Some(v.clone());
                    }
                    let now = Instant::now();
                    if now >= deadline {
                        break None;
                    }
                    g = cv
                        .wait_timeout(g, deadline - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                };
                drop(g);
                match val {
                    Some(v) => {
                        s.write_all(&[1])?;
                        write_frame(&mut s, &v)?;
                    }
                    None => s.write_all(&[0])?,
                }
            }
            _ => return Ok(()),
        }
    }
}

/// Client of the store (rank 0 also runs the server).
pub struct Rendezvous {
    stream: TcpStream,
    timeout: Duration,
}

impl Rendezvous {
    /// Rank 0 binds `port` and serves in background threads; every rank then connects,
    /// retrying until `timeout`.
    pub fn connect(addr: &str, port: u16, rank: usize, timeout: Duration) -> Result<Rendezvous> {
        if rank == 0 {
            let listener = TcpListener::bind(("0.0.0.0", port)).map_err(|e| {
                RuntimeError::Rendezvous(format!("rank 0 cannot listen on port {port}: {e}"))
            })?;
            let table: Table = Arc::new((Mutex::new(HashMap::new()), Condvar::new()));
            std::thread::spawn(move || {
                for conn in listener.incoming().flatten() {
                    let t = table.clone();
                    std::thread::spawn(move || {
                        let _ = serve_client(conn, t, timeout);
                    });
                }
            });
        }
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
                Ok(stream) => {
                    stream.set_read_timeout(Some(timeout + Duration::from_secs(5)))?;
                    stream.set_nodelay(true)?;
                    return Ok(Rendezvous { stream, timeout });
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
        self.stream.read_exact(&mut ack)?;
        Ok(())
    }

    /// Waits for `key` and returns its value.
    pub fn get(&mut self, key: &str) -> Result<Vec<u8>> {
        self.stream.write_all(&[OP_GET])?;
        write_frame(&mut self.stream, key.as_bytes())?;
        let mut ok = [0u8; 1];
        self.stream.read_exact(&mut ok)?;
        if ok[0] != 1 {
            return Err(RuntimeError::Rendezvous(format!(
                "key {key:?} was not set within {} s",
                self.timeout.as_secs()
            )));
        }
        Ok(read_frame(&mut self.stream)?)
    }
}
