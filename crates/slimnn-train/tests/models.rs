//! The model builders train: a few optimizer steps on a fixed batch of real Fashion-MNIST
//! images drive the loss down (LeNet-5 and LeNet-300-100), and a MiniLM-based text classifier
//! and its every-other-layer student build with the expected shapes.

use slimnn_data::datasets::load_fashion_mnist;
use slimnn_ir::Fact;
use slimnn_runtime::RuntimeConfig;
use slimnn_tensor::{DType, Tensor};
use slimnn_train::graph::TrainGraph;
use slimnn_train::loss::{class_targets, cross_entropy, TARGET_INPUT};
use slimnn_train::models::{image_classifier, text_classifier, ImageArch};
use slimnn_train::optim::{Optimizer, OptimizerConfig};
use std::path::PathBuf;
use std::time::Instant;

fn assets() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../assets")
}

fn overfit(arch: ImageArch) {
    let dir = assets().join("fashion-mnist");
    if !dir.exists() {
        eprintln!("skipping: {} is absent (scripts/fetch-assets.sh fashion-mnist)", dir.display());
        return;
    }
    let data = load_fashion_mnist(&dir).unwrap();
    let n = 64;
    let image = Tensor::from_vec(vec![n, 1, 28, 28], data.train.images[..n * 784].to_vec()).unwrap();
    let labels: Vec<usize> = data.train.labels[..n].iter().map(|&l| l as usize).collect();
    let target = class_targets(&labels, 10, 0.0).unwrap();
    let model = image_classifier(arch, 7).unwrap();
    let mut params = model.params.clone();
    let loss = |g: &mut slimnn_ir::Graph, logits| {
        let fact = Fact::new(DType::F32, g.fact(logits).shape.clone());
        let t = g.add_input(TARGET_INPUT, fact)?;
        cross_entropy(g, logits, t)
    };
    let tg = TrainGraph::new(&model.graph, &loss, &params, RuntimeConfig::with_threads(1)).unwrap();
    let mut state = tg.step_runnable().new_state();
    let mut opt = Optimizer::new(OptimizerConfig::Sgd { lr: 0.05, momentum: 0.9, nesterov: false, weight_decay: 0.0 });
    let (mut first, mut last) = (0.0, 0.0);
    let start = Instant::now();
    let steps = 30;
    for step in 0..steps {
        let mut inputs = vec![("image".to_string(), image.clone()), (TARGET_INPUT.to_string(), target.clone())];
        inputs.extend(params.as_inputs());
        let out = tg.step(&mut state, inputs).unwrap();
        assert!(out.loss.is_finite(), "step {step}: loss {}", out.loss);
        if step == 0 {
            first = out.loss;
        }
        last = out.loss;
        opt.step(&mut params, &out.grads, 0.05).unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "{arch:?}: loss {first:.3} -> {last:.3} in {steps} steps of {n} images ({:.0} images/s, 1 thread)",
        (steps * n) as f64 / secs
    );
    assert!(first > 2.0 && last < 0.5 * first, "loss {first} -> {last}");
}

#[test]
fn lenet5_overfits_a_batch() {
    overfit(ImageArch::Lenet5);
}

#[test]
fn lenet_300_100_overfits_a_batch() {
    overfit(ImageArch::Lenet300100);
}

#[test]
fn text_classifier_and_student_shapes() {
    let dir = assets().join("minilm");
    if !dir.exists() {
        eprintln!("skipping: {} is absent (scripts/fetch-assets.sh core)", dir.display());
        return;
    }
    let teacher = text_classifier(&dir, 2, None, 1).unwrap();
    let student = text_classifier(&dir, 2, Some(&[0, 2, 4]), 1).unwrap();
    assert_eq!(teacher.data_inputs, ["input_ids", "attention_mask", "token_type_ids"]);
    let layers =
        |g: &slimnn_ir::Graph| g.nodes().iter().filter(|n| n.name.ends_with("/intermediate/dense/MatMul")).count();
    assert_eq!(layers(&teacher.graph), 6);
    assert_eq!(layers(&student.graph), 3);
    // The student's second layer holds the teacher's third.
    let w = |m: &slimnn_train::models::Model, name: &str| m.params.get(name).map(|p| p.value.clone());
    assert!(w(&student, "encoder.layer.2.output.dense.weight.T").is_some());
    assert!(w(&student, "encoder.layer.1.output.dense.weight.T").is_none());
    let ids = Tensor::from_vec(vec![1, 4], vec![101i64, 7592, 2088, 102]).unwrap();
    let mut inputs = vec![
        ("input_ids".to_string(), ids),
        ("attention_mask".to_string(), Tensor::from_vec(vec![1, 4], vec![1i64; 4]).unwrap()),
        ("token_type_ids".to_string(), Tensor::from_vec(vec![1, 4], vec![0i64; 4]).unwrap()),
    ];
    inputs.extend(student.params.as_inputs());
    let out = student.graph.eval(inputs).unwrap();
    assert_eq!(out[0].shape(), [1, 2]);
}

/// The int8 QDQ model QAT converts to computes what the fake-quantized training graph computed.
#[test]
fn qat_int8_conversion_matches_fake_quant() {
    use slimnn_train::qat::{insert_fake_quant, quantizable, to_int8, QatConfig};
    for arch in [ImageArch::Lenet5, ImageArch::Lenet300100] {
        let model = image_classifier(arch, 3).unwrap();
        let mut rng = slimnn_data::datasets::Rng::new(9);
        let x: Vec<f32> = (0..4 * 784).map(|_| rng.normal() as f32).collect();
        let image = Tensor::from_vec(vec![4, 1, 28, 28], x).unwrap();
        // Ranges observed on the batch itself.
        let targets = quantizable(&model);
        assert_eq!(targets.len(), if arch == ImageArch::Lenet5 { 5 } else { 3 });
        let mut g = model.graph.clone();
        g.set_outputs(targets.iter().enumerate().map(|(i, (_, o))| (format!("a{i}"), *o)).collect());
        let mut inputs = vec![("image".to_string(), image.clone())];
        inputs.extend(model.params.as_inputs());
        let seen = g.eval(inputs.clone()).unwrap();
        let ranges = targets
            .iter()
            .zip(&seen)
            .map(|((_, o), t)| {
                let v = t.as_slice::<f32>().unwrap();
                (*o, v.iter().fold((f32::MAX, f32::MIN), |(l, h), &x| (l.min(x), h.max(x))))
            })
            .collect();
        let qat = insert_fake_quant(&model, &ranges, QatConfig { learn_scales: true }).unwrap();
        assert!(qat.params.len() > model.params.len(), "scales are parameters");
        let mut qinputs = vec![("image".to_string(), image.clone())];
        qinputs.extend(qat.params.as_inputs());
        let fake = qat.graph.eval(qinputs).unwrap().remove(0);
        let float = model.graph.eval(inputs).unwrap().remove(0);
        let int8 = to_int8(&qat).unwrap();
        let hist = int8.op_histogram();
        assert!(hist.contains_key("QuantizeLinear") && hist.contains_key("DequantizeLinear"), "{hist:?}");
        assert!(!hist.contains_key("FakeQuant"));
        let real = int8.eval(vec![("image".to_string(), image)]).unwrap().remove(0);
        let (f, r, fl) =
            (fake.as_slice::<f32>().unwrap(), real.as_slice::<f32>().unwrap(), float.as_slice::<f32>().unwrap());
        let max_diff = f.iter().zip(r).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let quant_err = f.iter().zip(fl).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        eprintln!("{arch:?}: int8 vs fake-quant max diff {max_diff:.2e}; fake-quant vs float {quant_err:.2e}");
        assert!(max_diff <= 1e-4, "{max_diff}");
        assert!(quant_err > 0.0, "fake quantization changed nothing");
    }
}
