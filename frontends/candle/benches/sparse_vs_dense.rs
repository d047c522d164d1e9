//! A sparse LazyAdam step of 4,096 rows on a 1,000,000 x 64 f32 candle table against a dense
//! Adam step over the same table, both through `lazyadam-candle` (in place in the `Var`).
//!
//! ```text
//! cargo bench -p lazyadam-candle --bench sparse_vs_dense              # full
//! cargo bench -p lazyadam-candle --bench sparse_vs_dense -- --quick   # quick
//! ```
//!
//! After criterion's report, prints the median time of each step and the ratio (issue target:
//! >= 20x); the full mode also times candle-nn's own `AdamW` dense step for reference.

use std::hint::black_box;
use std::time::{Duration, Instant};

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use candle_nn::Optimizer;
use criterion::Criterion;
use lazyadam_candle::{Config, LazyAdamOptimizer, SparseGrad};

const ROWS: usize = 1_000_000;
const DIM: usize = 64;
const BATCH: usize = 4_096;

struct Setup {
    table: Var,
    opt: LazyAdamOptimizer,
    ids: Tensor,
    rows: Tensor,
    dense: GradStore,
}

fn setup() -> Setup {
    let dev = Device::Cpu;
    let table = Var::from_tensor(&Tensor::randn(0f32, 0.1, (ROWS, DIM), &dev).expect("table"))
        .expect("var");
    let opt = LazyAdamOptimizer::new(vec![table.clone()], Config::new(1e-3).expect("config"))
        .expect("optimizer");
    // 4,096 distinct pseudo-random rows (a multiplicative hash of 0..4096 modulo a prime).
    let ids: Vec<u32> = (0..BATCH as u64)
        .map(|i| ((i * 2_654_435_761 + 12_345) % 999_983) as u32)
        .collect();
    let ids = Tensor::new(ids.as_slice(), &dev).expect("ids");
    let rows = Tensor::randn(0f32, 1.0, (BATCH, DIM), &dev).expect("rows");
    let mut dense = GradStore::default();
    dense.insert(
        table.as_tensor(),
        Tensor::randn(0f32, 1.0, (ROWS, DIM), &dev).expect("dense gradient"),
    );
    Setup {
        table,
        opt,
        ids,
        rows,
        dense,
    }
}

fn sparse_step(s: &mut Setup) {
    let table = s.table.clone();
    black_box(
        s.opt
            .step_sparse(&[SparseGrad::new(&table, &s.ids, &s.rows)])
            .expect("sparse step"),
    );
}

fn dense_step(s: &mut Setup) {
    black_box(s.opt.try_step(&s.dense).expect("dense step"));
}

fn median(mut f: impl FnMut(), iters: usize) -> Duration {
    f(); // warm-up
    let mut t: Vec<Duration> = (0..iters)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect();
    t.sort();
    t[t.len() / 2]
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let mut s = setup();

    let mut c = Criterion::default().configure_from_args();
    {
        let mut g = c.benchmark_group("candle_1Mx64_f32");
        g.sample_size(10);
        g.bench_function("lazyadam_sparse_4096_rows", |b| {
            b.iter(|| sparse_step(&mut s))
        });
        g.bench_function("adam_dense_all_rows", |b| b.iter(|| dense_step(&mut s)));
        g.finish();
    }
    c.final_summary();

    let (ns, nd) = if quick { (20, 3) } else { (200, 10) };
    let sparse = median(|| sparse_step(&mut s), ns);
    let dense = median(|| dense_step(&mut s), nd);
    let threads = rayon::current_num_threads();
    println!(
        "\n1,000,000 x 64 f32 table, {threads} thread(s), median of {ns} sparse / {nd} dense steps:"
    );
    println!(
        "  LazyAdam sparse step, 4,096 rows : {:>10.3} ms",
        sparse.as_secs_f64() * 1e3
    );
    println!(
        "  Adam dense step, all rows        : {:>10.3} ms",
        dense.as_secs_f64() * 1e3
    );
    println!(
        "  ratio dense / sparse             : {:>10.1}x   (issue 4 target: >= 20x)",
        dense.as_secs_f64() / sparse.as_secs_f64()
    );
    if !quick {
        // candle-nn's own AdamW over the same table, for reference (allocates new tensors).
        let mut adamw = candle_nn::AdamW::new(
            vec![s.table.clone()],
            candle_nn::ParamsAdamW {
                lr: 1e-3,
                weight_decay: 0.0,
                ..Default::default()
            },
        )
        .expect("AdamW");
        let candle_dense = median(|| adamw.step(&s.dense).expect("AdamW step"), 3);
        println!(
            "  candle-nn AdamW dense step       : {:>10.3} ms  (reference)",
            candle_dense.as_secs_f64() * 1e3
        );
    }
}
