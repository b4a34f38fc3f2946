//! What a plan predicts (step time, memory and time breakdowns, MFU/HFU) and the recompute it
//! asks for: the planner fills them, the runtime reports measured figures against them.

use serde::{Deserialize, Serialize};

use crate::GIB;

/// How much of a layer's activations are kept rather than recomputed in backward.
///
/// Only [`Recompute::None`] and [`Recompute::OutsideAttention`] are planned and costed (the
/// planner's memory model says why); `selective` and `full` remain values a plan file may hold (the runtime accepts
/// `none`, `selective` and `full` and runs the last two as its recompute outside attention).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Recompute {
    /// Keep everything.
    None,
    /// Korthikanti et al. 2022's selective recompute of the cheap, memory-bound tensors (the
    /// RMSNorm outputs and the SwiGLU product). mmsp-runtime has no such recompute: never
    /// searched, and costed, when a plan asks for it, as [`Recompute::OutsideAttention`] (what
    /// the runtime runs). Read back from plans of older planners, and exported as it says.
    Selective,
    /// Korthikanti et al. 2022's full recompute: keep only each layer's input and recompute the
    /// whole layer, attention included (Sec. 4.1: 2*s*b*h per layer). `"recompute": "full"` in
    /// a plan is the runtime's name for its recompute outside attention (with
    /// `"recompute_scope": "outside_attention"`, [`crate::plan`]); a plan of an older planner
    /// without that scope reads back as this (whole layers, as it was costed then).
    Full,
    /// mmsp-runtime's recompute, the one it runs for every plan that recomputes, at any ZeRO
    /// stage (`runtime/src/train/mod.rs`: the forward outside attention runs without autograd
    /// graph and again, with it, before the layer's backward; under ZeRO-3 once the weights
    /// are gathered again, `runtime/src/train/shards.rs`). Kept per layer: its input, the
    /// attention output and the attention's own context (Q, K, V in the attention's layout, its output and log-sum-exp);
    /// the norms, projections, RoPE, MLP and residual adds run again in backward, attention does
    /// not. A plan writes it as `"recompute": "full"` (what the runtime reads) with
    /// `"recompute_scope": "outside_attention"` (`crate::plan`).
    OutsideAttention,
}

impl Recompute {
    /// The policies a search chooses among: what mmsp-runtime can run.
    pub const SEARCHED: [Recompute; 2] = [Recompute::None, Recompute::OutsideAttention];

    pub fn as_str(&self) -> &'static str {
        match self {
            Recompute::None => "none",
            Recompute::Selective => "selective",
            Recompute::Full => "full",
            Recompute::OutsideAttention => "outside_attention",
        }
    }

    /// A requested policy (`--recompute`, a campaign's or a report's `recompute`): `none`, or
    /// `full` for the runtime's recompute ([`Recompute::OutsideAttention`]). `selective` is
    /// refused with the reason (the runtime would run it as its recompute outside attention).
    pub fn parse_requested(s: &str) -> std::result::Result<Recompute, String> {
        match s {
            "none" => Ok(Recompute::None),
            "full" | "outside_attention" => Ok(Recompute::OutsideAttention),
            "selective" => Err(SELECTIVE_REFUSED.into()),
            _ => Err(format!("'{s}' is not one of: none, full")),
        }
    }
}

/// Why `--recompute selective` is refused.
pub const SELECTIVE_REFUSED: &str = "mmsp-runtime has no selective recompute; it recomputes each layer outside attention: use --recompute full or none";

/// Memory per GPU, in bytes, by category.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MemoryBreakdown {
    pub weights_bytes: f64,
    pub gradients_bytes: f64,
    pub optimizer_bytes: f64,
    pub activations_bytes: f64,
    pub logits_bytes: f64,
    pub comm_buffers_bytes: f64,
    pub reserved_bytes: f64,
    pub fragmentation_bytes: f64,
    pub total_bytes: f64,
}

/// Where the time of one step goes (seconds; per step, summed over micro-batches).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TimeBreakdown {
    pub gemm_s: f64,
    pub attention_s: f64,
    /// The ring attention's own memory-bound work around its kernels (block output merges,
    /// kv-head repeats, fp32 dQ and dK/dV accumulation), on the compute stream. Absent (0) in
    /// plans of older planners, which did not count it.
    #[serde(default)]
    pub ring_merge_s: f64,
    /// Memory-bound work of the layers: norms, RoPE, SwiGLU, residual adds (forward and
    /// backward) and the fp32 accumulation of their weight gradients.
    pub elementwise_s: f64,
    /// Output head GEMMs (forward and backward) with the cross-entropy softmax, the embedding
    /// lookup and gradient, and the gradient accumulation of the embedding, head and final norm.
    pub head_s: f64,
    pub recompute_s: f64,
    pub vision_s: f64,
    pub ulysses_all_to_all_s: f64,
    pub ring_p2p_s: f64,
    pub ring_exposed_s: f64,
    pub tp_comm_s: f64,
    pub grad_sync_s: f64,
    pub grad_sync_exposed_s: f64,
    pub zero_gather_s: f64,
    pub zero_gather_exposed_s: f64,
    pub optimizer_s: f64,
}

/// What the planner predicts for the plan.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Predicted {
    pub step_time_s: f64,
    pub tokens_per_s: f64,
    /// Model FLOPs utilisation: GEMMs 6 x params x tokens and causal attention 3 x its forward
    /// (Chowdhery et al. 2022, PaLM, Appendix B), as the field reports MFU.
    pub mfu: f64,
    /// Hardware FLOPs utilisation: what the kernels execute (attention 3.5 x its forward, the
    /// recompute's forward GEMMs again). Absent in plans of older planners.
    #[serde(default)]
    pub hfu: f64,
    pub memory_per_gpu_bytes: f64,
    pub memory: MemoryBreakdown,
    pub time: TimeBreakdown,
    pub comm_exposed_s: f64,
    pub comm_overlapped_s: f64,
    /// Step time from the discrete-event simulator, when it was run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub simulated_step_time_s: Option<f64>,
    /// Parameters of the model, every expert included ([`crate::ModelSpec::params`]).
    #[serde(default)]
    pub params: u64,
    /// Parameters one token uses, for a mixture of experts ([`crate::ModelSpec::active_params`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_params: Option<u64>,
    /// Tokens per second per GPU: `tokens_per_s` over the world size.
    #[serde(default)]
    pub tokens_per_s_per_gpu: f64,
    /// Model TFLOP/s per GPU: the FLOPs MFU counts, over the step time and the world size.
    #[serde(default)]
    pub model_tflops_per_gpu: f64,
    /// Fraction of the GPU's memory left free by `memory_per_gpu_bytes`.
    #[serde(default)]
    pub memory_headroom: f64,
    /// Warnings about the plan (a memory headroom under [`HEADROOM_WARNING`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// A plan whose predicted memory leaves less than this fraction of the GPU's memory free is
/// flagged: the allocator's fragmentation varies from run to run by a few percent of the
/// memory in use (the FRAGMENTATION allowance of the planner's memory model), so such a plan may not
/// fit as run.
pub const HEADROOM_WARNING: f64 = 0.03;

/// The headroom warning of a plan needing `needed` of `capacity` bytes per GPU, if it is due.
pub fn headroom_warning(needed: f64, capacity: f64) -> Option<String> {
    let free = 1.0 - needed / capacity;
    (free < HEADROOM_WARNING).then(|| {
        format!(
            "memory headroom {:.1}% (under {:.0}%): {:.1} of {:.1} GiB per GPU; a run may not \
             fit (for margin: a shorter context, more recompute or more GPUs)",
            free * 100.0,
            HEADROOM_WARNING * 100.0,
            needed / GIB,
            capacity / GIB
        )
    })
}

impl Predicted {
    /// The figures are finite and non-negative, the step time positive.
    pub fn check(&self) -> std::result::Result<(), String> {
        let figures = [
            ("step_time_s", self.step_time_s),
            ("tokens_per_s", self.tokens_per_s),
            ("mfu", self.mfu),
            ("hfu", self.hfu),
            ("memory_per_gpu_bytes", self.memory_per_gpu_bytes),
            ("comm_exposed_s", self.comm_exposed_s),
            ("comm_overlapped_s", self.comm_overlapped_s),
        ];
        if let Some((name, v)) = figures.iter().find(|(_, v)| !v.is_finite() || *v < 0.0) {
            return Err(format!(
                "predicted.{name} = {v} (expected a finite figure >= 0)"
            ));
        }
        if self.step_time_s <= 0.0 {
            return Err("predicted.step_time_s must be positive".into());
        }
        Ok(())
    }
}
