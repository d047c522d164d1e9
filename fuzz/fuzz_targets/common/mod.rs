//! Helpers shared by the fuzz targets (a module, not a target: cargo-fuzz builds only the
//! `[[bin]]`s of `Cargo.toml`).

use lazyadam::{LazyAdam, WeightData};

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
