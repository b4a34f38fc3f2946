//! Fault injection for the fault tests: `MMSP_FAULT_INJECT=rank:step[:exit|panic|error|hang]`
//! makes one rank fail before the given step.
use super::*;

/// A fault to inject (`MMSP_FAULT_INJECT=rank:step[:mode]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultMode {
    /// The process exits at once with code 3 (NCCL ranks); an error for in-process ranks.
    Exit,
    Panic,
    Error,
    /// The rank stops calling collectives: it sleeps until the fault reaches it (NCCL) or
    /// for the collective timeout plus 2 s (in-process), then fails.
    Hang,
}

/// Reads `MMSP_FAULT_INJECT`: (rank, step, mode).
pub fn fault_injection() -> Result<Option<(usize, usize, FaultMode)>> {
    let Ok(v) = std::env::var("MMSP_FAULT_INJECT") else {
        return Ok(None);
    };
    let bad = || {
        RuntimeError::Launch(format!(
            "MMSP_FAULT_INJECT={v:?}: want rank:step[:exit|panic|error|hang]"
        ))
    };
    let parts: Vec<&str> = v.split(':').collect();
    if parts.len() < 2 || parts.len() > 3 {
        return Err(bad());
    }
    let rank = parts[0].parse().map_err(|_| bad())?;
    let step = parts[1].parse().map_err(|_| bad())?;
    let mode = match parts.get(2).copied().unwrap_or("exit") {
        "exit" => FaultMode::Exit,
        "panic" => FaultMode::Panic,
        "error" => FaultMode::Error,
        "hang" => FaultMode::Hang,
        _ => return Err(bad()),
    };
    Ok(Some((rank, step, mode)))
}

/// Carries out an injected fault on this rank.
pub(super) fn inject(
    rank: usize,
    step: usize,
    mode: FaultMode,
    cx: &LoopCtx<'_>,
    world: &dyn Communicator,
) -> Result<()> {
    let what = format!("injected fault (MMSP_FAULT_INJECT): rank {rank} at step {step}");
    match mode {
        FaultMode::Exit if !cx.in_process => {
            eprintln!("{what}: exiting with code 3");
            std::process::exit(3);
        }
        FaultMode::Exit | FaultMode::Error => Err(RuntimeError::Comm(what)),
        FaultMode::Panic => panic!("{what}"),
        FaultMode::Hang => {
            eprintln!("{what}: no longer calling collectives");
            let t0 = Instant::now();
            let limit = comm_timeout() + Duration::from_secs(2);
            loop {
                std::thread::sleep(Duration::from_millis(200));
                if let Some(e) = world.peer_failure() {
                    return Err(e);
                }
                if cx.in_process && t0.elapsed() > limit {
                    return Err(RuntimeError::Comm(format!("{what}: hung for {limit:?}")));
                }
            }
        }
    }
}
