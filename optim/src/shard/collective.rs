//! The collective operations a sharded step needs, and an in-process
//! implementation over threads.

use std::sync::{Arc, Condvar, Mutex};

/// The error a [`Collective`] returns: anything the engine reports.
pub type CollectiveError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The two collective operations of a sharded step, for any engine (MPI,
/// threads, a custom transport).
///
/// Every rank of the group must call the same operations in the same order
/// (as with MPI collectives). The optimizer only ever moves bytes through
/// them, and always in rank order, so an implementation needs no arithmetic:
/// its results must be exactly the bytes each rank gave.
///
/// An error from either operation fails the step (or fetch) that called it
/// before anything is written on the calling rank; the other ranks may then
/// wait forever in their next collective, as with any engine whose
/// participant stops: the group should be torn down (`MPI_Abort`).
pub trait Collective {
    /// This process's rank, `0..size()`.
    fn rank(&self) -> usize;

    /// The number of ranks in the group (at least 1).
    fn size(&self) -> usize;

    /// Every rank's `local` bytes, in rank order (this rank's included).
    fn all_gather(&mut self, local: &[u8]) -> Result<Vec<Vec<u8>>, CollectiveError>;

    /// Sends `send[r]` to rank `r` (`send.len() == size()`) and returns what
    /// every rank sent to this one, in rank order.
    fn all_to_all(&mut self, send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, CollectiveError>;
}

/// The shared mailbox of a [`ThreadCollective`] group.
#[derive(Debug)]
struct Mailbox {
    /// `slots[from][to]`: what `from` sent to `to` in the current round.
    slots: Vec<Vec<Option<Vec<u8>>>>,
    /// Ranks that deposited in the current round.
    arrived: usize,
    /// Ranks that collected in the current round.
    collected: usize,
    /// Round number (so that a fast rank cannot enter the next round early).
    round: u64,
    /// A rank dropped its handle: the group is broken.
    broken: bool,
}

/// An in-process [`Collective`] over threads: one handle per rank, each moved
/// to its own thread (for tests, and for sharding within one machine).
///
/// ```
/// use lazyadam::{Collective, ThreadCollective};
///
/// let handles = ThreadCollective::group(3);
/// let out: Vec<Vec<Vec<u8>>> = std::thread::scope(|s| {
///     let joins: Vec<_> = handles
///         .into_iter()
///         .map(|mut c| s.spawn(move || c.all_gather(&[c.rank() as u8]).unwrap()))
///         .collect();
///     joins.into_iter().map(|j| j.join().unwrap()).collect()
/// });
/// assert!(out.iter().all(|g| *g == vec![vec![0u8], vec![1], vec![2]]));
/// ```
#[derive(Debug)]
pub struct ThreadCollective {
    rank: usize,
    size: usize,
    shared: Arc<(Mutex<Mailbox>, Condvar)>,
}

/// A collective whose group lost a member.
#[derive(Debug, thiserror::Error)]
#[error("the thread collective's group is broken: a rank dropped its handle")]
struct Broken;

impl ThreadCollective {
    /// A group of `size` ranks (at least 1; 0 gives one rank), handles in rank order.
    pub fn group(size: usize) -> Vec<ThreadCollective> {
        let size = size.max(1);
        let shared = Arc::new((
            Mutex::new(Mailbox {
                slots: vec![vec![None; size]; size],
                arrived: 0,
                collected: 0,
                round: 0,
                broken: false,
            }),
            Condvar::new(),
        ));
        (0..size)
            .map(|rank| ThreadCollective {
                rank,
                size,
                shared: Arc::clone(&shared),
            })
            .collect()
    }

    /// One round: deposit `send[to]` for every `to`, wait for every rank,
    /// collect what every rank sent to this one.
    fn exchange(&mut self, send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, CollectiveError> {
        let (lock, cv) = &*self.shared;
        let mut mb = lock
            .lock()
            .map_err(|_| Box::new(Broken) as CollectiveError)?;
        // Wait until the previous round is fully collected.
        while mb.collected != 0 && !mb.broken {
            mb = cv
                .wait(mb)
                .map_err(|_| Box::new(Broken) as CollectiveError)?;
        }
        if mb.broken {
            return Err(Box::new(Broken));
        }
        let round = mb.round;
        for (to, bytes) in send.into_iter().enumerate() {
            mb.slots[self.rank][to] = Some(bytes);
        }
        mb.arrived += 1;
        if mb.arrived == self.size {
            cv.notify_all();
        }
        // The round cannot advance before this rank collects.
        debug_assert_eq!(mb.round, round);
        while mb.arrived < self.size && !mb.broken {
            mb = cv
                .wait(mb)
                .map_err(|_| Box::new(Broken) as CollectiveError)?;
        }
        // A complete round is collected even if a rank has since dropped its
        // handle (it may have finished its last round and gone).
        if mb.arrived < self.size {
            return Err(Box::new(Broken));
        }
        let me = self.rank;
        let out = (0..self.size)
            .map(|from| mb.slots[from][me].take().unwrap_or_default())
            .collect();
        mb.collected += 1;
        if mb.collected == self.size {
            mb.arrived = 0;
            mb.collected = 0;
            mb.round += 1;
            cv.notify_all();
        }
        Ok(out)
    }
}

impl Drop for ThreadCollective {
    fn drop(&mut self) {
        let (lock, cv) = &*self.shared;
        if let Ok(mut mb) = lock.lock() {
            mb.broken = true;
            cv.notify_all();
        }
    }
}

impl Collective for ThreadCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_gather(&mut self, local: &[u8]) -> Result<Vec<Vec<u8>>, CollectiveError> {
        let send = vec![local.to_vec(); self.size];
        self.exchange(send)
    }

    fn all_to_all(&mut self, send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, CollectiveError> {
        if send.len() != self.size {
            return Err(format!(
                "all_to_all: {} buffers for a group of {} ranks",
                send.len(),
                self.size
            )
            .into());
        }
        self.exchange(send)
    }
}
