//! The parallel mesh of a plan and its rank arithmetic, the one implementation both halves
//! use: world = tp x ulysses x ring x dp; tensor-parallel ranks innermost, then the two
//! sequence-parallel dimensions in placement order, then data parallel. A process group is a
//! [`GroupFamily`]: `size` ranks `stride` apart, repeated over the world.

use serde::{Deserialize, Serialize};

use crate::error::{PlanError, Result};

/// Which sequence-parallel dimension gets the consecutive ranks (and so the NVLink domain).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// Ulysses groups are consecutive ranks (inside a node); ring neighbours are a Ulysses
    /// group apart (across nodes).
    UlyssesInner,
    /// Ring neighbours are consecutive ranks; Ulysses groups are strided.
    RingInner,
}

impl Placement {
    pub fn as_str(&self) -> &'static str {
        match self {
            Placement::UlyssesInner => "ulysses_inner",
            Placement::RingInner => "ring_inner",
        }
    }
}

/// The parallel mesh: world = tp x ulysses x ring x dp.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layout {
    pub ulysses: u32,
    pub ring: u32,
    pub dp: u32,
    pub tp: u32,
    pub placement: Placement,
}

/// A family of process groups: each group is `size` ranks `stride` apart, and the groups
/// repeat over blocks of `size * stride` consecutive ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GroupFamily {
    pub size: u32,
    pub stride: u32,
}

impl GroupFamily {
    /// All groups of the family in a world of `world` ranks (a multiple of size x stride),
    /// ordered by their smallest member, each group in increasing rank order.
    pub fn groups(&self, world: u32) -> Vec<Vec<u32>> {
        let block = self.size * self.stride;
        let mut out = Vec::with_capacity((world / self.size.max(1)) as usize);
        for b in 0..world / block.max(1) {
            for off in 0..self.stride {
                out.push(
                    (0..self.size)
                        .map(|k| b * block + off + k * self.stride)
                        .collect(),
                );
            }
        }
        out
    }

    /// The group holding `rank`, in increasing rank order.
    pub fn group_of(&self, rank: u32) -> Vec<u32> {
        let block = self.size * self.stride;
        let base = rank / block * block + rank % self.stride;
        (0..self.size).map(|k| base + k * self.stride).collect()
    }
}

/// The kinds of process group a plan defines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GroupKind {
    Tp,
    Ulysses,
    Ring,
    Dp,
    /// Ranks holding the same parameter shard, which reduce gradients together (dp x sp).
    Grad,
}

/// A rank's coordinates in the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Coords {
    pub tp: u32,
    pub ulysses: u32,
    pub ring: u32,
    pub dp: u32,
}

impl Layout {
    /// A sequence-parallel layout with dp = tp = 1.
    pub fn sp_only(ulysses: u32, ring: u32, placement: Placement) -> Layout {
        Layout {
            ulysses,
            ring,
            dp: 1,
            tp: 1,
            placement,
        }
    }

    /// Ranks of one sequence-parallel group.
    pub fn sp(&self) -> u32 {
        self.ulysses * self.ring
    }

    /// Ranks of the mesh.
    pub fn world(&self) -> u32 {
        self.tp * self.sp() * self.dp
    }

    /// Degrees at least 1 whose product fits a u32 rank.
    pub fn validate(&self) -> Result<()> {
        let d = [self.tp, self.ulysses, self.ring, self.dp];
        if d.contains(&0) {
            return Err(PlanError::shape(
                "layout",
                format!(
                    "degrees must be >= 1 (tp {} x ulysses {} x ring {} x dp {})",
                    self.tp, self.ulysses, self.ring, self.dp
                ),
            ));
        }
        if d.iter().try_fold(1u32, |a, &b| a.checked_mul(b)).is_none() {
            return Err(PlanError::shape(
                "layout",
                format!(
                    "tp {} x ulysses {} x ring {} x dp {} has more than 2^32 ranks",
                    self.tp, self.ulysses, self.ring, self.dp
                ),
            ));
        }
        Ok(())
    }

    /// The family of groups of one kind.
    pub fn family(&self, kind: GroupKind) -> GroupFamily {
        let (size, stride) = match (kind, self.placement) {
            (GroupKind::Tp, _) => (self.tp, 1),
            (GroupKind::Ulysses, Placement::UlyssesInner) => (self.ulysses, self.tp),
            (GroupKind::Ulysses, Placement::RingInner) => (self.ulysses, self.tp * self.ring),
            (GroupKind::Ring, Placement::UlyssesInner) => (self.ring, self.tp * self.ulysses),
            (GroupKind::Ring, Placement::RingInner) => (self.ring, self.tp),
            (GroupKind::Dp, _) => (self.dp, self.tp * self.sp()),
            (GroupKind::Grad, _) => (self.dp * self.sp(), self.tp),
        };
        GroupFamily { size, stride }
    }

    pub fn tp_family(&self) -> GroupFamily {
        self.family(GroupKind::Tp)
    }
    pub fn ulysses_family(&self) -> GroupFamily {
        self.family(GroupKind::Ulysses)
    }
    pub fn ring_family(&self) -> GroupFamily {
        self.family(GroupKind::Ring)
    }
    pub fn dp_family(&self) -> GroupFamily {
        self.family(GroupKind::Dp)
    }
    /// Ranks holding the same parameter shard: gradients are reduced over dp x sp.
    pub fn grad_family(&self) -> GroupFamily {
        self.family(GroupKind::Grad)
    }

    /// Every group of one kind, ordered by smallest member.
    pub fn groups(&self, kind: GroupKind) -> Vec<Vec<u32>> {
        self.family(kind).groups(self.world())
    }

    /// The group of one kind holding `rank`, ordered by the rank's index in that dimension.
    pub fn group_of(&self, kind: GroupKind, rank: u32) -> Vec<u32> {
        self.family(kind).group_of(rank)
    }

    /// Coordinates of a global rank.
    pub fn coords(&self, rank: u32) -> Coords {
        let r = rank / self.tp;
        let (ulysses, ring) = match self.placement {
            Placement::UlyssesInner => (r % self.ulysses, (r / self.ulysses) % self.ring),
            Placement::RingInner => ((r / self.ring) % self.ulysses, r % self.ring),
        };
        Coords {
            tp: rank % self.tp,
            ulysses,
            ring,
            dp: rank / (self.tp * self.sp()),
        }
    }

    /// Global rank of coordinates (the inverse of [`Layout::coords`]).
    pub fn rank_of(&self, c: Coords) -> u32 {
        let inner = match self.placement {
            Placement::UlyssesInner => c.ring * self.ulysses + c.ulysses,
            Placement::RingInner => c.ulysses * self.ring + c.ring,
        };
        c.tp + self.tp * (inner + self.sp() * c.dp)
    }

    /// A rank's index in its sequence-parallel group: `ring * ulysses_degree + ulysses`, the
    /// index of its token ranges in [`crate::TokenPlan::ranges_per_rank`].
    pub fn sp_rank(&self, rank: u32) -> u32 {
        let c = self.coords(rank);
        c.ring * self.ulysses + c.ulysses
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layouts() -> Vec<Layout> {
        let mut out = Vec::new();
        for placement in [Placement::UlyssesInner, Placement::RingInner] {
            for (tp, ulysses, ring, dp) in [(1, 2, 4, 2), (2, 4, 2, 1), (1, 1, 8, 1), (2, 3, 5, 2)]
            {
                out.push(Layout {
                    ulysses,
                    ring,
                    dp,
                    tp,
                    placement,
                });
            }
        }
        out
    }

    #[test]
    fn coords_and_rank_of_are_inverse_and_groups_vary_one_coordinate() {
        for l in layouts() {
            for rank in 0..l.world() {
                let c = l.coords(rank);
                assert_eq!(l.rank_of(c), rank, "{l:?}");
                for (kind, size) in [
                    (GroupKind::Tp, l.tp),
                    (GroupKind::Ulysses, l.ulysses),
                    (GroupKind::Ring, l.ring),
                    (GroupKind::Dp, l.dp),
                ] {
                    let g = l.group_of(kind, rank);
                    assert_eq!(g.len() as u32, size);
                    for (i, &m) in g.iter().enumerate() {
                        let mc = l.coords(m);
                        let i = i as u32;
                        let want = match kind {
                            GroupKind::Tp => Coords { tp: i, ..c },
                            GroupKind::Ulysses => Coords { ulysses: i, ..c },
                            GroupKind::Ring => Coords { ring: i, ..c },
                            _ => Coords { dp: i, ..c },
                        };
                        assert_eq!(mc, want, "{l:?} {kind:?} rank {rank}");
                    }
                    assert!(l.groups(kind).contains(&g));
                }
            }
        }
    }

    #[test]
    fn groups_partition_the_world_in_order_of_smallest_member() {
        for l in layouts() {
            for kind in [
                GroupKind::Ulysses,
                GroupKind::Ring,
                GroupKind::Dp,
                GroupKind::Grad,
            ] {
                let gs = l.groups(kind);
                let mut all: Vec<u32> = gs.iter().flatten().copied().collect();
                all.sort();
                assert_eq!(all, (0..l.world()).collect::<Vec<_>>());
                let firsts: Vec<u32> = gs.iter().map(|g| g[0]).collect();
                assert!(firsts.windows(2).all(|w| w[0] < w[1]), "{l:?} {kind:?}");
            }
        }
    }

    #[test]
    fn ulysses_inner_keeps_ulysses_groups_consecutive() {
        let l = Layout::sp_only(4, 2, Placement::UlyssesInner);
        assert_eq!(
            l.groups(GroupKind::Ulysses),
            vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]]
        );
        assert_eq!(l.group_of(GroupKind::Ring, 5), vec![1, 5]);
        assert_eq!(l.sp_rank(5), 5);
        let r = Layout::sp_only(4, 2, Placement::RingInner);
        assert_eq!(r.group_of(GroupKind::Ring, 5), vec![4, 5]);
        assert_eq!(r.group_of(GroupKind::Ulysses, 5), vec![1, 3, 5, 7]);
        assert_eq!(r.sp_rank(5), 6);
    }

    #[test]
    fn degrees_are_checked() {
        let mut l = Layout::sp_only(0, 2, Placement::RingInner);
        assert!(l.validate().unwrap_err().to_string().contains(">= 1"));
        l.ulysses = 1 << 16;
        l.ring = 1 << 16;
        assert!(l.validate().unwrap_err().to_string().contains("2^32"));
    }
}
