//! Human-readable rendering of search results and plans for the terminal.

use std::fmt::Write;

use crate::cost::{Placement, TimeBreakdown};
use crate::multimodal::VisionPlan;
use crate::plan::Plan;
use crate::search::{why_slower, Scored, SearchResult};
use crate::topology::Topology;
use crate::units::{fmt_gib, fmt_secs, fmt_tokens, GIB};

/// Short description of a layout, e.g. "ulysses 8 (in NVLink) x ring 32 (across) x dp 1".
pub fn layout_words(topo: &Topology, s: &Scored) -> String {
    let l = &s.candidate.layout;
    let where_ = |fam: crate::topology::GroupFamily| {
        if fam.size <= 1 {
            ""
        } else if topo.same_domain(0, (fam.size - 1) * fam.stride) {
            " (in NVLink)"
        } else {
            " (across)"
        }
    };
    let mut out = String::new();
    if l.tp > 1 {
        let _ = write!(out, "tp {}{} x ", l.tp, where_(l.tp_family()));
    }
    let _ = write!(
        out,
        "ulysses {}{} x ring {}{} x dp {}",
        l.ulysses,
        where_(l.ulysses_family()),
        l.ring,
        where_(l.ring_family()),
        l.dp
    );
    out
}

/// The plan's recompute in words: its policy, and for the runtime's recompute outside
/// attention what it is (a choice under every ZeRO stage).
/// Parameters as "8.03B (8,030,261,248)".
pub fn fmt_params(n: u64) -> String {
    let digits = n.to_string();
    let mut grouped = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(c);
    }
    format!("{:.2}B ({grouped})", n as f64 / 1e9)
}

/// The model line: parameters (active ones for experts), family and attention when read from
/// a Hugging Face config.
/// The prediction of a plan the pipeline built (it always has one: [`crate::plan::build`]).
fn built(plan: &Plan) -> &crate::plan::Predicted {
    plan.predicted
        .as_ref()
        .expect("a plan built by the planner has a prediction")
}

fn model_words(plan: &Plan) -> String {
    let m = &plan.model;
    let p = built(plan);
    let mut s = format!("model: {} parameters", fmt_params(p.params));
    if let (Some(a), Some(e)) = (p.active_params, &m.moe) {
        let _ = write!(
            s,
            ", {} active per token ({} of {} experts)",
            fmt_params(a),
            e.experts_per_token,
            e.num_experts
        );
        s.push_str(", experts sharded like dense weights (no expert parallelism or routing skew)");
    }
    if let Some(f) = &m.family {
        let _ = write!(s, "; {f}");
    }
    if let Some(w) = m.sliding_window {
        let _ = write!(
            s,
            "; sliding window {w} on {} of {} layers (costed as the band)",
            m.sliding_window_layers, m.num_layers
        );
    }
    s
}

fn recompute_words(plan: &Plan) -> String {
    match plan.recompute_policy() {
        crate::cost::Recompute::OutsideAttention => format!(
            "each layer outside attention, in backward (the runtime's recompute; plan value \"{}\")",
            plan.recompute.as_str()
        ),
        r => r.as_str().to_string(),
    }
}

/// A recompute policy in the runners-up table's 9-character column.
fn recompute_column(r: crate::cost::Recompute) -> &'static str {
    match r {
        crate::cost::Recompute::OutsideAttention => "out-attn",
        other => other.as_str(),
    }
}

fn short_layout(s: &Scored) -> String {
    let l = &s.candidate.layout;
    let p = match l.placement {
        Placement::UlyssesInner => "u-in",
        Placement::RingInner => "r-in",
    };
    let tp = if l.tp > 1 {
        format!("t{} ", l.tp)
    } else {
        String::new()
    };
    format!("{tp}u{} r{} dp{} {p}", l.ulysses, l.ring, l.dp)
}

/// The table `mmsp plan` prints.
pub fn plan_table(
    topo: &Topology,
    plan: &Plan,
    result: &SearchResult,
    best: &Scored,
    top: usize,
) -> String {
    let mut o = String::new();
    write_plan_header(&mut o, topo, plan, result);
    let _ = writeln!(o, "{}", model_words(plan));
    let _ = writeln!(o);
    let _ = writeln!(o, "Best plan");
    write_best_layout(&mut o, topo, plan, best);
    write_memory(&mut o, topo, plan);
    write_step_time(&mut o, &built(plan).time);
    if let Some(v) = &plan.vision {
        write_vision(&mut o, v, plan.layout.sp());
    }
    let p = built(plan);
    let _ = writeln!(
        o,
        "  comm         {} exposed, {} overlapped with compute",
        fmt_secs(p.comm_exposed_s),
        fmt_secs(p.comm_overlapped_s)
    );
    write_runners_up(&mut o, topo, result, best, top);
    o
}

/// The plan table's first lines: the request, the candidates searched (with the infeasible
/// ones by reason), the padding and the largest context when searched for.
fn write_plan_header(o: &mut String, topo: &Topology, plan: &Plan, result: &SearchResult) {
    let spec = &topo.spec;
    let _ = writeln!(
        o,
        "mmsp plan: {} at {} tokens on {} x {} ({}), global batch {} sequence{} ({} tokens)",
        plan.model.name,
        fmt_tokens(plan.context_tokens),
        plan.world_size,
        spec.name,
        spec.gpu_model,
        plan.global_batch,
        if plan.global_batch == 1 { "" } else { "s" },
        fmt_tokens(plan.global_batch * plan.context_tokens)
    );
    let total = result.ranked.len() + result.infeasible.len();
    let mut line = format!(
        "searched {total} candidates: {} feasible",
        result.ranked.len()
    );
    let summary = result.infeasible_summary();
    if !summary.is_empty() {
        let parts: Vec<String> = summary.iter().map(|(k, n)| format!("{n} {k}")).collect();
        let _ = write!(line, "; infeasible: {}", parts.join(", "));
    }
    let _ = writeln!(o, "{line}");
    if plan.padding_tokens > 0 {
        let _ = writeln!(
            o,
            "context padded by {} tokens to {} (a multiple of 2 x SP for the zigzag shards; costed)",
            plan.padding_tokens, plan.context_tokens
        );
    }
    if let Some(mc) = plan.max_context_tokens {
        let _ = writeln!(
            o,
            "max context: {} tokens ({mc}) fit on {} GPUs",
            fmt_tokens(mc),
            plan.world_size
        );
    }
}

/// The best plan's layout, ZeRO stage, recompute, micro-batch, step time and per-GPU rates.
fn write_best_layout(o: &mut String, topo: &Topology, plan: &Plan, best: &Scored) {
    let p = built(plan);
    let l = &plan.layout;
    let _ = writeln!(
        o,
        "  layout       {}   [sp {} = ulysses x ring, tp {}]",
        layout_words(topo, best),
        l.sp(),
        l.tp
    );
    let _ = writeln!(
        o,
        "  ZeRO         stage {} over {} ranks",
        plan.zero_stage,
        l.grad_family().size
    );
    let _ = writeln!(o, "  recompute    {}", recompute_words(plan));
    let _ = writeln!(
        o,
        "  micro-batch  {} sequence{}, {} accumulation step{}",
        plan.micro_batch,
        if plan.micro_batch == 1 { "" } else { "s" },
        plan.grad_accum_steps,
        if plan.grad_accum_steps == 1 { "" } else { "s" }
    );
    let _ = writeln!(
        o,
        "  step time    {}   ({:.0} tokens/s, MFU {:.1}%, HFU {:.1}%)",
        fmt_secs(p.step_time_s),
        p.tokens_per_s,
        p.mfu * 100.0,
        p.hfu * 100.0
    );
    if let Some(sim) = p.simulated_step_time_s {
        let _ = writeln!(
            o,
            "  simulated    {}   (discrete-event replay of the step; analytic {})",
            fmt_secs(sim),
            fmt_secs(p.step_time_s)
        );
    }
    let _ = writeln!(
        o,
        "  per GPU      {:.0} tokens/s, {:.1} model TFLOP/s; {} tokens of each sequence",
        p.tokens_per_s_per_gpu,
        p.model_tflops_per_gpu,
        fmt_tokens(plan.context_tokens / u64::from(l.sp()))
    );
}

/// The best plan's memory per GPU, by kind, and the search's warnings about it.
fn write_memory(o: &mut String, topo: &Topology, plan: &Plan) {
    let p = built(plan);
    let spec = &topo.spec;
    let m = &p.memory;
    let _ = writeln!(
        o,
        "  memory/GPU   {} of {}",
        fmt_gib(p.memory_per_gpu_bytes),
        fmt_gib(spec.hbm_bytes)
    );
    let g = |b: f64| format!("{:.1}", b / GIB);
    let _ = writeln!(
        o,
        "    GiB: weights {} | gradients {} | optimizer {} | activations {} | logits {} | comm buffers {} | reserve {} | fragmentation {}",
        g(m.weights_bytes),
        g(m.gradients_bytes),
        g(m.optimizer_bytes),
        g(m.activations_bytes),
        g(m.logits_bytes),
        g(m.comm_buffers_bytes),
        g(m.reserved_bytes),
        g(m.fragmentation_bytes)
    );
    for w in &p.warnings {
        let _ = writeln!(o, "  warning      {w}");
    }
}

/// The best plan's step time by kind of work and communication.
fn write_step_time(o: &mut String, t: &TimeBreakdown) {
    let _ = writeln!(
        o,
        "  time/step    gemm {} | attention {} | elementwise {} | head {} | recompute {} | vision {}",
        fmt_secs(t.gemm_s),
        fmt_secs(t.attention_s),
        fmt_secs(t.elementwise_s),
        fmt_secs(t.head_s),
        fmt_secs(t.recompute_s),
        fmt_secs(t.vision_s)
    );
    // The ring's own merge and accumulation work, shown where there is a ring.
    let merge = if t.ring_merge_s > 0.0 {
        format!(" | ring merge {}", fmt_secs(t.ring_merge_s))
    } else {
        String::new()
    };
    let _ = writeln!(
        o,
        "               ulysses a2a {} | ring p2p {} ({} exposed){merge} | grad sync {} ({} exposed) | optimizer {}",
        fmt_secs(t.ulysses_all_to_all_s),
        fmt_secs(t.ring_p2p_s),
        fmt_secs(t.ring_exposed_s),
        fmt_secs(t.grad_sync_s + t.zero_gather_s),
        fmt_secs(t.grad_sync_exposed_s + t.zero_gather_exposed_s),
        fmt_secs(t.optimizer_s)
    );
}

/// The multi-modal stages: frames balanced for the encoder, re-sharded, packed for the LLM.
fn write_vision(o: &mut String, v: &VisionPlan, sp: u32) {
    let _ = writeln!(
        o,
        "  vision       {} frames of {} sample{} via {} ({} tokens/frame, {})",
        v.frames,
        v.samples,
        if v.samples == 1 { "" } else { "s" },
        v.encoder,
        v.tokens_per_frame,
        if v.train_vision { "trained" } else { "frozen" }
    );
    let _ = writeln!(
            o,
            "    stage 1    frames over {} SP ranks: encoder imbalance {:.3} -> {:.3} ({} via {}, {}); encoder {} per micro-batch",
            v.frames_per_rank.len(),
            v.encoder_imbalance_before,
            v.encoder_imbalance_after,
            v.balance_method,
            v.solver,
            fmt_secs(v.solve_time_s),
            fmt_secs(v.stage.encoder_s)
        );
    let _ = writeln!(
        o,
        "    re-shard   {} of embeddings to the zigzag shards: {} forward, {} gradients back",
        fmt_gib(v.reshard_bytes as f64),
        fmt_secs(v.stage.reshard_s),
        fmt_secs(v.stage.gather_s)
    );
    let pad: u64 = v.pad_tokens_per_sample.iter().flatten().sum();
    let _ = writeln!(
            o,
            "    stage 2    each sample padded to a multiple of 2 x {} ({} padding tokens, no loss); LLM attention imbalance {:.4} (max/mean causal work over SP ranks)",
            sp,
            pad,
            v.attention_imbalance
        );
}

/// Runners-up: the best candidate of each other layout, at most `top`, with why each lost.
fn write_runners_up(
    o: &mut String,
    topo: &Topology,
    result: &SearchResult,
    best: &Scored,
    top: usize,
) {
    let mut seen = vec![best.candidate.layout];
    let mut rows = Vec::new();
    for s in &result.ranked {
        if rows.len() >= top {
            break;
        }
        if seen.contains(&s.candidate.layout) {
            continue;
        }
        seen.push(s.candidate.layout);
        rows.push(s);
    }
    if !rows.is_empty() {
        let _ = writeln!(o);
        let _ = writeln!(o, "Runners-up (best of each other layout)");
        let _ = writeln!(
            o,
            "  {:<22} {:>4} {:<9} {:>2} {:>10} {:>10}  why it lost",
            "layout", "zero", "recompute", "mb", "step time", "memory"
        );
        for s in rows {
            let _ = writeln!(
                o,
                "  {:<22} {:>4} {:<9} {:>2} {:>10} {:>10}  {}",
                short_layout(s),
                s.candidate.zero_stage,
                recompute_column(s.candidate.recompute),
                s.candidate.micro_batch,
                fmt_secs(s.estimate.step_time_s),
                fmt_gib(s.estimate.memory_per_gpu_bytes),
                why_slower(topo, best, s)
            );
        }
    }
}

/// The table `mmsp simulate` prints.
pub fn sim_table(
    plan: &Plan,
    analytic: &crate::cost::Estimate,
    sim: &crate::sim::SimResult,
) -> String {
    let mut o = String::new();
    let l = &plan.layout;
    let _ = writeln!(
        o,
        "mmsp simulate: {} at {} tokens, {} GPUs, ulysses {} x ring {} x dp {} ({}), ZeRO-{}, recompute {}",
        plan.model.name,
        fmt_tokens(plan.context_tokens),
        plan.world_size,
        l.ulysses,
        l.ring,
        l.dp,
        l.placement.as_str(),
        plan.zero_stage,
        plan.recompute_policy().as_str()
    );
    let _ = writeln!(
        o,
        "simulated {} ops on {} lane{}{}",
        sim.ops,
        sim.lanes,
        if sim.lanes == 1 { "" } else { "s" },
        if sim.lanes == 1 {
            " (collapsed: one rank represents all)"
        } else {
            ""
        }
    );
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "  step time     simulated {}   analytic {}   ({:+.1}%)",
        fmt_secs(sim.step_time_s),
        fmt_secs(analytic.step_time_s),
        (sim.step_time_s / analytic.step_time_s - 1.0) * 100.0
    );
    let _ = writeln!(
        o,
        "  compute busy  {}   exposed (communication and waits) {}",
        fmt_secs(sim.compute_busy_s),
        fmt_secs(sim.exposed_s)
    );
    let _ = writeln!(
        o,
        "  peak link utilisation {:.0}%",
        sim.max_link_utilisation * 100.0
    );
    let _ = writeln!(
        o,
        "  {:<16} {:>12} {:>14}",
        "stream (rank 0)", "busy", "sent"
    );
    for (name, busy) in &sim.stream_busy_s {
        let sent = sim
            .sent_bytes
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0.0, |x| x.1);
        let _ = writeln!(
            o,
            "  {:<16} {:>12} {:>14}",
            name,
            fmt_secs(*busy),
            if sent > 0.0 {
                fmt_gib(sent)
            } else {
                "-".into()
            }
        );
    }
    o
}
