//! The exact sum of squares ([`SquareSum`], `Kernels::sum_squares_exact`): against an
//! independent big-integer reference with its own rounding, order and split independence,
//! every path against the scalar one, deliberate rounding ties and carries, flags, the byte
//! form, and the gradient transform.

use crate::common::*;
use lazyadam_kernels::{Element, GradTransform, Isa, Kernels, SquareSum, bf16, f16};
use proptest::prelude::*;

fn paths() -> Vec<Kernels> {
    Isa::supported()
        .map(|isa| Kernels::new(isa).expect("supported"))
        .collect()
}

fn scalar() -> Kernels {
    Kernels::new(Isa::Scalar).unwrap()
}

const ID: GradTransform = GradTransform {
    scale: 1.0,
    clip: None,
    negate: false,
};

// ---------------------------------------------------------------------------------------
// Independent reference: a big integer in 32-bit limbs, counting units of 2^-300, with a
// bit-by-bit round-to-nearest-even to f64.

/// 768 bits in u32 limbs, least significant first.
#[derive(Clone, Debug, PartialEq)]
struct Big(Vec<u32>);

impl Big {
    fn new() -> Big {
        Big(vec![0; 24])
    }

    /// Adds `v << s`.
    fn add_shifted(&mut self, v: u128, s: usize) {
        let (mut i, r) = (s / 32, s % 32);
        // v < 2^96 here, so v << r < 2^128.
        let mut carry: u128 = v << r;
        while carry != 0 {
            let sum = u128::from(self.0[i]) + (carry & 0xFFFF_FFFF);
            self.0[i] = sum as u32;
            carry = (carry >> 32) + (sum >> 32);
            i += 1;
        }
    }

    /// Adds the square of a finite f32, decoded from its fields without any float operation.
    fn add_square(&mut self, x: f32) {
        let b = x.to_bits();
        let (e, f) = ((b >> 23) & 0xFF, b & 0x7F_FFFF);
        assert!(e != 0xFF);
        let (m, e1) = if e == 0 { (f, 1) } else { (f | 1 << 23, e) };
        let m = u128::from(m);
        self.add_shifted(m * m, 2 * e1 as usize);
    }

    fn bit(&self, i: usize) -> bool {
        (self.0[i / 32] >> (i % 32)) & 1 == 1
    }

    fn top(&self) -> Option<usize> {
        (0..self.0.len() * 32).rev().find(|&i| self.bit(i))
    }

    /// The value `self * 2^-300` rounded to nearest-even f64, field by field.
    fn to_f64(&self) -> f64 {
        let Some(p) = self.top() else { return 0.0 };
        // Significand: bits p..p-52 (missing low bits are zero).
        let mut q: u64 = 0;
        for j in 0..53 {
            q <<= 1;
            if p >= j && self.bit(p - j) {
                q |= 1;
            }
        }
        let guard = p >= 53 && self.bit(p - 53);
        let sticky = p >= 54 && (0..p - 53).any(|i| self.bit(i));
        let mut exp = p as i64 - 300; // the unbiased exponent of the leading bit
        if guard && (sticky || q & 1 == 1) {
            q += 1;
            if q == 1 << 53 {
                q >>= 1;
                exp += 1;
            }
        }
        assert!((-1022..=1023).contains(&exp), "outside the normal range");
        f64::from_bits(((exp + 1023) as u64) << 52 | (q & ((1 << 52) - 1)))
    }

    /// The low 640 bits as little-endian bytes (the limbs of the byte form).
    fn bytes640(&self) -> Vec<u8> {
        self.0[..20].iter().flat_map(|l| l.to_le_bytes()).collect()
    }
}

fn reference(xs: &[f32]) -> Big {
    let mut b = Big::new();
    for &x in xs {
        b.add_square(x);
    }
    b
}

/// One value at a time through `SquareSum::add`.
fn one_by_one(xs: &[f32]) -> SquareSum {
    let mut s = SquareSum::new();
    for &x in xs {
        s.add(x);
    }
    s
}

// ---------------------------------------------------------------------------------------
// Strategies.

/// A finite f32, with the ranges that stress the exact sum mixed in.
fn finite() -> impl Strategy<Value = f32> {
    let sign = |x: f32, neg: bool| if neg { -x } else { x };
    prop_oneof![
        2 => prop::sample::select(&[0.0f32, -0.0, 1e-45, -1e-45, f32::MAX, -f32::MAX,
                                    f32::MIN_POSITIVE, 1.0, -1.0][..]),
        2 => (0u32..0x0080_0000, any::<bool>()).prop_map(move |(b, n)| sign(f32::from_bits(b), n)),
        2 => (0x7F00_0000u32..0x7F80_0000, any::<bool>())
            .prop_map(move |(b, n)| sign(f32::from_bits(b), n)),
        2 => (0u32..0x7F80_0000, any::<bool>()).prop_map(move |(b, n)| sign(f32::from_bits(b), n)),
        4 => (-1.0f32..1.0, -30i32..5).prop_map(|(x, k)| x * 2f32.powi(k)),
    ]
}

/// Rows of finite values whose squares cluster (as gradients do) or spread.
fn finite_row(max: usize) -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(finite(), 0..max)
}

// ---------------------------------------------------------------------------------------
// Against the reference.

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// The limbs are the exact integer and `to_f64` its correct rounding, one value at a
    /// time and through every path.
    #[test]
    fn matches_big_integer_reference(xs in finite_row(300)) {
        let want = reference(&xs);
        let one = one_by_one(&xs);
        prop_assert!(one.is_finite());
        prop_assert_eq!(&one.to_bytes()[..80], &want.bytes640()[..]);
        prop_assert_eq!(one.to_bytes()[80], 0);
        prop_assert_eq!(one.to_f64().to_bits(), want.to_f64().to_bits(),
            "{} vs {}", one.to_f64(), want.to_f64());
        for k in paths() {
            prop_assert_eq!(k.sum_squares_exact(&xs, &ID), one, "{}", k.isa());
        }
    }

    /// Any permutation and any split into pieces merged in any order: equal sums and bits.
    #[test]
    fn order_and_split_independent(
        xs in finite_row(400),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
        perm_seed in any::<u64>(),
        merge_seed in any::<u64>(),
    ) {
        let whole = scalar().sum_squares_exact(&xs, &ID);
        // A permutation (Fisher-Yates with a splitmix sequence).
        let mut ys = xs.clone();
        let mut z = perm_seed;
        let mut next = move || { z = z.wrapping_add(0x9E37_79B9_7F4A_7C15); let mut r = z;
            r = (r ^ (r >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            r = (r ^ (r >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB); r ^ (r >> 31) };
        for i in (1..ys.len()).rev() {
            ys.swap(i, (next() % (i as u64 + 1)) as usize);
        }
        let mut cut: Vec<usize> = cuts.iter().map(|c| c.index(ys.len() + 1)).collect();
        cut.push(0);
        cut.push(ys.len());
        cut.sort();
        let ks = paths();
        let mut parts: Vec<SquareSum> = cut.windows(2).enumerate()
            .map(|(j, w)| ks[j % ks.len()].sum_squares_exact(&ys[w[0]..w[1]], &ID))
            .collect();
        // Merge in a random tree order.
        let mut m = merge_seed;
        while parts.len() > 1 {
            m = m.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let i = (m >> 33) as usize % parts.len();
            let a = parts.swap_remove(i);
            let j = (m >> 17) as usize % parts.len();
            parts[j].merge(&a);
        }
        let got = parts.pop().unwrap_or_default();
        prop_assert_eq!(got, whole);
        prop_assert_eq!(got.to_f64().to_bits(), whole.to_f64().to_bits());
        prop_assert_eq!(got.to_bytes(), whole.to_bytes());
        // accumulate_squares into a running sum, piece by piece, gives the same.
        let mut acc = SquareSum::new();
        for w in cut.windows(2) {
            Kernels::best().accumulate_squares(&mut acc, &ys[w[0]..w[1]], &ID);
        }
        prop_assert_eq!(acc, whole);
    }

    /// Every path equals scalar, for every gradient type and transform, specials included.
    #[test]
    fn every_path_matches_scalar(
        t in transform(),
        n in prop_oneof![0usize..100, 100usize..1500],
        seed in any::<u64>(),
        extra in prop::collection::vec(value(), 0..40),
    ) {
        // Long rows from a cheap generator, with a few proptest values spliced in.
        let mut xs: Vec<f32> = (0..n as u64).map(|i| {
            let r = (seed ^ i).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            f32::from_bits((r >> 32) as u32 & 0xBFFF_FFFF) // exponent below 128: finite
        }).collect();
        for (j, &v) in extra.iter().enumerate() {
            if !xs.is_empty() {
                let at = (seed as usize).wrapping_add(j * 7919) % xs.len();
                xs[at] = v;
            }
        }
        check_paths::<f32>(&xs, &t)?;
        check_paths::<f16>(&xs, &t)?;
        check_paths::<bf16>(&xs, &t)?;
    }

    /// With a transform: the exact sum of the squares of the transformed values (taken from
    /// `load_row`), also against the reference for finite results.
    #[test]
    fn transform_then_square(t in transform(), xs in prop::collection::vec(value(), 0..300)) {
        for k in paths() {
            let mut tr = vec![0.0f32; xs.len()];
            k.load_row(&mut tr, &xs, &t).unwrap();
            let want = one_by_one(&tr);
            prop_assert_eq!(k.sum_squares_exact(&xs, &t), want, "{}", k.isa());
            if tr.iter().all(|x| x.is_finite()) {
                prop_assert_eq!(want.to_f64().to_bits(), reference(&tr).to_f64().to_bits());
            } else if tr.iter().any(|x| x.is_nan()) {
                prop_assert!(want.to_f64().is_nan());
            } else {
                prop_assert_eq!(want.to_f64(), f64::INFINITY);
            }
        }
    }

    /// Integer sums: the exact value `n` (any u128 below 2^100), built from squares of
    /// integers and scaled by a power of two, rounds as `u128 as f64` (nearest, ties to
    /// even) does.
    #[test]
    fn integer_sums_round_as_u128(n in any::<u128>(), bits in 1u32..100, k in -140i32..60) {
        let n = n >> (128 - bits);
        check_integer_sum(n, k)?;
    }

    /// Sums exactly halfway between two f64 (ties), just above and just below them.
    #[test]
    fn halfway_sums(q in (1u64 << 52)..(1u64 << 53), d in 1u32..40, k in -140i32..60) {
        // q * 2^(d+1) + 2^d: the significand q and the guard bit set, nothing below.
        let tie = (u128::from(q) << (d + 1)) | (1u128 << d);
        check_integer_sum(tie, k)?;
        check_integer_sum(tie + 1, k)?;
        check_integer_sum(tie - 1, k)?;
    }

    /// `from_bytes` inverts `to_bytes` (flags included) and rejects other lengths.
    #[test]
    fn bytes_round_trip(xs in prop::collection::vec(value(), 0..50), cut in 0usize..200) {
        let s = one_by_one(&xs);
        let b = s.to_bytes();
        prop_assert_eq!(SquareSum::from_bytes(&b), Some(s));
        let mut longer = b.to_vec();
        longer.push(0);
        prop_assert_eq!(SquareSum::from_bytes(&longer), None);
        prop_assert_eq!(SquareSum::from_bytes(&b[..cut.min(SquareSum::BYTES - 1)]), None);
    }
}

/// Every path against scalar for gradient type `G` (values converted from `xs`).
fn check_paths<G: Element>(xs: &[f32], t: &GradTransform) -> Result<(), TestCaseError> {
    let g = conv::<G>(xs);
    let want = scalar().sum_squares_exact(&g, t);
    let mut tr = vec![0.0f32; g.len()];
    scalar().load_row(&mut tr, &g, t).unwrap();
    prop_assert_eq!(one_by_one(&tr), want);
    for k in paths() {
        let got = k.sum_squares_exact(&g, t);
        prop_assert_eq!(got, want, "{} {:?}", k.isa(), G::DTYPE);
        let mut acc = SquareSum::new();
        let (a, b) = g.split_at(g.len() / 3);
        k.accumulate_squares(&mut acc, b, t);
        k.accumulate_squares(&mut acc, a, t);
        prop_assert_eq!(acc, want, "{} split", k.isa());
        // One pass for the squares and the raw values' largest magnitude: the same squares,
        // the same bits as `max_abs`, and the value a plain fold gives.
        let mut fused = SquareSum::new();
        let m = k.accumulate_squares_max_abs(&mut fused, &g, t);
        prop_assert_eq!(fused, want, "{} fused", k.isa());
        prop_assert_eq!(
            m.to_bits(),
            k.max_abs(&g).to_bits(),
            "{} fused max",
            k.isa()
        );
        // The f64 sum with the magnitude, from one pass: the bits of the two calls.
        let (f, m64) = k.sum_squares_max_abs(&g, t);
        let f_want = k.sum_squares(&g, t);
        prop_assert!(
            same_f64(f, f_want),
            "{} sum_squares_max_abs {} vs {}",
            k.isa(),
            f,
            f_want
        );
        prop_assert_eq!(
            m64.to_bits(),
            m.to_bits(),
            "{} sum_squares_max_abs max",
            k.isa()
        );
        let widened: Vec<f32> = g.iter().map(|x| x.to_f32()).collect();
        if widened.iter().any(|x| x.is_nan()) {
            prop_assert!(m.is_nan());
        } else {
            prop_assert_eq!(m, widened.iter().fold(0.0f32, |a, x| a.max(x.abs())));
        }
    }
    Ok(())
}

/// The largest magnitude of f16 values that hold NaNs of both kinds is the stored bits'
/// largest, as `max_abs` and the scalar path give it, on every path. Widening orders them
/// otherwise (it sets a signalling NaN's quiet bit: 0x7DFF widens above 0x7E00), so a path
/// that took the maximum of the widened values and narrowed it back would return the other
/// NaN. Both NaNs sit in the vector part of the row, in either order, and in the tail.
#[test]
fn f16_nan_payloads_give_the_stored_largest() {
    let t = GradTransform::default();
    let (signalling, quiet) = (f16::from_bits(0x7DFF), f16::from_bits(0x7E00));
    for n in [40, 100] {
        for (a, b) in [(3, 20), (20, 3), (n - 2, n - 1), (1, n - 1)] {
            for (x, y) in [(signalling, quiet), (quiet, signalling)] {
                let mut g = vec![f16::from_f32(0.5); n];
                g[a] = x;
                g[b] = y;
                let want = scalar().max_abs(&g).to_bits();
                // The stored largest (0x7E00) widened, not the signalling NaN's widening.
                assert_eq!(want, f16::from_bits(0x7E00).to_f32().to_bits());
                for k in paths() {
                    let what = format!("{} n={n} at {a}, {b}", k.isa());
                    assert_eq!(k.max_abs(&g).to_bits(), want, "{what} max_abs");
                    let m = k.sum_squares_max_abs(&g, &t).1;
                    assert_eq!(m.to_bits(), want, "{what} sum_squares_max_abs");
                    let mut acc = SquareSum::new();
                    let m = k.accumulate_squares_max_abs(&mut acc, &g, &t);
                    assert_eq!(m.to_bits(), want, "{what} accumulate_squares_max_abs");
                }
            }
        }
    }
}

/// The one-pass squares (exact, and f64) and largest magnitude: a value larger than the rest,
/// an infinity or a NaN, planted at the start, at either side of each block edge (512 values)
/// and of the small-row limit (256), and at the end, in rows up to past a flush (2^16 values),
/// is the magnitude returned, on every path and for every gradient type, with the squares
/// equal to `sum_squares_exact`'s.
#[test]
fn squares_and_max_abs_see_every_block() {
    let t = GradTransform {
        scale: 0.5,
        clip: Some(3.0),
        negate: false,
    };
    for n in [1usize, 255, 256, 257, 511, 512, 513, 1500, (1 << 16) + 1000] {
        let xs: Vec<f32> = (0..n)
            .map(|i| {
                let r = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                // Magnitudes below 2: the planted 96 is the largest.
                f32::from_bits(
                    0x3F00_0000 | ((r >> 41) as u32 & 0x007F_FFFF) | (r as u32 & 1) << 31,
                )
            })
            .collect();
        let mut spots = vec![0, n - 1, n / 2];
        for edge in [256usize, 512, 1024, 1 << 16] {
            spots.extend([edge - 1, edge].into_iter().filter(|&p| p < n));
        }
        for p in spots {
            for planted in [-96.0f32, f32::INFINITY, f32::NAN] {
                let mut ys = xs.clone();
                ys[p] = planted;
                check_squares_and_max::<f32>(&ys, &t, planted, p);
                check_squares_and_max::<f16>(&ys, &t, planted, p);
                check_squares_and_max::<bf16>(&ys, &t, planted, p);
            }
        }
    }
    // Nothing: no squares, magnitude 0.
    for k in paths() {
        let mut acc = SquareSum::new();
        assert_eq!(k.accumulate_squares_max_abs::<f16>(&mut acc, &[], &t), 0.0);
        assert_eq!(acc, SquareSum::new());
    }
}

fn check_squares_and_max<G: Element>(xs: &[f32], t: &GradTransform, planted: f32, at: usize) {
    let g = conv::<G>(xs);
    let want = scalar().sum_squares_exact(&g, t);
    for k in paths() {
        let mut acc = SquareSum::new();
        let m = k.accumulate_squares_max_abs(&mut acc, &g, t);
        let what = format!("{} {:?} n={} at {at}", k.isa(), G::DTYPE, xs.len());
        assert_eq!(acc, want, "{what}");
        let (f, m64) = k.sum_squares_max_abs(&g, t);
        let f_want = k.sum_squares(&g, t);
        assert!(same_f64(f, f_want), "{what}: f64 sum {f} vs {f_want}");
        for m in [m, m64] {
            if planted.is_nan() {
                assert!(m.is_nan(), "{what}: {m}");
            } else {
                assert_eq!(m, planted.abs(), "{what}");
            }
        }
    }
}

/// `2^k` as an f32, built from its bits (`powi` goes through overflow for small `k`); `k` in
/// `-149..=127`.
fn pow2f(k: i32) -> f32 {
    if k >= -126 {
        f32::from_bits(((k + 127) as u32) << 23)
    } else {
        f32::from_bits(1 << (k + 149))
    }
}

/// Values whose squares sum to exactly `n` (below 2^128): greedily the largest integer with
/// at most 24 significant bits (so an exact f32) whose square fits, each step taking about
/// 23 bits off the remainder.
fn squares_summing_to(mut n: u128) -> Vec<f32> {
    let mut out = Vec::new();
    while n > 0 {
        let mut r = (n as f64).sqrt() as u128;
        while r.checked_mul(r).is_none_or(|sq| sq > n) {
            r -= 1;
        }
        while (r + 1).checked_mul(r + 1).is_some_and(|sq| sq <= n) {
            r += 1;
        }
        let bits = 128 - r.leading_zeros();
        if bits > 24 {
            r = r >> (bits - 24) << (bits - 24);
        }
        out.push(r as f32);
        assert_eq!(r as f32 as u128, r);
        n -= r * r;
    }
    out
}

/// The exact sum `n * 2^(2k)` from squares of `v * 2^k`, against `(n as f64) * 2^(2k)`.
fn check_integer_sum(n: u128, k: i32) -> Result<(), TestCaseError> {
    let scale = pow2f(k);
    let xs: Vec<f32> = squares_summing_to(n).iter().map(|&v| v * scale).collect();
    // The scaled values are still exact: check, so that the test means what it says.
    for &x in &xs {
        prop_assert!(x == 0.0 || (x / scale).fract() == 0.0);
        prop_assert!(x.is_finite() && (x / scale) * scale == x);
    }
    let want = (n as f64) * 2f64.powi(2 * k);
    let s = scalar().sum_squares_exact(&xs, &ID);
    prop_assert_eq!(s.to_f64().to_bits(), want.to_bits(), "n = {}, k = {}", n, k);
    prop_assert_eq!(reference(&xs).to_f64().to_bits(), want.to_bits());
    for p in paths() {
        prop_assert_eq!(p.sum_squares_exact(&xs, &ID), s);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Deliberate cases.

#[test]
fn small_exact_sums_agree_with_f64() {
    let xs = [3.0f32, -4.0, 0.5, -0.0, 0.0, 12.0, 0.25];
    let want: f64 = xs.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
    for k in paths() {
        assert_eq!(k.sum_squares_exact(&xs, &ID).to_f64(), want);
        assert_eq!(k.sum_squares(&xs, &ID), want);
    }
    assert_eq!(SquareSum::new().to_f64(), 0.0);
    assert_eq!(SquareSum::ZERO, SquareSum::default());
    assert_eq!(one_by_one(&[0.0, -0.0]), SquareSum::ZERO);
}

#[test]
fn ties_to_even_and_carries() {
    let p26 = (1u32 << 26) as f32; // its square is 2^52
    let s = |xs: &[f32]| scalar().sum_squares_exact(xs, &ID).to_f64();
    let two53 = 9_007_199_254_740_992.0f64;
    // 2^53 + 1: halfway between 2^53 and 2^53 + 2; even is 2^53.
    assert_eq!(s(&[p26, p26, 1.0]), two53);
    // 2^53 + 3: halfway between 2^53 + 2 and 2^53 + 4; even is 2^53 + 4.
    assert_eq!(s(&[p26, p26, 1.0, 1.0, 1.0]), two53 + 4.0);
    // 2^53 + 1 + 2^-298: above the tie by a sticky bit 351 places lower: rounds up.
    assert_eq!(s(&[p26, p26, 1.0, 1e-45]), two53 + 2.0);
    assert_eq!(s(&[1e-45, p26, 1.0, p26]), two53 + 2.0);
    // 2^54 - 1: halfway between 2^54 - 2 (odd significand) and 2^54: the carry into the
    // exponent.
    let xs = squares_summing_to((1u128 << 54) - 1);
    assert_eq!(s(&xs), 2.0 * two53);
    // 2^54 - 3: halfway between 2^54 - 4 (even significand) and 2^54 - 2: down.
    let xs = squares_summing_to((1u128 << 54) - 3);
    assert_eq!(s(&xs), 2.0 * two53 - 4.0);
    // A carry out of the 53-bit significand at the top of the range: 2^k * (2^53 - 1/2)
    // scaled up to f32::MAX-sized squares.
    let k = 50;
    let xs: Vec<f32> = squares_summing_to((1u128 << 54) - 1)
        .iter()
        .map(|&v| v * pow2f(k))
        .collect();
    assert_eq!(s(&xs), 2.0 * two53 * 2f64.powi(2 * k));
    // And at the bottom: subnormal values (2^-140 * v).
    let k = -140;
    let xs: Vec<f32> = squares_summing_to((1u128 << 54) - 1)
        .iter()
        .map(|&v| v * pow2f(k))
        .collect();
    assert!(xs.iter().any(|x| x.is_subnormal()));
    assert_eq!(s(&xs), 2.0 * two53 * 2f64.powi(2 * k));
}

#[test]
fn extremes() {
    let s = |xs: &[f32]| scalar().sum_squares_exact(xs, &ID).to_f64();
    // The smallest square, 2^-298.
    assert_eq!(s(&[1e-45]), 2f64.powi(-298));
    assert_eq!(s(&[-1e-45, 1e-45]), 2f64.powi(-297));
    // f32::MAX^2 is exact in f64, and so are small multiples.
    let max2 = f64::from(f32::MAX) * f64::from(f32::MAX);
    assert_eq!(s(&[f32::MAX]), max2);
    assert_eq!(s(&vec![f32::MAX; 1000]), max2 * 1000.0);
    // Beyond f32 range for the sum (2^128 and more) and an f64 sum that loses the small part.
    assert_eq!(s(&[f32::MAX, 1.0]), max2);
    for k in paths() {
        let v = vec![f32::MAX; 300_000];
        assert_eq!(k.sum_squares_exact(&v, &ID).to_f64(), max2 * 300_000.0);
    }
}

/// Long rows cross the flush interval of the bins (2^16 values): all paths, all types.
#[test]
fn long_rows_across_flushes() {
    let n = 3 * (1 << 16) + 12_345;
    let xs: Vec<f32> = (0..n)
        .map(|i| {
            let r = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            // Clustered exponents with full significands: every bin is hammered.
            f32::from_bits(0x3F00_0000 | ((r >> 40) as u32 & 0x00FF_FFFF) | (r as u32 & 1) << 31)
        })
        .collect();
    let want = reference(&xs);
    let one = one_by_one(&xs);
    assert_eq!(&one.to_bytes()[..80], &want.bytes640()[..]);
    // All equal maximal significands in one exponent: the worst case for a bin.
    let worst = vec![f32::from_bits(0x3FFF_FFFF); n];
    let w = one_by_one(&worst);
    assert_eq!(&w.to_bytes()[..80], &reference(&worst).bytes640()[..]);
    let t = GradTransform {
        scale: 0.75,
        clip: Some(1.5),
        negate: true,
    };
    for k in paths() {
        assert_eq!(k.sum_squares_exact(&xs, &ID), one, "{}", k.isa());
        assert_eq!(k.sum_squares_exact(&worst, &ID), w, "{}", k.isa());
        let scaled = k.sum_squares_exact(&xs, &t);
        assert_eq!(scaled, scalar().sum_squares_exact(&xs, &t), "{}", k.isa());
        for g in [conv::<f16>(&xs), conv::<f16>(&worst)] {
            assert_eq!(
                k.sum_squares_exact(&g, &ID),
                scalar().sum_squares_exact(&g, &ID)
            );
        }
        let g = conv::<bf16>(&xs);
        assert_eq!(
            k.sum_squares_exact(&g, &t),
            scalar().sum_squares_exact(&g, &t)
        );
    }
}

#[test]
fn flags() {
    let inf = [1.0f32, f32::INFINITY, 2.0];
    let neg_inf = [f32::NEG_INFINITY];
    let nan = [1.0f32, f32::NAN, f32::INFINITY];
    let neg_nan = [-f32::NAN];
    let long_inf: Vec<f32> = (0..5000)
        .map(|i| if i == 4321 { f32::INFINITY } else { 1.0 })
        .collect();
    let long_nan: Vec<f32> = (0..5000)
        .map(|i| if i == 77 { f32::NAN } else { 1.0 })
        .collect();
    for k in paths() {
        let e = |xs: &[f32]| k.sum_squares_exact(xs, &ID);
        assert_eq!(e(&inf).to_f64(), f64::INFINITY);
        assert!(!e(&inf).is_finite());
        assert_eq!(e(&neg_inf).to_f64(), f64::INFINITY);
        assert!(e(&nan).to_f64().is_nan());
        assert!(e(&neg_nan).to_f64().is_nan());
        assert_eq!(e(&long_inf).to_f64(), f64::INFINITY);
        assert!(e(&long_nan).to_f64().is_nan());
        assert!(e(&[1.0, 2.0]).is_finite());
        // The finite part is still summed exactly alongside the flags.
        let mut a = e(&long_inf);
        a.merge(&e(&long_nan));
        let mut b = e(&long_nan);
        b.merge(&e(&long_inf));
        assert_eq!(a, b);
        assert!(a.to_f64().is_nan());
        // The transform can make values infinite (scale) or NaN (0 * inf).
        let t = GradTransform {
            scale: 1e30,
            clip: None,
            negate: false,
        };
        assert_eq!(k.sum_squares_exact(&[1e10f32], &t).to_f64(), f64::INFINITY);
        let t = GradTransform {
            scale: 0.0,
            clip: None,
            negate: false,
        };
        assert!(k.sum_squares_exact(&[f32::INFINITY], &t).to_f64().is_nan());
        // f16 infinities and NaN.
        let h = [f16::ONE, f16::INFINITY, f16::ONE];
        assert_eq!(k.sum_squares_exact(&h, &ID).to_f64(), f64::INFINITY);
        let h = [f16::NAN; 70];
        assert!(k.sum_squares_exact(&h, &ID).to_f64().is_nan());
    }
}

#[test]
fn from_bytes_rejects_invalid() {
    let mut s = SquareSum::new();
    s.add(3.0);
    let b = s.to_bytes();
    assert_eq!(b.len(), SquareSum::BYTES);
    assert_eq!(SquareSum::BYTES, 81);
    for len in [0, 1, 80, 82, 160] {
        let v = vec![0u8; len];
        assert_eq!(SquareSum::from_bytes(&v), None, "length {len}");
    }
    for bit in 3..8 {
        let mut bad = b;
        bad[80] = 1 << bit;
        assert_eq!(SquareSum::from_bytes(&bad), None, "flag bit {bit}");
    }
    for f in 0..8u8 {
        let mut ok = [0u8; 81];
        ok[80] = f;
        let s = SquareSum::from_bytes(&ok).expect("valid flags, zero limbs");
        assert_eq!(s.to_bytes(), ok);
        assert_eq!(s.is_finite(), f == 0);
    }
    // Overflow (bit 2) with non-zero limbs is not a canonical form.
    let mut bad = b;
    bad[80] = 4;
    assert_eq!(SquareSum::from_bytes(&bad), None);
    // Arbitrary limbs with valid flags are accepted and round-trip.
    let mut any = [0xA5u8; 81];
    any[80] = 3;
    let s = SquareSum::from_bytes(&any).unwrap();
    assert_eq!(s.to_bytes(), any);
    assert!(s.to_f64().is_nan());
    // The documented layout: 3^2 = 9 * 2^-300 * 2^(2*128) ... decoded independently.
    let mut want = Big::new();
    want.add_square(3.0);
    assert_eq!(&b[..80], &want.bytes640()[..]);
}

/// Merging a sum into itself doubles it; past 2^640 units it overflows to +inf, without
/// wrapping and order-independently.
#[test]
fn overflow_is_flagged_not_wrapped() {
    let mut s = SquareSum::new();
    s.add(f32::MAX);
    let max2 = f64::from(f32::MAX) * f64::from(f32::MAX);
    let mut doublings = 0;
    while s.is_finite() {
        let c = s;
        s.merge(&c);
        doublings += 1;
        if s.is_finite() {
            assert_eq!(s.to_f64(), max2 * 2f64.powi(doublings));
        }
    }
    // f32::MAX^2 is just below 2^256 = 2^556 units: 84 doublings stay below 2^640 units,
    // the 85th reaches it.
    assert_eq!(doublings, 85);
    assert_eq!(s.to_f64(), f64::INFINITY);
    assert_eq!(&s.to_bytes()[..80], &[0u8; 80][..]);
    assert_eq!(s.to_bytes()[80], 4);
    assert_eq!(SquareSum::from_bytes(&s.to_bytes()), Some(s));
    // Adding to an overflowed sum keeps it there; a NaN still wins.
    let before = s;
    s.add(1.0);
    assert_eq!(s, before);
    s.add(f32::NAN);
    assert!(s.to_f64().is_nan());

    // Associativity across the overflow: (a + a) + b == a + (a + b) with b = a, 2a below
    // and 3a above 2^640 units.
    let mut a = SquareSum::new();
    a.add(f32::MAX);
    for _ in 0..83 {
        let c = a;
        a.merge(&c);
    }
    let b = a;
    let mut twice = a;
    twice.merge(&a);
    assert!(twice.is_finite());
    let mut left = a;
    left.merge(&a);
    left.merge(&b);
    let mut ab = a;
    ab.merge(&b);
    let mut right = a;
    right.merge(&ab);
    assert_eq!(left, right);
    assert_eq!(left.to_f64(), f64::INFINITY);
}

/// Rows whose magnitudes change from block to block (up, down, by a little and a lot), with
/// zeros, subnormals and stragglers far below each block's largest value: the vector paths
/// move their window of binades and take the slow route for the stragglers; every path
/// still gives the exact sum.
#[test]
fn magnitudes_changing_along_the_row() {
    let mut z = 0x1234_5678_9ABC_DEF0u64;
    let mut next = move || {
        z ^= z << 13;
        z ^= z >> 7;
        z ^= z << 17;
        z
    };
    // Block scales (as binary exponents) along the row; the kernels' blocks are 512 values,
    // these segments are not aligned with them on purpose.
    let scales = [
        0i32, 0, 1, -1, 3, -3, 40, -40, 100, 100, -120, -126, 127, 127, -149, 0, 20, 19, 18, 60,
        -60, 5, 5, 5,
    ];
    let mut xs = Vec::new();
    for (k, &sc) in scales.iter().enumerate() {
        let len = 300 + (next() % 500) as usize;
        for _ in 0..len {
            let r = next();
            let v = match r % 64 {
                // zeros of either sign
                0 => 0.0,
                1 => -0.0,
                // a straggler far below the segment's scale
                2 => pow2f((sc - 50).max(-149)),
                3 => f32::from_bits((r >> 40) as u32 & 0x007F_FFFF), // subnormal
                _ => {
                    let m = 1.0 + ((r >> 20) & 0xFF_FFFF) as f32 / 16_777_216.0;
                    let e = (sc - (r >> 50) as i32 % 8).clamp(-149, 127);
                    m * pow2f(e) * if r & 1 == 0 { 1.0 } else { -1.0 }
                }
            };
            xs.push(v);
        }
        // Now and then a block of nothing but zeros and subnormals.
        if k % 7 == 3 {
            xs.extend((0..600).map(|i| f32::from_bits(i as u32 * 977 % 0x0080_0000)));
        }
    }
    assert!(xs.iter().all(|x| x.is_finite()));
    let want = reference(&xs);
    let one = one_by_one(&xs);
    assert_eq!(&one.to_bytes()[..80], &want.bytes640()[..]);
    assert_eq!(one.to_f64().to_bits(), want.to_f64().to_bits());
    for k in paths() {
        assert_eq!(k.sum_squares_exact(&xs, &ID), one, "{}", k.isa());
        let rev: Vec<f32> = xs.iter().rev().copied().collect();
        assert_eq!(k.sum_squares_exact(&rev, &ID), one, "{} reversed", k.isa());
        // Every odd-length prefix against the one-by-one sum (tails of every length).
        for n in [1usize, 7, 9, 511, 513, 1023, 4097, xs.len() - 3] {
            assert_eq!(
                k.sum_squares_exact(&xs[..n], &ID),
                one_by_one(&xs[..n]),
                "{} prefix {n}",
                k.isa()
            );
        }
        // With infinities and NaN sprinkled in: the finite part and the flags.
        let mut sp = xs.clone();
        sp[1000] = f32::INFINITY;
        sp[3000] = f32::NAN;
        let got = k.sum_squares_exact(&sp, &ID);
        assert_eq!(got, one_by_one(&sp), "{} specials", k.isa());
        assert!(got.to_f64().is_nan());
    }
}
