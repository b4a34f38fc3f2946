//! MM-SP stage 1 on the CPU (threads as ranks): the vision encoder's shapes and config
//! parsing; the re-shard of encoded frames into the zigzag token shards reproduces, exactly
//! in float64, the zigzag slices of the single-rank embedding sequence for SP worlds 1, 2, 4
//! and 8 (every Ulysses x ring split), uneven frame counts, balanced and scattered frame
//! placements; the encoder and projector gradients after the reverse exchange equal the
//! single-rank gradients; the exchange over a world of two DP replicas; one VLM training step
//! (encoder, re-shard, decoder over 2D attention, both optimizers) at SP 2 equals SP 1; bad
//! inputs are errors.
use mmsp_runtime::comm::local::{local_groups, LocalComm};
use mmsp_runtime::comm::Communicator;
use mmsp_runtime::kernel::Backend;
use mmsp_runtime::model::{Decoder, Input, ModelConfig};
use mmsp_runtime::plan::{GroupKind, Layout, Placement};
use mmsp_runtime::train::adamw::{AdamW, AdamWConfig};
use mmsp_runtime::train::{Groups, TrainConfig, Trainer};
use mmsp_runtime::vision::bench::bench_encoder;
use mmsp_runtime::vision::{
    balanced_frames, world_ranks_of_sp, zigzag_ranges, Pooling, Reshard, ReshardMap, SampleSpec,
    TokenLayout, VisionConfig, VisionEncoder, VisionStage,
};
use tch::{Device, Kind, Tensor};

const LLM_HIDDEN: usize = 24;
const SEED: i64 = 11;

/// Uneven samples: 3 frames + 5 text, 1 frame, text only, 4 frames + 2 text (8 frames).
fn samples() -> Vec<SampleSpec> {
    [(3, 5), (1, 0), (0, 7), (4, 2)]
        .iter()
        .map(|&(frames, text_tokens)| SampleSpec {
            frames,
            text_tokens,
        })
        .collect()
}

/// Deterministic values (no global generator: ranks are threads).
fn det(shape: &[i64], seed: f64) -> Tensor {
    let n: i64 = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|i| ((i as f64) * 0.7311 + seed).sin() * 0.8)
        .collect();
    Tensor::from_slice(&v).view(shape)
}

/// A tensor's values, shareable between thread ranks (tch tensors are not `Sync`).
struct Shared(Vec<f64>, Vec<i64>);

impl Shared {
    fn new(t: &Tensor) -> Shared {
        let t = t.detach().to_kind(Kind::Double).contiguous();
        Shared(Vec::<f64>::try_from(t.view([-1])).unwrap(), t.size())
    }
    fn t(&self) -> Tensor {
        Tensor::from_slice(&self.0).view(self.1.as_slice())
    }
}

fn frames_all(cfg: &VisionConfig, n: usize) -> Tensor {
    let s = cfg.image_size as i64;
    det(&[n as i64, cfg.num_channels as i64, s, s], 0.3)
}

fn factorisations(n: usize) -> Vec<(usize, usize)> {
    (1..=n)
        .filter(|u| n.is_multiple_of(*u))
        .map(|u| (u, n / u))
        .collect()
}

/// Frame placements to try on `ranks` ranks: the balanced one and a scattered one whose
/// frames are listed in descending order (the encoder order is the list's).
fn placements(frames: usize, ranks: usize) -> Vec<Vec<Vec<usize>>> {
    let mut scattered = vec![Vec::new(); ranks];
    for f in (0..frames).rev() {
        scattered[(3 * f + 1) % ranks].push(f);
    }
    vec![balanced_frames(frames, ranks).unwrap(), scattered]
}

/// Runs `f(rank, comm)` on `n` thread ranks of one group.
fn on_ranks<T: Send>(n: usize, f: impl Fn(usize, &LocalComm) -> T + Sync) -> Vec<T> {
    let comms = LocalComm::group(n);
    std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(r, c)| {
                let f = &f;
                s.spawn(move || f(r, &c))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn slice_rows(full: &Tensor, ranges: &[(usize, usize)]) -> Tensor {
    let parts: Vec<Tensor> = ranges
        .iter()
        .map(|&(a, b)| full.narrow(0, a as i64, (b - a) as i64))
        .collect();
    Tensor::cat(&parts, 0)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    if a.numel() == 0 {
        return 0.0;
    }
    (a - b).abs().max().double_value(&[])
}

fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    let n = b.norm().double_value(&[]);
    (a - b).norm().double_value(&[]) / n.max(1e-300)
}

/// The single-rank embedding sequence (seq, hidden): frames' embeddings then text rows, per
/// sample. `encoded` is (frames, T, hidden); `text` (text tokens of the whole sequence, hidden).
fn full_sequence(layout: &TokenLayout, encoded: &Tensor, text: &Tensor) -> Tensor {
    let h = encoded.size()[2];
    let enc = encoded.reshape([-1, h]);
    let mask = layout.vision_mask();
    let (mut v, mut t) = (0i64, 0i64);
    let rows: Vec<Tensor> = mask
        .iter()
        .map(|&is_v| {
            if is_v {
                v += 1;
                enc.get(v - 1)
            } else {
                t += 1;
                text.get(t - 1)
            }
        })
        .collect();
    Tensor::stack(&rows, 0)
}

/// Text embeddings of every text token of the sequence, in sequence order.
fn text_rows(layout: &TokenLayout) -> Tensor {
    let nt = layout.vision_mask().iter().filter(|&&v| !v).count();
    det(&[nt as i64, LLM_HIDDEN as i64], 1.9)
}

/// This rank's text rows (in its `text_rows()` order) out of the whole sequence's.
fn local_text(layout: &TokenLayout, ranges: &[(usize, usize)], all_text: &Tensor) -> Tensor {
    let mask = layout.vision_mask();
    // Index of each text position among the text tokens of the sequence.
    let mut idx_of = vec![-1i64; mask.len()];
    let mut k = 0;
    for (p, &v) in mask.iter().enumerate() {
        if !v {
            idx_of[p] = k;
            k += 1;
        }
    }
    let idx: Vec<i64> = ranges
        .iter()
        .flat_map(|&(a, b)| a..b)
        .filter(|&p| !mask[p])
        .map(|p| idx_of[p])
        .collect();
    all_text.index_select(0, &Tensor::from_slice(&idx))
}

#[test]
fn config_and_encoder_shapes() {
    let so400m = r#"{"model_type":"siglip_vision_model","hidden_size":1152,"image_size":384,
        "intermediate_size":4304,"num_attention_heads":16,"num_hidden_layers":27,"patch_size":14,
        "hidden_act":"gelu_pytorch_tanh","layer_norm_eps":1e-06}"#;
    let c = VisionConfig::from_hf_json(so400m, Pooling::Concat2x2, 3584).unwrap();
    assert_eq!(c, VisionConfig::siglip_so400m(3584));
    // The planner's siglip-so400m presets: 196 tokens per frame pooled, 729 without.
    assert_eq!(c.tokens_per_frame(), 196);
    let nested = format!(r#"{{"vision_config": {so400m}, "text_config": {{}}}}"#);
    let c2 = VisionConfig::from_hf_json(&nested, Pooling::None, 3584).unwrap();
    assert_eq!(c2.tokens_per_frame(), 729);
    // SigLIP-so400m's encoder has about 400M parameters.
    let enc_only = c2.num_params() - (1152 * 3584 + 3584 + 3584 * 3584 + 3584);
    assert!((400e6..430e6).contains(&(enc_only as f64)), "{enc_only}");
    for bad in [
        r#"{"hidden_size":30,"image_size":16,"intermediate_size":8,"num_attention_heads":4,"num_hidden_layers":1,"patch_size":4}"#,
        r#"{"hidden_size":32,"image_size":3,"intermediate_size":8,"num_attention_heads":4,"num_hidden_layers":1,"patch_size":4}"#,
        r#"{"hidden_size":32,"image_size":16,"intermediate_size":8,"num_attention_heads":4,"num_hidden_layers":1,"patch_size":4,"hidden_act":"relu"}"#,
        r#"{"hidden_size":32}"#,
    ] {
        assert!(
            VisionConfig::from_hf_json(bad, Pooling::None, 8).is_err(),
            "{bad}"
        );
    }
    assert!(Pooling::parse("max").is_err());

    // Odd grids (5 x 5 patches) pool to 3 x 3 with every pooling; the projector reaches the
    // LLM width; the parameters listed are the ones the config counts.
    for pooling in [Pooling::None, Pooling::Avg2x2, Pooling::Concat2x2] {
        let cfg = VisionConfig {
            image_size: 20,
            pooling,
            ..VisionConfig::tiny(LLM_HIDDEN)
        };
        let enc =
            VisionEncoder::random(cfg.clone(), Device::Cpu, Kind::Double, Kind::Double, 3).unwrap();
        let n: i64 = enc
            .named_parameters()
            .iter()
            .map(|(_, t)| t.numel() as i64)
            .sum();
        assert_eq!(n as usize, cfg.num_params());
        let y = enc.forward(&frames_all(&cfg, 3)).unwrap();
        let t = if pooling == Pooling::None { 25 } else { 9 };
        assert_eq!(y.size(), vec![3, t, LLM_HIDDEN as i64]);
        assert_eq!(cfg.tokens_per_frame(), t as usize);
        assert!(y.isfinite().all().int64_value(&[]) == 1);
        // Frames do not see each other: a frame's output is the same alone as in a batch.
        let one = enc.forward(&frames_all(&cfg, 3).narrow(0, 1, 1)).unwrap();
        assert!(rel_l2(&one, &y.narrow(0, 1, 1)) < 1e-12);
        // No frames: an empty output.
        let s = cfg.image_size as i64;
        let e = enc
            .forward(&Tensor::zeros([0, 3, s, s], (Kind::Double, Device::Cpu)))
            .unwrap();
        assert_eq!(e.size(), vec![0, t, LLM_HIDDEN as i64]);
    }
    // Pixels beyond the last whole patch are dropped, as by the strided convolution
    // (SigLIP-so400m: 384 / 14 -> 27): 18 x 18 frames of 4 x 4 patches make 4 x 4 patches.
    let cfg = VisionConfig {
        image_size: 18,
        ..VisionConfig::tiny(LLM_HIDDEN)
    };
    assert_eq!((cfg.patches(), cfg.tokens_per_frame()), (16, 4));
    let enc =
        VisionEncoder::random(cfg.clone(), Device::Cpu, Kind::Double, Kind::Double, 3).unwrap();
    assert_eq!(
        enc.forward(&frames_all(&cfg, 2)).unwrap().size(),
        vec![2, 4, LLM_HIDDEN as i64]
    );
    // Average pooling of a 2 x 2 block is the mean of its patches.
    let cfg = VisionConfig {
        image_size: 20,
        pooling: Pooling::Avg2x2,
        ..VisionConfig::tiny(LLM_HIDDEN)
    };
    let enc =
        VisionEncoder::random(cfg.clone(), Device::Cpu, Kind::Double, Kind::Double, 3).unwrap();
    let x = enc.encode(&frames_all(&cfg, 1)).unwrap();
    let pooled = enc.pool(&x);
    let want = (x.get(0).get(0) + x.get(0).get(1) + x.get(0).get(5) + x.get(0).get(6)) / 4.0;
    assert!(rel_l2(&pooled.get(0).get(0), &want) < 1e-14);
    // The corner block of an odd grid holds one patch.
    assert!(rel_l2(&pooled.get(0).get(8), &x.get(0).get(24)) < 1e-14);

    // Same seed, same weights; other seed, other weights; bad frames are shape errors.
    let tiny = VisionConfig::tiny(LLM_HIDDEN);
    let a = VisionEncoder::random(tiny.clone(), Device::Cpu, Kind::Float, Kind::Float, 5).unwrap();
    let b = VisionEncoder::random(tiny.clone(), Device::Cpu, Kind::Float, Kind::Float, 5).unwrap();
    let c = VisionEncoder::random(tiny.clone(), Device::Cpu, Kind::Float, Kind::Float, 6).unwrap();
    let w = "vision_model.encoder.layers.1.mlp.fc1.weight";
    assert!(a.param(w).unwrap().equal(b.param(w).unwrap()));
    assert!(!a.param(w).unwrap().equal(c.param(w).unwrap()));
    let std = f64::try_from(a.param(w).unwrap().std(true)).unwrap();
    assert!((0.015..0.025).contains(&std), "{std}");
    let err = a.forward(&Tensor::zeros([2, 3, 16, 15], (Kind::Float, Device::Cpu)));
    assert!(err.unwrap_err().to_string().contains("invalid shape"));
}

#[test]
fn safetensors_round_trip_with_projector_initialised() {
    let cfg = VisionConfig::tiny(LLM_HIDDEN);
    let enc = VisionEncoder::random(cfg.clone(), Device::Cpu, Kind::Float, Kind::Float, 9).unwrap();
    let dir = std::env::temp_dir().join(format!("mmsp_vision_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("siglip.safetensors");
    // A SigLIP checkpoint as LLaVA stores it: encoder under vision_tower., no projector.
    let named: Vec<(String, Tensor)> = enc
        .named_parameters()
        .iter()
        .filter(|(n, _)| !n.starts_with("multi_modal_projector"))
        .map(|(n, t)| (format!("vision_tower.{n}"), t.detach()))
        .collect();
    Tensor::write_safetensors(&named, &file).unwrap();
    let (loaded, initialised) = VisionEncoder::load_safetensors(
        cfg.clone(),
        &[file.as_path()],
        Device::Cpu,
        Kind::Float,
        Kind::Float,
        9,
    )
    .unwrap();
    assert!(!initialised.is_empty());
    assert!(initialised
        .iter()
        .all(|n| n.starts_with("multi_modal_projector")));
    for ((n, a), (_, b)) in enc.named_parameters().iter().zip(loaded.named_parameters()) {
        assert!(a.equal(b), "{n}");
    }
    // A checkpoint for another config is refused with the tensor's name.
    let other = VisionConfig {
        hidden_size: 16,
        intermediate_size: 32,
        ..cfg.clone()
    };
    let e = VisionEncoder::load_safetensors(
        other,
        &[file.as_path()],
        Device::Cpu,
        Kind::Float,
        Kind::Float,
        9,
    );
    assert!(e.err().unwrap().to_string().contains("patch_embedding"));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn reshard_map_matches_the_planners_traffic_and_rejects_bad_placements() {
    // The planner's hand-checked case: one sample of 4 frames x 2 tokens + 4 text tokens,
    // halves [0,6) and [6,12); rank 0 encoded f0, f1, rank 1 f2, f3: rank 1 sends f2's 2 tokens
    // to rank 0 and nothing else moves between ranks.
    let layout = TokenLayout::new(
        &[SampleSpec {
            frames: 4,
            text_tokens: 4,
        }],
        2,
    )
    .unwrap();
    let halves = vec![vec![(0, 6)], vec![(6, 12)]];
    let map = ReshardMap::new(&layout, &[vec![0, 1], vec![2, 3]], &halves).unwrap();
    assert_eq!(map.traffic_tokens(), vec![vec![4, 0], vec![2, 2]]);
    assert_eq!(map.text_rows, vec![vec![], vec![2, 3, 4, 5]]);
    // Interleaved: rank 0 has f1, f3, rank 1 f0, f2: rank 0 needs 4 tokens from rank 1, rank 1
    // needs 2 from rank 0.
    let map = ReshardMap::new(&layout, &[vec![1, 3], vec![0, 2]], &halves).unwrap();
    let t = map.traffic_tokens();
    assert_eq!((t[1][0], t[0][1]), (4, 2));

    let bad_frames: [&[Vec<usize>]; 4] = [
        &[vec![0, 1], vec![1, 2, 3]],
        &[vec![0, 1], vec![2]],
        &[vec![0, 1, 2, 3, 4], vec![]],
        &[vec![0, 1, 2, 3]],
    ];
    for f in bad_frames {
        assert!(ReshardMap::new(&layout, f, &halves).is_err(), "{f:?}");
    }
    let fr = [vec![0, 1], vec![2, 3]];
    for r in [
        vec![vec![(0, 6)], vec![(6, 13)]],
        vec![vec![(0, 5)], vec![(6, 12)]],
        vec![vec![(0, 7)], vec![(6, 12)]],
    ] {
        assert!(ReshardMap::new(&layout, &fr, &r).is_err(), "{r:?}");
    }
    // A re-shard checks its group and the rows it is given before any collective.
    let map = ReshardMap::new(&layout, &fr, &halves).unwrap();
    assert!(Reshard::new(&map, 0, &[0, 0], 2, 8, Device::Cpu).is_err());
    assert!(Reshard::new(&map, 2, &[0, 1], 2, 8, Device::Cpu).is_err());
    let rs = Reshard::new(&map, 0, &[0, 1], 2, 8, Device::Cpu).unwrap();
    let comm = LocalComm::group(1);
    let e = rs.forward(&comm[0], &Tensor::zeros([3, 8], (Kind::Float, Device::Cpu)));
    assert!(e.unwrap_err().to_string().contains("(4, 8)"));
    let e = rs.forward(&comm[0], &Tensor::zeros([4, 8], (Kind::Float, Device::Cpu)));
    assert!(e.is_err(), "a communicator of the wrong size");
}

/// Exact data movement: every encoded row carries its global position, every text row minus
/// it; each rank's merged shard must be its zigzag ranges' positions, for every split of 1, 2,
/// 4 and 8 ranks and both frame placements.
#[test]
fn reshard_moves_every_token_to_its_zigzag_rank() {
    let t = 3usize;
    let layout = TokenLayout::new(&samples(), t).unwrap();
    let seq = layout.seq_len();
    let h = 5i64;
    let row = |p: usize| {
        Tensor::full([h], p as f64, (Kind::Double, Device::Cpu))
            + Tensor::arange(h, (Kind::Double, Device::Cpu)) * 1e-3
    };
    for n in [1usize, 2, 4, 8] {
        for (u, r) in factorisations(n) {
            let ranges = zigzag_ranges(seq, u, r).unwrap();
            for fpr in placements(layout.frames(), n) {
                let map = ReshardMap::new(&layout, &fpr, &ranges).unwrap();
                let sent: usize = map.traffic_tokens().iter().flatten().sum();
                assert_eq!(sent, layout.frames() * t);
                let ok = on_ranks(n, |rank, comm| {
                    let rs = Reshard::new(
                        &map,
                        rank,
                        &(0..n).collect::<Vec<_>>(),
                        n,
                        h as usize,
                        Device::Cpu,
                    )
                    .unwrap();
                    let enc_rows: Vec<Tensor> = fpr[rank]
                        .iter()
                        .flat_map(|&f| {
                            let (s, e) = layout.frame_span(f);
                            (s..e).map(&row).collect::<Vec<_>>()
                        })
                        .collect();
                    let enc = if enc_rows.is_empty() {
                        Tensor::zeros([0, h], (Kind::Double, Device::Cpu))
                    } else {
                        Tensor::stack(&enc_rows, 0)
                    };
                    let vision = rs.forward(comm, &enc).unwrap();
                    let local: Vec<usize> = ranges[rank].iter().flat_map(|&(a, b)| a..b).collect();
                    let text: Vec<Tensor> =
                        rs.text_rows().iter().map(|&i| -row(local[i])).collect();
                    let text = if text.is_empty() {
                        Tensor::zeros([0, h], (Kind::Double, Device::Cpu))
                    } else {
                        Tensor::stack(&text, 0)
                    };
                    let got = rs.merge(&vision, &text).unwrap();
                    let mask = layout.vision_mask();
                    let want: Vec<Tensor> = local
                        .iter()
                        .map(|&p| if mask[p] { row(p) } else { -row(p) })
                        .collect();
                    got.equal(&Tensor::stack(&want, 0))
                });
                assert!(
                    ok.iter().all(|&x| x),
                    "n={n} u={u} r={r} frames={fpr:?}: {ok:?}"
                );
            }
        }
    }
}

/// The encoder on its frames + re-shard + merge = the zigzag slice of the single-rank
/// embedding sequence (float64, exact); encoder and projector gradients of a loss over the
/// shards, after the reverse exchange and a sum over ranks, = the single-rank gradients.
#[test]
fn stage_reproduces_single_rank_embeddings_and_gradients() {
    let cfg = VisionConfig::tiny(LLM_HIDDEN);
    let layout = TokenLayout::new(&samples(), cfg.tokens_per_frame()).unwrap();
    let seq = layout.seq_len();
    let nf = layout.frames();
    let h = LLM_HIDDEN as i64;
    // Loss = sum(w1 * e) + 0.5 * sum(w2 * e^2) over the whole sequence (or a rank's shard).
    let w1 = det(&[seq as i64, h], 0.7);
    let w2 = det(&[seq as i64, h], 2.3);
    let loss_of = |e: &Tensor, w1: &Tensor, w2: &Tensor| {
        (e * w1).sum(Kind::Double) + (e.square() * w2).sum(Kind::Double) * 0.5
    };

    // Single rank.
    let enc =
        VisionEncoder::random(cfg.clone(), Device::Cpu, Kind::Double, Kind::Double, SEED).unwrap();
    let encoded = enc.forward(&frames_all(&cfg, nf)).unwrap();
    let text_all = text_rows(&layout);
    let full = full_sequence(&layout, &encoded, &text_all);
    loss_of(&full, &w1, &w2).backward();
    let ref_grads: Vec<(String, Tensor)> = enc
        .named_parameters()
        .iter()
        .map(|(n, p)| (n.clone(), p.grad().copy()))
        .collect();
    let (full, w1, w2) = (Shared::new(&full), Shared::new(&w1), Shared::new(&w2));

    for n in [1usize, 2, 4, 8] {
        for (u, r) in factorisations(n) {
            let ranges = zigzag_ranges(seq, u, r).unwrap();
            for fpr in placements(nf, n) {
                let res = on_ranks(n, |rank, comm| {
                    let enc = VisionEncoder::random(
                        cfg.clone(),
                        Device::Cpu,
                        Kind::Double,
                        Kind::Double,
                        SEED,
                    )
                    .unwrap();
                    let ident: Vec<usize> = (0..n).collect();
                    let stage =
                        VisionStage::new(enc, &layout, Some(&fpr), &ranges, rank, &ident, n, true)
                            .unwrap();
                    let frames = stage.local_frames(&frames_all(&cfg, nf)).unwrap();
                    let ctx = stage.forward(comm, &frames).unwrap();
                    let text = local_text(&layout, &ranges[rank], &text_rows(&layout));
                    let emb = stage.merge(&ctx, &text).unwrap();
                    let want = slice_rows(&full.t(), &ranges[rank]);
                    let exact = max_abs_diff(&emb.detach(), &want);
                    loss_of(
                        &emb,
                        &slice_rows(&w1.t(), &ranges[rank]),
                        &slice_rows(&w2.t(), &ranges[rank]),
                    )
                    .backward();
                    stage.backward(comm, ctx).unwrap();
                    let mut grads = Vec::new();
                    for (name, p) in stage.encoder.named_parameters() {
                        let g = p.grad();
                        let g = if g.defined() {
                            g.copy()
                        } else {
                            p.zeros_like()
                        };
                        comm.all_reduce(&g).unwrap();
                        grads.push((name.clone(), g));
                    }
                    (exact, grads)
                });
                for (rank, (exact, grads)) in res.iter().enumerate() {
                    assert_eq!(*exact, 0.0, "n={n} u={u} r={r} rank {rank} frames={fpr:?}: embeddings differ by {exact}");
                    for ((name, g), (_, want)) in grads.iter().zip(&ref_grads) {
                        let e = rel_l2(g, want);
                        assert!(
                            e < 1e-10,
                            "n={n} u={u} r={r} rank {rank} {name}: rel err {e}"
                        );
                    }
                }
            }
        }
    }
}

/// Balanced placement used when the plan gives none: what the planner gives equal-cost
/// frames (contiguous runs, the first ranks one more), here 8 frames over 3 ranks.
#[test]
fn balanced_frames_are_contiguous_runs() {
    assert_eq!(
        balanced_frames(8, 3).unwrap(),
        vec![vec![0, 1, 2], vec![3, 4, 5], vec![6, 7]]
    );
    assert_eq!(balanced_frames(2, 4).unwrap()[3], Vec::<usize>::new());
    assert!(balanced_frames(2, 0).is_err());
}

/// Over the world communicator of two DP replicas (ring-inner placement, 2 x 2 SP): each
/// replica's ranks exchange among themselves, the other replica gets empty splits; a frozen
/// encoder's backward is a no-op.
#[test]
fn reshard_over_a_world_of_two_replicas() {
    let layout_sp = Layout {
        ulysses: 2,
        ring: 2,
        dp: 2,
        tp: 1,
        placement: Placement::RingInner,
    };
    let cfg = VisionConfig::tiny(LLM_HIDDEN);
    let layout = TokenLayout::new(&samples(), cfg.tokens_per_frame()).unwrap();
    let seq = layout.seq_len();
    let nf = layout.frames();
    let ranges = zigzag_ranges(seq, 2, 2).unwrap();
    let enc =
        VisionEncoder::random(cfg.clone(), Device::Cpu, Kind::Double, Kind::Double, SEED).unwrap();
    let full = tch::no_grad(|| {
        full_sequence(
            &layout,
            &enc.forward(&frames_all(&cfg, nf)).unwrap(),
            &text_rows(&layout),
        )
    });
    let full = Shared::new(&full);
    let w = layout_sp.world_size();
    let res = on_ranks(w, |rank, comm| {
        let c = layout_sp.coords(rank);
        let sp = layout_sp.sp_rank(rank);
        let map = world_ranks_of_sp(&layout_sp, c.dp);
        assert_eq!(map[sp], rank);
        let enc = VisionEncoder::random(cfg.clone(), Device::Cpu, Kind::Double, Kind::Double, SEED)
            .unwrap();
        let stage = VisionStage::new(enc, &layout, None, &ranges, sp, &map, w, false).unwrap();
        let frames = stage.local_frames(&frames_all(&cfg, nf)).unwrap();
        let ctx = stage.forward(comm, &frames).unwrap();
        assert!(!ctx.vision.requires_grad());
        let text = local_text(&layout, &ranges[sp], &text_rows(&layout));
        let emb = stage.merge(&ctx, &text).unwrap();
        let d = max_abs_diff(&emb, &slice_rows(&full.t(), &ranges[sp]));
        stage.backward(comm, ctx).unwrap();
        let untouched = stage
            .encoder
            .named_parameters()
            .iter()
            .all(|(_, p)| !p.grad().defined());
        (d, untouched)
    });
    for (rank, (d, untouched)) in res.iter().enumerate() {
        assert_eq!(*d, 0.0, "rank {rank}");
        assert!(untouched, "rank {rank}: a frozen encoder got gradients");
    }
}

#[test]
fn encoder_bench_reports_json() {
    let v = bench_encoder(
        &VisionConfig::tiny(LLM_HIDDEN),
        Device::Cpu,
        Kind::Float,
        4,
        1,
    )
    .unwrap();
    assert_eq!(v["frames"], 4);
    assert!(v["fwd_frames_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["fwdbwd_frames_per_s"].as_f64().unwrap() > 0.0);
    assert!(bench_encoder(
        &VisionConfig::tiny(LLM_HIDDEN),
        Device::Cpu,
        Kind::Float,
        0,
        1
    )
    .is_err());
}

/// Rank 0's loss, decoder and vision parameters after one VLM step over `u` x `r` SP ranks.
type StepResult = (f64, Vec<(String, Shared)>, Vec<(String, Shared)>);

fn vlm_step(u: usize, r: usize) -> StepResult {
    let mcfg = ModelConfig::tiny();
    let vcfg = VisionConfig::tiny(mcfg.hidden_size);
    let layout = TokenLayout::new(&samples(), vcfg.tokens_per_frame()).unwrap();
    let (seq, nf) = (layout.seq_len(), layout.frames());
    let l = Layout::sp(u, r, Placement::UlyssesInner);
    let n = l.world_size();
    let ranges = zigzag_ranges(seq, u, r).unwrap();
    let vocab = mcfg.vocab_size as i64;
    let mask = layout.vision_mask();
    let ids: Vec<i64> = (0..seq as i64)
        .map(|i| (5 * i + 3 + i * i % 7) % vocab)
        .collect();
    // Next-token labels on text positions followed by text; none after the last token.
    let labels: Vec<i64> = (0..seq)
        .map(|p| match mask.get(p + 1) {
            Some(false) => ids[p + 1],
            _ => -100,
        })
        .collect();
    let uly = local_groups(&l, GroupKind::Ulysses);
    let ring = local_groups(&l, GroupKind::Ring);
    let world = LocalComm::group(n);
    let tc = TrainConfig {
        optimizer: AdamWConfig {
            lr: 1e-2,
            ..AdamWConfig::default()
        },
        zero_stage: 0,
        recompute: false,
        backend: Backend::CpuMath,
        profile: false,
        mem_trace: false,
    };
    let mut out: Vec<StepResult> = std::thread::scope(|s| {
        let hs: Vec<_> = uly
            .into_iter()
            .zip(ring)
            .zip(world)
            .enumerate()
            .map(|(rank, ((uc, rc), g))| {
                let (ids, labels, layout, ranges, mcfg, vcfg) =
                    (&ids, &labels, &layout, &ranges, &mcfg, &vcfg);
                s.spawn(move || {
                    let sp = l.sp_rank(rank);
                    let local: Vec<i64> = ranges[sp]
                        .iter()
                        .flat_map(|&(a, b)| a as i64..b as i64)
                        .collect();
                    let pick = |v: &[i64], rows: &[usize]| -> Tensor {
                        let x: Vec<i64> = rows.iter().map(|&i| v[local[i] as usize]).collect();
                        Tensor::from_slice(&x).view([1, -1])
                    };
                    let all_rows: Vec<usize> = (0..local.len()).collect();
                    let model =
                        Decoder::random(mcfg.clone(), Device::Cpu, Kind::Double, Kind::Double, 5)
                            .unwrap();
                    let enc = VisionEncoder::random(
                        vcfg.clone(),
                        Device::Cpu,
                        Kind::Double,
                        Kind::Double,
                        SEED,
                    )
                    .unwrap();
                    let ident = world_ranks_of_sp(&l, 0);
                    let stage =
                        VisionStage::new(enc, layout, None, ranges, sp, &ident, n, true).unwrap();
                    // Text rows from the decoder's embedding table (fixed features this step).
                    let text_ids = pick(ids, stage.reshard.text_rows());
                    let text = tch::no_grad(|| model.embed(Input::Ids(&text_ids)))
                        .unwrap()
                        .view([-1, mcfg.hidden_size as i64]);
                    let groups = Groups {
                        ulysses: &uc,
                        ring: &rc,
                        grad: &g,
                        dp: 1,
                    };
                    let mut trainer = Trainer::new(model, groups, seq, tc).unwrap();
                    assert_eq!(trainer.local_ranges().to_vec(), ranges[sp]);
                    let vparams: Vec<Tensor> = stage.encoder.parameters();
                    let mut vopt = AdamW::new(&vparams, tc.optimizer).unwrap();
                    let frames = stage.local_frames(&frames_all(vcfg, nf)).unwrap();
                    let ctx = stage.forward(&g, &frames).unwrap();
                    let emb = stage.merge(&ctx, &text).unwrap().unsqueeze(0);
                    let rows: Vec<i64> = stage
                        .reshard
                        .text_rows()
                        .iter()
                        .map(|&r| r as i64)
                        .collect();
                    let rows = Tensor::from_slice(&rows);
                    let (st, grad) = trainer
                        .step_embeddings_text(
                            &emb,
                            &pick(labels, &all_rows),
                            Some((&rows, &text_ids.view([-1]))),
                        )
                        .unwrap();
                    let _text_grad = stage.backward_local(&g, ctx, &grad).unwrap();
                    vopt.step(&g, 1.0).unwrap();
                    let share = |ps: &[(String, Tensor)]| {
                        ps.iter()
                            .map(|(n, t)| (n.clone(), Shared::new(t)))
                            .collect::<Vec<_>>()
                    };
                    (
                        st.loss,
                        share(trainer.model.named_parameters()),
                        share(stage.encoder.named_parameters()),
                    )
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    out.swap_remove(0)
}

#[test]
fn vlm_step_at_sp2_equals_sp1() {
    let (loss1, dec1, vis1) = vlm_step(1, 1);
    assert!(loss1.is_finite() && loss1 > 0.0);
    for (u, r) in [(1, 2), (2, 1)] {
        let (loss, dec, vis) = vlm_step(u, r);
        assert!(
            (loss - loss1).abs() <= 1e-10 * loss1,
            "u={u} r={r}: loss {loss} vs {loss1}"
        );
        for ((name, a), (_, b)) in dec.iter().chain(&vis).zip(dec1.iter().chain(&vis1)) {
            let e = rel_l2(&a.t(), &b.t());
            assert!(e < 1e-10, "u={u} r={r} {name}: rel err {e}");
        }
    }
    // The text rows' gradient reached the decoder's embedding table (AdamW without weight
    // decay leaves rows without gradient unchanged).
    let emb = |d: &[(String, Shared)]| {
        d.iter()
            .find(|(n, _)| n == "model.embed_tokens.weight")
            .unwrap()
            .1
            .t()
    };
    let fresh_dec = Decoder::random(
        ModelConfig::tiny(),
        Device::Cpu,
        Kind::Double,
        Kind::Double,
        5,
    )
    .unwrap();
    let moved_rows = emb(&dec1)
        .ne_tensor(fresh_dec.embed_weight())
        .any_dim(1, false)
        .sum(Kind::Int64)
        .int64_value(&[]);
    assert!(moved_rows > 0, "no embedding row moved");
    // The step moved the encoder (its gradients arrived through the reverse exchange).
    let fresh = VisionEncoder::random(
        VisionConfig::tiny(ModelConfig::tiny().hidden_size),
        Device::Cpu,
        Kind::Double,
        Kind::Double,
        SEED,
    )
    .unwrap();
    let moved = vis1
        .iter()
        .zip(fresh.named_parameters())
        .filter(|((_, a), (_, b))| !a.t().equal(b))
        .count();
    assert!(
        moved > vis1.len() / 2,
        "only {moved} vision tensors changed"
    );
}

/// The decoder's embedding update of a VLM step (text rows from the table, vision rows from
/// the encoder) equals the single-rank reference: AdamW on the table with the gradient of
/// the step's input rows scattered into the text tokens' rows.
#[test]
fn vlm_step_updates_text_embeddings_as_the_reference() {
    let mcfg = ModelConfig::tiny();
    let vcfg = VisionConfig::tiny(mcfg.hidden_size);
    let layout = TokenLayout::new(&samples(), vcfg.tokens_per_frame()).unwrap();
    let (seq, nf) = (layout.seq_len(), layout.frames());
    let vocab = mcfg.vocab_size as i64;
    let mask = layout.vision_mask();
    let ids: Vec<i64> = (0..seq as i64).map(|i| (3 * i + 1) % vocab).collect();
    let labels: Vec<i64> = (0..seq)
        .map(|p| match mask.get(p + 1) {
            Some(false) => ids[p + 1],
            _ => -100,
        })
        .collect();
    let labels = Tensor::from_slice(&labels).view([1, -1]);
    let ranges = zigzag_ranges(seq, 1, 1).unwrap();
    let opt = AdamWConfig {
        lr: 1e-2,
        ..AdamWConfig::default()
    };
    let tc = TrainConfig {
        optimizer: opt,
        zero_stage: 0,
        recompute: false,
        backend: Backend::CpuMath,
        profile: false,
        mem_trace: false,
    };
    // (embedding table after the step, the input gradient) with or without the hook.
    let run = |hook: bool| -> (Tensor, Tensor, Vec<i64>, Vec<i64>) {
        let l = Layout::sp(1, 1, Placement::UlyssesInner);
        let (u, r) = (
            local_groups(&l, GroupKind::Ulysses),
            local_groups(&l, GroupKind::Ring),
        );
        let g = LocalComm::group(1);
        let model =
            Decoder::random(mcfg.clone(), Device::Cpu, Kind::Double, Kind::Double, 5).unwrap();
        let enc =
            VisionEncoder::random(vcfg.clone(), Device::Cpu, Kind::Double, Kind::Double, SEED)
                .unwrap();
        let stage = VisionStage::new(enc, &layout, None, &ranges, 0, &[0], 1, true).unwrap();
        let rows: Vec<i64> = stage
            .reshard
            .text_rows()
            .iter()
            .map(|&x| x as i64)
            .collect();
        let tids: Vec<i64> = rows.iter().map(|&x| ids[x as usize]).collect();
        let (rows_t, tids_t) = (Tensor::from_slice(&rows), Tensor::from_slice(&tids));
        let text = tch::no_grad(|| model.embed(Input::Ids(&tids_t.view([1, -1]))))
            .unwrap()
            .view([-1, mcfg.hidden_size as i64]);
        let groups = Groups {
            ulysses: &u[0],
            ring: &r[0],
            grad: &g[0],
            dp: 1,
        };
        let mut t = Trainer::new(model, groups, seq, tc).unwrap();
        let frames = stage.local_frames(&frames_all(&vcfg, nf)).unwrap();
        let ctx = stage.forward(&g[0], &frames).unwrap();
        let emb = stage.merge(&ctx, &text).unwrap().unsqueeze(0);
        let (_, grad) = t
            .step_embeddings_text(&emb, &labels, hook.then_some((&rows_t, &tids_t)))
            .unwrap();
        (
            t.model.embed_weight().detach().copy(),
            grad.view([seq as i64, -1]),
            rows,
            tids,
        )
    };
    let (w_hook, g_hook, rows, tids) = run(true);
    let (w_none, g_none, _, _) = run(false);
    assert!(max_abs_diff(&g_hook, &g_none) == 0.0);
    let w0 = Decoder::random(mcfg.clone(), Device::Cpu, Kind::Double, Kind::Double, 5)
        .unwrap()
        .embed_weight()
        .detach()
        .copy();
    assert!(
        max_abs_diff(&w_none, &w0) == 0.0,
        "without the hook the table moved"
    );
    // Reference: d table[ids[j]] += d x[rows[j]], then one AdamW step.
    let w_ref = w0.copy().set_requires_grad(true);
    let gw = w_ref.zeros_like().index_add(
        0,
        &Tensor::from_slice(&tids),
        &g_hook.index_select(0, &Tensor::from_slice(&rows)),
    );
    let mut ref_opt = AdamW::new(std::slice::from_ref(&w_ref), opt).unwrap();
    tch::no_grad(|| w_ref.grad().copy_(&gw));
    ref_opt.step(&LocalComm::group(1)[0], 1.0).unwrap();
    let e = rel_l2(&(&w_hook - &w0), &(&w_ref.detach() - &w0));
    assert!(e < 1e-12, "embedding update rel err {e}");
    assert!((&w_hook - &w0).abs().max().double_value(&[]) > 0.0);
}
