//! Sharded LazyAdam: embedding tables split by rows across ranks (processes
//! or threads), each rank with its own batch; one sharded step is one
//! single-process step on the concatenation of every rank's batch, in rank
//! order, bit for bit.
//!
//! # How a step runs
//!
//! Every rank calls [`ShardedLazyAdam::step`] with its own gradients. Then:
//!
//! 1. **Check and agree** (one all-gather): each rank validates its
//!    gradients against the *whole* tables (ids below the table's row count,
//!    lengths, the non-finite policy), and sends its verdict, f64 estimates
//!    of the sums of squares of its sparse gradients with their error bounds
//!    (for clipping), under `Error` or `SkipStep` the largest magnitude and
//!    the id count of each table's gradient, its dense gradients, and a
//!    fingerprint of its variables, configuration, step counter and loss
//!    scale. If any rank rejects the step, every rank returns an error
//!    ([`Error::PeerRejected`] on the others) and nothing is written
//!    anywhere.
//! 2. **Dense gradients** are summed over ranks in rank order, in f32
//!    (`((g0 + g1) + g2) + ...`); every rank holds the same sum, and applies
//!    it to its replica of the dense variable. Cost: every rank receives
//!    every rank's dense gradients (`(N - 1) x` their bytes); keep dense
//!    variables small, which they are next to embedding tables. Under
//!    `Error` or `SkipStep` the sum is checked as a single process checks a
//!    gradient (one largest-magnitude pass): under `Error` a non-finite sum
//!    fails the step with [`Error::NonFinite`] on every rank, each holding
//!    the same sum, and nothing is written.
//! 3. **Decide together**: the skip decision of
//!    [`NonFinitePolicy::SkipStep`](crate::NonFinitePolicy::SkipStep) (any
//!    non-finite value on any rank skips the step everywhere, and every rank
//!    backs off the same loss scale), `clipnorm` (the norm of a table's
//!    gradient spans ranks) and `global_clipnorm`. A clipping factor is the
//!    one the exact sum of squares ([`SquareSum`]) gives, which does not
//!    depend on how values are split, so the single-process step gives the
//!    same bits. The ranks' estimates, added in rank order, usually decide
//!    it: when the factor is the same across the whole error bound, it is
//!    the exact sum's. When they do not (a non-finite value, a norm within
//!    the bound of `clipnorm` or of a factor's rounding point), one more
//!    all-gather exchanges the exact sums; every rank knows it is needed
//!    from the agreed figures.
//! 4. **Route** (one all-to-all): every id and its gradient row go to the
//!    rank that owns the row. An owner receives from ranks in rank order,
//!    each in its own order: exactly the concatenated batch restricted to its
//!    rows, so duplicates are summed in the single process's
//!    first-occurrence order. The optimizer keeps the buffers it received
//!    (emptied; each given back when a step's messages to and from that
//!    rank need less than half of it) and writes the next step's messages
//!    into them, each reserved at its exact size: a step like the last one
//!    allocates no exchange buffers, which would otherwise be faulted in
//!    afresh every step once the allocator returned them to the system.
//! 5. **Duplicate sums** (one more all-gather, only when needed): under
//!    `Error` or `SkipStep`, when the global largest magnitude and id count
//!    of a table cannot rule out a duplicate row's sum overflowing (see
//!    [`NonFinitePolicy::Error`](crate::NonFinitePolicy::Error)), every rank
//!    knows it from the agreed figures; each owner sums its duplicated rows
//!    that the bound cannot clear with their own count as its step will, and
//!    the verdicts are shared: any non-finite sum skips
//!    the step everywhere (`SkipStep`), or fails it with
//!    [`Error::NonFiniteSum`] on the owner and [`Error::PeerRejected`]
//!    elsewhere (`Error`). One process decides the same from the same sums.
//! 6. **Update**: each owner runs the ordinary step on its rows (threads as
//!    configured; every result is independent of threads and kernel paths).
//!
//! [`ShardedLazyAdam::fetch_rows`] gives any rank the current values of any
//! rows (one all-gather to agree, two all-to-alls).
//!
//! # Partition
//!
//! A table of `rows` rows over `N` ranks: rank `r` owns rows
//! `rows * r / N .. rows * (r + 1) / N` (contiguous, sizes differing by at
//! most one; a rank may own none).

mod checkpoint;
mod collective;
mod wire;

use std::ops::Range;

use lazyadam_kernels::{DType, GradTransform, SquareSum, bf16, f16};

use crate::config::LazyAdamConfig;
use crate::error::Error;
use crate::extensions::Extensions;
use crate::optimizer::{
    LazyAdam, StepRates, check_sparse, clip_factor, clip_factor_from_estimate, scale_transform,
    sum_of_estimates, sums_need_check,
};
use crate::profile::Timer;
use crate::tensor::{Gradient, RawId, RowIds, StepOutcome, TensorMut, TensorRef, Update, VarId};

pub use collective::{Collective, CollectiveError, ThreadCollective};
use wire::{Reader, Writer};

/// One gradient of a sharded step: a variable and its gradient on this rank.
#[derive(Clone, Copy, Debug)]
pub struct ShardGradient<'a> {
    /// The variable (a handle from the same [`ShardedLazyAdam`]).
    pub var: VarId,
    /// Sparse for tables (ids of the whole table), dense for dense variables.
    pub grad: Gradient<'a>,
}

impl<'a> ShardGradient<'a> {
    /// A variable's gradient on this rank.
    pub fn new(var: VarId, grad: Gradient<'a>) -> Self {
        ShardGradient { var, grad }
    }
}

/// Owned parameter storage of one variable on one rank.
#[derive(Clone, Debug)]
enum Params {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl Params {
    fn zeros(d: DType, n: usize, what: &str) -> Result<Params, Error> {
        fn z<T: Clone + Default>(n: usize, what: &str) -> Result<Vec<T>, Error> {
            let mut v = Vec::new();
            v.try_reserve_exact(n).map_err(|_| Error::OutOfMemory {
                what: what.to_string(),
            })?;
            v.resize(n, T::default());
            Ok(v)
        }
        Ok(match d {
            DType::F32 => Params::F32(z(n, what)?),
            DType::F16 => Params::F16(z(n, what)?),
            DType::BF16 => Params::BF16(z(n, what)?),
        })
    }

    fn as_ref(&self) -> TensorRef<'_> {
        match self {
            Params::F32(v) => TensorRef::F32(v),
            Params::F16(v) => TensorRef::F16(v),
            Params::BF16(v) => TensorRef::BF16(v),
        }
    }

    fn as_mut(&mut self) -> TensorMut<'_> {
        match self {
            Params::F32(v) => TensorMut::F32(v),
            Params::F16(v) => TensorMut::F16(v),
            Params::BF16(v) => TensorMut::BF16(v),
        }
    }
}

/// How a variable is split across ranks.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Kind {
    /// Rows split across ranks; this rank owns `start..end`.
    Table {
        rows: usize,
        dim: usize,
        start: usize,
        end: usize,
    },
    /// Replicated on every rank.
    Dense { numel: usize },
}

#[derive(Clone, Debug)]
struct ShardVar {
    id: VarId,
    kind: Kind,
    params: Params,
}

/// The rows `rank` owns of a table of `rows` rows over `size` ranks.
pub fn owned_rows(rows: usize, size: usize, rank: usize) -> Range<usize> {
    let size = size.max(1) as u128;
    let at = |r: usize| (rows as u128 * (r as u128).min(size) / size) as usize;
    at(rank)..at(rank.saturating_add(1))
}

/// The rank that owns row `id` (`id < rows`) of a table of `rows` rows over
/// `size` ranks.
pub fn owner_of(id: u64, rows: usize, size: usize) -> usize {
    // Rank r owns id iff floor(rows*r/size) <= id < floor(rows*(r+1)/size),
    // that is the largest r with rows*r < (id+1)*size.
    let (rows64, size64) = (rows.max(1) as u64, size.max(1) as u64);
    // u64 arithmetic when it cannot overflow (a 128-bit division is a slow
    // library call, and this runs for every id of a step).
    if let Some(x) = id.checked_add(1).and_then(|i| i.checked_mul(size64)) {
        return (x.div_ceil(rows64) - 1).min(size64 - 1) as usize;
    }
    let (rows, size) = (rows64 as u128, size64 as u128);
    let r = ((id as u128 + 1) * size).div_ceil(rows) - 1;
    r.min(size - 1) as usize
}

/// Appends `values[range]` as f32 (exact; the range is checked by the caller).
fn extend_f32(out: &mut Vec<f32>, values: &TensorRef<'_>, range: Range<usize>) {
    match values {
        TensorRef::F32(s) => out.extend_from_slice(&s[range]),
        TensorRef::F16(s) => out.extend(s[range].iter().map(|x| x.to_f32())),
        TensorRef::BF16(s) => out.extend(s[range].iter().map(|x| x.to_f32())),
    }
}

/// FNV-1a, for the layout fingerprint.
#[derive(Debug)]
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn bytes(&mut self, b: &[u8]) {
        for &x in b {
            self.0 = (self.0 ^ x as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn u64(&mut self, x: u64) {
        self.bytes(&x.to_le_bytes());
    }
}

/// LazyAdam over tables sharded by rows across the ranks of a
/// [`Collective`]: bit-identical to one [`LazyAdam`] stepping on the
/// concatenation of every rank's batch (see the [module docs](crate::shard)).
///
/// Every rank registers the same variables in the same order, with the same
/// configuration, and calls [`step`](Self::step) and
/// [`fetch_rows`](Self::fetch_rows) in the same order (they are
/// collective). The optimizer owns the parameters: this rank's rows of each
/// table, and a replica of each dense variable.
///
/// ```
/// use lazyadam::{DType, Gradient, LazyAdamConfig, ShardGradient, ShardedLazyAdam, ThreadCollective};
///
/// // Two ranks (threads here; MPI processes with lazyadam-mpi).
/// let results: Vec<Vec<f32>> = std::thread::scope(|s| {
///     let joins: Vec<_> = ThreadCollective::group(2)
///         .into_iter()
///         .map(|comm| {
///             s.spawn(move || -> Result<Vec<f32>, lazyadam::Error> {
///                 let mut opt = ShardedLazyAdam::new(LazyAdamConfig::default(), comm)?;
///                 let table = opt.add_table("emb", 4, 2, DType::F32, DType::F32)?;
///                 // Each rank's own batch: rank 0 has rows 0 and 3, rank 1 row 3.
///                 let (ids, grads): (Vec<u32>, Vec<f32>) = if opt.rank() == 0 {
///                     (vec![0, 3], vec![0.1, 0.2, 0.3, 0.4])
///                 } else {
///                     (vec![3], vec![0.5, 0.6])
///                 };
///                 opt.step(&[ShardGradient::new(table, Gradient::sparse(&ids, &grads))])?;
///                 // Every rank can read any row.
///                 opt.fetch_rows(table, &[3u32])
///             })
///         })
///         .collect();
///     joins.into_iter().map(|j| j.join().unwrap().unwrap()).collect()
/// });
/// assert_eq!(results[0], results[1]);
/// assert!(results[0][0] < 0.0); // row 3 moved against its summed gradient
/// ```
#[derive(Debug)]
pub struct ShardedLazyAdam<C: Collective> {
    comm: C,
    inner: LazyAdam,
    vars: Vec<ShardVar>,
    /// Fingerprint of the registered variables and the configuration.
    layout: Fnv,
    /// The last step's exchange buffers, emptied, kept for the next step's
    /// messages: reusing their memory spares a sharded step the allocation
    /// (and, once the allocator returns it to the system, the page faults)
    /// of a few MB of fresh buffers every step.
    spare: Vec<Vec<u8>>,
}

/// Sends bytes and maps the engine's error.
fn gathered<C: Collective>(comm: &mut C, local: &[u8]) -> Result<Vec<Vec<u8>>, Error> {
    let out = comm.all_gather(local);
    one_per_rank(comm.size(), "all_gather", out)
}

fn exchanged<C: Collective>(comm: &mut C, send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, Error> {
    let out = comm.all_to_all(send);
    one_per_rank(comm.size(), "all_to_all", out)
}

/// A collective's result as a typed error, or its buffers if there is one per rank.
fn one_per_rank(
    ranks: usize,
    op: &'static str,
    out: Result<Vec<Vec<u8>>, CollectiveError>,
) -> Result<Vec<Vec<u8>>, Error> {
    let out = out.map_err(|source| Error::Collective { op, source })?;
    if out.len() != ranks {
        return Err(Error::Sharding {
            reason: format!("{op} returned {} buffers for {ranks} ranks", out.len()),
        });
    }
    Ok(out)
}

/// Empties `b`, keeping its memory unless that is more than twice `used`
/// bytes (the most it held this step).
fn emptied(b: &mut Vec<u8>, used: usize) {
    b.clear();
    if b.capacity() / 2 > used {
        b.shrink_to(used);
    }
}

/// Status byte of an agreement message.
const OK: u8 = 0;
const REJECTED: u8 = 1;

impl<C: Collective> ShardedLazyAdam<C> {
    /// A sharded optimizer over the ranks of `comm`.
    pub fn new(config: LazyAdamConfig, comm: C) -> Result<Self, Error> {
        Self::with_extensions(config, Extensions::default(), comm)
    }

    /// A sharded optimizer with extensions.
    pub fn with_extensions(
        config: LazyAdamConfig,
        ext: Extensions,
        comm: C,
    ) -> Result<Self, Error> {
        if comm.size() == 0 || comm.rank() >= comm.size() {
            return Err(Error::Sharding {
                reason: format!(
                    "the collective reports rank {} of {} ranks",
                    comm.rank(),
                    comm.size()
                ),
            });
        }
        let mut layout = Fnv::new();
        layout.u64(comm.size() as u64);
        // The configuration as the ranks see it: hyperparameters and the
        // extensions that change results (not the kernel path nor the
        // parallel threshold: every path and thread count gives the same
        // bits, so ranks on different machines may differ there).
        let mut semantic = ext.clone();
        semantic.kernel = None;
        semantic.parallel_min_elements = 0;
        layout.bytes(format!("{config:?}{semantic:?}").as_bytes());
        let inner = LazyAdam::with_extensions(config, ext)?;
        Ok(ShardedLazyAdam {
            comm,
            inner,
            vars: Vec::new(),
            layout,
            spare: Vec::new(),
        })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// The number of ranks.
    pub fn size(&self) -> usize {
        self.comm.size()
    }

    /// The collective.
    pub fn collective(&self) -> &C {
        &self.comm
    }

    /// This rank's optimizer: its variables are this rank's rows of each
    /// table (shape `[owned rows, dim]`) and the dense variables; its slots
    /// and step counter are this rank's state.
    pub fn local(&self) -> &LazyAdam {
        &self.inner
    }

    /// The step counter (the same on every rank).
    pub fn iterations(&self) -> u64 {
        self.inner.iterations()
    }

    /// Registers an embedding table of `rows` rows of `dim` values, split by
    /// rows across the ranks; this rank stores its rows (parameters at zero
    /// until set through [`params_mut`](Self::params_mut)) and their slots.
    pub fn add_table(
        &mut self,
        name: &str,
        rows: usize,
        dim: usize,
        param_dtype: DType,
        moment_dtype: DType,
    ) -> Result<VarId, Error> {
        if rows.checked_mul(dim).is_none() {
            return Err(Error::InvalidShape {
                variable: name.to_string(),
                reason: format!("{rows} rows of {dim} values overflow"),
            });
        }
        let r = owned_rows(rows, self.size(), self.rank());
        let local = r.len();
        let params = Params::zeros(param_dtype, local * dim, "table parameters")?;
        let id = self
            .inner
            .add_variable(name, &[local, dim], param_dtype, moment_dtype)?;
        if let Some(i) = self.inner.index_of(id) {
            self.inner.vars[i].row_offset = r.start;
        }
        self.note("table", name, &[rows, dim], param_dtype, moment_dtype);
        self.vars.push(ShardVar {
            id,
            kind: Kind::Table {
                rows,
                dim,
                start: r.start,
                end: r.end,
            },
            params,
        });
        Ok(id)
    }

    /// Registers a dense variable, replicated on every rank (parameters at
    /// zero until set through [`params_mut`](Self::params_mut), which every
    /// rank must do alike).
    pub fn add_dense(
        &mut self,
        name: &str,
        shape: &[usize],
        param_dtype: DType,
        moment_dtype: DType,
    ) -> Result<VarId, Error> {
        let numel = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| Error::InvalidShape {
                variable: name.to_string(),
                reason: format!("the element count of {shape:?} overflows"),
            })?;
        let params = Params::zeros(param_dtype, numel, "dense parameters")?;
        let id = self
            .inner
            .add_variable(name, shape, param_dtype, moment_dtype)?;
        self.note("dense", name, shape, param_dtype, moment_dtype);
        self.vars.push(ShardVar {
            id,
            kind: Kind::Dense { numel },
            params,
        });
        Ok(id)
    }

    fn note(&mut self, kind: &str, name: &str, shape: &[usize], p: DType, m: DType) {
        let l = &mut self.layout;
        l.bytes(kind.as_bytes());
        l.u64(name.len() as u64);
        l.bytes(name.as_bytes());
        l.u64(shape.len() as u64);
        shape.iter().for_each(|&d| l.u64(d as u64));
        l.bytes(format!("{p:?}{m:?}").as_bytes());
    }

    fn var(&self, id: VarId) -> Result<(usize, &ShardVar), Error> {
        let i = self
            .inner
            .index_of(id)
            .ok_or_else(|| Error::UnknownVariable {
                variable: format!("{id} (not a variable of this sharded optimizer)"),
            })?;
        Ok((i, &self.vars[i]))
    }

    /// The rows of table `var` this rank owns (`None` for a dense variable or
    /// an unknown handle).
    pub fn owned(&self, var: VarId) -> Option<Range<usize>> {
        match self.var(var).ok()?.1.kind {
            Kind::Table { start, end, .. } => Some(start..end),
            Kind::Dense { .. } => None,
        }
    }

    /// This rank's parameters of `var`: its rows of a table (row-major, row
    /// `owned().start` first), or the whole dense variable.
    pub fn params(&self, var: VarId) -> Option<TensorRef<'_>> {
        Some(self.var(var).ok()?.1.params.as_ref())
    }

    /// This rank's parameters of `var`, writable (to initialize them; a
    /// dense variable's replicas must stay equal on every rank).
    pub fn params_mut(&mut self, var: VarId) -> Option<TensorMut<'_>> {
        let i = self.inner.index_of(var)?;
        Some(self.vars[i].params.as_mut())
    }

    /// The fingerprint every rank must agree on before a collective call.
    fn fingerprint(&self) -> u64 {
        let mut f = Fnv(self.layout.0);
        f.u64(self.inner.iterations());
        f.u64(self.inner.loss_scale().map_or(0, |s| s.to_bits() as u64));
        f.0
    }

    /// Runs the agreement round: every rank's `payload` (after the status
    /// header) and this rank's `kept` value, which goes with its payload and
    /// is not sent; or the error that fails the call on every rank.
    fn agree<T>(
        &mut self,
        op: &'static str,
        local: Result<(Vec<u8>, T), Error>,
    ) -> Result<(Vec<Vec<u8>>, usize, T), Error> {
        let fp = self.fingerprint();
        let mut w = Writer::default();
        w.u64(fp);
        let mine = match local {
            Ok((payload, kept)) => {
                w.u8(OK);
                w.bytes(&payload);
                Ok(kept)
            }
            Err(e) => {
                w.u8(REJECTED);
                Err(e)
            }
        };
        let all = gathered(&mut self.comm, &w.0)?;
        let me = self.rank();
        // A rank's rejection first (its message may carry no fingerprint),
        // then disagreement.
        let mut rejected = None;
        for (r, msg) in all.iter().enumerate() {
            let mut rd = Reader::new(msg, r);
            rd.u64("fingerprint")?;
            if rd.u8("status")? != OK && rejected.is_none() {
                rejected = Some(r);
            }
        }
        let kept = mine?;
        if let Some(rank) = rejected {
            return Err(Error::PeerRejected { rank, op });
        }
        for (r, msg) in all.iter().enumerate() {
            if Reader::new(msg, r).u64("fingerprint")? != fp {
                return Err(Error::Sharding {
                    reason: format!(
                        "rank {r} has other variables, another configuration, step counter or loss \
                         scale than rank {me}"
                    ),
                });
            }
        }
        Ok((all, 9, kept))
    }

    /// Checks this rank's gradients against the whole tables; writes nothing.
    fn check(&self, grads: &[ShardGradient<'_>]) -> Result<(), Error> {
        let mut seen = vec![false; self.vars.len()];
        for g in grads {
            let (i, v) = self.var(g.var)?;
            let name = || self.inner.vars[i].info.name.clone();
            if std::mem::replace(&mut seen[i], true) {
                return Err(Error::DuplicateUpdate { variable: name() });
            }
            match (&v.kind, &g.grad) {
                (Kind::Table { rows, dim, .. }, Gradient::Sparse { ids, values }) => {
                    check_sparse(name, ids, values.len(), *rows, *dim)?;
                }
                (Kind::Table { .. }, Gradient::Dense(_)) => {
                    return Err(Error::Sharding {
                        reason: format!(
                            "variable `{}` is a sharded table: its gradient must be sparse (row ids \
                             and rows)",
                            name()
                        ),
                    });
                }
                (Kind::Dense { numel }, Gradient::Dense(values)) => {
                    if values.len() != *numel {
                        return Err(Error::LengthMismatch {
                            variable: name(),
                            what: "gradient values",
                            expected: *numel,
                            got: values.len(),
                        });
                    }
                }
                (Kind::Dense { .. }, Gradient::Sparse { .. }) => {
                    return Err(Error::Sharding {
                        reason: format!(
                            "variable `{}` is a replicated dense variable: its gradient must be \
                             dense",
                            name()
                        ),
                    });
                }
            }
            // A table's values are checked with its largest magnitude (in
            // `contribution`), dense gradients once summed over ranks.
        }
        Ok(())
    }

    /// One sharded step: collective, every rank calls it with its own
    /// gradients (any subset of the variables, possibly none). The step
    /// applies on every rank or on none.
    ///
    /// Errors: this rank's own validation errors (the same as
    /// [`LazyAdam::apply_gradients`], with ids checked against the whole
    /// table), [`Error::PeerRejected`] when another rank rejected the step,
    /// [`Error::Sharding`] when the ranks disagree on variables,
    /// configuration or step counter, or a table gets a dense gradient,
    /// [`Error::Collective`] when the engine fails. In every case nothing was
    /// written on this rank.
    pub fn step(&mut self, grads: &[ShardGradient<'_>]) -> Result<StepOutcome, Error> {
        let nv = self.vars.len();
        let need_sums =
            self.inner.config.clipnorm.is_some() || self.inner.config.global_clipnorm.is_some();
        let inv_scale = self.inner.inv_scale();
        let base = self.inner.base_transform(inv_scale);
        let skips = self.inner.skips_non_finite();
        let checks = self.inner.checks_non_finite();

        // This rank's verdict and contribution.
        let mut by_var: Vec<Option<Gradient<'_>>> = vec![None; nv];
        // The step's rates are evaluated once, in `contribution`: a second
        // evaluation (of a user schedule) could fail after the agreement on
        // this rank alone, and the others would wait for it in the next round.
        let local = self.contribution(grads, &mut by_var, need_sums, checks);
        let (all, header, rates) = self.agree("step", local)?;

        // Read every rank's contribution: presence, sums, dense gradients.
        let mut present = vec![false; nv];
        // Per variable: the f64 estimate of the sum of squares and its chain
        // depth (`clip_factor_from_estimate`), the ranks' added in rank order.
        let mut estimates = vec![(0.0f64, 0usize); nv];
        let mut dense: Vec<Option<Vec<f32>>> = vec![None; nv];
        let mut non_finite = false;
        // Per table: the largest magnitude's bits and the id count, over ranks.
        let mut max_bits = vec![0u32; nv];
        let mut id_count = vec![0usize; nv];
        for (r, msg) in all.iter().enumerate() {
            let mut rd = Reader::new(msg, r);
            rd.take(header, "header")?;
            for i in 0..nv {
                if rd.u8("presence")? == 0 {
                    continue;
                }
                present[i] = true;
                match self.vars[i].kind {
                    Kind::Table { .. } => {
                        if checks {
                            let m = u32::try_from(rd.u64("largest magnitude")?)
                                .ok()
                                .filter(|&b| b <= 0x7FFF_FFFF)
                                .ok_or_else(|| rd.malformed("largest magnitude"))?;
                            max_bits[i] = max_bits[i].max(m);
                            let n = usize::try_from(rd.u64("id count")?)
                                .ok()
                                .and_then(|n| id_count[i].checked_add(n))
                                .ok_or_else(|| rd.malformed("id count"))?;
                            id_count[i] = n;
                        }
                        if need_sums {
                            // A sum of squares: not negative (NaN or +inf
                            // from non-finite values).
                            let e = f64::from_bits(rd.u64("sum of squares estimate")?);
                            if e < 0.0 {
                                return Err(rd.malformed("sum of squares estimate"));
                            }
                            // One more addition a rank.
                            let (sum, depth) = estimates[i];
                            let d = usize::try_from(rd.u64("chain depth")?)
                                .ok()
                                .and_then(|d| depth.checked_add(d)?.checked_add(1))
                                .ok_or_else(|| rd.malformed("chain depth"))?;
                            estimates[i] = (sum + e, d);
                        }
                    }
                    Kind::Dense { numel } => {
                        let d = rd.dtype("dtype")?;
                        let n = rd.count(d.size_bytes(), "dense length")?;
                        if n != numel {
                            return Err(rd.malformed("dense length"));
                        }
                        match &mut dense[i] {
                            None => {
                                let mut v = Vec::with_capacity(n);
                                rd.values_f32(d, n, &mut v, "dense values")?;
                                dense[i] = Some(v);
                            }
                            Some(acc) => {
                                let mut v = Vec::with_capacity(n);
                                rd.values_f32(d, n, &mut v, "dense values")?;
                                acc.iter_mut().zip(&v).for_each(|(a, x)| *a += *x);
                            }
                        }
                    }
                }
            }
            non_finite |= rd.u8("non-finite flag")? != 0;
            rd.finish()?;
        }

        // The summed dense gradients: the non-finite policy and estimates of
        // the sums of squares (identical on every rank: the same sums, and an
        // estimate is the same on every kernel path and thread count).
        for i in 0..nv {
            if let Some(g) = &dense[i] {
                let values = TensorRef::F32(g);
                // (Under SkipStep, once one value is known to skip, no more.)
                let grad = Gradient::Dense(values);
                let check = checks && !(skips && non_finite);
                if check && need_sums {
                    // One pass for both.
                    let (_, skip, e) = self
                        .inner
                        .check_values_and_estimate(i, &grad, inv_scale, &base)?;
                    non_finite |= skip;
                    estimates[i] = e;
                } else if check {
                    non_finite |= self.inner.check_values(i, &grad, inv_scale)?.1;
                } else if need_sums {
                    estimates[i] = self.inner.square_estimate(&values, &base);
                }
            }
        }
        if skips && non_finite {
            self.inner.skip_step();
            return Ok(StepOutcome::Skipped);
        }

        // Clipping, decided from the agreed estimates where they decide (the
        // same figures on every rank, so the same decisions), else from exact
        // sums: the single process's factors either way.
        let mut transforms = vec![base; nv];
        let clipnorm = self.inner.config.clipnorm;
        let global_clipnorm = self.inner.config.global_clipnorm;
        // `Some(factor)` once decided; `None` until then.
        let mut factors: Vec<Option<Option<f32>>> = vec![Some(None); nv];
        let mut global = Some(None);
        if let Some(c) = clipnorm {
            for i in (0..nv).filter(|&i| present[i]) {
                let (e, d) = estimates[i];
                factors[i] = clip_factor_from_estimate(e, d, c, false);
            }
        }
        if let Some(c) = global_clipnorm {
            // `clipnorm` and `global_clipnorm` exclude each other (as in
            // Keras; the configuration refuses both), so the estimates of the
            // agreement round are those of the transformed values. Added in
            // variable order, as one process adds its updates' (an absent
            // variable's (0, 0) changes no sum).
            let (e, d) = sum_of_estimates(estimates.iter().copied());
            global = clip_factor_from_estimate(e, d, c, true);
        }
        let exact: Vec<bool> = (0..nv)
            .map(|i| present[i] && (factors[i].is_none() || global.is_none()))
            .collect();
        if exact.contains(&true) {
            let sums = self.exact_sums(&exact, &by_var, &dense, &base)?;
            if let Some(c) = clipnorm {
                for i in (0..nv).filter(|&i| exact[i]) {
                    factors[i] = Some(clip_factor(sums[i].to_f64(), c, false));
                }
            }
            if let Some(c) = global_clipnorm.filter(|_| global.is_none()) {
                let mut total = SquareSum::ZERO;
                sums.iter().for_each(|s| total.merge(s));
                global = Some(clip_factor(total.to_f64(), c, true));
            }
        }
        for (t, f) in transforms.iter_mut().zip(&factors) {
            if let Some(Some(f)) = *f {
                scale_transform(t, f);
            }
        }
        if let Some(Some(f)) = global {
            transforms.iter_mut().for_each(|t| scale_transform(t, f));
        }

        // Route the table rows to their owners (with one rank, nothing to route).
        let single = self.size() == 1;
        let routed = if single {
            vec![None; nv]
        } else {
            self.route(&by_var, &present)?
        };

        // Duplicate rows whose sums the bound cannot clear (every rank decides
        // alike, from the agreed magnitudes and counts): each owner sums its
        // rows exactly as its step will, and one more agreement round shares
        // the verdict. Under SkipStep any non-finite sum skips the step
        // everywhere; under Error the owner's error fails it everywhere.
        let check_sums: Vec<bool> = (0..nv)
            .map(|i| {
                checks
                    && present[i]
                    && matches!(self.vars[i].kind, Kind::Table { .. })
                    && sums_need_check(f32::from_bits(max_bits[i]), id_count[i], inv_scale)
            })
            .collect();
        if check_sums.iter().any(|&c| c) {
            let mut verdict = Ok(());
            for i in (0..nv).filter(|&i| check_sums[i]) {
                let grad = match (&routed[i], by_var[i]) {
                    (Some((ids, vals)), _) => {
                        Gradient::sparse(RowIds::U64(ids), TensorRef::F32(vals))
                    }
                    (None, Some(g)) if single => g,
                    _ => continue,
                };
                let m = f32::from_bits(max_bits[i]);
                // The step groups its ids again (`write_step` gets no
                // grouping from here).
                verdict = self
                    .inner
                    .non_finite_sum(i, &grad, &transforms[i], m, inv_scale)
                    .map(|_| ());
                if verdict.is_err() {
                    break;
                }
            }
            let local = match verdict {
                Ok(()) => Ok((vec![0u8], ())),
                Err(Error::NonFiniteSum { .. }) if skips => Ok((vec![1u8], ())),
                Err(e) => Err(e),
            };
            let (all, header, ()) = self.agree("step", local)?;
            let mut skip = false;
            for (r, msg) in all.iter().enumerate() {
                let mut rd = Reader::new(msg, r);
                rd.take(header, "header")?;
                skip |= rd.u8("sum verdict")? != 0;
                rd.finish()?;
            }
            if skip {
                self.inner.skip_step();
                return Ok(StepOutcome::Skipped);
            }
        }

        // Apply: this rank's rows of each table, and the dense replicas.
        let mut updates = Vec::new();
        let mut ts = Vec::new();
        let mut rest: &mut [ShardVar] = &mut self.vars;
        let mut i = 0;
        while let Some((v, tail)) = rest.split_first_mut() {
            rest = tail;
            let k = i;
            i += 1;
            if !present[k] {
                continue;
            }
            let grad = match (&v.kind, &routed[k], &dense[k]) {
                // One rank: its own gradient, as given (nothing was routed).
                (Kind::Table { .. }, _, _) if single && by_var[k].is_some() => {
                    by_var[k].unwrap_or(Gradient::Dense(TensorRef::F32(&[])))
                }
                (Kind::Table { .. }, Some((ids, vals)), _) => {
                    Gradient::sparse(RowIds::U64(ids), TensorRef::F32(vals))
                }
                (Kind::Dense { .. }, _, Some(g)) => Gradient::dense(TensorRef::F32(g)),
                _ => continue,
            };
            updates.push(Update::new(v.id, v.params.as_mut(), grad));
            ts.push(transforms[k]);
        }
        // Validated by construction (ids inside this rank's rows, lengths);
        // checked again so that a broken invariant is an error, not a panic.
        self.inner.validate(&updates)?;
        let mut timer = Timer::start();
        let r = self
            .inner
            .write_step(&mut updates, &ts, rates, None, &mut timer);
        timer.finish();
        r
    }

    /// The exact sums of squares of the transformed values of the variables
    /// marked in `exact` (zero for the rest), for the clipping norms the
    /// estimates did not decide. A dense variable's from the summed gradient
    /// every rank holds; a table's from one more all-gather, in which each
    /// rank sends the exact sums of its own values of every marked table,
    /// merged over ranks (an exact sum, so in any order). Every rank calls
    /// this or none does: `exact` comes from the agreed figures.
    fn exact_sums(
        &mut self,
        exact: &[bool],
        by_var: &[Option<Gradient<'_>>],
        dense: &[Option<Vec<f32>>],
        base: &GradTransform,
    ) -> Result<Vec<SquareSum>, Error> {
        let nv = self.vars.len();
        let mut sums = vec![SquareSum::ZERO; nv];
        let tables: Vec<usize> = (0..nv)
            .filter(|&i| exact[i] && matches!(self.vars[i].kind, Kind::Table { .. }))
            .collect();
        for i in (0..nv).filter(|&i| exact[i]) {
            if let Some(g) = &dense[i] {
                sums[i] = self.inner.square_sum(&TensorRef::F32(g), base);
            }
        }
        if tables.is_empty() {
            return Ok(sums);
        }
        let mut w = Writer::default();
        for &i in &tables {
            let s = match by_var[i] {
                Some(Gradient::Sparse { values, .. }) => self.inner.square_sum(&values, base),
                _ => SquareSum::ZERO,
            };
            w.bytes(&s.to_bytes());
        }
        let (all, header, ()) = self.agree("step", Ok((w.0, ())))?;
        for (r, msg) in all.iter().enumerate() {
            let mut rd = Reader::new(msg, r);
            rd.take(header, "header")?;
            for &i in &tables {
                let what = "exact sum of squares";
                let b = rd.take(SquareSum::BYTES, what)?;
                let s = SquareSum::from_bytes(b).ok_or_else(|| rd.malformed(what))?;
                sums[i].merge(&s);
            }
            rd.finish()?;
        }
        Ok(sums)
    }

    /// This rank's verdict on its gradients, and its message of the
    /// agreement round: per variable a presence byte, then for a table,
    /// under `Error` or `SkipStep`, the largest magnitude and the id count
    /// of its gradient, and when clipping needs it the f64 estimate of the
    /// sum of squares of its transformed values with its chain depth
    /// ([`LazyAdam::square_estimate`]); for a dense variable its gradient;
    /// last, whether a value is non-finite (under `SkipStep`). Fills
    /// `by_var` with the gradient of each variable.
    fn contribution<'g>(
        &mut self,
        grads: &[ShardGradient<'g>],
        by_var: &mut [Option<Gradient<'g>>],
        need_sums: bool,
        checks: bool,
    ) -> Result<(Vec<u8>, StepRates), Error> {
        self.check(grads)?;
        let inv_scale = self.inner.inv_scale();
        let base = self.inner.base_transform(inv_scale);
        for g in grads {
            if let Some(i) = self.inner.index_of(g.var) {
                by_var[i] = Some(g.grad);
            }
        }
        let mut w = Writer::default();
        let mut non_finite = false;
        for (i, g) in by_var.iter().enumerate() {
            let Some(g) = g else {
                w.u8(0);
                continue;
            };
            w.u8(1);
            match (&self.vars[i].kind, g) {
                (Kind::Table { .. }, Gradient::Sparse { ids, values }) => {
                    // The largest magnitude (non-negative, or NaN) and the
                    // id count bound every rank's duplicate sums; with the
                    // estimate of the sum of squares, from one pass.
                    let (m, estimate) = match (checks, need_sums) {
                        (true, true) => {
                            let (m, skip, e) = self
                                .inner
                                .check_values_and_estimate(i, g, inv_scale, &base)?;
                            non_finite |= skip;
                            (Some(m), Some(e))
                        }
                        (true, false) => {
                            let (m, skip) = self.inner.check_values(i, g, inv_scale)?;
                            non_finite |= skip;
                            (Some(m), None)
                        }
                        (false, true) => (None, Some(self.inner.square_estimate(values, &base))),
                        (false, false) => (None, None),
                    };
                    if let Some(m) = m {
                        w.u64(m.to_bits() as u64);
                        w.u64(ids.len() as u64);
                    }
                    if let Some((e, depth)) = estimate {
                        w.u64(e.to_bits());
                        w.u64(depth as u64);
                    }
                }
                (Kind::Dense { .. }, Gradient::Dense(values)) => {
                    w.dtype(values.dtype());
                    w.u64(values.len() as u64);
                    w.values(values, 0..values.len());
                }
                // Refused by `check`.
                _ => {}
            }
        }
        w.u8(non_finite as u8);
        // After the values' check, as in a single-process step.
        let rates = self.inner.step_rates()?;
        Ok((w.0, rates))
    }

    /// The all-to-all of a step's sparse gradients: for each table present
    /// anywhere, this rank's received ids (local rows) and values (f32), in
    /// rank order.
    #[allow(clippy::type_complexity)]
    fn route(
        &mut self,
        by_var: &[Option<Gradient<'_>>],
        present: &[bool],
    ) -> Result<Vec<Option<(Vec<u64>, Vec<f32>)>>, Error> {
        let nv = self.vars.len();
        let size = self.size();
        let any_table =
            (0..nv).any(|i| present[i] && matches!(self.vars[i].kind, Kind::Table { .. }));
        let mut out: Vec<Option<(Vec<u64>, Vec<f32>)>> = vec![None; nv];
        if !any_table {
            return Ok(out);
        }
        let me = self.rank();
        // Each destination's message in the buffer of the last message from
        // that rank (about its size, if batches are alike).
        let mut spare = std::mem::take(&mut self.spare).into_iter();
        let mut send: Vec<Writer> = (0..size)
            .map(|_| Writer(spare.next().unwrap_or_default()))
            .collect();
        // This rank's own part of each table's gradient (positions in its id
        // list): it does not go through the collective.
        let mut mine: Vec<Vec<usize>> = vec![Vec::new(); nv];
        for i in 0..nv {
            let Kind::Table { rows, dim, .. } = self.vars[i].kind else {
                continue;
            };
            if !present[i] {
                continue;
            }
            let Some(Gradient::Sparse { ids, values }) = by_var[i] else {
                send.iter_mut().for_each(|w| w.u64(0));
                continue;
            };
            // Positions grouped by owner, each group in id-list order.
            let n = ids.len();
            let id_at = |j: usize| ids.get(j).and_then(|r| r.ok()).unwrap_or(0);
            let owner: Vec<u32> = (0..n)
                .map(|j| owner_of(id_at(j), rows, size) as u32)
                .collect();
            let mut counts = vec![0usize; size + 1];
            for &o in &owner {
                counts[o as usize + 1] += 1;
            }
            for d in 0..size {
                counts[d + 1] += counts[d];
            }
            let mut order = vec![0usize; n];
            let mut next = counts.clone();
            for (j, &o) in owner.iter().enumerate() {
                order[next[o as usize]] = j;
                next[o as usize] += 1;
            }
            mine[i] = order[counts[me]..counts[me + 1]].to_vec();
            for (d, w) in send.iter_mut().enumerate() {
                if d == me {
                    continue;
                }
                let group = &order[counts[d]..counts[d + 1]];
                // The message's exact size, so that it grows at most once.
                let row_bytes = dim.saturating_mul(values.dtype().size_bytes());
                w.0.reserve(
                    group
                        .len()
                        .saturating_mul(row_bytes.saturating_add(8))
                        .saturating_add(9),
                );
                w.u64(group.len() as u64);
                if group.is_empty() {
                    continue;
                }
                w.dtype(values.dtype());
                group.iter().for_each(|&j| w.u64(id_at(j)));
                group
                    .iter()
                    .for_each(|&j| w.values(&values, j * dim..(j + 1) * dim));
            }
        }
        let sent: Vec<usize> = send.iter().map(|w| w.0.len()).collect();
        let recv = exchanged(&mut self.comm, send.into_iter().map(|w| w.0).collect())?;
        let mut readers: Vec<Reader<'_>> = recv
            .iter()
            .enumerate()
            .map(|(r, m)| Reader::new(m, r))
            .collect();
        // Bytes that arrived from every rank: caps each table's reservation.
        let received: usize = recv.iter().map(Vec::len).sum();
        for i in 0..nv {
            let Kind::Table {
                dim, start, end, ..
            } = self.vars[i].kind
            else {
                continue;
            };
            if !present[i] {
                continue;
            }
            // Every rank's ids first (this rank's own among them, in rank
            // order), then the rows in the same order, so that the rows'
            // vector is reserved once at its full size: growing it would
            // copy the rows read so far.
            let own = match by_var[i] {
                Some(Gradient::Sparse { ids: src, values }) => Some((src, values)),
                _ => None,
            };
            let mut ids = Vec::new();
            // Per rank: the rows' storage type and value count (none for this
            // rank or an empty part).
            let mut parts: Vec<Option<(DType, usize)>> = vec![None; size];
            let own_values = mine[i].len().saturating_mul(dim);
            let mut values = own_values;
            for (r, rd) in readers.iter_mut().enumerate() {
                if r == me {
                    if let Some((src, _)) = own {
                        ids.extend(mine[i].iter().map(|&j| {
                            let id = src.get(j).and_then(|x| x.ok()).unwrap_or(0);
                            id.wrapping_sub(start as u64)
                        }));
                    }
                    continue;
                }
                let n = rd.count(8, "id count")?;
                if n == 0 {
                    continue;
                }
                let d = rd.dtype("dtype")?;
                // `n` ids are in the message (checked by `count`).
                ids.reserve(n);
                for _ in 0..n {
                    let id = rd.u64("id")?;
                    if id < start as u64 || id >= end as u64 {
                        return Err(rd.malformed("an id this rank does not own"));
                    }
                    ids.push(id - start as u64);
                }
                // The rows follow in the message (checked by `values_f32`
                // before it reserves or reads anything).
                let m = n
                    .checked_mul(dim)
                    .ok_or_else(|| rd.malformed("row count"))?;
                parts[r] = Some((d, m));
                values = values.saturating_add(m);
            }
            // At most what the messages and this rank's own rows hold: each
            // received value takes at least two bytes of a message that
            // arrived, so this is not a size an attacker can inflate.
            let mut vals = Vec::with_capacity(values.min(own_values.saturating_add(received / 2)));
            for (r, rd) in readers.iter_mut().enumerate() {
                if r == me {
                    if let Some((_, src)) = own {
                        for &j in &mine[i] {
                            extend_f32(&mut vals, &src, j * dim..(j + 1) * dim);
                        }
                    }
                } else if let Some((d, m)) = parts[r] {
                    rd.values_f32(d, m, &mut vals, "rows")?;
                }
            }
            out[i] = Some((ids, vals));
        }
        for rd in &readers {
            rd.finish()?;
        }
        drop(readers);
        self.keep_spare(recv, &sent);
        Ok(out)
    }

    /// Keeps `buffers` (emptied) for the next step's messages, the buffer
    /// of rank `r`'s message to this one for this rank's message to `r`. A
    /// buffer more than twice as large as both messages (`sent[r]` bytes to
    /// `r`, its length from `r`) gives back the excess, so that one large
    /// step does not hold its memory for good.
    fn keep_spare(&mut self, mut buffers: Vec<Vec<u8>>, sent: &[usize]) {
        for (r, b) in buffers.iter_mut().enumerate() {
            let used = b.len().max(sent.get(r).copied().unwrap_or(0));
            emptied(b, used);
        }
        self.spare = buffers;
    }

    /// The current values of rows `ids` of table `var` (any rows, owned by
    /// any rank), as f32 (exact for every storage type), row after row in
    /// the order of `ids`. Collective: every rank calls it, each with its own
    /// ids (possibly none). An invalid request on any rank fails the call on
    /// every rank.
    pub fn fetch_rows<'a>(
        &mut self,
        var: VarId,
        ids: impl Into<RowIds<'a>>,
    ) -> Result<Vec<f32>, Error> {
        let ids: RowIds<'a> = ids.into();
        let size = self.size();
        let local = self.var(var).and_then(|(i, v)| match v.kind {
            Kind::Table { rows, .. } => match ids.first_invalid(rows) {
                None => Ok((i as u64).to_le_bytes().to_vec()),
                Some((_, RawId::Negative(id))) => Err(Error::NegativeRowId {
                    variable: self.inner.vars[i].info.name.clone(),
                    id,
                }),
                Some((_, RawId::Ok(id))) => Err(Error::RowIdOutOfRange {
                    variable: self.inner.vars[i].info.name.clone(),
                    id,
                    rows,
                }),
            },
            Kind::Dense { .. } => Err(Error::Sharding {
                reason: format!(
                    "variable `{}` is dense (replicated): read it with params()",
                    self.inner.vars[i].info.name
                ),
            }),
        });
        let (all, header, ()) = self.agree("fetch", local.map(|p| (p, ())))?;
        let (i, _) = self.var(var)?;
        for (r, msg) in all.iter().enumerate() {
            let mut rd = Reader::new(msg, r);
            rd.take(header, "header")?;
            if rd.u64("variable")? != i as u64 {
                return Err(Error::Sharding {
                    reason: format!(
                        "rank {r} fetches from another variable than rank {}",
                        self.rank()
                    ),
                });
            }
        }
        let Kind::Table {
            rows,
            dim,
            start,
            end,
        } = self.vars[i].kind
        else {
            return Err(Error::Sharding {
                reason: "fetch from a dense variable".into(),
            });
        };
        // Requests to owners.
        let n = ids.len();
        let mut owner = Vec::with_capacity(n);
        let mut send: Vec<Writer> = (0..size).map(|_| Writer::default()).collect();
        let mut counts = vec![0u64; size];
        for j in 0..n {
            let id = ids.get(j).and_then(|r| r.ok()).unwrap_or(0);
            let o = owner_of(id, rows, size);
            owner.push(o);
            counts[o] += 1;
        }
        let me = self.rank();
        for (d, w) in send.iter_mut().enumerate() {
            if d != me {
                w.u64(counts[d]);
            }
        }
        for j in (0..n).filter(|&j| owner[j] != me) {
            send[owner[j]].u64(ids.get(j).and_then(|r| r.ok()).unwrap_or(0));
        }
        let requests = exchanged(&mut self.comm, send.into_iter().map(|w| w.0).collect())?;
        // Answers: the requested rows in the storage type.
        let params = self.vars[i].params.as_ref();
        let mut answers = Vec::with_capacity(size);
        for (r, msg) in requests.iter().enumerate() {
            if r == me {
                answers.push(Vec::new());
                continue;
            }
            let mut rd = Reader::new(msg, r);
            let k = rd.count(8, "request count")?;
            let mut w = Writer::default();
            w.dtype(params.dtype());
            for _ in 0..k {
                let id = rd.u64("id")?;
                if id < start as u64 || id >= end as u64 {
                    return Err(rd.malformed("a request for a row this rank does not own"));
                }
                let at = (id as usize - start) * dim;
                w.values(&params, at..at + dim);
            }
            rd.finish()?;
            answers.push(w.0);
        }
        let replies = exchanged(&mut self.comm, answers)?;
        let mut per_owner: Vec<Vec<f32>> = Vec::with_capacity(size);
        for (r, msg) in replies.iter().enumerate() {
            if r == me {
                // This rank's own rows are read directly below.
                per_owner.push(Vec::new());
                continue;
            }
            let mut rd = Reader::new(msg, r);
            let d = rd.dtype("dtype")?;
            let m = (counts[r] as usize)
                .checked_mul(dim)
                .ok_or_else(|| rd.malformed("row count"))?;
            let mut v = Vec::with_capacity(m);
            rd.values_f32(d, m, &mut v, "rows")?;
            rd.finish()?;
            per_owner.push(v);
        }
        let mut next = vec![0usize; size];
        let mut out = Vec::with_capacity(n.saturating_mul(dim));
        for (j, &o) in owner.iter().enumerate() {
            if o == me {
                let id = ids.get(j).and_then(|x| x.ok()).unwrap_or(0) as usize;
                if id < start || id >= end {
                    return Err(Error::Sharding {
                        reason: "internal: a row this rank does not own".into(),
                    });
                }
                let at = (id - start) * dim;
                extend_f32(&mut out, &params, at..at + dim);
                continue;
            }
            let at = next[o] * dim;
            let Some(row) = per_owner[o].get(at..at + dim) else {
                return Err(Error::Sharding {
                    reason: format!("rank {o} answered with fewer rows than asked"),
                });
            };
            out.extend_from_slice(row);
            next[o] += 1;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::emptied;

    #[test]
    fn emptied_keeps_memory_unless_far_too_large() {
        let mut b = Vec::with_capacity(1000);
        b.resize(600, 1u8);
        emptied(&mut b, 600);
        assert!(b.is_empty() && b.capacity() >= 1000, "{}", b.capacity());
        // Held little, but the other direction used most of it: kept.
        b.resize(100, 1);
        emptied(&mut b, 900);
        assert!(b.is_empty() && b.capacity() >= 1000, "{}", b.capacity());
        b.resize(100, 1);
        emptied(&mut b, 100);
        assert!(b.is_empty() && b.capacity() < 500, "{}", b.capacity());
    }
}
