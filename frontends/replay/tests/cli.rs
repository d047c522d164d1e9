//! Runs the `lazyadam-replay` binary on good and bad cases.

use std::path::{Path, PathBuf};
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lazyadam-replay"))
}

fn case(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("conformance/cases")
        .join(name)
}

fn tmp_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lazyadam-replay-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn prints_one_json_line_per_case() {
    let out = bin()
        .arg(case("sparse_basic.json"))
        .arg(case("dense_basic.json"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2);
    let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(v["name"], "sparse_basic");
    assert_eq!(v["iterations"], 4);
    for k in ["variables", "m", "v"] {
        assert_eq!(v[k].as_array().unwrap().len(), 1, "{k}");
        assert_eq!(v[k][0].as_array().unwrap().len(), 18, "{k}");
    }
    let v: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
    assert_eq!(v["name"], "dense_basic");
}

#[test]
fn check_mode_passes_all_cases() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("conformance/cases");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    let out = bin().arg("--check").args(&files).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        text.lines().last().unwrap(),
        format!("{} passed, 0 failed", files.len())
    );
}

#[test]
fn check_mode_reports_a_mismatch() {
    let text = std::fs::read_to_string(case("sparse_basic.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let x = v["expected"]["variables"][0][0].as_f64().unwrap();
    v["expected"]["variables"][0][0] = serde_json::json!(x + 1.0);
    v["name"] = serde_json::json!("tampered");
    let bad = tmp_file("tampered.json", &v.to_string());
    let out = bin()
        .arg("--check")
        .arg(case("dense_basic.json"))
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().last().unwrap(), "1 passed, 1 failed");
    assert!(String::from_utf8_lossy(&out.stderr).contains("tampered"));
}

#[test]
fn invalid_cases_print_an_error_line_and_fail() {
    let bad_json = tmp_file("broken.json", "{ not json");
    let bad_format = tmp_file(
        "format.json",
        r#"{"format": "other/1", "name": "wrong_format"}"#,
    );
    let bad_id = tmp_file(
        "bad_id.json",
        r#"{"format": "lazyadam-case/1", "name": "bad_id",
            "optimizer": {"name": "LazyAdam", "learning_rate": 0.1},
            "dtype": "float32",
            "variables": [{"name": "var0", "shape": [2, 1], "initial": [1.0, 2.0]}],
            "steps": [[{"variable": 0, "indices": [5], "values": [0.5]}]]}"#,
    );
    let bad_key = tmp_file(
        "bad_key.json",
        r#"{"format": "lazyadam-case/1", "name": "bad_key",
            "optimizer": {"name": "LazyAdam", "learning_rate": 0.1, "momentum": 0.5},
            "dtype": "float32", "variables": [], "steps": []}"#,
    );
    let out = bin()
        .arg(&bad_json)
        .arg(&bad_format)
        .arg(&bad_id)
        .arg(&bad_key)
        .arg(case("empty_step.json"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5);
    assert_eq!(lines[0]["name"], "broken");
    assert!(lines[0]["error"].is_string());
    assert_eq!(lines[1]["name"], "wrong_format");
    assert!(lines[1]["error"].as_str().unwrap().contains("format"));
    assert_eq!(lines[2]["name"], "bad_id");
    let e = lines[2]["error"].as_str().unwrap();
    assert!(e.contains("var0") && e.contains('5'), "{e}");
    assert_eq!(lines[3]["name"], "bad_key");
    assert!(lines[3]["error"].as_str().unwrap().contains("momentum"));
    assert_eq!(lines[4]["name"], "empty_step");
    assert!(lines[4]["error"].is_null());
}

#[test]
fn no_arguments_is_a_usage_error() {
    let out = bin().output().unwrap();
    assert!(!out.status.success());
}

/// A small float32 case: one 2 x 1 variable, the given steps (JSON), default optimizer.
fn small_case(name: &str, initial: &str, steps: &str) -> String {
    format!(
        r#"{{"format": "lazyadam-case/1", "name": "{name}",
            "optimizer": {{"name": "LazyAdam", "learning_rate": 0.001}},
            "dtype": "float32",
            "variables": [{{"name": "var0", "shape": [2, 1], "initial": {initial}}}],
            "steps": {steps}}}"#
    )
}

#[test]
fn check_mode_prints_one_line_per_case_and_no_state() {
    let names = ["sparse_basic", "dense_basic", "zipf_table"];
    let out = bin()
        .arg("--check")
        .args(names.iter().map(|n| case(&format!("{n}.json"))))
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), names.len() + 1, "{text}");
    for (line, name) in lines.iter().zip(names) {
        // `pass <name>  worst |error| E at WHAT, allowed A`
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields[0], "pass", "{line}");
        assert_eq!(fields[1], name, "{line}");
        assert!(line.contains("worst") && line.contains("allowed"), "{line}");
        assert!(!line.contains('{'), "state printed in check mode: {line}");
    }
    assert_eq!(lines[names.len()], "3 passed, 0 failed");
    // The zipf case alone printed ~100 KB of state before.
    assert!(text.len() < 2000, "{} bytes of output", text.len());
}

#[test]
fn check_mode_line_reports_the_worst_error_of_a_failing_case() {
    let text = std::fs::read_to_string(case("sparse_basic.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let x = v["expected"]["m"][0][4].as_f64().unwrap();
    v["expected"]["m"][0][4] = serde_json::json!(x + 0.5);
    v["name"] = serde_json::json!("worst_m");
    let bad = tmp_file("worst_m.json", &v.to_string());
    let out = bin().arg("--check").arg(&bad).output().unwrap();
    assert!(!out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(lines[0].starts_with("FAIL worst_m "), "{}", lines[0]);
    assert!(lines[0].contains("m[0][4]"), "{}", lines[0]);
    assert!(lines[0].contains("5.000e-1"), "{}", lines[0]);
    assert_eq!(lines[1], "0 passed, 1 failed");
}

#[test]
fn check_mode_prints_the_state_when_asked() {
    let out = bin()
        .arg("--check")
        .arg("--print-state")
        .arg(case("sparse_basic.json"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(v["name"], "sparse_basic");
    assert_eq!(v["iterations"], 4);
    assert!(lines[1].starts_with("pass sparse_basic "), "{}", lines[1]);
    assert_eq!(lines[2], "1 passed, 0 failed");
}

#[test]
fn thread_counts_outside_1_to_1024_are_usage_errors() {
    for n in ["0", "1025", "20000"] {
        let out = bin()
            .args(["--threads", n])
            .arg(case("sparse_basic.json"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "--threads {n}");
        assert!(out.stdout.is_empty(), "--threads {n}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--threads") && err.contains("1024"), "{err}");
    }
    // (The upper bound itself is clap's inclusive range; a pool of 1024 threads is not worth
    // its cost in every test run.)
    for n in ["1", "3"] {
        let out = bin()
            .args(["--threads", n, "--check"])
            .arg(case("sparse_basic.json"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "--threads {n}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn an_optimizer_error_names_the_case_and_the_step() {
    // Steps 0 and 1 are fine; step 2 has a row id out of range.
    let steps = r#"[[{"variable": 0, "indices": [1], "values": [0.5]}],
                    [{"variable": 0, "values": [0.5, 0.25]}],
                    [{"variable": 0, "indices": [0, 7], "values": [0.5, 0.5]}]]"#;
    let bad = tmp_file(
        "late_bad_id.json",
        &small_case("late_bad_id", "[1.0, 2.0]", steps),
    );
    for check in [false, true] {
        let mut cmd = bin();
        if check {
            cmd.arg("--check");
        }
        let out = cmd.arg(&bad).output().unwrap();
        assert!(!out.status.success());
        let stdout = String::from_utf8(out.stdout).unwrap();
        let first = stdout.lines().next().unwrap();
        let msg = if check {
            assert!(first.starts_with("FAIL late_bad_id "), "{first}");
            first.to_string()
        } else {
            let v: serde_json::Value = serde_json::from_str(first).unwrap();
            assert_eq!(v["name"], "late_bad_id");
            v["error"].as_str().unwrap().to_string()
        };
        assert!(msg.contains("step 2"), "{msg}");
        assert!(msg.contains("late_bad_id"), "{msg}");
        assert!(msg.contains("var0") && msg.contains('7'), "{msg}");
    }
}

#[test]
fn values_that_do_not_fit_the_storage_type_are_rejected() {
    let cases = [
        (
            "big_initial",
            small_case(
                "big_initial",
                "[1.0, 1e39]",
                r#"[[{"variable": 0, "values": [0.5, 0.5]}]]"#,
            ),
            "variables[0].initial[1]",
        ),
        (
            "big_gradient",
            small_case(
                "big_gradient",
                "[1.0, 2.0]",
                r#"[[{"variable": 0, "values": [0.5, 0.5]}],
                    [{"variable": 0, "indices": [0], "values": [-1e39]}]]"#,
            ),
            "steps[1][0].values[0]",
        ),
        (
            "big_f16",
            small_case(
                "big_f16",
                "[1.0, 70000.0]",
                r#"[[{"variable": 0, "values": [0.5, 0.5]}]]"#,
            )
            .replace("float32", "float16"),
            "variables[0].initial[1]",
        ),
    ];
    for (name, text, field) in cases {
        let f = tmp_file(&format!("{name}.json"), &text);
        let out = bin().arg(&f).output().unwrap();
        assert!(!out.status.success(), "{name} was accepted");
        let stdout = String::from_utf8(out.stdout).unwrap();
        let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(v["name"], name);
        let e = v["error"].as_str().unwrap();
        assert!(e.contains(field), "{name}: {e}");
        let dtype = if name == "big_f16" {
            "float16"
        } else {
            "float32"
        };
        assert!(e.contains(dtype), "{name}: {e}");
    }
    // The largest finite values themselves are accepted.
    let f = tmp_file(
        "max_f32.json",
        &small_case(
            "max_f32",
            "[3.4028234663852886e38, -3.4028234663852886e38]",
            r#"[[{"variable": 0, "values": [0.5, 0.5]}]]"#,
        ),
    );
    let out = bin().arg(&f).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn non_finite_results_are_printed_as_strings_and_fail_the_check() {
    // g * g overflows f32, so v becomes +inf (the parameter stays finite: m / sqrt(inf) = 0).
    let text = small_case(
        "overflowing_v",
        "[1.0, 2.0]",
        r#"[[{"variable": 0, "indices": [1], "values": [3e38]}]]"#,
    )
    .replace(
        r#""steps""#,
        r#""expected": {"iterations": 1, "variables": [[1.0, 2.0]], "m": [[0.0, 3e37]],
                        "v": [[0.0, 0.0]]},
           "steps""#,
    );
    let f = tmp_file("overflowing_v.json", &text);
    let out = bin().arg(&f).output().unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["v"][0][1], "Infinity", "{stdout}");
    assert_eq!(v["v"][0][0], 0.0);
    assert_eq!(v["variables"][0][1], 2.0);

    let out = bin().arg("--check").arg(&f).output().unwrap();
    assert!(!out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let first = stdout.lines().next().unwrap();
    assert!(first.starts_with("FAIL overflowing_v "), "{first}");
    assert!(
        first.contains("v[0][1]") && first.contains("inf"),
        "{first}"
    );
}
