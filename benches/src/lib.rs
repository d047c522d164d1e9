//! Benches live in `benches/` and `src/bin/`; this library holds what the bench binaries share.

use std::time::Duration;

use lazyadam::Isa;

/// Median and minimum of a non-empty set of durations, in milliseconds (sorts `times`).
pub fn median_min_ms(times: &mut [Duration]) -> (f64, f64) {
    times.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    (ms(times[times.len() / 2]), ms(times[0]))
}

/// The `q`-quantile (`q` from 0 to 1) of values sorted in ascending order: the value at index
/// `round((len - 1) * q)`, so `quantile(v, 0.5)` is `v[len / 2]`, the upper median for an even
/// count. NaN for an empty slice.
///
/// ```
/// use lazyadam_benches::quantile;
/// let v = [1.0, 2.0, 3.0, 4.0];
/// assert_eq!(quantile(&v, 0.5), 3.0);
/// assert_eq!(quantile(&v, 0.0), 1.0);
/// assert_eq!(quantile(&v, 1.0), 4.0);
/// assert!(quantile(&[], 0.5).is_nan());
/// ```
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    let Some(last) = sorted.len().checked_sub(1) else {
        return f64::NAN;
    };
    let i = (last as f64 * q.clamp(0.0, 1.0)).round() as usize;
    sorted[i.min(last)]
}

/// The median of `xs` as [`quantile`] takes it (index `len / 2` once sorted); NaN when empty.
///
/// ```
/// assert_eq!(lazyadam_benches::median(vec![5.0, 1.0, 3.0]), 3.0);
/// assert_eq!(lazyadam_benches::median(vec![4.0, 1.0, 3.0, 2.0]), 3.0);
/// ```
pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    quantile(&xs, 0.5)
}

/// The kernel path named `name` (`scalar`, `portable`, `avx2`, `avx512`: [`Isa::name`]), for a
/// bench's `--isa` option; an error that says what was wrong for an unknown name or a path this
/// CPU cannot run.
pub fn parse_isa(name: &str) -> Result<Isa, String> {
    let isa = Isa::ALL
        .into_iter()
        .find(|i| i.name() == name)
        .ok_or_else(|| format!("unknown path {name:?} (scalar, portable, avx2 or avx512)"))?;
    if isa.is_supported() {
        Ok(isa)
    } else {
        Err(format!("this CPU cannot run the {name} path"))
    }
}
