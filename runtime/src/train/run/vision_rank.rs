//! One rank's vision stage in a run (MM-SP stage 1): the encoder with its re-shard and
//! optimizer, and the VLM step that feeds the decoder (frames and text from the video
//! manifest, or synthetic ones).
use super::*;

/// Token ids as [`synthetic`], labels only where [`VisionRun::text_target`] says.
pub(super) fn synthetic_vlm(
    step: usize,
    vr: &VisionRun,
    vocab: usize,
    dev: Device,
) -> (Tensor, Tensor) {
    let seq = vr.text_target.len();
    let ids: Vec<i64> = (0..seq as i64)
        .map(|i| (i * 7 + (step as i64) * 13 + (i * i) % 5) % vocab as i64)
        .collect();
    let labels: Vec<i64> = (0..seq)
        .map(|p| if vr.text_target[p] { ids[p + 1] } else { -100 })
        .collect();
    let s = seq as i64;
    (
        Tensor::from_slice(&ids).view([1, s]).to(dev),
        Tensor::from_slice(&labels).view([1, s]).to(dev),
    )
}

/// Pixels of the global `frames` at `step`: (F, C, H, W) float32, each a fixed function of
/// (step, frame), so every layout encodes the same frames.
pub(super) fn synthetic_frames(
    step: usize,
    frames: &[usize],
    v: &crate::vision::VisionConfig,
    dev: Device,
) -> Tensor {
    let (c, s) = (v.num_channels as i64, v.image_size as i64);
    if frames.is_empty() {
        return Tensor::zeros([0, c, s, s], (Kind::Float, dev));
    }
    let base = (Tensor::arange(c * s * s, (Kind::Float, dev)) * 0.7311).view([1, -1]);
    let off: Vec<f32> = frames
        .iter()
        .map(|&f| (f as f64 * 1.37 + step as f64 * 0.113) as f32)
        .collect();
    let off = Tensor::from_slice(&off).to(dev).view([-1, 1]);
    ((base + off).sin() * 0.8).view([-1, c, s, s])
}

/// One rank's vision stage in a run: the encoder with its re-shard, its optimizer, and the
/// index tensors of this rank's text rows.
pub(super) struct VisionRank {
    stage: VisionStage,
    opt: Option<AdamW>,
    /// Local rows of the text tokens (n,) int64.
    text_rows: Tensor,
    /// This rank's DP index (which data samples it takes).
    dp_rank: usize,
}

impl VisionRank {
    pub(super) fn new(
        vr: &VisionRun,
        rank: usize,
        cx: &LoopCtx<'_>,
        t: &Trainer<'_>,
        world: &dyn Communicator,
        master: Kind,
        compute: Kind,
    ) -> Result<VisionRank> {
        let l = cx.layout;
        let sp = l.sp_rank(rank);
        let rg = t.local_ranges();
        if rg != vr.ranges[sp] {
            return Err(RuntimeError::Layout(format!(
                "the trainer's shard {rg:?} is not SP rank {sp}'s per-sample zigzag ranges {:?}",
                vr.ranges[sp]
            )));
        }
        let enc = match cx.inputs.vision_weights.as_slice() {
            [] => VisionEncoder::random(vr.cfg.clone(), cx.dev, master, compute, 23)?,
            files => {
                let files: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
                let (cfg, dev) = (vr.cfg.clone(), cx.dev);
                VisionEncoder::load_safetensors(cfg, &files, dev, master, compute, 23)?.0
            }
        };
        let comm_ranks = crate::vision::world_ranks_of_sp(&l, l.coords(rank).dp);
        let train = vr.section.train_vision;
        let stage = VisionStage::new(
            enc,
            &vr.layout,
            Some(&vr.section.frames_per_rank),
            &vr.ranges,
            sp,
            &comm_ranks,
            world.size(),
            train,
        )?;
        let opt = if train {
            let ps: Vec<Tensor> = stage.encoder.parameters();
            let cfg = AdamWConfig {
                lr: cx.opts.lr,
                ..AdamWConfig::default()
            };
            Some(AdamW::new(&ps, cfg)?)
        } else {
            None
        };
        let rows: Vec<i64> = stage
            .reshard
            .text_rows()
            .iter()
            .map(|&r| r as i64)
            .collect();
        Ok(VisionRank {
            stage,
            opt,
            text_rows: Tensor::from_slice(&rows).to(cx.dev),
            dp_rank: l.coords(rank).dp,
        })
    }

    /// One VLM step: the decoder's stats (step_s = the whole step) and the vision times.
    pub(super) fn step(
        &mut self,
        step: usize,
        vr: &VisionRun,
        t: &mut Trainer<'_>,
        world: &dyn Communicator,
        cx: &LoopCtx<'_>,
    ) -> Result<(StepStats, [f64; 5])> {
        let dev = cx.dev;
        let syncf = || {
            if let Device::Cuda(i) = dev {
                tch::Cuda::synchronize(i as i64);
            }
        };
        let h = t.model.cfg.hidden_size as i64;
        let dp = cx.layout.dp;
        let (ids, labels, frames) = match &cx.inputs.video {
            Some(v) => {
                let (ids, labels) = v.text(step, self.dp_rank, dp, &vr.text_target, dev);
                let px = v.frames(step, self.dp_rank, dp, &self.stage.frames, dev)?;
                (ids, labels, px)
            }
            None => {
                let (ids, labels) = synthetic_vlm(step, vr, t.model.cfg.vocab_size, dev);
                (
                    ids,
                    labels,
                    synthetic_frames(step, &self.stage.frames, &vr.cfg, dev),
                )
            }
        };
        let rg = t.local_ranges();
        let (ids, labels) = (shard(&ids, &rg), shard(&labels, &rg));
        syncf();
        let t0 = Instant::now();
        let (ctx, encode_s, reshard_s) = self.stage.forward_timed(world, &frames, &syncf)?;
        let text_ids = ids.view([-1]).index_select(0, &self.text_rows);
        let text = t.embed_ids(&text_ids.view([1, -1]))?;
        let emb = self.stage.merge(&ctx, &text.view([-1, h]))?.unsqueeze(0);
        let (mut st, g) =
            t.step_embeddings_text(&emb, &labels, Some((&self.text_rows, &text_ids)))?;
        let (_, back_s, enc_bwd_s) = self.stage.backward_local_timed(world, ctx, &g, &syncf)?;
        let t1 = Instant::now();
        if let Some(opt) = &mut self.opt {
            opt.step(world, 1.0 / cx.layout.dp as f64)?;
        }
        syncf();
        let opt_s = t1.elapsed().as_secs_f64();
        st.step_s = t0.elapsed().as_secs_f64();
        Ok((st, [encode_s, reshard_s, back_s, enc_bwd_s, opt_s]))
    }
}
