//! The `mmsp` binary's argument types that are not in main.rs: each parses flags with clap and
//! turns them into the plain request that the library (`mmsp_planner`) takes, so that the
//! library does not depend on clap.

pub mod campaign;
pub mod export;
