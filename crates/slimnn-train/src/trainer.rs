//! The training loop: epochs of shuffled mini-batches, an optimizer step per batch, evaluation
//! on a test set each epoch, a progress bar, checkpoints, a JSON log and an SVG loss curve.

use crate::checkpoint::{load_checkpoint, save_checkpoint, Checkpoint, Progress};
use crate::graph::TrainGraph;
use crate::log::{EpochRecord, StepRecord, TrainLog};
use crate::loss::{class_targets, TARGET_INPUT};
use crate::optim::{clip_grad_norm, Optimizer};
use crate::recipe::Recipe;
use crate::{bake_parameters, file_err, Parameters, Result, TrainError};
use slimnn_data::datasets::{BatchOrder, ImageSet};
use slimnn_ir::Graph;
use slimnn_runtime::{Runnable, RuntimeConfig, State};
use slimnn_tensor::{DType, Tensor};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

/// A batch: named model inputs (and loss inputs such as a regression target or teacher
/// logits), plus one class label per example (empty when the task has no labels).
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub inputs: Vec<(String, Tensor)>,
    pub labels: Vec<usize>,
}

/// Indexed examples the trainer draws batches from.
pub trait Dataset {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The examples `indices` (each `< len()`) as one batch, in that order.
    fn batch(&self, indices: &[usize]) -> Result<Batch>;
}

/// Examples held in memory as tensors whose first dim indexes the example.
#[derive(Debug, Clone)]
pub struct TensorDataset {
    columns: Vec<Column>,
    labels: Vec<usize>,
    len: usize,
}

#[derive(Debug, Clone)]
struct Column {
    name: String,
    dtype: DType,
    row_shape: Vec<usize>,
    row_bytes: usize,
    bytes: Vec<u8>,
}

impl TensorDataset {
    /// `inputs` all have the same first dim `N`; `labels` has `N` entries or none.
    pub fn new(inputs: Vec<(String, Tensor)>, labels: Vec<usize>) -> Result<TensorDataset> {
        let len = inputs.first().map(|(_, t)| t.shape().first().copied().unwrap_or(0)).unwrap_or(labels.len());
        let mut columns = Vec::new();
        for (name, t) in inputs {
            if t.shape().first() != Some(&len) {
                return Err(TrainError::Invalid(format!(
                    "data set input '{name}' has shape {:?}, expected {len} examples along dim 0",
                    t.shape()
                )));
            }
            let bytes = t.to_le_bytes();
            let row_bytes = bytes.len() / len.max(1);
            columns.push(Column { name, dtype: t.dtype(), row_shape: t.shape()[1..].to_vec(), row_bytes, bytes });
        }
        if !labels.is_empty() && labels.len() != len {
            return Err(TrainError::Invalid(format!("{} labels for {len} examples", labels.len())));
        }
        Ok(TensorDataset { columns, labels, len })
    }

    /// Images as one input `[N, 1, rows, cols]` (or `[N, rows * cols]` when `flat`) with their labels.
    pub fn from_images(set: &ImageSet, input: &str, flat: bool) -> Result<TensorDataset> {
        let pixels = set.rows * set.cols;
        if set.images.len() != set.len() * pixels {
            return Err(TrainError::Invalid(format!(
                "{} pixels for {} images of {}x{}",
                set.images.len(),
                set.len(),
                set.rows,
                set.cols
            )));
        }
        let row_shape = if flat { vec![pixels] } else { vec![1, set.rows, set.cols] };
        // Straight to little-endian bytes: no intermediate copy of the whole set.
        let bytes: Vec<u8> = set.images.iter().flat_map(|x| x.to_le_bytes()).collect();
        let column = Column { name: input.to_string(), dtype: DType::F32, row_shape, row_bytes: pixels * 4, bytes };
        Ok(TensorDataset {
            columns: vec![column],
            labels: set.labels.iter().map(|&l| l as usize).collect(),
            len: set.len(),
        })
    }
}

impl TensorDataset {
    /// Materialises any data set (in order, `batch_size` examples at a time): e.g. a
    /// [`WithTeacher`] becomes a data set with the teacher's outputs computed once instead of
    /// every epoch.
    pub fn from_dataset(data: &dyn Dataset, batch_size: usize) -> Result<TensorDataset> {
        let mut columns: Vec<Column> = Vec::new();
        let mut labels = Vec::new();
        let mut len = 0;
        for indices in BatchOrder::new(data.len(), batch_size, 0, false).batches(0, 0) {
            let batch = data.batch(&indices)?;
            if columns.is_empty() {
                columns = batch
                    .inputs
                    .iter()
                    .map(|(name, t)| Column {
                        name: name.clone(),
                        dtype: t.dtype(),
                        row_shape: t.shape().get(1..).unwrap_or(&[]).to_vec(),
                        row_bytes: t.len() / indices.len().max(1) * t.dtype().size_of(),
                        bytes: Vec::new(),
                    })
                    .collect();
            }
            if batch.inputs.len() != columns.len() {
                return Err(TrainError::Invalid("the data set's batches have different inputs".into()));
            }
            for (c, (name, t)) in columns.iter_mut().zip(&batch.inputs) {
                if *name != c.name
                    || t.dtype() != c.dtype
                    || t.shape().first() != Some(&indices.len())
                    || t.shape()[1..] != c.row_shape[..]
                {
                    return Err(TrainError::Invalid(format!(
                        "input '{name}' changes name, dtype or row shape between batches ({:?})",
                        t.shape()
                    )));
                }
                c.bytes.extend_from_slice(&t.to_le_bytes());
            }
            labels.extend_from_slice(&batch.labels);
            len += indices.len();
        }
        if !labels.is_empty() && labels.len() != len {
            return Err(TrainError::Invalid("some batches have labels and some do not".into()));
        }
        Ok(TensorDataset { columns, labels, len })
    }
}

impl Dataset for TensorDataset {
    fn len(&self) -> usize {
        self.len
    }

    fn batch(&self, indices: &[usize]) -> Result<Batch> {
        if let Some(&bad) = indices.iter().find(|&&i| i >= self.len) {
            return Err(TrainError::Invalid(format!("example {bad} is out of range for {} examples", self.len)));
        }
        let mut inputs = Vec::with_capacity(self.columns.len());
        for c in &self.columns {
            let mut raw = Vec::with_capacity(c.row_bytes * indices.len());
            for &i in indices {
                raw.extend_from_slice(&c.bytes[i * c.row_bytes..(i + 1) * c.row_bytes]);
            }
            let mut shape = vec![indices.len()];
            shape.extend_from_slice(&c.row_shape);
            inputs.push((c.name.clone(), Tensor::from_le_bytes(c.dtype, shape, &raw)?));
        }
        let labels = if self.labels.is_empty() { vec![] } else { indices.iter().map(|&i| self.labels[i]).collect() };
        Ok(Batch { inputs, labels })
    }
}

/// A data set whose batches also carry a teacher model's output (for distillation): the
/// teacher runs on the batch's inputs that it declares, and its output `teacher_output` is
/// added as the input `as_input` (e.g. [`crate::loss::TEACHER_INPUT`]).
pub struct WithTeacher<'a> {
    pub data: &'a dyn Dataset,
    pub teacher: &'a Runnable,
    pub teacher_output: usize,
    pub as_input: String,
    state: Mutex<State>,
}

impl<'a> WithTeacher<'a> {
    pub fn new(data: &'a dyn Dataset, teacher: &'a Runnable, teacher_output: usize, as_input: &str) -> WithTeacher<'a> {
        WithTeacher {
            data,
            teacher,
            teacher_output,
            as_input: as_input.to_string(),
            state: Mutex::new(State::default()),
        }
    }
}

impl Dataset for WithTeacher<'_> {
    fn len(&self) -> usize {
        self.data.len()
    }

    fn batch(&self, indices: &[usize]) -> Result<Batch> {
        let mut batch = self.data.batch(indices)?;
        let names: Vec<String> =
            (0..self.teacher.graph().inputs().len()).map(|i| self.teacher.graph().input_name(i).to_string()).collect();
        let inputs = inputs_of(&names, &batch.inputs);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let out = self.teacher.run(&mut state, inputs)?;
        let t = out
            .into_iter()
            .nth(self.teacher_output)
            .ok_or_else(|| TrainError::Invalid(format!("the teacher has no output {}", self.teacher_output)))?;
        batch.inputs.push((self.as_input.clone(), t));
        Ok(batch)
    }
}

/// The entries of `inputs` named in `names` (cloned).
fn inputs_of(names: &[String], inputs: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    inputs.iter().filter(|(n, _)| names.contains(n)).cloned().collect()
}

/// Accuracy and mean cross-entropy (natural log, no smoothing) of a set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Evaluation {
    pub loss: f64,
    pub accuracy: f64,
    pub examples: usize,
}

/// What [`Trainer::fit`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct FitReport {
    pub epochs: Vec<EpochRecord>,
    /// Updates applied in total (including those before a resume).
    pub steps: u64,
    /// Stopped by the recipe's `max_steps` or [`Trainer::stop_after`] before the last epoch ended.
    /// A run ended by `max_steps` is evaluated where it stopped (an epoch record for the partial
    /// epoch, and `final_test`); an interrupted one is not.
    pub stopped_early: bool,
    pub final_test: Option<Evaluation>,
}

/// Per-example (loss, correct) of class logits `[batch, classes]` against labels, in f64.
fn score(logits: &Tensor, labels: &[usize]) -> Result<(f64, usize)> {
    if labels.is_empty() {
        return Ok((0.0, 0));
    }
    let classes = *logits.shape().last().unwrap_or(&0);
    let v = logits.to_f64_vec();
    if classes == 0 || v.len() != classes * labels.len() {
        return Err(TrainError::Invalid(format!(
            "logits of shape {:?} do not match {} labels",
            logits.shape(),
            labels.len()
        )));
    }
    let (mut loss, mut correct) = (0.0, 0);
    for (row, &label) in v.chunks(classes).zip(labels) {
        let (arg, max) =
            row.iter().enumerate().fold((0, f64::NEG_INFINITY), |a, (i, &x)| if x > a.1 { (i, x) } else { a });
        let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
        loss += lse - row.get(label).copied().unwrap_or(f64::NAN);
        correct += usize::from(arg == label);
    }
    Ok((loss, correct))
}

/// Adds a scalar loss on the model's logits to the graph.
pub type LossBuilder = dyn Fn(&mut Graph, slimnn_ir::OutletId) -> slimnn_ir::IrResult<slimnn_ir::OutletId>;

/// Trains a model (parameters lifted to inputs, see [`crate::lift_parameters`]) by a recipe.
pub struct Trainer {
    recipe: Recipe,
    model: Graph,
    graph: TrainGraph,
    params: Parameters,
    optimizer: Optimizer,
    progress: Progress,
    log: TrainLog,
    classes: Option<usize>,
    out_dir: Option<PathBuf>,
    show_progress: bool,
    stop_at: Option<u64>,
    state: State,
    eval_state: State,
}

impl Trainer {
    /// Freezes the recipe's `freeze` patterns, builds the step graph with the recipe's loss and
    /// the runtime with its thread count.
    pub fn new(model: Graph, params: Parameters, recipe: Recipe) -> Result<Trainer> {
        let loss = recipe.loss.clone();
        Trainer::with_loss(model, params, recipe, Box::new(move |g, logits| loss.build(g, logits)))
    }

    /// As [`Trainer::new`] with a custom loss builder (e.g. the recipe's loss plus hidden-state
    /// matching terms). The recipe's loss still decides whether the trainer feeds
    /// [`TARGET_INPUT`] class probabilities built from labels (and their smoothing); any other
    /// input the builder adds must come with the data set's batches.
    pub fn with_loss(model: Graph, mut params: Parameters, recipe: Recipe, loss: Box<LossBuilder>) -> Result<Trainer> {
        recipe.validate().map_err(|msg| TrainError::Recipe { origin: "(in memory)".into(), msg })?;
        params.freeze(&recipe.freeze)?;
        let threads = recipe.threads.unwrap_or_else(slimnn_runtime::physical_cores);
        let graph = TrainGraph::new(&model, &*loss, &params, RuntimeConfig::with_threads(threads))?;
        let logits = crate::graph::logits_outlet(&model)?;
        let classes = model.fact(logits).shape.last().and_then(|d| d.as_known());
        if recipe.loss.targets_from_labels() && classes.is_none() {
            return Err(TrainError::Invalid("the logits' last dim (classes) must be known".into()));
        }
        let log = TrainLog {
            recipe: serde_json::to_value(&recipe).map_err(|e| TrainError::Invalid(e.to_string()))?,
            ..TrainLog::default()
        };
        Ok(Trainer {
            optimizer: Optimizer::new(recipe.optimizer.clone()),
            progress: Progress { seed: recipe.seed, ..Progress::default() },
            recipe,
            model,
            graph,
            params,
            log,
            classes,
            out_dir: None,
            show_progress: true,
            stop_at: None,
            state: State::default(),
            eval_state: State::default(),
        })
    }

    /// Writes `checkpoint.safetensors`, `log.json` and `loss.svg` into `dir` (created).
    pub fn with_output_dir(mut self, dir: &Path) -> Result<Trainer> {
        std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
        self.out_dir = Some(dir.to_path_buf());
        Ok(self)
    }

    /// Shows or hides the progress bar (shown by default; indicatif hides it off a terminal).
    pub fn with_progress_bar(mut self, show: bool) -> Trainer {
        self.show_progress = show;
        self
    }

    /// Interrupts `fit` once `step` updates are done (writing a checkpoint), as a stopped job
    /// would; unlike the recipe's `max_steps` this leaves the schedule's length unchanged, so a
    /// resumed run continues exactly as an uninterrupted one.
    pub fn stop_after(mut self, step: u64) -> Trainer {
        self.stop_at = Some(step);
        self
    }

    pub fn parameters(&self) -> &Parameters {
        &self.params
    }

    pub fn log(&self) -> &TrainLog {
        &self.log
    }

    pub fn progress(&self) -> Progress {
        self.progress
    }

    pub fn recipe(&self) -> &Recipe {
        &self.recipe
    }

    pub fn train_graph(&self) -> &TrainGraph {
        &self.graph
    }

    /// The model with its current parameter values baked in as constants.
    pub fn trained_model(&self) -> Result<Graph> {
        bake_parameters(&self.model, &self.params)
    }

    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            params: self.params.clone(),
            optimizer: self.optimizer.clone(),
            progress: self.progress,
            log: self.log.clone(),
        }
    }

    /// Restores parameters, optimizer state, progress and log from a checkpoint of the same
    /// model and recipe, so `fit` continues where that run stopped.
    pub fn resume(&mut self, path: &Path) -> Result<()> {
        let ckpt = load_checkpoint(path)?;
        let mismatch = |msg: String| file_err(path, msg);
        if ckpt.params.names() != self.params.names() {
            return Err(mismatch("its parameters are not this model's".into()));
        }
        for (a, b) in ckpt.params.iter().zip(self.params.iter()) {
            if a.value.shape() != b.value.shape() {
                return Err(mismatch(format!(
                    "parameter '{}' is {:?}, the model's is {:?}",
                    a.name,
                    a.value.shape(),
                    b.value.shape()
                )));
            }
            if a.trainable != b.trainable {
                return Err(mismatch(format!(
                    "parameter '{}' is {} there but not here (freeze differs)",
                    a.name,
                    if a.trainable { "trained" } else { "frozen" }
                )));
            }
        }
        if std::mem::discriminant(&ckpt.optimizer.config) != std::mem::discriminant(&self.recipe.optimizer) {
            return Err(mismatch("it was written with another optimizer".into()));
        }
        if ckpt.progress.seed != self.recipe.seed {
            return Err(mismatch(format!(
                "it was trained with seed {}, the recipe says {}",
                ckpt.progress.seed, self.recipe.seed
            )));
        }
        // The position (epoch, batch) means the same batches only under the same batching.
        for key in ["batch_size", "drop_last"] {
            let (then, now) = (&ckpt.log.recipe[key], &self.log.recipe[key]);
            if !then.is_null() && then != now {
                return Err(mismatch(format!("it was trained with {key} = {then}, the recipe says {now}")));
            }
        }
        self.params = ckpt.params;
        self.optimizer = Optimizer { config: self.recipe.optimizer.clone(), ..ckpt.optimizer };
        self.progress = ckpt.progress;
        self.log = ckpt.log;
        Ok(())
    }

    fn write_outputs(&self, checkpoint: bool) -> Result<()> {
        let Some(dir) = &self.out_dir else { return Ok(()) };
        if checkpoint {
            save_checkpoint(&dir.join("checkpoint.safetensors"), &self.checkpoint())?;
        }
        self.log.write_json(&dir.join("log.json"))?;
        self.log.write_svg(&dir.join("loss.svg"))
    }

    fn with_params(&self, mut inputs: Vec<(String, Tensor)>) -> Vec<(String, Tensor)> {
        inputs.extend(self.params.as_inputs());
        inputs
    }

    /// Accuracy and cross-entropy of the current parameters on `data` (in order, eval batch size).
    pub fn evaluate(&mut self, data: &dyn Dataset) -> Result<Evaluation> {
        let batch_size = self.recipe.eval_batch_size.unwrap_or(self.recipe.batch_size);
        let order = BatchOrder::new(data.len(), batch_size, 0, false);
        let (mut loss, mut correct, mut n) = (0.0, 0, 0);
        for indices in order.batches(0, 0) {
            let batch = data.batch(&indices)?;
            let inputs = self.with_params(inputs_of(self.graph.forward_inputs(), &batch.inputs));
            let logits = self.graph.forward(&mut self.eval_state, inputs)?;
            let (l, c) = score(&logits, &batch.labels)?;
            loss += l;
            correct += c;
            n += batch.labels.len();
        }
        let div = |x: f64| if n == 0 { f64::NAN } else { x / n as f64 };
        Ok(Evaluation { loss: div(loss), accuracy: div(correct as f64), examples: n })
    }

    /// Trains for the recipe's epochs (from where a resumed checkpoint stopped), evaluating on
    /// `test` after each epoch. Stops early after `max_steps` updates.
    pub fn fit(&mut self, train: &dyn Dataset, test: &dyn Dataset) -> Result<FitReport> {
        if train.is_empty() {
            return Err(TrainError::Invalid("the training set is empty".into()));
        }
        let order = BatchOrder {
            drop_last: self.recipe.drop_last,
            ..BatchOrder::new(train.len(), self.recipe.batch_size, self.recipe.seed, true)
        };
        let per_epoch = order.batches_per_epoch() as u64;
        if per_epoch == 0 {
            return Err(TrainError::Invalid(format!(
                "{} examples make no full batch of {} (drop_last)",
                train.len(),
                self.recipe.batch_size
            )));
        }
        let total_steps = (per_epoch * self.recipe.epochs as u64).min(self.recipe.max_steps.unwrap_or(u64::MAX));
        let base_lr = self.recipe.optimizer.lr();
        let step_inputs = self.graph.step_inputs().to_vec();
        let wants_target = self.recipe.loss.targets_from_labels() && step_inputs.iter().any(|n| n == TARGET_INPUT);
        let mut stopped_early = false;
        while self.progress.epoch < self.recipe.epochs {
            let epoch = self.progress.epoch;
            let bar = if self.show_progress {
                indicatif::ProgressBar::new(per_epoch)
            } else {
                indicatif::ProgressBar::hidden()
            };
            let style =
                indicatif::ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg} {elapsed}<{eta}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
            bar.set_style(style.progress_chars("=> "));
            bar.set_prefix(format!("{}/{}", epoch + 1, self.recipe.epochs));
            bar.set_position(self.progress.batch as u64);
            let started = Instant::now();
            let mut seen = 0usize;
            // Running sums for the bar (the log holds the same per step).
            let (mut bar_loss, mut bar_examples, mut bar_correct) = (0.0f64, 0usize, 0usize);
            for indices in order.batches(epoch, self.progress.batch) {
                if self.progress.step >= total_steps || self.stop_at.is_some_and(|s| self.progress.step >= s) {
                    stopped_early = true;
                    break;
                }
                let batch = train.batch(&indices)?;
                let mut inputs = inputs_of(&step_inputs, &batch.inputs);
                if wants_target {
                    let classes = self.classes.unwrap_or(0);
                    inputs.push((
                        TARGET_INPUT.to_string(),
                        class_targets(&batch.labels, classes, self.recipe.loss.label_smoothing())?,
                    ));
                }
                let inputs = self.with_params(inputs);
                let out = self.graph.step(&mut self.state, inputs)?;
                if !out.loss.is_finite() {
                    return Err(TrainError::Invalid(format!(
                        "the loss is {} at step {} (epoch {}, batch {}); lower the learning rate or clip gradients",
                        out.loss, self.progress.step, epoch, self.progress.batch
                    )));
                }
                let mut grads = out.grads;
                let grad_norm = match self.recipe.clip_grad_norm {
                    Some(max) => Some(clip_grad_norm(&mut grads, max)?),
                    None => None,
                };
                let lr = self.recipe.schedule.lr(base_lr, self.progress.step, total_steps);
                self.optimizer.step(&mut self.params, &grads, lr)?;
                let (_, correct) = score(&out.logits, &batch.labels)?;
                self.log.steps.push(StepRecord {
                    step: self.progress.step,
                    epoch,
                    loss: out.loss,
                    lr,
                    examples: indices.len(),
                    correct,
                    grad_norm,
                });
                seen += indices.len();
                self.progress.step += 1;
                self.progress.batch += 1;
                bar_loss += out.loss as f64 * indices.len() as f64;
                bar_examples += indices.len();
                bar_correct += correct;
                bar.set_message(format!(
                    "loss {:.4} acc {:.3}",
                    bar_loss / bar_examples as f64,
                    bar_correct as f64 / bar_examples as f64
                ));
                bar.inc(1);
                if self.recipe.checkpoint_every.is_some_and(|k| self.progress.step.is_multiple_of(k)) {
                    self.write_outputs(true)?;
                }
            }
            let seconds = started.elapsed().as_secs_f64();
            bar.finish_and_clear();
            let interrupted = self.stop_at.is_some_and(|s| self.progress.step >= s);
            if stopped_early && (interrupted || seen == 0) {
                break; // an interrupted run is evaluated when it finishes
            }
            if !stopped_early {
                self.progress.epoch += 1;
                self.progress.batch = 0;
            } // else `max_steps` ended the run inside this epoch: evaluate where it stands
            let eval = self.evaluate(test)?;
            let (train_loss, train_accuracy) = self.log.epoch_train_stats(epoch);
            self.log.epochs.push(EpochRecord {
                epoch,
                train_loss,
                train_accuracy,
                test_loss: eval.loss,
                test_accuracy: eval.accuracy,
                images_per_second: if seconds > 0.0 { seen as f64 / seconds } else { 0.0 },
                seconds,
            });
            if self.show_progress {
                eprintln!(
                    "epoch {}/{}: train loss {train_loss:.4} acc {train_accuracy:.4} | test loss {:.4} acc {:.4} | {:.0} images/s",
                    epoch + 1,
                    self.recipe.epochs,
                    eval.loss,
                    eval.accuracy,
                    if seconds > 0.0 { seen as f64 / seconds } else { 0.0 }
                );
            }
            self.write_outputs(true)?;
            if stopped_early {
                break;
            }
            if (self.progress.step >= total_steps || interrupted) && self.progress.epoch < self.recipe.epochs {
                stopped_early = true;
                break;
            }
        }
        if stopped_early {
            self.write_outputs(true)?;
        }
        let finished = self.progress.epoch >= self.recipe.epochs || self.progress.step >= total_steps;
        let final_test = self.log.epochs.last().filter(|_| finished).map(|e| Evaluation {
            loss: e.test_loss,
            accuracy: e.test_accuracy,
            examples: test.len(),
        });
        Ok(FitReport { epochs: self.log.epochs.clone(), steps: self.progress.step, stopped_early, final_test })
    }
}
