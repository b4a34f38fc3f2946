//! The plan: the versioned JSON contract between the planner and the runtime. It holds
//! everything the runtime needs to execute (mesh, each rank's coordinates and process groups,
//! the zigzag token shards, ZeRO stage, recompute, micro-batch) and everything the planner
//! predicted (time, memory, communication), so measured and predicted sit side by side.
//!
//! `recompute` is what the runtime reads: `none`, `selective` or `full`
//! (`runtime/src/train/run.rs` rejects any other value, and runs every value but `none` as its
//! one recompute, each layer's forward outside attention again in backward, at any ZeRO
//! stage). The planner plans only what the runtime runs: a plan that recomputes writes
//! `"recompute": "full"` and `"recompute_scope": "outside_attention"`, which the runtime
//! ignores and the planner reads back as [`Recompute::OutsideAttention`]
//! ([`Plan::recompute_policy`]). Plans of older planners may say `selective`, or `full` without
//! the scope (costed then as Korthikanti et al.'s policies); they still load, and are re-costed
//! (`mmsp simulate`) as the runtime runs them.

use serde::{Deserialize, Serialize};

use crate::balance::ranges_per_rank;
use crate::cost::{Candidate, Layout, MemoryBreakdown, Recompute, TimeBreakdown};
use crate::error::{Error, Result};
use crate::search::Scored;
use crate::spec::model::ModelSpec;
use crate::topology::Topology;
use crate::units::GIB;

/// The schema this build reads and writes. Bump on any incompatible change.
pub const SCHEMA_VERSION: u32 = 1;
pub const SCHEMA_NAME: &str = "mmsp-plan";

/// One rank's place in the mesh.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RankInfo {
    pub rank: u32,
    pub node: u32,
    pub local_rank: u32,
    pub tp: u32,
    pub ulysses: u32,
    pub ring: u32,
    pub dp: u32,
}

/// Process groups, each a list of global ranks; ring groups are in ring order.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Groups {
    pub tp: Vec<Vec<u32>>,
    pub ulysses: Vec<Vec<u32>>,
    pub ring: Vec<Vec<u32>>,
    pub dp: Vec<Vec<u32>>,
    /// Ranks that hold the same parameter shard and reduce gradients together (dp x sp).
    pub grad: Vec<Vec<u32>>,
}

/// Stage-2 token sharding of each sequence: zigzag over ring ranks, contiguous within a
/// Ulysses group.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TokenPlan {
    /// Chunks each sequence is cut into: 2 x ring.
    pub zigzag_chunks: u32,
    /// Half-open [start, end) token ranges of each SP rank (sp_rank = ring * ulysses_degree +
    /// ulysses), the same in every DP replica.
    pub ranges_per_rank: Vec<Vec<[u64; 2]>>,
}

/// What a plan's recompute covers when `recompute` alone does not say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecomputeScope {
    /// mmsp-runtime's recompute of each layer outside attention, costed as
    /// [`Recompute::OutsideAttention`] (every recomputing plan, at any ZeRO stage).
    OutsideAttention,
}

/// What the planner predicts for the plan.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Predicted {
    pub step_time_s: f64,
    pub tokens_per_s: f64,
    /// Model FLOPs utilisation: GEMMs 6 x params x tokens and causal attention 3 x its forward
    /// (Chowdhery et al. 2022, PaLM, Appendix B), as the field reports MFU.
    pub mfu: f64,
    /// Hardware FLOPs utilisation: what the kernels execute (attention 3.5 x its forward, the
    /// recompute's forward GEMMs again). Absent in plans of older planners.
    #[serde(default)]
    pub hfu: f64,
    pub memory_per_gpu_bytes: f64,
    pub memory: MemoryBreakdown,
    pub time: TimeBreakdown,
    pub comm_exposed_s: f64,
    pub comm_overlapped_s: f64,
    /// Step time from the discrete-event simulator, when it was run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub simulated_step_time_s: Option<f64>,
    /// Parameters of the model, every expert included ([`ModelSpec::params`]).
    #[serde(default)]
    pub params: u64,
    /// Parameters one token uses, for a mixture of experts ([`ModelSpec::active_params`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_params: Option<u64>,
    /// Tokens per second per GPU: `tokens_per_s` over the world size.
    #[serde(default)]
    pub tokens_per_s_per_gpu: f64,
    /// Model TFLOP/s per GPU: the FLOPs MFU counts, over the step time and the world size.
    #[serde(default)]
    pub model_tflops_per_gpu: f64,
    /// Fraction of the GPU's memory left free by `memory_per_gpu_bytes`.
    #[serde(default)]
    pub memory_headroom: f64,
    /// Warnings about the plan (a memory headroom under [`HEADROOM_WARNING`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// A plan whose predicted memory leaves less than this fraction of the GPU's memory free is
/// flagged: the allocator's fragmentation varies from run to run by a few percent of the
/// memory in use (the FRAGMENTATION allowance of `crate::cost::memory`), so such a plan may not
/// fit as run.
pub const HEADROOM_WARNING: f64 = 0.03;

/// The headroom warning of a plan needing `needed` of `capacity` bytes per GPU, if it is due.
pub fn headroom_warning(needed: f64, capacity: f64) -> Option<String> {
    let free = 1.0 - needed / capacity;
    (free < HEADROOM_WARNING).then(|| {
        format!(
            "memory headroom {:.1}% (under {:.0}%): {:.1} of {:.1} GiB per GPU; a run may not \
             fit (for margin: a shorter context, more recompute or more GPUs)",
            free * 100.0,
            HEADROOM_WARNING * 100.0,
            needed / GIB,
            capacity / GIB
        )
    })
}

/// A complete, executable plan.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub schema: String,
    pub schema_version: u32,
    pub generator: String,
    /// "training" (inference plans are not produced yet).
    pub mode: String,
    pub model: ModelSpec,
    /// Topology name (shipped) or path, as given.
    pub topology: String,
    pub world_size: u32,
    pub gpus_per_node: u32,
    pub context_tokens: u64,
    pub global_batch: u64,
    pub micro_batch: u32,
    pub grad_accum_steps: u64,
    pub layout: Layout,
    pub zero_stage: u8,
    /// The recompute value the runtime reads: none, selective or full (see the module doc);
    /// this planner writes none or full.
    pub recompute: Recompute,
    /// `outside_attention` when the plan recomputes each layer outside attention (every plan
    /// of this planner that recomputes): `recompute` is then `full`, the runtime's name for its
    /// recompute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recompute_scope: Option<RecomputeScope>,
    pub ranks: Vec<RankInfo>,
    pub groups: Groups,
    pub tokens: TokenPlan,
    /// Multi-modal stage 1 (frames per rank) when the input is video.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vision: Option<crate::multimodal::VisionPlan>,
    pub predicted: Predicted,
    pub feasible: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_context_tokens: Option<u64>,
    /// Text plans: tokens of padding after the requested context, which `context_tokens`
    /// includes, to make it a multiple of 2 x SP for the zigzag shards (costed as tokens; the
    /// data fills them as it fills the rest).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub padding_tokens: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Plan {
    /// Builds the plan of a scored candidate.
    pub fn build(
        topo: &Topology,
        topology_arg: &str,
        model: &ModelSpec,
        context: u64,
        global_batch: u64,
        scored: &Scored,
    ) -> Result<Plan> {
        let c: &Candidate = &scored.candidate;
        let l = c.layout;
        let world = l.world();
        let gpn = topo.spec.gpus_per_node;
        let ranks = (0..world)
            .map(|rank| {
                let (tp, ulysses, ring, dp) = l.coords(rank);
                RankInfo {
                    rank,
                    node: rank / gpn,
                    local_rank: rank % gpn,
                    tp,
                    ulysses,
                    ring,
                    dp,
                }
            })
            .collect();
        let groups = Groups {
            tp: l.tp_family().groups(world),
            ulysses: l.ulysses_family().groups(world),
            ring: l.ring_family().groups(world),
            dp: l.dp_family().groups(world),
            grad: l.grad_family().groups(world),
        };
        let ranges = ranges_per_rank(&[context], l.ulysses as usize, l.ring as usize)?;
        let e = &scored.estimate;
        // What the runtime runs, as the estimate costed it (`crate::cost::terms`).
        let rc = crate::cost::runtime_recompute(c.recompute);
        let (recompute, recompute_scope) = match rc {
            Recompute::OutsideAttention => {
                (Recompute::Full, Some(RecomputeScope::OutsideAttention))
            }
            other => (other, None),
        };
        Ok(Plan {
            schema: SCHEMA_NAME.into(),
            schema_version: SCHEMA_VERSION,
            generator: format!("mmsp {}", env!("CARGO_PKG_VERSION")),
            mode: "training".into(),
            model: model.clone(),
            topology: topology_arg.into(),
            world_size: world,
            gpus_per_node: gpn,
            context_tokens: context,
            global_batch,
            micro_batch: c.micro_batch,
            grad_accum_steps: e.grad_accum_steps,
            layout: l,
            zero_stage: c.zero_stage,
            recompute,
            recompute_scope,
            ranks,
            groups,
            tokens: TokenPlan {
                zigzag_chunks: 2 * l.ring,
                ranges_per_rank: ranges
                    .into_iter()
                    .map(|v| v.into_iter().map(|(a, b)| [a, b]).collect())
                    .collect(),
            },
            vision: None,
            predicted: Predicted {
                step_time_s: e.step_time_s,
                tokens_per_s: e.tokens_per_s,
                mfu: e.mfu,
                hfu: e.hfu,
                memory_per_gpu_bytes: e.memory_per_gpu_bytes,
                memory: e.memory.clone(),
                time: e.time.clone(),
                comm_exposed_s: e.comm_exposed_s,
                comm_overlapped_s: e.comm_overlapped_s,
                simulated_step_time_s: None,
                params: model.params(),
                active_params: model.moe.as_ref().map(|_| model.active_params()),
                tokens_per_s_per_gpu: e.tokens_per_s / f64::from(world),
                model_tflops_per_gpu: e.model_flops / e.step_time_s / f64::from(world) / 1e12,
                memory_headroom: 1.0 - e.memory_per_gpu_bytes / topo.spec.hbm_bytes,
                warnings: headroom_warning(e.memory_per_gpu_bytes, topo.spec.hbm_bytes)
                    .into_iter()
                    .collect(),
            },
            feasible: true,
            max_context_tokens: None,
            padding_tokens: 0,
        })
    }

    /// Reads and checks a plan file: right schema and version, and a mesh that multiplies to
    /// the world size with one entry per rank.
    pub fn load(path: &str) -> Result<Plan> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
            path: path.into(),
            msg: e.to_string(),
        })?;
        Self::from_json(&text, path)
    }

    pub fn from_json(text: &str, path: &str) -> Result<Plan> {
        let bad = |msg: String| Error::Parse {
            path: path.into(),
            msg,
        };
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| bad(format!("not JSON: {e}")))?;
        if v.get("schema").and_then(|s| s.as_str()) != Some(SCHEMA_NAME) {
            return Err(bad(format!(
                "not an mmsp plan (expected \"schema\": \"{SCHEMA_NAME}\")"
            )));
        }
        match v.get("schema_version").and_then(|s| s.as_u64()) {
            Some(n) if n == u64::from(SCHEMA_VERSION) => {}
            Some(n) => {
                return Err(bad(format!(
                "plan schema version {n} is not supported by this mmsp (expected {SCHEMA_VERSION})"
            )))
            }
            None => return Err(bad("missing schema_version".into())),
        }
        if let Some(mode) = v
            .get("mode")
            .and_then(|m| m.as_str())
            .filter(|m| *m != "training")
        {
            return Err(bad(format!(
                "is a plan for {mode} (\"mode\": \"{mode}\"); this command takes training plans"
            )));
        }
        let plan: Plan =
            serde_json::from_value(v).map_err(|e| bad(format!("malformed plan: {e}")))?;
        plan.check().map_err(bad)?;
        Ok(plan)
    }

    /// The recompute policy the plan was costed with: [`Recompute::OutsideAttention`] when
    /// `recompute_scope` says so, else `recompute` (for a plan of an older planner, the
    /// textbook policy it was costed with; the runtime runs either as its recompute outside
    /// attention, and [`crate::cost::terms`] re-costs it so).
    pub fn recompute_policy(&self) -> Recompute {
        match self.recompute_scope {
            Some(RecomputeScope::OutsideAttention) => Recompute::OutsideAttention,
            None => self.recompute,
        }
    }

    fn check(&self) -> std::result::Result<(), String> {
        if self.recompute == Recompute::OutsideAttention {
            return Err(
                "recompute must be none, selective or full (the runtime's values); write \"full\" with \"recompute_scope\": \"outside_attention\"".into(),
            );
        }
        if self.recompute_scope.is_some() && self.recompute != Recompute::Full {
            return Err(format!(
                "recompute_scope outside_attention goes with recompute full, not {}",
                self.recompute.as_str()
            ));
        }
        let l = &self.layout;
        if [l.tp, l.ulysses, l.ring, l.dp].contains(&0) {
            return Err("layout degrees must be >= 1".into());
        }
        if l.world() != self.world_size {
            return Err(format!(
                "layout tp {} x ulysses {} x ring {} x dp {} = {} does not match world_size {}",
                l.tp,
                l.ulysses,
                l.ring,
                l.dp,
                l.world(),
                self.world_size
            ));
        }
        if self.ranks.len() != self.world_size as usize {
            return Err(format!(
                "{} rank entries for world_size {}",
                self.ranks.len(),
                self.world_size
            ));
        }
        if self.tokens.ranges_per_rank.len() != l.sp() as usize {
            return Err(format!(
                "tokens.ranges_per_rank has {} entries, expected ulysses x ring = {}",
                self.tokens.ranges_per_rank.len(),
                l.sp()
            ));
        }
        self.model.validate().map_err(|e| format!("model: {e}"))?;
        self.check_batch_and_tokens()?;
        self.check_predicted()
    }

    /// Context, batch arithmetic, ZeRO stage and the token ranges covering the context.
    fn check_batch_and_tokens(&self) -> std::result::Result<(), String> {
        if self.context_tokens == 0 {
            return Err("context_tokens must be positive".into());
        }
        if self.zero_stage > 3 {
            return Err(format!("zero_stage {} (expected 0 to 3)", self.zero_stage));
        }
        let per_step = u64::from(self.micro_batch)
            .checked_mul(self.grad_accum_steps)
            .and_then(|x| x.checked_mul(u64::from(self.layout.dp)));
        if self.micro_batch == 0 || per_step != Some(self.global_batch) {
            return Err(format!(
                "global_batch {} is not micro_batch {} x grad_accum_steps {} x dp {}",
                self.global_batch, self.micro_batch, self.grad_accum_steps, self.layout.dp
            ));
        }
        let mut covered = 0u64;
        for (i, rr) in self.tokens.ranges_per_rank.iter().enumerate() {
            for &[a, b] in rr {
                if a >= b || b > self.context_tokens {
                    return Err(format!(
                        "tokens.ranges_per_rank[{i}] holds [{a}, {b}), not a non-empty range within the context of {}",
                        self.context_tokens
                    ));
                }
                covered += b - a;
            }
        }
        if covered != self.context_tokens {
            return Err(format!(
                "tokens.ranges_per_rank cover {covered} tokens, the context is {}",
                self.context_tokens
            ));
        }
        Ok(())
    }

    /// The predictions: finite and non-negative, the step time positive.
    fn check_predicted(&self) -> std::result::Result<(), String> {
        let p = &self.predicted;
        let figures = [
            ("step_time_s", p.step_time_s),
            ("tokens_per_s", p.tokens_per_s),
            ("mfu", p.mfu),
            ("hfu", p.hfu),
            ("memory_per_gpu_bytes", p.memory_per_gpu_bytes),
            ("comm_exposed_s", p.comm_exposed_s),
            ("comm_overlapped_s", p.comm_overlapped_s),
        ];
        if let Some((name, v)) = figures.iter().find(|(_, v)| !v.is_finite() || *v < 0.0) {
            return Err(format!(
                "predicted.{name} = {v} (expected a finite figure >= 0)"
            ));
        }
        if p.step_time_s <= 0.0 {
            return Err("predicted.step_time_s must be positive".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::{evaluate, Placement, Workload};
    use crate::spec::cluster::ClusterSpec;

    #[test]
    fn headroom_warning_under_three_percent() {
        let gib = GIB;
        assert!(headroom_warning(77.0 * gib, 80.0 * gib).is_none());
        let w = headroom_warning(78.0 * gib, 80.0 * gib).unwrap();
        assert!(w.contains("2.5%") && w.contains("78.0 of 80.0 GiB"), "{w}");
        assert!(!w.contains('\n'));
    }

    fn plan_for(zero: u8, recompute: Recompute) -> Plan {
        plan_at(zero, recompute, 1 << 16)
    }

    /// A plan of the 2-layer llama3-8b shape the runtime is measured with (small enough that
    /// every ZeRO stage fits 16 H100s).
    fn plan_at(zero: u8, recompute: Recompute, context: u64) -> Plan {
        let model = ModelSpec::load(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../runtime/tests/data/llama3-8b-2layer.json"
        ))
        .unwrap();
        let cluster = ClusterSpec::load("dgx-h100").unwrap();
        let topo = Topology::build(&cluster, 16);
        let candidate = Candidate {
            layout: Layout {
                ulysses: 2,
                ring: 4,
                dp: 2,
                tp: 1,
                placement: Placement::UlyssesInner,
            },
            zero_stage: zero,
            recompute,
            micro_batch: 1,
        };
        let w = Workload {
            model: &model,
            context,
            global_batch: 2,
            vision: None,
        };
        let estimate = evaluate(&topo, &w, &candidate).unwrap();
        let scored = Scored {
            candidate,
            estimate,
        };
        Plan::build(&topo, "dgx-h100", &model, context, 2, &scored).unwrap()
    }

    /// A plan that recomputes says so in a value the runtime reads (`runtime/src/train/run.rs`
    /// accepts none, selective and full), and the planner reads it back as costed. Recompute is
    /// a choice at every ZeRO stage, ZeRO-3 included.
    #[test]
    fn plans_write_the_runtimes_recompute_at_every_stage() {
        let plan = plan_for(3, Recompute::OutsideAttention);
        assert_eq!(plan.recompute, Recompute::Full);
        assert_eq!(plan.recompute_scope, Some(RecomputeScope::OutsideAttention));
        assert_eq!(plan.recompute_policy(), Recompute::OutsideAttention);
        assert!(plan.predicted.time.recompute_s > 0.0);
        let v = serde_json::to_value(&plan).unwrap();
        assert_eq!(v["recompute"], "full");
        assert_eq!(v["recompute_scope"], "outside_attention");
        let text = serde_json::to_string(&plan).unwrap();
        let back = Plan::from_json(&text, "p.json").unwrap();
        assert_eq!(back, plan);
        assert_eq!(
            crate::compare::candidate_of(&back).recompute,
            Recompute::OutsideAttention
        );
        // The runtime cannot read the planner's own name for it.
        let bad = text.replace(
            "\"recompute\":\"full\"",
            "\"recompute\":\"outside_attention\"",
        );
        assert!(Plan::from_json(&bad, "p.json").is_err());
        // At every stage any recompute asked for is the runtime's, written the same way.
        for zero in 0..=3u8 {
            for rc in [
                Recompute::Selective,
                Recompute::Full,
                Recompute::OutsideAttention,
            ] {
                let p = plan_for(zero, rc);
                assert_eq!(p.recompute, Recompute::Full, "ZeRO-{zero} {rc:?}");
                assert_eq!(p.recompute_policy(), Recompute::OutsideAttention);
                assert_eq!(p.predicted, plan_for(zero, Recompute::Full).predicted);
            }
        }
        // No recompute, ZeRO-3 included: none, no scope, no recompute time.
        for zero in [2u8, 3] {
            let p = plan_at(zero, Recompute::None, 1 << 14);
            assert_eq!(p.recompute, Recompute::None, "ZeRO-{zero}");
            assert_eq!(p.predicted.time.recompute_s, 0.0);
            let v = serde_json::to_value(&p).unwrap();
            assert!(v.get("recompute_scope").is_none());
            // MFU and HFU both in the JSON; HFU counts attention at 3.5x, so it is higher.
            let (mfu, hfu) = (
                v["predicted"]["mfu"].as_f64(),
                v["predicted"]["hfu"].as_f64(),
            );
            assert!(hfu.unwrap() > mfu.unwrap() && mfu.unwrap() > 0.0);
        }
    }

    /// Plans of older planners that say `selective`, or `full` without a scope, still load and
    /// read back as the policy they were costed with (for `mmsp export`); `mmsp simulate`
    /// re-costs them as the runtime runs them.
    #[test]
    fn older_plans_with_textbook_recompute_still_load() {
        let plan = plan_for(2, Recompute::Full);
        let mut v = serde_json::to_value(&plan).unwrap();
        v.as_object_mut().unwrap().remove("recompute_scope");
        for (value, policy) in [
            ("selective", Recompute::Selective),
            ("full", Recompute::Full),
        ] {
            v["recompute"] = value.into();
            let old = Plan::from_json(&v.to_string(), "old.json").unwrap();
            assert_eq!(old.recompute_policy(), policy);
            let topo = Topology::build(&ClusterSpec::load("dgx-h100").unwrap(), 16);
            let w = Workload {
                model: &old.model,
                context: old.context_tokens,
                global_batch: old.global_batch,
                vision: None,
            };
            let t = crate::cost::terms(&topo, &w, &crate::compare::candidate_of(&old)).unwrap();
            assert_eq!(t.recompute, Recompute::OutsideAttention, "{value}");
        }
    }
}
