//! MPI engine for the sharded [`lazyadam`] optimizer: [`MpiCollective`]
//! implements [`lazyadam::Collective`] over an MPI communicator
//! ([rsmpi](https://docs.rs/mpi)), so that one rank per process (or per
//! machine) holds a row range of every table and a step runs over the
//! concatenation of every rank's batch.
//!
//! ```no_run
//! use lazyadam::Collective;
//! use lazyadam_mpi::MpiCollective;
//!
//! # fn main() -> Result<(), lazyadam::CollectiveError> {
//! // One `Universe` per process, created first and dropped last (MPI_Finalize).
//! let universe = mpi::initialize().ok_or("MPI was already initialized")?;
//! let mut coll = MpiCollective::world(&universe)?;
//! let everyone = coll.all_gather(&[coll.rank() as u8])?;
//! assert_eq!(everyone.len(), coll.size());
//! drop(coll);
//! drop(universe); // MPI_Finalize
//! # Ok(())
//! # }
//! ```
//!
//! Run it with `mpirun -np 4 ./program` (or alone, `./program`, as one rank:
//! MPI's singleton initialization).
//!
//! With the sharded optimizer, each process registers the same tables and
//! steps on its own batch; the optimizer holds this rank's rows:
//!
//! ```no_run
//! use lazyadam::{DType, Gradient, LazyAdamConfig, ShardGradient, ShardedLazyAdam};
//! use lazyadam_mpi::MpiCollective;
//!
//! # fn main() -> Result<(), lazyadam::CollectiveError> {
//! let universe = mpi::initialize().ok_or("MPI was already initialized")?;
//! let coll = MpiCollective::world(&universe)?;
//! let mut opt = ShardedLazyAdam::new(LazyAdamConfig::default(), coll)?;
//! let table = opt.add_table("emb", 1_000_000, 16, DType::F32, DType::F32)?;
//! // This rank's batch: any rows of the whole table.
//! let ids = [3u32, 999_999, 3];
//! let grads = vec![0.1f32; ids.len() * 16];
//! opt.step(&[ShardGradient::new(table, Gradient::sparse(&ids, &grads))])?;
//! let row = opt.fetch_rows(table, &[999_999u32])?; // from whichever rank owns it
//! # let _ = row;
//! drop(opt); // before the Universe
//! # Ok(())
//! # }
//! ```
//!
//! The repository's `sharded_mf` example trains a matrix factorization this
//! way and checks the result against one process, bit for bit.
//!
//! # MPI's lifetime rules
//!
//! * MPI is initialized once per process: [`mpi::initialize`] (or
//!   [`mpi::initialize_with_threading`]) returns the [`Universe`] the first
//!   time and `None` after that. Dropping the `Universe` calls `MPI_Finalize`;
//!   MPI cannot be initialized again in that process.
//! * An [`MpiCollective`] is only usable between the two: [`MpiCollective::new`]
//!   refuses a communicator before initialization or after finalization, and
//!   every operation on a collective whose `Universe` was dropped returns
//!   [`MpiCollectiveError::Finalized`] instead of reaching MPI (which would
//!   abort the job). Drop the collective (and the optimizer that owns it)
//!   before the `Universe`; if it outlives it anyway, its communicator is
//!   leaked rather than freed after `MPI_Finalize`.
//! * [`mpi::initialize`] asks for `MPI_THREAD_SINGLE`: call the collective from
//!   the thread that initialized MPI. To drive it from another thread, initialize
//!   with [`mpi::initialize_with_threading`] and at least
//!   [`Threading::Serialized`](mpi::environment::Threading::Serialized) (one
//!   thread at a time), or `Funneled` if that thread is the one that
//!   initialized MPI.
//! * As with every MPI collective, all ranks of the communicator must call the
//!   same operations in the same order. Give the optimizer a communicator of
//!   its own ([`MpiCollective::new`] with `world.duplicate()`) if the program
//!   also runs collectives of its own from other threads.
//!
//! # Message sizes
//!
//! MPI-3's counts and displacements are `int`: one operation can move at most
//! [`MAX_MESSAGE_BYTES`] (2^31 − 1) bytes into one buffer. Each operation
//! therefore first exchanges the byte counts (as `u64`), and fails on every
//! rank, before any data moves, when any rank would send or receive more than
//! that in total ([`MpiCollectiveError::TooLarge`] on the ranks over the
//! limit, [`MpiCollectiveError::OtherRank`] on the others). The group stays in
//! step: the next operation works as usual. A wrong number of buffers in
//! [`all_to_all`](lazyadam::Collective::all_to_all) fails the same way on
//! every rank ([`MpiCollectiveError::BufferCount`]).
//!
//! Errors inside MPI itself (a lost peer, a network failure) follow the
//! communicator's error handler, `MPI_ERRORS_ARE_FATAL` by default: the job is
//! aborted, and this crate never sees them.

#![deny(missing_docs)]

use std::fmt;
use std::mem::ManuallyDrop;

use lazyadam::{Collective, CollectiveError};
use mpi::Count;
use mpi::collective::SystemOperation;
use mpi::datatype::{Partition, PartitionMut};
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator, CommunicatorCollectives};

pub use mpi;

/// The most bytes one rank may send, or receive, in one operation: MPI's
/// `int` counts and displacements (2^31 − 1).
pub const MAX_MESSAGE_BYTES: u64 = Count::MAX as u64;

/// The count a rank announces for a destination when its own call is wrong
/// (the receivers then fail too, so that every rank takes the same branch).
const POISON: u64 = u64::MAX;

/// What failed in an [`MpiCollective`] operation. Returned boxed as a
/// [`CollectiveError`]; downcast it to inspect.
///
/// Every variant but [`NotInitialized`](Self::NotInitialized) and
/// [`Finalized`](Self::Finalized) is returned by every rank of the group for
/// the same call (each rank describes what it saw), and leaves the group in
/// step for the next operation.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MpiCollectiveError {
    /// MPI is not initialized: call [`mpi::initialize`] first.
    NotInitialized,
    /// MPI was finalized (the [`Universe`] was dropped).
    Finalized,
    /// `all_to_all` got `given` buffers for a group of `size` ranks (on this rank).
    BufferCount {
        /// Buffers passed.
        given: usize,
        /// Ranks in the group.
        size: usize,
    },
    /// This rank would move more than [`MAX_MESSAGE_BYTES`] in one operation.
    TooLarge {
        /// `"all_gather"` or `"all_to_all"`.
        op: &'static str,
        /// Bytes this rank sends in total (for `all_gather`: its own buffer).
        send_bytes: u64,
        /// Bytes this rank receives in total (`u64::MAX` if the total overflows).
        recv_bytes: u64,
        /// The largest byte count one rank sent to this one, and that rank.
        largest_from: (u64, usize),
    },
    /// Another rank's call failed its check (a wrong buffer count or a message
    /// over [`MAX_MESSAGE_BYTES`]); this rank's own call was valid.
    OtherRank {
        /// `"all_gather"` or `"all_to_all"`.
        op: &'static str,
        /// The largest total in bytes that some rank would send or receive
        /// (`u64::MAX` for a wrong buffer count or an overflowing total).
        largest_total: u64,
        /// Bytes this rank sends in total.
        send_bytes: u64,
        /// Bytes this rank receives in total.
        recv_bytes: u64,
    },
}

impl fmt::Display for MpiCollectiveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotInitialized => {
                write!(f, "MPI is not initialized (call mpi::initialize first)")
            }
            Self::Finalized => write!(
                f,
                "MPI is finalized: the mpi::environment::Universe was dropped before the collective"
            ),
            Self::BufferCount { given, size } => write!(
                f,
                "all_to_all: {given} buffers for a group of {size} ranks (one per rank expected)"
            ),
            Self::TooLarge {
                op,
                send_bytes,
                recv_bytes,
                largest_from: (bytes, from),
            } => write!(
                f,
                "{op}: this rank would send {send_bytes} and receive {} bytes (largest: {bytes} \
                 from rank {from}); MPI moves at most {MAX_MESSAGE_BYTES} bytes (2^31 - 1) into \
                 one buffer; every rank of the group failed this call",
                show_total(*recv_bytes),
            ),
            Self::OtherRank {
                op,
                largest_total,
                send_bytes,
                recv_bytes,
            } => {
                write!(f, "{op}: another rank's call failed its check (")?;
                if *largest_total == u64::MAX {
                    write!(f, "a wrong number of buffers, or a total over u64")?;
                } else {
                    write!(
                        f,
                        "{largest_total} bytes in one operation, over MPI's {MAX_MESSAGE_BYTES}"
                    )?;
                }
                write!(
                    f,
                    "); this rank sends {send_bytes} and receives {} bytes; every rank of the \
                     group failed this call",
                    show_total(*recv_bytes)
                )
            }
        }
    }
}

fn show_total(bytes: u64) -> String {
    if bytes == u64::MAX {
        "an unknown number of".to_string()
    } else {
        bytes.to_string()
    }
}

impl std::error::Error for MpiCollectiveError {}

/// A byte with a real address (see [`real`]).
static ANCHOR: [u8; 1] = [0];

/// `bytes`, or an empty slice at a real address if `bytes` is empty.
///
/// An empty Rust slice may point at its alignment (`0x1` for bytes), which is
/// Open MPI's `MPI_IN_PLACE`: an empty send or receive buffer would be taken
/// for an in-place operation (an error for `MPI_Allgatherv`'s receive buffer,
/// the wrong data for `MPI_Alltoallv`'s send buffer).
fn real(bytes: &[u8]) -> &[u8] {
    if bytes.is_empty() {
        &ANCHOR[..0]
    } else {
        bytes
    }
}

fn err(e: MpiCollectiveError) -> CollectiveError {
    Box::new(e)
}

/// [`lazyadam::Collective`] over an MPI communicator.
///
/// Each operation is two MPI collectives: the byte counts (`MPI_Allgather` or
/// `MPI_Alltoall` of `u64`), then the bytes (`MPI_Allgatherv` or
/// `MPI_Alltoallv`); `all_to_all` adds an `MPI_Allreduce` of one `u64` so that
/// a size error on any rank fails the call on every rank. See the
/// [crate docs](crate) for the lifetime rules and the size limit.
///
/// `all_to_all` keeps its packed send and receive buffers from call to call
/// (each given back when a call needs less than half of it), and returns what
/// it received in the buffers it was given, so that a step whose messages are
/// about the size of the last one's allocates nothing for them.
pub struct MpiCollective<C: Communicator = SimpleCommunicator> {
    /// Never dropped after `MPI_Finalize` (see [`Drop`]).
    comm: ManuallyDrop<C>,
    rank: usize,
    size: usize,
    /// `all_to_all`'s packed send and receive buffers, kept between calls so
    /// that a step does not allocate (and fault in) them anew.
    sbuf: Vec<u8>,
    rbuf: Vec<u8>,
}

impl MpiCollective<SimpleCommunicator> {
    /// The collective of every process of the job (`MPI_COMM_WORLD`).
    ///
    /// The `universe` is the proof that MPI is initialized; keep it alive for
    /// as long as the collective is used. For a communicator of the
    /// optimizer's own, use `MpiCollective::new(universe.world().duplicate())`.
    pub fn world(universe: &Universe) -> Result<Self, CollectiveError> {
        Self::new(universe.world())
    }
}

impl<C: Communicator> MpiCollective<C> {
    /// A collective over `comm` (any intra-communicator: the world, a
    /// duplicate, a split). Fails if MPI is not initialized or already
    /// finalized.
    pub fn new(comm: C) -> Result<Self, CollectiveError> {
        check_live()?;
        // MPI ranks and sizes are non-negative `int`s.
        let rank = usize::try_from(comm.rank()).map_err(|e| Box::new(e) as CollectiveError)?;
        let size = usize::try_from(comm.size()).map_err(|e| Box::new(e) as CollectiveError)?;
        Ok(Self {
            comm: ManuallyDrop::new(comm),
            rank,
            size,
            sbuf: Vec::new(),
            rbuf: Vec::new(),
        })
    }

    /// The communicator.
    pub fn communicator(&self) -> &C {
        &self.comm
    }
}

impl<C: Communicator> fmt::Debug for MpiCollective<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MpiCollective")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl<C: Communicator> Drop for MpiCollective<C> {
    fn drop(&mut self) {
        // Freeing a user communicator after MPI_Finalize would abort the job:
        // leak it instead (the process is ending MPI anyway).
        if !mpi::environment::is_finalized() {
            // SAFETY: `self.comm` is dropped once, here, and never used again.
            unsafe { ManuallyDrop::drop(&mut self.comm) };
        }
    }
}

fn check_live() -> Result<(), CollectiveError> {
    if mpi::environment::is_finalized() {
        Err(err(MpiCollectiveError::Finalized))
    } else if !mpi::environment::is_initialized() {
        Err(err(MpiCollectiveError::NotInitialized))
    } else {
        Ok(())
    }
}

/// Counts and displacements of a buffer of `counts`, if its total fits MPI's
/// `int`s (then every count and displacement fits as well).
fn layout(counts: &[u64]) -> Option<(Vec<Count>, Vec<Count>, usize)> {
    let total = total(counts)?;
    if total > MAX_MESSAGE_BYTES {
        return None;
    }
    let mut c = Vec::with_capacity(counts.len());
    let mut d = Vec::with_capacity(counts.len());
    let mut at: Count = 0;
    for &n in counts {
        let n = Count::try_from(n).ok()?;
        c.push(n);
        d.push(at);
        at = at.checked_add(n)?;
    }
    Some((c, d, usize::try_from(total).ok()?))
}

/// The sum of `counts`, `None` on overflow (or a poisoned count).
fn total(counts: &[u64]) -> Option<u64> {
    counts.iter().try_fold(
        0u64,
        |s, &n| if n == POISON { None } else { s.checked_add(n) },
    )
}

/// The largest count and its rank.
fn largest(counts: &[u64]) -> (u64, usize) {
    counts.iter().enumerate().fold(
        (0, 0),
        |(m, r), (i, &n)| if n > m { (n, i) } else { (m, r) },
    )
}

/// Gives back `buf`'s memory when it holds more than twice `need` bytes
/// (one large message does not hold its memory for good), cutting it to at
/// most `need` bytes first; otherwise leaves it as it is.
fn give_back(buf: &mut Vec<u8>, need: usize) {
    if buf.capacity() / 2 > need {
        buf.truncate(need);
        buf.shrink_to(need);
    }
}

/// Empties `buf` for a message of `need` bytes, keeping its memory unless it
/// holds more than twice that (see `give_back`).
fn fit(buf: &mut Vec<u8>, need: usize) {
    buf.clear();
    give_back(buf, need);
    buf.reserve(need);
}

/// Splits `buf` into one `Vec` per count.
fn split(buf: &[u8], counts: &[Count], displs: &[Count]) -> Vec<Vec<u8>> {
    counts
        .iter()
        .zip(displs)
        .map(|(&c, &d)| {
            // Both are non-negative and `d + c <= buf.len()` (checked by `layout`).
            let (c, d) = (c as usize, d as usize);
            buf.get(d..d + c).map(<[u8]>::to_vec).unwrap_or_default()
        })
        .collect()
}

impl<C: Communicator> Collective for MpiCollective<C> {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_gather(&mut self, local: &[u8]) -> Result<Vec<Vec<u8>>, CollectiveError> {
        check_live()?;
        let comm = &*self.comm;
        let mine = u64::try_from(local.len()).unwrap_or(POISON);
        let mut counts = vec![0u64; self.size];
        comm.all_gather_into(&mine, &mut counts[..]);
        // Every rank has the same counts, hence takes the same branch.
        let Some((c, d, total)) = layout(&counts) else {
            // Everyone receives everything: the total is over the limit on
            // every rank, whether or not its own buffer is.
            return Err(err(MpiCollectiveError::TooLarge {
                op: "all_gather",
                send_bytes: mine,
                recv_bytes: total(&counts).unwrap_or(u64::MAX),
                largest_from: largest(&counts),
            }));
        };
        // At least one byte, so that the buffer has a real address (see `real`).
        let mut buf = vec![0u8; total.max(1)];
        {
            let mut part = PartitionMut::new(&mut buf[..], &c[..], &d[..]);
            comm.all_gather_varcount_into(real(local), &mut part);
        }
        Ok(split(&buf, &c, &d))
    }

    fn all_to_all(&mut self, send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, CollectiveError> {
        check_live()?;
        let comm = &*self.comm;
        let size = self.size;
        let wrong_count = send.len() != size;
        // A wrong call still takes part in the exchanges, with poisoned counts,
        // so that every rank fails it and the group stays in step.
        let send_counts: Vec<u64> = if wrong_count {
            vec![POISON; size]
        } else {
            send.iter()
                .map(|b| u64::try_from(b.len()).unwrap_or(POISON))
                .collect()
        };
        let mut recv_counts = vec![0u64; size];
        comm.all_to_all_into(&send_counts[..], &mut recv_counts[..]);

        let send_layout = layout(&send_counts);
        let recv_layout = layout(&recv_counts);
        let send_bytes = total(&send_counts).unwrap_or(u64::MAX);
        let recv_bytes = total(&recv_counts).unwrap_or(u64::MAX);
        // 0 if this rank's call is valid, else the offending total (at least 2^31).
        let mine: u64 = if send_layout.is_some() && recv_layout.is_some() {
            0
        } else {
            send_bytes.max(recv_bytes)
        };
        let mut worst = 0u64;
        comm.all_reduce_into(&mine, &mut worst, SystemOperation::max());

        let (Some((sc, sd, stotal)), Some((rc, rd, rtotal)), 0) = (send_layout, recv_layout, worst)
        else {
            let e = if wrong_count {
                MpiCollectiveError::BufferCount {
                    given: send.len(),
                    size,
                }
            } else if send_bytes > MAX_MESSAGE_BYTES
                || (recv_bytes > MAX_MESSAGE_BYTES && !recv_counts.contains(&POISON))
            {
                MpiCollectiveError::TooLarge {
                    op: "all_to_all",
                    send_bytes,
                    recv_bytes,
                    largest_from: largest(&recv_counts),
                }
            } else {
                MpiCollectiveError::OtherRank {
                    op: "all_to_all",
                    largest_total: worst,
                    send_bytes,
                    recv_bytes,
                }
            };
            return Err(err(e));
        };

        // Both buffers at least one byte long, so that they have real
        // addresses (see `real`); the counts say what is sent. Their memory
        // is kept from call to call (see `fit`).
        let sbuf = &mut self.sbuf;
        fit(sbuf, stotal.max(1));
        for b in &send {
            sbuf.extend_from_slice(b);
        }
        if sbuf.is_empty() {
            sbuf.push(0);
        }
        // Receive into the first `rtotal` bytes (every one written by MPI:
        // the displacements are contiguous), zeroing only when it grows.
        let need = rtotal.max(1);
        give_back(&mut self.rbuf, need);
        if self.rbuf.len() < need {
            self.rbuf.resize(need, 0);
        }
        let rbuf = &mut self.rbuf[..need];
        {
            let spart = Partition::new(&sbuf[..], &sc[..], &sd[..]);
            let mut rpart = PartitionMut::new(&mut rbuf[..], &rc[..], &rd[..]);
            comm.all_to_all_varcount_into(&spart, &mut rpart);
        }
        // What rank `r` sent goes back in the buffer this rank sent to `r`
        // (the caller's memory, already about the right size).
        let mut recv = send;
        for ((b, &c), &d) in recv.iter_mut().zip(&rc).zip(&rd) {
            b.clear();
            // Both are non-negative and `d + c <= rbuf.len()` (checked by `layout`).
            let (c, d) = (c as usize, d as usize);
            b.extend_from_slice(rbuf.get(d..d + c).unwrap_or_default());
        }
        Ok(recv)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_limits() {
        assert_eq!(layout(&[]), Some((vec![], vec![], 0)));
        assert_eq!(
            layout(&[0, 3, 0, 2]),
            Some((vec![0, 3, 0, 2], vec![0, 0, 3, 3], 5))
        );
        assert!(layout(&[MAX_MESSAGE_BYTES]).is_some());
        assert!(layout(&[MAX_MESSAGE_BYTES, 0, 0]).is_some());
        assert!(layout(&[MAX_MESSAGE_BYTES + 1]).is_none());
        assert!(layout(&[MAX_MESSAGE_BYTES, 1]).is_none());
        assert!(layout(&[1 << 30, 1 << 30]).is_none());
        assert!(layout(&[(1 << 30) - 1, 1 << 30]).is_some());
        assert!(layout(&[u64::MAX - 1, 2]).is_none());
        assert!(layout(&[0, POISON]).is_none());
    }

    #[test]
    fn split_parts() {
        let buf = [1u8, 2, 3, 4, 5];
        assert_eq!(
            split(&buf, &[0, 3, 0, 2], &[0, 0, 3, 3]),
            vec![vec![], vec![1, 2, 3], vec![], vec![4, 5]]
        );
    }

    #[test]
    fn fit_keeps_memory_unless_far_too_large() {
        let mut b = vec![7u8; 1000];
        fit(&mut b, 600);
        assert!(b.is_empty() && b.capacity() >= 1000, "{}", b.capacity());
        fit(&mut b, 1500);
        assert!(b.is_empty() && b.capacity() >= 1500);
        let kept = b.capacity();
        fit(&mut b, 10);
        assert!(b.is_empty() && b.capacity() >= 10 && b.capacity() < kept / 2);
    }

    #[test]
    fn give_back_keeps_contents_it_does_not_cut() {
        // Within twice the need: nothing changes, length and bytes included
        // (the receive buffer relies on it to zero only on growth).
        let mut b = vec![7u8; 1000];
        give_back(&mut b, 600);
        assert_eq!((b.len(), b.capacity()), (1000, 1000));
        assert!(b.iter().all(|&x| x == 7));
        // Far too large: cut to the need and its memory given back.
        give_back(&mut b, 100);
        assert_eq!(b.len(), 100);
        assert!(
            b.capacity() >= 100 && b.capacity() < 500,
            "{}",
            b.capacity()
        );
        assert!(b.iter().all(|&x| x == 7));
    }

    #[test]
    fn largest_count() {
        assert_eq!(largest(&[]), (0, 0));
        assert_eq!(largest(&[1, 9, 9, 2]), (9, 1));
    }

    #[test]
    fn messages_name_the_sizes() {
        let e = MpiCollectiveError::TooLarge {
            op: "all_to_all",
            send_bytes: 3_000_000_000,
            recv_bytes: 12,
            largest_from: (7, 2),
        };
        let s = e.to_string();
        assert!(s.contains("3000000000") && s.contains("2147483647"), "{s}");
        let e = MpiCollectiveError::BufferCount { given: 3, size: 4 };
        assert!(e.to_string().contains("3 buffers for a group of 4"));
    }
}
