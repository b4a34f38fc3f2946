//! The part of the planner's plan JSON that the runtime needs: world size, the layout
//! (ulysses x ring x dp, tp) and the placement, and the rank arithmetic that turns them into
//! process groups. Unknown fields are ignored; the schema name and version are checked, so
//! that a plan of another format or version is refused in one line rather than misread.
use crate::error::{Result, RuntimeError};
use serde::Deserialize;
use std::path::Path;

/// The plan format the planner writes (`planner/src/plan.rs`, `SCHEMA_NAME`) and the version of
/// it this runtime reads (`SCHEMA_VERSION`; a test holds the two sides equal).
pub const SCHEMA_NAME: &str = "mmsp-plan";
pub const SCHEMA_VERSION: u64 = 1;

/// How sequence-parallel ranks are laid onto consecutive global ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// The Ulysses group is made of consecutive ranks (inside one NVLink domain).
    UlyssesInner,
    /// Ring neighbours are consecutive ranks.
    RingInner,
}

/// Parallel layout of a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Layout {
    pub ulysses: usize,
    pub ring: usize,
    #[serde(default = "one")]
    pub dp: usize,
    #[serde(default = "one")]
    pub tp: usize,
    pub placement: Placement,
}

fn one() -> usize {
    1
}

/// A plan, reduced to the fields the runtime reads.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Plan {
    pub world_size: usize,
    pub layout: Layout,
}

/// The plan's `schema` and `schema_version`, as the planner writes them.
fn check_schema(v: &serde_json::Value) -> Result<()> {
    if v.get("schema").and_then(|s| s.as_str()) != Some(SCHEMA_NAME) {
        return Err(RuntimeError::Plan(format!(
            "not an mmsp plan (expected \"schema\": \"{SCHEMA_NAME}\")"
        )));
    }
    match v.get("schema_version").and_then(|n| n.as_u64()) {
        Some(SCHEMA_VERSION) => Ok(()),
        Some(n) => Err(RuntimeError::Plan(format!(
            "plan schema version {n} is not supported by this mmsp-runtime (expected {SCHEMA_VERSION}; re-plan with the matching mmsp)"
        ))),
        None => Err(RuntimeError::Plan(format!(
            "the plan has no schema_version (expected {SCHEMA_VERSION})"
        ))),
    }
}

/// Coordinates of a global rank in the layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coords {
    pub dp: usize,
    pub ring: usize,
    pub ulysses: usize,
}

impl Layout {
    /// A layout with dp = tp = 1.
    pub fn sp(ulysses: usize, ring: usize, placement: Placement) -> Layout {
        Layout {
            ulysses,
            ring,
            dp: 1,
            tp: 1,
            placement,
        }
    }

    /// Ranks in one sequence-parallel group.
    pub fn sp_size(&self) -> usize {
        self.ulysses * self.ring
    }

    /// Ranks the layout needs.
    pub fn world_size(&self) -> usize {
        self.ulysses * self.ring * self.dp * self.tp
    }

    /// Checks degrees are positive and that the runtime supports the layout.
    pub fn validate(&self) -> Result<()> {
        if self.ulysses == 0 || self.ring == 0 || self.dp == 0 || self.tp == 0 {
            return Err(RuntimeError::Layout(format!(
                "degrees must be >= 1, got {self:?}"
            )));
        }
        if self.tp != 1 {
            return Err(RuntimeError::Layout(format!(
                "tensor parallelism (tp = {}) is not implemented by the runtime",
                self.tp
            )));
        }
        Ok(())
    }

    /// Global rank of the given coordinates.
    pub fn global_rank(&self, c: Coords) -> usize {
        let sp = self.sp_size();
        match self.placement {
            Placement::UlyssesInner => c.dp * sp + c.ring * self.ulysses + c.ulysses,
            Placement::RingInner => c.dp * sp + c.ulysses * self.ring + c.ring,
        }
    }

    /// Coordinates of a global rank.
    pub fn coords(&self, rank: usize) -> Coords {
        let sp = self.sp_size();
        let (dp, within) = (rank / sp, rank % sp);
        match self.placement {
            Placement::UlyssesInner => Coords {
                dp,
                ring: within / self.ulysses,
                ulysses: within % self.ulysses,
            },
            Placement::RingInner => Coords {
                dp,
                ring: within % self.ring,
                ulysses: within / self.ring,
            },
        }
    }

    /// SP rank inside the SP group: `ring_idx * ulysses + ulysses_idx`.
    pub fn sp_rank(&self, rank: usize) -> usize {
        let c = self.coords(rank);
        c.ring * self.ulysses + c.ulysses
    }

    /// Global ranks of `rank`'s Ulysses group, ordered by Ulysses index.
    pub fn ulysses_group(&self, rank: usize) -> Vec<usize> {
        let c = self.coords(rank);
        (0..self.ulysses)
            .map(|u| self.global_rank(Coords { ulysses: u, ..c }))
            .collect()
    }

    /// Global ranks of `rank`'s ring group, ordered by ring index.
    pub fn ring_group(&self, rank: usize) -> Vec<usize> {
        let c = self.coords(rank);
        (0..self.ring)
            .map(|r| self.global_rank(Coords { ring: r, ..c }))
            .collect()
    }

    /// Global ranks of `rank`'s data-parallel group, ordered by dp index.
    pub fn dp_group(&self, rank: usize) -> Vec<usize> {
        let c = self.coords(rank);
        (0..self.dp)
            .map(|d| self.global_rank(Coords { dp: d, ..c }))
            .collect()
    }

    /// Every group of one kind, each once, in a deterministic order (by smallest member).
    pub fn all_groups(&self, kind: GroupKind) -> Vec<Vec<usize>> {
        let mut seen = std::collections::BTreeSet::new();
        let mut out = Vec::new();
        for r in 0..self.world_size() {
            let g = match kind {
                GroupKind::Ulysses => self.ulysses_group(r),
                GroupKind::Ring => self.ring_group(r),
                GroupKind::Dp => self.dp_group(r),
            };
            if seen.insert(g.clone()) {
                out.push(g);
            }
        }
        out
    }
}

/// The kinds of process group a plan defines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupKind {
    Ulysses,
    Ring,
    Dp,
}

impl Plan {
    /// Parses a plan from JSON text; fields the runtime does not use are ignored.
    pub fn from_json(text: &str) -> Result<Plan> {
        let v: serde_json::Value = serde_json::from_str(text)?;
        check_schema(&v)?;
        let p: Plan = serde_json::from_value(v)?;
        p.validate()?;
        Ok(p)
    }

    /// Reads a plan file.
    pub fn from_file(path: &Path) -> Result<Plan> {
        let text = std::fs::read_to_string(path)?;
        Self::from_json(&text)
    }

    /// Checks the layout and that it accounts for exactly `world_size` ranks.
    pub fn validate(&self) -> Result<()> {
        self.layout.validate()?;
        if self.layout.world_size() != self.world_size {
            return Err(RuntimeError::Plan(format!(
                "layout ulysses {} x ring {} x dp {} x tp {} = {} ranks, but world_size is {}",
                self.layout.ulysses,
                self.layout.ring,
                self.layout.dp,
                self.layout.tp,
                self.layout.world_size(),
                self.world_size
            )));
        }
        Ok(())
    }

    /// Checks the plan against the launch (e.g. torchrun's WORLD_SIZE); call before any
    /// collective.
    pub fn check_launch(&self, launched_world_size: usize) -> Result<()> {
        if launched_world_size != self.world_size {
            return Err(RuntimeError::Launch(format!(
                "plan is for {} ranks but {} were launched",
                self.world_size, launched_world_size
            )));
        }
        Ok(())
    }
}
