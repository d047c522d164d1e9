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
//! The kernels fill it fast by binning: each transformed value's `m^2` is added to a `u64`
//! bin indexed by its biased exponent (four interleaved tables of bins, so that runs of
//! equal exponents do not wait on each other's stores), and the bins are shifted into the
//! limbs every [`FLUSH`] values, before any bin could overflow.

use crate::Element;

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

/// Values transformed at a time into a stack buffer before binning.
pub(crate) const BLOCK: usize = 512;

/// Below this many values, the squares go straight into the limbs (clearing and flushing
/// the bin tables would cost more).
pub(crate) const SMALL: usize = 64;

/// Interleaved bin tables: value `i` of a group of four goes to table `i`.
const TABLES: usize = 4;

/// Per-exponent integer accumulators of `m^2` (index: biased exponent; 255 collects
/// infinities and NaN, whose flags are read from the values themselves).
pub(crate) struct Bins {
    t: [[u64; 256]; TABLES],
}

/// Bins one value's bits into a table.
#[inline(always)]
fn bin(t: &mut [u64; 256], b: u32) {
    let e = (b >> 23) & 0xFF;
    let m = u64::from(significand(b, e));
    // No overflow: at most FLUSH additions of m^2 < 2^48 between flushes.
    t[e as usize] = t[e as usize].wrapping_add(m * m);
}

/// The flags (`INF`, `NAN`) of the non-finite values among `xs`.
#[cold]
fn special_flags<G: Element>(xs: &[G]) -> u8 {
    let mut f = 0;
    for x in xs {
        let b = x.to_f32().to_bits();
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
        }
    }

    /// Bins the squares of `xs` (at most [`FLUSH`] values since the last flush, counted by
    /// the caller); returns the flags of its non-finite values.
    #[inline(always)]
    pub(crate) fn add<G: Element>(&mut self, xs: &[G]) -> u8 {
        let [t0, t1, t2, t3] = &mut self.t;
        let mut quads = xs.chunks_exact(TABLES);
        for q in &mut quads {
            bin(t0, q[0].to_f32().to_bits());
            bin(t1, q[1].to_f32().to_bits());
            bin(t2, q[2].to_f32().to_bits());
            bin(t3, q[3].to_f32().to_bits());
        }
        for x in quads.remainder() {
            bin(t0, x.to_f32().to_bits());
        }
        if (t0[255] | t1[255] | t2[255] | t3[255]) != 0 {
            (t0[255], t1[255], t2[255], t3[255]) = (0, 0, 0, 0);
            special_flags(xs)
        } else {
            0
        }
    }

    /// Adds the bins into `acc` and clears them.
    #[inline(always)]
    pub(crate) fn flush(&mut self, acc: &mut SquareSum) {
        let [t0, t1, t2, t3] = &mut self.t;
        for e in 0..255 {
            // No overflow: at most FLUSH additions in all four tables together.
            let v = t0[e]
                .wrapping_add(t1[e])
                .wrapping_add(t2[e])
                .wrapping_add(t3[e]);
            if v != 0 {
                acc.add_shifted(v, shift(e as u32));
                (t0[e], t1[e], t2[e], t3[e]) = (0, 0, 0, 0);
            }
        }
    }
}

/// Adds the squares of `transform(src)` to `acc`: `load` writes the transformed values of a
/// piece of `src` into an f32 buffer of the same length (the path's vector code); with
/// `direct` (f32 values and the identity transform) the values are binned as they are.
#[inline(always)]
pub(crate) fn accumulate<G: Element>(
    acc: &mut SquareSum,
    src: &[G],
    direct: bool,
    load: impl Fn(&mut [f32], &[G]),
) {
    if src.len() < SMALL {
        let mut buf = [0.0f32; SMALL];
        let buf = &mut buf[..src.len()];
        load(buf, src);
        for &x in buf.iter() {
            acc.add(x);
        }
        return;
    }
    let mut bins = Bins::new();
    let mut flags = 0;
    for chunk in src.chunks(FLUSH) {
        if direct {
            flags |= bins.add(chunk);
        } else {
            let mut buf = [0.0f32; BLOCK];
            for block in chunk.chunks(BLOCK) {
                let buf = &mut buf[..block.len()];
                load(buf, block);
                flags |= bins.add::<f32>(buf);
            }
        }
        bins.flush(acc);
    }
    acc.add_flags(flags);
}
