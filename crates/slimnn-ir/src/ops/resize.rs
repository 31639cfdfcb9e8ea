//! Resize (nearest and linear, with ONNX's coordinate transformations).

use super::util::todo_op;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeMode {
    Nearest,
    Linear,
    Cubic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CoordMode {
    HalfPixel,
    HalfPixelSymmetric,
    PytorchHalfPixel,
    AlignCorners,
    Asymmetric,
    TfCropAndResize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NearestMode {
    RoundPreferFloor,
    RoundPreferCeil,
    Floor,
    Ceil,
}

/// Whether the second input holds scales (f32, one per dim) or output sizes (i64).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeTarget {
    Scales,
    Sizes,
}

/// `Resize(x, target)`: the importer drops `roi` (unused outside tf_crop_and_resize, which is
/// rejected) and keeps whichever of scales / sizes is given as the single second input.
#[derive(Debug, Clone, PartialEq)]
pub struct Resize {
    pub mode: ResizeMode,
    pub coord: CoordMode,
    pub nearest: NearestMode,
    pub cubic_coeff_a: f32,
    pub exclude_outside: bool,
    pub target: ResizeTarget,
    /// Dims the target refers to (opset 18 `axes`); `None` means all dims.
    pub axes: Option<Vec<i64>>,
}

todo_op!(Resize, "Resize");
