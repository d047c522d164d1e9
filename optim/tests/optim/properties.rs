//! Property tests of the step semantics (proptest).

use lazyadam::{DType, Error, Extensions, Gradient, Isa, LazyAdam, LazyAdamConfig, Update, VarId};
use proptest::prelude::*;

fn f32_bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn slot_bits(opt: &LazyAdam, id: VarId) -> (Vec<u32>, Vec<u32>) {
    let s = opt.slots(id).unwrap();
    (f32_bits(&s.m.to_f32_vec()), f32_bits(&s.v.to_f32_vec()))
}

fn opt_with(config: LazyAdamConfig, ext: Extensions, rows: usize, rl: usize) -> (LazyAdam, VarId) {
    let mut opt = LazyAdam::with_extensions(config, ext).unwrap();
    let id = opt
        .add_variable("table", &[rows, rl], DType::F32, DType::F32)
        .unwrap();
    (opt, id)
}

/// A table shape, initial values and a few gradient value sets.
fn table() -> impl Strategy<Value = (usize, usize, Vec<f32>)> {
    (1usize..12, 1usize..9).prop_flat_map(|(rows, rl)| {
        (
            Just(rows),
            Just(rl),
            prop::collection::vec(-2.0f32..2.0, rows * rl),
        )
    })
}

fn config_strategy() -> impl Strategy<Value = LazyAdamConfig> {
    (
        prop::sample::select(vec![0.001f32, 0.01, 0.1, 0.5]),
        prop::sample::select(vec![0.0f32, 0.5, 0.9]),
        prop::sample::select(vec![0.5f32, 0.99, 0.999]),
        prop::sample::select(vec![1e-7f32, 1e-3, 1.0]),
        prop::option::of(prop::sample::select(vec![0.1f32, 0.5, 1.5])),
        prop::sample::select(vec![0.0f32, 0.25]),
    )
        .prop_map(|(lr, b1, b2, eps, clipvalue, decay)| LazyAdamConfig {
            learning_rate: lr.into(),
            beta_1: b1,
            beta_2: b2,
            epsilon: eps,
            clipvalue,
            decay,
            ..LazyAdamConfig::default()
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// A sparse step with every row present once (in any order) equals the
    /// dense step on the same values, bit for bit.
    #[test]
    fn sparse_with_all_rows_equals_dense(
        (rows, rl, init) in table(),
        config in config_strategy(),
        seed in any::<u64>(),
        steps in 1usize..4,
    ) {
        let (mut dense_opt, d) = opt_with(config.clone(), Extensions::default(), rows, rl);
        let (mut sparse_opt, s) = opt_with(config, Extensions::default(), rows, rl);
        let mut pd = init.clone();
        let mut ps = init;
        let mut rng = seed;
        for step in 0..steps {
            let grad: Vec<f32> = (0..rows * rl)
                .map(|i| ((i * 31 + step * 7) as f32 * 0.37).sin() * 1.5)
                .collect();
            // A permutation of the rows.
            let mut order: Vec<usize> = (0..rows).collect();
            for i in (1..rows).rev() {
                rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                order.swap(i, (rng >> 33) as usize % (i + 1));
            }
            let values: Vec<f32> = order
                .iter()
                .flat_map(|&r| grad[r * rl..(r + 1) * rl].iter().copied())
                .collect();
            dense_opt
                .apply_gradients(&mut [Update::new(d, &mut pd, Gradient::dense(&grad))])
                .unwrap();
            sparse_opt
                .apply_gradients(&mut [Update::new(s, &mut ps, Gradient::sparse(&order, &values))])
                .unwrap();
        }
        prop_assert_eq!(f32_bits(&pd), f32_bits(&ps));
        prop_assert_eq!(slot_bits(&dense_opt, d), slot_bits(&sparse_opt, s));
    }

    /// Duplicate ids equal their pre-summed single id (sums in f32, in
    /// first-occurrence order; no norm clipping).
    #[test]
    fn duplicates_equal_presummed(
        (rows, rl, init) in table(),
        config in config_strategy(),
        ids in prop::collection::vec(0usize..64, 0..24),
        vals in prop::collection::vec(-3.0f32..3.0, 24 * 8),
    ) {
        let ids: Vec<usize> = ids.iter().map(|&i| i % rows).collect();
        let values = &vals[..ids.len() * rl];
        // Pre-sum in first-occurrence order.
        let mut uniq: Vec<usize> = Vec::new();
        let mut sums: Vec<Vec<f32>> = Vec::new();
        for (k, &r) in ids.iter().enumerate() {
            let row = &values[k * rl..(k + 1) * rl];
            // The reference sums clipped values; clipvalue is elementwise, so
            // clip here too.
            let clip = |x: f32| match config.clipvalue {
                Some(c) => if x > c { c } else if x < -c { -c } else { x },
                None => x,
            };
            match uniq.iter().position(|&u| u == r) {
                Some(j) => sums[j].iter_mut().zip(row).for_each(|(s, &x)| *s += clip(x)),
                None => {
                    uniq.push(r);
                    sums.push(row.iter().map(|&x| clip(x)).collect());
                }
            }
        }
        let summed: Vec<f32> = sums.concat();
        let mut pre_config = config.clone();
        pre_config.clipvalue = None;
        let (mut a, ia) = opt_with(config, Extensions::default(), rows, rl);
        let (mut b, ib) = opt_with(pre_config, Extensions::default(), rows, rl);
        let mut pa = init.clone();
        let mut pb = init;
        a.apply_gradients(&mut [Update::new(ia, &mut pa, Gradient::sparse(&ids, values))]).unwrap();
        b.apply_gradients(&mut [Update::new(ib, &mut pb, Gradient::sparse(&uniq, &summed))]).unwrap();
        prop_assert_eq!(f32_bits(&pa), f32_bits(&pb));
        prop_assert_eq!(slot_bits(&a, ia), slot_bits(&b, ib));
    }

    /// Rows not in a step keep their exact bits, slots included.
    #[test]
    fn untouched_rows_keep_their_bits(
        (rows, rl, init) in table(),
        config in config_strategy(),
        first in prop::collection::vec(0usize..64, 1..12),
        second in prop::collection::vec(0usize..64, 0..12),
    ) {
        let (mut opt, id) = opt_with(config, Extensions::default(), rows, rl);
        let mut p = init;
        for ids in [&first, &second] {
            let ids: Vec<usize> = ids.iter().map(|&i| i % rows).collect();
            let values: Vec<f32> = (0..ids.len() * rl).map(|i| (i as f32 * 0.61).cos()).collect();
            let before_p = p.clone();
            let (before_m, before_v) = slot_bits(&opt, id);
            opt.apply_gradients(&mut [Update::new(id, &mut p, Gradient::sparse(&ids, &values))]).unwrap();
            let (after_m, after_v) = slot_bits(&opt, id);
            for r in (0..rows).filter(|r| !ids.contains(r)) {
                let span = r * rl..(r + 1) * rl;
                prop_assert_eq!(f32_bits(&before_p[span.clone()]), f32_bits(&p[span.clone()]));
                prop_assert_eq!(&before_m[span.clone()], &after_m[span.clone()]);
                prop_assert_eq!(&before_v[span.clone()], &after_v[span]);
            }
        }
    }

    /// A step with a bad id in its last update changes nothing.
    #[test]
    fn failed_step_changes_nothing(
        (rows, rl, init) in table(),
        config in config_strategy(),
        good in prop::collection::vec(0usize..64, 1..12),
        bad_at in 0usize..4,
        negative in any::<bool>(),
    ) {
        let mut opt = LazyAdam::new(config).unwrap();
        let a = opt.add_variable("a", &[rows, rl], DType::F32, DType::F32).unwrap();
        let b = opt.add_variable("b", &[rows, rl], DType::F32, DType::F32).unwrap();
        let mut pa = init.clone();
        let mut pb = init.clone();
        // One good step first, so the slots are not all zero.
        let ids: Vec<i64> = good.iter().map(|&i| (i % rows) as i64).collect();
        let values: Vec<f32> = (0..ids.len() * rl).map(|i| (i as f32 * 0.3).sin()).collect();
        opt.apply_gradients(&mut [
            Update::new(a, &mut pa, Gradient::sparse(&ids, &values)),
            Update::new(b, &mut pb, Gradient::dense(&init)),
        ]).unwrap();
        let snapshot = (pa.clone(), pb.clone(), opt.get_weights(), opt.iterations());
        let mut bad_ids = ids.clone();
        let pos = bad_at % bad_ids.len();
        bad_ids[pos] = if negative { -3 } else { rows as i64 + 2 };
        let err = opt.apply_gradients(&mut [
            Update::new(a, &mut pa, Gradient::dense(&init)),
            Update::new(b, &mut pb, Gradient::sparse(&bad_ids, &values)),
        ]).unwrap_err();
        match err {
            Error::NegativeRowId { variable, id } => {
                prop_assert!(negative);
                prop_assert_eq!(variable, "b");
                prop_assert_eq!(id, -3);
            }
            Error::RowIdOutOfRange { variable, id, rows: r } => {
                prop_assert!(!negative);
                prop_assert_eq!(variable, "b");
                prop_assert_eq!(id, rows as u64 + 2);
                prop_assert_eq!(r, rows);
            }
            other => prop_assert!(false, "unexpected error {other:?}"),
        }
        prop_assert_eq!(f32_bits(&snapshot.0), f32_bits(&pa));
        prop_assert_eq!(f32_bits(&snapshot.1), f32_bits(&pb));
        prop_assert_eq!(&snapshot.2, &opt.get_weights());
        prop_assert_eq!(snapshot.3, opt.iterations());
    }

    /// One thread and many threads give identical bits (sparse and dense, with
    /// the parallel paths forced on).
    #[test]
    fn thread_count_does_not_change_bits(
        rows in 1usize..300,
        rl in prop::sample::select(vec![1usize, 3, 16, 64, 100]),
        ids in prop::collection::vec(0usize..10_000, 0..400),
        clipnorm in prop::option::of(0.5f32..4.0),
    ) {
        let ids: Vec<u32> = ids.iter().map(|&i| (i % rows) as u32).collect();
        let values: Vec<f32> = (0..ids.len() * rl).map(|i| ((i * 13) as f32 * 0.01).sin()).collect();
        let dense: Vec<f32> = (0..rows * rl).map(|i| ((i * 7) as f32 * 0.02).cos()).collect();
        let run = |threads: usize| {
            crate::on_threads(threads, || {
                let config = LazyAdamConfig { clipnorm, ..LazyAdamConfig::default() };
                let ext = Extensions { parallel_min_elements: 1, ..Extensions::default() };
                let mut opt = LazyAdam::with_extensions(config, ext).unwrap();
                let s = opt.add_variable("s", &[rows, rl], DType::F32, DType::F32).unwrap();
                let d = opt.add_variable("d", &[rows, rl], DType::F32, DType::BF16).unwrap();
                let mut ps = vec![0.5f32; rows * rl];
                let mut pd = vec![0.25f32; rows * rl];
                for _ in 0..3 {
                    opt.apply_gradients(&mut [
                        Update::new(s, &mut ps, Gradient::sparse(&ids, &values)),
                        Update::new(d, &mut pd, Gradient::dense(&dense)),
                    ]).unwrap();
                }
                (f32_bits(&ps), f32_bits(&pd), opt.get_weights())
            })
        };
        let one = run(1);
        prop_assert_eq!(&one, &run(2));
        prop_assert_eq!(&one, &run(4));
    }

    /// Every supported kernel path gives identical results.
    #[test]
    fn every_isa_gives_identical_results(
        (rows, rl, init) in table(),
        config in config_strategy(),
        ids in prop::collection::vec(0usize..64, 0..20),
    ) {
        let ids: Vec<usize> = ids.iter().map(|&i| i % rows).collect();
        let values: Vec<f32> = (0..ids.len() * rl).map(|i| (i as f32 * 0.77).sin() * 2.0).collect();
        let run = |isa: Isa| {
            let ext = Extensions { kernel: Some(isa), ..Extensions::default() };
            let (mut opt, id) = opt_with(config.clone(), ext, rows, rl);
            let mut p = init.clone();
            for _ in 0..2 {
                opt.apply_gradients(&mut [Update::new(id, &mut p, Gradient::sparse(&ids, &values))]).unwrap();
                opt.apply_gradients(&mut [Update::new(id, &mut p, Gradient::dense(&init))]).unwrap();
            }
            (f32_bits(&p), opt.get_weights())
        };
        let reference = run(Isa::Scalar);
        for isa in Isa::supported() {
            prop_assert_eq!(&reference, &run(isa), "{:?}", isa);
        }
    }

    /// Config JSON round-trips.
    #[test]
    fn config_json_round_trip(
        mut config in config_strategy(),
        amsgrad in any::<bool>(),
        clipnorm in prop::option::of(0.0f32..10.0),
        name in "[A-Za-z_]{1,12}",
    ) {
        config.amsgrad = amsgrad;
        config.clipnorm = clipnorm;
        config.name = name;
        let json = config.to_keras_json().unwrap();
        prop_assert_eq!(LazyAdamConfig::from_keras_json(&json).unwrap(), config);
    }

    /// A checkpoint restores bit-exact state, and both optimizers continue
    /// identically.
    #[test]
    fn checkpoint_round_trip_continues_identically(
        (rows, rl, init) in table(),
        config in config_strategy(),
        amsgrad in any::<bool>(),
        per_row in any::<bool>(),
        catch_up in any::<bool>(),
        ids in prop::collection::vec(0usize..64, 1..20),
    ) {
        let config = LazyAdamConfig { amsgrad, ..config };
        let ext = Extensions {
            per_row_bias_correction: per_row,
            catch_up_decay: catch_up,
            sparse_amsgrad: amsgrad,
            ..Extensions::default()
        };
        let ids: Vec<usize> = ids.iter().map(|&i| i % rows).collect();
        let values: Vec<f32> = (0..ids.len() * rl).map(|i| (i as f32 * 0.5).sin()).collect();
        let mut a = LazyAdam::with_extensions(config, ext).unwrap();
        let t = a.add_variable("t", &[rows, rl], DType::F32, DType::F16).unwrap();
        let mut pa = init;
        a.apply_gradients(&mut [Update::new(t, &mut pa, Gradient::sparse(&ids, &values))]).unwrap();
        a.apply_gradients(&mut [Update::new(t, &mut pa, Gradient::sparse(&ids[..1], &values[..rl]))]).unwrap();
        let bytes = a.to_bytes().unwrap();
        let mut b = LazyAdam::from_bytes(&bytes).unwrap();
        prop_assert_eq!(a.get_weights(), b.get_weights());
        prop_assert_eq!(a.config(), b.config());
        prop_assert_eq!(a.extensions(), b.extensions());
        // A loaded optimizer issues its own handles: look the variable up by name.
        let tb = b.variable_id("t").unwrap();
        prop_assert!(b.variable(t).is_none());
        prop_assert_eq!(a.variable(t), b.variable(tb));
        let mut pb = pa.clone();
        for _ in 0..2 {
            a.apply_gradients(&mut [Update::new(t, &mut pa, Gradient::sparse(&ids, &values))]).unwrap();
            b.apply_gradients(&mut [Update::new(tb, &mut pb, Gradient::sparse(&ids, &values))]).unwrap();
        }
        prop_assert_eq!(f32_bits(&pa), f32_bits(&pb));
        prop_assert_eq!(a.get_weights(), b.get_weights());
        prop_assert_eq!(bytes.len(), b.to_bytes().unwrap().len());
    }

    /// Corrupt checkpoints are errors, never panics: truncation always fails,
    /// flipped bytes fail or load something consistent.
    #[test]
    fn corrupt_checkpoints_are_errors(cut in 0usize..10_000, flips in prop::collection::vec((0usize..10_000, 1u8..=255), 1..4)) {
        let mut opt = LazyAdam::new(LazyAdamConfig::default()).unwrap();
        let t = opt.add_variable("t", &[5, 3], DType::F32, DType::F32).unwrap();
        let mut p = vec![1.0f32; 15];
        opt.apply_gradients(&mut [Update::new(t, &mut p, Gradient::sparse(&[1u32, 4], &[0.5f32; 6]))]).unwrap();
        let bytes = opt.to_bytes().unwrap();
        let cut = cut % bytes.len();
        prop_assert!(LazyAdam::from_bytes(&bytes[..cut]).is_err());
        let mut bad = bytes.clone();
        for (pos, x) in flips {
            let pos = pos % bad.len();
            bad[pos] ^= x;
        }
        if let Ok(loaded) = LazyAdam::from_bytes(&bad) {
            // Whatever loaded must be usable.
            if let Some(id) = loaded.variable_id("t") {
                let info = loaded.variable(id).unwrap().clone();
                prop_assert_eq!(loaded.slots(id).unwrap().m.len(), info.numel());
            }
        }
    }
}

/// Dense variables: the parallel dense path splits large ones into leaves of at least 2^16
/// elements (each takes the kernels' out-of-cache loop) and smaller ones into leaves of at
/// least 8,192, at any thread count with the bits of one thread; an odd length leaves leaves
/// of unequal sizes. With 16-bit parameters and stochastic rounding every leaf must also
/// round with its elements' own indices. Either loop of long rows (`LongRowLoop`, chosen per
/// CPU) gives those bits too, bf16 included.
#[test]
fn dense_variables_give_identical_bits_for_any_thread_count() {
    use lazyadam::kernels::LongRowLoop;
    use lazyadam::{Element, TensorMut, TensorRef, bf16, f16};
    fn run_with<P: Element>(
        n: usize,
        moment: DType,
        sr: Option<u64>,
        threads: usize,
        long_rows: LongRowLoop,
    ) -> Vec<u32>
    where
        for<'a> &'a mut [P]: Into<TensorMut<'a>>,
        for<'a> &'a [P]: Into<TensorRef<'a>>,
    {
        crate::on_threads(threads, || {
            let ext = Extensions::default()
                .with_stochastic_rounding(sr)
                .with_long_row_loop(long_rows);
            let mut opt = LazyAdam::with_extensions(LazyAdamConfig::default(), ext).unwrap();
            let t = opt.add_variable("w", &[n], P::DTYPE, moment).unwrap();
            let mut p: Vec<P> = (0..n)
                .map(|i| P::from_f32(((i * 7) as f32 * 0.001).cos()))
                .collect();
            let g: Vec<P> = (0..n)
                .map(|i| P::from_f32(((i * 13) as f32 * 0.002).sin() * 1e-2))
                .collect();
            for _ in 0..2 {
                opt.apply_gradients(&mut [Update::new(t, &mut p[..], Gradient::dense(&g[..]))])
                    .unwrap();
            }
            let s = opt.slots(t).unwrap();
            let mut bits: Vec<u32> = p.iter().map(|x| x.to_f32().to_bits()).collect();
            bits.extend(f32_bits(&s.m.to_f32_vec()));
            bits.extend(f32_bits(&s.v.to_f32_vec()));
            bits
        })
    }
    fn run<P: Element>(n: usize, moment: DType, sr: Option<u64>, threads: usize) -> Vec<u32>
    where
        for<'a> &'a mut [P]: Into<TensorMut<'a>>,
        for<'a> &'a [P]: Into<TensorRef<'a>>,
    {
        run_with::<P>(n, moment, sr, threads, LongRowLoop::Auto)
    }
    // Under 2^17 elements the leaves stay small (at most 8,192), so that an in-cache
    // variable still uses every thread.
    let n = 50_001;
    let one = run::<f16>(n, DType::F32, Some(3), 1);
    assert_eq!(one, run::<f16>(n, DType::F32, Some(3), 2), "50,001 f16");
    let n = (1 << 18) + 4097;
    let one = run::<f32>(n, DType::F32, None, 1);
    assert_eq!(one, run::<f32>(n, DType::F32, None, 2), "f32");
    assert_eq!(one, run::<f32>(n, DType::F32, None, 3), "f32, 3 threads");
    let one = run::<f16>(n, DType::F16, Some(11), 1);
    assert_eq!(
        one,
        run::<f16>(n, DType::F16, Some(11), 2),
        "f16 with rounding"
    );
    assert_eq!(
        one,
        run::<f16>(n, DType::F16, Some(11), 3),
        "f16 with rounding, 3 threads"
    );
    let one = run::<bf16>(n, DType::F32, Some(5), 1);
    assert_eq!(
        one,
        run::<bf16>(n, DType::F32, Some(5), 2),
        "bf16 with rounding"
    );
    for l in [LongRowLoop::OnePass, LongRowLoop::Split] {
        for threads in [1, 2] {
            let f32_one = run::<f32>(n, DType::F32, None, 1);
            let got = run_with::<f32>(n, DType::F32, None, threads, l);
            assert_eq!(f32_one, got, "f32, {l:?}, {threads} threads");
            let f16_one = run::<f16>(n, DType::F16, Some(11), 1);
            let got = run_with::<f16>(n, DType::F16, Some(11), threads, l);
            assert_eq!(f16_one, got, "f16 with rounding, {l:?}, {threads} threads");
            let bf16_one = run::<bf16>(n, DType::BF16, Some(5), 1);
            let got = run_with::<bf16>(n, DType::BF16, Some(5), threads, l);
            assert_eq!(
                bf16_one, got,
                "all bf16 with rounding, {l:?}, {threads} threads"
            );
        }
    }
}

/// Large tables: the parallel row path splits at row-range boundaries
/// (including the case where every row falls in one range).
#[test]
fn large_tables_give_identical_bits_for_any_thread_count() {
    for (rows, spread) in [
        (100_000usize, 100_000usize),
        (1_000_000, 400),
        (5_000, 5_000),
    ] {
        let rl = 4;
        let mut state = 7u64;
        let ids: Vec<u64> = (0..6000)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = ((state >> 11) as f64) / ((1u64 << 53) as f64);
                // Skewed: many small ids, some large ones.
                ((u * u * u * spread as f64) as u64).min(rows as u64 - 1)
            })
            .collect();
        let values: Vec<f32> = (0..ids.len() * rl)
            .map(|i| ((i * 17) as f32 * 0.003).sin())
            .collect();
        let run = |threads: usize| {
            crate::on_threads(threads, || {
                let ext = Extensions {
                    parallel_min_elements: 1,
                    ..Extensions::default()
                };
                let config = LazyAdamConfig {
                    clipvalue: Some(0.5),
                    ..LazyAdamConfig::default()
                };
                let mut opt = LazyAdam::with_extensions(config, ext).unwrap();
                let t = opt
                    .add_variable("t", &[rows, rl], DType::F32, DType::F32)
                    .unwrap();
                let mut p = vec![0.125f32; rows * rl];
                for _ in 0..2 {
                    opt.apply_gradients(&mut [Update::new(
                        t,
                        &mut p,
                        Gradient::sparse(&ids, &values),
                    )])
                    .unwrap();
                }
                let s = opt.slots(t).unwrap();
                (
                    f32_bits(&p),
                    f32_bits(&s.m.to_f32_vec()),
                    f32_bits(&s.v.to_f32_vec()),
                )
            })
        };
        let one = run(1);
        assert_eq!(one, run(2), "rows {rows}");
        assert_eq!(one, run(3), "rows {rows}");
    }
}

/// Duplicated rows are summed inline for f32 gradients without a transform,
/// and by the kernels otherwise: a `clipvalue` that clips nothing takes the
/// kernel path and must give the same bits, on every kernel path. Also
/// checks the huge-page-advised slots of a large table (same results).
#[test]
fn inline_and_kernel_duplicate_sums_agree() {
    let (rows, rl) = (300_000usize, 8usize);
    let mut state = 11u64;
    let ids: Vec<u32> = (0..5000)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = ((state >> 11) as f64) / ((1u64 << 53) as f64);
            ((u * u * u * 2000.0) as u32 * 149) % rows as u32
        })
        .collect();
    let values: Vec<f32> = (0..ids.len() * rl)
        .map(|i| ((i * 31) as f32 * 0.0071).sin() * 3.0)
        .collect();
    let run = |clipvalue: Option<f32>, isa: Isa| {
        let config = LazyAdamConfig {
            clipvalue,
            ..LazyAdamConfig::default()
        };
        let ext = Extensions {
            kernel: Some(isa),
            ..Extensions::default()
        };
        let (mut opt, t) = opt_with(config, ext, rows, rl);
        let mut p = vec![0.25f32; rows * rl];
        lazyadam::advise_huge_pages(&p);
        for _ in 0..2 {
            opt.apply_gradients(&mut [Update::new(t, &mut p, Gradient::sparse(&ids, &values))])
                .unwrap();
        }
        (f32_bits(&p), slot_bits(&opt, t))
    };
    let reference = run(None, Isa::Scalar);
    for isa in Isa::supported() {
        assert_eq!(reference, run(None, isa), "{isa:?}");
        assert_eq!(reference, run(Some(f32::MAX), isa), "{isa:?} clipvalue");
    }
}

/// The row paths of a sparse step (hashed or sorted duplicate detection, each
/// sequential or parallel; picked by the thread count and
/// `parallel_min_elements`) give identical bits, with and without the
/// per-row extensions, for f32 and 16-bit storage.
mod row_paths {
    use super::*;
    use lazyadam::f16;

    /// The `parallel_min_elements` values that select each path for a step of
    /// `n` ids (`distinct` distinct) of rows of `rl`: every path reachable for
    /// this step, with its name.
    fn thresholds(n: usize, distinct: usize, rl: usize) -> Vec<(&'static str, usize, usize)> {
        let (elems, updated) = (n * rl, distinct * rl);
        // (name, threads, parallel_min_elements)
        let mut v = vec![
            (
                "hashed, one thread",
                1,
                lazyadam::DEFAULT_PARALLEL_MIN_ELEMENTS,
            ),
            ("hashed, sequential", 2, usize::MAX / 8),
            ("sorted, parallel", 2, 1),
        ];
        // Hashed (elems < 4 pm) and parallel (updated >= pm).
        let pm = elems / 4 + 1;
        if updated >= pm {
            v.push(("hashed, parallel", 2, pm));
        }
        // Sorted (elems >= 4 pm) and sequential (updated < pm).
        let pm = updated + 1;
        if elems >= 4 * pm {
            v.push(("sorted, sequential", 2, pm));
        }
        v
    }

    #[derive(Clone, Copy, Debug)]
    enum Variant {
        Plain,
        ClipValue,
        PerRowBias,
        SparseAmsgrad,
        CatchUp,
        Stochastic,
    }

    fn setup(variant: Variant, pm: usize) -> (LazyAdamConfig, Extensions) {
        let mut config = LazyAdamConfig::default();
        let mut ext = Extensions {
            parallel_min_elements: pm,
            ..Extensions::default()
        };
        match variant {
            Variant::Plain => {}
            Variant::ClipValue => config.clipvalue = Some(0.3),
            Variant::PerRowBias => ext.per_row_bias_correction = true,
            Variant::SparseAmsgrad => {
                config.amsgrad = true;
                ext.sparse_amsgrad = true;
            }
            Variant::CatchUp => ext.catch_up_decay = true,
            Variant::Stochastic => ext.stochastic_rounding = Some(99),
        }
        (config, ext)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        #[test]
        fn every_row_path_gives_identical_bits(
            rows in 1usize..200,
            rl in prop::sample::select(vec![1usize, 3, 16, 40]),
            // Few distinct values: duplicates, so that both "sorted, sequential"
            // and "hashed, parallel" come up across cases.
            spread in 1usize..400,
            n in 0usize..300,
            variant in prop::sample::select(vec![
                Variant::Plain, Variant::ClipValue, Variant::PerRowBias,
                Variant::SparseAmsgrad, Variant::CatchUp, Variant::Stochastic,
            ]),
            seed in any::<u64>(),
        ) {
            let mut state = seed | 1;
            let mut next = || {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state
            };
            // Steps with different ids, so that rows go untouched for a while.
            let steps: Vec<Vec<u64>> = (0..3)
                .map(|_| (0..n).map(|_| (next() % spread as u64) % rows as u64).collect())
                .collect();
            let values: Vec<f32> = (0..n * rl).map(|i| ((i * 13) as f32 * 0.011).sin() * 2.0).collect();
            let mut distinct = steps[0].clone();
            distinct.sort_unstable();
            distinct.dedup();
            let run = |threads: usize, pm: usize| {
                crate::on_threads(threads, || {
                    let (config, ext) = setup(variant, pm);
                    let mut opt = LazyAdam::with_extensions(config, ext).unwrap();
                    let a = opt.add_variable("a", &[rows, rl], DType::F32, DType::F32).unwrap();
                    let b = opt.add_variable("b", &[rows, rl], DType::F16, DType::BF16).unwrap();
                    let mut pa = vec![0.5f32; rows * rl];
                    let mut pb = vec![f16::from_f32(-0.25); rows * rl];
                    let vb: Vec<f16> = values.iter().map(|&x| f16::from_f32(x)).collect();
                    for ids in &steps {
                        opt.apply_gradients(&mut [
                            Update::new(a, &mut pa, Gradient::sparse(ids, &values)),
                            Update::new(b, &mut pb, Gradient::sparse(ids, &vb)),
                        ]).unwrap();
                    }
                    let pb: Vec<f32> = pb.iter().map(|x| x.to_f32()).collect();
                    (f32_bits(&pa), f32_bits(&pb), opt.get_weights())
                })
            };
            let paths = thresholds(n, distinct.len(), rl);
            let (name0, t0, pm0) = paths[0];
            let want = run(t0, pm0);
            for &(name, threads, pm) in &paths[1..] {
                prop_assert!(run(threads, pm) == want, "{:?}: {} differs from {}", variant, name, name0);
            }
        }
    }
}

/// A one-thread step of more than 2^20 gradient elements takes the sorted
/// (radix) path sequentially; it must give the bits of the hashed path and of
/// the sorted parallel path.
#[test]
fn huge_one_thread_steps_agree_with_the_other_paths() {
    let (rows, rl, n) = (30_000usize, 64usize, 20_000usize);
    assert!(n * rl > 1 << 20);
    let mut state = 3u64;
    let ids: Vec<u32> = (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = ((state >> 11) as f64) / ((1u64 << 53) as f64);
            ((u * u * rows as f64) as u32).min(rows as u32 - 1)
        })
        .collect();
    let values: Vec<f32> = (0..n * rl)
        .map(|i| ((i * 29) as f32 * 0.0013).sin())
        .collect();
    let run = |threads: usize, pm: usize| {
        crate::on_threads(threads, || {
            let ext = Extensions {
                parallel_min_elements: pm,
                ..Extensions::default()
            };
            let (mut opt, t) = opt_with(LazyAdamConfig::default(), ext, rows, rl);
            let mut p = vec![0.5f32; rows * rl];
            for _ in 0..2 {
                opt.apply_gradients(&mut [Update::new(t, &mut p, Gradient::sparse(&ids, &values))])
                    .unwrap();
            }
            (f32_bits(&p), slot_bits(&opt, t))
        })
    };
    let sorted_sequential = run(1, lazyadam::DEFAULT_PARALLEL_MIN_ELEMENTS);
    assert!(sorted_sequential == run(2, 1), "sorted, parallel");
    assert!(
        sorted_sequential == run(2, usize::MAX / 8),
        "hashed, sequential"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// The non-finite check does not change a finite step's bits when a
    /// clipping norm is on (the check's pass then also sums the squares the
    /// norm needs): Propagate, Error and SkipStep give the same parameters and
    /// slots; so does SkipStep with a loss scale of 2^k on gradients scaled by
    /// 2^k (exactly), whose unscaled values are the same. Sparse f32 and dense
    /// f16 gradients in one step, on one and two threads, with the parallel
    /// passes forced on.
    #[test]
    fn the_non_finite_check_leaves_clipped_steps_alone(
        rows in 1usize..40,
        rl in prop::sample::select(vec![1usize, 3, 16]),
        ids in prop::collection::vec(0usize..10_000, 0..80),
        norm in prop::sample::select(vec![0.05f32, 0.5, 4.0, 1e4]),
        global in any::<bool>(),
        clipvalue in prop::option::of(prop::sample::select(vec![0.01f32, 0.3])),
        k in 0i32..12,
        threads in prop::sample::select(vec![1usize, 2]),
    ) {
        use lazyadam::{DynamicLossScale, NonFinitePolicy, f16};
        let ids: Vec<u32> = ids.iter().map(|&i| (i % rows) as u32).collect();
        let values: Vec<f32> =
            (0..ids.len() * rl).map(|i| ((i * 13) as f32 * 0.01).sin() * 3.0).collect();
        let dense: Vec<f32> = (0..rows * rl).map(|i| ((i * 7) as f32 * 0.02).cos()).collect();
        let config = LazyAdamConfig {
            clipnorm: (!global).then_some(norm),
            global_clipnorm: global.then_some(norm),
            clipvalue,
            ..LazyAdamConfig::default()
        };
        let run = |policy: NonFinitePolicy, scale: f32| {
            crate::on_threads(threads, || {
                let ext = Extensions {
                    parallel_min_elements: 1,
                    non_finite: policy,
                    ..Extensions::default()
                };
                let mut opt = LazyAdam::with_extensions(config.clone(), ext).unwrap();
                let s = opt.add_variable("s", &[rows, rl], DType::F32, DType::F32).unwrap();
                let d = opt.add_variable("d", &[rows, rl], DType::F32, DType::BF16).unwrap();
                let sv: Vec<f32> = values.iter().map(|x| x * scale).collect();
                let dv: Vec<f16> = dense.iter().map(|x| f16::from_f32(x * scale)).collect();
                let mut ps = vec![0.5f32; rows * rl];
                let mut pd = vec![0.25f32; rows * rl];
                for _ in 0..3 {
                    let outcome = opt.apply_gradients(&mut [
                        Update::new(s, &mut ps, Gradient::sparse(&ids, &sv)),
                        Update::new(d, &mut pd, Gradient::dense(&dv)),
                    ]);
                    assert_eq!(outcome.unwrap(), lazyadam::StepOutcome::Applied);
                }
                (f32_bits(&ps), f32_bits(&pd), slot_bits(&opt, s), slot_bits(&opt, d))
            })
        };
        let want = run(NonFinitePolicy::Propagate, 1.0);
        prop_assert_eq!(&run(NonFinitePolicy::Error, 1.0), &want);
        prop_assert_eq!(&run(NonFinitePolicy::SkipStep { loss_scale: None }, 1.0), &want);
        let scale = 2f32.powi(k);
        let scaled = NonFinitePolicy::SkipStep {
            loss_scale: Some(DynamicLossScale {
                scale,
                growth_interval: 1000,
                ..DynamicLossScale::default()
            }),
        };
        prop_assert_eq!(&run(scaled, scale), &want);
    }
}

/// Non-finite norms, which the f64 estimate cannot decide (the exact sum does,
/// as `tf.clip_by_norm` and `tf.clip_by_global_norm` would): a NaN norm makes
/// every value of the gradient NaN; an infinite one scales by 0 under
/// `clipnorm` (the infinite value becomes NaN, the others 0, so their
/// parameters do not move) and makes every value of every gradient NaN under
/// `global_clipnorm`.
#[test]
fn non_finite_norms_clip_as_the_reference() {
    let run = |config: LazyAdamConfig, a: &[f32], b: &[f32]| {
        let mut opt = LazyAdam::new(config).unwrap();
        let va = opt
            .add_variable("a", &[a.len()], DType::F32, DType::F32)
            .unwrap();
        let vb = opt
            .add_variable("b", &[b.len()], DType::F32, DType::F32)
            .unwrap();
        let (mut pa, mut pb) = (vec![1.0f32; a.len()], vec![1.0f32; b.len()]);
        opt.apply_gradients(&mut [
            Update::new(va, &mut pa, Gradient::dense(a)),
            Update::new(vb, &mut pb, Gradient::dense(b)),
        ])
        .unwrap();
        (pa, pb)
    };
    let clip = LazyAdamConfig::default().with_clipnorm(1.0);
    let global = LazyAdamConfig::default().with_global_clipnorm(1.0);
    // A NaN norm: every value of that gradient NaN; the other one clipped as usual.
    let (pa, pb) = run(clip.clone(), &[f32::NAN, 0.5, 0.25], &[0.25]);
    assert!(pa.iter().all(|x| x.is_nan()), "{pa:?}");
    assert!(pb[0] < 1.0, "{pb:?}");
    // An infinite norm under clipnorm: a factor of 0.
    let (pa, pb) = run(clip, &[f32::INFINITY, 0.5, 0.25], &[0.25]);
    assert!(pa[0].is_nan(), "{pa:?}");
    assert_eq!(&pa[1..], &[1.0, 1.0]);
    assert!(pb[0] < 1.0, "{pb:?}");
    // Under global_clipnorm, one infinite value makes every value NaN.
    let (pa, pb) = run(global, &[f32::INFINITY, 0.5, 0.25], &[0.25]);
    assert!(pa.iter().chain(&pb).all(|x| x.is_nan()), "{pa:?} {pb:?}");
}
