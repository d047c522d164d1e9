//! [candle](candle_core) adapter for the [`lazyadam`] optimizer.
//!
//! [`LazyAdamOptimizer`] implements [`candle_nn::Optimizer`], so it drops into an existing
//! candle training loop (`Optimizer::new(vars, config)`, `step(&grads)`, `backward_step(&loss)`,
//! `learning_rate` / `set_learning_rate`). On top of that it offers what candle's own
//! optimizers cannot:
//!
//! - **Sparse steps** ([`LazyAdamOptimizer::step_sparse`], [`LazyAdamOptimizer::step_mixed`]):
//!   the batch's row ids plus the gradient rows of an embedding table. Only those rows of the
//!   table and of its moments are read and written: the update happens **in place** in the
//!   variable's CPU storage (through candle's in-place custom-op API), so a step over 4,096 rows
//!   of a 1,000,000-row table costs 4,096 rows of work, not a copy of the table.
//! - **Lazy mode for dense gradients** ([`DenseGradients::LazyRows`]): candle's backward pass
//!   produces a dense gradient for an embedding table, zero outside the batch's rows. In lazy
//!   mode, every row of a variable of rank >= 2 (rows along dimension 0) whose gradient is all
//!   zeros is treated as absent, as TensorFlow does for embedding gradients. Variables of rank
//!   0 and 1 always get dense Adam. Cost: one read of the dense gradient (which candle has
//!   materialized anyway) to find the nonzero rows, then the work of a sparse step; the table
//!   and its moments are touched only on those rows.
//!
//! All the math is in [`lazyadam`]: this crate only borrows candle's buffers as slices and calls
//! [`lazyadam::LazyAdam::apply_gradients`], so results are bit-identical to calling the core
//! on the same data.
//!
//! # When the lazy mode differs from a sparse step
//!
//! Both update exactly the rows they consider present, and give the same bits on those rows,
//! except in these cases:
//!
//! 1. **A row present in the batch whose summed gradient is exactly zero** (every element is
//!    `+0.0` or `-0.0`; for example two occurrences whose gradients cancel, or a zero upstream
//!    gradient). A sparse step updates it: its moments decay (`m = beta_1 * m`,
//!    `v = beta_2 * v`) and the parameter moves by `lr_t * m / (sqrt(v) + eps)` with the
//!    decayed moments. Lazy mode cannot tell it from a row outside the batch and leaves the
//!    row and its moments untouched.
//! 2. **Duplicate ids.** A sparse step sums duplicate rows in f32 in first-occurrence order
//!    (the core's rule); a dense candle gradient was summed by candle's backward pass
//!    (`index_add`) in its own order and dtype. The sums, hence the updates, can differ in the
//!    last bits, and for f16/bf16 gradients candle rounds the sum to the gradient dtype.
//! 3. **Options that act per present row** (decoupled weight decay, catch-up decay,
//!    per-row bias correction, AMSGrad on sparse gradients) follow the same notion of presence,
//!    so they differ for the rows of case 1 too.
//!
//! Otherwise (every batch row has a nonzero gradient element, no duplicates) the two give the
//! same result. Clipping agrees as well: zero rows add nothing to a norm and are fixed points of
//! clipping by value.
//!
//! # Which path you get: dense by default
//!
//! A user who swaps candle's `AdamW` for [`LazyAdamOptimizer`] and changes nothing else gets
//! **dense Adam on dense gradients**: candle's backward pass gives an embedding table looked
//! up with [`Tensor::embedding`] (or [`candle_nn::Embedding`]) a dense gradient, and the
//! default [`DenseGradients::Adam`] updates every row of it, like `AdamW` (moments of
//! untouched rows decay too). Nothing is lazy and nothing is sparse yet. To get LazyAdam:
//!
//! - **Sparse path (recommended for large tables):** look the table up through a
//!   [`SparseEmbedding`] instead of `embedding`, and step with
//!   [`LazyAdamOptimizer::step_mixed`]`(&grads, &[emb.take_sparse_grad(&grads)?.as_sparse_grad()])`.
//!   Backward then computes only the looked-up rows' gradient, and the step touches only
//!   those rows. Or build a [`SparseGrad`] yourself and call
//!   [`LazyAdamOptimizer::step_sparse`].
//! - **Lazy mode:** keep the dense gradients and set
//!   [`Config::with_dense_gradients`]`(`[`DenseGradients::LazyRows`]`)`: all-zero rows are
//!   skipped (the semantics of a sparse step, at the cost of candle materializing the dense
//!   gradient).
//!
//! Also when coming from `AdamW`: [`Config::new`] takes the learning rate as an `f64` like
//! [`ParamsAdamW`](candle_nn::ParamsAdamW) (or use [`Config::from_adamw`]); Keras' defaults
//! apply (`epsilon = 1e-7`, no weight decay unless [`Config::with_weight_decay`]); and to
//! checkpoint, build the optimizer with [`LazyAdamOptimizer::from_varmap`], not
//! `Optimizer::new(varmap.all_vars(), ..)` (see [`LazyAdamOptimizer`] for why).
//!
//! # Checkpoints
//!
//! [`LazyAdamOptimizer::save`] / [`LazyAdamOptimizer::load_state`] (and
//! [`to_bytes`](LazyAdamOptimizer::to_bytes) / [`load_state_bytes`](LazyAdamOptimizer::load_state_bytes))
//! write and restore the optimizer state keyed by variable name; save the parameters with
//! [`VarMap::save`](candle_nn::VarMap::save). A missing, extra or mismatched variable is an
//! error naming it, with nothing changed.
//!
//! # Errors
//!
//! Typed [`Error`]s for a tensor on a non-CPU device, an unsupported dtype, a non-contiguous
//! variable, mismatched shapes, and everything the core rejects (negative or out-of-range ids,
//! ...). Every error leaves the variables, the optimizer state and the step counter
//! unchanged. Through the [`candle_nn::Optimizer`] trait the error arrives as a
//! [`candle_core::Error`]; [`Error::from_candle`] recovers the typed error.
//! [`candle_nn::Optimizer::set_learning_rate`] cannot return an error: see its documentation
//! on [`LazyAdamOptimizer`] (a rejected value makes the following steps fail) and prefer
//! [`LazyAdamOptimizer::try_set_learning_rate`].
//!
//! Variables with zero elements (a `(5, 0)` table, say) are accepted; their steps are no-ops.
//!
//! # Example
//!
//! ```
//! use candle_core::{DType, Device, Tensor, Var};
//! use candle_nn::Optimizer;
//! use lazyadam_candle::{Config, DenseGradients, LazyAdamOptimizer, SparseGrad};
//!
//! let dev = Device::Cpu;
//! let table = Var::zeros((1000, 8), DType::F32, &dev)?; // an embedding table
//! let w = Var::ones(8, DType::F32, &dev)?; // a dense weight
//! let mut opt = LazyAdamOptimizer::new_named(
//!     [("table", table.clone()), ("w", w.clone())],
//!     Config::new(0.01)?,
//! )?;
//!
//! // (a) The usual candle loop: dense gradients for every variable (dense Adam).
//! let ids = Tensor::new(&[3u32, 7, 3], &dev)?;
//! let emb = table.as_tensor().embedding(&ids)?; // (3, 8)
//! let loss = emb.broadcast_add(w.as_tensor())?.sqr()?.sum_all()?;
//! opt.backward_step(&loss)?;
//! assert_eq!(opt.inner().iterations(), 1);
//!
//! // (b) A sparse step: the batch's ids and one gradient row per id.
//! let rows = Tensor::ones((3, 8), DType::F32, &dev)?;
//! opt.step_sparse(&[SparseGrad::new(&table, &ids, &rows)])?;
//! let t = table.as_tensor().to_vec2::<f32>()?;
//! assert!(t[3][0] < 0.0 && t[0][0] == 0.0); // row 3 moved, row 0 untouched
//!
//! // (c) Lazy mode: dense gradients, all-zero rows of tables skipped.
//! let mut lazy = LazyAdamOptimizer::new_named(
//!     [("table", table.clone())],
//!     Config::new(0.01)?.with_dense_gradients(DenseGradients::LazyRows),
//! )?;
//! lazy.backward_step(&table.as_tensor().embedding(&ids)?.sum_all()?)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

/// The README's example, compiled and run by `cargo test --doc`.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

use std::cell::RefCell;
use std::fmt;
use std::path::Path;

use candle_core::backend::BackendStorage;
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, InplaceOp1, Layout, Storage, Tensor, Var};
use lazyadam::{Gradient, RowIds, TensorMut, Update};

pub use lazyadam::{
    self, BiasCorrection, ConfigError, CustomSchedule, DType, DynamicLossScale, Element,
    Extensions, LazyAdam, LazyAdamConfig, LearningRate, LearningRateSchedule, NonFinitePolicy,
    Schedule, Slots, StepOutcome, TensorRef, VarId, bf16, f16,
};
pub use {candle_core, candle_nn};

/// What [`step`](candle_nn::Optimizer::step) (and [`LazyAdamOptimizer::try_step`],
/// [`LazyAdamOptimizer::step_mixed`]) does with the dense gradients of a [`GradStore`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DenseGradients {
    /// Ordinary Adam on every element (the reference semantics for dense gradients).
    #[default]
    Adam,
    /// For variables of rank >= 2: rows (along dimension 0) whose gradient is all zeros are
    /// absent, and the others form a sparse gradient (LazyAdam). Rank 0 and 1: dense Adam.
    /// See the crate docs for exactly when this differs from a sparse step.
    LazyRows,
}

/// Configuration of [`LazyAdamOptimizer`] (the `Config` of [`candle_nn::Optimizer`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// The optimizer's hyperparameters (Keras names and defaults).
    pub optimizer: LazyAdamConfig,
    /// Options beyond the reference (all off by default).
    pub extensions: Extensions,
    /// Handling of dense gradients in [`step`](candle_nn::Optimizer::step),
    /// [`LazyAdamOptimizer::try_step`] and [`LazyAdamOptimizer::step_mixed`].
    pub dense_gradients: DenseGradients,
    /// Storage type of the moments (`F32` by default; `BF16` halves their memory; `F16`
    /// moments underflow for small gradients and are not recommended).
    pub moment_dtype: DType,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            optimizer: LazyAdamConfig::default(),
            extensions: Extensions::default(),
            dense_gradients: DenseGradients::Adam,
            moment_dtype: DType::F32,
        }
    }
}

impl Config {
    /// The defaults (Keras' `beta_1 = 0.9`, `beta_2 = 0.999`, `epsilon = 1e-7`, no clipping, no
    /// weight decay, [`DenseGradients::Adam`], f32 moments) with a constant learning rate `lr`.
    ///
    /// `lr` is an `f64`, as in candle's [`ParamsAdamW`](candle_nn::ParamsAdamW); the optimizer
    /// computes in f32, so `lr` is converted with a check: a negative, NaN or infinite value,
    /// or one that does not fit an f32 (above `f32::MAX`, or nonzero but rounding to zero), is
    /// an [`Error::InvalidHyperparameter`] here, never a silent rounding to infinity or zero.
    ///
    /// ```
    /// use lazyadam_candle::{Config, Error};
    ///
    /// let cfg = Config::new(1e-3)?.with_betas(0.9, 0.98)?.with_weight_decay(0.01)?;
    /// assert_eq!(cfg.optimizer.beta_2, 0.98);
    /// assert!(matches!(Config::new(1e40), Err(Error::InvalidHyperparameter { .. })));
    /// assert!(Config::new(-0.1).is_err());
    /// # Ok::<(), lazyadam_candle::Error>(())
    /// ```
    pub fn new(lr: f64) -> Result<Self, Error> {
        Self::default().with_learning_rate(lr)
    }

    /// Builds the configuration of candle's own [`AdamW`](candle_nn::AdamW) parameters: the
    /// same learning rate, betas, epsilon and (decoupled) weight decay, each converted to f32
    /// with a check. The update rules differ in details (Keras' epsilon placement,
    /// `epsilon = 1e-8` in candle against `1e-7` here by default, lazy rows for sparse
    /// gradients), so results are close to AdamW's but not the same bits.
    pub fn from_adamw(params: &candle_nn::ParamsAdamW) -> Result<Self, Error> {
        Self::new(params.lr)?
            .with_betas(params.beta1, params.beta2)?
            .with_epsilon(params.eps)?
            .with_weight_decay(params.weight_decay)
    }

    /// Sets a constant learning rate (checked as in [`Config::new`]).
    pub fn with_learning_rate(mut self, lr: f64) -> Result<Self, Error> {
        self.optimizer.learning_rate = LearningRate::Constant(checked_f32("learning_rate", lr)?);
        self.checked()
    }

    /// Sets a learning-rate schedule (a Keras built-in [`Schedule`], serializable in
    /// checkpoints). Errors for invalid schedule parameters.
    pub fn with_schedule(mut self, schedule: Schedule) -> Result<Self, Error> {
        self.optimizer.learning_rate = LearningRate::Schedule(schedule);
        self.checked()
    }

    /// Sets the decay rates of the first and second moments (each in `[0, 1)`).
    pub fn with_betas(mut self, beta_1: f64, beta_2: f64) -> Result<Self, Error> {
        self.optimizer.beta_1 = checked_f32("beta_1", beta_1)?;
        self.optimizer.beta_2 = checked_f32("beta_2", beta_2)?;
        self.checked()
    }

    /// Sets epsilon (finite and positive; Keras' `epsilon`, added to `sqrt(v)`).
    pub fn with_epsilon(mut self, epsilon: f64) -> Result<Self, Error> {
        self.optimizer.epsilon = checked_f32("epsilon", epsilon)?;
        self.checked()
    }

    /// Sets decoupled weight decay (LazyAdamW, as candle's `AdamW`): each updated row (every
    /// element for a dense gradient) gets `p -= weight_decay * lr * p` before the Adam update.
    /// 0 turns it off. This is [`Extensions::weight_decay`].
    pub fn with_weight_decay(mut self, weight_decay: f64) -> Result<Self, Error> {
        self.extensions.weight_decay = checked_f32("weight_decay", weight_decay)?;
        self.checked()
    }

    /// Clips each variable's gradient to this L2 norm (Keras' `clipnorm`; not together with
    /// [`with_global_clipnorm`](Self::with_global_clipnorm)).
    pub fn with_clipnorm(mut self, clipnorm: f64) -> Result<Self, Error> {
        self.optimizer.clipnorm = Some(checked_f32("clipnorm", clipnorm)?);
        self.checked()
    }

    /// Clips the gradients of all variables together to this global L2 norm (Keras'
    /// `global_clipnorm`).
    pub fn with_global_clipnorm(mut self, clipnorm: f64) -> Result<Self, Error> {
        self.optimizer.global_clipnorm = Some(checked_f32("global_clipnorm", clipnorm)?);
        self.checked()
    }

    /// Clips each gradient element to `[-clipvalue, clipvalue]` (Keras' `clipvalue`).
    pub fn with_clipvalue(mut self, clipvalue: f64) -> Result<Self, Error> {
        self.optimizer.clipvalue = Some(checked_f32("clipvalue", clipvalue)?);
        self.checked()
    }

    /// Turns AMSGrad on or off (dense gradients; see [`Extensions::sparse_amsgrad`] for sparse
    /// ones).
    pub fn with_amsgrad(mut self, amsgrad: bool) -> Self {
        self.optimizer.amsgrad = amsgrad;
        self
    }

    /// Sets the handling of dense gradients.
    pub fn with_dense_gradients(mut self, mode: DenseGradients) -> Self {
        self.dense_gradients = mode;
        self
    }

    /// Sets the optimizer's extensions (replacing a weight decay set before).
    pub fn with_extensions(mut self, ext: Extensions) -> Self {
        self.extensions = ext;
        self
    }

    /// Sets the moments' storage type.
    pub fn with_moment_dtype(mut self, dtype: DType) -> Self {
        self.moment_dtype = dtype;
        self
    }

    /// Checks every value as the optimizer's constructor does (the error names the key).
    pub fn validate(&self) -> Result<(), Error> {
        self.optimizer
            .validate()
            .and_then(|()| self.extensions.validate(self.optimizer.amsgrad))
            .map_err(|e| Error::Core(e.into()))
    }

    fn checked(self) -> Result<Self, Error> {
        self.validate()?;
        Ok(self)
    }
}

/// `x` as an f32 hyperparameter: finite, not negative, within the f32 range, and not a nonzero
/// value that rounds to zero.
fn checked_f32(name: &'static str, x: f64) -> Result<f32, Error> {
    let bad = |reason: &'static str| Error::InvalidHyperparameter {
        name,
        value: x,
        reason,
    };
    if x.is_nan() {
        return Err(bad("must be a number, not NaN"));
    }
    if x.is_infinite() {
        return Err(bad("must be finite"));
    }
    if x < 0.0 {
        return Err(bad("must not be negative"));
    }
    let y = x as f32;
    if y.is_infinite() {
        return Err(bad("does not fit an f32 (largest: 3.4028235e38)"));
    }
    if y == 0.0 && x != 0.0 {
        return Err(bad("is too small for an f32 (it would round to zero)"));
    }
    Ok(y)
}

/// Errors of this crate. Every error leaves variables, optimizer state and step counter
/// unchanged.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An error of the optimizer core (configuration, dtype, ids, non-finite values, ...).
    #[error(transparent)]
    Core(#[from] lazyadam::Error),
    /// An error of candle itself.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A tensor is on a device other than the CPU.
    #[error(
        "{what} of variable `{variable}` is on device {device}; only CPU tensors are supported"
    )]
    NonCpuDevice {
        /// Variable name.
        variable: String,
        /// Which tensor: `"variable"`, `"gradient"`, `"sparse ids"`, `"sparse values"`.
        what: &'static str,
        /// The device, as `Debug` of [`candle_core::DeviceLocation`].
        device: String,
    },
    /// A tensor has a dtype this crate does not handle (parameters and gradients: F32, F16,
    /// BF16; ids: U32, I32, I64).
    #[error("{what} of variable `{variable}` has unsupported dtype {dtype:?}")]
    UnsupportedDType {
        /// Variable name.
        variable: String,
        /// Which tensor.
        what: &'static str,
        /// The dtype found.
        dtype: candle_core::DType,
    },
    /// A variable's storage is not contiguous, so it cannot be updated in place.
    #[error("{what} of variable `{variable}` is not contiguous")]
    NonContiguous {
        /// Variable name.
        variable: String,
        /// Which tensor.
        what: &'static str,
    },
    /// A tensor's shape does not fit the variable.
    #[error("{what} of variable `{variable}` has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        /// Variable name.
        variable: String,
        /// Which tensor.
        what: &'static str,
        /// The expected shape.
        expected: Vec<usize>,
        /// The shape given.
        got: Vec<usize>,
    },
    /// A [`SparseGrad`] names a variable this optimizer does not hold.
    #[error("sparse gradient for a variable (shape {shape:?}) not registered with this optimizer")]
    UnknownVar {
        /// The variable's shape.
        shape: Vec<usize>,
    },
    /// Two [`SparseGrad`]s for the same variable in one step.
    #[error("two sparse gradients for variable `{variable}` in one step")]
    DuplicateSparse {
        /// Variable name.
        variable: String,
    },
    /// A variable is already registered, or shares its storage with a registered variable.
    #[error("variable `{variable}` shares its storage with registered variable `{other}`")]
    SharedStorage {
        /// The new variable's name.
        variable: String,
        /// The registered variable's name.
        other: String,
    },
    /// A hyperparameter given as an `f64` (as candle's optimizers take them) that is NaN,
    /// infinite, negative, or does not fit the optimizer's f32.
    #[error("invalid hyperparameter `{name}` = {value:e}: {reason}")]
    InvalidHyperparameter {
        /// The key (`"learning_rate"`, `"beta_1"`, ...).
        name: &'static str,
        /// The value given.
        value: f64,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// [`candle_nn::Optimizer::set_learning_rate`] (which cannot return an error) was given an
    /// invalid value: the learning rate stayed as it was, and every step fails with this error
    /// until a valid learning rate is set or [`LazyAdamOptimizer::take_error`] is called.
    #[error(
        "set_learning_rate({value:e}) was rejected ({reason}); the learning rate is unchanged and \
         steps fail until a valid learning rate is set or take_error() is called"
    )]
    RejectedLearningRate {
        /// The rejected value.
        value: f64,
        /// Why it was rejected.
        reason: String,
    },
    /// A tensor handed out as a variable is a constant (for example from a
    /// [`VarBuilder`](candle_nn::VarBuilder) not backed by a [`VarMap`](candle_nn::VarMap)).
    #[error("`{variable}` is not a variable (a VarBuilder without a VarMap gives constants)")]
    NotAVariable {
        /// Variable name.
        variable: String,
    },
    /// A sparse gradient for a scalar (rank 0) variable, which has no rows.
    #[error("variable `{variable}` is a scalar and takes dense gradients only")]
    SparseScalar {
        /// Variable name.
        variable: String,
    },
}

impl Error {
    /// Finds this crate's typed error inside a [`candle_core::Error`] returned through the
    /// [`candle_nn::Optimizer`] trait (it travels as `WrappedContext`, possibly with a
    /// backtrace or context around it).
    pub fn from_candle(e: &candle_core::Error) -> Option<&Error> {
        match e {
            candle_core::Error::WrappedContext { wrapped, .. } => wrapped.downcast_ref::<Error>(),
            candle_core::Error::WithBacktrace { inner, .. }
            | candle_core::Error::Context { inner, .. }
            | candle_core::Error::WithPath { inner, .. } => Error::from_candle(inner),
            _ => None,
        }
    }
}

impl From<Error> for candle_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Candle(c) => c,
            e => {
                let context = e.to_string();
                candle_core::Error::WrappedContext {
                    wrapped: Box::new(e),
                    context,
                }
            }
        }
    }
}

/// A sparse gradient for one variable: `values[k]` is the gradient of row `ids[k]`.
///
/// `ids` has dtype U32, I32 or I64 and any shape (for example the `(batch, seq)` input of
/// [`Tensor::embedding`]); `values` has shape `ids.dims() ++ var.dims()[1..]` (what
/// `embedding` returns) or `(ids.elem_count(), row_len)`. Duplicate ids are summed. Negative
/// or out-of-range ids are an error.
#[derive(Clone, Copy, Debug)]
pub struct SparseGrad<'a> {
    /// The variable (an embedding table, rank >= 1).
    pub var: &'a Var,
    /// Row ids.
    pub ids: &'a Tensor,
    /// Gradient rows.
    pub values: &'a Tensor,
}

impl<'a> SparseGrad<'a> {
    /// A sparse gradient of `var`.
    pub fn new(var: &'a Var, ids: &'a Tensor, values: &'a Tensor) -> Self {
        Self { var, ids, values }
    }
}

/// An embedding table whose lookups yield **sparse** gradients from candle's autograd.
///
/// candle's own [`Tensor::embedding`] on a table [`Var`] makes backward produce a dense
/// gradient of the whole table (zero outside the looked-up rows). [`forward`](Self::forward)
/// instead looks the rows up outside the graph (`table.embedding(ids).detach()`) and wraps them
/// in a fresh tracked [`Var`], so backward computes the gradient of the looked-up rows only;
/// the ids are recorded. After `loss.backward()`,
/// [`take_sparse_grad`](Self::take_sparse_grad) turns the [`GradStore`] into a
/// [`SparseEmbeddingGrad`] (ids + gradient rows) for [`LazyAdamOptimizer::step_sparse`] or
/// [`LazyAdamOptimizer::step_mixed`], and forgets the recorded lookups.
///
/// The table itself gets no gradient in the [`GradStore`], so only the sparse path updates
/// it: step with [`LazyAdamOptimizer::step_mixed`] (the other variables take their dense
/// gradients from the same store). A plain [`step`](candle_nn::Optimizer::step) would leave
/// the table untouched.
///
/// ```
/// use candle_core::{DType, Device, Tensor, Var};
/// use lazyadam_candle::{Config, LazyAdamOptimizer, SparseEmbedding};
///
/// let dev = Device::Cpu;
/// let table = Var::ones((100, 4), DType::F32, &dev)?;
/// let emb = SparseEmbedding::new("emb", table.clone())?;
/// let w = Var::ones(4, DType::F32, &dev)?;
/// let mut opt = LazyAdamOptimizer::new_named(
///     [("emb", table.clone()), ("w", w.clone())],
///     Config::new(0.1)?,
/// )?;
///
/// let ids = Tensor::new(&[[3u32, 7], [7, 9]], &dev)?; // any shape of ids
/// let rows = emb.forward(&ids)?; // (2, 2, 4)
/// let loss = rows.broadcast_mul(w.as_tensor())?.sum_all()?;
/// let grads = loss.backward()?;
/// let sparse = emb.take_sparse_grad(&grads)?; // 4 ids, 4 gradient rows
/// assert_eq!(sparse.values().dims(), &[4, 4]);
/// opt.step_mixed(&grads, &[sparse.as_sparse_grad()])?; // sparse table, dense `w`
///
/// let t = table.as_tensor().to_vec2::<f32>()?;
/// assert!(t[7][0] < 1.0 && t[0][0] == 1.0); // looked-up rows moved, the others did not
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct SparseEmbedding {
    table: Var,
    name: String,
    rows: usize,
    hidden: usize,
    lookups: std::sync::Mutex<Vec<Lookup>>,
}

#[derive(Debug)]
struct Lookup {
    /// Flat row ids (U32 or I64).
    ids: Tensor,
    /// The looked-up rows, `(ids.len(), hidden)`, tracked.
    rows: Var,
}

/// The sparse gradient of a [`SparseEmbedding`]'s table, from
/// [`SparseEmbedding::take_sparse_grad`]: flat ids and one gradient row per id (duplicates
/// are kept; the optimizer sums them).
#[derive(Clone, Debug)]
pub struct SparseEmbeddingGrad {
    table: Var,
    ids: Tensor,
    values: Tensor,
}

impl SparseEmbeddingGrad {
    /// The row ids, `(n,)`.
    pub fn ids(&self) -> &Tensor {
        &self.ids
    }

    /// The gradient rows, `(n, hidden)`.
    pub fn values(&self) -> &Tensor {
        &self.values
    }

    /// The [`SparseGrad`] to pass to [`LazyAdamOptimizer::step_sparse`] or
    /// [`LazyAdamOptimizer::step_mixed`].
    pub fn as_sparse_grad(&self) -> SparseGrad<'_> {
        SparseGrad::new(&self.table, &self.ids, &self.values)
    }
}

impl SparseEmbedding {
    /// Wraps a table `Var` of shape `(rows, hidden)` (on the CPU, F32/F16/BF16); `name` is
    /// used in error messages.
    pub fn new(name: &str, table: Var) -> Result<Self, Error> {
        let t = table.as_tensor();
        cpu_float_dtype(name, t)?;
        let &[rows, hidden] = t.dims() else {
            return Err(Error::ShapeMismatch {
                variable: name.to_owned(),
                what: "embedding table (rank 2 expected)",
                expected: vec![],
                got: t.dims().to_vec(),
            });
        };
        Ok(Self {
            table,
            name: name.to_owned(),
            rows,
            hidden,
            lookups: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// Creates the table in a [`VarBuilder`](candle_nn::VarBuilder) under `"weight"` (as
    /// [`candle_nn::embedding()`] does, same initialization), so that it is in the
    /// [`VarMap`](candle_nn::VarMap) and [`LazyAdamOptimizer::from_varmap`] registers it.
    pub fn from_varbuilder(
        rows: usize,
        hidden: usize,
        vb: candle_nn::VarBuilder<'_>,
    ) -> Result<Self, Error> {
        let t = vb.get_with_hints(
            (rows, hidden),
            "weight",
            candle_nn::Init::Randn {
                mean: 0.,
                stdev: 1.,
            },
        )?;
        let name = if vb.prefix().is_empty() {
            "weight".to_owned()
        } else {
            format!("{}.weight", vb.prefix())
        };
        if !t.is_variable() {
            // A VarBuilder not backed by a VarMap hands out constants: nothing to train.
            return Err(Error::NotAVariable { variable: name });
        }
        Self::new(&name, Var::from_tensor(&t)?)
    }

    /// The table.
    pub fn table(&self) -> &Var {
        &self.table
    }

    /// The number of lookups recorded since the last
    /// [`take_sparse_grad`](Self::take_sparse_grad) or [`clear`](Self::clear).
    pub fn pending_lookups(&self) -> usize {
        self.lock().len()
    }

    /// Forgets the recorded lookups (for example after an evaluation pass that will not be
    /// followed by a step). Evaluation can also use [`lookup`](Self::lookup), which records
    /// nothing.
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// The rows of `ids` (any shape; dtype U8, U32 or I64), shape `ids.dims() ++ [hidden]`,
    /// as a tracked tensor whose gradient [`take_sparse_grad`](Self::take_sparse_grad)
    /// collects. The lookup is recorded. A negative or out-of-range id is a typed error.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor, Error> {
        let (flat, rows) = self.gather(ids)?;
        let var = Var::from_tensor(&rows.detach())?;
        let mut dims = ids.dims().to_vec();
        dims.push(self.hidden);
        let out = var.as_tensor().reshape(dims)?;
        self.lock().push(Lookup {
            ids: flat,
            rows: var,
        });
        Ok(out)
    }

    /// The rows of `ids` without recording anything and without gradient (for evaluation).
    pub fn lookup(&self, ids: &Tensor) -> Result<Tensor, Error> {
        let (_, rows) = self.gather(ids)?;
        let mut dims = ids.dims().to_vec();
        dims.push(self.hidden);
        Ok(rows.detach().reshape(dims)?)
    }

    /// After `loss.backward()`: the gradient rows of every lookup recorded since the last
    /// call, concatenated, with their ids. Lookups the loss did not depend on contribute
    /// nothing. The recorded lookups are forgotten (also on error).
    pub fn take_sparse_grad(&self, grads: &GradStore) -> Result<SparseEmbeddingGrad, Error> {
        let lookups = std::mem::take(&mut *self.lock());
        let mut ids = Vec::with_capacity(lookups.len());
        let mut values = Vec::with_capacity(lookups.len());
        for l in &lookups {
            if let Some(g) = grads.get(l.rows.as_tensor()) {
                ids.push(l.ids.clone());
                values.push(g.clone());
            }
        }
        let dev = self.table.device();
        let (ids, values) = if ids.is_empty() {
            (
                Tensor::zeros(0, candle_core::DType::U32, dev)?,
                Tensor::zeros((0, self.hidden), self.table.dtype(), dev)?,
            )
        } else {
            // Mixed id dtypes are widened to I64 (U32 ids always fit).
            let first = ids.first().map(Tensor::dtype);
            let mixed = ids.iter().any(|t| Some(t.dtype()) != first);
            if mixed {
                for t in &mut ids {
                    *t = t.to_dtype(candle_core::DType::I64)?;
                }
            }
            (Tensor::cat(&ids, 0)?, Tensor::cat(&values, 0)?)
        };
        Ok(SparseEmbeddingGrad {
            table: self.table.clone(),
            ids,
            values,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Lookup>> {
        self.lookups
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Flat ids (U32 or I64), checked against the table, and the rows `(n, hidden)`.
    fn gather(&self, ids: &Tensor) -> Result<(Tensor, Tensor), Error> {
        let name = &self.name;
        if !ids.device().is_cpu() {
            return Err(Error::NonCpuDevice {
                variable: name.clone(),
                what: "embedding ids",
                device: device_name(ids),
            });
        }
        let flat = ids.flatten_all()?;
        let flat = match flat.dtype() {
            candle_core::DType::U32 | candle_core::DType::I64 => flat,
            candle_core::DType::U8 => flat.to_dtype(candle_core::DType::U32)?,
            other => {
                return Err(Error::UnsupportedDType {
                    variable: name.clone(),
                    what: "embedding ids",
                    dtype: other,
                });
            }
        };
        let out_of_range = |id: u64| {
            Error::Core(lazyadam::Error::RowIdOutOfRange {
                variable: name.clone(),
                id,
                rows: self.rows,
            })
        };
        if flat.dtype() == candle_core::DType::I64 {
            for id in flat.to_vec1::<i64>()? {
                match u64::try_from(id) {
                    Err(_) => {
                        return Err(Error::Core(lazyadam::Error::NegativeRowId {
                            variable: name.clone(),
                            id,
                        }));
                    }
                    Ok(u) if u >= self.rows as u64 => return Err(out_of_range(u)),
                    Ok(_) => {}
                }
            }
        } else if let Some(&id) = flat
            .to_vec1::<u32>()?
            .iter()
            .find(|&&id| u64::from(id) >= self.rows as u64)
        {
            return Err(out_of_range(u64::from(id)));
        }
        let rows = self.table.as_tensor().embedding(&flat)?;
        Ok((flat, rows))
    }
}

impl candle_core::Module for SparseEmbedding {
    /// [`SparseEmbedding::forward`] (recording the lookup).
    fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        Ok(SparseEmbedding::forward(self, ids)?)
    }
}

#[derive(Debug)]
struct Entry {
    var: Var,
    id: VarId,
    name: String,
    /// Address of the storage inside candle's lock: equal addresses = shared storage.
    addr: usize,
}

/// LazyAdam for candle [`Var`]s; implements [`candle_nn::Optimizer`].
///
/// Each registered variable gets a variable of the core [`LazyAdam`], with the variable's shape
/// and dtype, under a name. The name is what a checkpoint ([`save`](Self::save),
/// [`load_state`](Self::load_state)) keys the variable's moments by, so it must mean the same
/// variable in the process that saves and in the one that loads:
///
/// - [`from_varmap`](Self::from_varmap) takes the [`candle_nn::VarMap`]'s own names
///   (`"layer1.weight"`, ...): stable across processes. **Use it for anything you checkpoint.**
/// - [`new_named`](Self::new_named) takes your names.
/// - [`new`](candle_nn::Optimizer::new) (the [`candle_nn::Optimizer`] constructor) names the
///   variables by position, `var0`, `var1`, ... **These names are not stable across processes
///   when the list comes from [`VarMap::all_vars`](candle_nn::VarMap::all_vars)**, which
///   iterates a `HashMap`: in another process `var0` is another variable, and restoring a
///   checkpoint would silently give each variable some other variable's moments (or fail on a
///   shape mismatch, if you are lucky).
#[derive(Debug)]
pub struct LazyAdamOptimizer {
    opt: LazyAdam,
    entries: Vec<Entry>,
    dense_gradients: DenseGradients,
    moment_dtype: DType,
    /// A value [`candle_nn::Optimizer::set_learning_rate`] rejected, with the reason.
    rejected_lr: Option<(f64, String)>,
}

fn storage_addr(t: &Tensor) -> usize {
    let (guard, _) = t.storage_and_layout();
    std::ptr::from_ref::<Storage>(&guard).addr()
}

fn device_name(t: &Tensor) -> String {
    format!("{:?}", t.device().location())
}

/// The storage type of the variable `name`'s tensor, which must be on the CPU and of a float
/// type the kernels take (F32, F16, BF16).
fn cpu_float_dtype(name: &str, t: &Tensor) -> Result<DType, Error> {
    if !t.device().is_cpu() {
        return Err(Error::NonCpuDevice {
            variable: name.to_owned(),
            what: "variable",
            device: device_name(t),
        });
    }
    float_dtype(t.dtype()).ok_or_else(|| Error::UnsupportedDType {
        variable: name.to_owned(),
        what: "variable",
        dtype: t.dtype(),
    })
}

fn float_dtype(dt: candle_core::DType) -> Option<DType> {
    match dt {
        candle_core::DType::F32 => Some(DType::F32),
        candle_core::DType::F16 => Some(DType::F16),
        candle_core::DType::BF16 => Some(DType::BF16),
        _ => None,
    }
}

impl LazyAdamOptimizer {
    /// An optimizer over the variables of a [`candle_nn::VarMap`], each registered under its
    /// name in the map (the name a [`VarBuilder`](candle_nn::VarBuilder) gave it, such as
    /// `"layer1.weight"`), in sorted-name order. The names, hence checkpoints, are stable
    /// across processes, whatever order the model was built in.
    ///
    /// Create the model first: variables added to the map later are not registered (add them
    /// with [`add_var`](Self::add_var)).
    ///
    /// ```
    /// use candle_core::{DType, Device, Module, Tensor};
    /// use candle_nn::{VarBuilder, VarMap, linear};
    /// use lazyadam_candle::{Config, LazyAdamOptimizer};
    ///
    /// let varmap = VarMap::new();
    /// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    /// let layer = linear(4, 2, vb.pp("layer"))?;
    /// let mut opt = LazyAdamOptimizer::from_varmap(&varmap, Config::new(1e-2)?)?;
    /// assert_eq!(opt.var_names(), ["layer.bias", "layer.weight"]);
    ///
    /// let x = Tensor::ones((3, 4), DType::F32, &Device::Cpu)?;
    /// let loss = layer.forward(&x)?.sqr()?.sum_all()?;
    /// opt.try_backward_step(&loss)?;
    /// assert_eq!(opt.inner().iterations(), 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn from_varmap(varmap: &candle_nn::VarMap, config: Config) -> Result<Self, Error> {
        let mut named: Vec<(String, Var)> = {
            // A poisoned lock only means another thread panicked while holding it; the map
            // itself is intact.
            let data = varmap
                .data()
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            data.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        named.sort_by(|a, b| a.0.cmp(&b.0));
        Self::new_named(named, config)
    }

    /// An optimizer over named variables (the names identify the state in checkpoints, so
    /// they must name the same variables in the process that loads one).
    pub fn new_named<S: Into<String>>(
        vars: impl IntoIterator<Item = (S, Var)>,
        config: Config,
    ) -> Result<Self, Error> {
        let mut me = Self {
            opt: LazyAdam::with_extensions(config.optimizer, config.extensions)?,
            entries: Vec::new(),
            dense_gradients: config.dense_gradients,
            moment_dtype: config.moment_dtype,
            rejected_lr: None,
        };
        for (name, var) in vars {
            me.add_var(&name.into(), &var)?;
        }
        Ok(me)
    }

    /// Registers one more variable under `name`. Errors (nothing registered) for a non-CPU
    /// device, an unsupported dtype, a non-contiguous layout, or a variable already registered
    /// (or sharing its storage with a registered one).
    pub fn add_var(&mut self, name: &str, var: &Var) -> Result<VarId, Error> {
        let t = var.as_tensor();
        let dtype = cpu_float_dtype(name, t)?;
        if !t.is_contiguous() {
            return Err(Error::NonContiguous {
                variable: name.to_owned(),
                what: "variable",
            });
        }
        let addr = storage_addr(t);
        if let Some(other) = self.entries.iter().find(|e| e.addr == addr) {
            return Err(Error::SharedStorage {
                variable: name.to_owned(),
                other: other.name.clone(),
            });
        }
        let id = self
            .opt
            .add_variable(name, t.dims(), dtype, self.moment_dtype)?;
        self.entries.push(Entry {
            var: var.clone(),
            id,
            name: name.to_owned(),
            addr,
        });
        Ok(id)
    }

    /// The core optimizer (iterations, slots, weights, checkpoints).
    pub fn inner(&self) -> &LazyAdam {
        &self.opt
    }

    /// The core optimizer, mutably.
    pub fn inner_mut(&mut self) -> &mut LazyAdam {
        &mut self.opt
    }

    /// The registered variables, in registration order.
    pub fn vars(&self) -> Vec<Var> {
        self.entries.iter().map(|e| e.var.clone()).collect()
    }

    /// The names of the registered variables, in registration order.
    pub fn var_names(&self) -> Vec<&str> {
        self.entries.iter().map(|e| e.name.as_str()).collect()
    }

    /// The core's id of the variable registered under `name`.
    pub fn var_id_by_name(&self, name: &str) -> Option<VarId> {
        self.entries.iter().find(|e| e.name == name).map(|e| e.id)
    }

    /// Writes the optimizer's state (step counter, loss scale, every variable's moments and
    /// per-row counters, keyed by variable name, plus the configuration) to a file, in the
    /// core's checkpoint format ([`LazyAdam::save`]). The parameters themselves are not in it:
    /// save them with [`VarMap::save`](candle_nn::VarMap::save). Fails for a custom
    /// learning-rate schedule, which cannot be written.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use candle_nn::{VarBuilder, VarMap, linear};
    /// use lazyadam_candle::{Config, LazyAdamOptimizer};
    ///
    /// let dir = std::env::temp_dir().join(format!("lazyadam-candle-doc-{}", std::process::id()));
    /// std::fs::create_dir_all(&dir)?;
    /// let (params, state) = (dir.join("model.safetensors"), dir.join("optim.safetensors"));
    ///
    /// // Train a little and save both files.
    /// let varmap = VarMap::new();
    /// let a = linear(3, 3, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu).pp("a"))?;
    /// let mut opt = LazyAdamOptimizer::from_varmap(&varmap, Config::new(1e-2)?)?;
    /// let x = Tensor::ones((2, 3), DType::F32, &Device::Cpu)?;
    /// opt.try_backward_step(&candle_core::Module::forward(&a, &x)?.sum_all()?)?;
    /// varmap.save(&params)?;
    /// opt.save(&state)?;
    ///
    /// // Another process: the same model in a fresh VarMap, then both files loaded.
    /// let mut varmap2 = VarMap::new();
    /// let _a = linear(3, 3, VarBuilder::from_varmap(&varmap2, DType::F32, &Device::Cpu).pp("a"))?;
    /// varmap2.load(&params)?;
    /// let mut opt2 = LazyAdamOptimizer::from_varmap(&varmap2, Config::new(1e-2)?)?;
    /// opt2.load_state(&state)?;
    /// assert_eq!(opt2.inner().iterations(), 1);
    /// assert_eq!(opt2.to_bytes()?, opt.to_bytes()?);
    /// # std::fs::remove_dir_all(&dir)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), Error> {
        Ok(self.opt.save(path)?)
    }

    /// The bytes [`save`](Self::save) writes.
    pub fn to_bytes(&self) -> Result<Vec<u8>, Error> {
        Ok(self.opt.to_bytes()?)
    }

    /// Restores the state written by [`save`](Self::save) into this optimizer, **by variable
    /// name**: each registered variable gets the moments and per-row counters saved under its
    /// name, and the step counter and loss scale are restored. The hyperparameters stay those
    /// of this optimizer's [`Config`].
    ///
    /// A variable missing from the file, a variable of the file this optimizer does not hold,
    /// or a shape or dtype that differs is an error naming the variable
    /// ([`lazyadam::Error::StateMismatch`] inside [`Error::Core`]), and nothing is changed. So
    /// is an unreadable or corrupt file.
    pub fn load_state(&mut self, path: impl AsRef<Path>) -> Result<(), Error> {
        Ok(self.opt.restore_from_file(path)?)
    }

    /// [`load_state`](Self::load_state) from the bytes of [`to_bytes`](Self::to_bytes).
    pub fn load_state_bytes(&mut self, bytes: &[u8]) -> Result<(), Error> {
        Ok(self.opt.restore_from_bytes(bytes)?)
    }

    /// The core's id of a registered variable.
    pub fn var_id(&self, var: &Var) -> Option<VarId> {
        self.entries
            .iter()
            .find(|e| e.var.as_tensor().id() == var.as_tensor().id())
            .map(|e| e.id)
    }

    /// The handling of dense gradients.
    pub fn dense_gradients(&self) -> DenseGradients {
        self.dense_gradients
    }

    /// Changes the handling of dense gradients.
    pub fn set_dense_gradients(&mut self, mode: DenseGradients) {
        self.dense_gradients = mode;
    }

    /// Sets a constant learning rate, checked as in [`Config::new`] (negative, NaN, infinite
    /// or not fitting an f32 is an [`Error::InvalidHyperparameter`], and the learning rate
    /// stays as it was). Unlike
    /// [`Optimizer::set_learning_rate`](candle_nn::Optimizer::set_learning_rate), which cannot
    /// return an error, it reports the problem right here. A valid value also clears an error
    /// left by [`Optimizer::set_learning_rate`](candle_nn::Optimizer::set_learning_rate).
    pub fn try_set_learning_rate(&mut self, lr: f64) -> Result<(), Error> {
        let lr32 = checked_f32("learning_rate", lr)?;
        self.opt.set_learning_rate(lr32)?;
        self.rejected_lr = None;
        Ok(())
    }

    /// The error of the last value [`Optimizer::set_learning_rate`](candle_nn::Optimizer::set_learning_rate)
    /// rejected ([`Error::RejectedLearningRate`]), if it is still pending: while it is, every
    /// step fails with it. `None` once a valid learning rate was set or the error was taken.
    pub fn last_error(&self) -> Option<Error> {
        self.rejected_lr
            .as_ref()
            .map(|(value, reason)| Error::RejectedLearningRate {
                value: *value,
                reason: reason.clone(),
            })
    }

    /// Takes the pending [`last_error`](Self::last_error), so that steps run again (with the
    /// learning rate from before the rejected call).
    pub fn take_error(&mut self) -> Option<Error> {
        let e = self.last_error();
        self.rejected_lr = None;
        e
    }

    /// [`candle_nn::Optimizer::backward_step`] with this crate's typed error.
    pub fn try_backward_step(&mut self, loss: &Tensor) -> Result<StepOutcome, Error> {
        let grads = loss.backward()?;
        self.try_step(&grads)
    }

    /// One step from the dense gradients of a [`GradStore`] (variables without a gradient are
    /// not part of the step), with typed errors. [`candle_nn::Optimizer::step`] calls this.
    pub fn try_step(&mut self, grads: &GradStore) -> Result<StepOutcome, Error> {
        self.step_impl(Some(grads), &[])
    }

    /// One step from sparse gradients only (one increment of the step counter). Only the rows
    /// listed, and their moments, are read and written, in place. Variables without a
    /// [`SparseGrad`] are not part of the step.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor, Var};
    /// use lazyadam_candle::{Config, LazyAdamOptimizer, SparseGrad};
    ///
    /// let dev = Device::Cpu;
    /// let table = Var::zeros((10, 2), DType::F32, &dev)?;
    /// let mut opt = LazyAdamOptimizer::new_named([("table", table.clone())], Config::new(0.1)?)?;
    /// let ids = Tensor::new(&[4u32, 1, 4], &dev)?; // duplicates are summed
    /// let rows = Tensor::new(&[[1f32, -1.], [2., 2.], [1., -1.]], &dev)?;
    /// opt.step_sparse(&[SparseGrad::new(&table, &ids, &rows)])?;
    ///
    /// let t = table.as_tensor().to_vec2::<f32>()?;
    /// // Row 4's summed gradient is (2, -2); a first Adam step moves by about -lr * sign(g).
    /// assert!((t[4][0] + 0.1).abs() < 1e-5 && (t[4][1] - 0.1).abs() < 1e-5);
    /// assert_eq!(t[0], [0.0, 0.0]); // rows not listed are untouched
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn step_sparse(&mut self, sparse: &[SparseGrad<'_>]) -> Result<StepOutcome, Error> {
        self.step_impl(None, sparse)
    }

    /// One step from sparse gradients for some variables (typically the embedding tables) and
    /// the [`GradStore`]'s dense gradients for the others (handled as
    /// [`dense_gradients`](Self::dense_gradients) says). The sparse gradient of a variable
    /// replaces its dense gradient in `grads`.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor, Var};
    /// use lazyadam_candle::{Config, LazyAdamOptimizer, SparseGrad};
    ///
    /// let dev = Device::Cpu;
    /// let table = Var::ones((10, 2), DType::F32, &dev)?;
    /// let w = Var::ones(2, DType::F32, &dev)?;
    /// let mut opt = LazyAdamOptimizer::new_named(
    ///     [("table", table.clone()), ("w", w.clone())],
    ///     Config::new(0.1)?,
    /// )?;
    /// let ids = Tensor::new(&[2u32, 5], &dev)?;
    /// // Rows looked up outside the graph: backward gives `w` its dense gradient only.
    /// let rows = table.as_tensor().embedding(&ids)?.detach();
    /// let loss = rows.broadcast_mul(w.as_tensor())?.sum_all()?;
    /// let grads = loss.backward()?;
    /// // d loss / d rows = w, one row per id.
    /// let g_rows = w.as_tensor().unsqueeze(0)?.repeat((2, 1))?;
    /// opt.step_mixed(&grads, &[SparseGrad::new(&table, &ids, &g_rows)])?;
    ///
    /// let t = table.as_tensor().to_vec2::<f32>()?;
    /// assert!(t[2][0] < 1.0 && t[0][0] == 1.0);
    /// assert!(w.as_tensor().to_vec1::<f32>()?[0] < 1.0);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn step_mixed(
        &mut self,
        grads: &GradStore,
        sparse: &[SparseGrad<'_>],
    ) -> Result<StepOutcome, Error> {
        self.step_impl(Some(grads), sparse)
    }

    fn step_impl(
        &mut self,
        grads: Option<&GradStore>,
        sparse: &[SparseGrad<'_>],
    ) -> Result<StepOutcome, Error> {
        if let Some(e) = self.last_error() {
            return Err(e);
        }
        // 1. Which variables take part, with which gradient tensors (validated).
        let mut sparse_of: Vec<Option<&SparseGrad<'_>>> = vec![None; self.entries.len()];
        for sg in sparse {
            let idx = self
                .entries
                .iter()
                .position(|e| e.var.as_tensor().id() == sg.var.as_tensor().id())
                .ok_or_else(|| Error::UnknownVar {
                    shape: sg.var.dims().to_vec(),
                })?;
            if sparse_of[idx].is_some() {
                return Err(Error::DuplicateSparse {
                    variable: self.entries[idx].name.clone(),
                });
            }
            sparse_of[idx] = Some(sg);
        }
        let mut plan: Vec<(usize, Source)> = Vec::new();
        for (idx, e) in self.entries.iter().enumerate() {
            if let Some(sg) = sparse_of[idx] {
                plan.push((idx, sparse_source(e, sg)?));
            } else if let Some(g) = grads.and_then(|g| g.get(e.var.as_tensor())) {
                let lazy = self.dense_gradients == DenseGradients::LazyRows && e.var.rank() >= 2;
                plan.push((idx, dense_source(e, g, lazy)?));
            }
        }
        // A gradient sharing storage with a variable written in this step would be read while
        // the variable is locked for writing: read a copy of it instead.
        let written: Vec<usize> = plan.iter().map(|(i, _)| self.entries[*i].addr).collect();
        for (_, src) in plan.iter_mut() {
            src.unalias(&written)?;
        }

        // 2. Read access to every gradient (shared locks, held until the step is done).
        let guards: Vec<Vec<_>> = plan
            .iter()
            .map(|(_, s)| s.tensors().iter().map(|t| t.storage_and_layout()).collect())
            .collect();
        let mut prepared: Vec<Prepared<'_>> = Vec::with_capacity(plan.len());
        for ((idx, src), g) in plan.iter().zip(&guards) {
            let e = &self.entries[*idx];
            let cpu = |k: usize, what: &'static str| cpu_of(&g[k], &e.name, what);
            prepared.push(match src {
                Source::Dense(_) => {
                    let (c, l) = cpu(0, "gradient")?;
                    Prepared::Dense(values_ref(c, l, &e.name, "gradient")?)
                }
                Source::Lazy(t) => {
                    let (c, l) = cpu(0, "gradient")?;
                    let values = values_ref(c, l, &e.name, "gradient")?;
                    let row_len: usize = t.dims()[1..].iter().product();
                    let (ids, rows) = Owned::nonzero_rows(values, row_len);
                    Prepared::Lazy { ids, rows }
                }
                Source::Sparse { .. } => {
                    let (ci, li) = cpu(0, "sparse ids")?;
                    let (cv, lv) = cpu(1, "sparse values")?;
                    Prepared::Sparse {
                        ids: ids_ref(ci, li, &e.name)?,
                        values: values_ref(cv, lv, &e.name, "sparse values")?,
                    }
                }
            });
        }

        // 3. Exclusive access to the variables (locked in storage-address order, the same
        //    order for every step, so two optimizers sharing variables cannot deadlock), then
        //    one call of the core.
        //    A variable with zero elements is not locked (candle refuses an in-place op on
        //    it, and there is nothing to write): the core gets an empty slice for it.
        let mut order: Vec<usize> = (0..plan.len())
            .filter(|&k| self.entries[plan[k].0].var.elem_count() > 0)
            .collect();
        order.sort_by_key(|&k| self.entries[plan[k].0].addr);
        let empty: Vec<Option<DType>> = plan
            .iter()
            .map(|(i, _)| {
                let v = &self.entries[*i].var;
                if v.elem_count() == 0 {
                    float_dtype(v.dtype())
                } else {
                    None
                }
            })
            .collect();
        let lock: Vec<&Tensor> = order
            .iter()
            .map(|&k| self.entries[plan[k].0].var.as_tensor())
            .collect();
        let names: Vec<&str> = order
            .iter()
            .map(|&k| self.entries[plan[k].0].name.as_str())
            .collect();
        let ids: Vec<VarId> = plan.iter().map(|(i, _)| self.entries[*i].id).collect();
        let opt = &mut self.opt;
        let mut run = |locked: Vec<TensorMut<'_>>| -> Result<StepOutcome, Error> {
            let mut params: Vec<Option<TensorMut<'_>>> =
                empty.iter().map(|d| d.map(empty_param)).collect();
            for (p, &k) in locked.into_iter().zip(&order) {
                if let Some(slot) = params.get_mut(k) {
                    *slot = Some(p);
                }
            }
            let mut updates: Vec<Update<'_>> = Vec::with_capacity(params.len());
            for ((p, prep), &id) in params.into_iter().zip(&prepared).zip(&ids) {
                // Every slot was filled: `order` lists every non-empty variable of the plan.
                let Some(p) = p else { continue };
                updates.push(Update::new(id, p, prep.gradient()));
            }
            Ok(opt.apply_gradients(&mut updates)?)
        };
        with_storages_mut(&lock, &names, Vec::new(), &mut run)
    }
}

/// The gradient tensors of one variable, validated (CPU, dtype, shape) and contiguous.
enum Source {
    Dense(Tensor),
    Lazy(Tensor),
    Sparse { ids: Tensor, values: Tensor },
}

impl Source {
    fn tensors(&self) -> Vec<&Tensor> {
        match self {
            Source::Dense(t) | Source::Lazy(t) => vec![t],
            Source::Sparse { ids, values } => vec![ids, values],
        }
    }

    fn unalias(&mut self, written: &[usize]) -> Result<(), Error> {
        let fix = |t: &mut Tensor| -> Result<(), Error> {
            if written.contains(&storage_addr(t)) {
                *t = t.copy()?;
            }
            Ok(())
        };
        match self {
            Source::Dense(t) | Source::Lazy(t) => fix(t),
            Source::Sparse { ids, values } => {
                fix(ids)?;
                fix(values)
            }
        }
    }
}

fn check_tensor(
    e: &Entry,
    t: &Tensor,
    what: &'static str,
    dtype_ok: fn(candle_core::DType) -> bool,
) -> Result<Tensor, Error> {
    if !t.device().is_cpu() {
        return Err(Error::NonCpuDevice {
            variable: e.name.clone(),
            what,
            device: device_name(t),
        });
    }
    if !dtype_ok(t.dtype()) {
        return Err(Error::UnsupportedDType {
            variable: e.name.clone(),
            what,
            dtype: t.dtype(),
        });
    }
    // A strided gradient is read in logical order through a contiguous copy.
    Ok(if t.is_contiguous() {
        t.clone()
    } else {
        t.contiguous()?
    })
}

fn dense_source(e: &Entry, g: &Tensor, lazy: bool) -> Result<Source, Error> {
    let g = check_tensor(e, g, "gradient", |d| float_dtype(d).is_some())?;
    if g.dims() != e.var.dims() {
        return Err(Error::ShapeMismatch {
            variable: e.name.clone(),
            what: "gradient",
            expected: e.var.dims().to_vec(),
            got: g.dims().to_vec(),
        });
    }
    Ok(if lazy {
        Source::Lazy(g)
    } else {
        Source::Dense(g)
    })
}

fn sparse_source(e: &Entry, sg: &SparseGrad<'_>) -> Result<Source, Error> {
    let dims = e.var.dims();
    if dims.is_empty() {
        return Err(Error::SparseScalar {
            variable: e.name.clone(),
        });
    }
    let ids = check_tensor(e, sg.ids, "sparse ids", |d| {
        matches!(
            d,
            candle_core::DType::U32 | candle_core::DType::I32 | candle_core::DType::I64
        )
    })?;
    let values = check_tensor(e, sg.values, "sparse values", |d| float_dtype(d).is_some())?;
    let n = ids.elem_count();
    let tail = &dims[1..];
    let row_len: usize = tail.iter().product();
    let vd = values.dims();
    let full = vd.len() == ids.rank() + tail.len()
        && &vd[..ids.rank()] == ids.dims()
        && &vd[ids.rank()..] == tail;
    let flat = vd.len() == 2 && vd[0] == n && vd[1] == row_len;
    if !(full || flat) {
        let mut expected = ids.dims().to_vec();
        expected.extend_from_slice(tail);
        return Err(Error::ShapeMismatch {
            variable: e.name.clone(),
            what: "sparse values",
            expected,
            got: vd.to_vec(),
        });
    }
    Ok(Source::Sparse { ids, values })
}

fn cpu_of<'s>(
    guard: &'s (candle_core::StorageRef<'_>, &'s Layout),
    name: &str,
    what: &'static str,
) -> Result<(&'s CpuStorage, &'s Layout), Error> {
    let (storage, layout) = guard;
    match &**storage {
        Storage::Cpu(c) => Ok((c, *layout)),
        _ => Err(Error::NonCpuDevice {
            variable: name.to_owned(),
            what,
            device: format!("{:?}", storage.device().location()),
        }),
    }
}

fn range(layout: &Layout, name: &str, what: &'static str) -> Result<(usize, usize), Error> {
    layout
        .contiguous_offsets()
        .ok_or_else(|| Error::NonContiguous {
            variable: name.to_owned(),
            what,
        })
}

fn values_ref<'s>(
    c: &'s CpuStorage,
    l: &Layout,
    name: &str,
    what: &'static str,
) -> Result<TensorRef<'s>, Error> {
    let (a, b) = range(l, name, what)?;
    let unsupported = |dtype| Error::UnsupportedDType {
        variable: name.to_owned(),
        what,
        dtype,
    };
    Ok(match c {
        CpuStorage::F32(v) => TensorRef::F32(&v[a..b]),
        CpuStorage::F16(v) => TensorRef::F16(&v[a..b]),
        CpuStorage::BF16(v) => TensorRef::BF16(&v[a..b]),
        other => return Err(unsupported(other.dtype())),
    })
}

fn ids_ref<'s>(c: &'s CpuStorage, l: &Layout, name: &str) -> Result<RowIds<'s>, Error> {
    let (a, b) = range(l, name, "sparse ids")?;
    Ok(match c {
        CpuStorage::U32(v) => RowIds::U32(&v[a..b]),
        CpuStorage::I32(v) => RowIds::I32(&v[a..b]),
        CpuStorage::I64(v) => RowIds::I64(&v[a..b]),
        other => {
            return Err(Error::UnsupportedDType {
                variable: name.to_owned(),
                what: "sparse ids",
                dtype: other.dtype(),
            });
        }
    })
}

/// The variable's storage as a mutable slice (its layout must be contiguous).
fn param_mut<'s>(c: &'s mut CpuStorage, l: &Layout, name: &str) -> Result<TensorMut<'s>, Error> {
    let (a, b) = range(l, name, "variable")?;
    Ok(match c {
        CpuStorage::F32(v) => TensorMut::F32(&mut v[a..b]),
        CpuStorage::F16(v) => TensorMut::F16(&mut v[a..b]),
        CpuStorage::BF16(v) => TensorMut::BF16(&mut v[a..b]),
        other => {
            return Err(Error::UnsupportedDType {
                variable: name.to_owned(),
                what: "variable",
                dtype: other.dtype(),
            });
        }
    })
}

/// The parameter slice of a variable with zero elements.
fn empty_param(dtype: DType) -> TensorMut<'static> {
    match dtype {
        DType::F16 => TensorMut::F16(&mut []),
        DType::BF16 => TensorMut::BF16(&mut []),
        DType::F32 => TensorMut::F32(&mut []),
    }
}

/// Gradient rows gathered from a dense gradient (lazy mode).
enum Owned {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

fn gather_nonzero<T: Element>(s: &[T], row_len: usize) -> (Vec<usize>, Vec<T>) {
    let mut ids = Vec::new();
    let mut rows = Vec::new();
    if row_len == 0 {
        return (ids, rows);
    }
    for (r, row) in s.chunks_exact(row_len).enumerate() {
        // `x == 0.0` is true for +0.0 and -0.0 and false for NaN.
        if row.iter().any(|x| x.to_f32() != 0.0) {
            ids.push(r);
            rows.extend_from_slice(row);
        }
    }
    (ids, rows)
}

impl Owned {
    fn nonzero_rows(values: TensorRef<'_>, row_len: usize) -> (Vec<usize>, Owned) {
        match values {
            TensorRef::F32(s) => {
                let (i, r) = gather_nonzero(s, row_len);
                (i, Owned::F32(r))
            }
            TensorRef::F16(s) => {
                let (i, r) = gather_nonzero(s, row_len);
                (i, Owned::F16(r))
            }
            TensorRef::BF16(s) => {
                let (i, r) = gather_nonzero(s, row_len);
                (i, Owned::BF16(r))
            }
        }
    }

    fn as_ref(&self) -> TensorRef<'_> {
        match self {
            Owned::F32(v) => TensorRef::F32(v),
            Owned::F16(v) => TensorRef::F16(v),
            Owned::BF16(v) => TensorRef::BF16(v),
        }
    }
}

/// A variable's gradient as the core takes it.
enum Prepared<'g> {
    Dense(TensorRef<'g>),
    Sparse {
        ids: RowIds<'g>,
        values: TensorRef<'g>,
    },
    Lazy {
        ids: Vec<usize>,
        rows: Owned,
    },
}

impl Prepared<'_> {
    fn gradient(&self) -> Gradient<'_> {
        match self {
            Prepared::Dense(v) => Gradient::Dense(reref(v)),
            Prepared::Sparse { ids, values } => Gradient::Sparse {
                ids: reids(ids),
                values: reref(values),
            },
            Prepared::Lazy { ids, rows } => Gradient::Sparse {
                ids: RowIds::Usize(ids),
                values: rows.as_ref(),
            },
        }
    }
}

fn reref<'b>(t: &'b TensorRef<'_>) -> TensorRef<'b> {
    match t {
        TensorRef::F32(s) => TensorRef::F32(s),
        TensorRef::F16(s) => TensorRef::F16(s),
        TensorRef::BF16(s) => TensorRef::BF16(s),
    }
}

fn reids<'b>(t: &'b RowIds<'_>) -> RowIds<'b> {
    match t {
        RowIds::U32(s) => RowIds::U32(s),
        RowIds::U64(s) => RowIds::U64(s),
        RowIds::Usize(s) => RowIds::Usize(s),
        RowIds::I32(s) => RowIds::I32(s),
        RowIds::I64(s) => RowIds::I64(s),
    }
}

type Run<'r> = dyn FnMut(Vec<TensorMut<'_>>) -> Result<StepOutcome, Error> + 'r;

/// Locks `tensors` for writing one after the other (each through an in-place custom op, the
/// only way candle gives mutable access to a storage), then calls `run` with all of them.
fn with_storages_mut(
    tensors: &[&Tensor],
    names: &[&str],
    acc: Vec<TensorMut<'_>>,
    run: &mut Run<'_>,
) -> Result<StepOutcome, Error> {
    let (Some((first, rest)), Some((name, rest_names))) =
        (tensors.split_first(), names.split_first())
    else {
        return run(acc);
    };
    let op = LockOp {
        name,
        rest,
        rest_names,
        acc: RefCell::new(Some(acc)),
        run: RefCell::new(run),
        out: RefCell::new(None),
    };
    first.inplace_op1(&op)?;
    match op.out.into_inner() {
        Some(r) => r,
        // candle returned Ok without calling `cpu_fwd`: cannot happen for a CPU tensor.
        None => Err(Error::NonCpuDevice {
            variable: (*name).to_owned(),
            what: "variable",
            device: device_name(first),
        }),
    }
}

struct LockOp<'n, 'a, 'r> {
    name: &'n str,
    rest: &'n [&'n Tensor],
    rest_names: &'n [&'n str],
    acc: RefCell<Option<Vec<TensorMut<'a>>>>,
    run: RefCell<&'n mut Run<'r>>,
    out: RefCell<Option<Result<StepOutcome, Error>>>,
}

impl InplaceOp1 for LockOp<'_, '_, '_> {
    fn name(&self) -> &'static str {
        "lazyadam-step"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let result = (|| {
            let param = param_mut(storage, layout, self.name)?;
            let mut acc: Vec<TensorMut<'_>> = self.acc.borrow_mut().take().unwrap_or_default();
            acc.push(param);
            let mut run = self.run.borrow_mut();
            with_storages_mut(self.rest, self.rest_names, acc, &mut **run)
        })();
        *self.out.borrow_mut() = Some(result);
        Ok(())
    }
}

impl fmt::Debug for LockOp<'_, '_, '_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockOp").field("name", &self.name).finish()
    }
}

impl candle_nn::Optimizer for LazyAdamOptimizer {
    type Config = Config;

    /// Registers `vars` under **positional** names `var0`, `var1`, ...
    ///
    /// # Warning: positional names and checkpoints
    ///
    /// The names follow the order of `vars`. With `varmap.all_vars()` that order comes from
    /// a `HashMap` and changes from one process to the next, so a checkpoint saved by one
    /// process and loaded by another gives each variable the moments of whichever variable
    /// had its position (silently, when the shapes agree). To checkpoint, build the optimizer
    /// with [`LazyAdamOptimizer::from_varmap`] (the VarMap's own names) or
    /// [`LazyAdamOptimizer::new_named`].
    fn new(vars: Vec<Var>, config: Config) -> candle_core::Result<Self> {
        let named = vars
            .into_iter()
            .enumerate()
            .map(|(i, v)| (format!("var{i}"), v));
        Ok(Self::new_named(named, config)?)
    }

    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        self.try_step(grads)?;
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        f64::from(self.opt.learning_rate())
    }

    /// Sets a constant learning rate.
    ///
    /// The trait gives no way to return an error, so an invalid value (negative, NaN,
    /// infinite, or not fitting an f32) is handled thus: the learning rate stays as it was,
    /// the rejection is kept ([`LazyAdamOptimizer::last_error`]), and **every step fails**
    /// with [`Error::RejectedLearningRate`] until a valid learning rate is set or
    /// [`LazyAdamOptimizer::take_error`] is called. Nothing panics. Prefer
    /// [`LazyAdamOptimizer::try_set_learning_rate`], which returns the error at once.
    fn set_learning_rate(&mut self, lr: f64) {
        if let Err(e) = self.try_set_learning_rate(lr) {
            self.rejected_lr = Some((lr, e.to_string()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Shape;

    #[test]
    fn param_mut_rejects_a_non_contiguous_layout() {
        let mut storage = CpuStorage::F32(vec![0.0; 6]);
        let layout = Layout::contiguous(Shape::from((2, 3)))
            .transpose(0, 1)
            .unwrap();
        let err = param_mut(&mut storage, &layout, "w").unwrap_err();
        assert!(matches!(
            err,
            Error::NonContiguous {
                what: "variable",
                ..
            }
        ));
        let ok = param_mut(&mut storage, &Layout::contiguous((2, 3)), "w").unwrap();
        assert_eq!(ok.len(), 6);
    }

    #[test]
    fn param_mut_uses_the_layouts_offset() {
        let mut storage = CpuStorage::F32(vec![0.0, 1.0, 2.0, 3.0]);
        let layout = Layout::contiguous_with_offset((2,), 1);
        let TensorMut::F32(s) = param_mut(&mut storage, &layout, "w").unwrap() else {
            panic!("f32 expected")
        };
        assert_eq!(s, &[1.0, 2.0]);
    }

    #[test]
    fn gather_nonzero_treats_negative_zero_as_zero_and_nan_as_present() {
        let g = [0.0f32, -0.0, 1.0, 0.0, f32::NAN, 0.0, -0.0, -0.0];
        let (ids, rows) = gather_nonzero(&g, 2);
        assert_eq!(ids, vec![1, 2]);
        assert_eq!(rows[0], 1.0);
        assert!(rows[2].is_nan());
    }
}
