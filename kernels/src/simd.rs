//! The generic vector implementation, instantiated once per ISA.
//!
//! Each ISA provides a zero-sized token implementing [`Simd`]; the functions here are written
//! once against that trait and are `#[inline(always)]`, so that each ISA's
//! `#[target_feature]` entry points (in `arch/`) get a fully inlined copy compiled for their
//! instruction set. The operations are exactly those of the scalar reference, lane by lane.
//!
//! Tails (the last `len % LANES` elements) are copied into zero-padded stack buffers, run
//! through the same vector step, and copied back: same operations, so the same bits, and
//! nothing is ever read or written outside the given slices.

use crate::{AdamCoeffs, DType, Element, GradTransform, Rounding, SquareSum, exact, scalar};

/// The widest vector, in f32 lanes (AVX-512).
pub(crate) const MAX_LANES: usize = 16;

/// Vectors per iteration of the Adam row loop with f32 storage; the last of them uses
/// [`Simd::sqrt_alt`].
const ALT_UNROLL: usize = 3;

/// The vector operations a path provides. `LANES` is 8 or 16 (a multiple of 8, so that the
/// sum-of-squares lanes line up).
///
/// # Safety
///
/// A value of an implementing type may only exist if the CPU supports the instructions its
/// methods use; the methods rely on that.
pub(crate) unsafe trait Simd: Copy {
    /// A vector of `LANES` f32.
    type F: Copy;
    /// Eight f64 sum-of-squares accumulators.
    type Acc: Copy;
    /// f32 lanes per vector.
    const LANES: usize;

    /// Broadcast.
    fn splat(self, x: f32) -> Self::F;
    /// `a + b`.
    fn add(self, a: Self::F, b: Self::F) -> Self::F;
    /// `a - b`.
    fn sub(self, a: Self::F, b: Self::F) -> Self::F;
    /// `a * b`.
    fn mul(self, a: Self::F, b: Self::F) -> Self::F;
    /// `a / b`.
    fn div(self, a: Self::F, b: Self::F) -> Self::F;
    /// Correctly rounded square root.
    fn sqrt(self, a: Self::F) -> Self::F;
    /// The same correctly rounded square root computed on other execution units, where the
    /// path has such a sequence (AVX-512): some of a loop's roots use it so that the
    /// divider, which the division and `sqrt` share, is less of a bottleneck.
    #[inline(always)]
    fn sqrt_alt(self, a: Self::F) -> Self::F {
        self.sqrt(a)
    }
    /// Sign flip (also of zeros and NaN), as scalar `-x`.
    fn neg(self, a: Self::F) -> Self::F;
    /// `if g > c { c } else if g < nc { nc } else { g }` (NaN compares false).
    fn clip(self, g: Self::F, c: Self::F, nc: Self::F) -> Self::F;
    /// `if a >= b { a } else { b }` (NaN compares false).
    fn ge_select(self, a: Self::F, b: Self::F) -> Self::F;

    /// Loads `LANES` f32.
    ///
    /// # Safety
    ///
    /// `p` must be valid for reading `LANES` f32 (no alignment required).
    unsafe fn load_f32(self, p: *const f32) -> Self::F;
    /// Stores `LANES` f32.
    ///
    /// # Safety
    ///
    /// `p` must be valid for writing `LANES` f32 (no alignment required).
    unsafe fn store_f32(self, p: *mut f32, x: Self::F);
    /// Loads `LANES` f16 (raw bits), widening exactly.
    ///
    /// # Safety
    ///
    /// `p` must be valid for reading `LANES` u16 (no alignment required).
    unsafe fn load_f16(self, p: *const u16) -> Self::F;
    /// Stores `LANES` f16 rounded to nearest-even (NaN as `half`: quiet bit set, payload
    /// truncated).
    ///
    /// # Safety
    ///
    /// `p` must be valid for writing `LANES` u16 (no alignment required).
    unsafe fn store_f16(self, p: *mut u16, x: Self::F);
    /// Loads `LANES` bf16 (raw bits), widening exactly (a shift).
    ///
    /// # Safety
    ///
    /// `p` must be valid for reading `LANES` u16 (no alignment required).
    unsafe fn load_bf16(self, p: *const u16) -> Self::F;
    /// Stores `LANES` bf16 rounded to nearest-even, with `half`'s NaN handling.
    ///
    /// # Safety
    ///
    /// `p` must be valid for writing `LANES` u16 (no alignment required).
    unsafe fn store_bf16(self, p: *mut u16, x: Self::F);

    /// Hints that the cache line holding `p` will be read soon (no-op where unsupported).
    /// Never faults, whatever the address.
    #[inline(always)]
    fn prefetch<T>(self, p: *const T) {
        let _ = p;
    }

    /// How this path sums exact squares (`exact::Bins` or a vector implementation).
    type Squares: exact::Squares;
    /// Empty exact-square accumulators.
    fn squares(self) -> Self::Squares;

    /// Zeroed accumulators.
    fn acc_zero(self) -> Self::Acc;
    /// Adds the squares (in f64) of the `LANES` elements: lane `j` goes to accumulator
    /// `j % 8`, in lane order.
    fn acc_add_squares(self, acc: Self::Acc, x: Self::F) -> Self::Acc;
    /// The eight accumulators.
    fn acc_to_array(self, acc: Self::Acc) -> [f64; 8];

    /// Lane by lane, as u32 bits: the larger of `m` and `x`'s magnitude bits
    /// (`bits(x) & 0x7FFF_FFFF`, which order as the magnitudes do, a NaN's above an
    /// infinity's). A vector loop's running largest magnitude, from `splat(0.0)`.
    fn max_abs_bits(self, m: Self::F, x: Self::F) -> Self::F;
    /// The largest lane of `m`, as u32 bits.
    fn max_lane_bits(self, m: Self::F) -> u32;
}

/// Loads `LANES` elements of type `E`.
///
/// # Safety
///
/// `p` must be valid for reading `S::LANES` elements.
#[inline(always)]
unsafe fn load<S: Simd, E: Element>(s: S, p: *const E) -> S::F {
    // SAFETY: f16 and bf16 are `repr(transparent)` over u16; the caller guarantees the range.
    unsafe {
        match E::DTYPE {
            DType::F32 => s.load_f32(p.cast()),
            DType::F16 => s.load_f16(p.cast()),
            DType::BF16 => s.load_bf16(p.cast()),
        }
    }
}

/// Stores `LANES` elements of type `E`, rounding to nearest-even.
///
/// # Safety
///
/// `p` must be valid for writing `S::LANES` elements.
#[inline(always)]
unsafe fn store<S: Simd, E: Element>(s: S, p: *mut E, x: S::F) {
    // SAFETY: f16 and bf16 are `repr(transparent)` over u16; the caller guarantees the range.
    unsafe {
        match E::DTYPE {
            DType::F32 => s.store_f32(p.cast(), x),
            DType::F16 => s.store_f16(p.cast(), x),
            DType::BF16 => s.store_bf16(p.cast(), x),
        }
    }
}

/// The gradient transform with its constants broadcast once.
#[derive(Clone, Copy)]
struct Transform<F> {
    scale: Option<F>,
    clip: Option<(F, F)>,
    negate: bool,
}

impl<F: Copy> Transform<F> {
    #[inline(always)]
    fn new<S: Simd<F = F>>(s: S, t: &GradTransform) -> Self {
        Transform {
            scale: if t.scale != 1.0 {
                Some(s.splat(t.scale))
            } else {
                None
            },
            clip: t.clip.map(|c| (s.splat(c), s.splat(-c))),
            negate: t.negate,
        }
    }

    /// Whether [`Transform::apply`] returns its input unchanged (no scale, clip or negation).
    #[inline(always)]
    fn is_identity(&self) -> bool {
        self.scale.is_none() && self.clip.is_none() && !self.negate
    }

    #[inline(always)]
    fn apply<S: Simd<F = F>>(&self, s: S, mut g: F) -> F {
        if let Some(k) = self.scale {
            g = s.mul(g, k);
        }
        if let Some((c, nc)) = self.clip {
            g = s.clip(g, c, nc);
        }
        if self.negate {
            g = s.neg(g);
        }
        g
    }
}

/// Broadcast Adam coefficients.
#[derive(Clone, Copy)]
struct Coeffs<F> {
    t: Transform<F>,
    lr_t: F,
    beta1: F,
    omb1: F,
    beta2: F,
    omb2: F,
    eps: F,
    wd: Option<F>,
    m_pre: Option<F>,
    v_pre: Option<F>,
    /// Stochastic rounding of the parameters: (key, offset).
    sr: Option<(u64, u64)>,
}

impl<F: Copy> Coeffs<F> {
    /// No optional part is active other than a gradient scale (a clipping factor, a loss
    /// scale's unscale): the common cases, which the row loops compile without the others.
    #[inline(always)]
    fn is_plain(&self) -> bool {
        self.t.clip.is_none()
            && !self.t.negate
            && self.wd.is_none()
            && self.m_pre.is_none()
            && self.v_pre.is_none()
            && self.sr.is_none()
    }

    #[inline(always)]
    fn new<S: Simd<F = F>, P: Element>(s: S, c: &AdamCoeffs) -> Self {
        let opt = |x: f32, neutral: f32| if x != neutral { Some(s.splat(x)) } else { None };
        Coeffs {
            t: Transform::new(s, &c.grad),
            lr_t: s.splat(c.lr_t),
            beta1: s.splat(c.beta1),
            omb1: s.splat(c.one_minus_beta1),
            beta2: s.splat(c.beta2),
            omb2: s.splat(c.one_minus_beta2),
            eps: s.splat(c.epsilon),
            wd: opt(c.weight_decay, 0.0),
            m_pre: opt(c.m_pre_decay, 1.0),
            v_pre: opt(c.v_pre_decay, 1.0),
            sr: match c.rounding {
                Rounding::Stochastic { seed, offset } if P::DTYPE != DType::F32 => {
                    Some((scalar::sr_key(seed), offset))
                }
                _ => None,
            },
        }
    }
}

/// Stores parameters, with stochastic rounding per lane when asked. `index` is the row index
/// of lane 0.
///
/// # Safety
///
/// `p` must be valid for writing `S::LANES` elements.
#[inline(always)]
unsafe fn store_param<S: Simd, P: Element>(
    s: S,
    p: *mut P,
    x: S::F,
    sr: Option<(u64, u64)>,
    index: usize,
) {
    match sr {
        None => {
            // SAFETY: forwarded from the caller.
            unsafe { store::<S, P>(s, p, x) }
        }
        Some((key, offset)) => {
            let mut buf = [0.0f32; MAX_LANES];
            // SAFETY: `buf` holds MAX_LANES >= LANES f32; `p` is valid for LANES elements.
            unsafe {
                s.store_f32(buf.as_mut_ptr(), x);
                for (j, &xj) in buf.iter().enumerate().take(S::LANES) {
                    *p.add(j) = scalar::round_to::<P>(xj, key, offset, index + j, true);
                }
            }
        }
    }
}

/// The second-moment part of one vector step of Adam on `LANES` elements: returns the
/// gradient (transformed), the new `v` (for the caller to store) and the denominator
/// `sqrt(d) + eps`; with `AMS` it updates `vh` in place. With `PLAIN`, the optional parts
/// other than the gradient scale (all neutral, checked by the caller) are compiled out, and
/// the scale is one multiply with `SCALE` and compiled out without it (it is then 1); with
/// `ALT` the root is [`Simd::sqrt_alt`] (same bits). A plain scaled step multiplies as
/// [`Transform::apply`] does, so it gives the same bits as the general one.
///
/// # Safety
///
/// `v` and `g` (and `vh` if `AMS`) must be valid for `S::LANES` elements, and `v` and `vh`
/// must not alias each other or `g`.
#[inline(always)]
#[allow(clippy::type_complexity)]
unsafe fn adam_v<
    S: Simd,
    G: Element,
    M: Element,
    const AMS: bool,
    const PLAIN: bool,
    const SCALE: bool,
    const ALT: bool,
>(
    s: S,
    k: &Coeffs<S::F>,
    v: *mut M,
    vh: *mut M,
    g: *const G,
) -> (S::F, S::F, S::F) {
    // SAFETY: the caller guarantees every pointer is valid for LANES elements.
    unsafe {
        let mut g = load::<S, G>(s, g);
        let mut v0 = load::<S, M>(s, v);
        if PLAIN {
            if SCALE && let Some(scale) = k.t.scale {
                g = s.mul(g, scale);
            }
        } else {
            g = k.t.apply(s, g);
            if let Some(d) = k.v_pre {
                v0 = s.mul(v0, d);
            }
        }
        let v1 = s.add(s.mul(k.beta2, v0), s.mul(k.omb2, s.mul(g, g)));
        let d = if AMS {
            let vh1 = s.ge_select(load::<S, M>(s, vh), v1);
            store::<S, M>(s, vh, vh1);
            vh1
        } else {
            v1
        };
        let root = if ALT { s.sqrt_alt(d) } else { s.sqrt(d) };
        (g, v1, s.add(root, k.eps))
    }
}

/// The first-moment part of one vector step of Adam: the new `m` (for the caller to store)
/// from the gradient `g` that [`adam_v`] returned.
///
/// # Safety
///
/// `m` must be valid for reading `S::LANES` elements.
#[inline(always)]
unsafe fn adam_m<S: Simd, M: Element, const PLAIN: bool>(
    s: S,
    k: &Coeffs<S::F>,
    m: *const M,
    g: S::F,
) -> S::F {
    // SAFETY: forwarded from the caller.
    let mut m0 = unsafe { load::<S, M>(s, m) };
    if !PLAIN && let Some(d) = k.m_pre {
        m0 = s.mul(m0, d);
    }
    s.add(s.mul(k.beta1, m0), s.mul(k.omb1, g))
}

/// The step `lr_t * m1 / den` that [`adam_apply`] subtracts from the parameters.
#[inline(always)]
fn adam_quotient<S: Simd>(s: S, k: &Coeffs<S::F>, m1: S::F, den: S::F) -> S::F {
    s.div(s.mul(k.lr_t, m1), den)
}

/// The parameter half of one vector step of Adam: `p = p - step` (after the decoupled weight
/// decay, when not `PLAIN`). `index` is the row index of lane 0.
///
/// # Safety
///
/// `p` must be valid for reading and writing `S::LANES` elements.
#[inline(always)]
unsafe fn adam_apply<S: Simd, P: Element, const PLAIN: bool>(
    s: S,
    k: &Coeffs<S::F>,
    p: *mut P,
    step: S::F,
    index: usize,
) {
    // SAFETY: the caller guarantees `p` is valid for LANES elements.
    unsafe {
        let mut p0 = load::<S, P>(s, p);
        if !PLAIN && let Some(wd) = k.wd {
            p0 = s.sub(p0, s.mul(wd, p0));
        }
        let p1 = s.sub(p0, step);
        if PLAIN {
            store::<S, P>(s, p, p1);
        } else {
            store_param::<S, P>(s, p, p1, k.sr, index);
        }
    }
}

/// One vector step of Adam on `LANES` elements at the given pointers ([`adam_v`],
/// [`adam_m`], [`adam_apply`]); `index` is the row index of lane 0.
///
/// # Safety
///
/// Every pointer must be valid for `S::LANES` elements (`vh` only if `AMS`), and the
/// mutable ones must not alias each other or `g`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn adam_step<
    S: Simd,
    P: Element,
    G: Element,
    M: Element,
    const AMS: bool,
    const PLAIN: bool,
    const SCALE: bool,
    const ALT: bool,
>(
    s: S,
    k: &Coeffs<S::F>,
    p: *mut P,
    m: *mut M,
    v: *mut M,
    vh: *mut M,
    g: *const G,
    index: usize,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        // Every load before the stores: loading `p` after storing `m` and `v` measured 1.3x
        // slower on 4096-element f32 rows (1.59 against 1.20 us; likely loads waiting on
        // earlier stores to addresses equal modulo 4 KiB).
        let (g, v1, den) = adam_v::<S, G, M, AMS, PLAIN, SCALE, ALT>(s, k, v, vh, g);
        let m1 = adam_m::<S, M, PLAIN>(s, k, m, g);
        adam_apply::<S, P, PLAIN>(s, k, p, adam_quotient(s, k, m1, den), index);
        store::<S, M>(s, m, m1);
        store::<S, M>(s, v, v1);
    }
}

/// Copies `src` into the start of `buf` (the rest keeps its default value).
#[inline(always)]
fn pad<E: Element>(src: &[E]) -> [E; MAX_LANES] {
    let mut buf = [E::default(); MAX_LANES];
    buf[..src.len()].copy_from_slice(src);
    buf
}

/// Calls the row loop `$body` compiled for the optional parts the coefficients `$k` use:
/// `PLAIN` (the const parameter after `$body`'s own) when none but a gradient scale is active,
/// and `SCALE` when that scale is there. The general loop (`PLAIN` false) tests every part.
macro_rules! by_loop_variant {
    ($k:expr, $body:ident::<$($g:ident),*>($($a:expr),* $(,)?)) => {
        match ($k.is_plain(), $k.t.scale.is_some()) {
            (true, false) => $body::<$($g,)* true, false>($($a),*),
            (true, true) => $body::<$($g,)* true, true>($($a),*),
            (false, _) => $body::<$($g,)* false, false>($($a),*),
        }
    };
}

/// Adam over a row. `vhat` is used iff `AMS`; every slice has `param.len()` elements (checked
/// by the caller; `vhat` may be empty when `!AMS`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn adam_row<S: Simd, P: Element, G: Element, M: Element, const AMS: bool>(
    s: S,
    split: bool,
    c: &AdamCoeffs,
    param: &mut [P],
    m: &mut [M],
    v: &mut [M],
    vhat: &mut [M],
    grad: &[G],
) {
    let k = Coeffs::new::<S, P>(s, c);
    by_loop_variant!(
        k,
        adam_body::<S, P, G, M, AMS>(s, split, &k, param, m, v, vhat, grad, 0)
    )
}

/// Adam over rows `rows[k]` of row-major tables (`row_len` elements per row) with the
/// gradient rows `grads[k * row_len..]`, in order. Checked by the caller: the tables have the
/// same length, a multiple of `row_len > 0`, every row is in range and `grads` holds
/// `rows.len()` rows. Row `r` is updated exactly as `adam_row` on its slices with the rounding
/// offset advanced by `r * row_len`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn adam_rows<S: Simd, P: Element, G: Element, M: Element>(
    s: S,
    split: bool,
    c: &AdamCoeffs,
    param: &mut [P],
    m: &mut [M],
    v: &mut [M],
    row_len: usize,
    rows: &[usize],
    grads: &[G],
) {
    let k = Coeffs::new::<S, P>(s, c);
    by_loop_variant!(
        k,
        rows_body::<S, P, G, M>(s, split, &k, param, m, v, row_len, rows, grads)
    )
}

/// Hints the CPU to load the `len` elements from `p` (every 64-byte line they start in
/// from `p` on). A hint only: nothing is read, and `p` need not be in range.
#[inline(always)]
fn prefetch_elements<S: Simd, T>(s: S, p: *const T, len: usize) {
    let p = p as *const u8;
    for l in 0..(len * core::mem::size_of::<T>()).div_ceil(64) {
        s.prefetch(p.wrapping_add(64 * l));
    }
}

/// How many rows ahead [`adam_rows`] prefetches its table rows.
const ROWS_AHEAD: usize = 4;

/// The loop of [`adam_rows`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rows_body<S: Simd, P: Element, G: Element, M: Element, const PLAIN: bool, const SCALE: bool>(
    s: S,
    split: bool,
    k: &Coeffs<S::F>,
    param: &mut [P],
    m: &mut [M],
    v: &mut [M],
    row_len: usize,
    rows: &[usize],
    grads: &[G],
) {
    for (j, (&r, g)) in rows.iter().zip(grads.chunks_exact(row_len)).enumerate() {
        if let Some(&ahead) = rows.get(j + ROWS_AHEAD) {
            // Rows of a large table are at random places: start their cache and TLB misses
            // early. Hints only; the addresses are in range anyway (checked by the caller).
            let at = ahead * row_len;
            prefetch_elements(s, param.as_ptr().wrapping_add(at), row_len);
            prefetch_elements(s, m.as_ptr().wrapping_add(at), row_len);
            prefetch_elements(s, v.as_ptr().wrapping_add(at), row_len);
        }
        let range = r * row_len..(r + 1) * row_len;
        // The rounding index of the row's first element is its place in the table.
        adam_body::<S, P, G, M, false, PLAIN, SCALE>(
            s,
            split,
            k,
            &mut param[range.clone()],
            &mut m[range.clone()],
            &mut v[range.clone()],
            &mut [],
            g,
            range.start,
        );
    }
}

/// `acc[slots[i] * row_len..][..row_len] += transform(src[i * row_len..][..row_len])` for
/// every `i`, in order. Checked by the caller: `row_len > 0`, `acc` holds whole rows, every
/// slot is in range and `src` holds `slots.len()` rows.
#[inline(always)]
pub(crate) fn accumulate_rows<S: Simd, G: Element>(
    s: S,
    acc: &mut [f32],
    row_len: usize,
    slots: &[u32],
    src: &[G],
    t: &GradTransform,
) {
    for (&slot, g) in slots.iter().zip(src.chunks_exact(row_len)) {
        let at = slot as usize * row_len;
        load_row::<S, G, true>(s, &mut acc[at..at + row_len], g, t);
    }
}

/// How many positions ahead [`sum_rows_at`] prefetches its gradient rows.
const SUM_AHEAD: usize = 4;

/// The gradient rows `src[p * n..(p + 1) * n]` (`n = dst.len()`) at `positions`, summed into
/// `dst` in order: the first with [`load_row`], the others with its accumulating form, so the
/// bits of those calls. The caller checks that every row lies inside `src`.
#[inline(always)]
pub(crate) fn sum_rows_at<S: Simd, G: Element>(
    s: S,
    dst: &mut [f32],
    src: &[G],
    positions: &[usize],
    t: &GradTransform,
) {
    let t = Transform::new(s, t);
    // Without a transform the loads are plain (no per-vector test of the transform's parts).
    if t.is_identity() {
        sum_rows_body::<S, G, true>(s, &t, dst, src, positions)
    } else {
        sum_rows_body::<S, G, false>(s, &t, dst, src, positions)
    }
}

/// The loop of [`sum_rows_at`]; `ID`: the transform is the identity.
#[inline(always)]
fn sum_rows_body<S: Simd, G: Element, const ID: bool>(
    s: S,
    t: &Transform<S::F>,
    dst: &mut [f32],
    src: &[G],
    positions: &[usize],
) {
    let n = dst.len();
    let w = S::LANES;
    // Whole vectors of the row, up to 256 bytes of f32 at a time (four AVX-512 vectors, eight
    // of eight lanes), each block summed over every position in registers: an addition waits
    // on the one before it only, not on a store to `dst` and a reload. The same additions in
    // the same order as the loop below.
    let mut c = 0;
    if w >= 16 {
        while n - c >= 4 * w {
            sum_block::<S, G, ID, 4>(s, t, dst, src, positions, c);
            c += 4 * w;
        }
    } else {
        while n - c >= 8 * w {
            sum_block::<S, G, ID, 8>(s, t, dst, src, positions, c);
            c += 8 * w;
        }
        if n - c >= 4 * w {
            sum_block::<S, G, ID, 4>(s, t, dst, src, positions, c);
            c += 4 * w;
        }
    }
    if n - c >= 2 * w {
        sum_block::<S, G, ID, 2>(s, t, dst, src, positions, c);
        c += 2 * w;
    }
    if n - c >= w {
        sum_block::<S, G, ID, 1>(s, t, dst, src, positions, c);
        c += w;
    }
    if c == n {
        return;
    }
    // The rest of the row (shorter than a vector), accumulated in `dst`.
    let dst = &mut dst[c..];
    for (j, &p) in positions.iter().enumerate() {
        prefetch_position(s, src, positions, j + SUM_AHEAD, n, c, n - c);
        let g = &src[p * n + c..(p + 1) * n];
        if j == 0 {
            load_body::<S, G, false, ID>(s, t, dst, g);
        } else {
            load_body::<S, G, true, ID>(s, t, dst, g);
        }
    }
}

/// Elements `c..c + V * LANES` of [`sum_rows_body`]'s row: the first position's values, plus
/// each later position's in turn, in `V` vector registers; stored to `dst` at the end (not
/// at all without positions). The caller checks `c + V * LANES <= dst.len()`.
#[inline(always)]
fn sum_block<S: Simd, G: Element, const ID: bool, const V: usize>(
    s: S,
    t: &Transform<S::F>,
    dst: &mut [f32],
    src: &[G],
    positions: &[usize],
    c: usize,
) {
    let n = dst.len();
    let len = V * S::LANES;
    let mut acc = [s.splat(0.0); V];
    for (j, &p) in positions.iter().enumerate() {
        prefetch_position(s, src, positions, j + SUM_AHEAD, n, c, len);
        let g = &src[p * n + c..p * n + c + len];
        for (k, a) in acc.iter_mut().enumerate() {
            // SAFETY: `g` holds `V * LANES` elements.
            let x = unsafe { load_grad::<S, G, ID>(s, t, g.as_ptr().add(k * S::LANES)) };
            *a = if j == 0 { x } else { s.add(*a, x) };
        }
    }
    if positions.is_empty() {
        return;
    }
    let d = &mut dst[c..c + len];
    for (k, a) in acc.iter().enumerate() {
        // SAFETY: `d` holds `V * LANES` f32.
        unsafe { s.store_f32(d.as_mut_ptr().add(k * S::LANES), *a) };
    }
}

/// Hints elements `c..c + len` of the gradient row at `positions[i]` (rows of `n` elements
/// in `src`), if there is such a position. A hint only: the occurrences of a row lie anywhere
/// in `src`, and nothing is read.
#[inline(always)]
fn prefetch_position<S: Simd, G>(
    s: S,
    src: &[G],
    positions: &[usize],
    i: usize,
    n: usize,
    c: usize,
    len: usize,
) {
    if let Some(&p) = positions.get(i) {
        let at = p.wrapping_mul(n).wrapping_add(c);
        prefetch_elements(s, src.as_ptr().wrapping_add(at), len);
    }
}

/// Rows at least this long (unlikely to be in the first two cache levels) are updated by
/// [`adam_split`]. In cache the one-pass loop is faster: on 4096-element rows the split loop
/// measured 1.43 against 1.06 us (all f32) and 1.48 against 1.41 us (all f16), with this
/// constant lowered (`adam/all-f32/avx512/4096` and `adam/all-f16/avx512/4096`).
const SPLIT_MIN: usize = 1 << 16;

/// How far ahead (bytes, in each stream) the one-pass loop prefetches on rows of
/// [`SPLIT_MIN`] elements or more. Measured on the Intel Xeon (AVX-512, 2026-12-05),
/// `dense_16m` on 2 threads, three alternated rounds against no prefetching: at 1,024 bytes
/// f32 steps took 0.92x-0.95x the time (one thread 0.86x-0.91x), all-f16 0.70x-0.82x, f16
/// parameters with f32 moments 0.73x-0.89x, and the one-pass loop beat the split loop for
/// all-bf16 too (4.8-4.9 against 7.0-8.1 ms); 4,096 bytes measured about the same. (On the
/// AMD Zen 4 machine, prefetching on top of either loop measured slower; `LongRowLoop::Auto`
/// takes the split loop there.)
const AHEAD_BYTES: usize = 1024;

/// Hints the line [`AHEAD_BYTES`] past element `j` of `x`. A hint only: it never faults,
/// and the address may lie past the end of `x` (wrapping arithmetic, never dereferenced).
#[inline(always)]
fn prefetch_ahead<S: Simd, T>(s: S, x: &[T], j: usize) {
    s.prefetch(x.as_ptr().wrapping_add(j).wrapping_byte_add(AHEAD_BYTES));
}

/// Vectors per chunk of [`adam_split`]: a multiple of both unrolls (2 and [`ALT_UNROLL`]).
/// 576 elements with AVX-512; of 18, 36 and 72 vectors, 36 measured best over seven stream
/// placements at 2^24 elements (`adam-spacing` reruns such a comparison).
const SPLIT_VECS: usize = 36;

/// How the Adam row loops interleave vectors: `(alt, unroll)`, `unroll` independent vectors
/// per iteration (more work in flight for the long-latency square root and division), the
/// last of them taking its root from [`Simd::sqrt_alt`] when `alt`. With f32 parameters and
/// moments, three with `alt`: on AVX-512 that leaves the divider to the other vectors' roots
/// and divisions (measured: 4096-element rows 10-17% faster). With 16-bit storage the
/// conversions already keep those other units busy (measured slower), so two without.
#[inline(always)]
fn adam_unroll<P: Element, M: Element>() -> (bool, usize) {
    let alt = P::DTYPE == DType::F32 && M::DTYPE == DType::F32;
    (alt, if alt { ALT_UNROLL } else { 2 })
}

/// The row loop of [`adam_row`]; `base` is the stochastic-rounding index of `param[0]`;
/// `split`: rows of [`SPLIT_MIN`] elements or more take [`adam_split`] (`LongRowLoop::Split`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn adam_body<
    S: Simd,
    P: Element,
    G: Element,
    M: Element,
    const AMS: bool,
    const PLAIN: bool,
    const SCALE: bool,
>(
    s: S,
    split: bool,
    k: &Coeffs<S::F>,
    param: &mut [P],
    m: &mut [M],
    v: &mut [M],
    vhat: &mut [M],
    grad: &[G],
    base: usize,
) {
    if split && param.len() >= SPLIT_MIN {
        adam_split::<S, P, G, M, AMS, PLAIN, SCALE>(s, k, param, m, v, vhat, grad, base)
    } else {
        adam_direct::<S, P, G, M, AMS, PLAIN, SCALE>(s, k, param, m, v, vhat, grad, base)
    }
}

/// The row loop for long rows, in three passes over each chunk of [`SPLIT_VECS`] vectors,
/// each touching as few streams as it can: the gradient and `v` (and `vhat`), keeping each
/// vector's gradient and denominator in local buffers; then `m`, turning the denominators into
/// steps; then the parameters. Same operations per element as [`adam_direct`], so the same
/// bits; the rest of the row after the last whole chunk goes through [`adam_direct`].
///
/// Why: out of cache the one-pass loop touches four or five streams at once, and on this
/// project's AMD Zen 4 machine its time depends on where the streams lie relative to each
/// other (up to 1.9x between the placements `adam-spacing` tries). That bench times this loop
/// and the one-pass loop side by side at six stream spacings (2^24 elements, AVX-512): over
/// two runs the geometric-mean time was 2-6% lower for all-f32 rows (though 10-30% higher
/// at the two kindest spacings) and 24-25% lower for all-f16 rows, whose time no longer
/// depended much on the spacing (6.4-7.4 ms against 6.3-11.9 ms). A two-pass variant (`m`
/// with `v`) gained less for f16 (14-20%), and software prefetching on top of either measured
/// slower, so there is none.
///
/// On an Intel Xeon (AVX-512, 2026-12-05) it is the other way round: dense `dense_16m` steps
/// (leaves of 2^16 elements, 2 threads) took 0.74x-0.90x (f32) and 0.84x-1.04x (all f16) the
/// split loop's time with the one-pass loop, and 0.6x-0.8x once the one-pass loop prefetched
/// [`AHEAD_BYTES`] ahead (all bf16 included). So the loop is chosen per CPU
/// (`LongRowLoop::resolve`); both give the same bits.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn adam_split<
    S: Simd,
    P: Element,
    G: Element,
    M: Element,
    const AMS: bool,
    const PLAIN: bool,
    const SCALE: bool,
>(
    s: S,
    k: &Coeffs<S::F>,
    param: &mut [P],
    m: &mut [M],
    v: &mut [M],
    vhat: &mut [M],
    grad: &[G],
    base: usize,
) {
    let n = param.len();
    assert!(m.len() == n && v.len() == n && grad.len() == n && (!AMS || vhat.len() == n));
    let w = S::LANES;
    let chunk = SPLIT_VECS * w;
    let (alt, unroll) = adam_unroll::<P, M>();
    // Per vector of the chunk: the (transformed) gradient, then the denominator and then the
    // step of `adam_apply`.
    let mut grads = [s.splat(0.0); SPLIT_VECS];
    let mut steps = [s.splat(0.0); SPLIT_VECS];
    let mut i = 0;
    while i + chunk <= n {
        for b in (0..SPLIT_VECS).step_by(unroll) {
            for u in 0..unroll {
                let j = i + (b + u) * w;
                // SAFETY: j + LANES <= i + chunk <= n, the length of every slice (asserted
                // above); distinct `&mut` slices do not alias. When !AMS `vhat` is never
                // dereferenced.
                unsafe {
                    let (vp, gp) = (v.as_mut_ptr().add(j), grad.as_ptr().add(j));
                    let hp = if AMS {
                        vhat.as_mut_ptr().add(j)
                    } else {
                        vhat.as_mut_ptr()
                    };
                    let (g, v1, den) = if alt && u == unroll - 1 {
                        adam_v::<S, G, M, AMS, PLAIN, SCALE, true>(s, k, vp, hp, gp)
                    } else {
                        adam_v::<S, G, M, AMS, PLAIN, SCALE, false>(s, k, vp, hp, gp)
                    };
                    store::<S, M>(s, vp, v1);
                    grads[b + u] = g;
                    steps[b + u] = den;
                }
            }
        }
        for (b, (step, &g)) in steps.iter_mut().zip(grads.iter()).enumerate() {
            let mp = m[i + b * w..].as_mut_ptr();
            // SAFETY: i + b * w + LANES <= i + chunk <= n = m.len().
            unsafe {
                let m1 = adam_m::<S, M, PLAIN>(s, k, mp, g);
                store::<S, M>(s, mp, m1);
                *step = adam_quotient(s, k, m1, *step);
            }
        }
        for (b, &step) in steps.iter().enumerate() {
            let j = i + b * w;
            // SAFETY: j + LANES <= i + chunk <= n = param.len().
            unsafe { adam_apply::<S, P, PLAIN>(s, k, param.as_mut_ptr().add(j), step, base + j) }
        }
        i += chunk;
    }
    adam_direct::<S, P, G, M, AMS, PLAIN, SCALE>(
        s,
        k,
        &mut param[i..],
        &mut m[i..],
        &mut v[i..],
        if AMS { &mut vhat[i..] } else { &mut [] },
        &grad[i..],
        base + i,
    )
}

/// The row loop, one whole step per vector; `base` is the stochastic-rounding index of
/// `param[0]`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn adam_direct<
    S: Simd,
    P: Element,
    G: Element,
    M: Element,
    const AMS: bool,
    const PLAIN: bool,
    const SCALE: bool,
>(
    s: S,
    k: &Coeffs<S::F>,
    param: &mut [P],
    m: &mut [M],
    v: &mut [M],
    vhat: &mut [M],
    grad: &[G],
    base: usize,
) {
    let n = param.len();
    assert!(m.len() == n && v.len() == n && grad.len() == n && (!AMS || vhat.len() == n));
    let w = S::LANES;
    let body = n - n % w;
    let mut i = 0;
    let (alt, unroll) = adam_unroll::<P, M>();
    // A row this long only comes here when it takes the one-pass loop (`LongRowLoop`).
    let ahead = n >= SPLIT_MIN;
    while i + unroll * w <= body {
        if ahead {
            for u in 0..unroll {
                let j = i + u * w;
                prefetch_ahead(s, param, j);
                prefetch_ahead(s, m, j);
                prefetch_ahead(s, v, j);
                if AMS {
                    prefetch_ahead(s, vhat, j);
                }
                prefetch_ahead(s, grad, j);
            }
        }
        for u in 0..unroll {
            let j = i + u * w;
            // SAFETY: j + LANES <= n, the length of every slice (asserted above); distinct
            // `&mut` slices do not alias. When !AMS `vhat` is never dereferenced.
            unsafe {
                let (pp, mp, vp, gp) = (
                    param.as_mut_ptr().add(j),
                    m.as_mut_ptr().add(j),
                    v.as_mut_ptr().add(j),
                    grad.as_ptr().add(j),
                );
                let hp = if AMS {
                    vhat.as_mut_ptr().add(j)
                } else {
                    vhat.as_mut_ptr()
                };
                if alt && u == unroll - 1 {
                    adam_step::<S, P, G, M, AMS, PLAIN, SCALE, true>(
                        s,
                        k,
                        pp,
                        mp,
                        vp,
                        hp,
                        gp,
                        base + j,
                    );
                } else {
                    adam_step::<S, P, G, M, AMS, PLAIN, SCALE, false>(
                        s,
                        k,
                        pp,
                        mp,
                        vp,
                        hp,
                        gp,
                        base + j,
                    );
                }
            }
        }
        i += unroll * w;
    }
    // Fewer than `unroll` vectors left before the tail.
    while i < body {
        // SAFETY: i + LANES <= n, the length of every slice (asserted above); distinct
        // `&mut` slices do not alias. When !AMS `vhat` is never dereferenced.
        unsafe {
            adam_step::<S, P, G, M, AMS, PLAIN, SCALE, false>(
                s,
                k,
                param.as_mut_ptr().add(i),
                m.as_mut_ptr().add(i),
                v.as_mut_ptr().add(i),
                if AMS {
                    vhat.as_mut_ptr().add(i)
                } else {
                    vhat.as_mut_ptr()
                },
                grad.as_ptr().add(i),
                base + i,
            );
        }
        i += w;
    }
    if i < n {
        let r = n - i;
        let mut bp = pad(&param[i..]);
        let mut bm = pad(&m[i..]);
        let mut bv = pad(&v[i..]);
        let mut bvh = if AMS {
            pad(&vhat[i..])
        } else {
            [M::default(); MAX_LANES]
        };
        let bg = pad(&grad[i..]);
        // SAFETY: the buffers hold MAX_LANES >= LANES elements each and are distinct locals.
        unsafe {
            adam_step::<S, P, G, M, AMS, PLAIN, SCALE, false>(
                s,
                k,
                bp.as_mut_ptr(),
                bm.as_mut_ptr(),
                bv.as_mut_ptr(),
                bvh.as_mut_ptr(),
                bg.as_ptr(),
                base + i,
            );
        }
        param[i..].copy_from_slice(&bp[..r]);
        m[i..].copy_from_slice(&bm[..r]);
        v[i..].copy_from_slice(&bv[..r]);
        if AMS {
            vhat[i..].copy_from_slice(&bvh[..r]);
        }
    }
}

/// `dst = transform(src)` (or `dst += ...` when `ACC`); equal lengths checked by the caller.
#[inline(always)]
pub(crate) fn load_row<S: Simd, G: Element, const ACC: bool>(
    s: S,
    dst: &mut [f32],
    src: &[G],
    t: &GradTransform,
) {
    let t = Transform::new(s, t);
    if t.is_identity() {
        load_body::<S, G, ACC, true>(s, &t, dst, src)
    } else {
        load_body::<S, G, ACC, false>(s, &t, dst, src)
    }
}

/// [`load_row`] with the transform's constants broadcast; `ID`: the transform is the identity
/// (not applied).
#[inline(always)]
fn load_body<S: Simd, G: Element, const ACC: bool, const ID: bool>(
    s: S,
    t: &Transform<S::F>,
    dst: &mut [f32],
    src: &[G],
) {
    let n = dst.len();
    assert!(src.len() == n);
    let w = S::LANES;
    let body = n - n % w;
    let mut i = 0;
    while i < body {
        // SAFETY: i + LANES <= n, the length of both slices.
        unsafe { load_step::<S, G, ACC, ID>(s, t, dst.as_mut_ptr().add(i), src.as_ptr().add(i)) };
        i += w;
    }
    if i < n {
        let r = n - i;
        let mut bd = pad(&dst[i..]);
        let bs = pad(&src[i..]);
        // SAFETY: both buffers hold MAX_LANES >= LANES elements.
        unsafe { load_step::<S, G, ACC, ID>(s, t, bd.as_mut_ptr(), bs.as_ptr()) };
        dst[i..].copy_from_slice(&bd[..r]);
    }
}

/// One vector step of `load_row` (the transform not applied when `ID`).
///
/// # Safety
///
/// `d` and `x` must be valid for `S::LANES` elements.
#[inline(always)]
unsafe fn load_step<S: Simd, G: Element, const ACC: bool, const ID: bool>(
    s: S,
    t: &Transform<S::F>,
    d: *mut f32,
    x: *const G,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        let g = load_grad::<S, G, ID>(s, t, x);
        let r = if ACC { s.add(s.load_f32(d), g) } else { g };
        s.store_f32(d, r);
    }
}

/// One vector of gradient values as `load_row` reads them: loaded (widened to f32) and
/// transformed, unless `ID`. [`sum_rows_at`]'s register blocks read through it too, so they
/// give `load_row`'s bits.
///
/// # Safety
///
/// `x` must be valid for reading `S::LANES` elements.
#[inline(always)]
unsafe fn load_grad<S: Simd, G: Element, const ID: bool>(
    s: S,
    t: &Transform<S::F>,
    x: *const G,
) -> S::F {
    // SAFETY: forwarded from the caller.
    let x = unsafe { load::<S, G>(s, x) };
    if ID { x } else { t.apply(s, x) }
}

/// Sum of squares with the contract's lane assignment.
#[inline(always)]
pub(crate) fn sum_squares<S: Simd, G: Element>(s: S, src: &[G], t: &GradTransform) -> f64 {
    sum_squares_of::<S, G, false>(s, src, t).0
}

/// [`sum_squares`] (the same f64, the same operations in the same order) and the largest
/// magnitude's bits among the raw values (`scalar::max_abs_bits`), from one pass: each vector's
/// magnitudes are taken as it is loaded for its squares ([`Simd::max_abs_bits`]).
#[inline(always)]
pub(crate) fn sum_squares_max_abs_bits<S: Simd, G: Element>(
    s: S,
    src: &[G],
    t: &GradTransform,
) -> (f64, u32) {
    sum_squares_of::<S, G, true>(s, src, t)
}

/// The pass behind [`sum_squares`] and, with `MAX`, [`sum_squares_max_abs_bits`] (else the
/// bits are 0). Element `i` goes to lane `i % 8` in either form, so the f64 is the same.
///
/// The f64 additions form one dependency chain a vector, so the loop waits on their latency;
/// the magnitudes' integer maximum fills the idle issue slots. (It used to be a second loop
/// over each 512-value block, which cost 1.6x-2.4x the plain sum's time on `avx2`.)
#[inline(always)]
fn sum_squares_of<S: Simd, G: Element, const MAX: bool>(
    s: S,
    src: &[G],
    t: &GradTransform,
) -> (f64, u32) {
    let tr = Transform::new(s, t);
    // Without a transform the loads are plain (no per-vector test of the transform's parts).
    let (acc, vmax, i) = if tr.is_identity() {
        squares_body::<S, G, MAX, true>(s, &tr, src)
    } else {
        squares_body::<S, G, MAX, false>(s, &tr, src)
    };
    let max = if MAX {
        narrowed_max_abs_bits(s.max_lane_bits(vmax), &src[..i]).max(scalar::max_abs_bits(&src[i..]))
    } else {
        0
    };
    let mut a = s.acc_to_array(acc);
    // LANES is a multiple of 8, so lane (i % 8) continues correctly in the scalar tail.
    scalar::sum_squares_into(&mut a, &src[i..], t, i);
    (scalar::reduce8(&a), max)
}

/// The vector loop of [`sum_squares_of`] over the whole vectors of `src`: the accumulators,
/// the lanes' largest magnitude bits (with `MAX`), and the index where the scalar tail starts.
/// `ID`: the transform is the identity.
#[inline(always)]
fn squares_body<S: Simd, G: Element, const MAX: bool, const ID: bool>(
    s: S,
    tr: &Transform<S::F>,
    src: &[G],
) -> (S::Acc, S::F, usize) {
    let n = src.len();
    let w = S::LANES;
    let body = n - n % w;
    let mut acc = s.acc_zero();
    let mut vmax = s.splat(0.0);
    let mut i = 0;
    while i < body {
        // SAFETY: i + LANES <= body <= n.
        let x = unsafe { load::<S, G>(s, src.as_ptr().add(i)) };
        if MAX {
            vmax = s.max_abs_bits(vmax, x);
        }
        acc = s.acc_add_squares(acc, if ID { x } else { tr.apply(s, x) });
        i += w;
    }
    (acc, vmax, i)
}

/// `scalar::max_abs_bits(src)` (bits in `G`'s format) from `b`, the largest magnitude's bits
/// among `src` widened to f32. Widening keeps every finite value and infinity exactly and the
/// magnitudes' order, so for those `b` narrowed back is the answer. A NaN's widened bits need
/// not order as `G`'s do (widening sets an f16 NaN's quiet bit), so when `b` is a NaN's the
/// plain fold over `src` decides (a second pass, only over gradients that hold a NaN).
#[inline(always)]
fn narrowed_max_abs_bits<G: Element>(b: u32, src: &[G]) -> u32 {
    if b > f32::INFINITY.to_bits() {
        scalar::max_abs_bits(src)
    } else {
        G::from_f32(f32::from_bits(b)).abs_bits()
    }
}

/// Adds the exact squares of `transform(src)` into `acc`: the transform by this path's
/// vector code into a stack buffer, then binning on the bits (`exact::accumulate`).
#[inline(always)]
pub(crate) fn accumulate_squares<S: Simd, G: Element>(
    s: S,
    acc: &mut SquareSum,
    src: &[G],
    t: &GradTransform,
) {
    let load = VecLoad {
        s,
        t: Transform::new(s, t),
    };
    exact::accumulate::<_, _, false>(acc, src, scalar::is_identity(t), &load);
}

/// [`accumulate_squares`], returning also the largest magnitude's bits among the raw values
/// (`scalar::max_abs_bits`, compiled with this path's features), from the same pass.
#[inline(always)]
pub(crate) fn accumulate_squares_max_abs_bits<S: Simd, G: Element>(
    s: S,
    acc: &mut SquareSum,
    src: &[G],
    t: &GradTransform,
) -> u32 {
    let load = VecLoad {
        s,
        t: Transform::new(s, t),
    };
    exact::accumulate::<_, _, true>(acc, src, scalar::is_identity(t), &load)
}

/// The path's transform for [`exact::accumulate`].
struct VecLoad<S: Simd> {
    s: S,
    t: Transform<S::F>,
}

impl<S: Simd, G: Element> exact::Load<G> for VecLoad<S> {
    type Sq = S::Squares;
    #[inline(always)]
    fn squares(&self) -> S::Squares {
        self.s.squares()
    }
    #[inline(always)]
    fn load(&self, dst: &mut [f32], src: &[G]) {
        load_body::<S, G, false, false>(self.s, &self.t, dst, src)
    }
}

/// Every element finite: integer tests on the raw bits, in blocks so that the compiler
/// vectorizes each block with the path's instruction set.
#[inline(always)]
pub(crate) fn all_finite<G: Element>(src: &[G]) -> bool {
    const BLOCK: usize = 64;
    let mut chunks = src.chunks_exact(BLOCK);
    for chunk in &mut chunks {
        let mut bad = false;
        for &x in chunk {
            bad |= !x.finite_elem();
        }
        if bad {
            return false;
        }
    }
    chunks.remainder().iter().all(|x| x.finite_elem())
}

/// `dst = round(src)`; equal lengths checked by the caller.
#[inline(always)]
pub(crate) fn store_row<S: Simd, P: Element>(s: S, dst: &mut [P], src: &[f32], r: Rounding) {
    let n = dst.len();
    assert!(src.len() == n);
    let w = S::LANES;
    let sr = match r {
        Rounding::Stochastic { seed, offset } if P::DTYPE != DType::F32 => {
            Some((scalar::sr_key(seed), offset))
        }
        _ => None,
    };
    let body = n - n % w;
    let mut i = 0;
    while i < body {
        // SAFETY: i + LANES <= n for both slices.
        unsafe {
            let x = s.load_f32(src.as_ptr().add(i));
            store_param::<S, P>(s, dst.as_mut_ptr().add(i), x, sr, i);
        }
        i += w;
    }
    if i < n {
        let rem = n - i;
        let mut bd = [P::default(); MAX_LANES];
        let bs = pad(&src[i..]);
        // SAFETY: both buffers hold MAX_LANES >= LANES elements.
        unsafe {
            let x = s.load_f32(bs.as_ptr());
            store_param::<S, P>(s, bd.as_mut_ptr(), x, sr, i);
        }
        dst[i..].copy_from_slice(&bd[..rem]);
    }
}
