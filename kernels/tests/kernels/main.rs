//! The kernels' integration tests, in one test binary.
//!
//! One binary rather than one per file: every file instantiates the row kernels for many
//! storage combinations on every path, and a separate binary per file compiled those same
//! instantiations again (together about two minutes of a cold `cargo test --workspace` on
//! two cores).

mod common;

mod batched;
mod equivalence;
mod exact;
mod reference;
mod safety;
