//! Weights in the reference's order, and checkpoints in safetensors.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use lazyadam_kernels::{DType, bf16, f16};
use safetensors::tensor::{Dtype, SafeTensors, View};
use serde_json::{Value, json};

use crate::config::LazyAdamConfig;
use crate::error::Error;
use crate::extensions::Extensions;
use crate::optimizer::{LazyAdam, LossScaleState, VarState};
use crate::store::Store;
use crate::tensor::{VariableInfo, WeightData, WeightTensor};

/// The `format` entry of checkpoint metadata.
pub const CHECKPOINT_FORMAT: &str = "lazyadam-state/1";

fn ck(msg: impl Into<String>) -> Error {
    Error::Checkpoint(msg.into())
}

fn dtype_name(d: DType) -> &'static str {
    d.name()
}

fn dtype_from_name(s: &str) -> Option<DType> {
    match s {
        "float32" => Some(DType::F32),
        "float16" => Some(DType::F16),
        "bfloat16" => Some(DType::BF16),
        _ => None,
    }
}

fn st_dtype(d: DType) -> Dtype {
    match d {
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
    }
}

/// A tensor to serialize: borrowed bytes.
struct Raw<'a> {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Cow<'a, [u8]>,
}

impl View for Raw<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn i64_bytes(v: &[u64]) -> Vec<u8> {
    v.iter()
        .flat_map(|&x| (x.min(i64::MAX as u64) as i64).to_le_bytes())
        .collect()
}

impl LazyAdam {
    /// The optimizer's weights in the reference's `get_weights()` order:
    /// `iterations` (an i64 scalar), every variable's `m`, every `v`, then
    /// (with `amsgrad`) every `vhat`, in registration order. Extensions with
    /// per-row state append every `<var>/row_steps`, then every
    /// `<var>/last_step` (i64 vectors, one value per row).
    pub fn get_weights(&self) -> Vec<WeightTensor> {
        let mut out = Vec::with_capacity(1 + 3 * self.vars.len());
        out.push(WeightTensor {
            name: "iterations".into(),
            shape: vec![],
            data: WeightData::I64(vec![self.iterations.min(i64::MAX as u64) as i64]),
        });
        let slot = |v: &VarState, suffix: &str, s: &Store| WeightTensor {
            name: format!("{}/{suffix}", v.info.name),
            shape: v.info.shape.clone(),
            data: s.to_weight_data(),
        };
        out.extend(self.vars.iter().map(|v| slot(v, "m", &v.m)));
        out.extend(self.vars.iter().map(|v| slot(v, "v", &v.v)));
        out.extend(
            self.vars
                .iter()
                .filter_map(|v| v.vhat.as_ref().map(|s| slot(v, "vhat", s))),
        );
        let counters = |v: &VarState, suffix: &str, c: &[u64]| WeightTensor {
            name: format!("{}/{suffix}", v.info.name),
            shape: vec![v.rows],
            data: WeightData::I64(c.iter().map(|&x| x.min(i64::MAX as u64) as i64).collect()),
        };
        out.extend(
            self.vars
                .iter()
                .filter_map(|v| v.row_steps.as_ref().map(|c| counters(v, "row_steps", c))),
        );
        out.extend(
            self.vars
                .iter()
                .filter_map(|v| v.last_step.as_ref().map(|c| counters(v, "last_step", c))),
        );
        out
    }

    /// Restores weights in the order of [`LazyAdam::get_weights`]. Shapes
    /// and storage types must match (names are not checked, as in Keras);
    /// on error nothing changes.
    pub fn set_weights(&mut self, weights: &[WeightTensor]) -> Result<(), Error> {
        let n = self.vars.len();
        let with_vhat = self.vars.iter().filter(|v| v.vhat.is_some()).count();
        let with_steps = self.vars.iter().filter(|v| v.row_steps.is_some()).count();
        let with_last = self.vars.iter().filter(|v| v.last_step.is_some()).count();
        let expected = 1 + 2 * n + with_vhat + with_steps + with_last;
        if weights.len() != expected {
            return Err(ck(format!(
                "expected {expected} weight tensors, got {}",
                weights.len()
            )));
        }
        let iterations = match &weights[0].data {
            WeightData::I64(v) if v.len() == 1 && v[0] >= 0 => v[0] as u64,
            _ => return Err(ck("weight 0 (iterations) must be one non-negative integer")),
        };
        let mut idx = 1;
        let mut take_slot = |var: &VarState, what: &str| -> Result<Store, Error> {
            let w = &weights[idx];
            idx += 1;
            if w.shape != var.info.shape || w.data.len() != var.numel {
                return Err(ck(format!(
                    "weight `{}` for {}/{what}: shape {:?}, expected {:?}",
                    w.name, var.info.name, w.shape, var.info.shape
                )));
            }
            if w.data.dtype() != Some(var.info.moment_dtype) {
                return Err(Error::DtypeMismatch {
                    variable: var.info.name.clone(),
                    what: "slot weight",
                    expected: var.info.moment_dtype,
                    got: w.data.dtype().unwrap_or(DType::F32),
                });
            }
            Store::from_weight_data(&w.data).ok_or_else(|| ck("integer data for a slot"))
        };
        let mut ms = Vec::with_capacity(n);
        let mut vs = Vec::with_capacity(n);
        let mut vhats = Vec::with_capacity(n);
        for var in &self.vars {
            ms.push(take_slot(var, "m")?);
        }
        for var in &self.vars {
            vs.push(take_slot(var, "v")?);
        }
        for var in &self.vars {
            vhats.push(match var.vhat {
                Some(_) => Some(take_slot(var, "vhat")?),
                None => None,
            });
        }
        let mut take_counts = |var: &VarState, what: &str| -> Result<Vec<u64>, Error> {
            let w = &weights[idx];
            idx += 1;
            match &w.data {
                WeightData::I64(v) if v.len() == var.rows && v.iter().all(|&x| x >= 0) => {
                    Ok(v.iter().map(|&x| x as u64).collect())
                }
                _ => Err(ck(format!(
                    "weight `{}` for {}/{what}: expected {} non-negative integers",
                    w.name, var.info.name, var.rows
                ))),
            }
        };
        let mut steps = Vec::with_capacity(n);
        for var in &self.vars {
            steps.push(match var.row_steps {
                Some(_) => Some(take_counts(var, "row_steps")?),
                None => None,
            });
        }
        let mut lasts = Vec::with_capacity(n);
        for var in &self.vars {
            lasts.push(match var.last_step {
                Some(_) => Some(take_counts(var, "last_step")?),
                None => None,
            });
        }
        // Everything checked: commit.
        self.iterations = iterations;
        for (((((var, m), v), vh), s), l) in self
            .vars
            .iter_mut()
            .zip(ms)
            .zip(vs)
            .zip(vhats)
            .zip(steps)
            .zip(lasts)
        {
            var.m = m;
            var.v = v;
            if vh.is_some() {
                var.vhat = vh;
            }
            if s.is_some() {
                var.row_steps = s;
            }
            if l.is_some() {
                var.last_step = l;
            }
        }
        Ok(())
    }

    /// The whole optimizer (configuration, extensions, variables and state)
    /// as safetensors bytes.
    ///
    /// Tensors: `iterations` (i64 scalar), `<var>/m`, `<var>/v`,
    /// `<var>/vhat` (with amsgrad), `<var>/row_steps`, `<var>/last_step`
    /// (i64, with the per-row extensions). Metadata: `format`
    /// (`lazyadam-state/1`), `config` (the Keras `get_config()` JSON),
    /// `extensions`, `variables` (names, shapes, storage types, in
    /// registration order) and `loss_scale`.
    ///
    /// Fails for a custom learning-rate schedule, which cannot be written.
    pub fn to_bytes(&self) -> Result<Vec<u8>, Error> {
        let config = self.config.to_keras_json()?;
        let vars: Vec<Value> = self
            .vars
            .iter()
            .map(|v| {
                json!({
                    "name": v.info.name,
                    "shape": v.info.shape,
                    "param_dtype": dtype_name(v.info.param_dtype),
                    "moment_dtype": dtype_name(v.info.moment_dtype),
                })
            })
            .collect();
        let loss_scale = match self.loss_scale {
            Some(l) => json!({"scale": l.scale, "good_steps": l.good_steps}),
            None => Value::Null,
        };
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), CHECKPOINT_FORMAT.to_string());
        meta.insert("config".to_string(), config);
        meta.insert("extensions".to_string(), self.ext.to_value().to_string());
        meta.insert("variables".to_string(), Value::Array(vars).to_string());
        meta.insert("loss_scale".to_string(), loss_scale.to_string());

        let mut tensors: Vec<(String, Raw<'_>)> = Vec::new();
        tensors.push((
            "iterations".into(),
            Raw {
                dtype: Dtype::I64,
                shape: vec![],
                data: Cow::Owned(
                    (self.iterations.min(i64::MAX as u64) as i64)
                        .to_le_bytes()
                        .to_vec(),
                ),
            },
        ));
        for v in &self.vars {
            let md = st_dtype(v.info.moment_dtype);
            let slot = |suffix: &str, s: &Store| {
                (
                    format!("{}/{suffix}", v.info.name),
                    Raw {
                        dtype: md,
                        shape: v.info.shape.clone(),
                        data: Cow::Owned(s.bytes().to_vec()),
                    },
                )
            };
            tensors.push(slot("m", &v.m));
            tensors.push(slot("v", &v.v));
            if let Some(s) = &v.vhat {
                tensors.push(slot("vhat", s));
            }
            for (suffix, c) in [("row_steps", &v.row_steps), ("last_step", &v.last_step)] {
                if let Some(c) = c {
                    tensors.push((
                        format!("{}/{suffix}", v.info.name),
                        Raw {
                            dtype: Dtype::I64,
                            shape: vec![v.rows],
                            data: Cow::Owned(i64_bytes(c)),
                        },
                    ));
                }
            }
        }
        safetensors::serialize(tensors, Some(meta)).map_err(|e| ck(e.to_string()))
    }

    /// Restores an optimizer written by [`LazyAdam::to_bytes`]. Corrupt,
    /// truncated or inconsistent bytes are an error (never a panic); sizes
    /// are checked against the bytes before anything is allocated.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        let (_, metadata) =
            SafeTensors::read_metadata(bytes).map_err(|e| ck(format!("not safetensors: {e}")))?;
        let st =
            SafeTensors::deserialize(bytes).map_err(|e| ck(format!("not safetensors: {e}")))?;
        let meta = metadata
            .metadata()
            .as_ref()
            .ok_or_else(|| ck("no metadata"))?;
        let get = |k: &str| {
            meta.get(k)
                .ok_or_else(|| ck(format!("metadata `{k}` missing")))
        };
        if get("format")? != CHECKPOINT_FORMAT {
            return Err(ck(format!("unknown format `{}`", get("format")?)));
        }
        let config = LazyAdamConfig::from_keras_json(get("config")?)?;
        let ext_value: Value = serde_json::from_str(get("extensions")?)
            .map_err(|e| ck(format!("metadata `extensions`: {e}")))?;
        let ext = Extensions::from_value(&ext_value)?;
        let vars_value: Value = serde_json::from_str(get("variables")?)
            .map_err(|e| ck(format!("metadata `variables`: {e}")))?;
        let loss_value: Value = serde_json::from_str(get("loss_scale")?)
            .map_err(|e| ck(format!("metadata `loss_scale`: {e}")))?;

        let mut opt = LazyAdam::with_extensions(config, ext)?;
        let vars = vars_value
            .as_array()
            .ok_or_else(|| ck("metadata `variables` is not a list"))?;
        // Check the declared variables against the tensors before allocating.
        let mut infos = Vec::with_capacity(vars.len().min(st.len()));
        for v in vars {
            let name = v["name"]
                .as_str()
                .ok_or_else(|| ck("variable without a name"))?;
            let shape: Vec<usize> = v["shape"]
                .as_array()
                .ok_or_else(|| ck(format!("variable `{name}`: no shape")))?
                .iter()
                .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                .collect::<Option<_>>()
                .ok_or_else(|| ck(format!("variable `{name}`: bad shape")))?;
            let dt = |k: &str| {
                v[k].as_str()
                    .and_then(dtype_from_name)
                    .ok_or_else(|| ck(format!("variable `{name}`: bad `{k}`")))
            };
            let info = VariableInfo {
                name: name.to_string(),
                shape,
                param_dtype: dt("param_dtype")?,
                moment_dtype: dt("moment_dtype")?,
            };
            let m = st
                .tensor(&format!("{name}/m"))
                .map_err(|_| ck(format!("tensor `{name}/m` missing")))?;
            if m.shape() != info.shape.as_slice() || m.dtype() != st_dtype(info.moment_dtype) {
                return Err(ck(format!(
                    "tensor `{name}/m` has {:?} {:?}, expected {:?} {:?}",
                    m.dtype(),
                    m.shape(),
                    st_dtype(info.moment_dtype),
                    info.shape
                )));
            }
            for (suffix, on) in [
                ("row_steps", opt.ext.per_row_bias_correction),
                ("last_step", opt.ext.catch_up_decay),
            ] {
                if on {
                    let t = st
                        .tensor(&format!("{name}/{suffix}"))
                        .map_err(|_| ck(format!("tensor `{name}/{suffix}` missing")))?;
                    if t.shape() != [info.rows()] || t.dtype() != Dtype::I64 {
                        return Err(ck(format!(
                            "tensor `{name}/{suffix}`: wrong dtype or shape"
                        )));
                    }
                }
            }
            infos.push(info);
        }
        for info in infos {
            let name = info.name.clone();
            let id = opt.add_variable(&name, &info.shape, info.param_dtype, info.moment_dtype)?;
            let var = &mut opt.vars[id.0];
            let rows = var.rows;
            let md = st_dtype(info.moment_dtype);
            let load_slot = |suffix: &str, store: &mut Store| -> Result<(), Error> {
                let t = st
                    .tensor(&format!("{name}/{suffix}"))
                    .map_err(|_| ck(format!("tensor `{name}/{suffix}` missing")))?;
                if t.shape() != info.shape.as_slice() || t.dtype() != md {
                    return Err(ck(format!(
                        "tensor `{name}/{suffix}`: wrong dtype or shape"
                    )));
                }
                let data = t.data();
                match store {
                    Store::F32(v) => {
                        fill(v, data, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    }
                    Store::F16(v) => fill(v, data, |b| {
                        f16::from_bits(u16::from_le_bytes([b[0], b[1]]))
                    }),
                    Store::BF16(v) => fill(v, data, |b| {
                        bf16::from_bits(u16::from_le_bytes([b[0], b[1]]))
                    }),
                }
            };
            load_slot("m", &mut var.m)?;
            load_slot("v", &mut var.v)?;
            if let Some(vh) = var.vhat.as_mut() {
                load_slot("vhat", vh)?;
            }
            let load_counts = |suffix: &str, c: &mut Vec<u64>| -> Result<(), Error> {
                let t = st
                    .tensor(&format!("{name}/{suffix}"))
                    .map_err(|_| ck(format!("tensor `{name}/{suffix}` missing")))?;
                if t.shape() != [rows] || t.dtype() != Dtype::I64 {
                    return Err(ck(format!(
                        "tensor `{name}/{suffix}`: wrong dtype or shape"
                    )));
                }
                fill(c, t.data(), |b| {
                    i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]).max(0)
                        as u64
                })
            };
            if let Some(c) = var.row_steps.as_mut() {
                load_counts("row_steps", c)?;
            }
            if let Some(c) = var.last_step.as_mut() {
                load_counts("last_step", c)?;
            }
        }
        let it = st
            .tensor("iterations")
            .map_err(|_| ck("tensor `iterations` missing"))?;
        if it.dtype() != Dtype::I64 || it.data().len() != 8 {
            return Err(ck("tensor `iterations` must be one i64"));
        }
        let d = it.data();
        let iterations = i64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]);
        if iterations < 0 {
            return Err(ck("negative `iterations`"));
        }
        opt.iterations = iterations as u64;
        match (&loss_value, opt.loss_scale.as_mut()) {
            (Value::Null, _) => {}
            (v, Some(ls)) => {
                let scale = v["scale"].as_f64().ok_or_else(|| ck("bad `loss_scale`"))? as f32;
                let good = v["good_steps"]
                    .as_u64()
                    .ok_or_else(|| ck("bad `loss_scale`"))?;
                if !(scale.is_finite() && scale > 0.0) {
                    return Err(ck("bad `loss_scale`"));
                }
                *ls = LossScaleState {
                    scale,
                    good_steps: good,
                };
            }
            (_, None) => return Err(ck("`loss_scale` state without a loss-scale policy")),
        }
        if st.len() != expected_tensor_count(&opt) {
            return Err(ck(format!(
                "{} tensors in the checkpoint, expected {}",
                st.len(),
                expected_tensor_count(&opt)
            )));
        }
        Ok(opt)
    }

    /// Writes [`LazyAdam::to_bytes`] to a file.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), Error> {
        let bytes = self.to_bytes()?;
        std::fs::write(path, bytes)?;
        Ok(())
    }

    /// Reads a file written by [`LazyAdam::save`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self, Error> {
        let bytes = std::fs::read(path)?;
        Self::from_bytes(&bytes)
    }
}

fn expected_tensor_count(opt: &LazyAdam) -> usize {
    1 + opt
        .vars
        .iter()
        .map(|v| {
            2 + v.vhat.is_some() as usize
                + v.row_steps.is_some() as usize
                + v.last_step.is_some() as usize
        })
        .sum::<usize>()
}

/// Decodes little-endian elements of `data` into `dst` (lengths already
/// checked by safetensors against the shape; re-checked here).
fn fill<T>(dst: &mut [T], data: &[u8], decode: impl Fn(&[u8]) -> T) -> Result<(), Error> {
    let size = std::mem::size_of::<T>();
    if data.len() != std::mem::size_of_val(dst) {
        return Err(ck("tensor data length does not match its shape"));
    }
    for (d, chunk) in dst.iter_mut().zip(data.chunks_exact(size)) {
        *d = decode(chunk);
    }
    Ok(())
}
