//! `slimnn train` and `slimnn distill`: the tasks a recipe's `[task]` table names (the data set,
//! the model and how it is initialised), run by `slimnn_train::Trainer`, then exported.

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use slimnn_data::datasets::{load_fashion_mnist, spam_assassin_split, TextExample};
use slimnn_data::text::TextTokenizer;
use slimnn_ir::{Graph, IrResult, OutletId};
use slimnn_runtime::{Runnable, RuntimeConfig};
use slimnn_tensor::{DType, Tensor};
use slimnn_train::models::{image_classifier, text_classifier, ImageArch, Model};
use slimnn_train::recipe::Recipe;
use slimnn_train::trainer::{Batch, Dataset, TensorDataset, Trainer};
use slimnn_train::{lift_parameters, qat};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What a recipe's `[task]` table says: the data, the model, its initial weights, QAT.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Task {
    /// Fashion-MNIST (official 60k / 10k split), a LeNet trained from scratch.
    FashionMnist {
        arch: ImageArch,
        #[serde(default = "default_fashion_dir")]
        data: PathBuf,
        /// Start from this trained model's weights instead of a fresh initialisation.
        #[serde(default)]
        init: Option<PathBuf>,
        #[serde(default)]
        qat: Option<QatTask>,
    },
    /// SpamAssassin (fixed stratified 80/20 split) with a BERT-family encoder and a linear head.
    SpamAssassin {
        /// Hugging Face folder (architecture, vocabulary and pre-trained weights).
        model: PathBuf,
        #[serde(default = "default_spam_dir")]
        data: PathBuf,
        #[serde(default = "default_max_seq")]
        max_seq: usize,
        /// Encoder layers to keep (checkpoint indices), e.g. `[0, 2, 4]` for a student.
        #[serde(default)]
        layers: Option<Vec<usize>>,
        /// Take weights (by name) from this trained model, e.g. the fine-tuned teacher.
        #[serde(default)]
        init: Option<PathBuf>,
        /// Use only the first N training emails (after a seeded shuffle), for quicker runs.
        #[serde(default)]
        train_limit: Option<usize>,
        /// Distillation only: this many further training emails (after the `train_limit` ones)
        /// join the training set with their labels hidden and the teacher's predictions in
        /// their place (a transfer set, Hinton et al. 2015).
        #[serde(default)]
        transfer: Option<usize>,
        #[serde(default)]
        qat: Option<QatTask>,
        /// Distillation only: weight of the hidden-state MSE terms (student layer i matched to
        /// teacher layer `layer_map[i]`).
        #[serde(default)]
        hidden_weight: f32,
        /// Distillation only: weight of the attention-map KL terms (same layer map).
        #[serde(default)]
        attention_weight: f32,
        #[serde(default)]
        layer_map: Vec<usize>,
    },
}

/// Quantization-aware training of an already trained model (`init`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QatTask {
    /// Learn the quantization scales (LSQ) along with the weights.
    #[serde(default = "yes")]
    pub learn_scales: bool,
    /// Training batches observed to set the initial activation ranges.
    #[serde(default = "default_calibration_batches")]
    pub calibration_batches: usize,
}

fn yes() -> bool {
    true
}
fn default_calibration_batches() -> usize {
    8
}
fn default_fashion_dir() -> PathBuf {
    "assets/fashion-mnist".into()
}
fn default_spam_dir() -> PathBuf {
    "assets/spam-assassin".into()
}
fn default_max_seq() -> usize {
    128
}

/// The knobs of `slimnn train` / `slimnn distill` besides the recipe.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub output: PathBuf,
    pub resume: bool,
    pub threads: Option<usize>,
    pub progress: bool,
    /// Stop (with a checkpoint) after this many updates, as a killed job would.
    pub stop_after: Option<u64>,
    /// Overrides the recipe's seed (batch order, head initialisation, subset choice).
    pub seed: Option<u64>,
}

/// What a run measured, also written to `summary.json`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub task: String,
    pub parameters: usize,
    pub train_examples: usize,
    pub test_examples: usize,
    pub epochs_done: usize,
    pub steps: u64,
    pub test_accuracy: f64,
    pub train_examples_per_second: f64,
    pub threads: usize,
    /// Accuracy of the starting model (QAT, distillation), and of the int8 model after QAT.
    pub initial_test_accuracy: Option<f64>,
    pub int8_test_accuracy: Option<f64>,
    pub teacher_test_accuracy: Option<f64>,
    pub model_path: String,
    pub int8_model_path: Option<String>,
}

fn parse_task(recipe: &Recipe, origin: &Path) -> Result<Task> {
    let table = toml::Value::Table(recipe.task.clone());
    Task::deserialize(table).map_err(|e| anyhow!("recipe {}: [task]: {e}", origin.display()))
}

/// The data sets of a task: train and test, plus the model the task trains.
struct Prepared {
    model: Model,
    train: TensorDataset,
    test: TensorDataset,
    train_len: usize,
    test_len: usize,
    name: String,
    /// Text tasks: what the training set was tokenized from, and the transfer emails.
    text: Option<TextSource>,
}

struct TextSource {
    tok: TextTokenizer,
    seq: usize,
    labeled: Vec<TextExample>,
    transfer: Vec<TextExample>,
}

fn prepare(task: &Task, seed: u64) -> Result<Prepared> {
    match task {
        Task::FashionMnist { arch, data, init, .. } => {
            let fm = load_fashion_mnist(data)?;
            let flat = false;
            let train = TensorDataset::from_images(&fm.train, "image", flat)?;
            let test = TensorDataset::from_images(&fm.test, "image", flat)?;
            let mut model = image_classifier(*arch, seed)?;
            if let Some(path) = init {
                load_weights(&mut model, path)?;
            }
            Ok(Prepared {
                model,
                train_len: fm.train.len(),
                test_len: fm.test.len(),
                train,
                test,
                name: format!("fashion-mnist {arch:?}"),
                text: None,
            })
        }
        Task::SpamAssassin { model: dir, data, max_seq, layers, init, train_limit, transfer, .. } => {
            let (mut train, test) = spam_assassin_split(data)?;
            let mut transfer_set = Vec::new();
            if let Some(n) = *train_limit {
                let mut rng = slimnn_data::datasets::Rng::new(seed ^ 0x5eed);
                rng.shuffle(&mut train);
                let m = transfer.unwrap_or(0);
                if n + m > train.len() {
                    bail!("[task] train_limit {n} + transfer {m} exceed the {} training emails", train.len());
                }
                transfer_set = train[n..n + m].to_vec();
                train.truncate(n);
            } else if transfer.is_some() {
                bail!("[task] transfer needs train_limit (the labeled emails come first)");
            }
            let tok = TextTokenizer::from_file(&dir.join("tokenizer.json"), *max_seq)?;
            let mut model = text_classifier(dir, 2, layers.as_deref(), seed)?;
            if let Some(path) = init {
                load_weights(&mut model, path)?;
            }
            let name = match layers {
                Some(l) => format!("spam-assassin, encoder layers {l:?} of {}", dir.display()),
                None => format!("spam-assassin, {}", dir.display()),
            };
            Ok(Prepared {
                train_len: train.len(),
                test_len: test.len(),
                train: text_dataset(&tok, &train, *max_seq)?,
                test: text_dataset(&tok, &test, *max_seq)?,
                model,
                name,
                text: Some(TextSource { tok, seq: *max_seq, labeled: train, transfer: transfer_set }),
            })
        }
    }
}

/// Tokenized emails, padded or truncated to `seq` tokens, with their labels.
fn text_dataset(tok: &TextTokenizer, examples: &[TextExample], seq: usize) -> Result<TensorDataset> {
    let mut cols: [Vec<i64>; 3] = Default::default();
    for chunk in examples.chunks(256) {
        // Long emails: the first few thousand characters hold more than `seq` tokens.
        let texts: Vec<&str> = chunk.iter().map(|e| prefix(&e.text, seq * 24)).collect();
        let enc = tok.encode_fixed(&texts, seq)?;
        for (c, t) in cols.iter_mut().zip([enc.input_ids, enc.attention_mask, enc.token_type_ids]) {
            c.extend_from_slice(t.as_slice::<i64>()?);
        }
    }
    let n = examples.len();
    let [ids, mask, types] = cols;
    let inputs = vec![
        ("input_ids".to_string(), Tensor::from_vec(vec![n, seq], ids)?),
        ("attention_mask".to_string(), Tensor::from_vec(vec![n, seq], mask)?),
        ("token_type_ids".to_string(), Tensor::from_vec(vec![n, seq], types)?),
    ];
    Ok(TensorDataset::new(inputs, examples.iter().map(|e| e.label as usize).collect())?)
}

fn prefix(s: &str, max_bytes: usize) -> &str {
    if s.len() <= max_bytes {
        return s;
    }
    let mut end = max_bytes;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Overwrites the model's parameters with the same-named, same-shaped f32 initializers of the
/// model at `path`; every parameter must be found.
fn load_weights(model: &mut Model, path: &Path) -> Result<()> {
    let g = slimnn_formats::load_model(path).with_context(|| format!("loading {}", path.display()))?;
    let (_, source) = lift_parameters(&g, |_, t| t.len() > 1)?;
    let mut missing = Vec::new();
    for p in model.params.iter_mut() {
        match source.get(&p.name) {
            Some(s) if s.value.shape() == p.value.shape() => p.value = s.value.clone(),
            Some(s) => bail!(
                "{}: '{}' is {:?} there but {:?} in this model",
                path.display(),
                p.name,
                s.value.shape(),
                p.value.shape()
            ),
            None => missing.push(p.name.clone()),
        }
    }
    if !missing.is_empty() {
        bail!(
            "{}: has no weights for {} of this model's parameters (e.g. '{}')",
            path.display(),
            missing.len(),
            missing[0]
        );
    }
    Ok(())
}

/// Accuracy of a model with its weights baked in, run through the runtime in batches.
pub fn accuracy(graph: &Graph, data: &dyn Dataset, batch: usize, threads: usize) -> Result<f64> {
    let predicted = predict(graph, data, batch, threads)?;
    let labels = data.batch(&(0..data.len()).collect::<Vec<_>>())?.labels;
    let correct = predicted.iter().zip(&labels).filter(|(p, l)| p == l).count();
    Ok(correct as f64 / predicted.len().max(1) as f64)
}

/// The arg-max class of every example of `data`, in order.
fn predict(graph: &Graph, data: &dyn Dataset, batch: usize, threads: usize) -> Result<Vec<usize>> {
    let run = Runnable::new(graph.clone(), RuntimeConfig::with_threads(threads))?;
    let mut state = run.new_state();
    let names: Vec<&str> = (0..graph.inputs().len()).map(|i| graph.input_name(i)).collect();
    let mut predicted = Vec::with_capacity(data.len());
    let all: Vec<usize> = (0..data.len()).collect();
    for idx in all.chunks(batch) {
        let b = data.batch(idx)?;
        let inputs: Vec<(String, Tensor)> = b.inputs.into_iter().filter(|(k, _)| names.contains(&k.as_str())).collect();
        let logits = run.run(&mut state, inputs)?.remove(0).cast(DType::F32)?;
        let classes = *logits.shape().last().unwrap_or(&1);
        for row in logits.as_slice::<f32>()?.chunks(classes) {
            predicted.push(row.iter().enumerate().fold(0, |b, (i, v)| if *v > row[b] { i } else { b }));
        }
    }
    Ok(predicted)
}

/// `slimnn train RECIPE`: trains the task's model, writes the trained model (`model.onnx`),
/// `log.json`, `loss.svg`, `checkpoint.safetensors` and `summary.json` into the output folder.
pub fn train(recipe_path: &Path, opts: &RunOptions) -> Result<Summary> {
    let mut recipe = Recipe::load(recipe_path)?;
    if opts.threads.is_some() {
        recipe.threads = opts.threads;
    }
    if let Some(seed) = opts.seed {
        recipe.seed = seed;
    }
    let threads = recipe.threads.unwrap_or_else(slimnn_runtime::physical_cores);
    let task = parse_task(&recipe, recipe_path)?;
    let prepared = prepare(&task, recipe.seed)?;
    let mut initial_accuracy: Option<f64> = None;
    let qat_task = match &task {
        Task::FashionMnist { qat, .. } | Task::SpamAssassin { qat, .. } => qat.clone(),
    };
    if let Task::SpamAssassin { hidden_weight, attention_weight, transfer, .. } = &task {
        if *hidden_weight != 0.0 || *attention_weight != 0.0 || transfer.is_some() {
            bail!(
                "recipe {}: [task] hidden_weight / attention_weight / transfer apply to `slimnn distill` only",
                recipe_path.display()
            );
        }
    }
    let eval_batch = recipe.eval_batch_size.unwrap_or(recipe.batch_size);
    let mut model = prepared.model.clone();
    if let Some(q) = &qat_task {
        let baked = slimnn_train::bake_parameters(&model.graph, &model.params)?;
        initial_accuracy = Some(accuracy(&baked, &prepared.test, eval_batch, threads)?);
        let ranges = observe_ranges(&model, &prepared.train, q.calibration_batches, recipe.batch_size, threads)?;
        model = qat::insert_fake_quant(&model, &ranges, qat::QatConfig { learn_scales: q.learn_scales })?;
    }
    let (summary, trainer) =
        run_trainer(&prepared, &prepared.train, model.clone(), recipe, opts, threads, |m, p, r| {
            Ok(Trainer::new(m, p, r)?)
        })?;
    let mut summary = summary;
    summary.initial_test_accuracy = initial_accuracy;
    if qat_task.is_some() {
        let trained = Model { params: trainer.parameters().clone(), ..model };
        let int8 = qat::to_int8(&trained)?;
        let path = opts.output.join("model-int8.onnx");
        slimnn_formats::onnx::save(&int8, &path)?;
        summary.int8_test_accuracy = Some(accuracy(&int8, &prepared.test, eval_batch, threads)?);
        summary.int8_model_path = Some(path.display().to_string());
    }
    finish(&summary, &opts.output)?;
    Ok(summary)
}

type MakeTrainer<'a> = dyn Fn(Graph, slimnn_train::Parameters, Recipe) -> Result<Trainer> + 'a;

fn run_trainer(
    prepared: &Prepared,
    train: &dyn Dataset,
    model: Model,
    recipe: Recipe,
    opts: &RunOptions,
    threads: usize,
    make: impl Fn(Graph, slimnn_train::Parameters, Recipe) -> Result<Trainer>,
) -> Result<(Summary, Trainer)> {
    let make: &MakeTrainer = &make;
    std::fs::create_dir_all(&opts.output).with_context(|| format!("creating {}", opts.output.display()))?;
    let parameters = model.params.iter().map(|p| p.value.len()).sum();
    let mut trainer = make(model.graph.clone(), model.params.clone(), recipe)?
        .with_output_dir(&opts.output)?
        .with_progress_bar(opts.progress);
    if let Some(s) = opts.stop_after {
        trainer = trainer.stop_after(s);
    }
    let ckpt = opts.output.join("checkpoint.safetensors");
    if opts.resume {
        if !ckpt.is_file() {
            bail!("--resume: {} does not exist", ckpt.display());
        }
        trainer.resume(&ckpt)?;
        eprintln!("resumed from {} at step {}", ckpt.display(), trainer.progress().step);
    }
    let start = Instant::now();
    let steps_before = trainer.progress().step;
    let report = trainer.fit(train, &prepared.test)?;
    let secs = start.elapsed().as_secs_f64();
    let trained = trainer.trained_model()?;
    let model_path = opts.output.join("model.onnx");
    slimnn_formats::onnx::save(&trained, &model_path)?;
    let test_accuracy = match &report.final_test {
        Some(e) => e.accuracy,
        None => trainer.evaluate(&prepared.test)?.accuracy,
    };
    let steps_run = report.steps - steps_before;
    let examples = steps_run as f64 * trainer.recipe().batch_size as f64;
    let summary = Summary {
        task: prepared.name.clone(),
        parameters,
        train_examples: prepared.train_len,
        test_examples: prepared.test_len,
        epochs_done: trainer.progress().epoch,
        steps: report.steps,
        test_accuracy,
        train_examples_per_second: examples / secs,
        threads,
        initial_test_accuracy: None,
        int8_test_accuracy: None,
        teacher_test_accuracy: None,
        model_path: model_path.display().to_string(),
        int8_model_path: None,
    };
    Ok((summary, trainer))
}

fn finish(summary: &Summary, dir: &Path) -> Result<()> {
    let json = serde_json::to_string_pretty(summary)?;
    slimnn_formats::write_atomic(&dir.join("summary.json"), json.as_bytes())?;
    println!("{json}");
    Ok(())
}

/// Min and max of every activation QAT quantizes, over the first `batches` training batches.
fn observe_ranges(
    model: &Model,
    data: &dyn Dataset,
    batches: usize,
    batch: usize,
    threads: usize,
) -> Result<HashMap<OutletId, (f32, f32)>> {
    let targets: Vec<OutletId> = qat::quantizable(model).into_iter().map(|(_, o)| o).collect();
    let mut unique = targets.clone();
    unique.sort_by_key(|o| (o.node, o.slot));
    unique.dedup();
    let mut g = model.graph.clone();
    g.set_outputs(unique.iter().enumerate().map(|(i, &o)| (format!("observed_{i}"), o)).collect());
    let run = Runnable::new(g.clone(), RuntimeConfig::with_threads(threads))?;
    let mut state = run.new_state();
    let names: Vec<&str> = (0..g.inputs().len()).map(|i| g.input_name(i)).collect();
    let mut ranges: HashMap<OutletId, (f32, f32)> = HashMap::new();
    let all: Vec<usize> = (0..data.len()).collect();
    for idx in all.chunks(batch).take(batches.max(1)) {
        let b = data.batch(idx)?;
        let mut inputs: Vec<(String, Tensor)> =
            b.inputs.into_iter().filter(|(k, _)| names.contains(&k.as_str())).collect();
        inputs.extend(model.params.as_inputs());
        for (o, t) in unique.iter().zip(run.run(&mut state, inputs)?) {
            let v = t.cast(DType::F32)?;
            let (lo, hi) = v.as_slice::<f32>()?.iter().fold((f32::MAX, f32::MIN), |(l, h), &x| (l.min(x), h.max(x)));
            let e = ranges.entry(*o).or_insert((lo, hi));
            *e = (e.0.min(lo), e.1.max(hi));
        }
    }
    Ok(ranges)
}

/// `slimnn distill --teacher T --student S --recipe R`: trains the student (a Hugging Face
/// folder, shaped by the task's `layers`, initialised from `init`) on the hard labels and the
/// teacher's temperature-softened logits, plus optional hidden-state and attention-map matching.
pub fn distill(teacher_path: &Path, student_dir: &Path, recipe_path: &Path, opts: &RunOptions) -> Result<Summary> {
    let mut recipe = Recipe::load(recipe_path)?;
    if opts.threads.is_some() {
        recipe.threads = opts.threads;
    }
    if let Some(seed) = opts.seed {
        recipe.seed = seed;
    }
    let threads = recipe.threads.unwrap_or_else(slimnn_runtime::physical_cores);
    let mut task = parse_task(&recipe, recipe_path)?;
    let Task::SpamAssassin { model, hidden_weight, attention_weight, layer_map, layers, .. } = &mut task else {
        bail!("recipe {}: slimnn distill runs the spam-assassin task", recipe_path.display());
    };
    *model = student_dir.to_path_buf();
    let (hidden_weight, attention_weight, layer_map) = (*hidden_weight, *attention_weight, layer_map.clone());
    let student_layers = layers.as_ref().map_or(0, |l| l.len());
    let matching = hidden_weight != 0.0 || attention_weight != 0.0;
    if matching && layer_map.len() != student_layers {
        bail!(
            "recipe {}: [task] layer_map has {} entries for a {student_layers}-layer student",
            recipe_path.display(),
            layer_map.len()
        );
    }
    if !matches!(recipe.loss, slimnn_train::loss::LossConfig::Distill { .. }) {
        bail!("recipe {}: slimnn distill needs [loss] kind = \"distill\"", recipe_path.display());
    }
    let mut prepared = prepare(&task, recipe.seed)?;
    let teacher_graph =
        slimnn_formats::load_model(teacher_path).with_context(|| format!("loading {}", teacher_path.display()))?;
    let eval_batch = recipe.eval_batch_size.unwrap_or(recipe.batch_size);
    let teacher_accuracy = accuracy(&teacher_graph, &prepared.test, eval_batch, threads)?;
    if let Some(text) = prepared.text.as_mut().filter(|t| !t.transfer.is_empty()) {
        // The transfer emails' labels are replaced by the teacher's predictions.
        let set = text_dataset(&text.tok, &text.transfer, text.seq)?;
        let predicted = predict(&teacher_graph, &set, eval_batch, threads)?;
        let agree = text.transfer.iter().zip(&predicted).filter(|(e, &p)| e.label as usize == p).count();
        eprintln!(
            "transfer set: {} emails labelled by the teacher ({agree} agree with the hidden labels)",
            predicted.len()
        );
        let mut all = text.labeled.clone();
        all.extend(text.transfer.iter().zip(&predicted).map(|(e, &p)| TextExample { label: p as u8, ..e.clone() }));
        prepared.train = text_dataset(&text.tok, &all, text.seq)?;
        prepared.train_len = all.len();
    }
    // The teacher's outputs become extra data columns: logits, then matched hidden states and
    // attention maps, computed once over the training set.
    let mut wanted: Vec<(String, OutletId)> =
        vec![(slimnn_train::loss::TEACHER_INPUT.to_string(), slimnn_train::graph::logits_outlet(&teacher_graph)?)];
    for (i, &t) in layer_map.iter().enumerate() {
        if hidden_weight != 0.0 {
            wanted.push((format!("teacher_hidden_{i}"), hidden_outlet(&teacher_graph, t)?));
        }
        if attention_weight != 0.0 {
            wanted.push((format!("teacher_attention_{i}"), attention_outlet(&teacher_graph, t)?));
        }
    }
    let mut tg = teacher_graph.clone();
    tg.set_outputs(wanted);
    let train = WithTeacherOutputs::new(&prepared.train, &tg, threads)?;
    let make = move |model: Graph, params, recipe: Recipe| -> Result<Trainer> {
        let base = recipe.loss.clone();
        let layer_map = layer_map.clone();
        let loss = move |g: &mut Graph, logits: OutletId| -> IrResult<OutletId> {
            let mut total = base.build(g, logits)?;
            for (i, _) in layer_map.iter().enumerate() {
                if hidden_weight != 0.0 {
                    let s = hidden_outlet(g, i)?;
                    total = add_weighted_term(g, total, s, &format!("teacher_hidden_{i}"), hidden_weight, false)?;
                }
                if attention_weight != 0.0 {
                    let s = attention_outlet(g, i)?;
                    total = add_weighted_term(g, total, s, &format!("teacher_attention_{i}"), attention_weight, true)?;
                }
            }
            Ok(total)
        };
        Ok(Trainer::with_loss(model, params, recipe, Box::new(loss))?)
    };
    let model = prepared.model.clone();
    let (mut summary, _) = run_trainer(&prepared, &train, model, recipe, opts, threads, make)?;
    summary.teacher_test_accuracy = Some(teacher_accuracy);
    finish(&summary, &opts.output)?;
    Ok(summary)
}

fn hidden_outlet(g: &Graph, layer: usize) -> IrResult<OutletId> {
    slimnn_train::models::find_outlet(g, &format!("/encoder/layer.{layer}/output/LayerNorm/LayerNormalization"))
}

fn attention_outlet(g: &Graph, layer: usize) -> IrResult<OutletId> {
    slimnn_train::models::find_outlet(g, &format!("/encoder/layer.{layer}/attention/self/Softmax"))
}

/// `total + weight * term`: the MSE of a student hidden state and the teacher's (TinyBERT), or
/// for attention maps the KL divergence of the teacher's attention distribution from the
/// student's, summed over keys and averaged over batch, heads and queries (MiniLM). The teacher
/// value is the input `teacher_input`.
fn add_weighted_term(
    g: &mut Graph,
    total: OutletId,
    student: OutletId,
    teacher_input: &str,
    weight: f32,
    attention: bool,
) -> IrResult<OutletId> {
    use slimnn_ir::ops::{Binary, BinaryOp};
    let fact = slimnn_ir::Fact::new(DType::F32, g.fact(student).shape.clone());
    let t = g.add_input(teacher_input, fact)?;
    let term =
        if attention { attention_kl(g, student, t, teacher_input)? } else { slimnn_train::loss::mse(g, student, t)? };
    let w = g.add_const(&format!("loss.{teacher_input}.weight"), std::sync::Arc::new(Tensor::scalar(weight)))?;
    let term = g.add_node(&format!("loss.{teacher_input}.weighted"), Binary(BinaryOp::Mul), vec![term, w])?[0];
    Ok(g.add_node(&format!("loss.{teacher_input}.sum"), Binary(BinaryOp::Add), vec![total, term])?[0])
}

/// `mean_rows sum_k t * (log(t + e) - log(s + e))` over the last axis; `e` keeps masked keys
/// (probability exactly 0 in both) finite.
fn attention_kl(g: &mut Graph, s: OutletId, t: OutletId, name: &str) -> IrResult<OutletId> {
    use slimnn_ir::ops::{Binary, BinaryOp, Reduce, ReduceOp, Unary, UnaryOp};
    let eps = g.add_const(&format!("loss.{name}.eps"), std::sync::Arc::new(Tensor::scalar(1e-8f32)))?;
    let log_of = |g: &mut Graph, x: OutletId, tag: &str| -> IrResult<OutletId> {
        let x = g.add_node(&format!("loss.{name}.{tag}.eps"), Binary(BinaryOp::Add), vec![x, eps])?[0];
        Ok(g.add_node(&format!("loss.{name}.{tag}.log"), Unary(UnaryOp::Log), vec![x])?[0])
    };
    let log_t = log_of(g, t, "teacher")?;
    let log_s = log_of(g, s, "student")?;
    let d = g.add_node(&format!("loss.{name}.diff"), Binary(BinaryOp::Sub), vec![log_t, log_s])?[0];
    let p = g.add_node(&format!("loss.{name}.weighted"), Binary(BinaryOp::Mul), vec![t, d])?[0];
    let keys = Reduce { op: ReduceOp::Sum, axes: Some(vec![-1]), keepdims: false, noop_with_empty_axes: false };
    let rows = g.add_node(&format!("loss.{name}.rows"), keys, vec![p])?[0];
    let mean = Reduce { op: ReduceOp::Mean, axes: None, keepdims: false, noop_with_empty_axes: false };
    Ok(g.add_node(&format!("loss.{name}.mean"), mean, vec![rows])?[0])
}

/// A data set whose batches also carry a teacher's outputs (named as the teacher graph's
/// outputs), computed per batch: hidden states and attention maps of a whole training set
/// would not fit in memory.
struct WithTeacherOutputs<'a> {
    data: &'a dyn Dataset,
    teacher: Runnable,
    inputs: Vec<String>,
    outputs: Vec<String>,
    state: std::sync::Mutex<slimnn_runtime::State>,
}

impl<'a> WithTeacherOutputs<'a> {
    fn new(data: &'a dyn Dataset, teacher: &Graph, threads: usize) -> Result<Self> {
        let run = Runnable::new(teacher.clone(), RuntimeConfig::with_threads(threads))?;
        Ok(WithTeacherOutputs {
            data,
            inputs: (0..teacher.inputs().len()).map(|i| teacher.input_name(i).to_string()).collect(),
            outputs: teacher.outputs().iter().map(|(n, _)| n.clone()).collect(),
            state: std::sync::Mutex::new(run.new_state()),
            teacher: run,
        })
    }
}

impl Dataset for WithTeacherOutputs<'_> {
    fn len(&self) -> usize {
        self.data.len()
    }

    fn batch(&self, indices: &[usize]) -> slimnn_train::Result<Batch> {
        let mut b = self.data.batch(indices)?;
        let inputs: Vec<(String, Tensor)> = b.inputs.iter().filter(|(k, _)| self.inputs.contains(k)).cloned().collect();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let outs = self.teacher.run(&mut state, inputs)?;
        b.inputs.extend(self.outputs.iter().cloned().zip(outs));
        Ok(b)
    }
}
