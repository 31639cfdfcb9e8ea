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
        // A fused pointwise + depthwise step ("conv1x1..>conv_depthwise..") runs two convs.
        let convs: usize = summary
            .kernels
            .iter()
            .filter(|(k, _)| k.starts_with("conv"))
            .map(|(k, n)| n * (1 + k.matches(">conv").count()))
            .sum();
        assert_eq!(convs, 49, "{:#?}", summary.kernels);
        // The first block's 4.8 MB expansion runs fused with its depthwise conv.
        let fused: usize = summary.kernels.iter().filter(|(k, _)| k.contains(">conv_depthwise")).map(|(_, n)| n).sum();
        assert_eq!(fused, 1, "{:#?}", summary.kernels);
    }
}

/// `[1, 3, 224, 224]` variants of each photo: (rows down, columns right, mirrored).
fn photo_variants(npy_dir: &Path, variants: &[(usize, usize, bool)]) -> Vec<Tensor> {
    let (h, w) = (224, 224);
    let mut out = vec![];
    for (stem, _) in IMAGES {
        let x = npy::read(&npy_dir.join(format!("{stem}.npy"))).unwrap();
        let v = x.as_slice::<f32>().unwrap();
        for &(dy, dx, mirror) in variants {
            let data = (0..3 * h * w)
                .map(|i| {
                    let (c, y, x) = (i / (h * w), i / w % h, i % w);
                    let x = if mirror { w - 1 - x } else { x };
                    v[(c * h + (y + h - dy) % h) * w + (x + w - dx) % w]
                })
                .collect();
            out.push(Tensor::from_vec(vec![1, 3, h, w], data).unwrap());
        }
    }
    out
}

/// Calibration images: each photo as is, mirrored, and shifted (8 sets of one image).
fn calibration_images(npy_dir: &Path) -> Vec<Tensor> {
    photo_variants(npy_dir, &[(0, 0, false), (0, 0, true), (0, 224 - 16, false), (16, 0, false)])
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

/// Convolutions on integer kernels.
fn integer_convs(kernels: &std::collections::BTreeMap<String, usize>) -> usize {
    kernels.iter().filter(|(k, _)| k.starts_with("qlinear_conv") && k.ends_with("_int8")).map(|(_, n)| n).sum()
}

/// EfficientNet-Lite0's convolutions this host runs on integer kernels: the 33 pointwise and
/// stem ones with VNNI, the 16 depthwise ones with VNNI and VBMI.
fn expected_integer_convs() -> usize {
    let gemm = if slimnn_kernels::qgemm::wx::wx_kernel(1).is_some() { 33 } else { 0 };
    let depthwise = if slimnn_kernels::qgemm::dw::dw_kernel_available() { 16 } else { 0 };
    gemm + depthwise
}

/// ONNX Runtime's `quantize_static` of EfficientNet-Lite0 with its default op types, in both
/// formats: QDQ (each `Q(Conv(DQ, DQ, DQ))` read as a `QLinearConv`) and QOperator
/// (`QLinearConv` and the `com.microsoft` `QLinearAdd`, `QLinearGlobalAveragePool` and `QGemm`
/// ONNX Runtime writes). Convolutions run on the integer kernels (VNNI hosts, depthwise ones
/// with VBMI too; the rest exactly on the f32 convolution kernels). Both must classify the photos as
/// ONNX Runtime does on the same file, with logits close to ONNX Runtime's (identical in the
/// runs measured here).
#[test]
fn onnxruntime_quantized_efficientnet_runs_like_onnxruntime() {
    let work = temp_dir("ortq-efficientnet");
    let (model, npy_dir) = build(&work);
    let calib = work.join("calib");
    for (i, x) in calibration_images(&npy_dir).iter().enumerate() {
        let dir = calib.join(i.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        npy::write(&dir.join("input.npy"), x).unwrap();
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
        // Every QLinearConv on the integer kernels (where the host has them) or exact on the
        // f32 convolution kernels.
        let convs: usize = summary.kernels.iter().filter(|(k, _)| k.starts_with("qlinear_conv")).map(|(_, n)| n).sum();
        assert_eq!(convs, 49, "{:#?}", summary.kernels);
        assert_eq!(integer_convs(&summary.kernels), expected_integer_convs(), "{:#?}", summary.kernels);
        photos_as_onnxruntime_runs_them(&rt, &path, &npy_dir, &work, min_cosine);
    }
}

/// Both photos through `rt` and through ONNX Runtime on `path`: each classified right by
/// both, with logits at least `min_cosine` alike.
fn photos_as_onnxruntime_runs_them(rt: &Runnable, path: &Path, npy_dir: &Path, work: &Path, min_cosine: f64) {
    let file = path.file_name().unwrap().to_string_lossy();
    let mut state = rt.new_state();
    for (stem, class) in IMAGES {
        let x = npy::read(&npy_dir.join(format!("{stem}.npy"))).unwrap();
        let inputs = vec![("input".to_string(), x)];
        let ours = rt.run(&mut state, inputs.clone()).unwrap();
        let ort = ort_run(path, &inputs, &work.join(format!("{file}-{stem}")));
        let (_, theirs) = ort.iter().find(|(n, _)| n == "logits").expect("ORT wrote logits");
        let (a, b) = (ours[0].as_slice::<f32>().unwrap(), theirs.as_slice::<f32>().unwrap());
        let (cos, d) = (cosine(a, b), ours[0].max_abs_diff(theirs).unwrap());
        eprintln!("{file} {stem}: cosine to ONNX Runtime {cos:.6}, max abs logit diff {d:e}");
        assert_eq!(argmax(a), class, "{file} {stem}");
        assert_eq!(argmax(b), class, "{file} {stem} (ONNX Runtime)");
        assert!(cos >= min_cosine, "{file} {stem}: cosine {cos}");
    }
}

/// slimnn's own static int8 quantization of EfficientNet-Lite0 (`slimnn quantize --mode static`,
/// min-max calibration on the 8 calibration images): BatchNorm folded, every conv written as
/// `Q(Conv(DQ, DQ, DQ(b_i32)))` with its ReLU6 folded into the u8 range. slimnn runs each conv as
/// an integer `QLinearConv`; ONNX Runtime loads the same file and agrees; on 12 shifted and
/// mirrored photos the calibration never saw, the logits stay close to the fp32 model's.
#[test]
fn slimnn_static_int8_efficientnet_runs_on_integer_kernels_and_in_onnxruntime() {
    use slimnn_compress::pipeline::quantize;
    use slimnn_compress::recipe::{Mode, QuantRecipe};

    let work = temp_dir("slimnn-static-efficientnet");
    let (model, npy_dir) = build(&work);
    let g = onnx::load(&model).unwrap();
    let calib: Vec<Vec<(String, Tensor)>> =
        calibration_images(&npy_dir).into_iter().map(|x| vec![("input".to_string(), x)]).collect();
    let recipe = QuantRecipe { mode: Mode::Static, ..QuantRecipe::default() };
    let (q, report) = quantize(&g, &recipe, &calib, &mut |_| {}).unwrap();
    let convs = report.layers.iter().filter(|l| l.scheme == "int8-qdq-conv").count();
    assert_eq!(convs, 49, "{}", report.table());
    let h = q.op_histogram();
    assert_eq!((h.get("BatchNormalization"), h.get("Clip")), (None, None), "{h:?}");
    let path = work.join("static.onnx");
    onnx::save(&q, &path).unwrap();
    let (fp32_size, int8_size) = (std::fs::metadata(&model).unwrap().len(), std::fs::metadata(&path).unwrap().len());
    eprintln!("int8 file {int8_size} bytes, {:.1}% of fp32", 100.0 * int8_size as f64 / fp32_size as f64);
    assert!(int8_size * 100 <= fp32_size * 27, "int8 file {int8_size} vs fp32 {fp32_size}");

    let q = onnx::load(&path).unwrap();
    let rt = Runnable::new(q, RuntimeConfig::with_threads(2)).unwrap();
    let fused = rt.report().passes.iter().find(|(p, _)| p == "fuse-qdq-conv").map(|(_, n)| *n);
    assert_eq!(fused, Some(49), "{:?}", rt.report().passes);
    let summary = rt.plan_for(&[vec![1, 3, 224, 224]]).unwrap().summary();
    let qconvs: usize = summary.kernels.iter().filter(|(k, _)| k.starts_with("qlinear_conv")).map(|(_, n)| n).sum();
    assert_eq!(qconvs, 49, "{:#?}", summary.kernels);
    assert_eq!(integer_convs(&summary.kernels), expected_integer_convs(), "{:#?}", summary.kernels);
    let fp32 = Runnable::new(g, RuntimeConfig::with_threads(2)).unwrap();
    let (mut state, mut fp32_state) = (rt.new_state(), fp32.new_state());

    // Held-out photos: near the fp32 model.
    let held_out = [(8, 0, false), (0, 216, true), (24, 24, false), (200, 8, true), (4, 194, false), (40, 0, true)];
    let (mut agree, mut worst) = (0, 1f64);
    let variants = photo_variants(&npy_dir, &held_out);
    for x in &variants {
        let inputs = vec![("input".to_string(), x.clone())];
        let ours = rt.run(&mut state, inputs.clone()).unwrap();
        let reference = fp32.run(&mut fp32_state, inputs).unwrap();
        let (a, b) = (ours[0].as_slice::<f32>().unwrap(), reference[0].as_slice::<f32>().unwrap());
        agree += usize::from(argmax(a) == argmax(b));
        worst = worst.min(cosine(a, b));
    }
    eprintln!("held-out photos: top-1 agreement {agree}/{}, worst logit cosine to fp32 {worst:.5}", variants.len());
    assert!(worst >= 0.985 && agree >= variants.len() - 2, "top-1 {agree}/{}, cosine {worst}", variants.len());

    // The photos: classified right, and as ONNX Runtime runs the same file.
    photos_as_onnxruntime_runs_them(&rt, &path, &npy_dir, &work, 0.999);
}
