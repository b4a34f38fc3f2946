//! The runtime's reading of the plan contract ([`mmsp_plan`], the crate the planner writes
//! plans with). The plan is parsed and checked once, by the contract's reader (schema and
//! version, every field, ranks, groups and token ranges against the contract's arithmetic);
//! this module adds what the runtime itself refuses (tensor parallelism) and gives the mesh in
//! the runtime's index type: [`Layout`] is the contract's layout with `usize` degrees, and
//! every rank and group it answers comes from the contract's arithmetic.
use crate::error::{Result, RuntimeError};
use std::path::Path;

pub use mmsp_plan::{GroupKind, Mode, Placement, Recompute, SCHEMA_NAME, SCHEMA_VERSION};

/// The plan as the contract defines it.
pub type Contract = mmsp_plan::Plan;

/// Parallel layout of a plan in `usize` degrees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub ulysses: usize,
    pub ring: usize,
    pub dp: usize,
    pub tp: usize,
    pub placement: Placement,
}

/// Coordinates of a global rank in the layout (tp is 1 in the runtime).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coords {
    pub dp: usize,
    pub ring: usize,
    pub ulysses: usize,
}

impl From<mmsp_plan::Layout> for Layout {
    fn from(l: mmsp_plan::Layout) -> Layout {
        Layout {
            ulysses: l.ulysses as usize,
            ring: l.ring as usize,
            dp: l.dp as usize,
            tp: l.tp as usize,
            placement: l.placement,
        }
    }
}

fn as_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl Layout {
    /// A layout with dp = tp = 1.
    pub fn sp(ulysses: usize, ring: usize, placement: Placement) -> Layout {
        Layout {
            ulysses,
            ring,
            ..Layout::from(mmsp_plan::Layout::sp_only(1, 1, placement))
        }
    }

    /// The contract's layout.
    pub fn contract(&self) -> mmsp_plan::Layout {
        mmsp_plan::Layout {
            ulysses: as_u32(self.ulysses),
            ring: as_u32(self.ring),
            dp: as_u32(self.dp),
            tp: as_u32(self.tp),
            placement: self.placement,
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

    /// Checks degrees are positive (and fit the contract's ranks) and that the runtime
    /// supports the layout.
    pub fn validate(&self) -> Result<()> {
        let d = [self.ulysses, self.ring, self.dp, self.tp];
        if d.iter().any(|&x| x == 0 || x > u32::MAX as usize) {
            return Err(RuntimeError::Layout(format!(
                "degrees must be >= 1, got {self:?}"
            )));
        }
        self.contract()
            .validate()
            .map_err(|e| RuntimeError::Layout(e.to_string()))?;
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
        self.contract().rank_of(mmsp_plan::Coords {
            tp: 0,
            ulysses: as_u32(c.ulysses),
            ring: as_u32(c.ring),
            dp: as_u32(c.dp),
        }) as usize
    }

    /// Coordinates of a global rank.
    pub fn coords(&self, rank: usize) -> Coords {
        let c = self.contract().coords(as_u32(rank));
        Coords {
            dp: c.dp as usize,
            ring: c.ring as usize,
            ulysses: c.ulysses as usize,
        }
    }

    /// SP rank inside the SP group: `ring_idx * ulysses + ulysses_idx`.
    pub fn sp_rank(&self, rank: usize) -> usize {
        self.contract().sp_rank(as_u32(rank)) as usize
    }

    /// Global ranks of `rank`'s group of one kind, ordered by the index in that dimension.
    pub fn group(&self, kind: GroupKind, rank: usize) -> Vec<usize> {
        let g = self.contract().group_of(kind, as_u32(rank));
        g.into_iter().map(|r| r as usize).collect()
    }

    /// Global ranks of `rank`'s Ulysses group, ordered by Ulysses index.
    pub fn ulysses_group(&self, rank: usize) -> Vec<usize> {
        self.group(GroupKind::Ulysses, rank)
    }

    /// Global ranks of `rank`'s ring group, ordered by ring index.
    pub fn ring_group(&self, rank: usize) -> Vec<usize> {
        self.group(GroupKind::Ring, rank)
    }

    /// Global ranks of `rank`'s data-parallel group, ordered by dp index.
    pub fn dp_group(&self, rank: usize) -> Vec<usize> {
        self.group(GroupKind::Dp, rank)
    }

    /// Every group of one kind, each once, ordered by smallest member.
    pub fn all_groups(&self, kind: GroupKind) -> Vec<Vec<usize>> {
        let gs = self.contract().groups(kind);
        gs.into_iter()
            .map(|g| g.into_iter().map(|r| r as usize).collect())
            .collect()
    }
}

/// A plan as the runtime runs it: the contract's plan, checked, with its mesh in `usize`.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub world_size: usize,
    pub layout: Layout,
    pub contract: Contract,
}

impl Plan {
    /// Parses and checks a plan (the contract's reader, then [`Plan::validate`]).
    pub fn from_json(text: &str) -> Result<Plan> {
        Self::from_contract(Contract::from_json(text, "plan")?)
    }

    /// Reads a plan file.
    pub fn from_file(path: &Path) -> Result<Plan> {
        Self::from_contract(Contract::load(&path.display().to_string())?)
    }

    /// A plan of the contract, checked for the runtime.
    pub fn from_contract(contract: Contract) -> Result<Plan> {
        let p = Plan {
            world_size: contract.world_size as usize,
            layout: Layout::from(contract.layout),
            contract,
        };
        p.validate()?;
        Ok(p)
    }

    /// Checks the layout is one the runtime runs (the contract has checked it against
    /// `world_size`, the ranks and the groups).
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
