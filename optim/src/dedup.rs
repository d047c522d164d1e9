//! Duplicate-id detection: a radix sort of the occurrences ([`Dedup`], for
//! large steps, which may run in parallel and need the rows sorted), or a small
//! hash table ([`RowHash`], for steps that run sequentially and only need each
//! occurrence mapped to its distinct row).
//!
//! Radix sort. Each occurrence `i` of row `r` becomes the key `(r << pos_bits) | i`; a
//! least-significant-digit radix sort on the row bits (stable, so the
//! occurrences of a row stay in occurrence order) groups the occurrences by
//! row, in increasing row order. The distinct rows are then the runs of equal
//! rows. This costs a few sequential passes over `8 * n` bytes, whatever the
//! size of the table, and leaves the rows sorted: the row updates then walk
//! the tables in address order, and the parallel path splits them into
//! disjoint row ranges directly. All buffers are kept across steps: no
//! allocation once they have grown to the largest gradient seen.

use crate::step::mix64;

/// One distinct row of a sparse gradient.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Distinct {
    /// The row id.
    pub row: usize,
    /// With `count == 1`: the position of the row's only occurrence in the id
    /// list. Otherwise: the start of the row's occurrences in
    /// [`Dedup::sorted`].
    pub pos: usize,
    /// Number of occurrences.
    pub count: usize,
}

/// Reusable dedup state.
#[derive(Debug, Default)]
pub(crate) struct Dedup {
    /// Distinct rows in increasing row order.
    pub distinct: Vec<Distinct>,
    /// The occurrences sorted by row, then position; an entry's position in
    /// the id list is `entry & pos_mask`.
    pub sorted: Vec<u64>,
    /// See [`Dedup::sorted`].
    pub pos_mask: u64,
    tmp: Vec<u64>,
    hist: Vec<u32>,
    wide: Vec<u128>,
    /// Scratch of [`Dedup::build_parallel`].
    #[cfg(feature = "rayon")]
    par: ParScratch,
}

/// Scratch of [`Dedup::build_parallel`], kept across steps.
#[cfg(feature = "rayon")]
#[derive(Debug, Default)]
struct ParScratch {
    /// Per chunk of the ids, per bucket: the chunk's keys in that bucket, in
    /// occurrence order.
    chunk_keys: Vec<Vec<Vec<u64>>>,
    /// Per bucket: its sorted keys, sort scratch and distinct rows.
    buckets: Vec<Bucket>,
    /// The sampled ids (rows), sorted.
    sample: Vec<u64>,
    /// The first row of every bucket but the first, increasing.
    bounds: Vec<u64>,
}

/// One bucket (a range of rows) of [`Dedup::build_parallel`].
#[cfg(feature = "rayon")]
#[derive(Debug, Default)]
struct Bucket {
    keys: Vec<u64>,
    tmp: Vec<u64>,
    hist: Vec<u32>,
    distinct: Vec<Distinct>,
}

/// Steps with fewer ids than this find their duplicates on one thread (the
/// parallel build's fixed cost, a few rayon tasks, outweighs its gain).
#[cfg(feature = "rayon")]
pub(crate) const PARALLEL_MIN_IDS: usize = 8192;

/// The parallel build aims at this many keys per bucket (at least four
/// buckets per thread, at most [`MAX_BUCKETS`]).
#[cfg(feature = "rayon")]
const BUCKET_KEYS: usize = 4096;

/// Most buckets of the parallel build.
#[cfg(feature = "rayon")]
const MAX_BUCKETS: usize = 256;

/// The parallel build copies its buckets' distinct rows into place in
/// parallel from this many rows on.
#[cfg(feature = "rayon")]
const PARALLEL_MIN_COPY: usize = 1 << 15;

/// Ids sampled per bucket to place the parallel build's bucket boundaries.
#[cfg(feature = "rayon")]
const SAMPLE_PER_BUCKET: usize = 16;

/// Buckets of the parallel build with at most this many keys are sorted by
/// comparison (the keys are distinct, and sorting them whole orders them by
/// row, then position, as the stable radix sort does): below it, the radix
/// sort's histograms cost more than the keys.
#[cfg(feature = "rayon")]
const SMALL_SORT: usize = 256;

/// Largest radix digit of the parallel build's sorts of equal row ranges,
/// in bits. A range of a million-row table spans 12 bits: one pass of 4,096
/// counters rather than two of 64. (Sampled ranges keep [`MAX_DIGIT_BITS`]:
/// their hot ranges are narrow, and smaller digits leave room for the
/// radix sort's four streams.)
#[cfg(feature = "rayon")]
const BUCKET_MAX_DIGIT_BITS: u32 = 12;

/// Largest radix digit, in bits (2048 buckets: the histograms stay in L1).
const MAX_DIGIT_BITS: u32 = 11;

/// Chunks of the ids in [`Dedup::build_parallel`]: four per thread.
#[cfg(feature = "rayon")]
fn chunk_count(n: usize, threads: usize) -> usize {
    threads.saturating_mul(4).min(n)
}

/// Buckets of [`Dedup::build_parallel`] (before equal bounds merge):
/// [`MAX_BUCKETS`] means equal row ranges, fewer sampled ones.
#[cfg(feature = "rayon")]
fn bucket_count(n: usize, threads: usize) -> usize {
    (n / BUCKET_KEYS)
        .max(chunk_count(n, threads))
        .min(MAX_BUCKETS)
}

/// Whether a step of `n` ids on a pool of `threads` threads groups them
/// with [`Dedup::build_parallel`] rather than the one-thread
/// [`Dedup::build`] (both give the same result).
///
/// With sampled bucket bounds the parallel build does about twice the
/// one-thread sort's work (a scatter into buckets, then a sort of each), so
/// two threads gain nothing from it: they take it only with equal row
/// ranges (from `MAX_BUCKETS * BUCKET_KEYS` = 1,048,576 ids), where each
/// bucket sorts in one pass. Measured with `step_timing` on 1,000,000 x 64,
/// Zipf-like ids, 2 threads, whole steps, the one-thread sort against the
/// parallel build: 0.61x-0.95x the time at 8,192 to 49,152 ids (4 rounds of
/// 200 steps), 0.92x-0.98x at 262,144 and 524,288 ids; at 1,048,576 ids over
/// 10,000,000 x 64 the parallel build is the faster (55-56 ms against 61-63
/// ms). Larger pools take it from [`PARALLEL_MIN_IDS`] ids.
#[cfg(feature = "rayon")]
pub(crate) fn groups_in_parallel(n: usize, threads: usize) -> bool {
    match threads {
        0 | 1 => false,
        2 => n >= PARALLEL_MIN_IDS && bucket_count(n, threads) == MAX_BUCKETS,
        _ => n >= PARALLEL_MIN_IDS,
    }
}

/// Number of bits needed to write `x` (0 for 0).
fn bits(x: u64) -> u32 {
    u64::BITS - x.leading_zeros()
}

impl Dedup {
    /// Builds the distinct list of `n` ids (already validated to be `< rows`).
    pub(crate) fn build(&mut self, n: usize, rows: usize, id: impl Fn(usize) -> usize) {
        self.distinct.clear();
        self.sorted.clear();
        if n == 0 {
            return;
        }
        let row_bits = bits(rows.saturating_sub(1) as u64);
        let pos_bits = bits((n - 1) as u64);
        if row_bits + pos_bits > u64::BITS {
            // Astronomically many rows (an empty-row table): sort 128-bit keys.
            self.build_wide(n, id);
            return;
        }
        let pos_mask = if pos_bits == u64::BITS {
            u64::MAX
        } else {
            (1u64 << pos_bits) - 1
        };
        self.pos_mask = pos_mask;
        // `pos_bits < 64` whenever `row_bits > 0`; with one row every key is
        // its position and the list is already sorted.
        let row_shift = pos_bits.min(u64::BITS - 1);
        self.sorted
            .extend((0..n).map(|i| ((id(i) as u64) << row_shift) | i as u64));
        if row_bits > 0 {
            self.radix_sort(row_shift, row_bits);
        }
        let row_of = |x: u64| if row_bits == 0 { 0 } else { x >> row_shift };
        push_runs(&self.sorted, row_of, pos_mask, 0, &mut self.distinct);
    }

    /// Stable LSD radix sort of `sorted` on bits `shift..shift + key_bits`.
    fn radix_sort(&mut self, shift: u32, key_bits: u32) {
        radix_sort(
            &mut self.sorted,
            &mut self.tmp,
            &mut self.hist,
            shift,
            key_bits,
            MAX_DIGIT_BITS,
        );
    }

    /// [`Dedup::build`] on up to `threads` threads, with identical results:
    /// the rows are split into contiguous ranges (buckets), at quantiles of
    /// a sample of the ids (so that skewed ids still give buckets of similar
    /// sizes) or, for large steps, into equal ranges; chunks of the ids are
    /// scattered into per-chunk buckets in parallel, then each bucket
    /// gathers its chunks in chunk order (so its keys stay in occurrence
    /// order), radix-sorts them on their rows relative to the bucket's first
    /// row, writes them into place and finds its runs, all buckets in
    /// parallel; the buckets' distinct rows are then concatenated. Steps
    /// under [`PARALLEL_MIN_IDS`] ids, one-thread pools, and keys wider than
    /// 64 bits take [`Dedup::build`].
    #[cfg(feature = "rayon")]
    pub(crate) fn build_parallel(
        &mut self,
        n: usize,
        rows: usize,
        id: impl Fn(usize) -> usize + Sync,
        threads: usize,
    ) {
        use rayon::prelude::*;
        let row_bits = bits(rows.saturating_sub(1) as u64);
        let pos_bits = bits(n.saturating_sub(1) as u64);
        if n < PARALLEL_MIN_IDS || threads < 2 || row_bits == 0 || row_bits + pos_bits > u64::BITS {
            self.build(n, rows, id);
            return;
        }
        // Here `pos_bits < 64`, since `row_bits >= 1`.
        let pos_mask = (1u64 << pos_bits) - 1;
        self.pos_mask = pos_mask;
        let row_shift = pos_bits;
        let chunks = chunk_count(n, threads);
        let chunk_len = n.div_ceil(chunks);
        let par = &mut self.par;
        // 0. Bucket boundaries. A step with fewer than `MAX_BUCKETS *
        // BUCKET_KEYS` ids has a few buckets per thread, and a bucket that
        // takes most of the keys (ids crowded among the first rows, as
        // embedding ids often are) would leave the other threads idle: its
        // boundaries are rows at even quantiles of a sample of the ids, so
        // the buckets hold about as many keys whatever the ids' distribution
        // (a row that takes more than a bucket's share leaves fewer, larger
        // buckets: its keys all go to one). A larger step has enough buckets
        // for work stealing to balance, and takes `MAX_BUCKETS` equal row
        // ranges, each sorted on the same few bits. (Measured on 1,048,576
        // Zipf-like ids over 10,000,000 rows, 2 threads: sampled boundaries
        // took 8.5-9.7 ms against 7.2-7.4 ms with equal ranges.)
        let n_buckets = bucket_count(n, threads);
        let bounds = &mut par.bounds;
        bounds.clear();
        let mut uniform_bits = None;
        if n_buckets < MAX_BUCKETS {
            let sample_len = (n_buckets * SAMPLE_PER_BUCKET).min(n);
            let sample = &mut par.sample;
            sample.clear();
            sample.extend((0..sample_len).map(|k| id(k * (n / sample_len)) as u64));
            sample.sort_unstable();
            bounds.extend((1..n_buckets).map(|b| sample[b * sample_len / n_buckets]));
            bounds.dedup();
        } else {
            let width_bits = row_bits - row_bits.min(MAX_BUCKETS.ilog2());
            uniform_bits = Some(width_bits);
            bounds.extend(
                (1..MAX_BUCKETS as u64)
                    .map(|b| b << width_bits)
                    .filter(|&r| r < rows as u64),
            );
        }
        let digit_bits = match uniform_bits {
            Some(_) => BUCKET_MAX_DIGIT_BITS,
            None => MAX_DIGIT_BITS,
        };
        let bounds = &par.bounds[..];
        let n_buckets = bounds.len() + 1;
        // Bucket `b` holds the rows `lo(b)..hi(b)`: its number is the number
        // of bounds at or below the row.
        let lo = |b: usize| if b == 0 { 0 } else { bounds[b - 1] };
        let hi = |b: usize| bounds.get(b).copied().unwrap_or(rows as u64);
        let bucket_of = |row: u64| match uniform_bits {
            Some(width_bits) => (row >> width_bits) as usize,
            None => bounds.partition_point(|&x| x <= row),
        };
        if par.chunk_keys.len() < chunks {
            par.chunk_keys.resize_with(chunks, Vec::new);
        }
        // 1. Each chunk of ids into its own buckets, as keys of the row
        // relative to the bucket's first row.
        par.chunk_keys[..chunks]
            .par_iter_mut()
            .enumerate()
            .for_each(|(c, per_bucket)| {
                per_bucket.truncate(n_buckets);
                per_bucket.resize_with(n_buckets, Vec::new);
                per_bucket.iter_mut().for_each(Vec::clear);
                for i in c * chunk_len..((c + 1) * chunk_len).min(n) {
                    let row = id(i) as u64;
                    let b = bucket_of(row);
                    per_bucket[b].push(((row - lo(b)) << row_shift) | i as u64);
                }
                trim_together(per_bucket);
            });
        let chunk_keys = &par.chunk_keys[..chunks];
        let sizes: Vec<usize> = (0..n_buckets)
            .map(|b| chunk_keys.iter().map(|c| c[b].len()).sum())
            .collect();
        // 2. Each bucket: gather in chunk order, sort on its relative rows,
        // write its keys into place and find its runs. Growing `sorted`
        // writes only the new elements: every one is overwritten here.
        par.buckets.truncate(n_buckets);
        par.buckets.resize_with(n_buckets, Bucket::default);
        self.sorted.resize(n, 0);
        let mut offset = 0;
        let offsets: Vec<usize> = sizes
            .iter()
            .map(|&len| {
                let o = offset;
                offset += len;
                o
            })
            .collect();
        let key_outs = split_lengths(&mut self.sorted, &sizes);
        par.buckets
            .par_iter_mut()
            .zip(key_outs.into_par_iter().zip(offsets.par_iter()))
            .enumerate()
            .for_each(|(b, (bucket, (out, &offset)))| {
                let Bucket {
                    keys,
                    tmp,
                    hist,
                    distinct,
                } = bucket;
                keys.clear();
                for c in chunk_keys {
                    keys.extend_from_slice(&c[b]);
                }
                if keys.len() <= SMALL_SORT {
                    keys.sort_unstable();
                } else {
                    let span = hi(b) - lo(b);
                    radix_sort(keys, tmp, hist, row_shift, bits(span - 1), digit_bits);
                }
                let base = lo(b);
                for (o, &x) in out.iter_mut().zip(keys.iter()) {
                    *o = x + (base << row_shift);
                }
                distinct.clear();
                push_runs(
                    keys,
                    |x| (x >> row_shift) + base,
                    pos_mask,
                    offset,
                    distinct,
                );
                trim(keys);
                // Sort scratch: its contents are dead (and a bucket sorted
                // by comparison, or found already sorted, never shortened it).
                tmp.clear();
                trim(tmp);
            });
        // 3. The buckets' distinct rows, in bucket order: copied on this
        // thread when they are few (another round of rayon tasks would cost
        // more), in parallel otherwise.
        let distinct_lens: Vec<usize> = par.buckets.iter().map(|b| b.distinct.len()).collect();
        let total: usize = distinct_lens.iter().sum();
        if total < PARALLEL_MIN_COPY {
            self.distinct.clear();
            for bucket in &mut par.buckets {
                self.distinct.extend_from_slice(&bucket.distinct);
                trim(&mut bucket.distinct);
            }
            return;
        }
        // Growing writes only the new elements: every one is overwritten.
        let zero = Distinct {
            row: 0,
            pos: 0,
            count: 0,
        };
        self.distinct.resize(total, zero);
        let outs = split_lengths(&mut self.distinct, &distinct_lens);
        par.buckets
            .par_iter_mut()
            .zip(outs.into_par_iter())
            .for_each(|(bucket, out)| {
                out.copy_from_slice(&bucket.distinct);
                trim(&mut bucket.distinct);
            });
    }

    /// The general case: `(row, position)` as 128-bit keys.
    fn build_wide(&mut self, n: usize, id: impl Fn(usize) -> usize) {
        self.wide.clear();
        self.wide
            .extend((0..n).map(|i| ((id(i) as u128) << 64) | i as u128));
        self.wide.sort_unstable();
        self.pos_mask = u64::MAX;
        self.sorted.extend(self.wide.iter().map(|&k| k as u64));
        let keys = &self.wide;
        let mut i = 0;
        while i < n {
            let row = keys[i] >> 64;
            let mut j = i + 1;
            while j < n && keys[j] >> 64 == row {
                j += 1;
            }
            let count = j - i;
            self.distinct.push(Distinct {
                row: row as usize,
                pos: if count == 1 {
                    keys[i] as u64 as usize
                } else {
                    i
                },
                count,
            });
            i = j;
        }
    }

    /// Every row `0..rows` once, in order (dense gradients routed through the
    /// row path).
    pub(crate) fn build_identity(&mut self, rows: usize) {
        self.distinct.clear();
        self.sorted.clear();
        self.distinct.extend((0..rows).map(|r| Distinct {
            row: r,
            pos: r,
            count: 1,
        }));
    }
}

/// Appends the runs of equal rows of the sorted `keys` to `out`: a row
/// occurring once records its position (`key & pos_mask`), a repeated row the
/// index of its first key plus `offset` (where `keys` starts in
/// [`Dedup::sorted`]).
fn push_runs(
    keys: &[u64],
    row_of: impl Fn(u64) -> u64,
    pos_mask: u64,
    offset: usize,
    out: &mut Vec<Distinct>,
) {
    let n = keys.len();
    let mut i = 0;
    while i < n {
        let row = row_of(keys[i]);
        let mut j = i + 1;
        while j < n && row_of(keys[j]) == row {
            j += 1;
        }
        let count = j - i;
        out.push(Distinct {
            row: row as usize,
            pos: if count == 1 {
                (keys[i] & pos_mask) as usize
            } else {
                offset + i
            },
            count,
        });
        i = j;
    }
}

/// Most counters of one radix pass (over all its streams): 32 KiB of `u32`,
/// the size of an L1 data cache.
const MAX_COUNTERS: usize = 8192;

/// Most streams of one radix pass (see [`radix_sort`]).
const MAX_STREAMS: usize = 4;

/// Fewest keys per stream: below it, more streams cost more in histogram
/// clearing and prefix sums than they save.
const MIN_STREAM_KEYS: usize = 512;

/// Stable LSD radix sort of `keys` on bits `shift..shift + key_bits`, in
/// digits of at most `max_digit_bits` bits, with `tmp` and `hist` as scratch
/// (`keys` and `tmp` may be swapped).
///
/// Sparse ids are skewed (a few hot rows take a large share of them), and a
/// radix pass's counter increments and placements of one digit form a chain
/// through memory: with one stream, a hot digit serialises the pass on
/// store-to-load forwarding. Each pass therefore splits the keys into up to
/// [`MAX_STREAMS`] contiguous streams with their own counters, stream `s`'s
/// keys of a digit placed after those of streams `< s` (so the sort stays
/// stable), and walks the streams interleaved: a hot digit then makes that
/// many independent chains. The result is the same for any number of
/// streams.
fn radix_sort(
    keys: &mut Vec<u64>,
    tmp: &mut Vec<u64>,
    hist: &mut Vec<u32>,
    shift: u32,
    key_bits: u32,
    max_digit_bits: u32,
) {
    if key_bits == 0 || keys.len() < 2 {
        return;
    }
    let n = keys.len();
    let key_mask = u64::MAX >> (u64::BITS - key_bits.min(u64::BITS));
    let sort_bits = |x: u64| (x >> shift) & key_mask;
    // One row only (a hot row alone in its range of rows): already sorted.
    let first = sort_bits(keys[0]);
    if keys.iter().all(|&x| sort_bits(x) == first) {
        return;
    }
    if u32::try_from(n).is_err() {
        // Beyond the `u32` counters (32 GiB of keys). The keys are distinct
        // (each holds its position), so sorting them whole orders them by
        // the sort bits then by what is below them, as the stable sort does;
        // the bits above are equal in every caller.
        keys.sort_unstable_by_key(|&x| (sort_bits(x), x));
        return;
    }
    let passes = key_bits.div_ceil(max_digit_bits);
    let digit = key_bits.div_ceil(passes);
    let buckets = 1usize << digit;
    let streams = if n >= MAX_STREAMS * MIN_STREAM_KEYS && MAX_STREAMS * buckets <= MAX_COUNTERS {
        MAX_STREAMS
    } else {
        1
    };
    if tmp.len() < n {
        tmp.resize(n, 0);
    }
    tmp.truncate(n);
    hist.clear();
    hist.resize(streams * buckets, 0);
    for p in 0..passes {
        let s = shift + p * digit;
        let moved = if streams == MAX_STREAMS {
            radix_pass_streams::<MAX_STREAMS>(keys, tmp, hist, s, digit)
        } else {
            radix_pass_streams::<1>(keys, tmp, hist, s, digit)
        };
        if moved {
            std::mem::swap(keys, tmp);
        }
    }
}

/// [`radix_pass`] with `S` streams on the `digit` bits of the keys from bit
/// `s` on, with the digit width a constant for the widths of large sorts.
///
/// With the width known at compile time, the masks, the counter offsets and
/// the prefix-sum loop are fixed: the duplicate detection of the 16,384 ids
/// of `sparse_1m_d64` (two passes of 10 bits) took a median 0.83x (one
/// thread) and 0.76x (two) the time it took with the width in a variable, in
/// four alternated runs of `serial-fraction` (`benches/README.md`). Widths
/// below 8 (tables of fewer than 256 rows, narrow row ranges of the parallel
/// build) stay variable: their passes are short.
fn radix_pass_streams<const S: usize>(
    keys: &[u64],
    tmp: &mut [u64],
    hist: &mut [u32],
    s: u32,
    digit: u32,
) -> bool {
    match digit {
        8 => radix_pass::<S, 8>(keys, tmp, hist, s, digit),
        9 => radix_pass::<S, 9>(keys, tmp, hist, s, digit),
        10 => radix_pass::<S, 10>(keys, tmp, hist, s, digit),
        11 => radix_pass::<S, 11>(keys, tmp, hist, s, digit),
        12 => radix_pass::<S, 12>(keys, tmp, hist, s, digit),
        _ => radix_pass::<S, 0>(keys, tmp, hist, s, digit),
    }
}

/// One pass of [`radix_sort`] with `S` streams, on the `digit` bits of the
/// keys from bit `s` on (`DIGIT` if it is not 0, which must then equal
/// `digit`), from `keys` into `tmp` (both `n` long; `hist` at least
/// `S << digit` long). Returns `false`, having moved nothing, when every key
/// has the same digit.
#[inline(always)]
fn radix_pass<const S: usize, const DIGIT: u32>(
    keys: &[u64],
    tmp: &mut [u64],
    hist: &mut [u32],
    s: u32,
    digit: u32,
) -> bool {
    debug_assert!(DIGIT == 0 || DIGIT == digit);
    let n = keys.len();
    let buckets = 1usize << if DIGIT == 0 { digit } else { DIGIT };
    let d = |x: u64| ((x >> s) as usize) & (buckets - 1);
    // Streams `0..S` start at `st * len`; the last one also takes the keys
    // after `S * len`.
    let len = n / S;
    let (body, tail) = keys.split_at(S * len);
    let hist = &mut hist[..S * buckets];
    hist.fill(0);
    let last = (S - 1) * buckets;
    for j in 0..len {
        for st in 0..S {
            hist[st * buckets + d(body[st * len + j])] += 1;
        }
    }
    for &x in tail {
        hist[last + d(x)] += 1;
    }
    let first_digit = d(keys[0]);
    if (0..S)
        .map(|st| hist[st * buckets + first_digit] as usize)
        .sum::<usize>()
        == n
    {
        return false;
    }
    // Counters become start positions: digit-major, stream-minor.
    let mut sum = 0u32;
    for b in 0..buckets {
        for st in 0..S {
            let c = &mut hist[st * buckets + b];
            let x = *c;
            *c = sum;
            sum += x;
        }
    }
    for j in 0..len {
        for st in 0..S {
            let x = body[st * len + j];
            let at = &mut hist[st * buckets + d(x)];
            tmp[*at as usize] = x;
            *at += 1;
        }
    }
    for &x in tail {
        let at = &mut hist[last + d(x)];
        tmp[*at as usize] = x;
        *at += 1;
    }
    true
}

/// Gives back the memory of a scratch vector that holds far more than it
/// did in this step. The parallel build keeps 256 buckets per chunk of ids
/// and 256 sorted buckets; ids that move from one row range to the next
/// across steps would otherwise leave every bucket with the capacity of the
/// whole step, 256 times the memory of the keys. With this, what is kept is
/// at most about twice what the step used, plus a small constant per bucket.
#[cfg(feature = "rayon")]
fn trim<T>(v: &mut Vec<T>) {
    if v.capacity() > 2 * v.len() + 256 {
        v.shrink_to_fit();
    }
}

/// [`trim`] for a chunk's per-bucket buffers, taken together: they give
/// memory back only when all of them hold more than twice what this step
/// used (plus a constant). Bucket sizes move between batches of ids, and
/// trimming each buffer on its own freed and regrew some of them every step
/// (measured on 262,144 Zipf-like ids, 2 threads: the whole parallel build
/// 2.79-3.04 ms against 3.04-3.18 ms). What is kept stays bounded: at most
/// twice the chunk's keys plus 256.
#[cfg(feature = "rayon")]
fn trim_together<T>(vs: &mut [Vec<T>]) {
    let used = vs.iter().fold(0usize, |a, v| a.saturating_add(v.len()));
    let kept = vs
        .iter()
        .fold(0usize, |a, v| a.saturating_add(v.capacity()));
    if kept > used.saturating_mul(2).saturating_add(256) {
        vs.iter_mut().for_each(trim);
    }
}

/// Splits `s` into consecutive slices of the given lengths (which sum to at
/// most `s.len()`).
#[cfg(feature = "rayon")]
fn split_lengths<'a, T>(mut s: &'a mut [T], lengths: &[usize]) -> Vec<&'a mut [T]> {
    let mut out = Vec::with_capacity(lengths.len());
    for &len in lengths {
        let len = len.min(s.len());
        let (a, rest) = std::mem::take(&mut s).split_at_mut(len);
        out.push(a);
        s = rest;
    }
    out
}

/// Maps each occurrence of a step's ids to the index of its distinct row, with
/// an open-addressing hash table sized by the number of ids (so it stays in
/// L1/L2 whatever the size of the embedding table). Distinct rows are listed
/// in order of first occurrence. Everything is kept across steps; a
/// generation stamp makes old entries empty, so the table is not cleared.
///
/// An entry is one `u64`: the generation in the high half, the row id in the
/// low half (so the table takes ids below 2^32, every embedding table in
/// practice; [`RowHash::build`] declines larger tables). The index of an
/// entry's row sits in a separate array that the probing never reads: a build
/// records each occurrence's slot and turns slots into indices in a second
/// pass (see [`RowHash::build`] for why).
///
/// Ids chosen to collide must not make a step quadratic: the hash is keyed
/// with a random key of this table (the splitmix64 finalizer of `id ^ key`,
/// so colliding ids cannot be chosen without the key), and a build gives up
/// once its probes exceed [`RowHash::probe_budget`], linear in the number of
/// ids; the caller then sorts the ids instead, which costs the same for any
/// ids. Neither changes a result: only which rows share a bucket.
#[derive(Debug, Default)]
pub(crate) struct RowHash {
    /// Distinct rows, in order of first occurrence.
    pub rows: Vec<usize>,
    /// Per occurrence: the index of its row in `rows`.
    pub slot_of: Vec<u32>,
    /// Entries (`generation << 32 | row`): a power of two long, plus one
    /// write-only entry at the end (see [`RowHash::build`]).
    table: Vec<u64>,
    /// Per entry: the index in `rows` of the entry's row (same length as
    /// `table`).
    index_of: Vec<u32>,
    generation: u32,
    /// The hash key (0: not drawn yet).
    key: u64,
    /// Probes of the last build (for tests).
    pub probes: usize,
}

/// A random key for [`RowHash`], from std's per-process random hasher keys.
fn random_key() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0x5EED);
    h.finish() | 1
}

impl RowHash {
    /// Largest number of ids [`RowHash::build`] takes.
    pub(crate) const MAX_IDS: usize = 1 << 30;

    /// Largest table (number of rows) [`RowHash::build`] takes: its ids fit
    /// in the low half of an entry. (A `u64`: 2^32 is not a `usize` on
    /// 32-bit targets, where every table fits.)
    pub(crate) const MAX_ROWS: u64 = 1 << 32;

    /// Most probes a build of `n` ids may take before it gives up: with the
    /// table at most half full and a random hash, a build takes about 1.5
    /// probes per id; four per id (plus slack for tiny steps) is never
    /// reached by chance in practice, and keeps the worst case linear.
    pub(crate) fn probe_budget(n: usize) -> usize {
        4 * n + 64
    }

    /// Maps the `n` ids (`n <= MAX_IDS`) given by `id`, each below `rows`;
    /// returns `false` (and leaves `rows`/`slot_of` meaningless) if `rows`
    /// exceeds [`RowHash::MAX_ROWS`] or the ids took more than
    /// [`RowHash::probe_budget`] probes.
    ///
    /// About one probe per id (the table is at most half full). The loop has
    /// no branch on whether a row is new, which is as unpredictable as the
    /// ids: a new row's entry and index are written to its own slot, a
    /// repeated row's to a dummy slot past the end (a hot row, in 31% of the
    /// ids of one of the peer workloads, would otherwise chain every lookup of
    /// it through store-to-load forwarding), and each occurrence records its
    /// slot; a second pass turns slots into indices. With the index read in
    /// the loop instead, the compiler branched on newness, and the build's
    /// time moved by 1.25x with where the loop was placed in the binary
    /// (`benches/README.md`).
    #[must_use]
    pub(crate) fn build(&mut self, n: usize, rows: usize, id: impl Fn(usize) -> usize) -> bool {
        if rows as u64 > Self::MAX_ROWS {
            return false;
        }
        if self.key == 0 {
            self.key = random_key();
        }
        self.build_keyed(n, id)
    }

    /// [`RowHash::build`] with the current key, for ids below
    /// [`RowHash::MAX_ROWS`].
    fn build_keyed(&mut self, n: usize, id: impl Fn(usize) -> usize) -> bool {
        debug_assert!(n <= Self::MAX_IDS);
        self.rows.clear();
        self.slot_of.clear();
        self.probes = 0;
        if n == 0 {
            return true;
        }
        // At most half full: short probe sequences.
        let cap = (2 * n).next_power_of_two().max(16);
        if self.table.len() != cap + 1 || self.generation == u32::MAX {
            self.table.clear();
            self.table.resize(cap + 1, 0);
            self.index_of.resize(cap + 1, 0);
            self.generation = 0;
        }
        self.generation += 1;
        let stamp = u64::from(self.generation) << 32;
        let shift = u64::BITS - cap.trailing_zeros();
        let mask = cap - 1;
        let key = self.key;
        let budget = Self::probe_budget(n);
        let mut probes = 0usize;
        // Room for every id to be new, so that a new row is recorded without a
        // branch (the entry past the end is overwritten until a row claims it).
        self.rows.resize(n, 0);
        self.slot_of.resize(n, 0);
        let (table, index_of, rows) = (
            &mut self.table[..],
            &mut self.index_of[..],
            &mut self.rows[..],
        );
        let mut len = 0usize;
        for (i, so) in self.slot_of.iter_mut().enumerate() {
            let row = id(i);
            debug_assert!((row as u64) < Self::MAX_ROWS);
            let want = stamp | row as u64;
            // The top bits of a keyed splitmix64 finalizer.
            let mut h = (mix64(row as u64 ^ key) >> shift) as usize;
            let mut e = table[h];
            // Go on past entries of this generation that hold another row;
            // stop at this row's entry or at an empty one (another
            // generation's). One comparison: `e ^ want` is 0 at this row's
            // entry, at least 2^32 at an empty one. (Two, `e == want` and a
            // generation test, compiled to a branch on `e == want`, that is,
            // on whether the row is new.)
            let occupied = |e: u64| (e ^ want).wrapping_sub(1) < 0xFFFF_FFFF;
            while occupied(e) {
                h = (h + 1) & mask;
                e = table[h];
                probes += 1;
            }
            if probes > budget {
                self.probes = probes;
                return false;
            }
            let new = e != want;
            let at = if new { h } else { cap };
            table[at] = want;
            index_of[at] = len as u32;
            if len < n {
                rows[len] = row;
            }
            len += new as usize;
            *so = h as u32;
        }
        for so in &mut self.slot_of {
            *so = index_of[*so as usize];
        }
        self.rows.truncate(len);
        self.probes = probes;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rayon pool of `threads` threads, for the parallel build.
    #[cfg(feature = "rayon")]
    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
    }

    /// The reference: distinct rows in increasing order, each with its
    /// occurrence positions in order.
    fn reference(ids: &[usize]) -> Vec<(usize, Vec<usize>)> {
        let mut m = std::collections::BTreeMap::<usize, Vec<usize>>::new();
        for (i, &r) in ids.iter().enumerate() {
            m.entry(r).or_default().push(i);
        }
        m.into_iter().collect()
    }

    /// The positions of the occurrences of `x`, in occurrence order.
    fn positions(d: &Dedup, x: &Distinct) -> Vec<usize> {
        if x.count == 1 {
            vec![x.pos]
        } else {
            d.sorted[x.pos..x.pos + x.count]
                .iter()
                .map(|&k| (k & d.pos_mask) as usize)
                .collect()
        }
    }

    fn got(d: &Dedup) -> Vec<(usize, Vec<usize>)> {
        d.distinct
            .iter()
            .map(|x| (x.row, positions(d, x)))
            .collect()
    }

    #[test]
    fn dedup_groups_occurrences_in_order() {
        let ids = [4usize, 1, 4, 4, 0, 1];
        let mut d = Dedup::default();
        d.build(ids.len(), 5, |i| ids[i]);
        assert_eq!(
            got(&d),
            vec![(0, vec![4]), (1, vec![1, 5]), (4, vec![0, 2, 3])]
        );
        assert_eq!(d.distinct[0].count, 1);
        assert_eq!(d.distinct[2].count, 3);
        // Reuse.
        let ids2 = [7usize, 7];
        d.build(2, 1 << 20, |i| ids2[i]);
        assert_eq!(got(&d), vec![(7, vec![0, 1])]);
        d.build(0, 8, |_| 0);
        assert!(d.distinct.is_empty());
        let ids3 = [3usize, 2, 9];
        d.build(3, 10, |i| ids3[i]);
        assert_eq!(got(&d), reference(&ids3));
        assert!(d.distinct.iter().all(|x| x.count == 1));
        // One row; one id.
        d.build(4, 1, |_| 0);
        assert_eq!(got(&d), vec![(0, vec![0, 1, 2, 3])]);
        d.build(1, 1, |_| 0);
        assert_eq!(got(&d), vec![(0, vec![0])]);
    }

    #[test]
    fn dedup_matches_reference() {
        // Radix digits of 1, 3, 6, 8, 9, 10 and 11 bits (and none: one row, 128-bit keys).
        for rows in [
            1usize,
            2,
            7,
            256,
            1237,
            2048,
            2049,
            100_000,
            1 << 20,
            1 << 24,
            1 << 30,
            usize::MAX,
        ] {
            // 2,048 ids and more take the radix sort's four streams; 5,003
            // leaves a tail after them.
            for n in [1usize, 2, 3, 100, 2047, 2048, 5000, 5003] {
                for hot in [false, true] {
                    let ids: Vec<usize> = (0..n)
                        .map(|i| match i % 4 {
                            // A hot row, and a few warm ones: long runs of one
                            // digit in every stream.
                            0 | 1 if hot => rows - 1,
                            2 if hot => i % 3,
                            _ => ((i * 7919 + 13) % 1237).wrapping_mul(2_654_435_761),
                        } % rows)
                        .collect();
                    let mut d = Dedup::default();
                    d.build(ids.len(), rows, |i| ids[i]);
                    assert_eq!(got(&d), reference(&ids), "rows {rows}, n {n}, hot {hot}");
                    let total: usize = d.distinct.iter().map(|x| x.count).sum();
                    assert_eq!(total, n);
                }
            }
        }
    }

    /// The parallel build gives exactly the sequential build's keys and
    /// distinct rows, for any thread count, id pattern and table size, and
    /// when reused across steps of other sizes.
    #[cfg(feature = "rayon")]
    #[test]
    fn parallel_build_matches_sequential() {
        let n_big = PARALLEL_MIN_IDS * 3 + 17;
        type Pattern = Box<dyn Fn(usize, usize) -> usize>;
        let patterns: Vec<(&str, Pattern)> = vec![
            (
                "hashed",
                Box::new(|i, rows| (i.wrapping_mul(2_654_435_761) >> 3) % rows),
            ),
            ("all equal", Box::new(|_, rows| rows - 1)),
            ("sequential", Box::new(|i, rows| i % rows)),
            ("descending", Box::new(|i, rows| (rows - 1) - i % rows)),
            (
                "hot row",
                Box::new(|i, rows| {
                    if i % 3 == 0 {
                        rows / 2
                    } else {
                        (i * 7919) % rows
                    }
                }),
            ),
            ("strided", Box::new(|i, rows| (i << 12) % rows)),
            (
                // Row 0 in 40% of the ids: sampled bucket boundaries at row 0.
                "hot row 0",
                Box::new(|i, rows| if i % 5 < 2 { 0 } else { (i * 7919) % rows }),
            ),
            (
                // Skewed as embedding ids are: most ids among the first rows,
                // a quarter on the last row, boundaries inside hot rows.
                "zipf-like",
                Box::new(|i, rows| {
                    let h = i.wrapping_mul(2_654_435_761) >> 7;
                    match i % 8 {
                        0 | 1 => rows - 1,
                        2..=5 => (h % 64).min(h % 7) % rows,
                        _ => h % rows,
                    }
                }),
            ),
        ];
        let mut seq = Dedup::default();
        let mut reused = Dedup::default();
        for threads in [2usize, 3] {
            let pool = pool(threads);
            for rows in [
                2usize,
                3,
                255,
                256,
                257,
                70_000,
                1 << 24,
                10_000_000,
                1 << 40,
            ] {
                for n in [PARALLEL_MIN_IDS, PARALLEL_MIN_IDS + 1, n_big, 100] {
                    for (name, f) in &patterns {
                        let ids: Vec<usize> = (0..n).map(|i| f(i, rows)).collect();
                        seq.build(n, rows, |i| ids[i]);
                        let mut fresh = Dedup::default();
                        pool.install(|| {
                            fresh.build_parallel(n, rows, |i| ids[i], threads);
                            reused.build_parallel(n, rows, |i| ids[i], threads);
                        });
                        for (what, d) in [("fresh", &fresh), ("reused", &reused)] {
                            let ctx =
                                format!("{what} {name}, rows {rows}, n {n}, {threads} threads");
                            assert_eq!(d.distinct, seq.distinct, "{ctx}");
                            assert_eq!(d.sorted, seq.sorted, "{ctx}");
                            assert_eq!(d.pos_mask, seq.pos_mask, "{ctx}");
                        }
                    }
                }
            }
        }
        // More chunks than `MAX_BUCKETS` (a pool of over 64 threads) is fine.
        let ids_70k: Vec<usize> = (0..n_big).map(|i| (i * 7919) % 70_000).collect();
        let ids = &ids_70k;
        seq.build(n_big, 70_000, |i| ids[i]);
        reused.build_parallel(n_big, 70_000, |i| ids[i], 100);
        assert_eq!(reused.sorted, seq.sorted);
        assert_eq!(reused.distinct, seq.distinct);
        // Steps of `MAX_BUCKETS * BUCKET_KEYS` ids and more take equal row
        // ranges instead of sampled ones.
        let n_large = MAX_BUCKETS * BUCKET_KEYS + 5;
        let pool = pool(2);
        // 2^20 rows: ranges of 12 bits, sorted in one pass of 12-bit digits.
        for rows in [257usize, 1 << 20, 10_000_000, 1 << 40] {
            for (name, f) in patterns
                .iter()
                .filter(|(name, _)| ["hashed", "hot row 0", "zipf-like"].contains(name))
            {
                let ids: Vec<usize> = (0..n_large).map(|i| f(i, rows)).collect();
                seq.build(n_large, rows, |i| ids[i]);
                pool.install(|| reused.build_parallel(n_large, rows, |i| ids[i], 2));
                let ctx = format!("{name}, rows {rows}, n {n_large}");
                assert_eq!(reused.distinct, seq.distinct, "{ctx}");
                assert_eq!(reused.sorted, seq.sorted, "{ctx}");
            }
        }
        // The sequential build is itself the reference's.
        let ids = &ids_70k;
        pool.install(|| reused.build_parallel(n_big, 70_000, |i| ids[i], 2));
        assert_eq!(got(&reused), reference(ids));
    }

    /// Ids that move from one row range to the next across steps (each step
    /// in another bucket) do not leave every bucket holding a whole step's
    /// keys: the scratch kept stays a small multiple of one step's keys.
    #[cfg(feature = "rayon")]
    #[test]
    fn parallel_build_memory_stays_bounded_when_ids_move() {
        let (rows, n) = (1usize << 20, PARALLEL_MIN_IDS * 4);
        let pool = pool(2);
        let mut d = Dedup::default();
        let width = rows / MAX_BUCKETS;
        let retained = |d: &Dedup| -> usize {
            let chunks: usize = d.par.chunk_keys.iter().flatten().map(Vec::capacity).sum();
            let buckets: usize = d
                .par
                .buckets
                .iter()
                .map(|b| b.keys.capacity() + b.tmp.capacity())
                .sum();
            chunks + buckets
        };
        let mut most = 0;
        for b in 0..MAX_BUCKETS {
            // Every id of this step in row range `b`.
            let ids: Vec<usize> = (0..n).map(|i| b * width + (i * 7) % width).collect();
            pool.install(|| d.build_parallel(n, rows, |i| ids[i], 2));
            assert_eq!(d.distinct.iter().map(|x| x.count).sum::<usize>(), n);
            most = most.max(retained(&d));
        }
        // One step's keys, in chunks and in a bucket (keys and sort scratch),
        // each at most doubled, plus the per-bucket constant: well under 16 n.
        // Without the trimming this reaches about 256 x 3 n.
        assert!(most <= 16 * n, "kept {most} keys of scratch for {n} ids");
    }

    /// The same when the ids' row ranges move between the chunks of a step:
    /// each chunk of ids (an eighth of the step) lies in one row range, and
    /// the ranges rotate over the chunks from step to step, so that every
    /// chunk's buffers fill a different few of the 32 sampled buckets each
    /// step. Kept whole, the chunks' buffers end up holding 8.2 n keys;
    /// trimmed one by one, 1.1 n; trimmed together, 2.0 n.
    #[cfg(feature = "rayon")]
    #[test]
    fn parallel_build_memory_stays_bounded_when_chunks_move() {
        let (rows, n) = (1usize << 20, 32 * BUCKET_KEYS);
        let (ranges, chunk) = (8, n / 8);
        let width = rows / ranges;
        let pool = pool(2);
        let mut d = Dedup::default();
        let chunk_keys =
            |d: &Dedup| -> usize { d.par.chunk_keys.iter().flatten().map(Vec::capacity).sum() };
        let mut most = 0;
        for step in 0..3 * ranges {
            let ids: Vec<usize> = (0..n)
                .map(|i| (i / chunk + step) % ranges * width + (i * 7) % width)
                .collect();
            pool.install(|| d.build_parallel(n, rows, |i| ids[i], 2));
            assert_eq!(d.par.chunk_keys.len(), ranges);
            assert_eq!(d.distinct.iter().map(|x| x.count).sum::<usize>(), n);
            most = most.max(chunk_keys(&d));
        }
        // Trimmed together, each chunk keeps at most twice its keys plus 256.
        assert!(
            most <= 2 * n + 256 * ranges,
            "the chunks kept {most} keys of scratch for {n} ids"
        );
    }

    /// Two threads group in parallel only where the parallel build takes
    /// equal row ranges (the first size where it is the faster on two
    /// threads); larger pools from `PARALLEL_MIN_IDS` ids; one thread never.
    #[cfg(feature = "rayon")]
    #[test]
    fn two_threads_group_in_parallel_only_with_equal_ranges() {
        let equal = MAX_BUCKETS * BUCKET_KEYS;
        assert!(!groups_in_parallel(1 << 30, 1));
        assert!(!groups_in_parallel(1 << 30, 0));
        assert!(!groups_in_parallel(16_384, 2));
        assert!(!groups_in_parallel(equal - 1, 2));
        assert!(groups_in_parallel(equal, 2));
        assert!(groups_in_parallel(PARALLEL_MIN_IDS, 3));
        assert!(!groups_in_parallel(PARALLEL_MIN_IDS - 1, 64));
        // At the two-thread threshold the build does take equal ranges.
        let rows = 1usize << 22;
        let ids: Vec<usize> = (0..equal).map(|i| i * 2_654_435_761 % rows).collect();
        let pool = pool(2);
        let mut d = Dedup::default();
        pool.install(|| d.build_parallel(equal, rows, |i| ids[i], 2));
        let width = rows / MAX_BUCKETS;
        let want: Vec<u64> = (1..MAX_BUCKETS).map(|b| (b * width) as u64).collect();
        assert_eq!(d.par.bounds, want);
        assert_eq!(d.distinct.iter().map(|x| x.count).sum::<usize>(), equal);
    }

    /// `(row, positions)` of a [`RowHash`], in order of first occurrence.
    fn hashed(h: &RowHash) -> Vec<(usize, Vec<usize>)> {
        let mut g: Vec<(usize, Vec<usize>)> = h.rows.iter().map(|&r| (r, vec![])).collect();
        for (i, &s) in h.slot_of.iter().enumerate() {
            g[s as usize].1.push(i);
        }
        g
    }

    #[test]
    fn row_hash_matches_reference() {
        let mut h = RowHash::default();
        for rows in [
            1usize,
            2,
            7,
            1237,
            2048,
            1 << 20,
            // The largest table it takes (ids up to 2^32 - 1), and one more.
            usize::try_from(RowHash::MAX_ROWS).unwrap_or(usize::MAX),
            usize::try_from(RowHash::MAX_ROWS + 1).unwrap_or(usize::MAX),
            usize::MAX,
        ] {
            for n in [0usize, 1, 2, 3, 100, 5000] {
                let ids: Vec<usize> = (0..n)
                    .map(|i| ((i * 7919 + 13) % 1237).wrapping_mul(2_654_435_761) % rows)
                    .collect();
                // The same state reused across sizes and generations. Tables
                // of more than 2^32 rows are declined (the sort takes them).
                if rows as u64 > RowHash::MAX_ROWS {
                    assert!(!h.build(ids.len(), rows, |i| ids[i]));
                    continue;
                }
                assert!(h.build(ids.len(), rows, |i| ids[i]));
                let g = hashed(&h);
                let firsts: Vec<usize> = g.iter().map(|(_, p)| p[0]).collect();
                assert!(firsts.windows(2).all(|w| w[0] < w[1]), "rows {rows}, n {n}");
                let mut g = g;
                g.sort();
                assert_eq!(g, reference(&ids), "rows {rows}, n {n}");
            }
        }
        // Generation wrap-around clears the table instead of reusing stale
        // entries.
        h.generation = u32::MAX - 1;
        for ids in [[5usize, 6, 5], [6, 6, 7], [7, 5, 5]] {
            assert!(h.build(3, 8, |i| ids[i]));
            let mut g = hashed(&h);
            g.sort();
            assert_eq!(g, reference(&ids));
        }
    }

    /// Ids whose home slots all collide under a known key: found by search,
    /// as an attacker who knew the key would.
    fn colliding_ids(key: u64, cap: usize, count: usize) -> Vec<usize> {
        let shift = u64::BITS - cap.trailing_zeros();
        (0usize..)
            .filter(|&r| mix64(r as u64 ^ key) >> shift == 0)
            .take(count)
            .collect()
    }

    #[test]
    fn probing_is_exercised_and_bounded() {
        let mut h = RowHash {
            key: 0x1234_5678_9abc_def1,
            ..RowHash::default()
        };
        // 12 distinct ids sharing one home slot of a 64-entry table (24 ids,
        // each twice): 132 probes, within the budget of 160; the result is
        // still exact.
        let mut ids = colliding_ids(h.key, 64, 12);
        ids.extend_from_slice(&ids.clone());
        assert!(h.build_keyed(ids.len(), |i| ids[i]));
        assert_eq!(h.probes, 132);
        let mut g = hashed(&h);
        g.sort();
        assert_eq!(g, reference(&ids));
        // 2048 ids all in one home slot (a 4096-entry table): about n^2/2
        // probes if the build went on; it stops at the budget instead.
        let ids = colliding_ids(h.key, 4096, 2048);
        assert!(!h.build_keyed(ids.len(), |i| ids[i]));
        assert!(
            h.probes <= RowHash::probe_budget(2048) + 4096,
            "{}",
            h.probes
        );
        // The same table keeps working afterwards.
        let ids = [3usize, 1, 3];
        assert!(h.build_keyed(3, |i| ids[i]));
        let mut g = hashed(&h);
        g.sort();
        assert_eq!(g, reference(&ids));
        // A fresh table draws its own key: the crafted ids are ordinary ids
        // for it (the chance of ten of them sharing a home is nil).
        let mut fresh = RowHash::default();
        let ids = colliding_ids(0x1234_5678_9abc_def1, 4096, 2048);
        assert!(fresh.build(ids.len(), usize::MAX >> 32, |i| ids[i]));
        assert!(fresh.probes < 2048 * 2, "{}", fresh.probes);
    }

    #[test]
    fn identity_lists_every_row() {
        let mut d = Dedup::default();
        d.build_identity(3);
        assert_eq!(got(&d), vec![(0, vec![0]), (1, vec![1]), (2, vec![2])]);
    }
}
