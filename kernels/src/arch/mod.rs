//! Dispatch from an [`Isa`] to its implementation.
//!
//! Each vector path is one instantiation of the generic code in `simd.rs` with its token;
//! the x86 ones are compiled inside `#[target_feature]` entry points so the whole row loop is
//! built for that instruction set. A [`Kernels`](crate::Kernels) handle only exists for a
//! supported path, which is what makes calling those entry points sound.

use crate::{AdamCoeffs, Element, GradTransform, Isa, Rounding, SquareSum, scalar, simd};

pub(crate) mod portable;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86_64;

/// Declares the entry points of one `#[target_feature]` path.
#[cfg(target_arch = "x86_64")]
macro_rules! entry_points {
    ($name:ident, $features:literal, $Tok:ty) => {
        /// Entry points compiled for this path's instruction set.
        pub(crate) mod $name {
            use crate::{AdamCoeffs, Element, GradTransform, Rounding, SquareSum, simd};

            /// The token for this path.
            ///
            /// # Safety
            ///
            /// The CPU must support this path's features.
            #[inline(always)]
            unsafe fn token() -> $Tok {
                // SAFETY: forwarded from the caller.
                unsafe { <$Tok>::new_unchecked() }
            }

            /// # Safety
            ///
            /// The CPU must support this path's features; slice lengths as for `simd::adam_row`.
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn adam_row<P: Element, G: Element, M: Element, const AMS: bool>(
                split: bool,
                c: &AdamCoeffs,
                param: &mut [P],
                m: &mut [M],
                v: &mut [M],
                vhat: &mut [M],
                grad: &[G],
            ) {
                // SAFETY: the caller guarantees the features.
                let s = unsafe { token() };
                simd::adam_row::<_, P, G, M, AMS>(s, split, c, param, m, v, vhat, grad)
            }

            /// # Safety
            ///
            /// The CPU must support this path's features; arguments as for
            /// `simd::adam_rows`.
            #[target_feature(enable = $features)]
            #[allow(clippy::too_many_arguments)]
            pub(crate) unsafe fn adam_rows<P: Element, G: Element, M: Element>(
                split: bool,
                c: &AdamCoeffs,
                param: &mut [P],
                m: &mut [M],
                v: &mut [M],
                row_len: usize,
                rows: &[usize],
                grads: &[G],
            ) {
                // SAFETY: the caller guarantees the features.
                let s = unsafe { token() };
                simd::adam_rows::<_, P, G, M>(s, split, c, param, m, v, row_len, rows, grads)
            }

            /// # Safety
            ///
            /// The CPU must support this path's features; arguments as for
            /// `simd::accumulate_rows`.
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn accumulate_rows<G: Element>(
                acc: &mut [f32],
                row_len: usize,
                slots: &[u32],
                src: &[G],
                t: &GradTransform,
            ) {
                // SAFETY: the caller guarantees the features.
                let s = unsafe { token() };
                simd::accumulate_rows::<_, G>(s, acc, row_len, slots, src, t)
            }

            /// # Safety
            ///
            /// The CPU must support this path's features; arguments as for
            /// `simd::sum_rows_at`.
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn sum_rows_at<G: Element>(
                dst: &mut [f32],
                src: &[G],
                positions: &[usize],
                t: &GradTransform,
            ) {
                // SAFETY: the caller guarantees the features.
                let s = unsafe { token() };
                simd::sum_rows_at::<_, G>(s, dst, src, positions, t)
            }

            /// # Safety
            ///
            /// The CPU must support this path's features.
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn load_row<G: Element, const ACC: bool>(
                dst: &mut [f32],
                src: &[G],
                t: &GradTransform,
            ) {
                // SAFETY: the caller guarantees the features.
                let s = unsafe { token() };
                simd::load_row::<_, G, ACC>(s, dst, src, t)
            }

            /// # Safety
            ///
            /// The CPU must support this path's features.
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn sum_squares<G: Element>(src: &[G], t: &GradTransform) -> f64 {
                // SAFETY: the caller guarantees the features.
                let s = unsafe { token() };
                simd::sum_squares::<_, G>(s, src, t)
            }

            /// # Safety
            ///
            /// The CPU must support this path's features.
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn accumulate_squares<G: Element>(
                acc: &mut SquareSum,
                src: &[G],
                t: &GradTransform,
            ) {
                // SAFETY: the caller guarantees the features.
                let s = unsafe { token() };
                simd::accumulate_squares::<_, G>(s, acc, src, t)
            }

            /// # Safety
            ///
            /// The CPU must support this path's features.
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn sum_squares_max_abs_bits<G: Element>(
                src: &[G],
                t: &GradTransform,
            ) -> (f64, u32) {
                // SAFETY: the caller guarantees the features.
                let s = unsafe { token() };
                simd::sum_squares_max_abs_bits::<_, G>(s, src, t)
            }

            /// # Safety
            ///
            /// The CPU must support this path's features.
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn accumulate_squares_max_abs_bits<G: Element>(
                acc: &mut SquareSum,
                src: &[G],
                t: &GradTransform,
            ) -> u32 {
                // SAFETY: the caller guarantees the features.
                let s = unsafe { token() };
                simd::accumulate_squares_max_abs_bits::<_, G>(s, acc, src, t)
            }

            /// # Safety
            ///
            /// The CPU must support this path's features.
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn all_finite<G: Element>(src: &[G]) -> bool {
                simd::all_finite(src)
            }

            /// # Safety
            ///
            /// The CPU must support this path's features.
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn max_abs_bits<G: Element>(src: &[G]) -> u32 {
                // The scalar fold, compiled here with this path's features
                // (an integer maximum, which the compiler vectorizes).
                crate::scalar::max_abs_bits(src)
            }

            /// # Safety
            ///
            /// The CPU must support this path's features.
            #[target_feature(enable = $features)]
            pub(crate) unsafe fn store_row<P: Element>(dst: &mut [P], src: &[f32], r: Rounding) {
                // SAFETY: the caller guarantees the features.
                let s = unsafe { token() };
                simd::store_row::<_, P>(s, dst, src, r)
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
entry_points!(avx2, "avx2,fma,f16c", crate::arch::x86_64::Avx2);
#[cfg(target_arch = "x86_64")]
entry_points!(
    avx512,
    "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c",
    crate::arch::x86_64::Avx512
);

/// Dispatches one call. The x86 arms are only reached through a `Kernels` handle, which is
/// only created for supported paths.
macro_rules! dispatch {
    ($isa:expr, $scalar:expr, $portable:expr, $avx2:expr, $avx512:expr) => {
        match $isa {
            Isa::Scalar => $scalar,
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Isa::Avx2` only reaches here from a `Kernels` made by `Kernels::new`
            // or `Kernels::best`, which checked that the CPU supports it.
            Isa::Avx2 => unsafe { $avx2 },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above, for AVX-512.
            Isa::Avx512 => unsafe { $avx512 },
            _ => $portable,
        }
    };
}

#[inline]
#[allow(clippy::too_many_arguments)]
pub(crate) fn adam_row<P: Element, G: Element, M: Element, const AMS: bool>(
    isa: Isa,
    split: bool,
    c: &AdamCoeffs,
    param: &mut [P],
    m: &mut [M],
    v: &mut [M],
    vhat: &mut [M],
    grad: &[G],
) {
    dispatch!(
        isa,
        scalar::adam_row::<P, G, M, AMS>(c, param, m, v, vhat, grad, 0),
        simd::adam_row::<_, P, G, M, AMS>(portable::Portable, split, c, param, m, v, vhat, grad),
        avx2::adam_row::<P, G, M, AMS>(split, c, param, m, v, vhat, grad),
        avx512::adam_row::<P, G, M, AMS>(split, c, param, m, v, vhat, grad)
    )
}

#[inline]
#[allow(clippy::too_many_arguments)]
pub(crate) fn adam_rows<P: Element, G: Element, M: Element>(
    isa: Isa,
    split: bool,
    c: &AdamCoeffs,
    param: &mut [P],
    m: &mut [M],
    v: &mut [M],
    row_len: usize,
    rows: &[usize],
    grads: &[G],
) {
    dispatch!(
        isa,
        scalar::adam_rows::<P, G, M>(c, param, m, v, row_len, rows, grads),
        simd::adam_rows::<_, P, G, M>(
            portable::Portable,
            split,
            c,
            param,
            m,
            v,
            row_len,
            rows,
            grads
        ),
        avx2::adam_rows::<P, G, M>(split, c, param, m, v, row_len, rows, grads),
        avx512::adam_rows::<P, G, M>(split, c, param, m, v, row_len, rows, grads)
    )
}

#[inline]
pub(crate) fn accumulate_rows<G: Element>(
    isa: Isa,
    acc: &mut [f32],
    row_len: usize,
    slots: &[u32],
    src: &[G],
    t: &GradTransform,
) {
    dispatch!(
        isa,
        scalar::accumulate_rows(acc, row_len, slots, src, t),
        simd::accumulate_rows::<_, G>(portable::Portable, acc, row_len, slots, src, t),
        avx2::accumulate_rows::<G>(acc, row_len, slots, src, t),
        avx512::accumulate_rows::<G>(acc, row_len, slots, src, t)
    )
}

#[inline]
pub(crate) fn sum_rows_at<G: Element>(
    isa: Isa,
    dst: &mut [f32],
    src: &[G],
    positions: &[usize],
    t: &GradTransform,
) {
    dispatch!(
        isa,
        scalar::sum_rows_at(dst, src, positions, t),
        simd::sum_rows_at::<_, G>(portable::Portable, dst, src, positions, t),
        avx2::sum_rows_at::<G>(dst, src, positions, t),
        avx512::sum_rows_at::<G>(dst, src, positions, t)
    )
}

#[inline]
pub(crate) fn load_row<G: Element, const ACC: bool>(
    isa: Isa,
    dst: &mut [f32],
    src: &[G],
    t: &GradTransform,
) {
    dispatch!(
        isa,
        if ACC {
            scalar::accumulate_row(dst, src, t)
        } else {
            scalar::load_row(dst, src, t)
        },
        simd::load_row::<_, G, ACC>(portable::Portable, dst, src, t),
        avx2::load_row::<G, ACC>(dst, src, t),
        avx512::load_row::<G, ACC>(dst, src, t)
    )
}

#[inline]
pub(crate) fn sum_squares<G: Element>(isa: Isa, src: &[G], t: &GradTransform) -> f64 {
    dispatch!(
        isa,
        scalar::sum_squares(src, t),
        simd::sum_squares::<_, G>(portable::Portable, src, t),
        avx2::sum_squares::<G>(src, t),
        avx512::sum_squares::<G>(src, t)
    )
}

#[inline]
pub(crate) fn accumulate_squares<G: Element>(
    isa: Isa,
    acc: &mut SquareSum,
    src: &[G],
    t: &GradTransform,
) {
    dispatch!(
        isa,
        scalar::accumulate_squares(acc, src, t),
        simd::accumulate_squares::<_, G>(portable::Portable, acc, src, t),
        avx2::accumulate_squares::<G>(acc, src, t),
        avx512::accumulate_squares::<G>(acc, src, t)
    )
}

#[inline]
pub(crate) fn sum_squares_max_abs_bits<G: Element>(
    isa: Isa,
    src: &[G],
    t: &GradTransform,
) -> (f64, u32) {
    dispatch!(
        isa,
        scalar::sum_squares_max_abs_bits(src, t),
        simd::sum_squares_max_abs_bits::<_, G>(portable::Portable, src, t),
        avx2::sum_squares_max_abs_bits::<G>(src, t),
        avx512::sum_squares_max_abs_bits::<G>(src, t)
    )
}

#[inline]
pub(crate) fn accumulate_squares_max_abs_bits<G: Element>(
    isa: Isa,
    acc: &mut SquareSum,
    src: &[G],
    t: &GradTransform,
) -> u32 {
    dispatch!(
        isa,
        scalar::accumulate_squares_max_abs_bits(acc, src, t),
        simd::accumulate_squares_max_abs_bits::<_, G>(portable::Portable, acc, src, t),
        avx2::accumulate_squares_max_abs_bits::<G>(acc, src, t),
        avx512::accumulate_squares_max_abs_bits::<G>(acc, src, t)
    )
}

#[inline]
pub(crate) fn all_finite<G: Element>(isa: Isa, src: &[G]) -> bool {
    dispatch!(
        isa,
        scalar::all_finite(src),
        simd::all_finite(src),
        avx2::all_finite::<G>(src),
        avx512::all_finite::<G>(src)
    )
}

#[inline]
pub(crate) fn max_abs_bits<G: Element>(isa: Isa, src: &[G]) -> u32 {
    dispatch!(
        isa,
        scalar::max_abs_bits(src),
        scalar::max_abs_bits(src),
        avx2::max_abs_bits::<G>(src),
        avx512::max_abs_bits::<G>(src)
    )
}

#[inline]
pub(crate) fn store_row<P: Element>(isa: Isa, dst: &mut [P], src: &[f32], r: Rounding) {
    dispatch!(
        isa,
        scalar::store_row(dst, src, r, 0),
        simd::store_row::<_, P>(portable::Portable, dst, src, r),
        avx2::store_row::<P>(dst, src, r),
        avx512::store_row::<P>(dst, src, r)
    )
}
