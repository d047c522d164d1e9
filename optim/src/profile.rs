//! Opt-in phase timing of steps, for performance work.
//!
//! Off unless the environment variable `LAZYADAM_PHASE_TIMES` is set (to
//! anything but `0`) when the first step runs; the variable is read once.
//! When off, a step pays one relaxed load and a branch per phase boundary.
//! [`phase_times`] returns and resets the totals.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// The phases of a step.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Phase {
    /// Checking updates, ids and gradient lengths.
    Validate = 0,
    /// Gradient transforms (clipping norms, loss scale).
    Transforms,
    /// Finding distinct rows and duplicates.
    Dedup,
    /// The row updates (summing duplicates included), or the dense update.
    Update,
}

const NAMES: [&str; 4] = ["validate", "transforms", "dedup", "update"];

/// Nanoseconds per phase, then the step count.
static TOTALS: [AtomicU64; 5] = [const { AtomicU64::new(0) }; 5];

fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("LAZYADAM_PHASE_TIMES").is_some_and(|v| v != "0"))
}

/// Measures consecutive phases of one step (does nothing when off).
#[derive(Debug)]
pub(crate) struct Timer(Option<Instant>);

impl Timer {
    #[inline]
    pub(crate) fn start() -> Timer {
        Timer(enabled().then(Instant::now))
    }

    /// Ends `phase` (started at the previous lap) and starts the next one.
    #[inline]
    pub(crate) fn lap(&mut self, phase: Phase) {
        if let Some(t0) = self.0 {
            let now = Instant::now();
            TOTALS[phase as usize].fetch_add((now - t0).as_nanos() as u64, Ordering::Relaxed);
            self.0 = Some(now);
        }
    }

    /// Counts one step.
    #[inline]
    pub(crate) fn finish(self) {
        if self.0.is_some() {
            TOTALS[4].fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Phase timing totals since the last call, in nanoseconds, and the number
/// of steps they cover; then resets them. All zero unless
/// `LAZYADAM_PHASE_TIMES` was set when the first step ran. For performance
/// work only: not part of the stable API.
#[doc(hidden)]
pub fn phase_times() -> (Vec<(&'static str, u64)>, u64) {
    let phases = NAMES
        .iter()
        .zip(TOTALS.iter())
        .map(|(&n, t)| (n, t.swap(0, Ordering::Relaxed)))
        .collect();
    (phases, TOTALS[4].swap(0, Ordering::Relaxed))
}
