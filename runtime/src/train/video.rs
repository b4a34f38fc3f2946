//! Video/image training data: a manifest JSONL whose samples name frame image files (JPEG or
//! PNG, paths relative to the manifest) and carry text, fitted to the plan's packed layout.
//!
//! A manifest line: `{"frames": ["a/0001.jpg", ...], "text": "..."}`, or with `"prompt"` and
//! `"completion"` for SFT (loss on the completion only). The plan fixes each packed slot's
//! frames and text tokens (`mmsp plan --samples`); a manifest sample fills a slot as the
//! LongVILA recipe samples a video: its frames taken uniformly (frame `floor(k L / F)` of its
//! L for the slot's F, so a short video repeats frames), its text tokenized, ended with the
//! end-of-sequence token, then truncated or padded (padding carries no loss) to the slot's
//! text tokens. As the planner lays a sample out, its frame tokens come first and its text
//! after them.
//!
//! Pixels as Transformers' SigLIP image processor makes them: RGB, resized to the encoder's
//! `image_size` square (bicubic: Catmull-Rom, PIL's BICUBIC kernel), scaled by 1/255, then
//! `(x - mean) / std` per channel (SigLIP: 0.5 and 0.5; `preprocessor_config.json`'s
//! `image_mean` / `image_std` when given). Step s on DP rank d fills slot i with manifest
//! sample `((s * dp + d) * slots + i) mod n`. Every file is opened and decoded once by
//! [`VideoData::open`], so a missing or corrupt frame is one error before the first step.
use super::data::TextTokenizer;
use crate::error::{Result, RuntimeError};
use crate::vision::layout::TokenLayout;
use serde_json::Value;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

fn bad(path: &Path, what: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Data(format!("{}: {what}", path.display()))
}

/// Per-channel normalisation of pixels in [0, 1].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normalize {
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Normalize {
    /// SigLIP's (`image_mean` = `image_std` = 0.5).
    pub const SIGLIP: Normalize = Normalize {
        mean: [0.5; 3],
        std: [0.5; 3],
    };

    /// `image_mean` and `image_std` of a Transformers `preprocessor_config.json`.
    pub fn from_preprocessor(path: &Path) -> Result<Normalize> {
        let text = std::fs::read_to_string(path).map_err(|e| bad(path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| bad(path, e))?;
        let three = |k: &str| -> Result<[f32; 3]> {
            let a: Vec<f32> = serde_json::from_value(v.get(k).cloned().unwrap_or_default())
                .map_err(|e| bad(path, format!("{k}: {e}")))?;
            a.try_into()
                .map_err(|_| bad(path, format!("{k} must have 3 values")))
        };
        Ok(Normalize {
            mean: three("image_mean")?,
            std: three("image_std")?,
        })
    }
}

/// One manifest sample.
struct VideoSample {
    frames: Vec<PathBuf>,
    /// Token ids and whether each carries loss.
    ids: Vec<u32>,
    loss: Vec<bool>,
}

/// A video manifest fitted to a packed layout.
pub struct VideoData {
    pub path: PathBuf,
    samples: Vec<VideoSample>,
    layout: TokenLayout,
    /// Slots holding samples (the plan's samples; a padding slot after them takes none).
    slots: usize,
    image_size: u32,
    norm: Normalize,
    /// Global frame -> (slot, frame index within the slot).
    frame_slot: Vec<(usize, usize)>,
    /// Position of each slot's first text token.
    text_starts: Vec<usize>,
}

/// Decodes one image into (3, size, size) float32 pixels, resized and normalised.
pub fn load_frame(path: &Path, size: u32, norm: &Normalize) -> Result<Tensor> {
    let img = image::open(path).map_err(|e| bad(path, format!("cannot decode the image: {e}")))?;
    let rgb = img
        .resize_exact(size, size, image::imageops::FilterType::CatmullRom)
        .to_rgb8();
    let raw = rgb.into_raw();
    let px = Tensor::from_slice(&raw)
        .view([size as i64, size as i64, 3])
        .permute([2, 0, 1])
        .to_kind(Kind::Float)
        / 255.0;
    let mean = Tensor::from_slice(&norm.mean).view([3, 1, 1]);
    let std = Tensor::from_slice(&norm.std).view([3, 1, 1]);
    Ok((px - mean) / std)
}

impl VideoData {
    /// Reads the manifest, tokenizes its text and decodes every frame once (checking them).
    pub fn open(
        path: &Path,
        tok: &TextTokenizer,
        layout: &TokenLayout,
        slots: usize,
        image_size: usize,
        norm: Normalize,
    ) -> Result<VideoData> {
        let text = std::fs::read_to_string(path).map_err(|e| bad(path, e))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut samples = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let at = |what: String| bad(path, format!("sample on line {}: {what}", i + 1));
            let v: Value = serde_json::from_str(line).map_err(|e| at(format!("not JSON: {e}")))?;
            let frames: Vec<PathBuf> = v
                .get("frames")
                .and_then(Value::as_array)
                .filter(|a| !a.is_empty())
                .and_then(|a| a.iter().map(|f| f.as_str().map(|s| base.join(s))).collect())
                .ok_or_else(|| at("expected \"frames\": a non-empty list of image paths".into()))?;
            for f in &frames {
                let _ = load_frame(f, image_size as u32, &norm).map_err(|e| at(e.to_string()))?;
            }
            let enc = |s: &str, specials| {
                tok.encode(s, specials)
                    .map_err(|e| at(format!("tokenizer: {e}")))
            };
            let field = |k: &str| v.get(k).and_then(Value::as_str);
            let (prompt, body) = match (field("text"), field("prompt"), field("completion")) {
                (Some(t), _, _) => (Vec::new(), enc(t, true)?),
                (None, Some(p), Some(c)) => (enc(p, true)?, enc(c, false)?),
                _ => {
                    return Err(at(
                        "expected \"text\", or \"prompt\" and \"completion\"".into()
                    ))
                }
            };
            let mut loss = vec![false; prompt.len()];
            loss.resize(prompt.len() + body.len(), true);
            let mut ids = prompt;
            ids.extend(body);
            if let Some(e) = tok.eos {
                ids.push(e);
                loss.push(true);
            }
            samples.push(VideoSample { frames, ids, loss });
        }
        if samples.is_empty() {
            return Err(bad(path, "no samples"));
        }
        let mut frame_slot = Vec::new();
        let mut text_starts = Vec::new();
        let mut at = 0;
        for (slot, s) in layout.samples.iter().enumerate() {
            frame_slot.extend((0..s.frames).map(|k| (slot, k)));
            at += s.frames * layout.tokens_per_frame;
            text_starts.push(at);
            at += s.text_tokens;
        }
        Ok(VideoData {
            path: path.to_path_buf(),
            samples,
            layout: layout.clone(),
            slots: slots.min(layout.samples.len()),
            image_size: image_size as u32,
            norm,
            frame_slot,
            text_starts,
        })
    }

    /// Samples in the manifest.
    pub fn num_samples(&self) -> usize {
        self.samples.len()
    }

    /// The manifest sample in `slot` at this step (None for a padding slot).
    fn sample_of(
        &self,
        step: usize,
        dp_rank: usize,
        dp: usize,
        slot: usize,
    ) -> Option<&VideoSample> {
        if slot >= self.slots {
            return None;
        }
        let j = ((step * dp + dp_rank) * self.slots + slot) % self.samples.len();
        Some(&self.samples[j])
    }

    /// Pixels (F, 3, size, size) of the global frames `frames` at this step.
    pub fn frames(
        &self,
        step: usize,
        dp_rank: usize,
        dp: usize,
        frames: &[usize],
        dev: Device,
    ) -> Result<Tensor> {
        let s = self.image_size as i64;
        if frames.is_empty() {
            return Ok(Tensor::zeros([0, 3, s, s], (Kind::Float, dev)));
        }
        let mut out = Vec::with_capacity(frames.len());
        for &g in frames {
            let (slot, k) = self.frame_slot[g];
            let smp = self.sample_of(step, dp_rank, dp, slot).ok_or_else(|| {
                RuntimeError::Shape(format!("frame {g} is in padding slot {slot}"))
            })?;
            let want = self.layout.samples[slot].frames;
            let f = &smp.frames[k * smp.frames.len() / want];
            out.push(load_frame(f, self.image_size, &self.norm)?);
        }
        Ok(Tensor::stack(&out, 0).to(dev))
    }

    /// Ids and labels (1, S) of the packed sequence at this step: each slot's text at its
    /// text positions; labels only where `text_target` allows and the next token has loss.
    pub fn text(
        &self,
        step: usize,
        dp_rank: usize,
        dp: usize,
        text_target: &[bool],
        dev: Device,
    ) -> (Tensor, Tensor) {
        let n = text_target.len();
        let mut ids = vec![0i64; n];
        let mut has_loss = vec![false; n];
        for (slot, spec) in self.layout.samples.iter().enumerate() {
            let Some(smp) = self.sample_of(step, dp_rank, dp, slot) else {
                continue;
            };
            let a = self.text_starts[slot];
            for k in 0..spec.text_tokens.min(smp.ids.len()) {
                ids[a + k] = smp.ids[k] as i64;
                has_loss[a + k] = smp.loss[k];
            }
        }
        let labels: Vec<i64> = (0..n)
            .map(|p| {
                if text_target[p] && p + 1 < n && has_loss[p + 1] {
                    ids[p + 1]
                } else {
                    -100
                }
            })
            .collect();
        let s = n as i64;
        (
            Tensor::from_slice(&ids).view([1, s]).to(dev),
            Tensor::from_slice(&labels).view([1, s]).to(dev),
        )
    }
}
