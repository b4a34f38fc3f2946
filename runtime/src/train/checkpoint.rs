//! Checkpoint and resume of a training run, bit-exact: the master parameters, the AdamW
//! moments and step count, and the data position (the number of steps done; the runtime's
//! data is a function of the step index and no random numbers are drawn after the seeded
//! initialisation, so no generator state is needed).
//!
//! A checkpoint is a directory: one safetensors file per optimizer shard and
//! `manifest.json`. Without ZeRO (one shard, every rank holds the same state) the grad
//! group's rank 0 writes `shard-00000-of-00001.stepS.safetensors`; with ZeRO-1/2/3 grad rank
//! r writes shard r. Files are written under temporary names, synced and renamed; shard names
//! carry the step, so the files the current manifest names are never overwritten, and the
//! previous save's files are removed only once the new manifest is in place: a crash at any
//! point of a save leaves the previous checkpoint whole and loadable. A shard file holds `params` (that shard's slice of the padded flat
//! parameter vector, in `Decoder::param_shapes` order), `exp_avg` and `exp_avg_sq` (its
//! moments) and `step`. With ZeRO-1/2/3 the parameter vector is cut into units (embedding,
//! each layer, final norm with head; `train::shards`), each padded to a multiple of the
//! shard count, and shard r's `params` is slice r of every unit, concatenated (the same
//! layout as its moments); on resume each rank reads its own shard file only (ZeRO-1/2 then
//! gather their resident compute-dtype weights from the loaded masters). Rank 0 writes the
//! manifest last, after a barrier, so a manifest
//! always describes complete shard files. The manifest records what must match for a resume
//! ([`identity`]: world size, layout, ZeRO stage, context, master dtype, model config and
//! parameter names and shapes); resuming under anything else is refused with one line
//! ([`RuntimeError::Plan`], exit code 2). Every rank reads the directory on resume, so with
//! several hosts it must be on a shared file system.
use super::Trainer;
use crate::error::{Result, RuntimeError};
use crate::model::{Decoder, ModelConfig};
use crate::plan::Plan;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Version of the layout described above.
pub const FORMAT: u64 = 2;
/// The manifest's file name inside a checkpoint directory.
pub const MANIFEST: &str = "manifest.json";

fn ckpt_err(dir: &Path, msg: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Plan(format!("checkpoint {}: {msg}", dir.display()))
}

/// What a checkpoint and the run resuming it must agree on.
pub fn identity(
    plan: &Plan,
    zero_stage: u32,
    context_tokens: usize,
    cfg: &ModelConfig,
    master: Kind,
) -> Value {
    let l = plan.layout;
    let params: Vec<Value> = Decoder::param_shapes(cfg)
        .into_iter()
        .map(|(n, s)| json!([n, s]))
        .collect();
    json!({
        "world_size": plan.world_size,
        "layout": {"ulysses": l.ulysses, "ring": l.ring, "dp": l.dp, "tp": l.tp,
                   "placement": format!("{:?}", l.placement)},
        "zero_stage": zero_stage,
        "context_tokens": context_tokens,
        "master_dtype": format!("{master:?}"),
        "model": {
            "hidden_size": cfg.hidden_size, "num_heads": cfg.num_heads,
            "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
            "intermediate_size": cfg.intermediate_size, "num_layers": cfg.num_layers,
            "vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_word_embeddings,
            "qkv_bias": cfg.qkv_bias, "rope_theta": cfg.rope_theta,
            "rope_scaling": format!("{:?}", cfg.rope_scaling),
            "rms_norm_eps": cfg.rms_norm_eps, "params": params,
        },
    })
}

/// The first difference between two identities, as "path: there vs here".
fn first_difference(path: &str, there: &Value, here: &Value) -> Option<String> {
    match (there, here) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter().find_map(|k| {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                first_difference(
                    &p,
                    a.get(k).unwrap_or(&Value::Null),
                    b.get(k).unwrap_or(&Value::Null),
                )
            })
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (x, y))| first_difference(&format!("{path}[{i}]"), x, y)),
        _ if there == here => None,
        _ => {
            let short = |v: &Value| {
                let s = v.to_string();
                if s.len() > 60 {
                    format!("{}...", &s[..57])
                } else {
                    s
                }
            };
            Some(format!(
                "{path} is {} in the checkpoint but {} in this run",
                short(there),
                short(here)
            ))
        }
    }
}

/// A checkpoint's manifest, checked against a run.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub dir: PathBuf,
    /// Steps done when it was written (the next step's data index).
    pub step: usize,
    /// Optimizer shard files, shard i at index i.
    pub files: Vec<String>,
    /// Losses of the steps done so far (as far as the writing runs recorded them).
    pub losses: Vec<f64>,
    pub value: Value,
}

/// Reads `dir`'s manifest and checks it against this run's [`identity`]. Every error is
/// one line ([`RuntimeError::Plan`]).
pub fn check(dir: &Path, want: &Value) -> Result<Manifest> {
    let path = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| ckpt_err(dir, format!("cannot read {MANIFEST}: {e}")))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| ckpt_err(dir, format!("{MANIFEST} is not valid JSON: {e}")))?;
    if v["format"].as_u64() != Some(FORMAT) {
        return Err(ckpt_err(
            dir,
            format!("format {} (this runtime reads {FORMAT})", v["format"]),
        ));
    }
    if let Some(d) = first_difference("", &v["identity"], want) {
        return Err(ckpt_err(dir, format!("does not match this run: {d}")));
    }
    let step = v["step"]
        .as_u64()
        .ok_or_else(|| ckpt_err(dir, "no step in the manifest"))? as usize;
    let files: Vec<String> = v["files"]
        .as_array()
        .ok_or_else(|| ckpt_err(dir, "no files in the manifest"))?
        .iter()
        .map(|f| f.as_str().map(str::to_string))
        .collect::<Option<_>>()
        .ok_or_else(|| ckpt_err(dir, "file names must be strings"))?;
    for f in &files {
        if !dir.join(f).is_file() {
            return Err(ckpt_err(dir, format!("shard file {f} is missing")));
        }
    }
    let losses = v["losses"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    Ok(Manifest {
        dir: dir.to_path_buf(),
        step,
        files,
        losses,
        value: v,
    })
}

/// Shard file names carry the step they hold, so that a save never overwrites the files the
/// current manifest names: a crash before the new manifest is renamed into place leaves the
/// previous checkpoint whole.
fn shard_name(i: usize, n: usize, step: usize) -> String {
    format!("shard-{i:05}-of-{n:05}.step{step}.safetensors")
}

/// The shard this rank writes, if any, and the shard count.
fn my_shard(t: &Trainer<'_>) -> (Option<usize>, usize) {
    let (shards, shard_rank, _, _) = t.opt.checkpoint_layout();
    if shards == 1 {
        ((t.groups.grad.rank() == 0).then_some(0), 1)
    } else {
        (Some(shard_rank), shards)
    }
}

/// The shard file names of this trainer's checkpoint after `step` steps.
pub fn shard_files(t: &Trainer<'_>, step: usize) -> Vec<String> {
    let n = my_shard(t).1;
    (0..n).map(|i| shard_name(i, n, step)).collect()
}

fn cpu(t: &Tensor) -> Tensor {
    t.to_device(Device::Cpu).contiguous()
}

/// Writes this rank's shard file into `dir` (created if missing), if this rank writes one.
/// Call on every rank, then a barrier, then [`write_manifest`] on rank 0.
pub fn save_shard(t: &Trainer<'_>, dir: &Path, after_step: usize) -> Result<()> {
    let (Some(i), n) = my_shard(t) else {
        return Ok(());
    };
    std::fs::create_dir_all(dir)?;
    let (p, m, v, step) = t.opt.checkpoint_state();
    let len = m.size()[0];
    let params = if n == 1 || t.opt.params_sharded() {
        p.shallow_clone()
    } else {
        p.narrow(0, len * i as i64, len)
    };
    let tensors = [
        ("params", cpu(&params)),
        ("exp_avg", cpu(m)),
        ("exp_avg_sq", cpu(v)),
        ("step", Tensor::from_slice(&[i64::from(step)])),
    ];
    crate::durable::replace_with(&dir.join(shard_name(i, n, after_step)), |tmp| {
        Ok(Tensor::write_safetensors(&tensors, tmp)?)
    })
}

/// Writes the manifest (rank 0, after every shard file is written), then removes the shard
/// files of earlier saves. `data` says where the training data stands (its source; the
/// position is the step).
pub fn write_manifest(
    t: &Trainer<'_>,
    dir: &Path,
    identity: &Value,
    step: usize,
    losses: &[f64],
    data: &Value,
) -> Result<()> {
    let (_, _, numel, padded) = t.opt.checkpoint_layout();
    let v = json!({
        "format": FORMAT,
        "step": step,
        "identity": identity,
        "files": shard_files(t, step),
        "numel": numel, "padded": padded,
        "param_layout": if t.opt.params_sharded() { "sharded-units" } else { "flat" },
        "optimizer": {"lr": t.cfg.optimizer.lr, "beta1": t.cfg.optimizer.beta1,
                      "beta2": t.cfg.optimizer.beta2, "eps": t.cfg.optimizer.eps,
                      "weight_decay": t.cfg.optimizer.weight_decay},
        "data": {"source": data, "next_step": step,
                 "note": "the data of step k is a function of (seed, k, DP rank); no generator state is used after initialisation"},
        "losses": losses,
    });
    std::fs::create_dir_all(dir)?;
    let text = serde_json::to_string_pretty(&v)?;
    crate::durable::replace_bytes(&dir.join(MANIFEST), text.as_bytes())?;
    let keep = shard_files(t, step);
    for e in std::fs::read_dir(dir)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("shard-") && name.ends_with(".safetensors") && !keep.contains(&name) {
            std::fs::remove_file(e.path())?;
        }
    }
    Ok(())
}

fn read_shard(dir: &Path, name: &str) -> Result<Vec<(String, Tensor)>> {
    Tensor::read_safetensors(dir.join(name)).map_err(|e| ckpt_err(dir, format!("{name}: {e}")))
}

fn get<'a>(dir: &Path, name: &str, ts: &'a [(String, Tensor)], key: &str) -> Result<&'a Tensor> {
    ts.iter()
        .find(|(n, _)| n == key)
        .map(|(_, t)| t)
        .ok_or_else(|| ckpt_err(dir, format!("{name} has no tensor {key:?}")))
}

/// Fills this rank's parameters, moments and step count from a checked checkpoint.
pub fn load(t: &mut Trainer<'_>, man: &Manifest) -> Result<()> {
    let dir = man.dir.as_path();
    let (_, n) = my_shard(t);
    let (_, shard_rank, _, _) = t.opt.checkpoint_layout();
    if man.files.len() != n {
        return Err(ckpt_err(
            dir,
            format!(
                "{} shard files, this run has {n} optimizer shards",
                man.files.len()
            ),
        ));
    }
    let mine = if n == 1 { 0 } else { shard_rank };
    let _ng = tch::no_grad_guard();
    let (p, m, v, _) = t.opt.checkpoint_state();
    let (mut p, mut m, mut v) = (p.shallow_clone(), m.shallow_clone(), v.shallow_clone());
    let mut step = None;
    // Sharded ranks hold their own parameter slices; ZeRO-0 the whole vector.
    let own_only = t.opt.params_sharded();
    let mut parts = Vec::with_capacity(n);
    for (i, name) in man.files.iter().enumerate() {
        if own_only && i != mine {
            continue;
        }
        let ts = read_shard(dir, name)?;
        parts.push(get(dir, name, &ts, "params")?.shallow_clone());
        if i == mine {
            for (key, dst) in [("exp_avg", &mut m), ("exp_avg_sq", &mut v)] {
                let src = get(dir, name, &ts, key)?;
                if src.size() != dst.size() || src.kind() != dst.kind() {
                    return Err(ckpt_err(
                        dir,
                        format!(
                            "{name}: {key} is {:?} {:?}, this rank holds {:?} {:?}",
                            src.size(),
                            src.kind(),
                            dst.size(),
                            dst.kind()
                        ),
                    ));
                }
                dst.f_copy_(src)?;
            }
            step = Some(get(dir, name, &ts, "step")?.f_int64_value(&[0])?);
        }
    }
    let all = Tensor::cat(&parts, 0);
    if all.size() != p.size() || all.kind() != p.kind() {
        return Err(ckpt_err(
            dir,
            format!(
                "parameters are {:?} {:?}, this run holds {:?} {:?}",
                all.size(),
                all.kind(),
                p.size(),
                p.kind()
            ),
        ));
    }
    p.f_copy_(&all)?;
    let step = step.ok_or_else(|| ckpt_err(dir, "no step in this rank's shard"))?;
    let step = i32::try_from(step).map_err(|_| ckpt_err(dir, format!("step {step}")))?;
    t.opt.set_checkpoint_step(step);
    // ZeRO-1/2: the resident compute-dtype weights follow the loaded masters.
    t.refresh_resident()
}
