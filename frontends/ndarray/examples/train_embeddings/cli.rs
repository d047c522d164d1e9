//! The example's command line: options, their validation (clear messages, no panic, no
//! hang), and the configurations they give. Shared with `tests/train_embeddings.rs`.

use clap::{Parser, ValueEnum};
use lazyadam_ndarray::{DType, Extensions, LazyAdamConfig};

use crate::mf::{DataConfig, TrainConfig};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Storage {
    F32,
    F16,
    Bf16,
}

impl Storage {
    pub fn dtype(self) -> DType {
        match self {
            Storage::F32 => DType::F32,
            Storage::F16 => DType::F16,
            Storage::Bf16 => DType::BF16,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Which {
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
#[command(name = "train_embeddings", version, allow_negative_numbers = true)]
pub struct Args {
    /// Number of users (rows of the user embedding table).
    #[arg(long, default_value_t = DataConfig::default().users)]
    pub users: usize,
    /// Number of items (rows of the item embedding table).
    #[arg(long, default_value_t = DataConfig::default().items)]
    pub items: usize,
    /// Training ratings.
    #[arg(long, default_value_t = DataConfig::default().train)]
    pub train: usize,
    /// Held-out ratings.
    #[arg(long, default_value_t = DataConfig::default().test)]
    pub test: usize,
    /// Rank of the hidden truth.
    #[arg(long, default_value_t = DataConfig::default().rank)]
    pub rank: usize,
    /// Zipf exponent of user and item popularity.
    #[arg(long, default_value_t = DataConfig::default().zipf)]
    pub zipf: f64,
    /// Standard deviation of the rating noise.
    #[arg(long, default_value_t = DataConfig::default().noise)]
    pub noise: f64,
    /// Seed of the data, the initialization and the shuffling.
    #[arg(long, default_value_t = DataConfig::default().seed)]
    pub seed: u64,
    /// Embedding dimension of the model.
    #[arg(long, default_value_t = TrainConfig::default().dim)]
    pub dim: usize,
    /// Epochs (passes over the training ratings).
    #[arg(long, default_value_t = TrainConfig::default().epochs)]
    pub epochs: usize,
    /// Ratings per step.
    #[arg(long, default_value_t = TrainConfig::default().batch)]
    pub batch: usize,
    /// Threads of the optimizer (rayon); 0 = all cores.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Storage type of the embedding tables.
    #[arg(long, value_enum, default_value_t = Storage::F32)]
    pub dtype: Storage,
    /// Storage type of the optimizer's moments (f16 is fragile: small gradients underflow).
    #[arg(long, value_enum, default_value_t = Storage::F32)]
    pub moment_dtype: Storage,
    /// Which optimizers to run.
    #[arg(long, value_enum, default_value_t = Which::Both)]
    pub run: Which,
    /// Learning rate.
    #[arg(long, default_value_t = 0.01)]
    pub lr: f32,
    /// Adam beta_1.
    #[arg(long, default_value_t = 0.9)]
    pub beta1: f32,
    /// Adam beta_2.
    #[arg(long, default_value_t = 0.999)]
    pub beta2: f32,
    /// Adam epsilon.
    #[arg(long, default_value_t = 1e-7)]
    pub epsilon: f32,
    /// AMSGrad (on dense gradients, as the reference; add --sparse-amsgrad for sparse ones).
    #[arg(long)]
    pub amsgrad: bool,
    /// AMSGrad on sparse gradients too (extension; needs --amsgrad).
    #[arg(long)]
    pub sparse_amsgrad: bool,
    /// Clip each gradient to this L2 norm.
    #[arg(long)]
    pub clipnorm: Option<f32>,
    /// Clip each gradient element to [-clipvalue, clipvalue].
    #[arg(long)]
    pub clipvalue: Option<f32>,
    /// Clip all gradients together to this global L2 norm.
    #[arg(long)]
    pub global_clipnorm: Option<f32>,
    /// Legacy learning-rate decay: lr / (1 + decay * iterations).
    #[arg(long, default_value_t = 0.0)]
    pub decay: f32,
    /// Decoupled weight decay of the updated rows (LazyAdamW; extension).
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f32,
    /// Decay the moments of skipped rows when they come back (extension).
    #[arg(long)]
    pub catch_up_decay: bool,
    /// Bias correction from each row's own update count (extension).
    #[arg(long)]
    pub per_row_bias_correction: bool,
    /// Stochastic rounding of f16/bf16 parameters, with this seed (extension).
    #[arg(long)]
    pub stochastic_rounding: Option<u64>,
}

/// The data and training configurations the options give (call [`validate`] first).
pub fn configs(a: &Args) -> (DataConfig, TrainConfig) {
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
        clipnorm: a.clipnorm,
        clipvalue: a.clipvalue,
        global_clipnorm: a.global_clipnorm,
        ..LazyAdamConfig::new(a.lr)
            .with_betas(a.beta1, a.beta2)
            .with_epsilon(a.epsilon)
            .with_amsgrad(a.amsgrad)
            .with_decay(a.decay)
    };
    let extensions = Extensions::default()
        .with_sparse_amsgrad(a.sparse_amsgrad)
        .with_weight_decay(a.weight_decay)
        .with_catch_up_decay(a.catch_up_decay)
        .with_per_row_bias_correction(a.per_row_bias_correction)
        .with_stochastic_rounding(a.stochastic_rounding);
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

/// Most optimizer threads accepted (more only adds scheduling overhead; an enormous count
/// would spend minutes creating threads).
pub const MAX_THREADS: usize = 1024;

/// Most embedding parameters accepted (`(users + items) * dim`): 2^30, 4 GiB in f32, per
/// table copy (the dense run keeps a dense gradient of each table too).
pub const MAX_PARAMETERS: usize = 1 << 30;

/// Checks every option; the error says which option is wrong and why.
pub fn validate(a: &Args) -> Result<(), String> {
    for (name, value) in [
        ("--users", a.users),
        ("--items", a.items),
        ("--train", a.train),
        ("--test", a.test),
        ("--rank", a.rank),
        ("--dim", a.dim),
        ("--epochs", a.epochs),
        ("--batch", a.batch),
    ] {
        if value == 0 {
            return Err(format!("{name} must be at least 1, got 0"));
        }
    }
    if a.users > u32::MAX as usize || a.items > u32::MAX as usize {
        return Err(format!(
            "--users and --items must be at most {} (ids are u32), got {} and {}",
            u32::MAX,
            a.users,
            a.items
        ));
    }
    let params = a
        .users
        .checked_add(a.items)
        .and_then(|r| r.checked_mul(a.dim));
    match params {
        Some(p) if p <= MAX_PARAMETERS => {}
        _ => {
            return Err(format!(
                "(--users + --items) * --dim must be at most {MAX_PARAMETERS} parameters, \
                 got ({} + {}) * {}",
                a.users, a.items, a.dim
            ));
        }
    }
    if a.threads > MAX_THREADS {
        return Err(format!(
            "--threads must be at most {MAX_THREADS} (0 = all cores), got {}",
            a.threads
        ));
    }
    if !(a.zipf.is_finite() && a.zipf > 0.0) {
        return Err(format!(
            "--zipf must be finite and positive, got {}",
            a.zipf
        ));
    }
    if !(a.noise.is_finite() && a.noise >= 0.0) {
        return Err(format!(
            "--noise must be finite and not negative, got {}",
            a.noise
        ));
    }
    // The optimizer's own checks, with the option names.
    let (_, train) = configs(a);
    let option = |key: &str| match key {
        "learning_rate" => "--lr".to_string(),
        "beta_1" => "--beta1".to_string(),
        "beta_2" => "--beta2".to_string(),
        other => format!("--{}", other.replace('_', "-")),
    };
    let explain = |e: lazyadam_ndarray::ConfigError| match e {
        lazyadam_ndarray::ConfigError::InvalidValue { key, reason } => {
            format!("{} {reason}", option(&key))
        }
        other => other.to_string(),
    };
    train.optimizer.validate().map_err(explain)?;
    train
        .extensions
        .validate(train.optimizer.amsgrad)
        .map_err(explain)?;
    Ok(())
}
