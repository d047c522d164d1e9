//! The ndarray frontend against the core: same bits as calling `lazyadam` directly, and every
//! error path leaves everything unchanged.

use lazyadam::{Gradient, Update, WeightTensor};
use lazyadam_ndarray::ndarray::{Array, Array1, Array2, Array3, ArrayView1, Axis, array, s};
use lazyadam_ndarray::{
    DType, Error, Extensions, LazyAdam, LazyAdamConfig, NdElement, NdLazyAdam, NdUpdate, bf16, f16,
};

/// Deterministic pseudo-random values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
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

fn config() -> LazyAdamConfig {
    LazyAdamConfig {
        learning_rate: lazyadam::LearningRate::Constant(0.05),
        clipnorm: Some(2.0),
        ..LazyAdamConfig::default()
    }
}

fn bits<T: NdElement>(a: &[T]) -> Vec<u32> {
    a.iter().map(|x| x.to_f32().to_bits()).collect()
}

/// Trains an embedding table (sparse gradients with duplicate ids, ids of several types) and a
/// dense matrix through the frontend and through the core on plain vectors; every parameter
/// bit and every slot bit must agree after every step.
fn train_matches_core<P: NdElement>(moment: DType)
where
    for<'x> &'x mut [P]: Into<lazyadam::TensorMut<'x>>,
{
    let rows = 16;
    let dim = 5;
    let init: Vec<P> = values(rows * dim, 1).into_iter().map(P::from_f32).collect();
    let init_w: Vec<P> = values(3 * 4, 2).into_iter().map(P::from_f32).collect();

    let mut nd = NdLazyAdam::new(config()).unwrap();
    let mut table = Array2::from_shape_vec((rows, dim), init.clone()).unwrap();
    let mut w = Array2::from_shape_vec((3, 4), init_w.clone()).unwrap();
    let t_nd = nd
        .add_variable_with_moments("table", &table, moment)
        .unwrap();
    let w_nd = nd.add_variable_with_moments("w", &w, moment).unwrap();

    let mut core = LazyAdam::new(config()).unwrap();
    let t_core = core
        .add_variable("table", &[rows, dim], P::DTYPE, moment)
        .unwrap();
    let w_core = core.add_variable("w", &[3, 4], P::DTYPE, moment).unwrap();
    let mut table_v = init.clone();
    let mut w_v = init_w.clone();

    for step in 0..12u64 {
        let ids_u32: Vec<u32> = vec![
            (step % 7) as u32,
            3,
            (step * 5 % 16) as u32,
            3,
            15 - (step % 4) as u32,
        ];
        let g_rows = values(ids_u32.len() * dim, 100 + step);
        let g_w = values(12, 200 + step);
        let rows_arr = Array2::from_shape_vec((ids_u32.len(), dim), g_rows.clone()).unwrap();
        let gw_arr = Array2::from_shape_vec((3, 4), g_w.clone()).unwrap();
        // Alternate id types and single/multi-variable steps.
        match step % 3 {
            0 => {
                nd.step(&mut [
                    NdUpdate::sparse(
                        t_nd,
                        table.view_mut(),
                        ArrayView1::from(&ids_u32[..]),
                        rows_arr.view(),
                    ),
                    NdUpdate::dense(w_nd, w.view_mut(), gw_arr.view()),
                ])
                .unwrap();
            }
            1 => {
                let ids_i64: Array1<i64> = ids_u32.iter().map(|&i| i64::from(i)).collect();
                nd.step(&mut [
                    NdUpdate::dense(w_nd, w.view_mut(), gw_arr.view()),
                    NdUpdate::sparse(t_nd, table.view_mut(), ids_i64.view(), rows_arr.view()),
                ])
                .unwrap();
            }
            _ => {
                let ids_usize: Array1<usize> = ids_u32.iter().map(|&i| i as usize).collect();
                nd.step_sparse(t_nd, &mut table, &ids_usize, &rows_arr)
                    .unwrap();
            }
        }
        let mut updates = vec![Update::new(
            t_core,
            &mut table_v[..],
            Gradient::sparse(&ids_u32[..], &g_rows[..]),
        )];
        if step % 3 != 2 {
            updates.push(Update::new(w_core, &mut w_v[..], Gradient::dense(&g_w[..])));
        }
        core.apply_gradients(&mut updates).unwrap();

        assert_eq!(
            bits(table.as_slice().unwrap()),
            bits(&table_v),
            "step {step}"
        );
        assert_eq!(bits(w.as_slice().unwrap()), bits(&w_v), "step {step}");
        assert_eq!(nd.inner().get_weights(), core.get_weights(), "step {step}");
    }
    assert_eq!(nd.iterations(), 12);
    // Something was learned: the table moved.
    assert_ne!(bits(table.as_slice().unwrap()), bits(&init));
}

#[test]
fn f32_training_matches_the_core_bit_for_bit() {
    train_matches_core::<f32>(DType::F32);
}

#[test]
fn f16_training_matches_the_core_bit_for_bit() {
    train_matches_core::<f16>(DType::F32);
}

#[test]
fn bf16_training_with_bf16_moments_matches_the_core_bit_for_bit() {
    train_matches_core::<bf16>(DType::BF16);
}

#[test]
fn f16_gradients_on_f32_parameters_match_the_core() {
    let mut nd = NdLazyAdam::new(config()).unwrap();
    let mut core = LazyAdam::new(config()).unwrap();
    let mut p = Array2::<f32>::from_shape_vec((4, 3), values(12, 9)).unwrap();
    let mut pv = p.as_slice().unwrap().to_vec();
    let id = nd.add_variable("p", &p).unwrap();
    let cid = core
        .add_variable("p", &[4, 3], DType::F32, DType::F32)
        .unwrap();
    let g: Vec<f16> = values(6, 10).into_iter().map(f16::from_f32).collect();
    let g_arr = Array2::from_shape_vec((2, 3), g.clone()).unwrap();
    nd.step_sparse(id, &mut p, &array![2u64, 0], &g_arr)
        .unwrap();
    core.apply_gradients(&mut [Update::new(
        cid,
        &mut pv[..],
        Gradient::sparse(&[2u64, 0][..], &g[..]),
    )])
    .unwrap();
    assert_eq!(bits(p.as_slice().unwrap()), bits(&pv));
}

#[test]
fn strided_gradients_and_ids_give_the_same_result_as_standard_ones() {
    let run = |transposed: bool| {
        let mut opt = NdLazyAdam::new(config()).unwrap();
        let mut p = Array2::<f32>::from_shape_vec((6, 4), values(24, 3)).unwrap();
        let id = opt.add_variable("p", &p).unwrap();
        let g = Array2::from_shape_vec((6, 4), values(24, 4)).unwrap();
        // Every other element of a longer id array: a strided 1-D view.
        let ids_long = array![5u32, 99, 1, 99, 5, 99];
        let rows = Array2::from_shape_vec((3, 4), values(12, 5)).unwrap();
        if transposed {
            // The same logical gradient held transposed in memory (Fortran order).
            let gt = g.t().as_standard_layout().into_owned();
            let gt_view = gt.t();
            assert!(!gt_view.is_standard_layout());
            opt.step_dense(id, &mut p, &gt_view).unwrap();
            let rows_t = rows.t().as_standard_layout().into_owned();
            let ids = ids_long.slice(s![..;2]);
            assert!(!ids.is_standard_layout());
            assert!(!rows_t.t().is_standard_layout());
            opt.step_sparse(id, &mut p, &ids, &rows_t.t()).unwrap();
        } else {
            opt.step_dense(id, &mut p, &g).unwrap();
            opt.step_sparse(id, &mut p, &array![5u32, 1, 5], &rows)
                .unwrap();
        }
        (p, opt.inner().get_weights())
    };
    let (a, wa) = run(false);
    let (b, wb) = run(true);
    assert_eq!(bits(a.as_slice().unwrap()), bits(b.as_slice().unwrap()));
    assert_eq!(wa, wb);
}

#[test]
fn three_d_parameters_take_full_or_flat_value_rows() {
    let run = |flat: bool| {
        let mut opt = NdLazyAdam::new(config()).unwrap();
        let mut p = Array3::<f32>::from_shape_vec((5, 2, 3), values(30, 6)).unwrap();
        let id = opt.add_variable("p", &p).unwrap();
        let ids = array![4i32, 0];
        let v = values(12, 7);
        if flat {
            let rows = Array2::from_shape_vec((2, 6), v).unwrap();
            opt.step_sparse(id, &mut p, &ids, &rows).unwrap();
        } else {
            let rows = Array3::from_shape_vec((2, 2, 3), v).unwrap();
            opt.step_sparse(id, &mut p, &ids, &rows).unwrap();
        }
        p
    };
    let a = run(true);
    let b = run(false);
    assert_eq!(bits(a.as_slice().unwrap()), bits(b.as_slice().unwrap()));
    // Rows 1..4 untouched.
    let init = Array3::<f32>::from_shape_vec((5, 2, 3), values(30, 6)).unwrap();
    assert_eq!(a.index_axis(Axis(0), 2), init.index_axis(Axis(0), 2));
    assert_ne!(a.index_axis(Axis(0), 4), init.index_axis(Axis(0), 4));
}

#[test]
fn a_contiguous_row_block_of_a_bigger_array_is_a_valid_parameter() {
    let mut big = Array2::<f32>::from_shape_vec((6, 3), values(18, 8)).unwrap();
    let before = big.clone();
    let mut opt = NdLazyAdam::new(config()).unwrap();
    let id = opt.add_variable("block", &big.slice(s![2..4, ..])).unwrap();
    let g = Array2::<f32>::ones((2, 3));
    opt.step_dense(id, &mut big.slice_mut(s![2..4, ..]), &g)
        .unwrap();
    assert_eq!(big.slice(s![..2, ..]), before.slice(s![..2, ..]));
    assert_eq!(big.slice(s![4.., ..]), before.slice(s![4.., ..]));
    assert!(
        big.slice(s![2..4, ..])
            .iter()
            .zip(before.slice(s![2..4, ..]))
            .all(|(a, b)| a < b)
    );
}

// ---------------------------------------------------------------------------------------------
// Error paths: typed errors, nothing changed.

struct Fixture {
    opt: NdLazyAdam,
    table: Array2<f32>,
    bias: Array1<f32>,
    t: lazyadam_ndarray::VarId,
    b: lazyadam_ndarray::VarId,
}

/// An optimizer with two variables and one step already taken (non-zero slots).
fn fixture() -> Fixture {
    let mut opt = NdLazyAdam::with_extensions(config(), Extensions::default()).unwrap();
    let mut table = Array2::from_shape_vec((4, 3), values(12, 11)).unwrap();
    let mut bias = Array1::from(values(3, 12));
    let t = opt.add_variable("table", &table).unwrap();
    let b = opt.add_variable("bias", &bias).unwrap();
    let rows = Array2::from_shape_vec((2, 3), values(6, 13)).unwrap();
    let gb = Array1::from(values(3, 14));
    opt.step(&mut [
        NdUpdate::sparse(t, table.view_mut(), array![1u32, 2].view(), rows.view()),
        NdUpdate::dense(b, bias.view_mut(), gb.view()),
    ])
    .unwrap();
    Fixture {
        opt,
        table,
        bias,
        t,
        b,
    }
}

struct Snapshot(Vec<u32>, Vec<u32>, Vec<WeightTensor>, u64);

fn snapshot(f: &Fixture) -> Snapshot {
    Snapshot(
        bits(f.table.as_slice().unwrap()),
        bits(f.bias.as_slice().unwrap()),
        f.opt.inner().get_weights(),
        f.opt.iterations(),
    )
}

fn assert_unchanged(f: &Fixture, s: &Snapshot) {
    let now = snapshot(f);
    assert_eq!(now.0, s.0, "table changed");
    assert_eq!(now.1, s.1, "bias changed");
    assert_eq!(now.2, s.2, "optimizer state changed");
    assert_eq!(now.3, s.3, "step counter changed");
}

#[test]
fn dense_gradient_of_another_shape_with_the_same_length_is_a_shape_error() {
    let mut f = fixture();
    let s = snapshot(&f);
    let g = Array2::<f32>::ones((3, 4)); // 12 elements, like the (4, 3) table
    let e = f.opt.step_dense(f.t, &mut f.table, &g).unwrap_err();
    assert!(
        matches!(&e, Error::ShapeMismatch { what: "gradient", expected, got, .. }
            if expected == &[4, 3] && got == &[3, 4]),
        "{e:?}"
    );
    assert_unchanged(&f, &s);
}

#[test]
fn a_parameter_of_another_shape_is_a_shape_error() {
    let mut f = fixture();
    let s = snapshot(&f);
    let mut other = Array2::<f32>::zeros((3, 4));
    let g = Array2::<f32>::ones((3, 4));
    let e = f.opt.step_dense(f.t, &mut other, &g).unwrap_err();
    assert!(
        matches!(
            e,
            Error::ShapeMismatch {
                what: "parameter",
                ..
            }
        ),
        "{e:?}"
    );
    assert!(other.iter().all(|&x| x == 0.0));
    assert_unchanged(&f, &s);
}

#[test]
fn sparse_values_of_the_wrong_shape_are_shape_errors() {
    let mut f = fixture();
    let s = snapshot(&f);
    let ids = array![0u32, 1];
    for bad in [
        Array2::<f32>::ones((2, 4)), // row length 4, table rows have 3
        Array2::<f32>::ones((3, 3)), // 3 rows for 2 ids
        Array2::<f32>::ones((1, 6)), // right element count, wrong shape
    ] {
        let e = f
            .opt
            .step_sparse(f.t, &mut f.table, &ids, &bad)
            .unwrap_err();
        assert!(
            matches!(&e, Error::ShapeMismatch { what: "sparse gradient values", expected, .. }
                if expected == &[2, 3]),
            "{e:?}"
        );
        assert_unchanged(&f, &s);
    }
}

#[test]
fn a_bad_update_anywhere_in_the_step_changes_nothing() {
    let mut f = fixture();
    let s = snapshot(&f);
    let rows = Array2::<f32>::ones((1, 3));
    let bad_g = Array1::<f32>::ones(4); // bias has 3
    let e = f
        .opt
        .step(&mut [
            NdUpdate::sparse(f.t, f.table.view_mut(), array![0u32].view(), rows.view()),
            NdUpdate::dense(f.b, f.bias.view_mut(), bad_g.view()),
        ])
        .unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e:?}");
    assert_unchanged(&f, &s);
}

#[test]
fn negative_ids_are_a_typed_error() {
    let mut f = fixture();
    let s = snapshot(&f);
    let rows = Array2::<f32>::ones((2, 3));
    for ids in [array![0i64, -1], array![-5i64, 1]] {
        let e = f
            .opt
            .step_sparse(f.t, &mut f.table, &ids, &rows)
            .unwrap_err();
        assert!(
            matches!(e, Error::Core(lazyadam::Error::NegativeRowId { .. })),
            "{e:?}"
        );
        assert_unchanged(&f, &s);
    }
    let e = f
        .opt
        .step_sparse(f.t, &mut f.table, &array![1i32, -2], &rows)
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Core(lazyadam::Error::NegativeRowId { id: -2, .. })
        ),
        "{e:?}"
    );
    assert_unchanged(&f, &s);
}

#[test]
fn out_of_range_ids_are_a_typed_error() {
    let mut f = fixture();
    let s = snapshot(&f);
    let rows = Array2::<f32>::ones((2, 3));
    let e = f
        .opt
        .step_sparse(f.t, &mut f.table, &array![3u64, 4], &rows)
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Core(lazyadam::Error::RowIdOutOfRange { id: 4, rows: 4, .. })
        ),
        "{e:?}"
    );
    assert_unchanged(&f, &s);
    let e = f
        .opt
        .step_sparse(f.t, &mut f.table, &array![usize::MAX, 0], &rows)
        .unwrap_err();
    assert!(
        matches!(e, Error::Core(lazyadam::Error::RowIdOutOfRange { .. })),
        "{e:?}"
    );
    assert_unchanged(&f, &s);
}

#[test]
fn a_parameter_of_the_wrong_dtype_is_a_typed_error() {
    let mut f = fixture();
    let s = snapshot(&f);
    let mut half_table = f.table.mapv(f16::from_f32);
    let before = half_table.clone();
    let g = Array2::<f32>::ones((4, 3));
    let e = f.opt.step_dense(f.t, &mut half_table, &g).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Core(lazyadam::Error::DtypeMismatch {
                expected: DType::F32,
                got: DType::F16,
                ..
            })
        ),
        "{e:?}"
    );
    assert_eq!(half_table, before);
    assert_unchanged(&f, &s);
}

#[test]
fn transposed_and_column_sliced_parameters_are_non_contiguous_errors() {
    let mut f = fixture();
    let s = snapshot(&f);
    // The (4, 3) table stored transposed: the right shape, Fortran order.
    let mut stored_t = f.table.t().as_standard_layout().into_owned(); // (3, 4), standard
    let g = Array2::<f32>::ones((4, 3));
    let e = f
        .opt
        .step(&mut [NdUpdate::dense(
            f.t,
            stored_t.view_mut().reversed_axes(),
            g.view(),
        )])
        .unwrap_err();
    assert!(
        matches!(&e, Error::NonContiguous { what: "parameter", variable } if variable == "table"),
        "{e:?}"
    );
    assert_eq!(stored_t, f.table.t());
    assert_unchanged(&f, &s);

    // Every other column of a wider array: the right shape, strided.
    let mut wide = Array2::<f32>::zeros((4, 6));
    let e = f
        .opt
        .step(&mut [NdUpdate::dense(f.t, wide.slice_mut(s![.., ..;2]), g.view())])
        .unwrap_err();
    assert!(matches!(e, Error::NonContiguous { .. }), "{e:?}");
    assert!(wide.iter().all(|&x| x == 0.0));

    // Reversed rows: negative strides.
    let mut t2 = f.table.clone();
    let rows = Array2::<f32>::ones((1, 3));
    let e = f
        .opt
        .step(&mut [NdUpdate::sparse(
            f.t,
            t2.slice_mut(s![..;-1, ..]),
            array![0u32].view(),
            rows.view(),
        )])
        .unwrap_err();
    assert!(matches!(e, Error::NonContiguous { .. }), "{e:?}");
    assert_eq!(t2, f.table);
    assert_unchanged(&f, &s);
}

#[test]
fn unknown_variables_and_sparse_scalars_are_typed_errors() {
    let mut f = fixture();
    let s = snapshot(&f);
    // An id from an optimizer with more variables.
    let mut other = NdLazyAdam::new(config()).unwrap();
    for i in 0..3 {
        other
            .add_variable(&format!("v{i}"), &Array1::<f32>::zeros(2))
            .unwrap();
    }
    let foreign = other.variable_id("v2").unwrap();
    let g = Array2::<f32>::ones((4, 3));
    let e = f.opt.step_dense(foreign, &mut f.table, &g).unwrap_err();
    assert!(matches!(e, Error::UnknownVariable(_)), "{e:?}");
    assert_unchanged(&f, &s);

    let mut scalar = Array::from_elem((), 1.0f32);
    let sid = f.opt.add_variable("scalar", &scalar).unwrap();
    let s = snapshot(&f);
    let e = f
        .opt
        .step_sparse(sid, &mut scalar, &array![0u32], &Array1::<f32>::ones(1))
        .unwrap_err();
    assert!(matches!(e, Error::SparseScalar { .. }), "{e:?}");
    assert_eq!(scalar[()], 1.0);
    assert_unchanged(&f, &s);
    // A dense step on the scalar works.
    f.opt
        .step_dense(sid, &mut scalar, &Array::from_elem((), 0.5f32))
        .unwrap();
    assert!(scalar[()] < 1.0);
}

#[test]
fn the_same_variable_twice_in_one_step_is_an_error() {
    let mut f = fixture();
    let s = snapshot(&f);
    let mut copy = f.table.clone();
    let g = Array2::<f32>::ones((4, 3));
    let e = f
        .opt
        .step(&mut [
            NdUpdate::dense(f.t, f.table.view_mut(), g.view()),
            NdUpdate::dense(f.t, copy.view_mut(), g.view()),
        ])
        .unwrap_err();
    assert!(
        matches!(e, Error::Core(lazyadam::Error::DuplicateUpdate { .. })),
        "{e:?}"
    );
    assert_unchanged(&f, &s);
}

/// Four same-shape layers and an embedding table, trained, saved; a fresh optimizer that
/// registers them in another order gets each one's own moments back, by name.
#[test]
fn state_by_name_restores_each_variables_own_moments() {
    let names = ["l0", "l1", "l2", "l3"];
    let mut layers: Vec<Array2<f32>> = (0..4).map(|_| Array2::zeros((3, 3))).collect();
    let mut emb = Array2::<f32>::zeros((6, 2));
    let mut opt = NdLazyAdam::new(config()).unwrap();
    let ids: Vec<VarIdOf> = names
        .iter()
        .zip(&layers)
        .map(|(n, l)| opt.add_variable(n, l).unwrap())
        .collect();
    let e = opt.add_variable("emb", &emb).unwrap();
    for s in 0..3 {
        for (i, (l, &id)) in layers.iter_mut().zip(&ids).enumerate() {
            let g = Array2::from_shape_vec((3, 3), values(9, (10 * i + s) as u64)).unwrap();
            opt.step_dense(id, l, &g).unwrap();
        }
        opt.step_sparse(
            e,
            &mut emb,
            &array![s as u32, 5],
            &array![[0.1f32, 0.2], [0.3, 0.4]],
        )
        .unwrap();
    }
    let bytes = opt.to_bytes().unwrap();
    let m = |o: &NdLazyAdam, n: &str| {
        o.inner()
            .slots(o.variable_id(n).unwrap())
            .unwrap()
            .m
            .to_f32_vec()
    };
    let mut resumed = NdLazyAdam::new(config()).unwrap();
    resumed.add_variable("emb", &emb).unwrap();
    for n in names.iter().rev() {
        resumed.add_variable(n, &layers[0]).unwrap();
    }
    resumed.load_state_bytes(&bytes).unwrap();
    assert_eq!(resumed.iterations(), opt.iterations());
    for n in names.iter().chain(&["emb"]) {
        assert_eq!(bits(&m(&resumed, n)), bits(&m(&opt, n)), "{n}");
    }
    assert_ne!(m(&opt, "l0"), m(&opt, "l3"));

    // A file round trip, and file errors that name the path.
    let dir = std::env::temp_dir().join(format!("nd-by-name-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("opt.safetensors");
    opt.save(&path).unwrap();
    let mut again = NdLazyAdam::new(config()).unwrap();
    for n in names {
        again.add_variable(n, &layers[0]).unwrap();
    }
    again.add_variable("emb", &emb).unwrap();
    again.load_state(&path).unwrap();
    assert_eq!(bits(&m(&again, "l2")), bits(&m(&opt, "l2")));
    let missing = dir.join("missing.safetensors");
    let err = again.load_state(&missing).unwrap_err();
    assert!(err.to_string().contains("missing.safetensors"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();

    // A mismatch names the variable and changes nothing.
    let mut other = NdLazyAdam::new(config()).unwrap();
    for n in names {
        other.add_variable(n, &layers[0]).unwrap();
    }
    other
        .add_variable("emb", &Array2::<f32>::zeros((7, 2)))
        .unwrap();
    let before = other.inner().get_weights();
    let err = other.load_state_bytes(&bytes).unwrap_err();
    assert!(
        matches!(&err, Error::Core(lazyadam::Error::StateMismatch { variable, .. }) if variable == "emb"),
        "{err:?}"
    );
    assert_eq!(other.inner().get_weights(), before);
    assert_eq!(other.iterations(), 0);
}

type VarIdOf = lazyadam_ndarray::VarId;

/// Zero-width variables are accepted, as in the core: a step through them writes nothing,
/// and their ids are still checked.
#[test]
fn zero_width_variables_are_no_ops_with_checked_ids() {
    let mut opt = NdLazyAdam::new(config()).unwrap();
    let mut a = Array1::<f32>::from(vec![1.0, 2.0]);
    let mut b = Array2::<f32>::zeros((5, 0));
    let va = opt.add_variable("a", &a).unwrap();
    let vb = opt.add_variable("b", &b).unwrap();
    let ga = array![0.5f32, -0.5];
    let gb = Array2::<f32>::zeros((1, 0));
    let outcome = opt
        .step(&mut [
            NdUpdate::dense(va, a.view_mut(), ga.view()),
            NdUpdate::sparse(vb, b.view_mut(), array![1u32].view(), gb.view()),
        ])
        .unwrap();
    assert_eq!(outcome, lazyadam_ndarray::StepOutcome::Applied);
    assert_eq!(opt.iterations(), 1);
    assert_ne!(a[0], 1.0);
    // An id beyond the 5 rows is still an error, and nothing is written.
    let before = a.clone();
    let err = opt
        .step(&mut [
            NdUpdate::dense(va, a.view_mut(), ga.view()),
            NdUpdate::sparse(vb, b.view_mut(), array![5u32].view(), gb.view()),
        ])
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Core(lazyadam::Error::RowIdOutOfRange { id: 5, rows: 5, .. })
        ),
        "{err:?}"
    );
    assert_eq!(a, before);
    assert_eq!(opt.iterations(), 1);
}

/// Everything a user configures with is reachable from this crate (this test only compiles
/// if the re-exports exist), and builders give the same config as the struct literal.
#[test]
fn configuration_types_are_re_exported() {
    use lazyadam_ndarray::{
        BiasCorrection, DynamicLossScale, Isa, LearningRate, NonFinitePolicy, Schedule,
    };
    let c = LazyAdamConfig::new(Schedule::PiecewiseConstantDecay {
        boundaries: vec![10.0],
        values: vec![0.1, 0.01],
    });
    assert!(matches!(c.learning_rate, LearningRate::Schedule(_)));
    let ext = Extensions::default()
        .with_kernel(Some(Isa::Scalar))
        .with_bias_correction(BiasCorrection::F64)
        .with_non_finite(NonFinitePolicy::SkipStep {
            loss_scale: Some(DynamicLossScale::default()),
        });
    let opt = NdLazyAdam::with_extensions(c, ext).unwrap();
    assert_eq!(opt.learning_rate(), 0.1);
}
