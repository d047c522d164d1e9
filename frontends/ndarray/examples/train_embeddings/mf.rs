//! Matrix factorization on deterministic synthetic data, trained with LazyAdam on sparse
//! gradients or with Adam on dense gradients. Shared by the `train_embeddings` example and by
//! `tests/train_embeddings.rs`, which runs it at a small size.
//!
//! Model: `rating(u, i) = <user[u], item[i]>` with two embedding tables. Loss: mean squared
//! error over a batch. The gradients are computed by hand: for example `j` of a batch of `B`,
//! with `e = pred - y`, `d loss / d user[u] = (2/B) e item[i]` and
//! `d loss / d item[i] = (2/B) e user[u]`, so a batch touches at most `B` rows of each table.
//! The sparse run hands those rows (duplicates included, the optimizer sums them) to LazyAdam;
//! the dense run scatters them into zero gradients the size of the tables and runs Adam on
//! everything, the way a framework without sparse gradients would.

use std::time::Instant;

use lazyadam_ndarray::{
    DType, Error, Extensions, LazyAdamConfig, NdElement, NdLazyAdam, NdUpdate, VarId,
    ndarray::{Array2, ArrayView1, ArrayView2},
};

/// A small, fast, seedable generator (SplitMix64): the data never depends on a crate's
/// version.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Uniform in 0..n.
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

/// Zipf sampling over `0..n` (rank `k` has weight `1 / (k + 1)^s`), with the ranks scattered
/// over the ids by a random permutation so popular ids are not all at the start.
#[derive(Clone, Debug)]
pub struct Zipf {
    cdf: Vec<f64>,
    ids: Vec<u32>,
}

impl Zipf {
    /// The distribution over `n` ids with exponent `s`.
    pub fn new(n: usize, s: f64, rng: &mut Rng) -> Self {
        let mut cdf = Vec::with_capacity(n);
        let mut total = 0.0;
        for k in 0..n {
            total += 1.0 / ((k + 1) as f64).powf(s);
            cdf.push(total);
        }
        for c in &mut cdf {
            *c /= total;
        }
        let mut ids: Vec<u32> = (0..n as u32).collect();
        rng.shuffle(&mut ids);
        Zipf { cdf, ids }
    }

    /// One id.
    pub fn sample(&self, rng: &mut Rng) -> u32 {
        let u = rng.uniform();
        let k = self
            .cdf
            .partition_point(|&c| c <= u)
            .min(self.ids.len() - 1);
        self.ids[k]
    }
}

/// Sizes and seed of the synthetic data.
#[derive(Clone, Debug)]
pub struct DataConfig {
    /// Number of users (rows of the user table).
    pub users: usize,
    /// Number of items (rows of the item table).
    pub items: usize,
    /// Rank of the hidden truth.
    pub rank: usize,
    /// Training ratings.
    pub train: usize,
    /// Held-out ratings.
    pub test: usize,
    /// Zipf exponent of users and items.
    pub zipf: f64,
    /// Standard deviation of the noise added to each rating.
    pub noise: f64,
    /// Seed of everything.
    pub seed: u64,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            users: 100_000,
            items: 50_000,
            rank: 8,
            train: 400_000,
            test: 40_000,
            zipf: 1.05,
            noise: 0.1,
            seed: 42,
        }
    }
}

/// Ratings as parallel columns.
#[derive(Clone, Debug, Default)]
pub struct Ratings {
    /// User ids.
    pub users: Vec<u32>,
    /// Item ids.
    pub items: Vec<u32>,
    /// Ratings.
    pub values: Vec<f32>,
}

impl Ratings {
    /// Number of ratings.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// No ratings.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

/// The synthetic data set.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// The configuration it was generated from.
    pub config: DataConfig,
    /// Training ratings.
    pub train: Ratings,
    /// Held-out ratings (same distribution, independent draws).
    pub test: Ratings,
}

/// Generates the data: Zipf users and items, `rating = <U*[u], V*[i]> + noise` with a hidden
/// rank-`rank` truth scaled so ratings have variance about 1.
pub fn generate(config: &DataConfig) -> Dataset {
    let mut rng = Rng::new(config.seed);
    let scale = 1.0 / (config.rank as f64).powf(0.25);
    let truth = |n: usize, rng: &mut Rng| -> Vec<f32> {
        (0..n * config.rank)
            .map(|_| (rng.normal() * scale) as f32)
            .collect()
    };
    let tu = truth(config.users, &mut rng);
    let ti = truth(config.items, &mut rng);
    let zu = Zipf::new(config.users, config.zipf, &mut rng);
    let zi = Zipf::new(config.items, config.zipf, &mut rng);
    let r = config.rank;
    let draw = |n: usize, rng: &mut Rng| {
        let mut out = Ratings::default();
        for _ in 0..n {
            let u = zu.sample(rng);
            let i = zi.sample(rng);
            let a = &tu[u as usize * r..][..r];
            let b = &ti[i as usize * r..][..r];
            let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x * y)).sum();
            out.users.push(u);
            out.items.push(i);
            out.values.push((dot + config.noise * rng.normal()) as f32);
        }
        out
    };
    let train = draw(config.train, &mut rng);
    let test = draw(config.test, &mut rng);
    Dataset {
        config: config.clone(),
        train,
        test,
    }
}

/// How the gradients reach the optimizer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// LazyAdam: the batch's rows only.
    Sparse,
    /// Adam: dense gradients over the whole tables.
    Dense,
}

impl Mode {
    /// A label for reports.
    pub fn label(self) -> &'static str {
        match self {
            Mode::Sparse => "LazyAdam (sparse gradients)",
            Mode::Dense => "Adam (dense gradients)",
        }
    }
}

/// Training options.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    /// Embedding dimension of the model.
    pub dim: usize,
    /// Passes over the training ratings.
    pub epochs: usize,
    /// Ratings per step.
    pub batch: usize,
    /// Standard deviation of the initial embeddings.
    pub init_scale: f64,
    /// Optimizer hyperparameters.
    pub optimizer: LazyAdamConfig,
    /// Optimizer extensions.
    pub extensions: Extensions,
    /// Storage type of the optimizer's moments.
    pub moment_dtype: DType,
    /// Seed of the initialization and of the shuffling.
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        let optimizer = LazyAdamConfig::new(0.01);
        TrainConfig {
            dim: 32,
            epochs: 5,
            batch: 1024,
            init_scale: 0.1,
            optimizer,
            extensions: Extensions::default(),
            moment_dtype: DType::F32,
            seed: 7,
        }
    }
}

/// What happened in one epoch.
#[derive(Clone, Debug)]
pub struct EpochReport {
    /// 1-based epoch number.
    pub epoch: usize,
    /// Mean training loss over the epoch's batches (before each step).
    pub train_loss: f64,
    /// Held-out loss after the epoch.
    pub test_loss: f64,
    /// Training time of the epoch (held-out evaluation excluded), seconds.
    pub seconds: f64,
    /// Training ratings per second.
    pub examples_per_sec: f64,
}

/// Progress notifications for a progress bar.
#[derive(Clone, Debug)]
pub enum Event {
    /// A batch was applied.
    Batch {
        /// 1-based epoch.
        epoch: usize,
        /// Batches done in this epoch.
        done: usize,
        /// Batches per epoch.
        of: usize,
        /// Mean training loss so far in this epoch.
        running_loss: f64,
    },
    /// An epoch ended.
    Epoch(EpochReport),
}

/// The outcome of a training run.
#[derive(Clone, Debug)]
pub struct RunReport {
    /// Sparse or dense.
    pub mode: Mode,
    /// Held-out loss before training.
    pub initial_test_loss: f64,
    /// Held-out loss after training.
    pub final_test_loss: f64,
    /// Per-epoch reports.
    pub epochs: Vec<EpochReport>,
    /// Training time, seconds (held-out evaluations excluded).
    pub train_seconds: f64,
    /// Wall time of the whole run including evaluations, seconds.
    pub wall_seconds: f64,
}

/// The model: two embedding tables in storage type `T`.
#[derive(Clone, Debug)]
pub struct Model<T> {
    /// User embeddings, `[users, dim]`.
    pub users: Array2<T>,
    /// Item embeddings, `[items, dim]`.
    pub items: Array2<T>,
}

impl<T: NdElement> Model<T> {
    /// Random initial embeddings (normal, standard deviation `scale`).
    pub fn init(users: usize, items: usize, dim: usize, scale: f64, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let mut table = |n: usize| {
            Array2::from_shape_fn((n, dim), |_| T::from_f32((rng.normal() * scale) as f32))
        };
        let users = table(users);
        let items = table(items);
        Model { users, items }
    }

    fn predict(&self, u: u32, i: u32) -> f32 {
        let a = self.users.row(u as usize);
        let b = self.items.row(i as usize);
        a.iter()
            .zip(b.iter())
            .map(|(x, y)| x.to_f32() * y.to_f32())
            .sum()
    }

    /// Mean squared error over `data`.
    pub fn loss(&self, data: &Ratings) -> f64 {
        if data.is_empty() {
            return 0.0;
        }
        let mut sum = 0.0f64;
        for ((&u, &i), &y) in data.users.iter().zip(&data.items).zip(&data.values) {
            let e = f64::from(self.predict(u, i) - y);
            sum += e * e;
        }
        sum / data.len() as f64
    }
}

/// Forward and backward pass of one batch: fills one gradient row per example for each table
/// (in the batch's order) and returns the batch's mean squared error.
fn backward<T: NdElement>(
    model: &Model<T>,
    users: &[u32],
    items: &[u32],
    ratings: &[f32],
    gu: &mut Array2<f32>,
    gi: &mut Array2<f32>,
) -> f64 {
    let b = ratings.len();
    let scale = 2.0 / b as f32;
    let mut loss = 0.0f64;
    for j in 0..b {
        let pu = model.users.row(users[j] as usize);
        let qi = model.items.row(items[j] as usize);
        let pred: f32 = pu
            .iter()
            .zip(qi.iter())
            .map(|(x, y)| x.to_f32() * y.to_f32())
            .sum();
        let e = pred - ratings[j];
        loss += f64::from(e) * f64::from(e);
        let c = scale * e;
        for ((g, q), (h, p)) in gu
            .row_mut(j)
            .iter_mut()
            .zip(qi.iter())
            .zip(gi.row_mut(j).iter_mut().zip(pu.iter()))
        {
            *g = c * q.to_f32();
            *h = c * p.to_f32();
        }
    }
    loss / b as f64
}

/// Trains a fresh model on `data` and reports the losses. `observe` sees every batch and
/// epoch (for a progress bar).
pub fn train<T: NdElement>(
    data: &Dataset,
    config: &TrainConfig,
    mode: Mode,
    observe: &mut dyn FnMut(&Event),
) -> Result<(RunReport, Model<T>), Error> {
    let wall = Instant::now();
    let dim = config.dim;
    let mut model: Model<T> = Model::init(
        data.config.users,
        data.config.items,
        dim,
        config.init_scale,
        config.seed,
    );
    let mut opt = NdLazyAdam::with_extensions(config.optimizer.clone(), config.extensions.clone())?;
    let uid: VarId =
        opt.add_variable_with_moments("user_embeddings", &model.users, config.moment_dtype)?;
    let iid: VarId =
        opt.add_variable_with_moments("item_embeddings", &model.items, config.moment_dtype)?;
    let initial_test_loss = model.loss(&data.test);

    let batch = config.batch.max(1);
    let n = data.train.len();
    let batches = n.div_ceil(batch);
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = Rng::new(config.seed ^ 0x0BA7_C4E5);
    let (mut bu, mut bi, mut by) = (Vec::new(), Vec::new(), Vec::new());
    let mut gu = Array2::<f32>::zeros((batch, dim));
    let mut gi = Array2::<f32>::zeros((batch, dim));
    // Dense mode: gradients the size of the tables.
    let (mut dense_u, mut dense_i) = match mode {
        Mode::Dense => (
            Array2::<f32>::zeros(model.users.raw_dim()),
            Array2::<f32>::zeros(model.items.raw_dim()),
        ),
        Mode::Sparse => (Array2::zeros((0, dim)), Array2::zeros((0, dim))),
    };
    let mut epochs = Vec::new();
    let mut train_seconds = 0.0;
    for epoch in 1..=config.epochs {
        let start = Instant::now();
        rng.shuffle(&mut order);
        let mut loss_sum = 0.0;
        for (k, chunk) in order.chunks(batch).enumerate() {
            bu.clear();
            bi.clear();
            by.clear();
            for &j in chunk {
                bu.push(data.train.users[j]);
                bi.push(data.train.items[j]);
                by.push(data.train.values[j]);
            }
            let m = chunk.len();
            loss_sum += backward(&model, &bu, &bi, &by, &mut gu, &mut gi);
            let rows_u: ArrayView2<'_, f32> = gu.slice(lazyadam_ndarray::ndarray::s![..m, ..]);
            let rows_i: ArrayView2<'_, f32> = gi.slice(lazyadam_ndarray::ndarray::s![..m, ..]);
            match mode {
                Mode::Sparse => {
                    opt.step(&mut [
                        NdUpdate::sparse(
                            uid,
                            model.users.view_mut(),
                            ArrayView1::from(&bu[..]),
                            rows_u,
                        ),
                        NdUpdate::sparse(
                            iid,
                            model.items.view_mut(),
                            ArrayView1::from(&bi[..]),
                            rows_i,
                        ),
                    ])?;
                }
                Mode::Dense => {
                    dense_u.fill(0.0);
                    dense_i.fill(0.0);
                    for j in 0..m {
                        let mut ru = dense_u.row_mut(bu[j] as usize);
                        ru += &rows_u.row(j);
                        let mut ri = dense_i.row_mut(bi[j] as usize);
                        ri += &rows_i.row(j);
                    }
                    opt.step(&mut [
                        NdUpdate::dense(uid, model.users.view_mut(), dense_u.view()),
                        NdUpdate::dense(iid, model.items.view_mut(), dense_i.view()),
                    ])?;
                }
            }
            observe(&Event::Batch {
                epoch,
                done: k + 1,
                of: batches,
                running_loss: loss_sum / (k + 1) as f64,
            });
        }
        let seconds = start.elapsed().as_secs_f64();
        train_seconds += seconds;
        let report = EpochReport {
            epoch,
            train_loss: loss_sum / batches.max(1) as f64,
            test_loss: model.loss(&data.test),
            seconds,
            examples_per_sec: n as f64 / seconds.max(1e-9),
        };
        observe(&Event::Epoch(report.clone()));
        epochs.push(report);
    }
    let final_test_loss = epochs.last().map_or(initial_test_loss, |e| e.test_loss);
    Ok((
        RunReport {
            mode,
            initial_test_loss,
            final_test_loss,
            epochs,
            train_seconds,
            wall_seconds: wall.elapsed().as_secs_f64(),
        },
        model,
    ))
}
