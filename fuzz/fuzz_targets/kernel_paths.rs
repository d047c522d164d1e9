//! Every supported ISA path of every kernel gives the scalar reference's bits (NaN payloads
//! aside), for arbitrary rows, lengths, coefficients, roundings and the 27 storage combinations;
//! and the scalar path itself follows the per-element operation order of the numerics contract,
//! checked against a plain model written here. Length mismatches are errors that write nothing.
//! The exact sum of squares is the same on every path and for any split of the row, and
//! equals adding the transformed values one by one.
#![no_main]

use arbitrary::{Result, Unstructured};
use lazyadam_kernels::{
    AdamCoeffs, Element, GradTransform, Isa, Kernels, Rounding, SquareSum, bf16, f16,
};
use libfuzzer_sys::fuzz_target;

/// Storage types with raw-bit access for building and comparing inputs.
trait Val: Element {
    fn raw(u: &mut Unstructured<'_>) -> Result<Self>;
    fn bits(self) -> u64;
}
impl Val for f32 {
    fn raw(u: &mut Unstructured<'_>) -> Result<Self> {
        Ok(f32::from_bits(u.arbitrary()?))
    }
    fn bits(self) -> u64 {
        self.to_bits() as u64
    }
}
impl Val for f16 {
    fn raw(u: &mut Unstructured<'_>) -> Result<Self> {
        Ok(f16::from_bits(u.arbitrary()?))
    }
    fn bits(self) -> u64 {
        self.to_bits() as u64
    }
}
impl Val for bf16 {
    fn raw(u: &mut Unstructured<'_>) -> Result<Self> {
        Ok(bf16::from_bits(u.arbitrary()?))
    }
    fn bits(self) -> u64 {
        self.to_bits() as u64
    }
}

const SPECIAL: [f32; 22] = [
    0.0,
    -0.0,
    1.0,
    -1.0,
    0.5,
    1e-7,
    1e-3,
    0.9,
    0.999,
    0.1,
    f32::INFINITY,
    f32::NEG_INFINITY,
    f32::NAN,
    f32::MIN_POSITIVE,
    1e-40,
    -1e-42,
    f32::MAX,
    65504.0,
    6e-8,
    3.4e38,
    1e30,
    -2.5,
];

/// A float with a bias towards interesting values.
fn fval(u: &mut Unstructured<'_>) -> Result<f32> {
    Ok(match u.int_in_range(0u8..=7)? {
        0 | 1 => f32::from_bits(u.arbitrary()?),
        2 => SPECIAL[u.choose_index(SPECIAL.len())?],
        _ => u.arbitrary::<i16>()? as f32 / 64.0,
    })
}

fn eval<T: Val>(u: &mut Unstructured<'_>) -> Result<T> {
    if u.ratio(1u8, 4u8)? {
        T::raw(u)
    } else {
        Ok(T::from_f32(fval(u)?))
    }
}

fn row<T: Val>(u: &mut Unstructured<'_>, n: usize) -> Result<Vec<T>> {
    (0..n).map(|_| eval::<T>(u)).collect()
}

fn same_f32(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

fn same_f64(a: f64, b: f64) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

fn same<T: Val>(a: &[T], b: &[T]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(&x, &y)| x.bits() == y.bits() || (x.to_f32().is_nan() && y.to_f32().is_nan()))
}

fn coeff(u: &mut Unstructured<'_>, usual: f32) -> Result<f32> {
    if u.ratio(3u8, 4u8)? {
        Ok(usual)
    } else {
        fval(u)
    }
}

fn coeffs(u: &mut Unstructured<'_>) -> Result<AdamCoeffs> {
    let lr_t = coeff(u, 1e-3)?;
    let beta1 = coeff(u, 0.9)?;
    let beta2 = coeff(u, 0.999)?;
    let epsilon = coeff(u, 1e-7)?;
    let mut c = AdamCoeffs::new(lr_t, beta1, beta2, epsilon);
    if u.ratio(1u8, 4u8)? {
        c.one_minus_beta1 = fval(u)?;
        c.one_minus_beta2 = fval(u)?;
    }
    if u.ratio(1u8, 3u8)? {
        c.weight_decay = fval(u)?;
    }
    if u.ratio(1u8, 3u8)? {
        c.m_pre_decay = fval(u)?;
        c.v_pre_decay = fval(u)?;
    }
    c.grad = GradTransform {
        scale: if u.ratio(1u8, 2u8)? { 1.0 } else { fval(u)? },
        clip: if u.ratio(1u8, 2u8)? {
            None
        } else {
            Some(fval(u)?)
        },
        negate: u.arbitrary()?,
    };
    if u.ratio(1u8, 3u8)? {
        c.rounding = Rounding::Stochastic {
            seed: u.arbitrary()?,
            offset: u.arbitrary()?,
        };
    }
    Ok(c)
}

/// The gradient transform exactly as the contract writes it.
fn transform(mut g: f32, t: &GradTransform) -> f32 {
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

/// The per-element Adam update of the numerics contract, written out plainly.
fn model_adam<P: Val, G: Val, M: Val>(
    c: &AdamCoeffs,
    param: &mut [P],
    m: &mut [M],
    v: &mut [M],
    mut vhat: Option<&mut [M]>,
    grad: &[G],
) {
    for i in 0..param.len() {
        let g = transform(grad[i].to_f32(), &c.grad);
        let mut m0 = m[i].to_f32();
        let mut v0 = v[i].to_f32();
        if c.m_pre_decay != 1.0 {
            m0 *= c.m_pre_decay;
        }
        if c.v_pre_decay != 1.0 {
            v0 *= c.v_pre_decay;
        }
        let m1 = c.beta1 * m0 + c.one_minus_beta1 * g;
        let v1 = c.beta2 * v0 + c.one_minus_beta2 * (g * g);
        let d = match vhat.as_deref_mut() {
            Some(vh) => {
                let vh0 = vh[i].to_f32();
                let vh1 = if vh0 >= v1 { vh0 } else { v1 };
                vh[i] = M::from_f32(vh1);
                vh1
            }
            None => v1,
        };
        let mut p0 = param[i].to_f32();
        if c.weight_decay != 0.0 {
            p0 -= c.weight_decay * p0;
        }
        let p1 = p0 - (c.lr_t * m1) / (d.sqrt() + c.epsilon);
        m[i] = M::from_f32(m1);
        v[i] = M::from_f32(v1);
        // Stochastic rounding is checked across paths only (its hash is the kernels' own); the
        // model covers round-to-nearest-even, and f32 parameters, which are exact either way.
        param[i] = P::from_f32(p1);
    }
}

fn model_sum_squares<G: Val>(src: &[G], t: &GradTransform) -> f64 {
    let mut acc = [0.0f64; 8];
    for (i, x) in src.iter().enumerate() {
        let x = transform(x.to_f32(), t) as f64;
        acc[i % 8] += x * x;
    }
    ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))
}

/// Inputs of one adam row (or a mismatched one).
struct AdamInput<P, G, M> {
    p: Vec<P>,
    m: Vec<M>,
    v: Vec<M>,
    vhat: Vec<M>,
    g: Vec<G>,
}

impl<P: Val, G: Val, M: Val> Clone for AdamInput<P, G, M> {
    fn clone(&self) -> Self {
        Self {
            p: self.p.clone(),
            m: self.m.clone(),
            v: self.v.clone(),
            vhat: self.vhat.clone(),
            g: self.g.clone(),
        }
    }
}

impl<P: Val, G: Val, M: Val> AdamInput<P, G, M> {
    fn same(&self, o: &Self) -> bool {
        same(&self.p, &o.p)
            && same(&self.m, &o.m)
            && same(&self.v, &o.v)
            && same(&self.vhat, &o.vhat)
    }
}

fn run<P: Val, G: Val, M: Val>(u: &mut Unstructured<'_>) -> Result<()> {
    let n = u.int_in_range(0usize..=200)?;
    let c = coeffs(u)?;
    // Optionally one slice of another length: every path must refuse and write nothing.
    let mismatch: Option<(u8, usize)> = if u.ratio(1u8, 10u8)? {
        Some((u.int_in_range(0u8..=4)?, u.int_in_range(0usize..=201)?))
    } else {
        None
    };
    let len_of = |which: u8| match mismatch {
        Some((w, l)) if w == which => l,
        _ => n,
    };
    let input = AdamInput::<P, G, M> {
        p: row(u, len_of(0))?,
        m: row(u, len_of(1))?,
        v: row(u, len_of(2))?,
        vhat: row(u, len_of(3))?,
        g: row(u, len_of(4))?,
    };
    let mismatched = mismatch.is_some_and(|(_, l)| l != n);
    let acc_init: Vec<f32> = (0..input.g.len()).map(|_| fval(u)).collect::<Result<_>>()?;
    let store_src: Vec<f32> = (0..n).map(|_| fval(u)).collect::<Result<_>>()?;
    let dst_len = if u.ratio(1u8, 10u8)? {
        u.int_in_range(0usize..=201)?
    } else {
        input.g.len()
    };

    let scalar = Kernels::new(Isa::Scalar).expect("the scalar path is always supported");
    assert_eq!(scalar.isa(), Isa::Scalar);

    // Reference results from the scalar path.
    let mut r_plain = input.clone();
    let e_plain = scalar.adam_row(
        &c,
        &mut r_plain.p,
        &mut r_plain.m,
        &mut r_plain.v,
        &r_plain.g,
    );
    let mut r_ams = input.clone();
    let e_ams = scalar.adam_row_amsgrad(
        &c,
        &mut r_ams.p,
        &mut r_ams.m,
        &mut r_ams.v,
        &mut r_ams.vhat,
        &r_ams.g,
    );
    let plain_mismatch = [input.p.len(), input.m.len(), input.v.len(), input.g.len()]
        .iter()
        .any(|&l| l != input.p.len());
    assert_eq!(e_plain.is_err(), plain_mismatch, "adam_row: {e_plain:?}");
    assert_eq!(e_ams.is_err(), mismatched, "adam_row_amsgrad: {e_ams:?}");
    if plain_mismatch {
        assert!(r_plain.same(&input), "adam_row wrote on a length mismatch");
    } else {
        let mut mdl = input.clone();
        model_adam(&c, &mut mdl.p, &mut mdl.m, &mut mdl.v, None, &mdl.g);
        let stochastic = matches!(c.rounding, Rounding::Stochastic { .. })
            && P::DTYPE != lazyadam_kernels::DType::F32;
        if stochastic {
            mdl.p = r_plain.p.clone();
        }
        assert!(
            r_plain.same(&mdl),
            "scalar adam_row differs from the contract's op order"
        );
    }
    if mismatched {
        assert!(
            r_ams.same(&input),
            "adam_row_amsgrad wrote on a length mismatch"
        );
    } else {
        let mut mdl = input.clone();
        model_adam(
            &c,
            &mut mdl.p,
            &mut mdl.m,
            &mut mdl.v,
            Some(&mut mdl.vhat),
            &mdl.g,
        );
        let stochastic = matches!(c.rounding, Rounding::Stochastic { .. })
            && P::DTYPE != lazyadam_kernels::DType::F32;
        if stochastic {
            mdl.p = r_ams.p.clone();
        }
        assert!(
            r_ams.same(&mdl),
            "scalar adam_row_amsgrad differs from the contract's op order"
        );
    }

    let mut r_load = vec![f32::NAN; dst_len];
    let e_load = scalar.load_row(&mut r_load, &input.g, &c.grad);
    let mut r_acc = acc_init.clone();
    r_acc.resize(dst_len, 0.25);
    let acc_start = r_acc.clone();
    let e_acc = scalar.accumulate_row(&mut r_acc, &input.g, &c.grad);
    assert_eq!(e_load.is_err(), dst_len != input.g.len());
    assert_eq!(e_acc.is_err(), dst_len != input.g.len());
    if dst_len == input.g.len() {
        for i in 0..dst_len {
            let t = transform(input.g[i].to_f32(), &c.grad);
            assert!(same_f32(r_load[i], t), "load_row[{i}]");
            assert!(same_f32(r_acc[i], acc_start[i] + t), "accumulate_row[{i}]");
        }
    } else {
        assert!(
            r_load.iter().all(|x| x.is_nan()),
            "load_row wrote on a mismatch"
        );
        assert!(
            same(&r_acc, &acc_start),
            "accumulate_row wrote on a mismatch"
        );
    }
    let r_ss = scalar.sum_squares(&input.g, &c.grad);
    let m_ss = model_sum_squares(&input.g, &c.grad);
    assert!(same_f64(r_ss, m_ss), "sum_squares {r_ss} vs model {m_ss}");
    // The exact sum of squares: the scalar path equals adding the transformed values one by
    // one; a split into two pieces summed separately and merged in either order, or
    // accumulated into a running sum, gives the same value; the bytes round-trip.
    let r_ex = scalar.sum_squares_exact(&input.g, &c.grad);
    let mut m_ex = SquareSum::new();
    for x in &input.g {
        m_ex.add(transform(x.to_f32(), &c.grad));
    }
    assert_eq!(r_ex, m_ex, "sum_squares_exact vs adding one by one");
    let cut = u.int_in_range(0..=input.g.len())?;
    let (ga, gb) = input.g.split_at(cut);
    let check_split = |k: &Kernels| {
        let (a, b) = (
            k.sum_squares_exact(ga, &c.grad),
            k.sum_squares_exact(gb, &c.grad),
        );
        let (mut ab, mut ba) = (a, b);
        ab.merge(&b);
        ba.merge(&a);
        assert!(
            ab == r_ex && ba == r_ex,
            "{:?} split sum_squares_exact",
            k.isa()
        );
        let mut run = b;
        k.accumulate_squares(&mut run, ga, &c.grad);
        assert_eq!(run, r_ex, "{:?} accumulate_squares", k.isa());
    };
    check_split(&scalar);
    assert_eq!(SquareSum::from_bytes(&r_ex.to_bytes()), Some(r_ex));
    let ex = r_ex.to_f64();
    let all_finite = input
        .g
        .iter()
        .all(|x| transform(x.to_f32(), &c.grad).is_finite());
    assert_eq!(r_ex.is_finite(), all_finite);
    assert!(ex >= 0.0 || ex.is_nan());
    if all_finite {
        // A correctly rounded sum of non-negative terms is within the f64 sum's error bound.
        let bound = m_ss * (input.g.len() as f64 * f64::EPSILON);
        assert!((ex - m_ss).abs() <= bound, "exact {ex} vs f64 {m_ss}");
    }
    // Arbitrary bytes: never a panic; what loads saves back to the same bytes.
    let raw: Vec<u8> = (0..u.int_in_range(0usize..=90)?)
        .map(|_| u.arbitrary::<u8>())
        .collect::<Result<_>>()?;
    if let Some(s) = SquareSum::from_bytes(&raw) {
        assert_eq!(&s.to_bytes()[..], &raw[..]);
        let _ = s.to_f64();
    }
    let r_fin = scalar.all_finite(&input.g);
    assert_eq!(r_fin, input.g.iter().all(|x| x.to_f32().is_finite()));
    let r_max = scalar.max_abs(&input.g);
    let want_max = if input.g.iter().any(|x| x.to_f32().is_nan()) {
        f32::NAN
    } else {
        input.g.iter().fold(0.0f32, |m, x| m.max(x.to_f32().abs()))
    };
    assert!(same_f32(r_max, want_max), "max_abs {r_max} vs {want_max}");
    // The squares and the raw largest magnitude from one pass: the two calls' results, whole
    // and over the split (the larger of the pieces' magnitudes).
    let check_fused = |k: &Kernels| {
        let mut f = SquareSum::new();
        let m = k.accumulate_squares_max_abs(&mut f, &input.g, &c.grad);
        assert_eq!(f, r_ex, "{:?} accumulate_squares_max_abs squares", k.isa());
        assert!(
            m.to_bits() == r_max.to_bits(),
            "{:?} accumulate_squares_max_abs {m}",
            k.isa()
        );
        let mut f = SquareSum::new();
        let mb = k.accumulate_squares_max_abs(&mut f, gb, &c.grad);
        let ma = k.accumulate_squares_max_abs(&mut f, ga, &c.grad);
        assert_eq!(f, r_ex, "{:?} split accumulate_squares_max_abs", k.isa());
        let m = if ma.is_nan() || mb.is_nan() {
            f32::NAN
        } else {
            ma.max(mb)
        };
        assert!(same_f32(m, r_max), "{:?} split max {m}", k.isa());
        let (ss, m) = k.sum_squares_max_abs(&input.g, &c.grad);
        assert!(
            same_f64(ss, r_ss),
            "{:?} sum_squares_max_abs {ss} vs {r_ss}",
            k.isa()
        );
        // The same bits, NaN payloads included (widening reorders f16 NaNs).
        assert_eq!(
            m.to_bits(),
            r_max.to_bits(),
            "{:?} sum_squares_max_abs",
            k.isa()
        );
    };
    check_fused(&scalar);
    let store_len = if mismatched { input.p.len() } else { n };
    let mut r_store = vec![P::from_f32(7.0); store_len];
    let e_store = scalar.store_row(&mut r_store, &store_src, c.rounding);
    assert_eq!(e_store.is_err(), store_len != store_src.len());
    if e_store.is_ok()
        && (P::DTYPE == lazyadam_kernels::DType::F32 || c.rounding == Rounding::NearestEven)
    {
        let want: Vec<P> = store_src.iter().map(|&x| P::from_f32(x)).collect();
        assert!(same(&r_store, &want), "store_row");
    }

    // Every other supported path: the scalar path's bits.
    for isa in Isa::supported().filter(|&i| i != Isa::Scalar) {
        let k = Kernels::new(isa).expect("supported() lists it");
        assert_eq!(k.isa(), isa);
        let mut x = input.clone();
        let e = k.adam_row(&c, &mut x.p, &mut x.m, &mut x.v, &x.g);
        assert_eq!(e, e_plain, "{isa:?} adam_row result");
        assert!(x.same(&r_plain), "{isa:?} adam_row differs from scalar");
        let mut x = input.clone();
        let e = k.adam_row_amsgrad(&c, &mut x.p, &mut x.m, &mut x.v, &mut x.vhat, &x.g);
        assert_eq!(e, e_ams, "{isa:?} adam_row_amsgrad result");
        assert!(
            x.same(&r_ams),
            "{isa:?} adam_row_amsgrad differs from scalar"
        );

        let mut d = vec![f32::NAN; dst_len];
        assert_eq!(k.load_row(&mut d, &input.g, &c.grad), e_load);
        assert!(same(&d, &r_load), "{isa:?} load_row");
        let mut d = acc_start.clone();
        assert_eq!(k.accumulate_row(&mut d, &input.g, &c.grad), e_acc);
        assert!(same(&d, &r_acc), "{isa:?} accumulate_row");
        let ss = k.sum_squares(&input.g, &c.grad);
        assert!(same_f64(ss, r_ss), "{isa:?} sum_squares {ss} vs {r_ss}");
        assert_eq!(
            k.sum_squares_exact(&input.g, &c.grad),
            r_ex,
            "{isa:?} sum_squares_exact"
        );
        check_split(&k);
        assert_eq!(k.all_finite(&input.g), r_fin, "{isa:?} all_finite");
        assert_eq!(
            k.max_abs(&input.g).to_bits(),
            r_max.to_bits(),
            "{isa:?} max_abs"
        );
        check_fused(&k);
        let mut d = vec![P::from_f32(7.0); store_len];
        assert_eq!(k.store_row(&mut d, &store_src, c.rounding), e_store);
        assert!(same(&d, &r_store), "{isa:?} store_row");
    }
    if !plain_mismatch && n > 0 {
        batched(u, &c, &input)?;
    }
    Ok(())
}

/// The batched entry points on a table made of the input rows: `adam_rows` on every path
/// gives the bits of the scalar `adam_row` applied row by row (rounding offset advanced to the
/// row's place), `accumulate_rows` those of `accumulate_row` per slot, `sum_rows_at` those of
/// `load_row` then `accumulate_row` per picked gradient row; an out-of-range row, slot or
/// position is an error that writes nothing.
fn batched<P: Val, G: Val, M: Val>(
    u: &mut Unstructured<'_>,
    c: &AdamCoeffs,
    input: &AdamInput<P, G, M>,
) -> Result<()> {
    let n = input.p.len();
    let rl = u.int_in_range(1usize..=n.min(24))?;
    let rows = n / rl;
    let count = u.int_in_range(0usize..=12)?;
    let ids: Vec<usize> = (0..count)
        .map(|_| {
            if u.ratio(1u8, 16u8)? {
                Ok(rows + u.int_in_range(0usize..=3)?)
            } else {
                u.int_in_range(0..=rows - 1)
            }
        })
        .collect::<Result<_>>()?;
    let bad = ids.iter().any(|&r| r >= rows);
    let grads: Vec<G> = row(u, count * rl)?;
    let t = rows * rl;
    let (p0, m0, v0) = (
        input.p[..t].to_vec(),
        input.m[..t].to_vec(),
        input.v[..t].to_vec(),
    );
    let scalar = Kernels::new(Isa::Scalar).expect("always supported");
    let (mut rp, mut rm, mut rv) = (p0.clone(), m0.clone(), v0.clone());
    if !bad {
        for (j, &r) in ids.iter().enumerate() {
            let mut cr = *c;
            if let Rounding::Stochastic { seed, offset } = c.rounding {
                cr.rounding = Rounding::Stochastic {
                    seed,
                    offset: offset.wrapping_add((r * rl) as u64),
                };
            }
            let range = r * rl..(r + 1) * rl;
            scalar
                .adam_row(
                    &cr,
                    &mut rp[range.clone()],
                    &mut rm[range.clone()],
                    &mut rv[range],
                    &grads[j * rl..(j + 1) * rl],
                )
                .expect("equal lengths");
        }
    }
    for isa in Isa::supported() {
        let k = Kernels::new(isa).expect("supported() lists it");
        let (mut xp, mut xm, mut xv) = (p0.clone(), m0.clone(), v0.clone());
        let e = k.adam_rows(c, &mut xp, &mut xm, &mut xv, rl, &ids, &grads);
        assert_eq!(e.is_err(), bad, "{isa:?} adam_rows: {e:?}");
        assert!(
            same(&xp, &rp) && same(&xm, &rm) && same(&xv, &rv),
            "{isa:?} adam_rows differs from the row-by-row scalar reference (or wrote on error)"
        );
    }
    // Slots into `acc_rows` accumulator rows; slot `acc_rows` is out of range.
    let acc_rows = u.int_in_range(1usize..=4)?;
    let slots: Vec<u32> = ids.iter().map(|&r| (r % (acc_rows + 1)) as u32).collect();
    let bad = slots.iter().any(|&s| s as usize >= acc_rows);
    let acc0: Vec<f32> = (0..acc_rows * rl).map(|_| fval(u)).collect::<Result<_>>()?;
    let mut want = acc0.clone();
    if !bad {
        for (j, &s) in slots.iter().enumerate() {
            let s = s as usize;
            scalar
                .accumulate_row(
                    &mut want[s * rl..(s + 1) * rl],
                    &grads[j * rl..(j + 1) * rl],
                    &c.grad,
                )
                .expect("equal lengths");
        }
    }
    for isa in Isa::supported() {
        let k = Kernels::new(isa).expect("supported() lists it");
        let mut got = acc0.clone();
        let e = k.accumulate_rows(&mut got, rl, &slots, &grads, &c.grad);
        assert_eq!(e.is_err(), bad, "{isa:?} accumulate_rows: {e:?}");
        assert!(same(&got, &want), "{isa:?} accumulate_rows");
    }
    // Positions into the `count` gradient rows; position `count` and beyond are out of range.
    let picks = u.int_in_range(0usize..=6)?;
    let positions: Vec<usize> = (0..picks)
        .map(|_| u.int_in_range(0..=count + 1))
        .collect::<Result<_>>()?;
    let bad = positions.iter().any(|&p| p >= count);
    let dst0: Vec<f32> = (0..rl).map(|_| fval(u)).collect::<Result<_>>()?;
    let mut want = dst0.clone();
    if !bad {
        for (j, &p) in positions.iter().enumerate() {
            let g = &grads[p * rl..(p + 1) * rl];
            let r = if j == 0 {
                scalar.load_row(&mut want, g, &c.grad)
            } else {
                scalar.accumulate_row(&mut want, g, &c.grad)
            };
            r.expect("equal lengths");
        }
    }
    for isa in Isa::supported() {
        let k = Kernels::new(isa).expect("supported() lists it");
        let mut got = dst0.clone();
        let e = k.sum_rows_at(&mut got, &grads, &positions, &c.grad);
        assert_eq!(e.is_err(), bad, "{isa:?} sum_rows_at: {e:?}");
        assert!(same(&got, &want), "{isa:?} sum_rows_at");
    }
    Ok(())
}

fn pick(u: &mut Unstructured<'_>) -> Result<u8> {
    u.int_in_range(0u8..=2)
}

macro_rules! dispatch_m {
    ($u:expr, $p:ty, $g:ty) => {
        match pick($u)? {
            0 => run::<$p, $g, f32>($u),
            1 => run::<$p, $g, f16>($u),
            _ => run::<$p, $g, bf16>($u),
        }
    };
}
macro_rules! dispatch_g {
    ($u:expr, $p:ty) => {
        match pick($u)? {
            0 => dispatch_m!($u, $p, f32),
            1 => dispatch_m!($u, $p, f16),
            _ => dispatch_m!($u, $p, bf16),
        }
    };
}

fn top(u: &mut Unstructured<'_>) -> Result<()> {
    for isa in Isa::ALL {
        assert_eq!(Kernels::new(isa).is_ok(), isa.is_supported());
    }
    match pick(u)? {
        0 => dispatch_g!(u, f32),
        1 => dispatch_g!(u, f16),
        _ => dispatch_g!(u, bf16),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let _ = top(&mut u);
});
