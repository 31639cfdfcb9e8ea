//! The optimised runtime against the reference evaluator on the real EfficientNet-Lite0
//! (differential): BatchNorm folded into the convs, every Conv on a fast kernel. Also ONNX
//! Runtime's own static int8 quantization of it (QDQ and QOperator) against ONNX Runtime.

mod common;

use common::*;
use slimnn_formats::{npy, onnx};
use slimnn_runtime::{Runnable, RuntimeConfig};
use slimnn_tensor::Tensor;
use std::path::{Path, PathBuf};
use std::process::Command;

/// (image stem, ImageNet class) the photos must be classified as.
const IMAGES: [(&str, usize); 2] = [("china", 698), ("flower", 985)];

fn argmax(z: &[f32]) -> usize {
    (0..z.len()).max_by(|&a, &b| z[a].total_cmp(&z[b])).unwrap()
}

/// Builds the fp32 ONNX model and the preprocessed photos; returns (model, image folder).
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
    for (stem, _) in IMAGES {
        cmd.arg(asset(&format!("images/{stem}.jpg")));
    }
    let out = cmd.output().expect("python runs");
    assert!(out.status.success(), "efficientnet_onnx.py failed: {}", String::from_utf8_lossy(&out.stderr));
    (model, npy_dir)
}

#[test]
fn runtime_matches_reference_on_efficientnet_lite0() {
    let work = temp_dir("runtime-efficientnet");
    let (model, npy_dir) = build(&work);
    let g = onnx::load(&model).unwrap();

    for threads in [1, 2] {
        let rt = Runnable::new(g.clone(), RuntimeConfig::with_threads(threads)).unwrap();
        let folded = rt.report().passes.iter().find(|(p, _)| p == "fold-conv-batchnorm").map(|(_, n)| *n);
        assert_eq!(folded, Some(49), "{:?}", rt.report());
        let mut state = rt.new_state();
        for (stem, class) in IMAGES {
            let x = npy::read(&npy_dir.join(format!("{stem}.npy"))).unwrap();
            let inputs = vec![("input".to_string(), x)];
            let reference = g.eval(inputs.clone()).unwrap();
            let fast = rt.run(&mut state, inputs).unwrap();
            let d = reference[0].max_abs_diff(&fast[0]).unwrap();
            eprintln!("threads {threads} {stem}: max abs logit diff {d:e}");
            assert!(d <= 1e-4, "{stem}: max abs logit diff {d:e}");
            assert_eq!(argmax(fast[0].as_slice::<f32>().unwrap()), class, "{stem}");
        }
        let summary = rt.plan_for(&[vec![1, 3, 224, 224]]).unwrap().summary();
        eprintln!("{:#?}", summary.kernels);
        assert!(
            !summary.kernels.keys().any(|k| k == "ref:Conv" || k == "ref:BatchNormalization"),
            "{:#?}",
            summary.kernels
        );
        let convs: usize = summary.kernels.iter().filter(|(k, _)| k.starts_with("conv")).map(|(_, n)| n).sum();
        assert_eq!(convs, 49, "{:#?}", summary.kernels);
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

/// ONNX Runtime's `quantize_static` of EfficientNet-Lite0 with its default op types, in both
/// formats: QDQ (each `Q(Conv(DQ, DQ, DQ))` read as a `QLinearConv`) and QOperator
/// (`QLinearConv` and the `com.microsoft` `QLinearAdd`, `QLinearGlobalAveragePool` and `QGemm`
/// ONNX Runtime writes). Convolutions run on the integer GEMM (VNNI hosts; depthwise ones, and
/// all elsewhere, exactly on the f32 convolution kernels). Both must classify the photos as
/// ONNX Runtime does on the same file, with logits close to ONNX Runtime's (identical in the
/// runs measured here).
#[test]
fn onnxruntime_quantized_efficientnet_runs_like_onnxruntime() {
    let work = temp_dir("ortq-efficientnet");
    let (model, npy_dir) = build(&work);
    // Calibration: each photo as is, mirrored, and shifted (8 sets of one image).
    let calib = work.join("calib");
    let mut sets = 0;
    for (stem, _) in IMAGES {
        let x = npy::read(&npy_dir.join(format!("{stem}.npy"))).unwrap();
        let v = x.as_slice::<f32>().unwrap();
        let (h, w) = (224, 224);
        let variant = |f: &dyn Fn(usize, usize, usize) -> f32| -> Vec<f32> {
            (0..3 * h * w).map(|i| f(i / (h * w), i / w % h, i % w)).collect()
        };
        let at = |c: usize, y: usize, x: usize| v[(c * h + y) * w + x];
        for data in [
            v.to_vec(),
            variant(&|c, y, x| at(c, y, w - 1 - x)),
            variant(&|c, y, x| at(c, y, (x + 16) % w)),
            variant(&|c, y, x| at(c, (y + h - 16) % h, x)),
        ] {
            let dir = calib.join(sets.to_string());
            std::fs::create_dir_all(&dir).unwrap();
            npy::write(&dir.join("input.npy"), &Tensor::from_vec(vec![1, 3, h, w], data).unwrap()).unwrap();
            sets += 1;
        }
    }
    let out_dir = work.join("ortq");
    let out = Command::new(python())
        .arg(repo_root().join("scripts/quantize_ort.py"))
        .arg(&model)
        .arg(&out_dir)
        .arg("--calibration")
        .arg(&calib)
        .arg("--op-types")
        .arg("")
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "quantize_ort.py failed: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    eprint!("{stdout}");
    assert!(stdout.contains("QLinearConv=49") && stdout.contains("com.microsoft.QLinearAdd=9"), "{stdout}");

    for (file, min_cosine) in [("static_qdq.onnx", 0.9999), ("static_qoperator.onnx", 0.9999)] {
        let path = out_dir.join(file);
        let g = onnx::load(&path).unwrap();
        let rt = Runnable::new(g, RuntimeConfig::with_threads(2)).unwrap();
        let summary = rt.plan_for(&[vec![1, 3, 224, 224]]).unwrap().summary();
        eprintln!("{file}: {:?}", summary.kernels);
        if file == "static_qdq.onnx" {
            // Every `Q(Conv(DQ, DQ, DQ))` read as the QLinearConv it stands for.
            let fused = rt.report().passes.iter().find(|(p, _)| p == "fuse-qdq-conv").map(|(_, n)| *n);
            assert_eq!(fused, Some(49), "{:?}", rt.report().passes);
        }
        // Every QLinearConv on the integer GEMM (VNNI hosts) or exact on the f32 convolution
        // kernels; depthwise ones always on the latter.
        let convs: usize = summary.kernels.iter().filter(|(k, _)| k.starts_with("qlinear_conv")).map(|(_, n)| n).sum();
        assert_eq!(convs, 49, "{:#?}", summary.kernels);
        if slimnn_kernels::qgemm::wx::wx_kernel().is_some() {
            let int8: usize = summary.kernels.iter().filter(|(k, _)| k.ends_with("_int8")).map(|(_, n)| n).sum();
            assert_eq!(int8, 33, "{:#?}", summary.kernels);
        }
        let mut state = rt.new_state();
        for (stem, class) in IMAGES {
            let x = npy::read(&npy_dir.join(format!("{stem}.npy"))).unwrap();
            let inputs = vec![("input".to_string(), x)];
            let ours = rt.run(&mut state, inputs.clone()).unwrap();
            let ort = ort_run(&path, &inputs, &work.join(format!("{file}-{stem}")));
            let (_, theirs) = ort.iter().find(|(n, _)| n == "logits").expect("ORT wrote logits");
            let (a, b) = (ours[0].as_slice::<f32>().unwrap(), theirs.as_slice::<f32>().unwrap());
            let (cos, d) = (cosine(a, b), ours[0].max_abs_diff(theirs).unwrap());
            eprintln!("{file} {stem}: cosine to ONNX Runtime {cos:.6}, max abs logit diff {d:e}");
            assert_eq!(argmax(a), class, "{file} {stem}");
            assert_eq!(argmax(b), class, "{file} {stem} (ONNX Runtime)");
            assert!(cos >= min_cosine, "{file} {stem}: cosine {cos}");
        }
    }
}
