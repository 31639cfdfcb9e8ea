//! Normalisations and softmax.

use super::util::todo_op;

/// Softmax along `axis`. `legacy_2d` is the opset < 13 meaning: the input is viewed as 2-d
/// `[prod(shape[..axis]), prod(shape[axis..])]` and softmax runs over the second dim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Softmax {
    pub axis: i64,
    pub legacy_2d: bool,
}

/// Log of [`Softmax`], same axis conventions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogSoftmax {
    pub axis: i64,
    pub legacy_2d: bool,
}

/// ONNX `LayerNormalization`: normalises over dims `axis..`; inputs `x, scale[, bias]`.
/// Only the first output (Y) is produced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerNorm {
    pub axis: i64,
    pub epsilon: f32,
}

/// Inference-mode `BatchNormalization(x, scale, bias, mean, var)` over channel dim 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchNorm {
    pub epsilon: f32,
}

todo_op!(Softmax, "Softmax");
todo_op!(LogSoftmax, "LogSoftmax");
todo_op!(LayerNorm, "LayerNormalization");
todo_op!(BatchNorm, "BatchNormalization");
