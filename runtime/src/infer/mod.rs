//! Inference with the sequence sharded (issue 8): prefill of a prompt with 2D attention over
//! the plan's zigzag shards, every rank keeping the K/V of its own tokens per layer (the
//! layout of the attention inputs: all kv heads, no Ulysses replication) in a preallocated
//! cache ([`cache`]: room for its shard plus its share of the tokens to decode, new K/V
//! written in place); then greedy decoding in which every rank computes the new query's
//! partial attention over its KV shard (GQA without repeating K/V, split over key chunks) and
//! the partials are merged by log-sum-exp through one all-gather per layer ([`merge`]). The
//! host waits for the device once per token (the argmax), never per layer. On one rank on
//! CUDA each token's chain is one replay of a captured CUDA graph ([`graph`]), and greedy
//! generation is pipelined (`pipelined.rs`): each step is fed the token the step before chose
//! on the device, so the host reads a token while the device already runs the next step.
//!
//! Rules kept identical on every rank:
//! - the new token at position p (p >= prompt length P) is appended to the cache of SP rank
//!   (p - P) mod sp, where the SP rank is the rank in the `world` communicator (the global
//!   rank, dp = 1): round-robin, so shards stay within one token of each other;
//! - every rank embeds the new token, runs the layers and the head on it (replicated work for
//!   one token) and takes the argmax; the token of SP rank 0 is then broadcast (an all-reduce
//!   of the token id, zero elsewhere), so all ranks continue with the same token and stop
//!   together at the end-of-sequence token or when the plan's context is full;
//! - after prefill, the logits of the last prompt position (held by ring rank 0, last Ulysses
//!   sub-chunk) are broadcast the same way.
//!
//! Collectives run on the communicators passed in: in-process thread ranks
//! ([`run_local`]) or one process per GPU over NCCL (the binary's `infer --nccl`); the small
//! tensors they carry (token id, prefill logits) live on the model's device.
//!
//! Input is token ids only; frames (vision embeddings) are not supported here.
pub mod cache;
pub mod graph;
pub mod merge;
pub mod needle;
mod pipelined;

use crate::attn2d::{Attention2d, AttnShape};
use crate::comm::local::{local_groups, LocalComm};
use crate::comm::Communicator;
use crate::error::{Result, RuntimeError};
use crate::kernel::Backend;
use crate::model::decoder::local_causal;
use crate::model::{Decoder, Input, Rope};
use crate::plan::{GroupKind, Layout, Plan};
use crate::shard::Zigzag;
use cache::{chunk_len, KvCache};
use merge::merge_over;
use tch::{Device, Kind, Tensor};

/// An inference plan: the runtime plan with the contract's inference section (its prefill and
/// decode predictions) and the KV capacity `context_tokens` (prompt + generated tokens).
#[derive(Debug, Clone)]
pub struct InferPlan {
    pub plan: Plan,
    pub context_tokens: usize,
    /// The planner's prediction for the plan's model and layout.
    pub estimate: mmsp_plan::InferenceEstimate,
}

impl InferPlan {
    /// Parses a plan and checks it was made for inference, before anything else.
    pub fn from_json(text: &str) -> Result<InferPlan> {
        Self::of(Plan::from_json(text)?)
    }

    /// The inference view of a plan: its mode, one SP group, a context this machine addresses.
    pub fn of(plan: Plan) -> Result<InferPlan> {
        let c = &plan.contract;
        c.expect_mode(crate::plan::Mode::Inference, "plan")?;
        if plan.layout.dp != 1 {
            return Err(RuntimeError::Plan(format!(
                "inference runs one sequence-parallel group, the plan has dp = {}",
                plan.layout.dp
            )));
        }
        let context_tokens = usize::try_from(c.context_tokens).map_err(|_| {
            RuntimeError::Plan(format!(
                "context_tokens {} is more than this machine addresses",
                c.context_tokens
            ))
        })?;
        let estimate = c
            .inference
            .clone()
            .ok_or_else(|| RuntimeError::Plan("the plan has no inference section".into()))?;
        Ok(InferPlan {
            plan,
            context_tokens,
            estimate,
        })
    }

    /// The decoder of the plan's model ([`crate::model::ModelConfig::from_plan_model`]).
    pub fn model_config(&self) -> Result<crate::model::ModelConfig> {
        crate::model::ModelConfig::from_plan_model(&self.plan.contract.model)
    }

    /// The planner's predictions for the report: prefill tokens/s, decode ms per token, KV
    /// bytes and tokens per rank.
    pub fn predictions(&self) -> serde_json::Value {
        let e = &self.estimate;
        serde_json::json!({
            "prefill_tokens_per_s": e.prefill_tokens_per_s,
            "decode_ms_per_token": e.decode_s_per_token * 1e3,
            "kv_cache_bytes_per_gpu": e.memory.kv_cache_bytes,
            "kv_tokens_per_rank": e.kv_tokens_per_rank,
            "context_tokens": self.context_tokens,
        })
    }

    /// Reads a plan file.
    pub fn from_file(path: &std::path::Path) -> Result<InferPlan> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| RuntimeError::Plan(format!("{}: {e}", path.display())))?;
        Self::from_json(&text)
    }

    /// Checks a prompt against the plan: not empty, within the context, long enough for the
    /// zigzag cut (2 x ring x ulysses tokens).
    pub fn check_prompt(&self, len: usize) -> Result<()> {
        check_prompt(&self.plan.layout, self.context_tokens, len)
    }
}

/// See [`InferPlan::check_prompt`].
pub fn check_prompt(layout: &Layout, context: usize, len: usize) -> Result<()> {
    if len == 0 {
        return Err(RuntimeError::Shape("the prompt is empty".into()));
    }
    if len > context {
        return Err(RuntimeError::Shape(format!(
            "the prompt has {len} tokens, more than the plan's context of {context}"
        )));
    }
    let parts = 2 * layout.sp_size();
    if len < parts {
        return Err(RuntimeError::Shape(format!(
            "the prompt has {len} tokens, fewer than the {parts} zigzag shards (2 x ring {} x ulysses {})",
            layout.ring, layout.ulysses
        )));
    }
    Ok(())
}

/// Broadcasts an i64 from `root` over `comm` (all-reduce of the value, zero elsewhere), on
/// `device` (NCCL needs device memory); the host reads the result (one wait per call; a
/// group of one returns `value` as it is).
fn broadcast_i64(comm: &dyn Communicator, value: i64, root: usize, device: Device) -> Result<i64> {
    if comm.size() == 1 {
        return Ok(value);
    }
    let v = if comm.rank() == root { value } else { 0 };
    let t = Tensor::from_slice(&[v]).to(device);
    comm.all_reduce(&t)?;
    Ok(t.int64_value(&[0]))
}

/// One rank's inference state: its KV shard per layer and the sequence so far.
pub struct RankInference<'a> {
    model: &'a Decoder,
    world: &'a dyn Communicator,
    ulysses: &'a dyn Communicator,
    ring: &'a dyn Communicator,
    backend: Backend,
    context: usize,
    /// One preallocated cache per layer.
    caches: Vec<KvCache>,
    /// Tokens the caller will decode at most (sizes the caches); None: up to the context.
    max_new: Option<usize>,
    /// Key chunk of the caches; None: [`chunk_len`].
    kv_chunk: Option<usize>,
    prompt_len: usize,
    seq_len: usize,
    /// Whether decode may use a CUDA graph where it can ([`graph::fits`], one rank).
    cuda_graph: bool,
    /// The fixed-shape decode step, once made.
    graph: Option<graph::DecodeGraph>,
}

/// What a generation produced.
#[derive(Debug)]
pub struct Generation {
    /// Generated token ids (the end-of-sequence token included when produced).
    pub tokens: Vec<i64>,
    /// Logits (vocab,) that chose each token, in float64 on the CPU; a pipelined greedy
    /// generation (`infer/pipelined.rs`) keeps those of the tokens chosen before it started (the
    /// prefill's and the first decode step's), not copying the others out.
    pub logits: Vec<Tensor>,
    pub stopped_on_eos: bool,
    /// Seconds of prefill and of each decode step on this rank (device synchronised; a step
    /// counts the choice of the token it feeds).
    pub prefill_s: f64,
    pub decode_s: Vec<f64>,
    /// Bytes of this rank's KV cache at the end (the tokens held).
    pub kv_bytes: usize,
    /// Bytes allocated for this rank's KV cache (its capacity, chunk padding included).
    pub kv_capacity_bytes: usize,
    /// Tokens in this rank's KV cache at the end.
    pub kv_tokens: usize,
    /// How the last decode step ran ([`RankInference::decode_path`]).
    pub decode_path: &'static str,
}

pub(crate) fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

impl<'a> RankInference<'a> {
    /// `world` spans the SP group (rank = global rank, dp = 1); `ulysses` and `ring` are this
    /// rank's groups of the plan's layout.
    pub fn new(
        model: &'a Decoder,
        world: &'a dyn Communicator,
        ulysses: &'a dyn Communicator,
        ring: &'a dyn Communicator,
        backend: Backend,
        context: usize,
    ) -> Result<Self> {
        if world.size() != ulysses.size() * ring.size() {
            return Err(RuntimeError::Layout(format!(
                "world of {} ranks is not ulysses {} x ring {}",
                world.size(),
                ulysses.size(),
                ring.size()
            )));
        }
        Ok(RankInference {
            model,
            world,
            ulysses,
            ring,
            backend,
            context,
            caches: Vec::new(),
            max_new: None,
            kv_chunk: None,
            prompt_len: 0,
            seq_len: 0,
            cuda_graph: true,
            graph: None,
        })
    }

    /// Whether decode captures its per-token chain in a CUDA graph where it can (one SP rank,
    /// CUDA, a 16-bit dtype, a build with CUDA graphs; default on). Off: every kernel is
    /// launched by the host each token, as on several ranks.
    pub fn set_cuda_graph(&mut self, on: bool) {
        self.cuda_graph = on;
        if !on {
            self.graph = None;
        }
    }

    /// How the last decode step ran: "cuda-graph" (a replay or the step that captured it)
    /// or "eager".
    pub fn decode_path(&self) -> &'static str {
        if self
            .graph
            .as_ref()
            .is_some_and(graph::DecodeGraph::is_captured)
        {
            "cuda-graph"
        } else {
            "eager"
        }
    }

    /// Sizes the caches for at most `n` decoded tokens after the prompt (they grow, with one
    /// copy, if more come); without it they hold up to the plan's context.
    pub fn set_max_new(&mut self, n: usize) {
        self.max_new = Some(n);
    }

    /// Key chunk length of the caches (tests use short chunks to cross chunk edges).
    pub fn set_kv_chunk(&mut self, chunk: usize) {
        self.kv_chunk = Some(chunk);
    }

    fn scale(&self) -> f64 {
        1.0 / (self.model.cfg.head_dim as f64).sqrt()
    }

    /// Prefill of the whole prompt (every rank passes the same ids): keeps this rank's K/V and
    /// returns the last position's logits (vocab,), the same on every rank, in float64 on the
    /// model's device.
    pub fn prefill(&mut self, prompt: &[i64]) -> Result<Tensor> {
        Ok(self.prefill_probed(prompt, &[])?.0)
    }

    /// [`Self::prefill`] that also returns the attention outputs at the `probes` (global
    /// positions) this rank holds: (those positions, (layers, Hq, n, D) in the compute dtype).
    pub fn prefill_probed(
        &mut self,
        prompt: &[i64],
        probes: &[usize],
    ) -> Result<(Tensor, Vec<usize>, Tensor)> {
        let (u, r) = (self.ulysses.size(), self.ring.size());
        let layout = Layout::sp(u, r, crate::plan::Placement::UlyssesInner);
        check_prompt(&layout, self.context, prompt.len())?;
        let cfg = &self.model.cfg;
        let dev = self.model.device();
        let shape = AttnShape {
            batch: 1,
            seq_len: prompt.len(),
            q_heads: cfg.num_heads,
            kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
        };
        let attn = Attention2d::new(self.ulysses, self.ring, self.backend, shape)?;
        let zz: &Zigzag = attn.sharding();
        let (rr, uu) = (self.ring.rank(), self.ulysses.rank());
        let ranges = zz.local_ranges(rr, uu);
        let ids: Vec<i64> = ranges
            .iter()
            .flat_map(|&(s, e)| prompt[s..e].iter().copied())
            .collect();
        let ids = Tensor::from_slice(&ids).to(dev).unsqueeze(0);
        let positions = Rope::positions(&ranges, dev);
        let rope = Rope::new(cfg, &positions, self.model.compute);
        // Local index of every probe this rank holds (ranges are in local order).
        let (mut held, mut local) = (Vec::new(), Vec::new());
        let mut off = 0usize;
        for &(s, e) in &ranges {
            for &p in probes {
                if (s..e).contains(&p) {
                    held.push(p);
                    local.push((off + p - s) as i64);
                }
            }
            off += e - s;
        }
        let local = Tensor::from_slice(&local).to(dev);
        let mut probed = Vec::new();
        let mut x = self.model.embed(Input::Ids(&ids))?;
        // This rank's shard plus its round-robin share of the tokens still to come.
        let n_local = off;
        let sp = self.world.size();
        let more = (self.context - prompt.len()).min(self.max_new.unwrap_or(usize::MAX));
        let capacity = n_local + more.div_ceil(sp);
        let chunk = self
            .kv_chunk
            .unwrap_or_else(|| chunk_len(capacity, cfg.num_kv_heads));
        self.caches.clear();
        for l in 0..cfg.num_layers {
            let (q, k, v) = self.model.pre_attention(l, &x, &rope);
            let (a, _ctx) = attn.forward(&q.contiguous(), &k.contiguous(), &v.contiguous())?;
            if !held.is_empty() {
                probed.push(a.index_select(2, &local).squeeze_dim(0));
            }
            let mut c = KvCache::new(
                cfg.num_kv_heads,
                cfg.head_dim,
                capacity,
                chunk,
                k.kind(),
                dev,
            )?;
            c.append(&k, &v)?;
            drop((q, k, v));
            self.caches.push(c);
            x = self.model.post_attention(l, &x, &a)?;
        }
        // The last position is the end of chunk 2R-1: ring rank 0, last Ulysses sub-chunk.
        let owner = rr == 0 && uu == u - 1;
        let vocab = cfg.vocab_size as i64;
        let logits = if owner {
            let n = x.size()[1];
            self.model
                .head(&x.narrow(1, n - 1, 1))
                .reshape([vocab])
                .to_kind(Kind::Double)
        } else {
            Tensor::zeros([vocab], (Kind::Double, dev))
        };
        // Sum with zeros elsewhere: the owner's logits, exactly, on every rank.
        self.world.all_reduce(&logits)?;
        self.prompt_len = prompt.len();
        self.seq_len = prompt.len();
        let probed = if probed.is_empty() {
            Tensor::empty([0], (self.model.compute, dev))
        } else {
            Tensor::stack(&probed, 0)
        };
        Ok((logits, held, probed))
    }

    /// SP rank that stores the K/V of position `p` (>= prompt length).
    pub fn kv_owner(&self, p: usize) -> usize {
        (p - self.prompt_len) % self.world.size()
    }

    /// Feeds `token` at the next position: appends its K/V on its owner, attends over the
    /// sharded cache and returns the next logits (vocab,), the same on every rank, in float64
    /// on the model's device and valid until the next decode step (the CUDA-graph step
    /// returns its output buffer; copy them to keep them).
    pub fn decode_step(&mut self, token: i64) -> Result<Tensor> {
        Ok(self.decode(token, false)?.0)
    }

    /// [`Self::decode_step`] that also returns the merged attention output of every layer
    /// (layers, Hq, D), in the accumulation dtype.
    pub fn decode_step_probed(&mut self, token: i64) -> Result<(Tensor, Tensor)> {
        self.decode(token, true)
    }

    /// A decode step; the attention outputs returned are the step's own when `probe`, else
    /// possibly a buffer the next step overwrites.
    fn decode(&mut self, token: i64, probe: bool) -> Result<(Tensor, Tensor)> {
        if self.caches.is_empty() {
            return Err(RuntimeError::Shape("decode before prefill".into()));
        }
        if self.seq_len >= self.context {
            return Err(RuntimeError::Shape(format!(
                "the sequence is full: the plan's context is {} tokens",
                self.context
            )));
        }
        if let Some(r) = self.decode_step_graph(token, probe)? {
            return Ok(r);
        }
        let cfg = &self.model.cfg;
        let dev = self.model.device();
        let p = self.seq_len;
        let mine = self.kv_owner(p) == self.world.rank();
        let ids = Tensor::from_slice(&[token]).to(dev).unsqueeze(0);
        let rope = Rope::at_position(cfg, p, self.model.compute, dev);
        let mut x = self.model.embed(Input::Ids(&ids))?;
        let mut outs = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let (q, k, v) = self.model.pre_attention(l, &x, &rope);
            if mine {
                self.caches[l].append(&k, &v)?;
            }
            let (o, lse) = self.caches[l].attend(&q, self.scale())?;
            let a = merge_over(self.world, &o, &lse)?;
            outs.push(a.reshape([cfg.num_heads as i64, cfg.head_dim as i64]));
            x = self
                .model
                .post_attention(l, &x, &a.to_kind(self.model.compute))?;
        }
        self.seq_len += 1;
        let logits = self
            .model
            .head(&x)
            .reshape([cfg.vocab_size as i64])
            .to_kind(Kind::Double);
        Ok((logits, Tensor::stack(&outs, 0)))
    }

    /// [`Self::decode_step_probed`] through the fixed-shape step and its CUDA graph, when it
    /// applies (None otherwise). A failure to capture or replay is reported once and the
    /// rank decodes eagerly from then on (the step's K/V slot is simply written again).
    fn decode_step_graph(&mut self, token: i64, probe: bool) -> Result<Option<(Tensor, Tensor)>> {
        let room = self.caches.first().is_some_and(|c| c.len() < c.capacity());
        if !self.cuda_graph || self.world.size() != 1 || !room || !graph::fits(self.model) {
            return Ok(None);
        }
        let scale = self.scale();
        let pos = self.seq_len;
        if !self
            .graph
            .as_ref()
            .is_some_and(|g| g.fits_cache(&self.caches[0]))
        {
            self.graph = Some(graph::DecodeGraph::new(self.model, &self.caches[0])?);
        }
        let g = self.graph.as_mut().expect("made above");
        match g.step(
            self.model,
            &self.caches,
            (graph::TokenIn::Host(token), pos),
            scale,
            probe,
        ) {
            Ok(r) => {
                for c in &mut self.caches {
                    c.advance(1)?;
                }
                self.seq_len += 1;
                Ok(Some((r.logits, r.outs)))
            }
            Err(e) => {
                eprintln!("warning: CUDA-graph decode failed ({e}); decoding eagerly");
                self.cuda_graph = false;
                self.graph = None;
                Ok(None)
            }
        }
    }

    /// Bytes and tokens of this rank's KV cache now (the tokens held).
    pub fn kv_usage(&self) -> (usize, usize) {
        let tokens = self.caches.first().map_or(0, KvCache::len);
        let bytes = self.caches.iter().map(KvCache::bytes_used).sum();
        (bytes, tokens)
    }

    /// Bytes allocated for this rank's KV cache (capacity and chunk padding included).
    pub fn kv_capacity_bytes(&self) -> usize {
        self.caches.iter().map(KvCache::bytes_allocated).sum()
    }

    /// This rank's cache of layer `l` (checks).
    pub fn cache(&self, l: usize) -> Option<&KvCache> {
        self.caches.get(l)
    }

    /// Greedy generation of up to `max_new` tokens after the prompt; stops at `eos` (on every
    /// rank, whichever computed it: the token is broadcast) or when the context is full.
    pub fn generate(
        &mut self,
        prompt: &[i64],
        max_new: usize,
        eos: Option<i64>,
    ) -> Result<Generation> {
        self.generate_with(prompt, max_new, eos, &mut Sampler::greedy())
    }

    /// [`Self::generate`] choosing each token with `sampler` (rank 0's choice is broadcast,
    /// so every rank continues with the same token).
    pub fn generate_with(
        &mut self,
        prompt: &[i64],
        max_new: usize,
        eos: Option<i64>,
        sampler: &mut Sampler,
    ) -> Result<Generation> {
        let dev = self.model.device();
        if self.max_new.is_none() {
            // Tokens fed back after the prompt: all but the last one generated.
            self.set_max_new(max_new.saturating_sub(1));
        }
        sync(dev);
        let t0 = std::time::Instant::now();
        let mut logits = self.prefill(prompt)?;
        sync(dev);
        let prefill_s = t0.elapsed().as_secs_f64();
        let mut g = Generation {
            tokens: Vec::new(),
            logits: Vec::new(),
            stopped_on_eos: false,
            prefill_s,
            decode_s: Vec::new(),
            kv_bytes: 0,
            kv_capacity_bytes: 0,
            kv_tokens: 0,
            decode_path: "eager",
        };
        while g.tokens.len() < max_new {
            // A token's time: choosing it (and its broadcast), then the step it feeds; the
            // copy of the logits kept for the caller is not timed.
            let t = std::time::Instant::now();
            let tok = broadcast_i64(self.world, sampler.pick(&logits), 0, dev)?;
            let pick_s = t.elapsed().as_secs_f64();
            g.tokens.push(tok);
            g.logits.push(logits.to(Device::Cpu));
            if Some(tok) == eos {
                g.stopped_on_eos = true;
                break;
            }
            if g.tokens.len() == max_new || self.seq_len >= self.context {
                break;
            }
            if sampler.temperature == 0.0 && self.can_pipeline() {
                // Greedy on one rank, the graph captured: the rest without host round trips.
                self.generate_pipelined(tok, t, max_new, eos, &mut g)?;
                break;
            }
            let t = std::time::Instant::now();
            logits = self.decode_step(tok)?;
            sync(dev);
            g.decode_s.push(pick_s + t.elapsed().as_secs_f64());
        }
        (g.kv_bytes, g.kv_tokens) = self.kv_usage();
        g.kv_capacity_bytes = self.kv_capacity_bytes();
        g.decode_path = self.decode_path();
        Ok(g)
    }
}

/// How the next token is chosen from the logits: greedy (temperature 0), or sampled from
/// softmax(logits / temperature) restricted to the smallest set of most likely tokens whose
/// probability reaches `top_p` (nucleus sampling, Holtzman et al. 2020; the first token past
/// the threshold is kept, as Transformers' `TopPLogitsWarper` does), from a seeded
/// generator.
#[derive(Debug, Clone)]
pub struct Sampler {
    pub temperature: f64,
    pub top_p: f64,
    state: u64,
}

impl Sampler {
    pub fn greedy() -> Sampler {
        Sampler {
            temperature: 0.0,
            top_p: 1.0,
            state: 0,
        }
    }

    /// Sampling at `temperature` (> 0) with nucleus `top_p` in (0, 1], seeded.
    pub fn new(temperature: f64, top_p: f64, seed: u64) -> Result<Sampler> {
        if !(temperature >= 0.0 && temperature.is_finite() && top_p > 0.0 && top_p <= 1.0) {
            return Err(RuntimeError::Config(format!(
                "temperature {temperature} must be >= 0 and top_p {top_p} in (0, 1]"
            )));
        }
        Ok(Sampler {
            temperature,
            top_p,
            state: seed,
        })
    }

    /// A uniform draw in [0, 1) (splitmix64, Steele et al. 2014).
    fn uniform(&mut self) -> f64 {
        (crate::train::data::splitmix(&mut self.state) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The next token of `logits` (vocab,).
    pub fn pick(&mut self, logits: &Tensor) -> i64 {
        if self.temperature == 0.0 {
            return logits.argmax(0, false).int64_value(&[]);
        }
        let l = logits.to_kind(Kind::Double).to(Device::Cpu);
        let p = (l / self.temperature).softmax(0, Kind::Double);
        let (sorted, idx) = p.sort(0, true);
        let probs = Vec::<f64>::try_from(&sorted).unwrap_or_default();
        let ids = Vec::<i64>::try_from(&idx).unwrap_or_default();
        let mut keep = probs.len();
        let mut cum = 0.0;
        for (i, q) in probs.iter().enumerate() {
            cum += q;
            if cum >= self.top_p {
                keep = i + 1;
                break;
            }
        }
        let total: f64 = probs[..keep].iter().sum();
        let mut u = self.uniform() * total;
        for i in 0..keep {
            u -= probs[i];
            if u < 0.0 {
                return ids[i];
            }
        }
        ids[keep.saturating_sub(1)]
    }
}

/// Single-device greedy decoding without a KV cache (the whole sequence re-run at every
/// step): the reference the sharded decoding is checked against.
pub fn generate_reference(
    model: &Decoder,
    backend: Backend,
    prompt: &[i64],
    max_new: usize,
    eos: Option<i64>,
) -> Result<(Vec<i64>, Vec<Tensor>)> {
    if prompt.is_empty() {
        return Err(RuntimeError::Shape("the prompt is empty".into()));
    }
    let dev = model.device();
    let mut seq = prompt.to_vec();
    let (mut toks, mut logits) = (Vec::new(), Vec::new());
    tch::no_grad(|| -> Result<()> {
        while toks.len() < max_new {
            let ids = Tensor::from_slice(&seq).to(dev).unsqueeze(0);
            let pos = Tensor::arange(seq.len() as i64, (Kind::Int64, dev));
            let out = model.forward(Input::Ids(&ids), &pos, &mut local_causal(backend))?;
            let last = out
                .select(1, seq.len() as i64 - 1)
                .reshape([-1])
                .to_kind(Kind::Double)
                .to(Device::Cpu);
            let tok = last.argmax(0, false).int64_value(&[]);
            toks.push(tok);
            logits.push(last);
            seq.push(tok);
            if Some(tok) == eos {
                break;
            }
        }
        Ok(())
    })?;
    Ok((toks, logits))
}

/// Runs generation with one thread per rank of `layout` (dp = 1) in this process; each
/// thread builds its model with `make_model` (the same weights on every rank). Returns every
/// rank's result, in global rank order.
#[allow(clippy::too_many_arguments)]
pub fn run_local(
    layout: Layout,
    context: usize,
    make_model: &(dyn Fn() -> Result<Decoder> + Sync),
    backend: Backend,
    prompt: &[i64],
    max_new: usize,
    eos: Option<i64>,
) -> Result<Vec<Generation>> {
    run_local_chunked(
        layout, context, make_model, backend, prompt, max_new, eos, None,
    )
}

/// [`run_local`] with the KV caches' key chunk set (None: [`chunk_len`]).
#[allow(clippy::too_many_arguments)]
pub fn run_local_chunked(
    layout: Layout,
    context: usize,
    make_model: &(dyn Fn() -> Result<Decoder> + Sync),
    backend: Backend,
    prompt: &[i64],
    max_new: usize,
    eos: Option<i64>,
    kv_chunk: Option<usize>,
) -> Result<Vec<Generation>> {
    let greedy = Sampler::greedy();
    let job = LocalJob {
        layout,
        context,
        backend,
        max_new,
        eos,
        kv_chunk,
        sampler: &greedy,
        cuda_graph: true,
    };
    run_local_job(&job, make_model, prompt)
}

/// What [`run_local_job`] runs: generation over the layout's thread ranks.
pub struct LocalJob<'a> {
    pub layout: Layout,
    pub context: usize,
    pub backend: Backend,
    pub max_new: usize,
    pub eos: Option<i64>,
    /// The KV caches' key chunk (None: [`chunk_len`]).
    pub kv_chunk: Option<usize>,
    /// How tokens are chosen (each rank starts from a copy; rank 0's choice is broadcast).
    pub sampler: &'a Sampler,
    /// Decode through a CUDA graph where one applies ([`RankInference::set_cuda_graph`]).
    pub cuda_graph: bool,
}

/// [`run_local`] with every option of a [`LocalJob`].
pub fn run_local_job(
    job: &LocalJob<'_>,
    make_model: &(dyn Fn() -> Result<Decoder> + Sync),
    prompt: &[i64],
) -> Result<Vec<Generation>> {
    let LocalJob {
        layout,
        context,
        backend,
        max_new,
        eos,
        kv_chunk,
        sampler,
        cuda_graph,
    } = *job;
    layout.validate()?;
    if layout.dp != 1 {
        return Err(RuntimeError::Layout(
            "inference runs one SP group (dp = 1)".into(),
        ));
    }
    // Every check before any thread starts a collective.
    check_prompt(&layout, context, prompt.len())?;
    let results = on_thread_ranks(&layout, |wc, uc, rc| {
        tch::no_grad(|| {
            let model = make_model()?;
            let mut st = RankInference::new(&model, wc, uc, rc, backend, context)?;
            if let Some(c) = kv_chunk {
                st.set_kv_chunk(c);
            }
            st.set_cuda_graph(cuda_graph);
            st.generate_with(prompt, max_new, eos, &mut sampler.clone())
        })
    });
    results.into_iter().collect()
}

/// Runs `f` once per rank of the layout's SP group, each rank a thread with its world,
/// Ulysses and ring communicators (in-process), and returns every rank's result in rank
/// order; a rank that panics yields an error instead of bringing the others down.
pub(super) fn on_thread_ranks<T: Send>(
    layout: &Layout,
    f: impl Fn(&LocalComm, &LocalComm, &LocalComm) -> Result<T> + Sync,
) -> Vec<Result<T>> {
    let uly = local_groups(layout, GroupKind::Ulysses);
    let ring = local_groups(layout, GroupKind::Ring);
    let world = LocalComm::group(layout.world_size());
    let f = &f;
    std::thread::scope(|s| {
        let hs: Vec<_> = uly
            .into_iter()
            .zip(ring)
            .zip(world)
            .map(|((uc, rc), wc)| s.spawn(move || f(&wc, &uc, &rc)))
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(RuntimeError::Comm("rank thread panicked".into())))
            })
            .collect()
    })
}
