//! Row-wise kernels and attention at MiniLM's shapes (seq 128, hidden 384, 12 heads of 32,
//! FFN 1536), per tier: `cargo bench -p slimnn-kernels --bench rows` (filter as usual, e.g.
//! `-- mha`). Under `cargo test` each benchmark runs once.

use criterion::{BenchmarkId, Criterion, Throughput};
use slimnn_kernels::attention::{self, AttnDims, AttnMask};
use slimnn_kernels::{cpu, gemm, rows, Activation, BinaryOp, Epilogue, PackedB, Par};
use std::hint::black_box;

fn values(len: usize, seed: u32) -> Vec<f32> {
    (0..len)
        .map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / (1 << 24) as f32 - 0.5)
        .collect()
}

fn bench(c: &mut Criterion) {
    let (seq, hidden, heads, d, ffn) = (128, 384, 12, 32, 1536);
    for tier in cpu::supported_tiers() {
        let t = tier.name();
        let mut g = c.benchmark_group("rows");

        let x = values(heads * seq * seq, 1);
        let mut y = vec![0.0; x.len()];
        g.throughput(Throughput::Elements(x.len() as u64));
        g.bench_function(BenchmarkId::new("softmax_1536x128", t), |b| {
            b.iter(|| rows::softmax_with(tier, black_box(&x), seq, &mut y).unwrap())
        });

        let x = values(seq * hidden, 2);
        let (scale, bias) = (values(hidden, 3), values(hidden, 4));
        let mut y = vec![0.0; x.len()];
        g.throughput(Throughput::Elements(x.len() as u64));
        g.bench_function(BenchmarkId::new("layer_norm_128x384", t), |b| {
            b.iter(|| rows::layer_norm_with(tier, black_box(&x), hidden, &scale, &bias, 1e-12, &mut y).unwrap())
        });
        g.bench_function(BenchmarkId::new("add_row_128x384", t), |b| {
            b.iter(|| rows::binary_with(tier, BinaryOp::Add, black_box(&x), &bias, &mut y).unwrap())
        });

        let x = values(seq * ffn, 5);
        let mut y = vec![0.0; x.len()];
        g.throughput(Throughput::Elements(x.len() as u64));
        g.bench_function(BenchmarkId::new("gelu_erf_128x1536", t), |b| {
            b.iter(|| rows::map_activation_with(tier, black_box(&x), Activation::GeluErf, &mut y).unwrap())
        });
        g.finish();

        let mut g = c.benchmark_group("attention");
        let dims = AttnDims { batch: 1, seq_q: seq, seq_k: seq, heads, head_dim: d };
        let n = seq * hidden;
        let (q, k, v) = (values(n, 6), values(n, 7), values(n, 8));
        let m = vec![0.0f32; seq];
        let mask = Some(AttnMask { data: &m, shape: [1, 1, 1, seq] });
        let mut out = vec![0.0; n];
        g.throughput(Throughput::Elements(4 * (seq * seq * hidden) as u64));
        g.bench_function(BenchmarkId::new("mha_b1_s128_h12_d32", t), |b| {
            b.iter(|| attention::mha_with(tier, black_box(&q), &k, &v, mask, dims, 0.177, &mut out, Par::Seq).unwrap())
        });
        // The parts, for a profile: packing, Q·Kᵀ and P·V (in blocks of 48 rows) for every head.
        let (mut kt, mut vp) = (PackedB::empty(tier).unwrap(), PackedB::empty(tier).unwrap());
        let mut s = vec![0.0f32; 48 * seq];
        g.bench_function(BenchmarkId::new("parts_pack", t), |b| {
            b.iter(|| {
                for h in 0..heads {
                    kt.pack_transposed(&k[h * d..], d, seq, hidden).unwrap();
                    vp.pack(&v[h * d..], seq, d, hidden).unwrap();
                }
            })
        });
        g.bench_function(BenchmarkId::new("parts_qk", t), |b| {
            b.iter(|| {
                for _ in 0..heads {
                    for i0 in (0..seq).step_by(48) {
                        let m = 48.min(seq - i0);
                        gemm(m, &q[i0 * hidden..], hidden, &kt, &mut s[..m * seq], seq, Epilogue::NONE, Par::Seq)
                            .unwrap();
                    }
                }
            })
        });
        g.bench_function(BenchmarkId::new("parts_pv", t), |b| {
            b.iter(|| {
                for h in 0..heads {
                    for i0 in (0..seq).step_by(48) {
                        let m = 48.min(seq - i0);
                        gemm(m, &s, seq, &vp, &mut out[i0 * hidden + h * d..], hidden, Epilogue::NONE, Par::Seq)
                            .unwrap();
                    }
                }
            })
        });
        g.finish();
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c);
    c.final_summary();
}
