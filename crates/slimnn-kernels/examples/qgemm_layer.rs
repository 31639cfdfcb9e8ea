//! One MiniLM encoder layer's int8 projections as the runtime runs them (per-row activation
//! quantization, then the u8 x i8 GEMM with its epilogue), each step timed separately, with the
//! weights of six layers cycled so that none is cached when it is used again.
//!
//! `cargo run --release -p slimnn-kernels --example qgemm_layer [-- M [THREADS]]`

use slimnn_kernels::gemm::Activation;
use slimnn_kernels::qgemm::{qgemm, quantize_rows_u8, PackedQB, PerRow, QEpilogue, QOutput};
use slimnn_kernels::Par;
use std::time::Instant;

struct Proj {
    name: &'static str,
    k: usize,
    n: usize,
    act: Activation,
    residual: bool,
}

const LAYER: [Proj; 4] = [
    Proj { name: "qkv 384->1152", k: 384, n: 1152, act: Activation::None, residual: false },
    Proj { name: "out 384->384 +res", k: 384, n: 384, act: Activation::None, residual: true },
    Proj { name: "ffn1 384->1536 gelu", k: 384, n: 1536, act: Activation::GeluErf, residual: false },
    Proj { name: "ffn2 1536->384 +res", k: 1536, n: 384, act: Activation::None, residual: true },
];

fn main() {
    let mut args = std::env::args().skip(1);
    let m: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(128);
    let threads: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(1);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("pool");
    let layers = 6;
    let mut seed = 1u64;
    let mut next = move || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (seed >> 33) as u32
    };
    let weights: Vec<Vec<PackedQB>> = (0..layers)
        .map(|_| {
            LAYER
                .iter()
                .map(|p| {
                    let b: Vec<i8> = (0..p.k * p.n).map(|_| (next() % 255) as i8).collect();
                    PackedQB::new(&b, p.k, p.n, p.n).expect("pack")
                })
                .collect()
        })
        .collect();
    let scales: Vec<f32> = (0..1536).map(|j| 1e-3 + j as f32 * 1e-6).collect();
    let bias: Vec<f32> = (0..1536).map(|j| j as f32 * 1e-3).collect();
    let x: Vec<f32> = (0..m * 1536).map(|_| (next() % 2001) as f32 * 1e-3 - 1.0).collect();
    let res: Vec<f32> = (0..m * 384).map(|_| (next() % 2001) as f32 * 1e-3 - 1.0).collect();
    let mut q = vec![0u8; m * 1536];
    let (mut sa, mut za) = (vec![0f32; m], vec![0i32; m]);
    let mut c = vec![0f32; m * 1536];
    let reps = (20 * 128 / m).max(3);
    let mut best = [[f64::MAX; 2]; 4];
    pool.install(|| {
        for _ in 0..reps {
            for w in &weights {
                for (i, p) in LAYER.iter().enumerate() {
                    let t = Instant::now();
                    quantize_rows_u8(&x[..m * p.k], p.k, &mut q[..m * p.k], &mut sa, &mut za).expect("quantize");
                    let tq = t.elapsed().as_secs_f64();
                    let mut ep = QEpilogue {
                        a_zero: PerRow::Rows(&za),
                        a_scale: PerRow::Rows(&sa),
                        b_scale: &scales[..p.n],
                        bias: Some(&bias[..p.n]),
                        activation: p.act,
                        residual: None,
                        outliers: None,
                    };
                    if p.residual {
                        ep = ep.with_residual(&res, p.n);
                    }
                    let out = QOutput::F32 { c: &mut c[..m * p.n], ldc: p.n };
                    qgemm(m, &q, p.k, &w[i], out, &ep, Par::Current).expect("qgemm");
                    let all = t.elapsed().as_secs_f64();
                    best[i][0] = best[i][0].min(tq);
                    best[i][1] = best[i][1].min(all - tq);
                }
            }
        }
    });
    println!("M={m}, {threads} thread(s), weights cold (6 layers cycled); best of {reps} x 6");
    for (p, [tq, tg]) in LAYER.iter().zip(best) {
        let ops = 2.0 * (m * p.k * p.n) as f64;
        println!(
            "{:<22} quantize {:>7.1} us  gemm {:>8.1} us  {:>6.0} GOP/s (gemm)  {:>6.0} GOP/s (both)",
            p.name,
            tq * 1e6,
            tg * 1e6,
            ops / tg / 1e9,
            ops / (tq + tg) / 1e9
        );
    }
}
