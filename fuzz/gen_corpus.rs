//! Writes the seed corpora under `fuzz/corpus/<target>/` (committed; a few dozen KB per target).
//!
//! ```text
//! cargo run --manifest-path fuzz/Cargo.toml --example gen_corpus -- [CASES_DIR]
//! ```
//!
//! `CASES_DIR` defaults to `../shared/conformance/cases` next to the repository. Seeds:
//! - `config_json`: the `optimizer` object of every conformance case (the reference's own
//!   `get_config()` output), plus a few configs written by this crate;
//! - `replay_case`: a handful of the smaller conformance cases, whole;
//! - `checkpoint_load`: `0x00` + checkpoints saved by `LazyAdam::to_bytes` after a few steps, in
//!   several storage configurations, and structured-mode seeds;
//! - `kernel_paths`, `sparse_step`, `parallel_step`: deterministic pseudo-random bytes (structured inputs).
//!
//! Existing seeds with the same names are overwritten; nothing else is touched.

use std::fs;
use std::path::{Path, PathBuf};

use lazyadam::{
    DType, Gradient, LazyAdam, LazyAdamConfig, LearningRate, Schedule, Update, bf16, f16,
};

/// The replay seeds: small cases covering sparse, dense, f16, schedules and clipping.
const REPLAY_SEEDS: [&str; 8] = [
    "empty_step",
    "sparse_duplicates",
    "float16_sparse",
    "hyper_extremes",
    "mixed_and_skipped",
    "schedule_cosine_warmup",
    "clipnorm",
    "global_clipnorm",
];

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn random_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut s = seed;
    (0..n).map(|_| splitmix(&mut s) as u8).collect()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    fs::write(dir.join(name), bytes)
}

fn checkpoints() -> Result<Vec<(&'static str, Vec<u8>)>, lazyadam::Error> {
    let mut out = Vec::new();

    // Default config, an f32 table and an f16 vector, two steps.
    let mut opt = LazyAdam::new(LazyAdamConfig::default())?;
    let t = opt.add_variable("table", &[4, 3], DType::F32, DType::F32)?;
    let b = opt.add_variable("bias", &[5], DType::F16, DType::F32)?;
    let mut tp = vec![0.5f32; 12];
    let mut bp = vec![f16::from_f32(0.25); 5];
    let bg: Vec<f16> = (0..5)
        .map(|i| f16::from_f32(i as f32 * 0.1 - 0.2))
        .collect();
    for step in 0..2u32 {
        let ids = [step, 3, step];
        let g = [0.1f32, -0.2, 0.3, 0.4, 0.5, -0.6, 0.7, -0.8, 0.9];
        opt.apply_gradients(&mut [
            Update::new(t, &mut tp, Gradient::sparse(&ids[..], &g[..])),
            Update::new(b, &mut bp, Gradient::dense(&bg[..])),
        ])?;
    }
    out.push(("default_two_vars", opt.to_bytes()?));

    // AMSGrad with a schedule, bf16 parameters and moments.
    let config = LazyAdamConfig {
        learning_rate: LearningRate::Schedule(Schedule::ExponentialDecay {
            initial_learning_rate: 0.01,
            decay_steps: 10.0,
            decay_rate: 0.5,
            staircase: true,
        }),
        amsgrad: true,
        clipvalue: Some(1.0),
        ..LazyAdamConfig::default()
    };
    let mut opt = LazyAdam::new(config)?;
    let e = opt.add_variable("emb", &[3, 2], DType::BF16, DType::BF16)?;
    let mut ep = vec![bf16::from_f32(1.0); 6];
    let eg: Vec<bf16> = [0.5f32, -1.5, 2.0, 0.0, 1.0, -1.0]
        .iter()
        .map(|&x| bf16::from_f32(x))
        .collect();
    opt.apply_gradients(&mut [Update::new(e, &mut ep, Gradient::dense(&eg[..]))])?;
    out.push(("amsgrad_schedule_bf16", opt.to_bytes()?));

    // clipnorm + legacy decay, an f16 table with f16 moments, one sparse step.
    let config = LazyAdamConfig {
        clipnorm: Some(1.0),
        decay: 0.01,
        ..LazyAdamConfig::default()
    };
    let mut opt = LazyAdam::new(config)?;
    let e = opt.add_variable("f16_table", &[6, 2], DType::F16, DType::F16)?;
    let mut ep = vec![f16::from_f32(-0.5); 12];
    let ids = [5i64, 0];
    let eg: Vec<f16> = [3.0f32, 4.0, -1.0, 0.5]
        .iter()
        .map(|&x| f16::from_f32(x))
        .collect();
    opt.apply_gradients(&mut [Update::new(e, &mut ep, Gradient::sparse(&ids[..], &eg[..]))])?;
    out.push(("clipnorm_decay_f16", opt.to_bytes()?));

    // No variables, no steps.
    out.push((
        "empty",
        LazyAdam::new(LazyAdamConfig::default())?.to_bytes()?,
    ));
    Ok(out)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fuzz_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let cases = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| fuzz_dir.join("../../shared/conformance/cases"));
    let corpus = fuzz_dir.join("corpus");

    // config_json and replay_case from the conformance cases.
    let mut names: Vec<PathBuf> = fs::read_dir(&cases)
        .map_err(|e| format!("{}: {e}", cases.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    names.sort();
    for path in &names {
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("case");
        let text = fs::read_to_string(path)?;
        let case: serde_json::Value = serde_json::from_str(&text)?;
        if let Some(opt) = case.get("optimizer") {
            write(
                &corpus.join("config_json"),
                &format!("{stem}.json"),
                opt.to_string().as_bytes(),
            )?;
        }
        if REPLAY_SEEDS.contains(&stem) {
            write(
                &corpus.join("replay_case"),
                &format!("{stem}.json"),
                text.as_bytes(),
            )?;
        }
    }
    for (name, cfg) in [
        (
            "lr_alias",
            r#"{"name":"LazyAdam","lr":0.01,"beta_1":0.9,"beta_2":0.999,"epsilon":1e-07,"amsgrad":true}"#,
        ),
        ("empty_object", "{}"),
    ] {
        write(
            &corpus.join("config_json"),
            &format!("{name}.json"),
            cfg.as_bytes(),
        )?;
    }
    let written = LazyAdamConfig {
        clipvalue: Some(0.5),
        learning_rate: LearningRate::Schedule(Schedule::PiecewiseConstantDecay {
            boundaries: vec![10.0, 20.0],
            values: vec![0.1, 0.01, 0.001],
        }),
        ..LazyAdamConfig::default()
    }
    .to_keras_json()?;
    write(
        &corpus.join("config_json"),
        "written_piecewise.json",
        written.as_bytes(),
    )?;

    // checkpoint_load: mode byte 0 + real checkpoints; mode 1 + structured seeds.
    for (name, bytes) in checkpoints()? {
        let mut seed = vec![0u8];
        seed.extend_from_slice(&bytes);
        write(
            &corpus.join("checkpoint_load"),
            &format!("{name}.bin"),
            &seed,
        )?;
    }
    for k in 0..6u64 {
        let mut seed = vec![1u8];
        seed.extend(random_bytes(0xC0FFEE + k, 64 + 48 * k as usize));
        write(
            &corpus.join("checkpoint_load"),
            &format!("structured_{k}.bin"),
            &seed,
        )?;
    }

    // Structured targets: pseudo-random seeds of a few sizes.
    for target in ["kernel_paths", "sparse_step", "parallel_step"] {
        for k in 0..8u64 {
            let bytes = random_bytes(0x5EED ^ (k << 8) ^ target.len() as u64, 64 << (k % 5));
            write(&corpus.join(target), &format!("seed_{k}.bin"), &bytes)?;
        }
    }
    println!("wrote the seed corpora under {}", corpus.display());
    Ok(())
}
