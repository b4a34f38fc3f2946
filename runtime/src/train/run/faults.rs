//! Fault injection for the fault tests: [`crate::knobs::Fault`] (the binary's
//! `MMSP_FAULT_INJECT=rank:step[:exit|panic|error|hang]`) makes one rank fail before the
//! given step.
use super::*;

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
            let limit = cx.timeout.get() + Duration::from_secs(2);
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
