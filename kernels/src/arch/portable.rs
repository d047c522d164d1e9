//! The portable path: `wide` vectors with the compile-time target features.
//!
//! f16 conversions are integer/float bit manipulations (exact widening through a power-of-two
//! multiply; narrowing with round-to-nearest-even through one float add), matching `half`'s
//! results bit for bit. The lanes that need more (f16 zeros, subnormals, infinities and NaNs
//! when widening, f32 NaNs when narrowing to f16 or bf16) are rare in most rows, so the extra
//! work runs only for vectors that hold one: one test and a well-predicted branch instead of a
//! select on every vector, which made in-cache all-f16 row updates 0.78x and all-bf16 0.79x the
//! time (issue 14, `benches/README.md`). The bits are the same either way; the tests below mix
//! such lanes with ordinary ones in one vector.

use wide::{f32x8, f64x4, i16x8, i32x8, u16x8, u32x8};

use crate::simd::Simd;

/// The portable token (no run-time requirement).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Portable;

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
    // NaN lanes are rare: fixed up only when there is one (same bits either way).
    let b = if nan.any() {
        (b & !(nan & i32x8::splat(0xFFFF))) | (nan & i32x8::splat(0x0040_0000))
    } else {
        b
    };
    let lsb = (b >> 16) & i32x8::splat(1);
    // Wrapping add, then an arithmetic shift: the high half, sign-extended.
    (b + i32x8::splat(0x7FFF) + lsb) >> 16
}

/// Eight u16 lanes moved into the high halves of u32 lanes (low halves zero): one unpack
/// with zero per half on SSE2.
#[inline(always)]
fn u16x8_to_u32_high(x: u16x8) -> u32x8 {
    u32x8::from(x) << 16
}

/// Whether the target multiplies f32 subnormals slowly, so that [`widen_f16`] keeps them out
/// of its multiply: x86 CPUs finish such a multiply in microcode (measured: widening 4,096 f16
/// subnormals took 46x the time of normal values); Arm's vector units do not.
const SLOW_SUBNORMALS: bool = cfg!(any(target_arch = "x86", target_arch = "x86_64"));

/// f16 bits -> f32 bits (exact), NaN quieted as F16C and `half` do: [`widen_f16`] for this
/// target.
#[inline(always)]
fn f16_bits_to_f32(h: u16x8) -> f32x8 {
    widen_f16::<SLOW_SUBNORMALS>(h)
}

/// f16 bits -> f32 bits (exact), NaN quieted as F16C and `half` do.
///
/// Every finite value is the exponent/mantissa moved into f32 position and rescaled by 2^112
/// (exact; an f16 subnormal is an f32 subnormal before the multiply). That product keeps an
/// infinity's or NaN's mantissa and gives it the exponent of 2^16, so one OR of the f32
/// exponent field makes it an infinity or NaN, and one more sets a NaN's quiet bit. The sign
/// and those two fixes are worked out on the 16-bit lanes, eight to a 128-bit register, and
/// then moved to the high halves of the f32 lanes together: half the operations of doing them
/// on 32-bit lanes. Compares are signed (SSE2 has no unsigned one); the magnitude is at most
/// 0x7FFF.
///
/// With `SUBNORMALS`, zeros and subnormals (exponent field 0) do not go through the multiply
/// as f32 subnormals: they get exponent field 1 instead, a normal f32 whose product is 2^-14
/// plus the subnormal's value, and 2^-14 is then subtracted (exact, by Sterbenz's lemma; a
/// zero comes out +0). The same bits either way.
///
/// Lanes with exponent field 31 (and with `SUBNORMALS` field 0) are rare in parameters and
/// gradients, less so in f16 moments (a squared gradient underflows easily), so their fixes
/// run only for vectors that hold one: one compare (with `SUBNORMALS` an add and a compare)
/// finds them.
#[inline(always)]
fn widen_f16<const SUBNORMALS: bool>(h: u16x8) -> f32x8 {
    let h = bytemuck::cast::<u16x8, i16x8>(h);
    let mag = h & i16x8::splat(0x7FFF);
    let sign = h ^ mag;
    // 16-bit lanes moved to the high halves of f32 lanes.
    let high = |x: i16x8| u16x8_to_u32_high(bytemuck::cast::<i16x8, u16x8>(x));
    // The magnitude << 13 (exponent and mantissa in f32 position) times 2^112.
    let scaled = |mag: i16x8| {
        f32x8::from_bits(high(mag) >> 3) * f32x8::splat(f32::from_bits((127 + 112) << 23))
    };
    let special = |mag: i16x8| mag.simd_gt(i16x8::splat(0x7BFF));
    let rare = if SUBNORMALS {
        // Exponent field 31 wraps negative when 0x400 is added; field 0 stays below 0x800.
        (mag + i16x8::splat(0x0400)).simd_lt(i16x8::splat(0x0800))
    } else {
        special(mag)
    };
    if rare.any() {
        // High halves of f32 bits: exponent all ones (f16 exponent all ones), quiet bit (NaN).
        let quiet = mag.simd_gt(i16x8::splat(0x7C00)) & i16x8::splat(0x0040);
        let fix = sign | (special(mag) & i16x8::splat(0x7F80)) | quiet;
        let x = if SUBNORMALS {
            // Zeros and subnormals: exponent field 1, then 2^-14 (its bits' high half) off.
            let low = mag.simd_lt(i16x8::splat(0x0400));
            scaled(mag | (low & i16x8::splat(0x0400)))
                - f32x8::from_bits(high(low & i16x8::splat(0x3880)))
        } else {
            scaled(mag)
        };
        f32x8::from_bits(x.to_bits() | high(fix))
    } else {
        f32x8::from_bits(scaled(mag).to_bits() | high(sign))
    }
}

/// f32 -> f16 bits, round to nearest-even (as F16C and `half`), sign-extended to 32 bits (for
/// [`i32x8_to_u16`]).
///
/// The float-add method of Marat Dukhan's FP16 library: the magnitude times 2^112 becomes
/// infinity exactly when it rounds to an f16 infinity; back at 4x the magnitude, it is added
/// to a power of two (`bias`) whose ulp is 4x the f16 ulp at that exponent (at least 4x the
/// subnormal quantum 2^-24), so the one RNE float add rounds it to f16 precision. The sum's
/// low 12 bits are then the f16 mantissa plus an exponent carry, and its exponent field, moved
/// down, the f16 exponent. NaN lanes take their payload from the input (not from the float
/// add, whose NaN result differs between targets) with the quiet bit set. The magnitude's bits
/// are non-negative as i32, so the compare is a plain signed one.
#[inline(always)]
fn f32_to_f16_bits(x: f32x8) -> i32x8 {
    let b = bytemuck::cast::<f32x8, i32x8>(x);
    // Arithmetic shift: 0xFFFF_8000 for negative lanes, 0 otherwise.
    let sign = (b >> 16) & i32x8::splat(0xFFFF_8000_u32 as i32);
    let a = b & i32x8::splat(0x7FFF_FFFF);
    let base = bytemuck::cast::<i32x8, f32x8>(a)
        * f32x8::splat(f32::from_bits((127 + 112) << 23))
        * f32x8::splat(f32::from_bits((127 - 110) << 23));
    // The magnitude's power of two, at least 2^-14 (the smallest f16 normal), times 2^15. Its
    // bits are never a NaN's (at most +infinity's), so the fast max is exact.
    let exp = bytemuck::cast::<i32x8, f32x8>(a & i32x8::splat(0x7F80_0000))
        .fast_max(f32x8::splat(f32::from_bits(0x3880_0000)));
    let bias = bytemuck::cast::<i32x8, f32x8>(
        bytemuck::cast::<f32x8, i32x8>(exp) + i32x8::splat(0x0780_0000),
    );
    // Non-negative for every non-NaN lane (an infinite `base` absorbs an overflowed `bias`).
    let r = bytemuck::cast::<f32x8, i32x8>(bias + base);
    let finite = ((r >> 13) & i32x8::splat(0x7C00)) + (r & i32x8::splat(0x0FFF));
    let nan = a.simd_gt(i32x8::splat(0x7F80_0000));
    // NaN lanes are rare: the select runs only when there is one (same bits either way).
    let bits = if nan.any() {
        let nan_bits = i32x8::splat(0x7E00) | ((a >> 13) & i32x8::splat(0x03FF));
        nan.select(nan_bits, finite)
    } else {
        finite
    };
    bits | sign
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
        f16_bits_to_f32(u16x8::new(h))
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
        f32x8::from_bits(u16x8_to_u32_high(u16x8::new(h)))
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

    #[inline(always)]
    fn max_abs_bits(self, m: f32x8, x: f32x8) -> f32x8 {
        // Both sides' sign bits are clear, so the signed maximum is the unsigned one (SSE2
        // has neither; the signed one takes fewer operations to emulate).
        let bits = |v: f32x8| bytemuck::cast::<f32x8, i32x8>(v);
        bytemuck::cast(bits(m).max(bits(x) & i32x8::splat(0x7FFF_FFFF)))
    }
    #[inline(always)]
    fn max_lane_bits(self, m: f32x8) -> u32 {
        bytemuck::cast::<f32x8, u32x8>(m).reduce_max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Narrows the f32 bit patterns `first, first + step, ...` (`count` of them, wrapping) with
    /// the portable f16 and bf16 conversions and compares every result, NaNs included, with
    /// `half`'s bits. Vectors mix NaN and other lanes wherever a run crosses the NaN range
    /// (and often with an odd step), so both sides of the conversions' NaN branch are run.
    fn check_narrowing(first: u32, step: u32, count: u64) {
        let mut bits = first;
        let mut done = 0u64;
        while done < count {
            let mut lanes = [0u32; 8];
            for l in &mut lanes {
                *l = bits;
                bits = bits.wrapping_add(step);
            }
            let x = f32x8::from_bits(u32x8::new(lanes));
            let got = i32x8_to_u16(f32_to_f16_bits(x));
            let got_bf16 = i32x8_to_u16(bf16_bits_from_f32(x));
            for (l, &b) in lanes.iter().enumerate() {
                let want = half::f16::from_f32(f32::from_bits(b)).to_bits();
                assert_eq!(
                    got[l], want,
                    "f32 {b:#010x} to f16: {:#06x} vs {want:#06x}",
                    got[l]
                );
                let want = half::bf16::from_f32(f32::from_bits(b)).to_bits();
                assert_eq!(
                    got_bf16[l], want,
                    "f32 {b:#010x} to bf16: {:#06x} vs {want:#06x}",
                    got_bf16[l]
                );
            }
            done += 8;
        }
    }

    /// A million f32 patterns spread over the whole range (an odd step visits every residue,
    /// so every exponent, both signs, NaN payloads and low mantissa bits all occur).
    #[test]
    fn narrowing_matches_half_sampled() {
        check_narrowing(0x0000_0001, 4093, 1 << 20);
        // Dense runs around the f16 subnormal, normal and overflow boundaries, and the
        // infinity/NaN boundaries of f32 (also bf16's), both signs.
        for start in [
            0x3300_0000u32,
            0x3880_0000,
            0x477F_E000,
            0x7F80_0000,
            0x7FFF_FFF8,
        ] {
            for s in [0, 0x8000_0000] {
                check_narrowing((start | s).wrapping_sub(1 << 14), 1, 1 << 15);
            }
        }
    }

    /// Every one of the 2^32 f32 bit patterns. Slow unoptimized; CI runs it in release:
    /// `cargo test --release -p lazyadam-kernels --lib -- --ignored narrowing_matches_half_exhaustive`.
    #[test]
    #[ignore = "2^32 conversions: run in release"]
    fn narrowing_matches_half_exhaustive() {
        check_narrowing(0, 1, 1 << 32);
    }

    /// Every f16 bit pattern widens to `half`'s f32 bits (NaNs quieted alike), twice: in
    /// order (eight consecutive patterns per vector, so infinities and NaNs come in vectors
    /// of their own), and in an odd-multiplier order that mixes them with finite lanes, for
    /// both sides of the conversion's branch.
    #[test]
    fn widening_matches_half_exhaustive() {
        // Both forms, whichever this target uses.
        for widen in [widen_f16::<false>, widen_f16::<true>] {
            for mul in [1u32, 40_503] {
                for hi in 0..(1u32 << 13) {
                    let lanes: [u16; 8] =
                        core::array::from_fn(|l| (hi * 8 + l as u32).wrapping_mul(mul) as u16);
                    let got = widen(u16x8::new(lanes)).to_array();
                    for (l, &h) in lanes.iter().enumerate() {
                        let want = half::f16::from_bits(h).to_f32().to_bits();
                        assert_eq!(got[l].to_bits(), want, "f16 {h:#06x}");
                    }
                }
            }
        }
    }
}
