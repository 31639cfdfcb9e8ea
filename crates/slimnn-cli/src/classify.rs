//! `slimnn classify`: ImageNet image classification (EfficientNet-Lite0 from its PyTorch
//! checkpoint, or an ONNX model taking the same input), and the real-image batches that
//! `slimnn bench` feeds image models.
//!
//! Preprocessing is the TF EfficientNet eval pipeline the checkpoint was trained with (as
//! `scripts/efficientnet_onnx.py` does it with Pillow): centre crop of `224/256` of the
//! shorter side, bicubic (Catmull-Rom, antialiased) resize to the model's square input side,
//! then `(x - 127) / 128` on RGB 0..255, NCHW f32. JPEG and PNG decode through `image`.

use anyhow::{bail, Context, Result};
use image::imageops::{self, FilterType};
use image::RgbImage;
use slimnn_formats::efficientnet::{self, CROP_PADDING, IMAGE_SIZE, MEAN, STD};
use slimnn_ir::Graph;
use slimnn_runtime::{Runnable, RuntimeConfig};
use slimnn_tensor::{DType, Dim, Tensor};
use std::path::{Path, PathBuf};

/// The 1,000 ImageNet-1k class names, one per line in class-id order (from the Apache-2.0
/// npm package `@tensorflow-models/mobilenet` 2.1.1, `dist/imagenet_classes.js`).
const IMAGENET_CLASSES: &str = include_str!("../data/imagenet_classes.txt");

/// Photos in `assets/images` that `slimnn bench` cycles through to fill an image batch.
pub const BENCH_IMAGES: [&str; 2] = ["china.jpg", "flower.jpg"];

/// ImageNet class names indexed by class id.
pub fn imagenet_labels() -> Vec<&'static str> {
    IMAGENET_CLASSES.lines().collect()
}

/// Decodes a JPEG or PNG file to 8-bit RGB. The format comes from the bytes, not the name.
pub fn load_image(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let format = match image::guess_format(&bytes) {
        Ok(f @ (image::ImageFormat::Jpeg | image::ImageFormat::Png)) => f,
        Ok(other) => bail!("{}: {other:?} images are not supported (JPEG or PNG expected)", path.display()),
        Err(_) => bail!("{}: not an image (JPEG or PNG expected)", path.display()),
    };
    let img = image::load_from_memory_with_format(&bytes, format)
        .with_context(|| format!("{}: cannot decode the {format:?} image", path.display()))?;
    Ok(img.to_rgb8())
}

/// Centre crop + bicubic resize to `side` x `side` + `(x - 127) / 128`: f32 `[3, side, side]`.
pub fn preprocess(img: &RgbImage, side: usize) -> Result<Vec<f32>> {
    let (w, h) = img.dimensions();
    let shorter = w.min(h) as usize;
    // int(224 / 256 * shorter): 0.875 is exact in binary, so this floors as Python does.
    let crop = (IMAGE_SIZE * shorter / (IMAGE_SIZE + CROP_PADDING)) as u32;
    if crop == 0 {
        bail!("image of {w}x{h} pixels is too small to crop");
    }
    let side32 = u32::try_from(side).context("model input side too large")?;
    let (left, top) = ((w - crop).div_ceil(2), (h - crop).div_ceil(2));
    let cropped = imageops::crop_imm(img, left, top, crop, crop).to_image();
    let resized = imageops::resize(&cropped, side32, side32, FilterType::CatmullRom);
    let plane = side * side;
    let mut out = vec![0f32; 3 * plane];
    for (i, px) in resized.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = (px[c] as f32 - MEAN) / STD;
        }
    }
    Ok(out)
}

/// Preprocessed images stacked as f32 `[n, 3, side, side]`.
pub fn image_batch(images: &[RgbImage], side: usize) -> Result<Tensor> {
    let mut data = Vec::with_capacity(images.len() * 3 * side * side);
    for img in images {
        data.extend(preprocess(img, side)?);
    }
    Ok(Tensor::from_vec(vec![images.len(), 3, side, side], data)?)
}

/// The square input side of an image model: its single input is f32 `[N, 3, S, S]`, and its
/// metadata says image classification or (for ONNX files without it) the shape alone fits.
pub fn image_input_side(g: &Graph) -> Option<usize> {
    if g.inputs().len() != 1 {
        return None;
    }
    let f = g.input_fact(0);
    match (f.dtype, f.shape.as_slice()) {
        (DType::F32, [_, Dim::Known(3), Dim::Known(h), Dim::Known(w)]) if h == w => Some(*h),
        _ => None,
    }
}

/// True if `g` says it is an image classifier, or looks like one (`[N, 3, S, S]` f32 input).
pub fn is_image_model(g: &Graph) -> bool {
    let tagged = g.metadata.get(efficientnet::META_TASK).is_some_and(|t| t == efficientnet::TASK_IMAGE_CLASSIFICATION);
    image_input_side(g).is_some() && (tagged || g.outputs().len() == 1)
}

/// For `slimnn bench`: a batch of real photos from `images_dir` (china, flower, china, ...) if
/// `g` is an image model, else `None`.
pub fn bench_batch(g: &Graph, images_dir: &Path, batch: usize) -> Result<Option<(String, Tensor)>> {
    if !is_image_model(g) {
        return Ok(None);
    }
    let side = image_input_side(g).context("image model without a square input")?;
    let photos: Vec<RgbImage> = BENCH_IMAGES
        .iter()
        .map(|name| {
            load_image(&images_dir.join(name))
                .context("bench images come from assets/images (run scripts/fetch-assets.sh)")
        })
        .collect::<Result<_>>()?;
    let chosen: Vec<RgbImage> = (0..batch).map(|i| photos[i % photos.len()].clone()).collect();
    Ok(Some((g.input_name(0).to_string(), image_batch(&chosen, side)?)))
}

/// One ranked class.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Prediction {
    pub class: usize,
    pub label: String,
    pub probability: f64,
    pub logit: f32,
}

/// An image classifier on the optimised runtime.
pub struct Classifier {
    pub graph: Graph,
    runnable: Runnable,
    side: usize,
    labels: Vec<&'static str>,
}

impl Classifier {
    /// Loads a model (`.pth` / `.pt` checkpoint or `.onnx`) and checks it takes images.
    pub fn load(model: &Path, threads: usize) -> Result<Classifier> {
        let graph = crate::model::load(model)?;
        let side = image_input_side(&graph).with_context(|| {
            format!("{}: not an image model (expected one f32 input of shape [N, 3, S, S])", model.display())
        })?;
        if graph.outputs().len() != 1 {
            bail!(
                "{}: an image classifier has one output (logits), this model has {}",
                model.display(),
                graph.outputs().len()
            );
        }
        let runnable = Runnable::new(graph.clone(), RuntimeConfig::with_threads(threads))?;
        Ok(Classifier { graph, runnable, side, labels: imagenet_labels() })
    }

    /// Logits `[n, classes]` for preprocessed images.
    pub fn logits(&self, images: &[RgbImage]) -> Result<Tensor> {
        let x = image_batch(images, self.side)?;
        let name = self.graph.input_name(0).to_string();
        let mut out = self.runnable.run(&mut self.runnable.new_state(), vec![(name, x)])?;
        let logits = out.pop().context("model produced no output")?;
        if logits.rank() != 2 || logits.shape()[0] != images.len() {
            bail!("model output has shape {:?}, expected [{}, classes]", logits.shape(), images.len());
        }
        Ok(logits.cast(DType::F32)?)
    }

    /// The `top` best classes of each image file, best first.
    pub fn classify(&self, paths: &[PathBuf], top: usize) -> Result<Vec<Vec<Prediction>>> {
        let images: Vec<RgbImage> = paths.iter().map(|p| load_image(p)).collect::<Result<_>>()?;
        let logits = self.logits(&images)?;
        let classes = logits.shape()[1];
        let z = logits.as_slice::<f32>()?;
        Ok(z.chunks(classes).map(|row| rank(row, top, &self.labels)).collect())
    }
}

/// `slimnn classify`: prints the `top` classes of each image (or JSON with `json`).
pub fn classify_cli(model: &Path, images: &[PathBuf], top: usize, threads: usize, json: bool) -> Result<()> {
    if top == 0 {
        bail!("--top must be at least 1");
    }
    let classifier = Classifier::load(model, threads)?;
    let results = classifier.classify(images, top)?;
    if json {
        let v: Vec<serde_json::Value> = images
            .iter()
            .zip(&results)
            .map(|(p, r)| serde_json::json!({ "image": p.display().to_string(), "top": r }))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    for (path, preds) in images.iter().zip(&results) {
        println!("{}", path.display());
        for (i, p) in preds.iter().enumerate() {
            println!("  {}. {:>4} {:<32} {:.4}  (logit {:.3})", i + 1, p.class, p.label, p.probability, p.logit);
        }
    }
    Ok(())
}

/// Softmax (in f64) and the `top` best classes of one row of logits.
pub fn rank(logits: &[f32], top: usize, labels: &[&str]) -> Vec<Prediction> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let exp: Vec<f64> = logits.iter().map(|&z| (z as f64 - max).exp()).collect();
    let sum: f64 = exp.iter().sum();
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    idx.into_iter()
        .take(top)
        .map(|i| Prediction {
            class: i,
            // Labels only apply to 1000-class outputs.
            label: if logits.len() == labels.len() { labels[i].to_string() } else { format!("class {i}") },
            probability: exp[i] / sum,
            logit: logits[i],
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_imagenet_1k() {
        let l = imagenet_labels();
        assert_eq!(l.len(), 1000);
        assert_eq!(l[0], "tench, Tinca tinca");
        assert_eq!(l[698], "palace");
        assert_eq!(l[985], "daisy");
    }

    #[test]
    fn preprocess_crops_the_centre_and_normalises() {
        // 256x320 image: the centre 224x224 crop is already the model size, so values pass
        // through unchanged: a pixel keeps its value, normalised.
        let img = RgbImage::from_fn(320, 256, |x, y| image::Rgb([(x % 256) as u8, (y % 256) as u8, 127]));
        let v = preprocess(&img, 224).unwrap();
        assert_eq!(v.len(), 3 * 224 * 224);
        // left = (320 - 224) / 2 = 48, top = 16.
        assert_eq!(v[0], (48.0 - 127.0) / 128.0);
        assert_eq!(v[224 * 224], (16.0 - 127.0) / 128.0);
        assert_eq!(v[2 * 224 * 224 + 5], 0.0);
        assert!(preprocess(&RgbImage::new(1, 1), 224).is_err());
    }

    #[test]
    fn ranking() {
        let labels = imagenet_labels();
        let mut z = vec![0f32; 1000];
        z[698] = 3.0;
        z[985] = 2.0;
        let r = rank(&z, 2, &labels);
        assert_eq!((r[0].class, r[0].label.as_str()), (698, "palace"));
        assert_eq!(r[1].class, 985);
        assert!(r[0].probability > r[1].probability);
        assert_eq!(rank(&[1.0, 2.0], 1, &labels)[0].label, "class 1");
    }
}
