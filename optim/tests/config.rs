//! Config JSON: the reference's keys, defaults, aliases and typed errors.

use lazyadam::{
    ConfigError, CustomSchedule, LazyAdamConfig, LearningRate, LearningRateSchedule, Schedule,
};

fn err(json: &str) -> ConfigError {
    LazyAdamConfig::from_keras_json(json).unwrap_err()
}

fn invalid_key(e: &ConfigError) -> &str {
    match e {
        ConfigError::InvalidValue { key, .. } => key,
        other => panic!("expected InvalidValue, got {other:?}"),
    }
}

#[test]
fn defaults_match_the_reference() {
    let c = LazyAdamConfig::from_keras_json("{}").unwrap();
    assert_eq!(c, LazyAdamConfig::default());
    assert_eq!(c.learning_rate, LearningRate::Constant(0.001));
    assert_eq!((c.beta_1, c.beta_2, c.epsilon), (0.9, 0.999, 1e-7));
    assert!(!c.amsgrad);
    assert_eq!(c.decay, 0.0);
    assert_eq!(
        (c.clipnorm, c.clipvalue, c.global_clipnorm),
        (None, None, None)
    );
    assert_eq!(c.name, "LazyAdam");
}

#[test]
fn writes_the_reference_json() {
    let c = LazyAdamConfig {
        clipnorm: Some(0.5),
        ..LazyAdamConfig::default()
    };
    let v = c.to_keras_value().unwrap();
    let want: serde_json::Value = serde_json::from_str(
        r#"{"name": "LazyAdam", "clipnorm": 0.5, "learning_rate": 0.0010000000474974513,
            "decay": 0.0, "beta_1": 0.8999999761581421, "beta_2": 0.9990000128746033,
            "epsilon": 1e-07, "amsgrad": false}"#,
    )
    .unwrap();
    assert_eq!(v, want);
}

#[test]
fn lr_alias() {
    let c = LazyAdamConfig::from_keras_json(r#"{"lr": 0.5}"#).unwrap();
    assert_eq!(c.learning_rate, LearningRate::Constant(0.5));
    let e = err(r#"{"lr": 0.5, "learning_rate": 0.1}"#);
    assert!(matches!(e, ConfigError::InvalidValue { .. }));
}

#[test]
fn unknown_keys_are_named() {
    assert_eq!(
        err(r#"{"momentum": 0.9}"#),
        ConfigError::UnknownKey("momentum".into())
    );
    let e = err(
        r#"{"learning_rate": {"class_name": "ExponentialDecay", "config":
            {"initial_learning_rate": 0.1, "decay_steps": 2, "decay_rate": 0.5, "foo": 1}}}"#,
    );
    assert_eq!(
        e,
        ConfigError::UnknownKey("learning_rate.config.foo".into())
    );
}

#[test]
fn invalid_values_are_named() {
    for (json, key) in [
        (r#"{"learning_rate": -0.1}"#, "learning_rate"),
        (r#"{"beta_1": 1.0}"#, "beta_1"),
        (r#"{"beta_1": -0.1}"#, "beta_1"),
        (r#"{"beta_2": 1.5}"#, "beta_2"),
        (r#"{"epsilon": -1e-7}"#, "epsilon"),
        (r#"{"decay": -1}"#, "decay"),
        (r#"{"clipnorm": -1}"#, "clipnorm"),
        (r#"{"clipvalue": -0.5}"#, "clipvalue"),
        (r#"{"global_clipnorm": -2}"#, "global_clipnorm"),
        (r#"{"amsgrad": 1}"#, "amsgrad"),
        (r#"{"beta_1": "0.9"}"#, "beta_1"),
        (r#"{"name": 3}"#, "name"),
        (
            r#"{"clipnorm": 1.0, "global_clipnorm": 1.0}"#,
            "global_clipnorm",
        ),
        (
            r#"{"learning_rate": {"class_name": "ExponentialDecay", "config":
                {"initial_learning_rate": 0.1, "decay_steps": 0, "decay_rate": 0.5}}}"#,
            "learning_rate.config.decay_steps",
        ),
        (
            r#"{"learning_rate": {"class_name": "PiecewiseConstantDecay", "config":
                {"boundaries": [1, 2], "values": [0.1, 0.2]}}}"#,
            "learning_rate.config.values",
        ),
        (
            r#"{"learning_rate": {"class_name": "NoSuchDecay", "config": {}}}"#,
            "learning_rate.class_name",
        ),
    ] {
        let e = err(json);
        assert_eq!(invalid_key(&e), key, "{json}: {e}");
        assert!(e.to_string().contains(key), "{e}");
    }
}

#[test]
fn null_clip_values_are_unset() {
    let c = LazyAdamConfig::from_keras_json(r#"{"clipnorm": null, "clipvalue": null}"#).unwrap();
    assert_eq!(c.clipnorm, None);
    assert_eq!(c.clipvalue, None);
}

#[test]
fn keras_serialize_wrapper_is_accepted() {
    let c = LazyAdamConfig::from_keras_json(
        r#"{"class_name": "Addons>LazyAdam", "config": {"name": "LazyAdam", "learning_rate": 0.25,
            "is_legacy_optimizer": true}}"#,
    )
    .unwrap();
    assert_eq!(c.learning_rate, LearningRate::Constant(0.25));
}

#[test]
fn malformed_json_is_an_error() {
    assert!(matches!(err("{"), ConfigError::Json(_)));
    assert!(matches!(err("[1, 2]"), ConfigError::Json(_)));
}

#[derive(Debug)]
struct Half;
impl LearningRateSchedule for Half {
    fn learning_rate(&self, step: u64) -> f32 {
        0.5 / (step + 1) as f32
    }
}

#[test]
fn custom_schedules_run_but_do_not_serialize() {
    let c = LazyAdamConfig {
        learning_rate: LearningRate::Custom(CustomSchedule::new(Half)),
        ..LazyAdamConfig::default()
    };
    assert_eq!(c.learning_rate_at(1), 0.25);
    assert_eq!(c.to_keras_json().unwrap_err(), ConfigError::CustomSchedule);
    assert_eq!(c.clone(), c);
}

#[test]
fn floats_round_trip() {
    for lr in [1e-3f32, 0.1, 3e-4, 1.0 / 3.0, f32::MIN_POSITIVE, 123456.79] {
        let c = LazyAdamConfig {
            learning_rate: LearningRate::Constant(lr),
            epsilon: lr,
            clipvalue: Some(lr),
            ..LazyAdamConfig::default()
        };
        let back = LazyAdamConfig::from_keras_json(&c.to_keras_json().unwrap()).unwrap();
        assert_eq!(back, c);
    }
}

/// A step count written as an integer loses the sign of zero; writing must keep every value's
/// bits (found by the `config_json` fuzz target: `"boundaries": [-0, 3]`).
#[test]
fn negative_zero_step_counts_round_trip() {
    let text = r#"{"learning_rate": {"class_name": "PiecewiseConstantDecay",
        "config": {"boundaries": [-0, 3], "values": [0.1, 0.01, 0.001]}}}"#;
    let c = LazyAdamConfig::from_keras_json(text).unwrap();
    let boundaries = |c: &LazyAdamConfig| match &c.learning_rate {
        LearningRate::Schedule(Schedule::PiecewiseConstantDecay { boundaries, .. }) => {
            boundaries.iter().map(|b| b.to_bits()).collect::<Vec<_>>()
        }
        other => panic!("expected PiecewiseConstantDecay, got {other:?}"),
    };
    assert_eq!(boundaries(&c), [(-0.0f64).to_bits(), 3.0f64.to_bits()]);
    let written = c.to_keras_json().unwrap();
    // Integral step counts other than -0 are still written as integers, as Keras writes them.
    assert!(written.contains(r#""boundaries":[-0.0,3]"#), "{written}");
    let back = LazyAdamConfig::from_keras_json(&written).unwrap();
    assert_eq!(boundaries(&back), boundaries(&c));
    assert_eq!(back.to_keras_json().unwrap(), written);
}
