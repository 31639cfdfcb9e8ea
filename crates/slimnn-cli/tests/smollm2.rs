//! SmolLM2-135M-Instruct (GGUF, Q4_1) against a float64 numpy reference
//! (`scripts/llama_ref.py`), the KV-cache decode path against the full forward, greedy
//! determinism, and bad inputs.

mod common;

use common::{asset, python, repo_root, temp_dir};
use slimnn_cli::llm::{Llm, SampleOptions};
use slimnn_formats::gguf::{write::gguf_bytes, GgufValue};
use slimnn_runtime::State;
use std::path::PathBuf;
use std::process::Command;

const MODEL: &str = "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

fn model() -> PathBuf {
    asset(MODEL)
}

fn max_rel(a: &[f32], b: &[f64]) -> f64 {
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0f64, |m, (&x, &y)| m.max((x as f64 - y).abs())) / scale
}

#[test]
fn next_token_logits_match_float64_reference() {
    let llm = Llm::load(&model(), 2).unwrap();
    let prompts =
        ["The capital of France is", "Call me Ishmael. Some years ago, never mind how long", "def fibonacci(n):"];
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| llm.encode_prompt(p, false).unwrap()).collect();
    let dir = temp_dir("smollm2-ref");
    let ids_path = dir.join("ids.json");
    let json: Vec<String> =
        ids.iter().map(|v| format!("[{}]", v.iter().map(u32::to_string).collect::<Vec<_>>().join(","))).collect();
    std::fs::write(&ids_path, format!("[{}]", json.join(","))).unwrap();
    let out = dir.join("ref.npy");
    let status = Command::new(python())
        .arg(repo_root().join("scripts/llama_ref.py"))
        .arg(model())
        .arg(&ids_path)
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success(), "llama_ref.py failed");
    let reference = slimnn_formats::npy::read(&out).unwrap();
    let vocab = llm.config.vocab;
    let r = reference.to_f64_vec();
    for (i, p) in ids.iter().enumerate() {
        let logits = llm.logits(p).unwrap();
        let l = logits.as_slice::<f32>().unwrap();
        let last = &l[(p.len() - 1) * vocab..];
        let rr = &r[i * vocab..(i + 1) * vocab];
        let rel = max_rel(last, rr);
        let argmax =
            |v: &[f64]| v.iter().enumerate().fold((0, f64::MIN), |b, (j, &x)| if x > b.1 { (j, x) } else { b }).0;
        let top = argmax(&last.iter().map(|&x| x as f64).collect::<Vec<_>>());
        println!(
            "prompt {i} ({} tokens): max |diff| / max |logit| = {rel:.2e}; next token {top} ({:?})",
            p.len(),
            llm.tokenizer.token(top as u32)
        );
        assert!(rel <= 1e-3, "prompt {i}: relative logit error {rel}");
        assert_eq!(top, argmax(rr), "prompt {i}: arg-max differs");
    }
}

#[test]
fn kv_cache_decode_matches_full_forward() {
    let llm = Llm::load(&model(), 2).unwrap();
    let ids = llm
        .encode_prompt("It is a way I have of driving off the spleen and regulating the circulation.", false)
        .unwrap();
    assert!(ids.len() > 10);
    let vocab = llm.config.vocab;
    let full = llm.logits(&ids).unwrap();
    let full = full.as_slice::<f32>().unwrap();
    let mut state = State::default();
    let mut cache = llm.new_cache().unwrap();
    let prefill = 6;
    let mut worst = 0f64;
    let mut check = |pos: usize, got: &[f32]| {
        let want: Vec<f64> = full[pos * vocab..(pos + 1) * vocab].iter().map(|&v| v as f64).collect();
        let rel = max_rel(got, &want);
        worst = worst.max(rel);
        assert!(rel <= 1e-4, "position {pos}: cached decode differs by {rel} (relative to the largest logit)");
    };
    let l = llm.forward(&mut state, &mut cache, &ids[..prefill], false).unwrap();
    check(prefill - 1, l.as_slice::<f32>().unwrap());
    for (pos, &t) in ids.iter().enumerate().skip(prefill) {
        let l = llm.forward(&mut state, &mut cache, &[t], false).unwrap();
        check(pos, l.as_slice::<f32>().unwrap());
    }
    assert_eq!(cache.len, ids.len());
    println!(
        "KV-cache decode vs full forward over {} positions: worst relative difference {worst:.2e}",
        ids.len() - prefill + 1
    );
}

#[test]
fn greedy_generation_is_deterministic() {
    let llm = Llm::load(&model(), 2).unwrap();
    let ids = llm.encode_prompt("What is the capital of France?", true).unwrap();
    let run = || {
        let mut text = String::new();
        let g = llm
            .generate(&ids, &SampleOptions::default(), 24, |s| {
                text.push_str(s);
                Ok(())
            })
            .unwrap();
        (g.tokens, text)
    };
    let (a, text) = run();
    let (b, _) = run();
    println!("greedy: {text:?}");
    assert_eq!(a, b);
    assert!(!a.is_empty());
    assert!(text.contains("Paris"), "{text}");
    // A seed reproduces a sampled generation.
    let opts = SampleOptions { temperature: 0.8, top_k: 40, top_p: 0.95, seed: 11 };
    let sample = || llm.generate(&ids, &opts, 8, |_| Ok(())).unwrap().tokens;
    assert_eq!(sample(), sample());
}

#[test]
fn bad_inputs_give_clear_errors() {
    let dir = temp_dir("smollm2-bad");
    // Truncated: the header is intact, the tensor data is cut.
    let bytes = std::fs::read(model()).unwrap();
    let cut = dir.join("truncated.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = format!("{:#}", Llm::load(&cut, 1).err().unwrap());
    assert!(err.contains("truncated.gguf") && err.contains("truncated") && err.contains("tensor '"), "{err}");
    assert!(err.contains("offset"), "{err}");
    // Unknown tensor type.
    let odd = dir.join("odd.gguf");
    let file = gguf_bytes(
        &[("general.architecture", GgufValue::Str("llama".into()))],
        &[("token_embd.weight", vec![32, 2], 77, vec![0; 64])],
    );
    std::fs::write(&odd, file).unwrap();
    let err = format!("{:#}", Llm::load(&odd, 1).err().unwrap());
    assert!(err.contains("odd.gguf") && err.contains("token_embd.weight") && err.contains("tensor type 77"), "{err}");
    // Not a GGUF file at all.
    let junk = dir.join("junk.gguf");
    std::fs::write(&junk, b"this is not a model").unwrap();
    let err = format!("{:#}", Llm::load(&junk, 1).err().unwrap());
    assert!(err.contains("not a GGUF file"), "{err}");
    // A prompt longer than the context.
    let llm = Llm::load(&model(), 1).unwrap();
    let ids = vec![100u32; llm.config.context_length + 5];
    let err = format!("{:#}", llm.generate(&ids, &SampleOptions::default(), 4, |_| Ok(())).err().unwrap());
    assert!(err.contains("context") && err.contains(&llm.config.context_length.to_string()), "{err}");
    let err =
        format!("{:#}", llm.forward(&mut State::default(), &mut llm.new_cache().unwrap(), &ids, false).err().unwrap());
    assert!(err.contains("exceed the model's context"), "{err}");
}

#[test]
fn tokenizer_round_trip_and_sliding_window_perplexity() {
    let llm = Llm::load(&model(), 2).unwrap();
    let text = slimnn_cli::llm::read_text(&asset("moby-dick/chapter_1.json")).unwrap();
    let ids = llm.tokenizer.encode(&text).unwrap();
    assert!(ids.len() >= 2000, "chapter 1 is {} tokens", ids.len());
    assert_eq!(llm.tokenizer.decode(&ids, false).unwrap(), text);
    // Windows of 64 every 32 tokens over the first 256 tokens: every token but the first is
    // scored exactly once.
    let p = llm.perplexity(&ids[..256], 64, 32).unwrap();
    assert_eq!((p.scored, p.windows), (255, 7));
    assert!(p.ppl.is_finite() && p.ppl > 2.0 && p.ppl < 500.0, "{p:?}");
    let p2 = llm.perplexity(&ids[..256], 64, 64).unwrap();
    // Without overlap each window's first token has no context in the window and is not scored
    // (as in Hugging Face's definition).
    assert_eq!((p2.scored, p2.windows), (252, 4));
    println!("perplexity on 256 tokens: context 64 stride 32 -> {:.2}, stride 64 -> {:.2}", p.ppl, p2.ppl);
    assert!(llm.perplexity(&ids[..10], 64, 128).is_err());
}
