//! Quantized ops as ONNX writes them (QDQ and QOperator forms).
//! Missing optional zero points are supplied by the importer as zero constants, so the
//! input lists below are always complete.

use super::conv::ConvAttrs;
use super::util::todo_op;

/// `QuantizeLinear(x, y_scale, y_zero_point)`: `saturate(round_half_even(x / scale) + zp)`,
/// per tensor or along `axis`; output dtype is the zero point's (u8 or i8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantizeLinear {
    pub axis: i64,
}

/// `DequantizeLinear(x, x_scale, x_zero_point)`: `(x - zp) * scale`, per tensor or along `axis`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DequantizeLinear {
    pub axis: i64,
}

/// `DynamicQuantizeLinear(x)` -> (y: u8, y_scale: f32, y_zero_point: u8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DynamicQuantizeLinear;

/// `MatMulInteger(a, b, a_zero_point, b_zero_point)` -> i32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatMulInteger;

/// `ConvInteger(x, w, x_zero_point, w_zero_point)` -> i32.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvInteger {
    pub attrs: ConvAttrs,
}

/// `QLinearMatMul(a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QLinearMatMul;

/// `QLinearConv(x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp[, bias: i32])`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QLinearConv {
    pub attrs: ConvAttrs,
}

todo_op!(QuantizeLinear, "QuantizeLinear");
todo_op!(DequantizeLinear, "DequantizeLinear");
todo_op!(DynamicQuantizeLinear, "DynamicQuantizeLinear");
todo_op!(MatMulInteger, "MatMulInteger");
todo_op!(ConvInteger, "ConvInteger");
todo_op!(QLinearMatMul, "QLinearMatMul");
todo_op!(QLinearConv, "QLinearConv");
