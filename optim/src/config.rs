//! The reference's hyperparameters and their Keras `get_config()` JSON.

use serde_json::{Map, Number, Value};

use crate::error::ConfigError;
use crate::schedule::{CustomSchedule, LearningRateSchedule, Schedule};

/// The learning rate: a constant, a Keras schedule, or a user schedule.
#[derive(Clone, Debug, PartialEq)]
pub enum LearningRate {
    /// A fixed learning rate.
    Constant(f32),
    /// A Keras built-in schedule (serializable).
    Schedule(Schedule),
    /// A user schedule (not serializable).
    Custom(CustomSchedule),
}

impl LearningRate {
    /// The (undecayed) learning rate at `step`.
    pub fn at(&self, step: u64) -> f32 {
        match self {
            LearningRate::Constant(lr) => *lr,
            LearningRate::Schedule(s) => s.learning_rate(step),
            LearningRate::Custom(c) => c.learning_rate(step),
        }
    }
}

impl From<f32> for LearningRate {
    fn from(lr: f32) -> Self {
        LearningRate::Constant(lr)
    }
}

impl From<f64> for LearningRate {
    /// A constant rate given as f64 (the type candle and most Rust training
    /// code use), rounded to the nearest f32 as the reference stores it. A
    /// value beyond f32's range becomes infinite and is refused by
    /// [`LazyAdamConfig::validate`].
    fn from(lr: f64) -> Self {
        LearningRate::Constant(lr as f32)
    }
}

impl From<Schedule> for LearningRate {
    fn from(s: Schedule) -> Self {
        LearningRate::Schedule(s)
    }
}

/// The reference's hyperparameters (`tfa.optimizers.LazyAdam`), with its names
/// and defaults.
///
/// ```
/// use lazyadam::LazyAdamConfig;
/// let json = r#"{"name": "LazyAdam", "learning_rate": 0.0010000000474974513, "decay": 0.0,
///     "beta_1": 0.8999999761581421, "beta_2": 0.9990000128746033, "epsilon": 1e-07,
///     "amsgrad": false}"#;
/// let config = LazyAdamConfig::from_keras_json(json).unwrap();
/// assert_eq!(config, LazyAdamConfig::default());
/// let back = LazyAdamConfig::from_keras_json(&config.to_keras_json().unwrap()).unwrap();
/// assert_eq!(back, config);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct LazyAdamConfig {
    /// Learning rate or schedule (default 0.001).
    pub learning_rate: LearningRate,
    /// Decay of the first moment (default 0.9), in `[0, 1)`.
    pub beta_1: f32,
    /// Decay of the second moment (default 0.999), in `[0, 1)`.
    pub beta_2: f32,
    /// Added to the denominator (default 1e-7), `> 0`.
    pub epsilon: f32,
    /// Keep the maximum of the second moments (default false). As in the
    /// reference, sparse gradients ignore it unless
    /// [`Extensions::sparse_amsgrad`](crate::Extensions::sparse_amsgrad) is set.
    pub amsgrad: bool,
    /// Legacy time-inverse decay: `lr / (1 + decay * iterations)` (default 0).
    pub decay: f32,
    /// Clip each gradient to this L2 norm (over its values as given).
    pub clipnorm: Option<f32>,
    /// Clip each gradient value to `[-clipvalue, clipvalue]`.
    pub clipvalue: Option<f32>,
    /// Clip all gradients of a step to this global L2 norm.
    pub global_clipnorm: Option<f32>,
    /// The optimizer's name (default `"LazyAdam"`).
    pub name: String,
}

impl Default for LazyAdamConfig {
    fn default() -> Self {
        LazyAdamConfig {
            learning_rate: LearningRate::Constant(0.001),
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-7,
            amsgrad: false,
            decay: 0.0,
            clipnorm: None,
            clipvalue: None,
            global_clipnorm: None,
            name: "LazyAdam".to_string(),
        }
    }
}

/// Builder-style construction: start from [`LazyAdamConfig::new`] (or
/// `default()`) and chain `with_*` calls. Nothing is checked until the
/// optimizer is built ([`LazyAdam::new`](crate::LazyAdam::new) calls
/// [`LazyAdamConfig::validate`]).
///
/// ```
/// use lazyadam::{LazyAdam, LazyAdamConfig, Schedule};
/// let config = LazyAdamConfig::new(0.05)
///     .with_betas(0.9, 0.98)
///     .with_epsilon(1e-8)
///     .with_global_clipnorm(1.0);
/// assert_eq!(config.beta_2, 0.98);
/// let opt = LazyAdam::new(config)?;
/// assert_eq!(opt.learning_rate(), 0.05);
///
/// // A schedule is a learning rate too.
/// let decayed = LazyAdamConfig::new(Schedule::ExponentialDecay {
///     initial_learning_rate: 0.1,
///     decay_steps: 1000.0,
///     decay_rate: 0.5,
///     staircase: false,
/// });
/// assert_eq!(decayed.learning_rate_at(1000), 0.05);
///
/// // Invalid values are refused when the optimizer is built.
/// assert!(LazyAdam::new(LazyAdamConfig::new(0.05).with_betas(1.0, 0.999)).is_err());
/// # Ok::<(), lazyadam::Error>(())
/// ```
impl LazyAdamConfig {
    /// The reference's defaults with this learning rate (a number, f32 or
    /// f64, or a [`Schedule`]).
    pub fn new(learning_rate: impl Into<LearningRate>) -> Self {
        LazyAdamConfig {
            learning_rate: learning_rate.into(),
            ..LazyAdamConfig::default()
        }
    }

    /// Sets the learning rate (a number or a schedule).
    #[must_use]
    pub fn with_learning_rate(mut self, learning_rate: impl Into<LearningRate>) -> Self {
        self.learning_rate = learning_rate.into();
        self
    }

    /// Sets `beta_1` and `beta_2`.
    #[must_use]
    pub fn with_betas(mut self, beta_1: f32, beta_2: f32) -> Self {
        self.beta_1 = beta_1;
        self.beta_2 = beta_2;
        self
    }

    /// Sets `beta_1`.
    #[must_use]
    pub fn with_beta_1(mut self, beta_1: f32) -> Self {
        self.beta_1 = beta_1;
        self
    }

    /// Sets `beta_2`.
    #[must_use]
    pub fn with_beta_2(mut self, beta_2: f32) -> Self {
        self.beta_2 = beta_2;
        self
    }

    /// Sets `epsilon`.
    #[must_use]
    pub fn with_epsilon(mut self, epsilon: f32) -> Self {
        self.epsilon = epsilon;
        self
    }

    /// Turns AMSGrad on or off.
    #[must_use]
    pub fn with_amsgrad(mut self, amsgrad: bool) -> Self {
        self.amsgrad = amsgrad;
        self
    }

    /// Sets the legacy time-inverse `decay`.
    #[must_use]
    pub fn with_decay(mut self, decay: f32) -> Self {
        self.decay = decay;
        self
    }

    /// Clips each gradient to this L2 norm.
    #[must_use]
    pub fn with_clipnorm(mut self, clipnorm: f32) -> Self {
        self.clipnorm = Some(clipnorm);
        self
    }

    /// Clips each gradient value to `[-clipvalue, clipvalue]`.
    #[must_use]
    pub fn with_clipvalue(mut self, clipvalue: f32) -> Self {
        self.clipvalue = Some(clipvalue);
        self
    }

    /// Clips all gradients of a step to this global L2 norm.
    #[must_use]
    pub fn with_global_clipnorm(mut self, global_clipnorm: f32) -> Self {
        self.global_clipnorm = Some(global_clipnorm);
        self
    }

    /// Sets the optimizer's name.
    #[must_use]
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }
}

/// The keys [`LazyAdamConfig::from_keras_value`] reads.
const ACCEPTED_KEYS: &str = "name, learning_rate (or lr), decay, beta_1, beta_2, epsilon, \
    amsgrad, clipnorm, clipvalue, global_clipnorm, is_legacy_optimizer, jit_compile, \
    weight_decay, use_ema, ema_momentum, ema_overwrite_frequency, loss_scale_factor, \
    gradient_accumulation_steps";

const MODULE: &str = "keras.optimizers.schedules";

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn get_f64(key: &str, v: &Value) -> Result<f64, ConfigError> {
    v.as_f64().ok_or_else(|| {
        ConfigError::invalid(key, format!("expected a number, got {}", type_name(v)))
    })
}

fn get_f32(key: &str, v: &Value) -> Result<f32, ConfigError> {
    let x = get_f64(key, v)?;
    Ok(x as f32)
}

fn get_opt_f32(key: &str, v: &Value) -> Result<Option<f32>, ConfigError> {
    if v.is_null() {
        Ok(None)
    } else {
        get_f32(key, v).map(Some)
    }
}

fn get_bool(key: &str, v: &Value) -> Result<bool, ConfigError> {
    v.as_bool().ok_or_else(|| {
        ConfigError::invalid(key, format!("expected a boolean, got {}", type_name(v)))
    })
}

/// An f32 hyperparameter as Keras writes a Python float: the shortest decimal
/// that reads back to the same f32.
fn short_f32(x: f32) -> Value {
    let s = format!("{x}");
    let f: f64 = s.parse().unwrap_or(x as f64);
    Number::from_f64(f)
        .map(Value::Number)
        .unwrap_or(Value::Null)
}

/// An f32 hyperparameter stored in a Keras variable: widened exactly to f64
/// (how `get_config()` writes `learning_rate`, `beta_1`, `beta_2`).
fn wide_f32(x: f32) -> Value {
    Number::from_f64(x as f64)
        .map(Value::Number)
        .unwrap_or(Value::Null)
}

/// A step count: an integer when integral, as Keras writes it. Negative zero stays a float
/// (`-0.0`): as an integer it would load back as `+0.0`, and writing must not change a value.
fn steps_value(x: f64) -> Value {
    let negative_zero = x == 0.0 && x.is_sign_negative();
    if x.is_finite() && x.fract() == 0.0 && x.abs() < 9.0e15 && !negative_zero {
        if x >= 0.0 {
            Value::Number(Number::from(x as u64))
        } else {
            Value::Number(Number::from(x as i64))
        }
    } else {
        Number::from_f64(x)
            .map(Value::Number)
            .unwrap_or(Value::Null)
    }
}

fn float_value(x: f64) -> Value {
    Number::from_f64(x)
        .map(Value::Number)
        .unwrap_or(Value::Null)
}

/// The error of a `learning_rate.class_name` that names no known schedule.
fn unknown_schedule_class(class_name: &str) -> ConfigError {
    ConfigError::invalid(
        "learning_rate.class_name",
        format!("unknown schedule class `{class_name}`"),
    )
}

fn schedule_from_value(v: &Value) -> Result<Schedule, ConfigError> {
    const KEY: &str = "learning_rate";
    let obj = v
        .as_object()
        .ok_or_else(|| ConfigError::invalid(KEY, "expected a number or a schedule object"))?;
    let mut class_name = None;
    let mut config = None;
    for (k, val) in obj {
        match k.as_str() {
            "class_name" => {
                class_name = Some(val.as_str().ok_or_else(|| {
                    ConfigError::invalid("learning_rate.class_name", "expected a string")
                })?)
            }
            "config" => {
                config = Some(val.as_object().ok_or_else(|| {
                    ConfigError::invalid("learning_rate.config", "expected an object")
                })?)
            }
            "module" | "registered_name" => {
                if !(val.is_null() || val.is_string()) {
                    return Err(ConfigError::invalid(
                        format!("learning_rate.{k}"),
                        "expected a string or null",
                    ));
                }
            }
            other => {
                return Err(ConfigError::unknown(
                    format!("learning_rate.{other}"),
                    "class_name, config, module, registered_name",
                ));
            }
        }
    }
    let class_name =
        class_name.ok_or_else(|| ConfigError::MissingKey("learning_rate.class_name".into()))?;
    let config = config.ok_or_else(|| ConfigError::MissingKey("learning_rate.config".into()))?;
    // Strip a module path ("keras.optimizers.schedules.ExponentialDecay").
    let class = class_name.rsplit('.').next().unwrap_or(class_name);
    let allowed: &[&str] = match class {
        "ExponentialDecay" | "InverseTimeDecay" => &[
            "initial_learning_rate",
            "decay_steps",
            "decay_rate",
            "staircase",
        ],
        "PiecewiseConstantDecay" => &["boundaries", "values"],
        "PolynomialDecay" => &[
            "initial_learning_rate",
            "decay_steps",
            "end_learning_rate",
            "power",
            "cycle",
        ],
        "CosineDecay" => &[
            "initial_learning_rate",
            "decay_steps",
            "alpha",
            "warmup_target",
            "warmup_steps",
        ],
        "CosineDecayRestarts" => &[
            "initial_learning_rate",
            "first_decay_steps",
            "t_mul",
            "m_mul",
            "alpha",
        ],
        _ => return Err(unknown_schedule_class(class_name)),
    };
    for (k, val) in config {
        if k == "name" {
            if !(val.is_null() || val.is_string()) {
                return Err(ConfigError::invalid(
                    "learning_rate.config.name",
                    "expected a string or null",
                ));
            }
            continue;
        }
        if !allowed.contains(&k.as_str()) {
            return Err(ConfigError::unknown(
                format!("learning_rate.config.{k}"),
                format!("name, {}", allowed.join(", ")),
            ));
        }
    }
    let key = |k: &str| format!("learning_rate.config.{k}");
    let num = |k: &str, default: Option<f64>| -> Result<f64, ConfigError> {
        match config.get(k) {
            Some(v) => get_f64(&key(k), v),
            None => default.ok_or_else(|| ConfigError::MissingKey(key(k))),
        }
    };
    let flag = |k: &str| -> Result<bool, ConfigError> {
        match config.get(k) {
            Some(v) => get_bool(&key(k), v),
            None => Ok(false),
        }
    };
    let list = |k: &str| -> Result<Vec<f64>, ConfigError> {
        let v = config
            .get(k)
            .ok_or_else(|| ConfigError::MissingKey(key(k)))?;
        let arr = v
            .as_array()
            .ok_or_else(|| ConfigError::invalid(key(k), "expected an array of numbers"))?;
        arr.iter().map(|x| get_f64(&key(k), x)).collect()
    };
    let s = match class {
        "ExponentialDecay" => Schedule::ExponentialDecay {
            initial_learning_rate: num("initial_learning_rate", None)?,
            decay_steps: num("decay_steps", None)?,
            decay_rate: num("decay_rate", None)?,
            staircase: flag("staircase")?,
        },
        "InverseTimeDecay" => Schedule::InverseTimeDecay {
            initial_learning_rate: num("initial_learning_rate", None)?,
            decay_steps: num("decay_steps", None)?,
            decay_rate: num("decay_rate", None)?,
            staircase: flag("staircase")?,
        },
        "PiecewiseConstantDecay" => Schedule::PiecewiseConstantDecay {
            boundaries: list("boundaries")?,
            values: list("values")?,
        },
        "PolynomialDecay" => Schedule::PolynomialDecay {
            initial_learning_rate: num("initial_learning_rate", None)?,
            decay_steps: num("decay_steps", None)?,
            end_learning_rate: num("end_learning_rate", Some(0.0001))?,
            power: num("power", Some(1.0))?,
            cycle: flag("cycle")?,
        },
        "CosineDecay" => Schedule::CosineDecay {
            initial_learning_rate: num("initial_learning_rate", None)?,
            decay_steps: num("decay_steps", None)?,
            alpha: num("alpha", Some(0.0))?,
            warmup_target: match config.get("warmup_target") {
                None | Some(Value::Null) => None,
                Some(v) => Some(get_f64(&key("warmup_target"), v)?),
            },
            warmup_steps: num("warmup_steps", Some(0.0))?,
        },
        "CosineDecayRestarts" => Schedule::CosineDecayRestarts {
            initial_learning_rate: num("initial_learning_rate", None)?,
            first_decay_steps: num("first_decay_steps", None)?,
            t_mul: num("t_mul", Some(2.0))?,
            m_mul: num("m_mul", Some(1.0))?,
            alpha: num("alpha", Some(0.0))?,
        },
        // The class was checked against the same names above; an error, not a panic, if the
        // two lists ever drift apart.
        other => return Err(unknown_schedule_class(other)),
    };
    s.validate("learning_rate")?;
    Ok(s)
}

fn schedule_to_value(s: &Schedule) -> Value {
    let mut c = Map::new();
    match s {
        Schedule::ExponentialDecay {
            initial_learning_rate,
            decay_steps,
            decay_rate,
            staircase,
        }
        | Schedule::InverseTimeDecay {
            initial_learning_rate,
            decay_steps,
            decay_rate,
            staircase,
        } => {
            c.insert(
                "initial_learning_rate".into(),
                float_value(*initial_learning_rate),
            );
            c.insert("decay_steps".into(), steps_value(*decay_steps));
            c.insert("decay_rate".into(), float_value(*decay_rate));
            c.insert("staircase".into(), Value::Bool(*staircase));
        }
        Schedule::PiecewiseConstantDecay { boundaries, values } => {
            c.insert(
                "boundaries".into(),
                Value::Array(boundaries.iter().map(|&b| steps_value(b)).collect()),
            );
            c.insert(
                "values".into(),
                Value::Array(values.iter().map(|&v| float_value(v)).collect()),
            );
        }
        Schedule::PolynomialDecay {
            initial_learning_rate,
            decay_steps,
            end_learning_rate,
            power,
            cycle,
        } => {
            c.insert(
                "initial_learning_rate".into(),
                float_value(*initial_learning_rate),
            );
            c.insert("decay_steps".into(), steps_value(*decay_steps));
            c.insert("end_learning_rate".into(), float_value(*end_learning_rate));
            c.insert("power".into(), float_value(*power));
            c.insert("cycle".into(), Value::Bool(*cycle));
        }
        Schedule::CosineDecay {
            initial_learning_rate,
            decay_steps,
            alpha,
            warmup_target,
            warmup_steps,
        } => {
            c.insert(
                "initial_learning_rate".into(),
                float_value(*initial_learning_rate),
            );
            c.insert("decay_steps".into(), steps_value(*decay_steps));
            c.insert("alpha".into(), float_value(*alpha));
            c.insert("name".into(), Value::Null);
            c.insert(
                "warmup_target".into(),
                warmup_target.map(float_value).unwrap_or(Value::Null),
            );
            c.insert("warmup_steps".into(), steps_value(*warmup_steps));
        }
        Schedule::CosineDecayRestarts {
            initial_learning_rate,
            first_decay_steps,
            t_mul,
            m_mul,
            alpha,
        } => {
            c.insert(
                "initial_learning_rate".into(),
                float_value(*initial_learning_rate),
            );
            c.insert("first_decay_steps".into(), steps_value(*first_decay_steps));
            c.insert("t_mul".into(), float_value(*t_mul));
            c.insert("m_mul".into(), float_value(*m_mul));
            c.insert("alpha".into(), float_value(*alpha));
        }
    }
    c.entry("name").or_insert(Value::Null);
    let mut o = Map::new();
    o.insert("module".into(), Value::String(MODULE.into()));
    o.insert("class_name".into(), Value::String(s.class_name().into()));
    o.insert("config".into(), Value::Object(c));
    o.insert("registered_name".into(), Value::Null);
    Value::Object(o)
}

impl LazyAdamConfig {
    /// Reads the reference's `get_config()` JSON (the `lr` alias of
    /// `learning_rate` is accepted). Missing keys take the defaults. A key
    /// given twice in one object is an error (JSON parsers disagree on which
    /// one wins).
    pub fn from_keras_json(json: &str) -> Result<Self, ConfigError> {
        let v = crate::json::parse_strict(json).map_err(|e| ConfigError::Json(e.to_string()))?;
        Self::from_keras_value(&v)
    }

    /// Reads the reference's `get_config()` as a JSON value. A whole
    /// `{"class_name": ..., "config": {...}}` serialization is accepted too.
    ///
    /// Keras 3 (and Keras 2.11+) optimizer configs are read too, where their
    /// keys map onto this optimizer: `jit_compile`, `is_legacy_optimizer`,
    /// `use_ema: false` (with its `ema_momentum` and
    /// `ema_overwrite_frequency`, unused), `loss_scale_factor: null`,
    /// `gradient_accumulation_steps: null` and `weight_decay` null or 0. A
    /// non-zero `weight_decay` is decoupled weight decay, an extension here:
    /// read such a config with [`LazyAdamConfig::from_keras_json_with_extensions`].
    /// `use_ema: true`, a `loss_scale_factor` or `gradient_accumulation_steps`
    /// are refused (not implemented). Any other key is an error that lists
    /// the accepted keys.
    pub fn from_keras_value(v: &Value) -> Result<Self, ConfigError> {
        let (config, weight_decay) = Self::read_keras(v)?;
        if weight_decay != 0.0 {
            return Err(ConfigError::invalid(
                "weight_decay",
                format!(
                    "{weight_decay} is decoupled weight decay, which is an extension here \
                     (`Extensions::weight_decay`): read this config with \
                     `LazyAdamConfig::from_keras_json_with_extensions`"
                ),
            ));
        }
        Ok(config)
    }

    /// Reads a Keras optimizer config as [`LazyAdamConfig::from_keras_json`]
    /// does, and also its `weight_decay` (Keras 3, Keras 2.11+), as
    /// [`Extensions::weight_decay`](crate::Extensions::weight_decay); the
    /// other extensions are off.
    ///
    /// Keras applies `p = p - p * weight_decay * lr` (f32, `lr` the step's
    /// current learning rate) to every variable before its update; the
    /// extension applies `p -= (weight_decay * lr) * p` (the factor computed
    /// once per step, so results can differ from Keras's in the last bit) to
    /// the rows a step updates: every element for a dense gradient, only the
    /// rows present for a sparse one (lazy, as the moments).
    ///
    /// ```
    /// use lazyadam::LazyAdamConfig;
    /// let keras3 = r#"{"name": "adam", "learning_rate": 0.001, "weight_decay": 0.004,
    ///     "clipnorm": null, "global_clipnorm": null, "clipvalue": null, "use_ema": false,
    ///     "ema_momentum": 0.99, "ema_overwrite_frequency": null, "loss_scale_factor": null,
    ///     "gradient_accumulation_steps": null, "beta_1": 0.9, "beta_2": 0.999,
    ///     "epsilon": 1e-07, "amsgrad": false}"#;
    /// let (config, ext) = LazyAdamConfig::from_keras_json_with_extensions(keras3)?;
    /// assert_eq!(ext.weight_decay, 0.004);
    /// assert_eq!(config.learning_rate_at(0), 0.001);
    /// // Without the extensions, weight decay is an error that says where to go.
    /// let e = LazyAdamConfig::from_keras_json(keras3).unwrap_err();
    /// assert!(e.to_string().contains("from_keras_json_with_extensions"), "{e}");
    /// # Ok::<(), lazyadam::ConfigError>(())
    /// ```
    pub fn from_keras_json_with_extensions(
        json: &str,
    ) -> Result<(Self, crate::Extensions), ConfigError> {
        let v = crate::json::parse_strict(json).map_err(|e| ConfigError::Json(e.to_string()))?;
        let (config, weight_decay) = Self::read_keras(&v)?;
        let ext = crate::Extensions::default().with_weight_decay(weight_decay);
        ext.validate(config.amsgrad)?;
        Ok((config, ext))
    }

    /// The config and the Keras 3 `weight_decay` (0 when absent or null).
    fn read_keras(v: &Value) -> Result<(Self, f32), ConfigError> {
        let obj = v
            .as_object()
            .ok_or_else(|| ConfigError::Json("expected a JSON object".into()))?;
        // keras.optimizers.serialize() wraps the config.
        if obj.contains_key("class_name")
            && obj.contains_key("config")
            && let Some(inner) = obj.get("config")
            && inner.is_object()
        {
            return Self::read_keras(inner);
        }
        let mut c = LazyAdamConfig::default();
        let mut weight_decay = 0.0f32;
        let mut seen_lr = false;
        let mut use_ema = false;
        for (k, val) in obj {
            match k.as_str() {
                "name" => {
                    c.name = val
                        .as_str()
                        .ok_or_else(|| ConfigError::invalid("name", "expected a string"))?
                        .to_string()
                }
                "learning_rate" | "lr" => {
                    if seen_lr {
                        return Err(ConfigError::invalid(
                            k.as_str(),
                            "both `learning_rate` and `lr` given",
                        ));
                    }
                    seen_lr = true;
                    c.learning_rate = if val.is_number() {
                        LearningRate::Constant(get_f32(k, val)?)
                    } else {
                        LearningRate::Schedule(schedule_from_value(val)?)
                    };
                }
                "decay" => c.decay = get_f32(k, val)?,
                "beta_1" => c.beta_1 = get_f32(k, val)?,
                "beta_2" => c.beta_2 = get_f32(k, val)?,
                "epsilon" => c.epsilon = get_f32(k, val)?,
                "amsgrad" => c.amsgrad = get_bool(k, val)?,
                "clipnorm" => c.clipnorm = get_opt_f32(k, val)?,
                "clipvalue" => c.clipvalue = get_opt_f32(k, val)?,
                "global_clipnorm" => c.global_clipnorm = get_opt_f32(k, val)?,
                // Written by `keras.optimizers.serialize` for legacy optimizers,
                // and by Keras 2.11+ optimizers (no effect here).
                "is_legacy_optimizer" | "jit_compile" => {
                    get_bool(k, val)?;
                }
                // Keras 3 / Keras 2.11+.
                "weight_decay" => {
                    weight_decay = get_opt_f32(k, val)?.unwrap_or(0.0);
                    if !weight_decay.is_finite() || weight_decay < 0.0 {
                        return Err(ConfigError::invalid(
                            k.as_str(),
                            format!("must be finite and not negative, got {weight_decay}"),
                        ));
                    }
                }
                "use_ema" => use_ema = get_bool(k, val)?,
                "ema_momentum" | "ema_overwrite_frequency" => {
                    get_opt_f32(k, val)?;
                }
                "loss_scale_factor" | "gradient_accumulation_steps" => {
                    if !val.is_null() {
                        return Err(ConfigError::invalid(
                            k.as_str(),
                            format!(
                                "{val} is not supported (only null): this optimizer has no \
                                 {}",
                                if k == "loss_scale_factor" {
                                    "static loss scale (see `NonFinitePolicy::SkipStep` for a \
                                     dynamic one)"
                                } else {
                                    "gradient accumulation"
                                }
                            ),
                        ));
                    }
                }
                other => return Err(ConfigError::unknown(other, ACCEPTED_KEYS)),
            }
        }
        if use_ema {
            return Err(ConfigError::invalid(
                "use_ema",
                "true is not supported: this optimizer keeps no moving average of the weights",
            ));
        }
        c.validate()?;
        Ok((c, weight_decay))
    }

    /// Writes the reference's `get_config()` JSON.
    pub fn to_keras_json(&self) -> Result<String, ConfigError> {
        let v = self.to_keras_value()?;
        serde_json::to_string(&v).map_err(|e| ConfigError::Json(e.to_string()))
    }

    /// Writes the reference's `get_config()` as a JSON value, key for key as
    /// Keras does (`learning_rate`, `beta_1`, `beta_2` widened from f32 as
    /// Keras reads them from its variables; the others as the shortest decimal
    /// of the f32). Fails for a [`LearningRate::Custom`] schedule.
    pub fn to_keras_value(&self) -> Result<Value, ConfigError> {
        let mut o = Map::new();
        o.insert("name".into(), Value::String(self.name.clone()));
        if let Some(x) = self.clipnorm {
            o.insert("clipnorm".into(), short_f32(x));
        }
        if let Some(x) = self.global_clipnorm {
            o.insert("global_clipnorm".into(), short_f32(x));
        }
        if let Some(x) = self.clipvalue {
            o.insert("clipvalue".into(), short_f32(x));
        }
        let lr = match &self.learning_rate {
            LearningRate::Constant(x) => wide_f32(*x),
            LearningRate::Schedule(s) => schedule_to_value(s),
            LearningRate::Custom(_) => return Err(ConfigError::CustomSchedule),
        };
        o.insert("learning_rate".into(), lr);
        o.insert("decay".into(), short_f32(self.decay));
        o.insert("beta_1".into(), wide_f32(self.beta_1));
        o.insert("beta_2".into(), wide_f32(self.beta_2));
        o.insert("epsilon".into(), short_f32(self.epsilon));
        o.insert("amsgrad".into(), Value::Bool(self.amsgrad));
        Ok(Value::Object(o))
    }

    /// Checks every value: learning rate and clip values finite and not
    /// negative, betas in `[0, 1)`, epsilon finite and positive, decay finite
    /// and not negative,
    /// not both `clipnorm` and `global_clipnorm`, valid schedule fields.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let non_negative = |key: &str, x: f32| {
            if !x.is_finite() {
                Err(ConfigError::invalid(
                    key,
                    format!("must be finite, got {x}"),
                ))
            } else if x < 0.0 {
                Err(ConfigError::invalid(
                    key,
                    format!("must not be negative, got {x}"),
                ))
            } else {
                Ok(())
            }
        };
        match &self.learning_rate {
            LearningRate::Constant(lr) => non_negative("learning_rate", *lr)?,
            LearningRate::Schedule(s) => s.validate("learning_rate")?,
            LearningRate::Custom(_) => {}
        }
        for (key, b) in [("beta_1", self.beta_1), ("beta_2", self.beta_2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(ConfigError::invalid(
                    key,
                    format!("must be in [0, 1), got {b}"),
                ));
            }
        }
        non_negative("epsilon", self.epsilon)?;
        if self.epsilon == 0.0 {
            // The reference replaces 0 by 1e-7 (`epsilon or
            // backend_config.epsilon()`); a zero denominator would turn a
            // zero first gradient into NaN.
            return Err(ConfigError::invalid(
                "epsilon",
                "must be positive (the reference silently replaces 0 by 1e-7)",
            ));
        }
        non_negative("decay", self.decay)?;
        for (key, c) in [
            ("clipnorm", self.clipnorm),
            ("clipvalue", self.clipvalue),
            ("global_clipnorm", self.global_clipnorm),
        ] {
            if let Some(c) = c {
                non_negative(key, c)?;
            }
        }
        if self.clipnorm.is_some() && self.global_clipnorm.is_some() {
            return Err(ConfigError::invalid(
                "global_clipnorm",
                "cannot be set together with `clipnorm`",
            ));
        }
        Ok(())
    }

    /// The learning rate a step taken at `iterations` uses: the schedule (or
    /// constant) at `iterations`, then `lr / (1 + decay * iterations)` when
    /// `decay > 0` (in f32, as the reference).
    pub fn learning_rate_at(&self, iterations: u64) -> f32 {
        let lr = self.learning_rate.at(iterations);
        if self.decay > 0.0 {
            lr / (1.0 + self.decay * iterations as f32)
        } else {
            lr
        }
    }
}
