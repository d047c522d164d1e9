//! The time of a sharded sparse step between MPI processes, with and without clipping: the
//! real-process counterpart of the main workspace's `shard-scale` bench, whose ranks are
//! threads of one process.
//!
//! ```text
//! cargo build --release --example shard_steps
//! mpirun -np 2 --allow-run-as-root target/release/examples/shard_steps \
//!     [--reps N] [--clipnorm C | --global-clipnorm C] [--ids PATH] [--scatter]
//! ```
//!
//! The shape is `sparse_1m_d64`'s: an f32 table of 1,000,000 x 64, and each step the 16,384
//! ids of `benches/data/workload_ids.json` (`--ids`; read at run time), split evenly across
//! the ranks in contiguous parts, with the same gradient values for any rank count (a hash of
//! the value's index; the gradient's norm is about 590, so `--clipnorm 1` clips every step).
//! Every step starts after a barrier; its time is the slowest rank's (an `MPI_Allreduce`
//! of the ranks' times, step by step, after the last step). Rank 0 prints one JSON line: the
//! median, the fastest and the slowest step of `--reps` (default 40) after one warm-up step,
//! and the median over steps of the most time any rank spent inside the collective's calls
//! in that step (`all_gather` and `all_to_all`, waiting for the other ranks included; that
//! rank need not be the slowest one).
//!
//! Each rank owns a contiguous range of the table's rows, and the workload's frequent ids are
//! low numbers: on 2 ranks, rank 0 owns 4,169 of the step's 4,436 distinct rows and receives
//! 12,250 of its 16,384 ids. `--scatter` maps every id through a fixed bijection of the rows
//! (`id * 618,033 mod 1,000,000`) that spreads them (2,235 of the distinct rows on rank 0),
//! to show what that imbalance costs; the line's `scatter` field says which ids were used.

use std::process::ExitCode;
use std::time::Instant;

use lazyadam::{
    Collective, CollectiveError, DType, Gradient, LazyAdamConfig, ShardGradient, ShardedLazyAdam,
};
use lazyadam_mpi::MpiCollective;
use lazyadam_mpi::mpi::collective::SystemOperation;
use lazyadam_mpi::mpi::traits::*;

const USAGE: &str =
    "usage: shard_steps [--reps N] [--clipnorm C | --global-clipnorm C] [--ids PATH] [--scatter]";
const ROWS: usize = 1_000_000;
const DIM: usize = 64;
const WORKLOAD: &str = "sparse_1m_d64";
/// `--scatter`'s multiplier (about 0.618 x `ROWS`).
const SCATTER: u64 = 618_033;

struct Args {
    reps: usize,
    clipnorm: Option<f32>,
    global_clipnorm: Option<f32>,
    ids: String,
    scatter: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        reps: 40,
        clipnorm: None,
        global_clipnorm: None,
        ids: concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../benches/data/workload_ids.json"
        )
        .into(),
        scatter: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--help" || flag == "-h" {
            return Err(USAGE.to_string());
        }
        if flag == "--scatter" {
            a.scatter = true;
            continue;
        }
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}\n{USAGE}");
        match flag.as_str() {
            "--reps" => a.reps = value.parse().map_err(|e| bad(&e))?,
            "--clipnorm" => a.clipnorm = Some(value.parse().map_err(|e| bad(&e))?),
            "--global-clipnorm" => a.global_clipnorm = Some(value.parse().map_err(|e| bad(&e))?),
            "--ids" => a.ids = value,
            _ => return Err(format!("unknown argument {flag}\n{USAGE}")),
        }
    }
    if a.reps == 0 {
        return Err(format!("--reps must be positive\n{USAGE}"));
    }
    Ok(a)
}

/// The ids of `WORKLOAD` in the workload file: `{"NAME": [id, ...], ...}`. A small reader of
/// that one shape, so that this crate needs no JSON dependency.
fn read_ids(path: &str) -> Result<Vec<u64>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    let key = format!("\"{WORKLOAD}\"");
    let start = text.find(&key).ok_or_else(|| format!("{path}: no {key}"))?;
    let rest = &text[start + key.len()..];
    let open = rest
        .find('[')
        .ok_or_else(|| format!("{path}: no array after {key}"))?;
    let close = rest[open..]
        .find(']')
        .ok_or_else(|| format!("{path}: unterminated array after {key}"))?;
    let ids = rest[open + 1..open + close]
        .split(',')
        .map(|s| s.trim().parse::<u64>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{path}: {key}: {e}"))?;
    if ids.iter().any(|&id| id >= ROWS as u64) {
        return Err(format!("{path}: {key} has an id of {ROWS} or more"));
    }
    Ok(ids)
}

/// A value in [-1, 1) from its index (splitmix64's finalizer), as `shard-scale` makes them.
fn unit(mut z: u64) -> f32 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

/// A collective that adds the time spent in its calls to `spent`.
struct Timed<C> {
    inner: C,
    spent: std::rc::Rc<std::cell::Cell<f64>>,
}

impl<C: Collective> Timed<C> {
    fn timed<T>(&mut self, f: impl FnOnce(&mut C) -> T) -> T {
        let t0 = Instant::now();
        let out = f(&mut self.inner);
        self.spent
            .set(self.spent.get() + t0.elapsed().as_secs_f64() * 1e3);
        out
    }
}

impl<C: Collective> Collective for Timed<C> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn all_gather(&mut self, local: &[u8]) -> Result<Vec<Vec<u8>>, CollectiveError> {
        self.timed(|c| c.all_gather(local))
    }
    fn all_to_all(&mut self, send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, CollectiveError> {
        self.timed(|c| c.all_to_all(send))
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let m = v.len();
    if m % 2 == 1 {
        v[m / 2]
    } else {
        (v[m / 2 - 1] + v[m / 2]) / 2.0
    }
}

fn json_opt(x: Option<f32>) -> String {
    x.map_or("null".into(), |c| c.to_string())
}

fn run(a: &Args, universe: &lazyadam_mpi::mpi::environment::Universe) -> Result<(), String> {
    let world = universe.world();
    let (rank, ranks) = (world.rank() as usize, world.size() as usize);
    let mut config = LazyAdamConfig::default();
    if let Some(c) = a.clipnorm {
        config = config.with_clipnorm(c);
    }
    if let Some(c) = a.global_clipnorm {
        config = config.with_global_clipnorm(c);
    }
    config.validate().map_err(|e| e.to_string())?;
    let mut ids = read_ids(&a.ids)?;
    if a.scatter {
        // A bijection of the rows (618,033 is prime to 10^6) that spreads the low, frequent
        // ids over the whole table, so that each rank owns about as many of the step's rows.
        ids.iter_mut()
            .for_each(|id| *id = *id * SCATTER % ROWS as u64);
    }
    let n = ids.len();
    let (lo, hi) = (n * rank / ranks, n * (rank + 1) / ranks);
    let my_ids = &ids[lo..hi];
    let my_grads: Vec<f32> = (lo * DIM..hi * DIM).map(|i| unit(i as u64)).collect();

    let spent = std::rc::Rc::new(std::cell::Cell::new(0.0));
    let collective = Timed {
        inner: MpiCollective::new(world.duplicate()).map_err(|e| format!("collective: {e}"))?,
        spent: std::rc::Rc::clone(&spent),
    };
    let mut opt = ShardedLazyAdam::new(config, collective).map_err(|e| e.to_string())?;
    let table = opt
        .add_table("emb", ROWS, DIM, DType::F32, DType::F32)
        .map_err(|e| e.to_string())?;
    let mut times = Vec::with_capacity(a.reps);
    let mut in_collective = Vec::with_capacity(a.reps);
    for k in 0..=a.reps {
        world.barrier();
        spent.set(0.0);
        let t0 = Instant::now();
        opt.step(&[ShardGradient::new(
            table,
            Gradient::sparse(my_ids, &my_grads),
        )])
        .map_err(|e| format!("step {k}: {e}"))?;
        if k > 0 {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
            in_collective.push(spent.get());
        }
    }
    let mut slowest = vec![0.0f64; times.len()];
    world.all_reduce_into(&times[..], &mut slowest[..], SystemOperation::max());
    let mut most_collective = vec![0.0f64; times.len()];
    world.all_reduce_into(
        &in_collective[..],
        &mut most_collective[..],
        SystemOperation::max(),
    );
    if rank == 0 {
        let median_ms = median(&mut slowest);
        let collective_ms = median(&mut most_collective);
        let m = slowest.len();
        println!(
            "{{\"kind\":\"mpi_shard_step\",\"workload\":\"{WORKLOAD}\",\"ranks\":{ranks},\
             \"scatter\":{},\"threads_per_rank\":{},\"reps\":{},\"clipnorm\":{},\"global_clipnorm\":{},\
             \"median_ms_slowest_rank\":{median_ms:.4},\"min_ms\":{:.4},\"max_ms\":{:.4},\
             \"median_ms_in_collective\":{collective_ms:.4}}}",
            a.scatter,
            rayon_threads(),
            a.reps,
            json_opt(a.clipnorm),
            json_opt(a.global_clipnorm),
            slowest[0],
            slowest[m - 1],
        );
    }
    Ok(())
}

/// The rank's thread count as the optimizer's pool sees it: `RAYON_NUM_THREADS`, or the
/// machine's parallelism.
fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn main() -> ExitCode {
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let Some(universe) = lazyadam_mpi::mpi::initialize() else {
        eprintln!("shard_steps: MPI was already initialized");
        return ExitCode::FAILURE;
    };
    let code = match run(&a, &universe) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The other ranks may be waiting in a collective: end the job.
            eprintln!("shard_steps: rank {}: {e}", universe.world().rank());
            universe.world().abort(2)
        }
    };
    drop(universe); // MPI_Finalize
    code
}
