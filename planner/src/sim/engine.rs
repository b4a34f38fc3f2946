//! A discrete-event engine for one training step. Ops run on per-lane streams (a lane is a
//! rank, or the representative rank of a collapsed simulation) in issue order, after their
//! dependencies. Compute ops take a fixed time. Communication ops first wait their latency,
//! then move bytes over the directed links of the topology as a fluid: concurrent transfers
//! share every link max-min fairly (progressive filling, Bertsekas & Gallager, "Data
//! Networks", Sec. 6.5.2), so contention and overlap emerge from the schedule. The sharing
//! runs over classes of links that every pattern of the step loads alike ([`Net`]), which
//! gives the per-link rates exactly at a fraction of the cost on large clusters.

use crate::{Error, Result};
use std::sync::Arc;

use crate::topology::Loads;

/// Which stream of a lane an op runs on; ops of one stream run one at a time, in issue order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Stream {
    Compute,
    /// Ulysses all-to-alls (the compute stream waits on them: they are not overlapped).
    AllToAll,
    /// Ring attention's KV (and dK/dV) sends and receives.
    Ring,
    /// Tensor-parallel collectives.
    Tp,
    /// Gradient reduction (DP / ZeRO reduce-scatter).
    Grad,
    /// ZeRO weight all-gathers.
    Gather,
}

impl Stream {
    pub const ALL: [Stream; 6] = [
        Stream::Compute,
        Stream::AllToAll,
        Stream::Ring,
        Stream::Tp,
        Stream::Grad,
        Stream::Gather,
    ];
    pub fn name(&self) -> &'static str {
        match self {
            Stream::Compute => "compute",
            Stream::AllToAll => "all-to-all",
            Stream::Ring => "ring p2p",
            Stream::Tp => "tensor parallel",
            Stream::Grad => "grad sync",
            Stream::Gather => "zero gather",
        }
    }
    fn index(&self) -> usize {
        *self as usize
    }
}

/// What an op does.
#[derive(Debug, Clone)]
pub enum Work {
    /// Busy for a fixed time.
    Compute { secs: f64 },
    /// Moves `scale` x the unit link loads, after `latency_s`.
    Comm {
        loads: Arc<Loads>,
        scale: f64,
        latency_s: f64,
    },
}

/// One op of the step.
#[derive(Debug, Clone)]
pub struct Op {
    pub name: String,
    /// Lanes whose `stream` the op occupies (a collective occupies every member's stream).
    pub lanes: Vec<u32>,
    pub stream: Stream,
    pub work: Work,
    pub deps: Vec<usize>,
    /// Payload bytes each member rank sends (for volume accounting; 0 for compute).
    pub sent_per_rank: f64,
}

/// The schedule the engine found.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub start: Vec<f64>,
    pub end: Vec<f64>,
    pub makespan: f64,
    /// Highest utilisation (load rate / capacity) any directed link reached at any instant.
    pub max_link_utilisation: f64,
    /// Bytes each op moved over its links (sum over links of bytes), for volume checks.
    pub link_bytes: Vec<f64>,
}

/// The engine: ops plus link capacities (bytes/s by directed-link index).
pub struct Engine {
    pub ops: Vec<Op>,
    caps: Vec<f64>,
    lanes: u32,
    /// Merge links that every fair-share computation treats alike ([`Net`]); `false` keeps
    /// one entry per directed link (the slow path the merged one is tested against).
    pub merge_links: bool,
}

/// The network as the fair sharing sees it. Two directed links with the same capacity that
/// carry the same load from every distinct load pattern (`Arc<Loads>`) of the step are
/// indistinguishable to progressive filling: at every instant they carry the same rates, so
/// they saturate together and freeze the same transfers. One representative per such class
/// gives the same rates, bit for bit (the same sums in the same order), and a collapsed step
/// on 65,536 GPUs spans a few dozen classes instead of hundreds of thousands of links.
struct Net {
    /// Capacity per link class.
    caps: Vec<f64>,
    /// Per op: its (class, load) list (index into `patterns`), `usize::MAX` for compute.
    op_pattern: Vec<usize>,
    patterns: Vec<Vec<(usize, f64)>>,
    /// Per pattern: the sum of its loads over the real links (bytes moved per unit scale).
    pattern_bytes: Vec<f64>,
}

/// A multiply-rotate hash (as rustc's FxHasher) for the integer keys of [`Net::new`], which
/// hashes one key per link load of the step: SipHash's resistance to chosen keys buys nothing
/// here and cost a tenth of `mmsp compare` on 65,536 GPUs.
#[derive(Default, Clone, Copy)]
struct Fx(u64);

impl std::hash::Hasher for Fx {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u64(&mut self, x: u64) {
        self.0 = (self.0.rotate_left(5) ^ x).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
    fn write_usize(&mut self, x: usize) {
        self.write_u64(x as u64);
    }
}

type HashMap<K, V> = std::collections::HashMap<K, V, std::hash::BuildHasherDefault<Fx>>;

impl Net {
    fn new(ops: &[Op], caps: &[f64], merge: bool) -> Net {
        // Distinct load patterns, in first-use order.
        let mut index: HashMap<*const Loads, usize> = HashMap::default();
        let mut distinct: Vec<&Loads> = Vec::new();
        let op_pattern: Vec<usize> = ops
            .iter()
            .map(|o| match &o.work {
                Work::Comm { loads, .. } => *index.entry(Arc::as_ptr(loads)).or_insert_with(|| {
                    distinct.push(loads);
                    distinct.len() - 1
                }),
                Work::Compute { .. } => usize::MAX,
            })
            .collect();
        // Partition refinement: links start in classes by capacity; each pattern then splits
        // every class by the load it puts on the class's links (none for links it misses).
        const NONE: usize = usize::MAX;
        let mut class = vec![NONE; caps.len()];
        let mut next = 0usize;
        let mut by_cap: HashMap<u64, usize> = HashMap::default();
        for l in &distinct {
            for &(e, _) in &l.per_link {
                if class[e] == NONE {
                    class[e] = if merge {
                        *by_cap.entry(caps[e].to_bits()).or_insert_with(|| {
                            next += 1;
                            next - 1
                        })
                    } else {
                        next += 1;
                        next - 1
                    };
                }
            }
        }
        if merge {
            for l in &distinct {
                let mut split: HashMap<(usize, u64), usize> = HashMap::default();
                for &(e, x) in &l.per_link {
                    class[e] = *split.entry((class[e], x.to_bits())).or_insert_with(|| {
                        next += 1;
                        next - 1
                    });
                }
            }
        }
        // Dense class numbers and their capacities.
        let mut dense = vec![NONE; next];
        let mut class_caps = Vec::new();
        for l in &distinct {
            for &(e, _) in &l.per_link {
                if dense[class[e]] == NONE {
                    dense[class[e]] = class_caps.len();
                    class_caps.push(caps[e]);
                }
            }
        }
        let class_of_link = |e: usize| dense[class[e]];
        let mut patterns = Vec::with_capacity(distinct.len());
        let mut pattern_bytes = Vec::with_capacity(distinct.len());
        for l in &distinct {
            let mut seen = vec![false; class_caps.len()];
            patterns.push(
                l.per_link
                    .iter()
                    .map(|&(e, x)| (class_of_link(e), x))
                    .filter(|&(c, _)| !std::mem::replace(&mut seen[c], true))
                    .collect(),
            );
            pattern_bytes.push(l.per_link.iter().map(|&(_, x)| x).sum::<f64>());
        }
        Net {
            caps: class_caps,
            op_pattern,
            patterns,
            pattern_bytes,
        }
    }

    fn links(&self, op: usize) -> &[(usize, f64)] {
        &self.patterns[self.op_pattern[op]]
    }
}

impl Engine {
    pub fn new(caps: Vec<f64>, lanes: u32) -> Self {
        Engine {
            ops: Vec::new(),
            caps,
            lanes,
            merge_links: true,
        }
    }

    /// Adds an op; dependencies must already exist (the graph is built in issue order).
    pub fn push(&mut self, op: Op) -> usize {
        debug_assert!(op.deps.iter().all(|&d| d < self.ops.len()));
        debug_assert!(op.lanes.iter().all(|&l| l < self.lanes));
        self.ops.push(op);
        self.ops.len() - 1
    }

    /// Runs every op to completion. A schedule that cannot finish (an op that can never
    /// start, or a transfer over links of no capacity: a topology or calibration with absurd
    /// figures) is an [`Error::Invalid`] naming how far it got, not a panic.
    pub fn run(&self) -> Result<Schedule> {
        let n = self.ops.len();
        let mut r = Run::new(self);
        while r.done < n {
            r.start_ready();
            r.share_links();
            let t_next = r.next_event();
            if !t_next.is_finite() {
                return Err(Error::invalid(
                    "simulation",
                    format!(
                        "the step cannot complete: {} of {n} operations done and none can \
                         progress (a link or kernel rate of zero or non-finite figures in the \
                         topology or calibration)",
                        r.done
                    ),
                ));
            }
            r.advance_to(t_next);
            r.retire_finished();
        }
        Ok(Schedule {
            start: r.start,
            end: r.end,
            makespan: r.now,
            max_link_utilisation: r.max_util,
            link_bytes: r.link_bytes,
        })
    }

    fn scale(&self, i: usize) -> f64 {
        match &self.ops[i].work {
            Work::Comm { scale, .. } => *scale,
            Work::Compute { .. } => 0.0,
        }
    }

    fn has_links(&self, i: usize) -> bool {
        matches!(&self.ops[i].work, Work::Comm { loads, .. } if !loads.per_link.is_empty())
    }
}

/// Moves the ops of `waiting` (op, time) whose time is at most `until` into `due`.
fn take_due(waiting: &mut Vec<(usize, f64)>, until: f64, due: &mut Vec<usize>) {
    waiting.retain(|&(i, t)| {
        let ends = t <= until;
        if ends {
            due.push(i);
        }
        !ends
    });
}

/// The state of one [`Engine::run`]: per (lane, stream) queues in issue order, dependency
/// counts, the running ops (compute until its end time, communication in its latency until
/// its ready time, then fluid with its remaining fraction of `scale`), and the buffers reused
/// from event to event.
struct Run<'a> {
    eng: &'a Engine,
    net: Net,
    queues: Vec<Vec<usize>>,
    head: Vec<usize>,
    pending_deps: Vec<usize>,
    dependents: Vec<Vec<usize>>,
    started: Vec<bool>,
    start: Vec<f64>,
    end: Vec<f64>,
    link_bytes: Vec<f64>,
    running_compute: Vec<(usize, f64)>,
    latency_wait: Vec<(usize, f64)>,
    /// (op, remaining fraction of its scale).
    fluid: Vec<(usize, f64)>,
    /// Ops to try to start: heads of queues and ops whose last dependency finished.
    to_check: Vec<usize>,
    rates: Vec<f64>,
    frozen: Vec<bool>,
    used: Vec<f64>,
    demand: Vec<f64>,
    finished: Vec<usize>,
    entering: Vec<usize>,
    keep: Vec<(usize, f64)>,
    done: usize,
    now: f64,
    /// The time `advance_to` moved the clock from, and by how much.
    before: f64,
    dt: f64,
    max_util: f64,
}

impl<'a> Run<'a> {
    fn new(eng: &'a Engine) -> Self {
        let n = eng.ops.len();
        let ns = Stream::ALL.len();
        let mut queues: Vec<Vec<usize>> = vec![Vec::new(); eng.lanes as usize * ns];
        let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
        for (i, op) in eng.ops.iter().enumerate() {
            for &l in &op.lanes {
                queues[l as usize * ns + op.stream.index()].push(i);
            }
            for &d in &op.deps {
                dependents[d].push(i);
            }
        }
        let net = Net::new(&eng.ops, &eng.caps, eng.merge_links);
        let links = net.caps.len();
        Run {
            eng,
            head: vec![0usize; queues.len()],
            to_check: queues.iter().filter_map(|q| q.first().copied()).collect(),
            queues,
            pending_deps: eng.ops.iter().map(|o| o.deps.len()).collect(),
            dependents,
            started: vec![false; n],
            start: vec![f64::NAN; n],
            end: vec![f64::NAN; n],
            link_bytes: vec![0.0; n],
            running_compute: Vec::new(),
            latency_wait: Vec::new(),
            fluid: Vec::new(),
            rates: Vec::new(),
            frozen: Vec::new(),
            used: vec![0.0; links],
            demand: vec![0.0; links],
            finished: Vec::new(),
            entering: Vec::new(),
            keep: Vec::new(),
            net,
            done: 0,
            now: 0.0,
            before: 0.0,
            dt: 0.0,
            max_util: 0.0,
        }
    }

    /// The queue of a lane's stream.
    fn queue(&self, lane: u32, stream: Stream) -> usize {
        lane as usize * Stream::ALL.len() + stream.index()
    }

    /// Not started, every dependency done, and at the head of each of its lanes' queues.
    fn is_ready(&self, i: usize) -> bool {
        let op = &self.eng.ops[i];
        !self.started[i]
            && self.pending_deps[i] == 0
            && op.lanes.iter().all(|&l| {
                let q = self.queue(l, op.stream);
                self.queues[q].get(self.head[q]) == Some(&i)
            })
    }

    /// Starts every op that can start now.
    fn start_ready(&mut self) {
        let mut check = std::mem::take(&mut self.to_check);
        check.sort_unstable();
        check.dedup();
        for &i in &check {
            if !self.is_ready(i) {
                continue;
            }
            self.started[i] = true;
            self.start[i] = self.now;
            match &self.eng.ops[i].work {
                Work::Compute { secs } => self.running_compute.push((i, self.now + secs.max(0.0))),
                Work::Comm { latency_s, .. } => {
                    self.latency_wait.push((i, self.now + latency_s.max(0.0)))
                }
            }
        }
        check.clear();
        self.to_check = check;
    }

    /// Rates of fluid transfers (max-min fair progressive filling). A rate of 0 (a link of no
    /// capacity) leaves its transfer unfinishable: the next event is then at infinity.
    fn share_links(&mut self) {
        fair_rates(
            &self.net,
            &self.fluid,
            &mut self.used,
            &mut self.demand,
            &mut self.rates,
            &mut self.frozen,
        );
        if self.fluid.len() > 1 {
            let u = utilisation(&self.net, &self.fluid, &self.rates, &mut self.used);
            self.max_util = self.max_util.max(u);
        } else if !self.fluid.is_empty() {
            self.max_util = self.max_util.max(1.0);
        }
    }

    /// The time of the next event: a compute op's end, a latency's end, a transfer's end.
    fn next_event(&self) -> f64 {
        let mut t_next = f64::INFINITY;
        for &(_, t) in self.running_compute.iter().chain(self.latency_wait.iter()) {
            t_next = t_next.min(t);
        }
        for (k, &(_, rem)) in self.fluid.iter().enumerate() {
            t_next = t_next.min(self.now + rem / self.rates[k]);
        }
        t_next
    }

    /// Moves the clock to `t_next`: collects the ops that end there, moves ops out of their
    /// latency into the fluid, and drains the transfers at their rates.
    fn advance_to(&mut self, t_next: f64) {
        (self.dt, self.before) = (t_next - self.now, self.now);
        self.now = t_next;
        let (now, eps) = (self.now, 1e-12 * self.now.max(1.0));
        self.finished.clear();
        take_due(&mut self.running_compute, now + eps, &mut self.finished);
        self.entering.clear();
        take_due(&mut self.latency_wait, now + eps, &mut self.entering);
        self.drain_fluid(t_next);
        for k in 0..self.entering.len() {
            let i = self.entering[k];
            let s = self.eng.scale(i);
            if s > 0.0 && self.eng.has_links(i) {
                self.fluid.push((i, s));
            } else {
                self.finished.push(i);
            }
        }
    }

    /// Each transfer's remaining fraction after `dt` at its rate; the ended ones finish.
    fn drain_fluid(&mut self, t_next: f64) {
        self.keep.clear();
        for (k, &(i, rem)) in self.fluid.iter().enumerate() {
            let left = rem - self.rates[k] * self.dt;
            // The transfer that set `t_next` ends now even where `before + rem / rate`
            // rounds to `before` (a transfer far shorter than a ulp of the clock), which
            // would otherwise leave the clock stuck.
            if left <= 1e-9 * self.eng.scale(i).max(1.0)
                || self.before + rem / self.rates[k] <= t_next
            {
                self.finished.push(i);
            } else {
                self.keep.push((i, left));
            }
        }
        std::mem::swap(&mut self.fluid, &mut self.keep);
    }

    /// Records the finished ops and queues what they unblock: the next op of each of their
    /// queues and the dependents whose last dependency they were.
    fn retire_finished(&mut self) {
        for k in 0..self.finished.len() {
            let i = self.finished[k];
            let op = &self.eng.ops[i];
            self.end[i] = self.now;
            self.done += 1;
            if let Work::Comm { scale, .. } = &op.work {
                self.link_bytes[i] = scale * self.net.pattern_bytes[self.net.op_pattern[i]];
            }
            for &l in &op.lanes {
                let q = self.queue(l, op.stream);
                self.head[q] += 1;
                if let Some(&nx) = self.queues[q].get(self.head[q]) {
                    self.to_check.push(nx);
                }
            }
            for &d in &self.dependents[i] {
                self.pending_deps[d] -= 1;
                if self.pending_deps[d] == 0 {
                    self.to_check.push(d);
                }
            }
        }
    }
}

/// Progressive filling: raise all unfrozen transfers' rates (in units of `scale` per second)
/// together until a link class saturates; freeze the transfers crossing it; repeat.
fn fair_rates(
    net: &Net,
    fluid: &[(usize, f64)],
    used: &mut [f64],
    demand: &mut [f64],
    rate: &mut Vec<f64>,
    frozen: &mut Vec<bool>,
) {
    let m = fluid.len();
    rate.clear();
    rate.resize(m, 0.0);
    if m == 1 {
        // Alone on the network: limited by its most loaded link.
        rate[0] = net
            .links(fluid[0].0)
            .iter()
            .map(|&(e, l)| net.caps[e] / l)
            .fold(f64::INFINITY, f64::min);
        return;
    }
    let mut touched: Vec<usize> = Vec::new();
    for &(i, _) in fluid {
        for &(e, _) in net.links(i) {
            if used[e] == 0.0 && demand[e] == 0.0 {
                touched.push(e);
            }
            used[e] = -1.0; // mark
        }
    }
    for &e in &touched {
        used[e] = 0.0;
    }
    frozen.clear();
    frozen.resize(m, false);
    while frozen.iter().any(|f| !f) {
        for &e in &touched {
            demand[e] = 0.0;
        }
        for (k, &(i, _)) in fluid.iter().enumerate() {
            if !frozen[k] {
                for &(e, l) in net.links(i) {
                    demand[e] += l;
                }
            }
        }
        let mut inc = f64::INFINITY;
        for &e in &touched {
            if demand[e] > 0.0 {
                inc = inc.min((net.caps[e] - used[e]).max(0.0) / demand[e]);
            }
        }
        if !inc.is_finite() {
            // No link limits the rest (or figures are not numbers): they stay where they are.
            break;
        }
        for &e in &touched {
            used[e] += inc * demand[e];
        }
        let mut froze = false;
        for (k, &(i, _)) in fluid.iter().enumerate() {
            if !frozen[k] {
                rate[k] += inc;
                if net
                    .links(i)
                    .iter()
                    .any(|&(e, _)| used[e] >= net.caps[e] * (1.0 - 1e-9))
                {
                    frozen[k] = true;
                    froze = true;
                }
            }
        }
        if !froze && inc <= 0.0 {
            // No progress can be made (a capacity that is not a number): stop, not spin.
            break;
        }
    }
    for &e in &touched {
        used[e] = 0.0;
        demand[e] = 0.0;
    }
}

/// Highest utilisation of any link under the given rates.
fn utilisation(net: &Net, fluid: &[(usize, f64)], rates: &[f64], used: &mut [f64]) -> f64 {
    let mut worst: f64 = 0.0;
    for (k, &(i, _)) in fluid.iter().enumerate() {
        for &(e, l) in net.links(i) {
            used[e] += rates[k] * l;
            worst = worst.max(used[e] / net.caps[e]);
        }
    }
    for &(i, _) in fluid {
        for &(e, _) in net.links(i) {
            used[e] = 0.0;
        }
    }
    worst
}

#[cfg(test)]
mod tests {
    use super::*;

    fn comm(per_link: Vec<(usize, f64)>, scale: f64, lat: f64) -> Work {
        Work::Comm {
            loads: Arc::new(Loads {
                per_link,
                latency_s: lat,
            }),
            scale,
            latency_s: lat,
        }
    }

    fn op(name: &str, lanes: Vec<u32>, stream: Stream, work: Work, deps: Vec<usize>) -> Op {
        Op {
            name: name.into(),
            lanes,
            stream,
            work,
            deps,
            sent_per_rank: 0.0,
        }
    }

    /// 2 ranks, 2 ring steps: attention of step 1 waits for the KV block sent during step 0.
    /// Link 0 carries rank 0 -> 1, link 1 carries 1 -> 0, 10 bytes/s each.
    #[test]
    fn two_rank_two_step_ring() {
        for (c, bytes, expect) in [(2.0, 30.0, 3.0 + 2.0), (5.0, 30.0, 5.0 + 5.0)] {
            let mut e = Engine::new(vec![10.0, 10.0], 2);
            let mut last = Vec::new();
            for r in 0..2u32 {
                let a0 = e.push(op(
                    "attn0",
                    vec![r],
                    Stream::Compute,
                    Work::Compute { secs: c },
                    vec![],
                ));
                last.push(a0);
            }
            // One p2p op per rank: rank r sends `bytes` over link r.
            let s0 = e.push(op(
                "send0",
                vec![0],
                Stream::Ring,
                comm(vec![(0, 1.0)], bytes, 0.0),
                vec![],
            ));
            let s1 = e.push(op(
                "send1",
                vec![1],
                Stream::Ring,
                comm(vec![(1, 1.0)], bytes, 0.0),
                vec![],
            ));
            // Rank 1 receives from 0 (s0), rank 0 from 1 (s1).
            e.push(op(
                "attn1",
                vec![0],
                Stream::Compute,
                Work::Compute { secs: c },
                vec![last[0], s1],
            ));
            e.push(op(
                "attn1",
                vec![1],
                Stream::Compute,
                Work::Compute { secs: c },
                vec![last[1], s0],
            ));
            let s = e.run().unwrap();
            assert!(
                (s.makespan - expect).abs() < 1e-9,
                "c={c}: {} vs {expect}",
                s.makespan
            );
            assert!(s.max_link_utilisation <= 1.0 + 1e-9);
        }
    }

    /// A transfer over a link of no capacity can never finish: an error naming the progress,
    /// not a panic (what a topology or calibration with absurd figures used to cause).
    #[test]
    fn a_step_that_cannot_finish_is_an_error() {
        let mut e = Engine::new(vec![0.0], 1);
        let a = e.push(op(
            "c",
            vec![0],
            Stream::Compute,
            Work::Compute { secs: 1.0 },
            vec![],
        ));
        e.push(op(
            "send",
            vec![0],
            Stream::Ring,
            comm(vec![(0, 1.0)], 8.0, 0.0),
            vec![a],
        ));
        let err = e.run().unwrap_err().to_string();
        assert!(err.contains("1 of 2 operations done"), "{err}");
    }

    /// A transfer far shorter than a ulp of the clock (1 ps after 10^6 s) still ends: the
    /// clock used to stay put and the loop spin forever (`plan --gpus 65536 --context 16`).
    #[test]
    fn a_transfer_shorter_than_the_clock_resolution_ends() {
        let mut e = Engine::new(vec![1e15], 1);
        let a = e.push(op(
            "c",
            vec![0],
            Stream::Compute,
            Work::Compute { secs: 1e6 },
            vec![],
        ));
        e.push(op(
            "send",
            vec![0],
            Stream::Ring,
            comm(vec![(0, 1.0)], 1e3, 0.0),
            vec![a],
        ));
        let s = e.run().unwrap();
        assert_eq!(s.makespan, 1e6);
    }

    /// 4-rank all-to-all on a non-blocking switch: each rank sends 3/4 of 8 bytes over its
    /// uplink (4 bytes/s) and receives as much over its downlink: 1.5 s, plus latency.
    #[test]
    fn four_rank_all_to_all() {
        // Links 2r = rank r up, 2r+1 = rank r down.
        let mut per_link = Vec::new();
        for r in 0..4 {
            per_link.push((2 * r, 0.75));
            per_link.push((2 * r + 1, 0.75));
        }
        let mut e = Engine::new(vec![4.0; 8], 4);
        e.push(op(
            "a2a",
            vec![0, 1, 2, 3],
            Stream::AllToAll,
            comm(per_link, 8.0, 0.25),
            vec![],
        ));
        let s = e.run().unwrap();
        assert!((s.makespan - (0.25 + 1.5)).abs() < 1e-9, "{}", s.makespan);
        assert!((s.link_bytes[0] - 8.0 * 6.0).abs() < 1e-9);
    }

    /// Two transfers sharing one link split it fairly; the one that also uses a slow link is
    /// limited there and leaves the rest to the other (max-min, not equal split).
    #[test]
    fn max_min_sharing() {
        let mut e = Engine::new(vec![10.0, 2.0], 1);
        let a = e.push(op(
            "a",
            vec![0],
            Stream::Ring,
            comm(vec![(0, 1.0), (1, 1.0)], 4.0, 0.0),
            vec![],
        ));
        let b = e.push(op(
            "b",
            vec![0],
            Stream::Grad,
            comm(vec![(0, 1.0)], 16.0, 0.0),
            vec![],
        ));
        let s = e.run().unwrap();
        // a runs at 2 (slow link) for 2 s; b gets 8 meanwhile (16 bytes), done at 2 s too.
        assert!(
            (s.end[a] - 2.0).abs() < 1e-9 && (s.end[b] - 2.0).abs() < 1e-9,
            "{:?}",
            s.end
        );
        assert!(s.max_link_utilisation <= 1.0 + 1e-9);
    }

    #[test]
    fn streams_run_in_issue_order_and_respect_deps() {
        let mut e = Engine::new(vec![1.0], 1);
        let x = e.push(op(
            "x",
            vec![0],
            Stream::Compute,
            Work::Compute { secs: 1.0 },
            vec![],
        ));
        let y = e.push(op(
            "y",
            vec![0],
            Stream::Ring,
            comm(vec![(0, 1.0)], 3.0, 0.0),
            vec![x],
        ));
        let z = e.push(op(
            "z",
            vec![0],
            Stream::Compute,
            Work::Compute { secs: 1.0 },
            vec![],
        ));
        let w = e.push(op(
            "w",
            vec![0],
            Stream::Compute,
            Work::Compute { secs: 1.0 },
            vec![y],
        ));
        let s = e.run().unwrap();
        assert_eq!((s.start[z], s.end[y], s.start[w]), (1.0, 4.0, 4.0));
        for (i, o) in e.ops.iter().enumerate() {
            for &d in &o.deps {
                assert!(s.start[i] >= s.end[d]);
            }
        }
    }
}
