//! all-MiniLM-L6-v2 end to end: safetensors import, ONNX export, ONNX Runtime agreement on
//! 200 real sentences, round trip, and embedding sanity.

mod common;

use common::*;
use slimnn_cli::tasks::{cosine, SentenceEmbedder};
use slimnn_data::corpus::moby_dick_sentences;
use slimnn_formats::onnx;
use slimnn_ir::ops::Op;
use slimnn_tensor::Tensor;
use std::collections::BTreeMap;

/// Token-state tolerance against ONNX Runtime (the bar).
const TOKEN_ATOL: f64 = 1e-4;

#[test]
fn minilm_matches_onnxruntime_on_200_sentences_and_round_trips() {
    let dir = asset("minilm");
    let embedder = SentenceEmbedder::load(&dir, Some(128)).unwrap();
    let g = &embedder.graph;
    let work = temp_dir("minilm");
    let onnx_path = work.join("minilm.onnx");
    onnx::save(g, &onnx_path).unwrap();

    // Round trip: import of the export has the same weights and the same structure.
    let back = onnx::load(&onnx_path).unwrap();
    let weights = |g: &slimnn_ir::Graph| -> BTreeMap<String, Tensor> {
        g.nodes()
            .iter()
            .filter_map(|n| match &n.op {
                Op::Const(c) if c.0.dtype().is_float() && c.0.len() > 1 => Some((n.name.clone(), (*c.0).clone())),
                _ => None,
            })
            .collect()
    };
    let (w0, w1) = (weights(g), weights(&back));
    assert_eq!(
        w0.keys().collect::<Vec<_>>(),
        w1.keys().collect::<Vec<_>>(),
        "weight names differ after export + import"
    );
    for (name, t) in &w0 {
        assert!(t == &w1[name], "weight {name} differs after export + import");
    }
    assert_eq!(w0.len(), 101, "MiniLM has 101 weight tensors (pooler excluded)");
    assert_eq!(g.op_histogram(), back.op_histogram());

    let sentences = moby_dick_sentences(&asset("moby-dick"), 4, 120).unwrap();
    assert!(sentences.len() >= 200);
    // Spread the picks over the book; long ones are truncated to 128 tokens.
    let picks: Vec<&str> = (0..200).map(|i| sentences[i * sentences.len() / 200].as_str()).collect();
    let mut worst = 0f64;
    let mut max_seq = 0;
    for (b, chunk) in picks.chunks(25).enumerate() {
        let enc = embedder.tokenizer.encode(chunk).unwrap();
        max_seq = max_seq.max(enc.input_ids.shape()[1]);
        let inputs = enc.into_named();
        let ours = g.eval(inputs.clone()).unwrap();
        let again = back.eval(inputs.clone()).unwrap();
        assert_eq!(ours, again, "batch {b}: re-imported model gives different outputs");
        let ort = ort_run(&onnx_path, &inputs, &work);
        for ((name, _), t) in g.outputs().iter().zip(&ours) {
            let (_, r) = ort.iter().find(|(n, _)| n == name).expect("ORT wrote every output");
            let d = t.max_abs_diff(r).expect("same shape");
            worst = worst.max(d);
            assert!(d <= TOKEN_ATOL, "batch {b} output {name}: max abs diff {d:e} > {TOKEN_ATOL:e}");
        }
    }
    assert!(max_seq >= 100, "test should reach long sequences, got {max_seq}");
    eprintln!("MiniLM vs ONNX Runtime: 200 sentences, max seq {max_seq}, max abs diff {worst:e}");
}

#[test]
fn minilm_embeddings_separate_paraphrases_from_unrelated_text() {
    let embedder = SentenceEmbedder::load(&asset("minilm"), None).unwrap();
    let texts =
        ["A man is playing a guitar.", "A man plays the guitar.", "The quarterly tax report is due next Tuesday."];
    let e = embedder.embed(&texts, 3).unwrap();
    let v = e.as_slice::<f32>().unwrap();
    let d = e.shape()[1];
    let (a, b, c) = (&v[..d], &v[d..2 * d], &v[2 * d..]);
    let para = cosine(a, b);
    let unrel = cosine(a, c);
    eprintln!("paraphrase cosine {para:.3}, unrelated cosine {unrel:.3}");
    assert!(para > 0.7, "paraphrase cosine {para}");
    assert!(unrel < 0.3, "unrelated cosine {unrel}");
    for row in v.chunks(d) {
        let n: f32 = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((n - 1.0).abs() < 1e-4, "embeddings are L2-normalised");
    }
}
