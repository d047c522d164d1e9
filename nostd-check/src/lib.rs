//! A `#![no_std]` consumer of `lazyadam-kernels` (built without its `std` feature).
//!
//! `cargo build --manifest-path nostd-check/Cargo.toml` must succeed: it compiles the kernels
//! with every path (run-time detection through CPUID/XGETBV on x86-64) and links them into a
//! static library together with this crate's own panic handler.
#![no_std]
#![deny(missing_docs)]

use lazyadam_kernels::{AdamCoeffs, GradTransform, Isa, Kernels, Rounding, bf16, f16};

/// One path's outputs: parameters, moments, sum of squares, all-finite.
type Outputs<const N: usize> = ([f16; N], [bf16; N], [bf16; N], f64, bool);

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

/// Runs one mixed-precision Adam row on every supported path and compares it with the
/// scalar reference. Returns a bit mask: bit `i` set when path `Isa::ALL[i]` is supported
/// and agreed; bit 31 set on any disagreement or error.
#[unsafe(no_mangle)]
pub extern "C" fn lazyadam_nostd_selftest() -> u32 {
    const N: usize = 37;
    let mut c = AdamCoeffs::new(0.01, 0.9, 0.999, 1e-7);
    c.grad = GradTransform {
        scale: 0.5,
        clip: Some(1.0),
        negate: false,
    };
    c.rounding = Rounding::Stochastic { seed: 3, offset: 0 };
    let run = |k: Kernels| -> Option<Outputs<N>> {
        let mut p = [f16::ONE; N];
        let mut m = [bf16::ZERO; N];
        let mut v = [bf16::ZERO; N];
        let mut g = [0.0f32; N];
        for (i, x) in g.iter_mut().enumerate() {
            *x = i as f32 * 0.1 - 1.5;
        }
        k.adam_row(&c, &mut p, &mut m, &mut v, &g).ok()?;
        Some((p, m, v, k.sum_squares(&g, &c.grad), k.all_finite(&p)))
    };
    let Ok(scalar) = Kernels::new(Isa::Scalar) else {
        return 1 << 31;
    };
    let want = run(scalar);
    let mut mask = 0u32;
    for (i, isa) in Isa::ALL.iter().enumerate() {
        if let Ok(k) = Kernels::new(*isa) {
            if run(k) == want && want.is_some() {
                mask |= 1 << i;
            } else {
                mask |= 1 << 31;
            }
        }
    }
    mask
}

/// The best path's name as a NUL-terminated C string.
#[unsafe(no_mangle)]
pub extern "C" fn lazyadam_nostd_best_isa() -> *const u8 {
    match Isa::best() {
        Isa::Scalar => c"scalar".as_ptr().cast(),
        Isa::Portable => c"portable".as_ptr().cast(),
        Isa::Avx2 => c"avx2".as_ptr().cast(),
        Isa::Avx512 => c"avx512".as_ptr().cast(),
        _ => c"other".as_ptr().cast(),
    }
}
