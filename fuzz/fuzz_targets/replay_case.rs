//! Arbitrary bytes as a `lazyadam-case/1` file through the replay library's parse and run path
//! (`Case::parse`, `replay`, `check`, the output line): never a panic. A case that parses parses
//! the same through `Case::from_value`; a case that replays gives the same state, bit for bit,
//! when replayed again on every supported kernel path.
#![no_main]

use lazyadam::{Extensions, Isa};
use lazyadam_replay::{Case, ReplayResult, check, error_line, replay, replay_with};
use libfuzzer_sys::fuzz_target;

/// The result's floats as bits (NaN compares equal to itself).
fn bits(r: &ReplayResult) -> (u64, Vec<Vec<Vec<u32>>>) {
    let b = |x: &Vec<Vec<f32>>| -> Vec<Vec<u32>> {
        x.iter()
            .map(|row| {
                row.iter()
                    .map(|f| if f.is_nan() { u32::MAX } else { f.to_bits() })
                    .collect()
            })
            .collect()
    };
    (r.iterations, vec![b(&r.variables), b(&r.m), b(&r.v)])
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = Case::parse(text);
    if let Ok(value) = serde_json::from_str::<serde_json::Value>(text) {
        let via_value = Case::from_value(&value);
        match (&parsed, &via_value) {
            (Ok(a), Ok(b)) => assert_eq!(format!("{a:?}"), format!("{b:?}")),
            (Err(_), Err(_)) => {}
            _ => panic!("Case::parse and Case::from_value disagree"),
        }
    }
    let case = match parsed {
        Ok(case) => case,
        Err(e) => {
            let _ = error_line(
                "fuzz",
                &lazyadam_replay::ReplayError::InvalidCase(e.to_string()),
            );
            return;
        }
    };
    // Keep each input's work bounded (a case's size is bounded by the input's anyway).
    let elements: usize = case.variables.iter().map(|v| v.initial.len()).sum();
    if elements.saturating_mul(case.steps.len().max(1)) > 1 << 20 {
        return;
    }
    match replay(&case) {
        Ok(result) => {
            let _ = result.to_json_line();
            let _ = check(&case, &result);
            let want = bits(&result);
            for isa in Isa::supported() {
                let ext = Extensions {
                    kernel: Some(isa),
                    parallel_min_elements: 1,
                    ..Extensions::default()
                };
                let again = replay_with(&case, ext)
                    .unwrap_or_else(|e| panic!("replay failed only on {isa:?}: {e}"));
                assert_eq!(bits(&again), want, "{isa:?} path differs");
            }
        }
        Err(e) => {
            let _ = error_line(&case.name, &e);
        }
    }
});
