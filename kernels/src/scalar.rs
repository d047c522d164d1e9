//! The scalar reference path.
//!
//! This is the executable form of the numerics contract: every other path must agree with the
//! functions here bit for bit (NaN payloads aside). The per-element helpers are `#[inline(always)]`
//! so that the vector paths can reuse them for per-lane work (stochastic rounding) without
//! changing the operations performed.

use crate::{AdamCoeffs, DType, Element, GradTransform, Rounding, SquareSum, bf16, exact, f16};

/// The gradient transform of the contract: scale, then clip, then negate.
#[inline(always)]
pub(crate) fn transform(g: f32, t: &GradTransform) -> f32 {
    let mut g = g;
    if t.scale != 1.0 {
        g *= t.scale;
    }
    if let Some(c) = t.clip {
        g = if g > c {
            c
        } else if g < -c {
            -c
        } else {
            g
        };
    }
    if t.negate {
        g = -g;
    }
    g
}

/// Correctly rounded f32 square root (IEEE `sqrt`), available without std.
#[inline(always)]
pub(crate) fn sqrt_f32(x: f32) -> f32 {
    #[cfg(feature = "std")]
    {
        x.sqrt()
    }
    #[cfg(all(not(feature = "std"), target_arch = "x86_64"))]
    {
        use core::arch::x86_64::{_mm_cvtss_f32, _mm_set_ss, _mm_sqrt_ss};
        // SAFETY: SSE is part of the x86-64 baseline.
        unsafe { _mm_cvtss_f32(_mm_sqrt_ss(_mm_set_ss(x))) }
    }
    #[cfg(all(not(feature = "std"), not(target_arch = "x86_64")))]
    {
        soft_sqrt(x)
    }
}

/// Correctly rounded f32 square root in integer arithmetic (the no-std fallback of targets
/// without a known sqrt instruction; tested against the hardware one).
#[cfg_attr(any(feature = "std", target_arch = "x86_64"), allow(dead_code))]
pub(crate) fn soft_sqrt(x: f32) -> f32 {
    let b = x.to_bits();
    if x.is_nan() || x == 0.0 || x == f32::INFINITY {
        return x; // NaN, +-0 and +inf are their own roots
    }
    if b >> 31 != 0 {
        return f32::NAN;
    }
    let e = ((b >> 23) & 0xFF) as i32;
    let (mut m, mut exp) = if e == 0 {
        let sh = (b & 0x007F_FFFF).leading_zeros() - 8;
        (u64::from((b & 0x007F_FFFF) << sh), 1 - sh as i32 - 150)
    } else {
        (u64::from((b & 0x007F_FFFF) | 0x0080_0000), e - 150)
    };
    // x = m * 2^exp with m in [2^23, 2^24); make exp even.
    if exp & 1 != 0 {
        m <<= 1;
        exp -= 1;
    }
    // sqrt(x) = sqrt(m << 28) * 2^((exp - 28) / 2); the integer root has 26 or 27 bits.
    let big = m << 28;
    let mut root = 0u64;
    let mut rem = big;
    let mut bit = 1u64 << 62;
    while bit > big {
        bit >>= 2;
    }
    while bit != 0 {
        if rem >= root + bit {
            rem -= root + bit;
            root = (root >> 1) + bit;
        } else {
            root >>= 1;
        }
        bit >>= 2;
    }
    let sticky = rem != 0;
    let nbits = 64 - root.leading_zeros() as i32;
    let shift = nbits - 24;
    let mut q = root >> shift;
    let low = root & ((1u64 << shift) - 1);
    let half = 1u64 << (shift - 1);
    if low > half || (low == half && (sticky || q & 1 == 1)) {
        q += 1;
    }
    let mut scale = shift + (exp - 28) / 2;
    if q == 1 << 24 {
        q >>= 1;
        scale += 1;
    }
    // value = q * 2^scale with q in [2^23, 2^24): unbiased exponent 23 + scale.
    let biased = (23 + scale + 127) as u32;
    f32::from_bits((biased << 23) | (q as u32 & 0x007F_FFFF))
}

/// `x` with the increment of splitmix64 (the golden ratio in 64 bits).
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// The splitmix64 output function (a bijective 64-bit mixer).
#[inline(always)]
pub(crate) const fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The per-row key of a stochastic-rounding seed.
#[inline(always)]
pub(crate) const fn sr_key(seed: u64) -> u64 {
    mix64(seed)
}

/// The random bits used for element `index` (absolute: `offset + i`) under the key of a seed.
#[inline(always)]
pub(crate) const fn sr_bits(key: u64, index: u64) -> u64 {
    mix64(key.wrapping_add(index.wrapping_mul(GOLDEN)))
}

/// Stochastic rounding of an f32 to bf16 bits with the random bits `r` (its top 16 bits are used).
///
/// The value is rounded away from zero (in magnitude) with probability equal to the distance
/// to the lower neighbour divided by the spacing, so the result is unbiased. NaN is rounded as
/// by [`bf16::from_f32`]; infinities stay infinities.
#[inline(always)]
pub(crate) fn sr_bf16(x: f32, r: u64) -> u16 {
    let b = x.to_bits();
    if (b & 0x7FFF_FFFF) > 0x7F80_0000 {
        return bf16::from_f32(x).to_bits();
    }
    let dropped = b & 0xFFFF;
    let up = ((r >> 48) as u32) < dropped;
    (((b & 0xFFFF_0000) + if up { 0x1_0000 } else { 0 }) >> 16) as u16
}

/// Stochastic rounding of an f32 to f16 bits with the random bits `r` (its top bits are used).
///
/// Unbiased as [`sr_bf16`], including the f16 subnormal range. Magnitudes of 65536 and above
/// (beyond the f16 grid) become infinity, as with round-to-nearest; NaN is rounded as by
/// [`half::f16::from_f32`]. Below 2^-64 of an f16 subnormal step (f32 values under about 2^-88) the
/// round-up probability is quantized to zero.
#[inline(always)]
pub(crate) fn sr_f16(x: f32, r: u64) -> u16 {
    let b = x.to_bits();
    let a = b & 0x7FFF_FFFF;
    let sign = ((b >> 16) & 0x8000) as u16;
    if a >= 0x4780_0000 {
        // NaN, infinities and magnitudes >= 65536.
        return f16::from_f32(x).to_bits();
    }
    let e = a >> 23;
    if e >= 113 {
        // f16 normal range: drop 13 mantissa bits.
        let dropped = a & 0x1FFF;
        let up = ((r >> 51) as u32) < dropped;
        let g = (a & !0x1FFF) + if up { 0x2000 } else { 0 };
        // g is on the f16 grid; rebias the exponent (a carry to 2^16 gives infinity).
        return sign | ((g >> 13) - (112 << 10)) as u16;
    }
    // f16 subnormal range: the quantum is 2^-24; value = man24 * 2^(max(e,1) - 150).
    let man24 = (a & 0x007F_FFFF) | if e > 0 { 0x0080_0000 } else { 0 };
    let e_eff = if e > 0 { e } else { 1 };
    let d = 126 - e_eff; // bits to drop, 14..=125
    let (keep, dropped) = if d < 32 {
        (man24 >> d, man24 & ((1u32 << d) - 1))
    } else {
        (0, man24)
    };
    let up = d <= 64 && (r >> (64 - d)) < u64::from(dropped);
    sign | (keep + u32::from(up)) as u16
}

/// Rounds an f32 into the storage type `E` with the given rounding; `index` is the element's
/// index in the row (the `offset` of [`Rounding::Stochastic`] is added here).
#[inline(always)]
pub(crate) fn round_to<E: Element>(x: f32, key: u64, offset: u64, index: usize, sr: bool) -> E {
    if !sr || E::DTYPE == DType::F32 {
        return E::from_f32(x);
    }
    let r = sr_bits(key, offset.wrapping_add(index as u64));
    match E::DTYPE {
        DType::F16 => E::from_bits16(sr_f16(x, r)),
        DType::BF16 => E::from_bits16(sr_bf16(x, r)),
        DType::F32 => E::from_f32(x),
    }
}

/// Splits a [`Rounding`] into (stochastic?, key, offset).
#[inline(always)]
pub(crate) fn rounding_parts(r: Rounding) -> (bool, u64, u64) {
    match r {
        Rounding::NearestEven => (false, 0, 0),
        Rounding::Stochastic { seed, offset } => (true, sr_key(seed), offset),
    }
}

/// The values of one element after an Adam update: (p1, m1, v1, vh1).
#[inline(always)]
pub(crate) fn adam_elem(
    c: &AdamCoeffs,
    p: f32,
    m: f32,
    v: f32,
    vh: f32,
    g: f32,
    amsgrad: bool,
) -> (f32, f32, f32, f32) {
    let g = transform(g, &c.grad);
    let mut m0 = m;
    let mut v0 = v;
    if c.m_pre_decay != 1.0 {
        m0 *= c.m_pre_decay;
    }
    if c.v_pre_decay != 1.0 {
        v0 *= c.v_pre_decay;
    }
    let m1 = c.beta1 * m0 + c.one_minus_beta1 * g;
    let v1 = c.beta2 * v0 + c.one_minus_beta2 * (g * g);
    let (d, vh1) = if amsgrad {
        let vh1 = if vh >= v1 { vh } else { v1 };
        (vh1, vh1)
    } else {
        (v1, vh)
    };
    let mut p0 = p;
    if c.weight_decay != 0.0 {
        p0 -= c.weight_decay * p0;
    }
    let p1 = p0 - (c.lr_t * m1) / (sqrt_f32(d) + c.epsilon);
    (p1, m1, v1, vh1)
}

/// Adam over a row (lengths already checked). `vhat` is used iff `AMS`.
#[inline(always)]
pub(crate) fn adam_row<P: Element, G: Element, M: Element, const AMS: bool>(
    c: &AdamCoeffs,
    param: &mut [P],
    m: &mut [M],
    v: &mut [M],
    vhat: &mut [M],
    grad: &[G],
    start: usize,
) {
    let (sr, key, offset) = rounding_parts(c.rounding);
    let n = param.len();
    for i in 0..n {
        let vh = if AMS { vhat[i].to_f32() } else { 0.0 };
        let (p1, m1, v1, vh1) = adam_elem(
            c,
            param[i].to_f32(),
            m[i].to_f32(),
            v[i].to_f32(),
            vh,
            grad[i].to_f32(),
            AMS,
        );
        m[i] = M::from_f32(m1);
        v[i] = M::from_f32(v1);
        if AMS {
            vhat[i] = M::from_f32(vh1);
        }
        param[i] = round_to::<P>(p1, key, offset, start + i, sr);
    }
}

/// `dst[i] = transform(src[i])` (lengths already checked).
#[inline(always)]
pub(crate) fn load_row<G: Element>(dst: &mut [f32], src: &[G], t: &GradTransform) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = transform(s.to_f32(), t);
    }
}

/// `dst[i] = dst[i] + transform(src[i])` (lengths already checked).
#[inline(always)]
pub(crate) fn accumulate_row<G: Element>(dst: &mut [f32], src: &[G], t: &GradTransform) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d += transform(s.to_f32(), t);
    }
}

/// Adam over rows `rows[k]` of row-major tables with the gradient rows `grads[k * row_len..]`,
/// in order: [`adam_row`] on each row's slices, its rounding index starting at the row's place
/// in the table (checked by the caller as for `simd::adam_rows`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn adam_rows<P: Element, G: Element, M: Element>(
    c: &AdamCoeffs,
    param: &mut [P],
    m: &mut [M],
    v: &mut [M],
    row_len: usize,
    rows: &[usize],
    grads: &[G],
) {
    for (&r, g) in rows.iter().zip(grads.chunks_exact(row_len)) {
        let range = r * row_len..(r + 1) * row_len;
        adam_row::<P, G, M, false>(
            c,
            &mut param[range.clone()],
            &mut m[range.clone()],
            &mut v[range.clone()],
            &mut [],
            g,
            range.start,
        );
    }
}

/// [`accumulate_row`] of each gradient row `src[i * row_len..]` into accumulator row
/// `slots[i]`, in order (checked by the caller as for `simd::accumulate_rows`).
pub(crate) fn accumulate_rows<G: Element>(
    acc: &mut [f32],
    row_len: usize,
    slots: &[u32],
    src: &[G],
    t: &GradTransform,
) {
    for (&slot, g) in slots.iter().zip(src.chunks_exact(row_len)) {
        let at = slot as usize * row_len;
        accumulate_row(&mut acc[at..at + row_len], g, t);
    }
}

/// The sum of the gradient rows at `positions` into `dst`: the first loaded, the others added
/// in order (checked by the caller as for `simd::sum_rows_at`).
pub(crate) fn sum_rows_at<G: Element>(
    dst: &mut [f32],
    src: &[G],
    positions: &[usize],
    t: &GradTransform,
) {
    let n = dst.len();
    for (j, &p) in positions.iter().enumerate() {
        let g = &src[p * n..(p + 1) * n];
        if j == 0 {
            load_row(dst, g, t);
        } else {
            accumulate_row(dst, g, t);
        }
    }
}

/// Adds the squares of `src` into the 8 lane accumulators; element `i` (counted from the start
/// of the row, `start` being the index of `src[0]`) goes to lane `i % 8`.
#[inline(always)]
pub(crate) fn sum_squares_into<G: Element>(
    acc: &mut [f64; 8],
    src: &[G],
    t: &GradTransform,
    start: usize,
) {
    for (i, s) in src.iter().enumerate() {
        let x = f64::from(transform(s.to_f32(), t));
        acc[(start + i) % 8] += x * x;
    }
}

/// The contract's final reduction of the 8 lane accumulators.
#[inline(always)]
pub(crate) fn reduce8(a: &[f64; 8]) -> f64 {
    ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
}

/// Sum of squares of a row.
#[inline(always)]
pub(crate) fn sum_squares<G: Element>(src: &[G], t: &GradTransform) -> f64 {
    let mut acc = [0.0f64; 8];
    sum_squares_into(&mut acc, src, t, 0);
    reduce8(&acc)
}

/// [`sum_squares`] and [`max_abs_bits`] (two passes: this is the reference).
#[inline(always)]
pub(crate) fn sum_squares_max_abs_bits<G: Element>(src: &[G], t: &GradTransform) -> (f64, u32) {
    (sum_squares(src, t), max_abs_bits(src))
}

/// Whether the transform is the identity (so f32 values can be binned as they are).
#[inline(always)]
pub(crate) fn is_identity(t: &GradTransform) -> bool {
    t.scale == 1.0 && t.clip.is_none() && !t.negate
}

/// Adds the exact squares of `transform(src)` into `acc`.
#[inline(always)]
pub(crate) fn accumulate_squares<G: Element>(acc: &mut SquareSum, src: &[G], t: &GradTransform) {
    exact::accumulate::<_, _, false>(acc, src, is_identity(t), &ScalarLoad(t));
}

/// [`accumulate_squares`], returning also [`max_abs_bits`] of `src` (from the same pass).
#[inline(always)]
pub(crate) fn accumulate_squares_max_abs_bits<G: Element>(
    acc: &mut SquareSum,
    src: &[G],
    t: &GradTransform,
) -> u32 {
    exact::accumulate::<_, _, true>(acc, src, is_identity(t), &ScalarLoad(t))
}

/// The scalar transform for [`exact::accumulate`].
struct ScalarLoad<'a>(&'a GradTransform);

impl<G: Element> exact::Load<G> for ScalarLoad<'_> {
    type Sq = exact::Bins;
    #[inline(always)]
    fn squares(&self) -> exact::Bins {
        exact::Bins::new()
    }
    #[inline(always)]
    fn load(&self, dst: &mut [f32], src: &[G]) {
        load_row(dst, src, self.0)
    }
}

/// Every element finite.
#[inline(always)]
pub(crate) fn all_finite<G: Element>(src: &[G]) -> bool {
    src.iter().all(|x| x.finite_elem())
}

/// The largest of the elements' magnitude bits (0 for none).
#[inline(always)]
pub(crate) fn max_abs_bits<G: Element>(src: &[G]) -> u32 {
    src.iter().fold(0, |m, x| m.max(x.abs_bits()))
}

/// `dst[i] = round(src[i])` (lengths already checked); `start` is the row index of `dst[0]`.
#[inline(always)]
pub(crate) fn store_row<P: Element>(dst: &mut [P], src: &[f32], r: Rounding, start: usize) {
    let (sr, key, offset) = rounding_parts(r);
    for (i, (d, s)) in dst.iter_mut().zip(src).enumerate() {
        *d = round_to::<P>(*s, key, offset, start + i, sr);
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;

    /// The integer square root (the no-std fallback of other targets) is correctly rounded:
    /// compared with the hardware instruction over a dense sweep of bit patterns.
    #[test]
    fn soft_sqrt_matches_hardware() {
        let mut b: u32 = 0;
        loop {
            for x in [f32::from_bits(b), f32::from_bits(b | 0x8000_0000)] {
                let (s, h) = (soft_sqrt(x), std::primitive::f32::sqrt(x));
                assert!(
                    (s.is_nan() && h.is_nan()) || s.to_bits() == h.to_bits(),
                    "sqrt({x:e}) = {s:e}, want {h:e}"
                );
            }
            match b.checked_add(977) {
                Some(n) => b = n,
                None => break,
            }
        }
        for x in [0.0f32, -0.0, 1e-45, f32::MAX, f32::INFINITY, 4.0, 2.0] {
            assert_eq!(soft_sqrt(x).to_bits(), x.sqrt().to_bits(), "{x}");
        }
    }

    #[test]
    fn sr_of_representable_values_is_exact() {
        for r in [0u64, u64::MAX, 0x8000_0000_0000_0000] {
            for b in (0..=u16::MAX).step_by(7) {
                let h = f16::from_bits(b);
                if !h.is_nan() {
                    assert_eq!(sr_f16(h.to_f32(), r), b);
                }
                let x = bf16::from_bits(b);
                if !x.is_nan() {
                    assert_eq!(sr_bf16(x.to_f32(), r), b);
                }
            }
        }
    }
}
