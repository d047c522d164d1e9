//! Replays every conformance case and fails on any mismatch.

use std::path::{Path, PathBuf};

use lazyadam::{Extensions, Isa};
use lazyadam_replay::{Case, check, replay, replay_with};

fn case_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    files
}

fn replay_dir(dir: &Path) -> usize {
    let files = case_files(dir);
    assert!(!files.is_empty(), "no cases in {}", dir.display());
    let mut failures = Vec::new();
    for f in &files {
        let case = Case::from_file(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
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
