//! Duplicate-id detection with a reusable open-addressing map.
//!
//! For each distinct row the first occurrence and the number of occurrences
//! are recorded; rows occurring more than once get an accumulator slot, and
//! every occurrence is tagged with its row's slot, so duplicates can be summed
//! in one sequential pass over the gradient values, in first-occurrence order.
//! All buffers are kept across steps: no allocation once they have grown to
//! the largest gradient seen.

/// One distinct row of a sparse gradient.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Distinct {
    /// The row id.
    pub row: usize,
    /// Position of the first occurrence in the id list.
    pub first: usize,
    /// Number of occurrences.
    pub count: usize,
    /// Accumulator slot (rows with `count > 1`), else [`NO_ACC`].
    pub acc: u32,
}

/// `Distinct::acc` and occurrence tag of a row occurring once.
pub(crate) const NO_ACC: u32 = u32::MAX;
/// Flag of [`Dedup::occ`]: the first occurrence of its row.
pub(crate) const FIRST: u32 = 1 << 31;

#[derive(Clone, Copy, Debug, Default)]
struct Entry {
    key: u64,
    generation: u32,
    val: u32,
}

/// Reusable dedup state.
#[derive(Debug, Default)]
pub(crate) struct Dedup {
    table: Vec<Entry>,
    generation: u32,
    /// Distinct rows in first-occurrence order (or sorted by row after
    /// [`Dedup::sort_by_row`]).
    pub distinct: Vec<Distinct>,
    /// Per occurrence: [`NO_ACC`] for rows occurring once, else the row's
    /// accumulator slot, with [`FIRST`] set on its first occurrence.
    pub occ: Vec<u32>,
    /// Number of accumulator slots (rows occurring more than once).
    pub n_acc: usize,
    /// Scratch of [`Dedup::group_by_row_range`].
    grouped: Vec<Distinct>,
    counts: Vec<u32>,
}

/// Number of row ranges of [`Dedup::group_by_row_range`] (a power of two).
const GROUP_BITS: u32 = 11;

#[inline]
fn hash(row: u64, shift: u32) -> usize {
    (row.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> shift) as usize
}

impl Dedup {
    /// Builds the distinct list of `n` ids (already validated to be `< rows`).
    ///
    /// Small tables (`rows` at most twice the hash capacity) are indexed
    /// directly by row; larger ones go through the open-addressing map.
    pub(crate) fn build(&mut self, n: usize, rows: usize, id: impl Fn(usize) -> usize) {
        self.distinct.clear();
        self.occ.clear();
        self.n_acc = 0;
        if n == 0 {
            return;
        }
        // Capacity: a power of two >= 2n (load factor <= 1/2).
        let cap = (2 * n).next_power_of_two().max(16);
        let direct = rows <= 2 * cap;
        let need = if direct { rows } else { cap };
        if self.table.len() < need {
            self.table = vec![Entry::default(); need.max(cap)];
            self.generation = 0;
        }
        self.generation = self.generation.wrapping_add(1);
        if self.generation == 0 {
            self.table.iter_mut().for_each(|e| e.generation = 0);
            self.generation = 1;
        }
        let generation = self.generation;
        self.occ.reserve(n);
        if direct {
            let table = &mut self.table[..rows];
            for i in 0..n {
                let row = id(i);
                let e = &mut table[row];
                if e.generation != generation {
                    let d = self.distinct.len() as u32;
                    e.generation = generation;
                    e.val = d;
                    self.distinct.push(Distinct {
                        row,
                        first: i,
                        count: 1,
                        acc: NO_ACC,
                    });
                    self.occ.push(d);
                } else {
                    let d = e.val;
                    self.distinct[d as usize].count += 1;
                    self.occ.push(d);
                }
            }
        } else {
            // A prefix of the table (it may be larger, or sized for direct use).
            let mask = cap - 1;
            let shift = 64 - cap.trailing_zeros();
            let table = &mut self.table[..cap];
            for i in 0..n {
                let row = id(i);
                let key = row as u64;
                let mut slot = hash(key, shift) & mask;
                loop {
                    let e = &mut table[slot];
                    if e.generation != generation {
                        let d = self.distinct.len() as u32;
                        *e = Entry {
                            key,
                            generation,
                            val: d,
                        };
                        self.distinct.push(Distinct {
                            row,
                            first: i,
                            count: 1,
                            acc: NO_ACC,
                        });
                        self.occ.push(d);
                        break;
                    }
                    if e.key == key {
                        let d = e.val;
                        self.distinct[d as usize].count += 1;
                        self.occ.push(d);
                        break;
                    }
                    slot = (slot + 1) & mask;
                }
            }
        }
        if self.distinct.len() == n {
            // No duplicates: no accumulators.
            self.occ.iter_mut().for_each(|o| *o = NO_ACC);
            return;
        }
        // Accumulator slots, in first-occurrence order.
        let mut next = 0u32;
        for d in self.distinct.iter_mut().filter(|d| d.count > 1) {
            d.acc = next;
            next += 1;
        }
        self.n_acc = next as usize;
        for (i, o) in self.occ.iter_mut().enumerate() {
            let d = &self.distinct[*o as usize];
            *o = if d.acc == NO_ACC {
                NO_ACC
            } else if d.first == i {
                d.acc | FIRST
            } else {
                d.acc
            };
        }
    }

    /// Every row `0..rows` once, in order (dense gradients routed through the
    /// row path).
    pub(crate) fn build_identity(&mut self, rows: usize) {
        self.distinct.clear();
        self.occ.clear();
        self.n_acc = 0;
        self.distinct.extend((0..rows).map(|r| Distinct {
            row: r,
            first: r,
            count: 1,
            acc: NO_ACC,
        }));
    }

    /// Groups the distinct rows by row range (`row >> shift`, at most 2048
    /// ranges, in increasing order; a counting sort, O(n)), so that the tables
    /// can be split into disjoint parts for the parallel path. Returns
    /// `shift`.
    pub(crate) fn group_by_row_range(&mut self, rows: usize) -> u32 {
        let bits = usize::BITS - rows.saturating_sub(1).leading_zeros();
        let shift = bits.saturating_sub(GROUP_BITS);
        let n_groups = ((rows.saturating_sub(1)) >> shift) + 1;
        self.counts.clear();
        self.counts.resize(n_groups + 1, 0);
        for d in &self.distinct {
            self.counts[(d.row >> shift) + 1] += 1;
        }
        for g in 1..=n_groups {
            self.counts[g] += self.counts[g - 1];
        }
        self.grouped.clear();
        self.grouped.resize(
            self.distinct.len(),
            Distinct {
                row: 0,
                first: 0,
                count: 0,
                acc: NO_ACC,
            },
        );
        for d in &self.distinct {
            let pos = &mut self.counts[d.row >> shift];
            self.grouped[*pos as usize] = *d;
            *pos += 1;
        }
        std::mem::swap(&mut self.distinct, &mut self.grouped);
        shift
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedup_tags_occurrences() {
        let ids = [4usize, 1, 4, 4, 0, 1];
        let mut d = Dedup::default();
        d.build(ids.len(), 5, |i| ids[i]);
        let rows: Vec<_> = d
            .distinct
            .iter()
            .map(|x| (x.row, x.first, x.count, x.acc))
            .collect();
        assert_eq!(rows, vec![(4, 0, 3, 0), (1, 1, 2, 1), (0, 4, 1, NO_ACC)]);
        assert_eq!(d.n_acc, 2);
        assert_eq!(d.occ, vec![FIRST, 1 | FIRST, 0, 0, NO_ACC, 1]);
        // Reuse with another generation.
        let ids2 = [7usize, 7];
        d.build(2, 1 << 20, |i| ids2[i]);
        assert_eq!(d.distinct.len(), 1);
        assert_eq!(d.distinct[0].count, 2);
        assert_eq!(d.occ, vec![FIRST, 0]);
        d.build(0, 8, |_| 0);
        assert!(d.distinct.is_empty());
        let ids3 = [3usize, 2, 9];
        d.build(3, 10, |i| ids3[i]);
        assert_eq!(d.n_acc, 0);
        assert_eq!(d.occ, vec![NO_ACC; 3]);
    }

    #[test]
    fn dedup_many_collisions() {
        let ids: Vec<usize> = (0..5000).map(|i| (i * 7919) % 1237).collect();
        for rows in [1237, 1 << 30] {
            let mut d = Dedup::default();
            d.build(ids.len(), rows, |i| ids[i]);
            assert_eq!(d.distinct.len(), 1237);
            let total: usize = d.distinct.iter().map(|x| x.count).sum();
            assert_eq!(total, 5000);
        }
        let mut d = Dedup::default();
        d.build(ids.len(), 1 << 30, |i| ids[i]);
        let total: usize = d.distinct.iter().map(|x| x.count).sum();
        assert_eq!(total, 5000);
        // A large table followed by a small gradient uses a prefix.
        d.build(3, 1 << 30, |i| [1usize, 1, 2][i]);
        assert_eq!(d.distinct.len(), 2);
    }

    #[test]
    fn grouping_orders_row_ranges() {
        for rows in [1usize, 7, 2048, 2049, 1_000_000] {
            let ids: Vec<usize> = (0..3000).map(|i| (i * 7919 + 13) % rows).collect();
            let mut d = Dedup::default();
            d.build(ids.len(), rows, |i| ids[i]);
            let before = d.distinct.len();
            let shift = d.group_by_row_range(rows);
            assert_eq!(d.distinct.len(), before);
            assert!((rows - 1) >> shift < 2048);
            assert!(
                d.distinct
                    .windows(2)
                    .all(|w| (w[0].row >> shift) <= (w[1].row >> shift))
            );
        }
    }
}
