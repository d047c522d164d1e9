//! The step engine: row and dense updates on typed slices, sequential or in
//! parallel (rayon), with per-row extensions.

use lazyadam_kernels::{AdamCoeffs, Element, GradTransform, KernelError, Kernels, Rounding};

use crate::dedup::{Dedup, Distinct, RowHash};
use crate::extensions::BiasCorrection;
use crate::lr::bias_corrected_lr;

/// Elements per leaf task of the parallel paths.
#[cfg_attr(not(feature = "rayon"), allow(dead_code))]
pub(crate) const LEAF_ELEMENTS: usize = 8192;

/// Smallest leaf task of the parallel dense path on variables of at least twice this many
/// elements: the kernels' threshold for their out-of-cache loop (moments, then parameters,
/// per chunk), so that every leaf of a large variable takes it. With leaves of
/// [`LEAF_ELEMENTS`] no leaf did. Smaller variables (in cache, where the one-pass loop is
/// the faster) keep leaves of at most [`LEAF_ELEMENTS`], so they still use every thread.
/// Measured on `dense_16m` (AVX-512, `peer-workloads --workload dense_16m`, eight alternations with 8,192-element
/// leaves): the fastest all-f16 step 3.7-5.8 ms against 4.4-7.8 ms, lower in seven of the
/// eight; the median lower in five.
#[cfg(feature = "rayon")]
const DENSE_LEAF_ELEMENTS: usize = 1 << 16;

/// Per-variable constants of one step.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StepCtx {
    pub k: Kernels,
    /// Coefficients with the global `lr_t`, weight decay, identity transform and
    /// nearest-even rounding.
    pub base: AdamCoeffs,
    /// The step's learning rate (for per-row bias correction).
    pub lr: f32,
    /// `iterations + 1`.
    pub t: u64,
    /// How step sizes are evaluated (per-row bias correction).
    pub bias_correction: BiasCorrection,
    pub per_row_bias: bool,
    pub catch_up: bool,
    /// Stochastic-rounding seed for this variable and step.
    pub sr_seed: Option<u64>,
    pub row_len: usize,
    /// The global index of the variable's row 0 (stochastic-rounding offsets).
    pub row_offset: usize,
    /// Whether to use `vhat` (AMSGrad).
    pub amsgrad: bool,
    /// Whether to split the work over rayon tasks.
    #[cfg_attr(not(feature = "rayon"), allow(dead_code))]
    pub parallel: bool,
    /// The variable's gradient transform (clipping, unscaling, maximize).
    pub transform: GradTransform,
}

/// `beta^k` in f64, rounded to f32 (catch-up decay factors).
pub(crate) fn pow_k(beta: f32, k: u64) -> f32 {
    (beta as f64).powf(k as f64) as f32
}

/// splitmix64 finalizer.
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The mutable tables of one variable, restricted to rows
/// `base_row..base_row + param.len() / row_len`.
pub(crate) struct Tables<'a, P, M> {
    pub param: &'a mut [P],
    pub m: &'a mut [M],
    pub v: &'a mut [M],
    pub vhat: Option<&'a mut [M]>,
    pub steps: Option<&'a mut [u64]>,
    pub last: Option<&'a mut [u64]>,
    pub base_row: usize,
}

fn split_opt<T>(s: Option<&mut [T]>, at: usize) -> (Option<&mut [T]>, Option<&mut [T]>) {
    match s {
        Some(s) => {
            let (a, b) = s.split_at_mut(at);
            (Some(a), Some(b))
        }
        None => (None, None),
    }
}

impl<'a, P, M> Tables<'a, P, M> {
    /// Splits before absolute row `row` (`base_row <= row <= end`).
    #[cfg_attr(not(feature = "rayon"), allow(dead_code))]
    fn split_at_row(self, row: usize, row_len: usize) -> (Self, Self) {
        let local = row - self.base_row;
        let at = local * row_len;
        let (p0, p1) = self.param.split_at_mut(at);
        let (m0, m1) = self.m.split_at_mut(at);
        let (v0, v1) = self.v.split_at_mut(at);
        let (h0, h1) = split_opt(self.vhat, at);
        let (s0, s1) = split_opt(self.steps, local);
        let (l0, l1) = split_opt(self.last, local);
        (
            Tables {
                param: p0,
                m: m0,
                v: v0,
                vhat: h0,
                steps: s0,
                last: l0,
                base_row: self.base_row,
            },
            Tables {
                param: p1,
                m: m1,
                v: v1,
                vhat: h1,
                steps: s1,
                last: l1,
                base_row: row,
            },
        )
    }
}

/// Updates one row with gradient `grad` (already one row long).
#[inline]
fn update_row<P: Element, G: Element, M: Element>(
    ctx: &StepCtx,
    tb: &mut Tables<'_, P, M>,
    row: usize,
    grad: &[G],
    transform: GradTransform,
) -> Result<(), KernelError> {
    let rl = ctx.row_len;
    let local = row - tb.base_row;
    let range = local * rl..(local + 1) * rl;
    let mut c = ctx.base;
    c.grad = transform;
    if ctx.per_row_bias
        && let Some(steps) = tb.steps.as_deref_mut()
    {
        let s = &mut steps[local];
        *s = s.saturating_add(1);
        c.lr_t = bias_corrected_lr(ctx.bias_correction, ctx.lr, c.beta1, c.beta2, *s);
    }
    if ctx.catch_up
        && let Some(last) = tb.last.as_deref_mut()
    {
        let l = &mut last[local];
        if *l > 0 && ctx.t > *l + 1 {
            let k = ctx.t - *l - 1;
            c.m_pre_decay = pow_k(c.beta1, k);
            c.v_pre_decay = pow_k(c.beta2, k);
        }
        *l = ctx.t;
    }
    if let Some(seed) = ctx.sr_seed {
        c.rounding = Rounding::Stochastic {
            seed,
            offset: ((row + ctx.row_offset) as u64).wrapping_mul(rl as u64),
        };
    }
    let p = &mut tb.param[range.clone()];
    let m = &mut tb.m[range.clone()];
    let v = &mut tb.v[range.clone()];
    match (ctx.amsgrad, tb.vhat.as_deref_mut()) {
        (true, Some(vh)) => ctx.k.adam_row_amsgrad(&c, p, m, v, &mut vh[range], grad),
        _ => ctx.k.adam_row(&c, p, m, v, grad),
    }
}

/// How many distinct rows ahead the row loops prefetch.
const PREFETCH_AHEAD: usize = 4;

/// Hints the CPU to load `s[start..start + len]` into the cache (rows of a
/// large table are at random places; prefetching a few rows ahead overlaps
/// their cache and TLB misses). Out-of-range requests are ignored.
#[inline(always)]
fn prefetch<T>(s: &[T], start: usize, len: usize) {
    #[cfg(target_arch = "x86_64")]
    if let Some(part) = s.get(start..start + len) {
        let base = part.as_ptr() as *const i8;
        let bytes = core::mem::size_of_val(part);
        let mut off = 0;
        while off < bytes {
            // SAFETY: `_mm_prefetch` is only a cache hint: it has no architectural
            // effect and never faults; the address is inside `part` anyway. SSE is
            // part of the x86_64 baseline, so the target feature is present.
            unsafe {
                core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(
                    base.wrapping_add(off),
                )
            };
            off += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (s, start, len);
}

/// Prefetches the parameter and moment rows of absolute row `row`.
#[inline(always)]
fn prefetch_row<P, M>(tb: &Tables<'_, P, M>, row: usize, rl: usize) {
    let start = (row - tb.base_row) * rl;
    prefetch(tb.param, start, rl);
    prefetch(tb.m, start, rl);
    prefetch(tb.v, start, rl);
}

/// The distinct rows of a step and their occurrences (see [`Dedup`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct RowList<'a> {
    /// Distinct rows, in increasing row order.
    pub distinct: &'a [Distinct],
    /// [`Dedup::sorted`].
    pub sorted: &'a [u64],
    /// [`Dedup::pos_mask`].
    pub pos_mask: u64,
}

impl<'a> RowList<'a> {
    pub(crate) fn new(d: &'a Dedup) -> Self {
        RowList {
            distinct: &d.distinct,
            sorted: &d.sorted,
            pos_mask: d.pos_mask,
        }
    }

    /// Positions (in the id list) of the occurrences of a duplicated row `d`
    /// (`d.count > 1`), in occurrence order.
    pub(crate) fn occurrences(&self, d: &Distinct) -> impl Iterator<Item = usize> + use<'a> {
        let mask = self.pos_mask;
        self.sorted[d.pos..d.pos + d.count]
            .iter()
            .map(move |&x| (x & mask) as usize)
    }

    /// Position (in the id list) of the first occurrence of `d`.
    #[inline]
    fn first(&self, d: &Distinct) -> usize {
        if d.count == 1 {
            d.pos
        } else {
            (self.sorted[d.pos] & self.pos_mask) as usize
        }
    }
}

/// Buffers of [`rows_seq`], kept across steps.
#[derive(Debug, Default)]
pub(crate) struct RowScratch {
    /// The accumulator row of a duplicated id.
    pub acc: Vec<f32>,
    /// The positions of its occurrences.
    pub pos: Vec<usize>,
}

/// Updates the distinct rows sequentially. A row occurring once takes the
/// fused path (the transform inside `adam_row`); the occurrences of a
/// duplicated row are summed in occurrence order into `sc.acc` by one
/// `sum_rows_at` call (the first loaded as by `load_row`, the others added as
/// by `accumulate_row`), which then updates the row with the identity
/// transform. Both give the same bits for a row occurring once, since the
/// transform is the same IEEE operations either way (`load_row` then
/// identity, or fused).
fn rows_seq<P: Element, G: Element, M: Element>(
    ctx: &StepCtx,
    tb: &mut Tables<'_, P, M>,
    list: RowList<'_>,
    values: &[G],
    sc: &mut RowScratch,
) -> Result<(), KernelError> {
    let rl = ctx.row_len;
    let t = ctx.transform;
    let grad_row = |p: usize| &values[p * rl..(p + 1) * rl];
    for (i, d) in list.distinct.iter().enumerate() {
        if let Some(ahead) = list.distinct.get(i + PREFETCH_AHEAD) {
            prefetch_row(tb, ahead.row, rl);
            prefetch(values, list.first(ahead) * rl, rl);
        }
        if d.count == 1 {
            update_row(ctx, tb, d.row, grad_row(d.pos), t)?;
        } else {
            sc.pos.clear();
            sc.pos.extend(list.occurrences(d));
            sc.acc.resize(rl, 0.0);
            let acc = &mut sc.acc[..rl];
            ctx.k.sum_rows_at(acc, values, &sc.pos, &t)?;
            update_row(ctx, tb, d.row, acc, GradTransform::default())?;
        }
    }
    Ok(())
}

/// Buffers of [`rows_hashed`], kept across steps.
#[derive(Debug, Default)]
pub(crate) struct HashedScratch {
    /// One f32 accumulator row per distinct row.
    pub acc: Vec<f32>,
    /// (row, accumulator index) pairs of the parallel split.
    pub order: Vec<(usize, u32)>,
}

/// Updates the distinct rows of a [`RowHash`].
///
/// First every occurrence's gradient row is added, in occurrence order, into
/// its distinct row's f32 accumulator (one `accumulate_rows` call): the
/// gradient rows are read once, in order, and the accumulators stay in cache.
/// The accumulators start at -0.0, and -0.0 + x is x for every x (+0.0
/// included; a signalling NaN comes out quiet, which the update's arithmetic
/// does to it anyway), so a row's sum has the bits of the sorted path's
/// `load_row` then `accumulate_row`. Then the rows are updated from their
/// accumulators with the identity transform, which for a row occurring once
/// gives the bits of the fused transform (see [`rows_seq`]): with one
/// `adam_rows` call, or row by row when the coefficients vary by row, or in
/// parallel over disjoint row ranges when `ctx.parallel`.
pub(crate) fn rows_hashed<P: Element, G: Element, M: Element>(
    ctx: &StepCtx,
    mut tb: Tables<'_, P, M>,
    hash: &RowHash,
    values: &[G],
    sc: &mut HashedScratch,
) -> Result<(), KernelError> {
    let rl = ctx.row_len;
    let need = hash.rows.len() * rl;
    let acc = &mut sc.acc;
    acc.clear();
    acc.resize(need, -0.0);
    ctx.k
        .accumulate_rows(acc, rl, &hash.slot_of, values, &ctx.transform)?;
    // Row by row: per-row coefficients, or a parallel split (never without rayon).
    if ctx.parallel || ctx.per_row_bias || ctx.catch_up || ctx.amsgrad {
        sc.order.clear();
        sc.order
            .extend(hash.rows.iter().enumerate().map(|(k, &r)| (r, k as u32)));
        #[cfg(feature = "rayon")]
        if ctx.parallel {
            let leaf_rows = (LEAF_ELEMENTS / rl.max(1)).max(1);
            return hashed_par(ctx, tb, &mut sc.order, acc, leaf_rows);
        }
        return update_pairs(ctx, &mut tb, &sc.order, acc);
    }
    let mut c = ctx.base;
    if let Some(seed) = ctx.sr_seed {
        // Row `r` gets offset `(row_offset + r) * rl` (its place in the
        // whole table), as in `update_row`.
        c.rounding = Rounding::Stochastic {
            seed,
            offset: (ctx.row_offset as u64).wrapping_mul(rl as u64),
        };
    }
    debug_assert_eq!(tb.base_row, 0);
    ctx.k
        .adam_rows(&c, tb.param, tb.m, tb.v, rl, &hash.rows, acc)
}

/// Updates each `(row, k)` of `order` from accumulator row `k`, one
/// `update_row` at a time (per-row coefficients), prefetching rows ahead.
fn update_pairs<P: Element, M: Element>(
    ctx: &StepCtx,
    tb: &mut Tables<'_, P, M>,
    order: &[(usize, u32)],
    acc: &[f32],
) -> Result<(), KernelError> {
    let rl = ctx.row_len;
    for (j, &(row, k)) in order.iter().enumerate() {
        if let Some(&(ahead, _)) = order.get(j + PREFETCH_AHEAD) {
            prefetch_row(tb, ahead, rl);
        }
        let k = k as usize;
        update_row(
            ctx,
            tb,
            row,
            &acc[k * rl..(k + 1) * rl],
            GradTransform::default(),
        )?;
    }
    Ok(())
}

/// The parallel part of [`rows_hashed`]: splits `order` (distinct rows) at its
/// median row, so that the two halves own disjoint row ranges of the tables,
/// and recurses with `rayon::join` down to `leaf_rows` rows.
#[cfg(feature = "rayon")]
fn hashed_par<P: Element, M: Element>(
    ctx: &StepCtx,
    mut tb: Tables<'_, P, M>,
    order: &mut [(usize, u32)],
    acc: &[f32],
    leaf_rows: usize,
) -> Result<(), KernelError> {
    if order.len() <= leaf_rows {
        return update_pairs(ctx, &mut tb, order, acc);
    }
    // Rows are distinct: everything left of `mid` is below `split_row`, the
    // rest at or above it.
    let mid = order.len() / 2;
    order.select_nth_unstable_by_key(mid, |p| p.0);
    let split_row = order[mid].0;
    let (left, right) = tb.split_at_row(split_row, ctx.row_len);
    let (a, b) = order.split_at_mut(mid);
    let (ra, rb) = rayon::join(
        || hashed_par(ctx, left, a, acc, leaf_rows),
        || hashed_par(ctx, right, b, acc, leaf_rows),
    );
    ra.and(rb)
}

/// Updates the distinct rows (in increasing row order), splitting the tables
/// into disjoint row ranges for rayon tasks when `ctx.parallel`. `sc` is
/// the scratch of the sequential path.
pub(crate) fn rows<P: Element, G: Element, M: Element>(
    ctx: &StepCtx,
    mut tb: Tables<'_, P, M>,
    list: RowList<'_>,
    values: &[G],
    sc: &mut RowScratch,
) -> Result<(), KernelError> {
    #[cfg(feature = "rayon")]
    if ctx.parallel {
        let leaf_rows = (LEAF_ELEMENTS / ctx.row_len.max(1)).max(1);
        return rows_par(ctx, tb, list, values, leaf_rows);
    }
    rows_seq(ctx, &mut tb, list, values, sc)
}

#[cfg(feature = "rayon")]
fn rows_par<P: Element, G: Element, M: Element>(
    ctx: &StepCtx,
    mut tb: Tables<'_, P, M>,
    list: RowList<'_>,
    values: &[G],
    leaf_rows: usize,
) -> Result<(), KernelError> {
    let n = list.distinct.len();
    if n <= leaf_rows.max(1) {
        return rows_seq(ctx, &mut tb, list, values, &mut RowScratch::default());
    }
    // The rows are increasing: every row left of `mid` is below `split_row`.
    let mid = n / 2;
    let split_row = list.distinct[mid].row;
    let (left, right) = tb.split_at_row(split_row, ctx.row_len);
    let (a, b) = list.distinct.split_at(mid);
    let (ra, rb) = rayon::join(
        || {
            rows_par(
                ctx,
                left,
                RowList {
                    distinct: a,
                    ..list
                },
                values,
                leaf_rows,
            )
        },
        || {
            rows_par(
                ctx,
                right,
                RowList {
                    distinct: b,
                    ..list
                },
                values,
                leaf_rows,
            )
        },
    );
    ra.and(rb)
}

/// Ordinary Adam on every element of a dense variable, in chunks over rayon
/// tasks when `ctx.parallel`. `offset` is the flat index of `param[0]`.
pub(crate) fn dense<P: Element, G: Element, M: Element>(
    ctx: &StepCtx,
    param: &mut [P],
    m: &mut [M],
    v: &mut [M],
    vhat: Option<&mut [M]>,
    grad: &[G],
    offset: usize,
) -> Result<(), KernelError> {
    #[cfg(feature = "rayon")]
    if ctx.parallel {
        // Large variables: halves while they are at least 2 * DENSE_LEAF_ELEMENTS long;
        // smaller ones: while they are over LEAF_ELEMENTS long.
        let split_above = if param.len() >= 2 * DENSE_LEAF_ELEMENTS {
            2 * DENSE_LEAF_ELEMENTS - 1
        } else {
            LEAF_ELEMENTS
        };
        return dense_par(ctx, param, m, v, vhat, grad, offset, split_above);
    }
    dense_leaf(ctx, param, m, v, vhat, grad, offset)
}

/// The parallel part of [`dense`]: halves (at a multiple of 64 elements) the
/// pieces over `split_above` elements.
#[cfg(feature = "rayon")]
#[allow(clippy::too_many_arguments)]
fn dense_par<P: Element, G: Element, M: Element>(
    ctx: &StepCtx,
    param: &mut [P],
    m: &mut [M],
    v: &mut [M],
    vhat: Option<&mut [M]>,
    grad: &[G],
    offset: usize,
    split_above: usize,
) -> Result<(), KernelError> {
    let mid = (param.len() / 2).div_ceil(64) * 64;
    if param.len() <= split_above || mid >= param.len() {
        return dense_leaf(ctx, param, m, v, vhat, grad, offset);
    }
    let (p0, p1) = param.split_at_mut(mid);
    let (m0, m1) = m.split_at_mut(mid);
    let (v0, v1) = v.split_at_mut(mid);
    let (h0, h1) = split_opt(vhat, mid);
    let (g0, g1) = grad.split_at(mid);
    let (a, b) = rayon::join(
        || dense_par(ctx, p0, m0, v0, h0, g0, offset, split_above),
        || dense_par(ctx, p1, m1, v1, h1, g1, offset + mid, split_above),
    );
    a.and(b)
}

/// One task's piece of [`dense`].
fn dense_leaf<P: Element, G: Element, M: Element>(
    ctx: &StepCtx,
    param: &mut [P],
    m: &mut [M],
    v: &mut [M],
    vhat: Option<&mut [M]>,
    grad: &[G],
    offset: usize,
) -> Result<(), KernelError> {
    let mut c = ctx.base;
    c.grad = ctx.transform;
    if let Some(seed) = ctx.sr_seed {
        c.rounding = Rounding::Stochastic {
            seed,
            offset: offset as u64,
        };
    }
    match (ctx.amsgrad, vhat) {
        (true, Some(vh)) => ctx.k.adam_row_amsgrad(&c, param, m, v, vh, grad),
        _ => ctx.k.adam_row(&c, param, m, v, grad),
    }
}
