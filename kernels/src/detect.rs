//! Run-time CPU feature detection, done once and cached.

use core::sync::atomic::{AtomicU8, Ordering};

use crate::Isa;

/// 0: not yet detected; otherwise `1 + index in Isa::ALL` of the best path.
static BEST: AtomicU8 = AtomicU8::new(0);

/// The best supported path, detected on first use and cached.
#[inline]
pub(crate) fn best() -> Isa {
    match BEST.load(Ordering::Relaxed) {
        0 => {
            let isa = detect_best();
            BEST.store(encode(isa), Ordering::Relaxed);
            isa
        }
        k => decode(k),
    }
}

const fn encode(isa: Isa) -> u8 {
    match isa {
        Isa::Scalar => 1,
        Isa::Portable => 2,
        Isa::Avx2 => 3,
        Isa::Avx512 => 4,
    }
}

const fn decode(k: u8) -> Isa {
    match k {
        1 => Isa::Scalar,
        3 => Isa::Avx2,
        4 => Isa::Avx512,
        _ => Isa::Portable,
    }
}

fn detect_best() -> Isa {
    if has_avx512() {
        Isa::Avx512
    } else if has_avx2() {
        Isa::Avx2
    } else {
        Isa::Portable
    }
}

/// 0: unknown, 1: no, 2: yes.
static INTEL: AtomicU8 = AtomicU8::new(0);

/// Whether the CPU says it is Intel's (CPUID leaf 0 vendor "GenuineIntel"); cached.
#[inline]
pub(crate) fn is_intel() -> bool {
    cached(&INTEL, detect_intel)
}

#[cfg(target_arch = "x86_64")]
fn detect_intel() -> bool {
    // CPUID leaf 0 exists on every x86-64 CPU; the vendor is EBX, EDX, ECX in that order.
    // `__cpuid` became a safe function after this crate's minimum Rust (1.89), where it is
    // still `unsafe`; hence the allowed lint.
    #[allow(unused_unsafe)]
    // SAFETY: CPUID is available on every x86-64 CPU, and leaf 0 on every CPU with CPUID.
    let r = unsafe { core::arch::x86_64::__cpuid(0) };
    let mut vendor = [0u8; 12];
    vendor[..4].copy_from_slice(&r.ebx.to_le_bytes());
    vendor[4..8].copy_from_slice(&r.edx.to_le_bytes());
    vendor[8..].copy_from_slice(&r.ecx.to_le_bytes());
    &vendor == b"GenuineIntel"
}

#[cfg(not(target_arch = "x86_64"))]
fn detect_intel() -> bool {
    false
}

/// 0: unknown, 1: no, 2: yes.
static AVX2: AtomicU8 = AtomicU8::new(0);
/// 0: unknown, 1: no, 2: yes.
static AVX512: AtomicU8 = AtomicU8::new(0);

fn cached(cell: &AtomicU8, f: fn() -> bool) -> bool {
    match cell.load(Ordering::Relaxed) {
        0 => {
            let yes = f();
            cell.store(if yes { 2 } else { 1 }, Ordering::Relaxed);
            yes
        }
        k => k == 2,
    }
}

/// AVX2 + FMA + F16C usable (CPU and OS).
#[inline]
pub(crate) fn has_avx2() -> bool {
    cached(&AVX2, detect_avx2)
}

/// AVX-512 F/BW/DQ/VL (and AVX2 + FMA + F16C) usable (CPU and OS).
#[inline]
pub(crate) fn has_avx512() -> bool {
    cached(&AVX512, detect_avx512)
}

#[cfg(not(target_arch = "x86_64"))]
fn detect_avx2() -> bool {
    false
}

#[cfg(not(target_arch = "x86_64"))]
fn detect_avx512() -> bool {
    false
}

/// With std, pulp's detection: `is_x86_feature_detected!` for each feature of the proof type,
/// which also checks that the OS saves the YMM/ZMM state (XCR0).
#[cfg(all(target_arch = "x86_64", feature = "std"))]
fn detect_avx2() -> bool {
    crate::arch::x86_64::V3F16c::is_available()
}

#[cfg(all(target_arch = "x86_64", feature = "std"))]
fn detect_avx512() -> bool {
    crate::arch::x86_64::V4F16c::is_available()
}

#[cfg(all(target_arch = "x86_64", not(feature = "std")))]
fn detect_avx2() -> bool {
    if cfg!(all(
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    )) {
        return true;
    }
    nostd::features().avx2
}

#[cfg(all(target_arch = "x86_64", not(feature = "std")))]
fn detect_avx512() -> bool {
    if cfg!(all(
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c",
        target_feature = "avx512f",
        target_feature = "avx512bw",
        target_feature = "avx512dq",
        target_feature = "avx512vl"
    )) {
        return true;
    }
    nostd::features().avx512
}

/// Detection without std: CPUID through raw-cpuid, OS support through XGETBV.
///
/// Kept by hand rather than pulp's: without its `std` feature, pulp 0.22 reads CPUID only
/// (`core_arch::raw_cpuid_detect`) and never XCR0, so it would report AVX-512 on a CPU whose
/// OS (or hypervisor, or kernel context) has not enabled the ZMM state, and the first AVX-512
/// instruction would fault. This crate must not offer a path the OS cannot run.
#[cfg(all(target_arch = "x86_64", not(feature = "std")))]
mod nostd {
    use raw_cpuid::CpuId;

    pub(super) struct Features {
        pub(super) avx2: bool,
        pub(super) avx512: bool,
    }

    /// Reads XCR0.
    ///
    /// # Safety
    ///
    /// The CPU must support XSAVE and the OS must have enabled it (CPUID.1:ECX.OSXSAVE).
    #[target_feature(enable = "xsave")]
    unsafe fn xcr0() -> u64 {
        // SAFETY: the caller guarantees OSXSAVE, which makes XGETBV(0) valid.
        unsafe { core::arch::x86_64::_xgetbv(0) }
    }

    pub(super) fn features() -> Features {
        let cpuid = CpuId::new();
        let Some(fi) = cpuid.get_feature_info() else {
            return Features {
                avx2: false,
                avx512: false,
            };
        };
        if !(fi.has_oxsave() && fi.has_avx() && fi.has_fma() && fi.has_f16c()) {
            return Features {
                avx2: false,
                avx512: false,
            };
        }
        // SAFETY: OSXSAVE is set (checked just above), so XGETBV is available and enabled.
        let xcr0 = unsafe { xcr0() };
        // XMM (bit 1) and YMM (bit 2) state enabled by the OS.
        let os_avx = xcr0 & 0b110 == 0b110;
        // Opmask (5), ZMM_Hi256 (6), Hi16_ZMM (7).
        let os_avx512 = os_avx && xcr0 & 0b1110_0000 == 0b1110_0000;
        let ext = cpuid.get_extended_feature_info();
        let avx2 = os_avx && ext.as_ref().is_some_and(|e| e.has_avx2());
        let avx512 = avx2
            && os_avx512
            && ext.as_ref().is_some_and(|e| {
                e.has_avx512f() && e.has_avx512bw() && e.has_avx512dq() && e.has_avx512vl()
            });
        Features { avx2, avx512 }
    }
}
