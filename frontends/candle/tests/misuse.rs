//! Issue 13 (the candle part): a frontend users cannot misuse. One section per finding.

use candle_core::{DType as CDType, Device, Module, Tensor, Var};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use lazyadam_candle::{
    Config, Error, Extensions, LazyAdamOptimizer, SparseEmbedding, SparseGrad, TensorRef,
};

fn dev() -> Device {
    Device::Cpu
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(CDType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

// -------------------------------------------------------------------------------------------
// Finding 5: zero-width variables.

#[test]
fn zero_width_variables_are_accepted_and_their_steps_are_no_ops() {
    let d = dev();
    let empty = Var::zeros((5, 0), CDType::F32, &d).unwrap();
    let w = Var::ones(3, CDType::F32, &d).unwrap();
    let mut opt = LazyAdamOptimizer::new_named(
        [("empty", empty.clone()), ("w", w.clone())],
        Config::new(0.1).unwrap(),
    )
    .unwrap();
    // Dense: a loss over both variables.
    let loss = empty
        .as_tensor()
        .sum_all()
        .unwrap()
        .add(&w.as_tensor().sum_all().unwrap())
        .unwrap();
    opt.try_backward_step(&loss).unwrap();
    assert_eq!(opt.inner().iterations(), 1);
    assert_eq!(empty.dims(), [5, 0]);
    assert!(w.as_tensor().to_vec1::<f32>().unwrap()[0] < 1.0);
    // Sparse: rows of a zero-width table.
    let ids = Tensor::new(&[1u32, 4], &d).unwrap();
    let rows = Tensor::zeros((2, 0), CDType::F32, &d).unwrap();
    opt.step_sparse(&[SparseGrad::new(&empty, &ids, &rows)])
        .unwrap();
    assert_eq!(opt.inner().iterations(), 2);
}

#[test]
fn zero_width_variables_work_in_lazy_mode_and_f16() {
    let d = dev();
    let empty = Var::from_tensor(&Tensor::zeros((4, 0), CDType::F16, &d).unwrap()).unwrap();
    let mut opt = LazyAdamOptimizer::new_named(
        [("empty", empty.clone())],
        Config::new(0.1)
            .unwrap()
            .with_dense_gradients(lazyadam_candle::DenseGradients::LazyRows),
    )
    .unwrap();
    let loss = empty
        .as_tensor()
        .to_dtype(CDType::F32)
        .unwrap()
        .sum_all()
        .unwrap();
    opt.try_backward_step(&loss).unwrap();
    assert_eq!(opt.inner().iterations(), 1);
}

// -------------------------------------------------------------------------------------------
// Finding 3: f64 learning rate, checked conversion, builders, re-exports.

#[test]
fn config_new_takes_an_f64_and_rejects_what_does_not_fit_an_f32() {
    let c = Config::new(1e-3).unwrap();
    assert_eq!(
        c.optimizer.learning_rate,
        lazyadam_candle::LearningRate::Constant(1e-3)
    );
    for (bad, why) in [
        (1e40, "fit"),
        (-0.5, "negative"),
        (f64::NAN, "NaN"),
        (f64::INFINITY, "finite"),
        (1e-60, "zero"),
    ] {
        let err = Config::new(bad).unwrap_err();
        let Error::InvalidHyperparameter { name, value, .. } = &err else {
            panic!("typed error expected for {bad}, got {err:?}")
        };
        assert_eq!(*name, "learning_rate");
        assert!(value.to_bits() == bad.to_bits());
        assert!(err.to_string().contains(why), "{err}");
    }
    // Zero is a valid (if useless) learning rate.
    assert!(Config::new(0.0).is_ok());
}

#[test]
fn config_builders_set_the_knobs_and_check_them() {
    let c = Config::new(0.01)
        .unwrap()
        .with_betas(0.8, 0.99)
        .unwrap()
        .with_epsilon(1e-8)
        .unwrap()
        .with_weight_decay(0.05)
        .unwrap()
        .with_clipnorm(2.0)
        .unwrap()
        .with_clipvalue(0.5)
        .unwrap()
        .with_amsgrad(true);
    assert_eq!(c.optimizer.beta_1, 0.8);
    assert_eq!(c.optimizer.beta_2, 0.99);
    assert_eq!(c.optimizer.epsilon, 1e-8);
    assert_eq!(c.extensions.weight_decay, 0.05);
    assert_eq!(c.optimizer.clipnorm, Some(2.0));
    assert_eq!(c.optimizer.clipvalue, Some(0.5));
    assert!(c.optimizer.amsgrad);
    // Out of range for the optimizer (beta in [0, 1)): the core's error names the key.
    let err = Config::new(0.01).unwrap().with_betas(1.0, 0.9).unwrap_err();
    assert!(err.to_string().contains("beta_1"), "{err}");
    // clipnorm and global_clipnorm together are refused.
    let err = c.clone().with_global_clipnorm(1.0).unwrap_err();
    assert!(matches!(err, Error::Core(_)), "{err:?}");
    let err = Config::new(0.01).unwrap().with_epsilon(1e300).unwrap_err();
    assert!(matches!(
        err,
        Error::InvalidHyperparameter {
            name: "epsilon",
            ..
        }
    ));
    // A schedule through the re-exported type.
    let s = lazyadam_candle::Schedule::ExponentialDecay {
        initial_learning_rate: 0.1,
        decay_steps: 10.0,
        decay_rate: 0.5,
        staircase: true,
    };
    let c = Config::new(0.01).unwrap().with_schedule(s).unwrap();
    let v = Var::zeros(2, CDType::F32, &dev()).unwrap();
    let opt = LazyAdamOptimizer::new_named([("v", v)], c).unwrap();
    assert_eq!(opt.learning_rate(), 0.1f32 as f64);
}

#[test]
fn config_from_adamw_carries_candles_parameters() {
    let p = candle_nn::ParamsAdamW {
        lr: 0.002,
        beta1: 0.85,
        beta2: 0.995,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let c = Config::from_adamw(&p).unwrap();
    assert_eq!(
        c.optimizer.learning_rate,
        lazyadam_candle::LearningRate::Constant(0.002)
    );
    assert_eq!(
        (c.optimizer.beta_1, c.optimizer.beta_2, c.optimizer.epsilon),
        (0.85, 0.995, 1e-8)
    );
    assert_eq!(c.extensions.weight_decay, 0.1);
    let bad = candle_nn::ParamsAdamW { lr: -1.0, ..p };
    assert!(Config::from_adamw(&bad).is_err());
    let _: Extensions = c.extensions;
}

// -------------------------------------------------------------------------------------------
// Finding 4: `Optimizer::set_learning_rate` with an invalid value.

#[test]
fn a_rejected_set_learning_rate_is_observable_and_stops_steps_until_cleared() {
    let d = dev();
    let w = Var::ones(3, CDType::F32, &d).unwrap();
    let mut opt =
        LazyAdamOptimizer::new_named([("w", w.clone())], Config::new(0.25).unwrap()).unwrap();
    assert!(opt.last_error().is_none());
    opt.set_learning_rate(-1.0);
    assert_eq!(opt.learning_rate(), 0.25); // unchanged
    let err = opt.last_error().expect("the rejection is kept");
    assert!(matches!(err, Error::RejectedLearningRate { value, .. } if value == -1.0));
    // The next step fails, through the trait too, and changes nothing.
    let before = bits(w.as_tensor());
    let loss = w.as_tensor().sum_all().unwrap();
    let e = opt.backward_step(&loss).unwrap_err();
    assert!(matches!(
        Error::from_candle(&e),
        Some(Error::RejectedLearningRate { .. })
    ));
    assert_eq!(bits(w.as_tensor()), before);
    assert_eq!(opt.inner().iterations(), 0);
    // take_error clears it: steps run again with the old learning rate.
    assert!(opt.take_error().is_some());
    assert!(opt.take_error().is_none());
    opt.backward_step(&loss).unwrap();
    assert_eq!(opt.inner().iterations(), 1);
    // A value that does not fit an f32 is rejected too (not rounded to infinity) ...
    opt.set_learning_rate(1e300);
    assert_eq!(opt.learning_rate(), 0.25);
    assert!(opt.last_error().is_some());
    // ... and a valid value clears the rejection.
    opt.set_learning_rate(0.5);
    assert!(opt.last_error().is_none());
    assert_eq!(opt.learning_rate(), 0.5);
    // try_set_learning_rate takes an f64 and returns the error at once.
    let e = opt.try_set_learning_rate(f64::NAN).unwrap_err();
    assert!(matches!(
        e,
        Error::InvalidHyperparameter {
            name: "learning_rate",
            ..
        }
    ));
    assert!(opt.last_error().is_none());
    assert_eq!(opt.learning_rate(), 0.5);
}

// -------------------------------------------------------------------------------------------
// Finding 2: sparse gradient rows out of candle's autograd.

fn seeded(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 23) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// loss = sum(tanh(rows @ w)^2) over rows of shape (.., 4).
fn head(rows: &Tensor, w: &Var) -> Tensor {
    rows.broadcast_matmul(w.as_tensor())
        .unwrap()
        .tanh()
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
}

#[test]
fn sparse_embedding_gradient_rows_equal_the_rows_of_the_dense_gradient() {
    let d = dev();
    let table = Var::from_vec(seeded(20 * 4, 1), (20, 4), &d).unwrap();
    let w = Var::from_vec(seeded(4 * 3, 2), (4, 3), &d).unwrap();
    let emb = SparseEmbedding::new("table", table.clone()).unwrap();
    // Unique ids, rank 2 (as a (batch, seq) input).
    let ids = Tensor::new(&[[3u32, 11, 0], [19, 7, 5]], &d).unwrap();

    // Ordinary way: candle's embedding on the table Var -> dense gradient of the table.
    let flat = ids.flatten_all().unwrap();
    let dense_rows = table
        .as_tensor()
        .embedding(&flat)
        .unwrap()
        .reshape((2, 3, 4))
        .unwrap();
    let dense = head(&dense_rows, &w).backward().unwrap();
    let g_table = dense.get(table.as_tensor()).unwrap();
    let g_w_dense = dense.get(w.as_tensor()).unwrap();

    // Sparse way.
    let rows = emb.forward(&ids).unwrap();
    assert_eq!(rows.dims(), [2, 3, 4]);
    assert_eq!(emb.pending_lookups(), 1);
    let grads = head(&rows, &w).backward().unwrap();
    assert!(grads.get(table.as_tensor()).is_none()); // no dense table gradient
    let sparse = emb.take_sparse_grad(&grads).unwrap();
    assert_eq!(emb.pending_lookups(), 0);
    assert_eq!(sparse.ids().to_vec1::<u32>().unwrap(), [3, 11, 0, 19, 7, 5]);
    assert_eq!(sparse.values().dims(), [6, 4]);
    let expected = g_table.index_select(sparse.ids(), 0).unwrap();
    assert_eq!(bits(sparse.values()), bits(&expected));
    // Rows not looked up have a zero dense gradient, so nothing is lost.
    assert!(
        g_table
            .get(1)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|&x| x == 0.0)
    );
    // The dense head gradient is the same either way.
    assert_eq!(bits(grads.get(w.as_tensor()).unwrap()), bits(g_w_dense));
}

#[test]
fn sparse_embedding_duplicates_sum_to_the_dense_gradient_row() {
    let d = dev();
    let table = Var::from_vec(seeded(10 * 4, 3), (10, 4), &d).unwrap();
    let w = Var::from_vec(seeded(4 * 2, 4), (4, 2), &d).unwrap();
    let emb = SparseEmbedding::new("table", table.clone()).unwrap();
    let ids = Tensor::new(&[2i64, 6, 2], &d).unwrap();
    let dense = head(&table.as_tensor().embedding(&ids).unwrap(), &w)
        .backward()
        .unwrap();
    let g_table = dense
        .get(table.as_tensor())
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let grads = head(&emb.forward(&ids).unwrap(), &w).backward().unwrap();
    let sparse = emb.take_sparse_grad(&grads).unwrap();
    let v = sparse.values().to_vec2::<f32>().unwrap();
    for j in 0..4 {
        assert!((v[0][j] + v[2][j] - g_table[2][j]).abs() <= 1e-6);
        assert_eq!(v[1][j].to_bits(), g_table[6][j].to_bits());
    }
}

#[test]
fn a_step_through_sparse_embedding_equals_a_hand_built_sparse_grad_step() {
    let d = dev();
    let run = |through_piece: bool| -> (Vec<u32>, Vec<u32>) {
        let table = Var::from_vec(seeded(16 * 4, 5), (16, 4), &d).unwrap();
        let w = Var::from_vec(seeded(4 * 3, 6), (4, 3), &d).unwrap();
        let mut opt = LazyAdamOptimizer::new_named(
            [("table", table.clone()), ("w", w.clone())],
            Config::new(0.05).unwrap(),
        )
        .unwrap();
        let emb = SparseEmbedding::new("table", table.clone()).unwrap();
        for step in 0..3u32 {
            let ids_a = Tensor::new(&[step, 9, step + 4], &d).unwrap();
            let ids_b = Tensor::new(&[[9u32, 15]], &d).unwrap();
            if through_piece {
                // Two lookups in one forward pass.
                let a = emb.forward(&ids_a).unwrap();
                let b = emb.forward(&ids_b).unwrap().squeeze(0).unwrap();
                let loss = head(&a, &w).add(&head(&b, &w)).unwrap();
                let grads = loss.backward().unwrap();
                let sg = emb.take_sparse_grad(&grads).unwrap();
                opt.step_mixed(&grads, &[sg.as_sparse_grad()]).unwrap();
            } else {
                // By hand: detached rows wrapped in Vars, gradients gathered manually.
                let ra = Var::from_tensor(&table.as_tensor().embedding(&ids_a).unwrap().detach())
                    .unwrap();
                let flat_b = ids_b.flatten_all().unwrap();
                let rb = Var::from_tensor(&table.as_tensor().embedding(&flat_b).unwrap().detach())
                    .unwrap();
                let loss = head(ra.as_tensor(), &w)
                    .add(&head(rb.as_tensor(), &w))
                    .unwrap();
                let grads = loss.backward().unwrap();
                let ids = Tensor::cat(&[&ids_a, &flat_b], 0).unwrap();
                let values = Tensor::cat(
                    &[
                        grads.get(ra.as_tensor()).unwrap(),
                        grads.get(rb.as_tensor()).unwrap(),
                    ],
                    0,
                )
                .unwrap();
                opt.step_mixed(&grads, &[SparseGrad::new(&table, &ids, &values)])
                    .unwrap();
            }
        }
        (bits(table.as_tensor()), bits(w.as_tensor()))
    };
    let (t1, w1) = run(true);
    let (t2, w2) = run(false);
    assert_eq!(t1, t2);
    assert_eq!(w1, w2);
    // And the table did move (rows 9 and 15 at least).
    let start: Vec<u32> = seeded(16 * 4, 5).iter().map(|x| x.to_bits()).collect();
    assert_ne!(t1[9 * 4..10 * 4], start[9 * 4..10 * 4]);
    assert_eq!(t1[12 * 4..13 * 4], start[12 * 4..13 * 4]); // never looked up
}

#[test]
fn sparse_embedding_refuses_bad_ids_with_typed_errors_and_records_nothing() {
    let d = dev();
    let table = Var::zeros((5, 2), CDType::F32, &d).unwrap();
    let emb = SparseEmbedding::new("tab", table).unwrap();
    let e = emb
        .forward(&Tensor::new(&[1u32, 5], &d).unwrap())
        .unwrap_err();
    assert!(
        matches!(
            &e,
            Error::Core(lazyadam_candle::lazyadam::Error::RowIdOutOfRange { id: 5, .. })
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("tab"));
    let e = emb
        .forward(&Tensor::new(&[-1i64], &d).unwrap())
        .unwrap_err();
    assert!(matches!(
        &e,
        Error::Core(lazyadam_candle::lazyadam::Error::NegativeRowId { id: -1, .. })
    ));
    let e = emb.forward(&Tensor::new(&[1f32], &d).unwrap()).unwrap_err();
    assert!(matches!(&e, Error::UnsupportedDType { .. }));
    assert_eq!(emb.pending_lookups(), 0);
    // Not a table.
    let v = Var::zeros(5, CDType::F32, &d).unwrap();
    assert!(matches!(
        SparseEmbedding::new("v", v),
        Err(Error::ShapeMismatch { .. })
    ));
    // A lookup the loss does not use contributes nothing; clear() forgets lookups.
    let _ = emb.forward(&Tensor::new(&[1u32], &d).unwrap()).unwrap();
    let unrelated = Var::ones(1, CDType::F32, &d).unwrap();
    let grads = unrelated.as_tensor().sum_all().unwrap().backward().unwrap();
    let sg = emb.take_sparse_grad(&grads).unwrap();
    assert_eq!(sg.ids().dims(), [0]);
    let _ = emb.lookup(&Tensor::new(&[1u32], &d).unwrap()).unwrap();
    assert_eq!(emb.pending_lookups(), 0);
    let _ = emb.forward(&Tensor::new(&[1u32], &d).unwrap()).unwrap();
    emb.clear();
    assert_eq!(emb.pending_lookups(), 0);
}

#[test]
fn sparse_embedding_from_a_varbuilder_is_in_the_varmap_under_its_name() {
    let d = dev();
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, CDType::F32, &d);
    let emb = SparseEmbedding::from_varbuilder(7, 3, vb.pp("emb")).unwrap();
    let out = Module::forward(&emb, &Tensor::new(&[6u32], &d).unwrap()).unwrap();
    assert_eq!(out.dims(), [1, 3]);
    let opt = LazyAdamOptimizer::from_varmap(&vm, Config::new(0.1).unwrap()).unwrap();
    assert_eq!(opt.var_names(), ["emb.weight"]);
    assert!(opt.var_id(emb.table()).is_some());
    // A VarBuilder without a VarMap gives constants: refused.
    let vb0 = VarBuilder::zeros(CDType::F32, &d);
    assert!(matches!(
        SparseEmbedding::from_varbuilder(7, 3, vb0.pp("e")),
        Err(Error::NotAVariable { .. })
    ));
}

// -------------------------------------------------------------------------------------------
// Finding 1: checkpoints restore each variable's own moments, by name.

struct Model {
    vm: VarMap,
    emb: SparseEmbedding,
    layers: Vec<candle_nn::Linear>,
}

/// Four 8x8 linear layers `l0..l3` and an embedding table `emb` (30 x 8), built in `order`
/// (layer indices; the table first or last). `widths[i]` is layer i's output width.
fn model(order: &[usize], table_first: bool, widths: [usize; 5], seed: u64) -> Model {
    let d = dev();
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, CDType::F32, &d);
    let mk_emb = || SparseEmbedding::from_varbuilder(30, 8, vb.pp("emb")).unwrap();
    let mut emb = table_first.then(mk_emb);
    let mut layers: Vec<Option<candle_nn::Linear>> = (0..5).map(|_| None).collect();
    for &i in order {
        layers[i] = Some(candle_nn::linear(8, widths[i], vb.pp(format!("l{i}"))).unwrap());
    }
    if emb.is_none() {
        emb = Some(mk_emb());
    }
    // Deterministic values, by name (whatever the build order).
    {
        let data = vm.data().lock().unwrap();
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        for (k, name) in names.into_iter().enumerate() {
            let v = &data[name];
            let t =
                Tensor::from_vec(seeded(v.elem_count(), seed + k as u64), v.dims(), &d).unwrap();
            v.set(&t).unwrap();
        }
    }
    Model {
        vm,
        emb: emb.unwrap(),
        layers: layers.into_iter().flatten().collect(),
    }
}

fn train(m: &Model, opt: &mut LazyAdamOptimizer, steps: u32) {
    let d = dev();
    for s in 0..steps {
        let ids = Tensor::new(&[s % 30, (7 * s + 3) % 30, 11], &d).unwrap();
        let mut h = m.emb.forward(&ids).unwrap();
        for l in &m.layers {
            h = l.forward(&h).unwrap().tanh().unwrap();
        }
        let loss = h.sqr().unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let sg = m.emb.take_sparse_grad(&grads).unwrap();
        opt.step_mixed(&grads, &[sg.as_sparse_grad()]).unwrap();
    }
}

fn m_bits(opt: &LazyAdamOptimizer, name: &str) -> Vec<u32> {
    let id = opt.var_id_by_name(name).unwrap();
    let slots = opt.inner().slots(id).unwrap();
    let TensorRef::F32(m) = slots.m else {
        panic!("f32 moments")
    };
    m.iter().map(|x| x.to_bits()).collect()
}

const SQUARE: [usize; 5] = [8; 5];

#[test]
fn from_varmap_registers_the_varmaps_names_in_sorted_order() {
    let a = model(&[0, 1, 2, 3], true, SQUARE, 1);
    let b = model(&[3, 2, 1, 0], false, SQUARE, 1);
    let cfg = Config::new(0.01).unwrap();
    let oa = LazyAdamOptimizer::from_varmap(&a.vm, cfg.clone()).unwrap();
    let ob = LazyAdamOptimizer::from_varmap(&b.vm, cfg).unwrap();
    let expected = [
        "emb.weight",
        "l0.bias",
        "l0.weight",
        "l1.bias",
        "l1.weight",
        "l2.bias",
        "l2.weight",
        "l3.bias",
        "l3.weight",
    ];
    assert_eq!(oa.var_names(), expected);
    assert_eq!(ob.var_names(), expected);
}

#[test]
fn a_checkpoint_restores_each_layers_own_moments_in_a_model_built_in_another_order() {
    let dir = std::env::temp_dir().join(format!("lazyadam-candle-i13-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (params, state) = (dir.join("model.safetensors"), dir.join("optim.safetensors"));
    let cfg = Config::new(0.01).unwrap();

    // Process 1: train, save parameters and optimizer state.
    let a = model(&[0, 1, 2, 3], true, SQUARE, 1);
    let mut oa = LazyAdamOptimizer::from_varmap(&a.vm, cfg.clone()).unwrap();
    train(&a, &mut oa, 4);
    a.vm.save(&params).unwrap();
    oa.save(&state).unwrap();
    // The four layers' moments differ from each other (so a mix-up would show).
    for i in 0..4 {
        for j in i + 1..4 {
            assert_ne!(
                m_bits(&oa, &format!("l{i}.weight")),
                m_bits(&oa, &format!("l{j}.weight"))
            );
        }
    }

    // "Process 2": the same model built in reverse order, other initial values.
    let mut b = model(&[3, 2, 1, 0], false, SQUARE, 99);
    b.vm.load(&params).unwrap();
    let mut ob = LazyAdamOptimizer::from_varmap(&b.vm, cfg.clone()).unwrap();
    ob.load_state(&state).unwrap();
    assert_eq!(ob.inner().iterations(), 4);
    for name in oa.var_names() {
        assert_eq!(m_bits(&ob, name), m_bits(&oa, name), "{name}");
    }
    // In memory, too.
    let mut oc = LazyAdamOptimizer::from_varmap(&b.vm, cfg.clone()).unwrap();
    oc.load_state_bytes(&oa.to_bytes().unwrap()).unwrap();
    assert_eq!(oc.to_bytes().unwrap(), oa.to_bytes().unwrap());

    // Training on gives the same parameters as the uninterrupted run.
    train(&a, &mut oa, 2);
    train(&b, &mut ob, 2);
    for (name, va) in a.vm.data().lock().unwrap().iter() {
        let vb = b.vm.data().lock().unwrap()[name].clone();
        assert_eq!(bits(va.as_tensor()), bits(vb.as_tensor()), "{name}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The old trap, kept as documented: positional names (`Optimizer::new`) follow the order of
/// the list, so a list in another order (as `VarMap::all_vars()` gives in another process)
/// silently restores another layer's moments when the shapes agree.
#[test]
fn positional_names_restore_another_layers_moments_when_the_order_changes() {
    let cfg = Config::new(0.01).unwrap();
    let weight = |m: &Model, i: usize| m.vm.data().lock().unwrap()[&format!("l{i}.weight")].clone();
    let layer_vars = |m: &Model, order: &[usize]| -> Vec<Var> {
        let data = m.vm.data().lock().unwrap();
        order
            .iter()
            .flat_map(|i| {
                [
                    data[&format!("l{i}.weight")].clone(),
                    data[&format!("l{i}.bias")].clone(),
                ]
            })
            .collect()
    };
    // Process 1: the four layers, positionally, trained on a dense loss.
    let a = model(&[0, 1, 2, 3], true, SQUARE, 1);
    let mut pos = LazyAdamOptimizer::new(layer_vars(&a, &[0, 1, 2, 3]), cfg.clone()).unwrap();
    assert_eq!(pos.var_names()[..2], ["var0", "var1"]);
    let x = Tensor::from_vec(seeded(16, 7), (2, 8), &dev()).unwrap();
    for _ in 0..3 {
        let mut h = x.clone();
        for l in &a.layers {
            h = l.forward(&h).unwrap().tanh().unwrap();
        }
        pos.backward_step(&h.sqr().unwrap().sum_all().unwrap())
            .unwrap();
    }
    let bytes = pos.to_bytes().unwrap();
    let m_of = |o: &LazyAdamOptimizer, v: &Var| {
        o.inner()
            .slots(o.var_id(v).unwrap())
            .unwrap()
            .m
            .to_f32_vec()
    };
    let (a_l0, a_l3) = (m_of(&pos, &weight(&a, 0)), m_of(&pos, &weight(&a, 3)));
    assert_ne!(a_l0, a_l3);

    // "Process 2": the list in another order. The load succeeds (every position has the
    // same shape), and l3.weight silently gets l0.weight's moments.
    let b = model(&[0, 1, 2, 3], true, SQUARE, 1);
    let mut pos_b = LazyAdamOptimizer::new(layer_vars(&b, &[3, 2, 1, 0]), cfg.clone()).unwrap();
    pos_b.load_state_bytes(&bytes).unwrap();
    let b_l3 = m_of(&pos_b, &weight(&b, 3));
    assert_eq!(b_l3, a_l0);
    assert_ne!(b_l3, a_l3);

    // A positional checkpoint loaded into an optimizer built by name is refused (the names
    // differ), not mixed up.
    let mut named = LazyAdamOptimizer::from_varmap(&b.vm, cfg).unwrap();
    let e = named.load_state_bytes(&bytes).unwrap_err();
    assert!(matches!(
        e,
        Error::Core(lazyadam_candle::lazyadam::Error::StateMismatch { .. })
    ));
    assert_eq!(named.inner().iterations(), 0);
}

#[test]
fn a_mismatched_missing_or_extra_variable_is_an_error_naming_it_and_changes_nothing() {
    let cfg = Config::new(0.01).unwrap();
    let a = model(&[0, 1, 2, 3], true, SQUARE, 1);
    let mut oa = LazyAdamOptimizer::from_varmap(&a.vm, cfg.clone()).unwrap();
    train(&a, &mut oa, 2);
    let bytes = oa.to_bytes().unwrap();

    let check = |m: Model, expected: &str| {
        let mut o = LazyAdamOptimizer::from_varmap(&m.vm, cfg.clone()).unwrap();
        train(&m, &mut o, 1);
        let before = o.to_bytes().unwrap();
        let e = o.load_state_bytes(&bytes).unwrap_err();
        match &e {
            Error::Core(lazyadam_candle::lazyadam::Error::StateMismatch { variable, .. }) => {
                assert_eq!(variable, expected, "{e}")
            }
            other => panic!("StateMismatch expected, got {other:?}"),
        }
        assert!(e.to_string().contains(expected));
        assert_eq!(o.to_bytes().unwrap(), before, "nothing changed");
        assert_eq!(o.inner().iterations(), 1);
    };
    // A layer of another shape (l3: 8 -> 6).
    check(model(&[3, 2, 1, 0], false, [8, 8, 8, 6, 8], 5), "l3.bias");
    // A missing variable (no l2 here; the saved state has it).
    check(model(&[0, 1, 3], true, SQUARE, 5), "l2.bias");
    // An extra variable (l4 here; the saved state does not have it).
    check(model(&[4, 0, 1, 2, 3], true, SQUARE, 5), "l4.bias");
    // A file that does not exist: an error naming the path, nothing changed.
    let mut o = LazyAdamOptimizer::from_varmap(&a.vm, cfg.clone()).unwrap();
    let e = o
        .load_state("/nonexistent/lazyadam/optim.safetensors")
        .unwrap_err();
    assert!(e.to_string().contains("/nonexistent/lazyadam"), "{e}");
    assert_eq!(o.inner().iterations(), 0);
}

#[test]
fn sparse_embedding_lookups_with_different_id_dtypes_are_collected_together() {
    let d = dev();
    let table = Var::from_vec(seeded(6 * 2, 8), (6, 2), &d).unwrap();
    let emb = SparseEmbedding::new("t", table.clone()).unwrap();
    let a = emb.forward(&Tensor::new(&[5u8, 1], &d).unwrap()).unwrap();
    let b = emb.forward(&Tensor::new(&[3i64], &d).unwrap()).unwrap();
    let loss = a
        .sum_all()
        .unwrap()
        .add(&b.affine(2.0, 0.0).unwrap().sum_all().unwrap())
        .unwrap();
    let grads = loss.backward().unwrap();
    let sg = emb.take_sparse_grad(&grads).unwrap();
    assert_eq!(sg.ids().dtype(), CDType::I64);
    assert_eq!(sg.ids().to_vec1::<i64>().unwrap(), [5, 1, 3]);
    assert_eq!(
        sg.values().to_vec2::<f32>().unwrap(),
        [[1.0, 1.0], [1.0, 1.0], [2.0, 2.0]]
    );
    // The rows are the table's rows.
    assert_eq!(
        bits(&a),
        bits(&table.as_tensor().get(5).unwrap())
            .into_iter()
            .chain(bits(&table.as_tensor().get(1).unwrap()))
            .collect::<Vec<_>>()
    );
}
