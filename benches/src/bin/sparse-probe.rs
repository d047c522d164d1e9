//! One sparse step shape repeated, for profilers: the ids of `sparse_1m_d64`
//! (`../../data/workload_ids.json`, taken modulo `--rows`) over a table of `--rows` x 64, with
//! f32 or all-f16 storage. Prints one JSON line: the median and fastest step and the mean time
//! of each phase (`LAZYADAM_PHASE_TIMES=1` to fill them in).
//!
//! `--huge-table` advises the parameter table for transparent huge pages (the optimizer's
//! slots already are). `--rotate` shifts every id by a new offset each step: the duplicate
//! structure stays the same, but the rows were not touched by recent steps, so they come from
//! memory instead of the cache that the repeated ids of the peer workload keep them in.
//!
//! ```text
//! cargo run --release -p lazyadam-benches --bin sparse-probe -- [--rows N] [--steps N] [--storage f32|f16] [--isa PATH]
//!     [--huge-table] [--rotate] [--clipnorm C | --global-clipnorm C] [--non-finite error|skip]
//! ```
//!
//! `--clipnorm`/`--global-clipnorm` clip by norm (the `transforms` phase sums the squares), and
//! `--non-finite` checks the values first (the `validate` phase; with a clipping norm, the
//! same pass sums the squares).
//!
//! With a small `--rows` (4,096: the tables stay in cache) the step's instruction count is a
//! repeatable figure on a noisy machine, for example the row updates' share:
//!
//! ```text
//! valgrind --tool=callgrind --callgrind-out-file=cg.out \
//!     target/release/sparse-probe --rows 4096 --steps 30 --storage f16
//! callgrind_annotate --inclusive=yes cg.out | grep 'step::rows_seq \['
//! ```
//!
//! (valgrind runs the AVX2 path: it does not emulate AVX-512.)

use std::error::Error as StdError;
use std::time::Instant;

use lazyadam_benches::{median_min_ms, parse_isa};

use lazyadam::{
    Element, Extensions, Gradient, Isa, LazyAdam, LazyAdamConfig, NonFinitePolicy, TensorMut,
    TensorRef, Update, f16,
};

const IDS_JSON: &str = include_str!("../../data/workload_ids.json");
const DIM: usize = 64;

type BoxResult<T> = Result<T, Box<dyn StdError + Send + Sync>>;

struct Args {
    rows: usize,
    steps: usize,
    f16: bool,
    isa: Option<Isa>,
    huge: bool,
    rotate: bool,
    clipnorm: Option<f32>,
    global_clipnorm: Option<f32>,
    non_finite: NonFinitePolicy,
}

const USAGE: &str = "usage: sparse-probe [--rows N] [--steps N] [--storage f32|f16] [--isa PATH] \
                     [--huge-table] [--rotate] [--clipnorm C | --global-clipnorm C] \
                     [--non-finite error|skip]";

fn parse_args() -> BoxResult<Args> {
    let mut a = Args {
        rows: 1_000_000,
        steps: 200,
        f16: false,
        isa: None,
        huge: false,
        rotate: false,
        clipnorm: None,
        global_clipnorm: None,
        non_finite: NonFinitePolicy::Propagate,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || {
            it.next()
                .ok_or_else(|| format!("{arg} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--rows" => a.rows = value()?.parse().map_err(|e| format!("--rows: {e}"))?,
            "--steps" => a.steps = value()?.parse().map_err(|e| format!("--steps: {e}"))?,
            "--storage" => {
                a.f16 = match value()?.as_str() {
                    "f32" => false,
                    "f16" => true,
                    other => return Err(format!("unknown storage {other:?}\n{USAGE}").into()),
                }
            }
            "--isa" => a.isa = Some(parse_isa(&value()?).map_err(|e| format!("{e}\n{USAGE}"))?),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "--huge-table" => a.huge = true,
            "--rotate" => a.rotate = true,
            "--clipnorm" => {
                a.clipnorm = Some(value()?.parse().map_err(|e| format!("--clipnorm: {e}"))?)
            }
            "--global-clipnorm" => {
                let c = value()?
                    .parse()
                    .map_err(|e| format!("--global-clipnorm: {e}"))?;
                a.global_clipnorm = Some(c)
            }
            "--non-finite" => {
                a.non_finite = match value()?.as_str() {
                    "error" => NonFinitePolicy::Error,
                    "skip" => NonFinitePolicy::SkipStep { loss_scale: None },
                    other => return Err(format!("unknown policy {other:?}\n{USAGE}").into()),
                }
            }
            "--bench" => {}
            other => return Err(format!("unknown argument {other:?}\n{USAGE}").into()),
        }
    }
    if a.rows == 0 || a.steps == 0 {
        return Err(format!("--rows and --steps must be positive\n{USAGE}").into());
    }
    Ok(a)
}

/// Runs the steps; returns (median ms, fastest ms).
fn run<T: Element>(a: &Args, ids: &[i64]) -> BoxResult<(f64, f64)>
where
    for<'x> &'x mut [T]: Into<TensorMut<'x>>,
    for<'x> &'x [T]: Into<TensorRef<'x>>,
{
    let ext = Extensions::default()
        .with_kernel(a.isa)
        .with_non_finite(a.non_finite.clone());
    let config = LazyAdamConfig {
        clipnorm: a.clipnorm,
        global_clipnorm: a.global_clipnorm,
        ..LazyAdamConfig::default()
    };
    let mut opt = LazyAdam::with_extensions(config, ext)?;
    let var = opt.add_variable("table", &[a.rows, DIM], T::DTYPE, T::DTYPE)?;
    let mut p = vec![T::from_f32(0.01); a.rows * DIM];
    if a.huge && !lazyadam::advise_huge_pages(&p) {
        eprintln!("sparse-probe: the huge-page advice was not taken (see advise_huge_pages)");
    }
    let g: Vec<T> = (0..ids.len() * DIM)
        .map(|i| T::from_f32(((i % 97) as f32 - 48.0) * 1e-3))
        .collect();
    // Warm-up: creates the slots.
    opt.apply_gradients(&mut [Update::new(var, &mut p[..], Gradient::sparse(ids, &g[..]))])?;
    lazyadam::phase_times();
    let mut times = Vec::with_capacity(a.steps);
    let mut step_ids = ids.to_vec();
    for step in 0..a.steps {
        if a.rotate {
            // A new offset per step (a prime stride): the same duplicate structure over rows
            // that earlier steps did not touch, so they come from memory, not the cache.
            let offset = ((step as u64 + 1) * 104_729 % a.rows as u64) as i64;
            for (s, &i) in step_ids.iter_mut().zip(ids) {
                *s = (i + offset) % a.rows as i64;
            }
        }
        let mut ups = [Update::new(
            var,
            &mut p[..],
            Gradient::sparse(&step_ids, &g[..]),
        )];
        let t0 = Instant::now();
        opt.apply_gradients(&mut ups)?;
        times.push(t0.elapsed());
    }
    Ok(median_min_ms(&mut times))
}

fn main() -> BoxResult<()> {
    let a = parse_args()?;
    let table: std::collections::HashMap<String, Vec<i64>> = serde_json::from_str(IDS_JSON)?;
    let ids: Vec<i64> = table
        .get("sparse_1m_d64")
        .ok_or("workload_ids.json has no sparse_1m_d64 ids")?
        .iter()
        .map(|&i| i % a.rows as i64)
        .collect();
    let (median, min) = if a.f16 {
        run::<f16>(&a, &ids)?
    } else {
        run::<f32>(&a, &ids)?
    };
    let (phases, steps) = lazyadam::phase_times();
    let phases: serde_json::Map<String, serde_json::Value> = phases
        .into_iter()
        .map(|(k, ns)| {
            (
                k.to_string(),
                (ns as f64 / steps.max(1) as f64 / 1e6).into(),
            )
        })
        .collect();
    println!(
        "{}",
        serde_json::json!({
            "rows": a.rows, "dim": DIM, "ids": ids.len(), "steps": a.steps,
            "huge_table": a.huge, "rotate": a.rotate,
            "clipnorm": a.clipnorm, "global_clipnorm": a.global_clipnorm,
            "non_finite": format!("{:?}", a.non_finite),
            "storage": if a.f16 { "f16" } else { "f32" },
            "isa": a.isa.unwrap_or_else(Isa::best).name(),
            "threads": rayon::current_num_threads(),
            "median_ms": median, "min_ms": min, "phase_mean_ms": phases,
        })
    );
    Ok(())
}
