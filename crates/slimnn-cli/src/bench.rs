//! `slimnn bench`: latency and throughput of the optimised runtime on real inputs, optionally
//! side by side with ONNX Runtime on the same ONNX file, inputs and thread count.

use anyhow::{bail, Context, Result};
use slimnn_data::text::TextTokenizer;
use slimnn_formats::{npy, onnx};
use slimnn_ir::{Graph, Op};
use slimnn_runtime::{Precision, Runnable, RuntimeConfig};
use slimnn_tensor::{DType, Dim, Tensor};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The ONNX Runtime timing script, written next to the inputs when `--vs-onnxruntime` is given.
const ORT_BENCH_PY: &str = include_str!("../../../scripts/ort_bench.py");

#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub batches: Vec<usize>,
    pub seq: usize,
    pub threads: Vec<usize>,
    pub warmup: usize,
    pub iterations: usize,
    pub vs_onnxruntime: bool,
    /// ONNX Runtime times this file instead of the benchmarked model (same inputs): its own
    /// quantized version of the model, say. Implies `vs_onnxruntime`.
    pub ort_model: Option<PathBuf>,
    pub tokenizer: Option<PathBuf>,
    /// Arithmetic of slimnn's linear layers (ONNX Runtime runs the file as it is).
    pub precision: Precision,
    /// `RuntimeConfig::int8_attention`.
    pub int8_attention: bool,
}

/// One configuration's figures (`--json` writes a list of these).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Record {
    pub batch: usize,
    /// Sequence length of text models; `None` for other inputs.
    pub seq: Option<usize>,
    pub threads: usize,
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    /// Sequences (or images) per second at the median latency.
    pub throughput: f64,
    pub gflop: f64,
    pub gflops: f64,
    /// Peak bytes of activations held by the run's state.
    pub peak_memory_bytes: usize,
    /// Peak resident set of the whole process so far (weights, plans and activations).
    pub peak_rss_bytes: u64,
    /// Resident set after the timed runs minus before them (0 when memory is reused).
    pub rss_growth_bytes: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ort_median_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ort_min_ms: Option<f64>,
    /// ONNX Runtime median / slimnn median (above 1: slimnn is faster).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speedup: Option<f64>,
}

/// Loads the model as ONNX (exporting a checkpoint folder first) so both runtimes read the same file.
fn onnx_model(path: &Path, work: &Path) -> Result<(Graph, PathBuf)> {
    if path.is_dir() || slimnn_formats::torch::is_checkpoint(path) {
        let g = crate::model::load(path)?;
        let out = work.join("model.onnx");
        onnx::save(&g, &out).with_context(|| format!("exporting {}", path.display()))?;
        return Ok((onnx::load(&out)?, out));
    }
    Ok((crate::model::load(path)?, path.to_path_buf()))
}

fn find_tokenizer(model: &Path, given: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = given {
        return Some(p.to_path_buf());
    }
    let dir = if model.is_dir() { model.to_path_buf() } else { model.parent()?.to_path_buf() };
    let p = dir.join("tokenizer.json");
    p.is_file().then_some(p)
}

fn assets_dir() -> PathBuf {
    std::env::var_os("SLIMNN_ASSETS").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("assets"))
}

/// Real inputs for one batch: tokenized Moby-Dick text for BERT-style signatures, photos from
/// assets/images for image models, else deterministic pseudo-random values of each input's dtype.
fn make_inputs(g: &Graph, model: &Path, cfg: &BenchConfig, batch: usize) -> Result<Vec<(String, Tensor)>> {
    if let Some(images) = crate::classify::bench_batch(g, &assets_dir().join("images"), batch)? {
        return Ok(vec![images]);
    }
    let names: Vec<&str> = (0..g.inputs().len()).map(|i| g.input_name(i)).collect();
    if names.contains(&"input_ids") {
        let tok_path = find_tokenizer(model, cfg.tokenizer.as_deref())
            .context("a BERT-style model needs tokenizer.json next to it, or --tokenizer FILE")?;
        let tok = TextTokenizer::from_file(&tok_path, cfg.seq)?;
        let sentences = slimnn_data::corpus::moby_dick_sentences(&assets_dir().join("moby-dick"), 4, 200)
            .context("bench text comes from assets/moby-dick (run scripts/fetch-assets.sh)")?;
        // Each row joins consecutive sentences so it fills the sequence with real text.
        let texts: Vec<String> = (0..batch)
            .map(|i| sentences[i * 12 % sentences.len()..].iter().take(12).cloned().collect::<Vec<_>>().join(" "))
            .collect();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let enc = tok.encode_fixed(&refs, cfg.seq)?;
        let all = enc.into_named();
        return Ok(all.into_iter().filter(|(n, _)| names.contains(&n.as_str())).collect());
    }
    let mut seed = 0x2545F4914F6CDD1Du64;
    (0..g.inputs().len())
        .map(|i| {
            let f = g.input_fact(i);
            let shape: Vec<usize> = f
                .shape
                .iter()
                .enumerate()
                .map(|(axis, d)| match d {
                    Dim::Known(n) => Ok(*n),
                    _ if axis == 0 => Ok(batch),
                    _ => bail!("input '{}' dim {axis} is not fixed; only the batch dim may vary", g.input_name(i)),
                })
                .collect::<Result<_>>()?;
            let n: usize = shape.iter().product();
            let vals: Vec<f64> = (0..n)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    (seed % 2000) as f64 / 1000.0 - 1.0
                })
                .collect();
            let t = match f.dtype {
                DType::F32 | DType::F64 | DType::F16 | DType::BF16 => Tensor::from_f64s(f.dtype, shape, &vals)?,
                dt => Tensor::zeros(dt, shape)?,
            };
            Ok((g.input_name(i).to_string(), t))
        })
        .collect()
}

/// Operations (2 per multiply-add, float or integer) of the matrix products and convolutions of
/// `g` specialised to `shapes`.
pub fn count_flops(g: &Graph, shapes: &[Vec<usize>]) -> Result<f64> {
    let s = g.specialized(shapes)?;
    let mut flops = 0f64;
    for n in s.nodes() {
        let out: f64 = n.outputs[0].known_shape().map(|v| v.iter().product::<usize>() as f64).unwrap_or(0.0);
        let in_shape = |i: usize| s.fact(n.inputs[i]).known_shape().unwrap_or_default();
        flops += match &n.op {
            // Integer and weight-only products count like float ones: 2 ops per multiply-add.
            Op::MatMul(_)
            | Op::MatMulInteger(_)
            | Op::QLinearMatMul(_)
            | Op::DynamicRowQuantMatMul(_)
            | Op::MatMulNBits(_) => 2.0 * out * *in_shape(0).last().unwrap_or(&0) as f64,
            Op::Gemm(gm) => {
                let a = in_shape(0);
                let k = if gm.trans_a { a.first() } else { a.last() };
                2.0 * out * *k.unwrap_or(&0) as f64
            }
            Op::Conv(_) | Op::ConvInteger(_) | Op::QLinearConv(_) => {
                let w = in_shape(if matches!(n.op, Op::QLinearConv(_)) { 3 } else { 1 });
                2.0 * out * w.iter().skip(1).product::<usize>() as f64
            }
            _ => 0.0,
        };
    }
    Ok(flops)
}

/// A `/proc/self/status` memory line (`VmRSS:`, `VmHWM:`) in bytes; 0 where unavailable.
fn status_kb(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn peak_rss() -> u64 {
    status_kb("VmHWM:")
}

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("SLIMNN_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = std::env::var_os("SLIMNN_VENV").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(".venv"));
    let p = venv.join("bin/python");
    if p.is_file() {
        p
    } else {
        PathBuf::from("python3")
    }
}

struct OrtTimes {
    median: f64,
    min: f64,
}

fn run_ort(
    model: &Path,
    inputs: &[(String, Tensor)],
    threads: usize,
    cfg: &BenchConfig,
    work: &Path,
) -> Result<OrtTimes> {
    let dir = work.join("ort-inputs");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    for (name, t) in inputs {
        npy::write(&dir.join(format!("{name}.npy")), t)?;
    }
    let script = work.join("ort_bench.py");
    std::fs::write(&script, ORT_BENCH_PY)?;
    let out = std::process::Command::new(python())
        .arg(&script)
        .arg(model)
        .args(["--input-dir", &dir.to_string_lossy()])
        .args(["--threads", &threads.to_string()])
        .args(["--warmup", &cfg.warmup.to_string(), "--iterations", &cfg.iterations.to_string()])
        .output()
        .context("starting Python for ONNX Runtime (set SLIMNN_VENV or run scripts/setup-python.sh)")?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        bail!("ONNX Runtime failed: {}", err.lines().last().unwrap_or("no message"));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("reading ort_bench.py output")?;
    Ok(OrtTimes { median: v["median_ms"].as_f64().unwrap_or(f64::NAN), min: v["min_ms"].as_f64().unwrap_or(f64::NAN) })
}

fn stats(mut ms: Vec<f64>) -> (f64, f64, f64) {
    ms.sort_by(|a, b| a.total_cmp(b));
    let median = if ms.len() % 2 == 1 { ms[ms.len() / 2] } else { (ms[ms.len() / 2 - 1] + ms[ms.len() / 2]) / 2.0 };
    (median, ms[0], ms[ms.len() - 1])
}

/// Runs every (batch, threads) configuration and returns one record each.
pub fn bench(model: &Path, cfg: &BenchConfig, mut report: impl FnMut(&Record)) -> Result<Vec<Record>> {
    if cfg.iterations == 0 {
        bail!("--iterations must be at least 1");
    }
    // Removed on every exit path, errors included.
    let scratch = tempfile::Builder::new().prefix("slimnn-bench-").tempdir()?;
    let work = scratch.path();
    let (graph, onnx_path) = onnx_model(model, work)?;
    let ort_path = cfg.ort_model.clone().unwrap_or(onnx_path);
    if !ort_path.is_file() {
        bail!("--ort-model {}: no such file", ort_path.display());
    }
    let mut records = vec![];
    for &threads in &cfg.threads {
        let rt = Runnable::new(
            graph.clone(),
            RuntimeConfig { threads, precision: cfg.precision, int8_attention: cfg.int8_attention },
        )?;
        for &batch in &cfg.batches {
            let inputs = make_inputs(&graph, model, cfg, batch)?;
            let shapes: Vec<Vec<usize>> = inputs.iter().map(|(_, t)| t.shape().to_vec()).collect();
            let flops = count_flops(rt.graph(), &shapes)?;
            let mut state = rt.new_state();
            for _ in 0..cfg.warmup.max(1) {
                rt.run(&mut state, inputs.clone())?;
            }
            let mut ms = Vec::with_capacity(cfg.iterations);
            let rss_before = status_kb("VmRSS:");
            for _ in 0..cfg.iterations {
                let inp = inputs.clone();
                let t = Instant::now();
                rt.run(&mut state, inp)?;
                ms.push(t.elapsed().as_secs_f64() * 1e3);
            }
            let rss_growth = status_kb("VmRSS:") as i64 - rss_before as i64;
            let (median, min, max) = stats(ms);
            if std::env::var_os("SLIMNN_PROFILE").is_some() {
                let mut st = rt.new_state();
                rt.run(&mut st, inputs.clone())?;
                // SLIMNN_PROFILE=steps: one line per node.
                if std::env::var_os("SLIMNN_PROFILE").is_some_and(|v| v == "steps") {
                    st.enable_step_profile();
                } else {
                    st.enable_profile();
                }
                for _ in 0..cfg.iterations {
                    rt.run(&mut st, inputs.clone())?;
                }
                for (k, d, n) in st.profile() {
                    eprintln!(
                        "  profile {k:<28} {:>9.3} ms/run  ({} calls/run)",
                        d.as_secs_f64() * 1e3 / cfg.iterations as f64,
                        n / cfg.iterations
                    );
                }
            }
            let with_ort = cfg.vs_onnxruntime || cfg.ort_model.is_some();
            let ort = if with_ort { Some(run_ort(&ort_path, &inputs, threads, cfg, work)?) } else { None };
            let r = Record {
                batch,
                seq: inputs.iter().find(|(n, _)| n == "input_ids").and_then(|(_, t)| t.shape().get(1).copied()),
                threads,
                median_ms: median,
                min_ms: min,
                max_ms: max,
                throughput: batch as f64 / (median / 1e3),
                gflop: flops / 1e9,
                gflops: flops / 1e9 / (median / 1e3),
                peak_memory_bytes: state.peak_activation_bytes(),
                peak_rss_bytes: peak_rss(),
                rss_growth_bytes: rss_growth,
                ort_median_ms: ort.as_ref().map(|o| o.median),
                ort_min_ms: ort.as_ref().map(|o| o.min),
                speedup: ort.as_ref().map(|o| o.median / median),
            };
            report(&r);
            records.push(r);
        }
    }
    Ok(records)
}
