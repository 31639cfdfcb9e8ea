//! Integer GEMM throughput per kernel and thread count, against this machine's measured VNNI
//! peak; weight-only int8 / int4 GEMMs against the f32 GEMM on the same shapes.
//!
//! `cargo bench -p slimnn-kernels --bench qgemm` runs the criterion benchmarks, then prints a
//! table: best GOP/s (2 ops per multiply-add) per shape (M x K x N), kernel and threads, and
//! its share of the measured single-core peak of that kernel's instruction (`vpdpbusd` on zmm
//! or ymm, register-only loop with 16 independent accumulator chains, no memory traffic). The
//! quantized GEMMs run with the dequantizing epilogue the runtime uses (per-channel scales,
//! activation zero point, bias), writing f32. Under `cargo test` every benchmark runs once and
//! the table is skipped.

use criterion::{BenchmarkId, Criterion, Throughput};
use slimnn_kernels::qgemm::{qgemm, wgemm, PackedQB, PackedWeightOnly, QEpilogue, QKernel, QOutput};
use slimnn_kernels::{cpu, gemm, Epilogue, PackedB, Par};
use std::hint::black_box;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// MiniLM / BERT layer shapes at 128 tokens, MiniLM at batch 32 x 128 tokens.
const SHAPES: [(usize, usize, usize); 7] = [
    (128, 384, 384),
    (128, 384, 1536),
    (128, 1536, 384),
    (128, 768, 3072),
    (128, 3072, 768),
    (4096, 384, 1536),
    (4096, 1536, 384),
];

/// Weight-only shapes: decoding (1 row) and a short prompt.
const WONLY_SHAPES: [(usize, usize, usize); 4] = [(1, 2048, 8192), (1, 8192, 2048), (8, 2048, 2048), (128, 768, 3072)];

struct Row {
    what: String,
    shape: (usize, usize, usize),
    threads: usize,
    best: Duration,
    peak: Option<f64>,
}

static ROWS: Mutex<Vec<Row>> = Mutex::new(Vec::new());

fn ops((m, k, n): (usize, usize, usize)) -> f64 {
    2.0 * m as f64 * k as f64 * n as f64
}

mod peak {
    use super::*;

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vnni")]
    fn zmm_loop(iters: u64, x: i32) -> i32 {
        use std::arch::x86_64::*;
        let a = _mm512_set1_epi32(x);
        let b = _mm512_set1_epi32(x ^ 0x01010101);
        let mut acc = [_mm512_setzero_si512(); 16];
        for (i, v) in acc.iter_mut().enumerate() {
            *v = _mm512_set1_epi32(i as i32);
        }
        for _ in 0..iters {
            for v in acc.iter_mut() {
                *v = _mm512_dpbusd_epi32(*v, a, b);
            }
        }
        let mut s = _mm512_setzero_si512();
        for v in acc {
            s = _mm512_add_epi32(s, v);
        }
        _mm512_reduce_add_epi32(s)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,avxvnni")]
    fn ymm_loop(iters: u64, x: i32) -> i32 {
        use std::arch::x86_64::*;
        let a = _mm256_set1_epi32(x);
        let b = _mm256_set1_epi32(x ^ 0x01010101);
        let mut acc = [_mm256_setzero_si256(); 16];
        for (i, v) in acc.iter_mut().enumerate() {
            *v = _mm256_set1_epi32(i as i32);
        }
        for _ in 0..iters {
            for v in acc.iter_mut() {
                *v = _mm256_dpbusd_avx_epi32(*v, a, b);
            }
        }
        let mut s = _mm256_setzero_si256();
        for v in acc {
            s = _mm256_add_epi32(s, v);
        }
        let mut out = [0i32; 8];
        // SAFETY: `out` holds 8 i32.
        unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), s) };
        out.iter().fold(0, |a, b| a.wrapping_add(*b))
    }

    /// Best of `reps` runs, GOP/s of one core (None when the host lacks the instruction).
    pub fn measure(kernel: QKernel, iters: u64, reps: usize) -> Option<f64> {
        #[cfg(target_arch = "x86_64")]
        {
            let lanes = match kernel {
                QKernel::Avx512Vnni if kernel.is_supported() => 16.0,
                QKernel::AvxVnni if kernel.is_supported() => 8.0,
                _ => return None,
            };
            let mut best = f64::MAX;
            for _ in 0..reps {
                let t = Instant::now();
                // SAFETY: `is_supported` vouched for the instruction set.
                let r = unsafe {
                    if lanes == 16.0 {
                        zmm_loop(black_box(iters), black_box(0x05030201))
                    } else {
                        ymm_loop(black_box(iters), black_box(0x05030201))
                    }
                };
                black_box(r);
                best = best.min(t.elapsed().as_secs_f64());
            }
            // 16 chains x lanes x 4 multiply-adds x 2 ops.
            Some(iters as f64 * 16.0 * lanes * 8.0 / best / 1e9)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (kernel, iters, reps);
            None
        }
    }
}

fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut s = seed;
    (0..len)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 40) as u8
        })
        .collect()
}

/// Times `f` under criterion and records its best run.
fn timed(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    id: BenchmarkId,
    mut f: impl FnMut(),
) -> Option<Duration> {
    let mut best = Duration::MAX;
    let mut count = 0u64;
    group.bench_function(id, |bench| {
        bench.iter_custom(|iters| {
            let mut elapsed = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                f();
                let dt = t.elapsed();
                best = best.min(dt);
                elapsed += dt;
            }
            count += iters;
            elapsed
        })
    });
    (count > 0).then_some(best)
}

fn bench_qgemm(c: &mut Criterion, pool2: &rayon::ThreadPool, peaks: &dyn Fn(QKernel) -> Option<f64>) {
    let mut group = c.benchmark_group("qgemm");
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(300));
    group.measurement_time(Duration::from_secs(1));
    for &shape in &SHAPES {
        let (m, k, n) = shape;
        let a = bytes(m * k, 1);
        let b: Vec<i8> = bytes(k * n, 2).into_iter().map(|v| v as i8).collect();
        let scales: Vec<f32> = (0..n).map(|j| 1e-3 * (1 + j % 7) as f32).collect();
        let bias = vec![0.5f32; n];
        let mut out = vec![0f32; m * n];
        group.throughput(Throughput::Elements(ops(shape) as u64));
        for kernel in QKernel::supported() {
            let packed = PackedQB::with_kernel(kernel, &b, k, n, n, false).expect("valid packing");
            for threads in [1usize, 2] {
                if (kernel == QKernel::Scalar && (m > 128 || threads > 1)) || (m > 128 && threads == 1) {
                    continue;
                }
                let par = if threads == 1 { Par::Seq } else { Par::Pool(pool2) };
                let ep = QEpilogue::new(0.02, 117, &scales).with_bias(&bias);
                let id = BenchmarkId::new(format!("{kernel}/{threads}t"), format!("{m}x{k}x{n}"));
                let best = timed(&mut group, id, || {
                    qgemm(m, black_box(&a), k, &packed, QOutput::F32 { c: &mut out, ldc: n }, &ep, par)
                        .expect("valid GEMM arguments")
                });
                if let Some(best) = best {
                    let what = format!("u8xi8 {kernel}");
                    ROWS.lock().expect("table lock").push(Row { what, shape, threads, best, peak: peaks(kernel) });
                }
            }
        }
    }
    group.finish();
}

fn bench_weight_only(c: &mut Criterion, pool2: &rayon::ThreadPool) {
    let mut group = c.benchmark_group("wgemm");
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(300));
    group.measurement_time(Duration::from_secs(1));
    for &shape in &WONLY_SHAPES {
        let (m, k, n) = shape;
        let a: Vec<f32> = bytes(m * k, 3).into_iter().map(|v| v as f32 / 128.0 - 1.0).collect();
        let block = 32;
        let codes = bytes(n * k / 2, 4);
        let scales = vec![0.01f32; n * k / block];
        let w8: Vec<i8> = bytes(k * n, 5).into_iter().map(|v| v as i8).collect();
        let wf: Vec<f32> = w8.iter().map(|&v| v as f32 * 0.01).collect();
        let p4 = PackedWeightOnly::from_nbits(4, k, n, block, &codes, &scales, None).expect("int4 packing");
        let p8 = PackedWeightOnly::from_i8(&w8, k, n, n, &[0.01]).expect("int8 packing");
        let pf = PackedB::new(&wf, k, n, n).expect("f32 packing");
        let mut out = vec![0f32; m * n];
        group.throughput(Throughput::Elements(ops(shape) as u64));
        for threads in [1usize, 2] {
            let par = if threads == 1 { Par::Seq } else { Par::Pool(pool2) };
            let record = |what: &str, best: Option<Duration>| {
                if let Some(best) = best {
                    let what = what.to_string();
                    ROWS.lock().expect("table lock").push(Row { what, shape, threads, best, peak: None });
                }
            };
            let tag = format!("{m}x{k}x{n}");
            let best = timed(&mut group, BenchmarkId::new(format!("int4-g32/{threads}t"), &tag), || {
                wgemm(m, black_box(&a), k, &p4, &mut out, n, Epilogue::NONE, par).expect("valid")
            });
            record("weight-only int4 g32", best);
            let best = timed(&mut group, BenchmarkId::new(format!("int8/{threads}t"), &tag), || {
                wgemm(m, black_box(&a), k, &p8, &mut out, n, Epilogue::NONE, par).expect("valid")
            });
            record("weight-only int8", best);
            let best = timed(&mut group, BenchmarkId::new(format!("f32/{threads}t"), &tag), || {
                gemm(m, black_box(&a), k, &pf, &mut out, n, Epilogue::NONE, par).expect("valid")
            });
            record("f32 sgemm", best);
        }
    }
    group.finish();
}

/// Per-row dynamic quantization of a GEMM's input (run before every per-token int8 GEMM).
fn bench_quantize_rows(c: &mut Criterion) {
    let mut group = c.benchmark_group("quantize_rows_u8");
    group.sample_size(20);
    group.warm_up_time(Duration::from_millis(300));
    group.measurement_time(Duration::from_secs(1));
    for (m, k) in [(128usize, 384usize), (4096, 1536)] {
        let x: Vec<f32> = bytes(m * k, 3).into_iter().map(|b| b as f32 / 37.0 - 3.0).collect();
        let (mut q, mut s, mut z) = (vec![0u8; m * k], vec![0f32; m], vec![0i32; m]);
        group.throughput(Throughput::Elements((m * k) as u64));
        group.bench_function(BenchmarkId::from_parameter(format!("{m}x{k}")), |b| {
            b.iter(|| slimnn_kernels::qgemm::quantize_rows_u8(black_box(&x), k, &mut q, &mut s, &mut z).expect("valid"))
        });
        group.bench_function(BenchmarkId::from_parameter(format!("static {m}x{k}")), |b| {
            b.iter(|| slimnn_kernels::qgemm::quantize_u8(black_box(&x), 0.05, 7, &mut q).expect("valid"))
        });
    }
    group.finish();
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let mut c = Criterion::default().configure_from_args();
    let pool2 = rayon::ThreadPoolBuilder::new().num_threads(2).build().expect("a 2-thread pool");
    let (iters, reps) = if full { (1_000_000, 200) } else { (1000, 1) };
    let measure = || (peak::measure(QKernel::Avx512Vnni, iters, reps), peak::measure(QKernel::AvxVnni, iters, reps));
    let before = measure();
    let peaks = move |k: QKernel| match k {
        QKernel::Avx512Vnni => before.0,
        QKernel::AvxVnni => before.1,
        _ => None,
    };
    bench_qgemm(&mut c, &pool2, &peaks);
    bench_weight_only(&mut c, &pool2);
    bench_quantize_rows(&mut c);
    c.final_summary();
    if !full {
        return;
    }
    let after = measure();
    let max = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    let (p512, p256) = (max(before.0, after.0), max(before.1, after.1));
    println!();
    println!("cpu: {}", cpu::describe());
    if let Some(p) = p512 {
        println!("measured peak, AVX-512 VNNI vpdpbusd, 1 core: {p:.1} GOP/s");
    }
    if let Some(p) = p256 {
        println!("measured peak, AVX-VNNI vpdpbusd (ymm), 1 core: {p:.1} GOP/s");
    }
    println!();
    println!(
        "{:<22} {:<16} {:>3} {:>10} {:>14} {:>10}",
        "kernel", "shape MxKxN", "thr", "best GOP/s", "% peak/core", "best ms"
    );
    for r in ROWS.lock().expect("table lock").iter() {
        let gops = ops(r.shape) / r.best.as_secs_f64() / 1e9;
        let peak = match r.what.as_str() {
            w if w.ends_with("avx512-vnni") => p512,
            w if w.ends_with("avx-vnni") => p256,
            _ => r.peak,
        };
        let pct = peak.map_or("-".to_string(), |p| format!("{:.1}%", 100.0 * gops / (p * r.threads as f64)));
        let (m, k, n) = r.shape;
        println!(
            "{:<22} {:<16} {:>3} {:>10.1} {:>14} {:>10.3}",
            r.what,
            format!("{m}x{k}x{n}"),
            r.threads,
            gops,
            pct,
            r.best.as_secs_f64() * 1e3
        );
    }
}
