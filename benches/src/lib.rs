//! Benches live in `benches/` and `src/bin/`; this library holds what the bench binaries share.

use std::time::Duration;

use lazyadam::Isa;

/// Median and minimum of a non-empty set of durations, in milliseconds (sorts `times`).
pub fn median_min_ms(times: &mut [Duration]) -> (f64, f64) {
    times.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    (ms(times[times.len() / 2]), ms(times[0]))
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
