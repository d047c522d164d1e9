//! Checkpoints under attack: the same state always gives the same bytes;
//! every single-bit flip of a checkpoint is refused (or, never seen so far,
//! loads the very same state); a header that claims a lot costs memory in
//! proportion to what the checkpoint declares, not to what it claims.
//!
//! This file has its own test binary, with a counting global allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use lazyadam::{
    DType, DynamicLossScale, Error, Extensions, Gradient, LazyAdam, LazyAdamConfig,
    NonFinitePolicy, Update, WeightTensor,
};

/// Counts live bytes and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; the
// counters only observe sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: `p` came from `alloc` with this layout.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn trained() -> LazyAdam {
    let ext = Extensions {
        per_row_bias_correction: true,
        catch_up_decay: true,
        sparse_amsgrad: true,
        non_finite: NonFinitePolicy::SkipStep {
            loss_scale: Some(DynamicLossScale::default()),
        },
        ..Extensions::default()
    };
    let config = LazyAdamConfig {
        amsgrad: true,
        ..LazyAdamConfig::default()
    };
    let mut opt = LazyAdam::with_extensions(config, ext).unwrap();
    let a = opt
        .add_variable("emb", &[3, 2], DType::F32, DType::F32)
        .unwrap();
    let b = opt
        .add_variable("b", &[2], DType::F16, DType::BF16)
        .unwrap();
    let z = opt
        .add_variable("z", &[2, 0], DType::F32, DType::F16)
        .unwrap();
    let mut pa = vec![0.5f32; 6];
    let mut pb = vec![lazyadam::f16::ONE; 2];
    let mut pz: Vec<f32> = vec![];
    for s in 0..3u32 {
        opt.apply_gradients(&mut [
            Update::new(
                a,
                &mut pa,
                Gradient::sparse(&[s % 3, 2], &[0.1f32, 0.2, -0.3, 0.4]),
            ),
            Update::new(b, &mut pb, Gradient::dense(&[0.5f32, -1.0])),
            Update::new(z, &mut pz, Gradient::sparse(&[1u32], &[] as &[f32])),
        ])
        .unwrap();
    }
    opt
}

fn bits(opt: &LazyAdam) -> (String, Vec<WeightTensor>, Option<f32>) {
    (
        format!("{:?}|{:?}", opt.config(), opt.extensions()),
        opt.get_weights(),
        opt.loss_scale(),
    )
}

#[test]
fn the_same_state_gives_the_same_bytes() {
    let bytes = trained().to_bytes().unwrap();
    for _ in 0..20 {
        // Fresh optimizers (fresh hash maps inside) and repeated writes.
        let opt = trained();
        assert_eq!(opt.to_bytes().unwrap(), bytes);
        assert_eq!(opt.to_bytes().unwrap(), bytes);
    }
    // And a load-save round trip keeps them.
    let back = LazyAdam::from_bytes(&bytes).unwrap();
    assert_eq!(back.to_bytes().unwrap(), bytes);
}

#[test]
fn every_single_bit_flip_is_refused() {
    let opt = trained();
    let bytes = opt.to_bytes().unwrap();
    let want = bits(&opt);
    let mut loaded_same = 0;
    for i in 0..bytes.len() {
        for bit in 0..8 {
            let mut b = bytes.clone();
            b[i] ^= 1 << bit;
            match LazyAdam::from_bytes(&b) {
                Err(e) => assert!(matches!(e, Error::Checkpoint(_) | Error::Config(_)), "{e}"),
                Ok(o) => {
                    // Allowed only if nothing observable changed.
                    assert_eq!(
                        bits(&o),
                        want,
                        "byte {i} bit {bit} loaded a different state"
                    );
                    loaded_same += 1;
                }
            }
        }
    }
    assert_eq!(loaded_same, 0, "flips that loaded (to the same state)");
}

/// A header of tens of MB (within safetensors' 100 MB limit) full of tensor
/// entries nobody declared is refused at the first one, without parsing the
/// rest; one full of junk metadata is refused by the per-key caps.
#[test]
fn a_huge_header_costs_memory_in_proportion_to_the_declarations() {
    let bytes = trained().to_bytes().unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap().trim_end();
    let data = &bytes[8 + n..];
    let forge = |extra: &str| {
        let mut h = String::with_capacity(header.len() + extra.len() + 8);
        h.push_str(&header[..header.len() - 1]); // drop the closing brace
        h.push_str(extra);
        h.push('}');
        while !h.len().is_multiple_of(8) {
            h.push(' ');
        }
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out
    };
    // 80 MB of tiny tensor entries after the real ones.
    let mut junk = String::with_capacity(80 << 20);
    let mut k = 0u64;
    while junk.len() < 80 << 20 {
        junk.push_str(&format!(
            ",\"t{k}\":{{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[0,0]}}"
        ));
        k += 1;
    }
    let forged = forge(&junk);
    drop(junk);
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let e = LazyAdam::from_bytes(&forged).unwrap_err();
    let extra = PEAK.load(Ordering::Relaxed) - base;
    assert!(e.to_string().contains("unexpected tensor `t0`"), "{e}");
    assert!(
        extra < 1 << 20,
        "{extra} bytes allocated to refuse an 80 MB header"
    );

    // 80 MB of junk inside one metadata value: refused by the cap on it.
    let meta_junk = format!(
        "{{\"__metadata__\":{{\"format\":\"lazyadam-state/2\",\"extensions\":\"{}\"}}}}",
        "x".repeat(80 << 20)
    );
    let mut out = (meta_junk.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(meta_junk.as_bytes());
    drop(meta_junk);
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let e = LazyAdam::from_bytes(&out).unwrap_err();
    let extra = PEAK.load(Ordering::Relaxed) - base;
    assert!(e.to_string().contains("more than"), "{e}");
    // The value is borrowed from the header, never copied.
    assert!(
        extra < 1 << 20,
        "{extra} bytes allocated to refuse 80 MB of metadata"
    );
}

#[test]
fn forged_but_checksummed_counters_are_refused() {
    // Metadata that declares a table far larger than its data: the tensor
    // lengths give it away before anything is allocated.
    let opt = trained();
    let bytes = opt.to_bytes().unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
    let forged_header = header.replace("\\\"shape\\\":[3,2]", "\\\"shape\\\":[3000000000000,2]");
    assert_ne!(forged_header, header);
    let mut out = (forged_header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(forged_header.as_bytes());
    out.extend_from_slice(&bytes[8 + n..]);
    let e = LazyAdam::from_bytes(&out).unwrap_err();
    assert!(matches!(e, Error::Checkpoint(_)), "{e}");
}
