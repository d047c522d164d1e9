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
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../conformance/cases")
}

#[test]
fn every_repository_case_passes() {
    let n = replay_dir(&repo_cases());
    assert!(n >= 22, "expected at least 22 cases, found {n}");
}

/// CI also replays the shared cases directly, in case more appear there.
#[test]
fn every_shared_case_passes() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/conformance/cases");
    if !dir.is_dir() {
        println!(
            "note: {} does not exist; skipping the shared conformance cases",
            dir.display()
        );
        return;
    }
    replay_dir(&dir);
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
