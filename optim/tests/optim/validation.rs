//! Validation: typed errors that name the variable, and nothing written.

use lazyadam::{
    DType, DynamicLossScale, Error, Extensions, Gradient, LazyAdam, LazyAdamConfig,
    NonFinitePolicy, StepOutcome, Update, bf16, f16,
};

fn two_vars(ext: Extensions) -> (LazyAdam, lazyadam::VarId, lazyadam::VarId) {
    let mut opt = LazyAdam::with_extensions(LazyAdamConfig::default(), ext).unwrap();
    let a = opt
        .add_variable("emb", &[4, 2], DType::F32, DType::F32)
        .unwrap();
    let b = opt
        .add_variable("bias", &[3], DType::F16, DType::BF16)
        .unwrap();
    (opt, a, b)
}

/// SkipStep with a dynamic loss scale starting at `scale` (growth 2 after 2 good steps,
/// backoff 0.5).
fn skip_with_loss_scale(scale: f32) -> Extensions {
    Extensions {
        non_finite: NonFinitePolicy::SkipStep {
            loss_scale: Some(DynamicLossScale {
                scale,
                growth_factor: 2.0,
                backoff_factor: 0.5,
                growth_interval: 2,
            }),
        },
        ..Extensions::default()
    }
}

#[test]
fn variable_registration_errors() {
    let mut opt = LazyAdam::new(LazyAdamConfig::default()).unwrap();
    opt.add_variable("x", &[2], DType::F32, DType::F32).unwrap();
    assert!(matches!(
        opt.add_variable("x", &[2], DType::F32, DType::F32),
        Err(Error::DuplicateVariable { name }) if name == "x"
    ));
    assert!(matches!(
        opt.add_variable("huge", &[usize::MAX, 4], DType::F32, DType::F32),
        Err(Error::InvalidShape { variable, .. }) if variable == "huge"
    ));
    assert_eq!(opt.num_variables(), 1);
    let s = opt
        .add_variable("scalar", &[], DType::F32, DType::F32)
        .unwrap();
    let info = opt.variable(s).unwrap();
    assert_eq!((info.rows(), info.row_len(), info.numel()), (1, 1, 1));
    assert_eq!(opt.variable_id("scalar"), Some(s));
    assert_eq!(opt.variable_id("nope"), None);
}

#[test]
fn every_invalid_update_is_rejected_without_writing() {
    let (mut opt, a, b) = two_vars(Extensions::default());
    let mut pa = vec![1.0f32; 8];
    let mut pb = vec![f16::ONE; 3];
    let mut pb32 = vec![1.0f32; 3];
    let g8 = [0.5f32; 8];
    let g3 = [bf16::ONE; 3];
    let (mut other, _, _) = two_vars(Extensions::default());
    let c = other
        .add_variable("third", &[1], DType::F32, DType::F32)
        .unwrap();
    let mut pc = vec![0.0f32];

    let check = |opt: &LazyAdam, pa: &[f32], r: Result<StepOutcome, Error>| -> Error {
        assert_eq!(opt.iterations(), 0);
        assert!(pa.iter().all(|&x| x == 1.0));
        let s = opt
            .slots(lazyadam::VarId::clone(&opt.variable_id("emb").unwrap()))
            .unwrap();
        assert!(s.m.to_f32_vec().iter().all(|&x| x == 0.0));
        r.unwrap_err()
    };

    let r = opt.apply_gradients(&mut [
        Update::new(a, &mut pa, Gradient::dense(&g8)),
        Update::new(c, &mut pc, Gradient::dense(&[1.0f32])),
    ]);
    let e = check(&opt, &pa, r);
    assert!(matches!(e, Error::UnknownVariable { .. }), "{e}");

    let mut pa2 = vec![1.0f32; 8];
    let r = opt.apply_gradients(&mut [
        Update::new(a, &mut pa, Gradient::dense(&g8)),
        Update::new(a, &mut pa2, Gradient::dense(&g8)),
    ]);
    let e = check(&opt, &pa, r);
    assert!(
        matches!(&e, Error::DuplicateUpdate { variable } if variable == "emb"),
        "{e}"
    );

    let r = opt.apply_gradients(&mut [
        Update::new(a, &mut pa, Gradient::dense(&g8)),
        Update::new(b, &mut pb32, Gradient::dense(&g3)),
    ]);
    let e = check(&opt, &pa, r);
    assert!(
        matches!(&e, Error::DtypeMismatch { variable, what: "param", expected: DType::F16, got: DType::F32 } if variable == "bias"),
        "{e}"
    );

    let mut short = vec![f16::ONE; 2];
    let r = opt.apply_gradients(&mut [
        Update::new(a, &mut pa, Gradient::dense(&g8)),
        Update::new(b, &mut short, Gradient::dense(&g3)),
    ]);
    let e = check(&opt, &pa, r);
    assert!(
        matches!(&e, Error::LengthMismatch { variable, what: "param", expected: 3, got: 2 } if variable == "bias"),
        "{e}"
    );

    let r = opt.apply_gradients(&mut [
        Update::new(a, &mut pa, Gradient::dense(&g8)),
        Update::new(b, &mut pb, Gradient::dense(&g3[..2])),
    ]);
    let e = check(&opt, &pa, r);
    assert!(
        matches!(&e, Error::LengthMismatch { variable, what: "gradient values", expected: 3, got: 2 } if variable == "bias"),
        "{e}"
    );

    let r = opt.apply_gradients(&mut [Update::new(
        a,
        &mut pa,
        Gradient::sparse(&[0u32, 1], &g8[..3]),
    )]);
    let e = check(&opt, &pa, r);
    assert!(
        matches!(&e, Error::LengthMismatch { variable, what: "gradient values", expected: 4, got: 3 } if variable == "emb"),
        "{e}"
    );

    let r = opt.apply_gradients(&mut [Update::new(
        a,
        &mut pa,
        Gradient::sparse(&[0i64, 4], &g8[..4]),
    )]);
    let e = check(&opt, &pa, r);
    assert!(
        matches!(&e, Error::RowIdOutOfRange { variable, id: 4, rows: 4 } if variable == "emb"),
        "{e}"
    );
    assert!(e.to_string().contains("emb") && e.to_string().contains('4'));

    let r = opt.apply_gradients(&mut [Update::new(
        a,
        &mut pa,
        Gradient::sparse(&[1i32, -1], &g8[..4]),
    )]);
    let e = check(&opt, &pa, r);
    assert!(
        matches!(&e, Error::NegativeRowId { variable, id: -1 } if variable == "emb"),
        "{e}"
    );

    // Grad storage may be any type.
    let gb = [bf16::from_f32(0.5); 8];
    opt.apply_gradients(&mut [
        Update::new(a, &mut pa, Gradient::dense(&gb)),
        Update::new(b, &mut pb, Gradient::dense(&[f16::ONE; 3])),
    ])
    .unwrap();
    assert_eq!(opt.iterations(), 1);
}

#[test]
fn non_finite_error_policy() {
    let ext = Extensions {
        non_finite: NonFinitePolicy::Error,
        ..Extensions::default()
    };
    let (mut opt, a, _) = two_vars(ext);
    let mut pa = vec![1.0f32; 8];
    let g = [0.5f32, 0.5, 0.5, f32::INFINITY];
    let e = opt
        .apply_gradients(&mut [Update::new(a, &mut pa, Gradient::sparse(&[2u32, 3], &g))])
        .unwrap_err();
    match e {
        Error::NonFinite {
            variable,
            element,
            row,
            value,
        } => {
            assert_eq!(variable, "emb");
            assert_eq!(element, 3);
            assert_eq!(row, Some(3));
            assert_eq!(value, f32::INFINITY);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(opt.iterations(), 0);
    assert!(pa.iter().all(|&x| x == 1.0));
}

/// The Error policy checks the gradient's values, not their squares. A finite 1e30 is
/// accepted. The reference's `(1 - beta_2) * g * g` overflows, so `v` becomes +inf and
/// `m / (sqrt(v) + epsilon)` is 0. That element then stays where it is, now and on later steps
/// (`beta_2 * inf` stays inf), while the element next to it moves.
#[test]
fn error_policy_checks_gradients_not_their_squares() {
    let ext = Extensions {
        non_finite: NonFinitePolicy::Error,
        ..Extensions::default()
    };
    let (mut opt, a, _) = two_vars(ext);
    let mut pa = vec![1.0f32; 8];
    let g = [1e30f32, 0.5];
    for _ in 0..2 {
        assert_eq!(
            opt.apply_gradients(&mut [Update::new(a, &mut pa, Gradient::sparse(&[1u32], &g))])
                .unwrap(),
            StepOutcome::Applied
        );
        assert_eq!(
            pa[2], 1.0,
            "the element whose square overflowed took no step"
        );
        assert!(pa[3] < 1.0, "its neighbour did: {}", pa[3]);
    }
    let v = opt
        .get_weights()
        .into_iter()
        .find(|w| w.name == "emb/v")
        .expect("the slot is saved");
    match v.data {
        lazyadam::WeightData::F32(v) => {
            assert_eq!(v[2], f32::INFINITY);
            // The reference's f32 arithmetic: v = beta_2 * v + (1 - beta_2) * g * g.
            let (b2, g2) = (0.999f32, 0.5f32 * 0.5);
            let v1 = b2 * 0.0 + (1.0 - b2) * g2;
            assert_eq!(v[3], b2 * v1 + (1.0 - b2) * g2);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(opt.iterations(), 2);
}

/// Every weight the optimizer holds (slots, step counter) as bits, for "nothing was written"
/// checks.
fn slot_bits(opt: &LazyAdam) -> Vec<(String, Vec<u64>)> {
    opt.get_weights()
        .into_iter()
        .map(|w| {
            let bits = match w.data {
                lazyadam::WeightData::I64(v) => v.iter().map(|&x| x as u64).collect(),
                lazyadam::WeightData::F32(v) => v.iter().map(|x| x.to_bits() as u64).collect(),
                lazyadam::WeightData::F16(v) => v.iter().map(|x| x.to_bits() as u64).collect(),
                lazyadam::WeightData::BF16(v) => v.iter().map(|x| x.to_bits() as u64).collect(),
            };
            (w.name, bits)
        })
        .collect()
}

/// SkipStep also checks the sums of a sparse gradient's duplicate rows. Under the loss scale
/// 2^-100, -1.5e8 unscales to about -1.9e38 (finite), and two occurrences of one row sum to
/// -inf in f32 (the reference's loss-scale optimizer would apply that, and NaN would follow in
/// the row). The step is skipped and the scale backs off; the same values on distinct rows
/// are applied and stay finite.
#[test]
fn skip_step_checks_duplicate_row_sums() {
    let scale = 2.0f32.powi(-100);
    let unscaled = -1.5e8f32 * (1.0 / scale);
    assert!(unscaled.is_finite() && (unscaled + unscaled).is_infinite());
    let g = [-1.5e8f32, 0.0, -1.5e8, 0.0];

    let (mut opt, a, _) = two_vars(skip_with_loss_scale(scale));
    let mut pa = vec![1.0f32; 8];
    opt.apply_gradients(&mut [Update::new(
        a,
        &mut pa,
        Gradient::sparse(&[3u32], &[1.0f32; 2]),
    )])
    .unwrap();
    let (params, slots) = (pa.clone(), slot_bits(&opt));
    let out = opt
        .apply_gradients(&mut [Update::new(a, &mut pa, Gradient::sparse(&[0u32, 0], &g))])
        .unwrap();
    assert_eq!(out, StepOutcome::Skipped);
    assert_eq!(pa, params);
    assert_eq!(slot_bits(&opt), slots);
    assert_eq!(opt.iterations(), 1);
    assert_eq!(opt.loss_scale(), Some(scale * 0.5));

    let (mut opt, a, _) = two_vars(skip_with_loss_scale(scale));
    let mut pa = vec![1.0f32; 8];
    let out = opt
        .apply_gradients(&mut [Update::new(a, &mut pa, Gradient::sparse(&[0u32, 1], &g))])
        .unwrap();
    assert_eq!(out, StepOutcome::Applied);
    // Finite, and still 1: each square overflows, so `v` is +inf and the step is 0.
    assert_eq!(pa, vec![1.0; 8]);
}

/// The check of duplicate sums is exact, not a bound: it adds the occurrences as the step
/// does, in occurrence order in f32. 3e38, -3e38, 3e38 never leaves the finite range and is
/// applied; 3e38, 3e38, -3e38 overflows at its second addition and is refused with
/// `NonFiniteSum` (and nothing written), although both hold the same values.
#[test]
fn error_policy_checks_duplicate_row_sums_in_the_steps_order() {
    let ext = Extensions {
        non_finite: NonFinitePolicy::Error,
        ..Extensions::default()
    };
    let (mut opt, a, _) = two_vars(ext);
    let mut pa = vec![1.0f32; 8];
    let fine = [3e38f32, 1.0, -3e38, 1.0, 3e38, 1.0];
    let out = opt
        .apply_gradients(&mut [Update::new(
            a,
            &mut pa,
            Gradient::sparse(&[2u32, 2, 2], &fine),
        )])
        .unwrap();
    assert_eq!(out, StepOutcome::Applied);
    assert!(pa[5] < 1.0, "the row moved: {pa:?}");

    let (params, slots) = (pa.clone(), slot_bits(&opt));
    let bad = [3e38f32, 1.0, 3e38, 1.0, -3e38, 1.0];
    let e = opt
        .apply_gradients(&mut [Update::new(
            a,
            &mut pa,
            Gradient::sparse(&[2u32, 2, 2], &bad),
        )])
        .unwrap_err();
    match &e {
        Error::NonFiniteSum {
            variable,
            row,
            element,
            value,
            occurrences,
        } => {
            assert_eq!(variable, "emb");
            assert_eq!((*row, *element, *occurrences), (2, 0, 3));
            assert_eq!(*value, f32::INFINITY);
        }
        other => panic!("{other:?}"),
    }
    assert!(e.to_string().contains("row id 2"), "{e}");
    assert_eq!(pa, params);
    assert_eq!(slot_bits(&opt), slots);
    assert_eq!(opt.iterations(), 1);
}

/// The sums checked are those of the transformed values, as the step applies them: with
/// `clipnorm`, two occurrences of 3e38 are scaled down before they are added, so their sum
/// is finite and the step is applied; without it, the same gradient is refused. The ids are
/// many (over the hashed path's limit) so that the step sorts them, as in long batches.
#[test]
fn duplicate_sums_are_checked_after_clipping_on_every_path() {
    let ext = Extensions {
        non_finite: NonFinitePolicy::Error,
        ..Extensions::default()
    };
    let n = 70_000usize;
    let ids: Vec<u32> = (0..n as u32).map(|i| i % 4).collect();
    let mut g = vec![0.0f32; 2 * n];
    g[2 * 4 * 1000 + 2] = 3e38; // row 1's 1001st occurrence
    g[2 * 4 * 2000 + 2] = 3e38; // and its 2001st
    for clipnorm in [None, Some(1.0f32)] {
        let mut cfg = LazyAdamConfig::default();
        if let Some(c) = clipnorm {
            cfg = cfg.with_clipnorm(c);
        }
        let mut opt = LazyAdam::with_extensions(cfg, ext.clone()).unwrap();
        let a = opt
            .add_variable("emb", &[4, 2], DType::F32, DType::F32)
            .unwrap();
        let mut pa = vec![1.0f32; 8];
        let r = opt.apply_gradients(&mut [Update::new(a, &mut pa, Gradient::sparse(&ids, &g))]);
        if clipnorm.is_some() {
            assert_eq!(r.unwrap(), StepOutcome::Applied);
            assert!(pa.iter().all(|x| x.is_finite()), "{pa:?}");
            assert!(pa[2] < 1.0, "{pa:?}");
        } else {
            match r.unwrap_err() {
                Error::NonFiniteSum {
                    row, occurrences, ..
                } => assert_eq!((row, occurrences), (1, n / 4)),
                other => panic!("{other:?}"),
            }
            assert_eq!(pa, vec![1.0; 8]);
            assert_eq!(opt.iterations(), 0);
        }
    }
}

/// The exact check of duplicate sums names the first overflowing row in row order, whatever
/// the thread count and whichever rows the bound clears by their own count: rows of ~100
/// occurrences and one hot row of ~5,100, in an occurrence order unlike the row order.
/// - Two occurrences of 3e38 overflow in rows 901, 41, 501 and 1,010 (which occurs twice
///   only): row 41 is named; without it and row 501, row 901; alone, row 1,010.
/// - 1e35 in every occurrence: only the hot row's sum (5.1e38) overflows; the ~100-occurrence
///   rows' sums (1e37) are finite, and the bound clears them by their own count.
///
/// Under SkipStep each case skips the step; under Error it is refused, nothing written.
#[test]
fn duplicate_sum_check_names_the_first_row_on_every_thread_count() {
    const ROWS: usize = 1024;
    const DIM: usize = 4;
    let mut ids: Vec<u32> = (0..100_000u32)
        .map(|i| if i % 20 == 0 { 7 } else { i * 7919 % 1000 })
        .collect();
    ids.extend([1010, 1010]);
    let occurrences = |r: u32| ids.iter().filter(|&&x| x == r).count();
    let element = |r: u32| (r % 4) as usize;
    let poisoned = |rows: &[u32]| {
        let mut g = vec![1e-3f32; ids.len() * DIM];
        for (p, &r) in ids.iter().enumerate() {
            if rows.contains(&r) {
                g[p * DIM + element(r)] = 3e38;
            }
        }
        g
    };
    let mut hot = vec![1e-3f32; ids.len() * DIM];
    for p in 0..ids.len() {
        hot[p * DIM] = 1e35;
    }
    for r in [41, 501, 901] {
        assert_eq!(occurrences(r), 100);
    }
    assert_eq!((occurrences(7), occurrences(1010)), (5100, 2));
    let cases = [
        (poisoned(&[901, 41, 501, 1010]), 41u32, element(41)),
        (poisoned(&[901, 1010]), 901, element(901)),
        (poisoned(&[1010]), 1010, element(1010)),
        (hot, 7, 0),
    ];
    for threads in 1..=3 {
        crate::on_threads(threads, || {
            for (g, row, el) in &cases {
                for skips in [false, true] {
                    let ext = Extensions {
                        parallel_min_elements: 1,
                        ..if skips {
                            skip_with_loss_scale(1.0)
                        } else {
                            Extensions {
                                non_finite: NonFinitePolicy::Error,
                                ..Extensions::default()
                            }
                        }
                    };
                    let mut opt =
                        LazyAdam::with_extensions(LazyAdamConfig::default(), ext).unwrap();
                    let t = opt
                        .add_variable("table", &[ROWS, DIM], DType::F32, DType::F32)
                        .unwrap();
                    let mut pt = vec![1.0f32; ROWS * DIM];
                    let slots = slot_bits(&opt);
                    let what = format!("{threads} threads, row {row}, skips {skips}");
                    let r = opt.apply_gradients(&mut [Update::new(
                        t,
                        &mut pt,
                        Gradient::sparse(&ids, g),
                    )]);
                    if skips {
                        assert_eq!(r.unwrap(), StepOutcome::Skipped, "{what}");
                        assert_eq!(opt.loss_scale(), Some(0.5), "{what}");
                    } else {
                        match r.unwrap_err() {
                            Error::NonFiniteSum {
                                variable,
                                row: r,
                                element: e,
                                value,
                                occurrences: o,
                            } => {
                                assert_eq!(variable, "table", "{what}");
                                assert_eq!((r, e), (*row as u64, *el), "{what}");
                                assert_eq!(o, occurrences(*row), "{what}");
                                assert_eq!(value, f32::INFINITY, "{what}");
                            }
                            other => panic!("{what}: {other:?}"),
                        }
                    }
                    assert_eq!(pt, vec![1.0f32; ROWS * DIM], "{what}");
                    assert_eq!(slot_bits(&opt), slots, "{what}");
                    assert_eq!(opt.iterations(), 0, "{what}");
                }
            }
        });
    }
}

/// A step whose duplicate sums are checked (Error and SkipStep, values large enough that the
/// bound cannot clear the whole gradient) writes the same bits as the unchecked step
/// (Propagate): the check groups the ids as the step does, and the step may use that grouping
/// only for the update it belongs to. Several sparse updates of different tables (70,000 ids
/// each, over the hashed path's share on many threads; and six ids, hashed), a dense update
/// between them, in several orders, two steps each, on 1 to 3 threads, with the parallel
/// threshold at its default and at 1.
#[test]
fn checked_steps_write_what_unchecked_steps_write() {
    const N: usize = 70_000;
    let small = |p: usize| ((p * 31 % 97) as f32 - 48.0) * 1e-3;
    let ids_a: Vec<u32> = (0..N as u32).map(|i| i * 7919 % 300).collect();
    let ids_b: Vec<u64> = (0..N as u64)
        .map(|i| (i * 104_729 + i / 7) % 5000)
        .collect();
    let ids_d = [5u32, 17, 5, 39, 17, 0];
    let mut g_a: Vec<f32> = (0..N * 4).map(small).collect();
    g_a[4 * 1234 + 1] = 1e34;
    let mut g_b: Vec<f32> = (0..N * 3).map(|p| small(p + 7)).collect();
    g_b[3 * 777] = -1e34;
    let mut g_d: Vec<f32> = (0..6 * 2).map(|p| small(p + 3)).collect();
    g_d[2 * 2] = 3e38; // row 5, summed exactly (two occurrences): finite
    let g_c: Vec<f32> = (0..10).map(|p| small(p + 11)).collect();
    // The bound cannot clear any of the sparse gradients: each is checked.
    assert!(4.0 * N as f32 * 1e34 > f32::MAX && 4.0 * 6.0 * 3e38 > f32::MAX);
    let orders: [&[usize]; 4] = [&[0, 1, 2, 3], &[3, 2, 0], &[2, 0], &[1, 0, 3, 2]];
    let policies = [
        NonFinitePolicy::Propagate,
        NonFinitePolicy::Error,
        NonFinitePolicy::SkipStep { loss_scale: None },
    ];
    // Two steps of `order`'s updates under `policy`: the parameters' bits and the slots'
    // bits after each step.
    let run = |policy: &NonFinitePolicy, min_parallel: usize, order: &[usize], what: &str| {
        let ext = Extensions {
            non_finite: policy.clone(),
            parallel_min_elements: min_parallel,
            ..Extensions::default()
        };
        let mut opt = LazyAdam::with_extensions(LazyAdamConfig::default(), ext).unwrap();
        let a = opt
            .add_variable("a", &[300, 4], DType::F32, DType::F32)
            .unwrap();
        let c = opt
            .add_variable("c", &[10], DType::F32, DType::F32)
            .unwrap();
        let b = opt
            .add_variable("b", &[5000, 3], DType::F16, DType::F32)
            .unwrap();
        let d = opt
            .add_variable("d", &[40, 2], DType::F32, DType::BF16)
            .unwrap();
        let mut pa = vec![0.5f32; 300 * 4];
        let mut pc = vec![0.5f32; 10];
        let mut pb = vec![f16::from_f32(0.5); 5000 * 3];
        let mut pd = vec![0.5f32; 40 * 2];
        let mut states = Vec::new();
        for _ in 0..2 {
            let mut all = [
                Some(Update::new(a, &mut pa, Gradient::sparse(&ids_a, &g_a))),
                Some(Update::new(c, &mut pc, Gradient::dense(&g_c))),
                Some(Update::new(b, &mut pb, Gradient::sparse(&ids_b, &g_b))),
                Some(Update::new(d, &mut pd, Gradient::sparse(&ids_d, &g_d))),
            ];
            let mut updates: Vec<Update<'_>> =
                order.iter().map(|&i| all[i].take().unwrap()).collect();
            let out = opt.apply_gradients(&mut updates).expect(what);
            assert_eq!(out, StepOutcome::Applied, "{what}");
            drop(updates);
            states.push(slot_bits(&opt));
        }
        let half = f16::from_f32(0.5);
        assert!(
            pa.iter().chain(&pc).chain(&pd).all(|x| x.is_finite()),
            "{what}"
        );
        // Each variable moved exactly when it had an update.
        for (k, moved) in [
            pa.iter().any(|&x| x != 0.5),
            pc.iter().any(|&x| x != 0.5),
            pb.iter().any(|&x| x != half),
            pd.iter().any(|&x| x != 0.5),
        ]
        .into_iter()
        .enumerate()
        {
            assert_eq!(moved, order.contains(&k), "{what}: variable {k}");
        }
        let params: Vec<u32> = pa
            .iter()
            .chain(&pc)
            .chain(&pd)
            .map(|x| x.to_bits())
            .chain(pb.iter().map(|x| u32::from(x.to_bits())))
            .collect();
        (params, states)
    };
    for threads in 1..=3 {
        crate::on_threads(threads, || {
            for min_parallel in [Extensions::default().parallel_min_elements, 1] {
                for order in orders {
                    let written: Vec<_> = policies
                        .iter()
                        .map(|policy| {
                            let what = format!(
                                "{threads} threads, min_parallel {min_parallel}, {order:?}, \
                                 {policy:?}"
                            );
                            run(policy, min_parallel, order, &what)
                        })
                        .collect();
                    for w in &written[1..] {
                        assert!(
                            *w == written[0],
                            "{threads} threads, min_parallel {min_parallel}, {order:?}"
                        );
                    }
                }
            }
        });
    }
}

#[test]
fn non_finite_propagates_by_default() {
    let (mut opt, a, _) = two_vars(Extensions::default());
    let mut pa = vec![1.0f32; 8];
    let g = [f32::NAN, 0.5];
    opt.apply_gradients(&mut [Update::new(a, &mut pa, Gradient::sparse(&[1u32], &g))])
        .unwrap();
    assert!(pa[2].is_nan());
    assert!(pa[3].is_finite() && pa[3] < 1.0);
    assert_eq!(&pa[..2], &[1.0, 1.0]);
    assert_eq!(opt.iterations(), 1);
}

#[test]
fn skip_step_with_dynamic_loss_scale() {
    let ext = skip_with_loss_scale(1024.0);
    let mut scaled = LazyAdam::with_extensions(LazyAdamConfig::default(), ext).unwrap();
    let a = scaled
        .add_variable("w", &[2], DType::F32, DType::F32)
        .unwrap();
    let mut plain = LazyAdam::new(LazyAdamConfig::default()).unwrap();
    let b = plain
        .add_variable("w", &[2], DType::F32, DType::F32)
        .unwrap();
    let mut pa = vec![1.0f32; 2];
    let mut pb = vec![1.0f32; 2];

    // A non-finite step is skipped and the scale backs off.
    let out = scaled
        .apply_gradients(&mut [Update::new(a, &mut pa, Gradient::dense(&[f32::NAN, 1.0]))])
        .unwrap();
    assert_eq!(out, StepOutcome::Skipped);
    assert_eq!(scaled.iterations(), 0);
    assert_eq!(scaled.loss_scale(), Some(512.0));
    assert_eq!(pa, [1.0, 1.0]);

    // Scaled gradients are unscaled (power-of-two scale: exact).
    for _ in 0..2 {
        let g = [0.25f32, -0.5];
        let gs = [0.25f32 * 512.0, -0.5 * 512.0];
        let s = scaled.loss_scale().unwrap();
        let gs: Vec<f32> = if s == 512.0 {
            gs.to_vec()
        } else {
            g.iter().map(|x| x * s).collect()
        };
        assert_eq!(
            scaled
                .apply_gradients(&mut [Update::new(a, &mut pa, Gradient::dense(&gs))])
                .unwrap(),
            StepOutcome::Applied
        );
        plain
            .apply_gradients(&mut [Update::new(b, &mut pb, Gradient::dense(&g))])
            .unwrap();
    }
    assert_eq!(pa, pb);
    // Two good steps: the scale grew.
    assert_eq!(scaled.loss_scale(), Some(1024.0));
    // The loss-scale state survives a checkpoint.
    let restored = LazyAdam::from_bytes(&scaled.to_bytes().unwrap()).unwrap();
    assert_eq!(restored.loss_scale(), Some(1024.0));
}

#[test]
fn invalid_extensions_are_config_errors() {
    let e = LazyAdam::with_extensions(
        LazyAdamConfig::default(),
        Extensions {
            weight_decay: -1.0,
            ..Extensions::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("weight_decay"), "{e}");
    let e = LazyAdam::with_extensions(
        LazyAdamConfig::default(),
        Extensions {
            sparse_amsgrad: true,
            ..Extensions::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("sparse_amsgrad"), "{e}");
    let e = LazyAdam::with_extensions(
        LazyAdamConfig::default(),
        Extensions {
            non_finite: NonFinitePolicy::SkipStep {
                loss_scale: Some(DynamicLossScale {
                    scale: 0.0,
                    ..DynamicLossScale::default()
                }),
            },
            ..Extensions::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("scale"), "{e}");
    let mut opt = LazyAdam::new(LazyAdamConfig::default()).unwrap();
    assert!(opt.set_learning_rate(-1.0).is_err());
    assert!(opt.set_learning_rate(f32::NAN).is_err());
    opt.set_learning_rate(0.5).unwrap();
    assert_eq!(opt.learning_rate(), 0.5);
}

#[test]
fn optimizer_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<LazyAdam>();
    assert_send_sync::<LazyAdamConfig>();
    assert_send_sync::<Error>();
}

#[test]
fn non_finite_global_norm_makes_every_value_nan_like_the_reference() {
    let config = LazyAdamConfig {
        global_clipnorm: Some(1.0),
        ..LazyAdamConfig::default()
    };
    let mut opt = LazyAdam::new(config).unwrap();
    let a = opt.add_variable("a", &[2], DType::F32, DType::F32).unwrap();
    let b = opt.add_variable("b", &[2], DType::F32, DType::F32).unwrap();
    let mut pa = vec![1.0f32; 2];
    let mut pb = vec![1.0f32; 2];
    opt.apply_gradients(&mut [
        Update::new(a, &mut pa, Gradient::dense(&[f32::INFINITY, 1.0])),
        Update::new(b, &mut pb, Gradient::dense(&[0.5f32, 0.5])),
    ])
    .unwrap();
    assert!(pa.iter().chain(&pb).all(|x| x.is_nan()), "{pa:?} {pb:?}");
}

/// The non-finite checks of a large gradient split it over the thread pool; the verdict must
/// not depend on where the bad value lies or on how many threads look. Gradients of about
/// 262,000 values (past four 65,536-value chunks) with one poisoned value first, in the middle
/// or last, under SkipStep with a tiny loss scale and under Error, on 1 to 3 threads with the
/// parallel threshold at 1: a NaN, an infinity, or a finite value whose unscaled value
/// overflows, is skipped (state untouched, scale halved) or refused naming its element; a
/// value whose unscaled value stays finite is applied, to the same bits on every thread
/// count. Dense f32 gradients (scale 2^-100) and sparse f16 ones (scale 2^-113) both.
#[test]
fn non_finite_checks_decide_alike_on_every_thread_count() {
    const N: usize = 4 * 65_536 + 17;
    const DIM: usize = 241;
    const IDS: usize = N / DIM + 1;
    let (dense_scale, sparse_scale) = (2.0f32.powi(-100), 2.0f32.powi(-113));
    // Each layout's overflowing and finite value, unscaled.
    assert!((1e9f32 / dense_scale).is_infinite() && (2e8f32 / dense_scale).is_finite());
    assert!((65504f32 / sparse_scale).is_infinite() && (16384f32 / sparse_scale).is_finite());
    let setup = |ext: Extensions| {
        let ext = Extensions {
            parallel_min_elements: 1,
            ..ext
        };
        let mut opt = LazyAdam::with_extensions(LazyAdamConfig::default(), ext).unwrap();
        let d = opt
            .add_variable("dense", &[N], DType::F32, DType::F32)
            .unwrap();
        let t = opt
            .add_variable("table", &[IDS + 3, DIM], DType::F32, DType::F32)
            .unwrap();
        (opt, d, t)
    };
    let ids: Vec<u32> = (0..IDS as u32).rev().collect();
    let base = |i: usize| ((i % 89) as f32 - 44.0) * 1e-3;
    let mut applied: Vec<Vec<u32>> = Vec::new();
    for threads in 1..=3 {
        crate::on_threads(threads, || {
            for pos in [0, N / 2 + 5, N - 1] {
                for (bad_dense, bad_sparse, skips) in [
                    (f32::NAN, f32::NAN, true),
                    (f32::NEG_INFINITY, f32::NEG_INFINITY, true),
                    (1e9, 65504.0, true),
                    (-2e8, -16384.0, false),
                ] {
                    for sparse in [false, true] {
                        let (n, bad, scale) = if sparse {
                            (IDS * DIM, bad_sparse, sparse_scale)
                        } else {
                            (N, bad_dense, dense_scale)
                        };
                        let pos = pos.min(n - 1);
                        let mut g: Vec<f32> = (0..n).map(base).collect();
                        g[pos] = bad;
                        let gh: Vec<f16> = g.iter().map(|&x| f16::from_f32(x)).collect();
                        let grad = || {
                            if sparse {
                                Gradient::sparse(&ids, &gh)
                            } else {
                                Gradient::dense(&g)
                            }
                        };
                        let what = format!("{threads} threads, {bad} at {pos}, sparse {sparse}");

                        let (mut opt, d, t) = setup(skip_with_loss_scale(scale));
                        let mut pd = vec![1.0f32; N];
                        let mut pt = vec![1.0f32; (IDS + 3) * DIM];
                        let slots = slot_bits(&opt);
                        let (var, params) = if sparse { (t, &mut pt) } else { (d, &mut pd) };
                        let out = opt
                            .apply_gradients(&mut [Update::new(var, params, grad())])
                            .unwrap();
                        if skips {
                            assert_eq!(out, StepOutcome::Skipped, "{what}");
                            assert!(pd.iter().chain(&pt).all(|&x| x == 1.0), "{what}");
                            assert_eq!(slot_bits(&opt), slots, "{what}");
                            assert_eq!(opt.loss_scale(), Some(scale * 0.5), "{what}");
                        } else {
                            assert_eq!(out, StepOutcome::Applied, "{what}");
                            let bits = pd.iter().chain(&pt).map(|x| x.to_bits()).collect();
                            applied.push(bits);
                        }

                        if bad.is_finite() {
                            continue;
                        }
                        let (mut opt, d, t) = setup(Extensions {
                            non_finite: NonFinitePolicy::Error,
                            ..Extensions::default()
                        });
                        let (var, params) = if sparse { (t, &mut pt) } else { (d, &mut pd) };
                        let e = opt
                            .apply_gradients(&mut [Update::new(var, params, grad())])
                            .unwrap_err();
                        assert!(
                            matches!(e, Error::NonFinite { element, .. } if element == pos),
                            "{what}: {e:?}"
                        );
                        assert!(pd.iter().chain(&pt).all(|&x| x == 1.0), "{what}");
                        assert_eq!(opt.iterations(), 0, "{what}");
                    }
                }
            }
        });
    }
    // The applied steps: 3 positions x 2 layouts per thread count, the same bits on each.
    assert_eq!(applied.len(), 18);
    for (i, a) in applied.iter().enumerate().skip(6) {
        assert!(*a == applied[i % 6], "step {i} differs from one thread's");
    }
}
