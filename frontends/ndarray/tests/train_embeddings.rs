//! Runs the `train_embeddings` example's training code at a small size: the held-out loss
//! after training must be clearly below the loss at the start, for LazyAdam on sparse gradients
//! and for Adam on dense gradients.

#[allow(dead_code)]
#[path = "../examples/train_embeddings/mf.rs"]
mod mf;

use lazyadam_ndarray::{NdElement, bf16};
use mf::{DataConfig, Mode, TrainConfig};

fn small() -> (mf::Dataset, TrainConfig) {
    let data = mf::generate(&DataConfig {
        users: 2_000,
        items: 1_000,
        rank: 4,
        train: 40_000,
        test: 4_000,
        zipf: 1.05,
        noise: 0.1,
        seed: 3,
    });
    let config = TrainConfig {
        dim: 8,
        epochs: 4,
        batch: 256,
        ..TrainConfig::default()
    };
    (data, config)
}

fn check<T: NdElement>() {
    let (data, config) = small();
    for mode in [Mode::Sparse, Mode::Dense] {
        let mut batches = 0;
        let mut epochs = 0;
        let (report, _) = mf::train::<T>(&data, &config, mode, &mut |e| match e {
            mf::Event::Batch { .. } => batches += 1,
            mf::Event::Epoch(_) => epochs += 1,
        })
        .unwrap();
        eprintln!(
            "{} {mode:?}: held-out loss {:.4} -> {:.4}",
            std::any::type_name::<T>(),
            report.initial_test_loss,
            report.final_test_loss
        );
        assert_eq!(epochs, config.epochs);
        assert_eq!(
            batches,
            config.epochs * data.train.len().div_ceil(config.batch)
        );
        assert!(
            report.initial_test_loss > 0.5,
            "{mode:?}: the untrained model should be poor: {report:?}"
        );
        assert!(
            report.final_test_loss < 0.6 * report.initial_test_loss,
            "{mode:?}: held-out loss {} -> {} is not clearly lower",
            report.initial_test_loss,
            report.final_test_loss
        );
        assert!(report.final_test_loss.is_finite());
    }
}

#[test]
fn both_optimizers_clearly_reduce_the_held_out_loss_f32() {
    check::<f32>();
}

#[test]
fn both_optimizers_clearly_reduce_the_held_out_loss_bf16() {
    check::<bf16>();
}

#[test]
fn the_data_is_deterministic() {
    let a = mf::generate(&DataConfig::default());
    let b = mf::generate(&DataConfig::default());
    assert_eq!(a.train.users, b.train.users);
    assert_eq!(a.train.items, b.train.items);
    assert_eq!(
        a.train
            .values
            .iter()
            .map(|x| x.to_bits())
            .collect::<Vec<_>>(),
        b.train
            .values
            .iter()
            .map(|x| x.to_bits())
            .collect::<Vec<_>>()
    );
    assert_ne!(a.train.users[..100], a.test.users[..100]);
}
