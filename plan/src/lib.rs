//! The plan: the one contract between the planner (`mmsp plan` writes it) and the runtime
//! (`mmsp-runtime run` / `infer` execute it). Both halves depend on this crate and neither
//! re-derives what it holds:
//!
//! - [`plan`]: the versioned plan JSON ([`Plan`], training and inference as one [`Mode`]),
//!   read and checked in one place ([`Plan::from_json`]: schema and version, mesh, ranks and
//!   groups, token shards, batch arithmetic, finite predictions);
//! - [`layout`]: the mesh (tp x ulysses x ring x dp, placement) and its rank and group
//!   arithmetic;
//! - [`zigzag`]: the stage-2 token shards (zigzag over ring ranks, contiguous within a Ulysses
//!   group; packed samples each sharded on their own);
//! - [`model`], [`predicted`], [`vision`], [`inference`]: the typed sections a plan carries.
//!
//! Pure serde: no GPU crate, no cost model. What the planner computes (costs, searches) and
//! what the runtime runs (kernels, collectives) stay in their crates.

pub mod error;
pub mod inference;
pub mod layout;
pub mod model;
pub mod plan;
pub mod predicted;
pub mod vision;
pub mod zigzag;

pub use error::PlanError;
pub use inference::{InferenceEstimate, InferenceMemory, WeightSharding};
pub use layout::{Coords, GroupFamily, GroupKind, Layout, Placement};
pub use model::{ModelSpec, MoeSpec};
pub use plan::{
    Groups, Mode, Plan, RankInfo, RecomputeScope, TokenPlan, SCHEMA_NAME, SCHEMA_VERSION,
};
pub use predicted::{headroom_warning, MemoryBreakdown, Predicted, Recompute, TimeBreakdown};
pub use vision::{VisionPlan, VisionStage};
pub use zigzag::Zigzag;

/// 2^30 bytes.
pub const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
