//! Hostile inputs found by an audit of the public API that the other tests did
//! not reach. Each test failed (a panic in a debug build, a state the
//! optimizer could not read back, or a corrupt state it accepted) before the
//! fix it comes with.

use lazyadam::{
    DType, DynamicLossScale, Error, Extensions, Gradient, LazyAdam, LazyAdamConfig,
    NonFinitePolicy, ThreadCollective, Update, WeightData,
};

/// A shape with a zero first dimension has no elements, but the product of its
/// other dimensions (the row length) may not fit a `usize`: that overflowed
/// (`attempt to multiply with overflow` in a debug build) instead of being an
/// `InvalidShape` error, and nothing may be registered.
#[test]
fn zero_rows_with_an_overflowing_row_length_are_an_invalid_shape() {
    let huge = 1usize << (usize::BITS / 2 + 8);
    for shape in [
        vec![0, huge, huge],
        vec![0, usize::MAX, 2],
        vec![0, 3, huge, huge, 5],
    ] {
        let mut opt = LazyAdam::new(LazyAdamConfig::default()).unwrap();
        let e = opt
            .add_variable("x", &shape, DType::F32, DType::F32)
            .unwrap_err();
        assert!(
            matches!(&e, Error::InvalidShape { variable, .. } if variable == "x"),
            "{shape:?}: {e}"
        );
        assert_eq!(opt.num_variables(), 0);
        assert!(opt.variable_id("x").is_none());
        // The name is still free.
        opt.add_variable("x", &[0, 3], DType::F32, DType::F32)
            .unwrap();
    }
}

/// The same shape through a sharded optimizer's dense variables.
#[test]
fn sharded_dense_variables_with_an_overflowing_row_length_are_an_invalid_shape() {
    let huge = 1usize << (usize::BITS / 2 + 8);
    let comm = ThreadCollective::group(1).pop().unwrap();
    let mut opt = lazyadam::ShardedLazyAdam::new(LazyAdamConfig::default(), comm).unwrap();
    let e = opt
        .add_dense("d", &[0, huge, huge], DType::F32, DType::F32)
        .unwrap_err();
    assert!(matches!(&e, Error::InvalidShape { .. }), "{e}");
    assert_eq!(opt.local().num_variables(), 0);
}
/// `set_iterations` below the per-row counters of the extensions (rows
/// updated at steps the new counter says have not happened) made a state that
/// saves but does not load: `to_bytes` wrote it, and `from_bytes` and
/// `set_weights` refused the optimizer's own output ("counter 5 out of range
/// (0..=0)"). Either the counter is refused, with a typed error and nothing
/// changed, or the state it leaves must round-trip.
#[test]
fn a_step_counter_below_the_per_row_counters_never_makes_an_unloadable_state() {
    let ext = Extensions::default()
        .with_per_row_bias_correction(true)
        .with_catch_up_decay(true);
    let mut opt = LazyAdam::with_extensions(LazyAdamConfig::new(0.01), ext.clone()).unwrap();
    let t = opt
        .add_variable("t", &[4, 2], DType::F32, DType::F32)
        .unwrap();
    let mut p = vec![0.5f32; 8];
    // Rows 1 and 2 at steps 1 to 3, row 3 at steps 4 and 5.
    for (ids, g) in [([1u32, 2], [0.1f32, -0.2, 0.3, 0.4]); 3]
        .into_iter()
        .chain([([3u32, 3], [0.5f32, 0.5, -0.5, 0.25]); 2])
    {
        opt.apply_gradients(&mut [Update::new(t, &mut p, Gradient::sparse(&ids, &g))])
            .unwrap();
    }
    assert_eq!(opt.row_steps(t).unwrap(), &[0, 3, 3, 2]);
    assert_eq!(opt.last_update_steps(t).unwrap(), &[0, 3, 3, 5]);

    for rewind in [0u64, 2, 4] {
        let before = (opt.iterations(), opt.get_weights(), opt.to_bytes().unwrap());
        match opt.set_iterations(rewind) {
            Err(e) => {
                assert!(
                    !matches!(e, Error::Kernel(_) | Error::Checkpoint(_)),
                    "{rewind}: {e}"
                );
                assert!(
                    matches!(e, Error::IterationsBelowRowCounter { iterations, .. } if iterations == rewind),
                    "{rewind}: {e}"
                );
                assert_eq!(
                    (opt.iterations(), opt.get_weights(), opt.to_bytes().unwrap()),
                    before
                );
            }
            Ok(()) => {
                let weights = opt.get_weights();
                let mut twin =
                    LazyAdam::with_extensions(LazyAdamConfig::new(0.01), ext.clone()).unwrap();
                twin.add_variable("t", &[4, 2], DType::F32, DType::F32)
                    .unwrap();
                twin.set_weights(&weights).unwrap();
                let bytes = opt.to_bytes().unwrap();
                let loaded = LazyAdam::from_bytes(&bytes).unwrap();
                assert_eq!(loaded.get_weights(), weights);
                opt.set_iterations(before.0).unwrap();
            }
        }
    }

    // A step counter at or above every per-row counter is fine, and round-trips.
    opt.set_iterations(9).unwrap();
    opt.set_iterations(5).unwrap();
    let bytes = opt.to_bytes().unwrap();
    let loaded = LazyAdam::from_bytes(&bytes).unwrap();
    assert_eq!(loaded.get_weights(), opt.get_weights());
    assert_eq!(loaded.to_bytes().unwrap(), bytes);
}

/// A second moment is a running average of squares: `v` (and `vhat`, its
/// running maximum) is never negative in any state a step makes. A negative one
/// is a corrupt or forged state, and it is not harmless: the next step takes
/// `sqrt(v)` of it, and a zero gradient already turns the parameter into NaN.
/// `set_weights` and `from_bytes` (with a checksum that matches) accepted it.
#[test]
fn negative_second_moments_are_refused() {
    let config = LazyAdamConfig::new(0.01).with_amsgrad(true);
    let mut opt = LazyAdam::new(config.clone()).unwrap();
    let w = opt.add_variable("w", &[2], DType::F32, DType::F32).unwrap();
    let mut p = vec![0.5f32, -0.5];
    opt.apply_gradients(&mut [Update::new(w, &mut p, Gradient::dense(&[1.0f32, 1.0]))])
        .unwrap();

    // set_weights: iterations, m, v, vhat.
    let good = opt.get_weights();
    for (slot, value) in [(2usize, -1.0f32), (3, -1e-30), (2, f32::NEG_INFINITY)] {
        let mut bad = good.clone();
        let WeightData::F32(x) = &mut bad[slot].data else {
            panic!("f32 slot expected")
        };
        x[1] = value;
        let e = opt.set_weights(&bad).unwrap_err();
        assert!(matches!(e, Error::Checkpoint(_)), "{e}");
        assert_eq!(opt.get_weights(), good);
    }
    // -0.0, +inf and NaN can all come out of steps (NaN gradients, squares that
    // overflow): they are kept.
    for value in [-0.0f32, f32::INFINITY, f32::NAN] {
        let mut ok = good.clone();
        let WeightData::F32(x) = &mut ok[2].data else {
            panic!("f32 slot expected")
        };
        x[0] = value;
        opt.set_weights(&ok).unwrap();
    }
    opt.set_weights(&good).unwrap();

    // from_bytes: the data ends with the last 4-byte tensor, `w/vhat`, the last
    // tensor of the checksum too; flipping a bit of the file's last byte changes
    // the checksum by the CRC-64/XZ table entry of that bit (the CRC is linear,
    // and no byte follows).
    let bytes = opt.to_bytes().unwrap();
    let forge = |bit: u8| -> Vec<u8> {
        let mut b = bytes.clone();
        *b.last_mut().unwrap() ^= bit;
        let mut delta = u64::from(bit);
        for _ in 0..8 {
            delta = if delta & 1 == 1 {
                (delta >> 1) ^ 0xC96C_5795_D787_0F42
            } else {
                delta >> 1
            };
        }
        let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
        let header = std::str::from_utf8(&b[8..8 + n]).unwrap().to_string();
        let at = header.find("\"checksum\":\"").unwrap() + 12;
        let old = u64::from_str_radix(&header[at..at + 16], 16).unwrap();
        let header = format!(
            "{}{:016x}{}",
            &header[..at],
            old ^ delta,
            &header[at + 16..]
        );
        b[8..8 + n].copy_from_slice(header.as_bytes());
        b
    };
    // The forgery itself works: a bit of the exponent (a positive `vhat` stays
    // positive) loads.
    let twice = LazyAdam::from_bytes(&forge(0x01)).unwrap();
    let WeightData::F32(vhat) = &twice.get_weights()[3].data else {
        panic!("f32 slot expected")
    };
    assert!(vhat[1] > 0.0);
    // The sign bit does not.
    let e = LazyAdam::from_bytes(&forge(0x80)).unwrap_err();
    assert!(matches!(e, Error::Checkpoint(_)), "{e}");
    let e = opt.restore_from_bytes(&forge(0x80)).unwrap_err();
    assert!(matches!(e, Error::Checkpoint(_)), "{e}");
    assert_eq!(opt.get_weights(), good);
}

/// `restore_by_name` keeps this optimizer's hyperparameters, the loss scale's
/// growth interval included, but took the saved count of good steps as it was:
/// restored from an optimizer with a longer interval, the count could reach
/// this one's interval, a state `to_bytes` wrote and `from_bytes` refused ("bad
/// `loss_scale` state"). The restore must give a state that saves and loads,
/// and the next good step must grow the scale (the saved count is past this
/// interval already), as a step of the restored state would.
#[test]
fn a_restored_loss_scale_saves_and_loads_under_a_shorter_growth_interval() {
    let ext = |growth_interval| {
        Extensions::default().with_non_finite(NonFinitePolicy::SkipStep {
            loss_scale: Some(DynamicLossScale {
                scale: 1024.0,
                growth_factor: 2.0,
                backoff_factor: 0.5,
                growth_interval,
            }),
        })
    };
    let build = |growth_interval| {
        let mut opt =
            LazyAdam::with_extensions(LazyAdamConfig::new(0.01), ext(growth_interval)).unwrap();
        let w = opt.add_variable("w", &[2], DType::F32, DType::F32).unwrap();
        (opt, w)
    };
    let step = |opt: &mut LazyAdam, w, p: &mut Vec<f32>| {
        opt.apply_gradients(&mut [Update::new(w, p, Gradient::dense(&[1.0f32, -1.0]))])
            .unwrap()
    };
    let (mut long, w) = build(10);
    let mut p = vec![0.5f32, 0.5];
    for _ in 0..6 {
        step(&mut long, w, &mut p);
    }
    assert_eq!(long.loss_scale(), Some(1024.0));

    let (mut short, ws) = build(4);
    let before = short.to_bytes().unwrap();
    match short.restore_from_bytes(&long.to_bytes().unwrap()) {
        Err(e) => {
            assert!(matches!(e, Error::StateMismatch { .. }), "{e}");
            assert_eq!(short.to_bytes().unwrap(), before);
        }
        Ok(()) => {
            assert_eq!(short.loss_scale(), Some(1024.0));
            let mut loaded = LazyAdam::from_bytes(&short.to_bytes().unwrap()).unwrap();
            let wl = loaded.variable_id("w").unwrap();
            let (mut p1, mut p2) = (p.clone(), p.clone());
            step(&mut short, ws, &mut p1);
            step(&mut loaded, wl, &mut p2);
            assert_eq!(short.loss_scale(), Some(2048.0));
            assert_eq!(loaded.loss_scale(), Some(2048.0));
            assert_eq!(short.get_weights(), loaded.get_weights());
        }
    }
}

/// `from_bytes` bounds what it parses: at most 64 dimensions a shape, 4 MiB of
/// configuration, a 100 MiB header. `add_variable`, `with_name` and `to_bytes`
/// knew none of these limits, so a 65-dimensional variable or an optimizer
/// named with 5 MiB of text trained and saved, and its checkpoint could not be
/// loaded. Saving must give bytes that load, or a typed error, not a file
/// nobody can read.
#[test]
fn every_checkpoint_that_saves_loads() {
    let check = |opt: &LazyAdam| match opt.to_bytes() {
        Ok(bytes) => {
            let back = LazyAdam::from_bytes(&bytes).unwrap();
            assert_eq!(back.get_weights(), opt.get_weights());
        }
        Err(e) => assert!(matches!(e, Error::Checkpoint(_)), "{e}"),
    };
    let mut deep = LazyAdam::new(LazyAdamConfig::default()).unwrap();
    if deep
        .add_variable("deep", &[1; 65], DType::F32, DType::F32)
        .is_ok()
    {
        check(&deep);
    }
    let name = "n".repeat(5 << 20);
    let named = LazyAdam::new(LazyAdamConfig::default().with_name(name)).unwrap();
    check(&named);
}
