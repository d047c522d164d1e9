//! Checkpoint bytes through `LazyAdam::from_bytes`: never a panic, never an allocation driven by
//! an unchecked length field (CI runs this target with a low `-malloc_limit_mb`).
//!
//! Input: the first byte picks the mode.
//! - `0`: the rest is checkpoint bytes as they are (the seed corpus holds real checkpoints);
//! - otherwise: a small optimizer is built and stepped from the input, perhaps edited through
//!   `set_iterations` and `set_weights` with hostile values (an edit that is refused must change
//!   nothing), saved with `to_bytes` (which must load back to the same state, bit for bit: every
//!   state the API accepts must), then the bytes are mutated (flips, truncation, insertions,
//!   header-length and JSON-header edits) and loaded.
//!
//! A checkpoint that loads must be usable: it saves again and reloads to the same state, and a
//! step with a zero gradient on each variable does not panic.
#![no_main]

use arbitrary::{Result, Unstructured};
use lazyadam::{
    DType, Extensions, Gradient, LazyAdam, LazyAdamConfig, LearningRate, Schedule, TensorMut,
    TensorRef, Update, WeightData, bf16, f16,
};
use libfuzzer_sys::fuzz_target;

mod common;
use common::weight_bits;

/// Observable state of an optimizer: config, variables, weights (bitwise).
fn state(opt: &LazyAdam) -> String {
    format!(
        "{:?}|{:?}|{}|{}|{:?}",
        opt.config(),
        opt.extensions(),
        opt.num_variables(),
        opt.iterations(),
        weight_bits(opt)
    )
}

/// Exercises a loaded optimizer.
fn use_loaded(opt: &mut LazyAdam) {
    let s0 = state(opt);
    let bytes = opt.to_bytes().expect("a loaded checkpoint saves again");
    let again = LazyAdam::from_bytes(&bytes).expect("a saved checkpoint loads");
    assert_eq!(s0, state(&again), "save -> load changed the state");
    assert_eq!(opt.num_variables(), again.num_variables());
    restore_by_name_checks(opt);
    let _ = opt.learning_rate();
    // One step with a zero gradient on every variable of a reasonable size.
    let names: Vec<String> = opt.get_weights().iter().map(|w| w.name.clone()).collect();
    let mut ids = Vec::new();
    for n in &names {
        for cand in [n.as_str(), n.rsplit_once('/').map_or(n.as_str(), |x| x.0)] {
            if let Some(id) = opt.variable_id(cand)
                && !ids.contains(&id)
            {
                ids.push(id);
            }
        }
    }
    let mut bufs: Vec<(lazyadam::VarId, DType, usize)> = Vec::new();
    for id in ids {
        let Some(info) = opt.variable(id) else {
            continue;
        };
        let n: Option<usize> = info.shape.iter().try_fold(1usize, |a, &b| a.checked_mul(b));
        if let Some(n) = n.filter(|&n| n <= 1 << 14) {
            bufs.push((id, info.param_dtype, n));
        }
    }
    let mut p32: Vec<Vec<f32>> = Vec::new();
    let mut p16: Vec<Vec<f16>> = Vec::new();
    let mut pb16: Vec<Vec<bf16>> = Vec::new();
    for &(_, d, n) in &bufs {
        match d {
            DType::F32 => p32.push(vec![0.5; n]),
            DType::F16 => p16.push(vec![f16::from_f32(0.5); n]),
            DType::BF16 => pb16.push(vec![bf16::from_f32(0.5); n]),
        }
    }
    let g32 = vec![0.0f32; 1 << 14];
    let g16 = vec![f16::ZERO; 1 << 14];
    let gb16 = vec![bf16::ZERO; 1 << 14];
    let (mut i32_, mut i16_, mut ib16) = (p32.iter_mut(), p16.iter_mut(), pb16.iter_mut());
    let mut updates = Vec::new();
    for &(id, d, n) in &bufs {
        let (param, grad): (TensorMut<'_>, TensorRef<'_>) = match d {
            DType::F32 => (i32_.next().expect("one per var").into(), (&g32[..n]).into()),
            DType::F16 => (i16_.next().expect("one per var").into(), (&g16[..n]).into()),
            DType::BF16 => (
                ib16.next().expect("one per var").into(),
                (&gb16[..n]).into(),
            ),
        };
        updates.push(Update::new(id, param, Gradient::dense(grad)));
    }
    let _ = opt.apply_gradients(&mut updates);
}

/// The loaded state restored by name into a fresh optimizer that registers the same
/// variables in reverse order: succeeds and gives every variable its own slots; with one
/// variable left out it fails naming it and changes nothing.
fn restore_by_name_checks(opt: &LazyAdam) {
    let infos: Vec<lazyadam::VariableInfo> = opt
        .variable_ids()
        .filter_map(|id| opt.variable(id).cloned())
        .collect();
    let fresh = |skip: Option<usize>| {
        let mut t = LazyAdam::with_extensions(opt.config().clone(), opt.extensions().clone())
            .expect("a loaded config builds");
        for (k, i) in infos.iter().enumerate().rev() {
            if Some(k) != skip {
                t.add_variable(&i.name, &i.shape, i.param_dtype, i.moment_dtype)
                    .expect("a loaded variable registers");
            }
        }
        t
    };
    let mut t = fresh(None);
    t.restore_by_name(opt)
        .expect("the same variables restore by name");
    assert_eq!(t.iterations(), opt.iterations());
    assert_eq!(
        t.loss_scale().map(f32::to_bits),
        opt.loss_scale().map(f32::to_bits)
    );
    for i in &infos {
        let (a, b) = (
            t.variable_id(&i.name).unwrap(),
            opt.variable_id(&i.name).unwrap(),
        );
        let (sa, sb) = (t.slots(a).unwrap(), opt.slots(b).unwrap());
        let bits = |x: lazyadam::TensorRef<'_>| -> Vec<u32> {
            x.to_f32_vec().iter().map(|v| v.to_bits()).collect()
        };
        assert_eq!(bits(sa.m), bits(sb.m), "{}", i.name);
        assert_eq!(bits(sa.v), bits(sb.v), "{}", i.name);
        assert_eq!(sa.vhat.map(bits), sb.vhat.map(bits), "{}", i.name);
        assert_eq!(t.row_steps(a), opt.row_steps(b));
        assert_eq!(t.last_update_steps(a), opt.last_update_steps(b));
    }
    if !infos.is_empty() {
        let mut t = fresh(Some(0));
        let before = state(&t);
        match t.restore_by_name(opt) {
            Err(lazyadam::Error::StateMismatch { variable, .. }) => {
                assert_eq!(variable, infos[0].name)
            }
            other => panic!("a missing variable restored: {other:?}"),
        }
        assert_eq!(before, state(&t), "a failed restore changed the state");
    }
}

fn build(u: &mut Unstructured<'_>) -> Result<LazyAdam> {
    let learning_rate = match u.int_in_range(0u8..=3)? {
        0 => LearningRate::Schedule(Schedule::ExponentialDecay {
            initial_learning_rate: 0.01,
            decay_steps: 10.0,
            decay_rate: 0.5,
            staircase: u.arbitrary()?,
        }),
        1 => LearningRate::Schedule(Schedule::PiecewiseConstantDecay {
            boundaries: vec![2.0, 5.0],
            values: vec![0.1, 0.01, 0.001],
        }),
        _ => LearningRate::Constant([1e-3f32, 0.1, 0.5][u.choose_index(3)?]),
    };
    let config = LazyAdamConfig {
        learning_rate,
        amsgrad: u.arbitrary()?,
        clipvalue: if u.arbitrary()? { Some(1.0) } else { None },
        ..LazyAdamConfig::default()
    };
    // Per-row counters (the extensions' state) in some optimizers, so that
    // `tamper` reaches them.
    let ext = Extensions::default()
        .with_per_row_bias_correction(u.arbitrary()?)
        .with_catch_up_decay(u.arbitrary()?);
    let mut opt =
        LazyAdam::with_extensions(config, ext).map_err(|_| arbitrary::Error::IncorrectFormat)?;
    let nvars = u.int_in_range(0usize..=3)?;
    let dtypes = [DType::F32, DType::F16, DType::BF16];
    let mut vars = Vec::new();
    for k in 0..nvars {
        let rows = u.int_in_range(1usize..=5)?;
        let cols = u.int_in_range(1usize..=3)?;
        let (rows, cols) = if u.arbitrary()? {
            (rows, cols)
        } else {
            (rows * cols, 1) // a vector: rows of one element
        };
        let shape = if cols == 1 && u.arbitrary()? {
            vec![rows]
        } else {
            vec![rows, cols]
        };
        let pd = dtypes[u.choose_index(3)?];
        let md = dtypes[u.choose_index(3)?];
        let id = opt
            .add_variable(&format!("emb{k}"), &shape, pd, md)
            .map_err(|_| arbitrary::Error::IncorrectFormat)?;
        vars.push((id, rows, rows * cols, cols, pd));
    }
    let steps = u.int_in_range(0usize..=3)?;
    for _ in 0..steps {
        for &(id, rows, n, cols, pd) in &vars {
            if !u.arbitrary::<bool>()? {
                continue;
            }
            let nid = u.int_in_range(0usize..=4)?;
            let ids: Vec<u32> = (0..nid)
                .map(|_| u.int_in_range(0u32..=rows as u32 - 1))
                .collect::<Result<_>>()?;
            let vals: Vec<f32> = (0..nid * cols)
                .map(|_| Ok(u.int_in_range(-16i8..=16)? as f32 / 8.0))
                .collect::<Result<_>>()?;
            let r = match pd {
                DType::F32 => {
                    let mut p = vec![0.25f32; n];
                    opt.apply_gradients(&mut [Update::new(
                        id,
                        &mut p[..],
                        Gradient::sparse(&ids[..], &vals[..]),
                    )])
                }
                DType::F16 => {
                    let mut p = vec![f16::from_f32(0.25); n];
                    let g: Vec<f16> = vals.iter().map(|&x| f16::from_f32(x)).collect();
                    opt.apply_gradients(&mut [Update::new(
                        id,
                        &mut p[..],
                        Gradient::sparse(&ids[..], &g[..]),
                    )])
                }
                DType::BF16 => {
                    let mut p = vec![bf16::from_f32(0.25); n];
                    let g: Vec<bf16> = vals.iter().map(|&x| bf16::from_f32(x)).collect();
                    opt.apply_gradients(&mut [Update::new(
                        id,
                        &mut p[..],
                        Gradient::sparse(&ids[..], &g[..]),
                    )])
                }
            };
            r.expect("a valid step");
        }
    }
    tamper(u, &mut opt)?;
    Ok(opt)
}

/// Hostile edits through the public API: a step counter anywhere (below the
/// per-row counters included) and one weight element set to a value no step
/// makes (a negative second moment, a negative counter) or to one a step can
/// make. An edit that fails must change nothing; one that succeeds must leave
/// a state that saves and loads back bit for bit (`structured` checks that).
fn tamper(u: &mut Unstructured<'_>, opt: &mut LazyAdam) -> Result<()> {
    if u.arbitrary()? {
        let before = state(opt);
        let t = match u.int_in_range(0u8..=2)? {
            0 => u.int_in_range(0..=opt.iterations().saturating_add(2))?,
            1 => u.arbitrary()?,
            _ => i64::MAX as u64,
        };
        if opt.set_iterations(t).is_err() {
            assert_eq!(
                before,
                state(opt),
                "a refused set_iterations changed the state"
            );
        }
    }
    let mut weights = opt.get_weights();
    if weights.is_empty() || !u.arbitrary::<bool>()? {
        return Ok(());
    }
    let w = u.choose_index(weights.len())?;
    let len = weights[w].data.len();
    if len == 0 {
        return Ok(());
    }
    let at = u.choose_index(len)?;
    let x = [
        -1.0f32,
        -1e-30,
        -0.0,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        3.0e38,
    ][u.choose_index(7)?];
    match &mut weights[w].data {
        WeightData::I64(v) => {
            v[at] = [-1, 0, i64::MAX, v[at].saturating_add(1)][u.choose_index(4)?]
        }
        WeightData::F32(v) => v[at] = x,
        WeightData::F16(v) => v[at] = f16::from_f32(x),
        WeightData::BF16(v) => v[at] = bf16::from_f32(x),
        #[allow(unreachable_patterns)]
        _ => return Ok(()),
    }
    let before = state(opt);
    if opt.set_weights(&weights).is_err() {
        assert_eq!(
            before,
            state(opt),
            "a refused set_weights changed the state"
        );
    }
    Ok(())
}

fn mutate(u: &mut Unstructured<'_>, bytes: &mut Vec<u8>) -> Result<()> {
    let n = u.int_in_range(1usize..=4)?;
    for _ in 0..n {
        if bytes.is_empty() {
            let k = u.int_in_range(0usize..=16)?;
            bytes.extend_from_slice(u.bytes(k)?);
            continue;
        }
        let len = bytes.len();
        match u.int_in_range(0u8..=7)? {
            0 => {
                let i = u.choose_index(len)?;
                bytes[i] ^= 1 << u.int_in_range(0u8..=7)?;
            }
            1 => {
                let i = u.choose_index(len)?;
                bytes[i] = u.arbitrary()?;
            }
            2 => bytes.truncate(u.choose_index(len)?),
            3 => {
                let i = u.int_in_range(0..=len)?;
                let k = u.int_in_range(0usize..=16)?;
                let ins = u.bytes(k)?.to_vec();
                bytes.splice(i..i, ins);
            }
            4 if len >= 8 => {
                // The safetensors header length field.
                let v: u64 = match u.int_in_range(0u8..=3)? {
                    0 => u.arbitrary()?,
                    1 => u64::MAX,
                    2 => (len as u64).saturating_sub(8) + u.int_in_range(0u64..=8)?,
                    _ => u.int_in_range(0u64..=len as u64)?,
                };
                bytes[..8].copy_from_slice(&v.to_le_bytes());
            }
            5 => {
                // Edit a number or a name inside the JSON header.
                let hdr_end = if len >= 8 {
                    (u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize)
                        .saturating_add(8)
                        .min(len)
                } else {
                    len
                };
                let digits: Vec<usize> = (8.min(hdr_end)..hdr_end)
                    .filter(|&i| bytes[i].is_ascii_digit())
                    .collect();
                if !digits.is_empty() {
                    let i = digits[u.choose_index(digits.len())?];
                    bytes[i] = b"0123456789"[u.choose_index(10)?];
                    if u.ratio(1u8, 3u8)? {
                        let more = b"9999999999999999999";
                        let k = u.int_in_range(1usize..=more.len())?;
                        bytes.splice(i..i, more[..k].iter().copied());
                    }
                }
            }
            6 => {
                // Swap two blocks of the data section.
                let a = u.choose_index(len)?;
                let b = u.choose_index(len)?;
                bytes.swap(a, b);
            }
            _ => {
                let i = u.choose_index(len)?;
                let j = u.int_in_range(i..=len)?;
                bytes.drain(i..j);
            }
        }
    }
    Ok(())
}

fn structured(u: &mut Unstructured<'_>) -> Result<()> {
    let opt = build(u)?;
    let bytes = opt.to_bytes().expect("to_bytes of a valid optimizer");
    let back = LazyAdam::from_bytes(&bytes).expect("a valid checkpoint loads");
    assert_eq!(state(&opt), state(&back), "save -> load changed the state");
    let mut bytes = bytes;
    mutate(u, &mut bytes)?;
    if let Ok(mut loaded) = LazyAdam::from_bytes(&bytes) {
        use_loaded(&mut loaded);
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    match data.split_first() {
        Some((0, rest)) => {
            if let Ok(mut opt) = LazyAdam::from_bytes(rest) {
                use_loaded(&mut opt);
            }
        }
        Some((_, rest)) => {
            let mut u = Unstructured::new(rest);
            let _ = structured(&mut u);
        }
        None => {
            let _ = LazyAdam::from_bytes(&[]);
        }
    }
});
