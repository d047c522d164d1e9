//! The stateful optimizer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use lazyadam_kernels::{AdamCoeffs, DType, Element, GradTransform, Kernels, SquareSum, bf16, f16};

use crate::config::{LazyAdamConfig, LearningRate};
use crate::dedup::{Dedup, Distinct, RowHash};
use crate::error::{ConfigError, Error};
use crate::extensions::{Extensions, NonFinitePolicy};
use crate::lr::bias_corrected_lr;
use crate::profile::{Phase, Timer};
use crate::step::{self, RowList, StepCtx, Tables, mix64};
use crate::step::{HashedScratch, RowScratch};
use crate::store::{Store, StoreElem, try_zeros};
use crate::tensor::{
    Gradient, RawId, RowIds, Slots, StepOutcome, TensorMut, TensorRef, Update, VarId, VariableInfo,
};

/// The optimizer's state for one variable.
#[derive(Debug, Clone)]
pub(crate) struct VarState {
    pub info: VariableInfo,
    pub rows: usize,
    pub row_len: usize,
    pub numel: usize,
    pub m: Store,
    pub v: Store,
    pub vhat: Option<Store>,
    /// Per-row update counts (per-row bias correction).
    pub row_steps: Option<Vec<u64>>,
    /// Per-row step `t` of the last update, 0 = never (catch-up decay).
    pub last_step: Option<Vec<u64>>,
    /// The global index of row 0 (a shard of a sharded table; 0 otherwise):
    /// stochastic rounding draws by global element index.
    pub row_offset: usize,
}

/// The current state of dynamic loss scaling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct LossScaleState {
    pub scale: f32,
    pub good_steps: u64,
}

/// Buffers reused across steps.
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    pub dedup: Dedup,
    pub hash: RowHash,
    /// Buffers of the sorted sequential path.
    pub rows: RowScratch,
    /// Buffers of the hashed path.
    pub hashed: HashedScratch,
    pub transforms: Vec<GradTransform>,
    pub seen: Vec<bool>,
    /// Per update of a step: its values' largest magnitude when its
    /// duplicate rows' sums need the exact check
    /// ([`LazyAdam::non_finite_sum`]).
    pub check_sums: Vec<Option<f32>>,
    /// Per update of a step: the f64 estimate of the sum of squares of its
    /// values under the base transform and its chain depth, when the
    /// non-finite check took it in its pass for a clipping norm
    /// ([`LazyAdam::check_values_and_estimate`]).
    pub estimates: Vec<(f64, usize)>,
}

/// LazyAdam: Adam that updates, for sparse gradients, only the rows present
/// in the step (the semantics of `tfa.optimizers.LazyAdam`).
///
/// See the [crate documentation](crate) for an example.
#[derive(Debug)]
pub struct LazyAdam {
    pub(crate) config: LazyAdamConfig,
    pub(crate) ext: Extensions,
    pub(crate) kernels: Kernels,
    pub(crate) iterations: u64,
    pub(crate) vars: Vec<VarState>,
    pub(crate) names: HashMap<String, usize>,
    pub(crate) loss_scale: Option<LossScaleState>,
    pub(crate) scratch: Scratch,
    /// This optimizer's instance number, stamped into the [`VarId`]s it
    /// issues (no two optimizers of a process share one).
    pub(crate) instance: u64,
}

/// The instance number of the next optimizer.
static NEXT_INSTANCE: AtomicU64 = AtomicU64::new(1);

/// The largest step counter: the reference's `iterations` is an int64, and
/// checkpoints store it as one.
pub(crate) const MAX_ITERATIONS: u64 = i64::MAX as u64;

/// The learning rate, step size and weight-decay factor of one step, all
/// checked finite and not negative.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StepRates {
    /// The scheduled (and legacy-decayed) learning rate.
    pub lr: f32,
    /// `iterations + 1`.
    pub t: u64,
    /// The bias-corrected step size.
    pub lr_t: f32,
    /// `weight_decay * lr`.
    pub weight_decay: f32,
}

/// The element count and the row length (the product of the dimensions after
/// the first) of `shape`, each checked: with a zero first dimension the
/// element count is 0 whatever the other dimensions are, but a row still
/// holds their product, which must fit a `usize` too.
fn shape_numel(name: &str, shape: &[usize]) -> Result<(usize, usize), Error> {
    let product = |dims: &[usize]| dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let invalid = |what: &str| Error::InvalidShape {
        variable: name.to_string(),
        reason: format!("the {what} of {shape:?} overflows"),
    };
    let numel = product(shape).ok_or_else(|| invalid("element count"))?;
    let row_len = product(shape.get(1..).unwrap_or(&[])).ok_or_else(|| invalid("row length"))?;
    Ok((numel, row_len))
}

impl VarState {
    pub(crate) fn new(
        info: VariableInfo,
        amsgrad: bool,
        ext: &Extensions,
    ) -> Result<VarState, Error> {
        let (numel, row_len) = shape_numel(&info.name, &info.shape)?;
        let rows = info.rows();
        let md = info.moment_dtype;
        Ok(VarState {
            m: Store::zeros(md, numel, "m")?,
            v: Store::zeros(md, numel, "v")?,
            vhat: if amsgrad {
                Some(Store::zeros(md, numel, "vhat")?)
            } else {
                None
            },
            row_steps: if ext.per_row_bias_correction {
                Some(try_zeros(rows, "row_steps")?)
            } else {
                None
            },
            last_step: if ext.catch_up_decay {
                Some(try_zeros(rows, "last_step")?)
            } else {
                None
            },
            info,
            rows,
            row_len,
            numel,
            row_offset: 0,
        })
    }
}

fn first_non_finite(values: &TensorRef<'_>) -> Option<(usize, f32)> {
    (0..values.len()).find_map(|i| {
        let x = values.get_f32(i)?;
        (!x.is_finite()).then_some((i, x))
    })
}

/// Whether every sum of at most `n` values of magnitude at most `max_abs`,
/// each unscaled by `inv_scale` and transformed as a step does (clipping only
/// shrinks them), added in f32 in any order, is surely finite. A sufficient
/// test, not an exact one: each rounded addition `s + x` lands at most `|x|`
/// from the exact sum (the old partial sum `s` is a candidate), so every
/// partial sum is at most twice the sum of the magnitudes, which the test
/// keeps below `f32::MAX` with room for the roundings of the unscaling and of
/// this f64 product. NaN never passes.
pub(crate) fn sums_surely_finite(max_abs: f32, n: usize, inv_scale: f32) -> bool {
    4.0 * n as f64 * max_abs as f64 * inv_scale as f64 <= f32::MAX as f64
}

/// Whether a sparse gradient of `n` ids whose values' largest magnitude is
/// `max_abs` needs the exact check of its duplicate rows' sums
/// ([`LazyAdam::non_finite_sum`]): it may have duplicates (two ids or more),
/// and [`sums_surely_finite`] cannot clear them.
pub(crate) fn sums_need_check(max_abs: f32, n: usize, inv_scale: f32) -> bool {
    n >= 2 && !sums_surely_finite(max_abs, n, inv_scale)
}

/// Threads of the current rayon pool (1 without the `rayon` feature).
pub(crate) fn pool_threads() -> usize {
    #[cfg(feature = "rayon")]
    return rayon::current_num_threads();
    #[cfg(not(feature = "rayon"))]
    1
}

/// Values per chunk of a pass over a gradient's values ([`fold_values`]).
const VALUE_CHUNK: usize = 1 << 16;

/// Whether a pass over `len` gradient values splits them over the pool: at
/// least 4 x `min_parallel` of them, and more than one thread.
#[cfg(feature = "rayon")]
fn splits_values(len: usize, min_parallel: usize) -> bool {
    len >= min_parallel.saturating_mul(4) && pool_threads() > 1
}

/// A pass over `src` in [`VALUE_CHUNK`]-value chunks: `f` of each chunk, the
/// results folded into `init` by `merge` in the chunks' order. For at least
/// 4 x `min_parallel` values and more than one thread the chunks run in
/// rayon tasks, else one after another; the fold is the same either way, so
/// a result does not depend on the thread count, not even an f64 sum's (in
/// a sharded step every rank decides alike from such a sum).
fn fold_values<G: Sync, R: Send>(
    src: &[G],
    min_parallel: usize,
    init: R,
    f: impl Fn(&[G]) -> R + Sync + Send,
    merge: impl FnMut(R, R) -> R,
) -> R {
    #[cfg(feature = "rayon")]
    if splits_values(src.len(), min_parallel) {
        use rayon::prelude::*;
        let parts: Vec<R> = src.par_chunks(VALUE_CHUNK).map(f).collect();
        return parts.into_iter().fold(init, merge);
    }
    let _ = min_parallel;
    src.chunks(VALUE_CHUNK).map(f).fold(init, merge)
}

/// Magnitudes compare as their bits: non-negative, or NaN with a clear sign
/// bit above every other. So the largest of any split's chunk maxima is the
/// same number.
fn max_bits(a: u32, b: u32) -> u32 {
    a.max(b)
}

/// Sums exactly (so in any split, and in any order).
fn merge_squares(mut a: SquareSum, b: SquareSum) -> SquareSum {
    a.merge(&b);
    a
}

/// One NaN whatever the payload (which may depend on the split for 16-bit
/// values, whose widening quiets it).
fn one_nan(m: f32) -> f32 {
    if m.is_nan() { f32::NAN } else { m }
}

/// The largest magnitude among `values`, widened to f32: `f32::NAN` if one is
/// NaN, 0 for none ([`Kernels::max_abs`]). At least 4 x `min_parallel` values
/// are split in chunks over rayon tasks ([`fold_values`]); the largest of the
/// chunks' maxima is the same number for any split, so the thread count
/// changes nothing.
pub(crate) fn max_abs(k: &Kernels, values: &TensorRef<'_>, min_parallel: usize) -> f32 {
    fn of<G: lazyadam_kernels::Element + Sync>(k: &Kernels, src: &[G], min_parallel: usize) -> u32 {
        fold_values(src, min_parallel, 0, |c| k.max_abs(c).to_bits(), max_bits)
    }
    let bits = match values {
        TensorRef::F32(s) => of(k, s, min_parallel),
        TensorRef::F16(s) => of(k, s, min_parallel),
        TensorRef::BF16(s) => of(k, s, min_parallel),
    };
    one_nan(f32::from_bits(bits))
}

/// Adds the exact squares of `transform(src)` into `acc`; a long slice in
/// chunks over rayon tasks ([`fold_values`]). The sum is exact, so the chunks
/// and the order of their merge do not change a bit of it.
fn squares_of<G: lazyadam_kernels::Element + Sync>(
    k: &Kernels,
    acc: &mut SquareSum,
    src: &[G],
    t: &GradTransform,
    min_parallel: usize,
) {
    let f = |c: &[G]| k.sum_squares_exact(c, t);
    acc.merge(&fold_values(
        src,
        min_parallel,
        SquareSum::ZERO,
        f,
        merge_squares,
    ));
}

/// The factor a clipping norm `c` gives for the sum of squares `x` of the
/// transformed values (the exact sum rounded to f64): `None` for no clipping
/// (a norm of at most `c`), else `c / norm` rounded to f32, or NaN for a NaN
/// norm, and with `global` for any non-finite one (`tf.clip_by_norm`,
/// `tf.clip_by_global_norm`). Non-decreasing in `x` up to NaN: for `x` in
/// `[a, b]` it takes the values between its values at `a` and `b`.
pub(crate) fn clip_factor(x: f64, c: f32, global: bool) -> Option<f32> {
    let norm = x.sqrt();
    if norm.is_nan() || (global && !norm.is_finite()) {
        Some(f32::NAN)
    } else if norm > c as f64 {
        Some((c as f64 / norm) as f32)
    } else {
        None
    }
}

/// [`clip_factor`] of the exact sum of squares, known from an f64 estimate
/// when it can be: `est` is a sum of the exact f64 squares of the transformed
/// values, each addition rounded to nearest, along chains of at most `depth`
/// additions ([`squares_estimate`]). For such a sum of non-negative terms the
/// exact sum `S` satisfies `|est - S| <= depth * u * S / (1 - depth * u)`,
/// `u = 2^-53`; the bounds below are wider by more than a factor of two,
/// which also covers their own roundings. When [`clip_factor`] is the same at
/// both bounds, it is the same at the rounded exact sum, which lies between
/// them: `Some(factor)`, the exact path's factor to the bit. Otherwise
/// (a non-finite estimate, a norm within the error of a factor's rounding
/// boundary or of `c`) `None`: the exact sum decides.
pub(crate) fn clip_factor_from_estimate(
    est: f64,
    depth: usize,
    c: f32,
    global: bool,
) -> Option<Option<f32>> {
    if !est.is_finite() || depth > 1 << 40 {
        return None;
    }
    // f64::EPSILON = 2u: e >= 2 * (depth + 4) * u.
    let e = (depth as f64 + 4.0) * f64::EPSILON;
    let (lo, hi) = (est * (1.0 - e), est * (1.0 + e));
    let (a, b) = (clip_factor(lo, c, global), clip_factor(hi, c, global));
    (a.map(f32::to_bits) == b.map(f32::to_bits)).then_some(a)
}

/// An f64 estimate of the sum of squares of `transform(values)` for
/// [`clip_factor_from_estimate`], and the longest chain of additions behind
/// it: [`Kernels::sum_squares`] (exact squares, eight accumulators, so at
/// most `len / 8 + 3` additions a chain) of each chunk of [`fold_values`],
/// added in order (one more addition a chunk). The same f64 on every kernel
/// path and thread count.
pub(crate) fn squares_estimate(
    k: &Kernels,
    values: &TensorRef<'_>,
    t: &GradTransform,
    min_parallel: usize,
) -> (f64, usize) {
    let (est, depth, _) = estimate_of::<false>(k, values, t, min_parallel);
    (est, depth)
}

/// [`squares_estimate`] and [`max_abs`] from one pass
/// ([`Kernels::sum_squares_max_abs`]): the estimate, its depth, and the raw
/// values' largest magnitude (the same as `max_abs`'s for any split).
pub(crate) fn estimate_and_max_abs(
    k: &Kernels,
    values: &TensorRef<'_>,
    t: &GradTransform,
    min_parallel: usize,
) -> (f64, usize, f32) {
    let (est, depth, m) = estimate_of::<true>(k, values, t, min_parallel);
    (est, depth, one_nan(m))
}

/// The pass behind [`squares_estimate`] (the magnitude 0) and, with `MAX`,
/// [`estimate_and_max_abs`], over rayon chunks as [`fold_values`] splits it.
fn estimate_of<const MAX: bool>(
    k: &Kernels,
    values: &TensorRef<'_>,
    t: &GradTransform,
    min_parallel: usize,
) -> (f64, usize, f32) {
    fn of<G: lazyadam_kernels::Element + Sync, const MAX: bool>(
        k: &Kernels,
        src: &[G],
        t: &GradTransform,
        min_parallel: usize,
    ) -> (f64, u32) {
        let f = |c: &[G]| {
            if MAX {
                let (s, m) = k.sum_squares_max_abs(c, t);
                (s, m.to_bits())
            } else {
                (k.sum_squares(c, t), 0)
            }
        };
        let merge = |(a, x), (b, y)| (a + b, max_bits(x, y));
        fold_values(src, min_parallel, (0.0, 0), f, merge)
    }
    let n = values.len();
    let (est, bits) = match values {
        TensorRef::F32(s) => of::<_, MAX>(k, s, t, min_parallel),
        TensorRef::F16(s) => of::<_, MAX>(k, s, t, min_parallel),
        TensorRef::BF16(s) => of::<_, MAX>(k, s, t, min_parallel),
    };
    // Generous: every chunk boundary and the final reduction counted.
    (est, n / 8 + n / 4096 + 16, f32::from_bits(bits))
}

/// The sum of f64 estimates (each with its chain depth, as
/// [`squares_estimate`] gives them) added in the order given, and the chain
/// depth of that sum: one more addition a part, counted generously (the
/// parts' depths added), saturating (a depth past 2^40 leaves every norm to
/// the exact sum, [`clip_factor_from_estimate`]).
pub(crate) fn sum_of_estimates(parts: impl IntoIterator<Item = (f64, usize)>) -> (f64, usize) {
    parts.into_iter().fold((0.0, 0), |(est, depth), (e, d)| {
        (est + e, depth.saturating_add(d).saturating_add(1))
    })
}

/// Scales a transform by a clipping factor `s` (0 <= s <= 1, or NaN):
/// `clamp(g*a, c)*s` becomes `clamp(g*(a*s), c*s)` (the same values, since
/// rounding is monotonic).
pub(crate) fn scale_transform(t: &mut GradTransform, s: f32) {
    if s != 1.0 {
        t.scale *= s;
        if let Some(c) = t.clip.as_mut() {
            *c *= s;
        }
    }
}

/// The checks of a sparse gradient for a table of `rows` rows of `row_len`:
/// `values_len` is `ids.len() * row_len`, and every id is in `0..rows`.
/// `name` gives the variable's name for the error.
pub(crate) fn check_sparse(
    name: impl Fn() -> String,
    ids: &RowIds<'_>,
    values_len: usize,
    rows: usize,
    row_len: usize,
) -> Result<(), Error> {
    let expected = ids.len().checked_mul(row_len);
    if expected != Some(values_len) {
        return Err(Error::LengthMismatch {
            variable: name(),
            what: "gradient values",
            expected: expected.unwrap_or(usize::MAX),
            got: values_len,
        });
    }
    match ids.first_invalid(rows) {
        None => Ok(()),
        Some((_, RawId::Negative(id))) => Err(Error::NegativeRowId {
            variable: name(),
            id,
        }),
        Some((_, RawId::Ok(id))) => Err(Error::RowIdOutOfRange {
            variable: name(),
            id,
            rows,
        }),
    }
}

/// Evaluates `$body` with `$n` the number of ids and `$id` an index function
/// (`usize -> usize`) reading them in their own integer type: one copy of the
/// body per id type, no conversion pass. The ids are already validated.
macro_rules! with_ids {
    ($ids:expr, |$n:ident, $id:ident| $body:expr) => {
        match $ids {
            RowIds::U32(s) => {
                let ($n, $id) = (s.len(), |i: usize| s[i] as usize);
                $body
            }
            RowIds::U64(s) => {
                let ($n, $id) = (s.len(), |i: usize| s[i] as usize);
                $body
            }
            RowIds::Usize(s) => {
                let ($n, $id) = (s.len(), |i: usize| s[i]);
                $body
            }
            RowIds::I32(s) => {
                let ($n, $id) = (s.len(), |i: usize| s[i] as usize);
                $body
            }
            RowIds::I64(s) => {
                let ($n, $id) = (s.len(), |i: usize| s[i] as usize);
                $body
            }
        }
    };
}

/// Groups a sparse gradient's ids by row with the radix sort
/// ([`Dedup::build`]), over the pool when that pays on `threads` threads
/// ([`Dedup::build_parallel`], which groups them alike; see
/// [`groups_in_parallel`](crate::dedup::groups_in_parallel)).
fn sort_ids(dedup: &mut Dedup, ids: &RowIds<'_>, rows: usize, threads: usize) {
    #[cfg(feature = "rayon")]
    if crate::dedup::groups_in_parallel(ids.len(), threads) {
        with_ids!(ids, |n, id| dedup.build_parallel(n, rows, id, threads));
        return;
    }
    let _ = threads;
    with_ids!(ids, |n, id| dedup.build(n, rows, id));
}

impl LazyAdam {
    /// An optimizer with the reference semantics.
    pub fn new(config: LazyAdamConfig) -> Result<Self, Error> {
        Self::with_extensions(config, Extensions::default())
    }

    /// An optimizer with extensions beyond the reference.
    pub fn with_extensions(config: LazyAdamConfig, ext: Extensions) -> Result<Self, Error> {
        config.validate()?;
        ext.validate(config.amsgrad)?;
        let kernels = match ext.kernel {
            Some(isa) => Kernels::new(isa)?,
            None => Kernels::best(),
        }
        .with_long_row_loop(ext.long_row_loop);
        let loss_scale = match &ext.non_finite {
            NonFinitePolicy::SkipStep {
                loss_scale: Some(ls),
            } => Some(LossScaleState {
                scale: ls.scale,
                good_steps: 0,
            }),
            _ => None,
        };
        Ok(LazyAdam {
            config,
            ext,
            kernels,
            iterations: 0,
            vars: Vec::new(),
            names: HashMap::new(),
            loss_scale,
            scratch: Scratch::default(),
            instance: NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// Registers a variable; its slots start at zero. Rows are `shape[0]` (1
    /// for a scalar), a row holds the product of the other dimensions.
    ///
    /// A shape with a zero dimension is accepted: the variable has no
    /// elements, a sparse gradient's ids are still checked against its rows
    /// (`shape[0]`), and its updates write nothing (per-row counters of the
    /// extensions included).
    pub fn add_variable(
        &mut self,
        name: &str,
        shape: &[usize],
        param_dtype: DType,
        moment_dtype: DType,
    ) -> Result<VarId, Error> {
        if self.names.contains_key(name) {
            return Err(Error::DuplicateVariable {
                name: name.to_string(),
            });
        }
        let info = VariableInfo {
            name: name.to_string(),
            shape: shape.to_vec(),
            param_dtype,
            moment_dtype,
        };
        let state = VarState::new(info, self.config.amsgrad, &self.ext)?;
        let id = self.vars.len();
        self.vars.push(state);
        self.names.insert(name.to_string(), id);
        Ok(self.var_id(id))
    }

    /// The handle of registration index `index`.
    fn var_id(&self, index: usize) -> VarId {
        VarId {
            owner: self.instance,
            index,
        }
    }

    /// The registration index of `id`, if this optimizer issued it.
    pub(crate) fn index_of(&self, id: VarId) -> Option<usize> {
        (id.owner == self.instance && id.index < self.vars.len()).then_some(id.index)
    }

    /// The variable's registration (`None` for a handle of another optimizer).
    pub fn variable(&self, id: VarId) -> Option<&VariableInfo> {
        Some(&self.vars[self.index_of(id)?].info)
    }

    /// The variable registered under `name`.
    pub fn variable_id(&self, name: &str) -> Option<VarId> {
        self.names.get(name).map(|&i| self.var_id(i))
    }

    /// Number of registered variables.
    pub fn num_variables(&self) -> usize {
        self.vars.len()
    }

    /// All variable ids, in registration order.
    pub fn variable_ids(&self) -> impl Iterator<Item = VarId> + '_ {
        (0..self.vars.len()).map(|i| self.var_id(i))
    }

    /// The step counter (number of applied steps).
    pub fn iterations(&self) -> u64 {
        self.iterations
    }

    /// Sets the step counter (e.g. to resume a schedule). Values above
    /// `i64::MAX` (the reference's int64 `iterations`, and what a checkpoint
    /// stores) are [`Error::IterationsOutOfRange`], and the counter is kept.
    ///
    /// With per-row state ([`Extensions::per_row_bias_correction`],
    /// [`Extensions::catch_up_decay`]), a value below a row's counter (a row
    /// updated at a step the new counter says has not happened) is
    /// [`Error::IterationsBelowRowCounter`], and the counter is kept: no
    /// checkpoint ([`LazyAdam::to_bytes`], [`LazyAdam::get_weights`]) could
    /// hold that state.
    pub fn set_iterations(&mut self, iterations: u64) -> Result<(), Error> {
        if iterations > MAX_ITERATIONS {
            return Err(Error::IterationsOutOfRange { iterations });
        }
        for var in &self.vars {
            for (what, counts) in [
                ("row_steps", var.row_steps.as_deref()),
                ("last_step", var.last_step.as_deref()),
            ] {
                if let Some(&counter) = counts.and_then(|c| c.iter().max())
                    && counter > iterations
                {
                    return Err(Error::IterationsBelowRowCounter {
                        iterations,
                        variable: var.info.name.clone(),
                        what,
                        counter,
                    });
                }
            }
        }
        self.iterations = iterations;
        Ok(())
    }

    /// The learning rate the next step will use (schedule and legacy decay
    /// applied, before bias correction). It may be invalid (NaN, infinite or
    /// negative, from a schedule); the step then fails with
    /// [`Error::InvalidLearningRate`] and writes nothing.
    pub fn learning_rate(&self) -> f32 {
        self.config.learning_rate_at(self.iterations)
    }

    /// The rates of the next step, checked as the step checks them: the
    /// scheduled learning rate, the bias-corrected step size (for the global
    /// step count and, with per-row bias correction, its largest possible
    /// value) and the weight-decay factor must be finite and not negative;
    /// the step counter must be below `i64::MAX`.
    pub(crate) fn step_rates(&self) -> Result<StepRates, Error> {
        let step = self.iterations;
        if step >= MAX_ITERATIONS {
            return Err(Error::StepCounterExhausted { iterations: step });
        }
        let invalid = |what, value: f32| Error::InvalidLearningRate { step, what, value };
        let valid = |x: f32| x.is_finite() && x >= 0.0;
        let lr = self.config.learning_rate_at(step);
        if !valid(lr) {
            return Err(invalid("learning rate", lr));
        }
        let t = step + 1;
        let (b1, b2) = (self.config.beta_1, self.config.beta_2);
        let mode = self.ext.bias_correction;
        let lr_t = bias_corrected_lr(mode, lr, b1, b2, t);
        if !valid(lr_t) {
            return Err(invalid("bias-corrected step size", lr_t));
        }
        if self.ext.per_row_bias_correction {
            // A row's own count `s` is in 1..=t; `sqrt(1 - b2^s) <= 1` and
            // `1 - b1^s >= 1 - b1`, so `lr / (1 - b1)` bounds every row's step
            // size (with a margin for the roundings of the f32 evaluation).
            let bound = (lr as f64) / (1.0 - b1 as f64) * (1.0 + 1e-5);
            if bound > f32::MAX as f64 {
                return Err(invalid("bias-corrected step size", bound as f32));
            }
        }
        let weight_decay = self.ext.weight_decay * lr;
        if !valid(weight_decay) {
            return Err(invalid("weight-decay factor", weight_decay));
        }
        Ok(StepRates {
            lr,
            t,
            lr_t,
            weight_decay,
        })
    }

    /// Replaces the learning rate (or schedule) by the constant `lr`.
    pub fn set_learning_rate(&mut self, lr: f32) -> Result<(), Error> {
        if !lr.is_finite() || lr < 0.0 {
            return Err(ConfigError::invalid(
                "learning_rate",
                format!("must be finite and not negative, got {lr}"),
            )
            .into());
        }
        self.config.learning_rate = LearningRate::Constant(lr);
        Ok(())
    }

    /// The configuration.
    pub fn config(&self) -> &LazyAdamConfig {
        &self.config
    }

    /// The extensions.
    pub fn extensions(&self) -> &Extensions {
        &self.ext
    }

    /// The kernel path in use.
    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    /// The current dynamic loss scale (with
    /// [`NonFinitePolicy::SkipStep`] and a loss scale).
    pub fn loss_scale(&self) -> Option<f32> {
        self.loss_scale.map(|l| l.scale)
    }

    /// The slots of a variable.
    pub fn slots(&self, id: VarId) -> Option<Slots<'_>> {
        let v = &self.vars[self.index_of(id)?];
        Some(Slots {
            m: v.m.as_ref(),
            v: v.v.as_ref(),
            vhat: v.vhat.as_ref().map(|s| s.as_ref()),
        })
    }

    /// Per-row update counts of a variable (with
    /// [`Extensions::per_row_bias_correction`]).
    pub fn row_steps(&self, id: VarId) -> Option<&[u64]> {
        self.vars[self.index_of(id)?].row_steps.as_deref()
    }

    /// Per-row step of the last update (`iterations + 1` at that step, 0 =
    /// never) of a variable (with [`Extensions::catch_up_decay`]).
    pub fn last_update_steps(&self, id: VarId) -> Option<&[u64]> {
        self.vars[self.index_of(id)?].last_step.as_deref()
    }

    /// Checks every update; writes nothing.
    pub(crate) fn validate(&mut self, updates: &[Update<'_>]) -> Result<(), Error> {
        let mut seen = std::mem::take(&mut self.scratch.seen);
        let r = self.validate_with(updates, &mut seen);
        self.scratch.seen = seen;
        r
    }

    fn validate_with(&self, updates: &[Update<'_>], seen: &mut Vec<bool>) -> Result<(), Error> {
        seen.clear();
        seen.resize(self.vars.len(), false);
        for u in updates {
            let Some(i) = self.index_of(u.var) else {
                let why = if u.var.owner != self.instance {
                    format!(
                        "{} (issued by another optimizer; this is #{})",
                        u.var, self.instance
                    )
                } else {
                    format!("{} (out of range)", u.var)
                };
                return Err(Error::UnknownVariable { variable: why });
            };
            let var = &self.vars[i];
            let name = || var.info.name.clone();
            if std::mem::replace(&mut seen[i], true) {
                return Err(Error::DuplicateUpdate { variable: name() });
            }
            if u.param.dtype() != var.info.param_dtype {
                return Err(Error::DtypeMismatch {
                    variable: name(),
                    what: "param",
                    expected: var.info.param_dtype,
                    got: u.param.dtype(),
                });
            }
            if u.param.len() != var.numel {
                return Err(Error::LengthMismatch {
                    variable: name(),
                    what: "param",
                    expected: var.numel,
                    got: u.param.len(),
                });
            }
            match &u.grad {
                Gradient::Dense(values) => {
                    if values.len() != var.numel {
                        return Err(Error::LengthMismatch {
                            variable: name(),
                            what: "gradient values",
                            expected: var.numel,
                            got: values.len(),
                        });
                    }
                }
                Gradient::Sparse { ids, values } => {
                    check_sparse(name, ids, values.len(), var.rows, var.row_len)?;
                }
            }
        }
        Ok(())
    }

    /// Under [`NonFinitePolicy::Error`], the error for the first non-finite
    /// value of a gradient of variable `index`; `Ok` otherwise. One serial
    /// scan: [`LazyAdam::check_values`] calls it only once its pass found a
    /// non-finite value.
    fn check_finite(&self, index: usize, grad: &Gradient<'_>) -> Result<(), Error> {
        if self.ext.non_finite != NonFinitePolicy::Error {
            return Ok(());
        }
        if let Some((element, value)) = first_non_finite(&grad.values()) {
            let var = &self.vars[index];
            let row = match grad {
                Gradient::Sparse { ids, .. } => {
                    ids.get(element / var.row_len.max(1)).and_then(|r| r.ok())
                }
                Gradient::Dense(_) => None,
            };
            return Err(Error::NonFinite {
                variable: var.info.name.clone(),
                element,
                row,
                value,
            });
        }
        Ok(())
    }

    /// Applies one step: the gradients of every update, one increment of the
    /// step counter.
    ///
    /// All or nothing: everything the step needs is checked before anything
    /// is written (variables known to this optimizer and not repeated,
    /// parameter dtype and length, gradient length, row ids, the non-finite
    /// policy, the step counter below `i64::MAX`, and the step's learning
    /// rate, step size and weight-decay factor finite and not negative); on
    /// error, parameters, slots, the step counter and the loss scale are
    /// exactly as before. Once writing starts, nothing can fail.
    ///
    /// Variables without an update in the step are untouched.
    ///
    /// ```
    /// use lazyadam::{DType, Error, Gradient, LazyAdam, LazyAdamConfig, StepOutcome, Update};
    ///
    /// let mut opt = LazyAdam::new(LazyAdamConfig::default())?;
    /// let table = opt.add_variable("table", &[3, 2], DType::F32, DType::F32)?;
    /// let bias = opt.add_variable("bias", &[2], DType::F32, DType::F32)?;
    /// let (mut t, mut b) = (vec![0.0f32; 6], vec![0.0f32; 2]);
    ///
    /// // One step: sparse rows of the table, a dense gradient for the bias.
    /// let outcome = opt.apply_gradients(&mut [
    ///     Update::new(table, &mut t, Gradient::sparse(&[2u32], &[1.0f32, -1.0])),
    ///     Update::new(bias, &mut b, Gradient::dense(&[0.5f32, 0.5])),
    /// ])?;
    /// assert_eq!(outcome, StepOutcome::Applied);
    /// assert_eq!(opt.iterations(), 1);
    ///
    /// // A bad id in any update fails the whole step; nothing is written.
    /// let before = (t.clone(), b.clone());
    /// let err = opt.apply_gradients(&mut [
    ///     Update::new(bias, &mut b, Gradient::dense(&[0.5f32, 0.5])),
    ///     Update::new(table, &mut t, Gradient::sparse(&[3u32], &[1.0f32, 1.0])),
    /// ]);
    /// assert!(matches!(err, Err(Error::RowIdOutOfRange { id: 3, rows: 3, .. })));
    /// assert_eq!((t, b), before);
    /// assert_eq!(opt.iterations(), 1);
    /// # Ok::<(), Error>(())
    /// ```
    pub fn apply_gradients(&mut self, updates: &mut [Update<'_>]) -> Result<StepOutcome, Error> {
        let mut timer = Timer::start();
        self.validate(updates)?;
        // The loss scale's unscale factor (see `inv_scale`).
        let inv_scale = self.inv_scale();
        // The non-finite policy's look at every value: under Error a
        // non-finite one is the error; under SkipStep it skips the step (after
        // the rates are known to be valid, as every step's are).
        let mut check_sums = std::mem::take(&mut self.scratch.check_sums);
        check_sums.clear();
        // With a clipping norm, the check's pass also takes the f64 estimate
        // of the sum of squares of the values under the base transform, which
        // is what the norm needs (`clipnorm` and `global_clipnorm` exclude
        // each other): the values are read once for both.
        let base = self.base_transform(inv_scale);
        let mut estimates = std::mem::take(&mut self.scratch.estimates);
        estimates.clear();
        let fuse = self.config.clipnorm.is_some() || self.config.global_clipnorm.is_some();
        let mut non_finite = false;
        if self.checks_non_finite() {
            for u in updates.iter() {
                let (m, skip) = if fuse {
                    let (m, skip, e) =
                        self.check_values_and_estimate(u.var.index, &u.grad, inv_scale, &base)?;
                    estimates.push(e);
                    (m, skip)
                } else {
                    self.check_values(u.var.index, &u.grad, inv_scale)?
                };
                if skip {
                    non_finite = true;
                    break;
                }
                check_sums.push(match &u.grad {
                    Gradient::Sparse { ids, .. } => {
                        sums_need_check(m, ids.len(), inv_scale).then_some(m)
                    }
                    Gradient::Dense(_) => None,
                });
            }
        }
        let rates = self.step_rates()?;
        timer.lap(Phase::Validate);

        // Non-finite gradients under SkipStep: skip, back off the loss scale.
        if non_finite {
            self.scratch.check_sums = check_sums;
            self.scratch.estimates = estimates;
            self.skip_step();
            timer.finish();
            return Ok(StepOutcome::Skipped);
        }

        // Gradient transforms: unscale, clipvalue, clipnorm, global_clipnorm.
        // A clipping norm's factor comes from the f64 estimate of the sum of
        // squares when that decides it (`clip_factor_from_estimate`), else
        // from the exact sum: the same factor either way.
        let mut transforms = std::mem::take(&mut self.scratch.transforms);
        transforms.clear();
        // Update `i`'s estimate under `t`: the check's when it took it.
        let estimate = |i: usize, values: &TensorRef<'_>, t: &GradTransform| match estimates.get(i)
        {
            Some(e) if *t == base => *e,
            _ => self.square_estimate(values, t),
        };
        for (i, u) in updates.iter().enumerate() {
            let mut t = base;
            if let Some(c) = self.config.clipnorm {
                let values = u.grad.values();
                let (est, depth) = estimate(i, &values, &t);
                let factor = clip_factor_from_estimate(est, depth, c, false).unwrap_or_else(|| {
                    clip_factor(self.square_sum(&values, &t).to_f64(), c, false)
                });
                if let Some(f) = factor {
                    scale_transform(&mut t, f);
                }
            }
            transforms.push(t);
        }
        if let Some(c) = self.config.global_clipnorm {
            // The updates' estimates added in update order.
            let (est, depth) = sum_of_estimates(
                (updates.iter().zip(transforms.iter()).enumerate())
                    .map(|(i, (u, t))| estimate(i, &u.grad.values(), t)),
            );
            let factor = clip_factor_from_estimate(est, depth, c, true).unwrap_or_else(|| {
                let mut total = SquareSum::ZERO;
                for (u, t) in updates.iter().zip(transforms.iter()) {
                    self.accumulate_squares(&mut total, &u.grad.values(), t);
                }
                clip_factor(total.to_f64(), c, true)
            });
            if let Some(f) = factor {
                transforms.iter_mut().for_each(|t| scale_transform(t, f));
            }
        }
        self.scratch.estimates = estimates;
        // The sums of duplicate rows that the bound could not clear, exactly.
        // The last update whose ids that check grouped keeps its grouping for
        // the step.
        let mut sums = Ok(());
        let mut grouped = None;
        for (i, ((u, t), m)) in updates.iter().zip(&transforms).zip(&check_sums).enumerate() {
            let Some(m) = *m else { continue };
            match self.non_finite_sum(u.var.index, &u.grad, t, m, inv_scale) {
                Ok(true) => grouped = Some(i),
                Ok(false) => {}
                Err(e) => {
                    sums = Err(e);
                    break;
                }
            }
        }
        self.scratch.check_sums = check_sums;
        timer.lap(Phase::Transforms);
        let r = match sums {
            Ok(()) => self.write_step(updates, &transforms, rates, grouped, &mut timer),
            Err(Error::NonFiniteSum { .. }) if self.skips_non_finite() => {
                self.skip_step();
                Ok(StepOutcome::Skipped)
            }
            Err(e) => Err(e),
        };
        self.scratch.transforms = transforms;
        timer.finish();
        r
    }

    /// The unscale factor of the loss scale (1 without one): finite, since
    /// the scale is at least `f32::MIN_POSITIVE` (validated, and the floor of
    /// the backoff).
    pub(crate) fn inv_scale(&self) -> f32 {
        self.loss_scale.map(|l| 1.0 / l.scale).unwrap_or(1.0)
    }

    /// Whether the policy looks at gradient values (`Error` or `SkipStep`).
    pub(crate) fn checks_non_finite(&self) -> bool {
        self.ext.non_finite != NonFinitePolicy::Propagate
    }

    /// The non-finite policy's look at a gradient of variable `index`, its
    /// values unscaled by `inv_scale`: one pass for their largest magnitude
    /// `m` ([`LazyAdam::largest_magnitude`]), returned with whether the step
    /// must skip. The values are all finite once unscaled exactly when
    /// `m * inv_scale` is, rounding being monotonic (and the step's clipping
    /// only shrinks them). When one is not: under Error the error naming the
    /// first non-finite value, under SkipStep a skip. For a sparse gradient
    /// `m` also bounds its duplicate rows' sums ([`sums_need_check`]).
    pub(crate) fn check_values(
        &self,
        index: usize,
        grad: &Gradient<'_>,
        inv_scale: f32,
    ) -> Result<(f32, bool), Error> {
        let m = self.largest_magnitude(&grad.values());
        self.judge_values(index, grad, inv_scale, m)
    }

    /// [`LazyAdam::check_values`] given the values' largest magnitude `m`.
    fn judge_values(
        &self,
        index: usize,
        grad: &Gradient<'_>,
        inv_scale: f32,
        m: f32,
    ) -> Result<(f32, bool), Error> {
        let bad = !(m * inv_scale).is_finite();
        if bad && !self.skips_non_finite() {
            self.check_finite(index, grad)?;
        }
        Ok((m, bad && self.skips_non_finite()))
    }

    /// [`LazyAdam::check_values`], and the f64 estimate of the sum of squares
    /// of the values transformed by `t` with its chain depth
    /// ([`squares_estimate`]), from one pass over them.
    pub(crate) fn check_values_and_estimate(
        &self,
        index: usize,
        grad: &Gradient<'_>,
        inv_scale: f32,
        t: &GradTransform,
    ) -> Result<(f32, bool, (f64, usize)), Error> {
        let min_parallel = self.ext.parallel_min_elements.max(1);
        let (est, depth, m) = estimate_and_max_abs(&self.kernels, &grad.values(), t, min_parallel);
        let (m, skip) = self.judge_values(index, grad, inv_scale, m)?;
        Ok((m, skip, (est, depth)))
    }

    /// The largest magnitude among `values` (`f32::NAN` if one is NaN), over
    /// the thread pool for long ones, with the same result on any thread
    /// count ([`max_abs`]).
    pub(crate) fn largest_magnitude(&self, values: &TensorRef<'_>) -> f32 {
        max_abs(&self.kernels, values, self.ext.parallel_min_elements.max(1))
    }

    /// The exact check of a sparse gradient's duplicate rows, for when
    /// [`sums_surely_finite`] could not clear them with the gradient's id count:
    /// each row of variable `index` that occurs more than once, and that the
    /// same bound cannot clear with the row's own count (the values' largest
    /// magnitude `max_abs`, unscaled by `inv_scale`), is summed as the step sums
    /// it (the values transformed by `t`, added in f32 in occurrence order, by
    /// the same kernel, so to the same bits). The first such row, in row order,
    /// with a non-finite element is [`Error::NonFiniteSum`]. The ids are sorted
    /// as the step sorts them, and the rows summed over the thread pool when
    /// they hold at least `parallel_min_elements` values; the row named is the
    /// same for any thread count. Writes no parameter or slot. The ids must be
    /// validated.
    ///
    /// Returns whether it left the ids grouped in the scratch [`Dedup`], as
    /// [`LazyAdam::write_step`] would group them on this pool (it does unless
    /// there is nothing to sum: no row elements, or fewer than two ids).
    pub(crate) fn non_finite_sum(
        &mut self,
        index: usize,
        grad: &Gradient<'_>,
        t: &GradTransform,
        max_abs: f32,
        inv_scale: f32,
    ) -> Result<bool, Error> {
        let Gradient::Sparse { ids, values } = grad else {
            return Ok(false);
        };
        let var = &self.vars[index];
        let rl = var.row_len;
        if rl == 0 || ids.len() < 2 {
            return Ok(false);
        }
        let dedup = &mut self.scratch.dedup;
        sort_ids(dedup, ids, var.rows, pool_threads());
        let list = RowList::new(dedup);
        let k = &self.kernels;
        // One row's sum, and its error if it is not finite.
        let sum_row = |acc: &mut Vec<f32>, pos: &mut Vec<usize>, d: &Distinct| -> Option<Error> {
            pos.clear();
            pos.extend(list.occurrences(d));
            acc.resize(rl, 0.0);
            let acc = &mut acc[..rl];
            let summed = match values {
                TensorRef::F32(s) => k.sum_rows_at(acc, s, pos, t),
                TensorRef::F16(s) => k.sum_rows_at(acc, s, pos, t),
                TensorRef::BF16(s) => k.sum_rows_at(acc, s, pos, t),
            };
            if let Err(e) = summed {
                return Some(e.into());
            }
            let element = acc.iter().position(|x| !x.is_finite())?;
            Some(Error::NonFiniteSum {
                variable: var.info.name.clone(),
                row: (var.row_offset + d.row) as u64,
                element,
                value: acc[element],
                occurrences: d.count,
            })
        };
        let checked = |d: &&Distinct| sums_need_check(max_abs, d.count, inv_scale);
        #[cfg(feature = "rayon")]
        {
            use rayon::prelude::*;
            let min_parallel = self.ext.parallel_min_elements.max(1);
            let values_summed = || {
                let mut n = 0usize;
                for d in list.distinct.iter().filter(checked) {
                    n = n.saturating_add(d.count.saturating_mul(rl));
                }
                n
            };
            if pool_threads() > 1 && values_summed() >= min_parallel {
                // `find_map_first`: the first failing row in row order, on
                // any split.
                let first = list
                    .distinct
                    .par_iter()
                    .filter(checked)
                    .map_init(
                        || (Vec::new(), Vec::new()),
                        |(acc, pos), d| sum_row(acc, pos, d),
                    )
                    .find_map_first(|e| e);
                return first.map_or(Ok(true), Err);
            }
        }
        let sc = &mut self.scratch.rows;
        for d in list.distinct.iter().filter(checked) {
            if let Some(e) = sum_row(&mut sc.acc, &mut sc.pos, d) {
                return Err(e);
            }
        }
        Ok(true)
    }

    /// Whether non-finite gradients skip the step ([`NonFinitePolicy::SkipStep`]).
    pub(crate) fn skips_non_finite(&self) -> bool {
        matches!(self.ext.non_finite, NonFinitePolicy::SkipStep { .. })
    }

    /// A skipped step: the loss scale backs off; nothing else changes.
    pub(crate) fn skip_step(&mut self) {
        if let (
            Some(ls),
            NonFinitePolicy::SkipStep {
                loss_scale: Some(cfg),
            },
        ) = (self.loss_scale.as_mut(), &self.ext.non_finite)
        {
            ls.scale = (ls.scale * cfg.backoff_factor).max(f32::MIN_POSITIVE);
            ls.good_steps = 0;
        }
    }

    /// The transform every gradient starts from: unscale, then `clipvalue`.
    pub(crate) fn base_transform(&self, inv_scale: f32) -> GradTransform {
        GradTransform {
            scale: inv_scale,
            clip: self.config.clipvalue,
            negate: false,
        }
    }

    /// The exact sum of squares of `transform(values)`.
    pub(crate) fn square_sum(&self, values: &TensorRef<'_>, t: &GradTransform) -> SquareSum {
        let mut s = SquareSum::ZERO;
        self.accumulate_squares(&mut s, values, t);
        s
    }

    /// The f64 estimate of the sum of squares of `transform(values)` and its
    /// chain depth, for [`clip_factor_from_estimate`] ([`squares_estimate`]).
    pub(crate) fn square_estimate(
        &self,
        values: &TensorRef<'_>,
        t: &GradTransform,
    ) -> (f64, usize) {
        let min_parallel = self.ext.parallel_min_elements.max(1);
        squares_estimate(&self.kernels, values, t, min_parallel)
    }

    /// Adds the exact squares of `transform(values)` into `acc`.
    pub(crate) fn accumulate_squares(
        &self,
        acc: &mut SquareSum,
        values: &TensorRef<'_>,
        t: &GradTransform,
    ) {
        let k = &self.kernels;
        let min_parallel = self.ext.parallel_min_elements.max(1);
        match values {
            TensorRef::F32(s) => squares_of(k, acc, s, t, min_parallel),
            TensorRef::F16(s) => squares_of(k, acc, s, t, min_parallel),
            TensorRef::BF16(s) => squares_of(k, acc, s, t, min_parallel),
        }
    }

    /// Writes a validated step: `transforms[i]` is the clipped transform of
    /// `updates[i]` (maximize is applied here), `rates` the step's checked
    /// rates. Increments the step counter and grows the loss scale.
    ///
    /// `grouped`: the update, if any, whose ids the scratch [`Dedup`] holds
    /// grouped ([`LazyAdam::non_finite_sum`] on this pool, with nothing
    /// grouped since); that update takes the grouping instead of grouping its
    /// ids again (the sort and the hash table give the same bits).
    pub(crate) fn write_step(
        &mut self,
        updates: &mut [Update<'_>],
        transforms: &[GradTransform],
        rates: StepRates,
        mut grouped: Option<usize>,
        timer: &mut Timer,
    ) -> Result<StepOutcome, Error> {
        let k = self.kernels;
        // Everything is checked: from here on the step writes, and cannot fail.
        let StepRates {
            lr,
            t,
            lr_t,
            weight_decay,
        } = rates;
        let (b1, b2) = (self.config.beta_1, self.config.beta_2);
        let mut base = AdamCoeffs::new(lr_t, b1, b2, self.config.epsilon);
        base.weight_decay = weight_decay;

        let threads = pool_threads();

        for (ui, (u, &tf)) in updates.iter_mut().zip(transforms.iter()).enumerate() {
            let mut tf = tf;
            // Whether this update takes the grouping of its ids already made.
            let reuse = grouped == Some(ui);
            tf.negate = self.ext.maximize;
            let vi = u.var.index;
            let var = &mut self.vars[vi];
            if var.numel == 0 {
                // Nothing to write (its ids were checked against its rows).
                continue;
            }
            let sparse = matches!(u.grad, Gradient::Sparse { .. });
            let row_path = sparse || self.ext.per_row_bias_correction || self.ext.catch_up_decay;
            let min_parallel = self.ext.parallel_min_elements.max(1);
            let (dedup, hash) = (&mut self.scratch.dedup, &mut self.scratch.hash);
            let mut rows = Rows::Dense;
            let updated = if let Gradient::Sparse { ids, .. } = &u.grad {
                // Small steps take the hash table; large ones the radix sort,
                // whose parallel path also sums the duplicates in parallel
                // (the hashed path sums them on one thread). One-thread steps
                // of short rows keep the hash table longer (see
                // `HASHED_SHORT_ROW_LEN`). The hash table gives up on ids
                // that probe too long (crafted to collide) and declines
                // tables of more than 2^32 rows; the sort takes them: it
                // costs the same for any ids.
                let n_elems = ids.len().saturating_mul(var.row_len);
                let hashed = !reuse
                    && ids.len() <= RowHash::MAX_IDS
                    && (n_elems < min_parallel.saturating_mul(HASHED_PARALLEL_FACTOR)
                        || (threads == 1
                            && var.row_len <= HASHED_SHORT_ROW_LEN
                            && n_elems <= HASHED_MAX_ELEMENTS))
                    && with_ids!(ids, |n, id| hash.build(n, var.rows, id));
                if hashed {
                    rows = Rows::Hashed(&*hash);
                    hash.rows.len() * var.row_len
                } else {
                    if !reuse {
                        sort_ids(dedup, ids, var.rows, threads);
                        grouped = None;
                    }
                    rows = Rows::Sorted(&*dedup);
                    dedup.distinct.len() * var.row_len
                }
            } else {
                if row_path {
                    dedup.build_identity(var.rows);
                    grouped = None;
                    rows = Rows::Sorted(&*dedup);
                }
                var.numel
            };
            timer.lap(Phase::Dedup);
            let parallel = threads > 1 && updated >= min_parallel;
            let ctx = StepCtx {
                k,
                base,
                lr,
                t,
                bias_correction: self.ext.bias_correction,
                per_row_bias: self.ext.per_row_bias_correction,
                catch_up: self.ext.catch_up_decay,
                sr_seed: self
                    .ext
                    .stochastic_rounding
                    .map(|s| mix64(mix64(s ^ mix64(t)).wrapping_add(vi as u64))),
                row_len: var.row_len,
                row_offset: var.row_offset,
                amsgrad: var.vhat.is_some() && (!sparse || self.ext.sparse_amsgrad),
                parallel,
                transform: tf,
            };
            let mut job = Job {
                ctx: &ctx,
                rows,
                timer: &mut *timer,
            };
            let bufs = Bufs {
                rows: &mut self.scratch.rows,
                hashed: &mut self.scratch.hashed,
            };
            job.dispatch(var, &mut u.param, &u.grad.values(), bufs)?;
        }

        self.iterations = t;
        if let (
            Some(ls),
            NonFinitePolicy::SkipStep {
                loss_scale: Some(cfg),
            },
        ) = (self.loss_scale.as_mut(), &self.ext.non_finite)
        {
            ls.good_steps = ls.good_steps.saturating_add(1);
            if ls.good_steps >= cfg.growth_interval {
                let grown = ls.scale * cfg.growth_factor;
                if grown.is_finite() {
                    ls.scale = grown;
                }
                ls.good_steps = 0;
            }
        }
        Ok(StepOutcome::Applied)
    }
}

/// Above this many gradient elements (ids x row length), a one-thread step
/// sorts its rows rather than hashing them: the hashed path keeps one f32
/// accumulator row per distinct row, which then no longer fits in cache.
const HASHED_MAX_ELEMENTS: usize = 1 << 20;

/// Rows of at most this many elements keep the hash table on one thread up
/// to [`HASHED_MAX_ELEMENTS`] gradient elements; longer rows take it only
/// below `HASHED_PARALLEL_FACTOR` x `parallel_min_elements`, as on several
/// threads. With longer rows the radix sort, which groups the ids in about
/// half the hash table's time, wins; with short rows a step's cost is more
/// per distinct row, and the hashed path sums and updates with two batched
/// kernel calls where the sorted path makes one or two per distinct row.
/// Measured with `step_timing` on one thread, 1,000,000-row tables, the
/// sorted step over the hashed one: 0.87x-0.95x at 32 elements a row
/// (8,192 and 32,768 ids), 0.83x-0.94x at 64 (2,048 to 16,384 ids),
/// 0.88x-1.00x at 128 (2,048 and 8,192 ids), but 0.92x-1.13x at 16 (4,096
/// to 65,536 ids); `benches/README.md`, "One-thread steps: hash table or
/// sort".
const HASHED_SHORT_ROW_LEN: usize = 16;

/// Steps of fewer than this many times `parallel_min_elements` gradient
/// elements take the hashed path (which sums duplicates on one thread, then
/// updates in parallel if there are several threads and the distinct rows
/// reach `parallel_min_elements`); larger ones the sorted path, but for
/// one-thread steps of short rows ([`HASHED_SHORT_ROW_LEN`]).
const HASHED_PARALLEL_FACTOR: usize = 4;

/// The distinct rows of a variable's step.
#[derive(Clone, Copy)]
enum Rows<'a> {
    /// The plain dense path.
    Dense,
    /// Sorted rows ([`Dedup`]), sequential or parallel.
    Sorted(&'a Dedup),
    /// Hashed rows ([`RowHash`]), sequential.
    Hashed(&'a RowHash),
}

/// The scratch buffers a job writes.
struct Bufs<'a> {
    rows: &'a mut RowScratch,
    hashed: &'a mut HashedScratch,
}

/// One variable's work in a step, dispatched on the storage types.
struct Job<'a> {
    ctx: &'a StepCtx,
    rows: Rows<'a>,
    timer: &'a mut Timer,
}

impl Job<'_> {
    fn dispatch(
        &mut self,
        var: &mut VarState,
        param: &mut TensorMut<'_>,
        values: &TensorRef<'_>,
        bufs: Bufs<'_>,
    ) -> Result<(), Error> {
        match param {
            TensorMut::F32(p) => self.with_param::<f32>(var, p, values, bufs),
            TensorMut::F16(p) => self.with_param::<f16>(var, p, values, bufs),
            TensorMut::BF16(p) => self.with_param::<bf16>(var, p, values, bufs),
        }
    }

    fn with_param<P: Element>(
        &mut self,
        var: &mut VarState,
        p: &mut [P],
        values: &TensorRef<'_>,
        bufs: Bufs<'_>,
    ) -> Result<(), Error> {
        match values {
            TensorRef::F32(g) => self.with_grad::<P, f32>(var, p, g, bufs),
            TensorRef::F16(g) => self.with_grad::<P, f16>(var, p, g, bufs),
            TensorRef::BF16(g) => self.with_grad::<P, bf16>(var, p, g, bufs),
        }
    }

    fn with_grad<P: Element, G: Element>(
        &mut self,
        var: &mut VarState,
        p: &mut [P],
        g: &[G],
        bufs: Bufs<'_>,
    ) -> Result<(), Error> {
        match var.info.moment_dtype {
            DType::F32 => self.run::<P, G, f32>(var, p, g, bufs),
            DType::F16 => self.run::<P, G, f16>(var, p, g, bufs),
            DType::BF16 => self.run::<P, G, bf16>(var, p, g, bufs),
        }
    }

    fn run<P: Element, G: Element, M: StoreElem>(
        &mut self,
        var: &mut VarState,
        p: &mut [P],
        g: &[G],
        bufs: Bufs<'_>,
    ) -> Result<(), Error> {
        let internal = || Error::Checkpoint("internal: slot storage type mismatch".into());
        let m = M::slice_mut(&mut var.m).ok_or_else(internal)?;
        let v = M::slice_mut(&mut var.v).ok_or_else(internal)?;
        let vhat = match var.vhat.as_mut() {
            Some(s) => Some(M::slice_mut(s).ok_or_else(internal)?),
            None => None,
        };
        if let Rows::Dense = self.rows {
            step::dense(self.ctx, p, m, v, vhat, g, 0)?;
        } else {
            let tb = Tables {
                param: p,
                m,
                v,
                vhat,
                steps: var.row_steps.as_deref_mut(),
                last: var.last_step.as_deref_mut(),
                base_row: 0,
            };
            match self.rows {
                Rows::Hashed(h) => step::rows_hashed(self.ctx, tb, h, g, bufs.hashed)?,
                Rows::Sorted(d) => step::rows(self.ctx, tb, RowList::new(d), g, bufs.rows)?,
                Rows::Dense => {}
            }
        }
        self.timer.lap(Phase::Update);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The widest error a sum of `depth`-long chains of rounded additions of
    /// non-negative terms can have, relative to the exact sum: the estimate
    /// an adversary may hand [`clip_factor_from_estimate`].
    fn worst_error(depth: usize) -> f64 {
        let du = depth as f64 * f64::EPSILON / 2.0;
        du / (1.0 - du)
    }

    proptest! {
        /// An estimate decides only what the exact sum decides: values whose
        /// exact sum of squares is known, an estimate anywhere within the
        /// error bound of the depth given (the kernel's own estimate too), a
        /// norm `c` near the gradient's norm; whenever the estimate gives a
        /// factor, it is the exact sum's, to the bit.
        #[test]
        fn estimates_decide_only_what_the_exact_sum_decides(
            vals in proptest::collection::vec(-4.0f32..4.0, 1..600),
            ulps in -4i32..=4,
            ratio in prop_oneof![Just(1.0f64), 0.5f64..2.0],
            off in -1.0f64..=1.0,
            global in any::<bool>(),
        ) {
            let k = Kernels::new(lazyadam_kernels::Isa::Scalar).unwrap();
            let t = GradTransform::default();
            let exact = k.sum_squares_exact(&vals, &t).to_f64();
            let norm = (exact.sqrt() * ratio) as f32;
            let c = f32::from_bits((norm.to_bits() as i32 + ulps).max(0) as u32);
            let want = clip_factor(exact, c, global).map(f32::to_bits);
            let n = vals.len();
            let depth = n / 8 + 4;
            for est in [k.sum_squares(&vals, &t), exact * (1.0 + off * worst_error(depth))] {
                if let Some(f) = clip_factor_from_estimate(est, depth, c, global) {
                    prop_assert_eq!(f.map(f32::to_bits), want, "est {} exact {}", est, exact);
                }
            }
        }

        /// At the boundary between clipping and not: one value `c` (and
        /// zeros), so the exact sum is `c^2` and the norm exactly `c` (no
        /// clipping). An estimate off by the largest error its depth allows,
        /// either way, must not decide.
        #[test]
        fn estimates_at_the_clipping_boundary_do_not_decide(
            bits in 0x0080_0000u32..0x7F00_0000,
            zeros in 0usize..5000,
            global in any::<bool>(),
        ) {
            let c = f32::from_bits(bits);
            let mut vals = vec![0.0f32; zeros + 1];
            vals[zeros / 2] = c;
            let k = Kernels::new(lazyadam_kernels::Isa::Scalar).unwrap();
            let exact = k.sum_squares_exact(&vals, &GradTransform::default()).to_f64();
            prop_assert_eq!(exact, c as f64 * c as f64);
            prop_assert_eq!(clip_factor(exact, c, global), None);
            let depth = vals.len() / 8 + 4;
            for sign in [1.0, -1.0] {
                let est = exact * (1.0 + sign * worst_error(depth));
                let got = clip_factor_from_estimate(est, depth, c, global);
                prop_assert!(got.is_none() || got == Some(None), "{:?}", got);
            }
        }
    }

    /// Away from the boundaries the estimate decides: of a thousand gradients
    /// of 4,096 values with norms 0.5x to 2x the clipping norm, every one
    /// below and all but a few above (a factor whose rounding the error
    /// straddles) are decided without the exact sum.
    #[test]
    fn estimates_usually_decide() {
        let k = Kernels::best();
        let t = GradTransform::default();
        let mut decided = 0;
        for i in 0..1000u64 {
            let vals: Vec<f32> = (0..4096u64)
                .map(|j| ((i * 4096 + j).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) as f32 * 1e-7)
                .collect();
            let exact = k.sum_squares_exact(&vals, &t).to_f64();
            let c = (exact.sqrt() * (0.5 + 1.5 * (i as f64 / 1000.0))) as f32;
            let got = clip_factor_from_estimate(k.sum_squares(&vals, &t), 4096 / 8 + 4, c, false);
            if let Some(f) = got {
                assert_eq!(
                    f.map(f32::to_bits),
                    clip_factor(exact, c, false).map(f32::to_bits)
                );
                decided += 1;
            } else {
                // Only a clipping norm can be straddled: below it, both bounds
                // give no clipping.
                assert!(
                    c as f64 <= exact.sqrt() * 1.000_001,
                    "c {c} was not decided"
                );
            }
        }
        assert!(decided >= 950, "{decided} of 1000 decided");
    }

    /// Estimates added: the sum in the order given, one more addition a part
    /// on top of the parts' depths, and a depth that cannot overflow (no
    /// panic in a debug build) and then decides nothing.
    #[test]
    fn sums_of_estimates_count_every_addition() {
        assert_eq!(sum_of_estimates([]), (0.0, 0));
        assert_eq!(sum_of_estimates([(1.5, 3), (2.0, 5)]), (3.5, 10));
        // In order: 1 + 1 + 2^53 is exact; 2^53 + 1 rounds to 2^53, twice.
        let big = 2f64.powi(53);
        assert_eq!(
            sum_of_estimates([(1.0, 0), (1.0, 0), (big, 0)]).0,
            big + 2.0
        );
        assert_eq!(sum_of_estimates([(big, 0), (1.0, 0), (1.0, 0)]).0, big);
        let (e, d) = sum_of_estimates([(1.0, usize::MAX), (1.0, 7)]);
        assert_eq!(d, usize::MAX);
        assert_eq!(clip_factor_from_estimate(e, d, 1.0, true), None);
    }

    /// An estimate (and its magnitude) is the same f64 on any thread count and
    /// any `min_parallel`: the chunks' sums are added in order whether they ran
    /// over rayon tasks or not. A sharded step relies on it for the dense
    /// gradients every rank sums (its ranks must agree on whether the exact
    /// sums are needed). Lengths around the chunk size, every gradient type.
    #[test]
    fn estimates_do_not_depend_on_threads_or_the_split() {
        let k = Kernels::best();
        let t = GradTransform {
            scale: 0.75,
            clip: Some(1e6),
            negate: false,
        };
        let chunk = VALUE_CHUNK;
        for n in [0, 1, 7, chunk - 1, chunk + 9, 7 * chunk + 5] {
            // Magnitudes over 2^-20..2^20, so that the chunks' sums carry
            // every bit of their f64s and their order shows in the total.
            let f: Vec<f32> = (0..n as u64)
                .map(|j| {
                    let h = j.wrapping_mul(0x9E37_79B9_7F4A_7C15);
                    (h >> 40) as f32 * 2f32.powi((h % 41) as i32 - 44)
                })
                .collect();
            let h: Vec<f16> = f.iter().map(|&x| f16::from_f32(x)).collect();
            let b: Vec<bf16> = f.iter().map(|&x| bf16::from_f32(x)).collect();
            for v in [TensorRef::F32(&f), TensorRef::F16(&h), TensorRef::BF16(&b)] {
                let want = estimate_of::<true>(&k, &v, &t, usize::MAX);
                assert_eq!(want.0, estimate_of::<false>(&k, &v, &t, usize::MAX).0);
                #[cfg(feature = "rayon")]
                for threads in [1, 2, 3] {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    for min_parallel in [1, 1000, VALUE_CHUNK] {
                        let got = pool.install(|| estimate_of::<true>(&k, &v, &t, min_parallel));
                        assert_eq!(
                            (got.0.to_bits(), got.1, got.2.to_bits()),
                            (want.0.to_bits(), want.1, want.2.to_bits()),
                            "{n} values, {threads} threads, min_parallel {min_parallel}"
                        );
                    }
                }
            }
        }
    }

    proptest! {
        /// The bound is sufficient: with the largest magnitude it accepts for `n` values and
        /// `inv_scale`, `n` values of at most that magnitude (that one included, signs and
        /// order arbitrary), unscaled and added in f32, never overflow.
        #[test]
        fn sums_the_bound_clears_are_finite(
            n in 1usize..3000,
            inv_exp in -126i32..100,
            fracs in proptest::collection::vec(0.0f32..=1.0, 1..64),
            signs in any::<u64>(),
        ) {
            let inv = 2f32.powi(inv_exp) * 1.7;
            prop_assume!(inv.is_finite());
            // The largest magnitude the bound accepts (binary search over positive bits).
            let (mut lo, mut hi) = (0u32, 0x7F80_0000u32);
            prop_assume!(sums_surely_finite(f32::from_bits(lo), n, inv));
            while hi - lo > 1 {
                let mid = lo + (hi - lo) / 2;
                if sums_surely_finite(f32::from_bits(mid), n, inv) { lo = mid } else { hi = mid }
            }
            let m = f32::from_bits(lo);
            prop_assert!(!sums_surely_finite(f32::from_bits(hi), n, inv));
            let mut same_sign = -0.0f32;
            let mut mixed = -0.0f32;
            for i in 0..n {
                let x = if i % 2 == 0 { m } else { m * fracs[i % fracs.len()] };
                same_sign += m * inv;
                let s = if signs >> (i % 64) & 1 == 1 { -x } else { x };
                mixed += s * inv;
            }
            prop_assert!(same_sign.is_finite() && mixed.is_finite(), "{m} x {n} at {inv}");
        }
    }

    #[test]
    fn the_bound_refuses_nan_and_infinity_and_is_not_far_from_tight() {
        assert!(!sums_surely_finite(f32::NAN, 2, 1.0));
        assert!(!sums_surely_finite(f32::INFINITY, 2, 1.0));
        assert!(!sums_surely_finite(1.0, 2, f32::INFINITY));
        assert!(sums_surely_finite(f32::MAX / 8.0, 2, 1.0));
        assert!(!sums_surely_finite(f32::MAX / 7.0, 2, 1.0));
        assert!(sums_surely_finite(0.0, usize::MAX, f32::MAX));
    }
}
