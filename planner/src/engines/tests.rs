use super::*;
use crate::cost::{Layout, Placement};
use crate::spec::cluster::ClusterSpec;

fn llama3() -> ModelSpec {
    crate::spec::model::load("llama3-8b").unwrap()
}

/// One 32K-token sequence of `m`, text only.
fn workload(m: &ModelSpec) -> Workload<'_> {
    Workload {
        model: m,
        context: 32768,
        global_batch: 1,
        vision: None,
    }
}

fn profile(row: &str) -> Profile {
    profiles().into_iter().find(|p| p.row == row).unwrap()
}

fn candidate(u: u32, r: u32, dp: u32, tp: u32, zero: u8, rc: Recompute) -> Candidate {
    Candidate {
        layout: Layout {
            ulysses: u,
            ring: r,
            dp,
            tp,
            placement: Placement::UlyssesInner,
        },
        zero_stage: zero,
        recompute: rc,
        micro_batch: 1,
    }
}

/// Megatron-Core's distributed optimizer ("Distributed Optimizer", Megatron-Core developer
/// guide): 6 + 12/d bytes per parameter. Hand-computed: 1e9 parameters over d = 8 ranks:
/// 6e9 + 1.5e9 = 7.5e9 bytes.
#[test]
fn distributed_optimizer_is_6_plus_12_over_d() {
    let b = engine_model_states(StatesRule::DistributedOptimizer, 1e9, 1, 8.0);
    assert_eq!(b, 7.5e9);
    assert_eq!(
        engine_model_states(StatesRule::DistributedOptimizer, 1e9, 1, 1.0),
        18e9
    );
}

/// ZeRO (Rajbhandari et al. 2020, Fig. 1 with K = 12, 16-bit gradients): stage 1
/// (2 + 2 + 12/N), stage 2 (2 + 14/N), stage 3 16/N bytes per parameter. Their Fig. 1 example,
/// 7.5B parameters on N = 64: 120 GB unsharded, 31.4 GB, 16.6 GB, 1.9 GB.
#[test]
fn deepspeed_zero_matches_the_papers_figure_1() {
    let (p, n) = (7.5e9, 64.0);
    let z = |s| engine_model_states(StatesRule::DeepSpeedZero, p, s, n) / 1e9;
    assert_eq!(
        engine_model_states(StatesRule::DeepSpeedZero, p, 0, n),
        120e9
    );
    assert!((z(1) - 31.4).abs() < 0.1, "{}", z(1));
    assert!((z(2) - 16.6).abs() < 0.1, "{}", z(2));
    assert!((z(3) - 1.9).abs() < 0.1, "{}", z(3));
}

/// Korthikanti et al. 2022 (Table 2) with FlashAttention for the llama3-8b shape, hand-computed:
/// 8h + 4q + 4kv + 6f + 4 heads bytes per token per layer, divided by t under sequence
/// parallelism; whole-layer recompute keeps 2h/t per layer plus one layer's working set.
#[test]
fn korthikanti_activations_with_flash_and_full_recompute() {
    let arch = ActivationArch {
        hidden: 4096.0,
        q_dim: 4096.0,
        kv_dim: 1024.0,
        ffn: 14336.0,
        heads: 32.0,
        swiglu: true,
        dropout: false,
        flash: true,
    };
    let per_tok = 8.0 * 4096.0 + 4.0 * 4096.0 + 4.0 * 1024.0 + 6.0 * 14336.0 + 4.0 * 32.0;
    let (layers, tokens, t) = (32.0, 8192.0, 2.0);
    let none = engine_activation_bytes(&arch, layers, tokens, t, false);
    assert_eq!(none, layers * per_tok / t * tokens);
    let full = engine_activation_bytes(&arch, layers, tokens, t, true);
    assert_eq!(full, (layers * 2.0 * 4096.0 / t + per_tok / t) * tokens);
}

/// The FlashAttention-2 engines run attention at 0.574 of the calibration's cuDNN kernel: the
/// same layout's attention time is the runtime's divided by that factor (DeepSpeed-Ulysses has
/// no ring, so no merge is added).
#[test]
fn fa2_engines_run_attention_at_the_measured_factor() {
    let cluster = ClusterSpec::load("dgx-h100").unwrap();
    let topo = Topology::build(&cluster, 8);
    let m = llama3();
    let w = workload(&m);
    let c = candidate(8, 1, 1, 1, 3, Recompute::None);
    let rt = crate::cost::terms_any_memory(&topo, &w, &c).unwrap();
    let ds = evaluate(&profile("ds-ulysses"), &topo, &w, &c, 1.0).unwrap();
    let ratio = rt.attn_fwd_s / ds.terms.attn_fwd_s;
    assert!((ratio - FA2_OVER_CUDNN).abs() < 1e-12, "{ratio}");
    // Megatron-Core's attention is the calibration's cuDNN kernel.
    let c = candidate(1, 4, 1, 2, 1, Recompute::None);
    let rt = crate::cost::terms_any_memory(&topo, &w, &c).unwrap();
    let mc = evaluate(&profile("megatron-cp-tp"), &topo, &w, &c, 1.0).unwrap();
    assert_eq!(rt.attn_fwd_s, mc.terms.attn_fwd_s);
    // ring-flash-attention adds its merge to each ring step on top of the FA2 factor.
    let c = candidate(1, 8, 1, 1, 3, Recompute::None);
    let rt = crate::cost::terms_any_memory(&topo, &w, &c).unwrap();
    let rf = evaluate(&profile("ring-flash-attn"), &topo, &w, &c, 1.0).unwrap();
    assert!(rf.terms.attn_fwd_s > rt.attn_fwd_s / FA2_OVER_CUDNN);
}

/// Whole-layer recompute runs attention forward once more: 4.5 instead of 3.5 forwards.
#[test]
fn whole_layer_recompute_repeats_attention() {
    let cluster = ClusterSpec::load("dgx-h100").unwrap();
    let topo = Topology::build(&cluster, 8);
    let m = llama3();
    let w = workload(&m);
    let p = profile("megatron-cp-tp");
    let none = evaluate(
        &p,
        &topo,
        &w,
        &candidate(1, 4, 1, 2, 1, Recompute::None),
        1.0,
    )
    .unwrap();
    let full = evaluate(
        &p,
        &topo,
        &w,
        &candidate(1, 4, 1, 2, 1, Recompute::OutsideAttention),
        1.0,
    )
    .unwrap();
    let r = full.terms.attn_fwd_s / none.terms.attn_fwd_s;
    assert!((r - 4.5 / 3.5).abs() < 1e-12, "{r}");
    assert!(full.estimate.memory.activations_bytes < none.estimate.memory.activations_bytes);
    // HFU: the layers' forward GEMMs and attention's forward once more; MFU unchanged.
    assert_eq!(full.terms.model_flops, none.terms.model_flops);
    let l = 32.0;
    let gemm = crate::cost::compute::layer_gemm_flops_fwd(&m, 32768.0 / 4.0, 2.0);
    let attn = crate::cost::compute::attention_flops_fwd(&m, 32768.0) / 8.0;
    let again = 8.0 * l * (gemm + attn);
    let got = full.terms.hardware_flops - none.terms.hardware_flops;
    assert!((got - again).abs() <= 1e-9 * again, "{got} {again}");
}

/// The logits each engine's loss holds: Megatron 6 B, Hugging Face 10 B per logit over the
/// rank's whole shard (32K tokens; Megatron: 8K tokens per CP rank x 128256 / 2 TP ranks;
/// ring-flash-attention: 4K tokens per ring rank x 128256).
#[test]
fn logits_per_engine() {
    let cluster = ClusterSpec::load("dgx-h100").unwrap();
    let topo = Topology::build(&cluster, 8);
    let m = llama3();
    let w = workload(&m);
    let c = candidate(1, 4, 1, 2, 1, Recompute::None);
    let mc = evaluate(&profile("megatron-cp-tp"), &topo, &w, &c, 1.0).unwrap();
    assert_eq!(mc.estimate.memory.logits_bytes, 8192.0 * 64128.0 * 6.0);
    let c = candidate(1, 8, 1, 1, 3, Recompute::None);
    let rf = evaluate(&profile("ring-flash-attn"), &topo, &w, &c, 1.0).unwrap();
    assert_eq!(rf.estimate.memory.logits_bytes, 4096.0 * 128256.0 * 10.0);
}

/// DeepSpeed-Ulysses stops at the kv heads (8 for llama3-8b); TE's hierarchical CP keeps its
/// all-to-all inside the node; each engine searches only its ZeRO stages.
#[test]
fn layouts_each_engine_runs() {
    let m = llama3();
    let ds = profile("ds-ulysses");
    assert!(runs_layout(
        &ds,
        &m,
        &candidate(8, 1, 2, 1, 1, Recompute::None)
    ));
    assert!(!runs_layout(
        &ds,
        &m,
        &candidate(16, 1, 1, 1, 1, Recompute::None)
    ));
    assert!(!ds.zero_stages.contains(&0));
    let te = profile("te-a2a-p2p");
    let mut c = candidate(2, 4, 1, 1, 1, Recompute::None);
    assert!(runs_layout(&te, &m, &c));
    c.layout.placement = Placement::RingInner;
    assert!(!runs_layout(&te, &m, &c));
    assert_eq!(profile("vila-mmsp").zero_stages, &[3]);
    assert_eq!(profile("megatron-cp-tp").zero_stages, &[1]);
}

#[test]
fn engine_names_parse_and_bad_names_say_what_is_expected() {
    for e in Engine::ALL {
        assert_eq!(Engine::parse(e.name()).unwrap(), e);
    }
    assert_eq!(
        Engine::parse_list("megatron-core, yunchang").unwrap(),
        vec![Engine::MegatronCore, Engine::Yunchang]
    );
    let e = Engine::parse("nemo").unwrap_err().to_string();
    assert!(e.contains("--engine") && e.contains("mmsp-runtime"), "{e}");
}

/// Each profile's memory-only check agrees with its full search having a ranked candidate,
/// below, at and above its largest context on 64 GPUs.
#[test]
fn any_fits_agrees_with_the_engine_search() {
    let m = llama3();
    let t = Topology::build(&ClusterSpec::load("dgx-h100").unwrap(), 64);
    for p in profiles() {
        let req = Request {
            gpus: 64,
            context: 0,
            global_batch: Some(64),
            recompute: None,
            strategy: p.strategy,
            pin: None,
            zero: None,
        };
        let Some(max) = max_context(&p, &t, &m, &req) else {
            continue;
        };
        for ctx in [max / 2, max, max + 128] {
            let r = Request {
                context: ctx,
                ..req.clone()
            };
            let full = !search(&p, &t, &m, &r, None, 1.0).ranked.is_empty();
            assert_eq!(any_fits(&p, &t, &m, &r), full, "{} at {ctx}", p.row);
            assert_eq!(full, ctx <= max, "{} at {ctx}", p.row);
        }
    }
}
