//! libtorch's random generators are global to the process (one for the CPU, one per GPU), and
//! the runtime's ranks may be threads of one process (in-process launches, tests). A draw on one
//! thread between another thread's `manual_seed` and its draw changes the second thread's
//! numbers: ranks would start from different weights. Every draw of the library therefore
//! holds one lock: seeded draws (random weights, test problems) for the seed and the draw
//! together, unseeded ones (kernel probes and checks) for the draw.
use std::sync::Mutex;

static LOCK: Mutex<()> = Mutex::new(());

/// Runs `f`, which draws from libtorch's generators, right after seeding them with `seed`,
/// with no other thread's draw in between.
pub fn seeded<T>(seed: i64, f: impl FnOnce() -> T) -> T {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(seed);
    f()
}

/// Runs `f`, which draws from libtorch's generators without a seed of its own, while no
/// seeded draw is under way.
pub fn unseeded<T>(f: impl FnOnce() -> T) -> T {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    f()
}
