//! Large sparse steps (8,192 to about 70,000 ids, now and then over a million) on pools of 2 to
//! 4 threads against the same steps on one thread: the parallel duplicate detection (bucket
//! boundaries at sampled quantiles, or equal row ranges above a million ids) and the parallel
//! row updates must give the one-thread run's bits exactly, and a step that errors must error on
//! both and change nothing on either.
//!
//! The ids are the point: they come in segments the input describes (one row repeated, strides
//! that wrap, uniform or crowded into a few rows, skewed towards the first rows, rows just
//! around the parallel build's bucket boundaries), of every id type, with out-of-range ids
//! (negative, one past the end, the type's maximum) at any position. The other inputs
//! (hyperparameters, storage types, clipping, the kernel path, the parallel threshold, the
//! non-finite policy with or without a tiny loss scale, NaN, infinities and huge finite values
//! in a gradient) are drawn too, so the comparison covers the parallel sums and clip factors and
//! the non-finite checks (split over the pool, and the exact check of duplicate rows' sums).
//! `sparse_step` checks the arithmetic itself against a model on small steps; this target
//! checks that thread count never changes it on large ones.
#![no_main]

use std::sync::OnceLock;

use arbitrary::{Result, Unstructured};
use lazyadam::{
    DType, DynamicLossScale, Gradient, LazyAdam, LazyAdamConfig, LearningRate, NonFinitePolicy,
    RowIds, Update, VarId, WeightTensor,
};
use libfuzzer_sys::fuzz_target;
use rayon::{ThreadPool, ThreadPoolBuilder};

mod common;
use common::{Store, choose, same_stores, same_weights};

/// Thread pools of 1, 2, 3 and 4 threads, built once (their threads never exit).
fn pools() -> &'static [ThreadPool] {
    static POOLS: OnceLock<Vec<ThreadPool>> = OnceLock::new();
    POOLS.get_or_init(|| {
        (1..=4)
            .map(|t| {
                ThreadPoolBuilder::new()
                    .num_threads(t)
                    .build()
                    .expect("a thread pool")
            })
            .collect()
    })
}

/// splitmix64: the pseudo-random stream the segments draw from (seeded by the input).
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// True one time in `d`; false when the input has run out.
fn one_in(u: &mut Unstructured<'_>, d: u8) -> Result<bool> {
    Ok(u.int_in_range(1..=d)? == d)
}

/// Appends `len` in-range ids (`< rows`) of one segment kind to `ids`.
fn segment(u: &mut Unstructured<'_>, rows: u64, len: usize, ids: &mut Vec<i128>) -> Result<()> {
    let mut s: u64 = u.arbitrary()?;
    let kind = if u.is_empty() {
        2
    } else {
        u.int_in_range(0u8..=5)?
    };
    match kind {
        // One row, again and again.
        0 => {
            let r = match u.int_in_range(0u8..=2)? {
                0 => 0,
                1 => rows - 1,
                _ => next(&mut s) % rows,
            };
            ids.extend((0..len).map(|_| r as i128));
        }
        // A stride that wraps around the table.
        1 => {
            let start = next(&mut s) % rows;
            let stride = u.int_in_range(0u64..=rows.min(1 << 20))?;
            ids.extend(
                (0..len as u64)
                    .map(|k| (start.wrapping_add(k.wrapping_mul(stride)) % rows) as i128),
            );
        }
        // Uniform over the table.
        2 => ids.extend((0..len).map(|_| (next(&mut s) % rows) as i128)),
        // Crowded into a few rows anywhere in the table.
        3 => {
            let w = u.int_in_range(1u64..=64)?.min(rows);
            let lo = next(&mut s) % (rows - w + 1);
            ids.extend((0..len).map(|_| (lo + next(&mut s) % w) as i128));
        }
        // Skewed towards the first rows (each halving of the range equally likely).
        4 => ids.extend((0..len).map(|_| {
            let x = next(&mut s);
            ((x % rows) >> (x >> 58)) as i128
        })),
        // Rows just around the multiples of rows / 256 (the equal ranges' edges) and of the
        // sampled boundaries' likely rows.
        _ => {
            let parts = choose(u, &[256u64, 16, 7, 3])?;
            let width = (rows / parts).max(1);
            ids.extend((0..len).map(|_| {
                let x = next(&mut s);
                let edge = (x % parts) * width;
                let r = (edge + (x >> 32) % 3).saturating_sub(1);
                r.min(rows - 1) as i128
            }))
        }
    }
    Ok(())
}

/// The step counter, the optimizer's weights and the parameters, compared by their bits
/// ([`State::same`]). Kept as the values themselves, not widened to bit vectors: building
/// those took most of this target's time on its main thread (a third of all its CPU time).
struct State {
    iterations: u64,
    weights: Vec<WeightTensor>,
    params: Vec<Store>,
}

impl State {
    /// Whether `self` and `other` hold the same bits everywhere (NaN payloads and the sign
    /// of zero included).
    fn same(&self, other: &State) -> bool {
        self.iterations == other.iterations
            && same_weights(&self.weights, &other.weights)
            && same_stores(&self.params, &other.params)
    }
}

/// One optimizer and its variables' parameters.
struct Run {
    opt: LazyAdam,
    vars: Vec<VarId>,
    params: Vec<Store>,
}

impl Run {
    fn state(&self) -> State {
        State {
            iterations: self.opt.iterations(),
            weights: self.opt.get_weights(),
            params: self.params.clone(),
        }
    }
}

/// The ids of one update as one id type (as `i64` when a value does not fit that type).
enum IdBuf {
    U32(Vec<u32>),
    U64(Vec<u64>),
    Usize(Vec<usize>),
    I32(Vec<i32>),
    I64(Vec<i64>),
}

impl IdBuf {
    fn new(ids: &[i128], ty: u8) -> Self {
        fn conv<T: TryFrom<i128>>(ids: &[i128]) -> Option<Vec<T>> {
            ids.iter().map(|&i| T::try_from(i).ok()).collect()
        }
        let typed = match ty {
            0 => conv(ids).map(IdBuf::U32),
            1 => conv(ids).map(IdBuf::U64),
            2 => conv(ids).map(IdBuf::Usize),
            3 => conv(ids).map(IdBuf::I32),
            _ => None,
        };
        typed.unwrap_or_else(|| IdBuf::I64(conv(ids).expect("the ids fit i64")))
    }
    fn get(&self) -> RowIds<'_> {
        match self {
            IdBuf::U32(v) => RowIds::from(&v[..]),
            IdBuf::U64(v) => RowIds::from(&v[..]),
            IdBuf::Usize(v) => RowIds::from(&v[..]),
            IdBuf::I32(v) => RowIds::from(&v[..]),
            IdBuf::I64(v) => RowIds::from(&v[..]),
        }
    }
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let clip: u8 = u.int_in_range(0..=3)?;
    let config = LazyAdamConfig {
        learning_rate: LearningRate::Constant(choose(u, &[1e-3, 0.1, 1.0])?),
        beta_1: choose(u, &[0.9, 0.0, 0.5])?,
        beta_2: choose(u, &[0.999, 0.9, 0.0])?,
        epsilon: choose(u, &[1e-7, 1e-3, 1e-30])?,
        amsgrad: one_in(u, 4)?,
        clipvalue: if clip == 1 { Some(0.5) } else { None },
        clipnorm: if clip == 2 { Some(1.0) } else { None },
        global_clipnorm: if clip == 3 { Some(1.0) } else { None },
        ..LazyAdamConfig::default()
    };
    let mut ext = common::policy_and_kernel(u, 2, &[1usize, 1024, 32_768])?;
    // Now and then SkipStep under a loss scale far below 1 (2^-100): large finite values then
    // unscale past f32::MAX, or their duplicate rows' sums do, and the exact check of those
    // sums runs, on one thread and on many alike.
    if matches!(ext.non_finite, NonFinitePolicy::SkipStep { .. }) && u.arbitrary()? {
        ext.non_finite = NonFinitePolicy::SkipStep {
            loss_scale: Some(DynamicLossScale {
                scale: 2f32.powi(-100),
                ..DynamicLossScale::default()
            }),
        };
    }
    let policy = ext.non_finite.clone();
    let threads = u.int_in_range(2usize..=4)?;
    // Above a million ids the parallel build takes equal row ranges: a rare, slow input.
    let big = one_in(u, 32)?;

    // One or two variables of up to 2^18 rows (or exactly 2^20), at most 2^20 elements.
    let nvars = u.int_in_range(1usize..=2)?;
    let mut shapes = Vec::new();
    for _ in 0..nvars {
        let rows: u64 = match u.int_in_range(0u8..=3)? {
            0 => choose(
                u,
                &[
                    1u64,
                    2,
                    3,
                    255,
                    256,
                    257,
                    4095,
                    4096,
                    4097,
                    1 << 16,
                    1 << 20,
                ],
            )?,
            _ => u.int_in_range(1u64..=1 << 18)?,
        };
        let row_len = if big {
            1
        } else {
            u.int_in_range(1usize..=4)?
                .min(((1u64 << 20) / rows).max(1) as usize)
        };
        let dtype = choose(u, &[DType::F32, DType::F32, DType::F16, DType::BF16])?;
        let moment = choose(u, &[DType::F32, DType::F32, DType::F16, DType::BF16])?;
        shapes.push((rows, row_len, dtype, moment));
    }
    // The initial parameters, in each variable's dtype (the same for both runs).
    let init: Vec<Store> = shapes
        .iter()
        .enumerate()
        .map(|(k, &(rows, row_len, dtype, _))| {
            let mut s = k as u64;
            let x: Vec<f32> = (0..rows as usize * row_len)
                .map(|_| (next(&mut s) >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
                .collect();
            Store::from_f32(dtype, &x)
        })
        .collect();
    let make = || -> Run {
        let mut opt =
            LazyAdam::with_extensions(config.clone(), ext.clone()).expect("a valid configuration");
        let vars = shapes
            .iter()
            .enumerate()
            .map(|(k, &(rows, row_len, dtype, moment))| {
                opt.add_variable(&format!("v{k}"), &[rows as usize, row_len], dtype, moment)
                    .expect("a valid variable")
            })
            .collect();
        Run {
            opt,
            vars,
            params: init.clone(),
        }
    };
    let pools = pools();
    let mut runs = [make(), make()];
    // The state before each step (both runs agree on it, or the previous step failed).
    let mut before = runs[0].state();
    let nsteps = u.int_in_range(1usize..=3)?;
    for _ in 0..nsteps {
        // The updates: ids, values and the id type of each variable.
        let mut updates_in = Vec::new();
        let mut expect_err = false;
        let mut non_finite = false;
        for &(rows, row_len, dtype, _) in &shapes {
            let n = if big {
                (1 << 20) + u.int_in_range(0usize..=4096)?
            } else {
                8192 + u.int_in_range(0usize..=61_440)?
            };
            let mut ids: Vec<i128> = Vec::with_capacity(n);
            while ids.len() < n {
                let left = n - ids.len();
                let len = if u.is_empty() {
                    left
                } else {
                    u.int_in_range(1usize..=left)?
                };
                segment(u, rows, len, &mut ids)?;
            }
            let id_type: u8 = u.int_in_range(0..=4)?;
            if one_in(u, 6)? {
                let pos = u.int_in_range(0..=n - 1)?;
                ids[pos] = choose(
                    u,
                    &[
                        -1,
                        rows as i128,
                        rows as i128 + 1,
                        u32::MAX as i128,
                        i64::MAX as i128,
                    ],
                )?;
                expect_err = true;
            }
            let mut s: u64 = u.arbitrary()?;
            let mut values: Vec<f32> = (0..n * row_len)
                .map(|_| (next(&mut s) >> 40) as f32 / (1u64 << 22) as f32 - 2.0)
                .collect();
            if one_in(u, 8)? {
                // One bad value, or the same element of up to 8 consecutive ids (which often
                // share a row): NaN, infinities, or finite values whose unscaled values (or
                // their sums) overflow under the loss scale above, or whose sums do anyway.
                let pos = u.int_in_range(0..=values.len() - 1)?;
                let bad = choose(u, &[f32::NAN, f32::INFINITY, -f32::INFINITY, 1e8, -3e38])?;
                let count = u.int_in_range(1usize..=8)?;
                for x in values[pos..].iter_mut().step_by(row_len).take(count) {
                    *x = bad;
                }
                non_finite |= !bad.is_finite();
            }
            updates_in.push((IdBuf::new(&ids, id_type), Store::from_f32(dtype, &values)));
        }
        if non_finite && matches!(policy, NonFinitePolicy::Error) {
            expect_err = true;
        }

        let mut results = Vec::new();
        for (r, run) in runs.iter_mut().enumerate() {
            let pool = &pools[if r == 0 { 0 } else { threads - 1 }];
            let Run { opt, vars, params } = run;
            let mut updates: Vec<Update<'_>> = vars
                .iter()
                .zip(params.iter_mut())
                .zip(&updates_in)
                .map(|((&var, p), (ids, values))| {
                    Update::new(
                        var,
                        p.as_mut(),
                        Gradient::sparse(ids.get(), values.as_ref()),
                    )
                })
                .collect();
            results.push(pool.install(|| opt.apply_gradients(&mut updates)));
        }
        assert_eq!(
            format!("{:?}", results[0]),
            format!("{:?}", results[1]),
            "1 thread and {threads} threads disagree on the outcome"
        );
        let (one, many) = (runs[0].state(), runs[1].state());
        assert!(
            one.same(&many),
            "1 thread and {threads} threads disagree on the state"
        );
        if expect_err {
            assert!(results[0].is_err(), "accepted a bad step: {:?}", results[0]);
        }
        if results[0].is_err() {
            assert!(one.same(&before), "an erroring step changed the state");
        }
        before = one;
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let _ = run(&mut u);
});
