//! Config JSON: the reference's keys, defaults, aliases and typed errors.

use lazyadam::{
    BiasCorrection, ConfigError, CustomSchedule, Extensions, Isa, LazyAdam, LazyAdamConfig,
    LearningRate, LearningRateSchedule, NonFinitePolicy, Schedule, kernels::LongRowLoop,
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
fn unknown_keys_are_named_with_the_accepted_ones() {
    let e = err(r#"{"momentum": 0.9}"#);
    let ConfigError::UnknownKey { key, accepted } = &e else {
        panic!("{e:?}")
    };
    assert_eq!(key, "momentum");
    for k in [
        "learning_rate",
        "beta_1",
        "weight_decay",
        "use_ema",
        "clipnorm",
    ] {
        assert!(accepted.contains(k), "{accepted}");
    }
    assert!(
        e.to_string().contains("accepted keys: name, learning_rate"),
        "{e}"
    );
    let e = err(
        r#"{"learning_rate": {"class_name": "ExponentialDecay", "config":
            {"initial_learning_rate": 0.1, "decay_steps": 2, "decay_rate": 0.5, "foo": 1}}}"#,
    );
    let ConfigError::UnknownKey { key, accepted } = &e else {
        panic!("{e:?}")
    };
    assert_eq!(key, "learning_rate.config.foo");
    assert!(
        accepted.contains("decay_steps") && accepted.contains("staircase"),
        "{accepted}"
    );
}

/// A Keras 3 `keras.optimizers.Adam(...).get_config()` (keys and values as Keras 3.x writes
/// them).
const KERAS3: &str = r#"{"name": "adam", "learning_rate": 0.0010000000474974513,
    "weight_decay": null, "clipnorm": null, "global_clipnorm": null, "clipvalue": null,
    "use_ema": false, "ema_momentum": 0.99, "ema_overwrite_frequency": null,
    "loss_scale_factor": null, "gradient_accumulation_steps": null, "beta_1": 0.9,
    "beta_2": 0.999, "epsilon": 1e-07, "amsgrad": false}"#;

#[test]
fn keras3_configs_are_read_where_they_map() {
    let c = LazyAdamConfig::from_keras_json(KERAS3).unwrap();
    assert_eq!(c, LazyAdamConfig::default().with_name("adam"));
    // Keras 2.11+ optimizers write `jit_compile` and `is_legacy_optimizer`.
    let k211 = KERAS3.replacen(
        '{',
        r#"{"jit_compile": true, "is_legacy_optimizer": false, "#,
        1,
    );
    assert_eq!(LazyAdamConfig::from_keras_json(&k211).unwrap(), c);
    // weight_decay 0 is no decay; a non-zero one needs the extensions.
    let zero = KERAS3.replace(r#""weight_decay": null"#, r#""weight_decay": 0.0"#);
    assert_eq!(LazyAdamConfig::from_keras_json(&zero).unwrap(), c);
    let wd = KERAS3.replace(r#""weight_decay": null"#, r#""weight_decay": 0.004"#);
    let e = LazyAdamConfig::from_keras_json(&wd).unwrap_err();
    assert!(
        matches!(&e, ConfigError::InvalidValue { key, reason }
            if key == "weight_decay" && reason.contains("from_keras_json_with_extensions")),
        "{e:?}"
    );
    let (c2, ext) = LazyAdamConfig::from_keras_json_with_extensions(&wd).unwrap();
    assert_eq!(c2, c);
    assert_eq!(ext, Extensions::default().with_weight_decay(0.004));
    let (_, none) = LazyAdamConfig::from_keras_json_with_extensions(KERAS3).unwrap();
    assert_eq!(none, Extensions::default());
    // What has no counterpart here is refused, naming the key.
    for (from, to, key) in [
        (r#""use_ema": false"#, r#""use_ema": true"#, "use_ema"),
        (
            r#""loss_scale_factor": null"#,
            r#""loss_scale_factor": 128.0"#,
            "loss_scale_factor",
        ),
        (
            r#""gradient_accumulation_steps": null"#,
            r#""gradient_accumulation_steps": 4"#,
            "gradient_accumulation_steps",
        ),
        (
            r#""weight_decay": null"#,
            r#""weight_decay": -0.1"#,
            "weight_decay",
        ),
        (
            r#""weight_decay": null"#,
            r#""weight_decay": "x""#,
            "weight_decay",
        ),
        (
            r#""ema_momentum": 0.99"#,
            r#""ema_momentum": "x""#,
            "ema_momentum",
        ),
    ] {
        let text = KERAS3.replace(from, to);
        assert_ne!(text, KERAS3);
        for e in [
            LazyAdamConfig::from_keras_json(&text).unwrap_err(),
            LazyAdamConfig::from_keras_json_with_extensions(&text).unwrap_err(),
        ] {
            assert!(
                matches!(&e, ConfigError::InvalidValue { key: k, .. } if k == key),
                "{key}: {e:?}"
            );
        }
    }
}

#[test]
fn builders_set_exactly_their_field() {
    let c = LazyAdamConfig::new(0.05f64)
        .with_betas(0.8, 0.99)
        .with_epsilon(1e-8)
        .with_amsgrad(true)
        .with_decay(0.01)
        .with_clipvalue(2.0)
        .with_global_clipnorm(1.0)
        .with_name("emb");
    let expected = LazyAdamConfig {
        learning_rate: LearningRate::Constant(0.05),
        beta_1: 0.8,
        beta_2: 0.99,
        epsilon: 1e-8,
        amsgrad: true,
        decay: 0.01,
        clipnorm: None,
        clipvalue: Some(2.0),
        global_clipnorm: Some(1.0),
        name: "emb".into(),
    };
    assert_eq!(c, expected);
    assert_eq!(
        LazyAdamConfig::default()
            .with_beta_1(0.5)
            .with_beta_2(0.6)
            .with_clipnorm(3.0),
        LazyAdamConfig {
            beta_1: 0.5,
            beta_2: 0.6,
            clipnorm: Some(3.0),
            ..LazyAdamConfig::default()
        }
    );
    // An f64 rate is rounded to the nearest f32; one beyond f32 is refused at build time.
    assert_eq!(
        LazyAdamConfig::new(0.1f64).learning_rate,
        LearningRate::Constant(0.1f32)
    );
    assert!(LazyAdam::new(LazyAdamConfig::new(1e300f64)).is_err());
    let ext = Extensions::default()
        .with_sparse_amsgrad(true)
        .with_weight_decay(0.1)
        .with_maximize(true)
        .with_per_row_bias_correction(true)
        .with_catch_up_decay(true)
        .with_non_finite(NonFinitePolicy::Error)
        .with_stochastic_rounding(Some(7))
        .with_kernel(Some(Isa::Scalar))
        .with_long_row_loop(LongRowLoop::Split)
        .with_parallel_min_elements(5)
        .with_bias_correction(BiasCorrection::F64);
    assert_eq!(
        ext,
        Extensions {
            sparse_amsgrad: true,
            weight_decay: 0.1,
            maximize: true,
            per_row_bias_correction: true,
            catch_up_decay: true,
            non_finite: NonFinitePolicy::Error,
            stochastic_rounding: Some(7),
            kernel: Some(Isa::Scalar),
            long_row_loop: LongRowLoop::Split,
            parallel_min_elements: 5,
            bias_correction: BiasCorrection::F64,
        }
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
