//! The optimizer's integration tests, in one test binary.
//!
//! One binary rather than one per file: each binary linked the whole optimizer (with every
//! kernel instantiation) again, for about a minute of a cold `cargo test --workspace` on two
//! cores and 44 MiB of disk per file. `tests/checkpoint_hostile.rs` stays a binary of its
//! own: it counts allocations with its own global allocator, which other tests running in
//! the same process would disturb.

mod by_name;
mod config;
mod extensions;
mod hostile;
mod properties;
mod schedules;
mod shard;
mod state;
mod validation;

/// Runs `f` on a new rayon pool of `threads` threads.
fn on_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("a thread pool")
        .install(f)
}
