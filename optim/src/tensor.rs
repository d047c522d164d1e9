//! Borrowed tensors, row ids, gradients and updates: the step's inputs.

use lazyadam_kernels::{DType, bf16, f16};

/// A variable registered with [`LazyAdam::add_variable`](crate::LazyAdam::add_variable).
///
/// A handle belongs to the optimizer that issued it: every other optimizer
/// (including one loaded from a checkpoint of this one) rejects it with
/// [`Error::UnknownVariable`](crate::Error::UnknownVariable), even when its
/// index is in range there. Look variables up by name with
/// [`LazyAdam::variable_id`](crate::LazyAdam::variable_id) to move between
/// optimizers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VarId {
    /// The issuing optimizer's instance number.
    pub(crate) owner: u64,
    /// The registration index.
    pub(crate) index: usize,
}

impl VarId {
    /// The registration index (0 for the first variable).
    pub fn index(self) -> usize {
        self.index
    }
}

impl core::fmt::Display for VarId {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "VarId({}) of optimizer #{}", self.index, self.owner)
    }
}

/// A mutable parameter tensor, flattened row-major.
#[derive(Debug)]
pub enum TensorMut<'a> {
    /// f32 storage.
    F32(&'a mut [f32]),
    /// f16 storage.
    F16(&'a mut [f16]),
    /// bf16 storage.
    BF16(&'a mut [bf16]),
}

/// A read-only tensor (gradient values, slots), flattened row-major.
#[derive(Clone, Copy, Debug)]
pub enum TensorRef<'a> {
    /// f32 storage.
    F32(&'a [f32]),
    /// f16 storage.
    F16(&'a [f16]),
    /// bf16 storage.
    BF16(&'a [bf16]),
}

impl TensorMut<'_> {
    /// The storage type.
    pub fn dtype(&self) -> DType {
        match self {
            TensorMut::F32(_) => DType::F32,
            TensorMut::F16(_) => DType::F16,
            TensorMut::BF16(_) => DType::BF16,
        }
    }
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            TensorMut::F32(s) => s.len(),
            TensorMut::F16(s) => s.len(),
            TensorMut::BF16(s) => s.len(),
        }
    }
    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// A read-only view.
    pub fn as_ref(&self) -> TensorRef<'_> {
        match self {
            TensorMut::F32(s) => TensorRef::F32(s),
            TensorMut::F16(s) => TensorRef::F16(s),
            TensorMut::BF16(s) => TensorRef::BF16(s),
        }
    }
}

impl TensorRef<'_> {
    /// The storage type.
    pub fn dtype(&self) -> DType {
        match self {
            TensorRef::F32(_) => DType::F32,
            TensorRef::F16(_) => DType::F16,
            TensorRef::BF16(_) => DType::BF16,
        }
    }
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            TensorRef::F32(s) => s.len(),
            TensorRef::F16(s) => s.len(),
            TensorRef::BF16(s) => s.len(),
        }
    }
    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Element `i` widened to f32 (`None` out of range).
    pub fn get_f32(&self, i: usize) -> Option<f32> {
        match self {
            TensorRef::F32(s) => s.get(i).copied(),
            TensorRef::F16(s) => s.get(i).map(|x| x.to_f32()),
            TensorRef::BF16(s) => s.get(i).map(|x| x.to_f32()),
        }
    }
    /// All elements widened to f32.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match self {
            TensorRef::F32(s) => s.to_vec(),
            TensorRef::F16(s) => s.iter().map(|x| x.to_f32()).collect(),
            TensorRef::BF16(s) => s.iter().map(|x| x.to_f32()).collect(),
        }
    }
}

macro_rules! tensor_from {
    ($t:ty, $v:ident) => {
        impl<'a> From<&'a mut [$t]> for TensorMut<'a> {
            fn from(s: &'a mut [$t]) -> Self {
                TensorMut::$v(s)
            }
        }
        impl<'a> From<&'a mut Vec<$t>> for TensorMut<'a> {
            fn from(s: &'a mut Vec<$t>) -> Self {
                TensorMut::$v(s.as_mut_slice())
            }
        }
        impl<'a, const N: usize> From<&'a mut [$t; N]> for TensorMut<'a> {
            fn from(s: &'a mut [$t; N]) -> Self {
                TensorMut::$v(s.as_mut_slice())
            }
        }
        impl<'a> From<&'a [$t]> for TensorRef<'a> {
            fn from(s: &'a [$t]) -> Self {
                TensorRef::$v(s)
            }
        }
        impl<'a> From<&'a Vec<$t>> for TensorRef<'a> {
            fn from(s: &'a Vec<$t>) -> Self {
                TensorRef::$v(s.as_slice())
            }
        }
        impl<'a, const N: usize> From<&'a [$t; N]> for TensorRef<'a> {
            fn from(s: &'a [$t; N]) -> Self {
                TensorRef::$v(s.as_slice())
            }
        }
    };
}
tensor_from!(f32, F32);
tensor_from!(f16, F16);
tensor_from!(bf16, BF16);

/// Row ids of a sparse gradient. Negative ids are rejected with
/// [`Error::NegativeRowId`](crate::Error::NegativeRowId).
#[derive(Clone, Copy, Debug)]
pub enum RowIds<'a> {
    /// `u32` ids.
    U32(&'a [u32]),
    /// `u64` ids.
    U64(&'a [u64]),
    /// `usize` ids.
    Usize(&'a [usize]),
    /// `i32` ids (TensorFlow's default).
    I32(&'a [i32]),
    /// `i64` ids.
    I64(&'a [i64]),
}

macro_rules! ids_from {
    ($t:ty, $v:ident) => {
        impl<'a> From<&'a [$t]> for RowIds<'a> {
            fn from(s: &'a [$t]) -> Self {
                RowIds::$v(s)
            }
        }
        impl<'a> From<&'a Vec<$t>> for RowIds<'a> {
            fn from(s: &'a Vec<$t>) -> Self {
                RowIds::$v(s.as_slice())
            }
        }
        impl<'a, const N: usize> From<&'a [$t; N]> for RowIds<'a> {
            fn from(s: &'a [$t; N]) -> Self {
                RowIds::$v(s.as_slice())
            }
        }
    };
}
ids_from!(u32, U32);
ids_from!(u64, U64);
ids_from!(usize, Usize);
ids_from!(i32, I32);
ids_from!(i64, I64);

/// A row id as read from [`RowIds`]: in range of `u64`, or negative.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RawId {
    Ok(u64),
    Negative(i64),
}

impl RowIds<'_> {
    /// Number of ids.
    pub fn len(&self) -> usize {
        match self {
            RowIds::U32(s) => s.len(),
            RowIds::U64(s) => s.len(),
            RowIds::Usize(s) => s.len(),
            RowIds::I32(s) => s.len(),
            RowIds::I64(s) => s.len(),
        }
    }
    /// True when there are no ids.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Id `i` (`None` out of range); negative ids as `Err`.
    pub fn get(&self, i: usize) -> Option<Result<u64, i64>> {
        Some(match self {
            RowIds::U32(s) => Ok(*s.get(i)? as u64),
            RowIds::U64(s) => Ok(*s.get(i)?),
            RowIds::Usize(s) => Ok(*s.get(i)? as u64),
            RowIds::I32(s) => {
                let x = *s.get(i)?;
                if x < 0 { Err(x as i64) } else { Ok(x as u64) }
            }
            RowIds::I64(s) => {
                let x = *s.get(i)?;
                if x < 0 { Err(x) } else { Ok(x as u64) }
            }
        })
    }

    /// The first id that is negative or `>= rows`, with its position.
    pub(crate) fn first_invalid(&self, rows: usize) -> Option<(usize, RawId)> {
        let rows = rows as u64;
        fn scan<T: Copy>(s: &[T], f: impl Fn(T) -> RawId, rows: u64) -> Option<(usize, RawId)> {
            s.iter().enumerate().find_map(|(i, &x)| match f(x) {
                RawId::Ok(id) if id < rows => None,
                r => Some((i, r)),
            })
        }
        match self {
            RowIds::U32(s) => scan(s, |x| RawId::Ok(x as u64), rows),
            RowIds::U64(s) => scan(s, RawId::Ok, rows),
            RowIds::Usize(s) => scan(s, |x| RawId::Ok(x as u64), rows),
            RowIds::I32(s) => scan(
                s,
                |x| {
                    if x < 0 {
                        RawId::Negative(x as i64)
                    } else {
                        RawId::Ok(x as u64)
                    }
                },
                rows,
            ),
            RowIds::I64(s) => scan(
                s,
                |x| {
                    if x < 0 {
                        RawId::Negative(x)
                    } else {
                        RawId::Ok(x as u64)
                    }
                },
                rows,
            ),
        }
    }
}

/// A gradient: dense (the whole variable) or sparse (row ids plus one value
/// row per id, row-major).
#[derive(Clone, Copy, Debug)]
pub enum Gradient<'a> {
    /// The whole variable's gradient (`values.len()` = element count).
    Dense(TensorRef<'a>),
    /// Rows `ids` with `values.len() = ids.len() * row_len`.
    Sparse {
        /// Row ids; duplicates are summed in first-occurrence order.
        ids: RowIds<'a>,
        /// One value row per id.
        values: TensorRef<'a>,
    },
}

impl<'a> Gradient<'a> {
    /// A dense gradient.
    pub fn dense(values: impl Into<TensorRef<'a>>) -> Self {
        Gradient::Dense(values.into())
    }
    /// A sparse gradient.
    pub fn sparse(ids: impl Into<RowIds<'a>>, values: impl Into<TensorRef<'a>>) -> Self {
        Gradient::Sparse {
            ids: ids.into(),
            values: values.into(),
        }
    }
    /// The gradient values.
    pub fn values(&self) -> TensorRef<'a> {
        match self {
            Gradient::Dense(v) => *v,
            Gradient::Sparse { values, .. } => *values,
        }
    }
}

/// One variable's parameters and gradient for a step.
#[derive(Debug)]
pub struct Update<'a> {
    /// The variable.
    pub var: VarId,
    /// Its parameters (updated in place).
    pub param: TensorMut<'a>,
    /// Its gradient.
    pub grad: Gradient<'a>,
}

impl<'a> Update<'a> {
    /// Bundles a variable, its parameters and its gradient.
    pub fn new(var: VarId, param: impl Into<TensorMut<'a>>, grad: Gradient<'a>) -> Self {
        Update {
            var,
            param: param.into(),
            grad,
        }
    }
}

/// The product of `dims`: exact when it fits a `usize` (a zero anywhere makes
/// it 0), `usize::MAX` otherwise.
fn saturating_product(dims: &[usize]) -> usize {
    // Once saturated, a later zero still gives 0.
    dims.iter().fold(1usize, |a, &d| a.saturating_mul(d))
}

/// A registered variable: name, shape and storage types.
///
/// Rows are `shape[0]` (1 for a scalar); a row holds the product of the other
/// dimensions.
#[derive(Clone, Debug, PartialEq)]
pub struct VariableInfo {
    /// Unique name (used for slot names in checkpoints).
    pub name: String,
    /// Shape (row-major).
    pub shape: Vec<usize>,
    /// Storage of the parameters.
    pub param_dtype: DType,
    /// Storage of `m`, `v` (and `vhat`).
    pub moment_dtype: DType,
}

impl VariableInfo {
    /// Number of rows (`shape[0]`, 1 for a scalar).
    pub fn rows(&self) -> usize {
        self.shape.first().copied().unwrap_or(1)
    }
    /// Elements per row, or `usize::MAX` if the product of the dimensions
    /// after the first does not fit a `usize` (never for a registered
    /// variable: registration refuses such shapes).
    pub fn row_len(&self) -> usize {
        saturating_product(self.shape.get(1..).unwrap_or(&[]))
    }
    /// Number of elements, or `usize::MAX` if the product of the dimensions
    /// does not fit a `usize` (never for a registered variable).
    ///
    /// ```
    /// use lazyadam::{DType, VariableInfo};
    ///
    /// let info = |shape: Vec<usize>| VariableInfo {
    ///     name: "x".into(),
    ///     shape,
    ///     param_dtype: DType::F32,
    ///     moment_dtype: DType::F32,
    /// };
    /// assert_eq!(info(vec![3, 4]).numel(), 12);
    /// // A hand-built shape too large for memory saturates rather than panics.
    /// assert_eq!(info(vec![1 << 40, 1 << 40]).numel(), usize::MAX);
    /// assert_eq!(info(vec![1 << 40, 1 << 40, 0]).numel(), 0);
    /// assert_eq!(info(vec![0, 1 << 40, 1 << 40]).row_len(), usize::MAX);
    /// ```
    pub fn numel(&self) -> usize {
        saturating_product(&self.shape)
    }
}

/// A variable's optimizer slots.
#[derive(Clone, Copy, Debug)]
pub struct Slots<'a> {
    /// First moment.
    pub m: TensorRef<'a>,
    /// Second moment.
    pub v: TensorRef<'a>,
    /// Running maximum of the second moment (with `amsgrad`).
    pub vhat: Option<TensorRef<'a>>,
}

/// Whether a step was applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepOutcome {
    /// The step was applied and the step counter increased.
    Applied,
    /// The step was skipped (non-finite gradients under
    /// [`NonFinitePolicy::SkipStep`](crate::NonFinitePolicy::SkipStep)).
    Skipped,
}

/// One tensor of [`LazyAdam::get_weights`](crate::LazyAdam::get_weights).
#[derive(Clone, Debug, PartialEq)]
pub struct WeightTensor {
    /// Name (`"iterations"`, `"<var>/m"`, `"<var>/v"`, `"<var>/vhat"`, ...).
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Values.
    pub data: WeightData,
}

/// Values of a [`WeightTensor`].
#[derive(Clone, Debug, PartialEq)]
pub enum WeightData {
    /// Integers (the step counter, per-row counters).
    I64(Vec<i64>),
    /// f32 values.
    F32(Vec<f32>),
    /// f16 values.
    F16(Vec<f16>),
    /// bf16 values.
    BF16(Vec<bf16>),
}

impl WeightData {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            WeightData::I64(v) => v.len(),
            WeightData::F32(v) => v.len(),
            WeightData::F16(v) => v.len(),
            WeightData::BF16(v) => v.len(),
        }
    }
    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The storage type of floating-point data (`None` for integers).
    pub fn dtype(&self) -> Option<DType> {
        match self {
            WeightData::I64(_) => None,
            WeightData::F32(_) => Some(DType::F32),
            WeightData::F16(_) => Some(DType::F16),
            WeightData::BF16(_) => Some(DType::BF16),
        }
    }
}
