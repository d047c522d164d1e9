//! The portable path: `wide` vectors with the compile-time target features.
//!
//! f16 conversions are branch-free integer/float bit manipulations (exact widening through a
//! power-of-two multiply; narrowing with round-to-nearest-even through an integer carry, or a
//! float add for the subnormal range), matching `half`'s results bit for bit.

use wide::{f32x8, f64x4, i16x8, i32x8, u16x8, u32x8};

use crate::simd::Simd;

/// The portable token (no run-time requirement).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Portable;

/// Zero-extends eight u16 lanes to u32 lanes: one unpack per half on SSE2, `uxtl` on NEON,
/// instead of eight scalar moves.
#[inline(always)]
fn u16x8_to_u32(p: [u16; 8]) -> u32x8 {
    u32x8::from(u16x8::new(p))
}

/// Narrows eight i32 lanes that already hold sign-extended 16-bit values (every caller's
/// lanes do) with one signed saturating pack (`packssdw` on SSE2, `sqxtn` on NEON), which
/// keeps such values exactly.
#[inline(always)]
fn i32x8_to_u16(x: i32x8) -> [u16; 8] {
    bytemuck::cast::<i16x8, [u16; 8]>(i16x8::from_i32x8_saturate(x))
}

/// bf16 narrowing, round to nearest-even; NaN -> its high half with the quiet bit. Returns the
/// bf16 bits sign-extended to 32 bits (for [`i32x8_to_u16`]).
///
/// A NaN lane gets its quiet bit set and its low half cleared first, so the rounding add
/// cannot carry out of the high half; the NaN test is one float compare.
#[inline(always)]
fn bf16_bits_from_f32(x: f32x8) -> i32x8 {
    let b = bytemuck::cast::<f32x8, i32x8>(x);
    let nan = bytemuck::cast::<f32x8, i32x8>(x.is_nan());
    let b = (b & !(nan & i32x8::splat(0xFFFF))) | (nan & i32x8::splat(0x0040_0000));
    let lsb = (b >> 16) & i32x8::splat(1);
    // Wrapping add, then an arithmetic shift: the high half, sign-extended.
    (b + i32x8::splat(0x7FFF) + lsb) >> 16
}

/// f16 bits -> f32 bits (exact), NaN quieted as F16C and `half` do.
#[inline(always)]
fn f16_bits_to_f32(h: u32x8) -> f32x8 {
    let sign = (h & u32x8::splat(0x8000)) << 16;
    let em = (h & u32x8::splat(0x7FFF)) << 13;
    // Finite values: reinterpret the exponent/mantissa and rescale by 2^112 (exact, also for
    // f16 subnormals, which become f32 subnormals before the multiply).
    let scaled = f32x8::from_bits(em) * f32x8::splat(f32::from_bits((127 + 112) << 23));
    let exp_all = (h & u32x8::splat(0x7C00)).simd_eq(u32x8::splat(0x7C00));
    let man = h & u32x8::splat(0x03FF);
    let is_nan = exp_all & !man.simd_eq(u32x8::splat(0));
    let special = u32x8::splat(0x7F80_0000) | (man << 13) | (is_nan & u32x8::splat(0x0040_0000));
    let bits = exp_all.select(special, scaled.to_bits());
    f32x8::from_bits(bits | sign)
}

/// f32 -> f16 bits, round to nearest-even (as F16C and `half`), sign-extended to 32 bits (for
/// [`i32x8_to_u16`]). The magnitude's bits are non-negative as i32, so every compare is a
/// plain signed one (SSE2 has no unsigned compare).
#[inline(always)]
fn f32_to_f16_bits(x: f32x8) -> i32x8 {
    let b = bytemuck::cast::<f32x8, i32x8>(x);
    // Arithmetic shift: 0xFFFF_8000 for negative lanes, 0 otherwise.
    let sign = (b >> 16) & i32x8::splat(0xFFFF_8000_u32 as i32);
    let a = b & i32x8::splat(0x7FFF_FFFF);
    // Inf / NaN / overflow (>= 65536).
    let big = a.simd_gt(i32x8::splat(0x477F_FFFF));
    let nan = a.simd_gt(i32x8::splat(0x7F80_0000));
    let nan_bits = i32x8::splat(0x7E00) | ((a >> 13) & i32x8::splat(0x03FF));
    let big_bits = nan.select(nan_bits, i32x8::splat(0x7C00));
    // Subnormal / zero result (< 2^-14): align the 10 mantissa bits at the bottom with an
    // RNE float add of 0.5 (whose ulp is 2^-24, the f16 subnormal quantum).
    let small = i32x8::splat(0x3880_0000).simd_gt(a);
    let magic = f32x8::splat(0.5);
    let small_bits = bytemuck::cast::<f32x8, i32x8>(bytemuck::cast::<i32x8, f32x8>(a) + magic)
        - bytemuck::cast::<f32x8, i32x8>(magic);
    // Normal: rebias and round to nearest-even with an integer carry (positive for every
    // normal lane, so the arithmetic shift is a logical one there).
    let odd = (a >> 13) & i32x8::splat(1);
    let normal_bits = (a + i32x8::splat(0xC800_0FFF_u32 as i32) + odd) >> 13;
    let r = big.select(big_bits, small.select(small_bits, normal_bits));
    r | sign
}

#[inline(always)]
fn f32x8_to_f64(x: f32x8) -> (f64x4, f64x4) {
    let a = x.to_array();
    (
        f64x4::new([
            f64::from(a[0]),
            f64::from(a[1]),
            f64::from(a[2]),
            f64::from(a[3]),
        ]),
        f64x4::new([
            f64::from(a[4]),
            f64::from(a[5]),
            f64::from(a[6]),
            f64::from(a[7]),
        ]),
    )
}

// SAFETY: the portable token needs nothing from the CPU beyond the compile-time features.
unsafe impl Simd for Portable {
    type F = f32x8;
    type Acc = (f64x4, f64x4);
    const LANES: usize = 8;

    #[inline(always)]
    fn splat(self, x: f32) -> f32x8 {
        f32x8::splat(x)
    }
    #[inline(always)]
    fn add(self, a: f32x8, b: f32x8) -> f32x8 {
        a + b
    }
    #[inline(always)]
    fn sub(self, a: f32x8, b: f32x8) -> f32x8 {
        a - b
    }
    #[inline(always)]
    fn mul(self, a: f32x8, b: f32x8) -> f32x8 {
        a * b
    }
    #[inline(always)]
    fn div(self, a: f32x8, b: f32x8) -> f32x8 {
        a / b
    }
    #[inline(always)]
    fn sqrt(self, a: f32x8) -> f32x8 {
        #[cfg(any(
            target_feature = "sse",
            all(target_arch = "aarch64", target_feature = "neon"),
            target_feature = "simd128"
        ))]
        {
            // A hardware square root, correctly rounded.
            a.sqrt()
        }
        #[cfg(not(any(
            target_feature = "sse",
            all(target_arch = "aarch64", target_feature = "neon"),
            target_feature = "simd128"
        )))]
        {
            // wide's fallback may not be correctly rounded without std: do it per lane.
            f32x8::new(a.to_array().map(crate::scalar::sqrt_f32))
        }
    }
    #[inline(always)]
    fn neg(self, a: f32x8) -> f32x8 {
        a ^ f32x8::splat(-0.0)
    }
    #[inline(always)]
    fn clip(self, g: f32x8, c: f32x8, nc: f32x8) -> f32x8 {
        let t = g.simd_lt(nc).select(nc, g);
        g.simd_gt(c).select(c, t)
    }
    #[inline(always)]
    fn ge_select(self, a: f32x8, b: f32x8) -> f32x8 {
        a.simd_ge(b).select(a, b)
    }

    #[inline(always)]
    unsafe fn load_f32(self, p: *const f32) -> f32x8 {
        // SAFETY: the caller guarantees 8 readable f32.
        f32x8::new(unsafe { p.cast::<[f32; 8]>().read_unaligned() })
    }
    #[inline(always)]
    unsafe fn store_f32(self, p: *mut f32, x: f32x8) {
        // SAFETY: the caller guarantees 8 writable f32.
        unsafe { p.cast::<[f32; 8]>().write_unaligned(x.to_array()) }
    }
    #[inline(always)]
    unsafe fn load_f16(self, p: *const u16) -> f32x8 {
        // SAFETY: the caller guarantees 8 readable u16.
        let h = unsafe { p.cast::<[u16; 8]>().read_unaligned() };
        f16_bits_to_f32(u16x8_to_u32(h))
    }
    #[inline(always)]
    unsafe fn store_f16(self, p: *mut u16, x: f32x8) {
        let h = i32x8_to_u16(f32_to_f16_bits(x));
        // SAFETY: the caller guarantees 8 writable u16.
        unsafe { p.cast::<[u16; 8]>().write_unaligned(h) }
    }
    #[inline(always)]
    unsafe fn load_bf16(self, p: *const u16) -> f32x8 {
        // SAFETY: the caller guarantees 8 readable u16.
        let h = unsafe { p.cast::<[u16; 8]>().read_unaligned() };
        f32x8::from_bits(u16x8_to_u32(h) << 16)
    }
    #[inline(always)]
    unsafe fn store_bf16(self, p: *mut u16, x: f32x8) {
        let h = i32x8_to_u16(bf16_bits_from_f32(x));
        // SAFETY: the caller guarantees 8 writable u16.
        unsafe { p.cast::<[u16; 8]>().write_unaligned(h) }
    }

    type Squares = crate::exact::Bins;
    #[inline(always)]
    fn squares(self) -> crate::exact::Bins {
        crate::exact::Bins::new()
    }

    #[inline(always)]
    fn acc_zero(self) -> (f64x4, f64x4) {
        (f64x4::splat(0.0), f64x4::splat(0.0))
    }
    #[inline(always)]
    fn acc_add_squares(self, acc: (f64x4, f64x4), x: f32x8) -> (f64x4, f64x4) {
        let (lo, hi) = f32x8_to_f64(x);
        (acc.0 + lo * lo, acc.1 + hi * hi)
    }
    #[inline(always)]
    fn acc_to_array(self, acc: (f64x4, f64x4)) -> [f64; 8] {
        let (a, b) = (acc.0.to_array(), acc.1.to_array());
        [a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]]
    }
}
