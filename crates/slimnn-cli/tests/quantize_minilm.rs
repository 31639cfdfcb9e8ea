//! slimnn's own quantizer on all-MiniLM-L6-v2 over real Moby-Dick sentences: embedding
//! cosine to the fp32 model for int8 dynamic, static QDQ with each calibration method, int4
//! weight-only RTN vs GPTQ and bf16; the exported QDQ, dynamic and MatMulNBits files run in
//! ONNX Runtime with outputs matching slimnn's; the CLI refuses impossible requests.
//!
//! Calibration sentences and evaluation sentences are disjoint picks from the book. The
//! figures measured on 200 evaluation sentences are in doc/quantization.md; the bounds here
//! sit a little below what the smaller sets below measure.

mod common;

use common::*;
use slimnn_cli::tasks::cosine;
use slimnn_compress::mixed::{agreement, run_all, run_all_with};
use slimnn_compress::{quantize, ActivationGranularity, CalibrationMethod, Fallback, Mode, QuantRecipe};
use slimnn_data::corpus::moby_dick_sentences;
use slimnn_data::text::TextTokenizer;
use slimnn_formats::onnx;
use slimnn_ir::Graph;
use slimnn_runtime::{Runnable, RuntimeConfig};
use slimnn_tensor::Tensor;
use std::process::Command;

struct Data {
    graph: Graph,
    calib: Vec<Vec<(String, Tensor)>>,
    eval: Vec<Vec<(String, Tensor)>>,
    names: Vec<String>,
    reference: Vec<Vec<Tensor>>,
}

/// MiniLM, 64 calibration sentences in batches of 16, `eval_sentences` others in batches of 16.
fn setup(eval_sentences: usize) -> Data {
    let dir = asset("minilm");
    let graph = slimnn_formats::hf::load_bert(&dir).unwrap();
    let tok = TextTokenizer::from_file(&dir.join("tokenizer.json"), 128).unwrap();
    let s = moby_dick_sentences(&asset("moby-dick"), 4, 120).unwrap();
    let eval: Vec<&str> = (0..eval_sentences).map(|i| s[i * s.len() / eval_sentences].as_str()).collect();
    let calib: Vec<&str> = (0..64).map(|i| s[i * s.len() / 64 + 7].as_str()).collect();
    let enc = |texts: &[&str]| -> Vec<Vec<(String, Tensor)>> {
        texts.chunks(16).map(|c| tok.encode(c).unwrap().into_named()).collect()
    };
    let (calib, eval) = (enc(&calib), enc(&eval));
    let names = graph.outputs().iter().map(|(n, _)| n.clone()).collect();
    let reference = run_all(&graph, &eval, usize::MAX, 2).unwrap();
    Data { graph, calib, eval, names, reference }
}

/// (mean, min) embedding cosine of `q` to the fp32 model, and `q`'s outputs.
fn embedding_cosine(d: &Data, q: &Graph) -> ((f64, f64), Vec<Vec<Tensor>>) {
    let out = run_all(q, &d.eval, usize::MAX, 2).unwrap();
    let a = agreement(&d.names, &d.reference, &out).unwrap();
    let e = a.outputs.iter().find(|o| o.name == "sentence_embedding").unwrap();
    ((e.cosine_mean, e.cosine_min), out)
}

/// Runs the exported file in ONNX Runtime on the evaluation batches; returns the worst
/// per-sentence embedding cosine and max abs difference to slimnn's outputs, and the mean
/// cosine of ONNX Runtime's embeddings to the fp32 model's.
fn ort_agreement(d: &Data, q: &Graph, ours: &[Vec<Tensor>], tag: &str) -> (f64, f64, f64) {
    let (worst, _, max_abs, fp32) = ort_agreement_mean(d, q, ours, tag);
    (worst, max_abs, fp32)
}

/// [`ort_agreement`] plus the mean per-sentence cosine between the engines:
/// `(worst, mean, max abs, ORT's mean cosine to fp32)`.
fn ort_agreement_mean(d: &Data, q: &Graph, ours: &[Vec<Tensor>], tag: &str) -> (f64, f64, f64, f64) {
    let work = temp_dir(&format!("quantize-{tag}"));
    let path = work.join(format!("{tag}.onnx"));
    onnx::save(q, &path).unwrap();
    let emb = d.names.iter().position(|n| n == "sentence_embedding").unwrap();
    let (mut worst_cos, mut worst_abs, mut sum_cos) = (1f64, 0f64, 0f64);
    let (mut fp32_cos, mut rows) = (0f64, 0usize);
    for (b, batch) in d.eval.iter().enumerate() {
        let ort = ort_run(&path, batch, &work);
        let (_, r) = ort.iter().find(|(n, _)| n == "sentence_embedding").expect("ORT wrote the embedding");
        let t = &ours[b][emb];
        worst_abs = worst_abs.max(t.max_abs_diff(r).unwrap());
        let dim = t.shape()[1];
        for (x, y) in t.as_slice::<f32>().unwrap().chunks(dim).zip(r.as_slice::<f32>().unwrap().chunks(dim)) {
            worst_cos = worst_cos.min(cosine(x, y));
            sum_cos += cosine(x, y);
        }
        let fp32 = d.reference[b][emb].as_slice::<f32>().unwrap();
        for (x, y) in fp32.chunks(dim).zip(r.as_slice::<f32>().unwrap().chunks(dim)) {
            fp32_cos += cosine(x, y);
            rows += 1;
        }
    }
    (worst_cos, sum_cos / rows as f64, worst_abs, fp32_cos / rows as f64)
}

/// The exported file's size as a share of the fp32 model's.
fn file_share(d: &Data, q: &Graph) -> f64 {
    let (a, b) = (onnx::to_bytes(q).unwrap().len(), onnx::to_bytes(&d.graph).unwrap().len());
    a as f64 / b as f64
}

fn run(d: &Data, recipe: &QuantRecipe) -> Graph {
    quantize(&d.graph, recipe, &d.calib, &mut |_| {}).unwrap().0
}

#[test]
fn int8_dynamic_and_static_keep_embeddings_and_run_in_onnxruntime() {
    let d = setup(64);
    // Per-token dynamic (the default): one scale and zero point per row of each activation.
    let per_token = run(&d, &QuantRecipe { mode: Mode::Dynamic, ..Default::default() });
    assert_eq!(per_token.op_histogram().get("DynamicRowQuantMatMul"), Some(&36));
    let ((mean, min), out) = embedding_cosine(&d, &per_token);
    eprintln!("int8 dynamic per token: cosine mean {mean:.5} min {min:.5}");
    assert!(mean >= 0.998 && min >= 0.99, "per-token dynamic cosine mean {mean} min {min}");
    // Each layer's Q, K and V projections run as one integer GEMM over x quantized once.
    let r = slimnn_runtime::Runnable::new(per_token.clone(), Default::default()).unwrap();
    let shapes: Vec<Vec<usize>> = d.eval[0].iter().map(|(_, t)| t.shape().to_vec()).collect();
    let plan = r.plan_for(&shapes).unwrap().summary();
    let qkv = plan.fusions.iter().filter(|f| f.kind == "int8 per-token gemm+bias (fused QKV)").count();
    assert_eq!(qkv, 6, "{:?}", plan.kernels);
    // ONNX Runtime runs the op through its function body: the same integer products. The
    // engines' float parts (layer norm, attention, GELU) differ by ~1e-7 relative, which now and
    // then moves a value across a rounding boundary; a per-row scale keeps each flip in its row.
    let (c, cm, m, ort_mean) = ort_agreement_mean(&d, &per_token, &out, "dynamic-per-token");
    eprintln!(
        "int8 dynamic per token vs ONNX Runtime: cosine mean {cm:.6} worst {c:.6}, max abs {m:.2e}; ORT's cosine to fp32 {ort_mean:.5}"
    );
    assert!(cm >= 0.9995 && c >= 0.998, "per-token export vs ORT cosine mean {cm} worst {c}");
    assert!((ort_mean - mean).abs() <= 0.001, "ORT runs the export at cosine {ort_mean}, slimnn at {mean}");

    // With the embedding tables in 8 bits (blocks of 128, GatherBlockQuantized) the file is a
    // quarter of fp32 and as accurate.
    let small = run(&d, &QuantRecipe { quantize_embeddings: true, ..Default::default() });
    let ((mean, min), out) = embedding_cosine(&d, &small);
    let share = file_share(&d, &small);
    eprintln!(
        "int8 dynamic per token + 8-bit tables: cosine mean {mean:.5} min {min:.5}; file {:.1}% of fp32",
        100.0 * share
    );
    assert!(mean >= 0.998 && min >= 0.99 && share <= 0.27, "cosine mean {mean} min {min}, size {share}");
    let (c, cm, _, ort_mean) = ort_agreement_mean(&d, &small, &out, "dynamic-tables");
    eprintln!("  vs ONNX Runtime: cosine mean {cm:.6} worst {c:.6}; ORT's cosine to fp32 {ort_mean:.5}");
    assert!((ort_mean - mean).abs() <= 0.001, "ORT runs the export at cosine {ort_mean}, slimnn at {mean}");

    // Per-tensor dynamic: ORT's quantize_dynamic reaches mean 0.9925 / min 0.977 on 200 sentences.
    let per_tensor =
        QuantRecipe { activation_granularity: Some(ActivationGranularity::PerTensor), ..Default::default() };
    let dynamic = run(&d, &per_tensor);
    assert!(dynamic.op_histogram().get("MatMulInteger") == Some(&36));
    let ((mean, min), out) = embedding_cosine(&d, &dynamic);
    eprintln!("int8 dynamic per tensor: cosine mean {mean:.5} min {min:.5}");
    assert!(mean >= 0.99 && min >= 0.975, "dynamic cosine mean {mean} min {min}");
    // Per-tensor dynamic scales cascade one-step rounding flips (float differences between the
    // two engines) through the whole batch, so per-sentence agreement is loose (measured worst
    // 0.988 on 64 sentences); the exported model must be as accurate in ORT as in slimnn.
    let (c, m, ort_mean) = ort_agreement(&d, &dynamic, &out, "dynamic");
    eprintln!("int8 dynamic per tensor vs ONNX Runtime: worst cosine {c:.6}, max abs {m:.2e}; ORT's cosine to fp32 {ort_mean:.5}");
    assert!(c >= 0.975, "dynamic export vs ORT cosine {c}");
    assert!((ort_mean - mean).abs() <= 0.003, "ORT runs the export at cosine {ort_mean}, slimnn at {mean}");

    // Static QDQ with each calibration method. ORT's static QDQ reaches mean 0.93.
    let bounds = [
        (CalibrationMethod::Minmax, 0.985),
        (CalibrationMethod::Mse, 0.98),
        (CalibrationMethod::Entropy, 0.94),
        (CalibrationMethod::Percentile, 0.88),
    ];
    for (method, bound) in bounds {
        let q = run(&d, &QuantRecipe { mode: Mode::Static, calibration_method: method, ..Default::default() });
        let ((mean, min), out) = embedding_cosine(&d, &q);
        eprintln!("int8 static QDQ {method:?}: cosine mean {mean:.5} min {min:.5}");
        assert!(mean >= bound, "static {method:?} cosine mean {mean} < {bound}");
        if method == CalibrationMethod::Minmax {
            assert_eq!(q.op_histogram().get("QuantizeLinear"), Some(&24), "one Q/DQ pair per distinct activation");
            let (c, m, ort_mean) = ort_agreement(&d, &q, &out, "static");
            eprintln!("int8 static QDQ vs ONNX Runtime: worst cosine {c:.6}, max abs {m:.2e}; ORT's cosine to fp32 {ort_mean:.5}");
            assert!(c >= 0.99, "static QDQ export vs ORT cosine {c}");
            assert!((ort_mean - mean).abs() <= 0.003, "ORT runs the export at cosine {ort_mean}, slimnn at {mean}");
        }
    }
}

/// Static int8 with an error budget whose kept layers fall back to per-token dynamic int8: every
/// matmul stays on the integer kernels, and the embeddings reach the bar that static
/// int8 with every layer calibrated misses (minmax: ~0.992 mean). On the 200 sentences of
/// doc/quantization.md this recipe measured 0.99849 / 0.99665; 64 sentences here measured
/// 0.99830 / 0.99407, and the bound sits a little below.
#[test]
fn static_with_dynamic_fallback_keeps_every_matmul_int8() {
    let d = setup(64);
    let recipe =
        QuantRecipe { mode: Mode::Static, error_budget: Some(0.07), fallback: Fallback::Dynamic, ..Default::default() };
    let (q, report) = quantize(&d.graph, &recipe, &d.calib, &mut |_| {}).unwrap();
    let count = |scheme: &str| report.layers.iter().filter(|l| l.scheme == scheme).count();
    let (stat, dynamic) = (count("int8-qdq"), count("int8-dynamic-per-token"));
    eprintln!("static {stat} layers, dynamic {dynamic}; {:?}", report.notes);
    assert_eq!(
        stat + dynamic,
        36,
        "every layer int8: {:?}",
        report.layers.iter().map(|l| &l.scheme).collect::<Vec<_>>()
    );
    assert!(stat > 0 && dynamic > 0, "static {stat}, dynamic {dynamic}");
    assert_eq!(q.op_histogram().get("DynamicRowQuantMatMul"), Some(&dynamic));
    let ((mean, min), _) = embedding_cosine(&d, &q);
    eprintln!("int8 static + dynamic fallback: cosine mean {mean:.5} min {min:.5}");
    assert!(mean >= 0.9975 && min >= 0.99, "cosine mean {mean} min {min}");
}

/// Static int8 on every matmul, each activation's 8 outlier channels apart (float for the
/// FFN output projections, migrated into the weights elsewhere): the accuracy bar with
/// calibrated scales only, a file ONNX Runtime runs to the same outputs, and one integer GEMM
/// step per matmul in slimnn.
#[test]
fn static_with_outlier_channels_meets_the_bar_and_runs_in_onnxruntime() {
    let d = setup(64);
    let recipe =
        QuantRecipe { mode: Mode::Static, outlier_channels: 8, quantize_embeddings: true, ..Default::default() };
    // Without the option, the report says it would help.
    let plain = QuantRecipe { outlier_channels: 0, ..recipe.clone() };
    let (_, plain_report) = quantize(&d.graph, &plain, &d.calib, &mut |_| {}).unwrap();
    assert!(plain_report.notes.iter().any(|n| n.contains("--outlier-channels 8")), "{:?}", plain_report.notes);
    let (q, report) = quantize(&d.graph, &recipe, &d.calib, &mut |_| {}).unwrap();
    assert!(!report.notes.iter().any(|n| n.contains("--outlier-channels 8")), "{:?}", report.notes);
    let notes =
        |what: &str| report.layers.iter().filter(|l| l.note.as_deref().is_some_and(|n| n.contains(what))).count();
    let (float, migrated) = (notes("in float"), notes("migrated"));
    assert_eq!((float, migrated), (6, 30), "FFN output projections float, the rest migrated");
    assert_eq!(report.layers.iter().filter(|l| l.scheme == "int8-qdq").count(), 36);
    let gathers = q.nodes().iter().filter(|n| n.name.ends_with("_outliers")).count();
    assert_eq!(gathers, 6, "one gather of float channels per FFN output projection");
    let ((mean, min), out) = embedding_cosine(&d, &q);
    eprintln!("int8 static + 8 outlier channels: cosine mean {mean:.5} min {min:.5}");
    assert!(mean >= 0.998 && min >= 0.99, "cosine mean {mean} min {min}");
    let share = file_share(&d, &q);
    assert!(share <= 0.27, "file {:.1}% of fp32", 100.0 * share);
    // Every matmul one integer GEMM step: the float channels in its epilogue (their gather
    // inside it), the divisions in the quantization steps.
    let r = Runnable::new(q.clone(), RuntimeConfig::default()).unwrap();
    let shapes: Vec<Vec<usize>> = d.eval[0].iter().map(|(_, t)| t.shape().to_vec()).collect();
    let kernels = r.plan_for(&shapes).unwrap().summary().kernels;
    let count = |f: &dyn Fn(&str) -> bool| kernels.iter().filter(|(k, _)| f(k)).map(|(_, n)| *n).sum::<usize>();
    assert_eq!(count(&|k| k.starts_with("qgemm_u8i8") && k.ends_with("+outliers8")), 6, "{kernels:?}");
    assert_eq!(count(&|k| k.starts_with("qgemm_u8i8")), 36, "{kernels:?}");
    assert_eq!(count(&|k| k == "mul_channels+quantize_u8"), 18, "{kernels:?}");
    assert_eq!(count(&|k| k.contains("Gather") || k.starts_with("gemm")), 0, "{kernels:?}");
    // A batch still runs a few samples at a time (the gather of fixed channels is per sample).
    let four: Vec<Vec<usize>> = shapes.iter().map(|s| [&[4], &s[1..]].concat()).collect();
    assert!(r.splits_batch(&four).unwrap(), "batch of 4 runs in sample runs");
    let (c, cm, m, ort_mean) = ort_agreement_mean(&d, &q, &out, "static-outliers");
    eprintln!("vs ONNX Runtime: cosine mean {cm:.6} worst {c:.6}, max abs {m:.2e}; ORT's cosine to fp32 {ort_mean:.5}");
    assert!(cm >= 0.999 && c >= 0.99, "static outlier export vs ORT cosine mean {cm} worst {c}");
}

#[test]
fn int4_gptq_beats_round_to_nearest_and_matmulnbits_runs_in_onnxruntime() {
    let d = setup(32);
    // Embedding tables in 4 bits too (GatherBlockQuantized), or the file cannot be small.
    let int4 = QuantRecipe {
        mode: Mode::WeightOnly,
        bits: 4,
        group_size: 32,
        quantize_embeddings: true,
        ..Default::default()
    };
    let rtn = run(&d, &int4);
    assert_eq!(rtn.op_histogram().get("MatMulNBits"), Some(&36));
    assert_eq!(rtn.op_histogram().get("GatherBlockQuantized"), Some(&2), "word and position tables");
    let ((rtn_mean, rtn_min), rtn_out) = embedding_cosine(&d, &rtn);
    let gptq = run(&d, &QuantRecipe { gptq: true, ..int4.clone() });
    let ((gptq_mean, gptq_min), _) = embedding_cosine(&d, &gptq);
    eprintln!("int4 g32: RTN cosine mean {rtn_mean:.5} min {rtn_min:.5}; GPTQ mean {gptq_mean:.5} min {gptq_min:.5}");
    assert!(rtn_mean >= 0.94, "int4 RTN cosine {rtn_mean}");
    assert!(gptq_mean > rtn_mean, "GPTQ {gptq_mean} should beat RTN {rtn_mean}");
    let (c, m, _) = ort_agreement(&d, &rtn, &rtn_out, "int4");
    eprintln!("int4 MatMulNBits vs ONNX Runtime: worst cosine {c:.7}, max abs {m:.2e}");
    // Same dequantized weights and tables; only float summation order differs.
    assert!(c >= 0.99999 && m <= 1e-3, "MatMulNBits export vs ORT: cosine {c}, max abs {m}");
    // Round trip: the exported file imports with its MatMulNBits nodes.
    let work = temp_dir("int4-import");
    let path = work.join("int4.onnx");
    onnx::save(&rtn, &path).unwrap();
    let back = onnx::load(&path).unwrap();
    assert_eq!(back.op_histogram().get("MatMulNBits"), Some(&36));
    assert_eq!(back.op_histogram().get("GatherBlockQuantized"), Some(&2));
    let size = std::fs::metadata(&path).unwrap().len();
    onnx::save(&d.graph, &work.join("fp32.onnx")).unwrap();
    let fp32 = std::fs::metadata(work.join("fp32.onnx")).unwrap().len();
    let share = size as f64 / fp32 as f64;
    eprintln!("int4 g32 file: {:.1}% of fp32", 100.0 * share);
    assert!(share <= 0.16, "int4 g32 file is {:.1}% of fp32", 100.0 * share);
}

#[test]
fn bf16_weights_match_fp32_and_run_in_onnxruntime() {
    let d = setup(16);
    let q = run(&d, &QuantRecipe { mode: Mode::Bf16, ..Default::default() });
    let ((mean, min), out) = embedding_cosine(&d, &q);
    eprintln!("bf16 weights: cosine mean {mean:.6} min {min:.6}");
    assert!(min >= 0.9995, "bf16 cosine min {min}");
    let (c, m, _) = ort_agreement(&d, &q, &out, "bf16");
    eprintln!("bf16 vs ONNX Runtime: worst cosine {c:.7}, max abs {m:.2e}");
    assert!(c >= 0.99999, "bf16 export vs ORT cosine {c}");
}

/// int8 attention (`RuntimeConfig::int8_attention`, AMX hosts) on the fp32 model and on the
/// int8 dynamic one: both products quantized, the embeddings keep the int8 targets. Measured on
/// 200 sentences: fp32 0.9999 mean / 0.9996 min, int8 dynamic 0.9986 / 0.9963.
#[test]
fn int8_attention_keeps_embeddings() {
    let d = setup(48);
    let native = slimnn_kernels::attention::int8_native(32);
    let config = RuntimeConfig { int8_attention: true, ..RuntimeConfig::with_threads(2) };
    let rt = Runnable::new(d.graph.clone(), config.clone()).unwrap();
    let kernels = rt.plan_for(&[vec![1, 128], vec![1, 128], vec![1, 128]]).unwrap().summary().kernels;
    assert_eq!(kernels.contains_key("attention_int8"), native, "{kernels:?}");
    let dynamic = run(&d, &QuantRecipe { mode: Mode::Dynamic, ..Default::default() });
    for (what, g, mean_at_least, min_at_least) in
        [("fp32", &d.graph, 0.9995, 0.999), ("int8 dynamic", &dynamic, 0.998, 0.99)]
    {
        let out = run_all_with(g, &d.eval, usize::MAX, config.clone()).unwrap();
        let a = agreement(&d.names, &d.reference, &out).unwrap();
        let e = a.outputs.iter().find(|o| o.name == "sentence_embedding").unwrap();
        eprintln!("{what} + int8 attention: cosine mean {:.5} min {:.5}", e.cosine_mean, e.cosine_min);
        assert!(e.cosine_mean >= mean_at_least && e.cosine_min >= min_at_least, "{what}: {e:?}");
        if native && what == "fp32" {
            assert!(e.cosine_min < 0.999999, "int8 products should move the embeddings: {e:?}");
        }
    }
}

fn slimnn(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_slimnn")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).to_string())
}

#[test]
fn cli_refuses_impossible_requests_and_writes_nothing() {
    let model = asset("minilm");
    let work = temp_dir("quantize-cli");
    let out = work.join("q.onnx");
    let o = out.to_str().unwrap();
    let m = model.to_str().unwrap();
    let (ok, err) = slimnn(&["quantize", m, "-o", o, "--mode", "static", "--bits", "4"]);
    assert!(!ok && err.contains("4-bit activations are not supported"), "{err}");
    let (ok, err) = slimnn(&["quantize", m, "-o", o, "--mode", "weight-only", "--bits", "4", "--group-size", "48"]);
    assert!(!ok && err.contains("--group-size"), "{err}");
    let empty = work.join("empty.txt");
    std::fs::write(&empty, "\n  \n").unwrap();
    let (ok, err) = slimnn(&["quantize", m, "-o", o, "--mode", "static", "--calibration", empty.to_str().unwrap()]);
    assert!(!ok && err.contains("no sentences"), "{err}");
    let (ok, err) = slimnn(&["quantize", m, "-o", o, "--mode", "static"]);
    assert!(!ok && err.contains("--calibration"), "{err}");
    let (ok, err) = slimnn(&["quantize", m, "-o", o, "--outlier-channels", "8"]);
    assert!(!ok && err.contains("--outlier-channels applies to --mode static"), "{err}");
    let (ok, err) = slimnn(&["quantize", "/no/such/model", "-o", o]);
    assert!(!ok && err.contains("no such file"), "{err}");
    assert!(!out.exists(), "a refused request must not write an output");
}

/// The BatchSource the CLI builds from a text file tokenizes on demand and keeps the model's
/// input names.
#[test]
fn text_calibration_source_batches_sentences() {
    let model = asset("minilm");
    let g = slimnn_formats::hf::load_bert(&model).unwrap();
    let work = temp_dir("quantize-text");
    let f = work.join("s.txt");
    std::fs::write(&f, "Call me Ishmael.\n\nSome years ago, never mind how long precisely.\nIt is a way I have.\n")
        .unwrap();
    let opts = slimnn_cli::quantize::DataOptions { batch_size: 2, samples: 100, max_length: 128, tokenizer: None };
    let src = slimnn_cli::quantize::data_source(&model, &g, &f, &opts).unwrap();
    assert_eq!(src.batches(), 2);
    let b = src.batch(1).unwrap();
    assert_eq!(b.len(), 3);
    assert_eq!(b[0].1.shape()[0], 1);
}
