//! EfficientNet-Lite0 from a PyTorch state_dict (lukemelas `efficientnet_pytorch` names:
//! `_conv_stem`, `_bn0`, `_blocks.N._expand_conv` ..., `_conv_head`, `_bn1`, `_fc`) built
//! into the IR, node for node as `scripts/efficientnet_onnx.py` writes the reference ONNX.
//!
//! The graph is the TF EfficientNet-Lite forward pass: stem 3x3/2 conv to 32 channels, the
//! EfficientNet-B0 stages of mobile inverted bottlenecks without squeeze-excitation (1x1
//! expand, depthwise kxk, 1x1 project; identity skip when stride is 1 and channels match),
//! head 1x1 conv to 1280, global average pool, fully connected to 1000 logits. Every conv is
//! followed by BatchNorm (epsilon 1e-3, running statistics; the runtime folds it into the
//! conv) and, except the projections, ReLU6 (`Clip(x, 0, 6)`). Padding is TF "SAME" computed
//! statically for a 224x224 input, the odd pixel at the end.
//!
//! Input `input`: f32 `[batch, 3, 224, 224]`, RGB already normalised as `(x - 127) / 128`
//! ([`MEAN`], [`STD`]; the caller does this, so the graph matches the reference ONNX). Output
//! `logits`: f32 `[batch, 1000]`. The graph's metadata names the task and preprocessing.

use crate::torch::StateDict;
use crate::{FormatError, Result};
use slimnn_ir::ops::*;
use slimnn_ir::{Fact, Graph, OutletId};
use slimnn_tensor::{DType, Dim, Tensor};
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

/// Side of the square input the checkpoint was trained (and its padding computed) for.
pub const IMAGE_SIZE: usize = 224;
/// Preprocessing: `(pixel - MEAN) / STD` per RGB channel on 0..255 values.
pub const MEAN: f32 = 127.0;
pub const STD: f32 = 128.0;
/// Eval crop: the centre `IMAGE_SIZE / (IMAGE_SIZE + CROP_PADDING)` of the shorter side.
pub const CROP_PADDING: usize = 32;
pub const CLASSES: usize = 1000;
const BN_EPS: f32 = 1e-3;
const STEM: usize = 32;
const HEAD: usize = 1280;

/// Metadata keys the builder sets (and ONNX export keeps as `metadata_props`).
pub const META_TASK: &str = "slimnn.task";
pub const META_PREPROCESS: &str = "slimnn.preprocess";
pub const META_LABELS: &str = "slimnn.labels";
pub const TASK_IMAGE_CLASSIFICATION: &str = "image-classification";
/// `META_PREPROCESS` value: centre crop 224/256 of the shorter side, bicubic to 224x224,
/// `(x - 127) / 128`.
pub const PREPROCESS_TF_EFFICIENTNET: &str = "tf-efficientnet";

/// EfficientNet-B0 stages (Lite0 has width and depth 1.0):
/// (repeats, kernel, stride, expand ratio, output channels).
const STAGES: [(usize, usize, usize, usize, usize); 7] = [
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
];

/// True if the state_dict uses `efficientnet_pytorch` names.
pub fn is_efficientnet(sd: &StateDict) -> bool {
    sd.get("_conv_stem.weight").is_some() && sd.get("_blocks.0._depthwise_conv.weight").is_some()
}

/// Reads a checkpoint and builds the graph.
pub fn load(path: &Path) -> Result<Graph> {
    let sd = crate::torch::load(path)?;
    build_lite0(&sd, &path.display().to_string())
}

/// TF "SAME" padding of one axis for a static input size: (begin, end), the odd pixel at the end.
pub fn same_pads(size: usize, kernel: usize, stride: usize) -> (usize, usize) {
    let out = size.div_ceil(stride);
    let total = ((out - 1) * stride + kernel).saturating_sub(size);
    (total / 2, total - total / 2)
}

struct Builder<'a> {
    g: Graph,
    sd: &'a StateDict,
    what: &'a str,
    used: HashSet<String>,
    relu6_bounds: Option<(OutletId, OutletId)>,
}

impl Builder<'_> {
    fn weight(&mut self, name: &str, shape: &[usize]) -> Result<OutletId> {
        let t = self.sd.get(name).ok_or_else(|| {
            FormatError::malformed(
                self.what,
                format!("tensor '{name}' is missing (not an EfficientNet-Lite0 checkpoint?)"),
            )
        })?;
        if t.shape() != shape {
            return Err(FormatError::malformed(
                self.what,
                format!("tensor '{name}' has shape {:?}, EfficientNet-Lite0 expects {shape:?}", t.shape()),
            ));
        }
        if !t.dtype().is_float() {
            return Err(FormatError::malformed(self.what, format!("tensor '{name}' is {}, not float", t.dtype())));
        }
        let t = t.cast(DType::F32)?;
        self.used.insert(name.to_string());
        Ok(self.g.add_const(name, Arc::new(t))?)
    }

    fn node(&mut self, name: &str, op: impl Into<Op>, inputs: Vec<OutletId>) -> Result<OutletId> {
        Ok(self.g.add_node(name, op, inputs)?[0])
    }

    #[allow(clippy::too_many_arguments)]
    fn conv(
        &mut self,
        x: OutletId,
        prefix: &str,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        size: usize,
        groups: usize,
    ) -> Result<OutletId> {
        let w = self.weight(&format!("{prefix}.weight"), &[cout, cin / groups, k, k])?;
        let (b0, b1) = same_pads(size, k, stride);
        let attrs = ConvAttrs {
            kernel_shape: Some(vec![k, k]),
            strides: vec![stride, stride],
            pads: vec![b0, b0, b1, b1],
            dilations: vec![1, 1],
            group: groups,
            auto_pad: AutoPad::NotSet,
        };
        self.node(prefix, Conv { attrs }, vec![x, w])
    }

    fn batch_norm(&mut self, x: OutletId, prefix: &str, c: usize) -> Result<OutletId> {
        let mut inputs = vec![x];
        for p in ["weight", "bias", "running_mean", "running_var"] {
            inputs.push(self.weight(&format!("{prefix}.{p}"), &[c])?);
        }
        // Training bookkeeping, not part of the forward pass.
        self.used.insert(format!("{prefix}.num_batches_tracked"));
        self.node(prefix, BatchNorm { epsilon: BN_EPS }, inputs)
    }

    fn relu6(&mut self, x: OutletId, name: &str) -> Result<OutletId> {
        let (lo, hi) = match self.relu6_bounds {
            Some(b) => b,
            None => {
                let lo = self.g.add_const("relu6_min", Arc::new(Tensor::scalar(0f32)))?;
                let hi = self.g.add_const("relu6_max", Arc::new(Tensor::scalar(6f32)))?;
                self.relu6_bounds = Some((lo, hi));
                (lo, hi)
            }
        };
        self.node(&format!("{name}.relu6"), Clip, vec![x, lo, hi])
    }
}

/// Builds EfficientNet-Lite0 from its state_dict; `what` names the checkpoint in errors.
pub fn build_lite0(sd: &StateDict, what: &str) -> Result<Graph> {
    if !is_efficientnet(sd) {
        return Err(FormatError::Unsupported(format!(
            "{what}: not an efficientnet_pytorch state_dict (no _conv_stem.weight / _blocks.0._depthwise_conv.weight)"
        )));
    }
    let mut b = Builder { g: Graph::default(), sd, what, used: HashSet::new(), relu6_bounds: None };
    let fact =
        Fact::new(DType::F32, vec![Dim::sym("batch"), Dim::Known(3), Dim::Known(IMAGE_SIZE), Dim::Known(IMAGE_SIZE)]);
    let input = b.g.add_input("input", fact)?;
    let mut size = IMAGE_SIZE;
    let x = b.conv(input, "_conv_stem", 3, STEM, 3, 2, size, 1)?;
    size = size.div_ceil(2);
    let x = b.batch_norm(x, "_bn0", STEM)?;
    let mut x = b.relu6(x, "_bn0")?;
    let (mut cin, mut idx) = (STEM, 0);
    for (repeats, k, stage_stride, expand, cout) in STAGES {
        for r in 0..repeats {
            let stride = if r == 0 { stage_stride } else { 1 };
            let p = format!("_blocks.{idx}");
            let skip = x;
            let mid = cin * expand;
            if expand != 1 {
                let y = b.conv(x, &format!("{p}._expand_conv"), cin, mid, 1, 1, size, 1)?;
                let y = b.batch_norm(y, &format!("{p}._bn0"), mid)?;
                x = b.relu6(y, &format!("{p}._bn0"))?;
            }
            let y = b.conv(x, &format!("{p}._depthwise_conv"), mid, mid, k, stride, size, mid)?;
            let y = b.batch_norm(y, &format!("{p}._bn1"), mid)?;
            x = b.relu6(y, &format!("{p}._bn1"))?;
            size = size.div_ceil(stride);
            let y = b.conv(x, &format!("{p}._project_conv"), mid, cout, 1, 1, size, 1)?;
            x = b.batch_norm(y, &format!("{p}._bn2"), cout)?;
            if stride == 1 && cin == cout {
                x = b.node(&format!("{p}.add"), Binary(BinaryOp::Add), vec![x, skip])?;
            }
            cin = cout;
            idx += 1;
        }
    }
    let x = b.conv(x, "_conv_head", cin, HEAD, 1, 1, size, 1)?;
    let x = b.batch_norm(x, "_bn1", HEAD)?;
    let x = b.relu6(x, "_bn1")?;
    let x = b.node("pool", GlobalPool { max: false }, vec![x])?;
    let x = b.node("flatten", Flatten { axis: 1 }, vec![x])?;
    let w = b.weight("_fc.weight", &[CLASSES, HEAD])?;
    let bias = b.weight("_fc.bias", &[CLASSES])?;
    let logits = b.node("_fc", Gemm { alpha: 1.0, beta: 1.0, trans_a: false, trans_b: true }, vec![x, w, bias])?;
    b.g.add_output("logits", logits);

    let mut unused: Vec<&str> = sd.names().filter(|n| !b.used.contains(*n)).collect();
    if !unused.is_empty() {
        unused.truncate(5);
        return Err(FormatError::malformed(
            what,
            format!("tensors not used by EfficientNet-Lite0 (another architecture?): {}", unused.join(", ")),
        ));
    }
    let meta = &mut b.g.metadata;
    meta.insert("source".into(), "pytorch efficientnet-lite0 (efficientnet_pytorch state_dict)".into());
    meta.insert(META_TASK.into(), TASK_IMAGE_CLASSIFICATION.into());
    meta.insert(META_PREPROCESS.into(), PREPROCESS_TF_EFFICIENTNET.into());
    meta.insert(META_LABELS.into(), "imagenet-1k".into());
    Ok(b.g)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tf_same_padding() {
        // Stride 2 on even sizes: the extra pixel goes at the end.
        assert_eq!(same_pads(224, 3, 2), (0, 1));
        assert_eq!(same_pads(112, 5, 2), (1, 2));
        assert_eq!(same_pads(14, 3, 1), (1, 1));
        assert_eq!(same_pads(7, 1, 1), (0, 0));
        assert_eq!(same_pads(7, 3, 2), (1, 1));
    }
}
