//! Exact, order-independent sums of squares of f32 values ([`SquareSum`]).
//!
//! A finite f32 `x` is `m * 2^(e' - 150)`, with `e' = max(e, 1)` for the biased exponent
//! `e` in `0..=254` and the integer significand `m < 2^24` (with the implicit bit for
//! normals; a subnormal has `e = 0`, `m` its fraction, and the scale of `e' = 1`). So
//! `x * x = m^2 * 2^(2e' - 300)`, an integer `m^2 < 2^48` shifted left by `2e' <= 508` bits,
//! in units of `2^-300`. A [`SquareSum`] keeps the sum of such integers exactly, in ten
//! 64-bit limbs (640 bits), so it is the same whatever the order of the additions and
//! however the values are split and merged; it is rounded once, by [`SquareSum::to_f64`].
//!
//! The kernels fill it fast, in blocks of [`BLOCK`] values (transformed by the path's vector
//! code into a stack buffer, or read in place for f32 values without a transform), with a
//! per-path strategy ([`Squares`]):
//!
//! * scalar and portable paths ([`Bins`]): each value's `m^2` is added to a `u64` bin
//!   indexed by its biased exponent (four interleaved tables of bins, so that runs of equal
//!   exponents do not wait on each other's stores; the decoding is vectorized), and the bins
//!   are shifted into the limbs every [`FLUSH`] values, before any bin could overflow;
//! * x86 paths (`arch::x86_64::Window`, and `Window512` on AVX-512: the same window,
//!   sixteen values a vector, carries as compare masks): each `m^2` is shifted by twice its
//!   binade's distance from the bottom of a window of 31 binades set from the block's
//!   largest value, and added into 128-bit sums in vector lanes; no scatter.
//!
//! Rows of fewer than [`SMALL`] values on the bin paths are summed in a 128-bit window
//! instead ([`add_small`]), which costs less than clearing and flushing the tables.
//!
//! Whatever the strategy, what reaches the limbs is the exact sum, so every path gives the
//! same [`SquareSum`].
use crate::Element;
use crate::scalar;

/// Limbs of the integer (640 bits).
const LIMBS: usize = 10;
/// Flag: an infinite value was added.
const INF: u8 = 1;
/// Flag: a NaN was added.
const NAN: u8 = 2;
/// Flag: the exact sum reached `2^640` units (`2^340`); the limbs are then zero.
const OVERFLOW: u8 = 4;
/// Every flag bit; the other bits of the flag byte must be zero.
const ALL_FLAGS: u8 = INF | NAN | OVERFLOW;

/// The exact sum of the squares of f32 values: order-independent and split-independent,
/// rounded once.
///
/// Each finite f32 `x` is `m * 2^(e' - 150)` with an integer `m < 2^24` and
/// `e' = max(biased exponent, 1)` in `1..=254`, so `x * x = (m^2 << 2e') * 2^-300` with
/// `m^2 < 2^48` and `2e' <= 508`: an integer number of units of `2^-300`. The sum of any
/// number of them is an integer number of such units, which this type keeps exactly in 640
/// bits (ten `u64` limbs). Integer addition is exact, commutative and associative, so adding
/// values in any order, or splitting them across threads, chunks or processes into several
/// sums and [merging](SquareSum::merge) those in any order, gives the same value (`==`) and
/// the same bytes ([`SquareSum::to_bytes`]). [`SquareSum::to_f64`] rounds that exact value
/// once, to nearest with ties to even.
///
/// Infinities and NaN are not summed but recorded in flags: [`SquareSum::to_f64`] gives NaN
/// if any NaN was added, else `+inf` if any infinity was. Signs do not matter (`x` and `-x`
/// have the same square; `-0.0` adds nothing).
///
/// # Limits
///
/// One square is below `2^(48 + 508) = 2^556` units, so the 640-bit integer holds at least
/// `2^84` (about `1.9e25`) squares of `f32::MAX` and far more of ordinary values: at ten
/// billion values per second, more than fifty million years of additions. Should a sum ever
/// reach `2^640` units (`2^340`; in practice only by merging a sum into itself about 84
/// times), it does not wrap: an overflow flag is set, the limbs are cleared, and
/// [`SquareSum::to_f64`] returns `+inf` (NaN if a NaN was added) and
/// [`SquareSum::is_finite`] `false`. Merging stays commutative and associative with that
/// flag, since it is set exactly when the exact total reaches `2^640` units. Nothing here
/// panics.
///
/// # Byte format
///
/// [`SquareSum::to_bytes`] gives [`SquareSum::BYTES`] = 81 bytes: bytes `0..80` are the ten
/// limbs, least significant first, each little-endian (so together the 640-bit integer
/// number of `2^-300` units, little-endian); byte 80 holds the flags: bit 0 an infinity was
/// added, bit 1 a NaN was added, bit 2 overflow (then the limbs are all zero). Other flag
/// bits are zero; [`SquareSum::from_bytes`] rejects any other length, any other flag bit,
/// and an overflow flag with non-zero limbs. The format does not depend on the machine.
///
/// # Example
///
/// ```
/// use lazyadam_kernels::{GradTransform, Kernels, SquareSum};
///
/// let g: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin() * 1e-3).collect();
/// let k = Kernels::best();
/// let t = GradTransform::default();
/// let whole = k.sum_squares_exact(&g, &t);
///
/// // Split into pieces summed separately (e.g. by threads or ranks) and merged in any order:
/// // the same value and bytes.
/// let (a, b) = g.split_at(357);
/// let mut merged = k.sum_squares_exact(b, &t);
/// merged.merge(&k.sum_squares_exact(a, &t));
/// assert_eq!(merged, whole);
/// assert_eq!(merged.to_bytes(), whole.to_bytes());
///
/// // One value at a time, in reverse: still the same.
/// let mut one = SquareSum::new();
/// for &x in g.iter().rev() {
///     one.add(x);
/// }
/// assert_eq!(one, whole);
///
/// // Rounded once; ships as bytes.
/// let norm = whole.to_f64().sqrt();
/// assert!(norm > 0.0 && whole.is_finite());
/// assert_eq!(SquareSum::from_bytes(&whole.to_bytes()), Some(whole));
///
/// // Small integers are exact in f64: 3^2 + 4^2.
/// let mut s = SquareSum::ZERO;
/// s.add(3.0);
/// s.add(-4.0);
/// assert_eq!(s.to_f64(), 25.0);
/// s.add(f32::INFINITY);
/// assert_eq!(s.to_f64(), f64::INFINITY);
/// s.add(f32::NAN);
/// assert!(s.to_f64().is_nan() && !s.is_finite());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SquareSum {
    /// The exact sum in units of `2^-300`, least significant limb first.
    limbs: [u64; LIMBS],
    /// `INF | NAN | OVERFLOW`.
    flags: u8,
}

/// The integer significand `m` of finite f32 bits (the implicit bit for normals).
#[inline(always)]
fn significand(b: u32, e: u32) -> u32 {
    (b & 0x007F_FFFF) | (u32::from(e != 0) << 23)
}

/// The left shift (in bits, units of `2^-300`) of the square of a value of biased exponent
/// `e` in `0..=254`: `2 * max(e, 1)`, at most 508.
#[inline(always)]
fn shift(e: u32) -> u32 {
    2 * if e == 0 { 1 } else { e }
}

/// `2^k` as an f64, for `k` in the normal range `-1022..=1023`.
#[inline(always)]
fn pow2(k: i32) -> f64 {
    f64::from_bits(((k + 1023) as u64) << 52)
}

impl SquareSum {
    /// The empty sum.
    pub const ZERO: SquareSum = SquareSum {
        limbs: [0; LIMBS],
        flags: 0,
    };

    /// Size of [`SquareSum::to_bytes`]: 81 (ten 8-byte limbs and a flag byte).
    pub const BYTES: usize = 8 * LIMBS + 1;

    /// The empty sum ([`SquareSum::ZERO`]).
    pub const fn new() -> Self {
        Self::ZERO
    }

    /// Adds `x * x` exactly (an infinity or NaN sets its flag instead).
    ///
    /// ```
    /// let mut s = lazyadam_kernels::SquareSum::new();
    /// s.add(1e-45); // the smallest subnormal: its square, 2^-298, is kept exactly
    /// s.add(1.0);
    /// assert_eq!(s.to_f64(), 1.0); // 1 + 2^-298 rounds to 1
    /// ```
    #[inline]
    pub fn add(&mut self, x: f32) {
        let b = x.to_bits();
        let e = (b >> 23) & 0xFF;
        if e == 0xFF {
            self.flags |= if b & 0x007F_FFFF == 0 { INF } else { NAN };
            return;
        }
        let m = u64::from(significand(b, e));
        self.add_shifted(m * m, shift(e));
    }

    /// Adds `v << s` (`s <= 508`) to the limbs.
    #[inline]
    pub(crate) fn add_shifted(&mut self, v: u64, s: u32) {
        if v == 0 || self.flags & OVERFLOW != 0 {
            return;
        }
        // s <= 508, so k <= 7 and k + 1 < LIMBS; clamped anyway so that no index can panic.
        let k = ((s / 64) as usize).min(LIMBS - 2);
        let r = s % 64;
        let lo = v << r;
        let hi = if r == 0 { 0 } else { v >> (64 - r) };
        let (a, c0) = self.limbs[k].overflowing_add(lo);
        self.limbs[k] = a;
        let (b, c1) = self.limbs[k + 1].overflowing_add(hi);
        let (b, c2) = b.overflowing_add(u64::from(c0));
        self.limbs[k + 1] = b;
        let mut carry = c1 | c2;
        for limb in &mut self.limbs[k + 2..] {
            if !carry {
                break;
            }
            let (x, c) = limb.overflowing_add(1);
            *limb = x;
            carry = c;
        }
        if carry {
            self.set_overflow();
        }
    }

    /// The exact sum reached `2^640` units: flag it and clear the limbs (canonical form).
    fn set_overflow(&mut self) {
        self.flags |= OVERFLOW;
        self.limbs = [0; LIMBS];
    }

    /// Adds the flags `f` (`INF` and `NAN` only).
    #[inline]
    pub(crate) fn add_flags(&mut self, f: u8) {
        self.flags |= f & (INF | NAN);
    }

    /// Adds another sum: exact, commutative and associative (the flags are or-ed).
    ///
    /// ```
    /// use lazyadam_kernels::SquareSum;
    /// let (mut a, mut b) = (SquareSum::new(), SquareSum::new());
    /// a.add(1.5);
    /// b.add(2.0);
    /// a.merge(&b);
    /// assert_eq!(a.to_f64(), 6.25);
    /// ```
    pub fn merge(&mut self, other: &SquareSum) {
        self.flags |= other.flags;
        if self.flags & OVERFLOW != 0 {
            self.limbs = [0; LIMBS];
            return;
        }
        let mut carry = false;
        for (a, &b) in self.limbs.iter_mut().zip(&other.limbs) {
            let (x, c1) = a.overflowing_add(b);
            let (x, c2) = x.overflowing_add(u64::from(carry));
            *a = x;
            carry = c1 | c2;
        }
        if carry {
            self.set_overflow();
        }
    }

    /// The exact sum rounded to the nearest f64, ties to even; `+inf` if an infinity was
    /// added (or the sum overflowed, see [Limits](SquareSum#limits)) and no NaN; NaN if a NaN
    /// was added.
    ///
    /// Every finite exact sum lies between `2^-298` (or zero) and `2^340`, in the normal
    /// range of f64, so the only rounding is that of the significand to 53 bits.
    ///
    /// ```
    /// let mut s = lazyadam_kernels::SquareSum::new();
    /// s.add(3.0);
    /// assert_eq!(s.to_f64(), 9.0);
    /// ```
    pub fn to_f64(&self) -> f64 {
        if self.flags & NAN != 0 {
            return f64::NAN;
        }
        if self.flags & (INF | OVERFLOW) != 0 {
            return f64::INFINITY;
        }
        let Some(top) = self.limbs.iter().rposition(|&l| l != 0) else {
            return 0.0;
        };
        // The index of the highest set bit, and the 64-bit window that ends with it.
        let p = 64 * top + 63 - self.limbs[top].leading_zeros() as usize;
        let lo = p.saturating_sub(63);
        let (k, r) = (lo / 64, lo % 64);
        let mut window = self.limbs[k] >> r;
        if r != 0 && k + 1 < LIMBS {
            window |= self.limbs[k + 1] << (64 - r);
        }
        // Bits below the window can only decide rounding as a sticky bit: with `lo > 0` the
        // window holds 64 significant bits of which f64 keeps 53, so its bit 0 lies below
        // the rounding (guard) bit, and or-ing the sticky bit into it gives the correctly
        // rounded conversion (`u64 as f64` rounds to nearest, ties to even).
        let below = self.limbs[..k].iter().any(|&l| l != 0) || self.limbs[k] & ((1 << r) - 1) != 0;
        let w = window | u64::from(below);
        // `lo <= 576`: the scale 2^(lo - 300) and the product are normal f64, so exact.
        (w as f64) * pow2(lo as i32 - 300)
    }

    /// Whether no infinity or NaN was added (and the sum did not overflow).
    ///
    /// ```
    /// let mut s = lazyadam_kernels::SquareSum::new();
    /// s.add(f32::MAX);
    /// assert!(s.is_finite());
    /// s.add(f32::NEG_INFINITY);
    /// assert!(!s.is_finite());
    /// ```
    pub fn is_finite(&self) -> bool {
        self.flags == 0
    }

    /// The stable byte form (see [Byte format](SquareSum#byte-format)).
    ///
    /// ```
    /// use lazyadam_kernels::SquareSum;
    /// let mut s = SquareSum::new();
    /// s.add(1.0); // 1.0 = 2^23 * 2^-23: 2^46 << 254 units of 2^-300, i.e. bit 300
    /// let b = s.to_bytes();
    /// assert_eq!(b.len(), SquareSum::BYTES);
    /// assert_eq!(b[300 / 8], 1 << (300 % 8));
    /// assert_eq!(b.iter().filter(|&&x| x != 0).count(), 1);
    /// ```
    pub fn to_bytes(&self) -> [u8; Self::BYTES] {
        let mut out = [0u8; Self::BYTES];
        for (chunk, limb) in out.chunks_exact_mut(8).zip(&self.limbs) {
            chunk.copy_from_slice(&limb.to_le_bytes());
        }
        out[Self::BYTES - 1] = self.flags;
        out
    }

    /// Reads [`SquareSum::to_bytes`]'s form; `None` for a length other than
    /// [`SquareSum::BYTES`], an unknown flag bit, or the overflow flag with non-zero limbs.
    ///
    /// ```
    /// use lazyadam_kernels::SquareSum;
    /// let mut s = SquareSum::new();
    /// s.add(0.5);
    /// let b = s.to_bytes();
    /// assert_eq!(SquareSum::from_bytes(&b), Some(s));
    /// assert_eq!(SquareSum::from_bytes(&b[1..]), None);
    /// let mut bad = b;
    /// bad[SquareSum::BYTES - 1] = 0x80;
    /// assert_eq!(SquareSum::from_bytes(&bad), None);
    /// ```
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != Self::BYTES {
            return None;
        }
        let flags = bytes[Self::BYTES - 1];
        if flags & !ALL_FLAGS != 0 {
            return None;
        }
        let mut limbs = [0u64; LIMBS];
        for (limb, chunk) in limbs.iter_mut().zip(bytes.chunks_exact(8)) {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            *limb = u64::from_le_bytes(b);
        }
        if flags & OVERFLOW != 0 && limbs.iter().any(|&l| l != 0) {
            return None;
        }
        Some(SquareSum { limbs, flags })
    }
}

/// Values binned between two flushes into the limbs: with `m^2 < 2^48`, `2^16` additions
/// cannot overflow a `u64` bin, even after the tables are summed.
pub(crate) const FLUSH: usize = 1 << 16;

/// Values transformed and decoded at a time (a divisor of [`FLUSH`]).
pub(crate) const BLOCK: usize = 512;

/// Below this many values, the squares are summed in a `u128` over the [`WINDOW`] binades
/// below the largest value instead (clearing and flushing the bin tables would cost more).
const SMALL: usize = 256;

/// Binades of the small path's 128-bit sum: its shifts stay below 64 bits, and fewer than
/// [`SMALL`] squares `m^2 < 2^48` shifted by at most `2 * WINDOW` bits stay below
/// `2^(48 + 62 + 8) = 2^118`.
const WINDOW: u32 = 31;

/// Interleaved bin tables: value `i` goes to table `i % TABLES`.
const TABLES: usize = 4;

/// Writes the transformed values of a piece of gradient into an f32 buffer: the path's
/// transform code (a trait rather than a closure, so that it is inlined into the path's
/// `#[target_feature]` entry point), and the path's way of summing squares.
pub(crate) trait Load<G> {
    /// How this path sums the squares of blocks of values.
    type Sq: Squares;
    /// Empty accumulators.
    fn squares(&self) -> Self::Sq;
    /// `dst[i] = transform(src[i])`; equal lengths.
    fn load(&self, dst: &mut [f32], src: &[G]);
}

/// Exact partial sums of squares of f32 values, added into a [`SquareSum`] by
/// [`Squares::flush`].
pub(crate) trait Squares {
    /// Rows shorter than this go through [`add_small`] instead (0: never).
    const SMALL: usize;
    /// Adds the squares of the finite values among `xs` (at most [`BLOCK`] values, and at
    /// most [`FLUSH`] since the last flush), into `self` or directly into `acc`; returns the
    /// flags of the non-finite ones.
    fn add_block(&mut self, acc: &mut SquareSum, xs: &[f32]) -> u8;
    /// Adds the partial sums into `acc` and clears them.
    fn flush(&mut self, acc: &mut SquareSum);
}

/// Per-exponent integer accumulators of `m^2` (index: biased exponent; 255 collects
/// infinities and NaN, whose flags are read from the values themselves), and the decoded
/// block: the portable and scalar paths' [`Squares`].
pub(crate) struct Bins {
    t: [[u64; 256]; TABLES],
    /// Biased exponents of the block.
    idx: [u8; BLOCK],
    /// `m^2` of the block.
    sq: [u64; BLOCK],
}

/// The flags (`INF`, `NAN`) of the non-finite values among `xs`.
#[cold]
#[inline(never)]
pub(crate) fn special_flags(xs: &[f32]) -> u8 {
    let mut f = 0;
    for x in xs {
        let b = x.to_bits();
        if b & 0x7F80_0000 == 0x7F80_0000 {
            f |= if b & 0x007F_FFFF == 0 { INF } else { NAN };
        }
    }
    f
}

impl Bins {
    /// Empty bins.
    #[inline(always)]
    pub(crate) fn new() -> Self {
        Bins {
            t: [[0; 256]; TABLES],
            idx: [0; BLOCK],
            sq: [0; BLOCK],
        }
    }
}

impl Squares for Bins {
    const SMALL: usize = SMALL;

    /// Bins the squares of `xs` (at most [`BLOCK`] values; at most [`FLUSH`] since the last
    /// flush); returns the flags of its non-finite values.
    #[inline(always)]
    fn add_block(&mut self, _acc: &mut SquareSum, xs: &[f32]) -> u8 {
        let n = xs.len().min(BLOCK);
        let (idx, sq) = (&mut self.idx[..n], &mut self.sq[..n]);
        // Decoding, in a loop the compiler vectorizes with the path's instructions.
        for ((x, i), q) in xs.iter().zip(idx.iter_mut()).zip(sq.iter_mut()) {
            let b = x.to_bits();
            let e = (b >> 23) & 0xFF;
            let m = u64::from(significand(b, e));
            *i = e as u8;
            *q = m * m;
        }
        // The scatter, round-robin over the tables so that runs of one exponent do not
        // wait on each other's stores. No overflow: at most FLUSH additions of m^2 < 2^48
        // in all tables together between flushes.
        let t = &mut self.t;
        let mut ic = idx.chunks_exact(TABLES);
        let mut qc = sq.chunks_exact(TABLES);
        for (iq, qq) in (&mut ic).zip(&mut qc) {
            for j in 0..TABLES {
                let b = &mut t[j][usize::from(iq[j])];
                *b = b.wrapping_add(qq[j]);
            }
        }
        for (&i, &q) in ic.remainder().iter().zip(qc.remainder()) {
            let b = &mut t[0][usize::from(i)];
            *b = b.wrapping_add(q);
        }
        let mut special = 0;
        for tj in t.iter_mut() {
            special |= tj[255];
            tj[255] = 0;
        }
        if special != 0 { special_flags(xs) } else { 0 }
    }

    /// Adds the bins into `acc` and clears them.
    #[inline(always)]
    fn flush(&mut self, acc: &mut SquareSum) {
        for e in 0..255 {
            // No overflow: at most FLUSH additions in all tables together.
            let mut v = 0u64;
            for tj in self.t.iter_mut() {
                v = v.wrapping_add(tj[e]);
                tj[e] = 0;
            }
            if v != 0 {
                acc.add_shifted(v, shift(e as u32));
            }
        }
    }
}

/// The small path: fewer than [`SMALL`] values summed in a 128-bit integer (two `u64`) in
/// units of the square of the [`WINDOW`]-th binade below the largest value; values further
/// below go one by one into the limbs.
#[inline(always)]
fn add_small(acc: &mut SquareSum, xs: &[f32]) {
    // The caller passes fewer than SMALL values; the bound below relies on it.
    let xs = &xs[..xs.len().min(SMALL - 1)];
    let (mut emax, mut special) = (1, false);
    for x in xs {
        let e = (x.to_bits() >> 23) & 0xFF;
        special |= e == 0xFF;
        emax = emax.max(if e == 0xFF { 0 } else { e });
    }
    if special {
        acc.add_flags(special_flags(xs));
    }
    let base = emax.saturating_sub(WINDOW).max(1);
    let (mut lo, mut hi) = (0u64, 0u64);
    for &x in xs {
        let b = x.to_bits();
        let e = (b >> 23) & 0xFF;
        let e1 = e.max(1);
        if e1 >= base && e != 0xFF {
            let m = u64::from(significand(b, e));
            let sq = m * m;
            // s < 64: (sq << s) as a 128-bit number, without a shift by 64.
            let s = 2 * (e1 - base);
            let (l, h) = (sq << s, (sq >> 1) >> (63 - s));
            let (l, c) = lo.overflowing_add(l);
            lo = l;
            // < 2^(48 + 2 * WINDOW) = 2^110 each, fewer than 2^8 of them: no overflow.
            hi = hi.wrapping_add(h).wrapping_add(u64::from(c));
        } else if e != 0xFF {
            acc.add(x);
        }
    }
    // 2 * base <= 508: both halves land in the limbs (bits up to 2 * 254 + 118).
    acc.add_shifted(lo, 2 * base);
    acc.add_shifted(hi, 2 * base + 64);
}

/// Adds the squares of `transform(src)` to `acc`, `load` applying the transform (with
/// `identity`, f32 values are summed as they are) and providing the path's [`Squares`].
///
/// With `MAX`, also returns the largest magnitude's bits among the raw values of `src`
/// (`scalar::max_abs_bits`, block by block while the block is in L1: one pass over memory
/// for both); without, 0.
#[inline(always)]
pub(crate) fn accumulate<G: Element, L: Load<G>, const MAX: bool>(
    acc: &mut SquareSum,
    src: &[G],
    identity: bool,
    load: &L,
) -> u32 {
    let n = src.len();
    let direct = if identity { G::as_f32s(src) } else { None };
    let mut max = 0;
    if n < L::Sq::SMALL {
        if MAX {
            max = scalar::max_abs_bits(src);
        }
        let mut buf = [0.0f32; SMALL];
        let xs = match direct {
            Some(d) => d,
            None => {
                let buf = &mut buf[..n.min(SMALL)];
                load.load(buf, &src[..buf.len()]);
                buf
            }
        };
        add_small(acc, xs);
        return max;
    }
    let mut sq = load.squares();
    let mut buf = [0.0f32; BLOCK];
    let mut flags = 0;
    let mut since = 0;
    let mut start = 0;
    while start < n {
        let end = n.min(start + BLOCK);
        let xs = match direct {
            Some(d) => &d[start..end],
            None => {
                let buf = &mut buf[..end - start];
                load.load(buf, &src[start..end]);
                buf
            }
        };
        flags |= sq.add_block(acc, xs);
        if MAX {
            max = max.max(scalar::max_abs_bits(&src[start..end]));
        }
        since += end - start;
        if since >= FLUSH {
            sq.flush(acc);
            since = 0;
        }
        start = end;
    }
    sq.flush(acc);
    acc.add_flags(flags);
    max
}
