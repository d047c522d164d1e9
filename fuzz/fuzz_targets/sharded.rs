//! The sharded optimizer against a forged peer and forged shard files: never a panic, and a
//! step, fetch or load that fails writes nothing.
//!
//! Input: the first byte picks the mode.
//! - even: rank 0 of a two-rank group whose peer (rank 1) answers every all-gather and
//!   all-to-all with bytes from the input (the first 8 bytes of an all-gather answer are
//!   replaced by rank 0's fingerprint when the input says so, so that the payload is parsed);
//!   rank 0 steps with gradients drawn from the input (ids in and out of range, NaN, dense and
//!   sparse; any non-finite policy), then fetches rows. An error leaves every parameter, slot and the step counter as
//!   they were.
//! - odd: the rest is split into two shard files (the second may be a valid shard of a real
//!   run) and loaded as rank 0 and as rank 1 of two: an error or a usable optimizer, never a
//!   panic.
#![no_main]

use std::collections::VecDeque;

use arbitrary::{Result, Unstructured};
use lazyadam::{
    Collective, CollectiveError, DType, DynamicLossScale, Extensions, Gradient, LazyAdamConfig,
    NonFinitePolicy, ShardGradient, ShardedLazyAdam,
};
use libfuzzer_sys::fuzz_target;

/// Rank 0 of two; rank 1's answers come from the input.
struct Forged {
    answers: VecDeque<(bool, Vec<u8>)>,
}

impl Collective for Forged {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        2
    }
    fn all_gather(&mut self, local: &[u8]) -> Result<Vec<Vec<u8>>, CollectiveError> {
        let (keep_fp, mut peer) = self.answers.pop_front().ok_or("the peer left")?;
        if keep_fp && peer.len() >= 8 && local.len() >= 8 {
            peer[..8].copy_from_slice(&local[..8]);
        }
        Ok(vec![local.to_vec(), peer])
    }
    fn all_to_all(&mut self, send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, CollectiveError> {
        let (_, peer) = self.answers.pop_front().ok_or("the peer left")?;
        Ok(vec![send.into_iter().next().unwrap_or_default(), peer])
    }
}

fn state<C: Collective>(opt: &ShardedLazyAdam<C>) -> String {
    let w: Vec<_> = opt.local().get_weights();
    let ids: Vec<_> = opt.local().variable_ids().collect();
    let params: Vec<_> = ids
        .iter()
        .map(|&id| {
            opt.params(id).map(|p| {
                p.to_f32_vec()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    format!("{}|{:?}|{:?}", opt.iterations(), w, params)
}

fn forged_peer(u: &mut Unstructured<'_>) -> Result<()> {
    let mut answers = VecDeque::new();
    for _ in 0..u.int_in_range(0..=6)? {
        let keep: bool = u.arbitrary()?;
        let len = u.int_in_range(0..=200)?;
        let bytes = u.bytes(len)?.to_vec();
        answers.push_back((keep, bytes));
    }
    let mut cfg = LazyAdamConfig::new(0.01f32);
    match u.int_in_range(0..=2)? {
        0 => {}
        1 => cfg = cfg.with_clipnorm(1.0),
        _ => cfg = cfg.with_global_clipnorm(0.5),
    }
    // A checking policy sends each table's largest magnitude and id count, and may take a
    // second agreement round for the sums of duplicate rows (a tiny loss scale makes finite
    // values' sums overflow).
    let non_finite = match u.int_in_range(0..=2)? {
        0 => NonFinitePolicy::Propagate,
        1 => NonFinitePolicy::Error,
        _ => NonFinitePolicy::SkipStep {
            loss_scale: Some(DynamicLossScale {
                scale: 2f32.powi(-100),
                ..DynamicLossScale::default()
            }),
        },
    };
    let ext = Extensions::default().with_non_finite(non_finite);
    let Ok(mut opt) = ShardedLazyAdam::with_extensions(cfg, ext, Forged { answers }) else {
        return Ok(());
    };
    let rows = u.int_in_range(0..=9)?;
    let dim = u.int_in_range(0..=3)?;
    let Ok(t) = opt.add_table("t", rows, dim, DType::F32, DType::F32) else {
        return Ok(());
    };
    let Ok(d) = opt.add_dense("d", &[2], DType::F16, DType::F32) else {
        return Ok(());
    };
    for _ in 0..2 {
        let n = u.int_in_range(0..=4)?;
        let ids: Vec<u32> = (0..n)
            .map(|_| u.int_in_range(0..=10))
            .collect::<Result<_>>()?;
        let vals: Vec<f32> = (0..n * dim + u.int_in_range(0..=1)?)
            .map(|_| u.arbitrary())
            .collect::<Result<_>>()?;
        let dense: Vec<lazyadam::f16> = (0..2)
            .map(|_| u.arbitrary::<u16>().map(lazyadam::f16::from_bits))
            .collect::<Result<_>>()?;
        let before = state(&opt);
        let mut grads = vec![ShardGradient::new(t, Gradient::sparse(&ids, &vals))];
        if u.arbitrary()? {
            grads.push(ShardGradient::new(d, Gradient::dense(&dense)));
        }
        if opt.step(&grads).is_err() {
            assert_eq!(before, state(&opt), "a failed step wrote");
        }
        let before = state(&opt);
        let want: Vec<u32> = (0..u.int_in_range(0..=3)?)
            .map(|_| u.int_in_range(0..=10))
            .collect::<Result<_>>()?;
        if let Ok(rows_back) = opt.fetch_rows(t, &want) {
            assert_eq!(rows_back.len(), want.len() * dim);
        }
        assert_eq!(before, state(&opt), "a fetch wrote");
    }
    Ok(())
}

/// Rank `rank` of two whose peer agrees with everything: it answers an all-gather with this
/// rank's own message and an all-to-all with what this rank sent it. No threads (LeakSanitizer
/// reports the thread-local destructors of exited threads as leaks).
struct Echo {
    rank: usize,
}

impl Collective for Echo {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        2
    }
    fn all_gather(&mut self, local: &[u8]) -> Result<Vec<Vec<u8>>, CollectiveError> {
        Ok(vec![local.to_vec(), local.to_vec()])
    }
    fn all_to_all(&mut self, send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, CollectiveError> {
        let peer = send.get(1 - self.rank).cloned().unwrap_or_default();
        let mine = send.get(self.rank).cloned().unwrap_or_default();
        let mut out = vec![Vec::new(), Vec::new()];
        out[self.rank] = mine;
        out[1 - self.rank] = peer;
        Ok(out)
    }
}

/// A valid shard of rank 1 of two, to pair with forged ones.
fn real_shard() -> Vec<u8> {
    let mut opt = ShardedLazyAdam::new(LazyAdamConfig::default(), Echo { rank: 1 }).unwrap();
    let t = opt.add_table("t", 5, 2, DType::F32, DType::F32).unwrap();
    opt.step(&[ShardGradient::new(
        t,
        Gradient::sparse(&[3u32, 4], &[0.5f32; 4]),
    )])
    .unwrap();
    opt.shard_to_bytes().unwrap()
}

fn forged_shards(data: &[u8]) {
    let real = real_shard();
    let cut = data.first().map_or(0, |&b| b as usize).min(data.len());
    let (a, b) = data.split_at(cut);
    for shards in [vec![a, b], vec![a, real.as_slice()], vec![data]] {
        for rank in [0, 1] {
            if let Ok(mut opt) = ShardedLazyAdam::from_shards(&shards, Echo { rank }) {
                let ids: Vec<_> = opt.local().variable_ids().collect();
                for id in ids {
                    if opt.owned(id).is_some() {
                        let _ = opt.fetch_rows(id, &[0u32, 4]);
                    }
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        let _ = forged_peer(&mut Unstructured::new(rest));
    } else {
        forged_shards(rest);
    }
});
