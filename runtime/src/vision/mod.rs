//! MM-SP stage 1 in the runtime (issue 7): a ViT/SigLIP-style vision encoder with a
//! projector into the LLM's hidden size ([`encoder`], configured by [`config`]), the packed
//! token layout and the stage-1/stage-2 placements ([`layout`]), the plan's `vision` section
//! as `run` executes it ([`plan`]: stage 2 is the per-sample zigzag of
//! [`crate::packed::Packing`]), the re-shard of encoded frames into the LLM's token shards
//! (any ranges that tile the sequence) by one uneven all-to-all, forward and backward
//! ([`reshard`]), their composition as an autograd-compatible step ([`stage`]) and an encoder
//! throughput benchmark ([`bench`]).
pub mod bench;
pub mod config;
pub mod encoder;
pub mod layout;
pub mod plan;
pub mod reshard;
pub mod stage;

pub use config::{Pooling, VisionConfig};
pub use encoder::VisionEncoder;
pub use layout::{
    balanced_frames, world_ranks_of_sp, zigzag_ranges, ReshardMap, SampleSpec, TokenLayout,
};
pub use plan::{EncoderSource, VisionRun, VisionSection};
pub use reshard::Reshard;
pub use stage::{StageCtx, VisionStage};
