//! The `mmsp` binary's argument types that are not in main.rs: each parses flags with clap and
//! turns them into the plain request that the library (`mmsp_planner`) takes, so that the
//! library does not depend on clap. Also the token-count parser that main.rs's flags share.

pub mod campaign;
pub mod export;
pub mod report;

use mmsp_planner::units::parse_tokens;

/// A token count flag: 131072, 128K, 2M or 1.5M (K = 1024, M = 1048576).
pub fn tokens_arg(s: &str) -> std::result::Result<u64, String> {
    parse_tokens(s).map_err(|e| e.to_string())
}
