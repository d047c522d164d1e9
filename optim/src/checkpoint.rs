//! Checkpoints: the whole optimizer as a safetensors file, written
//! deterministically, with a checksum, and read with bounded work.
//!
//! Layout (safetensors): an 8-byte little-endian header length `N`, a JSON
//! header of `N` bytes (padded with spaces to a multiple of 8), then the
//! tensor data. The header starts with `__metadata__` (keys in sorted order:
//! `checksum`, `config`, `extensions`, `format`, `loss_scale`, `variables`),
//! then one entry per tensor in data order. Tensors, in canonical order:
//! `iterations`, then per variable `<var>/m`, `<var>/v`, `<var>/vhat`,
//! `<var>/row_steps`, `<var>/last_step` (those that exist); the data holds
//! the 8-byte tensors first, then the 4-byte, then the 2-byte ones (each in
//! canonical order), so that every tensor is aligned to its element size.
//!
//! `checksum` is the CRC-64/XZ, in 16 lowercase hex digits, of every other
//! metadata value and of every tensor's name, dtype, shape and data, in
//! canonical order, each length-prefixed. It does not depend on the header's
//! formatting or on where the data lies, so a tool that rewrites the file
//! with the same metadata and tensors keeps it valid.
//!
//! Reading never trusts a size before checking it against the bytes: the
//! header must start with `__metadata__`; its variables say which tensors
//! must follow, and any other entry stops the parse at once, so what is
//! parsed is bounded by what the checkpoint declares (and each metadata value
//! by a fixed cap); every tensor's byte length must match its declared shape
//! and the tensors must tile the data exactly, before anything is allocated.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use lazyadam_kernels::{DType, bf16, f16};
use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Value, json};

use crate::config::LazyAdamConfig;
use crate::crc64::Crc64;
use crate::error::Error;
use crate::extensions::{Extensions, NonFinitePolicy};
use crate::optimizer::{LazyAdam, LossScaleState, MAX_ITERATIONS, VarState};
use crate::store::Store;
use crate::tensor::VariableInfo;

/// The `format` entry of checkpoint metadata.
pub const CHECKPOINT_FORMAT: &str = "lazyadam-state/2";

/// Largest header accepted (safetensors' own limit).
const MAX_HEADER: u64 = 100 << 20;

/// Cap on the `config` metadata value (a Keras config; long piecewise
/// schedules included).
const MAX_CONFIG: usize = 4 << 20;

/// Cap on the small metadata values (`format`, `extensions`, `loss_scale`,
/// `checksum`).
const MAX_SMALL: usize = 64 << 10;

/// The most bytes the metadata value `key` may hold (what
/// [`LazyAdam::from_bytes`] reads, and so what [`LazyAdam::to_bytes`] writes).
fn meta_cap(key: &str) -> usize {
    match key {
        "config" => MAX_CONFIG,
        // Bounded by the header itself: it declares what follows.
        "variables" => usize::MAX,
        _ => MAX_SMALL,
    }
}

/// Most dimensions a tensor shape may have.
const MAX_RANK: usize = 64;

fn ck(msg: impl Into<String>) -> Error {
    Error::Checkpoint(msg.into())
}

/// A tensor's storage type in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FileDtype {
    I64,
    Float(DType),
}

impl FileDtype {
    fn name(self) -> &'static str {
        match self {
            FileDtype::I64 => "I64",
            FileDtype::Float(DType::F32) => "F32",
            FileDtype::Float(DType::F16) => "F16",
            FileDtype::Float(DType::BF16) => "BF16",
        }
    }

    fn size(self) -> usize {
        match self {
            FileDtype::I64 => 8,
            FileDtype::Float(d) => d.size_bytes(),
        }
    }
}

fn dtype_from_name(s: &str) -> Option<DType> {
    match s {
        "float32" => Some(DType::F32),
        "float16" => Some(DType::F16),
        "bfloat16" => Some(DType::BF16),
        _ => None,
    }
}

/// What a tensor of the checkpoint must be.
#[derive(Clone, Debug, PartialEq)]
struct Spec {
    name: String,
    dtype: FileDtype,
    shape: Vec<usize>,
}

impl Spec {
    /// Byte length, or `None` when it overflows.
    fn byte_len(&self) -> Option<usize> {
        self.shape
            .iter()
            .try_fold(self.dtype.size(), |a, &d| a.checked_mul(d))
    }
}

/// The tensors of an optimizer with these variables and extensions, in
/// canonical order.
fn specs(infos: &[VariableInfo], vhat: bool, ext: &Extensions) -> Vec<Spec> {
    let mut out = vec![Spec {
        name: "iterations".into(),
        dtype: FileDtype::I64,
        shape: vec![],
    }];
    for info in infos {
        let slot = |suffix: &str| Spec {
            name: format!("{}/{suffix}", info.name),
            dtype: FileDtype::Float(info.moment_dtype),
            shape: info.shape.clone(),
        };
        let counts = |suffix: &str| Spec {
            name: format!("{}/{suffix}", info.name),
            dtype: FileDtype::I64,
            shape: vec![info.rows()],
        };
        out.push(slot("m"));
        out.push(slot("v"));
        if vhat {
            out.push(slot("vhat"));
        }
        if ext.per_row_bias_correction {
            out.push(counts("row_steps"));
        }
        if ext.catch_up_decay {
            out.push(counts("last_step"));
        }
    }
    out
}

/// The order of the data section: 8-byte tensors, then 4-byte, then
/// 2-byte, each group in canonical order.
fn data_order(specs: &[Spec]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..specs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(specs[i].dtype.size()));
    order
}

/// The checksummed metadata keys, in order (all but `checksum`).
const META_KEYS: [&str; 5] = ["config", "extensions", "format", "loss_scale", "variables"];

/// The checksum of the metadata values (in [`META_KEYS`] order) and the
/// tensors (canonical order).
fn checksum<'a>(meta: [&str; 5], tensors: impl Iterator<Item = (&'a Spec, &'a [u8])>) -> u64 {
    let mut c = Crc64::new();
    for (k, v) in META_KEYS.iter().zip(meta) {
        c.field(k.as_bytes());
        c.field(v.as_bytes());
    }
    for (spec, data) in tensors {
        c.field(spec.name.as_bytes());
        c.field(spec.dtype.name().as_bytes());
        c.update(&(spec.shape.len() as u64).to_le_bytes());
        for &d in &spec.shape {
            c.update(&(d as u64).to_le_bytes());
        }
        c.field(data);
    }
    c.finish()
}

fn u64s_as_i64_bytes(v: &[u64]) -> Vec<u8> {
    // Every counter is at most `MAX_ITERATIONS` (i64::MAX): no clamping.
    v.iter().flat_map(|&x| (x as i64).to_le_bytes()).collect()
}

impl LazyAdam {
    /// The whole optimizer (configuration, extensions, variables and state)
    /// as safetensors bytes, readable by numpy or torch; the same state
    /// always gives the same bytes.
    ///
    /// Tensors: `iterations` (i64 scalar), `<var>/m`, `<var>/v`,
    /// `<var>/vhat` (with amsgrad), `<var>/row_steps`, `<var>/last_step`
    /// (i64, with the per-row extensions). Metadata: `format`
    /// (`lazyadam-state/2`), `config` (the Keras `get_config()` JSON),
    /// `extensions`, `variables` (names, shapes, storage types, in
    /// registration order), `loss_scale`, and `checksum` (CRC-64 of all the
    /// rest, verified on load).
    ///
    /// Fails for a custom learning-rate schedule, which cannot be written,
    /// and with [`Error::Checkpoint`] for a state past the limits
    /// [`LazyAdam::from_bytes`] reads with (a variable of more than 64
    /// dimensions, a configuration JSON of more than 4 MiB, a header of more
    /// than 100 MiB), rather than writing bytes that cannot be loaded.
    ///
    /// ```
    /// use lazyadam::{DType, Gradient, LazyAdam, LazyAdamConfig, Update};
    ///
    /// let mut opt = LazyAdam::new(LazyAdamConfig::default())?;
    /// let w = opt.add_variable("w", &[2], DType::F32, DType::F32)?;
    /// let mut p = [1.0f32, 2.0];
    /// opt.apply_gradients(&mut [Update::new(w, &mut p, Gradient::dense(&[0.5f32, -0.5]))])?;
    ///
    /// let bytes = opt.to_bytes()?;
    /// assert_eq!(bytes, opt.to_bytes()?); // deterministic
    /// let back = LazyAdam::from_bytes(&bytes)?;
    /// assert_eq!(back.get_weights(), opt.get_weights());
    ///
    /// let mut corrupt = bytes.clone();
    /// let last = corrupt.len() - 1;
    /// corrupt[last] ^= 1; // one flipped bit in the data
    /// assert!(LazyAdam::from_bytes(&corrupt).is_err());
    /// # Ok::<(), lazyadam::Error>(())
    /// ```
    pub fn to_bytes(&self) -> Result<Vec<u8>, Error> {
        let config = self.config.to_keras_json()?;
        let infos: Vec<VariableInfo> = self.vars.iter().map(|v| v.info.clone()).collect();
        let vars: Vec<Value> = infos
            .iter()
            .map(|info| {
                json!({
                    "name": info.name,
                    "shape": info.shape,
                    "param_dtype": info.param_dtype.name(),
                    "moment_dtype": info.moment_dtype.name(),
                })
            })
            .collect();
        let loss_scale = match self.loss_scale {
            Some(l) => json!({"scale": l.scale, "good_steps": l.good_steps}),
            None => Value::Null,
        };
        let extensions = self.ext.to_value().to_string();
        let variables = Value::Array(vars).to_string();
        let loss_scale = loss_scale.to_string();
        let meta = [
            config.as_str(),
            extensions.as_str(),
            CHECKPOINT_FORMAT,
            loss_scale.as_str(),
            variables.as_str(),
        ];

        // What `from_bytes` would refuse is not written: the limits below are
        // the ones it reads with.
        let unreadable =
            |what: String| ck(format!("cannot save: {what}, which no checkpoint reads"));
        if let Some(info) = infos.iter().find(|i| i.shape.len() > MAX_RANK) {
            return Err(unreadable(format!(
                "variable `{}` has {} dimensions, more than {MAX_RANK}",
                info.name,
                info.shape.len()
            )));
        }
        for (k, v) in META_KEYS.iter().zip(meta) {
            let cap = meta_cap(k);
            if v.len() > cap {
                return Err(unreadable(format!(
                    "metadata `{k}` is {} bytes, more than {cap}",
                    v.len()
                )));
            }
        }
        let vhat = self.config.amsgrad;
        let specs = specs(&infos, vhat, &self.ext);
        let mut data: Vec<Cow<'_, [u8]>> = Vec::with_capacity(specs.len());
        data.push(Cow::Owned((self.iterations as i64).to_le_bytes().to_vec()));
        for v in &self.vars {
            data.push(Cow::Borrowed(v.m.bytes()));
            data.push(Cow::Borrowed(v.v.bytes()));
            if let Some(s) = &v.vhat {
                data.push(Cow::Borrowed(s.bytes()));
            }
            if let Some(c) = &v.row_steps {
                data.push(Cow::Owned(u64s_as_i64_bytes(c)));
            }
            if let Some(c) = &v.last_step {
                data.push(Cow::Owned(u64s_as_i64_bytes(c)));
            }
        }
        if data.len() != specs.len() {
            return Err(ck("internal: tensors and their specifications disagree"));
        }
        let sum = checksum(meta, specs.iter().zip(data.iter().map(|d| &d[..])));

        let mut header = String::from("{\"__metadata__\":");
        let mut m = serde_json::Map::new();
        m.insert("checksum".into(), Value::String(format!("{sum:016x}")));
        for (k, v) in META_KEYS.iter().zip(meta) {
            m.insert((*k).into(), Value::String(v.to_string()));
        }
        header.push_str(&Value::Object(m).to_string());
        let mut offset = 0usize;
        let order = data_order(&specs);
        for &i in &order {
            let s = &specs[i];
            let end = offset + data[i].len();
            header.push(',');
            header.push_str(&Value::String(s.name.clone()).to_string());
            header.push(':');
            header.push_str(
                &json!({"dtype": s.dtype.name(), "shape": s.shape, "data_offsets": [offset, end]})
                    .to_string(),
            );
            offset = end;
        }
        header.push('}');
        while !header.len().is_multiple_of(8) {
            header.push(' ');
        }
        if header.len() as u64 > MAX_HEADER {
            return Err(unreadable(format!(
                "a header of {} bytes, more than {MAX_HEADER}",
                header.len()
            )));
        }
        let mut out = Vec::new();
        out.try_reserve_exact(8 + header.len() + offset)
            .map_err(|_| Error::OutOfMemory {
                what: "checkpoint bytes".into(),
            })?;
        out.extend_from_slice(&(header.len() as u64).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        for &i in &order {
            out.extend_from_slice(&data[i]);
        }
        Ok(out)
    }

    /// Restores an optimizer written by [`LazyAdam::to_bytes`].
    ///
    /// Corrupt, truncated, inconsistent or forged bytes are an
    /// [`Error::Checkpoint`] (never a panic): the checksum must match, every
    /// declared tensor must be present with its declared dtype and shape,
    /// the tensors must tile the data exactly, and counters must be in range.
    /// Sizes are checked against the bytes before anything is allocated, and
    /// the header is parsed only as far as the checkpoint's own declarations
    /// allow.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        if bytes.len() < 8 {
            return Err(ck(format!(
                "{} bytes: too short for a safetensors file",
                bytes.len()
            )));
        }
        let mut n8 = [0u8; 8];
        n8.copy_from_slice(&bytes[..8]);
        let n = u64::from_le_bytes(n8);
        let rest = (bytes.len() - 8) as u64;
        if n > rest || n > MAX_HEADER {
            return Err(ck(format!(
                "header length {n} exceeds the file ({rest} bytes after the length) or the \
                 {MAX_HEADER}-byte limit"
            )));
        }
        let (header, data) = bytes[8..].split_at(n as usize);
        let parsed = parse_header(header)?;
        let Header {
            meta,
            config,
            ext,
            infos,
            specs,
            entries,
        } = parsed;

        // Every declared tensor, with its shape, tiling the data exactly.
        let mut ranges: Vec<(usize, usize, usize)> = Vec::with_capacity(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            let e = entries[i]
                .as_ref()
                .ok_or_else(|| ck(format!("tensor `{}` missing", spec.name)))?;
            let len = spec
                .byte_len()
                .ok_or_else(|| ck(format!("tensor `{}`: size overflows", spec.name)))?;
            let [begin, end] = e.data_offsets;
            if end < begin || (end - begin) as u128 != len as u128 {
                return Err(ck(format!(
                    "tensor `{}`: data offsets [{begin}, {end}] do not hold {len} bytes",
                    spec.name
                )));
            }
            ranges.push((begin as usize, end as usize, i));
        }
        ranges.sort_unstable();
        let mut at = 0usize;
        for &(begin, end, i) in &ranges {
            if begin != at {
                return Err(ck(format!(
                    "tensor `{}` starts at byte {begin} of the data, expected {at} (tensors \
                     must tile the data)",
                    specs[i].name
                )));
            }
            at = end;
        }
        if at != data.len() {
            return Err(ck(format!(
                "the tensors cover {at} bytes of data, the file has {}",
                data.len()
            )));
        }
        let mut tensor_data: Vec<&[u8]> = vec![&[]; specs.len()];
        for &(begin, end, i) in &ranges {
            tensor_data[i] = &data[begin..end];
        }
        let sum = checksum(
            [
                meta.config.as_str(),
                meta.extensions.as_str(),
                meta.format.as_str(),
                meta.loss_scale.as_str(),
                meta.variables.as_str(),
            ],
            specs.iter().zip(tensor_data.iter().copied()),
        );
        if format!("{sum:016x}") != meta.checksum {
            return Err(ck(format!(
                "checksum mismatch: the file says {}, its contents give {sum:016x} (the file is \
                 corrupt or was edited)",
                meta.checksum
            )));
        }

        // Everything is backed by the bytes: build.
        let read_i64 = |b: &[u8]| {
            let mut w = [0u8; 8];
            w.copy_from_slice(b);
            i64::from_le_bytes(w)
        };
        let iterations = read_i64(tensor_data[0]);
        if iterations < 0 {
            return Err(ck(format!("`iterations` is negative ({iterations})")));
        }
        let iterations = iterations as u64;
        let mut opt = LazyAdam::with_extensions(config, ext)?;
        let mut k = 1;
        for info in infos {
            let name = info.name.clone();
            let id = opt.add_variable(&name, &info.shape, info.param_dtype, info.moment_dtype)?;
            let var: &mut VarState = &mut opt.vars[id.index];
            fill_store(&mut var.m, tensor_data[k]);
            fill_store(&mut var.v, tensor_data[k + 1]);
            k += 2;
            // A second moment is never negative (see `Store::first_negative`).
            let mut second = vec![(&var.v, k - 1)];
            if let Some(vh) = var.vhat.as_mut() {
                fill_store(vh, tensor_data[k]);
                second.push((&*vh, k));
                k += 1;
            }
            for (store, at) in second {
                if let Some((i, x)) = store.first_negative() {
                    return Err(ck(format!(
                        "tensor `{}`: element {i} is {x}, but a second moment is never negative",
                        specs[at].name
                    )));
                }
            }
            for counts in [var.row_steps.as_mut(), var.last_step.as_mut()]
                .into_iter()
                .flatten()
            {
                for (c, b) in counts.iter_mut().zip(tensor_data[k].chunks_exact(8)) {
                    let x = read_i64(b);
                    if x < 0 || x as u64 > iterations {
                        return Err(ck(format!(
                            "tensor `{}`: counter {x} out of range (0..={iterations})",
                            specs[k].name
                        )));
                    }
                    *c = x as u64;
                }
                k += 1;
            }
        }
        opt.iterations = iterations;
        let loss: Value = crate::json::parse_strict(&meta.loss_scale)
            .map_err(|e| ck(format!("metadata `loss_scale`: {e}")))?;
        match (&loss, opt.loss_scale.as_mut()) {
            (Value::Null, None) => {}
            (Value::Null, Some(_)) => {
                return Err(ck("no `loss_scale` state for a loss-scale policy"));
            }
            (v, Some(ls)) => {
                let bad = || ck(format!("bad `loss_scale` state {v}"));
                let obj = v.as_object().ok_or_else(bad)?;
                if obj.len() != 2 {
                    return Err(bad());
                }
                let scale = obj.get("scale").and_then(Value::as_f64).ok_or_else(bad)?;
                let good = obj
                    .get("good_steps")
                    .and_then(Value::as_u64)
                    .ok_or_else(bad)?;
                let interval = match &opt.ext.non_finite {
                    NonFinitePolicy::SkipStep {
                        loss_scale: Some(cfg),
                    } => cfg.growth_interval,
                    _ => return Err(bad()),
                };
                let scale32 = scale as f32;
                if scale32 as f64 != scale
                    || !(scale32.is_finite() && scale32 >= f32::MIN_POSITIVE)
                    || good >= interval
                {
                    return Err(bad());
                }
                *ls = LossScaleState {
                    scale: scale32,
                    good_steps: good,
                };
            }
            (_, None) => return Err(ck("`loss_scale` state without a loss-scale policy")),
        }
        Ok(opt)
    }

    /// Writes [`LazyAdam::to_bytes`] to a file. A file error names the path
    /// ([`Error::File`]).
    ///
    /// ```
    /// use lazyadam::{LazyAdam, LazyAdamConfig};
    /// let mut opt = LazyAdam::new(LazyAdamConfig::default())?;
    /// opt.add_variable("emb", &[10, 4], lazyadam::DType::F32, lazyadam::DType::F32)?;
    /// let path = std::env::temp_dir().join(format!("lazyadam-doc-{}.safetensors", std::process::id()));
    /// opt.save(&path)?;
    /// let back = LazyAdam::load(&path)?;
    /// assert!(back.variable_id("emb").is_some());
    /// # std::fs::remove_file(&path).ok();
    /// let missing = LazyAdam::load("/nonexistent/state.safetensors").unwrap_err();
    /// assert!(missing.to_string().contains("/nonexistent/state.safetensors"));
    /// # Ok::<(), lazyadam::Error>(())
    /// ```
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), Error> {
        let bytes = self.to_bytes()?;
        let path = path.as_ref();
        std::fs::write(path, bytes).map_err(|source| Error::File {
            action: "write",
            path: path.to_path_buf(),
            source,
        })
    }

    /// Reads a file written by [`LazyAdam::save`]. A file error names the
    /// path ([`Error::File`]).
    pub fn load(path: impl AsRef<Path>) -> Result<Self, Error> {
        Self::from_bytes(&read_file(path.as_ref())?)
    }

    /// Restores this optimizer's state by variable name from a file written
    /// by [`LazyAdam::save`]: [`LazyAdam::restore_by_name`] with the loaded
    /// state. On error nothing changes.
    pub fn restore_from_file(&mut self, path: impl AsRef<Path>) -> Result<(), Error> {
        self.restore_from_bytes(&read_file(path.as_ref())?)
    }

    /// Restores this optimizer's state by variable name from bytes written by
    /// [`LazyAdam::to_bytes`]: [`LazyAdam::restore_by_name`] with the loaded
    /// state. On error nothing changes.
    pub fn restore_from_bytes(&mut self, bytes: &[u8]) -> Result<(), Error> {
        let saved = Self::from_bytes(bytes)?;
        self.restore_by_name(&saved)
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::File {
        action: "read",
        path: path.to_path_buf(),
        source,
    })
}

/// Copies little-endian elements into a slot (lengths checked by the caller
/// against the shape).
fn fill_store(store: &mut Store, data: &[u8]) {
    match store {
        Store::F32(v) => {
            for (d, b) in v.iter_mut().zip(data.chunks_exact(4)) {
                *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        Store::F16(v) => {
            for (d, b) in v.iter_mut().zip(data.chunks_exact(2)) {
                *d = f16::from_bits(u16::from_le_bytes([b[0], b[1]]));
            }
        }
        Store::BF16(v) => {
            for (d, b) in v.iter_mut().zip(data.chunks_exact(2)) {
                *d = bf16::from_bits(u16::from_le_bytes([b[0], b[1]]));
            }
        }
    }
}

/// The metadata strings.
#[derive(Debug, Default)]
struct Meta {
    checksum: String,
    config: String,
    extensions: String,
    format: String,
    loss_scale: String,
    variables: String,
}

/// A parsed header.
struct Header {
    meta: Meta,
    config: LazyAdamConfig,
    ext: Extensions,
    infos: Vec<VariableInfo>,
    specs: Vec<Spec>,
    /// The entry of each spec, in spec order.
    entries: Vec<Option<Entry>>,
}

/// A tensor entry of the header.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    dtype: String,
    shape: Shape,
    data_offsets: [u64; 2],
}

/// A shape of at most [`MAX_RANK`] dimensions.
#[derive(Debug)]
struct Shape(Vec<u64>);

impl<'de> Deserialize<'de> for Shape {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Shape;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a list of at most {MAX_RANK} dimensions")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Shape, A::Error> {
                let mut v = Vec::new();
                while let Some(x) = seq.next_element::<u64>()? {
                    if v.len() == MAX_RANK {
                        return Err(de::Error::custom(format_args!(
                            "a shape of more than {MAX_RANK} dimensions"
                        )));
                    }
                    v.push(x);
                }
                Ok(Shape(v))
            }
        }
        d.deserialize_seq(V)
    }
}

/// A variable as declared in the `variables` metadata.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VarDecl {
    name: String,
    shape: Shape,
    param_dtype: String,
    moment_dtype: String,
}

/// Parses the header: `__metadata__` first, then only the tensors it
/// declares.
fn parse_header(header: &[u8]) -> Result<Header, Error> {
    let mut de = serde_json::Deserializer::from_slice(header);
    let mut found = None;
    let parsed = HeaderSeed(&mut found)
        .deserialize(&mut de)
        .and_then(|h| de.end().map(|()| h));
    match (parsed, found) {
        (Ok(h), _) => Ok(h),
        // A problem found while parsing, with its own type and message.
        (Err(_), Some(e)) => Err(e),
        (Err(e), None) => Err(ck(format!("header: {e}"))),
    }
}

/// Parses the header; a problem other than JSON syntax is stored in the
/// slot (keeping its type) and stops the parse.
struct HeaderSeed<'a>(&'a mut Option<Error>);

impl<'de> DeserializeSeed<'de> for HeaderSeed<'_> {
    type Value = Header;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Header, D::Error> {
        d.deserialize_map(HeaderVisitor(self.0))
    }
}

struct HeaderVisitor<'a>(&'a mut Option<Error>);

/// Stores `e` and stops the JSON parse.
fn stop<E: de::Error>(slot: &mut Option<Error>, e: Error) -> E {
    *slot = Some(e);
    E::custom("stopped")
}

impl<'de> Visitor<'de> for HeaderVisitor<'_> {
    type Value = Header;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a safetensors header object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        match map.next_key::<Cow<'de, str>>()? {
            Some(k) if k == "__metadata__" => {}
            Some(k) => {
                return Err(stop(
                    self.0,
                    ck(format!(
                        "the header must start with `__metadata__`, found `{k}`"
                    )),
                ));
            }
            None => return Err(stop(self.0, ck("empty header: no `__metadata__`"))),
        }
        let meta: Meta = map.next_value_seed(MetaSeed(&mut *self.0))?;
        if meta.format != CHECKPOINT_FORMAT {
            return Err(stop(
                self.0,
                ck(format!(
                    "unknown format `{}` (this version reads `{CHECKPOINT_FORMAT}`)",
                    meta.format
                )),
            ));
        }
        let (config, ext, infos, specs) = declared(&meta).map_err(|e| stop(self.0, e))?;
        let index: HashMap<&str, usize> = specs
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect();
        let mut entries: Vec<Option<Entry>> = (0..specs.len()).map(|_| None).collect();
        while let Some(k) = map.next_key::<Cow<'de, str>>()? {
            let Some(&i) = index.get(&*k) else {
                return Err(stop(
                    self.0,
                    ck(format!(
                        "unexpected tensor `{k}` (not declared by the metadata)"
                    )),
                ));
            };
            if entries[i].is_some() {
                return Err(stop(self.0, ck(format!("tensor `{k}` listed twice"))));
            }
            let e: Entry = map.next_value()?;
            let spec = &specs[i];
            let shape_ok = e.shape.0.len() == spec.shape.len()
                && e.shape
                    .0
                    .iter()
                    .zip(&spec.shape)
                    .all(|(&a, &b)| a == b as u64);
            if e.dtype != spec.dtype.name() || !shape_ok {
                return Err(stop(
                    self.0,
                    ck(format!(
                        "tensor `{k}` is {} {:?}, expected {} {:?}",
                        e.dtype,
                        e.shape.0,
                        spec.dtype.name(),
                        spec.shape
                    )),
                ));
            }
            entries[i] = Some(e);
        }
        Ok(Header {
            meta,
            config,
            ext,
            infos,
            specs,
            entries,
        })
    }
}

type Declared = (LazyAdamConfig, Extensions, Vec<VariableInfo>, Vec<Spec>);

/// The configuration, extensions, variables and tensors the metadata
/// declares.
fn declared(meta: &Meta) -> Result<Declared, Error> {
    let config = LazyAdamConfig::from_keras_json(&meta.config)?;
    let ext_value = crate::json::parse_strict(&meta.extensions)
        .map_err(|e| ck(format!("metadata `extensions`: {e}")))?;
    let ext = Extensions::from_value(&ext_value)?;
    let decls: Vec<VarDecl> = serde_json::from_str(&meta.variables)
        .map_err(|e| ck(format!("metadata `variables`: {e}")))?;
    let mut infos = Vec::with_capacity(decls.len());
    let mut names = std::collections::HashSet::with_capacity(decls.len());
    for d in decls {
        if !names.insert(d.name.clone()) {
            return Err(ck(format!("variable `{}` declared twice", d.name)));
        }
        let dt = |k: &str, s: &str| {
            dtype_from_name(s).ok_or_else(|| ck(format!("variable `{}`: bad `{k}` `{s}`", d.name)))
        };
        let shape = d
            .shape
            .0
            .iter()
            .map(|&x| usize::try_from(x).ok())
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| ck(format!("variable `{}`: shape too large", d.name)))?;
        infos.push(VariableInfo {
            param_dtype: dt("param_dtype", &d.param_dtype)?,
            moment_dtype: dt("moment_dtype", &d.moment_dtype)?,
            name: d.name,
            shape,
        });
    }
    let specs = specs(&infos, config.amsgrad, &ext);
    Ok((config, ext, infos, specs))
}

/// A string, borrowed from the header when it has no escapes (so that an
/// oversized value is refused before it is copied).
struct Text<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v.to_string())))
            }
            fn visit_string<E>(self, v: String) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

struct MetaSeed<'a>(&'a mut Option<Error>);

impl<'de> DeserializeSeed<'de> for MetaSeed<'_> {
    type Value = Meta;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Meta, D::Error> {
        d.deserialize_map(MetaVisitor(self.0))
    }
}

struct MetaVisitor<'a>(&'a mut Option<Error>);

impl<'de> Visitor<'de> for MetaVisitor<'_> {
    type Value = Meta;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the checkpoint metadata (an object of strings)")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Meta, A::Error> {
        let mut meta = Meta::default();
        let mut seen = [false; 6];
        while let Some(k) = map.next_key::<Cow<'de, str>>()? {
            let (slot, i) = match &*k {
                "checksum" => (&mut meta.checksum, 0),
                "config" => (&mut meta.config, 1),
                "extensions" => (&mut meta.extensions, 2),
                "format" => (&mut meta.format, 3),
                "loss_scale" => (&mut meta.loss_scale, 4),
                "variables" => (&mut meta.variables, 5),
                other => {
                    return Err(stop(self.0, ck(format!("unknown metadata key `{other}`"))));
                }
            };
            if std::mem::replace(&mut seen[i], true) {
                return Err(stop(self.0, ck(format!("metadata key `{k}` given twice"))));
            }
            let Text(v) = map.next_value()?;
            let cap = meta_cap(&k);
            if v.len() > cap {
                return Err(stop(
                    self.0,
                    ck(format!(
                        "metadata `{k}` is {} bytes, more than {cap}",
                        v.len()
                    )),
                ));
            }
            *slot = v.into_owned();
        }
        let names = [
            "checksum",
            "config",
            "extensions",
            "format",
            "loss_scale",
            "variables",
        ];
        if let Some(i) = seen.iter().position(|&s| !s) {
            return Err(stop(self.0, ck(format!("metadata `{}` missing", names[i]))));
        }
        Ok(meta)
    }
}

/// Keeps `MAX_ITERATIONS` and the checkpoint's i64 in step.
const _: () = assert!(MAX_ITERATIONS == i64::MAX as u64);
