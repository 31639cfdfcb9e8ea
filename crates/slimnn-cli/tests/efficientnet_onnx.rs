//! EfficientNet-Lite0 end to end: `scripts/efficientnet_onnx.py` builds the ONNX graph from the
//! legacy PyTorch checkpoint (BatchNorm kept as its own node); slimnn imports it, its reference
//! evaluator classifies two real photos as ONNX Runtime does, the export round trips, and
//! `slimnn inspect` reports the model.

mod common;

use common::*;
use slimnn_formats::{npy, onnx};
use slimnn_tensor::Tensor;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// Logit tolerance against ONNX Runtime. Measured 4.9e-6 on logits of magnitude ~7 (x86-64,
/// ORT 1.31 with one thread); the 20x margin covers other CPUs' summation orders.
const LOGIT_ATOL: f64 = 1e-4;

/// (image stem, ImageNet class, label) the photos must be classified as.
const IMAGES: [(&str, usize, &str); 2] = [("china", 698, "palace"), ("flower", 985, "daisy")];

/// Runs the builder script once; returns the model and the preprocessed image folder.
fn build(work: &Path) -> (PathBuf, PathBuf) {
    let model = work.join("efficientnet-lite0.onnx");
    let npy_dir = work.join("images");
    let mut cmd = Command::new(python());
    cmd.arg(repo_root().join("scripts/efficientnet_onnx.py"))
        .arg(asset("efficientnet-lite0/efficientnet-lite0-57934424.pth"))
        .arg(&model)
        .arg("--npy-dir")
        .arg(&npy_dir)
        .arg("--images");
    for (stem, _, _) in IMAGES {
        cmd.arg(asset(&format!("images/{stem}.jpg")));
    }
    let out = cmd.output().expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "efficientnet_onnx.py failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    eprint!("{stdout}");
    (model, npy_dir)
}

fn softmax(logits: &[f32]) -> Vec<f64> {
    let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let e: Vec<f64> = logits.iter().map(|&z| (z as f64 - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

/// The five best classes as (class, probability, logit), best first.
fn top5(logits: &Tensor) -> Vec<(usize, f64, f32)> {
    let z = logits.as_slice::<f32>().unwrap();
    let p = softmax(z);
    let mut idx: Vec<usize> = (0..z.len()).collect();
    idx.sort_by(|&a, &b| z[b].total_cmp(&z[a]));
    idx.into_iter().take(5).map(|i| (i, p[i], z[i])).collect()
}

fn show(t: &[(usize, f64, f32)]) -> String {
    t.iter().map(|(i, p, z)| format!("{i} ({p:.4}, logit {z:.3})")).collect::<Vec<_>>().join(", ")
}

#[test]
fn efficientnet_lite0_classifies_like_onnxruntime_and_round_trips() {
    let work = temp_dir("efficientnet");
    let (model, npy_dir) = build(&work);
    let g = onnx::load(&model).unwrap();
    let hist = g.op_histogram();
    // BatchNorm stays a node of its own: slimnn must run it, not a folded conv bias.
    assert_eq!(hist.get("BatchNormalization"), Some(&49), "{hist:?}");
    assert_eq!(hist.get("Conv"), Some(&49), "{hist:?}");

    // Round trip: save the imported graph, import it again.
    let again_path = work.join("again.onnx");
    onnx::save(&g, &again_path).unwrap();
    let back = onnx::load(&again_path).unwrap();
    assert_eq!(g.op_histogram(), back.op_histogram());
    assert_eq!(g.parameter_count(), back.parameter_count());

    let mut worst = 0f64;
    for (stem, class, label) in IMAGES {
        let x = npy::read(&npy_dir.join(format!("{stem}.npy"))).unwrap();
        assert_eq!(x.shape(), &[1, 3, 224, 224]);
        let inputs = vec![("input".to_string(), x)];
        let t0 = Instant::now();
        let ours = g.eval(inputs.clone()).unwrap();
        let secs = t0.elapsed().as_secs_f64();
        let logits = &ours[0];
        assert_eq!(logits.shape(), &[1, 1000]);
        let t = top5(logits);
        eprintln!("slimnn {stem}: {} [{secs:.2} s]", show(&t));
        assert_eq!(t[0].0, class, "{stem} should be {class} ({label})");

        let again = back.eval(inputs.clone()).unwrap();
        assert_eq!(ours, again, "{stem}: re-imported model gives different outputs");

        let ort = ort_run(&model, &inputs, &work.join(stem));
        let (_, r) = ort.iter().find(|(n, _)| n == "logits").expect("ORT wrote logits");
        let tr = top5(r);
        eprintln!("ORT    {stem}: {}", show(&tr));
        assert_eq!(tr.iter().map(|v| v.0).collect::<Vec<_>>(), t.iter().map(|v| v.0).collect::<Vec<_>>());
        let d = logits.max_abs_diff(r).expect("same shape");
        worst = worst.max(d);
        assert!(d <= LOGIT_ATOL, "{stem}: max abs logit diff {d:e} > {LOGIT_ATOL:e}");
    }
    eprintln!("EfficientNet-Lite0 vs ONNX Runtime: max abs logit diff {worst:e}");
}

#[test]
fn slimnn_inspect_reports_efficientnet_lite0() {
    let work = temp_dir("efficientnet-inspect");
    let model = work.join("efficientnet-lite0.onnx");
    let out = Command::new(python())
        .arg(repo_root().join("scripts/efficientnet_onnx.py"))
        .arg(asset("efficientnet-lite0/efficientnet-lite0-57934424.pth"))
        .arg(&model)
        .output()
        .expect("python runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new(env!("CARGO_BIN_EXE_slimnn")).arg("inspect").arg(&model).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "slimnn inspect failed: {}", String::from_utf8_lossy(&out.stderr));
    eprint!("{text}");
    let millions: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("parameters: "))
        .and_then(|l| l.split_once('(')?.1.strip_suffix(" M)")?.parse().ok())
        .unwrap_or_else(|| panic!("no parameter line in:\n{text}"));
    assert!((4.6..=4.7).contains(&millions), "parameters {millions} M");
    for op in ["Conv", "BatchNormalization", "Clip", "Add", "GlobalAveragePool", "Gemm"] {
        assert!(text.lines().any(|l| l.split_whitespace().next() == Some(op)), "no {op} in the histogram:\n{text}");
    }
}
