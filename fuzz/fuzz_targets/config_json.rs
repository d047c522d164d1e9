//! Arbitrary bytes as a Keras `get_config()` JSON: never a panic; a config that loads is valid,
//! builds an optimizer, and writes back to an equivalent config (write -> load gives the same
//! config, and writing that again gives the same JSON).
//!
//! Inputs starting with `{` (the seed corpus: the conformance cases' optimizer configs) are used
//! as JSON text as they are; other inputs drive a structured generator of config objects with the
//! real keys, schedule objects and edge values, so the fuzzer reaches past the JSON parser.
#![no_main]

use arbitrary::{Result, Unstructured};
use lazyadam::{LazyAdam, LazyAdamConfig};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value, json};

const KEYS: [&str; 19] = [
    "name",
    "learning_rate",
    "lr",
    "decay",
    "beta_1",
    "beta_2",
    "epsilon",
    "amsgrad",
    "clipnorm",
    "clipvalue",
    "global_clipnorm",
    "is_legacy_optimizer",
    "jit_compile",
    "weight_decay",
    "use_ema",
    "ema_momentum",
    "ema_overwrite_frequency",
    "loss_scale_factor",
    "gradient_accumulation_steps",
];

const SCHEDULES: [&str; 6] = [
    "ExponentialDecay",
    "PiecewiseConstantDecay",
    "PolynomialDecay",
    "InverseTimeDecay",
    "CosineDecay",
    "CosineDecayRestarts",
];

const SCHEDULE_KEYS: [&str; 16] = [
    "initial_learning_rate",
    "decay_steps",
    "decay_rate",
    "staircase",
    "boundaries",
    "values",
    "end_learning_rate",
    "power",
    "cycle",
    "alpha",
    "warmup_target",
    "warmup_steps",
    "first_decay_steps",
    "t_mul",
    "m_mul",
    "name",
];

fn number(u: &mut Unstructured<'_>) -> Result<Value> {
    Ok(match u.int_in_range(0u8..=9)? {
        0 => json!(u.arbitrary::<f64>()?),
        1 => json!(u.arbitrary::<i64>()?),
        2 => json!(
            [
                0.0,
                -0.0,
                1.0,
                -1.0,
                1e-7,
                0.9,
                0.999,
                1e300,
                -1e300,
                5e-324,
                3.4028235e38,
                3.5e38
            ][u.choose_index(12)?]
        ),
        3 => json!(u.arbitrary::<u64>()?),
        _ => json!(u.int_in_range(-4i32..=1000)? as f64 / 100.0),
    })
}

fn value(u: &mut Unstructured<'_>, depth: u32) -> Result<Value> {
    Ok(match u.int_in_range(0u8..=12)? {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary()?),
        2 => Value::String(u.arbitrary::<String>()?),
        3 if depth < 3 => {
            let n = u.int_in_range(0usize..=4)?;
            Value::Array((0..n).map(|_| value(u, depth + 1)).collect::<Result<_>>()?)
        }
        4 if depth < 3 => schedule(u, depth + 1)?,
        _ => number(u)?,
    })
}

fn schedule(u: &mut Unstructured<'_>, depth: u32) -> Result<Value> {
    let mut cfg = Map::new();
    let n = u.int_in_range(0usize..=8)?;
    for _ in 0..n {
        let k = SCHEDULE_KEYS[u.choose_index(SCHEDULE_KEYS.len())?];
        let v = if k == "boundaries" || k == "values" {
            let n = u.int_in_range(0usize..=5)?;
            Value::Array((0..n).map(|_| number(u)).collect::<Result<_>>()?)
        } else if u.ratio(1u8, 6u8)? {
            value(u, depth + 1)?
        } else {
            number(u)?
        };
        cfg.insert(k.to_string(), v);
    }
    let class = if u.ratio(1u8, 10u8)? {
        Value::String(u.arbitrary::<String>()?)
    } else {
        json!(SCHEDULES[u.choose_index(SCHEDULES.len())?])
    };
    let mut o = Map::new();
    o.insert("class_name".into(), class);
    o.insert("config".into(), Value::Object(cfg));
    if u.ratio(1u8, 4u8)? {
        o.insert("module".into(), json!("keras.optimizers.schedules"));
        o.insert("registered_name".into(), Value::Null);
    }
    Ok(Value::Object(o))
}

fn structured(u: &mut Unstructured<'_>) -> Result<String> {
    let mut o = Map::new();
    let n = u.int_in_range(0usize..=10)?;
    for _ in 0..n {
        let key = if u.ratio(1u8, 12u8)? {
            u.arbitrary::<String>()?
        } else {
            KEYS[u.choose_index(KEYS.len())?].to_string()
        };
        let v = match key.as_str() {
            "learning_rate" | "lr" if u.ratio(1u8, 2u8)? => schedule(u, 0)?,
            "amsgrad" if u.ratio(3u8, 4u8)? => Value::Bool(u.arbitrary()?),
            "name" if u.ratio(3u8, 4u8)? => json!("LazyAdam"),
            _ if u.ratio(3u8, 4u8)? => number(u)?,
            _ => value(u, 0)?,
        };
        o.insert(key, v);
    }
    Ok(Value::Object(o).to_string())
}

fn same(a: &LazyAdamConfig, b: &LazyAdamConfig) -> bool {
    // Debug formats f32/f64 exactly (shortest round-trip), and NaN equals NaN there.
    format!("{a:?}") == format!("{b:?}")
}

fn check(text: &str) {
    let loaded = LazyAdamConfig::from_keras_json(text);
    // With extensions: the same config, and weight decay as the only difference.
    match (
        &loaded,
        LazyAdamConfig::from_keras_json_with_extensions(text),
    ) {
        (Ok(a), Ok((b, ext))) => {
            assert!(same(a, &b), "with extensions: {a:?} / {b:?}");
            assert_eq!(ext, lazyadam::Extensions::default());
        }
        (Err(e), Ok((_, ext))) => assert!(
            matches!(e, lazyadam::ConfigError::InvalidValue { key, .. } if key == "weight_decay")
                && ext.weight_decay > 0.0,
            "only weight decay may need the extensions: {e:?}"
        ),
        (Ok(a), Err(e)) => panic!("{a:?} loads, but not with extensions: {e:?}"),
        (Err(_), Err(_)) => {}
    }
    // The Value entry point agrees with the text entry point.
    if let Ok(v) = serde_json::from_str::<Value>(text) {
        let via_value = LazyAdamConfig::from_keras_value(&v);
        match (&loaded, &via_value) {
            (Ok(a), Ok(b)) => assert!(same(a, b), "json vs value: {a:?} / {b:?}"),
            (Err(_), Err(_)) => {}
            // The text entry point refuses a repeated key (an ambiguous document) that
            // serde_json's `Value` silently resolved to the last occurrence.
            (Err(e), Ok(_)) if e.to_string().contains("duplicate key") => {}
            _ => panic!("from_keras_json {loaded:?} but from_keras_value {via_value:?}"),
        }
    }
    let Ok(config) = loaded else { return };
    config
        .validate()
        .unwrap_or_else(|e| panic!("a loaded config does not validate: {e:?} ({config:?})"));
    let written = config
        .to_keras_json()
        .unwrap_or_else(|e| panic!("a loaded config does not write: {e:?} ({config:?})"));
    let again = LazyAdamConfig::from_keras_json(&written)
        .unwrap_or_else(|e| panic!("written config does not load: {e:?}\n{written}"));
    assert!(
        same(&config, &again),
        "round trip:\n{config:?}\n{again:?}\n{written}"
    );
    let rewritten = again.to_keras_json().expect("writes");
    assert_eq!(written, rewritten, "writing is not stable");
    let value = config.to_keras_value().expect("writes");
    assert_eq!(
        serde_json::from_str::<Value>(&written).expect("valid JSON"),
        value,
        "to_keras_json and to_keras_value disagree"
    );
    for it in [0u64, 1, 2, 10, 1000, 1 << 40, u64::MAX] {
        let _ = config.learning_rate_at(it);
    }
    let opt = LazyAdam::new(config.clone())
        .unwrap_or_else(|e| panic!("a loaded config does not build: {e:?}"));
    assert!(same(opt.config(), &config));
    let _ = opt.learning_rate();
}

fuzz_target!(|data: &[u8]| {
    if data.first() == Some(&b'{') {
        if let Ok(text) = std::str::from_utf8(data) {
            check(text);
        }
        return;
    }
    let mut u = Unstructured::new(data);
    if let Ok(text) = structured(&mut u) {
        check(&text);
    }
});
