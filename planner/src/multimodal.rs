//! Multi-modal planning (MM-SP's two stages): the frames of a step's samples are spread over
//! the sequence-parallel group to balance the vision encoder (stage 1), their embeddings are
//! re-sharded to the LLM's zigzag token shards (stage 2), and both stages' cost enters every
//! candidate of the search. Stage-1 placements are solved once per SP degree and cached.
//!
//! Stage 2 runs as mmsp-runtime's packed attention does: each sample zigzag-sharded on its own
//! into 2 x sp equal pieces, so each is padded at its end to a multiple of 2 x sp for the
//! layout being costed ([`crate::balance::sample_padding`]; no loss on the padding, and under
//! causal masking no real token attends to it, so training is exact). A candidate's LLM context
//! is the padded samples' sum ([`MultiModal::context_for`]); the plan records the padded
//! `sample_lens` and the padding of each sample (`pad_tokens_per_sample`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::balance::{
    balance_frames, frame_costs, second_stage, BalanceOptions, FrameAssignment, TwoStageBalance,
};
use crate::cost::compute::{
    attention_head_dim_padded, hbm_rate, ATTN_TRAIN_FACTOR, GEMM_TRAIN_FACTOR, GRAD_ZERO_BYTES,
    OPTIMIZER_STEP_BYTES,
};
use crate::cost::memory::{
    layer_activation_bytes_per_token, ActivationArch, GRAD_BYTES, OPTIMIZER_BYTES, WEIGHT_BYTES,
};
use crate::cost::{Layout, Recompute, VisionStage};
use crate::error::{Error, Result};
use crate::spec::cluster::ClusterSpec;
use crate::spec::model::ModelSpec;
use crate::spec::samples::Sample;
use crate::spec::vision::VisionSpec;
use crate::topology::Topology;

/// Cache key of a vision stage: (ulysses, ring, tp, world, context).
type StageKey = (u32, u32, u32, u32, u64);

/// A step's multi-modal input: the samples one SP group processes together, packed into one
/// LLM sequence, and the vision encoder that turns their frames into tokens.
pub struct MultiModal {
    pub vision: VisionSpec,
    pub samples: Vec<Sample>,
    /// LLM tokens of each sample (frames' tokens + text), in packing order, before padding.
    pub sample_lens: Vec<u64>,
    /// Train the vision encoder (forward + backward) or keep it frozen (forward only).
    pub train_vision: bool,
    /// A context fixed by the request (a campaign's `context`), at least the padded samples of
    /// every layout; the rest after them is one padding run without loss. 0: the padded
    /// samples' sum.
    min_context: u64,
    frames_cache: Mutex<HashMap<u32, Arc<FrameAssignment>>>,
    stage_cache: Mutex<HashMap<StageKey, std::result::Result<VisionStage, String>>>,
}

pub use mmsp_plan::VisionPlan;

/// The most frames one sample may hold (2^20).
pub const MAX_FRAMES_PER_SAMPLE: u64 = 1 << 20;
/// The most text tokens one sample may hold (2^40, about the 10^15-token bound of a context).
pub const MAX_TEXT_TOKENS: u64 = 1 << 40;

impl MultiModal {
    pub fn new(vision: VisionSpec, samples: Vec<Sample>, train_vision: bool) -> Result<Self> {
        // The planner keeps a record per frame (its resolution, its rank): an absurd count
        // would exhaust memory instead of being refused (the fuzz test found 2^64 - 1 frames).
        if let Some(s) = samples.iter().find(|s| s.frames > MAX_FRAMES_PER_SAMPLE) {
            return Err(Error::invalid(
                "frames",
                format!(
                    "{} frames in one sample is more than the {MAX_FRAMES_PER_SAMPLE} planned (about 11.6 hours at 25 frames per second)",
                    s.frames
                ),
            ));
        }
        if let Some(s) = samples.iter().find(|s| s.text_tokens > MAX_TEXT_TOKENS) {
            return Err(Error::invalid(
                "text_tokens",
                format!(
                    "{} text tokens in one sample is more than the {MAX_TEXT_TOKENS} planned",
                    s.text_tokens
                ),
            ));
        }
        // A frame smaller than one patch gives the encoder nothing to embed (0 patches) and the
        // costs divide by it: refused (the fuzz test found a 1 x 448 frame taking 32 s to plan).
        if let Some(s) = samples
            .iter()
            .find(|s| s.frames > 0 && vision.patches(s.resolution) == 0)
        {
            let (h, w) = s.resolution.unwrap_or_default();
            return Err(Error::invalid(
                "resolution",
                format!(
                    "a {h} x {w} frame is smaller than one {p} x {p} patch of {}: each side must be at least {p} pixels",
                    vision.name,
                    p = vision.patch_size
                ),
            ));
        }
        if samples.iter().all(|s| s.frames == 0) {
            return Err(Error::invalid(
                "--frames",
                "the samples hold no video frame",
            ));
        }
        let sample_lens = samples
            .iter()
            .map(|s| s.frames * vision.tokens_for(s.resolution) + s.text_tokens)
            .collect();
        Ok(MultiModal {
            vision,
            samples,
            sample_lens,
            train_vision,
            min_context: 0,
            frames_cache: Mutex::new(HashMap::new()),
            stage_cache: Mutex::new(HashMap::new()),
        })
    }

    /// A fixed LLM context (a campaign stage's): every layout's padded samples, then padding up
    /// to `context` (a multiple of 2 x the GPUs, so of 2 x every SP degree).
    pub fn with_context(mut self, context: u64) -> Self {
        self.min_context = context;
        self
    }

    /// Tokens of the packed LLM sequence, unpadded.
    pub fn tokens(&self) -> u64 {
        self.sample_lens.iter().sum()
    }

    /// Padding at the end of each sample for a layout of SP degree `sp`.
    pub fn pad_tokens(&self, sp: u32) -> Vec<u64> {
        self.sample_lens
            .iter()
            .map(|&l| crate::balance::sample_padding(l, u64::from(sp)))
            .collect()
    }

    /// The LLM context of a layout of SP degree `sp`: every sample padded to a multiple of
    /// 2 x sp, summed (or the fixed context, [`Self::with_context`], when longer).
    pub fn context_for(&self, sp: u32) -> u64 {
        let padded: u64 = self.tokens() + self.pad_tokens(sp).iter().sum::<u64>();
        padded.max(self.min_context)
    }

    /// The request's LLM context on `gpus` GPUs: the samples padded for the largest SP degree,
    /// `gpus` (every layout's [`Self::context_for`] is at most this). Each candidate is costed
    /// at its own layout's.
    pub fn padded_context(&self, gpus: u32) -> u64 {
        self.context_for(gpus)
    }

    fn frames(&self, sp: u32, opts: &BalanceOptions) -> Result<Arc<FrameAssignment>> {
        if let Some(f) = self
            .frames_cache
            .lock()
            .ok()
            .and_then(|c| c.get(&sp).cloned())
        {
            return Ok(f);
        }
        let f = Arc::new(balance_frames(
            &frame_costs(&self.samples, &self.vision)?,
            sp as usize,
            opts,
        )?);
        if let Ok(mut c) = self.frames_cache.lock() {
            c.insert(sp, f.clone());
        }
        Ok(f)
    }

    /// Both stages for a Ulysses x ring split; `exact` runs the MILP (for the final plan), else
    /// LPT with local search only (for the search).
    pub fn balance(
        &self,
        model: &ModelSpec,
        ulysses: u32,
        ring: u32,
        exact: bool,
    ) -> Result<TwoStageBalance> {
        let opts = BalanceOptions {
            use_milp: exact,
            ..BalanceOptions::default()
        };
        let frames = if exact {
            balance_frames(
                &frame_costs(&self.samples, &self.vision)?,
                (ulysses * ring) as usize,
                &opts,
            )?
        } else {
            FrameAssignment::clone(self.frames(ulysses * ring, &opts)?.as_ref())
        };
        second_stage(
            &self.samples,
            &self.vision,
            frames,
            ulysses as usize,
            ring as usize,
            model.hidden_size,
        )
    }

    /// The cost of the vision stage and of the re-shard for a layout (cached per split).
    ///
    /// - Encoder: the slowest rank's encoder and projector, forward and backward (forward only
    ///   if frozen), as mmsp-runtime runs them ([`encoder_time`]): GEMMs at the calibrated GEMM
    ///   curve, attention at the calibrated attention curve with its head dimension padded to
    ///   the kernel's, and the memory-bound kernels as bytes at the calibrated bandwidth.
    /// - Re-shard: each rank sends the embeddings of its frames that the zigzag assigns
    ///   elsewhere, an all-to-all-v over the SP group, costed as an all-to-all of the busiest
    ///   rank's bytes; its mirror carries the embedding gradients back when training.
    /// - Attention: packed samples attend within themselves, so attention work is
    ///   sum(len^2) / S^2 of one sequence of S tokens, times the zigzag's measured imbalance.
    /// - Memory: the encoder's model states as the runtime keeps them (replicated, whatever the
    ///   decoder's ZeRO stage) and its activations for the rank's frames (Korthikanti-style
    ///   accounting, GeLU MLP, FlashAttention; the runtime's encoder never recomputes).
    ///
    /// Every ZeRO stage runs a vision section (under ZeRO-3 the runtime gathers the decoder's
    /// embedding table for the text rows' lookup, `Trainer::embed_ids`); the encoder's own
    /// states are replicated whatever the stage.
    pub fn stage(
        &self,
        topo: &Topology,
        model: &ModelSpec,
        layout: &Layout,
        context: u64,
    ) -> std::result::Result<VisionStage, String> {
        let key = (layout.ulysses, layout.ring, layout.tp, topo.world, context);
        let base = match self
            .stage_cache
            .lock()
            .ok()
            .and_then(|c| c.get(&key).cloned())
        {
            Some(s) => s,
            None => {
                let s = self
                    .stage_uncached(topo, model, layout, context)
                    .map_err(|e| e.to_string());
                if let Ok(mut c) = self.stage_cache.lock() {
                    c.insert(key, s.clone());
                }
                s
            }
        }?;
        Ok(base)
    }

    fn stage_uncached(
        &self,
        topo: &Topology,
        model: &ModelSpec,
        layout: &Layout,
        context: u64,
    ) -> Result<VisionStage> {
        let b = self.balance(model, layout.ulysses, layout.ring, false)?;
        let enc = self.slowest_encoder(&topo.spec, model, &b);
        let reshard_s = reshard_time(topo, layout, &b);
        let all_params = self.encoder_params(model);
        Ok(VisionStage {
            encoder_s: enc.total(),
            gather_s: if self.train_vision { reshard_s } else { 0.0 },
            reshard_s,
            memory_bytes: self.encoder_activation_bytes(&b),
            states_bytes: self.encoder_states_bytes(all_params),
            attention_scale: packed_attention_share(context, &b.sample_lens)
                * b.attention_imbalance,
            encoder_gemm_s: enc.gemm_s,
            encoder_attention_s: enc.attention_s,
            encoder_memory_bound_s: enc.memory_s,
            // Its AdamW (fused, as the decoder's) and gradient zeroing over every parameter,
            // once per step (`VisionRank::step`; 14.6 ms measured for so400m + projector on an
            // H100 with the phase's synchronisations,
            // runtime/bench/results/h100-sxm-x4/raw/h100x4_runG/vlm.json).
            encoder_optimizer_s: if self.train_vision {
                let bytes = all_params * (OPTIMIZER_STEP_BYTES + GRAD_ZERO_BYTES);
                bytes / hbm_rate(&topo.spec, bytes)
            } else {
                0.0
            },
        })
    }

    /// The encoder time of the rank with the slowest frames: every rank encodes its frames and
    /// the stage waits for the slowest.
    fn slowest_encoder(
        &self,
        spec: &ClusterSpec,
        model: &ModelSpec,
        b: &TwoStageBalance,
    ) -> EncoderTime {
        let resolutions = self.frame_resolutions();
        b.frames
            .frames_per_rank
            .iter()
            .map(|frames| {
                let res: Vec<Option<(u32, u32)>> = frames.iter().map(|&f| resolutions[f]).collect();
                encoder_time(
                    spec,
                    &self.vision,
                    model.hidden_size,
                    &res,
                    self.train_vision,
                )
            })
            .max_by(|a, b| a.total().total_cmp(&b.total()))
            .unwrap_or_default()
    }

    /// A lower bound of the vision stage's memory on a layout, without balancing a frame:
    /// `memory_bytes` is the encoder activations of the mean rank's frames, ceil(F / sp) of the
    /// F frames (stage 1 gives every frame to one of the sp = ulysses x ring ranks, so the
    /// busiest holds at least the mean, and [`Self::stage`] counts the busiest's frames, each at
    /// the same bytes); `states_bytes` is the encoder's states exactly (they do not depend on the
    /// layout). Every time is 0 and the attention scale 1: only the memory check may use it.
    /// The fewest-GPUs search rules a candidate out on it before costing the stage, whose
    /// balancing over tens of thousands of ranks made a large manifest's refusal take seconds.
    pub fn stage_memory_floor(&self, model: &ModelSpec, layout: &Layout) -> VisionStage {
        let frames: u64 = self.samples.iter().map(|s| s.frames).sum();
        let per_rank = frames.div_ceil(u64::from(layout.sp().max(1)));
        VisionStage {
            memory_bytes: self.activation_bytes_of(per_rank as f64),
            states_bytes: self.encoder_states_bytes(self.encoder_params(model)),
            attention_scale: 1.0,
            ..VisionStage::default()
        }
    }

    /// The vision stage's memory on a layout exactly as [`Self::stage`] counts it (the busiest
    /// rank's frames after stage-1 balancing, cached per SP degree, and the encoder's states),
    /// without stage 2 (the zigzag ranges, the re-shard and the attention imbalance, which
    /// enter only times). Every time is 0 and the attention scale 1: only the memory check may
    /// use it. The fewest-GPUs search asks only whether a candidate fits, and stage 2 over
    /// tens of thousands of ranks cut each sample into a range per rank.
    pub fn stage_memory(&self, model: &ModelSpec, layout: &Layout) -> Result<VisionStage> {
        let opts = BalanceOptions {
            use_milp: false,
            ..BalanceOptions::default()
        };
        let frames = self.frames(layout.ulysses * layout.ring, &opts)?;
        let frames_max = frames.frames_per_rank.iter().map(Vec::len).max();
        Ok(VisionStage {
            memory_bytes: self.activation_bytes_of(frames_max.unwrap_or(0) as f64),
            states_bytes: self.encoder_states_bytes(self.encoder_params(model)),
            attention_scale: 1.0,
            ..VisionStage::default()
        })
    }

    /// Activation bytes of the encoder on the rank with the most frames.
    fn encoder_activation_bytes(&self, b: &TwoStageBalance) -> f64 {
        let frames_max = b
            .frames
            .frames_per_rank
            .iter()
            .map(Vec::len)
            .max()
            .unwrap_or(0) as f64;
        self.activation_bytes_of(frames_max)
    }

    /// Activation bytes of the encoder on a rank of `frames_max` frames.
    fn activation_bytes_of(&self, frames_max: f64) -> f64 {
        let v = &self.vision;
        let arch = ActivationArch {
            hidden: v.hidden_size as f64,
            q_dim: v.hidden_size as f64,
            kv_dim: v.hidden_size as f64,
            ffn: v.intermediate_size as f64,
            heads: f64::from(v.num_heads),
            swiglu: false,
            dropout: false,
            flash: true,
        };
        let patches = v.patches(None) as f64;
        // A frozen encoder keeps nothing for backward but one layer's working set; a trained one
        // keeps all its activations (the runtime's encoder runs under plain autograd, with no
        // recompute: `runtime/src/vision/encoder.rs`).
        if self.train_vision {
            frames_max
                * patches
                * f64::from(v.num_layers)
                * layer_activation_bytes_per_token(&arch, patches, 1.0, Recompute::None)
        } else {
            frames_max
                * patches
                * layer_activation_bytes_per_token(&arch, patches, 1.0, Recompute::None)
        }
    }

    /// Parameters of the encoder and its projector into the LLM's hidden size.
    fn encoder_params(&self, model: &ModelSpec) -> f64 {
        (self.vision.params() + self.vision.projector_params(model.hidden_size)) as f64
    }

    /// Model states of the encoder and projector (`all_params` parameters) as the runtime keeps
    /// them (`runtime/src/train/run/vision_rank.rs`): fp32 weights on every rank and, when
    /// trained, an unsharded AdamW (fp32 gradients and two moments, `AdamW::new` with no
    /// group), whatever the decoder's ZeRO stage; plus the 16-bit casts of the weights that
    /// the forward makes and autograd keeps for backward.
    fn encoder_states_bytes(&self, all_params: f64) -> f64 {
        let master = OPTIMIZER_BYTES / 3.0;
        if self.train_vision {
            all_params * (master + GRAD_BYTES + 2.0 * master + WEIGHT_BYTES)
        } else {
            all_params * master
        }
    }

    /// The resolution of every frame, in global frame order (sample by sample).
    fn frame_resolutions(&self) -> Vec<Option<(u32, u32)>> {
        self.samples
            .iter()
            .flat_map(|s| std::iter::repeat_n(s.resolution, s.frames as usize))
            .collect()
    }

    /// Records both stages (MILP-balanced) for the plan's chosen candidate in the plan:
    /// `vision` (frames per rank) and the stage-2 `tokens.ranges_per_rank`.
    pub fn attach(
        &self,
        plan: &mut crate::plan::Plan,
        topo: &Topology,
        model: &ModelSpec,
        c: &crate::cost::Candidate,
    ) -> Result<()> {
        let (vp, ranges) = self.plan(topo, model, &c.layout, plan.context_tokens)?;
        plan.vision = Some(vp);
        plan.tokens.ranges_per_rank = ranges;
        Ok(())
    }

    /// The plan's record of both stages for the chosen layout (MILP-balanced).
    pub fn plan(
        &self,
        topo: &Topology,
        model: &ModelSpec,
        layout: &Layout,
        context: u64,
    ) -> Result<(VisionPlan, Vec<Vec<[u64; 2]>>)> {
        let b = self.balance(model, layout.ulysses, layout.ring, true)?;
        let stage = self
            .stage(topo, model, layout, context)
            .map_err(|e| Error::invalid("vision stage", e))?;
        let ranges = b
            .ranges_per_rank
            .iter()
            .map(|v| v.iter().map(|&(a, z)| [a, z]).collect())
            .collect();
        Ok((
            VisionPlan {
                encoder: self.vision.name.clone(),
                tokens_per_frame: self.vision.tokens_per_frame,
                frames: self.samples.iter().map(|s| s.frames).sum(),
                samples: self.samples.len() as u64,
                sample_lens: b.sample_lens.clone(),
                pad_tokens_per_sample: Some(b.pad_tokens_per_sample.clone()),
                frames_per_sample: Some(self.samples.iter().map(|s| s.frames).collect()),
                text_tokens_per_sample: Some(self.samples.iter().map(|s| s.text_tokens).collect()),
                train_vision: self.train_vision,
                frames_per_rank: b.frames.frames_per_rank.clone(),
                encoder_imbalance_before: b.frames.imbalance_before,
                encoder_imbalance_after: b.frames.imbalance_after,
                balance_method: format!("{:?}", b.frames.method).to_lowercase(),
                solver: b.frames.solver.to_string(),
                solve_time_s: b.frames.solve_time_s,
                attention_imbalance: b.attention_imbalance,
                reshard_bytes: b.reshard.total_bytes,
                stage,
            },
            ranges,
        ))
    }
}

/// The re-shard's time: the SP group is a block of sp ranks, tp apart, in either placement.
/// The exchange is an all-to-all-v bounded by each rank's injection bandwidth (Thakur,
/// Rabenseifner & Gropp 2005, all-to-all cost ~ n * m / bandwidth per process): the share of
/// the busiest rank's bytes bound for ranks in its own fabric domain goes over the fabric, the
/// rest over the NIC.
fn reshard_time(topo: &Topology, layout: &Layout, b: &TwoStageBalance) -> f64 {
    let n = layout.sp();
    let busiest = b
        .reshard
        .send_bytes_per_rank
        .iter()
        .zip(&b.reshard.recv_bytes_per_rank)
        .map(|(s, r)| (*s).max(*r))
        .max()
        .unwrap_or(0) as f64;
    if n > 1 {
        topo.spread_exchange_time(n, layout.tp, busiest)
    } else {
        0.0
    }
}

/// Attention work of packed samples as a share of one sequence of `context` tokens:
/// sum(len^2) / S^2 over the padded samples and the padding run up to `context`.
fn packed_attention_share(context: u64, sample_lens: &[u64]) -> f64 {
    let s2 = (context as f64).powi(2);
    let padded: u64 = sample_lens.iter().sum();
    let sum_sq: f64 = sample_lens
        .iter()
        .chain(std::iter::once(&context.saturating_sub(padded)))
        .map(|&l| (l as f64).powi(2))
        .sum();
    sum_sq / s2
}

/// Where one rank's encoder time goes (seconds, forward and backward when trained).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EncoderTime {
    pub gemm_s: f64,
    pub attention_s: f64,
    pub memory_s: f64,
}

impl EncoderTime {
    pub fn total(&self) -> f64 {
        self.gemm_s + self.attention_s + self.memory_s
    }
}

/// Bytes per parameter of the encoder's weight casts in one step: mmsp-runtime's encoder keeps
/// fp32 weights and casts each to the 16-bit compute dtype where the forward uses it (read 4,
/// write 2: `runtime/src/vision/encoder.rs`, `p`); in backward the cast's gradient is widened
/// back to fp32 (read 2, write 4) and accumulated into the fp32 gradient (read 4 + 4, write 4).
const CAST_BYTES_FWD: f64 = 4.0 + WEIGHT_BYTES;
const CAST_BYTES_BWD: f64 = (WEIGHT_BYTES + GRAD_BYTES) + 3.0 * GRAD_BYTES;

/// The time of one rank's vision encoder and projector over its `frames` (one resolution per
/// frame; `None` = native) into an LLM of hidden size `llm`, trained (forward + backward) or
/// frozen (forward), as mmsp-runtime runs them (`runtime/src/vision/encoder.rs`: the rank's
/// frames in one batch per resolution; `runtime/src/vision/stage.rs`):
///
/// - GEMMs ([`VisionSpec::gemm_flops_fwd`]) at the calibrated GEMM curve for the call's rows
///   (the rank's patches; the projector's LLM tokens): 3 x forward when trained (dX and dW,
///   [`GEMM_TRAIN_FACTOR`]), 2 x for the patch embedding (its input, the pixels, needs no
///   gradient);
/// - attention ([`VisionSpec::attention_flops_fwd`], bidirectional over each frame's patches)
///   at the calibrated attention curve for one call of frames x heads over the frame's patches,
///   at the head dimension the kernel computes with ([`attention_head_dim_padded`]: 72 runs as
///   128), 3.5 x forward when trained ([`ATTN_TRAIN_FACTOR`]);
/// - the memory-bound kernels (LayerNorms, the copies the runtime's layouts need, residual adds,
///   GELU, bias gradients, gradient sums: [`VisionSpec::layer_memory_bytes_per_patch`] and the
///   embedding's and projector's) and the weight casts, as bytes at the calibrated HBM bandwidth
///   of their calls ([`hbm_rate`]).
///
/// Measured on an H100 for 16 SigLIP so400m frames (a replica of the runtime's encoder through
/// the same libtorch kernels reproduced the runtime's 37.7 + 72.7 ms), the kernels took 43 ms
/// in GEMMs, 16 ms in attention and 44 ms in memory-bound kernels: the last run at 0.5 to
/// 1.5 TB/s, below the copy bandwidth the calibration measures (strided copies and adds on the
/// transposed residual stream, column sums for the bias gradients), which this model does not
/// capture.
pub fn encoder_time(
    spec: &ClusterSpec,
    v: &VisionSpec,
    llm: u64,
    frames: &[Option<(u32, u32)>],
    train: bool,
) -> EncoderTime {
    let mut out = EncoderTime::default();
    if frames.is_empty() {
        return out;
    }
    let mut groups: std::collections::BTreeMap<Option<(u32, u32)>, f64> = Default::default();
    for r in frames {
        *groups.entry(*r).or_default() += 1.0;
    }
    let h = v.hidden_size as f64;
    let d = v.head_dim() as f64;
    let pad = attention_head_dim_padded(v.head_dim()) as f64 / d;
    let (gemm_x, patch_x, attn_x) = if train {
        (GEMM_TRAIN_FACTOR, 2.0, ATTN_TRAIN_FACTOR)
    } else {
        (1.0, 1.0, 1.0)
    };
    let (layer_fwd, layer_bwd) = v.layer_memory_bytes_per_patch();
    let (emb_fwd, emb_bwd) = v.embed_memory_bytes_per_patch();
    let (proj_fwd, proj_bwd) = v.projector_memory_bytes_per_token(llm);
    let layers = f64::from(v.num_layers);
    for (res, count) in groups {
        let patches = v.patches(res) as f64;
        let rows = count * patches;
        let tokens = count * v.tokens_for(res) as f64;
        let (g_layers, g_patch, g_proj) = v.gemm_flops_fwd(res, llm);
        out.gemm_s += count * (gemm_x * g_layers + patch_x * g_patch) / spec.gemm_rate(rows)
            + count * gemm_x * g_proj / spec.gemm_rate(tokens);
        let heads = count * f64::from(v.num_heads);
        out.attention_s += attn_x * count * v.attention_flops_fwd(res) * pad
            / spec.attention_rate(heads, patches, false);
        let (lb, eb, pb) = if train {
            (
                layer_fwd + layer_bwd,
                emb_fwd + emb_bwd,
                proj_fwd + proj_bwd,
            )
        } else {
            (layer_fwd, emb_fwd, proj_fwd)
        };
        let bytes = rows * (layers * lb + eb) + tokens * pb;
        // At the bandwidth of a residual add over the call's patches (read two, write one).
        out.memory_s += bytes / hbm_rate(spec, rows * 3.0 * h * 2.0);
    }
    // The weight casts, once per step, each the size of a weight matrix on average.
    let params = (v.params() + v.projector_params(llm)) as f64;
    let per_param = if train {
        CAST_BYTES_FWD + CAST_BYTES_BWD
    } else {
        CAST_BYTES_FWD
    };
    let matrix = v.layer_matmul_params() as f64 / 6.0 * CAST_BYTES_FWD;
    out.memory_s += params * per_param / hbm_rate(spec, matrix);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::Placement;

    /// The 4 x H100 bench with its kernel calibration (runtime/tests/data/h100-4gpu.toml,
    /// runtime/tests/data/h100-sxm-2layer.json) and the 2-layer llama3-8b shape.
    fn bench4() -> (Topology, ModelSpec) {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../runtime/tests/data/");
        let mut c = ClusterSpec::load(&format!("{dir}h100-4gpu.toml")).unwrap();
        let cal =
            crate::calibration::Calibration::load(&format!("{dir}h100-sxm-2layer.json")).unwrap();
        c.calibration = Some(std::sync::Arc::new(cal));
        (
            Topology::build(&c, 4),
            crate::spec::model::load(&format!("{dir}llama3-8b-2layer.json")).unwrap(),
        )
    }

    fn vlm(train: bool) -> MultiModal {
        // runtime/bench/inputs/vlm_samples.jsonl
        let samples = vec![Sample::uniform(32, 512), Sample::uniform(32, 256)];
        MultiModal::new(VisionSpec::preset("siglip-so400m").unwrap(), samples, train).unwrap()
    }

    const LAYOUT: Layout = Layout {
        ulysses: 2,
        ring: 2,
        dp: 1,
        tp: 1,
        placement: Placement::UlyssesInner,
    };

    /// Measured on 4 x H100 (runtime/bench/results/h100-sxm-x4/raw/
    /// h100x4_run3_zero3_vlm_faults.log, plan runtime/tests/data/plan4_vlm.json: 2x2, 16 frames
    /// per rank): the slowest rank's encoder +
    /// projector took 37.9 ms forward and 73.0 ms backward, 110.8 ms; the planner said 49.1 ms
    /// when it costed the encoder as GEMM FLOPs alone (3 x forward, attention included, at the
    /// GEMM rate).
    #[test]
    fn measured_vlm_encoder_time() {
        let (t, m) = bench4();
        let mm = vlm(true);
        let s = mm.stage(&t, &m, &LAYOUT, mm.padded_context(4)).unwrap();
        let sum = s.encoder_gemm_s + s.encoder_attention_s + s.encoder_memory_bound_s;
        assert!((s.encoder_s - sum).abs() < 1e-12);
        assert!(
            (0.075..0.12).contains(&s.encoder_s),
            "encoder {} s (measured 0.1108)",
            s.encoder_s
        );
        // Attention at the kernel's head dimension, 128 for 72: FlashAttention-2 counting
        // (3.5 x forward) at the calibrated attention curve for 16 frames x 16 heads.
        let v = &mm.vision;
        let rate = t.spec.attention_rate(16.0 * 16.0, 729.0, false);
        let want = 3.5 * 16.0 * v.attention_flops_fwd(None) * 128.0 / 72.0 / rate;
        assert!((s.encoder_attention_s - want).abs() / want < 1e-9);
        // The memory-bound kernels are a large share, as in the measured kernel profile.
        assert!(s.encoder_memory_bound_s > 0.2 * s.encoder_s);
    }

    #[test]
    fn frozen_encoder_runs_forward_only() {
        let (t, m) = bench4();
        let frames = vec![None; 16];
        let v = VisionSpec::preset("siglip-so400m").unwrap();
        let train = encoder_time(&t.spec, &v, m.hidden_size, &frames, true);
        let frozen = encoder_time(&t.spec, &v, m.hidden_size, &frames, false);
        assert!((train.attention_s / frozen.attention_s - 3.5).abs() < 1e-9);
        let g = train.gemm_s / frozen.gemm_s;
        assert!(g > 2.99 && g < 3.0, "{g}");
        assert!(frozen.memory_s < train.memory_s / 3.0);
        assert_eq!(
            encoder_time(&t.spec, &v, m.hidden_size, &[], true),
            EncoderTime::default()
        );
    }

    /// The stage's memory floor never exceeds the stage costed: on every SP degree of 16 GPUs,
    /// uneven samples (odd frame counts, mixed resolutions), trained and frozen; and with it the
    /// candidate's whole memory stays at or below the memory with the stage.
    #[test]
    fn stage_memory_floor_is_a_lower_bound() {
        let c = ClusterSpec::load("dgx-h100").unwrap();
        let t = Topology::build(&c, 16);
        let m = crate::spec::model::load("llama3-8b").unwrap();
        let samples = vec![
            Sample::uniform(33, 700),
            Sample {
                resolution: Some((224, 224)),
                ..Sample::uniform(7, 90)
            },
            Sample::uniform(1, 5),
        ];
        for train in [true, false] {
            let v = VisionSpec::preset("siglip-so400m").unwrap();
            let mm = MultiModal::new(v, samples.clone(), train).unwrap();
            for (u, r) in [(1, 1), (1, 2), (2, 1), (2, 4), (4, 4), (8, 2), (1, 16)] {
                let layout = Layout {
                    ulysses: u,
                    ring: r,
                    dp: 16 / (u * r),
                    ..LAYOUT
                };
                let ctx = mm.context_for(layout.sp());
                let full = mm.stage(&t, &m, &layout, ctx).unwrap();
                let floor = mm.stage_memory_floor(&m, &layout);
                assert!(floor.memory_bytes > 0.0 && floor.memory_bytes <= full.memory_bytes);
                assert_eq!(floor.states_bytes, full.states_bytes);
                // The memory without stage 2 is the stage's, exactly.
                let exact = mm.stage_memory(&m, &layout).unwrap();
                assert_eq!(
                    (exact.memory_bytes, exact.states_bytes),
                    (full.memory_bytes, full.states_bytes),
                    "{u}x{r} train {train}"
                );
                let c = crate::cost::Candidate {
                    layout,
                    zero_stage: 3,
                    recompute: Recompute::None,
                    micro_batch: 1,
                };
                let w = |vision| crate::cost::Workload {
                    model: &m,
                    context: ctx,
                    global_batch: u64::from(layout.dp),
                    vision: Some(vision),
                };
                let mem = |vision| {
                    crate::cost::terms_any_memory(&t, &w(vision), &c)
                        .unwrap()
                        .memory
                        .total_bytes
                };
                assert!(mem(floor) <= mem(full), "{u}x{r} train {train}");
            }
        }
    }

    /// The runtime keeps the encoder's fp32 weights, gradients and AdamW moments on every rank
    /// (plus the forward's 16-bit casts), under every ZeRO stage of the decoder.
    #[test]
    fn encoder_states_and_stages_as_the_runtime_runs_them() {
        let (t, m) = bench4();
        let ctx = vlm(true).padded_context(4);
        let params = 448_656_240.0;
        let s = vlm(true).stage(&t, &m, &LAYOUT, ctx).unwrap();
        assert_eq!(s.states_bytes, params * (4.0 + 4.0 + 8.0 + 2.0));
        let f = vlm(false).stage(&t, &m, &LAYOUT, ctx).unwrap();
        assert_eq!(f.states_bytes, params * 4.0);
    }

    /// Each candidate's context is its layout's padded samples; the plan records the padded
    /// lengths, the padding and ranges over them, which sum to the context.
    #[test]
    fn samples_padded_for_the_layout_make_the_context() {
        let (t, m) = bench4();
        let v = VisionSpec::preset("siglip-so400m").unwrap();
        let mm =
            MultiModal::new(v, vec![Sample::uniform(2, 7), Sample::uniform(3, 5)], true).unwrap();
        assert_eq!(mm.tokens(), 399 + 593);
        assert_eq!(mm.pad_tokens(4), vec![1, 7]);
        assert_eq!(mm.context_for(4), 1000);
        assert_eq!(mm.context_for(2), 400 + 596);
        assert_eq!(mm.context_for(1), 400 + 594);
        assert_eq!(mm.padded_context(4), mm.context_for(4));
        let (vp, ranges) = mm.plan(&t, &m, &LAYOUT, 1000).unwrap();
        assert_eq!(vp.sample_lens, vec![400, 600]);
        assert_eq!(vp.pad_tokens_per_sample, Some(vec![1, 7]));
        assert_eq!(vp.text_tokens_per_sample, Some(vec![7, 5]));
        let mut all: Vec<[u64; 2]> = ranges.into_iter().flatten().collect();
        all.sort_unstable();
        assert_eq!(all.first().unwrap()[0], 0);
        assert_eq!(all.last().unwrap()[1], 1000);
        assert!(all.windows(2).all(|w| w[0][1] == w[1][0]));
        // A fixed, longer context (a campaign's) keeps the padded samples and pads after them.
        let fixed = MultiModal::new(
            VisionSpec::preset("siglip-so400m").unwrap(),
            vec![Sample::uniform(2, 7)],
            true,
        )
        .unwrap()
        .with_context(1024);
        assert_eq!(fixed.context_for(4), 1024);
    }
}
