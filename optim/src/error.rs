//! Error types.

use lazyadam_kernels::{DType, KernelError};

/// A configuration problem: an unknown key or an invalid value.
///
/// Every variant names the offending key (for schedules, the path such as
/// `learning_rate.config.decay_steps`).
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
#[non_exhaustive]
pub enum ConfigError {
    /// A key this reader does not know, with the keys it accepts there.
    #[error("unknown configuration key `{key}`; accepted keys: {accepted}")]
    UnknownKey {
        /// The unknown key (for schedules, its path).
        key: String,
        /// The keys accepted at that place, comma-separated.
        accepted: String,
    },
    /// A key whose value is out of range or of the wrong type.
    #[error("invalid value for `{key}`: {reason}")]
    InvalidValue {
        /// The offending key.
        key: String,
        /// Why the value was rejected.
        reason: String,
    },
    /// A required key is absent.
    #[error("missing configuration key `{0}`")]
    MissingKey(String),
    /// The text is not JSON (or not a JSON object).
    #[error("malformed configuration JSON: {0}")]
    Json(String),
    /// A custom (user) schedule cannot be written as Keras JSON.
    #[error("a custom learning-rate schedule cannot be serialized")]
    CustomSchedule,
}

impl ConfigError {
    pub(crate) fn unknown(key: impl Into<String>, accepted: impl Into<String>) -> Self {
        ConfigError::UnknownKey {
            key: key.into(),
            accepted: accepted.into(),
        }
    }

    pub(crate) fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::InvalidValue {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// Everything that can go wrong in the optimizer.
///
/// A step that returns an error has written nothing: parameters, slots and the
/// step counter are exactly as before the call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Invalid configuration or extension settings.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The [`VarId`](crate::VarId) does not belong to this optimizer (it was
    /// issued by another optimizer, or its index is out of range).
    #[error("unknown variable {variable}")]
    UnknownVariable {
        /// A description of the unknown variable (`VarId(n)` or a name).
        variable: String,
    },
    /// A variable with this name is already registered.
    #[error("variable `{name}` is already registered")]
    DuplicateVariable {
        /// The duplicated name.
        name: String,
    },
    /// The shape cannot be used (element count overflows, too large).
    #[error("invalid shape for variable `{variable}`: {reason}")]
    InvalidShape {
        /// The variable.
        variable: String,
        /// Why the shape was rejected.
        reason: String,
    },
    /// A tensor has the wrong storage type.
    #[error("variable `{variable}`: {what} has dtype {got:?}, expected {expected:?}")]
    DtypeMismatch {
        /// The variable.
        variable: String,
        /// Which tensor (`"param"`, `"m"`, ...).
        what: &'static str,
        /// The registered storage type.
        expected: DType,
        /// The storage type given.
        got: DType,
    },
    /// A tensor has the wrong number of elements.
    #[error("variable `{variable}`: {what} has {got} elements, expected {expected}")]
    LengthMismatch {
        /// The variable.
        variable: String,
        /// Which tensor (`"param"`, `"gradient values"`, ...).
        what: &'static str,
        /// Expected element count.
        expected: usize,
        /// Element count given.
        got: usize,
    },
    /// A sparse row id is not below the number of rows.
    #[error("variable `{variable}`: row id {id} out of range (rows: {rows})")]
    RowIdOutOfRange {
        /// The variable.
        variable: String,
        /// The offending id.
        id: u64,
        /// The number of rows of the variable.
        rows: usize,
    },
    /// A sparse row id is negative.
    #[error("variable `{variable}`: negative row id {id}")]
    NegativeRowId {
        /// The variable.
        variable: String,
        /// The offending id.
        id: i64,
    },
    /// A gradient holds NaN or an infinity and the policy is
    /// [`NonFinitePolicy::Error`](crate::NonFinitePolicy::Error).
    #[error("variable `{variable}`: non-finite gradient value {value} at element {element}{}", row.map(|r| format!(" (row id {r})")).unwrap_or_default())]
    NonFinite {
        /// The variable.
        variable: String,
        /// Index of the first offending element in the gradient values.
        element: usize,
        /// The row id of that element, for sparse gradients.
        row: Option<u64>,
        /// The offending value (widened to f32).
        value: f32,
    },
    /// A row occurs more than once in a sparse gradient, and its occurrences
    /// sum to NaN or an infinity (each value is finite), under
    /// [`NonFinitePolicy::Error`](crate::NonFinitePolicy::Error). The sum is
    /// the one the step would apply: the transformed values (loss scale,
    /// clipping) added in f32 in occurrence order.
    #[error(
        "variable `{variable}`: the {occurrences} occurrences of row id {row} sum to the non-finite gradient value {value} at element {element} of the row"
    )]
    NonFiniteSum {
        /// The variable.
        variable: String,
        /// The row id.
        row: u64,
        /// The first offending element within the row.
        element: usize,
        /// That element's sum.
        value: f32,
        /// How many times the row occurs in the gradient.
        occurrences: usize,
    },
    /// The same variable appears twice in one step.
    #[error("variable `{variable}` appears more than once in one step")]
    DuplicateUpdate {
        /// The variable.
        variable: String,
    },
    /// A checkpoint (bytes, file, or weight list) is corrupt or does not match.
    #[error("checkpoint error: {0}")]
    Checkpoint(String),
    /// An I/O error not tied to a file ([`LazyAdam::save`](crate::LazyAdam::save) and
    /// [`LazyAdam::load`](crate::LazyAdam::load) report [`Error::File`], with the path).
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A checkpoint file could not be read or written.
    #[error("cannot {action} `{path}`: {source}", path = path.display())]
    File {
        /// `"read"` or `"write"`.
        action: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// A by-name restore ([`LazyAdam::restore_by_name`](crate::LazyAdam::restore_by_name))
    /// found a variable (or a piece of optimizer state) that the saved state and this
    /// optimizer do not agree on.
    #[error("cannot restore `{variable}` by name: {reason}")]
    StateMismatch {
        /// The variable's name (or `loss_scale`).
        variable: String,
        /// What does not match.
        reason: String,
    },
    /// A kernel refused its input (a forced ISA the CPU lacks, or an internal
    /// length mismatch).
    #[error("kernel error: {0}")]
    Kernel(KernelError),
    /// An allocation failed (the variable is too large for this machine).
    #[error("out of memory allocating {what}")]
    OutOfMemory {
        /// What was being allocated.
        what: String,
    },
    /// A step counter above `i64::MAX`, the largest the reference's
    /// `iterations` (an int64) and a checkpoint can hold.
    #[error("step counter {iterations} is out of range: at most {max} (i64::MAX)", max = i64::MAX)]
    IterationsOutOfRange {
        /// The rejected value.
        iterations: u64,
    },
    /// [`LazyAdam::set_iterations`](crate::LazyAdam::set_iterations) with a
    /// step counter below a per-row counter of the extensions (a row's update
    /// count, or the step of its last update): the state would claim a row
    /// updated at a step not taken yet, and no checkpoint could hold it.
    #[error(
        "step counter {iterations} is below {counter}, the largest `{variable}/{what}` per-row counter; it must be at least that"
    )]
    IterationsBelowRowCounter {
        /// The rejected value.
        iterations: u64,
        /// The variable with the larger per-row counter.
        variable: String,
        /// Which counter: `"row_steps"` or `"last_step"`.
        what: &'static str,
        /// Its largest value.
        counter: u64,
    },
    /// The step counter is at `i64::MAX`: one more step cannot be counted.
    #[error("the step counter is at its maximum ({iterations}); no further step can be taken")]
    StepCounterExhausted {
        /// The step counter.
        iterations: u64,
    },
    /// The learning rate a step would use is NaN, infinite or negative (a
    /// schedule, legacy decay, bias correction or weight decay out of range).
    #[error(
        "step {step} (iterations = {step}): the {what} is {value:e}; it must be finite and not negative"
    )]
    InvalidLearningRate {
        /// The step counter when the step was attempted.
        step: u64,
        /// Which value: `"learning rate"`, `"bias-corrected step size"` or
        /// `"weight-decay factor"`.
        what: &'static str,
        /// The offending value.
        value: f32,
    },
    /// A sharded step or fetch failed because another rank rejected it (that
    /// rank's own call returned the reason). Nothing was written on any rank.
    #[error(
        "rank {rank} rejected the sharded {op} (its own error says why); nothing was written on any rank"
    )]
    PeerRejected {
        /// The lowest rank that rejected it.
        rank: usize,
        /// `"step"`, `"fetch"` or `"load"`.
        op: &'static str,
    },
    /// A collective operation of the engine failed.
    #[error("collective {op} failed: {source}")]
    Collective {
        /// `"all_gather"` or `"all_to_all"`.
        op: &'static str,
        /// The engine's error.
        source: crate::shard::CollectiveError,
    },
    /// The ranks of a sharded optimizer disagree (other variables, another
    /// configuration, another step counter), a peer sent a malformed message,
    /// or a request a sharded optimizer does not support.
    #[error("sharding: {reason}")]
    Sharding {
        /// What was wrong.
        reason: String,
    },
}

impl From<KernelError> for Error {
    fn from(e: KernelError) -> Self {
        Error::Kernel(e)
    }
}
