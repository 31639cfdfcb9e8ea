//! f32 GEMM with weights cold in cache, as in a model: cycles through enough distinct packed B
//! matrices (the MiniLM layer shapes) that none is cached when it is used again.
//!
//! `[LAYERS=N] cargo run --release -p slimnn-kernels --example gemm_cold [-- M]` (default 6 layers,
//! 42 MB of weights; here the cold penalty appears once they outgrow ~20 MB)

use slimnn_kernels::{gemm, Epilogue, PackedB, Par};
use std::time::Instant;

fn main() {
    let m: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(128);
    // One encoder layer's projections: QKV, attention output, FFN in, FFN out.
    let layer = [(384, 1152), (384, 384), (384, 1536), (1536, 384)];
    let layers: usize = std::env::var("LAYERS").map_or(6, |s| s.parse().unwrap());
    let mut weights = Vec::new();
    for l in 0..layers {
        for &(k, n) in &layer {
            let b: Vec<f32> = (0..k * n).map(|i| ((i * 7 + l) % 13) as f32 * 0.01).collect();
            weights.push((k, n, PackedB::new(&b, k, n, n).expect("pack")));
        }
    }
    let a: Vec<f32> = (0..m * 1536).map(|i| (i % 11) as f32 * 0.1).collect();
    let mut c = vec![0f32; m * 1536];
    let flops: f64 = weights.iter().map(|(k, n, _)| 2.0 * (m * k * n) as f64).sum();
    for cold in [true, false] {
        let mut best = f64::MAX;
        for _ in 0..20 {
            let t = Instant::now();
            if cold {
                for (k, n, p) in &weights {
                    gemm(m, &a, *k, p, &mut c, *n, Epilogue::NONE, Par::Seq).unwrap();
                }
            } else {
                for (k, n, p) in weights.iter().take(4) {
                    for _ in 0..layers {
                        gemm(m, &a, *k, p, &mut c, *n, Epilogue::NONE, Par::Seq).unwrap();
                    }
                }
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "M={m} {}: {:.2} ms, {:.1} GFLOP/s",
            if cold { "cold weights (6 layers)" } else { "hot weights (1 layer x6)" },
            best * 1e3,
            flops / best / 1e9
        );
    }
}
