//! The README's main job: train a matrix-factorization recommender on synthetic data with
//! LazyAdam on sparse gradients, then with Adam on dense gradients, and compare.
//!
//! ```text
//! cargo run --release --example train_embeddings
//! cargo run --release --example train_embeddings -- --help
//! ```

mod cli;
mod mf;

use std::time::Instant;

use clap::Parser;
use cli::{Args, Storage, Which};
use indicatif::{ProgressBar, ProgressStyle};
use lazyadam_ndarray::{NdElement, bf16, f16};
use mf::{Dataset, Event, Mode, RunReport, TrainConfig};

fn run<T: NdElement>(data: &Dataset, config: &TrainConfig, mode: Mode) -> RunReport {
    println!("\n{}", mode.label());
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("  epoch {prefix} [{bar:32}] {pos}/{len} batches  {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let mut observe = |e: &Event| match e {
        Event::Batch {
            epoch,
            done,
            of,
            running_loss,
        } => {
            if *done == 1 {
                bar.reset();
                bar.set_length(*of as u64);
                bar.set_prefix(format!("{epoch}/{}", config.epochs));
            }
            bar.set_position(*done as u64);
            if *done % 16 == 0 || done == of {
                bar.set_message(format!("train loss {running_loss:.4}"));
            }
        }
        Event::Epoch(r) => {
            bar.finish_and_clear();
            println!(
                "  epoch {:>2}/{}  train loss {:.4}  held-out loss {:.4}  {:>10.0} examples/s  {:>6.2} s",
                r.epoch, config.epochs, r.train_loss, r.test_loss, r.examples_per_sec, r.seconds
            );
        }
    };
    match mf::train::<T>(data, config, mode, &mut observe) {
        Ok((report, _model)) => report,
        Err(e) => {
            bar.abandon();
            eprintln!("training failed: {e}");
            std::process::exit(1);
        }
    }
}

fn run_dtype(data: &Dataset, config: &TrainConfig, mode: Mode, dtype: Storage) -> RunReport {
    match dtype {
        Storage::F32 => run::<f32>(data, config, mode),
        Storage::F16 => run::<f16>(data, config, mode),
        Storage::Bf16 => run::<bf16>(data, config, mode),
    }
}

fn main() {
    let args = Args::parse();
    if let Err(e) = cli::validate(&args) {
        eprintln!("train_embeddings: {e}\n(see --help)");
        std::process::exit(2);
    }
    let (data_config, train_config) = cli::configs(&args);
    let pool = match rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .build()
    {
        Ok(p) => p,
        Err(e) => {
            eprintln!("cannot build the thread pool: {e}");
            std::process::exit(1);
        }
    };
    let t0 = Instant::now();
    let data = mf::generate(&data_config);
    println!(
        "train_embeddings: {} users x {} items, embedding dim {} ({} parameters in {}), \
         {} training / {} held-out ratings",
        data_config.users,
        data_config.items,
        train_config.dim,
        (data_config.users + data_config.items) * train_config.dim,
        args.dtype.dtype().name(),
        data_config.train,
        data_config.test,
    );
    println!(
        "data: Zipf({}) users and items, rank-{} truth + noise {}, seed {} (generated in {:.2} s); \
         {} epochs of batch {}, lr {}, {} optimizer thread(s)",
        data_config.zipf,
        data_config.rank,
        data_config.noise,
        data_config.seed,
        t0.elapsed().as_secs_f64(),
        train_config.epochs,
        train_config.batch,
        args.lr,
        pool.current_num_threads(),
    );
    let modes: &[Mode] = match args.run {
        Which::Both => &[Mode::Sparse, Mode::Dense],
        Which::Sparse => &[Mode::Sparse],
        Which::Dense => &[Mode::Dense],
    };
    let reports: Vec<RunReport> = pool.install(|| {
        modes
            .iter()
            .map(|&m| run_dtype(&data, &train_config, m, args.dtype))
            .collect()
    });

    println!("\nFinal comparison");
    println!(
        "  {:<28} {:>16} {:>14} {:>10} {:>14}",
        "optimizer", "held-out: start", "end", "wall time", "examples/s"
    );
    for r in &reports {
        let n = (data_config.train * r.epochs.len()) as f64;
        println!(
            "  {:<28} {:>16.4} {:>14.4} {:>8.2} s {:>14.0}",
            r.mode.label(),
            r.initial_test_loss,
            r.final_test_loss,
            r.wall_seconds,
            n / r.train_seconds.max(1e-9),
        );
    }
    if let [s, d] = &reports[..] {
        println!(
            "  LazyAdam trained {:.1}x faster than dense Adam (training time {:.2} s vs {:.2} s)",
            d.train_seconds / s.train_seconds.max(1e-9),
            s.train_seconds,
            d.train_seconds
        );
    }
}
