//! The optimised runtime against the reference evaluator on the real MiniLM (differential).

mod common;

use common::*;
use slimnn_cli::tasks::SentenceEmbedder;
use slimnn_data::corpus::moby_dick_sentences;
use slimnn_runtime::{Runnable, RuntimeConfig};

#[test]
fn runtime_matches_reference_on_minilm() {
    let embedder = SentenceEmbedder::load(&asset("minilm"), Some(128)).unwrap();
    let sentences = moby_dick_sentences(&asset("moby-dick"), 4, 120).unwrap();
    let texts: Vec<&str> = (0..16).map(|i| sentences[i * 97 % sentences.len()].as_str()).collect();
    for threads in [1, 2] {
        let rt = Runnable::new(embedder.graph.clone(), RuntimeConfig::with_threads(threads)).unwrap();
        let mut state = rt.new_state();
        for chunk in texts.chunks(8) {
            let inputs = embedder.tokenizer.encode(chunk).unwrap().into_named();
            let shapes: Vec<Vec<usize>> = inputs.iter().map(|(_, t)| t.shape().to_vec()).collect();
            let reference = embedder.graph.eval(inputs.clone()).unwrap();
            let fast = rt.run(&mut state, inputs).unwrap();
            for ((name, _), (r, f)) in embedder.graph.outputs().iter().zip(reference.iter().zip(&fast)) {
                let d = r.max_abs_diff(f).unwrap();
                // Relative to the output's scale: the fusions' accuracy bar is 1e-5.
                let scale = r.to_f64_vec().iter().fold(0f64, |m, v| m.max(v.abs()));
                let rel = d / scale;
                eprintln!("threads {threads} shapes {:?} {name}: max abs diff {d:e}, relative {rel:e}", shapes[0]);
                assert!(d <= 1e-4, "{name}: {d}");
                assert!(rel <= 1e-5, "{name}: relative {rel}");
            }
            if shapes[0][1] < 64 {
                // Short sentences: one sample's work per weight byte is too small to split.
                assert!(!rt.splits_batch(&shapes).unwrap(), "{shapes:?}");
            }
            let summary = rt.plan_for(&shapes).unwrap().summary();
            assert_eq!(summary.kernels.get("attention"), Some(&6), "{:#?}", summary.kernels);
            // Batches of 8 have the rows for AMX tiles where the host has them: that path is
            // the one checked here.
            let tiles = summary.kernels.keys().filter(|k| k.starts_with("gemm_x6")).count();
            let amx = slimnn_runtime::f32_tiles_available() && shapes[0][0] * shapes[0][1] >= 96;
            assert_eq!(tiles > 0, amx, "{:#?}", summary.kernels);
            eprintln!("{:#?}", summary.kernels);
        }
    }
}

/// A batch of long sequences runs sentence by sentence (see `slimnn_runtime`'s `samples`) and
/// gives what the reference gives for the whole batch.
#[test]
fn long_batches_run_sample_by_sample_on_minilm() {
    let embedder = SentenceEmbedder::load(&asset("minilm"), Some(128)).unwrap();
    let sentences = moby_dick_sentences(&asset("moby-dick"), 4, 120).unwrap();
    // Paragraphs of consecutive sentences, cut at 128 tokens.
    let texts: Vec<String> = (0..3).map(|i| sentences[i * 40..i * 40 + 12].join(" ")).collect();
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    let inputs = embedder.tokenizer.encode(&texts).unwrap().into_named();
    let shapes: Vec<Vec<usize>> = inputs.iter().map(|(_, t)| t.shape().to_vec()).collect();
    assert_eq!(shapes[0], vec![3, 128]);
    let reference = embedder.graph.eval(inputs.clone()).unwrap();
    for threads in [1, 2] {
        let rt = Runnable::new(embedder.graph.clone(), RuntimeConfig::with_threads(threads)).unwrap();
        assert!(rt.splits_batch(&shapes).unwrap());
        let fast = rt.run(&mut rt.new_state(), inputs.clone()).unwrap();
        for ((name, _), (r, f)) in embedder.graph.outputs().iter().zip(reference.iter().zip(&fast)) {
            assert_eq!(r.shape(), f.shape(), "{name}");
            let d = r.max_abs_diff(f).unwrap();
            eprintln!("threads {threads} {name}: max abs diff {d:e}");
            assert!(d <= 1e-4, "{name}: {d}");
        }
    }
}
