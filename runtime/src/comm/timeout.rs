//! How long a collective may wait for its peers before the run ends on a timeout.
//!
//! A hung rank (alive, but no longer calling collectives) cannot be told apart from a slow one
//! except by time, so the limit is a trade: long enough for any legitimate wait, short enough
//! that a hang ends the run soon. The legitimate waits differ by phase. Before the first steps
//! ranks load weights and data, build kernels and grow the allocator at their own pace, and a
//! checkpoint save waits on file systems: there the start-up limit holds
//! ([`super::DEFAULT_COMM_TIMEOUT_S`]). Once two steps have completed, every wait inside a step
//! is bounded by the step itself (a peer that is behind is at most one step of work behind,
//! and an operation's age counts from its issue on the host, which runs at most a step ahead
//! of the device), so the limit becomes [`STEADY_FACTOR`] x the longest step seen, at least
//! [`STEADY_MIN`] and at most the start-up limit. A limit set by the user
//! (`MMSP_COMM_TIMEOUT_S`) is fixed and applies throughout.
//!
//! One [`CommTimeout`] is shared by every communicator of a process (each in-process rank
//! reports its steps to it); communicators read it at the start of each wait.
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The steady-state limit as a multiple of the longest step seen.
pub const STEADY_FACTOR: f64 = 4.0;

/// The steady-state limit's floor: host hiccups (page cache, a slow data read, the
/// allocator returning memory) stay far below it.
pub const STEADY_MIN: Duration = Duration::from_secs(15);

/// Steps a process must have completed before the steady-state limit applies: the first
/// step of every rank is over once any rank completed its second (the gradient reduction of
/// the first step waits for all of them).
const STEPS_BEFORE_STEADY: u64 = 2;

/// A run's collective timeout (see the module header).
#[derive(Debug)]
pub struct CommTimeout {
    startup: Duration,
    adaptive: bool,
    /// Longest step reported so far, in microseconds.
    longest_us: AtomicU64,
    /// Steps reported so far (by any rank of this process).
    steps: AtomicU64,
    /// Open [`Relaxed`] scopes: while any is open the start-up limit holds.
    relaxed: AtomicUsize,
}

impl CommTimeout {
    /// A limit that never changes (a user's `MMSP_COMM_TIMEOUT_S`, tests, benchmarks).
    pub fn fixed(limit: Duration) -> Arc<CommTimeout> {
        Arc::new(Self::new(limit, false))
    }

    /// `startup` until two steps have completed, then the steady-state limit.
    pub fn adaptive(startup: Duration) -> Arc<CommTimeout> {
        Arc::new(Self::new(startup, true))
    }

    fn new(startup: Duration, adaptive: bool) -> CommTimeout {
        CommTimeout {
            startup,
            adaptive,
            longest_us: AtomicU64::new(0),
            steps: AtomicU64::new(0),
            relaxed: AtomicUsize::new(0),
        }
    }

    /// The limit that applies to a wait starting now.
    pub fn get(&self) -> Duration {
        if !self.adaptive
            || self.relaxed.load(Ordering::Acquire) > 0
            || self.steps.load(Ordering::Acquire) < STEPS_BEFORE_STEADY
        {
            return self.startup;
        }
        let longest = Duration::from_micros(self.longest_us.load(Ordering::Acquire));
        longest
            .mul_f64(STEADY_FACTOR)
            .max(STEADY_MIN)
            .min(self.startup)
    }

    /// The limit before the first steps (and during [`CommTimeout::relax`] scopes).
    pub fn startup(&self) -> Duration {
        self.startup
    }

    /// Whether the limit follows the steps (no limit was set by the user).
    pub fn is_adaptive(&self) -> bool {
        self.adaptive
    }

    /// Reports a completed step of `secs` wall-clock seconds (everything between two steps'
    /// ends: data, compute, communication, metrics).
    pub fn observe_step(&self, secs: f64) {
        if secs.is_finite() && secs >= 0.0 {
            self.longest_us
                .fetch_max((secs * 1e6) as u64, Ordering::AcqRel);
        }
        self.steps.fetch_add(1, Ordering::AcqRel);
    }

    /// Restores the start-up limit until the returned guard is dropped: for phases whose
    /// waits are not bounded by a step (checkpoint saves and their file writes).
    pub fn relax(&self) -> Relaxed<'_> {
        self.relaxed.fetch_add(1, Ordering::AcqRel);
        Relaxed(self)
    }
}

/// An open [`CommTimeout::relax`] scope.
pub struct Relaxed<'a>(&'a CommTimeout);

impl Drop for Relaxed<'_> {
    fn drop(&mut self) {
        self.0.relaxed.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fixed_limit_never_moves() {
        let t = CommTimeout::fixed(Duration::from_secs(7));
        for _ in 0..5 {
            t.observe_step(0.01);
        }
        assert_eq!(t.get(), Duration::from_secs(7));
    }

    #[test]
    fn the_adaptive_limit_follows_the_longest_step_after_two_steps() {
        let t = CommTimeout::adaptive(Duration::from_secs(300));
        t.observe_step(30.0);
        assert_eq!(
            t.get(),
            Duration::from_secs(300),
            "one step: still start-up"
        );
        t.observe_step(10.0);
        assert_eq!(t.get(), Duration::from_secs(120), "4 x the longest (30 s)");
        t.observe_step(100.0);
        assert_eq!(
            t.get(),
            Duration::from_secs(300),
            "capped at the start-up limit"
        );
    }

    #[test]
    fn short_steps_get_the_floor_and_saves_the_start_up_limit() {
        let t = CommTimeout::adaptive(Duration::from_secs(300));
        t.observe_step(0.05);
        t.observe_step(0.05);
        assert_eq!(t.get(), STEADY_MIN);
        {
            let _save = t.relax();
            assert_eq!(t.get(), Duration::from_secs(300));
        }
        assert_eq!(t.get(), STEADY_MIN);
        t.observe_step(f64::NAN);
        assert_eq!(
            t.get(),
            STEADY_MIN,
            "a non-finite step time is counted, not used"
        );
    }
}
