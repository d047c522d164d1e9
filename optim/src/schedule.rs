//! Learning-rate schedules with the Keras formulas.

use std::sync::Arc;

use crate::error::ConfigError;

/// A learning-rate schedule: the learning rate as a function of the step count
/// (the optimizer's `iterations` before the update).
///
/// Implement it for your own schedules and wrap them in a [`CustomSchedule`]:
///
/// ```
/// use lazyadam::{CustomSchedule, LazyAdamConfig, LearningRate, LearningRateSchedule};
///
/// #[derive(Debug)]
/// struct Halving;
/// impl LearningRateSchedule for Halving {
///     fn learning_rate(&self, step: u64) -> f32 {
///         0.1 / (1u64 << step.min(60)) as f32
///     }
/// }
/// let config = LazyAdamConfig {
///     learning_rate: LearningRate::Custom(CustomSchedule::new(Halving)),
///     ..LazyAdamConfig::default()
/// };
/// assert_eq!(config.learning_rate_at(1), 0.05);
/// ```
pub trait LearningRateSchedule: Send + Sync + core::fmt::Debug {
    /// The learning rate at `step` (the number of steps already taken).
    fn learning_rate(&self, step: u64) -> f32;
}

/// A user schedule behind an `Arc`. Equality is pointer identity.
#[derive(Clone, Debug)]
pub struct CustomSchedule(pub Arc<dyn LearningRateSchedule>);

impl CustomSchedule {
    /// Wraps a schedule.
    pub fn new(schedule: impl LearningRateSchedule + 'static) -> Self {
        CustomSchedule(Arc::new(schedule))
    }
}

impl PartialEq for CustomSchedule {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl LearningRateSchedule for CustomSchedule {
    fn learning_rate(&self, step: u64) -> f32 {
        self.0.learning_rate(step)
    }
}

/// The Keras built-in schedules (`keras.optimizers.schedules`), with the fields
/// named as in their `get_config()`.
///
/// Formulas follow `learning_rate_schedule.py` of Keras 2.15; they are
/// evaluated in f64 and rounded to f32 once (Keras evaluates in f32; the
/// difference is within an f32 ulp or two).
#[derive(Clone, Debug, PartialEq)]
pub enum Schedule {
    /// `initial_learning_rate * decay_rate ^ (step / decay_steps)` (floored
    /// exponent when `staircase`).
    ExponentialDecay {
        /// Learning rate at step 0.
        initial_learning_rate: f64,
        /// Steps per decay period (> 0).
        decay_steps: f64,
        /// Factor per period.
        decay_rate: f64,
        /// Decay in discrete intervals.
        staircase: bool,
    },
    /// `values[0]` while `step <= boundaries[0]`, `values[i]` while
    /// `boundaries[i-1] < step <= boundaries[i]`, the last value afterwards.
    PiecewiseConstantDecay {
        /// Increasing step boundaries.
        boundaries: Vec<f64>,
        /// One more value than boundaries.
        values: Vec<f64>,
    },
    /// `(initial - end) * (1 - step/decay_steps)^power + end`, with the step
    /// clamped to `decay_steps`, or (with `cycle`) `decay_steps` multiplied by
    /// `ceil(step/decay_steps)` (1 at step 0).
    PolynomialDecay {
        /// Learning rate at step 0.
        initial_learning_rate: f64,
        /// Steps to reach the end rate (> 0).
        decay_steps: f64,
        /// Final learning rate.
        end_learning_rate: f64,
        /// Exponent.
        power: f64,
        /// Restart after `decay_steps`.
        cycle: bool,
    },
    /// `initial_learning_rate / (1 + decay_rate * step / decay_steps)` (floored
    /// ratio when `staircase`).
    InverseTimeDecay {
        /// Learning rate at step 0.
        initial_learning_rate: f64,
        /// Steps per period (> 0).
        decay_steps: f64,
        /// Rate of decay.
        decay_rate: f64,
        /// Decay in discrete intervals.
        staircase: bool,
    },
    /// Cosine decay, with an optional linear warmup from
    /// `initial_learning_rate` to `warmup_target` over `warmup_steps`.
    CosineDecay {
        /// Learning rate at step 0.
        initial_learning_rate: f64,
        /// Steps of the cosine phase (> 0).
        decay_steps: f64,
        /// Minimum as a fraction of the start rate.
        alpha: f64,
        /// Peak after warmup (`None`: no warmup).
        warmup_target: Option<f64>,
        /// Warmup length in steps.
        warmup_steps: f64,
    },
    /// SGDR: cosine decay with warm restarts.
    CosineDecayRestarts {
        /// Learning rate at step 0.
        initial_learning_rate: f64,
        /// Length of the first period (> 0).
        first_decay_steps: f64,
        /// Period length multiplier.
        t_mul: f64,
        /// Learning rate multiplier per restart.
        m_mul: f64,
        /// Minimum as a fraction of the start rate.
        alpha: f64,
    },
}

impl Schedule {
    /// The Keras class name (`"ExponentialDecay"`, ...).
    pub fn class_name(&self) -> &'static str {
        match self {
            Schedule::ExponentialDecay { .. } => "ExponentialDecay",
            Schedule::PiecewiseConstantDecay { .. } => "PiecewiseConstantDecay",
            Schedule::PolynomialDecay { .. } => "PolynomialDecay",
            Schedule::InverseTimeDecay { .. } => "InverseTimeDecay",
            Schedule::CosineDecay { .. } => "CosineDecay",
            Schedule::CosineDecayRestarts { .. } => "CosineDecayRestarts",
        }
    }

    /// The learning rate at `step`, in f64.
    pub fn evaluate(&self, step: u64) -> f64 {
        let s = step as f64;
        match *self {
            Schedule::ExponentialDecay {
                initial_learning_rate,
                decay_steps,
                decay_rate,
                staircase,
            } => {
                let mut p = s / decay_steps;
                if staircase {
                    p = p.floor();
                }
                initial_learning_rate * decay_rate.powf(p)
            }
            Schedule::PiecewiseConstantDecay {
                ref boundaries,
                ref values,
            } => {
                // values[i] for the first boundary with step <= boundary.
                let i = boundaries
                    .iter()
                    .position(|&b| s <= b)
                    .unwrap_or(boundaries.len());
                values.get(i).or(values.last()).copied().unwrap_or(0.0)
            }
            Schedule::PolynomialDecay {
                initial_learning_rate,
                decay_steps,
                end_learning_rate,
                power,
                cycle,
            } => {
                let mut step_r = s;
                let mut steps = decay_steps;
                if cycle {
                    let mult = if s == 0.0 {
                        1.0
                    } else {
                        (s / decay_steps).ceil()
                    };
                    steps = decay_steps * mult;
                } else {
                    step_r = step_r.min(decay_steps);
                }
                let p = step_r / steps;
                (initial_learning_rate - end_learning_rate) * (1.0 - p).powf(power)
                    + end_learning_rate
            }
            Schedule::InverseTimeDecay {
                initial_learning_rate,
                decay_steps,
                decay_rate,
                staircase,
            } => {
                let mut p = s / decay_steps;
                if staircase {
                    p = p.floor();
                }
                initial_learning_rate / (1.0 + decay_rate * p)
            }
            Schedule::CosineDecay {
                initial_learning_rate,
                decay_steps,
                alpha,
                warmup_target,
                warmup_steps,
            } => {
                let decay = |step: f64, from: f64| {
                    let frac = step / decay_steps;
                    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * frac).cos());
                    from * ((1.0 - alpha) * cosine + alpha)
                };
                match warmup_target {
                    None => decay(s.min(decay_steps), initial_learning_rate),
                    Some(target) => {
                        let st = s.min(decay_steps + warmup_steps);
                        if st < warmup_steps {
                            (target - initial_learning_rate) * (st / warmup_steps)
                                + initial_learning_rate
                        } else {
                            decay(st - warmup_steps, target)
                        }
                    }
                }
            }
            Schedule::CosineDecayRestarts {
                initial_learning_rate,
                first_decay_steps,
                t_mul,
                m_mul,
                alpha,
            } => {
                let mut frac = s / first_decay_steps;
                let i_restart;
                if t_mul == 1.0 {
                    i_restart = frac.floor();
                    frac -= i_restart;
                } else {
                    i_restart = ((1.0 - frac * (1.0 - t_mul)).ln() / t_mul.ln()).floor();
                    let sum_r = (1.0 - t_mul.powf(i_restart)) / (1.0 - t_mul);
                    frac = (frac - sum_r) / t_mul.powf(i_restart);
                }
                let m_fac = m_mul.powf(i_restart);
                let cosine = 0.5 * m_fac * (1.0 + (std::f64::consts::PI * frac).cos());
                initial_learning_rate * ((1.0 - alpha) * cosine + alpha)
            }
        }
    }

    /// Checks the fields: positive period lengths, learning rates finite, not
    /// negative and within f32, one more value than boundaries, and the
    /// parameters that would make the rate NaN, infinite or negative at some
    /// step (a negative `power`, a negative `alpha`, `t_mul` below 1).
    /// Schedules that grow (`decay_rate` above 1, `m_mul` above 1) are
    /// accepted: a step whose rate overflows fails with
    /// [`Error::InvalidLearningRate`](crate::Error::InvalidLearningRate).
    /// `prefix` names the key in errors.
    pub(crate) fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        let key = |k: &str| format!("{prefix}.config.{k}");
        let finite = |k: &str, x: f64| {
            if x.is_finite() {
                Ok(())
            } else {
                Err(ConfigError::invalid(key(k), "must be finite"))
            }
        };
        let non_negative = |k: &str, x: f64| {
            finite(k, x)?;
            if x >= 0.0 {
                Ok(())
            } else {
                Err(ConfigError::invalid(key(k), "must not be negative"))
            }
        };
        let positive = |k: &str, x: f64| {
            finite(k, x)?;
            if x > 0.0 {
                Ok(())
            } else {
                Err(ConfigError::invalid(key(k), "must be positive"))
            }
        };
        // A learning rate the schedule takes as is: it must fit an f32 (as a
        // constant rate must).
        let rate = |k: &str, x: f64| {
            non_negative(k, x)?;
            if x <= f32::MAX as f64 {
                Ok(())
            } else {
                Err(ConfigError::invalid(
                    key(k),
                    format!("{x:e} does not fit a float32 learning rate"),
                ))
            }
        };
        let at_least = |k: &str, x: f64, min: f64, why: &str| {
            finite(k, x)?;
            if x >= min {
                Ok(())
            } else {
                Err(ConfigError::invalid(
                    key(k),
                    format!("must be at least {min}, got {x}: {why}"),
                ))
            }
        };
        match self {
            Schedule::ExponentialDecay {
                initial_learning_rate,
                decay_steps,
                decay_rate,
                ..
            }
            | Schedule::InverseTimeDecay {
                initial_learning_rate,
                decay_steps,
                decay_rate,
                ..
            } => {
                rate("initial_learning_rate", *initial_learning_rate)?;
                positive("decay_steps", *decay_steps)?;
                non_negative("decay_rate", *decay_rate)?;
            }
            Schedule::PiecewiseConstantDecay { boundaries, values } => {
                if values.len() != boundaries.len() + 1 {
                    return Err(ConfigError::invalid(
                        key("values"),
                        format!(
                            "needs one more value than boundaries ({} boundaries, {} values)",
                            boundaries.len(),
                            values.len()
                        ),
                    ));
                }
                for &b in boundaries {
                    finite("boundaries", b)?;
                }
                if boundaries.windows(2).any(|w| w[1] < w[0]) {
                    return Err(ConfigError::invalid(
                        key("boundaries"),
                        "must be non-decreasing",
                    ));
                }
                for &v in values {
                    rate("values", v)?;
                }
            }
            Schedule::PolynomialDecay {
                initial_learning_rate,
                decay_steps,
                end_learning_rate,
                power,
                ..
            } => {
                rate("initial_learning_rate", *initial_learning_rate)?;
                positive("decay_steps", *decay_steps)?;
                rate("end_learning_rate", *end_learning_rate)?;
                at_least(
                    "power",
                    *power,
                    0.0,
                    "a negative power makes the rate infinite where the decay ends",
                )?;
            }
            Schedule::CosineDecay {
                initial_learning_rate,
                decay_steps,
                alpha,
                warmup_target,
                warmup_steps,
            } => {
                rate("initial_learning_rate", *initial_learning_rate)?;
                positive("decay_steps", *decay_steps)?;
                at_least(
                    "alpha",
                    *alpha,
                    0.0,
                    "a negative alpha makes the rate negative (gradient ascent)",
                )?;
                if let Some(t) = warmup_target {
                    rate("warmup_target", *t)?;
                    if *warmup_steps != 0.0 {
                        positive("warmup_steps", *warmup_steps)?;
                    }
                }
                non_negative("warmup_steps", *warmup_steps)?;
            }
            Schedule::CosineDecayRestarts {
                initial_learning_rate,
                first_decay_steps,
                t_mul,
                m_mul,
                alpha,
            } => {
                rate("initial_learning_rate", *initial_learning_rate)?;
                positive("first_decay_steps", *first_decay_steps)?;
                at_least(
                    "t_mul",
                    *t_mul,
                    1.0,
                    "with t_mul < 1 the periods shrink and the rate is NaN after \
                     first_decay_steps / (1 - t_mul) steps",
                )?;
                non_negative("m_mul", *m_mul)?;
                at_least(
                    "alpha",
                    *alpha,
                    0.0,
                    "a negative alpha makes the rate negative (gradient ascent)",
                )?;
            }
        }
        Ok(())
    }
}

impl LearningRateSchedule for Schedule {
    fn learning_rate(&self, step: u64) -> f32 {
        self.evaluate(step) as f32
    }
}
