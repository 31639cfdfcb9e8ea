//! Convolutions.

use super::util::todo_op;

/// ONNX `auto_pad`. `SameUpper`/`SameLower` pad so `out = ceil(in / stride)`, putting the odd
/// extra pixel at the end (upper) or the beginning (lower).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AutoPad {
    #[default]
    NotSet,
    SameUpper,
    SameLower,
    Valid,
}

/// Attributes shared by every convolution op. Empty vectors mean the ONNX defaults
/// (strides and dilations 1, pads 0); `kernel_shape` defaults to the weight's spatial dims.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConvAttrs {
    pub kernel_shape: Option<Vec<usize>>,
    pub strides: Vec<usize>,
    /// Begin pads for every spatial dim, then end pads.
    pub pads: Vec<usize>,
    pub dilations: Vec<usize>,
    pub group: usize,
    pub auto_pad: AutoPad,
}

/// `Conv(x, w[, b])` for 1-d, 2-d and 3-d inputs in NCHW layout; grouped and depthwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conv {
    pub attrs: ConvAttrs,
}

/// `ConvTranspose(x, w[, b])`; weights are `[C_in, C_out / group, k...]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvTranspose {
    pub attrs: ConvAttrs,
    pub output_padding: Vec<usize>,
    pub output_shape: Option<Vec<usize>>,
}

todo_op!(Conv, "Conv");
todo_op!(ConvTranspose, "ConvTranspose");
