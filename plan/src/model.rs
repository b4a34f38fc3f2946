//! The model a plan trains or serves: a Llama-style decoder and the variations of the
//! Hugging Face families the planner reads, with the parameter counts both halves use. The
//! planner builds it (presets, `config.json` files: `mmsp_planner::spec`); the runtime builds
//! its decoder from it.

/// A Llama-style decoder (RMSNorm, RoPE, gated MLP, grouped-query attention) with the
/// variations of the families the planner reads (`mmsp_planner::spec::hf`): q/k/v biases, a head dimension of its own,
/// sliding-window layers, extra norms, soft-capping and a mixture of experts. New fields go at
/// the end with a serde default, so that older plans still parse.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub name: String,
    pub hidden_size: u64,
    pub num_heads: u64,
    pub num_kv_heads: u64,
    pub head_dim: u64,
    pub intermediate_size: u64,
    pub num_layers: u64,
    pub vocab_size: u64,
    pub tie_word_embeddings: bool,
    /// Biases on the q, k, v projections (Qwen2 has them, Llama does not).
    pub qkv_bias: bool,
    /// The Hugging Face family the spec was read as (`model_type`: llama, mistral, qwen2,
    /// gemma2, phi3, mixtral, qwen2_moe, ...); absent for presets and older plans.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family: Option<String>,
    /// Sliding-window (local) attention: each query attends to the `sliding_window` keys up to
    /// and including itself, on `sliding_window_layers` of the layers (all of Mistral-7B-v0.1's,
    /// every other one of Gemma-2's); the others attend causally to the whole sequence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<u64>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub sliding_window_layers: u64,
    /// Mixture-of-experts MLP. With experts, `intermediate_size` is the MLP width one token
    /// passes through (experts per token x expert width + the shared expert's), which the
    /// per-token FLOPs and activations use; the weights of all experts count in
    /// [`ModelSpec::params`] (memory), those of the active ones in
    /// [`ModelSpec::active_params`] (FLOPs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moe: Option<MoeSpec>,
    /// RMSNorm weight vectors per layer beyond the two pre-norms (Gemma-2's post-attention and
    /// post-MLP norms: 2).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub extra_norms_per_layer: u64,
    /// Gemma-2's soft-capping of the attention scores (`cap * tanh(s / cap)`): applied by the
    /// attention kernel on each score tile (flash-attention >= 2.6 `softcap`), the same
    /// matmul FLOPs, so it is recorded and not costed separately.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attn_logit_softcapping: Option<f64>,
    /// Gemma-2's soft-capping of the output logits: one elementwise pass over each loss chunk's
    /// logits, recorded and not costed separately (the loss already reads them several times).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_logit_softcapping: Option<f64>,
    /// RoPE base (`rope_theta`, or Transformers 5's `rope_parameters.rope_theta`) of a model
    /// read from a config.json: it costs nothing, the exports pass it on (Megatron's
    /// `--rotary-base`). None for the presets (the exports know theirs) and configs without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
}

/// The experts of a mixture-of-experts MLP (every layer sparse).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeSpec {
    /// Routed experts per layer (Mixtral `num_local_experts`, Qwen2-MoE `num_experts`).
    pub num_experts: u64,
    /// Experts each token is routed to (`num_experts_per_tok`).
    pub experts_per_token: u64,
    /// Intermediate width of one routed expert's SwiGLU MLP.
    pub expert_intermediate_size: u64,
    /// Width of the always-active shared expert (Qwen2-MoE `shared_expert_intermediate_size`;
    /// 0 = none), with its sigmoid gate (a 1 x hidden weight) when present.
    #[serde(default)]
    pub shared_expert_intermediate_size: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl ModelSpec {
    /// A dense decoder with full causal attention and no dimensions yet (none of the family
    /// extras): the base of a struct update that sets them.
    pub fn dense(name: &str) -> ModelSpec {
        ModelSpec {
            name: name.into(),
            hidden_size: 0,
            num_heads: 0,
            num_kv_heads: 0,
            head_dim: 0,
            intermediate_size: 0,
            num_layers: 0,
            vocab_size: 0,
            tie_word_embeddings: false,
            qkv_bias: false,
            family: None,
            sliding_window: None,
            sliding_window_layers: 0,
            moe: None,
            extra_norms_per_layer: 0,
            attn_logit_softcapping: None,
            final_logit_softcapping: None,
            rope_theta: None,
        }
    }

    /// Positive dimensions, heads that group evenly, sane windows and experts; the message
    /// names the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let dims = [
            ("hidden_size", self.hidden_size),
            ("num_heads", self.num_heads),
            ("intermediate_size", self.intermediate_size),
            ("num_layers", self.num_layers),
            ("vocab_size", self.vocab_size),
        ];
        if let Some((name, _)) = dims.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be positive"));
        }
        if self.num_kv_heads == 0 || !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.head_dim == 0 {
            return Err("head_dim must be positive".into());
        }
        if self.sliding_window == Some(0) || self.sliding_window_layers > self.num_layers {
            return Err(format!(
                "sliding_window must be positive on at most num_layers ({}) layers",
                self.num_layers
            ));
        }
        if let Some(e) = &self.moe {
            if e.num_experts == 0
                || e.expert_intermediate_size == 0
                || e.experts_per_token == 0
                || e.experts_per_token > e.num_experts
            {
                return Err(format!(
                    "experts: {} per token of {} (width {}); expected 1 <= per token <= experts",
                    e.experts_per_token, e.num_experts, e.expert_intermediate_size
                ));
            }
        }
        Ok(())
    }

    /// Width of the K (or V) projection output: kv heads x head dim.
    pub fn kv_dim(&self) -> u64 {
        self.num_kv_heads * self.head_dim
    }

    /// Width of the Q projection output: heads x head dim (equals hidden size in most models).
    pub fn q_dim(&self) -> u64 {
        self.num_heads * self.head_dim
    }

    /// Weights of the attention GEMMs of one layer: q, k, v and o projections (Phi-3 fuses q,
    /// k, v into one `qkv_proj` of the same (q + 2 kv) x hidden weights).
    pub fn attention_matmul_params(&self) -> u64 {
        let h = self.hidden_size;
        h * self.q_dim() + 2 * h * self.kv_dim() + self.q_dim() * h
    }

    /// Weights of the GEMMs one token passes through in one decoder layer: the attention
    /// projections, the SwiGLU (or GeGLU) MLP of width `intermediate_size` (gate, up, down;
    /// Phi-3's fused `gate_up_proj` is the same 2 x width x hidden) and, with experts, the
    /// router (hidden x experts) and the shared expert's gate (hidden x 1): the `P_layer` of
    /// the 2*P FLOPs-per-token rule (Kaplan et al. 2020, Sec. 2.1), for a mixture of experts
    /// its active parameters (Fedus et al. 2022, Switch Transformers, Sec. 2: FLOPs per token
    /// are those of the experts a token is routed to).
    pub fn layer_matmul_params(&self) -> u64 {
        let h = self.hidden_size;
        let mlp = 3 * h * self.intermediate_size;
        self.attention_matmul_params() + mlp + self.router_params()
    }

    /// Router and shared-expert-gate weights of one layer (0 without experts): Mixtral's
    /// `block_sparse_moe.gate` (hidden x experts), Qwen2-MoE's `mlp.gate` and
    /// `mlp.shared_expert_gate` (hidden x 1) (transformers `modeling_mixtral.py`,
    /// `modeling_qwen2_moe.py`).
    fn router_params(&self) -> u64 {
        self.moe.as_ref().map_or(0, |e| {
            let gate = if e.shared_expert_intermediate_size > 0 {
                1
            } else {
                0
            };
            self.hidden_size * (e.num_experts + gate)
        })
    }

    /// Weights of the MLPs of one layer that are not active for a token: the routed experts
    /// beyond the `experts_per_token` a token uses (0 without experts).
    fn inactive_expert_params(&self) -> u64 {
        self.moe.as_ref().map_or(0, |e| {
            let idle = e.num_experts.saturating_sub(e.experts_per_token);
            idle * 3 * self.hidden_size * e.expert_intermediate_size
        })
    }

    /// q/k/v biases and RMSNorm weights of one layer (2 pre-norms, plus Gemma-2's two
    /// post-norms).
    fn layer_vector_params(&self) -> u64 {
        let bias = if self.qkv_bias {
            self.q_dim() + 2 * self.kv_dim()
        } else {
            0
        };
        bias + (2 + self.extra_norms_per_layer) * self.hidden_size
    }

    /// All parameters of one decoder layer, every expert included: what the layer's weights,
    /// gradients and optimizer states hold.
    pub fn layer_params(&self) -> u64 {
        self.layer_matmul_params() + self.inactive_expert_params() + self.layer_vector_params()
    }

    /// Parameters of one layer that one token uses (equal to [`ModelSpec::layer_params`]
    /// without experts).
    pub fn layer_active_params(&self) -> u64 {
        self.layer_matmul_params() + self.layer_vector_params()
    }

    /// Input embedding plus output head (once if tied).
    pub fn embedding_params(&self) -> u64 {
        let e = self.vocab_size * self.hidden_size;
        if self.tie_word_embeddings {
            e
        } else {
            2 * e
        }
    }

    /// Total parameters: layers (all experts), embeddings, final norm.
    pub fn params(&self) -> u64 {
        self.num_layers * self.layer_params() + self.embedding_params() + self.hidden_size
    }

    /// Parameters one token uses: as [`ModelSpec::params`] with only the routed experts a
    /// token goes to (Mixtral-8x7B: 12.9B of 46.7B, Jiang et al. 2024, arXiv:2401.04088,
    /// Sec. 2.1).
    pub fn active_params(&self) -> u64 {
        self.num_layers * self.layer_active_params() + self.embedding_params() + self.hidden_size
    }

    /// Of a layer's attention work over `seq` tokens, the fraction its kernels compute, averaged
    /// over the layers: 1 for causal attention over the whole sequence; a sliding-window layer
    /// computes the band of query-key pairs within the window, S*W - W^2/2 of the causal
    /// S^2/2 when W < S (each query sees min(i+1, W) keys; the flash-attention kernels skip the
    /// key blocks outside the window: Dao-AILab/flash-attention README, "sliding window local
    /// attention", `window_size` since v2.3; Beltagy et al. 2020, Longformer, Sec. 3.1: O(n w)).
    pub fn attention_work_fraction(&self, seq: f64) -> f64 {
        let (Some(w), n) = (self.sliding_window, self.sliding_window_layers) else {
            return 1.0;
        };
        let w = w as f64;
        if n == 0 || w >= seq || seq <= 0.0 {
            return 1.0;
        }
        let band = (2.0 * seq * w - w * w) / (seq * seq);
        let layers = self.num_layers as f64;
        let local = (n.min(self.num_layers)) as f64;
        ((layers - local) + local * band) / layers
    }
}
