//! Owned slot storage.

use lazyadam_kernels::{DType, Element, bf16, f16};

use crate::error::Error;
use crate::tensor::{TensorRef, WeightData};

/// An owned, typed vector (a slot: `m`, `v` or `vhat`).
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Store {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

/// Allocates `n` zeros without aborting on failure.
pub(crate) fn try_zeros<T: Clone + Default>(n: usize, what: &str) -> Result<Vec<T>, Error> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| Error::OutOfMemory {
        what: what.to_string(),
    })?;
    v.resize(n, T::default());
    Ok(v)
}

impl Store {
    pub(crate) fn zeros(dtype: DType, n: usize, what: &str) -> Result<Store, Error> {
        Ok(match dtype {
            DType::F32 => Store::F32(try_zeros(n, what)?),
            DType::F16 => Store::F16(try_zeros(n, what)?),
            DType::BF16 => Store::BF16(try_zeros(n, what)?),
        })
    }

    pub(crate) fn as_ref(&self) -> TensorRef<'_> {
        match self {
            Store::F32(v) => TensorRef::F32(v),
            Store::F16(v) => TensorRef::F16(v),
            Store::BF16(v) => TensorRef::BF16(v),
        }
    }

    pub(crate) fn to_weight_data(&self) -> WeightData {
        match self {
            Store::F32(v) => WeightData::F32(v.clone()),
            Store::F16(v) => WeightData::F16(v.clone()),
            Store::BF16(v) => WeightData::BF16(v.clone()),
        }
    }

    pub(crate) fn from_weight_data(d: &WeightData) -> Option<Store> {
        match d {
            WeightData::F32(v) => Some(Store::F32(v.clone())),
            WeightData::F16(v) => Some(Store::F16(v.clone())),
            WeightData::BF16(v) => Some(Store::BF16(v.clone())),
            WeightData::I64(_) => None,
        }
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        match self {
            Store::F32(v) => bytemuck::cast_slice(v),
            Store::F16(v) => bytemuck::cast_slice(v),
            Store::BF16(v) => bytemuck::cast_slice(v),
        }
    }
}

/// The storage element types with access to the matching [`Store`] variant.
pub(crate) trait StoreElem: Element {
    fn slice_mut(s: &mut Store) -> Option<&mut [Self]>;
}

impl StoreElem for f32 {
    fn slice_mut(s: &mut Store) -> Option<&mut [Self]> {
        match s {
            Store::F32(v) => Some(v),
            _ => None,
        }
    }
}

impl StoreElem for f16 {
    fn slice_mut(s: &mut Store) -> Option<&mut [Self]> {
        match s {
            Store::F16(v) => Some(v),
            _ => None,
        }
    }
}

impl StoreElem for bf16 {
    fn slice_mut(s: &mut Store) -> Option<&mut [Self]> {
        match s {
            Store::BF16(v) => Some(v),
            _ => None,
        }
    }
}
