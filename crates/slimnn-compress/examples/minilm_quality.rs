//! Embedding quality of every quantization scheme on all-MiniLM-L6-v2 (assets/minilm), side by
//! side in one run: cosine of each of 200 Moby-Dick sentences' embedding to the fp32 model's.
//!
//! `cargo run --release -p slimnn-compress --example minilm_quality [-- SCHEME...]`
//! (calibration: 128 other sentences of the book; schemes default to all). `bf16-compute` runs
//! the bf16-weight model with bf16 products (`Precision::Bf16`; f32 where the CPU lacks
//! AVX-512 BF16); any scheme named with a `+bf16` suffix (e.g. `dynamic-embeddings+bf16`) runs
//! that way too (for int8 models: attention and any float GEMMs in bf16), and a `+int8attn`
//! suffix runs attention's products in int8 (`RuntimeConfig::int8_attention`, where AMX is
//! granted). `fp32` is the model unquantized (e.g. `fp32+int8attn`).

use slimnn_compress::calib::BatchSource;
use slimnn_compress::mixed::{agreement, run_all, run_all_with};
use slimnn_compress::{
    quantize, ActivationGranularity, ActivationType, CalibrationMethod, Fallback, Mode, QuantRecipe,
};
use slimnn_data::corpus::moby_dick_sentences;
use slimnn_data::text::TextTokenizer;
use slimnn_runtime::{Precision, RuntimeConfig};
use slimnn_tensor::Tensor;
use std::path::Path;
use std::time::Instant;

struct Sentences {
    batches: Vec<Vec<(String, Tensor)>>,
}

impl BatchSource for Sentences {
    fn batches(&self) -> usize {
        self.batches.len()
    }
    fn batch(&self, i: usize) -> slimnn_compress::Result<Vec<(String, Tensor)>> {
        Ok(self.batches[i].clone())
    }
}

fn encode(tok: &TextTokenizer, texts: &[&str], batch: usize) -> Sentences {
    Sentences { batches: texts.chunks(batch).map(|c| tok.encode(c).unwrap().into_named()).collect() }
}

fn main() {
    let assets = std::env::var("SLIMNN_ASSETS").unwrap_or_else(|_| "assets".into());
    let dir = Path::new(&assets).join("minilm");
    let g = slimnn_formats::hf::load_bert(&dir).unwrap();
    let tok = TextTokenizer::from_file(&dir.join("tokenizer.json"), 128).unwrap();
    let sentences = moby_dick_sentences(&Path::new(&assets).join("moby-dick"), 4, 120).unwrap();
    let eval: Vec<&str> = (0..200).map(|i| sentences[i * sentences.len() / 200].as_str()).collect();
    let calib: Vec<&str> = (0..128).map(|i| sentences[i * sentences.len() / 128 + 7].as_str()).collect();
    let eval_data = encode(&tok, &eval, 25);
    let calib_data = encode(&tok, &calib, 16);
    let names: Vec<String> = g.outputs().iter().map(|(n, _)| n.clone()).collect();
    let threads = slimnn_runtime::physical_cores();
    let reference = run_all(&g, &eval_data, usize::MAX, threads).unwrap();

    let base = QuantRecipe::default();
    let stat = |m| QuantRecipe { mode: Mode::Static, calibration_method: m, ..base.clone() };
    let all: Vec<(&str, QuantRecipe)> = vec![
        ("dynamic", QuantRecipe { mode: Mode::Dynamic, ..base.clone() }),
        (
            "dynamic-per-tensor",
            QuantRecipe { activation_granularity: Some(ActivationGranularity::PerTensor), ..base.clone() },
        ),
        (
            "dynamic-per-tensor-embeddings",
            QuantRecipe {
                activation_granularity: Some(ActivationGranularity::PerTensor),
                quantize_embeddings: true,
                ..base.clone()
            },
        ),
        ("dynamic-sq0.5", QuantRecipe { mode: Mode::Dynamic, smoothquant_alpha: Some(0.5), ..base.clone() }),
        ("static-minmax", stat(CalibrationMethod::Minmax)),
        ("static-percentile", stat(CalibrationMethod::Percentile)),
        ("static-entropy", stat(CalibrationMethod::Entropy)),
        ("static-mse", stat(CalibrationMethod::Mse)),
        (
            "static-i8-percentile",
            QuantRecipe { activation_type: ActivationType::I8, ..stat(CalibrationMethod::Percentile) },
        ),
        (
            "static-percentile-sq0.5",
            QuantRecipe { smoothquant_alpha: Some(0.5), ..stat(CalibrationMethod::Percentile) },
        ),
        ("static-mse-sq0.5", QuantRecipe { smoothquant_alpha: Some(0.5), ..stat(CalibrationMethod::Mse) }),
        ("static-percentile-99.999", QuantRecipe { percentile: 99.999, ..stat(CalibrationMethod::Percentile) }),
        ("static-minmax-sq0.3", QuantRecipe { smoothquant_alpha: Some(0.3), ..stat(CalibrationMethod::Minmax) }),
        ("static-minmax-budget0.05", QuantRecipe { error_budget: Some(0.05), ..stat(CalibrationMethod::Minmax) }),
        (
            "static-minmax-budget0.065-dynamic",
            QuantRecipe { error_budget: Some(0.065), fallback: Fallback::Dynamic, ..stat(CalibrationMethod::Minmax) },
        ),
        (
            "static-minmax-budget0.07-dynamic",
            QuantRecipe { error_budget: Some(0.07), fallback: Fallback::Dynamic, ..stat(CalibrationMethod::Minmax) },
        ),
        ("static-minmax-outliers4", QuantRecipe { outlier_channels: 4, ..stat(CalibrationMethod::Minmax) }),
        ("static-minmax-outliers8", QuantRecipe { outlier_channels: 8, ..stat(CalibrationMethod::Minmax) }),
        ("static-minmax-outliers16", QuantRecipe { outlier_channels: 16, ..stat(CalibrationMethod::Minmax) }),
        (
            "static-percentile-99.999-outliers8",
            QuantRecipe { outlier_channels: 8, percentile: 99.999, ..stat(CalibrationMethod::Percentile) },
        ),
        ("dynamic-budget0.05", QuantRecipe { error_budget: Some(0.05), ..base.clone() }),
        (
            "static-attention-minmax",
            QuantRecipe { quantize_activation_matmuls: true, ..stat(CalibrationMethod::Minmax) },
        ),
        ("weight-int8", QuantRecipe { mode: Mode::WeightOnly, ..base.clone() }),
        ("dynamic-embeddings", QuantRecipe { mode: Mode::Dynamic, quantize_embeddings: true, ..base.clone() }),
        ("int4-g32-rtn", QuantRecipe { mode: Mode::WeightOnly, bits: 4, group_size: 32, ..base.clone() }),
        ("int4-g32-gptq", QuantRecipe { mode: Mode::WeightOnly, bits: 4, group_size: 32, gptq: true, ..base.clone() }),
        ("int4-g128-rtn", QuantRecipe { mode: Mode::WeightOnly, bits: 4, group_size: 128, ..base.clone() }),
        (
            "int4-g128-gptq",
            QuantRecipe { mode: Mode::WeightOnly, bits: 4, group_size: 128, gptq: true, ..base.clone() },
        ),
        ("bf16", QuantRecipe { mode: Mode::Bf16, ..base.clone() }),
        ("bf16-compute", QuantRecipe { mode: Mode::Bf16, ..base.clone() }),
        ("fp16", QuantRecipe { mode: Mode::Fp16, ..base.clone() }),
    ];
    let wanted: Vec<String> = std::env::args().skip(1).collect();
    println!(
        "{:<26} {:>10} {:>10} {:>10} {:>9} {:>9}",
        "scheme", "cos mean", "cos min", "rel err", "quant s", "eval s"
    );
    let base_name = |w: &str| w.split('+').next().unwrap_or(w).to_string();
    let suffixed: Vec<(String, Option<QuantRecipe>)> = wanted
        .iter()
        .filter(|w| w.contains('+') || *w == "fp32")
        .filter_map(|w| match base_name(w).as_str() {
            "fp32" => Some((w.clone(), None)),
            b => all.iter().find(|(n, _)| *n == b).map(|(_, r)| (w.clone(), Some(r.clone()))),
        })
        .collect();
    let all = all.into_iter().map(|(n, r)| (n.to_string(), Some(r))).chain(suffixed);
    for (name, recipe) in all {
        if !wanted.is_empty() && !wanted.contains(&name) {
            continue;
        }
        let t0 = Instant::now();
        let q = match &recipe {
            Some(recipe) => {
                let (q, report) = quantize(&g, recipe, &calib_data, &mut |_| {}).unwrap();
                for note in &report.notes {
                    eprintln!("{name}: {note}");
                }
                q
            }
            None => g.clone(),
        };
        let tq = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let bf16 = name == "bf16-compute" || name.contains("+bf16");
        let precision = if bf16 { Precision::Bf16 } else { Precision::F32 };
        let int8_attention = name.contains("+int8attn");
        let config = RuntimeConfig { precision, int8_attention, ..RuntimeConfig::with_threads(threads) };
        let out = run_all_with(&q, &eval_data, usize::MAX, config).unwrap();
        let a = agreement(&names, &reference, &out).unwrap();
        let e = a.outputs.iter().find(|o| o.name == "sentence_embedding").unwrap();
        println!(
            "{:<26} {:>10.5} {:>10.5} {:>10.4} {:>9.1} {:>9.1}",
            name,
            e.cosine_mean,
            e.cosine_min,
            e.relative_error,
            tq,
            t1.elapsed().as_secs_f64()
        );
    }
}
