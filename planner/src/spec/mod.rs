//! Inputs of the planner, each deserialised raw (serde, unknown fields denied where the file is
//! ours) and then validated into typed structs: model, vision encoder, cluster, sample manifest.

pub mod cluster;
pub mod hf;
pub mod model;
pub mod samples;
pub mod vision;
