//! The peer-workload bench: times one `LazyAdam` step on the workloads of
//! `shared/peers/README.md`, in the same JSON-lines shape as `bench_peers.py`, so that a ratio
//! against TensorFlow Addons' LazyAdam or torch's SparseAdam can be taken in one sitting.
//!
//! ```text
//! cargo run --release -p lazyadam-benches --bin peer-workloads -- [--quick] [--workload NAME]... [--config NAME]... [--isa PATH] [--non-finite POLICY] [--long-rows LOOP] [--clipnorm C] [--global-clipnorm C] [--blocks N]
//! ```
//!
//! `--isa` forces a kernel path (`scalar`, `portable`, `avx2`, `avx512`), to compare paths on one
//! machine; the default is the best path this CPU runs. `--non-finite` sets the non-finite
//! policy: `propagate` (the default, which reads no values), `error`, or `skip` (`SkipStep` with
//! the default dynamic loss scale; the gradients are finite, so only the checks' cost shows).
//! `--long-rows` sets the kernels' loop for rows of 2^16 elements or more, which the dense
//! leaves take (`LongRowLoop`: `auto`, the default, or `one_pass` or `split`).
//! `--clipnorm C` and `--global-clipnorm C` set the clipping options of `LazyAdamConfig` (the
//! default is neither): each is one more pass over the gradient, an exact sum of squares.
//! `--blocks N` goes on timing the same optimizer after the timed steps, in `N` more blocks of as
//! many steps, and prints each block's median: whether a slow run is slow from start to end (the
//! memory it was given) or for a while (the machine), as in `benches/README.md`'s section on
//! `sparse_100k_d16`'s two speeds.
//!
//! Every line on stdout is one JSON object:
//!
//! - `{"kind":"env",...}`: kernel path, thread count, mode;
//! - `{"kind":"stream_triad",...}`: a STREAM-triad bandwidth figure measured in the same run
//!   (`a[i] = b[i] + s*c[i]` over f64 arrays far larger than the caches; 24 bytes per element,
//!   STREAM's convention; also given counting the write-allocate read, 32 bytes), with the default
//!   thread count and with one thread;
//! - `{"kind":"memory",...}`: optimizer memory per parameter (parameter + m + v bytes) for each
//!   storage configuration, read back from the optimizer's own slots;
//! - `{"workload":...,"impl":...,"median_ms":...,"min_ms":...}`: one line per workload and
//!   configuration (the same keys as the peers' script);
//! - `{"kind":"bandwidth",...}`: bytes moved by one step (a model of the minimum traffic, given in
//!   the line) and the resulting GB/s at the median time;
//! - `{"kind":"blocks",...}`: with `--blocks N`, the median of each later block of steps.
//!
//! Workloads: `sparse_1m_d64` (f32 table 1,000,000 x 64, the 16,384 row ids of
//! `data/workload_ids.json`), `sparse_100k_d16` (100,000 x 16, 2,048 ids) and `dense_16m` (one dense
//! tensor of 16,777,216 elements). Parameters and gradients are N(0,1) from a seeded generator.
//! Timing: one warm-up step (creates the slots), then repeated steps of the optimizer alone; the
//! gradient is built once before the clock starts.

use std::error::Error as StdError;
use std::hint::black_box;
use std::time::{Duration, Instant};

use lazyadam::kernels::LongRowLoop;
use lazyadam::{
    DType, DynamicLossScale, Element, Extensions, Gradient, Isa, LazyAdam, LazyAdamConfig,
    NonFinitePolicy, StepOutcome, TensorMut, TensorRef, Update, bf16, f16,
};
use lazyadam_benches::{median_min_ms, parse_isa};
use rayon::prelude::*;

/// The row ids of the sparse workloads, fixed once (Zipf(1.1)); a copy of
/// `shared/peers/workload_ids.json`, embedded so the binary runs from any directory.
const IDS_JSON: &str = include_str!("../../data/workload_ids.json");

type BoxResult<T> = Result<T, Box<dyn StdError + Send + Sync>>;

/// One workload of `shared/peers/README.md`.
#[derive(Clone, Copy, Debug)]
struct Workload {
    name: &'static str,
    /// Rows of the table (for `dense_16m`: the number of elements).
    rows: usize,
    /// Row length; `None` for the dense workload.
    dim: Option<usize>,
    /// Timed steps (full run, `--quick`).
    reps: usize,
    quick_reps: usize,
}

const WORKLOADS: [Workload; 3] = [
    Workload {
        name: "sparse_1m_d64",
        rows: 1_000_000,
        dim: Some(64),
        reps: 200,
        quick_reps: 30,
    },
    Workload {
        name: "sparse_100k_d16",
        rows: 100_000,
        dim: Some(16),
        reps: 1000,
        quick_reps: 100,
    },
    Workload {
        name: "dense_16m",
        rows: 16_777_216,
        dim: None,
        reps: 30,
        quick_reps: 8,
    },
];

/// One storage / threading configuration.
#[derive(Clone, Copy, Debug)]
struct Config {
    name: &'static str,
    param: DType,
    grad: DType,
    moment: DType,
    one_thread: bool,
}

/// The storage configurations. Besides f32, the four 16-bit ones are DeepSpeed `CPUAdam`'s:
/// bf16 or f16 parameters and gradients, with f32 moments or with moments in the parameter type
/// (`bench_anchors.py`'s `fp32_optimizer_states=True/False`); f32 with bf16 moments is ours only.
const CONFIGS: [Config; 7] = [
    Config {
        name: "lazyadam-f32",
        param: DType::F32,
        grad: DType::F32,
        moment: DType::F32,
        one_thread: false,
    },
    Config {
        name: "lazyadam-f32-1thread",
        param: DType::F32,
        grad: DType::F32,
        moment: DType::F32,
        one_thread: true,
    },
    Config {
        name: "lazyadam-f16",
        param: DType::F16,
        grad: DType::F16,
        moment: DType::F16,
        one_thread: false,
    },
    Config {
        name: "lazyadam-f16-f32moments",
        param: DType::F16,
        grad: DType::F16,
        moment: DType::F32,
        one_thread: false,
    },
    Config {
        name: "lazyadam-bf16",
        param: DType::BF16,
        grad: DType::BF16,
        moment: DType::BF16,
        one_thread: false,
    },
    Config {
        name: "lazyadam-bf16-f32moments",
        param: DType::BF16,
        grad: DType::BF16,
        moment: DType::F32,
        one_thread: false,
    },
    Config {
        name: "lazyadam-bf16moments",
        param: DType::F32,
        grad: DType::F32,
        moment: DType::BF16,
        one_thread: false,
    },
];

/// SplitMix64: a tiny seeded generator, plenty for benchmark inputs.
#[derive(Clone, Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn next_open01(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) * (1.0 / (1u64 << 53) as f64)
    }

    /// Two independent N(0,1) samples (Box-Muller).
    fn next_normal_pair(&mut self) -> (f64, f64) {
        let u1 = self.next_open01();
        let u2 = self.next_open01();
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
        (r * c, r * s)
    }
}

/// `n` samples of N(0,1) rounded to `T`, filled in parallel chunks; each chunk has its own
/// stream derived from `(seed, chunk index)`, so the values do not depend on the thread count.
fn normal_vec<T: Element>(n: usize, seed: u64) -> Vec<T> {
    const CHUNK: usize = 1 << 16;
    let mut out = vec![T::default(); n];
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(ci, chunk)| {
            let mut rng = SplitMix64::new(seed ^ (ci as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
            let mut pairs = chunk.chunks_mut(2);
            for pair in &mut pairs {
                let (a, b) = rng.next_normal_pair();
                pair[0] = T::from_f32(a as f32);
                if pair.len() > 1 {
                    pair[1] = T::from_f32(b as f32);
                }
            }
        });
    out
}

/// Rounds to 4 significant decimals after the point like the peers' script (`round(x, 4)`),
/// keeping sub-microsecond figures readable.
fn round_ms(x: f64) -> f64 {
    if x >= 0.01 {
        (x * 1e4).round() / 1e4
    } else {
        (x * 1e6).round() / 1e6
    }
}

fn dtype_bytes(d: DType) -> usize {
    d.size_bytes()
}

/// The median and fastest step, in ms, then the median of each later block (`--blocks`).
type Timing = (f64, f64, Vec<f64>);

/// Times one configuration on one workload: warm-up step, then `reps` timed steps, then
/// `blocks` blocks of `reps` steps.
fn time_steps<P, G>(
    w: &Workload,
    cfg: &Config,
    ids: &[i64],
    reps: usize,
    blocks: usize,
    setup: &Setup,
) -> BoxResult<Timing>
where
    P: Element,
    G: Element,
    for<'a> &'a mut [P]: Into<TensorMut<'a>>,
    for<'a> &'a [G]: Into<TensorRef<'a>>,
{
    let mut opt = LazyAdam::with_extensions(setup.config.clone(), setup.ext.clone())?;
    let (shape, grad_len) = match w.dim {
        Some(d) => (vec![w.rows, d], ids.len() * d),
        None => (vec![w.rows], w.rows),
    };
    let n: usize = shape.iter().product();
    let var = opt.add_variable(w.name, &shape, cfg.param, cfg.moment)?;
    let mut param: Vec<P> = normal_vec(n, 0x5EED_0001);
    let grad: Vec<G> = normal_vec(grad_len, 0x5EED_0002);

    let gradient = match w.dim {
        Some(_) => Gradient::sparse(ids, &grad[..]),
        None => Gradient::dense(&grad[..]),
    };
    let mut updates = [Update::new(var, &mut param[..], gradient)];

    // Warm-up: creates the slots, faults the pages in.
    let outcome = opt.apply_gradients(&mut updates)?;
    if outcome != StepOutcome::Applied {
        return Err(format!("{}: warm-up step was {outcome:?}", w.name).into());
    }
    let mut timed = |times: &mut Vec<Duration>| -> BoxResult<()> {
        times.clear();
        for _ in 0..reps {
            let t0 = Instant::now();
            let r = opt.apply_gradients(black_box(&mut updates));
            let dt = t0.elapsed();
            if r? != StepOutcome::Applied {
                return Err(format!("{}: a timed step was not applied", w.name).into());
            }
            times.push(dt);
        }
        Ok(())
    };
    let mut times = Vec::with_capacity(reps);
    timed(&mut times)?;
    let (median, min) = median_min_ms(&mut times);
    let mut block_medians = Vec::with_capacity(blocks);
    for _ in 0..blocks {
        timed(&mut times)?;
        block_medians.push(median_min_ms(&mut times).0);
    }
    black_box(&param);
    Ok((median, min, block_medians))
}

/// Dispatches on the configuration's parameter and gradient storage types.
fn time_config(
    w: &Workload,
    cfg: &Config,
    ids: &[i64],
    reps: usize,
    blocks: usize,
    setup: &Setup,
) -> BoxResult<Timing> {
    match (cfg.param, cfg.grad) {
        (DType::F32, DType::F32) => time_steps::<f32, f32>(w, cfg, ids, reps, blocks, setup),
        (DType::F16, DType::F16) => time_steps::<f16, f16>(w, cfg, ids, reps, blocks, setup),
        (DType::BF16, DType::BF16) => time_steps::<bf16, bf16>(w, cfg, ids, reps, blocks, setup),
        (p, g) => Err(format!("no bench instantiation for params {p:?} / grads {g:?}").into()),
    }
}

/// The minimum traffic of one step, in bytes, and the formula used (printed alongside).
///
/// Sparse: each distinct row reads and writes its parameter, m and v, and reads its summed f32
/// gradient (`2P + 4M + 4` bytes per element); the gradient rows and their i64 ids are read once.
/// Dense: parameter, m and v read and written, gradient read (`2P + 4M + G` per element).
fn bytes_moved(w: &Workload, cfg: &Config, ids: &[i64]) -> (u64, &'static str) {
    let p = dtype_bytes(cfg.param) as u64;
    let m = dtype_bytes(cfg.moment) as u64;
    let g = dtype_bytes(cfg.grad) as u64;
    match w.dim {
        Some(d) => {
            let d = d as u64;
            let mut distinct = ids.to_vec();
            distinct.sort_unstable();
            distinct.dedup();
            let distinct = distinct.len() as u64;
            let batch = ids.len() as u64;
            (
                distinct * d * (2 * p + 4 * m + 4) + batch * (d * g + 8),
                "distinct*dim*(2P+4M+4) + batch*(dim*G+8)",
            )
        }
        None => (w.rows as u64 * (2 * p + 4 * m + g), "n*(2P+4M+G)"),
    }
}

/// STREAM triad `a = b + s*c` on f64 arrays of `n` elements; returns (best, median) GB/s.
fn stream_triad(n: usize, reps: usize) -> (f64, f64) {
    const CHUNK: usize = 1 << 15;
    let mut a = vec![0.0f64; n];
    let b = vec![1.0f64; n];
    let c = vec![2.0f64; n];
    let s = black_box(3.0f64);
    // First touch of `a` (page faults) outside the timed passes.
    a.par_chunks_mut(CHUNK).for_each(|x| x.fill(0.5));
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t0 = Instant::now();
        a.par_chunks_mut(CHUNK)
            .zip(b.par_chunks(CHUNK))
            .zip(c.par_chunks(CHUNK))
            .for_each(|((a, b), c)| {
                for ((a, b), c) in a.iter_mut().zip(b).zip(c) {
                    *a = b + s * c;
                }
            });
        times.push(t0.elapsed());
        black_box(&a);
    }
    times.sort_unstable();
    let bytes = (3 * 8 * n) as f64;
    let gbs = |d: Duration| bytes / d.as_secs_f64() / 1e9;
    (gbs(times[0]), gbs(times[times.len() / 2]))
}

/// Optimizer memory per parameter of a storage configuration, read back from a small optimizer's
/// slots after one step: (parameter bytes, slot bytes) per parameter.
fn memory_per_param(cfg: &Config) -> BoxResult<(f64, f64)> {
    const N: usize = 64;
    let mut opt = LazyAdam::new(LazyAdamConfig::default())?;
    let var = opt.add_variable("probe", &[8, 8], cfg.param, cfg.moment)?;
    fn probe<T: Element>(opt: &mut LazyAdam, var: lazyadam::VarId) -> BoxResult<()>
    where
        for<'a> &'a mut [T]: Into<TensorMut<'a>>,
        for<'a> &'a [T]: Into<TensorRef<'a>>,
    {
        let mut p = [T::from_f32(0.0); N];
        let g = [T::from_f32(0.5); N];
        opt.apply_gradients(&mut [Update::new(var, &mut p[..], Gradient::dense(&g[..]))])?;
        Ok(())
    }
    match (cfg.param, cfg.grad) {
        (DType::F32, DType::F32) => probe::<f32>(&mut opt, var)?,
        (DType::F16, DType::F16) => probe::<f16>(&mut opt, var)?,
        (DType::BF16, DType::BF16) => probe::<bf16>(&mut opt, var)?,
        (p, g) => return Err(format!("no probe for params {p:?} / grads {g:?}").into()),
    }
    let slots = opt.slots(var).ok_or("the probe variable has no slots")?;
    let mut slot_bytes =
        slots.m.len() * slots.m.dtype().size_bytes() + slots.v.len() * slots.v.dtype().size_bytes();
    if let Some(vhat) = &slots.vhat {
        slot_bytes += vhat.len() * vhat.dtype().size_bytes();
    }
    Ok((cfg.param.size_bytes() as f64, slot_bytes as f64 / N as f64))
}

fn print_json(v: serde_json::Value) {
    println!("{v}");
}

/// The optimizer options every timed configuration shares.
struct Setup {
    config: LazyAdamConfig,
    ext: Extensions,
}

struct Args {
    quick: bool,
    workloads: Vec<String>,
    configs: Vec<String>,
    /// A forced kernel path (`None`: the best one).
    isa: Option<Isa>,
    /// The non-finite policy (`--non-finite`), and its name for the env line.
    non_finite: (NonFinitePolicy, &'static str),
    /// The loop for long rows (`--long-rows`).
    long_rows: LongRowLoop,
    /// `--clipnorm`.
    clipnorm: Option<f32>,
    /// `--global-clipnorm`.
    global_clipnorm: Option<f32>,
    /// `--blocks`: later blocks of steps timed separately.
    blocks: usize,
}

const USAGE: &str = "usage: peer-workloads [--quick] [--workload NAME]... [--config NAME]... [--isa PATH] [--non-finite POLICY] [--long-rows LOOP]\n    \
    [--clipnorm C] [--global-clipnorm C] [--blocks N]\n\
    workloads: sparse_1m_d64 sparse_100k_d16 dense_16m\n\
    configs: lazyadam-f32 lazyadam-f32-1thread lazyadam-f16 lazyadam-f16-f32moments lazyadam-bf16\n    \
    lazyadam-bf16-f32moments lazyadam-bf16moments\n\
    paths (--isa): scalar portable avx2 avx512 (default: the best this CPU runs)\n\
    policies (--non-finite): propagate (default) error skip\n\
    loops (--long-rows): auto (default) one_pass split";

fn parse_args() -> BoxResult<Args> {
    let mut args = Args {
        quick: false,
        workloads: Vec::new(),
        configs: Vec::new(),
        isa: None,
        non_finite: (NonFinitePolicy::Propagate, "propagate"),
        long_rows: LongRowLoop::Auto,
        clipnorm: None,
        global_clipnorm: None,
        blocks: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => args.quick = true,
            "--workload" => args
                .workloads
                .push(it.next().ok_or("--workload needs a NAME")?),
            "--config" => args.configs.push(it.next().ok_or("--config needs a NAME")?),
            "--isa" => {
                let name = it.next().ok_or("--isa needs a PATH")?;
                args.isa = Some(parse_isa(&name).map_err(|e| format!("{e}\n{USAGE}"))?);
            }
            "--non-finite" => {
                args.non_finite = match it.next().as_deref() {
                    Some("propagate") => (NonFinitePolicy::Propagate, "propagate"),
                    Some("error") => (NonFinitePolicy::Error, "error"),
                    Some("skip") => (
                        NonFinitePolicy::SkipStep {
                            loss_scale: Some(DynamicLossScale::default()),
                        },
                        "skip",
                    ),
                    _ => return Err(format!("--non-finite needs a POLICY\n{USAGE}").into()),
                };
            }
            "--long-rows" => {
                let name = it.next().unwrap_or_default();
                args.long_rows = LongRowLoop::from_name(&name)
                    .ok_or_else(|| format!("--long-rows needs a LOOP\n{USAGE}"))?;
            }
            "--clipnorm" | "--global-clipnorm" => {
                let c = it
                    .next()
                    .and_then(|v| v.parse::<f32>().ok())
                    .ok_or_else(|| format!("{a} needs a number\n{USAGE}"))?;
                if a == "--clipnorm" {
                    args.clipnorm = Some(c);
                } else {
                    args.global_clipnorm = Some(c);
                }
            }
            "--blocks" => {
                args.blocks = it
                    .next()
                    .and_then(|v| v.parse::<usize>().ok())
                    .ok_or_else(|| format!("--blocks needs a count\n{USAGE}"))?;
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            // `cargo bench` passes `--bench`; ignore it.
            "--bench" => {}
            other => return Err(format!("unknown argument {other:?}\n{USAGE}").into()),
        }
    }
    for w in &args.workloads {
        if !WORKLOADS.iter().any(|x| x.name == w) {
            return Err(format!("unknown workload {w:?}\n{USAGE}").into());
        }
    }
    for c in &args.configs {
        if !CONFIGS.iter().any(|x| x.name == c) {
            return Err(format!("unknown config {c:?}\n{USAGE}").into());
        }
    }
    Ok(args)
}

fn main() -> BoxResult<()> {
    let args = parse_args()?;
    let ids_table: std::collections::HashMap<String, Vec<i64>> = serde_json::from_str(IDS_JSON)?;
    let threads = rayon::current_num_threads();
    let one_pool = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;

    print_json(serde_json::json!({
        "kind": "env",
        "isa": args.isa.unwrap_or_else(Isa::best).name(),
        "threads": threads,
        "quick": args.quick,
        "non_finite": args.non_finite.1,
        "long_rows": args.long_rows.name(),
        "clipnorm": args.clipnorm,
        "global_clipnorm": args.global_clipnorm,
    }));
    let mut config = LazyAdamConfig::default();
    if let Some(c) = args.clipnorm {
        config = config.with_clipnorm(c);
    }
    if let Some(c) = args.global_clipnorm {
        config = config.with_global_clipnorm(c);
    }
    let setup = Setup {
        config,
        ext: Extensions::default()
            .with_kernel(args.isa)
            .with_long_row_loop(args.long_rows)
            .with_non_finite(args.non_finite.0.clone()),
    };

    // STREAM triad: 3 arrays of 2^24 f64 (384 MiB in all), far beyond any cache.
    let triad_n = 1usize << 24;
    let triad_reps = if args.quick { 5 } else { 20 };
    let (triad_best, triad_median) = stream_triad(triad_n, triad_reps);
    print_json(serde_json::json!({
        "kind": "stream_triad", "threads": threads, "array_elements": triad_n,
        "best_gb_per_s": round_ms(triad_best), "median_gb_per_s": round_ms(triad_median),
        // The same passes counting the write-allocate read of `a` (32 bytes per element).
        "best_gb_per_s_with_write_allocate": round_ms(triad_best * 32.0 / 24.0),
    }));
    let (t1_best, t1_median) = one_pool.install(|| stream_triad(triad_n, triad_reps));
    print_json(serde_json::json!({
        "kind": "stream_triad", "threads": 1, "array_elements": triad_n,
        "best_gb_per_s": round_ms(t1_best), "median_gb_per_s": round_ms(t1_median),
        // The same passes counting the write-allocate read of `a` (32 bytes per element).
        "best_gb_per_s_with_write_allocate": round_ms(t1_best * 32.0 / 24.0),
    }));

    let selected_configs: Vec<&Config> = CONFIGS
        .iter()
        .filter(|c| args.configs.is_empty() || args.configs.iter().any(|n| n == c.name))
        .collect();

    for cfg in selected_configs.iter().filter(|c| !c.one_thread) {
        let (param_bytes, slot_bytes) = memory_per_param(cfg)?;
        print_json(serde_json::json!({
            "kind": "memory", "impl": cfg.name,
            "param": cfg.param.name(), "moments": cfg.moment.name(),
            "param_bytes": param_bytes, "slot_bytes": slot_bytes,
            "bytes_per_param": param_bytes + slot_bytes,
        }));
    }

    for w in WORKLOADS
        .iter()
        .filter(|w| args.workloads.is_empty() || args.workloads.iter().any(|n| n == w.name))
    {
        let ids: &[i64] = match w.dim {
            Some(_) => ids_table
                .get(w.name)
                .map(Vec::as_slice)
                .ok_or_else(|| format!("workload_ids.json has no ids for {}", w.name))?,
            None => &[],
        };
        let reps = if args.quick { w.quick_reps } else { w.reps };
        for cfg in &selected_configs {
            let (median, min, block_medians) = if cfg.one_thread {
                one_pool.install(|| time_config(w, cfg, ids, reps, args.blocks, &setup))?
            } else {
                time_config(w, cfg, ids, reps, args.blocks, &setup)?
            };
            print_json(serde_json::json!({
                "workload": w.name, "impl": cfg.name,
                "median_ms": round_ms(median), "min_ms": round_ms(min),
            }));
            if !block_medians.is_empty() {
                print_json(serde_json::json!({
                    "kind": "blocks", "workload": w.name, "impl": cfg.name,
                    "steps_per_block": reps,
                    "block_median_ms": block_medians.iter().map(|&m| round_ms(m)).collect::<Vec<_>>(),
                }));
            }
            let (bytes, model) = bytes_moved(w, cfg, ids);
            print_json(serde_json::json!({
                "kind": "bandwidth", "workload": w.name, "impl": cfg.name,
                "bytes_per_step": bytes, "model": model,
                "gb_per_s_at_median": round_ms(bytes as f64 / (median * 1e-3) / 1e9),
                "stream_triad_gb_per_s": round_ms(if cfg.one_thread { t1_best } else { triad_best }),
            }));
        }
    }
    Ok(())
}
