//! Packed multi-sample sequences (document-masked attention, `mmsp_runtime::packed`), CPU,
//! threads as ranks: the per-sample zigzag ranges are the planner's (`plan4_vlm.json`);
//! training a packed sequence of three samples over SP 2 (1 x 2, 2 x 1), SP 4 (1 x 4, 4 x 1)
//! and 2 x 2 gives the losses and parameters of one rank (float64); the one-rank trainer
//! equals plain autograd run on each sample separately, and a block-diagonal (document)
//! mask over the packed sequence equals the separate runs too, while the unpacked causal
//! sequence does not; labels crossing samples are dropped; sample lengths that are not
//! multiples of 2 x SP are typed one-line errors, never a panic or a hang, and so are ranks
//! given different samples.
use mmsp_runtime::comm::local::LocalComm;
use mmsp_runtime::comm::Communicator;
use mmsp_runtime::kernel::Backend;
use mmsp_runtime::model::decoder::autograd_causal;
use mmsp_runtime::model::{Decoder, Input, ModelConfig};
use mmsp_runtime::packed::Packing;
use mmsp_runtime::plan::{GroupKind, Layout, Placement};
use mmsp_runtime::shard::Zigzag;
use mmsp_runtime::train::adamw::{AdamW, AdamWConfig};
use mmsp_runtime::train::{Groups, TrainConfig, Trainer};
use mmsp_runtime::vision::{EncoderSource, VisionSection};
use mmsp_runtime::RuntimeError;
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// Three samples, every length a multiple of 2 x 4 (SP up to 4).
const LENS: [usize; 3] = [16, 24, 8];
const SEED: i64 = 7;
const VOCAB: i64 = 128;

fn opt() -> AdamWConfig {
    AdamWConfig {
        lr: 1e-2,
        weight_decay: 0.01,
        ..AdamWConfig::default()
    }
}

/// Token ids of the packed sequence at `step`.
fn ids(step: usize, seq: usize) -> Vec<i64> {
    (0..seq as i64)
        .map(|i| (step as i64 * 11 + 3 * i + (i * i) % 5) % VOCAB)
        .collect()
}

/// Next-token labels of the packed sequence as one sequence would have them: the label of a
/// sample's last token is the next sample's first token (only the very last is -100).
fn crossing_labels(ids: &[i64]) -> Vec<i64> {
    let mut l = ids[1..].to_vec();
    l.push(-100);
    l
}

/// Per-sample labels: -100 on each sample's last token.
fn sample_labels(ids: &[i64], lens: &[usize]) -> Vec<i64> {
    let mut l = crossing_labels(ids);
    let mut end = 0;
    for &n in lens {
        end += n;
        l[end - 1] = -100;
    }
    l
}

fn row(v: &[i64]) -> Tensor {
    Tensor::from_slice(v).view([1, -1])
}

/// Rank 0's losses, active token counts and final parameters.
struct Run {
    losses: Vec<f64>,
    tokens: Vec<f64>,
    params: Vec<(String, Vec<f64>)>,
}

fn params_of(ps: &[(String, Tensor)]) -> Vec<(String, Vec<f64>)> {
    ps.iter()
        .map(|(n, t)| {
            let t = t.detach().to_kind(Kind::Double).contiguous().view([-1]);
            (n.clone(), Vec::<f64>::try_from(t).unwrap())
        })
        .collect()
}

/// Communicators of every rank of `layout` (ulysses, ring, grad), with short timeouts.
fn comms(layout: Layout) -> Vec<(LocalComm, LocalComm, LocalComm)> {
    let w = layout.world_size();
    let t = Duration::from_secs(60);
    let mut uly: Vec<Option<LocalComm>> = (0..w).map(|_| None).collect();
    let mut ring: Vec<Option<LocalComm>> = (0..w).map(|_| None).collect();
    for (kind, slots) in [(GroupKind::Ulysses, &mut uly), (GroupKind::Ring, &mut ring)] {
        for g in layout.all_groups(kind) {
            for (m, c) in g.iter().zip(LocalComm::group_named(&g, t)) {
                slots[*m] = Some(c);
            }
        }
    }
    let grad = LocalComm::group_with_timeout(w, t);
    uly.into_iter()
        .zip(ring)
        .zip(grad)
        .map(|((u, r), g)| (u.unwrap(), r.unwrap(), g))
        .collect()
}

/// Runs `f(rank, ulysses, ring, grad)` on every rank of `layout` in its own thread; fails the
/// test if a rank has not answered by the deadline (a hang). Results in rank order.
fn on_ranks<T: Send + 'static>(
    layout: Layout,
    f: impl Fn(usize, &LocalComm, &LocalComm, &LocalComm) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let w = layout.world_size();
    let (tx, rx) = mpsc::channel();
    for (rank, (u, r, g)) in comms(layout).into_iter().enumerate() {
        let (tx, f) = (tx.clone(), f.clone());
        std::thread::spawn(move || {
            let out = f(rank, &u, &r, &g);
            let _ = tx.send((rank, out));
        });
    }
    drop(tx);
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut out: Vec<Option<T>> = (0..w).map(|_| None).collect();
    for _ in 0..w {
        let left = deadline.saturating_duration_since(Instant::now());
        let (rank, x) = rx
            .recv_timeout(left)
            .expect("a rank neither finished nor failed before the deadline (hang, or a panic)");
        out[rank] = Some(x);
    }
    out.into_iter().map(Option::unwrap).collect()
}

/// Trains `steps` steps of the packed sequence `lens` (or, with `unpacked`, the same tokens
/// as one causal sequence) on every rank of `layout`, passing the crossing labels (the
/// trainer must drop those of each sample's last token).
fn train(layout: Layout, lens: &[usize], steps: usize, recompute: bool, unpacked: bool) -> Run {
    let lens = lens.to_vec();
    let seq: usize = lens.iter().sum();
    let mut runs = on_ranks(layout, move |_rank, u, r, g| {
        let model = Decoder::random(
            ModelConfig::tiny(),
            Device::Cpu,
            Kind::Double,
            Kind::Double,
            SEED,
        )
        .unwrap();
        let groups = Groups {
            ulysses: u as &dyn Communicator,
            ring: r,
            grad: g,
            dp: 1,
        };
        let cfg = TrainConfig {
            optimizer: opt(),
            zero_stage: 0,
            recompute,
            backend: Backend::CpuMath,
            profile: false,
            mem_trace: false,
        };
        let mut t = if unpacked {
            Trainer::new(model, groups, seq, cfg).unwrap()
        } else {
            Trainer::new_packed(model, groups, &lens, cfg).unwrap()
        };
        let packing = Packing::new(&t.sample_lens(), u.size(), r.size()).unwrap();
        let rg = t.local_ranges();
        assert_eq!(rg, packing.local_ranges(r.rank(), u.rank()));
        let pick = |v: &[i64]| -> Tensor {
            let x: Vec<i64> = rg.iter().flat_map(|&(a, b)| v[a..b].to_vec()).collect();
            row(&x)
        };
        let mut run = Run {
            losses: vec![],
            tokens: vec![],
            params: vec![],
        };
        for step in 0..steps {
            let ids = ids(step, seq);
            let labels = if unpacked {
                sample_labels(&ids, &lens)
            } else {
                crossing_labels(&ids)
            };
            let st = t.step(&pick(&ids), &pick(&labels)).unwrap();
            run.losses.push(st.loss);
            run.tokens.push(st.tokens);
        }
        run.params = params_of(t.model.named_parameters());
        run
    });
    runs.swap_remove(0)
}

/// (max relative loss error, max relative parameter error).
fn max_rel(a: &Run, b: &Run) -> (f64, f64) {
    let mut le: f64 = 0.0;
    assert_eq!(a.losses.len(), b.losses.len());
    for (x, y) in a.losses.iter().zip(&b.losses) {
        le = le.max((x - y).abs() / y.abs());
    }
    let mut pe: f64 = 0.0;
    assert_eq!(a.params.len(), b.params.len());
    for ((n, x), (m, y)) in a.params.iter().zip(&b.params) {
        assert_eq!(n, m);
        let d: f64 = x.iter().zip(y).map(|(p, q)| (p - q) * (p - q)).sum();
        let r: f64 = y.iter().map(|q| q * q).sum();
        pe = pe.max((d / r).sqrt());
    }
    (le, pe)
}

/// The vision section of a plan file, read through the runtime's plan reader.
fn vision_of(path: &str) -> VisionSection {
    let plan = mmsp_runtime::plan::Plan::from_file(std::path::Path::new(path)).unwrap();
    VisionSection::from_plan(plan.contract.vision.as_ref().unwrap()).unwrap()
}

#[test]
fn packing_ranges_are_the_planners() {
    // plan4_vlm.json: 2 samples (6784, 6528) over ulysses 2 x ring 2, made by the planner.
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/plan4_vlm.json");
    let plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let want: Vec<Vec<(usize, usize)>> =
        serde_json::from_value(plan["tokens"]["ranges_per_rank"].clone()).unwrap();
    let lens: Vec<usize> = serde_json::from_value(plan["vision"]["sample_lens"].clone()).unwrap();
    let p = Packing::new(&lens, 2, 2).unwrap();
    assert_eq!(p.ranges_per_sp_rank(), want);
    assert_eq!(p.seq_len(), 13312);
    // The vision section as `run` resolves it: the same ranges (no padding in this plan).
    let v = vision_of(path);
    let vr = v.resolve(&EncoderSource::Tiny, 64, 13312, 2, 2).unwrap();
    assert_eq!(vr.ranges, want);
    assert_eq!(vr.sample_lens, lens);
    // Rank 0 = (ring 0, ulysses 0): chunks 0 and 3 of each sample, first Ulysses halves.
    assert_eq!(
        p.local_ranges(0, 0),
        vec![(0, 848), (5088, 5936), (6784, 7600), (11680, 12496)]
    );
    // RoPE positions restart in each sample; the last tokens of both samples are on rank
    // (ring 0, ulysses 1), at the end of each sample's second piece.
    let pos = p.positions(0, 0);
    assert_eq!(pos.len(), 848 * 2 + 816 * 2);
    assert_eq!((pos[0], pos[847], pos[848]), (0, 847, 5088));
    assert_eq!((pos[1696], pos[1696 + 816]), (0, 4896));
    assert!(p.last_rows(0, 0).is_empty());
    assert_eq!(p.last_rows(0, 1), vec![848 * 2 - 1, 848 * 2 + 816 * 2 - 1]);
    // One sample is the single zigzag sequence, uneven lengths included.
    for (n, u, r) in [(53, 2, 2), (53, 1, 4), (48, 2, 1)] {
        let one = Packing::new(&[n], u, r).unwrap();
        let zz = Zigzag::new(n, u, r).unwrap();
        for rr in 0..r {
            for uu in 0..u {
                assert_eq!(one.local_ranges(rr, uu), zz.local_ranges(rr, uu).to_vec());
                let p: Vec<i64> = zz
                    .local_ranges(rr, uu)
                    .iter()
                    .flat_map(|&(a, b)| a as i64..b as i64)
                    .collect();
                assert_eq!(one.positions(rr, uu), p);
            }
        }
    }
    // Shard and unshard round trip.
    let full = Tensor::arange(48, (Kind::Int64, Device::Cpu)).view([1, 48]);
    let p = Packing::new(&LENS, 2, 2).unwrap();
    let shards: Vec<Vec<Tensor>> = (0..2)
        .map(|r| (0..2).map(|u| p.shard(&full, 1, r, u).unwrap()).collect())
        .collect();
    assert!(p.unshard(&shards, 1).unwrap().equal(&full));
}

/// A plan the planner made for samples of odd lengths (`tests/data/plan_vlm_padded_2x2.json`:
/// 2 x 196 + 7 and 3 x 196 + 5 tokens at SP 2 x 2, padded by 1 and 7 to multiples of 8): the
/// runtime shards the padded samples exactly as the plan's ranges, and no label is a padding
/// token (the last text token of each sample has none either: its next token is padding).
#[test]
fn planner_padded_samples_shard_as_planned_without_loss_on_padding() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/plan_vlm_padded_2x2.json"
    );
    let plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let want: Vec<Vec<(usize, usize)>> =
        serde_json::from_value(plan["tokens"]["ranges_per_rank"].clone()).unwrap();
    let v = vision_of(path);
    let vr = v.resolve(&EncoderSource::Tiny, 64, 1000, 2, 2).unwrap();
    assert_eq!(vr.sample_lens, vec![400, 600]);
    assert_eq!(vr.ranges, want);
    assert_eq!(vr.padding, 8);
    // Targets: the text tokens after the first of each sample (positions 392..399 and
    // 988..993 are text, 399 and 993..1000 padding).
    let targets: Vec<usize> = (0..1000).filter(|&p| vr.text_target[p]).collect();
    let mut expect: Vec<usize> = (391..398).collect();
    expect.extend(987..992);
    assert_eq!(targets, expect);
    // Without its padding field the samples do not add up (text 8 and 12, the plan says 7, 5).
    let mut bare = v.clone();
    bare.pad_tokens_per_sample = None;
    assert!(matches!(
        bare.resolve(&EncoderSource::Tiny, 64, 1000, 2, 2),
        Err(RuntimeError::Plan(_))
    ));
}

#[test]
fn bad_sample_lengths_are_typed_errors() {
    let shape_err = |r: Result<Packing, RuntimeError>, needle: &str| match r {
        Err(RuntimeError::Shape(m)) => {
            assert!(m.contains(needle), "{m}");
            assert!(!m.contains('\n'), "{m}");
        }
        Ok(_) => panic!("accepted"),
        Err(e) => panic!("{e:?}"),
    };
    shape_err(
        Packing::new(&[16, 12], 2, 2),
        "packed sample 1 has 12 tokens, not a positive multiple of 2 x ring 2 x ulysses 2 = 8",
    );
    shape_err(Packing::new(&[8, 0], 1, 1), "sample 1 has 0 tokens");
    shape_err(Packing::new(&[], 1, 1), "at least one sample");
    shape_err(Packing::new(&[3], 2, 1), "cannot be cut");
    assert!(Packing::new(&[5, 7], 1, 1).is_err(), "odd lengths at SP 1");
    assert!(matches!(
        Packing::new(&[8], 0, 1),
        Err(RuntimeError::Layout(_))
    ));
    // The trainer refuses them on every rank before any collective (no hang).
    let res = on_ranks(Layout::sp(1, 2, Placement::UlyssesInner), |_, u, r, g| {
        let model = Decoder::random(
            ModelConfig::tiny(),
            Device::Cpu,
            Kind::Double,
            Kind::Double,
            SEED,
        )
        .unwrap();
        let groups = Groups {
            ulysses: u as &dyn Communicator,
            ring: r,
            grad: g,
            dp: 1,
        };
        let cfg = TrainConfig {
            optimizer: opt(),
            zero_stage: 0,
            recompute: false,
            backend: Backend::CpuMath,
            profile: false,
            mem_trace: false,
        };
        Trainer::new_packed(model, groups, &[8, 6, 8], cfg)
            .err()
            .map(|e| (e.is_bad_input(), e.to_string()))
    });
    for r in res {
        let (bad_input, m) = r.expect("the trainer accepted a sample of 6 tokens at SP 2");
        assert!(
            bad_input && m.starts_with("invalid shape: packed sample 1 has 6"),
            "{m}"
        );
    }
    // A vision section whose samples do not divide: a plan error.
    let v = VisionSection {
        encoder: "siglip-so400m".into(),
        tokens_per_frame: 4,
        frames: 3,
        samples: 2,
        sample_lens: vec![12, 10],
        frames_per_sample: Some(vec![2, 1]),
        text_tokens_per_sample: Some(vec![4, 6]),
        pad_tokens_per_sample: None,
        train_vision: true,
        frames_per_rank: vec![vec![0, 1], vec![2]],
        stage: None,
    };
    match v.resolve(&EncoderSource::Tiny, 64, 24, 1, 2) {
        Err(RuntimeError::Plan(m)) => {
            assert!(m.contains("packed sample 1 has 10 tokens"), "{m}");
            assert!(m.contains("sample 2 is the padding"), "{m}");
        }
        Ok(_) => panic!("accepted"),
        Err(e) => panic!("{e:?}"),
    }
}

#[test]
fn packed_sp_layouts_match_one_rank_f64() {
    let one = train(
        Layout::sp(1, 1, Placement::UlyssesInner),
        &LENS,
        2,
        false,
        false,
    );
    // The crossing labels of the samples' last tokens were dropped.
    let seq: usize = LENS.iter().sum();
    assert!(one.tokens.iter().all(|&t| t == (seq - LENS.len()) as f64));
    let cases = [
        (1, 2, Placement::UlyssesInner, false),
        (2, 1, Placement::UlyssesInner, false),
        (1, 4, Placement::UlyssesInner, false),
        (4, 1, Placement::UlyssesInner, true),
        (2, 2, Placement::UlyssesInner, false),
        (2, 2, Placement::RingInner, true),
    ];
    for (u, r, pl, recompute) in cases {
        let got = train(Layout::sp(u, r, pl), &LENS, 2, recompute, false);
        let (le, pe) = max_rel(&got, &one);
        eprintln!("packed {u}x{r} {pl:?} recompute {recompute}: loss err {le:e}, param err {pe:e}");
        assert!(
            le < 1e-10 && pe < 1e-10,
            "{u}x{r} {pl:?}: loss err {le:e}, param err {pe:e}"
        );
        assert_eq!(got.tokens, one.tokens);
    }
    // Two samples too, at SP 4.
    let two = [24, 32];
    let one = train(
        Layout::sp(1, 1, Placement::UlyssesInner),
        &two,
        1,
        false,
        false,
    );
    let got = train(
        Layout::sp(2, 2, Placement::UlyssesInner),
        &two,
        1,
        false,
        false,
    );
    let (le, pe) = max_rel(&got, &one);
    assert!(le < 1e-10 && pe < 1e-10, "2 samples 2x2: {le:e} {pe:e}");
}

/// Document-masked causal attention by matmul and softmax with autograd: token i attends to
/// token j <= i of its own sample only.
fn autograd_document(q: &Tensor, k: &Tensor, v: &Tensor, lens: &[usize]) -> Tensor {
    let g = q.size()[1] / k.size()[1];
    let k = k.repeat_interleave_self_int(g, 1, None);
    let v = v.repeat_interleave_self_int(g, 1, None);
    let s = q.size()[2];
    let scale = 1.0 / (q.size()[3] as f64).sqrt();
    let doc: Vec<i64> = lens
        .iter()
        .enumerate()
        .flat_map(|(j, &n)| std::iter::repeat_n(j as i64, n))
        .collect();
    let doc = Tensor::from_slice(&doc);
    let other = doc.unsqueeze(1).ne_tensor(&doc.unsqueeze(0));
    let mask = Tensor::ones([s, s], (Kind::Bool, q.device()))
        .triu(1)
        .logical_or(&other);
    let scores = q.matmul(&k.transpose(2, 3)) * scale;
    scores
        .masked_fill(&mask, f64::NEG_INFINITY)
        .softmax(-1, q.kind())
        .matmul(&v)
}

/// Plain autograd, one step: the loss (mean over the labelled tokens of all samples) and the
/// model's gradients, either over each sample separately (`separate`) or over the packed
/// sequence with the document mask and per-sample positions.
fn autograd_reference(lens: &[usize], separate: bool) -> (f64, Decoder) {
    let model = Decoder::random(
        ModelConfig::tiny(),
        Device::Cpu,
        Kind::Double,
        Kind::Double,
        SEED,
    )
    .unwrap();
    let seq: usize = lens.iter().sum();
    let ids = ids(0, seq);
    let labels = sample_labels(&ids, lens);
    let ce = |logits: &Tensor, y: &[i64]| {
        logits.view([-1, VOCAB]).cross_entropy_loss::<Tensor>(
            &Tensor::from_slice(y),
            None,
            tch::Reduction::Sum,
            -100,
            0.0,
        )
    };
    let total = labels.iter().filter(|&&y| y != -100).count() as f64;
    let loss = if separate {
        let mut sum = Tensor::zeros([], (Kind::Double, Device::Cpu));
        let mut at = 0;
        for &n in lens {
            let pos = Tensor::arange(n as i64, (Kind::Int64, Device::Cpu));
            let logits = model
                .forward(
                    Input::Ids(&row(&ids[at..at + n])),
                    &pos,
                    &mut |_, q, k, v| Ok(autograd_causal(q, k, v)),
                )
                .unwrap();
            sum += ce(&logits, &labels[at..at + n]);
            at += n;
        }
        sum / total
    } else {
        let pos: Vec<i64> = lens.iter().flat_map(|&n| 0..n as i64).collect();
        let logits = model
            .forward(
                Input::Ids(&row(&ids)),
                &Tensor::from_slice(&pos),
                &mut |_, q, k, v| Ok(autograd_document(q, k, v, lens)),
            )
            .unwrap();
        ce(&logits, &labels) / total
    };
    loss.backward();
    (loss.double_value(&[]), model)
}

#[test]
fn document_mask_equals_separate_samples() {
    let (l_sep, sep) = autograd_reference(&LENS, true);
    let (l_doc, doc) = autograd_reference(&LENS, false);
    assert!((l_sep - l_doc).abs() < 1e-12 * l_sep, "{l_sep} vs {l_doc}");
    for ((n, a), (_, b)) in sep.named_parameters().iter().zip(doc.named_parameters()) {
        let (ga, gb) = (a.grad(), b.grad());
        let e = (&ga - &gb).norm().double_value(&[]) / gb.norm().double_value(&[]);
        assert!(e < 1e-10, "{n}: gradient rel err {e:e}");
    }
    // The trainer on one rank (packed) takes the separate runs' step: same loss, and the
    // same parameters after AdamW on the separate runs' gradients.
    let g1 = LocalComm::group(1).pop().unwrap();
    let mut o = AdamW::new(&sep.parameters(), opt()).unwrap();
    o.step(&g1, 1.0).unwrap();
    let reference = Run {
        losses: vec![l_sep],
        tokens: vec![],
        params: params_of(sep.named_parameters()),
    };
    let one = train(
        Layout::sp(1, 1, Placement::UlyssesInner),
        &LENS,
        1,
        false,
        false,
    );
    let (le, pe) = max_rel(&one, &reference);
    assert!(
        le < 1e-10 && pe < 1e-10,
        "loss err {le:e}, param err {pe:e}"
    );
    // The same tokens and labels as one causal sequence (attention across samples, positions
    // running on) give another loss: the mask is what makes them equal.
    let causal = train(
        Layout::sp(1, 1, Placement::UlyssesInner),
        &LENS,
        1,
        false,
        true,
    );
    assert_eq!(causal.tokens, one.tokens);
    let d = (causal.losses[0] - l_sep).abs() / l_sep;
    assert!(
        d > 1e-6,
        "causal over samples {} vs per sample {l_sep}",
        causal.losses[0]
    );
}

#[test]
fn ranks_with_other_samples_fail_alike() {
    // Same local rows, other samples: every rank fails at the first attention with the same
    // one-line error (the ranks agree on the packing before any per-sample collective).
    for (a, b) in [(vec![8, 8], vec![16]), (vec![8, 8, 8], vec![8, 16])] {
        let res = on_ranks(
            Layout::sp(1, 2, Placement::UlyssesInner),
            move |rank, u, r, g| {
                let lens = if rank == 0 { a.clone() } else { b.clone() };
                let model = Decoder::random(
                    ModelConfig::tiny(),
                    Device::Cpu,
                    Kind::Double,
                    Kind::Double,
                    SEED,
                )
                .unwrap();
                let groups = Groups {
                    ulysses: u as &dyn Communicator,
                    ring: r,
                    grad: g,
                    dp: 1,
                };
                let cfg = TrainConfig {
                    optimizer: opt(),
                    zero_stage: 0,
                    recompute: false,
                    backend: Backend::CpuMath,
                    profile: false,
                    mem_trace: false,
                };
                let mut t = Trainer::new_packed(model, groups, &lens, cfg).unwrap();
                let n = t.local_ranges().iter().map(|(a, b)| b - a).sum::<usize>() as i64;
                let x = Tensor::zeros([1, n], (Kind::Int64, Device::Cpu));
                t.step(&x, &x).unwrap_err().to_string()
            },
        );
        assert_eq!(res[0], res[1]);
        assert!(
            res[0].contains("ranks disagree on the packed samples: rank(s) (ring 1, ulysses 0)"),
            "{}",
            res[0]
        );
        assert!(!res[0].contains('\n'), "{}", res[0]);
    }
}
