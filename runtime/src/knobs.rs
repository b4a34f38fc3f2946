//! The runtime's tuning and test knobs as one typed value. They were environment variables
//! read deep inside the library; now the binary reads the environment once
//! ([`Knobs::from_env`], the only place any `MMSP_*` variable is read) and passes the value
//! down, and library callers build one ([`Knobs::default`]: every knob at its default).
//!
//! | variable | field | default |
//! |---|---|---|
//! | `MMSP_ADAMW=plain\|fused` | [`Knobs::adamw`] | fused on CUDA, plain on the CPU |
//! | `MMSP_FUSED_NORM=0` | [`Knobs::fused_norm`] | ATen's fused RMSNorm on CUDA |
//! | `MMSP_PROFILE=0` | [`Knobs::profile`] | phases timed (device synchronised around each) |
//! | `MMSP_MEM_TRACE=1` | [`Knobs::mem_trace`] | off |
//! | `MMSP_SKIP_MEMORY_CHECK=1` | [`Knobs::skip_memory_check`] | plans predicted past the GPU refused |
//! | `MMSP_FAULT_INJECT=rank:step[:mode]` | [`Knobs::fault`] | none |
//! | `MMSP_COMM_TIMEOUT_S=S` | [`Knobs::comm_timeout`] | adaptive ([`crate::comm::timeout`]): [`DEFAULT_COMM_TIMEOUT_S`] at start-up and saves, 4 x the longest step (15 s at least) once steps run |
//! | `PYTORCH_CUDA_ALLOC_CONF` (read, for the report) | [`Knobs::alloc_conf`] | unset |
use crate::comm::{CommTimeout, DEFAULT_COMM_TIMEOUT_S};
use crate::error::{Result, RuntimeError};
use crate::train::adamw::AdamWKernel;
use std::sync::Arc;
use std::time::Duration;

/// How an injected fault fails its rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultMode {
    /// The process exits at once with code 3 (NCCL ranks); an error for in-process ranks.
    Exit,
    Panic,
    Error,
    /// The rank stops calling collectives: it sleeps until the fault reaches it (NCCL) or
    /// for the collective timeout (the limit in force then) plus 2 s (in-process), then
    /// fails.
    Hang,
}

/// A fault to inject: `rank` fails before step index `step`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub rank: usize,
    pub step: usize,
    pub mode: FaultMode,
}

/// The knobs; see the module's table.
#[derive(Debug, Clone, PartialEq)]
pub struct Knobs {
    pub adamw: AdamWKernel,
    pub fused_norm: bool,
    pub profile: bool,
    pub mem_trace: bool,
    pub skip_memory_check: bool,
    pub fault: Option<Fault>,
    /// A fixed collective timeout; `None`: the adaptive one ([`Knobs::timeout_policy`]).
    pub comm_timeout: Option<Duration>,
    pub alloc_conf: Option<String>,
}

impl Default for Knobs {
    fn default() -> Self {
        Knobs {
            adamw: AdamWKernel::Auto,
            fused_norm: true,
            profile: true,
            mem_trace: false,
            skip_memory_check: false,
            fault: None,
            comm_timeout: None,
            alloc_conf: None,
        }
    }
}

impl Knobs {
    /// Reads every knob from the environment (a malformed value is a `Config` error naming
    /// the variable and what it takes).
    pub fn from_env() -> Result<Knobs> {
        let var = |k: &str| std::env::var(k).ok();
        let adamw = match var("MMSP_ADAMW").as_deref() {
            None => AdamWKernel::Auto,
            Some("plain") => AdamWKernel::Plain,
            Some("fused") => AdamWKernel::Fused,
            Some(o) => return Err(bad("MMSP_ADAMW", o, "plain or fused")),
        };
        let fault = var("MMSP_FAULT_INJECT")
            .map(|v| parse_fault(&v))
            .transpose()?;
        let comm_timeout = match var("MMSP_COMM_TIMEOUT_S") {
            None => None,
            Some(v) => Some(
                v.trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|s| s.is_finite() && *s > 0.0)
                    .map(Duration::from_secs_f64)
                    .ok_or_else(|| {
                        bad("MMSP_COMM_TIMEOUT_S", &v, "a positive number of seconds")
                    })?,
            ),
        };
        let k = Knobs {
            adamw,
            fused_norm: var("MMSP_FUSED_NORM").as_deref() != Some("0"),
            profile: var("MMSP_PROFILE").as_deref() != Some("0"),
            mem_trace: var("MMSP_MEM_TRACE").as_deref() == Some("1"),
            skip_memory_check: var("MMSP_SKIP_MEMORY_CHECK").as_deref() == Some("1"),
            fault,
            comm_timeout,
            alloc_conf: var("PYTORCH_CUDA_ALLOC_CONF"),
        };
        Ok(k)
    }
}

impl Knobs {
    /// The run's collective timeout, shared by all of a process's communicators: the fixed
    /// limit when one was set, else the adaptive one starting at [`DEFAULT_COMM_TIMEOUT_S`].
    pub fn timeout_policy(&self) -> Arc<CommTimeout> {
        match self.comm_timeout {
            Some(d) => CommTimeout::fixed(d),
            None => CommTimeout::adaptive(Duration::from_secs_f64(DEFAULT_COMM_TIMEOUT_S)),
        }
    }
}

fn bad(var: &str, value: &str, expected: &str) -> RuntimeError {
    RuntimeError::Config(format!("{var}={value:?}: expected {expected}"))
}

/// Parses `rank:step[:exit|panic|error|hang]` (mode exit by default).
pub fn parse_fault(v: &str) -> Result<Fault> {
    let err = || bad("MMSP_FAULT_INJECT", v, "rank:step[:exit|panic|error|hang]");
    let parts: Vec<&str> = v.split(':').collect();
    if parts.len() < 2 || parts.len() > 3 {
        return Err(err());
    }
    let rank = parts[0].parse().map_err(|_| err())?;
    let step = parts[1].parse().map_err(|_| err())?;
    let mode = match parts.get(2).copied().unwrap_or("exit") {
        "exit" => FaultMode::Exit,
        "panic" => FaultMode::Panic,
        "error" => FaultMode::Error,
        "hang" => FaultMode::Hang,
        _ => return Err(err()),
    };
    Ok(Fault { rank, step, mode })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse_and_bad_ones_name_the_variable() {
        let f = parse_fault("3:7:hang").unwrap();
        assert_eq!((f.rank, f.step, f.mode), (3, 7, FaultMode::Hang));
        assert_eq!(parse_fault("0:1").unwrap().mode, FaultMode::Exit);
        for b in ["1", "a:2", "1:2:boom", "1:2:3:4"] {
            let e = parse_fault(b).unwrap_err().to_string();
            assert!(
                e.contains("MMSP_FAULT_INJECT") && e.contains("rank:step"),
                "{e}"
            );
        }
    }
}
