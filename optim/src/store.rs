//! Owned slot storage, with transparent huge pages for large buffers.
//!
//! The rows of a sparse step land at random places of the parameter table and
//! of its slots: with 4 KiB pages, nearly every row costs a TLB miss and a
//! page walk (a 1,000,000 x 64 f32 table with `m` and `v` spans 768 MiB, or
//! 196,608 pages). With 2 MiB pages the same memory is 384 pages, which the
//! TLB covers. On Linux, slot buffers of [`HUGE_PAGE_MIN_BYTES`] or more are
//! therefore advised with `madvise(MADV_HUGEPAGE)` before they are first
//! written, so that the kernel backs them with huge pages when transparent
//! huge pages are in `madvise` (or `always`) mode. Only the 2 MiB-aligned
//! interior of a buffer can be advised; nothing changes in `never` mode or on
//! other systems. [`advise_huge_pages`] does the same for a caller's buffer
//! (a parameter table), collapsing pages already written.

use lazyadam_kernels::{DType, Element, bf16, f16};

use crate::error::Error;
use crate::tensor::{TensorRef, WeightData};

/// Size of a huge page (x86_64, aarch64 with 4 KiB base pages).
const HUGE_PAGE: usize = 2 << 20;

/// Optimizer buffers (slots, per-row counters) of at least this many bytes
/// are advised for transparent huge pages (Linux).
pub(crate) const HUGE_PAGE_MIN_BYTES: usize = 4 << 20;

/// Advises the 2 MiB-aligned interior of `[addr, addr + len)` for huge pages;
/// with `collapse`, pages already present are collapsed into huge pages now.
/// The range must lie inside one live allocation of the caller. Returns
/// whether the advice was taken.
#[cfg(target_os = "linux")]
fn advise_range(addr: usize, len: usize, collapse: bool) -> bool {
    let start = addr.next_multiple_of(HUGE_PAGE);
    let end = (addr.saturating_add(len) / HUGE_PAGE) * HUGE_PAGE;
    if end <= start {
        return false;
    }
    let ptr = start as *mut libc::c_void;
    // SAFETY: `MADV_HUGEPAGE` only changes how the kernel backs the pages of
    // the range, never their contents; the range is page-aligned (as madvise
    // requires) and inside a live allocation of the caller, so no other
    // object's memory is affected. A failure (old kernel, THP disabled) is
    // reported by the return value and changes nothing.
    let advised = unsafe { libc::madvise(ptr, end - start, libc::MADV_HUGEPAGE) } == 0;
    #[cfg(target_env = "gnu")]
    if advised && collapse {
        // SAFETY: as above; `MADV_COLLAPSE` (Linux 6.1+) copies the present
        // small pages into huge pages, keeping every byte. Failure (older
        // kernel, no free huge page) leaves the pages as they were.
        let _ = unsafe { libc::madvise(ptr, end - start, libc::MADV_COLLAPSE) };
    }
    #[cfg(not(target_env = "gnu"))]
    let _ = collapse;
    advised
}

#[cfg(not(target_os = "linux"))]
fn advise_range(_addr: usize, _len: usize, _collapse: bool) -> bool {
    false
}

/// Advises the memory of `data` for transparent huge pages (2 MiB), to cut
/// the TLB misses of random row accesses into a large table: on Linux,
/// `madvise(MADV_HUGEPAGE)` on the 2 MiB-aligned part of `data`, then
/// `MADV_COLLAPSE` (Linux 6.1+), which copies the pages already written into
/// huge pages at once (otherwise the kernel's `khugepaged` does it slowly in
/// the background). The contents are unchanged. It takes effect when
/// `/sys/kernel/mm/transparent_hugepage/enabled` is `madvise` or `always`.
/// Returns whether the advice was taken; a no-op returning `false` on other
/// systems and for slices without a whole aligned 2 MiB page.
///
/// The optimizer does this itself for its own large slot buffers; this is
/// for the parameter tables you own. Cheapest right after allocation, before
/// the table is written (nothing to collapse then); collapsing a written
/// table copies it once.
///
/// ```
/// let mut table = vec![0.0f32; 1 << 22]; // 16 MiB
/// let advised = lazyadam::advise_huge_pages(&table);
/// table[0] = 1.0; // contents and use are unchanged either way
/// # let _ = advised;
/// ```
pub fn advise_huge_pages<T>(data: &[T]) -> bool {
    advise_range(data.as_ptr() as usize, std::mem::size_of_val(data), true)
}

/// Advises the spare capacity of `v` (not yet written) when it is large.
fn advise_spare<T>(v: &mut Vec<T>) {
    let spare = v.spare_capacity_mut();
    let bytes = std::mem::size_of_val(spare);
    if bytes >= HUGE_PAGE_MIN_BYTES {
        advise_range(spare.as_ptr() as usize, bytes, false);
    }
}

/// A copy of `s` (advised for huge pages before it is written when large).
fn copy_of<T: Copy>(s: &[T]) -> Vec<T> {
    let mut v = Vec::with_capacity(s.len());
    advise_spare(&mut v);
    v.extend_from_slice(s);
    v
}

/// An owned, typed vector (a slot: `m`, `v` or `vhat`). Large ones are
/// advised for huge pages (see the module documentation), clones included.
#[derive(Debug, PartialEq)]
pub(crate) enum Store {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

/// Allocates `n` zeros without aborting on failure (advised for huge pages
/// before they are written, when large).
pub(crate) fn try_zeros<T: Clone + Default>(n: usize, what: &str) -> Result<Vec<T>, Error> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| Error::OutOfMemory {
        what: what.to_string(),
    })?;
    advise_spare(&mut v);
    v.resize(n, T::default());
    Ok(v)
}

impl Clone for Store {
    fn clone(&self) -> Self {
        match self {
            Store::F32(v) => Store::F32(copy_of(v)),
            Store::F16(v) => Store::F16(copy_of(v)),
            Store::BF16(v) => Store::BF16(copy_of(v)),
        }
    }
}

impl Store {
    pub(crate) fn zeros(dtype: DType, n: usize, what: &str) -> Result<Store, Error> {
        Ok(match dtype {
            DType::F32 => Store::F32(try_zeros(n, what)?),
            DType::F16 => Store::F16(try_zeros(n, what)?),
            DType::BF16 => Store::BF16(try_zeros(n, what)?),
        })
    }

    pub(crate) fn as_ref(&self) -> TensorRef<'_> {
        match self {
            Store::F32(v) => TensorRef::F32(v),
            Store::F16(v) => TensorRef::F16(v),
            Store::BF16(v) => TensorRef::BF16(v),
        }
    }

    pub(crate) fn to_weight_data(&self) -> WeightData {
        match self {
            Store::F32(v) => WeightData::F32(v.clone()),
            Store::F16(v) => WeightData::F16(v.clone()),
            Store::BF16(v) => WeightData::BF16(v.clone()),
        }
    }

    pub(crate) fn from_weight_data(d: &WeightData) -> Option<Store> {
        match d {
            WeightData::F32(v) => Some(Store::F32(copy_of(v))),
            WeightData::F16(v) => Some(Store::F16(copy_of(v))),
            WeightData::BF16(v) => Some(Store::BF16(copy_of(v))),
            WeightData::I64(_) => None,
        }
    }

    /// The first element below zero, with its index. A second moment (`v`,
    /// `vhat`) never is one: every step keeps it a (maximum of) running
    /// average(s) of squares, so a negative one is corrupt (and would turn
    /// the next update's `sqrt(v)` into NaN). `-0.0`, infinities above zero
    /// and NaN are not below zero.
    pub(crate) fn first_negative(&self) -> Option<(usize, f32)> {
        fn find<T: Element>(v: &[T]) -> Option<(usize, f32)> {
            v.iter()
                .map(|x| x.to_f32())
                .enumerate()
                .find(|&(_, x)| x < 0.0)
        }
        match self {
            Store::F32(v) => find(v),
            Store::F16(v) => find(v),
            Store::BF16(v) => find(v),
        }
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        match self {
            Store::F32(v) => bytemuck::cast_slice(v),
            Store::F16(v) => bytemuck::cast_slice(v),
            Store::BF16(v) => bytemuck::cast_slice(v),
        }
    }
}

/// The storage element types with access to the matching [`Store`] variant.
pub(crate) trait StoreElem: Element {
    fn slice_mut(s: &mut Store) -> Option<&mut [Self]>;
}

impl StoreElem for f32 {
    fn slice_mut(s: &mut Store) -> Option<&mut [Self]> {
        match s {
            Store::F32(v) => Some(v),
            _ => None,
        }
    }
}

impl StoreElem for f16 {
    fn slice_mut(s: &mut Store) -> Option<&mut [Self]> {
        match s {
            Store::F16(v) => Some(v),
            _ => None,
        }
    }
}

impl StoreElem for bf16 {
    fn slice_mut(s: &mut Store) -> Option<&mut [Self]> {
        match s {
            Store::BF16(v) => Some(v),
            _ => None,
        }
    }
}
