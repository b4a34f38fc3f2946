//! What a training run reads and writes beyond the plan and its own checkpoints: pretrained
//! weights (a Hugging Face model directory), the training data, the learning-rate schedule,
//! the per-step metrics file, and `--save-hf` checkpoints that Transformers loads.
//!
//! Everything here is opened and checked by [`Inputs::load`] before any rank starts, so a
//! missing tensor, a bad data line or a mismatched config is one error, never a hang.
use super::data::{Dataset, TextTokenizer};
use super::report::{DataSummary, RunReport, WeightsSummary};
use super::video::{Normalize, VideoData};
use super::Trainer;
use crate::error::{Result, RuntimeError};
use crate::model::hf::{
    config_dtype, synth_config, weight_files, HfCheckpoint, HfWriter, SIDE_FILES,
};
use crate::model::{Decoder, ModelConfig};
use crate::vision::VisionRun;
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::Kind;

/// Learning rate by step: linear warmup from 0, then constant or cosine decay to
/// `min_ratio` x peak at `decay_steps` (the schedule of Megatron-LM's
/// `--lr-decay-style cosine` and Transformers' `get_cosine_schedule_with_warmup` with a floor).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub peak: f64,
    pub warmup_steps: usize,
    /// 0: constant after warmup.
    pub decay_steps: usize,
    pub min_ratio: f64,
}

impl LrSchedule {
    /// A constant rate.
    pub fn constant(lr: f64) -> LrSchedule {
        LrSchedule {
            peak: lr,
            warmup_steps: 0,
            decay_steps: 0,
            min_ratio: 1.0,
        }
    }

    /// The rate of step index `step` (0-based).
    pub fn at(&self, step: usize) -> f64 {
        let s = step as f64 + 1.0;
        if step < self.warmup_steps {
            return self.peak * s / self.warmup_steps as f64;
        }
        if self.decay_steps <= self.warmup_steps {
            return self.peak;
        }
        let span = (self.decay_steps - self.warmup_steps) as f64;
        let p = ((step - self.warmup_steps) as f64 / span).min(1.0);
        let min = self.peak * self.min_ratio;
        min + (self.peak - min) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
    }
}

/// Where `--save-hf` writes, and how.
#[derive(Debug, Clone)]
pub struct SaveHf {
    pub dir: PathBuf,
    /// None: the input checkpoint's dtype, else bf16 on CUDA and f32 on the CPU.
    pub dtype: Option<Kind>,
    /// Bytes per safetensors file before a new one starts (Transformers' `max_shard_size`).
    pub max_shard_bytes: u64,
}

/// The model weights and data of a run, opened once in the launching process and shared by
/// its rank threads.
pub struct Inputs {
    pub weights: Option<Arc<HfCheckpoint>>,
    pub data: Option<Dataset>,
    /// A plan with a vision section: its manifest of frames and text.
    pub video: Option<VideoData>,
    /// The vision encoder's safetensors files (a `--vision-config` directory); empty: random.
    pub vision_weights: Vec<PathBuf>,
    /// The config.json that `--save-hf` writes (the input's, or one made for the model).
    pub config_json: Value,
    /// The model directory whose tokenizer and generation files are copied beside a save.
    pub side_dir: Option<PathBuf>,
}

impl Inputs {
    /// Takes the opened model directory ([`super::run::load`] parsed its config and every
    /// safetensors header, checked against each other) and opens the data file (tokenized now, if text), checking
    /// ids against the vocabulary and the context.
    pub fn load(
        weights: Option<Arc<HfCheckpoint>>,
        cfg: &ModelConfig,
        data: Option<&Path>,
        data_seed: u64,
        context: usize,
        vision: Option<(&VisionRun, Option<&Path>)>,
    ) -> Result<Inputs> {
        let model_dir = weights.as_ref().map(|w| w.dir.clone());
        let model_dir = model_dir.as_deref();
        let config_json = weights
            .as_ref()
            .map_or_else(|| synth_config(cfg), |w| w.config_json.clone());
        let tok = match (data, model_dir) {
            (Some(p), Some(d))
                if p.extension().is_some_and(|e| e == "jsonl")
                    && d.join("tokenizer.json").is_file() =>
            {
                Some(TextTokenizer::from_model_dir(d, &config_json)?)
            }
            _ => None,
        };
        let mut video = None;
        let data = match (data, vision) {
            (Some(p), Some((vr, vdir))) => {
                let tok = tok.as_ref().ok_or_else(|| {
                    RuntimeError::Data(format!(
                        "{}: a video manifest needs --model DIR with a tokenizer.json",
                        p.display()
                    ))
                })?;
                let pre = vdir.map(|d| d.join("preprocessor_config.json"));
                let norm = match pre.filter(|p| p.is_file()) {
                    Some(p) => Normalize::from_preprocessor(&p)?,
                    None => Normalize::SIGLIP,
                };
                let (slots, size) = (vr.section.samples, vr.cfg.image_size);
                video = Some(VideoData::open(p, tok, &vr.layout, slots, size, norm)?);
                None
            }
            (Some(p), None) => Some(Dataset::open(
                p,
                context,
                cfg.vocab_size,
                data_seed,
                tok.as_ref(),
            )?),
            (None, _) => None,
        };
        let vision_weights = match vision {
            Some((_, Some(d))) => weight_files(d)?,
            _ => Vec::new(),
        };
        Ok(Inputs {
            weights,
            data,
            video,
            vision_weights,
            config_json,
            side_dir: model_dir.map(Path::to_path_buf),
        })
    }

    /// The decoder a rank starts from: the checkpoint's (deferred: the trainer reads what the
    /// rank owns) or seeded random weights.
    pub fn decoder(
        &self,
        cfg: &ModelConfig,
        dev: tch::Device,
        master: Kind,
        compute: Kind,
    ) -> Result<Decoder> {
        match &self.weights {
            Some(w) => Ok(Decoder::deferred_hf(w.clone(), dev, master, compute)),
            None => Decoder::random(cfg.clone(), dev, master, compute, 1),
        }
    }

    /// The report's `weights` (the directory, and the tensor bytes this process read from it
    /// against the model's: one model's worth in all when ZeRO shards it, one per rank
    /// otherwise) and `data` (file, tokens, sequences per epoch).
    pub fn describe(&self, report: &mut RunReport) {
        report.weights = self.weights.as_ref().map(|w| WeightsSummary {
            dir: w.dir.clone(),
            bytes_read: w.bytes_read(),
            model_bytes: w.model_bytes(),
        });
        if let Some(v) = &self.video {
            report.data = Some(DataSummary {
                path: v.path.clone(),
                tokens: None,
                sequences_per_epoch: None,
                video_samples: Some(v.num_samples()),
            });
        }
        if let Some(d) = &self.data {
            report.data = Some(DataSummary {
                path: d.path.clone(),
                tokens: Some(d.num_tokens),
                sequences_per_epoch: Some(d.num_sequences),
                video_samples: None,
            });
        }
    }

    /// The dtype a save writes by default.
    fn save_dtype(&self, s: &SaveHf, cpu: bool) -> Kind {
        s.dtype
            .or_else(|| {
                self.weights
                    .as_ref()
                    .and_then(|w| config_dtype(&w.config_json))
            })
            .unwrap_or(if cpu { Kind::Float } else { Kind::BFloat16 })
    }
}

/// Writes the trainer's model as a Hugging Face directory: every rank of the grad group
/// takes part (one unit gathered at a time), `writer_rank` writes. Returns the files written
/// (empty on the other ranks).
pub fn save_hf(
    t: &Trainer<'_>,
    inputs: &Inputs,
    s: &SaveHf,
    cpu: bool,
    writes: bool,
) -> Result<Vec<PathBuf>> {
    let cfg = &t.model.cfg;
    let mut w = match writes {
        true => Some(HfWriter::create(
            &s.dir,
            &inputs.config_json,
            &Decoder::param_shapes(cfg),
            inputs.save_dtype(s, cpu),
            s.max_shard_bytes,
        )?),
        false => None,
    };
    t.visit_full_parameters(&mut |name, p| match &mut w {
        Some(w) => w.write(name, p),
        None => Ok(()),
    })?;
    let Some(w) = w else {
        return Ok(Vec::new());
    };
    let mut files = w.finish()?;
    if let Some(src) = &inputs.side_dir {
        for f in SIDE_FILES {
            let from = src.join(f);
            if from.is_file() && src != &s.dir {
                let to = s.dir.join(f);
                std::fs::copy(&from, &to).map_err(|e| {
                    RuntimeError::Config(format!(
                        "copying {} to {}: {e}",
                        from.display(),
                        to.display()
                    ))
                })?;
                files.push(to);
            }
        }
    }
    Ok(files)
}

/// The per-step metrics file: one JSON object per line, appended and flushed after each
/// step, so that a crashed run keeps what it measured.
pub struct Metrics {
    file: std::fs::File,
    path: PathBuf,
}

impl Metrics {
    /// Opens `path` for appending (a resumed run continues the same file).
    pub fn open(path: &Path) -> Result<Metrics> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| RuntimeError::Config(format!("--metrics {}: {e}", path.display())))?;
        Ok(Metrics {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Appends one line.
    pub fn write(&mut self, v: &Value) -> Result<()> {
        writeln!(self.file, "{v}")
            .and_then(|_| self.file.flush())
            .map_err(|e| RuntimeError::Config(format!("--metrics {}: {e}", self.path.display())))
    }
}
