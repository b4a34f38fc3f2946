//! MM-SP stage 1 on one rank, as one autograd-compatible step: encode this rank's frames,
//! re-shard the embeddings into the LLM's token shards, and hand the received vision rows to
//! the LLM as a leaf. After the LLM's backward, [`VisionStage::backward`] sends the leaf's
//! gradient back (the reverse all-to-all) and back-propagates it through the encoder and the
//! projector as a vector-Jacobian product (the pattern the trainer uses around attention).
use super::encoder::VisionEncoder;
use super::layout::{balanced_frames, ReshardMap, TokenLayout};
use super::reshard::Reshard;
use crate::comm::Communicator;
use crate::error::{Result, RuntimeError};
use tch::{Kind, Tensor};

/// What the forward keeps for the backward.
pub struct StageCtx {
    /// Encoder output rows (encoded_rows, llm_hidden) with their graph (None when frozen).
    encoded: Option<Tensor>,
    /// The received vision rows of this rank's shard (vision_rows, llm_hidden), compute
    /// dtype; an autograd leaf (requiring a gradient when the encoder trains).
    pub vision: Tensor,
}

/// The encoder and this rank's re-shard.
pub struct VisionStage {
    pub encoder: VisionEncoder,
    pub reshard: Reshard,
    /// Train the encoder and projector (else forward only, no reverse exchange).
    pub train: bool,
    /// The global frames this rank encodes, in encoder order.
    pub frames: Vec<usize>,
}

impl VisionStage {
    /// Rank `sp_rank`'s stage. `frames_per_rank`: the plan's `vision.frames_per_rank`, or
    /// None for [`balanced_frames`]; `ranges_per_rank`: the LLM's token ranges by SP rank
    /// (e.g. [`crate::packed::Packing::ranges_per_sp_rank`], as `run` uses, or
    /// [`super::layout::zigzag_ranges`] for one sequence); see [`Reshard::new`] for
    /// `comm_rank_of_sp`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        encoder: VisionEncoder,
        layout: &TokenLayout,
        frames_per_rank: Option<&[Vec<usize>]>,
        ranges_per_rank: &[Vec<(usize, usize)>],
        sp_rank: usize,
        comm_rank_of_sp: &[usize],
        comm_size: usize,
        train: bool,
    ) -> Result<VisionStage> {
        if layout.tokens_per_frame != encoder.cfg.tokens_per_frame() {
            return Err(RuntimeError::Config(format!(
                "the token layout has {} tokens per frame, the encoder makes {}",
                layout.tokens_per_frame,
                encoder.cfg.tokens_per_frame()
            )));
        }
        let fpr = match frames_per_rank {
            Some(f) => f.to_vec(),
            None => balanced_frames(layout.frames(), ranges_per_rank.len())?,
        };
        let map = ReshardMap::new(layout, &fpr, ranges_per_rank)?;
        let reshard = Reshard::new(
            &map,
            sp_rank,
            comm_rank_of_sp,
            comm_size,
            encoder.cfg.llm_hidden_size,
            encoder.device(),
        )?;
        Ok(VisionStage {
            encoder,
            reshard,
            train,
            frames: fpr[sp_rank].clone(),
        })
    }

    /// This rank's frames out of all frames of the step (F_all, C, H, W).
    pub fn local_frames(&self, all: &Tensor) -> Result<Tensor> {
        self.encoder.check_frames(all)?;
        let n = all.size()[0];
        if let Some(&f) = self.frames.iter().find(|&&f| f as i64 >= n) {
            return Err(RuntimeError::Shape(format!(
                "frame {f} requested from a batch of {n} frames"
            )));
        }
        let idx: Vec<i64> = self.frames.iter().map(|&f| f as i64).collect();
        Ok(all.index_select(0, &Tensor::from_slice(&idx).to_device(all.device())))
    }

    /// Encodes `frames` (this rank's, in [`VisionStage::frames`] order) and re-shards: every
    /// rank of the communicator must call it.
    pub fn forward(&self, comm: &dyn Communicator, frames: &Tensor) -> Result<StageCtx> {
        Ok(self.forward_timed(comm, frames, &|| {})?.0)
    }

    /// As [`VisionStage::forward`], also returning the seconds of the encoder and of the
    /// re-shard; `sync` is called before each clock reading (e.g. a device synchronise).
    pub fn forward_timed(
        &self,
        comm: &dyn Communicator,
        frames: &Tensor,
        sync: &dyn Fn(),
    ) -> Result<(StageCtx, f64, f64)> {
        sync();
        let t0 = std::time::Instant::now();
        let nf = frames.size().first().copied().unwrap_or(-1);
        if nf != self.frames.len() as i64 {
            return Err(RuntimeError::Shape(format!(
                "SP rank {} encodes {} frames, got {:?}",
                self.reshard.sp_rank,
                self.frames.len(),
                frames.size()
            )));
        }
        let h = self.encoder.cfg.llm_hidden_size as i64;
        let encoded = if self.train {
            self.encoder.forward(frames)?
        } else {
            tch::no_grad(|| self.encoder.forward(frames))?
        }
        .reshape([-1, h]);
        sync();
        let t1 = std::time::Instant::now();
        let vision = self
            .reshard
            .forward(comm, &encoded)?
            .set_requires_grad(self.train);
        sync();
        let (encode_s, reshard_s) = ((t1 - t0).as_secs_f64(), t1.elapsed().as_secs_f64());
        Ok((
            StageCtx {
                encoded: self.train.then_some(encoded),
                vision,
            },
            encode_s,
            reshard_s,
        ))
    }

    /// The local shard's embeddings (local_len, llm_hidden): the received vision rows and
    /// `text` (this rank's text-token embeddings, in `reshard.text_rows()` order).
    pub fn merge(&self, ctx: &StageCtx, text: &Tensor) -> Result<Tensor> {
        self.reshard.merge(&ctx.vision, text)
    }

    /// After the LLM's backward has filled `ctx.vision.grad()` (an undefined gradient counts
    /// as zero): the reverse exchange and the encoder's backward. Parameter gradients
    /// accumulate into their `.grad()`; summing them over the SP (and DP) group is the
    /// optimizer's job, as for the decoder. Every rank must call it when training.
    pub fn backward(&self, comm: &dyn Communicator, ctx: StageCtx) -> Result<()> {
        let g = ctx.vision.grad();
        let g = if g.defined() {
            g
        } else {
            self.reshard
                .zeros_vision(ctx.vision.kind(), ctx.vision.device())
        };
        self.backward_vision(comm, ctx, &g, &|| {}).map(|_| ())
    }

    /// As [`VisionStage::backward`], from the gradient of the whole local shard
    /// (local_len, hidden) or (1, local_len, hidden), as [`crate::train::Trainer`]'s
    /// `step_embeddings` returns it. Returns the gradient of the text rows (in
    /// `reshard.text_rows()` order), for the caller's text embedding.
    pub fn backward_local(
        &self,
        comm: &dyn Communicator,
        ctx: StageCtx,
        grad_local: &Tensor,
    ) -> Result<Tensor> {
        let h = self.encoder.cfg.llm_hidden_size as i64;
        let g = if grad_local.dim() == 3 && grad_local.size()[0] == 1 {
            grad_local.view([-1, h])
        } else {
            grad_local.shallow_clone()
        };
        let (gv, gt) = self.reshard.split(&g)?;
        self.backward_vision(comm, ctx, &gv, &|| {})?;
        Ok(gt)
    }

    /// As [`VisionStage::backward_local`], also returning the seconds of the reverse
    /// exchange and of the encoder's backward (0 when frozen); `sync` as in
    /// [`VisionStage::forward_timed`].
    pub fn backward_local_timed(
        &self,
        comm: &dyn Communicator,
        ctx: StageCtx,
        grad_local: &Tensor,
        sync: &dyn Fn(),
    ) -> Result<(Tensor, f64, f64)> {
        let h = self.encoder.cfg.llm_hidden_size as i64;
        let g = if grad_local.dim() == 3 && grad_local.size()[0] == 1 {
            grad_local.view([-1, h])
        } else {
            grad_local.shallow_clone()
        };
        let (gv, gt) = self.reshard.split(&g)?;
        let (a, b) = self.backward_vision(comm, ctx, &gv, sync)?;
        Ok((gt, a, b))
    }

    /// The reverse exchange and the encoder's backward: their seconds.
    fn backward_vision(
        &self,
        comm: &dyn Communicator,
        ctx: StageCtx,
        g: &Tensor,
        sync: &dyn Fn(),
    ) -> Result<(f64, f64)> {
        let Some(encoded) = ctx.encoded else {
            return Ok((0.0, 0.0));
        };
        sync();
        let t0 = std::time::Instant::now();
        let ge = self.reshard.backward(comm, g)?;
        sync();
        let t1 = std::time::Instant::now();
        if encoded.size()[0] > 0 && encoded.requires_grad() {
            (&encoded * ge.to_kind(encoded.kind()))
                .sum(Kind::Double)
                .backward();
        }
        sync();
        Ok(((t1 - t0).as_secs_f64(), t1.elapsed().as_secs_f64()))
    }
}
