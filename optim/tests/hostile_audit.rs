//! Hostile inputs found by an audit of the public API that the other tests did
//! not reach. Each test failed (a panic in a debug build, or a state the
//! optimizer could not read back) before the fix it comes with.

use lazyadam::{DType, Error, LazyAdam, LazyAdamConfig, ThreadCollective};

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
