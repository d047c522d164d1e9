//! Criterion benches of the `lazyadam-kernels` Adam row update.
//!
//! For each storage combination and row length (16 .. 4096 in cache, 16,777,216 out of cache)
//! this measures, in elements per second:
//!
//! * every kernel path the machine supports (`scalar`, `portable`, `avx2`, `avx512`; the
//!   dispatched path is `Isa::best()`, printed at start);
//! * `plain-default`: a plain per-element loop of the contract's formula, compiled with this
//!   build's default flags (baseline x86-64: SSE2);
//! * `plain-native`: the *same* plain loop compiled for the native CPU. Instead of a second
//!   build with `-C target-cpu=native`, the loop body is `#[inline(always)]` and instantiated
//!   inside a `#[target_feature(enable = "avx2,fma,f16c,avx512f,...")]` wrapper, so LLVM
//!   auto-vectorizes it with the same instructions `target-cpu=native` would allow, and both
//!   run side by side in one binary. (Only the CPU-specific tuning model differs from a real
//!   `target-cpu=native` build; Rust never contracts mul+add into FMA, so the results match.)
//!
//! and a STREAM-triad loop `a[i] = b[i] + s*c[i]` on 16M f32 (reported as bytes/s, 12 bytes
//! per element as STREAM counts them) for the out-of-cache bandwidth comparison: an Adam
//! element moves 28 bytes with all-f32 storage (4 loads, 3 stores of 4 bytes).
//!
//! `adam-spacing` runs the best path with each loop of long rows (`split/gap` and
//! `one-pass/gap`, forced with `Kernels::with_long_row_loop`) on out-of-cache all-f32 and
//! all-f16 rows whose four
//! streams (parameters, m, v, gradient) lie in one allocation, each `gap` bytes after the end
//! of the previous one. Separate `Vec`s of one size leave the allocator to choose that spacing
//! (glibc: one page more than the size, `gap` 4096). On this project's AMD test machine the
//! all-f16 time depends on the spacing far more than on any change to the loop, so the ratio
//! of f16 to f32 element rates is reported per spacing.
//!
//! `sum_squares/{f32,f16}` times the exact sum of squares (`exact/<path>`,
//! `Kernels::sum_squares_exact`; for f32 also `scaled-exact/<path>` with a scale, which takes
//! the transform-into-a-buffer route) against the f64 one (`f64/<path>`) on rows of 64, 4096
//! and 1,048,576 gradient values; run just these with `-- sum_squares`. `exact-then-max/<path>`
//! is a non-finite check's largest magnitude (`Kernels::max_abs`) after the exact sum, two
//! passes; `exact-and-max/<path>` both from one pass (`Kernels::accumulate_squares_max_abs`);
//! `f64-and-max/<path>` the f64 sum and the magnitude from one pass
//! (`Kernels::sum_squares_max_abs`, the step's usual route: the f64 sum is an estimate that
//! decides the clipping factor unless it is too close to call).
//!
//! `adam-rows/{all-f32,all-f16}` updates 1,024 rows of 64 elements with one `adam_row` call
//! each, as a sparse step's rows, with the identity gradient transform (`identity/<path>`) and
//! with a scale (`scaled/<path>`, as under a clipping norm or a loss scale).
//!
//! Quick mode (CI): `cargo bench -p lazyadam-benches --bench kernels -- --quick`, or
//! `LAZYADAM_BENCH_QUICK=1`: short warm-up and measurement and a 4M-element out-of-cache row.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use lazyadam_kernels::{
    AdamCoeffs, DType, Element, GradTransform, Isa, Kernels, LongRowLoop, SquareSum, bf16, f16,
};

const IN_CACHE: [usize; 5] = [16, 64, 256, 1024, 4096];
const OUT_OF_CACHE: usize = 16_777_216;
const OUT_OF_CACHE_QUICK: usize = 4_194_304;

fn quick() -> bool {
    std::env::var_os("LAZYADAM_BENCH_QUICK").is_some_and(|v| v != "0")
        || std::env::args().any(|a| a == "--quick")
}

fn sizes() -> Vec<usize> {
    let mut s = IN_CACHE.to_vec();
    s.push(if quick() {
        OUT_OF_CACHE_QUICK
    } else {
        OUT_OF_CACHE
    });
    s
}

fn coeffs() -> AdamCoeffs {
    // Step 10 of Adam with lr = 1e-3.
    let (lr, b1, b2) = (1e-3f32, 0.9f32, 0.999f32);
    let t = 10;
    let lr_t = lr * (1.0 - b2.powi(t)).sqrt() / (1.0 - b1.powi(t));
    AdamCoeffs::new(lr_t, b1, b2, 1e-7)
}

/// The contract's formula as a plain loop (no optional parts, as in `coeffs()`).
#[inline(always)]
fn plain_adam<P: Element, G: Element, M: Element>(
    c: &AdamCoeffs,
    p: &mut [P],
    m: &mut [M],
    v: &mut [M],
    g: &[G],
) {
    let n = p.len();
    let (m, v, g) = (&mut m[..n], &mut v[..n], &g[..n]);
    for i in 0..n {
        let gi = g[i].to_f32();
        let m1 = c.beta1 * m[i].to_f32() + c.one_minus_beta1 * gi;
        let v1 = c.beta2 * v[i].to_f32() + c.one_minus_beta2 * (gi * gi);
        let p1 = p[i].to_f32() - (c.lr_t * m1) / (v1.sqrt() + c.epsilon);
        m[i] = M::from_f32(m1);
        v[i] = M::from_f32(v1);
        p[i] = P::from_f32(p1);
    }
}

/// The same plain loop compiled for the native CPU's vector extensions.
///
/// # Safety
///
/// The CPU must support every feature listed.
#[cfg(target_arch = "x86_64")]
#[target_feature(
    enable = "avx2,fma,f16c,bmi1,bmi2,lzcnt,popcnt,avx512f,avx512bw,avx512dq,avx512vl"
)]
unsafe fn plain_adam_native<P: Element, G: Element, M: Element>(
    c: &AdamCoeffs,
    p: &mut [P],
    m: &mut [M],
    v: &mut [M],
    g: &[G],
) {
    plain_adam(c, p, m, v, g)
}

#[cfg(target_arch = "x86_64")]
fn native_supported() -> bool {
    Isa::Avx512.is_supported()
        && is_x86_feature_detected!("bmi1")
        && is_x86_feature_detected!("bmi2")
        && is_x86_feature_detected!("lzcnt")
        && is_x86_feature_detected!("popcnt")
}

struct Rows<P, G, M> {
    p: Vec<P>,
    m: Vec<M>,
    v: Vec<M>,
    g: Vec<G>,
}

/// Element `i` of stream `k` (0 parameters, 1 m, 2 v, 3 gradient): deterministic, varied,
/// well-scaled values (no subnormals on any path; `v` non-negative).
fn init_value(k: usize, i: usize) -> f32 {
    let val = |i: usize, lo: f32| {
        let x = ((i.wrapping_mul(2_654_435_761) >> 7) % 1000) as f32 / 1000.0;
        let s = if i.is_multiple_of(3) { -1.0 } else { 1.0 };
        s * (lo + (1.0 - lo) * x)
    };
    match k {
        0 => val(i, 0.1),
        1 => 0.01 * val(i + 1, 0.1),
        2 => 0.01 * val(i + 2, 0.1).abs(),
        _ => val(i + 3, 0.05),
    }
}

fn rows<P: Element, G: Element, M: Element>(n: usize) -> Rows<P, G, M> {
    Rows {
        p: (0..n).map(|i| P::from_f32(init_value(0, i))).collect(),
        m: (0..n).map(|i| M::from_f32(init_value(1, i))).collect(),
        v: (0..n).map(|i| M::from_f32(init_value(2, i))).collect(),
        g: (0..n).map(|i| G::from_f32(init_value(3, i))).collect(),
    }
}

fn bench_combo<P: Element, G: Element, M: Element>(c: &mut Criterion, name: &str) {
    let coeffs = coeffs();
    let mut group = c.benchmark_group(format!("adam/{name}"));
    for n in sizes() {
        let mut r = rows::<P, G, M>(n);
        group.throughput(Throughput::Elements(n as u64));
        if n >= OUT_OF_CACHE_QUICK {
            group.sample_size(10);
        }
        for isa in Isa::supported() {
            let k = Kernels::new(isa).expect("supported");
            group.bench_with_input(BenchmarkId::new(isa.name(), n), &n, |b, _| {
                b.iter(|| {
                    k.adam_row(&coeffs, &mut r.p, &mut r.m, &mut r.v, black_box(&r.g))
                        .expect("equal lengths")
                })
            });
        }
        group.bench_with_input(BenchmarkId::new("plain-default", n), &n, |b, _| {
            b.iter(|| plain_adam(&coeffs, &mut r.p, &mut r.m, &mut r.v, black_box(&r.g)))
        });
        #[cfg(target_arch = "x86_64")]
        if native_supported() {
            group.bench_with_input(BenchmarkId::new("plain-native", n), &n, |b, _| {
                b.iter(|| {
                    // SAFETY: `native_supported()` checked every enabled feature.
                    unsafe {
                        plain_adam_native(&coeffs, &mut r.p, &mut r.m, &mut r.v, black_box(&r.g))
                    }
                })
            });
        }
    }
    group.finish();
}

fn adam(c: &mut Criterion) {
    eprintln!(
        "lazyadam-kernels: dispatched path = {}, supported = {:?}, quick = {}",
        Isa::best(),
        Isa::supported().collect::<Vec<_>>(),
        quick()
    );
    bench_combo::<f32, f32, f32>(c, "all-f32");
    bench_combo::<f16, f16, f16>(c, "all-f16");
    bench_combo::<f16, f16, f32>(c, "f16-params-grads_f32-moments");
    bench_combo::<bf16, bf16, bf16>(c, "all-bf16");
    bench_combo::<f32, f32, bf16>(c, "f32-params_bf16-moments");
    bench_combo::<f32, f16, f32>(c, "f32-params_f16-grads");
}

/// The four streams of an all-`T` row of `n` elements in one allocation, `gap` bytes apart.
fn spaced_rows<T: Element>(n: usize, gap: usize) -> Vec<T> {
    let gap = gap / std::mem::size_of::<T>();
    let mut all = vec![T::from_f32(0.0); 4 * n + 3 * gap];
    for k in 0..4 {
        let s = &mut all[k * (n + gap)..][..n];
        for (i, x) in s.iter_mut().enumerate() {
            *x = T::from_f32(init_value(k, i));
        }
    }
    all
}

/// Out-of-cache rows at several stream spacings, each timed with both loops of long rows
/// (`split` and `one-pass`, `LongRowLoop`).
fn bench_spacing<T: Element>(c: &mut Criterion, name: &str) {
    let coeffs = coeffs();
    let n = *sizes().last().expect("non-empty");
    let k = Kernels::best();
    let mut group = c.benchmark_group(format!("adam-spacing/{name}/{}", Isa::best().name()));
    group.sample_size(10);
    group.throughput(Throughput::Elements(n as u64));
    for gap in [0usize, 2048, 4096, 8192, 16384, 32768] {
        let mut all = spaced_rows::<T>(n, gap);
        let step = n + gap / std::mem::size_of::<T>();
        let (p, rest) = all.split_at_mut(step);
        let (m, rest) = rest.split_at_mut(step);
        let (v, g) = rest.split_at_mut(step);
        let (p, m, v, g) = (&mut p[..n], &mut m[..n], &mut v[..n], &g[..n]);
        for (label, l) in [
            ("split/gap", LongRowLoop::Split),
            ("one-pass/gap", LongRowLoop::OnePass),
        ] {
            let k = k.with_long_row_loop(l);
            group.bench_with_input(BenchmarkId::new(label, gap), &gap, |b, _| {
                b.iter(|| {
                    k.adam_row(&coeffs, p, m, v, black_box(g))
                        .expect("equal lengths")
                })
            });
        }
    }
    group.finish();
}

fn spacing(c: &mut Criterion) {
    bench_spacing::<f32>(c, "all-f32");
    bench_spacing::<f16>(c, "all-f16");
}

/// STREAM triad, `a[i] = b[i] + s*c[i]`, 12 bytes per element as STREAM counts them.
#[inline(never)]
fn triad(a: &mut [f32], b: &[f32], c: &[f32], s: f32) {
    let n = a.len();
    let (b, c) = (&b[..n], &c[..n]);
    for i in 0..n {
        a[i] = b[i] + s * c[i];
    }
}

fn stream(c: &mut Criterion) {
    let n = *sizes().last().expect("non-empty");
    let mut a = vec![0.0f32; n];
    let b: Vec<f32> = (0..n).map(|i| (i % 1000) as f32).collect();
    let cc: Vec<f32> = (0..n).map(|i| (i % 777) as f32).collect();
    let mut group = c.benchmark_group("stream");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(12 * n as u64));
    group.bench_with_input(BenchmarkId::new("triad", n), &n, |bch, _| {
        bch.iter(|| triad(&mut a, black_box(&b), black_box(&cc), black_box(3.0)))
    });
    group.finish();
}

/// Sizes of the sum-of-squares groups: a short row, an in-cache row, an out-of-cache one.
const SUM_SIZES: [usize; 3] = [64, 4096, 1 << 20];

/// The exact sum of squares (`exact`, `Kernels::sum_squares_exact`) against the f64 one
/// (`f64`, `Kernels::sum_squares`) on every supported path, for gradients of type `G` with
/// the identity transform and with a scale (`scaled-exact`: the f32 values then go through
/// the path's vector transform into a buffer before binning).
fn bench_sum_squares<G: Element>(c: &mut Criterion, name: &str) {
    let mut group = c.benchmark_group(format!("sum_squares/{name}"));
    let id = GradTransform::default();
    let scaled = GradTransform {
        scale: 0.5,
        ..GradTransform::default()
    };
    for n in SUM_SIZES {
        let g: Vec<G> = (0..n).map(|i| G::from_f32(init_value(3, i))).collect();
        group.throughput(Throughput::Elements(n as u64));
        for isa in Isa::supported() {
            let k = Kernels::new(isa).expect("supported");
            group.bench_with_input(BenchmarkId::new(format!("exact/{isa}"), n), &n, |b, _| {
                b.iter(|| k.sum_squares_exact(black_box(&g), &id))
            });
            if G::DTYPE == DType::F32 {
                group.bench_with_input(
                    BenchmarkId::new(format!("scaled-exact/{isa}"), n),
                    &n,
                    |b, _| b.iter(|| k.sum_squares_exact(black_box(&g), &scaled)),
                );
            }
            // A non-finite check before a clipping norm: two passes, or one.
            group.bench_with_input(
                BenchmarkId::new(format!("exact-then-max/{isa}"), n),
                &n,
                |b, _| {
                    b.iter(|| {
                        let s = k.sum_squares_exact(black_box(&g), &id);
                        (s, k.max_abs(black_box(&g)))
                    })
                },
            );
            group.bench_with_input(
                BenchmarkId::new(format!("exact-and-max/{isa}"), n),
                &n,
                |b, _| {
                    b.iter(|| {
                        let mut s = SquareSum::new();
                        let m = k.accumulate_squares_max_abs(&mut s, black_box(&g), &id);
                        (s, m)
                    })
                },
            );
            group.bench_with_input(BenchmarkId::new(format!("f64/{isa}"), n), &n, |b, _| {
                b.iter(|| k.sum_squares(black_box(&g), &id))
            });
            group.bench_with_input(
                BenchmarkId::new(format!("f64-and-max/{isa}"), n),
                &n,
                |b, _| b.iter(|| k.sum_squares_max_abs(black_box(&g), &id)),
            );
        }
    }
    group.finish();
}

fn sum_squares(c: &mut Criterion) {
    bench_sum_squares::<f32>(c, "f32");
    bench_sum_squares::<f16>(c, "f16");
}

/// Rows of a sparse step: [`SPARSE_ROWS`] rows of [`SPARSE_ROW_LEN`] elements, one `adam_row`
/// call each, with the identity gradient transform and with a scale (a clipping factor or a
/// loss scale's unscale), on every path. Each bench starts from the same rows, whose four
/// streams lie in one allocation [`SPARSE_GAP`] bytes apart, so that where they lie relative
/// to each other (which can change the time, see `adam-spacing`) does not depend on what the
/// benches before it allocated.
fn bench_sparse_rows<T: Element>(c: &mut Criterion, name: &str) {
    let mut group = c.benchmark_group(format!("adam-rows/{name}"));
    let n = SPARSE_ROWS * SPARSE_ROW_LEN;
    group.throughput(Throughput::Elements(n as u64));
    let mut scaled = coeffs();
    scaled.grad.scale = 1.0 / 64.0;
    let stride = n + SPARSE_GAP / std::mem::size_of::<T>();
    for isa in Isa::supported() {
        let k = Kernels::new(isa).expect("supported");
        for (what, c) in [("identity", coeffs()), ("scaled", scaled)] {
            let mut all = spaced_rows::<T>(n, SPARSE_GAP);
            let (p, rest) = all.split_at_mut(stride);
            let (m, rest) = rest.split_at_mut(stride);
            let (v, g) = rest.split_at_mut(stride);
            let (p, m, v, g) = (&mut p[..n], &mut m[..n], &mut v[..n], &g[..n]);
            group.bench_function(BenchmarkId::new(what, isa.name()), |b| {
                b.iter(|| {
                    // One barrier for the whole gradient, not one a row: a row's barrier stores
                    // the slice as two halves and loads it as one, which waits for the previous
                    // row's stores to drain (measured: about twice the time).
                    let g = black_box(&*g);
                    let rows = p.chunks_exact_mut(SPARSE_ROW_LEN).zip(
                        (m.chunks_exact_mut(SPARSE_ROW_LEN))
                            .zip(v.chunks_exact_mut(SPARSE_ROW_LEN)),
                    );
                    for ((p, (m, v)), g) in rows.zip(g.chunks_exact(SPARSE_ROW_LEN)) {
                        k.adam_row(&c, p, m, v, g).expect("equal lengths");
                    }
                })
            });
        }
    }
    group.finish();
}

/// Row length and row count of [`bench_sparse_rows`] (`sparse_1m_d64`'s rows; 768 KiB of
/// f32 rows, in cache).
const SPARSE_ROW_LEN: usize = 64;
const SPARSE_ROWS: usize = 1024;
/// Bytes between the streams of [`bench_sparse_rows`]: one page, so a row lies at the same
/// offset modulo 4 KiB in every stream (as in page-aligned tables) and its loads come before
/// its stores.
const SPARSE_GAP: usize = 4096;

fn sparse_rows(c: &mut Criterion) {
    bench_sparse_rows::<f32>(c, "all-f32");
    bench_sparse_rows::<f16>(c, "all-f16");
}

fn config() -> Criterion {
    let c = Criterion::default();
    if quick() {
        c.warm_up_time(Duration::from_millis(100))
            .measurement_time(Duration::from_millis(300))
            .sample_size(10)
    } else {
        c.warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(1))
            .sample_size(20)
    }
}

criterion_group! {
    name = benches;
    config = config();
    targets = stream, adam, sparse_rows, spacing, sum_squares
}
criterion_main!(benches);
