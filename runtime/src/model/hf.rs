//! Hugging Face model directories: `config.json` with `model.safetensors` or the shards a
//! `model.safetensors.index.json` names, read by byte range (a rank reads only the elements
//! it owns: its ZeRO slice, or every tensor when it keeps the model whole), and written back
//! in the same layout, streamed one tensor at a time, so that Transformers'
//! `from_pretrained` loads what a run trained.
//!
//! The safetensors format (huggingface/safetensors, README "Format"): an 8-byte little-endian
//! header length N, N bytes of JSON mapping each tensor name to `{dtype, shape,
//! data_offsets: [begin, end]}` (offsets into the data that follows the header) and an
//! optional `__metadata__` map of strings, then the raw little-endian data. Files written
//! here pad the header with spaces to a multiple of 8 bytes, as the reference writer does.
use super::config::ModelConfig;
use super::decoder::Decoder;
use crate::error::{Result, RuntimeError};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use tch::{Kind, Tensor};

/// Where one tensor's bytes are.
#[derive(Debug, Clone)]
struct Entry {
    file: usize,
    kind: Kind,
    shape: Vec<i64>,
    /// Absolute byte offset of element 0 in its file.
    start: u64,
}

/// An opened Hugging Face model directory.
#[derive(Debug)]
pub struct HfCheckpoint {
    pub dir: PathBuf,
    /// `config.json` as written (kept whole for `--save-hf`).
    pub config_json: Value,
    pub cfg: ModelConfig,
    files: Vec<(PathBuf, File)>,
    entries: HashMap<String, Entry>,
    /// Tensor bytes read so far, by every reader of this checkpoint.
    bytes_read: AtomicU64,
}

fn bad(path: &Path, what: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Config(format!("{}: {what}", path.display()))
}

fn kind_of(dtype: &str) -> Option<Kind> {
    Some(match dtype {
        "F64" => Kind::Double,
        "F32" => Kind::Float,
        "BF16" => Kind::BFloat16,
        "F16" => Kind::Half,
        _ => return None,
    })
}

fn dtype_name(kind: Kind) -> Option<&'static str> {
    Some(match kind {
        Kind::Double => "F64",
        Kind::Float => "F32",
        Kind::BFloat16 => "BF16",
        Kind::Half => "F16",
        _ => return None,
    })
}

/// The dtype `torch_dtype` / `dtype` of a config names (Transformers writes `dtype` since 5).
pub fn config_dtype(config: &Value) -> Option<Kind> {
    let name = config
        .get("dtype")
        .or_else(|| config.get("torch_dtype"))?
        .as_str()?;
    Some(match name {
        "float32" => Kind::Float,
        "bfloat16" => Kind::BFloat16,
        "float16" => Kind::Half,
        "float64" => Kind::Double,
        _ => return None,
    })
}

/// Reads one safetensors header: tensor name -> entry (file index `fi`).
fn read_header(path: &Path, file: &File, fi: usize) -> Result<Vec<(String, Entry)>> {
    let len = file.metadata().map_err(|e| bad(path, e))?.len();
    let mut n8 = [0u8; 8];
    file.read_exact_at(&mut n8, 0)
        .map_err(|e| bad(path, format!("not a safetensors file ({e})")))?;
    let n = u64::from_le_bytes(n8);
    if n > 100 << 20 || 8 + n > len {
        return Err(bad(
            path,
            format!("safetensors header of {n} bytes in a file of {len}"),
        ));
    }
    let mut hdr = vec![0u8; n as usize];
    file.read_exact_at(&mut hdr, 8).map_err(|e| bad(path, e))?;
    let map: Map<String, Value> = serde_json::from_slice(&hdr).map_err(|e| {
        bad(
            path,
            format!("safetensors header is not a JSON object: {e}"),
        )
    })?;
    let data0 = 8 + n;
    let mut out = Vec::new();
    for (name, v) in map {
        if name == "__metadata__" {
            continue;
        }
        let dtype = v.get("dtype").and_then(Value::as_str).unwrap_or("?");
        let kind = kind_of(dtype).ok_or_else(|| {
            bad(
                path,
                format!("tensor {name} has dtype {dtype} (expected F32, BF16, F16 or F64)"),
            )
        })?;
        let shape: Vec<i64> = serde_json::from_value(v.get("shape").cloned().unwrap_or_default())
            .map_err(|e| bad(path, format!("tensor {name}: shape: {e}")))?;
        let off: [u64; 2] =
            serde_json::from_value(v.get("data_offsets").cloned().unwrap_or_default())
                .map_err(|e| bad(path, format!("tensor {name}: data_offsets: {e}")))?;
        let bytes = shape.iter().product::<i64>() as u64 * kind.elt_size_in_bytes() as u64;
        if off[1] < off[0] || off[1] - off[0] != bytes || data0 + off[1] > len {
            return Err(bad(
                path,
                format!("tensor {name}: data_offsets {off:?} do not hold {shape:?} {dtype} in a file of {len} bytes"),
            ));
        }
        let start = data0 + off[0];
        out.push((
            name,
            Entry {
                file: fi,
                kind,
                shape,
                start,
            },
        ));
    }
    Ok(out)
}

/// Whether `dir` looks like a model directory with weights.
pub fn has_weights(dir: &Path) -> bool {
    dir.join("model.safetensors").is_file() || dir.join("model.safetensors.index.json").is_file()
}

/// The safetensors files of a model directory: `model.safetensors`, or the shards its
/// `model.safetensors.index.json` names (sorted).
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if !index.is_file() {
        if dir.join("model.safetensors").is_file() {
            return Ok(vec![dir.join("model.safetensors")]);
        }
        return Err(bad(
            dir,
            "no model.safetensors or model.safetensors.index.json",
        ));
    }
    let text = std::fs::read_to_string(&index).map_err(|e| bad(&index, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| bad(&index, e))?;
    let map = v
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| bad(&index, "no weight_map object"))?;
    let mut out: Vec<String> = Vec::new();
    for (t, f) in map {
        let f = f
            .as_str()
            .filter(|f| !f.contains('/') && !f.is_empty())
            .ok_or_else(|| bad(&index, format!("weight_map[{t}] is not a file name")))?;
        if !out.iter().any(|o| o == f) {
            out.push(f.to_string());
        }
    }
    out.sort();
    Ok(out.into_iter().map(|f| dir.join(f)).collect())
}

impl HfCheckpoint {
    /// Opens a model directory: parses `config.json` and every safetensors header, and checks
    /// that the checkpoint holds exactly the decoder's parameters with the config's shapes.
    pub fn open(dir: &Path) -> Result<HfCheckpoint> {
        let cpath = dir.join("config.json");
        let text = std::fs::read_to_string(&cpath).map_err(|e| bad(&cpath, e))?;
        let config_json: Value =
            serde_json::from_str(&text).map_err(|e| bad(&cpath, format!("not JSON: {e}")))?;
        let cfg = ModelConfig::from_hf_json(&text).map_err(|e| bad(&cpath, e))?;
        let mut files = Vec::new();
        let mut entries = HashMap::new();
        for (fi, path) in weight_files(dir)?.into_iter().enumerate() {
            let f = File::open(&path).map_err(|e| bad(&path, e))?;
            for (n, e) in read_header(&path, &f, fi)? {
                entries.insert(n, e);
            }
            files.push((path, f));
        }
        let ck = HfCheckpoint {
            dir: dir.to_path_buf(),
            config_json,
            cfg,
            files,
            entries,
            bytes_read: AtomicU64::new(0),
        };
        ck.check()?;
        Ok(ck)
    }

    /// Every decoder parameter present with its shape; nothing else but tensors Transformers
    /// itself drops (rotary `inv_freq` buffers, a tied head's copy).
    fn check(&self) -> Result<()> {
        let shapes = Decoder::param_shapes(&self.cfg);
        for (name, shape) in &shapes {
            let e = self.entries.get(name).ok_or_else(|| {
                bad(
                    &self.dir,
                    format!(
                        "the checkpoint has no tensor {name} (shape {shape:?} from config.json)"
                    ),
                )
            })?;
            if &e.shape != shape {
                return Err(bad(
                    &self.dir,
                    format!(
                        "tensor {name} is {:?} in the checkpoint, config.json makes it {shape:?}",
                        e.shape
                    ),
                ));
            }
        }
        let known: std::collections::HashSet<&str> =
            shapes.iter().map(|(n, _)| n.as_str()).collect();
        let mut extra: Vec<&String> = self
            .entries
            .keys()
            .filter(|n| !known.contains(n.as_str()))
            .filter(|n| !n.ends_with("rotary_emb.inv_freq"))
            .filter(|n| !(self.cfg.tie_word_embeddings && n.as_str() == "lm_head.weight"))
            .collect();
        extra.sort();
        if let Some(n) = extra.first() {
            return Err(bad(
                &self.dir,
                format!(
                    "tensor {n} is in the checkpoint but not in the decoder config.json describes \
                     ({} such tensors)",
                    extra.len()
                ),
            ));
        }
        Ok(())
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries
            .get(name)
            .ok_or_else(|| bad(&self.dir, format!("the checkpoint has no tensor {name}")))
    }

    /// The dtype a tensor is stored in.
    pub fn kind(&self, name: &str) -> Result<Kind> {
        Ok(self.entry(name)?.kind)
    }

    /// Elements `[lo, lo + len)` of a tensor, flattened: a 1-D CPU tensor in the stored dtype,
    /// read from the file alone (no other bytes are touched).
    pub fn read_range(&self, name: &str, lo: i64, len: i64) -> Result<Tensor> {
        let e = self.entry(name)?;
        let numel: i64 = e.shape.iter().product();
        if lo < 0 || len < 0 || lo + len > numel {
            return Err(RuntimeError::Shape(format!(
                "elements [{lo}, {}) of {name} with {numel}",
                lo + len
            )));
        }
        let es = e.kind.elt_size_in_bytes() as u64;
        let mut buf = vec![0u8; (len as u64 * es) as usize];
        let (path, f) = &self.files[e.file];
        f.read_exact_at(&mut buf, e.start + lo as u64 * es)
            .map_err(|err| bad(path, format!("reading {name}: {err}")))?;
        self.bytes_read
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(Tensor::f_from_data_size(&buf, &[len], e.kind)?)
    }

    /// Tensor bytes read from the files so far (headers excluded), over every reader.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }

    /// Bytes of every decoder parameter in the files.
    pub fn model_bytes(&self) -> u64 {
        Decoder::param_shapes(&self.cfg)
            .iter()
            .map(|(n, s)| {
                let es = self
                    .entries
                    .get(n)
                    .map_or(0, |e| e.kind.elt_size_in_bytes());
                s.iter().product::<i64>() as u64 * es as u64
            })
            .sum()
    }

    /// A whole tensor with its shape (CPU, stored dtype).
    pub fn read(&self, name: &str) -> Result<Tensor> {
        let e = self.entry(name)?;
        let numel: i64 = e.shape.iter().product();
        Ok(self.read_range(name, 0, numel)?.reshape(e.shape.as_slice()))
    }
}

/// One output file: its name and the tensors it holds, in order.
struct OutFile {
    name: String,
    tensors: Vec<String>,
    file: File,
    tmp: PathBuf,
    data0: u64,
}

/// Writes a model directory Transformers loads: `config.json`, `model.safetensors` (or
/// `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json` past
/// `max_shard_bytes`), in `dtype`. Tensors arrive one at a time ([`HfWriter::write`]) in
/// any order; files are written under temporary names and renamed by [`HfWriter::finish`]
/// only when every tensor is in, so an interrupted save leaves an earlier save intact.
pub struct HfWriter {
    dir: PathBuf,
    dtype: Kind,
    config: Value,
    files: Vec<OutFile>,
    /// name -> (file, absolute offset, shape, written)
    slots: BTreeMap<String, (usize, u64, Vec<i64>, bool)>,
    total: u64,
}

impl HfWriter {
    /// Lays out the files for `shapes` (the decoder's parameters, in order) and writes their
    /// headers. `config` is the config.json to write (its dtype field is set to `dtype`).
    pub fn create(
        dir: &Path,
        config: &Value,
        shapes: &[(String, Vec<i64>)],
        dtype: Kind,
        max_shard_bytes: u64,
    ) -> Result<HfWriter> {
        let dname = dtype_name(dtype).ok_or_else(|| {
            RuntimeError::Config(format!(
                "--save-hf dtype {dtype:?} (expected f32, bf16, f16)"
            ))
        })?;
        std::fs::create_dir_all(dir).map_err(|e| bad(dir, e))?;
        let es = dtype.elt_size_in_bytes() as u64;
        let bytes = |s: &[i64]| s.iter().product::<i64>() as u64 * es;
        let mut groups: Vec<Vec<usize>> = vec![vec![]];
        let mut cur = 0u64;
        for (i, (_, s)) in shapes.iter().enumerate() {
            let b = bytes(s);
            if cur > 0 && cur + b > max_shard_bytes {
                groups.push(vec![]);
                cur = 0;
            }
            groups.last_mut().expect("one group at least").push(i);
            cur += b;
        }
        let n = groups.len();
        let mut w = HfWriter {
            dir: dir.to_path_buf(),
            dtype,
            config: config.clone(),
            files: Vec::new(),
            slots: BTreeMap::new(),
            total: 0,
        };
        for (fi, g) in groups.iter().enumerate() {
            let name = if n == 1 {
                "model.safetensors".to_string()
            } else {
                format!("model-{:05}-of-{n:05}.safetensors", fi + 1)
            };
            let mut hdr = Map::new();
            hdr.insert("__metadata__".into(), json!({"format": "pt"}));
            let mut off = 0u64;
            let mut placed = Vec::new();
            for &i in g {
                let (t, s) = &shapes[i];
                let b = bytes(s);
                hdr.insert(
                    t.clone(),
                    json!({"dtype": dname, "shape": s, "data_offsets": [off, off + b]}),
                );
                placed.push((t.clone(), off, s.clone()));
                off += b;
            }
            let mut text = serde_json::to_vec(&hdr)?;
            while !text.len().is_multiple_of(8) {
                text.push(b' ');
            }
            let tmp = dir.join(format!(".{name}.partial"));
            let file = File::create(&tmp).map_err(|e| bad(&tmp, e))?;
            file.write_all_at(&(text.len() as u64).to_le_bytes(), 0)
                .and_then(|_| file.write_all_at(&text, 8))
                .and_then(|_| file.set_len(8 + text.len() as u64 + off))
                .map_err(|e| bad(&tmp, e))?;
            let data0 = 8 + text.len() as u64;
            for (t, o, s) in placed {
                w.slots.insert(t, (fi, data0 + o, s, false));
            }
            w.total += off;
            let tensors = g.iter().map(|&i| shapes[i].0.clone()).collect();
            w.files.push(OutFile {
                name,
                tensors,
                file,
                tmp,
                data0,
            });
        }
        Ok(w)
    }

    /// Writes one tensor (any device and dtype; converted to the file's dtype on the CPU).
    pub fn write(&mut self, name: &str, t: &Tensor) -> Result<()> {
        let slot = self.slots.get_mut(name).ok_or_else(|| {
            RuntimeError::Config(format!("--save-hf: {name} is not a tensor of the layout"))
        })?;
        if t.size() != slot.2 {
            return Err(RuntimeError::Shape(format!(
                "--save-hf: {name} is {:?}, the layout says {:?}",
                t.size(),
                slot.2
            )));
        }
        let c = t
            .detach()
            .to_device(tch::Device::Cpu)
            .to_kind(self.dtype)
            .contiguous();
        let numel = c.numel();
        let mut buf = vec![0u8; numel * self.dtype.elt_size_in_bytes()];
        c.f_copy_data_u8(&mut buf, numel)?;
        let f = &self.files[slot.0];
        f.file
            .write_all_at(&buf, slot.1)
            .map_err(|e| bad(&f.tmp, e))?;
        slot.3 = true;
        Ok(())
    }

    /// Checks every tensor was written, renames the files into place and writes the index
    /// (when sharded) and config.json. Returns the files written.
    pub fn finish(self) -> Result<Vec<PathBuf>> {
        if let Some((n, _)) = self.slots.iter().find(|(_, s)| !s.3) {
            return Err(RuntimeError::Config(format!(
                "--save-hf: {n} was never written"
            )));
        }
        let mut out = Vec::new();
        let mut weight_map = Map::new();
        for f in &self.files {
            let dst = self.dir.join(&f.name);
            crate::durable::commit(&f.tmp, &dst).map_err(|e| bad(&dst, e))?;
            debug_assert!(f.data0 >= 8);
            for t in &f.tensors {
                weight_map.insert(t.clone(), json!(f.name));
            }
            out.push(dst);
        }
        let index = self.dir.join("model.safetensors.index.json");
        if self.files.len() > 1 {
            let v = json!({"metadata": {"total_size": self.total}, "weight_map": weight_map});
            write_atomic(&index, &serde_json::to_vec_pretty(&v)?)?;
            out.push(index);
        } else if index.exists() {
            // A sharded save before this one would shadow the single file.
            std::fs::remove_file(&index).map_err(|e| bad(&index, e))?;
        }
        let mut config = self.config;
        if let Some(o) = config.as_object_mut() {
            let name = match self.dtype {
                Kind::BFloat16 => "bfloat16",
                Kind::Half => "float16",
                Kind::Double => "float64",
                _ => "float32",
            };
            o.remove("torch_dtype");
            o.insert("dtype".into(), json!(name));
        }
        let cpath = self.dir.join("config.json");
        write_atomic(&cpath, &serde_json::to_vec_pretty(&config)?)?;
        out.push(cpath);
        Ok(out)
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::durable::replace_bytes(path, bytes).map_err(|e| bad(path, e))
}

/// A config.json Transformers reads for a model that came without one (the plan's model or
/// the tiny model): Llama, or Qwen2 when the q/k/v projections have biases.
pub fn synth_config(cfg: &ModelConfig) -> Value {
    let (arch, mt) = if cfg.qkv_bias {
        ("Qwen2ForCausalLM", "qwen2")
    } else {
        ("LlamaForCausalLM", "llama")
    };
    json!({
        "architectures": [arch],
        "model_type": mt,
        "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.qkv_bias,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings.unwrap_or(131072),
    })
}

/// Files of a model directory that `--save-hf` copies beside the weights (tokenizer and
/// generation settings), when present.
pub const SIDE_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
];
