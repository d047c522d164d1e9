//! An optimizer with arbitrary variables, hyperparameters and a sequence of arbitrary steps (ids
//! in and out of range, duplicates, empty steps, NaN/inf values, wrong lengths and dtypes,
//! unknown and repeated variables). It must never panic; a step that errors (or is skipped) must
//! leave every byte of state as it was; a step that succeeds must match the plain scalar model of
//! the reference semantics written below (per-step learning rate, clipvalue -> clipnorm ->
//! global_clipnorm, duplicate rows summed in first-occurrence order, Adam on the distinct rows
//! only, dense gradients on every element, AMSGrad on dense gradients only).
//!
//! A quarter of the inputs (first byte = 3 mod 4) take the hostile mode instead ([`hostile`]):
//! zero-width and zero-row variables, every schedule kind with arbitrary (often invalid)
//! parameters and custom schedules that turn NaN, negative or infinite, every extension, loss
//! scaling down to its floor, step counters near the maximum, and handles from a second
//! optimizer; it checks the all-or-nothing rule (an error or a skip changes no byte; no error is
//! a kernel error) and that an applied step with finite, moderate inputs and a valid rate leaves
//! finite parameters.
//!
//! Where the model performs the library's own f32 operations in the same order (no norm clipping)
//! the gradients agree to the bit and the rest within a forward error bound tracked per element;
//! elements whose bound stops being meaningful (heavy cancellation under a rounded clip factor)
//! are no longer compared, which the bound makes explicit rather than loosening every compare.
#![no_main]
#![allow(clippy::needless_range_loop)]

use arbitrary::{Result, Unstructured};
use lazyadam::{
    BiasCorrection, CustomSchedule, DType, DynamicLossScale, Extensions, Gradient, LazyAdam,
    LazyAdamConfig, LearningRate, LearningRateSchedule, NonFinitePolicy, RowIds, Schedule,
    StepOutcome, TensorMut, TensorRef, Update, VarId, WeightTensor, bf16, f16,
};
use libfuzzer_sys::fuzz_target;

mod common;
use common::{Store, choose, same_stores, same_weights};

const ULP: f64 = 1.2e-7; // 2^-23, a little rounded up

fn tensor_bits(t: &TensorRef<'_>) -> Vec<u32> {
    match t {
        TensorRef::F32(v) => v.iter().map(|x| x.to_bits()).collect(),
        TensorRef::F16(v) => v.iter().map(|x| x.to_bits() as u32).collect(),
        TensorRef::BF16(v) => v.iter().map(|x| x.to_bits() as u32).collect(),
    }
}

fn tensor_f32(t: &TensorRef<'_>) -> Vec<f32> {
    match t {
        TensorRef::F32(v) => v.to_vec(),
        TensorRef::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
        TensorRef::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
    }
}

/// Every byte of the optimizer's observable state (step counter, learning rate, loss scale,
/// weights), plus the caller's parameters. Kept as the values themselves and compared by their
/// bits in place (NaN equals the same NaN, `-0.0` differs from `0.0`), not widened to bit
/// vectors first.
#[derive(Debug)]
struct Snapshot {
    iterations: u64,
    lr_bits: u32,
    loss_scale: Option<u32>,
    weights: Vec<WeightTensor>,
    params: Vec<Store>,
}

impl PartialEq for Snapshot {
    fn eq(&self, other: &Self) -> bool {
        self.iterations == other.iterations
            && self.lr_bits == other.lr_bits
            && self.loss_scale == other.loss_scale
            && same_weights(&self.weights, &other.weights)
            && same_stores(&self.params, &other.params)
    }
}

fn snapshot(opt: &LazyAdam, params: &[Store]) -> Snapshot {
    Snapshot {
        iterations: opt.iterations(),
        lr_bits: opt.learning_rate().to_bits(),
        loss_scale: opt.loss_scale().map(f32::to_bits),
        weights: opt.get_weights(),
        params: params.to_vec(),
    }
}

/// A variable's parameters and slots as bits (an empty vector: no such slot yet).
type RowState = (Vec<u32>, Vec<u32>, Vec<u32>, Vec<u32>);

fn row_state(opt: &LazyAdam, id: VarId, param: &Store) -> RowState {
    match opt.slots(id) {
        Some(s) => (
            param.bits(),
            tensor_bits(&s.m),
            tensor_bits(&s.v),
            s.vhat.as_ref().map(tensor_bits).unwrap_or_default(),
        ),
        None => (param.bits(), Vec::new(), Vec::new(), Vec::new()),
    }
}

/// A gradient value: mostly small dyadic numbers (exact sums), sometimes anything.
fn gval(u: &mut Unstructured<'_>) -> Result<f32> {
    Ok(match u.int_in_range(0u8..=15)? {
        0 => f32::from_bits(u.arbitrary()?),
        1 => [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e30,
            -3e38,
            1e-40,
            0.0,
            -0.0,
        ][u.choose_index(8)?],
        2 => u.arbitrary::<i16>()? as f32 * 1e-6,
        _ => u.int_in_range(-64i8..=64)? as f32 / 16.0,
    })
}

/// One gradient's ids in each id type.
type IdBufs = (Vec<u32>, Vec<u64>, Vec<usize>, Vec<i32>, Vec<i64>);

/// Per-element model state with forward error bounds (absolute) and a "still comparable" flag.
#[derive(Clone, Debug)]
struct Elem {
    p: f32,
    m: f32,
    v: f32,
    vhat: f32,
    ep: f64,
    em: f64,
    ev: f64,
    evh: f64,
    live: bool,
}

#[derive(Clone, Debug)]
struct ModelVar {
    rows: usize,
    row_len: usize,
    dtype: DType,
    /// Compared against the library (f32 parameters and moments only).
    tracked: bool,
    elems: Vec<Elem>,
}

/// The hyperparameters as the model sees them.
#[derive(Clone, Debug)]
struct Hyper {
    lr: f32,
    beta_1: f32,
    beta_2: f32,
    epsilon: f32,
    decay: f32,
    amsgrad: bool,
    clipnorm: Option<f32>,
    clipvalue: Option<f32>,
    global_clipnorm: Option<f32>,
}

/// One gradient of a step as generated (before it is handed to the library).
#[derive(Clone, Debug)]
struct GradSpec {
    /// Index into the variables; `nvars` means "a variable this optimizer does not have".
    var: usize,
    /// `None`: dense.
    ids: Option<Vec<i64>>,
    id_type: u8,
    /// The ids as the library sees them after the conversion to the id type.
    eff: Vec<i128>,
    values: Vec<f32>,
    grad_dtype: DType,
    /// Parameter tensor: 0 = the variable's own, 1 = one element short, 2 = other dtype.
    param_kind: u8,
}

fn within(a: f32, b: f32, err: f64) -> bool {
    if a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()) {
        return true;
    }
    if !a.is_finite() || !b.is_finite() {
        return false;
    }
    ((a as f64) - (b as f64)).abs() <= 4.0 * err + 1e-37
}

fn gen_spec(u: &mut Unstructured<'_>, vars: &[ModelVar]) -> Result<GradSpec> {
    let nvars = vars.len();
    let var = if u.ratio(1u8, 20u8)? {
        nvars
    } else {
        u.choose_index(nvars)?
    };
    let (rows, row_len, dtype) = match vars.get(var) {
        Some(v) => (v.rows, v.row_len, v.dtype),
        None => (2, 2, DType::F32),
    };
    let sparse = u.ratio(3u8, 4u8)?;
    let ids = if sparse {
        let n = u.int_in_range(0usize..=8)?;
        let mut ids = Vec::with_capacity(n);
        for _ in 0..n {
            ids.push(match u.int_in_range(0u8..=40)? {
                0 => rows as i64,
                1 => -1,
                2 => u.arbitrary::<i64>()?,
                _ => u.int_in_range(0..=rows as i64 - 1)?,
            });
        }
        Some(ids)
    } else {
        None
    };
    let mut n_values = match &ids {
        Some(ids) => ids.len() * row_len,
        None => rows * row_len,
    };
    if u.ratio(1u8, 30u8)? {
        n_values = u.int_in_range(0usize..=n_values + 2)?;
    }
    let values = (0..n_values).map(|_| gval(u)).collect::<Result<Vec<_>>>()?;
    let grad_dtype = if u.ratio(1u8, 30u8)? {
        choose(u, &[DType::F32, DType::F16, DType::BF16])?
    } else {
        dtype
    };
    let param_kind = match u.int_in_range(0u8..=60)? {
        0 => 1,
        1 => 2,
        _ => 0,
    };
    let id_type = u.int_in_range(0u8..=4)?;
    let eff = ids
        .iter()
        .flatten()
        .map(|&i| match id_type {
            0 => (i as u32) as i128,
            1 => (i as u64) as i128,
            2 => (i as usize) as i128,
            3 => (i as i32) as i128,
            _ => i as i128,
        })
        .collect();
    Ok(GradSpec {
        var,
        ids,
        id_type,
        eff,
        values,
        grad_dtype,
        param_kind,
    })
}

/// What the model expects of a step.
#[derive(Debug, PartialEq)]
enum Expect {
    Err,
    Ok,
    Either,
}

fn clip_value(x: f32, c: f32) -> f32 {
    if x > c {
        c
    } else if x < -c {
        -c
    } else {
        x
    }
}

/// Applies one step of the reference semantics to the model. Returns false when the step
/// cannot be modelled reliably (the caller then stops comparing).
fn model_step(h: &Hyper, iterations: u64, vars: &mut [ModelVar], specs: &[GradSpec]) -> bool {
    // Learning rate (constant, legacy decay in f32 as the reference), bias correction in f64.
    let lr = if h.decay > 0.0 {
        h.lr / (1.0 + h.decay * iterations as f32)
    } else {
        h.lr
    };
    let t = (iterations + 1) as i32;
    let b1t = (h.beta_1 as f64).powi(t);
    let b2t = (h.beta_2 as f64).powi(t);
    let lr_t = (lr as f64 * (1.0 - b2t).sqrt() / (1.0 - b1t)) as f32;
    // The library may compute the powers and the quotient in f32: bound that.
    let rel_lr = 1e-6 + 4.0 * ULP * t as f64 * (1.0 / (1.0 - b2t) + 1.0 / (1.0 - b1t));
    if !lr_t.is_finite() || !rel_lr.is_finite() {
        return false;
    }
    let one_m_b1 = 1.0f32 - h.beta_1;
    let one_m_b2 = 1.0f32 - h.beta_2;

    // Clipping on the values as given: clipvalue, clipnorm per gradient, global_clipnorm.
    let mut vals: Vec<Vec<f32>> = specs
        .iter()
        .map(|s| {
            s.values
                .iter()
                .map(|&x| {
                    let x = round_to(s.grad_dtype, x);
                    match h.clipvalue {
                        Some(c) => clip_value(x, c),
                        None => x,
                    }
                })
                .collect()
        })
        .collect();
    let mut factors = vec![1.0f64; specs.len()];
    let any_non_finite = vals.iter().flatten().any(|x| !x.is_finite());
    if let Some(c) = h.clipnorm {
        for (i, v) in vals.iter().enumerate() {
            let n = v
                .iter()
                .map(|&x| (x as f64) * (x as f64))
                .sum::<f64>()
                .sqrt();
            factors[i] = c as f64 / n.max(c as f64);
        }
    }
    if let Some(c) = h.global_clipnorm {
        let n = vals
            .iter()
            .zip(&factors)
            .map(|(v, f)| v.iter().map(|&x| (x as f64 * f).powi(2)).sum::<f64>())
            .sum::<f64>()
            .sqrt();
        let gf = c as f64 / n.max(c as f64);
        for f in &mut factors {
            *f *= gf;
        }
    }
    let scaled = h.clipnorm.is_some() || h.global_clipnorm.is_some();
    if scaled && any_non_finite {
        return false; // NaN/inf inside a norm: the reference's handling is not modelled.
    }
    // The library applies the clip factor(s) as one f32 scale: below 2^-126 that scale is
    // subnormal and carries an absolute rounding error of 2^-150.
    let rel_fs: Vec<f64> = factors
        .iter()
        .map(|&f| if scaled { 1e-6 + 1.5e-45 / f } else { 0.0 })
        .collect();
    for (v, f) in vals.iter_mut().zip(&factors) {
        if *f != 1.0 {
            for x in v.iter_mut() {
                *x = (*x as f64 * f) as f32;
            }
        }
    }

    for ((s, v), &rel_f) in specs.iter().zip(&vals).zip(&rel_fs) {
        let var = &mut vars[s.var];
        let rl = var.row_len;
        // Rows and their gradient (summed in first-occurrence order), with an error bound.
        let mut rows: Vec<(usize, Vec<f32>, Vec<f64>, bool)> = Vec::new();
        match &s.ids {
            None => {
                for r in 0..var.rows {
                    let g = v[r * rl..(r + 1) * rl].to_vec();
                    let e = g.iter().map(|&x| x.abs() as f64 * rel_f).collect();
                    rows.push((r, g, e, true));
                }
            }
            Some(ids) => {
                let mut pos: Vec<Option<usize>> = vec![None; var.rows];
                let mut abs_sum: Vec<Vec<f64>> = Vec::new();
                for (k, _) in ids.iter().enumerate() {
                    let r = s.eff[k] as usize;
                    let src = &v[k * rl..(k + 1) * rl];
                    match pos[r] {
                        None => {
                            pos[r] = Some(rows.len());
                            rows.push((r, src.to_vec(), vec![0.0; rl], false));
                            abs_sum.push(src.iter().map(|&x| x.abs() as f64).collect());
                        }
                        Some(j) => {
                            for (i, &x) in src.iter().enumerate() {
                                rows[j].1[i] += x;
                                abs_sum[j][i] += x.abs() as f64;
                            }
                            rows[j].3 = true; // marks "has duplicates" for sparse rows
                        }
                    }
                }
                for (j, row) in rows.iter_mut().enumerate() {
                    let dup = row.3;
                    for i in 0..rl {
                        // Same ops in the same order: exact unless a rounded clip factor.
                        row.2[i] = if rel_f == 0.0 {
                            0.0
                        } else {
                            abs_sum[j][i] * (rel_f + if dup { 8.0 * ULP } else { 0.0 })
                        };
                    }
                    row.3 = false;
                }
            }
        }
        let dense = s.ids.is_none();
        let use_vhat = h.amsgrad && dense;
        for (r, g, eg, _) in rows {
            for i in 0..rl {
                let el = &mut var.elems[r * rl + i];
                let g_i = g[i];
                let eg_i = eg[i];
                let (m0, v0, p0) = (el.m, el.v, el.p);
                let m1 = h.beta_1 * m0 + one_m_b1 * g_i;
                let v1 = h.beta_2 * v0 + one_m_b2 * (g_i * g_i);
                let (d, ed) = if use_vhat {
                    let vh1 = if el.vhat >= v1 { el.vhat } else { v1 };
                    let e = el.evh.max(el.ev);
                    (vh1, e)
                } else {
                    (v1, 0.0)
                };
                let p1 = p0 - (lr_t * m1) / (d.sqrt() + h.epsilon);
                // Forward error bounds.
                let tm = (h.beta_1 * m0).abs() as f64 + (one_m_b1 * g_i).abs() as f64;
                let em1 = h.beta_1 as f64 * el.em + one_m_b1 as f64 * eg_i + 2.0 * ULP * tm;
                let gg = (g_i as f64) * (g_i as f64);
                let ev1 = h.beta_2 as f64 * el.ev
                    + one_m_b2 as f64 * (2.0 * g_i.abs() as f64 * eg_i + eg_i * eg_i)
                    + 3.0 * ULP * (h.beta_2 as f64 * v0 as f64 + one_m_b2 as f64 * gg)
                    + 1e-44;
                let ed = if use_vhat { ed.max(ev1) } else { ev1 };
                let s_ = (d as f64).sqrt();
                let es = if s_ > 0.0 {
                    (ed / (2.0 * s_)).min(ed.sqrt())
                } else {
                    ed.sqrt()
                };
                let den = s_ + h.epsilon as f64;
                let u_ = (lr_t as f64 * m1 as f64 / den).abs();
                let mut live = el.live;
                let eu = if den > 0.0 && es < 0.25 * den {
                    lr_t as f64 * (em1 + m1.abs() as f64 * (rel_lr + 4.0 * ULP)) / den
                        + 2.0 * u_ * es / den
                        + u_ * rel_lr
                } else {
                    live = false;
                    f64::INFINITY
                };
                let ep1 = el.ep + eu + ULP * (p0.abs() as f64 + u_ + p1.abs() as f64);
                let huge = [m1, v1, p1, d].iter().any(|x| x.abs() > 1e36);
                if huge || !ep1.is_finite() {
                    live = false;
                }
                el.m = m1;
                el.v = v1;
                if use_vhat {
                    el.vhat = d;
                    el.evh = ed;
                }
                el.p = p1;
                el.em = em1;
                el.ev = ev1;
                el.ep = ep1;
                el.live = live;
            }
        }
    }
    true
}

fn round_to(d: DType, x: f32) -> f32 {
    match d {
        DType::F32 => x,
        DType::F16 => f16::from_f32(x).to_f32(),
        DType::BF16 => bf16::from_f32(x).to_f32(),
    }
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let h = Hyper {
        lr: choose(u, &[1e-3, 0.1, 1.0, 1e-6, 0.0, 0.5])?,
        beta_1: choose(u, &[0.9, 0.0, 0.5, 0.99, 0.3])?,
        beta_2: choose(u, &[0.999, 0.9, 0.0, 0.5, 0.99999])?,
        epsilon: choose(u, &[1e-7, 1e-3, 1.0, 1e-30])?,
        decay: if u.ratio(1u8, 5u8)? {
            choose(u, &[0.01, 0.5, 3.0])?
        } else {
            0.0
        },
        amsgrad: u.ratio(1u8, 4u8)?,
        clipnorm: None,
        clipvalue: if u.ratio(1u8, 4u8)? {
            Some(choose(u, &[0.5, 1.0, 0.0, 100.0])?)
        } else {
            None
        },
        global_clipnorm: None,
    };
    let mut h = h;
    match u.int_in_range(0u8..=5)? {
        0 => h.clipnorm = Some(choose(u, &[0.5, 1.0, 2.0, 1e-3])?),
        1 => h.global_clipnorm = Some(choose(u, &[0.5, 1.0, 2.0, 1e-3])?),
        _ => {}
    }
    let config = LazyAdamConfig {
        learning_rate: LearningRate::Constant(h.lr),
        beta_1: h.beta_1,
        beta_2: h.beta_2,
        epsilon: h.epsilon,
        amsgrad: h.amsgrad,
        decay: h.decay,
        clipnorm: h.clipnorm,
        clipvalue: h.clipvalue,
        global_clipnorm: h.global_clipnorm,
        ..LazyAdamConfig::default()
    };
    let ext = common::policy_and_kernel(u, 3, &[0usize, 1, 7, 32_768])?;
    let policy = ext.non_finite.clone();
    let mut opt = LazyAdam::with_extensions(config, ext).expect("a valid configuration");

    // Variables.
    let nvars = u.int_in_range(1usize..=3)?;
    let mixed = u.ratio(1u8, 5u8)?;
    let mut vars = Vec::new();
    let mut params = Vec::new();
    let mut ids: Vec<VarId> = Vec::new();
    for k in 0..nvars {
        let rows = u.int_in_range(1usize..=6)?;
        let row_len = u.int_in_range(1usize..=4)?;
        let shape: Vec<usize> = match u.int_in_range(0u8..=3)? {
            0 if row_len == 1 => vec![rows],
            1 if row_len % 2 == 0 => vec![rows, 2, row_len / 2],
            _ => vec![rows, row_len],
        };
        let (dtype, moment) = if mixed {
            (
                choose(u, &[DType::F32, DType::F16, DType::BF16])?,
                choose(u, &[DType::F32, DType::F16, DType::BF16])?,
            )
        } else {
            (DType::F32, DType::F32)
        };
        let init: Vec<f32> = (0..rows * row_len)
            .map(|_| gval(u))
            .collect::<Result<_>>()?;
        let init: Vec<f32> = init
            .into_iter()
            .map(|x| if x.is_finite() { x } else { 0.25 })
            .collect();
        let id = opt
            .add_variable(&format!("var{k}"), &shape, dtype, moment)
            .expect("a valid variable");
        let info = opt.variable(id).expect("just added").clone();
        assert_eq!(info.shape, shape);
        assert_eq!(info.param_dtype, dtype);
        let store = Store::from_f32(dtype, &init);
        let f = store.f32s();
        vars.push(ModelVar {
            rows,
            row_len,
            dtype,
            tracked: dtype == DType::F32 && moment == DType::F32,
            elems: f
                .iter()
                .map(|&p| Elem {
                    p,
                    m: 0.0,
                    v: 0.0,
                    vhat: 0.0,
                    ep: 0.0,
                    em: 0.0,
                    ev: 0.0,
                    evh: 0.0,
                    live: true,
                })
                .collect(),
        });
        params.push(store);
        ids.push(id);
    }
    assert!(
        opt.add_variable("var0", &[1], DType::F32, DType::F32)
            .is_err(),
        "duplicate name"
    );
    // An id this optimizer does not know: the 5th variable of another optimizer.
    let unknown = {
        let mut other = LazyAdam::new(LazyAdamConfig::default()).expect("default config");
        let mut last = None;
        for k in 0..5 {
            last = Some(
                other
                    .add_variable(&format!("o{k}"), &[1], DType::F32, DType::F32)
                    .expect("ok"),
            );
        }
        last.expect("added")
    };
    let mut model_ok = true;
    let mut history: Vec<Vec<GradSpec>> = Vec::new();

    let nsteps = u.int_in_range(0usize..=6)?;
    for _ in 0..nsteps {
        let nupd = u.int_in_range(0usize..=4)?;
        let specs = (0..nupd)
            .map(|_| gen_spec(u, &vars))
            .collect::<Result<Vec<_>>>()?;

        // Expected outcome.
        let mut expect = Expect::Ok;
        let mut seen = vec![false; nvars];
        let mut raw_non_finite = false;
        let mut big = false;
        for s in &specs {
            let Some(var) = vars.get(s.var) else {
                expect = Expect::Err;
                continue;
            };
            if seen[s.var] || s.param_kind != 0 {
                expect = Expect::Err;
            }
            seen[s.var] = true;
            let want = match &s.ids {
                Some(ids) => {
                    if s.eff.iter().any(|&i| i < 0 || i >= var.rows as i128) {
                        expect = Expect::Err;
                    }
                    ids.len() * var.row_len
                }
                None => var.rows * var.row_len,
            };
            if s.values.len() != want {
                expect = Expect::Err;
            }
            if s.values
                .iter()
                .any(|x| !round_to(s.grad_dtype, *x).is_finite())
            {
                raw_non_finite = true;
            }
            if s.values.iter().any(|x| x.is_finite() && x.abs() > 1e18) {
                big = true;
            }
        }
        let grad_dtype_odd = specs
            .iter()
            .any(|s| vars.get(s.var).is_some_and(|v| v.dtype != s.grad_dtype));
        if expect == Expect::Ok && grad_dtype_odd {
            expect = Expect::Either;
        }
        if expect == Expect::Ok && specs.is_empty() {
            expect = Expect::Either;
        }
        let skip_expected = matches!(policy, NonFinitePolicy::SkipStep { .. }) && raw_non_finite;
        if expect == Expect::Ok && raw_non_finite && policy == NonFinitePolicy::Error {
            expect = Expect::Err;
        }
        // Finite values whose sums or squares overflow: a checking policy may or may not react.
        if expect == Expect::Ok && big && policy != NonFinitePolicy::Propagate {
            expect = Expect::Either;
        }

        // Build the updates.
        let before = snapshot(&opt, &params);
        let pre_rows: Vec<RowState> = (0..nvars)
            .map(|k| row_state(&opt, ids[k], &params[k]))
            .collect();
        let id_bufs: Vec<IdBufs> = specs
            .iter()
            .map(|s| {
                let ids = s.ids.clone().unwrap_or_default();
                (
                    ids.iter().map(|&i| i as u32).collect(),
                    ids.iter().map(|&i| i as u64).collect(),
                    ids.iter().map(|&i| i as usize).collect(),
                    ids.iter().map(|&i| i as i32).collect(),
                    ids,
                )
            })
            .collect();
        let grad_bufs: Vec<Store> = specs
            .iter()
            .map(|s| Store::from_f32(s.grad_dtype, &s.values))
            .collect();
        let mut temps: Vec<Store> = specs
            .iter()
            .map(|s| {
                let (n, d) = match vars.get(s.var) {
                    Some(v) => (v.rows * v.row_len, v.dtype),
                    None => (4, DType::F32),
                };
                match s.param_kind {
                    1 => Store::zeros(d, n.saturating_sub(1)),
                    2 => Store::zeros(
                        if d == DType::F32 {
                            DType::F16
                        } else {
                            DType::F32
                        },
                        n,
                    ),
                    _ => Store::zeros(d, n),
                }
            })
            .collect();
        let result;
        {
            let mut own: Vec<Option<&mut Store>> = params.iter_mut().map(Some).collect();
            let mut temp_iter = temps.iter_mut();
            let mut updates: Vec<Update<'_>> = Vec::new();
            for ((s, b), g) in specs.iter().zip(&id_bufs).zip(&grad_bufs) {
                let temp = temp_iter.next().expect("one per spec");
                let var_id = ids.get(s.var).copied().unwrap_or(unknown);
                let param: TensorMut<'_> = if s.param_kind == 0 {
                    match own.get_mut(s.var).and_then(Option::take) {
                        Some(p) => p.as_mut(),
                        None => temp.as_mut(),
                    }
                } else {
                    temp.as_mut()
                };
                let grad = match &s.ids {
                    None => Gradient::dense(g.as_ref()),
                    Some(_) => {
                        let rid: RowIds<'_> = match s.id_type {
                            0 => RowIds::from(&b.0[..]),
                            1 => RowIds::from(&b.1[..]),
                            2 => RowIds::from(&b.2[..]),
                            3 => RowIds::from(&b.3[..]),
                            _ => RowIds::from(&b.4[..]),
                        };
                        Gradient::sparse(rid, g.as_ref())
                    }
                };
                updates.push(Update::new(var_id, param, grad));
            }
            result = opt.apply_gradients(&mut updates);
        }
        let after = snapshot(&opt, &params);
        match &result {
            Err(e) => {
                assert_ne!(expect, Expect::Ok, "unexpected error {e:?} for {specs:?}");
                assert_eq!(before, after, "an erroring step changed the state: {e:?}");
                continue;
            }
            Ok(StepOutcome::Skipped) => {
                assert!(
                    matches!(policy, NonFinitePolicy::SkipStep { .. }),
                    "skipped under {policy:?}"
                );
                assert!(raw_non_finite || big, "a finite step was skipped");
                assert_eq!(before, after, "a skipped step changed the state");
                continue;
            }
            Ok(StepOutcome::Applied) => {
                assert_ne!(expect, Expect::Err, "expected an error for {specs:?}");
                assert!(
                    !skip_expected,
                    "a non-finite step was applied under {policy:?}"
                );
            }
        }
        // Rows outside the step keep their exact bits: parameters and every slot.
        for k in 0..nvars {
            let rl = vars[k].row_len;
            let mut touched = vec![false; vars[k].rows];
            for sp in specs.iter().filter(|sp| sp.var == k) {
                match &sp.ids {
                    None => touched.iter_mut().for_each(|t| *t = true),
                    Some(_) => sp.eff.iter().for_each(|&i| touched[i as usize] = true),
                }
            }
            let post = row_state(&opt, ids[k], &params[k]);
            for (r, _) in touched.iter().enumerate().filter(|(_, t)| !**t) {
                for (what, a, b) in [
                    ("param", &pre_rows[k].0, &post.0),
                    ("m", &pre_rows[k].1, &post.1),
                    ("v", &pre_rows[k].2, &post.2),
                    ("vhat", &pre_rows[k].3, &post.3),
                ] {
                    let row = |x: &Vec<u32>| x.get(r * rl..(r + 1) * rl).map(<[u32]>::to_vec);
                    // A slot created by this step reads as zeros before it.
                    let zeros = vec![0u32; rl];
                    let old = if a.is_empty() { Some(zeros) } else { row(a) };
                    if b.is_empty() {
                        continue;
                    }
                    assert_eq!(
                        old,
                        row(b),
                        "var {k} row {r} ({what}) changed outside the step"
                    );
                }
            }
        }
        if specs.is_empty() {
            // Whether an empty call counts as a step is the library's choice; follow it.
            assert!(
                after.iterations == before.iterations || after.iterations == before.iterations + 1
            );
            assert!(
                same_stores(&before.params, &after.params),
                "an empty call changed the parameters: {:?} -> {:?}",
                before.params,
                after.params
            );
            if after.iterations == before.iterations {
                continue;
            }
        } else {
            assert_eq!(
                after.iterations,
                before.iterations + 1,
                "one step, one increment"
            );
        }
        // Every tensor handed in other than the variables' own is left alone on success?
        // (It can only happen with an expected error, so nothing to check here.)
        history.push(specs.clone());
        if model_ok && !grad_dtype_odd {
            model_ok = model_step(&h, before.iterations, &mut vars, &specs);
        } else {
            model_ok = false;
        }
        if !model_ok {
            continue;
        }
        // Compare the tracked variables.
        for (k, var) in vars.iter().enumerate() {
            if !var.tracked {
                continue;
            }
            let p = params[k].f32s();
            let slots = opt.slots(ids[k]);
            let (m, v, vh) = match &slots {
                Some(s) => (
                    tensor_f32(&s.m),
                    tensor_f32(&s.v),
                    s.vhat.as_ref().map(tensor_f32),
                ),
                None => (vec![0.0; p.len()], vec![0.0; p.len()], None),
            };
            let ctx = format!("{h:?}\n{policy:?}\nsteps: {history:#?}");
            assert_eq!(m.len(), p.len());
            assert_eq!(v.len(), p.len());
            for (i, el) in var.elems.iter().enumerate() {
                if !el.live {
                    continue;
                }
                assert!(
                    within(m[i], el.m, el.em),
                    "{k}[{i}] m: lib {} model {} (err {})\n{ctx}",
                    m[i],
                    el.m,
                    el.em
                );
                assert!(
                    within(v[i], el.v, el.ev),
                    "{k}[{i}] v: lib {} model {} (err {})\n{ctx}",
                    v[i],
                    el.v,
                    el.ev
                );
                assert!(
                    within(p[i], el.p, el.ep),
                    "{k}[{i}] param: lib {} model {} (err {})\n{ctx}",
                    p[i],
                    el.p,
                    el.ep
                );
                if let Some(vh) = &vh {
                    assert!(
                        within(vh[i], el.vhat, el.evh),
                        "{k}[{i}] vhat: lib {} model {}\n{ctx}",
                        vh[i],
                        el.vhat
                    );
                }
            }
        }
    }
    Ok(())
}

/// A user schedule that returns `value` from step `from` on (0.01 before).
#[derive(Debug)]
struct TurnsBad {
    value: f32,
    from: u64,
}

impl LearningRateSchedule for TurnsBad {
    fn learning_rate(&self, step: u64) -> f32 {
        if step < self.from { 0.01 } else { self.value }
    }
}

fn hostile_rate(u: &mut Unstructured<'_>) -> Result<LearningRate> {
    let lr = |u: &mut Unstructured<'_>| {
        choose(
            u,
            &[
                0.01f64,
                0.0,
                1.0,
                1e-7,
                -1.0,
                f64::NAN,
                f64::INFINITY,
                1e39,
                3e38,
                1e300,
            ],
        )
    };
    let steps = |u: &mut Unstructured<'_>| choose(u, &[1.0f64, 2.0, 0.0, -1.0, 1e18, f64::NAN]);
    let any = |u: &mut Unstructured<'_>| {
        choose(
            u,
            &[
                0.5f64,
                0.0,
                1.0,
                2.0,
                -1.0,
                -2.0,
                1e300,
                f64::NAN,
                0.9,
                1e-3,
            ],
        )
    };
    Ok(match u.int_in_range(0u8..=7)? {
        0 => LearningRate::Constant(lr(u)? as f32),
        1 => LearningRate::Schedule(Schedule::ExponentialDecay {
            initial_learning_rate: lr(u)?,
            decay_steps: steps(u)?,
            decay_rate: any(u)?,
            staircase: u.arbitrary()?,
        }),
        2 => LearningRate::Schedule(Schedule::InverseTimeDecay {
            initial_learning_rate: lr(u)?,
            decay_steps: steps(u)?,
            decay_rate: any(u)?,
            staircase: u.arbitrary()?,
        }),
        3 => LearningRate::Schedule(Schedule::PiecewiseConstantDecay {
            boundaries: vec![steps(u)?, steps(u)?],
            values: vec![lr(u)?, lr(u)?, lr(u)?],
        }),
        4 => LearningRate::Schedule(Schedule::PolynomialDecay {
            initial_learning_rate: lr(u)?,
            decay_steps: steps(u)?,
            end_learning_rate: lr(u)?,
            power: any(u)?,
            cycle: u.arbitrary()?,
        }),
        5 => LearningRate::Schedule(Schedule::CosineDecay {
            initial_learning_rate: lr(u)?,
            decay_steps: steps(u)?,
            alpha: any(u)?,
            warmup_target: if u.arbitrary()? { Some(lr(u)?) } else { None },
            warmup_steps: steps(u)?.abs(),
        }),
        6 => LearningRate::Schedule(Schedule::CosineDecayRestarts {
            initial_learning_rate: lr(u)?,
            first_decay_steps: steps(u)?,
            t_mul: any(u)?,
            m_mul: any(u)?,
            alpha: any(u)?,
        }),
        _ => LearningRate::Custom(CustomSchedule::new(TurnsBad {
            value: choose(u, &[f32::NAN, -1.0, f32::INFINITY, 0.5, -0.0])?,
            from: u.int_in_range(0u64..=4)?,
        })),
    })
}

/// Hostile mode (see the module documentation).
fn hostile(u: &mut Unstructured<'_>) -> Result<()> {
    let config = LazyAdamConfig {
        learning_rate: hostile_rate(u)?,
        beta_1: choose(u, &[0.9f32, 0.0, 0.99, 0.999_999_9, 1.0, -0.1])?,
        beta_2: choose(u, &[0.999f32, 0.0, 0.5, 0.999_999_9, 1.0])?,
        epsilon: choose(u, &[1e-7f32, 1.0, 1e-30, 0.0, -1.0])?,
        amsgrad: u.arbitrary()?,
        decay: choose(u, &[0.0f32, 0.0, 0.5, 1e30, -1.0])?,
        clipnorm: if u.ratio(1u8, 4u8)? {
            Some(choose(u, &[1.0f32, 0.0, 1e-30])?)
        } else {
            None
        },
        clipvalue: if u.ratio(1u8, 4u8)? {
            Some(choose(u, &[0.5f32, 0.0, 1e30])?)
        } else {
            None
        },
        global_clipnorm: if u.ratio(1u8, 4u8)? {
            Some(choose(u, &[1.0f32, 0.0])?)
        } else {
            None
        },
        ..LazyAdamConfig::default()
    };
    let loss_scale = |u: &mut Unstructured<'_>| -> Result<Option<DynamicLossScale>> {
        Ok(if u.arbitrary()? {
            Some(DynamicLossScale {
                scale: choose(u, &[32768.0f32, 1e-39, f32::MIN_POSITIVE, 1e38, 1.0, 0.0])?,
                growth_factor: choose(u, &[2.0f32, 1.0, 1e30, 0.5])?,
                backoff_factor: choose(u, &[0.5f32, 1e-30, 1.0, 0.0])?,
                growth_interval: choose(u, &[1u64, 2, 2000, 0, u64::MAX])?,
            })
        } else {
            None
        })
    };
    let non_finite = match u.int_in_range(0u8..=2)? {
        0 => NonFinitePolicy::Propagate,
        1 => NonFinitePolicy::Error,
        _ => NonFinitePolicy::SkipStep {
            loss_scale: loss_scale(u)?,
        },
    };
    let ext = Extensions {
        sparse_amsgrad: u.arbitrary()?,
        weight_decay: choose(u, &[0.0f32, 0.0, 0.01, 1e30, -1.0, f32::NAN])?,
        maximize: u.arbitrary()?,
        per_row_bias_correction: u.arbitrary()?,
        catch_up_decay: u.arbitrary()?,
        non_finite,
        stochastic_rounding: if u.arbitrary()? {
            Some(u.arbitrary()?)
        } else {
            None
        },
        parallel_min_elements: choose(u, &[1usize, 4, 32_768])?,
        bias_correction: choose(u, &[BiasCorrection::Reference, BiasCorrection::F64])?,
        ..Extensions::default()
    };
    let Ok(mut opt) = LazyAdam::with_extensions(config.clone(), ext.clone()) else {
        return Ok(());
    };
    // Step counters near the maximum; out-of-range ones are refused without a change.
    let start = choose(
        u,
        &[
            0u64,
            0,
            1,
            i64::MAX as u64 - 2,
            i64::MAX as u64 - 1,
            i64::MAX as u64,
            u64::MAX,
        ],
    )?;
    match opt.set_iterations(start) {
        Ok(()) => assert_eq!(opt.iterations(), start),
        Err(_) => {
            assert!(start > i64::MAX as u64);
            assert_eq!(opt.iterations(), 0);
        }
    }

    // Variables, zero dimensions included.
    let nvars = u.int_in_range(1usize..=3)?;
    let mut ids = Vec::new();
    let mut params = Vec::new();
    let mut shapes = Vec::new();
    for k in 0..nvars {
        let rows = u.int_in_range(0usize..=5)?;
        let row_len = u.int_in_range(0usize..=3)?;
        let shape = if u.ratio(1u8, 6u8)? {
            vec![rows]
        } else {
            vec![rows, row_len]
        };
        let dtype = choose(u, &[DType::F32, DType::F32, DType::BF16, DType::F16])?;
        let moment = choose(u, &[DType::F32, DType::F32, DType::BF16, DType::F16])?;
        let id = opt
            .add_variable(&format!("h{k}"), &shape, dtype, moment)
            .expect("a zero-free or zero-sized shape is valid");
        let info = opt.variable(id).expect("just added").clone();
        let init: Vec<f32> = (0..info.numel())
            .map(|_| choose(u, &[0.5f32, -1.0, 0.0, 100.0]))
            .collect::<Result<_>>()?;
        params.push(Store::from_f32(dtype, &init));
        shapes.push((info.rows(), info.row_len(), dtype, moment));
        ids.push(id);
    }
    // Handles issued by a second optimizer with the same names and shapes.
    let mut other = LazyAdam::new(LazyAdamConfig::default()).expect("default config");
    let foreign: Vec<VarId> = shapes
        .iter()
        .enumerate()
        .map(|(k, &(rows, row_len, dtype, moment))| {
            other
                .add_variable(&format!("h{k}"), &[rows, row_len], dtype, moment)
                .expect("valid")
        })
        .collect();

    for _ in 0..u.int_in_range(0usize..=4)? {
        let nupd = u.int_in_range(0usize..=3)?;
        let mut chosen = Vec::new();
        for _ in 0..nupd {
            let k = u.int_in_range(0..=nvars - 1)?;
            let foreign_handle = u.ratio(1u8, 8u8)?;
            let (rows, row_len, _, _) = shapes[k];
            let sparse = u.arbitrary()?;
            let ids_k: Vec<i64> = if sparse {
                (0..u.int_in_range(0usize..=4)?)
                    .map(|_| u.int_in_range(-1i64..=rows as i64))
                    .collect::<Result<_>>()?
            } else {
                Vec::new()
            };
            let n = if sparse {
                ids_k.len() * row_len
            } else {
                rows * row_len
            };
            let values: Vec<f32> = (0..n)
                .map(|_| {
                    Ok(if u.ratio(1u8, 16u8)? {
                        choose(u, &[f32::NAN, f32::INFINITY, 1e30, -1e30])?
                    } else {
                        choose(u, &[0.5f32, -1.0, 0.0, 100.0, 1e-30, -3.0])?
                    })
                })
                .collect::<Result<_>>()?;
            chosen.push((k, foreign_handle, sparse, ids_k, values));
        }
        let moderate = chosen.iter().all(|(k, foreign_handle, _, _, values)| {
            let (_, _, dtype, moment) = shapes[*k];
            !foreign_handle
                && dtype != DType::F16
                && moment != DType::F16
                && values.iter().all(|x| x.is_finite() && x.abs() <= 100.0)
        }) && params
            .iter()
            .all(|p| p.f32s().iter().all(|x| x.is_finite() && x.abs() <= 1e4))
            && common::slots_within(&opt, 1e4)
            && opt.learning_rate() <= 10.0
            && ext.weight_decay <= 0.1
            && config.epsilon >= 1e-30;
        let before = snapshot(&opt, &params);
        let it = opt.iterations();
        let result = {
            let mut own: Vec<Option<&mut Store>> = params.iter_mut().map(Some).collect();
            let mut spare: Vec<Store> = chosen
                .iter()
                .map(|(k, ..)| Store::zeros(shapes[*k].2, params_len(&shapes[*k])))
                .collect();
            let mut spare_iter = spare.iter_mut();
            let grads: Vec<Store> = chosen
                .iter()
                .map(|(_, _, _, _, v)| Store::from_f32(DType::F32, v))
                .collect();
            let mut updates = Vec::new();
            for ((k, foreign_handle, sparse, ids_k, _), g) in chosen.iter().zip(&grads) {
                let spare = spare_iter.next().expect("one per update");
                let param = match own[*k].take() {
                    Some(p) => p.as_mut(),
                    None => spare.as_mut(),
                };
                let var = if *foreign_handle {
                    foreign[*k]
                } else {
                    ids[*k]
                };
                let grad = if *sparse {
                    Gradient::sparse(&ids_k[..], g.as_ref())
                } else {
                    Gradient::dense(g.as_ref())
                };
                updates.push(Update::new(var, param, grad));
            }
            opt.apply_gradients(&mut updates)
        };
        let after = snapshot(&opt, &params);
        match result {
            Err(e) => {
                assert!(
                    !matches!(e, lazyadam::Error::Kernel(_)),
                    "kernel error escaped: {e}"
                );
                assert_eq!(before, after, "a failed step changed the state: {e}");
            }
            Ok(StepOutcome::Skipped) => {
                assert!(
                    same_weights(&before.weights, &after.weights),
                    "a skipped step changed the weights: {before:?} -> {after:?}"
                );
                assert!(
                    same_stores(&before.params, &after.params),
                    "a skipped step changed the parameters: {before:?} -> {after:?}"
                );
                if let (Some(a), Some(b)) = (before.loss_scale, after.loss_scale) {
                    let (a, b) = (f32::from_bits(a), f32::from_bits(b));
                    assert!(b <= a && b >= f32::MIN_POSITIVE, "loss scale {a} -> {b}");
                }
            }
            Ok(StepOutcome::Applied) => {
                assert_eq!(opt.iterations(), it + 1, "one step, one increment");
                if let Some(s) = opt.loss_scale() {
                    assert!(s.is_finite() && s >= f32::MIN_POSITIVE, "loss scale {s}");
                }
                if moderate {
                    for (k, p) in params.iter().enumerate() {
                        assert!(
                            p.f32s().iter().all(|x| x.is_finite()),
                            "var {k}: non-finite parameters after a valid step: {:?}\n{config:?}\n{ext:?}",
                            p.f32s()
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

fn params_len(s: &(usize, usize, DType, DType)) -> usize {
    s.0 * s.1
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    if data.first().is_some_and(|b| b % 4 == 3) {
        let _ = u.bytes(1);
        let _ = hostile(&mut u);
    } else {
        let _ = run(&mut u);
    }
});
