//! Rough timing of sparse steps on an embedding table (not a benchmark
//! harness; see `benches/` for those).
//!
//! `cargo run --release -p lazyadam --example step_timing -- [rows] [dim] [ids] [threads]`
//!
//! Environment: `ITERS` (timed steps, default 200), `BATCHES` (distinct id
//! lists cycled through, default 8; 1 = the same ids every step), `HUGE=1` (advise the
//! parameter table for transparent huge pages), `LAZYADAM_PHASE_TIMES=1`
//! (print where the time goes), `NON_FINITE=error` or `NON_FINITE=skip` (the
//! non-finite policy `Error`, or `SkipStep` with the default dynamic loss
//! scale; the gradients are finite, so only the checks' cost shows),
//! `GRAD_SCALE` (multiplies the gradient values, at most 0.048 in magnitude;
//! `GRAD_SCALE=1e36` puts them where the checking policies must sum duplicate
//! rows exactly before the step, and the `transforms` phase shows that cost).

use std::time::Instant;

use lazyadam::{
    DType, DynamicLossScale, Extensions, Gradient, LazyAdam, LazyAdamConfig, NonFinitePolicy,
    Update,
};

fn main() -> Result<(), lazyadam::Error> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numeric arguments"))
        .collect();
    let rows = args.first().copied().unwrap_or(1_000_000);
    let dim = args.get(1).copied().unwrap_or(64);
    let n_ids = args.get(2).copied().unwrap_or(16_384);
    let threads = args.get(3).copied().unwrap_or(0);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("pool");

    // Zipf(1.1)-like ids via a fixed-seed LCG and inverse-power sampling.
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((state >> 11) as f64) / ((1u64 << 53) as f64)
    };
    let n_batches: usize = std::env::var("BATCHES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8)
        .max(1);
    let batches: Vec<Vec<u32>> = (0..n_batches)
        .map(|_| {
            (0..n_ids)
                .map(|_| {
                    let u: f64 = next();
                    let r = (u.powf(-1.0 / 0.1) as usize).min(rows) - 1;
                    (r.wrapping_mul(2_654_435_761) % rows) as u32
                })
                .collect()
        })
        .collect();
    let mut distinct = batches[0].clone();
    distinct.sort_unstable();
    distinct.dedup();
    let scale: f32 = std::env::var("GRAD_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let grads: Vec<f32> = (0..n_ids * dim)
        .map(|i| ((i % 97) as f32 - 48.0) * 1e-3 * scale)
        .collect();

    let (policy, non_finite) = match std::env::var("NON_FINITE").as_deref() {
        Ok("error") => ("Error", NonFinitePolicy::Error),
        Ok("skip") => (
            "SkipStep",
            NonFinitePolicy::SkipStep {
                loss_scale: Some(DynamicLossScale::default()),
            },
        ),
        _ => ("Propagate", NonFinitePolicy::Propagate),
    };
    let ext = Extensions::default().with_non_finite(non_finite);
    let mut opt = LazyAdam::with_extensions(LazyAdamConfig::default(), ext)?;
    let table = opt.add_variable("table", &[rows, dim], DType::F32, DType::F32)?;
    // HUGE=1: advise the parameter table for transparent huge pages (the
    // optimizer does it for its own slots) before it is written.
    let mut params = vec![0.0f32; rows * dim];
    if std::env::var_os("HUGE").is_some_and(|v| v != "0") {
        let advised = lazyadam::advise_huge_pages(&params);
        println!("parameter table advised for huge pages: {advised}");
    }
    params.fill(0.01);
    let iters: usize = std::env::var("ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    pool.install(|| -> Result<(), lazyadam::Error> {
        for b in batches.iter().take(3) {
            opt.apply_gradients(&mut [Update::new(
                table,
                &mut params,
                Gradient::sparse(b, &grads),
            )])?;
        }
        let _ = lazyadam::phase_times();
        let mut times = Vec::with_capacity(iters);
        let start = Instant::now();
        for i in 0..iters {
            let b = &batches[i % batches.len()];
            let t0 = Instant::now();
            opt.apply_gradients(&mut [Update::new(
                table,
                &mut params,
                Gradient::sparse(b, &grads),
            )])?;
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        let per = start.elapsed().as_secs_f64() / iters as f64;
        times.sort_by(f64::total_cmp);
        println!(
            "{rows} x {dim}, {n_ids} ids ({} distinct), {} threads, {policy}: {:.4} ms/step (median {:.4}, min {:.4})",
            distinct.len(),
            rayon::current_num_threads(),
            per * 1e3,
            times[times.len() / 2],
            times[0],
        );
        // Set LAZYADAM_PHASE_TIMES=1 for a breakdown.
        let (phases, steps) = lazyadam::phase_times();
        if steps > 0 {
            let line: Vec<String> = phases
                .iter()
                .map(|(n, ns)| format!("{n} {:.4}", *ns as f64 / steps as f64 / 1e6))
                .collect();
            println!("  phases (ms/step): {}", line.join(", "));
        }
        Ok(())
    })
}
