//! Synthetic needle-in-a-haystack check of sharded inference (issue 8): a seeded random prompt
//! with a token pattern (the needle) planted at a few places and repeated at its end, run
//! through the sequence-parallel prefill and a few sharded-KV decode steps; the attention
//! outputs of every layer at the needle's positions and at the decoded positions are compared
//! with a chunked single-device reference computed layer by layer with the same weights
//! ([`chunked_reference`]: queries in chunks, each chunk's attention over the keys before it
//! and its causal diagonal block merged by log-sum-exp, so a million tokens fit one GPU).
//!
//! With random weights the needle is a marker of positions, not a retrieval task: the check is
//! that sharding changes nothing numerically at those positions (and around the shard cuts,
//! which the planted places straddle for the layouts used).
use super::merge::{acc_kind, merge_partials, partial_attention};
use super::{check_prompt, on_thread_ranks, sync, InferPlan, RankInference};
use crate::error::{Result, RuntimeError};
use crate::kernel::{attention_fwd, Backend};
use crate::model::{Decoder, Input, Rope};
use crate::plan::Layout;
use serde_json::json;
use tch::{Device, Kind, Tensor};

/// A haystack of `len` pseudo-random token ids below `vocab` (LCG seeded by `seed`) with a
/// pattern of `pattern` tokens planted at each fraction of `places` and at the end of the
/// prompt. Returns (prompt, the planted positions in increasing order, the `follow` tokens
/// that came after the first planted pattern: what the decode steps are fed).
pub fn needle_prompt(
    len: usize,
    vocab: usize,
    seed: u64,
    pattern: usize,
    places: &[f64],
    follow: usize,
) -> Result<(Vec<i64>, Vec<usize>, Vec<i64>)> {
    let mut x = seed
        .wrapping_mul(2862933555777941757)
        .wrapping_add(3037000493);
    let mut next = || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((x >> 33) % vocab as u64) as i64
    };
    let pat: Vec<i64> = (0..pattern).map(|_| next()).collect();
    let mut ids: Vec<i64> = (0..len).map(|_| next()).collect();
    let mut starts: Vec<usize> = places
        .iter()
        .map(|f| ((len as f64 * f) as usize).min(len.saturating_sub(pattern + follow + pattern)))
        .collect();
    starts.push(len.saturating_sub(pattern));
    starts.sort_unstable();
    starts.dedup();
    if len < 2 * pattern + follow || starts.windows(2).any(|w| w[1] < w[0] + pattern) {
        return Err(RuntimeError::Shape(format!(
            "a prompt of {len} tokens cannot hold needles of {pattern} tokens at {places:?}"
        )));
    }
    let mut pos = Vec::new();
    for &s in &starts {
        ids[s..s + pattern].copy_from_slice(&pat);
        pos.extend(s..s + pattern);
    }
    let f = starts[0] + pattern;
    let follow_ids = ids[f..f + follow].to_vec();
    Ok((ids, pos, follow_ids))
}

/// One rank's part of a needle run.
#[derive(Debug)]
pub struct NeedleRank {
    /// Seconds of prefill and of each decode step (device synchronised).
    pub prefill_s: f64,
    pub decode_s: Vec<f64>,
    pub kv_bytes: usize,
    pub kv_tokens: usize,
    /// The probe positions this rank held and their attention outputs (layers, n, Hq, D),
    /// float64 on the CPU.
    pub probe_pos: Vec<usize>,
    pub probe_out: Tensor,
    /// Every decode step's merged attention output (layers, Hq, D), float64 on the CPU.
    pub decode_out: Vec<Tensor>,
    /// How the last decode step ran ([`RankInference::decode_path`]).
    pub decode_path: &'static str,
}

/// Prefill of `prompt` and decode steps fed `decode` (forced tokens), with one thread per
/// rank of `layout` in this process, capturing the attention outputs at `probes`; decode
/// through a CUDA graph where one applies and `cuda_graph` allows it.
#[allow(clippy::too_many_arguments)]
pub fn run_needle_local(
    layout: Layout,
    context: usize,
    make_model: &(dyn Fn() -> Result<Decoder> + Sync),
    backend: Backend,
    prompt: &[i64],
    probes: &[usize],
    decode: &[i64],
    cuda_graph: bool,
    profile: Option<&std::path::Path>,
) -> Result<Vec<NeedleRank>> {
    layout.validate()?;
    if layout.dp != 1 {
        return Err(RuntimeError::Layout(
            "inference runs one SP group (dp = 1)".into(),
        ));
    }
    check_prompt(&layout, context, prompt.len())?;
    if prompt.len() + decode.len() > context {
        return Err(RuntimeError::Shape(format!(
            "{} prompt + {} decoded tokens exceed the context of {context}",
            prompt.len(),
            decode.len()
        )));
    }
    let results: Vec<Result<NeedleRank>> = on_thread_ranks(&layout, |wc, uc, rc| {
        tch::no_grad(|| {
            let model = make_model()?;
            let dev = model.device();
            let mut st = RankInference::new(&model, wc, uc, rc, backend, context)?;
            st.set_max_new(decode.len());
            st.set_cuda_graph(cuda_graph);
            sync(dev);
            let t0 = std::time::Instant::now();
            let (_, held, probed) = st.prefill_probed(prompt, probes)?;
            sync(dev);
            let prefill_s = t0.elapsed().as_secs_f64();
            let (mut decode_s, mut outs) = (Vec::new(), Vec::new());
            // Rank 0 profiles the second half of the decode steps (the graph captured by then).
            let profiled = profile.filter(|_| crate::comm::Communicator::rank(wc) == 0);
            for (i, &tok) in decode.iter().enumerate() {
                if profiled.is_some() && i == decode.len() / 2 {
                    crate::ffi::kernel_profile_start()?;
                }
                let t = std::time::Instant::now();
                let (_, o) = st.decode_step_probed(tok)?;
                sync(dev);
                decode_s.push(t.elapsed().as_secs_f64());
                outs.push(o);
            }
            if let Some(path) = profiled {
                crate::train::kernel_profile::finish(path, 60)?;
            }
            let (kv_bytes, kv_tokens) = st.kv_usage();
            let cpu = |t: &Tensor| t.to_kind(Kind::Double).to(Device::Cpu);
            Ok(NeedleRank {
                prefill_s,
                decode_s,
                kv_bytes,
                kv_tokens,
                probe_out: if held.is_empty() {
                    Tensor::empty([0], (Kind::Double, Device::Cpu))
                } else {
                    cpu(&probed.transpose(1, 2))
                },
                probe_pos: held,
                decode_out: outs.iter().map(cpu).collect(),
                decode_path: st.decode_path(),
            })
        })
    });
    results.into_iter().collect()
}

/// Single-device causal forward of `ids` layer by layer, queries in chunks of `chunk`: each
/// chunk attends to the keys before it (no mask) and to its own block (causal), merged by
/// log-sum-exp. Returns the attention outputs at `probes` (layers, n, Hq, D), float64 on the
/// CPU, in the order of `probes`.
pub fn chunked_reference(
    model: &Decoder,
    backend: Backend,
    ids: &[i64],
    probes: &[usize],
    chunk: usize,
) -> Result<Tensor> {
    if ids.is_empty() || chunk == 0 {
        return Err(RuntimeError::Shape("empty sequence or chunk".into()));
    }
    if let Some(p) = probes.iter().find(|&&p| p >= ids.len()) {
        return Err(RuntimeError::Shape(format!(
            "probe {p} beyond {} tokens",
            ids.len()
        )));
    }
    let cfg = &model.cfg;
    let dev = model.device();
    let scale = 1.0 / (cfg.head_dim as f64).sqrt();
    let s = ids.len();
    let cuts: Vec<(usize, usize)> = (0..s)
        .step_by(chunk)
        .map(|a| (a, (a + chunk).min(s)))
        .collect();
    tch::no_grad(|| -> Result<Tensor> {
        let t = Tensor::from_slice(ids).to(dev).unsqueeze(0);
        let mut x = model.embed(Input::Ids(&t))?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let (mut qs, mut ks, mut vs) = (Vec::new(), Vec::new(), Vec::new());
            for &(a, b) in &cuts {
                let pos = Tensor::arange_start(a as i64, b as i64, (Kind::Int64, dev));
                let rope = Rope::new(cfg, &pos, model.compute);
                let (q, k, v) =
                    model.pre_attention(l, &x.narrow(1, a as i64, (b - a) as i64), &rope);
                qs.push(q.contiguous());
                ks.push(k);
                vs.push(v);
            }
            let k = Tensor::cat(&ks, 2);
            let v = Tensor::cat(&vs, 2);
            drop((ks, vs));
            let mut rows: Vec<Option<Tensor>> = (0..probes.len()).map(|_| None).collect();
            let mut xs = Vec::with_capacity(cuts.len());
            for (q, &(a, b)) in qs.iter().zip(&cuts) {
                let (a64, n) = (a as i64, (b - a) as i64);
                let (oa, la) = partial_attention(
                    backend,
                    q,
                    &k.narrow(2, 0, a64),
                    &v.narrow(2, 0, a64),
                    scale,
                )?;
                let (ob, lb) = attention_fwd(
                    backend,
                    q,
                    &k.narrow(2, a64, n),
                    &v.narrow(2, a64, n),
                    true,
                    scale,
                )?;
                let ak = acc_kind(q.kind());
                let (o, _) = merge_partials(
                    &Tensor::stack(&[oa, ob.to_kind(ak)], 0),
                    &Tensor::stack(&[la, lb.to_kind(ak)], 0),
                );
                let o = o.to_kind(model.compute);
                for (i, &p) in probes.iter().enumerate() {
                    if (a..b).contains(&p) {
                        rows[i] = Some(o.select(2, (p - a) as i64).squeeze_dim(0));
                    }
                }
                xs.push(model.post_attention(l, &x.narrow(1, a64, n), &o)?);
            }
            drop(qs);
            x = Tensor::cat(&xs, 1);
            let rows: Vec<Tensor> = rows.into_iter().flatten().collect();
            layers.push(Tensor::stack(&rows, 0));
        }
        Ok(Tensor::stack(&layers, 0)
            .to_kind(Kind::Double)
            .to(Device::Cpu))
    })
}

/// Largest relative error (max |a - b| / max |b| over heads and head dims) over layers and
/// positions.
fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    // (layers, n, Hq, D) or (layers, Hq, D): reduce the last two dims.
    let diff = (a - b).abs().amax([-2i64, -1].as_slice(), false);
    let den = b.abs().amax([-2i64, -1].as_slice(), false).clamp_min(1e-30);
    (diff / den).max().double_value(&[])
}

/// The sharded outputs gathered in the order of `probes`, compared with the reference
/// (layers, probes + decoded positions, Hq, D): (max relative error at the probes, at the
/// decode steps).
pub fn compare(ranks: &[NeedleRank], probes: &[usize], reference: &Tensor) -> Result<(f64, f64)> {
    let mut rows: Vec<Option<Tensor>> = (0..probes.len()).map(|_| None).collect();
    for r in ranks {
        for (j, p) in r.probe_pos.iter().enumerate() {
            let i = probes
                .iter()
                .position(|q| q == p)
                .ok_or_else(|| RuntimeError::Shape(format!("unexpected probe {p}")))?;
            rows[i] = Some(r.probe_out.select(1, j as i64));
        }
    }
    let rows: Vec<Tensor> = rows
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            r.ok_or_else(|| RuntimeError::Shape(format!("no rank held probe {}", probes[i])))
        })
        .collect::<Result<_>>()?;
    let n = probes.len() as i64;
    let prefill = max_rel(&Tensor::stack(&rows, 1), &reference.narrow(1, 0, n));
    let nd = ranks.first().map_or(0, |r| r.decode_out.len()) as i64;
    let mut decode = 0f64;
    for r in ranks {
        if nd > 0 {
            let got = Tensor::stack(&r.decode_out, 1);
            decode = decode.max(max_rel(&got, &reference.narrow(1, n, nd)));
        }
    }
    Ok((prefill, decode))
}

/// What a needle run is made of.
pub struct NeedleOpts<'a> {
    pub plan: &'a InferPlan,
    /// The layout run (the plan's, or another one on the same devices).
    pub layout: Layout,
    pub make_model: &'a (dyn Fn() -> Result<Decoder> + Sync),
    pub backend: Backend,
    pub prompt_len: usize,
    pub pattern: usize,
    pub places: &'a [f64],
    pub decode: usize,
    pub chunk: usize,
    pub seed: u64,
    /// Decode through a CUDA graph where one applies (one rank on CUDA).
    pub cuda_graph: bool,
    /// Profile the device kernels of the second half of the decode steps (rank 0): the
    /// Chrome trace here, its activity list and summary beside it.
    pub profile: Option<std::path::PathBuf>,
}

/// Runs the sharded needle, then the chunked reference, and reports both with the plan's
/// predictions.
pub fn run_needle(o: &NeedleOpts<'_>) -> Result<serde_json::Value> {
    let model = (o.make_model)()?;
    let vocab = model.cfg.vocab_size;
    drop(model);
    let (prompt, probes, follow) =
        needle_prompt(o.prompt_len, vocab, o.seed, o.pattern, o.places, o.decode)?;
    let t0 = std::time::Instant::now();
    let ranks = run_needle_local(
        o.layout,
        o.plan.context_tokens,
        o.make_model,
        o.backend,
        &prompt,
        &probes,
        &follow,
        o.cuda_graph,
        o.profile.as_deref(),
    )?;
    let sharded_wall_s = t0.elapsed().as_secs_f64();
    let t1 = std::time::Instant::now();
    let model = (o.make_model)()?;
    let mut ids = prompt.clone();
    ids.extend_from_slice(&follow);
    let mut ref_probes = probes.clone();
    ref_probes.extend(prompt.len()..ids.len());
    let reference = chunked_reference(&model, o.backend, &ids, &ref_probes, o.chunk)?;
    drop(model);
    let reference_wall_s = t1.elapsed().as_secs_f64();
    let (err_prefill, err_decode) = compare(&ranks, &probes, &reference)?;
    let prefill_s = ranks.iter().map(|r| r.prefill_s).fold(0.0, f64::max);
    let mut steps: Vec<f64> = (0..o.decode)
        .map(|i| ranks.iter().map(|r| r.decode_s[i]).fold(0.0, f64::max))
        .collect();
    steps.sort_by(|a, b| a.total_cmp(b));
    let median = steps.get(steps.len() / 2).map(|s| s * 1e3);
    let l = o.layout;
    let pl = o.plan.plan.layout;
    Ok(json!({
        "bench": "needle",
        "prompt_tokens": prompt.len(),
        "needle_tokens": o.pattern,
        "needle_positions": probes.len(),
        "needle_starts": probes.iter().step_by(o.pattern.max(1)).collect::<Vec<_>>(),
        "decode_steps": o.decode,
        "world": l.world_size(), "ulysses": l.ulysses, "ring": l.ring,
        "plan_layout": {"ulysses": pl.ulysses, "ring": pl.ring, "world": pl.world_size()},
        "max_rel_err_needle_prefill": err_prefill,
        "max_rel_err_decode": err_decode,
        "decode_path": ranks.first().map(|r| r.decode_path),
        "measured": {
            "prefill_s": prefill_s,
            "prefill_tokens_per_s": prompt.len() as f64 / prefill_s,
            "decode_ms_per_token_median": median,
            "kv_bytes_per_rank": ranks.iter().map(|r| r.kv_bytes).collect::<Vec<_>>(),
            "kv_tokens_per_rank": ranks.iter().map(|r| r.kv_tokens).collect::<Vec<_>>(),
        },
        "predicted": o.plan.predictions(),
        "sharded_wall_s": sharded_wall_s,
        "reference_wall_s": reference_wall_s,
        "reference_chunk": o.chunk,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelConfig;
    use crate::plan::Placement;

    fn model() -> Result<Decoder> {
        Decoder::random(
            ModelConfig::tiny(),
            Device::Cpu,
            Kind::Double,
            Kind::Double,
            5,
        )
    }

    #[test]
    fn prompt_plants_needles() {
        let (ids, pos, follow) = needle_prompt(200, 128, 3, 6, &[0.1, 0.5], 4).unwrap();
        assert_eq!(ids.len(), 200);
        assert_eq!(pos.len(), 18);
        assert_eq!(&ids[20..26], &ids[194..200]);
        assert_eq!(&ids[100..106], &ids[194..200]);
        assert_eq!(follow, ids[26..30].to_vec());
        assert!(needle_prompt(10, 128, 3, 6, &[0.1], 4).is_err());
    }

    /// The chunked reference equals unchunked attention, and the sharded prefill and decode
    /// match it at the needle positions, over several layouts (f64, CPU).
    #[test]
    fn sharded_needle_matches_chunked_reference() {
        let (prompt, probes, follow) = needle_prompt(173, 128, 11, 5, &[0.2, 0.55], 3).unwrap();
        let m = model().unwrap();
        let mut ids = prompt.clone();
        ids.extend_from_slice(&follow);
        let mut rp = probes.clone();
        rp.extend(prompt.len()..ids.len());
        let whole = chunked_reference(&m, Backend::CpuMath, &ids, &rp, ids.len()).unwrap();
        let reference = chunked_reference(&m, Backend::CpuMath, &ids, &rp, 32).unwrap();
        assert_eq!(
            whole.size(),
            [2, rp.len() as i64, 4, ModelConfig::tiny().head_dim as i64]
        );
        assert!(max_rel(&reference, &whole) < 1e-12);
        for (u, r) in [(1, 1), (1, 2), (2, 2), (2, 4)] {
            let ranks = run_needle_local(
                Layout::sp(u, r, Placement::UlyssesInner),
                1024,
                &model,
                Backend::CpuMath,
                &prompt,
                &probes,
                &follow,
                true,
                None,
            )
            .unwrap();
            let total: usize = ranks.iter().map(|r| r.kv_tokens).sum();
            assert_eq!(total, ids.len(), "{u}x{r}");
            let (ep, ed) = compare(&ranks, &probes, &reference).unwrap();
            assert!(ep < 1e-10 && ed < 1e-10, "{u}x{r}: {ep} {ed}");
        }
        // A wrong reference is caught.
        let bad = &reference * 1.01;
        let ranks = run_needle_local(
            Layout::sp(1, 2, Placement::UlyssesInner),
            1024,
            &model,
            Backend::CpuMath,
            &prompt,
            &probes,
            &follow,
            true,
            None,
        )
        .unwrap();
        let (ep, ed) = compare(&ranks, &probes, &bad).unwrap();
        assert!(ep > 5e-3 && ed > 5e-3);
    }
}
