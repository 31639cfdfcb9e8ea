//! One GEMM shape (f32, or bf16 products) with everything hot in cache: GFLOP/s on one thread,
//! best of three timings of ~2 GFLOP each.
//!
//! `[EPILOGUE=bias|gelu|residual] cargo run --release -p slimnn-kernels --example gemm_shape -- M K N`
//! (`gelu` is bias + erf GELU, as MiniLM's FFN input; `residual` is bias + residual add;
//! `BF16=1` packs B as bf16 pairs: bf16 products with f32 accumulation, on AMX tiles where granted;
//! `X6=1` packs B as three bf16 parts per value: f32-accurate products on AMX tiles;
//! `COLD_MB=64` cycles through copies of B filling that many MB, so B comes from L3 or memory as a
//! model's weights do)

use slimnn_kernels::{gemm, Activation, Epilogue, PackedB, Par};
use std::time::Instant;

fn main() {
    let dims: Vec<usize> = std::env::args().skip(1).filter_map(|s| s.parse().ok()).collect();
    let [m, k, n] = dims[..] else {
        eprintln!("usage: gemm_shape M K N");
        std::process::exit(2);
    };
    let b: Vec<f32> = (0..k * n).map(|i| ((i * 7) % 13) as f32 * 0.01).collect();
    let pack = || {
        let mut packed = PackedB::new(&b, k, n, n).expect("pack");
        if std::env::var("BF16").is_ok_and(|v| v == "1") {
            packed.pack_bf16(&b, k, n, n).expect("pack bf16");
        }
        if std::env::var("X6").is_ok_and(|v| v == "1") {
            packed.pack_bf16x6(&b, k, n, n).expect("pack bf16x6");
        }
        packed
    };
    let cold_mb: usize = std::env::var("COLD_MB").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    let copies = (cold_mb << 20).div_ceil(k * n * 4).max(1);
    let packs: Vec<PackedB> = (0..copies).map(|_| pack()).collect();
    let a: Vec<f32> = (0..m * k).map(|i| (i % 11) as f32 * 0.1).collect();
    // C on a cache line, as the runtime's activations are (its allocator aligns them).
    let mut c_buf = vec![0f32; m * n + 16];
    let off = c_buf.as_ptr().align_offset(64);
    let c = &mut c_buf[off..off + m * n];
    let bias: Vec<f32> = (0..n).map(|j| (j % 5) as f32 * 0.1 - 0.2).collect();
    let res: Vec<f32> = (0..m * n).map(|i| (i % 3) as f32 * 0.5).collect();
    let what = std::env::var("EPILOGUE").unwrap_or_default();
    let ep = match what.as_str() {
        "" => Epilogue::NONE,
        "bias" => Epilogue::NONE.with_bias(&bias),
        "gelu" => Epilogue::NONE.with_bias(&bias).with_activation(Activation::GeluErf),
        "residual" => Epilogue::NONE.with_bias(&bias).with_residual(&res, n),
        other => {
            eprintln!("unknown EPILOGUE {other}: use bias, gelu or residual");
            std::process::exit(2);
        }
    };
    let flops = 2.0 * (m * k * n) as f64;
    let reps = (2e9 / flops) as usize + 1;
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        for r in 0..reps {
            gemm(m, &a, k, &packs[r % copies], c, n, ep, Par::Seq).expect("gemm");
        }
        best = best.min(t.elapsed().as_secs_f64() / reps as f64);
    }
    println!("{m}x{k}x{n} {what}: {:.1} GFLOP/s", flops / best / 1e9);
}
