//! Replays `lazyadam-case/1` conformance traces (recorded from
//! `tfa.optimizers.LazyAdam`) through the [`lazyadam`] optimizer and compares
//! the result with the recorded state.
//!
//! A case holds the reference optimizer's `get_config()`, the storage type
//! (`float32` or `float16`: variables, gradients and both slots), the initial
//! variables, the steps (one `apply_gradients` call each; dense or sparse
//! gradients) and the expected final state with a tolerance. `float16` cases
//! use f16 parameters, gradients and moments (compute is f32).
//!
//! ```
//! let json = r#"{"format": "lazyadam-case/1", "name": "tiny",
//!   "optimizer": {"name": "LazyAdam", "learning_rate": 0.1, "decay": 0.0, "beta_1": 0.9,
//!                 "beta_2": 0.999, "epsilon": 1e-07, "amsgrad": false},
//!   "dtype": "float32",
//!   "variables": [{"name": "var0", "shape": [2, 1], "initial": [1.0, 2.0]}],
//!   "steps": [[{"variable": 0, "indices": [1], "values": [0.5]}]],
//!   "expected": {"iterations": 1, "variables": [[1.0, 1.9]], "m": [[0.0, 0.05]],
//!                "v": [[0.0, 0.00025]]},
//!   "tolerance": {"rtol": 1e-5, "atol": 1e-5}}"#;
//! let case = lazyadam_replay::Case::parse(json)?;
//! let result = lazyadam_replay::replay(&case)?;
//! assert_eq!(result.iterations, 1);
//! assert_eq!(result.variables[0][0], 1.0); // row 0 untouched
//! assert!(lazyadam_replay::check(&case, &result).is_ok());
//! # Ok::<(), lazyadam_replay::ReplayError>(())
//! ```
#![deny(missing_docs)]

use std::path::Path;

use lazyadam::{
    DType, Error, Extensions, Gradient, LazyAdam, LazyAdamConfig, TensorRef, Update, f16,
};
use serde::{Serialize, Serializer};
use serde_json::Value;

/// The format tag of a case file.
pub const CASE_FORMAT: &str = "lazyadam-case/1";

/// Why a case could not be replayed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The text is not JSON.
    #[error("invalid JSON: {0}")]
    Json(String),
    /// The JSON is not a valid `lazyadam-case/1` case.
    #[error("invalid case: {0}")]
    InvalidCase(String),
    /// The optimizer rejected the configuration or a variable.
    #[error("optimizer error: {0}")]
    Optimizer(#[from] Error),
    /// The optimizer rejected a step of the case.
    #[error("case `{case}`, step {step} of {steps}: optimizer error: {source}")]
    Step {
        /// The case's name.
        case: String,
        /// The index of the failed step in the case's `steps` (0-based).
        step: usize,
        /// The number of steps in the case.
        steps: usize,
        /// The optimizer's error.
        source: Error,
    },
}

fn invalid(msg: impl Into<String>) -> ReplayError {
    ReplayError::InvalidCase(msg.into())
}

/// The storage type of a case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaseDType {
    /// f32 variables, gradients and slots.
    Float32,
    /// f16 variables, gradients and slots.
    Float16,
}

/// A variable of a case.
#[derive(Clone, Debug, PartialEq)]
pub struct CaseVariable {
    /// Name.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Row-major initial values.
    pub initial: Vec<f64>,
}

/// One gradient of a step.
#[derive(Clone, Debug, PartialEq)]
pub struct CaseGradient {
    /// Index into [`Case::variables`].
    pub variable: usize,
    /// Row ids for a sparse gradient (`None`: dense).
    pub indices: Option<Vec<i64>>,
    /// Values (row-major).
    pub values: Vec<f64>,
}

/// The recorded final state.
#[derive(Clone, Debug, PartialEq)]
pub struct Expected {
    /// Step counter after the trace.
    pub iterations: u64,
    /// Final variables (flattened, per variable).
    pub variables: Vec<Vec<f64>>,
    /// Final `m` slots.
    pub m: Vec<Vec<f64>>,
    /// Final `v` slots.
    pub v: Vec<Vec<f64>>,
}

/// The match tolerance: `abs(a - b) <= atol + rtol * abs(b)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tolerance {
    /// Relative tolerance.
    pub rtol: f64,
    /// Absolute tolerance.
    pub atol: f64,
}

/// A parsed `lazyadam-case/1` case.
#[derive(Clone, Debug, PartialEq)]
pub struct Case {
    /// Case name.
    pub name: String,
    /// What the case exercises.
    pub note: Option<String>,
    /// The reference's `get_config()` as recorded.
    pub optimizer: Value,
    /// The configuration read from it.
    pub config: LazyAdamConfig,
    /// Storage type.
    pub dtype: CaseDType,
    /// Variables with their initial values.
    pub variables: Vec<CaseVariable>,
    /// Steps: one list of gradients per `apply_gradients` call.
    pub steps: Vec<Vec<CaseGradient>>,
    /// The recorded final state, if present.
    pub expected: Option<Expected>,
    /// The tolerance (default `rtol = atol = 1e-5`).
    pub tolerance: Tolerance,
}

fn as_f64_list(v: &Value, what: &str) -> Result<Vec<f64>, ReplayError> {
    v.as_array()
        .ok_or_else(|| invalid(format!("{what}: expected a list of numbers")))?
        .iter()
        .map(|x| {
            x.as_f64()
                .ok_or_else(|| invalid(format!("{what}: expected numbers")))
        })
        .collect()
}

impl CaseDType {
    /// The name used in case files.
    pub fn name(self) -> &'static str {
        match self {
            CaseDType::Float32 => "float32",
            CaseDType::Float16 => "float16",
        }
    }

    /// The largest finite value of the storage type, in its shortest decimal form.
    fn max(self) -> String {
        match self {
            CaseDType::Float32 => format!("{:e}", f32::MAX),
            CaseDType::Float16 => format!("{:e}", f16::MAX.to_f32()),
        }
    }

    /// Whether `x` rounds to a finite value of the storage type.
    fn fits(self, x: f64) -> bool {
        match self {
            CaseDType::Float32 => (x as f32).is_finite(),
            CaseDType::Float16 => f16::from_f64(x).is_finite(),
        }
    }
}

/// Reads a list of input values that are stored in `dtype`: a value that would round to
/// infinity there (JSON has no infinities, so it can only be an out-of-range number) is an
/// error naming the field and the element.
fn as_input_list(v: &Value, what: &str, dtype: CaseDType) -> Result<Vec<f64>, ReplayError> {
    let values = as_f64_list(v, what)?;
    if let Some((i, x)) = values.iter().enumerate().find(|&(_, &x)| !dtype.fits(x)) {
        return Err(invalid(format!(
            "{what}[{i}]: {x:e} does not fit {} (largest finite value {})",
            dtype.name(),
            dtype.max()
        )));
    }
    Ok(values)
}

fn as_nested_list(v: &Value, what: &str) -> Result<Vec<Vec<f64>>, ReplayError> {
    v.as_array()
        .ok_or_else(|| invalid(format!("{what}: expected a list of lists")))?
        .iter()
        .enumerate()
        .map(|(i, x)| as_f64_list(x, &format!("{what}[{i}]")))
        .collect()
}

impl Case {
    /// Parses a case from JSON text.
    pub fn parse(json: &str) -> Result<Case, ReplayError> {
        let v: Value = serde_json::from_str(json).map_err(|e| ReplayError::Json(e.to_string()))?;
        Case::from_value(&v)
    }

    /// Reads and parses a case file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Case, ReplayError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ReplayError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Case::parse(&text)
    }

    /// Parses a case from a JSON value, checking its structure (format tag,
    /// dtype, shapes against initial values, variable indices, value counts).
    pub fn from_value(v: &Value) -> Result<Case, ReplayError> {
        let obj = v
            .as_object()
            .ok_or_else(|| invalid("expected a JSON object"))?;
        match obj.get("format").and_then(Value::as_str) {
            Some(CASE_FORMAT) => {}
            Some(other) => return Err(invalid(format!("unsupported format `{other}`"))),
            None => return Err(invalid("missing `format`")),
        }
        let name = obj
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("missing `name`"))?
            .to_string();
        let note = obj.get("note").and_then(Value::as_str).map(str::to_string);
        let optimizer = obj
            .get("optimizer")
            .cloned()
            .ok_or_else(|| invalid("missing `optimizer`"))?;
        let config = LazyAdamConfig::from_keras_value(&optimizer).map_err(Error::from)?;
        let dtype = match obj.get("dtype").and_then(Value::as_str) {
            Some("float32") => CaseDType::Float32,
            Some("float16") => CaseDType::Float16,
            Some(other) => return Err(invalid(format!("unsupported dtype `{other}`"))),
            None => return Err(invalid("missing `dtype`")),
        };
        let mut variables = Vec::new();
        for (i, var) in obj
            .get("variables")
            .and_then(Value::as_array)
            .ok_or_else(|| invalid("missing `variables`"))?
            .iter()
            .enumerate()
        {
            let what = format!("variables[{i}]");
            let name = var
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid(format!("{what}: missing `name`")))?
                .to_string();
            let shape: Vec<usize> = var
                .get("shape")
                .and_then(Value::as_array)
                .ok_or_else(|| invalid(format!("{what}: missing `shape`")))?
                .iter()
                .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                .collect::<Option<_>>()
                .ok_or_else(|| invalid(format!("{what}: bad `shape`")))?;
            let numel = shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| invalid(format!("{what}: shape too large")))?;
            let initial = as_input_list(
                var.get("initial")
                    .ok_or_else(|| invalid(format!("{what}: missing `initial`")))?,
                &format!("{what}.initial"),
                dtype,
            )?;
            if initial.len() != numel {
                return Err(invalid(format!(
                    "{what}: `initial` has {} values, shape {shape:?} needs {numel}",
                    initial.len()
                )));
            }
            variables.push(CaseVariable {
                name,
                shape,
                initial,
            });
        }
        let mut steps = Vec::new();
        for (s, step) in obj
            .get("steps")
            .and_then(Value::as_array)
            .ok_or_else(|| invalid("missing `steps`"))?
            .iter()
            .enumerate()
        {
            let mut grads = Vec::new();
            for (j, g) in step
                .as_array()
                .ok_or_else(|| invalid(format!("steps[{s}]: expected a list")))?
                .iter()
                .enumerate()
            {
                let what = format!("steps[{s}][{j}]");
                let variable = g
                    .get("variable")
                    .and_then(Value::as_u64)
                    .and_then(|x| usize::try_from(x).ok())
                    .filter(|&x| x < variables.len())
                    .ok_or_else(|| invalid(format!("{what}: bad `variable`")))?;
                let indices = match g.get("indices") {
                    None | Some(Value::Null) => None,
                    Some(ids) => Some(
                        ids.as_array()
                            .ok_or_else(|| invalid(format!("{what}: bad `indices`")))?
                            .iter()
                            .map(Value::as_i64)
                            .collect::<Option<Vec<i64>>>()
                            .ok_or_else(|| invalid(format!("{what}: bad `indices`")))?,
                    ),
                };
                let values = as_input_list(
                    g.get("values")
                        .ok_or_else(|| invalid(format!("{what}: missing `values`")))?,
                    &format!("{what}.values"),
                    dtype,
                )?;
                grads.push(CaseGradient {
                    variable,
                    indices,
                    values,
                });
            }
            steps.push(grads);
        }
        let expected = match obj.get("expected") {
            None | Some(Value::Null) => None,
            Some(e) => Some(Expected {
                iterations: e
                    .get("iterations")
                    .and_then(Value::as_u64)
                    .ok_or_else(|| invalid("expected: bad `iterations`"))?,
                variables: as_nested_list(
                    e.get("variables")
                        .ok_or_else(|| invalid("expected: missing `variables`"))?,
                    "expected.variables",
                )?,
                m: as_nested_list(
                    e.get("m").ok_or_else(|| invalid("expected: missing `m`"))?,
                    "expected.m",
                )?,
                v: as_nested_list(
                    e.get("v").ok_or_else(|| invalid("expected: missing `v`"))?,
                    "expected.v",
                )?,
            }),
        };
        let tolerance = match obj.get("tolerance") {
            None | Some(Value::Null) => Tolerance {
                rtol: 1e-5,
                atol: 1e-5,
            },
            Some(t) => Tolerance {
                rtol: t
                    .get("rtol")
                    .and_then(Value::as_f64)
                    .ok_or_else(|| invalid("tolerance: bad `rtol`"))?,
                atol: t
                    .get("atol")
                    .and_then(Value::as_f64)
                    .ok_or_else(|| invalid("tolerance: bad `atol`"))?,
            },
        };
        Ok(Case {
            name,
            note,
            optimizer,
            config,
            dtype,
            variables,
            steps,
            expected,
            tolerance,
        })
    }
}

/// The state after replaying a case (storage values widened to f32).
///
/// Serialized (and printed by [`ReplayResult::to_json_line`]) as JSON, which has no
/// infinities or NaN: a non-finite value is written as the string `"NaN"`, `"Infinity"` or
/// `"-Infinity"` (the spellings of JavaScript and Python), every finite value as the shortest
/// number that reads back as the same `f32`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReplayResult {
    /// Case name.
    pub name: String,
    /// Step counter.
    pub iterations: u64,
    /// Final variables.
    #[serde(serialize_with = "serialize_rows")]
    pub variables: Vec<Vec<f32>>,
    /// Final `m` slots.
    #[serde(serialize_with = "serialize_rows")]
    pub m: Vec<Vec<f32>>,
    /// Final `v` slots.
    #[serde(serialize_with = "serialize_rows")]
    pub v: Vec<Vec<f32>>,
}

/// An `f32` as JSON: a number when finite, else `"NaN"`, `"Infinity"` or `"-Infinity"`.
struct JsonF32(f32);

impl Serialize for JsonF32 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let x = self.0;
        if x.is_nan() {
            s.serialize_str("NaN")
        } else if x == f32::INFINITY {
            s.serialize_str("Infinity")
        } else if x == f32::NEG_INFINITY {
            s.serialize_str("-Infinity")
        } else {
            s.serialize_f32(x)
        }
    }
}

struct JsonRow<'a>(&'a [f32]);

impl Serialize for JsonRow<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|&x| JsonF32(x)))
    }
}

fn serialize_rows<S: Serializer>(rows: &[Vec<f32>], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(rows.iter().map(|r| JsonRow(r)))
}

impl ReplayResult {
    /// The one-line JSON output of the command line (see the type's documentation for
    /// non-finite values).
    pub fn to_json_line(&self) -> String {
        serde_json::to_string(self)
            .unwrap_or_else(|e| error_line(&self.name, &ReplayError::Json(e.to_string())))
    }
}

/// Replays a case with the reference semantics.
pub fn replay(case: &Case) -> Result<ReplayResult, ReplayError> {
    replay_with(case, Extensions::default())
}

enum Params {
    F32(Vec<Vec<f32>>),
    F16(Vec<Vec<f16>>),
}

/// Replays a case with extensions (e.g. a forced kernel path).
pub fn replay_with(case: &Case, ext: Extensions) -> Result<ReplayResult, ReplayError> {
    let mut opt = LazyAdam::with_extensions(case.config.clone(), ext)?;
    let dt = match case.dtype {
        CaseDType::Float32 => DType::F32,
        CaseDType::Float16 => DType::F16,
    };
    let mut ids = Vec::with_capacity(case.variables.len());
    for v in &case.variables {
        ids.push(opt.add_variable(&v.name, &v.shape, dt, dt)?);
    }
    let mut params = match case.dtype {
        CaseDType::Float32 => Params::F32(
            case.variables
                .iter()
                .map(|v| v.initial.iter().map(|&x| x as f32).collect())
                .collect(),
        ),
        CaseDType::Float16 => Params::F16(
            case.variables
                .iter()
                .map(|v| v.initial.iter().map(|&x| f16::from_f64(x)).collect())
                .collect(),
        ),
    };
    for (s, step) in case.steps.iter().enumerate() {
        // Gradient values in the case's storage type.
        let grads32: Vec<Vec<f32>>;
        let grads16: Vec<Vec<f16>>;
        let values: Vec<TensorRef<'_>> = match case.dtype {
            CaseDType::Float32 => {
                grads32 = step
                    .iter()
                    .map(|g| g.values.iter().map(|&x| x as f32).collect())
                    .collect();
                grads32.iter().map(|g| TensorRef::F32(g)).collect()
            }
            CaseDType::Float16 => {
                grads16 = step
                    .iter()
                    .map(|g| g.values.iter().map(|&x| f16::from_f64(x)).collect())
                    .collect();
                grads16.iter().map(|g| TensorRef::F16(g)).collect()
            }
        };
        // Disjoint mutable borrows of the parameters of the step's variables.
        let mut slots: Vec<Option<lazyadam::TensorMut<'_>>> = match &mut params {
            Params::F32(p) => p.iter_mut().map(|x| Some(x.into())).collect(),
            Params::F16(p) => p.iter_mut().map(|x| Some(x.into())).collect(),
        };
        let mut updates = Vec::with_capacity(step.len());
        for (g, vals) in step.iter().zip(values) {
            let param = slots[g.variable].take().ok_or_else(|| {
                invalid(format!(
                    "steps[{s}]: variable {} appears twice in one step",
                    g.variable
                ))
            })?;
            let grad = match &g.indices {
                Some(ix) => Gradient::Sparse {
                    ids: ix.as_slice().into(),
                    values: vals,
                },
                None => Gradient::Dense(vals),
            };
            updates.push(Update {
                var: ids[g.variable],
                param,
                grad,
            });
        }
        opt.apply_gradients(&mut updates)
            .map_err(|source| ReplayError::Step {
                case: case.name.clone(),
                step: s,
                steps: case.steps.len(),
                source,
            })?;
    }
    let variables = match &params {
        Params::F32(p) => p.clone(),
        Params::F16(p) => p
            .iter()
            .map(|x| x.iter().map(|y| y.to_f32()).collect())
            .collect(),
    };
    let mut m = Vec::new();
    let mut v = Vec::new();
    for &id in &ids {
        let slots = opt
            .slots(id)
            .ok_or_else(|| invalid("internal: variable without slots"))?;
        m.push(slots.m.to_f32_vec());
        v.push(slots.v.to_f32_vec());
    }
    Ok(ReplayResult {
        name: case.name.clone(),
        iterations: opt.iterations(),
        variables,
        m,
        v,
    })
}

/// A value that does not match its expectation.
#[derive(Clone, Debug, PartialEq)]
pub struct Mismatch {
    /// Where (`"variables[0][3]"`, `"iterations"`, ...).
    pub what: String,
    /// The replayed value.
    pub got: f64,
    /// The recorded value.
    pub expected: f64,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: got {}, expected {}",
            self.what, self.got, self.expected
        )
    }
}

/// The largest deviation of a replay from its expectation, relative to the tolerance.
#[derive(Clone, Debug, PartialEq)]
pub struct Deviation {
    /// Where (`"variables[0][3]"`, `"iterations"`, ...).
    pub what: String,
    /// `abs(got - expected)` (infinite or NaN for a non-finite result).
    pub error: f64,
    /// The largest error the tolerance allows there, `atol + rtol * abs(expected)` (0 for
    /// counts, which must match exactly).
    pub allowed: f64,
}

impl Deviation {
    /// `error / allowed`: at most 1 within the tolerance. A NaN error counts as infinite; a
    /// zero error within a zero allowance as 0.
    pub fn ratio(&self) -> f64 {
        if self.error.is_nan() {
            f64::INFINITY
        } else if self.error == 0.0 {
            0.0
        } else {
            self.error / self.allowed
        }
    }
}

/// The comparison of a replay with its case's `expected` block.
#[derive(Clone, Debug, PartialEq)]
pub struct Comparison {
    /// Every value outside the tolerance (empty: the case passes).
    pub mismatches: Vec<Mismatch>,
    /// The value with the largest [`Deviation::ratio`] (the first of equals), passing or not,
    /// or a count that differs; `None` when no value was compared and every count matched
    /// (or the case has no `expected` block).
    pub worst: Option<Deviation>,
}

impl Comparison {
    /// Whether every value is within the tolerance.
    pub fn passed(&self) -> bool {
        self.mismatches.is_empty()
    }
}

/// Compares a replay with the case's `expected` block within its tolerance: every
/// mismatch, and the worst deviation. A case without `expected` fails with one mismatch.
pub fn compare(case: &Case, result: &ReplayResult) -> Comparison {
    let Some(exp) = &case.expected else {
        return Comparison {
            mismatches: vec![Mismatch {
                what: "expected (missing)".into(),
                got: f64::NAN,
                expected: f64::NAN,
            }],
            worst: None,
        };
    };
    let mut cmp = Comparison {
        mismatches: Vec::new(),
        worst: None,
    };
    // Counts (iterations, numbers of variables, lengths) must match exactly.
    cmp.count("iterations".into(), result.iterations, exp.iterations);
    for (label, got, want) in [
        ("variables", &result.variables, &exp.variables),
        ("m", &result.m, &exp.m),
        ("v", &result.v, &exp.v),
    ] {
        if !cmp.count(
            format!("{label} (count)"),
            got.len() as u64,
            want.len() as u64,
        ) {
            continue;
        }
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            if !cmp.count(
                format!("{label}[{i}] (length)"),
                g.len() as u64,
                w.len() as u64,
            ) {
                continue;
            }
            for (j, (&a, &b)) in g.iter().zip(w).enumerate() {
                let got = a as f64;
                let error = (got - b).abs();
                let allowed = case.tolerance.atol + case.tolerance.rtol * b.abs();
                let fails = error.is_nan() || error > allowed;
                let d = Deviation {
                    what: String::new(),
                    error,
                    allowed,
                };
                if fails || cmp.is_worse(&d) {
                    let what = format!("{label}[{i}][{j}]");
                    if fails {
                        cmp.mismatches.push(Mismatch {
                            what: what.clone(),
                            got,
                            expected: b,
                        });
                    }
                    cmp.see(Deviation { what, ..d });
                }
            }
        }
    }
    cmp
}

impl Comparison {
    fn is_worse(&self, d: &Deviation) -> bool {
        self.worst.as_ref().is_none_or(|w| d.ratio() > w.ratio())
    }

    fn see(&mut self, d: Deviation) {
        if self.is_worse(&d) {
            self.worst = Some(d);
        }
    }

    /// Compares a count that must match exactly; returns whether it does.
    fn count(&mut self, what: String, got: u64, expected: u64) -> bool {
        let d = Deviation {
            what,
            error: got.abs_diff(expected) as f64,
            allowed: 0.0,
        };
        if got == expected {
            return true;
        }
        self.mismatches.push(Mismatch {
            what: d.what.clone(),
            got: got as f64,
            expected: expected as f64,
        });
        self.see(d);
        false
    }
}

/// Compares a replay with the case's `expected` block within its tolerance.
/// A case without `expected` fails with one mismatch.
pub fn check(case: &Case, result: &ReplayResult) -> Result<(), Vec<Mismatch>> {
    let c = compare(case, result);
    if c.mismatches.is_empty() {
        Ok(())
    } else {
        Err(c.mismatches)
    }
}

/// The error line of the command line: `{"name": ..., "error": ...}`.
pub fn error_line(name: &str, error: &ReplayError) -> String {
    serde_json::json!({"name": name, "error": error.to_string()}).to_string()
}
