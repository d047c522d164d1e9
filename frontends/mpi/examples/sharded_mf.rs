//! Matrix factorization with the embedding tables sharded across MPI ranks,
//! checked bit for bit against one process.
//!
//! ```text
//! cargo build --release --example sharded_mf
//! mpirun -np 4 target/release/examples/sharded_mf [--users N] [--items N] [--dim N]
//!     [--steps N] [--batch N] [--seed N] [--lr X] [--checkpoint-dir DIR]
//! ```
//!
//! (as root add `--allow-run-as-root`, and `--oversubscribe` for more ranks
//! than cores; run it alone for one rank).
//!
//! A model `rating(u, i) = <user_u, item_i> + bias` with a user table and an
//! item table ([`ShardedLazyAdam`] tables: rank `r` holds a contiguous row
//! range of each) and a dense bias (replicated), trained with LazyAdam on
//! synthetic ratings from hidden factors. Every step has a global batch of
//! `--batch` examples drawn deterministically from the seed; rank `r` makes
//! its slice of it (examples `batch * r / N .. batch * (r + 1) / N`), fetches
//! the rows it needs from their owners, computes its gradients and takes part
//! in the sharded step.
//!
//! At the end every rank's checkpoint ([`ShardedLazyAdam::shard_to_bytes`]:
//! its rows with their slots, the step counter and configuration) goes to
//! rank 0 (and, with `--checkpoint-dir`, to `DIR/shard-R-of-N.lzshard`), and
//! rank 0 fetches every row of both tables. Rank 0 then trains the same model
//! in one process with [`LazyAdam`] on the concatenated batches (the bias
//! gradient being the ranks' partial gradients summed in rank order, as the
//! sharded step does) and compares the loss of every step and every
//! parameter, bit for bit; it also loads the N ranks' checkpoints into one
//! rank ([`ShardedLazyAdam::from_shards`], resharding N to 1) and compares
//! every parameter and moment with the one-process run. It prints
//! `bit-identity check: OK (...)`, or the first differences and exits with
//! status 1.

use std::ops::Range;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use lazyadam::{
    Collective, DType, Gradient, LazyAdam, LazyAdamConfig, LearningRate, ShardGradient,
    ShardedLazyAdam, TensorMut, ThreadCollective, Update, WeightData, WeightTensor,
};
use lazyadam_mpi::MpiCollective;
use lazyadam_mpi::mpi::environment::Universe;
use lazyadam_mpi::mpi::traits::Communicator;

/// The run's settings.
#[derive(Clone, Debug)]
struct Args {
    users: usize,
    items: usize,
    dim: usize,
    steps: usize,
    batch: usize,
    seed: u64,
    lr: f32,
    checkpoint_dir: Option<PathBuf>,
}

const USAGE: &str = "usage: sharded_mf [--users N] [--items N] [--dim N] [--steps N] [--batch N] \
                     [--seed N] [--lr X] [--checkpoint-dir DIR]";

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        users: 500,
        items: 200,
        dim: 16,
        steps: 200,
        batch: 512,
        seed: 42,
        lr: 0.05,
        checkpoint_dir: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--help" || flag == "-h" {
            return Err(USAGE.to_string());
        }
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}\n{USAGE}");
        match flag.as_str() {
            "--users" => a.users = value.parse().map_err(|e| bad(&e))?,
            "--items" => a.items = value.parse().map_err(|e| bad(&e))?,
            "--dim" => a.dim = value.parse().map_err(|e| bad(&e))?,
            "--steps" => a.steps = value.parse().map_err(|e| bad(&e))?,
            "--batch" => a.batch = value.parse().map_err(|e| bad(&e))?,
            "--seed" => a.seed = value.parse().map_err(|e| bad(&e))?,
            "--lr" => a.lr = value.parse().map_err(|e| bad(&e))?,
            "--checkpoint-dir" => a.checkpoint_dir = Some(PathBuf::from(value)),
            _ => return Err(format!("unknown argument {flag}\n{USAGE}")),
        }
    }
    if a.users == 0 || a.items == 0 || a.dim == 0 || a.batch == 0 {
        return Err(format!(
            "--users, --items, --dim and --batch must be positive\n{USAGE}"
        ));
    }
    if a.users > u32::MAX as usize || a.items > u32::MAX as usize {
        return Err(format!("at most 2^32 - 1 users and items\n{USAGE}"));
    }
    Ok(a)
}

/// splitmix64.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A value in [-1, 1) from a hash.
fn unit(h: u64) -> f32 {
    ((h >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

/// Table numbers, for hashing.
const USERS: u64 = 1;
const ITEMS: u64 = 2;

/// Initial parameter of element `e` of row `row` of table `t`.
fn init(seed: u64, t: u64, row: usize, e: usize) -> f32 {
    unit(mix(seed ^ mix(t << 56 ^ (row as u64) << 16 ^ e as u64))) * 0.1
}

/// The hidden factor behind the ratings (not the model's parameter).
fn hidden(seed: u64, t: u64, row: usize, e: usize) -> f32 {
    unit(mix(!seed ^ mix(t << 56 ^ (row as u64) << 16 ^ e as u64)))
}

/// Example `j` of the global batch of `step`: (user, item, rating). Ids are
/// skewed towards low rows (popular users and items), so that a batch has
/// duplicates within and across ranks.
fn example(a: &Args, step: usize, j: usize) -> (u32, u32, f32) {
    let h = |k: u64| mix(a.seed ^ mix((step as u64) << 32 ^ (j as u64) << 2 ^ k));
    let skewed = |x: u64, n: usize| {
        let u = (x >> 11) as f64 / (1u64 << 53) as f64;
        ((u * u * n as f64) as usize).min(n - 1)
    };
    let u = skewed(h(0), a.users);
    let i = skewed(h(1), a.items);
    let mut y = 0.0f32;
    for e in 0..a.dim {
        y += hidden(a.seed, USERS, u, e) * hidden(a.seed, ITEMS, i, e);
    }
    let y = y / (a.dim as f32).sqrt() + 0.05 * unit(h(2));
    (u as u32, i as u32, y)
}

/// The examples of rank `r`'s slice of a global batch.
fn slice(batch: usize, ranks: usize, r: usize) -> Range<usize> {
    batch * r / ranks..batch * (r + 1) / ranks
}

/// One slice's gradients (mean squared error over the global batch).
struct SliceGrads {
    user_ids: Vec<u32>,
    user_rows: Vec<f32>,
    item_ids: Vec<u32>,
    item_rows: Vec<f32>,
    /// d loss / d bias over the slice (f32, in example order).
    bias: f32,
    /// Sum of squared errors over the slice (f64, in example order).
    sq_err: f64,
}

/// The ids of a slice's examples.
fn slice_ids(a: &Args, step: usize, examples: Range<usize>) -> (Vec<u32>, Vec<u32>, Vec<f32>) {
    let mut us = Vec::with_capacity(examples.len());
    let mut is = Vec::with_capacity(examples.len());
    let mut ys = Vec::with_capacity(examples.len());
    for j in examples {
        let (u, i, y) = example(a, step, j);
        us.push(u);
        is.push(i);
        ys.push(y);
    }
    (us, is, ys)
}

/// Gradients of a slice from the current rows of its users and items (one
/// row per example, in example order) and the bias. The same code for the
/// sharded ranks and for the single process: the same inputs give the same bits.
fn gradients(
    a: &Args,
    (us, is, ys): (Vec<u32>, Vec<u32>, Vec<f32>),
    user_rows: &[f32],
    item_rows: &[f32],
    bias: f32,
) -> SliceGrads {
    let d = a.dim;
    let scale = 1.0 / a.batch as f32;
    let mut g = SliceGrads {
        user_rows: Vec::with_capacity(us.len() * d),
        item_rows: Vec::with_capacity(is.len() * d),
        user_ids: us,
        item_ids: is,
        bias: 0.0,
        sq_err: 0.0,
    };
    for (k, &y) in ys.iter().enumerate() {
        let p = &user_rows[k * d..(k + 1) * d];
        let q = &item_rows[k * d..(k + 1) * d];
        let mut pred = bias;
        for e in 0..d {
            pred += p[e] * q[e];
        }
        let err = pred - y;
        g.sq_err += f64::from(err) * f64::from(err);
        let ge = err * scale;
        g.user_rows.extend(q.iter().map(|x| ge * x));
        g.item_rows.extend(p.iter().map(|x| ge * x));
        g.bias += ge;
    }
    g
}

/// The configuration of both runs: LazyAdam with a global clip norm (whose
/// norm spans every rank's gradients).
fn config(a: &Args) -> LazyAdamConfig {
    LazyAdamConfig {
        learning_rate: LearningRate::Constant(a.lr),
        global_clipnorm: Some(1.0),
        ..LazyAdamConfig::default()
    }
}

/// What a run ends with.
struct Trained {
    losses: Vec<f64>,
    users: Vec<f32>,
    items: Vec<f32>,
    bias: f32,
}

type Failure = Box<dyn std::error::Error + Send + Sync>;

/// Rows `ids` of a full row-major table of `dim` values per row.
fn rows_of(table: &[f32], ids: &[u32], dim: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(ids.len() * dim);
    for &id in ids {
        let at = id as usize * dim;
        out.extend_from_slice(&table[at..at + dim]);
    }
    out
}

/// The sum of rank-order f64 values, as every run adds them.
fn total(parts: impl IntoIterator<Item = f64>) -> f64 {
    parts.into_iter().fold(0.0, |s, x| s + x)
}

/// The sharded run, on every rank; returns what rank 0 gathered (empty
/// tables on the other ranks) and every rank's checkpoint (on rank 0).
fn sharded(a: &Args, universe: &Universe) -> Result<(Trained, Vec<Vec<u8>>, f64), Failure> {
    // The optimizer's collective, and one of the example's own on a
    // duplicate communicator (losses and checkpoints).
    let mut opt = ShardedLazyAdam::new(config(a), MpiCollective::world(universe)?)?;
    let mut aux = MpiCollective::new(universe.world().duplicate())?;
    let (rank, ranks) = (opt.rank(), opt.size());
    let d = a.dim;
    let users = opt.add_table("users", a.users, d, DType::F32, DType::F32)?;
    let items = opt.add_table("items", a.items, d, DType::F32, DType::F32)?;
    let bias = opt.add_dense("bias", &[1], DType::F32, DType::F32)?;
    for (var, t) in [(users, USERS), (items, ITEMS)] {
        let own = opt.owned(var).ok_or("a table has no row range")?;
        let Some(TensorMut::F32(p)) = opt.params_mut(var) else {
            return Err("f32 table parameters expected".into());
        };
        for (k, x) in p.iter_mut().enumerate() {
            *x = init(a.seed, t, own.start + k / d, k % d);
        }
    }

    let start = Instant::now();
    let mut losses = Vec::with_capacity(a.steps);
    for step in 0..a.steps {
        let ex = slice_ids(a, step, slice(a.batch, ranks, rank));
        // This slice's rows, from their owners (collective).
        let user_rows = opt.fetch_rows(users, &ex.0)?;
        let item_rows = opt.fetch_rows(items, &ex.1)?;
        let b = opt
            .params(bias)
            .and_then(|t| t.get_f32(0))
            .ok_or("no bias")?;
        let g = gradients(a, ex, &user_rows, &item_rows, b);
        let bias_grad = [g.bias];
        opt.step(&[
            ShardGradient::new(users, Gradient::sparse(&g.user_ids, &g.user_rows)),
            ShardGradient::new(items, Gradient::sparse(&g.item_ids, &g.item_rows)),
            ShardGradient::new(bias, Gradient::dense(&bias_grad)),
        ])?;
        // The global batch's loss: every rank's sum, added in rank order.
        let parts = aux.all_gather(&g.sq_err.to_le_bytes())?;
        let sums = parts
            .iter()
            .map(|p| <[u8; 8]>::try_from(p.as_slice()).map(f64::from_le_bytes))
            .collect::<Result<Vec<f64>, _>>()?;
        let loss = total(sums) / (2 * a.batch) as f64;
        losses.push(loss);
        if rank == 0 && (step % 25 == 0 || step + 1 == a.steps) {
            println!("  step {step:>4}  loss {loss:.6}");
        }
    }
    let seconds = start.elapsed().as_secs_f64();

    // Every rank's state: its checkpoint to rank 0 (and to a file of its own).
    let state = opt.shard_to_bytes()?;
    if let Some(dir) = &a.checkpoint_dir {
        std::fs::create_dir_all(dir)?;
        opt.save_shard(dir)?;
    }
    let mut send = vec![Vec::new(); ranks];
    send[0] = state;
    let checkpoints = aux.all_to_all(send)?;

    // Every row, on rank 0.
    let want = |n: usize| -> Vec<u32> {
        if rank == 0 {
            (0..n as u32).collect()
        } else {
            Vec::new()
        }
    };
    let all_users = opt.fetch_rows(users, &want(a.users))?;
    let all_items = opt.fetch_rows(items, &want(a.items))?;
    let b = opt
        .params(bias)
        .and_then(|t| t.get_f32(0))
        .ok_or("no bias")?;
    Ok((
        Trained {
            losses,
            users: all_users,
            items: all_items,
            bias: b,
        },
        checkpoints,
        seconds,
    ))
}

/// The same training in one process on the concatenated batches, with the
/// plain optimizer; returns its final state too.
fn single(a: &Args, ranks: usize) -> Result<(Trained, LazyAdam), Failure> {
    let d = a.dim;
    let mut opt = LazyAdam::new(config(a))?;
    let users = opt.add_variable("users", &[a.users, d], DType::F32, DType::F32)?;
    let items = opt.add_variable("items", &[a.items, d], DType::F32, DType::F32)?;
    let bias = opt.add_variable("bias", &[1], DType::F32, DType::F32)?;
    let mut pu: Vec<f32> = (0..a.users * d)
        .map(|k| init(a.seed, USERS, k / d, k % d))
        .collect();
    let mut pi: Vec<f32> = (0..a.items * d)
        .map(|k| init(a.seed, ITEMS, k / d, k % d))
        .collect();
    let mut pb = [0.0f32];
    let mut losses = Vec::with_capacity(a.steps);
    for step in 0..a.steps {
        let mut cat = SliceGrads {
            user_ids: Vec::new(),
            user_rows: Vec::new(),
            item_ids: Vec::new(),
            item_rows: Vec::new(),
            bias: 0.0,
            sq_err: 0.0,
        };
        let mut bias_grad: Option<f32> = None;
        let mut sums = Vec::with_capacity(ranks);
        for r in 0..ranks {
            let ex = slice_ids(a, step, slice(a.batch, ranks, r));
            let ur = rows_of(&pu, &ex.0, d);
            let ir = rows_of(&pi, &ex.1, d);
            let g = gradients(a, ex, &ur, &ir, pb[0]);
            cat.user_ids.extend_from_slice(&g.user_ids);
            cat.user_rows.extend_from_slice(&g.user_rows);
            cat.item_ids.extend_from_slice(&g.item_ids);
            cat.item_rows.extend_from_slice(&g.item_rows);
            // Dense gradients: the ranks' partial gradients, summed in rank order.
            bias_grad = Some(bias_grad.map_or(g.bias, |s| s + g.bias));
            sums.push(g.sq_err);
        }
        losses.push(total(sums) / (2 * a.batch) as f64);
        let bg = [bias_grad.unwrap_or(0.0)];
        opt.apply_gradients(&mut [
            Update::new(
                users,
                &mut pu,
                Gradient::sparse(&cat.user_ids, &cat.user_rows),
            ),
            Update::new(
                items,
                &mut pi,
                Gradient::sparse(&cat.item_ids, &cat.item_rows),
            ),
            Update::new(bias, &mut pb, Gradient::dense(&bg)),
        ])?;
    }
    Ok((
        Trained {
            losses,
            users: pu,
            items: pi,
            bias: pb[0],
        },
        opt,
    ))
}

/// Counts differing bits between two f32 sequences, printing the first few.
fn compare(what: &str, got: &[f32], want: &[f32], diffs: &mut usize) {
    if got.len() != want.len() {
        println!("  {what}: {} values, expected {}", got.len(), want.len());
        *diffs += 1;
        return;
    }
    let mut shown = 0;
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        if g.to_bits() != w.to_bits() {
            *diffs += 1;
            if shown < 5 {
                println!(
                    "  {what}[{k}]: {g:e} (bits {:08x}), expected {w:e} (bits {:08x})",
                    g.to_bits(),
                    w.to_bits()
                );
                shown += 1;
            }
        }
    }
}

fn f32_data(t: &WeightTensor) -> Option<&[f32]> {
    match &t.data {
        WeightData::F32(v) => Some(v),
        _ => None,
    }
}

/// Rank 0: the sharded results against the single process.
fn verify(
    a: &Args,
    ranks: usize,
    got: &Trained,
    checkpoints: &[Vec<u8>],
) -> Result<usize, Failure> {
    let (want, reference) = single(a, ranks)?;
    let mut diffs = 0;
    let differing = got
        .losses
        .iter()
        .zip(&want.losses)
        .position(|(g, w)| g.to_bits() != w.to_bits());
    if got.losses.len() != want.losses.len() || differing.is_some() {
        let s = differing.unwrap_or(0);
        println!(
            "  loss of step {s}: {:?}, expected {:?}",
            got.losses.get(s),
            want.losses.get(s)
        );
        diffs += 1;
    }
    compare("users", &got.users, &want.users, &mut diffs);
    compare("items", &got.items, &want.items, &mut diffs);
    compare("bias", &[got.bias], &[want.bias], &mut diffs);

    // The N ranks' checkpoints loaded into one rank (resharding N to 1): every
    // parameter and moment of the one-process run.
    let refs: Vec<&[u8]> = checkpoints.iter().map(|c| c.as_slice()).collect();
    let one = ThreadCollective::group(1)
        .pop()
        .ok_or("no one-rank collective")?;
    let loaded = ShardedLazyAdam::from_shards(&refs, one)?;
    if loaded.iterations() != reference.iterations() {
        println!(
            "  loaded checkpoints: step counter {}, expected {}",
            loaded.iterations(),
            reference.iterations()
        );
        diffs += 1;
    }
    let full = reference.get_weights();
    let ws = loaded.local().get_weights();
    let find = |ws: &[WeightTensor], name: &str| ws.iter().find(|w| w.name == name).cloned();
    for (name, want_params) in [
        ("users", &want.users[..]),
        ("items", &want.items[..]),
        ("bias", &[want.bias][..]),
    ] {
        let id = loaded
            .local()
            .variable_id(name)
            .ok_or("a variable is missing from the checkpoints")?;
        let params = loaded
            .params(id)
            .map(|t| t.to_f32_vec())
            .unwrap_or_default();
        compare(&format!("loaded {name}"), &params, want_params, &mut diffs);
        for slot in ["m", "v"] {
            let name = format!("{name}/{slot}");
            let (Some(l), Some(f)) = (find(&ws, &name), find(&full, &name)) else {
                println!("  no {name} in the loaded checkpoints or the reference");
                diffs += 1;
                continue;
            };
            let (Some(l), Some(f)) = (f32_data(&l), f32_data(&f)) else {
                println!("  {name} is not f32");
                diffs += 1;
                continue;
            };
            compare(&format!("loaded {name}"), l, f, &mut diffs);
        }
    }
    Ok(diffs)
}

fn run(a: &Args, universe: &Universe) -> Result<ExitCode, Failure> {
    let world = universe.world();
    let (rank, ranks) = (world.rank() as usize, world.size() as usize);
    if a.batch < ranks {
        return Err(format!("--batch {} is smaller than the {ranks} ranks", a.batch).into());
    }
    if rank == 0 {
        println!(
            "sharded_mf: {ranks} rank(s); users {} x {}, items {} x {}, bias; {} steps of {} \
             examples (seed {})",
            a.users, a.dim, a.items, a.dim, a.steps, a.batch, a.seed
        );
    }
    let (got, checkpoints, seconds) = sharded(a, universe)?;
    if rank != 0 {
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "sharded training: {seconds:.2} s ({:.0} steps/s); final loss {:.6}",
        a.steps as f64 / seconds,
        got.losses.last().copied().unwrap_or(f64::NAN)
    );
    if let Some(dir) = &a.checkpoint_dir {
        println!("per-rank checkpoints in {}", dir.display());
    }
    let diffs = verify(a, ranks, &got, &checkpoints)?;
    // Parameters, m and v of both tables and the bias.
    let values = 3 * ((a.users + a.items) * a.dim + 1);
    if diffs == 0 {
        println!(
            "bit-identity check: OK ({ranks} rank(s) vs one process: {} step losses, {values} \
             parameters and moments, {} per-rank checkpoints loaded into one rank)",
            a.steps,
            checkpoints.len()
        );
        Ok(ExitCode::SUCCESS)
    } else {
        println!("bit-identity check: FAILED ({diffs} differences)");
        Ok(ExitCode::FAILURE)
    }
}

fn main() -> ExitCode {
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let Some(universe) = lazyadam_mpi::mpi::initialize() else {
        eprintln!("sharded_mf: MPI was already initialized");
        return ExitCode::FAILURE;
    };
    let code = match run(&a, &universe) {
        Ok(code) => code,
        Err(e) => {
            // The other ranks may be waiting in a collective: end the job.
            eprintln!("sharded_mf: rank {}: {e}", universe.world().rank());
            universe.world().abort(2)
        }
    };
    drop(universe); // MPI_Finalize
    code
}
