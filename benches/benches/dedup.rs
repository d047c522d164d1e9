//! Duplicate detection under hostile ids: one sparse step of `n` ids over a table of 2,100,000
//! rows of 4 f32, for id patterns that stress a hash table (sequential, power-of-two strides,
//! all equal, ids whose home slots cluster under the fixed multiplicative hash this crate used
//! to have) against uniformly random ids, at 32,768 to 262,144 ids, on one thread and on the
//! default pool. The optimizer hashes ids with a per-table random key and falls back to its
//! radix sort when probing runs long, so every pattern must cost within a small constant of
//! random ids (the target: the worst within 3x).
//!
//! Output: one JSON line per (pattern, ids, threads) with the median step time in ms and its
//! ratio to random ids, then one line per (ids, threads) with the worst ratio. `--quick` (CI)
//! takes fewer repetitions and only the smallest and largest id counts.

use std::time::Instant;

use lazyadam::{DType, Extensions, Gradient, LazyAdam, LazyAdamConfig, Update};
use lazyadam_benches::median;

const ROWS: usize = 2_100_000;
const ROW_LEN: usize = 4;

/// splitmix64 (a seeded generator for the random ids).
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn pattern(name: &str, n: usize) -> Vec<u32> {
    match name {
        "random" => (0..n as u64)
            .map(|i| (mix(i) % ROWS as u64) as u32)
            .collect(),
        "sequential" => (0..n as u32).collect(),
        "pow2-strided" => {
            let stride = (ROWS / n).next_power_of_two() / 2;
            (0..n).map(|i| (i * stride) as u32).collect()
        }
        "all-equal" => vec![1_234_567; n],
        "hash-clustered" => {
            // Ids whose home slot under Fibonacci hashing (the top bits of id * 2^64/phi) of
            // a table of `cap` entries lies in its first sixteenth: one long probe cluster.
            let cap = (2 * n).next_power_of_two() as u64;
            let shift = 64 - cap.trailing_zeros();
            let clustered: Vec<u32> = (0..ROWS as u64)
                .filter(|&r| (r.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> shift) < cap / 16)
                .map(|r| r as u32)
                .collect();
            (0..n).map(|i| clustered[i % clustered.len()]).collect()
        }
        _ => unreachable!("unknown pattern {name}"),
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let reps = if quick { 3 } else { 11 };
    let sizes: &[usize] = if quick {
        &[32_768, 262_144]
    } else {
        &[32_768, 131_071, 262_144]
    };
    let default_threads = rayon::current_num_threads();
    let mut thread_counts = vec![1];
    if default_threads > 1 {
        thread_counts.push(default_threads);
    }
    let patterns = [
        "random",
        "sequential",
        "pow2-strided",
        "all-equal",
        "hash-clustered",
    ];
    let mut table = vec![0.0f32; ROWS * ROW_LEN];
    for &threads in &thread_counts {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("a thread pool");
        for &n in sizes {
            let grads = vec![1e-3f32; n * ROW_LEN];
            let mut random_ms = f64::NAN;
            let mut worst = (1.0f64, "random");
            for name in patterns {
                let ids = pattern(name, n);
                let mut opt =
                    LazyAdam::with_extensions(LazyAdamConfig::default(), Extensions::default())
                        .expect("a valid configuration");
                let t = opt
                    .add_variable("table", &[ROWS, ROW_LEN], DType::F32, DType::F32)
                    .expect("a valid variable");
                let mut times = Vec::with_capacity(reps);
                pool.install(|| {
                    for rep in 0..=reps {
                        let start = Instant::now();
                        opt.apply_gradients(&mut [Update::new(
                            t,
                            &mut table,
                            Gradient::sparse(&ids, &grads),
                        )])
                        .expect("a valid step");
                        if rep > 0 {
                            // The first step is a warm-up (slots are touched first).
                            times.push(start.elapsed().as_secs_f64() * 1e3);
                        }
                    }
                });
                let ms = median(times);
                if name == "random" {
                    random_ms = ms;
                }
                let ratio = ms / random_ms;
                if ratio > worst.0 {
                    worst = (ratio, name);
                }
                println!(
                    "{}",
                    serde_json::json!({
                        "bench": "dedup", "pattern": name, "ids": n, "threads": threads,
                        "median_ms": (ms * 1e4).round() / 1e4,
                        "vs_random": (ratio * 100.0).round() / 100.0,
                    })
                );
            }
            println!(
                "{}",
                serde_json::json!({
                    "bench": "dedup-worst", "ids": n, "threads": threads,
                    "worst_pattern": worst.1, "worst_vs_random": (worst.0 * 100.0).round() / 100.0,
                })
            );
        }
    }
}
