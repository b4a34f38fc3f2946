//! Cluster specs: the hierarchical TOML description of a GPU cluster (`topologies/*.toml`,
//! embedded in the binary and also loadable by path), deserialised raw with unknown fields
//! denied, then validated into [`ClusterSpec`]. The graph built from it lives in
//! [`crate::topology`].

use serde::Deserialize;

use crate::error::{Error, Result};

/// The shipped topologies, embedded at build time.
pub const EMBEDDED: &[(&str, &str)] = &[
    (
        "dgx-h100",
        include_str!("../../../topologies/dgx-h100.toml"),
    ),
    (
        "dgx-a100",
        include_str!("../../../topologies/dgx-a100.toml"),
    ),
    (
        "hgx-h200",
        include_str!("../../../topologies/hgx-h200.toml"),
    ),
    (
        "gb200-nvl72",
        include_str!("../../../topologies/gb200-nvl72.toml"),
    ),
    (
        "pcie-l40s",
        include_str!("../../../topologies/pcie-l40s.toml"),
    ),
];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    name: String,
    description: String,
    gpu: RawGpu,
    node: RawNode,
    fabric: RawFabric,
    network: RawNetwork,
    #[serde(default)]
    efficiency: RawEfficiency,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGpu {
    model: String,
    peak_bf16_tflops: f64,
    hbm_gib: f64,
    hbm_tbps: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    gpus: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFabric {
    kind: String,
    domain_gpus: u32,
    gbps_per_gpu: f64,
    latency_us: f64,
    gpus_per_switch: Option<u32>,
    uplink_gbps: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    nics_per_node: u32,
    nic_gbps: f64,
    latency_us: f64,
    nodes_per_leaf: u32,
    oversubscription: f64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEfficiency {
    gemm_tflops: Option<f64>,
    attention_tflops: Option<f64>,
    /// A shipped kernel calibration (see `crate::calibration`) to use instead of constants.
    calibration: Option<String>,
    fabric_efficiency: Option<f64>,
    network_efficiency: Option<f64>,
}

/// How GPUs of one domain talk to each other without the network.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub enum Fabric {
    /// All GPUs of a domain hang off a non-blocking NVSwitch, `gbps_per_gpu` each way.
    NvSwitch,
    /// GPUs hang off PCIe switches (`gpus_per_switch` each) whose uplinks meet at the host.
    Pcie {
        gpus_per_switch: u32,
        uplink_gbps: f64,
    },
}

/// A validated cluster description. Bandwidths are GB/s (10^9 bytes/s) in one direction.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClusterSpec {
    pub name: String,
    pub description: String,
    pub gpu_model: String,
    pub peak_flops: f64,
    pub hbm_bytes: f64,
    pub hbm_bytes_per_s: f64,
    pub gpus_per_node: u32,
    pub fabric: Fabric,
    /// GPUs that share one fabric domain (NVLink domain; the node for PCIe).
    pub domain_gpus: u32,
    pub fabric_gbps_per_gpu: f64,
    pub fabric_latency_s: f64,
    pub nics_per_node: u32,
    pub nic_gbps: f64,
    pub network_latency_s: f64,
    pub nodes_per_leaf: u32,
    pub oversubscription: f64,
    /// Achieved dense bf16 GEMM throughput (FLOP/s) at large shapes.
    pub gemm_flops: f64,
    /// Achieved causal flash attention throughput, forward + backward (FLOP/s).
    pub attention_flops: f64,
    /// Fraction of nominal link bandwidth that collectives achieve, per plane.
    pub fabric_efficiency: f64,
    pub network_efficiency: f64,
    /// Measured kernel throughput curves; `None` uses the constants above.
    #[serde(skip)]
    pub calibration: Option<std::sync::Arc<crate::calibration::Calibration>>,
}

/// Names of the shipped topologies.
pub fn preset_names() -> Vec<&'static str> {
    EMBEDDED.iter().map(|(n, _)| *n).collect()
}

/// Measured on H100 (shared/reference/README.md): bf16 GEMM 8192^3 at 797 TFLOP/s and cuDNN
/// causal attention fwd+bwd at 517-542 TFLOP/s, out of a 989 TFLOP/s dense peak. Other GPUs
/// without a calibration get the same fraction of their own peak (an assumption).
const H100_PEAK: f64 = 989.0;
const DEFAULT_GEMM_FRACTION: f64 = 797.0 / H100_PEAK;
const DEFAULT_ATTENTION_FRACTION: f64 = 520.0 / H100_PEAK;

/// An error in the topology file at `path`.
fn parse_error(path: &str, msg: String) -> Error {
    Error::Parse {
        path: path.into(),
        msg,
    }
}

/// `v` if it is a positive (finite) number, else an error naming `field`.
fn positive(v: f64, field: &str, path: &str) -> Result<f64> {
    if !(v.is_finite() && v > 0.0) {
        Err(parse_error(
            path,
            format!("{field} must be a positive number, got {v}"),
        ))
    } else if !(1e-6..=1e9).contains(&v) {
        // 1e-308 GB/s passes as positive but makes every transfer take forever (the fuzz
        // test printed "inf" step times).
        Err(parse_error(
            path,
            format!("{field} = {v:e} is outside the plausible 1e-6 to 1e9"),
        ))
    } else {
        Ok(v)
    }
}

/// An efficiency in (0, 1], or `default` when not given.
fn fraction(v: Option<f64>, field: &str, default: f64, path: &str) -> Result<f64> {
    match v {
        None => Ok(default),
        Some(x) if x > 0.0 && x <= 1.0 => Ok(x),
        Some(x) => Err(parse_error(
            path,
            format!("{field} must be in (0, 1], got {x}"),
        )),
    }
}

impl RawCluster {
    /// Checks the GPU, fabric and network figures, in this order: the rates and sizes
    /// positive, the counts at least 1, the oversubscription at least 1, the fabric domain
    /// against the node.
    fn check(&self, path: &str) -> Result<()> {
        let bad = |msg: String| parse_error(path, msg);
        positive(self.gpu.peak_bf16_tflops, "gpu.peak_bf16_tflops", path)?;
        positive(self.gpu.hbm_gib, "gpu.hbm_gib", path)?;
        positive(self.gpu.hbm_tbps, "gpu.hbm_tbps", path)?;
        positive(self.fabric.gbps_per_gpu, "fabric.gbps_per_gpu", path)?;
        positive(self.network.nic_gbps, "network.nic_gbps", path)?;
        if self.node.gpus == 0
            || self.network.nics_per_node == 0
            || self.network.nodes_per_leaf == 0
        {
            return Err(bad(
                "node.gpus, network.nics_per_node and network.nodes_per_leaf must be >= 1".into(),
            ));
        }
        if self.network.nics_per_node > 256 {
            // The graph holds a vertex per NIC: 2^32 - 1 of them aborted on memory (fuzz test).
            return Err(bad(format!(
                "network.nics_per_node must be at most 256, got {}",
                self.network.nics_per_node
            )));
        }
        if self.network.oversubscription < 1.0 {
            return Err(bad(format!(
                "network.oversubscription is downlink:uplink and must be >= 1, got {}",
                self.network.oversubscription
            )));
        }
        let d = self.fabric.domain_gpus;
        let g = self.node.gpus;
        if d == 0 || (!d.is_multiple_of(g) && !g.is_multiple_of(d)) {
            return Err(bad(format!(
                "fabric.domain_gpus ({d}) must divide, or be a multiple of, node.gpus ({g})"
            )));
        }
        Ok(())
    }

    /// The node's fabric: NVSwitch, or PCIe switches with their GPUs and uplink (a PCIe
    /// fabric's domain is one node).
    fn fabric_kind(&self, path: &str) -> Result<Fabric> {
        let bad = |msg: String| parse_error(path, msg);
        let (d, g) = (self.fabric.domain_gpus, self.node.gpus);
        match self.fabric.kind.as_str() {
            "nvswitch" => Ok(Fabric::NvSwitch),
            "pcie" => {
                let per = self.fabric.gpus_per_switch.unwrap_or(g);
                let up = self
                    .fabric
                    .uplink_gbps
                    .map(f64::from)
                    .unwrap_or(self.fabric.gbps_per_gpu);
                if per == 0 || !g.is_multiple_of(per) {
                    return Err(bad(format!(
                        "fabric.gpus_per_switch ({per}) must divide node.gpus ({g})"
                    )));
                }
                if d != g {
                    return Err(bad(
                        "a pcie fabric's domain is one node: domain_gpus = node.gpus".into(),
                    ));
                }
                Ok(Fabric::Pcie {
                    gpus_per_switch: per,
                    uplink_gbps: up,
                })
            }
            other => Err(bad(format!(
                "fabric.kind '{other}' is not one of: nvswitch, pcie"
            ))),
        }
    }
}

impl ClusterSpec {
    /// A shipped topology by name, or a TOML file by path.
    pub fn load(arg: &str) -> Result<Self> {
        if let Some((_, text)) = EMBEDDED.iter().find(|(n, _)| *n == arg) {
            return Self::from_toml(text, arg);
        }
        let path = std::path::Path::new(arg);
        if arg.ends_with(".toml") || path.exists() {
            let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
                path: arg.into(),
                msg: e.to_string(),
            })?;
            return Self::from_toml(&text, arg);
        }
        Err(Error::UnknownPreset {
            kind: "topology",
            name: arg.into(),
            expected: preset_names().join(", "),
        })
    }

    pub fn from_toml(text: &str, path: &str) -> Result<Self> {
        let raw: RawCluster = toml::from_str(text).map_err(|e| Error::Parse {
            path: path.into(),
            msg: one_line(&e.to_string()),
        })?;
        let bad = |msg: String| parse_error(path, msg);
        raw.check(path)?;
        let (d, g) = (raw.fabric.domain_gpus, raw.node.gpus);
        let fabric = raw.fabric_kind(path)?;
        let peak = raw.gpu.peak_bf16_tflops * 1e12;
        let gemm = match raw.efficiency.gemm_tflops {
            Some(t) => positive(t, "efficiency.gemm_tflops", path)? * 1e12,
            None => peak * DEFAULT_GEMM_FRACTION,
        };
        let attn = match raw.efficiency.attention_tflops {
            Some(t) => positive(t, "efficiency.attention_tflops", path)? * 1e12,
            None => peak * DEFAULT_ATTENTION_FRACTION,
        };
        let calibration = match &raw.efficiency.calibration {
            None => None,
            Some(name) => Some(
                crate::calibration::Calibration::load(name)
                    .map_err(|e| bad(format!("efficiency.calibration: {e}")))?,
            ),
        };
        let mut spec = ClusterSpec {
            name: raw.name,
            description: raw.description,
            gpu_model: raw.gpu.model,
            peak_flops: peak,
            hbm_bytes: raw.gpu.hbm_gib * crate::units::GIB,
            hbm_bytes_per_s: raw.gpu.hbm_tbps * 1e12,
            gpus_per_node: g,
            fabric,
            domain_gpus: d,
            fabric_gbps_per_gpu: raw.fabric.gbps_per_gpu,
            fabric_latency_s: raw.fabric.latency_us * 1e-6,
            nics_per_node: raw.network.nics_per_node,
            nic_gbps: raw.network.nic_gbps,
            network_latency_s: raw.network.latency_us * 1e-6,
            nodes_per_leaf: raw.network.nodes_per_leaf,
            oversubscription: raw.network.oversubscription,
            gemm_flops: gemm,
            attention_flops: attn,
            fabric_efficiency: fraction(
                raw.efficiency.fabric_efficiency,
                "efficiency.fabric_efficiency",
                0.8,
                path,
            )?,
            calibration: None,
            network_efficiency: fraction(
                raw.efficiency.network_efficiency,
                "efficiency.network_efficiency",
                0.9,
                path,
            )?,
        };
        if let Some(c) = calibration {
            spec.apply_calibration(c)
                .map_err(|e| bad(format!("efficiency.calibration: {e}")))?;
        }
        Ok(spec)
    }

    /// Applies a kernel calibration: checks it against this GPU (its peak FLOP/s and HBM
    /// bandwidth) and uses its curves; when it has measured collectives
    /// (`mmsp-runtime calibrate-comm`) over as many GPUs as a fabric domain holds, their bus
    /// bandwidth replaces the assumed fabric efficiency (measured bus bandwidth over the
    /// nominal per-GPU fabric bandwidth, at most 1; 4 x H100: 320 / 450 GB/s = 0.71).
    pub fn apply_calibration(&mut self, cal: crate::calibration::Calibration) -> Result<()> {
        cal.check_against(&self.gpu_model, self.peak_flops)?;
        cal.check_bandwidth(&self.gpu_model, self.hbm_bytes_per_s)?;
        // Measured on as many GPUs as one fabric domain holds: the same ring over the same
        // switch (a 4-GPU measurement says little about an 8-GPU domain's rings).
        if let Some((bus, gpus)) = cal.fabric_bus_bandwidth() {
            if gpus == self.domain_gpus {
                self.fabric_efficiency = (bus / (self.fabric_gbps_per_gpu * 1e9)).min(1.0);
            }
        }
        self.calibration = Some(std::sync::Arc::new(cal));
        Ok(())
    }

    /// bf16 GEMM throughput (FLOP/s) for projections over `tokens` rows.
    pub fn gemm_rate(&self, tokens: f64) -> f64 {
        self.calibration
            .as_ref()
            .map_or(self.gemm_flops, |c| c.gemm_rate(tokens))
    }

    /// The output head's GEMM throughput (FLOP/s) for a loss chunk of `tokens` rows: the
    /// calibration's `lm_head` curve when it has one, else the projections' curve.
    pub fn head_gemm_rate(&self, tokens: f64) -> f64 {
        self.calibration
            .as_ref()
            .and_then(|c| c.head_gemm_rate(tokens))
            .unwrap_or_else(|| self.gemm_rate(tokens))
    }

    /// Attention fwd+bwd throughput (FLOP/s) of one kernel call of `heads` x `tokens`.
    pub fn attention_rate(&self, heads: f64, tokens: f64, causal: bool) -> f64 {
        self.calibration.as_ref().map_or(self.attention_flops, |c| {
            c.attention_rate(heads, tokens, causal)
        })
    }

    /// Checks that `gpus` fills whole nodes (and whole NVLink domains when a domain spans nodes).
    pub fn check_gpus(&self, gpus: u64) -> Result<()> {
        let unit = u64::from(self.gpus_per_node.max(self.domain_gpus));
        let node = u64::from(self.gpus_per_node);
        if gpus == 0 || !gpus.is_multiple_of(node) {
            return Err(Error::invalid(
                "--gpus",
                format!(
                    "{gpus} GPUs do not fill whole {} nodes of {node} GPUs (expected a multiple of {node})",
                    self.name
                ),
            ));
        }
        if gpus > unit && !gpus.is_multiple_of(unit) {
            return Err(Error::invalid(
                "--gpus",
                format!(
                    "{gpus} GPUs do not fill whole {}-GPU NVLink domains of {} (expected a multiple of {unit}, or at most {unit})",
                    unit, self.name
                ),
            ));
        }
        Ok(())
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Measured collectives set the fabric's efficiency on a domain of the GPUs measured only.
    #[test]
    fn measured_collectives_set_the_fabric_efficiency_of_a_matching_domain() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../runtime/tests/data/");
        let cal = || {
            crate::calibration::Calibration::load(&format!("{dir}h100-sxm-2layer-v3-nccl4.json"))
                .unwrap()
        };
        let (bus, gpus) = cal().fabric_bus_bandwidth().unwrap();
        assert_eq!(gpus, 4);
        let mut four = ClusterSpec::load(&format!("{dir}h100-4gpu.toml")).unwrap();
        four.apply_calibration(cal()).unwrap();
        assert!((four.fabric_efficiency - bus / 450e9).abs() < 1e-12);
        assert!(four.fabric_efficiency > 0.6 && four.fabric_efficiency < 0.8);
        let mut eight = ClusterSpec::load("dgx-h100").unwrap();
        let before = eight.fabric_efficiency;
        eight.apply_calibration(cal()).unwrap();
        assert_eq!(eight.fabric_efficiency, before);
    }

    #[test]
    fn all_shipped_topologies_parse() {
        for name in preset_names() {
            let c = ClusterSpec::load(name).unwrap();
            assert!(
                c.gemm_flops < c.peak_flops && c.attention_flops < c.gemm_flops,
                "{name}"
            );
        }
    }

    #[test]
    fn unknown_field_is_rejected_in_one_line() {
        let text = EMBEDDED[0].1.replace("[node]", "[node]\ncolor = 3");
        let e = ClusterSpec::from_toml(&text, "x.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("color") && !e.contains('\n'), "{e}");
    }

    #[test]
    fn gpus_must_fill_nodes() {
        let c = ClusterSpec::load("dgx-h100").unwrap();
        assert!(c.check_gpus(256).is_ok());
        assert!(c.check_gpus(12).is_err());
        let nvl = ClusterSpec::load("gb200-nvl72").unwrap();
        assert!(nvl.check_gpus(72).is_ok() && nvl.check_gpus(8).is_ok());
        assert!(nvl.check_gpus(100).is_err());
    }
}
