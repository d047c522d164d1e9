//! x86-64 tokens: AVX2+FMA+F16C (x86-64-v3) and AVX-512 F/BW/DQ/VL (x86-64-v4).
//!
//! The numerics contract is plain multiply and add: no FMA contraction of the update. The only
//! FMA instructions are inside the AVX-512 `sqrt_alt`, an exactly rounded square root (see
//! there). f16 uses
//! the F16C conversions (`vcvtph2ps` / `vcvtps2ph` with round-to-nearest-even), bf16 integer
//! shifts and a round-to-nearest-even integer carry.

use core::arch::x86_64::*;

use crate::exact::{self, SquareSum, Squares};
use crate::simd::Simd;

pulp::simd_type! {
    /// pulp's proof that AVX2, FMA and F16C are usable (CPU and OS): x86-64-v3 as this crate
    /// uses it. Detection asks `is_available`; the value is then made with `new_unchecked`
    /// only for a `Kernels` handle of a detected path. Its feature list must match the
    /// `#[target_feature]` string of the AVX2 entry points in `arch/mod.rs`.
    pub(crate) struct V3F16c {
        pub sse: "sse",
        pub sse2: "sse2",
        pub avx: "avx",
        pub avx2: "avx2",
        pub fma: "fma",
        pub f16c: "f16c",
    }

    /// pulp's proof that AVX-512 F/BW/DQ/VL and the [`V3F16c`] set are usable (CPU and OS):
    /// x86-64-v4 as this crate uses it. Made as [`V3F16c`] is; its feature list must match
    /// the AVX-512 entry points' `#[target_feature]` string.
    pub(crate) struct V4F16c {
        pub sse: "sse",
        pub sse2: "sse2",
        pub avx: "avx",
        pub avx2: "avx2",
        pub fma: "fma",
        pub f16c: "f16c",
        pub avx512f: "avx512f",
        pub avx512bw: "avx512bw",
        pub avx512dq: "avx512dq",
        pub avx512vl: "avx512vl",
    }
}

/// Vector token for AVX2 + FMA + F16C: holds the pulp proof [`V3F16c`], so it cannot exist
/// on a CPU without those features.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx2(#[allow(dead_code)] V3F16c);

impl Avx2 {
    /// # Safety
    ///
    /// The CPU must support AVX2, FMA and F16C (and the OS the YMM state).
    #[inline(always)]
    pub(crate) unsafe fn new_unchecked() -> Self {
        // SAFETY: forwarded from the caller.
        Avx2(unsafe { V3F16c::new_unchecked() })
    }
}

/// Vector token for AVX-512 F/BW/DQ/VL (and the AVX2 set): holds the pulp proof [`V4F16c`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx512(#[allow(dead_code)] V4F16c);

impl Avx512 {
    /// # Safety
    ///
    /// The CPU must support AVX-512 F/BW/DQ/VL and the AVX2 set (and the OS the ZMM state).
    #[inline(always)]
    pub(crate) unsafe fn new_unchecked() -> Self {
        // SAFETY: forwarded from the caller.
        Avx512(unsafe { V4F16c::new_unchecked() })
    }
}

/// Binades of the vector [`Window`]: its shifts `2 * (e' - base)` stay below 64 bits.
const WIN: u32 = 31;

/// How far a block's window may lie below the current one before the window moves down
/// (each move flushes the lanes).
const WIN_SLACK: u32 = 2;

/// The x86 paths' exact sums of squares: every value's `m^2` shifted by
/// `2 * (e' - base)` bits (at most 62) and added into 128-bit sums in pairs of 64-bit vector
/// lanes (the carry out of the low lane from a compare), where `base ..= base + WIN` is a
/// window of binades set from the largest value of a block. No scatter: faster than the
/// bins. The rare non-zero values below the window go one by one into the limbs; a block
/// with an infinity or NaN is summed one value at a time.
///
/// Bounds between flushes (at most `FLUSH / 8 + 1` terms per lane, one per vector): each
/// term is below `2^(48 + 62) = 2^110`, so a lane's sum below `2^124` and the sum of the
/// eight lanes below `2^127`.
pub(crate) struct Window {
    tok: Avx2,
    /// `e'` of the window's lowest binade, in `1..=254 - WIN`.
    base: u32,
    /// Whether the lanes hold anything since the last flush.
    used: bool,
    /// 128-bit sums of the even and the odd 32-bit lanes: `[low + 2^63, high]` each.
    d: [__m256i; 4],
}

impl Window {
    #[inline(always)]
    pub(crate) fn new(tok: Avx2) -> Self {
        // SAFETY: AVX is available (token).
        let (z, s) = unsafe { (_mm256_setzero_si256(), _mm256_set1_epi64x(i64::MIN)) };
        Window {
            tok,
            base: 1,
            used: false,
            d: [s, z, s, z],
        }
    }
}

/// A block with an infinity or NaN: its flags, and the finite values one by one.
#[cold]
#[inline(never)]
fn cold_block(acc: &mut SquareSum, xs: &[f32]) -> u8 {
    for &x in xs {
        if x.is_finite() {
            acc.add(x);
        }
    }
    exact::special_flags(xs)
}

/// One vector of [`Window`]: adds the squares of the eight values whose bits are `b` to the
/// lanes `d`; `base` is the window's lowest `e'` shifted into the exponent field. A value
/// below the window adds nothing, so no mask is needed for it: its shift `2 * (e' - base)`,
/// computed on wrapped 32-bit lanes, is 518 or more, and both shifted halves of its square
/// are then 0 (the caller adds such values one by one).
///
/// Few shifts (Zen 2 has one vector shift unit): `m` and the shift come from the exponent
/// field in place, `e' << 23 = max(bits & 0x7F80_0000, 1 << 23)`.
///
/// # Safety
///
/// AVX2 must be available.
#[inline(always)]
unsafe fn window_step(b: __m256i, base: __m256i, d: &mut [__m256i; 4]) {
    // SAFETY: AVX2 is available (the caller).
    unsafe {
        let lo32 = _mm256_set1_epi64x(0xFFFF_FFFF);
        let sign = _mm256_set1_epi64x(i64::MIN);
        let c64 = _mm256_set1_epi64x(64);
        let implicit = _mm256_set1_epi32(1 << 23);
        let a = _mm256_and_si256(b, _mm256_set1_epi32(0x7FFF_FFFF));
        let e1 = _mm256_max_epu32(
            _mm256_and_si256(b, _mm256_set1_epi32(0x7F80_0000)),
            implicit,
        );
        // Normal: (e << 23 | f) - (e << 23) + 2^23; subnormal: f - 2^23 + 2^23.
        let m = _mm256_add_epi32(_mm256_sub_epi32(a, e1), implicit);
        // The shift 2 * (e' - base): 0..=62 inside the window, 518..=1022 below it.
        let sh = _mm256_srli_epi32::<22>(_mm256_sub_epi32(e1, base));
        let mo = _mm256_srli_epi64::<32>(m);
        let (se, so) = (_mm256_and_si256(sh, lo32), _mm256_srli_epi64::<32>(sh));
        let halves = [
            (_mm256_mul_epu32(m, m), se, _mm256_sub_epi64(c64, se)),
            (_mm256_mul_epu32(mo, mo), so, _mm256_sub_epi64(c64, so)),
        ];
        for (h, (sq, s, r)) in halves.into_iter().enumerate() {
            let lo = _mm256_sllv_epi64(sq, s);
            // A count of 64 (s = 0) gives 0, the high half of an unshifted square.
            let hi = _mm256_srlv_epi64(sq, r);
            // d[2h] holds the low sum plus 2^63 (so that a signed compare is an unsigned one):
            // the addition carried iff the new sum is below `lo`.
            let sum = _mm256_add_epi64(d[2 * h], lo);
            let carry = _mm256_cmpgt_epi64(_mm256_xor_si256(lo, sign), sum);
            d[2 * h] = sum;
            d[2 * h + 1] = _mm256_add_epi64(_mm256_sub_epi64(d[2 * h + 1], carry), hi);
        }
    }
}

/// Where a block whose largest `e'` is `emax` puts the window, given the current one
/// (`base`, `used`): whether the lanes must be flushed first, and the new `base`. The window
/// keeps its place while the block fits under its top and it does not lie more than
/// [`WIN_SLACK`] binades above the block's own window.
#[inline(always)]
fn place_window(used: bool, base: u32, emax: u32) -> (bool, u32) {
    let want = (emax + 1).saturating_sub(WIN).clamp(1, 254 - WIN);
    let flush = used && (emax > base + WIN || want + WIN_SLACK < base);
    (flush, if used && !flush { base } else { want })
}

/// Adds the squares of the non-zero values of `xs` below the window (`e' < base`) one by
/// one into `acc` (the vector steps left them out).
#[inline(always)]
fn add_below(acc: &mut SquareSum, xs: &[f32], base: u32) {
    for &x in xs {
        let b = x.to_bits();
        let e1 = ((b >> 23) & 0xFF).max(1);
        if e1 < base && b & 0x7FFF_FFFF != 0 {
            acc.add(x);
        }
    }
}

impl Squares for Window {
    const SMALL: usize = 0;

    #[inline(always)]
    fn add_block(&mut self, acc: &mut SquareSum, xs: &[f32]) -> u8 {
        let _ = self.tok;
        let n = xs.len();
        let body = n - n % 8;
        let mut tail = [0u32; 8];
        for (t, x) in tail.iter_mut().zip(&xs[body..]) {
            *t = x.to_bits();
        }
        // SAFETY: AVX2 is available (token); the loads read xs[i..i + 8] with
        // i + 8 <= body <= n, or the 8-element `tail`.
        unsafe {
            // The largest magnitude (the window's top binade) and the smallest non-zero one
            // (`abs - 1` takes zeros to u32::MAX).
            let abs = _mm256_set1_epi32(0x7FFF_FFFF);
            let one = _mm256_set1_epi32(1);
            let t = _mm256_and_si256(_mm256_loadu_si256(tail.as_ptr().cast()), abs);
            let (mut mx, mut mn) = (t, _mm256_sub_epi32(t, one));
            let mut i = 0;
            while i < body {
                let b = _mm256_and_si256(_mm256_loadu_si256(xs.as_ptr().add(i).cast()), abs);
                mx = _mm256_max_epu32(mx, b);
                mn = _mm256_min_epu32(mn, _mm256_sub_epi32(b, one));
                i += 8;
            }
            let (mut hi, mut lo) = ([0u32; 8], [0u32; 8]);
            _mm256_storeu_si256(hi.as_mut_ptr().cast(), mx);
            _mm256_storeu_si256(lo.as_mut_ptr().cast(), mn);
            let emax = hi.iter().fold(0, |a, &l| a.max(l)) >> 23;
            // u32::MAX (all zero) gives 256: nothing below any window.
            let emin = ((u64::from(lo.iter().fold(u32::MAX, |a, &l| a.min(l))) + 1) >> 23).max(1);
            if emax == 0xFF {
                return cold_block(acc, xs);
            }
            let (flush, base) = place_window(self.used, self.base, emax);
            if flush {
                self.flush(acc);
            }
            self.base = base;
            self.used = true;
            let base = _mm256_set1_epi32((self.base << 23) as i32);
            let mut d = self.d;
            let mut i = 0;
            while i < body {
                let b = _mm256_loadu_si256(xs.as_ptr().add(i).cast());
                window_step(b, base, &mut d);
                i += 8;
            }
            if body < n {
                let b = _mm256_loadu_si256(tail.as_ptr().cast());
                window_step(b, base, &mut d);
            }
            self.d = d;
            if emin < u64::from(self.base) {
                add_below(acc, xs, self.base);
            }
        }
        0
    }

    #[inline(always)]
    fn flush(&mut self, acc: &mut SquareSum) {
        if !self.used {
            return;
        }
        // Per lane: the low 64 bits (stored plus 2^63) and the high ones; summed over the
        // lanes in 128 bits.
        let mut total: u128 = 0;
        for h in 0..2 {
            let (mut lo, mut hi) = ([0u64; 4], [0u64; 4]);
            // SAFETY: AVX is available (token); the arrays hold 4 u64 each.
            unsafe {
                _mm256_storeu_si256(lo.as_mut_ptr().cast(), self.d[2 * h]);
                _mm256_storeu_si256(hi.as_mut_ptr().cast(), self.d[2 * h + 1]);
            }
            for (l, h) in lo.into_iter().zip(hi) {
                // No overflow: see the bounds on `Window`.
                total = total.wrapping_add(u128::from(l ^ (1 << 63)) | u128::from(h) << 64);
            }
        }
        let s = 2 * self.base;
        acc.add_shifted(total as u64, s);
        acc.add_shifted((total >> 64) as u64, s + 64);
        *self = Window::new(self.tok);
    }
}

/// The AVX-512 form of [`Window`]: the same window of binades, placed the same way
/// ([`place_window`]), sixteen values a vector. The carry out of a low 64-bit lane is an
/// unsigned compare mask, added into the high lane with a masked add (the AVX2 form needs a
/// bias, a compare and a subtract for it).
///
/// Bounds between flushes (at most `FLUSH / 16 + 1` terms per lane, one per vector): each
/// term is below `2^110`, so a lane's sum is below `2^123` and the sum of the sixteen lanes
/// below `2^127`, as for [`Window`].
pub(crate) struct Window512 {
    tok: Avx512,
    /// `e'` of the window's lowest binade, in `1..=254 - WIN`.
    base: u32,
    /// Whether the lanes hold anything since the last flush.
    used: bool,
    /// 128-bit sums of the even and the odd 32-bit lanes: `[low, high]` each.
    d: [__m512i; 4],
}

impl Window512 {
    #[inline(always)]
    pub(crate) fn new(tok: Avx512) -> Self {
        // SAFETY: AVX-512F is available (token).
        let z = unsafe { _mm512_setzero_si512() };
        Window512 {
            tok,
            base: 1,
            used: false,
            d: [z; 4],
        }
    }
}

/// One vector of [`Window512`]: adds the squares of the sixteen values whose bits are `b`
/// to the lanes `d`, as [`window_step`] does for eight. A value below the window adds
/// nothing, so no mask is needed for it: its shift `2 * (e' - base)`, computed on wrapped
/// 32-bit lanes, is 518 or more, and both shifted halves of its square are then 0 (the
/// caller adds such values one by one).
///
/// # Safety
///
/// AVX-512F must be available.
#[inline(always)]
unsafe fn window_step512(b: __m512i, base: __m512i, d: &mut [__m512i; 4]) {
    // SAFETY: AVX-512F is available (the caller).
    unsafe {
        let lo32 = _mm512_set1_epi64(0xFFFF_FFFF);
        let c64 = _mm512_set1_epi64(64);
        let one = _mm512_set1_epi64(1);
        let implicit = _mm512_set1_epi32(1 << 23);
        let a = _mm512_and_si512(b, _mm512_set1_epi32(0x7FFF_FFFF));
        let e1 = _mm512_max_epu32(
            _mm512_and_si512(b, _mm512_set1_epi32(0x7F80_0000)),
            implicit,
        );
        let m = _mm512_add_epi32(_mm512_sub_epi32(a, e1), implicit);
        // The shift 2 * (e' - base): 0..=62 inside the window, 518..=1022 below it.
        let sh = _mm512_srli_epi32::<22>(_mm512_sub_epi32(e1, base));
        let mo = _mm512_srli_epi64::<32>(m);
        let (se, so) = (_mm512_and_si512(sh, lo32), _mm512_srli_epi64::<32>(sh));
        let halves = [
            (_mm512_mul_epu32(m, m), se, _mm512_sub_epi64(c64, se)),
            (_mm512_mul_epu32(mo, mo), so, _mm512_sub_epi64(c64, so)),
        ];
        for (h, (sq, s, r)) in halves.into_iter().enumerate() {
            let lo = _mm512_sllv_epi64(sq, s);
            // A count of 64 (s = 0) gives 0, the high half of an unshifted square.
            let hi = _mm512_add_epi64(d[2 * h + 1], _mm512_srlv_epi64(sq, r));
            let sum = _mm512_add_epi64(d[2 * h], lo);
            // The addition carried iff the new sum is below `lo`.
            let carry = _mm512_cmplt_epu64_mask(sum, lo);
            d[2 * h] = sum;
            d[2 * h + 1] = _mm512_mask_add_epi64(hi, carry, hi, one);
        }
    }
}

impl Squares for Window512 {
    const SMALL: usize = 0;

    #[inline(always)]
    fn add_block(&mut self, acc: &mut SquareSum, xs: &[f32]) -> u8 {
        let _ = self.tok;
        let n = xs.len();
        let body = n - n % 16;
        let mut tail = [0u32; 16];
        for (t, x) in tail.iter_mut().zip(&xs[body..]) {
            *t = x.to_bits();
        }
        // SAFETY: AVX-512F is available (token); the loads read xs[i..i + 16] with
        // i + 16 <= body <= n, or the 16-element `tail`.
        unsafe {
            // The largest magnitude (the window's top binade) and the smallest non-zero one
            // (`abs - 1` takes zeros to u32::MAX).
            let abs = _mm512_set1_epi32(0x7FFF_FFFF);
            let one = _mm512_set1_epi32(1);
            let t = _mm512_and_si512(_mm512_loadu_si512(tail.as_ptr().cast()), abs);
            let (mut mx, mut mn) = (t, _mm512_sub_epi32(t, one));
            let mut i = 0;
            while i < body {
                let b = _mm512_and_si512(_mm512_loadu_si512(xs.as_ptr().add(i).cast()), abs);
                mx = _mm512_max_epu32(mx, b);
                mn = _mm512_min_epu32(mn, _mm512_sub_epi32(b, one));
                i += 16;
            }
            let emax = _mm512_reduce_max_epu32(mx) >> 23;
            // u32::MAX (all zero) gives 256: nothing below any window.
            let emin = ((u64::from(_mm512_reduce_min_epu32(mn)) + 1) >> 23).max(1);
            if emax == 0xFF {
                return cold_block(acc, xs);
            }
            let (flush, base) = place_window(self.used, self.base, emax);
            if flush {
                self.flush(acc);
            }
            self.base = base;
            self.used = true;
            let base = _mm512_set1_epi32((self.base << 23) as i32);
            let mut d = self.d;
            let mut i = 0;
            while i < body {
                let b = _mm512_loadu_si512(xs.as_ptr().add(i).cast());
                window_step512(b, base, &mut d);
                i += 16;
            }
            if body < n {
                let b = _mm512_loadu_si512(tail.as_ptr().cast());
                window_step512(b, base, &mut d);
            }
            self.d = d;
            if emin < u64::from(self.base) {
                add_below(acc, xs, self.base);
            }
        }
        0
    }

    #[inline(always)]
    fn flush(&mut self, acc: &mut SquareSum) {
        if !self.used {
            return;
        }
        // Per lane: the low 64 bits and the high ones; summed over the lanes in 128 bits.
        let mut total: u128 = 0;
        for h in 0..2 {
            let (mut lo, mut hi) = ([0u64; 8], [0u64; 8]);
            // SAFETY: AVX-512F is available (token); the arrays hold 8 u64 each.
            unsafe {
                _mm512_storeu_si512(lo.as_mut_ptr().cast(), self.d[2 * h]);
                _mm512_storeu_si512(hi.as_mut_ptr().cast(), self.d[2 * h + 1]);
            }
            for (l, h) in lo.into_iter().zip(hi) {
                // No overflow: see the bounds on `Window512`.
                total = total.wrapping_add(u128::from(l) | u128::from(h) << 64);
            }
        }
        let s = 2 * self.base;
        acc.add_shifted(total as u64, s);
        acc.add_shifted((total >> 64) as u64, s + 64);
        *self = Window512::new(self.tok);
    }
}

/// Round to nearest-even for the F16C store (imm8 bits 1:0 = 00, bit 2 = 0: not MXCSR.RC).
const RNE: i32 = _MM_FROUND_TO_NEAREST_INT;
/// Round to nearest-even, exceptions suppressed, for the AVX-512 `vcvtps2ph`.
const RNE_SAE: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

// SAFETY: an `Avx2` value only exists when the CPU supports AVX2+FMA+F16C (it holds pulp's
// `V3F16c` proof, whose only constructors detect the features or are unsafe with that
// contract), which is all the methods below use.
unsafe impl Simd for Avx2 {
    type F = __m256;
    type Acc = (__m256d, __m256d);
    const LANES: usize = 8;

    #[inline(always)]
    fn splat(self, x: f32) -> __m256 {
        // SAFETY: AVX is available (token).
        unsafe { _mm256_set1_ps(x) }
    }
    #[inline(always)]
    fn add(self, a: __m256, b: __m256) -> __m256 {
        // SAFETY: AVX is available (token).
        unsafe { _mm256_add_ps(a, b) }
    }
    #[inline(always)]
    fn sub(self, a: __m256, b: __m256) -> __m256 {
        // SAFETY: AVX is available (token).
        unsafe { _mm256_sub_ps(a, b) }
    }
    #[inline(always)]
    fn mul(self, a: __m256, b: __m256) -> __m256 {
        // SAFETY: AVX is available (token).
        unsafe { _mm256_mul_ps(a, b) }
    }
    #[inline(always)]
    fn div(self, a: __m256, b: __m256) -> __m256 {
        // SAFETY: AVX is available (token).
        unsafe { _mm256_div_ps(a, b) }
    }
    #[inline(always)]
    fn sqrt(self, a: __m256) -> __m256 {
        // SAFETY: AVX is available (token).
        unsafe { _mm256_sqrt_ps(a) }
    }
    #[inline(always)]
    fn neg(self, a: __m256) -> __m256 {
        // SAFETY: AVX is available (token).
        unsafe { _mm256_xor_ps(a, _mm256_set1_ps(-0.0)) }
    }
    #[inline(always)]
    fn clip(self, g: __m256, c: __m256, nc: __m256) -> __m256 {
        // SAFETY: AVX is available (token).
        unsafe {
            let t = _mm256_blendv_ps(g, nc, _mm256_cmp_ps::<_CMP_LT_OQ>(g, nc));
            _mm256_blendv_ps(t, c, _mm256_cmp_ps::<_CMP_GT_OQ>(g, c))
        }
    }
    #[inline(always)]
    fn ge_select(self, a: __m256, b: __m256) -> __m256 {
        // SAFETY: AVX is available (token).
        unsafe { _mm256_blendv_ps(b, a, _mm256_cmp_ps::<_CMP_GE_OQ>(a, b)) }
    }

    #[inline(always)]
    unsafe fn load_f32(self, p: *const f32) -> __m256 {
        // SAFETY: AVX is available (token); the caller guarantees 8 readable f32.
        unsafe { _mm256_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store_f32(self, p: *mut f32, x: __m256) {
        // SAFETY: AVX is available (token); the caller guarantees 8 writable f32.
        unsafe { _mm256_storeu_ps(p, x) }
    }
    #[inline(always)]
    unsafe fn load_f16(self, p: *const u16) -> __m256 {
        // SAFETY: F16C is available (token); the caller guarantees 8 readable u16.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }
    #[inline(always)]
    unsafe fn store_f16(self, p: *mut u16, x: __m256) {
        // SAFETY: F16C is available (token); the caller guarantees 8 writable u16.
        unsafe { _mm_storeu_si128(p.cast(), _mm256_cvtps_ph::<RNE>(x)) }
    }
    #[inline(always)]
    unsafe fn load_bf16(self, p: *const u16) -> __m256 {
        // SAFETY: AVX2 is available (token); the caller guarantees 8 readable u16.
        unsafe {
            let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(h))
        }
    }
    #[inline(always)]
    unsafe fn store_bf16(self, p: *mut u16, x: __m256) {
        // SAFETY: AVX2 is available (token); the caller guarantees 8 writable u16.
        unsafe {
            let b = _mm256_castps_si256(x);
            // NaN lanes (unordered with themselves): all ones.
            let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(x, x));
            let hi = _mm256_srli_epi32::<16>(b);
            let lsb = _mm256_and_si256(hi, _mm256_set1_epi32(1));
            let rounded = _mm256_srli_epi32::<16>(_mm256_add_epi32(
                _mm256_add_epi32(b, _mm256_set1_epi32(0x7FFF)),
                lsb,
            ));
            let r = if _mm256_movemask_ps(_mm256_castsi256_ps(nan)) != 0 {
                let quiet = _mm256_or_si256(hi, _mm256_set1_epi32(0x40));
                _mm256_blendv_epi8(rounded, quiet, nan)
            } else {
                rounded
            };
            // Every lane is in 0..=0xFFFF, so the unsigned-saturating pack is exact.
            let packed =
                _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256::<1>(r));
            _mm_storeu_si128(p.cast(), packed);
        }
    }

    #[inline(always)]
    fn prefetch<T>(self, p: *const T) {
        // SAFETY: SSE is baseline on x86-64; a prefetch never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast()) }
    }

    type Squares = Window;
    #[inline(always)]
    fn squares(self) -> Window {
        Window::new(self)
    }

    #[inline(always)]
    fn acc_zero(self) -> (__m256d, __m256d) {
        // SAFETY: AVX is available (token).
        unsafe { (_mm256_setzero_pd(), _mm256_setzero_pd()) }
    }
    #[inline(always)]
    fn acc_add_squares(self, acc: (__m256d, __m256d), x: __m256) -> (__m256d, __m256d) {
        // SAFETY: AVX is available (token).
        unsafe {
            let lo = _mm256_cvtps_pd(_mm256_castps256_ps128(x));
            let hi = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(x));
            (
                _mm256_add_pd(acc.0, _mm256_mul_pd(lo, lo)),
                _mm256_add_pd(acc.1, _mm256_mul_pd(hi, hi)),
            )
        }
    }
    #[inline(always)]
    fn acc_to_array(self, acc: (__m256d, __m256d)) -> [f64; 8] {
        let mut out = [0.0f64; 8];
        // SAFETY: AVX is available (token); `out` holds 8 f64.
        unsafe {
            _mm256_storeu_pd(out.as_mut_ptr(), acc.0);
            _mm256_storeu_pd(out.as_mut_ptr().add(4), acc.1);
        }
        out
    }

    #[inline(always)]
    fn max_abs_bits(self, m: __m256, x: __m256) -> __m256 {
        // SAFETY: AVX2 is available (token).
        unsafe {
            let a = _mm256_and_si256(_mm256_castps_si256(x), _mm256_set1_epi32(0x7FFF_FFFF));
            _mm256_castsi256_ps(_mm256_max_epu32(_mm256_castps_si256(m), a))
        }
    }
    #[inline(always)]
    fn max_lane_bits(self, m: __m256) -> u32 {
        let mut out = [0u32; 8];
        // SAFETY: AVX is available (token); `out` holds 8 u32.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr().cast(), m) };
        out.into_iter().fold(0, u32::max)
    }
}

// SAFETY: an `Avx512` value only exists when the CPU supports AVX-512 F/BW/DQ/VL plus the AVX2
// set (it holds pulp's `V4F16c` proof, whose only constructors detect the features or are
// unsafe with that contract), which is all the methods below use.
unsafe impl Simd for Avx512 {
    type F = __m512;
    type Acc = __m512d;
    const LANES: usize = 16;

    #[inline(always)]
    fn splat(self, x: f32) -> __m512 {
        // SAFETY: AVX-512F is available (token).
        unsafe { _mm512_set1_ps(x) }
    }
    #[inline(always)]
    fn add(self, a: __m512, b: __m512) -> __m512 {
        // SAFETY: AVX-512F is available (token).
        unsafe { _mm512_add_ps(a, b) }
    }
    #[inline(always)]
    fn sub(self, a: __m512, b: __m512) -> __m512 {
        // SAFETY: AVX-512F is available (token).
        unsafe { _mm512_sub_ps(a, b) }
    }
    #[inline(always)]
    fn mul(self, a: __m512, b: __m512) -> __m512 {
        // SAFETY: AVX-512F is available (token).
        unsafe { _mm512_mul_ps(a, b) }
    }
    #[inline(always)]
    fn div(self, a: __m512, b: __m512) -> __m512 {
        // SAFETY: AVX-512F is available (token).
        unsafe { _mm512_div_ps(a, b) }
    }
    #[inline(always)]
    fn sqrt(self, a: __m512) -> __m512 {
        // SAFETY: AVX-512F is available (token).
        unsafe { _mm512_sqrt_ps(a) }
    }
    /// The square root without the divider: `vrsqrt14ps`, one Newton step, then an exact
    /// choice among the result and its two neighbours. The same bits as `vsqrtps` for every
    /// input (checked on all 2^32 by a test); the argument:
    ///
    /// * Fast-path lanes are `2^-100 <= x < +inf` and `x == +0`; a vector with any other
    ///   lane (negative, subnormal, tiny, infinite, NaN) takes `vsqrtps` as a whole. In the
    ///   range nothing below over- or underflows.
    /// * `y = rsqrt14(x)` has relative error below 2^-14 (the architectural bound, on every
    ///   vendor). With `s0 = RN(x*y)`, `h0 = y/2`, `r0 = RN(x - s0^2)` (one rounding, FMA)
    ///   and `s1 = RN(s0 + r0*h0)`, the error before the last rounding is about
    ///   `1.5 * 2^-28` relative, so `|s1 - sqrt(x)| < 0.6 ulp`: the correctly rounded root is
    ///   `s1` or one of its float neighbours `s-`, `s+` (the bit pattern -1, +1).
    /// * Tuckerman's test: `x` and `s- * s1` are both integer multiples of
    ///   `(s1 - s-)^2 / 2`, so `x <= s- * s1` iff `sqrt(x)` is below the midpoint of `s-`
    ///   and `s1`, i.e. the answer is `s-`; the FMA `RN(x - s- * s1)` has the exact sign
    ///   of that difference (a non-zero value of magnitude at least 2^-147 does not round
    ///   to zero). Symmetrically `x - s1 * s+ > 0` iff the answer is `s+`. Ties cannot
    ///   occur (a midpoint has 25 significant bits; its square is never an f32).
    /// * `x == +0`: the masked `rsqrt14` gives `y = 0`, so everything is 0, and neither
    ///   neighbour test fires (`s-` is a NaN pattern, `x - s1 * s+ = 0`): the result is +0.
    ///
    /// FMA is used here only inside this exactly rounded operation; the update formula
    /// itself has no contraction.
    #[inline(always)]
    fn sqrt_alt(self, x: __m512) -> __m512 {
        /// 2^-100 and +inf as bit patterns: the fast-path range `[LO, HI)`.
        const LO: u32 = 27 << 23;
        const HI: u32 = 0x7F80_0000;
        // SAFETY: AVX-512F is available (token).
        unsafe {
            let xi = _mm512_castps_si512(x);
            let in_range = _mm512_cmplt_epu32_mask(
                _mm512_sub_epi32(xi, _mm512_set1_epi32(LO as i32)),
                _mm512_set1_epi32((HI - LO) as i32),
            );
            let zero = _mm512_testn_epi32_mask(xi, xi);
            if (in_range | zero) != 0xFFFF {
                return _mm512_sqrt_ps(x);
            }
            let y = _mm512_maskz_rsqrt14_ps(in_range, x);
            let s0 = _mm512_mul_ps(x, y);
            let h0 = _mm512_mul_ps(y, _mm512_set1_ps(0.5));
            let r0 = _mm512_fnmadd_ps(s0, s0, x);
            let s1 = _mm512_fmadd_ps(r0, h0, s0);
            let si = _mm512_castps_si512(s1);
            let one = _mm512_set1_epi32(1);
            let s_dn = _mm512_castsi512_ps(_mm512_sub_epi32(si, one));
            let s_up = _mm512_castsi512_ps(_mm512_add_epi32(si, one));
            let t_dn = _mm512_fnmadd_ps(s_dn, s1, x);
            let t_up = _mm512_fnmadd_ps(s_up, s1, x);
            let zero = _mm512_setzero_ps();
            let k_dn = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(t_dn, zero);
            let k_up = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(t_up, zero);
            _mm512_mask_mov_ps(_mm512_mask_mov_ps(s1, k_dn, s_dn), k_up, s_up)
        }
    }
    #[inline(always)]
    fn neg(self, a: __m512) -> __m512 {
        // SAFETY: AVX-512F is available (token).
        unsafe {
            _mm512_castsi512_ps(_mm512_xor_si512(
                _mm512_castps_si512(a),
                _mm512_set1_epi32(i32::MIN),
            ))
        }
    }
    #[inline(always)]
    fn clip(self, g: __m512, c: __m512, nc: __m512) -> __m512 {
        // SAFETY: AVX-512F is available (token).
        unsafe {
            let t = _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_LT_OQ>(g, nc), g, nc);
            _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_GT_OQ>(g, c), t, c)
        }
    }
    #[inline(always)]
    fn ge_select(self, a: __m512, b: __m512) -> __m512 {
        // SAFETY: AVX-512F is available (token).
        unsafe { _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_GE_OQ>(a, b), b, a) }
    }

    #[inline(always)]
    unsafe fn load_f32(self, p: *const f32) -> __m512 {
        // SAFETY: AVX-512F is available (token); the caller guarantees 16 readable f32.
        unsafe { _mm512_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store_f32(self, p: *mut f32, x: __m512) {
        // SAFETY: AVX-512F is available (token); the caller guarantees 16 writable f32.
        unsafe { _mm512_storeu_ps(p, x) }
    }
    #[inline(always)]
    unsafe fn load_f16(self, p: *const u16) -> __m512 {
        // SAFETY: AVX-512F is available (token); the caller guarantees 16 readable u16.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
    }
    #[inline(always)]
    unsafe fn store_f16(self, p: *mut u16, x: __m512) {
        // SAFETY: AVX-512F is available (token); the caller guarantees 16 writable u16.
        unsafe { _mm256_storeu_si256(p.cast(), _mm512_cvtps_ph::<RNE_SAE>(x)) }
    }
    #[inline(always)]
    unsafe fn load_bf16(self, p: *const u16) -> __m512 {
        // SAFETY: AVX-512F is available (token); the caller guarantees 16 readable u16.
        unsafe {
            let h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast()));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(h))
        }
    }
    #[inline(always)]
    unsafe fn store_bf16(self, p: *mut u16, x: __m512) {
        // SAFETY: AVX-512F is available (token); the caller guarantees 16 writable u16.
        unsafe {
            let b = _mm512_castps_si512(x);
            let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
            let hi = _mm512_srli_epi32::<16>(b);
            let lsb = _mm512_and_si512(hi, _mm512_set1_epi32(1));
            let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(
                _mm512_add_epi32(b, _mm512_set1_epi32(0x7FFF)),
                lsb,
            ));
            // NaN lanes: the high half with the quiet bit, in one masked OR.
            let r = _mm512_mask_or_epi32(rounded, nan, hi, _mm512_set1_epi32(0x40));
            // Every lane is in 0..=0xFFFF: the truncating narrow is exact.
            _mm256_storeu_si256(p.cast(), _mm512_cvtepi32_epi16(r));
        }
    }

    #[inline(always)]
    fn prefetch<T>(self, p: *const T) {
        // SAFETY: SSE is baseline on x86-64; a prefetch never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast()) }
    }

    type Squares = Window512;
    #[inline(always)]
    fn squares(self) -> Window512 {
        Window512::new(self)
    }

    #[inline(always)]
    fn acc_zero(self) -> __m512d {
        // SAFETY: AVX-512F is available (token).
        unsafe { _mm512_setzero_pd() }
    }
    #[inline(always)]
    fn acc_add_squares(self, acc: __m512d, x: __m512) -> __m512d {
        // SAFETY: AVX-512F/DQ are available (token).
        unsafe {
            let lo = _mm512_cvtps_pd(_mm512_castps512_ps256(x));
            let hi = _mm512_cvtps_pd(_mm512_extractf32x8_ps::<1>(x));
            // Lanes 0..8 first, then 8..16: element j still goes to accumulator j % 8 in order.
            let acc = _mm512_add_pd(acc, _mm512_mul_pd(lo, lo));
            _mm512_add_pd(acc, _mm512_mul_pd(hi, hi))
        }
    }
    #[inline(always)]
    fn acc_to_array(self, acc: __m512d) -> [f64; 8] {
        let mut out = [0.0f64; 8];
        // SAFETY: AVX-512F is available (token); `out` holds 8 f64.
        unsafe { _mm512_storeu_pd(out.as_mut_ptr(), acc) };
        out
    }

    #[inline(always)]
    fn max_abs_bits(self, m: __m512, x: __m512) -> __m512 {
        // SAFETY: AVX-512F is available (token).
        unsafe {
            let a = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7FFF_FFFF));
            _mm512_castsi512_ps(_mm512_max_epu32(_mm512_castps_si512(m), a))
        }
    }
    #[inline(always)]
    fn max_lane_bits(self, m: __m512) -> u32 {
        let mut out = [0u32; 16];
        // SAFETY: AVX-512F is available (token); `out` holds 16 u32.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr().cast(), m) };
        out.into_iter().fold(0, u32::max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts the lanes where `sqrt_alt` and `vsqrtps` differ bitwise over every input (in
    /// vectors of 16 consecutive bit patterns, and every fourth vector again with +0 in half
    /// its lanes, which stays on the fast path); returns (count, first differing vector).
    ///
    /// # Safety
    ///
    /// The CPU must support AVX-512 F/BW/DQ/VL, AVX2, FMA and F16C.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")]
    unsafe fn sqrt_alt_mismatches() -> (u64, Option<u32>) {
        // SAFETY: the caller guarantees the features.
        let s = unsafe { Avx512::new_unchecked() };
        let differ = |x: __m512i| -> u16 {
            let f = _mm512_castsi512_ps(x);
            let a = _mm512_castps_si512(s.sqrt_alt(f));
            let b = _mm512_castps_si512(_mm512_sqrt_ps(f));
            _mm512_cmpneq_epi32_mask(a, b)
        };
        let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        let (mut mismatches, mut first) = (0u64, None);
        for base in (0..=u32::MAX).step_by(16) {
            let x = _mm512_add_epi32(_mm512_set1_epi32(base as i32), lanes);
            let mut d = differ(x);
            if base % 64 == 0 {
                d |= differ(_mm512_mask_mov_epi32(x, 0x5555, _mm512_setzero_si512()));
            }
            if d != 0 {
                mismatches += u64::from(d.count_ones());
                first.get_or_insert(base);
            }
        }
        (mismatches, first)
    }

    /// Counts the f32 bit patterns whose AVX-512 bf16 store differs from `half`'s
    /// `bf16::from_f32` (every one of the 2^32, in vectors of 16), and the bf16 patterns
    /// whose AVX-512 load is not the exact widening (all 2^16; `bf16::to_f32` for every
    /// non-NaN); returns the counts and the first differing pattern of each.
    ///
    /// # Safety
    ///
    /// The CPU must support AVX-512 F/BW/DQ/VL, AVX2, FMA and F16C.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")]
    unsafe fn bf16_mismatches() -> (u64, Option<u32>, u64, Option<u16>) {
        // SAFETY: the caller guarantees the features.
        let s = unsafe { Avx512::new_unchecked() };
        let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        let (mut stores, mut first_store) = (0u64, None);
        let mut out = [0u16; 16];
        for base in (0..=u32::MAX).step_by(16) {
            let x = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_set1_epi32(base as i32), lanes));
            // SAFETY: `out` holds 16 writable u16.
            unsafe { s.store_bf16(out.as_mut_ptr(), x) };
            for (l, &got) in out.iter().enumerate() {
                let bits = base + l as u32;
                if got != half::bf16::from_f32(f32::from_bits(bits)).to_bits() {
                    stores += 1;
                    first_store.get_or_insert(bits);
                }
            }
        }
        let (mut loads, mut first_load) = (0u64, None);
        let mut wide = [0f32; 16];
        for base in (0..=u16::MAX).step_by(16) {
            let src: [u16; 16] = core::array::from_fn(|l| base + l as u16);
            // SAFETY: `src` holds 16 readable u16, `wide` 16 writable f32.
            unsafe { _mm512_storeu_ps(wide.as_mut_ptr(), s.load_bf16(src.as_ptr())) };
            for (&h, &got) in src.iter().zip(&wide) {
                // Exact widening: the bits shifted up. (`half` also quiets signalling NaNs,
                // which arithmetic does anyway; NaN payloads are outside the contract.)
                if got.to_bits() != u32::from(h) << 16 {
                    loads += 1;
                    first_load.get_or_insert(h);
                }
            }
        }
        (stores, first_store, loads, first_load)
    }

    /// The AVX-512 bf16 store (round to nearest even, NaN quieted) equals `half` bit for bit
    /// on every input, and the load widens every input exactly. Slow unoptimized; CI runs it in release:
    /// `cargo test --release -p lazyadam-kernels --lib -- --ignored avx512_bf16_matches_half_exhaustive`.
    #[test]
    #[ignore = "2^32 conversions: run in release"]
    fn avx512_bf16_matches_half_exhaustive() {
        if !crate::Isa::Avx512.is_supported() {
            return;
        }
        // SAFETY: AVX-512 support was just checked.
        let (stores, first_store, loads, first_load) = unsafe { bf16_mismatches() };
        assert_eq!(stores, 0, "first mismatching f32 pattern {first_store:#x?}");
        assert_eq!(loads, 0, "first mismatching bf16 pattern {first_load:#x?}");
    }

    /// Counts the f32 bit patterns whose AVX2 bf16 store differs from `half`'s
    /// `bf16::from_f32`, over all 2^32 of them in vectors of 8 lanes taken in an odd-multiplier
    /// order (so NaN lanes share vectors with other lanes and both sides of the store's NaN
    /// branch run); returns the count and the first differing pattern.
    ///
    /// # Safety
    ///
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn avx2_bf16_store_mismatches() -> (u64, Option<u32>) {
        // SAFETY: the caller guarantees the features.
        let s = unsafe { Avx2::new_unchecked() };
        let (mut mismatches, mut first) = (0u64, None);
        let mut out = [0u16; 8];
        for base in (0..=u32::MAX).step_by(8) {
            let bits: [u32; 8] =
                core::array::from_fn(|l| (base + l as u32).wrapping_mul(0x9E37_79B1));
            // SAFETY: `bits` holds 8 readable u32, `out` 8 writable u16.
            unsafe {
                let x = _mm256_loadu_ps(bits.as_ptr().cast());
                s.store_bf16(out.as_mut_ptr(), x);
            }
            for (&b, &got) in bits.iter().zip(&out) {
                if got != half::bf16::from_f32(f32::from_bits(b)).to_bits() {
                    mismatches += 1;
                    first.get_or_insert(b);
                }
            }
        }
        (mismatches, first)
    }

    /// The AVX2 bf16 store (round to nearest even, NaN quieted) equals `half` bit for bit on
    /// every input. Slow unoptimized; CI runs it in release:
    /// `cargo test --release -p lazyadam-kernels --lib -- --ignored avx2_bf16_store_matches_half_exhaustive`.
    #[test]
    #[ignore = "2^32 conversions: run in release"]
    fn avx2_bf16_store_matches_half_exhaustive() {
        if !crate::Isa::Avx2.is_supported() {
            return;
        }
        // SAFETY: AVX2 support (with FMA and F16C) was just checked.
        let (mismatches, first) = unsafe { avx2_bf16_store_mismatches() };
        assert_eq!(mismatches, 0, "first mismatching f32 pattern {first:#x?}");
    }

    /// `Avx512::sqrt_alt` equals `vsqrtps` bit for bit on every one of the 2^32 inputs (NaN
    /// results included).
    #[test]
    fn avx512_sqrt_alt_is_exact_on_every_input() {
        if !crate::Isa::Avx512.is_supported() {
            return;
        }
        // SAFETY: AVX-512 support was just checked.
        let (mismatches, first) = unsafe { sqrt_alt_mismatches() };
        assert_eq!(
            mismatches, 0,
            "first mismatching vector starts at {first:?}"
        );
    }
}
