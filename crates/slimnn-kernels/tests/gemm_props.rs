//! Property tests: every tier's GEMM against the f64 reference on random shapes, strides and
//! epilogues. Tiers this host cannot run are skipped (and reported by `report_tiers`).

use proptest::prelude::*;
use slimnn_kernels::{cpu, gemm, reference, sgemm_tier, Activation, CpuTier, Epilogue, PackedB, Par};
use std::sync::OnceLock;

fn pool2() -> &'static rayon::ThreadPool {
    static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();
    POOL.get_or_init(|| rayon::ThreadPoolBuilder::new().num_threads(2).build().expect("a 2-thread pool"))
}

fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..len)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

const ACTIVATIONS: [Activation; 7] = [
    Activation::None,
    Activation::Relu,
    Activation::RELU6,
    Activation::Clip { min: -0.5, max: 0.7 },
    Activation::GeluErf,
    Activation::GeluTanh,
    Activation::Silu,
];

#[derive(Debug, Clone)]
struct Case {
    m: usize,
    k: usize,
    n: usize,
    pad_a: usize,
    pad_b: usize,
    pad_c: usize,
    pad_r: usize,
    act: usize,
    bias: bool,
    residual: bool,
    accumulate: bool,
    /// 0: unpacked `sgemm_tier`; 1: `PackedB::pack` + `gemm`; 2: `pack_transposed` + `gemm`.
    entry: u8,
    threads: usize,
    seed: u64,
}

fn case() -> impl Strategy<Value = Case> {
    (
        (1usize..200, 1usize..200, 1usize..200),
        (0usize..4, 0usize..4, 0usize..4, 0usize..4),
        (0..ACTIVATIONS.len(), any::<bool>(), any::<bool>(), any::<bool>()),
        (0u8..3, 1usize..=2, any::<u64>()),
    )
        .prop_map(
            |((m, k, n), (pad_a, pad_b, pad_c, pad_r), (act, bias, residual, accumulate), (entry, threads, seed))| {
                Case { m, k, n, pad_a, pad_b, pad_c, pad_r, act, bias, residual, accumulate, entry, threads, seed }
            },
        )
}

/// Runs `case` on `tier` and checks it against the reference; Err describes the first mismatch.
fn check(tier: CpuTier, cs: &Case) -> Result<(), String> {
    let Case { m, k, n, .. } = *cs;
    let (lda, ldb, ldc, ldr) = (k + cs.pad_a, n + cs.pad_b, n + cs.pad_c, n + cs.pad_r);
    let a = values(m * lda, cs.seed);
    let b = values(k * ldb, cs.seed ^ 0x9e37);
    let bias = values(n, cs.seed ^ 0x51);
    let res = values(m * ldr, cs.seed ^ 0x77);
    let c0: Vec<f32> = values(m * ldc, cs.seed ^ 0x1234);
    let mut ep = Epilogue::default().with_activation(ACTIVATIONS[cs.act]);
    if cs.bias {
        ep = ep.with_bias(&bias);
    }
    if cs.residual {
        ep = ep.with_residual(&res, ldr);
    }
    if cs.accumulate {
        ep = ep.accumulating();
    }
    let par = if cs.threads == 2 { Par::Pool(pool2()) } else { Par::Seq };

    let mut want = c0.clone();
    reference::sgemm(m, k, n, &a, lda, &b, ldb, &mut want, ldc, ep).map_err(|e| e.to_string())?;
    let mut got = c0.clone();
    match cs.entry {
        0 => sgemm_tier(tier, m, k, n, &a, lda, &b, ldb, &mut got, ldc, ep, par),
        1 => PackedB::empty(tier)
            .and_then(|mut p| p.pack(&b, k, n, ldb).map(|()| p))
            .and_then(|p| gemm(m, &a, lda, &p, &mut got, ldc, ep, par)),
        _ => {
            let mut bt = vec![0.0; n * (k + cs.pad_b)];
            for kk in 0..k {
                for j in 0..n {
                    bt[j * (k + cs.pad_b) + kk] = b[kk * ldb + j];
                }
            }
            PackedB::empty(tier)
                .and_then(|mut p| p.pack_transposed(&bt, k, n, k + cs.pad_b).map(|()| p))
                .and_then(|p| gemm(m, &a, lda, &p, &mut got, ldc, ep, par))
        }
    }
    .map_err(|e| e.to_string())?;

    for i in 0..m {
        for j in 0..ldc {
            let idx = i * ldc + j;
            if j >= n {
                if got[idx].to_bits() != c0[idx].to_bits() {
                    return Err(format!("C[{i}][{j}] beyond n was overwritten"));
                }
                continue;
            }
            // Worst-case f32 summation error is about k * eps * sum |terms|; activations are
            // 1.2-Lipschitz at most and approximate to a few 1e-6.
            let mut mag: f64 = (0..k).map(|kk| (a[i * lda + kk] * b[kk * ldb + j]).abs() as f64).sum();
            if cs.bias {
                mag += bias[j].abs() as f64;
            }
            if cs.accumulate {
                mag += c0[idx].abs() as f64;
            }
            let tol = 1.2 * (k as f64 + 2.0) * 1.2e-7 * mag + 4e-6 * (1.0 + want[idx].abs() as f64);
            let err = (got[idx] as f64 - want[idx] as f64).abs();
            if err.is_nan() || err > tol {
                return Err(format!("C[{i}][{j}] = {}, want {} (tol {tol:e})", got[idx], want[idx]));
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn every_tier_matches_reference(cs in case()) {
        for tier in CpuTier::ALL {
            if !tier.is_supported() {
                continue;
            }
            if let Err(msg) = check(tier, &cs) {
                prop_assert!(false, "{tier}: {msg}");
            }
        }
    }
}

#[test]
fn tile_edges_exhaustive_small() {
    // Every (m, n) around the tile sizes with a short and a multi-block K.
    for tier in cpu::supported_tiers() {
        for m in 1..=17 {
            for n in [1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 47, 48, 49, 95, 97] {
                for k in [1, 3, 300] {
                    let cs = Case {
                        m,
                        k,
                        n,
                        pad_a: 1,
                        pad_b: 0,
                        pad_c: 2,
                        pad_r: 1,
                        act: (m + n) % ACTIVATIONS.len(),
                        bias: n % 2 == 0,
                        residual: m % 2 == 0,
                        accumulate: k == 3,
                        entry: (m % 3) as u8,
                        threads: 1 + (n % 2),
                        seed: (m * 1000 + n) as u64,
                    };
                    if let Err(msg) = check(tier, &cs) {
                        panic!("{tier} m={m} n={n} k={k}: {msg}");
                    }
                }
            }
        }
    }
}

#[test]
fn report_tiers() {
    eprintln!("cpu: {}", cpu::describe());
    for tier in CpuTier::ALL {
        if !tier.is_supported() {
            eprintln!("skipped tier {tier}: not supported on this host");
        }
    }
}
