//! Multi-modal planning (MM-SP's two stages): the frames of a step's samples are spread over
//! the sequence-parallel group to balance the vision encoder (stage 1), their embeddings are
//! re-sharded to the LLM's zigzag token shards (stage 2), and both stages' cost enters every
//! candidate of the search. Stage-1 placements are solved once per SP degree and cached.

use std::collections::HashMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::balance::{
    balance_frames, frame_costs, second_stage, BalanceOptions, FrameAssignment, TwoStageBalance,
};
use crate::cost::memory::{layer_activation_bytes_per_token, model_states, ActivationArch};
use crate::cost::{Layout, Recompute, VisionStage};
use crate::error::{Error, Result};
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
    /// LLM tokens of each sample (frames' tokens + text), in packing order.
    pub sample_lens: Vec<u64>,
    /// Train the vision encoder (forward + backward) or keep it frozen (forward only).
    pub train_vision: bool,
    frames_cache: Mutex<HashMap<u32, FrameAssignment>>,
    stage_cache: Mutex<HashMap<StageKey, std::result::Result<VisionStage, String>>>,
}

/// Stage 1 and 2 as they go into the plan, for the runtime to execute exactly this split.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VisionPlan {
    pub encoder: String,
    pub tokens_per_frame: u64,
    pub frames: u64,
    pub samples: u64,
    pub sample_lens: Vec<u64>,
    /// Frames of each sample, in packing order (absent in plans of older planners).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frames_per_sample: Option<Vec<u64>>,
    /// Text tokens of each sample, in packing order (absent in plans of older planners).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_tokens_per_sample: Option<Vec<u64>>,
    pub train_vision: bool,
    /// Stage 1: global frame indices per SP rank (the same in every DP replica).
    pub frames_per_rank: Vec<Vec<usize>>,
    pub encoder_imbalance_before: f64,
    pub encoder_imbalance_after: f64,
    pub balance_method: String,
    pub solver: String,
    pub solve_time_s: f64,
    /// Stage 2: causal attention work max / mean over SP ranks.
    pub attention_imbalance: f64,
    pub reshard_bytes: u64,
    pub stage: VisionStage,
}

impl MultiModal {
    pub fn new(vision: VisionSpec, samples: Vec<Sample>, train_vision: bool) -> Result<Self> {
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
            frames_cache: Mutex::new(HashMap::new()),
            stage_cache: Mutex::new(HashMap::new()),
        })
    }

    /// Tokens of the packed LLM sequence.
    pub fn tokens(&self) -> u64 {
        self.sample_lens.iter().sum()
    }

    /// The LLM context used for costing: the packed tokens rounded up to a multiple of
    /// 2 x `gpus`, so every SP degree's zigzag chunks are whole (at most 2 x gpus padding).
    pub fn padded_context(&self, gpus: u32) -> u64 {
        let g = 2 * u64::from(gpus);
        self.tokens().div_ceil(g) * g
    }

    fn frames(&self, sp: u32, opts: &BalanceOptions) -> Result<FrameAssignment> {
        if let Some(f) = self
            .frames_cache
            .lock()
            .ok()
            .and_then(|c| c.get(&sp).cloned())
        {
            return Ok(f);
        }
        let f = balance_frames(
            &frame_costs(&self.samples, &self.vision)?,
            sp as usize,
            opts,
        )?;
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
            self.frames(ulysses * ring, &opts)?
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
    /// - Encoder: the most loaded rank's training FLOPs (3 x forward; 1 x if frozen) at the
    ///   GPU's GEMM throughput (a ViT is GEMM-bound: Dosovitskiy et al. 2021).
    /// - Re-shard: each rank sends the embeddings of its frames that the zigzag assigns
    ///   elsewhere, an all-to-all-v over the SP group, costed as an all-to-all of the busiest
    ///   rank's bytes; its mirror carries the embedding gradients back when training.
    /// - Attention: packed samples attend within themselves, so attention work is
    ///   sum(len^2) / S^2 of one sequence of S tokens, times the zigzag's measured imbalance.
    /// - Memory: the encoder's model states (same ZeRO stage) and its activations for the
    ///   rank's frames (Korthikanti-style accounting, GeLU MLP, FlashAttention).
    pub fn stage(
        &self,
        topo: &Topology,
        model: &ModelSpec,
        layout: &Layout,
        zero_stage: u8,
        recompute: Recompute,
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
        // Model states depend on the ZeRO stage and shards: added per candidate.
        let v = &self.vision;
        let params = v.params() as f64;
        let per_layer = v.params_per_layer() as f64;
        let shards = f64::from(layout.grad_family().size);
        let (w, g, o) = model_states(params, per_layer, zero_stage, shards);
        let states = if self.train_vision { w + g + o } else { w };
        // The encoder follows the candidate's recompute policy: with any recompute it keeps
        // only its layer inputs and runs its forward again in backward (4 x forward, not 3).
        // `states_bytes` of the cached base holds the recomputed activation size.
        let (memory_bytes, encoder_s) = if recompute != Recompute::None && self.train_vision {
            (base.states_bytes, base.encoder_s * 4.0 / 3.0)
        } else {
            (base.memory_bytes, base.encoder_s)
        };
        Ok(VisionStage {
            memory_bytes,
            encoder_s,
            states_bytes: states,
            ..base
        })
    }

    fn stage_uncached(
        &self,
        topo: &Topology,
        model: &ModelSpec,
        layout: &Layout,
        context: u64,
    ) -> Result<VisionStage> {
        let b = self.balance(model, layout.ulysses, layout.ring, false)?;
        let spec = &topo.spec;
        let max_load = b.frames.load_per_rank.iter().copied().fold(0.0, f64::max);
        let train_factor = if self.train_vision { 1.0 } else { 1.0 / 3.0 };
        let frames_max = b
            .frames
            .frames_per_rank
            .iter()
            .map(Vec::len)
            .max()
            .unwrap_or(0) as f64;
        let encoder_s =
            max_load * train_factor / spec.gemm_rate(frames_max * self.vision.patches(None) as f64);
        let n = layout.sp();
        let busiest = b
            .reshard
            .send_bytes_per_rank
            .iter()
            .zip(&b.reshard.recv_bytes_per_rank)
            .map(|(s, r)| (*s).max(*r))
            .max()
            .unwrap_or(0) as f64;
        // The SP group is a block of sp ranks, tp apart, in either placement. The exchange is
        // an all-to-all-v bounded by each rank's injection bandwidth (Thakur, Rabenseifner &
        // Gropp 2005, all-to-all cost ~ n * m / bandwidth per process): the share of its bytes
        // bound for ranks in its own fabric domain goes over the fabric, the rest over the NIC.
        let reshard_s = if n > 1 {
            topo.spread_exchange_time(n, layout.tp, busiest)
        } else {
            0.0
        };
        let s2 = (context as f64).powi(2);
        let sum_sq: f64 = self.sample_lens.iter().map(|&l| (l as f64).powi(2)).sum();
        // Activations of the encoder for this rank's frames.
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
        let frames_max = b
            .frames
            .frames_per_rank
            .iter()
            .map(Vec::len)
            .max()
            .unwrap_or(0) as f64;
        let patches = v.patches(None) as f64;
        // A frozen encoder keeps nothing for backward but one layer's working set; a trained one
        // keeps its activations (or only layer inputs under recompute, see `stage`).
        let act = if self.train_vision {
            frames_max
                * patches
                * f64::from(v.num_layers)
                * layer_activation_bytes_per_token(&arch, patches, 1.0, Recompute::None)
        } else {
            frames_max
                * patches
                * layer_activation_bytes_per_token(&arch, patches, 1.0, Recompute::None)
        };
        let act_recompute = frames_max
            * patches
            * (f64::from(v.num_layers)
                * layer_activation_bytes_per_token(&arch, patches, 1.0, Recompute::Full)
                + layer_activation_bytes_per_token(&arch, patches, 1.0, Recompute::None));
        Ok(VisionStage {
            encoder_s,
            gather_s: if self.train_vision { reshard_s } else { 0.0 },
            reshard_s,
            memory_bytes: act,
            states_bytes: act_recompute,
            attention_scale: (sum_sq / s2) * b.attention_imbalance,
        })
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
        let (vp, ranges) = self.plan(
            topo,
            model,
            &c.layout,
            c.zero_stage,
            c.recompute,
            plan.context_tokens,
        )?;
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
        zero_stage: u8,
        recompute: Recompute,
        context: u64,
    ) -> Result<(VisionPlan, Vec<Vec<[u64; 2]>>)> {
        let b = self.balance(model, layout.ulysses, layout.ring, true)?;
        let stage = self
            .stage(topo, model, layout, zero_stage, recompute, context)
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
                sample_lens: self.sample_lens.clone(),
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
