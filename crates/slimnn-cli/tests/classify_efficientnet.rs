//! EfficientNet-Lite0 from its PyTorch checkpoint, built into the IR by slimnn (no Python in
//! the model path): the photos are classified as ImageNet says, the ONNX slimnn exports runs
//! in ONNX Runtime to the same logits, the graph agrees with `scripts/efficientnet_onnx.py`'s
//! reference model, and `slimnn classify` handles bad input with one-line errors.

mod common;

use common::*;
use slimnn_cli::classify::{self, Classifier};
use slimnn_formats::{efficientnet, npy, onnx, torch};
use slimnn_runtime::{Runnable, RuntimeConfig};
use std::path::PathBuf;
use std::process::Command;

/// Logit tolerance between slimnn and ONNX Runtime (logits are of magnitude ~7).
const LOGIT_ATOL: f64 = 1e-4;

/// (image, ImageNet class, label) the photos must be classified as.
const IMAGES: [(&str, usize, &str); 2] = [("china", 698, "palace"), ("flower", 985, "daisy")];

fn pth() -> PathBuf {
    asset("efficientnet-lite0/efficientnet-lite0-57934424.pth")
}

fn photos() -> Vec<PathBuf> {
    IMAGES.iter().map(|(stem, _, _)| asset(&format!("images/{stem}.jpg"))).collect()
}

#[test]
fn pth_classifies_the_photos() {
    let c = Classifier::load(&pth(), 2).unwrap();
    let results = c.classify(&photos(), 5).unwrap();
    for ((stem, class, label), preds) in IMAGES.iter().zip(&results) {
        let shown: Vec<String> =
            preds.iter().map(|p| format!("{} {} {:.4} ({:.3})", p.class, p.label, p.probability, p.logit)).collect();
        eprintln!("{stem}: {}", shown.join(", "));
        assert_eq!((preds[0].class, preds[0].label.as_str()), (*class, *label), "{stem}");
    }
}

/// The IR graph exported to ONNX, run by ONNX Runtime, against slimnn's runtime and its
/// reference evaluator on the same batch of both photos.
#[test]
fn exported_onnx_matches_onnxruntime() {
    let work = temp_dir("classify-efficientnet-ort");
    let g = efficientnet::load(&pth()).unwrap();
    let hist = g.op_histogram();
    assert_eq!(hist.get("Conv"), Some(&49), "{hist:?}");
    assert_eq!(hist.get("BatchNormalization"), Some(&49), "{hist:?}");
    let model = work.join("efficientnet-lite0.onnx");
    onnx::save(&g, &model).unwrap();
    let reloaded = onnx::load(&model).unwrap();
    assert_eq!(reloaded.metadata.get(efficientnet::META_TASK).map(String::as_str), Some("image-classification"));

    let images: Vec<_> = photos().iter().map(|p| classify::load_image(p).unwrap()).collect();
    let x = classify::image_batch(&images, 224).unwrap();
    let inputs = vec![("input".to_string(), x)];
    let ort = ort_run(&model, &inputs, &work);
    let ort_logits = &ort.iter().find(|(n, _)| n == "logits").expect("ORT wrote logits").1;
    for threads in [1, 2] {
        let rt = Runnable::new(g.clone(), RuntimeConfig::with_threads(threads)).unwrap();
        let fast = rt.run(&mut rt.new_state(), inputs.clone()).unwrap();
        let d = fast[0].max_abs_diff(ort_logits).unwrap();
        eprintln!("threads {threads}: max abs logit diff slimnn runtime vs ORT on slimnn's ONNX: {d:e}");
        assert!(d <= LOGIT_ATOL, "threads {threads}: {d:e}");
    }
    let reference = g.eval(inputs).unwrap();
    let d = reference[0].max_abs_diff(ort_logits).unwrap();
    eprintln!("max abs logit diff slimnn reference evaluator vs ORT: {d:e}");
    assert!(d <= LOGIT_ATOL, "{d:e}");
}

/// slimnn's Rust preprocessing against the Python one (Pillow), and slimnn's graph against the
/// reference ONNX of `scripts/efficientnet_onnx.py` run by ONNX Runtime on Pillow's inputs.
#[test]
fn agrees_with_the_python_reference() {
    let work = temp_dir("classify-efficientnet-ref");
    let reference_model = work.join("reference.onnx");
    let npy_dir = work.join("npy");
    let out = Command::new(python())
        .arg(repo_root().join("scripts/efficientnet_onnx.py"))
        .arg(pth())
        .arg(&reference_model)
        .arg("--npy-dir")
        .arg(&npy_dir)
        .arg("--images")
        .args(photos())
        .output()
        .unwrap();
    assert!(out.status.success(), "efficientnet_onnx.py: {}", String::from_utf8_lossy(&out.stderr));
    let g = efficientnet::load(&pth()).unwrap();
    let rt = Runnable::new(g, RuntimeConfig::with_threads(1)).unwrap();
    for (stem, class, _) in IMAGES {
        let pillow = npy::read(&npy_dir.join(format!("{stem}.npy"))).unwrap();
        let img = classify::load_image(&asset(&format!("images/{stem}.jpg"))).unwrap();
        let ours = classify::image_batch(&[img], 224).unwrap();
        // Decoders (libjpeg vs zune-jpeg) and resampler rounding differ by a few levels.
        let pixel_diff = ours.max_abs_diff(&pillow).unwrap() * 128.0;
        let mean_diff = ours
            .as_slice::<f32>()
            .unwrap()
            .iter()
            .zip(pillow.as_slice::<f32>().unwrap())
            .map(|(a, b)| ((a - b) * 128.0).abs() as f64)
            .sum::<f64>()
            / ours.len() as f64;
        eprintln!("{stem}: preprocessing vs Pillow: max {pixel_diff:.0} levels, mean {mean_diff:.3} levels");
        assert!(mean_diff < 2.0, "{stem}: mean pixel difference {mean_diff}");

        let inputs = vec![("input".to_string(), pillow)];
        let ort = ort_run(&reference_model, &inputs, &work.join(stem));
        let ours = rt.run(&mut rt.new_state(), inputs).unwrap();
        let d = ours[0].max_abs_diff(&ort[0].1).unwrap();
        eprintln!("{stem}: slimnn (from .pth) vs ORT on the reference ONNX, same input: {d:e}");
        assert!(d <= LOGIT_ATOL, "{stem}: {d:e}");
        let z = ours[0].as_slice::<f32>().unwrap();
        let top = (0..z.len()).max_by(|&a, &b| z[a].total_cmp(&z[b])).unwrap();
        assert_eq!(top, class, "{stem}");
    }
}

#[test]
fn bench_batch_repeats_the_photos() {
    let g = efficientnet::load(&pth()).unwrap();
    assert!(classify::is_image_model(&g));
    let (name, t) = classify::bench_batch(&g, &asset("images"), 3).unwrap().unwrap();
    assert_eq!(name, "input");
    assert_eq!(t.shape(), &[3, 3, 224, 224]);
    let v = t.as_slice::<f32>().unwrap();
    let per = 3 * 224 * 224;
    assert_eq!(&v[..per], &v[2 * per..]);
    assert_ne!(&v[..per], &v[per..2 * per]);
}

fn slimnn(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_slimnn")).args(args).output().unwrap()
}

/// Runs slimnn, expects failure, returns the single stderr line.
fn fails(args: &[&str]) -> String {
    let out = slimnn(args);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "slimnn {args:?} should fail; stderr: {err}");
    assert!(!err.contains("panicked"), "slimnn {args:?} panicked: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line expected: {err}");
    err
}

#[test]
fn classify_cli() {
    let pth = pth();
    let photos = photos();
    let out = slimnn(&[
        "classify",
        pth.to_str().unwrap(),
        photos[0].to_str().unwrap(),
        photos[1].to_str().unwrap(),
        "--top",
        "3",
        "--threads",
        "1",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    eprint!("{stdout}");
    assert!(stdout.contains("1.  698 palace"), "{stdout}");
    assert!(stdout.contains("1.  985 daisy"), "{stdout}");
    assert_eq!(stdout.lines().count(), 2 * 4);
}

#[test]
fn classify_bad_input() {
    let work = temp_dir("classify-bad-input");
    let pth = pth();
    let pth_s = pth.to_str().unwrap();
    let photo = photos()[0].clone();
    let photo_s = photo.to_str().unwrap();

    // An image that is not an image.
    let not_image = work.join("notes.jpg");
    std::fs::write(&not_image, "these are words, not pixels\n").unwrap();
    let e = fails(&["classify", pth_s, not_image.to_str().unwrap()]);
    assert!(e.contains("notes.jpg") && e.contains("not an image"), "{e}");
    // A JPEG cut in half.
    let jpeg = std::fs::read(&photo).unwrap();
    let half = work.join("half.jpg");
    std::fs::write(&half, &jpeg[..jpeg.len() / 2]).unwrap();
    let out = slimnn(&["classify", pth_s, half.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    if !out.status.success() {
        assert!(err.contains("half.jpg"), "{err}");
    }
    // A missing image.
    let e = fails(&["classify", pth_s, work.join("absent.png").to_str().unwrap()]);
    assert!(e.contains("absent.png"), "{e}");

    // A truncated checkpoint.
    let bytes = std::fs::read(&pth).unwrap();
    let truncated = work.join("truncated.pth");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let e = fails(&["classify", truncated.to_str().unwrap(), photo_s]);
    assert!(e.contains("truncated.pth") && e.contains("truncated"), "{e}");
    // A pickle that is not a state_dict (a pickled call to builtins.eval).
    let evil = repo_root().join("crates/slimnn-formats/tests/data/torch/bad_global.pt");
    let e = fails(&["classify", evil.to_str().unwrap(), photo_s]);
    assert!(e.contains("bad_global.pt") && e.contains("not a state_dict: global __builtin__.eval"), "{e}");
    // A state_dict, but not of an EfficientNet.
    let other = repo_root().join("crates/slimnn-formats/tests/data/torch/state_dict_zip.pt");
    let e = fails(&["classify", other.to_str().unwrap(), photo_s]);
    assert!(e.contains("not an efficientnet_pytorch state_dict"), "{e}");
    assert!(torch::load(&other).is_ok());
    let e = fails(&["classify", pth_s, photo_s, "--top", "0"]);
    assert!(e.contains("--top"), "{e}");
}

#[test]
fn flat_grey_png_runs() {
    // A PNG made here (flat grey) goes through decode, crop and resize.
    let work = temp_dir("classify-png");
    let png = work.join("grey.png");
    image::RgbImage::from_pixel(300, 200, image::Rgb([127, 127, 127])).save(&png).unwrap();
    let c = Classifier::load(&pth(), 1).unwrap();
    let r = c.classify(&[png], 1).unwrap();
    assert_eq!(r[0].len(), 1);
    let x = classify::image_batch(&[classify::load_image(&work.join("grey.png")).unwrap()], 224).unwrap();
    assert!(x.as_slice::<f32>().unwrap().iter().all(|&v| v == 0.0));
}
