//! Sharded LazyAdam: tables split by rows across ranks, one step over the
//! concatenation of every rank's batch, bit-identical to one process.

mod collective;

pub use collective::{Collective, CollectiveError, ThreadCollective};
