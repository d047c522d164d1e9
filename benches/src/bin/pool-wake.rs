//! What one parallel region costs on this machine: a `rayon::join` of two halves of spinning
//! work, started from a thread outside the pool (as an optimizer step called from a training
//! loop's main thread starts it), after that thread has worked alone for a while (as a step's
//! serial parts do).
//!
//! ```text
//! cargo run --release -p lazyadam-benches --bin pool-wake -- [--reps N]
//! ```
//!
//! For each idle gap (the caller spins alone for that long first, so the pool's threads may
//! have gone to sleep) and each amount of work per half, prints one JSON line with the median,
//! 10th and 90th percentile of the region's wall time, in microseconds, and the overhead: the
//! median minus the work of one half (what two perfectly parallel halves would take).

use std::io::Write;
use std::time::{Duration, Instant};

use lazyadam_benches::quantile;

/// Spins for `d` (a stand-in for work that needs no memory).
fn spin(d: Duration) {
    let t = Instant::now();
    while t.elapsed() < d {
        std::hint::spin_loop();
    }
}

fn main() -> Result<(), String> {
    let mut reps = 2000usize;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--reps" => {
                reps = it
                    .next()
                    .ok_or("--reps needs a value")?
                    .parse()
                    .map_err(|e| format!("--reps: {e}"))?;
                if reps == 0 {
                    return Err("--reps must be positive".into());
                }
            }
            "--bench" => {}
            other => {
                return Err(format!(
                    "unknown argument {other}; usage: pool-wake [--reps N]"
                ));
            }
        }
    }
    let threads = rayon::current_num_threads();
    // Written, not printed: a closed pipe (`| head`) ends the run with an error, not a panic.
    let mut out = std::io::stdout().lock();
    for gap_us in [0u64, 20, 100, 400] {
        for work_us in [0u64, 50] {
            let (gap, work) = (
                Duration::from_micros(gap_us),
                Duration::from_micros(work_us),
            );
            let mut t = Vec::with_capacity(reps);
            for _ in 0..reps {
                spin(gap);
                let t0 = Instant::now();
                rayon::join(|| spin(work), || spin(work));
                t.push(t0.elapsed().as_secs_f64() * 1e6);
            }
            t.sort_by(f64::total_cmp);
            let median = quantile(&t, 0.5);
            writeln!(
                out,
                "{{\"threads\":{threads},\"gap_us\":{gap_us},\"work_us_per_half\":{work_us},\
                 \"reps\":{reps},\"median_us\":{median:.2},\"p10_us\":{:.2},\"p90_us\":{:.2},\
                 \"overhead_us\":{:.2}}}",
                quantile(&t, 0.1),
                quantile(&t, 0.9),
                median - work_us as f64,
            )
            .map_err(|e| format!("writing the results: {e}"))?;
        }
    }
    Ok(())
}
