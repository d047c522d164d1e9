//! Options beyond the reference.

use lazyadam_kernels::{Isa, LongRowLoop};
use serde_json::{Map, Value, json};

use crate::error::ConfigError;

/// Options beyond the reference. The default turns every one off, so the
/// reference semantics hold.
#[derive(Clone, Debug, PartialEq)]
pub struct Extensions {
    /// AMSGrad also on sparse gradients (needs `amsgrad = true` in the
    /// config; the reference silently ignores `vhat` for sparse gradients).
    pub sparse_amsgrad: bool,
    /// Decoupled weight decay (LazyAdamW): before the Adam update, each row in
    /// the step (every element for a dense gradient) gets
    /// `p -= weight_decay * lr * p`, with `lr` the step's (scheduled, decayed)
    /// learning rate. 0 turns it off.
    pub weight_decay: f32,
    /// Maximize the objective (the gradient is negated after clipping).
    pub maximize: bool,
    /// Bias correction from each row's own update count instead of the global
    /// step count (a per-row counter is kept and checkpointed).
    pub per_row_bias_correction: bool,
    /// Before updating a row skipped for `k` steps, decay its moments as dense
    /// Adam would have: `m *= beta_1^k`, `v *= beta_2^k` (`vhat` is kept). A
    /// per-row "last updated" step is kept and checkpointed.
    pub catch_up_decay: bool,
    /// What to do with NaN and infinities in gradients.
    pub non_finite: NonFinitePolicy,
    /// Round f16/bf16 parameter stores stochastically with this seed
    /// (reproducible: the random bits depend on the seed, the step, the
    /// variable and the element only). f32 parameters are unaffected.
    pub stochastic_rounding: Option<u64>,
    /// Force a kernel path (tests and benches). `None` picks the best one.
    pub kernel: Option<Isa>,
    /// The kernels' loop for rows of 65,536 elements or more, such as a dense
    /// variable's leaves. The default, [`LongRowLoop::Auto`], takes the one
    /// measured faster for this CPU; benches force one.
    /// Same bits either way.
    pub long_row_loop: LongRowLoop,
    /// Below this many updated elements in a step, the step stays on the
    /// calling thread (default 32 768). Passes over a gradient's values (its
    /// sum of squares for clipping, the non-finite policy's check) use the
    /// pool from 4 x this many values.
    pub parallel_min_elements: usize,
    /// How the bias-corrected step size is evaluated (default: as the
    /// reference, in f32).
    pub bias_correction: BiasCorrection,
}

/// How the bias-corrected step size `lr * sqrt(1 - beta_2^t) / (1 - beta_1^t)`
/// is evaluated, once per step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum BiasCorrection {
    /// As the reference: the step `t` rounded to f32, the powers
    /// `beta^t` correctly rounded to f32 (what the reference's `tf.pow` gives
    /// on glibc), then `lr * sqrt(1 - beta_2^t) / (1 - beta_1^t)` in f32, in
    /// that order. The conformance guarantees refer to this mode.
    #[default]
    Reference,
    /// Everything in f64 from the f32 inputs, rounded to f32 once: closer to
    /// the exact value (the reference's f32 evaluation is off by up to tens
    /// of ulps in the first steps, where `1 - beta_1^t` is small), but not
    /// the reference's bits.
    F64,
}

impl BiasCorrection {
    /// The name used in serialized extensions (`"reference"`, `"f64"`).
    pub fn name(self) -> &'static str {
        match self {
            BiasCorrection::Reference => "reference",
            BiasCorrection::F64 => "f64",
        }
    }
}

/// Default of [`Extensions::parallel_min_elements`].
pub const DEFAULT_PARALLEL_MIN_ELEMENTS: usize = 32_768;

impl Default for Extensions {
    fn default() -> Self {
        Extensions {
            sparse_amsgrad: false,
            weight_decay: 0.0,
            maximize: false,
            per_row_bias_correction: false,
            catch_up_decay: false,
            non_finite: NonFinitePolicy::Propagate,
            stochastic_rounding: None,
            kernel: None,
            long_row_loop: LongRowLoop::Auto,
            parallel_min_elements: DEFAULT_PARALLEL_MIN_ELEMENTS,
            bias_correction: BiasCorrection::Reference,
        }
    }
}

/// Builder-style construction: start from `Extensions::default()` (every
/// extension off) and chain `with_*` calls; the values are checked when the
/// optimizer is built.
///
/// ```
/// use lazyadam::{Extensions, LazyAdam, LazyAdamConfig, NonFinitePolicy};
/// let ext = Extensions::default()
///     .with_weight_decay(0.01)
///     .with_per_row_bias_correction(true)
///     .with_non_finite(NonFinitePolicy::Error);
/// let opt = LazyAdam::with_extensions(LazyAdamConfig::new(1e-3), ext)?;
/// assert_eq!(opt.extensions().weight_decay, 0.01);
/// // A negative weight decay is refused.
/// let bad = Extensions::default().with_weight_decay(-1.0);
/// assert!(LazyAdam::with_extensions(LazyAdamConfig::new(1e-3), bad).is_err());
/// # Ok::<(), lazyadam::Error>(())
/// ```
impl Extensions {
    /// AMSGrad on sparse gradients too (needs `amsgrad` in the config).
    #[must_use]
    pub fn with_sparse_amsgrad(mut self, on: bool) -> Self {
        self.sparse_amsgrad = on;
        self
    }

    /// Decoupled weight decay (LazyAdamW); 0 turns it off.
    #[must_use]
    pub fn with_weight_decay(mut self, weight_decay: f32) -> Self {
        self.weight_decay = weight_decay;
        self
    }

    /// Maximize the objective.
    #[must_use]
    pub fn with_maximize(mut self, on: bool) -> Self {
        self.maximize = on;
        self
    }

    /// Bias correction from each row's own update count.
    #[must_use]
    pub fn with_per_row_bias_correction(mut self, on: bool) -> Self {
        self.per_row_bias_correction = on;
        self
    }

    /// Catch-up decay of the moments of rows skipped for some steps.
    #[must_use]
    pub fn with_catch_up_decay(mut self, on: bool) -> Self {
        self.catch_up_decay = on;
        self
    }

    /// What to do with NaN and infinities in gradients.
    #[must_use]
    pub fn with_non_finite(mut self, policy: NonFinitePolicy) -> Self {
        self.non_finite = policy;
        self
    }

    /// Stochastic rounding of 16-bit parameter stores with this seed
    /// (`None`: round to nearest).
    #[must_use]
    pub fn with_stochastic_rounding(mut self, seed: Option<u64>) -> Self {
        self.stochastic_rounding = seed;
        self
    }

    /// Forces a kernel path (`None`: the best one for this CPU).
    #[must_use]
    pub fn with_kernel(mut self, kernel: Option<Isa>) -> Self {
        self.kernel = kernel;
        self
    }

    /// The kernels' loop for long rows (default [`LongRowLoop::Auto`]; same
    /// bits either way).
    ///
    /// ```
    /// use lazyadam::{Extensions, LazyAdam, LazyAdamConfig, kernels::LongRowLoop};
    /// let ext = Extensions::default().with_long_row_loop(LongRowLoop::Split);
    /// let opt = LazyAdam::with_extensions(LazyAdamConfig::new(1e-3), ext)?;
    /// assert_eq!(opt.extensions().long_row_loop, LongRowLoop::Split);
    /// # Ok::<(), lazyadam::Error>(())
    /// ```
    #[must_use]
    pub fn with_long_row_loop(mut self, long_row_loop: LongRowLoop) -> Self {
        self.long_row_loop = long_row_loop;
        self
    }

    /// Steps with fewer updated elements stay on the calling thread.
    #[must_use]
    pub fn with_parallel_min_elements(mut self, n: usize) -> Self {
        self.parallel_min_elements = n;
        self
    }

    /// How the bias-corrected step size is evaluated.
    #[must_use]
    pub fn with_bias_correction(mut self, mode: BiasCorrection) -> Self {
        self.bias_correction = mode;
        self
    }
}

/// What to do when a gradient holds NaN or an infinity.
#[derive(Clone, Debug, PartialEq, Default)]
pub enum NonFinitePolicy {
    /// Apply it anyway, as the reference does (NaN spreads into the rows).
    #[default]
    Propagate,
    /// Reject the step with [`Error::NonFinite`](crate::Error::NonFinite)
    /// when a gradient value is NaN or infinite, and with
    /// [`Error::NonFiniteSum`](crate::Error::NonFiniteSum) when the
    /// occurrences of a sparse gradient's duplicate row sum to one (the
    /// reference would apply an infinite gradient there, and NaN can follow
    /// in the row); nothing is written.
    ///
    /// The sums are the step's own: the transformed values (after clipping)
    /// added in f32 in occurrence order, so `[3e38, -3e38, 3e38]` passes and
    /// `[3e38, 3e38, -3e38]` does not. Every gradient takes one pass over
    /// its values, which finds their largest magnitude (and so whether one
    /// is NaN or infinite); with `clipnorm` or `global_clipnorm` it is the
    /// pass that sums their squares for the norm, so the check reads no
    /// value twice. A gradient of at least 4 x
    /// [`Extensions::parallel_min_elements`] values is split over the rayon
    /// pool for it, with the same verdict on any thread count. For a sparse
    /// gradient that magnitude bounds every sum, and only one with a value
    /// within a factor of about `4n` of `f32::MAX` (`n` its ids), which the
    /// bound cannot clear, has its ids grouped by row before the step; then
    /// only the rows that the same bound with their own occurrence count
    /// cannot clear are summed, over the pool when they hold at least
    /// `parallel_min_elements` values, and the row named is the first in row
    /// order on any thread count.
    ///
    /// It checks gradients and their sums, not what the update computes
    /// from them: a finite gradient above about 1.8e19 in magnitude is
    /// accepted, its square overflows, and `v` becomes +inf as in the
    /// reference. That element then takes no step, now or later
    /// (`beta_2 * inf` stays inf).
    Error,
    /// Skip the whole step ([`StepOutcome::Skipped`](crate::StepOutcome), the
    /// step counter unchanged); with a loss scale, gradients are divided by
    /// the current scale, which backs off on a skipped step and grows after
    /// `growth_interval` good steps.
    ///
    /// The check sees every gradient value after unscaling, as the reference's
    /// loss-scale optimizer does, and also the sums of a sparse gradient's
    /// duplicate rows, as [`Error`](Self::Error) describes: a row whose
    /// unscaled (and clipped) duplicates sum past `f32::MAX` skips the step,
    /// where the reference's loss-scale optimizer, which checks the values
    /// before the inner optimizer sums them, would apply an infinite
    /// gradient. That takes unscaled values near `f32::MAX / n`, with `n` the
    /// row's occurrences: a loss scale far below 1, or gradients near
    /// `f32::MAX`.
    SkipStep {
        /// Dynamic loss scaling, if the gradients are scaled.
        loss_scale: Option<DynamicLossScale>,
    },
}

/// Dynamic loss scaling (mixed-precision training): the gradients given to
/// the optimizer are `scale` times the true gradients.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DynamicLossScale {
    /// The initial scale (finite, at least `f32::MIN_POSITIVE` so that its
    /// inverse is finite), e.g. 32768.
    pub scale: f32,
    /// Multiplier after `growth_interval` consecutive finite steps (>= 1), e.g. 2.
    pub growth_factor: f32,
    /// Multiplier after a non-finite step (in (0, 1]), e.g. 0.5.
    pub backoff_factor: f32,
    /// Finite steps before the scale grows (>= 1), e.g. 2000.
    pub growth_interval: u64,
}

impl Default for DynamicLossScale {
    fn default() -> Self {
        DynamicLossScale {
            scale: 32768.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
        }
    }
}

impl Extensions {
    /// Checks the values (finite non-negative weight decay, sane loss scale).
    /// `amsgrad` is the config's flag (needed by `sparse_amsgrad`).
    pub fn validate(&self, amsgrad: bool) -> Result<(), ConfigError> {
        if !self.weight_decay.is_finite() || self.weight_decay < 0.0 {
            return Err(ConfigError::invalid(
                "weight_decay",
                format!("must be finite and not negative, got {}", self.weight_decay),
            ));
        }
        if self.sparse_amsgrad && !amsgrad {
            return Err(ConfigError::invalid(
                "sparse_amsgrad",
                "needs `amsgrad = true` in the configuration",
            ));
        }
        if let NonFinitePolicy::SkipStep {
            loss_scale: Some(ls),
        } = &self.non_finite
        {
            ls.validate()?;
        }
        Ok(())
    }

    pub(crate) fn to_value(&self) -> Value {
        let non_finite = match &self.non_finite {
            NonFinitePolicy::Propagate => json!("propagate"),
            NonFinitePolicy::Error => json!("error"),
            NonFinitePolicy::SkipStep { loss_scale } => json!({
                "skip_step": loss_scale.map(|ls| json!({
                    "scale": ls.scale,
                    "growth_factor": ls.growth_factor,
                    "backoff_factor": ls.backoff_factor,
                    "growth_interval": ls.growth_interval,
                }))
            }),
        };
        let mut v = json!({
            "sparse_amsgrad": self.sparse_amsgrad,
            "weight_decay": self.weight_decay,
            "maximize": self.maximize,
            "per_row_bias_correction": self.per_row_bias_correction,
            "catch_up_decay": self.catch_up_decay,
            "non_finite": non_finite,
            "stochastic_rounding": self.stochastic_rounding,
            "kernel": self.kernel.map(|k| k.name()),
            "parallel_min_elements": self.parallel_min_elements,
            "bias_correction": self.bias_correction.name(),
        });
        // Written only when forced, so that checkpoints of the default options stay
        // readable by releases that predate the option.
        if let (LongRowLoop::OnePass | LongRowLoop::Split, Some(obj)) =
            (self.long_row_loop, v.as_object_mut())
        {
            obj.insert("long_row_loop".into(), json!(self.long_row_loop.name()));
        }
        v
    }

    pub(crate) fn from_value(v: &Value) -> Result<Self, ConfigError> {
        let obj = v
            .as_object()
            .ok_or_else(|| ConfigError::Json("extensions: expected an object".into()))?;
        let mut e = Extensions::default();
        let bad = |k: &str, what: &str| ConfigError::invalid(k, format!("expected {what}"));
        let get_bool = |k: &str, v: &Value| v.as_bool().ok_or_else(|| bad(k, "a boolean"));
        let get_f32 = |k: &str, v: &Value| {
            v.as_f64()
                .map(|x| x as f32)
                .ok_or_else(|| bad(k, "a number"))
        };
        let get_u64 = |k: &str, v: &Value| v.as_u64().ok_or_else(|| bad(k, "an unsigned integer"));
        for (k, val) in obj {
            match k.as_str() {
                "sparse_amsgrad" => e.sparse_amsgrad = get_bool(k, val)?,
                "weight_decay" => e.weight_decay = get_f32(k, val)?,
                "maximize" => e.maximize = get_bool(k, val)?,
                "per_row_bias_correction" => e.per_row_bias_correction = get_bool(k, val)?,
                "catch_up_decay" => e.catch_up_decay = get_bool(k, val)?,
                "stochastic_rounding" => {
                    e.stochastic_rounding = if val.is_null() {
                        None
                    } else {
                        Some(get_u64(k, val)?)
                    }
                }
                "kernel" => {
                    e.kernel = match val {
                        Value::Null => None,
                        Value::String(s) => Some(
                            Isa::ALL
                                .into_iter()
                                .find(|i| i.name() == s)
                                .ok_or_else(|| bad(k, "a kernel name"))?,
                        ),
                        _ => return Err(bad(k, "a kernel name or null")),
                    }
                }
                "long_row_loop" => {
                    e.long_row_loop = val
                        .as_str()
                        .and_then(LongRowLoop::from_name)
                        .ok_or_else(|| bad(k, "\"auto\", \"one_pass\" or \"split\""))?
                }
                "parallel_min_elements" => {
                    e.parallel_min_elements = usize::try_from(get_u64(k, val)?)
                        .map_err(|_| bad(k, "a smaller integer"))?
                }
                "bias_correction" => {
                    e.bias_correction = match val.as_str() {
                        Some("reference") => BiasCorrection::Reference,
                        Some("f64") => BiasCorrection::F64,
                        _ => return Err(bad(k, "\"reference\" or \"f64\"")),
                    }
                }
                "non_finite" => {
                    e.non_finite = match val {
                        Value::String(s) if s == "propagate" => NonFinitePolicy::Propagate,
                        Value::String(s) if s == "error" => NonFinitePolicy::Error,
                        Value::Object(o) if o.len() == 1 && o.contains_key("skip_step") => {
                            let ls = &o["skip_step"];
                            NonFinitePolicy::SkipStep {
                                loss_scale: if ls.is_null() {
                                    None
                                } else {
                                    Some(loss_scale_from_value(ls)?)
                                },
                            }
                        }
                        _ => {
                            return Err(bad(k, "\"propagate\", \"error\" or {\"skip_step\": ...}"));
                        }
                    }
                }
                other => {
                    return Err(ConfigError::unknown(
                        other,
                        "sparse_amsgrad, weight_decay, maximize, per_row_bias_correction, \
                         catch_up_decay, non_finite, stochastic_rounding, kernel, \
                         long_row_loop, parallel_min_elements, bias_correction",
                    ));
                }
            }
        }
        Ok(e)
    }
}

fn loss_scale_from_value(v: &Value) -> Result<DynamicLossScale, ConfigError> {
    let o: &Map<String, Value> = v
        .as_object()
        .ok_or_else(|| ConfigError::invalid("loss_scale", "expected an object"))?;
    let mut ls = DynamicLossScale::default();
    for (k, val) in o {
        let num = || {
            val.as_f64()
                .ok_or_else(|| ConfigError::invalid(k.as_str(), "expected a number"))
        };
        match k.as_str() {
            "scale" => ls.scale = num()? as f32,
            "growth_factor" => ls.growth_factor = num()? as f32,
            "backoff_factor" => ls.backoff_factor = num()? as f32,
            "growth_interval" => {
                ls.growth_interval = val.as_u64().ok_or_else(|| {
                    ConfigError::invalid("growth_interval", "expected an unsigned integer")
                })?
            }
            other => {
                return Err(ConfigError::unknown(
                    other,
                    "scale, growth_factor, backoff_factor, growth_interval",
                ));
            }
        }
    }
    ls.validate()?;
    Ok(ls)
}

impl DynamicLossScale {
    /// Checks the values.
    pub fn validate(&self) -> Result<(), ConfigError> {
        // At least the smallest normal f32, so that the unscale factor
        // `1 / scale` is finite (it is at most 2^126); the backoff never goes
        // below it either.
        if !(self.scale.is_finite() && self.scale >= f32::MIN_POSITIVE) {
            return Err(ConfigError::invalid(
                "loss_scale.scale",
                format!(
                    "must be finite and at least {:e} (so that 1/scale is finite), got {:e}",
                    f32::MIN_POSITIVE,
                    self.scale
                ),
            ));
        }
        if !(self.growth_factor.is_finite() && self.growth_factor >= 1.0) {
            return Err(ConfigError::invalid(
                "loss_scale.growth_factor",
                "must be finite and >= 1",
            ));
        }
        if !(self.backoff_factor > 0.0 && self.backoff_factor <= 1.0) {
            return Err(ConfigError::invalid(
                "loss_scale.backoff_factor",
                "must be in (0, 1]",
            ));
        }
        if self.growth_interval == 0 {
            return Err(ConfigError::invalid(
                "loss_scale.growth_interval",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `long_row_loop` in serialized extensions: a name; anything else is a typed error
    /// naming the key; `Auto` (the default) is not written.
    #[test]
    fn long_row_loop_values_are_checked() {
        let read = |v: Value| Extensions::from_value(&json!({ "long_row_loop": v }));
        for l in [LongRowLoop::Auto, LongRowLoop::OnePass, LongRowLoop::Split] {
            assert_eq!(read(json!(l.name())).unwrap().long_row_loop, l);
        }
        for bad in [json!("two_pass"), json!(null), json!(3), json!(["split"])] {
            match read(bad.clone()) {
                Err(ConfigError::InvalidValue { key, .. }) => {
                    assert_eq!(key, "long_row_loop", "{bad}")
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
        assert!(
            Extensions::default()
                .to_value()
                .get("long_row_loop")
                .is_none()
        );
        let forced = Extensions::default().with_long_row_loop(LongRowLoop::OnePass);
        assert_eq!(Extensions::from_value(&forced.to_value()).unwrap(), forced);
    }
}
