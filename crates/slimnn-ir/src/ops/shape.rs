//! Ops that move, select or build data without arithmetic.

use super::util::todo_op;
use slimnn_tensor::Tensor;
use std::sync::Arc;

/// The input's shape as a 1-d i64 tensor, optionally sliced to `start..end` (opset 15).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub start: i64,
    pub end: Option<i64>,
}

/// `Reshape(data, shape)`; `0` copies the input dim unless `allowzero`, `-1` is inferred.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reshape {
    pub allowzero: bool,
}

/// Permutes dims; `None` reverses them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transpose {
    pub perm: Option<Vec<usize>>,
}

/// Inserts size-1 dims at `axes` (positions in the output).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsqueeze {
    pub axes: Vec<i64>,
}

/// Removes size-1 dims at `axes` (all size-1 dims when `None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Squeeze {
    pub axes: Option<Vec<i64>>,
}

/// Concatenates its inputs along `axis`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Concat {
    pub axis: i64,
}

/// `Slice(data, starts, ends[, axes[, steps]])` (opset 10+ form; the importer converts the
/// attribute form of older opsets into constant inputs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slice;

/// Splits along `axis` into `num_outputs` parts, of sizes `split` when given, else equal
/// (the last part smaller when the dim does not divide evenly, as in opset 18).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    pub axis: i64,
    pub split: Option<Vec<usize>>,
    pub num_outputs: usize,
}

/// `Expand(data, shape)`: broadcasts `data` to `shape` (bidirectionally, as numpy does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expand;

/// `Gather(data, indices)` along `axis`; negative indices count from the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gather {
    pub axis: i64,
}

/// `ConstantOfShape(shape)` filled with `value` (a one-element tensor; its dtype is the output's).
#[derive(Debug, Clone, PartialEq)]
pub struct ConstantOfShape {
    pub value: Arc<Tensor>,
}

/// `Range(start, limit, delta)` of scalars.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range;

/// Flattens to 2-d `[prod(shape[..axis]), prod(shape[axis..])]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flatten {
    pub axis: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PadMode {
    Constant,
    Reflect,
    Edge,
    Wrap,
}

/// `Pad(data, pads[, constant_value[, axes]])` (opset 11+ form). `pads` lists all begins then
/// all ends, for every dim or for the dims in `axes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pad {
    pub mode: PadMode,
}

/// `Tile(data, repeats)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tile;

todo_op!(Shape, "Shape");
todo_op!(Reshape, "Reshape");
todo_op!(Transpose, "Transpose");
todo_op!(Unsqueeze, "Unsqueeze");
todo_op!(Squeeze, "Squeeze");
todo_op!(Concat, "Concat");
todo_op!(Slice, "Slice");
todo_op!(Split, "Split");
todo_op!(Expand, "Expand");
todo_op!(Gather, "Gather");
todo_op!(ConstantOfShape, "ConstantOfShape");
todo_op!(Range, "Range");
todo_op!(Flatten, "Flatten");
todo_op!(Pad, "Pad");
todo_op!(Tile, "Tile");
