//! `mmsp campaign` flags, turned into a [`CampaignRequest`] for `mmsp_planner::campaign::run`.

use std::path::PathBuf;

use mmsp_planner::campaign::CampaignRequest;

/// `mmsp campaign`: flags.
#[derive(clap::Args, Debug, Clone)]
pub struct CampaignArgs {
    /// The recipe (TOML); see examples/campaign.toml.
    pub recipe: String,
    /// Folder for campaign.html, campaign.md, campaign.csv, campaign.json and the stage plans.
    #[arg(long, default_value = "campaign")]
    pub out: PathBuf,
}

impl CampaignArgs {
    /// The library's request for these flags.
    pub fn request(self) -> CampaignRequest {
        CampaignRequest {
            recipe: self.recipe,
            out: self.out,
        }
    }
}
