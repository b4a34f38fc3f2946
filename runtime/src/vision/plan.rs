//! The `vision` section of a plan (`mmsp plan --frames N` / `--samples`), as `run` executes
//! it: the packed token layout (per sample: its frames' tokens, then its text, then its
//! padding (`pad_tokens_per_sample`: the planner pads each sample at its end to a multiple of
//! 2 x ulysses x ring; ids of any token, no loss, and under causal masking no real token
//! attends to it), as the planner lays them out, padded with trailing text-like tokens up to
//! the plan's context),
//! stage 1 exactly as the plan's `frames_per_rank`, and stage 2 the per-sample zigzag shards
//! of the packed sequence ([`crate::packed::Packing`]: each sample, and the padding as one
//! more sample, sharded on its own, which is the plan's `tokens.ranges_per_rank` followed by
//! the padding's ranges), where the trainer attends within each sample only. With two or
//! more samples (padding included) each length must be a multiple of 2 x ulysses x ring.
//! Everything here is checked without a device or peers, so a plan that cannot run is a
//! one-line error before any communication.
use super::config::{Pooling, VisionConfig};
use super::layout::{ReshardMap, SampleSpec, TokenLayout};
use crate::error::{Result, RuntimeError};
use crate::packed::Packing;
use std::path::PathBuf;

/// The planner's predicted stage times (`vision.stage`).
#[derive(Debug, Clone, Copy, Default)]
pub struct PredictedStage {
    pub encoder_s: f64,
    pub gather_s: f64,
    pub reshard_s: f64,
}

/// The plan's `vision` section ([`mmsp_plan::VisionPlan`]) in the runtime's index types.
#[derive(Debug, Clone)]
pub struct VisionSection {
    pub encoder: String,
    pub tokens_per_frame: usize,
    pub frames: usize,
    pub samples: usize,
    pub sample_lens: Vec<usize>,
    /// Absent in plans of older planners (then only a one-sample plan can be laid out).
    pub frames_per_sample: Option<Vec<usize>>,
    pub text_tokens_per_sample: Option<Vec<usize>>,
    /// Padding at the end of each sample, within its `sample_lens` (absent in plans of older
    /// planners: none).
    pub pad_tokens_per_sample: Option<Vec<usize>>,
    pub train_vision: bool,
    pub frames_per_rank: Vec<Vec<usize>>,
    pub stage: Option<PredictedStage>,
}

impl VisionSection {
    /// The plan's section, its counts in `usize` (one past the address space is refused).
    pub fn from_plan(v: &mmsp_plan::VisionPlan) -> Result<VisionSection> {
        let n = |what: &str, x: u64| {
            usize::try_from(x).map_err(|_| {
                RuntimeError::Plan(format!(
                    "vision.{what} {x} is more than this machine addresses"
                ))
            })
        };
        let all =
            |what: &str, xs: &[u64]| xs.iter().map(|&x| n(what, x)).collect::<Result<Vec<_>>>();
        let opt =
            |what: &str, xs: &Option<Vec<u64>>| xs.as_deref().map(|x| all(what, x)).transpose();
        Ok(VisionSection {
            encoder: v.encoder.clone(),
            tokens_per_frame: n("tokens_per_frame", v.tokens_per_frame)?,
            frames: n("frames", v.frames)?,
            samples: n("samples", v.samples)?,
            sample_lens: all("sample_lens", &v.sample_lens)?,
            frames_per_sample: opt("frames_per_sample", &v.frames_per_sample)?,
            text_tokens_per_sample: opt("text_tokens_per_sample", &v.text_tokens_per_sample)?,
            pad_tokens_per_sample: opt("pad_tokens_per_sample", &v.pad_tokens_per_sample)?,
            train_vision: v.train_vision,
            frames_per_rank: v.frames_per_rank.clone(),
            stage: Some(PredictedStage {
                encoder_s: v.stage.encoder_s,
                gather_s: v.stage.gather_s,
                reshard_s: v.stage.reshard_s,
            }),
        })
    }
}

/// Where the encoder's shape comes from.
#[derive(Debug, Clone)]
pub enum EncoderSource {
    /// The plan's encoder preset (`siglip-so400m`, `siglip-so400m-nopool`, `clip-vit-l-336`).
    Preset,
    /// A tiny encoder (2 layers, hidden 32) making the plan's tokens per frame.
    Tiny,
    /// A Hugging Face vision `config.json`; the pooling is the one that gives the plan's
    /// tokens per frame.
    HfConfig(PathBuf),
}

/// What `run` executes for a plan's vision section.
#[derive(Debug, Clone)]
pub struct VisionRun {
    pub section: VisionSection,
    pub cfg: VisionConfig,
    /// The packed samples (each sample's padding as text-like tokens after its text) plus,
    /// when the plan's context is longer, one padding "sample" (no frames, text-like tokens
    /// without loss).
    pub layout: TokenLayout,
    /// Padding tokens in all (no loss): each sample's `pad_tokens_per_sample` and the padding
    /// sample up to the context.
    pub padding: usize,
    /// The trainer's samples ([`crate::train::Trainer::new_packed`]): the plan's
    /// `sample_lens`, then the padding when there is some.
    pub sample_lens: Vec<usize>,
    /// Stage 2: the trainer's per-sample zigzag ranges by SP rank.
    pub ranges: Vec<Vec<(usize, usize)>>,
    /// Per position p: p's label is the next token (p + 1 is a text token of the same
    /// sample, not its padding nor the padding sample); else -100.
    pub text_target: Vec<bool>,
}

impl VisionConfig {
    /// A tiny encoder (2 layers, hidden 32, 4 x 4 patches, 2x2 concatenating pooling)
    /// making `tokens_per_frame` (a square, g x g) tokens per frame: 8g x 8g pixel frames.
    /// [`VisionConfig::tiny`] is `tiny_for(4, ..)`.
    pub fn tiny_for(tokens_per_frame: usize, llm_hidden: usize) -> Result<VisionConfig> {
        let g = (tokens_per_frame as f64).sqrt().round() as usize;
        if g == 0 || g * g != tokens_per_frame {
            return Err(RuntimeError::Config(format!(
                "the tiny encoder needs a square number of tokens per frame, the plan has {tokens_per_frame}"
            )));
        }
        let mut c = VisionConfig::tiny(llm_hidden);
        c.image_size = 8 * g;
        Ok(c)
    }

    /// The planner's vision presets with a projector into `llm_hidden`.
    pub fn preset(name: &str, llm_hidden: usize) -> Result<VisionConfig> {
        match name {
            "siglip-so400m" => Ok(VisionConfig::siglip_so400m(llm_hidden)),
            "siglip-so400m-nopool" => Ok(VisionConfig {
                pooling: Pooling::None,
                ..VisionConfig::siglip_so400m(llm_hidden)
            }),
            "clip-vit-l-336" => Ok(VisionConfig {
                hidden_size: 1024,
                intermediate_size: 4096,
                num_layers: 24,
                num_heads: 16,
                image_size: 336,
                patch_size: 14,
                num_channels: 3,
                layer_norm_eps: 1e-5,
                // CLIP's quick_gelu is run as the exact GELU (same cost).
                gelu_tanh: false,
                pooling: Pooling::None,
                projector_hidden: llm_hidden,
                llm_hidden_size: llm_hidden,
            }),
            _ => Err(RuntimeError::Config(format!(
                "the runtime has no vision encoder preset {name:?} (siglip-so400m, \
                 siglip-so400m-nopool, clip-vit-l-336): use --vision-config or --tiny"
            ))),
        }
    }
}

impl VisionSection {
    /// Each sample's padding (`pad_tokens_per_sample`, zeros when absent), checked against the
    /// section.
    pub fn sample_pads(&self) -> Result<Vec<usize>> {
        let n = self.sample_lens.len();
        match &self.pad_tokens_per_sample {
            None => Ok(vec![0; n]),
            Some(p) if p.len() == n => Ok(p.clone()),
            Some(p) => Err(RuntimeError::Plan(format!(
                "vision: pad_tokens_per_sample has {} entries for {n} samples",
                p.len()
            ))),
        }
    }

    /// The samples (frames, text tokens, without their padding) in packing order, checked
    /// against the section: each length is frames x tokens_per_frame + text + padding.
    pub fn sample_specs(&self) -> Result<Vec<SampleSpec>> {
        let bad = |m: String| Err(RuntimeError::Plan(format!("vision: {m}")));
        let n = self.sample_lens.len();
        if n != self.samples {
            return bad(format!(
                "samples is {} but sample_lens has {n} entries",
                self.samples
            ));
        }
        let frames: Vec<usize> = match &self.frames_per_sample {
            Some(f) => f.clone(),
            None if n == 1 => vec![self.frames],
            None => {
                return bad(format!(
                    "{n} samples but no frames_per_sample (a plan of an older planner): \
                     plan again with this planner"
                ))
            }
        };
        if frames.len() != n {
            return bad(format!(
                "frames_per_sample has {} entries for {n} samples",
                frames.len()
            ));
        }
        if frames.iter().sum::<usize>() != self.frames {
            return bad(format!(
                "frames_per_sample sums to {}, frames is {}",
                frames.iter().sum::<usize>(),
                self.frames
            ));
        }
        let t = self.tokens_per_frame;
        let pads = self.sample_pads()?;
        let mut out = Vec::with_capacity(n);
        for (i, (&f, &len)) in frames.iter().zip(&self.sample_lens).enumerate() {
            let pad = pads[i];
            let vis = f
                .checked_mul(t)
                .and_then(|v| v.checked_add(pad))
                .filter(|&v| v <= len)
                .ok_or_else(|| {
                    RuntimeError::Plan(format!(
                        "vision: sample {i} has {f} frames of {t} tokens and {pad} padding \
                         tokens but {len} tokens in all"
                    ))
                })?;
            let text = len - vis;
            if let Some(tt) = &self.text_tokens_per_sample {
                if tt.get(i) != Some(&text) {
                    return bad(format!(
                        "sample {i}: {len} tokens are not {f} frames x {t} + {:?} text tokens \
                         + {pad} padding (frames of another resolution? the runtime's encoder \
                         has one)",
                        tt.get(i)
                    ));
                }
            }
            out.push(SampleSpec {
                frames: f,
                text_tokens: text,
            });
        }
        Ok(out)
    }

    /// Everything `run` needs, checked: the SP group is `ulysses` x `ring` ranks (the
    /// plan's layout), the packed sequence `context` tokens (the plan's `context_tokens`).
    pub fn resolve(
        &self,
        source: &EncoderSource,
        llm_hidden: usize,
        context: usize,
        ulysses: usize,
        ring: usize,
    ) -> Result<VisionRun> {
        let sp = ulysses * ring;
        if self.frames_per_rank.len() != sp {
            return Err(RuntimeError::Plan(format!(
                "vision.frames_per_rank has {} ranks, the plan's SP group (ulysses {ulysses} x \
                 ring {ring}) has {sp}",
                self.frames_per_rank.len()
            )));
        }
        let assigned: usize = self.frames_per_rank.iter().map(Vec::len).sum();
        if assigned != self.frames {
            return Err(RuntimeError::Plan(format!(
                "vision.frames_per_rank holds {assigned} frames, vision.frames is {}",
                self.frames
            )));
        }
        let pads = self.sample_pads()?;
        // Each sample's padding sits after its text: text-like positions without loss.
        let mut samples: Vec<SampleSpec> = self
            .sample_specs()?
            .into_iter()
            .zip(&pads)
            .map(|(s, &pad)| SampleSpec {
                text_tokens: s.text_tokens + pad,
                ..s
            })
            .collect();
        let packed: usize = self.sample_lens.iter().sum();
        if packed > context {
            return Err(RuntimeError::Plan(format!(
                "vision: the samples hold {packed} tokens, more than context_tokens {context}"
            )));
        }
        let padding = context - packed;
        if padding > 0 {
            samples.push(SampleSpec {
                frames: 0,
                text_tokens: padding,
            });
        }
        let cfg = match source {
            EncoderSource::Preset => VisionConfig::preset(&self.encoder, llm_hidden)?,
            EncoderSource::Tiny => VisionConfig::tiny_for(self.tokens_per_frame, llm_hidden)?,
            EncoderSource::HfConfig(p) => {
                let mut last = None;
                let mut found = None;
                for pool in [Pooling::Concat2x2, Pooling::None] {
                    let c = VisionConfig::from_hf_file(p, pool, llm_hidden)?;
                    if c.tokens_per_frame() == self.tokens_per_frame {
                        found = Some(c);
                        break;
                    }
                    last = Some(c);
                }
                match found {
                    Some(c) => c,
                    None => last.ok_or_else(|| {
                        RuntimeError::Config(format!("{}: no usable pooling", p.display()))
                    })?,
                }
            }
        };
        if cfg.tokens_per_frame() != self.tokens_per_frame {
            return Err(RuntimeError::Config(format!(
                "the vision encoder makes {} tokens per frame, the plan has {}",
                cfg.tokens_per_frame(),
                self.tokens_per_frame
            )));
        }
        let layout = TokenLayout::new(&samples, self.tokens_per_frame)?;
        let sample_lens = layout.sample_lens();
        let ranges = Packing::new(&sample_lens, ulysses, ring)
            .map_err(|e| match e {
                RuntimeError::Shape(m) if padding > 0 => RuntimeError::Plan(format!(
                    "vision: {m}; sample {} is the padding up to context_tokens",
                    sample_lens.len() - 1
                )),
                RuntimeError::Shape(m) => RuntimeError::Plan(format!("vision: {m}")),
                e => e,
            })?
            .ranges_per_sp_rank();
        // Checks frames_per_rank is a partition of the frames (no repeats, none missing).
        ReshardMap::new(&layout, &self.frames_per_rank, &ranges)
            .map_err(|e| RuntimeError::Plan(format!("vision.frames_per_rank: {e}")))?;
        let vision = layout.vision_mask();
        let mut sample_of = Vec::with_capacity(context);
        let mut pad = Vec::with_capacity(context);
        for (i, len) in layout.sample_lens().into_iter().enumerate() {
            sample_of.extend(std::iter::repeat_n(i, len));
            let p = pads.get(i).copied().unwrap_or(0);
            pad.extend(std::iter::repeat_n(false, len - p));
            pad.extend(std::iter::repeat_n(true, p));
        }
        let text_target = (0..context)
            .map(|p| {
                p + 1 < packed && !vision[p + 1] && !pad[p + 1] && sample_of[p + 1] == sample_of[p]
            })
            .collect();
        Ok(VisionRun {
            section: self.clone(),
            cfg,
            layout,
            padding: padding + pads.iter().sum::<usize>(),
            sample_lens,
            ranges,
            text_target,
        })
    }
}
