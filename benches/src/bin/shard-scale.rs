//! Bytes exchanged and time of a sharded step, for 1, 2 and 4 in-process ranks, on the shape of
//! `sparse_1m_d64` (an f32 table of 1,000,000 x 64; each step the 16,384 ids of
//! `data/workload_ids.json`, split evenly across the ranks in contiguous parts).
//!
//! ```text
//! cargo run --release -p lazyadam-benches --bin shard-scale -- [--quick] [--no-fetch]
//!     [--clipnorm C | --global-clipnorm C]
//! ```
//!
//! `--clipnorm` and `--global-clipnorm` set the optimizer's clipping norm (the ranks then agree
//! on the norm of a gradient spread over them); `--no-fetch` leaves out the runs that fetch
//! rows after each step.
//!
//! Ranks are threads ([`ThreadCollective`]) sharing the machine's cores and one rayon pool, so
//! the times are those of one machine doing every rank's work (they show the cost the
//! sharding adds, not a speed-up); the byte counts are what an engine such as MPI would carry
//! between processes: every byte a rank sends to another rank (its own part stays local), per
//! step, counted by a wrapper around the collective. Each line is one JSON object.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use lazyadam::{
    Collective, CollectiveError, DType, Gradient, LazyAdamConfig, ShardGradient, ShardedLazyAdam,
    ThreadCollective,
};
use lazyadam_benches::median;

const IDS_JSON: &str = include_str!("../../data/workload_ids.json");
const ROWS: usize = 1_000_000;
const DIM: usize = 64;

/// Counts the bytes a rank sends to other ranks.
struct Counting {
    inner: ThreadCollective,
    gather: Arc<AtomicU64>,
    to_all: Arc<AtomicU64>,
}

impl Collective for Counting {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn all_gather(&mut self, local: &[u8]) -> Result<Vec<Vec<u8>>, CollectiveError> {
        let others = (self.size() - 1) as u64;
        self.gather
            .fetch_add(local.len() as u64 * others, Ordering::Relaxed);
        self.inner.all_gather(local)
    }
    fn all_to_all(&mut self, send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, CollectiveError> {
        let me = self.rank();
        let bytes: usize = send
            .iter()
            .enumerate()
            .filter(|(r, _)| *r != me)
            .map(|(_, b)| b.len())
            .sum();
        self.to_all.fetch_add(bytes as u64, Ordering::Relaxed);
        self.inner.all_to_all(send)
    }
}

fn unit(mut z: u64) -> f32 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

/// The value after `flag` among the arguments, parsed as a clipping norm.
fn norm_arg(args: &[String], flag: &str) -> Result<Option<f32>, String> {
    match args.iter().position(|a| a == flag) {
        None => Ok(None),
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .map(Some)
            .ok_or_else(|| format!("{flag} needs a number")),
    }
}

fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let fetches: &[bool] = if args.iter().any(|a| a == "--no-fetch") {
        &[false]
    } else {
        &[false, true]
    };
    let mut config = LazyAdamConfig::default();
    let clipnorm = norm_arg(&args, "--clipnorm")?;
    let global_clipnorm = norm_arg(&args, "--global-clipnorm")?;
    if let Some(c) = clipnorm {
        config = config.with_clipnorm(c);
    }
    if let Some(c) = global_clipnorm {
        config = config.with_global_clipnorm(c);
    }
    config.validate()?;
    let reps = if quick { 5 } else { 40 };
    let table: std::collections::HashMap<String, Vec<u64>> = serde_json::from_str(IDS_JSON)?;
    let ids = table
        .get("sparse_1m_d64")
        .ok_or("no sparse_1m_d64 ids")?
        .clone();
    let grads: Vec<f32> = (0..ids.len() * DIM).map(|i| unit(i as u64)).collect();
    println!(
        "{{\"kind\":\"env\",\"threads\":{},\"reps\":{reps},\"ids\":{},\"rows\":{ROWS},\"dim\":{DIM},\
         \"clipnorm\":{},\"global_clipnorm\":{}}}",
        rayon::current_num_threads(),
        ids.len(),
        clipnorm.map_or("null".into(), |c| c.to_string()),
        global_clipnorm.map_or("null".into(), |c| c.to_string()),
    );
    for ranks in [1usize, 2, 4] {
        for &fetch in fetches {
            let gather = Arc::new(AtomicU64::new(0));
            let to_all = Arc::new(AtomicU64::new(0));
            let (ids, grads, config) = (&ids, &grads, &config);
            let times: Vec<Vec<f64>> = std::thread::scope(|s| {
                let joins: Vec<_> = ThreadCollective::group(ranks)
                    .into_iter()
                    .map(|c| {
                        let comm = Counting {
                            inner: c,
                            gather: Arc::clone(&gather),
                            to_all: Arc::clone(&to_all),
                        };
                        s.spawn(move || -> Result<Vec<f64>, lazyadam::Error> {
                            let r = comm.rank();
                            let mut opt = ShardedLazyAdam::new(config.clone(), comm)?;
                            let t = opt.add_table("emb", ROWS, DIM, DType::F32, DType::F32)?;
                            let n = ids.len();
                            let (a, b) = (n * r / ranks, n * (r + 1) / ranks);
                            let my_ids = &ids[a..b];
                            let my_grads = &grads[a * DIM..b * DIM];
                            let mut times = Vec::new();
                            for k in 0..=reps {
                                let t0 = Instant::now();
                                opt.step(&[ShardGradient::new(
                                    t,
                                    Gradient::sparse(my_ids, my_grads),
                                )])?;
                                if fetch {
                                    std::hint::black_box(opt.fetch_rows(t, my_ids)?);
                                }
                                if k > 0 {
                                    times.push(t0.elapsed().as_secs_f64() * 1e3);
                                }
                            }
                            Ok(times)
                        })
                    })
                    .collect();
                joins
                    .into_iter()
                    .map(|j| j.join().expect("rank thread").expect("rank"))
                    .collect()
            });
            let steps = (reps + 1) as f64;
            let per_rank = |c: &AtomicU64| c.load(Ordering::Relaxed) as f64 / steps / ranks as f64;
            // What the ids alone predict: each id not owned by its sender carries 8 bytes of
            // id and 4 x 64 of gradient (and, fetched, 8 bytes of request and 4 x 64 of row).
            let n = ids.len();
            let remote: usize = (0..ranks)
                .map(|r| {
                    let (a, b) = (n * r / ranks, n * (r + 1) / ranks);
                    ids[a..b]
                        .iter()
                        .filter(|&&id| lazyadam::shard::owner_of(id, ROWS, ranks) != r)
                        .count()
                })
                .sum();
            let per_id = (8 + 4 * DIM) * if fetch { 2 } else { 1 };
            let medians: Vec<f64> = times.into_iter().map(median).collect();
            println!(
                "{{\"kind\":\"shard_step\",\"ranks\":{ranks},\"fetch\":{fetch},\
                 \"median_ms_slowest_rank\":{:.4},\"all_gather_bytes_per_rank\":{:.0},\
                 \"all_to_all_bytes_per_rank\":{:.0},\"predicted_all_to_all_bytes_per_rank\":{:.0},\
                 \"remote_ids_per_rank\":{:.0}}}",
                medians.iter().copied().fold(0.0, f64::max),
                per_rank(&gather),
                per_rank(&to_all),
                (remote * per_id) as f64 / ranks as f64,
                remote as f64 / ranks as f64,
            );
        }
    }
    Ok(())
}
