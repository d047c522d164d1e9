//! Weights in the reference's order, and safetensors checkpoints.

use lazyadam::{
    CustomSchedule, DType, Error, Gradient, LazyAdam, LazyAdamConfig, LearningRate,
    LearningRateSchedule, Schedule, Update, WeightData, WeightTensor, f16,
};

fn trained(amsgrad: bool) -> (LazyAdam, Vec<f32>, Vec<f32>) {
    let config = LazyAdamConfig {
        amsgrad,
        learning_rate: LearningRate::Schedule(Schedule::ExponentialDecay {
            initial_learning_rate: 0.01,
            decay_steps: 3.0,
            decay_rate: 0.5,
            staircase: false,
        }),
        clipnorm: Some(1.0),
        ..LazyAdamConfig::default()
    };
    let mut opt = LazyAdam::new(config).unwrap();
    let a = opt
        .add_variable("emb", &[4, 2], DType::F32, DType::F32)
        .unwrap();
    let b = opt
        .add_variable("dense/kernel", &[3], DType::F32, DType::F16)
        .unwrap();
    let mut pa = vec![0.5f32; 8];
    let mut pb = vec![-0.5f32; 3];
    for s in 0..3 {
        let g = [0.1f32 * s as f32, 0.2, -0.3, 0.4];
        opt.apply_gradients(&mut [
            Update::new(a, &mut pa, Gradient::sparse(&[s as u32, 3], &g)),
            Update::new(b, &mut pb, Gradient::dense(&g[..3])),
        ])
        .unwrap();
    }
    (opt, pa, pb)
}

#[test]
fn weights_follow_the_reference_order() {
    let (opt, _, _) = trained(true);
    let w = opt.get_weights();
    let names: Vec<&str> = w.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "iterations",
            "emb/m",
            "dense/kernel/m",
            "emb/v",
            "dense/kernel/v",
            "emb/vhat",
            "dense/kernel/vhat"
        ]
    );
    assert_eq!(w[0].data, WeightData::I64(vec![3]));
    assert_eq!(w[0].shape, Vec::<usize>::new());
    assert_eq!(w[1].shape, vec![4, 2]);
    assert!(matches!(w[2].data, WeightData::F16(_)));
    let (plain, _, _) = trained(false);
    assert_eq!(plain.get_weights().len(), 5);
}

#[test]
fn set_weights_restores_exactly_and_checks_everything() {
    let (opt, _, _) = trained(true);
    let w = opt.get_weights();
    let mut fresh = LazyAdam::new(opt.config().clone()).unwrap();
    fresh
        .add_variable("emb", &[4, 2], DType::F32, DType::F32)
        .unwrap();
    fresh
        .add_variable("dense/kernel", &[3], DType::F32, DType::F16)
        .unwrap();
    let zeroed: Vec<WeightTensor> = fresh.get_weights();
    assert_eq!(zeroed[0].data, WeightData::I64(vec![0]));
    fresh.set_weights(&w).unwrap();
    assert_eq!(fresh.get_weights(), w);

    // Wrong count, wrong shape, wrong dtype, negative iterations: errors, nothing changes.
    let before = fresh.get_weights();
    assert!(matches!(
        fresh.set_weights(&w[..4]),
        Err(Error::Checkpoint(_))
    ));
    let mut bad = w.clone();
    bad[1].shape = vec![8];
    assert!(fresh.set_weights(&bad).is_err());
    let mut bad = w.clone();
    bad[2].data = WeightData::F32(vec![0.0; 3]);
    assert!(matches!(
        fresh.set_weights(&bad),
        Err(Error::DtypeMismatch { .. })
    ));
    let mut bad = w.clone();
    bad[0].data = WeightData::I64(vec![-1]);
    assert!(fresh.set_weights(&bad).is_err());
    let mut bad = w.clone();
    bad[6].data = WeightData::F16(vec![f16::ONE; 2]);
    assert!(fresh.set_weights(&bad).is_err());
    assert_eq!(fresh.get_weights(), before);
    assert_eq!(fresh.iterations(), 3);
}

#[test]
fn checkpoint_files_round_trip() {
    let (opt, mut pa, mut pb) = trained(true);
    let dir = std::env::temp_dir().join(format!("lazyadam-state-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("opt.safetensors");
    opt.save(&path).unwrap();
    let mut loaded = LazyAdam::load(&path).unwrap();
    assert_eq!(loaded.get_weights(), opt.get_weights());
    assert_eq!(loaded.config(), opt.config());
    assert_eq!(loaded.iterations(), 3);
    assert_eq!(loaded.learning_rate(), opt.learning_rate());
    let a = loaded.variable_id("emb").unwrap();
    let b = loaded.variable_id("dense/kernel").unwrap();
    assert_eq!(loaded.variable(b).unwrap().moment_dtype, DType::F16);
    loaded
        .apply_gradients(&mut [
            Update::new(a, &mut pa, Gradient::sparse(&[1u32], &[0.5f32, 0.5])),
            Update::new(b, &mut pb, Gradient::dense(&[0.1f32, 0.1, 0.1])),
        ])
        .unwrap();
    assert_eq!(loaded.iterations(), 4);
    assert!(matches!(
        LazyAdam::load(dir.join("missing")),
        Err(Error::File { action: "read", .. })
    ));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn checkpoints_are_safetensors_with_named_tensors() {
    let (opt, _, _) = trained(false);
    let bytes = opt.to_bytes().unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names = st.names();
    names.sort();
    assert_eq!(
        names,
        [
            "dense/kernel/m",
            "dense/kernel/v",
            "emb/m",
            "emb/v",
            "iterations"
        ]
    );
    let m = st.tensor("emb/m").unwrap();
    assert_eq!(m.dtype(), safetensors::Dtype::F32);
    assert_eq!(m.shape(), &[4, 2]);
    assert_eq!(
        st.tensor("dense/kernel/v").unwrap().dtype(),
        safetensors::Dtype::F16
    );
    assert_eq!(
        st.tensor("iterations").unwrap().dtype(),
        safetensors::Dtype::I64
    );
}

#[test]
fn corrupt_checkpoints_are_errors() {
    let (opt, _, _) = trained(true);
    let bytes = opt.to_bytes().unwrap();
    for cut in [0, 1, 7, 8, 9, 100, bytes.len() - 1] {
        assert!(LazyAdam::from_bytes(&bytes[..cut]).is_err(), "cut at {cut}");
    }
    // A header length far beyond the buffer.
    let mut huge = bytes.clone();
    huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(LazyAdam::from_bytes(&huge).is_err());
    // Plain garbage.
    assert!(LazyAdam::from_bytes(b"definitely not a checkpoint").is_err());
    // Valid safetensors without our metadata.
    let plain = safetensors::serialize(
        Vec::<(String, safetensors::tensor::TensorView<'_>)>::new(),
        None,
    )
    .unwrap();
    assert!(LazyAdam::from_bytes(&plain).is_err());
    // A variable declared with a huge shape whose tensors do not back it.
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut md = meta.metadata().clone().unwrap();
    md.insert(
        "variables".into(),
        r#"[{"name": "emb", "shape": [1000000000000, 1000000], "param_dtype": "float32", "moment_dtype": "float32"}]"#.into(),
    );
    let tensors: Vec<(String, safetensors::tensor::TensorView<'_>)> = st.tensors();
    let forged = safetensors::serialize(tensors, Some(md)).unwrap();
    let e = LazyAdam::from_bytes(&forged).unwrap_err();
    assert!(matches!(e, Error::Checkpoint(_)), "{e}");
}

#[derive(Debug)]
struct Constant;
impl LearningRateSchedule for Constant {
    fn learning_rate(&self, _: u64) -> f32 {
        0.1
    }
}

#[test]
fn custom_schedules_cannot_be_saved() {
    let config = LazyAdamConfig {
        learning_rate: LearningRate::Custom(CustomSchedule::new(Constant)),
        ..LazyAdamConfig::default()
    };
    let opt = LazyAdam::new(config).unwrap();
    assert!(matches!(opt.to_bytes(), Err(Error::Config(_))));
}

/// A forced loop of long rows is checkpointed and restored; the default (`Auto`) writes no
/// key, so a
/// default checkpoint reads as before the option existed.
#[test]
fn long_row_loop_is_checkpointed_only_when_forced() {
    use lazyadam::Extensions;
    use lazyadam::kernels::LongRowLoop;
    for forced in [LongRowLoop::Auto, LongRowLoop::OnePass, LongRowLoop::Split] {
        let ext = Extensions::default().with_long_row_loop(forced);
        let mut opt = LazyAdam::with_extensions(LazyAdamConfig::default(), ext).unwrap();
        opt.add_variable("w", &[3], DType::F32, DType::F32).unwrap();
        let bytes = opt.to_bytes().unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let ext_json = &meta.metadata().as_ref().unwrap()["extensions"];
        assert_eq!(
            ext_json.contains("long_row_loop"),
            forced != LongRowLoop::Auto,
            "{ext_json}"
        );
        let loaded = LazyAdam::from_bytes(&bytes).unwrap();
        assert_eq!(loaded.extensions().long_row_loop, forced);
        assert_eq!(loaded.extensions(), opt.extensions());
    }
}
