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
            other => return Err(ConfigError::UnknownKey(format!("learning_rate.{other}"))),
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
        _ => {
            return Err(ConfigError::invalid(
                "learning_rate.class_name",
                format!("unknown schedule class `{class_name}`"),
            ));
        }
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
            return Err(ConfigError::UnknownKey(format!("learning_rate.config.{k}")));
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
        _ => unreachable!("class checked above"),
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
    pub fn from_keras_value(v: &Value) -> Result<Self, ConfigError> {
        let obj = v
            .as_object()
            .ok_or_else(|| ConfigError::Json("expected a JSON object".into()))?;
        // keras.optimizers.serialize() wraps the config.
        if obj.contains_key("class_name")
            && obj.contains_key("config")
            && let Some(inner) = obj.get("config")
            && inner.is_object()
        {
            return Self::from_keras_value(inner);
        }
        let mut c = LazyAdamConfig::default();
        let mut seen_lr = false;
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
                // Written by `keras.optimizers.serialize` for legacy optimizers.
                "is_legacy_optimizer" => {
                    get_bool(k, val)?;
                }
                other => return Err(ConfigError::UnknownKey(other.to_string())),
            }
        }
        c.validate()?;
        Ok(c)
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
