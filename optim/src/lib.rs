//! LazyAdam with the exact semantics of `tfa.optimizers.LazyAdam` (TensorFlow
//! Addons on the legacy Keras optimizer), for sparse embedding tables and
//! dense variables, on top of the bit-exact SIMD kernels of
//! [`lazyadam-kernels`](lazyadam_kernels).
//!
//! A sparse gradient (row ids plus one value row per id) updates the moments
//! and the parameters of the rows present in the step only; rows not in the
//! step keep their exact bits, slots included. Dense gradients take ordinary
//! Adam.
//!
//! # Example
//!
//! ```
//! use lazyadam::{DType, Gradient, LazyAdam, LazyAdamConfig, Update};
//!
//! let mut opt = LazyAdam::new(LazyAdamConfig::default())?;
//! // A 4 x 2 embedding table in f32 with f32 moments.
//! let table = opt.add_variable("embedding", &[4, 2], DType::F32, DType::F32)?;
//! let mut params = vec![0.5f32; 8];
//!
//! // Rows 1 and 3 (row 1 twice: its gradients are summed).
//! let ids = [1u32, 3, 1];
//! let grads = [0.1f32, -0.2, 0.3, 0.4, 0.1, -0.2];
//! opt.apply_gradients(&mut [Update::new(table, &mut params, Gradient::sparse(&ids, &grads))])?;
//!
//! assert_eq!(opt.iterations(), 1);
//! assert_eq!(&params[0..2], &[0.5, 0.5]); // row 0 untouched
//! assert!(params[2] < 0.5 && params[3] > 0.5); // row 1 moved against its gradient
//! # Ok::<(), lazyadam::Error>(())
//! ```
//!
//! # Semantics (the reference's, pinned by the conformance traces)
//!
//! One [`LazyAdam::apply_gradients`] call is one step for all its updates:
//!
//! - `lr` = the schedule (or constant) at `iterations`, then
//!   `lr / (1 + decay * iterations)` when `decay > 0` (in f32);
//! - `t = iterations + 1`, `lr_t = lr * sqrt(1 - beta_2^t) / (1 - beta_1^t)`,
//!   computed once per step in f64 from the f32 inputs and rounded to f32
//!   (the reference computes it in f32; the two agree to an ulp or two);
//! - clipping acts on the values as given, before duplicates are summed:
//!   `clipvalue` elementwise, then `clipnorm` per gradient
//!   (`g * clipnorm / max(norm, clipnorm)`, applied as one factor), then
//!   `global_clipnorm` over all gradients of the step (norms from the exact
//!   sum of squares, [`kernels::SquareSum`], rounded once to f64: the same
//!   bits however the values are split across threads, chunks or ranks);
//! - duplicate row ids are summed in first-occurrence order in f32, then each
//!   distinct row gets `m = b1*m + (1-b1)*g`, `v = b2*v + (1-b2)*g*g`,
//!   `p -= (lr_t*m) / (sqrt(v) + eps)` (the kernels' exact operation order);
//! - the step counter is global: a row skipped for many steps uses the
//!   current `t`;
//! - a step is all or nothing: every update is validated before anything is
//!   written.
//!
//! Large steps run in parallel over distinct rows and over chunks of dense
//! variables (feature `rayon`, on by default; the thread count is rayon's
//! current pool, so `ThreadPool::install` chooses it). Every element's result
//! depends on that element's inputs only, so results are bit-identical for
//! any number of threads and any kernel path.
//!
//! # Storage types, and why f16 moments are fragile
//!
//! Parameters, gradients and moments may each be stored in f32, f16 or bf16
//! (compute is always f32). **Prefer f32 or bf16 moments.** With f16 moments,
//! `(1 - beta_2) * g * g` underflows f16 (smallest subnormal about 6e-8) for
//! gradients below roughly 0.008 with the default `beta_2`, so `v` stays 0
//! while `m` does not, and the update `lr_t * m / (sqrt(v) + eps)` becomes
//! `lr_t * m / 1e-7`: a huge step. bf16 has f32's exponent range and does not
//! underflow there. The reference shows the same failure when run in float16.
//!
//! # Beyond the reference
//!
//! [`Extensions`] (all off by default): AMSGrad on sparse gradients, decoupled
//! weight decay (LazyAdamW), `maximize`, per-row bias correction, catch-up
//! decay of skipped rows, a non-finite policy with dynamic loss scaling,
//! stochastic rounding of f16/bf16 parameters, a forced kernel path.
//!
//! # Performance
//!
//! A sparse step costs time in proportion to the ids in the step, never to
//! the table. Small steps (under 4 x [`Extensions::parallel_min_elements`]
//! gradient elements, or on one thread up to 2^20 of them when the rows are
//! at most 16 elements long) map ids to distinct rows with a hash table sized
//! by the id count (for tables of at most 2^32 rows), sum every gradient row
//! into per-row f32 accumulators with one batched kernel call, and update all
//! rows with another. Larger steps find duplicates with a radix sort of
//! `(row, position)` keys, which puts the distinct rows in increasing row
//! order; each row's occurrences are then summed, in occurrence order, in
//! vector registers (into an accumulator row that stays in L1), right before
//! the row is updated. Both give the same bits. Table rows are
//! prefetched a few rows ahead. All scratch buffers live in the optimizer and
//! are reused across steps. Steps that update fewer than
//! [`Extensions::parallel_min_elements`] elements stay on the calling thread;
//! larger ones split the distinct rows into disjoint row ranges (safe
//! `split_at_mut`) and dense variables into chunks, as rayon tasks.
//!
//! Random rows of a very large table cost mostly cache and TLB misses. On
//! Linux, the optimizer advises its own slot buffers of 4 MiB or more for
//! transparent huge pages (`madvise(MADV_HUGEPAGE)` before they are first
//! written; effective when `/sys/kernel/mm/transparent_hugepage/enabled` is
//! `madvise` or `always`), and [`advise_huge_pages`] does the same for the
//! parameter tables you own.
//!
//! # Sharding
//!
//! [`ShardedLazyAdam`] splits embedding tables by rows across the ranks of a
//! [`Collective`] (MPI processes through `lazyadam-mpi`, or threads through
//! [`ThreadCollective`]); one sharded step is bit-identical to one
//! [`LazyAdam`] step on the concatenation of every rank's batch. See
//! [`shard`].
//!
//! # State
//!
//! [`LazyAdam::get_weights`] / [`LazyAdam::set_weights`] use the reference's
//! `get_weights()` order (iterations, every `m`, every `v`, every `vhat`);
//! [`LazyAdam::save`] / [`LazyAdam::load`] write the whole optimizer as
//! safetensors, readable by numpy or torch.
#![deny(missing_docs)]

mod checkpoint;
mod config;
mod crc64;
mod dedup;
mod error;
mod extensions;
mod json;
mod lr;
mod optimizer;
mod profile;
mod schedule;
pub mod shard;
mod state;
mod step;
mod store;
mod tensor;

pub use lazyadam_kernels as kernels;
pub use lazyadam_kernels::{DType, Element, Isa, bf16, f16};

pub use checkpoint::CHECKPOINT_FORMAT;
pub use config::{LazyAdamConfig, LearningRate};
pub use error::{ConfigError, Error};
pub use extensions::{
    BiasCorrection, DEFAULT_PARALLEL_MIN_ELEMENTS, DynamicLossScale, Extensions, NonFinitePolicy,
};
pub use optimizer::LazyAdam;
#[doc(hidden)]
pub use profile::phase_times;
pub use schedule::{CustomSchedule, LearningRateSchedule, Schedule};
pub use shard::{Collective, CollectiveError, ShardGradient, ShardedLazyAdam, ThreadCollective};
pub use store::advise_huge_pages;
pub use tensor::{
    Gradient, RowIds, Slots, StepOutcome, TensorMut, TensorRef, Update, VarId, VariableInfo,
    WeightData, WeightTensor,
};
