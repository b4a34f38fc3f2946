//! All-to-all link loads by counting instead of routing every pair.
//!
//! Routing each of a group's n(n-1) flows costs O(n^2 x depth) per group, which at 65,536
//! GPUs and 32-way Ulysses groups is two million routes per family. On a tree the load of a
//! directed link follows from counts: a flow a -> b crosses the link above subtree S (upwards)
//! iff a is in S and b is not, and it takes the fabric plane iff a and b share a domain. So,
//! per group of n members with share 1/n per pair:
//! - fabric link above S, members of one domain D (k of them, c under S): c (k - c) / n each
//!   way;
//! - network link above S: the pairs (a in S, b outside S) of different domains,
//!   sum_d c_d (n - k_d - c + c_d) = A - c^2 + Q with c_d the members of domain d under S,
//!   k_d those of the group, A = sum over members a under S of (n - k_dom(a)) and
//!   Q = sum_d c_d^2; the same count flows into S (all-to-all is symmetric).
//!
//! A pair's path climbs to the highest link it crosses and back down: with every link of a
//! plane at one latency (as [`Topology::build`] makes them) the longest path is twice the
//! highest loaded link's level plus one, in links. The routed version is kept
//! ([`Topology::groups_loads_routed`]) and the tests check the two agree.

use petgraph::graph::UnGraph;

use super::{Link, Plane, Topology, Vertex};

/// Per-edge scratch of one group's count (one record per edge, so one cache line a visit).
#[derive(Clone, Copy, Default)]
struct Slot {
    /// Members of the current domain below the edge.
    local: u64,
    /// Members of the group below it (network plane), and the sums A and Q of the module doc.
    total: u64,
    acc: u64,
    sq: u64,
    /// The edge's position in the chains (0 = a GPU's own link).
    level: usize,
}

impl Topology {
    /// Dense loads (by directed link) and latency of an all-to-all run at once by `groups`
    /// (1 byte per rank), counted per link;
    /// `None` when a plane's links differ in latency (then only routing gives the latency).
    pub(super) fn all_to_all_counted(&self, groups: &[Vec<u32>]) -> Option<(Vec<f64>, f64)> {
        let lat = [self.plane_latency[0]?, self.plane_latency[1]?];
        let ne = self.graph.edge_count();
        let mut load = vec![0.0f64; 2 * ne];
        let mut hops = [0usize; 2];
        let mut slot = vec![Slot::default(); ne];
        let (mut local, mut total): (Vec<usize>, Vec<usize>) = (Vec::new(), Vec::new());
        let mut members: Vec<u32> = Vec::new();
        for g in groups.iter().filter(|g| g.len() > 1) {
            let n = g.len() as u64;
            let share = 1.0 / g.len() as f64;
            members.clear();
            members.extend_from_slice(g);
            members.sort_by_key(|&r| self.domain_of[r as usize]);
            let domain = |r: &u32| self.domain_of[*r as usize];
            for run in members.chunk_by(|a, b| domain(a) == domain(b)) {
                let k = run.len() as u64;
                // Fabric plane: pairs inside the domain.
                self.count(0, run, &mut slot, &mut local);
                for &e in &local {
                    let s = &mut slot[e];
                    if s.local < k {
                        let l = (s.local * (k - s.local)) as f64 * share;
                        load[2 * e] += l;
                        load[2 * e + 1] += l;
                        hops[0] = hops[0].max(s.level + 1);
                    }
                    s.local = 0;
                }
                local.clear();
                // Network plane: this domain's members against the other domains'.
                if k == n {
                    continue;
                }
                self.count(1, run, &mut slot, &mut local);
                for &e in &local {
                    let s = &mut slot[e];
                    if s.total == 0 {
                        total.push(e);
                    }
                    s.total += s.local;
                    s.sq += s.local * s.local;
                    s.acc += s.local * (n - k);
                    s.local = 0;
                }
                local.clear();
            }
            for &e in &total {
                let s = &mut slot[e];
                let pairs = s.acc + s.sq - s.total * s.total;
                if pairs > 0 {
                    let l = pairs as f64 * share;
                    load[2 * e] += l;
                    load[2 * e + 1] += l;
                    hops[1] = hops[1].max(s.level + 1);
                }
                (s.total, s.acc, s.sq) = (0, 0, 0);
            }
            total.clear();
        }
        // The longest path: 2 x hops links of the plane, summed link by link as routing does.
        let mut latency: f64 = 0.0;
        for p in 0..2 {
            let mut s = 0.0;
            for _ in 0..2 * hops[p] {
                s += lat[p];
            }
            latency = latency.max(s);
        }
        Some((load, latency))
    }

    /// Counts `run`'s members below each edge of their chains in `plane` into `slot.local`,
    /// listing the edges first reached in `touched`.
    fn count(&self, plane: usize, run: &[u32], slot: &mut [Slot], touched: &mut Vec<usize>) {
        for &a in run {
            for (i, &(e, _)) in self.chains[plane][a as usize].iter().enumerate() {
                let s = &mut slot[e.index()];
                if s.local == 0 {
                    touched.push(e.index());
                }
                s.local += 1;
                s.level = i;
            }
        }
    }
}

/// The one latency of every link of `plane`, if they share one.
pub(super) fn shared_latency(g: &UnGraph<Vertex, Link>, plane: Plane) -> Option<f64> {
    let mut lat = g
        .edge_weights()
        .filter(|l| l.plane == plane)
        .map(|l| l.latency_s);
    let first = lat.next().unwrap_or(0.0);
    lat.all(|x| x.to_bits() == first.to_bits()).then_some(first)
}

#[cfg(test)]
mod tests {
    use super::super::{GroupFamily, Pattern, Topology};
    use crate::spec::cluster::ClusterSpec;

    /// Counting gives every link the load routing every pair gives (to 1e-12), and the same
    /// longest-path latency, on each shipped topology (NVLink, 72-GPU NVL72 domains over
    /// 4-GPU nodes, PCIe switches, oversubscribed spines) for families inside a node, across
    /// nodes and across domains, with group sizes that are not powers of two.
    #[test]
    fn counted_all_to_all_equals_routed() {
        for (name, world) in [
            ("dgx-h100", 64),
            ("dgx-a100", 32),
            ("gb200-nvl72", 144),
            ("pcie-l40s", 16),
            ("hgx-h200", 32),
        ] {
            let t = Topology::build(&ClusterSpec::load(name).unwrap(), world);
            assert!(t.plane_latency.iter().all(Option::is_some), "{name}");
            for size in (2..=world).filter(|s| world % s == 0) {
                for stride in (1..=world / size).filter(|s| (world / size) % s == 0) {
                    let fam = GroupFamily { size, stride };
                    let groups = fam.groups(world);
                    let fast = t.groups_loads(Pattern::AllToAll, &groups);
                    let slow = t.groups_loads_routed(Pattern::AllToAll, &groups);
                    let at = format!("{name} {world} size {size} stride {stride}");
                    assert_eq!(fast.latency_s.to_bits(), slow.latency_s.to_bits(), "{at}");
                    assert_eq!(fast.per_link.len(), slow.per_link.len(), "{at}");
                    for (&(e, a), &(f, b)) in fast.per_link.iter().zip(&slow.per_link) {
                        assert_eq!(e, f, "{at}");
                        assert!((a - b).abs() <= 1e-12 * b, "{at} link {e}: {a} vs {b}");
                    }
                }
            }
            // Irregular groups too (members of several domains, uneven counts per domain).
            let odd: Vec<Vec<u32>> = vec![vec![0, 1, 2, world - 1], vec![3, world / 2, world - 2]];
            let fast = t.groups_loads(Pattern::AllToAll, &odd);
            let slow = t.groups_loads_routed(Pattern::AllToAll, &odd);
            assert_eq!(fast.latency_s.to_bits(), slow.latency_s.to_bits(), "{name}");
            for (&(e, a), &(f, b)) in fast.per_link.iter().zip(&slow.per_link) {
                assert_eq!(e, f, "{name}");
                assert!((a - b).abs() <= 1e-12 * b, "{name} link {e}: {a} vs {b}");
            }
        }
    }
}
