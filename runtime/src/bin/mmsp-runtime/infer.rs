//! Inference subcommands: `infer` (sequence-parallel prefill and sharded-KV greedy decoding,
//! in-process thread ranks or, with `--nccl`, one process per GPU launched torchrun-style)
//! and `needle` (needle in a haystack against a chunked single-device reference, in-process
//! ranks).
use crate::usage;
use anyhow::{Context, Result};
use clap::Subcommand;
use mmsp_runtime::kernel::Backend;
use mmsp_runtime::plan::{Layout, Placement};
use serde_json::json;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Inference subcommands.
#[derive(Subcommand)]
pub enum Cmd {
    /// Inference from a plan made by `mmsp plan --mode inference`: sequence-parallel
    /// prefill and sharded-KV greedy decoding, one thread per rank of the plan in this
    /// process, or with --nccl one process per GPU (RANK, WORLD_SIZE, LOCAL_RANK,
    /// MASTER_ADDR, MASTER_PORT as torchrun sets them; rank 0 prints). A Hugging Face model
    /// directory (--model, with --prompt-text through its tokenizer), a random model of the
    /// plan's shape, or --tiny.
    Infer(InferArgs),
    /// Needle in a haystack: sharded prefill and decode (in-process ranks) against a chunked
    /// single-device reference at the needle's positions, with the plan's predictions.
    Needle(NeedleArgs),
}

/// Runs one inference subcommand.
pub fn dispatch(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Infer(a) => infer(a),
        Cmd::Needle(a) => needle(a),
    }
}

#[derive(clap::Args)]
pub struct InferArgs {
    /// Plan JSON with "mode": "inference".
    plan: std::path::PathBuf,
    /// Prompt token ids, comma-separated.
    #[arg(long, default_value = "", conflicts_with_all = ["haystack", "prompt_text"])]
    prompt: String,
    /// Prompt text, tokenized with --model's tokenizer.json; the completion is printed as
    /// text (--json: the report with a "text" field instead).
    #[arg(long, requires = "model", conflicts_with = "haystack")]
    prompt_text: Option<String>,
    /// A Hugging Face model directory (config.json and safetensors) to generate with,
    /// instead of random weights of the plan's shape.
    #[arg(long, conflicts_with = "tiny")]
    model: Option<std::path::PathBuf>,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus sampling: sample among the most likely tokens whose probability reaches this.
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// With --prompt-text, print the JSON report (its "text" field the completion) instead of
    /// the text.
    #[arg(long)]
    json: bool,
    /// Instead of --prompt: this many seeded random token ids (long-context runs).
    #[arg(long)]
    haystack: Option<usize>,
    #[arg(long, default_value_t = 16)]
    max_new: usize,
    /// End-of-sequence token id [default: --model's eos_token_id].
    #[arg(long)]
    eos: Option<i64>,
    /// The CI model (2 layers, hidden 64, 4 heads, 2 kv heads, vocab 128) instead of the
    /// plan's model shape.
    #[arg(long)]
    tiny: bool,
    #[arg(long, default_value_t = 0)]
    seed: i64,
    /// cpu or cuda.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Launch every decode kernel from the host instead of replaying one captured CUDA graph
    /// per token (graphs apply on one rank on CUDA in bf16).
    #[arg(long)]
    no_cuda_graph: bool,
    /// f64, f32 or bf16 [default: f32 on cpu, bf16 on cuda].
    #[arg(long)]
    dtype: Option<String>,
    /// One process per GPU over NCCL (torchrun-style environment; implies --device cuda, the
    /// GPU LOCAL_RANK) instead of in-process thread ranks.
    #[arg(long)]
    nccl: bool,
}

fn infer(a: InferArgs) -> Result<()> {
    use mmsp_runtime::infer::{run_local_job, InferPlan};
    use mmsp_runtime::model::Decoder;
    let text = std::fs::read_to_string(&a.plan)
        .map_err(|e| crate::util::usage(format!("{}: {e}", a.plan.display())))?;
    let plan = InferPlan::from_json(&text)?;
    let ck = a
        .model
        .as_deref()
        .map(mmsp_runtime::model::hf::HfCheckpoint::open)
        .transpose()?;
    let tok = match (&a.prompt_text, &a.model, &ck) {
        (Some(_), Some(d), Some(ck)) => Some(
            mmsp_runtime::train::data::TextTokenizer::from_model_dir(d, &ck.config_json)?,
        ),
        _ => None,
    };
    let cfg = model_config(&a, &plan, ck.as_ref())?;
    let prompt = prompt_ids(&a, &cfg, tok.as_ref())?;
    plan.check_prompt(prompt.len())?;
    if let Some(&t) = prompt
        .iter()
        .find(|&&t| t < 0 || t >= cfg.vocab_size as i64)
    {
        usage!(
            "token id {t} is outside the vocabulary of {}",
            cfg.vocab_size
        );
    }
    let launch = if a.nccl {
        Some(
            mmsp_runtime::comm::nccl::LaunchEnv::from_env()
                .context("--nccl reads the launch environment")?,
        )
    } else {
        None
    };
    let (dev, kind) = device_and_kind(&a, launch.as_ref())?;
    let l = plan.plan.layout;
    let t0 = Instant::now();
    let make = || match &ck {
        Some(ck) => Decoder::from_hf(ck, dev, kind, kind),
        None => Decoder::random(cfg.clone(), dev, kind, kind, a.seed),
    };
    let eos = a
        .eos
        .or_else(|| tok.as_ref().and_then(|t| t.eos).map(i64::from));
    let sampler = mmsp_runtime::infer::Sampler::new(a.temperature, a.top_p, a.seed as u64)?;
    let backend = Backend::default_for(dev);
    // (this rank's generation, every rank's (kv bytes, kv tokens, kv bytes allocated));
    // None on ranks other than 0 of an NCCL launch.
    let (g, kv) = match launch {
        None => {
            let job = mmsp_runtime::infer::LocalJob {
                layout: l,
                context: plan.context_tokens,
                backend,
                max_new: a.max_new,
                eos,
                kv_chunk: None,
                sampler: &sampler,
                cuda_graph: !a.no_cuda_graph,
            };
            let gens = run_local_job(&job, &make, &prompt)?;
            let kv: Vec<[i64; 3]> = gens
                .iter()
                .map(|g| {
                    [
                        g.kv_bytes as i64,
                        g.kv_tokens as i64,
                        g.kv_capacity_bytes as i64,
                    ]
                })
                .collect();
            (gens.into_iter().next().context("no rank ran")?, kv)
        }
        Some(env) => match infer_nccl(&plan, env, &make, backend, &prompt, (eos, &sampler), &a)? {
            Some(r) => r,
            None => return Ok(()),
        },
    };
    let mut d = g.decode_s.clone();
    d.sort_by(|x, y| x.total_cmp(y));
    let med = d.get(d.len() / 2).copied();
    let text = match &tok {
        Some(t) => {
            let ids: Vec<u32> = g.tokens.iter().map(|&x| x as u32).collect();
            Some(
                t.decode(&ids)
                    .map_err(|e| anyhow::anyhow!("decoding the completion: {e}"))?,
            )
        }
        None => None,
    };
    if let (Some(text), false) = (&text, a.json) {
        println!("{text}");
        return Ok(());
    }
    let predicted = predictions(&a, &plan);
    println!(
        "{}",
        json!({"bench": "infer", "launch": if a.nccl { "nccl" } else { "inprocess" },
            "world": l.world_size(), "ulysses": l.ulysses, "ring": l.ring,
            "device": format!("{dev:?}"), "dtype": format!("{kind:?}"),
            "model": {"hidden": cfg.hidden_size, "layers": cfg.num_layers, "heads": cfg.num_heads,
                "kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "vocab": cfg.vocab_size},
            "prompt_tokens": prompt.len(), "tokens": g.tokens, "text": text,
            "stopped_on_eos": g.stopped_on_eos,
            "temperature": a.temperature, "top_p": a.top_p,
            "prefill_s": g.prefill_s, "prefill_tokens_per_s": prompt.len() as f64 / g.prefill_s,
            "decode_steps": g.decode_s.len(),
            "decode_ms_per_token_median": med.map(|x| x * 1e3),
            "decode_path": g.decode_path,
            "kv_bytes_per_rank": kv.iter().map(|k| k[0]).collect::<Vec<_>>(),
            "kv_tokens_per_rank": kv.iter().map(|k| k[1]).collect::<Vec<_>>(),
            "kv_allocated_bytes_per_rank": kv.iter().map(|k| k[2]).collect::<Vec<_>>(),
            "predicted": predicted,
            "wall_s": t0.elapsed().as_secs_f64()})
    );
    Ok(())
}

/// The plan's predictions of an inference run (null for --tiny or --model, whose shape is not
/// the plan's).
fn predictions(a: &InferArgs, plan: &mmsp_runtime::infer::InferPlan) -> serde_json::Value {
    if a.tiny || a.model.is_some() {
        return json!(null);
    }
    plan.predictions()
}

/// The decoder's configuration: the checkpoint's (--model), the tiny CI model, or the plan's.
fn model_config(
    a: &InferArgs,
    plan: &mmsp_runtime::infer::InferPlan,
    ck: Option<&mmsp_runtime::model::hf::HfCheckpoint>,
) -> Result<mmsp_runtime::model::ModelConfig> {
    use mmsp_runtime::model::ModelConfig;
    Ok(if let Some(ck) = ck {
        ck.cfg.clone()
    } else if a.tiny {
        ModelConfig::tiny()
    } else {
        plan.model_config()?
    })
}

/// The prompt's token ids: seeded random (--haystack), --prompt-text through the tokenizer,
/// or --prompt's list.
fn prompt_ids(
    a: &InferArgs,
    cfg: &mmsp_runtime::model::ModelConfig,
    tok: Option<&mmsp_runtime::train::data::TextTokenizer>,
) -> Result<Vec<i64>> {
    Ok(match a.haystack {
        Some(n) => {
            tch::manual_seed(a.seed);
            Vec::<i64>::try_from(Tensor::randint(
                cfg.vocab_size as i64,
                [n as i64],
                (Kind::Int64, Device::Cpu),
            ))?
        }
        None if tok.is_some() => {
            let (t, text) = (
                tok.expect("checked"),
                a.prompt_text.as_deref().unwrap_or(""),
            );
            t.encode(text, true)
                .map_err(|e| crate::util::usage(format!("--prompt-text: tokenizer: {e}")))?
                .into_iter()
                .map(i64::from)
                .collect()
        }
        None => a
            .prompt
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(|t| {
                t.parse::<i64>()
                    .with_context(|| format!("bad token id {t:?} in --prompt"))
            })
            .collect::<Result<_>>()?,
    })
}

/// The device and dtype of the run.
fn device_and_kind(
    a: &InferArgs,
    launch: Option<&mmsp_runtime::comm::nccl::LaunchEnv>,
) -> Result<(Device, Kind)> {
    let dev = match (a.device.as_str(), launch) {
        (_, Some(_)) if !tch::Cuda::is_available() => {
            usage!("--nccl needs CUDA, which is not available to libtorch")
        }
        (_, Some(env)) => Device::Cuda(env.local_rank),
        ("cpu", None) => Device::Cpu,
        ("cuda", None) if tch::Cuda::is_available() => Device::Cuda(0),
        ("cuda", None) => usage!("CUDA is not available to libtorch"),
        (d, None) => usage!("--device must be cpu or cuda, not {d:?}"),
    };
    let kind = match (a.dtype.as_deref(), dev) {
        (Some("f64"), _) => Kind::Double,
        (Some("f32"), _) | (None, Device::Cpu) => Kind::Float,
        (Some("bf16"), _) | (None, _) => Kind::BFloat16,
        (Some(d), _) => usage!("--dtype must be f64, f32 or bf16, not {d:?}"),
    };
    Ok((dev, kind))
}

/// One rank of an NCCL launch: joins the plan's groups, generates, and gathers every rank's
/// KV figures. Returns them on rank 0 and None elsewhere (only rank 0 prints).
type RankResult = (mmsp_runtime::infer::Generation, Vec<[i64; 3]>);

fn infer_nccl(
    plan: &mmsp_runtime::infer::InferPlan,
    env: mmsp_runtime::comm::nccl::LaunchEnv,
    make: &dyn Fn() -> mmsp_runtime::Result<mmsp_runtime::model::Decoder>,
    backend: Backend,
    prompt: &[i64],
    (eos, sampler): (Option<i64>, &mmsp_runtime::infer::Sampler),
    a: &InferArgs,
) -> Result<Option<RankResult>> {
    use mmsp_runtime::comm::nccl::NcclWorld;
    use mmsp_runtime::comm::Communicator;
    use mmsp_runtime::infer::RankInference;
    let rank = env.rank;
    let dev = Device::Cuda(env.local_rank);
    let nw = NcclWorld::init(&plan.plan, env, std::time::Duration::from_secs(300))
        .context("joining the NCCL world")?;
    let (g, kv) = tch::no_grad(|| -> Result<_> {
        let model = make()?;
        let mut st = RankInference::new(
            &model,
            &nw.world,
            &nw.ulysses,
            &nw.ring,
            backend,
            plan.context_tokens,
        )?;
        st.set_cuda_graph(!a.no_cuda_graph);
        let g = st.generate_with(prompt, a.max_new, eos, &mut sampler.clone())?;
        let n = nw.world.size() as i64;
        let mine = Tensor::from_slice(&[
            g.kv_bytes as i64,
            g.kv_tokens as i64,
            g.kv_capacity_bytes as i64,
        ])
        .to(dev);
        let all = Tensor::zeros([3 * n], (Kind::Int64, dev));
        nw.world.all_gather(&mine, &all)?;
        let all = Vec::<i64>::try_from(all.to(Device::Cpu))?;
        Ok((g, all.chunks(3).map(|c| [c[0], c[1], c[2]]).collect()))
    })?;
    nw.world.barrier()?;
    Ok((rank == 0).then_some((g, kv)))
}

#[derive(clap::Args)]
pub struct NeedleArgs {
    /// Plan JSON with "mode": "inference" (its model shape is used).
    plan: std::path::PathBuf,
    /// Prompt tokens [default: the plan's context minus --decode].
    #[arg(long)]
    tokens: Option<usize>,
    /// Run this layout ULYSSESxRING (in-process ranks on the same device) instead of the plan's.
    #[arg(long)]
    layout: Option<String>,
    #[arg(long, default_value_t = 16)]
    needle: usize,
    #[arg(long, default_value_t = 8)]
    decode: usize,
    /// Query chunk of the single-device reference.
    #[arg(long, default_value_t = 65536)]
    chunk: usize,
    #[arg(long, default_value_t = 0)]
    seed: i64,
    /// cpu or cuda.
    #[arg(long, default_value = "cuda")]
    device: String,
    /// f64, f32 or bf16.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Launch every decode kernel from the host instead of replaying one captured CUDA graph
    /// per token (graphs apply on one rank on CUDA in bf16).
    #[arg(long)]
    no_cuda_graph: bool,
    /// Profile the device kernels of the second half of the decode steps (libtorch's
    /// Kineto/CUPTI profiler): the Chrome trace to this file, the activity list and summary
    /// beside it (.kernels.tsv, .summary.json).
    #[arg(long)]
    profile_decode: Option<std::path::PathBuf>,
}

fn needle(a: NeedleArgs) -> Result<()> {
    use mmsp_runtime::infer::needle::{run_needle, NeedleOpts};
    use mmsp_runtime::infer::InferPlan;
    use mmsp_runtime::model::Decoder;
    let text = std::fs::read_to_string(&a.plan)?;
    let plan = InferPlan::from_json(&text)?;
    let cfg = plan.model_config()?;
    let layout = match a.layout.as_deref() {
        None => plan.plan.layout,
        Some(s) => {
            let (u, r) = s
                .split_once('x')
                .ok_or_else(|| crate::util::usage("--layout is ULYSSESxRING"))?;
            Layout::sp(u.parse()?, r.parse()?, Placement::UlyssesInner)
        }
    };
    let dev = match a.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" if tch::Cuda::is_available() => Device::Cuda(0),
        "cuda" => usage!("CUDA is not available to libtorch"),
        d => usage!("--device must be cpu or cuda, not {d:?}"),
    };
    let kind = match a.dtype.as_str() {
        "f64" => Kind::Double,
        "f32" => Kind::Float,
        "bf16" => Kind::BFloat16,
        d => usage!("--dtype must be f64, f32 or bf16, not {d:?}"),
    };
    let out = run_needle(&NeedleOpts {
        plan: &plan,
        layout,
        make_model: &|| Decoder::random(cfg.clone(), dev, kind, kind, a.seed),
        backend: Backend::default_for(dev),
        prompt_len: a
            .tokens
            .unwrap_or(plan.context_tokens.saturating_sub(a.decode)),
        pattern: a.needle,
        places: &[0.05, 0.3, 0.61, 0.9],
        decode: a.decode,
        chunk: a.chunk,
        seed: a.seed as u64,
        cuda_graph: !a.no_cuda_graph,
        profile: a.profile_decode.clone(),
    })?;
    let mut out = out;
    out["model"] = json!({"hidden": cfg.hidden_size, "layers": cfg.num_layers, "heads": cfg.num_heads,
        "kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "intermediate": cfg.intermediate_size,
        "vocab": cfg.vocab_size});
    out["device"] = json!(format!("{dev:?}"));
    out["dtype"] = json!(format!("{kind:?}"));
    println!("{out}");
    Ok(())
}
