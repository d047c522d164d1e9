//! The contract under attack: inputs an attacker (or an unlucky user) would
//! try. Every failed step is a typed error that leaves every byte of state
//! (parameters, slots, per-row counters, the step counter and the loss
//! scale) as it was; no input panics (these tests also run in debug builds);
//! a kernel error never escapes the write phase.

use lazyadam::{
    BiasCorrection, CustomSchedule, DType, DynamicLossScale, Error, Extensions, Gradient, LazyAdam,
    LazyAdamConfig, LearningRate, LearningRateSchedule, NonFinitePolicy, Schedule, StepOutcome,
    Update, VarId, WeightData,
};

/// Everything a step may change, bit for bit.
#[derive(Debug, PartialEq)]
struct Snapshot {
    iterations: u64,
    loss_scale: Option<u32>,
    weights: Vec<(String, Vec<u64>)>,
    params: Vec<Vec<u32>>,
}

fn snapshot(opt: &LazyAdam, params: &[&[f32]]) -> Snapshot {
    Snapshot {
        iterations: opt.iterations(),
        loss_scale: opt.loss_scale().map(f32::to_bits),
        weights: opt
            .get_weights()
            .into_iter()
            .map(|w| {
                let bits = match w.data {
                    WeightData::I64(v) => v.iter().map(|&x| x as u64).collect(),
                    WeightData::F32(v) => v.iter().map(|x| x.to_bits() as u64).collect(),
                    WeightData::F16(v) => v.iter().map(|x| x.to_bits() as u64).collect(),
                    WeightData::BF16(v) => v.iter().map(|x| x.to_bits() as u64).collect(),
                };
                (w.name, bits)
            })
            .collect(),
        params: params
            .iter()
            .map(|p| p.iter().map(|x| x.to_bits()).collect())
            .collect(),
    }
}

/// A failed step must not be a kernel error: every check runs before the
/// first write, so a kernel refusing its input is a bug.
fn not_kernel(e: &Error) {
    assert!(
        !matches!(e, Error::Kernel(_)),
        "a kernel error escaped: {e}"
    );
}

fn every_extension_combination() -> Vec<Extensions> {
    let mut out = Vec::new();
    for bits in 0..16u32 {
        for parallel in [1usize, usize::MAX] {
            out.push(Extensions {
                per_row_bias_correction: bits & 1 != 0,
                catch_up_decay: bits & 2 != 0,
                sparse_amsgrad: bits & 4 != 0,
                weight_decay: if bits & 8 != 0 { 0.01 } else { 0.0 },
                parallel_min_elements: parallel,
                ..Extensions::default()
            });
        }
    }
    out
}

// Finding 1: a zero-width variable after a dense update.

#[test]
fn zero_width_variables_are_accepted_and_written_nowhere() {
    for ext in every_extension_combination() {
        let config = LazyAdamConfig {
            amsgrad: ext.sparse_amsgrad,
            ..LazyAdamConfig::default()
        };
        let mut opt = LazyAdam::with_extensions(config, ext.clone()).unwrap();
        let a = opt.add_variable("a", &[3], DType::F32, DType::F32).unwrap();
        let b = opt
            .add_variable("b", &[5, 0], DType::F32, DType::F32)
            .unwrap();
        let c = opt
            .add_variable("c", &[0, 4], DType::F32, DType::F32)
            .unwrap();
        let mut pa = vec![1.0f32; 3];
        let (mut pb, mut pc) = (Vec::<f32>::new(), Vec::<f32>::new());
        let ga = [0.5f32, -0.5, 0.25];
        for threads in [1, 2] {
            crate::on_threads(threads, || {
                let before = opt.iterations();
                // The reproducer: dense `a`, then sparse ids [1] of
                // `b` with no values, plus an empty sparse step of `c`.
                let r = opt.apply_gradients(&mut [
                    Update::new(a, &mut pa, Gradient::dense(&ga)),
                    Update::new(b, &mut pb, Gradient::sparse(&[1u32, 4, 1], &[] as &[f32])),
                    Update::new(c, &mut pc, Gradient::sparse(&[] as &[u32], &[] as &[f32])),
                ]);
                assert_eq!(r.unwrap(), StepOutcome::Applied, "{ext:?}");
                assert_eq!(opt.iterations(), before + 1);
                // Dense zero-element gradients too.
                opt.apply_gradients(&mut [
                    Update::new(b, &mut pb, Gradient::dense(&[] as &[f32])),
                    Update::new(c, &mut pc, Gradient::dense(&[] as &[f32])),
                ])
                .unwrap();
                assert_eq!(opt.iterations(), before + 2);
            });
        }
        assert!(pa.iter().all(|&x| x != 1.0), "{pa:?}");
        // Ids are still checked against the rows, and the step stays all or nothing.
        let before = snapshot(&opt, &[&pa]);
        for (var, ids, rows, row_len) in [(b, [5u32], 5usize, 0usize), (c, [0u32], 0, 4)] {
            let p = if var == b { &mut pb } else { &mut pc };
            let values = vec![0.5f32; row_len];
            let e = opt
                .apply_gradients(&mut [
                    Update::new(a, &mut pa, Gradient::dense(&ga)),
                    Update::new(var, p, Gradient::sparse(&ids, &values)),
                ])
                .unwrap_err();
            not_kernel(&e);
            assert!(
                matches!(&e, Error::RowIdOutOfRange { rows: r, .. } if *r == rows),
                "{e}"
            );
            assert_eq!(snapshot(&opt, &[&pa]), before);
        }
        // A zero-width variable has no per-row state to change.
        if let Some(steps) = opt.row_steps(b) {
            assert!(steps.iter().all(|&s| s == 0));
        }
    }
}

// Finding 2: the step counter at its limits.

#[test]
fn step_counter_limits_are_typed_errors() {
    let mut opt = LazyAdam::new(LazyAdamConfig::default()).unwrap();
    let a = opt.add_variable("a", &[2], DType::F32, DType::F32).unwrap();
    let mut p = vec![1.0f32; 2];
    for bad in [u64::MAX, i64::MAX as u64 + 1] {
        let e = opt.set_iterations(bad).unwrap_err();
        assert!(
            matches!(e, Error::IterationsOutOfRange { iterations } if iterations == bad),
            "{e}"
        );
        assert_eq!(opt.iterations(), 0);
    }
    // One below the limit: one more step, then no more.
    opt.set_iterations(i64::MAX as u64 - 1).unwrap();
    opt.apply_gradients(&mut [Update::new(a, &mut p, Gradient::dense(&[1.0f32, 1.0]))])
        .unwrap();
    assert_eq!(opt.iterations(), i64::MAX as u64);
    assert!(p.iter().all(|x| x.is_finite()));
    let before = snapshot(&opt, &[&p]);
    let e = opt
        .apply_gradients(&mut [Update::new(a, &mut p, Gradient::dense(&[1.0f32, 1.0]))])
        .unwrap_err();
    assert!(
        matches!(e, Error::StepCounterExhausted { iterations } if iterations == i64::MAX as u64),
        "{e}"
    );
    assert_eq!(snapshot(&opt, &[&p]), before);
    // The counter is stored exactly, never clamped.
    assert_eq!(opt.get_weights()[0].data, WeightData::I64(vec![i64::MAX]));
    let back = LazyAdam::from_bytes(&opt.to_bytes().unwrap()).unwrap();
    assert_eq!(back.iterations(), i64::MAX as u64);
}

// Finding 3: the rate of every step is checked before anything is written.

#[derive(Debug)]
struct Returns(f32, u64);
impl LearningRateSchedule for Returns {
    /// 0.01 until step `.1`, then `.0`.
    fn learning_rate(&self, step: u64) -> f32 {
        if step < self.1 { 0.01 } else { self.0 }
    }
}

fn schedule_config(s: Schedule) -> LazyAdamConfig {
    LazyAdamConfig {
        learning_rate: LearningRate::Schedule(s),
        ..LazyAdamConfig::default()
    }
}

#[test]
fn schedules_that_cannot_give_a_valid_rate_are_rejected() {
    let cases = [
        (
            Schedule::PolynomialDecay {
                initial_learning_rate: 0.1,
                decay_steps: 2.0,
                end_learning_rate: 0.01,
                power: -1.0,
                cycle: false,
            },
            "power",
        ),
        (
            Schedule::CosineDecayRestarts {
                initial_learning_rate: 0.1,
                first_decay_steps: 2.0,
                t_mul: 0.5,
                m_mul: 1.0,
                alpha: 0.0,
            },
            "t_mul",
        ),
        (
            Schedule::CosineDecay {
                initial_learning_rate: 0.1,
                decay_steps: 4.0,
                alpha: -2.0,
                warmup_target: None,
                warmup_steps: 0.0,
            },
            "alpha",
        ),
        (
            Schedule::ExponentialDecay {
                initial_learning_rate: 1e39,
                decay_steps: 1.0,
                decay_rate: 0.5,
                staircase: false,
            },
            "initial_learning_rate",
        ),
        (
            Schedule::PiecewiseConstantDecay {
                boundaries: vec![1.0],
                values: vec![0.1, 1e39],
            },
            "values",
        ),
    ];
    for (s, key) in cases {
        let e = LazyAdam::new(schedule_config(s.clone())).unwrap_err();
        assert!(
            matches!(&e, Error::Config(lazyadam::ConfigError::InvalidValue { key: k, .. }) if k.ends_with(key)),
            "{s:?}: {e}"
        );
    }
}

/// Runs steps until the rate goes bad; the failing step must be a typed
/// error naming the step, with nothing written.
fn first_bad_step(config: LazyAdamConfig, ext: Extensions, steps: u64) -> (u64, Error) {
    let mut opt = LazyAdam::with_extensions(config, ext).unwrap();
    let a = opt
        .add_variable("a", &[4, 2], DType::F32, DType::F32)
        .unwrap();
    let mut p = vec![0.5f32; 8];
    for _ in 0..steps {
        let before = snapshot(&opt, &[&p]);
        let step = opt.iterations();
        match opt.apply_gradients(&mut [Update::new(
            a,
            &mut p,
            Gradient::sparse(&[1u32, 3], &[0.1f32, -0.2, 0.3, 0.4]),
        )]) {
            Ok(o) => {
                assert_eq!(o, StepOutcome::Applied);
                assert!(p.iter().all(|x| x.is_finite()), "step {step}: {p:?}");
            }
            Err(e) => {
                not_kernel(&e);
                assert_eq!(snapshot(&opt, &[&p]), before, "step {step}: {e}");
                return (step, e);
            }
        }
    }
    panic!("no step failed");
}

#[test]
fn steps_whose_rate_is_invalid_fail_without_writing() {
    // A growing schedule overflows f32 at step 1.
    let (step, e) = first_bad_step(
        schedule_config(Schedule::ExponentialDecay {
            initial_learning_rate: 0.01,
            decay_steps: 1.0,
            decay_rate: 1e300,
            staircase: false,
        }),
        Extensions::default(),
        5,
    );
    assert_eq!(step, 1);
    assert!(
        matches!(e, Error::InvalidLearningRate { step: 1, what: "learning rate", value } if value.is_infinite()),
        "{e}"
    );
    assert!(e.to_string().contains("step 1"), "{e}");
    // Custom schedules returning NaN, a negative rate or infinity.
    for bad in [f32::NAN, -1.0, f32::INFINITY, -0.0 - 1e-30] {
        let config = LazyAdamConfig {
            learning_rate: LearningRate::Custom(CustomSchedule::new(Returns(bad, 2))),
            ..LazyAdamConfig::default()
        };
        let (step, e) = first_bad_step(config, Extensions::default(), 5);
        assert_eq!(step, 2, "{bad}");
        assert!(
            matches!(
                e,
                Error::InvalidLearningRate {
                    step: 2,
                    what: "learning rate",
                    ..
                }
            ),
            "{e}"
        );
    }
    // A huge valid rate whose bias-corrected step size overflows.
    let config = LazyAdamConfig {
        learning_rate: LearningRate::Constant(3e38),
        beta_1: 0.999,
        ..LazyAdamConfig::default()
    };
    let (step, e) = first_bad_step(config, Extensions::default(), 5);
    assert_eq!(step, 0);
    assert!(
        matches!(
            e,
            Error::InvalidLearningRate {
                what: "bias-corrected step size",
                ..
            }
        ),
        "{e}"
    );
    // A weight-decay factor that overflows.
    let config = LazyAdamConfig {
        learning_rate: LearningRate::Constant(1e10),
        ..LazyAdamConfig::default()
    };
    let ext = Extensions {
        weight_decay: 1e30,
        ..Extensions::default()
    };
    let (_, e) = first_bad_step(config, ext, 5);
    assert!(
        matches!(
            e,
            Error::InvalidLearningRate {
                what: "weight-decay factor",
                ..
            }
        ),
        "{e}"
    );
    // Per-row bias correction bounds every row's step size up front (here
    // the global step size, 1e36, is finite; a row's may reach 1e39).
    let config = LazyAdamConfig {
        learning_rate: LearningRate::Constant(1e37),
        beta_1: 0.99,
        beta_2: 0.999_999,
        ..LazyAdamConfig::default()
    };
    let ext = Extensions {
        per_row_bias_correction: true,
        ..Extensions::default()
    };
    let (_, e) = first_bad_step(config, ext, 5);
    assert!(
        matches!(
            e,
            Error::InvalidLearningRate {
                what: "bias-corrected step size",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn epsilon_zero_is_rejected() {
    let e = LazyAdam::new(LazyAdamConfig {
        epsilon: 0.0,
        ..LazyAdamConfig::default()
    })
    .unwrap_err();
    assert!(e.to_string().contains("epsilon"), "{e}");
}

// Finding 4: loss scaling never applies a non-finite value.

#[test]
fn loss_scales_whose_inverse_overflows_are_rejected() {
    for scale in [
        1e-39f32,
        0.0,
        -1.0,
        f32::NAN,
        f32::INFINITY,
        f32::from_bits(1),
    ] {
        let ext = Extensions {
            non_finite: NonFinitePolicy::SkipStep {
                loss_scale: Some(DynamicLossScale {
                    scale,
                    ..DynamicLossScale::default()
                }),
            },
            ..Extensions::default()
        };
        let e = LazyAdam::with_extensions(LazyAdamConfig::default(), ext).unwrap_err();
        assert!(e.to_string().contains("loss_scale.scale"), "{scale}: {e}");
    }
}

#[test]
fn at_the_backoff_floor_overflowing_gradients_are_skipped() {
    let ext = Extensions {
        non_finite: NonFinitePolicy::SkipStep {
            loss_scale: Some(DynamicLossScale::default()),
        },
        ..Extensions::default()
    };
    let mut opt = LazyAdam::with_extensions(LazyAdamConfig::default(), ext).unwrap();
    let a = opt
        .add_variable("a", &[2, 2], DType::F32, DType::F32)
        .unwrap();
    let mut p = vec![1.0f32; 4];
    // Back off to the floor: 32768 halves to f32::MIN_POSITIVE in 141 steps.
    for _ in 0..200 {
        let o = opt
            .apply_gradients(&mut [Update::new(
                a,
                &mut p,
                Gradient::sparse(&[0u32], &[f32::NAN, 1.0]),
            )])
            .unwrap();
        assert_eq!(o, StepOutcome::Skipped);
    }
    assert_eq!(opt.loss_scale(), Some(f32::MIN_POSITIVE));
    assert_eq!(p, vec![1.0f32; 4]);
    // A finite gradient of 10 unscales to 10 * 2^126: infinite. Skipped, not applied.
    let before = snapshot(&opt, &[&p]);
    let o = opt
        .apply_gradients(&mut [Update::new(
            a,
            &mut p,
            Gradient::sparse(&[1u32], &[10.0f32, 0.0]),
        )])
        .unwrap();
    assert_eq!(o, StepOutcome::Skipped);
    assert_eq!(snapshot(&opt, &[&p]).params, before.params);
    assert_eq!(opt.iterations(), 0);
    // A zero gradient is applied and stays finite (0 * 2^126 = 0).
    let o = opt
        .apply_gradients(&mut [Update::new(
            a,
            &mut p,
            Gradient::sparse(&[1u32], &[0.0f32, 1e-30]),
        )])
        .unwrap();
    assert_eq!(o, StepOutcome::Applied);
    assert!(p.iter().all(|x| x.is_finite()), "{p:?}");
}

// Finding 5: handles are tied to their optimizer.

#[test]
fn handles_from_another_optimizer_are_rejected() {
    let mut one = LazyAdam::new(LazyAdamConfig::default()).unwrap();
    let mut two = LazyAdam::new(LazyAdamConfig::default()).unwrap();
    let a1 = one.add_variable("a", &[2], DType::F32, DType::F32).unwrap();
    let a2 = two.add_variable("a", &[2], DType::F32, DType::F32).unwrap();
    assert_eq!(a1.index(), a2.index());
    assert_ne!(a1, a2);
    let mut p = vec![1.0f32; 2];
    let before = snapshot(&one, &[&p]);
    let e = one
        .apply_gradients(&mut [Update::new(a2, &mut p, Gradient::dense(&[1.0f32, 1.0]))])
        .unwrap_err();
    assert!(
        matches!(&e, Error::UnknownVariable { variable } if variable.contains("another optimizer")),
        "{e}"
    );
    assert_eq!(snapshot(&one, &[&p]), before);
    assert!(one.variable(a2).is_none());
    assert!(one.slots(a2).is_none());
    assert!(one.row_steps(a2).is_none());
    // A loaded copy is another optimizer: it issues its own handles.
    let loaded = LazyAdam::from_bytes(&one.to_bytes().unwrap()).unwrap();
    assert!(loaded.variable(a1).is_none());
    let a3: VarId = loaded.variable_id("a").unwrap();
    assert!(loaded.slots(a3).is_some());
    assert!(
        loaded
            .variable_ids()
            .all(|id| loaded.variable(id).is_some())
    );
}

// Arithmetic: the reference's f32 bias correction.

/// The reproducer: lr = 1.0, default betas and epsilon, variable
/// `[0.0]`, gradient `1.0` twice. TF 2.15.1 + TFA 0.23.0 give -0.99999684,
/// then -1.9999912 (dense and sparse alike).
#[test]
fn lr_one_matches_tensorflow_bit_for_bit() {
    let tf = [-0.999_996_84f32, -1.999_991_2];
    for sparse in [false, true] {
        let config = LazyAdamConfig {
            learning_rate: LearningRate::Constant(1.0),
            ..LazyAdamConfig::default()
        };
        let mut opt = LazyAdam::new(config).unwrap();
        let v = opt.add_variable("v", &[1], DType::F32, DType::F32).unwrap();
        let mut p = [0.0f32];
        for want in tf {
            let g = if sparse {
                Gradient::sparse(&[0u32], &[1.0f32])
            } else {
                Gradient::dense(&[1.0f32])
            };
            opt.apply_gradients(&mut [Update::new(v, &mut p, g)])
                .unwrap();
            assert_eq!(
                p[0].to_bits(),
                want.to_bits(),
                "sparse {sparse}: {} vs TF {want}",
                p[0]
            );
        }
    }
    // The f64 evaluation is kept as an option, and differs from TF there.
    let ext = Extensions {
        bias_correction: BiasCorrection::F64,
        ..Extensions::default()
    };
    let config = LazyAdamConfig {
        learning_rate: LearningRate::Constant(1.0),
        ..LazyAdamConfig::default()
    };
    let mut opt = LazyAdam::with_extensions(config, ext).unwrap();
    let v = opt.add_variable("v", &[1], DType::F32, DType::F32).unwrap();
    let mut p = [0.0f32];
    for _ in 0..2 {
        opt.apply_gradients(&mut [Update::new(v, &mut p, Gradient::dense(&[1.0f32]))])
            .unwrap();
    }
    assert_eq!(p[0], -1.999_994_5);
}
