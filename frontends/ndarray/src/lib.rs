//! [`ndarray`] adapter for the [`lazyadam`] optimizer.
//!
//! Parameters live in ndarray arrays of `f32`, [`f16`](struct@f16) or [`bf16`]. Gradients come either
//!
//! - **dense**: an array of the same shape as the parameter (ordinary Adam on every element), or
//! - **sparse**: row ids (an [`ArrayView1`] of `u32`, `u64`, `usize`, `i32` or `i64`) plus the
//!   gradient rows (an [`ArrayView2`] of shape `[ids.len(), row_len]`, or an array of shape
//!   `[ids.len(), param.shape()[1..]...]`). Only the listed rows, and their moments, change
//!   (LazyAdam); duplicate ids are summed by the core.
//!
//! This crate adapts types only: every computation, validation of ids and dtypes, clipping,
//! schedules and state live in [`lazyadam`]; the results are bit-identical to calling
//! [`lazyadam::LazyAdam::apply_gradients`] on the same data.
//!
//! # Layouts
//!
//! Parameters are updated in place through a slice of their memory, so a parameter must be in
//! *standard layout* (C-contiguous, row-major, as [`ArrayRef::as_slice_mut`] requires). A
//! transposed, column-sliced or otherwise strided parameter view is rejected with
//! [`Error::NonContiguous`] (never a silently wrong update); call
//! [`as_standard_layout`](ArrayRef::as_standard_layout) and copy back, or keep the parameter in
//! an owned [`Array`]. Gradients and ids may have any layout: a non-standard gradient view is
//! copied into logical (row-major) order before the step, which gives the same result.
//!
//! # Errors change nothing
//!
//! Shapes are checked against the registered variable before the core is called; the core
//! then validates dtypes and ids (negative or out of range) for every update before it writes
//! anything. A failed step leaves parameters, moments and the step counter untouched.
//!
//! # Example
//!
//! ```
//! use lazyadam_ndarray::{LazyAdamConfig, NdLazyAdam, NdUpdate};
//! use ndarray::{array, Array2};
//!
//! let mut opt = NdLazyAdam::new(LazyAdamConfig::default())?;
//! // An embedding table (4 rows of 3) and a dense bias.
//! let mut table = Array2::<f32>::zeros((4, 3));
//! let mut bias = array![0.5f32, -0.5];
//! let table_id = opt.add_variable("table", &table)?;
//! let bias_id = opt.add_variable("bias", &bias)?;
//!
//! // A sparse step on rows 1 and 3 of the table only.
//! let ids = array![1u32, 3];
//! let rows = array![[0.1f32, 0.2, 0.3], [-0.1, -0.2, -0.3]];
//! opt.step_sparse(table_id, &mut table, &ids, &rows)?;
//! assert!(table.row(0).iter().all(|&x| x == 0.0)); // untouched row
//! assert!(table[[1, 0]] < 0.0 && table[[3, 0]] > 0.0);
//!
//! // One step for several variables at once (one step-counter increment).
//! let grad_bias = array![1.0f32, -1.0];
//! opt.step(&mut [
//!     NdUpdate::sparse(table_id, table.view_mut(), ids.view(), rows.view()),
//!     NdUpdate::dense(bias_id, bias.view_mut(), grad_bias.view()),
//! ])?;
//! assert_eq!(opt.iterations(), 2);
//! # Ok::<(), lazyadam_ndarray::Error>(())
//! ```
#![deny(missing_docs)]

use std::borrow::Cow;
use std::fmt;

use lazyadam::{Gradient, RowIds, TensorMut, TensorRef, Update};
use ndarray::{ArrayRef, ArrayView, ArrayView1, ArrayViewMut, Dimension, Ix1};

#[cfg(doc)]
use ndarray::{Array, ArrayView2};

pub use lazyadam::{
    self, BiasCorrection, ConfigError, CustomSchedule, DType, DynamicLossScale, Element,
    Extensions, Isa, LazyAdam, LazyAdamConfig, LearningRate, LearningRateSchedule, NonFinitePolicy,
    Schedule, StepOutcome, VarId, bf16, f16,
};
pub use ndarray;

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for super::f16 {}
    impl Sealed for super::bf16 {}
    impl Sealed for u32 {}
    impl Sealed for u64 {}
    impl Sealed for usize {}
    impl Sealed for i32 {}
    impl Sealed for i64 {}
}

/// Type-erased buffers behind [`NdUpdate`]; not part of the public API.
#[doc(hidden)]
pub mod __private {
    use super::{Cow, RowIds, TensorRef, bf16, f16};

    /// Gradient values, borrowed when the array was in standard layout, else copied.
    #[derive(Debug)]
    pub enum Values<'a> {
        F32(Cow<'a, [f32]>),
        F16(Cow<'a, [f16]>),
        BF16(Cow<'a, [bf16]>),
    }

    impl Values<'_> {
        pub fn as_tensor_ref(&self) -> TensorRef<'_> {
            match self {
                Values::F32(c) => TensorRef::F32(c),
                Values::F16(c) => TensorRef::F16(c),
                Values::BF16(c) => TensorRef::BF16(c),
            }
        }
    }

    /// Row ids, borrowed when contiguous, else copied.
    #[derive(Debug)]
    pub enum Ids<'a> {
        U32(Cow<'a, [u32]>),
        U64(Cow<'a, [u64]>),
        Usize(Cow<'a, [usize]>),
        I32(Cow<'a, [i32]>),
        I64(Cow<'a, [i64]>),
    }

    impl Ids<'_> {
        pub fn as_row_ids(&self) -> RowIds<'_> {
            match self {
                Ids::U32(c) => RowIds::U32(c),
                Ids::U64(c) => RowIds::U64(c),
                Ids::Usize(c) => RowIds::Usize(c),
                Ids::I32(c) => RowIds::I32(c),
                Ids::I64(c) => RowIds::I64(c),
            }
        }
    }
}

use __private::{Ids, Values};

/// Element types of parameters and gradients: `f32`, [`f16`](struct@f16) and [`bf16`] (sealed).
pub trait NdElement: Element + sealed::Sealed {
    #[doc(hidden)]
    fn __param(s: &mut [Self]) -> TensorMut<'_>;
    #[doc(hidden)]
    fn __values(c: Cow<'_, [Self]>) -> Values<'_>;
}

impl NdElement for f32 {
    fn __param(s: &mut [Self]) -> TensorMut<'_> {
        TensorMut::F32(s)
    }
    fn __values(c: Cow<'_, [Self]>) -> Values<'_> {
        Values::F32(c)
    }
}

impl NdElement for f16 {
    fn __param(s: &mut [Self]) -> TensorMut<'_> {
        TensorMut::F16(s)
    }
    fn __values(c: Cow<'_, [Self]>) -> Values<'_> {
        Values::F16(c)
    }
}

impl NdElement for bf16 {
    fn __param(s: &mut [Self]) -> TensorMut<'_> {
        TensorMut::BF16(s)
    }
    fn __values(c: Cow<'_, [Self]>) -> Values<'_> {
        Values::BF16(c)
    }
}

/// Row-id types of sparse gradients: `u32`, `u64`, `usize`, `i32`, `i64` (sealed).
///
/// Negative ids are an error ([`lazyadam::Error::NegativeRowId`]), as are ids not below the
/// number of rows of the variable ([`lazyadam::Error::RowIdOutOfRange`]).
pub trait RowId: Copy + Send + Sync + fmt::Debug + 'static + sealed::Sealed {
    #[doc(hidden)]
    fn __ids(c: Cow<'_, [Self]>) -> Ids<'_>;
}

macro_rules! row_id {
    ($($t:ty => $v:ident),*) => {$(
        impl RowId for $t {
            fn __ids(c: Cow<'_, [Self]>) -> Ids<'_> {
                Ids::$v(c)
            }
        }
    )*};
}
row_id!(u32 => U32, u64 => U64, usize => Usize, i32 => I32, i64 => I64);

/// Errors of this crate: the core's errors plus the frontend's shape and layout checks.
///
/// Every error leaves parameters, optimizer state and the step counter unchanged.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An error of the optimizer core (configuration, dtype, ids, non-finite values, ...).
    #[error(transparent)]
    Core(#[from] lazyadam::Error),
    /// The [`VarId`] was not created by this optimizer.
    #[error("unknown variable id {0:?}")]
    UnknownVariable(VarId),
    /// An array's shape does not match the registered variable.
    #[error("{what} of variable `{variable}` has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        /// Variable name.
        variable: String,
        /// Which array: `"parameter"`, `"gradient"` or `"sparse gradient values"`.
        what: &'static str,
        /// The expected shape.
        expected: Vec<usize>,
        /// The shape given.
        got: Vec<usize>,
    },
    /// A parameter array is not in standard (C-contiguous, row-major) layout, so it cannot be
    /// updated in place (transposed, column-sliced, reversed or otherwise strided views).
    #[error(
        "{what} of variable `{variable}` is not in standard (C-contiguous, row-major) layout; \
         update an owned or standard-layout array instead"
    )]
    NonContiguous {
        /// Variable name.
        variable: String,
        /// Which array (`"parameter"`).
        what: &'static str,
    },
    /// A sparse gradient was given for a scalar (0-dimensional) variable, which has no rows.
    #[error("variable `{variable}` is a scalar (0-dimensional) and takes dense gradients only")]
    SparseScalar {
        /// Variable name.
        variable: String,
    },
}

enum NdGradient<'a> {
    Dense {
        values: Values<'a>,
        shape: Vec<usize>,
    },
    Sparse {
        ids: Ids<'a>,
        num_ids: usize,
        values: Values<'a>,
        shape: Vec<usize>,
    },
}

/// One variable's part of a step: a mutable parameter view and its gradient.
///
/// Build it with [`NdUpdate::dense`] or [`NdUpdate::sparse`] and pass a slice of them to
/// [`NdLazyAdam::step`]. Construction never fails; layout and shape problems are reported by
/// the step (with the variable's name), before anything is written.
pub struct NdUpdate<'a> {
    var: VarId,
    /// `None` when the parameter view was not in standard layout.
    param: Option<TensorMut<'a>>,
    param_shape: Vec<usize>,
    param_dtype: DType,
    grad: NdGradient<'a>,
}

impl fmt::Debug for NdUpdate<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("NdUpdate");
        d.field("var", &self.var)
            .field("param_shape", &self.param_shape)
            .field("param_dtype", &self.param_dtype)
            .field("param_standard_layout", &self.param.is_some());
        match &self.grad {
            NdGradient::Dense { shape, .. } => d.field("dense_grad_shape", shape),
            NdGradient::Sparse { num_ids, shape, .. } => d
                .field("sparse_ids", num_ids)
                .field("sparse_values_shape", shape),
        };
        d.finish()
    }
}

fn values_of<'a, G: NdElement, D: Dimension>(v: ArrayView<'a, G, D>) -> Values<'a> {
    match v.to_slice() {
        Some(s) => G::__values(Cow::Borrowed(s)),
        // Logical (row-major) order, whatever the strides.
        None => G::__values(Cow::Owned(v.iter().copied().collect())),
    }
}

fn ids_of<'a, I: RowId>(v: ArrayView1<'a, I>) -> Ids<'a> {
    match v.to_slice() {
        Some(s) => I::__ids(Cow::Borrowed(s)),
        None => I::__ids(Cow::Owned(v.iter().copied().collect())),
    }
}

impl<'a> NdUpdate<'a> {
    fn with_param<P: NdElement, D: Dimension>(
        var: VarId,
        param: ArrayViewMut<'a, P, D>,
        grad: NdGradient<'a>,
    ) -> Self {
        let param_shape = param.shape().to_vec();
        // `into_slice` is `Some` only in standard layout, where memory order == logical order.
        let param = param.into_slice().map(P::__param);
        NdUpdate {
            var,
            param,
            param_shape,
            param_dtype: P::DTYPE,
            grad,
        }
    }

    /// A dense gradient: `grad` has the parameter's shape (any layout).
    pub fn dense<P: NdElement, G: NdElement, D: Dimension, DG: Dimension>(
        var: VarId,
        param: ArrayViewMut<'a, P, D>,
        grad: ArrayView<'a, G, DG>,
    ) -> Self {
        let shape = grad.shape().to_vec();
        let grad = NdGradient::Dense {
            values: values_of(grad),
            shape,
        };
        Self::with_param(var, param, grad)
    }

    /// A sparse gradient: row `ids[k]` of the parameter gets gradient row `values[k]`.
    ///
    /// `values` has shape `[ids.len(), row_len]` (2-D, `row_len` = product of the parameter's
    /// shape after the first axis) or `[ids.len(), param.shape()[1..]...]`; any layout.
    pub fn sparse<P: NdElement, G: NdElement, I: RowId, D: Dimension, DV: Dimension>(
        var: VarId,
        param: ArrayViewMut<'a, P, D>,
        ids: ArrayView1<'a, I>,
        values: ArrayView<'a, G, DV>,
    ) -> Self {
        let shape = values.shape().to_vec();
        let grad = NdGradient::Sparse {
            num_ids: ids.len(),
            ids: ids_of(ids),
            values: values_of(values),
            shape,
        };
        Self::with_param(var, param, grad)
    }

    /// The variable this update is for.
    pub fn var(&self) -> VarId {
        self.var
    }
}

/// LazyAdam over ndarray arrays: a thin owner of a [`lazyadam::LazyAdam`].
///
/// Register each parameter with [`add_variable`](Self::add_variable) (its shape and dtype are
/// taken from the array), then step with [`step`](Self::step) (several variables, one step),
/// [`step_dense`](Self::step_dense) or [`step_sparse`](Self::step_sparse) (one variable, one
/// step). Use [`inner`](Self::inner) / [`inner_mut`](Self::inner_mut) for everything else the
/// core offers (slots, checkpoints, weights, configuration).
#[derive(Debug)]
pub struct NdLazyAdam {
    inner: LazyAdam,
}

impl NdLazyAdam {
    /// A new optimizer with the reference semantics (no extensions).
    pub fn new(config: LazyAdamConfig) -> Result<Self, Error> {
        Ok(Self {
            inner: LazyAdam::new(config)?,
        })
    }

    /// A new optimizer with [`Extensions`] beyond the reference.
    pub fn with_extensions(config: LazyAdamConfig, ext: Extensions) -> Result<Self, Error> {
        Ok(Self {
            inner: LazyAdam::with_extensions(config, ext)?,
        })
    }

    /// Wraps an existing core optimizer (for example one loaded from a checkpoint).
    pub fn from_inner(inner: LazyAdam) -> Self {
        Self { inner }
    }

    /// The core optimizer.
    pub fn inner(&self) -> &LazyAdam {
        &self.inner
    }

    /// The core optimizer, mutably (checkpoints, `set_weights`, ...).
    pub fn inner_mut(&mut self) -> &mut LazyAdam {
        &mut self.inner
    }

    /// Unwraps the core optimizer.
    pub fn into_inner(self) -> LazyAdam {
        self.inner
    }

    /// Registers a variable with the array's shape and dtype and `f32` moments.
    ///
    /// Only the shape and element type are read; the array's values are not stored.
    pub fn add_variable<P: NdElement, D: Dimension>(
        &mut self,
        name: &str,
        param: &ArrayRef<P, D>,
    ) -> Result<VarId, Error> {
        self.add_variable_with_moments(name, param, DType::F32)
    }

    /// Registers a variable with the array's shape and dtype and moments stored as
    /// `moment_dtype` (`f32` or `bf16` recommended: `f16` moments underflow for small gradients).
    pub fn add_variable_with_moments<P: NdElement, D: Dimension>(
        &mut self,
        name: &str,
        param: &ArrayRef<P, D>,
        moment_dtype: DType,
    ) -> Result<VarId, Error> {
        Ok(self
            .inner
            .add_variable(name, param.shape(), P::DTYPE, moment_dtype)?)
    }

    /// One step for all `updates` (one increment of the step counter). All or nothing: shapes
    /// and layouts are checked here, then the core validates dtypes and ids before writing.
    pub fn step(&mut self, updates: &mut [NdUpdate<'_>]) -> Result<StepOutcome, Error> {
        for u in updates.iter() {
            self.check(u)?;
        }
        let mut core: Vec<Update<'_>> = Vec::with_capacity(updates.len());
        for u in updates.iter_mut() {
            let param: TensorMut<'_> = match u.param.as_mut() {
                Some(p) => reborrow_mut(p),
                // Checked above; kept as an error rather than a panic.
                None => {
                    return Err(Error::NonContiguous {
                        variable: self.name(u.var),
                        what: "parameter",
                    });
                }
            };
            let grad = match &u.grad {
                NdGradient::Dense { values, .. } => Gradient::Dense(values.as_tensor_ref()),
                NdGradient::Sparse { ids, values, .. } => Gradient::Sparse {
                    ids: ids.as_row_ids(),
                    values: values.as_tensor_ref(),
                },
            };
            core.push(Update::new(u.var, param, grad));
        }
        Ok(self.inner.apply_gradients(&mut core)?)
    }

    /// One step of a single variable with a dense gradient of the parameter's shape.
    pub fn step_dense<P: NdElement, G: NdElement, D: Dimension, DG: Dimension>(
        &mut self,
        var: VarId,
        param: &mut ArrayRef<P, D>,
        grad: &ArrayRef<G, DG>,
    ) -> Result<StepOutcome, Error> {
        self.step(&mut [NdUpdate::dense(var, param.view_mut(), grad.view())])
    }

    /// One step of a single variable with a sparse gradient (row ids and value rows); only
    /// those rows and their moments change.
    pub fn step_sparse<P: NdElement, G: NdElement, I: RowId, D: Dimension, DV: Dimension>(
        &mut self,
        var: VarId,
        param: &mut ArrayRef<P, D>,
        ids: &ArrayRef<I, Ix1>,
        values: &ArrayRef<G, DV>,
    ) -> Result<StepOutcome, Error> {
        self.step(&mut [NdUpdate::sparse(
            var,
            param.view_mut(),
            ids.view(),
            values.view(),
        )])
    }

    /// Writes the optimizer's whole state (configuration, step counter, every variable's
    /// moments, by name) to a safetensors file; [`load_state`](Self::load_state) restores it
    /// into an optimizer with the same variables, in any registration order. A file error
    /// names the path.
    ///
    /// ```
    /// use lazyadam_ndarray::ndarray::{Array1, Array2, array};
    /// use lazyadam_ndarray::{LazyAdamConfig, NdLazyAdam};
    ///
    /// let mut emb = Array2::<f32>::zeros((4, 2));
    /// let mut bias = Array1::<f32>::zeros(2);
    /// let mut opt = NdLazyAdam::new(LazyAdamConfig::new(0.1))?;
    /// let (e, b) = (opt.add_variable("emb", &emb)?, opt.add_variable("bias", &bias)?);
    /// opt.step_sparse(e, &mut emb, &array![1u32], &array![[1.0f32, -1.0]])?;
    /// opt.step_dense(b, &mut bias, &array![0.5f32, 0.5])?;
    /// let path = std::env::temp_dir().join(format!("nd-doc-{}.safetensors", std::process::id()));
    /// opt.save(&path)?;
    ///
    /// // Another process registers the variables in another order: each gets its own state.
    /// let mut resumed = NdLazyAdam::new(LazyAdamConfig::new(0.1))?;
    /// resumed.add_variable("bias", &bias)?;
    /// resumed.add_variable("emb", &emb)?;
    /// resumed.load_state(&path)?;
    /// assert_eq!(resumed.iterations(), 2);
    /// # std::fs::remove_file(&path).ok();
    /// # Ok::<(), lazyadam_ndarray::Error>(())
    /// ```
    pub fn save(&self, path: impl AsRef<std::path::Path>) -> Result<(), Error> {
        Ok(self.inner.save(path)?)
    }

    /// The bytes [`save`](Self::save) writes.
    pub fn to_bytes(&self) -> Result<Vec<u8>, Error> {
        Ok(self.inner.to_bytes()?)
    }

    /// Restores the state saved by [`save`](Self::save) by variable name: the step counter,
    /// the loss scale and each variable's own moments (the hyperparameters stay this
    /// optimizer's). A variable missing from the file, one the file has but this optimizer
    /// does not, or one of another shape or moment type is an error naming it
    /// ([`lazyadam::Error::StateMismatch`]); on error nothing changes.
    pub fn load_state(&mut self, path: impl AsRef<std::path::Path>) -> Result<(), Error> {
        Ok(self.inner.restore_from_file(path)?)
    }

    /// [`load_state`](Self::load_state) from the bytes of [`to_bytes`](Self::to_bytes).
    pub fn load_state_bytes(&mut self, bytes: &[u8]) -> Result<(), Error> {
        Ok(self.inner.restore_from_bytes(bytes)?)
    }

    /// The number of steps applied so far.
    pub fn iterations(&self) -> u64 {
        self.inner.iterations()
    }

    /// The learning rate the next step will use.
    pub fn learning_rate(&self) -> f32 {
        self.inner.learning_rate()
    }

    /// Sets a constant learning rate (replacing any schedule).
    pub fn set_learning_rate(&mut self, lr: f32) -> Result<(), Error> {
        Ok(self.inner.set_learning_rate(lr)?)
    }

    /// The id of the variable registered under `name`.
    pub fn variable_id(&self, name: &str) -> Option<VarId> {
        self.inner.variable_id(name)
    }

    fn name(&self, var: VarId) -> String {
        self.inner
            .variable(var)
            .map(|i| i.name.clone())
            .unwrap_or_default()
    }

    fn check(&self, u: &NdUpdate<'_>) -> Result<(), Error> {
        let info = self
            .inner
            .variable(u.var)
            .ok_or(Error::UnknownVariable(u.var))?;
        let mismatch = |what, expected: Vec<usize>, got: &[usize]| Error::ShapeMismatch {
            variable: info.name.clone(),
            what,
            expected,
            got: got.to_vec(),
        };
        if u.param_shape != info.shape {
            return Err(mismatch("parameter", info.shape.clone(), &u.param_shape));
        }
        if u.param.is_none() {
            return Err(Error::NonContiguous {
                variable: info.name.clone(),
                what: "parameter",
            });
        }
        match &u.grad {
            NdGradient::Dense { shape, .. } => {
                if *shape != info.shape {
                    return Err(mismatch("gradient", info.shape.clone(), shape));
                }
            }
            NdGradient::Sparse { num_ids, shape, .. } => {
                if info.shape.is_empty() {
                    return Err(Error::SparseScalar {
                        variable: info.name.clone(),
                    });
                }
                let tail = &info.shape[1..];
                let row_len: usize = tail.iter().product();
                let full = shape.first() == Some(num_ids) && &shape[1..] == tail;
                let flat = shape.len() == 2 && shape[0] == *num_ids && shape[1] == row_len;
                if !(full || flat) {
                    let mut expected = vec![*num_ids];
                    expected.extend_from_slice(tail);
                    return Err(mismatch("sparse gradient values", expected, shape));
                }
            }
        }
        Ok(())
    }
}

fn reborrow_mut<'b>(p: &'b mut TensorMut<'_>) -> TensorMut<'b> {
    match p {
        TensorMut::F32(s) => TensorMut::F32(s),
        TensorMut::F16(s) => TensorMut::F16(s),
        TensorMut::BF16(s) => TensorMut::BF16(s),
    }
}
