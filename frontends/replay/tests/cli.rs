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
