//! In-process communicator: threads as ranks. Works for CPU tensors (the CI path) and for
//! several ranks sharing one GPU, which NCCL refuses. Data moves by `copy_` from the sender's
//! tensor into the receiver's; every collective is bracketed by two barriers. A rank that
//! fails ([`LocalComm::fail`]), drops its communicator or panics (its thread unwinds and
//! drops it) makes the others' pending and later collectives fail with
//! [`RuntimeError::PeerGone`] naming it; a wait whose peers do not all arrive fails with
//! [`RuntimeError::Timeout`] naming the missing ranks. Ranks are named by their label: the
//! global rank for [`local_groups`], the index in the group otherwise.
use super::{check_gather_shapes, default_comm_timeout, CommTimeout, Communicator, P2p, Work};
use crate::error::{Result, RuntimeError};
use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tch::Tensor;

struct State {
    generation: u64,
    arrived: usize,
    /// Which members arrived at the current wait.
    here: Vec<bool>,
    /// The first member that left: (index in the group, why, whether it failed rather than
    /// finished).
    gone: Option<(usize, String, bool)>,
    /// The first wait that timed out: its limit in seconds and what it says (every waiter
    /// reports it).
    timed_out: Option<(u64, String)>,
    /// (src, dst) -> tensors posted by src for dst, in order.
    mail: HashMap<(usize, usize), Vec<Tensor>>,
}

struct Shared {
    n: usize,
    /// How each member is named in errors.
    labels: Vec<usize>,
    state: Mutex<State>,
    cv: Condvar,
    timeout: Arc<CommTimeout>,
}

/// One rank of an in-process group.
pub struct LocalComm {
    rank: usize,
    shared: Arc<Shared>,
    /// Host seconds spent in this rank's collectives.
    busy_s: Mutex<f64>,
}

impl LocalComm {
    /// Makes a group of `n` ranks; hand one to each thread. Waits time out after
    /// [`super::DEFAULT_COMM_TIMEOUT_S`].
    pub fn group(n: usize) -> Vec<LocalComm> {
        Self::group_with_timeout(n, default_comm_timeout())
    }

    /// As [`LocalComm::group`], with a custom timeout for each wait.
    pub fn group_with_timeout(n: usize, timeout: Duration) -> Vec<LocalComm> {
        Self::group_named(&(0..n).collect::<Vec<_>>(), timeout)
    }

    /// A group whose member i is called rank `labels[i]` in errors (its global rank).
    pub fn group_named(labels: &[usize], timeout: Duration) -> Vec<LocalComm> {
        Self::group_shared(labels, CommTimeout::fixed(timeout))
    }

    /// As [`LocalComm::group_named`], with a run's shared (possibly adaptive) timeout.
    pub fn group_shared(labels: &[usize], timeout: Arc<CommTimeout>) -> Vec<LocalComm> {
        let n = labels.len();
        let shared = Arc::new(Shared {
            n,
            labels: labels.to_vec(),
            state: Mutex::new(State {
                generation: 0,
                arrived: 0,
                here: vec![false; n],
                gone: None,
                timed_out: None,
                mail: HashMap::new(),
            }),
            cv: Condvar::new(),
            timeout,
        });
        (0..n)
            .map(|rank| LocalComm {
                rank,
                shared: shared.clone(),
                busy_s: Mutex::new(0.0),
            })
            .collect()
    }

    /// This member's label (its global rank for [`local_groups`]).
    pub fn label(&self) -> usize {
        self.shared.labels[self.rank]
    }

    /// Marks this rank as failed: the peers' pending and later collectives fail with
    /// [`RuntimeError::PeerGone`] naming it and `why`.
    pub fn fail(&self, why: &str) {
        let mut st = self.lock();
        if st.gone.is_none() {
            st.gone = Some((self.rank, format!("failed: {why}"), true));
        }
        self.shared.cv.notify_all();
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn gone_error(&self, st: &State, when: &str) -> Option<RuntimeError> {
        st.gone.as_ref().map(|(g, why, _)| {
            RuntimeError::PeerGone(format!(
                "rank {} {why} ({when} on rank {})",
                self.shared.labels[*g],
                self.label()
            ))
        })
    }

    fn timeout_error(&self, st: &State) -> Option<RuntimeError> {
        st.timed_out
            .as_ref()
            .map(|(s, m)| RuntimeError::Timeout(*s, m.clone()))
    }

    fn wait_all(&self, what: &str) -> Result<()> {
        let mut st = self.lock();
        if let Some(e) = self.timeout_error(&st) {
            return Err(e);
        }
        if let Some(e) = self.gone_error(&st, &format!("before {what}")) {
            return Err(e);
        }
        let gen = st.generation;
        st.arrived += 1;
        st.here[self.rank] = true;
        if st.arrived == self.shared.n {
            st.arrived = 0;
            st.here.iter_mut().for_each(|h| *h = false);
            st.generation += 1;
            self.shared.cv.notify_all();
            return Ok(());
        }
        let limit = self.shared.timeout.get();
        let deadline = Instant::now() + limit;
        loop {
            let now = Instant::now();
            if now >= deadline {
                let missing: Vec<usize> = (0..self.shared.n)
                    .filter(|&i| !st.here[i])
                    .map(|i| self.shared.labels[i])
                    .collect();
                // Leave the wait, so that a late peer does not count this rank as present.
                st.here[self.rank] = false;
                st.arrived -= 1;
                let msg = format!(
                    "{what}: rank(s) {missing:?} never arrived (rank {} waited {:.1} s)",
                    self.label(),
                    limit.as_secs_f64()
                );
                // Every waiter of this group reports the same missing ranks.
                st.timed_out.get_or_insert((limit.as_secs(), msg));
                self.shared.cv.notify_all();
                return Err(self
                    .timeout_error(&st)
                    .unwrap_or_else(|| RuntimeError::Timeout(limit.as_secs(), what.to_string())));
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
            if let Some(e) = self.timeout_error(&st) {
                st.here[self.rank] = false;
                st.arrived -= 1;
                return Err(e);
            }
            if let Some(e) = self.gone_error(&st, &format!("during {what}")) {
                return Err(e);
            }
        }
    }

    /// Runs one collective, adding its host time to this rank's busy time.
    fn timed<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let t0 = Instant::now();
        let r = f();
        *self.busy_s.lock().unwrap_or_else(|e| e.into_inner()) += t0.elapsed().as_secs_f64();
        r
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
        self.timed(|| self.all_to_all_inner(send, recv))
    }

    fn send_recv(&self, ops: &[P2p]) -> Result<Work> {
        self.timed(|| self.send_recv_inner(ops))
    }

    fn all_gather(&self, send: &Tensor, recv: &Tensor) -> Result<()> {
        self.timed(|| self.all_gather_inner(send, recv))
    }

    fn reduce_scatter(&self, send: &Tensor, recv: &Tensor) -> Result<()> {
        self.timed(|| self.reduce_scatter_inner(send, recv))
    }

    fn all_reduce(&self, t: &Tensor) -> Result<()> {
        self.timed(|| self.all_reduce_inner(t))
    }

    fn barrier(&self) -> Result<()> {
        self.timed(|| self.wait_all("barrier"))
    }

    fn comm_time_s(&self) -> f64 {
        *self.busy_s.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn peer_failure(&self) -> Option<RuntimeError> {
        let st = self.lock();
        if let Some(e) = self.timeout_error(&st) {
            return Some(e);
        }
        // A peer that finished normally is not a failure (it may simply be done first).
        match &st.gone {
            Some((g, _, true)) if *g != self.rank => {
                self.gone_error(&st, "noticed between collectives")
            }
            _ => None,
        }
    }
}

impl LocalComm {
    fn all_to_all_inner(&self, send: &[Tensor], recv: &[Tensor]) -> Result<Work> {
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

    fn send_recv_inner(&self, ops: &[P2p]) -> Result<Work> {
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

    fn all_gather_inner(&self, send: &Tensor, recv: &Tensor) -> Result<()> {
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

    fn reduce_scatter_inner(&self, send: &Tensor, recv: &Tensor) -> Result<()> {
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

    fn all_reduce_inner(&self, t: &Tensor) -> Result<()> {
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
}

impl Drop for LocalComm {
    fn drop(&mut self) {
        // Never panics: a poisoned lock is recovered.
        let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.gone.is_none() {
            let panicking = std::thread::panicking();
            let why = if panicking {
                "panicked"
            } else {
                "left the group"
            };
            st.gone = Some((self.rank, why.to_string(), panicking));
        }
        self.shared.cv.notify_all();
    }
}

/// In-process communicators for every group of one kind of a layout, indexed by global rank
/// (entry i is rank i's communicator for its group); errors name global ranks.
pub fn local_groups(layout: &crate::plan::Layout, kind: crate::plan::GroupKind) -> Vec<LocalComm> {
    local_groups_with_timeout(layout, kind, default_comm_timeout())
}

/// [`local_groups`] whose collectives wait `timeout` for their peers.
pub fn local_groups_with_timeout(
    layout: &crate::plan::Layout,
    kind: crate::plan::GroupKind,
    timeout: std::time::Duration,
) -> Vec<LocalComm> {
    local_groups_shared(layout, kind, &CommTimeout::fixed(timeout))
}

/// [`local_groups`] whose collectives follow a run's shared timeout.
pub fn local_groups_shared(
    layout: &crate::plan::Layout,
    kind: crate::plan::GroupKind,
    timeout: &Arc<CommTimeout>,
) -> Vec<LocalComm> {
    let mut slots: Vec<Option<LocalComm>> = (0..layout.world_size()).map(|_| None).collect();
    for g in layout.all_groups(kind) {
        for (member, comm) in g.iter().zip(LocalComm::group_shared(&g, timeout.clone())) {
            slots[*member] = Some(comm);
        }
    }
    slots.into_iter().flatten().collect()
}
