//! The training loop end to end on a tiny MLP and synthetic blobs: gradients against finite
//! differences, learning, frozen parameters, outputs, and resume equivalence bit for bit.

use slimnn_data::datasets::Rng;
use slimnn_ir::ops::{Binary, BinaryOp, MatMul, Unary, UnaryOp};
use slimnn_ir::{Fact, Graph};
use slimnn_runtime::{Runnable, RuntimeConfig};
use slimnn_tensor::{DType, Dim, Tensor};
use slimnn_train::loss::{LossConfig, TEACHER_INPUT};
use slimnn_train::optim::OptimizerConfig;
use slimnn_train::schedule::ScheduleConfig;
use slimnn_train::{lift_parameters, Dataset, Parameters, Recipe, TensorDataset, TrainGraph, Trainer, WithTeacher};

const FEATURES: usize = 4;
const HIDDEN: usize = 8;
const CLASSES: usize = 3;

/// x[batch, 4] -> fc1 (8) -> relu -> fc2 (3) = logits, weights drawn from `seed`.
fn mlp(seed: u64) -> (Graph, Parameters) {
    mlp_of(seed, FEATURES, HIDDEN, CLASSES)
}

fn mlp_of(seed: u64, features: usize, hidden: usize, classes: usize) -> (Graph, Parameters) {
    let mut rng = Rng::new(seed);
    let mut randn = |shape: Vec<usize>, scale: f64| {
        let n = shape.iter().product();
        Tensor::from_vec(shape, (0..n).map(|_| (rng.normal() * scale) as f32).collect::<Vec<_>>()).unwrap()
    };
    let mut g = Graph::default();
    let x = g.add_input("x", Fact::new(DType::F32, vec![Dim::sym("batch"), Dim::Known(features)])).unwrap();
    let w1 = g.add_const("fc1.weight", randn(vec![features, hidden], (2.0 / features as f64).sqrt())).unwrap();
    let b1 = g.add_const("fc1.bias", randn(vec![hidden], 0.1)).unwrap();
    let w2 = g.add_const("fc2.weight", randn(vec![hidden, classes], (2.0 / hidden as f64).sqrt())).unwrap();
    let b2 = g.add_const("fc2.bias", randn(vec![classes], 0.1)).unwrap();
    let h = g.add_node("fc1", MatMul, vec![x, w1]).unwrap()[0];
    let h = g.add_node("fc1.add", Binary(BinaryOp::Add), vec![h, b1]).unwrap()[0];
    let h = g.add_node("relu", Unary(UnaryOp::Relu), vec![h]).unwrap()[0];
    let y = g.add_node("fc2", MatMul, vec![h, w2]).unwrap()[0];
    let y = g.add_node("fc2.add", Binary(BinaryOp::Add), vec![y, b2]).unwrap()[0];
    g.add_output("logits", y);
    lift_parameters(&g, |name, _| name.starts_with("fc")).unwrap()
}

/// Three Gaussian blobs in 4-d, `n` examples, labels cycling 0, 1, 2.
fn blobs(n: usize, seed: u64) -> TensorDataset {
    let centers = [[2.0, 0.0, -1.0, 0.5], [-2.0, 1.0, 1.0, -0.5], [0.0, -2.0, 0.0, 2.0]];
    let mut rng = Rng::new(seed);
    let mut x = Vec::with_capacity(n * FEATURES);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let c = i % CLASSES;
        labels.push(c);
        x.extend(centers[c].iter().map(|&m| (m + 0.7 * rng.normal()) as f32));
    }
    TensorDataset::new(vec![("x".into(), Tensor::from_vec(vec![n, FEATURES], x).unwrap())], labels).unwrap()
}

fn recipe(optimizer: OptimizerConfig) -> Recipe {
    let mut r = Recipe::new(3, 16, optimizer);
    r.seed = 11;
    r.threads = Some(1);
    r.loss = LossConfig::CrossEntropy { label_smoothing: 0.05 };
    r.schedule = ScheduleConfig::Cosine { warmup_steps: 3, min_lr_ratio: 0.1 };
    r.clip_grad_norm = Some(5.0);
    r
}

fn adamw() -> OptimizerConfig {
    OptimizerConfig::AdamW { lr: 0.02, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
}

/// A scratch directory, removed when dropped.
fn temp_dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("slimnn-train-{name}-")).tempdir().unwrap()
}

#[test]
fn step_gradients_match_finite_differences() {
    let (g, params) = mlp(1);
    let loss = LossConfig::CrossEntropy { label_smoothing: 0.1 };
    let tg = TrainGraph::new(&g, &|g, l| loss.build(g, l), &params, RuntimeConfig::with_threads(1)).unwrap();
    assert_eq!(tg.trainable(), params.trainable_names().as_slice());
    let data = blobs(6, 2);
    let batch = data.batch(&[0, 1, 2, 3, 4, 5]).unwrap();
    let target = slimnn_train::loss::class_targets(&batch.labels, CLASSES, 0.1).unwrap();
    let run = |p: &Parameters| {
        let mut inputs = batch.inputs.clone();
        inputs.push(("target".into(), target.clone()));
        inputs.extend(p.as_inputs());
        tg.step(&mut tg.step_runnable().new_state(), inputs).unwrap()
    };
    let base = run(&params);
    // Central differences in f32 on a few coordinates of every parameter.
    let h = 1e-2f32;
    for (k, name) in params.trainable_names().iter().enumerate() {
        let n = params.get(name).unwrap().value.len();
        for i in [0, n / 2, n - 1] {
            let shifted = |delta: f32| {
                let mut p = params.clone();
                p.get_mut(name).unwrap().value.as_mut_slice::<f32>().unwrap()[i] += delta;
                run(&p).loss as f64
            };
            let numeric = (shifted(h) - shifted(-h)) / (2.0 * h as f64);
            let analytic = base.grads[k].as_slice::<f32>().unwrap()[i] as f64;
            let err = (analytic - numeric).abs() / 1f64.max(analytic.abs()).max(numeric.abs());
            assert!(err < 2e-3, "{name}[{i}]: autodiff {analytic} vs finite differences {numeric}");
        }
    }
}

#[test]
fn fit_learns_writes_outputs_and_keeps_frozen_parameters() {
    let (g, params) = mlp(3);
    let (train, test) = (blobs(150, 4), blobs(60, 5));
    let mut r = recipe(OptimizerConfig::Sgd { lr: 0.1, momentum: 0.9, nesterov: true, weight_decay: 1e-4 });
    r.epochs = 6;
    r.freeze = vec!["fc1.bias".into()];
    let dir_tmp = temp_dir("fit");
    let dir = dir_tmp.path();
    let mut trainer =
        Trainer::new(g, params.clone(), r).unwrap().with_output_dir(dir).unwrap().with_progress_bar(false);
    let before = trainer.evaluate(&test).unwrap();
    let report = trainer.fit(&train, &test).unwrap();
    assert_eq!(report.steps, 6 * 10);
    assert!(!report.stopped_early);
    let after = report.final_test.unwrap();
    assert!(after.accuracy >= 0.95, "test accuracy {} (before training {})", after.accuracy, before.accuracy);
    assert!(after.loss < before.loss);
    let first = report.epochs.first().unwrap().train_loss;
    let last = report.epochs.last().unwrap().train_loss;
    assert!(last < first * 0.5, "train loss {first} -> {last}");
    let value = |p: &Parameters, n: &str| p.get(n).unwrap().value.clone();
    assert_eq!(value(trainer.parameters(), "fc1.bias"), value(&params, "fc1.bias"), "frozen");
    assert_ne!(value(trainer.parameters(), "fc1.weight"), value(&params, "fc1.weight"));
    // Outputs: checkpoint, JSON log, SVG; no temporary files.
    let mut files: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    files.sort();
    assert_eq!(files, vec!["checkpoint.safetensors", "log.json", "loss.svg"]);
    let log: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("log.json")).unwrap()).unwrap();
    assert_eq!(log["steps"].as_array().unwrap().len(), 60);
    assert_eq!(log["epochs"].as_array().unwrap().len(), 6);
    assert!(log["epochs"][5]["images_per_second"].as_f64().unwrap() > 0.0);
    assert!(std::fs::read_to_string(dir.join("loss.svg")).unwrap().contains("<polyline"));
    // The trained model, parameters baked in, gives the same logits as training evaluated.
    let baked = trainer.trained_model().unwrap();
    assert_eq!(baked.inputs().len(), 1);
    let batch = test.batch(&[0, 1, 2]).unwrap();
    let logits = baked.eval(batch.inputs.clone()).unwrap();
    let argmax: Vec<usize> = logits[0]
        .as_slice::<f32>()
        .unwrap()
        .chunks(CLASSES)
        .map(|r| (0..CLASSES).max_by(|&a, &b| r[a].total_cmp(&r[b])).unwrap())
        .collect();
    assert_eq!(argmax, batch.labels);
}

/// A run interrupted after `stop` updates and resumed from its checkpoint ends with the same
/// parameters, optimizer state and per-step losses, bit for bit, as one run straight through.
fn resume_matches(threads: usize, stop: u64) {
    let (train, test) = (blobs(100, 6), blobs(30, 7));
    let mut r = recipe(adamw());
    r.threads = Some(threads);
    r.checkpoint_every = Some(4);
    let (g, params) = mlp(8);

    let straight_dir_tmp = temp_dir(&format!("straight-{threads}"));
    let straight_dir = straight_dir_tmp.path();
    let mut straight = Trainer::new(g.clone(), params.clone(), r.clone())
        .unwrap()
        .with_output_dir(straight_dir)
        .unwrap()
        .with_progress_bar(false);
    let full = straight.fit(&train, &test).unwrap();

    let dir_tmp = temp_dir(&format!("resume-{threads}"));
    let dir = dir_tmp.path();
    let mut first = Trainer::new(g.clone(), params.clone(), r.clone())
        .unwrap()
        .with_output_dir(dir)
        .unwrap()
        .with_progress_bar(false)
        .stop_after(stop);
    let partial = first.fit(&train, &test).unwrap();
    assert!(partial.stopped_early);
    assert_eq!(partial.steps, stop);
    drop(first);

    let mut resumed = Trainer::new(g, params, r).unwrap().with_output_dir(dir).unwrap().with_progress_bar(false);
    resumed.resume(&dir.join("checkpoint.safetensors")).unwrap();
    assert_eq!(resumed.progress().step, stop);
    let rest = resumed.fit(&train, &test).unwrap();
    assert_eq!(rest.steps, full.steps);

    for (a, b) in straight.parameters().iter().zip(resumed.parameters().iter()) {
        let (x, y) = (a.value.as_slice::<f32>().unwrap(), b.value.as_slice::<f32>().unwrap());
        assert!(x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()), "{} differs after resume", a.name);
    }
    assert_eq!(straight.checkpoint().optimizer, resumed.checkpoint().optimizer);
    let losses =
        |t: &Trainer| t.log().steps.iter().map(|s| (s.step, s.loss.to_bits(), s.lr.to_bits())).collect::<Vec<_>>();
    assert_eq!(losses(&straight), losses(&resumed));
    let accuracies = |t: &Trainer| t.log().epochs.iter().map(|e| (e.test_accuracy, e.train_loss)).collect::<Vec<_>>();
    assert_eq!(accuracies(&straight), accuracies(&resumed));
}

#[test]
fn resumed_run_is_bit_identical_mid_epoch() {
    // 100 examples / 16 = 7 batches per epoch; stop inside epoch 1, off the checkpoint cadence.
    resume_matches(1, 10);
}

#[test]
fn resumed_run_is_bit_identical_at_an_epoch_boundary_with_two_threads() {
    resume_matches(2, 7);
}

#[test]
fn resume_rejects_a_different_model_or_recipe() {
    let (train, test) = (blobs(40, 1), blobs(10, 2));
    let mut r = recipe(adamw());
    r.epochs = 1;
    let dir_tmp = temp_dir("reject");
    let dir = dir_tmp.path();
    let (g, params) = mlp(1);
    Trainer::new(g.clone(), params.clone(), r.clone())
        .unwrap()
        .with_output_dir(dir)
        .unwrap()
        .with_progress_bar(false)
        .fit(&train, &test)
        .unwrap();
    let ckpt = dir.join("checkpoint.safetensors");
    let mut frozen = r.clone();
    frozen.freeze = vec!["fc2.*".into()];
    let e = Trainer::new(g.clone(), params.clone(), frozen).unwrap().resume(&ckpt).unwrap_err().to_string();
    assert!(e.contains("checkpoint.safetensors") && e.contains("freeze"), "{e}");
    let mut batch = r.clone();
    batch.batch_size = 8;
    let e = Trainer::new(g.clone(), params.clone(), batch).unwrap().resume(&ckpt).unwrap_err().to_string();
    assert!(e.contains("batch_size = 16"), "{e}");
    let mut longer = r.clone();
    longer.epochs = 2; // more epochs is fine: the run goes on
    Trainer::new(g.clone(), params.clone(), longer).unwrap().resume(&ckpt).unwrap();
    let mut sgd = r.clone();
    sgd.optimizer = OptimizerConfig::Sgd { lr: 0.1, momentum: 0.0, nesterov: false, weight_decay: 0.0 };
    let e = Trainer::new(g.clone(), params.clone(), sgd).unwrap().resume(&ckpt).unwrap_err().to_string();
    assert!(e.contains("optimizer"), "{e}");
    let (other_g, other_params) = {
        let (g2, p2) = mlp(1);
        let mut p = Parameters::new();
        for q in p2.iter().filter(|q| q.name != "fc2.bias") {
            p.push(&q.name, q.value.clone()).unwrap();
        }
        (g2, p)
    };
    let e = Trainer::new(other_g, other_params, r).unwrap().resume(&ckpt).unwrap_err().to_string();
    assert!(e.contains("not this model's"), "{e}");
}

#[test]
fn distillation_from_a_teacher_model() {
    let (train, test) = (blobs(90, 3), blobs(30, 4));
    // Teacher: an MLP trained briefly with cross-entropy.
    let (g, params) = mlp(5);
    let mut r = recipe(adamw());
    r.epochs = 10;
    let mut teacher = Trainer::new(g.clone(), params, r.clone()).unwrap().with_progress_bar(false);
    teacher.fit(&train, &test).unwrap();
    let teacher_runnable = Runnable::new(teacher.trained_model().unwrap(), RuntimeConfig::with_threads(1)).unwrap();
    // Student: another initialisation, trained on the teacher's logits and the labels.
    let (sg, sparams) = mlp(6);
    let mut sr = r;
    sr.loss = LossConfig::Distill { temperature: 2.0, alpha: 0.5, label_smoothing: 0.0 };
    let with_teacher = WithTeacher::new(&train, &teacher_runnable, 0, TEACHER_INPUT);
    assert!(with_teacher.batch(&[0, 1]).unwrap().inputs.iter().any(|(n, _)| n == TEACHER_INPUT));
    // Teacher logits computed once, not every epoch: the same batches as running the teacher live.
    let cached = TensorDataset::from_dataset(&with_teacher, 7).unwrap();
    assert_eq!(cached.len(), train.len());
    let (live, stored) = (with_teacher.batch(&[5, 80, 1]).unwrap(), cached.batch(&[5, 80, 1]).unwrap());
    assert_eq!(live.inputs[0], stored.inputs[0]);
    // Batches of 3 and of 7 may take different kernel blockings: equal up to rounding.
    let diff = live.inputs[1].1.max_abs_diff(&stored.inputs[1].1).unwrap();
    assert!(diff < 1e-5, "teacher logits differ by {diff}");
    assert_eq!(live.labels, stored.labels);
    let mut student = Trainer::new(sg, sparams, sr).unwrap().with_progress_bar(false);
    let report = student.fit(&cached, &test).unwrap();
    let teacher_accuracy = teacher.evaluate(&test).unwrap().accuracy;
    assert!(teacher_accuracy >= 0.9, "teacher {teacher_accuracy}");
    assert!(report.final_test.unwrap().accuracy >= 0.9, "{report:?}");
}

#[test]
fn fashion_mnist_subset_through_the_trainer() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/fashion-mnist");
    if !dir.is_dir() {
        println!("skipped: {} is absent (run scripts/fetch-assets.sh)", dir.display());
        return;
    }
    let data = slimnn_data::datasets::load_fashion_mnist(&dir).unwrap();
    let subset = |set: &slimnn_data::datasets::ImageSet, n: usize| {
        let mut s = set.clone();
        s.images.truncate(n * 784);
        s.labels.truncate(n);
        TensorDataset::from_images(&s, "x", true).unwrap()
    };
    let (train, test) = (subset(&data.train, 3000), subset(&data.test, 1000));
    let (g, params) = mlp_of(1, 784, 64, 10);
    let mut r = Recipe::new(3, 32, adamw());
    r.threads = Some(2);
    r.optimizer = OptimizerConfig::AdamW { lr: 2e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };
    r.schedule = ScheduleConfig::Cosine { warmup_steps: 20, min_lr_ratio: 0.0 };
    let mut trainer = Trainer::new(g, params, r).unwrap().with_progress_bar(false);
    let report = trainer.fit(&train, &test).unwrap();
    let accuracy = report.final_test.unwrap().accuracy;
    println!("Fashion-MNIST 3,000/1,000 subset, 784-64-10 MLP, 3 epochs: test accuracy {accuracy:.4}");
    // 3,000 images, 3 epochs of a 784-64-10 MLP: about 80% (the full set reaches 88%+).
    assert!(accuracy > 0.75, "test accuracy {accuracy}: {report:?}");
}

#[test]
fn tensor_dataset_gathers_rows_of_any_dtype() {
    let ids = Tensor::from_vec(vec![3, 2], vec![1i64, 2, 3, 4, 5, 6]).unwrap();
    let x = Tensor::from_vec(vec![3, 1, 2], vec![0.5f32, 1.5, 2.5, 3.5, 4.5, 5.5]).unwrap();
    let d = TensorDataset::new(vec![("ids".into(), ids), ("x".into(), x)], vec![0, 1, 0]).unwrap();
    assert_eq!(d.len(), 3);
    let b = d.batch(&[2, 0]).unwrap();
    assert_eq!(b.inputs[0].1, Tensor::from_vec(vec![2, 2], vec![5i64, 6, 1, 2]).unwrap());
    assert_eq!(b.inputs[1].1, Tensor::from_vec(vec![2, 1, 2], vec![4.5f32, 5.5, 0.5, 1.5]).unwrap());
    assert_eq!(b.labels, vec![0, 0]);
    assert!(d.batch(&[3]).unwrap_err().to_string().contains("out of range"));
    let short = Tensor::from_vec(vec![2], vec![1f32, 2.0]).unwrap();
    let e = TensorDataset::new(
        vec![("ids".into(), Tensor::zeros(DType::I64, vec![3, 2]).unwrap()), ("m".into(), short)],
        vec![],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("'m'"), "{e}");
    assert!(TensorDataset::new(vec![("x".into(), Tensor::zeros(DType::F32, vec![3]).unwrap())], vec![0, 1]).is_err());
}

#[test]
fn max_steps_shortens_the_schedule_and_evaluates_where_it_stops() {
    let (train, test) = (blobs(100, 6), blobs(30, 7));
    let mut r = recipe(adamw());
    r.max_steps = Some(15); // 7 batches per epoch: stops after batch 1 of epoch 2
    let (g, params) = mlp(8);
    let mut trainer = Trainer::new(g, params, r).unwrap().with_progress_bar(false);
    let report = trainer.fit(&train, &test).unwrap();
    assert!(report.stopped_early);
    assert_eq!(report.steps, 15);
    assert_eq!(report.epochs.iter().map(|e| e.epoch).collect::<Vec<_>>(), vec![0, 1, 2]);
    assert!(report.final_test.is_some());
    let lrs: Vec<f32> = trainer.log().steps.iter().map(|s| s.lr).collect();
    assert!((lrs[14] - 0.02 * 0.1).abs() < 1e-7, "the cosine reaches its floor at step 15: {lrs:?}");
    // Fitting again does nothing more.
    let again = trainer.fit(&train, &test).unwrap();
    assert_eq!((again.steps, again.epochs.len()), (15, 3));
}

#[test]
fn custom_loss_builder() {
    let (train, test) = (blobs(48, 1), blobs(12, 2));
    let mut r = recipe(adamw());
    r.epochs = 1;
    let (g, params) = mlp(2);
    let mut plain = Trainer::new(g.clone(), params.clone(), r.clone()).unwrap().with_progress_bar(false);
    plain.fit(&train, &test).unwrap();
    let base = r.loss.clone();
    let mut custom = Trainer::with_loss(g.clone(), params.clone(), r.clone(), Box::new(move |g, l| base.build(g, l)))
        .unwrap()
        .with_progress_bar(false);
    custom.fit(&train, &test).unwrap();
    assert_eq!(plain.log().steps, custom.log().steps, "the same loss built by hand trains the same");
    let failing = Trainer::with_loss(
        g,
        params,
        r,
        Box::new(|_, _| Err(slimnn_ir::IrError::Graph("no such layer 'encoder.9'".into()))),
    );
    assert!(failing.err().unwrap().to_string().contains("encoder.9"));
}
