//! Bad input, writes outside the given slices, path detection, and stochastic rounding.

use crate::common::*;
use lazyadam_kernels::{
    AdamCoeffs, DType, Element, GradTransform, Isa, KernelError, Kernels, Rounding, bf16, f16,
};

fn paths() -> Vec<Kernels> {
    Isa::supported().map(|i| Kernels::new(i).unwrap()).collect()
}

fn sr_coeffs(seed: u64, offset: u64) -> AdamCoeffs {
    let mut c = AdamCoeffs::new(0.01, 0.9, 0.999, 1e-7);
    c.weight_decay = 0.01;
    c.grad = GradTransform {
        scale: 0.5,
        clip: Some(1.0),
        negate: true,
    };
    c.rounding = Rounding::Stochastic { seed, offset };
    c
}

#[test]
fn length_mismatch_is_an_error_and_writes_nothing() {
    let c = sr_coeffs(1, 0);
    let t = GradTransform::default();
    for k in paths() {
        for n in [0usize, 1, 7, 8, 17, 64] {
            let p0: Vec<f16> = (0..n).map(|i| f16::from_f32(i as f32)).collect();
            let m0 = vec![0.5f32; n];
            let g0 = vec![1.0f32; n];
            for (what, dm, dv, dvh, dg) in [
                ("m", 1, 0, 0, 0),
                ("v", 0, 1, 0, 0),
                ("vhat", 0, 0, 1, 0),
                ("grad", 0, 0, 0, 1),
            ] {
                let (mut p, mut m, mut v, mut vh) = (
                    p0.clone(),
                    vec![0.5f32; n + dm],
                    vec![0.5f32; n + dv],
                    vec![0.5f32; n + dvh],
                );
                let g = vec![1.0f32; n + dg];
                let e = k.adam_row_amsgrad(&c, &mut p, &mut m, &mut v, &mut vh, &g);
                assert_eq!(
                    e,
                    Err(KernelError::LengthMismatch {
                        what,
                        expected: n,
                        got: n + 1
                    })
                );
                if what != "vhat" {
                    let e = k.adam_row(&c, &mut p, &mut m, &mut v, &g);
                    assert!(
                        matches!(e, Err(KernelError::LengthMismatch { what: w, .. }) if w == what)
                    );
                }
                assert_eq!(p, p0);
                assert!(m.iter().chain(&v).chain(&vh).all(|&x| x == 0.5));
            }
            // Shorter, too.
            if n > 0 {
                let mut p = p0.clone();
                let mut m = m0.clone();
                let mut v = vec![0.5f32; n - 1];
                assert!(k.adam_row(&c, &mut p, &mut m, &mut v, &g0).is_err());
                assert_eq!(p, p0);
                assert_eq!(m, m0);
            }
            let mut dst = vec![3.0f32; n];
            let src = vec![f16::ONE; n + 1];
            assert!(k.load_row(&mut dst, &src, &t).is_err());
            assert!(k.accumulate_row(&mut dst, &src, &t).is_err());
            assert!(dst.iter().all(|&x| x == 3.0));
            let mut out = vec![bf16::ONE; n];
            let e = k.store_row(&mut out, &vec![2.0f32; n + 1], Rounding::NearestEven);
            assert_eq!(
                e,
                Err(KernelError::LengthMismatch {
                    what: "src",
                    expected: n,
                    got: n + 1
                })
            );
            assert!(out.iter().all(|&x| x == bf16::ONE));
        }
    }
}

/// A row embedded in a larger buffer full of sentinels: after every primitive, the sentinels
/// keep their exact bits.
fn sentinel_check<P: Element, G: Element, M: Element>() {
    const PAD: usize = 19;
    let sentinel = |x: f32| x; // the value, stored in each type
    let c = sr_coeffs(9, 3);
    let t = GradTransform {
        scale: 2.0,
        clip: Some(0.5),
        negate: false,
    };
    for k in paths() {
        for n in [0usize, 1, 5, 8, 15, 16, 17, 31, 33, 100] {
            let total = n + 2 * PAD;
            let s = sentinel(-7.25);
            let mut p = vec![P::from_f32(s); total];
            let mut m = vec![M::from_f32(s); total];
            let mut v = vec![M::from_f32(s); total];
            let mut vh = vec![M::from_f32(s); total];
            let mut g = vec![G::from_f32(s); total];
            for i in PAD..PAD + n {
                p[i] = P::from_f32(i as f32);
                m[i] = M::from_f32(0.25);
                v[i] = M::from_f32(0.5);
                vh[i] = M::from_f32(0.75);
                g[i] = G::from_f32(1.0 / i as f32);
            }
            let r = PAD..PAD + n;
            k.adam_row(
                &c,
                &mut p[r.clone()],
                &mut m[r.clone()],
                &mut v[r.clone()],
                &g[r.clone()],
            )
            .unwrap();
            k.adam_row_amsgrad(
                &c,
                &mut p[r.clone()],
                &mut m[r.clone()],
                &mut v[r.clone()],
                &mut vh[r.clone()],
                &g[r.clone()],
            )
            .unwrap();
            let mut dst = vec![s; total];
            k.load_row(&mut dst[r.clone()], &g[r.clone()], &t).unwrap();
            k.accumulate_row(&mut dst[r.clone()], &g[r.clone()], &t)
                .unwrap();
            let src: Vec<f32> = (0..total).map(|i| i as f32 * 0.1).collect();
            k.store_row(&mut p[r.clone()], &src[r.clone()], c.rounding)
                .unwrap();
            let outside = |i: usize| i < PAD || i >= PAD + n;
            for i in (0..total).filter(|&i| outside(i)) {
                let name = k.isa().name();
                assert!(
                    same(p[i], P::from_f32(s)),
                    "{name} n={n}: param[{i}] written"
                );
                assert!(same(m[i], M::from_f32(s)), "{name} n={n}: m[{i}] written");
                assert!(same(v[i], M::from_f32(s)), "{name} n={n}: v[{i}] written");
                assert!(
                    same(vh[i], M::from_f32(s)),
                    "{name} n={n}: vhat[{i}] written"
                );
                assert_eq!(
                    dst[i].to_bits(),
                    s.to_bits(),
                    "{name} n={n}: dst[{i}] written"
                );
            }
            // And the inside was written.
            if n > 0 {
                assert!(!same(p[PAD], P::from_f32(s)));
            }
        }
    }
}

#[test]
fn nothing_written_outside_the_slices() {
    sentinel_check::<f32, f32, f32>();
    sentinel_check::<f16, f16, f16>();
    sentinel_check::<f16, f16, f32>();
    sentinel_check::<bf16, bf16, bf16>();
    sentinel_check::<f32, f32, bf16>();
    sentinel_check::<f32, f16, f32>();
}

#[test]
fn unsupported_path_is_an_error() {
    for isa in Isa::ALL {
        match Kernels::new(isa) {
            Ok(k) => assert!(isa.is_supported() && k.isa() == isa),
            Err(e) => {
                assert!(!isa.is_supported());
                assert_eq!(e, KernelError::UnsupportedIsa(isa));
            }
        }
    }
    assert!(Isa::Scalar.is_supported() && Isa::Portable.is_supported());
    assert!(Isa::best().is_supported());
    assert_eq!(Kernels::best().isa(), Isa::best());
    assert_eq!(Isa::supported().last(), Some(Isa::best()));
}

/// If the CPU has AVX-512 (or AVX2), the corresponding path must be supported, be the best,
/// and be exercised by the equivalence tests (which loop over `Isa::supported()`); here it is
/// also run once explicitly against the reference.
#[test]
#[cfg(target_arch = "x86_64")]
fn detected_features_are_exercised() {
    let v3 = is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c");
    let v4 = v3
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512dq")
        && is_x86_feature_detected!("avx512vl");
    assert_eq!(Isa::Avx2.is_supported(), v3);
    assert_eq!(Isa::Avx512.is_supported(), v4);
    let expected_best = if v4 {
        Isa::Avx512
    } else if v3 {
        Isa::Avx2
    } else {
        Isa::Portable
    };
    assert_eq!(Isa::best(), expected_best);
    let supported: Vec<Isa> = Isa::supported().collect();
    if v4 {
        assert!(
            supported.contains(&Isa::Avx512),
            "AVX-512 detected but not exercised"
        );
    }
    if v3 {
        assert!(
            supported.contains(&Isa::Avx2),
            "AVX2 detected but not exercised"
        );
    }
    for isa in supported {
        let k = Kernels::new(isa).unwrap();
        let n = 37;
        let c = sr_coeffs(5, 11);
        let g: Vec<f32> = (0..n).map(|i| (i as f32 - 18.0) * 0.37).collect();
        let mut p = vec![bf16::ONE; n];
        let (mut m, mut v) = (vec![0.0f32; n], vec![0.0f32; n]);
        k.adam_row(&c, &mut p, &mut m, &mut v, &g).unwrap();
        let mut rp = vec![bf16::ONE; n];
        let (mut rm, mut rv) = (vec![0.0f32; n], vec![0.0f32; n]);
        Kernels::new(Isa::Scalar)
            .unwrap()
            .adam_row(&c, &mut rp, &mut rm, &mut rv, &g)
            .unwrap();
        assert_eq!((p, m, v), (rp, rm, rv), "{isa}");
    }
}

/// A standalone test of the no-std detection's view is not possible from here (the std
/// feature is on); the no-std consumer crate covers the build.
#[test]
fn dtype_names_and_sizes() {
    assert_eq!(DType::F32.name(), "float32");
    assert_eq!(DType::F16.name(), "float16");
    assert_eq!(DType::BF16.name(), "bfloat16");
    assert_eq!(DType::F32.size_bytes(), 4);
    assert_eq!(<bf16 as Element>::DTYPE, DType::BF16);
    assert_eq!(Isa::Avx512.name(), "avx512");
    assert_eq!(Isa::ALL.len(), 4);
    let e = KernelError::LengthMismatch {
        what: "m",
        expected: 3,
        got: 4,
    };
    assert!(e.to_string().contains("`m`"));
}

// ---------------------------------------------------------------------------------------
// Stochastic rounding.

fn sr_store<P: Element>(k: Kernels, src: &[f32], seed: u64, offset: u64) -> Vec<P> {
    let mut d = vec![P::default(); src.len()];
    k.store_row(&mut d, src, Rounding::Stochastic { seed, offset })
        .unwrap();
    d
}

/// Raw 16-bit access for the neighbour computation.
trait Bits16: Element {
    fn bits(self) -> u16;
    fn from(bits: u16) -> Self;
}
impl Bits16 for f16 {
    fn bits(self) -> u16 {
        self.to_bits()
    }
    fn from(bits: u16) -> Self {
        f16::from_bits(bits)
    }
}
impl Bits16 for bf16 {
    fn bits(self) -> u16 {
        self.to_bits()
    }
    fn from(bits: u16) -> Self {
        bf16::from_bits(bits)
    }
}

/// The next value toward +infinity (by bits; -0 and +0 both step to the smallest positive).
fn next_up<P: Bits16>(y: P) -> f32 {
    let b = y.bits();
    let n = if b & 0x7FFF == 0 {
        1
    } else if b & 0x8000 == 0 {
        b + 1
    } else {
        b - 1
    };
    P::from(n).to_f32()
}

/// The next value toward -infinity.
fn next_down<P: Bits16>(y: P) -> f32 {
    let b = y.bits();
    let n = if b & 0x7FFF == 0 {
        0x8001
    } else if b & 0x8000 == 0 {
        b - 1
    } else {
        b + 1
    };
    P::from(n).to_f32()
}

/// The two neighbours (lower, upper) of a finite x in the storage type, by value.
fn neighbours<P: Bits16>(x: f32) -> (f32, f32) {
    let r = P::from_f32(x);
    let n = r.to_f32();
    if n == x {
        (n, n)
    } else if n < x {
        (n, next_up(r))
    } else {
        (next_down(r), n)
    }
}

fn sr_properties<P: Bits16>() {
    let k0 = Kernels::new(Isa::Scalar).unwrap();
    let src: Vec<f32> = (0..1000)
        .map(|i| {
            let base = [1.0f32, -3.7, 1e-6, -6.0e-6, 1000.3, 9e-41, 65500.0][i % 7];
            base * (1.0 + (i as f32) * 1.3e-4)
        })
        .collect();
    let a = sr_store::<P>(k0, &src, 42, 1000);
    // Reproducible, and the same on every path.
    for k in paths() {
        assert_eq!(sr_store::<P>(k, &src, 42, 1000), a, "{}", k.isa());
    }
    // Independent of chunking: two halves with adjusted offsets give the same bits.
    let (l, r) = src.split_at(333);
    let mut halves = sr_store::<P>(k0, l, 42, 1000);
    halves.extend(sr_store::<P>(k0, r, 42, 1333));
    assert_eq!(halves, a);
    // Different seeds (and offsets) give different results.
    let b = sr_store::<P>(k0, &src, 43, 1000);
    let d = sr_store::<P>(k0, &src, 42, 1001);
    let diff = |x: &[P]| x.iter().zip(&a).filter(|(p, q)| p != q).count();
    assert!(diff(&b) > 100, "seed barely changes results: {}", diff(&b));
    assert!(
        diff(&d) > 100,
        "offset barely changes results: {}",
        diff(&d)
    );
    // Always one of the two neighbours.
    for (x, y) in src.iter().zip(&a) {
        let (lo, hi) = neighbours::<P>(*x);
        let y = y.to_f32();
        assert!(
            y == lo || y == hi,
            "{x:e} -> {y:e}, neighbours {lo:e} {hi:e}"
        );
    }
}

#[test]
fn stochastic_rounding_properties() {
    sr_properties::<f16>();
    sr_properties::<bf16>();
}

/// The mean of many stochastic roundings of one value is the value (within a wide bound).
fn sr_mean<P: Bits16>(x: f32) {
    const N: usize = 200_000;
    let src = vec![x; N];
    let (lo, hi) = neighbours::<P>(x);
    assert!(lo < hi, "{x} is representable");
    let d = sr_store::<P>(Kernels::best(), &src, 0x5EED, 0);
    let mean = d.iter().map(|y| y.to_f32() as f64).sum::<f64>() / N as f64;
    let gap = (hi - lo) as f64;
    let p = (x as f64 - lo as f64) / gap;
    // Standard deviation of the mean: gap * sqrt(p(1-p)/N); allow 6 sigma plus a hair.
    let tol = 6.0 * gap * (p * (1.0 - p) / N as f64).sqrt() + gap * 1e-6;
    assert!(
        (mean - x as f64).abs() <= tol,
        "{}: mean {mean:e} vs {x:e} (tol {tol:e})",
        std::any::type_name::<P>()
    );
    // And rounding nearest-even would be biased here (sanity check of the test).
    let rne = P::from_f32(x).to_f32() as f64;
    assert!((rne - x as f64).abs() > tol);
}

#[test]
fn stochastic_rounding_is_unbiased() {
    for x in [1.0f32 + 0.3 / 128.0, -2.0 - 0.71 / 64.0, 3.1e-39, 1.5e38] {
        sr_mean::<bf16>(x);
    }
    for x in [
        1.0f32 + 0.3 / 1024.0,
        -1000.0 - 0.2 * 0.5,
        2.1e-7,
        -6.2e-8,
        65400.0 + 7.1,
        1e-5 * 1.01,
    ] {
        sr_mean::<f16>(x);
    }
}

/// Stochastic rounding in the Adam update itself: same on every path (also covered by the
/// proptests), reproducible, and f32 parameters unaffected.
#[test]
fn stochastic_rounding_in_adam() {
    let n = 301;
    let g: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 113) as f32 / 113.0 - 0.5)
        .collect();
    let run = |k: Kernels, seed: u64| {
        let mut p = vec![bf16::from_f32(0.3); n];
        let (mut m, mut v) = (vec![0.0f32; n], vec![0.0f32; n]);
        k.adam_row(&sr_coeffs(seed, 17), &mut p, &mut m, &mut v, &g)
            .unwrap();
        p
    };
    let r = run(Kernels::new(Isa::Scalar).unwrap(), 1);
    for k in paths() {
        assert_eq!(run(k, 1), r);
    }
    assert_ne!(run(Kernels::best(), 2), r);
    // f32 parameters: stochastic rounding is a no-op.
    let mut p1 = vec![0.3f32; n];
    let mut p2 = vec![0.3f32; n];
    let (mut m, mut v) = (vec![0.0f32; n], vec![0.0f32; n]);
    let k = Kernels::best();
    k.adam_row(&sr_coeffs(1, 0), &mut p1, &mut m, &mut v, &g)
        .unwrap();
    let mut c = sr_coeffs(1, 0);
    c.rounding = Rounding::NearestEven;
    let (mut m, mut v) = (vec![0.0f32; n], vec![0.0f32; n]);
    k.adam_row(&c, &mut p2, &mut m, &mut v, &g).unwrap();
    assert_eq!(p1, p2);
}
