//! Per-rank checkpoints of a sharded optimizer, and loading them into any
//! number of ranks (resharding).
//!
//! A shard file holds one rank's rows: the magic `LZASHRD1`, then (all
//! integers u64 little-endian) the rank and the rank count; the variable
//! count, and per variable its kind (1 byte: 0 table, 1 dense), its global
//! rows and row length (a dense variable: 1 and its element count), the rows
//! this rank owned (start, end), its parameter storage type (1 byte) and its
//! parameters' byte length and bytes; then the byte length and bytes of
//! this rank's optimizer ([`LazyAdam::to_bytes`]: configuration, step
//! counter, loss scale, this rank's slots, with their own checksum); last
//! the CRC-64/XZ of everything before it. Every length is checked against
//! the bytes before anything is allocated.

use std::path::{Path, PathBuf};

use lazyadam_kernels::DType;

use super::wire::{Reader, Writer};
use super::{Collective, Kind, Params, REJECTED, ShardedLazyAdam, gathered, owned_rows};
use crate::crc64::Crc64;
use crate::error::Error;
use crate::optimizer::LazyAdam;
use crate::tensor::{WeightData, WeightTensor};

const MAGIC: &[u8; 8] = b"LZASHRD1";

fn ck(msg: impl Into<String>) -> Error {
    Error::Checkpoint(msg.into())
}

/// One variable of a parsed shard.
#[derive(Debug)]
struct SavedVar {
    dense: bool,
    rows: usize,
    dim: usize,
    start: usize,
    end: usize,
    dtype: DType,
    params: Vec<f32>,
}

/// A parsed shard file.
#[derive(Debug)]
struct Shard {
    rank: usize,
    size: usize,
    vars: Vec<SavedVar>,
    state: LazyAdam,
}

fn crc(bytes: &[u8]) -> u64 {
    let mut c = Crc64::new();
    c.update(bytes);
    c.finish()
}

fn parse(bytes: &[u8], which: usize) -> Result<Shard, Error> {
    let bad = |what: &str| ck(format!("shard file {which}: {what}"));
    if bytes.len() < MAGIC.len() + 8 || &bytes[..8] != MAGIC {
        return Err(bad("not a lazyadam shard (magic)"));
    }
    let (body, tail) = bytes.split_at(bytes.len() - 8);
    let mut sum = [0u8; 8];
    sum.copy_from_slice(tail);
    if crc(body) != u64::from_le_bytes(sum) {
        return Err(bad("checksum mismatch"));
    }
    let mut rd = Reader::new(&body[8..], which);
    let m = |e: Error| ck(format!("shard file {which}: {e}"));
    let rank = rd.u64("rank").map_err(m)?;
    let size = rd.u64("rank count").map_err(m)?;
    if size == 0 || rank >= size || size > u32::MAX as u64 {
        return Err(bad(&format!("rank {rank} of {size}")));
    }
    let n = rd.count(42, "variable count").map_err(m)?;
    let mut vars = Vec::with_capacity(n);
    for _ in 0..n {
        let dense = match rd.u8("kind").map_err(m)? {
            0 => false,
            1 => true,
            _ => return Err(bad("unknown variable kind")),
        };
        let rows = rd.u64("rows").map_err(m)?;
        let dim = rd.u64("row length").map_err(m)?;
        let start = rd.u64("start").map_err(m)?;
        let end = rd.u64("end").map_err(m)?;
        let dtype = rd.dtype("parameter dtype").map_err(m)?;
        let len = rd.count(1, "parameter bytes").map_err(m)?;
        let (rows, dim) = (rows as usize, dim as usize);
        let owned = owned_rows(rows, size as usize, rank as usize);
        let expect = if dense {
            (start == 0 && end == 1 && rows == 1).then_some(dim)
        } else {
            (start as usize == owned.start && end as usize == owned.end)
                .then(|| owned.len().checked_mul(dim))
                .flatten()
        };
        if expect.and_then(|e| e.checked_mul(dtype.size_bytes())) != Some(len) {
            return Err(bad(
                "a variable's rows or parameter bytes do not match its shape",
            ));
        }
        let mut params = Vec::new();
        let count = len / dtype.size_bytes();
        rd.values_f32(dtype, count, &mut params, "parameters")
            .map_err(m)?;
        vars.push(SavedVar {
            dense,
            rows,
            dim,
            start: start as usize,
            end: end as usize,
            dtype,
            params,
        });
    }
    let len = rd.count(1, "state bytes").map_err(m)?;
    let state = LazyAdam::from_bytes(rd.take(len, "state").map_err(m)?)
        .map_err(|e| bad(&format!("state: {e}")))?;
    rd.finish().map_err(m)?;
    if state.vars.len() != vars.len() {
        return Err(bad("the state's variables differ from the shard's"));
    }
    for (v, s) in vars.iter().zip(&state.vars) {
        let local_rows = if v.dense { None } else { Some(v.end - v.start) };
        let ok = s.info.param_dtype == v.dtype
            && match local_rows {
                Some(r) => s.info.shape == [r, v.dim],
                None => s.numel == v.dim,
            };
        if !ok {
            return Err(bad(&format!(
                "variable `{}`: the state's shape or dtype differs from the shard's",
                s.info.name
            )));
        }
    }
    Ok(Shard {
        rank: rank as usize,
        size: size as usize,
        vars,
        state,
    })
}

/// Copies `n` elements from `src[from..]` into `dst[to..]` (same variant;
/// ranges checked by the caller).
fn copy(
    dst: &mut WeightData,
    to: usize,
    src: &WeightData,
    from: usize,
    n: usize,
) -> Result<(), Error> {
    fn c<T: Copy>(d: &mut [T], to: usize, s: &[T], from: usize, n: usize) -> Result<(), Error> {
        let (Some(d), Some(s)) = (d.get_mut(to..to + n), s.get(from..from + n)) else {
            return Err(ck("internal: a resharded range is out of bounds"));
        };
        d.copy_from_slice(s);
        Ok(())
    }
    match (dst, src) {
        (WeightData::I64(d), WeightData::I64(s)) => c(d, to, s, from, n),
        (WeightData::F32(d), WeightData::F32(s)) => c(d, to, s, from, n),
        (WeightData::F16(d), WeightData::F16(s)) => c(d, to, s, from, n),
        (WeightData::BF16(d), WeightData::BF16(s)) => c(d, to, s, from, n),
        _ => Err(ck("a slot's storage type differs between shards")),
    }
}

impl<C: Collective> ShardedLazyAdam<C> {
    /// This rank's checkpoint: its rows of every table with their slots, the
    /// dense replicas, the configuration, step counter and loss scale (see
    /// the format in the [module docs](crate::shard)). Deterministic.
    /// Fails for a custom learning-rate schedule, which cannot be written.
    pub fn shard_to_bytes(&self) -> Result<Vec<u8>, Error> {
        let mut w = Writer::default();
        w.bytes(MAGIC);
        w.u64(self.rank() as u64);
        w.u64(self.size() as u64);
        w.u64(self.vars.len() as u64);
        for v in &self.vars {
            let p = v.params.as_ref();
            match v.kind {
                Kind::Table {
                    rows,
                    dim,
                    start,
                    end,
                } => {
                    w.u8(0);
                    [rows, dim, start, end]
                        .iter()
                        .for_each(|&x| w.u64(x as u64));
                }
                Kind::Dense { numel } => {
                    w.u8(1);
                    [1, numel, 0, 1].iter().for_each(|&x| w.u64(x as u64));
                }
            }
            w.dtype(p.dtype());
            w.u64((p.len() * p.dtype().size_bytes()) as u64);
            w.values(&p, 0..p.len());
        }
        let state = self.inner.to_bytes()?;
        w.u64(state.len() as u64);
        w.bytes(&state);
        let sum = crc(&w.0);
        w.u64(sum);
        Ok(w.0)
    }

    /// The file name of rank `rank`'s shard among `size`.
    pub fn shard_file_name(rank: usize, size: usize) -> String {
        format!("shard-{rank:05}-of-{size:05}.lzshard")
    }

    /// Writes this rank's checkpoint into directory `dir` as
    /// [`shard_file_name`](Self::shard_file_name)`(rank, size)`, and returns
    /// its path. Every rank calls it (not collective).
    pub fn save_shard(&self, dir: impl AsRef<Path>) -> Result<PathBuf, Error> {
        let path = dir
            .as_ref()
            .join(Self::shard_file_name(self.rank(), self.size()));
        let bytes = self.shard_to_bytes()?;
        std::fs::write(&path, bytes).map_err(|source| Error::File {
            action: "write",
            path: path.clone(),
            source,
        })?;
        Ok(path)
    }

    /// Restores a sharded optimizer from the shards written by all `N` ranks
    /// of a run (any order), for the ranks of `comm`, which may be any number
    /// `M` (resharding): each rank takes its rows of every table, with their
    /// slots and per-row counters, from whichever shards hold them. The step
    /// counter, loss scale, configuration and dense replicas must agree
    /// across the shards. Collective (one all-gather at the end): if any rank
    /// fails, every rank returns an error.
    ///
    /// Each rank parses every shard; the shards of a run must all be given.
    pub fn from_shards(shards: &[&[u8]], comm: C) -> Result<Self, Error> {
        let mut comm = Some(comm);
        let built = Self::build_from_shards(shards, &mut comm);
        let Some(comm) = comm else {
            // `build_from_shards` consumed the collective: it succeeded.
            let mut opt = built?;
            opt.agree_loaded(None)?;
            return Ok(opt);
        };
        // Failed before the optimizer existed: still take part in the
        // agreement, so that the other ranks do not wait forever.
        let err = match built {
            Err(e) => e,
            Ok(_) => ck("internal: an optimizer was built without its collective"),
        };
        let mut c = comm;
        let mut w = Writer::default();
        w.u64(0);
        w.u8(REJECTED);
        gathered(&mut c, &w.0)?;
        Err(err)
    }

    /// Reads the shard files `dir/shard-*-of-N.lzshard` of one run (see
    /// [`from_shards`](Self::from_shards)).
    pub fn load_shards(dir: impl AsRef<Path>, comm: C) -> Result<Self, Error> {
        let dir = dir.as_ref();
        let read = || -> Result<Vec<Vec<u8>>, Error> {
            let file = |path: PathBuf| {
                std::fs::read(&path).map_err(|source| Error::File {
                    action: "read",
                    path,
                    source,
                })
            };
            let first = file(dir.join(Self::shard_file_name(0, 1)));
            if let Ok(b) = first {
                return Ok(vec![b]);
            }
            // The rank count from any shard file name.
            let entries = std::fs::read_dir(dir).map_err(|source| Error::File {
                action: "list",
                path: dir.to_path_buf(),
                source,
            })?;
            let size = entries
                .filter_map(|e| e.ok())
                .filter_map(|e| {
                    let name = e.file_name().into_string().ok()?;
                    let n = name.strip_suffix(".lzshard")?.rsplit_once("-of-")?.1;
                    n.parse::<usize>().ok()
                })
                .next()
                .ok_or_else(|| ck(format!("no shard files in {}", dir.display())))?;
            (0..size)
                .map(|r| file(dir.join(Self::shard_file_name(r, size))))
                .collect()
        };
        match read() {
            Ok(files) => {
                let refs: Vec<&[u8]> = files.iter().map(|f| f.as_slice()).collect();
                Self::from_shards(&refs, comm)
            }
            Err(e) => {
                // Still take part in the load's agreement (it fails), so that
                // the other ranks do not wait forever; report the file error.
                let _ = Self::from_shards(&[], comm);
                Err(e)
            }
        }
    }

    /// The agreement of a load: every rank's verdict and fingerprint.
    fn agree_loaded(&mut self, local: Option<Error>) -> Result<(), Error> {
        self.agree("load", local.map_or(Ok((Vec::new(), ())), Err))
            .map(|_| ())
    }

    fn build_from_shards(shards: &[&[u8]], comm: &mut Option<C>) -> Result<Self, Error> {
        if shards.is_empty() {
            return Err(ck("no shards given"));
        }
        let parsed: Vec<Shard> = shards
            .iter()
            .enumerate()
            .map(|(i, b)| parse(b, i))
            .collect::<Result<_, _>>()?;
        let n = parsed[0].size;
        let mut order: Vec<Option<&Shard>> = vec![None; n];
        for s in &parsed {
            if s.size != n {
                return Err(ck(format!(
                    "shards of runs with {} and {} ranks",
                    n, s.size
                )));
            }
            if order[s.rank].replace(s).is_some() {
                return Err(ck(format!("rank {}'s shard is given twice", s.rank)));
            }
        }
        let order: Vec<&Shard> = order
            .into_iter()
            .enumerate()
            .map(|(r, s)| s.ok_or_else(|| ck(format!("rank {r}'s shard is missing ({n} ranks)"))))
            .collect::<Result<_, _>>()?;
        let s0 = order[0];
        for s in &order[1..] {
            let same = s.state.iterations == s0.state.iterations
                && s.state.loss_scale == s0.state.loss_scale
                && format!("{:?}{:?}", s.state.config, s.state.ext)
                    == format!("{:?}{:?}", s0.state.config, s0.state.ext)
                && s.vars.len() == s0.vars.len()
                && s.vars
                    .iter()
                    .zip(&s0.vars)
                    .zip(s.state.vars.iter().zip(&s0.state.vars))
                    .all(|((a, b), (sa, sb))| {
                        a.dense == b.dense
                            && a.rows == b.rows
                            && a.dim == b.dim
                            && a.dtype == b.dtype
                            && sa.info.name == sb.info.name
                            && sa.info.moment_dtype == sb.info.moment_dtype
                            && (!a.dense
                                || (a
                                    .params
                                    .iter()
                                    .map(|x| x.to_bits())
                                    .eq(b.params.iter().map(|x| x.to_bits()))
                                    && sa.info.shape == sb.info.shape))
                    });
            if !same {
                return Err(ck(format!(
                    "rank {}'s shard disagrees with rank 0's (variables, configuration, step \
                     counter, loss scale or dense replicas)",
                    s.rank
                )));
            }
        }
        let Some(c) = comm.take() else {
            return Err(ck("internal: no collective"));
        };
        let mut opt =
            ShardedLazyAdam::with_extensions(s0.state.config.clone(), s0.state.ext.clone(), c)?;
        for (v, sv) in s0.vars.iter().zip(&s0.state.vars) {
            let (name, md) = (&sv.info.name, sv.info.moment_dtype);
            if v.dense {
                let id = opt.add_dense(name, &sv.info.shape, v.dtype, md)?;
                let i = opt
                    .inner
                    .index_of(id)
                    .ok_or_else(|| ck("internal: variable"))?;
                opt.vars[i].params = Params::from_f32(v.dtype, &v.params);
            } else {
                opt.add_table(name, v.rows, v.dim, v.dtype, md)?;
            }
        }
        // Slots and counters: start from this rank's (zero) weights, fill
        // each table's rows from the shards that hold them.
        let mut weights = opt.inner.get_weights();
        let old: Vec<Vec<WeightTensor>> = order.iter().map(|s| s.state.get_weights()).collect();
        for w in weights.iter_mut() {
            w.data = match w.name.as_str() {
                "iterations" => WeightData::I64(vec![s0.state.iterations as i64]),
                _ => continue,
            };
        }
        for (i, var) in opt.vars.iter_mut().enumerate() {
            let info = &opt.inner.vars[i].info;
            let Kind::Table {
                dim, start, end, ..
            } = var.kind
            else {
                // Dense: the slots of rank 0's replica.
                for w in weights
                    .iter_mut()
                    .filter(|w| is_slot_of(&w.name, &info.name))
                {
                    if let Some(src) = old[0].iter().find(|o| o.name == w.name) {
                        w.data = src.data.clone();
                    }
                }
                continue;
            };
            // Parameters.
            let mut p = vec![0f32; (end - start) * dim];
            for s in &order {
                let sv = &s.vars[i];
                let (lo, hi) = (sv.start.max(start), sv.end.min(end));
                if lo >= hi {
                    continue;
                }
                p[(lo - start) * dim..(hi - start) * dim]
                    .copy_from_slice(&sv.params[(lo - sv.start) * dim..(hi - sv.start) * dim]);
            }
            var.params = Params::from_f32(info.param_dtype, &p);
            // Slots and per-row counters, by name.
            for w in weights
                .iter_mut()
                .filter(|w| is_slot_of(&w.name, &info.name))
            {
                let per_row = if matches!(w.data, WeightData::I64(_)) {
                    1
                } else {
                    dim
                };
                for s in &order {
                    let sv = &s.vars[i];
                    let (lo, hi) = (sv.start.max(start), sv.end.min(end));
                    if lo >= hi {
                        continue;
                    }
                    let src = old[s.rank]
                        .iter()
                        .find(|o| o.name == w.name)
                        .ok_or_else(|| ck(format!("rank {}'s shard lacks `{}`", s.rank, w.name)))?;
                    copy(
                        &mut w.data,
                        (lo - start) * per_row,
                        &src.data,
                        (lo - sv.start) * per_row,
                        (hi - lo) * per_row,
                    )?;
                }
            }
        }
        opt.inner.set_weights(&weights)?;
        opt.inner.loss_scale = s0.state.loss_scale;
        Ok(opt)
    }
}

/// Whether weight `name` is a slot or per-row counter of variable `var`.
fn is_slot_of(name: &str, var: &str) -> bool {
    name.strip_prefix(var)
        .and_then(|r| r.strip_prefix('/'))
        .is_some_and(|s| ["m", "v", "vhat", "row_steps", "last_step"].contains(&s))
}

impl Params {
    /// Parameters of storage type `d` from exact f32 values.
    fn from_f32(d: DType, v: &[f32]) -> Params {
        match d {
            DType::F32 => Params::F32(v.to_vec()),
            DType::F16 => Params::F16(
                v.iter()
                    .map(|&x| lazyadam_kernels::f16::from_f32(x))
                    .collect(),
            ),
            DType::BF16 => Params::BF16(
                v.iter()
                    .map(|&x| lazyadam_kernels::bf16::from_f32(x))
                    .collect(),
            ),
        }
    }
}
