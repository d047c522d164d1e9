//! `lazyadam-replay`: replays `lazyadam-case/1` files through lazyadam.
//!
//! Prints one JSON line per case,
//! `{"name": ..., "iterations": ..., "variables": [[...]], "m": [[...]], "v": [[...]]}`
//! (storage values widened to f32), or `{"name": ..., "error": "..."}` for an
//! invalid case (the exit status is then non-zero). With `--check`, each case
//! is compared with its `expected` block within its tolerance, mismatches are
//! reported on stderr, and the last line is `N passed, N failed`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use lazyadam::{Extensions, Isa};
use lazyadam_replay::{Case, check, error_line, replay_with};

#[derive(Parser, Debug)]
#[command(
    name = "lazyadam-replay",
    version,
    about = "Replay lazyadam-case/1 conformance traces"
)]
struct Args {
    /// Case files (`lazyadam-case/1` JSON).
    #[arg(required = true)]
    cases: Vec<PathBuf>,
    /// Compare with each case's `expected` block and print `N passed, N failed`.
    #[arg(long)]
    check: bool,
    /// Force a kernel path: scalar, portable, avx2 or avx512.
    #[arg(long)]
    kernel: Option<String>,
    /// Number of threads (rayon pool); default: rayon's default.
    #[arg(long)]
    threads: Option<usize>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut ext = Extensions::default();
    if let Some(k) = &args.kernel {
        match Isa::ALL.into_iter().find(|i| i.name() == k) {
            Some(isa) => ext.kernel = Some(isa),
            None => {
                eprintln!("unknown kernel `{k}` (expected scalar, portable, avx2 or avx512)");
                return ExitCode::from(2);
            }
        }
    }
    let run = || run_all(&args, &ext);
    let (passed, failed, errors) = match args.threads {
        Some(n) => match rayon::ThreadPoolBuilder::new().num_threads(n).build() {
            Ok(pool) => pool.install(run),
            Err(e) => {
                eprintln!("cannot build a thread pool: {e}");
                return ExitCode::from(2);
            }
        },
        None => run(),
    };
    if args.check {
        println!("{passed} passed, {failed} failed");
    }
    if failed > 0 || errors > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Returns (passed, failed, errors).
fn run_all(args: &Args, ext: &Extensions) -> (usize, usize, usize) {
    let (mut passed, mut failed, mut errors) = (0, 0, 0);
    for path in &args.cases {
        let fallback = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        let case = match Case::from_file(path) {
            Ok(c) => c,
            Err(e) => {
                // Use the case's name if the JSON has one.
                let name = std::fs::read_to_string(path)
                    .ok()
                    .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                    .and_then(|v| v.get("name").and_then(|n| n.as_str()).map(str::to_string))
                    .unwrap_or(fallback);
                println!("{}", error_line(&name, &e));
                errors += 1;
                failed += 1;
                continue;
            }
        };
        let result = match replay_with(&case, ext.clone()) {
            Ok(r) => r,
            Err(e) => {
                println!("{}", error_line(&case.name, &e));
                errors += 1;
                failed += 1;
                continue;
            }
        };
        println!("{}", result.to_json_line());
        if args.check {
            match check(&case, &result) {
                Ok(()) => passed += 1,
                Err(mismatches) => {
                    failed += 1;
                    eprintln!(
                        "FAILED {} ({}): {} mismatches",
                        case.name,
                        path.display(),
                        mismatches.len()
                    );
                    for m in mismatches.iter().take(10) {
                        eprintln!("  {m}");
                    }
                }
            }
        }
    }
    (passed, failed, errors)
}
