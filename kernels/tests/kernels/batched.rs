//! The batched primitives (`adam_rows`, `accumulate_rows`, `sum_rows_at`) on every path are bit-identical to
//! the scalar reference's one-row primitives applied row by row, and reject bad input
//! without writing anything.

use crate::common::*;
use lazyadam_kernels::{
    AdamCoeffs, Element, GradTransform, Isa, KernelError, Kernels, Rounding, bf16, f16,
};
use proptest::prelude::*;

fn paths() -> Vec<Kernels> {
    Isa::supported()
        .map(|isa| Kernels::new(isa).expect("supported"))
        .collect()
}

fn scalar() -> Kernels {
    Kernels::new(Isa::Scalar).unwrap()
}

/// A table case: (row_len, table rows, p, m, v, row list, gradient rows).
type Case = (
    usize,
    usize,
    Vec<f32>,
    Vec<f32>,
    Vec<f32>,
    Vec<usize>,
    Vec<f32>,
);

fn case() -> impl Strategy<Value = Case> {
    (1usize..40, 1usize..10, 0usize..16).prop_flat_map(|(rl, nrows, k)| {
        let n = rl * nrows;
        (
            Just(rl),
            Just(nrows),
            row(n),
            row(n),
            row(n),
            // Repeats allowed: rows are then updated twice, in order.
            prop::collection::vec(0..nrows, k),
            row(k * rl),
        )
    })
}

/// The reference: `adam_row` of the scalar path on each listed row in order, with the
/// stochastic-rounding offset advanced to the row's place in the table.
fn reference<P: Element, G: Element, M: Element>(
    c: &AdamCoeffs,
    rl: usize,
    p: &mut [P],
    m: &mut [M],
    v: &mut [M],
    rows: &[usize],
    g: &[G],
) {
    for (k, &r) in rows.iter().enumerate() {
        let mut cr = *c;
        if let Rounding::Stochastic { seed, offset } = c.rounding {
            cr.rounding = Rounding::Stochastic {
                seed,
                offset: offset.wrapping_add((r * rl) as u64),
            };
        }
        let range = r * rl..(r + 1) * rl;
        scalar()
            .adam_row(
                &cr,
                &mut p[range.clone()],
                &mut m[range.clone()],
                &mut v[range],
                &g[k * rl..(k + 1) * rl],
            )
            .unwrap();
    }
}

fn check_adam_rows<P: Element, G: Element, M: Element>(
    c: &AdamCoeffs,
    case: &Case,
) -> Result<(), TestCaseError> {
    let (rl, _, p, m, v, rows, g) = case;
    let (p0, m0, v0, g0) = (conv::<P>(p), conv::<M>(m), conv::<M>(v), conv::<G>(g));
    let (mut rp, mut rm, mut rv) = (p0.clone(), m0.clone(), v0.clone());
    reference(c, *rl, &mut rp, &mut rm, &mut rv, rows, &g0);
    for k in paths() {
        let name = k.isa().name();
        let (mut xp, mut xm, mut xv) = (p0.clone(), m0.clone(), v0.clone());
        k.adam_rows(c, &mut xp, &mut xm, &mut xv, *rl, rows, &g0)
            .unwrap();
        assert_rows(&format!("{name} param"), &xp, &rp)?;
        assert_rows(&format!("{name} m"), &xm, &rm)?;
        assert_rows(&format!("{name} v"), &xv, &rv)?;
    }
    Ok(())
}

fn check_accumulate_rows<G: Element>(
    t: &GradTransform,
    rl: usize,
    acc: &[f32],
    slots: &[u32],
    src: &[f32],
) -> Result<(), TestCaseError> {
    let s0 = conv::<G>(src);
    let mut want = acc.to_vec();
    for (i, &s) in slots.iter().enumerate() {
        let at = s as usize * rl;
        scalar()
            .accumulate_row(&mut want[at..at + rl], &s0[i * rl..(i + 1) * rl], t)
            .unwrap();
    }
    for k in paths() {
        let mut got = acc.to_vec();
        k.accumulate_rows(&mut got, rl, slots, &s0, t).unwrap();
        assert_rows(&format!("{} accumulate_rows", k.isa().name()), &got, &want)?;
    }
    Ok(())
}

fn check_sum_rows_at<G: Element>(
    t: &GradTransform,
    dst: &[f32],
    positions: &[usize],
    src: &[f32],
) -> Result<(), TestCaseError> {
    let rl = dst.len();
    let s0 = conv::<G>(src);
    // The reference: the scalar path's one-row primitives, one call per position.
    let mut want = dst.to_vec();
    for (j, &p) in positions.iter().enumerate() {
        let g = &s0[p * rl..(p + 1) * rl];
        if j == 0 {
            scalar().load_row(&mut want, g, t).unwrap();
        } else {
            scalar().accumulate_row(&mut want, g, t).unwrap();
        }
    }
    for k in paths() {
        let mut got = dst.to_vec();
        k.sum_rows_at(&mut got, &s0, positions, t).unwrap();
        assert_rows(&format!("{} sum_rows_at", k.isa().name()), &got, &want)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn sum_rows_at_matches_row_by_row_reference(
        t in transform(),
        (dst, positions, src) in (1usize..80, 1usize..12, 0usize..24).prop_flat_map(|(rl, n, k)| {
            (row(rl), prop::collection::vec(0..n, k), row(rl * n))
        }),
    ) {
        check_sum_rows_at::<f32>(&t, &dst, &positions, &src)?;
        check_sum_rows_at::<f16>(&t, &dst, &positions, &src)?;
        check_sum_rows_at::<bf16>(&t, &dst, &positions, &src)?;
    }

    #[test]
    fn adam_rows_matches_row_by_row_reference(c in coeffs(), case in case()) {
        check_adam_rows::<f32, f32, f32>(&c, &case)?;
        check_adam_rows::<f16, f16, f16>(&c, &case)?;
        check_adam_rows::<f16, f16, f32>(&c, &case)?;
        check_adam_rows::<bf16, bf16, bf16>(&c, &case)?;
        check_adam_rows::<f32, f32, bf16>(&c, &case)?;
        check_adam_rows::<f32, f16, f32>(&c, &case)?;
    }

    #[test]
    fn adam_rows_plain_coeffs_match(
        c in plain_coeffs(),
        case in case(),
    ) {
        check_adam_rows::<f32, f32, f32>(&c, &case)?;
        check_adam_rows::<f16, f16, f16>(&c, &case)?;
        check_adam_rows::<bf16, f32, bf16>(&c, &case)?;
    }

    #[test]
    fn adam_rows_scaled_plain_coeffs_match(c in scaled_plain_coeffs(), case in case()) {
        check_adam_rows::<f32, f32, f32>(&c, &case)?;
        check_adam_rows::<f16, f16, f16>(&c, &case)?;
        check_adam_rows::<bf16, f32, bf16>(&c, &case)?;
    }

    #[test]
    fn accumulate_rows_matches_row_by_row_reference(
        t in transform(),
        (rl, acc, slots, src) in (1usize..40, 1usize..8, 0usize..24).prop_flat_map(|(rl, n, k)| {
            (Just(rl), row(rl * n), prop::collection::vec(0..n as u32, k), row(rl * k))
        }),
    ) {
        check_accumulate_rows::<f32>(&t, rl, &acc, &slots, &src)?;
        check_accumulate_rows::<f16>(&t, rl, &acc, &slots, &src)?;
        check_accumulate_rows::<bf16>(&t, rl, &acc, &slots, &src)?;
    }
}

/// Snapshot of a table, bitwise.
fn snap(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn adam_rows_rejects_bad_input_without_writing() {
    let c = AdamCoeffs::new(0.1, 0.9, 0.999, 1e-7);
    for k in paths() {
        let mut p: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let mut m = vec![0.5f32; 12];
        let mut v = vec![0.25f32; 12];
        let before = (snap(&p), snap(&m), snap(&v));
        let g = vec![1.0f32; 8];
        let run = |p: &mut [f32], m: &mut [f32], v: &mut [f32], rl, rows: &[usize], g| {
            k.adam_rows(&c, p, m, v, rl, rows, g)
        };
        // A bad row after a good one: nothing written, the first bad row reported.
        assert_eq!(
            run(&mut p, &mut m, &mut v, 4, &[1, 3], &g),
            Err(KernelError::RowOutOfRange {
                what: "rows",
                row: 3,
                rows: 3
            })
        );
        assert_eq!(
            run(&mut p, &mut m, &mut v, 4, &[0, usize::MAX], &g),
            Err(KernelError::RowOutOfRange {
                what: "rows",
                row: usize::MAX,
                rows: 3
            })
        );
        // Not a whole number of rows.
        assert!(matches!(
            run(&mut p, &mut m, &mut v, 5, &[0], &g[..5]),
            Err(KernelError::BadRowLength {
                what: "param",
                len: 12,
                row_len: 5
            })
        ));
        // Zero row length with rows.
        assert!(matches!(
            run(&mut p, &mut m, &mut v, 0, &[0], &[]),
            Err(KernelError::BadRowLength { .. })
        ));
        // Gradient rows missing.
        assert!(matches!(
            run(&mut p, &mut m, &mut v, 4, &[0, 1], &g[..7]),
            Err(KernelError::LengthMismatch {
                what: "grads",
                expected: 8,
                got: 7
            })
        ));
        // Moments of another length.
        assert!(matches!(
            run(&mut p, &mut m[..8], &mut v, 4, &[0], &g[..4]),
            Err(KernelError::LengthMismatch { what: "m", .. })
        ));
        assert_eq!((snap(&p), snap(&m), snap(&v)), before, "{}", k.isa().name());
        // No rows: nothing to do, even with a zero row length on an empty table.
        assert_eq!(run(&mut p, &mut m, &mut v, 4, &[], &[]), Ok(()));
        assert_eq!(run(&mut [], &mut [], &mut [], 0, &[], &[]), Ok(()));
        assert_eq!((snap(&p), snap(&m), snap(&v)), before);
        // And a good call does write.
        assert_eq!(run(&mut p, &mut m, &mut v, 4, &[2], &g[..4]), Ok(()));
        assert_ne!(snap(&p), before.0);
        assert_eq!(snap(&p)[..8], before.0[..8]);
    }
}

#[test]
fn accumulate_rows_rejects_bad_input_without_writing() {
    let t = GradTransform::default();
    for k in paths() {
        let mut acc = vec![1.0f32; 6];
        let src = vec![2.0f32; 6];
        assert_eq!(
            k.accumulate_rows(&mut acc, 2, &[0, 3, 1], &src, &t),
            Err(KernelError::RowOutOfRange {
                what: "slots",
                row: 3,
                rows: 3
            })
        );
        assert!(matches!(
            k.accumulate_rows(&mut acc, 4, &[0], &src[..4], &t),
            Err(KernelError::BadRowLength { what: "acc", .. })
        ));
        assert!(matches!(
            k.accumulate_rows(&mut acc, 2, &[0, 1], &src[..3], &t),
            Err(KernelError::LengthMismatch { what: "src", .. })
        ));
        assert_eq!(acc, vec![1.0f32; 6]);
        k.accumulate_rows(&mut acc, 2, &[2, 2], &src[..4], &t)
            .unwrap();
        assert_eq!(acc, [1.0, 1.0, 1.0, 1.0, 5.0, 5.0]);
    }
}

#[test]
fn sum_rows_at_rejects_bad_input_without_writing() {
    let t = GradTransform::default();
    for k in paths() {
        let mut dst = vec![1.0f32; 2];
        let src: Vec<f32> = (0..6).map(|i| i as f32).collect();
        // A bad position after good ones: nothing written, the first bad one reported.
        assert_eq!(
            k.sum_rows_at(&mut dst, &src, &[0, 3, usize::MAX], &t),
            Err(KernelError::RowOutOfRange {
                what: "positions",
                row: 3,
                rows: 3
            })
        );
        // `src` not a whole number of rows.
        assert_eq!(
            k.sum_rows_at(&mut dst, &src[..5], &[0], &t),
            Err(KernelError::BadRowLength {
                what: "src",
                len: 5,
                row_len: 2
            })
        );
        // An empty row with positions.
        assert!(matches!(
            k.sum_rows_at(&mut [], &src, &[0], &t),
            Err(KernelError::BadRowLength { what: "src", .. })
        ));
        assert_eq!(dst, [1.0, 1.0]);
        // No positions: nothing written, also on an empty source.
        assert_eq!(k.sum_rows_at(&mut dst, &src, &[], &t), Ok(()));
        assert_eq!(k.sum_rows_at::<f32>(&mut dst, &[], &[], &t), Ok(()));
        assert_eq!(dst, [1.0, 1.0]);
        // The first row is loaded (not added), the others added, repeats included.
        k.sum_rows_at(&mut dst, &src, &[2, 0, 2], &t).unwrap();
        assert_eq!(dst, [8.0, 11.0], "{}", k.isa().name());
    }
}

/// The error messages name the problem.
#[test]
fn batched_errors_display() {
    let e = KernelError::RowOutOfRange {
        what: "rows",
        row: 7,
        rows: 3,
    };
    assert_eq!(
        e.to_string(),
        "`rows` holds row 7, but the table has 3 rows"
    );
    let e = KernelError::BadRowLength {
        what: "param",
        len: 12,
        row_len: 5,
    };
    assert_eq!(
        e.to_string(),
        "`param` has 12 elements, not a whole number of rows of 5"
    );
}
