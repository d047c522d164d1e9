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
//! # Errors
//!
//! Typed [`Error`]s for a tensor on a non-CPU device, an unsupported dtype, a non-contiguous
//! variable, mismatched shapes, and everything the core rejects (negative or out-of-range ids,
//! ...). Every error leaves the variables, the optimizer state and the step counter
//! unchanged. Through the [`candle_nn::Optimizer`] trait the error arrives as a
//! [`candle_core::Error`]; [`Error::from_candle`] recovers the typed error.
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
//! let mut opt = LazyAdamOptimizer::new(vec![table.clone(), w.clone()], Config::new(0.01))?;
//!
//! // (a) The usual candle loop: dense gradients for every variable.
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
//! let mut lazy = LazyAdamOptimizer::new(
//!     vec![table.clone()],
//!     Config::new(0.01).with_dense_gradients(DenseGradients::LazyRows),
//! )?;
//! lazy.backward_step(&table.as_tensor().embedding(&ids)?.sum_all()?)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

use std::cell::RefCell;
use std::fmt;

use candle_core::backend::BackendStorage;
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, InplaceOp1, Layout, Storage, Tensor, Var};
use lazyadam::{Gradient, RowIds, TensorMut, TensorRef, Update};

pub use lazyadam::{
    self, DType, Element, Extensions, LazyAdam, LazyAdamConfig, LearningRate, StepOutcome, VarId,
    bf16, f16,
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
    /// The defaults with a constant learning rate `lr`.
    pub fn new(lr: f32) -> Self {
        let mut c = Self::default();
        c.optimizer.learning_rate = LearningRate::Constant(lr);
        c
    }

    /// Sets the handling of dense gradients.
    pub fn with_dense_gradients(mut self, mode: DenseGradients) -> Self {
        self.dense_gradients = mode;
        self
    }

    /// Sets the optimizer's extensions.
    pub fn with_extensions(mut self, ext: Extensions) -> Self {
        self.extensions = ext;
        self
    }

    /// Sets the moments' storage type.
    pub fn with_moment_dtype(mut self, dtype: DType) -> Self {
        self.moment_dtype = dtype;
        self
    }
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
/// Each registered variable gets a variable of the core [`LazyAdam`] (named `var{i}` by
/// [`new`](candle_nn::Optimizer::new), or by the caller with [`new_named`](Self::new_named)),
/// with the variable's shape and dtype.
#[derive(Debug)]
pub struct LazyAdamOptimizer {
    opt: LazyAdam,
    entries: Vec<Entry>,
    dense_gradients: DenseGradients,
    moment_dtype: DType,
}

fn storage_addr(t: &Tensor) -> usize {
    let (guard, _) = t.storage_and_layout();
    std::ptr::from_ref::<Storage>(&guard).addr()
}

fn device_name(t: &Tensor) -> String {
    format!("{:?}", t.device().location())
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
    /// An optimizer over named variables (the names identify the state in checkpoints).
    pub fn new_named<S: Into<String>>(
        vars: impl IntoIterator<Item = (S, Var)>,
        config: Config,
    ) -> Result<Self, Error> {
        let mut me = Self {
            opt: LazyAdam::with_extensions(config.optimizer, config.extensions)?,
            entries: Vec::new(),
            dense_gradients: config.dense_gradients,
            moment_dtype: config.moment_dtype,
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
        if !t.device().is_cpu() {
            return Err(Error::NonCpuDevice {
                variable: name.to_owned(),
                what: "variable",
                device: device_name(t),
            });
        }
        let Some(dtype) = float_dtype(t.dtype()) else {
            return Err(Error::UnsupportedDType {
                variable: name.to_owned(),
                what: "variable",
                dtype: t.dtype(),
            });
        };
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

    /// Sets a constant learning rate; unlike
    /// [`Optimizer::set_learning_rate`](candle_nn::Optimizer::set_learning_rate) it reports an
    /// invalid value (negative, NaN) instead of ignoring it.
    pub fn try_set_learning_rate(&mut self, lr: f32) -> Result<(), Error> {
        Ok(self.opt.set_learning_rate(lr)?)
    }

    /// One step from the dense gradients of a [`GradStore`] (variables without a gradient are
    /// not part of the step), with typed errors. [`candle_nn::Optimizer::step`] calls this.
    pub fn try_step(&mut self, grads: &GradStore) -> Result<StepOutcome, Error> {
        self.step_impl(Some(grads), &[])
    }

    /// One step from sparse gradients only (one increment of the step counter). Only the rows
    /// listed, and their moments, are read and written, in place.
    pub fn step_sparse(&mut self, sparse: &[SparseGrad<'_>]) -> Result<StepOutcome, Error> {
        self.step_impl(None, sparse)
    }

    /// One step from sparse gradients for some variables (typically the embedding tables) and
    /// the [`GradStore`]'s dense gradients for the others (handled as
    /// [`dense_gradients`](Self::dense_gradients) says). The sparse gradient of a variable
    /// replaces its dense gradient in `grads`.
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
        let mut order: Vec<usize> = (0..plan.len()).collect();
        order.sort_by_key(|&k| self.entries[plan[k].0].addr);
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
            let mut params: Vec<Option<TensorMut<'_>>> = (0..locked.len()).map(|_| None).collect();
            for (p, &k) in locked.into_iter().zip(&order) {
                params[k] = Some(p);
            }
            let mut updates: Vec<Update<'_>> = Vec::with_capacity(params.len());
            for ((p, prep), &id) in params.into_iter().zip(&prepared).zip(&ids) {
                // Every slot was filled: `order` is a permutation of 0..plan.len().
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

    /// Registers `vars` as `var0`, `var1`, ... (see [`LazyAdamOptimizer::new_named`]).
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

    /// Sets a constant learning rate. An invalid value (negative, NaN) is ignored and the
    /// previous learning rate stays; use [`LazyAdamOptimizer::try_set_learning_rate`] to see
    /// the error.
    fn set_learning_rate(&mut self, lr: f64) {
        let _ = self.opt.set_learning_rate(lr as f32);
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
