//! The cluster as a graph (petgraph): GPUs, NVSwitches or PCIe switches and hosts, NICs, leaf
//! and spine switches, with per-direction link capacities. Traffic patterns of collectives are
//! routed over it (tree routing through the lowest common switch) and every link's load is
//! accumulated, so the time of a collective phase is set by its most loaded link: where a group
//! is placed (a Ulysses group inside one NVLink domain, or spanning nodes) decides its cost.
//! All-to-alls are counted per link from the tree's subtrees ([`a2a`]), equal to routing every
//! pair. A family whose groups tile a block of whole leaf switches, nodes and domains that
//! divides the world is priced on that block's graph ([`Topology::phase`]), with the same
//! result.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use petgraph::graph::{EdgeIndex, NodeIndex, UnGraph};
use petgraph::visit::EdgeRef;

use crate::spec::cluster::{ClusterSpec, Fabric};

mod a2a;

/// A vertex of the cluster graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vertex {
    Gpu(u32),
    NvSwitch(u32),
    PcieSwitch { node: u32, idx: u32 },
    Host(u32),
    Nic { node: u32, idx: u32 },
    Leaf(u32),
    Spine,
}

/// Which tree a link belongs to: the intra-domain fabric or the scale-out network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Plane {
    Fabric,
    Network,
}

/// A physical link; capacity is achievable bytes/s in each direction.
#[derive(Debug, Clone, Copy)]
pub struct Link {
    pub bytes_per_s: f64,
    pub latency_s: f64,
    pub plane: Plane,
}

/// PCIe Gen5 x16 between an SXM GPU and its NIC: 64 GB/s each way (PCIe 5.0 specification).
const GPU_NIC_PCIE_GEN5_GBPS: f64 = 64.0;

/// Communication patterns whose cost per byte the topology answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pattern {
    /// Every rank sends M/n bytes to every other rank of its group.
    AllToAll,
    /// Every rank sends M bytes to the next rank of its group (ring order).
    RingP2P,
}

/// Cost of one phase in which all groups of a family run a pattern at once:
/// time = latency_s + bytes_per_rank * s_per_byte.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PhaseCost {
    pub s_per_byte: f64,
    pub latency_s: f64,
    /// The plane of the most loaded link (which physics limits the phase).
    pub bottleneck: Option<Plane>,
}

impl PhaseCost {
    pub fn time(&self, bytes_per_rank: f64) -> f64 {
        if bytes_per_rank <= 0.0 {
            0.0
        } else {
            self.latency_s + bytes_per_rank * self.s_per_byte
        }
    }
}

/// Bytes each directed link carries in a phase (sparse) and the phase's longest path latency.
#[derive(Debug, Clone, PartialEq)]
pub struct Loads {
    pub per_link: Vec<(usize, f64)>,
    pub latency_s: f64,
}

pub use mmsp_plan::GroupFamily;

/// Sparse loads (links carrying something) from dense ones.
fn sparse(load: Vec<f64>, latency_s: f64) -> Loads {
    Loads {
        per_link: load
            .into_iter()
            .enumerate()
            .filter(|&(_, l)| l > 0.0)
            .collect(),
        latency_s,
    }
}

/// The cluster graph for a given number of GPUs.
pub struct Topology {
    pub spec: ClusterSpec,
    pub world: u32,
    pub graph: UnGraph<Vertex, Link>,
    gpu_nodes: Vec<NodeIndex>,
    /// Per GPU and plane: the chain of (edge, vertex reached) from the GPU up to the root.
    chains: [Vec<Vec<(EdgeIndex, NodeIndex)>>; 2],
    domain_of: Vec<u32>,
    /// The latency every link of a plane (fabric, network) shares, if they share one.
    plane_latency: [Option<f64>; 2],
    /// Route every all-to-all pair instead of counting (the slow path tests compare with).
    route_all_to_alls: bool,
    cache: Mutex<HashMap<(Pattern, GroupFamily), PhaseCost>>,
    loads_cache: Mutex<HashMap<(Pattern, GroupFamily), Arc<Loads>>>,
    /// Price a family on its repeating block ([`Topology::block_world`]) instead of the world
    /// (false: the slow path tests compare with).
    price_on_blocks: bool,
    /// The topologies of the blocks phases were priced on, by GPU count.
    blocks: Mutex<HashMap<u32, Arc<Topology>>>,
}

impl std::fmt::Debug for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Topology")
            .field("name", &self.spec.name)
            .field("world", &self.world)
            .field("vertices", &self.graph.node_count())
            .field("links", &self.graph.edge_count())
            .finish()
    }
}

impl Topology {
    /// Builds the graph for `world` GPUs (which must fill whole nodes: see
    /// [`ClusterSpec::check_gpus`]).
    pub fn build(spec: &ClusterSpec, world: u32) -> Self {
        let mut g: UnGraph<Vertex, Link> = UnGraph::default();
        let gpu_nodes: Vec<NodeIndex> = (0..world).map(|r| g.add_node(Vertex::Gpu(r))).collect();
        let domain_of: Vec<u32> = (0..world).map(|r| r / spec.domain_gpus).collect();
        let fabric_roots = Self::add_fabric_plane(&mut g, spec, &gpu_nodes, &domain_of);
        let network_roots = Self::add_network_plane(&mut g, spec, &gpu_nodes);
        let chains = [
            Self::chains(&g, &gpu_nodes, &fabric_roots, Plane::Fabric),
            Self::chains(&g, &gpu_nodes, &network_roots, Plane::Network),
        ];
        let plane_latency = [
            a2a::shared_latency(&g, Plane::Fabric),
            a2a::shared_latency(&g, Plane::Network),
        ];
        Topology {
            plane_latency,
            route_all_to_alls: false,
            spec: spec.clone(),
            world,
            graph: g,
            gpu_nodes,
            chains,
            domain_of,
            cache: Mutex::new(HashMap::new()),
            loads_cache: Mutex::new(HashMap::new()),
            price_on_blocks: true,
            blocks: Mutex::new(HashMap::new()),
        }
    }

    /// Adds the fabric plane over the GPUs (`gpu_nodes`, rank order): one NVSwitch per domain,
    /// or per node a host with its PCIe switches. Returns the plane's roots.
    fn add_fabric_plane(
        g: &mut UnGraph<Vertex, Link>,
        spec: &ClusterSpec,
        gpu_nodes: &[NodeIndex],
        domain_of: &[u32],
    ) -> Vec<NodeIndex> {
        let world = gpu_nodes.len() as u32;
        let gpn = spec.gpus_per_node;
        let fab = Link {
            bytes_per_s: spec.fabric_gbps_per_gpu * 1e9 * spec.fabric_efficiency,
            latency_s: spec.fabric_latency_s,
            plane: Plane::Fabric,
        };
        match &spec.fabric {
            Fabric::NvSwitch => {
                let domains = world.div_ceil(spec.domain_gpus);
                let sw: Vec<NodeIndex> = (0..domains)
                    .map(|d| g.add_node(Vertex::NvSwitch(d)))
                    .collect();
                for (r, &n) in gpu_nodes.iter().enumerate() {
                    g.add_edge(n, sw[domain_of[r] as usize], fab);
                }
                sw
            }
            Fabric::Pcie {
                gpus_per_switch,
                uplink_gbps,
            } => {
                let up = Link {
                    bytes_per_s: uplink_gbps * 1e9 * spec.fabric_efficiency,
                    ..fab
                };
                let mut hosts = Vec::new();
                for node in 0..world.div_ceil(gpn) {
                    let host = g.add_node(Vertex::Host(node));
                    hosts.push(host);
                    for idx in 0..gpn / gpus_per_switch {
                        let sw = g.add_node(Vertex::PcieSwitch { node, idx });
                        g.add_edge(sw, host, up);
                        for k in 0..*gpus_per_switch {
                            let r = node * gpn + idx * gpus_per_switch + k;
                            if r < world {
                                g.add_edge(gpu_nodes[r as usize], sw, fab);
                            }
                        }
                    }
                }
                hosts
            }
        }
    }

    /// Adds the network plane over the GPUs: GPU -> NIC -> leaf -> spine (a spine only with
    /// more than one leaf). Returns the plane's roots.
    fn add_network_plane(
        g: &mut UnGraph<Vertex, Link>,
        spec: &ClusterSpec,
        gpu_nodes: &[NodeIndex],
    ) -> Vec<NodeIndex> {
        let world = gpu_nodes.len() as u32;
        let gpn = spec.gpus_per_node;
        let nodes = world.div_ceil(gpn);
        let net = |gbps: f64| Link {
            bytes_per_s: gbps * 1e9 * spec.network_efficiency,
            latency_s: spec.network_latency_s,
            plane: Plane::Network,
        };
        let gpu_nic_gbps = match spec.fabric {
            Fabric::NvSwitch => GPU_NIC_PCIE_GEN5_GBPS,
            Fabric::Pcie { .. } => spec.fabric_gbps_per_gpu,
        };
        let leaves = nodes.div_ceil(spec.nodes_per_leaf);
        let leaf: Vec<NodeIndex> = (0..leaves).map(|l| g.add_node(Vertex::Leaf(l))).collect();
        let roots = if leaves > 1 {
            let spine = g.add_node(Vertex::Spine);
            let per_leaf = f64::from(spec.nodes_per_leaf * spec.nics_per_node) * spec.nic_gbps
                / spec.oversubscription;
            for &l in &leaf {
                g.add_edge(l, spine, net(per_leaf));
            }
            vec![spine]
        } else {
            leaf.clone()
        };
        for node in 0..nodes {
            let nics: Vec<NodeIndex> = (0..spec.nics_per_node)
                .map(|idx| g.add_node(Vertex::Nic { node, idx }))
                .collect();
            for &nic in &nics {
                g.add_edge(
                    nic,
                    leaf[(node / spec.nodes_per_leaf) as usize],
                    net(spec.nic_gbps),
                );
            }
            for k in 0..gpn {
                let r = node * gpn + k;
                if r < world {
                    let nic = nics[(k * spec.nics_per_node / gpn) as usize];
                    g.add_edge(gpu_nodes[r as usize], nic, net(gpu_nic_gbps));
                }
            }
        }
        roots
    }

    /// Breadth-first search from the roots over one plane's links gives every vertex its parent;
    /// each GPU's chain is its path to the root.
    fn chains(
        g: &UnGraph<Vertex, Link>,
        gpus: &[NodeIndex],
        roots: &[NodeIndex],
        plane: Plane,
    ) -> Vec<Vec<(EdgeIndex, NodeIndex)>> {
        let mut parent: Vec<Option<(EdgeIndex, NodeIndex)>> = vec![None; g.node_count()];
        let mut queue: std::collections::VecDeque<NodeIndex> = roots.iter().copied().collect();
        let mut seen = vec![false; g.node_count()];
        for r in roots {
            seen[r.index()] = true;
        }
        while let Some(v) = queue.pop_front() {
            for e in g.edges(v) {
                if e.weight().plane != plane {
                    continue;
                }
                let w = if e.source() == v {
                    e.target()
                } else {
                    e.source()
                };
                if !std::mem::replace(&mut seen[w.index()], true) {
                    parent[w.index()] = Some((e.id(), v));
                    queue.push_back(w);
                }
            }
        }
        gpus.iter()
            .map(|&gpu| {
                let mut chain = Vec::new();
                let mut v = gpu;
                while let Some((e, p)) = parent[v.index()] {
                    chain.push((e, p));
                    v = p;
                }
                chain
            })
            .collect()
    }

    /// The same topology routing every all-to-all pair instead of counting link loads (slow;
    /// what tests hold the counted loads to).
    pub fn routing_all_to_alls(mut self) -> Self {
        self.route_all_to_alls = true;
        self
    }

    /// The same topology pricing every phase over the whole world (slow; what tests hold the
    /// block pricing to).
    pub fn pricing_whole_world(mut self) -> Self {
        self.price_on_blocks = false;
        self
    }

    /// The first `block` GPUs of the world, when a phase of `family` there costs what it costs
    /// on the world: `block` is a multiple of the family's span (size x stride: its groups
    /// tile it, the first of `family.groups(world)` in the same order) and of the GPUs of a
    /// fabric domain, a node and a leaf switch (the graph repeats every `block` GPUs), and it
    /// divides the world. Then every block's links carry what the first block's carry, summed
    /// in the same order, and the first block's links come first in link order, so the most
    /// loaded link, its plane and the longest path are the same; the first block's graph is
    /// the same (a spine only when it holds more than one leaf, which flows inside one leaf
    /// never reach). `None` when the block would be the world.
    fn block_world(&self, family: GroupFamily) -> Option<u32> {
        fn lcm(a: u64, b: u64) -> Option<u64> {
            let (mut x, mut y) = (a, b);
            while y != 0 {
                (x, y) = (y, x % y);
            }
            (a / x.max(1)).checked_mul(b)
        }
        let s = &self.spec;
        let span = u64::from(family.size) * u64::from(family.stride);
        let leaf = u64::from(s.gpus_per_node) * u64::from(s.nodes_per_leaf);
        let block = [leaf, u64::from(s.domain_gpus), u64::from(s.gpus_per_node)]
            .into_iter()
            .try_fold(span.max(1), |b, x| {
                lcm(b, x.max(1)).filter(|&v| v < u64::from(self.world))
            })?;
        let world = u64::from(self.world);
        (world.is_multiple_of(block)).then_some(block as u32)
    }

    /// The topology of the first `gpus` GPUs (built once).
    fn block(&self, gpus: u32) -> Arc<Topology> {
        if let Some(t) = self.blocks.lock().ok().and_then(|b| b.get(&gpus).cloned()) {
            return t;
        }
        let mut t = Topology::build(&self.spec, gpus);
        t.route_all_to_alls = self.route_all_to_alls;
        let t = Arc::new(t);
        if let Ok(mut b) = self.blocks.lock() {
            b.insert(gpus, t.clone());
        }
        t
    }

    /// Whether two ranks share a fabric domain (NVLink domain, or PCIe node).
    pub fn same_domain(&self, a: u32, b: u32) -> bool {
        self.domain_of[a as usize] == self.domain_of[b as usize]
    }

    /// The directed links a transfer from `a` to `b` crosses: (edge, upward?) pairs.
    pub fn route(&self, a: u32, b: u32) -> Vec<(EdgeIndex, bool)> {
        let mut path = Vec::new();
        self.route_each(a, b, |e, up| path.push((e, up)));
        path
    }

    /// Calls `f` on each directed link of [`Topology::route`], in order, without allocating.
    fn route_each(&self, a: u32, b: u32, mut f: impl FnMut(EdgeIndex, bool)) {
        if a == b {
            return;
        }
        let plane = if self.same_domain(a, b) { 0 } else { 1 };
        let ca = &self.chains[plane][a as usize];
        let cb = &self.chains[plane][b as usize];
        debug_assert_eq!(ca.len(), cb.len(), "GPUs sit at equal depth in each tree");
        let lca = (0..ca.len())
            .find(|&i| ca[i].1 == cb[i].1)
            .expect("two GPUs of one plane meet at its root");
        for &(e, _) in &ca[..=lca] {
            f(e, true);
        }
        for &(e, _) in cb[..=lca].iter().rev() {
            f(e, false);
        }
    }

    /// Routes a set of flows (src, dst, bytes) and returns the load each directed link carries
    /// (sparse, by directed-link index `2 * edge + upward`) and the longest path's latency.
    pub fn flows_loads(&self, flows: impl IntoIterator<Item = (u32, u32, f64)>) -> Loads {
        let (load, latency) = self.flows_dense(flows);
        sparse(load, latency)
    }

    /// [`Topology::flows_loads`] with the loads of every directed link, zero or not.
    fn flows_dense(&self, flows: impl IntoIterator<Item = (u32, u32, f64)>) -> (Vec<f64>, f64) {
        let mut load = vec![0.0f64; 2 * self.graph.edge_count()];
        let mut latency: f64 = 0.0;
        for (a, b, bytes) in flows {
            let mut lat = 0.0;
            self.route_each(a, b, |e, up| {
                load[2 * e.index() + usize::from(up)] += bytes;
                lat += self.graph[e].latency_s;
            });
            latency = latency.max(lat);
        }
        (load, latency)
    }

    /// Capacity in bytes/s of a directed link (either direction of an edge).
    pub fn link_capacity(&self, directed: usize) -> f64 {
        self.graph[EdgeIndex::new(directed / 2)].bytes_per_s
    }

    /// Number of directed links.
    pub fn directed_links(&self) -> usize {
        2 * self.graph.edge_count()
    }

    /// The plane of a directed link.
    pub fn link_plane(&self, directed: usize) -> Plane {
        self.graph[EdgeIndex::new(directed / 2)].plane
    }

    /// A phase's time per byte alone on the network: its most loaded directed link's bytes
    /// over that link's capacity, plus the longest path's latency.
    pub fn loads_cost(&self, loads: &Loads) -> PhaseCost {
        self.cost_of(loads.per_link.iter().copied(), loads.latency_s)
    }

    fn cost_of(&self, loads: impl Iterator<Item = (usize, f64)>, latency_s: f64) -> PhaseCost {
        let mut worst = 0.0;
        let mut bottleneck = None;
        for (i, l) in loads {
            let t = l / self.link_capacity(i);
            if t > worst {
                worst = t;
                bottleneck = Some(self.link_plane(i));
            }
        }
        PhaseCost {
            s_per_byte: worst,
            latency_s,
            bottleneck,
        }
    }

    /// Routes flows and returns the phase's time per byte (see [`Topology::loads_cost`]).
    pub fn flows_time(&self, flows: impl IntoIterator<Item = (u32, u32, f64)>) -> PhaseCost {
        self.loads_cost(&self.flows_loads(flows))
    }

    /// Link loads of `pattern` run at once by the given groups, for 1 byte per rank.
    /// All-to-alls are counted per link ([`a2a`]) rather than routed pair by pair.
    pub fn groups_loads(&self, pattern: Pattern, groups: &[Vec<u32>]) -> Loads {
        let (load, latency) = self.groups_dense(pattern, groups);
        sparse(load, latency)
    }

    /// [`Topology::groups_loads`] with the loads of every directed link, zero or not.
    fn groups_dense(&self, pattern: Pattern, groups: &[Vec<u32>]) -> (Vec<f64>, f64) {
        if pattern == Pattern::AllToAll && !self.route_all_to_alls {
            if let Some(l) = self.all_to_all_counted(groups) {
                return l;
            }
        }
        self.groups_routed(pattern, groups)
    }

    /// [`Topology::groups_loads`] with every flow routed (the reference the counting is
    /// tested against).
    pub fn groups_loads_routed(&self, pattern: Pattern, groups: &[Vec<u32>]) -> Loads {
        let (load, latency) = self.groups_routed(pattern, groups);
        sparse(load, latency)
    }

    fn groups_routed(&self, pattern: Pattern, groups: &[Vec<u32>]) -> (Vec<f64>, f64) {
        match pattern {
            Pattern::AllToAll => self.flows_dense(groups.iter().flat_map(|g| {
                let share = 1.0 / g.len() as f64;
                g.iter().flat_map(move |&a| {
                    g.iter()
                        .filter(move |&&b| b != a)
                        .map(move |&b| (a, b, share))
                })
            })),
            Pattern::RingP2P => self.flows_dense(groups.iter().flat_map(|g| {
                let n = g.len();
                (0..n)
                    .filter(move |_| n > 1)
                    .map(move |i| (g[i], g[(i + 1) % n], 1.0))
            })),
        }
    }

    /// Link loads of `pattern` run by every group of `family` at once, 1 byte per rank (cached).
    pub fn family_loads(&self, pattern: Pattern, family: GroupFamily) -> Arc<Loads> {
        if let Some(l) = self
            .loads_cache
            .lock()
            .ok()
            .and_then(|c| c.get(&(pattern, family)).cloned())
        {
            return l;
        }
        let l = Arc::new(self.groups_loads(pattern, &family.groups(self.world)));
        if let Ok(mut c) = self.loads_cache.lock() {
            c.insert((pattern, family), l.clone());
        }
        l
    }

    /// Cost per byte of `pattern` run by every group of `family` at once (cached).
    pub fn phase(&self, pattern: Pattern, family: GroupFamily) -> PhaseCost {
        if family.size <= 1 {
            return PhaseCost {
                s_per_byte: 0.0,
                latency_s: 0.0,
                bottleneck: None,
            };
        }
        if let Some(c) = self
            .cache
            .lock()
            .map(|c| c.get(&(pattern, family)).copied())
            .ok()
            .flatten()
        {
            return c;
        }
        // The loads themselves are kept only for the simulator (`family_loads`): a search
        // prices hundreds of families on large clusters, each a dense pass over the links.
        let cached = self
            .loads_cache
            .lock()
            .ok()
            .and_then(|c| c.get(&(pattern, family)).cloned());
        let block = self.block_world(family).filter(|_| self.price_on_blocks);
        let cost = match (cached, block) {
            (Some(l), _) => self.loads_cost(&l),
            // A family repeating on a block of the world costs what it costs on that block.
            (None, Some(gpus)) => self.block(gpus).phase(pattern, family),
            (None, None) => {
                let (load, latency) = self.groups_dense(pattern, &family.groups(self.world));
                self.cost_of(
                    load.into_iter().enumerate().filter(|&(_, l)| l > 0.0),
                    latency,
                )
            }
        };
        if let Ok(mut c) = self.cache.lock() {
            c.insert((pattern, family), cost);
        }
        cost
    }

    /// Ring all-gather or reduce-scatter of a tensor of `bytes` (full size) over each group of
    /// `family`: (n-1) steps each moving bytes/n to the next rank, i.e. the nccl-tests bus
    /// bandwidth factor (n-1)/n (nccl-tests doc/PERFORMANCE.md).
    pub fn all_gather(&self, family: GroupFamily, bytes: f64) -> f64 {
        let n = f64::from(family.size);
        if family.size <= 1 || bytes <= 0.0 {
            return 0.0;
        }
        let p = self.phase(Pattern::RingP2P, family);
        (n - 1.0) * p.latency_s + (n - 1.0) / n * bytes * p.s_per_byte
    }

    /// Ring all-reduce: reduce-scatter then all-gather, bus bandwidth factor 2(n-1)/n
    /// (nccl-tests doc/PERFORMANCE.md).
    pub fn all_reduce(&self, family: GroupFamily, bytes: f64) -> f64 {
        2.0 * self.all_gather(family, bytes)
    }

    /// All-to-all where each rank holds `bytes` and keeps 1/n of them: factor (n-1)/n.
    pub fn all_to_all(&self, family: GroupFamily, bytes: f64) -> f64 {
        self.phase(Pattern::AllToAll, family).time(bytes)
    }

    /// Point-to-point send of `bytes` by every rank to its ring successor.
    pub fn ring_p2p(&self, family: GroupFamily, bytes: f64) -> f64 {
        self.phase(Pattern::RingP2P, family).time(bytes)
    }

    /// Time for every rank of consecutive blocks of `n` ranks (`stride` apart) to spread
    /// `bytes` evenly over the other members of its block, bounded by injection: the bytes for
    /// block members in the same fabric domain leave over the rank's fabric link, the others
    /// over its share of the node's NICs (links' achievable bandwidths from the graph). Used
    /// for exchanges among thousands of ranks, where routing n^2 flows would be too slow.
    pub fn spread_exchange_time(&self, n: u32, stride: u32, bytes: f64) -> f64 {
        if n <= 1 || bytes <= 0.0 {
            return 0.0;
        }
        let span = n * stride;
        let in_domain = (self.spec.domain_gpus.min(span) / stride.max(1)).clamp(1, n);
        let local = f64::from(in_domain - 1) / f64::from(n - 1);
        let link = |r: u32, plane: usize| {
            self.chains[plane][r as usize]
                .first()
                .map_or(f64::INFINITY, |&(e, _)| self.graph[e].bytes_per_s)
        };
        let fabric = link(0, 0);
        let nics = f64::from(self.spec.nics_per_node)
            * self.spec.nic_gbps
            * 1e9
            * self.spec.network_efficiency
            / f64::from(self.spec.gpus_per_node);
        let net = nics.min(link(0, 1));
        let lat = self.spec.fabric_latency_s.max(self.spec.network_latency_s);
        lat + (bytes * local / fabric).max(bytes * (1.0 - local) / net)
    }

    pub fn gpu_vertex(&self, rank: u32) -> NodeIndex {
        self.gpu_nodes[rank as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topo(name: &str, world: u32) -> Topology {
        Topology::build(&ClusterSpec::load(name).unwrap(), world)
    }

    #[test]
    fn graph_has_expected_shape() {
        let t = topo("dgx-h100", 512);
        // 512 GPUs + 64 NVSwitch domains + 2 leaves + 1 spine + 512 NICs.
        assert_eq!(t.graph.node_count(), 512 + 64 + 2 + 1 + 512);
        // GPU-NVSwitch, GPU-NIC, NIC-leaf per GPU, plus 2 leaf-spine uplinks.
        assert_eq!(t.graph.edge_count(), 3 * 512 + 2);
    }

    #[test]
    fn nccl_bus_bandwidth_factors_inside_a_domain() {
        let t = topo("dgx-h100", 8);
        let bw = 450e9 * 0.8;
        let f = GroupFamily { size: 8, stride: 1 };
        let bytes = 1e9;
        let lat = 2.0 * 1e-6; // two NVLink hops
        let ag = t.all_gather(f, bytes);
        assert!(
            (ag - (7.0 * lat + 7.0 / 8.0 * bytes / bw)).abs() < 1e-9,
            "{ag}"
        );
        let ar = t.all_reduce(f, bytes);
        assert!((ar - 2.0 * ag).abs() < 1e-12);
        let a2a = t.all_to_all(f, bytes);
        assert!((a2a - (lat + 7.0 / 8.0 * bytes / bw)).abs() < 1e-9, "{a2a}");
    }

    #[test]
    fn placement_matters_for_all_to_all() {
        let t = topo("dgx-h100", 64);
        let inside = t.all_to_all(GroupFamily { size: 8, stride: 1 }, 1e9);
        let across = t.all_to_all(GroupFamily { size: 8, stride: 8 }, 1e9);
        // Across nodes the 50 GB/s NIC, not the 450 GB/s NVLink, limits each GPU.
        // 450 x 0.8 GB/s NVLink against 50 x 0.9 GB/s NIC: 8x.
        assert!(across > 7.5 * inside, "inside {inside} across {across}");
    }

    #[test]
    fn rail_nics_are_shared_by_concurrent_rings() {
        // One ring per local GPU, each hopping node to node: every GPU uses its own NIC.
        let t = topo("dgx-h100", 64);
        let p = t.phase(Pattern::RingP2P, GroupFamily { size: 8, stride: 8 });
        assert!((p.s_per_byte - 1.0 / (50e9 * 0.9)).abs() < 1e-15);
        assert_eq!(p.bottleneck, Some(Plane::Network));
    }

    #[test]
    fn pcie_box_uplinks_limit_all_to_all() {
        let t = topo("pcie-l40s", 8);
        let p = t.phase(Pattern::AllToAll, GroupFamily { size: 8, stride: 1 });
        // Each switch uplink carries 2 GPUs x 6/8 of their data to the other switches.
        let expect = 2.0 * 6.0 / 8.0 / (32e9 * 0.8);
        assert!(
            (p.s_per_byte - expect).abs() / expect < 1e-9,
            "{}",
            p.s_per_byte
        );
    }

    #[test]
    fn oversubscribed_spine_slows_cross_leaf_traffic() {
        let spec = ClusterSpec::load("dgx-h100").unwrap();
        let mut over = spec.clone();
        over.oversubscription = 4.0;
        let fam = GroupFamily {
            size: 64,
            stride: 8,
        };
        let a = Topology::build(&spec, 512).all_to_all(fam, 1e9);
        let b = Topology::build(&over, 512).all_to_all(fam, 1e9);
        assert!(b > 1.5 * a, "{a} {b}");
    }

    /// A family priced on its repeating block costs what it costs on the whole world, bit for
    /// bit (time per byte, latency and bottleneck plane), on every shipped topology, with one
    /// leaf or several (spine) in the block, for both patterns and every family that tiles.
    #[test]
    fn block_pricing_is_the_whole_worlds() {
        let mut over = ClusterSpec::load("dgx-h100").unwrap();
        over.oversubscription = 3.0;
        over.nodes_per_leaf = 2;
        let cases = [
            (ClusterSpec::load("dgx-h100").unwrap(), 2048),
            (ClusterSpec::load("dgx-a100").unwrap(), 1280),
            (ClusterSpec::load("hgx-h200").unwrap(), 1024),
            (ClusterSpec::load("gb200-nvl72").unwrap(), 576),
            (ClusterSpec::load("pcie-l40s").unwrap(), 1024),
            (over, 256),
        ];
        let mut on_blocks = 0;
        for (spec, world) in cases {
            let fast = Topology::build(&spec, world);
            let whole = Topology::build(&spec, world).pricing_whole_world();
            for size in (2..=world / 2).filter(|&n| world.is_multiple_of(n)) {
                for stride in (1..=world / size).filter(|&s| world.is_multiple_of(size * s)) {
                    let family = GroupFamily { size, stride };
                    on_blocks += usize::from(fast.block_world(family).is_some());
                    for pattern in [Pattern::AllToAll, Pattern::RingP2P] {
                        assert_eq!(
                            fast.phase(pattern, family),
                            whole.phase(pattern, family),
                            "{} x {world}: {pattern:?} {size} x {stride}",
                            spec.name
                        );
                    }
                }
            }
        }
        assert!(on_blocks > 100, "{on_blocks} families priced on blocks");
        // Leaves of absurd size: no block, no overflow.
        let mut huge = ClusterSpec::load("dgx-h100").unwrap();
        huge.nodes_per_leaf = u32::MAX;
        huge.gpus_per_node = 1 << 16;
        let t = Topology::build(&huge, 8);
        let prime = GroupFamily {
            size: 4_294_967_291,
            stride: 1,
        };
        assert_eq!(t.block_world(prime), None);
    }

    #[test]
    fn nvl72_domain_spans_nodes() {
        let t = topo("gb200-nvl72", 144);
        assert!(t.same_domain(0, 71) && !t.same_domain(71, 72));
        assert_eq!(t.route(0, 40).len(), 2);
    }
}
