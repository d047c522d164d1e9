//! Replays every conformance case and fails on any mismatch.

use std::path::{Path, PathBuf};

use lazyadam::{Extensions, Isa};
use lazyadam_replay::{Case, CaseDType, Tolerance, check, replay, replay_with};

fn case_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    files
}

/// The TF/Keras test suites' own tolerance, enforced on float32 cases
/// (tighter than the cases' recorded 1e-5): the reference's f32 bias
/// correction keeps every step within it.
const F32_TOLERANCE: Tolerance = Tolerance {
    rtol: 1e-6,
    atol: 1e-6,
};

/// The tolerance a case is held to: its own, tightened to
/// [`F32_TOLERANCE`] for float32 cases.
fn enforced(case: &Case) -> Tolerance {
    match case.dtype {
        CaseDType::Float32 => Tolerance {
            rtol: case.tolerance.rtol.min(F32_TOLERANCE.rtol),
            atol: case.tolerance.atol.min(F32_TOLERANCE.atol),
        },
        _ => case.tolerance,
    }
}

/// Checks the variables after every step against the recorded trajectory
/// (replaying the first `k` steps for each `k`).
fn check_trajectory(file: &Path, case: &Case) -> Result<(), String> {
    let raw: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(file).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    let Some(traj) = raw["expected"]["trajectory"].as_array() else {
        return Ok(());
    };
    if traj.len() != case.steps.len() {
        return Err(format!(
            "trajectory has {} entries for {} steps",
            traj.len(),
            case.steps.len()
        ));
    }
    let tol = enforced(case);
    for (k, want) in traj.iter().enumerate() {
        let mut prefix = case.clone();
        prefix.steps.truncate(k + 1);
        prefix.expected = None;
        let got = replay(&prefix).map_err(|e| format!("step {k}: {e}"))?;
        let want: Vec<Vec<f64>> =
            serde_json::from_value(want.clone()).map_err(|e| format!("trajectory[{k}]: {e}"))?;
        for (i, (g, w)) in got.variables.iter().zip(&want).enumerate() {
            for (j, (&a, &b)) in g.iter().zip(w).enumerate() {
                let a = a as f64;
                if (a - b).abs() > tol.atol + tol.rtol * b.abs() {
                    return Err(format!(
                        "after step {k}: variables[{i}][{j}] = {a}, TF {b} (tolerance {tol:?})"
                    ));
                }
            }
        }
    }
    Ok(())
}

fn replay_dir(dir: &Path) -> usize {
    let files = case_files(dir);
    assert!(!files.is_empty(), "no cases in {}", dir.display());
    let mut failures = Vec::new();
    for f in &files {
        let mut case = Case::from_file(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        if let Err(e) = check_trajectory(f, &case) {
            failures.push(format!("{}: {e}", case.name));
        }
        case.tolerance = enforced(&case);
        match replay(&case) {
            Ok(result) => {
                if let Err(m) = check(&case, &result) {
                    failures.push(format!(
                        "{}: {} mismatches, first: {}",
                        case.name,
                        m.len(),
                        m[0]
                    ));
                }
            }
            Err(e) => failures.push(format!("{}: {e}", case.name)),
        }
    }
    assert!(
        failures.is_empty(),
        "failed cases:\n{}",
        failures.join("\n")
    );
    files.len()
}

fn repo_cases() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("conformance/cases")
}

#[test]
fn every_repository_case_passes() {
    let n = replay_dir(&repo_cases());
    assert!(n >= 22, "expected at least 22 cases, found {n}");
}

/// Whether this is a CI run: `CI` set to anything but empty, `0` or `false` (CI services set
/// `CI=true`; `.ci/run` runs with it).
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
}

/// The shared conformance cases: `$LAZYADAM_SHARED_CASES`, or `../shared/conformance/cases`
/// beside the repository.
fn shared_cases() -> PathBuf {
    match std::env::var_os("LAZYADAM_SHARED_CASES") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/conformance/cases"),
    }
}

/// Whether this is the repository's checkout (its CI script beside the workspace), not the
/// crate as published, which does not promise a `../shared` beside it.
fn in_repository() -> bool {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../.ci/run")
        .is_file()
}

/// The shared cases (the recording's own directory, which may hold more cases than the
/// repository's copy) replay too. Outside CI a missing directory is skipped, with a note on
/// stderr that `cargo test` shows; in the repository's CI it is a failure, so that CI never
/// passes without having replayed them.
#[test]
fn every_shared_case_passes() {
    let dir = shared_cases();
    if !dir.is_dir() {
        assert!(
            !(in_ci() && in_repository()),
            "CI is set but the shared conformance cases are missing: {} is not a directory \
             (set LAZYADAM_SHARED_CASES to their directory)",
            dir.display()
        );
        // Written to the stderr handle itself: the test harness captures `eprintln!` of a
        // passing test, and a skip must be visible.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "every_shared_case_passes: SKIPPED (not in the repository's CI): {} is not a directory",
            dir.display()
        );
        return;
    }
    replay_dir(&dir);
}

/// Runs `every_shared_case_passes` of this test binary in a child process with a missing
/// shared directory, with and without `CI`.
#[test]
fn a_missing_shared_directory_fails_in_ci_and_is_skipped_outside() {
    let missing = std::env::temp_dir().join(format!(
        "lazyadam-replay-no-shared-{}/conformance/cases",
        std::process::id()
    ));
    assert!(!missing.exists());
    assert!(
        in_repository(),
        "this test runs in the repository's checkout only"
    );
    let run = |ci: Option<&str>| {
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.args(["every_shared_case_passes", "--exact", "--test-threads", "1"])
            .env("LAZYADAM_SHARED_CASES", &missing)
            .env_remove("CI");
        if let Some(v) = ci {
            cmd.env("CI", v);
        }
        cmd.output().unwrap()
    };
    for ci in ["true", "1"] {
        let out = run(Some(ci));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "CI={ci}: {text}");
        assert!(
            text.contains("shared conformance cases are missing"),
            "{text}"
        );
    }
    for ci in [None, Some("false"), Some("")] {
        let out = run(ci);
        assert!(out.status.success(), "CI={ci:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("SKIPPED"), "CI={ci:?}: {err}");
    }
}

#[test]
fn every_kernel_path_and_thread_count_gives_the_same_bits() {
    for f in case_files(&repo_cases()) {
        let case = Case::from_file(&f).unwrap();
        let reference = replay_with(
            &case,
            Extensions {
                kernel: Some(Isa::Scalar),
                ..Extensions::default()
            },
        )
        .unwrap();
        for isa in Isa::supported() {
            for threads in [1, 2, 4] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let got = pool
                    .install(|| {
                        replay_with(
                            &case,
                            Extensions {
                                kernel: Some(isa),
                                parallel_min_elements: 1,
                                ..Extensions::default()
                            },
                        )
                    })
                    .unwrap();
                let bits = |r: &lazyadam_replay::ReplayResult| {
                    [&r.variables, &r.m, &r.v]
                        .iter()
                        .flat_map(|x| x.iter().flatten().map(|y| y.to_bits()))
                        .collect::<Vec<_>>()
                };
                assert_eq!(
                    bits(&got),
                    bits(&reference),
                    "{}: {isa:?} with {threads} threads",
                    case.name
                );
            }
        }
    }
}

#[test]
fn config_blocks_round_trip_exactly() {
    for f in case_files(&repo_cases()) {
        let case = Case::from_file(&f).unwrap();
        let written = case.config.to_keras_value().unwrap();
        assert_eq!(written, case.optimizer, "{}", case.name);
    }
}

#[test]
fn a_wrong_expectation_is_reported() {
    let f = repo_cases().join("sparse_basic.json");
    let mut case = Case::from_file(&f).unwrap();
    let result = replay(&case).unwrap();
    check(&case, &result).unwrap();
    case.expected.as_mut().unwrap().variables[0][4] += 0.01;
    let m = check(&case, &result).unwrap_err();
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].what, "variables[0][4]");
}

#[test]
fn non_finite_values_are_written_as_strings() {
    let r = lazyadam_replay::ReplayResult {
        name: "x".into(),
        iterations: 3,
        variables: vec![vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0, 1.5]],
        m: vec![vec![]],
        v: vec![vec![f32::MAX]],
    };
    let line = r.to_json_line();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        v["variables"][0],
        serde_json::json!(["NaN", "Infinity", "-Infinity", -0.0, 1.5]),
        "{line}"
    );
    assert!(v["variables"][0][3].as_f64().unwrap().is_sign_negative());
    // Finite values: the shortest decimal that reads back as the same f32.
    assert_eq!(v["v"][0][0].as_f64().unwrap() as f32, f32::MAX);
    assert_eq!(v["m"][0], serde_json::json!([]));
    assert!(!line.contains("null"), "{line}");
}
