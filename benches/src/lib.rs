//! Benches live in `benches/` and `src/bin/`.
