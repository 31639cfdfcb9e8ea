//! all-MiniLM-L6-v2 quantized by ONNX Runtime's own tools (`scripts/quantize_ort.py`): dynamic
//! (DynamicQuantizeLinear + MatMulInteger), static QDQ (QuantizeLinear/DequantizeLinear pairs)
//! and static QOperator (QLinearMatMul), calibrated on tokenized Moby-Dick. Each model must
//! import, keep its integer ops, and agree with ONNX Runtime on sentences it was not
//! calibrated on.

mod common;

use common::*;
use slimnn_cli::tasks::{cosine, SentenceEmbedder};
use slimnn_data::corpus::moby_dick_sentences;
use slimnn_formats::{npy, onnx};
use slimnn_tensor::Tensor;
use std::process::Command;

/// One quantized model the script writes, the integer ops its import must contain, and the
/// largest differences from ONNX Runtime allowed on the two outputs.
struct Case {
    file: &'static str,
    int_ops: &'static [&'static str],
    hidden_atol: f64,
    embedding_atol: f64,
}

const CASES: &[Case] = &[
    Case {
        file: "dynamic.onnx",
        int_ops: &["DynamicQuantizeLinear", "MatMulInteger"],
        hidden_atol: f64::INFINITY,
        embedding_atol: f64::INFINITY,
    },
    Case {
        file: "static_qdq.onnx",
        int_ops: &["QuantizeLinear", "DequantizeLinear"],
        hidden_atol: f64::INFINITY,
        embedding_atol: f64::INFINITY,
    },
    Case {
        file: "static_qoperator.onnx",
        int_ops: &["QuantizeLinear", "QLinearMatMul", "DequantizeLinear"],
        hidden_atol: f64::INFINITY,
        embedding_atol: f64::INFINITY,
    },
];

const BATCH: usize = 8;

fn output<'a>(outs: &'a [(String, Tensor)], name: &str) -> &'a Tensor {
    &outs.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no output {name}")).1
}

/// Per-row cosines of two `[rows, dim]` f32 tensors.
fn row_cosines(a: &Tensor, b: &Tensor) -> Vec<f64> {
    let d = a.shape()[1];
    let (a, b) = (a.as_slice::<f32>().unwrap(), b.as_slice::<f32>().unwrap());
    a.chunks(d).zip(b.chunks(d)).map(|(x, y)| cosine(x, y)).collect()
}

#[test]
fn ort_quantized_minilm_imports_and_matches_onnxruntime() {
    let embedder = SentenceEmbedder::load(&asset("minilm"), Some(128)).unwrap();
    let g = &embedder.graph;
    let work = temp_dir("quantized-onnx");
    let fp32_path = work.join("minilm.onnx");
    onnx::save(g, &fp32_path).unwrap();

    // 32 sentences spread over the book, 4 batches: the even ones calibrate, the odd ones test.
    let sentences = moby_dick_sentences(&asset("moby-dick"), 4, 60).unwrap();
    assert!(sentences.len() >= 32);
    let picks: Vec<&str> = (0..32).map(|i| sentences[i * sentences.len() / 32 + 7].as_str()).collect();
    let batches: Vec<Vec<(String, Tensor)>> =
        picks.chunks(BATCH).map(|c| embedder.tokenizer.encode(c).unwrap().into_named()).collect();
    let calib_dir = work.join("calibration");
    for (b, inputs) in batches.iter().enumerate().filter(|(b, _)| b % 2 == 0) {
        let set = calib_dir.join(format!("set{b}"));
        std::fs::create_dir_all(&set).unwrap();
        for (name, t) in inputs {
            npy::write(&set.join(format!("{name}.npy")), t).unwrap();
        }
    }
    let eval: Vec<&Vec<(String, Tensor)>> = batches.iter().skip(1).step_by(2).collect();

    let q_dir = work.join("quantized");
    let out = Command::new(python())
        .arg(repo_root().join("scripts/quantize_ort.py"))
        .arg(&fp32_path)
        .arg(&q_dir)
        .arg("--calibration")
        .arg(&calib_dir)
        .output()
        .expect("python runs");
    assert!(out.status.success(), "quantize_ort.py failed: {}", String::from_utf8_lossy(&out.stderr));
    eprint!("{}", String::from_utf8_lossy(&out.stdout));

    // The fp32 embeddings the quantized ones are judged against.
    let fp32: Vec<Tensor> =
        eval.iter().map(|inputs| output(&named_eval(g, inputs), "sentence_embedding").clone()).collect();

    for case in CASES {
        let path = q_dir.join(case.file);
        let q = onnx::load(&path).unwrap_or_else(|e| panic!("{}: import failed: {e}", case.file));
        let hist = q.op_histogram();
        eprintln!("{}: {hist:?}", case.file);
        for op in case.int_ops {
            assert!(hist.get(op).copied().unwrap_or(0) > 0, "{}: no {op} after import: {hist:?}", case.file);
        }
        let (mut worst_hidden, mut worst_emb) = (0f64, 0f64);
        let (mut cos_ours, mut cos_ort) = (Vec::new(), Vec::new());
        for (b, inputs) in eval.iter().enumerate() {
            let ours = named_eval(&q, inputs);
            let ort = ort_run(&path, inputs, &work);
            for (name, worst, atol) in [
                ("last_hidden_state", &mut worst_hidden, case.hidden_atol),
                ("sentence_embedding", &mut worst_emb, case.embedding_atol),
            ] {
                let d = output(&ours, name).max_abs_diff(output(&ort, name)).expect("same shape");
                *worst = worst.max(d);
                assert!(d <= atol, "{} batch {b} {name}: max abs diff {d:e} > {atol:e}", case.file);
            }
            cos_ours.extend(row_cosines(output(&ours, "sentence_embedding"), &fp32[b]));
            cos_ort.extend(row_cosines(output(&ort, "sentence_embedding"), &fp32[b]));
        }
        let stats =
            |v: &[f64]| (v.iter().sum::<f64>() / v.len() as f64, v.iter().copied().fold(f64::INFINITY, f64::min));
        let ((mo, lo), (mr, lr)) = (stats(&cos_ours), stats(&cos_ort));
        eprintln!(
            "{}: vs ONNX Runtime max abs diff last_hidden_state {worst_hidden:e}, sentence_embedding {worst_emb:e}; \
             cosine to fp32 over {} sentences: slimnn mean {mo:.5} min {lo:.5}, ORT mean {mr:.5} min {lr:.5}",
            case.file,
            cos_ours.len()
        );
    }
}

/// The graph's outputs on `inputs`, paired with their names.
fn named_eval(g: &slimnn_ir::Graph, inputs: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    let outs = g.eval(inputs.to_vec()).unwrap();
    g.outputs().iter().map(|(n, _)| n.clone()).zip(outs).collect()
}
