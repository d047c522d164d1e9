//! State restored by variable name (`restore_by_name`, `restore_from_bytes`,
//! `restore_from_file`), and file errors that name the path.

use lazyadam::{
    DType, DynamicLossScale, Error, Extensions, Gradient, LazyAdam, LazyAdamConfig,
    NonFinitePolicy, Update,
};

const LAYERS: [&str; 4] = ["l0.weight", "l1.weight", "l2.weight", "l3.weight"];

fn config() -> LazyAdamConfig {
    LazyAdamConfig::new(0.01).with_amsgrad(true)
}

/// Registers the four same-shape layers in `order` and returns the optimizer.
fn model(order: &[usize], ext: &Extensions) -> LazyAdam {
    let mut opt = LazyAdam::with_extensions(config(), ext.clone()).unwrap();
    for &i in order {
        opt.add_variable(LAYERS[i], &[4, 2], DType::F32, DType::F32)
            .unwrap();
    }
    opt
}

/// One step on every layer, with a gradient that differs per layer (layer i's
/// first value is 0.2 * (i + 1)), so that every layer's moments differ.
fn step(opt: &mut LazyAdam, params: &mut [Vec<f32>; 4], s: usize) {
    let grads: Vec<Vec<f32>> = (0..4)
        .map(|i| {
            (0..8)
                .map(|j| 0.2 * (i + 1) as f32 + 0.01 * (j + s) as f32)
                .collect()
        })
        .collect();
    let ids: Vec<_> = LAYERS.iter().map(|n| opt.variable_id(n).unwrap()).collect();
    let mut updates: Vec<Update<'_>> = params
        .iter_mut()
        .zip(&grads)
        .zip(&ids)
        .map(|((p, g), &id)| Update::new(id, p, Gradient::dense(g)))
        .collect();
    opt.apply_gradients(&mut updates).unwrap();
}

fn m_of(opt: &LazyAdam, name: &str) -> Vec<f32> {
    opt.slots(opt.variable_id(name).unwrap())
        .unwrap()
        .m
        .to_f32_vec()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn each_layer_gets_its_own_moments_in_any_registration_order() {
    let ext = Extensions::default();
    let mut saved = model(&[0, 1, 2, 3], &ext);
    let mut params: [Vec<f32>; 4] = std::array::from_fn(|_| vec![0.5; 8]);
    for s in 0..3 {
        step(&mut saved, &mut params, s);
    }
    let bytes = saved.to_bytes().unwrap();
    for order in [[3, 2, 1, 0], [1, 3, 0, 2]] {
        let mut resumed = model(&order, &ext);
        resumed.restore_from_bytes(&bytes).unwrap();
        assert_eq!(resumed.iterations(), 3);
        for name in LAYERS {
            assert_eq!(
                bits(&m_of(&resumed, name)),
                bits(&m_of(&saved, name)),
                "{name}"
            );
            let (a, b) = (
                resumed.slots(resumed.variable_id(name).unwrap()).unwrap(),
                saved.slots(saved.variable_id(name).unwrap()).unwrap(),
            );
            assert_eq!(bits(&a.v.to_f32_vec()), bits(&b.v.to_f32_vec()), "{name}");
            assert_eq!(
                bits(&a.vhat.unwrap().to_f32_vec()),
                bits(&b.vhat.unwrap().to_f32_vec())
            );
        }
        // The layers really differ, so a positional mix-up would have been seen.
        assert_ne!(m_of(&saved, LAYERS[0]), m_of(&saved, LAYERS[3]));
        // Continuing gives the uninterrupted run's bits.
        let mut p1 = params.clone();
        let mut p2 = params.clone();
        let mut cont = LazyAdam::from_bytes(&bytes).unwrap();
        step(&mut cont, &mut p1, 3);
        step(&mut resumed, &mut p2, 3);
        for (a, b) in p1.iter().zip(&p2) {
            assert_eq!(bits(a), bits(b));
        }
    }
    // The positional restore, with the other order, gives each layer another one's moments:
    // the trap `restore_by_name` exists for.
    let mut positional = model(&[3, 2, 1, 0], &ext);
    positional.set_weights(&saved.get_weights()).unwrap();
    assert_eq!(m_of(&positional, LAYERS[3]), m_of(&saved, LAYERS[0]));
}

fn expect_mismatch(target: &mut LazyAdam, saved: &LazyAdam, variable: &str, reason: &str) {
    let before = target.get_weights();
    let it = target.iterations();
    let e = target.restore_by_name(saved).unwrap_err();
    match &e {
        Error::StateMismatch {
            variable: v,
            reason: r,
        } => {
            assert_eq!(v, variable, "{e}");
            assert!(r.contains(reason), "{e}");
        }
        other => panic!("expected StateMismatch for {variable}, got {other:?}"),
    }
    assert!(e.to_string().contains(&format!("`{variable}`")), "{e}");
    assert_eq!(target.get_weights(), before, "{variable}: state changed");
    assert_eq!(target.iterations(), it);
}

#[test]
fn mismatches_name_the_variable_and_change_nothing() {
    let ext = Extensions::default();
    let mut saved = model(&[0, 1, 2, 3], &ext);
    let mut params: [Vec<f32>; 4] = std::array::from_fn(|_| vec![0.5; 8]);
    step(&mut saved, &mut params, 0);

    // Missing from the saved state.
    let mut t = model(&[0, 1, 2, 3], &ext);
    t.add_variable("head.bias", &[2], DType::F32, DType::F32)
        .unwrap();
    step(&mut t, &mut params, 1); // so that "nothing changed" is not trivially zeros
    expect_mismatch(&mut t, &saved, "head.bias", "saved state does not");

    // Extra in the saved state.
    let mut t = model(&[0, 1, 2], &ext);
    expect_mismatch(&mut t, &saved, "l3.weight", "this optimizer does not");

    // Another shape, another moment storage.
    let mut t = LazyAdam::new(config()).unwrap();
    for (i, name) in LAYERS.iter().enumerate() {
        let shape: &[usize] = if i == 2 { &[2, 4] } else { &[4, 2] };
        t.add_variable(name, shape, DType::F32, DType::F32).unwrap();
    }
    expect_mismatch(&mut t, &saved, "l2.weight", "shape [4, 2]");
    let mut t = LazyAdam::new(config()).unwrap();
    for (i, name) in LAYERS.iter().enumerate() {
        let md = if i == 1 { DType::F16 } else { DType::F32 };
        t.add_variable(name, &[4, 2], DType::F32, md).unwrap();
    }
    expect_mismatch(&mut t, &saved, "l1.weight", "float16 moments");

    // Other kinds of state: vhat, per-row counters, a loss scale.
    let mut t = LazyAdam::new(config().with_amsgrad(false)).unwrap();
    for name in LAYERS {
        t.add_variable(name, &[4, 2], DType::F32, DType::F32)
            .unwrap();
    }
    expect_mismatch(&mut t, &saved, "l0.weight", "vhat");
    let mut t = model(
        &[0, 1, 2, 3],
        &ext.clone().with_per_row_bias_correction(true),
    );
    expect_mismatch(&mut t, &saved, "l0.weight", "per-row step counters");
    let mut t = model(&[0, 1, 2, 3], &ext.clone().with_catch_up_decay(true));
    expect_mismatch(&mut t, &saved, "l0.weight", "last-update");
    let scaled = ext.clone().with_non_finite(NonFinitePolicy::SkipStep {
        loss_scale: Some(DynamicLossScale::default()),
    });
    let mut t = model(&[0, 1, 2, 3], &scaled);
    expect_mismatch(&mut t, &saved, "loss_scale", "dynamic loss scale");

    // The matching model restores.
    let mut t = model(&[2, 0, 3, 1], &ext);
    t.restore_by_name(&saved).unwrap();
    assert_eq!(t.iterations(), 1);
}

#[test]
fn extension_state_and_the_loss_scale_come_back_by_name() {
    let ext = Extensions::default()
        .with_per_row_bias_correction(true)
        .with_catch_up_decay(true)
        .with_non_finite(NonFinitePolicy::SkipStep {
            loss_scale: Some(DynamicLossScale {
                scale: 1024.0,
                growth_interval: 1,
                ..DynamicLossScale::default()
            }),
        });
    let mut saved = model(&[0, 1, 2, 3], &ext);
    let mut params: [Vec<f32>; 4] = std::array::from_fn(|_| vec![0.5; 8]);
    for s in 0..2 {
        step(&mut saved, &mut params, s);
    }
    assert_ne!(saved.loss_scale(), Some(1024.0), "the scale grew");
    let mut t = model(&[3, 1, 0, 2], &ext);
    t.restore_by_name(&saved).unwrap();
    assert_eq!(t.loss_scale(), saved.loss_scale());
    for name in LAYERS {
        let (a, b) = (
            t.variable_id(name).unwrap(),
            saved.variable_id(name).unwrap(),
        );
        assert_eq!(t.row_steps(a), saved.row_steps(b));
        assert_eq!(t.last_update_steps(a), saved.last_update_steps(b));
        assert_eq!(t.row_steps(a).unwrap(), &[2, 2, 2, 2]);
    }
}

#[test]
fn file_errors_name_the_path() {
    let dir = std::env::temp_dir().join(format!("lazyadam-by-name-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let missing = dir.join("missing.safetensors");
    let e = LazyAdam::load(&missing).unwrap_err();
    assert!(
        matches!(&e, Error::File { action: "read", path, .. } if *path == missing),
        "{e:?}"
    );
    assert!(e.to_string().contains("missing.safetensors"), "{e}");
    let mut opt = model(&[0, 1, 2, 3], &Extensions::default());
    let e = opt.restore_from_file(&missing).unwrap_err();
    assert!(matches!(&e, Error::File { action: "read", .. }), "{e:?}");
    // Writing to a directory fails with the directory's path.
    let e = opt.save(&dir).unwrap_err();
    assert!(
        matches!(&e, Error::File { action: "write", path, .. } if *path == dir),
        "{e:?}"
    );
    // A good round trip through a file.
    let file = dir.join("state.safetensors");
    opt.save(&file).unwrap();
    let mut other = model(&[3, 2, 1, 0], &Extensions::default());
    other.restore_from_file(&file).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
