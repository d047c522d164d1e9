//! Shared test helpers: value strategies with special values mixed in, and bitwise
//! comparison (NaN compared by NaN-ness only).
#![allow(dead_code)]

use lazyadam_kernels::{AdamCoeffs, Element, GradTransform, Rounding, bf16, f16};
use proptest::prelude::*;

/// Special f32 values (including f16/bf16 boundary and subnormal values).
pub const SPECIALS: &[f32] = &[
    0.0,
    -0.0,
    1.0,
    -1.0,
    f32::MIN_POSITIVE,
    -f32::MIN_POSITIVE,
    1e-45,  // smallest f32 subnormal
    -3e-42, // f32 subnormal
    1e-39,  // f32 subnormal
    f32::MAX,
    -f32::MAX,
    f32::INFINITY,
    f32::NEG_INFINITY,
    f32::NAN,
    -f32::NAN,
    65504.0,         // f16 max
    -65504.0,        // f16 min
    65519.0,         // rounds to f16 max
    65520.0,         // rounds to f16 infinity
    70000.0,         // beyond f16
    5.960_464_5e-8,  // f16 smallest subnormal 2^-24
    -1.788_139_3e-7, // 3 * 2^-24
    2.980_232_2e-8,  // 2^-25: f16 tie to zero
    6.103_515_6e-5,  // f16 smallest normal 2^-14
    6.09e-5,         // f16 subnormal near normal
    3.389_531_4e38,  // bf16 max
    -3.39e38,        // rounds to bf16 -infinity
    9.2e-41,         // bf16 subnormal
    1e-8,
    1.000_000_1,
    0.1,
];

/// A "typical" magnitude: uniform in [-1, 1] scaled by 10^k.
fn typical() -> impl Strategy<Value = f32> {
    (-1.0f32..1.0, -8i32..4).prop_map(|(x, k)| x * 10f32.powi(k))
}

/// An f32 from a mixture: specials, random bits, random f16/bf16 bit patterns, typical values.
pub fn value() -> impl Strategy<Value = f32> {
    prop_oneof![
        2 => prop::sample::select(SPECIALS),
        1 => any::<u32>().prop_map(f32::from_bits),
        1 => any::<u16>().prop_map(|b| f16::from_bits(b).to_f32()),
        1 => any::<u16>().prop_map(|b| bf16::from_bits(b).to_f32()),
        8 => typical(),
    ]
}

/// A mostly finite, mostly typical value (for the non-special-heavy parts).
pub fn tame() -> impl Strategy<Value = f32> {
    prop_oneof![
        1 => prop::sample::select(SPECIALS),
        12 => typical(),
    ]
}

/// A row of f32 values of length `n`.
pub fn row(n: usize) -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(value(), n)
}

/// Converts to a storage type (round to nearest-even).
pub fn conv<E: Element>(x: &[f32]) -> Vec<E> {
    x.iter().map(|&v| E::from_f32(v)).collect()
}

/// Raw bits of an element (for messages and comparison).
pub fn bits<E: Element>(x: E) -> u32 {
    let f = x.to_f32();
    match E::DTYPE {
        lazyadam_kernels::DType::F32 => f.to_bits(),
        _ => {
            // Exact: widen and take the bits; f16/bf16 -> f32 is injective on non-NaN.
            f.to_bits()
        }
    }
}

/// Same bits, or both NaN.
pub fn same<E: Element>(a: E, b: E) -> bool {
    let (x, y) = (a.to_f32(), b.to_f32());
    (x.is_nan() && y.is_nan()) || x.to_bits() == y.to_bits()
}

/// Asserts two rows are bitwise equal (NaN by NaN-ness), with a useful message.
pub fn assert_rows<E: Element>(what: &str, got: &[E], want: &[E]) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.len(), want.len());
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        prop_assert!(
            same(*a, *b),
            "{}[{}]: got {:?} ({:#x}), want {:?} ({:#x})",
            what,
            i,
            a,
            bits(*a),
            b,
            bits(*b)
        );
    }
    Ok(())
}

/// Same f64 bits, or both NaN.
pub fn same_f64(a: f64, b: f64) -> bool {
    (a.is_nan() && b.is_nan()) || a.to_bits() == b.to_bits()
}

/// A gradient scale other than 1: ordinary ones, and zero, negative, infinite, NaN, tiny and
/// huge ones.
pub fn scale() -> impl Strategy<Value = f32> {
    prop_oneof![
        3 => 0.01f32..4.0,
        1 => prop::sample::select(&[0.0f32, -1.0, f32::INFINITY, f32::NAN, 1e-30, 1e30][..]),
    ]
}

/// Adam coefficients with every optional part neutral: the vector paths compile a specialized
/// loop for this case. The base of the other coefficient strategies.
pub fn plain_coeffs() -> impl Strategy<Value = AdamCoeffs> {
    (1e-5f32..1.0, 0.0f32..1.0, 0.0f32..1.0, 1e-9f32..1e-3)
        .prop_map(|(lr_t, b1, b2, eps)| AdamCoeffs::new(lr_t, b1, b2, eps))
}

/// Coefficients whose only optional part is a gradient scale other than 1 (a clipping factor,
/// a loss scale's unscale): the vector paths compile a specialized loop for this case.
pub fn scaled_plain_coeffs() -> impl Strategy<Value = AdamCoeffs> {
    (plain_coeffs(), scale()).prop_map(|(mut c, scale)| {
        c.grad.scale = scale;
        c
    })
}

/// A gradient transform with every part exercised.
pub fn transform() -> impl Strategy<Value = GradTransform> {
    let scale = prop_oneof![3 => Just(1.0f32), 4 => scale()];
    let clip = prop_oneof![
        3 => Just(None),
        3 => (0.001f32..2.0).prop_map(Some),
        1 => prop::sample::select(&[0.0f32, -1.0, f32::NAN, f32::INFINITY][..]).prop_map(Some),
    ];
    (scale, clip, any::<bool>()).prop_map(|(scale, clip, negate)| GradTransform {
        scale,
        clip,
        negate,
    })
}

/// Adam coefficients with every optional part exercised.
pub fn coeffs() -> impl Strategy<Value = AdamCoeffs> {
    let wd = prop_oneof![2 => Just(0.0f32), 1 => 0.0f32..0.1];
    let pre = prop_oneof![2 => Just(1.0f32), 1 => 0.5f32..1.0];
    let rounding = prop_oneof![
        2 => Just(Rounding::NearestEven),
        1 => (any::<u64>(), any::<u64>()).prop_map(|(seed, offset)| Rounding::Stochastic { seed, offset }),
    ];
    (plain_coeffs(), wd, pre.clone(), pre, transform(), rounding).prop_map(
        |(mut c, wd, mp, vp, grad, rounding)| {
            c.weight_decay = wd;
            c.m_pre_decay = mp;
            c.v_pre_decay = vp;
            c.grad = grad;
            c.rounding = rounding;
            c
        },
    )
}
