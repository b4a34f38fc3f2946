//! Encoder throughput on one device (for the lead's calibration of the planner's vision
//! stage): frames/s of the encoder and projector, forward and forward + backward, as JSON.
use super::config::VisionConfig;
use super::encoder::VisionEncoder;
use crate::error::{Result, RuntimeError};
use serde_json::{json, Value};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

fn sync(dev: Device) {
    if let Device::Cuda(i) = dev {
        tch::Cuda::synchronize(i as i64);
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Times `iters` calls (after one warm-up) on a batch of `frames` random frames with fp32
/// master weights and `compute` activations; reports medians.
pub fn bench_encoder(
    cfg: &VisionConfig,
    device: Device,
    compute: Kind,
    frames: usize,
    iters: usize,
) -> Result<Value> {
    if frames == 0 || iters == 0 {
        return Err(RuntimeError::Config(
            "the encoder benchmark needs frames >= 1 and iters >= 1".into(),
        ));
    }
    let enc = VisionEncoder::random(cfg.clone(), device, Kind::Float, compute, 1)?;
    let s = cfg.image_size as i64;
    let x = Tensor::randn(
        [frames as i64, cfg.num_channels as i64, s, s],
        (compute, device),
    );
    let mut fwd = Vec::new();
    let mut fwdbwd = Vec::new();
    for i in 0..=iters {
        sync(device);
        let t = Instant::now();
        let y = tch::no_grad(|| enc.forward(&x))?;
        sync(device);
        let tf = t.elapsed().as_secs_f64();
        drop(y);
        let t = Instant::now();
        let y = enc.forward(&x)?;
        y.to_kind(Kind::Float).square().mean(Kind::Float).backward();
        sync(device);
        let tb = t.elapsed().as_secs_f64();
        for (_, p) in enc.named_parameters() {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.f_zero_()?;
            }
        }
        if i > 0 {
            fwd.push(tf);
            fwdbwd.push(tb);
        }
    }
    let (f, fb) = (median(fwd), median(fwdbwd));
    let flops = cfg.flops_per_frame() * frames as f64;
    Ok(json!({
        "what": "vision_encoder",
        "device": format!("{device:?}"),
        "compute": format!("{compute:?}"),
        "frames": frames, "iters": iters,
        "hidden": cfg.hidden_size, "layers": cfg.num_layers, "patches": cfg.patches(),
        "tokens_per_frame": cfg.tokens_per_frame(), "params": cfg.num_params(),
        "fwd_s": f, "fwdbwd_s": fb,
        "fwd_frames_per_s": frames as f64 / f,
        "fwdbwd_frames_per_s": frames as f64 / fb,
        "fwd_tflops": flops / f / 1e12,
        "fwdbwd_tflops": 3.0 * flops / fb / 1e12,
    }))
}
