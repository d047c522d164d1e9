//! `lazyadam-replay`: replays `lazyadam-case/1` files through lazyadam.
//!
//! Without `--check`, prints one JSON line per case,
//! `{"name": ..., "iterations": ..., "variables": [[...]], "m": [[...]], "v": [[...]]}`
//! (storage values widened to f32; JSON has no infinities or NaN, so a non-finite value is
//! written as the string `"NaN"`, `"Infinity"` or `"-Infinity"`), or
//! `{"name": ..., "error": "..."}` for a case that cannot be replayed (the exit status is then
//! non-zero).
//!
//! With `--check`, compares each case with its `expected` block within its tolerance and
//! prints one line per case instead,
//!
//! ```text
//! pass sparse_basic  worst |error| 2.980e-8 at variables[0][6], allowed 1.269e-5
//! FAIL worst_m  worst |error| 5.000e-1 at m[0][4], allowed 1.396e-5 (1 mismatch)
//! FAIL late_bad_id  error: case `late_bad_id`, step 2 of 3: optimizer error: variable `var0`: row id 7 out of range (rows: 2)
//! ```
//!
//! (the mismatches themselves go to stderr, the first ten per case), and as its last line
//! `N passed, N failed`. `--print-state` prints the JSON line of each case before its line.
//!
//! `--threads N` runs on a pool of N threads, 1 to 1024: the results do not depend on the
//! thread count, so more threads than cores only serve to test that; the cap keeps a typo
//! from spawning tens of thousands of threads.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use lazyadam::{Extensions, Isa};
use lazyadam_replay::{Case, ReplayError, compare, error_line, replay_with};

/// The largest `--threads`.
const MAX_THREADS: u64 = 1024;

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
    /// Compare with each case's `expected` block: one line per case (pass or fail, the worst
    /// error and the error allowed there), then `N passed, N failed`.
    #[arg(long)]
    check: bool,
    /// With --check, also print each case's replayed state (its JSON line).
    #[arg(long, requires = "check")]
    print_state: bool,
    /// Force a kernel path: scalar, portable, avx2 or avx512.
    #[arg(long)]
    kernel: Option<String>,
    /// Number of threads (rayon pool), 1 to 1024; default: rayon's default (one per core).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=MAX_THREADS))]
    threads: Option<u64>,
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
    let (passed, failed) = match args.threads {
        // At most MAX_THREADS (clap checked), so the cast is exact.
        Some(n) => match rayon::ThreadPoolBuilder::new()
            .num_threads(n as usize)
            .build()
        {
            Ok(pool) => pool.install(run),
            Err(e) => {
                eprintln!("cannot build a thread pool of {n} threads: {e}");
                return ExitCode::from(2);
            }
        },
        None => run(),
    };
    if args.check {
        println!("{passed} passed, {failed} failed");
    }
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Reads, replays and (with --check) compares one case file. Returns its name and either
/// the replay or why it could not be replayed.
fn replay_file(
    path: &PathBuf,
    ext: &Extensions,
) -> (
    String,
    Result<(Case, lazyadam_replay::ReplayResult), ReplayError>,
) {
    match Case::from_file(path) {
        Ok(case) => {
            let result = replay_with(&case, ext.clone());
            (case.name.clone(), result.map(|r| (case, r)))
        }
        Err(e) => {
            // Use the case's name if the JSON has one, else the file's stem.
            let name = std::fs::read_to_string(path)
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .and_then(|v| v.get("name").and_then(|n| n.as_str()).map(str::to_string))
                .or_else(|| path.file_stem().map(|s| s.to_string_lossy().into_owned()))
                .unwrap_or_else(|| path.display().to_string());
            (name, Err(e))
        }
    }
}

/// Returns (passed, failed); without --check, `failed` counts the cases that could not be
/// replayed.
fn run_all(args: &Args, ext: &Extensions) -> (usize, usize) {
    let (mut passed, mut failed) = (0, 0);
    for path in &args.cases {
        let (name, outcome) = replay_file(path, ext);
        let (case, result) = match outcome {
            Ok(x) => x,
            Err(e) => {
                failed += 1;
                if args.check {
                    println!("FAIL {name}  error: {e}");
                } else {
                    println!("{}", error_line(&name, &e));
                }
                continue;
            }
        };
        if !args.check {
            println!("{}", result.to_json_line());
            continue;
        }
        if args.print_state {
            println!("{}", result.to_json_line());
        }
        let cmp = compare(&case, &result);
        let worst = match &cmp.worst {
            Some(w) => format!(
                "worst |error| {:.3e} at {}, allowed {:.3e}",
                w.error, w.what, w.allowed
            ),
            None if case.expected.is_none() => "no `expected` block to compare with".into(),
            None => "no values to compare".into(),
        };
        if cmp.passed() {
            passed += 1;
            println!("pass {name}  {worst}");
        } else {
            failed += 1;
            let n = cmp.mismatches.len();
            println!(
                "FAIL {name}  {worst} ({n} mismatch{})",
                if n == 1 { "" } else { "es" }
            );
            eprintln!("FAILED {name} ({}): {n} mismatches", path.display());
            for m in cmp.mismatches.iter().take(10) {
                eprintln!("  {m}");
            }
        }
    }
    (passed, failed)
}
