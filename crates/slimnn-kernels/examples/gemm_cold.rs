//! f32 GEMM with weights cold in cache, as in a model: cycles through enough distinct packed B
//! matrices (the MiniLM layer shapes) that none is cached when it is used again.
//!
//! `[LAYERS=N] [CHAIN=1] cargo run --release -p slimnn-kernels --example gemm_cold [-- M]`
//! (default 6 layers, 42 MB of weights; here the cold penalty appears once they outgrow
//! ~20 MB). `CHAIN=1` runs each layer as MiniLM does: every GEMM reads the previous one's
//! output and has the model's epilogue (bias; bias + residual; bias + erf GELU).

use slimnn_kernels::{gemm, Activation, Epilogue, PackedB, Par};
use std::time::Instant;

fn main() {
    let m: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(128);
    // One encoder layer's projections: QKV, attention output, FFN in, FFN out.
    let layer = [(384, 1152), (384, 384), (384, 1536), (1536, 384)];
    let layers: usize = std::env::var("LAYERS").map_or(6, |s| s.parse().unwrap());
    let chain = std::env::var("CHAIN").is_ok_and(|s| s == "1");
    let mut weights = Vec::new();
    for l in 0..layers {
        for &(k, n) in &layer {
            let b: Vec<f32> = (0..k * n).map(|i| ((i * 7 + l) % 13) as f32 * 0.01 - 0.06).collect();
            weights.push((k, n, PackedB::new(&b, k, n, n).expect("pack")));
        }
    }
    let bias: Vec<f32> = (0..1536).map(|j| (j % 5) as f32 * 0.1 - 0.2).collect();
    let mut x: Vec<f32> = (0..m * 384).map(|i| (i % 11) as f32 * 0.1).collect();
    let mut qkv = vec![0f32; m * 1152];
    let mut h = vec![0f32; m * 384];
    let mut ffn = vec![0f32; m * 1536];
    let mut out = vec![0f32; m * 384];
    let a: Vec<f32> = (0..m * 1536).map(|i| (i % 11) as f32 * 0.1).collect();
    let mut c = vec![0f32; m * 1536];
    let flops: f64 = weights.iter().map(|(k, n, _)| 2.0 * (m * k * n) as f64).sum();
    for cold in [true, false] {
        let mut times = Vec::new();
        let mut per = [0f64; 4];
        for _ in 0..20 {
            let t = Instant::now();
            if chain {
                let order: Vec<usize> = if cold { (0..layers).collect() } else { vec![0; layers] };
                for l in order {
                    let w = &weights[4 * l..4 * l + 4];
                    let ep = Epilogue::NONE.with_bias(&bias[..1152]);
                    let t0 = Instant::now();
                    gemm(m, &x, 384, &w[0].2, &mut qkv, 1152, ep, Par::Seq).unwrap();
                    per[0] += t0.elapsed().as_secs_f64();
                    let t0 = Instant::now();
                    // Attention would read qkv; the output projection reads its context.
                    let ep = Epilogue::NONE.with_bias(&bias[..384]).with_residual(&x, 384);
                    gemm(m, &qkv[..], 1152, &w[1].2, &mut h, 384, ep, Par::Seq).unwrap();
                    per[1] += t0.elapsed().as_secs_f64();
                    let t0 = Instant::now();
                    let ep = Epilogue::NONE.with_bias(&bias).with_activation(Activation::GeluErf);
                    gemm(m, &h, 384, &w[2].2, &mut ffn, 1536, ep, Par::Seq).unwrap();
                    per[2] += t0.elapsed().as_secs_f64();
                    let t0 = Instant::now();
                    let ep = Epilogue::NONE.with_bias(&bias[..384]).with_residual(&h, 384);
                    gemm(m, &ffn, 1536, &w[3].2, &mut out, 384, ep, Par::Seq).unwrap();
                    per[3] += t0.elapsed().as_secs_f64();
                    // Layer norm keeps values bounded; a copy stands in for it.
                    for (xi, &o) in x.iter_mut().zip(&out) {
                        *xi = (o * 0.01).clamp(-2.0, 2.0);
                    }
                }
            } else if cold {
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
            times.push(t.elapsed().as_secs_f64());
        }
        if chain {
            let per: Vec<String> = per.iter().map(|t| format!("{:.3}", t * 1e3 / (20 * layers) as f64)).collect();
            println!("mean ms per GEMM (qkv, out, ffn in, ffn out): {}", per.join(" "));
        }
        times.sort_by(f64::total_cmp);
        let (best, median) = (times[0], times[times.len() / 2]);
        println!(
            "M={m} {}{}: best {:.2} ms ({:.1} GFLOP/s), median {:.2} ms ({:.1} GFLOP/s)",
            if cold { "cold weights" } else { "hot weights" },
            if chain { ", chained with epilogues" } else { "" },
            best * 1e3,
            flops / best / 1e9,
            median * 1e3,
            flops / median / 1e9
        );
    }
}
