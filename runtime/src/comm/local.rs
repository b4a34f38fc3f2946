//! In-process communicator: threads as ranks. Works for CPU tensors (the CI path) and for
//! several ranks sharing one GPU, which NCCL refuses. Data moves by `copy_` from the sender's
//! tensor into the receiver's; every collective is bracketed by two barriers. A rank that
//! drops its communicator (or panics) makes the others' collectives fail instead of hanging,
//! and every wait has a timeout.
use super::{check_gather_shapes, Communicator, P2p, Work};
use crate::error::{Result, RuntimeError};
use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tch::Tensor;

struct State {
    generation: u64,
    arrived: usize,
    gone: Option<usize>,
    /// (src, dst) -> tensors posted by src for dst, in order.
    mail: HashMap<(usize, usize), Vec<Tensor>>,
}

struct Shared {
    n: usize,
    state: Mutex<State>,
    cv: Condvar,
    timeout: Duration,
}

/// One rank of an in-process group.
pub struct LocalComm {
    rank: usize,
    shared: Arc<Shared>,
}

impl LocalComm {
    /// Makes a group of `n` ranks; hand one to each thread.
    pub fn group(n: usize) -> Vec<LocalComm> {
        Self::group_with_timeout(n, Duration::from_secs(600))
    }

    /// As [`LocalComm::group`], with a custom timeout for each wait.
    pub fn group_with_timeout(n: usize, timeout: Duration) -> Vec<LocalComm> {
        let shared = Arc::new(Shared {
            n,
            state: Mutex::new(State {
                generation: 0,
                arrived: 0,
                gone: None,
                mail: HashMap::new(),
            }),
            cv: Condvar::new(),
            timeout,
        });
        (0..n)
            .map(|rank| LocalComm {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait_all(&self, what: &str) -> Result<()> {
        let mut st = self.lock();
        if let Some(g) = st.gone {
            return Err(RuntimeError::PeerGone(format!(
                "rank {g} left before {what}"
            )));
        }
        let gen = st.generation;
        st.arrived += 1;
        if st.arrived == self.shared.n {
            st.arrived = 0;
            st.generation += 1;
            self.shared.cv.notify_all();
            return Ok(());
        }
        let deadline = Instant::now() + self.shared.timeout;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(RuntimeError::Timeout(
                    self.shared.timeout.as_secs(),
                    format!("rank {} waiting in {what}", self.rank),
                ));
            }
            let (g, _) = self
                .shared
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner());
            st = g;
            if st.generation != gen {
                return Ok(());
            }
            if let Some(g) = st.gone {
                return Err(RuntimeError::PeerGone(format!(
                    "rank {g} left during {what}"
                )));
            }
        }
    }

    fn post(&self, dst: usize, t: &Tensor) {
        self.lock()
            .mail
            .entry((self.rank, dst))
            .or_default()
            .push(t.shallow_clone());
    }

    fn take(&self, src: usize, what: &str) -> Result<Tensor> {
        let mut st = self.lock();
        let q = st.mail.get_mut(&(src, self.rank));
        match q {
            Some(v) if !v.is_empty() => Ok(v.remove(0)),
            _ => Err(RuntimeError::Comm(format!(
                "{what}: rank {} expected a message from rank {src} but none was sent",
                self.rank
            ))),
        }
    }

    fn check_peer(&self, peer: usize, what: &str) -> Result<()> {
        if peer >= self.shared.n {
            return Err(RuntimeError::Comm(format!(
                "{what}: peer {peer} outside group of {}",
                self.shared.n
            )));
        }
        Ok(())
    }
}

fn copy_into(dst: &Tensor, src: &Tensor, what: &str) -> Result<()> {
    if dst.numel() != src.numel() || dst.kind() != src.kind() {
        return Err(RuntimeError::Shape(format!(
            "{what}: receive buffer {:?} {:?} does not match the message {:?} {:?}",
            dst.size(),
            dst.kind(),
            src.size(),
            src.kind()
        )));
    }
    let mut d = dst.shallow_clone();
    let s = src.reshape(dst.size());
    d.f_copy_(&s)?;
    Ok(())
}

impl Communicator for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.shared.n
    }

    fn all_to_all(&self, send: &[Tensor], recv: &[Tensor]) -> Result<Work> {
        let n = self.shared.n;
        if send.len() != n || recv.len() != n {
            return Err(RuntimeError::Comm(format!(
                "all_to_all: {} send and {} receive buffers for a group of {n}",
                send.len(),
                recv.len()
            )));
        }
        for (dst, t) in send.iter().enumerate() {
            self.post(dst, t);
        }
        self.wait_all("all_to_all")?;
        let mut res = Ok(());
        for (src, r) in recv.iter().enumerate() {
            let m = self.take(src, "all_to_all")?;
            if res.is_ok() {
                res = copy_into(r, &m, "all_to_all");
            }
        }
        self.wait_all("all_to_all")?;
        res.map(|_| Work::done())
    }

    fn send_recv(&self, ops: &[P2p]) -> Result<Work> {
        for op in ops {
            if let P2p::Send { peer, tensor } = op {
                self.check_peer(*peer, "send_recv")?;
                self.post(*peer, tensor);
            }
        }
        self.wait_all("send_recv")?;
        let mut res = Ok(());
        for op in ops {
            if let P2p::Recv { peer, tensor } = op {
                self.check_peer(*peer, "send_recv")?;
                let m = self.take(*peer, "send_recv")?;
                if res.is_ok() {
                    res = copy_into(tensor, &m, "send_recv");
                }
            }
        }
        self.wait_all("send_recv")?;
        res.map(|_| Work::done())
    }

    fn all_gather(&self, send: &Tensor, recv: &Tensor) -> Result<()> {
        let n = self.shared.n;
        check_gather_shapes(send, recv, n, "all_gather")?;
        for dst in 0..n {
            self.post(dst, send);
        }
        self.wait_all("all_gather")?;
        let m = send.size()[0];
        let mut res = Ok(());
        for src in 0..n {
            let t = self.take(src, "all_gather")?;
            if res.is_ok() {
                res = copy_into(&recv.narrow(0, src as i64 * m, m), &t, "all_gather");
            }
        }
        self.wait_all("all_gather")?;
        res
    }

    fn reduce_scatter(&self, send: &Tensor, recv: &Tensor) -> Result<()> {
        let n = self.shared.n;
        check_gather_shapes(recv, send, n, "reduce_scatter")?;
        let m = recv.size()[0];
        for dst in 0..n {
            self.post(dst, &send.narrow(0, dst as i64 * m, m));
        }
        self.wait_all("reduce_scatter")?;
        let mut acc: Option<Tensor> = None;
        for src in 0..n {
            let t = self.take(src, "reduce_scatter")?;
            acc = Some(match acc {
                None => t.copy(),
                Some(a) => a + t,
            });
        }
        let res = match acc {
            Some(a) => copy_into(recv, &a, "reduce_scatter"),
            None => Ok(()),
        };
        self.wait_all("reduce_scatter")?;
        res
    }

    fn all_reduce(&self, t: &Tensor) -> Result<()> {
        let n = self.shared.n;
        for dst in 0..n {
            self.post(dst, t);
        }
        self.wait_all("all_reduce")?;
        let mut acc: Option<Tensor> = None;
        for src in 0..n {
            let m = self.take(src, "all_reduce")?;
            acc = Some(match acc {
                None => m.copy(),
                Some(a) => a + m,
            });
        }
        // Everyone must have read every input before anyone overwrites its own.
        self.wait_all("all_reduce")?;
        let res = match acc {
            Some(a) => copy_into(t, &a, "all_reduce"),
            None => Ok(()),
        };
        self.wait_all("all_reduce")?;
        res
    }

    fn barrier(&self) -> Result<()> {
        self.wait_all("barrier")
    }
}

impl Drop for LocalComm {
    fn drop(&mut self) {
        // Never panics: a poisoned lock is recovered.
        let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.gone.is_none() {
            st.gone = Some(self.rank);
        }
        self.shared.cv.notify_all();
    }
}

/// In-process communicators for every group of one kind of a layout, indexed by global rank
/// (entry i is rank i's communicator for its group).
pub fn local_groups(layout: &crate::plan::Layout, kind: crate::plan::GroupKind) -> Vec<LocalComm> {
    let mut slots: Vec<Option<LocalComm>> = (0..layout.world_size()).map(|_| None).collect();
    for g in layout.all_groups(kind) {
        for (member, comm) in g.iter().zip(LocalComm::group(g.len())) {
            slots[*member] = Some(comm);
        }
    }
    slots.into_iter().flatten().collect()
}
