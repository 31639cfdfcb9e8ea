//! MiniLM's attention (128 tokens, 12 heads of 32, one sequence, padding mask) on one thread:
//! time per call and GFLOP/s of its two products.
//!
//! `[PAD=K] [BF16=1|INT8=1] cargo run --release -p slimnn-kernels --example attention_speed [-- SEQ]`
//! (the last K keys masked, as padding, default 5; `BF16=1` times the bf16 products, `INT8=1`
//! the int8 ones, on AMX tiles where granted; `FUSED=1` reads Q, K and V from one fused
//! projection's rows; `FULL_MASK=1` gives the mask one row per query; `EVICT=1` writes 8 MB
//! between calls)

use slimnn_kernels::attention::{mha_strided_as, AttnDims, AttnMask, AttnProducts, Rows};
use slimnn_kernels::Par;
use std::time::Instant;

fn main() {
    let seq: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(128);
    let dims = AttnDims { batch: 1, seq_q: seq, seq_k: seq, heads: 12, head_dim: 32 };
    let len = seq * 384;
    let vals =
        |seed: usize| -> Vec<f32> { (0..len).map(|i| (((i * 7919 + seed) % 2003) as f32 / 1001.0) - 1.0).collect() };
    let (q, k, v) = (vals(1), vals(2), vals(3));
    // FUSED=1: Q, K and V as column blocks of one projection's rows (1152 wide), as a fused
    // QKV projection leaves them.
    let fused = std::env::var("FUSED").is_ok_and(|v| v == "1");
    let qkv: Vec<f32> =
        (0..seq).flat_map(|i| [&q, &k, &v].map(|x| x[i * 384..(i + 1) * 384].to_vec()).concat()).collect();
    let pad: usize = std::env::var("PAD").map(|s| s.parse().unwrap()).unwrap_or(5);
    let row = (0..seq).map(|i| if i < seq - pad { 0.0 } else { f32::NEG_INFINITY });
    // FULL_MASK=1: one row per query, as PyTorch's exporter writes BERT's padding mask.
    let full = std::env::var("FULL_MASK").is_ok_and(|v| v == "1");
    let mask: Vec<f32> = if full { row.cycle().take(seq * seq).collect() } else { row.collect() };
    let bf16 = std::env::var("BF16").is_ok_and(|v| v == "1");
    let int8 = std::env::var("INT8").is_ok_and(|v| v == "1");
    let mut out = vec![0f32; len];
    let mut times = Vec::with_capacity(1000);
    // EVICT=1: 8 MB written between calls, so operands and scratch come from L3 as they can
    // in a model, where other layers' weights pass through the caches in between.
    let evict = std::env::var("EVICT").is_ok_and(|v| v == "1");
    let mut junk = vec![0u8; if evict { 8 << 20 } else { 0 }];
    for i in 0..1000 {
        junk.iter_mut().step_by(64).for_each(|b| *b = b.wrapping_add(i as u8));
        let t = Instant::now();
        let m = AttnMask { data: &mask, shape: [1, 1, if full { seq } else { 1 }, seq] };
        let (q, k, v) = if fused {
            let part = |p: usize| Rows { data: &qkv[p * 384..], ld: 1152 };
            (part(0), part(1), part(2))
        } else {
            let rows = |data| Rows { data, ld: 384 };
            (rows(&q), rows(&k), rows(&v))
        };
        let products = if bf16 {
            AttnProducts::Bf16
        } else if int8 {
            AttnProducts::Int8
        } else {
            AttnProducts::F32
        };
        mha_strided_as(products, q, k, v, Some(m), dims, 0.176_776_7, &mut out, Par::Seq).expect("mha");
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let (best, median) = (times[0], times[times.len() / 2]);
    let flops = 4.0 * (seq * seq * 384) as f64;
    let what = if bf16 {
        " bf16"
    } else if int8 {
        " int8"
    } else {
        ""
    };
    println!(
        "seq {seq}{what}: best {:.1} us ({:.0} GFLOP/s), median {:.1} us",
        best * 1e6,
        flops / best / 1e9,
        median * 1e6
    );
}
