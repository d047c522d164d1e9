//! Duplicate-id detection by a radix sort of the occurrences.
//!
//! Each occurrence `i` of row `r` becomes the key `(r << pos_bits) | i`; a
//! least-significant-digit radix sort on the row bits (stable, so the
//! occurrences of a row stay in occurrence order) groups the occurrences by
//! row, in increasing row order. The distinct rows are then the runs of equal
//! rows. This costs a few sequential passes over `8 * n` bytes, whatever the
//! size of the table, and leaves the rows sorted: the row updates then walk
//! the tables in address order, and the parallel path splits them into
//! disjoint row ranges directly. All buffers are kept across steps: no
//! allocation once they have grown to the largest gradient seen.

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
    hist: Vec<usize>,
    wide: Vec<u128>,
}

/// Largest radix digit, in bits (2048 buckets: the histograms stay in L1).
const MAX_DIGIT_BITS: u32 = 11;

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
        let keys = &self.sorted;
        let mut i = 0;
        while i < n {
            let row = row_of(keys[i]);
            let mut j = i + 1;
            while j < n && row_of(keys[j]) == row {
                j += 1;
            }
            let count = j - i;
            self.distinct.push(Distinct {
                row: row as usize,
                pos: if count == 1 {
                    (keys[i] & pos_mask) as usize
                } else {
                    i
                },
                count,
            });
            i = j;
        }
    }

    /// Stable LSD radix sort of `sorted` on bits `shift..shift + key_bits`.
    fn radix_sort(&mut self, shift: u32, key_bits: u32) {
        let passes = key_bits.div_ceil(MAX_DIGIT_BITS);
        let digit = key_bits.div_ceil(passes);
        let buckets = 1usize << digit;
        let mask = (buckets - 1) as u64;
        let n = self.sorted.len();
        self.hist.clear();
        self.hist.resize(passes as usize * buckets, 0);
        // All histograms in one read of the keys.
        for &x in &self.sorted {
            let k = x >> shift;
            for p in 0..passes as usize {
                let d = ((k >> (p as u32 * digit)) & mask) as usize;
                self.hist[p * buckets + d] += 1;
            }
        }
        self.tmp.clear();
        self.tmp.resize(n, 0);
        for p in 0..passes {
            let h = &mut self.hist[p as usize * buckets..(p as usize + 1) * buckets];
            if h.contains(&n) {
                // Every key has the same digit: the pass would not move anything.
                continue;
            }
            let mut sum = 0usize;
            for c in h.iter_mut() {
                let x = *c;
                *c = sum;
                sum += x;
            }
            let s = shift + p * digit;
            for &x in &self.sorted {
                let d = ((x >> s) & mask) as usize;
                let at = &mut h[d];
                self.tmp[*at] = x;
                *at += 1;
            }
            std::mem::swap(&mut self.sorted, &mut self.tmp);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

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
        for rows in [1usize, 2, 7, 1237, 2048, 2049, 1 << 20, 1 << 30, usize::MAX] {
            for n in [1usize, 2, 3, 100, 5000] {
                let ids: Vec<usize> = (0..n)
                    .map(|i| ((i * 7919 + 13) % 1237).wrapping_mul(2_654_435_761) % rows)
                    .collect();
                let mut d = Dedup::default();
                d.build(ids.len(), rows, |i| ids[i]);
                assert_eq!(got(&d), reference(&ids), "rows {rows}, n {n}");
                let total: usize = d.distinct.iter().map(|x| x.count).sum();
                assert_eq!(total, n);
            }
        }
    }

    #[test]
    fn identity_lists_every_row() {
        let mut d = Dedup::default();
        d.build_identity(3);
        assert_eq!(got(&d), vec![(0, vec![0]), (1, vec![1]), (2, vec![2])]);
    }
}
