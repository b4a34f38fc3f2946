//! The search: enumerates every layout of N GPUs for a context length (sequence-parallel degree
//! sp dividing N, sp = ulysses x ring under the head-count rules, both placements, DP = N / sp,
//! ZeRO stage, recompute policy, micro-batch), evaluates each with the cost model, drops the
//! infeasible with their typed reason, and ranks the rest by predicted step time at the
//! requested global batch. Also: the largest context that fits, and the fewest GPUs that would
//! fit a request, for when nothing fits.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::cost::{
    evaluate, head_split, Candidate, Infeasible, Layout, Placement, Recompute, VisionStage,
    Workload,
};
use crate::error::{Error, Result};
use crate::multimodal::MultiModal;
use crate::spec::cluster::ClusterSpec;
use crate::spec::model::ModelSpec;
use crate::topology::Topology;
use crate::units::{fmt_gib, fmt_tokens, MI};

/// Parallelisation strategies that the same cost model can compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Ulysses x zigzag ring (MM-SP / USP), both placements, any ZeRO stage.
    #[serde(rename = "2d")]
    TwoD,
    /// Zigzag ring attention over all SP ranks (ring-flash-attention style).
    Ring,
    /// DeepSpeed-Ulysses alone: SP degree capped by the head count.
    Ulysses,
    /// Megatron-LM context parallel (p2p ring) + tensor parallel with sequence parallel, with
    /// Megatron-Core's distributed optimizer (ZeRO-1: 6 + 12/d bytes per parameter over the
    /// DP x CP ranks).
    MegatronCpTp,
    /// TransformerEngine hierarchical context parallel (a2a inside, p2p across) with optional
    /// tensor parallel, with Megatron-Core's distributed optimizer as [`Strategy::MegatronCpTp`].
    TeA2aP2p,
}

impl Strategy {
    pub const ALL: [Strategy; 5] = [
        Strategy::TwoD,
        Strategy::Ring,
        Strategy::Ulysses,
        Strategy::MegatronCpTp,
        Strategy::TeA2aP2p,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            Strategy::TwoD => "2d",
            Strategy::Ring => "ring",
            Strategy::Ulysses => "ulysses",
            Strategy::MegatronCpTp => "megatron-cp-tp",
            Strategy::TeA2aP2p => "te-a2a-p2p",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Strategy::ALL
            .into_iter()
            .find(|x| x.name() == s)
            .ok_or_else(|| {
                Error::invalid(
                    "--strategy",
                    format!("'{s}' is not one of: 2d, ring, ulysses, megatron-cp-tp, te-a2a-p2p"),
                )
            })
    }
}

/// What the user asked for.
#[derive(Debug, Clone)]
pub struct Request {
    pub gpus: u32,
    pub context: u64,
    /// Sequences per step; `None` picks [`default_global_batch`].
    pub global_batch: Option<u64>,
    /// Force a recompute policy; `None` searches both that mmsp-runtime runs
    /// ([`Recompute::SEARCHED`]) under every ZeRO stage. Any policy but [`Recompute::None`] is
    /// the runtime's recompute outside attention ([`crate::cost::runtime_recompute`]).
    pub recompute: Option<Recompute>,
    pub strategy: Strategy,
    /// Restrict the search to one Ulysses x ring layout (`--layout UxR`); `None` searches all.
    pub pin: Option<LayoutPin>,
    /// Force a ZeRO stage (`--zero`); `None` searches the strategy's stages.
    pub zero: Option<u8>,
}

/// A layout the user fixed: Ulysses degree x ring degree (dp follows from the GPU count).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayoutPin {
    pub ulysses: u32,
    pub ring: u32,
}

/// Tokens per step when the user gives no batch: 4M tokens, Llama 3's initial batch
/// (Llama Team 2024, "The Llama 3 Herd of Models", Sec. 3.4.1), as whole sequences (at least
/// one), rounded down to a power of two.
pub fn default_global_batch(context: u64) -> u64 {
    let seqs = (4 * MI / context.max(1)).max(1);
    1 << (63 - seqs.leading_zeros())
}

/// The largest micro-batch the search tries (sequences per GPU per forward and backward).
pub const MAX_MICRO_BATCH: u32 = 8;

/// The most gradient-accumulation steps a planned step may take at [`MAX_MICRO_BATCH`] on every
/// GPU: 1024, so at most 8192 sequences per GPU per optimizer step. Llama 3's 4M-token batch
/// (Llama Team 2024, Sec. 3.4.1) at its shortest 8K context is 512 sequences, 64 per GPU on 8
/// GPUs; a step of more than a thousand accumulation steps of the largest micro-batch is not a
/// long-context training step (the contexts that need it are a few tokens long, far below any
/// sequence-parallel degree's use) and its plan would be the accumulation loop alone.
pub const MAX_ACCUMULATION_STEPS: u64 = 1024;

/// Refuses a request whose global batch (given or the 4M-token default,
/// [`default_global_batch`]) holds more sequences than `gpus` x [`MAX_MICRO_BATCH`] x
/// [`MAX_ACCUMULATION_STEPS`], naming the nearest accepted requests: the longest such batch,
/// and (for the default batch) the shortest context whose default batch is accepted.
pub fn check_batch(req: &Request) -> Result<()> {
    let most = u64::from(req.gpus) * u64::from(MAX_MICRO_BATCH) * MAX_ACCUMULATION_STEPS;
    let batch = req
        .global_batch
        .unwrap_or_else(|| default_global_batch(req.context));
    if batch <= most {
        return Ok(());
    }
    let steps = batch.div_ceil(u64::from(req.gpus) * u64::from(MAX_MICRO_BATCH));
    let head = format!(
        "a global batch of {batch} sequences of {} tokens on {} GPUs takes {steps} accumulation \
         steps of {MAX_MICRO_BATCH} sequences per GPU, over the {MAX_ACCUMULATION_STEPS} planned \
         ({most} sequences at most)",
        fmt_tokens(req.context),
        req.gpus
    );
    let msg = match req.global_batch {
        Some(_) => format!("{head}; the nearest accepted request is --global-batch {most}"),
        None => {
            // The default batch is 4M tokens rounded down to a power of two sequences: it is at
            // most `most` once 4M / context is below the power of two above `most`.
            let above = 2u64 << (63 - most.leading_zeros());
            let context = 4 * MI / above + 1;
            format!(
                "{head}: the 4M-token default batch is not for {}-token contexts; the nearest \
                 accepted requests are --context {context} or --global-batch {most}",
                req.context
            )
        }
    };
    let what = match req.global_batch {
        Some(_) => "--global-batch",
        None => "--context",
    };
    Err(Error::invalid(what, msg))
}

fn divisors(n: u32) -> Vec<u32> {
    (1..=n).filter(|d| n.is_multiple_of(*d)).collect()
}

/// Every candidate of a strategy for `gpus` GPUs (before feasibility).
pub fn enumerate(model: &ModelSpec, cluster: &ClusterSpec, req: &Request) -> Vec<Candidate> {
    let global_batch = req
        .global_batch
        .unwrap_or_else(|| default_global_batch(req.context));
    // What the runtime can run, each once: no recompute and its recompute outside attention.
    // Every strategy is costed as mmsp-runtime would run its layout (the runtime's activation
    // counts, kernels and recompute), so megatron-cp-tp and te-a2a-p2p search the same two:
    // Korthikanti-style selective or whole-layer recompute, which Megatron-LM offers, would be
    // costed against a different activation count than their no-recompute candidates, and
    // `mmsp export` maps the runtime's recompute to an engine's whole-layer recompute under
    // `--allow-coarser-recompute`.
    let recomputes: Vec<Recompute> = match req.recompute {
        Some(r) => vec![crate::cost::runtime_recompute(r)],
        None => Recompute::SEARCHED.to_vec(),
    };
    let tps: Vec<u32> = match req.strategy {
        Strategy::MegatronCpTp | Strategy::TeA2aP2p => {
            divisors(cluster.gpus_per_node.min(cluster.domain_gpus))
                .into_iter()
                .filter(|t| req.gpus.is_multiple_of(*t))
                .collect()
        }
        _ => vec![1],
    };
    // Megatron-LM and TransformerEngine run with Megatron-Core's distributed optimizer (the
    // runtime's ZeRO-1 rule, `cost::memory::runtime_model_states`); mmsp-runtime's layouts
    // search every stage it runs (stage 2 shards the gradients as well, apart from stage 1).
    let zeros: Vec<u8> = match req.strategy {
        Strategy::MegatronCpTp | Strategy::TeA2aP2p => vec![1],
        _ => vec![0, 1, 2, 3],
    };
    let mut out = Vec::new();
    for &tp in &tps {
        for sp in divisors(req.gpus / tp) {
            let dp = req.gpus / tp / sp;
            for u in divisors(sp) {
                let ring = sp / u;
                let ok = match req.strategy {
                    Strategy::TwoD | Strategy::TeA2aP2p => true,
                    Strategy::Ring | Strategy::MegatronCpTp => u == 1,
                    Strategy::Ulysses => ring == 1,
                } && req.pin.is_none_or(|p| p.ulysses == u && p.ring == ring);
                if !ok {
                    continue;
                }
                let placements: &[Placement] = if u > 1 && ring > 1 {
                    &[Placement::UlyssesInner, Placement::RingInner]
                } else {
                    &[Placement::UlyssesInner]
                };
                for &placement in placements {
                    let layout = Layout {
                        ulysses: u,
                        ring,
                        dp,
                        tp,
                        placement,
                    };
                    if !global_batch.is_multiple_of(u64::from(dp))
                        || head_split(model, tp, u).is_err()
                    {
                        // One candidate records why this layout cannot run (batch or heads).
                        out.push(Candidate {
                            layout,
                            zero_stage: zeros[0],
                            recompute: recomputes[0],
                            micro_batch: 1,
                        });
                        continue;
                    }
                    for &zero_stage in zeros.iter().filter(|z| req.zero.is_none_or(|f| f == **z)) {
                        // Recompute is a choice under every stage.
                        for &recompute in &recomputes {
                            // Larger micro-batches only where the batch has the sequences.
                            for micro_batch in [1u32, 2, 4, 8] {
                                if micro_batch > 1 && u64::from(dp * micro_batch) > global_batch {
                                    break;
                                }
                                out.push(Candidate {
                                    layout,
                                    zero_stage,
                                    recompute,
                                    micro_batch,
                                });
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

pub use crate::cost::Scored;

/// The outcome of a search.
#[derive(Debug)]
pub struct SearchResult {
    /// Feasible candidates, fastest first.
    pub ranked: Vec<Scored>,
    /// Infeasible candidates with their reason.
    pub infeasible: Vec<(Candidate, Infeasible)>,
    pub global_batch: u64,
}

impl SearchResult {
    pub fn best(&self) -> Option<&Scored> {
        self.ranked.first()
    }

    /// Infeasibility reasons counted by kind, most frequent first.
    pub fn infeasible_summary(&self) -> Vec<(String, usize)> {
        let mut m: BTreeMap<&'static str, usize> = BTreeMap::new();
        for (_, e) in &self.infeasible {
            let k = match e {
                Infeasible::Memory { .. } => "out of memory",
                Infeasible::Heads { .. } => "heads cannot be split",
                Infeasible::Divisibility { .. } => "context not divisible",
                Infeasible::Batch { .. } => "batch not divisible",
                Infeasible::Vision(_) => "vision stage cannot run",
            };
            *m.entry(k).or_default() += 1;
        }
        let mut v: Vec<(String, usize)> = m.into_iter().map(|(k, n)| (k.to_string(), n)).collect();
        v.sort_by_key(|x| std::cmp::Reverse(x.1));
        v
    }

    /// The memory-infeasible candidate that came closest to fitting.
    pub fn closest_memory_miss(&self) -> Option<(f64, f64)> {
        self.infeasible
            .iter()
            .filter_map(|(_, e)| match e {
                Infeasible::Memory { needed, available } => Some((*needed, *available)),
                _ => None,
            })
            .min_by(|a, b| a.0.total_cmp(&b.0))
    }
}

/// Searches all candidates of the request on a topology built for `req.gpus` GPUs.
pub fn search(
    topo: &Topology,
    model: &ModelSpec,
    req: &Request,
    mm: Option<&MultiModal>,
) -> SearchResult {
    let global_batch = req
        .global_batch
        .unwrap_or_else(|| default_global_batch(req.context));
    let w = Workload {
        model,
        context: req.context,
        global_batch,
        vision: None,
    };
    let mut ranked = Vec::new();
    let mut infeasible = Vec::new();
    let mut deferred = Vec::new();
    for c in enumerate(model, &topo.spec, req) {
        let mut w = w.clone();
        w.context = candidate_context(req.context, mm, &c.layout);
        // Cheap checks first: the vision stage is costed only for layouts that can run.
        let runnable = crate::cost::head_split(model, c.layout.tp, c.layout.ulysses).is_ok()
            && global_batch.is_multiple_of(u64::from(c.layout.dp) * u64::from(c.micro_batch));
        if let (Some(mm), true) = (mm, runnable) {
            match stage_for(topo, model, mm, &w, &c) {
                Staged::Ready(v) => w.vision = Some(v),
                Staged::Out(e) => {
                    infeasible.push((c, e));
                    continue;
                }
                Staged::BelowFloor { needed, available } => {
                    deferred.push((needed, available, c, w));
                    continue;
                }
            }
        }
        match evaluate(topo, &w, &c) {
            Ok(estimate) => ranked.push(Scored {
                candidate: c,
                estimate,
            }),
            Err(e) => infeasible.push((c, e)),
        }
    }
    if let Some(mm) = mm {
        settle_memory_misses(topo, model, mm, deferred, &mut infeasible);
    }
    ranked.sort_by(|a, b| {
        a.estimate
            .step_time_s
            .total_cmp(&b.estimate.step_time_s)
            .then(
                a.estimate
                    .memory_per_gpu_bytes
                    .total_cmp(&b.estimate.memory_per_gpu_bytes),
            )
    });
    SearchResult {
        ranked,
        infeasible,
        global_batch,
    }
}

/// A runnable candidate's vision stage, or why it cannot fit.
enum Staged {
    Ready(VisionStage),
    Out(Infeasible),
    /// Out of memory with the stage's memory floor (`needed` is the floor's, a lower bound).
    BelowFloor {
        needed: f64,
        available: f64,
    },
}

/// The vision stage of a runnable candidate, cheapest check first: out of memory with the
/// stage's memory floor ([`MultiModal::stage_memory_floor`], never above the stage's) it is
/// out of memory with the stage, and left to [`settle_memory_misses`]; out of memory with the
/// stage's exact memory ([`MultiModal::stage_memory`]: stage 1 alone, cached per SP degree) it
/// is a miss with [`search`]'s figure without stage 2 (whose zigzag ranges and re-shard enter
/// only times); otherwise the whole stage. Errors are the stage's.
fn stage_for(
    topo: &Topology,
    model: &ModelSpec,
    mm: &MultiModal,
    w: &Workload,
    c: &Candidate,
) -> Staged {
    let with = |v| Workload {
        vision: Some(v),
        ..w.clone()
    };
    let floor = with(mm.stage_memory_floor(model, &c.layout));
    if let Err(Infeasible::Memory { needed, available }) = crate::cost::terms(topo, &floor, c) {
        return Staged::BelowFloor { needed, available };
    }
    match mm.stage_memory(model, &c.layout) {
        Ok(v) => {
            if let Err(e @ Infeasible::Memory { .. }) = crate::cost::terms(topo, &with(v), c) {
                return Staged::Out(e);
            }
        }
        Err(e) => return Staged::Out(Infeasible::Vision(e.to_string())),
    }
    match mm.stage(topo, model, &c.layout, w.context) {
        Ok(v) => Staged::Ready(v),
        Err(e) => Staged::Out(Infeasible::Vision(e)),
    }
}

/// Records the candidates [`stage_for`] found out of memory with the stage's floor. Each is a
/// memory miss, and of a miss only the closest one's figure is read
/// ([`SearchResult::closest_memory_miss`]; the counts are by cause), so they are costed
/// exactly (stage 1 alone) from the lowest floor up while the floor is below the closest
/// exact miss so far; the others keep their floor as the figure, at or above that miss. So the
/// closest miss and every count are what costing each candidate gives, while a manifest of 42
/// million frames refused on 128 GPUs balances its frames for one SP degree instead of eight
/// (10 s before).
fn settle_memory_misses(
    topo: &Topology,
    model: &ModelSpec,
    mm: &MultiModal,
    mut deferred: Vec<(f64, f64, Candidate, Workload)>,
    infeasible: &mut Vec<(Candidate, Infeasible)>,
) {
    let needed = |e: &Infeasible| match e {
        Infeasible::Memory { needed, .. } => Some(*needed),
        _ => None,
    };
    deferred.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut closest = infeasible
        .iter()
        .filter_map(|(_, e)| needed(e))
        .reduce(f64::min);
    for (floor, available, c, w) in deferred {
        if closest.is_some_and(|m| floor >= m) {
            let e = Infeasible::Memory {
                needed: floor,
                available,
            };
            infeasible.push((c, e));
            continue;
        }
        let e = match mm.stage_memory(model, &c.layout) {
            Err(e) => Infeasible::Vision(e.to_string()),
            Ok(v) => {
                let w = Workload {
                    vision: Some(v),
                    ..w
                };
                match crate::cost::terms(topo, &w, &c) {
                    Err(e) => e,
                    Ok(_) => panic!("a candidate fits with its vision stage but not its floor"),
                }
            }
        };
        if let Some(n) = needed(&e) {
            closest = Some(closest.map_or(n, |m| m.min(n)));
        }
        infeasible.push((c, e));
    }
}

/// The LLM context a candidate of `layout` is costed (and planned) at: the request's, or with
/// multi-modal samples theirs, each padded for the layout's SP degree
/// ([`MultiModal::context_for`], at most the request's [`MultiModal::padded_context`]).
pub fn candidate_context(context: u64, mm: Option<&MultiModal>, layout: &Layout) -> u64 {
    // Text: padded at its end to a multiple of 2 x SP (the zigzag's chunks), as the packed
    // samples of a video plan are; the padding is costed as tokens and stated in the plan.
    let zig = 2 * u64::from(layout.sp());
    mm.map_or(context.div_ceil(zig) * zig, |m| m.context_for(layout.sp()))
}

/// The request at `context` tokens with global batch 1 unless given (what a maximum context
/// is asked for).
fn at_context(req: &Request, context: u64) -> Request {
    Request {
        context,
        global_batch: Some(req.global_batch.unwrap_or(1)),
        ..req.clone()
    }
}

/// Whether any candidate fits `context` on the topology: [`crate::cost::terms`] only (the
/// memory check and the layout's rules), stopping at the first that fits. Infeasibility is
/// decided there, never by [`crate::cost::compose`], so this agrees with a full [`search`]
/// having a ranked candidate, without pricing each layout's collectives (on 65536 GPUs each
/// new group family is a pass over every rank's route).
fn fits(topo: &Topology, model: &ModelSpec, req: &Request, context: u64) -> bool {
    let r = at_context(req, context);
    let global_batch = r.global_batch.unwrap_or(1);
    enumerate(model, &topo.spec, &r).iter().any(|c| {
        let w = Workload {
            model,
            context: candidate_context(context, None, &c.layout),
            global_batch,
            vision: None,
        };
        crate::cost::terms(topo, &w, c).is_ok()
    })
}

/// The largest context (a multiple of 2 x GPUs, so that every SP degree's zigzag chunks are
/// whole) for which some candidate fits, with the best candidate there.
pub fn max_context(topo: &Topology, model: &ModelSpec, req: &Request) -> Option<(u64, Scored)> {
    let context = max_context_tokens(topo, model, req)?;
    let best = search(topo, model, &at_context(req, context), None).ranked;
    best.into_iter().next().map(|s| (context, s))
}

/// The largest context of [`max_context`] alone (no candidate costed). Memory grows with
/// context for every candidate, so feasibility is monotone and a doubling then bisection
/// finds it.
pub fn max_context_tokens(topo: &Topology, model: &ModelSpec, req: &Request) -> Option<u64> {
    let granule = 2 * u64::from(req.gpus);
    if !fits(topo, model, req, granule) {
        return None;
    }
    let (mut lo, mut hi) = (1u64, 2u64);
    while fits(topo, model, req, hi * granule) {
        lo = hi;
        hi *= 2;
        if hi * granule > (1u64 << 40) {
            return Some(lo * granule);
        }
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(topo, model, req, mid * granule) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some(lo * granule)
}

/// The most GPUs a request may name (`--gpus`), and the most the fewest-GPUs search tries.
pub const MAX_GPUS: u32 = 65536;

/// The fewest GPUs (whole nodes and NVLink domains, by doubling, at most [`MAX_GPUS`]) on
/// which the request fits.
pub fn fewest_gpus(cluster: &ClusterSpec, model: &ModelSpec, req: &Request) -> Option<u32> {
    fewest_gpus_for(cluster, model, req, None)
}

/// [`fewest_gpus`] for a request that may carry multi-modal samples (whose padded context
/// depends on the GPU count).
pub fn fewest_gpus_for(
    cluster: &ClusterSpec,
    model: &ModelSpec,
    req: &Request,
    mm: Option<&MultiModal>,
) -> Option<u32> {
    let mut gpus = req.gpus.max(cluster.gpus_per_node);
    loop {
        gpus = gpus.saturating_mul(2);
        if gpus > MAX_GPUS {
            return None;
        }
        if cluster.check_gpus(u64::from(gpus)).is_err() {
            continue;
        }
        let topo = Topology::build(cluster, gpus);
        let context = mm.map_or(req.context, |m| m.padded_context(gpus));
        let r = Request {
            gpus,
            context,
            ..req.clone()
        };
        if fits_somewhere(&topo, model, &r, mm) {
            return Some(gpus);
        }
    }
}

/// Whether some candidate of the request fits, as [`search`] would rank one: the same
/// candidates, contexts and checks, stopping at the first that fits, deciding by
/// [`crate::cost::terms`] alone (infeasibility is decided there, never by
/// [`crate::cost::compose`]). With samples, a candidate that does not fit in memory with the
/// vision stage's memory floor ([`MultiModal::stage_memory_floor`]: the encoder's states and
/// the mean rank's frames' activations, never more than the stage costed) is ruled out without
/// balancing a frame, and the others are checked with the stage's exact memory
/// ([`MultiModal::stage_memory`]: stage 1 only; stage 2 enters only times). Costing every
/// candidate's whole stage made a manifest of enormous frames take 24 s to refuse, and stage 2
/// at the size that fits over a second.
fn fits_somewhere(
    topo: &Topology,
    model: &ModelSpec,
    req: &Request,
    mm: Option<&MultiModal>,
) -> bool {
    let global_batch = req
        .global_batch
        .unwrap_or_else(|| default_global_batch(req.context));
    enumerate(model, &topo.spec, req).iter().any(|c| {
        let w = Workload {
            model,
            context: candidate_context(req.context, mm, &c.layout),
            global_batch,
            vision: None,
        };
        let runnable = crate::cost::head_split(model, c.layout.tp, c.layout.ulysses).is_ok()
            && global_batch.is_multiple_of(u64::from(c.layout.dp) * u64::from(c.micro_batch));
        let Some(mm) = mm.filter(|_| runnable) else {
            return crate::cost::terms(topo, &w, c).is_ok();
        };
        let floor = Workload {
            vision: Some(mm.stage_memory_floor(model, &c.layout)),
            ..w.clone()
        };
        if let Err(Infeasible::Memory { .. }) = crate::cost::terms(topo, &floor, c) {
            return false;
        }
        mm.stage_memory(model, &c.layout).is_ok_and(|v| {
            let w = Workload {
                vision: Some(v),
                ..w
            };
            crate::cost::terms(topo, &w, c).is_ok()
        })
    })
}

/// Explains, in words, why a feasible plan is not the fastest: the component of its step time
/// that grew most against the best plan.
pub fn why_slower(topo: &Topology, best: &Scored, other: &Scored) -> String {
    why_slower_by(topo, best, other, None)
}

/// [`why_slower`] with the slowdown measured elsewhere (for example by the simulator), the
/// reason still read from the analytic breakdown.
pub fn why_slower_by(
    topo: &Topology,
    best: &Scored,
    other: &Scored,
    slower: Option<f64>,
) -> String {
    let (b, o) = (&best.estimate.time, &other.estimate.time);
    let l = &other.candidate.layout;
    let spans = |fam: crate::topology::GroupFamily| {
        fam.size > 1 && !topo.same_domain(0, (fam.size - 1) * fam.stride)
    };
    let items: Vec<(f64, String)> = vec![
        (
            o.ulysses_all_to_all_s - b.ulysses_all_to_all_s,
            if spans(l.ulysses_family()) {
                format!(
                    "its {}-way Ulysses all-to-all leaves the NVLink domain",
                    l.ulysses
                )
            } else {
                "more Ulysses all-to-all traffic".to_string()
            },
        ),
        (
            o.ring_exposed_s - b.ring_exposed_s,
            format!(
                "ring KV exchange ({} steps) is not hidden behind attention",
                l.ring.saturating_sub(1)
            ),
        ),
        (
            o.ring_merge_s - b.ring_merge_s,
            format!(
                "its ring's merges and fp32 accumulations ({} steps) add memory-bound work",
                l.ring.saturating_sub(1)
            ),
        ),
        (
            o.recompute_s - b.recompute_s,
            format!(
                "{} recompute repeats forward work",
                other.candidate.recompute.as_str()
            ),
        ),
        (
            (o.grad_sync_exposed_s + o.zero_gather_exposed_s)
                - (b.grad_sync_exposed_s + b.zero_gather_exposed_s),
            format!(
                "ZeRO-{} gradient/weight traffic is exposed",
                other.candidate.zero_stage
            ),
        ),
        (
            o.tp_comm_s - b.tp_comm_s,
            format!("tensor-parallel ({}-way) collectives", l.tp),
        ),
        (
            o.attention_s - b.attention_s,
            format!(
                "its attention kernels (ring {} x Ulysses {} blocks) run slower per FLOP on the kernel curve",
                l.ring, l.ulysses
            ),
        ),
        (
            (o.gemm_s + o.elementwise_s + o.head_s) - (b.gemm_s + b.elementwise_s + b.head_s),
            "more GEMM and elementwise time per step (fewer tokens per GEMM or more sequences)".to_string(),
        ),
        (
            o.optimizer_s - b.optimizer_s,
            "a larger optimizer step per GPU".to_string(),
        ),
    ];
    let mut items = items;
    items.sort_by(|a, b| b.0.total_cmp(&a.0));
    let analytic = other.estimate.step_time_s / best.estimate.step_time_s - 1.0;
    let slower = slower.unwrap_or(analytic);
    if slower < 0.005 {
        return "ties with the best (within 0.5%)".to_string();
    }
    if analytic < 0.5 * slower {
        return format!(
            "{:.0}% slower in the simulated schedule (overlap and contention); the analytic model puts it {:+.1}%",
            slower * 100.0,
            analytic * 100.0
        );
    }
    // The largest component, and the second when the first explains less than half the gap.
    let gap = analytic * best.estimate.step_time_s;
    let mut reasons = vec![format!(
        "{} (+{})",
        items[0].1,
        crate::units::fmt_secs(items[0].0.max(0.0))
    )];
    if items[0].0 < 0.5 * gap && items[1].0 > 0.0 {
        reasons.push(format!(
            "{} (+{})",
            items[1].1,
            crate::units::fmt_secs(items[1].0)
        ));
    }
    format!("{:.0}% slower: {}", slower * 100.0, reasons.join("; "))
}

/// The error to show when no candidate fits: names the nearest miss, the largest context that
/// fits on these GPUs and the fewest GPUs that would fit the request.
pub fn no_plan_error(
    topo: &Topology,
    model: &ModelSpec,
    req: &Request,
    result: &SearchResult,
) -> Error {
    no_plan_error_for(topo, model, req, result, None)
}

/// [`no_plan_error`] for a request that may carry multi-modal samples: then the largest
/// plain-text context is not named (it would not be comparable), and the fewest GPUs are
/// searched with the samples.
pub fn no_plan_error_for(
    topo: &Topology,
    model: &ModelSpec,
    req: &Request,
    result: &SearchResult,
    mm: Option<&MultiModal>,
) -> Error {
    let mut msg = format!(
        "no {} plan fits {} at {} tokens on {} {} GPUs",
        req.strategy.name(),
        model.name,
        fmt_tokens(req.context),
        req.gpus,
        topo.spec.name
    );
    if let Some((needed, avail)) = result.closest_memory_miss() {
        msg += &format!(
            ": the closest needs {} per GPU ({} available)",
            fmt_gib(needed),
            fmt_gib(avail)
        );
    } else {
        let parts: Vec<String> = result
            .infeasible_summary()
            .iter()
            .map(|(k, n)| format!("{n} {k}"))
            .collect();
        msg += &format!(": infeasible candidates: {}", parts.join(", "));
    }
    let memory = result.closest_memory_miss().is_some();
    if mm.is_some() {
        // The samples fix the context: a plain-text maximum would mislead.
    } else if let Some(ctx) = max_context_tokens(topo, model, req) {
        msg += &format!(
            "; the largest context that fits on {} GPUs is {}",
            req.gpus,
            fmt_tokens(ctx)
        );
    } else if memory {
        msg += &format!("; it does not fit on {} GPUs at any context", req.gpus);
    } else {
        msg += &format!(
            "; no context runs on {} GPUs under these constraints (not for lack of memory)",
            req.gpus
        );
    }
    if !memory {
        msg += &remedies(result, req);
    }
    match fewest_gpus_for(&topo.spec, model, req, mm) {
        Some(g) => msg += &format!("; {g} GPUs would fit {}", fmt_tokens(req.context)),
        None if memory => msg += &format!("; no cluster size up to {MAX_GPUS} GPUs fits it"),
        None => {
            msg += &format!(
                "; no cluster size up to {MAX_GPUS} GPUs plans it with this batch and strategy"
            )
        }
    }
    Error::NoFeasiblePlan(msg)
}

/// What would lift the non-memory causes that ruled candidates out, worded per cause.
fn remedies(result: &SearchResult, req: &Request) -> String {
    let mut out = String::new();
    let mut seen = std::collections::BTreeSet::new();
    for (_, e) in &result.infeasible {
        let hint = match e {
            Infeasible::Batch { global_batch, .. } => format!(
                "a global batch of {global_batch} sequences does not divide over the DP degrees \
                 tried (--global-batch a multiple of the DP degree, e.g. {})",
                req.gpus
            ),
            Infeasible::Heads {
                heads, kv_heads, ..
            } => format!(
                "tp x ulysses must divide the {heads} query heads ({kv_heads} kv heads are \
                 replicated past their count)"
            ),
            Infeasible::Divisibility { .. } => {
                let m: Vec<u64> = result
                    .infeasible
                    .iter()
                    .filter_map(|(_, e)| match e {
                        Infeasible::Divisibility { multiple, .. } => Some(*multiple),
                        _ => None,
                    })
                    .collect();
                let (lo, hi) = (
                    m.iter().min().copied().unwrap_or(2),
                    m.iter().max().copied().unwrap_or(2),
                );
                format!(
                    "zigzag sharding needs the context to be a multiple of 2 x SP ({} candidates, whose SP \
                     degrees need multiples of {lo} to {hi}; {} tokens is one of {lo})",
                    m.len(),
                    req.context.div_ceil(lo) * lo
                )
            }
            _ => continue,
        };
        let key = std::mem::discriminant(e);
        if seen.insert(format!("{key:?}")) {
            out += &format!("; {hint}");
        }
    }
    out
}

#[cfg(test)]
mod tests;
