//! `slimnn quantize` and `slimnn compare`: data sources for calibration (text through the
//! model's tokenizer, or `.npy` inputs), the progress bar, and the tables printed.

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use slimnn_compress::calib::BatchSource;
use slimnn_compress::mixed::{agreement, run_all, run_all_with, Agreement};
use slimnn_compress::pipeline::Progress;
use slimnn_compress::{quantize, QuantRecipe, Report};
use slimnn_data::text::TextTokenizer;
use slimnn_formats::{npy, onnx};
use slimnn_ir::Graph;
use slimnn_runtime::RuntimeConfig;
use slimnn_tensor::{DType, Dim, Tensor};
use std::path::{Path, PathBuf};

/// Sentences of a text file as batches of tokenized model inputs (tokenized one batch at a
/// time, so only the text is held in memory).
pub struct TextBatches {
    lines: Vec<String>,
    tokenizer: TextTokenizer,
    batch_size: usize,
    input_names: Vec<String>,
}

impl BatchSource for TextBatches {
    fn batches(&self) -> usize {
        self.lines.len().div_ceil(self.batch_size)
    }

    fn batch(&self, i: usize) -> slimnn_compress::Result<Vec<(String, Tensor)>> {
        let chunk: Vec<&str> =
            self.lines.iter().skip(i * self.batch_size).take(self.batch_size).map(String::as_str).collect();
        let enc = self
            .tokenizer
            .encode(&chunk)
            .map_err(|e| slimnn_compress::CompressError::Calibration(format!("tokenizing batch {i}: {e}")))?;
        Ok(enc.into_named().into_iter().filter(|(n, _)| self.input_names.contains(n)).collect())
    }
}

/// `.npy` inputs with samples along the first axis, cut into batches.
pub struct NpyBatches {
    inputs: Vec<(String, Tensor)>,
    samples: usize,
    batch_size: usize,
}

impl BatchSource for NpyBatches {
    fn batches(&self) -> usize {
        self.samples.div_ceil(self.batch_size)
    }

    fn batch(&self, i: usize) -> slimnn_compress::Result<Vec<(String, Tensor)>> {
        let (start, end) = (i * self.batch_size, ((i + 1) * self.batch_size).min(self.samples));
        self.inputs
            .iter()
            .map(|(name, t)| {
                let row = t.len() / self.samples.max(1);
                let bytes = t.to_le_bytes();
                let es = t.dtype().size_of();
                let mut shape = t.shape().to_vec();
                shape[0] = end - start;
                Ok((name.clone(), Tensor::from_le_bytes(t.dtype(), shape, &bytes[start * row * es..end * row * es])?))
            })
            .collect()
    }
}

/// Where a model's `tokenizer.json` is: given, in the model folder, or next to the `.onnx` file.
pub fn find_tokenizer(model: &Path, given: Option<&Path>) -> Option<PathBuf> {
    if let Some(t) = given {
        return Some(t.to_path_buf());
    }
    let dir = if model.is_dir() { model.to_path_buf() } else { model.parent()?.to_path_buf() };
    let p = dir.join("tokenizer.json");
    p.is_file().then_some(p)
}

/// Options of the data a command reads.
#[derive(Debug, Clone)]
pub struct DataOptions {
    pub batch_size: usize,
    /// At most this many samples (sentences or rows).
    pub samples: usize,
    /// Token limit per sentence.
    pub max_length: usize,
    pub tokenizer: Option<PathBuf>,
}

/// A data source from FILE: a `.npy` file (one-input models), a folder of `<input>.npy`
/// files, or a text file of sentences (one per line) tokenized with the model's tokenizer.
pub fn data_source(model: &Path, graph: &Graph, file: &Path, opts: &DataOptions) -> Result<Box<dyn BatchSource>> {
    if opts.batch_size == 0 || opts.samples == 0 {
        bail!("--batch-size and --samples must be positive");
    }
    let input_names: Vec<String> = (0..graph.inputs().len()).map(|i| graph.input_name(i).to_string()).collect();
    if !file.exists() {
        bail!("{}: no such file or folder", file.display());
    }
    let npy_inputs: Option<Vec<(String, Tensor)>> = if file.is_dir() {
        let mut v = Vec::new();
        for name in &input_names {
            let p = file.join(format!("{}.npy", crate::model::safe_file_name(name)));
            let t = npy::read(&p).with_context(|| format!("calibration folder {}: input '{name}'", file.display()))?;
            v.push((name.clone(), t));
        }
        Some(v)
    } else if file.extension().is_some_and(|e| e == "npy") {
        if input_names.len() != 1 {
            bail!(
                "{}: a single .npy file feeds one-input models; this model has {} inputs ({}), give a folder of <input>.npy files",
                file.display(),
                input_names.len(),
                input_names.join(", ")
            );
        }
        Some(vec![(input_names[0].clone(), npy::read(file).with_context(|| format!("reading {}", file.display()))?)])
    } else {
        None
    };
    if let Some(inputs) = npy_inputs {
        let samples = inputs.first().map_or(0, |(_, t)| t.shape().first().copied().unwrap_or(0));
        for (name, t) in &inputs {
            if t.rank() == 0 || t.shape()[0] != samples {
                bail!(
                    "{}: input '{name}' has shape {:?}; every input needs the same first (sample) axis",
                    file.display(),
                    t.shape()
                );
            }
        }
        if samples == 0 {
            bail!("{}: the calibration data is empty (0 samples)", file.display());
        }
        let samples_kept = samples.min(opts.samples);
        let inputs = inputs
            .into_iter()
            .map(|(n, t)| -> Result<(String, Tensor)> {
                if samples_kept == samples {
                    return Ok((n, t));
                }
                let row = t.len() / samples;
                let es = t.dtype().size_of();
                let mut shape = t.shape().to_vec();
                shape[0] = samples_kept;
                let bytes = t.to_le_bytes();
                Ok((n, Tensor::from_le_bytes(t.dtype(), shape, &bytes[..samples_kept * row * es])?))
            })
            .collect::<Result<Vec<_>>>()?;
        return Ok(Box::new(NpyBatches { inputs, samples: samples_kept, batch_size: opts.batch_size }));
    }
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {} as text", file.display()))?;
    let lines: Vec<String> =
        text.lines().map(str::trim).filter(|l| !l.is_empty()).take(opts.samples).map(str::to_string).collect();
    if lines.is_empty() {
        bail!("{}: the calibration file has no sentences (it is empty or blank)", file.display());
    }
    let tok_path = find_tokenizer(model, opts.tokenizer.as_deref()).with_context(|| {
        format!("{}: text data needs the model's tokenizer.json (next to the model, or --tokenizer)", file.display())
    })?;
    let tokenizer = TextTokenizer::from_file(&tok_path, opts.max_length)?;
    Ok(Box::new(TextBatches { lines, tokenizer, batch_size: opts.batch_size, input_names }))
}

/// Deterministic inputs for models without data: float inputs filled with a fixed
/// pseudo-random sequence in [-1, 1), symbolic dims 1.
pub fn synthetic_inputs(graph: &Graph) -> Result<Vec<Vec<(String, Tensor)>>> {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut batch = Vec::new();
    for i in 0..graph.inputs().len() {
        let f = graph.input_fact(i);
        if f.dtype != DType::F32 {
            bail!("input '{}' is {}: give --data FILE for this model", graph.input_name(i), f.dtype);
        }
        let shape: Vec<usize> = f.shape.iter().map(|d| if let Dim::Known(n) = d { *n } else { 1 }).collect();
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect();
        batch.push((graph.input_name(i).to_string(), Tensor::from_vec(shape, v)?));
    }
    Ok(vec![batch])
}

fn progress_bar() -> impl FnMut(Progress) {
    let mut bar: Option<(String, ProgressBar)> = None;
    move |p: Progress| {
        if bar.as_ref().is_none_or(|(s, _)| s != p.stage) {
            if let Some((_, b)) = bar.take() {
                b.finish();
            }
            let b = ProgressBar::new(p.total as u64);
            let style = ProgressStyle::with_template("{msg:>24} [{bar:40}] {pos}/{len} batches {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
            b.set_style(style);
            b.set_message(p.stage.to_string());
            bar = Some((p.stage.to_string(), b));
        }
        if let Some((_, b)) = &bar {
            b.set_position(p.done as u64);
            if p.done >= p.total {
                b.finish();
            }
        }
    }
}

/// `slimnn quantize`: loads, quantizes, writes atomically, prints the per-layer table.
pub fn run_quantize(
    model: &Path,
    out: &Path,
    recipe: &QuantRecipe,
    calibration: Option<&Path>,
    data: &DataOptions,
) -> Result<Report> {
    recipe.validate()?;
    if out.extension().is_none_or(|e| e != "onnx") {
        bail!("-o {}: the output must be an .onnx file", out.display());
    }
    if recipe.needs_data() && calibration.is_none() {
        bail!("this recipe (--mode static, --smoothquant, --gptq, --bias-correction or --error-budget) needs --calibration FILE");
    }
    let graph = crate::model::load(model)?;
    let source: Box<dyn BatchSource> = match calibration {
        Some(f) => data_source(model, &graph, f, data)?,
        None => Box::new(Vec::<Vec<(String, Tensor)>>::new()),
    };
    let mut bar = progress_bar();
    let (q, report) = quantize(&graph, recipe, source.as_ref(), &mut bar).context("quantizing")?;
    onnx::save(&q, out).with_context(|| format!("writing {}", out.display()))?;
    print!("{}", report.table());
    let before = crate::model::size_on_disk(model);
    let after = crate::model::size_on_disk(out);
    println!(
        "wrote {} ({:.2} MB, {:.1}% of {:.2} MB)",
        out.display(),
        after as f64 / 1e6,
        100.0 * after as f64 / before.max(1) as f64,
        before as f64 / 1e6
    );
    Ok(report)
}

/// `slimnn compare`: runs both models on the same data and measures their agreement.
pub fn run_compare(
    reference: &Path,
    candidate: &Path,
    data: Option<&Path>,
    opts: &DataOptions,
    candidate_config: RuntimeConfig,
) -> Result<Agreement> {
    let threads = candidate_config.threads;
    let g_ref = crate::model::load(reference)?;
    let g_cand = crate::model::load(candidate)?;
    let names: Vec<String> = g_ref.outputs().iter().map(|(n, _)| n.clone()).collect();
    let cand_names: Vec<String> = g_cand.outputs().iter().map(|(n, _)| n.clone()).collect();
    if names != cand_names {
        bail!("the models' outputs differ: {} vs {}", names.join(", "), cand_names.join(", "));
    }
    let source: Box<dyn BatchSource> = match data {
        Some(f) => data_source(reference, &g_ref, f, opts)?,
        None => Box::new(synthetic_inputs(&g_ref)?),
    };
    let n = source.batches();
    let r = run_all(&g_ref, source.as_ref(), n, threads).with_context(|| format!("running {}", reference.display()))?;
    let c = run_all_with(&g_cand, source.as_ref(), n, candidate_config)
        .with_context(|| format!("running {}", candidate.display()))?;
    Ok(agreement(&names, &r, &c)?)
}

/// The table `slimnn compare` prints.
pub fn agreement_table(a: &Agreement) -> String {
    let mut s = format!(
        "{:<24} {:>7} {:>12} {:>12} {:>11} {:>11} {:>8}\n",
        "output", "rows", "cosine mean", "cosine min", "max abs", "rel error", "top-1"
    );
    for o in &a.outputs {
        s.push_str(&format!(
            "{:<24} {:>7} {:>12.6} {:>12.6} {:>11.3e} {:>11.3e} {:>7.1}%\n",
            o.name,
            o.rows,
            o.cosine_mean,
            o.cosine_min,
            o.max_abs,
            o.relative_error,
            100.0 * o.top1_agreement
        ));
    }
    s
}
