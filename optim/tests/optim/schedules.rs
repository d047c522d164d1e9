//! Schedules against values computed by hand from the Keras formulas, and the
//! learning rate of a step (schedule, legacy decay).

use lazyadam::{LazyAdamConfig, LearningRate, LearningRateSchedule, Schedule};

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 + 1e-9 * b.abs()
}

fn check(s: &Schedule, expected: &[(u64, f64)]) {
    for &(step, want) in expected {
        let got = s.evaluate(step);
        assert!(close(got, want), "{s:?} at {step}: got {got}, want {want}");
        assert_eq!(s.learning_rate(step), want as f32, "{s:?} at {step} (f32)");
    }
}

#[test]
fn exponential_decay() {
    let s = Schedule::ExponentialDecay {
        initial_learning_rate: 0.05,
        decay_steps: 2.0,
        decay_rate: 0.5,
        staircase: false,
    };
    check(
        &s,
        &[
            (0, 0.05),
            (2, 0.025),
            (3, 0.05 * 0.5f64.powf(1.5)),
            (6, 0.00625),
        ],
    );
    let s = Schedule::ExponentialDecay {
        initial_learning_rate: 0.05,
        decay_steps: 2.0,
        decay_rate: 0.5,
        staircase: true,
    };
    check(
        &s,
        &[(0, 0.05), (1, 0.05), (2, 0.025), (3, 0.025), (5, 0.0125)],
    );
}

#[test]
fn piecewise_constant_decay() {
    let s = Schedule::PiecewiseConstantDecay {
        boundaries: vec![1.0, 3.0],
        values: vec![0.1, 0.01, 0.001],
    };
    // values[0] while step <= 1, values[1] while 1 < step <= 3, then values[2].
    check(
        &s,
        &[
            (0, 0.1),
            (1, 0.1),
            (2, 0.01),
            (3, 0.01),
            (4, 0.001),
            (1000, 0.001),
        ],
    );
}

#[test]
fn polynomial_decay() {
    let s = Schedule::PolynomialDecay {
        initial_learning_rate: 0.1,
        decay_steps: 4.0,
        end_learning_rate: 0.01,
        power: 2.0,
        cycle: false,
    };
    check(
        &s,
        &[(0, 0.1), (2, 0.09 * 0.25 + 0.01), (4, 0.01), (10, 0.01)],
    );
    let s = Schedule::PolynomialDecay {
        initial_learning_rate: 0.1,
        decay_steps: 2.0,
        end_learning_rate: 0.01,
        power: 1.0,
        cycle: true,
    };
    // Step 0 uses a multiplier of 1; then decay_steps * ceil(step / decay_steps).
    check(
        &s,
        &[
            (0, 0.1),
            (1, 0.055),
            (2, 0.01),
            (3, 0.09 * 0.25 + 0.01),
            (4, 0.01),
            (5, 0.09 * (1.0 / 6.0) + 0.01),
        ],
    );
}

#[test]
fn inverse_time_decay() {
    let s = Schedule::InverseTimeDecay {
        initial_learning_rate: 0.1,
        decay_steps: 2.0,
        decay_rate: 0.5,
        staircase: false,
    };
    check(&s, &[(0, 0.1), (1, 0.1 / 1.25), (4, 0.05)]);
    let s = Schedule::InverseTimeDecay {
        initial_learning_rate: 0.1,
        decay_steps: 2.0,
        decay_rate: 0.5,
        staircase: true,
    };
    check(&s, &[(1, 0.1), (3, 0.1 / 1.5)]);
}

#[test]
fn cosine_decay() {
    let s = Schedule::CosineDecay {
        initial_learning_rate: 0.1,
        decay_steps: 4.0,
        alpha: 0.1,
        warmup_target: None,
        warmup_steps: 0.0,
    };
    let at = |frac: f64| 0.1 * (0.9 * 0.5 * (1.0 + (std::f64::consts::PI * frac).cos()) + 0.1);
    check(
        &s,
        &[(0, 0.1), (1, at(0.25)), (2, 0.055), (4, 0.01), (9, 0.01)],
    );
}

#[test]
fn cosine_decay_with_warmup() {
    let s = Schedule::CosineDecay {
        initial_learning_rate: 0.0,
        decay_steps: 4.0,
        alpha: 0.0,
        warmup_target: Some(0.1),
        warmup_steps: 2.0,
    };
    // Linear warmup 0 -> 0.1 over 2 steps, then cosine from 0.1 over 4 steps.
    let cos = |frac: f64| 0.1 * 0.5 * (1.0 + (std::f64::consts::PI * frac).cos());
    check(
        &s,
        &[
            (0, 0.0),
            (1, 0.05),
            (2, 0.1),
            (3, cos(0.25)),
            (4, cos(0.5)),
            (6, 0.0),
            (50, 0.0),
        ],
    );
}

#[test]
fn cosine_decay_restarts() {
    let s = Schedule::CosineDecayRestarts {
        initial_learning_rate: 0.1,
        first_decay_steps: 2.0,
        t_mul: 2.0,
        m_mul: 0.5,
        alpha: 0.01,
    };
    let lr = |m_fac: f64, frac: f64| {
        0.1 * (0.99 * 0.5 * m_fac * (1.0 + (std::f64::consts::PI * frac).cos()) + 0.01)
    };
    // Periods: [0, 2), [2, 6), [6, 14) with m_fac 1, 0.5, 0.25.
    check(
        &s,
        &[
            (0, lr(1.0, 0.0)),
            (1, lr(1.0, 0.5)),
            (2, lr(0.5, 0.0)),
            (3, lr(0.5, 0.25)),
            (4, lr(0.5, 0.5)),
            (6, lr(0.25, 0.0)),
            (10, lr(0.25, 0.5)),
        ],
    );
    let s = Schedule::CosineDecayRestarts {
        initial_learning_rate: 1.0,
        first_decay_steps: 4.0,
        t_mul: 1.0,
        m_mul: 1.0,
        alpha: 0.0,
    };
    let c = |frac: f64| 0.5 * (1.0 + (std::f64::consts::PI * frac).cos());
    check(
        &s,
        &[(0, 1.0), (2, 0.5), (4, 1.0), (5, c(0.25)), (9, c(0.25))],
    );
}

#[test]
fn legacy_decay_and_schedules_at_iterations() {
    let config = LazyAdamConfig {
        learning_rate: LearningRate::Constant(0.1),
        decay: 0.5,
        ..LazyAdamConfig::default()
    };
    assert_eq!(config.learning_rate_at(0), 0.1);
    assert_eq!(config.learning_rate_at(2), 0.1f32 / (1.0 + 0.5 * 2.0));
    let config = LazyAdamConfig {
        learning_rate: LearningRate::Schedule(Schedule::PiecewiseConstantDecay {
            boundaries: vec![1.0],
            values: vec![1.0, 0.5],
        }),
        decay: 1.0,
        ..LazyAdamConfig::default()
    };
    assert_eq!(config.learning_rate_at(1), 0.5);
    assert_eq!(config.learning_rate_at(2), 0.5 / 3.0);
}

#[test]
fn schedules_parse_from_keras_json() {
    let json = r#"{"name": "LazyAdam", "learning_rate": {"module": "keras.optimizers.schedules",
        "class_name": "CosineDecayRestarts", "config": {"initial_learning_rate": 0.1,
        "first_decay_steps": 2, "t_mul": 2.0, "m_mul": 0.5, "alpha": 0.01, "name": null},
        "registered_name": null}, "decay": 0.0, "beta_1": 0.8999999761581421,
        "beta_2": 0.9990000128746033, "epsilon": 1e-07, "amsgrad": false}"#;
    let c = LazyAdamConfig::from_keras_json(json).unwrap();
    assert_eq!(
        c.learning_rate,
        LearningRate::Schedule(Schedule::CosineDecayRestarts {
            initial_learning_rate: 0.1,
            first_decay_steps: 2.0,
            t_mul: 2.0,
            m_mul: 0.5,
            alpha: 0.01,
        })
    );
    // Older Keras writes only class_name and config.
    let json = r#"{"learning_rate": {"class_name": "ExponentialDecay", "config":
        {"initial_learning_rate": 0.05, "decay_steps": 2, "decay_rate": 0.5}}}"#;
    let c = LazyAdamConfig::from_keras_json(json).unwrap();
    assert_eq!(c.learning_rate_at(2), 0.025);
}

/// 0.01 at every step; when `strict`, NaN when asked again about the step it was last asked
/// about (a stateful user schedule: the trait takes `&self`). Its `Debug` (which a sharded
/// group's configuration fingerprint includes) is the same either way.
pub(crate) struct OnceAStep {
    strict: bool,
    last: std::sync::Mutex<Option<u64>>,
}

impl OnceAStep {
    pub(crate) fn new(strict: bool) -> Self {
        OnceAStep {
            strict,
            last: std::sync::Mutex::new(None),
        }
    }
}

impl std::fmt::Debug for OnceAStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnceAStep")
    }
}

impl LearningRateSchedule for OnceAStep {
    fn learning_rate(&self, step: u64) -> f32 {
        let mut last = self.last.lock().unwrap();
        if self.strict && *last == Some(step) {
            return f32::NAN;
        }
        *last = Some(step);
        0.01
    }
}

#[test]
fn a_step_evaluates_its_schedule_once_and_uses_the_rate_it_checked() {
    // A step that checked one evaluation of a (stateful) user schedule and used another could
    // write with a rate nobody checked. With the schedule asked once per step, every step
    // applies and equals the same steps with the constant rate, bit for bit.
    use lazyadam::{CustomSchedule, DType, Gradient, LazyAdam, StepOutcome, Update};
    let run = |lr: LearningRate| {
        let cfg = LazyAdamConfig {
            learning_rate: lr,
            ..LazyAdamConfig::default()
        };
        let mut opt = LazyAdam::new(cfg).unwrap();
        let id = opt
            .add_variable("t", &[4, 2], DType::F32, DType::F32)
            .unwrap();
        let mut p = [0.5f32; 8];
        let mut outcomes = Vec::new();
        for step in 0..3u32 {
            let ids = [step % 4, 3, step % 4];
            let g = [0.25f32, -1.0, 2.0, 0.5, -0.75, 1.5];
            let mut u = [Update::new(
                id,
                &mut p[..],
                Gradient::sparse(&ids[..], &g[..]),
            )];
            outcomes.push(opt.apply_gradients(&mut u).map_err(|e| e.to_string()));
        }
        (outcomes, opt.iterations(), p.map(f32::to_bits))
    };
    let custom = run(LearningRate::Custom(CustomSchedule::new(OnceAStep::new(
        true,
    ))));
    assert_eq!(custom.0, vec![Ok(StepOutcome::Applied); 3]);
    assert_eq!(custom, run(LearningRate::Constant(0.01)));
}
