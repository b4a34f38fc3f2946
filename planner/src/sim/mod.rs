//! The step simulator: replays one training step of a plan as ops with dependencies on
//! per-rank streams (compute, all-to-all, ring p2p, tensor parallel, gradient sync, ZeRO
//! gathers) over the topology's links, with bandwidth shared among concurrent transfers
//! ([`engine`]), so overlap, contention and exposed communication come out of the schedule.
//!
//! **Collapsing rule.** Every rank of a plan runs the same op sequence with the same sizes
//! (zigzag sharding balances attention exactly, and groups of one kind are congruent), so by
//! default one representative rank is simulated while each communication op carries the
//! flows of *all* groups of its kind at once on the real links; contention between groups
//! and between concurrent collectives is therefore kept. `collapse = false` simulates every
//! rank with one op per group (affordable for small worlds); the tests check that both give
//! the same step time where both run.

pub mod engine;
pub mod trace;

use std::collections::HashMap;
use std::sync::Arc;

use serde::Serialize;

use crate::cost::{Recompute, Terms};
use crate::topology::{GroupFamily, Pattern, Topology};
use engine::{Engine, Op, Schedule, Stream, Work};

/// How a collective maps onto a traffic pattern (nccl-tests doc/PERFORMANCE.md factors).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Coll {
    AllToAll,
    P2P,
    /// Ring all-gather or reduce-scatter: (n-1)/n of the tensor to the next rank, n-1 steps.
    AllGather,
    /// Ring all-reduce: twice an all-gather.
    AllReduce,
}

/// Result of simulating one step.
#[derive(Debug, Clone, Serialize)]
pub struct SimResult {
    pub step_time_s: f64,
    /// Time the compute stream of rank 0 is busy.
    pub compute_busy_s: f64,
    /// Step time not covered by compute: communication (and waiting) left exposed.
    pub exposed_s: f64,
    /// Busy time per stream of rank 0.
    pub stream_busy_s: Vec<(String, f64)>,
    /// Payload bytes rank 0 sent, per stream.
    pub sent_bytes: Vec<(String, f64)>,
    pub max_link_utilisation: f64,
    pub ops: usize,
    pub lanes: u32,
    #[serde(skip)]
    pub engine_ops: Vec<Op>,
    #[serde(skip)]
    pub schedule: Option<Schedule>,
}

type H = Vec<Vec<usize>>;

struct Builder<'a> {
    topo: &'a Topology,
    t: &'a Terms,
    eng: Engine,
    /// Lane k simulates rank lanes[k]: all ranks, or rank 0 alone when collapsed.
    ranks: Vec<u32>,
    collapse: bool,
    group_cache: HashMap<(Pattern, GroupFamily, u32), Arc<crate::topology::Loads>>,
    /// Groups of middle ring steps an attention call holds at most (u32::MAX: every step).
    ring_groups: u32,
}

impl<'a> Builder<'a> {
    fn empty(&self) -> H {
        vec![Vec::new(); self.ranks.len()]
    }

    fn compute(&mut self, name: &str, secs: f64, deps: &H) -> H {
        if secs <= 0.0 {
            return deps.clone();
        }
        (0..self.ranks.len())
            .map(|k| {
                vec![self.eng.push(Op {
                    name: name.to_string(),
                    lanes: vec![k as u32],
                    stream: Stream::Compute,
                    work: Work::Compute { secs },
                    deps: deps[k].clone(),
                    sent_per_rank: 0.0,
                })]
            })
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    fn comm(
        &mut self,
        name: &str,
        stream: Stream,
        coll: Coll,
        fam: GroupFamily,
        bytes: f64,
        deps: &H,
    ) -> H {
        if fam.size <= 1 || bytes <= 0.0 {
            return deps.clone();
        }
        let n = f64::from(fam.size);
        let pattern = if coll == Coll::AllToAll {
            Pattern::AllToAll
        } else {
            Pattern::RingP2P
        };
        let (scale, lat_mult, sent) = match coll {
            Coll::AllToAll => (bytes, 1.0, bytes * (n - 1.0) / n),
            Coll::P2P => (bytes, 1.0, bytes),
            Coll::AllGather => (bytes * (n - 1.0) / n, n - 1.0, bytes * (n - 1.0) / n),
            Coll::AllReduce => (
                2.0 * bytes * (n - 1.0) / n,
                2.0 * (n - 1.0),
                2.0 * bytes * (n - 1.0) / n,
            ),
        };
        if self.collapse {
            let loads = self.topo.family_loads(pattern, fam);
            let lat = loads.latency_s * lat_mult;
            let id = self.eng.push(Op {
                name: name.to_string(),
                lanes: vec![0],
                stream,
                work: Work::Comm {
                    loads,
                    scale,
                    latency_s: lat,
                },
                deps: deps[0].clone(),
                sent_per_rank: sent,
            });
            return vec![vec![id]];
        }
        let mut out = self.empty();
        for (gi, g) in fam.groups(self.topo.world).into_iter().enumerate() {
            let key = (pattern, fam, gi as u32);
            let loads = match self.group_cache.get(&key) {
                Some(l) => l.clone(),
                None => {
                    let l = Arc::new(self.topo.groups_loads(pattern, std::slice::from_ref(&g)));
                    self.group_cache.insert(key, l.clone());
                    l
                }
            };
            let mut d: Vec<usize> = g
                .iter()
                .flat_map(|&r| deps[r as usize].iter().copied())
                .collect();
            d.sort_unstable();
            d.dedup();
            let lat = loads.latency_s * lat_mult;
            let id = self.eng.push(Op {
                name: name.to_string(),
                lanes: g.clone(),
                stream,
                work: Work::Comm {
                    loads,
                    scale,
                    latency_s: lat,
                },
                deps: d,
                sent_per_rank: sent,
            });
            for &r in &g {
                out[r as usize] = vec![id];
            }
        }
        out
    }

    fn join(a: &H, b: &H) -> H {
        a.iter()
            .zip(b)
            .map(|(x, y)| x.iter().chain(y).copied().collect())
            .collect()
    }

    /// One Megatron tensor-parallel activation collective (all-gather or reduce-scatter).
    fn tp(&mut self, tag: &str, what: &str, deps: &H) -> H {
        let (fam, bytes) = (self.t.layout.tp_family(), self.t.tp_bytes);
        self.comm(
            &format!("{tag} {what}"),
            Stream::Tp,
            Coll::AllGather,
            fam,
            bytes,
            deps,
        )
    }

    /// One Ulysses all-to-all of `bytes` per rank.
    fn a2a(&mut self, tag: &str, what: &str, bytes: f64, deps: &H) -> H {
        let fam = self.t.layout.ulysses_family();
        self.comm(
            &format!("{tag} {what}"),
            Stream::AllToAll,
            Coll::AllToAll,
            fam,
            bytes,
            deps,
        )
    }

    /// Forward of one layer; returns the dependencies of what follows.
    fn forward_layer(&mut self, l: u64, pass: &str, deps: &H) -> H {
        self.layer_forward_ops(&format!("L{l} {pass}"), true, deps)
    }

    /// mmsp-runtime's recompute of one layer outside attention before its backward
    /// ([`Recompute::OutsideAttention`], `runtime/src/train/mod.rs`): the forward's GEMMs and
    /// memory-bound work (with its tensor-parallel collectives) run again; attention and its
    /// all-to-all and ring traffic do not (their outputs were kept).
    fn recompute_outside_attention(&mut self, l: u64, deps: &H) -> H {
        self.layer_forward_ops(&format!("L{l} recompute"), false, deps)
    }

    /// A layer's forward ops under `tag`: QKV, then (with `attention`) the all-to-alls and the
    /// ring around attention, the output projection and the MLP, with the tensor-parallel
    /// collectives between them.
    fn layer_forward_ops(&mut self, tag: &str, attention: bool, deps: &H) -> H {
        let t = self.t;
        let mut d = self.tp(tag, "tp all-gather", deps);
        d = self.compute(
            &format!("{tag} qkv"),
            t.gemm_fwd_s * t.qkv_share + 0.5 * t.elem_fwd_s,
            &d,
        );
        if attention {
            d = self.a2a(tag, "a2a qkv", t.a2a_qkv_bytes, &d);
            d = self.ring(tag, t.attn_fwd_s + t.ring_merge_fwd_s, t.ring_kv_bytes, &d);
            d = self.a2a(tag, "a2a out", t.a2a_o_bytes, &d);
        }
        d = self.compute(&format!("{tag} o-proj"), t.gemm_fwd_s * t.o_share, &d);
        d = self.tp(tag, "tp reduce-scatter", &d);
        d = self.tp(tag, "tp all-gather", &d);
        d = self.compute(
            &format!("{tag} mlp"),
            t.gemm_fwd_s * (1.0 - t.qkv_share - t.o_share) + 0.5 * t.elem_fwd_s,
            &d,
        );
        self.tp(tag, "tp reduce-scatter", &d)
    }

    /// Backward of one layer.
    fn backward_layer(&mut self, l: u64, deps: &H) -> H {
        let t = self.t;
        let tag = format!("L{l} bwd");
        let mlp = 1.0 - t.qkv_share - t.o_share;
        let mut d = self.tp(&tag, "tp all-gather", deps);
        d = self.compute(
            &format!("{tag} mlp"),
            2.0 * t.gemm_fwd_s * mlp + t.elem_fwd_s,
            &d,
        );
        d = self.tp(&tag, "tp reduce-scatter", &d);
        d = self.tp(&tag, "tp all-gather", &d);
        d = self.compute(&format!("{tag} o-proj"), 2.0 * t.gemm_fwd_s * t.o_share, &d);
        d = self.a2a(&tag, "a2a dout", t.a2a_o_bytes, &d);
        d = self.ring(
            &tag,
            t.attn_bwd_s() + t.ring_merge_bwd_s,
            3.0 * t.ring_kv_bytes,
            &d,
        );
        d = self.a2a(&tag, "a2a dqkv", t.a2a_qkv_bytes, &d);
        d = self.compute(
            &format!("{tag} qkv"),
            2.0 * t.gemm_fwd_s * t.qkv_share + t.elem_fwd_s,
            &d,
        );
        self.tp(&tag, "tp reduce-scatter", &d)
    }

    /// Zigzag ring attention: `ring` steps of equal work (the kernels and the ring's own merge
    /// and accumulation work, `Terms::ring_merge_*`); the block for step k+1 travels while
    /// step k computes, into the buffer step k-1 has released (double buffering).
    fn ring(&mut self, tag: &str, total_s: f64, block_bytes: f64, deps: &H) -> H {
        let r = self.t.layout.ring;
        let fam = self.t.layout.ring_family();
        let step = total_s / f64::from(r);
        let mut prev_attn: Option<H> = None;
        let mut recv: H = deps.clone();
        let mut attn = deps.clone();
        // Steps 1..r-2 are alike: at most RING_GROUPS ops stand for them, each g steps of
        // compute beside the g blocks the next g steps need (the same period, g x max(step,
        // transfer), when nothing else shares the links); the first and last stay single.
        let groups = ring_groups(r, self.ring_groups);
        for (k, &g) in groups.iter().enumerate() {
            let a_deps = match &prev_attn {
                None => deps.clone(),
                Some(p) => Self::join(p, &recv),
            };
            attn = self.compute(
                &format!("{tag} attn step {k}"),
                step * f64::from(g),
                &a_deps,
            );
            if k + 1 < groups.len() {
                let s_deps = match &prev_attn {
                    None => deps.clone(),
                    Some(p) => Self::join(p, &recv),
                };
                recv = self.comm(
                    &format!("{tag} ring send/recv {k}"),
                    Stream::Ring,
                    Coll::P2P,
                    fam,
                    block_bytes * f64::from(g),
                    &s_deps,
                );
            }
            prev_attn = Some(attn.clone());
        }
        attn
    }
}

/// Ring steps each simulated op stands for: the first and the last step alone, the middle
/// ones in at most `max` near-equal groups (one op per step up to that size).
fn ring_groups(r: u32, max: u32) -> Vec<u32> {
    if r <= max.saturating_add(2) {
        return vec![1; r as usize];
    }
    let mid = r - 2;
    let mut out = vec![1];
    out.extend((0..max).map(|i| mid / max + u32::from(i < mid % max)));
    out.push(1);
    out
}

/// Groups of middle ring steps a simulated attention call holds at most.
const RING_GROUPS: u32 = 6;

/// Replays a saved plan: checks it against its topology (node size, whole nodes, memory and
/// layout rules), then returns the topology, the analytic estimate and the simulated step.
pub fn replay_plan(
    plan: &crate::plan::Plan,
    path: &str,
    collapse: bool,
) -> crate::Result<(Topology, crate::cost::Estimate, SimResult)> {
    use crate::spec::cluster::ClusterSpec;
    let cluster = ClusterSpec::load(&plan.topology)?;
    if plan.gpus_per_node != cluster.gpus_per_node {
        return Err(crate::Error::invalid(
            "plan",
            format!(
                "{path} was made for {} GPUs per node but topology '{}' has {}",
                plan.gpus_per_node, cluster.name, cluster.gpus_per_node
            ),
        ));
    }
    cluster.check_gpus(u64::from(plan.world_size))?;
    let topo = Topology::build(&cluster, plan.world_size);
    let w = crate::cost::Workload {
        model: &plan.model,
        context: plan.context_tokens,
        global_batch: plan.global_batch,
        vision: plan.vision.as_ref().map(|v| v.stage),
    };
    let c = crate::plan::candidate_of(plan);
    let t = crate::cost::terms(&topo, &w, &c).map_err(|e| {
        crate::Error::invalid(
            "plan",
            format!("{path} cannot run on {}: {e}", cluster.name),
        )
    })?;
    let analytic = crate::cost::compose(&topo, &t);
    let sim = simulate(&topo, &t, collapse)?;
    Ok((topo, analytic, sim))
}

/// Simulates one training step of a candidate's terms on the topology.
pub fn simulate(topo: &Topology, t: &Terms, collapse: bool) -> crate::Result<SimResult> {
    simulate_micro(topo, t, collapse, SIMULATED_MICRO_BATCHES)
}

/// [`simulate`] holding at most `cap` micro-batches (at least 3) in the event graph; with
/// `cap` = `u64::MAX` every micro-batch and every ring step is an op of its own (the exact
/// replay the shortcuts are checked against).
pub(crate) fn simulate_micro(
    topo: &Topology,
    t: &Terms,
    collapse: bool,
    cap: u64,
) -> crate::Result<SimResult> {
    simulate_opts(topo, t, collapse, cap, MERGE_LINKS.with(|m| m.get()))
}

thread_local! {
    /// Whether this thread's simulations share bandwidth over link classes (the default) or
    /// over every link ([`per_link_sharing`]: the slow path tests compare plans with).
    static MERGE_LINKS: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

/// Runs `f` with this thread's simulations sharing bandwidth over every directed link instead
/// of over classes of alike links (slow; the reference for tests of whole plans).
pub fn per_link_sharing<T>(f: impl FnOnce() -> T) -> T {
    let before = MERGE_LINKS.with(|m| m.replace(false));
    let out = f();
    MERGE_LINKS.with(|m| m.set(before));
    out
}

/// [`simulate_micro`]; `merge_links = false` shares bandwidth over every directed link
/// instead of over classes of alike links ([`engine::Engine::merge_links`]).
pub(crate) fn simulate_opts(
    topo: &Topology,
    t: &Terms,
    collapse: bool,
    cap: u64,
    merge_links: bool,
) -> crate::Result<SimResult> {
    let mut b = Builder::new(topo, t, collapse, cap, merge_links);
    let mut d = b.empty();
    let mut grads: H = b.empty();
    // Micro-batches between the first and the last are alike: three are simulated (first,
    // one of the middle, last) and the middle one's period stands for the others
    // ([`extrapolate`]), so a step of 32,768 accumulation steps costs what 3 do.
    let simulated = t.accum.min(cap.max(SIMULATED_MICRO_BATCHES));
    let mut micro_ops: Vec<std::ops::Range<usize>> = Vec::new();
    for micro in 0..simulated {
        let first_op = b.eng.ops.len();
        d = b.compute("vision stage", t.vision_s(), &d);
        let (fwd, next_gather) = b.forward_pass(&d);
        d = b.backward_pass(&fwd, next_gather);
        if t.zero_stage == 0 && micro + 1 == simulated {
            let gf = t.layout.grad_family();
            grads = b.comm(
                "grad all-reduce",
                Stream::Grad,
                Coll::AllReduce,
                gf,
                t.grad_bytes,
                &d,
            );
        }
        micro_ops.push(first_op..b.eng.ops.len());
    }
    let all = Builder::join(&d, &grads);
    let opt = b.compute("optimizer step", t.optimizer_s, &all);
    if (1..=2).contains(&t.zero_stage) {
        // The updated bf16 shards into the whole bf16 parameters.
        b.zero_gather("weight all-gather", t.param_bytes, &opt);
    }
    let sched = b.eng.run()?;
    Ok(sim_result(
        b.eng.ops, sched, &micro_ops, t, collapse, simulated,
    ))
}

// The optimizer's collectives as mmsp-runtime runs them (`cost::optimizer_collectives` says
// the same analytically): ZeRO-0 all-reduces the fp32 gradients after the last micro-batch's
// backward; ZeRO-1 and 2 reduce-scatter each unit's fp32 gradient on the grad stream as soon
// as its backward is done, waited for after the next unit's backward, and all-gather the
// updated bf16 parameters after the update; ZeRO-3 also gathers each layer's bf16 weights on
// the gather stream, one layer ahead of the compute that needs them (Zhao et al. 2023, PyTorch
// FSDP, Sec. 3.3: at most two layers gathered at once), the embedding table for the lookup and
// the final norm with the head for the loss (waited for: exposed).
impl<'a> Builder<'a> {
    fn new(topo: &'a Topology, t: &'a Terms, collapse: bool, cap: u64, merge_links: bool) -> Self {
        let ranks: Vec<u32> = if collapse {
            vec![0]
        } else {
            (0..t.layout.world()).collect()
        };
        let caps: Vec<f64> = (0..topo.directed_links())
            .map(|i| topo.link_capacity(i))
            .collect();
        let mut eng = Engine::new(caps, ranks.len() as u32);
        eng.merge_links = merge_links;
        Builder {
            topo,
            t,
            eng,
            ranks,
            collapse,
            group_cache: HashMap::new(),
            ring_groups: if cap == u64::MAX {
                u32::MAX
            } else {
                RING_GROUPS
            },
        }
    }

    /// A layer's bf16 weights (or the table, or the head) all-gathered on the gather stream.
    fn zero_gather(&mut self, name: &str, bytes: f64, deps: &H) -> H {
        let gf = self.t.layout.grad_family();
        self.comm(name, Stream::Gather, Coll::AllGather, gf, bytes, deps)
    }

    /// A unit's fp32 gradient reduce-scattered on the grad stream (`bytes` of bf16 weights).
    fn grad_reduce(&mut self, name: &str, bytes: f64, deps: &H) -> H {
        let gf = self.t.layout.grad_family();
        let fp32 = crate::cost::memory::GRAD_BYTES / crate::cost::memory::WEIGHT_BYTES;
        self.comm(name, Stream::Grad, Coll::AllGather, gf, fp32 * bytes, deps)
    }

    fn layer_param_bytes(&self) -> f64 {
        self.t.layers_param_bytes / self.t.layers as f64
    }

    /// One micro-batch's forward through the loss after `d`; returns its end and, under
    /// ZeRO-3, the last layer's gather for the backward (prefetched behind the loss). ZeRO-3:
    /// the table and layer 0 gathered before the first layer (exposed); layer l + 1's gather
    /// issued when layer l starts (layer l - 1's weights freed); the final norm and head
    /// gathered before the loss (exposed).
    fn forward_pass(&mut self, d: &H) -> (H, H) {
        let (t, layers, layer_param) = (self.t, self.t.layers, self.layer_param_bytes());
        let z3 = t.zero_stage >= 3;
        let mut d = d.clone();
        let mut next_gather = self.empty();
        if z3 {
            let e = self.zero_gather("zero-3 gather (embedding)", t.embed_param_bytes, &d);
            d = Builder::join(&d, &e);
            next_gather = self.zero_gather("L0 zero-3 gather", layer_param, &d);
        }
        for l in 0..layers {
            let mine = next_gather.clone();
            if z3 && l + 1 < layers {
                let name = format!("L{} zero-3 gather", l + 1);
                next_gather = self.zero_gather(&name, layer_param, &d);
            }
            let deps = Builder::join(&d, &mine);
            d = self.forward_layer(l, "fwd", &deps);
        }
        if z3 {
            let h = self.zero_gather("zero-3 gather (head)", t.head_param_bytes, &d);
            d = Builder::join(&d, &h);
            let name = format!("L{} zero-3 gather (bwd)", layers - 1);
            next_gather = self.zero_gather(&name, layer_param, &d);
        }
        (d, next_gather)
    }

    /// The loss and one micro-batch's backward after `d`, with its gradients' reduce-scatters
    /// (ZeRO 1-3: each waited for after the next unit's backward; the head's exposed under
    /// ZeRO-3) and, under ZeRO-3, each layer's gather one layer ahead (`next_gather` the last
    /// layer's). Returns the end of the backward with the last reduce-scatters.
    fn backward_pass(&mut self, d: &H, mut next_gather: H) -> H {
        let (t, layer_param) = (self.t, self.layer_param_bytes());
        let (z3, sharded) = (t.zero_stage >= 3, t.zero_stage >= 1);
        let mut d = self.compute("head fwd+bwd", 3.0 * t.head_fwd_s, d);
        // The reduce-scatter in flight, waited for after the next unit's backward.
        let mut pending = self.empty();
        if sharded {
            let r = self.grad_reduce("head grad reduce-scatter", t.head_param_bytes, &d);
            if z3 {
                d = Builder::join(&d, &r);
            } else {
                pending = r;
            }
        }
        for l in (0..t.layers).rev() {
            let mine = next_gather.clone();
            if z3 && l > 0 {
                let name = format!("L{} zero-3 gather (bwd)", l - 1);
                next_gather = self.zero_gather(&name, layer_param, &d);
            }
            d = Builder::join(&d, &mine);
            // The runtime's only recompute (`cost::runtime_recompute`): outside attention.
            if t.recompute != Recompute::None {
                d = self.recompute_outside_attention(l, &d);
            }
            d = self.backward_layer(l, &d);
            d = Builder::join(&d, &pending);
            if sharded {
                let name = format!("L{l} grad reduce-scatter");
                pending = self.grad_reduce(&name, layer_param, &d);
            }
        }
        if sharded {
            // The first layer's reduce-scatter and the embedding's: nothing left to hide them.
            let e = self.grad_reduce("embedding grad reduce-scatter", t.embed_param_bytes, &d);
            d = Builder::join(&d, &Builder::join(&pending, &e));
        }
        d
    }
}

/// The step's result from the schedule of its simulated micro-batches: rank 0's busy time
/// and bytes per stream, with the unsimulated middle micro-batches extrapolated.
fn sim_result(
    ops: Vec<Op>,
    sched: Schedule,
    micro_ops: &[std::ops::Range<usize>],
    t: &Terms,
    collapse: bool,
    simulated: u64,
) -> SimResult {
    let mut busy: HashMap<Stream, f64> = HashMap::new();
    let mut sent: HashMap<Stream, f64> = HashMap::new();
    for (i, o) in ops.iter().enumerate() {
        if o.lanes.contains(&0) {
            *busy.entry(o.stream).or_default() += sched.end[i] - sched.start[i];
            *sent.entry(o.stream).or_default() += o.sent_per_rank;
        }
    }
    let extra_s = extrapolate(
        &ops,
        &sched,
        micro_ops,
        t.accum - simulated,
        &mut busy,
        &mut sent,
    );
    let step_time_s = sched.makespan + extra_s;
    let compute_busy = busy.get(&Stream::Compute).copied().unwrap_or(0.0);
    let order = |m: HashMap<Stream, f64>| {
        Stream::ALL
            .iter()
            .filter_map(|s| m.get(s).map(|v| (s.name().to_string(), *v)))
            .collect::<Vec<_>>()
    };
    SimResult {
        step_time_s,
        compute_busy_s: compute_busy,
        exposed_s: (step_time_s - compute_busy).max(0.0),
        stream_busy_s: order(busy),
        sent_bytes: order(sent),
        max_link_utilisation: sched.max_link_utilisation,
        ops: ops.len(),
        lanes: if collapse { 1 } else { t.layout.world() },
        engine_ops: ops,
        schedule: Some(sched),
    }
}

/// Micro-batches a step's simulation holds at most: the first, one of the middle and the last.
const SIMULATED_MICRO_BATCHES: u64 = 3;

/// The time (returned) and rank 0's busy time and bytes (added) of the `missing` middle
/// micro-batches a step did not simulate: each as the simulated second one, whose period is
/// the time between the ends of its rank-0 work and of the first micro-batch's.
fn extrapolate(
    ops: &[Op],
    sched: &Schedule,
    micro_ops: &[std::ops::Range<usize>],
    missing: u64,
    busy: &mut HashMap<Stream, f64>,
    sent: &mut HashMap<Stream, f64>,
) -> f64 {
    let missing = missing as f64;
    if missing == 0.0 || micro_ops.len() < 2 {
        return 0.0;
    }
    let end_of = |r: &std::ops::Range<usize>| {
        r.clone()
            .filter(|&i| ops[i].lanes.contains(&0))
            .map(|i| sched.end[i])
            .fold(0.0, f64::max)
    };
    let period = (end_of(&micro_ops[1]) - end_of(&micro_ops[0])).max(0.0);
    for i in micro_ops[1].clone().filter(|&i| ops[i].lanes.contains(&0)) {
        let o = &ops[i];
        *busy.entry(o.stream).or_default() += missing * (sched.end[i] - sched.start[i]);
        *sent.entry(o.stream).or_default() += missing * o.sent_per_rank;
    }
    missing * period
}

/// How many layouts (the analytically best candidate of each) the simulator re-ranks.
pub const REFINE_TOP: usize = 5;

/// The analytically best of each of the first [`REFINE_TOP`] distinct layouts of `ranked`
/// (fastest first): near-ties of one layout (ZeRO stage, micro-batch) would otherwise crowd
/// out the alternatives.
pub fn first_of_each_layout<T>(
    ranked: impl Iterator<Item = T>,
    layout: impl Fn(&T) -> crate::cost::Layout,
) -> Vec<T> {
    let mut layouts = Vec::new();
    ranked
        .filter(|x| {
            let new = !layouts.contains(&layout(x));
            if new {
                layouts.push(layout(x));
            }
            new
        })
        .take(REFINE_TOP)
        .collect()
}

#[cfg(test)]
mod tests;
