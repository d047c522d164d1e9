//! Checks that [`MpiCollective`] moves bytes exactly, on this MPI installation:
//! `mpirun -np 4 lazyadam-mpi-check` (or alone, as one rank).
//!
//! Every rank runs the same rounds of `all_gather` and `all_to_all` with
//! buffers of varying sizes (empty ones, small ones, a few MiB), filled with a
//! pattern that names the round, the sender, the receiver and the offset, and
//! checks what it receives byte for byte. Then the error paths: a wrong buffer
//! count on one rank and messages over MPI's 2^31 − 1 bytes (allocated but
//! never touched) must fail on every rank, each followed by a round that must
//! work; and a collective used after `MPI_Finalize` must return an error.
//!
//! Rank 0 prints `collective check: OK (...)`; any mismatch on any rank makes
//! every rank exit with status 1.

use std::process::ExitCode;

use lazyadam::Collective;
use lazyadam_mpi::mpi::collective::SystemOperation;
use lazyadam_mpi::mpi::traits::{Communicator, CommunicatorCollectives};
use lazyadam_mpi::{MAX_MESSAGE_BYTES, MpiCollective, MpiCollectiveError};

const MIB: usize = 1 << 20;

/// The byte at offset `i` of what `src` sends to `dst` in `round`.
fn byte(round: u64, src: usize, dst: usize, i: usize) -> u8 {
    let mut x = round
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add((src as u64) << 40)
        .wrapping_add((dst as u64) << 20)
        .wrapping_add(i as u64);
    x ^= x >> 31;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 29;
    (x >> 24) as u8
}

fn pattern(round: u64, src: usize, dst: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| byte(round, src, dst, i)).collect()
}

/// Buffer length of `src` in all_gather round `k` of a group of `n`.
fn gather_len(k: u64, src: usize, n: usize) -> usize {
    match k {
        0 => 0,
        1 => src,
        2 if src == n - 1 => 4 * MIB + 3,
        2 => src * 5 + 1,
        3 => MIB + src * 7,
        4 => 1,
        _ => (src * 37 + k as usize) % 11,
    }
}

/// Buffer length from `src` to `dst` in all_to_all round `k` of a group of `n`.
fn a2a_len(k: u64, src: usize, dst: usize, n: usize) -> usize {
    match k {
        0 => 0,
        1 => (src + 2 * dst) % 5,
        2 if src == dst => 3 * MIB + 1,
        2 if (src + dst).is_multiple_of(2) => 0,
        2 => src * 100 + dst,
        3 if src == 0 && dst == n - 1 => 5 * MIB,
        3 => dst + 1,
        4 => 7,
        // Rank 0 sends nothing (an empty send buffer), then receives nothing.
        5 if src == 0 => 0,
        6 if dst == 0 => 0,
        5 | 6 => src + dst + 1,
        // A few MiB after tiny rounds, then a little less: the collective's
        // kept buffers must not leak the earlier round's bytes.
        7 => 2 * MIB + src * 3 + dst,
        8 => 2 * MIB - 5 + src + dst,
        _ => (src * 13 + dst * 7 + k as usize) % 9,
    }
}

struct Check {
    rank: usize,
    failures: u64,
    checks: u64,
    bytes: u64,
}

impl Check {
    fn ok(&mut self, cond: bool, what: impl FnOnce() -> String) {
        self.checks += 1;
        if !cond {
            self.failures += 1;
            eprintln!("rank {}: FAILED: {}", self.rank, what());
        }
    }
}

fn gather_round(coll: &mut MpiCollective, c: &mut Check, k: u64) {
    let (r, n) = (coll.rank(), coll.size());
    let mine = pattern(k, r, usize::MAX, gather_len(k, r, n));
    match coll.all_gather(&mine) {
        Ok(got) => {
            c.ok(got.len() == n, || {
                format!("all_gather round {k}: {} parts", got.len())
            });
            for (src, part) in got.iter().enumerate() {
                c.bytes += part.len() as u64;
                let want = pattern(k, src, usize::MAX, gather_len(k, src, n));
                c.ok(*part == want, || {
                    format!(
                        "all_gather round {k}: part from rank {src}: {} bytes, expected {}{}",
                        part.len(),
                        want.len(),
                        if part.len() == want.len() {
                            " (contents differ)"
                        } else {
                            ""
                        }
                    )
                });
            }
        }
        Err(e) => c.ok(false, || format!("all_gather round {k}: {e}")),
    }
}

fn a2a_round(coll: &mut MpiCollective, c: &mut Check, k: u64) {
    let (r, n) = (coll.rank(), coll.size());
    let send = (0..n)
        .map(|dst| pattern(k, r, dst, a2a_len(k, r, dst, n)))
        .collect();
    match coll.all_to_all(send) {
        Ok(got) => {
            c.ok(got.len() == n, || {
                format!("all_to_all round {k}: {} parts", got.len())
            });
            for (src, part) in got.iter().enumerate() {
                c.bytes += part.len() as u64;
                let want = pattern(k, src, r, a2a_len(k, src, r, n));
                c.ok(*part == want, || {
                    format!(
                        "all_to_all round {k}: part from rank {src}: {} bytes, expected {}{}",
                        part.len(),
                        want.len(),
                        if part.len() == want.len() {
                            " (contents differ)"
                        } else {
                            ""
                        }
                    )
                });
            }
        }
        Err(e) => c.ok(false, || format!("all_to_all round {k}: {e}")),
    }
}

/// `result` must be an error of `MpiCollectiveError` for which `expected` holds.
fn expect_error<T>(
    c: &mut Check,
    what: &str,
    result: Result<T, lazyadam::CollectiveError>,
    expected: impl FnOnce(&MpiCollectiveError) -> bool,
) {
    match result {
        Ok(_) => c.ok(false, || format!("{what}: succeeded, expected an error")),
        Err(e) => {
            let shown = e.to_string();
            let matched = e.downcast_ref::<MpiCollectiveError>().is_some_and(expected);
            c.ok(matched, || format!("{what}: unexpected error: {shown}"));
            if matched && c.rank == 0 {
                println!("  expected error ({what}): {shown}");
            }
        }
    }
}

fn main() -> ExitCode {
    let Some(universe) = lazyadam_mpi::mpi::initialize() else {
        eprintln!("MPI was already initialized");
        return ExitCode::FAILURE;
    };
    let mut coll = match MpiCollective::world(&universe) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("MpiCollective::world: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (r, n) = (coll.rank(), coll.size());
    let mut c = Check {
        rank: r,
        failures: 0,
        checks: 0,
        bytes: 0,
    };
    if r == 0 {
        println!("lazyadam-mpi-check: {n} rank(s), {coll:?}");
    }

    // Data rounds, interleaved.
    let rounds = 10u64;
    for k in 0..rounds {
        gather_round(&mut coll, &mut c, k);
        a2a_round(&mut coll, &mut c, k);
    }

    // A wrong buffer count on rank 0: every rank fails the call, then the group works.
    let send = if r == 0 {
        vec![vec![1u8]; n + 1]
    } else {
        vec![vec![1u8]; n]
    };
    let result = coll.all_to_all(send);
    expect_error(
        &mut c,
        "all_to_all with n + 1 buffers on rank 0",
        result,
        |e| {
            if r == 0 {
                *e == MpiCollectiveError::BufferCount {
                    given: n + 1,
                    size: n,
                }
            } else {
                matches!(
                    e,
                    MpiCollectiveError::OtherRank {
                        largest_total: u64::MAX,
                        ..
                    }
                )
            }
        },
    );
    a2a_round(&mut coll, &mut c, 100);

    // One all_gather buffer of 2^31 bytes (zeroed on allocation, never touched).
    let over = MAX_MESSAGE_BYTES as usize + 1;
    let local = if r == n - 1 {
        vec![0u8; over]
    } else {
        vec![2u8; 3]
    };
    let result = coll.all_gather(&local);
    drop(local);
    expect_error(
        &mut c,
        "all_gather of 2^31 bytes from the last rank",
        result,
        |e| {
            matches!(e, MpiCollectiveError::TooLarge { op: "all_gather", largest_from, .. }
            if *largest_from == (over as u64, n - 1))
        },
    );
    gather_round(&mut coll, &mut c, 101);

    // Every rank sends 2^31 / n + 1 bytes to rank 0: each send fits, rank 0's
    // receive does not; every rank must fail the call.
    let each = (1usize << 31) / n + 1;
    let send = (0..n)
        .map(|dst| {
            if dst == 0 {
                vec![0u8; each]
            } else {
                vec![3u8; 2]
            }
        })
        .collect();
    let result = coll.all_to_all(send);
    expect_error(
        &mut c,
        "all_to_all of 2^31 + bytes into rank 0",
        result,
        |e| {
            if r == 0 {
                matches!(e, MpiCollectiveError::TooLarge { op: "all_to_all", recv_bytes, .. }
                if *recv_bytes == (each * n) as u64)
            } else {
                matches!(e, MpiCollectiveError::OtherRank { op: "all_to_all", largest_total, .. }
                if *largest_total == (each * n) as u64)
            }
        },
    );
    a2a_round(&mut coll, &mut c, 102);
    gather_round(&mut coll, &mut c, 103);

    // A collective over a duplicate, used and then outliving MPI_Finalize.
    let mut dup = match MpiCollective::new(universe.world().duplicate()) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("rank {r}: MpiCollective::new(duplicate): {e}");
            return ExitCode::FAILURE;
        }
    };
    gather_round(&mut dup, &mut c, 104);

    // Every rank's verdict.
    let mut failures = 0u64;
    coll.communicator()
        .all_reduce_into(&c.failures, &mut failures, SystemOperation::sum());
    let mut bytes = 0u64;
    coll.communicator()
        .all_reduce_into(&c.bytes, &mut bytes, SystemOperation::sum());
    drop(coll);
    drop(universe); // MPI_Finalize

    expect_error(
        &mut c,
        "all_gather after MPI_Finalize",
        dup.all_gather(&[1]),
        |e| *e == MpiCollectiveError::Finalized,
    );
    drop(dup); // leaks its communicator instead of freeing it after MPI_Finalize

    if c.failures != 0 || failures != 0 {
        eprintln!(
            "rank {r}: collective check FAILED: {} of {} checks on this rank, {failures} on all ranks",
            c.failures, c.checks
        );
        return ExitCode::FAILURE;
    }
    if r == 0 {
        println!(
            "collective check: OK ({n} rank(s), {} checks per rank, {:.1} MiB received in all)",
            c.checks,
            bytes as f64 / MIB as f64
        );
    }
    ExitCode::SUCCESS
}
