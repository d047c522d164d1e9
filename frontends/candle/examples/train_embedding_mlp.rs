//! An embedding table plus a small MLP head, trained on built-in synthetic data with candle's
//! autograd: LazyAdam with sparse steps (through `SparseEmbedding`) against candle's own
//! `AdamW` on the same model (same initial values, same hyperparameters, same batches). Then
//! a run that stops halfway, saves the parameters (`VarMap::save`) and the optimizer state
//! (`LazyAdamOptimizer::save`), resumes in a fresh VarMap and a fresh optimizer built in
//! another order, and must end with parameters bit-identical to the uninterrupted run.
//!
//! ```text
//! cargo run --release -p lazyadam-candle --example train_embedding_mlp [-- OPTIONS]
//! ```
//!
//! Options (all optional): `--epochs N` (6), `--vocab N` (20000), `--dim N` (32),
//! `--hidden N` (64), `--seq N` (8), `--batch N` (128), `--samples N` (8192), `--lr X`
//! (0.005), `--seed N` (42). Exit status: 0 on success, 1 if the resumed run differs or
//! anything fails, 2 for invalid options.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{AdamW, Linear, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use lazyadam_candle::{Config, LazyAdamOptimizer, SparseEmbedding};

#[derive(Clone, Debug)]
struct Opts {
    epochs: usize,
    vocab: usize,
    dim: usize,
    hidden: usize,
    seq: usize,
    batch: usize,
    samples: usize,
    lr: f64,
    seed: u64,
}

const USAGE: &str = "usage: train_embedding_mlp [--epochs N] [--vocab N] [--dim N] [--hidden N] \
[--seq N] [--batch N] [--samples N] [--lr X] [--seed N]";

fn parse_args(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        epochs: 6,
        vocab: 20_000,
        dim: 32,
        hidden: 64,
        seq: 8,
        batch: 128,
        samples: 8_192,
        lr: 0.005,
        seed: 42,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        if flag == "--help" || flag == "-h" {
            return Err(USAGE.to_owned());
        }
        let value = it
            .next()
            .ok_or_else(|| format!("option {flag} needs a value\n{USAGE}"))?;
        let size = |max: usize| -> Result<usize, String> {
            let n: usize = value
                .parse()
                .map_err(|_| format!("{flag}: `{value}` is not a whole number"))?;
            if n == 0 {
                return Err(format!("{flag} must be at least 1"));
            }
            if n > max {
                return Err(format!("{flag} must be at most {max} (got {n})"));
            }
            Ok(n)
        };
        match flag.as_str() {
            "--epochs" => o.epochs = size(1_000)?,
            "--vocab" => o.vocab = size(u32::MAX as usize)?,
            "--dim" => o.dim = size(4_096)?,
            "--hidden" => o.hidden = size(4_096)?,
            "--seq" => o.seq = size(1_024)?,
            "--batch" => o.batch = size(65_536)?,
            "--samples" => o.samples = size(10_000_000)?,
            "--lr" => {
                let lr: f64 = value
                    .parse()
                    .map_err(|_| format!("--lr: `{value}` is not a number"))?;
                if !(lr.is_finite() && lr > 0.0 && lr <= 1.0) {
                    return Err(format!("--lr must be in (0, 1] (got {value})"));
                }
                o.lr = lr;
            }
            "--seed" => {
                o.seed = value
                    .parse()
                    .map_err(|_| format!("--seed: `{value}` is not a whole number"))?
            }
            other => return Err(format!("unknown option `{other}`\n{USAGE}")),
        }
    }
    if o.epochs < 2 {
        return Err("--epochs must be at least 2 (the resume check stops halfway)".to_owned());
    }
    if o.batch > o.samples {
        return Err(format!(
            "--batch ({}) must not exceed --samples ({})",
            o.batch, o.samples
        ));
    }
    // Memory guard: the table and two moments (f32), plus the dense AdamW gradient.
    let table = o.vocab.saturating_mul(o.dim);
    if table > 200_000_000 {
        return Err(format!(
            "--vocab x --dim = {table} elements is too large for this example (max 2e8)"
        ));
    }
    if o.samples.checked_mul(o.seq).is_none_or(|n| n > 100_000_000) {
        return Err("--samples x --seq is too large for this example (max 1e8)".to_owned());
    }
    Ok(o)
}

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// The synthetic task: each sample is `seq` ids drawn with a skew (frequent ids, a long
/// tail); its target is `tanh` of the mean of a hidden per-id score plus a pairwise term.
struct Data {
    ids: Vec<u32>,
    y: Vec<f32>,
}

fn make_data(o: &Opts) -> Data {
    let mut rng = Rng::new(o.seed ^ 0xDA7A);
    let score: Vec<f32> = (0..o.vocab).map(|_| rng.unit()).collect();
    let mut ids = Vec::with_capacity(o.samples * o.seq);
    let mut y = Vec::with_capacity(o.samples);
    for _ in 0..o.samples {
        let mut s = 0.0f32;
        let start = ids.len();
        for _ in 0..o.seq {
            // Skewed: the square of a uniform index favours small ids.
            let u = rng.below(o.vocab);
            let id = u * rng.below(o.vocab) / o.vocab.max(1);
            ids.push(id as u32);
            s += score[id];
        }
        let first = score[ids[start] as usize];
        y.push((2.0 * s / o.seq as f32 + 0.5 * first * first).tanh());
    }
    Data { ids, y }
}

/// The model: an embedding table `emb.weight`, then mean over the sequence, `l1` (relu) and
/// `l2` (one output). Built in the given order of its parts, to show that nothing depends on
/// it. Initial values are set from the seed and each variable's name.
struct Model {
    varmap: VarMap,
    l1: Linear,
    l2: Linear,
    table: candle_core::Var,
}

fn build_model(o: &Opts, dev: &Device, reverse: bool) -> candle_core::Result<Model> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, dev);
    let emb = |vb: &VarBuilder<'_>| -> candle_core::Result<SparseEmbedding> {
        SparseEmbedding::from_varbuilder(o.vocab, o.dim, vb.pp("emb")).map_err(Into::into)
    };
    let (l1, l2, emb) = if reverse {
        let l2 = candle_nn::linear(o.hidden, 1, vb.pp("l2"))?;
        let l1 = candle_nn::linear(o.dim, o.hidden, vb.pp("l1"))?;
        (l1, l2, emb(&vb)?)
    } else {
        let emb = emb(&vb)?;
        let l1 = candle_nn::linear(o.dim, o.hidden, vb.pp("l1"))?;
        let l2 = candle_nn::linear(o.hidden, 1, vb.pp("l2"))?;
        (l1, l2, emb)
    };
    {
        let data = varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?;
        for (name, var) in data.iter() {
            let mut h = DefaultHasher::new();
            name.hash(&mut h);
            let mut rng = Rng::new(o.seed ^ h.finish());
            let fan_in = if name == "emb.weight" {
                1.0
            } else {
                var.dims().last().copied().unwrap_or(1) as f32
            };
            let scale = if name.ends_with(".bias") {
                0.0
            } else {
                1.0 / fan_in.sqrt()
            };
            let v: Vec<f32> = (0..var.elem_count()).map(|_| rng.unit() * scale).collect();
            var.set(&Tensor::from_vec(v, var.dims(), dev)?)?;
        }
    }
    let table = emb.table().clone();
    Ok(Model {
        varmap,
        l1,
        l2,
        table,
    })
}

fn head(m: &Model, rows: &Tensor) -> candle_core::Result<Tensor> {
    let h = rows.mean(1)?;
    let h = m.l1.forward(&h)?.relu()?;
    m.l2.forward(&h)?.squeeze(1)
}

fn batch(
    o: &Opts,
    data: &Data,
    order: &[usize],
    dev: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let mut ids = Vec::with_capacity(order.len() * o.seq);
    let mut y = Vec::with_capacity(order.len());
    for &i in order {
        ids.extend_from_slice(&data.ids[i * o.seq..(i + 1) * o.seq]);
        y.push(data.y[i]);
    }
    let n = order.len();
    Ok((
        Tensor::from_vec(ids, (n, o.seq), dev)?,
        Tensor::from_vec(y, n, dev)?,
    ))
}

/// The sample order of an epoch (a function of the seed and the epoch only, so a resumed run
/// sees the same batches).
fn epoch_order(o: &Opts, epoch: usize) -> Vec<usize> {
    let mut rng = Rng::new(o.seed ^ (epoch as u64 + 1).wrapping_mul(0xE90C));
    let mut p: Vec<usize> = (0..o.samples).collect();
    for i in (1..p.len()).rev() {
        p.swap(i, rng.below(i + 1));
    }
    p
}

enum Opt {
    Lazy(Box<LazyAdamOptimizer>, SparseEmbedding),
    AdamW(Box<AdamW>),
}

#[derive(Default)]
struct Timing {
    steps: u32,
    total: Duration,
    update: Duration,
}

/// One epoch; returns the mean training loss.
fn epoch(
    o: &Opts,
    data: &Data,
    m: &Model,
    opt: &mut Opt,
    e: usize,
    t: &mut Timing,
    dev: &Device,
) -> Result<f32, Box<dyn std::error::Error>> {
    let order = epoch_order(o, e);
    let mut sum = 0.0f64;
    let mut n = 0u32;
    for chunk in order.chunks_exact(o.batch) {
        let (ids, y) = batch(o, data, chunk, dev)?;
        let t0 = Instant::now();
        let (loss, dt_update) = match opt {
            Opt::Lazy(opt, emb) => {
                let rows = emb.forward(&ids)?;
                let loss = candle_nn::loss::mse(&head(m, &rows)?, &y)?;
                let grads = loss.backward()?;
                let t1 = Instant::now();
                let sparse = emb.take_sparse_grad(&grads)?;
                opt.step_mixed(&grads, &[sparse.as_sparse_grad()])?;
                (loss, t1.elapsed())
            }
            Opt::AdamW(opt) => {
                let rows = m.table.as_tensor().embedding(&ids.flatten_all()?)?;
                let rows = rows.reshape((chunk.len(), o.seq, o.dim))?;
                let loss = candle_nn::loss::mse(&head(m, &rows)?, &y)?;
                let grads = loss.backward()?;
                let t1 = Instant::now();
                opt.step(&grads)?;
                (loss, t1.elapsed())
            }
        };
        t.total += t0.elapsed();
        t.update += dt_update;
        t.steps += 1;
        sum += f64::from(loss.to_scalar::<f32>()?);
        n += 1;
    }
    Ok((sum / f64::from(n.max(1))) as f32)
}

fn lazy_opt(m: &Model, params: &ParamsAdamW) -> Result<Opt, Box<dyn std::error::Error>> {
    let opt = LazyAdamOptimizer::from_varmap(&m.varmap, Config::from_adamw(params)?)?;
    let emb = SparseEmbedding::new("emb.weight", m.table.clone())?;
    Ok(Opt::Lazy(Box::new(opt), emb))
}

/// Every variable's values as bits, by name.
type Snapshot = Vec<(String, Vec<u32>)>;

fn param_bits(vm: &VarMap) -> Result<Snapshot, Box<dyn std::error::Error>> {
    let data = vm.data().lock().map_err(|_| "VarMap lock poisoned")?;
    let mut out = Vec::new();
    for (name, var) in data.iter() {
        let v = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        out.push((name.clone(), v.iter().map(|x| x.to_bits()).collect()));
    }
    out.sort();
    Ok(out)
}

fn report(name: &str, t: &Timing) {
    let steps = f64::from(t.steps.max(1));
    println!(
        "{name:<9} time per step: {:>8.3} ms (forward + backward + update), update alone {:>8.3} ms, {} steps",
        t.total.as_secs_f64() * 1e3 / steps,
        t.update.as_secs_f64() * 1e3 / steps,
        t.steps
    );
}

fn run(o: &Opts, dir: &Path) -> Result<bool, Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    let data = make_data(o);
    let params = ParamsAdamW {
        lr: o.lr,
        weight_decay: 0.0,
        ..ParamsAdamW::default()
    };
    println!(
        "synthetic data: {} samples of {} ids, vocab {}, dim {}, hidden {}, batch {}, {} epochs, lr {}",
        o.samples, o.seq, o.vocab, o.dim, o.hidden, o.batch, o.epochs, o.lr
    );

    // 1. LazyAdam, sparse steps, uninterrupted.
    let lazy_model = build_model(o, &dev, false)?;
    let mut lazy = lazy_opt(&lazy_model, &params)?;
    // 2. candle's AdamW on the same model (same initial values).
    let adamw_model = build_model(o, &dev, false)?;
    if param_bits(&adamw_model.varmap)? != param_bits(&lazy_model.varmap)? {
        return Err("the two models do not start from the same values".into());
    }
    let mut adamw = Opt::AdamW(Box::new(AdamW::new(
        adamw_model.varmap.all_vars(),
        params.clone(),
    )?));
    let (mut tl, mut ta) = (Timing::default(), Timing::default());
    for e in 0..o.epochs {
        let l = epoch(o, &data, &lazy_model, &mut lazy, e, &mut tl, &dev)?;
        let a = epoch(o, &data, &adamw_model, &mut adamw, e, &mut ta, &dev)?;
        println!(
            "epoch {:>2}: loss LazyAdam (sparse) {l:.5}   AdamW (dense) {a:.5}",
            e + 1
        );
    }
    report("LazyAdam", &tl);
    report("AdamW", &ta);

    // 3. Stop halfway, save, resume in a fresh VarMap + optimizer (model built in reverse
    //    order), and finish.
    let half = o.epochs / 2;
    let first = build_model(o, &dev, false)?;
    let mut opt = lazy_opt(&first, &params)?;
    let mut t = Timing::default();
    for e in 0..half {
        epoch(o, &data, &first, &mut opt, e, &mut t, &dev)?;
    }
    let (params_file, state_file) = (dir.join("model.safetensors"), dir.join("optim.safetensors"));
    first.varmap.save(&params_file)?;
    if let Opt::Lazy(opt, _) = &opt {
        opt.save(&state_file)?;
    }
    drop((first, opt));

    let mut resumed = build_model(o, &dev, true)?;
    resumed.varmap.load(&params_file)?;
    let mut opt = lazy_opt(&resumed, &params)?;
    if let Opt::Lazy(opt, _) = &mut opt {
        opt.load_state(&state_file)?;
    }
    for e in half..o.epochs {
        epoch(o, &data, &resumed, &mut opt, e, &mut t, &dev)?;
    }
    let (a, b) = (
        param_bits(&lazy_model.varmap)?,
        param_bits(&resumed.varmap)?,
    );
    let same = a == b;
    let n = a.len();
    if same {
        println!(
            "resume check: OK, stopped after epoch {half}, saved, resumed in a fresh VarMap and optimizer: \
             all {n} variables bit-identical to the uninterrupted run"
        );
    } else {
        let differ: Vec<&str> = a
            .iter()
            .zip(&b)
            .filter(|(x, y)| x != y)
            .map(|(x, _)| x.0.as_str())
            .collect();
        println!("resume check: FAILED, parameters differ from the uninterrupted run: {differ:?}");
    }
    Ok(same)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match parse_args(&args) {
        Ok(o) => o,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    let dir = std::env::temp_dir().join(format!("lazyadam-candle-example-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("cannot create {}: {e}", dir.display());
        return ExitCode::FAILURE;
    }
    let result = run(&opts, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
