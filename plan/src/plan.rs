//! The plan file: everything the runtime needs to execute (mesh, each rank's coordinates and
//! process groups, the zigzag token shards, ZeRO stage, recompute, micro-batch, the model) and
//! everything the planner predicted (time, memory, communication), so that measured and
//! predicted sit side by side. Training and inference plans are one type with a [`Mode`].
//!
//! `recompute` is what the runtime reads: `none`, `selective` or `full`, and it runs every
//! value but `none` as its one recompute (each layer's forward outside attention again in
//! backward, at any ZeRO stage). A plan that recomputes writes `"recompute": "full"` with
//! `"recompute_scope": "outside_attention"`, which the planner reads back as
//! [`Recompute::OutsideAttention`] ([`Plan::recompute_policy`]). Plans of older planners may
//! say `selective`, or `full` without the scope; they still load.
//!
//! [`Plan::from_json`] is the one reader: schema and version, then the typed fields (unknown
//! ones refused), then [`Plan::check`], which holds the derived parts (ranks, groups, token
//! ranges) equal to what [`crate::layout`] and [`crate::zigzag`] compute, so a hand-edited plan
//! that disagrees with itself is refused by field rather than run.

use serde::{Deserialize, Serialize};

use crate::error::{PlanError, Result};
use crate::inference::InferenceEstimate;
use crate::layout::{GroupKind, Layout};
use crate::model::ModelSpec;
use crate::predicted::{Predicted, Recompute};
use crate::vision::VisionPlan;
use crate::zigzag::ranges_per_rank;

/// The schema this build reads and writes. Bump on any incompatible change.
pub const SCHEMA_VERSION: u32 = 1;
pub const SCHEMA_NAME: &str = "mmsp-plan";

/// What a plan is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Training steps (`mmsp-runtime run`).
    Training,
    /// Sequence-parallel prefill and sharded-KV decoding (`mmsp-runtime infer`); the plan has
    /// an `inference` section.
    Inference,
}

impl Mode {
    pub fn as_str(&self) -> &'static str {
        match self {
            Mode::Training => "training",
            Mode::Inference => "inference",
        }
    }
}

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

impl Groups {
    /// The groups of a layout.
    pub fn of(l: &Layout) -> Groups {
        Groups {
            tp: l.groups(GroupKind::Tp),
            ulysses: l.groups(GroupKind::Ulysses),
            ring: l.groups(GroupKind::Ring),
            dp: l.groups(GroupKind::Dp),
            grad: l.groups(GroupKind::Grad),
        }
    }
}

/// Stage-2 token sharding of each sequence: zigzag over ring ranks, contiguous within a
/// Ulysses group ([`crate::zigzag`]).
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

/// A complete, executable plan.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub schema: String,
    pub schema_version: u32,
    pub generator: String,
    pub mode: Mode,
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
    /// the planner writes none or full.
    pub recompute: Recompute,
    /// `outside_attention` when the plan recomputes each layer outside attention (every plan
    /// of the planner that recomputes): `recompute` is then `full`, the runtime's name for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recompute_scope: Option<RecomputeScope>,
    pub ranks: Vec<RankInfo>,
    pub groups: Groups,
    pub tokens: TokenPlan,
    /// Multi-modal stages 1 and 2 (frames per rank, packed samples) when the input is video.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vision: Option<VisionPlan>,
    /// The planner's prediction; absent in a plan made without one ([`Plan::skeleton`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted: Option<Predicted>,
    pub feasible: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_context_tokens: Option<u64>,
    /// Text plans: tokens of padding after the requested context, which `context_tokens`
    /// includes, to make it a multiple of 2 x SP for the zigzag shards.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub padding_tokens: u64,
    /// Inference plans: the prefill and decode prediction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inference: Option<InferenceEstimate>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// `path: msg` as a [`PlanError::Invalid`].
fn invalid(path: &str, msg: impl Into<String>) -> PlanError {
    PlanError::Invalid {
        path: path.into(),
        msg: msg.into(),
    }
}

impl Plan {
    /// A training plan of `layout` with its derived parts (ranks, groups, zigzag shards of one
    /// sequence of `context_tokens`) and no prediction: ZeRO-0, no recompute, one sequence per
    /// micro-batch. The planner fills in the rest of what it chose; tests and tools that need a
    /// plan without a planner use it as it is.
    pub fn skeleton(
        model: ModelSpec,
        layout: Layout,
        gpus_per_node: u32,
        context_tokens: u64,
        global_batch: u64,
    ) -> Result<Plan> {
        layout.validate()?;
        let world = layout.world();
        if gpus_per_node == 0 {
            return Err(PlanError::shape("gpus_per_node", "must be >= 1"));
        }
        let ranks = (0..world)
            .map(|rank| {
                let c = layout.coords(rank);
                RankInfo {
                    rank,
                    node: rank / gpus_per_node,
                    local_rank: rank % gpus_per_node,
                    tp: c.tp,
                    ulysses: c.ulysses,
                    ring: c.ring,
                    dp: c.dp,
                }
            })
            .collect();
        let ranges = ranges_per_rank(
            &[context_tokens],
            layout.ulysses as usize,
            layout.ring as usize,
        )?;
        let dp = u64::from(layout.dp);
        Ok(Plan {
            schema: SCHEMA_NAME.into(),
            schema_version: SCHEMA_VERSION,
            generator: format!("mmsp-plan {}", env!("CARGO_PKG_VERSION")),
            mode: Mode::Training,
            model,
            topology: String::new(),
            world_size: world,
            gpus_per_node,
            context_tokens,
            global_batch,
            micro_batch: 1,
            grad_accum_steps: if global_batch.is_multiple_of(dp) {
                global_batch / dp
            } else {
                0
            },
            layout,
            zero_stage: 0,
            recompute: Recompute::None,
            recompute_scope: None,
            ranks,
            groups: Groups::of(&layout),
            tokens: TokenPlan {
                zigzag_chunks: 2 * layout.ring,
                ranges_per_rank: ranges
                    .into_iter()
                    .map(|v| v.into_iter().map(|(a, b)| [a, b]).collect())
                    .collect(),
            },
            vision: None,
            predicted: None,
            feasible: true,
            max_context_tokens: None,
            padding_tokens: 0,
            inference: None,
        })
    }

    /// Reads and checks a plan file ([`Plan::from_json`]).
    pub fn load(path: &str) -> Result<Plan> {
        let text = std::fs::read_to_string(path).map_err(|e| PlanError::Io {
            path: path.into(),
            msg: e.to_string(),
        })?;
        Self::from_json(&text, path)
    }

    /// Parses and checks a plan: the schema name and version first (a plan of another version
    /// is refused in one line rather than misread), then every field, then [`Plan::check`].
    /// `path` names the plan in messages.
    pub fn from_json(text: &str, path: &str) -> Result<Plan> {
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| invalid(path, format!("not JSON: {e}")))?;
        if v.get("schema").and_then(|s| s.as_str()) != Some(SCHEMA_NAME) {
            return Err(invalid(
                path,
                format!("not an mmsp plan (expected \"schema\": \"{SCHEMA_NAME}\")"),
            ));
        }
        match v.get("schema_version").and_then(|s| s.as_u64()) {
            Some(n) if n == u64::from(SCHEMA_VERSION) => {}
            Some(n) => {
                return Err(invalid(
                    path,
                    format!(
                        "plan schema version {n} is not supported by this build (expected {SCHEMA_VERSION}; re-plan with the matching mmsp)"
                    ),
                ))
            }
            None => {
                return Err(invalid(
                    path,
                    format!("missing schema_version (expected {SCHEMA_VERSION})"),
                ))
            }
        }
        let plan: Plan =
            serde_json::from_value(v).map_err(|e| invalid(path, format!("malformed plan: {e}")))?;
        plan.check().map_err(|msg| invalid(path, msg))?;
        Ok(plan)
    }

    /// Refuses a plan made for another mode, naming the one this command takes.
    pub fn expect_mode(&self, mode: Mode, path: &str) -> Result<()> {
        if self.mode == mode {
            return Ok(());
        }
        let (m, want) = (self.mode.as_str(), mode.as_str());
        let hint = match mode {
            Mode::Inference => " (make one with `mmsp plan --mode inference`)",
            Mode::Training => "",
        };
        Err(invalid(
            path,
            format!("is a plan for {m} (\"mode\": \"{m}\"); this command takes {want} plans{hint}"),
        ))
    }

    /// The recompute policy the plan was costed with: [`Recompute::OutsideAttention`] when
    /// `recompute_scope` says so, else `recompute` (for a plan of an older planner, the
    /// textbook policy it was costed with; the runtime runs either as its recompute outside
    /// attention).
    pub fn recompute_policy(&self) -> Recompute {
        match self.recompute_scope {
            Some(RecomputeScope::OutsideAttention) => Recompute::OutsideAttention,
            None => self.recompute,
        }
    }

    /// Whether the runtime recomputes each layer outside attention in backward (any
    /// `recompute` but `none`).
    pub fn recomputes(&self) -> bool {
        self.recompute != Recompute::None
    }

    /// The lengths stage 2 shards: the packed samples of a multi-modal plan (the rest of the
    /// context after them is one padding run), else the whole context.
    pub fn sharded_lens(&self) -> Vec<u64> {
        match &self.vision {
            Some(v) => v.sample_lens.clone(),
            None => vec![self.context_tokens],
        }
    }

    /// Everything a reader may rely on: the fields agree with each other and with the
    /// arithmetic of this crate. The message names the field and what is expected.
    pub fn check(&self) -> std::result::Result<(), String> {
        self.check_recompute()?;
        self.check_mesh()?;
        self.model.validate().map_err(|e| format!("model: {e}"))?;
        self.check_batch()?;
        self.check_tokens()?;
        self.check_mode()?;
        match &self.predicted {
            Some(p) => p.check(),
            None => Ok(()),
        }
    }

    fn check_recompute(&self) -> std::result::Result<(), String> {
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
        Ok(())
    }

    /// Layout against world size, and the ranks and groups against the layout.
    fn check_mesh(&self) -> std::result::Result<(), String> {
        let l = &self.layout;
        l.validate().map_err(|e| e.to_string())?;
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
        if self.gpus_per_node == 0 {
            return Err("gpus_per_node must be >= 1".into());
        }
        if self.ranks.len() != self.world_size as usize {
            return Err(format!(
                "{} rank entries for world_size {}",
                self.ranks.len(),
                self.world_size
            ));
        }
        let gpn = self.gpus_per_node;
        for (i, r) in self.ranks.iter().enumerate() {
            let c = l.coords(i as u32);
            let want = (
                i as u32,
                i as u32 / gpn,
                i as u32 % gpn,
                c.tp,
                c.ulysses,
                c.ring,
                c.dp,
            );
            if (r.rank, r.node, r.local_rank, r.tp, r.ulysses, r.ring, r.dp) != want {
                return Err(format!(
                    "ranks[{i}] is {r:?}, the layout places rank {i} at node {}, local_rank {}, tp {}, ulysses {}, ring {}, dp {}",
                    want.1, want.2, c.tp, c.ulysses, c.ring, c.dp
                ));
            }
        }
        let want = Groups::of(l);
        for (name, got, want) in [
            ("tp", &self.groups.tp, &want.tp),
            ("ulysses", &self.groups.ulysses, &want.ulysses),
            ("ring", &self.groups.ring, &want.ring),
            ("dp", &self.groups.dp, &want.dp),
            ("grad", &self.groups.grad, &want.grad),
        ] {
            if got != want {
                return Err(format!(
                    "groups.{name} does not match the layout ({} placement): expected {want:?}",
                    l.placement.as_str()
                ));
            }
        }
        Ok(())
    }

    /// Context, batch arithmetic and ZeRO stage.
    fn check_batch(&self) -> std::result::Result<(), String> {
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
        Ok(())
    }

    /// The token ranges are the zigzag shards of what stage 2 shards, within the context.
    fn check_tokens(&self) -> std::result::Result<(), String> {
        let l = &self.layout;
        if self.tokens.zigzag_chunks != 2 * l.ring {
            return Err(format!(
                "tokens.zigzag_chunks is {}, expected 2 x ring = {}",
                self.tokens.zigzag_chunks,
                2 * l.ring
            ));
        }
        let lens = self.sharded_lens();
        let total = lens.iter().try_fold(0u64, |a, &b| a.checked_add(b));
        if total.is_none_or(|t| t > self.context_tokens) {
            return Err(format!(
                "vision.sample_lens add up to more than the context of {} tokens",
                self.context_tokens
            ));
        }
        let want = ranges_per_rank(&lens, l.ulysses as usize, l.ring as usize)
            .map_err(|e| e.to_string())?;
        if self.tokens.ranges_per_rank.len() != want.len() {
            return Err(format!(
                "tokens.ranges_per_rank has {} entries, expected ulysses x ring = {}",
                self.tokens.ranges_per_rank.len(),
                want.len()
            ));
        }
        for (i, (got, want)) in self.tokens.ranges_per_rank.iter().zip(&want).enumerate() {
            if !got.iter().map(|&[a, b]| (a, b)).eq(want.iter().copied()) {
                return Err(format!(
                    "tokens.ranges_per_rank[{i}] is {got:?}, the zigzag shards of {lens:?} give {want:?}"
                ));
            }
        }
        Ok(())
    }

    /// An inference section exactly when the mode is inference.
    fn check_mode(&self) -> std::result::Result<(), String> {
        match (self.mode, self.inference.is_some()) {
            (Mode::Inference, false) => {
                Err("an inference plan needs its \"inference\" section".into())
            }
            (Mode::Training, true) => Err(
                "a training plan has an \"inference\" section (\"mode\" is \"training\")".into(),
            ),
            _ => Ok(()),
        }
    }
}
