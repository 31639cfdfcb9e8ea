//! ONNX node -> canonical ops. Each converter reads the node's attributes and inputs in the
//! form its op version uses and builds the one canonical form `slimnn_ir::ops` defines (constant
//! axes as attributes, run-time ones as a trailing input; optional inputs made explicit; variadic
//! ops as chains of binary ops; legacy attribute forms as constant inputs).

use super::spec::Attrs;
use super::tensor::{dtype_from_onnx, tensor_from_proto};
use crate::{FormatError, Result};
use slimnn_ir::ops::*;
use slimnn_ir::{Fact, Graph, Op, OutletId};
use slimnn_tensor::{bf16, f16, DType, Tensor};
use std::path::Path;
use std::sync::Arc;

/// What a converter sees of one node.
pub(super) struct Cx<'a> {
    pub g: &'a mut Graph,
    /// The node's display name (its ONNX name, or `<op>_<index>` when it has none).
    pub name: &'a str,
    pub op_type: &'a str,
    pub opset: i64,
    /// The op's effective version at `opset` (see `spec.rs`); forms are chosen by it.
    pub version: i64,
    pub attrs: Attrs<'a>,
    /// One entry per ONNX input position; `None` for an omitted optional input and for inputs
    /// only read as constants (see [`const_only_inputs`]), which are not added to the graph.
    pub inputs: Vec<Option<OutletId>>,
    /// Whether each input position is given (non-empty name).
    pub present: Vec<bool>,
    /// The value of each input known to be constant.
    pub konsts: Vec<Option<Arc<Tensor>>>,
    /// Number of ONNX outputs the node lists (omitted optional ones included).
    pub n_outputs: usize,
    /// Whether each listed output is read by a node or is a graph output.
    pub used_outputs: Vec<bool>,
    pub base_dir: Option<&'a Path>,
}

impl Cx<'_> {
    fn label(&self) -> String {
        format!("node '{}' ({})", self.name, self.op_type)
    }

    pub fn invalid(&self, msg: impl std::fmt::Display) -> FormatError {
        FormatError::malformed(self.label(), msg.to_string())
    }

    pub fn unsupported(&self, msg: impl std::fmt::Display) -> FormatError {
        FormatError::Unsupported(format!(
            "node '{}' op {} version {} (opset {}): {msg}",
            self.name, self.op_type, self.version, self.opset
        ))
    }

    fn opt(&self, i: usize) -> Option<OutletId> {
        self.inputs.get(i).copied().flatten()
    }

    fn input(&self, i: usize) -> Result<OutletId> {
        self.opt(i).ok_or_else(|| self.invalid(format!("input {i} is required")))
    }

    fn fact(&self, o: OutletId) -> &Fact {
        self.g.fact(o)
    }

    /// The value of optional input `i` when present; unsupported when it is not a constant.
    fn const_input(&self, i: usize, what: &str) -> Result<Option<Arc<Tensor>>> {
        if !self.present.get(i).copied().unwrap_or(false) {
            return Ok(None);
        }
        match self.konsts.get(i).cloned().flatten() {
            Some(t) => Ok(Some(t)),
            None => Err(self.unsupported(format!("input {i} ({what}) must be a constant"))),
        }
    }

    /// Optional integer-list input `i` (axes, split sizes): its values when constant, else the
    /// outlet computing it.
    fn ints_arg(&self, i: usize, what: &str) -> Result<IntsArg> {
        if !self.present.get(i).copied().unwrap_or(false) {
            return Ok(IntsArg::Absent);
        }
        match self.konsts.get(i).cloned().flatten() {
            Some(t) if t.dtype().is_integer() && t.rank() <= 1 => Ok(IntsArg::Const(t.to_i64_vec()?)),
            Some(t) => Err(self.invalid(format!(
                "input {i} ({what}) must be a 1-d integer tensor, got {}{:?}",
                t.dtype(),
                t.shape()
            ))),
            None => Ok(IntsArg::Dynamic(self.input(i)?)),
        }
    }

    /// Whether output `i` is used.
    fn output_used(&self, i: usize) -> bool {
        self.used_outputs.get(i).copied().unwrap_or(false)
    }

    /// Adds the node's main op under the node's own name.
    fn add(&mut self, op: impl Into<Op>, inputs: Vec<OutletId>) -> Result<Vec<OutletId>> {
        Ok(self.g.add_node(self.name, op, inputs)?)
    }

    /// Adds a helper node named after the node.
    fn add_aux(&mut self, suffix: &str, op: impl Into<Op>, inputs: Vec<OutletId>) -> Result<OutletId> {
        let name = format!("{}/{suffix}", self.name);
        Ok(self.g.add_node(&name, op, inputs)?[0])
    }

    fn konst(&mut self, suffix: &str, t: Tensor) -> Result<OutletId> {
        let name = format!("{}/{suffix}", self.name);
        Ok(self.g.add_const(&name, t)?)
    }

    fn usizes(&self, what: &str, v: &[i64]) -> Result<Vec<usize>> {
        v.iter()
            .map(|&x| usize::try_from(x).map_err(|_| self.invalid(format!("{what} must not be negative, got {v:?}"))))
            .collect()
    }

    fn bool_attr(&self, name: &str, default: bool) -> bool {
        self.attrs.i(name).map_or(default, |v| v != 0)
    }

    /// A zero tensor of `dtype` shaped like the (known-shape) value `like`, for zero points
    /// that ONNX lets a model omit.
    fn zero_point_like(&mut self, suffix: &str, dtype: DType, like: OutletId) -> Result<OutletId> {
        let shape = self.fact(like).known_shape().ok_or_else(|| {
            self.unsupported(format!("the shape of the scale must be known to supply the omitted {suffix}"))
        })?;
        let t = Tensor::zeros(dtype, shape)?;
        self.konst(suffix, t)
    }

    fn scalar_zero(&mut self, suffix: &str, dtype: DType) -> Result<OutletId> {
        let t = Tensor::zeros(dtype, vec![])?;
        self.konst(suffix, t)
    }
}

/// An integer-list input: absent, constant, or computed at run time.
enum IntsArg {
    Absent,
    Const(Vec<i64>),
    Dynamic(OutletId),
}

/// The smallest or largest value of a dtype as a scalar tensor (Clip's absent bounds).
fn extreme(dtype: DType, high: bool) -> Option<Tensor> {
    Some(match (dtype, high) {
        (DType::F32, false) => Tensor::scalar(f32::MIN),
        (DType::F32, true) => Tensor::scalar(f32::MAX),
        (DType::F64, false) => Tensor::scalar(f64::MIN),
        (DType::F64, true) => Tensor::scalar(f64::MAX),
        (DType::F16, false) => Tensor::scalar(f16::MIN),
        (DType::F16, true) => Tensor::scalar(f16::MAX),
        (DType::BF16, false) => Tensor::scalar(bf16::MIN),
        (DType::BF16, true) => Tensor::scalar(bf16::MAX),
        (DType::I8, false) => Tensor::scalar(i8::MIN),
        (DType::I8, true) => Tensor::scalar(i8::MAX),
        (DType::U8, false) => Tensor::scalar(u8::MIN),
        (DType::U8, true) => Tensor::scalar(u8::MAX),
        (DType::I16, false) => Tensor::scalar(i16::MIN),
        (DType::I16, true) => Tensor::scalar(i16::MAX),
        (DType::I32, false) => Tensor::scalar(i32::MIN),
        (DType::I32, true) => Tensor::scalar(i32::MAX),
        (DType::I64, false) => Tensor::scalar(i64::MIN),
        (DType::I64, true) => Tensor::scalar(i64::MAX),
        _ => return None,
    })
}

pub(super) fn unary_op(op_type: &str) -> Option<UnaryOp> {
    Some(match op_type {
        "Abs" => UnaryOp::Abs,
        "Neg" => UnaryOp::Neg,
        "Sqrt" => UnaryOp::Sqrt,
        "Reciprocal" => UnaryOp::Reciprocal,
        "Exp" => UnaryOp::Exp,
        "Log" => UnaryOp::Log,
        "Erf" => UnaryOp::Erf,
        "Tanh" => UnaryOp::Tanh,
        "Sigmoid" => UnaryOp::Sigmoid,
        "Relu" => UnaryOp::Relu,
        "Not" => UnaryOp::Not,
        "Floor" => UnaryOp::Floor,
        "Ceil" => UnaryOp::Ceil,
        "Round" => UnaryOp::Round,
        "Sign" => UnaryOp::Sign,
        "Sin" => UnaryOp::Sin,
        "Cos" => UnaryOp::Cos,
        "Softplus" => UnaryOp::Softplus,
        "HardSwish" => UnaryOp::HardSwish,
        _ => return None,
    })
}

pub(super) fn binary_op(op_type: &str) -> Option<BinaryOp> {
    Some(match op_type {
        "Add" => BinaryOp::Add,
        "Sub" => BinaryOp::Sub,
        "Mul" => BinaryOp::Mul,
        "Div" => BinaryOp::Div,
        "Pow" => BinaryOp::Pow,
        "PRelu" => BinaryOp::PRelu,
        "Equal" => BinaryOp::Equal,
        "Less" => BinaryOp::Less,
        "LessOrEqual" => BinaryOp::LessOrEqual,
        "Greater" => BinaryOp::Greater,
        "GreaterOrEqual" => BinaryOp::GreaterOrEqual,
        "And" => BinaryOp::And,
        "Or" => BinaryOp::Or,
        "Xor" => BinaryOp::Xor,
        _ => return None,
    })
}

pub(super) fn reduce_op(op_type: &str) -> Option<ReduceOp> {
    Some(match op_type {
        "ReduceSum" => ReduceOp::Sum,
        "ReduceMean" => ReduceOp::Mean,
        "ReduceMax" => ReduceOp::Max,
        "ReduceMin" => ReduceOp::Min,
        "ReduceProd" => ReduceOp::Prod,
        "ReduceL1" => ReduceOp::L1,
        "ReduceL2" => ReduceOp::L2,
        "ReduceSumSquare" => ReduceOp::SumSquare,
        "ReduceLogSum" => ReduceOp::LogSum,
        "ReduceLogSumExp" => ReduceOp::LogSumExp,
        _ => return None,
    })
}

pub(super) fn auto_pad(s: &str) -> Option<AutoPad> {
    Some(match s {
        "NOTSET" | "" => AutoPad::NotSet,
        "SAME_UPPER" => AutoPad::SameUpper,
        "SAME_LOWER" => AutoPad::SameLower,
        "VALID" => AutoPad::Valid,
        _ => return None,
    })
}

pub(super) fn resize_mode(s: &str) -> Option<ResizeMode> {
    Some(match s {
        "nearest" => ResizeMode::Nearest,
        "linear" => ResizeMode::Linear,
        "cubic" => ResizeMode::Cubic,
        _ => return None,
    })
}

/// `tf_crop_and_resize` is left out on purpose: it needs `roi`, which the canonical op drops.
pub(super) fn coord_mode(s: &str) -> Option<CoordMode> {
    Some(match s {
        "half_pixel" => CoordMode::HalfPixel,
        "half_pixel_symmetric" => CoordMode::HalfPixelSymmetric,
        "pytorch_half_pixel" => CoordMode::PytorchHalfPixel,
        "align_corners" => CoordMode::AlignCorners,
        "asymmetric" => CoordMode::Asymmetric,
        _ => return None,
    })
}

pub(super) fn nearest_mode(s: &str) -> Option<NearestMode> {
    Some(match s {
        "round_prefer_floor" => NearestMode::RoundPreferFloor,
        "round_prefer_ceil" => NearestMode::RoundPreferCeil,
        "floor" => NearestMode::Floor,
        "ceil" => NearestMode::Ceil,
        _ => return None,
    })
}

pub(super) fn pad_mode(s: &str) -> Option<PadMode> {
    Some(match s {
        "constant" => PadMode::Constant,
        "reflect" => PadMode::Reflect,
        "edge" => PadMode::Edge,
        "wrap" => PadMode::Wrap,
        _ => return None,
    })
}

/// Whether a reduction reads its axes from input 1 (ReduceSum from version 13, the others
/// from 18) rather than from the `axes` attribute. At opset `v` the effective version is at
/// least 13 (18) exactly when `v` is, so an opset may be passed too.
pub(super) fn reduce_axes_as_input(op_type: &str, version: i64) -> bool {
    version >= 18 || (op_type == "ReduceSum" && version >= 13)
}

/// Input positions a converter reads as attributes when they are constants (axes, split sizes,
/// Dropout's ratio, Resize's roi, ...): those are not added to the graph, so a model's constant
/// parameters do not turn into unused constant nodes. Computed ones stay inputs.
pub(super) fn const_only_inputs(op_type: &str, version: i64, present: &[bool]) -> Vec<usize> {
    match op_type {
        "Unsqueeze" | "Squeeze" | "Split" if version >= 13 => vec![1],
        _ if reduce_op(op_type).is_some() && reduce_axes_as_input(op_type, version) => vec![1],
        "Dropout" => vec![1, 2],
        "Resize" if version < 11 => vec![],
        "Resize" if present.get(3).copied().unwrap_or(false) => vec![1, 2],
        "Resize" => vec![1],
        _ => vec![],
    }
}

/// Why a node (of op version `version`) cannot be imported, for reasons visible without
/// building anything (attribute values, outputs the model uses that slimnn does not produce).
/// `used[i]` says whether output `i` is read by a node or is a graph output.
pub(super) fn static_unsupported(op_type: &str, version: i64, attrs: &Attrs, used: &[bool]) -> Option<String> {
    let used_beyond = |n: usize| used.iter().skip(n).any(|&u| u);
    match op_type {
        "Dropout" if version < 10 && used_beyond(1) => {
            Some("its mask output (of the input's type before version 10) is not supported".into())
        }
        "LayerNormalization" if used_beyond(1) && attrs.i_or("stash_type", 1) != 1 => Some(format!(
            "its Mean / InvStdDev outputs are used with stash_type {}; only 1 (float) is supported",
            attrs.i_or("stash_type", 1)
        )),
        "BatchNormalization" if attrs.i_or("training_mode", 0) != 0 => {
            Some("training_mode = 1 is not supported".into())
        }
        "BatchNormalization" if version < 9 && attrs.i_or("spatial", 1) != 1 => {
            Some("spatial = 0 (per-element statistics) is not supported".into())
        }
        "BatchNormalization" if used_beyond(1) => Some(
            "its training outputs (running / saved mean and variance) are used; only inference is supported".into(),
        ),
        "MaxPool" if used_beyond(1) => Some("the Indices output is not supported".into()),
        "Cast" => match dtype_from_onnx(attrs.i_or("to", 0) as i32) {
            Err(e) => Some(format!("cast target: {e}")),
            Ok(_) => None,
        },
        "Resize" if version < 11 => match attrs.s_or("mode", "nearest").as_str() {
            "nearest" | "linear" => None,
            m => Some(format!("mode '{m}' is not supported")),
        },
        "Resize" => {
            let coord = attrs.s_or("coordinate_transformation_mode", "half_pixel");
            if coord_mode(&coord).is_none() {
                Some(format!("coordinate_transformation_mode '{coord}' is not supported"))
            } else if resize_mode(&attrs.s_or("mode", "nearest")).is_none() {
                Some(format!("mode '{}' is not supported", attrs.s_or("mode", "nearest")))
            } else if nearest_mode(&attrs.s_or("nearest_mode", "round_prefer_floor")).is_none() {
                Some(format!("nearest_mode '{}' is not supported", attrs.s_or("nearest_mode", "")))
            } else if attrs.i_or("antialias", 0) != 0 {
                Some("antialias = 1 is not supported".into())
            } else if attrs.s_or("keep_aspect_ratio_policy", "stretch") != "stretch" {
                Some(format!(
                    "keep_aspect_ratio_policy '{}' is not supported",
                    attrs.s_or("keep_aspect_ratio_policy", "")
                ))
            } else {
                None
            }
        }
        "QuantizeLinear" | "DequantizeLinear" if attrs.i_or("block_size", 0) != 0 => {
            Some("blocked quantization (block_size != 0) is not supported".into())
        }
        "QuantizeLinear" if attrs.i_or("precision", 0) != 0 => {
            Some(format!("precision {} is not supported (only the scale's own type)", attrs.i_or("precision", 0)))
        }
        "QuantizeLinear" if attrs.has("output_dtype") && attrs.i_or("output_dtype", 0) != 0 => {
            match dtype_from_onnx(attrs.i_or("output_dtype", 0) as i32) {
                Ok(DType::U8 | DType::I8 | DType::I16) => None,
                Ok(dt) => Some(format!("output_dtype {dt} is not supported")),
                Err(e) => Some(format!("output_dtype: {e}")),
            }
        }
        "Constant" if attrs.has("value_string") || attrs.has("value_strings") => {
            Some("string constants are not supported".into())
        }
        "Constant"
            if !["value", "value_float", "value_floats", "value_int", "value_ints"].iter().any(|a| attrs.has(a)) =>
        {
            Some("only value, value_float(s) and value_int(s) constants are supported".into())
        }
        _ => None,
    }
}

/// Builds the canonical ops for one node and returns its outputs, in ONNX output order (outputs
/// the model does not use may be left off the end).
pub(super) fn convert(cx: &mut Cx) -> Result<Vec<OutletId>> {
    let op_type = cx.op_type;
    if let Some(u) = unary_op(op_type) {
        return cx.add(Unary(u), vec![cx.input(0)?]);
    }
    if let Some(b) = binary_op(op_type) {
        return cx.add(Binary(b), vec![cx.input(0)?, cx.input(1)?]);
    }
    if let Some(r) = reduce_op(op_type) {
        return reduce(cx, r);
    }
    let a = &cx.attrs;
    match op_type {
        "LeakyRelu" => {
            let alpha = a.f_or("alpha", 0.01);
            cx.add(Unary(UnaryOp::LeakyRelu { alpha }), vec![cx.input(0)?])
        }
        "Elu" => {
            let alpha = a.f_or("alpha", 1.0);
            cx.add(Unary(UnaryOp::Elu { alpha }), vec![cx.input(0)?])
        }
        "HardSigmoid" => {
            let (alpha, beta) = (a.f_or("alpha", 0.2), a.f_or("beta", 0.5));
            cx.add(Unary(UnaryOp::HardSigmoid { alpha, beta }), vec![cx.input(0)?])
        }
        "Gelu" => {
            let tanh = match a.s_or("approximate", "none").as_str() {
                "none" => false,
                "tanh" => true,
                other => return Err(cx.invalid(format!("approximate must be 'none' or 'tanh', got '{other}'"))),
            };
            cx.add(Unary(UnaryOp::Gelu { tanh }), vec![cx.input(0)?])
        }
        "Identity" => cx.add(Identity, vec![cx.input(0)?]),
        "Mod" => {
            let fmod = cx.bool_attr("fmod", false);
            cx.add(Binary(BinaryOp::Mod { fmod }), vec![cx.input(0)?, cx.input(1)?])
        }
        "Sum" | "Mean" | "Max" | "Min" => variadic(cx),
        "Where" => cx.add(Where, vec![cx.input(0)?, cx.input(1)?, cx.input(2)?]),
        "Cast" => {
            let to = dtype_from_onnx(a.i_or("to", 0) as i32).map_err(|e| cx.unsupported(e))?;
            cx.add(Cast { to }, vec![cx.input(0)?])
        }
        "CastLike" => {
            let to = cx.fact(cx.input(1)?).dtype;
            cx.add(Cast { to }, vec![cx.input(0)?])
        }
        "Clip" => {
            let x = cx.input(0)?;
            let dt = cx.fact(x).dtype;
            let mut bounds = vec![x];
            for (i, high) in [(1, false), (2, true)] {
                let name = if high { "max" } else { "min" };
                // Before version 11 the bounds are float attributes.
                let legacy = if cx.version < 11 { cx.attrs.f(name) } else { None };
                let o = match (cx.opt(i), legacy) {
                    (Some(o), _) => o,
                    (None, Some(v)) => {
                        let t = Tensor::from_f64s(dt, vec![], &[f64::from(v)])?;
                        cx.konst(name, t)?
                    }
                    (None, None) => {
                        let t = extreme(dt, high).ok_or_else(|| cx.invalid(format!("Clip of {dt} is not defined")))?;
                        cx.konst(name, t)?
                    }
                };
                bounds.push(o);
            }
            cx.add(Clip, bounds)
        }
        "Dropout" => {
            if let Some(t) = cx.const_input(2, "training_mode")? {
                if t.to_f64_vec().iter().any(|&v| v != 0.0) {
                    return Err(cx.unsupported("training_mode = true is not supported"));
                }
            }
            let x = cx.input(0)?;
            let mut outs = cx.add(Identity, vec![x])?;
            if cx.output_used(1) {
                // Inference keeps everything: the mask is all true.
                let shape = cx.add_aux("mask_shape", Shape { start: 0, end: None }, vec![x])?;
                let value = Arc::new(Tensor::scalar(true).into_shape(vec![1])?);
                let mask = cx.add_aux("mask", ConstantOfShape { value }, vec![shape])?;
                outs.push(mask);
            }
            Ok(outs)
        }
        "MatMul" => cx.add(MatMul, vec![cx.input(0)?, cx.input(1)?]),
        "Gemm" => {
            let op = Gemm {
                alpha: a.f_or("alpha", 1.0),
                beta: a.f_or("beta", 1.0),
                trans_a: cx.bool_attr("transA", false),
                trans_b: cx.bool_attr("transB", false),
            };
            let mut ins = vec![cx.input(0)?, cx.input(1)?];
            ins.extend(cx.opt(2));
            cx.add(op, ins)
        }
        "Softmax" | "LogSoftmax" => {
            let legacy_2d = cx.version < 13;
            let axis = a.i_or("axis", if legacy_2d { 1 } else { -1 });
            let x = cx.input(0)?;
            if op_type == "Softmax" {
                cx.add(Softmax { axis, legacy_2d }, vec![x])
            } else {
                cx.add(LogSoftmax { axis, legacy_2d }, vec![x])
            }
        }
        "LayerNormalization" => {
            // Mean and InvStdDev only when the model reads them.
            let num_outputs = (1..=3).rev().find(|&k| k == 1 || cx.output_used(k - 1)).unwrap_or(1);
            let op = LayerNorm { axis: a.i_or("axis", -1), epsilon: a.f_or("epsilon", 1e-5), num_outputs };
            let mut ins = vec![cx.input(0)?, cx.input(1)?];
            ins.extend(cx.opt(2));
            cx.add(op, ins)
        }
        "BatchNormalization" => {
            let op = BatchNorm { epsilon: a.f_or("epsilon", 1e-5) };
            let ins = (0..5).map(|i| cx.input(i)).collect::<Result<_>>()?;
            cx.add(op, ins)
        }
        "ArgMax" | "ArgMin" => {
            let op = ArgReduce {
                max: op_type == "ArgMax",
                axis: a.i_or("axis", 0),
                keepdims: cx.bool_attr("keepdims", true),
                select_last_index: cx.bool_attr("select_last_index", false),
            };
            cx.add(op, vec![cx.input(0)?])
        }
        "Shape" => {
            let op = Shape { start: a.i_or("start", 0), end: a.i("end") };
            cx.add(op, vec![cx.input(0)?])
        }
        "Size" => {
            // Size = product of the shape, as an i64 scalar.
            let x = cx.input(0)?;
            let shape = cx.add_aux("shape", Shape { start: 0, end: None }, vec![x])?;
            let prod = Reduce { op: ReduceOp::Prod, axes: None, keepdims: false, noop_with_empty_axes: false };
            cx.add(prod, vec![shape])
        }
        "Reshape" => {
            let op = Reshape { allowzero: cx.bool_attr("allowzero", false) };
            cx.add(op, vec![cx.input(0)?, cx.input(1)?])
        }
        "Transpose" => {
            let perm = a.ints("perm").map(|p| cx.usizes("perm", p)).transpose()?;
            cx.add(Transpose { perm }, vec![cx.input(0)?])
        }
        "Unsqueeze" => {
            let x = cx.input(0)?;
            let axes = if cx.version < 13 {
                a.ints("axes").map_or(IntsArg::Absent, |v| IntsArg::Const(v.to_vec()))
            } else {
                cx.ints_arg(1, "axes")?
            };
            match axes {
                IntsArg::Const(axes) => cx.add(Unsqueeze { axes }, vec![x]),
                IntsArg::Dynamic(o) => cx.add(Unsqueeze { axes: vec![] }, vec![x, o]),
                IntsArg::Absent => Err(cx.invalid("axes are required")),
            }
        }
        "Squeeze" => {
            let x = cx.input(0)?;
            let axes = if cx.version < 13 {
                a.ints("axes").map_or(IntsArg::Absent, |v| IntsArg::Const(v.to_vec()))
            } else {
                cx.ints_arg(1, "axes")?
            };
            match axes {
                // An empty list means "not given": every size-1 dim.
                IntsArg::Const(axes) => cx.add(Squeeze { axes: Some(axes).filter(|v| !v.is_empty()) }, vec![x]),
                IntsArg::Dynamic(o) => cx.add(Squeeze { axes: None }, vec![x, o]),
                IntsArg::Absent => cx.add(Squeeze { axes: None }, vec![x]),
            }
        }
        "Concat" => {
            let axis = a.i_or("axis", 0);
            let ins = (0..cx.inputs.len()).map(|i| cx.input(i)).collect::<Result<_>>()?;
            cx.add(Concat { axis }, ins)
        }
        "Slice" => slice(cx),
        "Split" => split(cx),
        "Expand" => cx.add(Expand, vec![cx.input(0)?, cx.input(1)?]),
        "Gather" => {
            let axis = a.i_or("axis", 0);
            cx.add(Gather { axis }, vec![cx.input(0)?, cx.input(1)?])
        }
        "ConstantOfShape" => {
            let value = match a.t("value") {
                Some(t) => tensor_from_proto(t, cx.base_dir)?,
                None => Tensor::from_vec(vec![1], vec![0f32])?,
            };
            if value.len() != 1 {
                return Err(cx.invalid(format!("value must hold one element, got shape {:?}", value.shape())));
            }
            cx.add(ConstantOfShape { value: Arc::new(value) }, vec![cx.input(0)?])
        }
        "Range" => {
            let ins = vec![cx.input(0)?, cx.input(1)?, cx.input(2)?];
            // slimnn computes float16 / bfloat16 ranges in wider floats: stash_type 1.
            let stash = a.i_or("stash_type", 1);
            if stash != 1 && matches!(cx.fact(ins[0]).dtype, DType::F16 | DType::BF16) {
                return Err(cx.unsupported(format!("stash_type {stash} is not supported (only 1, float)")));
            }
            cx.add(Range, ins)
        }
        "Flatten" => {
            let axis = a.i_or("axis", 1);
            cx.add(Flatten { axis }, vec![cx.input(0)?])
        }
        "Tile" => cx.add(Tile, vec![cx.input(0)?, cx.input(1)?]),
        "Pad" => {
            let mode_s = a.s_or("mode", "constant");
            let mode = pad_mode(&mode_s).ok_or_else(|| cx.invalid(format!("unknown mode '{mode_s}'")))?;
            let x = cx.input(0)?;
            if cx.version < 11 {
                // pads and value attributes, as the inputs of version 11.
                let pads = a.ints("pads").unwrap_or(&[]).to_vec();
                let value = f64::from(a.f_or("value", 0.0));
                let pads = cx.konst("pads", Tensor::from_vec(vec![pads.len()], pads)?)?;
                let dt = cx.fact(x).dtype;
                let value = Tensor::from_f64s(dt, vec![], &[value])?;
                let value = cx.konst("constant_value", value)?;
                return cx.add(Pad { mode }, vec![x, pads, value]);
            }
            let mut ins = vec![x, cx.input(1)?];
            if let Some(axes) = cx.opt(3) {
                let value = match cx.opt(2) {
                    Some(v) => v,
                    None => {
                        let dt = cx.fact(x).dtype;
                        cx.scalar_zero("constant_value", dt)?
                    }
                };
                ins.extend([value, axes]);
            } else {
                ins.extend(cx.opt(2));
            }
            cx.add(Pad { mode }, ins)
        }
        "Conv" | "ConvTranspose" => {
            let attrs = conv_attrs(cx)?;
            let mut ins = vec![cx.input(0)?, cx.input(1)?];
            ins.extend(cx.opt(2));
            if op_type == "Conv" {
                cx.add(Conv { attrs }, ins)
            } else {
                let output_padding = cx.usizes("output_padding", cx.attrs.ints("output_padding").unwrap_or(&[]))?;
                let output_shape = cx.attrs.ints("output_shape").map(|v| cx.usizes("output_shape", v)).transpose()?;
                cx.add(ConvTranspose { attrs, output_padding, output_shape }, ins)
            }
        }
        "MaxPool" | "AveragePool" => {
            let kind = if op_type == "MaxPool" {
                PoolKind::Max
            } else {
                PoolKind::Average { count_include_pad: cx.bool_attr("count_include_pad", false) }
            };
            let ap = a.s_or("auto_pad", "NOTSET");
            let attrs = PoolAttrs {
                kernel_shape: cx.usizes("kernel_shape", a.ints("kernel_shape").unwrap_or(&[]))?,
                strides: cx.usizes("strides", a.ints("strides").unwrap_or(&[]))?,
                pads: cx.usizes("pads", a.ints("pads").unwrap_or(&[]))?,
                dilations: cx.usizes("dilations", a.ints("dilations").unwrap_or(&[]))?,
                ceil_mode: cx.bool_attr("ceil_mode", false),
                auto_pad: auto_pad(&ap).ok_or_else(|| cx.invalid(format!("unknown auto_pad '{ap}'")))?,
            };
            cx.add(Pool { kind, attrs }, vec![cx.input(0)?])
        }
        "GlobalAveragePool" | "GlobalMaxPool" => {
            cx.add(GlobalPool { max: op_type == "GlobalMaxPool" }, vec![cx.input(0)?])
        }
        "Resize" => resize(cx),
        "QuantizeLinear" => {
            let axis = a.i_or("axis", 1);
            let out_dt = match a.i_or("output_dtype", 0) {
                0 => None,
                code => Some(dtype_from_onnx(code as i32).map_err(|e| cx.unsupported(e))?),
            };
            let (x, scale) = (cx.input(0)?, cx.input(1)?);
            let zp = match cx.opt(2) {
                Some(zp) => {
                    let zdt = cx.fact(zp).dtype;
                    if out_dt.is_some_and(|d| d != zdt) {
                        return Err(cx.invalid(format!(
                            "output_dtype {} differs from the zero point's {zdt}",
                            out_dt.unwrap_or(zdt)
                        )));
                    }
                    zp
                }
                None => cx.zero_point_like("y_zero_point", out_dt.unwrap_or(DType::U8), scale)?,
            };
            cx.add(QuantizeLinear { axis }, vec![x, scale, zp])
        }
        "DequantizeLinear" => {
            let axis = a.i_or("axis", 1);
            let (x, scale) = (cx.input(0)?, cx.input(1)?);
            // The output has the scale's type; output_dtype (23) may only restate it.
            let sdt = cx.fact(scale).dtype;
            match a.i_or("output_dtype", 0) {
                0 => {}
                code if dtype_from_onnx(code as i32).ok() == Some(sdt) => {}
                code => return Err(cx.unsupported(format!("output_dtype {code} differs from the scale's type {sdt}"))),
            }
            let zp = match cx.opt(2) {
                Some(zp) => zp,
                None => {
                    let dt = cx.fact(x).dtype;
                    cx.zero_point_like("x_zero_point", dt, scale)?
                }
            };
            cx.add(DequantizeLinear { axis }, vec![x, scale, zp])
        }
        "DynamicQuantizeLinear" => cx.add(DynamicQuantizeLinear, vec![cx.input(0)?]),
        "MatMulInteger" | "ConvInteger" => {
            let (x, w) = (cx.input(0)?, cx.input(1)?);
            let mut ins = vec![x, w];
            for (i, of, what) in [(2, x, "a_zero_point"), (3, w, "b_zero_point")] {
                let zp = match cx.opt(i) {
                    Some(zp) => zp,
                    None => {
                        let dt = cx.fact(of).dtype;
                        cx.scalar_zero(what, dt)?
                    }
                };
                ins.push(zp);
            }
            if op_type == "MatMulInteger" {
                cx.add(MatMulInteger, ins)
            } else {
                let attrs = conv_attrs(cx)?;
                cx.add(ConvInteger { attrs }, ins)
            }
        }
        "QLinearMatMul" | "QLinearConv" => {
            // (a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp): zero points follow their data.
            let mut ins = Vec::with_capacity(9);
            for i in 0..8 {
                let o = match (i, cx.opt(i)) {
                    (_, Some(o)) => o,
                    (2 | 5, None) => {
                        let dt = cx.fact(cx.input(i - 2)?).dtype;
                        cx.scalar_zero(if i == 2 { "a_zero_point" } else { "b_zero_point" }, dt)?
                    }
                    (7, None) => cx.scalar_zero("y_zero_point", DType::U8)?,
                    _ => cx.input(i)?,
                };
                ins.push(o);
            }
            if op_type == "QLinearMatMul" {
                cx.add(QLinearMatMul, ins)
            } else {
                ins.extend(cx.opt(8));
                let attrs = conv_attrs(cx)?;
                cx.add(QLinearConv { attrs }, ins)
            }
        }
        "GatherBlockQuantized" => {
            let op = GatherBlockQuantized {
                bits: a.i_or("bits", 4) as usize,
                block_size: a.i_or("block_size", 128) as usize,
            };
            let mut ins = vec![cx.input(0)?, cx.input(1)?, cx.input(2)?];
            ins.extend(cx.opt(3));
            cx.add(op, ins)
        }
        "DynamicRowQuantMatMul" => {
            let ins = vec![cx.input(0)?, cx.input(1)?, cx.input(2)?];
            cx.add(DynamicRowQuantMatMul, ins)
        }
        "MatMulNBits" => {
            let int = |name: &str| -> Result<usize> {
                let v = a.i(name).ok_or_else(|| cx.invalid(format!("attribute {name} is missing")))?;
                usize::try_from(v).map_err(|_| cx.invalid(format!("attribute {name} is {v}")))
            };
            let op = MatMulNBits {
                k: int("K")?,
                n: int("N")?,
                bits: a.i_or("bits", 4) as usize,
                block_size: int("block_size")?,
            };
            let mut ins = vec![cx.input(0)?, cx.input(1)?, cx.input(2)?];
            ins.extend(cx.opt(3));
            cx.add(op, ins)
        }
        // ONNX Runtime's QOperator contrib ops, defined in float arithmetic: read as their QDQ
        // form, which the runtime folds and fuses like any other.
        "QLinearAdd" => {
            let a_dq = dequantize_input(cx, "a_dq", 0, 1, 2, 1)?;
            let b_dq = dequantize_input(cx, "b_dq", 3, 4, 5, 1)?;
            let sum = cx.add_aux("sum", Binary(BinaryOp::Add), vec![a_dq, b_dq])?;
            let zdt = cx.fact(cx.input(0)?).dtype;
            quantize_output(cx, sum, 6, 7, zdt)
        }
        "QLinearGlobalAveragePool" => {
            if cx.bool_attr("channels_last", false) {
                return Err(cx.unsupported("channels_last = 1 (NHWC) is not supported"));
            }
            let x_dq = dequantize_input(cx, "x_dq", 0, 1, 2, 1)?;
            let pooled = cx.add_aux("pool", GlobalPool { max: false }, vec![x_dq])?;
            let zdt = cx.fact(cx.input(0)?).dtype;
            quantize_output(cx, pooled, 3, 4, zdt)
        }
        "QGemm" => {
            // (A, a_scale, a_zp, B, b_scale, b_zp[, C: i32 bias at scale a_scale * b_scale][, y_scale, y_zp]).
            let trans_b = cx.bool_attr("transB", false);
            let op = Gemm { alpha: a.f_or("alpha", 1.0), beta: 1.0, trans_a: cx.bool_attr("transA", false), trans_b };
            let a_dq = dequantize_input(cx, "a_dq", 0, 1, 2, 1)?;
            // A per-column B scale runs along N: B's axis 0 when transposed.
            let b_dq = dequantize_input(cx, "b_dq", 3, 4, 5, if trans_b { 0 } else { 1 })?;
            let mut ins = vec![a_dq, b_dq];
            if let Some(c) = cx.opt(6) {
                let scale = cx.add_aux("bias_scale", Binary(BinaryOp::Mul), vec![cx.input(1)?, cx.input(4)?])?;
                let zero = cx.scalar_zero("bias_zero", DType::I32)?;
                ins.push(cx.add_aux("bias_dq", DequantizeLinear { axis: 0 }, vec![c, scale, zero])?);
            }
            if cx.opt(7).is_none() {
                return cx.add(op, ins);
            }
            let y = cx.add_aux("gemm", op, ins)?;
            let zdt = cx.opt(8).map_or(DType::U8, |z| cx.fact(z).dtype);
            quantize_output(cx, y, 7, 8, zdt)
        }
        other => Err(cx.unsupported(format!("op {other} has no converter"))),
    }
}

/// `DequantizeLinear(input x, input scale, input zero point or 0 of x's type)` along `axis`.
fn dequantize_input(cx: &mut Cx, suffix: &str, x: usize, scale: usize, zero: usize, axis: i64) -> Result<OutletId> {
    let (xo, so) = (cx.input(x)?, cx.input(scale)?);
    let zo = match cx.opt(zero) {
        Some(z) => z,
        None => {
            let dt = cx.fact(xo).dtype;
            cx.scalar_zero(&format!("{suffix}_zero"), dt)?
        }
    };
    cx.add_aux(suffix, DequantizeLinear { axis }, vec![xo, so, zo])
}

/// The node's output: `QuantizeLinear(y, input scale, input zero point or 0 of `zdt`)`.
fn quantize_output(cx: &mut Cx, y: OutletId, scale: usize, zero: usize, zdt: DType) -> Result<Vec<OutletId>> {
    let so = cx.input(scale)?;
    let zo = match cx.opt(zero) {
        Some(z) => z,
        None => cx.scalar_zero("y_zero", zdt)?,
    };
    cx.add(QuantizeLinear { axis: 1 }, vec![y, so, zo])
}

/// Whether a node is one of the non-default-domain ops the importer reads: `com.microsoft`
/// `MatMulNBits`, `GatherBlockQuantized` and the QOperator ops ONNX Runtime's quantizer writes
/// around convolutions (`QLinearAdd`, `QLinearGlobalAveragePool`, `QGemm`), and slimnn's own
/// `DynamicRowQuantMatMul` (whose function body is not needed).
pub(super) fn is_microsoft_op(domain: Option<&str>, op_type: &str) -> bool {
    (domain == Some("com.microsoft")
        && matches!(
            op_type,
            "MatMulNBits" | "GatherBlockQuantized" | "QLinearAdd" | "QLinearGlobalAveragePool" | "QGemm"
        ))
        || (domain == Some(SLIMNN_DOMAIN) && op_type == "DynamicRowQuantMatMul")
}

/// Why a `com.microsoft` node cannot be read: attributes or optional inputs slimnn does not
/// support (g_idx, bias, accuracy levels change nothing in the reference semantics).
pub(super) fn microsoft_op_problem(op_type: &str, a: &Attrs, inputs: usize) -> Option<String> {
    if op_type == "GatherBlockQuantized" {
        if a.i_or("gather_axis", 0) != 0 || !matches!(a.i_or("quantize_axis", 1), 1 | -1) {
            return Some("only gather_axis = 0 and quantize_axis = 1 (2-d tables) are supported".into());
        }
        return (!(3..=4).contains(&inputs))
            .then(|| format!("takes 3 or 4 inputs (data, indices, scales[, zero_points]), got {inputs}"));
    }
    if op_type == "DynamicRowQuantMatMul" {
        return (inputs != 3).then(|| format!("takes 3 inputs (x, w, w_scale), got {inputs}"));
    }
    let arity = match op_type {
        "QLinearAdd" => Some((7, 8, "A, A_scale, A_zero_point, B, B_scale, B_zero_point, C_scale[, C_zero_point]")),
        "QLinearGlobalAveragePool" => Some((4, 5, "X, x_scale, x_zero_point, y_scale[, y_zero_point]")),
        "QGemm" => Some((6, 9, "A, a_scale, a_zero_point, B, b_scale, b_zero_point[, C, y_scale, y_zero_point]")),
        _ => None,
    };
    if let Some((lo, hi, names)) = arity {
        return (!(lo..=hi).contains(&inputs)).then(|| format!("takes {lo} to {hi} inputs ({names}), got {inputs}"));
    }
    if op_type != "MatMulNBits" {
        return Some(format!("{op_type} is not supported"));
    }
    for name in ["K", "N", "block_size"] {
        if a.i(name).is_none() {
            return Some(format!("attribute {name} is missing"));
        }
    }
    if !(3..=4).contains(&inputs) {
        return Some(format!("takes 3 or 4 inputs (A, B, scales[, zero_points]) here, got {inputs}"));
    }
    None
}

/// The value of a `Constant` node.
pub(super) fn constant_value(name: &str, a: &Attrs, base_dir: Option<&Path>) -> Result<Tensor> {
    Ok(if let Some(t) = a.t("value") {
        tensor_from_proto(t, base_dir)?
    } else if let Some(v) = a.f("value_float") {
        Tensor::scalar(v)
    } else if let Some(v) = a.floats("value_floats") {
        Tensor::from_vec(vec![v.len()], v.to_vec())?
    } else if let Some(v) = a.i("value_int") {
        Tensor::scalar(v)
    } else if let Some(v) = a.ints("value_ints") {
        Tensor::from_vec(vec![v.len()], v.to_vec())?
    } else {
        return Err(FormatError::Unsupported(format!("node '{name}' (Constant): no supported value attribute")));
    })
}

fn conv_attrs(cx: &Cx) -> Result<ConvAttrs> {
    let a = &cx.attrs;
    let ap = a.s_or("auto_pad", "NOTSET");
    let group = a.i_or("group", 1);
    Ok(ConvAttrs {
        kernel_shape: a.ints("kernel_shape").map(|v| cx.usizes("kernel_shape", v)).transpose()?,
        strides: cx.usizes("strides", a.ints("strides").unwrap_or(&[]))?,
        pads: cx.usizes("pads", a.ints("pads").unwrap_or(&[]))?,
        dilations: cx.usizes("dilations", a.ints("dilations").unwrap_or(&[]))?,
        group: usize::try_from(group)
            .ok()
            .filter(|&g| g > 0)
            .ok_or_else(|| cx.invalid(format!("group must be positive, got {group}")))?,
        auto_pad: auto_pad(&ap).ok_or_else(|| cx.invalid(format!("unknown auto_pad '{ap}'")))?,
    })
}

fn reduce(cx: &mut Cx, op: ReduceOp) -> Result<Vec<OutletId>> {
    let keepdims = cx.bool_attr("keepdims", true);
    let x = cx.input(0)?;
    let (axes, noop_with_empty_axes) = if reduce_axes_as_input(cx.op_type, cx.version) {
        (cx.ints_arg(1, "axes")?, cx.bool_attr("noop_with_empty_axes", false))
    } else {
        (cx.attrs.ints("axes").map_or(IntsArg::Absent, |v| IntsArg::Const(v.to_vec())), false)
    };
    let r = |axes| Reduce { op, axes, keepdims, noop_with_empty_axes };
    match axes {
        // An empty axes list means "not given".
        IntsArg::Const(v) => cx.add(r(Some(v).filter(|v| !v.is_empty())), vec![x]),
        IntsArg::Dynamic(o) => cx.add(r(None), vec![x, o]),
        IntsArg::Absent => cx.add(r(None), vec![x]),
    }
}

fn variadic(cx: &mut Cx) -> Result<Vec<OutletId>> {
    let ins: Vec<OutletId> = (0..cx.inputs.len()).map(|i| cx.input(i)).collect::<Result<_>>()?;
    let Some((&first, rest)) = ins.split_first() else {
        return Err(cx.invalid("needs at least one input"));
    };
    let op = match cx.op_type {
        "Max" => BinaryOp::Max,
        "Min" => BinaryOp::Min,
        _ => BinaryOp::Add,
    };
    let mean = cx.op_type == "Mean" && !rest.is_empty();
    if rest.is_empty() {
        return cx.add(Identity, vec![first]);
    }
    let mut acc = first;
    for (i, &x) in rest.iter().enumerate() {
        let last = i + 1 == rest.len() && !mean;
        acc = if last {
            cx.add(Binary(op), vec![acc, x])?[0]
        } else {
            cx.add_aux(&format!("{i}"), Binary(op), vec![acc, x])?
        };
    }
    if mean {
        let dt = cx.fact(acc).dtype;
        let n = Tensor::from_f64s(dt, vec![], &[ins.len() as f64])?;
        let n = cx.konst("count", n)?;
        return cx.add(Binary(BinaryOp::Div), vec![acc, n]);
    }
    Ok(vec![acc])
}

fn slice(cx: &mut Cx) -> Result<Vec<OutletId>> {
    if cx.version < 10 {
        // starts, ends and axes attributes, as the inputs of version 10.
        let x = cx.input(0)?;
        let mut ins = vec![x];
        for name in ["starts", "ends", "axes"] {
            if let Some(v) = cx.attrs.ints(name) {
                let t = Tensor::from_vec(vec![v.len()], v.to_vec())?;
                ins.push(cx.konst(name, t)?);
            }
        }
        return cx.add(Slice, ins);
    }
    let mut ins = vec![cx.input(0)?, cx.input(1)?, cx.input(2)?];
    match (cx.opt(3), cx.opt(4)) {
        (axes, None) => ins.extend(axes),
        (Some(axes), Some(steps)) => ins.extend([axes, steps]),
        (None, Some(steps)) => {
            // Steps without axes: make the default axes (0..len(starts)) explicit.
            let n = cx.fact(ins[1]).shape.first().and_then(|d| d.as_known());
            let n = n.ok_or_else(|| cx.unsupported("steps without axes need starts of known length"))?;
            let axes = Tensor::from_vec(vec![n], (0..n as i64).collect::<Vec<_>>())?;
            let axes = cx.konst("axes", axes)?;
            ins.extend([axes, steps]);
        }
    }
    cx.add(Slice, ins)
}

fn split(cx: &mut Cx) -> Result<Vec<OutletId>> {
    let axis = cx.attrs.i_or("axis", 0);
    let x = cx.input(0)?;
    let sizes = if cx.version < 13 {
        cx.attrs.ints("split").map_or(IntsArg::Absent, |v| IntsArg::Const(v.to_vec()))
    } else {
        cx.ints_arg(1, "split")?
    };
    let num_outputs = cx.n_outputs;
    if let Some(n) = cx.attrs.i("num_outputs") {
        if n != num_outputs as i64 {
            return Err(cx.invalid(format!("num_outputs is {n} but the node lists {num_outputs} outputs")));
        }
    }
    let split = match sizes {
        IntsArg::Dynamic(sizes) => return cx.add(Split { axis, split: None, num_outputs }, vec![x, sizes]),
        IntsArg::Const(v) => Some(cx.usizes("split", &v)?),
        IntsArg::Absent => None,
    };
    if split.as_ref().is_some_and(|s| s.len() != num_outputs) {
        return Err(
            cx.invalid(format!("split has {} sizes for {num_outputs} outputs", split.as_ref().map_or(0, Vec::len)))
        );
    }
    cx.add(Split { axis, split, num_outputs }, vec![x])
}

fn resize(cx: &mut Cx) -> Result<Vec<OutletId>> {
    let a = &cx.attrs;
    if cx.version < 11 {
        // Version 10: (X, scales), asymmetric coordinates, nearest rounding down (ONNX Runtime
        // rounds up when downsampling there, a leftover of Upsample).
        let mode_s = a.s_or("mode", "nearest");
        let op = Resize {
            mode: resize_mode(&mode_s).ok_or_else(|| cx.unsupported(format!("mode '{mode_s}' is not supported")))?,
            coord: CoordMode::Asymmetric,
            nearest: NearestMode::Floor,
            cubic_coeff_a: -0.75,
            exclude_outside: false,
            target: ResizeTarget::Scales,
            axes: None,
        };
        return cx.add(op, vec![cx.input(0)?, cx.input(1)?]);
    }
    let mode_s = a.s_or("mode", "nearest");
    let coord_s = a.s_or("coordinate_transformation_mode", "half_pixel");
    let nearest_s = a.s_or("nearest_mode", "round_prefer_floor");
    let bad = |what: &str, v: &str| cx.unsupported(format!("{what} '{v}' is not supported"));
    let mut op = Resize {
        mode: resize_mode(&mode_s).ok_or_else(|| bad("mode", &mode_s))?,
        coord: coord_mode(&coord_s).ok_or_else(|| bad("coordinate_transformation_mode", &coord_s))?,
        nearest: nearest_mode(&nearest_s).ok_or_else(|| bad("nearest_mode", &nearest_s))?,
        cubic_coeff_a: a.f_or("cubic_coeff_a", -0.75),
        exclude_outside: cx.bool_attr("exclude_outside", false),
        target: ResizeTarget::Scales,
        axes: a.ints("axes").map(<[i64]>::to_vec),
    };
    let x = cx.input(0)?;
    // Opset 11 requires a `scales` input even when `sizes` is given (then it is empty).
    let target = match (cx.opt(2), cx.opt(3)) {
        (_, Some(sizes)) => {
            op.target = ResizeTarget::Sizes;
            sizes
        }
        (Some(scales), None) => {
            if cx.fact(scales).shape.first() == Some(&slimnn_tensor::Dim::Known(0)) {
                return Err(cx.invalid("scales is empty and sizes is not given"));
            }
            scales
        }
        (None, None) => return Err(cx.invalid("one of scales or sizes must be given")),
    };
    cx.add(op, vec![x, target])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::proto::attribute_proto::AttributeType;
    use crate::onnx::proto::AttributeProto;

    fn s_attr(name: &str, v: &str) -> AttributeProto {
        AttributeProto {
            name: Some(name.into()),
            r#type: Some(AttributeType::String as i32),
            s: Some(v.as_bytes().to_vec()),
            ..Default::default()
        }
    }

    #[test]
    fn clip_extremes() {
        assert_eq!(extreme(DType::U8, false), Some(Tensor::scalar(0u8)));
        assert_eq!(extreme(DType::I64, true), Some(Tensor::scalar(i64::MAX)));
        assert_eq!(extreme(DType::F32, false), Some(Tensor::scalar(f32::MIN)));
        assert_eq!(extreme(DType::Bool, true), None);
    }

    #[test]
    fn const_only_positions() {
        assert_eq!(const_only_inputs("Unsqueeze", 13, &[true, true]), vec![1]);
        assert!(const_only_inputs("Unsqueeze", 11, &[true]).is_empty());
        assert_eq!(const_only_inputs("ReduceSum", 13, &[true, true]), vec![1]);
        assert!(const_only_inputs("ReduceMean", 17, &[true, true]).is_empty());
        assert_eq!(const_only_inputs("ReduceMean", 18, &[true, true]), vec![1]);
        assert_eq!(const_only_inputs("Resize", 11, &[true, true, true, true]), vec![1, 2]);
        assert_eq!(const_only_inputs("Resize", 13, &[true, true, true]), vec![1]);
        assert!(const_only_inputs("Resize", 10, &[true, true]).is_empty());
        assert!(const_only_inputs("ReduceSum", 11, &[true]).is_empty());
    }

    fn i_attr(name: &str, v: i64) -> AttributeProto {
        AttributeProto {
            name: Some(name.into()),
            r#type: Some(AttributeType::Int as i32),
            i: Some(v),
            ..Default::default()
        }
    }

    #[test]
    fn microsoft_qoperator_ops_are_read_with_their_arity_checked() {
        let none = Attrs { list: &[] };
        for op in ["QLinearAdd", "QLinearGlobalAveragePool", "QGemm"] {
            assert!(is_microsoft_op(Some("com.microsoft"), op), "{op}");
            assert!(!is_microsoft_op(None, op), "{op}");
        }
        assert!(microsoft_op_problem("QLinearAdd", &none, 7).is_none());
        assert!(microsoft_op_problem("QLinearAdd", &none, 8).is_none());
        let msg = microsoft_op_problem("QLinearAdd", &none, 5).unwrap();
        assert!(msg.contains("takes 7 to 8 inputs") && msg.contains("got 5"), "{msg}");
        assert!(microsoft_op_problem("QLinearGlobalAveragePool", &none, 5).is_none());
        assert!(microsoft_op_problem("QLinearGlobalAveragePool", &none, 3).is_some());
        assert!(microsoft_op_problem("QGemm", &none, 6).is_none());
        assert!(microsoft_op_problem("QGemm", &none, 9).is_none());
        assert!(microsoft_op_problem("QGemm", &none, 10).is_some());
    }

    #[test]
    fn static_checks() {
        let none = Attrs { list: &[] };
        assert!(static_unsupported("MaxPool", 12, &none, &[true, false]).is_none());
        assert!(static_unsupported("MaxPool", 12, &none, &[true, true]).is_some());
        // LayerNorm statistics are produced in float (stash_type 1) only.
        assert!(static_unsupported("LayerNormalization", 17, &none, &[true, false, true]).is_none());
        let f64_stash = [i_attr("stash_type", 11)];
        let msg = static_unsupported("LayerNormalization", 17, &Attrs { list: &f64_stash }, &[true, true]).unwrap();
        assert!(msg.contains("stash_type 11"), "{msg}");
        assert!(static_unsupported("LayerNormalization", 17, &Attrs { list: &f64_stash }, &[true]).is_none());
        // Dropout's mask is produced from version 10 (bool) on.
        assert!(static_unsupported("Dropout", 12, &none, &[true, true]).is_none());
        assert!(static_unsupported("Dropout", 7, &none, &[true, true]).is_some());
        let spatial0 = [i_attr("spatial", 0)];
        assert!(static_unsupported("BatchNormalization", 7, &Attrs { list: &spatial0 }, &[true]).is_some());
        assert!(static_unsupported("BatchNormalization", 7, &none, &[true]).is_none());
        let tf = [s_attr("coordinate_transformation_mode", "tf_crop_and_resize")];
        let msg = static_unsupported("Resize", 13, &Attrs { list: &tf }, &[true]).unwrap();
        assert!(msg.contains("tf_crop_and_resize"), "{msg}");
        let ok = [s_attr("mode", "linear")];
        assert!(static_unsupported("Resize", 13, &Attrs { list: &ok }, &[true]).is_none());
        assert!(static_unsupported("Resize", 10, &Attrs { list: &ok }, &[true]).is_none());
        let cubic = [s_attr("mode", "cubic")];
        assert!(static_unsupported("Resize", 10, &Attrs { list: &cubic }, &[true]).is_some());
        let precision = [i_attr("precision", 16)];
        assert!(static_unsupported("QuantizeLinear", 23, &Attrs { list: &precision }, &[true]).is_some());
        assert!(static_unsupported("Constant", 13, &none, &[true]).is_some());
    }
}
