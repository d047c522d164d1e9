//! Helpers shared by the fuzz targets (a module, not a target: cargo-fuzz builds only the
//! `[[bin]]`s of `Cargo.toml`). Each target uses a part of it.
#![allow(dead_code)]

use arbitrary::{Result, Unstructured};
use lazyadam::{
    DType, Extensions, Isa, LazyAdam, NonFinitePolicy, TensorMut, TensorRef, WeightData,
    WeightTensor, bf16, f16,
};

/// The optimizer's weights as raw bits, so that NaN compares equal to the same NaN: a step
/// that must change nothing is checked byte for byte.
pub fn weight_bits(opt: &LazyAdam) -> Vec<(String, Vec<usize>, Vec<u64>)> {
    opt.get_weights()
        .into_iter()
        .map(|w| {
            let bits: Vec<u64> = match &w.data {
                WeightData::I64(v) => v.iter().map(|&x| x as u64).collect(),
                WeightData::F32(v) => v.iter().map(|x| x.to_bits() as u64).collect(),
                WeightData::F16(v) => v.iter().map(|x| x.to_bits() as u64).collect(),
                WeightData::BF16(v) => v.iter().map(|x| x.to_bits() as u64).collect(),
                #[allow(unreachable_patterns)]
                _ => Vec::new(),
            };
            (w.name, w.shape, bits)
        })
        .collect()
}

/// Whether `a` and `b` have the same length and each pair of elements the same `bits`:
/// compared in place, without building bit vectors.
fn same_by<T, B: PartialEq>(a: &[T], b: &[T], bits: impl Fn(&T) -> B) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| bits(x) == bits(y))
}

/// Whether two lists of [`LazyAdam::get_weights`] hold the same names, shapes, dtypes and
/// bits (NaN payloads and the sign of zero included): [`weight_bits`]'s comparison, in place.
/// Building those bit vectors took a third of `parallel_step`'s CPU time.
pub fn same_weights(a: &[WeightTensor], b: &[WeightTensor]) -> bool {
    let data = |a: &WeightData, b: &WeightData| match (a, b) {
        (WeightData::I64(a), WeightData::I64(b)) => a == b,
        (WeightData::F32(a), WeightData::F32(b)) => same_by(a, b, |x| x.to_bits()),
        (WeightData::F16(a), WeightData::F16(b)) => same_by(a, b, |x| x.to_bits()),
        (WeightData::BF16(a), WeightData::BF16(b)) => same_by(a, b, |x| x.to_bits()),
        _ => false,
    };
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(a, b)| a.name == b.name && a.shape == b.shape && data(&a.data, &b.data))
}

/// Whether two lists of parameter stores hold the same dtypes and bits ([`Store::same_bits`]).
pub fn same_stores(a: &[Store], b: &[Store]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.same_bits(y))
}

/// Whether every float slot the optimizer holds (`m`, `v`, `vhat`) is finite and at most
/// `bound` in magnitude: a step from such a state with moderate inputs keeps the parameters
/// finite, while one from a state an earlier huge gradient left (say `v` = inf from 1e30
/// squared, then `0 * inf` = NaN with `beta_2` = 0, as in the reference) need not.
pub fn slots_within(opt: &LazyAdam, bound: f32) -> bool {
    let ok = |x: f32| x.is_finite() && x.abs() <= bound;
    opt.get_weights().iter().all(|w| match &w.data {
        WeightData::F32(v) => v.iter().all(|&x| ok(x)),
        WeightData::F16(v) => v.iter().all(|x| ok(x.to_f32())),
        WeightData::BF16(v) => v.iter().all(|x| ok(x.to_f32())),
        _ => true,
    })
}

/// Owned parameter storage of one variable, in its declared dtype.
#[derive(Clone, Debug)]
pub enum Store {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl Store {
    pub fn zeros(d: DType, n: usize) -> Self {
        match d {
            DType::F32 => Store::F32(vec![0.0; n]),
            DType::F16 => Store::F16(vec![f16::ZERO; n]),
            DType::BF16 => Store::BF16(vec![bf16::ZERO; n]),
        }
    }
    pub fn from_f32(d: DType, x: &[f32]) -> Self {
        match d {
            DType::F32 => Store::F32(x.to_vec()),
            DType::F16 => Store::F16(x.iter().map(|&v| f16::from_f32(v)).collect()),
            DType::BF16 => Store::BF16(x.iter().map(|&v| bf16::from_f32(v)).collect()),
        }
    }
    pub fn as_mut(&mut self) -> TensorMut<'_> {
        match self {
            Store::F32(v) => TensorMut::from(&mut v[..]),
            Store::F16(v) => TensorMut::from(&mut v[..]),
            Store::BF16(v) => TensorMut::from(&mut v[..]),
        }
    }
    pub fn as_ref(&self) -> TensorRef<'_> {
        match self {
            Store::F32(v) => TensorRef::from(&v[..]),
            Store::F16(v) => TensorRef::from(&v[..]),
            Store::BF16(v) => TensorRef::from(&v[..]),
        }
    }
    pub fn bits(&self) -> Vec<u32> {
        match self {
            Store::F32(v) => v.iter().map(|x| x.to_bits()).collect(),
            Store::F16(v) => v.iter().map(|x| x.to_bits() as u32).collect(),
            Store::BF16(v) => v.iter().map(|x| x.to_bits() as u32).collect(),
        }
    }
    /// Whether `self` and `other` have the same dtype, length and bits: [`Store::bits`]'s
    /// comparison, in place.
    pub fn same_bits(&self, other: &Store) -> bool {
        match (self, other) {
            (Store::F32(a), Store::F32(b)) => same_by(a, b, |x| x.to_bits()),
            (Store::F16(a), Store::F16(b)) => same_by(a, b, |x| x.to_bits()),
            (Store::BF16(a), Store::BF16(b)) => same_by(a, b, |x| x.to_bits()),
            _ => false,
        }
    }
    pub fn f32s(&self) -> Vec<f32> {
        match self {
            Store::F32(v) => v.clone(),
            Store::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Store::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }
}

/// One of `xs`, chosen by the input.
pub fn choose<T: Copy>(u: &mut Unstructured<'_>, xs: &[T]) -> Result<T> {
    Ok(xs[u.choose_index(xs.len())?])
}

/// The extensions the two step targets draw alike: a non-finite policy (`Error` for a draw of
/// 0, `SkipStep` without loss scaling for 1, `Propagate` for every draw up to `max_draw`), a
/// kernel path forced half the time (one this CPU supports), and a parallel threshold from
/// `min_elements`. The rest are the defaults.
pub fn policy_and_kernel(
    u: &mut Unstructured<'_>,
    max_draw: u8,
    min_elements: &[usize],
) -> Result<Extensions> {
    let non_finite = match u.int_in_range(0u8..=max_draw)? {
        0 => NonFinitePolicy::Error,
        1 => NonFinitePolicy::SkipStep { loss_scale: None },
        _ => NonFinitePolicy::Propagate,
    };
    let supported: Vec<Isa> = Isa::supported().collect();
    let kernel = if u.arbitrary()? {
        Some(choose(u, &supported)?)
    } else {
        None
    };
    Ok(Extensions {
        non_finite,
        kernel,
        parallel_min_elements: choose(u, min_elements)?,
        ..Extensions::default()
    })
}
