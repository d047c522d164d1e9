//! Runs the `train_embeddings` example's training code at a small size: the held-out loss
//! after training must be clearly below the loss at the start, for LazyAdam on sparse gradients
//! and for Adam on dense gradients.

#[allow(dead_code)]
#[path = "../examples/train_embeddings/mf.rs"]
mod mf;

#[allow(dead_code)]
#[path = "../examples/train_embeddings/cli.rs"]
mod cli;

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

fn parse(args: &[&str]) -> Result<cli::Args, clap::Error> {
    use clap::Parser;
    cli::Args::try_parse_from(std::iter::once("train_embeddings").chain(args.iter().copied()))
}

/// Every option that used to panic, hang or run silently wrong is refused with a message
/// naming the option.
#[test]
fn the_command_line_refuses_bad_options_by_name() {
    let defaults = parse(&[]).unwrap();
    cli::validate(&defaults).unwrap();
    for (args, option) in [
        (&["--users", "0"][..], "--users"),
        (&["--items", "0"], "--items"),
        (&["--dim", "0"], "--dim"),
        (&["--batch", "0"], "--batch"),
        (&["--epochs", "0"], "--epochs"),
        (&["--train", "0"], "--train"),
        (&["--test", "0"], "--test"),
        (&["--rank", "0"], "--rank"),
        (&["--threads", "99999"], "--threads"),
        (&["--users", "5000000000"], "--users"),
        (&["--dim", "100000"], "--dim"),
        (&["--zipf", "0"], "--zipf"),
        (&["--noise", "NaN"], "--noise"),
        (&["--lr", "-1"], "--lr"),
        (&["--lr", "inf"], "--lr"),
        (&["--beta1", "1"], "--beta1"),
        (&["--beta2", "-0.5"], "--beta2"),
        (&["--epsilon", "0"], "--epsilon"),
        (&["--weight-decay", "-1"], "--weight-decay"),
        (&["--sparse-amsgrad"], "amsgrad"),
    ] {
        let a = parse(args).unwrap_or_else(|e| panic!("{args:?} does not parse: {e}"));
        let e = cli::validate(&a).expect_err(&format!("{args:?} was accepted"));
        assert!(e.contains(option), "{args:?}: {e}");
    }
    // A negative number is a value, not an unknown flag.
    assert_eq!(parse(&["--lr", "-1"]).unwrap().lr, -1.0);
    // Valid edge values pass.
    for args in [
        &["--threads", "1024"][..],
        &[
            "--users", "1", "--items", "1", "--batch", "1", "--epochs", "1",
        ],
        &["--lr", "0"],
        &["--amsgrad", "--sparse-amsgrad"],
    ] {
        let a = parse(args).unwrap();
        cli::validate(&a).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    }
}

/// The smallest data set the command line accepts trains without a panic.
#[test]
fn the_smallest_accepted_sizes_train() {
    let a = parse(&[
        "--users", "1", "--items", "1", "--train", "1", "--test", "1", "--rank", "1", "--dim", "1",
        "--batch", "1", "--epochs", "1",
    ])
    .unwrap();
    cli::validate(&a).unwrap();
    let (data, config) = cli::configs(&a);
    let data = mf::generate(&data);
    let (report, _) = mf::train::<f32>(&data, &config, Mode::Sparse, &mut |_| {}).unwrap();
    assert_eq!(report.epochs.len(), 1);
    assert!(report.final_test_loss.is_finite());
}
