//! Benches live in `benches/` and `src/bin/`; this library holds what the bench binaries share.

use lazyadam::Isa;

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
