//! Greedy generation on one rank through the CUDA-graph step, pipelined: each step is fed
//! its token on the device (the argmax of the step before, [`TokenIn::Device`]), so the host
//! queues step k+1 before it reads the token step k chose, and between tokens the device
//! does not wait for the host (its reading, its checks, its next launch). The host reads each
//! token from pinned memory once the step that chose it has run (an event), one step behind
//! the device. A step queued past an end-of-sequence token is undone: the caches and the
//! sequence move back by one, and the slot it wrote is written again by what comes next.
//!
//! It starts once the graph is captured (the first decode step, run step by step, captures
//! it, or falls back to eager launches and never comes here).
use super::graph::TokenIn;
use super::{Generation, RankInference};
use crate::error::{Result, RuntimeError};
use crate::ffi::TimingEvent;
use std::collections::VecDeque;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Steps queued at most: the one whose token the host reads next and one behind it.
const IN_FLIGHT: usize = 2;

/// A chosen token on its way to the host: queued into pinned memory, readable once `done`
/// has passed.
struct Pending {
    host: Tensor,
    done: TimingEvent,
}

impl Pending {
    /// Queues the copy of `next` (int64 (1,), on `cuda:device`) to the host.
    fn queue(next: &Tensor, device: usize) -> Result<Pending> {
        // Non-blocking to the CPU: ATen allocates the destination in pinned memory.
        let host = next.f_to_device_(Device::Cpu, Kind::Int64, true, true)?;
        let done = TimingEvent::new()?;
        done.record(device)?;
        Ok(Pending { host, done })
    }

    /// Waits for the copy, then reads the token.
    fn read(self) -> Result<i64> {
        self.done.synchronize()?;
        Ok(self.host.f_int64_value(&[0])?)
    }
}

impl RankInference<'_> {
    /// Whether a greedy generation can go on pipelined: one rank, CUDA graphs allowed and
    /// the step already captured.
    pub(super) fn can_pipeline(&self) -> bool {
        self.cuda_graph
            && self.world.size() == 1
            && self.graph.as_ref().is_some_and(|g| g.is_captured())
    }

    /// Queues one replay of the step fed `token`, and the copy of its choice to the host.
    /// Returns that choice on the device (the graph's buffer) and its copy on the way.
    fn queue_step(&mut self, token: TokenIn<'_>, device: usize) -> Result<(Tensor, Pending)> {
        let (scale, pos) = (self.scale(), self.seq_len);
        let g = self
            .graph
            .as_mut()
            .ok_or_else(|| RuntimeError::Cuda("pipelined decode without a graph".into()))?;
        let step = g.step(self.model, &self.caches, (token, pos), scale, false)?;
        for c in &mut self.caches {
            c.advance(1)?;
        }
        self.seq_len += 1;
        let pending = Pending::queue(&step.next, device)?;
        Ok((step.next, pending))
    }

    /// Undoes the last `n` steps (queued past the end of the sequence).
    fn undo(&mut self, n: usize) -> Result<()> {
        for c in &mut self.caches {
            c.retreat(n)?;
        }
        self.seq_len -= n;
        Ok(())
    }

    /// Goes on with a greedy generation whose last token, `token`, the host chose at `since`
    /// (its step's time starts there), up to `max_new` tokens in `g`, stopping at `eos` or
    /// when the context or the cache is full. Every token read adds one step's time: from
    /// the token before it was read to this one.
    pub(super) fn generate_pipelined(
        &mut self,
        token: i64,
        since: Instant,
        max_new: usize,
        eos: Option<i64>,
        g: &mut Generation,
    ) -> Result<()> {
        let Device::Cuda(device) = self.model.device() else {
            return Err(RuntimeError::Cuda("pipelined decode needs CUDA".into()));
        };
        let mut pending: VecDeque<Pending> = VecDeque::with_capacity(IN_FLIGHT);
        // The newest queued step's choice, on the device: what the next step is fed.
        let mut last: Option<Tensor> = None;
        let mut t = since;
        loop {
            // Keep a step queued behind the one whose token is read next.
            while pending.len() < IN_FLIGHT
                && g.tokens.len() + pending.len() < max_new
                && self.seq_len < self.context
                && self.caches.iter().all(|c| c.len() < c.capacity())
            {
                let feed = match &last {
                    Some(n) => TokenIn::Device(n),
                    None => TokenIn::Host(token),
                };
                let (next, p) = self.queue_step(feed, device)?;
                last = Some(next);
                pending.push_back(p);
            }
            let Some(p) = pending.pop_front() else {
                break;
            };
            let tok = p.read()?;
            let now = Instant::now();
            g.decode_s.push((now - t).as_secs_f64());
            t = now;
            g.tokens.push(tok);
            if Some(tok) == eos {
                g.stopped_on_eos = true;
                self.undo(pending.len())?;
                break;
            }
        }
        Ok(())
    }
}
