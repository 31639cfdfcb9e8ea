//! The optimised runtime against the reference evaluator on the real EfficientNet-Lite0
//! (differential): BatchNorm folded into the convs, every Conv on a fast kernel.

mod common;

use common::*;
use slimnn_formats::{npy, onnx};
use slimnn_runtime::{Runnable, RuntimeConfig};
use std::process::Command;

/// (image stem, ImageNet class) the photos must be classified as.
const IMAGES: [(&str, usize); 2] = [("china", 698), ("flower", 985)];

fn argmax(z: &[f32]) -> usize {
    (0..z.len()).max_by(|&a, &b| z[a].total_cmp(&z[b])).unwrap()
}

#[test]
fn runtime_matches_reference_on_efficientnet_lite0() {
    let work = temp_dir("runtime-efficientnet");
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
