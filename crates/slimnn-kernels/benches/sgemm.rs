//! f32 GEMM throughput per tier and thread count, against this machine's measured FMA peak.
//!
//! `cargo bench -p slimnn-kernels --bench sgemm` runs the criterion benchmarks, then prints a
//! table: best GFLOP/s per shape (M x K x N), tier and threads, and its share of the measured
//! single-core peak. The peak is measured first with a register-only FMA loop (16 independent
//! accumulator chains, no memory traffic). Extra arguments filter benchmarks as usual
//! (e.g. `-- 128x768x3072`). Under `cargo test` every benchmark runs once and the table is
//! skipped. Where AVX-512 BF16 exists, bf16 GEMMs (`bf16/<threads>t`: B packed as bf16, A
//! rounded per call) are timed too, against a `vdpbf16ps` register loop's peak; where AMX is
//! granted, so are f32 GEMMs on AMX tiles (`f32-amx/<threads>t`: B packed as three bf16 parts,
//! f32 accuracy, [`gemm::bf16x6`]), against the FMA peak, since they replace the FMA kernel.

use criterion::{BenchmarkId, Criterion, Throughput};
use slimnn_kernels::{cpu, gemm, CpuTier, Epilogue, PackedB, Par};
use std::hint::black_box;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// BERT-base-like layer shapes at 128 tokens, then one head of attention (Q·K^T, P·V).
const SHAPES: [(usize, usize, usize); 8] = [
    (128, 768, 3072),
    (128, 3072, 768),
    (128, 384, 384),
    (128, 384, 1536),
    (128, 1536, 384),
    (512, 768, 768),
    (128, 32, 128),
    (128, 128, 32),
];

/// What a row's B holds.
#[derive(Clone, Copy, PartialEq)]
enum Packing {
    F32,
    Bf16,
    /// f32 products on AMX tiles.
    Bf16x6,
}

struct Row {
    shape: (usize, usize, usize),
    tier: CpuTier,
    packing: Packing,
    threads: usize,
    best: Duration,
    mean: Duration,
}

static ROWS: Mutex<Vec<Row>> = Mutex::new(Vec::new());

fn flops((m, k, n): (usize, usize, usize)) -> f64 {
    2.0 * m as f64 * k as f64 * n as f64
}

/// Peak FMA throughput of one core in GFLOP/s per tier, from register-only loops.
mod peak {
    use super::*;

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn avx512_fma_loop(iters: u64, x: f32) -> f32 {
        use std::arch::x86_64::*;
        // 16 independent chains: more than latency (4) x FMA ports (2) needs.
        let m = _mm512_set1_ps(x);
        let add = _mm512_set1_ps(1e-7);
        let mut acc = [_mm512_setzero_ps(); 16];
        for (i, a) in acc.iter_mut().enumerate() {
            *a = _mm512_set1_ps(i as f32);
        }
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm512_fmadd_ps(*a, m, add);
            }
        }
        let mut s = _mm512_setzero_ps();
        for a in acc {
            s = _mm512_add_ps(s, a);
        }
        _mm512_reduce_add_ps(s)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn avx2_fma_loop(iters: u64, x: f32) -> f32 {
        use std::arch::x86_64::*;
        let m = _mm256_set1_ps(x);
        let add = _mm256_set1_ps(1e-7);
        let mut acc = [_mm256_setzero_ps(); 12];
        for (i, a) in acc.iter_mut().enumerate() {
            *a = _mm256_set1_ps(i as f32);
        }
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm256_fmadd_ps(*a, m, add);
            }
        }
        let mut s = _mm256_setzero_ps();
        for a in acc {
            s = _mm256_add_ps(s, a);
        }
        let mut out = [0.0f32; 8];
        // SAFETY: `out` holds 8 f32.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), s) };
        out.iter().sum()
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bf16")]
    fn bf16_dot_loop(iters: u64, x: f32) -> f32 {
        use std::arch::x86_64::*;
        // 16 chains of `vdpbf16ps`: 32 multiply-adds per instruction.
        let m = _mm512_cvtne2ps_pbh(_mm512_set1_ps(x), _mm512_set1_ps(x));
        let mut acc = [_mm512_setzero_ps(); 16];
        for (i, a) in acc.iter_mut().enumerate() {
            *a = _mm512_set1_ps(i as f32);
        }
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm512_dpbf16_ps(*a, m, m);
            }
        }
        let mut s = _mm512_setzero_ps();
        for a in acc {
            s = _mm512_add_ps(s, a);
        }
        _mm512_reduce_add_ps(s)
    }

    /// Best of `reps` runs of the bf16 dot-product loop in GFLOP/s (None without AVX-512 BF16).
    pub fn measure_bf16(iters: u64, reps: usize) -> Option<f64> {
        #[cfg(target_arch = "x86_64")]
        {
            if !slimnn_kernels::gemm::bf16::native() {
                return None;
            }
            let mut best = f64::MAX;
            for _ in 0..reps {
                let t = Instant::now();
                // SAFETY: `native()` vouches for AVX-512 F and BF16.
                black_box(unsafe { bf16_dot_loop(black_box(iters), black_box(1e-3)) });
                best = best.min(t.elapsed().as_secs_f64());
            }
            Some(iters as f64 * 16.0 * 32.0 * 2.0 / best / 1e9)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (iters, reps);
            None
        }
    }

    /// Best of `reps` runs of `iters` iterations, in GFLOP/s (None when the host lacks the ISA).
    pub fn measure(tier: CpuTier, iters: u64, reps: usize) -> Option<f64> {
        #[cfg(target_arch = "x86_64")]
        {
            if !tier.is_supported() || tier == CpuTier::Generic {
                return None;
            }
            let (lanes, chains) = if tier >= CpuTier::Avx512 { (16.0, 16.0) } else { (8.0, 12.0) };
            let mut best = f64::MAX;
            for _ in 0..reps {
                let t = Instant::now();
                // SAFETY: the tier check above guarantees the target features.
                let r = unsafe {
                    if tier >= CpuTier::Avx512 {
                        avx512_fma_loop(black_box(iters), black_box(0.999_999))
                    } else {
                        avx2_fma_loop(black_box(iters), black_box(0.999_999))
                    }
                };
                black_box(r);
                best = best.min(t.elapsed().as_secs_f64());
            }
            Some(iters as f64 * chains * lanes * 2.0 / best / 1e9)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (tier, iters, reps);
            None
        }
    }
}

fn lcg_vec(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..len)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}

fn bench_sgemm(c: &mut Criterion, tiers: &[CpuTier], pool2: &rayon::ThreadPool) {
    let mut group = c.benchmark_group("sgemm");
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(300));
    group.measurement_time(Duration::from_secs(1));
    for &shape in &SHAPES {
        let (m, k, n) = shape;
        let a = lcg_vec(m * k, 1);
        let b = lcg_vec(k * n, 2);
        let mut out = vec![0.0f32; m * n];
        group.throughput(Throughput::Elements(flops(shape) as u64));
        let bf16 = gemm::bf16::native().then_some((cpu::tier(), Packing::Bf16));
        let x6 = gemm::bf16x6::native().then_some((cpu::tier(), Packing::Bf16x6));
        for (tier, packing) in tiers.iter().map(|&t| (t, Packing::F32)).chain(bf16).chain(x6) {
            let pack = |mut p: PackedB| {
                match packing {
                    Packing::F32 => p.pack(&b, k, n, n),
                    Packing::Bf16 => p.pack_bf16(&b, k, n, n),
                    Packing::Bf16x6 => p.pack_bf16x6(&b, k, n, n),
                }
                .map(|()| p)
            };
            let packed = match PackedB::empty(tier).and_then(pack) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("skipping {tier}: {e}");
                    continue;
                }
            };
            for threads in [1usize, 2] {
                let par = if threads == 1 { Par::Seq } else { Par::Pool(pool2) };
                let label = match packing {
                    Packing::F32 => tier.to_string(),
                    Packing::Bf16 => "bf16".to_string(),
                    Packing::Bf16x6 => "f32-amx".to_string(),
                };
                let id = BenchmarkId::new(format!("{label}/{threads}t"), format!("{m}x{k}x{n}"));
                let mut best = Duration::MAX;
                let mut total = Duration::ZERO;
                let mut count = 0u64;
                group.bench_function(id, |bench| {
                    bench.iter_custom(|iters| {
                        let mut elapsed = Duration::ZERO;
                        for _ in 0..iters {
                            let t = Instant::now();
                            gemm(m, black_box(&a), k, &packed, &mut out, n, Epilogue::NONE, par)
                                .expect("valid GEMM arguments");
                            let dt = t.elapsed();
                            best = best.min(dt);
                            elapsed += dt;
                        }
                        total += elapsed;
                        count += iters;
                        elapsed
                    })
                });
                if count > 0 {
                    ROWS.lock().expect("bench table lock").push(Row {
                        shape,
                        tier,
                        packing,
                        threads,
                        best,
                        mean: total / count as u32,
                    });
                }
            }
        }
    }
    group.finish();
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let mut c = Criterion::default().configure_from_args();
    let tiers = cpu::supported_tiers();
    // One kernel set per distinct f32 GEMM: the AMX tier uses the AVX-512 kernels.
    let tiers: Vec<CpuTier> = tiers.into_iter().filter(|&t| t != CpuTier::Amx).collect();
    let pool2 = rayon::ThreadPoolBuilder::new().num_threads(2).build().expect("a 2-thread pool");

    // Short runs, best of many: a run that shares the core with another process only lowers
    // the figure. Measured again after the GEMMs and the higher kept, so clock boost changes
    // during the run count for the peak as they do for the GEMMs.
    let (iters, reps) = if full { (1_000_000, 400) } else { (1000, 1) };
    let measure_peaks = || {
        (
            peak::measure(CpuTier::Avx512, iters, reps),
            peak::measure(CpuTier::Avx2, iters, reps),
            peak::measure_bf16(iters, reps),
        )
    };
    let before = measure_peaks();

    bench_sgemm(&mut c, &tiers, &pool2);
    c.final_summary();

    if !full {
        return;
    }
    let after = measure_peaks();
    let max = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    let peak512 = max(before.0, after.0);
    let peak256 = max(before.1, after.1);
    let peak_bf16 = max(before.2, after.2);
    println!();
    println!("cpu: {}", cpu::describe());
    let show = |name: &str, b: Option<f64>, a: Option<f64>| {
        if let (Some(b), Some(a)) = (b, a) {
            println!("measured peak, {name} FMA, 1 core: {:.1} GFLOP/s (before {b:.1}, after {a:.1})", b.max(a));
        }
    };
    show("AVX-512", before.0, after.0);
    show("AVX2", before.1, after.1);
    show("AVX-512 BF16 dot", before.2, after.2);
    let machine_peak = peak512.or(peak256);
    let rows = ROWS.lock().expect("bench table lock");
    println!();
    println!(
        "{:<16} {:<8} {:>3} {:>10} {:>10} {:>12} {:>12}",
        "shape MxKxN", "tier", "thr", "best GF/s", "mean GF/s", "% peak/core", "% tier peak"
    );
    for r in rows.iter() {
        let gf = flops(r.shape) / r.best.as_secs_f64() / 1e9;
        let gf_mean = flops(r.shape) / r.mean.as_secs_f64() / 1e9;
        let per_core =
            |p: Option<f64>| p.map_or("-".to_string(), |p| format!("{:.1}%", 100.0 * gf / (p * r.threads as f64)));
        let tier_peak = match r.tier {
            _ if r.packing == Packing::Bf16 => peak_bf16,
            CpuTier::Avx512 | CpuTier::Amx => peak512,
            CpuTier::Avx2 => peak256,
            CpuTier::Generic => None,
        };
        let (m, k, n) = r.shape;
        println!(
            "{:<16} {:<8} {:>3} {:>10.1} {:>10.1} {:>12} {:>12}",
            format!("{m}x{k}x{n}"),
            match r.packing {
                Packing::F32 => r.tier.name(),
                Packing::Bf16 => "bf16",
                Packing::Bf16x6 => "f32-amx",
            },
            r.threads,
            gf,
            gf_mean,
            per_core(machine_peak),
            per_core(tier_peak),
        );
    }
}
