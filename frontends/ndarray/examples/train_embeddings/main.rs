//! The README's main job: train a matrix-factorization recommender on synthetic data with
//! LazyAdam on sparse gradients, then with Adam on dense gradients, and compare.
//!
//! ```text
//! cargo run --release --example train_embeddings
//! cargo run --release --example train_embeddings -- --help
//! ```

mod mf;

use std::time::Instant;

use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use lazyadam_ndarray::lazyadam::LearningRate;
use lazyadam_ndarray::{DType, Extensions, LazyAdamConfig, NdElement, bf16, f16};
use mf::{DataConfig, Dataset, Event, Mode, RunReport, TrainConfig};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Storage {
    F32,
    F16,
    Bf16,
}

impl Storage {
    fn dtype(self) -> DType {
        match self {
            Storage::F32 => DType::F32,
            Storage::F16 => DType::F16,
            Storage::Bf16 => DType::BF16,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Which {
    /// LazyAdam on sparse gradients, then Adam on dense gradients.
    Both,
    /// LazyAdam on sparse gradients only.
    Sparse,
    /// Adam on dense gradients only.
    Dense,
}

/// Train a matrix-factorization recommender (dot product of user and item embeddings, MSE)
/// on deterministic synthetic data (Zipf users and items, hidden low-rank truth plus noise),
/// with LazyAdam on sparse gradients and with Adam on dense gradients.
#[derive(Parser, Debug)]
#[command(name = "train_embeddings", version)]
struct Args {
    /// Number of users (rows of the user embedding table).
    #[arg(long, default_value_t = DataConfig::default().users)]
    users: usize,
    /// Number of items (rows of the item embedding table).
    #[arg(long, default_value_t = DataConfig::default().items)]
    items: usize,
    /// Training ratings.
    #[arg(long, default_value_t = DataConfig::default().train)]
    train: usize,
    /// Held-out ratings.
    #[arg(long, default_value_t = DataConfig::default().test)]
    test: usize,
    /// Rank of the hidden truth.
    #[arg(long, default_value_t = DataConfig::default().rank)]
    rank: usize,
    /// Zipf exponent of user and item popularity.
    #[arg(long, default_value_t = DataConfig::default().zipf)]
    zipf: f64,
    /// Standard deviation of the rating noise.
    #[arg(long, default_value_t = DataConfig::default().noise)]
    noise: f64,
    /// Seed of the data, the initialization and the shuffling.
    #[arg(long, default_value_t = DataConfig::default().seed)]
    seed: u64,
    /// Embedding dimension of the model.
    #[arg(long, default_value_t = TrainConfig::default().dim)]
    dim: usize,
    /// Epochs (passes over the training ratings).
    #[arg(long, default_value_t = TrainConfig::default().epochs)]
    epochs: usize,
    /// Ratings per step.
    #[arg(long, default_value_t = TrainConfig::default().batch)]
    batch: usize,
    /// Threads of the optimizer (rayon); 0 = all cores.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Storage type of the embedding tables.
    #[arg(long, value_enum, default_value_t = Storage::F32)]
    dtype: Storage,
    /// Storage type of the optimizer's moments (f16 is fragile: small gradients underflow).
    #[arg(long, value_enum, default_value_t = Storage::F32)]
    moment_dtype: Storage,
    /// Which optimizers to run.
    #[arg(long, value_enum, default_value_t = Which::Both)]
    run: Which,
    /// Learning rate.
    #[arg(long, default_value_t = 0.01)]
    lr: f32,
    /// Adam beta_1.
    #[arg(long, default_value_t = 0.9)]
    beta1: f32,
    /// Adam beta_2.
    #[arg(long, default_value_t = 0.999)]
    beta2: f32,
    /// Adam epsilon.
    #[arg(long, default_value_t = 1e-7)]
    epsilon: f32,
    /// AMSGrad (on dense gradients, as the reference; add --sparse-amsgrad for sparse ones).
    #[arg(long)]
    amsgrad: bool,
    /// AMSGrad on sparse gradients too (extension; needs --amsgrad).
    #[arg(long)]
    sparse_amsgrad: bool,
    /// Clip each gradient to this L2 norm.
    #[arg(long)]
    clipnorm: Option<f32>,
    /// Clip each gradient element to [-clipvalue, clipvalue].
    #[arg(long)]
    clipvalue: Option<f32>,
    /// Clip all gradients together to this global L2 norm.
    #[arg(long)]
    global_clipnorm: Option<f32>,
    /// Legacy learning-rate decay: lr / (1 + decay * iterations).
    #[arg(long, default_value_t = 0.0)]
    decay: f32,
    /// Decoupled weight decay of the updated rows (LazyAdamW; extension).
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f32,
    /// Decay the moments of skipped rows when they come back (extension).
    #[arg(long)]
    catch_up_decay: bool,
    /// Bias correction from each row's own update count (extension).
    #[arg(long)]
    per_row_bias_correction: bool,
    /// Stochastic rounding of f16/bf16 parameters, with this seed (extension).
    #[arg(long)]
    stochastic_rounding: Option<u64>,
}

fn configs(a: &Args) -> (DataConfig, TrainConfig) {
    let data = DataConfig {
        users: a.users,
        items: a.items,
        rank: a.rank,
        train: a.train,
        test: a.test,
        zipf: a.zipf,
        noise: a.noise,
        seed: a.seed,
    };
    let optimizer = LazyAdamConfig {
        learning_rate: LearningRate::Constant(a.lr),
        beta_1: a.beta1,
        beta_2: a.beta2,
        epsilon: a.epsilon,
        amsgrad: a.amsgrad,
        decay: a.decay,
        clipnorm: a.clipnorm,
        clipvalue: a.clipvalue,
        global_clipnorm: a.global_clipnorm,
        ..LazyAdamConfig::default()
    };
    let extensions = Extensions {
        sparse_amsgrad: a.sparse_amsgrad,
        weight_decay: a.weight_decay,
        catch_up_decay: a.catch_up_decay,
        per_row_bias_correction: a.per_row_bias_correction,
        stochastic_rounding: a.stochastic_rounding,
        ..Extensions::default()
    };
    let train = TrainConfig {
        dim: a.dim,
        epochs: a.epochs,
        batch: a.batch,
        optimizer,
        extensions,
        moment_dtype: a.moment_dtype.dtype(),
        seed: a.seed.wrapping_add(1),
        ..TrainConfig::default()
    };
    (data, train)
}

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
    let (data_config, train_config) = configs(&args);
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
