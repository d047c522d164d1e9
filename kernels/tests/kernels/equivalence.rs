//! Every supported path is bit-identical to the scalar reference, for every primitive and
//! the tested storage combinations, on random rows of length 0..300 with special values.

use crate::common::*;
use lazyadam_kernels::{
    AdamCoeffs, Element, GradTransform, Isa, Kernels, LongRowLoop, Rounding, bf16, f16,
};
use proptest::prelude::*;

/// The paths compared with the reference (every supported one, the reference included as a
/// self-check).
fn paths() -> Vec<Kernels> {
    Isa::supported()
        .map(|isa| Kernels::new(isa).expect("supported"))
        .collect()
}

fn scalar() -> Kernels {
    Kernels::new(Isa::Scalar).unwrap()
}

/// One Adam row on every path vs the reference (plain and AMSGrad).
fn check_adam<P: Element, G: Element, M: Element>(
    c: &AdamCoeffs,
    p: &[f32],
    m: &[f32],
    v: &[f32],
    vh: &[f32],
    g: &[f32],
) -> Result<(), TestCaseError> {
    let (p0, m0, v0, vh0, g0) = (
        conv::<P>(p),
        conv::<M>(m),
        conv::<M>(v),
        conv::<M>(vh),
        conv::<G>(g),
    );
    // Reference.
    let (mut rp, mut rm, mut rv) = (p0.clone(), m0.clone(), v0.clone());
    scalar()
        .adam_row(c, &mut rp, &mut rm, &mut rv, &g0)
        .unwrap();
    let (mut ap, mut am, mut av, mut avh) = (p0.clone(), m0.clone(), v0.clone(), vh0.clone());
    scalar()
        .adam_row_amsgrad(c, &mut ap, &mut am, &mut av, &mut avh, &g0)
        .unwrap();
    // Every path, with each loop for long rows (the choice only matters from 2^16 elements).
    let handles = paths().into_iter().flat_map(|k| {
        [LongRowLoop::Auto, LongRowLoop::OnePass, LongRowLoop::Split]
            .map(|l| k.with_long_row_loop(l))
    });
    for k in handles {
        let name = format!("{} {}", k.isa().name(), k.long_row_loop().name());
        let (mut xp, mut xm, mut xv) = (p0.clone(), m0.clone(), v0.clone());
        k.adam_row(c, &mut xp, &mut xm, &mut xv, &g0).unwrap();
        assert_rows(&format!("{name} param"), &xp, &rp)?;
        assert_rows(&format!("{name} m"), &xm, &rm)?;
        assert_rows(&format!("{name} v"), &xv, &rv)?;

        let (mut yp, mut ym, mut yv, mut yvh) = (p0.clone(), m0.clone(), v0.clone(), vh0.clone());
        k.adam_row_amsgrad(c, &mut yp, &mut ym, &mut yv, &mut yvh, &g0)
            .unwrap();
        assert_rows(&format!("{name} ams param"), &yp, &ap)?;
        assert_rows(&format!("{name} ams m"), &ym, &am)?;
        assert_rows(&format!("{name} ams v"), &yv, &av)?;
        assert_rows(&format!("{name} ams vhat"), &yvh, &avh)?;
    }
    Ok(())
}

/// load_row, accumulate_row, sum_squares, all_finite for a gradient type.
fn check_grad_prims<G: Element>(
    t: &GradTransform,
    dst: &[f32],
    src: &[f32],
) -> Result<(), TestCaseError> {
    let s0 = conv::<G>(src);
    let mut rl = dst.to_vec();
    scalar().load_row(&mut rl, &s0, t).unwrap();
    let mut ra = dst.to_vec();
    scalar().accumulate_row(&mut ra, &s0, t).unwrap();
    let rs = scalar().sum_squares(&s0, t);
    let rf = scalar().all_finite(&s0);
    let rm = scalar().max_abs(&s0);
    for k in paths() {
        let name = k.isa().name();
        let mut xl = dst.to_vec();
        k.load_row(&mut xl, &s0, t).unwrap();
        assert_rows(&format!("{name} load_row"), &xl, &rl)?;
        let mut xa = dst.to_vec();
        k.accumulate_row(&mut xa, &s0, t).unwrap();
        assert_rows(&format!("{name} accumulate_row"), &xa, &ra)?;
        let xs = k.sum_squares(&s0, t);
        prop_assert!(same_f64(xs, rs), "{} sum_squares: {} vs {}", name, xs, rs);
        prop_assert_eq!(k.all_finite(&s0), rf, "{} all_finite", name);
        let xm = k.max_abs(&s0);
        prop_assert!(
            xm.to_bits() == rm.to_bits() || (xm.is_nan() && rm.is_nan()),
            "{} max_abs: {} vs {}",
            name,
            xm,
            rm
        );
    }
    Ok(())
}

fn check_store<P: Element>(src: &[f32], r: Rounding) -> Result<(), TestCaseError> {
    let mut rd = vec![P::default(); src.len()];
    scalar().store_row(&mut rd, src, r).unwrap();
    for k in paths() {
        let mut xd = vec![P::default(); src.len()];
        k.store_row(&mut xd, src, r).unwrap();
        assert_rows(&format!("{} store_row", k.isa().name()), &xd, &rd)?;
    }
    Ok(())
}

/// Rows for one Adam case: (p, m, v, vhat, g), all of length n.
type Rows = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);

fn rows() -> impl Strategy<Value = Rows> {
    (0usize..300).prop_flat_map(|n| (row(n), row(n), row(n), row(n), row(n)))
}

fn tame_rows() -> impl Strategy<Value = Rows> {
    (0usize..300).prop_flat_map(|n| {
        let r = || prop::collection::vec(tame(), n);
        let pos = || prop::collection::vec(tame().prop_map(f32::abs), n);
        (r(), r(), pos(), pos(), r())
    })
}

macro_rules! adam_all_combos {
    ($c:expr, $r:expr) => {{
        let (p, m, v, vh, g) = $r;
        check_adam::<f32, f32, f32>($c, p, m, v, vh, g)?;
        check_adam::<f16, f16, f16>($c, p, m, v, vh, g)?;
        check_adam::<f16, f16, f32>($c, p, m, v, vh, g)?;
        check_adam::<bf16, bf16, bf16>($c, p, m, v, vh, g)?;
        check_adam::<f32, f32, bf16>($c, p, m, v, vh, g)?;
        check_adam::<f32, f16, f32>($c, p, m, v, vh, g)?;
        // A few more mixes.
        check_adam::<bf16, f32, f32>($c, p, m, v, vh, g)?;
        check_adam::<f16, bf16, bf16>($c, p, m, v, vh, g)?;
    }};
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn adam_matches_reference_with_specials(c in coeffs(), r in rows()) {
        adam_all_combos!(&c, (&r.0, &r.1, &r.2, &r.3, &r.4));
    }

    /// Neutral optional parts: the vector paths compile a specialized loop for this case.
    #[test]
    fn adam_plain_coeffs_match_reference(
        c in plain_coeffs(),
        r in rows(),
    ) {
        adam_all_combos!(&c, (&r.0, &r.1, &r.2, &r.3, &r.4));
    }

    /// A gradient scale the only optional part: the vector paths' plain loop with one multiply.
    #[test]
    fn adam_scaled_plain_coeffs_match_reference(c in scaled_plain_coeffs(), r in rows()) {
        adam_all_combos!(&c, (&r.0, &r.1, &r.2, &r.3, &r.4));
    }

    #[test]
    fn adam_matches_reference_typical(c in coeffs(), r in tame_rows()) {
        adam_all_combos!(&c, (&r.0, &r.1, &r.2, &r.3, &r.4));
    }

    #[test]
    fn grad_primitives_match_reference(
        t in transform(),
        (dst, src) in (0usize..300).prop_flat_map(|n| (row(n), row(n))),
    ) {
        check_grad_prims::<f32>(&t, &dst, &src)?;
        check_grad_prims::<f16>(&t, &dst, &src)?;
        check_grad_prims::<bf16>(&t, &dst, &src)?;
    }

    #[test]
    fn sum_squares_and_finite_on_finite_rows(
        t in transform(),
        src in (0usize..300).prop_flat_map(|n| prop::collection::vec(-1e3f32..1e3, n)),
    ) {
        // Rows without specials, so all_finite is true and the sums are ordinary numbers.
        check_grad_prims::<f32>(&t, &src, &src)?;
        check_grad_prims::<f16>(&t, &src, &src)?;
        check_grad_prims::<bf16>(&t, &src, &src)?;
    }

    #[test]
    fn store_row_matches_reference(
        src in (0usize..300).prop_flat_map(row),
        seed in any::<u64>(),
        offset in any::<u64>(),
    ) {
        for r in [Rounding::NearestEven, Rounding::Stochastic { seed, offset }] {
            check_store::<f32>(&src, r)?;
            check_store::<f16>(&src, r)?;
            check_store::<bf16>(&src, r)?;
        }
    }
}

/// Every f16 and bf16 bit pattern widens and narrows identically on every path (exhaustive).
#[test]
fn exhaustive_16_bit_conversions() {
    let all: Vec<u16> = (0..=u16::MAX).collect();
    let h: Vec<f16> = all.iter().map(|&b| f16::from_bits(b)).collect();
    let b: Vec<bf16> = all.iter().map(|&b| bf16::from_bits(b)).collect();
    let t = GradTransform::default();
    let mut want_h = vec![0.0f32; h.len()];
    let mut want_b = vec![0.0f32; b.len()];
    scalar().load_row(&mut want_h, &h, &t).unwrap();
    scalar().load_row(&mut want_b, &b, &t).unwrap();
    for k in paths() {
        let mut got = vec![0.0f32; h.len()];
        k.load_row(&mut got, &h, &t).unwrap();
        for i in 0..got.len() {
            assert!(
                same(got[i], want_h[i]),
                "{} f16 widen {:#06x}: {} vs {}",
                k.isa(),
                i,
                got[i],
                want_h[i]
            );
            assert!(same(got[i], h[i].to_f32()), "f16 widen vs half {:#06x}", i);
        }
        k.load_row(&mut got, &b, &t).unwrap();
        for i in 0..got.len() {
            assert!(same(got[i], want_b[i]), "{} bf16 widen {:#06x}", k.isa(), i);
            assert!(same(got[i], b[i].to_f32()), "bf16 widen vs half {:#06x}", i);
        }
    }
}

/// Narrowing of f32 values around every f16/bf16 value (the value, its f32 neighbours and the
/// midpoints) on every path, and against `half`.
#[test]
fn dense_16_bit_narrowing() {
    let mut src = Vec::new();
    for b in 0..=u16::MAX {
        for w in [f16::from_bits(b).to_f32(), bf16::from_bits(b).to_f32()] {
            let u = w.to_bits();
            src.extend([
                w,
                f32::from_bits(u.wrapping_add(1)),
                f32::from_bits(u.wrapping_sub(1)),
            ]);
        }
        // f16 midpoints (ties) toward the next pattern.
        let lo = f16::from_bits(b).to_f32() as f64;
        let hi = f16::from_bits(b.wrapping_add(1)).to_f32() as f64;
        src.push(((lo + hi) / 2.0) as f32);
        let lo = bf16::from_bits(b).to_f32() as f64;
        let hi = bf16::from_bits(b.wrapping_add(1)).to_f32() as f64;
        src.push(((lo + hi) / 2.0) as f32);
    }
    for k in paths() {
        let mut h = vec![f16::ZERO; src.len()];
        k.store_row(&mut h, &src, Rounding::NearestEven).unwrap();
        let mut b = vec![bf16::ZERO; src.len()];
        k.store_row(&mut b, &src, Rounding::NearestEven).unwrap();
        for (i, &x) in src.iter().enumerate() {
            let (wh, wb) = (f16::from_f32(x), bf16::from_f32(x));
            assert!(
                h[i] == wh || (h[i].is_nan() && wh.is_nan()),
                "{} f16 narrow {:e} ({:#x}): {:#06x} vs {:#06x}",
                k.isa(),
                x,
                x.to_bits(),
                h[i].to_bits(),
                wh.to_bits()
            );
            if !x.is_nan() {
                assert_eq!(h[i].to_bits(), wh.to_bits(), "{} f16 bits {:e}", k.isa(), x);
                assert_eq!(
                    b[i].to_bits(),
                    wb.to_bits(),
                    "{} bf16 bits {:e}",
                    k.isa(),
                    x
                );
            } else {
                assert!(b[i].is_nan(), "{} bf16 NaN", k.isa());
            }
        }
    }
}

/// Rows long enough for the split loop of long rows (and the one-pass rest after its last
/// whole chunk) on every path, and for the one-pass loop that some CPUs take instead.
#[test]
fn long_rows_match_reference() {
    let n = (1 << 16) + 37;
    let val = |i: usize, k: usize| {
        let x = ((i.wrapping_mul(2_654_435_761).wrapping_add(k * 977)) % 20011) as f32;
        (x - 10005.0) * 1e-4
    };
    let p: Vec<f32> = (0..n).map(|i| val(i, 1)).collect();
    let m: Vec<f32> = (0..n).map(|i| val(i, 2) * 0.1).collect();
    let v: Vec<f32> = (0..n).map(|i| val(i, 3).abs() * 0.01).collect();
    let vh: Vec<f32> = (0..n).map(|i| val(i, 4).abs() * 0.01).collect();
    let g: Vec<f32> = (0..n).map(|i| val(i, 5)).collect();
    let mut c = AdamCoeffs::new(1e-3, 0.9, 0.999, 1e-7);
    check_adam::<f32, f32, f32>(&c, &p, &m, &v, &vh, &g).unwrap();
    check_adam::<f16, f16, f16>(&c, &p, &m, &v, &vh, &g).unwrap();
    c.weight_decay = 0.01;
    c.rounding = Rounding::Stochastic { seed: 4, offset: 9 };
    check_adam::<bf16, f16, f32>(&c, &p, &m, &v, &vh, &g).unwrap();
}

/// Handles start with `Auto`; forcing a loop changes only that; `Auto` resolves as
/// documented, by the CPU vendor (read here independently); the names round-trip.
#[test]
fn long_row_loop_defaults_and_overrides() {
    let all = [LongRowLoop::Auto, LongRowLoop::OnePass, LongRowLoop::Split];
    for isa in Isa::supported() {
        let k = Kernels::new(isa).unwrap();
        assert_eq!(k.long_row_loop(), LongRowLoop::Auto);
        for l in all {
            let forced = k.with_long_row_loop(l);
            assert_eq!((forced.isa(), forced.long_row_loop()), (isa, l));
            assert_eq!(LongRowLoop::from_name(l.name()), Some(l));
        }
    }
    assert_eq!(Kernels::best().long_row_loop(), LongRowLoop::Auto);
    assert_eq!(LongRowLoop::default(), LongRowLoop::Auto);
    assert_eq!(LongRowLoop::from_name("two_pass"), None);

    #[cfg(target_arch = "x86_64")]
    let intel = {
        let r = std::arch::x86_64::__cpuid(0);
        let v = [r.ebx, r.edx, r.ecx].map(u32::to_le_bytes).concat();
        v == b"GenuineIntel"
    };
    #[cfg(not(target_arch = "x86_64"))]
    let intel = false;
    for forced in [LongRowLoop::OnePass, LongRowLoop::Split] {
        assert_eq!(forced.resolve(), forced);
    }
    let want = if intel {
        LongRowLoop::OnePass
    } else {
        LongRowLoop::Split
    };
    assert_eq!(LongRowLoop::Auto.resolve(), want);
}
