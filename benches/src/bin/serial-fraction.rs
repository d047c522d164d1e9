//! How much of a large sparse step runs on one thread, from the optimizer's phase timer, and
//! the speed-up that leaves at more threads (Amdahl's law, a projection).
//!
//! ```text
//! cargo run --release -p lazyadam-benches --bin serial-fraction -- [--quick] [--rounds N] [--workload NAME]
//! ```
//!
//! Two steps of an f32 table (f32 moments, default configuration, no clipping):
//!
//! * `sparse_1m_d64`: 1,000,000 x 64, the 16,384 ids of `data/workload_ids.json` (the peer
//!   workload);
//! * `sparse_10m_d64_1m_ids`: 10,000,000 x 64 (7.7 GB with its moments), 1,048,576 ids drawn
//!   Zipf-like as `lazyadam`'s `step_timing` example draws them (quick mode: 10,000,000 x 4).
//!
//! Each round times both on a one-thread rayon pool and on the default pool, alternately. The
//! phases (`validate`, `transforms`, `dedup`, `update`; see `LAZYADAM_PHASE_TIMES`) are read
//! from `lazyadam::phase_times`. `validate` (the id range check, the step's rates) and
//! `transforms` (clipping norms; nothing without clipping) always run on one thread; with
//! more than one thread, `dedup` (the radix sort: from `PARALLEL_MIN_IDS` ids on pools of three
//! threads or more, from 1,048,576 ids on two threads, see `dedup::groups_in_parallel`) and
//! `update` (the row updates, above `parallel_min_elements`) are split over rayon tasks. The serial
//! fraction is `(validate + transforms) / step` on one thread, and the projection at N threads
//! is `1 / (s + (1 - s) / N)`, which assumes the parallel phases scale perfectly (they are
//! memory-bound, so they will not; the projection is an upper bound on what the serial part
//! allows). Every line is one JSON object; the last lines summarize the rounds (medians).

use std::time::Instant;

use lazyadam::{DType, Gradient, LazyAdam, LazyAdamConfig, StepOutcome, Update};
use lazyadam_benches::median;

type BoxResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const IDS_JSON: &str = include_str!("../../data/workload_ids.json");

struct Workload {
    name: &'static str,
    rows: usize,
    dim: usize,
    ids: Vec<u32>,
    reps: usize,
}

/// Zipf(1.1)-like ids, scattered over the table (as `optim/examples/step_timing.rs`).
fn zipf_ids(rows: usize, n: usize) -> Vec<u32> {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let u = ((state >> 11) as f64) / ((1u64 << 53) as f64);
            let r = ((u.powf(-1.0 / 0.1) as usize).min(rows)).max(1) - 1;
            (r.wrapping_mul(2_654_435_761) % rows) as u32
        })
        .collect()
}

/// The timed steps of one workload on the current rayon pool: per-step median and the
/// phases' mean (ms per step).
struct Timing {
    median_ms: f64,
    phases: Vec<(&'static str, f64)>,
}

struct Table {
    opt: LazyAdam,
    var: lazyadam::VarId,
    params: Vec<f32>,
    grads: Vec<f32>,
}

fn table(w: &Workload) -> BoxResult<Table> {
    let mut opt = LazyAdam::new(LazyAdamConfig::default())?;
    let var = opt.add_variable(w.name, &[w.rows, w.dim], DType::F32, DType::F32)?;
    let mut params = vec![0.0f32; w.rows * w.dim];
    lazyadam::advise_huge_pages(&params);
    params.fill(0.01);
    let grads = (0..w.ids.len() * w.dim)
        .map(|i| ((i % 97) as f32 - 48.0) * 1e-3)
        .collect();
    Ok(Table {
        opt,
        var,
        params,
        grads,
    })
}

fn time_steps(w: &Workload, t: &mut Table) -> BoxResult<Timing> {
    let step = |t: &mut Table| -> BoxResult<()> {
        let outcome = t.opt.apply_gradients(&mut [Update::new(
            t.var,
            &mut t.params,
            Gradient::sparse(&w.ids, &t.grads),
        )])?;
        if outcome != StepOutcome::Applied {
            return Err(format!("{}: step was {outcome:?}", w.name).into());
        }
        Ok(())
    };
    // Warm-up (the first steps create and fault in the slots and scratch).
    step(t)?;
    step(t)?;
    let _ = lazyadam::phase_times();
    let mut times = Vec::with_capacity(w.reps);
    for _ in 0..w.reps {
        let t0 = Instant::now();
        step(t)?;
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let (phases, steps) = lazyadam::phase_times();
    if steps == 0 {
        return Err("the phase timer is off (LAZYADAM_PHASE_TIMES)".into());
    }
    times.sort_by(f64::total_cmp);
    Ok(Timing {
        median_ms: times[times.len() / 2],
        phases: phases
            .into_iter()
            .map(|(n, ns)| (n, ns as f64 / steps as f64 / 1e6))
            .collect(),
    })
}

fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

fn phase(t: &Timing, name: &str) -> f64 {
    t.phases
        .iter()
        .find(|(n, _)| *n == name)
        .map_or(0.0, |&(_, ms)| ms)
}

fn main() -> BoxResult<()> {
    // SAFETY: no other thread exists yet (no rayon pool has been built and nothing has run a
    // step), so nothing can read the environment concurrently.
    unsafe { std::env::set_var("LAZYADAM_PHASE_TIMES", "1") };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let rounds: usize = match args.iter().position(|a| a == "--rounds") {
        Some(i) => args.get(i + 1).ok_or("--rounds needs a count")?.parse()?,
        None => 3,
    }
    .max(1);
    let only = match args.iter().position(|a| a == "--workload") {
        Some(i) => Some(args.get(i + 1).ok_or("--workload needs a NAME")?.clone()),
        None => None,
    };
    let ids_table: std::collections::HashMap<String, Vec<u32>> = serde_json::from_str(IDS_JSON)?;
    let peer_ids = ids_table
        .get("sparse_1m_d64")
        .ok_or("workload_ids.json has no sparse_1m_d64")?
        .clone();
    let workloads = [
        Workload {
            name: "sparse_1m_d64",
            rows: 1_000_000,
            dim: 64,
            ids: peer_ids,
            reps: if quick { 20 } else { 200 },
        },
        Workload {
            name: "sparse_10m_d64_1m_ids",
            rows: 10_000_000,
            dim: if quick { 4 } else { 64 },
            ids: zipf_ids(10_000_000, 1 << 20),
            reps: if quick { 3 } else { 15 },
        },
    ];
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
    let threads = rayon::current_num_threads();
    println!(
        "{}",
        serde_json::json!({"kind": "env", "threads": threads, "quick": quick, "rounds": rounds,
            "isa": lazyadam_kernels::Isa::best().name()})
    );
    for w in workloads
        .iter()
        .filter(|w| only.as_deref().is_none_or(|o| o == w.name))
    {
        let mut t = table(w)?;
        let mut distinct = w.ids.clone();
        distinct.sort_unstable();
        distinct.dedup();
        let (mut t1, mut tn) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            for (pool_threads, out) in [(1usize, &mut t1), (threads, &mut tn)] {
                let timing = if pool_threads == 1 {
                    one.install(|| time_steps(w, &mut t))?
                } else {
                    time_steps(w, &mut t)?
                };
                let phases: serde_json::Map<String, serde_json::Value> = timing
                    .phases
                    .iter()
                    .map(|&(n, ms)| (n.to_string(), round4(ms).into()))
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({"kind": "step", "workload": w.name, "rows": w.rows,
                        "dim": w.dim, "ids": w.ids.len(), "distinct": distinct.len(),
                        "threads": pool_threads, "round": round,
                        "median_ms": round4(timing.median_ms), "phases_ms": phases})
                );
                out.push(timing);
            }
        }
        let serial: Vec<f64> = t1
            .iter()
            .map(|t| phase(t, "validate") + phase(t, "transforms"))
            .collect();
        let fractions: Vec<f64> = t1
            .iter()
            .zip(&serial)
            .map(|(t, s)| s / t.median_ms)
            .collect();
        let s = median(fractions.clone());
        let amdahl = |n: f64| 1.0 / (s + (1.0 - s) / n);
        let one_ms = median(t1.iter().map(|t| t.median_ms).collect());
        let n_ms = median(tn.iter().map(|t| t.median_ms).collect());
        println!(
            "{}",
            serde_json::json!({"kind": "serial_fraction", "workload": w.name,
                "one_thread_ms": round4(one_ms), "threads": threads, "n_threads_ms": round4(n_ms),
                "measured_speedup": round4(one_ms / n_ms),
                "serial_ms": round4(median(serial)),
                "serial_fraction": round4(s),
                "serial_fraction_range": [round4(fractions.iter().copied().fold(f64::INFINITY, f64::min)),
                    round4(fractions.iter().copied().fold(0.0, f64::max))],
                "amdahl_projection_16": round4(amdahl(16.0)),
                "amdahl_projection_64": round4(amdahl(64.0))})
        );
    }
    Ok(())
}
