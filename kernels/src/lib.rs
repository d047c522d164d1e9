//! Explicitly vectorized, bit-exact Adam row-update primitives with runtime CPU dispatch.
//!
//! `lazyadam-kernels` is the numeric core of `lazyadam`: it updates one *row* at a time (a
//! slice of parameters with its Adam moments and its gradient), with per-step coefficients
//! precomputed by the caller. It knows nothing of optimizers, steps or tensors.
//!
//! * `#![no_std]`, no allocation. The default `std` feature only adds run-time CPU detection
//!   through `std::is_x86_feature_detected!` (by way of pulp); without it, x86-64 detection
//!   uses CPUID (via `raw-cpuid`) and XGETBV, and other targets use the compile-time features
//!   of the portable path. See [Detection and dispatch](#detection-and-dispatch).
//! * Storage in `f32`, [`f16`](struct@f16) or [`bf16`], chosen independently for the parameters, the
//!   gradients and the moments (`m`, `v` and `vhat` share one type). Compute is always `f32`.
//! * Paths ([`Isa`]): the scalar reference, a portable path on `wide` (the vector path of
//!   every non-x86 target; NEON on aarch64), AVX2+FMA+F16C (x86-64-v3) and AVX-512 F/BW/DQ/VL
//!   (x86-64-v4). The best supported one is detected once and cached.
//! * Sums of squares for norm clipping: [`Kernels::sum_squares`] in f64 with a fixed lane
//!   order, and the exact [`Kernels::sum_squares_exact`] into a [`SquareSum`], which gives the
//!   same bits in any order and for any split of the values into pieces merged later (across
//!   threads, chunks or processes), rounded once.
//!
//! # Numerics contract
//!
//! Every path performs, per element, exactly the IEEE `f32` operations below in this order,
//! without fused multiply-adds, so every path is bit-identical to the scalar reference for
//! every input (subnormals, infinities and NaN included; NaN payloads aside):
//!
//! ```text
//! g  = G::to_f32(grad[i])
//! if scale != 1.0 { g = g * scale }
//! if let Some(c) = clip { g = if g > c { c } else if g < -c { -c } else { g } }
//! if negate { g = -g }
//! m0 = M::to_f32(m[i]);  v0 = M::to_f32(v[i])
//! if m_pre_decay != 1.0 { m0 = m0 * m_pre_decay }
//! if v_pre_decay != 1.0 { v0 = v0 * v_pre_decay }
//! m1 = beta1*m0 + one_minus_beta1*g
//! v1 = beta2*v0 + one_minus_beta2*(g*g)
//! amsgrad: vh1 = if vh0 >= v1 { vh0 } else { v1 };  d = vh1   else d = v1
//! p0 = P::to_f32(param[i]);  if weight_decay != 0.0 { p0 = p0 - weight_decay*p0 }
//! p1 = p0 - (lr_t*m1) / (sqrt(d) + epsilon)
//! m[i] = M::from_f32(m1); v[i] = M::from_f32(v1); vhat[i] = M::from_f32(vh1); param[i] = round(p1)
//! ```
//!
//! Loads widen exactly; stores round to nearest, ties to even (as `half`'s `from_f32`), or,
//! for `f16`/`bf16` parameters, stochastically ([`Rounding::Stochastic`]).
//!
//! `sqrt` is the correctly rounded IEEE square root. The AVX-512 path computes some of its
//! roots (one vector in three, f32 storage) without the divider unit, which it shares with
//! the division: `vrsqrt14ps`, a Newton step, and an exact choice among the candidate and
//! its neighbours (FMA is used there, only to get exact residuals). That gives the same bits
//! as `vsqrtps`; the argument is in the source, and a test compares all 2^32 inputs.
//!
//! f16 moments are fragile: `(1-beta2)*g*g` underflows f16 for small gradients and the update
//! then explodes. Prefer `f32` or `bf16` moments.
//!
//! # Example
//!
//! ```
//! use lazyadam_kernels::{AdamCoeffs, Kernels, f16};
//!
//! let k = Kernels::best();
//! // Step 1 of Adam with lr = 0.001: lr_t = lr * sqrt(1 - beta2) / (1 - beta1).
//! let (lr, b1, b2) = (0.001f32, 0.9f32, 0.999f32);
//! let lr_t = lr * (1.0 - b2).sqrt() / (1.0 - b1);
//! let c = AdamCoeffs::new(lr_t, b1, b2, 1e-7);
//!
//! let mut param = vec![f16::from_f32(1.0); 5];
//! let mut m = vec![0.0f32; 5];
//! let mut v = vec![0.0f32; 5];
//! let grad = vec![f16::from_f32(0.5); 5];
//! k.adam_row(&c, &mut param, &mut m, &mut v, &grad)?;
//! assert!(param[0].to_f32() < 1.0);
//!
//! // Every supported path gives the same bits.
//! for isa in lazyadam_kernels::Isa::supported() {
//!     let mut p2 = vec![f16::from_f32(1.0); 5];
//!     let (mut m2, mut v2) = (vec![0.0f32; 5], vec![0.0f32; 5]);
//!     Kernels::new(isa)?.adam_row(&c, &mut p2, &mut m2, &mut v2, &grad)?;
//!     assert_eq!(p2, param);
//! }
//!
//! // Mismatched lengths are an error, and nothing is written.
//! let mut short = vec![0.0f32; 4];
//! assert!(k.adam_row(&c, &mut param, &mut short, &mut v, &grad).is_err());
//! # Ok::<(), lazyadam_kernels::KernelError>(())
//! ```
//!
//! # Detection and dispatch
//!
//! The x86 paths' tokens are [pulp](https://docs.rs/pulp)'s: each path has a pulp type declared
//! with `pulp::simd_type!` (x86-64-v3 with F16C; x86-64-v4 as AVX-512 F/BW/DQ/VL plus that
//! set) whose value is the proof that the features are usable, and the vector token the row
//! code runs with holds that proof (made unchecked for a `Kernels` handle of a detected path,
//! as before). With `std`, detection is pulp's (`is_x86_feature_detected!`
//! for each feature, which also checks that the OS saves the vector state). Two parts stay
//! hand-written, for measured or stated reasons:
//!
//! * Detection without `std`: pulp 0.22 then reads CPUID only and never XCR0, so it would
//!   offer AVX-512 where the OS has not enabled the ZMM state, and the first instruction would
//!   fault. This crate reads XCR0 through XGETBV as well.
//! * The `#[target_feature]` entry points. Running the same row code through pulp's
//!   `vectorize` (the kernel call as a struct with an `#[inline(always)]` method, pulp's
//!   `WithSimd` pattern) gave the same loops but measured slower in one sitting of the kernel
//!   bench (3 interleaved rounds on an AVX2 machine, 2026-12-03, medians): all-f16 rows of
//!   64 elements 1.14x the time on AVX2 and 1.15x on the portable path, f16 parameters and
//!   gradients with f32 moments 1.18x on AVX2, portable all-f16 rows of 4,096 elements 1.18x;
//!   all-f32 rows unchanged. With pulp's tokens and detection under these entry points every
//!   figure stays within 0.98-1.03x of the fully hand-written code (raw lines in
//!   `benches/results/sitting-2026-12-03-pulp-dispatch.jsonl`). With a closure instead of the
//!   struct it was worse: `vectorize` reaches a borrowing closure through the compiler's
//!   `FnOnce::call_once` shim, which is not inlined, and every intrinsic became an
//!   out-of-line call.
//!
//! The arithmetic (the `Simd` implementations with their intrinsics) is this crate's own,
//! because the contract fixes each operation: separate multiply and add, the exactly rounded
//! square root, round-to-nearest-even conversions to `f16` and `bf16`.
#![no_std]
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "std")]
extern crate std;

pub use exact::SquareSum;
pub use half::{bf16, f16};

mod arch;
mod detect;
mod exact;
mod scalar;
mod simd;

use core::fmt;

/// A storage type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16 ([`f16`](struct@f16)).
    F16,
    /// bfloat16 ([`bf16`]).
    BF16,
}

impl DType {
    /// Size of one element in bytes.
    ///
    /// ```
    /// assert_eq!(lazyadam_kernels::DType::BF16.size_bytes(), 2);
    /// ```
    pub const fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// The conventional name: `"float32"`, `"float16"` or `"bfloat16"`.
    ///
    /// ```
    /// assert_eq!(lazyadam_kernels::DType::F16.name(), "float16");
    /// ```
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

mod sealed {
    /// Seals [`Element`](super::Element) and carries crate-internal helpers.
    pub trait Sealed {
        /// From the 16 raw bits of an f16/bf16 (not used for f32).
        fn from_bits16(bits: u16) -> Self;
        /// Finite (neither infinite nor NaN).
        fn finite_elem(self) -> bool;
        /// The magnitude's bits (sign cleared): they order as the magnitudes
        /// do, and a NaN's are above an infinity's.
        fn abs_bits(self) -> u32;
        /// The slice as f32 values, for `f32` only.
        #[inline(always)]
        fn as_f32s(s: &[Self]) -> Option<&[f32]>
        where
            Self: Sized,
        {
            let _ = s;
            None
        }
    }
}

/// A storage element: `f32`, [`f16`](struct@f16) or [`bf16`] (sealed).
///
/// ```
/// use lazyadam_kernels::{Element, bf16};
/// assert_eq!(<bf16 as Element>::from_f32(1.0).to_f32(), 1.0);
/// ```
pub trait Element:
    Copy + Send + Sync + Default + PartialEq + fmt::Debug + 'static + sealed::Sealed
{
    /// The storage type tag.
    const DTYPE: DType;
    /// Exact widening to f32.
    fn to_f32(self) -> f32;
    /// Rounds to nearest, ties to even (same bits as `half`'s `from_f32`).
    fn from_f32(x: f32) -> Self;
}

impl sealed::Sealed for f32 {
    #[inline(always)]
    fn from_bits16(bits: u16) -> Self {
        f32::from_bits(u32::from(bits) << 16)
    }
    #[inline(always)]
    fn finite_elem(self) -> bool {
        self.to_bits() & 0x7F80_0000 != 0x7F80_0000
    }
    #[inline(always)]
    fn abs_bits(self) -> u32 {
        self.to_bits() & 0x7FFF_FFFF
    }
    #[inline(always)]
    fn as_f32s(s: &[f32]) -> Option<&[f32]> {
        Some(s)
    }
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl sealed::Sealed for f16 {
    #[inline(always)]
    fn from_bits16(bits: u16) -> Self {
        f16::from_bits(bits)
    }
    #[inline(always)]
    fn finite_elem(self) -> bool {
        self.to_bits() & 0x7C00 != 0x7C00
    }
    #[inline(always)]
    fn abs_bits(self) -> u32 {
        u32::from(self.to_bits() & 0x7FFF)
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}

impl sealed::Sealed for bf16 {
    #[inline(always)]
    fn from_bits16(bits: u16) -> Self {
        bf16::from_bits(bits)
    }
    #[inline(always)]
    fn finite_elem(self) -> bool {
        self.to_bits() & 0x7F80 != 0x7F80
    }
    #[inline(always)]
    fn abs_bits(self) -> u32 {
        u32::from(self.to_bits() & 0x7FFF)
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        // Exact widening; NaN keeps its payload bits (half would also set the quiet bit).
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

/// A kernel path (instruction set).
///
/// ```
/// use lazyadam_kernels::Isa;
/// assert!(Isa::Scalar.is_supported());
/// assert!(Isa::best().is_supported());
/// for isa in Isa::supported() {
///     println!("{}", isa.name());
/// }
/// ```
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// The scalar reference: plain per-element code, the definition of the results.
    Scalar,
    /// Portable SIMD on `wide` with the compile-time target features (NEON on aarch64, SSE2
    /// on baseline x86-64). Always supported.
    Portable,
    /// x86-64-v3: AVX2, FMA and F16C (no FMA instruction is used; see the contract).
    Avx2,
    /// x86-64-v4: AVX-512 F/BW/DQ/VL (plus the AVX2 set).
    Avx512,
}

impl Isa {
    /// Every path, from the reference to the widest.
    pub const ALL: [Isa; 4] = [Isa::Scalar, Isa::Portable, Isa::Avx2, Isa::Avx512];

    /// Whether this machine can run the path (`Scalar` and `Portable` always can).
    pub fn is_supported(self) -> bool {
        match self {
            Isa::Scalar | Isa::Portable => true,
            Isa::Avx2 => detect::has_avx2(),
            Isa::Avx512 => detect::has_avx512(),
        }
    }

    /// The best supported path: detected on first use, then cached.
    pub fn best() -> Isa {
        detect::best()
    }

    /// The supported paths, in the order of [`Isa::ALL`].
    pub fn supported() -> impl Iterator<Item = Isa> {
        Isa::ALL.into_iter().filter(|isa| isa.is_supported())
    }

    /// Short name: `"scalar"`, `"portable"`, `"avx2"` or `"avx512"`.
    pub const fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The transform applied to every gradient element on load: scale, then clip, then negate.
///
/// ```
/// use lazyadam_kernels::{GradTransform, Kernels};
/// let t = GradTransform { scale: 2.0, clip: Some(3.0), negate: true };
/// let mut dst = [0.0f32; 3];
/// Kernels::best().load_row(&mut dst, &[1.0f32, 2.0, -5.0], &t)?;
/// assert_eq!(dst, [-2.0, -3.0, 3.0]);
/// # Ok::<(), lazyadam_kernels::KernelError>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GradTransform {
    /// Multiplier (skipped when exactly 1.0): the clipnorm factor or a loss-scale unscale.
    pub scale: f32,
    /// Clamp to `[-c, c]` after the scale; NaN stays NaN.
    pub clip: Option<f32>,
    /// Maximize: `g = -g`, applied last.
    pub negate: bool,
}

impl Default for GradTransform {
    /// The identity: scale 1.0, no clip, no negation.
    fn default() -> Self {
        GradTransform {
            scale: 1.0,
            clip: None,
            negate: false,
        }
    }
}

/// How f32 results are stored into parameters.
///
/// `Stochastic`: element `i` of the row uses the random bits `hash(seed, offset + i)`, so the
/// result is reproducible and independent of the path, of chunking and of threads. A value is
/// rounded to one of its two neighbours in the storage type, away from zero with probability
/// proportional to its distance from the lower-magnitude neighbour (unbiased). It applies to
/// parameter stores of `f16`/`bf16` only; `f32` stores are exact and moments always round to
/// nearest-even. NaN rounds as with `NearestEven`; `f16` magnitudes of 65536 and above become
/// infinity. The hash is splitmix64: `mix(mix(seed) + (offset + i) * 0x9E3779B97F4A7C15)`,
/// whose top bits are compared with the bits that the rounding drops.
///
/// ```
/// use lazyadam_kernels::{Kernels, Rounding, bf16};
/// let k = Kernels::best();
/// let src = [1.0f32 + 1.0 / 512.0; 64]; // a quarter of a bf16 step above 1.0
/// let mut a = [bf16::ZERO; 64];
/// let mut b = [bf16::ZERO; 64];
/// let r = Rounding::Stochastic { seed: 7, offset: 0 };
/// k.store_row(&mut a, &src, r)?;
/// k.store_row(&mut b, &src, r)?;
/// assert_eq!(a, b); // reproducible
/// assert!(a.iter().all(|x| x.to_f32() == 1.0 || x.to_f32() == 1.0078125));
/// # Ok::<(), lazyadam_kernels::KernelError>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Rounding {
    /// Round to nearest, ties to even.
    #[default]
    NearestEven,
    /// Seeded stochastic rounding; element `i` uses the random bits of index `offset + i`.
    Stochastic {
        /// The seed.
        seed: u64,
        /// The index of the row's first element in the caller's numbering (e.g. its flat
        /// offset in the tensor), so that rows and chunks get distinct random bits.
        offset: u64,
    },
}

/// The per-step coefficients of one Adam row update.
///
/// ```
/// use lazyadam_kernels::AdamCoeffs;
/// let c = AdamCoeffs::new(0.001, 0.9, 0.999, 1e-7);
/// assert_eq!(c.one_minus_beta1, 1.0 - 0.9f32);
/// assert_eq!(c.weight_decay, 0.0);
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamCoeffs {
    /// The bias-corrected step size, `lr * sqrt(1 - beta2^t) / (1 - beta1^t)`.
    pub lr_t: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// `1 - beta1` (as the caller wants it rounded).
    pub one_minus_beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// `1 - beta2`.
    pub one_minus_beta2: f32,
    /// Added to `sqrt(v)` in the denominator.
    pub epsilon: f32,
    /// Decoupled weight decay (AdamW): `p = p - weight_decay*p` before the Adam step; 0.0
    /// skips it.
    pub weight_decay: f32,
    /// Catch-up decay of `m` before the update (`m = m * m_pre_decay`); 1.0 skips it.
    pub m_pre_decay: f32,
    /// Catch-up decay of `v` before the update; 1.0 skips it. `vhat` is not decayed.
    pub v_pre_decay: f32,
    /// The gradient transform.
    pub grad: GradTransform,
    /// How parameters are stored.
    pub rounding: Rounding,
}

impl AdamCoeffs {
    /// Coefficients with the complements `1 - beta` and every optional part neutral (no
    /// weight decay, no pre-decay, identity gradient transform, nearest-even rounding).
    pub fn new(lr_t: f32, beta1: f32, beta2: f32, epsilon: f32) -> Self {
        AdamCoeffs {
            lr_t,
            beta1,
            one_minus_beta1: 1.0 - beta1,
            beta2,
            one_minus_beta2: 1.0 - beta2,
            epsilon,
            weight_decay: 0.0,
            m_pre_decay: 1.0,
            v_pre_decay: 1.0,
            grad: GradTransform::default(),
            rounding: Rounding::NearestEven,
        }
    }
}

/// Errors of the kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum KernelError {
    /// A slice's length differs from the first slice's; nothing was written.
    LengthMismatch {
        /// Which slice (`"m"`, `"v"`, `"vhat"`, `"grad"`, `"src"`).
        what: &'static str,
        /// The length of the first slice (`param` or `dst`).
        expected: usize,
        /// The length of `what`.
        got: usize,
    },
    /// The path is not supported by this machine.
    UnsupportedIsa(Isa),
    /// A row index is not below the number of rows of the table; nothing was written.
    RowOutOfRange {
        /// Which list (`"rows"`, `"slots"`, `"positions"`).
        what: &'static str,
        /// The offending index.
        row: usize,
        /// The number of rows of the table.
        rows: usize,
    },
    /// A table's length is not a whole number of rows, or the row length is 0 while
    /// rows are given; nothing was written.
    BadRowLength {
        /// Which slice (`"param"`, `"acc"`, `"src"`).
        what: &'static str,
        /// Its length.
        len: usize,
        /// The row length.
        row_len: usize,
    },
}

impl fmt::Display for KernelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KernelError::LengthMismatch {
                what,
                expected,
                got,
            } => write!(
                f,
                "length mismatch: `{what}` has {got} elements, expected {expected}"
            ),
            KernelError::UnsupportedIsa(isa) => {
                write!(f, "kernel path `{isa}` is not supported by this CPU")
            }
            KernelError::RowOutOfRange { what, row, rows } => {
                write!(f, "`{what}` holds row {row}, but the table has {rows} rows")
            }
            KernelError::BadRowLength { what, len, row_len } => write!(
                f,
                "`{what}` has {len} elements, not a whole number of rows of {row_len}"
            ),
        }
    }
}

impl core::error::Error for KernelError {}

/// A handle on one kernel path. `Copy` and cheap; obtain it once and keep it.
///
/// A `Kernels` value can only be made for a path the machine supports, so its methods are
/// safe to call.
///
/// ```
/// use lazyadam_kernels::{Isa, Kernels, KernelError};
/// let k = Kernels::new(Isa::Scalar)?;
/// assert_eq!(k.isa(), Isa::Scalar);
/// assert_eq!(Kernels::best().isa(), Isa::best());
/// # Ok::<(), KernelError>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kernels {
    isa: Isa,
    long_rows: LongRowLoop,
}

/// How the vector paths walk rows of 65,536 elements or more, which are not expected to be in
/// cache (a dense variable's leaves in `lazyadam` are such rows). Both loops perform the same
/// operations on every element, so they give the same bits; only their speed differs, and
/// which one is faster depends on the CPU. The scalar path has one loop and ignores this.
///
/// [`Kernels::new`] and [`Kernels::best`] start with [`LongRowLoop::Auto`];
/// [`Kernels::with_long_row_loop`] forces a loop (benches, tests).
///
/// ```
/// use lazyadam_kernels::{AdamCoeffs, Kernels, LongRowLoop};
/// let c = AdamCoeffs::new(0.01, 0.9, 0.999, 1e-7);
/// let n = 1 << 16;
/// let g: Vec<f32> = (0..n).map(|i| (i % 7) as f32 - 3.0).collect();
/// let mut out = Vec::new();
/// for l in [LongRowLoop::Auto, LongRowLoop::OnePass, LongRowLoop::Split] {
///     let (mut p, mut m, mut v) = (vec![1.0f32; n], vec![0.0f32; n], vec![0.0f32; n]);
///     Kernels::best().with_long_row_loop(l).adam_row(&c, &mut p, &mut m, &mut v, &g)?;
///     out.push(p);
/// }
/// assert!(out[0] == out[1] && out[1] == out[2]);
/// # Ok::<(), lazyadam_kernels::KernelError>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum LongRowLoop {
    /// The loop measured faster for this kind of CPU (see [`LongRowLoop::resolve`]).
    #[default]
    Auto,
    /// One pass: each vector of the row gets its whole update at once, touching the four
    /// streams (parameters, `m`, `v`, gradient; five with AMSGrad) together.
    OnePass,
    /// Three passes over each chunk of a few hundred elements (gradient and `v`, then `m`,
    /// then the parameters), each touching as few streams as it can.
    Split,
}

impl LongRowLoop {
    /// The loop this setting takes: itself when forced; for [`LongRowLoop::Auto`], the one
    /// measured faster on this CPU, for every storage type:
    ///
    /// - On Intel x86-64 CPUs, [`LongRowLoop::OnePass`] (which prefetches 1 KiB ahead in
    ///   every stream). Measured on a Xeon with AVX-512 (2026-12-05), dense steps of 2^24
    ///   elements on 2 threads, alternated rounds: without the prefetching the one-pass loop
    ///   already took 0.73x-0.95x the split loop's time for every storage but all-bf16
    ///   (1.08x-1.13x); with it, f32 0.92x-0.95x of that again, all f16 0.70x-0.82x, and
    ///   all bf16 4.8-4.9 ms against 7.0-8.1 ms for the split loop. The AVX2 path on the
    ///   same CPU: 0.80x-0.83x (f32), 0.62x-0.71x (all f16) and 0.79x-0.80x (all bf16) the
    ///   split loop's time.
    /// - On every other CPU, [`LongRowLoop::Split`]: measured faster on AMD Zen 4, where the
    ///   one-pass loop's time depended on where the streams lie relative to each other and
    ///   software prefetching measured slower; elsewhere not measured, and kept as before.
    ///
    /// The vendor is read once (CPUID) and cached.
    ///
    /// ```
    /// use lazyadam_kernels::LongRowLoop;
    /// assert_eq!(LongRowLoop::Split.resolve(), LongRowLoop::Split);
    /// let auto = LongRowLoop::Auto.resolve();
    /// assert!(auto == LongRowLoop::OnePass || auto == LongRowLoop::Split);
    /// ```
    pub fn resolve(self) -> LongRowLoop {
        match self {
            LongRowLoop::Auto if detect::is_intel() => LongRowLoop::OnePass,
            LongRowLoop::Auto => LongRowLoop::Split,
            forced => forced,
        }
    }

    /// The name used by benches and serialized options (`"auto"`, `"one_pass"`, `"split"`).
    pub fn name(self) -> &'static str {
        match self {
            LongRowLoop::Auto => "auto",
            LongRowLoop::OnePass => "one_pass",
            LongRowLoop::Split => "split",
        }
    }

    /// The setting of that [`name`](LongRowLoop::name), if any.
    pub fn from_name(name: &str) -> Option<LongRowLoop> {
        [LongRowLoop::Auto, LongRowLoop::OnePass, LongRowLoop::Split]
            .into_iter()
            .find(|l| l.name() == name)
    }
}

/// The number of rows of a table of `len` elements, rows of `row_len`; `rows_given` says
/// whether any row is to be touched (a zero row length is only accepted without rows).
fn table_rows(
    what: &'static str,
    len: usize,
    row_len: usize,
    rows_given: bool,
) -> Result<usize, KernelError> {
    let bad = KernelError::BadRowLength { what, len, row_len };
    match row_len {
        0 if rows_given || len != 0 => Err(bad),
        0 => Ok(0),
        _ if !len.is_multiple_of(row_len) => Err(bad),
        _ => Ok(len / row_len),
    }
}

/// Checks that every index of `list` is below `rows`.
fn check_rows<I: Iterator<Item = usize> + Clone>(
    what: &'static str,
    list: I,
    rows: usize,
) -> Result<(), KernelError> {
    // One pass that ORs the comparisons: no early exit and no branch per index on the valid
    // path. (A running maximum branched on every new maximum, and the slot lists of
    // `accumulate_rows`, numbered in order of first occurrence, make one at every new row.)
    if list.clone().fold(false, |bad, r| bad | (r >= rows)) {
        return Err(KernelError::RowOutOfRange {
            what,
            row: list.into_iter().find(|&r| r >= rows).unwrap_or(rows),
            rows,
        });
    }
    Ok(())
}

/// A magnitude's bits (as `max_abs_bits` returns them) as the f32 it widens to.
#[inline]
fn abs_from_bits<G: Element>(bits: u32) -> f32 {
    match G::DTYPE {
        DType::F32 => f32::from_bits(bits),
        // 16-bit magnitudes: `bits` fits in 15 bits.
        DType::F16 | DType::BF16 => G::from_bits16(bits as u16).to_f32(),
    }
}

#[inline]
fn check(what: &'static str, expected: usize, got: usize) -> Result<(), KernelError> {
    if expected == got {
        Ok(())
    } else {
        Err(KernelError::LengthMismatch {
            what,
            expected,
            got,
        })
    }
}

impl Kernels {
    /// The best supported path ([`Isa::best`]).
    pub fn best() -> Kernels {
        Kernels {
            isa: Isa::best(),
            long_rows: LongRowLoop::Auto,
        }
    }

    /// The given path, or `Err(UnsupportedIsa)` if this machine cannot run it.
    pub fn new(isa: Isa) -> Result<Kernels, KernelError> {
        if isa.is_supported() {
            Ok(Kernels {
                isa,
                long_rows: LongRowLoop::Auto,
            })
        } else {
            Err(KernelError::UnsupportedIsa(isa))
        }
    }

    /// The path of this handle.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// This handle with the given loop for long rows (see [`LongRowLoop`]; same bits).
    #[must_use]
    pub fn with_long_row_loop(self, long_rows: LongRowLoop) -> Kernels {
        Kernels { long_rows, ..self }
    }

    /// The loop setting of this handle ([`LongRowLoop::Auto`] unless forced).
    pub fn long_row_loop(&self) -> LongRowLoop {
        self.long_rows
    }

    /// Whether the vector paths take the split loop for long rows.
    fn split(&self) -> bool {
        self.long_rows.resolve() == LongRowLoop::Split
    }

    /// One Adam row update (see the crate docs for the exact operations).
    ///
    /// All slices must have the same length, else `Err(LengthMismatch)` and nothing is
    /// written.
    ///
    /// ```
    /// use lazyadam_kernels::{AdamCoeffs, Kernels, bf16};
    /// let c = AdamCoeffs::new(0.01, 0.9, 0.999, 1e-7);
    /// let mut p = [1.0f32; 3];
    /// let (mut m, mut v) = ([bf16::ZERO; 3], [bf16::ZERO; 3]);
    /// Kernels::best().adam_row(&c, &mut p, &mut m, &mut v, &[1.0f32, -1.0, 0.0])?;
    /// assert!(p[0] < 1.0 && p[1] > 1.0 && p[2] == 1.0);
    /// # Ok::<(), lazyadam_kernels::KernelError>(())
    /// ```
    pub fn adam_row<P: Element, G: Element, M: Element>(
        &self,
        c: &AdamCoeffs,
        param: &mut [P],
        m: &mut [M],
        v: &mut [M],
        grad: &[G],
    ) -> Result<(), KernelError> {
        let n = param.len();
        check("m", n, m.len())?;
        check("v", n, v.len())?;
        check("grad", n, grad.len())?;
        arch::adam_row::<P, G, M, false>(self.isa, self.split(), c, param, m, v, &mut [], grad);
        Ok(())
    }

    /// Adam on many rows of row-major tables with one call: row `rows[k]` of `param`, `m` and
    /// `v` (elements `rows[k] * row_len..(rows[k] + 1) * row_len`) is updated with the
    /// gradient row `grads[k * row_len..(k + 1) * row_len]`, in order of `k`.
    ///
    /// Each row gets exactly the bits of [`Kernels::adam_row`] on its slices, with a
    /// stochastic-rounding offset advanced by `rows[k] * row_len` (the element's index in the
    /// whole table, as if the table were one row). The per-call setup is paid once, and the
    /// table rows of later entries are prefetched, which is what makes this faster than a
    /// loop of `adam_row` for short rows.
    ///
    /// Errors, with nothing written: `m` or `v` not as long as `param`, a table length that is
    /// not a whole number of rows (or `row_len == 0` with rows given), `grads` not
    /// `rows.len() * row_len` long, a row not below the number of table rows.
    ///
    /// ```
    /// use lazyadam_kernels::{AdamCoeffs, Kernels};
    /// let c = AdamCoeffs::new(0.01, 0.9, 0.999, 1e-7);
    /// // A table of 3 rows of 2; update rows 2 and 0.
    /// let mut p = [1.0f32; 6];
    /// let (mut m, mut v) = ([0.0f32; 6], [0.0f32; 6]);
    /// Kernels::best().adam_rows(&c, &mut p, &mut m, &mut v, 2, &[2, 0], &[1.0f32, 1.0, -1.0, -1.0])?;
    /// assert!(p[4] < 1.0 && p[5] < 1.0 && p[0] > 1.0 && p[1] > 1.0);
    /// assert_eq!(&p[2..4], &[1.0, 1.0]); // row 1 untouched
    /// # Ok::<(), lazyadam_kernels::KernelError>(())
    /// ```
    #[allow(clippy::too_many_arguments)]
    pub fn adam_rows<P: Element, G: Element, M: Element>(
        &self,
        c: &AdamCoeffs,
        param: &mut [P],
        m: &mut [M],
        v: &mut [M],
        row_len: usize,
        rows: &[usize],
        grads: &[G],
    ) -> Result<(), KernelError> {
        let n = param.len();
        check("m", n, m.len())?;
        check("v", n, v.len())?;
        let table = table_rows("param", n, row_len, !rows.is_empty())?;
        check("grads", rows.len().saturating_mul(row_len), grads.len())?;
        check_rows("rows", rows.iter().copied(), table)?;
        if rows.is_empty() {
            return Ok(());
        }
        arch::adam_rows::<P, G, M>(self.isa, self.split(), c, param, m, v, row_len, rows, grads);
        Ok(())
    }

    /// Sums many gradient rows into f32 accumulator rows with one call:
    /// `acc[slots[i] * row_len..][..row_len] += transform(src[i * row_len..][..row_len])`
    /// for every `i`, in order (each the bits of [`Kernels::accumulate_row`]). Duplicate ids
    /// of a sparse gradient are summed with this, `slots` mapping each occurrence to its
    /// distinct row.
    ///
    /// Errors, with nothing written: `acc` not a whole number of rows (or `row_len == 0`
    /// with slots given), `src` not `slots.len() * row_len` long, a slot not below the number
    /// of accumulator rows.
    ///
    /// ```
    /// use lazyadam_kernels::{GradTransform, Kernels};
    /// let mut acc = [0.0f32; 4]; // two rows of 2
    /// let src = [1.0f32, 2.0, 10.0, 20.0, 100.0, 200.0];
    /// Kernels::best().accumulate_rows(&mut acc, 2, &[1, 0, 1], &src, &GradTransform::default())?;
    /// assert_eq!(acc, [10.0, 20.0, 101.0, 202.0]);
    /// # Ok::<(), lazyadam_kernels::KernelError>(())
    /// ```
    pub fn accumulate_rows<G: Element>(
        &self,
        acc: &mut [f32],
        row_len: usize,
        slots: &[u32],
        src: &[G],
        t: &GradTransform,
    ) -> Result<(), KernelError> {
        let table = table_rows("acc", acc.len(), row_len, !slots.is_empty())?;
        check("src", slots.len().saturating_mul(row_len), src.len())?;
        check_rows("slots", slots.iter().map(|&x| x as usize), table)?;
        if slots.is_empty() {
            return Ok(());
        }
        arch::accumulate_rows::<G>(self.isa, acc, row_len, slots, src, t);
        Ok(())
    }

    /// AMSGrad: `vhat = max(vhat, v_new)` (as `if vhat >= v { vhat } else { v }`), and the
    /// denominator uses `vhat`.
    ///
    /// All slices must have the same length, else `Err(LengthMismatch)` and nothing is
    /// written.
    ///
    /// ```
    /// use lazyadam_kernels::{AdamCoeffs, Kernels};
    /// let c = AdamCoeffs::new(0.01, 0.9, 0.999, 1e-7);
    /// let (mut p, mut m, mut v, mut vh) = ([1.0f32], [0.0f32], [0.0f32], [4.0f32]);
    /// Kernels::best().adam_row_amsgrad(&c, &mut p, &mut m, &mut v, &mut vh, &[1.0f32])?;
    /// assert_eq!(vh[0], 4.0);
    /// # Ok::<(), lazyadam_kernels::KernelError>(())
    /// ```
    pub fn adam_row_amsgrad<P: Element, G: Element, M: Element>(
        &self,
        c: &AdamCoeffs,
        param: &mut [P],
        m: &mut [M],
        v: &mut [M],
        vhat: &mut [M],
        grad: &[G],
    ) -> Result<(), KernelError> {
        let n = param.len();
        check("m", n, m.len())?;
        check("v", n, v.len())?;
        check("vhat", n, vhat.len())?;
        check("grad", n, grad.len())?;
        arch::adam_row::<P, G, M, true>(self.isa, self.split(), c, param, m, v, vhat, grad);
        Ok(())
    }

    /// `dst[i] = transform(src[i])` into an f32 row. Lengths must match (else `Err`, nothing
    /// written).
    ///
    /// ```
    /// use lazyadam_kernels::{GradTransform, Kernels, f16};
    /// let mut dst = [0.0f32; 2];
    /// Kernels::best().load_row(&mut dst, &[f16::ONE, f16::NEG_ONE], &GradTransform::default())?;
    /// assert_eq!(dst, [1.0, -1.0]);
    /// # Ok::<(), lazyadam_kernels::KernelError>(())
    /// ```
    pub fn load_row<G: Element>(
        &self,
        dst: &mut [f32],
        src: &[G],
        t: &GradTransform,
    ) -> Result<(), KernelError> {
        check("src", dst.len(), src.len())?;
        arch::load_row::<G, false>(self.isa, dst, src, t);
        Ok(())
    }

    /// `dst[i] = dst[i] + transform(src[i])` (duplicate-id summation). Lengths must match
    /// (else `Err`, nothing written).
    ///
    /// ```
    /// use lazyadam_kernels::{GradTransform, Kernels};
    /// let mut dst = [1.0f32; 2];
    /// Kernels::best().accumulate_row(&mut dst, &[1.0f32, 2.0], &GradTransform::default())?;
    /// assert_eq!(dst, [2.0, 3.0]);
    /// # Ok::<(), lazyadam_kernels::KernelError>(())
    /// ```
    pub fn accumulate_row<G: Element>(
        &self,
        dst: &mut [f32],
        src: &[G],
        t: &GradTransform,
    ) -> Result<(), KernelError> {
        check("src", dst.len(), src.len())?;
        arch::load_row::<G, true>(self.isa, dst, src, t);
        Ok(())
    }

    /// Sums gradient rows picked by position into one f32 row: with `n = dst.len()`, row `p`
    /// of `src` is `src[p * n..(p + 1) * n]`; `dst` gets the transform of the first picked row
    /// (as [`Kernels::load_row`]), then each later one is added in order (as
    /// [`Kernels::accumulate_row`]), with the bits of those calls. One call sums all the
    /// occurrences of a duplicated id of a sparse gradient, in vector registers and prefetching
    /// the rows ahead, where a call per occurrence would pay the dispatch and checks each time
    /// and keep the running sum in `dst`.
    ///
    /// With no positions nothing is written. Errors, with nothing written: `src` not a whole
    /// number of rows (or `dst` empty while positions are given), a position not below the
    /// number of rows of `src`.
    ///
    /// ```
    /// use lazyadam_kernels::{GradTransform, Kernels};
    /// let mut dst = [0.0f32; 2];
    /// let src = [1.0f32, 2.0, 10.0, 20.0, 100.0, 200.0]; // three rows of 2
    /// Kernels::best().sum_rows_at(&mut dst, &src, &[2, 0], &GradTransform::default())?;
    /// assert_eq!(dst, [101.0, 202.0]);
    /// # Ok::<(), lazyadam_kernels::KernelError>(())
    /// ```
    pub fn sum_rows_at<G: Element>(
        &self,
        dst: &mut [f32],
        src: &[G],
        positions: &[usize],
        t: &GradTransform,
    ) -> Result<(), KernelError> {
        let rows = table_rows("src", src.len(), dst.len(), !positions.is_empty())?;
        check_rows("positions", positions.iter().copied(), rows)?;
        if positions.is_empty() || dst.is_empty() {
            return Ok(());
        }
        arch::sum_rows_at::<G>(self.isa, dst, src, positions, t);
        Ok(())
    }

    /// Sum of `transform(src[i])^2` in f64, the same on every path: element `i` is added to
    /// accumulator `i % 8` as `(x as f64) * (x as f64)`, and the result is
    /// `((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7))`.
    ///
    /// ```
    /// use lazyadam_kernels::{GradTransform, Kernels};
    /// let s = Kernels::best().sum_squares(&[3.0f32, 4.0], &GradTransform::default());
    /// assert_eq!(s, 25.0);
    /// ```
    pub fn sum_squares<G: Element>(&self, src: &[G], t: &GradTransform) -> f64 {
        arch::sum_squares(self.isa, src, t)
    }

    /// The exact sum of `transform(src[i])^2`, rounded only when asked
    /// ([`SquareSum::to_f64`]): the same bits on every path, in any order and for any split
    /// of `src` into pieces whose sums are [merged](SquareSum::merge).
    ///
    /// ```
    /// use lazyadam_kernels::{GradTransform, Kernels, f16};
    /// let k = Kernels::best();
    /// let g = [f16::from_f32(3.0), f16::from_f32(-4.0)];
    /// assert_eq!(k.sum_squares_exact(&g, &GradTransform::default()).to_f64(), 25.0);
    /// // With the transform: (2 * 3)^2 + (clip(2 * -4, 7))^2 = 36 + 49.
    /// let t = GradTransform { scale: 2.0, clip: Some(7.0), negate: true };
    /// assert_eq!(k.sum_squares_exact(&g, &t).to_f64(), 85.0);
    /// ```
    pub fn sum_squares_exact<G: Element>(&self, src: &[G], t: &GradTransform) -> SquareSum {
        let mut acc = SquareSum::ZERO;
        arch::accumulate_squares(self.isa, &mut acc, src, t);
        acc
    }

    /// Adds the squares of `transform(src[i])` into `acc`, exactly (as
    /// [`Kernels::sum_squares_exact`] and [`SquareSum::merge`]).
    ///
    /// ```
    /// use lazyadam_kernels::{GradTransform, Kernels, SquareSum};
    /// let k = Kernels::best();
    /// let t = GradTransform::default();
    /// let mut acc = SquareSum::new();
    /// for row in [[1.0f32, 2.0], [2.0, 4.0]] {
    ///     k.accumulate_squares(&mut acc, &row, &t);
    /// }
    /// assert_eq!(acc.to_f64(), 25.0);
    /// assert_eq!(acc, k.sum_squares_exact(&[4.0f32, 2.0, 2.0, 1.0], &t));
    /// ```
    pub fn accumulate_squares<G: Element>(
        &self,
        acc: &mut SquareSum,
        src: &[G],
        t: &GradTransform,
    ) {
        arch::accumulate_squares(self.isa, acc, src, t);
    }

    /// Whether every element is finite (no infinity, no NaN).
    ///
    /// ```
    /// use lazyadam_kernels::Kernels;
    /// let k = Kernels::best();
    /// assert!(k.all_finite(&[1.0f32, -0.0]));
    /// assert!(!k.all_finite(&[1.0f32, f32::NAN]));
    /// ```
    pub fn all_finite<G: Element>(&self, src: &[G]) -> bool {
        arch::all_finite(self.isa, src)
    }

    /// The largest magnitude among the elements, widened to f32 (exactly): NaN if an element
    /// is NaN (its payload unspecified), infinity if one is infinite and none is NaN, 0 for
    /// an empty slice. One pass, an integer maximum of the magnitudes' bits, the same on every
    /// path.
    ///
    /// ```
    /// use lazyadam_kernels::{Kernels, f16};
    /// let k = Kernels::best();
    /// assert_eq!(k.max_abs(&[1.0f32, -3.5, 2.0]), 3.5);
    /// assert_eq!(k.max_abs(&[f16::from_f32(-0.25)]), 0.25);
    /// assert!(k.max_abs(&[f32::INFINITY, f32::NAN]).is_nan());
    /// assert_eq!(k.max_abs::<f32>(&[]), 0.0);
    /// ```
    pub fn max_abs<G: Element>(&self, src: &[G]) -> f32 {
        abs_from_bits::<G>(arch::max_abs_bits(self.isa, src))
    }

    /// [`Kernels::sum_squares`] and [`Kernels::max_abs`] in one pass over `src`: the f64 sum of
    /// the squares of `transform(src[i])` (the same f64 as `sum_squares`), and the largest
    /// magnitude among the *raw* elements (the same as `max_abs`). `src` is read from memory
    /// once, each vector's magnitudes being taken as it is loaded for its squares (for a
    /// non-finite check before a clipping norm whose f64 estimate usually decides it).
    ///
    /// ```
    /// use lazyadam_kernels::{GradTransform, Kernels};
    /// let k = Kernels::best();
    /// let t = GradTransform { scale: 0.5, clip: None, negate: false };
    /// let (sum, max) = k.sum_squares_max_abs(&[6.0f32, -8.0], &t);
    /// assert_eq!((sum, max), (25.0, 8.0));
    /// ```
    pub fn sum_squares_max_abs<G: Element>(&self, src: &[G], t: &GradTransform) -> (f64, f32) {
        let (sum, bits) = arch::sum_squares_max_abs_bits(self.isa, src, t);
        (sum, abs_from_bits::<G>(bits))
    }

    /// [`Kernels::accumulate_squares`] and [`Kernels::max_abs`] in one pass over `src`: adds
    /// the exact squares of `transform(src[i])` into `acc`, and returns the largest magnitude
    /// among the *raw* elements (before the transform). Both results are the same as the two
    /// calls' on every path; what changes is that `src` is read from memory once, each block
    /// being checked while it is in L1 for the squares (for a non-finite check before a
    /// clipping norm).
    ///
    /// ```
    /// use lazyadam_kernels::{GradTransform, Kernels, SquareSum};
    /// let k = Kernels::best();
    /// let t = GradTransform { scale: 0.5, clip: Some(1.0), negate: false };
    /// let g = [3.0f32, -4.0, 1.0];
    /// let mut acc = SquareSum::new();
    /// let m = k.accumulate_squares_max_abs(&mut acc, &g, &t);
    /// assert_eq!(m, 4.0); // raw: |-4|
    /// assert_eq!(acc.to_f64(), 1.0 + 1.0 + 0.25); // clipped: 1, -1, 0.5
    /// assert_eq!(acc, k.sum_squares_exact(&g, &t));
    /// ```
    pub fn accumulate_squares_max_abs<G: Element>(
        &self,
        acc: &mut SquareSum,
        src: &[G],
        t: &GradTransform,
    ) -> f32 {
        abs_from_bits::<G>(arch::accumulate_squares_max_abs_bits(self.isa, acc, src, t))
    }

    /// `dst[i] = round(src[i])` with the given rounding. Lengths must match (else `Err`,
    /// nothing written).
    ///
    /// ```
    /// use lazyadam_kernels::{Kernels, Rounding, f16};
    /// let mut dst = [f16::ZERO; 2];
    /// Kernels::best().store_row(&mut dst, &[1.0f32, 65504.0], Rounding::NearestEven)?;
    /// assert_eq!(dst, [f16::ONE, f16::MAX]);
    /// # Ok::<(), lazyadam_kernels::KernelError>(())
    /// ```
    pub fn store_row<P: Element>(
        &self,
        dst: &mut [P],
        src: &[f32],
        r: Rounding,
    ) -> Result<(), KernelError> {
        check("src", dst.len(), src.len())?;
        arch::store_row(self.isa, dst, src, r);
        Ok(())
    }
}
