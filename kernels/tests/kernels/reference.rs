//! The scalar reference against an independent, straightforward transcription of the
//! contract, written here.

// The transcription mirrors the contract text literally (`g = g * scale`).
#![allow(clippy::assign_op_pattern)]

use crate::common::*;
use lazyadam_kernels::{AdamCoeffs, GradTransform, Isa, Kernels, Rounding, bf16, f16};
use proptest::prelude::*;

fn transform(g: f32, t: &GradTransform) -> f32 {
    let mut g = g;
    if t.scale != 1.0 {
        g = g * t.scale;
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

/// The contract's per-element formula, on f32 values, for a whole row.
#[allow(clippy::too_many_arguments)]
fn plain_adam(
    c: &AdamCoeffs,
    p: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    vh: Option<&mut [f32]>,
    g: &[f32],
) {
    let mut vh = vh;
    for i in 0..p.len() {
        let g = transform(g[i], &c.grad);
        let mut m0 = m[i];
        let mut v0 = v[i];
        if c.m_pre_decay != 1.0 {
            m0 = m0 * c.m_pre_decay;
        }
        if c.v_pre_decay != 1.0 {
            v0 = v0 * c.v_pre_decay;
        }
        let m1 = c.beta1 * m0 + c.one_minus_beta1 * g;
        let v1 = c.beta2 * v0 + c.one_minus_beta2 * (g * g);
        let d = match vh.as_deref_mut() {
            Some(vh) => {
                let vh1 = if vh[i] >= v1 { vh[i] } else { v1 };
                vh[i] = vh1;
                vh1
            }
            None => v1,
        };
        let mut p0 = p[i];
        if c.weight_decay != 0.0 {
            p0 = p0 - c.weight_decay * p0;
        }
        p[i] = p0 - (c.lr_t * m1) / (d.sqrt() + c.epsilon);
        m[i] = m1;
        v[i] = v1;
    }
}

fn reference() -> Kernels {
    Kernels::new(Isa::Scalar).unwrap()
}

type Rows = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);
fn rows() -> impl Strategy<Value = Rows> {
    (0usize..100).prop_flat_map(|n| (row(n), row(n), row(n), row(n), row(n)))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// All-f32 storage: exact equality with the plain loop.
    #[test]
    fn f32_adam_is_the_contract(c in coeffs(), (p, m, v, vh, g) in rows()) {
        let mut c = c;
        c.rounding = Rounding::NearestEven;
        for ams in [false, true] {
            let (mut wp, mut wm, mut wv, mut wvh) = (p.clone(), m.clone(), v.clone(), vh.clone());
            plain_adam(&c, &mut wp, &mut wm, &mut wv, ams.then_some(&mut wvh[..]), &g);
            let (mut xp, mut xm, mut xv, mut xvh) = (p.clone(), m.clone(), v.clone(), vh.clone());
            if ams {
                reference().adam_row_amsgrad(&c, &mut xp, &mut xm, &mut xv, &mut xvh, &g).unwrap();
            } else {
                reference().adam_row(&c, &mut xp, &mut xm, &mut xv, &g).unwrap();
            }
            assert_rows("param", &xp, &wp)?;
            assert_rows("m", &xm, &wm)?;
            assert_rows("v", &xv, &wv)?;
            assert_rows("vhat", &xvh, &wvh)?;
        }
    }

    /// f16 parameters/gradients with bf16 moments: widen with half, compute as above, narrow
    /// with half.
    #[test]
    fn half_storage_adam_is_the_contract(c in coeffs(), (p, m, v, _vh, g) in rows()) {
        let mut c = c;
        c.rounding = Rounding::NearestEven;
        let (hp, hg): (Vec<f16>, Vec<f16>) = (conv(&p), conv(&g));
        let (bm, bv): (Vec<bf16>, Vec<bf16>) = (conv(&m), conv(&v));
        let mut wp: Vec<f32> = hp.iter().map(|x| x.to_f32()).collect();
        let mut wm: Vec<f32> = bm.iter().map(|x| x.to_f32()).collect();
        let mut wv: Vec<f32> = bv.iter().map(|x| x.to_f32()).collect();
        let wg: Vec<f32> = hg.iter().map(|x| x.to_f32()).collect();
        plain_adam(&c, &mut wp, &mut wm, &mut wv, None, &wg);
        let (mut xp, mut xm, mut xv) = (hp.clone(), bm.clone(), bv.clone());
        reference().adam_row(&c, &mut xp, &mut xm, &mut xv, &hg).unwrap();
        assert_rows("param", &xp, &conv::<f16>(&wp))?;
        assert_rows("m", &xm, &conv::<bf16>(&wm))?;
        assert_rows("v", &xv, &conv::<bf16>(&wv))?;
    }

    #[test]
    fn grad_prims_are_the_contract(t in transform_strategy(), (dst, src) in (0usize..100).prop_flat_map(|n| (row(n), row(n)))) {
        let k = reference();
        let mut l = dst.clone();
        k.load_row(&mut l, &src, &t).unwrap();
        let want: Vec<f32> = src.iter().map(|&x| transform(x, &t)).collect();
        assert_rows("load_row", &l, &want)?;
        let mut a = dst.clone();
        k.accumulate_row(&mut a, &src, &t).unwrap();
        let want: Vec<f32> = dst.iter().zip(&src).map(|(&d, &x)| d + transform(x, &t)).collect();
        assert_rows("accumulate_row", &a, &want)?;
        let mut acc = [0.0f64; 8];
        for (i, &x) in src.iter().enumerate() {
            let y = transform(x, &t) as f64;
            acc[i % 8] += y * y;
        }
        let want = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
        let got = k.sum_squares(&src, &t);
        prop_assert!(same_f64(got, want), "sum_squares {} vs {}", got, want);
        prop_assert_eq!(k.all_finite(&src), src.iter().all(|x| x.is_finite()));
        let h: Vec<f16> = conv(&src);
        prop_assert_eq!(k.all_finite(&h), h.iter().all(|x| x.is_finite()));
        let b: Vec<bf16> = conv(&src);
        prop_assert_eq!(k.all_finite(&b), b.iter().all(|x| x.is_finite()));
        // max_abs: NaN if any element is NaN, else the largest |x| (0 for none).
        let wide = |v: Vec<f32>| -> f32 {
            if v.iter().any(|x| x.is_nan()) {
                f32::NAN
            } else {
                v.iter().fold(0.0f32, |m, x| m.max(x.abs()))
            }
        };
        let same = |a: f32, b: f32| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
        prop_assert!(same(k.max_abs(&src), wide(src.clone())));
        prop_assert!(same(k.max_abs(&h), wide(h.iter().map(|x| x.to_f32()).collect())));
        prop_assert!(same(k.max_abs(&b), wide(b.iter().map(|x| x.to_f32()).collect())));
    }

    #[test]
    fn nearest_store_is_half(src in (0usize..100).prop_flat_map(row)) {
        let k = reference();
        let mut h = vec![f16::ZERO; src.len()];
        k.store_row(&mut h, &src, Rounding::NearestEven).unwrap();
        assert_rows("f16", &h, &conv::<f16>(&src))?;
        let mut b = vec![bf16::ZERO; src.len()];
        k.store_row(&mut b, &src, Rounding::NearestEven).unwrap();
        assert_rows("bf16", &b, &conv::<bf16>(&src))?;
        let mut f = vec![0.0f32; src.len()];
        // f32 stores are exact, stochastic or not.
        k.store_row(&mut f, &src, Rounding::Stochastic { seed: 1, offset: 2 }).unwrap();
        assert_rows("f32", &f, &src)?;
    }
}

fn transform_strategy() -> impl Strategy<Value = GradTransform> {
    crate::common::transform()
}

/// A hand-checked value: one Adam step from zero moments.
#[test]
fn known_values() {
    let c = AdamCoeffs::new(0.1, 0.5, 0.75, 0.0);
    let (mut p, mut m, mut v) = ([1.0f32], [0.0f32], [0.0f32]);
    reference()
        .adam_row(&c, &mut p, &mut m, &mut v, &[2.0f32])
        .unwrap();
    // m = 0.5*2 = 1, v = 0.25*4 = 1, p = 1 - 0.1*1/1 = 0.9
    assert_eq!((p[0], m[0], v[0]), (1.0 - 0.1, 1.0, 1.0));
}
